"""A user-written likelihood: Poisson regression on a log-rate output.

Defines ``PoissonLikelihood``, a :class:`laplace_tf.likelihoods.Likelihood` subclass for
counts ``y ~ Poisson(exp(f))`` (the code of ``docs/likelihoods.md``), trains a small Keras
MLP on synthetic counts, fits ``laplace_tf.Laplace`` with the diagonal and the Kronecker
structures, tunes the prior precision on the marginal likelihood and predicts rates with
the linearised predictive (the base class's Monte Carlo rule). It checks, in float64, the
diagonal GGN against a dense reference ``sum_n J_n^T diag(exp f_n) J_n`` built from
per-example Jacobians, and the loss gradient against automatic differentiation.

Run: ``python examples/poisson_likelihood.py`` (writes no files).
"""

from __future__ import annotations

import argparse
import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import keras  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402
from scipy.special import gammaln  # noqa: E402

import laplace_tf  # noqa: E402
from laplace_tf.likelihoods import Likelihood  # noqa: E402


class PoissonLikelihood(Likelihood):
    """Counts ``y ~ Poisson(exp(f))`` on a log-rate output ``f``.

    ``l = exp(f) - y f + log(y!)``; ``Lambda = exp(f)`` (exact, whatever ``y``), so
    ``S = exp(f / 2)``; the loss gradient is ``exp(f) - y``; the link is the rate ``exp(f)``.
    """

    name = "poisson"

    def nll(self, f, y):
        return tf.reduce_sum(self.nll_rows(f, y))

    def nll_rows(self, f, y):
        y = tf.reshape(tf.cast(y, f.dtype), tf.shape(f))
        return tf.reduce_sum(tf.exp(f) - y * f + tf.math.lgamma(y + 1), axis=-1)

    def hessian_factor(self, f):
        return tf.linalg.diag(tf.exp(f / 2))  # [N, C, C]: S S^T = diag(exp f)

    def loss_gradient(self, f, y):
        return tf.exp(f) - tf.reshape(tf.cast(y, f.dtype), tf.shape(f))

    def sample(self, f, seed):
        return tf.random.stateless_poisson(tf.shape(f), seed, tf.exp(f), dtype=f.dtype)

    def link(self, f):
        return tf.exp(f)

    def predictive_nll(self, predictions, y):
        """Plug-in: the Poisson NLL of ``y`` at the predictive mean rate, per example."""
        rate = np.asarray(predictions, dtype=float)
        y = np.asarray(y, dtype=float).reshape(rate.shape)
        return float(np.mean(np.sum(rate - y * np.log(rate) + gammaln(y + 1), axis=-1)))

    def target_shape_error(self, shape, count, width):
        if shape == (count, width) or (width == 1 and shape == (count,)):
            return None
        return f"[{count}, {width}] (one count per output)"

    def invalid_targets(self, y, n_outputs):
        counts = tf.reshape(tf.cast(y, tf.float64), [tf.shape(y)[0], -1])
        return tf.reduce_any((counts < 0) | (counts != tf.round(counts)), axis=-1)

    def targets_description(self, n_outputs):
        return "non-negative integer counts"


def counts(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """``x`` ``[n, 2]`` and counts with log-rate ``0.5 + 0.8 x_0 - 0.5 x_1``."""
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, 2))
    y = rng.poisson(np.exp(0.5 + 0.8 * x[:, 0] - 0.5 * x[:, 1]))[:, None]
    return x, y.astype("float64")


def train(x: np.ndarray, y: np.ndarray, seed: int) -> keras.Model:
    keras.utils.set_random_seed(seed)
    model = keras.Sequential(
        [keras.Input((2,)), keras.layers.Dense(16, activation="tanh"), keras.layers.Dense(1)]
    )
    model.compile(keras.optimizers.Adam(1e-2), lambda y, f: keras.ops.exp(f) - y * f)
    model.fit(x, y, epochs=60, batch_size=64, verbose=0)
    return model


def dense_ggn_diagonal(model: keras.Model, x: np.ndarray) -> np.ndarray:
    """``diag sum_n J_n^T diag(exp f_n) J_n`` from per-example Jacobians ``[N, C, P]``."""
    variables = model.trainable_variables
    with tf.GradientTape(persistent=True) as tape:
        f = model(tf.constant(x), training=False)
    blocks = tape.jacobian(f, variables, experimental_use_pfor=False)
    n, c = f.shape
    jacobian = np.concatenate([np.reshape(b.numpy(), (n, c, -1)) for b in blocks], -1)
    return np.einsum("ncp,nc,ncp->p", jacobian, np.exp(f.numpy()), jacobian)


def gradient_matches_autodiff(likelihood: PoissonLikelihood, f: tf.Tensor, y) -> bool:
    with tf.GradientTape() as tape:
        tape.watch(f)
        total = likelihood.nll(f, y)
    return bool(np.allclose(tape.gradient(total, f), likelihood.loss_gradient(f, y), rtol=1e-12))


def flat(tensors) -> np.ndarray:
    return np.concatenate([np.ravel(np.asarray(t)) for t in tensors])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=None, help="ignored: this example writes no files")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    keras.config.set_floatx("float64")

    x, y = counts(512, args.seed)
    x_test, y_test = counts(256, args.seed + 1)
    model = train(x, y, args.seed)
    weights = flat(model.trainable_variables)
    likelihood = PoissonLikelihood()

    diagonal = laplace_tf.curvature.diagonal(model, (x, y), likelihood=likelihood)
    reference = dense_ggn_diagonal(model, x)
    gap = np.abs(flat(diagonal) - reference).max() / np.abs(reference).max()
    print(f"max relative gap to the dense GGN diagonal {gap:.2e}")
    print(f"poisson curvature matches a dense reference: {gap < 1e-10}")
    outputs = model(tf.constant(x_test), training=False)
    matches = gradient_matches_autodiff(likelihood, outputs, y_test)
    print(f"poisson gradient matches autodiff: {matches}")

    map_rate = np.exp(outputs.numpy())
    print(f"MAP test NLL {likelihood.predictive_nll(map_rate, y_test):.4f}")
    finite = True
    for structure in ("diag", "kron"):
        la = laplace_tf.Laplace(model, likelihood, structure=structure).fit((x, y))
        la.optimize_prior_precision()
        rate = np.asarray(la.predict(x_test, link_approx="mc", n_samples=200, seed=0))
        finite &= bool(np.all(np.isfinite(rate)) and np.all(rate > 0))
        print(
            f"{structure}: prior precision {float(np.ravel(la.prior_precision)[0]):.3g}, "
            f"log evidence {float(la.log_marginal_likelihood()):.2f}, "
            f"test NLL {likelihood.predictive_nll(rate, y_test):.4f}"
        )
    print(f"predicted rates positive and finite: {finite}")
    print(f"model weights unchanged: {np.array_equal(weights, flat(model.trainable_variables))}")


if __name__ == "__main__":
    main()
