"""The study behind the ``laplace-tf`` command: MAP against Laplace posteriors.

A study fits one :class:`~laplace_tf.Laplace` posterior per requested structure and subset
(``"diag:all"``, ``"kron:last_layer"``, ...) to a trained classifier, tunes each one's
scalar prior precision, and compares each predictive with the MAP network's
(``softmax(f)`` / ``sigmoid(f)``) on a test set, optionally a shifted test set, and an
out-of-distribution set (AUROC of the top-label confidence, test = positive). A
posterior the library refuses for its size (``structure="full"`` above
``full_size_limit`` weights) is reported as skipped, with the reason.
"""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass
from importlib import metadata
from typing import Any

import keras
import numpy as np
from scipy.special import expit, softmax

import laplace_tf
from laplace_tf import metrics
from laplace_tf.cli.data import InputError, StudyData
from laplace_tf.cli.progress import ProgressBar

#: Prior precisions tried by the grid search: four per decade, 1e-2 to 1e5.
PRIOR_GRID = np.logspace(-2, 5, 29)
STRUCTURES = ("diag", "kron", "full")
SUBSETS = ("all", "last_layer")
#: Every structure over every subset, the order of the comparison tables.
EVERY = tuple(f"{structure}:{subset}" for subset in SUBSETS for structure in STRUCTURES)
#: The posteriors compared by default: the diagonal over all weights and over the last
#: layer, and the last-layer Kronecker one (Laplace Redux's recommendation); the others
#: (``kron:all``, ``full``) are left out to keep the demo within a minute or two.
DEFAULT_POSTERIORS = ("diag:all", "diag:last_layer", "kron:last_layer")


@dataclass(frozen=True)
class Posterior:
    """One posterior of the comparison: a structure over a subset of the weights."""

    structure: str
    subset: str

    @property
    def name(self) -> str:
        """``"STRUCTURE:SUBSET"``, the key of the posterior in ``results.json``."""
        return f"{self.structure}:{self.subset}"

    @classmethod
    def parse(cls, text: str, default_subset: str = "all") -> Posterior:
        """``"kron:last_layer"``, or ``"kron"`` for ``"kron:DEFAULT_SUBSET"``."""
        structure, _, subset = text.partition(":")
        subset = subset or default_subset
        if structure not in STRUCTURES or subset not in SUBSETS:
            raise ValueError(
                f"expected STRUCTURE[:SUBSET] with STRUCTURE in {{{','.join(STRUCTURES)}}} and "
                f"SUBSET in {{{','.join(SUBSETS)}}}, or 'every'; got {text!r}"
            )
        return cls(structure, subset)


@dataclass(frozen=True)
class Settings:
    """How the posteriors are built and evaluated (see ``laplace-tf --help``)."""

    likelihood: str
    posteriors: tuple[Posterior, ...]
    curvature: str
    prior_tuning: str
    link: str
    batch_size: int
    seed: int
    full_size_limit: int = 20_000
    n_bins: int = 15


@dataclass
class StudyOutcome:
    """``results`` (the ``results.json`` content without ``config``), the tuning details of
    the first fitted posterior for ``config``, and the probabilities per set and method
    (``"MAP"`` and each fitted posterior's name)."""

    results: dict[str, Any]
    tuning: dict[str, Any]
    predictions: dict[str, dict[str, np.ndarray]]


def run_study(model: keras.Model, data: StudyData, settings: Settings) -> StudyOutcome:
    """Fit, tune and evaluate each posterior of ``settings`` on ``model``.

    ``results`` holds ``"map"`` and ``"laplace"`` (the first posterior fitted), their
    ``"ood_auroc"``, and ``"structures"``: one entry per posterior with its metrics,
    prior precision, number of weights and timings, or ``"skipped"`` and the reason.
    Raises ``ValueError`` from the library for data it refuses (e.g. softmax outputs).
    """
    sets = data.labelled_sets()
    predictions = {name: {"MAP": _map_probs(model, x, settings)} for name, (x, _) in sets.items()}
    ood = {"MAP": _map_probs(model, data.x_ood, settings)} if data.x_ood is not None else None
    structures: dict[str, dict[str, Any]] = {}
    tunings: dict[str, dict[str, Any]] = {}
    for posterior in settings.posteriors:
        entry, tuning, probs = _fit_and_evaluate(model, data, settings, posterior)
        structures[posterior.name] = entry
        if probs is None:
            continue
        tunings[posterior.name] = tuning
        for name in sets:
            predictions[name][posterior.name] = probs[name]
        if ood is not None:
            ood[posterior.name] = probs["ood"]
    fitted = [name for name in structures if "skipped" not in structures[name]]
    if not fitted:
        reasons = "; ".join(f"{name}: {entry['skipped']}" for name, entry in structures.items())
        raise InputError(f"no posterior could be fitted ({reasons})")
    first = fitted[0]

    def evaluate(method: str) -> dict[str, dict[str, float]]:
        return {
            name: metrics.evaluate(predictions[name][method], y, settings.n_bins)
            for name, (_, y) in sets.items()
        }

    results: dict[str, Any] = {"map": evaluate("MAP"), "laplace": evaluate(first)}
    for name in fitted:
        structures[name].update(evaluate(name))
    if ood is not None:
        aurocs = {m: metrics.ood_auroc(predictions["test"][m], ood[m]) for m in ood}
        results["ood_auroc"] = {"map": aurocs["MAP"], "laplace": aurocs[first]}
        for name in fitted:
            structures[name]["ood_auroc"] = aurocs[name]
    results["structures"] = structures
    return StudyOutcome(results, tunings[first], predictions)


def _fit_and_evaluate(
    model: keras.Model, data: StudyData, settings: Settings, posterior: Posterior
) -> tuple[dict[str, Any], dict[str, Any], dict[str, np.ndarray] | None]:
    """One posterior's entry in ``structures``, its tuning details and its probabilities
    per set (``None`` when the library refuses the posterior for its size)."""
    entry: dict[str, Any] = {"structure": posterior.structure, "subset": posterior.subset}
    try:
        la = laplace_tf.Laplace(
            model,
            settings.likelihood,
            structure=posterior.structure,
            subset=posterior.subset,
            curvature=settings.curvature,
            full_size_limit=settings.full_size_limit,
        )
    except ValueError as error:
        if "full_size_limit" not in str(error):
            raise
        size = _selected_weights(model, settings, posterior.subset)
        entry["weights"] = size
        entry["skipped"] = (
            f"{size:,} weights > full_size_limit {settings.full_size_limit:,}: the "
            f"{size:,} x {size:,} matrix is refused"
        )
        return entry, {}, None
    entry["weights"] = int(sum(v.shape.num_elements() for v in la.variables))
    start = time.perf_counter()
    with ProgressBar(f"Laplace fit ({posterior.name})", len(data.x_train)) as bar:
        la.fit(
            (data.x_train, data.y_train),
            progress=bar.update,
            batch_size=settings.batch_size,
            seed=settings.seed,
        )
    fitted = time.perf_counter()
    tuning = _tune_prior(la, data, settings, posterior.name)
    tuned = time.perf_counter()
    probs = {name: _laplace_probs(la, x, settings) for name, (x, _) in data.labelled_sets().items()}
    if data.x_ood is not None:
        probs["ood"] = _laplace_probs(la, data.x_ood, settings)
    entry["prior_precision"] = tuning["prior_precision"]
    entry["runtime_s"] = {
        "fit": fitted - start,
        "tune": tuned - fitted,
        "fit_and_tune": tuned - start,
        "predict": time.perf_counter() - tuned,
    }
    return entry, tuning, probs


def _selected_weights(model: keras.Model, settings: Settings, subset: str) -> int:
    """Number of weights ``subset`` selects (counted by a diagonal posterior, never fitted)."""
    la = laplace_tf.Laplace(model, settings.likelihood, structure="diag", subset=subset)
    return int(sum(v.shape.num_elements() for v in la.variables))


def _tune_prior(
    la: laplace_tf.Laplace, data: StudyData, settings: Settings, name: str
) -> dict[str, Any]:
    """Tune ``la``'s scalar prior precision; returns what ``config`` records about it."""
    if settings.prior_tuning == "marglik":
        with ProgressBar(f"Prior precision ({name}, marglik)", None):
            la.optimize_prior_precision("marglik")
        return {"prior_precision": float(la.prior_precision)}

    with ProgressBar(f"Prior precision ({name}, gridsearch)", len(PRIOR_GRID)) as bar:

        def validation_nll(probs: Any, y: Any) -> float:
            bar.advance()
            return metrics.nll(probs, y)

        la.optimize_prior_precision(
            "gridsearch",
            val_data=(data.x_val, data.y_val),
            grid=PRIOR_GRID,
            metric=validation_nll,
            link_approx=settings.link,
            seed=settings.seed,
        )
    best = float(la.prior_precision)
    if best in (PRIOR_GRID[0], PRIOR_GRID[-1]):
        end, effect = (
            ("largest", "close to the MAP's")
            if best == PRIOR_GRID[-1]
            else ("smallest", "possibly too uncertain")
        )
        print(
            f"laplace-tf: warning: {name}: the validation NLL is lowest at the {end} prior "
            f"precision tried ({best:g}); the Laplace predictive is {effect}",
            file=sys.stderr,
        )
    return {
        "prior_precision": best,
        "gridsearch_validation_nll": {
            "prior_precision": list(la.gridsearch_scores_),
            "nll": list(la.gridsearch_scores_.values()),
        },
    }


def _map_probs(model: keras.Model, x: np.ndarray, settings: Settings) -> np.ndarray:
    """MAP probabilities at ``x``: ``[N, C]``, or ``[N, 1]`` for binary."""
    logits = np.asarray(model.predict(x, batch_size=settings.batch_size, verbose=0), np.float64)
    return expit(logits) if settings.likelihood == "binary" else softmax(logits, axis=-1)


def _laplace_probs(la: laplace_tf.Laplace, x: np.ndarray, settings: Settings) -> np.ndarray:
    probs = la.predict(
        x, link_approx=settings.link, seed=settings.seed, batch_size=settings.batch_size
    )
    return np.asarray(probs, np.float64)


def versions(*extra: str) -> dict[str, str]:
    """Installed versions of the packages that produced a result, and of ``extra`` ones."""
    packages = ("laplace-tf", "tensorflow", "keras", "tensorflow-probability", "numpy", *extra)
    return {name: metadata.version(name) for name in packages}
