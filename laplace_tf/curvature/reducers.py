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

from laplace_tf._checks import positive_int, resolve_seed, unwrap_variable
from laplace_tf._data import DEFAULT_BATCH_SIZE
from laplace_tf._validation import check_output_activation
from laplace_tf.curvature.basics import CheckedPass, checked_step
from laplace_tf.curvature.layers import Explicit, Outer, Patches, PerExample, Rows
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
    n_rows: int | float | None = None  # weighted examples x positions (None: n_data)


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
    """``[N, K, *shape]`` -> ``[N, K, P]`` (``P`` static when the shape is)."""
    shape, width = tf.shape(grads), grads.shape[2:].num_elements()
    return tf.reshape(grads, [shape[0], shape[1], -1 if width is None else width])


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


# -- the full Gram ---------------------------------------------------------------------------


@dataclass(frozen=True)
class _Item:
    """Consecutive selected weights, ``size`` entries from ``offset`` in the flattened
    vector, whose gradients are ``a_n (x) delta_nk`` (``inputs`` > 0: a Dense kernel, its
    bias as an extra constant input) or formed densely (``inputs`` = 0)."""

    offset: int
    size: int
    inputs: int = 0
    outputs: int = 0


def _full_step(model, likelihood, variables, kind, mc_samples, batch_size):
    """One batch of the full Gram as parts that :func:`_assemble` places: ``("pairs",
    p, p)`` the ``[J (J + 1) / 2, I, I]`` weighted Grams of a Dense item, ``("cross", p,
    q)`` the ``[J M, I, L]`` ones between two, ``("block", p, q)`` a ``[P_p, P_q]`` block."""
    size = sum(v.shape.num_elements() for v in variables)
    layout: dict[str, list] = {"items": [], "parts": []}

    @tf.function(reduce_retracing=True, autograph=False)
    def step(x, y, weights, seed):
        with tf.GradientTape(persistent=True) as tape:
            raw, sites = trace(model, x, variables)
        terms = loss_rows(raw, y, weights)
        columns = loss_columns(likelihood, kind, mc_samples, terms, seed)
        count = columns.count
        bound = FULL_GRADIENT_ENTRIES // max(batch_size * size, 1)
        chunk = max(1, min(_column_chunk(sites, count), bound))
        sums: dict[tuple, tf.Tensor] = {}
        for start in range(0, count, chunk):
            part = columns.part(start, min(chunk, count - start))
            pieces = _pieces(tape, raw, sites, part, variables)
            for p in range(len(pieces)):
                for q in range(p, len(pieces)):
                    key, value = _pair_sum(pieces[p], pieces[q], p, q)
                    sums[key] = value if key not in sums else sums[key] + value
        parts, entries = [], []
        for (name, p, q), value in sums.items():
            if name == "cotangents":  # sum_k delta_nk e_nk^T of two Dense items
                (a, _, _), (b, _, _) = pieces[p], pieces[q]
                name = "pairs" if p == q else "cross"
                value = _weighted_grams(a, b, value, p == q, batch_size)
            parts.append(value)
            entries.append((name, p, q))
        layout["items"], layout["parts"] = [piece[2] for piece in pieces], entries
        return parts, loss_nll(likelihood, terms), loss_counts(terms)

    return _replicated(model, step), layout


def _pieces(tape, raw, sites, columns, variables) -> list[tuple]:
    """``(a, delta, item)`` for Dense kernels (their bias merged as a column of ones in
    ``a``), ``(None, grads [N, K, P_v], item)`` for the other weights, in order."""
    by_variable = {}
    cotangents = _cut_cotangents(tape, raw, sites, columns)
    for site, cotangent in zip(sites, cotangents, strict=True):
        kernel = None
        for factor in site.factors(cotangent):
            if isinstance(factor, Outer):
                kernel = factor
                by_variable[id(factor.variable)] = (factor.inputs, factor.cotangents)
            elif kernel is not None and _is_bias(site, factor):  # Dense: grads = delta
                ones = tf.ones_like(kernel.inputs[:, :1])
                by_variable[id(factor.variable)] = (ones, kernel.cotangents)
            else:
                for v, g in zip(factor.variables, dense_gradients(factor), strict=True):
                    by_variable[id(v)] = (None, _flat(g))
    pieces, offset = [], 0
    for v in variables:
        a, grads = by_variable[id(v)]
        width = v.shape.num_elements()
        last = pieces[-1] if pieces else None
        if a is not None and last is not None and last[1] is grads:  # a bias after its kernel
            merged = tf.concat([last[0], a], axis=1)
            item = _Item(last[2].offset, last[2].size + width, merged.shape[-1], grads.shape[-1])
            pieces[-1] = (merged, grads, item)
        elif a is not None:
            pieces.append((a, grads, _Item(offset, width, a.shape[-1], grads.shape[-1])))
        else:
            pieces.append((None, grads, _Item(offset, width)))
        offset += width
    return pieces


def _pair_sum(left: tuple, right: tuple, p: int, q: int) -> tuple[tuple, tf.Tensor]:
    """The part of one column chunk for items ``p <= q``: ``sum_k delta_nk e_nk^T``
    ``[N, J, M]`` between Dense items (their Grams are formed once per batch), the
    ``[P_p, P_q]`` block otherwise, without ``[N, K, I, J]`` gradients."""
    (a, delta, _), (b, e, _) = left, right
    if a is not None and b is not None:
        return ("cotangents", p, q), tf.matmul(delta, e, transpose_a=True)
    if a is None and b is None:
        return ("block", p, q), _cross_gram(delta, e)
    if a is not None:
        return ("block", p, q), _outer_dense(a, delta, e)
    return ("block", p, q), tf.transpose(_outer_dense(b, e, delta))


def _cross_gram(left: tf.Tensor, right: tf.Tensor) -> tf.Tensor:
    """``sum_n sum_k g_nk h_nk^T`` for ``[N, K, P]`` and ``[N, K, Q]``."""
    return tf.matmul(
        tf.reshape(left, [-1, left.shape[-1]]),
        tf.reshape(right, [-1, right.shape[-1]]),
        transpose_a=True,
    )


def _outer_dense(a: tf.Tensor, delta: tf.Tensor, grads: tf.Tensor) -> tf.Tensor:
    """``sum_n sum_k (a_n (x) delta_nk) g_nk^T = sum_n a_n (x) (delta_n^T g_n)``, ``[I J, P]``."""
    n, inputs, outputs = tf.shape(a)[0], a.shape[-1], delta.shape[-1]
    cross = tf.matmul(delta, grads, transpose_a=True)  # [N, J, P]
    block = tf.matmul(a, tf.reshape(cross, [n, outputs * grads.shape[-1]]), transpose_a=True)
    return tf.reshape(block, [inputs * outputs, grads.shape[-1]])


def _weighted_grams(a, b, cross, symmetric: bool, batch_size: int) -> tf.Tensor:
    """``[Q, I, L]``: ``sum_n c_njm a_n b_n^T`` for the pairs ``(j, m)`` of ``cross
    [N, J, M]`` (``j <= m`` only when ``symmetric``), in batched matmuls whose weighted
    copies of ``a`` hold at most :data:`FULL_GRADIENT_ENTRIES` entries."""
    n, outputs = tf.shape(a)[0], cross.shape[-1]
    weights = tf.reshape(cross, [n, cross.shape[1] * outputs])
    if symmetric:
        rows, cols = np.triu_indices(outputs)
        weights = tf.gather(weights, rows * outputs + cols, axis=1)
    pairs = weights.shape[-1]
    per_slice = max(1, FULL_GRADIENT_ENTRIES // max(batch_size * a.shape[-1], 1))
    grams = []
    for start in range(0, pairs, per_slice):
        scaled = tf.transpose(weights[:, start : start + per_slice])[:, :, None] * a[None]
        grams.append(tf.matmul(scaled, b[None], transpose_a=True))
    return tf.concat(grams, axis=0)


def _assemble(layout: dict[str, list], sums: list[np.ndarray]) -> np.ndarray:
    """The symmetric ``P x P`` float64 Gram from the parts of :func:`_full_step`:
    ``G[(i, j), (l, m)] = W_jm[i, l]`` for the weighted Grams of Dense items."""
    items = layout["items"]
    size = sum(item.size for item in items)
    result = np.empty((size, size))
    for (name, p, q), value in zip(layout["parts"], sums, strict=True):
        left, right = items[p], items[q]
        rows = slice(left.offset, left.offset + left.size)
        cols = slice(right.offset, right.offset + right.size)
        if name == "block":
            block = value
        else:
            shape = (left.inputs, left.outputs, right.inputs, right.outputs)
            j, m = shape[1], shape[3]
            whole = len(items) == 1
            block4 = result.reshape(shape) if whole else np.empty(shape)
            if name == "pairs":
                index = np.empty((j, j), int)
                upper = np.triu_indices(j)
                index[upper] = index[upper[::-1]] = np.arange(len(upper[0]))
            else:
                index = np.arange(j * m).reshape(j, m)
            for r in range(j):
                for c in range(m):
                    block4[:, r, :, c] = value[index[r, c]]
            if whole:
                continue
            block = block4.reshape(left.size, right.size)
        result[rows, cols] = block
        if p != q:
            result[cols, rows] = block.T
    return result


def _hessian_step(model, likelihood, variables, _kind, _mc_samples, _batch_size):
    """The exact Hessian of the batch NLL in the selected weights, ``P`` Hessian-vector
    products (vectorised) per batch: for models that are not piecewise linear."""
    size = sum(v.shape.num_elements() for v in variables)

    @tf.function(reduce_retracing=True, autograph=False)
    def step(x, y, weights, seed):
        sources = [unwrap_variable(v) for v in variables]
        with tf.GradientTape(persistent=True) as outer:
            with tf.GradientTape() as inner:
                terms = loss_rows(model(x, training=False), y, weights)
                nll = loss_nll(likelihood, terms)
            grads = inner.gradient(nll, sources, unconnected_gradients="zero")
            flat = tf.concat([tf.reshape(g, [-1]) for g in grads], axis=0)
        rows = outer.jacobian(flat, sources, unconnected_gradients="zero")
        hessian = tf.concat([tf.reshape(r, [size, -1]) for r in rows], axis=1)
        return [tf.cast(hessian, tf.float64)], nll, loss_counts(terms)

    return _replicated(model, step), {}


def _jacobian(tape, raw, sites, columns, variables) -> tf.Tensor:
    """``[N, K, P]``: the gradients of the columns, concatenated over ``variables``."""
    grads = {}
    for site, cotangent in zip(sites, _cut_cotangents(tape, raw, sites, columns), strict=True):
        for factor in site.factors(cotangent):
            for v, g in zip(factor.variables, dense_gradients(factor), strict=True):
                grads[id(v)] = g
    return tf.concat([_flat(grads[id(v)]) for v in variables], axis=-1)
