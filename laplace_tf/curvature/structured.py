"""Diagonal GGN / Fisher of a Keras model, and the GLM output covariance.

One forward pass records each parameterised layer's cut point (:mod:`tracing`); one
vectorised backward pass per column of ``S`` (``S_n S_n^T`` = Hessian of the loss in
the outputs, or sampled / true-label loss gradients) gives the cotangents at every cut;
the layer rules (:mod:`layers`) turn those into ``sum_n sum_k g_{nk}^2`` without
materialising per-sample gradients. The same cotangents with ``S = I`` and the
posterior variances as weights give the GLM predictive covariance ``J diag(w) J^T``.

Shared conventions live in :mod:`basics`, the black-box Hessian in :mod:`black_box`
(both re-exported here); the compiled steps are cached here (:data:`_STEPS`).
"""

from __future__ import annotations

import warnings
import weakref
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import keras
import tensorflow as tf

from laplace_tf._checks import positive_int, resolve_seed, user_stacklevel
from laplace_tf._data import DEFAULT_BATCH_SIZE
from laplace_tf._validation import check_output_activation, checked_inputs
from laplace_tf.curvature.basics import (  # noqa: F401  (re-exported for the engines)
    KINDS,
    CheckedPass,
    CurvatureFit,
    SumsPool,
    _accumulation_dtype,
    _checked_batches,
    _count,
    _likelihood_key,
    _loss_outputs,
    _model_variables,
    _replicated,
    accumulating,
    as_dataset,
    checked_step,
    compiled_pass,
    fit_pass,
    is_piecewise_linear,
    sum_groups,
    sum_in_order,
    unflattening,
)
from laplace_tf.curvature.black_box import (  # noqa: F401  (re-exported)
    HESSIAN_WARN_PARAMS,
    _batch_loss,
    _black_box_hessian,
)
from laplace_tf.curvature.column_sums import (
    dense_column_sums,
    fold_column_chunks,
    moment_fold,
    per_variable,
    zero_factors,
)
from laplace_tf.curvature.conv_factors import shared_unfoldings
from laplace_tf.curvature.layers import Explicit, Outer, Patches
from laplace_tf.curvature.loss_terms import counts as loss_counts
from laplace_tf.curvature.loss_terms import (
    loss_columns,
    loss_rows,
    output_blocks,
    position_chunk,
)
from laplace_tf.curvature.loss_terms import nll as loss_nll
from laplace_tf.curvature.tracing import trace
from laplace_tf.likelihoods import Likelihood, get_likelihood

#: Up to this many columns of S, backward passes are unrolled (faster on CPU than pfor).
UNROLLED_COLUMNS = 16
#: Columns are unrolled only while columns x the operations traced so far (the forward
#: pass, and the backward of earlier unrolled chunks) stay within this; above it
#: (recurrent and large models, whose backward passes take seconds to trace) one
#: backward is traced and mapped over the columns in a loop.
UNROLLED_BACKWARD_OPS = 4_000
#: Bound on the cut cotangents kept per example while fitting (columns x cut sizes); above
#: it the columns of S are processed in chunks, trading a little speed for memory.
COLUMN_ENTRIES_PER_EXAMPLE = 2**15
#: Column chunks of S beyond the first are folded in one ``tf.while_loop`` (False: the
#: backward pass is traced once; measured on MobileNetV2's exact GGN, a first fit ~7x
#: faster, warm fits ~1.7x slower; on the benchmark CNN warm steps 2.5x slower) or
#: unrolled one after another (True: warm speed over tracing). ``None`` (the default):
#: unrolled when chunks x sites stay within :data:`UNROLLED_SITE_CHUNKS` (small models,
#: whose backward traces fast), else the loop. Either way one chunk at a time.
UNROLL_COLUMN_CHUNKS: bool | None = None
#: Chunks x traced layer sites up to which column chunks are unrolled (see above).
UNROLLED_SITE_CHUNKS = 64
#: Columns x forward operations above which a diagonal fit back-propagates the columns
#: of S one at a time in a ``tf.while_loop`` (one traced backward, one column's cut
#: cotangents and per-example gradients alive), in place of the chunks that
#: :data:`UNROLL_COLUMN_CHUNKS` left at ``None`` would pick (set to ``True`` / ``False``, it
#: is obeyed). The benchmark MLP and CNN (about 1,300) stay unrolled; measured
#: with it (9 columns, batch 32, medians of 11): BiLSTM live tensors 19.2 -> 3.7 MiB and
#: first fit 7.0 -> 3.9 s, warm about 10% slower; Transformer 7.3 -> 2.8 MiB, first fit
#: 2.9 -> 1.6 s, warm the same.
LOOPED_COLUMN_OPS = 2_000
#: Whether a step whose factors are all Dense kernels and biases (MLPs) back-propagates
#: each column on its own, folding it into ``sum_k d_k^2`` (:mod:`column_sums`), when its
#: columns would otherwise be unrolled.
DENSE_COLUMN_SUMS = True
#: A batch of a Dense chain (every factor a Dense kernel on ``[N, I]`` inputs or a bias)
#: may be stepped as this many parts side by side on CPU for ``ggn_mc`` / ``ef`` (benchmark
#: MLP with 2: 1.09-1.14x -> 0.93-1.03x a gradient epoch warm, but 0.3 s more tracing on a
#: first fit; off (1) by default: a single fit of < ~250,000 examples ends sooner unsplit).
DENSE_SPLIT = 1
#: Bound on the entries of cut cotangents and per-example gradients that the GLM
#: predictive holds at once (2**25 entries: 128 MiB in float32); larger batches are
#: processed in chunks of examples, whatever the user's batch size.
PREDICT_ENTRIES = 2**25


def diagonal(
    model: keras.Model,
    data: Any,
    *,
    likelihood: str | Likelihood,
    kind: str = "ggn",
    params: Sequence[Any] | None = None,
    mc_samples: int = 1,
    seed: int | None = None,
    sigma_noise: float = 1.0,
    batch_size: int = DEFAULT_BATCH_SIZE,
) -> list[tf.Tensor]:
    """Diagonal of the curvature of the summed negative log-likelihood of ``model``.

    ``G = sum_n J_n^T Lambda_n J_n`` with ``J_n`` the Jacobian of the outputs ``f(x_n)``
    in the parameters and ``Lambda_n = S_n S_n^T`` the Hessian of the loss in ``f``;
    ``diag G = sum_n sum_k (J_n^T S_n[:, k])^2``, squared per example and column.

    Parameters
    ----------
    model : keras.Model
        A model with one output of shape ``[N, C]`` (logits for classification, one
        logit for binary, the mean for regression). It is evaluated in inference mode
        and never modified.
    data : tf.data.Dataset or tuple
        ``(x, y)`` batches, or an ``(x, y)`` tuple of arrays batched by ``batch_size``.
        ``x`` may be a dict or list for multi-input models.
    likelihood : {"classification", "binary", "regression"} or Likelihood
    kind : {"ggn", "ggn_mc", "ef", "hessian"}
        ``"ggn"``: exact GGN, one backward pass per output (``C``). ``"ggn_mc"``: Monte
        Carlo GGN (Fisher) from ``mc_samples`` pseudo-labels drawn from the model's
        predictive; unbiased. ``"ef"``: empirical Fisher, squared per-example gradients
        with the true labels; one backward pass, but biased (it is not a curvature of
        the loss away from the optimum). ``"hessian"``: the exact Hessian diagonal;
        equal to the GGN's (and computed as it) when every activation is piecewise
        linear, otherwise through :func:`hessian_diagonal` at ``P`` Hessian-vector
        products per batch, which warns for large models.
    params : list of variables, optional
        Weights to differentiate (default ``model.trainable_variables``).
    mc_samples : int
        Pseudo-label draws per example for ``"ggn_mc"``.
    seed : int, optional
        Seed for ``"ggn_mc"``; the same seed gives the same result.
    sigma_noise : float
        Observation noise of the ``"regression"`` likelihood.
    batch_size : int
        Batch size used when ``data`` is a tuple of arrays.

    Returns
    -------
    list of tf.Tensor
        The diagonal, shaped like ``params``.
    """
    return fit_diagonal(
        model,
        data,
        likelihood=likelihood,
        kind=kind,
        params=params,
        mc_samples=mc_samples,
        seed=seed,
        sigma_noise=sigma_noise,
        batch_size=batch_size,
    ).diagonal


def fit_diagonal(
    model: keras.Model,
    data: Any,
    *,
    likelihood: str | Likelihood,
    kind: str = "ggn",
    params: Sequence[Any] | None = None,
    mc_samples: int = 1,
    seed: int | None = None,
    sigma_noise: float = 1.0,
    batch_size: int = DEFAULT_BATCH_SIZE,
    progress: Callable[[int], None] | None = None,
) -> CurvatureFit:
    """:func:`diagonal`, plus the summed NLL at the current weights and the example count.

    ``progress(n)`` is called after each batch with the number of examples done so far.
    """
    if kind not in KINDS:
        raise ValueError(f"Unknown curvature kind {kind!r}; valid kinds are {', '.join(KINDS)}.")
    positive_int("mc_samples", mc_samples)
    likelihood = get_likelihood(likelihood, sigma_noise=sigma_noise)
    variables = _model_variables(model, params)
    check_output_activation(model, likelihood)
    exact = getattr(likelihood, "exact_output_hessian", True)  # False: S is a Fisher's root
    if kind == "hessian" and not (exact and is_piecewise_linear(model)):
        batch_loss = _cached(
            model,
            ("hessian_loss", _likelihood_key(likelihood)),
            [],
            lambda: _batch_loss(model, likelihood),
        )
        return _black_box_hessian(
            model, data, likelihood, variables, batch_size, batch_loss, progress
        )
    seed = resolve_seed(seed)
    kind = "ggn" if kind == "hessian" else kind
    groups = sum_groups(variables)
    key = ("diagonal", _likelihood_key(likelihood), kind, mc_samples, repr(groups))
    step = _cached(
        model,
        key,
        variables,
        lambda: checked_step(
            accumulating(
                _replicated(model, _diagonal_step(model, likelihood, variables, kind, mc_samples)),
                groups,
            ),
            likelihood,
        ),
    )

    unflatten = _cached(
        model, (*key, "unflatten"), variables, lambda: unflattening(variables, groups)
    )
    run = _cached(
        model, (*key, "pass"), variables, lambda: compiled_pass(step, likelihood, unflatten)
    )
    pool = _cached(model, (*key, "sums"), variables, lambda: SumsPool(variables, groups))
    with pool.taken() as sums:
        counts, (*diagonal, nll) = fit_pass(
            model,
            likelihood,
            data,
            batch_size,
            step,
            seed,
            sums,
            unflatten,
            compiled=run,
            progress=progress,
            on_first=lambda x: _warn_fallbacks(model, variables, x),
        )
    examples, rows, width = counts.numpy().tolist()
    return CurvatureFit(diagonal, float(nll), _count(examples), int(width), _count(rows))


def output_covariance(
    model: keras.Model,
    x: Any,
    weights: Sequence[Any],
    *,
    params: Sequence[Any] | None = None,
    batch_size: int = DEFAULT_BATCH_SIZE,
) -> tf.Tensor:
    """Per-example output covariance ``J(x_n) diag(w) J(x_n)^T`` of shape ``[N, C, C]``.

    With ``w`` the posterior variances this is the GLM (linearised) predictive
    covariance of a diagonal Laplace posterior; its diagonal is
    ``sum_p J_cp(x_n)^2 w_p``. Computed with the same layer rules as :func:`diagonal`
    (``S = I``), never forming the ``[N, C, P]`` Jacobian.

    Parameters
    ----------
    model : keras.Model
    x : array, tensor, dict or list
        Inputs; processed in batches of ``batch_size``.
    weights : list of tensors
        Non-negative weights shaped like ``params``.
    params : list of variables, optional
        Default ``model.trainable_variables``.
    batch_size : int
    """
    return glm_moments(model, x, weights, params=params, batch_size=batch_size)[1]


def glm_moments(
    model: keras.Model,
    x: Any,
    weights: Sequence[Any],
    *,
    params: Sequence[Any] | None = None,
    batch_size: int = DEFAULT_BATCH_SIZE,
) -> tuple[tf.Tensor, tf.Tensor]:
    """Outputs ``f(x)`` (``[N, C]``) and :func:`output_covariance` from one pass.

    ``x`` is an array (dict, list) batched by ``batch_size``, or a batched dataset of
    ``x`` or ``(x, y, ...)``. Working memory is bounded whatever the batch size: a batch
    whose cut cotangents and per-example gradients (all ``C`` columns) would exceed
    :data:`PREDICT_ENTRIES` entries is processed in chunks of examples.
    """
    variables = _model_variables(model, params)
    weights = [tf.convert_to_tensor(w, v.dtype) for w, v in zip(weights, variables, strict=True)]
    for w, v in zip(weights, variables, strict=True):
        if w.shape != v.shape:
            raise ValueError(f"weights for {v.path} have shape {w.shape}, expected {v.shape}.")
    step = _cached(model, ("covariance",), variables, lambda: _covariance_step(model, variables))
    results = [step(part, weights) for part in predict_chunks(model, variables, x, batch_size)]
    means, covariances = zip(*results, strict=True)
    return tf.concat(means, axis=0), tf.concat(covariances, axis=0)


def predict_chunks(
    model: keras.Model, variables: list, x: Any, batch_size: int, per_column: int = 0
) -> Iterator[Any]:
    """The checked input batches of ``x``, cut into chunks of examples whose working set
    (cut cotangents and per-example gradients for all ``C`` output columns, plus
    ``per_column`` entries per column, e.g. a dense Jacobian row) stays within
    :data:`PREDICT_ENTRIES`, whatever ``batch_size`` is."""
    for batch in checked_inputs(model, x, batch_size):
        summary = _trace_summary(model, variables, batch)
        chunk = max(
            1, PREDICT_ENTRIES // (summary.entries_per_example + summary.width * per_column)
        )
        count = int(tf.nest.flatten(batch)[0].shape[0])
        for start in range(0, count, chunk):
            yield tf.nest.map_structure(lambda t, s=start, e=start + chunk: t[s:e], batch)


@dataclass(frozen=True)
class _TraceSummary:
    """What a trace of one example tells about the engine's work on a model."""

    entries_per_example: int  # C columns x cut sizes + the largest per-example gradients
    width: int  # C, the number of outputs
    fallbacks: tuple  # (layer name, layer class, weight count) of fallback sites


def _trace_summary(model, variables: list, batch: Any, factors: bool = True) -> _TraceSummary:
    """Traces one example of ``batch``, once per model, weights and input shape.

    The entries are what the covariance step holds per example: ``C`` columns times the
    cut sizes, plus the largest per-example gradients a factor forms at once (none for
    :class:`Outer`; one column's for :class:`Patches`; all ``C`` columns' otherwise).
    Without ``factors`` only the fallbacks are read (ResNet50: 0.46 -> 0.2 s, eager).
    """
    shapes = tuple(tuple(t.shape[1:]) for t in tf.nest.flatten(batch))

    def measure():
        head = tf.nest.map_structure(lambda t: t[:1], batch)
        with tf.GradientTape():
            outputs, sites = trace(model, head, variables)
        width = max(1, int(outputs.shape[-1]))
        if outputs.shape.rank > 2:  # whole positions' columns at once
            width *= position_chunk(outputs.shape[1:-1].num_elements(), width)
        cuts, largest, fallbacks = 0, 0, []
        for site in sites:
            cuts += max(1, site.cut.shape[1:].num_elements() or 1)
            zeros = tf.zeros([1, width, *site.cut.shape[1:]], site.cut.dtype)
            for factor in site.factors(zeros) if factors else ():
                if not isinstance(factor, Outer):
                    size = sum(v.shape.num_elements() for v in factor.variables)
                    largest = max(largest, size if isinstance(factor, Patches) else width * size)
            if site.rule is None:
                size = sum(v.shape.num_elements() for v in site.variables)
                fallbacks.append((site.layer.name, type(site.layer).__name__, size))
        return _TraceSummary(width * cuts + largest, width, tuple(fallbacks))

    return _cached(model, ("trace_summary", factors, shapes), variables, measure)


def _warn_fallbacks(model: keras.Model, variables: list, batch: Any) -> None:
    """One warning naming the layers that take the per-example fallback, if any."""
    fallbacks = _trace_summary(model, variables, batch, factors=False).fallbacks
    if not fallbacks:
        return
    total = sum(v.shape.num_elements() for v in variables)
    listed = ", ".join(
        f"{name!r} ({kind}, {size:,} weights, {size / total:.0%})" for name, kind, size in fallbacks
    )
    warnings.warn(
        f"{len(fallbacks)} layer(s) have no curvature rule and take the slow per-example "
        f"fallback (about one backward pass per example and column): {listed}. "
        "laplace_tf.curvature.explain(model) lists every weight's rule; subset='last_layer' "
        "or kind='ggn_mc' / 'ef' (one column) are faster.",
        FallbackWarning,
        stacklevel=user_stacklevel(),
    )


class FallbackWarning(UserWarning):
    """Some selected weights are differentiated by the slow generic per-example fallback."""


_STEPS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _cached(model, key: tuple, variables: list, build):
    """Compiled steps are kept per model, so repeated calls do not trace again."""
    steps = _STEPS.setdefault(model, {})
    key = (*key, tuple(id(v) for v in variables))
    if key not in steps:
        steps[key] = build()
    return steps[key]


def _cut_cotangents(tape, outputs, sites, columns: tf.Tensor) -> list[tf.Tensor]:
    """``[N, K, *cut.shape[1:]]`` cotangents of every site's cut for columns ``[N, D, K]``
    (``D``: the outputs of one example, flattened over their positions)."""
    cuts = [site.cut for site in sites]
    columns = tf.cast(tf.transpose(columns, [2, 0, 1]), outputs.dtype)

    def backward(column):
        column = tf.reshape(column, tf.shape(outputs))
        grads = tape.gradient(outputs, cuts, output_gradients=column, unconnected_gradients="zero")
        return [tf.cast(g, _accumulation_dtype(c.dtype)) for g, c in zip(grads, cuts, strict=True)]

    count = columns.shape[0]
    if count is not None and count <= UNROLLED_COLUMNS:
        if count == 1 or count * _traced_ops(outputs) <= UNROLLED_BACKWARD_OPS:
            per_column = [backward(columns[k]) for k in range(count)]
            return [tf.stack(list(grads), axis=1) for grads in zip(*per_column, strict=True)]
        signature = [tf.TensorSpec(None, _accumulation_dtype(cut.dtype)) for cut in cuts]
        per_column = tf.map_fn(backward, columns, fn_output_signature=signature)
        return [tf.experimental.numpy.swapaxes(g, 0, 1) for g in per_column]
    per_column = tf.vectorized_map(backward, columns)
    return [tf.experimental.numpy.swapaxes(g, 0, 1) for g in per_column]


def _traced_ops(outputs: tf.Tensor) -> int:
    """The operations traced so far into the graph of ``outputs`` (0 when eager): about
    what one backward pass to the cuts adds again."""
    graph = getattr(outputs, "graph", None)
    return len(graph.get_operations()) if graph is not None and not tf.executing_eagerly() else 0


def _site_factor_lists(tape, outputs, sites, columns) -> list[list]:
    cotangents = _cut_cotangents(tape, outputs, sites, columns)
    return [site.factors(cotangent) for site, cotangent in zip(sites, cotangents, strict=True)]


def _site_factors(tape, outputs, sites, columns) -> list:
    return [f for factors in _site_factor_lists(tape, outputs, sites, columns) for f in factors]


def _column_chunk(sites, count: int) -> int:
    """Columns of S back-propagated together: all of them unless the cut cotangents of
    one example would exceed :data:`COLUMN_ENTRIES_PER_EXAMPLE` (large conv feature maps)."""
    per_column = sum(max(1, site.cut.shape[1:].num_elements() or 1) for site in sites)
    return max(1, min(count, COLUMN_ENTRIES_PER_EXAMPLE // per_column))


def one_backward(kind: str, mc_samples: int) -> bool:
    """Whether a step back-propagates one column of ``S`` (``"ef"``; ``"ggn_mc"`` with one
    draw): its tape is then read once and need not be persistent (a persistent tape cost
    ~8% of the MLP's Monte Carlo step, measured)."""
    return kind == "ef" or (kind == "ggn_mc" and mc_samples == 1)


def _diagonal_step(model, likelihood, variables, kind, mc_samples):
    persistent = not one_backward(kind, mc_samples)

    @shared_unfoldings()  # one unfolding of each conv input for all chunks of columns
    def batch_sums(x, y, weights, seed, kinds):
        """``(sums per weight, NLL, counts)`` of a batch; ``kinds`` gets the factor types."""
        with tf.GradientTape(persistent=persistent) as tape:
            raw, sites = trace(model, x, variables)
        terms = loss_rows(raw, y, weights)
        columns = loss_columns(likelihood, kind, mc_samples, terms, seed)

        def per_site(part):
            factors = _site_factor_lists(tape, raw, sites, part)
            kinds.update(type(f) for site_factors in factors for f in site_factors)
            return factors

        def factors_of(part):
            return [f for site_factors in per_site(part) for f in site_factors]

        def squares(part):
            return per_variable(variables, ((f, f.sum_squares()) for f in factors_of(part)))

        unroll = UNROLL_COLUMN_CHUNKS
        if unroll is None and columns.count * _traced_ops(raw) > LOOPED_COLUMN_OPS:
            chunk, unroll = 1, False
        else:
            chunk = _column_chunk(sites, columns.count)
        if unroll is None:
            unroll = -(-columns.count // chunk) * len(sites) <= UNROLLED_SITE_CHUNKS
        totals = None
        unrolled = columns.count > 1 and (unroll or chunk >= columns.count)
        if DENSE_COLUMN_SUMS and unrolled and all(site.rule is not None for site in sites):
            pairs = dense_column_sums(factors_of, columns)  # None unless Dense and biases
            if pairs is not None:
                totals = per_variable(variables, ((f, [s]) for f, s in pairs))
        if totals is None and not unroll and columns.count > chunk:
            # the columns loop: factors whose squares read summed moments of the cotangents
            # carry those through it (one product with their inputs after the loop)
            moments = moment_fold(per_site, zero_factors(sites, chunk), variables)
            if moments is not None:
                reduce, initial, finish = moments
                totals = finish(fold_column_chunks(reduce, columns, chunk, initial))
        if totals is None:
            zeros = [tf.zeros(v.shape, v.dtype) for v in variables]
            totals = fold_column_chunks(squares, columns, chunk, zeros, unroll=unroll)
        return totals, loss_nll(likelihood, terms), loss_counts(terms)

    @tf.function(reduce_retracing=True, autograph=False)
    def step(x, y, weights, seed):
        kinds = set()  # the factor types met
        whole = batch_sums(x, y, weights, seed, kinds)
        dense = kinds and kinds <= {Outer, Explicit}
        if DENSE_SPLIT < 2 or kind == "ggn" or not dense or tf.config.list_logical_devices("GPU"):
            return whole
        # a Dense chain: its parts side by side (the whole batch's ops are unused, pruned)
        count = tf.shape(tf.nest.flatten(x)[0])[0]
        bounds = [count * i // DENSE_SPLIT for i in range(DENSE_SPLIT + 1)]
        seeds = tf.random.experimental.stateless_split(seed, DENSE_SPLIT)
        parts = []
        for i, part in enumerate(zip(bounds[:-1], bounds[1:], strict=True)):
            x_i, y_i = tf.nest.map_structure(lambda t, part=part: t[part[0] : part[1]], (x, y))
            weights_i = None if weights is None else weights[part[0] : part[1]]
            parts.append(batch_sums(x_i, y_i, weights_i, seeds[i], set()))
        summed = [tf.nest.map_structure(sum_in_order, *t) for t in zip(*parts, strict=True)]
        totals, nll, counts = summed
        return totals, nll, tf.concat([counts[:2], parts[0][2][2:]], 0)

    return step


def _covariance_step(model, variables):
    index = {id(v): i for i, v in enumerate(variables)}

    @tf.function(reduce_retracing=True, autograph=False)
    def step(x, weights):
        with tf.GradientTape(persistent=True) as tape:
            raw, sites = trace(model, x, variables)
            outputs = _loss_outputs(raw)

        def gram(columns):
            covariance = 0.0
            for factor in _site_factors(tape, raw, sites, columns):
                factor_weights = [weights[index[id(v)]] for v in factor.variables]
                covariance += tf.cast(factor.weighted_gram(factor_weights), outputs.dtype)
            return covariance

        return outputs, output_blocks(gram, outputs)

    return step
