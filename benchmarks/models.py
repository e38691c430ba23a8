"""Models shared by the benchmarks (so that their figures refer to the same network)."""

from __future__ import annotations

from collections.abc import Callable

import keras
import tensorflow as tf

from laplace_tf.likelihoods import get_likelihood

CLASSES = 10


def mlp_784_256_256_10() -> keras.Model:
    """The 784-256-256-10 ReLU MLP of the issue benchmarks, seeded."""
    keras.utils.set_random_seed(0)
    return keras.Sequential(
        [
            keras.Input((784,)),
            keras.layers.Dense(256, activation="relu"),
            keras.layers.Dense(256, activation="relu"),
            keras.layers.Dense(CLASSES),
        ]
    )


def gradient_epoch(model: keras.Model, data) -> Callable[[], list]:
    """The baseline: one pass of loss gradients (softmax cross-entropy, summed) over ``data``."""
    likelihood = get_likelihood("classification")

    @tf.function(reduce_retracing=True)
    def gradient_step(x, y):
        with tf.GradientTape() as tape:
            loss = likelihood.nll(model(x, training=False), y)
        return tape.gradient(loss, model.trainable_variables)

    def run():
        for x, y in data:
            grads = gradient_step(x, y)
        return grads

    return run


def gradient_pass(model: keras.Model, data: tf.data.Dataset) -> Callable[[], list]:
    """A stricter baseline: :func:`gradient_epoch` with all batches in one compiled call (a
    ``while`` loop over the dataset's iterator, summing the gradients), as a diagonal fit
    runs its pass: no Python call or host read per batch."""
    likelihood = get_likelihood("classification")
    variables = model.trainable_variables

    @tf.function
    def epoch(iterator):
        totals = [tf.zeros_like(v) for v in variables]
        for x, y in iterator:
            with tf.GradientTape() as tape:
                loss = likelihood.nll(model(x, training=False), y)
            grads = tape.gradient(loss, variables)
            totals = [t + g for t, g in zip(totals, grads, strict=True)]
        return totals

    def run():
        return epoch(iter(data))

    return run


def rss_mib(field: str = "VmRSS") -> float:
    """A memory figure of this process from ``/proc/self/status`` (``VmRSS``, ``VmHWM``), in MiB."""
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    raise RuntimeError(f"{field} not in /proc/self/status")


def reset_peak_rss() -> bool:
    """Reset ``VmHWM`` to the current RSS (Linux >= 4.0); False where that is not allowed."""
    try:
        with open("/proc/self/clear_refs", "w") as clear_refs:
            clear_refs.write("5")
    except OSError:
        return False
    return True
