"""Fit the curvature of a small trained classifier and print a per-layer summary.

Trains a 64-32-10 MLP on scikit-learn's bundled digits data (no download), then computes
the diagonal GGN over the training set with :func:`laplace_tf.curvature.diagonal` and,
for the output layer, the exact Hessian diagonal with
:func:`laplace_tf.curvature.hessian_diagonal`, and prints what a diagonal Laplace
posterior with unit prior precision would look like layer by layer.

Run: ``python examples/curvature_summary.py [--epochs 30] [--seed 0]``.
"""

from __future__ import annotations

import argparse
import os
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import keras  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402
from sklearn.datasets import load_digits  # noqa: E402

from laplace_tf.curvature import diagonal, hessian_diagonal  # noqa: E402
from laplace_tf.likelihoods import get_likelihood  # noqa: E402


def train(seed: int, epochs: int):
    digits = load_digits()
    x = (digits.data / 16.0).astype("float32")
    y = digits.target.astype("int64")
    order = np.random.default_rng(seed).permutation(len(x))
    x, y = x[order], y[order]
    split = int(0.8 * len(x))
    keras.utils.set_random_seed(seed)
    model = keras.Sequential(
        [
            keras.Input((64,)),
            keras.layers.Dense(32, activation="tanh", name="hidden"),
            keras.layers.Dense(10, name="logits"),
        ]
    )
    model.compile(
        optimizer=keras.optimizers.Adam(1e-2),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        metrics=["accuracy"],
    )
    model.fit(x[:split], y[:split], epochs=epochs, batch_size=64, verbose=0)
    _, accuracy = model.evaluate(x[split:], y[split:], verbose=0)
    return model, (x[:split], y[:split]), accuracy


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    model, (x, y), accuracy = train(args.seed, args.epochs)
    print(f"Trained a 64-32-10 MLP on {len(x)} digits; test accuracy {accuracy:.3f}\n")

    start = time.perf_counter()
    ggn = diagonal(model, (x, y), likelihood="classification", kind="ggn")
    elapsed = time.perf_counter() - start
    prior_precision = 1.0
    print(f"Diagonal GGN over the training set in {elapsed:.2f} s")
    print(f"{'weight':<26} {'shape':>9} {'mean GGN':>10} {'max GGN':>10} {'mean post. std':>15}")
    for variable, curvature in zip(model.trainable_variables, ggn, strict=True):
        values = curvature.numpy()
        std = 1.0 / np.sqrt(values + prior_precision)
        print(
            f"{variable.path:<26} {str(tuple(variable.shape)):>9} {values.mean():>10.3f} "
            f"{values.max():>10.3f} {std.mean():>15.4f}"
        )

    likelihood = get_likelihood("classification")
    logits_layer = model.get_layer("logits")
    features = keras.Model(model.inputs[0], model.get_layer("hidden").output)(x)

    def loss() -> tf.Tensor:
        return likelihood.nll(logits_layer(features), y)

    start = time.perf_counter()
    exact = hessian_diagonal(loss, logits_layer.trainable_variables)
    elapsed = time.perf_counter() - start
    ggn_last = ggn[-2:]
    gap = max(
        float(np.max(np.abs(e.numpy() - g.numpy()) / (np.abs(e.numpy()) + 1e-12)))
        for e, g in zip(exact, ggn_last, strict=True)
    )
    print(
        f"\nExact Hessian diagonal of the output layer in {elapsed:.2f} s; it equals the GGN "
        f"there (the layer is linear in its weights): max relative gap {gap:.1e}"
    )


if __name__ == "__main__":
    main()
