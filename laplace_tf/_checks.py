"""Argument checks and small conversions shared across the package."""

from __future__ import annotations

import math
import os
import sys
from typing import Any

import keras
import numpy as np


def positive_int(name: str, value: Any) -> int:
    """``value`` as an int, or a ValueError naming ``name`` (booleans are refused)."""
    if isinstance(value, bool) or not isinstance(value, int | np.integer) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}.")
    return int(value)


def positive_float(name: str, value: Any) -> float:
    """``value`` as a positive finite float, or a ValueError naming ``name``."""
    value = float(value)
    if not math.isfinite(value) or value <= 0:
        raise ValueError(f"{name} must be a positive finite number, got {value}.")
    return value


def resolve_seed(seed: int | None) -> int:
    """``seed`` as an int; ``None`` draws a fresh one from the operating system."""
    if seed is None:
        return int(np.random.SeedSequence().entropy % (2**31))
    return int(seed)


def unwrap_variable(variable: Any) -> Any:
    """The ``tf.Variable`` behind a ``keras.Variable``; anything else unchanged."""
    return variable.value if isinstance(variable, keras.Variable) else variable


_PACKAGE = os.path.dirname(os.path.abspath(__file__))


def user_stacklevel() -> int:
    """The ``stacklevel`` for a ``warnings.warn`` made by this function's caller that
    points at the first frame outside laplace_tf (the user's call), however deep the
    package's own calls are (they differ between a fit's compiled and Python paths)."""
    frame, level = sys._getframe(1), 1
    while frame is not None and os.path.abspath(frame.f_code.co_filename).startswith(_PACKAGE):
        frame, level = frame.f_back, level + 1
    return level
