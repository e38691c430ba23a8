"""Dense, independent oracles shared by the curvature tests (float64).

Per-example output Jacobians come from ``tf.GradientTape.jacobian`` without ``pfor``;
nothing here uses the library's rules or factors.
"""

from __future__ import annotations

import numpy as np
import tensorflow as tf

RTOL = 1e-10


def flat(tensors) -> np.ndarray:
    return np.concatenate(
        [np.asarray(tf.convert_to_tensor(t), np.float64).ravel() for t in tensors]
    )


def assert_close(got, expected, rtol=RTOL):
    got, expected = np.asarray(got), np.asarray(expected)
    assert got.shape == expected.shape
    scale = np.abs(expected).max()
    assert scale > 0, "degenerate reference"
    error = np.abs(got - expected).max()
    assert error <= rtol * scale, f"max abs error {error:.3e} vs scale {scale:.3e}"


def dense_jacobian(model, x, variables=None):
    """Outputs ``[N, C]`` and per-example Jacobians ``[N, C, P]`` (params concatenated)."""
    variables = list(model.trainable_variables if variables is None else variables)
    with tf.GradientTape(persistent=True) as tape:
        f = model(tf.nest.map_structure(tf.constant, x), training=False)
    blocks = tape.jacobian(f, variables, experimental_use_pfor=False, unconnected_gradients="zero")
    n, c = f.shape
    return f.numpy(), np.concatenate([np.reshape(b.numpy(), (n, c, -1)) for b in blocks], -1)


def softmax_hessian(f: np.ndarray) -> np.ndarray:
    """``Lambda_n = diag(p_n) - p_n p_n^T`` of the softmax cross-entropy, ``[N, C, C]``."""
    e = np.exp(f - f.max(axis=-1, keepdims=True))
    p = e / e.sum(axis=-1, keepdims=True)
    return np.einsum("nc,cd->ncd", p, np.eye(f.shape[1])) - p[:, :, None] * p[:, None, :]
