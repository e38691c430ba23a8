"""The Laplace posterior core and its structures (diagonal, Kronecker-factored, full)."""

from laplace_tf.posterior.configuration import STRUCTURES
from laplace_tf.posterior.core import Laplace
from laplace_tf.posterior.diagonal import Diagonal
from laplace_tf.posterior.full import Full
from laplace_tf.posterior.kron import Kron
from laplace_tf.posterior.record import FitRecord
from laplace_tf.posterior.structure import Scaling, Structure

__all__ = ["STRUCTURES", "Diagonal", "FitRecord", "Full", "Kron", "Laplace", "Scaling", "Structure"]
