"""The configuration of a :class:`~laplace_tf.Laplace` posterior: every setting, validated
when it is assigned, and what follows from it (the selected weights, the prior, the
likelihood object, the curvature scaling). What ``fit`` produced is kept apart, in the
frozen :class:`~laplace_tf.posterior.record.FitRecord`; the settings it depends on are
:meth:`Configuration.fitted_settings`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import keras
import numpy as np
import tensorflow as tf

from laplace_tf._checks import positive_float
from laplace_tf._validation import check_output_activation
from laplace_tf.curvature.structured import KINDS
from laplace_tf.likelihoods import BUILT_IN, LIKELIHOODS, Likelihood, check_protocol, get_likelihood
from laplace_tf.posterior import evidence
from laplace_tf.posterior.diagonal import Diagonal
from laplace_tf.posterior.full import Full, check_size
from laplace_tf.posterior.kron import Kron
from laplace_tf.posterior.prior import PriorPrecision
from laplace_tf.posterior.structure import Scaling, per_weight_prior_refused
from laplace_tf.selection import prior_mean_list, select_groups

#: The posterior structures, by name.
STRUCTURES = {"diag": Diagonal, "kron": Kron, "full": Full}


class Configuration:
    """The validated settings of a :class:`~laplace_tf.Laplace` (its base class); see
    :class:`~laplace_tf.Laplace` for their meaning. Assigning a setting validates it and
    leaves the object unchanged on error."""

    fixed_structure: str | None = None

    @property
    def model(self) -> keras.Model:
        """The model (read-only: a posterior belongs to the model it is fitted on)."""
        return self._model

    @property
    def network(self) -> keras.Model:
        """The model the posterior is over: :attr:`model` itself, or for a model with several
        outputs a view of it that computes the selected ``output`` (sharing its layers and
        weights)."""
        return self._network

    @property
    def output(self) -> str | int | None:
        """The selected output of a model with several (read-only), or ``None``."""
        return self._output

    @property
    def variables(self) -> list:
        """The selected weights, in order (read-only; set through ``subset``)."""
        return list(self._variables)

    @property
    def likelihood(self) -> str | Likelihood:
        """The likelihood: a built-in name or a :class:`~laplace_tf.likelihoods.Likelihood`."""
        return self._likelihood

    @likelihood.setter
    def likelihood(self, value: str | Likelihood) -> None:
        if isinstance(value, str):
            if value not in LIKELIHOODS:
                raise ValueError(
                    f"Unknown likelihood {value!r}; valid names are {', '.join(LIKELIHOODS)}."
                )
            rules = get_likelihood(value)
        else:
            rules = check_protocol(value, self.curvature)
        check_output_activation(self.network, rules)
        self._likelihood, self._likelihood_object = value, rules

    @property
    def likelihood_object(self) -> Likelihood:
        """The :class:`~laplace_tf.likelihoods.Likelihood` behind :attr:`likelihood` (a
        built-in name resolved to its object)."""
        return self._likelihood_object

    @property
    def likelihood_name(self) -> str:
        """The likelihood's name (``"classification"``, ``"binary"``, ``"regression"``...)."""
        return self._likelihood_object.name or type(self._likelihood_object).__name__

    @property
    def curvature(self) -> str:
        """The curvature kind ``fit`` computes (the likelihood must define what it reads)."""
        return self._curvature_kind

    @curvature.setter
    def curvature(self, value: str) -> None:
        if value not in KINDS:
            raise ValueError(f"Unknown curvature {value!r}; valid kinds are {', '.join(KINDS)}.")
        if self._likelihood_object is not None:
            check_protocol(self._likelihood_object, value)
        self._curvature_kind = value

    @property
    def subset(self) -> str | list[str]:
        """The weight selection; setting it re-reads the prior for the new selection."""
        return self._subset

    @subset.setter
    def subset(self, value: str | Sequence[str]) -> None:
        groups = select_groups(self.network, value)
        variables = [v for group in groups for v in group]
        prior = PriorPrecision.from_value(self._prior_precision_value, groups)
        prior_mean = _finite_prior_mean(self._prior_mean_value, variables)
        if self._structure_cls is not None:
            self._check_structure(self._structure_cls, variables, prior)
        self._subset, self._groups, self._variables = value, groups, variables
        self._prior, self._prior_mean = prior, prior_mean
        self._nn_forward = None

    @property
    def structure(self) -> str:
        """``"diag"``, ``"kron"`` or ``"full"``."""
        return self._structure

    @structure.setter
    def structure(self, value: str) -> None:
        if self.fixed_structure is not None and value != self.fixed_structure:
            raise ValueError(
                f"{type(self).__name__} has structure={self.fixed_structure!r}; use "
                f"laplace_tf.Laplace(..., structure={value!r})."
            )
        structure_cls = STRUCTURES[check_choice("structure", value, tuple(STRUCTURES))]
        self._check_structure(structure_cls, self.variables, self._prior)
        self._structure, self._structure_cls = value, structure_cls

    def _check_structure(self, structure_cls: type, variables: list, prior: PriorPrecision) -> None:
        if structure_cls is Full:
            check_size(variables, self._full_size_limit)
        if prior.structure == "diag" and not structure_cls.per_weight_prior:
            raise per_weight_prior_refused(structure_cls.name)

    @property
    def structure_class(self) -> type:
        """The structure object's class (:class:`Diagonal`, :class:`Kron` or :class:`Full`)."""
        return self._structure_cls

    @property
    def full_size_limit(self) -> int:
        """Most selected weights ``structure="full"`` accepts."""
        return self._full_size_limit

    @property
    def groups(self) -> list[list]:
        """The selected weights grouped by layer (one prior value each when layerwise)."""
        return [list(g) for g in self._groups]

    @property
    def prior(self) -> PriorPrecision:
        """The validated prior precision."""
        return self._prior

    @property
    def sigma_noise(self) -> float:
        """Observation noise (used by likelihoods with ``noise_exponent > 0``); positive."""
        return self._sigma_noise

    @sigma_noise.setter
    def sigma_noise(self, value: float) -> None:
        self._sigma_noise = positive_float("sigma_noise", value)

    @property
    def temperature(self) -> float:
        """``T > 0``: the curvature and the log-likelihood are divided by it."""
        return self._temperature

    @temperature.setter
    def temperature(self, value: float) -> None:
        self._temperature = positive_float("temperature", value)

    @property
    def prior_precision(self) -> float | list:
        """The prior precision: a float (scalar), a list of floats (layerwise) or arrays."""
        return self._prior.value

    @prior_precision.setter
    def prior_precision(self, value: Any) -> None:
        prior = PriorPrecision.from_value(value, self._groups)
        if prior.structure == "diag" and not self._structure_cls.per_weight_prior:
            raise per_weight_prior_refused(self._structure)
        self._prior, self._prior_precision_value = prior, value

    @property
    def prior_mean(self) -> list[tf.Tensor]:
        """The prior mean, one tensor per selected weight (shaped like it)."""
        return [
            tf.broadcast_to(m, v.shape)
            for m, v in zip(self._prior_mean, self.variables, strict=True)
        ]

    @prior_mean.setter
    def prior_mean(self, value: Any) -> None:
        self._prior_mean = _finite_prior_mean(value, self.variables)
        self._prior_mean_value = value

    def fitted_settings(self) -> dict[str, Any]:
        """The settings a fit depends on, as its record keeps them (built-in likelihoods
        by name, other likelihood objects by identity)."""
        return {
            "structure": self.structure,
            "curvature": self.curvature,
            "likelihood": self._likelihood_id(),
            "subset": _frozen_subset(self.subset),
        }

    def _likelihood_id(self) -> Any:
        """Built-in likelihoods compare by name, other objects by identity."""
        if type(self._likelihood_object) in BUILT_IN:
            return self.likelihood_name
        return self.likelihood

    def _scaling(self, sigma_noise: Any) -> Scaling:
        return evidence.scaling(
            self._likelihood_object, self.curvature, self._sigma(sigma_noise), self.temperature
        )

    def _sigma(self, sigma_noise: Any) -> Any:
        if sigma_noise is None:
            return self.sigma_noise
        if isinstance(sigma_noise, tf.Tensor | tf.Variable):
            return sigma_noise
        return positive_float("sigma_noise", sigma_noise)


def _frozen_subset(subset: str | Sequence[str]) -> str | tuple[str, ...]:
    return subset if isinstance(subset, str) else tuple(subset)


def _finite_prior_mean(value: Any, variables: list) -> list[tf.Tensor]:
    means = prior_mean_list(value, variables)
    if not all(bool(np.all(np.isfinite(m.numpy()))) for m in means):
        raise ValueError("prior_mean must be finite.")
    return means


def check_choice(name: str, value: str, valid: Sequence[str]) -> str:
    """``value``, or a ValueError listing the ``valid`` values of ``name``."""
    if value not in valid:
        raise ValueError(f"Unknown {name} {value!r}; valid values are {', '.join(valid)}.")
    return value
