"""Early, clear errors for bad data and for models that do not output what a likelihood reads.

A NaN in one input, a label out of range or a softmax output would otherwise give a NaN
posterior or an obscure TensorFlow trace far from the cause. The checks run per batch
as one small compiled reduction (no copy of the batch to the host); only when a batch
fails is it searched, on the host, for the offending index.
"""

from __future__ import annotations

import weakref
from collections.abc import Iterator
from typing import Any

import keras
import numpy as np
import tensorflow as tf

from laplace_tf._data import batched
from laplace_tf.likelihoods import BUILT_IN, Binary, Classification, Likelihood, Multilabel

#: Rows of a probe output within this of summing to one are taken for probabilities.
_PROBABILITY_TOLERANCE = 1e-5
#: Examples of the first batch run through the model to read its output width.
_PROBE_EXAMPLES = 8


class BatchChecker:
    """Checks ``(x, y, sample_weight)`` batches against a likelihood and the model's
    output (read by :func:`probe_outputs` on the first batch).

    Raises ``ValueError`` naming the batch and the example index in the whole dataset
    for: NaN / Inf in inputs, targets or sample weights; negative sample weights; targets
    the likelihood's ``invalid_targets`` refuses (labels that are not integers in
    ``[0, C)``, not 0 / 1 ...); targets or weights whose shape does not match the outputs;
    inputs whose leaves disagree on the number of examples. Outputs with positions
    (``[N, T, C]``) take targets ``[N, T, ...]``, checked as ``N T`` rows.
    """

    def __init__(self, model: keras.Model, likelihood: Likelihood):
        self.model = model
        self.likelihood = likelihood
        self.output_shape: tuple | None = None  # per example: (*positions, C)
        self.batch = 0
        self.offset = 0

    @property
    def n_outputs(self) -> int | None:
        return None if self.output_shape is None else self.output_shape[-1]

    @property
    def positions(self) -> int | None:
        """Position axes of the output (``[N, *positions, C]``), once probed."""
        return None if self.output_shape is None else len(self.output_shape) - 1

    def __call__(self, x: Any, y: tf.Tensor, sample_weight: tf.Tensor | None = None) -> None:
        """Check one batch: :meth:`check_shapes`, then its values (one compiled reduction
        and one host read), then :meth:`verify`."""
        count = self.check_shapes(x, y, sample_weight)
        leaves = _float_leaves(x)
        weights = _no_weights() if sample_weight is None else sample_weight
        summary = _summary_of(self.likelihood, self.n_outputs, self.positions, leaves, y, weights)
        self.verify(x, y, sample_weight, summary(*leaves, y, weights), count)

    def check_shapes(self, x: Any, y: tf.Tensor, sample_weight: tf.Tensor | None) -> int:
        """The checks that need no values (batch axis, example counts, the output shape
        probed on the first batch, target and weight shapes); returns the example count.
        A compiled step can then compute :func:`batch_flags` itself and pass them to
        :meth:`verify`, sparing a call per batch."""
        leaves = tf.nest.flatten(x)
        if self.batch == 0:
            check_batched(self.model, leaves)
        count = _example_count(leaves, self.batch)
        if self.output_shape is None:
            self.output_shape = probe_outputs(self.model, self.likelihood, x)
        self._check_shape(y, count)
        if sample_weight is not None:
            self._check_weight_shape(sample_weight, y, count)
        return count

    def verify(
        self, x: Any, y: tf.Tensor, sample_weight: tf.Tensor | None, flags: Any, count: int
    ) -> None:
        """Raise for the value faults :func:`batch_flags` reported (``flags``), naming the
        batch and the example; then count the batch as checked."""
        x_finite, y_finite, w_finite, w_min, invalid = np.asarray(flags)
        if not x_finite:
            self._fail_nonfinite("inputs", _float_leaves(x))
        if not y_finite:
            self._fail_nonfinite("targets", (y,))
        if sample_weight is not None:
            self._check_weight_values(sample_weight, count, w_finite, w_min)
        if invalid:
            rows = _as_rows(y, self.positions)
            bad = self.likelihood.invalid_targets(rows, self.n_outputs)
            self._fail_targets(rows, np.asarray(bad), count)
        self.batch += 1
        self.offset += count

    def _check_shape(self, y: tf.Tensor, count: int) -> None:
        """Refuse targets whose shape does not fit the outputs (checked as rows: one per
        example and position)."""
        shape, width = tuple(y.shape), self.n_outputs
        positions = len(self.output_shape) - 1
        lead = shape[: 1 + positions]
        mismatch = self.batch == 0 and tuple(lead[1:]) != tuple(self.output_shape[:-1])
        if positions and (len(shape) < 1 + positions or lead[0] != count or mismatch):
            expected = f"[{count}, {', '.join(str(p) for p in self.output_shape[:-1])}, ...]"
        else:
            rows = int(np.prod(lead)) if positions else count
            row_shape = (rows, *shape[1 + positions :]) if positions else shape
            expected = self.likelihood.target_shape_error(row_shape, rows, width)
            if expected is not None and positions:
                expected = f"{list(lead)} followed by a row of {expected} (one per position)"
        if expected is not None:
            per = "position" if positions else "example"
            raise ValueError(
                f"targets of batch {self.batch} have shape {list(shape)}, but the model gives "
                f"{width} output(s) per {per} for {count} examples: expected {expected}."
            )

    def _check_weight_shape(self, weights, y, count: int) -> None:
        shape = tuple(weights.shape)
        positions = len(self.output_shape) - 1
        allowed = {(count,), (count, 1), tuple(y.shape[: 1 + positions])}
        if shape not in allowed:
            raise ValueError(
                f"sample weights of batch {self.batch} have shape {list(shape)}; expected "
                f"[{count}] (one per example)"
                + (f" or {list(y.shape[: 1 + positions])} (one per position)" if positions else "")
                + "."
            )

    def _check_weight_values(self, weights, count: int, finite: float, low: float) -> None:
        if not finite:
            self._fail_nonfinite("sample weights", (weights,))
        if low < 0:
            values = np.asarray(weights).reshape(count, -1)
            first = int(np.flatnonzero((values < 0).any(axis=1))[0])
            raise ValueError(
                f"sample weights must be non-negative (they count examples); batch "
                f"{self.batch}, example {first} (index {self.offset + first} in the data) has "
                f"weight {values[first].min()!r}."
            )

    def _fail_nonfinite(self, what: str, leaves: tuple) -> None:
        for leaf in leaves:
            values = np.asarray(leaf)
            bad = np.flatnonzero(~np.isfinite(values.reshape(values.shape[0], -1)).all(axis=1))
            if bad.size:
                raise ValueError(
                    f"{what} contain NaN or Inf: batch {self.batch}, example {int(bad[0])} "
                    f"(index {self.offset + int(bad[0])} in the data); {bad.size} example(s) of "
                    f"this batch are affected."
                )
        raise AssertionError("unreachable: a non-finite value was reported but not found")

    def _fail_targets(self, rows: tf.Tensor, invalid: np.ndarray, count: int) -> None:
        bad = np.flatnonzero(invalid)
        first = int(bad[0])
        per_example = max(1, len(invalid) // max(count, 1))
        example, position = divmod(first, per_example)
        where = f", position {position}" if len(self.output_shape) > 1 else ""
        value = np.asarray(rows)[first]
        name = self.likelihood.name or type(self.likelihood).__name__
        raise ValueError(
            f"targets must be {self.likelihood.targets_description(self.n_outputs)} for the "
            f"{name} likelihood; batch {self.batch}, example {example}{where} (index "
            f"{self.offset + example} in the data) has target {value.tolist()!r}; "
            f"{bad.size} target(s) of this batch are invalid."
        )


def _example_count(leaves: list[tf.Tensor], batch: int) -> int:
    counts = {int(leaf.shape[0]) for leaf in leaves if leaf.shape.rank}
    if len(counts) != 1:
        raise ValueError(
            f"the inputs of batch {batch} disagree on the number of examples: "
            f"{sorted(counts) or 'scalars only'}."
        )
    return counts.pop()


def _as_rows(y: tf.Tensor, positions: int) -> tf.Tensor:
    """Targets ``[N, *positions, ...]`` as rows ``[N T, ...]``."""
    if not positions:
        return y
    return tf.reshape(y, tf.concat([[-1], tf.shape(y)[1 + positions :]], axis=0))


_SUMMARIES: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
_BUILT_IN_SUMMARIES: dict[str, dict] = {}
_EMPTY: list[tf.Tensor] = []


def _no_weights() -> tf.Tensor:
    """The empty weights of a batch without any (made once: an eager op costs per batch)."""
    if not _EMPTY:
        _EMPTY.append(tf.zeros([0]))
    return _EMPTY[0]


def _summary_of(likelihood: Likelihood, width: int, positions: int, leaves, y, weights):
    """The compiled check of one batch (cached per likelihood, width and input signature,
    any batch size): ``[inputs finite, targets finite, weights finite, smallest weight, any
    invalid target]``, one host read per batch. A concrete function: a batch pays no
    signature matching."""
    tensors = (*leaves, y, weights)
    key = (width, positions, tuple((t.dtype, tuple(t.shape[1:])) for t in tensors))
    if type(likelihood) in BUILT_IN:  # equal when their reprs are: one trace for every fit
        compiled = _BUILT_IN_SUMMARIES.setdefault(repr(likelihood), {})
    else:
        compiled = _SUMMARIES.setdefault(likelihood, {})
    if key not in compiled:

        def summary(*tensors):
            *float_leaves, targets, w = tensors
            return batch_flags(likelihood, width, positions, float_leaves, targets, w)

        signature = [tf.TensorSpec([None, *t.shape[1:]], t.dtype) for t in tensors]
        compiled[key] = tf.function(summary, autograph=False).get_concrete_function(*signature)
    return compiled[key]


def batch_flags(
    likelihood: Likelihood,
    width: int,
    positions: int,
    float_leaves: Any,
    targets: tf.Tensor,
    weights: tf.Tensor | None,
) -> tf.Tensor:
    """What :meth:`BatchChecker.verify` reads of a batch's values, as one float64 tensor
    ``[inputs finite, targets finite, weights finite, smallest weight, any invalid target]``
    (weights ``None`` or empty: none). Graph-compatible: a compiled step computes it beside
    its own work."""
    x_finite = tf.constant(True)
    for leaf in float_leaves:
        x_finite = tf.logical_and(x_finite, tf.reduce_all(tf.math.is_finite(leaf)))
    y_finite = tf.constant(True)
    if targets.dtype.is_floating:
        y_finite = tf.reduce_all(tf.math.is_finite(targets))
    w = tf.zeros([0], tf.float64) if weights is None else tf.cast(weights, tf.float64)
    w_finite = tf.reduce_all(tf.math.is_finite(w))
    w_min = tf.where(tf.size(w) > 0, tf.reduce_min(w), tf.constant(0.0, tf.float64))
    invalid = likelihood.invalid_targets(_as_rows(targets, positions), width)
    invalid = tf.constant(False) if invalid is None else tf.reduce_any(invalid)
    flags = tf.cast(tf.stack([x_finite, y_finite, w_finite]), tf.float64)
    return tf.concat([flags, [w_min, tf.cast(invalid, tf.float64)]], axis=0)


def _float_leaves(x: Any) -> tuple:
    """The floating-point input leaves of ``x`` (those that can hold NaN / Inf)."""
    return tuple(leaf for leaf in tf.nest.flatten(x) if leaf.dtype.is_floating)


def checked_inputs(model: keras.Model, x: Any, batch_size: int) -> Iterator[Any]:
    """The input batches of ``x`` (see :func:`laplace_tf._data.batched`) for prediction,
    each checked: the first for a missing batch axis (an unbatched dataset), every one for
    NaN / Inf, naming the example's index in the data."""
    offset = 0
    for index, batch in enumerate(batched(x, batch_size)):
        leaves = tf.nest.flatten(batch)
        if index == 0:
            check_batched(model, leaves)
        for leaf in leaves:
            if leaf.dtype.is_floating and not bool(tf.reduce_all(tf.math.is_finite(leaf))):
                rows = np.asarray(leaf).reshape(leaf.shape[0], -1) if leaf.shape.rank else None
                where = (
                    f": example {offset + int(np.flatnonzero(~np.isfinite(rows).all(axis=1))[0])}"
                    if rows is not None
                    else ""
                )
                raise ValueError(f"inputs contain NaN or Inf{where}.")
        offset += int(leaves[0].shape[0]) if leaves and leaves[0].shape.rank else 0
        yield batch


def check_batched(model: keras.Model, leaves: list[tf.Tensor]) -> None:
    """Refuse input leaves with one axis fewer than the model's inputs: a dataset that was
    not batched (Keras would fail later with a shape error that does not say so)."""
    try:
        expected = [tuple(t.shape) for t in model.inputs]
    except (AttributeError, ValueError):
        return  # a subclassed model: its input rank is unknown
    if not expected or len(expected) != len(leaves):
        return
    got = sorted(leaf.shape.rank or 0 for leaf in leaves)
    if got == sorted(len(shape) - 1 for shape in expected):
        shapes = [list(leaf.shape) for leaf in leaves]
        raise ValueError(
            f"the inputs have shape {shapes[0] if len(shapes) == 1 else shapes}, one axis "
            f"fewer than the model's input {list(expected[0]) if len(expected) == 1 else expected}"
            ": the dataset seems not to be batched. Call `.batch(n)` on it (e.g. "
            "`dataset.batch(256)`)."
        )


def probe_outputs(model: keras.Model, likelihood: Likelihood, x: Any) -> tuple:
    """The model's output shape per example, ``(*positions, C)``, read from its first few
    examples, after refusing outputs that are already probabilities where the likelihood
    expects logits, and models with several outputs.

    Kept per model and input signature (dtypes and shapes after the batch axis): a refit
    of the same model on the same kind of data runs no probe. Only a probe that passed is
    kept, so a refused model is refused again."""
    signature = tuple((leaf.dtype, tuple(leaf.shape[1:])) for leaf in tf.nest.flatten(x))
    key = (signature, isinstance(likelihood, Classification))
    known = _PROBED.setdefault(model, {})
    if key not in known:
        known[key] = _probe(model, likelihood, x)
    return known[key]


def _probe(model: keras.Model, likelihood: Likelihood, x: Any) -> tuple:
    """:func:`probe_outputs` without its cache."""
    head = tf.nest.map_structure(lambda t: t[:_PROBE_EXAMPLES], x)
    outputs = _inference_outputs(model, head)
    if isinstance(outputs, list | tuple | dict):
        shapes = [tuple(o.shape) for o in tf.nest.flatten(outputs)]
        raise ValueError(
            f"the model has {len(shapes)} outputs {shapes}; select the one the posterior is "
            "over with output= (its name or index)."
        )
    if outputs.shape.rank < 2:
        raise ValueError(
            f"the model output must have shape [N, C] or [N, ..., C] (positions); got rank "
            f"{outputs.shape.rank} ({outputs.shape})."
        )
    width = int(outputs.shape[-1])
    if isinstance(likelihood, Classification) and width > 1:
        probs = tf.cast(outputs, tf.float64)
        sums_to_one = tf.reduce_all(tf.abs(tf.reduce_sum(probs, -1) - 1) < _PROBABILITY_TOLERANCE)
        in_range = tf.reduce_all((probs >= 0) & (probs <= 1))
        if bool(sums_to_one & in_range):
            raise ValueError(_LOGITS_MESSAGE.format(what="its outputs are probabilities"))
    return tuple(int(d) for d in outputs.shape[1:])


_PROBED: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _inference_outputs(model: keras.Model, head: Any) -> Any:
    """The model's inference outputs on ``head``, eagerly (the probe runs once per model
    and input signature, where tracing and optimising a compiled forward took 2-6x
    longer: ResNet50 0.96 against 0.27 s, DenseNet121 1.90 against 0.34 s), through the
    curvature engine's trace: its layer rules' forwards, Keras' own calls where no rule
    applies. A plain eager call ran Keras' grouped convolutions (ConvNeXt), which make a
    ``tf.function`` per call, and TensorFlow warned the user of retracing."""
    from laplace_tf.curvature.tracing import trace  # the engine imports this module

    try:
        with tf.GradientTape():
            outputs, _ = trace(model, head, list(model.trainable_variables))
    except Exception:  # noqa: BLE001 - a rule's forward failing must not fail the probe
        outputs = model(head, training=False)  # (the model's own call decides, as before)
    return outputs


def check_output_activation(model: keras.Model, likelihood: Likelihood) -> None:
    """Refuse a Functional / Sequential model whose last layer applies softmax (or sigmoid
    for ``"binary"``): the likelihoods read logits. Subclassed models are caught by
    :func:`probe_outputs` when their rows sum to one."""
    squash = {
        Classification: (keras.activations.softmax, keras.layers.Softmax, "softmax"),
        Binary: (keras.activations.sigmoid, None, "sigmoid"),
        Multilabel: (keras.activations.sigmoid, None, "sigmoid"),
    }.get(type(likelihood))
    if squash is None:
        return
    activation, layer_type, name = squash
    layer = _output_layer(model)
    if layer is None:
        return
    if (layer_type is not None and isinstance(layer, layer_type)) or getattr(
        layer, "activation", None
    ) is activation:
        raise ValueError(
            _LOGITS_MESSAGE.format(what=f"its last layer {layer.name!r} applies {name}")
        )


def _output_layer(model: keras.Model) -> Any:
    """The layer that produces a Functional / Sequential model's output (recursing into
    nested models); ``None`` when it cannot be seen."""
    try:
        history = model.outputs[0]._keras_history
    except (AttributeError, IndexError, TypeError, ValueError):
        return None
    layer = history.operation
    if isinstance(layer, keras.Model):
        return _output_layer(layer)
    return layer


_LOGITS_MESSAGE = (
    "The likelihood expects logits (unnormalised outputs), but {what}. The curvature and the "
    "predictive apply the link themselves, so a softmax / sigmoid output would be applied "
    "twice. Use a model without the final activation, e.g. clone it and set the last "
    "layer's activation to None (`keras.activations.linear`), or build "
    "`keras.Model(model.inputs, pre_activation_tensor)`."
)
