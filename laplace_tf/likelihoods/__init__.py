"""Likelihoods: every likelihood-specific rule, behind one protocol.

The protocol is :class:`Likelihood` (:mod:`laplace_tf.likelihoods.base`, whose docstring
lists what each method computes and which curvature kind reads it). The built-ins, by
name (:func:`get_likelihood`):

- ``"classification"``: :class:`Classification`, softmax cross-entropy with integer,
  one-hot or soft labels;
- ``"binary"``: :class:`Binary`, one sigmoid output, labels 0 / 1;
- ``"multilabel"``: :class:`Multilabel`, ``C`` independent sigmoid outputs, ``[N, C]``
  0 / 1 targets;
- ``"regression"``: :class:`Regression`, Gaussian with the posterior's ``sigma_noise``;
- ``"heteroscedastic"``: :class:`Heteroscedastic`, Gaussian whose mean and log-variance
  are both model outputs.

A user's likelihood is a :class:`Likelihood` subclass (see ``docs/likelihoods.md``, with a
worked Poisson example), accepted wherever a name is.
"""

from __future__ import annotations

from laplace_tf.likelihoods.base import LIKELIHOODS, REQUIRED, Likelihood, check_protocol
from laplace_tf.likelihoods.categorical import Binary, Classification, Multilabel
from laplace_tf.likelihoods.gaussian import Heteroscedastic, Regression

#: The built-in likelihood classes: an object of one of them is saved by its name.
BUILT_IN = (Classification, Binary, Regression, Multilabel, Heteroscedastic)

_BY_NAME = {cls.name: cls for cls in BUILT_IN}

__all__ = [
    "BUILT_IN",
    "LIKELIHOODS",
    "REQUIRED",
    "Binary",
    "Classification",
    "Heteroscedastic",
    "Likelihood",
    "Multilabel",
    "Regression",
    "check_protocol",
    "get_likelihood",
]


def get_likelihood(likelihood: str | Likelihood, *, sigma_noise: float = 1.0) -> Likelihood:
    """Return the likelihood object for a name in :data:`LIKELIHOODS` (or pass one through).

    ``sigma_noise`` is the observation noise of ``"regression"``; the other built-ins have
    none (``"heteroscedastic"`` predicts its own).
    """
    if isinstance(likelihood, Likelihood):
        return likelihood
    if likelihood == "regression":
        return Regression(sigma_noise)
    if isinstance(likelihood, str) and likelihood in _BY_NAME:
        return _BY_NAME[likelihood]()
    raise ValueError(
        f"Unknown likelihood {likelihood!r}; valid names are {', '.join(LIKELIHOODS)}."
    )
