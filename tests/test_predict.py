"""Prediction inputs and outputs: datasets as Keras reads them, bounded working memory,
and non-finite predictive outputs, which must never pass silently."""

from __future__ import annotations

import warnings

import keras
import numpy as np
import pytest
import tensorflow as tf

from laplace_tf import DiagonalLaplace
from laplace_tf.curvature import output_covariance, structured

L = keras.layers


def mlp(outputs=3, seed=0):
    keras.utils.set_random_seed(seed)
    inputs = keras.Input((4,))
    hidden = L.Dense(5, activation="tanh")(inputs)
    return keras.Model(inputs, L.Dense(outputs)(hidden))


def small_cnn(seed=0):
    keras.utils.set_random_seed(seed)
    inputs = keras.Input((6, 6, 2))
    h = L.Conv2D(3, 3, activation="relu")(inputs)
    h = L.Flatten()(h)
    return keras.Model(inputs, L.Dense(3)(h))


@pytest.fixture(scope="module")
def fitted():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(50, 4)).astype("float32")
    y = rng.integers(0, 3, 50)
    return DiagonalLaplace(mlp(), "classification").fit((x, y)), x, y


@pytest.mark.parametrize("element", ["x", "x_tuple", "x_y", "x_y_w"])
def test_predict_and_samples_read_a_dataset_as_keras_does(fitted, element):
    la, x, y = fitted
    w = np.ones(len(x), "float32")
    slices = {"x": x, "x_tuple": (x,), "x_y": (x, y), "x_y_w": (x, y, w)}[element]
    dataset = tf.data.Dataset.from_tensor_slices(slices).batch(16)
    for kwargs in ({}, {"link_approx": "bridge"}, {"pred_type": "nn", "n_samples": 3, "seed": 2}):
        np.testing.assert_allclose(la.predict(dataset, **kwargs), la.predict(x, **kwargs), 1e-6)
    for pred_type in ("glm", "nn"):
        from_dataset = la.predictive_samples(dataset, 4, pred_type=pred_type, seed=1)
        from_arrays = la.predictive_samples(x, 4, pred_type=pred_type, seed=1)
        np.testing.assert_allclose(from_dataset, from_arrays, rtol=1e-6)
    assert la.predict(dataset).shape == (len(x), 3)


def test_regression_predict_reads_a_dataset(fitted):
    _, x, _ = fitted
    y = np.sin(x[:, :2])
    la = DiagonalLaplace(mlp(2), "regression", sigma_noise=0.3).fit((x, y))
    dataset = tf.data.Dataset.from_tensor_slices((x, y)).batch(7)
    for got, expected in zip(la.predict(dataset), la.predict(x), strict=True):
        np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-7)


def test_glm_predict_memory_is_bounded_by_chunks_of_examples(monkeypatch):
    rng = np.random.default_rng(1)
    x = rng.normal(size=(12, 6, 6, 2)).astype("float32")
    la = DiagonalLaplace(small_cnn(), "classification").fit((x, rng.integers(0, 3, 12)))
    expected_mean, expected_covariance = la._glm(x, 256)
    variances = la.posterior_variance
    reference = output_covariance(la.model, x, variances)
    per_example = structured._trace_summary(la.model, la.variables, x[:1]).entries_per_example
    # 3 columns of 3 * 16 + 3 cut entries, and the largest per-example gradients formed at
    # once: the Dense kernel's Outer none, the conv kernel's 54 one column at a time, the
    # biases theirs for all 3 columns
    assert per_example == 3 * (3 * 16 + 3) + 54
    monkeypatch.setattr(structured, "PREDICT_ENTRIES", 5 * per_example)
    chunk_sizes = []
    step = structured._cached(la.model, ("covariance",), la.variables, lambda: None)

    def counting(batch, weights):
        chunk_sizes.append(int(batch.shape[0]))
        return step(batch, weights)

    monkeypatch.setitem(
        structured._STEPS[la.model],
        ("covariance", tuple(id(v) for v in la.variables)),
        counting,
    )
    mean, covariance = la._glm(x, 256)
    assert chunk_sizes == [5, 5, 2]
    np.testing.assert_allclose(mean, expected_mean, rtol=1e-6)
    np.testing.assert_allclose(covariance, expected_covariance, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(covariance, reference, rtol=1e-5, atol=1e-7)


def deep_linear(depth=12, width=32, seed=0):
    keras.utils.set_random_seed(seed)
    inputs = keras.Input((4,))
    h = inputs
    for _ in range(depth):
        h = L.Dense(width)(h)
    return keras.Model(inputs, L.Dense(3)(h))


def test_overflowing_weight_draws_warn_with_the_cause_and_the_remedies(fitted):
    _, x, y = fitted
    model = deep_linear()
    before = [v.numpy().copy() for v in model.weights]
    # a flat posterior: weight standard deviations of about 1000 through 13 layers
    la = DiagonalLaplace(model, "classification", prior_precision=1e-6, temperature=1e12)
    la.fit((x, y))
    with pytest.warns(RuntimeWarning, match=r"NaN or Inf outputs for \d+ of 3 posterior") as w:
        probs = la.predict(x[:5], pred_type="nn", n_samples=3, seed=0)
    assert not np.all(np.isfinite(probs))
    message = str(w[0].message)
    for remedy in ("larger prior precision", "subset='last_layer'", "pred_type='glm'"):
        assert remedy in message
    with pytest.warns(RuntimeWarning, match="NaN or Inf outputs"):
        la.predictive_samples(x[:5], 2, seed=0)
    la.prior_precision = 1e4  # narrow draws stay finite and say nothing
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert np.all(np.isfinite(la.predict(x[:5], pred_type="nn", n_samples=3, seed=0)))
    assert all(np.array_equal(a, v.numpy()) for a, v in zip(before, model.weights, strict=True))


def test_overflowing_glm_covariance_warns(fitted):
    la, x, _ = fitted
    with pytest.warns(RuntimeWarning, match=r"GLM predictive is NaN or Inf for 5 of 5"):
        la.predict(x[:5] * 1e20)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        la.predict(x[:5])


def test_gridsearch_passes_over_overflowing_values_quietly(fitted):
    _, x, y = fitted
    la = DiagonalLaplace(deep_linear(), "classification", temperature=1e12).fit((x, y))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        la.optimize_prior_precision(
            "gridsearch", val_data=(x, y), grid=[1e-6, 1e4], pred_type="nn", seed=0
        )
    assert la.prior_precision == 1e4


@pytest.mark.parametrize("structure", ["kron", "full"])
def test_every_structure_reads_a_dataset_and_chunks_its_glm_predictive(
    fitted, structure, monkeypatch
):
    from laplace_tf.posterior import Laplace

    _, x, y = fitted
    la = Laplace(mlp(), "classification", structure=structure).fit((x, y))
    expected = la.predict(x)
    dataset = tf.data.Dataset.from_tensor_slices((x, y)).batch(16)
    np.testing.assert_allclose(la.predict(dataset), expected, rtol=1e-5, atol=1e-7)
    monkeypatch.setattr(structured, "PREDICT_ENTRIES", 1)  # one example per chunk
    np.testing.assert_allclose(la.predict(x), expected, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(
        la.predict(dataset, pred_type="nn", n_samples=2, seed=3),
        la.predict(x, pred_type="nn", n_samples=2, seed=3),
        rtol=1e-6,
    )
