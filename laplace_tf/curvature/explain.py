"""Which rule differentiates each weight, and what it roughly costs, before fitting.

:func:`explain` records the curvature forward pass symbolically (no data, no compute):
the same trace as a fit, so a layer is reported as ``"fallback"`` exactly when a fit
would send it through the generic per-example fallback.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import keras
import tensorflow as tf

from laplace_tf.curvature.layers import PerExample, Rows
from laplace_tf.curvature.structured import _model_variables
from laplace_tf.curvature.tracing import Site, graph_of, trace

FALLBACK = "fallback"
#: How much dearer the fallback is per weight and position than a rule (a rough figure,
#: measured on small CPU models: one vectorised backward pass per example and column).
FALLBACK_COST_FACTOR = 10.0


@dataclass(frozen=True)
class ExplainedLayer:
    """One parameterised layer of a traced model (or the whole model, for the fallback
    that covers a model the per-layer trace cannot express).

    ``cost`` is this layer's estimated share of the curvature cost (the shares sum to 1):
    multiply-adds per example and column, about ``weights x positions`` (the number of
    output positions a weight is used at), times :data:`FALLBACK_COST_FACTOR` for the
    fallback. A rough guide to where time goes, not a measurement.
    """

    layer: str
    layer_class: str
    weights: tuple[str, ...]
    size: int
    rule: str
    factors: tuple[str, ...]
    cost: float

    @property
    def is_fallback(self) -> bool:
        return self.rule == FALLBACK


class Explanation(list):
    """A list of :class:`ExplainedLayer`, printed as a table."""

    @property
    def fallback(self) -> list[ExplainedLayer]:
        """The layers that take the slow per-example fallback."""
        return [record for record in self if record.is_fallback]

    def __str__(self) -> str:
        header = ("layer", "class", "weights", "size", "rule", "factors", "cost")
        rows = [
            (
                r.layer,
                r.layer_class,
                ", ".join(w.rsplit("/", 1)[-1] for w in r.weights),
                str(r.size),
                r.rule,
                ", ".join(r.factors),
                f"{100 * r.cost:.1f}%",
            )
            for r in self
        ]
        widths = [max(len(row[i]) for row in (header, *rows)) for i in range(len(header))]
        lines = [
            "  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip()
            for row in (header, *rows)
        ]
        lines.insert(1, "  ".join("-" * w for w in widths))
        fallback = self.fallback
        if fallback:
            share = sum(r.size for r in fallback) / max(1, sum(r.size for r in self))
            lines.append(
                f"{len(fallback)} layer(s) take the per-example fallback: {100 * share:.1f}% of "
                f"the weights, about {100 * sum(r.cost for r in fallback):.0f}% of the cost."
            )
        return "\n".join(lines)

    __repr__ = __str__


def explain(model: keras.Model, params: Sequence[Any] | None = None) -> Explanation:
    """Each parameterised layer's curvature rule (or the fallback) and estimated cost.

    Parameters
    ----------
    model : keras.Model
        A built model; Functional and Sequential models are traced layer by layer, a
        subclassed model is one fallback.
    params : list of variables, optional
        The weights whose curvature is wanted (default ``model.trainable_variables``), as
        for :func:`~laplace_tf.curvature.diagonal`.

    Returns
    -------
    Explanation
        One :class:`ExplainedLayer` per layer owning selected weights, in trace order;
        ``print`` it for a table.
    """
    sites = _sites(model, _model_variables(model, params))
    total = sum(cost for _, _, cost in sites) or 1.0
    return Explanation(
        ExplainedLayer(
            layer=site.layer.name,
            layer_class=type(site.layer).__name__,
            weights=tuple(v.path for v in site.variables),
            size=_size(site.variables),
            rule=FALLBACK if site.rule is None else site.rule.name or type(site.layer).__name__,
            factors=factors,
            cost=cost / total,
        )
        for site, factors, cost in sites
    )


def _sites(model, variables) -> list[tuple[Site, tuple[str, ...], float]]:
    """The trace's sites with their factors' class names and costs, recorded in a
    throwaway graph. A model without a graph is one fallback site, as in the trace."""
    graph = graph_of(model)
    if graph is None:
        site = Site(model, None, None, None, list(variables))
        return [(site, ("PerExample",), _fallback_cost(variables))]
    recorded = []

    def record(x):
        with tf.GradientTape(persistent=True):
            outputs, sites = trace(model, x, variables)
        for site in sites:
            if not isinstance(site.cut, tf.Tensor):  # several outputs: the whole model
                recorded.append((site, ("PerExample",), _fallback_cost(site.variables)))
                continue
            shape = tf.shape(site.cut)
            cotangents = tf.zeros(tf.concat([shape[:1], [1], shape[1:]], 0), site.cut.dtype)
            factors = site.factors(cotangents)
            positions = math.prod(d or 1 for d in site.cut.shape[1:-1])
            cost = sum(_factor_cost(f) for f in factors) * positions
            recorded.append((site, tuple(type(f).__name__ for f in factors), cost))
        return outputs

    specs = tf.nest.map_structure(lambda t: tf.TensorSpec(t.shape, t.dtype), graph._inputs_struct)
    tf.function(record, autograph=False).get_concrete_function(specs)
    return recorded


def _size(variables) -> int:
    return sum(v.shape.num_elements() for v in variables)


def _factor_cost(factor) -> float:
    """Multiply-adds per example, column and position, roughly: one per weight (an
    embedding only touches the row of each position's id)."""
    if isinstance(factor, Rows):
        return float(factor.variable.shape[-1])
    if isinstance(factor, PerExample):
        return _fallback_cost(factor.variables)
    return float(_size(factor.variables))


def _fallback_cost(variables) -> float:
    return _size(variables) * FALLBACK_COST_FACTOR
