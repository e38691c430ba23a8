"""Normalising user-supplied parameter lists."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import keras
import tensorflow as tf

from laplace_tf._checks import unwrap_variable


def as_param_list(params: Sequence[Any]) -> list:
    """Return ``params`` as a list of ``tf.Variable`` / ``tf.Tensor`` with float dtypes.

    ``keras.Variable`` objects are replaced by the ``tf.Variable`` they wrap, so that
    tapes and ``tf.function`` see one kind of variable.
    """
    if isinstance(params, tf.Variable | tf.Tensor | keras.Variable):
        raise TypeError("params must be a list of variables or tensors, not a single one.")
    params = list(params)
    if not params:
        raise ValueError("params is empty: give at least one variable or tensor.")
    normalised = []
    for position, param in enumerate(params):
        param = unwrap_variable(param)
        if not isinstance(param, tf.Variable | tf.Tensor):
            raise TypeError(
                f"params[{position}] is a {type(param).__name__}; expected a tf.Variable, "
                "keras.Variable or tf.Tensor."
            )
        if not param.dtype.is_floating:
            raise TypeError(
                f"params[{position}] has dtype {param.dtype.name}; it must be floating."
            )
        normalised.append(param)
    return normalised
