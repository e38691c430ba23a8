"""``Laplace``: a Gaussian posterior over a trained model's weights, in one of three structures.

Posterior ``N(theta_MAP, (H / T + delta)^{-1})`` with ``H`` the curvature (GGN, Fisher,
empirical Fisher or Hessian) of the summed negative log-likelihood over the selected
weights, ``T`` the temperature and ``delta`` the prior precision. The structure of
``H`` is an independent choice: ``"diag"`` (its diagonal), ``"kron"`` (Kronecker factors
per layer, KFLR / KFAC) or ``"full"`` (the exact matrix). Definitions follow Laplace Redux
(Daxberger et al., 2021) and laplace-torch, so numbers agree on identical weights, data
and curvature.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from typing import Any, ClassVar

import keras
import tensorflow as tf
import tensorflow_probability as tfp

from laplace_tf import predictive
from laplace_tf._checks import positive_int, resolve_seed, unwrap_variable
from laplace_tf._data import DEFAULT_BATCH_SIZE
from laplace_tf.likelihoods import Likelihood, check_protocol
from laplace_tf.posterior import evidence, prediction, serialization, tuning
from laplace_tf.posterior.configuration import Configuration
from laplace_tf.posterior.diagonal import Diagonal
from laplace_tf.posterior.export import PredictiveModel
from laplace_tf.posterior.full import DEFAULT_SIZE_LIMIT
from laplace_tf.posterior.outputs import selected_output
from laplace_tf.posterior.penalty import Penalty
from laplace_tf.posterior.prior import PriorPrecision
from laplace_tf.posterior.record import FitRecord

tfd = tfp.distributions


class Laplace(Configuration):
    """Laplace approximation of the posterior over a trained Keras model's weights.

    Parameters
    ----------
    model : keras.Model
        A trained, built model with an output ``[N, C]`` (logits, one logit for
        ``"binary"``, or the mean for ``"regression"``), or ``[N, ..., C]`` with positions
        (per token, per pixel: the loss sums over them, and predictions are per position).
        It is never modified. A model whose last layer applies softmax (sigmoid for
        ``"binary"``) is refused.
    likelihood : {"classification", "binary", "regression"} or Likelihood
        A built-in name, or a :class:`~laplace_tf.likelihoods.Likelihood` object (a
        built-in one or the user's own subclass): it supplies every likelihood-specific
        rule (loss and curvature factors, link and predictive, noise rescaling,
        normalising constant, target checks); an object that lacks what the curvature
        kind needs is refused with a ``TypeError``.
    structure : {"diag", "kron", "full"}
        ``"diag"``: the curvature diagonal. ``"kron"``: ``A (x) B`` per Dense / Conv
        kernel, an exact block per bias, the diagonal for other weights (see
        :mod:`laplace_tf.posterior.kron`). ``"full"``: the exact ``P x P`` matrix; refused
        above ``full_size_limit`` selected weights.
    subset : "all", "last_layer" or list of str
        Weights that get a posterior (see :func:`laplace_tf.selection.select_groups`);
        the others stay at their trained values.
    curvature : {"ggn", "ggn_mc", "ef", "hessian"}
        Curvature kind, see :func:`laplace_tf.curvature.diagonal`. ``"hessian"`` with
        ``"kron"`` needs a piecewise-linear model (where it is the GGN); with ``"full"``
        it is the exact ``P x P`` Hessian.
    prior_precision : float, list of float, or list of arrays
        ``delta``: a scalar, one value per selected layer, or one array per selected
        weight (``"diag"`` and ``"full"`` only). Positive.
    prior_mean : float or list of arrays
        Mean of the Gaussian prior (used in the marginal likelihood). Finite.
    sigma_noise : float, optional
        Observation noise of a likelihood that has one (``"regression"``; any with
        ``noise_exponent > 0``). Default: the likelihood object's own ``sigma_noise`` if it
        has one, else 1. The curvature is fitted at unit noise and rescaled.
    temperature : float
        ``T > 0``; the curvature and the log-likelihood are divided by it.
    full_size_limit : int
        Most selected weights ``structure="full"`` accepts.
    output : str or int, optional
        For a model with several outputs: the one the posterior is over, by output name
        (the name of the layer that produces it) or index. The posterior then covers the
        weights that output depends on (:attr:`network`), and ``fit`` reads targets for
        that output alone. Required when the model has several outputs.

    Notes
    -----
    Changing ``structure``, ``curvature``, ``likelihood`` or ``subset`` after ``fit``
    makes every fitted quantity raise until ``fit`` is called again: the fit is never
    mixed with another configuration.

    Examples
    --------
    >>> la = Laplace(model, "classification", structure="kron")  # doctest: +SKIP
    >>> la.fit((x_train, y_train)).optimize_prior_precision()     # doctest: +SKIP
    >>> probs = la.predict(x_test)                                 # doctest: +SKIP
    """

    #: The structure a subclass fixes (its constructor takes no ``structure``), or None.
    fixed_structure: ClassVar[str | None] = None

    def __init__(
        self,
        model: keras.Model,
        likelihood: str | Likelihood = "classification",
        *,
        structure: str = "diag",
        subset: str | Sequence[str] = "all",
        curvature: str = "ggn",
        prior_precision: Any = 1.0,
        prior_mean: Any = 0.0,
        sigma_noise: float | None = None,
        temperature: float = 1.0,
        full_size_limit: int = DEFAULT_SIZE_LIMIT,
        output: str | int | None = None,
    ):
        if not isinstance(model, keras.Model):
            raise TypeError(f"model must be a keras.Model, got {type(model).__name__}.")
        if not model.built:
            raise ValueError("model is not built: call it on data (or build it) first.")
        self._model = model
        self._output = output
        self._network = selected_output(model, output)
        self._record: FitRecord | None = None
        self._full_size_limit = positive_int("full_size_limit", full_size_limit)
        self._likelihood_object: Likelihood | None = None
        self.curvature = curvature
        self.likelihood = likelihood
        self._prior_precision_value, self._prior_mean_value = prior_precision, prior_mean
        self._structure_cls = None
        self.subset = subset
        self.structure = structure
        if sigma_noise is None:
            sigma_noise = getattr(self._likelihood_object, "sigma_noise", 1.0)
        self.sigma_noise = sigma_noise
        self.temperature = temperature

    # -- fitting ---------------------------------------------------------------------------

    def fit(
        self,
        data: Any,
        *,
        progress: Callable[[int], None] | None = None,
        batch_size: int = DEFAULT_BATCH_SIZE,
        seed: int | None = None,
        accumulate: bool = False,
    ) -> Laplace:
        """Compute the curvature over ``data`` (one pass) and the MAP log-likelihood.

        ``data`` is a ``tf.data.Dataset`` of ``(x, y)`` batches or an ``(x, y)`` tuple of
        arrays (batched by ``batch_size``). ``progress(n)``, if given, is called after
        each batch with the number of examples processed. For regression the curvature
        is stored at unit noise and rescaled by ``sigma_noise``, so the noise can be
        tuned later. ``seed`` fixes the pseudo-labels of ``curvature="ggn_mc"`` (same
        seed, same fit; ``None`` draws a fresh one). Returns ``self``. A failure leaves
        both the model and any previous fit untouched.

        Every batch is checked before use: NaN / Inf in inputs or targets, labels outside
        the likelihood's ``label_range`` (integers in ``[0, C)`` for classification, 0 / 1
        for binary), and targets of a shape the likelihood's ``target_shape_error``
        refuses raise ``ValueError`` naming the
        batch and the example's index in the data. With ``curvature="hessian"`` on a
        non-convex loss, negative diagonal entries (``"full"``: eigenvalues) are set to 0
        with a warning (the posterior precision never drops below the prior's). A model
        built under a ``tf.distribute`` strategy is fitted across its replicas.

        ``accumulate=True`` adds the curvature of ``data`` to the current fit (online
        Laplace, e.g. a new task's data after fine-tuning): the curvatures, NLLs and counts
        add up, the posterior mean becomes the current weights, and the result equals one
        fit on both datasets at the current weights (for ``"kron"``, ``A`` is re-averaged
        over all the examples). It needs a fit of the same configuration to add to.
        """
        previous = None
        if accumulate:
            if self._record is None:
                raise RuntimeError("fit(accumulate=True) needs a previous fit to add to.")
            previous = self.record  # refuses a fit of another configuration
        likelihood = check_protocol(self._likelihood_object, self.curvature).unit_noise()
        fitted, summary = self._structure_cls.fit(
            self.network,
            data,
            likelihood=likelihood,
            kind=self.curvature,
            variables=self.variables,
            batch_size=batch_size,
            progress=progress,
            seed=seed,
        )
        rows = summary.n_data if summary.n_rows is None else summary.n_rows
        loss = evidence.fitted_loss(likelihood, summary.nll, rows * summary.n_outputs)
        n_data = summary.n_data
        if previous is not None:
            if previous.n_outputs != summary.n_outputs:
                raise ValueError(
                    f"fit(accumulate=True): the model now has {summary.n_outputs} outputs, the "
                    f"previous fit {previous.n_outputs}."
                )
            fitted = previous.structure.merged(fitted, previous.n_data, summary.n_data)
            loss += previous.loss
            n_data += previous.n_data
            rows += previous.n_data if previous.n_rows is None else previous.n_rows
        self._record = FitRecord(
            structure=fitted,
            **{k: v for k, v in self.fitted_settings().items() if k != "structure"},
            loss=loss,
            n_data=n_data,
            n_outputs=summary.n_outputs,
            mean=tuple(tf.identity(unwrap_variable(v)) for v in self.variables),
            n_rows=rows,
        )
        return self

    @property
    def is_fitted(self) -> bool:
        """Whether ``fit`` has run (the record may still disagree with the configuration)."""
        return self._record is not None

    @property
    def record(self) -> FitRecord:
        """The fitted state; raises if unfitted or fitted with another configuration."""
        if self._record is None:
            raise RuntimeError(
                f"This {type(self).__name__} is not fitted yet: call fit(data) first."
            )
        changes = self._record.changes(self.fitted_settings())
        if changes:
            raise RuntimeError(
                f"This {type(self).__name__} was fitted with {', '.join(changes)}: call "
                "fit(data) again (or restore the setting) before using it."
            )
        return self._record

    @property
    def n_data(self) -> int:
        """Number of training examples seen by ``fit``."""
        return self.record.n_data

    @property
    def mean(self) -> list[tf.Tensor]:
        """The MAP weights (posterior mean) captured by ``fit``."""
        return list(self.record.mean)

    def curvature_diagonal(self, sigma_noise: Any = None) -> list[tf.Tensor]:
        """The curvature ``h`` of the summed NLL at ``sigma_noise`` (before temperature);
        ``structure="diag"`` only."""
        structure = self.record.structure
        if not isinstance(structure, Diagonal):
            raise ValueError(
                f"curvature_diagonal is defined for structure='diag', not {self.structure!r}."
            )
        return structure.scaled(self._scaling(sigma_noise))

    # -- posterior -------------------------------------------------------------------------

    @property
    def posterior_precision(self) -> Any:
        """``H / T + delta``: per weight (diag), a block-diagonal ``LinearOperator`` over the
        flattened weights (kron) or a ``[P, P]`` matrix (full)."""
        return self.record.structure.precision(self._prior.per_weight(), self._scaling(None))

    @property
    def posterior_variance(self) -> list[tf.Tensor]:
        """Marginal posterior variances, shaped like the selected weights."""
        return self.record.structure.variance(self._prior.per_weight(), self._scaling(None))

    @property
    def posterior_stddev(self) -> list[tf.Tensor]:
        """Marginal posterior standard deviations, shaped like the selected weights."""
        structure = self.record.structure
        if isinstance(structure, Diagonal):
            return structure.stddev(self._prior.per_weight(), self._scaling(None))
        return [tf.sqrt(v) for v in self.posterior_variance]

    @property
    def posterior(self) -> tfd.Distribution:
        """The posterior as a TFP distribution: a joint over the selected weights (a list)
        for ``"diag"``, a multivariate normal over the flattened, concatenated weights
        (row-major, in order) for ``"kron"`` and ``"full"``."""
        return self.record.structure.distribution(
            self.mean, self._prior.per_weight(), self._scaling(None)
        )

    def sample(self, n: int, *, seed: int | None = None) -> list[tf.Tensor]:
        """``n`` posterior draws: a list of ``[n, *shape]`` tensors. Same seed, same draws."""
        positive_int("n", n)
        seed = resolve_seed(seed)
        seeds = [tf.constant([seed, i], tf.int64) for i in range(len(self.variables))]
        return [m + d for m, d in zip(self.mean, self.weight_deviations(seeds, [n]), strict=True)]

    def weight_deviations(self, seeds: Sequence[tf.Tensor], shape: list[int]) -> list[tf.Tensor]:
        """Zero-mean posterior draws ``[*shape, *weight.shape]``, one stateless seed per weight."""
        return self.record.structure.sample(
            seeds, shape, self._prior.per_weight(), self._scaling(None)
        )

    # -- marginal likelihood ---------------------------------------------------------------

    def log_likelihood(self, sigma_noise: Any = None) -> tf.Tensor:
        """Log-likelihood of the training data at the MAP, divided by the temperature
        (see :mod:`laplace_tf.posterior.evidence`)."""
        return evidence.log_likelihood(
            self._likelihood_object, self.record, self._sigma(sigma_noise), self.temperature
        )

    def log_marginal_likelihood(self, prior_precision: Any = None, sigma_noise: Any = None):
        """Laplace estimate of ``log p(D)``, differentiable in both arguments.

        ``log p(D | theta) - 1/2 [log det(H/T + delta) - sum log delta
        + sum delta (theta - mu_0)^2]`` over the selected weights (the other weights
        are held fixed), in float64. Arguments default to the current values; tensors
        (e.g. variables being optimised) are accepted.
        """
        record = self.record
        prior = (
            self._prior.per_weight()
            if prior_precision is None
            else PriorPrecision.expand(prior_precision, self._groups)
        )
        return evidence.log_marginal_likelihood(
            record,
            prior,
            self._prior_mean,
            self._scaling(sigma_noise),
            self.log_likelihood(sigma_noise),
        )

    def optimize_prior_precision(
        self,
        method: str = "marglik",
        *,
        prior_structure: str = "scalar",
        val_data: tuple | None = None,
        grid: Sequence[float] | None = None,
        metric: Callable[[Any, Any], float] | None = None,
        optimize_sigma_noise: bool = False,
        pred_type: str = "glm",
        link_approx: str = "probit",
        seed: int | None = None,
    ) -> Laplace:
        """Tune the prior precision; returns ``self``.

        ``method="marglik"`` maximises :meth:`log_marginal_likelihood` over the log prior
        precision with the given ``prior_structure`` ("scalar", "layerwise", or "diag"
        per weight, which ``structure="kron"`` refuses) by L-BFGS-B (and over
        ``sigma_noise`` for regression if ``optimize_sigma_noise``), on the log evidence
        per example in float64; a ``RuntimeWarning`` says when it stops away from a
        stationary point. ``method="gridsearch"`` picks, from ``grid`` (default
        ``logspace(-4, 4, 21)``) of scalar values, the one that minimises
        ``metric(predictions, y)`` on ``val_data = (x, y)`` (default: the NLL of the
        predictive). Sampled predictives (``pred_type="nn"``, ``link_approx="mc"``) use
        the same ``seed`` for every grid value, so the values are compared on the same
        draws.
        """
        tuning.optimize(
            self,
            method,
            prior_structure=prior_structure,
            val_data=val_data,
            grid=grid,
            metric=metric,
            optimize_sigma_noise=optimize_sigma_noise,
            pred_type=pred_type,
            link_approx=link_approx,
            seed=seed,
        )
        return self

    # -- persistence -----------------------------------------------------------------------

    def save(self, path: str | os.PathLike) -> None:
        """Write the fitted posterior to ``path`` (one ``.npz`` file, replaced atomically).

        The model is not included: save it with ``model.save``. See
        :mod:`laplace_tf.posterior.serialization` for the format.
        """
        serialization.save(self, path)

    @classmethod
    def load(
        cls, path: str | os.PathLike, model: keras.Model, *, structure: str | None = None
    ) -> Laplace:
        """Read a posterior written by :meth:`save` and attach it to ``model``.

        ``model`` must have the architecture and weights it was fitted on; it is not
        modified. The file's structure is used; if ``structure`` is given (or fixed by the
        class, as :class:`~laplace_tf.DiagonalLaplace` fixes ``"diag"``), a file of
        another structure is refused.
        """
        return serialization.load(path, model, cls=cls, structure=structure)

    def restore(self, record: FitRecord) -> None:
        """Install a fitted state read back by loading. It must have been computed with
        this configuration and for weights of these shapes."""
        if len(record.mean) != len(self.variables) or any(
            tuple(m.shape) != tuple(v.shape)
            for m, v in zip(record.mean, self.variables, strict=True)
        ):
            raise ValueError("the fitted state does not match the selected weights' shapes.")
        previous, self._record = self._record, record
        try:
            _ = self.record  # refuses a record of another configuration
        except RuntimeError:
            self._record = previous
            raise

    # -- prediction ------------------------------------------------------------------------

    def predict(
        self,
        x: Any,
        *,
        pred_type: str = "glm",
        link_approx: str = "probit",
        n_samples: int = 100,
        seed: int | None = None,
        include_noise: bool = True,
        batch_size: int = DEFAULT_BATCH_SIZE,
    ):
        """Posterior predictive at inputs ``x``.

        Classification: probabilities ``[N, C]``; binary: ``[N, 1]``; regression:
        ``(mean, variance)``, each ``[N, D]``, where the variance is the functional
        variance plus ``sigma_noise**2`` (``include_noise=False`` gives the functional
        part alone).

        ``pred_type="glm"`` linearises the network at the MAP: outputs are Gaussian with
        covariance ``J Sigma J^T`` per example (from the layer rules in the structure's
        form, never a ``[N, C, P]`` Jacobian for "diag" and "kron") and ``link_approx``
        ("probit", "bridge" or "mc") maps them to probabilities. ``pred_type="nn"``
        averages the real network over ``n_samples`` weight draws.
        """
        return prediction.predict(
            self,
            x,
            pred_type=pred_type,
            link_approx=link_approx,
            n_samples=n_samples,
            seed=seed,
            include_noise=include_noise,
            batch_size=batch_size,
        )

    def _glm(self, x: Any, batch_size: int) -> tuple[tf.Tensor, tf.Tensor]:
        """Outputs ``f(x)`` and the GLM output covariance per example."""
        mean, covariance = self.record.structure.glm_moments(
            self.network,
            x,
            self.variables,
            self._prior.per_weight(),
            self._scaling(None),
            batch_size,
        )
        predictive.warn_non_finite_glm(*prediction.as_rows(mean, covariance))
        return mean, covariance

    def predictive_samples(
        self,
        x: Any,
        n_samples: int,
        *,
        pred_type: str = "nn",
        seed: int | None = None,
        batch_size: int = DEFAULT_BATCH_SIZE,
    ) -> tf.Tensor:
        """``[n_samples, N, C]`` draws of the predictive: probabilities for classification
        and binary, outputs ``f`` for regression (without observation noise).

        ``"nn"`` evaluates the real network at posterior weight draws (functionally: the
        model's own weights are never assigned); ``"glm"`` draws outputs from the
        linearised model's Gaussian. The same ``seed`` gives the same draws; the weight
        draws of ``"nn"`` come from their own random stream, so they match those of
        :meth:`sample` with that seed in distribution, not one for one.
        """
        return prediction.predictive_samples(
            self, x, n_samples, pred_type=pred_type, seed=seed, batch_size=batch_size
        )

    # -- export and continual learning -------------------------------------------------------

    def predictive_model(
        self,
        pred_type: str = "glm",
        link_approx: str = "probit",
        include_noise: bool = True,
        *,
        input_signature: tf.TensorSpec | None = None,
        chunk_size: int | None = None,
    ) -> PredictiveModel:
        """The GLM predictive as a servable ``tf.Module`` (see
        :class:`~laplace_tf.posterior.export.PredictiveModel`): ``module(x)`` equals
        :meth:`predict` (as a dict), and ``module.export(path)`` writes a SavedModel that
        TensorFlow alone loads and serves."""
        return PredictiveModel(
            self,
            pred_type=pred_type,
            link_approx=link_approx,
            include_noise=include_noise,
            input_signature=input_signature,
            chunk_size=chunk_size,
        )

    def penalty(self) -> Penalty:
        """The posterior as a training penalty ``() -> 1/2 (theta - mu)^T Lambda (theta - mu)``
        over the selected weights (see :class:`~laplace_tf.posterior.penalty.Penalty`):
        EWC for ``"diag"``, the Kronecker-factored quadratic for ``"kron"``. Divide it by
        the new task's example count when adding it to a Keras (mean) loss."""
        return Penalty(self)
