"""Benchmark: the curvature fit on the models people train (keras.applications, text).

For each model (``weights=None``, 32x32x3 inputs, 10 classes; a BiLSTM text classifier
and a small Transformer encoder on 16-token sequences) a fresh subprocess measures, on
the same ``N`` random examples in batches of ``--batch``:

- ``train_first``: ``model.fit(epochs=1)`` in a fresh compile (includes tracing);
- ``gradient``: one epoch of loss gradients, warm (median of ``--repeats``), its peak
  RSS above the process's RSS before it (``VmHWM`` reset), and its peak of live tensors
  above those live before it (TensorFlow's CPU allocator statistics);
- for each kind (``ggn``, ``ggn_mc``, ``ef``; ``last`` is ``ggn`` on the last layer):
  the first ``DiagonalLaplace.fit`` (includes tracing), the warm fit (median), and the
  same two peaks.

Reported ratios: warm fit / warm gradient epoch (the median over repeats of each fit
against a gradient epoch run just before it, so that a slow spell of a shared machine
falls on both), first fit / first training epoch, and
fit peak / gradient peak of live tensors (the RSS keeps pages a previous run freed, so
its peaks above a warm start understate a step's working set). The targets of issue 12
(``ggn_mc`` and ``ef`` <= 2x, ``ggn`` <= 8x, last layer <= 1.3x) are printed beside the
table, not asserted.

Run: ``python benchmarks/zoo.py [--models resnet50,bilstm] [--n 64] [--batch 32]
[--timeout 1800] [--out results.jsonl]`` (a model that fails or runs past ``--timeout``
is reported as such and the others still run);
``--quick`` is a smoke run (three small models, a few examples, two kinds).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
# TensorFlow's BFC allocator on the CPU keeps allocator statistics: the peak bytes of live
# tensors, a working-set figure that the RSS (which keeps freed pages) cannot give.
os.environ.setdefault("TF_CPU_ALLOCATOR_USE_BFC", "true")

import keras  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402
from models import CLASSES, gradient_epoch, reset_peak_rss, rss_mib  # noqa: E402

from laplace_tf import DiagonalLaplace  # noqa: E402

IMAGE_MODELS = {
    "mobilenetv2": lambda: keras.applications.MobileNetV2(alpha=0.35, **_IMAGE),
    "resnet50": lambda: keras.applications.ResNet50(**_IMAGE),
    "efficientnetb0": lambda: keras.applications.EfficientNetB0(**_IMAGE),
    "densenet121": lambda: keras.applications.DenseNet121(**_IMAGE),
    "convnexttiny": lambda: keras.applications.ConvNeXtTiny(**_IMAGE),
}
_IMAGE = {
    "weights": None,
    "input_shape": (32, 32, 3),
    "classes": CLASSES,
    "classifier_activation": None,
}
VOCABULARY, TOKENS = 1000, 16
TARGETS = {"ggn": 8.0, "ggn_mc": 2.0, "ef": 2.0, "last": 1.3}
QUICK = {"models": ["mobilenetv2", "bilstm", "transformer"], "n": 8, "kinds": ["ggn_mc", "last"]}


def bilstm() -> keras.Model:
    inputs = keras.Input((TOKENS,), dtype="int32")
    h = keras.layers.Embedding(VOCABULARY, 32, mask_zero=True)(inputs)
    h = keras.layers.Bidirectional(keras.layers.LSTM(32))(h)
    return keras.Model(inputs, keras.layers.Dense(CLASSES)(h), name="bilstm")


def transformer() -> keras.Model:
    """One encoder block: embedding + positions, attention, LayerNorm, feed-forward."""
    inputs = keras.Input((TOKENS,), dtype="int32")
    h = keras.layers.Embedding(VOCABULARY, 32)(inputs)
    attended = keras.layers.MultiHeadAttention(num_heads=4, key_dim=8)(h, h)
    h = keras.layers.LayerNormalization()(h + attended)
    forward = keras.layers.Dense(32)(keras.layers.Dense(64, activation="gelu")(h))
    h = keras.layers.LayerNormalization()(h + forward)
    h = keras.layers.GlobalAveragePooling1D()(h)
    return keras.Model(inputs, keras.layers.Dense(CLASSES)(h), name="transformer")


MODELS = {**IMAGE_MODELS, "bilstm": bilstm, "transformer": transformer}


def data(name: str, n: int):
    rng = np.random.default_rng(0)
    if name in IMAGE_MODELS:
        x = rng.normal(size=(n, 32, 32, 3)).astype("float32")
    else:
        x = rng.integers(1, VOCABULARY, (n, TOKENS)).astype("int32")
    return x, rng.integers(0, CLASSES, n).astype("int32")


def _timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def _tensor_mib(field: str) -> float:
    """Live-tensor bytes of the CPU allocator (``current`` / ``peak``), in MiB; NaN where
    TensorFlow keeps no statistics (without ``TF_CPU_ALLOCATOR_USE_BFC``)."""
    try:
        return tf.config.experimental.get_memory_info("CPU:0")[field] / 2**20
    except ValueError:
        return float("nan")


def _peak_above(fn) -> tuple[float, float, float]:
    """Time of ``fn()``, its peak RSS above the RSS before it and its peak of live tensors
    above those live before it (MiB)."""
    before, tensors = rss_mib(), _tensor_mib("current")
    reset_peak_rss()
    try:
        tf.config.experimental.reset_memory_stats("CPU:0")
    except ValueError:
        pass
    seconds = _timed(fn)
    return seconds, rss_mib("VmHWM") - before, _tensor_mib("peak") - tensors


def measure(name: str, n: int, batch: int, kinds: list[str], repeats: int) -> dict:
    """All measurements of one model, in this process."""
    keras.utils.set_random_seed(0)
    x, y = data(name, n)
    trained = MODELS[name]()
    trained.compile("sgd", keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    result = {
        "model": name,
        "weights": int(sum(v.shape.num_elements() for v in trained.trainable_variables)),
        "train_first": _timed(lambda: trained.fit(x, y, batch_size=batch, epochs=1, verbose=0)),
    }
    model = MODELS[name]()
    model.set_weights(trained.get_weights())
    dataset = tf.data.Dataset.from_tensor_slices((x, y)).batch(batch)
    gradient = gradient_epoch(model, dataset)
    gradient()
    times, peak, tensors = [], 0.0, 0.0
    for _ in range(repeats):
        seconds, above, live = _peak_above(gradient)
        times.append(seconds)
        peak, tensors = max(peak, above), max(tensors, live)
    result["gradient"] = {"warm": statistics.median(times), "peak": peak, "tensors": tensors}
    for kind in kinds:
        curvature, subset = ("ggn", "last_layer") if kind == "last" else (kind, "all")

        def fit(curvature=curvature, subset=subset):
            DiagonalLaplace(model, "classification", curvature=curvature, subset=subset).fit(
                dataset, seed=0
            )

        first, peak, tensors = _peak_above(fit)
        warm, ratios = [], []
        for _ in range(repeats):  # each warm fit paired with a gradient epoch just before
            epoch = _timed(gradient)
            seconds, above, live = _peak_above(fit)
            warm.append(seconds)
            ratios.append(seconds / epoch)
            peak, tensors = max(peak, above), max(tensors, live)
        result[kind] = {
            "first": first,
            "warm": statistics.median(warm),
            "ratio": statistics.median(ratios),
            "peak": peak,
            "tensors": tensors,
        }
    return result


def run_isolated(name: str, args) -> dict:
    command = [
        sys.executable,
        os.path.abspath(__file__),
        "--one",
        name,
        "--n",
        str(args.n),
        "--batch",
        str(args.batch),
        "--kinds",
        ",".join(args.kinds),
        "--repeats",
        str(args.repeats),
    ]
    try:
        done = subprocess.run(
            command, capture_output=True, text=True, env=os.environ, timeout=args.timeout
        )
    except subprocess.TimeoutExpired:
        if args.quick:
            raise
        return {"model": name, "error": f"not finished in {args.timeout:g} s"}
    if done.returncode != 0:
        sys.stderr.write(done.stderr[-4000:])
        if args.quick:
            raise RuntimeError(f"measurement of {name} failed (exit {done.returncode})")
        return {"model": name, "error": f"exit {done.returncode}"}
    return json.loads(done.stdout.strip().splitlines()[-1])


def print_table(results: list[dict], kinds: list[str]) -> None:
    print(f"{'model':<15} {'weights':>10} {'grad [s]':>9} {'grad MiB':>9}", end="")
    print(f" {'tensors':>8}", end="")
    for kind in kinds:
        print(f" {kind + ' warm':>11} {'first':>7} {'memory':>7}", end="")
    print()
    for r in results:
        if "error" in r:
            print(f"{r['model']:<15} failed: {r['error']}")
            continue
        gradient = r["gradient"]
        print(f"{r['model']:<15} {r['weights']:>10,} {gradient['warm']:>9.2f}", end="")
        print(f" {gradient['peak']:>9.0f} {gradient.get('tensors', float('nan')):>8.0f}", end="")
        for kind in kinds:
            k = r[kind]
            base, used = gradient.get("tensors", float("nan")), k.get("tensors", float("nan"))
            if not base > 0:  # no allocator statistics: the RSS peaks
                base, used = gradient["peak"], k["peak"]
            memory = used / base if base > 0 else float("nan")
            print(
                f" {k.get('ratio', k['warm'] / gradient['warm']):>10.2f}x"
                f" {k['first'] / r['train_first']:>6.2f}x"
                f" {memory:>6.2f}x",
                end="",
            )
        print()
    print(
        "\nwarm: median of warm fit / the gradient epoch run just before it (targets "
        + ", ".join(f"{k} <= {v:g}x" for k, v in TARGETS.items() if k in kinds)
        + "); first: first fit / first model.fit epoch; memory: fit peak / gradient peak"
        " (live tensors above those before; MiB columns: gradient RSS peak, tensor peak)."
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default=",".join(MODELS))
    parser.add_argument("--kinds", default="ggn,ggn_mc,ef,last")
    parser.add_argument("--n", type=int, default=64)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--timeout", type=float, default=1800, help="seconds per model")
    parser.add_argument("--out", help="append each model's result to this JSON-lines file")
    parser.add_argument("--one", help=argparse.SUPPRESS)
    args = parser.parse_args()
    args.kinds = args.kinds.split(",")
    if args.one:
        print(json.dumps(measure(args.one, args.n, args.batch, args.kinds, args.repeats)))
        return
    models = args.models.split(",")
    if args.quick:
        models, args.n, args.batch, args.kinds, args.repeats = (
            QUICK["models"],
            QUICK["n"],
            QUICK["n"],
            QUICK["kinds"],
            1,
        )
    unknown = sorted(set(models) - set(MODELS))
    if unknown:
        parser.error(f"unknown models {unknown}; known: {', '.join(MODELS)}")
    results = []
    for name in models:
        results.append(run_isolated(name, args))
        if args.out:
            with open(args.out, "a") as out:
                out.write(json.dumps(results[-1]) + "\n")
    print_table(results, args.kinds)


if __name__ == "__main__":
    main()
