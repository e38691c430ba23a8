"""What is summed from the per-example gradient factors beyond the diagonal.

The engine (:mod:`structured`) traces one forward pass, back-propagates the columns of
the output-Hessian factor ``S`` to every layer's cut and hands the layer rules' gradient
factors to a reducer. The diagonal reducer lives in :mod:`structured`; this module adds

- :func:`fit_kron`: Kronecker factors per kernel (KFLR / KFAC as in BackPACK and
  laplace-torch), a full block per bias, a diagonal block for every other weight;
- :func:`fit_full`: the full Gram ``sum_n sum_k g_nk g_nk^T`` over the selected weights
  (or the exact Hessian);

and :mod:`glm` the GLM output covariance of posteriors in those structures.

Flattening: a weight is flattened in row-major (C) order. A Dense kernel ``[I, J]`` has
per-example gradients ``a_n (x) delta_nk``, so its curvature block is ``A (x) B`` with
``A`` over the inputs (``I x I``) and ``B`` over the outputs (``J x J``); a Conv kernel
``[*kernel_size, C_in, C_out]`` likewise with ``A`` over the unfolded patch entries.
(laplace-torch's ``B (x) A`` is the same matrix for PyTorch's ``[out, in]`` layout.)
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import keras
import numpy as np
import tensorflow as tf

from laplace_tf._checks import positive_int, resolve_seed
from laplace_tf._data import DEFAULT_BATCH_SIZE
from laplace_tf._validation import check_output_activation
from laplace_tf.curvature.basics import CheckedPass, checked_step
from laplace_tf.curvature.full_gram import (
    FULL_GRADIENT_ENTRIES,  # noqa: F401  (re-exported)
    _assemble,
    _flat,
    _full_step,
    _hessian_step,
    _is_bias,
    dense_gradients,  # noqa: F401  (re-exported)
)
from laplace_tf.curvature.layers import Outer, Patches
from laplace_tf.curvature.loss_terms import Tally, loss_columns, loss_rows
from laplace_tf.curvature.loss_terms import counts as loss_counts
from laplace_tf.curvature.loss_terms import nll as loss_nll
from laplace_tf.curvature.structured import (
    KINDS,
    _cached,
    _column_chunk,
    _cut_cotangents,
    _likelihood_key,
    _model_variables,
    _replicated,
    _warn_fallbacks,
    is_piecewise_linear,
)
from laplace_tf.curvature.tracing import trace
from laplace_tf.likelihoods import Likelihood, get_likelihood

# -- blocks ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class KroneckerBlock:
    """``H_W ~= A (x) B`` for a kernel flattened row-major.

    ``inputs`` is ``A = (1/N) sum_n a_n a_n^T`` (conv: ``sum_l`` over output locations
    of the unfolded patches), ``outputs`` is ``B = sum_n sum_k delta_nk delta_nk^T``
    (conv: of ``sum_l delta_nkl``, which is the bias GGN), as BackPACK's KFLR / KFAC.
    """

    inputs: tf.Tensor
    outputs: tf.Tensor


@dataclass(frozen=True)
class DenseBlock:
    """The exact curvature block ``sum_n sum_k g_nk g_nk^T`` of one (small) weight."""

    matrix: tf.Tensor


@dataclass(frozen=True)
class DiagonalBlock:
    """The curvature diagonal ``sum_n sum_k g_nk^2`` of a weight, shaped like it."""

    diagonal: tf.Tensor


Block = KroneckerBlock | DenseBlock | DiagonalBlock


@dataclass(frozen=True)
class StructuredFit:
    """One pass over the data: the curvature (blocks or a matrix), summed NLL and count."""

    curvature: Any
    nll: float
    n_data: int
    n_outputs: int
    n_rows: int | float | None = None  # weighted examples x positions (None: n_data)


# -- fitting ---------------------------------------------------------------------------------


def fit_kron(
    model: keras.Model,
    data: Any,
    *,
    likelihood: str | Likelihood,
    kind: str = "ggn",
    params: Sequence[Any] | None = None,
    mc_samples: int = 1,
    seed: int | None = None,
    batch_size: int = DEFAULT_BATCH_SIZE,
    progress: Callable[[int], None] | None = None,
) -> StructuredFit:
    """Kronecker-factored curvature of the summed NLL, one block per selected weight.

    Kernels with :class:`Outer` factors (Dense on ``[N, I]``) or :class:`Patches`
    factors (Conv, Dense on sequences: positions as locations) get a
    :class:`KroneckerBlock`, the bias of a Dense / EinsumDense / Conv layer a
    :class:`DenseBlock`, every other weight (norm scales, embeddings, EinsumDense
    kernels, fallback layers) a :class:`DiagonalBlock`. Arguments as
    :func:`laplace_tf.curvature.diagonal`.
    """
    step, layout = _structured_step(model, likelihood, kind, params, mc_samples, "kron")
    variables = _model_variables(model, params)
    sums, nll, tally = _accumulate(
        model, likelihood, data, batch_size, seed, step, progress, variables
    )
    blocks, position, count = [], 0, tally.n_data
    for v in variables:
        block = layout[id(v)]
        if block == "kron":
            inputs, outputs = sums[position], sums[position + 1]
            blocks.append(KroneckerBlock(tf.constant(inputs / max(count, 1)), tf.constant(outputs)))
            position += 2
        elif block == "dense":
            blocks.append(DenseBlock(tf.constant(sums[position])))
            position += 1
        else:
            blocks.append(DiagonalBlock(tf.constant(sums[position])))
            position += 1
    return StructuredFit(blocks, nll, tally.n_data, tally.width, tally.n_rows)


def fit_full(
    model: keras.Model,
    data: Any,
    *,
    likelihood: str | Likelihood,
    kind: str = "ggn",
    params: Sequence[Any] | None = None,
    mc_samples: int = 1,
    seed: int | None = None,
    batch_size: int = DEFAULT_BATCH_SIZE,
    progress: Callable[[int], None] | None = None,
) -> StructuredFit:
    """The ``P x P`` curvature ``sum_n sum_k g_nk g_nk^T`` (float64) of the selected weights,
    flattened row-major and concatenated in order (``kind="hessian"`` on a model that is
    not piecewise linear: the exact Hessian, from Hessian-vector products).

    A Dense kernel (with its bias as a constant input) is never expanded into per-example
    gradients: its block is ``sum_n (a_n a_n^T) (x) (delta_n^T delta_n)``, reduced per batch
    into the ``J (J + 1) / 2`` weighted Grams ``a^T diag(c_jm) a`` and assembled once at the
    end. Other weights' per-example gradients are formed for chunks of columns of ``S``
    of at most :data:`FULL_GRADIENT_ENTRIES` entries. Arguments as
    :func:`laplace_tf.curvature.diagonal`."""
    step, layout = _structured_step(
        model, likelihood, kind, params, mc_samples, "full", batch_size=batch_size
    )
    black_box = kind == "hessian" and not is_piecewise_linear(model)  # no layer rules
    variables = None if black_box else _model_variables(model, params)
    sums, nll, tally = _accumulate(
        model, likelihood, data, batch_size, seed, step, progress, variables
    )
    curvature = sums[0] if black_box else _assemble(layout, sums)
    return StructuredFit(tf.constant(curvature), nll, tally.n_data, tally.width, tally.n_rows)


def _accumulate(model, likelihood, data, batch_size, seed, step, progress, variables):
    """Sums of ``step`` over the batches, in float64 (in place, on the host: a large Gram
    is not copied per batch); ``variables``, if given, are those whose layers are named in
    a :class:`FallbackWarning` when they take the fallback."""
    likelihood = get_likelihood(likelihood)
    seed = resolve_seed(seed)
    total, nll, tally = None, 0.0, Tally()
    batches = CheckedPass(model, likelihood, data, batch_size)
    for index, (x, y, w) in enumerate(batches):
        if index == 0 and variables is not None:
            _warn_fallbacks(model, variables, x)
        parts, batch_nll, counts = batches.run(step, x, y, w, tf.constant([seed, index], tf.int64))
        if total is None:
            total = [np.array(p, np.float64) for p in parts]
        else:
            for t, p in zip(total, parts, strict=True):
                np.add(t, p.numpy(), out=t)
        nll += tf.cast(batch_nll, tf.float64)
        tally.add(counts)
        if progress is not None:
            progress(tally.examples)
    return total, float(nll), tally


def _structured_step(model, likelihood, kind, params, mc_samples, reducer, batch_size=0):
    """The cached, compiled batch step of ``reducer`` and the block layout it records."""
    if kind not in KINDS:
        raise ValueError(f"Unknown curvature kind {kind!r}; valid kinds are {', '.join(KINDS)}.")
    positive_int("mc_samples", mc_samples)
    likelihood = get_likelihood(likelihood)
    variables = _model_variables(model, params)
    check_output_activation(model, likelihood)
    build = _kron_step if reducer == "kron" else _full_step
    exact = getattr(likelihood, "exact_output_hessian", True)  # False: S is a Fisher's root
    if kind == "hessian" and exact and is_piecewise_linear(model):
        kind = "ggn"  # the same matrix (almost everywhere), from the cheaper factors
    elif kind == "hessian" and reducer == "full":
        build = _hessian_step
    elif kind == "hessian":
        raise ValueError(
            "curvature='hessian' with the kron structure needs a piecewise-linear model "
            "(ReLU-like activations) and a likelihood whose hessian_factor is its exact "
            "output Hessian, where it equals the GGN; use curvature='ggn', or the full or "
            "diagonal structure."
        )
    key = (reducer, _likelihood_key(likelihood), kind, mc_samples, batch_size)
    return _cached(
        model,
        key,
        variables,
        lambda: _checked(
            build(model, likelihood, variables, kind, mc_samples, batch_size), likelihood
        ),
    )


def _checked(built, likelihood):
    """A builder's ``(step, layout)`` with the step's batch checks compiled in."""
    step, layout = built
    return checked_step(step, likelihood), layout


def _kron_step(model, likelihood, variables, kind, mc_samples, _batch_size):
    layout: dict[int, str] = {}

    def add(sums, key, parts):
        sums[key] = (
            parts if key not in sums else [s + p for s, p in zip(sums[key], parts, strict=True)]
        )

    @tf.function(reduce_retracing=True, autograph=False)
    def step(x, y, weights, seed):
        with tf.GradientTape(persistent=True) as tape:
            raw, sites = trace(model, x, variables)
        terms = loss_rows(raw, y, weights)
        columns = loss_columns(likelihood, kind, mc_samples, terms, seed)
        root = None if terms.example_weights is None else tf.sqrt(terms.example_weights)
        sums: dict[int, list] = {}
        inputs: dict[int, tf.Tensor] = {}
        count, chunk = columns.count, _column_chunk(sites, columns.count)
        for start in range(0, count, chunk):
            part = columns.part(start, min(chunk, count - start))
            for site, cotangent in zip(sites, _cut_cotangents(tape, raw, sites, part), strict=True):
                kernel_outputs = None  # B of this site's kernel: also its bias block
                for factor in site.factors(cotangent):
                    key = id(factor.variables[0])
                    if isinstance(factor, Outer | Patches):
                        if start == 0:  # A does not depend on the columns
                            inputs[key] = _inputs_gram(factor, root)
                        kernel_outputs = _outputs_gram(factor)
                        add(sums, key, [kernel_outputs])
                        layout[key] = "kron"
                    elif _is_bias(site, factor):
                        width = factor.variable.shape.num_elements()
                        if kernel_outputs is None or width != kernel_outputs.shape[-1]:
                            add(sums, key, [_gram(_flat(factor.grads))])
                        else:  # Dense / Conv: the bias gradients are the summed cotangents
                            add(sums, key, [kernel_outputs])
                        layout[key] = "dense"
                    else:
                        for v, square in zip(factor.variables, factor.sum_squares(), strict=True):
                            add(sums, id(v), [square])
                            layout[id(v)] = "diagonal"
        parts = []
        for v in variables:
            if id(v) in inputs:
                parts.append(inputs[id(v)])
            parts.extend(sums[id(v)])
        return parts, loss_nll(likelihood, terms), loss_counts(terms)

    return _replicated(model, step), layout


def _gram(rows: tf.Tensor) -> tf.Tensor:
    """``sum_r x_r x_r^T`` over every leading index of ``rows [..., D]``: one matmul."""
    flat = tf.reshape(rows, [-1, rows.shape[-1]])
    return tf.matmul(flat, flat, transpose_a=True)


def _inputs_gram(factor: Outer | Patches, root: tf.Tensor | None = None) -> tf.Tensor:
    """``sum_n v_n a_n a_n^T`` (conv: also summed over the locations' patches), ``root``
    the square roots of the per-example weights ``v`` (``None``: all 1)."""
    rows = factor.inputs if isinstance(factor, Outer) else factor.patches
    if root is not None:
        root = tf.reshape(tf.cast(root, rows.dtype), [-1] + [1] * (rows.shape.rank - 1))
        rows = rows * root
    return _gram(rows)


def _outputs_gram(factor: Outer | Patches) -> tf.Tensor:
    """``sum_n sum_k delta_nk delta_nk^T`` (conv: of the cotangents summed over locations,
    which are the bias gradients)."""
    if isinstance(factor, Outer):
        return _gram(factor.cotangents)
    return _gram(tf.reduce_sum(factor.cotangents, axis=2))
