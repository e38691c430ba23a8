"""Saving and loading a fitted :class:`~laplace_tf.Laplace`; the format lives in
:mod:`laplace_tf.posterior.serialization` (described there and in the saving guide).
This import path keeps working: it re-exports the format and gives :func:`load` its
default class."""

from __future__ import annotations

import os

import keras

from laplace_tf.posterior import serialization as _format
from laplace_tf.posterior.core import Laplace
from laplace_tf.posterior.serialization import (
    FORMAT,
    VERSION,
    architecture_fingerprint,
    save,
    weights_fingerprint,
)

__all__ = ["FORMAT", "VERSION", "architecture_fingerprint", "load", "save", "weights_fingerprint"]


def load(
    path: str | os.PathLike,
    model: keras.Model,
    *,
    cls: type[Laplace] = Laplace,
    structure: str | None = None,
) -> Laplace:
    """Read a posterior written by :func:`save`, as a ``cls`` (default
    :class:`~laplace_tf.Laplace`) attached to ``model``; see
    :func:`laplace_tf.posterior.serialization.load` for the checks and errors."""
    return _format.load(path, model, cls=cls, structure=structure)
