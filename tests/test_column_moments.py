"""Columns of ``S`` looped one at a time with the factors' column moments carried through
the loop (:func:`laplace_tf.curvature.column_sums.moment_fold`): conv kernels on one and
on a few output locations (paired squares) and Dense kernels, against dense float64
Jacobians and the unrolled columns."""

from __future__ import annotations

import weakref

import keras
import numpy as np
import pytest
import tensorflow as tf
from oracles import assert_close, dense_jacobian, flat, softmax_hessian

from laplace_tf.curvature import column_sums, diagonal, layers, structured

pytestmark = pytest.mark.usefixtures("float64")
L = keras.layers


def _model() -> keras.Model:
    keras.utils.set_random_seed(7)
    inp = keras.Input((6, 6, 2))
    h = L.Conv2D(3, 3, strides=2, padding="same", activation="tanh")(inp)  # 3 x 3: paired
    h = L.Conv2D(4, 2, padding="valid", activation="tanh")(h)  # 2 x 2: paired
    h = L.Conv2D(3, 1, activation="tanh")(h)  # 1 x 1 kernel on 4 locations: paired
    h = L.Conv2D(5, 2, padding="valid", activation="tanh")(h)  # one location
    h = L.Dense(4, activation="tanh")(L.Flatten()(h))  # Outer
    model = keras.Model(inp, L.Dense(3)(h))
    return model


def _ggn(model, x) -> np.ndarray:
    f, jac = dense_jacobian(model, x)
    return np.einsum("ncp,ncd,ndp->p", jac, softmax_hessian(np.asarray(f)), jac)


@pytest.mark.parametrize("entries", [None, 1])
def test_looped_columns_with_moments_equal_dense_jacobians(monkeypatch, entries):
    """Every kernel of the model takes its squares from summed moments after the loop
    (spied); the diagonal equals the dense float64 GGN and the unrolled columns', also
    with the pair products chunked one example at a time (``GRADIENT_ENTRIES = 1``)."""
    rng = np.random.default_rng(3)
    x = rng.normal(size=(7, 6, 6, 2))
    y = rng.integers(0, 3, size=7)
    model = _model()
    unrolled = flat(diagonal(model, (x, y), likelihood="classification", batch_size=4))
    finished = []
    original = layers.Patches.from_column_moments

    def spy(self, moments):
        finished.append(self.variable.path)
        return original(self, moments)

    monkeypatch.setattr(layers.Patches, "from_column_moments", spy)
    monkeypatch.setattr(structured, "_STEPS", weakref.WeakKeyDictionary())
    monkeypatch.setattr(structured, "LOOPED_COLUMN_OPS", 0)  # columns one at a time
    if entries is not None:
        monkeypatch.setattr(layers, "GRADIENT_ENTRIES", entries)
    folds = []
    fold = column_sums.moment_fold

    def spied(factors_of, outside, variables):
        result = fold(factors_of, outside, variables)
        folds.append(result)
        return result

    monkeypatch.setattr(structured, "moment_fold", spied)
    looped = flat(diagonal(model, (x, y), likelihood="classification", batch_size=4))
    assert folds and all(result is not None for result in folds)
    assert len(set(finished)) == 4  # the four conv kernels, from their moments
    np.testing.assert_allclose(looped, unrolled, rtol=1e-10, atol=1e-13 * abs(unrolled).max())
    assert_close(looped, _ggn(model, x))


def test_moment_fold_without_moments_is_none():
    """No factor with column moments: the loop keeps the plain squares."""
    bias = tf.Variable(tf.zeros([2], tf.float64))
    explicit = layers.Explicit(bias, tf.ones([3, 1, 2], tf.float64))
    assert column_sums.moment_fold(lambda part: [[explicit]], [[explicit], None], [bias]) is None


def test_column_moments_add_up_over_columns():
    """``from_column_moments`` of the moments summed over columns equals ``sum_squares``
    of all columns at once, for one location, a few (paired) and many (``None``)."""
    rng = np.random.default_rng(0)
    kernel = tf.Variable(tf.zeros([5, 3], tf.float64))
    for locations in (1, 4, 9):
        patches = tf.constant(rng.normal(size=(6, locations, 5)))
        cotangents = tf.constant(rng.normal(size=(6, 3, locations, 3)))
        factor = layers.Patches(kernel, patches, cotangents)
        parts = [layers.Patches(kernel, patches, cotangents[:, k : k + 1]) for k in range(3)]
        total = sum(p.column_moments() for p in parts)
        np.testing.assert_allclose(
            factor.from_column_moments(total)[0], factor.sum_squares()[0], rtol=1e-12
        )
        grads = np.einsum("nlq,nklo->nkqo", patches, cotangents)
        np.testing.assert_allclose(factor.sum_squares()[0], (grads**2).sum((0, 1)), rtol=1e-12)
    many = layers.Patches(kernel, tf.zeros([2, 10, 5], tf.float64), tf.zeros([2, 1, 10, 3]))
    assert many.column_moments() is None
