"""The layer-rule registry: which rule differentiates a layer, and which layers are
piecewise linear.

A :class:`Rule` tells the engine where to cut a parameterised layer and how to turn the
cotangents at the cut into per-example gradient *factors* (see :mod:`layers`). Rules
are looked up by the layer's exact type; among the rules registered for a type, user
rules come first (the most recent first), then the built-in ones, and the first whose
``applies(layer)`` holds is used. A layer with selected weights and no rule goes through
the generic per-example fallback.

The registry is also the one place that records which layer types are piecewise linear
in their inputs and weights (``diag(Hessian) = diag(GGN)`` for models built from them),
with or without a rule (``Flatten``, pooling and ``ReLU`` have no weights).

Register rules before the first fit of a model: compiled steps are cached per model.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import keras
import tensorflow as tf


def _always(layer: keras.layers.Layer) -> bool:
    return True


@dataclass(frozen=True)
class Rule:
    """How one layer type is cut and differentiated.

    Attributes
    ----------
    forward : callable
        ``forward(layer, inputs) -> (cut, outputs)``: the layer's forward pass on a batch,
        returning the tensor ``z`` at which it is cut (typically the pre-activation) and
        the layer's outputs computed from ``z``. It may return ``(cut, outputs, saved)``
        instead: ``saved`` (any nest of tensors the forward computed, e.g. a recurrence's
        states) is then what ``factors`` receives in place of ``inputs``. Saved tensors
        stay alive from the forward pass until the factors are formed, so save what the
        backward pass keeps anyway, and let ``factors`` form large tensors itself.
    factors : callable
        ``factors(layer, inputs, cotangents) -> list`` of gradient factors for the layer's
        weights, given the cotangents ``[N, K, *cut.shape[1:]]`` of ``K`` columns at the
        cut (``inputs``: the layer's inputs, or what ``forward`` saved). Every factor
        implements the factor protocol of :mod:`layers`.
    applies : callable, optional
        ``applies(layer) -> bool``: whether this rule handles this instance (e.g. only
        ``channels_last``); a layer no rule applies to goes through the fallback.
    name : str, optional
        Shown by :func:`~laplace_tf.curvature.explain`.
    reads_mask : bool, optional
        Whether ``forward`` and ``factors`` follow a Keras mask on their inputs (read with
        ``keras.src.backend.get_keras_mask(inputs)``). A layer called with a ``mask``
        argument then keeps its rule, with the mask attached to ``inputs``; otherwise
        such a call takes the fallback.
    """

    forward: Callable[[keras.layers.Layer, tf.Tensor], tuple[tf.Tensor, tf.Tensor]]
    factors: Callable[[keras.layers.Layer, tf.Tensor, tf.Tensor], list]
    applies: Callable[[keras.layers.Layer], bool] = _always
    name: str = ""
    reads_mask: bool = False


@dataclass
class _Registry:
    user: dict[type, list[Rule]]
    builtin: dict[type, list[Rule]]
    piecewise_linear: dict[type, bool]


_REGISTRY = _Registry({}, {}, {})


def _check_layer_type(layer_type: Any) -> None:
    if not (isinstance(layer_type, type) and issubclass(layer_type, keras.layers.Layer)):
        raise TypeError(f"layer_type must be a keras.layers.Layer subclass, got {layer_type!r}.")


def register_rule(
    layer_type: type,
    rule: Rule,
    *,
    piecewise_linear: bool | None = None,
) -> Rule:
    """Use ``rule`` for layers of exactly ``layer_type`` (subclasses are not matched).

    User rules take precedence over the built-in ones, a later registration over an
    earlier one; a rule whose ``applies(layer)`` is false passes the layer on to the next
    rule for its type, and finally to the generic per-example fallback.

    Parameters
    ----------
    layer_type : type
        A ``keras.layers.Layer`` subclass.
    rule : Rule
    piecewise_linear : bool, optional
        Whether the layer is piecewise linear in its inputs and in each of its weights (so
        that ``kind="hessian"`` may use the GGN); ``None`` keeps what is recorded
        (``False`` for a type never declared).

    Returns
    -------
    Rule
        ``rule``, so that it can be passed to :func:`unregister_rule` later.
    """
    _check_layer_type(layer_type)
    if not isinstance(rule, Rule):
        raise TypeError(f"rule must be a laplace_tf.curvature.Rule, got {type(rule).__name__}.")
    _REGISTRY.user.setdefault(layer_type, []).insert(0, rule)
    if piecewise_linear is not None:
        _REGISTRY.piecewise_linear[layer_type] = bool(piecewise_linear)
    return rule


def unregister_rule(layer_type: type, rule: Rule) -> None:
    """Remove a rule added by :func:`register_rule` (built-in rules stay)."""
    rules = _REGISTRY.user.get(layer_type, [])
    if rule not in rules:
        raise ValueError(f"{rule!r} is not a registered rule for {layer_type.__name__}.")
    rules.remove(rule)


def register_builtin(layer_types, rule: Rule, *, piecewise_linear: bool = False) -> None:
    """Record a rule of this library for each of ``layer_types`` (used by the rule modules)."""
    for layer_type in layer_types:
        _REGISTRY.builtin.setdefault(layer_type, []).append(rule)
        if piecewise_linear:
            _REGISTRY.piecewise_linear[layer_type] = True


def register_piecewise_linear(layer_type: type, piecewise_linear: bool = True) -> None:
    """Declare a layer type (with or without weights) piecewise linear, or not."""
    _check_layer_type(layer_type)
    _REGISTRY.piecewise_linear[layer_type] = bool(piecewise_linear)


def rule_for(layer: keras.layers.Layer) -> Rule | None:
    """The rule for ``layer``, or ``None`` when it goes through the generic fallback."""
    kind = type(layer)
    for rule in (*_REGISTRY.user.get(kind, ()), *_REGISTRY.builtin.get(kind, ())):
        if rule.applies(layer):
            return rule
    return None


_PIECEWISE_LINEAR_ACTIVATIONS = (
    keras.activations.linear,
    keras.activations.relu,
    keras.activations.relu6,
    keras.activations.leaky_relu,
)


def is_piecewise_linear_layer(layer: keras.layers.Layer) -> bool:
    """Whether ``layer``'s type is declared piecewise linear and its activation (if any)
    is one of linear / relu / relu6 / leaky_relu."""
    if not _REGISTRY.piecewise_linear.get(type(layer), False):
        return False
    activation = getattr(layer, "activation", None)
    return activation is None or any(activation is a for a in _PIECEWISE_LINEAR_ACTIVATIONS)


@contextlib.contextmanager
def rules_disabled() -> Iterator[None]:
    """Within the block every layer goes through the generic fallback (tests, benchmarks).

    Steps compiled inside the block keep the fallback; steps compiled before keep their
    rules (compiled steps are cached per model).
    """
    user, builtin = _REGISTRY.user, _REGISTRY.builtin
    _REGISTRY.user, _REGISTRY.builtin = {}, {}
    try:
        yield
    finally:
        _REGISTRY.user, _REGISTRY.builtin = user, builtin


_L = keras.layers
for _layer_type in (
    _L.InputLayer, _L.Flatten, _L.Reshape, _L.Permute, _L.Dropout, _L.Identity,
    _L.ReLU, _L.LeakyReLU, _L.Activation,
    _L.MaxPooling1D, _L.MaxPooling2D, _L.MaxPooling3D,
    _L.AveragePooling1D, _L.AveragePooling2D, _L.AveragePooling3D,
    _L.GlobalAveragePooling1D, _L.GlobalAveragePooling2D, _L.GlobalAveragePooling3D,
    _L.GlobalMaxPooling1D, _L.GlobalMaxPooling2D, _L.GlobalMaxPooling3D,
    _L.Concatenate, _L.Add, _L.Subtract, _L.Average,
    _L.ZeroPadding1D, _L.ZeroPadding2D, _L.ZeroPadding3D,
    _L.Cropping1D, _L.Cropping2D, _L.Cropping3D,
):  # fmt: skip
    register_piecewise_linear(_layer_type)
