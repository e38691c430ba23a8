"""Diagonal sums of Dense chains, a column of ``S`` at a time.

A Dense kernel's diagonal ``sum_n sum_k (a_n (x) d_nk)^2 = (a^2)^T sum_k d_k^2`` reads
its cotangents only through ``sum_k d_k^2``, an ``[N, J]`` tensor that adds up over the
columns. When every factor of a step is of that kind (:class:`~layers.Outer` kernels and
:class:`~layers.Explicit` biases: MLPs), each column is back-propagated on its own and
folded into those sums as soon as it is done, at most :data:`IN_FLIGHT` at once, and
each kernel's product with ``a^2`` is formed once at the end: a couple of columns' cut
cotangents alive at a time, not the ``[N, K, J]`` of all columns (twice, while they are
stacked), at the same FLOPs.

The same holds for any factor with ``column_moments()`` (a tensor that adds up over the
columns, or ``None``) and ``from_column_moments(total)``: Dense kernels, and conv kernels
on up to :data:`~laplace_tf.curvature.paired.PAIRED_LOCATIONS` output locations
(:class:`~layers.Patches`). Where a step loops over the columns one at a time (large
models), :func:`moment_fold` carries those moments through the loop and forms their
products with the inputs once, after it.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import tensorflow as tf

from laplace_tf.curvature import paired
from laplace_tf.curvature.basics import _accumulation_dtype
from laplace_tf.curvature.layers import Explicit, Outer
from laplace_tf.curvature.loss_terms import Columns

#: Columns back-propagated at once: column ``k`` starts when column ``k - IN_FLIGHT``'s
#: sums are in (``0``: unordered, the executor's choice). Benchmark MLP, five
#: alternating pairs of processes: 2 held 5.6-6.5 MiB of live tensors against 7.3-8.7
#: MiB unordered, at the same speed (medians 68 and 77 ms a fit, 1.90x and 1.76x the
#: paired gradient epochs); one at a time (1) held 5.7-6.1 MiB but ran at 3.4x.
IN_FLIGHT = 2


def _column_sum(factor) -> tf.Tensor:
    if isinstance(factor, Outer):
        return factor.cotangent_squares()  # [N, J]
    return factor.sum_squares()[0]


def _finish(factor, total: tf.Tensor) -> tf.Tensor:
    return factor.from_cotangent_squares(total) if isinstance(factor, Outer) else total


def dense_column_sums(factors_of: Callable[[tf.Tensor], list], columns: Columns) -> list | None:
    """``[(factor, sum_squares)]`` over all columns of ``columns``, with ``factors_of(part)``
    the factors of a part ``[N, D, 1]`` of ``S``; ``None`` when a factor of the first column
    is of another kind (its ops are then unused and pruned from the compiled step).
    At most :data:`IN_FLIGHT` columns are back-propagated at once."""
    first = factors_of(columns.part(0, 1))
    if not first or not all(type(f) in (Outer, Explicit) for f in first):
        return None
    sums = [_column_sum(f) for f in first]
    history = [sums]
    for k in range(1, columns.count):
        part = columns.part(k, 1)
        if IN_FLIGHT and k >= IN_FLIGHT:
            with tf.control_dependencies(history[k - IN_FLIGHT]):
                part = tf.identity(part)
        factors = factors_of(part)
        sums = [s + _column_sum(f) for s, f in zip(sums, factors, strict=True)]
        history.append(sums)
    return [(f, _finish(f, s)) for f, s in zip(first, sums, strict=True)]


def per_variable(variables: Sequence[Any], pairs, *, fill: bool = True) -> list:
    """The squares of ``(factor, sum_squares)`` pairs summed per weight, in the order of
    ``variables`` (zeros for a weight no factor covers; ``None`` without ``fill``)."""
    totals = {}  # no zeros to add to: each weight's first square is its total
    for factor, squares in pairs:
        for v, square in zip(factor.variables, squares, strict=True):
            square = tf.cast(square, v.dtype)
            totals[id(v)] = square if id(v) not in totals else totals[id(v)] + square
    if not fill:
        return [totals.get(id(v)) for v in variables]
    return [totals[id(v)] if id(v) in totals else tf.zeros(v.shape, v.dtype) for v in variables]


def _added(total: tf.Tensor, part: tf.Tensor | None) -> tf.Tensor:
    return total if part is None else total + part


def _moments_of(factor) -> tf.Tensor | None:
    moments = getattr(factor, "column_moments", None)
    return None if moments is None else moments()


def _zeros_like(tensor: tf.Tensor) -> tf.Tensor:
    shape = tensor.shape if tensor.shape.is_fully_defined() else tf.shape(tensor)
    return tf.zeros(shape, tensor.dtype)


def moment_fold(factors_of: Callable[[tf.Tensor], list], outside: list, variables: list):
    """``(reduce, zeros, finish)`` for :func:`fold_column_chunks`
    over chunks of columns, or ``None`` when no factor has column moments.

    ``factors_of(part)`` returns the factors of a chunk of columns as one list per site;
    ``outside`` holds, per site, its factors formed outside the loop (on zero cotangents of
    one chunk's width: only their inputs are read), or ``None`` for a site not asked (its
    factors keep their squares). ``reduce(part)`` returns the squares per weight of the
    factors without moments, then the moments of the others, all adding up over the
    chunks; ``finish(totals)`` turns the summed moments into squares (one product with the
    inputs per factor, not one per chunk) and adds them in."""
    picked = {}  # (site, index) -> (outside factor, its moments)
    for site, factors in enumerate(outside):
        for index, factor in enumerate(factors or []):
            moments = _moments_of(factor)
            if moments is not None:
                picked[site, index] = (factor, moments)
    if not picked:
        return None
    zeros = [tf.zeros(v.shape, v.dtype) for v in variables]
    zeros += [_zeros_like(moments) for _, moments in picked.values()]

    def reduce(part):
        plain, sums = [], {}
        for site, factors in enumerate(factors_of(part)):
            for index, factor in enumerate(factors):
                known = picked.get((site, index))
                sum_i = None
                if known is not None and type(factor) is type(known[0]):
                    sum_i = _moments_of(factor)  # every chunk's factors are ``outside``'s
                if sum_i is None or sum_i.shape != known[1].shape:
                    plain.append(factor)
                else:
                    sums[site, index] = sum_i
        moments = [sums.get(key) for key in picked]
        squares = ((f, f.sum_squares()) for f in plain)
        return per_variable(variables, squares, fill=False) + moments  # None: adds nothing

    def finish(totals):
        squares, sums = totals[: len(variables)], totals[len(variables) :]
        pairs = zip(picked.values(), sums, strict=True)
        done = per_variable(
            variables, ((f, f.from_column_moments(s)) for (f, _), s in pairs), fill=False
        )
        return [_added(a, b) for a, b in zip(squares, done, strict=True)]

    return reduce, zeros, finish


def zero_factors(sites, chunk: int) -> list:
    """Per site, its factors on zero cotangents of ``chunk`` columns (their inputs' parts,
    outside a loop over the columns; the cotangents' parts are unused, pruned), for the
    sites whose factors may have column moments (a cut of at most
    :data:`~paired.PAIRED_LOCATIONS` positions, a rule and a weight of two axes or more:
    the kernels of :class:`~layers.Outer` and :class:`~layers.Patches`), else ``None``
    (not traced: asking every site cost ResNet50's first exact ``ggn`` fit 2.3-2.8 s
    more, three alternating pairs of processes; BatchNormalization's gamma and beta take
    explicit factors, with no moments, and are not traced here either)."""
    factors = []
    for site in sites:
        positions = site.cut.shape[1:-1].num_elements() if site.cut.shape.rank else None
        vectors = all(v.shape.rank <= 1 for v in site.variables)  # no moments (Explicit)
        if site.rule is None or vectors or positions is None or positions > paired.PAIRED_LOCATIONS:
            factors.append(None)
            continue
        zeros = tf.zeros_like(site.cut, dtype=_accumulation_dtype(site.cut.dtype))[:, None]
        factors.append(site.factors(tf.repeat(zeros, chunk, axis=1) if chunk > 1 else zeros))
    return factors


def fold_column_chunks(
    reduce, columns: Columns, chunk: int, zeros: list, *, unroll: bool = False
) -> list[tf.Tensor]:
    """``sum_j reduce(columns.part(j chunk, chunk))`` over the chunks of ``chunk`` columns
    (the last one zero-padded; zero columns add zero); ``zeros`` are zeros shaped like
    ``reduce``'s results (the loop's first value).

    One chunk is back-propagated and reduced at a time, in a ``tf.while_loop`` run one
    iteration after another, so that only one chunk's cut cotangents exist at once and
    the backward pass is traced once, not once per chunk (or, with ``unroll``, unrolled
    with each chunk waiting for the previous; see :data:`UNROLL_COLUMN_CHUNKS`). A
    ``None`` of ``reduce`` adds nothing (no zeros traced and added each chunk).
    """
    count = columns.count
    if count <= chunk:
        sums = reduce(columns.part(0, count))
        return [z if s is None else s for z, s in zip(zeros, sums, strict=True)]
    if unroll:
        totals = None
        for start in range(0, count, chunk):  # each chunk waits for the previous one's sums
            with tf.control_dependencies([] if totals is None else totals):
                part = tf.identity(columns.part(start, min(chunk, count - start)))
            sums = reduce(part)
            if totals is None:
                totals = [z if s is None else s for z, s in zip(zeros, sums, strict=True)]
            else:
                totals = [_added(t, s) for t, s in zip(totals, sums, strict=True)]
        return totals
    chunks = -(-count // chunk)

    def body(index, totals):
        part = columns.part(index * chunk, chunk)
        return index + 1, [_added(t, s) for t, s in zip(totals, reduce(part), strict=True)]

    _, totals = tf.while_loop(
        lambda index, _: index < chunks, body, (tf.constant(0), zeros), parallel_iterations=1
    )
    return totals
