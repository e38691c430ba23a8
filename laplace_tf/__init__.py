"""laplace_tf: Laplace approximations for TensorFlow and Keras 3 models."""

from laplace_tf import curvature, likelihoods, metrics, predictive, serialization
from laplace_tf.laplace import DiagonalLaplace

__version__ = "0.1.0"

__all__ = [
    "DiagonalLaplace",
    "curvature",
    "likelihoods",
    "metrics",
    "predictive",
    "serialization",
    "__version__",
]
