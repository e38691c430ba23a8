"""Curvature engines: black-box Hessian diagonals and structured GGN / Fisher diagonals."""

from laplace_tf.curvature.hessian import hessian_diagonal, hutchinson_diagonal
from laplace_tf.curvature.structured import (
    KINDS,
    diagonal,
    is_piecewise_linear,
    output_covariance,
)

__all__ = [
    "KINDS",
    "diagonal",
    "hessian_diagonal",
    "hutchinson_diagonal",
    "is_piecewise_linear",
    "output_covariance",
]
