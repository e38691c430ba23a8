"""Prior-precision tuning for :class:`~laplace_tf.Laplace` (every structure).

``optimize_marglik`` maximises the Laplace log marginal likelihood by L-BFGS-B over the
log prior precision (and the log noise); ``gridsearch`` picks the scalar prior precision
with the best validation metric. Both change only the Laplace object, never the model,
and use its public methods only (``log_marginal_likelihood``, ``predict``, the
``prior_precision`` and ``sigma_noise`` setters). :func:`optimize` checks the arguments
of :meth:`Laplace.optimize_prior_precision` and dispatches.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import tensorflow as tf
from scipy.optimize import minimize

from laplace_tf._checks import resolve_seed
from laplace_tf.likelihoods import Likelihood, get_likelihood
from laplace_tf.posterior.prior import PRIOR_STRUCTURES, PriorPrecision
from laplace_tf.posterior.structure import per_weight_prior_refused

if TYPE_CHECKING:
    from laplace_tf.posterior.core import Laplace

METHODS = ("marglik", "gridsearch")


def optimize(
    la: Laplace,
    method: str,
    *,
    prior_structure: str,
    val_data: tuple | None,
    grid: Sequence[float] | None,
    metric: Callable[[Any, Any], float] | None,
    optimize_sigma_noise: bool,
    pred_type: str,
    link_approx: str,
    seed: int | None,
) -> None:
    """:meth:`Laplace.optimize_prior_precision`: check the arguments, then tune."""
    _ = la.record  # unfitted or stale: raise before anything else
    if prior_structure not in PRIOR_STRUCTURES:
        raise ValueError(
            f"Unknown prior_structure {prior_structure!r}; valid: {', '.join(PRIOR_STRUCTURES)}."
        )
    if method == "marglik":
        if prior_structure == "diag" and not la.structure_class.per_weight_prior:
            raise per_weight_prior_refused(la.structure)
        if optimize_sigma_noise and not la.likelihood_object.noise_exponent:
            raise ValueError(
                "optimize_sigma_noise applies to a likelihood with observation noise (the "
                f"regression likelihood) only, not to {la.likelihood_name!r}."
            )
        optimize_marglik(la, prior_structure, optimize_sigma_noise)
    elif method == "gridsearch":
        if prior_structure != "scalar":
            raise ValueError("gridsearch tunes a scalar prior precision only.")
        if val_data is None:
            raise ValueError("gridsearch needs val_data=(x_val, y_val).")
        gridsearch(la, val_data, grid, metric, pred_type, link_approx, resolve_seed(seed))
    else:
        raise ValueError(f"Unknown method {method!r}; valid methods are {', '.join(METHODS)}.")


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
    metric = metric or la.likelihood_object.predictive_nll
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


def predictive_nll(likelihood: str | Likelihood, predictions: Any, y: Any) -> float:
    """Mean negative log predictive density of ``y`` under ``likelihood`` (a name or
    object): :meth:`Likelihood.predictive_nll`."""
    return get_likelihood(likelihood).predictive_nll(predictions, y)
