"""Prior-precision tuning for :class:`~laplace_tf.Laplace` (every structure).

``optimize_marglik`` maximises the Laplace log marginal likelihood by L-BFGS-B over the
log prior precision (and the log noise); ``gridsearch`` picks the scalar prior precision
with the best validation metric. Both change only the Laplace object, never the model.
"""

from __future__ import annotations

import math
import warnings
from functools import partial
from typing import TYPE_CHECKING, Any

import numpy as np
import tensorflow as tf
from scipy.optimize import minimize

from laplace_tf.prior import PriorPrecision

if TYPE_CHECKING:
    from laplace_tf.posterior import Laplace


def optimize_marglik(la: Laplace, structure: str, with_noise: bool) -> None:
    """Maximise ``la``'s log marginal likelihood over its log prior precision (and noise)."""
    log_prior = PriorPrecision.initial_log(la.prior, structure, la.groups)
    sizes = [int(np.size(p)) for p in log_prior]
    start = np.concatenate([np.ravel(p) for p in log_prior])
    if with_noise:
        start = np.append(start, math.log(la.sigma_noise))

    def unpack(flat: tf.Tensor):
        parts = tf.split(flat[: sum(sizes)], sizes)
        prior = PriorPrecision.from_log(parts, log_prior, structure)
        sigma = tf.exp(flat[-1]) if with_noise else None
        return prior, sigma

    # Per example: the summed log evidence has gradients in the hundreds or thousands at a
    # poor start, and L-BFGS-B's first step on a bounded problem is the full (unscaled)
    # Cauchy step, which would land on the bounds where the evidence overflows.
    scale = 1.0 / max(la.n_data, 1)

    def objective(flat: np.ndarray):
        flat = tf.constant(flat, tf.float64)
        with tf.GradientTape() as tape:
            tape.watch(flat)
            prior, sigma = unpack(flat)
            value = -scale * la.log_marginal_likelihood(prior, sigma)
        value, gradient = float(value), tape.gradient(value, flat).numpy()
        if not (math.isfinite(value) and np.all(np.isfinite(gradient))):
            # Far outside the useful range: a large finite value sends the line search back.
            return 1e100, np.zeros_like(gradient)
        return value, gradient

    bounds = [(-25.0, 25.0)] * len(start)
    result = minimize(
        objective,
        start,
        jac=True,
        method="L-BFGS-B",
        bounds=bounds,
        options={"ftol": 1e-13, "gtol": 1e-9},
    )
    # L-BFGS-B can report success at a point it never left (a failed first line search);
    # the projected gradient tells whether the result is a stationary point.
    if _projected_gradient_norm(result.jac, result.x, bounds) > 1e-4:
        warnings.warn(
            f"Marginal-likelihood optimisation did not converge ({result.message}); "
            "the prior precision may be far from the optimum. Try another starting "
            "prior_precision or sigma_noise, or method='gridsearch'.",
            RuntimeWarning,
            stacklevel=3,
        )
    prior, sigma = unpack(tf.constant(result.x, tf.float64))
    la.prior_precision = PriorPrecision.to_value(prior, structure)
    if with_noise:
        la.sigma_noise = float(sigma)


def _projected_gradient_norm(gradient: np.ndarray, x: np.ndarray, bounds: list) -> float:
    """Largest gradient component that could still lower the objective within the box."""
    lower, upper = (np.array(b, dtype=float) for b in zip(*bounds, strict=True))
    gradient = np.where((x <= lower) & (gradient > 0), 0.0, gradient)
    gradient = np.where((x >= upper) & (gradient < 0), 0.0, gradient)
    return float(np.max(np.abs(gradient), initial=0.0))


def gridsearch(
    la: Laplace, val_data, grid, metric, pred_type: str, link_approx: str, seed: int
) -> None:
    """Set ``la``'s scalar prior precision to the grid value with the best validation metric."""
    x_val, y_val = val_data
    grid = np.logspace(-4, 4, 21) if grid is None else np.asarray(grid, dtype=float)
    if grid.ndim != 1 or grid.size == 0 or np.any(~np.isfinite(grid)) or np.any(grid <= 0):
        raise ValueError("grid must be a non-empty 1-D sequence of positive finite values.")
    metric = metric or partial(predictive_nll, la.likelihood_name)
    original = la.prior_precision
    scores = []
    try:
        with warnings.catch_warnings():
            # a grid value whose predictive overflows scores NaN and is passed over below
            warnings.filterwarnings("ignore", "The (network|GLM predictive)", RuntimeWarning)
            for value in grid:
                la.prior_precision = float(value)
                predictions = la.predict(
                    x_val, pred_type=pred_type, link_approx=link_approx, seed=seed
                )
                scores.append(float(metric(predictions, y_val)))
    finally:
        la.prior_precision = original
    scores = np.asarray(scores)
    if not np.any(np.isfinite(scores)):
        raise ValueError("every grid value gave a non-finite metric.")
    best = int(np.nanargmin(np.where(np.isfinite(scores), scores, np.nan)))
    la.prior_precision = float(grid[best])
    la.gridsearch_scores_ = dict(zip(grid.tolist(), scores.tolist(), strict=True))


def predictive_nll(likelihood: str, predictions: Any, y: Any) -> float:
    """Mean negative log predictive density of ``y``."""
    if likelihood == "regression":
        mean, variance = (np.asarray(a, dtype=float) for a in predictions)
        y = np.asarray(y, dtype=float).reshape(mean.shape)
        return float(
            np.mean(
                np.sum(
                    0.5 * np.log(2 * np.pi * variance) + 0.5 * (y - mean) ** 2 / variance,
                    axis=-1,
                )
            )
        )
    probs = np.asarray(predictions, dtype=float)
    y = np.asarray(y).reshape(-1)
    if likelihood == "binary":
        p = probs.reshape(-1)
        picked = np.where(y == 1, p, 1 - p)
    else:
        picked = probs[np.arange(len(y)), y.astype(int)]
    return float(-np.mean(np.log(np.clip(picked, 1e-12, None))))
