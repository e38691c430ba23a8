"""The protocol every posterior structure object follows, and the curvature scaling.

A structure object holds the fitted curvature in its own form (a diagonal, Kronecker
factors, a full matrix) and answers, for a prior precision and a :class:`Scaling`, the
questions the :class:`~laplace_tf.Laplace` core asks: the posterior precision, its
log-determinant, draws, marginal variances, the GLM output covariance, a TFP
distribution, and its state for saving. It knows nothing of data, likelihoods or files.

Notation: the posterior precision is ``H / (sigma^q T) + delta``, with ``H`` the curvature
of the summed NLL (at unit noise for regression, ``q`` = 2, or 4 for the empirical
Fisher; no noise factor otherwise), ``T`` the temperature and ``delta`` the prior
precision (one tensor per selected weight: a scalar or shaped like it, float64).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar, Protocol

import keras
import numpy as np
import tensorflow as tf
import tensorflow_probability as tfp

tfd = tfp.distributions


@dataclass(frozen=True)
class Scaling:
    """``H -> H / sigma^power / T``: the noise rescaling (regression) and the temperature.

    ``sigma`` is ``None`` when the likelihood has no noise; it may be a tensor (being
    optimised) or a float.
    """

    sigma: Any
    power: int
    temperature: float

    def noise(self, curvature: tf.Tensor) -> tf.Tensor:
        """``curvature / sigma^power`` in ``curvature``'s dtype (unchanged without noise)."""
        if self.sigma is None:
            return curvature
        return curvature / as_dtype(self.sigma, curvature.dtype) ** self.power

    def apply(self, curvature: tf.Tensor) -> tf.Tensor:
        """``curvature / sigma^power / T`` in ``curvature``'s dtype."""
        return self.noise(curvature) / self.temperature


@dataclass(frozen=True)
class FitSummary:
    """What a structure's fit reports besides the curvature: summed NLL, counts."""

    nll: float
    n_data: int
    n_outputs: int
    n_rows: int | float | None = None  # weighted examples x positions (None: n_data)


class Structure(Protocol):
    """A fitted curvature in one posterior structure (see the module docstring)."""

    name: ClassVar[str]
    #: Whether a per-weight ("diag") prior precision is defined for this structure.
    per_weight_prior: ClassVar[bool]

    @classmethod
    def fit(
        cls,
        model: keras.Model,
        data: Any,
        *,
        likelihood: Any,
        kind: str,
        variables: list,
        batch_size: int,
        progress: Callable[[int], None] | None,
        seed: int | None,
    ) -> tuple[Structure, FitSummary]:
        """Compute the curvature of ``variables`` over ``data`` in one pass."""

    def merged(self, other: Structure, n_self: float, n_other: float) -> Structure:
        """The curvature of both fits' data (``n_self`` and ``n_other`` weighted examples),
        as one fit on them gives it (``fit(accumulate=True)``)."""

    def precision(self, prior: list[tf.Tensor], scaling: Scaling) -> Any:
        """The posterior precision in the structure's own form."""

    def log_det(self, prior: list[tf.Tensor], scaling: Scaling) -> tf.Tensor:
        """``log det`` of the posterior precision, float64, differentiable in both."""

    def variance(self, prior: list[tf.Tensor], scaling: Scaling) -> list[tf.Tensor]:
        """Marginal posterior variances, shaped like the weights."""

    def sample(
        self, seeds: Sequence[tf.Tensor], shape: list[int], prior: list[tf.Tensor], scaling: Scaling
    ) -> list[tf.Tensor]:
        """Zero-mean posterior draws ``[*shape, *weight.shape]``, one stateless seed each."""

    def glm_moments(
        self,
        model: keras.Model,
        x: Any,
        variables: list,
        prior: list[tf.Tensor],
        scaling: Scaling,
        batch_size: int,
    ) -> tuple[tf.Tensor, tf.Tensor]:
        """Outputs ``f(x)`` and the linearised output covariance per example."""

    def distribution(
        self, mean: list[tf.Tensor], prior: list[tf.Tensor], scaling: Scaling
    ) -> tfd.Distribution:
        """The posterior as a TFP distribution."""

    def state(self) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
        """Arrays and JSON metadata from which :meth:`from_state` rebuilds the object."""

    @classmethod
    def from_state(
        cls, arrays: dict[str, np.ndarray], metadata: dict[str, Any], variables: list
    ) -> Structure:
        """The object :meth:`state` describes, checked against ``variables``."""


def as_dtype(value: Any, dtype: tf.DType) -> tf.Tensor:
    """``value`` in ``dtype``; Python floats are converted directly (no float32 rounding)."""
    if isinstance(value, tf.Tensor | tf.Variable):
        return tf.cast(value, dtype)
    return tf.constant(value, dtype)


def per_weight_prior_refused(structure: str) -> ValueError:
    """The error for a per-weight ("diag") prior precision under ``structure``."""
    return ValueError(
        f"a per-weight ('diag') prior precision is not defined for structure={structure!r}; "
        "use a scalar or one value per layer (prior_structure='scalar' or 'layerwise'), or "
        "structure='diag'."
    )


def flat_mean(mean: list[tf.Tensor]) -> tf.Tensor:
    """The weights flattened row-major and concatenated (the order of the flat structures)."""
    return tf.concat([tf.reshape(m, [-1]) for m in mean], axis=0)
