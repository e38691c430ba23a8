"""Rules for the normalisation layers: Layer (incl. RMS), Batch (inference) and Group,
and for keras.applications' ``LayerScale`` (ConvNeXt's ``y = gamma * x``).

Each is cut at its output ``y = gamma * n(x) + beta``, linear in ``gamma`` and ``beta``;
their per-example gradients ``sum n(x) * delta`` and ``sum delta`` over the positions
that share a parameter are small (one entry per channel) and are formed explicitly.
"""

from __future__ import annotations

from dataclasses import dataclass

import keras
import numpy as np
import tensorflow as tf
from keras import ops

from laplace_tf.curvature import paired
from laplace_tf.curvature.layers import Explicit, bias_grads, plain
from laplace_tf.curvature.registry import Rule, register_builtin


def _call_layer(layer, inputs):
    outputs = layer(inputs, training=False) if layer._call_has_training_arg else layer(inputs)
    return outputs, outputs


@dataclass(frozen=True)
class ChannelExplicit(Explicit):
    """Per-channel ``gamma`` (``scale``: the normalised input ``[N, L, C]``) or ``beta``
    (``scale`` ``None``) shared by ``L`` positions, with the cotangents ``deltas [N, K, L, C]``
    kept beside the explicit gradients: on up to
    :data:`~laplace_tf.curvature.paired.PAIRED_LOCATIONS` positions its squares read the
    cotangents only through :func:`~laplace_tf.curvature.paired.cotangent_pairs`, which
    add up over the columns of ``S`` (:func:`~laplace_tf.curvature.column_sums.moment_fold`:
    the ~1,000 small reductions a column of DenseNet121's 120 BatchNormalizations cost in
    its columns loop, once)."""

    deltas: tf.Tensor | None = None
    scale: tf.Tensor | None = None

    def column_moments(self) -> tf.Tensor | None:
        locations = self.deltas.shape[2]
        if locations is None or locations > paired.PAIRED_LOCATIONS:
            return None
        return paired.cotangent_pairs(self.deltas)  # [N, P, C]

    def from_column_moments(self, moments: tf.Tensor) -> list[tf.Tensor]:
        if self.scale is not None:
            first, second = np.triu_indices(self.scale.shape[1])
            scale = tf.gather(self.scale, first, axis=1) * tf.gather(self.scale, second, axis=1)
            moments = moments * scale
        return [tf.reshape(tf.reduce_sum(moments, axis=[0, 1]), self.variable.shape)]


def _affine_factors(normalised, delta, gamma, beta, broadcast_shape):
    normalised = tf.cast(normalised, delta.dtype)
    channels = delta.shape[-1]
    per_channel = (
        delta.shape.rank >= 3
        and channels is not None
        and all(size == 1 for size in broadcast_shape[:-1])
        and broadcast_shape[-1] == channels
    )
    if per_channel:  # [N, K, L, C] and [N, L, C], for the column moments
        shape = tf.shape(delta)
        deltas = tf.reshape(delta, [shape[0], shape[1], -1, channels])
        scale = tf.reshape(normalised, [shape[0], -1, channels])
        positions = delta.shape[2:-1].num_elements()
        deltas.set_shape([None, None, positions, channels])
        scale.set_shape([None, positions, channels])
    factors = []
    for variable, product, scaled in ((gamma, True, True), (beta, False, False)):
        if variable is None:
            continue
        term = normalised[:, None] * delta if product else delta
        grads = bias_grads(term, broadcast_shape, variable.shape)
        if per_channel and tuple(variable.shape) == (channels,):
            factors.append(ChannelExplicit(variable, grads, deltas, scale if scaled else None))
        else:
            factors.append(Explicit(variable, grads))
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
