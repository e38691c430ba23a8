"""Rules for the normalisation layers: Layer (incl. RMS), Batch (inference) and Group,
and for keras.applications' ``LayerScale`` (ConvNeXt's ``y = gamma * x``).

Each is cut at its output ``y = gamma * n(x) + beta``, linear in ``gamma`` and ``beta``;
their per-example gradients ``sum n(x) * delta`` and ``sum delta`` over the positions
that share a parameter are small (one entry per channel) and are formed explicitly.
"""

from __future__ import annotations

import keras
import tensorflow as tf
from keras import ops

from laplace_tf.curvature.layers import Explicit, bias_grads, plain
from laplace_tf.curvature.registry import Rule, register_builtin


def _call_layer(layer, inputs):
    outputs = layer(inputs, training=False) if layer._call_has_training_arg else layer(inputs)
    return outputs, outputs


def _affine_factors(normalised, delta, gamma, beta, broadcast_shape):
    factors = []
    if gamma is not None:
        scale = tf.cast(normalised, delta.dtype)
        factors.append(Explicit(gamma, bias_grads(delta, broadcast_shape, gamma.shape, scale)))
    if beta is not None:
        factors.append(Explicit(beta, bias_grads(delta, broadcast_shape, beta.shape)))
    return factors


def _layer_norm_factors(layer, inputs, delta):
    inputs = tf.cast(inputs, delta.dtype)
    rank = inputs.shape.rank
    axes = [a % rank for a in ([layer.axis] if isinstance(layer.axis, int) else layer.axis)]
    normalised = ops.layer_normalization(
        inputs, None, None, axes, layer.epsilon, rms_scaling=layer.rms_scaling
    )
    broadcast = [inputs.shape[d] if d in axes else 1 for d in range(1, rank)]
    beta = None if layer.rms_scaling else layer.beta
    return _affine_factors(normalised, delta, layer.gamma, beta, broadcast)


def _batch_norm_factors(layer, inputs, delta):
    inputs = tf.cast(inputs, delta.dtype)
    rank = inputs.shape.rank
    axis = layer.axis % rank
    normalised = ops.batch_normalization(
        inputs,
        tf.cast(layer.moving_mean, inputs.dtype),
        tf.cast(layer.moving_variance, inputs.dtype),
        axis=axis,
        epsilon=layer.epsilon,
    )
    broadcast = [inputs.shape[d] if d == axis else 1 for d in range(1, rank)]
    return _affine_factors(normalised, delta, layer.gamma, layer.beta, broadcast)


def _group_norm_applies(layer) -> bool:
    """Channels last only (Keras' default ``axis=-1``)."""
    spec = layer.input_spec
    return plain(layer) and spec is not None and layer.axis in (-1, spec.ndim - 1)


def _group_norm_factors(layer, inputs, delta):
    inputs = tf.cast(inputs, delta.dtype)
    rank = inputs.shape.rank
    channels = inputs.shape[-1]
    groups = tf.concat([tf.shape(inputs)[:-1], [layer.groups, channels // layer.groups]], 0)
    grouped = tf.reshape(inputs, groups)
    mean, variance = ops.moments(grouped, axes=[*range(1, rank - 1), rank], keepdims=True)
    normalised = (grouped - mean) * ops.rsqrt(variance + layer.epsilon)
    normalised = tf.reshape(normalised, tf.shape(inputs))
    broadcast = [1] * (rank - 2) + [channels]
    return _affine_factors(normalised, delta, layer.gamma, layer.beta, broadcast)


def _layer_scale_factors(layer, inputs, delta):
    rank = inputs.shape.rank
    broadcast = [1] * (rank - 2) + list(layer.gamma.shape)  # gamma scales the last axis
    return _affine_factors(inputs, delta, layer.gamma, None, broadcast)


def _layer_scale_type() -> type | None:
    """keras.applications' ``LayerScale`` (ConvNeXt), private to Keras: None if it moved."""
    try:
        from keras.src.applications.convnext import LayerScale
    except ImportError:
        return None
    return LayerScale


_L = keras.layers
register_builtin(
    [_L.LayerNormalization], Rule(_call_layer, _layer_norm_factors, plain, "LayerNormalization")
)
register_builtin(
    [_L.BatchNormalization],
    Rule(_call_layer, _batch_norm_factors, lambda layer: not layer.renorm, "BatchNormalization"),
    piecewise_linear=True,
)
register_builtin(
    [_L.GroupNormalization],
    Rule(_call_layer, _group_norm_factors, _group_norm_applies, "GroupNormalization"),
)
_LAYER_SCALE = _layer_scale_type()
if _LAYER_SCALE is not None:  # linear in its input and in gamma
    register_builtin(
        [_LAYER_SCALE],
        Rule(_call_layer, _layer_scale_factors, plain, "LayerScale"),
        piecewise_linear=True,
    )
