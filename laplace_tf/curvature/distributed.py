"""Spreading a curvature step over the replicas of the model's ``tf.distribute.Strategy``.

A model built under ``strategy.scope()`` (``MirroredStrategy``,
``MultiWorkerMirroredStrategy``) carries its strategy. Each global batch is then cut into
one contiguous slice per replica (slices differ by at most one example; with fewer
examples than replicas some get none), every replica runs the step on its slice with its own
copy of the weights, and the per-replica sums (curvature, NLL, example count) are
all-reduced. Sums over disjoint slices add up to the sum over the batch, so the result
equals the single-device one up to floating-point summation order. Under
``MultiWorkerMirroredStrategy`` every worker must iterate the same batches in the same
order (each replica takes its own slice of every global batch).

The Monte Carlo GGN draws its pseudo-labels per replica (the step's seed folded with the
replica id), so it is a different, equally valid draw than on one device.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import keras
import tensorflow as tf

Step = Callable[
    [Any, tf.Tensor, tf.Tensor | None, tf.Tensor], tuple[list[tf.Tensor], tf.Tensor, tf.Tensor]
]


def strategy_of(model: keras.Model) -> tf.distribute.Strategy | None:
    """The model's strategy when it has more than one replica, else ``None``."""
    strategy = getattr(model, "distribute_strategy", None)
    if strategy is None or strategy.num_replicas_in_sync < 2:
        return None
    return strategy


def replicated(strategy: tf.distribute.Strategy, step: Step) -> Step:
    """``step(x, y, sample_weight, seed) -> (sums, nll, counts)`` run on every replica and
    all-reduced (``counts``: weighted examples and rows, summed, and the output width)."""
    replicas = strategy.num_replicas_in_sync
    total = tf.distribute.ReduceOp.SUM

    @tf.function(reduce_retracing=True, autograph=False)
    def run(x, y, weights, seed):
        count = tf.shape(tf.nest.flatten(x)[0])[0]

        def shard(context):
            replica = context.replica_id_in_sync_group
            start = (replica * count) // replicas
            stop = ((replica + 1) * count) // replicas
            x_part, y_part = tf.nest.map_structure(lambda t: t[start:stop], (x, y))
            w_part = None if weights is None else weights[start:stop]
            seed_part = tf.random.experimental.stateless_fold_in(seed, replica)
            return x_part, y_part, w_part, seed_part

        arguments = strategy.experimental_distribute_values_from_function(shard)
        sums, nll, counts = strategy.run(step, args=arguments)
        sums = [strategy.reduce(total, s, axis=None) for s in sums]
        nll = strategy.reduce(total, nll, axis=None)
        width = strategy.experimental_local_results(counts)[0][2]
        totals = strategy.reduce(total, counts, axis=None)
        return sums, nll, tf.concat([totals[:2], [width]], axis=0)

    return run
