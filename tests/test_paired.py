"""A convolution's squares, each way :class:`layers.Patches` forms them (from pairs of
output locations, ``paired``; per example and column for narrow patches; with the
columns side by side for wide ones), against explicit per-example kernel gradients."""

from __future__ import annotations

import weakref

import numpy as np
import pytest
import tensorflow as tf
from oracles import assert_close, flat
from test_curvature_structured import build, dense_ggn_diagonal

from laplace_tf.curvature import diagonal, layers, paired, structured


@pytest.mark.parametrize("locations", [2, 4, 9])
@pytest.mark.parametrize("budget", [2**22, 50])  # 50: one example per chunk
def test_paired_squares_equal_per_example_gradients(locations, budget):
    rng = np.random.default_rng(locations)
    p = rng.normal(size=(7, locations, 5))
    d = rng.normal(size=(7, 3, locations, 4))
    grads = np.einsum("nlq,nklo->nkqo", p, d)  # per example and column
    got = paired.paired_squares(tf.constant(p), tf.constant(d), budget)
    np.testing.assert_allclose(got.numpy(), np.sum(grads**2, axis=(0, 1)), rtol=1e-12)


@pytest.mark.parametrize("narrow", [0, 48])  # patches of 5 entries: wide, narrow
@pytest.mark.parametrize("entries", [2**22, 2 * 5 * 4 * 32, 5 * 4])  # blocks of 3, 2, 1
def test_patch_products_equal_per_example_gradients(narrow, entries, monkeypatch):
    """Both layouts of the per-example products, for the columns in blocks of three, of
    two (the last block one column) and one at a time, one example per chunk (a small
    :data:`layers.GRADIENT_ENTRIES`)."""
    monkeypatch.setattr(layers, "NARROW_PATCHES", narrow)
    monkeypatch.setattr(layers, "GRADIENT_ENTRIES", entries)
    rng = np.random.default_rng(1)
    p, d = rng.normal(size=(7, 12, 5)), rng.normal(size=(7, 3, 12, 4))
    variable = tf.Variable(tf.zeros([5, 4], tf.float64))
    got = layers.Patches(variable, tf.constant(p), tf.constant(d)).sum_squares()[0]
    grads = np.einsum("nlq,nklo->nkqo", p, d)
    np.testing.assert_allclose(got.numpy(), np.sum(grads**2, axis=(0, 1)), rtol=1e-12)


@pytest.mark.usefixtures("float64")  # conftest.py: float64 layers
def test_models_equal_with_and_without_pairs(monkeypatch):
    """The test CNN's convolutions have 3 x 3 output maps (paired); forcing the
    per-example products gives the same diagonal, and both equal dense Jacobians."""
    model, x, y = build("cnn")
    assert all(layer.output.shape[1] * layer.output.shape[2] == 9 for layer in model.layers[1:3])
    calls = []
    original = paired.paired_squares

    def spy(*args):
        calls.append(args[0].shape[1])
        return original(*args)

    monkeypatch.setattr(paired, "paired_squares", spy)
    results = []
    for threshold in (paired.PAIRED_LOCATIONS, 0):
        monkeypatch.setattr(structured, "_STEPS", weakref.WeakKeyDictionary())
        monkeypatch.setattr(paired, "PAIRED_LOCATIONS", threshold)
        calls.clear()
        results.append(flat(diagonal(model, (x, y), likelihood="classification", batch_size=4)))
        assert bool(calls) == (threshold > 0)
    np.testing.assert_allclose(results[0], results[1], rtol=1e-10)
    assert_close(results[0], dense_ggn_diagonal(model, x, "classification"))
