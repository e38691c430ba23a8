"""Likelihoods of discrete targets on logits: softmax classification (integer, one-hot or
soft labels), one binary label per example, and multi-label (``C`` independent binary
labels per example)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import tensorflow as tf

from laplace_tf import predictive
from laplace_tf.likelihoods.base import Likelihood, as_targets, mean_nll

#: Rows of class probabilities must sum to one within this (float64; the total is 1).
ROW_TOLERANCE = 1e-5


class Classification(Likelihood):
    """Softmax cross-entropy on logits ``f`` ``[N, C]``.

    Targets are integer labels in ``[0, C)`` (``[N]`` or ``[N, 1]``), or one row of class
    probabilities per example (``[N, C]``, ``C > 1``: one-hot or soft labels, entries in
    ``[0, 1]`` summing to 1): ``l = -sum_c y_c log softmax(f)_c``. Since the rows sum to
    one, ``Lambda = diag(p) - p p^T`` whatever the targets; it has rank ``C - 1``
    (``Lambda 1 = 0``), and ``S`` has ``K = C - 1`` columns (:func:`_softmax_root`: one
    backward pass fewer than the ``C`` of ``diag(sqrt(p)) - p sqrt(p)^T``). The loss
    gradient is ``p - y``.
    Predictive links: probit, bridge and Monte Carlo over the softmax.
    """

    name = "classification"

    def nll(self, f, y):
        return tf.reduce_sum(self.nll_rows(f, y))

    def nll_rows(self, f, y):
        y = tf.convert_to_tensor(y)
        return _by_target_form(
            f,
            y,
            lambda: tf.nn.sparse_softmax_cross_entropy_with_logits(labels=_as_labels(y), logits=f),
            lambda: tf.nn.softmax_cross_entropy_with_logits(labels=as_targets(y, f), logits=f),
        )

    def hessian_factor(self, f):
        p = tf.nn.softmax(f, axis=-1)
        width = f.shape[-1]
        if width is None or width < 2:
            root = tf.sqrt(p)
            return tf.linalg.diag(root) - p[:, :, None] * root[:, None, :]
        return _softmax_root(p, width)

    def loss_gradient(self, f, y):
        p = tf.nn.softmax(f, axis=-1)
        y = tf.convert_to_tensor(y)
        return _by_target_form(
            f,
            y,
            lambda: p - tf.one_hot(_as_labels(y), tf.shape(f)[-1], dtype=f.dtype),
            lambda: p - as_targets(y, f),
        )

    def sample(self, f, seed):
        return tf.random.stateless_categorical(tf.cast(f, tf.float32), 1, seed=seed)[:, 0]

    def link(self, f):
        return tf.nn.softmax(f, axis=-1)

    def glm_predictive(self, mean, covariance, *, link_approx, n_samples, seed, sigma_noise):
        if link_approx == "probit":
            return predictive.probit(mean, covariance)
        if link_approx == "bridge":
            return predictive.bridge(mean, covariance)
        return super().glm_predictive(
            mean,
            covariance,
            link_approx=link_approx,
            n_samples=n_samples,
            seed=seed,
            sigma_noise=sigma_noise,
        )

    def predictive_nll(self, predictions, y):
        """``-1/N sum_n log p_n[y_n]`` for labels; ``-1/N sum_n sum_c y_nc log p_nc`` (the
        cross-entropy of the predictive against them) for rows of class probabilities."""
        probs = np.asarray(predictions, dtype=float)
        y = np.asarray(y)
        if probs.ndim == 2 and probs.shape[1] > 1 and y.shape == probs.shape:
            logs = np.log(np.clip(probs, 1e-12, None))
            return float(-np.mean(np.sum(y.astype(float) * logs, axis=-1)))
        y = y.reshape(-1)
        return mean_nll(probs[np.arange(len(y)), y.astype(int)])

    def label_range(self, n_outputs):
        return (0, n_outputs)

    def target_shape_error(self, shape, count, width):
        if shape in ((count,), (count, 1)) or (width > 1 and shape == (count, width)):
            return None
        forms = f"[{count}] or [{count}, 1] (one integer label per example)"
        if width > 1:
            forms += (
                f", or [{count}, {width}] (one-hot or soft labels: a row of class "
                "probabilities per example)"
            )
        return forms

    def invalid_targets(self, y, n_outputs):
        """Labels: those that are not integers in ``[0, C)``. Rows of probabilities: those
        with an entry outside ``[0, 1]`` or a sum off 1 by more than :data:`ROW_TOLERANCE`."""
        y = tf.convert_to_tensor(y)
        if not _holds_rows_shape(y.shape, n_outputs):
            return super().invalid_targets(y, n_outputs)
        rows = tf.cast(y, tf.float64)
        outside = tf.reduce_any((rows < -ROW_TOLERANCE) | (rows > 1 + ROW_TOLERANCE), axis=-1)
        return outside | (tf.abs(tf.reduce_sum(rows, axis=-1) - 1) > ROW_TOLERANCE)

    def targets_description(self, n_outputs):
        labels = f"integer labels in [0, {n_outputs})"
        if n_outputs < 2:
            return labels
        return (
            f"{labels} ([N] or [N, 1]), or rows of {n_outputs} class probabilities ([N, "
            f"{n_outputs}] one-hot or soft labels: entries in [0, 1] summing to 1 within "
            f"{ROW_TOLERANCE:g})"
        )


class _Bernoulli(Likelihood):
    """Independent sigmoid cross-entropies, one per output, with 0 / 1 labels:
    ``l = sum_c -y_c log p_c - (1 - y_c) log(1 - p_c)``, ``p = sigmoid(f)``."""

    def nll(self, f, y):
        return tf.reduce_sum(self.nll_rows(f, y))

    def nll_rows(self, f, y):
        labels = as_targets(y, f)
        return tf.reduce_sum(tf.nn.sigmoid_cross_entropy_with_logits(labels=labels, logits=f), -1)

    def loss_gradient(self, f, y):
        return tf.sigmoid(f) - as_targets(y, f)

    def sample(self, f, seed):
        uniform = tf.random.stateless_uniform(tf.shape(f), seed=seed, dtype=f.dtype)
        return tf.cast(uniform < tf.sigmoid(f), f.dtype)

    def link(self, f):
        return tf.sigmoid(f)

    def glm_predictive(self, mean, covariance, *, link_approx, n_samples, seed, sigma_noise):
        """Per output: probit ``sigmoid(f_c / sqrt(1 + pi/8 Sigma_cc))`` or the Monte Carlo
        mean of the sigmoid over ``N(f, Sigma)`` (the bridge is a multi-class rule)."""
        if link_approx == "probit":
            return predictive.probit(mean, covariance, binary=True)
        if link_approx == "bridge":
            raise ValueError(
                f"link_approx='bridge' is a Dirichlet over mutually exclusive classes; the "
                f"{self.name} likelihood has independent sigmoid outputs: use probit or mc."
            )
        return super().glm_predictive(
            mean,
            covariance,
            link_approx=link_approx,
            n_samples=n_samples,
            seed=seed,
            sigma_noise=sigma_noise,
        )

    def predictive_nll(self, predictions, y):
        """``-1/N sum_n sum_c log P(y_nc)`` with ``P(1) = p_nc``, ``P(0) = 1 - p_nc``."""
        p = np.asarray(predictions, dtype=float)
        p = p.reshape(p.shape[0], -1)
        y = np.asarray(y).reshape(p.shape)
        picked = np.clip(np.where(y == 1, p, 1 - p), 1e-12, None)
        return float(-np.mean(np.sum(np.log(picked), axis=-1)))

    def label_range(self, n_outputs):
        return (0, 2)


def _softmax_root(p: tf.Tensor, width: int) -> tf.Tensor:
    """``R [N, C, C - 1]`` with ``R R^T = diag(p) - p p^T`` for probability rows ``p``.

    The most probable class ``m`` is moved last; on the other classes ``q``, in order,
    ``diag(q) - q q^T = L L^T`` has the closed-form Cholesky factor ``L_jj = sqrt(q_j
    s_j+1 / s_j)``, ``L_ij = -q_i sqrt(q_j / (s_j s_j+1))`` (``i > j``), with ``s_j`` the
    mass of classes ``j`` onwards (``m`` included, so ``s_j >= p_m >= 1 / C``: no
    division by a small number). Since ``Lambda 1 = 0``, class ``m``'s row is minus the
    sum of the others."""
    order = tf.argsort(
        tf.cast(tf.one_hot(tf.argmax(p, axis=-1), width), tf.int32), axis=-1, stable=True
    )  # the other classes in order, then m
    q = tf.gather(p, order, batch_dims=1)
    mass = tf.math.cumsum(q, axis=-1, reverse=True)  # s_j, j = 0 .. C - 1
    head, s, s_next = q[:, :-1], mass[:, :-1], mass[:, 1:]
    diagonal = tf.sqrt(head * s_next / s)
    below = -head[:, :, None] * tf.sqrt(head / (s * s_next))[:, None, :]
    lower = tf.linalg.band_part(below, -1, 0) - tf.linalg.band_part(below, 0, 0)
    lower = lower + tf.linalg.diag(diagonal)  # [N, C - 1, C - 1]
    rows = tf.concat([lower, -tf.reduce_sum(lower, axis=1, keepdims=True)], axis=1)
    return tf.gather(rows, tf.argsort(order, axis=-1), batch_dims=1)  # rows back in class order


class Binary(_Bernoulli):
    """Sigmoid cross-entropy on one logit per example, labels 0 / 1 (``[N]`` or ``[N, 1]``).

    ``Lambda = p (1 - p)`` and ``S = sqrt(p (1 - p))`` (``K = 1``). Predictive links:
    probit and Monte Carlo over the sigmoid (the bridge needs two or more classes).
    """

    name = "binary"

    def hessian_factor(self, f):
        p = tf.sigmoid(f)
        return tf.sqrt(p * (1 - p))[:, :, None]

    def target_shape_error(self, shape, count, width):
        if shape in ((count,), (count, 1)):
            return None
        return f"[{count}] or [{count}, 1] (one label per example)"


class Multilabel(_Bernoulli):
    """``C`` independent binary labels per example on ``C`` logits: targets ``[N, C]`` in
    {0, 1}, ``l = sum_c`` sigmoid cross-entropy.

    ``Lambda = diag(p (1 - p))`` and ``S = diag(sqrt(p (1 - p)))`` (``K = C``). Predictive
    per class: probit ``sigmoid(f_c / sqrt(1 + pi/8 Sigma_cc))`` (the diagonal of the output
    covariance) or Monte Carlo over the sigmoids; probabilities ``[N, C]`` that need not
    sum to one.
    """

    name = "multilabel"

    def hessian_factor(self, f):
        p = tf.sigmoid(f)
        return tf.linalg.diag(tf.sqrt(p * (1 - p)))

    def target_shape_error(self, shape, count, width):
        if shape == (count, width) or (width == 1 and shape == (count,)):
            return None
        return f"[{count}, {width}] (one 0 / 1 label per class and example)"

    def targets_description(self, n_outputs):
        return f"labels 0 or 1, one per class ([N, {n_outputs}])"


def _holds_rows_shape(shape: tf.TensorShape, width: int | None) -> bool:
    """Whether targets of a static ``shape`` are rows of ``width > 1`` class probabilities."""
    return width is not None and width > 1 and shape.rank == 2 and shape[-1] == width


def _by_target_form(
    f: tf.Tensor,
    y: tf.Tensor,
    labels: Callable[[], tf.Tensor],
    rows: Callable[[], tf.Tensor],
) -> Any:
    """``rows()`` when ``y`` holds a row of class probabilities per example (``[N, C]``,
    ``C > 1``), ``labels()`` when it holds integer labels; decided from the static shapes
    when they are known, otherwise at run time (a step traced for several shapes)."""
    y = tf.convert_to_tensor(y)
    width = f.shape[-1]
    if width is not None and y.shape.rank is not None and None not in y.shape[1:]:
        return rows() if _holds_rows_shape(y.shape, width) else labels()
    holds_rows = (tf.shape(f)[-1] > 1) & tf.equal(tf.size(y), tf.size(f))
    return tf.cond(holds_rows, rows, labels)


def _as_labels(y: tf.Tensor) -> tf.Tensor:
    """One integer label per example from ``[N]`` or ``[N, 1]`` (any static rank: a step
    traced for both shapes sees a label tensor of unknown rank)."""
    return tf.cast(tf.reshape(y, [-1]), tf.int32)
