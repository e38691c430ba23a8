"""Outputs of real tasks against dense float64 oracles: per-token and per-pixel outputs,
Keras masks, sample weights (per example and per position), and one selected output of a
model with several.

Every reference here is ``sum_n sum_t w_nt J_nt^T Lambda_nt J_nt`` (or its empirical-Fisher
counterpart) from per-example Jacobians taken with ``tf.GradientTape.jacobian`` without
``pfor``; nothing uses the library's rules.
"""

from __future__ import annotations

import keras
import numpy as np
import pytest
import tensorflow as tf
from oracles import assert_close, softmax_hessian

import laplace_tf
from laplace_tf.curvature import diagonal

L = keras.layers
N, T, C, VOCAB = 6, 5, 3, 7


pytestmark = pytest.mark.usefixtures("float64")  # conftest.py: float64 layers


def jacobian(model, x):
    """Outputs ``[N, *positions, C]`` and per-example Jacobians ``[N, D, P]`` (``D``: all
    outputs of one example)."""
    variables = model.trainable_variables
    with tf.GradientTape(persistent=True) as tape:
        f = model(tf.nest.map_structure(tf.constant, x), training=False)
        flat = tf.reshape(f, [f.shape[0], -1])
    blocks = tape.jacobian(flat, variables, experimental_use_pfor=False)
    n, d = flat.shape
    return f.numpy(), np.concatenate([np.reshape(b.numpy(), (n, d, -1)) for b in blocks], -1)


def flat(tensors) -> np.ndarray:
    return np.concatenate([np.ravel(np.asarray(t, np.float64)) for t in tensors])


def tagger(seed=0):
    """Embedding (``mask_zero``) + Dense layers: per-token logits ``[N, T, C]``."""
    keras.utils.set_random_seed(seed)
    tokens = keras.Input((T,), dtype="int32")
    h = L.Embedding(VOCAB, 4, mask_zero=True)(tokens)
    h = L.Dense(4, activation="tanh")(h)
    model = keras.Model(tokens, L.Dense(C)(h))
    rng = np.random.default_rng(seed)
    x = rng.integers(1, VOCAB, size=(N, T)).astype("int32")
    x[0, 3:] = 0  # padding: masked positions
    x[2, 4:] = 0
    y = rng.integers(0, C, size=(N, T)).astype("int32")
    return model, x, y


def segmenter(seed=0):
    """A small fully-convolutional regression model: per-pixel outputs ``[N, 3, 3, 2]``."""
    keras.utils.set_random_seed(seed)
    inputs = keras.Input((3, 3, 2))
    h = L.Conv2D(3, 3, padding="same", activation="tanh")(inputs)
    model = keras.Model(inputs, L.Conv2D(2, 1)(h))
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(N, 3, 3, 2))
    y = rng.normal(size=(N, 3, 3, 2))
    return model, x, y


def softmax_reference(model, x, y, weights, kind):
    """``sum_nt w_nt J_nt^T Lambda_nt J_nt`` (ggn) or ``sum_n (sum_t w_nt g_nt)^2`` (ef)."""
    f, jac = jacobian(model, x)
    rows = f.reshape(N, -1, C)
    per_position = jac.reshape(N, rows.shape[1], C, -1)
    if kind == "ggn":
        hessians = softmax_hessian(rows.reshape(-1, C)).reshape(N, -1, C, C)
        return np.einsum("nt,ntcp,ntcd,ntdq->pq", weights, per_position, hessians, per_position)
    p = np.exp(rows) / np.exp(rows).sum(-1, keepdims=True)
    grads = p - np.eye(C)[y]  # [N, T, C]
    per_example = np.einsum("nt,ntc,ntcp->np", weights, grads, per_position)
    return per_example.T @ per_example


def gaussian_reference(model, x, weights):
    _, jac = jacobian(model, x)
    rows = jac.reshape(N, -1, 2, jac.shape[-1])
    return np.einsum("nt,ntcp,ntcq->pq", weights, rows, rows)


def token_mask(x):
    return (x != 0).astype(np.float64)


@pytest.mark.parametrize("kind", ["ggn", "ef"])
def test_per_token_diagonal_with_mask(kind):
    model, x, y = tagger()
    expected = softmax_reference(model, x, y, token_mask(x), kind)
    got = diagonal(model, (x, y), likelihood="classification", kind=kind, batch_size=4)
    assert_close(flat(got), np.diag(expected))


def test_per_token_full_and_kron_bias_with_mask():
    model, x, y = tagger()
    expected = softmax_reference(model, x, y, token_mask(x), "ggn")
    la = laplace_tf.Laplace(model, "classification", structure="full").fit((x, y), batch_size=4)
    precision = np.asarray(la.posterior_precision) - np.eye(expected.shape[0])
    assert_close(precision, expected, rtol=1e-9)
    kron = laplace_tf.Laplace(model, "classification", structure="kron").fit((x, y))
    # the last bias' block is B = sum_nt w_nt Lambda_nt exactly (its gradients are the columns)
    bias = model.layers[-1].bias
    size = sum(int(np.prod(v.shape)) for v in model.trainable_variables)
    start = size - bias.shape[0]
    kron_precision = kron.posterior_precision.to_dense().numpy() - np.eye(size)
    assert_close(kron_precision[start:, start:], expected[start:, start:], rtol=1e-9)


def test_masked_positions_contribute_nothing():
    """Changing the labels at padded positions changes neither the NLL nor any curvature."""
    model, x, y = tagger()
    other = y.copy()
    other[x == 0] = (other[x == 0] + 1) % C
    for kind in ("ggn", "ef", "ggn_mc"):
        first = laplace_tf.Laplace(model, "classification", curvature=kind).fit((x, y), seed=1)
        second = laplace_tf.Laplace(model, "classification", curvature=kind).fit((x, other), seed=1)
        assert_close(flat(first.curvature_diagonal()), flat(second.curvature_diagonal()))
        assert first.record.loss == pytest.approx(second.record.loss, rel=1e-12)


@pytest.mark.parametrize("kind", ["ggn", "ef"])
def test_per_position_sample_weights(kind):
    model, x, y = tagger()
    weights = np.random.default_rng(3).uniform(0, 2, size=(N, T))
    expected = softmax_reference(model, x, y, weights * token_mask(x), kind)
    data = tf.data.Dataset.from_tensor_slices((x, y, weights)).batch(4)
    got = diagonal(model, data, likelihood="classification", kind=kind)
    assert_close(flat(got), np.diag(expected))


def test_per_pixel_regression():
    model, x, y = segmenter()
    expected = gaussian_reference(model, x, np.ones((N, 9)))
    got = diagonal(model, (x, y), likelihood="regression", batch_size=4)
    assert_close(flat(got), np.diag(expected))
    la = laplace_tf.Laplace(model, "regression", structure="full").fit((x, y), batch_size=4)
    precision = np.asarray(la.posterior_precision) - np.eye(expected.shape[0])
    assert_close(precision, expected, rtol=1e-9)
    f = model(x).numpy()
    sse = np.sum((f - y) ** 2)
    # evidence terms count every pixel's outputs: N * 9 * 2 Gaussian terms
    assert la.record.n_entries == N * 9 * 2
    assert la.log_likelihood(sigma_noise=1.0).numpy() == pytest.approx(
        -sse / 2 - N * 18 * np.log(np.sqrt(2 * np.pi)), rel=1e-10
    )


@pytest.mark.parametrize("structure", ["diag", "kron", "full"])
@pytest.mark.parametrize("kind", ["ggn", "ef", "ggn_mc"])
def test_weight_two_equals_the_example_twice(structure, kind):
    """``sample_weight`` counts examples: 2 is the example given twice, 0 leaves it out."""
    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input((4,)), L.Dense(5, activation="tanh"), L.Dense(C)])
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(N, 4)), rng.integers(0, C, size=N)
    weights = np.array([2.0, 1.0, 0.0, 1.0, 2.0, 1.0])
    repeat = np.repeat(np.arange(N), weights.astype(int))
    weighted = laplace_tf.Laplace(model, "classification", structure=structure, curvature=kind)
    weighted.fit(tf.data.Dataset.from_tensor_slices((x, y, weights)).batch(N), seed=0)
    repeated = laplace_tf.Laplace(model, "classification", structure=structure, curvature=kind)
    repeated.fit((x[repeat], y[repeat]), batch_size=len(repeat), seed=0)
    assert weighted.n_data == repeated.n_data == len(repeat)
    assert weighted.record.loss == pytest.approx(repeated.record.loss, rel=1e-12)
    if kind == "ggn_mc":  # the repeated copies draw other pseudo-labels: NLL and counts only
        return
    assert_close(
        np.asarray(weighted.log_marginal_likelihood()),
        np.asarray(repeated.log_marginal_likelihood()),
    )
    assert_close(flat(weighted.posterior_variance), flat(repeated.posterior_variance))


def test_keras_sample_weight_tuple_and_bad_weights():
    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input((4,)), L.Dense(C)])
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(N, 4)), rng.integers(0, C, size=N)
    la = laplace_tf.Laplace(model, "classification")
    la.fit((x, y, np.full(N, 0.5)))
    assert la.n_data == pytest.approx(N / 2)
    with pytest.raises(ValueError, match="non-negative.*example 2"):
        la.fit((x, y, np.array([1, 1, -1, 1, 1, 1.0])))
    with pytest.raises(ValueError, match=r"sample weights of batch 0 have shape \[6, 2\]"):
        la.fit((x, y, np.ones((N, 2))))
    with pytest.raises(ValueError, match="sample weights contain NaN"):
        la.fit((x, y, np.array([1, np.nan, 1, 1, 1, 1.0])))


def test_targets_of_positions_are_checked():
    model, x, y = tagger()
    with pytest.raises(ValueError, match=r"targets of batch 0 have shape \[6\].*\[6, 5, \.\.\.\]"):
        diagonal(model, (x, y[:, 0]), likelihood="classification")
    bad = y.copy()
    bad[1, 2] = C
    with pytest.raises(ValueError, match="example 1, position 2"):
        diagonal(model, (x, bad), likelihood="classification")


def two_heads(seed=0):
    keras.utils.set_random_seed(seed)
    inputs = keras.Input((4,))
    h = L.Dense(5, activation="tanh", name="trunk")(inputs)
    logits = L.Dense(C, name="logits")(h)
    aux = L.Dense(2, name="aux")(h)
    return keras.Model(inputs, [logits, aux]), inputs, h, logits


@pytest.mark.parametrize("structure", ["diag", "kron", "full"])
def test_selected_output_equals_the_one_head_model(structure):
    model, inputs, _, logits = two_heads()
    one_head = keras.Model(inputs, logits)  # the same layers and weights
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(N, 4)), rng.integers(0, C, size=N)
    selected = laplace_tf.Laplace(model, "classification", structure=structure, output="logits")
    reference = laplace_tf.Laplace(one_head, "classification", structure=structure)
    assert [v.path for v in selected.variables] == [v.path for v in reference.variables]
    assert "aux" not in " ".join(v.path for v in selected.variables)
    for la in (selected, reference):
        la.fit((x, y)).optimize_prior_precision()
    assert selected.prior_precision == pytest.approx(reference.prior_precision)
    assert_close(selected.predict(x), reference.predict(x))
    assert selected.network is not model and selected.model is model
    index = laplace_tf.Laplace(model, "classification", structure=structure, output=0)
    assert [v.path for v in index.variables] == [v.path for v in selected.variables]


def test_output_selection_errors():
    model, *_ = two_heads()
    with pytest.raises(ValueError, match=r"2 outputs \['logits', 'aux'\].*output="):
        laplace_tf.Laplace(model, "classification")
    with pytest.raises(ValueError, match="no output 'head'"):
        laplace_tf.Laplace(model, "classification", output="head")
    with pytest.raises(ValueError, match="out of range"):
        laplace_tf.Laplace(model, "classification", output=2)


def test_per_token_predictions():
    """GLM predictive per position: probabilities ``[N, T, C]``, each position's
    covariance ``J_t Sigma J_t^T`` from the dense Jacobian, for every structure."""
    model, x, y = tagger()
    _, jac = jacobian(model, x)
    per_position = jac.reshape(N, T, C, -1)
    for structure in ("diag", "kron", "full"):
        la = laplace_tf.Laplace(model, "classification", structure=structure).fit((x, y))
        mean, covariance = la._glm(x, 4)
        assert mean.shape == (N, T, C) and covariance.shape == (N, T, C, C)
        if structure == "diag":
            sigma = np.diag(flat(la.posterior_variance))
        elif structure == "kron":
            sigma = np.linalg.inv(la.posterior_precision.to_dense().numpy())
        else:
            sigma = np.linalg.inv(np.asarray(la.posterior_precision))
        expected = np.einsum("ntcp,pq,ntdq->ntcd", per_position, sigma, per_position)
        assert_close(covariance, expected, rtol=1e-8)
        probs = la.predict(x, batch_size=4)
        assert probs.shape == (N, T, C)
        np.testing.assert_allclose(np.sum(probs, axis=-1), 1.0, rtol=1e-10)
        rows = laplace_tf.predictive.probit(
            tf.reshape(mean, [-1, C]), tf.reshape(covariance, [-1, C, C])
        )
        assert_close(probs, np.reshape(rows, (N, T, C)))
        samples = la.predictive_samples(x, 3, pred_type="nn", seed=0)
        assert samples.shape == (3, N, T, C)
        assert la.predict(x, pred_type="nn", n_samples=2).shape == (N, T, C)


def test_per_pixel_regression_predictions():
    model, x, y = segmenter()
    la = laplace_tf.Laplace(model, "regression", structure="diag").fit((x, y))
    _, jac = jacobian(model, x)
    per_position = jac.reshape(N, 9, 2, -1)
    variance = flat(la.posterior_variance)
    expected = np.einsum("ntcp,p,ntcp->ntc", per_position, variance, per_position)
    mean, var = la.predict(x, include_noise=False)
    assert mean.shape == var.shape == (N, 3, 3, 2)
    assert_close(np.reshape(var, (N, 9, 2)), expected, rtol=1e-8)
    assert_close(mean, model(x).numpy())


@pytest.mark.parametrize("structure", ["diag", "full"])
def test_weighted_exact_hessian_equals_repeated_examples(structure):
    keras.utils.set_random_seed(1)
    model = keras.Sequential([keras.Input((3,)), L.Dense(3, activation="tanh"), L.Dense(C)])
    rng = np.random.default_rng(1)
    x, y = rng.normal(size=(N, 3)), rng.integers(0, C, size=N)
    weights = np.array([2.0, 1.0, 0.0, 1.0, 3.0, 1.0])
    repeat = np.repeat(np.arange(N), weights.astype(int))
    fits = []
    for data in ((x, y, weights), (x[repeat], y[repeat])):
        la = laplace_tf.Laplace(model, "classification", structure=structure, curvature="hessian")
        fits.append(la.fit(data))
    assert fits[0].n_data == fits[1].n_data == len(repeat)
    assert_close(flat(fits[0].posterior_variance), flat(fits[1].posterior_variance), rtol=1e-9)


def test_save_and_load_keep_output_and_weighted_counts(tmp_path):
    model, *_ = two_heads()
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(N, 4)), rng.integers(0, C, size=N)
    la = laplace_tf.Laplace(model, "classification", structure="kron", output="logits")
    la.fit((x, y, np.full(N, 0.25)))
    la.save(tmp_path / "la")
    loaded = laplace_tf.Laplace.load(tmp_path / "la", model)
    assert loaded.output == "logits" and loaded.n_data == pytest.approx(N / 4)
    assert_close(loaded.predict(x), la.predict(x))
    assert_close(
        np.asarray(loaded.log_marginal_likelihood()), np.asarray(la.log_marginal_likelihood())
    )


@pytest.mark.parametrize("structure", ["diag", "kron", "full"])
def test_accumulate_equals_one_fit_on_both_datasets(structure):
    """Online Laplace: fit(accumulate=True) on a second dataset == one fit on both."""
    keras.utils.set_random_seed(2)
    model = keras.Sequential([keras.Input((4,)), L.Dense(5, activation="tanh"), L.Dense(C)])
    rng = np.random.default_rng(2)
    x, y = rng.normal(size=(2 * N, 4)), rng.integers(0, C, size=2 * N)
    weights = rng.uniform(0.5, 2.0, size=2 * N)
    online = laplace_tf.Laplace(model, "classification", structure=structure)
    online.fit((x[:N], y[:N], weights[:N]))
    online.fit((x[N:], y[N:], weights[N:]), accumulate=True)
    once = laplace_tf.Laplace(model, "classification", structure=structure)
    once.fit((x, y, weights))
    assert online.n_data == pytest.approx(once.n_data, rel=1e-12)
    assert online.record.loss == pytest.approx(once.record.loss, rel=1e-12)
    assert_close(flat(online.posterior_variance), flat(once.posterior_variance), rtol=1e-9)
    assert_close(
        np.asarray(online.log_marginal_likelihood()),
        np.asarray(once.log_marginal_likelihood()),
        rtol=1e-9,
    )
    online.curvature = "ef"
    with pytest.raises(RuntimeError):
        online.fit((x[N:], y[N:]), accumulate=True)
    fresh = laplace_tf.Laplace(model, "classification", structure=structure)
    with pytest.raises(RuntimeError, match="needs a previous fit"):
        fresh.fit((x, y), accumulate=True)


def test_heteroscedastic_exact_hessian_is_not_its_fisher():
    """``curvature="hessian"`` with a likelihood whose S is a Fisher's root (heteroscedastic)
    takes the exact path even on a piecewise-linear network: a dense Hessian's diagonal."""
    keras.utils.set_random_seed(3)
    model = keras.Sequential([keras.Input((2,)), L.Dense(3, activation="relu"), L.Dense(2)])
    rng = np.random.default_rng(3)
    x, y = rng.normal(size=(N, 2)), rng.normal(size=(N, 1))
    variables = model.trainable_variables
    with tf.GradientTape(persistent=True) as outer:
        with tf.GradientTape() as inner:
            f = model(x)
            mean, log_var = f[:, :1], f[:, 1:]
            nll = tf.reduce_sum(0.5 * (y - mean) ** 2 * tf.exp(-log_var) + 0.5 * log_var)
        grads = tf.concat([tf.reshape(g, [-1]) for g in inner.gradient(nll, variables)], 0)
    rows = outer.jacobian(grads, variables, experimental_use_pfor=False)
    dense = np.concatenate([np.reshape(r, (grads.shape[0], -1)) for r in rows], axis=1)
    got = diagonal(model, (x, y), likelihood="heteroscedastic", kind="hessian")
    assert_close(flat(got), np.diag(dense), rtol=1e-9)
    fisher = diagonal(model, (x, y), likelihood="heteroscedastic", kind="ggn")
    assert not np.allclose(flat(fisher), np.diag(dense))


def test_output_of_a_subclassed_model_is_refused_clearly():
    class Net(keras.Model):
        def __init__(self):
            super().__init__()
            self.outputs_count = 3  # an attribute, not Keras outputs
            self.dense = L.Dense(C)

        def call(self, x):
            return self.dense(x)

    model = Net()
    model(np.zeros((1, 4)))
    assert laplace_tf.Laplace(model, "classification").network is model
    with pytest.raises(ValueError, match="subclassed"):
        laplace_tf.Laplace(model, "classification", output=0)
