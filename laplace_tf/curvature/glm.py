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
import numpy as np
import tensorflow as tf

from laplace_tf._data import DEFAULT_BATCH_SIZE
from laplace_tf.curvature.full_gram import _flat, _is_bias, _jacobian
from laplace_tf.curvature.layers import Explicit, Outer, Patches
from laplace_tf.curvature.loss_terms import output_blocks
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
    ``sum_ij (Q_A^T a_n)_i^2 (Q_B^T delta_nk)_j (Q_B^T delta_nl)_j w_ij``. A Dense bias
    (gradients ``delta_nk``) whose block has the eigenbasis ``Q_B`` of its kernel's ``B``
    (its block is ``B``) adds its weights to the kernel's: ``Q_B^T delta_nk`` is formed once.
    """
    variables = _model_variables(model, params)
    kinds = tuple(type(c).__name__ for c in covariances)
    shared = _shared_bases(covariances)
    step = _cached(
        model,
        ("kron_covariance", kinds, tuple(sorted(shared.items()))),
        variables,
        lambda: _kron_covariance_step(model, variables, shared),
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


def _block_covariance(factor, tensors) -> tf.Tensor:
    """``[N, K, K]``: ``J_n Sigma_b J_n^T`` of one factor and its block's covariance
    ``tensors`` (see :func:`_covariance_tensors`), in the factor's dtype. Dense kernels and
    explicit gradients are reduced with one elementwise product and one batched matmul."""
    dtype = _factor_dtype(factor)
    tensors = [tf.cast(t, dtype) for t in tensors]
    if len(tensors) == 3:
        q_a, q_b, weights = tensors
        if isinstance(factor, Outer):
            return _outer_gram(factor.inputs @ q_a, factor.cotangents @ q_b, weights)
        if isinstance(factor, Patches):
            projected = Patches(factor.variable, factor.patches @ q_a, factor.cotangents @ q_b)
            return projected.weighted_gram([weights])
        raise TypeError(f"a Kronecker block for a {type(factor).__name__} factor.")
    if len(tensors) == 2:
        basis, weights = tensors
        return _explicit_gram(_flat(factor.grads) @ basis, weights)
    (weights,) = tensors
    if isinstance(factor, Outer):
        shape = [factor.inputs.shape[-1], factor.cotangents.shape[-1]]
        return _outer_gram(factor.inputs, factor.cotangents, tf.reshape(weights, shape))
    if isinstance(factor, Explicit):
        return _explicit_gram(_flat(factor.grads), tf.reshape(weights, [-1]))
    return factor.weighted_gram([weights])


def _kernel_and_bias(factor: Outer, kernel: list, bias: list) -> tf.Tensor:
    """A Dense kernel's and bias' covariance, the bias' basis being the kernel's ``Q_B``."""
    dtype = factor.inputs.dtype
    q_a, q_b, weights = (tf.cast(t, dtype) for t in kernel)
    bias_weights = tf.cast(bias[1], dtype)
    projected = factor.cotangents @ q_b
    scale = tf.matmul(tf.square(factor.inputs @ q_a), weights) + bias_weights
    return tf.matmul(projected * scale[:, None, :], projected, transpose_b=True)


def _outer_gram(inputs: tf.Tensor, cotangents: tf.Tensor, weights: tf.Tensor) -> tf.Tensor:
    """``sum_ij a_ni^2 w_ij d_nki d_nlj`` for ``a [N, I]``, ``d [N, K, J]``, ``w [I, J]``."""
    scale = tf.matmul(tf.square(inputs), weights)  # [N, J]
    return tf.matmul(cotangents * scale[:, None, :], cotangents, transpose_b=True)


def _explicit_gram(grads: tf.Tensor, weights: tf.Tensor) -> tf.Tensor:
    """``sum_p w_p g_nkp g_nlp`` for ``g [N, K, P]``, ``w [P]``."""
    return tf.matmul(grads * weights, grads, transpose_b=True)


def _factor_dtype(factor) -> tf.DType:
    for name in ("inputs", "patches", "grads", "cotangents"):
        if hasattr(factor, name):
            return getattr(factor, name).dtype
    return factor.variables[0].dtype


def _shared_bases(covariances: Sequence[Covariance]) -> dict[int, int]:
    """``{kernel: bias}`` positions of a Kronecker block followed by a dense block with the
    same basis as its ``Q_B`` (a bias block equal to the kernel's ``B``)."""
    shared = {}
    for position in range(1, len(covariances)):
        kernel, bias = covariances[position - 1], covariances[position]
        if isinstance(kernel, KroneckerEigen) and isinstance(bias, DenseEigen):
            if kernel.outputs_basis is bias.basis:  # the Kron structure reuses it
                shared[position - 1] = position
                continue
            q_b, basis = np.asarray(kernel.outputs_basis), np.asarray(bias.basis)
            if q_b.shape == basis.shape and np.array_equal(q_b, basis):
                shared[position - 1] = position
    return shared


def _kron_covariance_step(model, variables, shared):
    index = {id(v): i for i, v in enumerate(variables)}

    @tf.function(reduce_retracing=True, autograph=False)
    def step(x, tensors):
        with tf.GradientTape(persistent=True) as tape:
            raw, sites = trace(model, x, variables)
            outputs = _loss_outputs(raw)

        def gram(columns):
            covariance = 0.0
            cotangents = _cut_cotangents(tape, raw, sites, columns)
            for site, cotangent in zip(sites, cotangents, strict=True):
                factors, folded = site.factors(cotangent), None
                for place, factor in enumerate(factors):
                    position = index[id(factor.variables[0])]
                    if position == folded and _is_bias(site, factor):
                        continue  # added to its kernel's block
                    if isinstance(factor, Outer) and shared.get(position) is not None:
                        bias = shared[position]
                        if any(index[id(f.variables[0])] == bias for f in factors[place + 1 :]):
                            folded = bias
                            block = _kernel_and_bias(factor, tensors[position], tensors[bias])
                            covariance += tf.cast(block, outputs.dtype)
                            continue
                    if len(factor.variables) == 1:
                        block = _block_covariance(factor, tensors[index[id(factor.variable)]])
                    else:
                        weights = [tensors[index[id(v)]][0] for v in factor.variables]
                        block = factor.weighted_gram(weights)
                    covariance += tf.cast(block, outputs.dtype)
            return covariance

        return outputs, output_blocks(gram, outputs)

    return step


def _full_covariance_step(model, variables):
    @tf.function(reduce_retracing=True, autograph=False)
    def step(x, cholesky):
        with tf.GradientTape(persistent=True) as tape:
            raw, sites = trace(model, x, variables)
            outputs = _loss_outputs(raw)

        def gram(columns):
            jacobian = _jacobian(tape, raw, sites, columns, variables)  # [N, K, P]
            n, k = tf.shape(jacobian)[0], tf.shape(jacobian)[1]
            flat = tf.reshape(tf.transpose(jacobian, [2, 0, 1]), [tf.shape(jacobian)[2], -1])
            solved = tf.linalg.triangular_solve(tf.cast(cholesky, flat.dtype), flat, lower=True)
            solved = tf.reshape(solved, [-1, n, k])
            return tf.cast(tf.einsum("pnc,pnd->ncd", solved, solved), outputs.dtype)

        return outputs, output_blocks(gram, outputs)

    return step
