"""Tests of the ``laplace-tf`` command: the demo's acceptance criteria on its default
configuration, ``calibrate`` on small saved models, clear errors, help and progress."""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import math
import subprocess
import sys
from pathlib import Path

import keras
import numpy as np
import pytest

from laplace_tf import cli
from laplace_tf._studies import ProgressBar

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
METRIC_KEYS = {"accuracy", "nll", "ece", "brier"}

DEMO_OPTIONS = (
    "--out",
    "--seed",
    "--epochs",
    "--weight-decay",
    "--rotation",
    "--noise",
    "--subset",
    "--curvature",
    "--prior-tuning",
    "--link",
    "--batch-size",
    "--quiet",
)
CALIBRATE_OPTIONS = (
    "MODEL.keras",
    "DATA.npz",
    "--likelihood",
    "--subset",
    "--curvature",
    "--prior-tuning",
    "--link",
    "--out",
    "--batch-size",
    "--seed",
    "--quiet",
)


class TtyStringIO(io.StringIO):
    """A text stream that claims to be a terminal."""

    def isatty(self) -> bool:
        return True


# ---------------------------------------------------------------------------------------
# demo
# ---------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    """One run of ``laplace-tf demo`` with the default configuration."""
    out = tmp_path_factory.mktemp("demo")
    stdout, stderr = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
        code = cli.main(["demo", "--out", str(out)])
    results = json.loads((out / "results.json").read_text())
    return {
        "code": code,
        "out": out,
        "results": results,
        "stdout": stdout.getvalue(),
        "stderr": stderr.getvalue(),
    }


def test_demo_succeeds_and_prints_the_table(demo):
    assert demo["code"] == 0
    table = demo["stdout"]
    for text in ("test", "shifted", "MAP", "Laplace", "OOD AUROC", "prior precision"):
        assert text in table
    assert "results.json" in table and "reliability.png" in table


def test_demo_results_schema(demo):
    results = demo["results"]
    assert set(results) == {"map", "laplace", "ood_auroc", "config"}
    for method in ("map", "laplace"):
        assert set(results[method]) == {"test", "shifted"}
        for metrics in results[method].values():
            assert set(metrics) == METRIC_KEYS
            assert all(isinstance(v, float) and math.isfinite(v) for v in metrics.values())
    assert set(results["ood_auroc"]) == {"map", "laplace"}
    assert all(0.0 <= v <= 1.0 for v in results["ood_auroc"].values())
    config = results["config"]
    assert config["seed"] == 0
    assert config["prior_tuning"] == "gridsearch"
    assert config["prior_precision"] > 0
    assert config["sizes"] == {"train": 1079, "val": 269, "test": 449, "shifted": 449, "ood": 449}
    assert config["model"]["weight_decay"] == 1e-5 and config["model"]["epochs"] == 60
    assert config["shift"] == {"rotation_degrees": 30.0, "noise_std": 0.2}
    assert {"laplace-tf", "tensorflow", "keras", "scikit-learn"} <= set(config["versions"])


def test_demo_acceptance_on_default_configuration(demo):
    """Laplace is better calibrated under shift, and no worse in distribution."""
    map_, laplace = demo["results"]["map"], demo["results"]["laplace"]
    assert laplace["shifted"]["nll"] < map_["shifted"]["nll"]
    assert laplace["shifted"]["ece"] < map_["shifted"]["ece"]
    assert abs(laplace["test"]["accuracy"] - map_["test"]["accuracy"]) <= 0.01
    assert laplace["test"]["nll"] <= map_["test"]["nll"] + 0.02


def test_demo_runtime(demo):
    assert demo["results"]["config"]["runtime_s"]["total"] < 60


def test_demo_writes_a_png(demo):
    assert (demo["out"] / "reliability.png").read_bytes()[:8] == PNG_SIGNATURE


def test_demo_progress_is_silent_when_not_a_tty(demo):
    assert demo["stderr"] == ""


def test_demo_quiet_and_other_options(tmp_path, capsys):
    code = cli.main(
        ["demo", "--out", str(tmp_path), "--epochs", "2", "--subset", "last_layer"]
        + ["--prior-tuning", "marglik", "--rotation", "0", "--noise", "0.1", "--quiet"]
    )
    assert code == 0
    assert capsys.readouterr().out == ""
    config = json.loads((tmp_path / "results.json").read_text())["config"]
    assert config["subset"] == "last_layer" and config["prior_tuning"] == "marglik"
    assert config["model"]["epochs"] == 2 and "gridsearch_validation_nll" not in config


# ---------------------------------------------------------------------------------------
# calibrate
# ---------------------------------------------------------------------------------------


def _blobs(rng, n, n_classes=3):
    y = rng.integers(0, n_classes, n)
    centers = np.eye(n_classes, 4) * 3.0
    return (centers[y] + rng.standard_normal((n, 4))).astype("float32"), y


def _save_model(path: Path, n_outputs: int, *, activation=None, train_on=None) -> Path:
    keras.utils.set_random_seed(0)
    model = keras.Sequential(
        [
            keras.Input((4,)),
            keras.layers.Dense(8, activation="relu"),
            keras.layers.Dense(n_outputs, activation=activation),
        ]
    )
    if train_on is not None:
        model.compile(
            keras.optimizers.Adam(0.02),
            keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        )
        model.fit(*train_on, epochs=30, verbose=0)
    model.save(path)
    return path


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """A small 3-class model.keras, its data.npz with every optional set, and variants."""
    folder = tmp_path_factory.mktemp("calibrate")
    rng = np.random.default_rng(0)
    x_train, y_train = _blobs(rng, 200)
    x_val, y_val = _blobs(rng, 60)
    x_test, y_test = _blobs(rng, 80)
    arrays = {
        "x_train": x_train,
        "y_train": y_train,
        "x_val": x_val,
        "y_val": y_val,
        "x_test": x_test,
        "y_test": y_test,
        "x_shifted": x_test + rng.normal(0, 1.5, x_test.shape).astype("float32"),
        "y_shifted": y_test,
        "x_ood": rng.uniform(-8, 8, (50, 4)).astype("float32"),
    }
    np.savez(folder / "data.npz", **arrays)
    return {
        "folder": folder,
        "arrays": arrays,
        "model": _save_model(folder / "model.keras", 3, train_on=(x_train, y_train)),
        "data": folder / "data.npz",
    }


def _npz(folder: Path, name: str, **arrays) -> Path:
    path = folder / name
    np.savez(path, **arrays)
    return path


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_calibrate_full(files, tmp_path, capsys):
    before = _digest(files["model"])
    code = cli.main(["calibrate", str(files["model"]), str(files["data"]), "--out", str(tmp_path)])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    assert captured.err == ""  # no progress bar when stderr is not a terminal
    assert "OOD AUROC" in captured.out
    results = json.loads((tmp_path / "results.json").read_text())
    assert set(results) == {"map", "laplace", "ood_auroc", "config"}
    for method in ("map", "laplace"):
        assert set(results[method]) == {"test", "shifted"}
        assert all(set(m) == METRIC_KEYS for m in results[method].values())
    config = results["config"]
    assert config["prior_tuning"] == "gridsearch"  # chosen because DATA has x_val, y_val
    assert config["sizes"] == {
        "train": 200,
        "val": 60,
        "test": 80,
        "shifted": 80,
        "ood": 50,
    }
    assert results["map"]["test"]["accuracy"] > 0.8
    assert (tmp_path / "reliability.png").read_bytes()[:8] == PNG_SIGNATURE
    assert _digest(files["model"]) == before


def test_calibrate_binary_without_optional_sets(files, tmp_path):
    rng = np.random.default_rng(1)
    x, y = _blobs(rng, 120, n_classes=2)
    model = _save_model(tmp_path / "binary.keras", 1)
    data = _npz(
        tmp_path, "binary.npz", x_train=x[:80], y_train=y[:80], x_test=x[80:], y_test=y[80:]
    )
    out = tmp_path / "out"
    code = cli.main(
        ["calibrate", str(model), str(data), "--likelihood", "binary", "--out", str(out)]
        + ["--link", "mc", "--subset", "last_layer", "--curvature", "ef", "--quiet"]
    )
    assert code == 0
    results = json.loads((out / "results.json").read_text())
    assert set(results) == {"map", "laplace", "config"}
    assert set(results["laplace"]) == {"test"}
    assert results["config"]["prior_tuning"] == "marglik"  # no validation set
    assert results["config"]["likelihood"] == "binary"
    assert (out / "reliability.png").read_bytes()[:8] == PNG_SIGNATURE


def test_calibrate_progress_bars_on_a_terminal(files, tmp_path, monkeypatch, capsys):
    terminal = TtyStringIO()
    monkeypatch.setattr(sys, "stderr", terminal)
    code = cli.main(
        ["calibrate", str(files["model"]), str(files["data"]), "--out", str(tmp_path), "--quiet"]
    )
    assert code == 0
    written = terminal.getvalue()
    assert "\rLaplace fit [" in written and "200/200" in written
    assert "\rPrior precision (gridsearch) [" in written and "29/29" in written
    assert capsys.readouterr().out == ""


def test_progress_bar_draws_only_on_a_terminal():
    quiet = io.StringIO()
    with ProgressBar("step", 3, stream=quiet) as bar:
        bar.update(3)
    assert quiet.getvalue() == ""
    terminal = TtyStringIO()
    with ProgressBar("step", 4, stream=terminal) as bar:
        bar.advance()
        bar.update(4)
    lines = terminal.getvalue()
    assert lines.startswith("\rstep [") and "1/4" in lines and "4/4" in lines
    assert lines.endswith(" s\n") and lines.count("\n") == 1


def test_calibrate_without_matplotlib_warns_and_writes_results(
    files, tmp_path, monkeypatch, capsys
):
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)  # import fails
    argv = ["calibrate", str(files["model"]), str(files["data"]), "--out", str(tmp_path)]
    assert cli.main([*argv, "--quiet"]) == 0
    err = capsys.readouterr().err
    assert "warning: reliability.png not written" in err and "pip install" in err
    assert (tmp_path / "results.json").exists()
    assert not (tmp_path / "reliability.png").exists()


def test_calibrate_ggn_mc_is_reproducible_with_a_seed(files, tmp_path):
    nlls = []
    for run in range(2):
        out = tmp_path / str(run)
        args = ["calibrate", str(files["model"]), str(files["data"]), "--out", str(out)]
        args += ["--curvature", "ggn_mc", "--prior-tuning", "marglik", "--seed", "0", "--quiet"]
        assert cli.main(args) == 0
        nlls.append(json.loads((out / "results.json").read_text())["laplace"]["test"]["nll"])
    assert nlls[0] == nlls[1]


# ---------------------------------------------------------------------------------------
# errors
# ---------------------------------------------------------------------------------------


def _error(capsys, argv) -> str:
    code = cli.main(argv)
    err = capsys.readouterr().err
    assert code == 2, err
    assert "Traceback" not in err
    return err


def _calibrate_error(capsys, model, data, *options) -> str:
    err = _error(capsys, ["calibrate", str(model), str(data), "--quiet", *options])
    assert err.startswith("laplace-tf: error: ")
    return err


def test_error_missing_model_file(files, tmp_path, capsys):
    err = _calibrate_error(capsys, tmp_path / "absent.keras", files["data"])
    assert "model file not found" in err and "absent.keras" in err


def test_error_missing_data_file(files, tmp_path, capsys):
    err = _calibrate_error(capsys, files["model"], tmp_path / "absent.npz")
    assert "data file not found" in err and "absent.npz" in err


def test_error_not_a_keras_file(files, tmp_path, capsys):
    h5 = tmp_path / "model.h5"
    h5.write_bytes(files["model"].read_bytes())
    err = _calibrate_error(capsys, h5, files["data"])
    assert "'.keras' file" in err and "model.h5" in err


def test_error_corrupt_keras_file(files, tmp_path, capsys):
    broken = tmp_path / "broken.keras"
    broken.write_bytes(b"not a zip archive")
    err = _calibrate_error(capsys, broken, files["data"])
    assert "could not load the model" in err


def test_error_data_not_an_npz(files, tmp_path, capsys):
    npy = tmp_path / "data.npy"
    np.save(npy, files["arrays"]["x_train"])
    err = _calibrate_error(capsys, files["model"], npy)
    assert ".npz archive" in err


def test_error_missing_keys_lists_them(files, tmp_path, capsys):
    a = files["arrays"]
    data = _npz(tmp_path, "partial.npz", x_train=a["x_train"], y_train=a["y_train"])
    err = _calibrate_error(capsys, files["model"], data)
    assert "lacks the key(s) x_test, y_test" in err
    assert "expected keys: x_train, y_train, x_test, y_test (required)" in err
    assert "x_ood (optional)" in err


def test_error_pickled_arrays(files, tmp_path, capsys):
    a = files["arrays"]
    objects = np.empty(len(a["y_train"]), dtype=object)
    data = _npz(
        tmp_path, "objects.npz", x_train=a["x_train"], y_train=objects,
        x_test=a["x_test"], y_test=a["y_test"],
    )  # fmt: skip
    err = _calibrate_error(capsys, files["model"], data)
    assert "y_train could not be read" in err


def test_error_mismatched_lengths(files, tmp_path, capsys):
    a = files["arrays"]
    data = _npz(
        tmp_path, "short.npz", x_train=a["x_train"], y_train=a["y_train"][:150],
        x_test=a["x_test"], y_test=a["y_test"],
    )  # fmt: skip
    err = _calibrate_error(capsys, files["model"], data)
    assert "x_train has 200 examples but y_train has 150 labels" in err


def test_error_unpaired_validation_set(files, tmp_path, capsys):
    a = files["arrays"]
    data = _npz(
        tmp_path, "unpaired.npz", x_train=a["x_train"], y_train=a["y_train"],
        x_test=a["x_test"], y_test=a["y_test"], x_val=a["x_val"],
    )  # fmt: skip
    err = _calibrate_error(capsys, files["model"], data)
    assert "has x_val but not y_val" in err


def test_error_labels_out_of_range(files, tmp_path, capsys):
    a = files["arrays"]
    data = _npz(
        tmp_path, "labels.npz", x_train=a["x_train"], y_train=a["y_train"] + 2,
        x_test=a["x_test"], y_test=a["y_test"],
    )  # fmt: skip
    err = _calibrate_error(capsys, files["model"], data)
    assert "y_train must hold integer labels in [0, 3)" in err and "3 output(s)" in err


def test_error_binary_likelihood_with_three_outputs(files, capsys):
    err = _calibrate_error(capsys, files["model"], files["data"], "--likelihood", "binary")
    assert "--likelihood binary needs a model with one output" in err and "has 3" in err


def test_error_inputs_do_not_fit_the_model(files, tmp_path, capsys):
    a = files["arrays"]
    data = _npz(
        tmp_path, "wide.npz", x_train=a["x_train"], y_train=a["y_train"],
        x_test=np.zeros((5, 7), "float32"), y_test=np.zeros(5, int),
    )  # fmt: skip
    err = _calibrate_error(capsys, files["model"], data)
    assert "cannot be applied to x_test (shape [5, 7])" in err


def test_error_gridsearch_without_validation_set(files, tmp_path, capsys):
    a = files["arrays"]
    keys = ("x_train", "y_train", "x_test", "y_test")
    data = _npz(tmp_path, "noval.npz", **{k: a[k] for k in keys})
    err = _calibrate_error(capsys, files["model"], data, "--prior-tuning", "gridsearch")
    assert "--prior-tuning gridsearch needs x_val and y_val" in err


def test_error_softmax_output(files, tmp_path, capsys):
    model = _save_model(tmp_path / "softmax.keras", 3, activation="softmax")
    err = _calibrate_error(capsys, model, files["data"])
    assert "logits" in err and "softmax" in err


def test_error_bridge_for_binary(files, capsys):
    err = _calibrate_error(
        capsys, files["model"], files["data"], "--likelihood", "binary", "--link", "bridge"
    )
    assert "--link bridge needs two or more classes" in err


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        ([], "required: COMMAND"),
        (["train"], "invalid choice: 'train'"),
        (["demo", "--curvature", "kfac"], "invalid choice: 'kfac'"),
        (["demo", "--epochs", "0"], "expected a positive integer"),
        (["demo", "--noise", "-1"], "expected a non-negative number"),
        (["demo", "--seed", "-3"], "expected a non-negative integer"),
        (["calibrate", "model.keras"], "DATA.npz"),
    ],
)
def test_usage_errors(capsys, argv, message):
    err = _error(capsys, argv)
    assert message in err


# ---------------------------------------------------------------------------------------
# help
# ---------------------------------------------------------------------------------------


def _help(capsys, argv) -> str:
    assert cli.main([*argv, "--help"]) == 0
    return capsys.readouterr().out


def test_top_level_help(capsys):
    text = _help(capsys, [])
    for word in ("demo", "calibrate", "--version", "results.json", "Exit status"):
        assert word in text


@pytest.mark.parametrize(
    ("command", "options"), [("demo", DEMO_OPTIONS), ("calibrate", CALIBRATE_OPTIONS)]
)
def test_subcommand_help_lists_every_option(capsys, command, options):
    text = _help(capsys, [command])
    for option in options:
        assert option in text
    parser = cli.build_parser()
    subparser = parser._subparsers._group_actions[0].choices[command]
    for action in subparser._actions:
        assert action.help, f"{action.dest} has no help"
        assert any(s in text for s in action.option_strings or [action.metavar])


def test_console_script_help():
    script = Path(sys.executable).parent / "laplace-tf"
    result = subprocess.run(
        [str(script), "--help"], capture_output=True, text=True, timeout=120, check=False
    )
    assert result.returncode == 0, result.stderr
    assert "demo" in result.stdout and "calibrate" in result.stdout
