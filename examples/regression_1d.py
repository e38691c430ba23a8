"""1-D regression: Laplace predictive bands widen in a gap in the data and outside it.

Trains a small GELU MLP on a noisy sine observed on [-4, -1.5] and [1.5, 4] only, fits a
diagonal Laplace posterior (GGN), tunes the prior precision and the observation noise by
maximising the marginal likelihood, and plots the GLM predictive (mean +- 1, 2 std) to
``regression_1d.png``. It prints the mean epistemic (functional) predictive std on the data,
in the gap and outside the data.

Run: ``python examples/regression_1d.py [--out DIR] [--seed 0]``; files go to ``--out``
(default: a new temporary directory, printed at the end).
"""

from __future__ import annotations

import argparse
import os
import tempfile
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import keras  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

from laplace_tf import DiagonalLaplace  # noqa: E402
from laplace_tf.plotting import regression_bands  # noqa: E402

GAP, EDGE, NOISE = 1.5, 4.0, 0.1


def make_data(seed: int, n: int = 300) -> tuple[np.ndarray, np.ndarray]:
    """``y = sin(2x) + noise`` with ``x`` uniform on ``[-EDGE, -GAP]`` and ``[GAP, EDGE]``."""
    rng = np.random.default_rng(seed)
    x = np.concatenate([rng.uniform(-EDGE, -GAP, n // 2), rng.uniform(GAP, EDGE, n // 2)])
    x = x.astype("float32")[:, None]
    y = np.sin(2 * x) + NOISE * rng.standard_normal(x.shape).astype("float32")
    return x, y


def train(x: np.ndarray, y: np.ndarray, seed: int) -> keras.Model:
    keras.utils.set_random_seed(seed)
    model = keras.Sequential(
        [
            keras.Input((1,)),
            keras.layers.Dense(16, activation="gelu"),
            keras.layers.Dense(16, activation="gelu"),
            keras.layers.Dense(1),
        ]
    )
    model.compile(optimizer=keras.optimizers.Adam(1e-2), loss="mse")
    batches = tf.data.Dataset.from_tensor_slices((x, y)).shuffle(len(x), seed=seed)
    model.fit(batches.batch(50).repeat(), steps_per_epoch=2000, shuffle=False, verbose=0)
    return model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=None, help="output directory")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    out = args.out or Path(tempfile.mkdtemp(prefix="laplace_tf_"))
    out.mkdir(parents=True, exist_ok=True)

    x, y = make_data(args.seed)
    model = train(x, y, args.seed)
    rmse = float(np.sqrt(np.mean((model.predict(x, verbose=0) - y) ** 2)))
    print(f"MAP fit of a 1-16-16-1 GELU MLP on {len(x)} points: training RMSE {rmse:.3f}")

    # Starting the noise at the MAP residual keeps the optimiser's first step moderate.
    la = DiagonalLaplace(model, "regression", sigma_noise=rmse).fit((x, y))
    la.optimize_prior_precision(optimize_sigma_noise=True)
    print(
        f"Marginal likelihood: prior precision {la.prior_precision:.3f}, "
        f"sigma_noise {la.sigma_noise:.3f} (true noise {NOISE}), "
        f"log evidence {float(la.log_marginal_likelihood()):.1f}"
    )

    x_test = np.linspace(-EDGE - 2, EDGE + 2, 401, dtype="float32")[:, None]
    mean, variance = la.predict(x_test)
    _, functional_variance = la.predict(x_test, include_noise=False)
    functional_std = np.sqrt(functional_variance.numpy()[:, 0])
    distance = np.abs(x_test[:, 0])
    regions = {
        "on data": (distance > GAP) & (distance < EDGE),
        "in gap": distance < GAP,
        "outside data": distance > EDGE,
    }
    std = {name: float(functional_std[mask].mean()) for name, mask in regions.items()}
    print("Mean epistemic predictive std: " + ", ".join(f"{k} {v:.3f}" for k, v in std.items()))
    print(f"std in gap > std on data: {std['in gap'] > std['on data']}")
    print(f"std outside data > std on data: {std['outside data'] > std['on data']}")

    figure = regression_bands(
        x_test,
        mean.numpy(),
        np.sqrt(variance.numpy()),
        x_train=x,
        y_train=y,
        label="Laplace (GLM) mean",
    )
    figure.axes[0].set_title("Diagonal Laplace, predictive mean ± 1, 2 std")
    path = out / "regression_1d.png"
    figure.savefig(path, dpi=100)
    print(f"Wrote {path}")


if __name__ == "__main__":
    main()
