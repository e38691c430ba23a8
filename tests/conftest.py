"""Shared test set-up."""

from __future__ import annotations

import keras
import pytest
from keras.src.backend.common import global_state


@pytest.fixture(scope="module", autouse=True)
def fresh_dtype_policy():
    """Keras derives its default dtype policy from ``floatx`` on first use and then keeps
    it, so a later ``set_floatx`` (the float64 modules) would be ignored, and a policy
    set by one module would leak into the next. Clear it around every module."""
    global_state.set_global_attribute("dtype_policy", None)
    yield
    global_state.set_global_attribute("dtype_policy", None)


@pytest.fixture(scope="module")
def float64():
    """float64 layers for one module (``pytestmark = pytest.mark.usefixtures("float64")``);
    the previous default is restored afterwards."""
    previous = keras.config.floatx()
    keras.config.set_floatx("float64")
    yield
    keras.config.set_floatx(previous)


@pytest.fixture(autouse=True)
def compiled_passes(monkeypatch):
    """Every dataset the tests fit on, however few its batches, goes through the compiled
    pass (by default short ones take the Python loop, which the tests reach through
    ``progress`` and plain iterables), so that its checks and reruns stay covered;
    ``test_short_datasets_take_the_python_loop`` checks the default."""
    from laplace_tf.curvature import basics

    monkeypatch.setattr(basics, "COMPILED_PASS_BATCHES", 1)
