"""The diagonal structure: ``N(theta_MAP, diag(1 / (h / (sigma^q T) + delta)))``."""

from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import keras
import numpy as np
import tensorflow as tf
import tensorflow_probability as tfp

from laplace_tf.curvature.structured import (
    _covariance_step,
    _model_variables,
    fit_diagonal,
    glm_moments,
)
from laplace_tf.posterior.structure import FitSummary, Scaling

tfd = tfp.distributions


@dataclass(frozen=True)
class Diagonal:
    """The curvature diagonal ``h`` of the selected weights, one tensor per weight."""

    curvature: tuple[tf.Tensor, ...]
    per_weight_prior: ClassVar[bool] = True
    name: ClassVar[str] = "diag"

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
    ) -> tuple[Diagonal, FitSummary]:
        """The diagonal GGN / Fisher / Hessian (:func:`~laplace_tf.curvature.diagonal`);
        negative entries of an exact Hessian diagonal are set to 0 with a warning."""
        fitted = fit_diagonal(
            model,
            data,
            likelihood=likelihood,
            kind=kind,
            params=variables,
            batch_size=batch_size,
            progress=progress,
            seed=seed,
        )
        curvature = fitted.diagonal
        if kind == "hessian":
            curvature = _clip_negative(curvature)
        summary = FitSummary(fitted.nll, fitted.n_data, fitted.n_outputs, fitted.n_rows)
        return cls(tuple(curvature)), summary

    def scaled(self, scaling: Scaling, dtype: tf.DType | None = None) -> list[tf.Tensor]:
        """``h / sigma^q`` (before the temperature), cast to ``dtype`` first if given."""
        curvature = [h if dtype is None else tf.cast(h, dtype) for h in self.curvature]
        return [scaling.noise(h) for h in curvature]

    def precision(self, prior: list[tf.Tensor], scaling: Scaling) -> list[tf.Tensor]:
        """``h / (sigma^q T) + delta``, shaped like the weights, in their dtype."""
        return [
            h / scaling.temperature + tf.cast(p, h.dtype)
            for h, p in zip(self.scaled(scaling), prior, strict=True)
        ]

    def log_det(self, prior: list[tf.Tensor], scaling: Scaling) -> tf.Tensor:
        """``sum log(h / (sigma^q T) + delta)`` in float64."""
        total = tf.constant(0.0, tf.float64)
        for h, p in zip(self.scaled(scaling, tf.float64), prior, strict=True):
            p = tf.broadcast_to(tf.cast(p, tf.float64), h.shape)
            total += tf.reduce_sum(tf.math.log(h / scaling.temperature + p))
        return total

    def variance(self, prior: list[tf.Tensor], scaling: Scaling) -> list[tf.Tensor]:
        """``1 / precision``."""
        return [1.0 / p for p in self.precision(prior, scaling)]

    def stddev(self, prior: list[tf.Tensor], scaling: Scaling) -> list[tf.Tensor]:
        """``1 / sqrt(precision)``."""
        return [tf.math.rsqrt(p) for p in self.precision(prior, scaling)]

    def sample(
        self, seeds: Sequence[tf.Tensor], shape: list[int], prior: list[tf.Tensor], scaling: Scaling
    ) -> list[tf.Tensor]:
        """``stddev * z`` with ``z ~ N(0, I)`` of shape ``[*shape, *weight.shape]``."""
        return [
            s * tf.random.stateless_normal([*shape, *s.shape], seed=seed, dtype=s.dtype)
            for s, seed in zip(self.stddev(prior, scaling), seeds, strict=True)
        ]

    def glm_moments(
        self,
        model: keras.Model,
        x: Any,
        variables: list,
        prior: list[tf.Tensor],
        scaling: Scaling,
        batch_size: int,
    ) -> tuple[tf.Tensor, tf.Tensor]:
        """``J diag(variance) J^T`` per example, from the layer rules."""
        variance = self.variance(prior, scaling)
        return glm_moments(model, x, variance, params=variables, batch_size=batch_size)

    def distribution(
        self, mean: list[tf.Tensor], prior: list[tf.Tensor], scaling: Scaling
    ) -> tfd.Distribution:
        """A ``JointDistributionSequential`` of ``Independent`` normals, one per weight."""
        parts = [
            tfd.Independent(tfd.Normal(m, s), reinterpreted_batch_ndims=len(m.shape))
            for m, s in zip(mean, self.stddev(prior, scaling), strict=True)
        ]
        return tfd.JointDistributionSequential(parts)

    def merged(self, other: Diagonal, n_self: float, n_other: float) -> Diagonal:
        """The curvature of both fits' data: the diagonals add."""
        return Diagonal(tuple(a + b for a, b in zip(self.curvature, other.curvature, strict=True)))

    def state(self) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
        """``curvature_i``: the diagonal of weight ``i`` in its dtype."""
        return {f"curvature_{i}": h.numpy() for i, h in enumerate(self.curvature)}, {}

    @classmethod
    def from_state(
        cls, arrays: dict[str, np.ndarray], metadata: dict[str, Any], variables: list
    ) -> Diagonal:
        curvature = []
        for i, v in enumerate(variables):
            h = arrays[f"curvature_{i}"]
            if h.shape != tuple(v.shape):
                raise ValueError(f"the stored curvature for {v.path} does not match its shape.")
            curvature.append(tf.constant(h))
        return cls(tuple(curvature))

    def glm_step(
        self, model: keras.Model, variables: list, prior: list[tf.Tensor], scaling: Scaling
    ) -> tuple[Callable, list[tf.Tensor]]:
        """A compiled ``(x, tensors) -> (f(x), J Sigma J^T)`` and its ``tensors`` (the
        posterior variances, in the weights' dtypes): :meth:`glm_moments` for one batch,
        with the posterior computed once (what an exported predictive calls)."""
        variables = _model_variables(model, variables)
        variance = self.variance(prior, scaling)
        variance = [tf.cast(s, v.dtype) for s, v in zip(variance, variables, strict=True)]
        return _covariance_step(model, variables), variance

    def quadratic(
        self, prior: list[tf.Tensor], scaling: Scaling
    ) -> Callable[[list[tf.Tensor]], tf.Tensor]:
        """``d -> sum_p precision_p d_p^2`` over deviations ``d`` shaped like the weights,
        in their dtype, the precision computed once (the EWC penalty's form)."""
        precision = self.precision(prior, scaling)

        def quadratic(deviations: list[tf.Tensor]) -> tf.Tensor:
            return tf.add_n(
                [
                    tf.reduce_sum(tf.cast(p, d.dtype) * tf.square(d))
                    for p, d in zip(precision, deviations, strict=True)
                ]
            )

        return quadratic


def _clip_negative(curvature: list[tf.Tensor]) -> list[tf.Tensor]:
    """The exact Hessian diagonal of a non-convex loss can be negative; a negative entry
    would make the posterior precision ``h / T + delta`` negative (or tiny) and its
    variance meaningless. Such entries are set to zero, with a warning."""
    negative = sum(int(tf.math.count_nonzero(h < 0)) for h in curvature)
    if not negative:
        return curvature
    lowest = min(float(tf.reduce_min(h)) for h in curvature)
    total = sum(int(tf.size(h)) for h in curvature)
    warnings.warn(
        f"The Hessian diagonal has {negative} negative entries out of {total} (lowest "
        f"{lowest:.3g}): the loss is not convex there. They are set to 0, so those weights "
        f"get their prior precision. Consider curvature='ggn', which is never negative.",
        stacklevel=4,
    )
    return [tf.maximum(h, tf.zeros_like(h)) for h in curvature]
