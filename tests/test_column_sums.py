"""Dense chains back-propagate their columns of S on their own (``column_sums``)."""

from __future__ import annotations

import weakref

import numpy as np
import pytest
import test_curvature_structured
from oracles import assert_close, flat
from test_curvature_structured import SIGMA, build, dense_ggn_diagonal

from laplace_tf.curvature import column_sums, diagonal, structured

pytestmark = pytest.mark.usefixtures("float64")  # conftest.py: float64 layers


@pytest.fixture
def spied(monkeypatch):
    """Fresh compiled steps; records what each trace of ``dense_column_sums`` gave."""
    monkeypatch.setattr(structured, "_STEPS", weakref.WeakKeyDictionary())
    results = []
    original = structured.dense_column_sums

    def spy(factors_of, columns):
        result = original(factors_of, columns)
        results.append((columns.count, result is not None))
        return result

    monkeypatch.setattr(structured, "dense_column_sums", spy)
    return results


@pytest.mark.parametrize("name", ["tanh_mlp", "relu_mlp", "multi_input", "nested"])
@pytest.mark.parametrize("likelihood", ["classification", "regression"])
def test_dense_chains_column_by_column_equal_dense_jacobians(spied, name, likelihood):
    model, x, y = build(name, likelihood)
    got = diagonal(model, (x, y), likelihood=likelihood, sigma_noise=SIGMA, batch_size=4)
    got = flat(got)
    assert spied and all(count > 1 and taken for count, taken in spied)
    assert_close(got, dense_ggn_diagonal(model, x, likelihood))


@pytest.mark.parametrize("in_flight", [0, 1, 2])
def test_columns_in_flight_do_not_change_the_sums(spied, monkeypatch, in_flight):
    """Seven columns (eight classes), back-propagated unordered, one at a time or two at
    a time: the same exact diagonal."""
    monkeypatch.setitem(test_curvature_structured.WIDTHS, "classification", 8)
    monkeypatch.setattr(column_sums, "IN_FLIGHT", in_flight)
    model, x, y = build("relu_mlp")
    got = flat(diagonal(model, (x, y), likelihood="classification", batch_size=4))
    assert spied and all(count == 7 and taken for count, taken in spied)
    assert_close(got, dense_ggn_diagonal(model, x, "classification"))


@pytest.mark.parametrize("name", ["cnn", "embedding", "subclassed"])
def test_other_factors_keep_the_column_chunks(spied, name):
    """A conv kernel's or an embedding's factor needs every column's cotangents: the
    path declines; a model with a fallback site does not try it."""
    model, x, y = build(name)
    got = flat(diagonal(model, (x, y), likelihood="classification", batch_size=4))
    if name == "subclassed":
        assert not spied
    else:
        assert spied and not any(taken for _, taken in spied)
    assert_close(got, dense_ggn_diagonal(model, x, "classification"))


def test_monte_carlo_samples_equal_the_stacked_columns(spied, monkeypatch):
    """Several Monte Carlo draws are columns too: the same draws give the same sums."""
    model, x, y = build("tanh_mlp")

    def fit():
        return flat(
            diagonal(
                model, (x, y), likelihood="classification", kind="ggn_mc", mc_samples=5,
                seed=3, batch_size=4,
            )
        )  # fmt: skip

    column_by_column = fit()
    assert spied and all(count == 5 and taken for count, taken in spied)
    monkeypatch.setattr(structured, "_STEPS", weakref.WeakKeyDictionary())
    monkeypatch.setattr(structured, "DENSE_COLUMN_SUMS", False)
    stacked = fit()
    assert len(spied) == 1  # the switch bypasses the path: no second trace of it
    np.testing.assert_allclose(column_by_column, stacked, rtol=1e-12, atol=1e-14)
