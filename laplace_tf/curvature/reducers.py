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
import tensorflow as tf

from laplace_tf._checks import positive_int, resolve_seed, unwrap_variable
from laplace_tf._data import DEFAULT_BATCH_SIZE
from laplace_tf._validation import check_output_activation
from laplace_tf.curvature.layers import Explicit, Outer, Patches, PerExample, Rows
from laplace_tf.curvature.structured import (
    KINDS,
    _add_in_float64,
    _cached,
    _checked_batches,
    _column_chunk,
    _cut_cotangents,
    _likelihood_key,
    _loss_columns,
    _loss_outputs,
    _model_variables,
    _replicated,
    _warn_fallbacks,
    is_piecewise_linear,
)
from laplace_tf.curvature.tracing import trace
from laplace_tf.likelihoods import Likelihood, get_likelihood

#: Bound on the entries of the per-example gradients ``[N, K, P]`` formed at once by the
#: full reducer (columns of ``S`` are processed in chunks to stay below it).
FULL_GRADIENT_ENTRIES = 2**24
#: Layers whose bias gets a full block under the Kronecker structure.
_KRONECKER_LAYERS = (
    keras.layers.Dense,
    keras.layers.EinsumDense,
    keras.layers.Conv1D,
    keras.layers.Conv2D,
)


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


# -- per-example gradients -------------------------------------------------------------------


def dense_gradients(factor: Any) -> list[tf.Tensor]:
    """The per-example, per-column gradients ``[N, K, *shape]`` a factor stands for, one
    tensor per variable of ``factor.variables`` (for small weights only)."""
    if hasattr(factor, "dense_grads"):
        grads = factor.dense_grads()
        return [grads] if isinstance(grads, tf.Tensor) else list(grads)
    if isinstance(factor, Outer):
        grads = tf.einsum("ni,nkj->nkij", factor.inputs, factor.cotangents)
    elif isinstance(factor, Patches):
        grads = tf.einsum("nlq,nklo->nkqo", factor.patches, factor.cotangents)
    elif isinstance(factor, Rows):
        vocabulary = factor.variable.shape[0]
        hits = tf.one_hot(factor.ids, vocabulary, dtype=factor.cotangents.dtype)
        grads = tf.einsum("ntv,nktd->nkvd", hits, factor.cotangents)
    elif isinstance(factor, Explicit):
        grads = factor.grads
    elif isinstance(factor, PerExample):
        return factor._grads(tf.range(tf.shape(factor.cotangents)[0]))
    else:
        raise TypeError(f"no per-example gradients for a {type(factor).__name__} factor.")
    (variable,) = factor.variables
    return [tf.reshape(grads, tf.concat([tf.shape(grads)[:2], variable.shape], 0))]


def _flat(grads: tf.Tensor) -> tf.Tensor:
    shape = tf.shape(grads)
    return tf.reshape(grads, [shape[0], shape[1], -1])


def _is_bias(site, factor) -> bool:
    return (
        isinstance(factor, Explicit)
        and isinstance(site.layer, _KRONECKER_LAYERS)
        and factor.variable is getattr(site.layer, "bias", None)
    )


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
    sums, nll, count, width = _accumulate(
        model, likelihood, data, batch_size, seed, step, progress, variables
    )
    blocks, position = [], 0
    for v in variables:
        block = layout[id(v)]
        if block == "kron":
            inputs, outputs = sums[position], sums[position + 1]
            blocks.append(KroneckerBlock(inputs / max(count, 1), outputs))
            position += 2
        elif block == "dense":
            blocks.append(DenseBlock(sums[position]))
            position += 1
        else:
            blocks.append(DiagonalBlock(sums[position]))
            position += 1
    return StructuredFit(blocks, nll, count, width)


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
    not piecewise linear: the exact Hessian, from Hessian-vector products). Per batch,
    columns of ``S`` are taken in chunks so that at most :data:`FULL_GRADIENT_ENTRIES`
    gradient entries exist at once. Arguments as :func:`laplace_tf.curvature.diagonal`."""
    step, _ = _structured_step(
        model, likelihood, kind, params, mc_samples, "full", batch_size=batch_size
    )
    black_box = kind == "hessian" and not is_piecewise_linear(model)  # no layer rules
    variables = None if black_box else _model_variables(model, params)
    sums, nll, count, width = _accumulate(
        model, likelihood, data, batch_size, seed, step, progress, variables
    )
    return StructuredFit(sums[0], nll, count, width)


def _accumulate(model, likelihood, data, batch_size, seed, step, progress, variables):
    """Sums of ``step`` over the batches; ``variables``, if given, are those whose layers
    are named in a :class:`FallbackWarning` when they take the fallback."""
    likelihood = get_likelihood(likelihood)
    seed = resolve_seed(seed)
    total, nll, count, shape = None, 0.0, 0, None
    for index, (x, y) in enumerate(_checked_batches(model, likelihood, data, batch_size)):
        if index == 0 and variables is not None:
            _warn_fallbacks(model, variables, x)
        parts, batch_nll, shape = step(x, y, tf.constant([seed, index], tf.int64))
        total = _add_in_float64(total, parts)
        nll += tf.cast(batch_nll, tf.float64)
        count += int(shape[0])
        if progress is not None:
            progress(count)
    return total, float(nll), count, int(shape[1])


def _structured_step(model, likelihood, kind, params, mc_samples, reducer, batch_size=0):
    """The cached, compiled batch step of ``reducer`` and the block layout it records."""
    if kind not in KINDS:
        raise ValueError(f"Unknown curvature kind {kind!r}; valid kinds are {', '.join(KINDS)}.")
    positive_int("mc_samples", mc_samples)
    likelihood = get_likelihood(likelihood)
    variables = _model_variables(model, params)
    check_output_activation(model, likelihood)
    build = _kron_step if reducer == "kron" else _full_step
    if kind == "hessian" and is_piecewise_linear(model):
        kind = "ggn"  # the same matrix (almost everywhere), from the cheaper factors
    elif kind == "hessian" and reducer == "full":
        build = _hessian_step
    elif kind == "hessian":
        raise ValueError(
            "curvature='hessian' with the kron structure needs a piecewise-linear model "
            "(ReLU-like activations), where it equals the GGN; use curvature='ggn', or the "
            "full or diagonal structure."
        )
    key = (reducer, _likelihood_key(likelihood), kind, mc_samples, batch_size)
    return _cached(
        model,
        key,
        variables,
        lambda: build(model, likelihood, variables, kind, mc_samples, batch_size),
    )


def _kron_step(model, likelihood, variables, kind, mc_samples, _batch_size):
    layout: dict[int, str] = {}

    def add(sums, key, parts):
        sums[key] = (
            parts if key not in sums else [s + p for s, p in zip(sums[key], parts, strict=True)]
        )

    @tf.function(reduce_retracing=True, autograph=False)
    def step(x, y, seed):
        with tf.GradientTape(persistent=True) as tape:
            raw, sites = trace(model, x, variables)
            outputs = _loss_outputs(raw)
        columns = _loss_columns(likelihood, kind, mc_samples, outputs, y, seed)
        sums: dict[int, list] = {}
        inputs: dict[int, tf.Tensor] = {}
        count, chunk = columns.shape[-1], _column_chunk(sites, columns.shape[-1])
        for start in range(0, count, chunk):
            part = columns[:, :, start : start + chunk]
            for site, cotangent in zip(sites, _cut_cotangents(tape, raw, sites, part), strict=True):
                for factor in site.factors(cotangent):
                    key = id(factor.variables[0])
                    if isinstance(factor, Outer):
                        a, delta = factor.inputs, factor.cotangents
                        inputs[key] = tf.matmul(a, a, transpose_a=True)
                        add(sums, key, [tf.einsum("nki,nkj->ij", delta, delta)])
                        layout[key] = "kron"
                    elif isinstance(factor, Patches):
                        p = factor.patches
                        inputs[key] = tf.einsum("nlq,nlr->qr", p, p)
                        summed = tf.reduce_sum(factor.cotangents, axis=2)
                        add(sums, key, [tf.einsum("nki,nkj->ij", summed, summed)])
                        layout[key] = "kron"
                    elif _is_bias(site, factor):
                        flat = _flat(factor.grads)
                        add(sums, key, [tf.einsum("nki,nkj->ij", flat, flat)])
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
        return parts, likelihood.nll(outputs, y), tf.shape(outputs)

    return _replicated(model, step), layout


def _full_step(model, likelihood, variables, kind, mc_samples, batch_size):
    size = sum(v.shape.num_elements() for v in variables)

    @tf.function(reduce_retracing=True, autograph=False)
    def step(x, y, seed):
        with tf.GradientTape(persistent=True) as tape:
            raw, sites = trace(model, x, variables)
            outputs = _loss_outputs(raw)
        columns = _loss_columns(likelihood, kind, mc_samples, outputs, y, seed)
        count = columns.shape[-1]
        bound = FULL_GRADIENT_ENTRIES // max(batch_size * size, 1)
        chunk = max(1, min(_column_chunk(sites, count), bound))
        blocks: dict[tuple[int, int], tf.Tensor] = {}
        for start in range(0, count, chunk):
            part = columns[:, :, start : start + chunk]
            pieces = _GradientPieces(tape, raw, sites, part, variables)
            for i in range(len(variables)):
                for j in range(i, len(variables)):
                    block = tf.cast(pieces.gram(i, j, batch_size), tf.float64)
                    blocks[i, j] = block if (i, j) not in blocks else blocks[i, j] + block
        rows = [
            tf.concat(
                [
                    blocks[i, j] if i <= j else tf.transpose(blocks[j, i])
                    for j in range(len(variables))
                ],
                axis=1,
            )
            for i in range(len(variables))
        ]
        return [tf.concat(rows, axis=0)], likelihood.nll(outputs, y), tf.shape(outputs)

    return _replicated(model, step), {}


def _hessian_step(model, likelihood, variables, _kind, _mc_samples, _batch_size):
    """The exact Hessian of the batch NLL in the selected weights, ``P`` Hessian-vector
    products (vectorised) per batch: for models that are not piecewise linear."""
    size = sum(v.shape.num_elements() for v in variables)

    @tf.function(reduce_retracing=True, autograph=False)
    def step(x, y, seed):
        sources = [unwrap_variable(v) for v in variables]
        with tf.GradientTape(persistent=True) as outer:
            with tf.GradientTape() as inner:
                outputs = _loss_outputs(model(x, training=False))
                nll = likelihood.nll(outputs, y)
            grads = inner.gradient(nll, sources, unconnected_gradients="zero")
            flat = tf.concat([tf.reshape(g, [-1]) for g in grads], axis=0)
        rows = outer.jacobian(flat, sources, unconnected_gradients="zero")
        hessian = tf.concat([tf.reshape(r, [size, -1]) for r in rows], axis=1)
        return [tf.cast(hessian, tf.float64)], nll, tf.shape(outputs)

    return _replicated(model, step), {}


class _GradientPieces:
    """The per-example gradients of one chunk of columns, per selected variable: Dense
    kernels as their factors ``(a, delta)``, the others as ``[N, K, P_v]`` tensors."""

    def __init__(self, tape, raw, sites, columns, variables):
        self.outer: dict[int, tuple[tf.Tensor, tf.Tensor]] = {}
        self.dense: dict[int, tf.Tensor] = {}
        cotangents = _cut_cotangents(tape, raw, sites, columns)
        for site, cotangent in zip(sites, cotangents, strict=True):
            for factor in site.factors(cotangent):
                if isinstance(factor, Outer):
                    self.outer[id(factor.variable)] = (factor.inputs, factor.cotangents)
                    continue
                for v, g in zip(factor.variables, dense_gradients(factor), strict=True):
                    self.dense[id(v)] = _flat(g)
        self.keys = [id(v) for v in variables]

    def flat(self, index: int) -> tf.Tensor:
        key = self.keys[index]
        if key not in self.dense:
            inputs, cotangents = self.outer[key]
            self.dense[key] = _flat(tf.einsum("ni,nkj->nkij", inputs, cotangents))
        return self.dense[key]

    def gram(self, i: int, j: int, batch_size: int) -> tf.Tensor:
        """``sum_n sum_k g_nk^(i) g_nk^(j)^T``. Between two Dense kernels it is
        ``sum_n (a_n b_n^T) (x) (delta_n^T e_n)``: the columns are summed before the
        ``P_i x P_j`` product (K times fewer operations), over slices of the outputs of
        ``i`` whose ``[N, I, J_s, M]`` intermediates fit in :data:`FULL_GRADIENT_ENTRIES`."""
        left, right = self.outer.get(self.keys[i]), self.outer.get(self.keys[j])
        if left is not None and right is not None:
            (a, delta), (b, e) = left, right
            inputs, outputs = a.shape[-1], delta.shape[-1]
            width = FULL_GRADIENT_ENTRIES // max(batch_size * inputs * e.shape[-1], 1)
            if width >= 1:
                cross = tf.einsum("nkj,nkm->njm", delta, e)
                slices = [
                    tf.einsum("nijm,nl->ijlm", tf.einsum("ni,njm->nijm", a, part), b)
                    for part in tf.split(cross, _slices(outputs, width), axis=1)
                ]
                return tf.reshape(tf.concat(slices, axis=1), [inputs * outputs, -1])
        return tf.einsum("nki,nkj->ij", self.flat(i), self.flat(j))


def _slices(size: int, width: int) -> list[int]:
    """``size`` split into consecutive pieces of at most ``width``."""
    return [min(width, size - start) for start in range(0, size, width)]


def _jacobian(tape, raw, sites, columns, variables) -> tf.Tensor:
    """``[N, K, P]``: the gradients of the columns, concatenated over ``variables``."""
    grads = {}
    for site, cotangent in zip(sites, _cut_cotangents(tape, raw, sites, columns), strict=True):
        for factor in site.factors(cotangent):
            for v, g in zip(factor.variables, dense_gradients(factor), strict=True):
                grads[id(v)] = g
    return tf.concat([_flat(grads[id(v)]) for v in variables], axis=-1)
