"""Per-layer rules, one case each, against dense per-example Jacobians; the registry;
:func:`explain`.

Every case is a tiny float64 model that uses the layer under test; for each, the
diagonal GGN and the GLM output covariance equal those formed from dense per-example
Jacobians (``tf.GradientTape.jacobian``, no ``pfor``), the rule is really used, and it
gives the numbers of the generic per-example fallback.
"""

from __future__ import annotations

import weakref

import keras
import numpy as np
import pytest
import tensorflow as tf
from keras.src.applications.convnext import LayerScale  # ConvNeXt's, a built-in rule
from oracles import assert_close, dense_jacobian, flat, softmax_hessian

from laplace_tf.curvature import (
    Rule,
    diagonal,
    explain,
    is_piecewise_linear,
    output_covariance,
    register_rule,
    registry,
    structured,
    tracing,
    unregister_rule,
)
from laplace_tf.curvature.layers import Explicit, bias_grads

L = keras.layers
N = 5
CLASSES = 3


pytestmark = pytest.mark.usefixtures("float64")  # conftest.py: float64 layers


# ---------------------------------------------------------------------------------------
# Cases: one per rule (and per padding / stride / dilation variant worth a look)
# ---------------------------------------------------------------------------------------

#: name -> (input shape, layer factory, expected rule name)
CASES = {
    "conv1d_causal": ((7, 2), lambda: L.Conv1D(3, 3, padding="causal", dilation_rate=2, activation="tanh"), "Conv patches"),  # noqa: E501
    "conv1d_grouped": ((6, 4), lambda: L.Conv1D(4, 2, strides=2, groups=2), "Conv patches"),
    "conv2d": ((5, 6, 2), lambda: L.Conv2D(3, (3, 2), strides=2, padding="same", activation="tanh"), "Conv patches"),  # noqa: E501
    "conv2d_grouped": ((5, 4, 4), lambda: L.Conv2D(6, 2, dilation_rate=(1, 2), groups=2), "Conv patches"),  # noqa: E501
    # one group per input channel: computed and reduced as depthwise (DepthwisePatches where
    # TF's kernel applies; the dilated and causal ones by grouped patch products)
    "conv1d_per_channel_causal": ((7, 2), lambda: L.Conv1D(4, 3, padding="causal", groups=2), "Conv patches"),  # noqa: E501
    "conv1d_per_channel_strided": ((7, 3), lambda: L.Conv1D(6, 3, strides=2, padding="same", groups=3, activation="tanh"), "Conv patches"),  # noqa: E501
    "conv2d_per_channel": ((6, 6, 3), lambda: L.Conv2D(6, 5, padding="same", groups=3, activation="tanh"), "Conv patches"),  # noqa: E501
    "conv2d_per_channel_dilated": ((6, 5, 2), lambda: L.Conv2D(2, 2, dilation_rate=2, groups=2), "Conv patches"),  # noqa: E501
    "conv3d": ((4, 5, 3, 2), lambda: L.Conv3D(3, 2, strides=(1, 2, 1), padding="same", activation="tanh"), "Conv patches"),  # noqa: E501
    "conv3d_dilated": ((5, 4, 5, 1), lambda: L.Conv3D(2, (2, 1, 2), dilation_rate=2), "Conv patches"),  # noqa: E501
    "conv3d_grouped": ((3, 4, 3, 4), lambda: L.Conv3D(4, 2, groups=2, padding="same"), "Conv patches"),  # noqa: E501
    "depthwise1d": ((7, 3), lambda: L.DepthwiseConv1D(3, strides=2, padding="same", depth_multiplier=2, activation="tanh"), "Depthwise patches"),  # noqa: E501
    "depthwise2d": ((5, 6, 2), lambda: L.DepthwiseConv2D((2, 3), dilation_rate=(2, 1), depth_multiplier=2), "Depthwise patches"),  # noqa: E501
    "depthwise2d_strided": ((7, 6, 2), lambda: L.DepthwiseConv2D(3, strides=2, padding="same", depth_multiplier=2), "Depthwise patches"),  # noqa: E501
    "depthwise2d_strided_dilated": ((7, 7, 2), lambda: L.DepthwiseConv2D(2, strides=2, dilation_rate=2, padding="same"), "Depthwise patches"),  # noqa: E501
    "separable1d": ((7, 2), lambda: L.SeparableConv1D(3, 3, strides=2, padding="same", depth_multiplier=2, activation="tanh"), "Separable patches"),  # noqa: E501
    "separable2d": ((5, 5, 2), lambda: L.SeparableConv2D(3, (2, 3), dilation_rate=(1, 2), activation="tanh"), "Separable patches"),  # noqa: E501
    "separable2d_strided": ((6, 5, 2), lambda: L.SeparableConv2D(3, 3, strides=2, activation="tanh"), "Separable patches"),  # noqa: E501
    "conv1d_transpose": ((4, 2), lambda: L.Conv1DTranspose(3, 3, strides=2, padding="same", output_padding=1, activation="tanh"), "Transposed patches"),  # noqa: E501
    "conv2d_transpose": ((3, 4, 2), lambda: L.Conv2DTranspose(2, (3, 2), strides=(2, 1)), "Transposed patches"),  # noqa: E501
    "conv2d_transpose_dilated": ((4, 4, 2), lambda: L.Conv2DTranspose(2, 3, dilation_rate=2, padding="same"), "Transposed patches"),  # noqa: E501
    "conv3d_transpose": ((2, 3, 2, 2), lambda: L.Conv3DTranspose(2, 2, strides=2, padding="same", use_bias=False), "Transposed patches"),  # noqa: E501
    "group_norm": ((3, 3, 4), lambda: L.GroupNormalization(2), "GroupNormalization"),
    "group_norm_sequence": ((4, 6), lambda: L.GroupNormalization(3, epsilon=0.1), "GroupNormalization"),  # noqa: E501
    "einsum_dense": ((4, 3), lambda: L.EinsumDense("abc,cde->abde", (4, 2, 3), bias_axes="de", activation="tanh"), "EinsumDense"),  # noqa: E501
    "einsum_dense_reduce": ((4, 3), lambda: L.EinsumDense("abc,bcd->ad", (2,), bias_axes="d"), "EinsumDense"),  # noqa: E501
    "dense_rank3": ((4, 3), lambda: L.Dense(4, activation="tanh"), "Dense"),
    "dense_rank4": ((2, 3, 3), lambda: L.Dense(2), "Dense"),
    "layer_scale": ((3, 4), lambda: LayerScale(0.5, 4), "LayerScale"),
    "layer_scale_image": ((2, 3, 2), lambda: LayerScale(0.1, 2), "LayerScale"),
}  # fmt: skip
#: TF's CPU kernels refuse dilated transposed convolutions (the layer itself fails there).
NEEDS_GPU = {"conv2d_transpose_dilated"}
#: The fallback's vectorised per-example filter gradients do not run (grouped convolutions
#: on CPU); the rule runs, and matches dense Jacobians.
FALLBACK_FAILS = {"conv1d_grouped", "conv2d_grouped", "conv3d_grouped"} | {
    name for name in CASES if "per_channel" in name
}
NAMES = [
    pytest.param(
        name,
        marks=pytest.mark.skipif(
            name in NEEDS_GPU and not tf.config.list_physical_devices("GPU"),
            reason="TF has no CPU kernel for this layer",
        ),
    )
    for name in sorted(CASES)
]


def build(name, *, seed=0):
    """``(model, x, y)``: ``inputs -> tanh(Dense) -> layer -> Flatten -> Dense(3)`` with
    random weights (the first Dense makes the layer's inputs depend on weights too)."""
    shape, layer, _ = CASES[name]
    inp = keras.Input(shape)
    hidden = L.Dense(shape[-1], activation="tanh")(inp)
    model = keras.Model(inp, L.Dense(CLASSES)(L.Flatten()(layer()(hidden))))
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(N, *shape))
    for v in model.weights:
        v.assign(rng.normal(0.0, 0.6, size=v.shape))
    return model, x, rng.integers(0, CLASSES, size=N)


def _weights(model, seed=1):
    rng = np.random.default_rng(seed)
    return [rng.uniform(0.1, 2.0, size=v.shape) for v in model.trainable_variables]


def _fits(model, x, y, weights):
    ggn = flat(diagonal(model, (x, y), likelihood="classification", batch_size=3))
    return ggn, output_covariance(model, x, weights, batch_size=3).numpy()


@pytest.mark.parametrize("name", NAMES)
def test_rule_matches_dense_jacobians(name):
    model, x, y = build(name)
    weights = _weights(model)
    ggn, covariance = _fits(model, x, y, weights)
    f, jac = dense_jacobian(model, x)
    assert_close(ggn, np.einsum("ncp,ncd,ndp->p", jac, softmax_hessian(f), jac))
    assert_close(covariance, np.einsum("ncp,p,ndp->ncd", jac, flat(weights), jac))


@pytest.mark.parametrize("name", NAMES)
def test_rule_is_used(name):
    model, _, _ = build(name)
    records = explain(model)
    assert not records.fallback
    assert [r.rule for r in records if r.layer == model.layers[2].name] == [CASES[name][2]]


@pytest.mark.parametrize("name", NAMES)
def test_rule_matches_fallback(name, monkeypatch):
    if name in FALLBACK_FAILS:
        pytest.skip("the fallback fails here: no grouped filter gradient under pfor on CPU")
    model, x, y = build(name)
    weights = _weights(model)
    fast = _fits(model, x, y, weights)
    monkeypatch.setattr(structured, "_STEPS", weakref.WeakKeyDictionary())
    with registry.rules_disabled():
        assert all(r.rule == "fallback" for r in explain(model))
        slow = _fits(model, x, y, weights)
    for got, expected in zip(fast, slow, strict=True):
        assert_close(got, expected)


NEW_FACTOR_CASES = (
    "conv2d_grouped", "conv3d_grouped", "depthwise2d", "depthwise2d_strided", "separable1d",
    "conv2d_transpose", "conv2d_per_channel", "conv2d_per_channel_dilated",
    "conv3d_transpose", "einsum_dense", "einsum_dense_reduce",
)  # fmt: skip


@pytest.mark.parametrize("name", NEW_FACTOR_CASES)
def test_dense_grads_agree_with_the_reductions(name):
    """``dense_grads`` (for reducers) gives the gradients the factor's own sums use."""
    model, x, _ = build(name)
    layer = model.layers[2]
    rng = np.random.default_rng(2)
    with tf.GradientTape(persistent=True):
        _, sites = tracing.trace(model, tf.constant(x), model.trainable_variables)
    (site,) = [s for s in sites if s.layer is layer]
    cotangents = tf.constant(rng.normal(size=(N, 2, *site.cut.shape[1:])))
    checked = 0
    for factor in site.factors(cotangents):
        if not hasattr(factor, "dense_grads"):
            continue
        (grads,) = factor.dense_grads()
        (weight,) = [rng.uniform(0.1, 2.0, size=v.shape) for v in factor.variables]
        flat_grads = np.reshape(grads.numpy(), (N, 2, -1))
        assert_close(factor.sum_squares()[0].numpy(), np.sum(grads.numpy() ** 2, axis=(0, 1)))
        expected = np.einsum("nkp,p,nlp->nkl", flat_grads, weight.ravel(), flat_grads)
        assert_close(factor.weighted_gram([tf.constant(weight)]).numpy(), expected)
        checked += 1
    assert checked


@pytest.mark.parametrize(
    "shape, kernel, strides, padding, dilation",
    [
        ((9, 8, 3), (3, 3), (2, 2), "same", (1, 1)),
        ((9, 8, 3), (2, 3), (1, 1), "valid", (1, 1)),
        ((9, 8, 3), (5, 4), (2, 2), "same", (1, 1)),  # tiles of 3 x 3, 3 x 1, 2 x 3, 2 x 1
        ((9, 3), (3,), (2,), "same", (1,)),
        ((9, 3), (7,), (1,), "same", (1,)),
        ((9, 3), (2,), (1,), "valid", (1,)),
    ],
)
def test_depthwise_backward_filter_equals_the_patch_products(
    shape, kernel, strides, padding, dilation, monkeypatch
):
    """The folded backward-filter convolution of :class:`DepthwisePatches` against the
    unfolded patch products (themselves checked against dense Jacobians above), with
    kernels cut into tiles, examples chunked and columns in blocks (a tiny
    :data:`layers.GRADIENT_ENTRIES`); the GLM Gram the same way."""
    from laplace_tf.curvature import conv_rules, layers

    window = conv_rules.Window(kernel, strides, dilation, padding)
    assert conv_rules.DepthwisePatches.applies(window)
    multiplier, columns, count = 2, 3, 7
    layer = (L.DepthwiseConv2D if len(kernel) == 2 else L.DepthwiseConv1D)(
        kernel, strides=strides, padding=padding, depth_multiplier=multiplier
    )
    rng = np.random.default_rng(3)
    x = tf.constant(rng.normal(size=(count, *shape)))
    out = layer(x)
    delta = tf.constant(rng.normal(size=(count, columns, *out.shape[1:])))
    factor = conv_rules._depthwise_kernel_factor(layer.kernel, x, delta, window)
    assert isinstance(factor, conv_rules.DepthwisePatches)
    expected = conv_rules._unfolded_depthwise(layer.kernel, x, delta, window).sum_squares()
    size = layer.kernel.shape.num_elements()
    for entries in (2**24, 2 * size, size):  # all at once; two examples, one column at a time
        monkeypatch.setattr(layers, "GRADIENT_ENTRIES", entries)
        assert_close(factor.sum_squares()[0].numpy(), expected[0].numpy())
    weights = [tf.constant(rng.uniform(0.1, 2.0, size=layer.kernel.shape))]
    unfolded = conv_rules._unfolded_depthwise(layer.kernel, x, delta, window)
    assert_close(factor.weighted_gram(weights).numpy(), unfolded.weighted_gram(weights).numpy())


@pytest.mark.parametrize(
    "name, factor_class",
    [
        ("conv2d_per_channel", "DepthwisePatches"),
        ("conv1d_per_channel_strided", "DepthwisePatches"),
        ("conv2d_per_channel_dilated", "GroupedPatches"),  # TF's depthwise kernel: no dilation
        ("conv1d_per_channel_causal", "GroupedPatches"),
        ("conv2d_grouped", "GroupedPatches"),  # two channels a group
    ],
)
def test_one_group_per_channel_is_computed_as_depthwise(name, factor_class):
    """A grouped convolution with one group per input channel (ConvNeXt's depthwise
    ``Conv2D(groups=C)``): the rule's forward equals the layer's own (which Keras runs
    through XLA on the CPU) and its kernel takes the depthwise factor where TF's kernel
    applies (its numbers: the cases above, against dense Jacobians)."""
    from laplace_tf.curvature import conv_rules

    model, x, _ = build(name)
    layer = model.layers[2]
    inputs = model.layers[1](tf.constant(x))
    z, outputs = conv_rules._conv_forward(layer, inputs)
    assert_close(outputs.numpy(), layer(inputs).numpy())
    delta = tf.ones([N, 2, *z.shape[1:]], z.dtype)
    kernel_factor = conv_rules._conv_factors(layer, inputs, delta)[0]
    assert type(kernel_factor).__name__ == factor_class


def test_channels_first_is_left_to_the_fallback():
    inp = keras.Input((2, 5, 5))
    layer = L.DepthwiseConv2D(2, data_format="channels_first")
    model = keras.Model(inp, L.Dense(CLASSES)(L.Flatten()(layer(inp))))
    (record, _) = explain(model)
    assert record.rule == "fallback" and record.factors == ("PerExample",)


# ---------------------------------------------------------------------------------------
# The registry
# ---------------------------------------------------------------------------------------


class Scale(L.Layer):
    """``y = x * w`` per feature: a custom layer with no built-in rule."""

    def build(self, input_shape):
        self.w = self.add_weight(shape=(input_shape[-1],), initializer="ones", name="w")

    def call(self, x):
        return x * self.w


def _scale_forward(layer, inputs):
    z = inputs * layer.w
    return z, z


def _scale_factors(layer, inputs, cotangents):
    product = tf.cast(inputs, cotangents.dtype)[:, None] * cotangents  # [N, K, ..., D]
    return [Explicit(layer.w, bias_grads(product, layer.w.shape, layer.w.shape))]


SCALE_RULE = Rule(_scale_forward, _scale_factors, name="Scale rule")


@pytest.fixture
def scale_rule():
    rule = register_rule(Scale, SCALE_RULE, piecewise_linear=True)
    yield rule
    unregister_rule(Scale, rule)
    registry.register_piecewise_linear(Scale, False)


def _scale_model(activation="tanh"):
    inp = keras.Input((3, 4))
    hidden = Scale()(L.Dense(4, activation=activation)(inp))
    model = keras.Model(inp, L.Dense(CLASSES)(L.Flatten()(hidden)))
    rng = np.random.default_rng(4)
    for v in model.weights:
        v.assign(rng.normal(0.0, 0.6, size=v.shape))
    return model, rng.normal(size=(N, 3, 4)), rng.integers(0, CLASSES, size=N)


def test_custom_rule_is_used_and_exact(scale_rule):
    model, x, y = _scale_model()
    assert [r.rule for r in explain(model)] == ["Dense", "Scale rule", "Dense"]
    weights = _weights(model)
    ggn, covariance = _fits(model, x, y, weights)
    f, jac = dense_jacobian(model, x)
    assert_close(ggn, np.einsum("ncp,ncd,ndp->p", jac, softmax_hessian(f), jac))
    assert_close(covariance, np.einsum("ncp,p,ndp->ncd", jac, flat(weights), jac))


def test_a_rule_whose_forward_saves_tensors_gets_them_in_its_factors():
    """``forward`` may return ``(cut, outputs, saved)``: ``factors`` then reads ``saved``
    in place of the layer's inputs (here the inputs doubled, undone in the factors)."""
    seen = []

    def forward(layer, inputs):
        z = inputs * layer.w
        return z, z, {"doubled": 2.0 * inputs}

    def factors(layer, saved, cotangents):
        seen.append(sorted(saved))
        return _scale_factors(layer, saved["doubled"] / 2.0, cotangents)

    rule = register_rule(Scale, Rule(forward, factors, name="saving"), piecewise_linear=True)
    try:
        model, x, y = _scale_model()
        weights = _weights(model)
        ggn, covariance = _fits(model, x, y, weights)
    finally:
        unregister_rule(Scale, rule)
        registry.register_piecewise_linear(Scale, False)
    assert seen and all(keys == ["doubled"] for keys in seen)
    f, jac = dense_jacobian(model, x)
    assert_close(ggn, np.einsum("ncp,ncd,ndp->p", jac, softmax_hessian(f), jac))
    assert_close(covariance, np.einsum("ncp,p,ndp->ncd", jac, flat(weights), jac))


def test_a_rule_whose_forward_returns_something_else_is_refused_by_name():
    def forward(layer, inputs):
        z = inputs * layer.w
        return z, z, z, z

    rule = register_rule(Scale, Rule(forward, _scale_factors, name="four values"))
    try:
        model, x, y = _scale_model()
        with pytest.raises(TypeError, match="'four values'.*got tuple of 4 values"):
            explain(model)
    finally:
        unregister_rule(Scale, rule)


def test_without_a_rule_the_custom_layer_takes_the_fallback():
    model, _, _ = _scale_model()
    records = explain(model)
    assert [r.layer_class for r in records.fallback] == ["Scale"]
    assert records.fallback[0].factors == ("PerExample",)


def test_user_rules_take_precedence_and_applies_passes_on():
    dense = registry.rule_for(L.Dense(2))
    user = register_rule(L.Dense, Rule(dense.forward, dense.factors, name="mine"))
    refusing = register_rule(L.Dense, Rule(dense.forward, dense.factors, lambda _: False))
    try:
        assert registry.rule_for(L.Dense(2)) is user  # the refusing one passes it on
        assert registry.rule_for(L.Conv2D(2, 2)) is not user  # exact types only
        model, _, _ = build("dense_rank3")
        assert {r.rule for r in explain(model)} == {"mine"}
    finally:
        unregister_rule(L.Dense, user)
        unregister_rule(L.Dense, refusing)
    assert registry.rule_for(L.Dense(2)) is dense


def test_register_rule_checks_its_arguments():
    with pytest.raises(TypeError, match="Layer subclass"):
        register_rule(int, SCALE_RULE)
    with pytest.raises(TypeError, match="Rule"):
        register_rule(Scale, lambda layer: None)
    with pytest.raises(ValueError, match="not a registered rule"):
        unregister_rule(Scale, SCALE_RULE)


def test_piecewise_linear_flag_lives_in_the_registry(scale_rule):
    model, _, _ = _scale_model(activation="relu")
    assert is_piecewise_linear(model)
    registry.register_piecewise_linear(Scale, False)
    assert not is_piecewise_linear(model)


@pytest.mark.parametrize(
    ("shape", "layer", "expected"),
    [
        ((3, 3, 3, 2), lambda: L.Conv3D(2, 2, activation="relu"), True),
        ((4, 4, 2), lambda: L.DepthwiseConv2D(2, activation="relu"), True),
        ((4, 4, 2), lambda: L.SeparableConv2D(2, 2), True),
        ((4, 2), lambda: L.Conv1DTranspose(2, 2, activation="relu6"), True),
        ((4, 4, 2), lambda: L.Conv2DTranspose(2, 2, activation="tanh"), False),
        ((4, 4, 2), lambda: L.GroupNormalization(2), False),
        ((4, 4, 2), lambda: L.LayerNormalization(), False),
        ((4, 4, 2), lambda: L.BatchNormalization(), True),
        ((4, 4, 2), lambda: LayerScale(0.5, 2), True),
    ],
)  # fmt: skip
def test_is_piecewise_linear_for_the_new_layers(shape, layer, expected):
    inp = keras.Input(shape)
    hidden = layer()(L.Dense(2, activation="relu")(inp))
    model = keras.Model(inp, L.Dense(CLASSES)(L.Flatten()(hidden)))
    assert is_piecewise_linear(model) is expected
    with registry.rules_disabled():  # the flag does not depend on a rule being there
        assert is_piecewise_linear(model) is expected


# ---------------------------------------------------------------------------------------
# explain
# ---------------------------------------------------------------------------------------


def test_explain_records_and_table():
    model, _, _ = _scale_model()
    records = explain(model)
    assert [(r.layer_class, r.rule) for r in records] == [
        ("Dense", "Dense"), ("Scale", "fallback"), ("Dense", "Dense"),
    ]  # fmt: skip
    dense = records[0]
    assert dense.weights == tuple(v.path for v in model.layers[1].trainable_variables)
    assert dense.size == 4 * 4 + 4 and dense.factors == ("Patches", "Explicit")
    assert sum(r.cost for r in records) == pytest.approx(1.0)
    assert records[1].cost > records[0].cost  # 4 weights on the fallback outweigh 20
    table = str(records)
    assert table.splitlines()[0].split() == [
        "layer", "class", "weights", "size", "rule", "factors", "cost",
    ]  # fmt: skip
    assert "1 layer(s) take the per-example fallback" in table


def test_explain_params_subset_and_untraceable_models():
    model, _, _ = _scale_model()
    head = model.layers[-1]
    (record,) = explain(model, params=[head.kernel])
    assert record.weights == (head.kernel.path,) and record.rule == "Dense"

    class Subclassed(keras.Model):
        def __init__(self):
            super().__init__()
            self.head = L.Dense(CLASSES)

        def call(self, x):
            return self.head(x)

    subclassed = Subclassed()
    subclassed(np.zeros((1, 4)))
    (record,) = explain(subclassed)
    assert record.rule == "fallback" and record.size == 4 * CLASSES + CLASSES
    assert record.layer_class == "Subclassed" and record.cost == 1.0

    inp = keras.Input((4,))
    shared = L.Dense(4, activation="tanh")
    twice = keras.Model(inp, L.Dense(CLASSES)(shared(shared(inp))))
    (record,) = explain(twice)  # a layer called twice: the whole-model fallback
    assert record.rule == "fallback" and record.layer_class == "Functional"

    two = keras.Model(inp, [L.Dense(CLASSES)(inp), L.Dense(2)(inp)])
    (record,) = explain(two)  # several outputs: the whole-model fallback
    assert record.rule == "fallback" and record.size == 4 * CLASSES + CLASSES + 4 * 2 + 2


def test_explain_refuses_what_diagonal_refuses():
    model, _, _ = _scale_model()
    with pytest.raises(ValueError, match="params"):
        explain(model, params=[tf.Variable(np.zeros(3))])
