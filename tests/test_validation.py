"""Bad input gets a clear, early error naming the problem and where it is."""

from __future__ import annotations

import keras
import numpy as np
import pytest
import tensorflow as tf

from laplace_tf import DiagonalLaplace
from laplace_tf.curvature import diagonal

L = keras.layers
N = 40


def mlp(outputs=3, activation=None, seed=0):
    keras.utils.set_random_seed(seed)
    inputs = keras.Input((4,))
    hidden = L.Dense(5, activation="tanh", name="hidden")(inputs)
    return keras.Model(inputs, L.Dense(outputs, activation=activation, name="head")(hidden))


@pytest.fixture(scope="module")
def data():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(N, 4)).astype("float32")
    y = rng.integers(0, 3, size=N)
    return x, y


def weights_of(model):
    return [v.numpy().copy() for v in model.weights]


@pytest.mark.parametrize("where", ["inputs", "targets"])
@pytest.mark.parametrize("value", [np.nan, np.inf, -np.inf])
def test_non_finite_values_name_batch_and_index(data, where, value):
    x, y = data
    x, y = x.copy(), np.random.default_rng(1).normal(size=(N, 3)).astype("float32")
    (x if where == "inputs" else y)[37, 1] = value
    model = mlp()
    before = weights_of(model)
    la = DiagonalLaplace(model, "regression")
    with pytest.raises(ValueError, match=rf"{where} contain NaN or Inf: batch 2, example 5 "):
        la.fit((x, y), batch_size=16)
    with pytest.raises(ValueError, match="index 37 in the data"):
        la.fit((x, y), batch_size=16)
    assert all(np.array_equal(a, b) for a, b in zip(before, weights_of(model), strict=True))
    assert la._fit is None


def test_non_finite_values_in_a_dict_input_and_a_dataset(data):
    x, y = data
    inputs = {"a": keras.Input((2,), name="a"), "b": keras.Input((2,), name="b")}
    joined = L.Concatenate()([inputs["a"], inputs["b"]])
    model = keras.Model(inputs, L.Dense(3)(joined))
    xb = x[:, 2:].copy()
    xb[3, 0] = np.nan
    dataset = tf.data.Dataset.from_tensor_slices(({"a": x[:, :2], "b": xb}, y)).batch(8)
    with pytest.raises(ValueError, match="batch 0, example 3"):
        diagonal(model, dataset, likelihood="classification")


@pytest.mark.parametrize(
    ("labels", "bad"),
    [(3, "3"), (-1, "-1"), (7, "7"), (1.5, "1.5")],
)
def test_classification_labels_outside_range_or_not_integers(data, labels, bad):
    x, y = data
    y = y.astype("float32")
    y[21] = labels
    la = DiagonalLaplace(mlp(), "classification")
    with pytest.raises(ValueError, match=r"integer labels in \[0, 3\)") as info:
        la.fit((x, y), batch_size=16)
    assert "batch 1, example 5 (index 21 in the data)" in str(info.value)
    assert bad in str(info.value)


def test_binary_labels_must_be_zero_or_one(data):
    x, _ = data
    y = np.zeros(N)
    y[4] = 2
    with pytest.raises(ValueError, match="0 or 1.*index 4"):
        DiagonalLaplace(mlp(outputs=1), "binary").fit((x, y))


@pytest.mark.parametrize(
    ("likelihood", "outputs", "y_shape"),
    [
        ("regression", 2, (N, 3)),
        ("regression", 2, (N,)),
        ("regression", 1, (N, 2)),
        ("classification", 3, (N, 2)),
        ("binary", 1, (N, 2)),
    ],
)
def test_target_shape_must_match_outputs(data, likelihood, outputs, y_shape):
    x, _ = data
    y = np.zeros(y_shape, dtype="float32")
    with pytest.raises(ValueError, match=r"targets of batch 0 have shape .* expected"):
        DiagonalLaplace(mlp(outputs=outputs), likelihood).fit((x, y))


def test_regression_targets_of_one_output_may_be_flat(data):
    x, _ = data
    y = np.linspace(-1, 1, N).astype("float32")
    flat = DiagonalLaplace(mlp(outputs=1), "regression").fit((x, y))
    column = DiagonalLaplace(mlp(outputs=1), "regression").fit((x, y[:, None]))
    for a, b in zip(flat.posterior_precision, column.posterior_precision, strict=True):
        np.testing.assert_array_equal(a, b)


def test_inputs_disagreeing_on_example_count(data):
    x, y = data
    inputs = [keras.Input((2,)), keras.Input((2,))]
    model = keras.Model(inputs, L.Dense(3)(L.Concatenate()(inputs)))
    batches = [((x[:8, :2], x[:7, 2:]), y[:8])]
    with pytest.raises(ValueError, match="disagree on the number of examples"):
        diagonal(model, batches, likelihood="classification")


def test_empty_dataset(data):
    x, y = data
    with pytest.raises(ValueError, match="empty"):
        DiagonalLaplace(mlp(), "classification").fit((x[:0], y[:0]))
    with pytest.raises(ValueError, match="empty"):
        DiagonalLaplace(mlp(), "classification").fit([])


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"likelihood": "poisson"}, "valid names are classification, binary, regression"),
        ({"curvature": "kfac"}, "valid kinds are ggn, ggn_mc, ef, hessian"),
        ({"subset": "first_layer"}, "valid: all, last_layer"),
        ({"subset": ["hidden", "nope"]}, r"lacks: \['nope'\].*\['hidden', 'head'\]"),
        ({"prior_precision": 0.0}, "positive"),
        ({"prior_precision": -1.0}, "positive"),
        ({"prior_precision": float("nan")}, "positive and finite"),
        ({"sigma_noise": 0.0}, "sigma_noise must be a positive"),
        ({"temperature": -1.0}, "temperature must be a positive"),
    ],
)
def test_configuration_errors_list_what_is_valid(kwargs, message):
    kwargs = {"likelihood": "classification", **kwargs}
    with pytest.raises(ValueError, match=message):
        DiagonalLaplace(mlp(), **kwargs)


def test_usage_errors(data):
    x, y = data
    la = DiagonalLaplace(mlp(), "classification")
    for use in (lambda: la.sample(2), lambda: la.predict(x), lambda: la.posterior_precision):
        with pytest.raises(RuntimeError, match="not fitted yet: call fit"):
            use()
    la.fit((x, y))
    with pytest.raises(ValueError, match="n must be a positive integer"):
        la.sample(0)
    with pytest.raises(ValueError, match="valid values are probit, bridge, mc"):
        la.predict(x, link_approx="sigmoid")
    with pytest.raises(ValueError, match="valid values are glm, nn"):
        la.predict(x, pred_type="exact")


@pytest.mark.parametrize("pred_type", ["glm", "nn"])
def test_predict_refuses_non_finite_inputs(data, pred_type):
    x, y = data
    la = DiagonalLaplace(mlp(), "classification").fit((x, y))
    bad = x.copy()
    bad[6, 2] = np.nan
    with pytest.raises(ValueError, match="inputs contain NaN or Inf: example 6"):
        la.predict(bad, pred_type=pred_type, n_samples=2)
    with pytest.raises(ValueError, match="example 6"):
        la.predictive_samples(bad, 2, pred_type=pred_type)


def _softmax_models():
    inputs = keras.Input((4,))
    hidden = L.Dense(5, activation="tanh")(inputs)
    yield "dense", keras.Model(inputs, L.Dense(3, activation="softmax")(hidden))
    yield "layer", keras.Model(inputs, L.Softmax()(L.Dense(3)(hidden)))
    yield "activation", keras.Sequential([keras.Input((4,)), L.Dense(3), L.Activation("softmax")])
    nested = keras.Sequential([keras.Input((5,)), L.Dense(3, activation="softmax")])
    yield "nested", keras.Model(inputs, nested(hidden))

    class Subclassed(keras.Model):
        def __init__(self):
            super().__init__()
            self.dense = L.Dense(3)

        def call(self, x):
            return tf.nn.softmax(self.dense(x))

    model = Subclassed()
    model(np.zeros((1, 4), "float32"))
    yield "subclassed", model


@pytest.mark.parametrize(("name", "model"), list(_softmax_models()))
def test_softmax_outputs_are_refused_with_a_message_about_logits(data, name, model):
    x, y = data
    with pytest.raises(ValueError, match="expects logits"):
        DiagonalLaplace(model, "classification").fit((x, y))
    with pytest.raises(ValueError, match="expects logits"):
        diagonal(model, (x, y), likelihood="classification")


def test_sigmoid_output_is_refused_for_binary(data):
    x, _ = data
    with pytest.raises(ValueError, match="applies sigmoid"):
        DiagonalLaplace(mlp(outputs=1, activation="sigmoid"), "binary")


def test_positive_logits_that_do_not_sum_to_one_are_accepted(data):
    x, y = data
    model = mlp(activation="relu")  # non-negative, but not probabilities
    DiagonalLaplace(model, "classification").fit((x, y))


def test_negative_hessian_entries_are_clipped_with_a_warning(data):
    x, y = data
    model = mlp(seed=3)
    raw = diagonal(model, (x, y), likelihood="classification", kind="hessian")
    assert any(np.any(h.numpy() < 0) for h in raw), "the oracle case must have negative entries"
    la = DiagonalLaplace(model, "classification", curvature="hessian", prior_precision=0.5)
    with pytest.warns(UserWarning, match=r"negative entries .* set to 0"):
        la.fit((x, y))
    for h, p in zip(raw, la.posterior_precision, strict=True):
        np.testing.assert_allclose(p, np.maximum(h.numpy(), 0) + 0.5, rtol=1e-6)
        assert np.all(p.numpy() >= 0.5)
    assert all(np.all(np.isfinite(s)) for s in la.posterior_stddev)


def test_monte_carlo_fit_is_reproducible_with_a_seed(data):
    x, y = data
    model = mlp()
    fits = [
        DiagonalLaplace(model, "classification", curvature="ggn_mc").fit((x, y), seed=seed)
        for seed in (5, 5, 6)
    ]
    same, again, other = ([p.numpy() for p in la.posterior_precision] for la in fits)
    for a, b in zip(same, again, strict=True):
        np.testing.assert_array_equal(a, b)
    assert any(not np.array_equal(a, c) for a, c in zip(same, other, strict=True))


def test_documented_recipe_turns_a_softmax_model_into_a_logits_model(data):
    x, y = data
    model = mlp(activation="softmax")
    logits_model = keras.models.clone_model(model)
    logits_model.set_weights(model.get_weights())
    logits_model.layers[-1].activation = keras.activations.linear
    np.testing.assert_allclose(tf.nn.softmax(logits_model(x)), model(x), rtol=1e-5, atol=1e-7)
    DiagonalLaplace(logits_model, "classification").fit((x, y))


def test_predict_names_the_index_of_a_non_finite_input_in_a_later_batch(data):
    x, y = data
    la = DiagonalLaplace(mlp(), "classification").fit((x, y))
    bad = x.copy()
    bad[33, 0] = np.inf
    with pytest.raises(ValueError, match="inputs contain NaN or Inf: example 33"):
        la.predict(bad, batch_size=16)


def test_unbatched_dataset_is_refused_with_a_message_about_batching(data):
    x, y = data
    model = mlp()
    before = weights_of(model)
    unbatched = tf.data.Dataset.from_tensor_slices((x, y))
    with pytest.raises(ValueError, match=r"not to be batched.*\.batch\(n\)"):
        DiagonalLaplace(model, "classification").fit(unbatched)
    la = DiagonalLaplace(model, "classification").fit((x, y))
    with pytest.raises(ValueError, match=r"not to be batched.*\.batch\(n\)"):
        la.predict(tf.data.Dataset.from_tensor_slices(x))
    with pytest.raises(ValueError, match=r"not to be batched"):
        diagonal(model, unbatched, likelihood="classification")
    assert all(np.array_equal(a, b) for a, b in zip(before, weights_of(model), strict=True))


@pytest.mark.parametrize("kind", ["ggn", "ggn_mc", "ef"])
@pytest.mark.parametrize("likelihood", ["classification", "binary"])
def test_flat_and_column_labels_work_in_either_order_on_one_model(data, kind, likelihood):
    x, y = data
    model = mlp(3 if likelihood == "classification" else 1)
    labels = y if likelihood == "classification" else y % 2
    flat = DiagonalLaplace(model, likelihood, curvature=kind).fit((x, labels), seed=0)
    column = DiagonalLaplace(model, likelihood, curvature=kind).fit((x, labels[:, None]), seed=0)
    again = DiagonalLaplace(model, likelihood, curvature=kind).fit((x, labels), seed=0)
    for la in (column, again):
        for h, reference in zip(la.curvature_diagonal(), flat.curvature_diagonal(), strict=True):
            np.testing.assert_allclose(h, reference, rtol=1e-6)
        assert float(la.log_likelihood()) == pytest.approx(float(flat.log_likelihood()))
