"""Squared kernel gradients of a convolution on a few output locations, without
per-example gradients.

For patches ``p: [N, L, Q]`` and cotangents ``d: [N, K, L, O]``,
``sum_n sum_k (sum_l p_nl (x) d_nkl)^2 = sum_{l, l'} (p_l * p_l')^T (sum_k d_kl * d_kl')``
(products element-wise per example): one product of ``[N P, Q]`` and ``[N P, O]`` over
the ``P = L (L + 1) / 2`` pairs of locations (the off-diagonal ones counted twice), with
the columns summed before it. Its cost grows with ``L^2``, that of the per-example
gradients with ``K L`` plus their squares (``N Q O`` entries per column), so it is used
up to :data:`PAIRED_LOCATIONS` locations: the 2 x 2 feature maps that 32 x 32 inputs
reach in keras.applications models.
"""

from __future__ import annotations

import numpy as np
import tensorflow as tf

#: Output locations up to which a convolution's squares are formed from pairs of
#: locations. One column, 32 examples, medians of 9 (ms): L = 4, Q = 2304, O = 256:
#: 15.5-16.1 per-example, 4.0-4.9 paired; L = 4, Q = 1024, O = 256: 6.9 / 2.9; L = 4,
#: Q = 1152, O = 32: 1.3 / 1.0; L = 9, Q = 1152, O = 128: 4.9 / 3.8; L = 16, Q = 1152,
#: O = 128: 6.2-6.5 / 8.7-10.0; L = 64: 3.0 / 34.
PAIRED_LOCATIONS = 9


def _pairs(locations: int, dtype) -> tuple[np.ndarray, np.ndarray, tf.Tensor]:
    first, second = np.triu_indices(locations)
    twice = tf.constant(np.where(first == second, 1.0, 2.0), dtype)[None, :, None]
    return first, second, twice


def cotangent_pairs(cotangents: tf.Tensor) -> tf.Tensor:
    """``[N, P, O]``: ``sum_k d_kl * d_kl'`` over the pairs ``l <= l'`` of locations (the
    off-diagonal ones twice) of cotangents ``[N, K, L, O]``: all that the squares read of
    the cotangents, so it adds up over the columns of ``S``."""
    first, second, twice = _pairs(cotangents.shape[2], cotangents.dtype)
    dd = tf.gather(cotangents, first, axis=2) * tf.gather(cotangents, second, axis=2)
    return tf.reduce_sum(dd, axis=1) * twice


def pair_products(patches: tf.Tensor, pairs: tf.Tensor, budget: int) -> tf.Tensor:
    """``[Q, O]``: ``sum_n sum_{l <= l'} (p_nl * p_nl')^T pairs_n`` for patches ``[N, L, Q]``
    and :func:`cotangent_pairs` ``[N, P, O]``, in chunks of examples whose pair products
    stay within ``budget`` entries."""
    return _folded(patches, pairs, budget, lambda d: d)


def paired_squares(patches: tf.Tensor, cotangents: tf.Tensor, budget: int) -> tf.Tensor:
    """``[Q, O]``: ``sum_n sum_k g_nk^2`` of the kernel gradients ``g_nk = p_n^T d_nk``,
    in chunks of examples whose pair products stay within ``budget`` entries."""
    return _folded(patches, cotangents, budget, cotangent_pairs)


def _folded(patches, cotangents, budget, pairs_of):
    locations, inputs = patches.shape[1], patches.shape[-1]
    first, second, _ = _pairs(locations, patches.dtype)
    columns = cotangents.shape[1] if cotangents.shape.rank == 4 else 1
    outputs = cotangents.shape[-1]
    per_example = len(first) * max(inputs, (columns or 1) * outputs)
    chunk = max(1, budget // per_example)
    count = tf.shape(patches)[0]

    def add(total, start):
        p = patches[start : start + chunk]
        pp = tf.gather(p, first, axis=1) * tf.gather(p, second, axis=1)  # [n, P, Q]
        dd = pairs_of(cotangents[start : start + chunk])  # [n, P, O]
        product = tf.matmul(tf.reshape(pp, [-1, inputs]), tf.reshape(dd, [-1, outputs]), True)
        return total + product

    initial = tf.zeros([inputs, outputs], patches.dtype)
    if patches.shape[0] is not None and patches.shape[0] <= chunk:
        return add(initial, 0)  # one chunk: no loop to trace
    return tf.foldl(add, tf.range(0, count, chunk), initial, parallel_iterations=1)
