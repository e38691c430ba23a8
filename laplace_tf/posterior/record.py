"""The fitted state of a :class:`~laplace_tf.Laplace`: a frozen record of what ``fit``
produced and of the configuration it was computed with."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import tensorflow as tf

from laplace_tf.posterior.structure import Structure


@dataclass(frozen=True)
class FitRecord:
    """What one ``fit`` produced.

    Attributes
    ----------
    structure : Structure
        The fitted curvature in its posterior structure (Diagonal, Kron or Full).
    curvature : str
        The curvature kind it was computed with.
    likelihood : str or Likelihood
        The likelihood it was computed with.
    subset : str or tuple of str
        The weight selection it was computed for.
    loss : float
        The MAP negative log-likelihood at unit noise less the likelihood's
        ``log_normaliser`` (for regression half the squared error; the NLL itself for a
        likelihood without noise).
    n_data, n_outputs : int
        Number of training examples and model outputs.
    mean : tuple of tf.Tensor
        The MAP weights (posterior mean), copied at fit time.
    """

    structure: Structure
    curvature: str
    likelihood: Any
    subset: str | tuple[str, ...]
    loss: float
    n_data: int
    n_outputs: int
    mean: tuple[tf.Tensor, ...]

    def changes(self, configuration: dict[str, Any]) -> list[str]:
        """``"name='fitted' (now 'current')"`` for every fitted setting that differs now."""
        fitted = {
            "structure": self.structure.name,
            "curvature": self.curvature,
            "likelihood": self.likelihood,
            "subset": self.subset,
        }
        return [
            f"{name}={fitted[name]!r} (now {value!r})"
            for name, value in configuration.items()
            if fitted[name] != value
        ]
