"""The exact Hessian diagonal of a plain TensorFlow function, and why nested tapes are wrong.

``hessian_diagonal`` works on any scalar loss of TensorFlow variables, not only on Keras
models. Here the loss is the 10-dimensional Rosenbrock function. Its diagonal is checked
against SciPy finite differences of the gradient, and compared with what two nested
``tf.GradientTape``s give: the Hessian's row sums ``H @ 1``, not its diagonal.

Run: ``python examples/hessian_diagonal_function.py`` (writes no files; ``--out`` is
accepted for symmetry with the other examples and ignored).
"""

from __future__ import annotations

import argparse
import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402
from scipy.differentiate import jacobian  # noqa: E402

from laplace_tf.curvature import hessian_diagonal  # noqa: E402


def rosenbrock(theta: tf.Tensor) -> tf.Tensor:
    """``sum_i 100 (theta_{i+1} - theta_i^2)^2 + (1 - theta_i)^2``."""
    return tf.reduce_sum(100.0 * (theta[1:] - theta[:-1] ** 2) ** 2 + (1.0 - theta[:-1]) ** 2)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=None, help="ignored: this example writes no files")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    start = np.random.default_rng(args.seed).uniform(-1.5, 1.5, size=10)
    theta = tf.Variable(start, dtype=tf.float64)

    (exact,) = hessian_diagonal(lambda: rosenbrock(theta), [theta])
    exact = exact.numpy()

    def gradient(points: np.ndarray) -> np.ndarray:
        """Gradient at each column of ``points`` ([10, ...]), as SciPy's jacobian wants."""
        flat = points.reshape(10, -1).T
        grads = []
        for point in flat:
            value = tf.constant(point)
            with tf.GradientTape() as tape:
                tape.watch(value)
                loss = rosenbrock(value)
            grads.append(tape.gradient(loss, value).numpy())
        return np.stack(grads, axis=-1).reshape(points.shape)

    finite_differences = np.diag(jacobian(gradient, start).df)

    with tf.GradientTape() as outer:
        with tf.GradientTape() as inner:
            loss = rosenbrock(theta)
        grad = inner.gradient(loss, theta)
    row_sums = outer.gradient(grad, theta).numpy()  # seeded with ones: H @ 1

    print("   i   hessian_diagonal   finite differences   nested tapes (H @ 1)")
    for i in range(10):
        print(f"{i:4d} {exact[i]:18.6f} {finite_differences[i]:20.6f} {row_sums[i]:22.6f}")
    error = np.max(np.abs(exact - finite_differences) / np.abs(finite_differences))
    nested_error = np.max(np.abs(row_sums - finite_differences) / np.abs(finite_differences))
    print(f"max relative difference, hessian_diagonal vs finite differences: {error:.2e}")
    print(f"max relative difference, nested tapes vs finite differences: {nested_error:.2e}")
    print(f"hessian_diagonal matches finite differences: {error < 1e-6}")
    print(f"nested tapes give the diagonal: {nested_error < 1e-6}")


if __name__ == "__main__":
    main()
