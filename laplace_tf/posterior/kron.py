"""The Kronecker-factored structure (KFLR / KFAC): one block per selected weight.

A kernel's curvature is ``A (x) B`` (:class:`~laplace_tf.curvature.reducers.KroneckerBlock`),
a bias gets its exact block, any other weight its diagonal. Each block is
eigendecomposed once, ``A = Q_A diag(l_A) Q_A^T``, ``B = Q_B diag(l_B) Q_B^T``, and the
posterior precision is exact in that basis: eigenvalues ``l_A,i l_B,j / (sigma^q T) +
delta``. Log-determinant, draws, marginal variances, the GLM output covariance and the
TFP distribution come from the eigenvalues and bases; no ``P x P`` matrix is formed.
The prior precision is a scalar per weight (scalar or layerwise); a per-weight prior is
not defined for a Kronecker block (it would break the factorisation) and is refused.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from types import SimpleNamespace
from typing import Any, ClassVar

import keras
import numpy as np
import tensorflow as tf
import tensorflow_probability as tfp

from laplace_tf.curvature import glm, reducers
from laplace_tf.curvature.structured import _accumulation_dtype
from laplace_tf.posterior.structure import (
    FitSummary,
    Scaling,
    flat_mean,
    per_weight_prior_refused,
)

tfd = tfp.distributions
_Op = tf.linalg


class _Orthogonal(_Op.LinearOperatorFullMatrix):
    """An orthogonal matrix (an eigenbasis): its inverse is its transpose, ``|det| = 1``."""

    def _log_abs_determinant(self):
        return tf.zeros(self.batch_shape_tensor(), self.dtype)

    def _solve(self, rhs, adjoint=False, adjoint_arg=False):
        return self._matmul(rhs, adjoint=not adjoint, adjoint_arg=adjoint_arg)


def _basis(matrix: tf.Tensor, dtype: tf.DType) -> _Op.LinearOperator:
    return _Orthogonal(tf.cast(matrix, dtype), is_square=True, is_non_singular=True)


def _eigh(matrix: tf.Tensor, dtype: tf.DType) -> tuple[tf.Tensor, tf.Tensor]:
    """Eigenvalues (clipped at 0: the factors are PSD up to rounding) and eigenvectors,
    computed in the weight's ``dtype`` (float32 halves the time of float64) and kept in
    float64."""
    values, vectors = tf.linalg.eigh(tf.cast(matrix, dtype))
    values, vectors = tf.cast(values, tf.float64), tf.cast(vectors, tf.float64)
    return tf.maximum(values, 0.0), vectors


@dataclass(frozen=True)
class KronFactor:
    """``A (x) B = (Q_A (x) Q_B) diag(l_A (x) l_B) (Q_A (x) Q_B)^T`` for a kernel."""

    inputs_values: tf.Tensor
    inputs_basis: tf.Tensor
    outputs_values: tf.Tensor
    outputs_basis: tf.Tensor
    shape: tuple[int, ...]
    fields: ClassVar[tuple[str, ...]] = (
        "inputs_values",
        "inputs_basis",
        "outputs_values",
        "outputs_basis",
    )

    def eigenvalues(self, delta: tf.Tensor, scaling: Scaling) -> tf.Tensor:
        """``[I, J]``: ``l_A,i l_B,j / (sigma^q T) + delta``."""
        products = self.inputs_values[:, None] * self.outputs_values[None, :]
        return scaling.apply(products) + delta

    def variance(self, eigenvalues: tf.Tensor) -> tf.Tensor:
        squares_a, squares_b = tf.square(self.inputs_basis), tf.square(self.outputs_basis)
        variance = squares_a @ (1.0 / eigenvalues) @ tf.transpose(squares_b)
        return tf.reshape(variance, self.shape)

    @property
    def noise_shape(self) -> list[int]:
        return [math.prod(self.shape[:-1]), self.shape[-1]]

    def transform(self, noise: tf.Tensor, eigenvalues: tf.Tensor) -> tf.Tensor:
        """``vec(Q_A (Z / sqrt(eig)) Q_B^T)``: a draw with this block's covariance."""
        scaled = noise * tf.math.rsqrt(eigenvalues)
        draws = tf.einsum("ia,...ab,jb->...ij", self.inputs_basis, scaled, self.outputs_basis)
        return tf.reshape(draws, [*noise.shape[:-2], *self.shape])

    def covariance(self, eigenvalues: tf.Tensor) -> glm.Covariance:
        return glm.KroneckerEigen(self.inputs_basis, self.outputs_basis, 1.0 / eigenvalues)

    def scale(self, eigenvalues: tf.Tensor, dtype: tf.DType) -> _Op.LinearOperator:
        basis = _Op.LinearOperatorKronecker(
            [_basis(self.inputs_basis, dtype), _basis(self.outputs_basis, dtype)]
        )
        root = _Op.LinearOperatorDiag(tf.cast(tf.reshape(tf.math.rsqrt(eigenvalues), [-1]), dtype))
        return _Op.LinearOperatorComposition([basis, root])

    def precision(self, eigenvalues: tf.Tensor) -> _Op.LinearOperator:
        basis = _Op.LinearOperatorKronecker(
            [_basis(self.inputs_basis, tf.float64), _basis(self.outputs_basis, tf.float64)]
        )
        values = _Op.LinearOperatorDiag(tf.reshape(eigenvalues, [-1]))
        return _Op.LinearOperatorComposition([basis, values, basis.adjoint()])


@dataclass(frozen=True)
class DenseFactor:
    """A small weight's exact block ``Q diag(l) Q^T`` (a bias)."""

    values: tf.Tensor
    basis: tf.Tensor
    shape: tuple[int, ...]
    fields: ClassVar[tuple[str, ...]] = ("values", "basis")

    def eigenvalues(self, delta: tf.Tensor, scaling: Scaling) -> tf.Tensor:
        return scaling.apply(self.values) + delta

    def variance(self, eigenvalues: tf.Tensor) -> tf.Tensor:
        return tf.reshape(tf.square(self.basis) @ (1.0 / eigenvalues)[:, None], self.shape)

    @property
    def noise_shape(self) -> list[int]:
        return [math.prod(self.shape)]

    def transform(self, noise: tf.Tensor, eigenvalues: tf.Tensor) -> tf.Tensor:
        draws = tf.einsum("...a,ia->...i", noise * tf.math.rsqrt(eigenvalues), self.basis)
        return tf.reshape(draws, [*noise.shape[:-1], *self.shape])

    def covariance(self, eigenvalues: tf.Tensor) -> glm.Covariance:
        return glm.DenseEigen(self.basis, 1.0 / eigenvalues)

    def scale(self, eigenvalues: tf.Tensor, dtype: tf.DType) -> _Op.LinearOperator:
        basis = _basis(self.basis, dtype)
        root = _Op.LinearOperatorDiag(tf.cast(tf.math.rsqrt(eigenvalues), dtype))
        return _Op.LinearOperatorComposition([basis, root])

    def precision(self, eigenvalues: tf.Tensor) -> _Op.LinearOperator:
        basis = _basis(self.basis, tf.float64)
        values = _Op.LinearOperatorDiag(eigenvalues)
        return _Op.LinearOperatorComposition([basis, values, basis.adjoint()])


@dataclass(frozen=True)
class DiagonalFactor:
    """A weight with no Kronecker form (norm scale, embedding, fallback): its diagonal."""

    diagonal: tf.Tensor
    shape: tuple[int, ...]
    fields: ClassVar[tuple[str, ...]] = ("diagonal",)

    def eigenvalues(self, delta: tf.Tensor, scaling: Scaling) -> tf.Tensor:
        return scaling.apply(self.diagonal) + delta

    def variance(self, eigenvalues: tf.Tensor) -> tf.Tensor:
        return 1.0 / eigenvalues

    @property
    def noise_shape(self) -> list[int]:
        return list(self.shape)

    def transform(self, noise: tf.Tensor, eigenvalues: tf.Tensor) -> tf.Tensor:
        return noise * tf.math.rsqrt(eigenvalues)

    def covariance(self, eigenvalues: tf.Tensor) -> glm.Covariance:
        return glm.DiagonalWeights(1.0 / eigenvalues)

    def scale(self, eigenvalues: tf.Tensor, dtype: tf.DType) -> _Op.LinearOperator:
        return _Op.LinearOperatorDiag(tf.cast(tf.reshape(tf.math.rsqrt(eigenvalues), [-1]), dtype))

    def precision(self, eigenvalues: tf.Tensor) -> _Op.LinearOperator:
        return _Op.LinearOperatorDiag(tf.reshape(eigenvalues, [-1]))


_FACTORS = {"kron": KronFactor, "dense": DenseFactor, "diagonal": DiagonalFactor}
Factor = KronFactor | DenseFactor | DiagonalFactor


def _recomposed(values: tf.Tensor, basis: tf.Tensor) -> tf.Tensor:
    """``Q diag(l) Q^T``, float64."""
    return tf.matmul(basis * values[None, :], basis, transpose_b=True)


def _factor(block: reducers.Block, variable: Any) -> Factor:
    """The eigendecomposed factor of ``block`` for ``variable`` (decomposed in its dtype)."""
    shape, dtype = tuple(variable.shape), _accumulation_dtype(variable.dtype)
    if isinstance(block, reducers.KroneckerBlock):
        inputs_values, inputs_basis = _eigh(block.inputs, dtype)
        outputs_values, outputs_basis = _eigh(block.outputs, dtype)
        return KronFactor(inputs_values, inputs_basis, outputs_values, outputs_basis, shape)
    if isinstance(block, reducers.DenseBlock):
        return DenseFactor(*_eigh(block.matrix, dtype), shape)
    return DiagonalFactor(tf.cast(block.diagonal, tf.float64), shape)


def _bias_of(previous: Any, block: Any, factor: Any, variable: Any) -> bool:
    """Whether ``block`` (a dense block) holds exactly the ``B`` of the Kronecker block
    before it, decomposed in the same dtype: the bias of that kernel."""
    if not (
        isinstance(previous, reducers.KroneckerBlock)
        and isinstance(block, reducers.DenseBlock)
        and isinstance(factor, KronFactor)
        and tuple(block.matrix.shape) == tuple(previous.outputs.shape)
    ):
        return False
    if factor.outputs_basis.shape[0] != int(np.prod(variable.shape)):
        return False
    if block.matrix is not previous.outputs and not np.array_equal(
        np.asarray(block.matrix), np.asarray(previous.outputs)
    ):
        return False
    return True


@dataclass(frozen=True)
class Kron:
    """Eigendecomposed Kronecker-factored curvature, one factor per selected weight."""

    factors: tuple[Factor, ...]
    dtypes: tuple[tf.DType, ...]
    per_weight_prior: ClassVar[bool] = False
    name: ClassVar[str] = "kron"

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
    ) -> tuple[Kron, FitSummary]:
        """Kronecker factors (:func:`~laplace_tf.curvature.reducers.fit_kron`), decomposed."""
        fitted = reducers.fit_kron(
            model,
            data,
            likelihood=likelihood,
            kind=kind,
            params=variables,
            batch_size=batch_size,
            progress=progress,
            seed=seed,
        )
        factors: list[Factor] = []
        for block, v in zip(fitted.curvature, variables, strict=True):
            previous = fitted.curvature[len(factors) - 1] if factors else None
            if _bias_of(previous, block, factors[-1] if factors else None, v):
                # a bias block is its kernel's B: reuse the kernel's eigenbasis
                kernel = factors[-1]
                factors.append(
                    DenseFactor(kernel.outputs_values, kernel.outputs_basis, tuple(v.shape))
                )
            else:
                factors.append(_factor(block, v))
        factors = tuple(factors)
        summary = FitSummary(fitted.nll, fitted.n_data, fitted.n_outputs, fitted.n_rows)
        return cls(factors, tuple(v.dtype for v in variables)), summary

    def _eigenvalues(self, prior: list[tf.Tensor], scaling: Scaling) -> list[tf.Tensor]:
        if any(p.shape.rank != 0 for p in prior):
            raise per_weight_prior_refused(self.name)
        return [
            f.eigenvalues(tf.cast(p, tf.float64), scaling)
            for f, p in zip(self.factors, prior, strict=True)
        ]

    def precision(self, prior: list[tf.Tensor], scaling: Scaling) -> _Op.LinearOperator:
        """A block-diagonal ``LinearOperator`` (float64) over the flattened weights."""
        eigenvalues = self._eigenvalues(prior, scaling)
        blocks = [f.precision(e) for f, e in zip(self.factors, eigenvalues, strict=True)]
        return _Op.LinearOperatorBlockDiag(blocks, is_square=True)

    def log_det(self, prior: list[tf.Tensor], scaling: Scaling) -> tf.Tensor:
        return tf.add_n([tf.reduce_sum(tf.math.log(e)) for e in self._eigenvalues(prior, scaling)])

    def variance(self, prior: list[tf.Tensor], scaling: Scaling) -> list[tf.Tensor]:
        eigenvalues = self._eigenvalues(prior, scaling)
        return [
            tf.cast(f.variance(e), d)
            for f, e, d in zip(self.factors, eigenvalues, self.dtypes, strict=True)
        ]

    def sample(
        self, seeds: Sequence[tf.Tensor], shape: list[int], prior: list[tf.Tensor], scaling: Scaling
    ) -> list[tf.Tensor]:
        draws = []
        for f, e, d, seed in zip(
            self.factors, self._eigenvalues(prior, scaling), self.dtypes, seeds, strict=True
        ):
            noise = tf.random.stateless_normal(
                [*shape, *f.noise_shape], seed=seed, dtype=tf.float64
            )
            draws.append(tf.cast(f.transform(noise, e), d))
        return draws

    def glm_moments(
        self,
        model: keras.Model,
        x: Any,
        variables: list,
        prior: list[tf.Tensor],
        scaling: Scaling,
        batch_size: int,
    ) -> tuple[tf.Tensor, tf.Tensor]:
        """The output covariance from the layer factors in each block's eigenbasis."""
        eigenvalues = self._eigenvalues(prior, scaling)
        covariances = [f.covariance(e) for f, e in zip(self.factors, eigenvalues, strict=True)]
        return glm.kron_glm_moments(model, x, covariances, params=variables, batch_size=batch_size)

    def distribution(
        self, mean: list[tf.Tensor], prior: list[tf.Tensor], scaling: Scaling
    ) -> tfd.Distribution:
        """A ``MultivariateNormalLinearOperator`` over the flattened, concatenated weights,
        its scale block-diagonal with Kronecker eigenbases."""
        loc = flat_mean(mean)
        eigenvalues = self._eigenvalues(prior, scaling)
        blocks = [f.scale(e, loc.dtype) for f, e in zip(self.factors, eigenvalues, strict=True)]
        scale = _Op.LinearOperatorBlockDiag(blocks, is_square=True, is_non_singular=True)
        return tfd.MultivariateNormalLinearOperator(loc, scale)

    def merged(self, other: Kron, n_self: float, n_other: float) -> Kron:
        """The curvature of both fits' data, as one fit on them computes it: ``A`` is the
        mean of the inputs' Grams, so ``(n_1 A_1 + n_2 A_2) / (n_1 + n_2)``; ``B``, the bias
        blocks and the diagonals are sums. Each factor is recomposed from its
        eigendecomposition, added and decomposed again."""
        total = max(n_self + n_other, 1e-300)
        factors: list[Factor] = []
        for first, second, dtype in zip(self.factors, other.factors, self.dtypes, strict=True):
            like = SimpleNamespace(shape=first.shape, dtype=dtype)  # what _factor reads
            kernel = factors[-1] if factors else None
            previous = self.factors[len(factors) - 1] if factors else None
            if isinstance(first, KronFactor):
                inputs = (
                    n_self * _recomposed(first.inputs_values, first.inputs_basis)
                    + n_other * _recomposed(second.inputs_values, second.inputs_basis)
                ) / total
                outputs = _recomposed(first.outputs_values, first.outputs_basis) + _recomposed(
                    second.outputs_values, second.outputs_basis
                )
                factors.append(_factor(reducers.KroneckerBlock(inputs, outputs), like))
            elif (
                isinstance(first, DenseFactor)
                and isinstance(previous, KronFactor)
                and first.basis is previous.outputs_basis
            ):  # a bias sharing its kernel's B: share the merged one
                shared = DenseFactor(kernel.outputs_values, kernel.outputs_basis, first.shape)
                factors.append(shared)
            elif isinstance(first, DenseFactor):
                matrix = _recomposed(first.values, first.basis) + _recomposed(
                    second.values, second.basis
                )
                factors.append(_factor(reducers.DenseBlock(matrix), like))
            else:
                factors.append(DiagonalFactor(first.diagonal + second.diagonal, first.shape))
        return Kron(tuple(factors), self.dtypes)

    def state(self) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
        """``block_{i}_{field}`` arrays (float64) and the block kinds."""
        arrays, kinds = {}, []
        for i, f in enumerate(self.factors):
            kinds.append(next(k for k, cls in _FACTORS.items() if isinstance(f, cls)))
            for field in f.fields:
                arrays[f"block_{i}_{field}"] = getattr(f, field).numpy()
        return arrays, {"blocks": kinds}

    @classmethod
    def from_state(
        cls, arrays: dict[str, np.ndarray], metadata: dict[str, Any], variables: list
    ) -> Kron:
        factors = []
        for i, (kind, v) in enumerate(zip(metadata["blocks"], variables, strict=True)):
            factor_cls = _FACTORS[kind]
            fields = [tf.constant(arrays[f"block_{i}_{name}"]) for name in factor_cls.fields]
            factors.append(factor_cls(*fields, tuple(v.shape)))
        return cls(tuple(factors), tuple(v.dtype for v in variables))

    def glm_step(
        self, model: keras.Model, variables: list, prior: list[tf.Tensor], scaling: Scaling
    ) -> tuple[Callable, list[list[tf.Tensor]]]:
        """A compiled ``(x, tensors) -> (f(x), J Sigma J^T)`` and its ``tensors`` (each
        block's eigenbases and inverse eigenvalues): :meth:`glm_moments` for one batch,
        with the posterior computed once (what an exported predictive calls)."""
        eigenvalues = self._eigenvalues(prior, scaling)
        covariances = [f.covariance(e) for f, e in zip(self.factors, eigenvalues, strict=True)]
        variables = glm._model_variables(model, variables)
        step = glm._kron_covariance_step(model, variables, glm._shared_bases(covariances))
        return step, [glm._covariance_tensors(c) for c in covariances]

    def quadratic(
        self, prior: list[tf.Tensor], scaling: Scaling
    ) -> Callable[[list[tf.Tensor]], tf.Tensor]:
        """``d -> sum_blocks vec(d)^T Lambda_b vec(d)`` in each block's eigenbasis, never a
        ``P x P`` matrix: for a kernel ``sum_ij e_ij (Q_A^T D Q_B)_ij^2`` with ``D`` the
        deviation ``[I, J]`` (row-major ``vec``, ``A`` on the inputs), which equals
        ``sum (A' D B') * D`` for the precision ``A' (x) B'``; a dense block
        ``sum_k e_k (Q^T d)_k^2``; a diagonal one ``sum e d^2``. In the deviations' dtype."""
        eigenvalues = self._eigenvalues(prior, scaling)
        blocks = list(zip(self.factors, eigenvalues, strict=True))

        def quadratic(deviations: list[tf.Tensor]) -> tf.Tensor:
            terms = []
            for (factor, values), d in zip(blocks, deviations, strict=True):
                values = tf.cast(values, d.dtype)
                if isinstance(factor, KronFactor):
                    d = tf.reshape(d, factor.noise_shape)
                    q_a, q_b = (
                        tf.cast(q, d.dtype) for q in (factor.inputs_basis, factor.outputs_basis)
                    )
                    projected = tf.matmul(tf.matmul(q_a, d, transpose_a=True), q_b)
                elif isinstance(factor, DenseFactor):
                    projected = tf.linalg.matvec(
                        tf.cast(factor.basis, d.dtype), tf.reshape(d, [-1]), transpose_a=True
                    )
                else:
                    projected = tf.reshape(d, values.shape)
                terms.append(tf.reduce_sum(values * tf.square(projected)))
            return tf.add_n(terms)

        return quadratic
