"""The Laplace evidence: the tempered MAP log-likelihood and the log marginal likelihood,
from a fit record, its likelihood's noise rules and a prior.

With ``q = likelihood.noise_exponent`` and ``c`` its
:meth:`~laplace_tf.likelihoods.Likelihood.log_normaliser`, the record keeps
``loss = NLL(sigma=1) - c(1)`` and

``log p(D | theta_MAP) = -loss / (sigma^q T) - c(sigma)``,
``log p(D) ~= log p(D | theta_MAP) - 1/2 [log det(H/T + delta) - sum log delta
+ sum delta (theta_MAP - mu_0)^2]``,

as Laplace Redux and laplace-torch define them (for regression ``-SSE / (2 sigma^2 T) -
N D log(sigma sqrt(2 pi))``), in float64 and differentiable in ``delta`` and ``sigma``.
"""

from __future__ import annotations

from typing import Any

import tensorflow as tf

from laplace_tf.likelihoods import Likelihood
from laplace_tf.posterior.record import FitRecord
from laplace_tf.posterior.structure import Scaling, as_dtype


def scaling(likelihood: Likelihood, kind: str, sigma: Any, temperature: float) -> Scaling:
    """The curvature rescaling ``H -> H / sigma^p / T`` with ``p = likelihood.noise_power(kind)``
    (no noise factor when ``p`` is 0)."""
    power = likelihood.noise_power(kind)
    return Scaling(sigma if power else None, power, temperature)


def fitted_loss(likelihood: Likelihood, nll: float, n_entries: float) -> float:
    """What the record keeps of the MAP NLL at unit noise: without its normalising constant
    over ``n_entries`` weighted output entries (for regression half the squared error)."""
    return nll - float(likelihood.log_normaliser(n_entries, 1.0))


def log_likelihood(
    likelihood: Likelihood, record: FitRecord, sigma: Any, temperature: float
) -> tf.Tensor:
    """``-loss / (sigma^q T) - c(sigma)``, float64 (``sigma`` is ignored when ``q`` is 0)."""
    loss = tf.constant(record.loss, tf.float64)
    exponent = likelihood.noise_exponent
    if not exponent:
        return -loss / temperature - likelihood.log_normaliser(record.n_entries, 1.0)
    sigma = as_dtype(sigma, tf.float64)
    count = record.n_entries
    return -loss / (sigma**exponent * temperature) - likelihood.log_normaliser(count, sigma)


def log_marginal_likelihood(
    record: FitRecord,
    prior: list[tf.Tensor],
    prior_mean: list[tf.Tensor],
    scale: Scaling,
    log_lik: tf.Tensor,
) -> tf.Tensor:
    """``log_lik - 1/2 [log det(H/T + delta) - sum log delta + sum delta (theta - mu_0)^2]``
    over the record's weights, with ``prior`` one float64 tensor per weight."""
    log_det = record.structure.log_det(prior, scale)
    prior_log_det, scatter = 0.0, 0.0
    for p, theta, mu in zip(prior, record.mean, prior_mean, strict=True):
        p = tf.broadcast_to(tf.cast(p, tf.float64), theta.shape)
        prior_log_det += tf.reduce_sum(tf.math.log(p))
        scatter += tf.reduce_sum(p * tf.square(tf.cast(theta - mu, tf.float64)))
    return log_lik - 0.5 * (log_det - prior_log_det + scatter)
