"""A forward pass that records, for every parameterised layer, where its rule cuts it.

Functional and Sequential models are run node by node (Keras' own graph runner), with
each layer that owns selected weights replaced by its rule's split forward, or called
as it is and recorded for the generic fallback. A model whose graph cannot be seen
(subclassed), or one whose structure the per-layer rules cannot express (a layer
with selected weights called twice, selected weights outside every layer, several
outputs), is recorded as one fallback site covering the whole model.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Any

import keras
import tensorflow as tf
from keras.src.backend import AutocastScope, get_keras_mask, set_keras_mask
from keras.src.models.functional import Functional
from keras.src.models.sequential import Sequential

from laplace_tf.curvature.layers import (
    PerExample,
    Rule,
    rule_for,
    stacked_columns,
    vectorizable,
)


@dataclass
class Site:
    """One place in the forward pass whose cotangents the engine needs."""

    layer: Any
    rule: Rule | None
    inputs: Any  # the layer input or what the rule's forward saved; fallback: ``(args, kwargs)``
    cut: tf.Tensor
    variables: list = field(default_factory=list)

    def factors(self, cotangents: tf.Tensor) -> list:
        if self.rule is None:
            vectorize = vectorizable(self.layer)
            return [PerExample(self.variables, self._call_on, self.inputs, cotangents, vectorize)]
        selected = {id(v) for v in self.variables}
        # What a rule forms from the inputs alone (unfolded patches, normalised inputs)
        # waits for the cotangents: else the executor may form every layer's during the
        # forward pass and hold them all until the backward reaches each (DenseNet121
        # exact ggn: 384-390 -> 239-240 MiB live tensors; docs/benchmarks.md).
        with tf.control_dependencies(stacked_columns(cotangents) or [cotangents]):
            factors = self.rule.factors(self.layer, self.inputs, cotangents)
        return [f for f in factors if all(id(v) in selected for v in f.variables)]

    def _call_on(self, arguments):
        args, kwargs = arguments
        return _call(self.layer, *args, **kwargs)


class _Untraceable(Exception):
    """The per-layer trace cannot express this model; use the whole-model fallback."""


def trace(model: keras.Model, x: Any, variables: list) -> tuple[tf.Tensor, list[Site]]:
    """Run ``model`` on ``x`` in inference mode, recording one site per parameterised layer.

    Must be called inside a recording ``tf.GradientTape``. Returns the output and the
    sites; ``variables`` are the (keras) variables whose curvature is wanted.
    """
    try:
        sites: list[Site] = []
        outputs = _run_graph_model(model, (x,), {}, sites, _ids(variables))
        if not isinstance(outputs, tf.Tensor):
            raise _Untraceable
        _check_coverage(sites, variables)
        return outputs, sites
    except _Untraceable:
        outputs = _call(model, x)
        site = Site(model, None, ((x,), {}), outputs, list(variables))
        return outputs, [site]


def _ids(variables) -> set[int]:
    return {id(v) for v in variables}


def _selected(layer, selected_ids: set[int]) -> list:
    return [v for v in getattr(layer, "trainable_variables", ()) if id(v) in selected_ids]


def graph_of(model) -> Functional | None:
    if isinstance(model, Sequential):
        return model._functional
    if isinstance(model, Functional):
        return model
    return None


def _run_graph_model(model, args, kwargs, sites, selected_ids):
    graph = graph_of(model)
    if graph is None or len(args) != 1 or kwargs.get("mask") is not None:
        raise _Untraceable
    inputs = graph._standardize_inputs(args[0])
    outputs = graph._run_through_graph(
        inputs, operation_fn=lambda layer: _recording(layer, sites, selected_ids)
    )
    outputs = tf.nest.flatten(outputs)
    if len(outputs) != 1:
        raise _Untraceable
    return outputs[0]


def _autocast(layer):
    """The autocast scope Keras enters when it calls ``layer`` (mixed precision: the
    float32 weights are read in the layer's float16 / bfloat16 compute dtype)."""
    if layer.autocast and layer.compute_dtype != layer.variable_dtype:
        return AutocastScope(layer.compute_dtype)
    return contextlib.nullcontext()


def _recording(layer, sites: list[Site], selected_ids: set[int]):
    """The callable that replaces ``layer`` in the traced forward pass."""
    variables = _selected(layer, selected_ids)
    if not variables:
        return lambda *args, **kwargs: _call(layer, *args, **kwargs)
    if graph_of(layer) is not None:
        return lambda *args, **kwargs: _run_graph_model(layer, args, kwargs, sites, selected_ids)
    rule = rule_for(layer)
    inner = _inner_rules(layer, variables) if rule is None else None
    if inner is not None:
        return lambda *args, **kwargs: _call_recording_inner(layer, inner, sites, args, kwargs)

    def call(*args, **kwargs):
        read = {"training", "mask"} if rule is not None and rule.reads_mask else {"training"}
        tensor_kwargs = [k for k, v in kwargs.items() if v is not None and k not in read]
        if rule is not None and len(args) == 1 and not tensor_kwargs:
            (inputs,) = args
            if kwargs.get("mask") is not None:  # the rule reads it from its inputs
                inputs = tf.identity(inputs)
                set_keras_mask(inputs, kwargs["mask"])
            with _autocast(layer):
                cut, outputs, saved = _forward(rule, layer, inputs)
            _propagate_mask(layer, inputs, outputs)
            sites.append(Site(layer, rule, saved, cut, variables))
            return outputs
        if getattr(layer, "_call_has_mask_arg", False) and kwargs.get("mask") is None and args:
            kwargs["mask"] = get_keras_mask(args[0])
        outputs = _call(layer, *args, **kwargs)
        if not isinstance(outputs, tf.Tensor):
            raise _Untraceable
        sites.append(Site(layer, None, (args, kwargs), outputs, variables))
        return outputs

    return call


def _forward(rule: Rule, layer, inputs):
    """``(cut, outputs, what the rule's factors read)``: the inputs, unless the rule's
    forward saved something of its own."""
    result = rule.forward(layer, inputs)
    if not isinstance(result, tuple | list) or len(result) not in (2, 3):
        raise TypeError(
            f"The forward of rule {rule.name or rule.forward!r} (layer {layer.name!r}) must "
            f"return (cut, outputs) or (cut, outputs, saved), got {type(result).__name__}"
            + (f" of {len(result)} values." if isinstance(result, tuple | list) else ".")
        )
    if len(result) == 3:
        return tuple(result)
    cut, outputs = result
    return cut, outputs, inputs


#: Layers whose weights are used only by calling their sub-layers, each once, so that
#: their sub-layers' rules can cut them (a layer that also read a sub-layer's weights
#: directly, e.g. tied embeddings, would lose that use).
COMPOSITE_LAYERS = (keras.layers.MultiHeadAttention, keras.layers.GroupQueryAttention)


def _inner_rules(layer, variables: list) -> list[tuple[Any, Rule, list]] | None:
    """``(sub-layer, rule, weights)`` for a layer of :data:`COMPOSITE_LAYERS` whose
    selected weights all belong to sub-layers that have a rule (the EinsumDense
    projections of attention), or ``None``."""
    if type(layer) not in COMPOSITE_LAYERS:
        return None
    selected = _ids(variables)
    inner, covered = [], set()
    for sublayer in layer._flatten_layers(include_self=False, recursive=True):
        own = [v for v in sublayer._trainable_variables if id(v) in selected]
        if not own:
            continue
        rule = rule_for(sublayer)
        if rule is None:
            return None
        inner.append((sublayer, rule, own))
        covered.update(id(v) for v in own)
    return inner if inner and covered == selected else None


def _call_recording_inner(layer, inner, sites: list[Site], args, kwargs):
    """Call ``layer`` with each sub-layer of ``inner`` cut by its rule and recorded as a
    site (its ``call`` is replaced for the duration of this call only). A sub-layer called
    twice gets two sites, which the coverage check turns into the whole-model fallback."""

    def recording(sublayer, rule, own):
        def call(inputs, *unused_args, **unused_kwargs):
            cut, outputs, saved = _forward(rule, sublayer, inputs)
            sites.append(Site(sublayer, rule, saved, cut, own))
            return outputs

        return call

    for sublayer, rule, own in inner:
        sublayer.call = recording(sublayer, rule, own)
    try:
        outputs = _call(layer, *args, **kwargs)
    finally:
        for sublayer, _, _ in inner:
            del sublayer.call
    if not isinstance(outputs, tf.Tensor):
        raise _Untraceable
    return outputs


def _call(layer, *args, **kwargs):
    if "training" in getattr(layer, "_call_context_args", ()):
        kwargs["training"] = False
    return layer(*args, **kwargs)


def _propagate_mask(layer, inputs, outputs) -> None:
    mask = layer.compute_mask(inputs, get_keras_mask(inputs))
    if mask is not None:
        set_keras_mask(outputs, mask)


def _check_coverage(sites: list[Site], variables: list) -> None:
    """Every selected variable must be owned by exactly one site."""
    owners: dict[int, int] = {}
    for site in sites:
        for v in site.variables:
            owners[id(v)] = owners.get(id(v), 0) + 1
    if any(owners.get(id(v), 0) != 1 for v in variables):
        raise _Untraceable
