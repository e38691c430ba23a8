"""laplace_tf: Laplace approximations for TensorFlow and Keras 3 models."""

from laplace_tf import curvature

__version__ = "0.1.0"

__all__ = ["curvature", "__version__"]
