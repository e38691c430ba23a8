"""Tuning the prior precision: marginal likelihood vs validation grid search.

Trains a small MLP on scikit-learn's digits, fits one diagonal Laplace posterior (GGN over
all weights) and tunes its prior precision four ways: the marginal likelihood with one
scalar, the marginal likelihood with one value per layer, and a grid search of the
validation NLL, for the GLM predictive (probit) and for the last layer alone. It prints
the values chosen and the test NLL and ECE of each, next to the MAP's.

The marginal likelihood needs no validation data, but for a diagonal posterior over all
weights of a deep network it often picks a small precision (a broad posterior) and an
underconfident predictive; the grid search optimises the predictive directly.

Run: ``python examples/prior_tuning.py [--seed 0]`` (writes no files).
"""

from __future__ import annotations

import argparse
import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import keras  # noqa: E402
import numpy as np  # noqa: E402
from sklearn.datasets import load_digits  # noqa: E402
from sklearn.model_selection import train_test_split  # noqa: E402

from laplace_tf import DiagonalLaplace, metrics  # noqa: E402

GRID = np.logspace(-2, 5, 29)


def data(seed: int):
    x, y = load_digits(return_X_y=True)
    x = (x / 16.0).astype("float32")
    x_train, x_rest, y_train, y_rest = train_test_split(
        x, y, test_size=0.4, random_state=seed, stratify=y
    )
    x_val, x_test, y_val, y_test = train_test_split(
        x_rest, y_rest, test_size=0.5, random_state=seed, stratify=y_rest
    )
    return (x_train, y_train), (x_val, y_val), (x_test, y_test)


def train(x, y, seed: int) -> keras.Model:
    keras.utils.set_random_seed(seed)
    decay = keras.regularizers.L2(1e-5)
    model = keras.Sequential(
        [
            keras.Input((64,)),
            keras.layers.Dense(128, activation="relu", kernel_regularizer=decay),
            keras.layers.Dense(128, activation="relu", kernel_regularizer=decay),
            keras.layers.Dense(10, kernel_regularizer=decay),
        ]
    )
    model.compile(
        keras.optimizers.Adam(3e-3), keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    )
    model.fit(x, y, epochs=60, batch_size=64, verbose=0)
    return model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=None, help="ignored: this example writes no files")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    train_set, val_set, (x_test, y_test) = data(args.seed)
    model = train(*train_set, seed=args.seed)
    rows = [("MAP", "-", keras.ops.softmax(model(x_test)).numpy())]

    la = DiagonalLaplace(model, "classification").fit(train_set)
    la.optimize_prior_precision("marglik")
    rows.append(("marglik, scalar", f"{la.prior_precision:.3g}", la.predict(x_test)))
    la.optimize_prior_precision("marglik", prior_structure="layerwise")
    chosen = ", ".join(f"{value:.3g}" for value in la.prior_precision)
    rows.append(("marglik, layerwise", chosen, la.predict(x_test)))
    la.optimize_prior_precision("gridsearch", val_data=val_set, grid=GRID)
    rows.append(("validation NLL grid", f"{la.prior_precision:.3g}", la.predict(x_test)))

    last = DiagonalLaplace(model, "classification", subset="last_layer").fit(train_set)
    last.optimize_prior_precision("gridsearch", val_data=val_set, grid=GRID)
    rows.append(("last layer, grid", f"{last.prior_precision:.3g}", last.predict(x_test)))

    print(f"{'prior tuning':22s} {'prior precision':>22s} {'test NLL':>9s} {'test ECE':>9s}")
    test_nll = {}
    for name, chosen, probs in rows:
        test_nll[name] = metrics.nll(probs, y_test)
        ece = metrics.expected_calibration_error(probs, y_test)
        print(f"{name:22s} {chosen:>22s} {test_nll[name]:9.4f} {ece:9.4f}")
    print(f"lowest test NLL: {min(test_nll, key=test_nll.get)}")
    grid_ok = test_nll["validation NLL grid"] <= test_nll["MAP"] + 0.02
    print(f"grid search no worse than MAP: {grid_ok}")


if __name__ == "__main__":
    main()
