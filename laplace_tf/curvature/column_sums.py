"""Diagonal sums of Dense chains, one column of ``S`` at a time.

A Dense kernel's diagonal ``sum_n sum_k (a_n (x) d_nk)^2 = (a^2)^T sum_k d_k^2`` reads
its cotangents only through ``sum_k d_k^2``, an ``[N, J]`` tensor that adds up over the
columns. When every factor of a step is of that kind (:class:`~layers.Outer` kernels and
:class:`~layers.Explicit` biases: MLPs), the columns are back-propagated one after
another, each folded into those sums before the next starts, and each kernel's product
with ``a^2`` is formed once at the end: one column's cut cotangents alive at a time, not
the ``[N, K, J]`` of all columns (twice, while they are stacked), at the same FLOPs.
"""

from __future__ import annotations

from collections.abc import Callable

import tensorflow as tf

from laplace_tf.curvature.layers import Explicit, Outer
from laplace_tf.curvature.loss_terms import Columns


def _column_sum(factor) -> tf.Tensor:
    if isinstance(factor, Outer):
        return tf.reduce_sum(tf.square(factor.cotangents), axis=1)  # [N, J]
    return factor.sum_squares()[0]


def _finish(factor, total: tf.Tensor) -> tf.Tensor:
    if isinstance(factor, Outer):
        diagonal = tf.matmul(tf.square(factor.inputs), total, transpose_a=True)
        return tf.reshape(diagonal, factor.variable.shape)
    return total


def one_column_at_a_time(factors_of: Callable[[tf.Tensor], list], columns: Columns) -> list | None:
    """``[(factor, sum_squares)]`` over all columns of ``columns``, with ``factors_of(part)``
    the factors of a part ``[N, D, 1]`` of ``S``; ``None`` when a factor of the first column
    is of another kind (its ops are then unused and pruned from the compiled step)."""
    first = factors_of(columns.part(0, 1))
    if not first or not all(type(f) in (Outer, Explicit) for f in first):
        return None
    sums = [_column_sum(f) for f in first]
    for k in range(1, columns.count):
        factors = factors_of(columns.part(k, 1))
        sums = [s + _column_sum(f) for s, f in zip(sums, factors, strict=True)]
    return [(f, _finish(f, s)) for f, s in zip(first, sums, strict=True)]
