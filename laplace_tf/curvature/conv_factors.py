"""Per-example kernel-gradient factors of the convolutions (the factor protocol of
:mod:`layers`) and the unfolding they share; the rules that build them are in
:mod:`conv_rules`.

Inputs are unfolded into patches ``[N, L, P, C]`` (``P`` kernel offsets, TF padding) by
:func:`unfold`. :class:`GroupedPatches` reduces grouped and (dilated) depthwise kernels
by patch products, :class:`DepthwisePatches` depthwise kernels by backward-filter
depthwise convolutions with the examples folded into the channels, and
:class:`TransposedPatches` transposed-convolution kernels from the unfolded cotangents,
and :class:`FoldedPatches` float32 2D kernels, one column of ``S`` at a time, by
backward-filter convolutions with the examples folded into groups.
"""

from __future__ import annotations

import contextlib
import itertools
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import tensorflow as tf

from laplace_tf.curvature import paired
from laplace_tf.curvature.layers import (
    Patches,
    _OneVariable,
    column_block,
    columns_gram,
    fold_gradients,
    size_of,
)


@dataclass(frozen=True)
class Window:
    """Kernel size, strides, dilation and padding (``valid`` / ``same`` / ``causal``)."""

    kernel_size: tuple[int, ...]
    strides: tuple[int, ...]
    dilation: tuple[int, ...]
    padding: str

    @classmethod
    def of(cls, layer) -> Window:
        return cls(
            tuple(layer.kernel_size),
            tuple(layer.strides),
            tuple(layer.dilation_rate),
            layer.padding,
        )


def _size(x: tf.Tensor, axis: int):
    """A static size where known, else the dynamic one."""
    return x.shape[axis] if x.shape[axis] is not None else tf.shape(x)[axis]


#: While a step is traced (:func:`shared_unfoldings`): the patches unfolded in each of its
#: graphs, by input and window, with whether a factor's squares read them. A step's
#: chunks of columns of ``S`` so share one unfolding of each layer's input (on the
#: benchmark CNN's exact GGN, five chunks had unfolded it five times: ~20 of the step's
#: 176 ms of ops on two threads).
_SHARED = threading.local()


@contextlib.contextmanager
def shared_unfoldings() -> Iterator[None]:
    """Within it, :func:`unfold` unfolds each input once per graph; the record is dropped
    on leaving (it holds the graphs' tensors)."""
    outer = getattr(_SHARED, "graphs", None)
    _SHARED.graphs = {} if outer is None else outer
    try:
        yield
    finally:
        _SHARED.graphs = outer


def _record(x: tf.Tensor, window: Window) -> tuple[dict | None, tuple]:
    graphs = None if tf.executing_eagerly() else getattr(_SHARED, "graphs", None)
    unfolded = None if graphs is None else graphs.setdefault(tf.compat.v1.get_default_graph(), {})
    return unfolded, (x.ref(), window)


def unfold(x: tf.Tensor, window: Window, *, read: bool = False) -> tf.Tensor:
    """Patches ``[N, L, P, C]`` of ``x: [N, *spatial, C]`` at the ``L`` output locations
    of a convolution with ``window`` (TF padding: ``same`` puts the odd pixel after),
    ``P = prod(kernel_size)`` offsets in the kernel's row-major order. Within
    :func:`shared_unfoldings`, once per graph for a given ``x`` and ``window``; ``read``:
    the caller's squares read them (:func:`patches_read`)."""
    unfolded, key = _record(x, window)
    if unfolded is None:
        return _unfold(x, window)
    if key not in unfolded:
        unfolded[key] = [_unfold(x, window), False]
    unfolded[key][1] |= read
    return unfolded[key][0]


def patches_read(x: tf.Tensor, window: Window) -> bool:
    """Whether a factor traced in this graph reads the patches of ``x`` (another chunk of
    columns): a later one-column chunk then takes the products, not a
    :class:`FoldedPatches` (exact GGN of the benchmark CNN, its last chunk one column of
    nine: 79 against 83 ms a step)."""
    unfolded, key = _record(x, window)
    return unfolded is not None and key in unfolded and unfolded[key][1]


def _indices(values: list[int]):
    """``values`` as an int32 constant made once per graph while a step is traced (the
    slices of the unfoldings repeat a few begin / end / stride vectors: ResNet50's exact
    ``ggn`` step traced 972 constants for them), else as they are. Made free of the
    control dependencies in force (the factors wait for their cotangents): shared, they
    must order nothing."""
    graphs = None if tf.executing_eagerly() else getattr(_SHARED, "graphs", None)
    if graphs is None:
        return values
    made = graphs.setdefault(tf.compat.v1.get_default_graph(), {})
    key = ("indices", *values)
    if key not in made:
        with tf.control_dependencies(None):
            made[key] = tf.constant(values, tf.int32)
    return made[key]


def _unfold(x: tf.Tensor, window: Window) -> tf.Tensor:
    rank = len(window.kernel_size)
    paddings = _same_padding(x, window) if window.padding == "same" else []
    outputs = []
    for axis, (k, s, d) in enumerate(
        zip(window.kernel_size, window.strides, window.dilation, strict=True)
    ):
        size, span = _size(x, axis + 1), (k - 1) * d + 1
        if window.padding == "same":
            out = (size + s - 1) // s
        else:
            left = span - 1 if window.padding == "causal" else 0
            out = (size + left - span) // s + 1
            paddings.append([left, 0])
        outputs.append(out)
    padded = tf.pad(x, [[0, 0], *paddings, [0, 0]])
    mask = 1 | (1 << (rank + 1))  # whole batch and channel axes
    slices = []
    for offset in itertools.product(*(range(k) for k in window.kernel_size)):
        begin = [o * d for o, d in zip(offset, window.dilation, strict=True)]
        steps = zip(begin, outputs, window.strides, strict=True)
        end = [b + (out - 1) * s + 1 for b, out, s in steps]
        slices.append(
            tf.strided_slice(
                padded,
                _indices([0, *begin, 0]),
                _indices([0, *end, 0]),
                _indices([1, *window.strides, 1]),
                begin_mask=mask,
                end_mask=mask,
            )
        )
    patches = tf.stack(slices, axis=-2)  # [N, *out, P, C]
    locations = _static_product(patches.shape[1:-2])
    known = locations > 0 and x.shape[-1] is not None  # then a static shape: one constant
    return tf.reshape(
        patches, [-1 if known else tf.shape(x)[0], locations, len(slices), x.shape[-1]]
    )


def _same_padding(x: tf.Tensor, window: Window) -> list:
    """TF's ``same`` padding ``[before, after]`` of each spatial axis of ``x``."""
    paddings = []
    for axis, (k, s, d) in enumerate(
        zip(window.kernel_size, window.strides, window.dilation, strict=True)
    ):
        size, span = _size(x, axis + 1), (k - 1) * d + 1
        total = ((size + s - 1) // s - 1) * s + span - size
        total = max(total, 0) if isinstance(total, int) else tf.maximum(total, 0)
        paddings.append([total // 2, total - total // 2])
    return paddings


def _static_product(sizes) -> int:
    """The product of ``sizes`` where all are known, else ``-1`` (inferred by reshape)."""
    sizes = list(sizes)
    return -1 if any(s is None for s in sizes) else int(np.prod(sizes, dtype=np.int64))


def _fold(values: tf.Tensor, like: tf.Tensor, window: Window) -> tf.Tensor:
    """The adjoint of :func:`unfold`: ``values [N, L, P, C]`` summed back into ``like``'s
    shape (a transposed convolution with per-example kernels)."""
    zeros = tf.zeros_like(like)
    with tf.GradientTape() as tape:
        tape.watch(zeros)
        patches = unfold(zeros, window)
    return tape.gradient(patches, zeros, output_gradients=values)


# Factors ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class GroupedPatches(_OneVariable):
    """Grouped kernels: ``g[n, k][q, g, o] = sum_l p[n, l, g, q] d[n, k, l, g, o]``.

    ``p: [N, L, G, Q]`` patches per group, ``d: [N, K, L, G, O]`` cotangents; the variable
    is ``[Q, G, O]`` in row-major order (a grouped kernel ``[*k, C/G, G * O]``, a
    depthwise kernel ``[*k, C, M]`` with ``Q = prod(k)``). Reduced one column at a time
    by batched matrix products over ``(n, g)``.
    """

    variable: Any
    patches: tf.Tensor
    cotangents: tf.Tensor

    def _operands(self):
        """Patches ``[N, G, Q, L]`` and cotangents ``[K, N, G, L, O]``, laid out for matmul."""
        patches = tf.transpose(self.patches, [0, 2, 3, 1])
        return patches, tf.transpose(self.cotangents, [1, 0, 3, 2, 4])

    def _shape(self) -> list[int]:
        """``[G, Q, O]``: the variable in the layout of the products."""
        groups, width = self.cotangents.shape[-2:]
        return [groups, self.variable.shape.num_elements() // (groups * width), width]

    def _as_variable(self, grads: tf.Tensor) -> tf.Tensor:
        """``[..., G, Q, O] -> [..., *variable.shape]``."""
        rank = grads.shape.rank
        order = [*range(rank - 3), rank - 2, rank - 3, rank - 1]
        shape = tf.concat([tf.shape(grads)[: rank - 3], self.variable.shape], 0)
        return tf.reshape(tf.transpose(grads, order), shape)

    def sum_squares(self) -> list[tf.Tensor]:
        patches, cotangents = self._operands()

        def add(total, k, start, stop):
            grads = tf.matmul(patches[start:stop], cotangents[k, start:stop])
            return total + tf.reduce_sum(tf.square(grads), axis=0)

        count, columns = size_of(patches, 0), size_of(cotangents, 0)
        initial = tf.zeros(self._shape(), self.patches.dtype)
        size = self.variable.shape.num_elements()
        return [self._as_variable(fold_gradients(add, count, columns, size, initial))]

    def weighted_gram(self, weights: list[tf.Tensor]) -> tf.Tensor:
        patches, cotangents = self._operands()
        groups, offsets, width = self._shape()
        weight = tf.reshape(tf.cast(weights[0], self.patches.dtype), [offsets, groups, width])
        weight = tf.transpose(weight, [1, 0, 2])

        def column(k):
            scaled = tf.matmul(patches, tf.gather(cotangents, k)) * weight  # [N, G, Q, O]
            back = tf.matmul(patches, scaled, transpose_a=True)  # [N, G, L, O]
            return tf.transpose(tf.reduce_sum(cotangents * back, axis=[2, 3, 4]))

        return columns_gram(column, self.cotangents)

    def dense_grads(self) -> list[tf.Tensor]:
        patches, cotangents = self._operands()
        grads = tf.matmul(patches[None], cotangents)  # [K, N, G, Q, O]
        return [self._as_variable(tf.experimental.numpy.swapaxes(grads, 0, 1))]


@dataclass(frozen=True)
class DepthwisePatches(_OneVariable):
    """Depthwise kernels ``[*k, C, M]`` (1D or 2D, unit dilation, equal strides):
    ``g[n, k][p, c, m] = sum_l x[n, l + p, c] d[n, k, l, c, m]``, formed without unfolding.

    The examples are folded into the channels and a block of columns of ``S`` into the
    depth multiplier, so one backward-filter depthwise convolution (per tile of at most
    :data:`DEPTHWISE_TILE` offsets a side) gives the per-example kernels of a chunk of
    examples and columns (2-9x faster than the patch products of :class:`GroupedPatches`
    on the depthwise layers of MobileNetV2 and EfficientNetB0, measured, and no ``P``-fold
    copy of the input); the GLM Gram convolves each example with its own weighted kernels
    the same way. ``x: [N, *spatial, C]`` is the layer input, ``d: [N, K, *spatial, C M]``
    the cotangents; the dense gradients (for reducers) go through the patches. The
    variable may also be a grouped kernel ``[*k, 1, C M]`` with one group per input channel
    (ConvNeXt's depthwise ``Conv2D(groups=C)``): the same entries in the same order.
    """

    variable: Any
    inputs: tf.Tensor
    cotangents: tf.Tensor
    window: Window

    @staticmethod
    def applies(window: Window) -> bool:
        """TF's CPU kernel takes neither dilation nor unequal strides."""
        return set(window.dilation) == {1} and len(set(window.strides)) == 1

    def _depth(self) -> tuple[int, int]:
        """``(C, M)``: the input channels and the depth multiplier."""
        channels = self.inputs.shape[-1]
        return channels, self.variable.shape[-2] * self.variable.shape[-1] // channels

    def _grouped(self) -> GroupedPatches:
        return _unfolded_depthwise(self.variable, self.inputs, self.cotangents, self.window)

    def _planar(self):
        """Inputs ``[N, H, W, C]`` (padded: ``valid`` from here on), cotangents
        ``[N, K, H', W', C M]``, the kernel's ``(kh, kw)`` and strides (1D as ``H = 1``)."""
        inputs, cotangents, window = self.inputs, self.cotangents, self.window
        kernel = list(window.kernel_size)
        if window.padding == "same":  # padded here: TF's kernel is ~15x slower on small
            inputs = tf.pad(inputs, [[0, 0], *_same_padding(inputs, window), [0, 0]])  # maps
        if len(kernel) == 1:
            inputs, cotangents, kernel = inputs[:, None], cotangents[:, :, None], [1, *kernel]
        stride = window.strides[0]
        return inputs, cotangents, kernel, [1, stride, stride, 1]

    def _kernel_grads(self, folded, d, kernel, strides) -> tf.Tensor:
        """Per-example kernels ``[*kernel, n, C, b, M]`` of the :func:`_folded` inputs
        ``[1, H, W, n C]`` and cotangents ``d [n, b, H', W', C M]`` (``b`` columns)."""
        channels, multiplier = self._depth()
        n, b, out = tf.shape(d)[0], tf.shape(d)[1], tf.shape(d)
        d = tf.reshape(d, [n, b, out[2], out[3], channels, multiplier])
        d = tf.reshape(tf.transpose(d, [2, 3, 0, 4, 1, 5]), [1, out[2], out[3], -1])
        rows = []
        for top, height in _tiles(kernel[0]):
            row = []
            for left, width in _tiles(kernel[1]):
                bottom = top + (out[2] - 1) * strides[1] + height
                right = left + (out[3] - 1) * strides[2] + width
                row.append(
                    tf.compat.v1.nn.depthwise_conv2d_native_backprop_filter(
                        folded[:, top:bottom, left:right],
                        tf.stack([height, width, n * channels, b * multiplier]),
                        d,
                        strides,
                        "VALID",
                    )
                )
            rows.append(tf.concat(row, axis=1) if len(row) > 1 else row[0])
        grads = tf.concat(rows, axis=0) if len(rows) > 1 else rows[0]
        return tf.reshape(grads, [*kernel, n, channels, b, multiplier])

    def sum_squares(self) -> list[tf.Tensor]:
        inputs, cotangents, kernel, strides = self._planar()
        channels, multiplier = self._depth()
        per_example = self.variable.shape.num_elements()
        block = column_block(cotangents.shape[1], per_example)

        def add(total, k, start, stop):
            x, d = inputs[start:stop], cotangents[start:stop, k : k + block]
            grads = self._kernel_grads(_folded(x), d, kernel, strides)
            return total + tf.reduce_sum(tf.square(grads), axis=[2, 4])

        count, columns = size_of(cotangents, 0), size_of(cotangents, 1)
        initial = tf.zeros([*kernel, channels, multiplier], inputs.dtype)
        total = fold_gradients(add, count, columns, per_example, initial, block)
        return [tf.reshape(total, self.variable.shape)]

    def weighted_gram(self, weights: list[tf.Tensor]) -> tf.Tensor:
        """``<g_k, w g_l> = <d_k, A(w * g_l)>`` with ``A`` the layer's own depthwise
        convolution of each example by its kernel ``w * g_l`` (folded like the inputs)."""
        inputs, cotangents, kernel, strides = self._planar()
        channels, multiplier = self._depth()
        weight = tf.reshape(tf.cast(weights[0], inputs.dtype), [*kernel, 1, channels, multiplier])
        n, out = tf.shape(inputs)[0], tf.shape(cotangents)
        folded = _folded(inputs)

        def column(k):
            grads = self._kernel_grads(folded, cotangents[:, k : k + 1], kernel, strides)
            scaled = tf.reshape(grads[..., 0, :] * weight, [*kernel, n * channels, multiplier])
            back = tf.nn.depthwise_conv2d(folded, scaled, strides, "VALID")  # [1, H', W', nCM]
            back = tf.reshape(back, [out[2], out[3], n, channels * multiplier])
            back = tf.transpose(back, [2, 0, 1, 3])[:, None]
            return tf.reduce_sum(cotangents * back, axis=[2, 3, 4])

        return columns_gram(column, cotangents)

    def dense_grads(self) -> list[tf.Tensor]:
        return self._grouped().dense_grads()


def _folded(x: tf.Tensor) -> tf.Tensor:
    """``[n, H, W, C] -> [1, H, W, n C]``: the examples folded into the channels."""
    size = tf.shape(x)
    return tf.reshape(tf.transpose(x, [1, 2, 0, 3]), [1, size[1], size[2], -1])


#: Largest kernel extent TF's CPU backward-filter depthwise kernel runs fast for (5 x 5:
#: 3-30x slower than the patch products, measured); larger kernels are cut into tiles.
DEPTHWISE_TILE = 3


def _tiles(size: int) -> list[tuple[int, int]]:
    """``(start, length)`` of the tiles of at most :data:`DEPTHWISE_TILE` offsets."""
    return [(a, min(DEPTHWISE_TILE, size - a)) for a in range(0, size, DEPTHWISE_TILE)]


@dataclass(frozen=True)
class TransposedPatches(_OneVariable):
    """Transposed-convolution kernels ``[*k, F, C]``:
    ``g[n, k] = reshape(sum_l unfold(d[n, k])[l] (x) x[n, l], shape)``.

    ``x: [N, L, C]`` is the layer input at its ``L`` locations, ``d: [N, K, *spatial, F]``
    the cotangents of the output, unfolded one column at a time with ``window``.
    """

    variable: Any
    inputs: tf.Tensor
    cotangents: tf.Tensor
    window: Window

    def _column(self, k) -> tf.Tensor:
        patches = unfold(tf.gather(self.cotangents, k, axis=1), self.window)
        patches = tf.reshape(patches, [tf.shape(patches)[0], tf.shape(patches)[1], -1])
        return tf.matmul(patches, self.inputs, transpose_a=True)  # [N, P * F, C]

    def _shape(self) -> list[int]:
        channels = self.inputs.shape[-1]
        return [self.variable.shape.num_elements() // channels, channels]

    def _weight(self, weight) -> tf.Tensor:
        return tf.reshape(tf.cast(weight, self.inputs.dtype), self._shape())

    def sum_squares(self) -> list[tf.Tensor]:
        def add(total, k, start, stop):
            patches = unfold(self.cotangents[start:stop, k], self.window)
            patches = tf.reshape(patches, [tf.shape(patches)[0], tf.shape(patches)[1], -1])
            grads = tf.matmul(patches, self.inputs[start:stop], transpose_a=True)
            return total + tf.reduce_sum(tf.square(grads), axis=0)

        count, columns = size_of(self.cotangents, 0), size_of(self.cotangents, 1)
        initial = tf.zeros(self._shape(), self.inputs.dtype)
        size = self.variable.shape.num_elements()
        total = fold_gradients(add, count, columns, size, initial)
        return [tf.reshape(total, self.variable.shape)]

    def weighted_gram(self, weights: list[tf.Tensor]) -> tf.Tensor:
        weight = self._weight(weights[0])
        offsets, filters = self.variable.shape[:-2].num_elements(), self.cotangents.shape[-1]
        like = self.cotangents[:, 0]
        axes = list(range(2, self.cotangents.shape.rank))

        def column(k):
            back = tf.matmul(self.inputs, self._column(k) * weight, transpose_b=True)
            back = tf.reshape(back, [tf.shape(back)[0], tf.shape(back)[1], offsets, filters])
            return tf.reduce_sum(self.cotangents * _fold(back, like, self.window)[:, None], axes)

        return columns_gram(column, self.cotangents)

    def dense_grads(self) -> list[tf.Tensor]:
        per_column = tf.map_fn(
            self._column,
            tf.range(tf.shape(self.cotangents)[1]),
            fn_output_signature=tf.TensorSpec(None, self.inputs.dtype),
        )
        grads = tf.experimental.numpy.swapaxes(per_column, 0, 1)
        return [tf.reshape(grads, tf.concat([tf.shape(grads)[:2], self.variable.shape], 0))]


#: Output locations per output channel from which a float32 2D kernel (no groups, unit
#: dilation), one column of ``S`` at a time, takes :class:`FoldedPatches` (strided kernels
#: always take it). One column, 32 examples unless stated, median ms, patch products
#: against folded (3 x 3 ``same`` unless stated; ``L`` locations, ``C -> O`` channels):
#: L = 64, 128 -> 32: 2.95 / 1.79; 128 -> 16: 2.96 / 1.64; 256 -> 32: 4.59 / 3.37;
#: 64 -> 64: 1.34 / 1.43; L = 16, 128 -> 32: 1.17 / 1.32; 128 -> 128: 2.29 / 3.91;
#: L = 256, 64 -> 32: 4.21 / 2.56; 64 -> 64: 4.55 / 3.78; L = 1024, 3 -> 32: 1.02 /
#: 0.80; 7 x 7 stride 2 ``valid`` on 38 x 38, 3 -> 64: 6.82 / 1.49; 3 x 3 stride 2 on
#: 16 x 16, 16 -> 16: 2.65 / 0.51; benchmark CNN (256 examples, ``valid``) L = 676, 1 ->
#: 16: 3.89 / 2.49; L = 121, 16 -> 32: 4.37 / 2.72. Blocks of several columns stay with
#: the patch products (nine columns of the CNN's layers: 10.1 / 19.5 and 14.4 / 71.6), and
#: so do 1 x 1 kernels, which unfold into no copies (stride 2 on 8 x 8, 256 -> 512: 2.83 /
#: 5.17; 256 -> 128: 1.43 / 1.32).
FOLDED_LOCATIONS_PER_OUTPUT = 2


@dataclass(frozen=True)
class FoldedPatches(Patches):
    """A float32 2D convolution kernel whose squares, for one column of ``S`` at a time,
    come from backward-filter convolutions of the layer input ``x: [N, H, W, C]`` with
    the examples folded into the channels as groups: ``[1, H, W, n C]`` against
    ``[1, H', W', n O]`` gives the per-example kernels ``[*k, C, n O]`` of a chunk of
    examples in one call, with no ``P``-fold copy of the input (the unfolded patches stay
    for the GLM Gram, the reducers and blocks of columns, which use :class:`Patches`;
    unused, they are pruned from a compiled step). TF's CPU kernel takes no float64 for
    grouped convolutions: other dtypes take the patch products.
    """

    inputs: tf.Tensor
    window: Window
    spatial: tuple

    @staticmethod
    def applies(layer, delta: tf.Tensor) -> bool:
        """``delta: [N, K, H', W', O]``: one column, float32, a plain 2D window of more
        than one offset, and strides above 1 or at least
        :data:`FOLDED_LOCATIONS_PER_OUTPUT` locations per output channel (and more than
        :data:`paired.PAIRED_LOCATIONS` locations)."""
        if delta.shape.rank != 5 or delta.shape[1] != 1 or delta.dtype != tf.float32:
            return False
        if layer.groups != 1 or tuple(layer.dilation_rate) != (1, 1):
            return False
        if tuple(layer.kernel_size) == (1, 1):  # no unfolding to save; the products win
            return False
        if layer.padding not in ("same", "valid") or None in delta.shape[2:]:
            return False
        locations = delta.shape[2] * delta.shape[3]
        if locations <= paired.PAIRED_LOCATIONS:
            return False
        strided = tuple(layer.strides) != (1, 1)
        return strided or locations >= FOLDED_LOCATIONS_PER_OUTPUT * delta.shape[-1]

    def sum_squares(self) -> list[tf.Tensor]:
        kernel, window = self.variable.shape, self.window
        inputs, outputs = kernel[2], kernel[3]
        strides = [1, *window.strides, 1]
        padding = window.padding.upper()

        def add(total, k, start, stop):
            d = tf.reshape(self.cotangents[start:stop, k], [-1, *self.spatial, outputs])
            with tf.control_dependencies([d]):  # not formed in the forward pass
                x = _folded(self.inputs[start:stop])
            n = tf.shape(d)[0]
            grads = tf.raw_ops.Conv2DBackpropFilter(
                input=x,
                filter_sizes=tf.stack([kernel[0], kernel[1], inputs, n * outputs]),
                out_backprop=_folded(d),
                strides=strides,
                padding=padding,
            )  # [kh, kw, C, n O]
            grads = tf.reshape(grads, [kernel[0] * kernel[1] * inputs, n, outputs])
            return total + tf.reduce_sum(tf.square(grads), axis=1)

        count = size_of(self.cotangents, 0)
        shape = [kernel[0] * kernel[1] * inputs, outputs]
        total = fold_gradients(add, count, 1, shape[0] * shape[1], tf.zeros(shape, tf.float32))
        return [tf.reshape(total, kernel)]


def _grouped_cotangents(delta: tf.Tensor, groups: int) -> tf.Tensor:
    """``[N, K, *spatial, G * O] -> [N, K, L, G, O]``."""
    shape = tf.shape(delta)
    return tf.reshape(delta, [shape[0], shape[1], -1, groups, delta.shape[-1] // groups])


def _unfolded_depthwise(kernel, inputs, delta, window: Window) -> GroupedPatches:
    """``kernel [*k, C, M]`` (or ``[*k, 1, C M]``); ``delta [N, K, *spatial, C * M]``."""
    patches = tf.transpose(unfold(inputs, window), [0, 1, 3, 2])  # [N, L, C, P]
    return GroupedPatches(kernel, patches, _grouped_cotangents(delta, inputs.shape[-1]))
