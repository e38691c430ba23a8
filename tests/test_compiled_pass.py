"""The compiled pass (its step called at one place in the loop, the first batch entering it
as an optional) and a Dense chain's batches stepped in parts side by side
(``structured.DENSE_SPLIT``): every arrangement gives the oracle's diagonal, NLL and
counts."""

from __future__ import annotations

import weakref

import numpy as np
import pytest
import tensorflow as tf
from oracles import assert_close, flat
from test_curvature_structured import (
    build,
    dense_ggn_diagonal,
    manual_nll,
    naive_empirical_fisher,
)

from laplace_tf.curvature import basics, structured

pytestmark = pytest.mark.usefixtures("float64")  # conftest.py: float64 layers


@pytest.fixture(autouse=True)
def fresh_steps(monkeypatch):
    """Steps traced anew in each test (the settings below are read when tracing)."""
    monkeypatch.setattr(structured, "_STEPS", weakref.WeakKeyDictionary())


def expected(model, x, y, kind, weights=None):
    if kind == "ggn":
        assert weights is None
        return dense_ggn_diagonal(model, x, "classification")
    return naive_empirical_fisher(model, x, y, "classification", weights=weights)


@pytest.mark.parametrize("kind", ["ggn", "ef"])
@pytest.mark.parametrize("name", ["tanh_mlp", "cnn"])
def test_compiled_pass_equals_the_oracle(monkeypatch, name, kind):
    """Seven batches (the last short) in one compiled call: the dense-Jacobian GGN /
    naive empirical Fisher, the summed NLL and the counts."""
    model, x, y = build(name, n=20)
    dataset = tf.data.Dataset.from_tensor_slices((x, y)).batch(3)
    calls = []
    through = basics._compiled
    monkeypatch.setattr(basics, "_compiled", lambda *a: calls.append(1) or through(*a))
    fitted = structured.fit_diagonal(model, dataset, likelihood="classification", kind=kind)
    assert calls  # the compiled pass, not the Python loop after a fault
    assert_close(flat(fitted.diagonal), expected(model, x, y, kind))
    nll = manual_nll("classification", model(x, training=False), y)
    np.testing.assert_allclose(fitted.nll, float(nll), rtol=1e-10)
    assert (fitted.n_data, fitted.n_rows, fitted.n_outputs) == (20, 20, 3)


def test_a_faulty_later_batch_is_named():
    """A NaN in the sixth batch stops the fit with the Python loop's message."""
    model, x, y = build("tanh_mlp", n=20)
    x = np.array(x)
    x[16, 0] = np.nan
    dataset = tf.data.Dataset.from_tensor_slices((x, y)).batch(3)
    with pytest.raises(ValueError, match="contain NaN or Inf: batch 5, example 1 "):
        structured.fit_diagonal(model, dataset, likelihood="classification")


@pytest.mark.parametrize("kind", ["ggn", "ef"])
@pytest.mark.parametrize("batch_size", [1, 2, 5])
def test_dense_chains_split_into_parts_equal_the_oracle(monkeypatch, kind, batch_size):
    """A Dense chain's batches stepped in two or three parts (one of them empty for a
    batch of one example) give the oracle's diagonal, also with sample weights."""
    model, x, y = build("tanh_mlp", n=11)
    weights = np.random.default_rng(3).uniform(0.5, 2.0, size=11)
    for split in (2, 3):
        monkeypatch.setattr(structured, "DENSE_SPLIT", split)
        monkeypatch.setattr(structured, "_STEPS", weakref.WeakKeyDictionary())
        data = (x, y) if kind == "ggn" else (x, y, weights)
        fitted = structured.fit_diagonal(
            model, data, likelihood="classification", kind=kind, batch_size=batch_size
        )
        reference = expected(model, x, y, kind, None if kind == "ggn" else weights)
        assert_close(flat(fitted.diagonal), reference)
        assert fitted.n_data == (11 if kind == "ggn" else pytest.approx(weights.sum()))


def test_only_dense_chains_are_split(monkeypatch):
    """The parts are traced for a Dense chain only: a CNN's step keeps its whole batch."""
    monkeypatch.setattr(structured, "DENSE_SPLIT", 2)
    traced = []
    original = structured.loss_rows

    def spy(raw, y, weights):
        traced.append(raw.shape[0])
        return original(raw, y, weights)

    monkeypatch.setattr(structured, "loss_rows", spy)
    for name, parts in (("tanh_mlp", 3), ("cnn", 1)):  # the whole batch, then its 2 parts
        traced.clear()
        model, x, y = build(name, n=8)
        structured.fit_diagonal(model, (x, y), likelihood="classification", kind="ef")
        assert len(traced) == parts, name


def test_monte_carlo_parts_draw_independent_labels(monkeypatch):
    """Split, ``ggn_mc`` is seeded: the same seed gives the same diagonal (to the last bit
    or so: the parts run concurrently, see ``DENSE_SPLIT``), and the parts draw their own
    labels (the split estimate differs from the whole batch's)."""
    monkeypatch.setattr(structured, "DENSE_SPLIT", 2)
    model, x, y = build("tanh_mlp", n=16)
    kwargs = {"likelihood": "classification", "kind": "ggn_mc", "seed": 4, "batch_size": 16}
    split = flat(structured.fit_diagonal(model, (x, y), **kwargs).diagonal)
    again = flat(structured.fit_diagonal(model, (x, y), **kwargs).diagonal)
    np.testing.assert_allclose(split, again, rtol=1e-13)
    monkeypatch.setattr(structured, "DENSE_SPLIT", 1)
    monkeypatch.setattr(structured, "_STEPS", weakref.WeakKeyDictionary())
    whole = flat(structured.fit_diagonal(model, (x, y), **kwargs).diagonal)
    assert not np.allclose(split, whole)
