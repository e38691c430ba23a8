"""Defects found on real models: attention, recurrent layers and the per-example fallback.

MultiHeadAttention used to take the generic fallback, whose ``tf.vectorized_map`` over
an ``EinsumDense`` with a bias aborted the whole process in float32 (SIGSEGV, no
traceback), so the user's snippet runs in a subprocess. Its projections are now cut by the
EinsumDense rule; the fallback no longer vectorises over such layers.
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import warnings

import keras
import numpy as np
import pytest
import tensorflow as tf

import laplace_tf
from laplace_tf.curvature import FallbackWarning, diagonal, output_covariance
from laplace_tf.curvature.tracing import trace

L = keras.layers

ISSUE_SNIPPET = """
import keras, numpy as np, laplace_tf
inp = keras.Input((7,), dtype="int32"); h = keras.layers.Embedding(30, 8)(inp)
attention = keras.layers.MultiHeadAttention(num_heads=2, key_dim=4)
h = keras.layers.GlobalAveragePooling1D()(h + attention(h, h))
model = keras.Model(inp, keras.layers.Dense(4)(h))
x = np.random.default_rng(0).integers(1, 30, (8, 7)).astype("int32"); y = x[:, 0] % 4
for kind in ("ggn", "ggn_mc"):
    la = laplace_tf.DiagonalLaplace(model, "classification", curvature=kind).fit((x, y))
    laplace_tf.curvature.diagonal(model, (x, y), likelihood="classification", kind=kind)
print("probabilities", la.predict(x).numpy().sum())
"""


def test_attention_model_of_the_report_fits_in_a_subprocess():
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3", "CUDA_VISIBLE_DEVICES": ""}
    done = subprocess.run(
        [sys.executable, "-c", ISSUE_SNIPPET],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
    )
    assert done.returncode == 0, f"exit {done.returncode}: {done.stderr[-3000:]}"
    assert float(done.stdout.split()[-1]) == pytest.approx(8.0, rel=1e-5)


pytestmark = pytest.mark.usefixtures("float64")  # conftest.py: float64 layers


def attention_model(layer):
    keras.utils.set_random_seed(0)
    inputs = keras.Input((5,), dtype="int32")
    h = L.Embedding(20, 6)(inputs)
    h = L.GlobalAveragePooling1D()(h + layer(h, h))
    return keras.Model(inputs, L.Dense(3)(h))


def tokens(n=6):
    x = np.random.default_rng(1).integers(0, 20, (n, 5)).astype("int32")
    return x, x[:, 0] % 3


def dense_ggn_and_covariance(model, x, weights):
    """``diag sum_n J_n^T Lambda_n J_n`` and ``J_n diag(w) J_n^T`` from dense Jacobians."""
    variables = model.trainable_variables
    diagonal_total = np.zeros(sum(v.shape.num_elements() for v in variables))
    w = np.concatenate([np.ravel(a) for a in weights])
    covariances = []
    for n in range(len(x)):
        with tf.GradientTape(persistent=True) as tape:
            f = model(x[n : n + 1], training=False)[0]
        jacobian = np.concatenate(
            [
                tape.jacobian(f, v.value, experimental_use_pfor=False).numpy().reshape(3, -1)
                for v in variables
            ],
            axis=1,
        )
        p = tf.nn.softmax(f).numpy()
        hessian = np.diag(p) - np.outer(p, p)
        diagonal_total += np.einsum("cp,cd,dp->p", jacobian, hessian, jacobian)
        covariances.append(jacobian @ np.diag(w) @ jacobian.T)
    return diagonal_total, np.stack(covariances)


def flat(tensors):
    return np.concatenate([np.ravel(np.asarray(t)) for t in tensors])


@pytest.mark.parametrize(
    "layer",
    [
        lambda: L.MultiHeadAttention(num_heads=2, key_dim=3),
        lambda: L.MultiHeadAttention(num_heads=2, key_dim=3, value_dim=2, output_shape=(6,)),
        lambda: L.GroupQueryAttention(head_dim=3, num_query_heads=4, num_key_value_heads=2),
    ],
    ids=["mha", "mha_value_dim", "gqa"],
)
def test_attention_projections_take_the_einsum_rule_and_equal_dense_jacobians(layer):
    model = attention_model(layer())
    x, y = tokens()
    with tf.GradientTape():
        _, sites = trace(model, x, model.trainable_variables)
    assert all(site.rule is not None for site in sites)
    assert {type(site.layer).__name__ for site in sites} == {"Embedding", "EinsumDense", "Dense"}
    weights = [np.random.default_rng(2).uniform(0.5, 1.5, v.shape) for v in model.weights]
    reference, covariance = dense_ggn_and_covariance(model, x, weights)
    with warnings.catch_warnings():
        warnings.simplefilter("error", FallbackWarning)
        got = diagonal(model, (x, y), likelihood="classification")
    np.testing.assert_allclose(flat(got), reference, rtol=1e-10, atol=1e-14)
    np.testing.assert_allclose(output_covariance(model, x, weights), covariance, rtol=1e-10)


class AttentionClassifier(keras.Model):
    """A subclassed model: traced as a whole, through the non-vectorised fallback."""

    def __init__(self):
        super().__init__()
        self.embed = L.Embedding(20, 6)
        self.attend = L.MultiHeadAttention(num_heads=2, key_dim=3)
        self.pool = L.GlobalAveragePooling1D()
        self.head = L.Dense(3)

    def call(self, x):
        h = self.embed(x)
        return self.head(self.pool(h + self.attend(h, h)))


def test_subclassed_attention_model_takes_a_loop_not_vectorized_map():
    keras.utils.set_random_seed(0)
    model = AttentionClassifier()
    x, y = tokens()
    model(x)
    with tf.GradientTape():
        _, sites = trace(model, x, model.trainable_variables)
    assert len(sites) == 1 and sites[0].rule is None
    (factor,) = sites[0].factors(tf.zeros([len(x), 3, 3], tf.float64))
    assert not factor.vectorize
    with pytest.warns(FallbackWarning):
        got = diagonal(model, (x, y), likelihood="classification")
    weights = [np.ones(v.shape) for v in model.weights]
    reference, _ = dense_ggn_and_covariance(model, x, weights)
    np.testing.assert_allclose(flat(got), reference, rtol=1e-10, atol=1e-14)


def recurrent_model():
    keras.utils.set_random_seed(0)
    inputs = keras.Input((4, 3))
    h = L.LSTM(4, name="encoder")(inputs)
    return keras.Model(inputs, L.Dense(2, name="head")(h))


def sequences():
    x = np.random.default_rng(0).normal(size=(6, 4, 3))
    return x, np.arange(6) % 2


class Encoder(L.Layer):
    """``tanh(flatten(x) W)``: a custom layer with its own weight and no rule."""

    def __init__(self, units, **kwargs):
        super().__init__(**kwargs)
        self.units = units

    def build(self, input_shape):
        size = int(np.prod(input_shape[1:]))
        self.w = self.add_weight(shape=(size, self.units), name="w")

    def call(self, x):
        return keras.ops.tanh(keras.ops.matmul(keras.ops.reshape(x, (-1, self.w.shape[0])), self.w))


def custom_model():
    keras.utils.set_random_seed(0)
    inputs = keras.Input((4, 3))
    h = Encoder(8, name="encoder")(inputs)
    return keras.Model(inputs, L.Dense(2, name="head")(h))


def test_fallback_layers_are_named_once_per_fit_with_their_share():
    model = custom_model()
    with pytest.warns(FallbackWarning) as caught:
        laplace_tf.DiagonalLaplace(model, "classification").fit(sequences())
    fallback = [w for w in caught if issubclass(w.category, FallbackWarning)]
    assert len(fallback) == 1
    assert fallback[0].filename == __file__  # it points at the user's call
    message = str(fallback[0].message)
    # Encoder(8) on 4 x 3 features: 12 * 8 = 96 of the 114 weights
    assert "'encoder' (Encoder, 96 weights, 84%)" in message
    assert "explain(model)" in message and "head" not in message
    with warnings.catch_warnings():
        warnings.simplefilter("error", FallbackWarning)
        laplace_tf.DiagonalLaplace(model, "classification", subset=["head"]).fit(sequences())


def test_exact_hessian_of_a_recurrent_model_fails_with_a_short_clear_message(caplog):
    model = recurrent_model()
    with caplog.at_level(logging.ERROR, logger="tensorflow"):
        with pytest.raises(ValueError, match=r"'encoder' \(LSTM\).*kind='ggn'.*'ggn_mc' or 'ef'"):
            laplace_tf.DiagonalLaplace(model, "classification", curvature="hessian").fit(
                sequences()
            )
    assert not [r for r in caplog.records if r.name == "tensorflow"]


@pytest.mark.parametrize("structure", ["kron", "full"])
def test_fallback_warning_for_every_structure(structure):
    from laplace_tf.posterior import Laplace

    keras.utils.set_random_seed(0)
    model = AttentionClassifier()
    x, y = tokens()
    model(x)
    with pytest.warns(FallbackWarning, match="fallback"):
        Laplace(model, "classification", structure=structure).fit((x, y))
