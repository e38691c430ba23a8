"""Benchmark: DiagonalLaplace at scale, on a ~5M-parameter MLP over a streamed dataset.

A 1024-2048-1536-10 ReLU MLP (5,261,834 parameters) is fitted with
``DiagonalLaplace(model, "classification", curvature=kind).fit(stream)`` where ``stream``
is a ``tf.data.Dataset.from_generator`` that reads batches of a ``.npy`` file written to
a temporary directory (``--source npy``, the default) or draws them from a seeded
generator (``--source generator``): the data are never held whole in memory.

For each size N, each measurement runs in a fresh subprocess: after a warm-up pass over
two batches (tracing), the peak RSS is reset (``/proc/self/clear_refs``) and one pass
over the N examples is timed while ``VmHWM`` records its peak. Reported:

- the time of that pass, and per example;
- the peak RSS of the pass, absolute and above the process's RSS before the warm-up
  (TensorFlow and the model loaded);
- ``fit`` against one plain gradient epoch over the same stream (memory: the gradient
  epoch's own subprocess; time: a median over alternating passes of both on the first
  ``--ratio-size`` examples in the fit's process, robust to a shared machine);
- ``predict`` (GLM, probit) called batch by batch on the stream (``predict`` takes
  arrays, not datasets), against a compiled forward pass over it;
- the growth of the peak RSS from the smallest to the largest N; above 5% it is
  flagged and the exit status is 1.

``--source memmap`` slices batches out of one ``np.load(mmap_mode="r")`` array instead:
its touched file pages count in the process RSS, so its peak grows with N (a check that
the growth flag fires; the pages are reclaimable page cache, not held data).

Run: ``python benchmarks/scale.py [--sizes 4096,16384,65536] [--kinds ggn,ggn_mc]``;
``--quick`` is a smoke run of a few seconds (small model, all in this process).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import keras  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402
from models import CLASSES, gradient_epoch, reset_peak_rss, rss_mib  # noqa: E402

from laplace_tf import DiagonalLaplace  # noqa: E402
from laplace_tf.curvature.structured import KINDS  # noqa: E402

GROWTH_LIMIT = 0.05
WARM_BATCHES = 2
BASELINES = dict.fromkeys(KINDS, "gradient") | {"predict": "forward"}


def build_model(input_dim: int, hidden: list[int]) -> keras.Model:
    """A seeded ReLU MLP ``input_dim - hidden... - 10``."""
    keras.utils.set_random_seed(0)
    layers = [keras.layers.Dense(width, activation="relu") for width in hidden]
    return keras.Sequential([keras.Input((input_dim,)), *layers, keras.layers.Dense(CLASSES)])


# -- data sources: batches of (x float32 [B, D], y int32 [B]) --------------------------------


def write_npy(directory: str, n: int, dim: int) -> None:
    """Write ``x.npy`` ``[n, dim]`` and ``y.npy`` ``[n]`` chunk by chunk (deterministic)."""
    x = np.lib.format.open_memmap(os.path.join(directory, "x.npy"), "w+", np.float32, (n, dim))
    y = np.lib.format.open_memmap(os.path.join(directory, "y.npy"), "w+", np.int32, (n,))
    for start in range(0, n, 4096):
        rng = np.random.default_rng([0, start])
        stop = min(n, start + 4096)
        x[start:stop] = rng.normal(size=(stop - start, dim)).astype(np.float32)
        y[start:stop] = rng.integers(0, CLASSES, stop - start, dtype=np.int32)
    x.flush()
    y.flush()
    del x, y


def npy_batches(directory: str, n: int, batch: int):
    """Batches read from the ``.npy`` files with plain file reads (no memory map)."""
    files = [os.path.join(directory, name) for name in ("x.npy", "y.npy")]
    layouts = []
    for path in files:
        mapped = np.load(path, mmap_mode="r")  # only to read the header's layout
        layouts.append((mapped.offset, mapped.dtype, mapped.shape[1:]))
        del mapped
    handles = [open(path, "rb") for path in files]  # noqa: SIM115
    try:
        for start in range(0, n, batch):
            rows = min(batch, n - start)
            arrays = []
            for handle, (offset, dtype, row_shape) in zip(handles, layouts, strict=True):
                width = int(np.prod(row_shape))
                handle.seek(offset + start * width * dtype.itemsize)
                arrays.append(np.fromfile(handle, dtype, rows * width).reshape(rows, *row_shape))
            yield tuple(arrays)
    finally:
        for handle in handles:
            handle.close()


def memmap_batches(directory: str, n: int, batch: int):
    """Batches sliced (and copied) out of memory-mapped ``.npy`` files."""
    x = np.load(os.path.join(directory, "x.npy"), mmap_mode="r")
    y = np.load(os.path.join(directory, "y.npy"), mmap_mode="r")
    for start in range(0, n, batch):
        yield np.array(x[start : start + batch]), np.array(y[start : start + batch])


def generated_batches(dim: int, n: int, batch: int):
    """Synthetic batches, batch ``i`` drawn from ``default_rng([1, i])``."""
    for index, start in enumerate(range(0, n, batch)):
        rng = np.random.default_rng([1, index])
        rows = min(batch, n - start)
        x = rng.normal(size=(rows, dim)).astype(np.float32)
        yield x, rng.integers(0, CLASSES, rows, dtype=np.int32)


class Stream:
    """One ``tf.data`` pipeline over the first ``n`` examples of a source.

    ``n`` may change between passes while the dataset object stays the same, so that
    functions traced on the warm-up pass are reused for the measured one.
    """

    def __init__(self, source: str, directory: str, dim: int, batch: int):
        self.n = 0

        def batches():
            if source == "generator":
                return generated_batches(dim, self.n, batch)
            read = npy_batches if source == "npy" else memmap_batches
            return read(directory, self.n, batch)

        signature = (
            tf.TensorSpec((None, dim), tf.float32),
            tf.TensorSpec((None,), tf.int32),
        )
        self.dataset = tf.data.Dataset.from_generator(batches, output_signature=signature)
        self.dataset = self.dataset.prefetch(2)
        self.inputs = self.dataset.map(lambda x, y: x)


# -- measurements (in a child process) ------------------------------------------------------


def runner(method: str, model: keras.Model, stream: Stream, batch: int):
    """A function that makes one pass of ``method`` over ``stream``."""
    if method == "gradient":
        return gradient_epoch(model, stream.dataset)
    if method == "forward":
        forward = tf.function(lambda x: model(x, training=False), reduce_retracing=True)
        return lambda: tf.concat([forward(x) for x in stream.inputs], axis=0)
    if method == "predict":
        previous, stream.n = stream.n, WARM_BATCHES * batch
        la = DiagonalLaplace(model, "classification").fit(stream.dataset)
        stream.n = previous
        return lambda: tf.concat([la.predict(x, batch_size=batch) for x in stream.inputs], 0)
    la = DiagonalLaplace(model, "classification", curvature=method)
    return lambda: la.fit(stream.dataset)


def timed(run) -> float:
    start = time.perf_counter()
    run()
    return time.perf_counter() - start


def measure(method: str, n: int, config: dict, model: keras.Model) -> dict:
    """Peak memory and time of one pass of ``method`` over ``n`` streamed examples.

    Memory: the peak RSS of the pass (``VmHWM`` reset after the warm-up) above the RSS
    before anything ran (model built, nothing traced), as in ``curvature.py``. If
    ``method`` has a baseline, the time ratio is a median over ``repeats`` alternating
    passes of both on the first ``ratio_size`` examples, in this process: the cost per
    example does not depend on ``n``, and short passes keep the ratio robust to load.
    """
    batch = config["batch_size"]
    stream = Stream(config["source"], config["directory"], config["input_dim"], batch)
    ready_mib = rss_mib()
    run = runner(method, model, stream, batch)
    stream.n = WARM_BATCHES * batch
    run()  # warm-up: tracing
    stream.n = n
    reset = reset_peak_rss()
    seconds = timed(run)
    peak_mib = rss_mib("VmHWM")
    result = {
        "method": method,
        "n": n,
        "time": seconds,
        "peak_above_ready": peak_mib - ready_mib,
        "peak_rss": peak_mib,
        "peak_reset": reset,
    }
    baseline = BASELINES.get(method)
    if baseline is not None:
        base_run = runner(baseline, model, stream, batch)
        stream.n = WARM_BATCHES * batch
        base_run()
        stream.n = min(n, config["ratio_size"])
        times, base_times = [], []
        for _ in range(config["repeats"]):
            times.append(timed(run))
            base_times.append(timed(base_run))
        result["time_ratio"] = statistics.median(times) / statistics.median(base_times)
    return result


def measure_runs(config: dict) -> list[dict]:
    """:func:`measure` each ``(method, n)`` of ``config["runs"]``, in order, on one model."""
    model = build_model(config["input_dim"], config["hidden"])
    return [measure(method, n, config, model) for method, n in config["runs"]]


def in_subprocess(config: dict) -> list[dict]:
    done = subprocess.run(
        [sys.executable, __file__, "--child", json.dumps(config)],
        capture_output=True,
        text=True,
    )
    if done.returncode != 0:
        sys.stderr.write(done.stderr)
        raise RuntimeError(f"measurement {config['runs']} failed (exit {done.returncode})")
    return json.loads(done.stdout.strip().splitlines()[-1])


# -- report ---------------------------------------------------------------------------------


def print_table(results: list[dict], sizes: list[int], methods: list[str]) -> None:
    by_key = {(r["method"], r["n"]): r for r in results}
    header = ("N", "method", "pass [s]", "us/example", "time x base", "peak [MiB]", "x base")
    print(f"{header[0]:>7} {header[1]:<9}" + "".join(f" {h:>11}" for h in header[2:]), end="")
    print(f" {'peak RSS [MiB]':>15}")
    for n in sizes:
        for method in methods:
            r = by_key[(method, n)]
            base = by_key.get((BASELINES.get(method), n))
            time_ratio = f"{r['time_ratio']:.2f}" if "time_ratio" in r else "-"
            peak = r["peak_above_ready"]
            base_peak = base["peak_above_ready"] if base else 0.0
            # a baseline peak within the RSS sampling resolution has no meaningful ratio
            memory_ratio = f"{peak / base_peak:.2f}" if base_peak > 0 else "-"
            print(
                f"{n:>7} {method:<9} {r['time']:>11.2f} {r['time'] / n * 1e6:>11.0f} "
                f"{time_ratio:>11} {peak:>11.1f} {memory_ratio:>11} "
                f"{r['peak_rss']:>15.1f}"
            )


def print_growth(results: list[dict], sizes: list[int], methods: list[str]) -> bool:
    """Peak RSS growth from the smallest to the largest N; True if any exceeds the limit."""
    by_key = {(r["method"], r["n"]): r for r in results}
    small, large = min(sizes), max(sizes)
    print(f"\npeak RSS growth from N={small} to N={large} ({large / small:g}x the data):")
    grows = False
    for method in methods:
        before, after = by_key[(method, small)], by_key[(method, large)]
        growth = after["peak_rss"] - before["peak_rss"]
        relative = growth / before["peak_rss"]
        grows |= relative > GROWTH_LIMIT
        flag = f"GROWS (> {GROWTH_LIMIT:.0%})" if relative > GROWTH_LIMIT else "ok"
        print(f"  {method:<9} {growth:+8.1f} MiB ({relative:+6.1%})  {flag}")
    return grows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="4096,16384,65536", help="training set sizes N")
    parser.add_argument("--kinds", default="ggn,ggn_mc", help="curvature kinds to fit")
    parser.add_argument("--source", choices=("npy", "generator", "memmap"), default="npy")
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--input-dim", type=int, default=1024)
    parser.add_argument("--hidden", default="2048,1536", help="hidden layer widths")
    parser.add_argument("--repeats", type=int, default=5, help="alternating passes for ratios")
    parser.add_argument("--ratio-size", type=int, default=2048, help="examples per ratio pass")
    parser.add_argument("--skip-predict", action="store_true")
    parser.add_argument("--quick", action="store_true", help="smoke run: small model, one process")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(measure_runs(json.loads(args.child))))
        return
    if args.quick:
        args.sizes, args.kinds, args.input_dim, args.hidden = "512,2048", "ggn", 64, "128,64"
        args.repeats, args.ratio_size = 1, 512
    sizes = sorted(int(s) for s in args.sizes.split(","))
    methods = ["gradient", *(kind for kind in args.kinds.split(",") if kind)]
    if not args.skip_predict:
        methods += ["forward", "predict"]
    hidden = [int(h) for h in args.hidden.split(",")]
    model = build_model(args.input_dim, hidden)
    parameters = sum(v.shape.num_elements() for v in model.trainable_variables)
    widths = "-".join(str(w) for w in (args.input_dim, *hidden, CLASSES))
    print(f"{widths} ReLU MLP, {parameters:,} parameters; batches of {args.batch_size} "
          f"streamed from {args.source}; {os.cpu_count()} CPUs, TF {tf.__version__}")  # fmt: skip

    with tempfile.TemporaryDirectory() as directory:
        if args.source != "generator":
            write_npy(directory, max(sizes), args.input_dim)
        config = {
            "source": args.source,
            "directory": directory,
            "input_dim": args.input_dim,
            "hidden": hidden,
            "batch_size": args.batch_size,
            "repeats": args.repeats,
            "ratio_size": args.ratio_size,
        }
        runs = [(method, n) for n in sizes for method in methods]
        if args.quick:  # a smoke run in this process: memory figures not isolated
            results = measure_runs({**config, "runs": runs})
        else:
            results = [r for run in runs for r in in_subprocess({**config, "runs": [run]})]
    if not all(r["peak_reset"] for r in results):
        print("(VmHWM could not be reset: peaks include the warm-up)")
    print(f"peak: RSS above the process's before the warm-up; time x base: median of "
          f"{args.repeats} alternating passes over {args.ratio_size} examples")  # fmt: skip
    print_table(results, sizes, methods)
    if len(sizes) > 1 and print_growth(results, sizes, methods) and not args.quick:
        sys.exit(1)


if __name__ == "__main__":
    main()
