"""Curvature engines: black-box Hessian diagonals and structured GGN / Fisher diagonals."""

from laplace_tf.curvature.hessian import hessian_diagonal, hutchinson_diagonal

__all__ = ["hessian_diagonal", "hutchinson_diagonal"]
