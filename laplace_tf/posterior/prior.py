"""Prior precision in its three structures: scalar, one value per layer, one per weight."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import tensorflow as tf

PRIOR_STRUCTURES = ("scalar", "layerwise", "diag")


@dataclass(frozen=True)
class PriorPrecision:
    """A validated prior precision for weights grouped by layer.

    ``structure`` is "scalar" (``values`` one float), "layerwise" (one float per group)
    or "diag" (one array per weight).
    """

    structure: str
    values: Any
    groups: tuple

    @classmethod
    def from_value(cls, value: Any, groups: list[list]) -> PriorPrecision:
        """Parse a positive scalar, one value per layer, or arrays shaped like the weights."""
        structure, parts = _classify(value, groups)
        if structure == "scalar":
            values = _check_positive(np.asarray(parts, dtype=float)).item()
        elif structure == "layerwise":
            values = [float(v) for v in _check_positive(np.asarray(parts, dtype=float))]
        else:
            values = [_check_positive(np.asarray(p, dtype=float)) for p in parts]
        return cls(structure, values, tuple(tuple(g) for g in groups))

    @property
    def value(self) -> float | list:
        return self.values if self.structure != "diag" else [v.copy() for v in self.values]

    def per_weight(self) -> list[tf.Tensor]:
        """One tensor per weight (a scalar or the weight's shape), in float64."""
        return PriorPrecision.expand(
            self.values if self.structure != "layerwise" else np.asarray(self.values),
            [list(g) for g in self.groups],
        )

    @staticmethod
    def expand(value: Any, groups: list[list]) -> list[tf.Tensor]:
        """Per-weight precisions from any structure; tensors stay differentiable."""
        structure, parts = _classify(value, groups)
        variables = [v for g in groups for v in g]
        if structure == "scalar":
            scalar = tf.reshape(_float64(parts), [])
            return [scalar for _ in variables]
        if structure == "layerwise":
            per_layer = tf.reshape(_float64(parts), [-1])
            return [per_layer[i] for i, g in enumerate(groups) for _ in g]
        return [tf.reshape(_float64(p), v.shape) for p, v in zip(parts, variables, strict=True)]

    @staticmethod
    def initial_log(prior: PriorPrecision, structure: str, groups: list[list]) -> list[np.ndarray]:
        """Starting point (log precision) of an optimisation in ``structure``."""
        per_weight = [
            np.broadcast_to(p.numpy(), v.shape)
            for p, v in zip(prior.per_weight(), [v for g in groups for v in g], strict=True)
        ]
        if structure == "scalar":
            return [np.array([np.log(np.mean(np.concatenate([p.ravel() for p in per_weight])))])]
        if structure == "layerwise":
            means, start = [], 0
            for g in groups:
                chunk = per_weight[start : start + len(g)]
                means.append(np.log(np.mean(np.concatenate([p.ravel() for p in chunk]))))
                start += len(g)
            return [np.array(means)]
        return [np.log(p).astype(float) for p in per_weight]

    @staticmethod
    def from_log(parts: list[tf.Tensor], template: list[np.ndarray], structure: str) -> Any:
        """The precision (in the form :meth:`expand` reads) from optimised log values."""
        if structure == "scalar":
            return tf.exp(parts[0][0])
        if structure == "layerwise":
            return tf.exp(parts[0])
        return [tf.reshape(tf.exp(p), t.shape) for p, t in zip(parts, template, strict=True)]

    @staticmethod
    def to_value(prior: Any, structure: str) -> Any:
        if structure == "scalar":
            return float(prior)
        if structure == "layerwise":
            return [float(v) for v in np.asarray(prior)]
        return [np.asarray(p) for p in prior]


def _classify(value: Any, groups: list[list]) -> tuple[str, Any]:
    variables = [v for g in groups for v in g]
    if isinstance(value, list | tuple):
        shaped_like_weights = len(value) == len(variables) and all(
            tuple(np.shape(p)) == tuple(v.shape) for p, v in zip(value, variables, strict=True)
        )
        one_per_layer = len(value) == len(groups) and all(np.ndim(p) == 0 for p in value)
        if shaped_like_weights and not one_per_layer:
            return "diag", list(value)
        if one_per_layer:
            return "layerwise", tf.stack([_float64(p) for p in value])
        if shaped_like_weights:
            return "diag", list(value)
        raise ValueError(
            f"prior_precision as a list must hold one value per selected layer ({len(groups)}) "
            f"or one array per selected weight ({len(variables)}, shaped like the weights); "
            f"got {len(value)} entries."
        )
    if np.ndim(value) == 0:
        return "scalar", value
    if np.ndim(value) == 1 and np.shape(value)[0] == len(groups):
        return "layerwise", value
    raise ValueError(
        f"prior_precision must be a scalar, one value per selected layer ({len(groups)}) or one "
        f"array per selected weight; got shape {np.shape(value)}."
    )


def _float64(value: Any) -> tf.Tensor:
    """``value`` as float64; Python and NumPy numbers are not rounded through float32."""
    if isinstance(value, tf.Tensor | tf.Variable):
        return tf.cast(value, tf.float64)
    return tf.constant(np.asarray(value, dtype=np.float64))


def _check_positive(values: np.ndarray) -> np.ndarray:
    if values.size == 0 or not np.all(np.isfinite(values)) or np.any(values <= 0):
        raise ValueError(f"prior_precision must be positive and finite; got {values}.")
    return values
