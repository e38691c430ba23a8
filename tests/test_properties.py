"""Property-based tests (hypothesis) of the curvature engine and ``DiagonalLaplace``.

Random small MLPs (depth 1-2, widths 1-6, relu or tanh), random weights and data (1-20
examples, 2-4 classes) in float64, for the three likelihoods. The properties are exact
identities or inequalities that must hold for every model and data set:

1. GGN, Monte Carlo GGN and empirical-Fisher diagonals are non-negative and finite;
2. they are additive over disjoint data (the MC GGN batch by batch, see its test);
3. the temperature divides the curvature and the log-likelihood exactly;
4. the regression curvature scales as ``1 / sigma^2`` (``1 / sigma^4`` for the EF);
5. the posterior precision is at least the prior precision, for every prior structure.

A model is built once per architecture and its weights are reset from the drawn seed, so
that most examples reuse compiled curvature steps.
"""

from __future__ import annotations

import dataclasses
import math
import warnings
from dataclasses import dataclass

import keras
import numpy as np
import pytest
import tensorflow as tf
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from scipy.special import log_expit, log_softmax

from laplace_tf import DiagonalLaplace
from laplace_tf.curvature import diagonal

L = keras.layers
RTOL = 1e-10
LIKELIHOODS = ("classification", "binary", "regression")
ACTIVATIONS = ("relu", "tanh")
PSD_KINDS = ("ggn", "ggn_mc", "ef")
OUTPUTS = {
    "classification": st.integers(2, 4),
    "binary": st.just(1),
    "regression": st.integers(1, 3),
}
#: Positive scalars spanning several orders of magnitude (temperatures, noise, priors).
LOG_UNIFORM = st.floats(-3.0, 3.0).map(math.exp)

_MODELS: dict[tuple, keras.Model] = {}


def _settings(max_examples: int):
    return settings(
        max_examples=max_examples,
        deadline=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
    )


pytestmark = pytest.mark.usefixtures("float64")  # conftest.py: float64 layers


@pytest.fixture(scope="module", autouse=True)
def clear_models():
    yield
    _MODELS.clear()


# ---------------------------------------------------------------------------------------
# Random problems: an architecture, weights and data, all determined by a drawn spec
# ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Problem:
    """A model and a data set, reproducible from these fields alone."""

    likelihood: str
    in_dim: int
    widths: tuple[int, ...]
    activation: str
    outputs: int
    n: int
    weight_scale: float
    target_scale: float
    seed: int

    def model(self) -> keras.Model:
        """The architecture's shared model, with weights drawn from ``seed``."""
        key = (self.in_dim, self.widths, self.activation, self.outputs)
        if key not in _MODELS:
            inputs = keras.Input((self.in_dim,))
            hidden = inputs
            for width in self.widths:
                hidden = L.Dense(width, activation=self.activation)(hidden)
            _MODELS[key] = keras.Model(inputs, L.Dense(self.outputs)(hidden))
        model = _MODELS[key]
        rng = np.random.default_rng([self.seed, 0])
        weights = []
        for w in model.get_weights():
            scale = self.weight_scale / math.sqrt(w.shape[0]) if w.ndim == 2 else self.weight_scale
            weights.append(rng.normal(scale=scale, size=w.shape))
        model.set_weights(weights)
        return model

    def data(self, n: int | None = None, stream: int = 1) -> tuple[np.ndarray, np.ndarray]:
        """``n`` examples (default ``self.n``); another ``stream`` gives other examples."""
        n = self.n if n is None else n
        rng = np.random.default_rng([self.seed, stream])
        x = rng.normal(size=(n, self.in_dim))
        if self.likelihood == "classification":
            y = rng.integers(0, self.outputs, size=n)
        elif self.likelihood == "binary":
            y = rng.integers(0, 2, size=(n, 1)).astype(np.float64)
        else:
            y = self.target_scale * rng.normal(size=(n, self.outputs))
        return x, y


@st.composite
def problems(draw, likelihoods=LIKELIHOODS, activations=ACTIVATIONS, min_n=1):
    likelihood = draw(st.sampled_from(likelihoods))
    depth = draw(st.integers(1, 2))
    return Problem(
        likelihood=likelihood,
        in_dim=draw(st.integers(1, 4)),
        widths=tuple(draw(st.integers(1, 6)) for _ in range(depth)),
        activation=draw(st.sampled_from(activations)),
        outputs=draw(OUTPUTS[likelihood]),
        n=draw(st.integers(min_n, 20)),
        weight_scale=draw(st.sampled_from((0.3, 1.0, 3.0))),
        target_scale=draw(st.sampled_from((0.1, 1.0, 10.0))),
        seed=draw(st.integers(0, 2**32 - 1)),
    )


# ---------------------------------------------------------------------------------------
# Helpers and independent oracles
# ---------------------------------------------------------------------------------------


def numpy_list(tensors) -> list[np.ndarray]:
    return [np.asarray(t, dtype=np.float64) for t in tensors]


def assert_lists_close(actual, expected, rtol=RTOL, *, overall=False):
    """Entrywise ``rtol``, with an absolute floor of ``rtol`` times the tensor's largest entry
    (sums taken in another order differ by rounding relative to their terms), or with
    ``overall`` the largest entry of all the tensors: a saturated unit's cotangents go
    through ``1 - tanh^2`` of a ``tanh`` near 1, whose rounding is relative to the unit's
    scale before it, so a weight whose curvature is ~1e-10 of the others differs by
    ~3e-10 of itself between batchings (in float64; on the code of 2026-12-06 too)."""
    actual, expected = numpy_list(actual), numpy_list(expected)
    assert len(actual) == len(expected)
    largest = max((float(np.max(np.abs(e), initial=0.0)) for e in expected), default=0.0)
    for a, e in zip(actual, expected, strict=True):
        assert a.shape == e.shape
        scale = largest if overall else float(np.max(np.abs(e), initial=0.0))
        np.testing.assert_allclose(a, e, rtol=rtol, atol=rtol * scale)


def dense_regression_ggn(model, x, sigma: float) -> list[np.ndarray]:
    """``sum_n sum_d (d f_nd / d theta)^2 / sigma^2`` from a dense Jacobian (no pfor)."""
    variables = [v.value for v in model.trainable_variables]
    with tf.GradientTape(persistent=True) as tape:
        outputs = model(x, training=False)
    jacobians = tape.jacobian(outputs, variables, experimental_use_pfor=False)
    return [np.sum(np.square(j.numpy()), axis=(0, 1)) / sigma**2 for j in jacobians]


def log_likelihood(problem: Problem, model, x, y, sigma: float) -> float:
    """Summed log-likelihood of the data at the model's weights, written out in NumPy."""
    f = model(x, training=False).numpy()
    if problem.likelihood == "classification":
        return float(np.sum(log_softmax(f, axis=-1)[np.arange(len(y)), y]))
    if problem.likelihood == "binary":
        return float(np.sum(y * log_expit(f) + (1 - y) * log_expit(-f)))
    sse = float(np.sum(np.square(y - f)))
    return -sse / (2 * sigma**2) - f.size * math.log(sigma * math.sqrt(2 * math.pi))


# ---------------------------------------------------------------------------------------
# 1. Non-negative and finite
# ---------------------------------------------------------------------------------------


@_settings(max_examples=12)
@given(problem=problems(), mc_samples=st.integers(1, 3), sigma=LOG_UNIFORM, seed=st.integers(0, 99))
def test_psd_kinds_are_nonnegative_and_finite(problem, mc_samples, sigma, seed):
    """GGN, MC GGN and EF diagonals are sums of squares: finite and never negative."""
    model = problem.model()
    x, y = problem.data()
    for kind in PSD_KINDS:
        result = diagonal(
            model,
            (x, y),
            likelihood=problem.likelihood,
            kind=kind,
            mc_samples=mc_samples,
            seed=seed,
            sigma_noise=sigma,
        )
        assert len(result) == len(model.trainable_variables)
        for h, v in zip(numpy_list(result), model.trainable_variables, strict=True):
            assert h.shape == tuple(v.shape)
            assert np.all(np.isfinite(h)), kind
            assert np.all(h >= 0), (kind, h.min())
    # The exact GGN does not read the labels: other labels give the same diagonal.
    _, other_y = problem.data(stream=2)
    kwargs = {"likelihood": problem.likelihood, "kind": "ggn", "sigma_noise": sigma}
    assert_lists_close(diagonal(model, (x, other_y), **kwargs), diagonal(model, (x, y), **kwargs))


# ---------------------------------------------------------------------------------------
# 2. Additive over disjoint data
# ---------------------------------------------------------------------------------------


@_settings(max_examples=12)
@given(problem=problems(min_n=2), data=st.data())
def test_deterministic_kinds_are_additive_over_disjoint_splits(problem, data):
    """``h(D1 u D2) = h(D1) + h(D2)`` for any split and any batching (GGN and EF)."""
    model = problem.model()
    x, y = problem.data()
    split = data.draw(st.integers(1, problem.n - 1), label="split")
    batch_size = data.draw(st.integers(1, problem.n), label="batch_size")
    order = np.random.default_rng([problem.seed, 3]).permutation(problem.n)
    first, second = order[:split], order[split:]
    for kind in ("ggn", "ef"):

        def fit(xs, ys, batch_size=256, kind=kind):
            return diagonal(
                model, (xs, ys), likelihood=problem.likelihood, kind=kind, batch_size=batch_size
            )

        whole = fit(x, y)
        parts = [
            a + b for a, b in zip(fit(x[first], y[first]), fit(x[second], y[second]), strict=True)
        ]
        assert_lists_close(parts, whole, overall=True)
        assert_lists_close(fit(x, y, batch_size=batch_size), whole, overall=True)


@_settings(max_examples=12)
@given(
    problem=problems(),
    sizes=st.tuples(st.integers(1, 20), st.integers(1, 20)),
    mc_samples=st.integers(1, 3),
    seed=st.integers(0, 2**31 - 1),
)
def test_mc_ggn_is_additive_batch_by_batch(problem, sizes, mc_samples, seed):
    """The MC GGN of batch ``k`` uses pseudo-labels from the stateless seed ``(seed, k)``
    (``structured.fit_diagonal``), drawn for the batch as a whole. So ``D1 u D2`` fed as one
    batch draws other labels than ``D1`` and ``D2`` fed apart, and additivity holds only
    batch by batch: batch ``k``'s term depends on that batch, ``seed`` and ``k`` alone.

    With batches ``B0, B1`` and an unrelated ``B2``:
    ``h([B0, B1]) = h([B0]) + (h([B2, B1]) - h([B2]))``.
    """
    model = problem.model()
    b0 = problem.data(sizes[0], stream=1)
    b1 = problem.data(sizes[1], stream=2)
    b2 = problem.data(problem.n, stream=3)

    def fit(*batches):
        batches = [tuple(map(tf.constant, b)) for b in batches]
        kwargs = {"kind": "ggn_mc", "mc_samples": mc_samples, "seed": seed}
        return numpy_list(diagonal(model, batches, likelihood=problem.likelihood, **kwargs))

    whole, first, other, other_then_b1 = fit(b0, b1), fit(b0), fit(b2), fit(b2, b1)
    assert_lists_close(fit(b0, b1), whole, rtol=0)  # same seed, same result
    for w, h0, h2, h21 in zip(whole, first, other, other_then_b1, strict=True):
        # the subtraction cancels: measure the error against the terms involved
        scale = max(np.max(h0, initial=0.0), np.max(h21, initial=0.0))
        np.testing.assert_allclose(w, h0 + (h21 - h2), rtol=RTOL, atol=RTOL * scale)


# ---------------------------------------------------------------------------------------
# 3. Temperature
# ---------------------------------------------------------------------------------------


@_settings(max_examples=15)
@given(
    problem=problems(),
    kind=st.sampled_from(("ggn", "ef")),
    temperature=LOG_UNIFORM,
    prior=LOG_UNIFORM,
    sigma=LOG_UNIFORM,
)
def test_temperature_divides_curvature_and_log_likelihood(problem, kind, temperature, prior, sigma):
    model = problem.model()
    x, y = problem.data()
    common = {"curvature": kind, "prior_precision": prior, "sigma_noise": sigma}
    cold = DiagonalLaplace(model, problem.likelihood, temperature=1.0, **common).fit((x, y))
    tempered = DiagonalLaplace(model, problem.likelihood, temperature=temperature, **common)
    tempered.fit((x, y))
    # h from an independent call of the engine at the same noise
    h = numpy_list(
        diagonal(model, (x, y), likelihood=problem.likelihood, kind=kind, sigma_noise=sigma)
    )
    assert_lists_close(tempered.curvature_diagonal(), h)
    assert_lists_close(cold.curvature_diagonal(), h)
    # posterior_precision - prior == h / T, written without the cancelling subtraction
    assert_lists_close(tempered.posterior_precision, [hp / temperature + prior for hp in h])
    assert_lists_close(cold.posterior_precision, [hp + prior for hp in h])

    # log-likelihood: the data term is divided by T; the Gaussian normaliser
    # N D log(sigma sqrt(2 pi)) is not (docs/laplace.md, as in laplace-torch)
    reference = log_likelihood(problem, model, x, y, sigma)
    normaliser = 0.0
    if problem.likelihood == "regression":
        normaliser = y.size * math.log(sigma * math.sqrt(2 * math.pi))
    np.testing.assert_allclose(float(cold.log_likelihood()), reference, rtol=RTOL)
    np.testing.assert_allclose(
        float(tempered.log_likelihood()) + normaliser,
        (reference + normaliser) / temperature,
        rtol=RTOL,
        atol=RTOL * abs(normaliser),
    )


# ---------------------------------------------------------------------------------------
# 4. Regression noise
# ---------------------------------------------------------------------------------------


@_settings(max_examples=10)
@given(
    problem=problems(likelihoods=("regression",)),
    kind=st.sampled_from(("ggn", "ef")),
    fitted_sigma=LOG_UNIFORM,
    sigma=LOG_UNIFORM,
    seed=st.integers(0, 2**31 - 1),
)
def test_regression_curvature_scales_with_inverse_noise(problem, kind, fitted_sigma, sigma, seed):
    """``la.curvature_diagonal(sigma)`` (stored at unit noise, rescaled) equals a fresh
    engine call at ``sigma``; the GGN equals a dense-Jacobian ``J^T J / sigma^2``."""
    model = problem.model()
    x, y = problem.data()
    la = DiagonalLaplace(model, "regression", curvature=kind, sigma_noise=fitted_sigma)
    la.fit((x, y))

    def engine(noise, kind=kind, **kwargs):
        return numpy_list(
            diagonal(model, (x, y), likelihood="regression", kind=kind, sigma_noise=noise, **kwargs)
        )

    assert_lists_close(la.curvature_diagonal(sigma), engine(sigma))
    assert_lists_close(la.curvature_diagonal(), engine(fitted_sigma))
    power = 4 if kind == "ef" else 2
    assert_lists_close([h * sigma**power for h in engine(sigma)], engine(1.0))
    if kind == "ggn":
        assert_lists_close(engine(sigma), dense_regression_ggn(model, x, sigma))
    # MC GGN: pseudo-targets f + sigma * eps give gradients -eps / sigma: the same seed
    # scales as 1 / sigma^2 exactly
    mc = {"kind": "ggn_mc", "seed": seed, "mc_samples": 2}
    assert_lists_close([h * sigma**2 for h in engine(sigma, **mc)], engine(1.0, **mc))


# ---------------------------------------------------------------------------------------
# 5. Posterior precision >= prior precision
# ---------------------------------------------------------------------------------------


def draw_prior(structure: str, variables: list, rng: np.random.Generator):
    """A positive prior precision of ``structure`` for Dense-layer weights (kernel, bias)."""
    if structure == "scalar":
        return float(np.exp(rng.uniform(-4, 4)))
    if structure == "layerwise":
        return [float(np.exp(rng.uniform(-4, 4))) for _ in variables[::2]]
    return [np.exp(rng.uniform(-4, 4, size=tuple(v.shape))) for v in variables]


def expand_prior(structure: str, prior, variables: list) -> list[np.ndarray]:
    """The prior precision of every selected weight, written out independently of the
    library: every selected layer is a Dense layer owning a kernel and a bias."""
    if structure == "scalar":
        values = [prior] * len(variables)
    elif structure == "layerwise":
        values = [prior[i // 2] for i in range(len(variables))]
    else:
        values = prior
    return [
        np.broadcast_to(np.asarray(p, np.float64), tuple(v.shape))
        for p, v in zip(values, variables, strict=True)
    ]


def check_posterior_dominates_prior(la: DiagonalLaplace, structure: str, prior) -> None:
    deltas = expand_prior(structure, prior, la.variables)
    precisions = numpy_list(la.posterior_precision)
    variances, stddevs = numpy_list(la.posterior_variance), numpy_list(la.posterior_stddev)
    for precision, variance, stddev, delta in zip(
        precisions, variances, stddevs, deltas, strict=True
    ):
        assert precision.shape == delta.shape
        assert np.all(np.isfinite(precision))
        assert np.all(precision >= delta), (precision - delta).min()
        assert np.all(np.isfinite(stddev)) and np.all(stddev > 0)
        assert np.all(variance <= (1 + RTOL) / delta)


@_settings(max_examples=15)
@given(
    problem=problems(),
    kind=st.sampled_from((*PSD_KINDS, "hessian")),
    structure=st.sampled_from(("scalar", "layerwise", "diag")),
    subset=st.sampled_from(("all", "last_layer")),
    temperature=LOG_UNIFORM,
)
def test_posterior_precision_dominates_prior(problem, kind, structure, subset, temperature):
    """Holds for every PSD curvature, and for ``"hessian"`` on piecewise-linear (relu) nets,
    where the library computes it as the GGN; tanh nets are the next test."""
    if kind == "hessian":
        problem = dataclasses.replace(problem, activation="relu")
    model = problem.model()
    la = DiagonalLaplace(
        model, problem.likelihood, curvature=kind, subset=subset, temperature=temperature
    )
    prior = draw_prior(structure, la.variables, np.random.default_rng([problem.seed, 4]))
    la.prior_precision = prior
    la.fit(problem.data())
    check_posterior_dominates_prior(la, structure, prior)


@_settings(max_examples=3)
@example(
    problem=Problem("regression", 3, (4,), "tanh", 2, 7, 1.0, 10.0, 0),
    prior=1e-3,
    structure="scalar",
)
@given(
    problem=problems(activations=("tanh",)),
    prior=st.floats(-8.0, 0.0).map(math.exp),
    structure=st.sampled_from(("scalar", "layerwise", "diag")),
)
def test_hessian_on_tanh_nets_is_clipped_and_dominates_prior(problem, prior, structure):
    """The exact Hessian diagonal of a non-convex (tanh) loss can be negative (the explicit
    example has negative entries): ``fit`` sets those to 0 with a warning, so the posterior
    precision is still at least the prior's. (Before the clipping, ``h / T + delta`` went
    negative there and ``posterior_stddev`` was NaN.)"""
    model = problem.model()
    x, y = problem.data()
    raw = numpy_list(diagonal(model, (x, y), likelihood=problem.likelihood, kind="hessian"))
    la = DiagonalLaplace(model, problem.likelihood, curvature="hessian")
    value = {
        "scalar": prior,
        "layerwise": [prior] * (len(la.variables) // 2),
        "diag": [np.full(tuple(v.shape), prior) for v in la.variables],
    }[structure]
    la.prior_precision = value
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        la.fit((x, y))
    clipped = [w for w in caught if "negative entries" in str(w.message)]
    assert bool(clipped) == any(np.any(h < 0) for h in raw)
    assert_lists_close(la.curvature_diagonal(), [np.maximum(h, 0) for h in raw])
    check_posterior_dominates_prior(la, structure, value)
