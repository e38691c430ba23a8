"""The full structure: the exact ``P x P`` curvature of the selected weights, Cholesky-factored.

The posterior precision ``G / (sigma^q T) + diag(delta)`` over the weights flattened
row-major and concatenated in order (a per-weight prior precision is its diagonal) is
factored as ``L L^T``; the log-determinant is ``2 sum log diag L``, draws are
``L^{-T} z`` and the GLM output covariance ``||L^{-1} J_n^T||^2``. Meant for the last
layer or small models: memory ``P^2`` and time ``P^3`` (see :data:`DEFAULT_SIZE_LIMIT`).
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

import keras
import numpy as np
import tensorflow as tf
import tensorflow_probability as tfp

from laplace_tf.curvature import glm, reducers
from laplace_tf.posterior.structure import FitSummary, Scaling, flat_mean

tfd = tfp.distributions
_Op = tf.linalg

#: Largest number of selected weights the full structure accepts by default.
DEFAULT_SIZE_LIMIT = 20_000


def check_size(variables: list, limit: int) -> None:
    """Refuse more than ``limit`` selected weights, naming the alternatives."""
    size = sum(v.shape.num_elements() for v in variables)
    if size > limit:
        raise ValueError(
            f"structure='full' stores a {size} x {size} matrix for the {size} selected "
            f"weights, above full_size_limit={limit}. Use structure='kron' or 'diag', or "
            "subset='last_layer' (or a list of layer names), or raise full_size_limit."
        )


@dataclass(frozen=True)
class Full:
    """The ``P x P`` curvature (float64) and the shapes / dtypes of the weights it covers."""

    curvature: tf.Tensor
    shapes: tuple[tuple[int, ...], ...]
    dtypes: tuple[tf.DType, ...]
    per_weight_prior: ClassVar[bool] = True
    name: ClassVar[str] = "full"
    #: The last ``L`` of :meth:`cached_cholesky`, keyed by the prior and scaling values.
    _last: dict = field(default_factory=dict, compare=False, repr=False)

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
    ) -> tuple[Full, FitSummary]:
        """The full Gram (:func:`~laplace_tf.curvature.reducers.fit_full`); an exact
        Hessian's negative eigenvalues are set to 0 with a warning."""
        fitted = reducers.fit_full(
            model,
            data,
            likelihood=likelihood,
            kind=kind,
            params=variables,
            batch_size=batch_size,
            progress=progress,
            seed=seed,
        )
        curvature = fitted.curvature
        if kind == "hessian":
            curvature = _clip_indefinite(curvature)
        structure = cls(
            curvature,
            tuple(tuple(v.shape) for v in variables),
            tuple(v.dtype for v in variables),
        )
        return structure, FitSummary(fitted.nll, fitted.n_data, fitted.n_outputs, fitted.n_rows)

    def precision(self, prior: list[tf.Tensor], scaling: Scaling) -> tf.Tensor:
        """``G / (sigma^q T) + diag(delta)``, ``[P, P]`` float64."""
        delta = tf.concat(
            [
                tf.reshape(tf.broadcast_to(tf.cast(p, tf.float64), shape), [-1])
                for p, shape in zip(prior, self.shapes, strict=True)
            ],
            axis=0,
        )
        return scaling.apply(self.curvature) + tf.linalg.diag(delta)

    def cholesky(self, prior: list[tf.Tensor], scaling: Scaling) -> tf.Tensor:
        """``L`` with ``L L^T`` the posterior precision."""
        return tf.linalg.cholesky(self.precision(prior, scaling))

    def cached_cholesky(self, prior: list[tf.Tensor], scaling: Scaling) -> tf.Tensor:
        """:meth:`cholesky`, reused while the prior precision and the scaling keep their
        values: predicting, sampling and the marginal variances at one configuration
        factor the ``P x P`` precision once, not per call.

        Only for paths nobody differentiates (the cached ``L`` is a constant to a tape):
        :meth:`log_det`, which marginal-likelihood tuning differentiates, factors anew.
        """
        if not tf.executing_eagerly():
            return self.cholesky(prior, scaling)
        key = (
            tuple(np.asarray(p, np.float64).tobytes() for p in prior),
            None if scaling.sigma is None else float(scaling.sigma),
            scaling.power,
            float(scaling.temperature),
        )
        if self._last.get("key") != key:
            self._last.clear()
            self._last.update(key=key, value=self.cholesky(prior, scaling))
        return self._last["value"]

    def log_det(self, prior: list[tf.Tensor], scaling: Scaling) -> tf.Tensor:
        diagonal = tf.linalg.diag_part(self.cholesky(prior, scaling))
        return 2.0 * tf.reduce_sum(tf.math.log(diagonal))

    def variance(self, prior: list[tf.Tensor], scaling: Scaling) -> list[tf.Tensor]:
        """``diag(Sigma)``: column sums of the squared ``L^{-1}``."""
        cholesky = self.cached_cholesky(prior, scaling)
        eye = tf.eye(tf.shape(cholesky)[0], dtype=cholesky.dtype)
        inverse = tf.linalg.triangular_solve(cholesky, eye, lower=True)
        return self._split(tf.reduce_sum(tf.square(inverse), axis=0), [])

    def sample(
        self, seeds: Sequence[tf.Tensor], shape: list[int], prior: list[tf.Tensor], scaling: Scaling
    ) -> list[tf.Tensor]:
        """``L^{-T} z`` with ``z ~ N(0, I)``; one stateless seed (the first) for all weights."""
        cholesky = self.cached_cholesky(prior, scaling)
        size = cholesky.shape[0]
        noise = tf.random.stateless_normal(
            [size, int(np.prod(shape))], seed=seeds[0], dtype=tf.float64
        )
        draws = tf.linalg.triangular_solve(cholesky, noise, lower=True, adjoint=True)
        return self._split(tf.reshape(tf.transpose(draws), [*shape, size]), shape)

    def _split(self, flat: tf.Tensor, shape: list[int]) -> list[tf.Tensor]:
        sizes = [int(np.prod(s)) for s in self.shapes]
        parts = tf.split(flat, sizes, axis=-1)
        return [
            tf.cast(tf.reshape(p, [*shape, *s]), d)
            for p, s, d in zip(parts, self.shapes, self.dtypes, strict=True)
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
        cholesky = self.cached_cholesky(prior, scaling)
        return glm.full_glm_moments(model, x, cholesky, params=variables, batch_size=batch_size)

    def distribution(
        self, mean: list[tf.Tensor], prior: list[tf.Tensor], scaling: Scaling
    ) -> tfd.Distribution:
        """A ``MultivariateNormalLinearOperator`` over the flattened weights, scale ``L^{-T}``."""
        loc = flat_mean(mean)
        cholesky = _Op.LinearOperatorLowerTriangular(
            tf.cast(self.cholesky(prior, scaling), loc.dtype), is_non_singular=True
        )
        scale = _Op.LinearOperatorInversion(cholesky.adjoint())
        return tfd.MultivariateNormalLinearOperator(loc, scale)

    def merged(self, other: Full, n_self: float, n_other: float) -> Full:
        """The curvature of both fits' data: the matrices add."""
        return Full(self.curvature + other.curvature, self.shapes, self.dtypes)

    def state(self) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
        """``curvature``: the ``P x P`` matrix (float64)."""
        return {"curvature": self.curvature.numpy()}, {}

    @classmethod
    def from_state(
        cls, arrays: dict[str, np.ndarray], metadata: dict[str, Any], variables: list
    ) -> Full:
        size = sum(v.shape.num_elements() for v in variables)
        curvature = arrays["curvature"]
        if curvature.shape != (size, size):
            raise ValueError(
                f"the stored curvature is {curvature.shape}, expected ({size}, {size})."
            )
        return cls(
            tf.constant(curvature),
            tuple(tuple(v.shape) for v in variables),
            tuple(v.dtype for v in variables),
        )

    def glm_step(
        self, model: keras.Model, variables: list, prior: list[tf.Tensor], scaling: Scaling
    ) -> tuple[Callable, tf.Tensor]:
        """A compiled ``(x, L) -> (f(x), J Sigma J^T)`` and ``L``, the Cholesky factor of
        the precision: :meth:`glm_moments` for one batch, with ``L`` computed once (what
        an exported predictive calls)."""
        variables = glm._model_variables(model, variables)
        return glm._full_covariance_step(model, variables), self.cholesky(prior, scaling)

    def quadratic(
        self, prior: list[tf.Tensor], scaling: Scaling
    ) -> Callable[[list[tf.Tensor]], tf.Tensor]:
        """``d -> d^T Lambda d`` with ``d`` the deviations flattened and concatenated in
        order, in their dtype, the ``P x P`` precision ``Lambda`` formed once."""
        precision = self.precision(prior, scaling)

        def quadratic(deviations: list[tf.Tensor]) -> tf.Tensor:
            flat = flat_mean(deviations)
            return tf.tensordot(flat, tf.linalg.matvec(tf.cast(precision, flat.dtype), flat), 1)

        return quadratic


def _clip_indefinite(hessian: tf.Tensor) -> tf.Tensor:
    """The Hessian of a non-convex loss can be indefinite, and ``H / T + delta`` then not
    positive definite; its negative eigenvalues are set to 0 (with a warning when they
    are more than rounding)."""
    values, vectors = tf.linalg.eigh(0.5 * (hessian + tf.transpose(hessian)))
    lowest, scale = float(tf.reduce_min(values)), float(tf.reduce_max(tf.abs(values)))
    if lowest < -1e-8 * scale:
        count = int(tf.math.count_nonzero(values < 0))
        warnings.warn(
            f"The Hessian has {count} negative eigenvalues out of {values.shape[0]} (lowest "
            f"{lowest:.3g}): the loss is not convex there. They are set to 0. Consider "
            "curvature='ggn', which is never negative.",
            stacklevel=4,
        )
    clipped = tf.maximum(values, 0.0)
    return tf.matmul(vectors * clipped, vectors, transpose_b=True)
