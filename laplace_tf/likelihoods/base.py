"""The likelihood protocol: every likelihood-specific rule, behind one base class.

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
  ``target_shape_error(shape, count, width)``;
- ``exact_output_hessian``: whether ``S S^T`` is the Hessian of ``l`` in ``f`` itself (then
  the GGN of a piecewise-linear network is its Hessian), or a Fisher standing in for it.

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

from typing import Any, ClassVar

import numpy as np
import tensorflow as tf

from laplace_tf import predictive

#: The names of the built-in likelihoods (:func:`~laplace_tf.likelihoods.get_likelihood`).
LIKELIHOODS = ("classification", "binary", "regression", "multilabel", "heteroscedastic")

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
    exact_output_hessian : bool
        ``True`` when ``hessian_factor`` gives the Hessian of ``l`` in ``f`` (softmax,
        sigmoid, Gaussian with a fixed noise: it does not depend on ``y``); ``False`` when it
        gives the Fisher instead (a heteroscedastic Gaussian), so that ``curvature="hessian"``
        must not be replaced by the GGN on piecewise-linear networks.
    """

    name: str = ""
    noise_exponent: ClassVar[int] = 0
    exact_output_hessian: ClassVar[bool] = True

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


def noise_variance(sigma_noise: Any) -> float:
    """``sigma_noise^2``, or 0 for ``None`` (no noise to include)."""
    return 0.0 if sigma_noise is None else sigma_noise**2


def mean_nll(picked: np.ndarray) -> float:
    """``-mean log p`` of the probabilities the targets pick (clipped at 1e-12)."""
    return float(-np.mean(np.log(np.clip(picked, 1e-12, None))))


def as_targets(y: tf.Tensor, f: tf.Tensor) -> tf.Tensor:
    """Targets cast to ``f``'s dtype and shaped like ``f`` (one value per output)."""
    return tf.reshape(tf.cast(y, f.dtype), tf.shape(f))
