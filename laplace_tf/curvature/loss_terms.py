"""The loss terms of a batch: model outputs folded into rows, their targets and weights,
and the columns of ``S`` the engine back-propagates.

A model's output ``[N, C]`` has one loss term per example; an output with positions
(``[N, T, C]`` per token, ``[N, H, W, C]`` per pixel) has one per example and position,
and the loss sums over them. Every term is a *row*: the outputs are folded to
``[N * T, C]`` and the targets alike (labels ``[N, T]``, one-hot or regression targets
``[N, T, C]``), so a likelihood only ever sees rows. Each row has a weight: the
example's ``sample_weight`` (``[N]``; or ``[N, T]`` per position, as Keras takes it)
times the Keras mask of the output (``mask_zero``, ``Masking``), 0 for a padded position.

With row weights ``w`` the summed NLL is ``sum_r w_r l_r`` and the curvature kinds are

- ``"ggn"``: ``sum_r w_r J_r^T Lambda_r J_r``: the columns ``sqrt(w_r) S_r``; with
  positions, one column per position and column of ``S`` (``T K`` backward passes), each
  zero away from its position (built a chunk at a time, never ``[N, T C, T K]``);
- ``"ggn_mc"``: one column per draw, ``sum_t sqrt(w_t) g_t(y~_t)`` over the positions; the
  draws are independent across positions, so the cross terms vanish in expectation and
  the estimate stays unbiased for the GGN above;
- ``"ef"``: the squared gradient of each example's loss, ``g_n = sum_t w_nt / v_n
  grad l_nt`` weighted by ``v_n`` (``v``: the per-example ``sample_weight``, 1 for per-position
  weights), so that a weight of 2 equals the example given twice.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import tensorflow as tf
from keras.src.backend import get_keras_mask

from laplace_tf.curvature.basics import Tally, _loss_outputs  # noqa: F401  (Tally: re-exported)
from laplace_tf.likelihoods import Likelihood


@dataclass(frozen=True)
class LossRows:
    """One batch's loss terms. ``weights`` is ``None`` when every row has weight 1."""

    rows: tf.Tensor  # [R, C] outputs, R = N * T
    targets: tf.Tensor | None  # the targets, folded to R rows
    weights: tf.Tensor | None  # [R] row weights (sample weight x mask)
    example_weights: tf.Tensor | None  # [N] per-example sample weights (for "ef")
    count: tf.Tensor  # N
    positions: int | None  # T (1 without positions); None when not static


def loss_rows(raw: tf.Tensor, y: tf.Tensor | None, sample_weight: tf.Tensor | None) -> LossRows:
    """Fold the model's output ``raw [N, ..., C]``, ``y`` and the weights (``raw``'s Keras
    mask, if any, zeroes its positions)."""
    mask = get_keras_mask(raw)
    outputs = _loss_outputs(raw)
    shape = tf.shape(outputs)
    count, width = shape[0], shape[-1]
    rows = tf.reshape(outputs, [-1, width])
    positions = outputs.shape[1:-1].num_elements()
    if outputs.shape.rank == 2:
        positions = 1
    targets = None if y is None else _fold_targets(y, outputs)
    lead = shape[:-1]
    weights, example_weights = None, None
    if sample_weight is not None:
        sample_weight = tf.cast(sample_weight, outputs.dtype)
        if sample_weight.shape.rank == 2 and outputs.shape.rank == 2:
            sample_weight = tf.reshape(sample_weight, [-1])  # Keras' [N, 1]
        if sample_weight.shape.rank == 1:
            example_weights = sample_weight
            expand = [count] + [1] * (outputs.shape.rank - 2)
            weights = tf.broadcast_to(tf.reshape(sample_weight, expand), lead)
        else:
            weights = tf.broadcast_to(sample_weight, lead)
    if mask is not None:
        mask = tf.broadcast_to(tf.cast(mask, outputs.dtype), lead)
        weights = mask if weights is None else weights * mask
    if weights is not None:
        weights = tf.reshape(weights, [-1])
    return LossRows(rows, targets, weights, example_weights, count, positions)


def _fold_targets(y: tf.Tensor, outputs: tf.Tensor) -> tf.Tensor:
    """``y [N, *positions, ...]`` as rows ``[N * T, ...]`` (unchanged without positions)."""
    if outputs.shape.rank == 2:
        return y
    tail = tf.shape(y)[outputs.shape.rank - 1 :]
    return tf.reshape(y, tf.concat([[-1], tail], axis=0))


def nll(likelihood: Likelihood, terms: LossRows) -> tf.Tensor:
    """``sum_r w_r l_r``: the summed (weighted) NLL of the batch."""
    if terms.weights is None:
        return likelihood.nll(terms.rows, terms.targets)
    return tf.reduce_sum(terms.weights * likelihood.nll_rows(terms.rows, terms.targets))


def counts(terms: LossRows) -> tf.Tensor:
    """float64 ``[examples, loss rows, C]``: the weighted number of examples
    (``sum_n v_n``), of rows (``sum_r w_r``) and the output width."""
    rows = tf.cast(tf.shape(terms.rows)[0], tf.float64)
    examples = tf.cast(terms.count, tf.float64)
    if terms.example_weights is not None:
        examples = tf.reduce_sum(tf.cast(terms.example_weights, tf.float64))
    if terms.weights is not None:
        rows = tf.reduce_sum(tf.cast(terms.weights, tf.float64))
    width = tf.cast(tf.shape(terms.rows)[-1], tf.float64)
    return tf.stack([examples, rows, width])


class Columns:
    """The columns of ``S`` for one batch, ``[N, D, K]`` with ``D = T C`` the flattened
    output of one example, handed out a chunk at a time (:meth:`part`)."""

    def __init__(self, dense: tf.Tensor | None = None, blocks: tf.Tensor | None = None):
        # dense: [N, D, K]; blocks: [N, T, C, K], column (t, k) = blocks[:, t, :, k] at t
        self.dense, self.blocks = dense, blocks
        if dense is not None:
            self.count = dense.shape[-1]
        else:
            positions, width = blocks.shape[1], blocks.shape[-1]
            if positions is None:
                raise ValueError(
                    "curvature='ggn' on outputs with positions needs their number to be the "
                    "same in every batch (pad the sequences to one length), or use "
                    "curvature='ggn_mc' or 'ef'."
                )
            self.count = positions * width

    def part(self, start, size: int) -> tf.Tensor:
        """Columns ``[start, start + size)`` (zero beyond :attr:`count`), ``[N, D, size]``;
        ``start`` may be a tensor."""
        if self.dense is not None:
            if isinstance(start, int) and start + size <= self.count:
                return self.dense[:, :, start : start + size]
            padded = tf.pad(self.dense, [[0, 0], [0, 0], [0, size]])
            return tf.gather(padded, tf.range(size) + start, axis=2)
        index = tf.range(size) + start
        positions, width = self.blocks.shape[1], self.blocks.shape[-1]
        picked = tf.gather(self.blocks, tf.minimum(index, self.count - 1) % width, axis=3)
        at = tf.one_hot(index // width, positions, dtype=picked.dtype, axis=0)  # [T, size]
        part = picked * at[None, :, None, :]
        return tf.reshape(part, [tf.shape(part)[0], positions * self.blocks.shape[2], size])


def loss_columns(likelihood, kind: str, mc_samples: int, terms: LossRows, seed) -> Columns:
    """The columns of ``S`` for curvature ``kind`` (see the module docstring)."""
    rows, weights = terms.rows, terms.weights
    root = None if weights is None else tf.sqrt(weights)
    width = tf.shape(rows)[-1]
    if kind == "ggn":
        factor = likelihood.hessian_factor(rows)
        if root is not None:
            factor = factor * root[:, None, None]
        if terms.positions == 1:
            return Columns(dense=factor)
        positions = terms.positions
        shape = [-1, positions if positions is not None else -1, width, tf.shape(factor)[-1]]
        blocks = tf.reshape(factor, shape)
        blocks.set_shape([None, positions, rows.shape[-1], factor.shape[-1]])
        return Columns(blocks=blocks)
    if kind == "ef":
        grads = likelihood.loss_gradient(rows, terms.targets)
        if weights is not None:
            inner = weights
            if terms.example_weights is not None:
                repeat = tf.shape(rows)[0] // tf.maximum(terms.count, 1)  # 0 rows: empty
                inner = tf.math.divide_no_nan(weights, tf.repeat(terms.example_weights, repeat))
            grads = grads * inner[:, None]
        column = tf.reshape(grads, [terms.count, -1])
        if terms.example_weights is not None:
            column = column * tf.sqrt(terms.example_weights)[:, None]
        return Columns(dense=column[:, :, None])
    draws = []
    for draw in range(mc_samples):
        sample_seed = tf.random.experimental.stateless_fold_in(seed, draw)
        pseudo = likelihood.sample(rows, sample_seed)
        draws.append(likelihood.loss_gradient(rows, pseudo))
    stacked = tf.stack(draws, axis=-1) / math.sqrt(mc_samples)
    if root is not None:
        stacked = stacked * root[:, None, None]
    return Columns(dense=tf.reshape(stacked, [terms.count, -1, mc_samples]))


#: Output columns the GLM covariance back-propagates together for outputs with positions
#: (whole positions: at least one position's ``C`` columns).
PREDICT_COLUMNS = 16


def position_chunk(positions: int, width: int) -> int:
    """Positions whose ``C`` columns each the GLM covariance back-propagates together."""
    return max(1, min(positions, PREDICT_COLUMNS // max(width, 1)))


def output_blocks(gram, outputs: tf.Tensor) -> tf.Tensor:
    """The per-example, per-position output covariance ``[N, *positions, C, C]`` from
    ``gram(columns [N, D, K]) -> [N, K, K]``, the Gram of the Jacobian rows selected by
    ``columns``. Without positions one call with ``S = I``; with positions, chunks of
    whole positions in a ``tf.while_loop``, keeping each position's ``C x C`` block (the
    covariance between positions is never formed)."""
    shape = tf.shape(outputs)
    count, width = shape[0], outputs.shape[-1]
    if outputs.shape.rank == 2:
        eye = tf.eye(width, dtype=outputs.dtype)
        return gram(tf.broadcast_to(eye, [count, width, width]))
    positions = outputs.shape[1:-1].num_elements()
    if positions is None or width is None:
        raise ValueError(
            f"the GLM predictive of outputs with positions needs their shape to be static; "
            f"got {outputs.shape}."
        )
    chunk = position_chunk(positions, width)
    chunks = -(-positions // chunk)
    size = chunk * width

    def body(index, blocks):
        first = index * size
        picked = tf.one_hot(first + tf.range(size), positions * width, dtype=outputs.dtype, axis=0)
        columns = tf.broadcast_to(picked, [count, positions * width, size])
        block = tf.reshape(gram(columns), [count, chunk, width, chunk, width])
        block = tf.linalg.diag_part(tf.transpose(block, [0, 2, 4, 1, 3]))  # [N, C, C, chunk]
        return index + 1, blocks.write(index, tf.transpose(block, [0, 3, 1, 2]))

    blocks = tf.TensorArray(outputs.dtype, size=chunks, element_shape=[None, chunk, width, width])
    _, blocks = tf.while_loop(
        lambda index, _: index < chunks, body, (tf.constant(0), blocks), parallel_iterations=1
    )
    stacked = tf.transpose(blocks.stack(), [1, 0, 2, 3, 4])  # [N, chunks, chunk, C, C]
    flat = tf.reshape(stacked, [count, chunks * chunk, width, width])[:, :positions]
    return tf.reshape(flat, tf.concat([shape, [width]], axis=0))
