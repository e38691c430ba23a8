"""Choosing the weight decay by the Laplace evidence during training, without validation data.

An MLP is trained on scikit-learn's digits with ``laplace_tf.callbacks.MarginalLikelihood``
(every few epochs: a Kronecker-factored Laplace fit, the prior precision tuned by the
marginal likelihood, and the model's L2 decay set to it, ``l2 = delta / (2 N)`` for the
mean cross-entropy), starting from no decay. The same network is trained with a grid of
fixed decays; the script prints the test NLL and accuracy of each, the decay the evidence
chose, and (computed) whether its test accuracy is within 1.5 points of the grid's best,
which was chosen on the test data the evidence never sees.

On this small problem (300 training examples) the evidence over-regularises relative to
the test NLL: the decay feeds back (smaller weights, a larger tuned prior) to about 6e-3
on seeds 0 and 1, where the test-optimal fixed decay is 1e-3 and 1e-4; a single fit at
the end of undecayed training picks about 1.2e-3.

Run: ``python examples/evidence_weight_decay.py [--seed 0]`` (writes no files).
"""

from __future__ import annotations

import argparse
import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import keras  # noqa: E402
import numpy as np  # noqa: E402
from sklearn.datasets import load_digits  # noqa: E402
from sklearn.model_selection import train_test_split  # noqa: E402

from laplace_tf.callbacks import MarginalLikelihood  # noqa: E402

EPOCHS = 60
#: A small training set, where the decay matters.
TRAIN = 300
GRID = (0.0, 1e-5, 1e-4, 1e-3, 1e-2, 1e-1)


def data(seed: int):
    x, y = load_digits(return_X_y=True)
    x = (x / 16.0).astype("float32")
    x_train, x_test, y_train, y_test = train_test_split(
        x, y, train_size=TRAIN, random_state=seed, stratify=y
    )
    return (x_train, y_train), (x_test, y_test)


def build(seed: int, decay: float) -> keras.Model:
    keras.utils.set_random_seed(seed)
    regularizer = keras.regularizers.L2(decay) if decay else None
    model = keras.Sequential(
        [
            keras.Input((64,)),
            keras.layers.Dense(64, activation="relu", kernel_regularizer=regularizer),
            keras.layers.Dense(64, activation="relu", kernel_regularizer=regularizer),
            keras.layers.Dense(10, kernel_regularizer=regularizer),
        ]
    )
    model.compile(
        keras.optimizers.Adam(3e-3), keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    )
    return model


def scores(model: keras.Model, test) -> tuple[float, float]:
    x, y = test
    logits = model(x, training=False)
    nll = float(keras.losses.SparseCategoricalCrossentropy(from_logits=True)(y, logits).numpy())
    return nll, float(np.mean(np.argmax(logits, -1) == y))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=None, help="ignored: this example writes no files")
    args = parser.parse_args()
    train, test = data(args.seed)

    fixed = {}
    for decay in GRID:
        model = build(args.seed, decay)
        model.fit(*train, epochs=EPOCHS, batch_size=32, verbose=0)
        fixed[decay] = scores(model, test)
        print(
            f"fixed decay {decay:8.0e}: test NLL {fixed[decay][0]:.3f}, "
            f"accuracy {fixed[decay][1]:.3f}"
        )

    model = build(args.seed, 0.0)
    evidence = MarginalLikelihood(train, structure="kron", every=10, set_weight_decay=True)
    history = model.fit(*train, epochs=EPOCHS, batch_size=32, verbose=0, callbacks=[evidence])
    nll, accuracy = scores(model, test)
    chosen = evidence.weight_decay
    print(
        f"evidence decay {chosen:8.1e}: test NLL {nll:.3f}, accuracy {accuracy:.3f} "
        f"(prior precision {history.history['prior_precision'][-1]:.3g}, log evidence "
        f"{history.history['log_evidence'][-1]:.1f})"
    )
    best = min(fixed, key=lambda d: fixed[d][0])
    best_accuracy = max(a for _, a in fixed.values())
    print(f"best fixed decay by test NLL: {best:.0e} (NLL {fixed[best][0]:.3f})")
    close = accuracy >= best_accuracy - 0.015
    print(f"evidence test accuracy within 1.5 points of the best fixed decay: {close}")


if __name__ == "__main__":
    main()
