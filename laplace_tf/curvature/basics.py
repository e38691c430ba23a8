"""What the curvature engines share: the selected weights, the loss outputs, the checked
batches, float64 accumulation over batches, and what one pass over the data yields.

Kept apart from the engines (:mod:`structured`, :mod:`black_box`, :mod:`reducers`) so
that each of them reads one place for these conventions.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import keras
import numpy as np
import tensorflow as tf
from tensorflow.core.protobuf import config_pb2, rewriter_config_pb2
from tensorflow.python.eager import context as eager_context

from laplace_tf._data import batched, iterate_batches
from laplace_tf._validation import BatchChecker, _float_leaves, batch_flags
from laplace_tf.curvature.distributed import replicated, strategy_of
from laplace_tf.curvature.registry import is_piecewise_linear_layer
from laplace_tf.curvature.tracing import graph_of
from laplace_tf.likelihoods import BUILT_IN, Likelihood

KINDS = ("ggn", "ggn_mc", "ef", "hessian")
#: Datasets of fewer batches than this (when their cardinality is known) take the Python
#: loop, not a :func:`compiled_pass`: the compiled pass saves a Python call and a host
#: read per batch, but its step is traced for any batch size, which on a first fit traced
#: and optimised about 2.5x slower than the Python loop's step for the batch's own shape
#: (BiLSTM exact GGN, one batch: 20 s against 7.5 s).
COMPILED_PASS_BATCHES = 8
#: A fit's float64 sums are held in variables of at most this many elements, each added
#: to in place: a batch's additions then need one variable's worth of temporaries
#: (float32 and float64 copies), not the model's. The weights, flattened one after
#: another, are cut into about :data:`SUM_VARIABLES` equal segments (of at least
#: :data:`SUM_MIN_ELEMENTS`, at most this), a large weight over several.
SUM_CHUNK_ELEMENTS = 1 << 22
#: Segments the float64 sums are cut into, unless that makes them smaller than
#: :data:`SUM_MIN_ELEMENTS` (each variable costs about a millisecond per fit).
SUM_VARIABLES = 16
#: The smallest segment of the float64 sums (a model smaller than it has one variable).
SUM_MIN_ELEMENTS = 1 << 16
#: Fits of weights of at most this many elements keep their float64 sums' variables for
#: the next fit of the same kind (:class:`SumsPool`): creating them cost ~1 ms a fit, 4%
#: of the benchmark MLP's ``ef``. Larger weights' sums are freed after each fit.
POOLED_SUM_ELEMENTS = 1 << 20
#: The fits' compiled calls are optimised by one round of Grappler's passes, not two, and
#: on a machine without a GPU without its layout optimiser (convolutions on the CPU stay
#: channels-last) and memory optimiser (:func:`lean_grappler`). On ResNet50's first exact
#: ``ggn`` fit, where optimising the step took ~3.9 s, the three saved 1.0-1.4, 0.8 and
#: 1.0 s alone and 2.2-2.6 s together; warm fits and the zoo's live tensors measured the
#: same (docs/curvature.md, First fits). The user's own settings are kept.
LEAN_GRAPPLER = True


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


class Tally:
    """The weighted counts of a pass over the data (:func:`counts` of each batch, kept on
    the device and summed once at the end: no per-batch host read or op unless
    :attr:`examples` is asked for, for progress reports)."""

    def __init__(self):
        self._parts: list[tf.Tensor] = []
        self._total: np.ndarray | None = None
        self._examples, self._read = 0.0, 0

    def add(self, counts: tf.Tensor) -> None:
        self._parts.append(counts)
        self._total = None

    @property
    def examples(self) -> int:
        """The weighted examples so far, rounded (reads only the batches not yet read)."""
        for part in self._parts[self._read :]:
            self._examples += float(part[0])
        self._read = len(self._parts)
        return int(round(self._examples))

    @property
    def total(self) -> np.ndarray:
        if self._total is None:
            self._total = np.sum([part.numpy() for part in self._parts], axis=0)
        return self._total

    @property
    def n_data(self) -> int | float:
        """The weighted number of examples: an ``int`` unless the weights make it fractional."""
        return _count(float(self.total[0]))

    @property
    def n_rows(self) -> int | float:
        """The weighted number of loss rows (examples times positions)."""
        return _count(float(self.total[1]))

    @property
    def width(self) -> int:
        """``C``, the outputs per example and position."""
        return int(self._parts[-1][2])


def _count(value: float) -> int | float:
    return int(value) if float(value).is_integer() else value


class CheckedPass:
    """One pass over ``data`` whose batches are checked (:class:`BatchChecker`) at one
    compiled call a batch: shapes before the step, values from the flags that a
    :func:`checked_step` computes beside its own work.

    Iterate it for the ``(x, y, sample_weight)`` batches and call :meth:`run` on each.
    """

    def __init__(self, model: keras.Model, likelihood: Likelihood, data: Any, batch_size: int):
        self.checker = BatchChecker(model, likelihood)
        self._batches = iterate_batches(data, batch_size=batch_size)
        self._count = 0

    def __iter__(self):
        for x, y, weights in self._batches:
            self._count = self.checker.check_shapes(x, y, weights)
            yield x, y, weights

    def run(self, step, x: Any, y: tf.Tensor, weights: tf.Tensor | None, *args: Any) -> Any:
        """``step(x, y, weights, *args)`` of a :func:`checked_step`, after which the batch's
        flags are verified (a fault raises before the result is used)."""
        checker = self.checker
        try:
            with lean_grappler():
                flags, result = step(
                    x, y, weights, *args, width=checker.n_outputs, positions=checker.positions
                )
        except tf.errors.InvalidArgumentError:
            checker(x, y, weights)  # a bad value the step tripped on is named here
            raise
        checker.verify(x, y, weights, flags, self._count)
        return result


_LEAN_OPTIONS: dict = {}


@contextlib.contextmanager
def lean_grappler() -> Iterator[None]:
    """Calls of compiled functions in this block (on this thread) are optimised by the
    leaner Grappler passes of :data:`LEAN_GRAPPLER`. A function is optimised on its first
    call for the options it is called with: call each one under the same options."""
    if not LEAN_GRAPPLER or not tf.executing_eagerly():
        yield
        return
    eager = eager_context.context()
    current = eager.function_call_options
    base = current.config_proto_serialized
    key = (base, current.executor_type)
    options = _LEAN_OPTIONS.get(key)
    if options is None:
        config = config_pb2.ConfigProto.FromString(base)
        rewrite, rewriter = config.graph_options.rewrite_options, rewriter_config_pb2.RewriterConfig
        if rewrite.meta_optimizer_iterations == rewriter.DEFAULT_NUM_ITERS:
            rewrite.meta_optimizer_iterations = rewriter.ONE
        if not tf.config.list_logical_devices("GPU"):  # user settings other than default stay
            if rewrite.layout_optimizer == rewriter.DEFAULT:
                rewrite.layout_optimizer = rewriter.OFF
            if rewrite.memory_optimization == rewriter.DEFAULT_MEM_OPT:
                rewrite.memory_optimization = rewriter.NO_MEM_OPT
        options = eager_context.FunctionCallOptions(current.executor_type, config)
        _LEAN_OPTIONS[key] = options
    eager.function_call_options = options
    try:
        yield
    finally:
        eager.function_call_options = current


def checked_step(step, likelihood: Likelihood):
    """``step(x, y, weights, *args)`` compiled with :func:`batch_flags` of the batch, as
    ``(flags, result)``, for :meth:`CheckedPass.run`."""

    @tf.function(reduce_retracing=True, autograph=False)
    def run(x, y, weights, *args, width, positions):
        flags = batch_flags(likelihood, width, positions, _float_leaves(x), y, weights)
        return flags, step(x, y, weights, *args)

    return run


def compiled_pass(step, likelihood: Likelihood, finish: Callable[..., Any]):
    """A pass of a :func:`checked_step` over a dataset iterator in one compiled call:
    ``run(first, iterator, seed, *state, width=, positions=) -> (fault, counts, result)``,
    with ``first`` the batch already read from ``iterator``, ``counts`` the summed
    ``[examples, rows, C]``, ``fault`` true when any batch's flags report a bad value and
    ``result`` ``finish(*state)`` after the pass. ``state`` is zeroed first.
    Batches are numbered from 0 (``first``) and seeded ``[seed, i]``, as in the Python
    loop. The step is called at one place, in the loop, which ``first`` enters as an
    optional with the shapes of the iterator's elements: the step is traced and
    optimised once, for every batch, and inlined (a step called twice had to be kept out
    of line: a compiled loop of the MLP's gradient steps ran 21 against 13 ms so)."""

    @tf.function(reduce_retracing=True, autograph=False)
    def run(first, iterator, seed, *state, width, positions):
        def body(index, batch, fault, counted):
            x, y, *rest = batch.get_value()
            flags, counts = step(
                x, y, rest[0] if rest else None, tf.stack([seed, index]), *state,
                width=width, positions=positions,
            )  # fmt: skip
            counted = tf.concat([counted[:2] + counts[:2], counts[2:]], axis=0)
            with tf.control_dependencies([counts]):  # read after the step: one batch held
                following = iterator.get_next_as_optional()
            return index + 1, following, fault | _faulty(flags), counted

        first = tf.nest.map_structure(
            lambda t, spec: tf.compat.v1.placeholder_with_default(t, spec.shape),
            first,
            iterator.element_spec,
        )
        start = (tf.constant(0, tf.int64), tf.experimental.Optional.from_value(first))
        with tf.control_dependencies([v.assign(tf.zeros_like(v)) for v in state]):
            *_, fault, counted = tf.while_loop(
                lambda index, batch, *_: batch.has_value(),
                body,
                (*start, tf.constant(False), tf.zeros([3], tf.float64)),
                parallel_iterations=1,  # one batch in flight
            )
        with tf.control_dependencies([counted]):
            return fault, counted, finish(*state)

    return run


def _faulty(flags: tf.Tensor) -> tf.Tensor:
    """Whether :func:`batch_flags` report a fault."""
    finite = tf.reduce_all(flags[:3] > 0)
    return tf.logical_not(finite) | (flags[3] < 0) | (flags[4] > 0)


def as_dataset(model: keras.Model, data: Any, batch_size: int) -> tf.data.Dataset | None:
    """``data`` as a dataset of ``(x, y)`` / ``(x, y, sample_weight)`` batches of dense
    tensors that a :func:`compiled_pass` can read (arrays are batched here), or ``None``:
    other iterables, other elements, and models under a strategy (whose steps split
    each batch over the replicas) take the Python loop."""
    if strategy_of(model) is not None:
        return None
    if isinstance(data, tuple) and len(data) in (2, 3):
        try:
            data = batched(data, batch_size)
        except (TypeError, ValueError):
            return None
    if not isinstance(data, tf.data.Dataset):
        return None
    spec = data.element_spec
    if not isinstance(spec, tuple) or len(spec) not in (2, 3):
        return None
    if not all(isinstance(leaf, tf.TensorSpec) for leaf in tf.nest.flatten(spec)):
        return None
    return data


def fit_pass(
    model: keras.Model,
    likelihood: Likelihood,
    data: Any,
    batch_size: int,
    step,
    seed: int,
    state: Sequence[tf.Variable],
    finish: Callable[..., Any],
    *,
    compiled=None,
    progress: Callable[[int], None] | None = None,
    on_first: Callable[[Any], None] | None = None,
) -> tuple[tf.Tensor, Any]:
    """One checked pass of ``step`` (a :func:`checked_step` that adds into the variables
    ``state``, zeroed first, and returns the batch's counts) over ``data``; returns the
    summed counts ``[examples, rows, C]`` and ``finish(*state)`` after the pass.
    ``on_first(x)`` is called with the first batch's inputs.

    With ``compiled`` (a :func:`compiled_pass` of ``step`` and ``finish``) and data that
    :func:`as_dataset` accepts (and of at least :data:`COMPILED_PASS_BATCHES` batches, or
    of unknown cardinality), the first batch's shapes are checked here and every batch
    read in one compiled call: no Python call per batch (``progress`` needs one, so it
    takes the Python loop). When a batch there is faulty or an op refuses one, the pass
    starts again in Python, where :class:`CheckedPass` names it.
    """
    if compiled is not None and progress is None:
        dataset = as_dataset(model, data, batch_size)
        if dataset is not None and not 0 <= int(dataset.cardinality()) < COMPILED_PASS_BATCHES:
            done = _compiled(model, likelihood, dataset, compiled, seed, state, on_first)
            if done is not None:
                return done
    for variable in state:
        variable.assign(tf.zeros_like(variable))
    tally = Tally()
    batches = CheckedPass(model, likelihood, data, batch_size)
    for index, (x, y, w) in enumerate(batches):
        if index == 0 and on_first is not None:
            on_first(x)
        tally.add(batches.run(step, x, y, w, tf.constant([seed, index], tf.int64), *state))
        if progress is not None:
            progress(tally.examples)
    return tf.constant(tally.total[:2].tolist() + [tally.width], tf.float64), finish(*state)


def _compiled(model, likelihood, dataset, compiled, seed, state, on_first):
    """:func:`fit_pass` through ``compiled``: ``(counts, finish(*state))``, or ``None``
    (empty data, a faulty batch, or an op that refused one: the Python loop names it)."""
    iterator = iter(dataset)  # one iterator: a cached dataset is read once, in full
    first = next(iterator, None)
    if first is None:
        return None  # empty: the Python loop says so
    x, y, *rest = first
    checker = BatchChecker(model, likelihood)
    checker.check_shapes(x, y, rest[0] if rest else None)
    if on_first is not None:
        on_first(x)
    shape = {"width": checker.n_outputs, "positions": checker.positions}
    try:
        with lean_grappler():
            fault, counts, result = compiled(
                first, iterator, tf.constant(seed, tf.int64), *state, **shape
            )
    except tf.errors.InvalidArgumentError:
        return None
    return None if bool(fault) else (counts, result)


def sum_groups(variables: Sequence[Any]) -> list[list[tuple[int, int, int]]]:
    """The float64 sums' variables: the weights flattened one after another, then the
    NLL (index ``len(variables)``), cut into segments of equal size (see
    :data:`SUM_CHUNK_ELEMENTS`); each segment lists its ``(index, start, stop)`` ranges of
    the flattened weights, so a large weight may span several."""
    sizes = [v.shape.num_elements() for v in variables] + [1]
    total = sum(sizes)
    size = min(SUM_CHUNK_ELEMENTS, max(SUM_MIN_ELEMENTS, -(-total // SUM_VARIABLES)))
    groups: list[list[tuple[int, int, int]]] = []
    room = 0
    for index, elements in enumerate(sizes):
        start = 0
        while start < elements:
            if room == 0:
                groups.append([])
                room = size
            stop = min(elements, start + room)
            groups[-1].append((index, start, stop))
            room -= stop - start
            start = stop
    return groups


def new_sums(variables: Sequence[Any], groups: list[list[tuple[int, int, int]]]) -> list:
    """Zeroed float64 variables for the segments of :func:`sum_groups` (the NLL included)."""
    return [
        tf.Variable(tf.zeros([sum(b - a for _, a, b in group)], tf.float64), trainable=False)
        for group in groups
    ]


class SumsPool:
    """The float64 sums (:func:`new_sums`) of one kind of fit, kept for the next fit when
    the weights have at most :data:`POOLED_SUM_ELEMENTS` elements. Each fit takes a set
    of its own (concurrent fits never share one); a pass zeroes it before use. (Sums in
    variables added to in place: a fresh weight-sized tensor per batch cost ~15% of an
    MLP step in allocations, and a variable per weight ~0.35-0.9 ms each per fit.)"""

    def __init__(self, variables: Sequence[Any], groups: list[list[tuple[int, int, int]]]):
        self._new = lambda: new_sums(variables, groups)
        self._keep = sum(v.shape.num_elements() for v in variables) <= POOLED_SUM_ELEMENTS
        self._free: list[list[tf.Variable]] = []
        self._lock = threading.Lock()

    def clear(self) -> None:
        """Drop the kept sums (their memory is freed once no fit holds them)."""
        with self._lock:
            self._free.clear()

    @contextlib.contextmanager
    def taken(self) -> Iterator[list[tf.Variable]]:
        with self._lock:
            sums = self._free.pop() if self._free else None
        sums = sums or self._new()
        try:
            yield sums
        finally:
            if self._keep:
                with self._lock:
                    self._free.append(sums)


def sum_in_order(*parts: tf.Tensor) -> tf.Tensor:
    """The parts' sum, added in order: each term passes a Snapshot, which Grappler does
    not merge into adds (merged, the parts' adds became AddNs of 3+ inputs whose order
    followed the parts' timing: the last bit differed in ~8% of repeated split steps)."""
    total, *rest = parts
    for part in rest:
        total = tf.raw_ops.Snapshot(input=total) + tf.raw_ops.Snapshot(input=part)
    return total


def accumulating(step, groups: list[list[tuple[int, int, int]]]):
    """``step`` whose sums (the weights', then the NLL) are added to the running float64
    sums (:func:`new_sums`, updated in place) in the same compiled call: accurate over
    millions of examples, no per-batch eager op, and one segment's temporaries at a time.
    Returns the batch's counts."""

    def run(x, y, weights, seed, *sums):
        parts, batch_nll, counts = step(x, y, weights, seed)
        pieces = [tf.reshape(p, [-1]) for p in [*parts, batch_nll]]
        updates = []
        for group, total in zip(groups, sums, strict=True):
            dtype = max((pieces[i].dtype for i, _, _ in group), key=lambda d: d.size)
            flat = [
                tf.cast(pieces[i] if b - a == pieces[i].shape[0] else pieces[i][a:b], dtype)
                for i, a, b in group
            ]
            flat = flat[0] if len(flat) == 1 else tf.concat(flat, axis=0)
            updates.append(total.assign_add(tf.cast(flat, tf.float64)))
        with tf.control_dependencies(updates):
            return tf.identity(counts)

    return run


def unflattening(variables: Sequence[Any], groups: list[list[tuple[int, int, int]]]):
    """The sums of :func:`accumulating` back into tensors shaped and typed like
    ``variables``, then the NLL (float64): one compiled call (a dozen eager ops cost ~4%
    of a small model's fit)."""
    shapes = [v.shape for v in variables] + [tf.TensorShape([])]
    dtypes = [v.dtype for v in variables] + [tf.float64]

    @tf.function(autograph=False)
    def run(*sums):
        parts = [[] for _ in shapes]
        for group, total in zip(groups, sums, strict=True):
            total = tf.convert_to_tensor(total)
            sizes = [b - a for _, a, b in group]
            pieces = [total] if len(group) == 1 else tf.split(total, sizes)
            for (i, _, _), piece in zip(group, pieces, strict=True):
                parts[i].append(piece)
        return [
            tf.cast(tf.reshape(p[0] if len(p) == 1 else tf.concat(p, 0), shape), dtype)
            for p, shape, dtype in zip(parts, shapes, dtypes, strict=True)
        ]

    return run


def _replicated(model, step):
    """``step`` spread over the model's replicas when it was built under a strategy."""
    strategy = strategy_of(model)
    return step if strategy is None else replicated(strategy, step)
