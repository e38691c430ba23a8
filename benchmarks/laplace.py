"""Benchmark: DiagonalLaplace against plain Keras on a 784-256-256-10 MLP.

All in one process, alternating, medians over repeats (after a warm-up that traces):

- ``fit`` (exact GGN over 2048 examples, batches of 256) / one gradient epoch;
- ``predict`` (GLM, probit) on 512 test points / ``model.predict`` on them;
- ``predict(pred_type="nn", n_samples=100)`` / 100 plain forward passes.

Run: ``python benchmarks/laplace.py [--repeats 5]``.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402
from models import CLASSES, gradient_epoch, mlp_784_256_256_10  # noqa: E402

from laplace_tf import DiagonalLaplace  # noqa: E402

N_TRAIN, N_TEST, BATCH = 2048, 512, 256


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()

    rng = np.random.default_rng(0)
    model = mlp_784_256_256_10()
    x = rng.normal(size=(N_TRAIN, 784)).astype("float32")
    y = rng.integers(0, CLASSES, size=N_TRAIN)
    x_test = rng.normal(size=(N_TEST, 784)).astype("float32")
    train = tf.data.Dataset.from_tensor_slices((x, y)).batch(BATCH).cache()

    @tf.function
    def forward(xb):
        return model(xb, training=False)

    la = DiagonalLaplace(model, "classification").fit(train)
    x_test_tensor = tf.constant(x_test)
    pairs = {
        "fit / gradient epoch": (lambda: la.fit(train), gradient_epoch(model, train)),
        "predict glm / model.predict": (
            lambda: la.predict(x_test, batch_size=N_TEST),
            lambda: model.predict(x_test, batch_size=N_TEST, verbose=0),
        ),
        "predict nn x100 / 100 forwards": (
            lambda: la.predict(x_test, pred_type="nn", n_samples=100, seed=0, batch_size=N_TEST),
            lambda: [forward(x_test_tensor) for _ in range(100)][-1].numpy(),
        ),
    }
    print(f"784-256-256-10 MLP, {N_TRAIN} train / {N_TEST} test, {os.cpu_count()} CPUs, "
          f"TF {tf.__version__}; medians of {args.repeats} alternating runs")  # fmt: skip
    print(f"{'measure':<32} {'laplace [s]':>12} {'baseline [s]':>13} {'ratio':>7}")
    for name, (ours, baseline) in pairs.items():
        ours(), baseline()  # warm-up: tracing
        ours_times, base_times = [], []
        for _ in range(args.repeats):
            for fn, times in ((ours, ours_times), (baseline, base_times)):
                start = time.perf_counter()
                fn()
                times.append(time.perf_counter() - start)
        t_ours, t_base = statistics.median(ours_times), statistics.median(base_times)
        print(f"{name:<32} {t_ours:>12.4f} {t_base:>13.4f} {t_ours / t_base:>7.2f}")


if __name__ == "__main__":
    main()
