"""Precision: mixed float16 / bfloat16 policies, float64 end to end, long sums in float32."""

from __future__ import annotations

import contextlib

import keras
import numpy as np
import pytest
import tensorflow as tf

from laplace_tf import DiagonalLaplace, Laplace
from laplace_tf.curvature import diagonal, output_covariance

L = keras.layers
N = 64
#: Relative agreement expected of a half-precision forward with the float32 one.
TOLERANCE = {"mixed_float16": 5e-3, "mixed_bfloat16": 4e-2}


@contextlib.contextmanager
def global_policy(name):
    previous = keras.mixed_precision.global_policy()
    keras.mixed_precision.set_global_policy(name)
    try:
        yield name
    finally:
        keras.mixed_precision.set_global_policy(previous)


@pytest.fixture
def policy(request):
    with global_policy(request.param):
        yield request.param


def sequence_model(seed=0, head_dtype="float32"):
    """Embedding, Conv1D, EinsumDense, LayerNorm, BatchNorm and Dense: every layer rule."""
    keras.utils.set_random_seed(seed)
    ids = keras.Input((6,), dtype="int32")
    h = L.Embedding(11, 4)(ids)
    h = L.Conv1D(5, 3, padding="causal", activation="tanh")(h)
    h = L.EinsumDense("btc,cd->btd", output_shape=(6, 4), bias_axes="d")(h)
    h = L.LayerNormalization()(h)
    h = L.BatchNormalization()(h)
    h = L.Flatten()(h)
    h = L.Dense(8, activation="tanh")(h)
    return keras.Model(ids, L.Dense(3, dtype=head_dtype)(h))


def image_model(seed=0):
    keras.utils.set_random_seed(seed)
    images = keras.Input((6, 6, 2))
    h = L.Conv2D(4, 3, activation="relu")(images)
    h = L.Flatten()(h)
    return keras.Model(images, L.Dense(3, dtype="float32")(h))


MODELS = {
    "sequence": (sequence_model, lambda rng: rng.integers(0, 11, size=(N, 6))),
    "image": (image_model, lambda rng: rng.normal(size=(N, 6, 6, 2)).astype("float32")),
}


def in_policy(name, policy_name, weights):
    """The model built under the current policy, carrying the float32 model's weights."""
    model = MODELS[name][0]()
    model.set_weights(weights)
    return model


def relative_error(got, expected):
    got, expected = np.asarray(got, np.float64), np.asarray(expected, np.float64)
    return np.max(np.abs(got - expected)) / np.max(np.abs(expected))


@pytest.mark.parametrize("policy", list(TOLERANCE), indirect=True)
@pytest.mark.parametrize("name", list(MODELS))
@pytest.mark.parametrize("kind", ["ggn", "ef"])
def test_mixed_precision_curvature_matches_float32(policy, name, kind):
    build, inputs = MODELS[name]
    rng = np.random.default_rng(0)
    x, y = inputs(rng), rng.integers(0, 3, size=N)
    with global_policy("float32"):
        reference_model = build()
    weights = reference_model.get_weights()
    reference = diagonal(reference_model, (x, y), likelihood="classification", kind=kind)
    model = in_policy(name, policy, weights)
    assert model.layers[1].compute_dtype != "float32", "the model must really be mixed"
    result = diagonal(model, (x, y), likelihood="classification", kind=kind)
    for got, expected in zip(result, reference, strict=True):
        assert got.dtype == tf.float32
        assert relative_error(got, expected) < TOLERANCE[policy]
    variances = [np.full(v.shape, 0.1, "float32") for v in model.trainable_variables]
    covariance = output_covariance(model, x, variances)
    assert covariance.dtype == tf.float32
    expected_covariance = output_covariance(reference_model, x, variances)
    assert relative_error(covariance, expected_covariance) < TOLERANCE[policy]


@pytest.mark.parametrize("policy", ["mixed_float16"], indirect=True)
def test_half_precision_sums_are_accumulated_in_float32(policy):
    """Squared gradients far above float16's largest value (65504) must not overflow."""
    rng = np.random.default_rng(1)
    x = (200 * rng.normal(size=(N, 8))).astype("float32")
    y = rng.normal(size=(N, 1)).astype("float32")
    with global_policy("float32"):
        keras.utils.set_random_seed(0)
        reference_model = keras.Sequential([keras.Input((8,)), L.Dense(1)])
    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input((8,)), L.Dense(1, dtype="mixed_float16")])
    model.set_weights(reference_model.get_weights())
    # regression GGN of a linear model: sum_n x_n^2 / sigma^2, independent of the weights
    expected = np.sum(x.astype(np.float64) ** 2, axis=0)
    assert expected.max() > 1e6
    kernel, bias = diagonal(model, (x, y), likelihood="regression")
    np.testing.assert_allclose(kernel.numpy()[:, 0], expected, rtol=1e-3)
    np.testing.assert_allclose(bias.numpy(), [N], rtol=1e-6)


@pytest.mark.parametrize("policy", list(TOLERANCE), indirect=True)
def test_diagonal_laplace_end_to_end_under_mixed_precision(policy):
    rng = np.random.default_rng(2)
    x, y = rng.integers(0, 11, size=(N, 6)), rng.integers(0, 3, size=N)
    with global_policy("float32"):
        reference_model = sequence_model()
    model = in_policy("sequence", policy, reference_model.get_weights())
    before = [w.copy() for w in model.get_weights()]
    reference = DiagonalLaplace(reference_model, "classification").fit((x, y))
    la = DiagonalLaplace(model, "classification").fit((x, y))
    la.optimize_prior_precision()
    reference.prior_precision = la.prior_precision
    for got, expected in zip(la.posterior_precision, reference.posterior_precision, strict=True):
        assert got.dtype == tf.float32
        assert relative_error(got, expected) < TOLERANCE[policy]
    probs = la.predict(x[:8])
    assert probs.dtype == tf.float32
    np.testing.assert_allclose(probs, reference.predict(x[:8]), atol=20 * TOLERANCE[policy])
    samples = la.predictive_samples(x[:8], 3, seed=0)
    assert samples.shape == (3, 8, 3) and np.all(np.isfinite(samples))
    lml, reference_lml = la.log_marginal_likelihood(), reference.log_marginal_likelihood()
    assert abs(float(lml) - float(reference_lml)) < TOLERANCE[policy] * abs(float(reference_lml))
    for a, b in zip(before, model.get_weights(), strict=True):
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("policy", list(TOLERANCE), indirect=True)
@pytest.mark.parametrize("structure", ["kron", "full"])
def test_kron_and_full_end_to_end_under_mixed_precision(policy, structure):
    """Under a half-precision policy the Kronecker factors and the full matrix are summed in
    float32 from float16 / bfloat16 activations; the posterior, its evidence and its
    predictive stay finite and close to those of the same weights in float32."""
    rng = np.random.default_rng(5)
    x, y = rng.integers(0, 11, size=(N, 6)), rng.integers(0, 3, size=N)
    with global_policy("float32"):
        reference_model = sequence_model()
    model = in_policy("sequence", policy, reference_model.get_weights())
    assert model.layers[2].compute_dtype != "float32", "the model must really be mixed"
    before = [w.copy() for w in model.get_weights()]
    reference = Laplace(reference_model, "classification", structure=structure).fit((x, y))
    la = Laplace(model, "classification", structure=structure).fit((x, y))
    la.optimize_prior_precision(prior_structure="layerwise")
    reference.prior_precision = la.prior_precision
    for got, expected in zip(la.posterior_variance, reference.posterior_variance, strict=True):
        assert np.all(np.isfinite(got))
        assert relative_error(got, expected) < TOLERANCE[policy]
    lml, reference_lml = la.log_marginal_likelihood(), reference.log_marginal_likelihood()
    assert np.isfinite(float(lml))
    assert abs(float(lml) - float(reference_lml)) < TOLERANCE[policy] * abs(float(reference_lml))
    probs = la.predict(x[:8])
    assert np.all(np.isfinite(probs))
    np.testing.assert_allclose(probs, reference.predict(x[:8]), atol=20 * TOLERANCE[policy])
    samples = la.predictive_samples(x[:8], 3, seed=0)
    assert samples.shape == (3, 8, 3) and np.all(np.isfinite(samples))
    for a, b in zip(before, model.get_weights(), strict=True):
        np.testing.assert_array_equal(a, b)


def test_float64_end_to_end():
    previous = keras.config.floatx()
    keras.config.set_floatx("float64")
    try:
        with global_policy("float64"):
            model = sequence_model(head_dtype=None)
    finally:
        keras.config.set_floatx(previous)
    assert all(w.dtype == "float64" for w in model.weights)
    rng = np.random.default_rng(3)
    x, y = rng.integers(0, 11, size=(N, 6)), rng.integers(0, 3, size=N)
    la = DiagonalLaplace(model, "classification").fit((x, y))
    la.optimize_prior_precision(prior_structure="layerwise")
    outputs = [
        *la.posterior_precision,
        *la.sample(2, seed=0),
        la.predict(x[:4]),
        la.predict(x[:4], pred_type="nn", n_samples=2, seed=0),
        la.predictive_samples(x[:4], 2, pred_type="glm", seed=0),
    ]
    assert all(t.dtype == tf.float64 for t in outputs)
    assert la.log_marginal_likelihood().dtype == tf.float64


def test_float32_sum_over_a_million_examples_matches_float64_closed_form():
    """Linear softmax model: diag GGN of W is sum_n x_ni^2 p_nj (1 - p_nj), in closed form."""
    n = 10**6
    rng = np.random.default_rng(4)
    x = (3 * rng.normal(size=(n, 4)) + 1).astype("float32")
    y = rng.integers(0, 3, size=n)
    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input((4,)), L.Dense(3)])
    weight, bias = (w.astype(np.float64) for w in model.get_weights())
    expected_weight, expected_bias = np.zeros((4, 3)), np.zeros(3)
    for start in range(0, n, 200_000):
        xs = x[start : start + 200_000].astype(np.float64)
        logits = xs @ weight + bias
        p = np.exp(logits - logits.max(axis=1, keepdims=True))
        p /= p.sum(axis=1, keepdims=True)
        expected_weight += xs.T**2 @ (p * (1 - p))
        expected_bias += (p * (1 - p)).sum(axis=0)
    got_weight, got_bias = diagonal(model, (x, y), likelihood="classification", batch_size=2048)
    assert relative_error(got_weight, expected_weight) < 1e-5
    assert relative_error(got_bias, expected_bias) < 1e-5
