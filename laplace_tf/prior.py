"""Prior precision in its three structures; re-exported from
:mod:`laplace_tf.posterior.prior`, where it lives (this import path keeps working)."""

from laplace_tf.posterior.prior import PRIOR_STRUCTURES, PriorPrecision

__all__ = ["PRIOR_STRUCTURES", "PriorPrecision"]
