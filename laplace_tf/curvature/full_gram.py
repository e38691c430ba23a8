"""The full Gram of the selected weights' per-example gradients, and the exact Hessian.

:func:`laplace_tf.curvature.reducers.fit_full` sums, per batch, the pieces built here: a
Dense kernel's block ``sum_n (a_n a_n^T) (x) (delta_n^T delta_n)`` from weighted Grams of
its inputs (never per-example gradients), every other weight's per-example gradients
(:func:`dense_gradients`) for chunks of columns of ``S``; :func:`_assemble` lays the sums
out as one matrix. Also the per-example gradients that :mod:`glm` and the Kronecker
reducer read.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import keras
import numpy as np
import tensorflow as tf

from laplace_tf._checks import unwrap_variable
from laplace_tf.curvature.layers import Explicit, Outer, Patches, PerExample, Rows
from laplace_tf.curvature.loss_terms import counts as loss_counts
from laplace_tf.curvature.loss_terms import loss_columns, loss_rows
from laplace_tf.curvature.loss_terms import nll as loss_nll
from laplace_tf.curvature.structured import (
    _column_chunk,
    _cut_cotangents,
    _replicated,
)
from laplace_tf.curvature.tracing import trace

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
