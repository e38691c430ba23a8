"""Metrics of predictive probabilities: accuracy, NLL, calibration, Brier score, OOD AUROC.

Pure numpy functions of probabilities ``[N, C]`` (rows summing to one) and integer labels
``[N]``. A binary predictive given as ``[N]`` or ``[N, 1]`` holds ``P(y = 1)`` and is read
as the two columns ``[1 - p, p]``. Numpy arrays and TensorFlow tensors are accepted.
Calibration follows Guo et al. (2017): equal-width bins ``(lo, hi]`` on the top-label
confidence, the first bin closed at 0.

Multi-label predictives (``C`` independent probabilities ``P(y_c = 1)`` per example,
``[N, C]`` rows that need not sum to one, with ``[N, C]`` 0 / 1 targets) have their own
``multilabel_*`` metrics and :func:`per_class_nll`; their calibration error is the
classwise ECE of Kull et al. (2019): the binary ECE of each class's ``P(y_c = 1)`` against
the frequency of ``y_c = 1`` in the same bins, averaged over the classes.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
from scipy.stats import rankdata

from laplace_tf._checks import positive_float, positive_int

METRICS = ("accuracy", "nll", "ece", "brier")
MULTILABEL_METRICS = ("accuracy", "nll", "ece", "brier")
OOD_SCORES = ("max_prob", "entropy")

_RANGE_TOLERANCE = 1e-6
_SUM_TOLERANCE = 1e-3


@dataclass(frozen=True, eq=False)
class ReliabilityCurve:
    """Per-bin statistics of a reliability diagram.

    Attributes
    ----------
    bin_edges : np.ndarray
        ``[n_bins + 1]`` equal-width edges from 0 to 1; bin ``b`` is
        ``(bin_edges[b], bin_edges[b + 1]]`` (the first one also holds 0).
    confidence : np.ndarray
        ``[n_bins]`` mean top-label confidence of the examples in each bin (NaN if empty).
    accuracy : np.ndarray
        ``[n_bins]`` fraction of correct top-label predictions in each bin (NaN if empty).
    counts : np.ndarray
        ``[n_bins]`` number of examples in each bin.
    """

    bin_edges: np.ndarray
    confidence: np.ndarray
    accuracy: np.ndarray
    counts: np.ndarray

    @property
    def ece(self) -> float:
        """Expected calibration error ``sum_b |B_b| / N |acc_b - conf_b|``."""
        filled = self.counts > 0
        weights = self.counts[filled] / self.counts.sum()
        return float(np.sum(weights * self._gaps(filled)))

    @property
    def mce(self) -> float:
        """Maximum calibration error ``max_b |acc_b - conf_b|`` over non-empty bins."""
        return float(np.max(self._gaps(self.counts > 0)))

    def _gaps(self, filled: np.ndarray) -> np.ndarray:
        return np.abs(self.accuracy[filled] - self.confidence[filled])


def accuracy(probs: Any, y: Any) -> float:
    """Fraction of examples whose most probable class is the label: ``mean[argmax p_n = y_n]``."""
    return _accuracy(*_checked(probs, y))


def nll(probs: Any, y: Any, eps: float = 1e-12) -> float:
    """Mean negative log-likelihood ``-1/N sum_n log max(p_n[y_n], eps)`` in nats."""
    eps = positive_float("eps", eps)
    return _nll(*_checked(probs, y), eps)


def brier_score(probs: Any, y: Any) -> float:
    """Multiclass Brier score ``1/N sum_n sum_c (p_nc - [y_n = c])^2``, in ``[0, 2]``.

    ``tfp.stats.brier_score`` returns ``sum_c p_nc^2 - 2 p_n[y_n]`` per example: this
    score minus one.
    """
    return _brier(*_checked(probs, y))


def expected_calibration_error(probs: Any, y: Any, n_bins: int = 15) -> float:
    """Expected calibration error ``sum_b |B_b| / N |acc_b - conf_b|`` over ``n_bins`` bins."""
    return reliability_curve(probs, y, n_bins).ece


def maximum_calibration_error(probs: Any, y: Any, n_bins: int = 15) -> float:
    """Maximum calibration error ``max_b |acc_b - conf_b|`` over the non-empty bins."""
    return reliability_curve(probs, y, n_bins).mce


def confidence(probs: Any) -> np.ndarray:
    """Top-label confidence ``max_c p_nc`` of each example, ``[N]``."""
    return np.max(_as_probs(probs), axis=1)


def predictive_entropy(probs: Any) -> np.ndarray:
    """Entropy ``-sum_c p_nc log p_nc`` (nats, ``0 log 0 = 0``) of each example, ``[N]``."""
    return _entropy(_as_probs(probs))


def ood_auroc(probs_in: Any, probs_out: Any, score: str = "max_prob") -> float:
    """AUROC of separating in-distribution (positive) from out-of-distribution examples.

    The score is the confidence (``"max_prob"``) or the negative predictive entropy
    (``"entropy"``): higher means more in-distribution. AUROC is the Mann-Whitney
    statistic ``P(s_in > s_out) + 1/2 P(s_in = s_out)``, from average ranks.
    """
    if score not in OOD_SCORES:
        raise ValueError(f"Unknown score {score!r}; valid scores are {', '.join(OOD_SCORES)}.")
    scores = []
    for name, probs in (("probs_in", probs_in), ("probs_out", probs_out)):
        probs = _as_probs(probs, name)
        scores.append(np.max(probs, axis=1) if score == "max_prob" else -_entropy(probs))
    n_in, n_out = len(scores[0]), len(scores[1])
    ranks = rankdata(np.concatenate(scores))
    return float((np.sum(ranks[:n_in]) - n_in * (n_in + 1) / 2) / (n_in * n_out))


def reliability_curve(probs: Any, y: Any, n_bins: int = 15) -> ReliabilityCurve:
    """Bin the top-label confidence into ``n_bins`` equal-width bins ``(lo, hi]``.

    Returns, per bin ``B_b``, the mean confidence ``conf_b``, the accuracy ``acc_b`` and
    the count ``|B_b|`` (see :class:`ReliabilityCurve`).
    """
    n_bins = positive_int("n_bins", n_bins)
    return _reliability(*_checked(probs, y), n_bins)


def evaluate(probs: Any, y: Any, n_bins: int = 15) -> dict[str, float]:
    """The metrics named in :data:`METRICS` as plain floats, keyed by name."""
    n_bins = positive_int("n_bins", n_bins)
    probs, y = _checked(probs, y)
    return {
        "accuracy": _accuracy(probs, y),
        "nll": _nll(probs, y, 1e-12),
        "ece": _reliability(probs, y, n_bins).ece,
        "brier": _brier(probs, y),
    }


def _accuracy(probs: np.ndarray, y: np.ndarray) -> float:
    return float(np.mean(np.argmax(probs, axis=1) == y))


def _nll(probs: np.ndarray, y: np.ndarray, eps: float) -> float:
    return float(-np.mean(np.log(np.maximum(_label_probs(probs, y), eps))))


def _brier(probs: np.ndarray, y: np.ndarray) -> float:
    label_probs = _label_probs(probs, y)
    return float(np.mean(np.sum(probs**2, axis=1) - label_probs**2 + (1.0 - label_probs) ** 2))


def _reliability(probs: np.ndarray, y: np.ndarray, n_bins: int) -> ReliabilityCurve:
    top = np.max(probs, axis=1)
    correct = (np.argmax(probs, axis=1) == y).astype(np.float64)
    edges = np.linspace(0.0, 1.0, n_bins + 1)
    bins = np.clip(np.searchsorted(edges, top, side="left") - 1, 0, n_bins - 1)
    counts = np.bincount(bins, minlength=n_bins)
    filled = counts > 0
    mean_confidence = np.full(n_bins, np.nan)
    mean_accuracy = np.full(n_bins, np.nan)
    mean_confidence[filled] = np.bincount(bins, top, n_bins)[filled] / counts[filled]
    mean_accuracy[filled] = np.bincount(bins, correct, n_bins)[filled] / counts[filled]
    for array in (edges, mean_confidence, mean_accuracy, counts):
        array.flags.writeable = False
    return ReliabilityCurve(edges, mean_confidence, mean_accuracy, counts)


# -- multi-label -----------------------------------------------------------------------------


def per_class_nll(probs: Any, y: Any, eps: float = 1e-12) -> np.ndarray:
    """``[C]``: each class's mean Bernoulli NLL
    ``-1/N sum_n [y_nc log p_nc + (1 - y_nc) log(1 - p_nc)]`` (probabilities clipped at ``eps``)."""
    eps = positive_float("eps", eps)
    return _per_class_nll(*_checked_multilabel(probs, y), eps)


def multilabel_nll(probs: Any, y: Any, eps: float = 1e-12) -> float:
    """Mean over examples of the Bernoulli NLL summed over the classes (the sum of
    :func:`per_class_nll`; ``Multilabel.predictive_nll``)."""
    return float(np.sum(per_class_nll(probs, y, eps)))


def multilabel_ece(probs: Any, y: Any, n_bins: int = 15) -> float:
    """Classwise ECE (Kull et al., 2019): ``1/C sum_c sum_b |B_cb| / N |freq_cb - conf_cb|``,
    with ``n_bins`` equal-width bins ``(lo, hi]`` on ``p_nc``, ``conf_cb`` the mean ``p_nc`` and
    ``freq_cb`` the fraction of ``y_nc = 1`` in bin ``b`` of class ``c``."""
    n_bins = positive_int("n_bins", n_bins)
    return _classwise_ece(*_checked_multilabel(probs, y), n_bins)


def evaluate_multilabel(probs: Any, y: Any, n_bins: int = 15) -> dict[str, float]:
    """The metrics named in :data:`MULTILABEL_METRICS`, keyed by name: ``accuracy`` the
    fraction of correct per-class decisions at 0.5 (one minus the Hamming loss), ``nll``
    :func:`multilabel_nll`, ``ece`` :func:`multilabel_ece`, ``brier``
    ``1/N sum_n sum_c (p_nc - y_nc)^2``."""
    n_bins = positive_int("n_bins", n_bins)
    probs, y = _checked_multilabel(probs, y)
    return {
        "accuracy": float(np.mean((probs > 0.5) == (y == 1))),
        "nll": float(np.sum(_per_class_nll(probs, y, 1e-12))),
        "ece": _classwise_ece(probs, y, n_bins),
        "brier": float(np.mean(np.sum((probs - y) ** 2, axis=1))),
    }


def _per_class_nll(probs: np.ndarray, y: np.ndarray, eps: float) -> np.ndarray:
    picked = np.where(y == 1, probs, 1.0 - probs)
    return -np.mean(np.log(np.maximum(picked, eps)), axis=0)


def _classwise_ece(probs: np.ndarray, y: np.ndarray, n_bins: int) -> float:
    edges = np.linspace(0.0, 1.0, n_bins + 1)
    gaps = []
    for p, positive in zip(probs.T, y.T, strict=True):
        bins = np.clip(np.searchsorted(edges, p, side="left") - 1, 0, n_bins - 1)
        counts = np.bincount(bins, minlength=n_bins)
        filled = counts > 0
        confidence = np.bincount(bins, p, n_bins)[filled] / counts[filled]
        frequency = np.bincount(bins, positive, n_bins)[filled] / counts[filled]
        gaps.append(np.sum(counts[filled] / len(p) * np.abs(frequency - confidence)))
    return float(np.mean(gaps))


# -- input checks ----------------------------------------------------------------------------


def _as_probs(probs: Any, name: str = "probs") -> np.ndarray:
    """Probabilities as a float64 ``[N, C]`` array (binary ``[N]`` / ``[N, 1]`` widened)."""
    probs = np.asarray(probs)
    if not (np.issubdtype(probs.dtype, np.floating) or np.issubdtype(probs.dtype, np.integer)):
        raise ValueError(f"{name} must hold real numbers, got dtype {probs.dtype}.")
    probs = probs.astype(np.float64)
    if probs.ndim == 1:
        probs = probs[:, None]
    if probs.ndim != 2:
        raise ValueError(f"{name} must have shape [N, C], [N, 1] or [N], got {probs.shape}.")
    if probs.shape[0] == 0:
        raise ValueError(f"{name} has no examples.")
    if not np.all(np.isfinite(probs)):
        raise ValueError(f"{name} contains non-finite values.")
    if np.any(probs < -_RANGE_TOLERANCE) or np.any(probs > 1.0 + _RANGE_TOLERANCE):
        raise ValueError(
            f"{name} must lie in [0, 1], got values in [{probs.min()}, {probs.max()}]."
        )
    probs = np.clip(probs, 0.0, 1.0)
    if probs.shape[1] == 1:
        return np.concatenate([1.0 - probs, probs], axis=1)
    sums = probs.sum(axis=1)
    bad = np.flatnonzero(np.abs(sums - 1.0) > _SUM_TOLERANCE)
    if bad.size:
        raise ValueError(
            f"{name} rows must sum to 1: row {bad[0]} sums to {sums[bad[0]]:.6g} "
            f"({bad.size} rows off by more than {_SUM_TOLERANCE})."
        )
    return probs


def _as_labels(y: Any, n_examples: int, n_classes: int, name: str = "y") -> np.ndarray:
    """Labels as an int64 ``[N]`` array of class indices in ``[0, n_classes)``."""
    y = np.asarray(y)
    if y.ndim == 2 and y.shape[1] == 1:
        y = y[:, 0]
    if y.ndim != 1:
        raise ValueError(f"{name} must have shape [N] or [N, 1], got {y.shape}.")
    if y.shape[0] != n_examples:
        raise ValueError(f"{name} has {y.shape[0]} labels but probs has {n_examples} rows.")
    if np.issubdtype(y.dtype, np.floating):
        if not np.all(np.isfinite(y)) or np.any(y != np.round(y)):
            raise ValueError(f"{name} must hold integer class indices, got non-integer values.")
    elif not (np.issubdtype(y.dtype, np.integer) or y.dtype == np.bool_):
        raise ValueError(f"{name} must hold integer class indices, got dtype {y.dtype}.")
    y = y.astype(np.int64)
    if np.any(y < 0) or np.any(y >= n_classes):
        raise ValueError(
            f"{name} must hold class indices in [0, {n_classes}), "
            f"got values in [{y.min()}, {y.max()}]."
        )
    return y


def _checked(probs: Any, y: Any) -> tuple[np.ndarray, np.ndarray]:
    probs = _as_probs(probs)
    return probs, _as_labels(y, *probs.shape)


def _label_probs(probs: np.ndarray, y: np.ndarray) -> np.ndarray:
    return probs[np.arange(len(y)), y]


def _entropy(probs: np.ndarray) -> np.ndarray:
    logs = np.log(np.where(probs > 0, probs, 1.0))
    return -np.sum(probs * logs, axis=1)


def _checked_multilabel(probs: Any, y: Any) -> tuple[np.ndarray, np.ndarray]:
    """Per-class probabilities and 0 / 1 targets as float64 ``[N, C]`` arrays (``[N]``
    read as one class); rows need not sum to one."""
    probs = np.asarray(probs)
    if not (np.issubdtype(probs.dtype, np.floating) or np.issubdtype(probs.dtype, np.integer)):
        raise ValueError(f"probs must hold real numbers, got dtype {probs.dtype}.")
    probs = probs.astype(np.float64)
    probs = probs[:, None] if probs.ndim == 1 else probs
    if probs.ndim != 2 or probs.shape[0] == 0:
        raise ValueError(f"probs must have shape [N, C] with N > 0, got {probs.shape}.")
    if not np.all(np.isfinite(probs)):
        raise ValueError("probs contains non-finite values.")
    if np.any(probs < -_RANGE_TOLERANCE) or np.any(probs > 1.0 + _RANGE_TOLERANCE):
        raise ValueError(f"probs must lie in [0, 1], got values in [{probs.min()}, {probs.max()}].")
    y = np.asarray(y)
    y = y.reshape(probs.shape) if y.size == probs.size and y.ndim <= 2 else y
    if y.shape != probs.shape:
        raise ValueError(f"y must have the shape of probs {probs.shape}, got {y.shape}.")
    if not np.all((y == 0) | (y == 1)):
        raise ValueError("y must hold multi-label targets 0 or 1.")
    return np.clip(probs, 0.0, 1.0), y.astype(np.float64)
