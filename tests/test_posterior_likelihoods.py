"""The likelihood protocol end to end: a user's ``Likelihood`` goes through ``Laplace`` (fit,
evidence, tuning, predict) exactly as a built-in one, and an object lacking the protocol
is refused with a message that names what is missing."""

from __future__ import annotations

import math

import keras
import numpy as np
import pytest
import tensorflow as tf

from laplace_tf import Laplace
from laplace_tf.likelihoods import Likelihood, Regression

L = keras.layers


pytestmark = pytest.mark.usefixtures("float64")  # conftest.py: float64 layers


class UserGaussian(Likelihood):
    """A Gaussian written by a user from the base class, at unit noise, sharing no code with
    the built-in ``Regression``: ``l = ||y - f||^2 / (2 sigma^2) + D log(sigma sqrt(2 pi))``."""

    name = "user_gaussian"
    noise_exponent = 2

    def nll(self, f, y):
        y = tf.reshape(tf.cast(y, f.dtype), tf.shape(f))
        half_pi = tf.constant(0.5 * math.log(2 * math.pi), f.dtype)
        return 0.5 * tf.reduce_sum((y - f) ** 2) + tf.cast(tf.size(f), f.dtype) * half_pi

    def hessian_factor(self, f):
        n, d = tf.shape(f)[0], tf.shape(f)[1]
        return tf.eye(d, batch_shape=[n], dtype=f.dtype)

    def loss_gradient(self, f, y):
        return f - tf.reshape(tf.cast(y, f.dtype), tf.shape(f))

    def sample(self, f, seed):
        return f + tf.random.stateless_normal(tf.shape(f), seed=seed, dtype=f.dtype)

    def link(self, f):
        return f

    def log_normaliser(self, count, sigma):
        sigma = tf.convert_to_tensor(sigma, tf.float64)
        return count * (tf.math.log(sigma) + 0.5 * math.log(2 * math.pi))

    def glm_predictive(self, mean, covariance, *, link_approx, n_samples, seed, sigma_noise):
        noise = 0.0 if sigma_noise is None else sigma_noise**2
        return mean, tf.linalg.diag_part(covariance) + noise

    def nn_predictive(self, outputs, sigma_noise):
        noise = 0.0 if sigma_noise is None else sigma_noise**2
        return tf.reduce_mean(outputs, 0), tf.math.reduce_variance(outputs, 0) + noise

    def predictive_nll(self, predictions, y):
        mean, variance = (np.asarray(p) for p in predictions)
        terms = 0.5 * np.log(2 * np.pi * variance) + 0.5 * (y - mean) ** 2 / variance
        return float(np.mean(np.sum(terms, axis=-1)))


def mlp():
    keras.utils.set_random_seed(0)
    inputs = keras.Input((3,))
    hidden = L.Dense(5, activation="tanh")(inputs)
    return keras.Model(inputs, L.Dense(2)(hidden))


def data(n=24):
    rng = np.random.default_rng(0)
    x = rng.normal(size=(n, 3))
    return x, np.tanh(x[:, :2]) + 0.3 * rng.normal(size=(n, 2))


def close(a, b, rtol=1e-10):
    for got, expected in zip(tf.nest.flatten(a), tf.nest.flatten(b), strict=True):
        np.testing.assert_allclose(np.asarray(got), np.asarray(expected), rtol=rtol, atol=1e-12)


#: Every structure with both noise powers (sigma^-2: ggn, ggn_mc; sigma^-4: ef).
CASES = [
    ("diag", "ggn"),
    ("diag", "ef"),
    ("kron", "ggn_mc"),
    ("kron", "ef"),
    ("full", "ggn"),
    ("full", "ef"),
]


@pytest.mark.parametrize(("structure", "curvature"), CASES)
def test_a_user_gaussian_equals_the_built_in_regression(structure, curvature):
    model, (x, y) = mlp(), data()
    settings = dict(structure=structure, curvature=curvature, sigma_noise=0.7, temperature=0.8)
    built_in = Laplace(model, "regression", **settings).fit((x, y), seed=3)
    user = Laplace(model, UserGaussian(), **settings).fit((x, y), seed=3)
    assert user.record.likelihood is user.likelihood
    close(user.log_likelihood(), built_in.log_likelihood())
    close(user.log_marginal_likelihood(), built_in.log_marginal_likelihood())
    close(
        user.log_marginal_likelihood(2.0, sigma_noise=0.3),
        built_in.log_marginal_likelihood(2.0, sigma_noise=0.3),
    )
    close(user.posterior_variance, built_in.posterior_variance)
    close(user.predict(x[:5]), built_in.predict(x[:5]))
    close(user.predict(x[:5], include_noise=False), built_in.predict(x[:5], include_noise=False))
    nn = dict(pred_type="nn", n_samples=4, seed=1)
    close(user.predict(x[:5], **nn), built_in.predict(x[:5], **nn))
    close(
        user.predictive_samples(x[:5], 3, pred_type="glm", seed=2),
        built_in.predictive_samples(x[:5], 3, pred_type="glm", seed=2),
    )
    for la in (user, built_in):
        la.optimize_prior_precision(prior_structure="layerwise", optimize_sigma_noise=True)
    # equal objectives to 1e-10; the optimiser's stopping point amplifies the last digits
    close(user.prior_precision, built_in.prior_precision, rtol=1e-6)
    assert user.sigma_noise == pytest.approx(built_in.sigma_noise, rel=1e-6)


def test_a_user_gaussian_grid_search_uses_its_predictive_nll():
    model, (x, y) = mlp(), data()
    user = Laplace(model, UserGaussian(), structure="kron", sigma_noise=0.5).fit((x, y))
    built_in = Laplace(model, "regression", structure="kron", sigma_noise=0.5).fit((x, y))
    for la in (user, built_in):
        la.optimize_prior_precision("gridsearch", val_data=(x, y), grid=[0.1, 1.0, 10.0])
    assert user.gridsearch_scores_ == pytest.approx(built_in.gridsearch_scores_, rel=1e-10)


def test_a_regression_object_brings_its_noise():
    model, (x, y) = mlp(), data()
    by_object = Laplace(model, Regression(0.5), structure="full").fit((x, y))
    by_name = Laplace(model, "regression", structure="full", sigma_noise=0.5).fit((x, y))
    assert by_object.sigma_noise == 0.5
    close(by_object.log_marginal_likelihood(), by_name.log_marginal_likelihood(), rtol=1e-12)
    close(by_object.posterior_variance, by_name.posterior_variance, rtol=1e-12)


def test_an_object_without_the_protocol_is_refused():
    model = mlp()

    class NotALikelihood:
        def nll(self, f, y):
            return tf.reduce_sum(f)

    with pytest.raises(TypeError, match="Likelihood subclass; got .*NotALikelihood"):
        Laplace(model, NotALikelihood())

    class NoGradient(UserGaussian):
        loss_gradient = Likelihood.loss_gradient

    la = Laplace(model, NoGradient())  # curvature="ggn" reads only the Hessian factor
    for kind in ("ef", "ggn_mc"):
        with pytest.raises(TypeError, match=f"does not define loss_gradient.*curvature='{kind}'"):
            la.curvature = kind
        with pytest.raises(TypeError, match="does not define loss_gradient"):
            Laplace(model, NoGradient(), curvature=kind)
    assert la.curvature == "ggn"


def test_a_user_classifier_with_default_rules_predicts_by_monte_carlo():
    """A likelihood that defines only the required methods gets the default rules: the
    Monte Carlo GLM predictive, the mean of its link over network draws, integer labels
    checked against its ``label_range``."""
    from laplace_tf.likelihoods import Classification

    class Minimal(Likelihood):
        name = "minimal"
        _softmax = Classification()

        def nll(self, f, y):
            return self._softmax.nll(f, y)

        def hessian_factor(self, f):
            return self._softmax.hessian_factor(f)

        def link(self, f):
            return tf.nn.softmax(f)

        def label_range(self, n_outputs):
            return (0, n_outputs)

    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input((3,)), L.Dense(4, activation="tanh"), L.Dense(3)])
    rng = np.random.default_rng(1)
    x, y = rng.normal(size=(20, 3)), rng.integers(0, 3, 20)
    user = Laplace(model, Minimal(), structure="kron").fit((x, y))
    built_in = Laplace(model, "classification", structure="kron").fit((x, y))
    close(user.log_marginal_likelihood(), built_in.log_marginal_likelihood())
    mc = dict(link_approx="mc", n_samples=50, seed=4)
    close(user.predict(x, **mc), built_in.predict(x, **mc))
    nn = dict(pred_type="nn", n_samples=3, seed=4)
    close(user.predict(x, **nn), built_in.predict(x, **nn))
    with pytest.raises(ValueError, match="link_approx='probit' is not defined for the minimal"):
        user.predict(x)
    message = r"targets must be integer labels in \[0, 3\) for the minimal"
    with pytest.raises(ValueError, match=message):
        user.fit((x, np.where(np.arange(20) == 7, 5, y)))
