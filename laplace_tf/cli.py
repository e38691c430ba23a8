"""The ``laplace-tf`` command: a diagonal Laplace study of a classifier.

``laplace-tf demo`` trains a small MLP on scikit-learn's digits and compares MAP and
Laplace predictives on test, shifted and out-of-distribution data;
``laplace-tf calibrate MODEL.keras DATA.npz`` runs the same study on a saved model.
Both write ``results.json`` and ``reliability.png`` to ``--out``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from laplace_tf import __version__, _studies
from laplace_tf._studies import InputError, Settings, StudyData, StudyOutcome

PROG = "laplace-tf"

_DESCRIPTION = """\
Post-hoc uncertainty for trained Keras classifiers by a diagonal Laplace approximation:
fit the curvature over the training set, tune the prior precision, and compare the
Laplace predictive with the MAP network (accuracy, NLL, ECE, Brier score; OOD AUROC).
Each command writes DIR/results.json and DIR/reliability.png; see
'laplace-tf COMMAND --help'. Exit status: 0 on success, 2 on bad input."""

_RESULTS_HELP = f"""\
results.json: {{"map": {{"test": {{"accuracy", "nll", "ece", "brier"}}, "shifted": {{...}}}},
"laplace": {{...}}, "ood_auroc": {{"map", "laplace"}}, "config": {{...}}}}. NLL in nats
per example, ECE with {Settings.n_bins} equal-width confidence bins, Brier summed over
classes, OOD AUROC of the top-label confidence (test examples positive)."""

_DEMO_DESCRIPTION = f"""\
Train a ReLU MLP 64-128-128-10 (Adam, L2 weight decay) on scikit-learn's 8x8 digits,
scaled to [0, 1] and split 60/15/25 % into train/validation/test by --seed, then fit a
diagonal Laplace approximation and compare it with the MAP network on:
  test     the held-out digits;
  shifted  the test digits rotated by a uniform angle in [-DEGREES, DEGREES] (--rotation)
           and corrupted by Gaussian pixel noise of standard deviation STD (--noise);
  OOD      as many 8x8 grey patches of scikit-learn's two sample photographs (block-
           averaged windows, rescaled to [0, 1]); AUROC of test vs these.
The prior precision is tuned by default by grid search on the validation NLL:
maximising the marginal likelihood of a diagonal posterior over all weights gives far
too small a precision here (an underconfident predictive; try --prior-tuning marglik).
reliability.png shows MAP and Laplace on the shifted set.

{_RESULTS_HELP}"""

_CALIBRATE_DESCRIPTION = f"""\
Run the study on a trained Keras model and your arrays. MODEL is a Keras 3 '.keras' file
(keras.saving.load_model) whose one output is logits [N, C] (classification) or one
logit [N, 1] (binary); it is read, never modified. DATA is an .npz archive (np.savez;
no pickled objects) with the keys
  x_train, y_train      training set: the curvature is computed over it (required)
  x_test, y_test        test set (required)
  x_val, y_val          validation set for --prior-tuning gridsearch (optional)
  x_shifted, y_shifted  a shifted test set, evaluated like the test set (optional)
  x_ood                 out-of-distribution inputs: gives the OOD AUROC (optional)
Labels are integers in [0, C) (classification) or 0/1 (binary). The 'shifted' and
'ood_auroc' entries of results.json appear only when DATA has those sets.
reliability.png shows MAP and Laplace on the shifted set if given, else the test set.
Regression is not supported by this command: use laplace_tf.DiagonalLaplace directly.

{_RESULTS_HELP}"""


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``laplace-tf`` with ``argv`` (default: ``sys.argv[1:]``); returns the exit status."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exit_:  # --help, or a usage error already printed by argparse
        return exit_.code if isinstance(exit_.code, int) else 2
    try:
        return args.run(args)
    except InputError as error:
        print(f"{PROG}: error: {error}", file=sys.stderr)
        return 2


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of ``laplace-tf`` and its subcommands."""
    formatter = argparse.RawDescriptionHelpFormatter
    parser = argparse.ArgumentParser(prog=PROG, description=_DESCRIPTION, formatter_class=formatter)
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    commands = parser.add_subparsers(title="commands", metavar="COMMAND", required=True)

    demo = commands.add_parser(
        "demo",
        help="train a small MLP on scikit-learn's digits and run the study",
        description=_DEMO_DESCRIPTION,
        formatter_class=formatter,
    )
    demo.add_argument(
        "--out",
        type=Path,
        default=Path("laplace_tf_demo"),
        metavar="DIR",
        help="output folder, created if needed (default: ./laplace_tf_demo)",
    )
    demo.add_argument(
        "--epochs",
        type=_positive_int,
        default=60,
        metavar="N",
        help="training epochs of the MLP (default: %(default)s)",
    )
    demo.add_argument(
        "--weight-decay",
        type=_non_negative_float,
        default=1e-5,
        metavar="LAMBDA",
        help="L2 penalty lambda * sum(w^2) on the kernels (default: %(default)g)",
    )
    demo.add_argument(
        "--rotation",
        type=_non_negative_float,
        default=30.0,
        metavar="DEGREES",
        help="largest rotation of the shifted digits (default: %(default)g)",
    )
    demo.add_argument(
        "--noise",
        type=_non_negative_float,
        default=0.2,
        metavar="STD",
        help="pixel noise of the shifted digits, pixels in [0, 1] (default: %(default)g)",
    )
    _add_study_options(demo, likelihood=False, prior_tuning_default="gridsearch")
    demo.set_defaults(run=_run_demo)

    calibrate = commands.add_parser(
        "calibrate",
        help="run the study on a saved model.keras and data.npz",
        description=_CALIBRATE_DESCRIPTION,
        formatter_class=formatter,
    )
    calibrate.add_argument(
        "model", type=Path, metavar="MODEL.keras", help="the trained Keras model (outputs logits)"
    )
    calibrate.add_argument(
        "data", type=Path, metavar="DATA.npz", help="the arrays, keys as listed above"
    )
    calibrate.add_argument(
        "--out",
        type=Path,
        default=Path("laplace_tf_calibration"),
        metavar="DIR",
        help="output folder, created if needed (default: ./laplace_tf_calibration)",
    )
    _add_study_options(calibrate, likelihood=True, prior_tuning_default=None)
    calibrate.set_defaults(run=_run_calibrate)
    return parser


def _add_study_options(
    parser: argparse.ArgumentParser, *, likelihood: bool, prior_tuning_default: str | None
) -> None:
    """The options shared by ``demo`` and ``calibrate``."""
    if likelihood:
        parser.add_argument(
            "--likelihood",
            choices=("classification", "binary"),
            default="classification",
            help="classification: softmax over C logits, integer labels; "
            "binary: one logit, labels 0/1 (default: classification)",
        )
    parser.add_argument(
        "--subset",
        choices=("all", "last_layer"),
        default="all",
        help="weights with a posterior: all, or those of the last layer "
        "with weights; the others stay fixed (default: all)",
    )
    parser.add_argument(
        "--curvature",
        choices=("ggn", "ggn_mc", "ef"),
        default="ggn",
        help="diagonal curvature: exact generalised Gauss-Newton, its Monte "
        "Carlo estimate (one sampled label), or the empirical Fisher "
        "(default: ggn)",
    )
    grid = _studies.PRIOR_GRID
    tuning_default = (
        f"default: {prior_tuning_default}"
        if prior_tuning_default
        else "default: gridsearch if DATA has x_val and y_val, else marglik"
    )
    parser.add_argument(
        "--prior-tuning",
        choices=("marglik", "gridsearch"),
        default=prior_tuning_default,
        help="how the scalar prior precision is chosen: maximise the Laplace "
        "marginal likelihood, or pick the value with the lowest "
        f"validation NLL from {len(grid)} values log-spaced in [{grid[0]:g}, {grid[-1]:g}] "
        f"({tuning_default})",
    )
    parser.add_argument(
        "--link",
        choices=("probit", "bridge", "mc"),
        default="probit",
        help="GLM predictive link: probit approximation, Laplace bridge "
        "(classification only) or Monte Carlo, 100 draws "
        "(default: probit)",
    )
    parser.add_argument(
        "--batch-size",
        type=_positive_int,
        default=256,
        metavar="N",
        help="batch size of the curvature pass and of the predictions (default: %(default)s)",
    )
    parser.add_argument(
        "--seed",
        type=_non_negative_int,
        default=0,
        help="random seed: data split, training, shift and OOD patches "
        "(demo) and the Monte Carlo link (default: %(default)s)",
    )
    parser.add_argument(
        "--quiet",
        action="store_true",
        help="do not print the results table (files are still written)",
    )


# -- commands ----------------------------------------------------------------------------------


def _run_demo(args: argparse.Namespace) -> int:
    start = time.perf_counter()
    settings = _settings(args, likelihood="classification", prior_tuning=args.prior_tuning)
    data = _studies.demo_data(args.seed, args.rotation, args.noise)
    model = _studies.train_demo_model(
        data.x_train,
        data.y_train,
        epochs=args.epochs,
        weight_decay=args.weight_decay,
        seed=args.seed,
    )
    trained = time.perf_counter()
    outcome = _study(model, data, settings)
    config = {
        "command": "demo",
        **_settings_config(settings),
        **outcome.tuning,
        "seed": args.seed,
        "sizes": data.sizes(),
        "model": {
            "hidden": list(_studies.DEMO_HIDDEN),
            "activation": "relu",
            "parameters": int(model.count_params()),
            "weight_decay": args.weight_decay,
            "epochs": args.epochs,
            "learning_rate": _studies.DEMO_LEARNING_RATE,
            "train_batch_size": _studies.DEMO_TRAIN_BATCH,
        },
        "shift": {"rotation_degrees": args.rotation, "noise_std": args.noise},
        "ood": "8x8 grey patches of scikit-learn's sample photographs, rescaled to [0, 1]",
        "versions": _studies.versions("scikit-learn"),
        "runtime_s": {
            "training": round(trained - start, 2),
            "total": round(time.perf_counter() - start, 2),
        },
    }
    return _report(args, outcome, data, config)


def _run_calibrate(args: argparse.Namespace) -> int:
    start = time.perf_counter()
    if args.link == "bridge" and args.likelihood == "binary":
        raise InputError("--link bridge needs two or more classes; use probit or mc for binary")
    model = _studies.load_model(args.model)
    data = _studies.load_data(args.data)
    has_val = data.x_val is not None
    prior_tuning = args.prior_tuning or ("gridsearch" if has_val else "marglik")
    if prior_tuning == "gridsearch" and not has_val:
        raise InputError(
            f"--prior-tuning gridsearch needs x_val and y_val in {args.data.name}; add them "
            "or use --prior-tuning marglik"
        )
    settings = _settings(args, likelihood=args.likelihood, prior_tuning=prior_tuning)
    _studies.check_model_and_labels(model, data, args.likelihood)
    outcome = _study(model, data, settings)
    config = {
        "command": "calibrate",
        "model_path": str(args.model),
        "data_path": str(args.data),
        **_settings_config(settings),
        **outcome.tuning,
        "seed": args.seed,
        "sizes": data.sizes(),
        "parameters": int(model.count_params()),
        "versions": _studies.versions(),
        "runtime_s": {"total": round(time.perf_counter() - start, 2)},
    }
    return _report(args, outcome, data, config)


def _settings(args: argparse.Namespace, *, likelihood: str, prior_tuning: str) -> Settings:
    return Settings(
        likelihood=likelihood,
        subset=args.subset,
        curvature=args.curvature,
        prior_tuning=prior_tuning,
        link=args.link,
        batch_size=args.batch_size,
        seed=args.seed,
    )


def _settings_config(settings: Settings) -> dict[str, Any]:
    return {
        "likelihood": settings.likelihood,
        "subset": settings.subset,
        "curvature": settings.curvature,
        "prior_tuning": settings.prior_tuning,
        "predictive": "glm",
        "link": settings.link,
        "batch_size": settings.batch_size,
        "ece_bins": settings.n_bins,
    }


def _study(model: Any, data: StudyData, settings: Settings) -> StudyOutcome:
    """Run the study; the library's refusals of the user's data become ``InputError``."""
    try:
        return _studies.run_study(model, data, settings)
    except ValueError as error:
        raise InputError(str(error)) from error


# -- output ------------------------------------------------------------------------------------


def _report(
    args: argparse.Namespace, outcome: StudyOutcome, data: StudyData, config: dict[str, Any]
) -> int:
    """Write results.json and reliability.png to ``args.out`` and print the table."""
    out: Path = args.out
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise InputError(f"cannot create the output folder {out}: {error}") from error
    results = {**outcome.results, "config": config}
    (out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    written = [out / "results.json"]

    sets = data.labelled_sets()
    plotted = "shifted" if "shifted" in sets else "test"
    try:
        from laplace_tf import plotting

        figure = plotting.reliability_diagram(
            outcome.predictions[plotted],
            sets[plotted][1],
            n_bins=config["ece_bins"],
            title=f"Reliability on the {plotted} set",
        )
    except ImportError as error:
        print(f"{PROG}: warning: reliability.png not written: {error}", file=sys.stderr)
    else:
        figure.savefig(out / "reliability.png", dpi=100)
        written.append(out / "reliability.png")

    if not args.quiet:
        print(format_table(results))
        print("wrote " + ", ".join(str(path) for path in written))
    return 0


def format_table(results: dict[str, Any]) -> str:
    """The metrics of ``results`` (as in results.json) as a plain-text table."""
    sets = list(results["map"])
    columns = ("accuracy", "nll", "ece", "brier")
    header = f"{'':<8}" + "".join(f"  {name:-^{10 * len(columns)}}" for name in sets)
    names = f"{'method':<8}" + "".join(
        "  " + "".join(f"{column:>10}" for column in columns) for _ in sets
    )
    lines = [header, names]
    for key, label in (("map", "MAP"), ("laplace", "Laplace")):
        lines.append(
            f"{label:<8}"
            + "".join(
                "  " + "".join(f"{results[key][name][column]:>10.4f}" for column in columns)
                for name in sets
            )
        )
    if "ood_auroc" in results:
        auroc = results["ood_auroc"]
        lines.append(
            f"OOD AUROC (max prob): MAP {auroc['map']:.4f}, Laplace {auroc['laplace']:.4f}"
        )
    config = results["config"]
    lines.append(
        f"prior precision {config['prior_precision']:.4g} ({config['prior_tuning']}), "
        f"{config['predictive']} {config['link']}, curvature {config['curvature']}, "
        f"subset {config['subset']}, "
        f"{config['runtime_s']['total']:.1f} s"
    )
    return "\n".join(lines)


# -- argument types ----------------------------------------------------------------------------


def _positive_int(text: str) -> int:
    return _int_at_least(text, 1, "a positive integer")


def _non_negative_int(text: str) -> int:
    return _int_at_least(text, 0, "a non-negative integer")


def _int_at_least(text: str, lowest: int, what: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = lowest - 1
    if value < lowest:
        raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}")
    return value


def _non_negative_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not np.isfinite(value) or value < 0:
        raise argparse.ArgumentTypeError(f"expected a non-negative number, got {text!r}")
    return value
