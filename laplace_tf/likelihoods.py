"""Likelihoods: every likelihood-specific rule, behind one protocol.

A :class:`Likelihood` object is what the curvature engine and the
:class:`~laplace_tf.Laplace` core ask about the likelihood; neither switches on its name,
so a user's subclass goes everywhere a built-in one goes. For model outputs ``f`` of shape
``[N, C]`` it gives

- ``nll(f, y)``: the summed negative log-likelihood ``sum_n l(f_n, y_n)`` (every use), and
  ``nll_rows(f, y)``: the ``[N]`` terms ``l(f_n, y_n)`` (weighted examples, masked
  positions; the default evaluates ``nll`` row by row);
- ``hessian_factor(f)``: ``S`` of shape ``[N, C, K]`` with ``S_n S_n^T = Lambda_n``, the
  Hessian of ``l`` with respect to ``f_n`` (``curvature="ggn"``);
- ``loss_gradient(f, y)``: ``d l(f_n, y_n) / d f_n`` per example, shape ``[N, C]``
  (``"ef"`` and ``"ggn_mc"``);
- ``sample(f, seed)``: pseudo-labels ``y~ ~ p(y | f)`` (``"ggn_mc"``);
- ``link(f)``: the mean of ``y`` given ``f`` (softmax, sigmoid, identity), and from it the
  predictive rules ``glm_predictive``, ``nn_predictive`` and ``predictive_nll``;
- the observation noise: ``noise_exponent`` ``q`` (``l = e(f, y) / sigma^q + c(sigma)``,
  0 without noise), ``noise_power(kind)``, ``unit_noise()`` and ``log_normaliser``;
- the target checks: ``label_range(n_outputs)``, ``invalid_targets(y, n_outputs)`` (which
  rows hold an invalid target) with ``targets_description(n_outputs)``, and
  ``target_shape_error(shape, count, width)``.

The engine hands every method rows: outputs with positions (``[N, T, C]`` per-token,
``[N, H, W, C]`` per-pixel) are folded to ``[N * T, C]`` and their targets alike, so a
likelihood is written for ``[N, C]`` outputs only.

Required of a subclass: ``nll`` and ``link``, and the methods its curvature kind reads
(:data:`REQUIRED`); the other rules have defaults (no noise, real-valued targets of any
trailing shape, a Monte Carlo GLM predictive). :func:`check_protocol` says what is
missing. A likelihood with noise (``noise_exponent > 0``) is written at ``sigma = 1``,
or returns that version from ``unit_noise()``: the ``Laplace`` core owns ``sigma_noise``,
fits at unit noise and rescales the curvature by ``sigma^-noise_power(kind)``.
"""

from __future__ import annotations

import copy
import math
from typing import Any, ClassVar

import numpy as np
import tensorflow as tf

from laplace_tf import predictive
from laplace_tf._checks import positive_float

LIKELIHOODS = ("classification", "binary", "regression")

#: The methods a likelihood must define (beyond the base class) for each use.
REQUIRED = {
    "always": ("nll", "link"),
    "ggn": ("hessian_factor",),
    "ggn_mc": ("sample", "loss_gradient"),
    "ef": ("loss_gradient",),
    "hessian": (),
}


class Likelihood:
    """Base class of every likelihood; see the module docstring for the protocol.

    Attributes
    ----------
    name : str
        A short name used in messages.
    noise_exponent : int
        ``q`` in ``l(f, y) = e(f, y) / sigma^q + c(sigma)`` for a likelihood with an
        observation noise ``sigma`` (2 for a Gaussian); 0 for one without noise.
    """

    name: str = ""
    noise_exponent: ClassVar[int] = 0

    def nll(self, f: tf.Tensor, y: tf.Tensor) -> tf.Tensor:
        """Summed negative log-likelihood ``sum_n l(f_n, y_n)`` (a scalar in ``f``'s dtype)."""
        raise _missing(self, "nll")

    def nll_rows(self, f: tf.Tensor, y: tf.Tensor) -> tf.Tensor:
        """``[N]``: the negative log-likelihood of each example, ``l(f_n, y_n)``. The default
        evaluates :meth:`nll` on each row (vectorised); built-ins compute it directly."""
        return tf.vectorized_map(lambda row: self.nll(row[0][None], row[1][None]), (f, y))

    def log_likelihood(self, f: tf.Tensor, y: tf.Tensor) -> tf.Tensor:
        """Summed log-likelihood ``sum_n log p(y_n | f_n)``."""
        return -self.nll(f, y)

    def hessian_factor(self, f: tf.Tensor) -> tf.Tensor:
        """``S`` ``[N, C, K]`` with ``S_n S_n^T`` the Hessian of ``l`` in ``f_n``."""
        raise _missing(self, "hessian_factor")

    def loss_gradient(self, f: tf.Tensor, y: tf.Tensor) -> tf.Tensor:
        """``d l(f_n, y_n) / d f_n`` per example, ``[N, C]``."""
        raise _missing(self, "loss_gradient")

    def sample(self, f: tf.Tensor, seed: tf.Tensor) -> tf.Tensor:
        """Pseudo-labels ``y~ ~ p(y | f)``, shaped like the targets ``loss_gradient`` reads."""
        raise _missing(self, "sample")

    def link(self, f: tf.Tensor) -> tf.Tensor:
        """``E[y | f]`` per example: probabilities for a classifier, the mean otherwise."""
        raise _missing(self, "link")

    # -- observation noise -------------------------------------------------------------------

    def noise_power(self, kind: str) -> int:
        """``p``: the curvature of ``kind`` at noise ``sigma`` is the unit-noise one over
        ``sigma^p``. The Hessian, GGN and Monte Carlo GGN of ``e / sigma^q`` scale as
        ``sigma^-q``; the empirical Fisher (squared gradients) as ``sigma^-2q``."""
        return 2 * self.noise_exponent if kind == "ef" else self.noise_exponent

    def unit_noise(self) -> Likelihood:
        """This likelihood at ``sigma = 1``, the one the curvature is fitted with (the
        default: ``self``, i.e. the likelihood is written at unit noise or has none)."""
        return self

    def log_normaliser(self, count: int, sigma: Any) -> tf.Tensor:
        """``sum_n c(sigma)``: the part of the summed NLL that does not depend on ``f``, over
        ``count`` output entries, float64 (0 without noise; ``sigma`` may be a tensor)."""
        return tf.constant(0.0, tf.float64)

    # -- predictive --------------------------------------------------------------------------

    def glm_predictive(
        self,
        mean: tf.Tensor,
        covariance: tf.Tensor,
        *,
        link_approx: str,
        n_samples: int,
        seed: Any,
        sigma_noise: Any,
    ) -> Any:
        """The predictive of outputs ``N(mean, covariance)`` per example (``[N, C]``,
        ``[N, C, C]``); ``sigma_noise`` is the noise to include (``None``: none). The
        default supports ``link_approx="mc"``: the mean of ``link`` over ``n_samples``
        Gaussian draws."""
        if link_approx != "mc":
            name = self.name or type(self).__name__
            raise ValueError(
                f"link_approx={link_approx!r} is not defined for the {name} likelihood; "
                "use link_approx='mc'."
            )
        draws = predictive.gaussian_draws(mean, covariance, n_samples=n_samples, seed=seed)
        return tf.reduce_mean(self.link(draws), axis=0)

    def nn_predictive(self, outputs: tf.Tensor, sigma_noise: Any) -> Any:
        """The predictive from network outputs ``[S, N, C]`` at ``S`` weight draws: the mean
        of ``link`` over the draws (``sigma_noise`` as in :meth:`glm_predictive`)."""
        return tf.reduce_mean(self.link(outputs), axis=0)

    def predictive_nll(self, predictions: Any, y: Any) -> float:
        """Mean negative log predictive density of ``y`` (the default grid-search metric)."""
        raise NotImplementedError(
            f"{type(self).__name__} defines no predictive_nll; pass metric= to the grid search."
        )

    # -- targets -----------------------------------------------------------------------------

    def label_range(self, n_outputs: int) -> tuple[int, int] | None:
        """``(low, high)`` when targets are integer labels in ``[low, high)``; ``None`` for
        real-valued targets (the default)."""
        return None

    def target_shape_error(self, shape: tuple, count: int, width: int) -> str | None:
        """``None`` when targets of ``shape`` fit ``count`` examples of ``width`` outputs,
        otherwise the expected shape in words. The default: any ``[count, ...]``."""
        return None if shape and shape[0] == count else f"[{count}, ...]"

    def invalid_targets(self, y: tf.Tensor, n_outputs: int) -> tf.Tensor | None:
        """Bool ``[N]``: which examples' targets are not valid values (``y`` already has a
        shape :meth:`target_shape_error` accepts); ``None`` when every finite value is valid.
        The default: from :meth:`label_range`, labels that are not integers in it."""
        valid = self.label_range(n_outputs)
        if valid is None:
            return None
        labels = tf.reshape(tf.cast(y, tf.float64), [tf.shape(y)[0], -1])
        bad = (labels != tf.round(labels)) | (labels < valid[0]) | (labels >= valid[1])
        return tf.reduce_any(bad, axis=-1)

    def targets_description(self, n_outputs: int) -> str:
        """What :meth:`invalid_targets` accepts, in words (for its error message)."""
        valid = self.label_range(n_outputs)
        if valid == (0, 2):
            return "labels 0 or 1"
        return (
            "any finite values" if valid is None else f"integer labels in [{valid[0]}, {valid[1]})"
        )

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


def check_protocol(likelihood: Any, kind: str | None = None) -> Likelihood:
    """``likelihood`` if it is a :class:`Likelihood` that defines what every use needs and
    what curvature ``kind`` (if given) reads; a ``TypeError`` naming what is missing otherwise.
    """
    if not isinstance(likelihood, Likelihood):
        raise TypeError(
            f"likelihood must be one of {', '.join(LIKELIHOODS)} or an instance of a "
            f"laplace_tf.likelihoods.Likelihood subclass; got {likelihood!r} "
            f"({type(likelihood).__name__})."
        )
    needed = REQUIRED["always"] + (REQUIRED.get(kind, ()) if kind is not None else ())
    missing = [
        name for name in needed if getattr(type(likelihood), name) is getattr(Likelihood, name)
    ]
    if missing:
        by_kind = set(missing) - set(REQUIRED["always"])
        use = f" with curvature={kind!r}" if by_kind else ""
        raise TypeError(
            f"{type(likelihood).__name__} does not define {', '.join(missing)}, which the "
            f"Laplace posterior{use} needs; see laplace_tf.likelihoods.Likelihood."
        )
    return likelihood


def _missing(likelihood: Likelihood, method: str) -> NotImplementedError:
    return NotImplementedError(
        f"{type(likelihood).__name__} does not define {method}; see "
        "laplace_tf.likelihoods.Likelihood for the protocol."
    )


class _Categorical(Likelihood):
    """Rules shared by the two classifiers: integer labels, one per example."""

    def target_shape_error(self, shape, count, width):
        if shape in ((count,), (count, 1)):
            return None
        return f"[{count}] or [{count}, 1] (one label per example)"


class Classification(_Categorical):
    """Softmax cross-entropy on logits ``f`` with integer labels in ``[0, C)``.

    ``Lambda = diag(p) - p p^T`` and ``S = diag(sqrt(p)) - p sqrt(p)^T`` (``K = C``).
    Predictive links: probit, bridge and Monte Carlo over the softmax.
    """

    name = "classification"

    def nll(self, f, y):
        return tf.reduce_sum(self.nll_rows(f, y))

    def nll_rows(self, f, y):
        labels = _as_labels(y)
        return tf.nn.sparse_softmax_cross_entropy_with_logits(labels=labels, logits=f)

    def hessian_factor(self, f):
        p = tf.nn.softmax(f, axis=-1)
        root = tf.sqrt(p)
        return tf.linalg.diag(root) - p[:, :, None] * root[:, None, :]

    def loss_gradient(self, f, y):
        labels = _as_labels(y)
        return tf.nn.softmax(f, axis=-1) - tf.one_hot(labels, tf.shape(f)[-1], dtype=f.dtype)

    def sample(self, f, seed):
        return tf.random.stateless_categorical(tf.cast(f, tf.float32), 1, seed=seed)[:, 0]

    def link(self, f):
        return tf.nn.softmax(f, axis=-1)

    def glm_predictive(self, mean, covariance, *, link_approx, n_samples, seed, sigma_noise):
        if link_approx == "probit":
            return predictive.probit(mean, covariance)
        if link_approx == "bridge":
            return predictive.bridge(mean, covariance)
        return super().glm_predictive(
            mean,
            covariance,
            link_approx=link_approx,
            n_samples=n_samples,
            seed=seed,
            sigma_noise=sigma_noise,
        )

    def predictive_nll(self, predictions, y):
        probs = np.asarray(predictions, dtype=float)
        y = np.asarray(y).reshape(-1)
        return _mean_nll(probs[np.arange(len(y)), y.astype(int)])

    def label_range(self, n_outputs):
        return (0, n_outputs)


class Binary(_Categorical):
    """Sigmoid cross-entropy on one logit per example, labels 0 / 1.

    ``Lambda = p (1 - p)`` and ``S = sqrt(p (1 - p))`` (``K = 1``). Predictive links:
    probit and Monte Carlo over the sigmoid (the bridge needs two or more classes).
    """

    name = "binary"

    def nll(self, f, y):
        return tf.reduce_sum(self.nll_rows(f, y))

    def nll_rows(self, f, y):
        labels = _as_binary(y, f)
        return tf.reduce_sum(tf.nn.sigmoid_cross_entropy_with_logits(labels=labels, logits=f), -1)

    def hessian_factor(self, f):
        p = tf.sigmoid(f)
        return tf.sqrt(p * (1 - p))[:, :, None]

    def loss_gradient(self, f, y):
        return tf.sigmoid(f) - _as_binary(y, f)

    def sample(self, f, seed):
        uniform = tf.random.stateless_uniform(tf.shape(f), seed=seed, dtype=f.dtype)
        return tf.cast(uniform < tf.sigmoid(f), f.dtype)

    def link(self, f):
        return tf.sigmoid(f)

    def glm_predictive(self, mean, covariance, *, link_approx, n_samples, seed, sigma_noise):
        if link_approx == "probit":
            return predictive.probit(mean, covariance, binary=True)
        if link_approx == "bridge":
            raise ValueError("link_approx='bridge' needs two or more classes; use probit or mc.")
        return super().glm_predictive(
            mean,
            covariance,
            link_approx=link_approx,
            n_samples=n_samples,
            seed=seed,
            sigma_noise=sigma_noise,
        )

    def predictive_nll(self, predictions, y):
        p = np.asarray(predictions, dtype=float).reshape(-1)
        y = np.asarray(y).reshape(-1)
        return _mean_nll(np.where(y == 1, p, 1 - p))

    def label_range(self, n_outputs):
        return (0, 2)


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
        y = _as_regression_targets(y, f)
        sigma = tf.constant(self.sigma_noise, f.dtype)
        width = tf.cast(tf.shape(f)[-1], f.dtype)
        squared = tf.reduce_sum(tf.square(y - f), axis=-1)
        return squared / (2 * sigma**2) + width * tf.math.log(2 * math.pi * sigma**2) / 2

    def hessian_factor(self, f):
        width = tf.shape(f)[-1]
        eye = tf.eye(width, dtype=f.dtype) / tf.constant(self.sigma_noise, f.dtype)
        return tf.broadcast_to(eye, [tf.shape(f)[0], width, width])

    def loss_gradient(self, f, y):
        return (f - _as_regression_targets(y, f)) / tf.constant(self.sigma_noise, f.dtype) ** 2

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
        return mean, tf.linalg.diag_part(covariance) + _noise_variance(sigma_noise)

    def nn_predictive(self, outputs, sigma_noise):
        variance = tf.math.reduce_variance(outputs, axis=0) + _noise_variance(sigma_noise)
        return tf.reduce_mean(outputs, axis=0), variance

    def predictive_nll(self, predictions, y):
        mean, variance = (np.asarray(a, dtype=float) for a in predictions)
        y = np.asarray(y, dtype=float).reshape(mean.shape)
        terms = 0.5 * np.log(2 * np.pi * variance) + 0.5 * (y - mean) ** 2 / variance
        return float(np.mean(np.sum(terms, axis=-1)))

    def target_shape_error(self, shape, count, width):
        if shape == (count, width) or (width == 1 and shape == (count,)):
            return None
        return f"[{count}, {width}]" + (f" or [{count}]" if width == 1 else "")

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


def _noise_variance(sigma_noise: Any) -> float:
    return 0.0 if sigma_noise is None else sigma_noise**2


def _mean_nll(picked: np.ndarray) -> float:
    return float(-np.mean(np.log(np.clip(picked, 1e-12, None))))


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
