"""Tests of ``DiagonalLaplace`` against closed forms and dense-Jacobian oracles.

Oracles never come from the code under test: Bayesian linear regression (posterior
precision, marginal likelihood, exact evidence, predictive) in closed form; GLM output
covariances from dense ``tf.GradientTape.jacobian`` Jacobians; the link approximations
from their textbook formulas; gradients from central finite differences; marginal-
likelihood and grid-search optima from brute-force grids.
"""

from __future__ import annotations

import math
import warnings

import keras
import numpy as np
import pytest
import tensorflow as tf
from scipy.special import log_softmax, softmax
from scipy.stats import multivariate_normal

import laplace_tf
from laplace_tf import DiagonalLaplace

SIGMA = 0.5
DELTA = 2.0


# ---------------------------------------------------------------------------------------
# Fixtures and helpers
# ---------------------------------------------------------------------------------------


pytestmark = pytest.mark.usefixtures("float64")  # conftest.py: float64 layers


def flat(tensors) -> np.ndarray:
    return np.concatenate([np.ravel(np.asarray(t, dtype=np.float64)) for t in tensors])


def snapshot(model) -> list[np.ndarray]:
    return [np.array(v.numpy(), copy=True) for v in model.weights]


def assert_same_weights(model, before, where=""):
    after = snapshot(model)
    assert len(after) == len(before)
    for a, b in zip(after, before, strict=True):
        assert a.dtype == b.dtype and a.shape == b.shape
        assert a.tobytes() == b.tobytes(), f"model weights changed by {where}"


def dense_jacobian(model, x, variables) -> tuple[np.ndarray, np.ndarray]:
    """Outputs ``[N, C]`` and the dense Jacobian ``[N, C, P]`` in ``variables`` (flattened)."""
    raw = [v.value for v in variables]
    with tf.GradientTape(persistent=True) as tape:
        out = model(x, training=False)
    jac = tape.jacobian(out, raw, experimental_use_pfor=False)
    n, c = out.shape
    parts = [np.reshape(j.numpy(), (n, c, -1)) for j in jac]
    return out.numpy(), np.concatenate(parts, axis=-1)


def ggn_diagonal(f: np.ndarray, jac: np.ndarray, likelihood: str) -> np.ndarray:
    """``sum_n diag(J_n^T Lambda_n J_n)`` with the output Hessian of the likelihood."""
    if likelihood == "classification":
        p = softmax(f, axis=-1)
        lam = np.einsum("nc,cd->ncd", p, np.eye(f.shape[1])) - p[:, :, None] * p[:, None, :]
    elif likelihood == "binary":
        p = 1 / (1 + np.exp(-f))
        lam = (p * (1 - p))[:, :, None]
    else:
        lam = np.broadcast_to(np.eye(f.shape[1]), (f.shape[0], f.shape[1], f.shape[1]))
    return np.einsum("ncp,ncd,ndp->p", jac, lam, jac)


def hand_probit(f, var):
    return softmax(f / np.sqrt(1 + math.pi / 8 * var), axis=-1)


def hand_bridge(f, cov):
    """Laplace bridge with laplace-torch's zero-mean correction, one example at a time."""
    f, var = f.copy(), np.empty_like(f)
    for n in range(len(f)):
        ones = np.ones(f.shape[1])
        sigma_one = cov[n] @ ones
        f[n] = f[n] - sigma_one * (ones @ f[n]) / (ones @ sigma_one)
        var[n] = np.diag(cov[n] - np.outer(sigma_one, sigma_one) / (ones @ sigma_one))
    c = f.shape[1]
    sum_exp = np.sum(np.exp(-f), axis=-1, keepdims=True)
    alpha = (1 - 2 / c + np.exp(f) / c**2 * sum_exp) / var
    return alpha / alpha.sum(-1, keepdims=True)


def augment(x):
    return np.hstack([x, np.ones((x.shape[0], 1))])


# -- data --------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def reg_data(float64):
    rng = np.random.default_rng(0)
    x = rng.normal(size=(40, 3))
    y = x @ np.array([1.0, -2.0, 0.5]) + 0.3 + SIGMA * rng.normal(size=40)
    x_test = rng.normal(size=(7, 3))
    return x, y[:, None], x_test


@pytest.fixture(scope="module")
def clf_data(float64):
    rng = np.random.default_rng(1)
    x = rng.normal(size=(48, 4))
    x_val = rng.normal(size=(30, 4))
    return x, x_val


def make_mlp(seed=0, outputs=3, inputs=4, hidden=6):
    keras.utils.set_random_seed(seed)
    return keras.Sequential(
        [
            keras.Input((inputs,)),
            keras.layers.Dense(hidden, activation="tanh", name="hidden"),
            keras.layers.Dense(outputs, name="head"),
        ]
    )


def teacher_labels(model, x, seed, scale=1.0):
    """Labels drawn from the model's own predictive (so the model is calibrated)."""
    rng = np.random.default_rng(seed)
    probs = softmax(scale * model(x).numpy(), axis=-1)
    return np.array([rng.choice(probs.shape[1], p=p) for p in probs])


@pytest.fixture(scope="module")
def mlp_clf(clf_data):
    """A fitted classification Laplace shared by tests that never mutate it."""
    x, _ = clf_data
    model = make_mlp(0)
    y = teacher_labels(model, x, seed=2)
    la = DiagonalLaplace(model, "classification", prior_precision=0.5).fit((x, y))
    return model, x, y, la


@pytest.fixture(scope="module")
def binary_la(clf_data):
    x, _ = clf_data
    model = make_mlp(3, outputs=1)
    y = (x[:, 0] + 0.3 * x[:, 1] > 0).astype(np.float64)
    return DiagonalLaplace(model, "binary", prior_precision=1.0).fit((x, y))


def blr_model(theta):
    model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(1)])
    model.layers[0].kernel.assign(theta[:3, None])
    model.layers[0].bias.assign(theta[3:])
    return model


def ridge_mode(x, y, delta, sigma, prior_mean):
    """The exact posterior mode of Bayesian linear regression (kernel + bias)."""
    xa = augment(x)
    a = xa.T @ xa / sigma**2 + delta * np.eye(xa.shape[1])
    return np.linalg.solve(a, xa.T @ y[:, 0] / sigma**2 + delta * prior_mean)


@pytest.fixture(scope="module")
def blr_la(reg_data):
    """BLR at the exact mode; shared by tests that never mutate it."""
    x, y, _ = reg_data
    theta = ridge_mode(x, y, DELTA, SIGMA, np.zeros(4))
    model = blr_model(theta)
    la = DiagonalLaplace(model, "regression", sigma_noise=SIGMA, prior_precision=DELTA)
    return la.fit((x, y)), theta


# ---------------------------------------------------------------------------------------
# 1. Bayesian linear regression oracle
# ---------------------------------------------------------------------------------------


def blr_lml(x, y, theta, delta, sigma, prior_mean):
    xa = augment(x)
    h = np.sum(xa**2, axis=0) / sigma**2
    sse = np.sum((y[:, 0] - xa @ theta) ** 2)
    loglik = -0.5 * sse / sigma**2 - len(y) * np.log(sigma * np.sqrt(2 * np.pi))
    penalty = (
        np.sum(np.log(h + delta))
        - len(theta) * np.log(delta)
        + delta * np.sum((theta - prior_mean) ** 2)
    )
    return loglik - 0.5 * penalty


@pytest.mark.parametrize(
    "prior_mean",
    [
        "zero",
        "scalar",
        "arrays",
    ],
)
def test_blr_posterior_precision_and_marginal_likelihood(reg_data, prior_mean):
    x, y, _ = reg_data
    if prior_mean == "zero":
        mu0, arg = np.zeros(4), 0.0
    elif prior_mean == "scalar":
        mu0, arg = np.full(4, 0.75), 0.75
    else:
        mu0 = np.array([0.5, -1.0, 0.25, 2.0])
        arg = [mu0[:3, None], mu0[3:]]
    theta = ridge_mode(x, y, DELTA, SIGMA, mu0)
    model = blr_model(theta)
    la = DiagonalLaplace(
        model, "regression", sigma_noise=SIGMA, prior_precision=DELTA, prior_mean=arg
    ).fit((x, y))

    xa = augment(x)
    h = np.sum(xa**2, axis=0) / SIGMA**2
    np.testing.assert_allclose(flat(la.posterior_precision), h + DELTA, rtol=1e-12)
    np.testing.assert_allclose(flat(la.posterior_variance), 1 / (h + DELTA), rtol=1e-12)
    np.testing.assert_allclose(flat(la.mean), theta, rtol=1e-12, atol=1e-14)
    assert la.n_data == len(x)
    expected = blr_lml(x, y, theta, DELTA, SIGMA, mu0)
    np.testing.assert_allclose(float(la.log_marginal_likelihood()), expected, rtol=1e-12)
    # explicit arguments override the stored ones without changing them
    np.testing.assert_allclose(
        float(la.log_marginal_likelihood(5.0, 0.75)),
        blr_lml(x, y, theta, 5.0, 0.75, mu0),
        rtol=1e-12,
    )
    np.testing.assert_allclose(float(la.log_marginal_likelihood()), expected, rtol=1e-12)
    assert la.prior_precision == DELTA and la.sigma_noise == SIGMA


def test_blr_diagonal_lml_relates_to_exact_evidence(blr_la, reg_data):
    """At the exact mode the *full* Laplace evidence is exact for BLR; the diagonal one
    differs from it by exactly 1/2 (sum log diag A - log det A) >= 0 (Hadamard)."""
    x, y, _ = reg_data
    la, _ = blr_la
    xa = augment(x)
    cov_y = SIGMA**2 * np.eye(len(x)) + xa @ xa.T / DELTA
    evidence = multivariate_normal(np.zeros(len(x)), cov_y).logpdf(y[:, 0])
    a = xa.T @ xa / SIGMA**2 + DELTA * np.eye(4)
    gap = 0.5 * (np.sum(np.log(np.diag(a))) - np.linalg.slogdet(a)[1])
    assert gap > 1e-3  # the test data have correlated features, so the gap is visible
    np.testing.assert_allclose(float(la.log_marginal_likelihood()), evidence - gap, rtol=1e-10)


@pytest.mark.parametrize("include_noise", [True, False])
def test_blr_glm_predictive(blr_la, reg_data, include_noise):
    _, _, x_test = reg_data
    la, theta = blr_la
    xa = augment(x_test)
    h = np.sum(augment(reg_data[0]) ** 2, axis=0) / SIGMA**2
    mean, var = la.predict(x_test, include_noise=include_noise)
    assert mean.shape == (7, 1) and var.shape == (7, 1)
    np.testing.assert_allclose(mean.numpy()[:, 0], xa @ theta, rtol=1e-12, atol=1e-12)
    expected = xa**2 @ (1 / (h + DELTA)) + (SIGMA**2 if include_noise else 0.0)
    np.testing.assert_allclose(var.numpy()[:, 0], expected, rtol=1e-12)


@pytest.mark.parametrize(
    "which",
    [
        "scalar_prior",
        "layerwise_prior",
        "sigma_noise",
    ],
)
def test_non_dyadic_hyperparameters_are_exact_in_float64(reg_data, which):
    x, y, _ = reg_data
    delta, sigma = (0.3, 0.5) if which != "sigma_noise" else (2.0, 0.8)
    prior = [delta] if which == "layerwise_prior" else delta
    theta = ridge_mode(x, y, delta, sigma, np.zeros(4))
    la = DiagonalLaplace(
        blr_model(theta), "regression", sigma_noise=sigma, prior_precision=prior
    ).fit((x, y))
    assert la.prior_precision == prior
    h = np.sum(augment(x) ** 2, axis=0) / sigma**2
    np.testing.assert_allclose(flat(la.posterior_precision), h + delta, rtol=1e-12)
    np.testing.assert_allclose(
        float(la.log_marginal_likelihood()),
        blr_lml(x, y, theta, delta, sigma, np.zeros(4)),
        rtol=1e-13,
    )


def test_regression_two_outputs(float64):
    rng = np.random.default_rng(5)
    n, d, sigma, delta = 30, 3, 0.4, 1.5
    x = rng.normal(size=(n, d))
    y = x @ rng.normal(size=(d, 2)) + sigma * rng.normal(size=(n, 2))
    keras.utils.set_random_seed(1)
    model = keras.Sequential([keras.Input((d,)), keras.layers.Dense(2)])
    la = DiagonalLaplace(model, "regression", sigma_noise=sigma, prior_precision=delta).fit((x, y))
    kernel, bias = (v.numpy() for v in model.weights)
    h_kernel = np.repeat((np.sum(x**2, axis=0) / sigma**2)[:, None], 2, axis=1)
    h_bias = np.full(2, n / sigma**2)
    prec = la.posterior_precision
    np.testing.assert_allclose(prec[0].numpy(), h_kernel + delta, rtol=1e-12)
    np.testing.assert_allclose(prec[1].numpy(), h_bias + delta, rtol=1e-12)

    f = x @ kernel + bias
    loglik = -0.5 * np.sum((y - f) ** 2) / sigma**2 - 2 * n * np.log(sigma * np.sqrt(2 * np.pi))
    h = np.concatenate([h_kernel.ravel(), h_bias])
    theta = np.concatenate([kernel.ravel(), bias])
    lml = loglik - 0.5 * (
        np.sum(np.log(h + delta)) - h.size * np.log(delta) + delta * np.sum(theta**2)
    )
    np.testing.assert_allclose(float(la.log_marginal_likelihood()), lml, rtol=1e-12)

    x_test = rng.normal(size=(5, d))
    mean, var = la.predict(x_test)
    np.testing.assert_allclose(mean.numpy(), x_test @ kernel + bias, rtol=1e-12, atol=1e-12)
    # output k depends on kernel[:, k] and bias[k] only
    func = augment(x_test) ** 2 @ (1 / (np.concatenate([h_kernel, h_bias[None]]) + delta))
    np.testing.assert_allclose(var.numpy(), func + sigma**2, rtol=1e-12)
    _, cov = la._glm(x_test, 256)
    np.testing.assert_allclose(cov.numpy()[:, 0, 1], 0.0, atol=1e-14)


def test_regression_empirical_fisher_noise_scaling(reg_data):
    """EF curvature: sum_n r_n^2 x_n^2 / sigma^4 (squared gradients of the Gaussian NLL)."""
    x, y, _ = reg_data
    theta = np.array([0.8, -1.5, 0.2, 0.1])
    la = DiagonalLaplace(blr_model(theta), "regression", curvature="ef", sigma_noise=SIGMA)
    la.fit((x, y))
    xa = augment(x)
    r2 = (y[:, 0] - xa @ theta) ** 2
    for sigma in [SIGMA, 1.25]:
        expected = (r2[:, None] * xa**2).sum(0) / sigma**4
        np.testing.assert_allclose(flat(la.curvature_diagonal(sigma)), expected, rtol=1e-12)
    np.testing.assert_allclose(
        flat(la.posterior_precision), (r2[:, None] * xa**2).sum(0) / SIGMA**4 + 1.0, rtol=1e-12
    )


# ---------------------------------------------------------------------------------------
# 2. Temperature
# ---------------------------------------------------------------------------------------


def test_temperature_scales_curvature_and_log_likelihood(mlp_clf):
    model, x, y, la1 = mlp_clf
    temperature, delta = 2.5, 0.5
    la_t = DiagonalLaplace(
        model, "classification", prior_precision=delta, temperature=temperature
    ).fit((x, y))
    f, jac = dense_jacobian(model, x, model.trainable_variables)
    h = ggn_diagonal(f, jac, "classification")
    np.testing.assert_allclose(flat(la1.posterior_precision), h + delta, rtol=1e-9)
    np.testing.assert_allclose(flat(la_t.posterior_precision), h / temperature + delta, rtol=1e-9)

    loglik = np.sum(log_softmax(f, axis=-1)[np.arange(len(y)), y])
    np.testing.assert_allclose(float(la1.log_likelihood()), loglik, rtol=1e-10)
    np.testing.assert_allclose(float(la_t.log_likelihood()), loglik / temperature, rtol=1e-10)

    theta = flat(model.trainable_variables)
    lml = loglik / temperature - 0.5 * (
        np.sum(np.log(h / temperature + delta))
        - theta.size * np.log(delta)
        + delta * np.sum(theta**2)
    )
    np.testing.assert_allclose(float(la_t.log_marginal_likelihood()), lml, rtol=1e-9)


# ---------------------------------------------------------------------------------------
# 3. GLM predictive vs dense Jacobians
# ---------------------------------------------------------------------------------------


def make_cnn():
    keras.utils.set_random_seed(11)
    return keras.Sequential(
        [
            keras.Input((5, 5, 2)),
            keras.layers.Conv2D(3, 3, activation="tanh", name="conv"),
            keras.layers.Flatten(),
            keras.layers.Dense(3, name="head"),
        ]
    )


def make_multi_input():
    keras.utils.set_random_seed(12)
    a = keras.Input((3,), name="a")
    b = keras.Input((2,), name="b")
    ha = keras.layers.Dense(4, activation="tanh", name="da")(a)
    hb = keras.layers.Dense(3, activation="sigmoid", name="db")(b)
    h = keras.layers.Concatenate()([ha, hb])
    out = keras.layers.Dense(3, name="head")(h)
    return keras.Model({"a": a, "b": b}, out)


def glm_case(kind):
    rng = np.random.default_rng(21)
    if kind == "mlp":
        model, x = make_mlp(4), rng.normal(size=(20, 4))
    elif kind == "cnn":
        model, x = make_cnn(), rng.normal(size=(16, 5, 5, 2))
    else:
        model = make_multi_input()
        x = {"a": rng.normal(size=(18, 3)), "b": rng.normal(size=(18, 2))}
    n = len(next(iter(x.values()))) if isinstance(x, dict) else len(x)
    y = rng.integers(0, 3, n)
    return model, x, y


@pytest.mark.parametrize("subset", ["all", "last_layer"])
@pytest.mark.parametrize("kind", ["mlp", "cnn", "multi_input"])
def test_glm_predictive_matches_dense_jacobian(kind, subset):
    model, x, y = glm_case(kind)
    la = DiagonalLaplace(model, "classification", subset=subset, prior_precision=0.25).fit((x, y))
    variables = list(model.trainable_variables)
    if subset == "last_layer":
        variables = list(model.get_layer("head").trainable_variables)
    assert [id(v) for v in la.variables] == [id(v) for v in variables]

    f, jac = dense_jacobian(model, x, variables)
    h = ggn_diagonal(f, jac, "classification")
    np.testing.assert_allclose(flat(la.posterior_precision), h + 0.25, rtol=1e-9)
    post_var = 1 / (h + 0.25)
    cov = np.einsum("ncp,p,ndp->ncd", jac, post_var, jac)
    var = np.einsum("ncp,p->nc", jac**2, post_var)

    mean_la, cov_la = la._glm(x, 256)
    np.testing.assert_allclose(mean_la.numpy(), f, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(cov_la.numpy(), cov, rtol=1e-9, atol=1e-12)

    np.testing.assert_allclose(la.predict(x).numpy(), hand_probit(f, var), rtol=1e-10)
    np.testing.assert_allclose(
        la.predict(x, link_approx="bridge").numpy(), hand_bridge(f, cov), rtol=1e-9
    )
    # Monte Carlo: the same draws pushed through the dense covariance
    mc = la.predict(x, link_approx="mc", n_samples=50, seed=4).numpy()
    ref = laplace_tf.predictive.monte_carlo(
        tf.constant(f), tf.constant(cov), n_samples=50, seed=[4, 0]
    ).numpy()
    np.testing.assert_allclose(mc, ref, rtol=1e-8, atol=1e-10)
    # small batches give the same covariance
    _, cov_small = la._glm(x, 5)
    np.testing.assert_allclose(cov_small.numpy(), cov, rtol=1e-9, atol=1e-12)


def test_binary_probit_matches_dense_jacobian(binary_la, clf_data):
    x, _ = clf_data
    la = binary_la
    f, jac = dense_jacobian(la.model, x, la.variables)
    var = np.einsum("ncp,p->nc", jac**2, flat(la.posterior_variance))
    expected = 1 / (1 + np.exp(-f / np.sqrt(1 + math.pi / 8 * var)))
    np.testing.assert_allclose(la.predict(x).numpy(), expected, rtol=1e-10)


# ---------------------------------------------------------------------------------------
# 4. Samples and the TFP posterior
# ---------------------------------------------------------------------------------------


def test_samples_match_posterior(blr_la):
    la, theta = blr_la
    n = 20000
    draws = la.sample(n, seed=123)
    assert [tuple(d.shape) for d in draws] == [(n, 3, 1), (n, 1)]
    flat_draws = np.concatenate([d.numpy().reshape(n, -1) for d in draws], axis=1)
    std = flat(la.posterior_stddev)
    np.testing.assert_allclose(std, 1 / np.sqrt(flat(la.posterior_precision)), rtol=1e-12)
    emp_mean = flat_draws.mean(0)
    emp_std = flat_draws.std(0, ddof=1)
    assert np.all(np.abs(emp_mean - theta) < 5 * std / np.sqrt(n))
    assert np.all(np.abs(emp_std - std) < 5 * std / np.sqrt(2 * n))
    corr = np.corrcoef(flat_draws[:, 0], flat_draws[:, 3])[0, 1]
    assert abs(corr) < 5 / np.sqrt(n)

    again = la.sample(50, seed=7)
    same = la.sample(50, seed=7)
    other = la.sample(50, seed=8)
    for a, b, c in zip(again, same, other, strict=True):
        np.testing.assert_array_equal(a.numpy(), b.numpy())
        assert not np.allclose(a.numpy(), c.numpy())


def test_tfp_posterior(blr_la):
    la, theta = blr_la
    post = la.posterior
    draw = post.sample(seed=1)
    assert [tuple(d.shape) for d in draw] == [(3, 1), (1,)]
    draws = post.sample(6, seed=2)
    assert [tuple(d.shape) for d in draws] == [(6, 3, 1), (6, 1)]
    var = flat(la.posterior_variance)
    expected = -0.5 * np.sum(np.log(2 * np.pi * var))
    np.testing.assert_allclose(float(post.log_prob(la.mean)), expected, rtol=1e-12)
    # a point off the mode
    point = [m + 0.1 for m in la.mean]
    expected_off = expected - 0.5 * np.sum(0.01 / var)
    np.testing.assert_allclose(float(post.log_prob(point)), expected_off, rtol=1e-12)
    np.testing.assert_allclose(flat(post.mean()), theta, rtol=1e-12)
    np.testing.assert_allclose(flat(post.stddev()), np.sqrt(var), rtol=1e-12)


# ---------------------------------------------------------------------------------------
# 5. Differentiable marginal likelihood
# ---------------------------------------------------------------------------------------


def lml_at(la, prior, sigma=None) -> float:
    """``la.log_marginal_likelihood`` at float64 tensors (as an optimiser passes them)."""
    prior = tf.constant(prior, tf.float64)
    sigma = None if sigma is None else tf.constant(sigma, tf.float64)
    return float(la.log_marginal_likelihood(prior, sigma))


def central_difference(fn, x0, step=1e-5):
    return (fn(x0 + step) - fn(x0 - step)) / (2 * step)


def test_lml_gradient_regression(blr_la):
    la, _ = blr_la
    prior = tf.Variable(1.25, dtype=tf.float64)
    sigma = tf.Variable(0.75, dtype=tf.float64)
    with tf.GradientTape() as tape:
        value = la.log_marginal_likelihood(prior, sigma)
    g_prior, g_sigma = tape.gradient(value, [prior, sigma])
    assert g_prior is not None and g_sigma is not None
    fd_prior = central_difference(lambda p: lml_at(la, p, 0.75), 1.25)
    fd_sigma = central_difference(lambda s: lml_at(la, 1.25, s), 0.75)
    np.testing.assert_allclose(float(g_prior), fd_prior, rtol=1e-6)
    np.testing.assert_allclose(float(g_sigma), fd_sigma, rtol=1e-6)
    assert abs(float(g_sigma)) > 1.0  # not a trivial zero
    # the stored values are untouched
    assert la.prior_precision == DELTA and la.sigma_noise == SIGMA


def test_lml_gradient_classification_layerwise(mlp_clf):
    _, _, _, la = mlp_clf
    prior = tf.Variable([0.4, 2.0], dtype=tf.float64)
    with tf.GradientTape() as tape:
        value = la.log_marginal_likelihood(prior)
    grad = tape.gradient(value, prior).numpy()
    for i in range(2):

        def fn(p, i=i):
            values = [0.4, 2.0]
            values[i] = p
            return lml_at(la, values)

        np.testing.assert_allclose(grad[i], central_difference(fn, [0.4, 2.0][i]), rtol=1e-6)
    scalar = tf.Variable(0.8, dtype=tf.float64)
    with tf.GradientTape() as tape:
        value = la.log_marginal_likelihood(scalar)
    fd = central_difference(lambda p: lml_at(la, p), 0.8)
    np.testing.assert_allclose(float(tape.gradient(value, scalar)), fd, rtol=1e-6)


# ---------------------------------------------------------------------------------------
# 6. Marginal-likelihood optimisation
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("likelihood", ["regression", "classification"])
def test_optimize_prior_precision_reaches_grid_maximum(reg_data, clf_data, likelihood):
    if likelihood == "regression":
        x, y, _ = reg_data
        model = blr_model(ridge_mode(x, y, DELTA, SIGMA, np.zeros(4)))
        la = DiagonalLaplace(model, "regression", sigma_noise=SIGMA).fit((x, y))
    else:
        x, _ = clf_data
        model = make_mlp(0)
        la = DiagonalLaplace(model, "classification").fit((x, teacher_labels(model, x, 2)))
    grid = np.logspace(-3, 3, 2001)
    values = np.array([float(la.log_marginal_likelihood(g)) for g in grid])
    best = int(np.argmax(values))
    assert 0 < best < len(grid) - 1  # an interior maximum
    assert la.optimize_prior_precision() is la
    optimum = la.prior_precision
    assert isinstance(optimum, float)
    assert float(la.log_marginal_likelihood()) >= values.max() - 1e-6
    assert abs(np.log10(optimum) - np.log10(grid[best])) <= 6 / 2000 + 1e-12


def test_layerwise_and_diag_beat_scalar(mlp_clf):
    model, x, y, _ = mlp_clf
    results = {}
    for structure in ["scalar", "layerwise", "diag"]:
        la = DiagonalLaplace(model, "classification").fit((x, y))
        la.optimize_prior_precision(prior_structure=structure)
        results[structure] = (float(la.log_marginal_likelihood()), la.prior_precision)
    assert isinstance(results["layerwise"][1], list) and len(results["layerwise"][1]) == 2
    diag = results["diag"][1]
    assert [np.shape(p) for p in diag] == [tuple(v.shape) for v in model.trainable_variables]
    assert results["layerwise"][0] >= results["scalar"][0] - 1e-6
    assert results["diag"][0] >= results["layerwise"][0] - 1e-6
    assert results["diag"][0] > results["scalar"][0] + 1e-3


def test_optimize_sigma_noise_improves_lml(reg_data):
    x, y, _ = reg_data
    theta = ridge_mode(x, y, DELTA, SIGMA, np.zeros(4))
    fixed = DiagonalLaplace(blr_model(theta), "regression", sigma_noise=2.0).fit((x, y))
    fixed.optimize_prior_precision()
    assert fixed.sigma_noise == 2.0
    tuned = DiagonalLaplace(blr_model(theta), "regression", sigma_noise=2.0).fit((x, y))
    tuned.optimize_prior_precision(optimize_sigma_noise=True)
    assert tuned.sigma_noise != 2.0
    lml_fixed = float(fixed.log_marginal_likelihood())
    lml_tuned = float(tuned.log_marginal_likelihood())
    assert lml_tuned > lml_fixed + 1.0
    # a stationary point in both coordinates
    delta, sigma = tuned.prior_precision, tuned.sigma_noise
    d_sigma = central_difference(lambda s: lml_at(tuned, delta, s), sigma)
    d_delta = central_difference(lambda d: lml_at(tuned, d, sigma), delta)
    assert abs(d_sigma * sigma) < 1e-3 and abs(d_delta * delta) < 1e-3
    assert 0.3 < sigma < 0.8  # near the true noise 0.5


@pytest.fixture(scope="module")
def tanh_regressor(float64):
    """A trained 1-16-1 tanh MLP on 200 noisy sine points (noise 0.1)."""
    rng = np.random.default_rng(0)
    x = rng.uniform(-3, 3, (200, 1))
    y = np.sin(x) + 0.1 * rng.normal(size=x.shape)
    keras.utils.set_random_seed(0)
    model = keras.Sequential(
        [keras.Input((1,)), keras.layers.Dense(16, activation="tanh"), keras.layers.Dense(1)]
    )
    model.compile(optimizer=keras.optimizers.Adam(0.03), loss="mse")
    model.fit(x, y, epochs=30, batch_size=50, verbose=0)
    return model, x, y


@pytest.mark.parametrize("start", [(1.0, 1.0), (1e-3, 3.0), (1e3, 1e-2)])
def test_marglik_from_a_distant_start_reaches_the_maximum(tanh_regressor, start):
    """At a poor start the summed log evidence has gradients in the hundreds; a bounded
    L-BFGS-B on it used to jump to the bounds, where the evidence overflows, fail its line
    search and silently return the start."""
    model, x, y = tanh_regressor
    prior, sigma = start
    la = DiagonalLaplace(model, "regression", prior_precision=prior, sigma_noise=sigma)
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # no non-convergence warning
        la.fit((x, y)).optimize_prior_precision(optimize_sigma_noise=True)
    log_delta, log_sigma = np.meshgrid(np.linspace(-4, 6, 41), np.linspace(-4, 1, 41))
    grid = [
        lml_at(la, np.exp(d), np.exp(s))
        for d, s in zip(log_delta.ravel(), log_sigma.ravel(), strict=True)
    ]
    assert float(la.log_marginal_likelihood()) >= max(grid) - 1e-6
    delta, sigma = la.prior_precision, la.sigma_noise
    d_sigma = central_difference(lambda s: lml_at(la, delta, s), sigma, 1e-7)
    d_delta = central_difference(lambda d: lml_at(la, d, sigma), delta, 1e-7)
    assert abs(d_sigma * sigma) < 1e-3 and abs(d_delta * delta) < 1e-3
    assert 0.08 < sigma < 0.2  # near the true noise 0.1


def test_marglik_warns_when_the_optimiser_fails(blr_la, monkeypatch):
    from scipy.optimize import OptimizeResult

    from laplace_tf.posterior import tuning

    def stuck(fun, x0, **kwargs):
        value, gradient = fun(x0)
        # reports success at its start, as L-BFGS-B did after a failed first line search
        return OptimizeResult(x=x0, fun=value, jac=gradient, success=True, message="ABNORMAL")

    la, _ = blr_la
    before = la.prior_precision
    monkeypatch.setattr(tuning, "minimize", stuck)
    la.prior_precision = 100.0  # far from the optimum: a large gradient
    try:
        with pytest.warns(RuntimeWarning, match="did not converge.*ABNORMAL"):
            la.optimize_prior_precision()
    finally:
        la.prior_precision = before


# ---------------------------------------------------------------------------------------
# 7. Grid search
# ---------------------------------------------------------------------------------------


def test_gridsearch_picks_minimum_nll(clf_data):
    x, x_val = clf_data
    model = make_mlp(0)
    head = model.get_layer("head")
    head.kernel.assign(6.0 * head.kernel)  # confident logits: the best grid value is inside
    y = teacher_labels(model, x, seed=2)
    y_val = teacher_labels(model, x_val, seed=3)
    grid = [0.01, 0.1, 1.0, 10.0, 100.0]
    la = DiagonalLaplace(model, "classification").fit((x, y))
    nll = []
    for g in grid:
        la.prior_precision = g
        probs = la.predict(x_val).numpy()
        nll.append(-np.mean(np.log(probs[np.arange(len(y_val)), y_val])))
    la.prior_precision = 1.0
    best = int(np.argmin(nll))
    assert 0 < best < len(grid) - 1
    la.optimize_prior_precision("gridsearch", val_data=(x_val, y_val), grid=grid)
    assert la.prior_precision == grid[best]
    np.testing.assert_allclose(list(la.gridsearch_scores_.values()), nll, rtol=1e-10)


def test_gridsearch_uses_custom_metric(clf_data):
    x, x_val = clf_data
    model = make_mlp(0)
    la = DiagonalLaplace(model, "classification").fit((x, teacher_labels(model, x, 2)))
    y_val = np.zeros(len(x_val), dtype=int)
    calls = []

    def metric(predictions, y):
        calls.append((np.asarray(predictions).shape, la.prior_precision))
        np.testing.assert_array_equal(np.asarray(y), y_val)
        return -la.prior_precision  # prefers the largest value

    grid = [10.0, 0.01, 100.0, 1.0, 0.1]
    la.optimize_prior_precision("gridsearch", val_data=(x_val, y_val), grid=grid, metric=metric)
    assert la.prior_precision == 100.0
    assert sorted(c[1] for c in calls) == sorted(grid)
    assert all(c[0] == (len(x_val), 3) for c in calls)


def test_gridsearch_regression_default_nll(reg_data):
    x, y, x_val = reg_data
    rng = np.random.default_rng(9)
    y_val = x_val @ np.array([1.0, -2.0, 0.5]) + 0.3 + SIGMA * rng.normal(size=len(x_val))
    model = blr_model(np.array([0.8, -1.5, 0.2, 0.0]))  # a poor fit: variance matters
    la = DiagonalLaplace(model, "regression", sigma_noise=SIGMA).fit((x, y))
    grid = [0.01, 1.0, 100.0, 1e4]
    nll = []
    for g in grid:
        la.prior_precision = g
        mean, var = (a.numpy()[:, 0] for a in la.predict(x_val))
        nll.append(np.mean(0.5 * np.log(2 * np.pi * var) + 0.5 * (y_val - mean) ** 2 / var))
    la.optimize_prior_precision("gridsearch", val_data=(x_val, y_val), grid=grid)
    assert la.prior_precision == grid[int(np.argmin(nll))]
    np.testing.assert_allclose(list(la.gridsearch_scores_.values()), nll, rtol=1e-6)


# ---------------------------------------------------------------------------------------
# 8. The model is never modified
# ---------------------------------------------------------------------------------------


def make_bn_model():
    keras.utils.set_random_seed(31)
    model = keras.Sequential(
        [
            keras.Input((4,)),
            keras.layers.Dense(5, name="d1"),
            keras.layers.BatchNormalization(name="bn"),
            keras.layers.Activation("tanh"),
            keras.layers.Dense(3, name="head"),
        ]
    )
    bn = model.get_layer("bn")
    rng = np.random.default_rng(31)
    bn.moving_mean.assign(rng.normal(size=5))
    bn.moving_variance.assign(rng.uniform(0.5, 2.0, size=5))
    bn.gamma.assign(rng.uniform(0.5, 1.5, size=5))
    bn.beta.assign(rng.normal(size=5))
    return model


@pytest.mark.filterwarnings("ignore:The Hessian diagonal has .* negative entries")
def test_model_weights_never_change(clf_data):
    x, x_val = clf_data
    model = make_bn_model()
    y = teacher_labels(model, x, 5)
    y_val = teacher_labels(model, x_val, 6)
    before = snapshot(model)
    assert len(model.non_trainable_weights) == 2

    la = DiagonalLaplace(model, "classification").fit((x, y), batch_size=16)
    assert_same_weights(model, before, "fit")
    for curvature in ["ggn_mc", "ef", "hessian"]:
        DiagonalLaplace(model, "classification", curvature=curvature).fit((x, y))
        assert_same_weights(model, before, f"fit({curvature})")
    for link in ["probit", "bridge", "mc"]:
        la.predict(x_val, link_approx=link, seed=0)
        assert_same_weights(model, before, f"predict({link})")
    la.predict(x_val, pred_type="nn", n_samples=5, seed=0)
    assert_same_weights(model, before, "predict(nn)")
    for pred_type in ["nn", "glm"]:
        la.predictive_samples(x_val, 4, pred_type=pred_type, seed=0)
        assert_same_weights(model, before, f"predictive_samples({pred_type})")
    la.sample(10, seed=0)
    _ = la.posterior.sample(seed=1)
    la.log_marginal_likelihood()
    assert_same_weights(model, before, "sample / log_marginal_likelihood")
    la.optimize_prior_precision()
    la.optimize_prior_precision(prior_structure="diag")
    assert_same_weights(model, before, "optimize_prior_precision(marglik)")
    la.optimize_prior_precision("gridsearch", val_data=(x_val, y_val), grid=[0.1, 1.0])
    la.optimize_prior_precision(
        "gridsearch", val_data=(x_val, y_val), grid=[0.1, 1.0], pred_type="nn"
    )
    assert_same_weights(model, before, "optimize_prior_precision(gridsearch)")
    # the posterior is centred at the (unchanged) model weights
    for m, v in zip(la.mean, la.variables, strict=True):
        np.testing.assert_array_equal(m.numpy(), v.numpy())


def test_fit_progress_and_batch_size(mlp_clf):
    model, x, y, la = mlp_clf
    seen = []
    other = DiagonalLaplace(model, "classification", prior_precision=0.5)
    other.fit((x, y), batch_size=20, progress=seen.append)
    assert seen == [20, 40, 48]
    for a, b in zip(other.posterior_precision, la.posterior_precision, strict=True):
        np.testing.assert_allclose(a.numpy(), b.numpy(), rtol=1e-12)
    np.testing.assert_allclose(
        float(other.log_marginal_likelihood()), float(la.log_marginal_likelihood()), rtol=1e-12
    )
    # a tf.data.Dataset of batches gives the same fit
    data = tf.data.Dataset.from_tensor_slices((x, y)).batch(7)
    again = DiagonalLaplace(model, "classification", prior_precision=0.5).fit(data)
    assert again.n_data == len(x)
    for a, b in zip(again.posterior_precision, la.posterior_precision, strict=True):
        np.testing.assert_allclose(a.numpy(), b.numpy(), rtol=1e-12)


def test_failed_fit_leaves_model_and_previous_fit_intact(clf_data):
    x, _ = clf_data
    model = make_bn_model()
    y = teacher_labels(model, x, 5)
    before = snapshot(model)
    la = DiagonalLaplace(model, "classification").fit((x, y))
    precision = [p.numpy() for p in la.posterior_precision]
    lml = float(la.log_marginal_likelihood())

    def generator():
        for i in range(4):
            if i == 2:
                raise RuntimeError("data source broke")
            yield x[8 * i : 8 * i + 8], y[8 * i : 8 * i + 8]

    spec = (tf.TensorSpec([None, 4], tf.float64), tf.TensorSpec([None], tf.int64))
    broken = tf.data.Dataset.from_generator(generator, output_signature=spec)
    with pytest.raises(Exception, match="data source broke"):
        la.fit(broken)
    assert_same_weights(model, before, "a fit that failed in the data pipeline")

    bad_labels = [(x[:8], y[:8]), (x[8:16], np.stack([y[8:16], y[8:16]], axis=1))]
    with pytest.raises((ValueError, tf.errors.InvalidArgumentError)):
        la.fit(bad_labels)
    assert_same_weights(model, before, "a fit that failed on bad labels")

    def stop(count):
        if count > 16:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        la.fit((x[:40], y[:40]), batch_size=16, progress=stop)
    assert_same_weights(model, before, "a fit interrupted from the progress callback")

    for p, q in zip(la.posterior_precision, precision, strict=True):
        np.testing.assert_array_equal(p.numpy(), q)
    assert float(la.log_marginal_likelihood()) == lml
    assert la.n_data == len(x)


# ---------------------------------------------------------------------------------------
# 9. Shapes and normalisation of predictions
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs",
    [
        {"link_approx": "probit"},
        {"link_approx": "bridge"},
        {"link_approx": "mc", "n_samples": 30, "seed": 0},
        {"pred_type": "nn", "n_samples": 10, "seed": 0},
    ],
)
def test_classification_probabilities_sum_to_one(mlp_clf, clf_data, kwargs):
    _, _, _, la = mlp_clf
    _, x_val = clf_data
    probs = la.predict(x_val, **kwargs).numpy()
    assert probs.shape == (len(x_val), 3)
    assert np.all(probs > 0) and np.all(probs < 1)
    np.testing.assert_allclose(probs.sum(-1), 1.0, atol=1e-6)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"link_approx": "probit"},
        {"link_approx": "mc", "n_samples": 30, "seed": 0},
        {"pred_type": "nn", "n_samples": 10, "seed": 0},
    ],
)
def test_binary_predictions(binary_la, clf_data, kwargs):
    _, x_val = clf_data
    probs = binary_la.predict(x_val, **kwargs).numpy()
    assert probs.shape == (len(x_val), 1)
    assert np.all(probs > 0) and np.all(probs < 1)


def test_multi_input_nn_predictive():
    model, x, y = glm_case("multi_input")
    map_probs = softmax(model(x).numpy(), axis=-1)
    la = DiagonalLaplace(model, "classification", prior_precision=0.5).fit((x, y))
    probs = la.predict(x, pred_type="nn", n_samples=8, seed=1).numpy()
    assert probs.shape == (18, 3)
    np.testing.assert_allclose(probs.sum(-1), 1.0, atol=1e-6)
    assert np.abs(probs - map_probs).max() > 1e-3
    assert la.predictive_samples(x, 3, seed=1, batch_size=5).shape == (3, 18, 3)
    la.prior_precision = 1e12
    np.testing.assert_allclose(
        la.predict(x, pred_type="nn", n_samples=8, seed=1).numpy(), map_probs, atol=1e-6
    )


def test_predictive_samples_shapes(mlp_clf, binary_la, blr_la, clf_data, reg_data):
    _, x_val = clf_data
    _, _, x_test = reg_data
    for pred_type in ["nn", "glm"]:
        s = mlp_clf[3].predictive_samples(x_val, 4, pred_type=pred_type, seed=1).numpy()
        assert s.shape == (4, len(x_val), 3)
        np.testing.assert_allclose(s.sum(-1), 1.0, atol=1e-6)
        s = binary_la.predictive_samples(x_val, 3, pred_type=pred_type, seed=1).numpy()
        assert s.shape == (3, len(x_val), 1) and np.all((s > 0) & (s < 1))
        s = blr_la[0].predictive_samples(x_test, 5, pred_type=pred_type, seed=1).numpy()
        assert s.shape == (5, len(x_test), 1)


def test_regression_predictive_variance_positive(blr_la, reg_data):
    _, _, x_test = reg_data
    la, theta = blr_la
    for kwargs in [{}, {"pred_type": "nn", "n_samples": 50, "seed": 0}]:
        for include_noise in [True, False]:
            mean, var = la.predict(x_test, include_noise=include_noise, **kwargs)
            assert mean.shape == var.shape == (len(x_test), 1)
            assert np.all(var.numpy() > 0)
            if include_noise:
                assert np.all(var.numpy() > SIGMA**2)
    # the NN predictive aggregates its own draws: mean, variance (+ noise) over samples
    mean, var = la.predict(x_test, pred_type="nn", n_samples=50, seed=3, include_noise=False)
    f = la.predictive_samples(x_test, 50, pred_type="nn", seed=3).numpy()
    np.testing.assert_allclose(mean.numpy(), f.mean(0), rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(var.numpy(), f.var(0), rtol=1e-8)
    _, var_noise = la.predict(x_test, pred_type="nn", n_samples=50, seed=3)
    np.testing.assert_allclose(var_noise.numpy(), f.var(0) + SIGMA**2, rtol=1e-8)
    # for a linear model the NN predictive is the GLM one: compare with the closed form
    n = 4000
    mean, var = la.predict(x_test, pred_type="nn", n_samples=n, seed=4, include_noise=False)
    xa = augment(x_test)
    exact_var = xa**2 @ flat(la.posterior_variance)
    np.testing.assert_array_less(
        np.abs(mean.numpy()[:, 0] - xa @ theta), 5 * np.sqrt(exact_var / n)
    )
    np.testing.assert_array_less(
        np.abs(var.numpy()[:, 0] - exact_var), 5 * exact_var * np.sqrt(2 / n)
    )


# ---------------------------------------------------------------------------------------
# 10. Seeds
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "call",
    [
        lambda la, x, s: la.predict(x, link_approx="mc", n_samples=20, seed=s),
        lambda la, x, s: la.predict(x, pred_type="nn", n_samples=5, seed=s),
        lambda la, x, s: la.predictive_samples(x, 5, pred_type="nn", seed=s),
        lambda la, x, s: la.predictive_samples(x, 5, pred_type="glm", seed=s),
    ],
    ids=["mc", "nn", "samples_nn", "samples_glm"],
)
def test_same_seed_same_result(mlp_clf, clf_data, call):
    _, _, _, la = mlp_clf
    _, x_val = clf_data
    a = call(la, x_val, 17).numpy()
    b = call(la, x_val, 17).numpy()
    c = call(la, x_val, 18).numpy()
    np.testing.assert_array_equal(a, b)
    assert not np.allclose(a, c)


# ---------------------------------------------------------------------------------------
# 11. Unfitted use
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "use",
    [
        lambda la: la.posterior_precision,
        lambda la: la.posterior_variance,
        lambda la: la.posterior,
        lambda la: la.mean,
        lambda la: la.n_data,
        lambda la: la.predict(np.zeros((2, 4))),
        lambda la: la.predict(np.zeros((2, 4)), pred_type="nn"),
        lambda la: la.predictive_samples(np.zeros((2, 4)), 3),
        lambda la: la.sample(3),
        lambda la: la.log_marginal_likelihood(),
        lambda la: la.log_likelihood(),
        lambda la: la.optimize_prior_precision(),
    ],
)
def test_unfitted_raises(use):
    la = DiagonalLaplace(make_mlp(0), "classification")
    with pytest.raises(RuntimeError, match="fit"):
        use(la)


# ---------------------------------------------------------------------------------------
# 12. Validation
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "valid"),
    [
        ({"likelihood": "poisson"}, ["classification", "binary", "regression"]),
        ({"curvature": "kfac"}, ["ggn", "ggn_mc", "ef", "hessian"]),
        ({"subset": "first_layer"}, ["all", "last_layer"]),
    ],
)
def test_unknown_constructor_strings(kwargs, valid):
    with pytest.raises(ValueError) as info:
        DiagonalLaplace(make_mlp(0), **kwargs)
    for name in valid:
        assert name in str(info.value)


@pytest.mark.parametrize(
    ("call", "valid"),
    [
        (lambda la, x: la.predict(x, pred_type="map"), ["glm", "nn"]),
        (lambda la, x: la.predict(x, link_approx="sigmoid"), ["probit", "bridge", "mc"]),
        (lambda la, x: la.predictive_samples(x, 2, pred_type="map"), ["glm", "nn"]),
        (lambda la, x: la.optimize_prior_precision("cv"), ["marglik", "gridsearch"]),
        (
            lambda la, x: la.optimize_prior_precision(prior_structure="full"),
            ["scalar", "layerwise", "diag"],
        ),
    ],
)
def test_unknown_method_strings(mlp_clf, clf_data, call, valid):
    _, _, _, la = mlp_clf
    prior = la.prior_precision
    with pytest.raises(ValueError) as info:
        call(la, clf_data[1])
    for name in valid:
        assert name in str(info.value)
    assert la.prior_precision == prior


@pytest.mark.parametrize(
    "kwargs",
    [
        {"prior_precision": 0.0},
        {"prior_precision": -1.0},
        {"prior_precision": float("nan")},
        {"prior_precision": float("inf")},
        {"prior_precision": [1.0, 0.0]},
        {"prior_precision": [1.0, 2.0, 3.0]},
        {"sigma_noise": 0.0},
        {"sigma_noise": -0.5},
        {"sigma_noise": float("nan")},
        {"temperature": 0.0},
        {"temperature": -1.0},
        {"subset": ["hidden", "no_such_layer"]},
        {"subset": []},
    ],
)
def test_invalid_constructor_values(kwargs):
    with pytest.raises(ValueError):
        DiagonalLaplace(make_mlp(0), "classification", **kwargs)


def test_invalid_values_after_construction(mlp_clf, binary_la, clf_data):
    _, _, _, la = mlp_clf
    _, x_val = clf_data
    for bad in [0, -1, -0.5, 2.5]:
        with pytest.raises(ValueError):
            la.sample(bad)
    with pytest.raises(ValueError):
        la.predictive_samples(x_val, 0)
    with pytest.raises(ValueError):
        la.predict(x_val, link_approx="mc", n_samples=0)
    with pytest.raises(ValueError, match="bridge"):
        binary_la.predict(x_val, link_approx="bridge")
    other = DiagonalLaplace(la.model, "classification")
    for bad in [0.0, -2.0, float("nan"), [1.0, -1.0], [1.0, 1.0, 1.0]]:
        with pytest.raises(ValueError):
            other.prior_precision = bad
    with pytest.raises(ValueError):
        other.sigma_noise = 0.0
    assert other.prior_precision == 1.0 and other.sigma_noise == 1.0
    with pytest.raises(ValueError):
        la.optimize_prior_precision(optimize_sigma_noise=True)  # classification
    with pytest.raises(ValueError):
        la.optimize_prior_precision("gridsearch")  # no val_data


def test_prior_precision_structures(mlp_clf):
    model, x, y, la1 = mlp_clf
    h = [p.numpy() - 0.5 for p in la1.posterior_precision]
    layerwise = DiagonalLaplace(model, "classification", prior_precision=[0.25, 3.0]).fit((x, y))
    assert layerwise.prior_precision == [0.25, 3.0]
    expected = [0.25, 0.25, 3.0, 3.0]  # hidden kernel, bias; head kernel, bias
    for p, hh, d in zip(layerwise.posterior_precision, h, expected, strict=True):
        np.testing.assert_allclose(p.numpy(), hh + d, rtol=1e-12)

    rng = np.random.default_rng(0)
    per_weight = [rng.uniform(0.1, 5.0, size=v.shape) for v in model.trainable_variables]
    diag = DiagonalLaplace(model, "classification", prior_precision=per_weight).fit((x, y))
    for p, hh, d in zip(diag.posterior_precision, h, per_weight, strict=True):
        np.testing.assert_allclose(p.numpy(), hh + d, rtol=1e-12)
    for got, d in zip(diag.prior_precision, per_weight, strict=True):
        np.testing.assert_array_equal(got, d)
    theta = flat(model.trainable_variables)
    d = flat(per_weight)
    hf = flat(h)
    lml = float(la1.log_likelihood()) - 0.5 * (
        np.sum(np.log(hf + d)) - np.sum(np.log(d)) + np.sum(d * theta**2)
    )
    np.testing.assert_allclose(float(diag.log_marginal_likelihood()), lml, rtol=1e-10)
    # a per-weight array with a wrong shape is rejected
    bad = [np.ones((4, 6)), np.ones(6), np.ones((6, 3)), np.ones(4)]
    with pytest.raises(ValueError):
        DiagonalLaplace(model, "classification", prior_precision=bad)


# ---------------------------------------------------------------------------------------
# 13. Subsets
# ---------------------------------------------------------------------------------------


def test_subset_selection(mlp_clf):
    model, x, y, _ = mlp_clf
    hidden, head = model.get_layer("hidden"), model.get_layer("head")
    last = DiagonalLaplace(model, "classification", subset="last_layer")
    assert [id(v) for v in last.variables] == [id(head.kernel), id(head.bias)]
    named = DiagonalLaplace(model, "classification", subset=["hidden"])
    assert [id(v) for v in named.variables] == [id(hidden.kernel), id(hidden.bias)]
    both = DiagonalLaplace(model, "classification", subset=["hidden", "head"])
    assert len(both.variables) == 4

    last.fit((x, y))
    shapes = [(6, 3), (3,)]
    assert [tuple(p.shape) for p in last.posterior_precision] == shapes
    assert [tuple(m.shape) for m in last.mean] == shapes
    assert [tuple(s.shape) for s in last.sample(4, seed=0)] == [(4, 6, 3), (4, 3)]
    assert [tuple(s.shape) for s in last.posterior.sample(seed=0)] == shapes
    # a layer-name subset equals the same weights selected by "last_layer"
    head_only = DiagonalLaplace(model, "classification", subset=["head"]).fit((x, y))
    for a, b in zip(head_only.posterior_precision, last.posterior_precision, strict=True):
        np.testing.assert_allclose(a.numpy(), b.numpy(), rtol=1e-12)
    # and equals the corresponding part of the full posterior (diagonal: no coupling)
    full = mlp_clf[3]
    for a, b in zip(last.posterior_precision, full.posterior_precision[2:], strict=True):
        np.testing.assert_allclose(a.numpy() - 1.0, b.numpy() - 0.5, rtol=1e-10)


def test_duplicate_subset_names_rejected(mlp_clf):
    model, *_ = mlp_clf
    with pytest.raises(ValueError, match="more than once"):
        DiagonalLaplace(model, "classification", subset=["head", "head"])


def test_nested_block_and_its_layer_rejected(float64):
    """Naming a nested model and a layer inside it would count its weights twice."""
    inner = keras.Sequential([keras.Input((4,)), keras.layers.Dense(5, name="inner")], name="block")
    model = keras.Sequential([keras.Input((4,)), inner, keras.layers.Dense(3, name="out")])
    with pytest.raises(ValueError, match=r"'block/inner/kernel' twice.*'block' and 'inner'"):
        DiagonalLaplace(model, "classification", subset=["block", "inner"])
    block = DiagonalLaplace(model, "classification", subset=["block"])
    assert [v.path for v in block.variables] == ["block/inner/kernel", "block/inner/bias"]


@pytest.mark.parametrize("subset", [5, ["head", 3]])
def test_subset_of_wrong_type_rejected(mlp_clf, subset):
    model, *_ = mlp_clf
    with pytest.raises(TypeError, match="list of layer names"):
        DiagonalLaplace(model, "classification", subset=subset)


def test_nn_predictive_samples_only_the_subset(reg_data):
    """With subset="last_layer" each NN draw is features_MAP @ W_s + b_s: an exact linear
    function of the MAP hidden features (least-squares residual ~ 0), with (W_s, b_s)
    distributed as the posterior. Sampling every layer breaks the linearity."""
    x, _, _ = reg_data
    rng = np.random.default_rng(8)
    model = make_mlp(6, outputs=2, inputs=3, hidden=4)
    y = model(x).numpy() + 0.5 * rng.normal(size=(len(x), 2))
    x_test = rng.normal(size=(25, 3))
    hidden = model.get_layer("hidden")
    features = augment(np.tanh(x_test @ hidden.kernel.numpy() + hidden.bias.numpy()))

    def residual_and_coefficients(la, n):
        f = la.predictive_samples(x_test, n, pred_type="nn", seed=5).numpy()  # [S, N, 2]
        coef = np.stack([np.linalg.lstsq(features, fs, rcond=None)[0] for fs in f])
        residual = np.abs(np.einsum("nh,shc->snc", features, coef) - f).max()
        return residual, coef  # coef [S, 5, 2]: kernel rows then the bias row

    n = 400
    last = DiagonalLaplace(model, "regression", subset="last_layer", prior_precision=0.5)
    last.fit((x, y))
    residual, coef = residual_and_coefficients(last, n)
    assert residual < 1e-10
    mean = np.concatenate([m.numpy().reshape(-1, 2) for m in last.mean])
    std = np.concatenate([s.numpy().reshape(-1, 2) for s in last.posterior_stddev])
    np.testing.assert_array_less(np.abs(coef.mean(0) - mean), 5 * std / np.sqrt(n))
    np.testing.assert_array_less(np.abs(coef.std(0) - std), 5 * std / np.sqrt(2 * n))

    every = DiagonalLaplace(model, "regression", prior_precision=0.5).fit((x, y))
    residual_all, _ = residual_and_coefficients(every, 5)
    assert residual_all > 1e-4


def test_nn_predictive_subset_tiny_and_huge_prior(mlp_clf, clf_data):
    model, x, y, _ = mlp_clf
    _, x_val = clf_data
    map_probs = softmax(model(x_val).numpy(), axis=-1)
    loose = DiagonalLaplace(model, "classification", subset="last_layer", prior_precision=1e-2)
    loose.fit((x, y))
    nn_loose = loose.predict(x_val, pred_type="nn", n_samples=20, seed=5).numpy()
    assert np.abs(nn_loose - map_probs).max() > 1e-2

    tight = DiagonalLaplace(model, "classification", subset="last_layer", prior_precision=1e12)
    tight.fit((x, y))
    nn_tight = tight.predict(x_val, pred_type="nn", n_samples=20, seed=5).numpy()
    np.testing.assert_allclose(nn_tight, map_probs, atol=1e-6)
    np.testing.assert_allclose(tight.predict(x_val).numpy(), map_probs, atol=1e-6)
    for link in ["bridge", "mc"]:
        assert np.all(np.isfinite(tight.predict(x_val, link_approx=link, seed=0).numpy()))


@pytest.mark.filterwarnings("ignore:The Hessian diagonal has .* negative entries")
def test_black_box_hessian_fit_streams_the_data(float64):
    """A non-piecewise-linear model with curvature="hessian" consumes batches one at a time
    (bounded memory): each batch is reported by progress before the next is produced."""
    rng = np.random.default_rng(8)
    x, y = rng.normal(size=(12, 3)), rng.integers(0, 2, size=12)
    keras.utils.set_random_seed(2)
    model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(3, activation="tanh"),
                              keras.layers.Dense(2)])  # fmt: skip
    events = []

    def batches():
        for start in range(0, 12, 4):
            events.append(("produced", start))
            yield x[start : start + 4], y[start : start + 4]

    la = DiagonalLaplace(model, "classification", curvature="hessian")
    la.fit(batches(), progress=lambda n: events.append(("done", n)))
    assert events == [
        ("produced", 0), ("done", 4), ("produced", 4), ("done", 8), ("produced", 8), ("done", 12)
    ]  # fmt: skip
    assert la.n_data == 12


def test_gridsearch_with_sampled_predictive_is_reproducible_with_a_seed(mlp_clf, clf_data):
    model, x, y, _ = mlp_clf
    _, x_val = clf_data
    y_val = teacher_labels(model, x_val, seed=3)
    chosen = []
    for seed in (4, 4):
        la = DiagonalLaplace(model, "classification").fit((x, y))
        la.optimize_prior_precision(
            "gridsearch", val_data=(x_val, y_val), link_approx="mc", seed=seed
        )
        chosen.append(la.gridsearch_scores_)
    assert chosen[0] == chosen[1]
