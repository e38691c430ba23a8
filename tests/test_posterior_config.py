"""Configuration and fitted state of ``laplace_tf.Laplace``: validated setters, a fit
record that refuses a changed configuration, structure-specific refusals, and the
per-example scaling of the marginal-likelihood objective."""

from __future__ import annotations

import warnings

import keras
import numpy as np
import pytest
import tensorflow as tf

from laplace_tf.posterior import FitRecord, Laplace

L = keras.layers


pytestmark = pytest.mark.usefixtures("float64")  # conftest.py: float64 layers


def mlp(width=2):
    keras.utils.set_random_seed(0)
    inputs = keras.Input((3,))
    hidden = L.Dense(4, activation="tanh", name="hidden")(inputs)
    return keras.Model(inputs, L.Dense(width, name="head")(hidden))


def regression_data(n=16):
    rng = np.random.default_rng(0)
    return rng.normal(size=(n, 3)), rng.normal(size=(n, 2))


@pytest.mark.parametrize("structure", ["diag", "kron", "full"])
def test_changing_the_curvature_after_fit_is_refused_until_refit(structure):
    """The issue's fault: ``la.curvature = "ef"`` after a regression fit changed the
    precision without refitting. Now every fitted quantity refuses, and a refit works."""
    data = regression_data()
    la = Laplace(mlp(), "regression", structure=structure).fit(data)
    la.curvature = "ef"
    uses = (
        lambda: la.posterior_precision,
        lambda: la.log_marginal_likelihood(),
        lambda: la.predict(data[0]),
        lambda: la.sample(2, seed=0),
        lambda: la.optimize_prior_precision(),
    )
    for use in uses:
        with pytest.raises(RuntimeError, match=r"fitted with curvature='ggn' \(now 'ef'\)"):
            use()
    ef = Laplace(mlp(), "regression", structure=structure, curvature="ef").fit(data)
    la.fit(data)
    assert la.record.curvature == "ef"
    np.testing.assert_allclose(
        np.asarray(la.log_marginal_likelihood()), np.asarray(ef.log_marginal_likelihood())
    )
    la.curvature = "ggn"  # back to a setting the record does not have: refused again
    with pytest.raises(RuntimeError, match="call fit"):
        _ = la.posterior_variance


def test_changing_structure_likelihood_or_subset_after_fit_is_refused():
    data = regression_data()
    la = Laplace(mlp(), "regression").fit(data)
    changes = (("structure", "kron"), ("subset", "last_layer"), ("likelihood", "classification"))
    for name, value in changes:
        original = getattr(la, name)
        setattr(la, name, value)
        with pytest.raises(RuntimeError, match=f"fitted with {name}="):
            la.log_marginal_likelihood()
        setattr(la, name, original)
        la.log_marginal_likelihood()


@pytest.mark.parametrize(
    ("name", "value", "message"),
    [
        ("temperature", -1.0, "temperature must be a positive"),
        ("temperature", float("nan"), "temperature must be a positive"),
        ("temperature", float("inf"), "temperature must be a positive"),
        ("sigma_noise", 0.0, "sigma_noise must be a positive"),
        ("prior_precision", -1.0, "positive"),
        ("prior_precision", [1.0], "one value per selected layer"),
        ("prior_mean", float("nan"), "finite"),
        (
            "prior_mean",
            [np.full((3, 4), np.inf), np.zeros(4), np.zeros((4, 2)), np.zeros(2)],
            "finite",
        ),
        ("curvature", "kfac", "valid kinds are"),
        ("structure", "lowrank", "valid values are diag, kron, full"),
        ("likelihood", "poisson", "valid names are"),
    ],
)
def test_setters_validate(name, value, message):
    la = Laplace(mlp(), "regression").fit(regression_data())
    before = la.log_marginal_likelihood()
    with pytest.raises(ValueError, match=message):
        setattr(la, name, value)
    assert float(la.log_marginal_likelihood()) == float(before)


def test_a_constant_prior_mean_is_shaped_like_the_weights_and_held_as_scalars():
    """A scalar prior mean is kept as one scalar per weight (a weight-sized copy of a
    constant doubled the memory a large model's posterior held) and broadcast where it
    is read: the public ``prior_mean`` and the marginal likelihood see weight-shaped
    values, equal to those of the same mean given as arrays."""
    data = regression_data()
    model = mlp()
    scalar = Laplace(model, "regression", prior_mean=0.25).fit(data)
    arrays = [np.full(v.shape, 0.25) for v in scalar.variables]
    explicit = Laplace(model, "regression", prior_mean=arrays).fit(data)
    assert all(m.shape == () for m in scalar._prior_mean)
    for m, v in zip(scalar.prior_mean, scalar.variables, strict=True):
        assert m.shape == v.shape and m.dtype == v.dtype
        np.testing.assert_array_equal(m.numpy(), np.full(v.shape, 0.25))
    assert float(scalar.log_marginal_likelihood()) == pytest.approx(
        float(explicit.log_marginal_likelihood()), rel=1e-12
    )
    assert float(scalar.log_marginal_likelihood()) != pytest.approx(
        float(Laplace(model, "regression").fit(data).log_marginal_likelihood()), rel=1e-6
    )


def test_fit_record_is_frozen_and_typed():
    la = Laplace(mlp(), "regression", structure="kron", subset=["head"]).fit(regression_data())
    record = la.record
    assert isinstance(record, FitRecord)
    assert (record.structure.name, record.curvature, record.likelihood, record.subset) == (
        "kron",
        "ggn",
        "regression",
        ("head",),
    )
    assert record.n_data == 16 and record.n_outputs == 2
    with pytest.raises(AttributeError):
        record.curvature = "ef"


def test_kron_refuses_a_per_weight_prior():
    model = mlp()
    arrays = [np.ones(v.shape) for v in model.trainable_variables]
    with pytest.raises(ValueError, match="per-weight.*structure='kron'"):
        Laplace(model, "regression", structure="kron", prior_precision=arrays)
    la = Laplace(model, "regression", structure="kron").fit(regression_data())
    with pytest.raises(ValueError, match="per-weight.*structure='kron'"):
        la.prior_precision = arrays
    with pytest.raises(ValueError, match="per-weight.*structure='kron'"):
        la.optimize_prior_precision(prior_structure="diag")
    diag = Laplace(model, "regression", prior_precision=arrays)
    with pytest.raises(ValueError, match="per-weight.*structure='kron'"):
        diag.structure = "kron"


def test_full_refuses_above_its_size_limit_naming_the_alternatives():
    model = mlp()
    with pytest.raises(ValueError, match=r"kron.*diag.*last_layer"):
        Laplace(model, "regression", structure="full", full_size_limit=10)
    la = Laplace(model, "regression", structure="full", subset="last_layer", full_size_limit=10)
    assert sum(int(np.prod(v.shape)) for v in la.variables) == 10
    with pytest.raises(ValueError, match="full_size_limit=10"):
        la.subset = "all"
    assert la.subset == "last_layer"


@pytest.mark.parametrize("structure", ["kron", "full"])
def test_nn_predictive_leaves_the_model_untouched_and_is_seeded(structure):
    model = mlp(width=3)
    rng = np.random.default_rng(1)
    x, y = rng.normal(size=(20, 3)), rng.integers(0, 3, 20)
    before = [w.copy() for w in model.get_weights()]
    la = Laplace(model, "classification", structure=structure).fit((x, y))
    first = la.predict(x, pred_type="nn", n_samples=5, seed=7)
    again = la.predict(x, pred_type="nn", n_samples=5, seed=7)
    np.testing.assert_array_equal(first.numpy(), again.numpy())
    np.testing.assert_allclose(tf.reduce_sum(first, -1).numpy(), 1.0, rtol=1e-12)
    for a, b in zip(model.get_weights(), before, strict=True):
        np.testing.assert_array_equal(a, b)
    for link in ("probit", "bridge", "mc"):
        probs = la.predict(x, link_approx=link, seed=0).numpy()
        assert probs.shape == (20, 3) and np.allclose(probs.sum(-1), 1.0)
    samples = la.predictive_samples(x, 4, pred_type="glm", seed=0)
    assert samples.shape == (4, 20, 3)


def test_marglik_objective_is_scaled_per_example():
    """On 200,000 examples the summed log evidence is ~10^5 with gradients to match; only
    the per-example scaling in ``tuning.py`` lets L-BFGS-B meet its tolerances at a
    stationary point. Without it, every start below ends with a (spurious)
    non-convergence warning, so removing that scaling makes this test fail."""
    rng = np.random.default_rng(0)
    n = 200_000
    x = rng.normal(size=(n, 3))
    y = (x @ np.array([1.0, -2.0, 0.5]) + 0.1 * rng.normal(size=n))[:, None]
    model = keras.Sequential([keras.Input((3,)), L.Dense(1)])
    model.set_weights([np.array([[1.0], [-2.0], [0.5]]), np.zeros(1)])
    for prior_precision, sigma_noise in ((1.0, 1.0), (1.0, 0.01), (1e-3, 1.0)):
        la = Laplace(
            model, "regression", prior_precision=prior_precision, sigma_noise=sigma_noise
        ).fit((x, y), batch_size=n)
        with warnings.catch_warnings():
            warnings.simplefilter("error", RuntimeWarning)
            la.optimize_prior_precision(optimize_sigma_noise=True)
        log_sigma = tf.Variable(np.log(la.sigma_noise))
        with tf.GradientTape() as tape:
            value = la.log_marginal_likelihood(sigma_noise=tf.exp(log_sigma)) / n
        assert abs(float(tape.gradient(value, log_sigma))) < 1e-6
        assert la.sigma_noise == pytest.approx(0.1, rel=0.01)


def test_a_likelihood_object_is_accepted():
    from laplace_tf.likelihoods import Classification, Likelihood

    class Smoothed(Classification):
        """A user's likelihood: label-smoothed cross-entropy (its own NLL)."""

        def nll(self, f, y):
            return 0.9 * super().nll(f, y) - 0.1 * tf.reduce_sum(tf.nn.log_softmax(f)) / 3

    model = mlp(width=3)
    rng = np.random.default_rng(2)
    x, y = rng.normal(size=(20, 3)), rng.integers(0, 3, 20)
    by_name = Laplace(model, "classification", structure="kron").fit((x, y))
    built_in = Laplace(model, Classification(), structure="kron").fit((x, y))
    np.testing.assert_allclose(
        np.asarray(built_in.log_marginal_likelihood()),
        np.asarray(by_name.log_marginal_likelihood()),
        rtol=1e-12,
    )
    smoothed = Laplace(model, Smoothed(), structure="kron").fit((x, y))
    assert smoothed.record.likelihood is smoothed.likelihood
    assert float(smoothed.log_likelihood()) != float(by_name.log_likelihood())
    assert smoothed.predict(x).shape == (20, 3)

    class Incomplete(Likelihood):
        name = "poisson"

    with pytest.raises(TypeError, match="Incomplete does not define nll, link, hessian_factor"):
        Laplace(model, Incomplete())


def test_the_model_and_the_selected_weights_are_read_only():
    """A posterior belongs to the model it was fitted on: neither can be swapped after fit
    (the weights change only through ``subset``, which the record then refuses)."""
    la = Laplace(mlp(), "regression").fit(regression_data())
    with pytest.raises(AttributeError):
        la.model = mlp()
    with pytest.raises(AttributeError):
        la.variables = la.variables[:2]
    la.variables.clear()  # a copy
    assert len(la.variables) == 4
    la.log_marginal_likelihood()
