"""Float32 convolution kernels through :class:`FoldedPatches` (backward-filter
convolutions with the examples folded into groups): against per-example gradients, the
patch products and the generic fallback. A module of its own: the float64 fixture of
others is module-wide."""

from __future__ import annotations

import weakref

import keras
import numpy as np
import pytest
import tensorflow as tf
from oracles import flat

from laplace_tf.curvature import diagonal, layers, structured


@pytest.mark.parametrize(
    ("shape", "kernel", "strides", "padding"),
    [
        ((8, 8, 3), (3, 3), (1, 1), "same"),  # 64 locations, 4 outputs
        ((9, 7, 2), (3, 2), (2, 1), "same"),  # unequal strides
        ((11, 11, 3), (5, 5), (2, 2), "valid"),  # a stem: large kernel, stride 2
    ],
)
def test_folded_backward_filter_equals_the_patch_products(
    shape, kernel, strides, padding, monkeypatch
):
    """:class:`FoldedPatches` (float32, one column: the examples folded into the groups
    of one backward-filter convolution) against the patch products of :class:`Patches`
    and float64 per-example gradients, all examples at once and one at a time."""
    from laplace_tf.curvature import conv_rules
    from laplace_tf.curvature.conv_factors import FoldedPatches

    layer = keras.layers.Conv2D(4, kernel, strides=strides, padding=padding)
    rng = np.random.default_rng(4)
    x = tf.constant(rng.normal(size=(6, *shape)), tf.float32)
    out = layer(x)
    delta = tf.constant(rng.normal(size=(6, 1, *out.shape[1:])), tf.float32)
    factor = conv_rules._conv_factors(layer, x, delta)[0]
    assert isinstance(factor, FoldedPatches)
    p = factor.patches.numpy().astype(np.float64)
    d = factor.cotangents.numpy().astype(np.float64)
    expected = np.sum(np.einsum("nlq,nklo->nkqo", p, d) ** 2, axis=(0, 1))
    size = layer.kernel.shape.num_elements()
    for entries in (2**22, size):
        monkeypatch.setattr(layers, "GRADIENT_ENTRIES", entries)
        got = factor.sum_squares()[0].numpy().reshape(expected.shape)
        np.testing.assert_allclose(got, expected, rtol=2e-5, atol=1e-5 * expected.max())
        patched = layers.Patches.sum_squares(factor)[0].numpy().reshape(expected.shape)
        np.testing.assert_allclose(got, patched, rtol=2e-5, atol=1e-5 * expected.max())
    # several columns, float64 or few locations per output channel: the patch products
    for other in (tf.concat([delta, delta], axis=1), tf.cast(delta, tf.float64)):
        assert not FoldedPatches.applies(layer, other)
    narrow = keras.layers.Conv2D(40, 3, padding="same")  # 64 locations, 40 outputs
    narrow.build((None, 8, 8, 3))
    assert not FoldedPatches.applies(narrow, tf.zeros([6, 1, 8, 8, 40]))
    pointwise = keras.layers.Conv2D(4, 1, strides=2)  # no unfolding to save
    pointwise.build((None, 8, 8, 3))
    assert not FoldedPatches.applies(pointwise, tf.zeros([6, 1, 4, 4, 4]))


def test_a_float32_model_equals_the_fallback_with_folded_kernels(monkeypatch):
    """A float32 CNN whose kernels take :class:`FoldedPatches`, in the column loop of
    exact ``ggn`` (one column at a time) and in ``ef``: the same diagonal as the generic
    per-example fallback."""
    from laplace_tf.curvature import conv_factors, registry

    keras.utils.set_random_seed(2)
    model = keras.Sequential(
        [
            keras.Input((10, 10, 2)),
            keras.layers.Conv2D(3, 3, strides=2, padding="same", activation="tanh"),
            keras.layers.Conv2D(4, 3, padding="same", activation="relu"),
            keras.layers.Flatten(),
            keras.layers.Dense(3),
        ]
    )
    rng = np.random.default_rng(5)
    x = rng.normal(size=(7, 10, 10, 2)).astype("float32")
    y = rng.integers(0, 3, size=7)
    calls = []
    original = conv_factors.FoldedPatches.sum_squares

    def spy(self):
        calls.append(self.variable.name)
        return original(self)

    monkeypatch.setattr(conv_factors.FoldedPatches, "sum_squares", spy)
    monkeypatch.setattr(structured, "LOOPED_COLUMN_OPS", 0)  # columns one at a time
    for kind in ("ggn", "ef"):
        monkeypatch.setattr(structured, "_STEPS", weakref.WeakKeyDictionary())
        calls.clear()
        got = flat(diagonal(model, (x, y), likelihood="classification", kind=kind, batch_size=4))
        assert len(calls) >= 2, kind  # both kernels, traced
        with registry.rules_disabled():
            expected = flat(
                diagonal(model, (x, y), likelihood="classification", kind=kind, batch_size=4)
            )
        np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-6 * np.abs(expected).max())
