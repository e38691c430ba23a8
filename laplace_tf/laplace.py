"""``DiagonalLaplace``: :class:`~laplace_tf.Laplace` with the diagonal structure.

Posterior ``N(theta_MAP, diag(1 / (h / T + delta)))`` with ``h`` the diagonal curvature
of the summed negative log-likelihood, ``T`` the temperature and ``delta`` the prior
precision; see :class:`~laplace_tf.Laplace` for everything it offers.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, ClassVar

import keras

from laplace_tf.likelihoods import Likelihood
from laplace_tf.posterior import Laplace


class DiagonalLaplace(Laplace):
    """Diagonal Laplace approximation of the posterior over a trained Keras model.

    ``DiagonalLaplace(model, likelihood, ...)`` is ``Laplace(model, likelihood,
    structure="diag", ...)``, with the same arguments otherwise (see
    :class:`~laplace_tf.Laplace`); :meth:`load` refuses files of another structure.

    Examples
    --------
    >>> la = DiagonalLaplace(model, "classification").fit((x_train, y_train))  # doctest: +SKIP
    >>> la.optimize_prior_precision()                                          # doctest: +SKIP
    >>> probs = la.predict(x_test)                                              # doctest: +SKIP
    """

    fixed_structure: ClassVar[str | None] = "diag"

    def __init__(
        self,
        model: keras.Model,
        likelihood: str | Likelihood = "classification",
        *,
        curvature: str = "ggn",
        subset: str | Sequence[str] = "all",
        prior_precision: Any = 1.0,
        prior_mean: Any = 0.0,
        sigma_noise: float | None = None,
        temperature: float = 1.0,
        output: str | int | None = None,
    ):
        super().__init__(
            model,
            likelihood,
            structure="diag",
            subset=subset,
            curvature=curvature,
            prior_precision=prior_precision,
            prior_mean=prior_mean,
            sigma_noise=sigma_noise,
            temperature=temperature,
            output=output,
        )

    @property
    def _fit(self) -> dict[str, Any] | None:
        """The fitted state in the layout of laplace_tf 0.1 (``None`` before ``fit``)."""
        record = self._record
        if record is None:
            return None
        return {
            "curvature": list(record.structure.curvature),
            "loss": record.loss,
            "n_data": record.n_data,
            "n_outputs": record.n_outputs,
            "mean": list(record.mean),
        }
