"""The exported GLM predictive: a SavedModel that TensorFlow alone serves, equal to ``predict``.

Every structure and subset is fitted here, exported, and reloaded in ONE subprocess in
which ``laplace_tf`` cannot be imported (``sys.modules`` blocks it); its ``serve``
signature must give ``la.predict``'s numbers at batch sizes 1 and 7.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import keras
import numpy as np
import pytest
import tensorflow as tf

import laplace_tf

STRUCTURES = ("diag", "kron", "full")
SUBSETS = ("all", "last_layer")

LOADER = textwrap.dedent(
    """
    import json, sys
    sys.modules["laplace_tf"] = None  # importing laplace_tf now fails
    import numpy as np
    import tensorflow as tf

    cases = json.loads(sys.argv[1])
    report = {}
    for name, path in cases.items():
        data = np.load(path + ".npz")
        served = tf.saved_model.load(path)
        errors = []
        for size in (1, 7):
            x = tf.constant(data["x"][:size])
            out = served.signatures["serving_default"](inputs=x)
            for key in sorted(out):
                expected = data[key][:size]
                errors.append(float(np.max(np.abs(out[key].numpy() - expected))))
                if out[key].shape != expected.shape:
                    errors.append(float("inf"))
        report[name] = {"error": max(errors), "keys": sorted(out)}
    report["imported"] = "laplace_tf" in sys.modules and sys.modules["laplace_tf"] is not None
    print(json.dumps(report))
    """
)


def _mlp(inputs: int, outputs: int, seed: int) -> keras.Model:
    keras.utils.set_random_seed(seed)
    return keras.Sequential(
        [
            keras.Input((inputs,)),
            keras.layers.Dense(6, activation="tanh"),
            keras.layers.Dense(5, activation="relu"),
            keras.layers.Dense(outputs),
        ]
    )


def _cnn(seed: int) -> keras.Model:
    keras.utils.set_random_seed(seed)
    return keras.Sequential(
        [
            keras.Input((6, 6, 2)),
            keras.layers.Conv2D(3, 3, activation="relu"),
            keras.layers.Flatten(),
            keras.layers.Dense(3),
        ]
    )


def _cases():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(30, 4)).astype("float32")
    labels = rng.integers(0, 3, 30)
    cases = {}
    for structure in STRUCTURES:
        for subset in SUBSETS:
            cases[f"classification-{structure}-{subset}"] = (
                _mlp(4, 3, 1),
                "classification",
                structure,
                subset,
                (x, labels),
                "probit",
            )
    cases["classification-kron-all-bridge"] = (
        _mlp(4, 3, 2),
        "classification",
        "kron",
        "all",
        (x, labels),
        "bridge",
    )
    cases["binary-full-all"] = (
        _mlp(4, 1, 3),
        "binary",
        "full",
        "all",
        (x, labels % 2),
        "probit",
    )
    targets = np.sin(x[:, :2]).astype("float32")
    cases["regression-kron-all"] = (
        _mlp(4, 2, 4),
        "regression",
        "kron",
        "all",
        (x, targets),
        "probit",
    )
    images = rng.normal(size=(20, 6, 6, 2)).astype("float32")
    cases["classification-kron-all-conv"] = (
        _cnn(5),
        "classification",
        "kron",
        "all",
        (images, labels[:20]),
        "probit",
    )
    return cases


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """Every case fitted and exported; the subprocess' report and the parent's records."""
    root = tmp_path_factory.mktemp("exported")
    paths, records = {}, {}
    for name, (model, likelihood, structure, subset, data, link) in _cases().items():
        before = [v.numpy().copy() for v in model.variables]
        la = laplace_tf.Laplace(
            model, likelihood, structure=structure, subset=subset, prior_precision=0.5
        )
        la.fit(data)
        if likelihood == "regression":
            la.sigma_noise = 0.3
        x = data[0][:7]
        predicted = la.predict(x, link_approx=link)
        arrays = (
            {"mean": predicted[0].numpy(), "variance": predicted[1].numpy()}
            if likelihood == "regression"
            else {"probabilities": predicted.numpy()}
        )
        path = str(root / name)
        la.predictive_model(link_approx=link).export(path)
        np.savez(path + ".npz", x=x, **arrays)
        paths[name] = path
        unchanged = all(
            np.array_equal(b, v.numpy()) for b, v in zip(before, model.variables, strict=True)
        )
        plain = model(x)
        records[name] = {"arrays": arrays, "unchanged": unchanged, "plain": plain.numpy()}
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3")
    env.pop("PYTHONPATH", None)
    result = subprocess.run(
        [sys.executable, "-c", LOADER, json.dumps(paths)],
        capture_output=True,
        text=True,
        timeout=600,
        env=env,
        cwd=str(root),
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout.strip().splitlines()[-1]), records


@pytest.mark.parametrize("name", list(_cases()))
def test_reloaded_signature_equals_predict(exported, name):
    report, records = exported
    assert not report["imported"]
    assert report[name]["error"] < 1e-5, report[name]
    assert report[name]["keys"] == sorted(records[name]["arrays"])
    assert records[name]["unchanged"]


@pytest.mark.parametrize("name", list(_cases()))
def test_predictive_is_not_the_plain_network(exported, name):
    """The oracle above is not vacuous: the calibrated predictive differs from the MAP's."""
    _, records = exported
    arrays, plain = records[name]["arrays"], records[name]["plain"]
    if "probabilities" in arrays:
        link = tf.sigmoid(plain) if plain.shape[-1] == 1 else tf.nn.softmax(plain)
        assert np.max(np.abs(arrays["probabilities"] - link.numpy())) > 1e-3
    else:
        assert np.max(arrays["variance"]) > 0.3**2 + 1e-3


@pytest.mark.parametrize("structure", STRUCTURES)
def test_chunked_serving_equals_one_chunk(structure):
    """Batches longer than ``chunk_size`` are looped over in the graph, with the same result."""
    rng = np.random.default_rng(1)
    x, y = rng.normal(size=(23, 4)).astype("float32"), rng.integers(0, 3, 23)
    la = laplace_tf.Laplace(_mlp(4, 3, 6), structure=structure).fit((x, y))
    whole = la.predictive_model()(x)["probabilities"]
    chunked = la.predictive_model(chunk_size=5)(x)["probabilities"]
    np.testing.assert_allclose(chunked, whole, atol=1e-6)
    np.testing.assert_allclose(whole, la.predict(x), atol=1e-6)


def test_tuned_prior_and_temperature_are_exported():
    """The posterior is read at construction: prior precision and temperature included."""
    rng = np.random.default_rng(2)
    x, y = rng.normal(size=(20, 4)).astype("float32"), rng.integers(0, 3, 20)
    la = laplace_tf.Laplace(_mlp(4, 3, 7), structure="kron", temperature=0.5).fit((x, y))
    la.prior_precision = 0.05
    np.testing.assert_allclose(la.predictive_model()(x)["probabilities"], la.predict(x), atol=1e-6)


def test_refuses_sampled_predictives():
    rng = np.random.default_rng(3)
    x, y = rng.normal(size=(10, 4)).astype("float32"), rng.integers(0, 3, 10)
    la = laplace_tf.Laplace(_mlp(4, 3, 8)).fit((x, y))
    with pytest.raises(ValueError, match="pred_type='nn' cannot be exported"):
        la.predictive_model(pred_type="nn")
    with pytest.raises(ValueError, match="link_approx='mc' cannot be exported"):
        la.predictive_model(link_approx="mc")


def test_unfitted_is_refused():
    la = laplace_tf.Laplace(_mlp(4, 3, 9))
    with pytest.raises(RuntimeError, match="not fitted"):
        la.predictive_model()
