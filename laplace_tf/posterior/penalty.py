"""The Laplace posterior as a quadratic penalty for training on new data (continual learning).

``penalty() = 1/2 (theta - mu)^T Lambda (theta - mu)`` over the selected weights, with
``mu`` the MAP weights captured by ``fit`` and ``Lambda = H / T + delta`` the posterior
precision: the negative log-posterior of the old task up to a constant, so that
``NLL_new(theta) + penalty()`` is the (Laplace-approximate) negative log-posterior given
both tasks. With the diagonal structure this is elastic weight consolidation (EWC,
Kirkpatrick et al., 2017); with ``"kron"`` the Kronecker-factored Laplace penalty
(Ritter et al., 2018), evaluated in each block's eigenbasis (no ``P x P`` matrix); with
``"full"`` the dense quadratic.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import tensorflow as tf

from laplace_tf._checks import unwrap_variable

if TYPE_CHECKING:
    from laplace_tf.posterior.core import Laplace


class Penalty:
    """``() -> 1/2 (theta - mu)^T Lambda (theta - mu)``, reading the model's current weights.

    Built by :meth:`laplace_tf.Laplace.penalty`. Calling it returns a scalar in the
    weights' dtype, differentiable in the model's variables (under a
    ``tf.GradientTape``, inside ``tf.function`` or a Keras ``train_step``). The precision
    and ``mu`` are fixed when it is built (at the current prior precision, temperature
    and noise).

    The posterior precision belongs to the *summed* negative log-likelihood of the old
    data. Keras losses are means over a batch: to add the penalty to a Keras loss of the
    new task with ``n`` examples, divide it by ``n`` (``loss + penalty() / n``), so that
    both terms are per-example; multiply by a strength ``lambda`` to trade the tasks
    (``lambda = 1`` is the Bayesian value).
    """

    def __init__(self, la: Laplace):
        record = la.record
        self._variables = [unwrap_variable(v) for v in la.variables]
        self._mean = [tf.constant(m) for m in record.mean]
        self._quadratic = record.structure.quadratic(la._prior.per_weight(), la._scaling(None))

    @property
    def variables(self) -> list:
        """The weights the penalty reads (the selected ones, in order)."""
        return list(self._variables)

    def __call__(self) -> tf.Tensor:
        deviations = [
            tf.convert_to_tensor(v) - tf.cast(m, v.dtype)
            for v, m in zip(self._variables, self._mean, strict=True)
        ]
        return 0.5 * self._quadratic(deviations)
