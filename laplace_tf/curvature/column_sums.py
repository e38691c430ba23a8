"""Diagonal sums of Dense chains, a column of ``S`` at a time.

A Dense kernel's diagonal ``sum_n sum_k (a_n (x) d_nk)^2 = (a^2)^T sum_k d_k^2`` reads
its cotangents only through ``sum_k d_k^2``, an ``[N, J]`` tensor that adds up over the
columns. When every factor of a step is of that kind (:class:`~layers.Outer` kernels and
:class:`~layers.Explicit` biases: MLPs), each column is back-propagated on its own and
folded into those sums as soon as it is done, at most :data:`IN_FLIGHT` at once, and
each kernel's product with ``a^2`` is formed once at the end: a couple of columns' cut
cotangents alive at a time, not the ``[N, K, J]`` of all columns (twice, while they are
stacked), at the same FLOPs.
"""

from __future__ import annotations

from collections.abc import Callable

import tensorflow as tf

from laplace_tf.curvature.layers import Explicit, Outer
from laplace_tf.curvature.loss_terms import Columns

#: Columns back-propagated at once: column ``k`` starts when column ``k - IN_FLIGHT``'s
#: sums are in (``0``: unordered, the executor's choice). Benchmark MLP, five
#: alternating pairs of processes: 2 held 5.6-6.5 MiB of live tensors against 7.3-8.7
#: MiB unordered, at the same speed (medians 68 and 77 ms a fit, 1.90x and 1.76x the
#: paired gradient epochs); one at a time (1) held 5.7-6.1 MiB but ran at 3.4x.
IN_FLIGHT = 2


def _column_sum(factor) -> tf.Tensor:
    if isinstance(factor, Outer):
        return factor.cotangent_squares()  # [N, J]
    return factor.sum_squares()[0]


def _finish(factor, total: tf.Tensor) -> tf.Tensor:
    return factor.from_cotangent_squares(total) if isinstance(factor, Outer) else total


def dense_column_sums(factors_of: Callable[[tf.Tensor], list], columns: Columns) -> list | None:
    """``[(factor, sum_squares)]`` over all columns of ``columns``, with ``factors_of(part)``
    the factors of a part ``[N, D, 1]`` of ``S``; ``None`` when a factor of the first column
    is of another kind (its ops are then unused and pruned from the compiled step).
    At most :data:`IN_FLIGHT` columns are back-propagated at once."""
    first = factors_of(columns.part(0, 1))
    if not first or not all(type(f) in (Outer, Explicit) for f in first):
        return None
    sums = [_column_sum(f) for f in first]
    history = [sums]
    for k in range(1, columns.count):
        part = columns.part(k, 1)
        if IN_FLIGHT and k >= IN_FLIGHT:
            with tf.control_dependencies(history[k - IN_FLIGHT]):
                part = tf.identity(part)
        factors = factors_of(part)
        sums = [s + _column_sum(f) for s, f in zip(sums, factors, strict=True)]
        history.append(sums)
    return [(f, _finish(f, s)) for f, s in zip(first, sums, strict=True)]
