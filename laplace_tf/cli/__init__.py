"""The ``laplace-tf`` command: MAP against Laplace posteriors of a classifier.

``laplace-tf demo`` trains a small MLP on scikit-learn's digits and compares the MAP
predictive with Laplace posteriors of several structures (diag / kron / full over all
weights or the last layer) on test, shifted and out-of-distribution data, for one seed
or several; ``laplace-tf calibrate MODEL.keras DATA.npz`` runs the same comparison on a
saved model. Both write ``results.json`` and ``reliability.png`` to ``--out``.

The package: :mod:`~laplace_tf.cli.data` (the demo's data and model, the user's files),
:mod:`~laplace_tf.cli.studies` (fit, tune, evaluate), :mod:`~laplace_tf.cli.report`
(table, summary over seeds, files), :mod:`~laplace_tf.cli.progress` (progress bars).
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from laplace_tf import __version__
from laplace_tf.cli import data as study_data
from laplace_tf.cli import report
from laplace_tf.cli.data import InputError, StudyData
from laplace_tf.cli.report import PROG, format_table
from laplace_tf.cli.studies import (
    DEFAULT_POSTERIORS,
    EVERY,
    PRIOR_GRID,
    Posterior,
    Settings,
    StudyOutcome,
    run_study,
    versions,
)

__all__ = ["PROG", "build_parser", "format_table", "main"]

_DESCRIPTION = """\
Post-hoc uncertainty for trained Keras classifiers by Laplace approximations: fit the
curvature over the training set for each posterior structure (diag / kron / full, over
all weights or the last layer), tune each one's prior precision, and compare the Laplace
predictives with the MAP network (accuracy, NLL, ECE, Brier score; OOD AUROC) in one
table. Each command writes DIR/results.json and DIR/reliability.png; see
'laplace-tf COMMAND --help'. Exit status: 0 on success, 2 on bad input."""

_RESULTS_HELP = f"""\
results.json: {{"map": {{"test": {{"accuracy", "nll", "ece", "brier"}}, "shifted": {{...}}}},
"laplace": {{...}} (the first posterior fitted), "ood_auroc": {{"map", "laplace"}},
"structures": {{"diag:all": {{"test", "shifted", "ood_auroc", "prior_precision", "weights",
"runtime_s"}}, "full:all": {{"skipped": REASON}}, ...}}, "config": {{...}}}}; with several
--seeds, {{"summary": {{METHOD: {{... {{"mean", "std", "median", "n"}}}}}}, "runs":
{{SEED: ...}}, "config"}}. NLL in nats per example, ECE with {Settings.n_bins} equal-width
confidence bins, Brier summed over classes, OOD AUROC of the top-label confidence (test
examples positive)."""

_STRUCTURES_HELP = f"""\
The posteriors compared (--structures): STRUCTURE:SUBSET with STRUCTURE diag, kron or
full and SUBSET all or last_layer, or 'every' for all six. By default
  {" ".join(DEFAULT_POSTERIORS)}
(full is left out by default for its cost; with --subset alone, the one posterior
diag:SUBSET). 'full' above --full-size-limit weights is skipped, and the table says why.
Each posterior's prior precision is tuned on its own; 'fit s' in the table is fit +
prior tuning, 'pred s' the predictions of every set (both include TensorFlow's tracing
of a new posterior)."""

_DEMO_DESCRIPTION = f"""\
Train a ReLU MLP 64-128-128-10 (Adam, L2 weight decay) on scikit-learn's 8x8 digits,
scaled to [0, 1] and split 60/15/25 % into train/validation/test by --seed, then fit
Laplace posteriors and compare them with the MAP network on:
  test     the held-out digits;
  shifted  the test digits rotated by a uniform angle in [-DEGREES, DEGREES] (--rotation)
           and corrupted by Gaussian pixel noise of standard deviation STD (--noise);
  OOD      as many 8x8 grey patches of scikit-learn's two sample photographs (block-
           averaged windows, rescaled to [0, 1]); AUROC of test vs these.
The prior precision is tuned by default by grid search on the validation NLL:
maximising the marginal likelihood gives far too small a precision on this network, for
every structure (an underconfident predictive; try --prior-tuning marglik).
--seeds 0 1 2 repeats the whole demo (split, training, shift, OOD patches) per seed and
reports mean ± standard deviation. reliability.png shows MAP and each posterior on the
shifted set (pooled over the seeds).

{_STRUCTURES_HELP}

{_RESULTS_HELP}"""

_CALIBRATE_DESCRIPTION = f"""\
Run the comparison on a trained Keras model and your arrays. MODEL is a Keras 3 '.keras'
file (keras.saving.load_model) whose one output is logits [N, C] (classification) or one
logit [N, 1] (binary); it is read, never modified. DATA is an .npz archive (np.savez;
no pickled objects) with the keys
  x_train, y_train      training set: the curvature is computed over it (required)
  x_test, y_test        test set (required)
  x_val, y_val          validation set for --prior-tuning gridsearch (optional)
  x_shifted, y_shifted  a shifted test set, evaluated like the test set (optional)
  x_ood                 out-of-distribution inputs: gives the OOD AUROC (optional)
Labels are integers in [0, C) (classification) or 0/1 (binary). The 'shifted' and
'ood_auroc' entries of results.json appear only when DATA has those sets.
reliability.png shows MAP and each posterior on the shifted set if given, else the test
set. Regression is not supported by this command: use laplace_tf.Laplace directly.

{_STRUCTURES_HELP}

{_RESULTS_HELP}"""


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``laplace-tf`` with ``argv`` (default: ``sys.argv[1:]``); returns the exit status."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exit_:  # --help, or a usage error already printed by argparse
        return exit_.code if isinstance(exit_.code, int) else 2
    tf_logger = logging.getLogger("tensorflow")
    quiet_retracing = _RetracingFilter()
    tf_logger.addFilter(quiet_retracing)
    try:
        return args.run(args)
    except InputError as error:
        print(f"{PROG}: error: {error}", file=sys.stderr)
        return 2
    finally:
        tf_logger.removeFilter(quiet_retracing)


class _RetracingFilter(logging.Filter):
    """Drops TensorFlow's "triggered tf.function retracing" hints: each posterior of a
    comparison traces its own functions, by design, and the hint is for developers."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "triggered tf.function retracing" not in record.getMessage()


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of ``laplace-tf`` and its subcommands."""
    formatter = argparse.RawDescriptionHelpFormatter
    parser = argparse.ArgumentParser(prog=PROG, description=_DESCRIPTION, formatter_class=formatter)
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    commands = parser.add_subparsers(title="commands", metavar="COMMAND", required=True)

    demo = commands.add_parser(
        "demo",
        help="train a small MLP on scikit-learn's digits and run the comparison",
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
    _add_study_options(demo, likelihood=False, prior_tuning_default="gridsearch", demo=True)
    demo.set_defaults(run=_run_demo)

    calibrate = commands.add_parser(
        "calibrate",
        help="run the comparison on a saved model.keras and data.npz",
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
    parser: argparse.ArgumentParser,
    *,
    likelihood: bool,
    prior_tuning_default: str | None,
    demo: bool = False,
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
        "--structures",
        nargs="+",
        type=_posterior_spec,
        metavar="SPEC",
        help="posteriors compared with MAP, each STRUCTURE[:SUBSET] (diag, kron, full; "
        "all, last_layer) or 'every' for all six (default: "
        f"{' '.join(DEFAULT_POSTERIORS)}, or diag:SUBSET with --subset alone)",
    )
    parser.add_argument(
        "--subset",
        choices=("all", "last_layer"),
        default=None,
        help="subset of a SPEC given without one; alone, the study of the one posterior "
        "diag:SUBSET (default: all)",
    )
    parser.add_argument(
        "--full-size-limit",
        type=_positive_int,
        default=20_000,
        metavar="N",
        help="most weights a 'full' posterior may have; above, it is skipped "
        "(default: %(default)s)",
    )
    parser.add_argument(
        "--curvature",
        choices=("ggn", "ggn_mc", "ef"),
        default="ggn",
        help="curvature: exact generalised Gauss-Newton, its Monte "
        "Carlo estimate (one sampled label), or the empirical Fisher "
        "(default: ggn)",
    )
    grid = PRIOR_GRID
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
    seeds = parser.add_mutually_exclusive_group()
    seeds.add_argument(
        "--seed",
        type=_non_negative_int,
        default=0,
        help="random seed: "
        + ("data split, training, shift and OOD patches (demo), " if demo else "")
        + "the Monte Carlo curvature and link (default: %(default)s)",
    )
    if demo:
        seeds.add_argument(
            "--seeds",
            nargs="+",
            type=_non_negative_int,
            metavar="SEED",
            help="run the whole demo once per seed and report mean ± standard deviation",
        )
    parser.add_argument(
        "--quiet",
        action="store_true",
        help="do not print the results table (files are still written)",
    )


# -- commands ----------------------------------------------------------------------------------


def _run_demo(args: argparse.Namespace) -> int:
    start = time.perf_counter()
    seeds = args.seeds or [args.seed]
    runs, trainings, predictions, labels = {}, {}, [], []
    for seed in seeds:
        seed_start = time.perf_counter()
        settings = _settings(args, likelihood="classification", seed=seed)
        data = study_data.demo_data(seed, args.rotation, args.noise)
        model = study_data.train_demo_model(
            data.x_train,
            data.y_train,
            epochs=args.epochs,
            weight_decay=args.weight_decay,
            seed=seed,
        )
        trainings[seed] = round(time.perf_counter() - seed_start, 2)
        outcome = _study(model, data, settings)
        runs[seed] = {**outcome.results, "tuning": outcome.tuning}
        predictions.append(outcome.predictions["shifted"])
        labels.append(data.y_shifted)
    config = {
        "command": "demo",
        **_settings_config(settings),
        **({"seeds": seeds} if args.seeds else {**outcome.tuning, "seed": seeds[0]}),
        "sizes": data.sizes(),
        "model": {
            "hidden": list(study_data.DEMO_HIDDEN),
            "activation": "relu",
            "parameters": int(model.count_params()),
            "weight_decay": args.weight_decay,
            "epochs": args.epochs,
            "learning_rate": study_data.DEMO_LEARNING_RATE,
            "train_batch_size": study_data.DEMO_TRAIN_BATCH,
        },
        "shift": {"rotation_degrees": args.rotation, "noise_std": args.noise},
        "ood": "8x8 grey patches of scikit-learn's sample photographs, rescaled to [0, 1]",
        "versions": versions("scikit-learn"),
        "runtime_s": {
            "training": trainings[seeds[0]] if not args.seeds else trainings,
            "total": round(time.perf_counter() - start, 2),
        },
    }
    if args.seeds:
        results = {
            "summary": report.summarize(list(runs.values())),
            "runs": {str(seed): run for seed, run in runs.items()},
            "config": config,
        }
    else:
        results = {**outcome.results, "config": config}
    pooled = {
        method: np.concatenate([probs[method] for probs in predictions])
        for method in predictions[0]
    }
    return report.write(
        args.out,
        results,
        pooled,
        np.concatenate(labels),
        plotted="shifted",
        n_bins=settings.n_bins,
        quiet=args.quiet,
    )


def _run_calibrate(args: argparse.Namespace) -> int:
    start = time.perf_counter()
    if args.link == "bridge" and args.likelihood == "binary":
        raise InputError("--link bridge needs two or more classes; use probit or mc for binary")
    model = study_data.load_model(args.model)
    data = study_data.load_data(args.data)
    has_val = data.x_val is not None
    args.prior_tuning = args.prior_tuning or ("gridsearch" if has_val else "marglik")
    if args.prior_tuning == "gridsearch" and not has_val:
        raise InputError(
            f"--prior-tuning gridsearch needs x_val and y_val in {args.data.name}; add them "
            "or use --prior-tuning marglik"
        )
    settings = _settings(args, likelihood=args.likelihood, seed=args.seed)
    study_data.check_model_and_labels(model, data, args.likelihood)
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
        "versions": versions(),
        "runtime_s": {"total": round(time.perf_counter() - start, 2)},
    }
    sets = data.labelled_sets()
    plotted = "shifted" if "shifted" in sets else "test"
    return report.write(
        args.out,
        {**outcome.results, "config": config},
        outcome.predictions[plotted],
        sets[plotted][1],
        plotted=plotted,
        n_bins=settings.n_bins,
        quiet=args.quiet,
    )


def _posteriors(args: argparse.Namespace) -> tuple[Posterior, ...]:
    """The posteriors of ``--structures`` (``every`` expanded), ``--subset`` and defaults."""
    if args.structures is None:
        specs = DEFAULT_POSTERIORS if args.subset is None else (f"diag:{args.subset}",)
    else:
        specs = [
            name for spec in args.structures for name in (EVERY if spec == "every" else [spec])
        ]
    parsed = (Posterior.parse(spec, args.subset or "all") for spec in specs)
    return tuple(dict.fromkeys(parsed))  # in order, each once


def _settings(args: argparse.Namespace, *, likelihood: str, seed: int) -> Settings:
    return Settings(
        likelihood=likelihood,
        posteriors=_posteriors(args),
        curvature=args.curvature,
        prior_tuning=args.prior_tuning,
        link=args.link,
        batch_size=args.batch_size,
        seed=seed,
        full_size_limit=args.full_size_limit,
    )


def _settings_config(settings: Settings) -> dict[str, Any]:
    first = settings.posteriors[0]
    return {
        "likelihood": settings.likelihood,
        "structure": first.structure,
        "subset": first.subset,
        "structures": [posterior.name for posterior in settings.posteriors],
        "full_size_limit": settings.full_size_limit,
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
        return run_study(model, data, settings)
    except ValueError as error:
        raise InputError(str(error)) from error


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


def _posterior_spec(text: str) -> str:
    if text != "every":
        try:
            Posterior.parse(text)
        except ValueError as error:
            raise argparse.ArgumentTypeError(str(error)) from None
    return text
