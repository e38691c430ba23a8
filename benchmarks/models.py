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
