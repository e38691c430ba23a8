"""Tests of the ``laplace-tf`` command: the demo's acceptance criteria on its default
configuration, ``calibrate`` on small saved models, the structure comparison against a
direct ``laplace_tf.Laplace`` computation, the summary over seeds, clear errors, help and
progress."""

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
from scipy.special import softmax

import laplace_tf
from laplace_tf import cli, metrics
from laplace_tf.cli.progress import ProgressBar
from laplace_tf.cli.studies import DEFAULT_POSTERIORS

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
METRIC_KEYS = {"accuracy", "nll", "ece", "brier"}

DEMO_OPTIONS = (
    "--out",
    "--seed",
    "--epochs",
    "--weight-decay",
    "--rotation",
    "--noise",
    "--structures",
    "--subset",
    "--full-size-limit",
    "--seeds",
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
    "--structures",
    "--subset",
    "--full-size-limit",
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
    for name in DEFAULT_POSTERIORS:  # one line per posterior
        assert any(line.startswith(f"{name} ") for line in table.splitlines())
    assert "results.json" in table and "reliability.png" in table


def test_demo_results_schema(demo):
    results = demo["results"]
    assert set(results) == {"map", "laplace", "ood_auroc", "structures", "config"}
    for method in ("map", "laplace"):
        assert set(results[method]) == {"test", "shifted"}
        for values in results[method].values():
            assert set(values) == METRIC_KEYS
            assert all(isinstance(v, float) and math.isfinite(v) for v in values.values())
    structures = results["structures"]
    assert list(structures) == list(DEFAULT_POSTERIORS)
    assert {k: v for k, v in structures["diag:all"].items() if k in ("test", "shifted")} == {
        "test": results["laplace"]["test"],
        "shifted": results["laplace"]["shifted"],
    }
    assert structures["diag:all"]["ood_auroc"] == results["ood_auroc"]["laplace"]
    assert [structures[name]["weights"] for name in DEFAULT_POSTERIORS] == [26122, 1290, 1290]
    assert set(results["ood_auroc"]) == {"map", "laplace"}
    assert all(0.0 <= v <= 1.0 for v in results["ood_auroc"].values())
    config = results["config"]
    assert config["seed"] == 0
    assert config["structures"] == list(DEFAULT_POSTERIORS)
    assert (config["structure"], config["subset"]) == ("diag", "all")
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


def test_demo_every_default_structure_is_better_calibrated_under_shift(demo):
    map_ = demo["results"]["map"]
    for name, entry in demo["results"]["structures"].items():
        assert entry["shifted"]["nll"] < map_["shifted"]["nll"], name
        assert entry["shifted"]["ece"] < map_["shifted"]["ece"], name
        assert abs(entry["test"]["accuracy"] - map_["test"]["accuracy"]) <= 0.01, name
        assert entry["test"]["nll"] <= map_["test"]["nll"] + 0.02, name


def test_demo_runtime(demo):
    """A loose bound (a few minutes on two shared cores): a hang, not a benchmark."""
    assert demo["results"]["config"]["runtime_s"]["total"] < 180


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
    results = json.loads((tmp_path / "results.json").read_text())
    config = results["config"]
    assert list(results["structures"]) == ["diag:last_layer"]  # --subset alone: one posterior
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
    assert set(results) == {"map", "laplace", "ood_auroc", "structures", "config"}
    assert list(results["structures"]) == list(DEFAULT_POSTERIORS)
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
    assert set(results) == {"map", "laplace", "structures", "config"}
    assert list(results["structures"]) == ["diag:last_layer"]
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
    for name in DEFAULT_POSTERIORS:  # one bar per step and posterior
        assert f"\rLaplace fit ({name}) [" in written
        assert f"\rPrior precision ({name}, gridsearch) [" in written
    assert "200/200" in written and "29/29" in written
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
# the structure comparison and the summary over seeds
# ---------------------------------------------------------------------------------------


def _png_width(path: Path) -> int:
    return int.from_bytes(path.read_bytes()[16:20], "big")


def test_calibrate_comparison_matches_a_direct_laplace_fit(files, tmp_path, capsys):
    """Each cell is the library's own number: the kron:last_layer row equals a direct
    ``laplace_tf.Laplace`` fit tuned by marginal likelihood, the MAP row the model's
    softmax; full over all 67 weights is skipped above --full-size-limit 40."""
    out = tmp_path / "out"
    argv = ["calibrate", str(files["model"]), str(files["data"]), "--out", str(out)]
    argv += ["--structures", "diag:all", "kron:last_layer", "full", "full:last_layer"]
    argv += ["--full-size-limit", "40", "--prior-tuning", "marglik"]
    assert cli.main(argv) == 0
    table = capsys.readouterr().out
    results = json.loads((out / "results.json").read_text())
    structures = results["structures"]
    assert list(structures) == ["diag:all", "kron:last_layer", "full:all", "full:last_layer"]
    assert structures["full:all"]["weights"] == 67
    assert "67 weights > full_size_limit 40" in structures["full:all"]["skipped"]
    assert "test" not in structures["full:all"]
    assert any(
        line.startswith("full:all") and "skipped: 67 weights" in line for line in table.splitlines()
    )
    for name in ("diag:all", "kron:last_layer", "full:last_layer"):
        entry = structures[name]
        assert entry["weights"] == (67 if name == "diag:all" else 27)
        for set_name in ("test", "shifted"):
            assert all(math.isfinite(entry[set_name][key]) for key in METRIC_KEYS), name
        assert entry["prior_precision"] > 0 and 0 <= entry["ood_auroc"] <= 1
        assert set(entry["runtime_s"]) == {"fit", "tune", "fit_and_tune", "predict"}
    assert results["laplace"] == {k: structures["diag:all"][k] for k in ("test", "shifted")}

    a = files["arrays"]
    model = keras.saving.load_model(files["model"])
    la = laplace_tf.Laplace(model, "classification", structure="kron", subset="last_layer")
    la.fit((a["x_train"], a["y_train"]), batch_size=256, seed=0)
    la.optimize_prior_precision("marglik")
    direct = structures["kron:last_layer"]
    assert direct["prior_precision"] == pytest.approx(float(la.prior_precision), rel=1e-6)
    for set_name, x, y in (
        ("test", a["x_test"], a["y_test"]),
        ("shifted", a["x_shifted"], a["y_test"]),
    ):
        expected = metrics.evaluate(np.asarray(la.predict(x), np.float64), y, 15)
        assert direct[set_name] == pytest.approx(expected, rel=1e-6, abs=1e-9)
    map_probs = softmax(np.asarray(model.predict(a["x_test"], verbose=0), np.float64), axis=-1)
    assert results["map"]["test"] == pytest.approx(metrics.evaluate(map_probs, a["y_test"], 15))
    # the posteriors differ: the comparison is not one fit repeated
    assert len({structures[n]["test"]["nll"] for n in ("diag:all", "kron:last_layer")}) == 2
    # one reliability column (400 px) per method: MAP and the three fitted posteriors
    assert _png_width(out / "reliability.png") == 4 * 400


def test_demo_seeds_summary_is_the_mean_and_spread_of_the_runs(tmp_path, capsys):
    argv = ["demo", "--out", str(tmp_path), "--epochs", "2", "--seeds", "0", "1"]
    argv += ["--structures", "kron:last_layer", "--prior-tuning", "marglik"]
    assert cli.main(argv) == 0
    table = capsys.readouterr().out
    results = json.loads((tmp_path / "results.json").read_text())
    assert set(results) == {"summary", "runs", "config"}
    assert set(results["runs"]) == {"0", "1"} and results["config"]["seeds"] == [0, 1]
    runs = [results["runs"][seed] for seed in ("0", "1")]
    for method, key in (("MAP", "map"), ("kron:last_layer", None)):
        for set_name in ("test", "shifted"):
            values = [
                (run[key] if key else run["structures"][method])[set_name]["nll"] for run in runs
            ]
            assert values[0] != values[1]  # another split and another network per seed
            cell = results["summary"][method][set_name]["nll"]
            assert cell["mean"] == pytest.approx(np.mean(values))
            assert cell["std"] == pytest.approx(np.std(values, ddof=1))
            assert cell["n"] == 2
    mean = results["summary"]["kron:last_layer"]["test"]["nll"]["mean"]
    assert f"{mean:.4f}±" in table and "mean ± std over seeds 0, 1" in table


def test_calibrate_error_when_every_posterior_is_refused(files, capsys):
    err = _calibrate_error(
        capsys, files["model"], files["data"], "--structures", "full", "--full-size-limit", "5"
    )
    assert "no posterior could be fitted" in err and "full:all" in err


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
        (["demo", "--structures", "kfac:all"], "expected STRUCTURE[:SUBSET]"),
        (["demo", "--structures", "kron:head"], "expected STRUCTURE[:SUBSET]"),
        (["demo", "--seed", "1", "--seeds", "0", "1"], "not allowed with argument"),
        (["calibrate", "m.keras", "d.npz", "--seeds", "0"], "unrecognized arguments"),
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
