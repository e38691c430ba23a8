"""The output of the ``laplace-tf`` command: the comparison table, its summary over seeds,
``results.json`` and ``reliability.png``."""

from __future__ import annotations

import json
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from laplace_tf.cli.data import InputError

PROG = "laplace-tf"
METRICS = ("accuracy", "nll", "ece", "brier")
_SHORT = {"accuracy": "acc", "nll": "nll", "ece": "ece", "brier": "brier"}


def rows(results: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    """One row per method of a single run's ``results``: ``"MAP"`` first, then each posterior
    as in ``results["structures"]`` (metrics per set, ``ood_auroc``, ``prior_precision``,
    ``weights``, ``runtime_s``; or ``skipped``)."""
    table = {"MAP": dict(results["map"])}
    if "ood_auroc" in results:
        table["MAP"]["ood_auroc"] = results["ood_auroc"]["map"]
    table.update(results["structures"])
    return table


def summarize(runs: Sequence[Mapping[str, Any]]) -> dict[str, dict[str, Any]]:
    """The rows of several runs (one per seed) as ``{"mean", "std", "median", "n"}`` per
    number.

    ``std`` is the sample standard deviation (``ddof=1``) over the runs; texts (structure,
    subset, the reason of a skipped posterior) are taken from the first run.
    """
    tables = [rows(run) for run in runs]
    return {method: _merge([table[method] for table in tables]) for method in tables[0]}


def _merge(values: list[Any]) -> Any:
    first = values[0]
    if isinstance(first, Mapping):
        return {key: _merge([value[key] for value in values]) for key in first}
    if isinstance(first, bool) or not isinstance(first, int | float):
        return first
    array = np.asarray(values, np.float64)
    std = float(np.std(array, ddof=1)) if len(array) > 1 else 0.0
    return {
        "mean": float(np.mean(array)),
        "std": std,
        "median": float(np.median(array)),
        "n": len(array),
    }


def format_table(results: Mapping[str, Any]) -> str:
    """The methods of ``results`` (as in results.json: one run, or a ``summary`` over
    seeds) as a plain-text table, one line per method."""
    table = results["summary"] if "summary" in results else rows(results)
    config = results["config"]
    sets = [name for name in table["MAP"] if isinstance(table["MAP"][name], Mapping)]
    sets = [name for name in sets if "nll" in table["MAP"][name]]
    has_ood = "ood_auroc" in table["MAP"]
    names = ["method"] + [f"{_SHORT[m]}" for _ in sets for m in METRICS]
    names += ["AUROC"] * has_ood + ["prior", "weights", "fit s", "pred s"]
    lines = []
    for method, row in table.items():
        if "skipped" in row:
            lines.append([method, f"skipped: {row['skipped']}"])
            continue
        cells = [method] + [_cell(row[name][m]) for name in sets for m in METRICS]
        cells += [_cell(row["ood_auroc"])] * has_ood
        if method == "MAP":
            cells += ["-"] * 4
        else:
            runtime = row["runtime_s"]
            cells += [
                _cell(row["prior_precision"], "{:.3g}"),
                f"{_mean(row['weights']):,.0f}",
                _median(runtime["fit_and_tune"]),
                _median(runtime["predict"]),
            ]
        lines.append(cells)
    aligned = [names, *(cells for cells in lines if len(cells) == len(names))]
    widths = [max(len(cells[i]) for cells in aligned) for i in range(len(names))]
    widths[0] = max(widths[0], *(len(cells[0]) for cells in lines))

    def join(cells: list[str]) -> str:
        if len(cells) != len(names):  # a skipped posterior
            return f"{cells[0]:<{widths[0]}}  {cells[1]}"
        first = f"{cells[0]:<{widths[0]}}"
        return "  ".join(
            [first] + [f"{c:>{w}}" for c, w in zip(cells[1:], widths[1:], strict=True)]
        )

    group = " " * widths[0]
    for name in sets:
        span = sum(widths[1 + 4 * sets.index(name) + i] for i in range(4)) + 6
        group += "  " + f"{name:-^{span}}"
    out = [group.rstrip(), join(names), *(join(cells) for cells in lines)]
    seeds = config.get("seeds")
    if seeds:
        out.append(f"mean ± std over seeds {', '.join(map(str, seeds))} (seconds: the median)")
    out.append(
        f"Laplace posteriors STRUCTURE:SUBSET, prior precision by {config['prior_tuning']}, "
        f"{config['predictive']} {config['link']}, curvature {config['curvature']}"
    )
    out.append(
        ("AUROC: OOD AUROC of the top-label confidence; " if has_ood else "")
        + f"fit s = fit + prior tuning; {config['runtime_s']['total']:.1f} s in all"
    )
    return "\n".join(out)


def _cell(value: Any, spec: str = "{:.4f}") -> str:
    if isinstance(value, Mapping):
        if value["n"] > 1:
            return f"{spec.format(value['mean'])}±{spec.format(value['std'])}"
        value = value["mean"]
    return spec.format(value)


def _median(value: Any) -> str:
    """Seconds: one run's, or the median over seeds (timings on shared machines are noisy)."""
    return f"{value['median'] if isinstance(value, Mapping) else value:.2f}"


def _mean(value: Any) -> float:
    return value["mean"] if isinstance(value, Mapping) else value


def write(
    out: Path,
    results: Mapping[str, Any],
    predictions: Mapping[str, Any],
    labels: Any,
    *,
    plotted: str,
    n_bins: int,
    quiet: bool,
) -> int:
    """Write ``results.json`` and ``reliability.png`` (one column per method of
    ``predictions``, on the ``plotted`` set) to ``out`` and print the table."""
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise InputError(f"cannot create the output folder {out}: {error}") from error
    (out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    written = [out / "results.json"]
    seeds = results["config"].get("seeds")
    pooled = f" (pooled over seeds {', '.join(map(str, seeds))})" if seeds else ""
    try:
        from laplace_tf import plotting

        figure = plotting.reliability_diagram(
            predictions, labels, n_bins=n_bins, title=f"Reliability on the {plotted} set{pooled}"
        )
    except ImportError as error:
        print(f"{PROG}: warning: reliability.png not written: {error}", file=sys.stderr)
    else:
        figure.savefig(out / "reliability.png", dpi=100)
        written.append(out / "reliability.png")
    if not quiet:
        print(format_table(results))
        print("wrote " + ", ".join(str(path) for path in written))
    return 0
