"""Prior-precision tuning; re-exported from :mod:`laplace_tf.posterior.tuning`, where it
lives (this import path keeps working)."""

from laplace_tf.posterior.tuning import gridsearch, optimize_marglik, predictive_nll

__all__ = ["gridsearch", "optimize_marglik", "predictive_nll"]
