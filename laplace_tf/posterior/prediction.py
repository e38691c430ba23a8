"""Predictive distributions of a fitted :class:`~laplace_tf.Laplace`, for every structure.

The GLM (linearised) predictive takes each example's output covariance from the
structure (:meth:`Structure.glm_moments`) and maps it through a link approximation of
:mod:`laplace_tf.predictive`; the NN predictive evaluates the real network at weight
draws of the structure, through ``stateless_call`` (the model's weights are never
assigned).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import keras
import tensorflow as tf

from laplace_tf import predictive
from laplace_tf._checks import positive_int, resolve_seed, unwrap_variable
from laplace_tf._validation import checked_inputs
from laplace_tf.posterior.configuration import check_choice

if TYPE_CHECKING:
    from laplace_tf.posterior.core import Laplace

PRED_TYPES = ("glm", "nn")


def predict(
    la: Laplace,
    x: Any,
    *,
    pred_type: str,
    link_approx: str,
    n_samples: int,
    seed: int | None,
    include_noise: bool,
    batch_size: int,
):
    """:meth:`Laplace.predict`."""
    _ = la.record
    check_choice("pred_type", pred_type, PRED_TYPES)
    check_choice("link_approx", link_approx, predictive.LINK_APPROXIMATIONS)
    likelihood = la.likelihood_object
    sigma_noise = la.sigma_noise if include_noise and likelihood.noise_exponent else None
    if pred_type == "nn":
        n_samples = positive_int("n_samples", n_samples)
        outputs = sampled_outputs(la, x, n_samples, resolve_seed(seed), batch_size)
        lead = tf.shape(outputs)[1:-1]
        rows = tf.reshape(outputs, [n_samples, -1, outputs.shape[-1]])
        return _unfold(likelihood.nn_predictive(rows, sigma_noise), lead)
    mean, covariance = la._glm(x, batch_size)
    lead, (mean, covariance) = tf.shape(mean)[:-1], as_rows(mean, covariance)
    sampled = link_approx == "mc"
    predictions = likelihood.glm_predictive(
        mean,
        covariance,
        link_approx=link_approx,
        n_samples=positive_int("n_samples", n_samples) if sampled else n_samples,
        seed=[resolve_seed(seed), 0] if sampled else None,
        sigma_noise=sigma_noise,
    )
    return _unfold(predictions, lead)


def as_rows(mean: tf.Tensor, covariance: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
    """GLM moments ``[N, *positions, C]`` / ``[..., C, C]`` as rows ``[R, C]`` / ``[R, C, C]``
    (a likelihood reads rows)."""
    width = mean.shape[-1]
    return tf.reshape(mean, [-1, width]), tf.reshape(covariance, [-1, width, width])


def _unfold(predictions: Any, lead: tf.Tensor) -> Any:
    """A likelihood's predictions for rows, reshaped to ``[N, *positions, ...]``."""
    if lead.shape[0] == 1:
        return predictions
    return tf.nest.map_structure(
        lambda t: tf.reshape(t, tf.concat([lead, tf.shape(t)[1:]], axis=0)), predictions
    )


def predictive_samples(
    la: Laplace,
    x: Any,
    n_samples: int,
    *,
    pred_type: str,
    seed: int | None,
    batch_size: int,
) -> tf.Tensor:
    """:meth:`Laplace.predictive_samples`."""
    _ = la.record
    check_choice("pred_type", pred_type, PRED_TYPES)
    n_samples = positive_int("n_samples", n_samples)
    seed = resolve_seed(seed)
    if pred_type == "glm":
        mean, covariance = la._glm(x, batch_size)
        shape = tf.concat([[n_samples], tf.shape(mean)], axis=0)
        mean, covariance = as_rows(mean, covariance)
        draws = predictive.gaussian_draws(mean, covariance, n_samples=n_samples, seed=[seed, 1])
        outputs = tf.reshape(draws, shape)
    else:
        outputs = sampled_outputs(la, x, n_samples, seed, batch_size)
    return la.likelihood_object.link(outputs)


def sampled_outputs(la: Laplace, x: Any, n_samples: int, seed: int, batch_size: int) -> tf.Tensor:
    """Network outputs ``[S, N, C]`` at ``S`` weight draws, one draw in memory at a time.

    Draw ``s`` of weight ``i`` uses the stateless seed ``fold_in((seed, s), i)`` for every
    batch, so the inputs (arrays or a dataset) are read once.
    """
    if la._nn_forward is None:
        la._nn_forward = stateless_forward(la.network, la.variables)
    mean = la.mean
    draws = []
    for s in range(n_samples):
        draw_seed = tf.constant([seed, s], tf.int64)
        seeds = [tf.random.experimental.stateless_fold_in(draw_seed, i) for i in range(len(mean))]
        draws.append([m + d for m, d in zip(mean, la.weight_deviations(seeds, []), strict=True)])
    outputs = tf.concat(
        [
            tf.stack([la._nn_forward(values, batch) for values in draws])
            for batch in checked_inputs(la.network, x, batch_size)
        ],
        axis=1,
    )
    if not bool(tf.reduce_all(tf.math.is_finite(outputs))):
        deviation = max(
            float(tf.reduce_max(tf.abs(value - m)))
            for values in draws
            for value, m in zip(values, mean, strict=True)
        )
        predictive.warn_non_finite_draws(outputs, deviation)
    return outputs


def stateless_forward(model: keras.Model, variables: list):
    """``(values, x) -> f(x; theta)`` with the selected weights set to ``values`` and the
    others at their current values, evaluated with ``stateless_call``."""
    selected = {id(v): i for i, v in enumerate(variables)}
    positions = [selected.get(id(v)) for v in model.trainable_variables]

    @tf.function(reduce_retracing=True, autograph=False)
    def forward(values, x):
        trainable = [
            unwrap_variable(v) if i is None else values[i]
            for v, i in zip(model.trainable_variables, positions, strict=True)
        ]
        non_trainable = [unwrap_variable(v) for v in model.non_trainable_variables]
        outputs, _ = model.stateless_call(trainable, non_trainable, x, training=False)
        return outputs

    return forward
