"""Validation of the structured curvature engine (``laplace_tf.curvature.structured``).

Every oracle here is dense and independent of the code under test: per-example output
Jacobians ``J_n`` from ``tf.GradientTape.jacobian`` (no ``pfor``), output Hessians
``Lambda_n`` written out by hand (softmax ``diag(p) - p p^T``, sigmoid ``p (1 - p)``,
Gaussian ``I / sigma^2``) rather than taken from the library's factors, negative
log-likelihoods written out by hand, full Hessians from nested tapes. Everything runs
in float64, so the structured results must agree to ``RTOL`` relative to the largest
entry of the reference.
"""

from __future__ import annotations

import weakref

import keras
import numpy as np
import pytest
import tensorflow as tf
from keras import ops
from oracles import assert_close, dense_jacobian, flat

from laplace_tf._data import batched
from laplace_tf.curvature import (
    KINDS,
    diagonal,
    is_piecewise_linear,
    layers,
    output_covariance,
    registry,
    structured,
    tracing,
)

L = keras.layers
N = 7
SIGMA = 0.75
LIKELIHOODS = ("classification", "binary", "regression")
WIDTHS = {"classification": 3, "binary": 1, "regression": 2}


pytestmark = pytest.mark.usefixtures("float64")  # conftest.py: float64 layers


# ---------------------------------------------------------------------------------------
# Models: factories taking the output width, returning the model and an input sampler
# ---------------------------------------------------------------------------------------

FACTORIES = {}


def factory(fn):
    FACTORIES[fn.__name__] = fn
    return fn


def _normal(*shape):
    return lambda rng, n: rng.normal(size=(n, *shape))


class Subclassed(keras.Model):
    def __init__(self, width):
        super().__init__()
        self.hidden = L.Dense(5, activation="tanh")
        self.head = L.Dense(width)

    def call(self, x):
        return self.head(self.hidden(x))


class Scale(L.Layer):
    """A custom layer with its own weight: no rule, so it goes through the fallback."""

    def build(self, input_shape):
        self.w = self.add_weight(shape=(input_shape[-1],), initializer="ones", name="w")

    def call(self, x):
        return ops.tanh(x * self.w) + x


@factory
def tanh_mlp(width):
    model = keras.Sequential(
        [
            keras.Input((4,)),
            L.Dense(5, activation="tanh"),
            L.Dense(4, activation="tanh"),
            L.Dense(width),
        ]
    )
    return model, _normal(4)


@factory
def relu_mlp(width):
    model = keras.Sequential(
        [
            keras.Input((4,)),
            L.Dense(5, activation="relu"),
            L.Dense(4, activation="relu"),
            L.Dense(width),
        ]
    )
    return model, _normal(4)


@factory
def cnn(width):
    inp = keras.Input((6, 6, 2))
    h = L.Conv2D(3, 3, strides=2, padding="same", activation="tanh")(inp)
    h = L.Conv2D(4, (2, 3), padding="same", activation="relu")(h)
    model = keras.Model(inp, L.Dense(width)(L.Flatten()(h)))
    return model, _normal(6, 6, 2)


@factory
def relu_cnn(width):
    """Piecewise linear: ReLU convolution, max pooling, batch norm (inference), dense."""
    inp = keras.Input((5, 5, 2))
    h = L.Conv2D(3, 2, padding="same", activation="relu")(inp)
    h = L.BatchNormalization()(L.MaxPooling2D(2)(h))
    model = keras.Model(inp, L.Dense(width)(L.Flatten()(h)))
    return model, _normal(5, 5, 2)


def _token_ids(rng, n):
    ids = rng.integers(0, 11, size=(n, 5))
    ids[:, 0] = rng.integers(1, 11, size=n)  # no fully masked example
    ids[0] = [3, 3, 0, 7, 3]  # one embedding row hit several times by one example
    ids[1, 3:] = 0  # trailing padding
    return ids.astype("int32")


@factory
def embedding(width):
    tokens = keras.Input((5,), dtype="int32")
    h = L.Dense(6, activation="tanh")(L.Embedding(11, 4, mask_zero=True)(tokens))
    model = keras.Model(tokens, L.Dense(width)(L.GlobalAveragePooling1D()(h)))
    return model, _token_ids


@factory
def multi_input(width):
    a, b = keras.Input((4,), name="a"), keras.Input((3,), name="b")
    h = L.Concatenate()([L.Dense(4, activation="tanh")(a), L.Dense(3, activation="relu")(b)])
    model = keras.Model({"a": a, "b": b}, L.Dense(width)(h))
    return model, lambda rng, n: {"a": rng.normal(size=(n, 4)), "b": rng.normal(size=(n, 3))}


@factory
def subclassed(width):
    return Subclassed(width), _normal(4)


@factory
def sequence(width):
    """Conv1D (causal, dilated), EinsumDense, BatchNorm, Dropout, LayerNorm, Dense."""
    inp = keras.Input((6, 3))
    h = L.Conv1D(4, 3, padding="causal", dilation_rate=2, activation="tanh")(inp)
    h = L.EinsumDense("abc,cd->abd", output_shape=(6, 5), bias_axes="d", activation="tanh")(h)
    h = L.LayerNormalization()(L.Dropout(0.5)(L.BatchNormalization()(h)))
    model = keras.Model(inp, L.Dense(width)(L.Flatten()(h)))
    return model, _normal(6, 3)


@factory
def custom(width):
    inp = keras.Input((4,))
    model = keras.Model(inp, L.Dense(width)(Scale()(L.Dense(4)(inp))))
    return model, _normal(4)


@factory
def shared(width):
    """A layer called twice: the per-layer trace cannot express it (whole-model fallback)."""
    inp = keras.Input((4,))
    layer = L.Dense(4, activation="tanh")
    model = keras.Model(inp, L.Dense(width)(layer(layer(inp))))
    return model, _normal(4)


@factory
def nested(width):
    inner = keras.Sequential([keras.Input((4,)), L.Dense(5, activation="tanh")])
    inp = keras.Input((4,))
    model = keras.Model(inp, L.Dense(width)(inner(inp)))
    return model, _normal(4)


ORACLE_MODELS = (
    "tanh_mlp", "relu_mlp", "cnn", "embedding", "multi_input", "subclassed", "sequence",
    "custom", "shared", "nested",
)  # fmt: skip


def _randomize(model, rng):
    """Random weights everywhere (biases, gammas, betas and BatchNorm moving statistics)."""
    for v in model.weights:
        if v.name == "moving_variance":
            v.assign(rng.uniform(0.5, 2.0, size=v.shape))
        else:
            v.assign(rng.normal(0.0, 0.6, size=v.shape))


def _labels(likelihood, rng, n):
    if likelihood == "classification":
        return rng.integers(0, 3, size=n).astype("int32")
    if likelihood == "binary":
        return rng.integers(0, 2, size=n).astype("float64")
    return rng.normal(size=(n, 2))


def build(name, likelihood="classification", *, seed=0, n=N):
    """``(model, x, y)`` with deterministic random weights, inputs and labels."""
    model, sample = FACTORIES[name](WIDTHS[likelihood])
    rng = np.random.default_rng(seed)
    x = sample(rng, n)
    model(_tensors(x))  # builds subclassed models
    _randomize(model, rng)
    return model, x, _labels(likelihood, rng, n)


def _tensors(x):
    return tf.nest.map_structure(tf.constant, x)


def _rows(x, start, stop):
    return tf.nest.map_structure(lambda a: tf.constant(a[start:stop]), x)


# ---------------------------------------------------------------------------------------
# Dense oracles
# ---------------------------------------------------------------------------------------


def assert_shaped_like(result, variables):
    assert [tuple(r.shape) for r in result] == [tuple(v.shape) for v in variables]


def _softmax(f):
    e = np.exp(f - f.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


def _sigmoid(f):
    return 1.0 / (1.0 + np.exp(-f))


def output_hessian(likelihood, f):
    """``Lambda_n`` of shape ``[N, C, C]``, by hand."""
    n, c = f.shape
    if likelihood == "classification":
        p = _softmax(f)
        return np.einsum("nc,cd->ncd", p, np.eye(c)) - p[:, :, None] * p[:, None, :]
    if likelihood == "binary":
        p = _sigmoid(f)
        return (p * (1 - p))[:, :, None]
    return np.broadcast_to(np.eye(c) / SIGMA**2, (n, c, c))


def dense_ggn_diagonal(model, x, likelihood):
    f, jac = dense_jacobian(model, x)
    return np.einsum("ncp,ncd,ndp->p", jac, output_hessian(likelihood, f), jac)


def manual_nll(likelihood, f, y):
    """Summed negative log-likelihood (up to constants), by hand."""
    if likelihood == "classification":
        labels = tf.cast(y, tf.int32)
        return tf.reduce_sum(tf.reduce_logsumexp(f, -1) - tf.gather(f, labels, batch_dims=1))
    if likelihood == "binary":
        z, t = f[:, 0], tf.cast(y, f.dtype)
        return tf.reduce_sum(tf.nn.softplus(z) - t * z)
    return tf.reduce_sum(tf.square(tf.cast(y, f.dtype) - f)) / (2 * SIGMA**2)


def dense_hessian(model, x, y, likelihood):
    """Full Hessian ``[P, P]`` of the summed NLL in the concatenated params (nested tapes)."""
    variables = model.trainable_variables
    with tf.GradientTape(persistent=True) as outer:
        with tf.GradientTape() as inner:
            loss = manual_nll(likelihood, model(_tensors(x), training=False), y)
        grads = inner.gradient(loss, variables, unconnected_gradients="zero")
        gradient = tf.concat([tf.reshape(g, [-1]) for g in grads], 0)
    blocks = outer.jacobian(
        gradient, variables, experimental_use_pfor=False, unconnected_gradients="zero"
    )
    size = gradient.shape[0]
    return np.concatenate([np.reshape(b.numpy(), (size, -1)) for b in blocks], axis=1)


def naive_empirical_fisher(model, x, y, likelihood, weights=None):
    """``sum_n v_n g_n^2`` (``v``: sample weights, default 1: a weight of 2 counts an
    example twice)."""
    variables = model.trainable_variables
    total = np.zeros(sum(v.shape.num_elements() for v in variables))
    for n in range(len(y)):
        with tf.GradientTape() as tape:
            loss = manual_nll(likelihood, model(_rows(x, n, n + 1), training=False), y[n : n + 1])
        weight = 1.0 if weights is None else weights[n]
        total += weight * flat(tape.gradient(loss, variables, unconnected_gradients="zero")) ** 2
    return total


def _site_summary(model, x, variables=None):
    variables = list(model.trainable_variables if variables is None else variables)
    _, sites = tracing.trace(model, _tensors(x), variables)
    return sorted((type(s.layer).__name__, s.rule is not None) for s in sites)


# ---------------------------------------------------------------------------------------
# 1. Exact GGN against the dense GGN
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("likelihood", LIKELIHOODS)
@pytest.mark.parametrize("name", ORACLE_MODELS)
def test_exact_ggn_matches_dense_ggn(name, likelihood):
    model, x, y = build(name, likelihood)
    got = diagonal(model, (x, y), likelihood=likelihood, sigma_noise=SIGMA, batch_size=4)
    assert_shaped_like(got, model.trainable_variables)
    assert all(g.dtype == tf.float64 for g in got)
    assert_close(flat(got), dense_ggn_diagonal(model, x, likelihood))


EXPECTED_SITES = {
    "tanh_mlp": [("Dense", True)] * 3,
    "cnn": [("Conv2D", True), ("Conv2D", True), ("Dense", True)],
    "embedding": [("Dense", True), ("Dense", True), ("Embedding", True)],
    "multi_input": [("Dense", True)] * 3,
    "subclassed": [("Subclassed", False)],
    "sequence": [
        ("BatchNormalization", True),
        ("Conv1D", True),
        ("Dense", True),
        ("EinsumDense", True),
        ("LayerNormalization", True),
    ],  # fmt: skip
    "custom": [("Dense", True), ("Dense", True), ("Scale", False)],
    "shared": [("Functional", False)],
    "nested": [("Dense", True), ("Dense", True)],
}


@pytest.mark.parametrize("name", sorted(EXPECTED_SITES))
def test_models_take_the_intended_paths(name):
    """The oracle tests above exercise the rules / fallbacks they are meant to."""
    model, x, _ = build(name)
    assert _site_summary(model, x) == EXPECTED_SITES[name]


# ---------------------------------------------------------------------------------------
# 2. Layer rules against the generic per-example fallback
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["sequence", "cnn", "embedding", "multi_input", "nested"])
def test_rules_match_fallback(name, monkeypatch):
    model, x, y = build(name)
    weights = [
        np.random.default_rng(1).uniform(0.1, 2.0, v.shape) for v in model.trainable_variables
    ]
    fast = flat(diagonal(model, (x, y), likelihood="classification", batch_size=4))
    fast_cov = output_covariance(model, x, weights, batch_size=4).numpy()
    rule_sites = _site_summary(model, x)
    assert all(has_rule for _, has_rule in rule_sites)

    # Compiled steps are cached per model: drop the cache so the patched rules are seen.
    monkeypatch.setattr(registry._REGISTRY, "builtin", {})
    monkeypatch.setattr(structured, "_STEPS", weakref.WeakKeyDictionary())
    fallback_sites = _site_summary(model, x)
    assert fallback_sites == [(layer, False) for layer, _ in rule_sites]  # per-layer fallback
    slow = flat(diagonal(model, (x, y), likelihood="classification", batch_size=4))
    slow_cov = output_covariance(model, x, weights, batch_size=4).numpy()
    assert_close(slow, fast)
    assert_close(slow_cov, fast_cov)


# ---------------------------------------------------------------------------------------
# 3. Hessian
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("relu_mlp", True), ("relu_cnn", True), ("tanh_mlp", False), ("cnn", False),
        ("subclassed", False), ("custom", False), ("shared", False),
    ],
)  # fmt: skip
def test_is_piecewise_linear(name, expected):
    model, _, _ = build(name)
    assert is_piecewise_linear(model) is expected


@pytest.mark.parametrize("likelihood", LIKELIHOODS)
@pytest.mark.parametrize("name", ["relu_mlp", "relu_cnn"])
def test_hessian_of_piecewise_linear_model_matches_dense_hessian(name, likelihood):
    model, x, y = build(name, likelihood)
    got = diagonal(model, (x, y), likelihood=likelihood, kind="hessian", sigma_noise=SIGMA)
    assert_shaped_like(got, model.trainable_variables)
    assert_close(flat(got), np.diag(dense_hessian(model, x, y, likelihood)))


@pytest.mark.parametrize("likelihood", ["classification", "regression"])
def test_hessian_of_tanh_model_matches_dense_hessian_and_differs_from_ggn(likelihood):
    model, x, y = build("tanh_mlp", likelihood)
    got = flat(
        diagonal(
            model, (x, y), likelihood=likelihood, kind="hessian", sigma_noise=SIGMA, batch_size=4
        )
    )
    expected = np.diag(dense_hessian(model, x, y, likelihood))
    assert_close(got, expected)
    ggn = dense_ggn_diagonal(model, x, likelihood)
    assert np.abs(got - ggn).max() > 1e-3 * np.abs(ggn).max()


# ---------------------------------------------------------------------------------------
# 4. Monte Carlo GGN
# ---------------------------------------------------------------------------------------

MC_SAMPLES = 500
MC_SEEDS = (11, 12, 13, 14)  # 4 x 500 = 2000 independent draws per example


def mc_draw_moments(likelihood, f, jac):
    """Exact mean and variance of ``sum_n g_n^2`` for one pseudo-label draw per example.

    ``g_n = J_n^T d l(f_n, y~) / d f_n`` with ``y~ ~ p(y | f_n)``: the expectation is
    enumerated over the labels (classification, binary); for the Gaussian,
    ``g_np ~ N(0, ||J_n[:, p]||^2 / sigma^2)`` so its square has variance ``2 m^2``.
    """
    mean = np.zeros(jac.shape[-1])
    variance = np.zeros(jac.shape[-1])
    for f_n, j_n in zip(f, jac, strict=True):
        if likelihood == "regression":
            m = np.sum(j_n**2, axis=0) / SIGMA**2
            mean, variance = mean + m, variance + 2 * m**2
            continue
        if likelihood == "classification":
            p = _softmax(f_n)
            probabilities, residuals = p, p[None, :] - np.eye(len(p))
        else:
            q = _sigmoid(f_n[0])
            probabilities, residuals = np.array([q, 1 - q]), np.array([[q - 1], [q]])
        squares = (residuals @ j_n) ** 2  # [outcomes, P]
        m = probabilities @ squares
        mean, variance = mean + m, variance + probabilities @ squares**2 - m**2
    return mean, variance


@pytest.fixture(scope="module")
def mc_runs(float64):
    """Per likelihood: the tiny model, its data and ``ggn_mc`` estimates per seed (memoised)."""
    cache = {}

    def run(likelihood):
        if likelihood not in cache:
            inp = keras.Input((3,))
            model = keras.Model(
                inp, L.Dense(WIDTHS[likelihood])(L.Dense(3, activation="tanh")(inp))
            )
            rng = np.random.default_rng(5)
            x = rng.normal(size=(6, 3))
            _randomize(model, rng)
            y = _labels(likelihood, rng, 6)

            def estimate(seed):
                result = diagonal(
                    model, (x, y), likelihood=likelihood, kind="ggn_mc", sigma_noise=SIGMA,
                    mc_samples=MC_SAMPLES, seed=seed,
                )  # fmt: skip
                assert_shaped_like(result, model.trainable_variables)
                return flat(result)

            cache[likelihood] = (model, x, estimate, [estimate(s) for s in MC_SEEDS])
        return cache[likelihood]

    return run


@pytest.mark.parametrize("likelihood", LIKELIHOODS)
def test_ggn_mc_is_unbiased(likelihood, mc_runs):
    model, x, _, estimates = mc_runs(likelihood)
    f, jac = dense_jacobian(model, x)
    exact = np.einsum("ncp,ncd,ndp->p", jac, output_hessian(likelihood, f), jac)
    mean, variance = mc_draw_moments(likelihood, f, jac)
    assert_close(mean, exact)  # the moments are those of an unbiased estimator

    draws = MC_SAMPLES * len(MC_SEEDS)
    average = np.mean(estimates, axis=0)
    standard_error = np.sqrt(variance / draws)
    # The average of 2000 i.i.d. draws is close to normal; with a handful of entries the
    # chance that any one is off by more than 5 standard errors is about 1e-5.
    assert np.all(np.abs(average - exact) <= 5 * standard_error + 1e-12 * exact.max())
    # ...and the test has teeth: 5 standard errors are a small fraction of the values, so a
    # mis-scaled estimator (e.g. by 1 / mc_samples instead of 1 / sqrt) would fail.
    assert np.max(5 * standard_error / exact) < 0.35
    assert np.median(5 * standard_error / exact) < 0.15


@pytest.mark.parametrize("likelihood", LIKELIHOODS)
def test_ggn_mc_seeding(likelihood, mc_runs):
    _, _, estimate, estimates = mc_runs(likelihood)
    assert np.array_equal(estimate(MC_SEEDS[0]), estimates[0])
    for first, second in zip(estimates[:-1], estimates[1:], strict=True):
        assert np.abs(first - second).max() > 1e-6 * np.abs(first).max()


# ---------------------------------------------------------------------------------------
# 5. Empirical Fisher
# ---------------------------------------------------------------------------------------

EF_CASES = [("tanh_mlp", lik) for lik in LIKELIHOODS] + [
    (name, "classification")
    for name in ("cnn", "embedding", "multi_input", "subclassed", "sequence", "custom")
]


@pytest.mark.parametrize(("name", "likelihood"), EF_CASES)
def test_empirical_fisher_matches_squared_per_example_gradients(name, likelihood):
    model, x, y = build(name, likelihood)
    got = diagonal(model, (x, y), likelihood=likelihood, kind="ef", sigma_noise=SIGMA, batch_size=3)
    assert_shaped_like(got, model.trainable_variables)
    assert_close(flat(got), naive_empirical_fisher(model, x, y, likelihood))


# ---------------------------------------------------------------------------------------
# 6. Batching
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["ggn", "ef"])
def test_batch_size_and_dataset_do_not_change_the_result(kind):
    model, x, y = build("multi_input", n=8)
    kwargs = {"likelihood": "classification", "kind": kind}
    reference = flat(diagonal(model, (x, y), batch_size=8, **kwargs))
    for batch_size in (1, 3):
        assert_close(flat(diagonal(model, (x, y), batch_size=batch_size, **kwargs)), reference)
    dataset = tf.data.Dataset.from_tensor_slices((x, y)).batch(3)
    assert_close(flat(diagonal(model, dataset, **kwargs)), reference)
    # the reference itself is right (not merely self-consistent)
    expected = (
        dense_ggn_diagonal(model, x, "classification")
        if kind == "ggn"
        else naive_empirical_fisher(model, x, y, "classification")
    )
    assert_close(reference, expected)


@pytest.mark.parametrize("kind", ["ggn", "ggn_mc", "ef"])
def test_compiled_pass_equals_the_python_loop(kind):
    """A dataset (or arrays) is read in one compiled call; ``progress`` (a Python call per
    batch) and a plain iterable of batches take the Python loop. Same batches, same seeds
    per batch: the same result, NLL and counts, for weighted batches and a short last one."""
    model, x, y = build("tanh_mlp", n=11)
    weights = np.random.default_rng(3).uniform(0.5, 2.0, size=11)
    dataset = tf.data.Dataset.from_tensor_slices((x, y, weights)).batch(4)
    kwargs = {"likelihood": "classification", "kind": kind, "seed": 7}
    compiled = structured.fit_diagonal(model, dataset, **kwargs)
    seen = []
    looped = structured.fit_diagonal(model, dataset, progress=seen.append, **kwargs)
    listed = structured.fit_diagonal(model, list(dataset), **kwargs)
    assert seen and seen[-1] == round(float(weights.sum()))
    for other in (looped, listed):
        assert_close(flat(compiled.diagonal), flat(other.diagonal))
        np.testing.assert_allclose(compiled.nll, other.nll, rtol=1e-12)
        assert (compiled.n_data, compiled.n_rows, compiled.n_outputs) == (
            other.n_data,
            other.n_rows,
            other.n_outputs,
        )
    np.testing.assert_allclose(compiled.n_data, weights.sum(), rtol=1e-12)
    if kind == "ef":  # and the sums are right, not only equal
        expected = naive_empirical_fisher(model, x, y, "classification", weights=weights)
        assert_close(flat(compiled.diagonal), expected)


@pytest.mark.parametrize(("batches", "compiled"), [(3, False), (8, True)])
def test_short_datasets_take_the_python_loop(monkeypatch, batches, compiled):
    """By default a dataset of fewer than ``COMPILED_PASS_BATCHES`` batches takes the
    Python loop (faster to trace), a longer one the compiled pass; same result."""
    from laplace_tf.curvature import basics

    monkeypatch.setattr(basics, "COMPILED_PASS_BATCHES", 8)
    calls = []
    through = basics._compiled
    monkeypatch.setattr(basics, "_compiled", lambda *a: calls.append(1) or through(*a))
    model, x, y = build("tanh_mlp", n=2 * batches)
    kwargs = {"likelihood": "classification", "kind": "ggn_mc", "seed": 3}
    fitted = structured.fit_diagonal(model, (x, y), batch_size=2, **kwargs)
    assert bool(calls) is compiled
    listed = structured.fit_diagonal(model, list(batched((x, y), 2)), **kwargs)
    assert_close(flat(fitted.diagonal), flat(listed.diagonal))
    assert fitted.n_data == listed.n_data == 2 * batches


def test_sums_split_into_groups_stay_exact(monkeypatch):
    """With ``SUM_CHUNK_ELEMENTS`` small the float64 sums are held in several variables
    (the flattened weights cut into equal segments, a large weight over several, small
    ones together, the NLL last): the empirical Fisher and the NLL are still the naive
    per-example ones."""
    from laplace_tf.curvature import basics

    model, x, y = build("cnn")
    variables = model.trainable_variables
    monkeypatch.setattr(basics, "SUM_CHUNK_ELEMENTS", 80)
    groups = basics.sum_groups(variables)
    sizes = [v.shape.num_elements() for v in variables] + [1]
    ranges = [r for g in groups for r in g]
    for i, size in enumerate(sizes):  # each weight's ranges tile it, in order
        bounds = [(a, b) for j, a, b in ranges if j == i]
        assert bounds[0][0] == 0 and bounds[-1][1] == size
        assert all(prev[1] == nxt[0] for prev, nxt in zip(bounds[:-1], bounds[1:], strict=True))
    assert ranges == sorted(ranges) and groups[-1][-1][0] == len(variables)
    assert all(sum(b - a for _, a, b in g) <= 80 for g in groups)
    assert any(sum(1 for j, _, _ in ranges if j == i) > 1 for i in range(len(sizes)))
    assert any(len({j for j, _, _ in g}) > 1 for g in groups)  # weights share a variable
    kwargs = {"likelihood": "classification", "kind": "ef", "batch_size": 3}
    fitted = structured.fit_diagonal(model, (x, y), **kwargs)
    assert_close(flat(fitted.diagonal), naive_empirical_fisher(model, x, y, "classification"))
    expected_nll = manual_nll("classification", model(x, training=False), y)
    np.testing.assert_allclose(fitted.nll, float(expected_nll), rtol=1e-10)
    assert [d.shape for d in fitted.diagonal] == [v.shape for v in variables]


# ---------------------------------------------------------------------------------------
# 7. GLM output covariance
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "likelihood"),
    [
        ("tanh_mlp", "classification"), ("tanh_mlp", "binary"), ("cnn", "classification"),
        ("multi_input", "regression"), ("embedding", "classification"),
        ("subclassed", "classification"), ("sequence", "classification"),
        ("custom", "classification"),
    ],
)  # fmt: skip
def test_output_covariance_matches_dense_jacobians(name, likelihood):
    model, x, _ = build(name, likelihood)
    rng = np.random.default_rng(3)
    weights = [rng.uniform(0.1, 2.0, size=v.shape) for v in model.trainable_variables]
    got = output_covariance(model, x, weights, batch_size=4).numpy()
    _, jac = dense_jacobian(model, x)
    expected = np.einsum("ncp,p,ndp->ncd", jac, flat(weights), jac)
    c = WIDTHS[likelihood]
    assert got.shape == (N, c, c)
    assert_close(got, expected)
    scale = np.abs(expected).max()
    assert np.abs(got - np.swapaxes(got, 1, 2)).max() <= 1e-13 * scale
    assert np.linalg.eigvalsh(got).min() >= -1e-12 * scale


# ---------------------------------------------------------------------------------------
# 8. Parameter subsets; the model is left untouched
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["ggn", "ef"])
@pytest.mark.parametrize("name", ["sequence", "subclassed", "shared"])
def test_params_subset(name, kind):
    model, x, y = build(name)
    variables = model.trainable_variables
    full = diagonal(model, (x, y), likelihood="classification", kind=kind, batch_size=4)
    for picks in ([len(variables) - 2], [len(variables) - 2, 1]):  # last kernel; + 1st bias
        subset = [variables[i] for i in picks]
        got = diagonal(
            model, (x, y), likelihood="classification", kind=kind, params=subset, batch_size=4
        )
        assert_shaped_like(got, subset)
        for g, i in zip(got, picks, strict=True):
            assert_close(g.numpy(), full[i].numpy())


def test_output_covariance_params_subset():
    model, x, _ = build("sequence")
    variables = model.trainable_variables
    subset = [variables[-2], variables[0]]
    rng = np.random.default_rng(4)
    weights = [rng.uniform(0.1, 2.0, size=v.shape) for v in subset]
    got = output_covariance(model, x, weights, params=subset, batch_size=4).numpy()
    _, jac = dense_jacobian(model, x, subset)
    assert_close(got, np.einsum("ncp,p,ndp->ncd", jac, flat(weights), jac))


def test_model_weights_are_untouched():
    inp = keras.Input((4,))
    h = L.BatchNormalization()(L.Dense(4, activation="tanh")(inp))
    model = keras.Model(inp, L.Dense(3)(Scale()(L.Dropout(0.3)(h))))
    rng = np.random.default_rng(6)
    x, y = rng.normal(size=(N, 4)), rng.integers(0, 3, size=N)
    model(x)
    _randomize(model, rng)
    before = [(v.path, v.numpy().tobytes()) for v in model.weights]
    results = [
        diagonal(model, (x, y), likelihood="classification", kind=kind, seed=0, batch_size=4)
        for kind in KINDS
    ]
    weights = [np.ones(v.shape) for v in model.trainable_variables]
    output_covariance(model, x, weights, batch_size=4)
    assert [(v.path, v.numpy().tobytes()) for v in model.weights] == before
    assert all(np.all(np.isfinite(flat(r))) for r in results)


# ---------------------------------------------------------------------------------------
# 9. Errors
# ---------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def small(float64):
    return build("tanh_mlp")


def test_unknown_kind_lists_valid_kinds(small):
    model, x, y = small
    with pytest.raises(ValueError, match="fisher") as error:
        diagonal(model, (x, y), likelihood="classification", kind="fisher")
    assert all(kind in str(error.value) for kind in KINDS)


def test_unknown_likelihood(small):
    model, x, y = small
    with pytest.raises(ValueError, match="poisson"):
        diagonal(model, (x, y), likelihood="poisson")


@pytest.mark.parametrize("mc_samples", [0, -2])
def test_non_positive_mc_samples(small, mc_samples):
    model, x, y = small
    with pytest.raises(ValueError, match="mc_samples"):
        diagonal(model, (x, y), likelihood="classification", kind="ggn_mc", mc_samples=mc_samples)


def test_empty_data(small):
    model, x, y = small
    empty = tf.data.Dataset.from_tensor_slices((x[:0], y[:0])).batch(4)
    with pytest.raises(ValueError, match="empty"):
        diagonal(model, empty, likelihood="classification")
    with pytest.raises(ValueError, match="empty"):
        diagonal(model, (x[:0], y[:0]), likelihood="classification")


def test_param_not_in_model(small):
    model, x, y = small
    other, _, _ = build("tanh_mlp", seed=1)
    for stranger in (other.trainable_variables[0], tf.Variable(np.zeros((4, 5)))):
        with pytest.raises(ValueError, match="params"):
            diagonal(model, (x, y), likelihood="classification", params=[stranger])
        with pytest.raises(ValueError, match="params"):
            output_covariance(model, x, [np.ones((4, 5))], params=[stranger])


def test_rank_three_output_needs_targets_per_position():
    """Outputs with positions (tests/test_task_outputs.py) take one target per position."""
    inp = keras.Input((4, 2))
    model = keras.Model(inp, L.Dense(3)(inp))  # [N, 4, 3]
    x, y = np.ones((N, 4, 2)), np.zeros(N, dtype="int32")
    with pytest.raises(ValueError, match=r"expected \[7, 4, \.\.\.\]"):
        diagonal(model, (x, y), likelihood="classification")
    covariance = output_covariance(model, x, [np.ones(v.shape) for v in model.trainable_variables])
    assert covariance.shape == (N, 4, 3, 3)


@pytest.mark.parametrize("sigma_noise", [0.0, -0.5, float("nan")])
def test_non_positive_sigma_noise(small, sigma_noise):
    model, x, _ = small
    y = np.zeros((N, 3))
    with pytest.raises(ValueError, match="sigma_noise"):
        diagonal(model, (x, y), likelihood="regression", sigma_noise=sigma_noise)


# ---------------------------------------------------------------------------------------
# Regressions: precision, list inputs, step cache, grouped convolutions
# ---------------------------------------------------------------------------------------


def test_sigma_noise_keeps_float64_precision():
    sigma = 0.7  # not representable in float32
    model, x, y = build("tanh_mlp", "regression")
    got = flat(diagonal(model, (x, y), likelihood="regression", sigma_noise=sigma))
    _, jac = dense_jacobian(model, x)
    assert_close(got, np.einsum("ncp,ncp->p", jac, jac) / sigma**2)


def _list_input_model():
    a, b = keras.Input((4,)), keras.Input((3,))
    model = keras.Model([a, b], L.Dense(3)(L.Concatenate()([L.Dense(2, activation="tanh")(a), b])))
    rng = np.random.default_rng(8)
    x = [rng.normal(size=(N, 4)), rng.normal(size=(N, 3))]
    model(x)
    _randomize(model, rng)
    return model, x, rng.integers(0, 3, size=N)


def test_diagonal_accepts_list_inputs():
    model, x, y = _list_input_model()
    got = flat(diagonal(model, (x, y), likelihood="classification", batch_size=4))
    assert_close(got, dense_ggn_diagonal(model, x, "classification"))


def test_output_covariance_accepts_list_inputs():
    model, x, _ = _list_input_model()
    weights = [np.ones(v.shape) for v in model.trainable_variables]
    got = output_covariance(model, x, weights, batch_size=4).numpy()
    _, jac = dense_jacobian(model, x)
    assert_close(got, np.einsum("ncp,ndp->ncd", jac, jac))


def test_custom_likelihood_instances_are_not_confused():
    from laplace_tf.likelihoods import Likelihood

    class ScaledGaussian(Likelihood):
        def __init__(self, precision):
            self.precision = precision

        def nll(self, f, y):
            return self.precision * tf.reduce_sum(tf.square(f - tf.cast(y, f.dtype))) / 2

        def hessian_factor(self, f):
            eye = tf.eye(tf.shape(f)[1], dtype=f.dtype) * np.sqrt(self.precision)
            return tf.broadcast_to(eye, [tf.shape(f)[0], tf.shape(f)[1], tf.shape(f)[1]])

    model, x, y = build("tanh_mlp", "regression")
    first = flat(diagonal(model, (x, y), likelihood=ScaledGaussian(1.0)))
    second = flat(diagonal(model, (x, y), likelihood=ScaledGaussian(4.0)))
    assert_close(second, 4 * first)


def test_grouped_convolution_matches_dense_oracle():
    inp = keras.Input((5, 4, 2))
    model = keras.Model(inp, L.Dense(3)(L.Flatten()(L.Conv2D(4, 2, groups=2)(inp))))
    rng = np.random.default_rng(9)
    x, y = rng.normal(size=(N, 5, 4, 2)), rng.integers(0, 3, size=N)
    model(x)
    _randomize(model, rng)
    expected = dense_ggn_diagonal(model, x, "classification")
    got = flat(diagonal(model, (x, y), likelihood="classification"))
    assert_close(got, expected)
    with tf.GradientTape(persistent=True):
        _, sites = tracing.trace(model, tf.constant(x), model.trainable_variables)
    assert [type(s.layer).__name__ for s in sites if s.rule is not None] == ["Conv2D", "Dense"]


def test_columns_processed_in_chunks_give_the_same_diagonal(monkeypatch):
    """Large cut cotangents make the fit back-propagate S's columns a few at a time."""
    rng = np.random.default_rng(11)
    x, y = rng.normal(size=(N, 6, 6, 2)), rng.integers(0, 3, size=N)

    def cnn():
        keras.utils.set_random_seed(3)
        inp = keras.Input((6, 6, 2))
        hidden = L.Conv2D(3, 3, padding="same", activation="tanh")(inp)
        model = keras.Model(inp, L.Dense(3)(L.Flatten()(hidden)))
        model(x)
        return model

    expected = dense_ggn_diagonal(cnn(), x, "classification")
    monkeypatch.setattr(structured, "COLUMN_ENTRIES_PER_EXAMPLE", 1)  # one column per chunk
    model = cnn()
    with tf.GradientTape(persistent=True):
        _, sites = tracing.trace(model, tf.constant(x), model.trainable_variables)
    assert structured._column_chunk(sites, 3) == 1
    assert_close(flat(diagonal(model, (x, y), likelihood="classification")), expected)


@pytest.mark.parametrize("unroll", [False, True])
def test_examples_and_columns_in_chunks_give_the_same_diagonal(monkeypatch, unroll):
    """A budget forced to its minimum (one example per per-example-gradient chunk, one
    column of S per backward pass) gives the unchunked fit's diagonal, and both the dense
    Jacobians' (every factor kind that forms per-example gradients is on this model, and a
    convolution over a 1 x 1 feature map, reduced as an outer product)."""
    rng = np.random.default_rng(12)
    x, y = rng.normal(size=(N, 6, 6, 2)), rng.integers(0, 3, size=N)

    def cnn():
        keras.utils.set_random_seed(4)
        inp = keras.Input((6, 6, 2))
        h = L.Conv2D(4, 3, padding="same", activation="tanh")(inp)  # Patches
        h = L.DepthwiseConv2D(3, strides=2, activation="tanh")(h)  # GroupedPatches
        h = L.Conv2DTranspose(3, 2, strides=2, activation="tanh")(h)  # TransposedPatches
        h = L.Reshape((16, 3))(h)
        h = L.EinsumDense("nti,ij->ntj", (16, 4), bias_axes="j", activation="tanh")(h)
        h = L.Dense(2, activation="tanh")(h)  # a rank-3 Dense: Patches over positions
        h = L.Reshape((1, 1, 32))(h)
        h = L.Conv2D(5, 3, padding="same", activation="tanh")(h)  # Patches at one location
        model = keras.Model(inp, L.Dense(3)(L.Flatten()(h)))
        model(x)
        return model

    expected = dense_ggn_diagonal(cnn(), x, "classification")
    unchunked = flat(diagonal(cnn(), (x, y), likelihood="classification"))
    monkeypatch.setattr(structured, "_STEPS", weakref.WeakKeyDictionary())
    monkeypatch.setattr(structured, "COLUMN_ENTRIES_PER_EXAMPLE", 1)
    monkeypatch.setattr(layers, "GRADIENT_ENTRIES", 1)
    monkeypatch.setattr(structured, "UNROLL_COLUMN_CHUNKS", unroll)
    chunked = flat(diagonal(cnn(), (x, y), likelihood="classification", batch_size=N))
    np.testing.assert_allclose(chunked, unchunked, rtol=1e-10, atol=1e-12 * abs(unchunked).max())
    assert_close(chunked, expected)


@pytest.mark.parametrize("name", ["cnn", "sequence", "embedding"])
def test_columns_mapped_in_a_loop_equal_dense_jacobians(monkeypatch, name):
    """Above ``UNROLLED_BACKWARD_OPS`` (here 0) one backward is traced and mapped over
    the columns of S: the GGN diagonal and the GLM output covariance stay exact."""
    monkeypatch.setattr(structured, "_STEPS", weakref.WeakKeyDictionary())
    monkeypatch.setattr(structured, "UNROLLED_BACKWARD_OPS", 0)
    counted = []
    traced_ops = structured._traced_ops

    def spied(outputs):
        counted.append(traced_ops(outputs))
        return counted[-1]

    monkeypatch.setattr(structured, "_traced_ops", spied)
    model, x, y = build(name)
    got = flat(diagonal(model, (x, y), likelihood="classification", batch_size=4))
    assert counted and traced_ops(tf.constant(1.0)) == 0  # asked; 0 when eager
    assert min(counted) > 0  # above the bound of 0: every chunk took the mapped columns
    assert_close(got, dense_ggn_diagonal(model, x, "classification"))
    weights = [np.full(v.shape, 0.5) for v in model.trainable_variables]
    _, jac = dense_jacobian(model, x)
    expected = np.einsum("ncp,p,ndp->ncd", jac, flat(weights), jac)
    assert_close(output_covariance(model, x, weights, batch_size=4).numpy(), expected)


@pytest.mark.parametrize("name", ["cnn", "sequence"])
def test_columns_looped_one_at_a_time_equal_dense_jacobians(monkeypatch, name):
    """Above ``LOOPED_COLUMN_OPS`` (here 0) a diagonal fit back-propagates one column of S
    at a time in a ``tf.while_loop``; the GGN diagonal stays exact."""
    monkeypatch.setattr(structured, "_STEPS", weakref.WeakKeyDictionary())
    monkeypatch.setattr(structured, "LOOPED_COLUMN_OPS", 0)
    folds = []
    fold = structured.fold_column_chunks

    def spied(reduce, columns, chunk, zeros, *, unroll=False):
        folds.append((columns.count, chunk, unroll))
        return fold(reduce, columns, chunk, zeros, unroll=unroll)

    monkeypatch.setattr(structured, "fold_column_chunks", spied)
    model, x, y = build(name)
    got = flat(diagonal(model, (x, y), likelihood="classification", batch_size=4))
    assert folds and all(chunk == 1 and not unroll for _, chunk, unroll in folds)
    assert all(count > 1 for count, _, _ in folds)  # several columns, so the loop ran
    assert_close(got, dense_ggn_diagonal(model, x, "classification"))
