"""Rules for the convolutions: Conv1D / 2D / 3D (grouped too), depthwise, separable and
transposed convolutions (channels last; ``channels_first`` layers take the fallback).

All of them are linear in their kernels, so a per-example kernel gradient is a sum over
locations of input patches times cotangents. Inputs are unfolded into patches
``[N, L, P, C]`` (``P`` kernel offsets, TF padding) by :func:`unfold`, and the factors
(:mod:`conv_factors`) reduce the curvature a block of columns of ``S`` and a chunk of
examples at a time, so the per-example kernel gradients formed at once stay bounded:

- a convolution kernel sees the patches (:class:`~laplace_tf.curvature.layers.Patches`),
  a grouped one each group's (:class:`GroupedPatches`);
- a depthwise kernel ``[*k, C, M]`` takes backward-filter depthwise convolutions with
  the examples folded into the channels (:class:`DepthwisePatches`), or where TF's CPU
  kernel does not apply (dilation, unequal strides) a grouped convolution with one input
  channel per group (:class:`GroupedPatches`);
- a separable convolution ``z = pointwise(depthwise(x)) + b`` is cut at ``z``: the
  pointwise kernel sees the depthwise output ``u`` as its (1 x 1) patches, the depthwise
  kernel the cotangents ``delta_u = delta_z W_pw^T`` pulled back through the pointwise
  kernel (exact: nothing non-linear lies between);
- a transposed convolution ``y = A_W^T x`` is the adjoint of a convolution ``A_W`` mapping
  ``y``-space to ``x``-space, so ``<delta, y> = <A_W delta, x>``: its kernel gradient
  is ``sum_l unfold(delta)[l] (x) x[l]``, with the *cotangent* unfolded
  (:class:`TransposedPatches`).
"""

from __future__ import annotations

import keras
import tensorflow as tf
from keras import ops

from laplace_tf.curvature.conv_factors import (
    DepthwisePatches,
    FoldedPatches,
    GroupedPatches,
    TransposedPatches,
    Window,
    _grouped_cotangents,
    _static_product,
    _unfolded_depthwise,
    patches_read,
    unfold,
)
from laplace_tf.curvature.layers import (
    Explicit,
    Patches,
    activate,
    bias_grads,
    map_columns,
    plain,
)
from laplace_tf.curvature.registry import Rule, register_builtin

# Rules -----------------------------------------------------------------------------------


def _channels_last(layer) -> bool:
    return plain(layer) and layer.data_format == "channels_last"


def _locations(tensor: tf.Tensor, leading: int) -> tf.Tensor:
    """``[*leading axes, *spatial, C] -> [*leading, L, C]`` (stacked columns stay visible)."""
    if leading == 2 and (per_column := map_columns(lambda c: _locations(c, 1), tensor)) is not None:
        return per_column
    locations, known = _static_product(tensor.shape[leading:-1]), tensor.shape[1:leading]
    if locations > 0 and None not in known and tensor.shape[-1] is not None:
        return tf.reshape(tensor, [-1, *known, locations, tensor.shape[-1]])  # one constant
    shape = tf.shape(tensor)
    return tf.reshape(tensor, tf.concat([shape[:leading], [locations, tensor.shape[-1]]], 0))


def _bias_factor(layer, delta) -> list:
    if layer.bias is None:
        return []
    return [Explicit(layer.bias, bias_grads(delta, layer.bias.shape, layer.bias.shape))]


def _grouped(patches: tf.Tensor, groups: int) -> tf.Tensor:
    """``[N, L, P, C] -> [N, L, G, P * C / G]``: each group's patches, (offset, channel)."""
    shape, offsets, channels = tf.shape(patches), patches.shape[2], patches.shape[3]
    split = tf.reshape(patches, [shape[0], shape[1], offsets, groups, channels // groups])
    split = tf.transpose(split, [0, 1, 3, 2, 4])
    return tf.reshape(split, [shape[0], shape[1], groups, offsets * channels // groups])


def _one_group_per_channel(layer, inputs) -> bool:
    """A 1D / 2D grouped convolution with one group per input channel: a depthwise one
    (ConvNeXt's ``Conv2D(groups=C)``), computed and reduced as such. Keras runs grouped
    convolutions on the CPU through XLA, and each of their backward passes too: ~20 ms a
    column on ConvNeXtTiny's 8 x 8 maps at batch 32, against ~2 ms as a depthwise one."""
    return 1 < layer.groups == inputs.shape[-1] and len(layer.kernel_size) <= 2


def _conv_forward(layer, inputs):
    inputs = tf.cast(inputs, layer.compute_dtype)
    if layer.padding == "causal":
        left = layer.dilation_rate[0] * (layer.kernel_size[0] - 1)
        inputs = tf.pad(inputs, [[0, 0], [left, 0], [0, 0]])
    options = {
        "strides": tuple(layer.strides),
        "padding": "valid" if layer.padding == "causal" else layer.padding,
        "dilation_rate": layer.dilation_rate,
        "data_format": "channels_last",
    }
    if _one_group_per_channel(layer, inputs):
        kernel = tf.reshape(layer.kernel, [*layer.kernel_size, layer.groups, -1])
        z = ops.depthwise_conv(inputs, tf.cast(kernel, layer.compute_dtype), **options)
    else:
        z = ops.conv(inputs, layer.kernel, **options)
    if layer.bias is not None:
        z = ops.add(z, layer.bias)
    return z, activate(layer, z)


def _conv_factors(layer, inputs, delta):
    inputs, window = tf.cast(inputs, delta.dtype), Window.of(layer)
    if _one_group_per_channel(layer, inputs) and layer.padding != "causal":
        kernel = _depthwise_kernel_factor(layer.kernel, inputs, delta, window)
        return [kernel, *_bias_factor(layer, delta)]
    folded = not patches_read(inputs, window) and FoldedPatches.applies(layer, delta)
    patches = unfold(inputs, window, read=not folded)
    if layer.groups == 1:
        width, locations = patches.shape[2] * patches.shape[3], patches.shape[1]
        lead = [-1, locations] if locations is not None else tf.unstack(tf.shape(patches)[:2])
        flat = tf.reshape(patches, [*lead, width])
        cotangents = _locations(delta, 2)
        if folded:
            spatial = tuple(delta.shape[2:4])
            kernel = FoldedPatches(layer.kernel, flat, cotangents, inputs, window, spatial)
        else:
            kernel = Patches(layer.kernel, flat, cotangents)
    else:
        grouped = _grouped(patches, layer.groups)
        kernel = GroupedPatches(layer.kernel, grouped, _grouped_cotangents(delta, layer.groups))
    return [kernel, *_bias_factor(layer, delta)]


def _depthwise_forward(layer, inputs):
    z = ops.depthwise_conv(
        tf.cast(inputs, layer.compute_dtype),
        layer.kernel,
        strides=layer.strides,
        padding=layer.padding,
        dilation_rate=layer.dilation_rate,
        data_format="channels_last",
    )
    if layer.bias is not None:
        z = ops.add(z, layer.bias)
    return z, activate(layer, z)


def _depthwise_kernel_factor(kernel, inputs, delta, window: Window):
    """:class:`DepthwisePatches` where TF's kernel applies, else the patch products."""
    if DepthwisePatches.applies(window) and len(window.kernel_size) <= 2:
        return DepthwisePatches(kernel, inputs, delta, window)
    return _unfolded_depthwise(kernel, inputs, delta, window)


def _depthwise_factors(layer, inputs, delta):
    inputs = tf.cast(inputs, delta.dtype)
    kernel = _depthwise_kernel_factor(layer.kernel, inputs, delta, Window.of(layer))
    return [kernel, *_bias_factor(layer, delta)]


def _separable_forward(layer, inputs):
    z = ops.separable_conv(
        tf.cast(inputs, layer.compute_dtype),
        layer.depthwise_kernel,
        layer.pointwise_kernel,
        strides=layer.strides,
        padding=layer.padding,
        dilation_rate=layer.dilation_rate,
        data_format="channels_last",
    )
    if layer.bias is not None:
        z = ops.add(z, layer.bias)
    return z, activate(layer, z)


def _separable_factors(layer, inputs, delta):
    inputs = tf.cast(inputs, delta.dtype)
    depthwise = tf.cast(layer.depthwise_kernel, delta.dtype)
    pointwise = tf.reshape(tf.cast(layer.pointwise_kernel, delta.dtype), [-1, layer.filters])
    hidden = ops.depthwise_conv(
        inputs,
        depthwise,
        strides=layer.strides,
        padding=layer.padding,
        dilation_rate=layer.dilation_rate,
        data_format="channels_last",
    )
    hidden_delta = tf.einsum("nk...f,qf->nk...q", delta, pointwise)
    return [
        _depthwise_kernel_factor(layer.depthwise_kernel, inputs, hidden_delta, Window.of(layer)),
        Patches(layer.pointwise_kernel, _locations(hidden, 1), _locations(delta, 2)),
        *_bias_factor(layer, delta),
    ]


def _transpose_forward(layer, inputs):
    z = ops.conv_transpose(
        tf.cast(inputs, layer.compute_dtype),
        layer.kernel,
        strides=list(layer.strides),
        padding=layer.padding,
        output_padding=layer.output_padding,
        dilation_rate=layer.dilation_rate,
        data_format="channels_last",
    )
    if layer.bias is not None:
        z = ops.add(z, layer.bias)
    return z, activate(layer, z)


def _transpose_factors(layer, inputs, delta):
    inputs = _locations(tf.cast(inputs, delta.dtype), 1)
    kernel = TransposedPatches(layer.kernel, inputs, delta, Window.of(layer))
    return [kernel, *_bias_factor(layer, delta)]


_L = keras.layers
register_builtin(
    [_L.Conv1D, _L.Conv2D, _L.Conv3D],
    Rule(_conv_forward, _conv_factors, _channels_last, "Conv patches"),
    piecewise_linear=True,
)
register_builtin(
    [_L.DepthwiseConv1D, _L.DepthwiseConv2D],
    Rule(_depthwise_forward, _depthwise_factors, _channels_last, "Depthwise patches"),
    piecewise_linear=True,
)
register_builtin(
    [_L.SeparableConv1D, _L.SeparableConv2D],
    Rule(_separable_forward, _separable_factors, _channels_last, "Separable patches"),
    piecewise_linear=True,
)
register_builtin(
    [_L.Conv1DTranspose, _L.Conv2DTranspose, _L.Conv3DTranspose],
    Rule(_transpose_forward, _transpose_factors, _channels_last, "Transposed patches"),
    piecewise_linear=True,
)
