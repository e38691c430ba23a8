"""The likelihoods of real tasks against dense float64 oracles: multi-label (independent
sigmoids), one-hot and soft labels for classification, the heteroscedastic Gaussian and the
user-written Poisson likelihood of ``examples/poisson_likelihood.py``.

Oracles: per-example Jacobians ``J_n`` from ``tf.GradientTape.jacobian`` (no pfor), the
output Hessians written out by hand (``diag(p (1 - p))``, ``diag(exp(-s), 1/2)``,
``diag(exp f)``), the Kronecker factors' definition ``A = 1/N sum a a^T``,
``B = sum_n S_n S_n^T`` for a last layer, Gauss-Hermite quadrature for ``E[sigmoid(g)]``,
and automatic differentiation for loss gradients.
"""

from __future__ import annotations

import importlib.util
import inspect
import math
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import keras
import numpy as np
import pytest
import tensorflow as tf
from oracles import assert_close, dense_jacobian, flat, softmax_hessian
from scipy.special import gammaln

from laplace_tf import Laplace, curvature, metrics
from laplace_tf.likelihoods import (
    BUILT_IN,
    LIKELIHOODS,
    Classification,
    Heteroscedastic,
    Multilabel,
    get_likelihood,
)

L = keras.layers
N = 12
DELTA = 0.7
ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "examples" / "poisson_likelihood.py"
PAGE = ROOT / "docs" / "likelihoods.md"


pytestmark = pytest.mark.usefixtures("float64")  # conftest.py: float64 layers


def mlp(width, seed=0):
    keras.utils.set_random_seed(seed)
    inputs = keras.Input((4,))
    hidden = L.Dense(5, activation="tanh", name="hidden")(inputs)
    return keras.Model(inputs, L.Dense(width, name="head")(hidden))


def inputs(seed=1):
    return np.random.default_rng(seed).normal(size=(N, 4))


def sigmoid(f):
    return 1 / (1 + np.exp(-f))


def softmax(f):
    e = np.exp(f - f.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def dense_ggn(jacobian, hessians):
    """``sum_n J_n^T Lambda_n J_n`` for Jacobians ``[N, C, P]`` and Hessians ``[N, C, C]``."""
    return np.einsum("ncp,ncd,ndq->pq", jacobian, hessians, jacobian)


def dense_ef(jacobian, gradients):
    """``sum_n J_n^T g_n g_n^T J_n`` for loss gradients ``g_n`` ``[N, C]``."""
    per_example = np.einsum("ncp,nc->np", jacobian, gradients)
    return per_example.T @ per_example


def dense(precision):
    """A posterior precision as an array: per weight (diag) flattened, kron made dense."""
    if isinstance(precision, list):
        return flat(precision)
    if isinstance(precision, tf.linalg.LinearOperator):
        return precision.to_dense().numpy()
    return np.asarray(precision)


def fit_all(model, likelihood, data, **kwargs):
    return {
        structure: Laplace(
            model, likelihood, structure=structure, prior_precision=DELTA, **kwargs
        ).fit(data, batch_size=5, seed=0)
        for structure in ("diag", "kron", "full")
    }


def multilabel_case(width=3):
    model = mlp(width)
    x = inputs()
    y = np.random.default_rng(2).integers(0, 2, size=(N, width)).astype("float64")
    return model, x, y


# -- names and the registry ------------------------------------------------------------------


def test_every_built_in_is_registered_by_its_name():
    assert sorted(LIKELIHOODS) == sorted(cls.name for cls in BUILT_IN)
    for cls in BUILT_IN:
        assert type(get_likelihood(cls.name)) is cls
    assert not Heteroscedastic.exact_output_hessian
    assert all(cls.exact_output_hessian for cls in BUILT_IN if cls is not Heteroscedastic)


# -- multi-label -----------------------------------------------------------------------------


def test_multilabel_nll_rows_and_gradient_are_the_summed_sigmoid_cross_entropies():
    f = tf.constant(np.random.default_rng(0).normal(size=(N, 3)) * 2)
    y = np.random.default_rng(1).integers(0, 2, size=(N, 3)).astype("float64")
    p = sigmoid(f.numpy())
    rows = -np.sum(y * np.log(p) + (1 - y) * np.log(1 - p), axis=-1)
    likelihood = Multilabel()
    assert_close(likelihood.nll_rows(f, y), rows)
    assert_close(likelihood.nll(f, y), rows.sum())
    with tf.GradientTape() as tape:
        tape.watch(f)
        total = likelihood.nll(f, y)
    assert_close(likelihood.loss_gradient(f, y), tape.gradient(total, f))
    factor = likelihood.hessian_factor(f).numpy()
    assert_close(
        factor @ factor.transpose(0, 2, 1), np.einsum("nc,cd->ncd", p * (1 - p), np.eye(3))
    )


def test_multilabel_ggn_equals_the_dense_reference_for_diag_and_full():
    model, x, y = multilabel_case()
    f, jacobian = dense_jacobian(model, x)
    p = sigmoid(f)
    ggn = dense_ggn(jacobian, np.einsum("nc,cd->ncd", p * (1 - p), np.eye(3)))
    assert_close(flat(curvature.diagonal(model, (x, y), likelihood="multilabel")), np.diag(ggn))
    fitted = fit_all(model, "multilabel", (x, y))
    assert_close(flat(fitted["diag"].posterior_precision), np.diag(ggn) + DELTA)
    assert_close(fitted["full"].posterior_precision, ggn + DELTA * np.eye(len(ggn)))
    loglik = np.sum(y * np.log(p) + (1 - y) * np.log(1 - p))
    for la in fitted.values():
        assert_close(la.log_likelihood(), loglik)


def test_multilabel_kron_last_layer_equals_the_kronecker_factors_definition():
    """For the head ``f = W^T a + b`` the cut cotangents are the columns of ``S_n``:
    ``A = 1/N sum_n a_n a_n^T``, ``B = sum_n diag(p_n (1 - p_n))``, kernel block ``A (x) B``,
    bias block ``B``."""
    model, x, y = multilabel_case()
    la = Laplace(
        model, "multilabel", structure="kron", subset="last_layer", prior_precision=DELTA
    ).fit((x, y))
    features = keras.Model(model.inputs, model.get_layer("hidden").output)(x).numpy()
    p = sigmoid(model(x).numpy())
    a = features.T @ features / N
    b = np.diag(np.sum(p * (1 - p), axis=0))
    kernel, bias = np.kron(a, b), b
    size = len(kernel) + len(bias)
    expected = np.zeros((size, size))
    expected[: len(kernel), : len(kernel)] = kernel
    expected[len(kernel) :, len(kernel) :] = bias
    assert_close(la.posterior_precision.to_dense(), expected + DELTA * np.eye(size))


def gauss_hermite_sigmoid(mean, variance, order=80):
    """``E[sigmoid(g)]`` for ``g ~ N(mean, variance)`` by Gauss-Hermite quadrature."""
    nodes, weights = np.polynomial.hermite.hermgauss(order)
    g = mean[..., None] + np.sqrt(2 * variance)[..., None] * nodes
    return np.sum(weights * sigmoid(g), axis=-1) / math.sqrt(math.pi)


def test_multilabel_probit_and_monte_carlo_predictives_against_direct_formulas():
    model, x, y = multilabel_case()
    la = Laplace(model, "multilabel", structure="full", prior_precision=DELTA).fit((x, y))
    f, jacobian = dense_jacobian(model, x)
    covariance = np.linalg.inv(np.asarray(la.posterior_precision))
    variance = np.einsum("ncp,pq,ncq->nc", jacobian, covariance, jacobian)
    probit = sigmoid(f / np.sqrt(1 + math.pi / 8 * variance))
    assert_close(la.predict(x, link_approx="probit"), probit)
    exact = gauss_hermite_sigmoid(f, variance)
    sampled = np.asarray(la.predict(x, link_approx="mc", n_samples=20_000, seed=0))
    assert np.abs(sampled - exact).max() < 0.01  # MC error about 0.5 / sqrt(20000) = 0.0035
    assert np.abs(probit - exact).max() < 0.02  # the probit approximation itself
    with pytest.raises(ValueError, match="independent sigmoid outputs: use probit or mc"):
        la.predict(x, link_approx="bridge")
    nn = np.asarray(la.predict(x, pred_type="nn", n_samples=200, seed=0))
    assert nn.shape == (N, 3) and np.all((nn > 0) & (nn < 1))


def test_multilabel_predictive_nll_equals_the_metric():
    rng = np.random.default_rng(3)
    probs = rng.uniform(0.05, 0.95, size=(N, 3))
    y = rng.integers(0, 2, size=(N, 3))
    expected = -np.mean(np.sum(y * np.log(probs) + (1 - y) * np.log(1 - probs), axis=1))
    assert math.isclose(Multilabel().predictive_nll(probs, y), expected, rel_tol=1e-12)
    assert math.isclose(metrics.multilabel_nll(probs, y), expected, rel_tol=1e-12)


def test_multilabel_saves_and_loads_by_its_name(tmp_path):
    model, x, y = multilabel_case()
    la = Laplace(model, "multilabel", structure="kron").fit((x, y))
    la.save(tmp_path / "la.npz")
    loaded = Laplace.load(tmp_path / "la.npz", model)
    assert type(loaded.likelihood_object) is Multilabel
    assert_close(loaded.predict(x), la.predict(x))


def test_multilabel_targets_are_checked():
    model, x, y = multilabel_case()
    y[4, 1] = 2.0
    where = r".*index 4"  # by row, not by entry
    with pytest.raises(ValueError, match="0 or 1" + where):
        Laplace(model, "multilabel").fit((x, y))
    with pytest.raises(ValueError, match=r"expected \[12, 3\]"):
        Laplace(model, "multilabel").fit((x, y[:, 0]))
    bad = Multilabel().invalid_targets(tf.constant([[0.0, 1.0], [0.5, 1.0], [1.0, -1.0]]), 2)
    np.testing.assert_array_equal(bad, [False, True, True])
    assert "0 or 1" in Multilabel().targets_description(2)


# -- one-hot and soft labels -----------------------------------------------------------------


@pytest.mark.parametrize("kind", ["ggn", "ef", "ggn_mc"])
def test_one_hot_labels_give_the_integer_labels_nll_and_curvature(kind):
    model, x = mlp(3), inputs()
    labels = np.random.default_rng(4).integers(0, 3, size=N)
    one_hot = np.eye(3)[labels]
    by_label = fit_all(model, "classification", (x, labels), curvature=kind)
    by_row = fit_all(model, "classification", (x, one_hot), curvature=kind)
    for structure, la in by_label.items():
        other = by_row[structure]
        assert_close(other.log_likelihood(), la.log_likelihood())
        assert_close(dense(other.posterior_precision), dense(la.posterior_precision))
    if kind == "ef":  # the empirical Fisher reads the labels: against its dense reference
        f, jacobian = dense_jacobian(model, x)
        ef = dense_ef(jacobian, softmax(f) - one_hot)
        assert_close(by_row["full"].posterior_precision, ef + DELTA * np.eye(len(ef)))


def soft_case():
    model, x = mlp(3), inputs()
    logits = np.random.default_rng(5).normal(size=(N, 3))
    return model, x, softmax(logits)


def test_soft_labels_nll_rows_and_gradient():
    _, _, soft = soft_case()
    f = tf.constant(np.random.default_rng(6).normal(size=(N, 3)))
    likelihood = Classification()
    p = softmax(f.numpy())
    assert_close(likelihood.nll_rows(f, soft), -np.sum(soft * np.log(p), axis=-1))
    assert_close(likelihood.loss_gradient(f, soft), p - soft)
    with tf.GradientTape() as tape:
        tape.watch(f)
        total = likelihood.nll(f, soft)
    assert_close(likelihood.loss_gradient(f, soft), tape.gradient(total, f))
    labels = likelihood.sample(f, tf.constant([0, 1]))
    assert labels.shape == (N,) and labels.dtype.is_integer
    assert_close(
        likelihood.loss_gradient(f, labels), p - np.eye(3)[labels.numpy()]
    )  # pseudo-labels of the Monte Carlo GGN are integer labels


def test_soft_labels_predictive_nll_is_the_cross_entropy():
    _, _, soft = soft_case()
    probs = softmax(np.random.default_rng(7).normal(size=(N, 3)))
    expected = -np.mean(np.sum(soft * np.log(probs), axis=1))
    assert math.isclose(Classification().predictive_nll(probs, soft), expected, rel_tol=1e-12)
    labels = np.argmax(soft, axis=1)
    assert math.isclose(
        Classification().predictive_nll(probs, np.eye(3)[labels]),
        Classification().predictive_nll(probs, labels),
        rel_tol=1e-12,
    )


def test_soft_labels_empirical_fisher_equals_the_dense_reference():
    model, x, soft = soft_case()
    f, jacobian = dense_jacobian(model, x)
    ef = dense_ef(jacobian, softmax(f) - soft)
    diagonal = curvature.diagonal(model, (x, soft), likelihood="classification", kind="ef")
    assert_close(flat(diagonal), np.diag(ef))
    fitted = fit_all(model, "classification", (x, soft), curvature="ef")
    assert_close(fitted["full"].posterior_precision, ef + DELTA * np.eye(len(ef)))
    ggn = dense_ggn(jacobian, softmax_hessian(f))
    la = Laplace(model, "classification", structure="full", prior_precision=DELTA).fit((x, soft))
    assert_close(la.posterior_precision, ggn + DELTA * np.eye(len(ggn)))
    assert_close(la.log_likelihood(), np.sum(soft * np.log(softmax(f))))


def test_classification_targets_forms_and_invalid_rows():
    likelihood = Classification()
    assert likelihood.target_shape_error((N,), N, 3) is None
    assert likelihood.target_shape_error((N, 1), N, 3) is None
    assert likelihood.target_shape_error((N, 3), N, 3) is None
    assert "[12, 3] (one-hot or soft labels" in likelihood.target_shape_error((N, 2), N, 3)
    assert likelihood.target_shape_error((N, 1), N, 1) is None  # one class: labels, not rows
    rows = tf.constant(
        [
            [0.2, 0.3, 0.5],
            [1.0, 0.0, 0.0],
            [0.5, 0.5, 0.5],
            [1.2, -0.2, 0.0],
            [0.3, 0.3, 0.4 + 3e-6],
        ]
    )
    np.testing.assert_array_equal(likelihood.invalid_targets(rows, 3), [0, 0, 1, 1, 0])
    labels = likelihood.invalid_targets(tf.constant([0.0, 2.0, 3.0, 1.5]), 3)
    np.testing.assert_array_equal(labels, [False, False, True, True])
    assert likelihood.label_range(3) == (0, 3)
    description = likelihood.targets_description(3)
    assert "integer labels in [0, 3)" in description and "summing to 1" in description
    model, x, soft = soft_case()
    soft[2] = [0.5, 0.5, 0.5]
    with pytest.raises(ValueError, match="index 2"):
        Laplace(model, "classification").fit((x, soft))


# -- heteroscedastic Gaussian ----------------------------------------------------------------


def heteroscedastic_case():
    model = mlp(4)  # D = 2 means, then 2 log-variances
    x = inputs()
    y = np.random.default_rng(8).normal(size=(N, 2))
    return model, x, y


def test_heteroscedastic_nll_gradient_and_fisher():
    f = tf.constant(np.random.default_rng(9).normal(size=(N, 4)))
    y = np.random.default_rng(10).normal(size=(N, 2))
    mean, log_variance = f.numpy()[:, :2], f.numpy()[:, 2:]
    variance = np.exp(log_variance)
    rows = np.sum(0.5 * np.log(2 * np.pi * variance) + 0.5 * (y - mean) ** 2 / variance, axis=1)
    likelihood = Heteroscedastic()
    assert_close(likelihood.nll_rows(f, y), rows)
    with tf.GradientTape() as tape:
        tape.watch(f)
        total = likelihood.nll(f, y)
    assert_close(likelihood.loss_gradient(f, y), tape.gradient(total, f))
    factor = likelihood.hessian_factor(f).numpy()
    fisher = np.concatenate([1 / variance, np.full((N, 2), 0.5)], axis=1)
    assert_close(factor @ factor.transpose(0, 2, 1), np.einsum("nc,cd->ncd", fisher, np.eye(4)))
    # the Fisher is E_y[g g^T] over y ~ N(mean, variance): by sampling
    draws = 40_000
    outer = np.zeros((N, 4, 4))
    for seed in range(4):
        sampled = likelihood.sample(tf.tile(f, [draws // 4, 1]), tf.constant([seed, 0]))
        g = likelihood.loss_gradient(tf.tile(f, [draws // 4, 1]), sampled).numpy()
        outer += np.einsum("snc,snd->ncd", *(2 * [g.reshape(draws // 4, N, 4)])) / draws
    expected = np.einsum("nc,cd->ncd", fisher, np.eye(4))
    assert np.abs(outer - expected).max() < 0.05 * np.abs(expected).max()


def test_heteroscedastic_ggn_and_predictive_equal_the_dense_reference():
    model, x, y = heteroscedastic_case()
    f, jacobian = dense_jacobian(model, x)
    fisher = np.concatenate([np.exp(-f[:, 2:]), np.full((N, 2), 0.5)], axis=1)
    ggn = dense_ggn(jacobian, np.einsum("nc,cd->ncd", fisher, np.eye(4)))
    diagonal = curvature.diagonal(model, (x, y), likelihood="heteroscedastic")
    assert_close(flat(diagonal), np.diag(ggn))
    fitted = fit_all(model, "heteroscedastic", (x, y))
    assert_close(flat(fitted["diag"].posterior_precision), np.diag(ggn) + DELTA)
    assert_close(fitted["full"].posterior_precision, ggn + DELTA * np.eye(len(ggn)))
    la = fitted["full"]
    covariance = np.linalg.inv(np.asarray(la.posterior_precision))
    functional = np.einsum("ncp,pq,ncq->nc", jacobian, covariance, jacobian)[:, :2]
    for link_approx in ("probit", "mc"):
        mean, variance = la.predict(x, link_approx=link_approx, seed=0)
        assert_close(mean, f[:, :2])
        assert_close(variance, functional + np.exp(f[:, 2:]))
    assert la.n_data == N


def test_heteroscedastic_nn_predictive_is_the_law_of_total_variance():
    outputs = np.random.default_rng(11).normal(size=(7, N, 4))
    mean, variance = Heteroscedastic().nn_predictive(tf.constant(outputs), None)
    assert_close(mean, outputs[..., :2].mean(0))
    assert_close(variance, outputs[..., :2].var(0) + np.exp(outputs[..., 2:]).mean(0))
    model, x, y = heteroscedastic_case()
    la = Laplace(model, "heteroscedastic", prior_precision=DELTA).fit((x, y))
    mean, variance = la.predict(x, pred_type="nn", n_samples=50, seed=0)
    assert np.asarray(mean).shape == (N, 2) and np.all(np.asarray(variance) > 0)


def test_heteroscedastic_target_shapes():
    likelihood = Heteroscedastic()
    assert likelihood.target_shape_error((N, 2), N, 4) is None
    assert likelihood.target_shape_error((N,), N, 2) is None
    assert likelihood.target_shape_error((N, 4), N, 4) == "[12, 2]"
    assert "even number of outputs" in likelihood.target_shape_error((N, 1), N, 3)
    model, x, y = heteroscedastic_case()
    with pytest.raises(ValueError, match=r"expected \[12, 2\]"):
        Laplace(model, "heteroscedastic").fit((x, np.concatenate([y, y], axis=1)))


# -- a user's likelihood: Poisson ------------------------------------------------------------


@pytest.fixture(scope="module")
def poisson():
    spec = importlib.util.spec_from_file_location("poisson_likelihood", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # for inspect.getsource
    spec.loader.exec_module(module)
    yield module
    del sys.modules[spec.name]


def test_the_poisson_example_matches_the_dense_reference(poisson):
    model = mlp(1)
    x, y = poisson.counts(N, seed=0)
    x = np.concatenate([x, x[:, :1] ** 2, x[:, 1:] * x[:, :1]], axis=1)  # four inputs
    likelihood = poisson.PoissonLikelihood()
    f, jacobian = dense_jacobian(model, x)
    ggn = dense_ggn(jacobian, np.exp(f)[:, :, None])
    assert_close(flat(curvature.diagonal(model, (x, y), likelihood=likelihood)), np.diag(ggn))
    assert_close(poisson.dense_ggn_diagonal(model, x), np.diag(ggn))
    la = Laplace(model, likelihood, structure="full", prior_precision=DELTA).fit((x, y))
    assert_close(la.posterior_precision, ggn + DELTA * np.eye(len(ggn)))
    rate = np.exp(f)
    assert_close(la.log_likelihood(), -np.sum(rate - y * f + gammaln(y + 1)))
    ef = Laplace(model, likelihood, structure="full", curvature="ef", prior_precision=DELTA)
    assert_close(
        ef.fit((x, y)).posterior_precision, dense_ef(jacobian, rate - y) + DELTA * np.eye(len(ggn))
    )
    assert poisson.gradient_matches_autodiff(likelihood, tf.constant(f), y)
    np.testing.assert_array_equal(
        likelihood.invalid_targets(tf.constant([[1.0], [0.5], [-1.0], [3.0]]), 1),
        [False, True, True, False],
    )


def page_blocks() -> list[str]:
    return re.findall(r"```python\n(.*?)```", PAGE.read_text(), re.DOTALL)


def test_the_docs_poisson_class_is_the_example_script_s(poisson):
    (block,) = [b for b in page_blocks() if b.startswith("class PoissonLikelihood")]
    source = textwrap.dedent(inspect.getsource(poisson.PoissonLikelihood))
    assert block.strip() == source.strip()


@pytest.mark.slow
def test_the_likelihoods_page_code_runs_as_one_script(tmp_path):
    """The python blocks of docs/likelihoods.md (multilabel, one-hot, heteroscedastic,
    Poisson), in order, run as one script."""
    script = tmp_path / "likelihoods_page.py"
    script.write_text("\n\n".join(page_blocks()))
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3")
    result = subprocess.run(
        [sys.executable, str(script)], capture_output=True, text=True, env=env, timeout=600
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "'ece'" in result.stdout and "kron" in result.stdout


def test_classification_tells_labels_from_rows_when_the_shapes_are_unknown():
    """A step traced with ``reduce_retracing`` may see targets of unknown rank: the form is
    then decided at run time, with the same results as from static shapes."""
    likelihood = Classification()
    unknown = (tf.TensorSpec([None, 3], tf.float64), tf.TensorSpec(None, tf.float64))
    rules = tf.function(
        lambda f, y: (likelihood.nll_rows(f, y), likelihood.loss_gradient(f, y)),
        input_signature=unknown,
    )
    f = tf.constant(np.random.default_rng(12).normal(size=(N, 3)))
    _, _, soft = soft_case()
    labels = np.random.default_rng(13).integers(0, 3, size=N).astype("float64")
    for y in (soft, labels, labels[:, None], np.eye(3)[labels.astype(int)]):
        traced = rules(f, tf.constant(y))
        eager = (likelihood.nll_rows(f, y), likelihood.loss_gradient(f, y))
        for got, expected in zip(traced, eager, strict=True):
            assert_close(got, expected)


@pytest.mark.parametrize("width", [2, 3, 10])
@pytest.mark.parametrize("scale", [0.1, 3.0, 60.0])
def test_softmax_hessian_factor_has_rank_c_minus_one(width, scale):
    """``S`` of the softmax has ``C - 1`` columns (one backward pass saved) and still
    ``S S^T = diag(p) - p p^T`` (the oracle written out), for flat to saturated logits;
    finite in float32 too."""
    rng = np.random.default_rng(width)
    f = tf.constant(rng.normal(size=(40, width)) * scale)
    factor = Classification().hessian_factor(f).numpy()
    assert factor.shape == (40, width, width - 1)
    expected = softmax_hessian(f.numpy())
    np.testing.assert_allclose(factor @ factor.transpose(0, 2, 1), expected, atol=1e-15)
    single = Classification().hessian_factor(tf.cast(f, tf.float32)).numpy()
    assert np.isfinite(single).all()
    np.testing.assert_allclose(single @ single.transpose(0, 2, 1), expected, atol=1e-6)
