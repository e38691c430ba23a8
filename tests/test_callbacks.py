"""``laplace_tf.callbacks.MarginalLikelihood``: the evidence and tuned prior during ``fit``.

Oracle: an offline ``Laplace(...).fit(data).optimize_prior_precision()`` on the weights the
callback saw (the weights after the epoch, snapshot by a later callback).
"""

from __future__ import annotations

import keras
import numpy as np
import pytest

import laplace_tf
from laplace_tf.callbacks import MarginalLikelihood, weight_decay_factor


def _model(outputs: int, seed: int = 0) -> keras.Model:
    keras.utils.set_random_seed(seed)
    model = keras.Sequential(
        [
            keras.Input((4,)),
            keras.layers.Dense(8, activation="tanh"),
            keras.layers.Dense(outputs),
        ]
    )
    return model


def _classification():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(60, 4)).astype("float32")
    return x, (x[:, 0] + 0.5 * x[:, 1] > 0).astype("int64") + (x[:, 2] > 1)


class _Snapshot(keras.callbacks.Callback):
    def __init__(self):
        super().__init__()
        self.weights = {}

    def on_epoch_end(self, epoch, logs=None):
        self.weights[epoch] = self.model.get_weights()


@pytest.mark.parametrize("structure, subset", [("diag", "all"), ("kron", "last_layer")])
def test_tuned_prior_equals_offline_tuning_on_the_epochs_weights(structure, subset):
    x, y = _classification()
    model = _model(3)
    model.compile(
        keras.optimizers.Adam(0.01), keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    )
    callback = MarginalLikelihood((x, y), structure=structure, subset=subset, every=2)
    snapshot = _Snapshot()
    history = model.fit(x, y, epochs=4, batch_size=20, verbose=0, callbacks=[callback, snapshot])
    assert len(history.history["log_evidence"]) == 2  # after epochs 2 and 4
    assert len(history.history["prior_precision"]) == 2
    for row, epoch in enumerate((1, 3)):
        offline_model = _model(3)
        offline_model.set_weights(snapshot.weights[epoch])
        la = laplace_tf.Laplace(offline_model, structure=structure, subset=subset)
        la.fit((x, y)).optimize_prior_precision()
        tuned = history.history["prior_precision"][row]
        np.testing.assert_allclose(tuned, la.prior_precision, rtol=1e-6)
        np.testing.assert_allclose(
            history.history["log_evidence"][row], float(la.log_marginal_likelihood()), rtol=1e-6
        )
    assert history.history["log_evidence"][0] != history.history["log_evidence"][1]


def test_weight_decay_is_set_to_the_tuned_prior():
    x, y = _classification()
    model = _model(3)
    model.compile(
        keras.optimizers.SGD(0.05), keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    )
    callback = MarginalLikelihood((x, y), set_weight_decay=True)
    history = model.fit(x, y, epochs=2, batch_size=30, verbose=0, callbacks=[callback])
    delta = history.history["prior_precision"][-1]
    expected = delta / (2 * len(x))
    assert callback.weight_decay == pytest.approx(expected, rel=1e-12)
    kernels = [layer.kernel for layer in model.layers]
    penalty = sum(expected * float(np.sum(np.square(k.numpy()))) for k in kernels)
    assert float(sum(model.losses)) == pytest.approx(penalty, rel=1e-5)
    # the next epoch trains with it: its loss includes the decay
    logs = model.train_on_batch(x[:30], y[:30], return_dict=True)
    without = keras.losses.SparseCategoricalCrossentropy(from_logits=True)(y[:30], model(x[:30]))
    assert logs["loss"] > float(without)


def test_regression_logs_the_tuned_noise():
    rng = np.random.default_rng(1)
    x = rng.normal(size=(50, 4)).astype("float32")
    y = (x[:, :1] + 0.1 * rng.normal(size=(50, 1))).astype("float32")
    model = _model(1)
    model.compile(keras.optimizers.Adam(0.01), "mse")
    callback = MarginalLikelihood((x, y), "regression", optimize_sigma_noise=True)
    history = model.fit(x, y, epochs=1, verbose=0, callbacks=[callback])
    la = laplace_tf.Laplace(model, "regression").fit((x, y))
    la.optimize_prior_precision(optimize_sigma_noise=True)
    np.testing.assert_allclose(history.history["sigma_noise"][0], la.sigma_noise, rtol=1e-6)


def test_weight_decay_convention():
    assert weight_decay_factor(4.0, 100) == pytest.approx(0.02)
    assert weight_decay_factor(4.0, 100, temperature=0.5) == pytest.approx(0.01)
    assert weight_decay_factor(4.0, 100, sigma_noise=0.5) == pytest.approx(0.01)


def test_layerwise_weight_decay_is_refused():
    with pytest.raises(ValueError, match="prior_structure='scalar'"):
        MarginalLikelihood(([], []), set_weight_decay=True, prior_structure="layerwise")
