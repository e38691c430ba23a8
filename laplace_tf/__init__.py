"""laplace_tf: Laplace approximations for TensorFlow and Keras 3 models."""

from laplace_tf import (
    callbacks,
    curvature,
    likelihoods,
    metrics,
    posterior,
    predictive,
    serialization,
)
from laplace_tf._version import __version__
from laplace_tf.laplace import DiagonalLaplace
from laplace_tf.posterior import Laplace

__all__ = [
    "DiagonalLaplace",
    "Laplace",
    "callbacks",
    "curvature",
    "likelihoods",
    "metrics",
    "posterior",
    "predictive",
    "serialization",
    "__version__",
]
