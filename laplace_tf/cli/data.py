"""The data of the ``laplace-tf`` studies: the demo's digits and model, the user's files.

The demo data are scikit-learn's bundled 8x8 digits; the shifted set rotates and adds
noise to the test digits, and the OOD set holds 8x8 patches of scikit-learn's two
bundled photographs. ``calibrate`` reads the user's model and arrays instead, and checks
them before any long step.
"""

from __future__ import annotations

import sys
import zipfile
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import keras
import numpy as np
import tensorflow as tf
from scipy import ndimage

from laplace_tf.cli.progress import EpochProgress, ProgressBar

#: Rows of each input array run through the model to check it before any long step.
_PROBE_ROWS = 8

REQUIRED_KEYS = ("x_train", "y_train", "x_test", "y_test")
OPTIONAL_KEYS = ("x_val", "y_val", "x_shifted", "y_shifted", "x_ood")
_PAIRS = (("x_val", "y_val"), ("x_shifted", "y_shifted"))


class InputError(Exception):
    """A problem with the user's files, arrays or options; reported without a traceback."""


@dataclass
class StudyData:
    """Inputs ``x_*`` and labels ``y_*``; the optional sets are ``None`` when absent."""

    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    x_val: np.ndarray | None = None
    y_val: np.ndarray | None = None
    x_shifted: np.ndarray | None = None
    y_shifted: np.ndarray | None = None
    x_ood: np.ndarray | None = None

    def sizes(self) -> dict[str, int]:
        """Number of examples per set present, e.g. ``{"train": 1079, ...}``."""
        return {
            f.name[2:]: len(value)
            for f in fields(self)
            if f.name.startswith("x_") and (value := getattr(self, f.name)) is not None
        }

    def labelled_sets(self) -> dict[str, tuple[np.ndarray, np.ndarray]]:
        """The evaluated sets: ``test`` and, if present, ``shifted``."""
        sets = {"test": (self.x_test, self.y_test)}
        if self.x_shifted is not None:
            sets["shifted"] = (self.x_shifted, self.y_shifted)
        return sets


# -- the demo ----------------------------------------------------------------------------------

DEMO_HIDDEN = (128, 128)
DEMO_LEARNING_RATE = 3e-3
DEMO_TRAIN_BATCH = 64
DEMO_TEST_FRACTION = 0.25
DEMO_VAL_FRACTION = 0.15
_MISSING_EXAMPLES = (
    "the demo needs scikit-learn and Pillow: pip install 'laplace-tf[examples,plot]'"
)


def demo_data(seed: int, rotation: float, noise: float) -> StudyData:
    """Digits scaled to ``[0, 1]`` and split 60 / 15 / 25 % (train / val / test) by
    ``seed``; shifted = test digits rotated by ``U(-rotation, rotation)`` degrees (bilinear)
    plus ``N(0, noise^2)`` pixel noise, clipped to ``[0, 1]``; OOD = as many 8x8 photo
    patches as test digits."""
    try:
        from sklearn.datasets import load_digits
    except ImportError as error:
        raise InputError(_MISSING_EXAMPLES) from error
    digits = load_digits()
    x = (digits.data / 16.0).astype(np.float32)
    y = digits.target.astype(np.int64)
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(x))
    n_test = int(DEMO_TEST_FRACTION * len(x))
    n_val = int(DEMO_VAL_FRACTION * len(x))
    test, val, train = np.split(order, [n_test, n_test + n_val])
    return StudyData(
        x_train=x[train],
        y_train=y[train],
        x_val=x[val],
        y_val=y[val],
        x_test=x[test],
        y_test=y[test],
        x_shifted=shift_digits(x[test], rng, rotation, noise),
        y_shifted=y[test],
        x_ood=photo_patches(n_test, rng),
    )


def shift_digits(x: np.ndarray, rng: np.random.Generator, rotation: float, noise: float):
    """Rotate each flat 8x8 image by an angle from ``U(-rotation, rotation)`` degrees, add
    Gaussian noise of standard deviation ``noise`` and clip to ``[0, 1]``."""
    angles = rng.uniform(-rotation, rotation, len(x))
    images = x.reshape(-1, 8, 8)
    rotated = np.stack(
        [
            ndimage.rotate(image, angle, reshape=False, order=1)
            for image, angle in zip(images, angles, strict=True)
        ]
    ).reshape(len(x), -1)
    return np.clip(rotated + noise * rng.standard_normal(rotated.shape), 0, 1).astype(np.float32)


def photo_patches(n: int, rng: np.random.Generator) -> np.ndarray:
    """``n`` flat 8x8 grey patches of scikit-learn's sample photos (a Chinese temple and a
    flower): windows of side ``8k`` (``k`` in 1..8) block-averaged to 8x8 and rescaled to
    span ``[0, 1]`` like the digits."""
    try:
        from sklearn.datasets import load_sample_images

        photos = [image.mean(axis=-1) for image in load_sample_images().images]
    except ImportError as error:
        raise InputError(_MISSING_EXAMPLES) from error
    patches = []
    for index in range(n):
        photo = photos[index % len(photos)]
        k = int(rng.integers(1, 9))
        top = int(rng.integers(0, photo.shape[0] - 8 * k + 1))
        left = int(rng.integers(0, photo.shape[1] - 8 * k + 1))
        window = photo[top : top + 8 * k, left : left + 8 * k]
        patch = window.reshape(8, k, 8, k).mean(axis=(1, 3))
        patches.append((patch - patch.min()) / max(np.ptp(patch), 1e-6))
    return np.stack(patches).reshape(n, 64).astype(np.float32)


def train_demo_model(
    x: np.ndarray, y: np.ndarray, *, epochs: int, weight_decay: float, seed: int
) -> keras.Model:
    """A ReLU MLP 64-128-128-10 (logits) with L2 weight decay, trained by Adam."""
    keras.utils.set_random_seed(seed)
    regularizer = keras.regularizers.L2(weight_decay)
    model = keras.Sequential(
        [keras.Input((x.shape[1],))]
        + [
            keras.layers.Dense(width, activation="relu", kernel_regularizer=regularizer)
            for width in DEMO_HIDDEN
        ]
        + [keras.layers.Dense(10, kernel_regularizer=regularizer, name="logits")]
    )
    model.compile(
        optimizer=keras.optimizers.Adam(DEMO_LEARNING_RATE),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
    )
    with ProgressBar("Training", epochs) as bar:
        model.fit(
            x,
            y,
            epochs=epochs,
            batch_size=DEMO_TRAIN_BATCH,
            verbose=0,
            callbacks=[EpochProgress(bar)],
        )
    return model


# -- calibrate: reading and checking the user's files ------------------------------------------


def load_model(path: Path) -> keras.Model:
    """The Keras model saved at ``path`` (a ``.keras`` file)."""
    if not path.exists():
        raise InputError(f"model file not found: {path}")
    if path.suffix != ".keras":
        raise InputError(
            f"MODEL must be a Keras 3 '.keras' file, got {path.name!r}; "
            "save the model with model.save('model.keras')"
        )
    try:
        model = keras.saving.load_model(path)
    except Exception as error:  # noqa: BLE001 - any loader failure is the file's problem
        raise InputError(f"could not load the model from {path}: {error}") from error
    if not isinstance(model, keras.Model):
        raise InputError(f"{path} holds a {type(model).__name__}, not a keras.Model")
    return model


def load_data(path: Path) -> StudyData:
    """The arrays of the ``.npz`` file at ``path`` (no pickles), checked for keys and
    lengths; floating inputs are cast to Keras' float type."""
    if not path.exists():
        raise InputError(f"data file not found: {path}")
    try:
        archive = np.load(path, allow_pickle=False)
    except (OSError, ValueError, zipfile.BadZipFile) as error:
        raise InputError(f"could not read {path} as an .npz archive: {error}") from error
    if not isinstance(archive, np.lib.npyio.NpzFile):
        raise InputError(f"DATA must be an .npz archive (np.savez), but {path} holds one array")
    with archive:
        keys = set(archive.files)
        missing = [key for key in REQUIRED_KEYS if key not in keys]
        if missing:
            raise InputError(
                f"{path.name} lacks the key(s) {', '.join(missing)}; expected keys: "
                f"{', '.join(REQUIRED_KEYS)} (required), {', '.join(OPTIONAL_KEYS)} (optional); "
                f"found: {', '.join(sorted(keys)) or 'none'}"
            )
        unknown = sorted(keys - set(REQUIRED_KEYS) - set(OPTIONAL_KEYS))
        if unknown:
            print(
                f"laplace-tf: warning: ignoring unknown key(s) in {path.name}: "
                f"{', '.join(unknown)}",
                file=sys.stderr,
            )
        arrays = {
            key: _read_array(archive, key) for key in REQUIRED_KEYS + OPTIONAL_KEYS if key in keys
        }
    for x_key, y_key in _PAIRS:
        if (x_key in arrays) != (y_key in arrays):
            present, absent = (x_key, y_key) if x_key in arrays else (y_key, x_key)
            raise InputError(f"{path.name} has {present} but not {absent}; give both or neither")
    for x_key, y_key in (("x_train", "y_train"), ("x_test", "y_test"), *_PAIRS):
        if x_key in arrays and len(arrays[x_key]) != len(arrays[y_key]):
            raise InputError(
                f"{x_key} has {len(arrays[x_key])} examples but {y_key} has "
                f"{len(arrays[y_key])} labels"
            )
    return StudyData(**arrays)


def _read_array(archive: Any, key: str) -> np.ndarray:
    try:
        array = archive[key]
    except ValueError as error:
        raise InputError(f"{key} could not be read ({error}); save plain numeric arrays") from error
    if array.ndim == 0 or len(array) == 0:
        raise InputError(f"{key} is empty or a scalar; expected one row per example")
    if not (np.issubdtype(array.dtype, np.number) or array.dtype == np.bool_):
        raise InputError(f"{key} has dtype {array.dtype}; expected numbers")
    if key.startswith("x_") and np.issubdtype(array.dtype, np.floating):
        array = array.astype(keras.config.floatx())
    return array


def check_model_and_labels(model: keras.Model, data: StudyData, likelihood: str) -> None:
    """Refuse, before any long step, inputs the model cannot take, models without one
    ``[N, C]`` output, and labels the likelihood cannot read with ``C`` outputs."""
    n_outputs = None
    for f in fields(data):
        x = getattr(data, f.name)
        if not f.name.startswith("x_") or x is None:
            continue
        try:
            outputs = model(x[:_PROBE_ROWS], training=False)
        except Exception as error:  # noqa: BLE001 - any failure means the shapes do not fit
            first_line = str(error).strip().splitlines()[0] if str(error).strip() else ""
            raise InputError(
                f"the model cannot be applied to {f.name} (shape {list(x.shape)}): "
                f"{type(error).__name__}: {first_line}"
            ) from error
        if not isinstance(outputs, tf.Tensor | np.ndarray) or len(outputs.shape) != 2:
            raise InputError(
                "the model must have one output of shape [N, C] (logits), got "
                f"{tf.nest.map_structure(lambda t: list(t.shape), outputs)}"
            )
        n_outputs = int(outputs.shape[1])
    if likelihood == "binary" and n_outputs != 1:
        raise InputError(
            f"--likelihood binary needs a model with one output (a logit), "
            f"but this model has {n_outputs}; use --likelihood classification"
        )
    if likelihood == "classification" and n_outputs < 2:
        raise InputError(
            "--likelihood classification needs a model with C >= 2 outputs (logits), but this "
            "model has 1; use --likelihood binary"
        )
    top = 2 if likelihood == "binary" else n_outputs
    for f in fields(data):
        y = getattr(data, f.name)
        if not f.name.startswith("y_") or y is None:
            continue
        if y.ndim == 2 and y.shape[1] == 1:
            y = y[:, 0]
        if y.ndim != 1:
            raise InputError(f"{f.name} must hold one label per example, got shape {list(y.shape)}")
        if np.any(y != np.round(y)) or y.min() < 0 or y.max() >= top:
            raise InputError(
                f"{f.name} must hold integer labels in [0, {top}) for a {likelihood} model with "
                f"{n_outputs} output(s), got values in [{y.min()}, {y.max()}]"
            )
        setattr(data, f.name, y.astype(np.int64))
