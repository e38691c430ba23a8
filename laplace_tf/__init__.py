"""laplace_tf: Laplace approximations for TensorFlow and Keras 3 models."""

from laplace_tf import curvature, likelihoods, metrics, posterior, predictive, serialization
from laplace_tf.laplace import DiagonalLaplace
from laplace_tf.posterior import Laplace

__version__ = "0.1.0"

__all__ = [
    "DiagonalLaplace",
    "Laplace",
    "curvature",
    "likelihoods",
    "metrics",
    "posterior",
    "predictive",
    "serialization",
    "__version__",
]
