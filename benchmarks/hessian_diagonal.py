"""Benchmark: vectorised exact Hessian diagonal vs. a Python loop of Hessian-vector products.

For each parameter count P the loss is non-quadratic with a dense, coupled Hessian:

* ``--model tanh`` (default): ``L(w) = sum_i tanh(x_i . w)^2`` with ``X`` of shape [n, P]
  (Hessian ``X^T diag(.) X``, dense);
* ``--model mlp``: summed softmax cross-entropy of a one-hidden-layer tanh MLP whose
  parameter count is about P.

Timed (float32), for each P on a freshly built loss and parameters:

* ``t_first``: the very first :func:`laplace_tf.curvature.hessian_diagonal` call for that
  P, timed once before anything else runs on that problem. It includes building and tracing
  the ``tf.function``s, the one-time cost a user pays per loss function and parameter list.
  (Before the first P, one call on a tiny throwaway loss absorbs TensorFlow's process-wide
  start-up costs, so they are not charged to the first row.)
* ``t_diag``: the same public call repeated with the same ``loss_fn`` and parameters; it then
  reuses the ``tf.function``s cached by the first call, so this is the steady-state cost;
* ``t_loop``: a Python loop of P calls to one ``tf.function``'d reverse-over-reverse
  Hessian-vector product with the one-hot vector ``e_j``, each returning ``(H e_j)_j``.
  Above ``--max-loop-calls`` only ``--loop-sample`` calls are timed and the time is
  extrapolated linearly to P calls (marked ``*``);
* ``t_grad``: one ``tf.function``'d gradient evaluation.

``t_diag``, ``t_loop`` and ``t_grad`` are medians over ``--repeats`` calls, each after one
untimed warm-up call (which traces ``t_loop``'s and ``t_grad``'s functions). The loop's
entries are checked against ``hessian_diagonal`` so that both compute the same thing.

Usage: ``python benchmarks/hessian_diagonal.py [--sizes 100,1000,10000] [--repeats 5]``
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np
import tensorflow as tf

from laplace_tf.curvature import hessian_diagonal


def tanh_problem(size: int, num_data: int, rng: np.random.Generator):
    x = tf.constant(rng.normal(size=(num_data, size)) / np.sqrt(size), tf.float32)
    w = tf.Variable(rng.normal(size=(size,)), dtype=tf.float32, name="w")

    def loss_fn():
        return tf.reduce_sum(tf.tanh(tf.linalg.matvec(x, w)) ** 2)

    return loss_fn, [w]


def mlp_problem(size: int, num_data: int, rng: np.random.Generator):
    num_in, num_classes = 8, 4
    hidden = max(1, round((size - num_classes) / (num_in + 1 + num_classes)))
    x = tf.constant(rng.normal(size=(num_data, num_in)), tf.float32)
    y = tf.constant(np.eye(num_classes)[rng.integers(0, num_classes, num_data)], tf.float32)
    shapes = [(num_in, hidden), (hidden,), (hidden, num_classes), (num_classes,)]
    params = [
        tf.Variable(rng.normal(size=s) / np.sqrt(s[0] if len(s) == 2 else 10.0), dtype=tf.float32)
        for s in shapes
    ]

    def loss_fn():
        w1, b1, w2, b2 = params
        logits = tf.tanh(x @ w1 + b1) @ w2 + b2
        return tf.reduce_sum(tf.nn.softmax_cross_entropy_with_logits(labels=y, logits=logits))

    return loss_fn, params


def make_hvp_entry(loss_fn, params):
    """``j -> (H e_j)_j``: one reverse-over-reverse Hessian-vector product per call."""
    shapes = [p.shape for p in params]
    sizes = [s.num_elements() for s in shapes]
    total = sum(sizes)

    @tf.function
    def hvp_entry(j: tf.Tensor) -> tf.Tensor:
        one_hot = tf.one_hot(j, total, dtype=params[0].dtype)
        vectors = [tf.reshape(v, s) for v, s in zip(tf.split(one_hot, sizes), shapes, strict=True)]
        with tf.GradientTape() as outer:
            with tf.GradientTape() as inner:
                loss = loss_fn()
            gradient = inner.gradient(loss, params)
        products = outer.gradient(
            gradient,
            params,
            output_gradients=vectors,
            unconnected_gradients=tf.UnconnectedGradients.ZERO,
        )
        return tf.gather(tf.concat([tf.reshape(h, [-1]) for h in products], 0), j)

    return hvp_entry, total


def make_gradient(loss_fn, params):
    @tf.function
    def gradient():
        with tf.GradientTape() as tape:
            loss = loss_fn()
        return tape.gradient(loss, params)

    return gradient


def first_time(fn) -> float:
    """Seconds of one call of ``fn``; meant for the very first call (including tracing)."""
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def median_time(fn, repeats: int) -> float:
    fn()  # untimed warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def absorb_process_start_up() -> None:
    """One untimed ``hessian_diagonal`` call on a tiny throwaway loss.

    It takes TensorFlow's process-wide one-time costs (first graph building and tracing,
    lazily loaded modules) off the first size's ``t_first``.
    """
    w = tf.Variable([1.0, 2.0])
    hessian_diagonal(lambda: tf.reduce_sum(tf.tanh(w) ** 2), [w])


def benchmark(size: int, args: argparse.Namespace) -> dict:
    rng = np.random.default_rng(size)
    build = tanh_problem if args.model == "tanh" else mlp_problem
    loss_fn, params = build(size, args.num_data, rng)
    hvp_entry, total = make_hvp_entry(loss_fn, params)
    gradient = make_gradient(loss_fn, params)

    loop_calls = total if total <= args.max_loop_calls else min(total, args.loop_sample)
    indices = [tf.constant(j, tf.int32) for j in range(loop_calls)]
    loop_result = np.zeros(loop_calls, dtype=np.float32)

    def loop():
        for j, index in enumerate(indices):
            loop_result[j] = hvp_entry(index).numpy()

    def diag():
        return [d.numpy() for d in hessian_diagonal(loss_fn, params)]

    def grad():
        return [g.numpy() for g in gradient()]

    t_first = first_time(diag)  # before any other call on this problem: includes tracing
    t_diag = median_time(diag, args.repeats)
    t_loop = median_time(loop, args.repeats) * total / loop_calls
    t_grad = median_time(grad, args.repeats)

    exact = np.concatenate([d.ravel() for d in diag()])
    scale = max(float(np.max(np.abs(exact))), 1e-30)
    mismatch = float(np.max(np.abs(loop_result - exact[:loop_calls]))) / scale
    return {
        "P": total,
        "t_first": t_first,
        "t_diag": t_diag,
        "t_loop": t_loop,
        "estimated": loop_calls < total,
        "loop_calls": loop_calls,
        "t_grad": t_grad,
        "mismatch": mismatch,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="100,1000,10000", help="comma-separated P values")
    parser.add_argument("--repeats", type=int, default=5, help="timed repeats (median)")
    parser.add_argument("--model", choices=["tanh", "mlp"], default="tanh")
    parser.add_argument("--num-data", type=int, default=64, help="data points in the loss")
    parser.add_argument(
        "--max-loop-calls", type=int, default=1000, help="largest P whose loop is timed in full"
    )
    parser.add_argument(
        "--loop-sample", type=int, default=500, help="HVP calls timed when P is larger"
    )
    args = parser.parse_args()
    sizes = [int(s) for s in args.sizes.split(",") if s.strip()]

    print(
        f"model={args.model}, float32, n={args.num_data}; t_first: one first call, others: "
        f"median of {args.repeats} repeats after a warm-up call; TF {tf.__version__}, "
        f"{len(tf.config.list_physical_devices('GPU'))} GPU(s)"
    )
    absorb_process_start_up()
    header = (
        f"{'P':>7} {'t_first [s]':>12} {'t_diag [s]':>11} {'t_loop [s]':>12} "
        f"{'t_grad [s]':>11} {'loop/diag':>10} {'diag/grad':>10} {'max rel diff':>13}"
    )
    print(header)
    print("-" * len(header))
    rows = []
    for size in sizes:
        row = benchmark(size, args)
        rows.append(row)
        loop = f"{row['t_loop']:.4f}{'*' if row['estimated'] else ' '}"
        print(
            f"{row['P']:>7d} {row['t_first']:>12.4f} {row['t_diag']:>11.4f} {loop:>12} "
            f"{row['t_grad']:>11.2e} {row['t_loop'] / row['t_diag']:>9.1f}x "
            f"{row['t_diag'] / row['t_grad']:>9.0f}x {row['mismatch']:>13.1e}",
            flush=True,
        )
    for row in rows:
        if row["estimated"]:
            print(
                f"* P={row['P']}: loop time extrapolated from {row['loop_calls']} of "
                f"{row['P']} HVP calls (x{row['P'] / row['loop_calls']:.0f})."
            )
    print(
        "t_first: the first hessian_diagonal call for this P (new loss_fn and params), timed\n"
        "  once; it includes building and tracing the tf.functions (TF's process-wide start-up\n"
        "  was absorbed beforehand by an untimed call on a tiny loss). t_diag: the same call\n"
        "  repeated with the same loss_fn and params, reusing the cached tf.functions\n"
        "  (median). loop/diag = t_loop / t_diag, diag/grad = t_diag / t_grad. max rel diff:\n"
        "  max |loop entry - hessian_diagonal entry| over the loop's entries (float32),\n"
        "  relative to max |diag|."
    )


if __name__ == "__main__":
    main()
