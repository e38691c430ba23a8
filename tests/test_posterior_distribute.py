"""tf.distribute for the Kronecker and full structures: a model built under
MirroredStrategy (two logical CPUs) gives the single-device posterior.

Logical devices must be configured before TensorFlow runs any op, so the check runs in a
fresh interpreter and reports its measurements as JSON.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest

SCRIPT = textwrap.dedent(
    """
    import json
    import tensorflow as tf

    cpu = tf.config.list_physical_devices("CPU")[0]
    tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)

    import keras
    import numpy as np

    from laplace_tf.posterior import Laplace

    keras.config.set_floatx("float64")
    strategy = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
    L = keras.layers

    def cnn():
        keras.utils.set_random_seed(1)
        return keras.Sequential(
            [keras.Input((5, 5, 2)), L.Conv2D(3, 3, activation="relu"), L.Flatten(), L.Dense(3)]
        )

    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(45, 5, 5, 2)), rng.integers(0, 3, size=45)
    with strategy.scope():
        model = cnn()
    single = cnn()
    single.set_weights(model.get_weights())
    report = {}
    for structure in ("kron", "full"):
        la = Laplace(model, "classification", structure=structure).fit((x, y), batch_size=16)
        ref = Laplace(single, "classification", structure=structure).fit((x, y), batch_size=16)
        report[structure] = {
            "n_data": la.n_data,
            "lml": [float(la.log_marginal_likelihood()), float(ref.log_marginal_likelihood())],
            "variance": max(
                float(np.max(np.abs(a - b)) / np.max(np.abs(b)))
                for a, b in zip(la.posterior_variance, ref.posterior_variance)
            ),
            "predict": float(np.max(np.abs(la.predict(x) - ref.predict(x)))),
        }
    print("REPORT" + json.dumps(report))
    """
)


@pytest.fixture(scope="module")
def report():
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3")
    result = subprocess.run(
        [sys.executable, "-c", SCRIPT], capture_output=True, text=True, timeout=600, env=env
    )
    assert result.returncode == 0, result.stderr[-4000:]
    line = next(line for line in result.stdout.splitlines() if line.startswith("REPORT"))
    return json.loads(line[len("REPORT") :])


@pytest.mark.parametrize("structure", ["kron", "full"])
def test_distributed_structures_equal_single_device(report, structure):
    case = report[structure]
    assert case["n_data"] == 45
    got, want = case["lml"]
    assert got == pytest.approx(want, rel=1e-12)
    assert case["variance"] < 1e-10
    assert case["predict"] < 1e-12
