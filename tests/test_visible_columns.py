"""Convolution factors that read the columns of ``S`` as they were back-propagated
(``layers.stacked_columns``: no ``[N, K, ...]`` stack of the cut cotangents is formed)
and share one unfolding of each layer's input over the chunks of columns
(``conv_factors.unfold``): every arrangement equals the dense-Jacobian GGN."""

from __future__ import annotations

import weakref

import keras
import numpy as np
import pytest
import tensorflow as tf
from oracles import assert_close, flat
from test_curvature_structured import dense_ggn_diagonal

from laplace_tf.curvature import conv_factors, layers, structured

pytestmark = pytest.mark.usefixtures("float64")  # conftest.py: float64 layers

L = keras.layers


@pytest.fixture(autouse=True)
def fresh_steps(monkeypatch):
    """Steps traced anew in each test (the settings below are read when tracing)."""
    monkeypatch.setattr(structured, "_STEPS", weakref.WeakKeyDictionary())


def wide_and_narrow_cnn(n=9):
    """A wide first kernel (patches of 72 entries, 49 locations) and a narrow second one
    (16 entries, 36 locations): both above the paired path's locations."""
    keras.utils.set_random_seed(5)
    inp = keras.Input((7, 7, 8))
    h = L.Conv2D(4, 3, padding="same", activation="tanh")(inp)
    h = L.Conv2D(3, 2, activation="relu")(h)
    model = keras.Model(inp, L.Dense(4)(L.Flatten()(h)))
    rng = np.random.default_rng(2)
    x = rng.normal(size=(n, 7, 7, 8))
    y = rng.integers(0, 4, size=n)
    return model, x, y


@pytest.mark.parametrize(
    "setting",
    ["default", "one_column_per_chunk", "chunks_of_examples", "compiled_pass"],
)
def test_visible_columns_equal_the_oracle(monkeypatch, setting):
    model, x, y = wide_and_narrow_cnn(n=40 if setting == "chunks_of_examples" else 9)
    reference = dense_ggn_diagonal(model, x, "classification")
    data = (x, y)
    if setting == "one_column_per_chunk":
        monkeypatch.setattr(structured, "COLUMN_ENTRIES_PER_EXAMPLE", 1)
    elif setting == "chunks_of_examples":  # the first kernel's 3 columns in one block,
        # its 40 examples in chunks of 32 (a loop); the block assumes chunks of 32
        monkeypatch.setattr(layers, "GRADIENT_ENTRIES", 32 * 72 * 4 * 3)
    elif setting == "compiled_pass":  # batches of unknown size, the last one short
        data = tf.data.Dataset.from_tensor_slices((x, y)).batch(1)
    fitted = structured.fit_diagonal(model, data, likelihood="classification", kind="ggn")
    assert_close(flat(fitted.diagonal), reference)


def test_each_layer_is_unfolded_once_per_step(monkeypatch):
    """Three chunks of one column each unfold each convolution's input once (a probe of
    the layers on one example unfolds them too)."""
    model, x, y = wide_and_narrow_cnn()
    sizes = []
    through = conv_factors._unfold
    monkeypatch.setattr(
        conv_factors, "_unfold", lambda x, w: sizes.append(x.shape[0]) or through(x, w)
    )
    monkeypatch.setattr(structured, "COLUMN_ENTRIES_PER_EXAMPLE", 1)
    structured.fit_diagonal(model, (x, y), likelihood="classification", kind="ggn")
    assert len([size for size in sizes if size != 1]) == 2, sizes
    assert getattr(conv_factors._SHARED, "graphs", None) is None  # no traced graph held


def test_stacked_columns_are_read_from_traced_stacks_only():
    columns = [tf.constant([[1.0, 2.0]]), tf.constant([[3.0, 4.0]])]
    assert layers.stacked_columns(tf.stack(columns, axis=1)) is None  # eager

    @tf.function
    def probe(a, b):
        found = layers.stacked_columns(tf.stack([a, b], axis=1))
        assert found is not None and found[0] is a and found[1] is b
        assert layers.stacked_columns(tf.stack([a, b], axis=0)) is None
        assert layers.stacked_columns(a + b) is None
        restacked = layers.map_columns(lambda c: 2 * c, tf.stack([a, b], axis=1))
        assert layers.stacked_columns(restacked) is not None
        return restacked

    np.testing.assert_array_equal(probe(*columns), [[[2.0, 4.0], [6.0, 8.0]]])


@pytest.mark.parametrize("kind", ["ggn", "ef"])
def test_a_one_column_chunk_reads_the_patches_other_chunks_read(monkeypatch, kind):
    """float32, three columns in chunks of two and one: the last chunk takes the patch
    products (the first chunk's patches are formed anyway); ``ef``'s one column, whose
    patches nobody reads, takes the folded backward-filter convolution."""
    keras.utils.set_random_seed(1)
    inp = keras.Input((8, 8, 2), dtype="float32")
    h = L.Conv2D(3, 3, activation="tanh", dtype="float32")(inp)  # 36 locations, 3 outputs
    model = keras.Model(inp, L.Dense(4, dtype="float32")(L.Flatten(dtype="float32")(h)))
    rng = np.random.default_rng(4)
    x, y = rng.normal(size=(6, 8, 8, 2)).astype("float32"), rng.integers(0, 4, size=6)
    folded = []
    through = conv_factors.FoldedPatches.sum_squares
    monkeypatch.setattr(
        conv_factors.FoldedPatches, "sum_squares", lambda f: folded.append(1) or through(f)
    )
    monkeypatch.setattr(structured, "COLUMN_ENTRIES_PER_EXAMPLE", 2 * (6 * 6 * 3 + 4))
    fitted = structured.fit_diagonal(model, (x, y), likelihood="classification", kind=kind)
    assert len(folded) == (0 if kind == "ggn" else 1)
    if kind == "ggn":
        reference = dense_ggn_diagonal(model, x, "classification")
        np.testing.assert_allclose(flat(fitted.diagonal), reference, rtol=1e-4, atol=1e-7)
