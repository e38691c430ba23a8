"""Tests of ``laplace_tf.metrics`` against hand-computed values, scikit-learn and tfp.stats.

Oracles: small cases worked out by hand (in the comments), the extremes of perfect and
always-wrong predictions, ``sklearn.metrics.roc_auc_score``, and ``tfp.stats``'s
``expected_calibration_error`` and ``brier_score``.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest
import tensorflow as tf
import tensorflow_probability as tfp
from hypothesis import given, settings
from hypothesis import strategies as st
from sklearn.metrics import roc_auc_score

from laplace_tf import metrics

# Five examples, three classes, five bins with edges 0, .2, .4, .6, .8, 1:
#   row  probs               y  top  correct  bin
#   0    [.90, .05, .05]     0  .90  yes      (.8, 1]
#   1    [.70, .20, .10]     1  .70  no       (.6, .8]
#   2    [.15, .30, .55]     2  .55  yes      (.4, .6]
#   3    [.20, .50, .30]     0  .50  no       (.4, .6]
#   4    [.85, .10, .05]     0  .85  yes      (.8, 1]
PROBS = np.array(
    [
        [0.90, 0.05, 0.05],
        [0.70, 0.20, 0.10],
        [0.15, 0.30, 0.55],
        [0.20, 0.50, 0.30],
        [0.85, 0.10, 0.05],
    ]
)
LABELS = np.array([0, 1, 2, 0, 0])
N_BINS = 5
# bin (.4, .6]: acc 1/2, conf .525, gap .025, weight 2/5
# bin (.6, .8]: acc 0,   conf .70,  gap .70,  weight 1/5
# bin (.8, 1]:  acc 1,   conf .875, gap .125, weight 2/5
# ECE = .4 * .025 + .2 * .7 + .4 * .125 = .01 + .14 + .05 = .2;  MCE = .7
ECE = 0.2
MCE = 0.7
# Brier per row: .01 + .0025 + .0025 = .015;  .49 + .64 + .01 = 1.14;
# .0225 + .09 + .2025 = .315;  .64 + .25 + .09 = .98;  .0225 + .01 + .0025 = .035
# mean = 2.485 / 5
BRIER = 0.497
NLL = -(math.log(0.9) + math.log(0.2) + math.log(0.55) + math.log(0.2) + math.log(0.85)) / 5


def random_probs(rng: np.random.Generator, n: int, classes: int, scale: float = 2.0):
    logits = scale * rng.normal(size=(n, classes))
    probs = np.exp(logits - logits.max(axis=1, keepdims=True))
    return probs / probs.sum(axis=1, keepdims=True), rng.integers(0, classes, size=n)


# ---------------------------------------------------------------------------------------
# Hand-computed values and extremes
# ---------------------------------------------------------------------------------------


def test_hand_computed_case():
    assert metrics.accuracy(PROBS, LABELS) == pytest.approx(0.6)
    assert metrics.nll(PROBS, LABELS) == pytest.approx(NLL)
    assert metrics.brier_score(PROBS, LABELS) == pytest.approx(BRIER)
    assert metrics.expected_calibration_error(PROBS, LABELS, N_BINS) == pytest.approx(ECE)
    assert metrics.maximum_calibration_error(PROBS, LABELS, N_BINS) == pytest.approx(MCE)
    np.testing.assert_allclose(metrics.confidence(PROBS), [0.9, 0.7, 0.55, 0.5, 0.85])


def test_hand_computed_reliability_curve():
    curve = metrics.reliability_curve(PROBS, LABELS, N_BINS)
    np.testing.assert_allclose(curve.bin_edges, [0, 0.2, 0.4, 0.6, 0.8, 1.0])
    np.testing.assert_array_equal(curve.counts, [0, 0, 2, 1, 2])
    np.testing.assert_allclose(curve.accuracy, [np.nan, np.nan, 0.5, 0.0, 1.0])
    np.testing.assert_allclose(curve.confidence, [np.nan, np.nan, 0.525, 0.7, 0.875])
    assert curve.counts.dtype.kind == "i"
    assert curve.ece == pytest.approx(ECE)
    assert curve.mce == pytest.approx(MCE)


def test_reliability_curve_is_immutable():
    curve = metrics.reliability_curve(PROBS, LABELS, N_BINS)
    with pytest.raises(dataclasses.FrozenInstanceError):
        curve.counts = np.zeros(N_BINS)
    with pytest.raises(ValueError, match="read-only"):
        curve.accuracy[0] = 1.0


def test_bins_are_closed_on_the_right():
    # Binary confidences .75 and 1 with four bins: .75 falls in (.5, .75], 1 in (.75, 1].
    curve = metrics.reliability_curve(np.array([0.75, 1.0]), np.array([1, 1]), n_bins=4)
    np.testing.assert_array_equal(curve.counts, [0, 0, 1, 1])
    # Confidence exactly 1/2 (a binary tie, argmax picks class 0) lands in the first bin.
    curve = metrics.reliability_curve(np.array([[0.5, 0.5]]), np.array([0]), n_bins=2)
    np.testing.assert_array_equal(curve.counts, [1, 0])


def test_perfect_predictions():
    probs = np.eye(4)[[0, 1, 2, 3, 1]]
    y = np.array([0, 1, 2, 3, 1])
    assert metrics.evaluate(probs, y) == {"accuracy": 1.0, "nll": 0.0, "ece": 0.0, "brier": 0.0}
    assert metrics.maximum_calibration_error(probs, y) == 0.0
    np.testing.assert_array_equal(metrics.predictive_entropy(probs), 0.0)


def test_perfect_calibration_at_partial_confidence():
    # Ten binary predictions of P(y=1) = .8, of which eight are right: acc = conf = .8.
    probs = np.full(10, 0.8)
    y = np.array([1] * 8 + [0] * 2)
    assert metrics.expected_calibration_error(probs, y) == pytest.approx(0.0, abs=1e-12)
    assert metrics.maximum_calibration_error(probs, y) == pytest.approx(0.0, abs=1e-12)
    # Brier: .8 * (.2^2 + .2^2) + .2 * (.8^2 + .8^2) = .064 + .256 = .32
    assert metrics.brier_score(probs, y) == pytest.approx(0.32)


def test_always_confidently_wrong():
    probs = np.eye(3)[[0, 1, 2, 0]]
    y = np.array([1, 2, 0, 2])
    assert metrics.accuracy(probs, y) == 0.0
    assert metrics.expected_calibration_error(probs, y) == 1.0
    assert metrics.maximum_calibration_error(probs, y) == 1.0
    assert metrics.brier_score(probs, y) == 2.0
    assert metrics.nll(probs, y) == pytest.approx(-math.log(1e-12))
    assert metrics.nll(probs, y, eps=1e-3) == pytest.approx(-math.log(1e-3))


def test_entropy_and_confidence():
    uniform = np.full((2, 5), 0.2)
    np.testing.assert_allclose(metrics.predictive_entropy(uniform), math.log(5))
    np.testing.assert_allclose(metrics.confidence(uniform), 0.2)
    # Binary P(y=1) = .25: entropy -(.25 log .25 + .75 log .75), confidence .75.
    expected = -(0.25 * math.log(0.25) + 0.75 * math.log(0.75))
    np.testing.assert_allclose(metrics.predictive_entropy(np.array([0.25])), [expected])
    np.testing.assert_allclose(metrics.confidence(np.array([[0.25]])), [0.75])


# ---------------------------------------------------------------------------------------
# Input forms
# ---------------------------------------------------------------------------------------


def test_binary_column_equals_two_column_form():
    rng = np.random.default_rng(0)
    p = rng.uniform(size=40)
    y = rng.integers(0, 2, size=40)
    two_columns = np.stack([1 - p, p], axis=1)
    expected = metrics.evaluate(two_columns, y, n_bins=7)
    assert metrics.evaluate(p, y, n_bins=7) == pytest.approx(expected)
    assert metrics.evaluate(p[:, None], y[:, None], n_bins=7) == pytest.approx(expected)
    assert metrics.maximum_calibration_error(p, y, 7) == pytest.approx(
        metrics.maximum_calibration_error(two_columns, y, 7)
    )
    np.testing.assert_allclose(
        metrics.predictive_entropy(p), metrics.predictive_entropy(two_columns)
    )


def test_accepts_tensors_and_float_labels():
    expected = metrics.evaluate(PROBS, LABELS, n_bins=N_BINS)
    as_tensors = metrics.evaluate(tf.constant(PROBS, tf.float32), tf.constant(LABELS), N_BINS)
    assert as_tensors == pytest.approx(expected, abs=1e-6)
    assert metrics.evaluate(PROBS, LABELS.astype(np.float32), N_BINS) == pytest.approx(expected)


def test_evaluate_returns_plain_floats():
    result = metrics.evaluate(PROBS, LABELS, n_bins=N_BINS)
    assert tuple(result) == metrics.METRICS
    assert all(type(value) is float for value in result.values())
    assert result == pytest.approx(
        {
            "accuracy": metrics.accuracy(PROBS, LABELS),
            "nll": metrics.nll(PROBS, LABELS),
            "ece": metrics.expected_calibration_error(PROBS, LABELS, N_BINS),
            "brier": metrics.brier_score(PROBS, LABELS),
        }
    )


@settings(max_examples=40, deadline=None)
@given(
    seed=st.integers(0, 2**16),
    n=st.integers(1, 30),
    classes=st.integers(2, 5),
    n_bins=st.integers(1, 20),
)
def test_calibration_invariants(seed, n, classes, n_bins):
    probs, y = random_probs(np.random.default_rng(seed), n, classes)
    ece = metrics.expected_calibration_error(probs, y, n_bins)
    assert 0.0 <= ece <= metrics.maximum_calibration_error(probs, y, n_bins) + 1e-12 <= 1 + 1e-12
    # One bin: ECE = |accuracy - mean confidence|.
    one_bin = abs(metrics.accuracy(probs, y) - metrics.confidence(probs).mean())
    assert metrics.expected_calibration_error(probs, y, 1) == pytest.approx(one_bin)
    curve = metrics.reliability_curve(probs, y, n_bins)
    assert curve.counts.sum() == n
    assert 0.0 <= metrics.brier_score(probs, y) <= 2.0


# ---------------------------------------------------------------------------------------
# OOD AUROC
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("score", ["max_prob", "entropy"])
def test_ood_auroc_matches_sklearn(score):
    rng = np.random.default_rng(1)
    probs_in, _ = random_probs(rng, 60, 4, scale=3.0)
    probs_out, _ = random_probs(rng, 45, 4, scale=1.0)
    if score == "max_prob":
        scores = np.concatenate([probs_in.max(axis=1), probs_out.max(axis=1)])
    else:
        scores = -np.concatenate(
            [metrics.predictive_entropy(probs_in), metrics.predictive_entropy(probs_out)]
        )
    truth = np.r_[np.ones(60), np.zeros(45)]
    expected = roc_auc_score(truth, scores)
    assert metrics.ood_auroc(probs_in, probs_out, score=score) == pytest.approx(expected)


def test_ood_auroc_counts_ties_as_half():
    # In-confidences .9, .6; out .6, .5: pairs 1 + 1 + 1/2 + 1 = 3.5 of 4.
    probs_in = np.array([0.9, 0.6])
    probs_out = np.array([0.6, 0.5])
    assert metrics.ood_auroc(probs_in, probs_out) == pytest.approx(0.875)
    assert roc_auc_score([1, 1, 0, 0], [0.9, 0.6, 0.6, 0.5]) == pytest.approx(0.875)
    same = np.full((5, 3), 1 / 3)
    assert metrics.ood_auroc(same, same[:3]) == 0.5
    assert metrics.ood_auroc(same, same[:3], score="entropy") == 0.5


def test_ood_auroc_extremes():
    confident = np.eye(3)[[0, 1, 2]]
    uniform = np.full((4, 3), 1 / 3)
    assert metrics.ood_auroc(confident, uniform) == 1.0
    assert metrics.ood_auroc(uniform, confident, score="entropy") == 0.0


# ---------------------------------------------------------------------------------------
# Agreement with tfp.stats
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(("classes", "n_bins"), [(2, 10), (3, 15), (10, 7)])
def test_ece_matches_tfp_away_from_bin_edges(classes, n_bins):
    # tfp bins with tf.histogram_fixed_width_bins: [lo, hi) (top bin closed), ours are
    # (lo, hi]; tfp also works in float32 from softmax(logits). The definitions agree
    # for confidences that are not on an edge, so those are dropped.
    probs, y = random_probs(np.random.default_rng(classes), 3000, classes)
    top = probs.max(axis=1) * n_bins
    keep = np.abs(top - np.round(top)) > 1e-3
    probs, y = probs[keep], y[keep]
    expected = tfp.stats.expected_calibration_error(
        n_bins, logits=tf.constant(np.log(probs), tf.float32), labels_true=tf.constant(y)
    )
    actual = metrics.expected_calibration_error(probs, y, n_bins)
    assert actual == pytest.approx(float(expected), abs=1e-6)
    assert actual > 0.05


def test_ece_differs_from_tfp_only_on_edges():
    # Confidence exactly 1/2 (logits [0, 0]) with two bins: ours puts it in (0, 1/2] and
    # a second example (conf .9, wrong) in (1/2, 1]: ECE = .5 * .5 + .5 * .9 = .7.
    # tfp puts both in [1/2, 1]: acc 1/2, conf .7, ECE = .2.
    logits = np.array([[0.0, 0.0], [math.log(9.0), 0.0]])
    y = np.array([0, 1])
    probs = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
    assert metrics.expected_calibration_error(probs, y, n_bins=2) == pytest.approx(0.7)
    tfp_ece = tfp.stats.expected_calibration_error(
        2, logits=tf.constant(logits, tf.float32), labels_true=tf.constant(y)
    )
    assert float(tfp_ece) == pytest.approx(0.2, abs=1e-6)


def test_brier_is_tfp_brier_plus_one():
    # tfp.stats.brier_score gives sum_c p_c^2 - 2 p_y per example, i.e. ours minus one.
    probs, y = random_probs(np.random.default_rng(5), 200, 6)
    per_example = tfp.stats.brier_score(
        labels=tf.constant(y), logits=tf.constant(np.log(probs), tf.float64)
    )
    expected = float(tf.reduce_mean(per_example)) + 1.0
    assert metrics.brier_score(probs, y) == pytest.approx(expected, abs=1e-12)


# ---------------------------------------------------------------------------------------
# Validation
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("probs", "y", "message"),
    [
        (
            np.array([[0.5, 0.5], [0.7, 0.2]]),
            [0, 1],
            r"probs rows must sum to 1: row 1 sums to 0\.9",
        ),
        (np.array([[1.2, -0.2]]), [0], r"probs must lie in \[0, 1\]"),
        (np.array([[np.nan, 1.0]]), [0], "probs contains non-finite"),
        (np.ones((2, 2, 2)) / 2, [0, 1], r"probs must have shape \[N, C\]"),
        (np.zeros((0, 3)), [], "probs has no examples"),
        (np.array([["a", "b"]]), [0], "probs must hold real numbers"),
        (PROBS, LABELS[:4], "y has 4 labels but probs has 5 rows"),
        (PROBS, np.array([0, 1, 2, 3, 0]), r"y must hold class indices in \[0, 3\)"),
        (PROBS, np.array([0, 1, 2, -1, 0]), r"y must hold class indices in \[0, 3\)"),
        (PROBS, np.array([0, 1, 2, 0.5, 0]), "y must hold integer class indices"),
        (PROBS, np.array(list("abcde")), "y must hold integer class indices"),
        (PROBS, LABELS[:, None].repeat(2, axis=1), r"y must have shape \[N\] or \[N, 1\]"),
        (np.array([0.5, 1.5]), [0, 1], r"probs must lie in \[0, 1\]"),
    ],
)
def test_invalid_inputs(probs, y, message):
    with pytest.raises(ValueError, match=message):
        metrics.evaluate(probs, y)


@pytest.mark.parametrize("n_bins", [0, -3, 1.5, True, "10"])
def test_invalid_n_bins(n_bins):
    with pytest.raises(ValueError, match="n_bins must be a positive integer"):
        metrics.reliability_curve(PROBS, LABELS, n_bins)
    with pytest.raises(ValueError, match="n_bins must be a positive integer"):
        metrics.evaluate(PROBS, LABELS, n_bins)


def test_invalid_eps_score_and_ood_inputs():
    with pytest.raises(ValueError, match="eps must be a positive"):
        metrics.nll(PROBS, LABELS, eps=0.0)
    with pytest.raises(ValueError, match="Unknown score 'margin'"):
        metrics.ood_auroc(PROBS, PROBS, score="margin")
    with pytest.raises(ValueError, match="probs_out rows must sum to 1"):
        metrics.ood_auroc(PROBS, PROBS * 0.5)


# -- multi-label -----------------------------------------------------------------------------
# Four examples, two classes, two bins (0, .5], (.5, 1] on each class's P(y_c = 1):
#   class 0: p = .2 .4 .7 .9, y = 0 1 1 1: low bin conf .3 freq .5, high conf .8 freq 1:
#            ECE_0 = .5 * .2 + .5 * .2 = .2
#   class 1: p = .1 .6 .6 .3, y = 0 0 1 0: low bin conf .2 freq 0, high conf .6 freq .5:
#            ECE_1 = .5 * .2 + .5 * .1 = .15;  classwise ECE = .175
# Brier per example: .04 + .01, .36 + .36, .09 + .16, .01 + .09: mean 1.12 / 4 = .28
# Decisions at .5: class 0 3/4 correct, class 1 3/4 correct: accuracy .75
MULTI_PROBS = np.array([[0.2, 0.1], [0.4, 0.6], [0.7, 0.6], [0.9, 0.3]])
MULTI_Y = np.array([[0, 0], [1, 0], [1, 1], [1, 0]])
PER_CLASS_NLL = np.array(
    [
        -(math.log(0.8) + math.log(0.4) + math.log(0.7) + math.log(0.9)) / 4,
        -(math.log(0.9) + math.log(0.4) + math.log(0.6) + math.log(0.7)) / 4,
    ]
)


def test_multilabel_metrics_by_hand():
    np.testing.assert_allclose(metrics.per_class_nll(MULTI_PROBS, MULTI_Y), PER_CLASS_NLL)
    assert math.isclose(metrics.multilabel_nll(MULTI_PROBS, MULTI_Y), PER_CLASS_NLL.sum())
    assert math.isclose(metrics.multilabel_ece(MULTI_PROBS, MULTI_Y, n_bins=2), 0.175)
    scores = metrics.evaluate_multilabel(MULTI_PROBS, MULTI_Y, n_bins=2)
    assert set(scores) == set(metrics.MULTILABEL_METRICS)
    expected = {"accuracy": 0.75, "nll": PER_CLASS_NLL.sum(), "ece": 0.175, "brier": 0.28}
    for name, value in expected.items():
        assert math.isclose(scores[name], value, rel_tol=1e-12), name


def test_per_class_nll_is_each_class_binary_nll():
    rng = np.random.default_rng(0)
    probs = rng.uniform(0.01, 0.99, size=(50, 4))
    y = rng.integers(0, 2, size=(50, 4))
    per_class = metrics.per_class_nll(probs, y)
    for c in range(4):
        assert math.isclose(per_class[c], metrics.nll(probs[:, c], y[:, c]), rel_tol=1e-12)


def test_multilabel_ece_is_zero_when_each_bin_frequency_matches_its_confidence():
    probs = np.repeat([[0.25, 0.75]], 4, axis=0)
    y = np.array([[1, 1], [0, 1], [0, 1], [0, 0]])
    assert metrics.multilabel_ece(probs, y, n_bins=4) == 0.0


@pytest.mark.parametrize(
    ("probs", "y", "message"),
    [
        (MULTI_PROBS, MULTI_Y[:, :1], r"y must have the shape of probs \(4, 2\)"),
        (MULTI_PROBS, MULTI_Y * 2, "y must hold multi-label targets 0 or 1"),
        (MULTI_PROBS * 2, MULTI_Y, r"probs must lie in \[0, 1\]"),
        (np.zeros((0, 2)), np.zeros((0, 2)), r"probs must have shape \[N, C\] with N > 0"),
    ],
)
def test_multilabel_invalid_inputs(probs, y, message):
    with pytest.raises(ValueError, match=message):
        metrics.evaluate_multilabel(probs, y)
