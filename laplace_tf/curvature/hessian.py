"""Black-box Hessian diagonals of a scalar loss: exact and stochastic (Hutchinson).

Both functions treat ``loss_fn`` as opaque TensorFlow code and need only its
Hessian-vector products H v, computed reverse-over-reverse: the gradient g(theta)
is recorded by an outer tape and differentiated again with v as its cotangent.

Nested tapes alone do *not* give the diagonal: ``outer.gradient(inner.gradient(loss,
p), p)`` seeds the non-scalar gradient with ones and so returns H @ 1, the row sums
of H. The exact diagonal here is e_j^T H e_j for every j, with the one-hot directions
e_j processed a chunk at a time and vectorised with ``pfor`` inside one ``tf.function``.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import numpy as np
import tensorflow as tf

from laplace_tf._checks import positive_int, resolve_seed
from laplace_tf._params import as_param_list

#: Bound on the number of Hessian entries (directions x block size) held by one chunk.
MAX_CHUNK_ENTRIES = 2**24
#: Default number of one-hot directions processed together (before the bound above).
DEFAULT_CHUNK_SIZE = 256

LossFn = Callable[..., tf.Tensor]


def hessian_diagonal(
    loss_fn: LossFn,
    params: Sequence[Any],
    *,
    data: Iterable[Any] | None = None,
    chunk_size: int | None = None,
) -> list[tf.Tensor]:
    """Exact diagonal of the Hessian of a scalar loss.

    ``diag(H)_j = e_j^T H e_j`` with ``H = d^2 loss / d theta^2``, computed with one
    Hessian-vector product per entry: the one-hot directions of each parameter are
    batched in chunks and vectorised, so the cost is about ``P / chunk_size``
    vectorised passes rather than ``P`` Python-level ones.

    Parameters
    ----------
    loss_fn : callable
        ``loss_fn()`` (or ``loss_fn(batch)`` when ``data`` is given) returns a scalar
        loss that reads the parameters. It is traced by ``tf.function``, so it must be
        TensorFlow code (no ``.numpy()`` calls on the parameters).
    params : sequence of tf.Variable, keras.Variable or tf.Tensor
        The parameters, of any shapes and floating dtypes. Tensors must be the very
        objects ``loss_fn`` reads.
    data : iterable, optional
        Batches (e.g. a ``tf.data.Dataset``). The result is then the diagonal of the
        Hessian of ``sum_b loss_fn(b)``; a partial last batch counts for what it holds.
    chunk_size : int, optional
        Directions processed at once. Memory grows linearly with it (about
        ``chunk_size`` times the memory of one Hessian-vector product). Default:
        ``min(256, 2**24 // n)`` for a parameter of ``n`` entries, at least 1.

    Returns
    -------
    list of tf.Tensor
        The diagonal, shaped like ``params`` and in their dtypes. Entries the loss
        does not depend on are zero.

    Examples
    --------
    >>> import tensorflow as tf
    >>> w = tf.Variable([1.0, 2.0])
    >>> [d.numpy().tolist() for d in hessian_diagonal(lambda: w[0] ** 3 * w[1], [w])]
    [[12.0, 0.0]]
    """
    params = as_param_list(params)
    _check_chunk_size(chunk_size)
    row_blocks = _compiled(
        ("rows", loss_fn, *params),
        lambda: [_hessian_row_block_fn(loss_fn, params, i) for i in range(len(params))],
    )
    result = [np.zeros(p.shape, dtype=p.dtype.as_numpy_dtype) for p in params]
    for batch in _batches(data):
        for index, param in enumerate(params):
            size = param.shape.num_elements()
            if size == 0:
                continue
            chunk = _chunk_for(size, chunk_size)
            flat = result[index].reshape(-1)
            for start in range(0, size, chunk):
                rows = row_blocks[index](batch, tf.constant(start, tf.int64), chunk)
                stop = min(start + chunk, size)
                flat[start:stop] += rows.numpy()[: stop - start]
    return [tf.constant(r) for r in result]


def hutchinson_diagonal(
    loss_fn: LossFn,
    params: Sequence[Any],
    *,
    num_samples: int,
    seed: int | None = None,
    data: Iterable[Any] | None = None,
    chunk_size: int | None = None,
) -> list[tf.Tensor]:
    """Hutchinson's stochastic estimate of the Hessian diagonal.

    ``diag(H) ~= mean_s v_s * (H v_s)`` with Rademacher probe vectors ``v_s`` (entries
    +-1); unbiased, with variance ``sum_{k != j} H_jk^2`` per probe for entry ``j``.
    Costs ``num_samples`` Hessian-vector products, vectorised in chunks. With ``data``,
    the same probes are used for every batch, so the result is exactly the estimate for
    the summed loss.

    Parameters
    ----------
    loss_fn, params, data
        As in :func:`hessian_diagonal`.
    num_samples : int
        Number of probe vectors (>= 1).
    seed : int, optional
        Seed of the probes; the same seed gives the same result. ``None`` draws one.
    chunk_size : int, optional
        Probes processed at once (default ``min(num_samples, 64)``).

    Returns
    -------
    list of tf.Tensor
        The estimate, shaped like ``params`` and in their dtypes.
    """
    params = as_param_list(params)
    positive_int("num_samples", num_samples)
    _check_chunk_size(chunk_size)
    seed = resolve_seed(seed)
    chunk = min(num_samples, chunk_size or 64)
    probe_products = _compiled(
        ("probes", loss_fn, *params), lambda: _probe_product_fn(loss_fn, params)
    )
    result = [np.zeros(p.shape, dtype=p.dtype.as_numpy_dtype) for p in params]
    for batch in _batches(data):
        for start in range(0, num_samples, chunk):
            count = min(chunk, num_samples - start)
            seed_pair = tf.constant([seed, start], tf.int64)
            sums = probe_products(batch, seed_pair, count)
            for total, part in zip(result, sums, strict=True):
                total += part.numpy()
    return [tf.constant(r / num_samples) for r in result]


#: Compiled functions of the most recent calls, so that repeated calls with the same loss
#: and parameters do not trace again. Entries hold the loss and parameters alive, so their
#: identities in the keys stay unique; the cache is small to bound what it keeps alive.
_COMPILED: OrderedDict = OrderedDict()
_COMPILED_SIZE = 8


def _compiled(objects: tuple, build):
    key = tuple(id(o) for o in objects)
    if key in _COMPILED:
        _COMPILED.move_to_end(key)
        return _COMPILED[key][1]
    value = build()
    _COMPILED[key] = (objects, value)
    while len(_COMPILED) > _COMPILED_SIZE:
        _COMPILED.popitem(last=False)
    return value


def _check_chunk_size(chunk_size: int | None) -> None:
    if chunk_size is not None:
        positive_int("chunk_size", chunk_size)


def _chunk_for(size: int, chunk_size: int | None) -> int:
    if chunk_size is not None:
        return min(size, int(chunk_size))
    return max(1, min(size, DEFAULT_CHUNK_SIZE, MAX_CHUNK_ENTRIES // size))


_NO_DATA = object()


def _batches(data: Iterable[Any] | None):
    """Yield the batches of ``data`` (numpy leaves as tensors), or one marker without data."""
    if data is None:
        yield _NO_DATA
        return
    seen = False
    for batch in data:
        seen = True
        yield tf.nest.map_structure(
            lambda leaf: tf.convert_to_tensor(leaf) if isinstance(leaf, np.ndarray) else leaf,
            batch,
        )
    if not seen:
        raise ValueError("data yielded no batches; the Hessian of an empty sum is undefined.")


def _scalar_loss(loss_fn: LossFn, batch: Any) -> tf.Tensor:
    loss = loss_fn() if batch is _NO_DATA else loss_fn(batch)
    loss = tf.convert_to_tensor(loss)
    if loss.shape.rank != 0:
        raise ValueError(f"loss_fn must return a scalar, got a tensor of shape {loss.shape}.")
    return loss


def _first_gradient(tape: tf.GradientTape, loss_fn: LossFn, batch: Any, params: list) -> list:
    with tf.GradientTape() as inner:
        for p in params:
            inner.watch(p)
        loss = _scalar_loss(loss_fn, batch)
    gradient = inner.gradient(loss, params, unconnected_gradients=tf.UnconnectedGradients.ZERO)
    return [
        tf.cast(tf.convert_to_tensor(g), p.dtype) for g, p in zip(gradient, params, strict=True)
    ]


def _hessian_row_block_fn(loss_fn: LossFn, params: list, index: int):
    """``(batch, start, chunk) -> diag(H)[start:start+chunk]`` of ``params[index]``.

    The rows ``H[j, :]`` of one parameter's own block are the Jacobian of its gradient
    entries, vectorised over ``j``; the diagonal entry is picked from each row.
    """

    @tf.function(reduce_retracing=True, autograph=False)
    def row_block(batch, start: tf.Tensor, chunk: int) -> tf.Tensor:
        param = params[index]
        size = param.shape.num_elements()
        positions = tf.minimum(start + tf.range(chunk, dtype=tf.int64), size - 1)
        with tf.GradientTape(persistent=True) as outer:
            for p in params:
                outer.watch(p)
            gradient = _first_gradient(outer, loss_fn, batch, params)[index]
            selected = tf.gather(tf.reshape(gradient, [-1]), positions)
        rows = outer.jacobian(
            selected,
            param,
            unconnected_gradients=tf.UnconnectedGradients.ZERO,
            experimental_use_pfor=True,
        )
        rows = tf.reshape(rows, [chunk, size])
        return tf.gather(rows, positions[:, None], batch_dims=1)[:, 0]

    return row_block


def _probe_product_fn(loss_fn: LossFn, params: list):
    """``(batch, seed, count) -> [sum_s v_s * H v_s]`` for ``count`` Rademacher probes."""

    @tf.function(reduce_retracing=True, autograph=False)
    def probe_products(batch, seed: tf.Tensor, count: int) -> list[tf.Tensor]:
        probes = []
        for index, p in enumerate(params):
            bits = tf.random.stateless_uniform(
                [count, *p.shape],
                seed=tf.stack([seed[0], seed[1] * len(params) + index]),
                minval=0,
                maxval=2,
                dtype=tf.int32,
            )
            probes.append(tf.cast(2 * bits - 1, p.dtype))
        with tf.GradientTape(persistent=True) as outer:
            for p in params:
                outer.watch(p)
            gradient = _first_gradient(outer, loss_fn, batch, params)

        def hessian_vector_product(vectors):
            return outer.gradient(
                gradient,
                params,
                output_gradients=vectors,
                unconnected_gradients=tf.UnconnectedGradients.ZERO,
            )

        products = tf.vectorized_map(hessian_vector_product, probes)
        return [tf.reduce_sum(v * hv, axis=0) for v, hv in zip(probes, products, strict=True)]

    return probe_products
