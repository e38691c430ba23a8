"""Link approximations: from a Gaussian over outputs to predictive probabilities.

Given per-example output means ``f`` (``[N, C]``) and covariances ``Sigma`` (``[N, C, C]``)
of the linearised (GLM) predictive, these approximate ``E[softmax(g)]`` (or
``E[sigmoid(g)]``) for ``g ~ N(f, Sigma)``, following the definitions of
Laplace Redux (Daxberger et al., 2021) used by laplace-torch.
"""

from __future__ import annotations

import math
import warnings

import tensorflow as tf

LINK_APPROXIMATIONS = ("probit", "bridge", "mc")


def probit(mean: tf.Tensor, covariance: tf.Tensor, *, binary: bool = False) -> tf.Tensor:
    """Probit approximation: ``softmax(f / sqrt(1 + pi/8 diag Sigma))`` (sigmoid if binary)."""
    variance = tf.linalg.diag_part(covariance)
    scaled = mean / tf.sqrt(1.0 + math.pi / 8.0 * variance)
    return tf.sigmoid(scaled) if binary else tf.nn.softmax(scaled, axis=-1)


def bridge(mean: tf.Tensor, covariance: tf.Tensor) -> tf.Tensor:
    """Laplace bridge: the mean of the Dirichlet matched to ``N(f, Sigma)``.

    First the zero-mean correction (conditioning on ``sum_k g_k = 0``):
    ``f <- f - Sigma 1 (1^T f) / (1^T Sigma 1)`` and
    ``Sigma <- Sigma - Sigma 1 1^T Sigma / (1^T Sigma 1)``; then
    ``alpha_k = (1 - 2/C + exp(f_k) / C^2 sum_j exp(-f_j)) / Sigma_kk`` and the
    probabilities are ``alpha / sum(alpha)`` (Hobbhahn et al., 2022; as laplace-torch).
    Needs ``C >= 2``.
    """
    row_sums = tf.reduce_sum(covariance, axis=-1)  # Sigma 1
    total = tf.reduce_sum(row_sums, axis=-1, keepdims=True)  # 1^T Sigma 1
    mean = mean - row_sums * tf.reduce_sum(mean, axis=-1, keepdims=True) / total
    covariance = covariance - row_sums[:, :, None] * row_sums[:, None, :] / total[:, :, None]
    classes = tf.cast(tf.shape(mean)[-1], mean.dtype)
    variance = tf.linalg.diag_part(covariance)
    sum_exp = tf.reduce_sum(tf.exp(-mean), axis=-1, keepdims=True)
    alpha = (1.0 - 2.0 / classes + tf.exp(mean) / classes**2 * sum_exp) / variance
    return alpha / tf.reduce_sum(alpha, axis=-1, keepdims=True)


def monte_carlo(
    mean: tf.Tensor,
    covariance: tf.Tensor,
    *,
    n_samples: int,
    seed: tf.Tensor,
    binary: bool = False,
) -> tf.Tensor:
    """``mean_s softmax(g_s)`` with ``g_s ~ N(f, Sigma)`` drawn per example (sigmoid if binary)."""
    samples = gaussian_draws(mean, covariance, n_samples=n_samples, seed=seed)
    link = tf.sigmoid(samples) if binary else tf.nn.softmax(samples, axis=-1)
    return tf.reduce_mean(link, axis=0)


def gaussian_draws(
    mean: tf.Tensor, covariance: tf.Tensor, *, n_samples: int, seed: tf.Tensor
) -> tf.Tensor:
    """``[S, N, C]`` draws ``g_s ~ N(f_n, Sigma_n)`` per example (a jittered Cholesky factor)."""
    width = tf.shape(mean)[-1]
    jitter = tf.eye(width, dtype=mean.dtype) * _jitter(covariance)
    factor = tf.linalg.cholesky(covariance + jitter)  # [N, C, C]
    noise = tf.random.stateless_normal(
        tf.concat([[n_samples], tf.shape(mean)], 0), seed=seed, dtype=mean.dtype
    )
    return mean[None] + tf.einsum("ncd,snd->snc", factor, noise)


def _jitter(covariance: tf.Tensor) -> tf.Tensor:
    """A tiny diagonal shift that keeps the Cholesky factorisation of PSD matrices stable."""
    scale = tf.reduce_max(tf.abs(tf.linalg.diag_part(covariance)))
    eps = tf.constant(1e-10 if covariance.dtype == tf.float64 else 1e-6, covariance.dtype)
    return eps * tf.maximum(scale, 1.0)


_REMEDIES = (
    "Use a larger prior precision (e.g. tuned with optimize_prior_precision on held-out "
    "data) or subset='last_layer'"
)


def warn_non_finite_draws(outputs: tf.Tensor, largest_deviation: float) -> None:
    """Warn when sampled networks (``[S, N, C]`` outputs) gave NaN / Inf.

    In a deep network, weights drawn from a broad posterior scale the activations layer
    after layer (BatchNorm in inference mode does not renormalise them), so draws can
    overflow the float range: their predictive is not defined. ``largest_deviation`` is
    how far the draws go from the MAP weights (a typical or the largest deviation).
    """
    finite = tf.reduce_all(tf.math.is_finite(tf.reshape(outputs, [tf.shape(outputs)[0], -1])), 1)
    bad = int(tf.size(finite)) - int(tf.math.count_nonzero(finite))
    if bad:
        warnings.warn(
            f"The network gave NaN or Inf outputs for {bad} of {int(tf.size(finite))} posterior "
            f"weight draws (pred_type='nn'), so the predictions are not finite. The draws "
            f"overflow {outputs.dtype.name}: they move weights from the MAP by up to about "
            f"{largest_deviation:.3g}, and in a deep network each layer multiplies the "
            f"perturbation. {_REMEDIES}, or pred_type='glm'.",
            RuntimeWarning,
            stacklevel=4,
        )


def warn_non_finite_glm(mean: tf.Tensor, covariance: tf.Tensor) -> None:
    """Warn when the linearised predictive's outputs or covariances hold NaN / Inf."""
    rows = tf.reduce_all(tf.math.is_finite(mean), -1) & tf.reduce_all(
        tf.math.is_finite(tf.reshape(covariance, [tf.shape(covariance)[0], -1])), -1
    )
    bad = int(tf.size(rows)) - int(tf.math.count_nonzero(rows))
    if bad:
        warnings.warn(
            f"The GLM predictive is NaN or Inf for {bad} of {int(tf.size(rows))} examples: "
            f"the network's outputs or its output covariance J Sigma J^T overflow "
            f"{mean.dtype.name}. {_REMEDIES}.",
            RuntimeWarning,
            stacklevel=4,
        )
