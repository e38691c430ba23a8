"""The recurrent rules (SimpleRNN, GRU, LSTM) against dense per-example Jacobians, the
generic fallback and Keras' own forward pass; masks, ``go_backwards`` and the cases the
rule leaves to the fallback.
"""

from __future__ import annotations

import warnings
import weakref

import keras
import numpy as np
import pytest
import tensorflow as tf
from keras.src.backend import set_keras_mask
from oracles import assert_close, dense_jacobian, flat, softmax_hessian

from laplace_tf.curvature import (
    FallbackWarning,
    diagonal,
    explain,
    output_covariance,
    recurrent_rules,
    registry,
    structured,
    tracing,
)

L = keras.layers
N, T, FEATURES, CLASSES = 5, 4, 2, 3
RULE = "Recurrent patches"
BIDIRECTIONAL_RULE = "Bidirectional recurrent patches"


pytestmark = pytest.mark.usefixtures("float64")  # conftest.py: float64 layers


#: name -> layer factory
CASES = {
    "simple_rnn": lambda: L.SimpleRNN(3),
    "simple_rnn_sequences_backwards_relu": lambda: L.SimpleRNN(3, activation="relu", return_sequences=True, go_backwards=True),  # noqa: E501
    "simple_rnn_no_bias": lambda: L.SimpleRNN(3, use_bias=False),
    "lstm": lambda: L.LSTM(3),
    "lstm_sequences": lambda: L.LSTM(3, return_sequences=True, unit_forget_bias=False, activation="softsign"),  # noqa: E501
    "lstm_backwards_no_bias": lambda: L.LSTM(3, go_backwards=True, use_bias=False, recurrent_activation="hard_sigmoid"),  # noqa: E501
    "gru": lambda: L.GRU(3),
    "gru_sequences_backwards": lambda: L.GRU(3, return_sequences=True, go_backwards=True),
    "gru_no_bias": lambda: L.GRU(3, use_bias=False),
    "gru_reset_before": lambda: L.GRU(3, reset_after=False),
    "gru_reset_before_sequences": lambda: L.GRU(3, reset_after=False, return_sequences=True, activation="relu"),  # noqa: E501
    "gru_reset_before_backwards_no_bias": lambda: L.GRU(3, reset_after=False, go_backwards=True, use_bias=False),  # noqa: E501
    "bidirectional_lstm": lambda: L.Bidirectional(L.LSTM(3)),
    "bidirectional_gru_sequences_sum": lambda: L.Bidirectional(L.GRU(3, return_sequences=True), merge_mode="sum"),  # noqa: E501
    "bidirectional_simple_rnn_sequences_ave": lambda: L.Bidirectional(L.SimpleRNN(2, return_sequences=True), merge_mode="ave"),  # noqa: E501
    "bidirectional_lstm_gru_mul": lambda: L.Bidirectional(L.LSTM(3), backward_layer=L.GRU(3, reset_after=False, go_backwards=True), merge_mode="mul"),  # noqa: E501
}  # fmt: skip
NAMES = sorted(CASES)
#: Variants whose dense-Jacobian check is long; ``make test-slow`` (and CI) runs them,
#: the default run keeps one case per layer type and merge path.
SLOW_NAMES = {
    "bidirectional_gru_sequences_sum", "bidirectional_lstm_gru_mul",
    "bidirectional_simple_rnn_sequences_ave",
}  # fmt: skip
#: One per layer type and GRU variant: the fallback is slow through a recurrence, so
#: only the first runs by default and the others are marked slow.
FALLBACK_NAMES = [
    "simple_rnn_sequences_backwards_relu", "lstm", "gru", "gru_reset_before",
    "bidirectional_lstm_gru_mul",
]  # fmt: skip


def _marked(names, slow):
    return [pytest.param(n, marks=pytest.mark.slow) if n in slow else n for n in names]


def _randomise(model, seed):
    rng = np.random.default_rng(seed)
    for v in model.weights:
        v.assign(rng.normal(0.0, 0.6, size=v.shape))


def build(name, *, seed=0, steps=T):
    """``(model, x, y)``: ``inputs -> tanh(Dense) -> layer -> Flatten -> Dense(3)``."""
    inp = keras.Input((steps, FEATURES))
    hidden = L.Dense(FEATURES, activation="tanh")(inp)
    model = keras.Model(inp, L.Dense(CLASSES)(L.Flatten()(CASES[name]()(hidden))))
    _randomise(model, seed)
    rng = np.random.default_rng(seed + 1)
    return model, rng.normal(size=(N, steps, FEATURES)), rng.integers(0, CLASSES, size=N)


def _weights(model, seed=1):
    rng = np.random.default_rng(seed)
    return [rng.uniform(0.1, 2.0, size=v.shape) for v in model.trainable_variables]


def _fits(model, x, y, weights):
    ggn = flat(diagonal(model, (x, y), likelihood="classification", batch_size=3))
    return ggn, output_covariance(model, x, weights, batch_size=3).numpy()


@pytest.mark.parametrize("name", _marked(NAMES, SLOW_NAMES))
def test_rule_matches_dense_jacobians(name):
    model, x, y = build(name)
    weights = _weights(model)
    ggn, covariance = _fits(model, x, y, weights)
    f, jac = dense_jacobian(model, x)
    assert_close(ggn, np.einsum("ncp,ncd,ndp->p", jac, softmax_hessian(f), jac))
    assert_close(covariance, np.einsum("ncp,p,ndp->ncd", jac, flat(weights), jac))


@pytest.mark.parametrize("name", NAMES)
def test_rule_is_used_and_its_forward_is_keras(name):
    model, x, _ = build(name)
    records = explain(model)
    assert not records.fallback
    rule = BIDIRECTIONAL_RULE if name.startswith("bidirectional") else RULE
    assert [r.rule for r in records if r.layer == model.layers[2].name] == [rule]
    with tf.GradientTape():
        traced, _ = tracing.trace(model, tf.constant(x), model.trainable_variables)
    assert_close(traced.numpy(), model(x, training=False).numpy(), rtol=1e-13)


@pytest.mark.filterwarnings("ignore::laplace_tf.curvature.FallbackWarning")
@pytest.mark.parametrize("name", _marked(FALLBACK_NAMES, set(FALLBACK_NAMES[1:])))
def test_rule_matches_fallback(name, monkeypatch):
    model, x, y = build(name)
    weights = _weights(model)
    fast = _fits(model, x, y, weights)
    monkeypatch.setattr(structured, "_STEPS", weakref.WeakKeyDictionary())
    with registry.rules_disabled():
        assert all(r.rule == "fallback" for r in explain(model))
        slow = _fits(model, x, y, weights)
    for got, expected in zip(fast, slow, strict=True):
        assert_close(got, expected)


# ---------------------------------------------------------------------------------------
# Masks: the rule's own forward and factors on masked inputs
# ---------------------------------------------------------------------------------------

MASKED = {
    "simple_rnn_backwards": lambda: L.SimpleRNN(3, go_backwards=True),
    "lstm_sequences": lambda: L.LSTM(3, return_sequences=True),
    "lstm_zero_output": lambda: L.LSTM(3, return_sequences=True, zero_output_for_mask=True),
    "gru": lambda: L.GRU(3),
    "gru_reset_before_backwards": lambda: L.GRU(3, reset_after=False, go_backwards=True),
}
#: Valid steps per example (right padding) and one step masked inside a sequence.
LENGTHS = [4, 3, 2, 4, 1]


def _masked_layer(name, steps=T):
    layer = MASKED[name]()
    layer(keras.Input((steps, FEATURES)))
    _randomise(layer, 3)
    return layer


def _mask(lengths=LENGTHS, steps=T, hole=True):
    mask = np.arange(steps)[None] < np.asarray(lengths)[:, None]
    mask[3, 1] = not hole
    return mask


def _rule_sum_squares(layer, x, mask, readout):
    """The rule's ``sum_n sum_k g^2`` for outputs read out by ``readout [K, *out]``."""
    inputs = tf.identity(tf.constant(x))
    if mask is not None:
        set_keras_mask(inputs, tf.constant(mask))
    with tf.GradientTape(persistent=True) as tape:
        cut, outputs, saved = recurrent_rules._forward(layer, inputs)
    columns = [
        tape.gradient(outputs, cut, output_gradients=tf.broadcast_to(r, tf.shape(outputs)))
        for r in readout
    ]
    factors = recurrent_rules._factors(layer, saved, tf.stack(columns, axis=1))
    squares = {id(f.variable): f.sum_squares()[0].numpy() for f in factors}
    return outputs, np.concatenate([squares[id(v)].ravel() for v in layer.trainable_variables])


def _keras_sum_squares(layer, x, mask, readout):
    """The same from per-example gradients of Keras' own layer."""
    total = 0
    for n in range(len(x)):
        for r in readout:
            with tf.GradientTape() as tape:
                kwargs = {} if mask is None else {"mask": tf.constant(mask[n : n + 1])}
                out = layer(tf.constant(x[n : n + 1]), training=False, **kwargs)
                value = tf.reduce_sum(out * r)
            total = total + flat(tape.gradient(value, layer.trainable_variables)) ** 2
    return total


def _readout(layer, seed=4):
    shape = (T, 3) if layer.return_sequences else (3,)
    return tf.constant(np.random.default_rng(seed).normal(size=(2, *shape)))


@pytest.mark.parametrize("name", sorted(MASKED))
def test_masked_forward_and_factors_are_keras(name):
    layer = _masked_layer(name)
    x = np.random.default_rng(5).normal(size=(N, T, FEATURES))
    mask = _mask()
    readout = _readout(layer)
    outputs, squares = _rule_sum_squares(layer, x, mask, readout)
    expected = layer(tf.constant(x), mask=tf.constant(mask), training=False)
    assert_close(outputs.numpy(), expected.numpy(), rtol=1e-13)
    assert_close(squares, _keras_sum_squares(layer, x, mask, readout))


@pytest.mark.parametrize("name", ["simple_rnn_backwards", "gru", "gru_reset_before_backwards"])
def test_masked_steps_contribute_nothing(name):
    """Right-padded, masked sequences give the curvature of the truncated ones."""
    layer = _masked_layer(name)
    short = _masked_layer(name, steps=2)
    short.set_weights(layer.get_weights())
    x = np.random.default_rng(6).normal(size=(N, T, FEATURES))
    padded = np.where(np.arange(T)[None, :, None] < 2, x, 99.0)
    readout = _readout(layer)
    _, masked = _rule_sum_squares(layer, padded, _mask([2] * N, hole=False), readout)
    _, truncated = _rule_sum_squares(short, x[:, :2], None, readout)
    assert_close(masked, truncated)


@pytest.mark.parametrize("wrap", [False, True], ids=["lstm", "bidirectional"])
def test_masked_layers_keep_their_rule_and_are_exact_through_the_engine(wrap):
    """Keras hands a recurrent layer its mask as an argument; the trace attaches it to
    the layer's inputs, where the rule reads it."""
    inp = keras.Input((T,), dtype="int32")
    hidden = L.Embedding(6, FEATURES, mask_zero=True)(inp)
    recurrent = L.LSTM(3, name="lstm")
    if wrap:
        recurrent = L.Bidirectional(recurrent, name="bi")
    model = keras.Model(inp, L.Dense(CLASSES)(recurrent(hidden)))
    _randomise(model, 7)
    rng = np.random.default_rng(7)
    x = rng.integers(1, 6, size=(N, T)) * _mask()
    y = rng.integers(0, CLASSES, size=N)
    assert "fallback" not in [r.rule for r in explain(model)]
    with warnings.catch_warnings():
        warnings.simplefilter("error", FallbackWarning)
        ggn = flat(diagonal(model, (x, y), likelihood="classification"))
    f, jac = dense_jacobian(model, x)
    assert_close(ggn, np.einsum("ncp,ncd,ndp->p", jac, softmax_hessian(f), jac))
    variables = model.trainable_variables
    weights = [np.random.default_rng(1).uniform(0.5, 1.5, v.shape) for v in variables]
    covariance = output_covariance(model, x, weights)
    w = np.concatenate([np.ravel(a) for a in weights])
    assert_close(covariance, np.einsum("ncp,p,ndp->ncd", jac, w, jac))


# ---------------------------------------------------------------------------------------
# What the rule leaves to the fallback
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "make, shape",
    [
        (lambda: L.RNN(L.LSTMCell(3)), (T, FEATURES)),
        (lambda: L.LSTM(3), (None, FEATURES)),
    ],
    ids=["custom_rnn", "unknown_length"],
)
def test_unsupported_layers_take_the_fallback(make, shape):
    inp = keras.Input(shape)
    model = keras.Model(inp, L.Dense(CLASSES)(make()(inp)))
    assert [r.rule for r in explain(model)] == ["fallback", "Dense"]


def test_frozen_and_stateful_layers_are_refused():
    layer = L.GRU(3)
    layer(keras.Input((T, FEATURES)))
    assert recurrent_rules._applies(layer)
    layer.cell.kernel.trainable = False
    assert not recurrent_rules._applies(layer)
    stateful = L.SimpleRNN(3, stateful=True)
    stateful(keras.Input((T, FEATURES), batch_size=2))
    assert not recurrent_rules._applies(stateful)
