"""Continual learning with the Laplace penalty (EWC) on two digit tasks.

Task 1 is scikit-learn's digits; task 2 the same digits with their 64 pixels permuted by a
fixed random permutation (one shared 10-way head). An MLP is trained on task 1, a diagonal
Laplace posterior is fitted on it (prior precision by the marginal likelihood), and the
model is then trained on task 2 twice from the same weights: plain fine-tuning, and
fine-tuning with ``la.penalty()`` added to the loss (divided by the task-2 example count,
since Keras losses are means). The posterior says which weights task 1 needs; the penalty
holds them, so task 1 is forgotten less. It prints both models' test accuracy on both tasks
per seed, and the claim computed over all seeds.

Run: ``python examples/continual.py [--seeds 0 1]`` (writes no files).
"""

from __future__ import annotations

import argparse
import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import keras  # noqa: E402
import numpy as np  # noqa: E402
from sklearn.datasets import load_digits  # noqa: E402
from sklearn.model_selection import train_test_split  # noqa: E402

from laplace_tf import DiagonalLaplace  # noqa: E402

EPOCHS = 25


def tasks(seed: int):
    """``(train, test)`` of task 1 (digits) and task 2 (pixels permuted)."""
    x, y = load_digits(return_X_y=True)
    x = (x / 16.0).astype("float32")
    x_train, x_test, y_train, y_test = train_test_split(
        x, y, test_size=0.3, random_state=seed, stratify=y
    )
    permutation = np.random.default_rng(seed).permutation(x.shape[1])
    first = ((x_train, y_train), (x_test, y_test))
    second = ((x_train[:, permutation], y_train), (x_test[:, permutation], y_test))
    return first, second


def build(seed: int) -> keras.Model:
    keras.utils.set_random_seed(seed)
    return keras.Sequential(
        [
            keras.Input((64,)),
            keras.layers.Dense(64, activation="relu"),
            keras.layers.Dense(64, activation="relu"),
            keras.layers.Dense(10),
        ]
    )


def train(model: keras.Model, data, loss) -> None:
    model.compile(keras.optimizers.Adam(3e-3), loss)
    model.fit(*data, epochs=EPOCHS, batch_size=64, verbose=0)


def accuracy(model: keras.Model, data) -> float:
    x, y = data
    return float(np.mean(np.argmax(model(x, training=False), -1) == y))


def run(seed: int) -> dict[str, float]:
    (train_1, test_1), (train_2, test_2) = tasks(seed)
    cross_entropy = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    model = build(seed)
    train(model, train_1, cross_entropy)
    before = accuracy(model, test_1)

    la = DiagonalLaplace(model, "classification").fit(train_1)
    la.optimize_prior_precision()
    penalty, count = la.penalty(), len(train_2[0])

    plain = keras.models.clone_model(model)
    plain.set_weights(model.get_weights())
    keras.utils.set_random_seed(seed + 1)
    train(plain, train_2, cross_entropy)

    def penalised(y_true, y_pred):
        return cross_entropy(y_true, y_pred) + penalty() / count

    keras.utils.set_random_seed(seed + 1)
    train(model, train_2, penalised)  # the penalty reads this model's weights
    return {
        "task 1 before": before,
        "fine-tuning task 1": accuracy(plain, test_1),
        "fine-tuning task 2": accuracy(plain, test_2),
        "penalty task 1": accuracy(model, test_1),
        "penalty task 2": accuracy(model, test_2),
        "prior precision": float(la.prior_precision),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--out", default=None, help="ignored: this example writes no files")
    args = parser.parse_args()
    results = []
    for seed in args.seeds:
        result = run(seed)
        results.append(result)
        print(
            f"seed {seed}: task 1 accuracy {result['task 1 before']:.3f} after task 1; "
            f"after task 2: fine-tuning {result['fine-tuning task 1']:.3f} (task 2 "
            f"{result['fine-tuning task 2']:.3f}), penalty {result['penalty task 1']:.3f} "
            f"(task 2 {result['penalty task 2']:.3f}); prior precision "
            f"{result['prior precision']:.3g}"
        )
    less = all(r["penalty task 1"] > r["fine-tuning task 1"] for r in results)
    print(f"penalty forgets less than fine-tuning: {less}")


if __name__ == "__main__":
    main()
