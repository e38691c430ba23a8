"""Saving and loading a fitted ``DiagonalLaplace``: exact round trips and clear refusals.

A round trip must be bitwise: the loaded object gives the same bytes for the posterior
precision, the predictions (GLM and sampled networks), the marginal likelihood and the
posterior samples. Damaged files, other formats and other models must be refused with a
message that says what is wrong, and a failed save must leave a previous file intact.
"""

from __future__ import annotations

import json
import os
import zipfile

import keras
import numpy as np
import pytest

from laplace_tf import DiagonalLaplace, serialization
from laplace_tf.likelihoods import get_likelihood

N_TRAIN = 32


def make_model(outputs: int, dtype: str = "float32", hidden: int = 6, seed: int = 0):
    """A functional MLP with a BatchNormalization layer (non-trainable weights)."""
    keras.utils.set_random_seed(seed)
    inputs = keras.Input((4,), dtype=dtype, name="x")
    h = keras.layers.Dense(hidden, activation="tanh", name="hidden", dtype=dtype)(inputs)
    h = keras.layers.BatchNormalization(name="norm", dtype=dtype)(h)
    out = keras.layers.Dense(outputs, name="head", dtype=dtype)(h)
    model = keras.Model(inputs, out, name="net")
    norm = model.get_layer("norm")  # non-default statistics, so they matter
    norm.moving_mean.assign(np.linspace(-0.2, 0.2, hidden))
    norm.moving_variance.assign(np.linspace(0.5, 1.5, hidden))
    return model


def make_data(likelihood: str, outputs: int, dtype: str = "float32"):
    rng = np.random.default_rng(3)
    x = rng.normal(size=(N_TRAIN, 4)).astype(dtype)
    if likelihood == "classification":
        y = rng.integers(0, outputs, size=N_TRAIN)
    elif likelihood == "binary":
        y = rng.integers(0, 2, size=(N_TRAIN, 1)).astype(dtype)
    else:
        y = rng.normal(size=(N_TRAIN, outputs)).astype(dtype)
    return x, y


def snapshot(model) -> list[bytes]:
    return [np.asarray(v.numpy()).tobytes() for v in model.weights]


def assert_bitwise(a, b) -> None:
    """Equal dtype, shape and bytes, through nested lists and tuples of tensors."""
    if isinstance(a, list | tuple):
        assert type(a) is type(b) and len(a) == len(b)
        for left, right in zip(a, b, strict=True):
            assert_bitwise(left, right)
        return
    a, b = np.asarray(a), np.asarray(b)
    assert a.dtype == b.dtype and a.shape == b.shape
    assert a.tobytes() == b.tobytes()


def outputs_of(la: DiagonalLaplace, x: np.ndarray) -> dict:
    """Everything a user reads from a fitted posterior."""
    results = {
        "posterior_precision": la.posterior_precision,
        "mean": la.mean,
        "log_marginal_likelihood": la.log_marginal_likelihood(),
        "sample": la.sample(3, seed=11),
        "glm": la.predict(x),
        "nn": la.predict(x, pred_type="nn", n_samples=3, seed=5),
    }
    if la.likelihood == "classification":
        results["bridge"] = la.predict(x, link_approx="bridge")
    return results


def round_trip(la: DiagonalLaplace, path) -> DiagonalLaplace:
    """Save and load ``la``; check the loaded copy is bitwise the same and the model intact."""
    x = np.random.default_rng(9).normal(size=(5, 4)).astype(la.variables[0].dtype)
    before = snapshot(la.model)
    expected = outputs_of(la, x)
    la.save(path)
    loaded = DiagonalLaplace.load(path, la.model)
    assert snapshot(la.model) == before
    assert loaded.model is la.model
    for name in ("likelihood", "curvature", "subset", "temperature", "sigma_noise", "n_data"):
        assert getattr(loaded, name) == getattr(la, name), name
    assert loaded._prior.structure == la._prior.structure
    assert_bitwise(loaded._prior.per_weight(), la._prior.per_weight())
    assert_bitwise(loaded.prior_mean, la.prior_mean)
    for name, value in outputs_of(loaded, x).items():
        try:
            assert_bitwise(value, expected[name])
        except AssertionError as error:
            raise AssertionError(f"{name} differs after the round trip") from error
    assert snapshot(la.model) == before
    return loaded


# -- exact round trips -------------------------------------------------------------------


def test_classification_layerwise_prior(tmp_path):
    model = make_model(3)
    la = DiagonalLaplace(model, "classification").fit(make_data("classification", 3))
    la.optimize_prior_precision(prior_structure="layerwise")
    round_trip(la, tmp_path / "posterior.npz")


def test_regression_tuned_noise_and_temperature(tmp_path):
    model = make_model(2)
    la = DiagonalLaplace(model, "regression", temperature=0.7, sigma_noise=0.4)
    la.fit(make_data("regression", 2))
    la.optimize_prior_precision(optimize_sigma_noise=True)
    assert la.sigma_noise != 0.4
    round_trip(la, tmp_path / "posterior.npz")


def test_binary_last_layer_empirical_fisher(tmp_path):
    model = make_model(1)
    la = DiagonalLaplace(model, "binary", subset="last_layer", curvature="ef", temperature=2.5)
    la.fit(make_data("binary", 1))
    loaded = round_trip(la, tmp_path / "posterior.npz")
    assert [v.path for v in loaded.variables] == ["head/kernel", "head/bias"]


def test_named_layers_diag_prior_and_prior_mean_arrays(tmp_path):
    model = make_model(3)
    rng = np.random.default_rng(4)
    subset = ["hidden", "norm"]
    groups = DiagonalLaplace(model, subset=subset).variables
    la = DiagonalLaplace(
        model,
        "classification",
        subset=subset,
        prior_precision=[rng.uniform(0.5, 3.0, size=v.shape) for v in groups],
        prior_mean=[rng.normal(size=v.shape).astype("float32") for v in groups],
    )
    la.fit(make_data("classification", 3))
    assert la._prior.structure == "diag"
    round_trip(la, tmp_path / "posterior.npz")
    with np.load(tmp_path / "posterior.npz", allow_pickle=False) as archive:
        assert {"prior_precision_0", "prior_mean_0"} <= set(archive.files)


def test_float64_model_with_diag_optimised_prior(tmp_path):
    model = make_model(3, dtype="float64")
    la = DiagonalLaplace(model, "classification", prior_mean=0.1)
    la.fit(make_data("classification", 3, dtype="float64"))
    la.optimize_prior_precision(prior_structure="diag")
    assert la.mean[0].dtype == "float64"
    round_trip(la, tmp_path / "posterior.npz")
    metadata = read_metadata(tmp_path / "posterior.npz")
    assert metadata["prior_mean"] == {"structure": "constant", "value": 0.1}
    assert {w["dtype"] for w in metadata["weights"]} == {"float64"}


def test_model_reloaded_with_keras_is_accepted(tmp_path):
    model = make_model(3)
    la = DiagonalLaplace(model, "classification").fit(make_data("classification", 3))
    la.save(tmp_path / "posterior.npz")
    model.save(tmp_path / "model.keras")
    reloaded = keras.models.load_model(tmp_path / "model.keras")
    loaded = DiagonalLaplace.load(tmp_path / "posterior.npz", reloaded)
    x = make_data("classification", 3)[0][:5]
    assert_bitwise(loaded.posterior_precision, la.posterior_precision)
    assert_bitwise(loaded.predict(x), la.predict(x))


def test_path_is_used_as_given_and_metadata_is_plain_json(tmp_path):
    model = make_model(3)
    la = DiagonalLaplace(model, "classification").fit(make_data("classification", 3))
    path = tmp_path / "posterior.laplace"
    la.save(str(path))
    assert os.listdir(tmp_path) == ["posterior.laplace"]
    metadata = read_metadata(path)
    assert metadata["format"] == "laplace_tf.DiagonalLaplace"
    assert metadata["version"] == serialization.VERSION
    assert metadata["fit"]["n_data"] == N_TRAIN and metadata["fit"]["n_outputs"] == 3
    assert metadata["prior_precision"] == {"structure": "scalar", "value": 1.0}
    assert [w["name"] for w in metadata["weights"]][:2] == ["hidden/kernel", "hidden/bias"]
    assert set(metadata["fingerprint"]) == {"architecture", "weights"}


# -- refusals ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """A fitted classification posterior saved to disk: ``(la, path)``."""
    model = make_model(3)
    la = DiagonalLaplace(model, "classification").fit(make_data("classification", 3))
    path = tmp_path_factory.mktemp("saved") / "posterior.npz"
    la.save(path)
    return la, path


def read_metadata(path) -> dict:
    with np.load(path, allow_pickle=False) as archive:
        return json.loads(archive["metadata"].item())


def rewrite(source, target, metadata=None, **arrays) -> None:
    """Copy an archive with replaced metadata or arrays (a well-formed zip)."""
    with np.load(source, allow_pickle=False) as archive:
        contents = {name: archive[name] for name in archive.files}
    if metadata is not None:
        contents["metadata"] = np.array(json.dumps(metadata))
    contents.update(arrays)
    with open(target, "wb") as file:
        np.savez(file, **contents)


def test_unfitted_is_not_saved(tmp_path):
    la = DiagonalLaplace(make_model(3), "classification")
    with pytest.raises(RuntimeError, match="not fitted"):
        la.save(tmp_path / "posterior.npz")
    assert os.listdir(tmp_path) == []


def test_custom_likelihood_is_not_saved(tmp_path):
    class Custom(type(get_likelihood("classification"))):
        """A user's subclass: its rules are code, which a file cannot hold."""

    model = make_model(3)
    data = make_data("classification", 3)
    la = DiagonalLaplace(model, Custom()).fit(data)
    with pytest.raises(TypeError, match="built-in likelihoods"):
        la.save(tmp_path / "posterior.npz")
    assert os.listdir(tmp_path) == []
    la.likelihood = get_likelihood("classification")  # a built-in object is saved by its name
    la.fit(data).save(tmp_path / "posterior.npz")
    loaded = DiagonalLaplace.load(tmp_path / "posterior.npz", model)
    assert loaded.likelihood == "classification"
    np.testing.assert_array_equal(
        np.asarray(loaded.log_marginal_likelihood()), np.asarray(la.log_marginal_likelihood())
    )


def test_other_architecture_is_refused(saved):
    _, path = saved
    with pytest.raises(ValueError, match="different architecture"):
        DiagonalLaplace.load(path, make_model(3, hidden=7))
    with pytest.raises(ValueError, match="different architecture"):
        DiagonalLaplace.load(path, make_model(3, dtype="float64"))


def test_other_weights_are_refused(saved):
    la, path = saved
    trained = keras.models.clone_model(la.model)
    trained.set_weights([w + 1e-3 for w in la.model.get_weights()])
    with pytest.raises(ValueError, match="different weights.*posterior mean"):
        DiagonalLaplace.load(path, trained)
    statistics = keras.models.clone_model(la.model)  # only a non-trainable weight differs
    statistics.set_weights(la.model.get_weights())
    DiagonalLaplace.load(path, statistics)
    statistics.get_layer("norm").moving_mean.assign_add(np.full(6, 1e-3, "float32"))
    before = snapshot(statistics)
    with pytest.raises(ValueError, match="different weights"):
        DiagonalLaplace.load(path, statistics)
    assert snapshot(statistics) == before


@pytest.mark.parametrize("keep", [0.5, 0.98, 30])
def test_truncated_file_is_refused(saved, tmp_path, keep):
    _, path = saved
    data = path.read_bytes()
    cut = tmp_path / "cut.npz"
    cut.write_bytes(data[: int(keep * len(data)) if keep < 1 else keep])
    with pytest.raises(ValueError, match="corrupted or truncated"):
        DiagonalLaplace.load(cut, saved[0].model)


def flip(data: bytes, position: int) -> bytes:
    damaged = bytearray(data)
    damaged[position] ^= 0x10
    return bytes(damaged)


def test_flipped_byte_in_content_is_refused(saved, tmp_path):
    la, path = saved
    data = path.read_bytes()
    curvature = data.find(la._fit["curvature"][0].numpy().tobytes())
    metadata = data.find('"format"'.encode("utf-32-le"))  # .npy stores unicode as UCS-4
    assert curvature > 0 and metadata > 0
    for position in (curvature + 10, metadata + 8, len(data) // 2):
        damaged = tmp_path / "damaged.npz"
        damaged.write_bytes(flip(data, position))
        with pytest.raises(ValueError, match="corrupted or truncated"):
            DiagonalLaplace.load(damaged, la.model)


def test_every_flipped_byte_is_refused_or_harmless(saved, tmp_path):
    """A flip anywhere is refused, or hits zip bookkeeping that the reader ignores
    (timestamps, the local copies of sizes): then the posterior is loaded unchanged."""
    la, path = saved
    data = path.read_bytes()
    damaged = tmp_path / "damaged.npz"
    refused = 0
    for position in range(0, len(data), 17):
        damaged.write_bytes(flip(data, position))
        try:
            loaded = DiagonalLaplace.load(damaged, la.model)
        except ValueError as error:
            assert "corrupted or truncated" in str(error) or "not a laplace_tf file" in str(error)
            refused += 1
            continue
        assert_bitwise(loaded.posterior_precision, la.posterior_precision)
        assert_bitwise(loaded.mean, la.mean)
        assert_bitwise(loaded.log_marginal_likelihood(), la.log_marginal_likelihood())
    assert refused > 0.75 * len(range(0, len(data), 17))


def test_changed_array_fails_the_checksum(saved, tmp_path):
    la, path = saved
    changed = tmp_path / "changed.npz"
    curvature = la._fit["curvature"][0].numpy()
    rewrite(path, changed, curvature_0=curvature * 2)
    with pytest.raises(ValueError, match="corrupted or truncated"):
        DiagonalLaplace.load(changed, la.model)


def test_not_a_laplace_file_is_refused(saved, tmp_path):
    la, path = saved
    text = tmp_path / "notes.txt"
    text.write_text("hello")
    other_npz = tmp_path / "other.npz"
    np.savez(other_npz, a=np.arange(3))
    npy = tmp_path / "array.npy"
    np.save(npy, np.arange(3))
    foreign = tmp_path / "foreign.npz"
    rewrite(path, foreign, metadata={**read_metadata(path), "format": "something.else"})
    for candidate in (text, other_npz, npy, foreign):
        with pytest.raises(ValueError, match="not a laplace_tf file"):
            DiagonalLaplace.load(candidate, la.model)
    with pytest.raises(FileNotFoundError):
        DiagonalLaplace.load(tmp_path / "missing.npz", la.model)
    with pytest.raises(FileNotFoundError):
        DiagonalLaplace.load(tmp_path, la.model)


def test_newer_version_is_refused(saved, tmp_path):
    la, path = saved
    newer = tmp_path / "newer.npz"
    version = serialization.VERSION + 1
    rewrite(path, newer, metadata={**read_metadata(path), "version": version})
    with pytest.raises(ValueError, match=f"version {version}.*upgrade laplace_tf"):
        DiagonalLaplace.load(newer, la.model)


def test_selected_weights_mismatch_is_refused(saved, tmp_path):
    la, path = saved
    metadata = read_metadata(path)
    metadata["weights"][0]["shape"] = [99, 1]
    edited = tmp_path / "edited.npz"
    rewrite(path, edited, metadata=metadata)
    with pytest.raises(ValueError, match="selected weights differ"):
        DiagonalLaplace.load(edited, la.model)


def test_failed_save_leaves_the_previous_file(saved, tmp_path, monkeypatch):
    la, _ = saved
    path = tmp_path / "posterior.npz"
    la.save(path)
    previous = path.read_bytes()

    def half_written(file, **arrays):
        file.write(b"PK\x03\x04 partial")
        raise OSError("disk full")

    monkeypatch.setattr(np, "savez", half_written)
    with pytest.raises(OSError, match="disk full"):
        la.save(path)
    monkeypatch.undo()

    def failing_replace(source, target):
        raise PermissionError("target locked")

    monkeypatch.setattr(os, "replace", failing_replace)
    with pytest.raises(PermissionError):
        la.save(path)
    monkeypatch.undo()
    assert path.read_bytes() == previous
    assert os.listdir(tmp_path) == ["posterior.npz"]
    assert zipfile.is_zipfile(path)


def test_fingerprints_are_deterministic_and_sensitive():
    a, b = make_model(3), make_model(3)
    assert serialization.architecture_fingerprint(a) == serialization.architecture_fingerprint(b)
    assert serialization.weights_fingerprint(a) == serialization.weights_fingerprint(b)
    c = make_model(3, seed=1)
    assert serialization.architecture_fingerprint(a) == serialization.architecture_fingerprint(c)
    assert serialization.weights_fingerprint(a) != serialization.weights_fingerprint(c)


class Wrapper(keras.Model):
    """A subclassed model whose ``get_config`` raises (a layer passed to ``__init__``)."""

    def __init__(self, layer):
        super().__init__()
        self.inner = layer

    def call(self, x):
        return self.inner(x)


def test_fingerprint_of_subclassed_model_without_config():
    wrappers = [Wrapper(keras.layers.Dense(units, name="inner")) for units in (2, 3)]
    for wrapper in wrappers:
        wrapper(np.zeros((1, 4), "float32"))
    with pytest.raises(NotImplementedError):
        wrappers[0].get_config()
    first, second = (serialization.architecture_fingerprint(w) for w in wrappers)
    assert first != second
    assert first == serialization.architecture_fingerprint(wrappers[0])
