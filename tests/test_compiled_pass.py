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


@pytest.mark.parametrize("weighted", [False, True])
@pytest.mark.parametrize("batch_size", [1, 2, 5])
def test_dense_chains_split_into_parts_equal_the_oracle(monkeypatch, weighted, batch_size):
    """A Dense chain's batches stepped in two or three parts (one of them empty for a
    batch of one example) give the oracle's diagonal (``ef``), with sample weights too."""
    model, x, y = build("tanh_mlp", n=11)
    weights = np.random.default_rng(3).uniform(0.5, 2.0, size=11) if weighted else None
    for split in (2, 3):
        monkeypatch.setattr(structured, "DENSE_SPLIT", split)
        monkeypatch.setattr(structured, "_STEPS", weakref.WeakKeyDictionary())
        data = (x, y, weights) if weighted else (x, y)
        fitted = structured.fit_diagonal(
            model, data, likelihood="classification", kind="ef", batch_size=batch_size
        )
        assert_close(flat(fitted.diagonal), expected(model, x, y, "ef", weights))
        assert fitted.n_data == (pytest.approx(weights.sum()) if weighted else 11)


def test_only_dense_chains_are_split(monkeypatch):
    """The parts are traced for a Dense chain's ``ef`` / ``ggn_mc`` only: a CNN's step and
    an exact GGN's keep their whole batch."""
    monkeypatch.setattr(structured, "DENSE_SPLIT", 2)
    traced = []
    original = structured.loss_rows

    def spy(raw, y, weights):
        traced.append(raw.shape[0])
        return original(raw, y, weights)

    monkeypatch.setattr(structured, "loss_rows", spy)
    cases = (("tanh_mlp", "ef", 3), ("tanh_mlp", "ggn_mc", 3), ("cnn", "ef", 1))
    for name, kind, parts in (*cases, ("tanh_mlp", "ggn", 1)):  # the whole batch, its parts
        traced.clear()
        model, x, y = build(name, n=8)
        structured.fit_diagonal(model, (x, y), likelihood="classification", kind=kind)
        assert len(traced) == parts, (name, kind)


def test_split_monte_carlo_steps_repeat_to_the_last_bit(monkeypatch):
    """A split step repeated with one seed gives the same sums, bit for bit. The parts run
    concurrently; summed with ``add_n``, about 8% of such repeats differed in the last bit
    (Grappler merged the adds into AddNs whose order followed the parts' timing)."""
    monkeypatch.setattr(structured, "DENSE_SPLIT", 2)
    model, x, y = build("tanh_mlp", n=3)
    likelihood = structured.get_likelihood("classification")
    variables = list(model.trainable_variables)
    step = structured._diagonal_step(model, likelihood, variables, "ggn_mc", 3)
    seed = tf.constant([5, 0], tf.int64)
    first = [t.numpy() for t in tf.nest.flatten(step(x, y, None, seed))]
    for _ in range(300):
        again = tf.nest.flatten(step(x, y, None, seed))
        for a, b in zip(first, again, strict=True):
            np.testing.assert_array_equal(a, b.numpy())


def test_monte_carlo_parts_draw_independent_labels(monkeypatch):
    """Split, ``ggn_mc`` is seeded: the same seed gives the same diagonal, and the parts
    draw their own labels (the split estimate differs from the whole batch's)."""
    monkeypatch.setattr(structured, "DENSE_SPLIT", 2)
    model, x, y = build("tanh_mlp", n=16)
    kwargs = {"likelihood": "classification", "kind": "ggn_mc", "seed": 4, "batch_size": 16}
    split = flat(structured.fit_diagonal(model, (x, y), **kwargs).diagonal)
    again = flat(structured.fit_diagonal(model, (x, y), **kwargs).diagonal)
    np.testing.assert_array_equal(split, again)
    monkeypatch.setattr(structured, "DENSE_SPLIT", 1)
    monkeypatch.setattr(structured, "_STEPS", weakref.WeakKeyDictionary())
    whole = flat(structured.fit_diagonal(model, (x, y), **kwargs).diagonal)
    assert not np.allclose(split, whole)


def test_pooled_sums_start_at_zero_and_results_keep_their_values(monkeypatch):
    """Fits of one kind reuse their float64 sums' variables: each fit (compiled pass,
    Python loop, after a faulty fit) equals the oracle, and a result keeps its values
    when a later fit reuses the variables it was read from."""
    made = []
    through = basics.new_sums
    monkeypatch.setattr(basics, "new_sums", lambda *a: made.append(1) or through(*a))
    model, x, y = build("tanh_mlp", n=20)
    dataset = tf.data.Dataset.from_tensor_slices((x, y)).batch(3)
    reference = expected(model, x, y, "ggn")
    fit = lambda data, **kw: structured.fit_diagonal(  # noqa: E731
        model, data, likelihood="classification", **kw
    )
    first = fit(dataset)
    kept = [t.numpy() for t in first.diagonal]
    second = fit(dataset)
    third = fit(dataset, progress=lambda n: None)  # the Python loop
    assert len(made) == 1
    for fitted in (first, second, third):
        assert_close(flat(fitted.diagonal), reference)
        np.testing.assert_allclose(fitted.nll, first.nll, rtol=1e-12)
    for a, b in zip(kept, first.diagonal, strict=True):
        np.testing.assert_array_equal(a, b.numpy())
    bad = np.array(x)
    bad[16, 0] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        fit(tf.data.Dataset.from_tensor_slices((bad, y)).batch(3))
    assert_close(flat(fit(dataset).diagonal), reference)
    assert len(made) == 1


def test_sums_pool_gives_concurrent_fits_their_own_sums(monkeypatch):
    """Two fits at once take two sets of sums; sums of weights over the pooled size are
    created for each fit and not kept."""
    model, _, _ = build("tanh_mlp", n=4)
    variables = model.trainable_variables
    groups = basics.sum_groups(variables)
    pool = basics.SumsPool(variables, groups)
    with pool.taken() as one, pool.taken() as two:
        assert {id(v) for v in one}.isdisjoint(id(v) for v in two)
    with pool.taken() as again:
        assert {id(v) for v in again} <= {id(v) for v in one + two}
    monkeypatch.setattr(basics, "POOLED_SUM_ELEMENTS", 0)
    large = basics.SumsPool(variables, groups)
    with large.taken() as one:
        pass
    with large.taken() as two:
        assert {id(v) for v in one}.isdisjoint(id(v) for v in two)
