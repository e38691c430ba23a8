"""Turning user data into batches of ``(x, y)`` tensors."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import keras
import tensorflow as tf

from laplace_tf._checks import positive_int

DEFAULT_BATCH_SIZE = 256


def batched(inputs: Any, batch_size: int) -> tf.data.Dataset:
    """A dataset of input batches.

    ``inputs`` is an array (or a dict / list / tuple of arrays for a multi-input model),
    batched here by ``batch_size``; or a ``tf.data.Dataset`` that is already batched and
    yields ``x``, ``(x,)``, ``(x, y)`` or ``(x, y, sample_weight)``, as Keras'
    ``model.predict`` reads it (a tuple element is unpacked, its first entry being ``x``).
    """
    positive_int("batch_size", batch_size)
    if isinstance(inputs, tf.data.Dataset):
        return inputs.map(_inputs_of)
    return tf.data.Dataset.from_tensor_slices(_lists_as_tuples(inputs)).batch(batch_size)


def _inputs_of(*element: Any) -> Any:
    """``x`` of one dataset element, by Keras' ``unpack_x_y_sample_weight`` rule."""
    x, _, _ = keras.utils.unpack_x_y_sample_weight(element if len(element) > 1 else element[0])
    return x


def _lists_as_tuples(structure: Any) -> Any:
    """Lists become tuples, so that tf.data treats them as structures, not as one array."""
    if isinstance(structure, list):
        return tuple(_lists_as_tuples(item) for item in structure)
    if isinstance(structure, tuple):
        return tuple(_lists_as_tuples(item) for item in structure)
    if isinstance(structure, dict):
        return {key: _lists_as_tuples(value) for key, value in structure.items()}
    return structure


def iterate_batches(data: Any, *, batch_size: int = DEFAULT_BATCH_SIZE) -> Iterator[tuple]:
    """Yield ``(x, y, sample_weight)`` batches of tensors from ``data``.

    ``data`` is a ``tf.data.Dataset`` (or any iterable) of ``(x, y)`` or
    ``(x, y, sample_weight)`` batches, as Keras' ``fit`` takes them, or a tuple ``(x, y)``
    or ``(x, y, sample_weight)`` of arrays that is batched here; ``x`` may be a dict or list
    of arrays for multi-input models. ``sample_weight`` is ``None`` when a batch has none.
    Raises ``ValueError`` when no batch is produced.
    """
    if isinstance(data, tuple) and len(data) in (2, 3) and not isinstance(data, tf.data.Dataset):
        data = batched(data, batch_size)
    elif not isinstance(data, tf.data.Dataset) and not hasattr(data, "__iter__"):
        raise TypeError(
            f"data must be a tf.data.Dataset, an iterable of (x, y) or (x, y, sample_weight) "
            f"batches or an (x, y) tuple of arrays; got {type(data).__name__}."
        )
    count = 0
    for batch in data:
        if not isinstance(batch, tuple | list) or len(batch) not in (2, 3):
            raise ValueError(
                f"each batch must be an (x, y) pair or an (x, y, sample_weight) triple; batch "
                f"{count} is a {type(batch).__name__}"
                + (f" of length {len(batch)}" if isinstance(batch, tuple | list) else "")
                + "."
            )
        count += 1
        x, y, *weights = batch
        weights = weights[0] if weights else None
        yield tf.nest.map_structure(tf.convert_to_tensor, (x, y)) + (
            None if weights is None else tf.convert_to_tensor(weights),
        )
    if count == 0:
        raise ValueError("data is empty: it yielded no batches.")
