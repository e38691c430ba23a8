"""tf.distribute: a model built under MirroredStrategy (two logical CPUs) is fitted across
its replicas, and the result equals the single-device one.

Logical devices must be configured before TensorFlow runs any op, so the check runs in
a fresh interpreter and reports its measurements as JSON.
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

    from laplace_tf import DiagonalLaplace
    from laplace_tf.curvature import diagonal

    keras.config.set_floatx("float64")
    strategy = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
    runs = []
    original_run = strategy.run

    def counting_run(fn, args=(), kwargs=None, options=None):
        runs.append(len(strategy.experimental_local_results(args[0])))
        return original_run(fn, args=args, kwargs=kwargs, options=options)

    strategy.run = counting_run
    L = keras.layers

    def mlp():
        keras.utils.set_random_seed(0)
        return keras.Sequential(
            [keras.Input((4,)), L.Dense(5, activation="tanh"), L.Dense(3)]
        )

    def cnn():
        keras.utils.set_random_seed(1)
        return keras.Sequential(
            [keras.Input((5, 5, 2)), L.Conv2D(3, 3, activation="relu"), L.Flatten(), L.Dense(3)]
        )

    def relative(a, b):
        return max(
            float(np.max(np.abs(u - v)) / max(np.max(np.abs(v)), 1e-300))
            for u, v in zip(a, b)
        )

    rng = np.random.default_rng(0)
    inputs = {"mlp": rng.normal(size=(45, 4)), "cnn": rng.normal(size=(45, 5, 5, 2))}
    y = rng.integers(0, 3, size=45)
    report = {"errors": {}}
    for name, build in (("mlp", mlp), ("cnn", cnn)):
        with strategy.scope():
            model = build()
        single = build()
        single.set_weights(model.get_weights())
        x = inputs[name]
        kinds = ["ggn", "ef"] + (["hessian"] if name == "cnn" else [])
        for kind in kinds:
            for batch_size in (16, 1):
                got = diagonal(model, (x, y), likelihood="classification", kind=kind,
                               batch_size=batch_size)
                want = diagonal(single, (x, y), likelihood="classification", kind=kind,
                                batch_size=batch_size)
                report["errors"][f"{name}-{kind}-{batch_size}"] = relative(got, want)
        mc = diagonal(model, (x, y), likelihood="classification", kind="ggn_mc", seed=0)
        report[f"{name}_mc_ok"] = bool(all(np.all(np.isfinite(h) & (h >= 0)) for h in mc))
        la = DiagonalLaplace(model, "classification").fit((x, y), batch_size=16)
        ref = DiagonalLaplace(single, "classification").fit((x, y), batch_size=16)
        la.optimize_prior_precision()
        ref.optimize_prior_precision()
        report[f"{name}_n_data"] = la.n_data
        report[f"{name}_prior"] = [la.prior_precision, ref.prior_precision]
        report[f"{name}_lml"] = [float(la.log_marginal_likelihood()),
                                 float(ref.log_marginal_likelihood())]
        report[f"{name}_predict"] = float(np.max(np.abs(la.predict(x) - ref.predict(x))))
        nn = [m.predict(x, pred_type="nn", n_samples=3, seed=0) for m in (la, ref)]
        report[f"{name}_predict_nn"] = float(np.max(np.abs(nn[0] - nn[1])))
        report[f"{name}_weights_kept"] = all(
            np.array_equal(a, b) for a, b in zip(model.get_weights(), single.get_weights())
        )
    report["runs"] = len(runs)
    report["replicas_per_run"] = sorted(set(runs))
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


def test_batches_are_spread_over_both_replicas(report):
    # strategy.run is called while the replicated step is traced (then it runs as a graph)
    assert report["runs"] >= 1
    assert report["replicas_per_run"] == [2]


def test_distributed_curvature_equals_single_device(report):
    assert len(report["errors"]) == 10
    for case, error in report["errors"].items():
        assert error < 1e-12, case


@pytest.mark.parametrize("name", ["mlp", "cnn"])
def test_distributed_laplace_equals_single_device(report, name):
    assert report[f"{name}_mc_ok"]
    assert report[f"{name}_n_data"] == 45
    got, want = report[f"{name}_prior"]
    assert got == pytest.approx(want, rel=1e-8)
    got, want = report[f"{name}_lml"]
    assert got == pytest.approx(want, rel=1e-12)
    # float64 predictions of posteriors whose optimised priors agree to ~1e-10 (summation
    # order differs: the replicas' slices, and the single device's compiled pass)
    assert report[f"{name}_predict"] < 1e-9
    assert report[f"{name}_predict_nn"] < 1e-9
    assert report[f"{name}_weights_kept"]
