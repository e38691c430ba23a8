"""Keras callbacks: the Laplace evidence (marginal likelihood) during training.

:class:`MarginalLikelihood` fits a Laplace posterior every few epochs, maximises the log
evidence over the prior precision and writes it to Keras' ``logs`` (so ``History``,
``TensorBoard`` and ``EarlyStopping`` see it); optionally it sets the model's L2 weight
decay to the tuned prior, which is online marginal-likelihood hyperparameter learning
(Immer et al., 2021) with the prior as the one hyperparameter: weight decay chosen
without a validation set.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import keras
import numpy as np

from laplace_tf._checks import positive_int
from laplace_tf._data import DEFAULT_BATCH_SIZE
from laplace_tf.likelihoods import Likelihood
from laplace_tf.posterior.core import Laplace


def weight_decay_factor(
    prior_precision: float,
    n_data: int,
    *,
    temperature: float = 1.0,
    sigma_noise: float | None = None,
) -> float:
    """The Keras ``L2(l2)`` factor whose training objective has the prior ``N(0, 1/delta)``.

    The Laplace posterior belongs to ``sum_n NLL_n / T + delta / 2 ||theta||^2``; Keras
    minimises the mean loss over examples plus ``l2 ||theta||^2``, which is that objective
    divided by ``N / T`` when the compiled loss is the mean NLL (cross-entropy from logits):
    ``l2 = delta T / (2 N)``. For a Gaussian likelihood trained with Keras' mean squared
    error (``2 sigma^2`` times the mean NLL, constants dropped) it is
    ``l2 = delta T sigma^2 / N`` (pass ``sigma_noise``).
    """
    factor = prior_precision * temperature / (2.0 * n_data)
    return factor * (2.0 * sigma_noise**2 if sigma_noise is not None else 1.0)


class MarginalLikelihood(keras.callbacks.Callback):
    """Fit a Laplace posterior every ``every`` epochs and log its tuned log evidence.

    At the end of every ``every``-th epoch: ``Laplace(model, likelihood, structure=...,
    subset=..., curvature=...).fit(data)``, then
    ``optimize_prior_precision(method="marglik")`` from ``prior_precision`` (the same
    start each time, so the result is that of an offline fit on the epoch's weights).
    Writes ``logs["log_evidence"]`` (the log marginal likelihood at the tuned prior, in
    nats for the whole data set) and ``logs["prior_precision"]`` (a scalar prior; the mean
    over layers for ``prior_structure="layerwise"``), and for a tuned noise
    ``logs["sigma_noise"]``. Epochs in between write nothing. The model's weights are
    never changed.

    Parameters
    ----------
    data : (x, y) arrays or tf.data.Dataset
        The training data (Keras does not hand its ``fit`` data to callbacks).
    likelihood, structure, subset, curvature
        As for :class:`~laplace_tf.Laplace`.
    every : int
        Fit every ``every`` epochs (after epochs ``every``, ``2 every``, ...).
    prior_precision : float
        Where the evidence maximisation starts (and the ``Laplace`` prior until then).
    prior_structure : {"scalar", "layerwise"}
        The prior precision tuned.
    optimize_sigma_noise : bool
        Also tune ``sigma_noise`` (regression).
    set_weight_decay : bool
        Set the L2 regulariser of every Dense / Conv kernel in the model to the tuned
        prior (:func:`weight_decay_factor`, which assumes the compiled loss is the mean NLL,
        or the mean squared error for regression); a scalar prior only. The training
        function is rebuilt so the next epoch uses it.
    batch_size : int
        Batch size of the Laplace fit for array data.

    Attributes
    ----------
    laplace : Laplace or None
        The posterior of the last fit (its prior tuned).
    weight_decay : float or None
        The last L2 factor set (``set_weight_decay=True``).
    """

    def __init__(
        self,
        data: Any,
        likelihood: str | Likelihood = "classification",
        *,
        structure: str = "diag",
        subset: str | Sequence[str] = "all",
        curvature: str = "ggn",
        every: int = 1,
        prior_precision: float = 1.0,
        prior_structure: str = "scalar",
        optimize_sigma_noise: bool = False,
        set_weight_decay: bool = False,
        batch_size: int = DEFAULT_BATCH_SIZE,
    ):
        super().__init__()
        if set_weight_decay and prior_structure != "scalar":
            raise ValueError("set_weight_decay=True needs prior_structure='scalar'.")
        self.data = data
        self.likelihood = likelihood
        self.structure, self.subset, self.curvature = structure, subset, curvature
        self.every = positive_int("every", every)
        self.prior_precision = prior_precision
        self.prior_structure = prior_structure
        self.optimize_sigma_noise = optimize_sigma_noise
        self.set_weight_decay = set_weight_decay
        self.batch_size = positive_int("batch_size", batch_size)
        self.laplace: Laplace | None = None
        self.weight_decay: float | None = None

    def on_epoch_end(self, epoch: int, logs: dict | None = None) -> None:
        if (epoch + 1) % self.every:
            return
        la = Laplace(
            self.model,
            self.likelihood,
            structure=self.structure,
            subset=self.subset,
            curvature=self.curvature,
            prior_precision=self.prior_precision,
        )
        la.fit(self.data, batch_size=self.batch_size)
        la.optimize_prior_precision(
            method="marglik",
            prior_structure=self.prior_structure,
            optimize_sigma_noise=self.optimize_sigma_noise,
        )
        self.laplace = la
        if logs is not None:
            logs["log_evidence"] = float(la.log_marginal_likelihood())
            logs["prior_precision"] = float(np.mean(la.prior_precision))
            if self.optimize_sigma_noise:
                logs["sigma_noise"] = float(la.sigma_noise)
        if self.set_weight_decay:
            self._set_weight_decay(la)

    def _set_weight_decay(self, la: Laplace) -> None:
        noise = la.sigma_noise if la.likelihood_object.noise_exponent else None
        factor = weight_decay_factor(
            float(la.prior_precision), la.n_data, temperature=la.temperature, sigma_noise=noise
        )
        for layer in self.model._flatten_layers():
            kernel = getattr(layer, "kernel", None)
            if kernel is None or not hasattr(layer, "kernel_regularizer"):
                continue
            layer.kernel_regularizer = keras.regularizers.L2(factor)
            kernel.regularizer = layer.kernel_regularizer
        self.weight_decay = factor
        if getattr(self.model, "train_function", None) is not None:
            self.model.make_train_function(force=True)  # the factor is traced in
