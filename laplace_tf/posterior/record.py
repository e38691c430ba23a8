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
    n_data : int or float
        The number of training examples, weighted by their ``sample_weight`` (a float
        when the weights make it fractional).
    n_outputs : int
        Model outputs per example (per position for outputs with positions).
    mean : tuple of tf.Tensor
        The MAP weights (posterior mean), copied at fit time.
    n_rows : int or float, optional
        The weighted number of loss terms: examples times positions, each weighted by its
        sample weight and mask (``None``, as in files of 0.1 / 0.2: ``n_data``).
    """

    structure: Structure
    curvature: str
    likelihood: Any
    subset: str | tuple[str, ...]
    loss: float
    n_data: int
    n_outputs: int
    mean: tuple[tf.Tensor, ...]
    n_rows: int | float | None = None

    @property
    def n_entries(self) -> float:
        """The weighted number of output entries the likelihood's normaliser counts."""
        rows = self.n_data if self.n_rows is None else self.n_rows
        return rows * self.n_outputs

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
