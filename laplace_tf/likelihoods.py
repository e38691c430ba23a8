"""Likelihoods: the loss of a model output, its output-Hessian factor, and pseudo-labels.

For model outputs ``f`` of shape ``[N, C]`` each likelihood gives

- ``nll(f, y)``: the summed negative log-likelihood ``sum_n l(f_n, y_n)``;
- ``hessian_factor(f)``: ``S`` of shape ``[N, C, K]`` with ``S_n S_n^T = Lambda_n``, the
  Hessian of ``l`` with respect to ``f_n`` (it does not depend on ``y`` for these three);
- ``loss_gradient(f, y)``: ``d l(f_n, y_n) / d f_n`` per example, shape ``[N, C]``;
- ``sample(f, seed)``: pseudo-labels ``y~ ~ p(y | f)`` for the Monte Carlo GGN.
"""

from __future__ import annotations

import math

import tensorflow as tf

from laplace_tf._checks import positive_float

LIKELIHOODS = ("classification", "binary", "regression")


class Likelihood:
    """Base class; see the module docstring for the shared conventions."""

    name: str = ""

    def nll(self, f: tf.Tensor, y: tf.Tensor) -> tf.Tensor:
        raise NotImplementedError

    def log_likelihood(self, f: tf.Tensor, y: tf.Tensor) -> tf.Tensor:
        """Summed log-likelihood ``sum_n log p(y_n | f_n)``."""
        return -self.nll(f, y)

    def hessian_factor(self, f: tf.Tensor) -> tf.Tensor:
        raise NotImplementedError

    def loss_gradient(self, f: tf.Tensor, y: tf.Tensor) -> tf.Tensor:
        raise NotImplementedError

    def sample(self, f: tf.Tensor, seed: tf.Tensor) -> tf.Tensor:
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


class Classification(Likelihood):
    """Softmax cross-entropy on logits ``f`` with integer labels in ``[0, C)``.

    ``Lambda = diag(p) - p p^T`` and ``S = diag(sqrt(p)) - p sqrt(p)^T`` (``K = C``).
    """

    name = "classification"

    def nll(self, f, y):
        labels = _as_labels(y)
        return tf.reduce_sum(
            tf.nn.sparse_softmax_cross_entropy_with_logits(labels=labels, logits=f)
        )

    def hessian_factor(self, f):
        p = tf.nn.softmax(f, axis=-1)
        root = tf.sqrt(p)
        return tf.linalg.diag(root) - p[:, :, None] * root[:, None, :]

    def loss_gradient(self, f, y):
        labels = _as_labels(y)
        return tf.nn.softmax(f, axis=-1) - tf.one_hot(labels, tf.shape(f)[-1], dtype=f.dtype)

    def sample(self, f, seed):
        return tf.random.stateless_categorical(tf.cast(f, tf.float32), 1, seed=seed)[:, 0]


class Binary(Likelihood):
    """Sigmoid cross-entropy on one logit per example, labels 0 / 1.

    ``Lambda = p (1 - p)`` and ``S = sqrt(p (1 - p))`` (``K = 1``).
    """

    name = "binary"

    def nll(self, f, y):
        labels = _as_binary(y, f)
        return tf.reduce_sum(tf.nn.sigmoid_cross_entropy_with_logits(labels=labels, logits=f))

    def hessian_factor(self, f):
        p = tf.sigmoid(f)
        return tf.sqrt(p * (1 - p))[:, :, None]

    def loss_gradient(self, f, y):
        return tf.sigmoid(f) - _as_binary(y, f)

    def sample(self, f, seed):
        uniform = tf.random.stateless_uniform(tf.shape(f), seed=seed, dtype=f.dtype)
        return tf.cast(uniform < tf.sigmoid(f), f.dtype)


class Regression(Likelihood):
    """Gaussian likelihood ``N(y | f, sigma_noise^2 I)`` for outputs of any width ``D``.

    ``l = ||y - f||^2 / (2 sigma^2) + D/2 log(2 pi sigma^2)``, ``Lambda = I / sigma^2``,
    ``S = I / sigma`` (``K = D``).
    """

    name = "regression"

    def __init__(self, sigma_noise: float = 1.0):
        self.sigma_noise = positive_float("sigma_noise", sigma_noise)

    def nll(self, f, y):
        y = _as_regression_targets(y, f)
        sigma = tf.constant(self.sigma_noise, f.dtype)
        count = tf.cast(tf.size(f), f.dtype)
        squared = tf.reduce_sum(tf.square(y - f))
        return squared / (2 * sigma**2) + count * tf.math.log(2 * math.pi * sigma**2) / 2

    def hessian_factor(self, f):
        width = tf.shape(f)[-1]
        eye = tf.eye(width, dtype=f.dtype) / tf.constant(self.sigma_noise, f.dtype)
        return tf.broadcast_to(eye, [tf.shape(f)[0], width, width])

    def loss_gradient(self, f, y):
        return (f - _as_regression_targets(y, f)) / tf.constant(self.sigma_noise, f.dtype) ** 2

    def sample(self, f, seed):
        noise = tf.random.stateless_normal(tf.shape(f), seed=seed, dtype=f.dtype)
        return f + tf.constant(self.sigma_noise, f.dtype) * noise

    def __repr__(self) -> str:
        return f"Regression(sigma_noise={self.sigma_noise})"


BUILT_IN = (Classification, Binary, Regression)


def get_likelihood(likelihood: str | Likelihood, *, sigma_noise: float = 1.0) -> Likelihood:
    """Return the likelihood object for a name in :data:`LIKELIHOODS` (or pass one through)."""
    if isinstance(likelihood, Likelihood):
        return likelihood
    if likelihood == "classification":
        return Classification()
    if likelihood == "binary":
        return Binary()
    if likelihood == "regression":
        return Regression(sigma_noise)
    raise ValueError(
        f"Unknown likelihood {likelihood!r}; valid names are {', '.join(LIKELIHOODS)}."
    )


def _as_labels(y: tf.Tensor) -> tf.Tensor:
    """One integer label per example from ``[N]`` or ``[N, 1]`` (any static rank: a step
    traced for both shapes sees a label tensor of unknown rank)."""
    return tf.cast(tf.reshape(y, [-1]), tf.int32)


def _as_binary(y: tf.Tensor, f: tf.Tensor) -> tf.Tensor:
    y = tf.cast(y, f.dtype)
    return tf.reshape(y, tf.shape(f))


def _as_regression_targets(y: tf.Tensor, f: tf.Tensor) -> tf.Tensor:
    y = tf.cast(y, f.dtype)
    return tf.reshape(y, tf.shape(f))
