"""Models shared by the benchmarks (so that their figures refer to the same network)."""

from __future__ import annotations

import keras

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
