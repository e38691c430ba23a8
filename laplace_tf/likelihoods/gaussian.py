"""Gaussian likelihoods: a fixed observation noise (:class:`Regression`, the noise a setting
of the posterior) and a predicted one (:class:`Heteroscedastic`, the model outputs a mean
and a log-variance)."""

from __future__ import annotations

import copy
import math
from typing import Any

import numpy as np
import tensorflow as tf

from laplace_tf._checks import positive_float
from laplace_tf.likelihoods.base import Likelihood, as_targets, noise_variance


class Regression(Likelihood):
    """Gaussian likelihood ``N(y | f, sigma_noise^2 I)`` for outputs of any width ``D``.

    ``l = ||y - f||^2 / (2 sigma^2) + D/2 log(2 pi sigma^2)``, ``Lambda = I / sigma^2``,
    ``S = I / sigma`` (``K = D``); ``noise_exponent = 2``. The predictive is Gaussian:
    ``(mean, variance)`` with the functional variance plus ``sigma^2`` (every
    ``link_approx`` gives the same moments).
    """

    name = "regression"
    noise_exponent = 2

    def __init__(self, sigma_noise: float = 1.0):
        self.sigma_noise = positive_float("sigma_noise", sigma_noise)

    def nll(self, f, y):
        return tf.reduce_sum(self.nll_rows(f, y))

    def nll_rows(self, f, y):
        y = as_targets(y, f)
        sigma = tf.constant(self.sigma_noise, f.dtype)
        width = tf.cast(tf.shape(f)[-1], f.dtype)
        squared = tf.reduce_sum(tf.square(y - f), axis=-1)
        return squared / (2 * sigma**2) + width * tf.math.log(2 * math.pi * sigma**2) / 2

    def hessian_factor(self, f):
        width = tf.shape(f)[-1]
        eye = tf.eye(width, dtype=f.dtype) / tf.constant(self.sigma_noise, f.dtype)
        return tf.broadcast_to(eye, [tf.shape(f)[0], width, width])

    def loss_gradient(self, f, y):
        return (f - as_targets(y, f)) / tf.constant(self.sigma_noise, f.dtype) ** 2

    def sample(self, f, seed):
        noise = tf.random.stateless_normal(tf.shape(f), seed=seed, dtype=f.dtype)
        return f + tf.constant(self.sigma_noise, f.dtype) * noise

    def link(self, f):
        return f

    def unit_noise(self):
        if self.sigma_noise == 1.0:
            return self
        unit = copy.copy(self)
        unit.sigma_noise = 1.0
        return unit

    def log_normaliser(self, count, sigma):
        if isinstance(sigma, tf.Tensor | tf.Variable):
            sigma = tf.cast(sigma, tf.float64)
        else:
            sigma = tf.constant(sigma, tf.float64)
        return count * tf.math.log(sigma * math.sqrt(2 * math.pi))

    def glm_predictive(self, mean, covariance, *, link_approx, n_samples, seed, sigma_noise):
        return mean, tf.linalg.diag_part(covariance) + noise_variance(sigma_noise)

    def nn_predictive(self, outputs, sigma_noise):
        variance = tf.math.reduce_variance(outputs, axis=0) + noise_variance(sigma_noise)
        return tf.reduce_mean(outputs, axis=0), variance

    def predictive_nll(self, predictions, y):
        return gaussian_predictive_nll(predictions, y)

    def target_shape_error(self, shape, count, width):
        if shape == (count, width) or (width == 1 and shape == (count,)):
            return None
        return f"[{count}, {width}]" + (f" or [{count}]" if width == 1 else "")

    def __repr__(self) -> str:
        return f"Regression(sigma_noise={self.sigma_noise})"


class Heteroscedastic(Likelihood):
    """Gaussian ``N(y | mu, diag(exp(s)))`` whose mean and log-variance are both outputs:
    ``f = [mu, s]`` of width ``2 D`` (the ``D`` means, then the ``D`` log-variances), targets
    ``[N, D]``.

    ``l = sum_d (log(2 pi) + s_d + (y_d - mu_d)^2 exp(-s_d)) / 2``. Its Hessian in ``f``
    depends on ``y`` and can be indefinite, so ``S`` factors the Fisher of the
    ``(mu, s)`` parameterisation instead, ``E_y[Lambda] = diag(exp(-s), 1/2)``:
    ``S = diag(exp(-s / 2), 1 / sqrt(2))`` (``K = 2 D``; ``exact_output_hessian`` is
    ``False``). The loss gradient is ``[(mu - y) exp(-s), (1 - (y - mu)^2 exp(-s)) / 2]``.

    The noise is predicted, so the posterior's ``sigma_noise`` does not apply
    (``noise_exponent = 0``). The predictive is Gaussian, ``(mean, variance)`` ``[N, D]``:
    GLM, the functional variance of the mean outputs plus ``exp(s)`` at the MAP (every
    ``link_approx`` gives the same moments); NN, the law of total variance over the weight
    draws, ``Var_s[mu] + E_s[exp(s)]``. The predicted noise is always included.
    """

    name = "heteroscedastic"
    exact_output_hessian = False

    def nll(self, f, y):
        return tf.reduce_sum(self.nll_rows(f, y))

    def nll_rows(self, f, y):
        mean, log_variance = _split(f)
        y = as_targets(y, mean)
        squared = tf.square(y - mean) * tf.exp(-log_variance)
        terms = tf.constant(math.log(2 * math.pi), f.dtype) + log_variance + squared
        return tf.reduce_sum(terms, axis=-1) / 2

    def hessian_factor(self, f):
        _, log_variance = _split(f)
        half = tf.fill(tf.shape(log_variance), tf.constant(math.sqrt(0.5), f.dtype))
        return tf.linalg.diag(tf.concat([tf.exp(-log_variance / 2), half], axis=-1))

    def loss_gradient(self, f, y):
        mean, log_variance = _split(f)
        precision = tf.exp(-log_variance)
        residual = mean - as_targets(y, mean)
        return tf.concat([residual * precision, (1 - tf.square(residual) * precision) / 2], -1)

    def sample(self, f, seed):
        mean, log_variance = _split(f)
        noise = tf.random.stateless_normal(tf.shape(mean), seed=seed, dtype=f.dtype)
        return mean + tf.exp(log_variance / 2) * noise

    def link(self, f):
        return _split(f)[0]

    def glm_predictive(self, mean, covariance, *, link_approx, n_samples, seed, sigma_noise):
        mu, log_variance = _split(mean)
        width = tf.shape(mu)[-1]
        functional = tf.linalg.diag_part(covariance)[..., :width]
        return mu, functional + tf.exp(log_variance)

    def nn_predictive(self, outputs, sigma_noise):
        means, log_variances = _split(outputs)
        noise = tf.reduce_mean(tf.exp(log_variances), axis=0)
        return tf.reduce_mean(means, axis=0), tf.math.reduce_variance(means, axis=0) + noise

    def predictive_nll(self, predictions, y):
        return gaussian_predictive_nll(predictions, y)

    def target_shape_error(self, shape, count, width):
        if width % 2:
            return (
                f"a model with an even number of outputs (D means, then D log-variances) and "
                f"targets [{count}, D]; this model has {width}"
            )
        half = width // 2
        if shape == (count, half) or (half == 1 and shape == (count,)):
            return None
        return f"[{count}, {half}]" + (f" or [{count}]" if half == 1 else "")


def gaussian_predictive_nll(predictions: Any, y: Any) -> float:
    """Mean over examples of the Gaussian negative log density of ``y`` under
    ``predictions = (mean, variance)``, summed over the outputs."""
    mean, variance = (np.asarray(a, dtype=float) for a in predictions)
    y = np.asarray(y, dtype=float).reshape(mean.shape)
    terms = 0.5 * np.log(2 * np.pi * variance) + 0.5 * (y - mean) ** 2 / variance
    return float(np.mean(np.sum(terms, axis=-1)))


def _split(f: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
    """The means and the log-variances: the first and the last half of the last axis."""
    return tuple(tf.split(f, 2, axis=-1))
