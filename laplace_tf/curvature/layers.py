"""Per-layer rules: where to cut a layer's forward, and its per-sample Jacobian.

A rule splits a parameterised layer ``y = act(z(x; theta))`` at ``z``, the tensor whose
cotangents ``delta[n, k] = J_z(x_n)^T s_{nk}`` the engine back-propagates for every
column ``k`` of the output-Hessian factor. The per-sample gradient of column ``k`` is then
a cheap function of the layer input and ``delta``: for a Dense kernel the outer product
``x_n (x) delta_{nk}`` (BackPACK's trick). Rules return *factors* of those gradients and
never materialise them for the large parameters.

The factor protocol, implemented by every factor:

- ``variables``: the (keras) variables the factor covers;
- ``sum_squares() -> list[tf.Tensor]``: ``sum_n sum_k g_{nk}^2``, shaped like each
  variable (the curvature diagonal);
- ``weighted_gram(weights) -> [N, K, K]``: ``sum_p w_p g_{nkp} g_{nlp}`` per example
  (the GLM predictive covariance ``J diag(w) J^T``), ``weights`` shaped like
  ``variables``;
- ``dense_grads() -> list[tf.Tensor]``: the per-example gradients ``[N, K, *shape]`` of
  each variable, for reducers that need more than the diagonal on small selections.
  Required of factor classes beyond :class:`Outer`, :class:`Explicit`, :class:`Patches`,
  :class:`Rows` and :class:`PerExample` (which reducers read by type), e.g.
  :class:`Contraction` and those of :mod:`conv_rules`.

so fitting and prediction come from one place. Rules live in the registry
(:mod:`registry`); this module holds the factors and the helpers rules share;
:mod:`dense_rules` holds Dense, EinsumDense and Embedding, :mod:`conv_rules` and
:mod:`norm_rules` the convolutions and the normalisations.
"""

from __future__ import annotations

import string
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import keras
import tensorflow as tf

from laplace_tf._checks import unwrap_variable
from laplace_tf.curvature import paired
from laplace_tf.curvature.registry import Rule as Rule
from laplace_tf.curvature.registry import rule_for as rule_for

#: Upper bound on entries of per-example gradients materialised at once by the fallback.
FALLBACK_CHUNK_ENTRIES = 2**24
#: Upper bound on the entries of per-example gradients that a factor's ``sum_squares``
#: forms at once (one column of ``S`` for a chunk of examples; 2**22 entries: 16 MiB in
#: float32). A batch whose ``N`` per-example gradients of one weight would exceed it is
#: reduced in chunks of examples, so the fit's memory does not grow with ``N x weight``.
#: 2**24 cost ResNet50 (batch 32) 60-100 MiB more live tensors and was no faster
#: (``ggn_mc`` 1.8-2.2x a gradient epoch either way, exact ``ggn`` 12.3x against 10.3x);
#: on small kernels (MobileNetV2, EfficientNetB0) the two are within noise (docs).
GRADIENT_ENTRIES = 2**22
#: Patch sizes ``Q`` (kernel entries per output channel) up to which :class:`Patches`
#: forms each example's and column's kernel gradient as laid out, ``p_n^T d_nk``, one
#: broadcast batched product, where larger patches take one product per example over
#: the columns side by side (``p_n^T [d_nk ... d_nk+b]``), which needs the cotangents
#: transposed: a copy of ``[N, K, L, O]`` that costs more than the products when ``Q`` is
#: small (benchmark CNN, first layer ``Q = 9``: 5.5 against 10-12 ms a batch; ``Q = 144``:
#: 15 against 13 ms). Blocks of one column (large models loop over the columns) need no
#: transposing and keep the one product per example.
NARROW_PATCHES = 48


def fold_gradients(add, count, columns, per_example: int, initial, block: int = 1):
    """Fold ``add(total, k, start, stop)`` over the columns ``k`` of ``S`` and chunks of
    examples ``[start, stop)`` sized so that ``(stop - start) * per_example`` stays within
    :data:`GRADIENT_ENTRIES` (``per_example``: the gradient entries of one example and
    column). With ``block > 1``, ``k`` is the first of up to ``block`` columns taken
    together (``add`` reads ``[k, min(k + block, columns))``), the examples chunked for
    ``block`` columns' entries. ``count`` and ``columns`` are ints where the shapes are
    static (:func:`size_of`): one block of one chunk then takes no ``tf.foldl`` (a loop
    costs tracing and graph optimisation on a first fit; DenseNet121 has 120 of them
    a column of ``S``)."""
    chunk = max(1, GRADIENT_ENTRIES // max(1, per_example * block))
    chunks = (count + chunk - 1) // chunk
    blocks = (columns + block - 1) // block
    if isinstance(chunks, int) and isinstance(blocks, int) and chunks * blocks == 1:
        return add(initial, 0, 0, count)  # one block, one chunk: no loop to trace

    def body(total, index):
        start = (index % chunks) * chunk
        return add(total, (index // chunks) * block, start, tf.minimum(start + chunk, count))

    return tf.foldl(body, tf.range(blocks * chunks), initial, parallel_iterations=1)


def size_of(tensor: tf.Tensor, axis: int):
    """``tensor``'s size along ``axis``: an int where static, else a scalar tensor."""
    size = tensor.shape[axis]
    return size if size is not None else tf.shape(tensor)[axis]


def column_block(columns: int | None, per_example: int, count: int | None = None) -> int:
    """Columns of ``S`` whose per-example gradients (``per_example`` entries each) are
    formed together: all of them when a chunk of examples (``count``, default 32) fits
    :data:`GRADIENT_ENTRIES` with them, fewer otherwise; 1 when ``columns`` is unknown.
    One product over a block of columns runs many times faster than one per column on
    small conv kernels (measured on the benchmark CNN)."""
    if columns is None:
        return 1
    fit = GRADIENT_ENTRIES // max(1, per_example * (count or 32))
    return max(1, min(columns, fit))


class _OneVariable:
    """Factors of one weight expose it as ``variables`` too, like :class:`PerExample`."""

    @property
    def variables(self) -> list:
        return [self.variable]


@dataclass(frozen=True)
class Outer(_OneVariable):
    """``g[n, k] = reshape(a[n] (x) d[n, k], shape)`` with ``a: [N, I]``, ``d: [N, K, J]``."""

    variable: Any
    inputs: tf.Tensor
    cotangents: tf.Tensor

    def cotangent_squares(self) -> tf.Tensor:
        """``sum_k d[n, k]^2``, ``[N, J]``: all that :meth:`from_cotangent_squares` reads
        of the cotangents, so it adds up over chunks of columns."""
        return tf.reduce_sum(tf.square(self.cotangents), axis=1)

    def from_cotangent_squares(self, squares: tf.Tensor) -> tf.Tensor:
        diagonal = tf.matmul(tf.square(self.inputs), squares, transpose_a=True)
        return tf.reshape(diagonal, self.variable.shape)

    def sum_squares(self) -> list[tf.Tensor]:
        return [self.from_cotangent_squares(self.cotangent_squares())]

    def column_moments(self) -> tf.Tensor:
        """What the squares read of the cotangents, adding up over columns of ``S``
        (:func:`~laplace_tf.curvature.column_sums.moment_fold`)."""
        return self.cotangent_squares()

    def from_column_moments(self, moments: tf.Tensor) -> list[tf.Tensor]:
        return [self.from_cotangent_squares(moments)]

    def weighted_gram(self, weights: list[tf.Tensor]) -> tf.Tensor:
        (weight,) = weights
        weight = tf.reshape(weight, [tf.shape(self.inputs)[-1], -1])
        scaled = tf.matmul(tf.square(self.inputs), weight)
        return tf.einsum("nkj,nlj,nj->nkl", self.cotangents, self.cotangents, scaled)


@dataclass(frozen=True)
class Explicit(_OneVariable):
    """Per-sample gradients given as a tensor ``[N, K, *shape]`` (small parameters)."""

    variable: Any
    grads: tf.Tensor

    def sum_squares(self) -> list[tf.Tensor]:
        return [tf.reduce_sum(tf.square(self.grads), axis=[0, 1])]

    def weighted_gram(self, weights: list[tf.Tensor]) -> tf.Tensor:
        (weight,) = weights
        shape = tf.shape(self.grads)
        flat = tf.reshape(self.grads, [shape[0], shape[1], -1])
        return tf.einsum("nkp,nlp,p->nkl", flat, flat, tf.reshape(weight, [-1]))


@dataclass(frozen=True)
class Patches(_OneVariable):
    """Convolution kernels: ``g[n, k] = reshape(sum_l p[n, l] (x) d[n, k, l], shape)``.

    ``p: [N, L, Q]`` are the unfolded input patches, ``d: [N, K, L, O]`` the cotangents at
    the ``L`` output locations. The squares are reduced for a block of columns and a
    chunk of examples at a time (:func:`column_block`, :func:`fold_gradients`): one
    product ``p^T [d_k ... d_k+b]`` per block, at most :data:`GRADIENT_ENTRIES` per-sample
    gradient entries at once.
    """

    variable: Any
    patches: tf.Tensor
    cotangents: tf.Tensor

    def _column(self, k) -> tf.Tensor:
        return tf.matmul(self.patches, tf.gather(self.cotangents, k, axis=1), transpose_a=True)

    def column_moments(self) -> tf.Tensor | None:
        """What the squares read of the cotangents where that adds up over the columns of
        ``S`` (:func:`~laplace_tf.curvature.column_sums.moment_fold`): ``sum_k d_k^2``
        ``[N, O]`` at one location, :func:`~laplace_tf.curvature.paired.cotangent_pairs`
        ``[N, P, O]`` at up to :data:`~laplace_tf.curvature.paired.PAIRED_LOCATIONS`;
        ``None`` on more locations (per-example gradients: nothing adds up)."""
        locations = self.patches.shape[1]
        if locations == 1:
            return tf.reduce_sum(tf.square(self.cotangents[:, :, 0]), axis=1)
        if locations is not None and locations <= paired.PAIRED_LOCATIONS:
            return paired.cotangent_pairs(self.cotangents)
        return None

    def from_column_moments(self, moments: tf.Tensor) -> list[tf.Tensor]:
        """The squares from :meth:`column_moments` summed over columns."""
        if self.patches.shape[1] == 1:  # one location: an outer product
            diagonal = tf.matmul(tf.square(self.patches[:, 0]), moments, transpose_a=True)
        else:
            diagonal = paired.pair_products(self.patches, moments, GRADIENT_ENTRIES)
        return [tf.reshape(diagonal, self.variable.shape)]

    def sum_squares(self) -> list[tf.Tensor]:
        if self.patches.shape[1] == 1:  # one location (e.g. 1 x 1 feature maps)
            return self.from_column_moments(self.column_moments())
        if (self.patches.shape[1] or paired.PAIRED_LOCATIONS + 1) <= paired.PAIRED_LOCATIONS:
            squares = paired.paired_squares(self.patches, self.cotangents, GRADIENT_ENTRIES)
            return [tf.reshape(squares, self.variable.shape)]

        shape = [self.patches.shape[-1], self.cotangents.shape[-1]]
        count, columns = size_of(self.cotangents, 0), size_of(self.cotangents, 1)
        block = column_block(self.cotangents.shape[1], shape[0] * shape[1])

        visible = stacked_columns(self.cotangents) if block == columns else None

        def add(total, k, start, stop):
            if visible is not None:  # the block is every column: read them unstacked
                return total + self._visible_squares(visible, start, stop, shape)
            if block > 1 and shape[0] <= NARROW_PATCHES:  # per example and column, as laid out
                patches = self.patches[start:stop, None]  # [n, 1, L, Q], broadcast over b
                grads = tf.matmul(
                    patches, self.cotangents[start:stop, k : k + block], transpose_a=True
                )
                return total + tf.reduce_sum(tf.square(grads), axis=[0, 1])
            # the block's columns side by side: [n, L, b O], one product for all of them
            deltas = tf.transpose(self.cotangents[start:stop, k : k + block], [0, 2, 1, 3])
            size = tf.shape(deltas)
            deltas = tf.reshape(deltas, [size[0], size[1], size[2] * size[3]])
            grads = tf.matmul(self.patches[start:stop], deltas, transpose_a=True)
            squares = tf.reduce_sum(tf.square(grads), axis=0)  # [Q, b O]
            return total + tf.reduce_sum(tf.reshape(squares, [shape[0], -1, shape[1]]), axis=1)

        total = fold_gradients(
            add, count, columns, shape[0] * shape[1], tf.zeros(shape, self.patches.dtype), block
        )
        return [tf.reshape(total, self.variable.shape)]

    def _visible_squares(self, columns, start, stop, shape) -> tf.Tensor:
        """The squares of chunk ``[start, stop)`` from the columns ``[N, L, O]`` themselves
        (:func:`stacked_columns`): one product per column for narrow patches, else one
        product over the columns side by side (their concatenation is the one copy)."""
        patches = self.patches[start:stop]
        if shape[0] <= NARROW_PATCHES or len(columns) == 1:
            total = 0.0
            for column in columns:
                grads = tf.matmul(patches, column[start:stop], transpose_a=True)
                total += tf.reduce_sum(tf.square(grads), axis=0)
            return total
        deltas = tf.concat([c[start:stop] for c in columns], axis=-1)  # [n, L, b O]
        squares = tf.reduce_sum(tf.square(tf.matmul(patches, deltas, transpose_a=True)), 0)
        return tf.reduce_sum(tf.reshape(squares, [shape[0], -1, shape[1]]), axis=1)

    def weighted_gram(self, weights: list[tf.Tensor]) -> tf.Tensor:
        """``<g_k, w g_l> = <d_k, p (w * g_l)>``: one column ``l`` at a time, so only
        ``[N, Q, O]`` gradients exist at once (never ``[N, K, Q, O]``)."""
        (weight,) = weights
        weight = tf.reshape(weight, [self.patches.shape[-1], self.cotangents.shape[-1]])
        weight = tf.cast(weight, self.patches.dtype)

        def column(k):
            back = tf.matmul(self.patches, self._column(k) * weight)  # [N, L, O]
            return tf.einsum("nklo,nlo->nk", self.cotangents, back)

        return columns_gram(column, self.cotangents)


@dataclass(frozen=True)
class Rows(_OneVariable):
    """Embedding table gradients: ``g[n, k] = sum_t onehot(ids[n, t]) (x) d[n, k, t]``.

    Rows hit several times by one example are summed before squaring.
    """

    variable: Any
    ids: tf.Tensor  # [N, T]
    cotangents: tf.Tensor  # [N, K, T, D]

    def _unique_rows(self):
        vocabulary = tf.cast(self.variable.shape[0], tf.int64)
        n = tf.shape(self.ids, out_type=tf.int64)[0]
        keys = tf.range(n)[:, None] * vocabulary + tf.cast(self.ids, tf.int64)
        unique, position = tf.unique(tf.reshape(keys, [-1]))
        deltas = tf.transpose(self.cotangents, [0, 2, 1, 3])  # [N, T, K, D]
        width = tf.shape(deltas)
        deltas = tf.reshape(deltas, [-1, width[2], width[3]])
        summed = tf.math.unsorted_segment_sum(deltas, position, tf.size(unique))  # [U, K, D]
        return unique // vocabulary, unique % vocabulary, summed

    def sum_squares(self) -> list[tf.Tensor]:
        _, rows, summed = self._unique_rows()
        squares = tf.reduce_sum(tf.square(summed), axis=1)
        return [tf.math.unsorted_segment_sum(squares, rows, self.variable.shape[0])]

    def weighted_gram(self, weights: list[tf.Tensor]) -> tf.Tensor:
        (weight,) = weights
        examples, rows, summed = self._unique_rows()
        per_row = tf.einsum("ukd,uld,ud->ukl", summed, summed, tf.gather(weight, rows))
        return tf.math.unsorted_segment_sum(per_row, examples, tf.shape(self.ids)[0])


@dataclass(frozen=True)
class Contraction(_OneVariable):
    """EinsumDense kernels: ``g[n, k] = einsum(x[n], d[n, k])`` over the axes the kernel
    does not own (``in_spec, out_spec -> kernel_spec``, batch letter first in both).

    Reduced one column at a time, so only ``[N, *kernel]`` gradients exist at once; the
    GLM Gram pulls ``w * g_l`` back through the layer's own contraction.
    """

    variable: Any
    specs: tuple[str, str, str]  # input, kernel and output subscripts
    inputs: tf.Tensor
    cotangents: tf.Tensor

    def _column(self, k) -> tf.Tensor:
        in_spec, kernel_spec, out_spec = self.specs
        equation = f"{in_spec},{out_spec}->{in_spec[0]}{kernel_spec}"
        return tf.einsum(equation, self.inputs, tf.gather(self.cotangents, k, axis=1))

    def sum_squares(self) -> list[tf.Tensor]:
        in_spec, kernel_spec, out_spec = self.specs
        equation = f"{in_spec},{out_spec}->{in_spec[0]}{kernel_spec}"

        def add(total, k, start, stop):
            grads = tf.einsum(equation, self.inputs[start:stop], self.cotangents[start:stop, k])
            return total + tf.reduce_sum(tf.square(grads), axis=0)

        count, columns = size_of(self.cotangents, 0), size_of(self.cotangents, 1)
        initial = tf.zeros(self.variable.shape, self.inputs.dtype)
        size = self.variable.shape.num_elements()
        return [fold_gradients(add, count, columns, size, initial)]

    def weighted_gram(self, weights: list[tf.Tensor]) -> tf.Tensor:
        in_spec, kernel_spec, out_spec = self.specs
        weight = tf.cast(weights[0], self.inputs.dtype)
        forward = f"{in_spec},{in_spec[0]}{kernel_spec}->{out_spec}"  # per-example kernels
        axes = list(range(2, self.cotangents.shape.rank))

        def column(k):
            back = tf.einsum(forward, self.inputs, self._column(k) * weight)
            return tf.reduce_sum(self.cotangents * back[:, None], axis=axes)

        return columns_gram(column, self.cotangents)

    def dense_grads(self) -> list[tf.Tensor]:
        in_spec, kernel_spec, out_spec = self.specs
        column = next(c for c in string.ascii_letters if c not in "".join(self.specs))
        batch = in_spec[0]
        equation = f"{in_spec},{batch}{column}{out_spec[1:]}->{batch}{column}{kernel_spec}"
        return [tf.einsum(equation, self.inputs, self.cotangents)]


@dataclass(frozen=True)
class PerExample:
    """Generic fallback: per-example vector-Jacobian products of ``fn``, vectorised.

    ``fn(inputs)`` maps a batch of inputs (any structure, leading batch axis) to one
    tensor whose cotangents are ``cotangents[:, k]``. Gradients are formed for chunks of
    examples (bounded by :data:`FALLBACK_CHUNK_ENTRIES`) and reduced at once. With
    ``vectorize=False`` the pairs of a chunk are differentiated one after another in a
    loop instead of by ``tf.vectorized_map`` (see :func:`vectorizable`).
    """

    variables: list
    fn: Callable[[Any], tf.Tensor]
    inputs: Any
    cotangents: tf.Tensor  # [N, K, *output_shape]
    vectorize: bool = True

    def _chunk(self) -> int:
        columns = self.cotangents.shape[1] or 1
        size = sum(v.shape.num_elements() for v in self.variables)
        return max(1, FALLBACK_CHUNK_ENTRIES // max(1, columns * size))

    def _grads(self, examples: tf.Tensor) -> list[tf.Tensor]:
        columns = tf.shape(self.cotangents)[1]

        def one_pair(pair):
            example = tf.gather(examples, pair // columns)
            inputs = tf.nest.map_structure(
                lambda t: tf.gather(t, example[None]) if _is_batched(t) else t, self.inputs
            )
            cotangent = tf.gather(tf.gather(self.cotangents, example), pair % columns)[None]
            sources = [unwrap_variable(v) for v in self.variables]
            with tf.GradientTape() as tape:
                tape.watch(sources)
                output = self.fn(inputs)
            return tape.gradient(
                output,
                sources,
                output_gradients=tf.cast(cotangent, output.dtype),
                unconnected_gradients=tf.UnconnectedGradients.ZERO,
            )

        pairs = tf.range(tf.size(examples) * columns)
        if self.vectorize:
            grads = tf.vectorized_map(one_pair, pairs)
        else:
            signature = [tf.TensorSpec(v.shape, v.dtype) for v in self.variables]
            grads = tf.map_fn(one_pair, pairs, fn_output_signature=signature)
        return [
            tf.reshape(g, tf.concat([[tf.size(examples), columns], v.shape], 0))
            for g, v in zip(grads, self.variables, strict=True)
        ]

    def _reduce(self, per_chunk, initial, invariant=None):
        """Fold ``per_chunk(examples, total)`` over chunks of examples in a while loop."""
        count = tf.shape(self.cotangents)[0]
        chunk = self._chunk()

        def body(start, total):
            examples = tf.range(start, tf.minimum(start + chunk, count))
            return start + chunk, per_chunk(examples, total)

        options = {} if invariant is None else {"shape_invariants": (tf.TensorShape([]), invariant)}
        _, total = tf.while_loop(lambda start, _: start < count, body, (0, initial), **options)
        return total

    def sum_squares(self) -> list[tf.Tensor]:
        def accumulate(examples, total):
            grads = self._grads(examples)
            return [
                t + tf.reduce_sum(tf.square(g), axis=[0, 1])
                for t, g in zip(total, grads, strict=True)
            ]

        return self._reduce(accumulate, [tf.zeros(v.shape, v.dtype) for v in self.variables])

    def weighted_gram(self, weights: list[tf.Tensor]) -> tf.Tensor:
        columns = tf.shape(self.cotangents)[1]

        def append(examples, total):
            gram = 0
            for g, w in zip(self._grads(examples), weights, strict=True):
                flat = tf.reshape(g, [tf.shape(g)[0], columns, -1])
                gram += tf.einsum("nkp,nlp,p->nkl", flat, flat, tf.reshape(w, [-1]))
            return tf.concat([total, gram], axis=0)

        initial = tf.zeros([0, columns, columns], self.variables[0].dtype)
        return self._reduce(append, initial, tf.TensorShape([None, None, None]))


def columns_gram(column: Callable[[tf.Tensor], tf.Tensor], cotangents: tf.Tensor) -> tf.Tensor:
    """``[N, K, K]`` from ``column(l) -> [N, K]`` (the Gram's column ``l``), one at a time."""
    per_column = tf.map_fn(
        column,
        tf.range(tf.shape(cotangents)[1]),
        fn_output_signature=tf.TensorSpec(None, cotangents.dtype),
    )
    return tf.transpose(per_column, [1, 2, 0])


def vectorizable(layer: keras.layers.Layer) -> bool:
    """Whether the fallback may ``tf.vectorized_map`` over ``layer``: not when it holds an
    ``EinsumDense`` with a bias, whose vectorised gradient aborts the whole process in
    float32 on some machines (a crash inside TensorFlow, seen with MultiHeadAttention)."""
    return not any(
        isinstance(sublayer, keras.layers.EinsumDense) and sublayer.bias is not None
        for sublayer in layer._flatten_layers(include_self=True, recursive=True)
    )


def _is_batched(value: Any) -> bool:
    return isinstance(value, tf.Tensor) and value.shape.rank is not None and value.shape.rank > 0


# ---------------------------------------------------------------------------------------
# Rules
# ---------------------------------------------------------------------------------------


def plain(layer: keras.layers.Layer) -> bool:
    return not getattr(layer, "lora_enabled", False) and not getattr(
        layer, "quantization_mode", None
    )


def activate(layer, z):
    return layer.activation(z) if layer.activation is not None else z


def stacked_columns(tensor: tf.Tensor) -> list[tf.Tensor] | None:
    """The columns ``tensor[:, k]`` of a traced ``[N, K, ...]`` tensor that a stack along
    axis 1 formed (the engine stacks its columns' cotangents so), as the tensors stacked:
    read so, without the stack's copy, and a step whose every reader does so never forms
    the stack (Grappler prunes it). ``None`` for other tensors, and eagerly."""
    try:
        op = tensor.op
    except AttributeError:  # an eager tensor
        return None
    if op.type != "Pack" or op.get_attr("axis") != 1:
        return None
    return list(op.inputs)


def map_columns(fn: Callable[[tf.Tensor], tf.Tensor], tensor: tf.Tensor) -> tf.Tensor:
    """``fn`` (from ``[N, ...]`` to ``[N, ...]``) applied to each column ``tensor[:, k]``
    and restacked, the columns staying visible to :func:`stacked_columns`; ``None`` where
    ``tensor``'s columns are not visible."""
    columns = stacked_columns(tensor)
    return None if columns is None else tf.stack([fn(c) for c in columns], axis=1)


def bias_grads(delta: tf.Tensor, broadcast_shape: list[int], shape, scale=None) -> tf.Tensor:
    """Per-sample gradient of a parameter added with broadcasting to ``delta[:, :, ...]``
    (``[N, K, ...]``), or multiplied with ``scale`` (``[N, ...]``) and then added (a
    normalisation's ``gamma``). Stacked columns are reduced one by one (static shapes: a
    few ops each, where slicing them out and back traced about five times as many)."""
    columns = stacked_columns(delta)
    if columns is not None:
        scaled = columns if scale is None else [scale * c for c in columns]
        return tf.stack([_summed(c, broadcast_shape, shape, 1) for c in scaled], axis=1)
    if scale is not None:
        delta = scale[:, None] * delta
    return _summed(delta, broadcast_shape, shape, 2)


def _summed(delta: tf.Tensor, broadcast_shape: list[int], shape, leading: int) -> tf.Tensor:
    """``delta`` summed over the axes after its ``leading`` ones that ``broadcast_shape``
    broadcasts, as ``[*leading axes, *shape]``."""
    rest = delta.shape[leading:]
    padded = [1] * (len(rest) - len(broadcast_shape)) + list(broadcast_shape)
    axes = [leading + i for i, size in enumerate(padded) if size == 1 and rest[i] != 1]
    summed = tf.reduce_sum(delta, axis=axes) if axes else delta
    if None not in delta.shape[1:leading]:
        return tf.reshape(summed, [-1, *delta.shape[1:leading], *shape])
    return tf.reshape(summed, tf.concat([tf.shape(delta)[:leading], shape], 0))
