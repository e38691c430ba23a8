"""``model.save`` / ``load_model`` and ``la.save`` / ``DiagonalLaplace.load`` in a fresh process.

The documented workflow: fit, save the model with Keras and the posterior with laplace_tf,
then load both in a new Python process. Keras regenerates weight paths on reload
(``sequential/dense/kernel`` becomes ``dense/kernel``), so this is checked for Sequential,
Functional and subclassed models in a real subprocess; and a file written by laplace_tf
0.1 (format version 1, ``tests/data/v1_functional.*``) must still load.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import keras
import numpy as np
import pytest

from laplace_tf import DiagonalLaplace

DATA = Path(__file__).parent / "data"

# A subclassed model must be importable by the loading process: it is written to a module.
NETS_MODULE = """
import keras


@keras.saving.register_keras_serializable(package="fresh_process")
class TwoLayer(keras.Model):
    def __init__(self, hidden=5, outputs=3, **kwargs):
        super().__init__(**kwargs)
        self.hidden, self.outputs = hidden, outputs
        self.first = keras.layers.Dense(hidden, activation="tanh")
        self.second = keras.layers.Dense(outputs)

    def call(self, x):
        return self.second(self.first(x))

    def get_config(self):
        return {**super().get_config(), "hidden": self.hidden, "outputs": self.outputs}
"""

LOADER = """
import json, sys
import keras, numpy as np
sys.path.insert(0, sys.argv[1])
import fresh_nets  # registers the subclassed model
import laplace_tf

keras.layers.Dense(2), keras.layers.Dense(2)  # shift Keras' automatic layer names
results = {}
for name in sys.argv[2:]:
    model = keras.models.load_model(f"{sys.argv[1]}/{name}.keras")
    before = [w.copy() for w in model.get_weights()]
    la = laplace_tf.DiagonalLaplace.load(f"{sys.argv[1]}/{name}.npz", model)
    x = np.load(f"{sys.argv[1]}/{name}_x.npy")
    results[name] = {
        "probs": la.predict(x).numpy().tolist(),
        "marglik": float(la.log_marginal_likelihood()),
        "untouched": all(np.array_equal(a, b) for a, b in zip(before, model.get_weights())),
    }
print(json.dumps(results))
"""


def _models(directory: Path) -> dict[str, keras.Model]:
    sys.path.insert(0, str(directory))
    try:
        import fresh_nets
    finally:
        sys.path.remove(str(directory))
    keras.utils.set_random_seed(0)
    sequential = keras.Sequential(
        [keras.Input((4,)), keras.layers.Dense(5, activation="tanh"), keras.layers.Dense(3)]
    )
    inputs = keras.Input((4,))
    hidden = keras.layers.Dense(5, activation="tanh")(inputs)
    functional = keras.Model(inputs, keras.layers.Dense(3)(hidden))
    subclassed = fresh_nets.TwoLayer()
    subclassed(np.zeros((1, 4), "float32"))
    return {"sequential": sequential, "functional": functional, "subclassed": subclassed}


def _load_in_fresh_process(directory: Path, names: list[str]) -> dict:
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3", "CUDA_VISIBLE_DEVICES": ""}
    done = subprocess.run(
        [sys.executable, "-c", LOADER, str(directory), *names],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_sequential_functional_and_subclassed_round_trip_in_a_new_process(tmp_path):
    (tmp_path / "fresh_nets.py").write_text(textwrap.dedent(NETS_MODULE))
    rng = np.random.default_rng(1)
    x = rng.normal(size=(30, 4)).astype("float32")
    y = rng.integers(0, 3, 30)
    expected = {}
    for name, model in _models(tmp_path).items():
        la = DiagonalLaplace(model, "classification", prior_precision=0.7).fit((x, y))
        model.save(tmp_path / f"{name}.keras")
        la.save(tmp_path / f"{name}.npz")
        np.save(tmp_path / f"{name}_x.npy", x[:6])
        expected[name] = (la.predict(x[:6]).numpy(), float(la.log_marginal_likelihood()))
    loaded = _load_in_fresh_process(tmp_path, list(expected))
    for name, (probs, marglik) in expected.items():
        np.testing.assert_allclose(loaded[name]["probs"], probs, rtol=1e-6, err_msg=name)
        assert loaded[name]["marglik"] == pytest.approx(marglik, rel=1e-12), name
        assert loaded[name]["untouched"], name


def test_file_written_by_version_0_1_still_loads():
    model = keras.models.load_model(DATA / "v1_functional.keras")
    expected = np.load(DATA / "v1_functional_expected.npz")
    la = DiagonalLaplace.load(DATA / "v1_functional.npz", model)
    assert la.prior_precision == [0.5, 2.0]
    np.testing.assert_allclose(la.predict(expected["x"]), expected["probs"], rtol=1e-6)
    assert float(la.log_marginal_likelihood()) == pytest.approx(float(expected["marglik"]))


def test_version_1_file_still_refuses_another_architecture():
    inputs = keras.Input((4,), name="features")
    hidden = keras.layers.Dense(7, activation="tanh", name="hidden")(inputs)
    other = keras.Model(inputs, keras.layers.Dense(3, name="logits")(hidden), name="v1_model")
    with pytest.raises(ValueError, match="different architecture"):
        DiagonalLaplace.load(DATA / "v1_functional.npz", other)
