"""The GLM output covariance ``J_n Sigma J_n^T`` per example for posteriors whose
covariance ``Sigma`` is Kronecker-factored (in the factors' eigenbasis, never a ``P x P``
matrix) or full (through the Cholesky factor of the precision).

The same traced forward pass and cut cotangents as the curvature (``S = I``: one column
per output) feed the layer factors; :mod:`reducers` holds the fitting counterparts.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import keras
import tensorflow as tf

from laplace_tf._data import DEFAULT_BATCH_SIZE
from laplace_tf.curvature.layers import Explicit, Outer, Patches
from laplace_tf.curvature.reducers import _flat, _jacobian
from laplace_tf.curvature.structured import (
    _cached,
    _cut_cotangents,
    _loss_outputs,
    _model_variables,
    predict_chunks,
)
from laplace_tf.curvature.tracing import trace


@dataclass(frozen=True)
class KroneckerEigen:
    """A Kronecker block's covariance ``(Q_A (x) Q_B) diag(w) (Q_A (x) Q_B)^T``, ``w [I, J]``."""

    inputs_basis: tf.Tensor
    outputs_basis: tf.Tensor
    weights: tf.Tensor


@dataclass(frozen=True)
class DenseEigen:
    """A dense block's covariance ``Q diag(w) Q^T``."""

    basis: tf.Tensor
    weights: tf.Tensor


@dataclass(frozen=True)
class DiagonalWeights:
    """A diagonal block's covariance ``diag(w)``, ``w`` shaped like the weight."""

    weights: tf.Tensor


Covariance = KroneckerEigen | DenseEigen | DiagonalWeights


def kron_glm_moments(
    model: keras.Model,
    x: Any,
    covariances: Sequence[Covariance],
    *,
    params: Sequence[Any] | None = None,
    batch_size: int = DEFAULT_BATCH_SIZE,
) -> tuple[tf.Tensor, tf.Tensor]:
    """Outputs ``f(x)`` ``[N, C]`` and ``sum_blocks J_n Sigma_b J_n^T`` ``[N, C, C]``.

    For a Kronecker block the gradients ``a_n (x) delta_nk`` are projected on the
    eigenbases, ``(Q_A^T a_n) (x) (Q_B^T delta_nk)``, and weighted by ``w``:
    ``sum_ij (Q_A^T a_n)_i^2 (Q_B^T delta_nk)_j (Q_B^T delta_nl)_j w_ij``.
    """
    variables = _model_variables(model, params)
    kinds = tuple(type(c).__name__ for c in covariances)
    step = _cached(
        model,
        ("kron_covariance", kinds),
        variables,
        lambda: _kron_covariance_step(model, variables),
    )
    tensors = [_covariance_tensors(c) for c in covariances]
    chunks = predict_chunks(model, variables, x, batch_size)
    means, covs = zip(*(step(part, tensors) for part in chunks), strict=True)
    return tf.concat(means, axis=0), tf.concat(covs, axis=0)


def full_glm_moments(
    model: keras.Model,
    x: Any,
    precision_cholesky: tf.Tensor,
    *,
    params: Sequence[Any] | None = None,
    batch_size: int = DEFAULT_BATCH_SIZE,
) -> tuple[tf.Tensor, tf.Tensor]:
    """Outputs ``f(x)`` and ``J_n Sigma J_n^T = ||L^{-1} J_n^T||^2`` per example, with
    ``L L^T`` the posterior precision (``L`` lower triangular, ``P x P``)."""
    variables = _model_variables(model, params)
    step = _cached(
        model, ("full_covariance",), variables, lambda: _full_covariance_step(model, variables)
    )
    size = sum(v.shape.num_elements() for v in variables)  # a dense Jacobian row per column
    chunks = predict_chunks(model, variables, x, batch_size, per_column=size)
    results = [step(part, precision_cholesky) for part in chunks]
    means, covs = zip(*results, strict=True)
    return tf.concat(means, axis=0), tf.concat(covs, axis=0)


def _covariance_tensors(covariance: Covariance) -> list[tf.Tensor]:
    if isinstance(covariance, KroneckerEigen):
        return [covariance.inputs_basis, covariance.outputs_basis, covariance.weights]
    if isinstance(covariance, DenseEigen):
        return [covariance.basis, covariance.weights]
    return [covariance.weights]


def _identity_columns(raw: tf.Tensor) -> tf.Tensor:
    n, c = tf.shape(raw)[0], tf.shape(raw)[1]
    return tf.broadcast_to(tf.eye(c, dtype=raw.dtype), [n, c, c])


def _projected(factor, tensors):
    """``(factor, weights)`` whose weighted Gram is this block's output covariance."""
    dtype = _factor_dtype(factor)
    tensors = [tf.cast(t, dtype) for t in tensors]
    if len(tensors) == 3:
        q_a, q_b, weights = tensors
        if isinstance(factor, Outer):
            projected = Outer(factor.variable, factor.inputs @ q_a, factor.cotangents @ q_b)
        elif isinstance(factor, Patches):
            projected = Patches(factor.variable, factor.patches @ q_a, factor.cotangents @ q_b)
        else:
            raise TypeError(f"a Kronecker block for a {type(factor).__name__} factor.")
        return projected, [weights]
    if len(tensors) == 2:
        basis, weights = tensors
        projected = Explicit(factor.variable, _flat(factor.grads) @ basis)
        return projected, [weights]
    return factor, tensors


def _factor_dtype(factor) -> tf.DType:
    for name in ("inputs", "patches", "grads", "cotangents"):
        if hasattr(factor, name):
            return getattr(factor, name).dtype
    return factor.variables[0].dtype


def _kron_covariance_step(model, variables):
    index = {id(v): i for i, v in enumerate(variables)}

    @tf.function(reduce_retracing=True, autograph=False)
    def step(x, tensors):
        with tf.GradientTape(persistent=True) as tape:
            raw, sites = trace(model, x, variables)
            outputs = _loss_outputs(raw)
        columns = _identity_columns(raw)
        shape = [tf.shape(raw)[0], tf.shape(raw)[1], tf.shape(raw)[1]]
        covariance = tf.zeros(shape, outputs.dtype)
        for site, cotangent in zip(sites, _cut_cotangents(tape, raw, sites, columns), strict=True):
            for factor in site.factors(cotangent):
                if len(factor.variables) == 1:
                    factor, weights = _projected(factor, tensors[index[id(factor.variable)]])
                else:
                    weights = [tensors[index[id(v)]][0] for v in factor.variables]
                covariance += tf.cast(factor.weighted_gram(weights), outputs.dtype)
        return outputs, covariance

    return step


def _full_covariance_step(model, variables):
    @tf.function(reduce_retracing=True, autograph=False)
    def step(x, cholesky):
        with tf.GradientTape(persistent=True) as tape:
            raw, sites = trace(model, x, variables)
            outputs = _loss_outputs(raw)
        jacobian = _jacobian(tape, raw, sites, _identity_columns(raw), variables)  # [N, C, P]
        n, c = tf.shape(jacobian)[0], tf.shape(jacobian)[1]
        columns = tf.reshape(tf.transpose(jacobian, [2, 0, 1]), [tf.shape(jacobian)[2], -1])
        cholesky = tf.cast(cholesky, columns.dtype)
        solved = tf.linalg.triangular_solve(cholesky, columns, lower=True)
        solved = tf.reshape(solved, [-1, n, c])
        covariance = tf.einsum("pnc,pnd->ncd", solved, solved)
        return outputs, tf.cast(covariance, outputs.dtype)

    return step
