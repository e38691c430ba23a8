"""Saving and loading ``laplace_tf.Laplace`` in every structure (format version 3): bitwise
round trips, structure mismatches refused, older diagonal files read as ``"diag"``."""

from __future__ import annotations

from pathlib import Path

import keras
import numpy as np
import pytest

from laplace_tf import DiagonalLaplace, Laplace
from laplace_tf.posterior import serialization as posterior_serialization

DATA = Path(__file__).parent / "data"
L = keras.layers


def model_and_data():
    keras.utils.set_random_seed(0)
    inputs = keras.Input((4,), name="x")
    hidden = L.Dense(5, activation="tanh", name="hidden")(inputs)
    normed = L.LayerNormalization(name="norm")(hidden)
    model = keras.Model(inputs, L.Dense(3, name="head")(normed), name="net")
    rng = np.random.default_rng(1)
    return model, rng.normal(size=(24, 4)).astype("float32"), rng.integers(0, 3, 24)


def assert_bitwise(a, b):
    if isinstance(a, list | tuple):
        assert len(a) == len(b)
        for left, right in zip(a, b, strict=True):
            assert_bitwise(left, right)
        return
    a, b = np.asarray(a), np.asarray(b)
    assert a.dtype == b.dtype and a.shape == b.shape
    assert a.tobytes() == b.tobytes()


def outputs_of(la, x):
    precision = la.posterior_precision
    return {
        "precision": precision.to_dense() if hasattr(precision, "to_dense") else precision,
        "variance": la.posterior_variance,
        "lml": la.log_marginal_likelihood(),
        "sample": la.sample(3, seed=2),
        "glm": la.predict(x),
        "nn": la.predict(x, pred_type="nn", n_samples=2, seed=3),
        "log_prob": la.posterior.log_prob(la.posterior.sample(seed=(4, 0))),
    }


@pytest.mark.parametrize(
    ("structure", "subset", "prior"),
    [("kron", "all", "layerwise"), ("full", "last_layer", "diag"), ("diag", ["head"], "scalar")],
)
def test_round_trip_is_bitwise(tmp_path, structure, subset, prior):
    model, x, y = model_and_data()
    la = Laplace(model, "classification", structure=structure, subset=subset, temperature=0.8)
    la.fit((x, y)).optimize_prior_precision(prior_structure=prior)
    expected = outputs_of(la, x[:5])
    path = tmp_path / "posterior.npz"
    la.save(path)
    loaded = Laplace.load(path, model)
    assert loaded.structure == structure and loaded.subset == la.subset
    assert loaded.record.structure.name == structure
    for name, value in outputs_of(loaded, x[:5]).items():
        assert_bitwise(value, expected[name])
    metadata = posterior_serialization._read(str(path))[0]
    assert metadata["version"] == 3 and metadata["structure"] == structure


def test_structure_mismatch_is_refused(tmp_path):
    model, x, y = model_and_data()
    path = tmp_path / "kron.npz"
    Laplace(model, "classification", structure="kron").fit((x, y)).save(path)
    with pytest.raises(ValueError, match="structure='kron' posterior, not 'diag'"):
        DiagonalLaplace.load(path, model)
    with pytest.raises(ValueError, match="structure='kron' posterior, not 'full'"):
        Laplace.load(path, model, structure="full")
    assert Laplace.load(path, model, structure="kron").structure == "kron"


def test_diagonal_files_of_every_version_load_as_diag(tmp_path):
    model = keras.models.load_model(DATA / "v1_functional.keras")
    la = Laplace.load(DATA / "v1_functional.npz", model)
    assert la.structure == "diag"
    expected = np.load(DATA / "v1_functional_expected.npz")
    np.testing.assert_allclose(la.predict(expected["x"]), expected["probs"], rtol=1e-6)
    model, x, y = model_and_data()
    DiagonalLaplace(model, "classification").fit((x, y)).save(tmp_path / "diag.npz")
    assert type(DiagonalLaplace.load(tmp_path / "diag.npz", model)) is DiagonalLaplace
    assert type(Laplace.load(tmp_path / "diag.npz", model)) is Laplace


def test_unfitted_or_stale_posteriors_are_not_saved(tmp_path):
    model, x, y = model_and_data()
    la = Laplace(model, "classification", structure="kron")
    with pytest.raises(RuntimeError, match="not fitted"):
        la.save(tmp_path / "posterior.npz")
    la.fit((x, y))
    la.structure = "full"
    with pytest.raises(RuntimeError, match="fitted with structure='kron'"):
        la.save(tmp_path / "posterior.npz")
    assert not (tmp_path / "posterior.npz").exists()
