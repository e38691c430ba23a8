"""Saving and loading a fitted :class:`~laplace_tf.Laplace` (any structure).

The model itself is not stored: save it with Keras (``model.save("model.keras")``) and
give it back to :func:`load`, which checks that it is the model the posterior was
fitted on.

File format (version 3)
-----------------------
One uncompressed NumPy ``.npz`` archive, written by :func:`numpy.savez` and read with
``allow_pickle=False``. The path is used exactly as given (no ``.npz`` is appended).
With ``k`` the number of selected weights (``la.variables``), it holds:

- the fitted curvature of the structure (at unit noise for regression), as its
  ``state()`` gives it: ``structure="diag"``: ``curvature_0`` ... ``curvature_{k-1}``, the
  diagonal ``h`` shaped like each weight in its dtype; ``"kron"``: per weight ``i`` the
  float64 eigendecomposition of its block, ``block_{i}_inputs_values``,
  ``block_{i}_inputs_basis``, ``block_{i}_outputs_values``, ``block_{i}_outputs_basis``
  (a Kronecker block), ``block_{i}_values``, ``block_{i}_basis`` (a dense block) or
  ``block_{i}_diagonal``; ``"full"``: ``curvature``, the ``P x P`` float64 matrix;
- ``mean_0`` ... ``mean_{k-1}``: the MAP weights captured by ``fit``;
- ``prior_precision_0`` ... (float64, shaped like the weights): only for a per-weight
  ("diag") prior precision;
- ``prior_mean_0`` ...: only when the prior mean is not one constant;
- ``metadata``: a 0-d unicode array holding a JSON object with the keys

  - ``format``: ``"laplace_tf.DiagonalLaplace"`` (the format's name since version 1, for
    every structure); ``version``: ``3`` (a reader refuses a newer version);
    ``library_version``: the laplace_tf version that wrote the file;
  - ``structure`` (``"diag"``, ``"kron"``, ``"full"``) and ``structure_state`` (JSON the
    structure needs besides its arrays: ``{"blocks": [kind, ...]}`` for ``"kron"``);
  - ``likelihood``, ``curvature``, ``subset`` (``"all"``, ``"last_layer"`` or a list of
    layer names), ``temperature``, ``sigma_noise``, ``full_size_limit``: the
    configuration;
  - ``prior_precision``: ``{"structure": "scalar", "value": float}``,
    ``{"structure": "layerwise", "value": [float, ...]}`` or ``{"structure": "diag"}``;
  - ``prior_mean``: ``{"structure": "constant", "value": float}`` or
    ``{"structure": "arrays"}``;
  - ``fit``: ``{"n_data": int or float, "n_outputs": int, "loss": float, "n_rows"?: int or
    float}`` (``n_data`` weighted by the sample weights; ``n_rows``, from 0.3, the weighted
    examples times positions), ``loss`` being the MAP
    NLL as a float64 (for regression half the squared error: the NLL at unit noise
    without its constant);
  - ``weights``: ``[{"name": path, "shape": [int, ...], "dtype": str}, ...]``, the
    selected weights in order (the paths are informative: a reloaded model may name its
    weights differently, so only shapes and dtypes are compared);
  - ``fingerprint``: ``{"architecture": hex, "weights": hex}``, sha256 digests of the
    model (:func:`architecture_fingerprint`, :func:`weights_fingerprint`);
  - ``checksum``: sha256 hex digest over the other arrays in name order.

Versions 1 and 2 hold a diagonal posterior in the same layout without ``structure``,
``structure_state`` and ``full_size_limit``; they are read as ``structure="diag"``. The
architecture fingerprint of version 1 (laplace_tf 0.1) also covered weight paths and
layer names, so it is checked the old way when such a file is read. Version-1 files of
Functional models keep loading; those of Sequential models could never be loaded into a
reloaded model, since Keras renames their weights.

Array digests (``checksum`` and the weights fingerprint) feed, per array, the UTF-8 JSON
``[name, dtype.str, shape]`` (``name`` is ``""`` for model weights) and then the array's
C-order bytes. Together with the zip CRC-32 of every member this detects damage to any
content; bytes that the zip reader ignores (timestamps, local copies of sizes) may change
without effect. Floats are written by Python's ``repr``, which round-trips exactly, so a
loaded posterior gives bitwise the same precisions, predictions, samples and marginal
likelihood as the one saved.
"""

from __future__ import annotations

import hashlib
import json
import os
import secrets
from typing import TYPE_CHECKING, Any

import keras
import numpy as np
import tensorflow as tf

from laplace_tf._version import __version__
from laplace_tf.likelihoods import BUILT_IN, LIKELIHOODS
from laplace_tf.posterior.record import FitRecord

if TYPE_CHECKING:
    from laplace_tf.posterior.core import Laplace

FORMAT = "laplace_tf.DiagonalLaplace"
VERSION = 3
_ZIP_MAGIC = b"PK\x03\x04"


def save(la: Laplace, path: str | os.PathLike) -> None:
    """Write the fitted ``la`` to ``path`` (one ``.npz`` file, replaced atomically).

    The archive is written to a temporary file in the same directory, flushed to disk
    and renamed onto ``path``; on any failure the temporary file is removed and a file
    already at ``path`` is left as it was.

    Raises
    ------
    RuntimeError
        If ``la`` is not fitted.
    TypeError
        If its likelihood is not a built-in one (a name, or an object of a built-in class).
    """
    if not la.is_fitted:
        raise RuntimeError(f"This {type(la).__name__} is not fitted yet: call fit(data) first.")
    if type(la.likelihood_object) not in BUILT_IN:
        raise TypeError(
            f"Only the built-in likelihoods ({', '.join(LIKELIHOODS)}) can be saved; this "
            f"{type(la).__name__} uses {la.likelihood!r}."
        )
    fit = la.record
    arrays, structure_state = fit.structure.state()
    arrays.update({f"mean_{i}": m.numpy() for i, m in enumerate(fit.mean)})
    prior = la.prior
    if prior.structure == "diag":
        arrays.update({f"prior_precision_{i}": np.asarray(p) for i, p in enumerate(prior.values)})
        prior_precision = {"structure": "diag"}
    else:
        prior_precision = {"structure": prior.structure, "value": prior.values}
    prior_mean = [m.numpy() for m in la.prior_mean]
    constant = _constant_value(prior_mean)
    if constant is None:
        arrays.update({f"prior_mean_{i}": m for i, m in enumerate(prior_mean)})
        prior_mean_entry = {"structure": "arrays"}
    else:
        prior_mean_entry = {"structure": "constant", "value": constant}
    metadata = {
        "format": FORMAT,
        "version": VERSION,
        "library_version": __version__,
        "structure": fit.structure.name,
        "structure_state": structure_state,
        "likelihood": la.likelihood_name,
        "curvature": la.curvature,
        "subset": la.subset if isinstance(la.subset, str) else list(la.subset),
        "temperature": la.temperature,
        "sigma_noise": la.sigma_noise,
        "full_size_limit": la.full_size_limit,
        "output": la.output,
        "prior_precision": prior_precision,
        "prior_mean": prior_mean_entry,
        "fit": {
            "n_data": fit.n_data,
            "n_outputs": int(fit.n_outputs),
            "loss": float(fit.loss),
            **({} if fit.n_rows is None else {"n_rows": fit.n_rows}),
        },
        "weights": _describe(la.variables),
        "fingerprint": {
            "architecture": architecture_fingerprint(la.model),
            "weights": weights_fingerprint(la.model),
        },
        "checksum": _checksum(arrays),
    }
    _write_atomically(os.fspath(path), {"metadata": np.array(json.dumps(metadata)), **arrays})


def load(
    path: str | os.PathLike,
    model: keras.Model,
    *,
    cls: type[Laplace],
    structure: str | None = None,
) -> Laplace:
    """Read a posterior written by :func:`save`, as a ``cls`` attached to ``model``
    (:func:`laplace_tf.serialization.load` defaults ``cls`` to :class:`~laplace_tf.Laplace`).

    ``model`` must have the architecture and the weights the posterior was fitted on
    (e.g. the model saved with ``model.save`` and reloaded with
    ``keras.models.load_model``). It is not modified. A file whose structure differs from
    ``structure`` (if given) or from the one ``cls`` fixes
    (:attr:`Laplace.fixed_structure`) is refused.

    Raises
    ------
    FileNotFoundError
        If ``path`` is not a file.
    ValueError
        If the file is not a laplace_tf file, comes from a newer format version, is
        corrupted or truncated, or if ``model`` differs from the fitted one in
        architecture, weights or selected weights, or holds another structure.
    """
    path = os.fspath(path)
    if not isinstance(model, keras.Model):
        raise TypeError(f"model must be a keras.Model, got {type(model).__name__}.")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path!r} is not a file.")
    metadata, arrays = _read(path)
    try:
        _check_model(path, model, metadata["fingerprint"], metadata["version"])
        return _restore(path, model, metadata, arrays, cls, structure)
    except (KeyError, TypeError, IndexError) as error:
        raise ValueError(f"{path!r} has malformed metadata ({error!r}).") from error


def _check_model(path: str, model: keras.Model, fingerprint: dict[str, str], version: int) -> None:
    """Refuse a model whose architecture or weights differ from the fitted one."""
    architecture = architecture_fingerprint if version >= 2 else _architecture_fingerprint_v1
    if architecture(model) != fingerprint["architecture"]:
        raise ValueError(
            f"{path!r} was fitted on a model with a different architecture (layers, "
            "configuration or weight shapes differ). Load it with the model "
            "it was fitted on, e.g. one saved with model.save() and reloaded with "
            "keras.models.load_model()."
        )
    if weights_fingerprint(model) != fingerprint["weights"]:
        raise ValueError(
            f"model has different weights than the model {path!r} was fitted on: the "
            "posterior mean would not be the model's weights and its predictions would mix "
            "two networks. Restore the fitted weights, or fit a new posterior."
        )


def architecture_fingerprint(model: keras.Model) -> str:
    """sha256 of a canonical JSON description of ``model``'s architecture.

    The description holds the model's class, ``model.get_config()`` (``None`` for a
    subclassed model that cannot give one), the class of every nested layer with the
    name, shape and dtype of each weight it owns, and the shape and dtype of every
    weight of the model in order. It leaves out what Keras regenerates when a model is
    reloaded: weight paths (``sequential/dense/kernel`` becomes ``dense/kernel``) and
    the automatic names of the layers of a subclassed model. The layer names of a
    Functional or Sequential model are part of its configuration, so they still count.
    """
    description = {
        "class": _qualified_name(type(model)),
        "config": _config(model),
        "layers": [
            [
                _qualified_name(type(layer)),
                [
                    [v.name, [int(d) for d in v.shape], str(v.dtype)]
                    for v in (*layer._trainable_variables, *layer._non_trainable_variables)
                ],
            ]
            for layer in model._flatten_layers(include_self=False, recursive=True)
        ],
        "weights": [[[int(d) for d in v.shape], str(v.dtype)] for v in model.weights],
    }
    return _digest_json(description)


def _architecture_fingerprint_v1(model: keras.Model) -> str:
    """The fingerprint of format version 1, which included weight paths and layer names;
    kept to check the files written in that version."""
    description = {
        "class": _qualified_name(type(model)),
        "config": _config(model),
        "layers": [
            [_qualified_name(type(layer)), layer.name]
            for layer in model._flatten_layers(include_self=False, recursive=True)
        ],
        "weights": _describe(model.weights),
    }
    return _digest_json(description)


def _config(model: keras.Model) -> Any:
    try:
        return model.get_config()
    except NotImplementedError:
        return None


def _digest_json(description: dict[str, Any]) -> str:
    text = json.dumps(description, sort_keys=True, separators=(",", ":"), default=_json_default)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def weights_fingerprint(model: keras.Model) -> str:
    """sha256 over all of ``model.weights`` (trainable and not), in order: each weight's
    shape, dtype and bytes."""
    digest = hashlib.sha256()
    for variable in model.weights:
        _hash_array(digest, "", np.asarray(variable.numpy()))
    return digest.hexdigest()


# -- reading ---------------------------------------------------------------------------------


def _read(path: str) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """The metadata and the arrays of a laplace_tf file, checked for format and corruption."""
    with open(path, "rb") as file:
        magic = file.read(len(_ZIP_MAGIC))
    if magic != _ZIP_MAGIC:
        raise ValueError(
            f"{path!r} is not a laplace_tf file (not an .npz archive); write one with "
            "Laplace.save()."
        )
    corrupted = (
        f"{path!r} is corrupted or truncated; save the posterior again (or use a backup copy)."
    )
    try:
        with np.load(path, allow_pickle=False) as archive:
            contents = {name: archive[name] for name in archive.files}
    except Exception as error:  # damaged zip and .npy headers fail in many ways
        raise ValueError(corrupted) from error
    metadata = _parse_metadata(path, contents.pop("metadata", None))
    if metadata.get("checksum") != _checksum(contents):
        raise ValueError(corrupted)
    return metadata, contents


def _parse_metadata(path: str, entry: np.ndarray | None) -> dict[str, Any]:
    not_ours = (
        f"{path!r} is not a laplace_tf file (no {FORMAT} metadata); write one with Laplace.save()."
    )
    if entry is None or entry.shape != () or entry.dtype.kind != "U":
        raise ValueError(not_ours)
    try:
        metadata = json.loads(entry.item())
    except ValueError as error:
        raise ValueError(not_ours) from error
    if not isinstance(metadata, dict) or metadata.get("format") != FORMAT:
        raise ValueError(not_ours)
    version = metadata.get("version")
    if not isinstance(version, int) or isinstance(version, bool) or version < 1:
        raise ValueError(f"{path!r} has an invalid format version {version!r}.")
    if version > VERSION:
        raise ValueError(
            f"{path!r} was written in format version {version} by laplace_tf "
            f"{metadata.get('library_version')}; this laplace_tf ({__version__}) "
            f"reads version {VERSION} and older: upgrade laplace_tf to load it."
        )
    return metadata


def _restore(
    path: str,
    model: keras.Model,
    metadata: dict[str, Any],
    arrays: dict[str, np.ndarray],
    cls: type[Laplace],
    structure: str | None,
) -> Laplace:
    """A ``cls`` on ``model`` with the configuration and fitted state of a file."""
    stored = metadata.get("structure", "diag")  # versions 1 and 2: diagonal only
    expected = structure or cls.fixed_structure
    if expected is not None and stored != expected:
        raise ValueError(
            f"{path!r} holds a structure={stored!r} posterior, not {expected!r}; load it "
            "with laplace_tf.Laplace.load(path, model)."
        )
    count = len(metadata["weights"])
    prior = metadata["prior_precision"]
    if prior["structure"] == "diag":
        prior_precision = [arrays[f"prior_precision_{i}"] for i in range(count)]
    else:
        prior_precision = prior["value"]
    mean = metadata["prior_mean"]
    if mean["structure"] == "constant":
        prior_mean = mean["value"]
    else:
        prior_mean = [arrays[f"prior_mean_{i}"] for i in range(count)]
    options = {}
    if cls.fixed_structure is None:
        options = {"structure": stored}
        if "full_size_limit" in metadata:
            options["full_size_limit"] = metadata["full_size_limit"]
    la = cls(
        model,
        metadata["likelihood"],
        curvature=metadata["curvature"],
        subset=metadata["subset"],
        prior_precision=prior_precision,
        prior_mean=prior_mean,
        sigma_noise=metadata["sigma_noise"],
        temperature=metadata["temperature"],
        output=metadata.get("output"),
        **options,
    )
    if _shapes(_describe(la.variables)) != _shapes(metadata["weights"]):
        raise ValueError(
            f"the selected weights differ from the fitted ones: file has "
            f"{metadata['weights']}, model gives {_describe(la.variables)}."
        )
    weights_mean = [arrays[f"mean_{i}"] for i in range(count)]
    for v, m in zip(la.variables, weights_mean, strict=True):
        if m.shape != tuple(v.shape) or m.dtype != v.dtype:
            raise ValueError(f"the stored arrays for {v.path} do not match its shape or dtype.")
    state = la.structure_class.from_state(arrays, metadata.get("structure_state", {}), la.variables)
    fit = metadata["fit"]
    settings = la.fitted_settings()
    la.restore(
        FitRecord(
            structure=state,
            curvature=settings["curvature"],
            likelihood=settings["likelihood"],
            subset=settings["subset"],
            loss=float(fit["loss"]),
            n_data=fit["n_data"],
            n_outputs=int(fit["n_outputs"]),
            mean=tuple(tf.constant(m) for m in weights_mean),
            n_rows=fit.get("n_rows"),
        )
    )
    return la


# -- writing ---------------------------------------------------------------------------------


def _write_atomically(path: str, arrays: dict[str, np.ndarray]) -> None:
    """``np.savez`` to a temporary file beside ``path``, fsync, then rename onto ``path``.

    The temporary file is opened with ``open(..., "xb")`` so that it gets the usual
    permissions (``0o666`` less the umask); ``tempfile`` would create it private.
    """
    directory, name = os.path.split(os.path.abspath(path))
    temporary = os.path.join(directory, f".{name}.{secrets.token_hex(8)}.tmp")
    try:
        with open(temporary, "xb") as file:
            np.savez(file, **arrays)
            file.flush()
            os.fsync(file.fileno())
        os.replace(temporary, path)
    except BaseException:
        if os.path.exists(temporary):
            os.remove(temporary)
        raise
    if os.name == "posix":  # make the rename itself durable
        descriptor = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(descriptor)
        finally:
            os.close(descriptor)


# -- helpers ---------------------------------------------------------------------------------


def _describe(variables: list) -> list[dict[str, Any]]:
    return [
        {"name": v.path, "shape": [int(d) for d in v.shape], "dtype": str(v.dtype)}
        for v in variables
    ]


def _shapes(described: list[dict[str, Any]]) -> list[tuple]:
    """Shapes and dtypes of described weights; their names are paths Keras may regenerate."""
    return [(tuple(d["shape"]), d["dtype"]) for d in described]


def _constant_value(arrays: list[np.ndarray]) -> float | None:
    """The float every array holds (bitwise, in its own dtype), or ``None``."""
    if not arrays or arrays[0].size == 0:
        return None
    value = float(arrays[0].flat[0])
    for array in arrays:
        if np.full(array.shape, value, dtype=array.dtype).tobytes() != array.tobytes():
            return None
    return value


def _checksum(arrays: dict[str, np.ndarray]) -> str:
    digest = hashlib.sha256()
    for name in sorted(arrays):
        _hash_array(digest, name, arrays[name])
    return digest.hexdigest()


def _hash_array(digest: Any, name: str, array: np.ndarray) -> None:
    header = json.dumps([name, array.dtype.str, list(array.shape)])
    digest.update(header.encode("utf-8"))
    digest.update(np.ascontiguousarray(array).tobytes())


def _qualified_name(cls: type) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


def _json_default(value: Any) -> Any:
    """JSON for objects a Keras config may hold: arrays as lists, anything else by class."""
    if hasattr(value, "tolist"):
        return value.tolist()
    return _qualified_name(type(value))
