"""Predictive sampling in a script: weight draws, predictive samples and intervals from them.

Trains a small MLP on scikit-learn's diabetes regression data (10 features, 442 patients,
target standardised), fits a diagonal Laplace posterior (GGN), tunes the prior precision
and the observation noise by maximising the marginal likelihood, and then works with
samples rather than closed forms:

* ``la.sample(n, seed=...)``: posterior weight draws, one ``[n, *shape]`` tensor per
  weight, evaluated here with ``model.stateless_call``;
* ``la.predictive_samples(x, n, pred_type="nn" | "glm", seed=...)``: ``[S, N, C]``
  draws of the network output (same seed, same draws; the model's weights are never
  assigned);
* the Monte Carlo mean and variance of the GLM draws against the closed-form
  ``la.predict(x, include_noise=False)``, to within Monte Carlo error;
* 90% predictive intervals from sample quantiles (output draws plus observation noise
  ``sigma_noise``) and their coverage on held-out patients.

The samples go to ``predictive_samples.npz`` and a plot of the intervals and of one
patient's predictive to ``predictive_sampling.png``. Checkable facts are printed as
``name: True/False`` lines.

Run: ``python examples/predictive_sampling.py [--out DIR] [--seed 0] [--samples 2000]``;
files go to ``--out`` (default: a new temporary directory, printed at the end).
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
from sklearn.datasets import load_diabetes  # noqa: E402
from sklearn.model_selection import train_test_split  # noqa: E402

from laplace_tf import DiagonalLaplace  # noqa: E402

LEVEL = 0.9  # central predictive interval
COVERAGE_RANGE = (0.8, 0.97)


def data(seed: int) -> tuple[tuple[np.ndarray, np.ndarray], tuple[np.ndarray, np.ndarray]]:
    """Diabetes split 70 / 30; inputs and target standardised with training statistics."""
    x, y = load_diabetes(return_X_y=True)
    x_train, x_test, y_train, y_test = train_test_split(x, y, test_size=0.3, random_state=seed)
    x_mean, x_std = x_train.mean(0), x_train.std(0)
    y_mean, y_std = y_train.mean(), y_train.std()

    def scale(x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        x = ((x - x_mean) / x_std).astype("float32")
        y = ((y - y_mean) / y_std).astype("float32")[:, None]
        return x, y

    return scale(x_train, y_train), scale(x_test, y_test)


def train(x: np.ndarray, y: np.ndarray, seed: int) -> keras.Model:
    # Small and regularised on purpose: a 10-32-1 net overfits the 309 patients, the
    # marginal likelihood then puts sigma_noise near 1 and the intervals cover ~100%.
    keras.utils.set_random_seed(seed)
    decay = keras.regularizers.L2(1e-2)
    model = keras.Sequential(
        [
            keras.Input((x.shape[1],)),
            keras.layers.Dense(8, activation="tanh", kernel_regularizer=decay),
            keras.layers.Dense(1, kernel_regularizer=decay),
        ]
    )
    model.compile(optimizer=keras.optimizers.Adam(3e-3), loss="mse")
    batches = tf.data.Dataset.from_tensor_slices((x, y)).shuffle(len(x), seed=seed)
    model.fit(batches.batch(32).repeat(), steps_per_epoch=1000, shuffle=False, verbose=0)
    return model


def outputs_at_draws(model: keras.Model, draws: list[tf.Tensor], x: np.ndarray) -> np.ndarray:
    """``[S, N, C]`` outputs of ``model`` at weight draws from ``la.sample`` (``subset="all"``,
    so the draws line up with ``model.trainable_variables``), without assigning weights."""
    non_trainable = [v.value for v in model.non_trainable_variables]
    outputs = []
    for s in range(int(draws[0].shape[0])):
        values = [draw[s] for draw in draws]
        out, _ = model.stateless_call(values, non_trainable, x, training=False)
        outputs.append(keras.ops.convert_to_numpy(out))
    return np.stack(outputs)


def mc_agreement(samples: np.ndarray, mean: np.ndarray, variance: np.ndarray) -> dict[str, float]:
    """How far the Monte Carlo mean and variance of ``samples`` ``[S, N, C]`` are from the
    exact Gaussian moments, in units of their Monte Carlo standard errors (worst point)."""
    n = samples.shape[0]
    mc_mean, mc_variance = samples.mean(0), samples.var(0, ddof=1)
    relative = np.abs(mc_variance / variance - 1.0)
    return {
        "mean z": float(np.max(np.abs(mc_mean - mean) / np.sqrt(variance / n))),
        # The sample variance of S Gaussian draws has relative standard error sqrt(2 / (S - 1)).
        "variance z": float(np.max(relative) / np.sqrt(2.0 / (n - 1))),
        "variance rel. error (mean)": float(np.mean(relative)),
        "variance rel. error (max)": float(np.max(relative)),
    }


def plot(
    path: Path,
    y_test: np.ndarray,
    mean: np.ndarray,
    lower: np.ndarray,
    upper: np.ndarray,
    point: int,
    y_draws: dict[str, np.ndarray],
    glm_mean: float,
    glm_std: float,
) -> None:
    from matplotlib.figure import Figure

    fig = Figure(figsize=(11, 4), layout="constrained")
    left, right = fig.subplots(1, 2, gridspec_kw={"width_ratios": [2, 1]})
    order = np.argsort(mean)
    rank = np.arange(len(order))
    inside = (y_test[order] >= lower[order]) & (y_test[order] <= upper[order])
    left.fill_between(
        rank,
        lower[order],
        upper[order],
        step="mid",
        color="C0",
        alpha=0.25,
        linewidth=0,
        label=f"{LEVEL:.0%} interval (nn samples + noise)",
    )
    left.plot(rank, mean[order], color="C0", label="sample mean")
    left.scatter(rank[inside], y_test[order][inside], s=10, color="k", label="observed, inside")
    left.scatter(rank[~inside], y_test[order][~inside], s=14, color="C3", label="observed, outside")
    left.set_xlabel("test patient (sorted by predicted mean)")
    left.set_ylabel("disease progression (standardised)")
    left.legend(loc="upper left", fontsize="small")

    for (name, draws), color in zip(y_draws.items(), ("C0", "C1"), strict=True):
        right.hist(draws, bins=50, density=True, alpha=0.5, color=color, label=f"{name} samples")
    grid = np.linspace(glm_mean - 4 * glm_std, glm_mean + 4 * glm_std, 200)
    density = np.exp(-0.5 * ((grid - glm_mean) / glm_std) ** 2) / (glm_std * np.sqrt(2 * np.pi))
    right.plot(grid, density, color="k", label="la.predict (GLM + noise)")
    right.axvline(float(y_test[point]), color="C3", label="observed")
    right.set_xlabel(f"y of test patient {point}")
    right.legend(fontsize="small")
    fig.savefig(path, dpi=100)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=None, help="output directory")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--samples", type=int, default=2000, help="predictive samples S")
    args = parser.parse_args()
    out = args.out or Path(tempfile.mkdtemp(prefix="laplace_tf_"))
    out.mkdir(parents=True, exist_ok=True)
    n, seed = args.samples, args.seed

    (x_train, y_train), (x_test, y_test) = data(seed)
    model = train(x_train, y_train, seed)
    rmse = float(np.sqrt(np.mean((model.predict(x_train, verbose=0) - y_train) ** 2)))
    print(f"MAP fit of a 10-8-1 MLP on {len(x_train)} patients: training RMSE {rmse:.3f}")

    la = DiagonalLaplace(model, "regression", sigma_noise=rmse).fit((x_train, y_train))
    la.optimize_prior_precision(optimize_sigma_noise=True)
    print(
        f"Marginal likelihood: prior precision {la.prior_precision:.3g}, "
        f"sigma_noise {la.sigma_noise:.3f}"
    )
    weights_before = model.get_weights()

    # 1. Weight draws: one [n, *shape] tensor per weight with a posterior.
    draws = la.sample(n, seed=seed)
    shapes = ", ".join(
        f"{v.path} {tuple(d.shape)}" for v, d in zip(la.variables, draws, strict=True)
    )
    print(f"la.sample({n}): {shapes}")
    manual = outputs_at_draws(model, draws, x_test)

    # 2. Predictive samples [S, N, C]: same seed, same draws.
    samples = {
        kind: la.predictive_samples(x_test, n, pred_type=kind, seed=seed).numpy()
        for kind in ("nn", "glm")
    }
    print(f"la.predictive_samples(x_test, {n}): shape {samples['nn'].shape} for nn and glm")
    for kind, drawn in samples.items():
        again = la.predictive_samples(x_test, n, pred_type=kind, seed=seed).numpy()
        other = la.predictive_samples(x_test, n, pred_type=kind, seed=seed + 1).numpy()
        print(f"{kind} samples, same seed identical: {np.array_equal(drawn, again)}")
        print(f"{kind} samples, other seed different: {not np.allclose(drawn, other)}")

    # 3. Monte Carlo moments against the closed forms.
    glm_mean, glm_variance = (t.numpy() for t in la.predict(x_test, include_noise=False))
    agreement = mc_agreement(samples["glm"], glm_mean, glm_variance)
    print(
        "glm samples vs la.predict(include_noise=False): "
        + ", ".join(f"{k} {v:.3f}" for k, v in agreement.items())
    )
    # Worst of N points, each within 5 Monte Carlo standard errors (false alarm ~1e-4).
    within = agreement["mean z"] < 5 and agreement["variance z"] < 5
    print(f"glm sample mean and variance within MC error: {within}")
    nn_mean, nn_variance = (
        t.numpy() for t in la.predict(x_test, pred_type="nn", n_samples=n, seed=seed)
    )
    same = np.allclose(nn_mean, samples["nn"].mean(0), rtol=1e-5, atol=1e-6) and np.allclose(
        nn_variance - la.sigma_noise**2, samples["nn"].var(0), rtol=1e-4, atol=1e-6
    )
    print(f"la.predict(pred_type='nn') = moments of the nn samples (same seed): {same}")
    ratio = np.median(samples["nn"].var(0) / glm_variance)
    print(f"median functional variance, nn / glm: {ratio:.3f}")
    # la.sample and the nn predictive use different random streams, so compare in law.
    gap = np.abs(manual.mean(0) - samples["nn"].mean(0)) / np.sqrt(
        (manual.var(0) + samples["nn"].var(0)) / n
    )
    print(f"la.sample outputs and nn samples agree in mean: {bool(np.max(gap) < 5)}")

    # 4. Sampling never touches the model.
    unchanged = all(
        np.array_equal(a, b) for a, b in zip(weights_before, model.get_weights(), strict=True)
    )
    print(f"model weights unchanged: {unchanged}")

    # 5. Predictive intervals: output draws plus observation noise, then quantiles.
    rng = np.random.default_rng(seed)
    y_draws = {
        kind: drawn + la.sigma_noise * rng.standard_normal(drawn.shape).astype("float32")
        for kind, drawn in samples.items()
    }
    tail = (1 - LEVEL) / 2
    lower, upper = np.quantile(y_draws["nn"][..., 0], [tail, 1 - tail], axis=0)
    covered = (y_test[:, 0] >= lower) & (y_test[:, 0] <= upper)
    coverage = float(covered.mean())
    rmse_test = float(np.sqrt(np.mean((samples["nn"].mean(0) - y_test) ** 2)))
    print(
        f"{LEVEL:.0%} intervals from nn samples: mean width {np.mean(upper - lower):.3f}, "
        f"test RMSE {rmse_test:.3f}, coverage on {len(y_test)} test patients {coverage:.3f}"
    )
    low, high = COVERAGE_RANGE
    print(
        f"{LEVEL:.0%} interval coverage on test within [{low}, {high}]: {low <= coverage <= high}"
    )

    path = out / "predictive_samples.npz"
    np.savez_compressed(
        path,
        x_test=x_test,
        y_test=y_test,
        nn=samples["nn"],
        glm=samples["glm"],
        y_nn=y_draws["nn"],
        lower=lower,
        upper=upper,
        sigma_noise=la.sigma_noise,
        seed=seed,
    )
    print(f"Wrote {path}")
    point = int(np.argmax(upper - lower))
    path = out / "predictive_sampling.png"
    plot(
        path,
        y_test[:, 0],
        y_draws["nn"][..., 0].mean(0),
        lower,
        upper,
        point,
        {kind: drawn[:, point, 0] for kind, drawn in y_draws.items()},
        float(glm_mean[point, 0]),
        float(np.sqrt(glm_variance[point, 0] + la.sigma_noise**2)),
    )
    print(f"Wrote {path}")


if __name__ == "__main__":
    main()
