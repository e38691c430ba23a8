"""Curvature engines: black-box Hessian diagonals and structured GGN / Fisher diagonals."""

from laplace_tf.curvature import (  # noqa: F401  (register their rules)
    conv_rules,
    dense_rules,
    norm_rules,
    recurrent_rules,
)
from laplace_tf.curvature.explain import explain
from laplace_tf.curvature.hessian import hessian_diagonal, hutchinson_diagonal
from laplace_tf.curvature.registry import Rule, register_rule, unregister_rule
from laplace_tf.curvature.structured import (
    KINDS,
    FallbackWarning,
    diagonal,
    is_piecewise_linear,
    output_covariance,
)

__all__ = [
    "KINDS",
    "FallbackWarning",
    "Rule",
    "diagonal",
    "explain",
    "hessian_diagonal",
    "hutchinson_diagonal",
    "is_piecewise_linear",
    "output_covariance",
    "register_rule",
    "unregister_rule",
]
