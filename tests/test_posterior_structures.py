"""``laplace_tf.Laplace`` in its three structures against dense float64 oracles.

Full: the posterior precision is the dense-Jacobian GGN ``sum_n J_n^T Lambda_n J_n / T +
delta``, its evidence uses a dense log-determinant, and on Bayesian linear regression the
posterior and evidence are the closed forms. Kron: every quantity equals the one of the
dense block-diagonal matrix ``A (x) B / T + delta I`` (biases: ``B``, other weights: their
diagonal) built explicitly with ``np.kron`` from the fitted factors (which
``test_reducers`` checks against their own dense references).
"""

from __future__ import annotations

import math
import warnings

import keras
import numpy as np
import pytest
import tensorflow as tf
from scipy.stats import multivariate_normal

from laplace_tf.curvature import reducers
from laplace_tf.posterior import Laplace

L = keras.layers
N = 12
RTOL = 1e-10


pytestmark = pytest.mark.usefixtures("float64")  # conftest.py: float64 layers


# -- models, data and oracles ----------------------------------------------------------------


def mlp(width=3, seed=0):
    keras.utils.set_random_seed(seed)
    inputs = keras.Input((4,))
    hidden = L.Dense(5, activation="tanh", name="hidden")(inputs)
    normed = L.LayerNormalization(name="norm")(hidden)
    return keras.Model(inputs, L.Dense(width, name="head")(normed))


def data(likelihood, width=3, seed=1):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(N, 4))
    if likelihood == "classification":
        return x, rng.integers(0, width, N)
    return x, rng.normal(size=(N, width))


def flat(tensors) -> np.ndarray:
    return np.concatenate([np.ravel(np.asarray(t, dtype=np.float64)) for t in tensors])


def jacobian(model, x, variables):
    with tf.GradientTape(persistent=True) as tape:
        f = model(tf.constant(x), training=False)
    blocks = tape.jacobian(f, [v.value for v in variables], experimental_use_pfor=False)
    n, c = f.shape
    return f.numpy(), np.concatenate([np.reshape(b.numpy(), (n, c, -1)) for b in blocks], -1)


def dense_ggn(model, x, likelihood, variables):
    f, jac = jacobian(model, x, variables)
    if likelihood == "classification":
        p = np.exp(f - f.max(-1, keepdims=True))
        p /= p.sum(-1, keepdims=True)
        lam = np.einsum("nc,cd->ncd", p, np.eye(f.shape[1])) - p[:, :, None] * p[:, None, :]
    else:
        lam = np.broadcast_to(np.eye(f.shape[1]), (len(f), f.shape[1], f.shape[1]))
    return np.einsum("ncp,ncd,ndq->pq", jac, lam, jac)


def log_likelihood(model, x, y, likelihood, sigma=1.0, temperature=1.0):
    """``log p(y | f)`` with the data term divided by ``T`` and, for regression, the
    Gaussian normaliser not (laplace-torch's convention)."""
    f = model(x, training=False).numpy()
    if likelihood == "classification":
        log_p = f - np.log(np.exp(f).sum(-1, keepdims=True))
        return log_p[np.arange(len(y)), y].sum() / temperature
    squares = 0.5 * np.sum((y - f) ** 2) / sigma**2
    return -squares / temperature - f.size * math.log(sigma * math.sqrt(2 * math.pi))


def laplace_evidence(log_lik, precision, prior, theta):
    """``log p(D | theta) - 1/2 [log det(precision) - sum log prior + sum prior theta^2]``."""
    log_det = np.linalg.slogdet(precision)[1]
    return log_lik - 0.5 * (log_det - np.sum(np.log(prior)) + np.sum(prior * theta**2))


def block_diagonal(blocks):
    size = sum(len(b) for b in blocks)
    result, start = np.zeros((size, size)), 0
    for b in blocks:
        result[start : start + len(b), start : start + len(b)] = b
        start += len(b)
    return result


def assert_close(got, expected, rtol=RTOL):
    got, expected = np.asarray(got, dtype=np.float64), np.asarray(expected, dtype=np.float64)
    assert got.shape == expected.shape, (got.shape, expected.shape)
    scale = np.abs(expected).max()
    assert scale > 0
    error = np.abs(got - expected).max()
    assert error <= rtol * scale, f"max abs error {error:.3e} vs scale {scale:.3e}"


def per_weight(values, variables):
    return np.concatenate(
        [np.full(int(np.prod(v.shape)), value) for value, v in zip(values, variables, strict=True)]
    )


# -- full ------------------------------------------------------------------------------------


def cnn(width=3):
    keras.utils.set_random_seed(0)
    inputs = keras.Input((4,))
    image = L.Reshape((2, 2, 1))(inputs)
    z = L.Conv2D(2, 2, padding="same", activation="tanh", name="conv")(image)
    return keras.Model(inputs, L.Dense(width, name="head")(L.Flatten()(z)))


@pytest.mark.parametrize(
    ("factory", "likelihood"),
    [(mlp, "classification"), (mlp, "regression"), (cnn, "classification")],
)
def test_full_over_all_weights_is_the_dense_ggn(factory, likelihood):
    model = factory()
    x, y = data(likelihood)
    sigma, temperature, delta = 0.7, 2.0, 0.3
    la = Laplace(
        model,
        likelihood,
        structure="full",
        prior_precision=delta,
        sigma_noise=sigma,
        temperature=temperature,
    ).fit((x, y), batch_size=5)
    noise = sigma**2 if likelihood == "regression" else 1.0
    ggn = dense_ggn(model, x, likelihood, model.trainable_variables) / noise
    size = len(ggn)
    precision = ggn / temperature + delta * np.eye(size)
    assert_close(la.posterior_precision, precision)
    theta = flat(model.trainable_variables)
    log_lik = log_likelihood(model, x, y, likelihood, sigma, temperature)
    expected = laplace_evidence(log_lik, precision, np.full(size, delta), theta)
    assert_close(la.log_marginal_likelihood(), expected)
    assert_close(flat(la.posterior_variance), np.diag(np.linalg.inv(precision)))


def test_full_layerwise_and_per_weight_priors():
    model = mlp()
    x, y = data("classification")
    variables = model.trainable_variables
    ggn = dense_ggn(model, x, "classification", variables)
    theta = flat(variables)
    log_lik = log_likelihood(model, x, y, "classification")
    layerwise = [0.5, 2.0, 3.0]
    la = Laplace(model, "classification", structure="full", prior_precision=layerwise)
    la.fit((x, y))
    prior = per_weight([0.5, 0.5, 2.0, 2.0, 3.0, 3.0], variables)
    expected = laplace_evidence(log_lik, ggn + np.diag(prior), prior, theta)
    assert_close(la.log_marginal_likelihood(), expected)
    rng = np.random.default_rng(2)
    arrays = [rng.uniform(0.5, 2.0, size=tuple(v.shape)) for v in variables]
    la.prior_precision = arrays
    prior = flat(arrays)
    expected = laplace_evidence(log_lik, ggn + np.diag(prior), prior, theta)
    assert_close(la.log_marginal_likelihood(), expected)


def blr_problem(sigma=0.5, delta=2.0):
    """A Dense(1) model at the exact posterior mode of Bayesian linear regression."""
    rng = np.random.default_rng(0)
    x = rng.normal(size=(30, 3))
    y = (x @ np.array([1.0, -2.0, 0.5]) + 0.3 + sigma * rng.normal(size=30))[:, None]
    model = keras.Sequential([keras.Input((3,)), L.Dense(1)])
    design = np.hstack([x, np.ones((30, 1))])
    precision = design.T @ design / sigma**2 + delta * np.eye(4)
    mode = np.linalg.solve(precision, design.T @ y[:, 0] / sigma**2)
    model.set_weights([mode[:3, None], mode[3:]])
    return model, x, y, design, precision


def test_full_is_exact_on_bayesian_linear_regression():
    sigma, delta = 0.5, 2.0
    model, x, y, design, precision = blr_problem(sigma, delta)
    la = Laplace(
        model, "regression", structure="full", prior_precision=delta, sigma_noise=sigma
    ).fit((x, y))
    covariance = np.linalg.inv(precision)
    assert_close(la.posterior_precision, precision)
    assert_close(flat(la.posterior_variance), np.diag(covariance))
    evidence = multivariate_normal.logpdf(
        y[:, 0], np.zeros(len(y)), sigma**2 * np.eye(len(y)) + design @ design.T / delta
    )
    assert_close(la.log_marginal_likelihood(), evidence)
    x_test = np.random.default_rng(9).normal(size=(5, 3))
    test_design = np.hstack([x_test, np.ones((5, 1))])
    mean, variance = la.predict(x_test)
    assert_close(mean[:, 0], test_design @ flat(model.get_weights()))
    expected = np.einsum("np,pq,nq->n", test_design, covariance, test_design) + sigma**2
    assert_close(variance[:, 0], expected)
    posterior = la.posterior
    theta = flat(model.get_weights())
    point = theta + 0.1
    assert_close(posterior.log_prob(point), multivariate_normal.logpdf(point, theta, covariance))


def test_full_factor_follows_every_change_of_prior_noise_and_temperature():
    """The Cholesky factor reused by predict / variances / draws is refreshed whenever the
    prior precision, the noise or the temperature changes, and back again."""
    sigma, delta = 0.5, 2.0
    model, x, y, design, _ = blr_problem(sigma, delta)
    la = Laplace(
        model, "regression", structure="full", prior_precision=delta, sigma_noise=sigma
    ).fit((x, y))
    x_test = np.random.default_rng(9).normal(size=(5, 3))
    test_design = np.hstack([x_test, np.ones((5, 1))])
    for prior, noise, temperature in [(2.0, 0.5, 1.0), (7.0, 0.5, 1.0), (7.0, 0.9, 1.0),
                                      (7.0, 0.9, 0.3), (2.0, 0.5, 1.0)]:  # fmt: skip
        la.prior_precision, la.sigma_noise, la.temperature = prior, noise, temperature
        precision = design.T @ design / (noise**2 * temperature) + prior * np.eye(4)
        covariance = np.linalg.inv(precision)
        assert_close(flat(la.posterior_variance), np.diag(covariance))
        _, variance = la.predict(x_test, include_noise=False)
        expected = np.einsum("np,pq,nq->n", test_design, covariance, test_design)
        assert_close(variance[:, 0], expected)


# -- kron ------------------------------------------------------------------------------------


def dense_kron_precision(blocks, prior, temperature, noise=1.0):
    """``blockdiag(A (x) B, B_bias, diag(h)) / (noise T) + delta I`` with ``np.kron``."""
    dense = []
    for block, delta in zip(blocks, prior, strict=True):
        if isinstance(block, reducers.KroneckerBlock):
            matrix = np.kron(np.asarray(block.inputs), np.asarray(block.outputs))
        elif isinstance(block, reducers.DenseBlock):
            matrix = np.asarray(block.matrix)
        else:
            matrix = np.diag(np.ravel(block.diagonal))
        dense.append(matrix / (noise * temperature) + delta * np.eye(len(matrix)))
    return block_diagonal(dense)


@pytest.fixture(scope="module")
def kron_case(float64):
    model = mlp()
    x, y = data("classification")
    temperature, layerwise = 1.5, [0.4, 1.0, 2.5]
    la = Laplace(
        model,
        "classification",
        structure="kron",
        prior_precision=layerwise,
        temperature=temperature,
    ).fit((x, y), batch_size=5)
    blocks = reducers.fit_kron(model, (x, y), likelihood="classification").curvature
    prior = [0.4, 0.4, 1.0, 1.0, 2.5, 2.5]
    precision = dense_kron_precision(blocks, prior, temperature)
    return la, model, x, y, precision, per_weight(prior, model.trainable_variables)


def test_kron_precision_log_det_and_evidence_match_the_dense_kronecker_matrix(kron_case):
    la, model, x, y, precision, prior = kron_case
    assert_close(la.posterior_precision.to_dense(), precision)
    theta = flat(model.trainable_variables)
    log_lik = log_likelihood(model, x, y, "classification", temperature=la.temperature)
    assert_close(la.log_marginal_likelihood(), laplace_evidence(log_lik, precision, prior, theta))


def test_kron_variances_distribution_and_glm_match_the_dense_kronecker_matrix(kron_case):
    la, model, x, _, precision, _ = kron_case
    covariance = np.linalg.inv(precision)
    assert_close(flat(la.posterior_variance), np.diag(covariance))
    theta = flat(model.trainable_variables)
    point = theta + np.linspace(-0.2, 0.2, len(theta))
    assert_close(la.posterior.log_prob(point), multivariate_normal.logpdf(point, theta, covariance))
    _, jac = jacobian(model, x, model.trainable_variables)
    _, glm = la._glm(x, 5)
    assert_close(glm, np.einsum("ncp,pq,ndq->ncd", jac, covariance, jac))


def test_kron_sample_moments_match_the_dense_kronecker_matrix(kron_case):
    la, model, _, _, precision, _ = kron_case
    draws = np.concatenate(
        [np.reshape(np.asarray(d), (40_000, -1)) for d in la.sample(40_000, seed=3)], axis=1
    )
    covariance = np.linalg.inv(precision)
    assert np.abs(draws.mean(0) - flat(model.trainable_variables)).max() < 0.03
    assert np.abs(np.cov(draws.T) - covariance).max() < 0.05 * np.abs(covariance).max()
    flat_draws = la.posterior.sample(40_000, seed=4).numpy()
    assert np.abs(np.cov(flat_draws.T) - covariance).max() < 0.05 * np.abs(covariance).max()


def test_kron_regression_noise_scaling_and_empirical_fisher_power():
    """The curvature is stored at unit noise and divided by ``sigma^2`` (GGN) or
    ``sigma^4`` (empirical Fisher, whose gradients carry ``1 / sigma^2`` each)."""
    model = mlp(width=2)
    x, y = data("regression", width=2)
    sigma = 0.6
    for kind, power in (("ggn", 2), ("ef", 4)):
        la = Laplace(model, "regression", structure="kron", curvature=kind, sigma_noise=sigma).fit(
            (x, y)
        )
        blocks = reducers.fit_kron(model, (x, y), likelihood="regression", kind=kind).curvature
        precision = dense_kron_precision(blocks, [1.0] * 6, 1.0, sigma**power)
        assert_close(la.posterior_precision.to_dense(), precision)


# -- last layer ------------------------------------------------------------------------------


@pytest.mark.parametrize("structure", ["diag", "kron", "full"])
def test_last_layer_equals_all_weights_restricted_to_the_last_layer(structure):
    model = mlp()
    x, y = data("classification")
    everything = Laplace(model, "classification", structure=structure).fit((x, y))
    last = Laplace(model, "classification", structure=structure, subset="last_layer")
    last.fit((x, y))
    head = [model.get_layer("head").kernel, model.get_layer("head").bias]
    assert [v.path for v in last.variables] == [v.path for v in head]
    sizes = [int(np.prod(v.shape)) for v in model.trainable_variables]
    where = np.arange(sum(sizes))[-sum(sizes[-2:]) :]
    if structure != "full":  # block-diagonal: the last layer's marginals are unchanged
        assert_close(flat(last.posterior_variance), flat(everything.posterior_variance)[where])
    if structure == "full":  # the precision (not the covariance) restricts to a sub-block
        assert_close(
            last.posterior_precision,
            np.asarray(everything.posterior_precision)[np.ix_(where, where)],
        )
    elif structure == "kron":
        dense = everything.posterior_precision.to_dense().numpy()
        assert_close(last.posterior_precision.to_dense(), dense[np.ix_(where, where)])
    _, jac = jacobian(model, x, head)
    if structure == "diag":
        covariance = np.diag(flat(last.posterior_variance))
    else:
        precision = last.posterior_precision
        covariance = np.linalg.inv(np.asarray(getattr(precision, "to_dense", lambda: precision)()))
    _, glm = last._glm(x, 256)
    assert_close(glm, np.einsum("ncp,pq,ndq->ncd", jac, covariance, jac))


# -- tuning ------------------------------------------------------------------------------------


@pytest.mark.parametrize("structure", ["kron", "full"])
def test_marglik_tuning_ends_at_a_stationary_point_and_gridsearch_runs(structure):
    model = mlp()
    x, y = data("classification")
    la = Laplace(model, "classification", structure=structure).fit((x, y))
    la.optimize_prior_precision(prior_structure="layerwise")
    log_prior = tf.Variable(np.log(la.prior_precision))
    with tf.GradientTape() as tape:
        value = la.log_marginal_likelihood(tf.exp(log_prior))
    assert np.abs(tape.gradient(value, log_prior).numpy()).max() < 1e-5 * N
    la.optimize_prior_precision("gridsearch", val_data=(x, y), grid=[0.1, 1.0, 10.0])
    assert la.prior_precision in (0.1, 1.0, 10.0)


def test_full_hessian_clips_negative_eigenvalues():
    model = mlp()
    x, y = data("classification")
    delta = 0.5
    with warnings.catch_warnings(record=True):
        warnings.simplefilter("always")
        la = Laplace(
            model, "classification", structure="full", curvature="hessian", prior_precision=delta
        ).fit((x, y))
    eigenvalues = np.linalg.eigvalsh(np.asarray(la.posterior_precision))
    assert eigenvalues.min() >= delta - 1e-10
    assert np.isfinite(float(la.log_marginal_likelihood()))
