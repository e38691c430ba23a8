"""``DiagonalLaplace``: a diagonal Gaussian posterior over a trained model's weights.

Posterior ``N(theta_MAP, diag(1 / (h / T + delta)))`` with ``h`` the diagonal curvature
of the summed negative log-likelihood, ``T`` the temperature and ``delta`` the prior
precision. Definitions follow Laplace Redux (Daxberger et al., 2021) and laplace-torch,
so numbers agree on identical weights, data and curvature.
"""

from __future__ import annotations

import math
import os
import warnings
from collections.abc import Callable, Sequence
from typing import Any

import keras
import tensorflow as tf
import tensorflow_probability as tfp

from laplace_tf import predictive, tuning
from laplace_tf._checks import positive_float, positive_int, resolve_seed, unwrap_variable
from laplace_tf._data import DEFAULT_BATCH_SIZE
from laplace_tf._validation import check_output_activation, checked_inputs
from laplace_tf.curvature.structured import KINDS, fit_diagonal, glm_moments
from laplace_tf.likelihoods import LIKELIHOODS, get_likelihood
from laplace_tf.prior import PRIOR_STRUCTURES, PriorPrecision
from laplace_tf.selection import prior_mean_list, select_groups

tfd = tfp.distributions

PRED_TYPES = ("glm", "nn")


class DiagonalLaplace:
    """Diagonal Laplace approximation of the posterior over a trained Keras model.

    Parameters
    ----------
    model : keras.Model
        A trained, built model with one output ``[N, C]`` (logits, one logit for
        ``"binary"``, or the mean for ``"regression"``). It is never modified. A model
        whose last layer applies softmax (sigmoid for ``"binary"``) is refused: the
        likelihoods apply the link themselves and need the logits.
    likelihood : {"classification", "binary", "regression"}
    curvature : {"ggn", "ggn_mc", "ef", "hessian"}
        Curvature kind, see :func:`laplace_tf.curvature.diagonal`.
    subset : "all", "last_layer" or list of str
        Weights that get a posterior: all trainable weights, those of the last layer
        that has weights (in the order of ``model._flatten_layers``; for a model with
        branches, name the layer instead), or those of the named layers (a named
        nested model contributes all its weights as one group; naming it and a layer
        inside it is refused). The others stay at their trained values.
    prior_precision : float, list of float, or list of arrays
        ``delta``: a scalar, one value per selected layer, or one array per selected
        weight (shaped like it). Must be positive.
    prior_mean : float or list of arrays
        Mean of the Gaussian prior (used in the marginal likelihood).
    sigma_noise : float
        Observation noise of the ``"regression"`` likelihood.
    temperature : float
        ``T``; the curvature and the log-likelihood are divided by it.

    Examples
    --------
    >>> la = DiagonalLaplace(model, "classification").fit((x_train, y_train))  # doctest: +SKIP
    >>> la.optimize_prior_precision()                                          # doctest: +SKIP
    >>> probs = la.predict(x_test)                                              # doctest: +SKIP
    """

    def __init__(
        self,
        model: keras.Model,
        likelihood: str = "classification",
        *,
        curvature: str = "ggn",
        subset: str | Sequence[str] = "all",
        prior_precision: Any = 1.0,
        prior_mean: Any = 0.0,
        sigma_noise: float = 1.0,
        temperature: float = 1.0,
    ):
        if not isinstance(model, keras.Model):
            raise TypeError(f"model must be a keras.Model, got {type(model).__name__}.")
        if not model.built:
            raise ValueError("model is not built: call it on data (or build it) first.")
        if likelihood not in LIKELIHOODS:
            raise ValueError(
                f"Unknown likelihood {likelihood!r}; valid names are {', '.join(LIKELIHOODS)}."
            )
        if curvature not in KINDS:
            raise ValueError(
                f"Unknown curvature {curvature!r}; valid kinds are {', '.join(KINDS)}."
            )
        check_output_activation(model, get_likelihood(likelihood))
        self.model = model
        self.likelihood = likelihood
        self.curvature = curvature
        self.subset = subset
        self._groups = select_groups(model, subset)
        self.variables = [v for group in self._groups for v in group]
        self.sigma_noise = sigma_noise
        self.temperature = positive_float("temperature", temperature)
        self._prior = PriorPrecision.from_value(prior_precision, self._groups)
        self.prior_mean = prior_mean_list(prior_mean, self.variables)
        self._fit: dict[str, Any] | None = None
        self._nn_forward = None

    # -- configuration ---------------------------------------------------------------------

    @property
    def sigma_noise(self) -> float:
        """Observation noise of the regression likelihood."""
        return self._sigma_noise

    @sigma_noise.setter
    def sigma_noise(self, value: float) -> None:
        self._sigma_noise = positive_float("sigma_noise", value)

    @property
    def prior_precision(self) -> float | list:
        """The prior precision: a float (scalar), a list of floats (layerwise) or arrays."""
        return self._prior.value

    @prior_precision.setter
    def prior_precision(self, value: Any) -> None:
        self._prior = PriorPrecision.from_value(value, self._groups)

    # -- fitting ---------------------------------------------------------------------------

    def fit(
        self,
        data: Any,
        *,
        progress: Callable[[int], None] | None = None,
        batch_size: int = DEFAULT_BATCH_SIZE,
        seed: int | None = None,
    ) -> DiagonalLaplace:
        """Compute the curvature over ``data`` (one pass) and the MAP log-likelihood.

        ``data`` is a ``tf.data.Dataset`` of ``(x, y)`` batches or an ``(x, y)`` tuple of
        arrays (batched by ``batch_size``). ``progress(n)``, if given, is called after
        each batch with the number of examples processed. For regression the curvature
        is stored at unit noise and rescaled by ``sigma_noise``, so the noise can be
        tuned later. ``seed`` fixes the pseudo-labels of ``curvature="ggn_mc"`` (same
        seed, same fit; ``None`` draws a fresh one). Returns ``self``. A failure leaves
        both the model and any previous fit untouched.

        Every batch is checked before use: NaN / Inf in inputs or targets, labels that
        are not integers in ``[0, C)`` (classification) or not 0 / 1 (binary), and
        targets whose shape does not match the outputs raise ``ValueError`` naming the
        batch and the example's index in the data. With ``curvature="hessian"`` on a
        non-convex loss, negative diagonal entries are set to 0 with a warning (the
        posterior precision never drops below the prior's). A model built under a
        ``tf.distribute`` strategy is fitted across its replicas.
        """
        fitted = fit_diagonal(
            self.model,
            data,
            likelihood=get_likelihood(self.likelihood, sigma_noise=1.0),
            kind=self.curvature,
            params=self.variables,
            batch_size=batch_size,
            progress=progress,
            seed=seed,
        )
        curvature = fitted.diagonal
        if self.curvature == "hessian":
            curvature = _clip_negative(curvature)
        loss = fitted.nll
        if self.likelihood == "regression":  # keep half the squared error: nll at unit noise
            loss -= fitted.n_data * fitted.n_outputs * math.log(2 * math.pi) / 2
        self._fit = {
            "curvature": list(curvature),
            "loss": loss,
            "n_data": fitted.n_data,
            "n_outputs": fitted.n_outputs,
            "mean": [tf.identity(unwrap_variable(v)) for v in self.variables],
        }
        return self

    def _sigma(self, sigma_noise: Any) -> Any:
        if sigma_noise is None:
            return self.sigma_noise
        if isinstance(sigma_noise, tf.Tensor | tf.Variable):
            return sigma_noise
        return positive_float("sigma_noise", sigma_noise)

    def _fitted(self) -> dict[str, Any]:
        if self._fit is None:
            raise RuntimeError("This DiagonalLaplace is not fitted yet: call fit(data) first.")
        return self._fit

    @property
    def n_data(self) -> int:
        """Number of training examples seen by ``fit``."""
        return self._fitted()["n_data"]

    @property
    def mean(self) -> list[tf.Tensor]:
        """The MAP weights (posterior mean) captured by ``fit``."""
        return list(self._fitted()["mean"])

    def curvature_diagonal(self, sigma_noise: Any = None) -> list[tf.Tensor]:
        """The curvature ``h`` of the summed NLL at ``sigma_noise`` (before temperature)."""
        return self._curvature(sigma_noise, None)

    def _curvature(self, sigma_noise: Any, dtype: tf.DType | None) -> list[tf.Tensor]:
        """:meth:`curvature_diagonal`, cast to ``dtype`` (if given) before the rescaling."""
        curvature = self._fitted()["curvature"]
        if dtype is not None:
            curvature = [tf.cast(h, dtype) for h in curvature]
        if self.likelihood != "regression":
            return list(curvature)
        sigma = self._sigma(sigma_noise)
        power = 4 if self.curvature == "ef" else 2
        return [h / _as_dtype(sigma, h.dtype) ** power for h in curvature]

    # -- posterior -------------------------------------------------------------------------

    @property
    def posterior_precision(self) -> list[tf.Tensor]:
        """``h / T + delta``, shaped like the selected weights."""
        return self._posterior_precision(self._prior.per_weight(), None)

    def _posterior_precision(self, prior: list[tf.Tensor], sigma_noise: Any) -> list[tf.Tensor]:
        return [
            h / self.temperature + tf.cast(p, h.dtype)
            for h, p in zip(self.curvature_diagonal(sigma_noise), prior, strict=True)
        ]

    @property
    def posterior_variance(self) -> list[tf.Tensor]:
        """``1 / posterior_precision``."""
        return [1.0 / p for p in self.posterior_precision]

    @property
    def posterior_stddev(self) -> list[tf.Tensor]:
        """``1 / sqrt(posterior_precision)``."""
        return [tf.math.rsqrt(p) for p in self.posterior_precision]

    @property
    def posterior(self) -> tfd.Distribution:
        """The posterior as a TFP joint distribution over the selected weights (a list)."""
        parts = [
            tfd.Independent(tfd.Normal(m, s), reinterpreted_batch_ndims=len(m.shape))
            for m, s in zip(self.mean, self.posterior_stddev, strict=True)
        ]
        return tfd.JointDistributionSequential(parts)

    def sample(self, n: int, *, seed: int | None = None) -> list[tf.Tensor]:
        """``n`` posterior draws: a list of ``[n, *shape]`` tensors. Same seed, same draws."""
        positive_int("n", n)
        seed = resolve_seed(seed)
        draws = []
        for index, (m, s) in enumerate(zip(self.mean, self.posterior_stddev, strict=True)):
            noise = tf.random.stateless_normal([n, *m.shape], seed=[seed, index], dtype=m.dtype)
            draws.append(m + s * noise)
        return draws

    # -- marginal likelihood ---------------------------------------------------------------

    def log_likelihood(self, sigma_noise: Any = None) -> tf.Tensor:
        """Log-likelihood of the training data at the MAP, divided by the temperature."""
        fit = self._fitted()
        loss = tf.constant(fit["loss"], tf.float64)
        if self.likelihood != "regression":
            return -loss / self.temperature
        sigma = _as_dtype(self._sigma(sigma_noise), tf.float64)
        count = fit["n_data"] * fit["n_outputs"]
        return -loss / (sigma**2 * self.temperature) - count * tf.math.log(
            sigma * math.sqrt(2 * math.pi)
        )

    def log_marginal_likelihood(self, prior_precision: Any = None, sigma_noise: Any = None):
        """Laplace estimate of ``log p(D)``, differentiable in both arguments.

        ``log p(D | theta) - 1/2 [sum log(h/T + delta) - sum log delta
        + sum delta (theta - mu_0)^2]`` over the selected weights (the other weights
        are held fixed). Arguments default to the current values; tensors (e.g.
        variables being optimised) are accepted.
        """
        fit = self._fitted()
        prior = (
            self._prior.per_weight()
            if prior_precision is None
            else PriorPrecision.expand(prior_precision, self._groups)
        )
        # In float64 throughout, also for float32 curvature: the objective the prior
        # tuning differentiates must be smooth well below float32 resolution.
        curvature = self._curvature(sigma_noise, tf.float64)
        total = self.log_likelihood(sigma_noise)
        for p, h, theta, mu in zip(prior, curvature, fit["mean"], self.prior_mean, strict=True):
            p = tf.broadcast_to(tf.cast(p, tf.float64), h.shape)
            post = h / self.temperature + p
            scatter = tf.reduce_sum(p * tf.square(tf.cast(theta - mu, tf.float64)))
            log_det_ratio = tf.reduce_sum(tf.math.log(post)) - tf.reduce_sum(tf.math.log(p))
            total -= 0.5 * (log_det_ratio + scatter)
        return total

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
    ) -> DiagonalLaplace:
        """Tune the prior precision; returns ``self``.

        ``method="marglik"`` maximises :meth:`log_marginal_likelihood` over the log prior
        precision with the given ``prior_structure`` ("scalar", "layerwise", "diag")
        by L-BFGS-B (and over ``sigma_noise`` for regression if
        ``optimize_sigma_noise``), on the log evidence per example in float64; a
        ``RuntimeWarning`` says when it stops away from a stationary point.
        ``method="gridsearch"`` picks, from ``grid`` (default ``logspace(-4, 4, 21)``)
        of scalar values, the one that minimises
        ``metric(predictions, y)`` on ``val_data = (x, y)`` (default: the NLL of the
        predictive). Sampled predictives (``pred_type="nn"``, ``link_approx="mc"``) use
        the same ``seed`` for every grid value, so the values are compared on the same
        draws.
        """
        self._fitted()
        if prior_structure not in PRIOR_STRUCTURES:
            raise ValueError(
                f"Unknown prior_structure {prior_structure!r}; "
                f"valid: {', '.join(PRIOR_STRUCTURES)}."
            )
        if method == "marglik":
            if optimize_sigma_noise and self.likelihood != "regression":
                raise ValueError("optimize_sigma_noise applies to the regression likelihood only.")
            tuning.optimize_marglik(self, prior_structure, optimize_sigma_noise)
        elif method == "gridsearch":
            if prior_structure != "scalar":
                raise ValueError("gridsearch tunes a scalar prior precision only.")
            if val_data is None:
                raise ValueError("gridsearch needs val_data=(x_val, y_val).")
            tuning.gridsearch(
                self, val_data, grid, metric, pred_type, link_approx, resolve_seed(seed)
            )
        else:
            raise ValueError(f"Unknown method {method!r}; valid methods are marglik, gridsearch.")
        return self

    # -- persistence -----------------------------------------------------------------------

    def save(self, path: str | os.PathLike) -> None:
        """Write the fitted posterior to ``path`` (one ``.npz`` file, replaced atomically).

        The model is not included: save it with ``model.save``. See
        :mod:`laplace_tf.serialization` for the format.
        """
        from laplace_tf import serialization

        serialization.save(self, path)

    @classmethod
    def load(cls, path: str | os.PathLike, model: keras.Model) -> DiagonalLaplace:
        """Read a posterior written by :meth:`save` and attach it to ``model``.

        ``model`` must have the architecture and weights it was fitted on; it is not
        modified.
        """
        from laplace_tf import serialization

        return serialization.load(path, model)

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
        covariance ``J diag(posterior_variance) J^T`` per example (from the layer rules,
        never a ``[N, C, P]`` Jacobian) and ``link_approx`` ("probit", "bridge" or "mc")
        maps them to probabilities. ``pred_type="nn"`` averages the real network over
        ``n_samples`` weight draws.
        """
        self._fitted()
        _check_choice("pred_type", pred_type, PRED_TYPES)
        _check_choice("link_approx", link_approx, predictive.LINK_APPROXIMATIONS)
        if pred_type == "nn":
            samples = self.predictive_samples(
                x, n_samples, pred_type="nn", seed=seed, batch_size=batch_size
            )
            if self.likelihood != "regression":
                return tf.reduce_mean(samples, axis=0)
            mean = tf.reduce_mean(samples, axis=0)
            variance = tf.math.reduce_variance(samples, axis=0)
            return mean, variance + (self.sigma_noise**2 if include_noise else 0.0)
        mean, covariance = self._glm(x, batch_size)
        if self.likelihood == "regression":
            variance = tf.linalg.diag_part(covariance)
            return mean, variance + (self.sigma_noise**2 if include_noise else 0.0)
        binary = self.likelihood == "binary"
        if link_approx == "probit":
            return predictive.probit(mean, covariance, binary=binary)
        if link_approx == "bridge":
            if binary:
                raise ValueError(
                    "link_approx='bridge' needs two or more classes; use probit or mc."
                )
            return predictive.bridge(mean, covariance)
        return predictive.monte_carlo(
            mean,
            covariance,
            n_samples=positive_int("n_samples", n_samples),
            seed=[resolve_seed(seed), 0],
            binary=binary,
        )

    def _glm(self, x: Any, batch_size: int):
        mean, covariance = glm_moments(
            self.model, x, self.posterior_variance, params=self.variables, batch_size=batch_size
        )
        predictive.warn_non_finite_glm(mean, covariance)
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
        self._fitted()
        _check_choice("pred_type", pred_type, PRED_TYPES)
        n_samples = positive_int("n_samples", n_samples)
        seed = resolve_seed(seed)
        if pred_type == "glm":
            mean, covariance = self._glm(x, batch_size)
            jitter = predictive._jitter(covariance) * tf.eye(tf.shape(mean)[-1], dtype=mean.dtype)
            factor = tf.linalg.cholesky(covariance + jitter)
            noise = tf.random.stateless_normal(
                tf.concat([[n_samples], tf.shape(mean)], 0), seed=[seed, 1], dtype=mean.dtype
            )
            outputs = mean[None] + tf.einsum("ncd,snd->snc", factor, noise)
        else:
            outputs = self._sampled_outputs(x, n_samples, seed, batch_size)
        return self._link(outputs)

    def _link(self, outputs: tf.Tensor) -> tf.Tensor:
        if self.likelihood == "classification":
            return tf.nn.softmax(outputs, axis=-1)
        if self.likelihood == "binary":
            return tf.sigmoid(outputs)
        return outputs

    def _sampled_outputs(self, x: Any, n_samples: int, seed: int, batch_size: int) -> tf.Tensor:
        """Network outputs ``[S, N, C]`` at ``S`` weight draws, one draw in memory at a time.

        Draw ``s`` uses the stateless seed ``(seed, s)`` for every batch, so the inputs
        (arrays or a dataset) are read once; the model is evaluated with
        ``stateless_call``, so its own weights are never assigned.
        """
        if self._nn_forward is None:
            self._nn_forward = _sampled_forward(self.model, self.variables)
        mean, stddev = self.mean, self.posterior_stddev
        seeds = [tf.constant([seed, s], tf.int64) for s in range(n_samples)]
        outputs = tf.concat(
            [
                tf.stack([self._nn_forward(mean, stddev, draw, batch) for draw in seeds])
                for batch in checked_inputs(self.model, x, batch_size)
            ],
            axis=1,
        )
        if not bool(tf.reduce_all(tf.math.is_finite(outputs))):
            largest = max(float(tf.reduce_max(s)) for s in stddev)
            predictive.warn_non_finite_draws(outputs, largest)
        return outputs


# -- helpers -------------------------------------------------------------------------------


def _sampled_forward(model: keras.Model, variables: list):
    """``(mean, stddev, seed, x) -> f(x; theta)`` with the selected weights drawn from
    ``N(mean, stddev^2)`` (stateless seed), the others at their current values."""
    selected = {id(v): i for i, v in enumerate(variables)}
    positions = [selected.get(id(v)) for v in model.trainable_variables]

    @tf.function(reduce_retracing=True, autograph=False)
    def forward(mean, stddev, seed, x):
        values = []
        for v, i in zip(model.trainable_variables, positions, strict=True):
            if i is None:
                values.append(unwrap_variable(v))
                continue
            noise_seed = tf.random.experimental.stateless_fold_in(seed, i)
            noise = tf.random.stateless_normal(v.shape, seed=noise_seed, dtype=v.dtype)
            values.append(mean[i] + stddev[i] * noise)
        non_trainable = [unwrap_variable(v) for v in model.non_trainable_variables]
        outputs, _ = model.stateless_call(values, non_trainable, x, training=False)
        return outputs

    return forward


def _clip_negative(curvature: list[tf.Tensor]) -> list[tf.Tensor]:
    """The exact Hessian diagonal of a non-convex loss can be negative; a negative entry
    would make the posterior precision ``h / T + delta`` negative (or tiny) and its
    variance meaningless. Such entries are set to zero, with a warning."""
    negative = sum(int(tf.math.count_nonzero(h < 0)) for h in curvature)
    if not negative:
        return curvature
    lowest = min(float(tf.reduce_min(h)) for h in curvature)
    total = sum(int(tf.size(h)) for h in curvature)
    warnings.warn(
        f"The Hessian diagonal has {negative} negative entries out of {total} (lowest "
        f"{lowest:.3g}): the loss is not convex there. They are set to 0, so those weights "
        f"get their prior precision. Consider curvature='ggn', which is never negative.",
        stacklevel=3,
    )
    return [tf.maximum(h, tf.zeros_like(h)) for h in curvature]


def _as_dtype(value: Any, dtype: tf.DType) -> tf.Tensor:
    """``value`` in ``dtype``; Python floats are converted directly (no float32 rounding)."""
    if isinstance(value, tf.Tensor | tf.Variable):
        return tf.cast(value, dtype)
    return tf.constant(value, dtype)


def _check_choice(name: str, value: str, valid: Sequence[str]) -> None:
    if value not in valid:
        raise ValueError(f"Unknown {name} {value!r}; valid values are {', '.join(valid)}.")
