"""What makes first fits cheaper keeps results exact: Grappler's lean passes for the
fits' compiled calls (``basics.lean_grappler``), the static shapes the conv and bias
factors take where sizes are known (and the dynamic ones where they are not), and the
unfoldings' index constants shared within a traced graph."""

from __future__ import annotations

import weakref

import keras
import numpy as np
import pytest
import tensorflow as tf
from oracles import assert_close, flat
from tensorflow.core.protobuf import config_pb2, rewriter_config_pb2
from tensorflow.python.eager import context
from test_curvature_structured import dense_ggn_diagonal

from laplace_tf.curvature import basics, conv_factors, structured

L = keras.layers
REWRITER = rewriter_config_pb2.RewriterConfig


@pytest.fixture(autouse=True)
def fresh_steps(monkeypatch):
    """Steps traced anew in each test (the settings below are read when tracing)."""
    monkeypatch.setattr(structured, "_STEPS", weakref.WeakKeyDictionary())


def _rewrite_options() -> rewriter_config_pb2.RewriterConfig:
    serialized = context.context().function_call_options.config_proto_serialized
    return config_pb2.ConfigProto.FromString(serialized).graph_options.rewrite_options


def test_lean_grappler_applies_within_its_block_only():
    before = context.context().function_call_options
    assert _rewrite_options().meta_optimizer_iterations == REWRITER.DEFAULT_NUM_ITERS
    with basics.lean_grappler():
        inside = _rewrite_options()
        assert inside.meta_optimizer_iterations == REWRITER.ONE
        if not tf.config.list_logical_devices("GPU"):
            assert inside.layout_optimizer == REWRITER.OFF
            assert inside.memory_optimization == REWRITER.NO_MEM_OPT
    assert context.context().function_call_options is before
    assert _rewrite_options().meta_optimizer_iterations == REWRITER.DEFAULT_NUM_ITERS


def test_lean_grappler_keeps_the_users_settings():
    eager = context.context()
    previous = dict(eager._optimizer_experimental_options)
    tf.config.optimizer.set_experimental_options({"layout_optimizer": True})
    try:
        with basics.lean_grappler():
            assert _rewrite_options().layout_optimizer == REWRITER.ON
            assert _rewrite_options().meta_optimizer_iterations == REWRITER.ONE
    finally:  # back to the defaults (setting an option cannot unset it)
        eager._optimizer_experimental_options = previous
        eager._thread_local_data.function_call_options = None
    assert _rewrite_options().layout_optimizer == REWRITER.DEFAULT


def test_lean_grappler_can_be_switched_off(monkeypatch):
    monkeypatch.setattr(basics, "LEAN_GRAPPLER", False)
    before = context.context().function_call_options
    with basics.lean_grappler():
        assert context.context().function_call_options is before


def test_lean_and_full_passes_fit_the_same(float64_layers, monkeypatch):
    model, x, y = _cnn((6, 6, 3))
    data = tf.data.Dataset.from_tensor_slices((x, y)).batch(3)
    lean = structured.fit_diagonal(model, data, likelihood="classification", kind="ggn")
    structured._STEPS.pop(model)
    monkeypatch.setattr(basics, "LEAN_GRAPPLER", False)
    full = structured.fit_diagonal(model, data, likelihood="classification", kind="ggn")
    np.testing.assert_allclose(flat(lean.diagonal), flat(full.diagonal), rtol=1e-12)


@pytest.fixture
def float64_layers():
    """float64 layers for one test (conftest's ``float64`` holds for a whole module; the
    probe tests below build float32 models)."""
    previous = keras.config.floatx()
    keras.config.set_floatx("float64")
    yield
    keras.config.set_floatx(previous)


def _cnn(input_shape, n=7):
    """Conv + BatchNorm (moving statistics away from 0 / 1) + a strided conv, pooled: on
    ``input_shape`` (spatial sizes ``None``: known only per batch)."""
    keras.utils.set_random_seed(3)
    inp = keras.Input(input_shape)
    h = L.Conv2D(4, 3, padding="same")(inp)
    norm = L.BatchNormalization()
    h = L.Activation("tanh")(norm(h))
    h = L.Conv2D(3, 2, strides=2, activation="relu")(h)
    model = keras.Model(inp, L.Dense(4)(L.GlobalAveragePooling2D()(h)))
    rng = np.random.default_rng(4)
    norm.moving_mean.assign(rng.normal(size=4))
    norm.moving_variance.assign(rng.uniform(0.5, 2.0, size=4))
    norm.gamma.assign(rng.normal(size=4))
    x = rng.normal(size=(n, 6, 6, 3))
    return model, x, rng.integers(0, 4, size=n)


@pytest.mark.parametrize("spatial", ["known", "unknown"])
@pytest.mark.parametrize("path", ["unrolled", "column_loop", "compiled_pass"])
def test_static_and_dynamic_shapes_equal_the_oracle(float64_layers, monkeypatch, spatial, path):
    """Static reshapes where sizes are known, the dynamic ones where the spatial sizes are
    ``None``; unrolled columns, the column loop (its moment fold) and the compiled pass
    (batches of unknown size)."""
    model, x, y = _cnn((6, 6, 3) if spatial == "known" else (None, None, 3))
    reference = dense_ggn_diagonal(model, x, "classification")
    data = (x, y)
    if path == "column_loop":
        monkeypatch.setattr(structured, "LOOPED_COLUMN_OPS", 0)
    elif path == "compiled_pass":
        data = tf.data.Dataset.from_tensor_slices((x, y)).batch(3)
    fitted = structured.fit_diagonal(model, data, likelihood="classification", kind="ggn")
    assert_close(flat(fitted.diagonal), reference)
    ef = structured.fit_diagonal(model, data, likelihood="classification", kind="ef")
    assert np.all(np.isfinite(flat(ef.diagonal))) and flat(ef.diagonal).max() > 0


def test_unfolding_indices_are_shared_and_order_nothing():
    x = tf.random.normal([2, 5, 5, 3])
    window = conv_factors.Window((3, 3), (1, 1), (1, 1), "same")

    @tf.function(autograph=False)
    def unfolded(x):
        with conv_factors.shared_unfoldings():
            with tf.control_dependencies([tf.identity(x)]):
                first = conv_factors._unfold(x, window)
            second = conv_factors._unfold(2 * x, window)
        return first, second

    graph = unfolded.get_concrete_function(x).graph
    slices = [op for op in graph.get_operations() if op.type == "StridedSlice"]
    indices = {t.op.name for op in slices for t in op.inputs[1:]}
    assert len(slices) == 18
    assert len(indices) < 3 * 9  # 9 begins, 1 end vector per begin (same here) and 1 stride
    for name in indices:
        assert not graph.get_operation_by_name(name).control_inputs
    first, second = unfolded(x)
    eager_first = conv_factors._unfold(x, window)  # eager: lists, not shared constants
    np.testing.assert_array_equal(first, eager_first)
    np.testing.assert_array_equal(second, 2 * eager_first)


def test_the_output_probe_calls_no_grouped_convolution(caplog, monkeypatch):
    """Keras runs a grouped convolution on the CPU through a ``tf.function`` it makes per
    call: called eagerly five times or more, TensorFlow logs a retracing warning to the
    user. The output probe reads the model through the engine's trace, which computes
    such a layer by its rule (as a depthwise convolution): Keras' ``Conv2D.call`` is
    never run by a first fit, where an eager call of the model (the control) runs it once
    per layer; and no retracing is logged."""
    keras.utils.set_random_seed(1)
    inp = keras.Input((6, 6, 4))
    h = inp
    for _ in range(6):
        h = L.Conv2D(4, 3, padding="same", groups=4, activation="tanh")(h)
    model = keras.Model(inp, L.Dense(3)(L.GlobalAveragePooling2D()(h)))
    x = np.random.default_rng(0).normal(size=(4, 6, 6, 4)).astype("float32")
    y = np.array([0, 1, 2, 0])
    calls = []
    call = L.Conv2D.call
    monkeypatch.setattr(
        L.Conv2D, "call", lambda self, *a, **k: calls.append(1) or call(self, *a, **k)
    )
    with caplog.at_level("WARNING", logger="tensorflow"):
        fitted = structured.fit_diagonal(model, (x, y), likelihood="classification", kind="ef")
    assert np.all(np.isfinite(flat(fitted.diagonal)))
    assert not calls
    assert not [r for r in caplog.records if "retracing" in r.getMessage()]
    model(x, training=False)
    assert len(calls) == 6


class _Scaled(L.Layer):
    def build(self, shape):
        self.w = self.add_weight(shape=(shape[-1],), initializer="ones")

    def call(self, x):
        return x * self.w


def test_the_output_probe_falls_back_to_the_models_call():
    """A rule whose forward fails does not fail the probe: the model's own call reads the
    output shape, as it did before the probe ran the engine's trace."""
    from laplace_tf._validation import probe_outputs
    from laplace_tf.curvature.registry import Rule, register_rule, unregister_rule
    from laplace_tf.likelihoods import get_likelihood

    def broken(layer, inputs):
        raise RuntimeError("a broken forward")

    rule = Rule(broken, lambda layer, inputs, delta: [], name="broken")
    register_rule(_Scaled, rule)
    try:
        inp = keras.Input((3,))
        model = keras.Model(inp, L.Dense(2)(_Scaled()(inp)))
        x = tf.constant(np.ones((4, 3), np.float32))
        assert probe_outputs(model, get_likelihood("classification"), x) == (2,)
    finally:
        unregister_rule(_Scaled, rule)
