"""Tests of ``laplace_tf.plotting``: figure structure, plotted values, saving and errors.

Plotted values are read back from the matplotlib artists and compared with
``laplace_tf.metrics.reliability_curve`` and with ``mean +- k std`` directly.
"""

from __future__ import annotations

import builtins
import os
import subprocess
import sys
from pathlib import Path as FilePath

import numpy as np
import pytest

from laplace_tf import metrics, plotting

Figure = pytest.importorskip("matplotlib.figure").Figure
Path = pytest.importorskip("matplotlib.path").Path

N_BINS = 10


@pytest.fixture(scope="module")
def classification():
    rng = np.random.default_rng(0)
    logits = 2.5 * rng.normal(size=(300, 4))
    probs = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
    y = rng.integers(0, 4, size=300)
    softened = np.exp(logits / 3) / np.exp(logits / 3).sum(axis=1, keepdims=True)
    return {"MAP": probs, "Laplace": softened}, y


@pytest.fixture(scope="module")
def regression():
    rng = np.random.default_rng(1)
    x = rng.uniform(-3, 3, size=50)  # unsorted on purpose
    mean = np.sin(x)
    std = 0.1 + 0.05 * x**2
    return x, mean, std


def bar_heights(ax, label):
    (container,) = [c for c in ax.containers if c.get_label() == label]
    return np.array([patch.get_height() for patch in container.patches])


def band(ax, label):
    (collection,) = [c for c in ax.collections if c.get_label() == label]
    return collection.get_paths()[0]


# ---------------------------------------------------------------------------------------
# Reliability diagram
# ---------------------------------------------------------------------------------------


def test_reliability_diagram_layout(classification):
    predictions, y = classification
    fig = plotting.reliability_diagram(predictions, y, n_bins=N_BINS, title="Calibration")
    assert isinstance(fig, Figure)
    assert fig.canvas.manager is None  # not registered with pyplot
    assert len(fig.axes) == 4
    assert fig.get_suptitle() == "Calibration"
    single = plotting.reliability_diagram({"MAP": predictions["MAP"]}, y)
    assert len(single.axes) == 2


def test_reliability_diagram_values(classification):
    predictions, y = classification
    fig = plotting.reliability_diagram(predictions, y, n_bins=N_BINS)
    top, bottom = fig.axes[:2], fig.axes[2:]
    for column, (name, probs) in enumerate(predictions.items()):
        curve = metrics.reliability_curve(probs, y, N_BINS)
        filled = curve.counts > 0
        np.testing.assert_allclose(bar_heights(top[column], "Accuracy"), curve.accuracy[filled])
        gaps = bar_heights(top[column], "Gap")
        np.testing.assert_allclose(gaps, curve.confidence[filled] - curve.accuracy[filled])
        (counts,) = bottom[column].containers
        np.testing.assert_array_equal([p.get_height() for p in counts.patches], curve.counts)
        ece = metrics.expected_calibration_error(probs, y, N_BINS)
        assert top[column].get_title() == f"{name}  (ECE = {ece:.3f})"
        lines = {line.get_label(): line.get_xdata()[0] for line in bottom[column].lines}
        assert lines["Mean confidence"] == pytest.approx(metrics.confidence(probs).mean())
        assert lines["Accuracy"] == pytest.approx(metrics.accuracy(probs, y))


def test_reliability_diagram_accepts_binary(classification):
    _, y = classification
    p = np.linspace(0.01, 0.99, len(y))
    fig = plotting.reliability_diagram({"binary": p}, y % 2, n_bins=5)
    curve = metrics.reliability_curve(p, y % 2, 5)
    heights = bar_heights(fig.axes[0], "Accuracy")
    np.testing.assert_allclose(heights, curve.accuracy[curve.counts > 0])


def test_figures_save_to_png(classification, regression, tmp_path):
    predictions, y = classification
    paths = [tmp_path / "reliability.png", tmp_path / "bands.png"]
    plotting.reliability_diagram(predictions, y).savefig(paths[0])
    plotting.regression_bands(*regression).savefig(paths[1], dpi=50)
    for path in paths:
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize(
    ("predictions", "message"),
    [
        ({}, "predictions must be a non-empty mapping"),
        ([np.full((3, 2), 0.5)], "predictions must be a non-empty mapping"),
        ({"MAP": np.full((3, 2), 0.4)}, r"predictions\['MAP'\]: probs rows must sum to 1"),
        ({"MAP": np.full((2, 2), 0.5)}, r"predictions\['MAP'\]: y has 3 labels"),
    ],
)
def test_reliability_diagram_bad_inputs(predictions, message):
    with pytest.raises(ValueError, match=message):
        plotting.reliability_diagram(predictions, [0, 1, 1])


def test_reliability_diagram_bad_n_bins(classification):
    predictions, y = classification
    with pytest.raises(ValueError, match="n_bins must be a positive integer"):
        plotting.reliability_diagram(predictions, y, n_bins=0)


# ---------------------------------------------------------------------------------------
# Regression bands
# ---------------------------------------------------------------------------------------


def test_regression_bands_enclose_two_std(regression):
    x, mean, std = regression
    fig = plotting.regression_bands(x, mean[:, None], std, x_train=x[:10], y_train=mean[:10])
    (ax,) = fig.axes
    order = np.argsort(x)
    xs, upper, lower = x[order], (mean + 2 * std)[order], (mean - 2 * std)[order]
    path = band(ax, "±2σ")
    vertices = {tuple(v) for v in np.round(path.vertices, 12)}
    for curve in (upper, lower):
        assert {tuple(v) for v in np.round(np.c_[xs, curve], 12)} <= vertices
    inner, inner_mean, inner_std = xs[1:-1], mean[order][1:-1], std[order][1:-1]
    polygon = Path(path.vertices)
    for k in (-1.9, 1.9):
        assert polygon.contains_points(np.c_[inner, inner_mean + k * inner_std]).all()
    for k in (-2.1, 2.1):
        assert not polygon.contains_points(np.c_[inner, inner_mean + k * inner_std]).any()
    (line,) = [line for line in ax.lines if line.get_label() == "Laplace"]
    np.testing.assert_allclose(line.get_xdata(), xs)
    np.testing.assert_allclose(line.get_ydata(), mean[order])
    assert {c.get_label() for c in ax.collections} == {"±1σ", "±2σ", "Training data"}


def test_regression_bands_draws_on_given_axes(regression):
    fig = Figure()
    ax = fig.add_subplot()
    returned = plotting.regression_bands(*regression, ax=ax, levels=(3,), label="GLM")
    assert returned is fig
    assert {c.get_label() for c in ax.collections} == {"±3σ"}
    assert [line.get_label() for line in ax.lines] == ["GLM"]
    sub = Figure().subfigures(1, 2)[1]
    assert plotting.regression_bands(*regression, ax=sub.add_subplot()) is sub.figure


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"mean": np.zeros(5)}, "mean has 5 entries, expected 50"),
        ({"std": -np.ones(50)}, "std must be non-negative"),
        ({"x": np.zeros((50, 2))}, r"x must be a non-empty \[N\] or \[N, 1\] array"),
        ({"x": np.full(50, np.nan)}, "x contains non-finite values"),
        ({"x": ["a"] * 50}, "x must be numeric"),
        ({"x_train": np.zeros(3)}, "Pass both x_train and y_train"),
        ({"x_train": np.zeros(3), "y_train": np.zeros(4)}, "y_train has 4 entries"),
        ({"levels": ()}, "levels must be positive finite numbers"),
        ({"levels": (1, -2)}, "levels must be positive finite numbers"),
    ],
)
def test_regression_bands_bad_inputs(regression, kwargs, message):
    x, mean, std = regression
    arguments = {"x": x, "mean": mean, "std": std, **kwargs}
    with pytest.raises(ValueError, match=message):
        plotting.regression_bands(
            arguments.pop("x"), arguments.pop("mean"), arguments.pop("std"), **arguments
        )


# ---------------------------------------------------------------------------------------
# Optional dependency
# ---------------------------------------------------------------------------------------


def test_missing_matplotlib_via_sys_modules(monkeypatch, classification):
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)
    with pytest.raises(ImportError, match=r"needs matplotlib: pip install 'laplace-tf\[plot\]'"):
        plotting.reliability_diagram(*classification)


def test_missing_matplotlib_via_import(monkeypatch, regression):
    real_import = builtins.__import__

    def no_matplotlib(name, *args, **kwargs):
        if name == "matplotlib" or name.startswith("matplotlib."):
            raise ModuleNotFoundError(f"No module named {name!r}")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_matplotlib)
    with pytest.raises(ImportError, match=r"pip install 'laplace-tf\[plot\]'"):
        plotting.regression_bands(*regression)


def test_without_matplotlib_in_a_fresh_interpreter():
    # Keras imports matplotlib.pyplot itself when it is installed, so matplotlib is hidden
    # from the start: laplace_tf and laplace_tf.plotting still import, plotting is not
    # loaded by `import laplace_tf`, and only making a figure fails, with the hint.
    script = (
        "import sys\n"
        "sys.modules['matplotlib'] = None\n"
        "import laplace_tf\n"
        "assert 'laplace_tf.plotting' not in sys.modules\n"
        "from laplace_tf import plotting\n"
        "try:\n"
        "    plotting.regression_bands([0.0, 1.0], [0.0, 1.0], [0.1, 0.2])\n"
        "except ImportError as error:\n"
        "    print(error)\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", script],
        check=True,
        capture_output=True,
        text=True,
        cwd=FilePath(__file__).resolve().parents[1],
        env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"},
    )
    assert result.stdout.strip() == (
        "laplace_tf.plotting needs matplotlib: pip install 'laplace-tf[plot]'"
    )
