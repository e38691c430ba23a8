"""Validation of ``laplace_tf.curvature.reducers`` and ``glm`` against dense float64 oracles.

Oracles never use the library's factors: per-example Jacobians from
``tf.GradientTape.jacobian`` (no ``pfor``), output Hessians written out by hand, layer
inputs from Keras sub-models, cotangents ``delta`` from the Jacobian in the layer's bias
(``d f / d b = sum_l d f / d z_l``), unfolded conv patches from the Jacobian of the
pre-activation in the kernel (``d z[n, l, o] / d K[q, o] = p[n, l, q]``).
"""

from __future__ import annotations

import keras
import numpy as np
import pytest
import tensorflow as tf

from laplace_tf.curvature import glm, reducers

L = keras.layers
N = 9
RTOL = 1e-10


pytestmark = pytest.mark.usefixtures("float64")  # conftest.py: float64 layers


# -- models and oracles ------------------------------------------------------------------------


def mlp(width=3, seed=0):
    keras.utils.set_random_seed(seed)
    inputs = keras.Input((4,))
    hidden = L.Dense(5, activation="tanh", name="hidden")(inputs)
    normed = L.LayerNormalization(name="norm")(hidden)
    return keras.Model(inputs, L.Dense(width, name="head")(normed))


def cnn(width=3, seed=0):
    keras.utils.set_random_seed(seed)
    inputs = keras.Input((6, 6, 2))
    z = L.Conv2D(3, 3, strides=2, padding="same", name="conv")(inputs)
    h = L.Flatten()(L.Activation("tanh")(z))
    return keras.Model(inputs, L.Dense(width, name="head")(h))


def data(model, likelihood, seed=1):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(N, *model.input_shape[1:]))
    width = model.output_shape[-1]
    if likelihood == "classification":
        return x, rng.integers(0, width, N)
    return x, rng.normal(size=(N, width))


def jacobian(model, x, variables):
    """Outputs ``[N, C]`` and per-example Jacobians ``[N, C, P]`` in ``variables``."""
    with tf.GradientTape(persistent=True) as tape:
        f = model(tf.constant(x), training=False)
    blocks = tape.jacobian(f, [v.value for v in variables], experimental_use_pfor=False)
    n, c = f.shape
    return f.numpy(), np.concatenate([np.reshape(b.numpy(), (n, c, -1)) for b in blocks], -1)


def output_factor(likelihood, f):
    """``S_n`` with ``S_n S_n^T`` the output Hessian, written out by hand."""
    if likelihood == "classification":
        p = np.exp(f - f.max(-1, keepdims=True))
        p /= p.sum(-1, keepdims=True)
        return np.stack([np.diag(np.sqrt(q)) - np.outer(q, np.sqrt(q)) for q in p])
    return np.broadcast_to(np.eye(f.shape[1]), (len(f), f.shape[1], f.shape[1]))


def dense_ggn(model, x, likelihood, variables):
    f, jac = jacobian(model, x, variables)
    s = output_factor(likelihood, f)
    return np.einsum("ncp,nck,ndk,ndq->pq", jac, s, s, jac)


def layer_input(model, name, x):
    layer = model.get_layer(name)
    return keras.Model(model.input, layer.input)(x).numpy()


def reference_b(model, name, x, likelihood):
    """``sum_n sum_k delta_nk delta_nk^T`` with ``delta_nk = J_bias(x_n)^T S_n[:, k]``."""
    f, jac = jacobian(model, x, [model.get_layer(name).bias])
    deltas = np.einsum("ncj,nck->nkj", jac, output_factor(likelihood, f))
    return np.einsum("nki,nkj->ij", deltas, deltas)


def reference_conv_a(model, x):
    """``(1/N) sum_n sum_l p_nl p_nl^T`` with patches read off a Jacobian of ``z``."""
    conv = model.get_layer("conv")  # linear: its output is the pre-activation z
    with tf.GradientTape(persistent=True) as tape:
        z = conv(tf.constant(x))
    jac = tape.jacobian(z, conv.kernel.value, experimental_use_pfor=False)
    patches = jac[..., 0, :, :, :, 0].numpy().reshape(len(x), -1, np.prod(conv.kernel.shape[:-1]))
    return np.einsum("nlq,nlr->qr", patches, patches) / len(x)


def assert_close(got, expected, rtol=RTOL):
    got, expected = np.asarray(got), np.asarray(expected)
    assert got.shape == expected.shape, (got.shape, expected.shape)
    scale = np.abs(expected).max()
    assert scale > 0
    assert np.abs(got - expected).max() <= rtol * scale


def indices(model, variables, name):
    """Positions of ``name``'s weights in the flattened ``variables``."""
    start, result = 0, []
    for v in variables:
        size = int(np.prod(v.shape))
        if v.path.split("/")[-2] == name:
            result.extend(range(start, start + size))
        start += size
    return np.array(result)


# -- Kronecker factors -----------------------------------------------------------------------


@pytest.mark.parametrize("likelihood", ["classification", "regression"])
def test_dense_kronecker_factors_match_dense_references(likelihood):
    model = mlp()
    x, y = data(model, likelihood)
    fit = reducers.fit_kron(model, (x, y), likelihood=likelihood, batch_size=4)
    kinds = [type(b).__name__ for b in fit.curvature]
    assert kinds == [
        "KroneckerBlock",
        "DenseBlock",
        "DiagonalBlock",
        "DiagonalBlock",
        "KroneckerBlock",
        "DenseBlock",
    ]
    for name, (kernel, bias) in {"hidden": (0, 1), "head": (4, 5)}.items():
        a = layer_input(model, name, x)
        assert_close(fit.curvature[kernel].inputs, a.T @ a / N)
        b = reference_b(model, name, x, likelihood)
        assert_close(fit.curvature[kernel].outputs, b)
        assert_close(fit.curvature[bias].matrix, b)
    ggn = dense_ggn(model, x, likelihood, model.trainable_variables)
    for position in (2, 3):  # the LayerNormalization scale and offset: the GGN diagonal
        where = indices(model, model.trainable_variables, "norm")
        size = int(np.prod(model.trainable_variables[2].shape))
        part = where[:size] if position == 2 else where[size:]
        assert_close(fit.curvature[position].diagonal, np.diag(ggn)[part])
    assert fit.n_data == N and fit.n_outputs == 3


def test_conv_kronecker_factors_match_dense_references():
    model = cnn()
    x, y = data(model, "classification")
    fit = reducers.fit_kron(model, (x, y), likelihood="classification", batch_size=5)
    kernel, bias = fit.curvature[0], fit.curvature[1]
    assert_close(kernel.inputs, reference_conv_a(model, x))
    b = reference_b(model, "conv", x, "classification")  # of sum_l delta_l: the bias GGN
    assert_close(kernel.outputs, b)
    assert_close(bias.matrix, b)
    conv_bias = model.get_layer("conv").bias
    assert_close(bias.matrix, dense_ggn(model, x, "classification", [conv_bias]))


def test_kronecker_product_is_exact_for_one_example_dense_layer():
    """With one example, ``A (x) B`` is the exact kernel GGN block (no averaging gap)."""
    model = mlp()
    x, y = data(model, "classification")
    x, y = x[:1], y[:1]
    fit = reducers.fit_kron(model, (x, y), likelihood="classification")
    head = model.get_layer("head").kernel
    block = fit.curvature[4]
    assert_close(
        np.kron(block.inputs, block.outputs), dense_ggn(model, x, "classification", [head])
    )


# -- full Gram -------------------------------------------------------------------------------


@pytest.mark.parametrize("factory", [mlp, cnn])
@pytest.mark.parametrize("likelihood", ["classification", "regression"])
def test_full_gram_matches_dense_ggn(factory, likelihood):
    model = factory()
    x, y = data(model, likelihood)
    fit = reducers.fit_full(model, (x, y), likelihood=likelihood, batch_size=4)
    assert_close(fit.curvature, dense_ggn(model, x, likelihood, model.trainable_variables))


def test_full_empirical_fisher_matches_dense_gradients():
    model = mlp()
    x, y = data(model, "classification")
    fit = reducers.fit_full(model, (x, y), likelihood="classification", kind="ef")
    f, jac = jacobian(model, x, model.trainable_variables)
    p = np.exp(f) / np.exp(f).sum(-1, keepdims=True)
    grads = np.einsum("ncp,nc->np", jac, p - np.eye(3)[y])
    assert_close(fit.curvature, grads.T @ grads)


@pytest.mark.parametrize("entries", [1, 120])
def test_full_gram_in_column_chunks_and_output_slices(monkeypatch, entries):
    """A small gradient budget processes one column of S at a time, and the Dense-kernel
    pairs in slices of their outputs (120) or as dense gradients (1): same Gram."""
    model = mlp()
    x, y = data(model, "classification")
    expected = reducers.fit_full(model, (x, y), likelihood="classification").curvature
    monkeypatch.setattr(reducers, "FULL_GRADIENT_ENTRIES", entries)
    got = reducers.fit_full(model, (x, y), likelihood="classification", batch_size=3).curvature
    assert_close(got, expected)


def test_subset_gram_is_the_submatrix():
    model = mlp()
    x, y = data(model, "classification")
    head = [model.get_layer("head").kernel, model.get_layer("head").bias]
    everything = reducers.fit_full(model, (x, y), likelihood="classification").curvature
    last = reducers.fit_full(model, (x, y), likelihood="classification", params=head).curvature
    where = indices(model, model.trainable_variables, "head")
    assert_close(last, np.asarray(everything)[np.ix_(where, where)])


def test_full_gram_of_weights_out_of_layer_order():
    """A bias before its kernel, or apart from it, is its own item: same Gram as the
    dense GGN in that order."""
    model = mlp()
    x, y = data(model, "classification")
    hidden, head = model.get_layer("hidden"), model.get_layer("head")
    params = [head.bias, hidden.kernel, head.kernel, hidden.bias]
    got = reducers.fit_full(model, (x, y), likelihood="classification", params=params)
    assert_close(got.curvature, dense_ggn(model, x, "classification", params))


def test_hessian_kind_needs_a_piecewise_linear_model():
    model = mlp()
    with pytest.raises(ValueError, match="piecewise-linear"):
        reducers.fit_kron(
            model, data(model, "classification"), likelihood="classification", kind="hessian"
        )


# -- GLM output covariance -------------------------------------------------------------------


def random_orthogonal(rng, size):
    return np.linalg.qr(rng.normal(size=(size, size)))[0]


def test_kron_output_covariance_matches_dense_covariance():
    """Each block's covariance built as a dense matrix, ``J Sigma J^T`` from Jacobians."""
    model = cnn()
    x, _ = data(model, "classification")
    rng = np.random.default_rng(3)
    covariances, dense = [], []
    for v in model.trainable_variables:
        shape = tuple(v.shape)
        if len(shape) > 1:
            inputs, outputs = int(np.prod(shape[:-1])), shape[-1]
            q_a, q_b = random_orthogonal(rng, inputs), random_orthogonal(rng, outputs)
            w = rng.uniform(0.1, 1.0, size=(inputs, outputs))
            covariances.append(glm.KroneckerEigen(q_a, q_b, w))
            basis = np.kron(q_a, q_b)
            dense.append(basis @ np.diag(w.ravel()) @ basis.T)
        else:
            q, w = random_orthogonal(rng, shape[0]), rng.uniform(0.1, 1.0, size=shape)
            covariances.append(glm.DenseEigen(q, w))
            dense.append(q @ np.diag(w) @ q.T)
    f, cov = glm.kron_glm_moments(model, x, covariances, batch_size=4)
    f_ref, jac = jacobian(model, x, model.trainable_variables)
    sigma = block_diagonal(dense)
    assert_close(f, f_ref)
    assert_close(cov, np.einsum("ncp,pq,ndq->ncd", jac, sigma, jac))


def test_kron_output_covariance_with_diagonal_blocks():
    model = mlp()
    x, _ = data(model, "classification")
    rng = np.random.default_rng(4)
    weights = [rng.uniform(0.1, 1.0, size=tuple(v.shape)) for v in model.trainable_variables]
    covariances = [glm.DiagonalWeights(w) for w in weights]
    _, cov = glm.kron_glm_moments(model, x, covariances)
    _, jac = jacobian(model, x, model.trainable_variables)
    w = np.concatenate([w.ravel() for w in weights])
    assert_close(cov, np.einsum("ncp,p,ndp->ncd", jac, w, jac))


def test_kron_output_covariance_with_a_bias_sharing_its_kernels_basis():
    """A Dense bias whose basis is its kernel's ``Q_B`` (as when its block is ``B``) is
    folded into the kernel's projection: same covariance as the dense matrices."""
    model = mlp()
    x, _ = data(model, "classification")
    rng = np.random.default_rng(6)
    covariances, dense = [], []
    variables = model.trainable_variables
    for position, v in enumerate(variables):
        shape = tuple(v.shape)
        if len(shape) > 1:
            inputs, outputs = shape
            q_a, q_b = random_orthogonal(rng, inputs), random_orthogonal(rng, outputs)
            w = rng.uniform(0.1, 1.0, size=shape)
            covariances.append(glm.KroneckerEigen(q_a, q_b, w))
            basis = np.kron(q_a, q_b)
            dense.append(basis @ np.diag(w.ravel()) @ basis.T)
        elif position > 0 and isinstance(covariances[-1], glm.KroneckerEigen):
            q, w = covariances[-1].outputs_basis.copy(), rng.uniform(0.1, 1.0, size=shape)
            covariances.append(glm.DenseEigen(q, w))
            dense.append(q @ np.diag(w) @ q.T)
        else:
            w = rng.uniform(0.1, 1.0, size=shape)
            covariances.append(glm.DiagonalWeights(w))
            dense.append(np.diag(w))
    assert glm._shared_bases(covariances) == {0: 1, 4: 5}
    _, cov = glm.kron_glm_moments(model, x, covariances, batch_size=4)
    _, jac = jacobian(model, x, variables)
    assert_close(cov, np.einsum("ncp,pq,ndq->ncd", jac, block_diagonal(dense), jac))


def test_full_output_covariance_matches_dense_covariance():
    model = cnn()
    x, _ = data(model, "classification")
    rng = np.random.default_rng(5)
    size = sum(int(np.prod(v.shape)) for v in model.trainable_variables)
    root = rng.normal(size=(size, size))
    precision = root @ root.T + size * np.eye(size)
    _, cov = glm.full_glm_moments(model, x, np.linalg.cholesky(precision), batch_size=4)
    _, jac = jacobian(model, x, model.trainable_variables)
    assert_close(cov, np.einsum("ncp,pq,ndq->ncd", jac, np.linalg.inv(precision), jac))


def block_diagonal(blocks):
    size = sum(len(b) for b in blocks)
    result, start = np.zeros((size, size)), 0
    for b in blocks:
        result[start : start + len(b), start : start + len(b)] = b
        start += len(b)
    return result


def test_dense_on_sequences_is_factored_like_a_convolution():
    """Positions play the conv locations: ``A = (1/N) sum_n sum_t a_nt a_nt^T`` and ``B``
    of ``sum_t delta_nkt``, which is the bias GGN."""
    keras.utils.set_random_seed(0)
    inputs = keras.Input((4, 3))
    hidden = L.Dense(5, activation="tanh", name="tokens")(inputs)
    model = keras.Model(inputs, L.Dense(3, name="head")(L.Flatten()(hidden)))
    rng = np.random.default_rng(2)
    x, y = rng.normal(size=(N, 4, 3)), rng.integers(0, 3, N)
    fit = reducers.fit_kron(model, (x, y), likelihood="classification")
    block = fit.curvature[0]
    assert isinstance(block, reducers.KroneckerBlock)
    assert_close(block.inputs, np.einsum("nti,ntj->ij", x, x) / N)
    b = reference_b(model, "tokens", x, "classification")
    assert_close(block.outputs, b)
    assert_close(fit.curvature[1].matrix, b)


def test_full_hessian_of_a_tanh_model_is_the_dense_hessian():
    """Not piecewise linear: the exact Hessian (from nested tapes here, without pfor)."""
    model = mlp()
    x, y = data(model, "classification")
    fit = reducers.fit_full(model, (x, y), likelihood="classification", kind="hessian")
    sources = [v.value for v in model.trainable_variables]
    with tf.GradientTape(persistent=True) as outer:
        with tf.GradientTape() as inner:
            f = model(tf.constant(x), training=False)
            nll = tf.reduce_sum(tf.nn.sparse_softmax_cross_entropy_with_logits(y, f))
        flat = tf.concat([tf.reshape(g, [-1]) for g in inner.gradient(nll, sources)], 0)
    rows = outer.jacobian(flat, sources, experimental_use_pfor=False)
    hessian = np.concatenate([np.reshape(r.numpy(), (len(flat), -1)) for r in rows], axis=1)
    assert_close(fit.curvature, hessian)
    ggn = dense_ggn(model, x, "classification", model.trainable_variables)
    assert np.abs(hessian - ggn).max() > 1e-3 * np.abs(ggn).max()
