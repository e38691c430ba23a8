"""``Laplace.penalty``: value and gradient against dense float64 precisions.

Oracles: the explicit ``np.kron(A, B)`` of the raw Kronecker factors (from the reducer,
before any eigendecomposition) for ``"kron"``; ``la.posterior_precision`` for ``"full"``
and ``"diag"``. The penalty is ``1/2 d^T Lambda d`` and its gradient ``Lambda d``.
"""

from __future__ import annotations

import keras
import numpy as np
import pytest
import scipy.linalg
import tensorflow as tf

import laplace_tf
from laplace_tf.curvature import reducers

STRUCTURES = ("diag", "kron", "full")
SUBSETS = ("all", "last_layer")


def _mlp(outputs: int, dtype: str = "float64") -> keras.Model:
    keras.utils.set_random_seed(0)
    return keras.Sequential(
        [
            keras.Input((4,), dtype=dtype),
            keras.layers.Dense(5, activation="tanh", dtype=dtype),
            keras.layers.Dense(outputs, dtype=dtype),
        ]
    )


def _cnn() -> keras.Model:
    keras.utils.set_random_seed(1)
    return keras.Sequential(
        [
            keras.Input((5, 5, 2), dtype="float64"),
            keras.layers.Conv2D(3, 2, activation="relu", dtype="float64"),
            keras.layers.Flatten(dtype="float64"),
            keras.layers.Dense(3, dtype="float64"),
        ]
    )


def _data(shape, likelihood, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(25, *shape))
    if likelihood == "regression":
        return x, rng.normal(size=(25, 2))
    return x, rng.integers(0, 3, 25)


def _fit(model, likelihood, structure, subset, data):
    la = laplace_tf.Laplace(
        model, likelihood, structure=structure, subset=subset, prior_precision=0.3, temperature=0.7
    )
    if likelihood == "regression":
        la.sigma_noise = 0.5
    return la.fit(data)


def _perturb(la, seed=3) -> np.ndarray:
    """Move the selected weights off the MAP; returns the flat deviation."""
    rng = np.random.default_rng(seed)
    deviations = []
    for v, m in zip(la.variables, la.mean, strict=True):
        d = 0.2 * rng.normal(size=v.shape)
        v.assign(m.numpy() + d)
        deviations.append(d.reshape(-1))
    return np.concatenate(deviations)


def _kron_precision(la, data) -> np.ndarray:
    """``blockdiag(np.kron(A, B) / s + delta I, ...)`` from the raw Kronecker factors."""
    fitted = reducers.fit_kron(
        la.model,
        data,
        likelihood=la.likelihood_object.unit_noise(),
        kind="ggn",
        params=la.variables,
    )
    scale = la.temperature * (la.sigma_noise**2 if la.likelihood == "regression" else 1.0)
    blocks = []
    for block in fitted.curvature:
        if isinstance(block, reducers.KroneckerBlock):
            curvature = np.kron(np.asarray(block.inputs), np.asarray(block.outputs))
        elif isinstance(block, reducers.DenseBlock):
            curvature = np.asarray(block.matrix)
        else:
            curvature = np.diag(np.asarray(block.diagonal).reshape(-1))
        blocks.append(curvature / scale + la.prior_precision * np.eye(len(curvature)))
    return scipy.linalg.block_diag(*blocks)


def _dense_precision(la, data) -> np.ndarray:
    if la.structure == "kron":
        return _kron_precision(la, data)
    precision = la.posterior_precision
    if la.structure == "diag":
        return np.diag(np.concatenate([np.asarray(p).reshape(-1) for p in precision]))
    return np.asarray(precision)


CASES = [("classification", s, subset, "mlp") for s in STRUCTURES for subset in SUBSETS] + [
    ("regression", "kron", "all", "mlp"),
    ("regression", "diag", "all", "mlp"),
    ("classification", "kron", "all", "cnn"),
]


@pytest.mark.parametrize("likelihood, structure, subset, kind", CASES)
def test_value_and_gradient_equal_dense_quadratic(likelihood, structure, subset, kind):
    model = _cnn() if kind == "cnn" else _mlp(2 if likelihood == "regression" else 3)
    data = _data((5, 5, 2) if kind == "cnn" else (4,), likelihood)
    la = _fit(model, likelihood, structure, subset, data)
    penalty = la.penalty()
    assert float(penalty()) == 0.0  # at the MAP
    precision = _dense_precision(la, data)  # at the MAP, before the weights move
    deviation = _perturb(la)
    if structure == "kron":  # the oracle's factors also agree with the structure's operator
        np.testing.assert_allclose(la.posterior_precision.to_dense(), precision, atol=1e-9)
    with tf.GradientTape() as tape:
        value = penalty()
    gradient = tape.gradient(value, la.variables)
    assert value.dtype == tf.float64
    np.testing.assert_allclose(float(value), 0.5 * deviation @ precision @ deviation, rtol=1e-10)
    flat = np.concatenate([np.asarray(g).reshape(-1) for g in gradient])
    np.testing.assert_allclose(flat, precision @ deviation, rtol=1e-9, atol=1e-12)


def test_penalty_is_fixed_when_built():
    """The precision and the mean are taken at construction; a new prior needs a new one."""
    data = _data((4,), "classification")
    la = _fit(_mlp(3), "classification", "diag", "all", data)
    penalty = la.penalty()
    _perturb(la)
    before = float(penalty())
    la.prior_precision = 3.0
    assert float(penalty()) == before
    assert float(la.penalty()()) > before


def test_keras_fit_with_penalty_stays_near_the_map():
    """In a compiled Keras loss (``loss + strength * penalty() / n``) the penalty is
    differentiated through ``model.fit``: a strong one keeps the weights at the MAP."""
    rng = np.random.default_rng(5)
    x, y = rng.normal(size=(32, 4)).astype("float32"), rng.integers(0, 3, 32)
    drift = {}
    cross_entropy = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    for strength in (0.0, 20.0):
        model = _mlp(3, "float32")
        la = laplace_tf.Laplace(model, structure="kron").fit((x, y))
        penalty = la.penalty()

        def loss(y_true, y_pred, penalty=penalty, strength=strength):
            return cross_entropy(y_true, y_pred) + strength * penalty() / len(x)

        model.compile(optimizer=keras.optimizers.SGD(0.05), loss=loss)
        model.fit(x, 1 - y.clip(0, 1), epochs=5, batch_size=8, verbose=0)  # other labels
        drift[strength] = sum(
            float(tf.reduce_sum(tf.square(v - m)))
            for v, m in zip(la.variables, la.mean, strict=True)
        )
    assert drift[0.0] > 1e-3
    assert drift[20.0] < 0.2 * drift[0.0]
