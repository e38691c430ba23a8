"""Which weights get a posterior (``subset``), grouped by layer, and their prior mean."""

from __future__ import annotations

import math
from typing import Any

import keras
import numpy as np
import tensorflow as tf

SUBSETS = ("all", "last_layer")


def select_groups(model: keras.Model, subset) -> list[list]:
    """The selected trainable weights, grouped by the layer that owns them."""
    layers = [
        layer
        for layer in model._flatten_layers(include_self=True, recursive=True)
        if [v for v in layer._trainable_variables if v.trainable]
    ]
    if subset == "all":
        chosen = layers
    elif subset == "last_layer":
        if not layers:
            raise ValueError("model has no trainable weights.")
        chosen = [layers[-1]]
    elif isinstance(subset, str):
        raise ValueError(
            f"Unknown subset {subset!r}; valid: {', '.join(SUBSETS)}, or a list of layer names."
        )
    else:
        if not isinstance(subset, list | tuple) or not all(isinstance(n, str) for n in subset):
            raise TypeError(
                f"subset must be {' or '.join(repr(s) for s in SUBSETS)}, or a list of layer "
                f"names; got {subset!r}."
            )
        by_name = {layer.name: layer for layer in model._flatten_layers(include_self=False)}
        subset = list(subset)
        duplicates = sorted({name for name in subset if subset.count(name) > 1})
        if duplicates:
            raise ValueError(f"subset names a layer more than once: {duplicates}.")
        missing = [name for name in subset if name not in by_name]
        if missing or not subset:
            raise ValueError(
                f"subset names layers the model lacks: {missing}; its layers with weights are "
                f"{[layer.name for layer in layers if layer is not model]}."
            )
        chosen = [by_name[name] for name in subset]
    groups = []
    for layer in chosen:
        variables = (
            [v for v in layer._trainable_variables if v.trainable]
            if subset in SUBSETS
            else list(layer.trainable_variables)
        )
        if not variables:
            raise ValueError(f"layer {layer.name!r} has no trainable weights.")
        groups.append(variables)
    if not groups:
        raise ValueError("model has no trainable weights.")
    owners: dict[int, str] = {}
    for layer, variables in zip(chosen, groups, strict=True):
        for v in variables:
            if id(v) in owners:
                raise ValueError(
                    f"subset selects the weight {v.path!r} twice, through layers "
                    f"{owners[id(v)]!r} and {layer.name!r} (one contains the other); "
                    "name each weight's layer once."
                )
            owners[id(v)] = layer.name
    return groups


def prior_mean_list(value: Any, variables: list) -> list[tf.Tensor]:
    if not isinstance(value, list | tuple) and np.ndim(value) == 0:
        value = float(value)
        if not math.isfinite(value):
            raise ValueError(f"prior_mean must be finite, got {value}.")
        # One scalar per weight, broadcast where it is used: a weight-sized copy of a
        # constant cost as much memory as the weights themselves (90 MiB on ResNet50).
        return [tf.constant(value, v.dtype) for v in variables]
    value = list(value)
    if len(value) != len(variables):
        raise ValueError(f"prior_mean needs {len(variables)} arrays, got {len(value)}.")
    means = []
    for m, v in zip(value, variables, strict=True):
        m = tf.convert_to_tensor(m, v.dtype)
        if m.shape != v.shape:
            raise ValueError(f"prior_mean for {v.path} has shape {m.shape}, expected {v.shape}.")
        means.append(m)
    return means
