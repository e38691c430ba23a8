"""Rules for Dense (inputs of any rank), EinsumDense and Embedding: the factors of
:mod:`layers` from the layer input and the cut-point cotangents."""

from __future__ import annotations

import string

import keras
import tensorflow as tf
from keras import ops

from laplace_tf.curvature.layers import (
    Contraction,
    Explicit,
    Outer,
    Patches,
    Rows,
    activate,
    bias_grads,
    plain,
)
from laplace_tf.curvature.registry import Rule, register_builtin


def _flatten_middle(inputs: tf.Tensor, delta: tf.Tensor):
    """``[N, ..., I]`` and ``[N, K, ..., J]`` -> ``[N, T, I]`` and ``[N, K, T, J]``."""
    n = tf.shape(inputs)[0]
    columns = tf.shape(delta)[1]
    inputs = tf.reshape(inputs, [n, -1, inputs.shape[-1]])
    delta = tf.reshape(delta, [n, columns, -1, delta.shape[-1]])
    return inputs, delta


# Dense -----------------------------------------------------------------------------------


def _dense_forward(layer, inputs):
    inputs = tf.cast(inputs, layer.compute_dtype)
    z = ops.matmul(inputs, layer.kernel)
    if layer.bias is not None:
        z = ops.add(z, layer.bias)
    return z, activate(layer, z)


def _dense_factors(layer, inputs, delta):
    inputs = tf.cast(inputs, delta.dtype)
    factors = []
    if inputs.shape.rank == 2:
        factors.append(Outer(layer.kernel, inputs, delta))
    else:
        factors.append(Patches(layer.kernel, *_flatten_middle(inputs, delta)))
    if layer.bias is not None:
        factors.append(Explicit(layer.bias, bias_grads(delta, layer.bias.shape, layer.bias.shape)))
    return factors


# EinsumDense -------------------------------------------------------------------------------


def _einsum_specs(layer, rank: int):
    """Input, kernel and output subscripts with any ellipsis spelled out, or None."""
    inputs, rest = layer.equation.split(",")
    kernel, output = rest.split("->")
    if "..." in kernel:
        return None
    if "..." in inputs:
        spare = [c for c in string.ascii_letters if c not in layer.equation]
        explicit = "".join(spare[: rank - (len(inputs) - 3)])
        inputs, output = inputs.replace("...", explicit), output.replace("...", explicit)
    if len(inputs) != rank or not output or output[0] != inputs[0] or inputs[0] in kernel:
        return None
    return inputs, kernel, output


def _einsum_applies(layer) -> bool:
    """The input rank is read from the equation, or from the layer's input where the
    equation has an ellipsis (a sub-layer called inside another layer has no input)."""
    if not plain(layer):
        return False
    inputs = layer.equation.split(",")[0]
    if "..." not in inputs:
        rank = len(inputs)
    elif layer._inbound_nodes:
        rank = len(layer.input.shape)
    else:
        return False
    return _einsum_specs(layer, rank) is not None


def _einsum_forward(layer, inputs):
    inputs = tf.cast(inputs, layer.compute_dtype)
    z = ops.einsum(layer.equation, inputs, layer.kernel)
    if layer.bias is not None:
        z = ops.add(z, layer.bias)
    return z, activate(layer, z)


def _einsum_factors(layer, inputs, delta):
    specs = _einsum_specs(layer, inputs.shape.rank)
    factors = [Contraction(layer.kernel, specs, tf.cast(inputs, delta.dtype), delta)]
    if layer.bias is not None:
        factors.append(Explicit(layer.bias, bias_grads(delta, layer.bias.shape, layer.bias.shape)))
    return factors


# Embedding ---------------------------------------------------------------------------------


def _embedding_forward(layer, inputs):
    ids = tf.cast(inputs, "int32") if inputs.dtype not in (tf.int32, tf.int64) else inputs
    z = tf.cast(ops.take(layer.embeddings, ids, axis=0), layer.compute_dtype)
    return z, z


def _embedding_factors(layer, inputs, delta):
    n = tf.shape(inputs)[0]
    ids = tf.reshape(inputs, [n, -1])
    cotangents = tf.reshape(delta, [n, tf.shape(delta)[1], -1, layer.output_dim])
    return [Rows(layer.embeddings, ids, cotangents)]


_L = keras.layers
register_builtin(
    [_L.Dense], Rule(_dense_forward, _dense_factors, plain, "Dense"), piecewise_linear=True
)
register_builtin(
    [_L.EinsumDense],
    Rule(_einsum_forward, _einsum_factors, _einsum_applies, "EinsumDense"),
    piecewise_linear=True,
)
register_builtin(
    [_L.Embedding],
    Rule(
        _embedding_forward,
        _embedding_factors,
        lambda layer: plain(layer) and not getattr(layer, "sparse", False),
        "Embedding rows",
    ),
    piecewise_linear=True,
)
