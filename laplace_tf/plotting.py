"""Plots of predictive uncertainty: reliability diagrams and 1-D regression bands.

Needs matplotlib (``pip install 'laplace-tf[plot]'``), imported only when a plot is
made. Figures are built with ``matplotlib.figure.Figure``, not pyplot, so they work
headless and leave pyplot's global state alone: save them with ``fig.savefig(path)``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from laplace_tf.metrics import ReliabilityCurve, reliability_curve

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

_MISSING_MATPLOTLIB = "laplace_tf.plotting needs matplotlib: pip install 'laplace-tf[plot]'"


def reliability_diagram(
    predictions: Mapping[str, Any],
    y: Any,
    *,
    n_bins: int = 15,
    title: str | None = None,
) -> Figure:
    """Reliability diagrams of several predictives side by side, one column each.

    Top row: accuracy ``acc_b`` per confidence bin as bars, the diagonal
    ``acc = conf`` and the gap to the bin's mean confidence ``conf_b`` shaded, with
    ``ECE = sum_b |B_b| / N |acc_b - conf_b|`` in the title. Bottom row: the number of
    examples per bin, with the mean confidence and the accuracy as vertical lines.

    Parameters
    ----------
    predictions : mapping of str to array
        Probabilities ``[N, C]`` (or binary ``[N]`` / ``[N, 1]``) per method, e.g.
        ``{"MAP": probs_map, "Laplace": probs_la}``.
    y : array
        Integer labels ``[N]``.
    n_bins : int
        Number of equal-width confidence bins.
    title : str, optional
        Title of the whole figure.
    """
    figure_class = _figure_class()
    if not isinstance(predictions, Mapping) or not predictions:
        raise ValueError("predictions must be a non-empty mapping of name to probabilities.")
    curves = {}
    for name, probs in predictions.items():
        try:
            curves[name] = reliability_curve(probs, y, n_bins)
        except ValueError as error:
            raise ValueError(f"predictions[{name!r}]: {error}") from error

    fig = figure_class(figsize=(4.0 * len(curves), 5.5), layout="constrained")
    axes = fig.subplots(
        2, len(curves), squeeze=False, sharex=True, gridspec_kw={"height_ratios": [3, 1]}
    )
    for column, (name, curve) in enumerate(curves.items()):
        _reliability_panel(axes[0, column], curve, name, legend=column == 0)
        _confidence_histogram(axes[1, column], curve, legend=column == 0)
    axes[0, 0].set_ylabel("Accuracy")
    axes[1, 0].set_ylabel("Count")
    if title is not None:
        fig.suptitle(title)
    return fig


def regression_bands(
    x: Any,
    mean: Any,
    std: Any,
    *,
    x_train: Any = None,
    y_train: Any = None,
    ax: Axes | None = None,
    levels: Sequence[float] = (1, 2),
    label: str = "Laplace",
) -> Figure:
    """A 1-D regression predictive: the mean with shaded bands ``mean +- k std``.

    Parameters
    ----------
    x, mean, std : array
        Inputs, predictive mean and predictive standard deviation, each ``[N]`` or
        ``[N, 1]``; sorted by ``x`` before plotting.
    x_train, y_train : array, optional
        Training points to scatter (both or neither).
    ax : matplotlib.axes.Axes, optional
        Axes to draw on; a new figure is made if omitted.
    levels : sequence of float
        The multiples ``k`` of ``std``, one band each.
    label : str
        Legend label of the mean.

    Returns
    -------
    matplotlib.figure.Figure
        The figure holding the axes.
    """
    figure_class = _figure_class()
    x = _column("x", x)
    mean = _column("mean", mean, len(x))
    std = _column("std", std, len(x))
    if np.any(std < 0):
        raise ValueError("std must be non-negative.")
    levels = _levels(levels)
    if (x_train is None) != (y_train is None):
        raise ValueError("Pass both x_train and y_train, or neither.")
    if x_train is not None:
        x_train = _column("x_train", x_train)
        y_train = _column("y_train", y_train, len(x_train))

    if ax is None:
        fig = figure_class(layout="constrained")
        ax = fig.add_subplot()
    else:
        fig = ax.figure.figure
    order = np.argsort(x, kind="stable")
    x, mean, std = x[order], mean[order], std[order]
    for k in sorted(levels, reverse=True):
        ax.fill_between(
            x, mean - k * std, mean + k * std, alpha=0.2, color="C0", linewidth=0, label=f"±{k:g}σ"
        )
    ax.plot(x, mean, color="C0", label=label)
    if x_train is not None:
        ax.scatter(x_train, y_train, s=12, color="k", zorder=3, label="Training data")
    ax.set_xlabel("x")
    ax.set_ylabel("y")
    ax.legend()
    return fig


# -- helpers ---------------------------------------------------------------------------------


def _figure_class() -> type[Figure]:
    try:
        from matplotlib.figure import Figure
    except ImportError as error:
        raise ImportError(_MISSING_MATPLOTLIB) from error
    return Figure


def _reliability_panel(ax: Axes, curve: ReliabilityCurve, name: str, legend: bool) -> None:
    edges = curve.bin_edges
    centers = (edges[:-1] + edges[1:]) / 2
    width = edges[1] - edges[0]
    filled = curve.counts > 0
    accuracy, confidence = curve.accuracy[filled], curve.confidence[filled]
    ax.bar(
        centers[filled],
        accuracy,
        width=width,
        color="C0",
        edgecolor="black",
        linewidth=0.5,
        label="Accuracy",
    )
    ax.bar(
        centers[filled],
        confidence - accuracy,
        bottom=accuracy,
        width=width,
        color="C3",
        alpha=0.3,
        edgecolor="C3",
        hatch="//",
        label="Gap",
    )
    ax.plot([0, 1], [0, 1], linestyle="--", color="gray", label="Perfect calibration")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.set_title(f"{name}  (ECE = {curve.ece:.3f})")
    if legend:
        ax.legend(loc="upper left")


def _confidence_histogram(ax: Axes, curve: ReliabilityCurve, legend: bool) -> None:
    edges = curve.bin_edges
    filled = curve.counts > 0
    weights = curve.counts[filled] / curve.counts.sum()
    mean_confidence = float(np.sum(weights * curve.confidence[filled]))
    accuracy = float(np.sum(weights * curve.accuracy[filled]))
    ax.bar(
        edges[:-1],
        curve.counts,
        width=np.diff(edges),
        align="edge",
        color="C0",
        edgecolor="black",
        linewidth=0.5,
    )
    ax.axvline(mean_confidence, color="C3", linestyle="--", label="Mean confidence")
    ax.axvline(accuracy, color="black", linestyle="-", label="Accuracy")
    ax.set_xlabel("Confidence")
    if legend:
        ax.legend(loc="upper left", fontsize="small")


def _column(name: str, values: Any, length: int | None = None) -> np.ndarray:
    """``values`` as a finite float64 ``[N]`` array (``[N, 1]`` is flattened)."""
    array = _float_array(name, values)
    if array.ndim == 2 and array.shape[1] == 1:
        array = array[:, 0]
    if array.ndim != 1 or array.shape[0] == 0:
        raise ValueError(f"{name} must be a non-empty [N] or [N, 1] array, got {array.shape}.")
    if length is not None and array.shape[0] != length:
        raise ValueError(f"{name} has {array.shape[0]} entries, expected {length}.")
    if not np.all(np.isfinite(array)):
        raise ValueError(f"{name} contains non-finite values.")
    return array


def _levels(levels: Any) -> list[float]:
    values = _float_array("levels", levels).ravel()
    if values.size == 0 or not np.all(np.isfinite(values)) or np.any(values <= 0):
        raise ValueError(f"levels must be positive finite numbers, got {levels!r}.")
    return [float(v) for v in values]


def _float_array(name: str, values: Any) -> np.ndarray:
    try:
        return np.asarray(values, dtype=np.float64)
    except (TypeError, ValueError) as error:
        raise ValueError(f"{name} must be numeric: {error}") from error
