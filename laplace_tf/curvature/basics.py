"""What the curvature engines share: the selected weights, the loss outputs, the checked
batches, float64 accumulation over batches, and what one pass over the data yields.

Kept apart from the engines (:mod:`structured`, :mod:`black_box`, :mod:`reducers`) so
that each of them reads one place for these conventions.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import keras
import tensorflow as tf

from laplace_tf._data import iterate_batches
from laplace_tf._validation import BatchChecker
from laplace_tf.curvature.distributed import replicated, strategy_of
from laplace_tf.curvature.registry import is_piecewise_linear_layer
from laplace_tf.curvature.tracing import graph_of
from laplace_tf.likelihoods import BUILT_IN, Likelihood

KINDS = ("ggn", "ggn_mc", "ef", "hessian")


@dataclass(frozen=True)
class CurvatureFit:
    """What one pass over the data yields: the diagonal, the summed NLL and the count."""

    diagonal: list[tf.Tensor]
    nll: float
    n_data: int
    n_outputs: int
    n_rows: int | float | None = None  # weighted examples x positions (None: n_data)


def is_piecewise_linear(model: keras.Model) -> bool:
    """Whether every parameter enters the outputs linearly (piecewise) on its own.

    True for Functional / Sequential models built only from layers declared piecewise
    linear in the rule registry (Dense, Conv, Embedding, BatchNorm in inference, pooling,
    reshaping, ...; see :func:`~laplace_tf.curvature.registry.register_piecewise_linear`)
    with activations among linear / relu / relu6 / leaky_relu and no layer called twice.
    Then ``diag(Hessian) = diag(GGN)`` exactly (almost everywhere).
    """
    graph = graph_of(model)
    if graph is None:
        return False
    for layer in graph.layers:
        if graph_of(layer) is not None:
            if not is_piecewise_linear(layer):
                return False
            continue
        if not is_piecewise_linear_layer(layer) or len(layer._inbound_nodes) > 1:
            return False
    return True


def _likelihood_key(likelihood: Likelihood) -> Any:
    """Built-in likelihoods are equal when their reprs are; others only to themselves."""
    return repr(likelihood) if type(likelihood) in BUILT_IN else likelihood


def _model_variables(model: keras.Model, params: Sequence[Any] | None) -> list:
    if not isinstance(model, keras.Model):
        raise TypeError(f"model must be a keras.Model, got {type(model).__name__}.")
    if not model.built:
        raise ValueError("model is not built: call it on data (or build it) first.")
    trainable = list(model.trainable_variables)
    if params is None:
        if not trainable:
            raise ValueError("model has no trainable variables.")
        return trainable
    by_id = {id(v): v for v in trainable} | {id(v.value): v for v in trainable}
    selected = []
    for position, p in enumerate(params):
        if id(p) not in by_id:
            raise ValueError(f"params[{position}] is not a trainable variable of the model.")
        selected.append(by_id[id(p)])
    if not selected:
        raise ValueError("params is empty.")
    return selected


def _accumulation_dtype(dtype: tf.DType) -> tf.DType:
    """Half-precision cotangents (mixed precision) are reduced in float32."""
    return tf.float32 if dtype in (tf.float16, tf.bfloat16) else dtype


def _loss_outputs(outputs: tf.Tensor) -> tf.Tensor:
    """Model outputs as used by the likelihood: ``[N, C]`` or ``[N, ..., C]`` (positions),
    at least float32."""
    if outputs.shape.rank is not None and outputs.shape.rank < 2:
        raise ValueError(
            f"the model output must have shape [N, C] or [N, ..., C]; got rank "
            f"{outputs.shape.rank} ({outputs.shape})."
        )
    return tf.cast(outputs, _accumulation_dtype(outputs.dtype))


def _checked_batches(model, likelihood, data, batch_size):
    """The ``(x, y, sample_weight)`` batches of ``data`` (``sample_weight`` ``None`` when
    it has none), each checked (:class:`BatchChecker`) before use."""
    checker = BatchChecker(model, likelihood)
    for x, y, weights in iterate_batches(data, batch_size=batch_size):
        checker(x, y, weights)
        yield x, y, weights


def _replicated(model, step):
    """``step`` spread over the model's replicas when it was built under a strategy."""
    strategy = strategy_of(model)
    return step if strategy is None else replicated(strategy, step)
