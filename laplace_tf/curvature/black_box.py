"""The exact Hessian diagonal of a model that is not piecewise linear: Hessian-vector
products through :func:`~laplace_tf.curvature.hessian.hessian_diagonal`, streamed over
the data (``kind="hessian"``; piecewise-linear models take the GGN, which equals it)."""

from __future__ import annotations

import contextlib
import logging
import warnings

import keras

from laplace_tf.curvature import loss_terms
from laplace_tf.curvature.basics import CurvatureFit, _checked_batches
from laplace_tf.curvature.hessian import hessian_diagonal

#: Above this many parameters, ``kind="hessian"`` on a non-piecewise-linear model warns.
HESSIAN_WARN_PARAMS = 20_000


def _batch_loss(model, likelihood):
    """One batch's NLL; one function per model and likelihood, so that the compiled
    Hessian-vector products of :func:`hessian_diagonal` are reused across fits."""

    def batch_loss(batch):
        x, y, weights = batch
        terms = loss_terms.loss_rows(model(x, training=False), y, weights)
        return loss_terms.nll(likelihood, terms)

    return batch_loss


def _black_box_hessian(model, data, likelihood, variables, batch_size, batch_loss, progress=None):
    """``batch_loss`` is :func:`_batch_loss` of the model (cached by the caller, so that
    the compiled Hessian-vector products are reused across fits)."""
    size = sum(v.shape.num_elements() for v in variables)
    if size > HESSIAN_WARN_PARAMS:
        warnings.warn(
            f"kind='hessian' on a model that is not piecewise linear needs one Hessian-vector "
            f"product per parameter ({size}) and batch; this can be very slow. Consider "
            f"kind='ggn'.",
            stacklevel=3,
        )

    totals = {"nll": 0.0}
    tally = loss_terms.Tally()

    def streamed():
        """The batches, one at a time (never the whole dataset), tallying NLL and counts."""
        for x, y, weights in _checked_batches(model, likelihood, data, batch_size):
            terms = loss_terms.loss_rows(model(x, training=False), y, weights)
            totals["nll"] += float(loss_terms.nll(likelihood, terms))
            tally.add(loss_terms.counts(terms))
            if progress is not None:
                progress(tally.examples)
            yield x, y, weights

    try:
        with _quiet_tensorflow_logger():  # pfor logs pages of graph dumps before it fails
            diagonal = hessian_diagonal(batch_loss, variables, data=streamed())
    except ValueError as error:
        if "vectorizing the jacobian" not in str(error):
            raise
        loops = [
            f"{layer.name!r} ({type(layer).__name__})"
            for layer in model._flatten_layers(include_self=False, recursive=True)
            if isinstance(layer, keras.layers.RNN | keras.layers.Bidirectional)
        ]
        where = ", ".join(loops) if loops else "a layer with a loop (e.g. a recurrent layer)"
        raise ValueError(
            f"kind='hessian' cannot differentiate this model twice: TensorFlow cannot "
            f"vectorise the second derivative through {where}. Use kind='ggn' (exact "
            f"Gauss-Newton), 'ggn_mc' or 'ef', which need first derivatives only."
        ) from error
    return CurvatureFit(diagonal, totals["nll"], tally.n_data, tally.width, tally.n_rows)


@contextlib.contextmanager
def _quiet_tensorflow_logger():
    logger = logging.getLogger("tensorflow")
    level = logger.level
    logger.setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        logger.setLevel(level)
