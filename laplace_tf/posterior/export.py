"""The calibrated GLM predictive of a fitted :class:`~laplace_tf.Laplace` as a servable module.

:class:`PredictiveModel` is a ``tf.Module`` whose ``serve`` function maps a batch of
inputs to the linearised (GLM) predictive: class probabilities ``[N, C]``
(classification), ``[N, 1]`` (binary), or ``mean`` and ``variance`` ``[N, D]``
(regression). It is the computation of :meth:`~laplace_tf.Laplace.predict` in one graph:
the structure's compiled covariance step (``x -> f(x), J_n Sigma J_n^T``, from the layer
rules) followed by the likelihood's link (probit / bridge). The posterior enters as
non-trainable variables computed once at construction (diagonal: the variances; kron:
each block's eigenbases and inverse eigenvalues; full: the Cholesky factor of the
precision), the network as the model's own variables, so a SavedModel written by
:meth:`PredictiveModel.export` is self-contained: ``tf.saved_model.load`` in a process
with TensorFlow alone (no ``laplace_tf``, no Keras model code) serves it.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any

import tensorflow as tf

from laplace_tf._checks import positive_int, unwrap_variable
from laplace_tf.curvature.structured import PREDICT_ENTRIES, _trace_summary

if TYPE_CHECKING:
    from laplace_tf.posterior.core import Laplace

#: Link approximations an exported predictive supports (deterministic ones).
EXPORT_LINKS = ("probit", "bridge")


class PredictiveModel(tf.Module):
    """The GLM predictive of a fitted Laplace posterior as a ``tf.Module``.

    Built by :meth:`laplace_tf.Laplace.predictive_model`. Call it (or its ``serve``
    function) on a batch of inputs of any size; :meth:`export` writes a SavedModel with
    a ``serving_default`` signature (also named ``serve``).

    Parameters
    ----------
    la : Laplace
        A fitted posterior; its current prior precision, noise and temperature are used.
    pred_type : "glm"
        The linearised predictive (the sampled ``"nn"`` one is not exported).
    link_approx : {"probit", "bridge"}
        The link approximation (``"mc"`` is not exported: serving is deterministic).
    include_noise : bool
        Regression: add ``sigma_noise**2`` to the variance (as in ``predict``).
    input_signature : tf.TensorSpec, optional
        The input of ``serve``. Default: the model's single input with batch size
        ``None``; required for a subclassed model (whose inputs are unknown).
    chunk_size : int, optional
        Most examples the covariance step processes at once (larger batches are looped
        over in the graph, so memory stays bounded whatever the request size). Default:
        from :data:`~laplace_tf.curvature.structured.PREDICT_ENTRIES`, as in ``predict``.

    Notes
    -----
    The module reads the model's variables (it tracks them, as Keras' own
    ``model.export`` does): the in-memory object follows later changes of the model's
    weights, while the posterior is fixed at construction; a written SavedModel holds
    the values at :meth:`export` time. The model is never modified.
    """

    def __init__(
        self,
        la: Laplace,
        *,
        pred_type: str = "glm",
        link_approx: str = "probit",
        include_noise: bool = True,
        input_signature: tf.TensorSpec | None = None,
        chunk_size: int | None = None,
    ):
        super().__init__(name="laplace_predictive")
        record = la.record
        if pred_type != "glm":
            raise ValueError(
                f"pred_type={pred_type!r} cannot be exported: only the GLM predictive "
                "(pred_type='glm') is a deterministic function of the inputs."
            )
        if link_approx not in EXPORT_LINKS:
            raise ValueError(
                f"link_approx={link_approx!r} cannot be exported; use one of "
                f"{', '.join(EXPORT_LINKS)} (serving is deterministic, a sampled link is not)."
            )
        likelihood = la.likelihood_object
        self._likelihood = likelihood
        self._link_approx = link_approx
        self._sigma_noise = la.sigma_noise if include_noise and likelihood.noise_exponent else None
        model = la.network
        step, tensors = record.structure.glm_step(
            model, la.variables, la._prior.per_weight(), la._scaling(None)
        )
        self._setattr_tracking = False  # the step is part of `serve`, not a saved function
        self._step = step
        self._setattr_tracking = True
        self.network_variables = [unwrap_variable(v) for v in model.variables]
        self.posterior = tf.nest.map_structure(
            lambda t: tf.Variable(t, trainable=False, name="posterior"), tensors
        )
        spec = _input_spec(model) if input_signature is None else input_signature
        if chunk_size is None:
            example = tf.zeros([1, *spec.shape[1:]], spec.dtype)
            summary = _trace_summary(model, la.variables, example)
            # "full" holds a dense Jacobian row per output column, as predict_chunks counts
            rows = sum(v.shape.num_elements() for v in la.variables)
            rows = rows if record.structure.name == "full" else 0
            entries = summary.entries_per_example + summary.width * rows
            chunk_size = max(1, PREDICT_ENTRIES // entries)
        self.chunk_size = positive_int("chunk_size", chunk_size)
        self._dtype = spec.dtype
        self.serve = tf.function(self._serve, input_signature=[spec], autograph=False)

    def __call__(self, x: Any) -> dict[str, tf.Tensor]:
        """The predictive at ``x`` (cast to the input dtype): ``{"probabilities"}`` or
        ``{"mean", "variance"}``."""
        return self.serve(tf.cast(x, self._dtype))

    def _serve(self, x: tf.Tensor) -> dict[str, tf.Tensor]:
        mean, covariance = self._moments(x)
        width, lead = mean.shape[-1], tf.shape(mean)[:-1]  # [N] or [N, *positions]
        outputs = self._likelihood.glm_predictive(
            tf.reshape(mean, [-1, width]),
            tf.reshape(covariance, [-1, width, width]),
            link_approx=self._link_approx,
            n_samples=1,
            seed=None,
            sigma_noise=self._sigma_noise,
        )
        positions = mean.shape[1:-1]

        def unfold(rows: tf.Tensor) -> tf.Tensor:
            unfolded = tf.reshape(rows, tf.concat([lead, tf.shape(rows)[1:]], axis=0))
            return tf.ensure_shape(unfolded, [None, *positions, *rows.shape[1:]])

        outputs = tf.nest.map_structure(unfold, outputs)
        if isinstance(outputs, tuple):
            return {"mean": outputs[0], "variance": outputs[1]}
        return {"probabilities": outputs}

    def _moments(self, x: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
        """``f(x)`` and ``J Sigma J^T``, ``chunk_size`` examples at a time (the link reads
        them as rows, so outputs with positions ``[N, ..., C]`` are served per position)."""
        tensors = tf.nest.map_structure(tf.convert_to_tensor, self.posterior)
        count = tf.shape(x)[0]
        chunk = tf.constant(self.chunk_size, count.dtype)
        chunks = (count + chunk - 1) // chunk
        head_mean, head_cov = self._step(x[:chunk], tensors)
        means = tf.TensorArray(head_mean.dtype, size=tf.maximum(chunks, 1), infer_shape=False)
        covs = tf.TensorArray(head_cov.dtype, size=tf.maximum(chunks, 1), infer_shape=False)

        def body(index, means, covs):
            start = index * chunk
            mean, cov = self._step(x[start : start + chunk], tensors)
            return index + 1, means.write(index, mean), covs.write(index, cov)

        _, means, covs = tf.while_loop(
            lambda index, *_: index < chunks,
            body,
            (tf.constant(1, count.dtype), means.write(0, head_mean), covs.write(0, head_cov)),
        )
        mean = tf.ensure_shape(means.concat(), [None, *head_mean.shape[1:]])
        return mean, tf.ensure_shape(covs.concat(), [None, *head_cov.shape[1:]])

    def export(self, path: str | os.PathLike) -> None:
        """Write a SavedModel to ``path`` with the ``serving_default`` (and ``serve``)
        signature: ``tf.saved_model.load(path).signatures["serving_default"](x)`` returns
        the dict of :meth:`__call__`; TensorFlow Serving serves it as is."""
        function = self.serve.get_concrete_function()
        tf.saved_model.save(
            self, os.fspath(path), signatures={"serving_default": function, "serve": function}
        )


def _input_spec(model) -> tf.TensorSpec:
    """The model's single input as a ``TensorSpec`` with a free batch dimension."""
    try:
        inputs = list(model.inputs)
    except (AttributeError, ValueError):
        inputs = []
    if len(inputs) != 1:
        raise ValueError(
            "the model's input is unknown (a subclassed model) or not a single tensor: pass "
            "input_signature=tf.TensorSpec([None, ...], dtype)."
        )
    (tensor,) = inputs
    return tf.TensorSpec([None, *tensor.shape[1:]], tensor.dtype, name="inputs")
