"""Benchmark: structured curvature diagonals against one gradient epoch.

For a 784-256-256-10 MLP and a small CNN on 2048 examples (batches of 256), each
curvature kind is timed against one gradient epoch over the same batches in the same
process (alternating, medians over repeats), and its peak of live tensors in a warm
run is measured in a fresh subprocess against the gradient epoch's. The "fallback" row
forces the generic per-example path (no layer rules) to show what the rules buy;
"gradient_pass" is the gradient epoch in one compiled call (as a fit runs its pass),
a stricter baseline ("x pass"). Each ratio is also
given against its FLOP floor (:func:`flop_floor`, from the layer shapes), with
BackPACK's exact diagonal GGN on the same architectures as a reference line.

With ``--processes P``, each model is timed in ``P`` fresh processes, the models in
turn, and each ratio is the median over the processes of the ratio within each (with
its range): the machine's noise between processes is of the order of the gaps measured.

Run: ``python benchmarks/curvature.py [--repeats 5] [--processes 1] [--models mlp,cnn]
[--methods ggn,ggn_mc,ef,fallback] [--skip-memory]``.
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

import keras  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402
from models import CLASSES, gradient_epoch, gradient_pass, mlp_784_256_256_10  # noqa: E402

from laplace_tf.curvature import basics, diagonal, registry, structured  # noqa: E402

N, BATCH = 2048, 256
METHODS = ("gradient", "gradient_pass", "ggn", "ggn_mc", "ef", "fallback")


def build(name: str):
    rng = np.random.default_rng(0)
    keras.utils.set_random_seed(0)
    if name == "mlp":
        model = mlp_784_256_256_10()
        x = rng.normal(size=(N, 784)).astype("float32")
    else:
        model = keras.Sequential(
            [
                keras.Input((28, 28, 1)),
                keras.layers.Conv2D(16, 3, activation="relu"),
                keras.layers.MaxPooling2D(),
                keras.layers.Conv2D(32, 3, activation="relu"),
                keras.layers.MaxPooling2D(),
                keras.layers.Flatten(),
                keras.layers.Dense(CLASSES),
            ]
        )
        x = rng.normal(size=(N, 28, 28, 1)).astype("float32")
    y = rng.integers(0, CLASSES, size=N)
    data = tf.data.Dataset.from_tensor_slices((x, y)).batch(BATCH).cache()
    return model, data


def method_runner(model, data, method: str):
    if method == "gradient":
        return gradient_epoch(model, data)
    if method == "gradient_pass":
        return gradient_pass(model, data)
    if method == "fallback":
        # A copy of the model, traced with the layer rules switched off: its compiled
        # steps (cached per model) then always take the generic path. Traced on the whole
        # dataset, so that the compiled pass over all batches is among them (one batch
        # takes the Python loop, and the pass traced later would have the rules).
        original, model = model, keras.models.clone_model(model)
        model.set_weights(original.get_weights())
        with registry.rules_disabled():
            diagonal(model, data, likelihood="classification", kind="ggn")
    kind = "ggn" if method == "fallback" else method

    def run():
        return diagonal(model, data, likelihood="classification", kind=kind, seed=0)

    return run


def time_methods(name: str, repeats: int, methods) -> dict[str, float]:
    model, data = build(name)
    runners = {m: method_runner(model, data, m) for m in methods}
    for run in runners.values():
        run()  # warm-up: tracing
    times = {m: [] for m in methods}
    for _ in range(repeats):
        for method, run in runners.items():
            start = time.perf_counter()
            run()
            times[method].append(time.perf_counter() - start)
    return {m: statistics.median(t) for m, t in times.items()}


#: Exact diagonal GGN, measured on this machine (issue 15) against a torch gradient epoch
#: on the same architectures: BackPACK's DiagGGNExact.
BACKPACK = {"mlp": 2.29, "cnn": 10.3}


def flop_floor(model: keras.Model, kind: str, columns: int = CLASSES - 1) -> float:
    """FLOPs of ``kind`` over those of a gradient epoch, from the layer shapes.

    Per example, a Dense or Conv2D layer costs ``F = 2 L Q O`` in the forward (``L``
    output locations, ``Q`` inputs per location, ``O`` outputs), the same again to pass
    a cotangent to its input (``B``, not needed below the first layer) and to form its
    weight gradient (``W``). A gradient epoch costs ``sum F + B + W``. The exact GGN
    passes ``K`` cotangents down (``K B``; ``K = C - 1`` columns for the softmax, whose
    output Hessian has rank ``C - 1``); a Dense kernel then needs one squared reduction
    (``W``: ``(a^2)^T sum_k d_k^2``), a conv kernel one per-example gradient per column
    (``K W``). The Monte Carlo GGN and the empirical Fisher pass one cotangent
    and square one gradient: a gradient epoch's FLOPs (floor 1). Element-wise work
    (activations, pooling, squaring) is left out."""
    gradient = curvature = 0.0
    first = True
    for layer in model.layers:
        if isinstance(layer, keras.layers.Dense):
            cost, conv = 2.0 * layer.kernel.shape[0] * layer.kernel.shape[1], False
        elif isinstance(layer, keras.layers.Conv2D):
            locations = int(np.prod(layer.output.shape[1:3]))
            cost, conv = 2.0 * locations * int(np.prod(layer.kernel.shape)), True
        else:
            continue
        backward = 0.0 if first else cost
        first = False
        gradient += 2 * cost + backward
        if kind == "ggn":
            curvature += cost + columns * backward + (columns * cost if conv else cost)
        else:
            curvature += 2 * cost + backward
    return curvature / gradient


def child_memory(name: str, method: str) -> None:
    """Peak of live tensors of a warm run above those live before it (TF's CPU BFC
    allocator statistics): the working set of the method, without tracing and without
    the pages an allocator keeps (which an RSS peak would count), but with the float64
    sums that a fit keeps for the next (``basics.SumsPool``)."""
    model, data = build(name)
    run = method_runner(model, data, method)
    list(data)  # fill the cache before the baseline
    run()  # warm-up: tracing
    for kept in structured._STEPS.get(model, {}).values():
        if isinstance(kept, basics.SumsPool):
            kept.clear()  # the float64 sums a fit keeps for the next one count here
    tf.config.experimental.reset_memory_stats("CPU:0")
    before = tf.config.experimental.get_memory_info("CPU:0")["current"]
    run()
    peak = tf.config.experimental.get_memory_info("CPU:0")["peak"]
    print(json.dumps({"peak_mib": (peak - before) / 2**20}))


def measure_memory(name: str, method: str) -> float:
    out = subprocess.run(
        [sys.executable, __file__, "--child", name, method],
        capture_output=True,
        text=True,
        check=True,
        env={**os.environ, "TF_CPU_ALLOCATOR_USE_BFC": "true"},
    )
    return json.loads(out.stdout.strip().splitlines()[-1])["peak_mib"]


def child_times(name: str, repeats: int, methods) -> None:
    """One process's medians (:func:`time_methods`), printed as JSON for the parent."""
    print(json.dumps(time_methods(name, repeats, methods)))


def process_times(name: str, repeats: int, methods) -> dict[str, float]:
    command = [sys.executable, __file__, "--child-times", name, "--repeats", str(repeats)]
    out = subprocess.run(
        [*command, "--methods", ",".join(methods)],
        capture_output=True,
        text=True,
        check=True,
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def _cell(values: list[float]) -> str:
    """The median, with the range over processes where there are several."""
    median = statistics.median(values)
    if len(values) == 1:
        return f"{median:.2f}"
    return f"{median:.2f} ({min(values):.2f}-{max(values):.2f})"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--processes", type=int, default=1)
    parser.add_argument("--models", default="mlp,cnn")
    parser.add_argument(
        "--methods",
        default=",".join(METHODS),
        help="the methods timed, alternating (the two gradient baselines are always among them)",
    )
    parser.add_argument("--skip-memory", action="store_true")
    parser.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    parser.add_argument("--child-times", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child_memory(*args.child)
        return
    requested = set(args.methods.split(","))
    if unknown := requested - set(METHODS):
        parser.error(f"unknown methods {sorted(unknown)}; valid: {', '.join(METHODS)}")
    methods = [m for m in METHODS if m in requested | {"gradient", "gradient_pass"}]
    if args.child_times:
        child_times(args.child_times, args.repeats, methods)
        return
    names = args.models.split(",")
    print(f"{N} examples, batches of {BATCH}, {os.cpu_count()} CPUs, TF {tf.__version__}; "
          f"medians of {args.repeats} alternating runs"
          + (f", in each of {args.processes} processes per model, the models in turn "
             "(ratios: median over the processes, their range in brackets)"
             if args.processes > 1 else ""))  # fmt: skip
    if args.processes > 1:
        runs = {name: [] for name in names}
        for _ in range(args.processes):
            for name in names:
                runs[name].append(process_times(name, args.repeats, methods))
    else:
        runs = {name: [time_methods(name, args.repeats, methods)] for name in names}
    for name in names:
        times = runs[name]
        memory = {} if args.skip_memory else {m: measure_memory(name, m) for m in methods}
        model = build(name)[0]
        size = sum(v.shape.num_elements() for v in model.trainable_variables)
        print(f"\n{name}: {size:,} parameters")
        width = 19 if args.processes > 1 else 11
        print(
            f"{'method':<13} {'time [s]':>9} {'x gradient':>{width}} {'x pass':>{width}} "
            f"{'floor':>6} {'/ floor':>8} {'tensors [MiB]':>13} {'x grad':>7}"
        )
        for method in methods:
            ratios = [t[method] / t["gradient"] for t in times]
            strict = [t[method] / t["gradient_pass"] for t in times]
            floor = flop_floor(model, "ggn" if method == "fallback" else method)
            mem = memory.get(method)
            mem_cells = (
                f"{mem:>13.1f} {mem / max(memory['gradient'], 1e-9):>7.2f}"
                if mem is not None
                else ""
            )
            seconds = statistics.median(t[method] for t in times)
            print(
                f"{method:<13} {seconds:>9.3f} {_cell(ratios):>{width}} {_cell(strict):>{width}} "
                f"{floor:>6.2f} {statistics.median(ratios) / floor:>8.2f} {mem_cells}"
            )
        if name in BACKPACK:
            floor = flop_floor(model, "ggn")
            print(
                f"{'BackPACK':<13} {'':>9} {BACKPACK[name]:>{width}.2f} {'':>{width}} "
                f"{floor:>6.2f} {BACKPACK[name] / floor:>8.2f}   "
                "(DiagGGNExact, issue 15, torch gradient epoch)"
            )


if __name__ == "__main__":
    main()
