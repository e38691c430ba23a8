"""``fit`` under ``MultiWorkerMirroredStrategy``: two worker processes on this machine
(loopback ``TF_CONFIG``, free ports) fit the same data and both get the single-process
curvature. The workers are started and stopped by the test and bounded in time."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import textwrap

import numpy as np
import pytest

#: The same script for the workers (TF_CONFIG set: under the strategy) and the single process.
SCRIPT = textwrap.dedent(
    """
    import contextlib, json, os
    import tensorflow as tf

    distributed = "TF_CONFIG" in os.environ
    strategy = tf.distribute.MultiWorkerMirroredStrategy() if distributed else None
    import keras
    import numpy as np
    from laplace_tf import DiagonalLaplace, Laplace

    keras.config.set_floatx("float64")
    rng = np.random.default_rng(0)
    x = rng.normal(size=(37, 4))
    y = rng.integers(0, 3, 37)
    weights = rng.uniform(0.5, 2.0, size=37)
    with strategy.scope() if distributed else contextlib.nullcontext():
        keras.utils.set_random_seed(0)
        model = keras.Sequential(
            [keras.Input((4,)), keras.layers.Dense(5, activation="tanh"), keras.layers.Dense(3)]
        )
    la = DiagonalLaplace(model, "classification").fit((x, y), batch_size=8)
    kron = Laplace(model, "classification", structure="kron").fit((x, y, weights), batch_size=8)
    print(json.dumps({
        "replicas": strategy.num_replicas_in_sync if distributed else 1,
        "curvature": [h.numpy().ravel().tolist() for h in la.curvature_diagonal()],
        "loss": float(la.log_likelihood()),
        "n_data": la.n_data,
        "kron_n_data": kron.n_data,
        "kron_variance": [v.numpy().ravel().tolist() for v in kron.posterior_variance],
        "predict": np.asarray(la.predict(x[:5])).tolist(),
        "kron_predict": np.asarray(kron.predict(x[:5], batch_size=2)).tolist(),
    }))
    """
)


def _free_ports(count: int) -> list[int]:
    sockets = [socket.socket() for _ in range(count)]
    try:
        for s in sockets:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


def _env(**extra) -> dict:
    return {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3", "CUDA_VISIBLE_DEVICES": "", **extra}


def _tf_config(cluster: dict, index: int) -> str:
    return json.dumps({"cluster": cluster, "task": {"type": "worker", "index": index}})


def _result(stdout: str) -> dict:
    return json.loads(stdout.strip().splitlines()[-1])


def test_two_workers_equal_the_single_process_fit():
    """Both workers get the single process' diagonal fit, a sample-weighted Kronecker fit,
    and the same GLM predictions."""
    ports = _free_ports(2)
    cluster = {"worker": [f"127.0.0.1:{port}" for port in ports]}
    workers = [
        subprocess.Popen(
            [sys.executable, "-c", SCRIPT],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=_env(TF_CONFIG=_tf_config(cluster, i)),
        )
        for i in range(2)
    ]
    outputs = []
    try:
        for worker in workers:
            stdout, stderr = worker.communicate(timeout=240)
            assert worker.returncode == 0, stderr[-3000:]
            outputs.append(_result(stdout))
    finally:
        for worker in workers:
            if worker.poll() is None:
                worker.kill()
                worker.communicate()
    single = subprocess.run(
        [sys.executable, "-c", SCRIPT], capture_output=True, text=True, timeout=240, env=_env()
    )
    assert single.returncode == 0, single.stderr[-3000:]
    expected = _result(single.stdout)
    for output in outputs:
        assert output["replicas"] == 2
        assert output["n_data"] == expected["n_data"] == 37
        assert output["loss"] == pytest.approx(expected["loss"], rel=1e-12)
        for got, reference in zip(output["curvature"], expected["curvature"], strict=True):
            np.testing.assert_allclose(got, reference, rtol=1e-12, atol=1e-300)
        # a weighted Kronecker fit, and predictions of both, under the strategy
        assert output["kron_n_data"] == pytest.approx(expected["kron_n_data"], rel=1e-12)
        for key in ("kron_variance",):
            for got, reference in zip(output[key], expected[key], strict=True):
                np.testing.assert_allclose(got, reference, rtol=1e-10)
        for key in ("predict", "kron_predict"):
            np.testing.assert_allclose(output[key], expected[key], rtol=1e-10)
