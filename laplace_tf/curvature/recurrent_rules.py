"""Rules for the recurrent layers: SimpleRNN, GRU, LSTM and Bidirectional wrapping them
(inference, a known number of steps).

Each step's gate pre-activations are ``z_t = x_t W + h_{t-1} U + b`` (GRU: the candidate
gate reads ``(r_t * h_{t-1}) U_h`` when ``reset_after=False``, and ``r_t * (h_{t-1} U_h +
b_rec)`` when ``reset_after=True``). The rule re-runs the recurrence with the layer's own
weights and activations and cuts it at the input projection ``c = x W + b`` for all
steps at once, ``[N, T, G]``: ``c_t`` enters only ``z_t``, so its cotangent is
``delta_t``, the total derivative through every later step. Per-example gradients are
then sums over time steps:

- kernel: ``sum_t x_t (x) delta_t``, a :class:`~laplace_tf.curvature.layers.Patches`
  factor with the steps as positions;
- recurrent kernel: ``sum_t h_{t-1} (x) delta_t`` (``h_0 = 0``); GRU without
  ``reset_after`` reads ``[h, h, r * h]`` per gate block
  (:class:`~laplace_tf.curvature.conv_rules.GroupedPatches` with three groups);
- bias: ``sum_t delta_t``.

A GRU with ``reset_after=True`` has a recurrent pre-activation that is not ``delta``'s:
its cut is ``[c, e]`` with ``e = 0`` added to ``h_{t-1} U + b_rec``, whose cotangent is
that of the recurrent part. Keras masking is followed (a masked step keeps the previous
state; its output is the previous one, or zeros with ``zero_output_for_mask``), as is
``go_backwards`` (the steps run, and are returned, in reverse). Stateful layers, layers
returning their state, custom cells and sequences of unknown length take the fallback.
The forward saves each step's inputs and recurrent inputs for the factors (the
recurrence used to be recomputed when they were formed, tracing and running it again).

Bidirectional layers are cut at both directions' cuts, concatenated; each direction's
weights get the factors above from its part of the cotangents.
"""

from __future__ import annotations

import keras
import tensorflow as tf
from keras import ops
from keras.src.backend import get_keras_mask

from laplace_tf.curvature.conv_rules import GroupedPatches
from laplace_tf.curvature.layers import Explicit, Patches, plain
from laplace_tf.curvature.registry import Rule, register_builtin

_L = keras.layers
_CELLS = {_L.SimpleRNN: _L.SimpleRNNCell, _L.GRU: _L.GRUCell, _L.LSTM: _L.LSTMCell}


def _supported(layer) -> bool:
    """The layer's own cell, no state in or out and every weight trainable (so that the
    cut is on the tape)."""
    cell = layer.cell
    if type(cell) is not _CELLS.get(type(layer)) or layer.stateful or layer.return_state:
        return False
    return plain(cell) and all(v.trainable for v in cell.weights)


def _known_steps(layer) -> bool:
    """Whether ``layer`` was called once on sequences ``[N, T, I]`` with ``T`` known (a
    layer called with its mask has ``[sequences, mask]`` as its input)."""
    try:
        inputs = layer.input
    except (AttributeError, ValueError):
        return False
    shape = getattr(inputs[0] if isinstance(inputs, list | tuple) else inputs, "shape", None)
    return shape is not None and len(shape) == 3 and shape[1] is not None


def _applies(layer) -> bool:
    return _supported(layer) and _known_steps(layer)


def _is_split_gru(cell) -> bool:
    """A GRU cell whose recurrent pre-activation has its own cotangent."""
    return isinstance(cell, _L.GRUCell) and cell.reset_after


def _biases(cell):
    """``(input bias, recurrent bias)``; either may be ``None``."""
    if not cell.use_bias:
        return None, None
    if _is_split_gru(cell):
        return cell.bias[0], cell.bias[1]
    return cell.bias, None


def _sequences(layer, inputs):
    """Inputs ``[N, T, I]`` and mask ``[N, T]`` (or ``None``) in processing order."""
    x = tf.cast(inputs, layer.compute_dtype)
    mask = get_keras_mask(inputs)
    if mask is not None:
        mask = tf.cast(mask, tf.bool)
    if layer.go_backwards:
        x = tf.reverse(x, [1])
        mask = None if mask is None else tf.reverse(mask, [1])
    return x, mask


def _cut(layer, x):
    """``c = x W + b``, with zeros for the recurrent part appended for a split GRU."""
    cell = layer.cell
    cut = ops.matmul(x, cell.kernel)
    input_bias, _ = _biases(cell)
    if input_bias is not None:
        cut = cut + input_bias
    if _is_split_gru(cell):
        cut = tf.concat([cut, tf.zeros_like(cut)], axis=-1)
    return cut


def _simple_step(cell, kernel, c_t, h, carry):
    z = c_t + ops.matmul(h, kernel)
    return (z if cell.activation is None else cell.activation(z)), carry, h


def _lstm_step(cell, kernel, c_t, h, carry):
    z = c_t + ops.matmul(h, kernel)
    z_i, z_f, z_c, z_o = tf.split(z, 4, axis=-1)
    gate = cell.recurrent_activation
    carry = gate(z_f) * carry + gate(z_i) * cell.activation(z_c)
    return gate(z_o) * cell.activation(carry), carry, h


def _gru_step(cell, kernel, c_t, h, carry):
    units, gate = cell.units, cell.recurrent_activation
    if cell.reset_after:
        x_part, extra = c_t[:, : 3 * units], c_t[:, 3 * units :]
        inner = ops.matmul(h, kernel) + extra
        _, recurrent_bias = _biases(cell)
        if recurrent_bias is not None:
            inner = inner + recurrent_bias
        x_z, x_r, x_h = tf.split(x_part, 3, axis=-1)
        r_z, r_r, r_h = tf.split(inner, 3, axis=-1)
        z, r = gate(x_z + r_z), gate(x_r + r_r)
        candidate = cell.activation(x_h + r * r_h)
        previous = h
    else:
        x_z, x_r, x_h = tf.split(c_t, 3, axis=-1)
        inner = ops.matmul(h, kernel[:, : 2 * units])
        z, r = gate(x_z + inner[:, :units]), gate(x_r + inner[:, units:])
        candidate = cell.activation(x_h + ops.matmul(r * h, kernel[:, 2 * units :]))
        previous = tf.stack([h, h, r * h], axis=1)  # one recurrent input per gate block
    return z * h + (1 - z) * candidate, carry, previous


_STEPS = {_L.SimpleRNNCell: _simple_step, _L.LSTMCell: _lstm_step, _L.GRUCell: _gru_step}


def _recurrence(layer, cut, mask):
    """Outputs ``[N, T, H]`` in processing order and the recurrent inputs of each step
    (``[N, T, H]``, or ``[N, T, 3, H]`` for a GRU without ``reset_after``)."""
    cell = layer.cell
    step = _STEPS[type(cell)]
    h = h0 = tf.zeros([tf.shape(cut)[0], cell.units], cut.dtype)
    carry, output = h, h
    outputs, previous = [], []
    # read once, and the mask unstacked once: a read or slice per step traced each time
    kernel = tf.convert_to_tensor(cell.recurrent_kernel)
    keeps = None if mask is None else tf.unstack(tf.expand_dims(mask, -1), axis=1)
    # unstacked, not sliced: the gradient of each slice ``cut[:, t]`` is a cut-sized
    # tensor of zeros around it (LSTM of 16 steps: backward to the cut 0.6 -> 4 MiB)
    for t, c_t in enumerate(tf.unstack(cut, axis=1)):
        new_h, new_carry, recurrent_inputs = step(cell, kernel, c_t, h, carry)
        previous.append(recurrent_inputs)
        if keeps is None:
            h, carry, output = new_h, new_carry, new_h
        else:
            keep = keeps[t]
            masked = h0 if layer.zero_output_for_mask else output
            output = tf.where(keep, new_h, masked)
            h, carry = tf.where(keep, new_h, h), tf.where(keep, new_carry, carry)
        outputs.append(output)
    return tf.stack(outputs, axis=1), tf.stack(previous, axis=1)


def _outputs(layer, x, mask, cut):
    """The layer's outputs from its cut (the last step's unless it returns sequences) and
    what its factors read: the inputs and recurrent inputs of every step."""
    outputs, previous = _recurrence(layer, cut, mask)
    return (outputs if layer.return_sequences else outputs[:, -1]), (x, previous)


def _forward(layer, inputs):
    x, mask = _sequences(layer, inputs)
    cut = _cut(layer, x)
    return (cut, *_outputs(layer, x, mask, cut))


def _factors(layer, saved, delta):
    cell = layer.cell
    x, previous = (tf.cast(t, delta.dtype) for t in saved)
    if _is_split_gru(cell):
        delta, delta_recurrent = tf.split(delta, 2, axis=-1)
    else:
        delta_recurrent = delta
    factors = [Patches(cell.kernel, x, delta)]
    if previous.shape.rank == 4:
        shape = tf.concat([tf.shape(delta)[:3], [3, cell.units]], 0)
        factors.append(
            GroupedPatches(cell.recurrent_kernel, previous, tf.reshape(delta_recurrent, shape))
        )
    else:
        factors.append(Patches(cell.recurrent_kernel, previous, delta_recurrent))
    if cell.use_bias:
        grads = tf.reduce_sum(delta, axis=2)
        if _is_split_gru(cell):
            grads = tf.stack([grads, tf.reduce_sum(delta_recurrent, axis=2)], axis=2)
        factors.append(Explicit(cell.bias, grads))
    return factors


# Bidirectional ------------------------------------------------------------------------------

_MERGES = {
    "concat": lambda y, y_rev: tf.concat([y, y_rev], axis=-1),
    "sum": lambda y, y_rev: y + y_rev,
    "ave": lambda y, y_rev: (y + y_rev) / 2,
    "mul": lambda y, y_rev: y * y_rev,
}


def _directions(layer):
    return layer.forward_layer, layer.backward_layer


def _cut_width(layer) -> int:
    return layer.cell.kernel.shape[-1] * (2 if _is_split_gru(layer.cell) else 1)


def _bidirectional_applies(layer) -> bool:
    """Both directions supported, merged into one tensor, a known number of steps."""
    return (
        layer.merge_mode in _MERGES
        and not layer.return_state
        and all(_supported(direction) for direction in _directions(layer))
        and _known_steps(layer)
    )


def _bidirectional_forward(layer, inputs):
    """Cut at both directions' input projections, concatenated ``[N, T, G_f + G_b]``."""
    directions = _directions(layer)
    sequences = [_sequences(d, inputs) for d in directions]
    cut = tf.concat([_cut(d, x) for d, (x, _) in zip(directions, sequences, strict=True)], -1)
    widths = [_cut_width(d) for d in directions]
    parts = tf.split(cut, widths, axis=-1)
    (y, forward_saved), (y_rev, backward_saved) = (
        _outputs(d, x, mask, part)
        for d, (x, mask), part in zip(directions, sequences, parts, strict=True)
    )
    y, y_rev = tf.cast(y, layer.compute_dtype), tf.cast(y_rev, layer.compute_dtype)
    if layer.return_sequences:
        y_rev = tf.reverse(y_rev, [1])
    return cut, _MERGES[layer.merge_mode](y, y_rev), (forward_saved, backward_saved)


def _bidirectional_factors(layer, saved, delta):
    directions = _directions(layer)
    parts = tf.split(delta, [_cut_width(d) for d in directions], axis=-1)
    return [
        factor
        for direction, part, own in zip(directions, parts, saved, strict=True)
        for factor in _factors(direction, own, part)
    ]


register_builtin(
    [_L.SimpleRNN, _L.GRU, _L.LSTM],
    Rule(_forward, _factors, _applies, "Recurrent patches", reads_mask=True),
)
register_builtin(
    [_L.Bidirectional],
    Rule(
        _bidirectional_forward,
        _bidirectional_factors,
        _bidirectional_applies,
        "Bidirectional recurrent patches",
        reads_mask=True,
    ),
)
