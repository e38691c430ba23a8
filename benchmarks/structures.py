"""Benchmark: the posterior structures (diag / kron / full) against plain Keras.

On the 784-256-256-10 MLP (2048 examples, batches of 256) and on the last layer of a
small CNN, all in one process, alternating, medians over repeats after a warm-up that
traces:

- ``fit`` (exact GGN) of each structure / one gradient epoch over the same batches;
- GLM ``predict`` (probit) on 512 test points / ``model.predict`` on them.

Issue targets: kron fit <= 1.5x the diagonal fit; last-layer full fit <= 1.2x a gradient
epoch; GLM predict of every structure <= 3x ``model.predict``.

Run: ``python benchmarks/structures.py [--repeats 5]``.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import keras  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402
from models import CLASSES, gradient_epoch, mlp_784_256_256_10  # noqa: E402

from laplace_tf.posterior import Laplace  # noqa: E402

N_TRAIN, N_TEST, BATCH = 2048, 512, 256
CASES = {
    "mlp": [("diag", "all"), ("kron", "all"), ("diag", "last_layer"), ("full", "last_layer")],
    "cnn": [("diag", "last_layer"), ("kron", "last_layer"), ("full", "last_layer")],
}


def cnn() -> keras.Model:
    keras.utils.set_random_seed(0)
    return keras.Sequential(
        [
            keras.Input((28, 28, 1)),
            keras.layers.Conv2D(16, 3, activation="relu"),
            keras.layers.MaxPooling2D(),
            keras.layers.Conv2D(32, 3, activation="relu"),
            keras.layers.MaxPooling2D(),
            keras.layers.Flatten(),
            keras.layers.Dense(CLASSES),
        ]
    )


def median_time(run, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def timings(name: str, model: keras.Model, shape: tuple, repeats: int) -> dict[str, float]:
    """Median seconds of a gradient epoch, ``model.predict`` and each structure's fit and
    GLM predict on ``model``."""
    rng = np.random.default_rng(0)
    x = rng.normal(size=(N_TRAIN, *shape)).astype("float32")
    y = rng.integers(0, CLASSES, size=N_TRAIN)
    x_test = rng.normal(size=(N_TEST, *shape)).astype("float32")
    train = tf.data.Dataset.from_tensor_slices((x, y)).batch(BATCH).cache()
    runs = {
        "gradient epoch": gradient_epoch(model, train),
        "model.predict": lambda: model.predict(x_test, batch_size=BATCH, verbose=0),
    }
    for structure, subset in CASES[name]:
        la = Laplace(model, "classification", structure=structure, subset=subset).fit(train)
        runs[f"{structure}/{subset} fit"] = lambda la=la: la.fit(train)
        runs[f"{structure}/{subset} predict"] = lambda la=la: la.predict(x_test)
    for run in runs.values():
        run()  # warm-up: traces every step
    return {label: median_time(run, repeats) for label, run in runs.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    for name, build, shape in (("mlp", mlp_784_256_256_10, (784,)), ("cnn", cnn, (28, 28, 1))):
        times = timings(name, build(), shape, args.repeats)
        epoch, predict = times.pop("gradient epoch"), times.pop("model.predict")
        print(f"\n{name}: gradient epoch {epoch:.3f} s, model.predict {predict:.3f} s")
        for label, seconds in times.items():
            baseline = epoch if label.endswith("fit") else predict
            print(f"  {label:24s} {seconds:7.3f} s  {seconds / baseline:5.2f}x")


if __name__ == "__main__":
    main()
