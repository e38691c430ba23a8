"""Validation of the black-box Hessian diagonals against SciPy finite differences.

The oracle differentiates the (automatic) gradient once more with
``scipy.differentiate.jacobian`` (adaptive, high-order central differences), so the
second derivatives it checks never come from the code under test. Every loss here has
a Hessian whose blocks are *not* diagonal: a method that ignored the off-diagonal
structure, or returned row sums, would fail.
"""

from __future__ import annotations

import keras
import numpy as np
import pytest
import tensorflow as tf
from scipy.differentiate import jacobian

from laplace_tf.curvature import hessian_diagonal, hutchinson_diagonal

RTOL = 1e-6

# ---------------------------------------------------------------------------------------
# Oracle: full Hessian by finite differences of the gradient (SciPy)
# ---------------------------------------------------------------------------------------


def fd_hessian(loss_of, values) -> np.ndarray:
    """Hessian of ``loss_of(*params)`` at ``values`` (float64), flattened and concatenated.

    ``loss_of`` is a pure function of the parameter tensors. The gradient
    ``theta_flat -> d loss / d theta`` is computed with a ``tf.GradientTape`` on tensors
    built from ``theta_flat`` and differentiated by ``scipy.differentiate.jacobian``.
    """
    shapes = [tuple(np.shape(v)) for v in values]
    sizes = [int(np.prod(s, dtype=np.int64)) for s in shapes]
    theta0 = np.concatenate([np.ravel(np.asarray(v, dtype=np.float64)) for v in values])
    m = theta0.size

    def unflatten(theta):
        return [tf.reshape(part, s) for part, s in zip(tf.split(theta, sizes), shapes, strict=True)]

    @tf.function(input_signature=[tf.TensorSpec([None, m], tf.float64)])
    def batched_gradient(thetas):
        def gradient(theta):
            with tf.GradientTape() as tape:
                tape.watch(theta)
                loss = loss_of(*unflatten(theta))
            return tape.gradient(loss, theta, unconnected_gradients=tf.UnconnectedGradients.ZERO)

        return tf.vectorized_map(gradient, thetas)

    def grad(x: np.ndarray) -> np.ndarray:  # (m, ...) -> (m, ...), as scipy expects
        batch_shape = x.shape[1:]
        points = np.ascontiguousarray(x.reshape(m, -1).T)
        out = batched_gradient(tf.constant(points)).numpy()
        return out.T.reshape((m, *batch_shape))

    res = jacobian(grad, theta0, initial_step=0.1, tolerances={"rtol": 1e-12})
    hessian = res.df
    scale = max(1.0, float(np.abs(hessian).max()))
    # The oracle must itself be far more accurate than the tolerance it is used with.
    assert np.all(res.error <= 1e-8 * scale), float(res.error.max())
    return 0.5 * (hessian + hessian.T)


def flat(tensors) -> np.ndarray:
    return np.concatenate([np.ravel(np.asarray(t, dtype=np.float64)) for t in tensors])


def check_against(result, params, hessian: np.ndarray, rtol: float = RTOL) -> None:
    """``result`` has the shapes / dtypes of ``params`` and equals ``diag(hessian)``."""
    assert len(result) == len(params)
    for r, p in zip(result, params, strict=True):
        assert tuple(r.shape) == tuple(p.shape)
        assert r.dtype == tf.as_dtype(p.dtype)
    expected = np.diag(hessian)
    atol = 1e-10 * max(1.0, float(np.abs(expected).max()))
    np.testing.assert_allclose(flat(result), expected, rtol=rtol, atol=atol)


def assert_not_diagonal(hessian: np.ndarray) -> None:
    off = hessian - np.diag(np.diag(hessian))
    assert np.abs(off).max() > 0.1 * np.abs(np.diag(hessian)).max()


# ---------------------------------------------------------------------------------------
# Losses (pure functions of the parameters) and their fixed data
# ---------------------------------------------------------------------------------------

RNG = np.random.default_rng(20240611)


def coupled_loss(w):
    return (
        w[0] ** 3 * w[1]
        + tf.sin(w[0] * w[2])
        + tf.exp(0.3 * w[1] * w[3])
        + tf.reduce_sum(w**2) ** 2 / 8.0
    )


W_COUPLED = np.array([0.7, -1.2, 0.4, 0.9])

N_IN, N_HIDDEN, N_CLASSES, N_DATA = 3, 5, 3, 10
X_DATA = RNG.normal(size=(N_DATA, N_IN))
Y_DATA = np.eye(N_CLASSES)[RNG.integers(0, N_CLASSES, size=N_DATA)]
MLP_VALUES = [
    RNG.normal(size=(N_IN, N_HIDDEN)),
    0.1 * RNG.normal(size=(N_HIDDEN,)),
    RNG.normal(size=(N_HIDDEN, N_CLASSES)),
    0.1 * RNG.normal(size=(N_CLASSES,)),
]  # P = 15 + 5 + 15 + 3 = 38


def mlp_loss(w1, b1, w2, b2, x=X_DATA, y=Y_DATA):
    """Summed softmax cross-entropy of a two-layer tanh MLP."""
    x = tf.cast(x, w1.dtype)
    y = tf.cast(y, w1.dtype)
    logits = tf.tanh(x @ w1 + b1) @ w2 + b2
    return tf.reduce_sum(tf.nn.softmax_cross_entropy_with_logits(labels=y, logits=logits))


IMAGE = RNG.normal(size=(1, 5, 5, 1))
MIXED_VALUES = [
    np.array(0.8),  # scalar
    RNG.normal(size=(2, 3)),  # matrix
    0.5 * RNG.normal(size=(2, 2, 1, 2)),  # conv kernel [h, w, in, out]
    RNG.normal(size=(3,)),  # vector
]  # P = 1 + 6 + 8 + 3 = 18


def mixed_loss(s, m, kernel, c):
    features = tf.tanh(tf.nn.conv2d(IMAGE * s, kernel, strides=1, padding="VALID"))
    pooled = tf.reduce_mean(features, axis=[1, 2])  # (1, 2)
    z = tf.sin(pooled @ m + c)
    return tf.reduce_sum(z**2) + s**2 * tf.reduce_sum(m**2) / 4.0


def variables(values, dtype=tf.float64):
    return [tf.Variable(v, dtype=dtype) for v in values]


@pytest.fixture(scope="module")
def mlp_hessian():
    hessian = fd_hessian(mlp_loss, MLP_VALUES)
    assert_not_diagonal(hessian)
    return hessian


# ---------------------------------------------------------------------------------------
# Exact diagonal
# ---------------------------------------------------------------------------------------


def test_coupled_parameters_match_finite_differences():
    hessian = fd_hessian(coupled_loss, [W_COUPLED])
    assert_not_diagonal(hessian)
    w = tf.Variable(W_COUPLED)
    check_against(hessian_diagonal(lambda: coupled_loss(w), [w]), [w], hessian)


def test_tanh_mlp_cross_entropy_matches_finite_differences(mlp_hessian):
    params = variables(MLP_VALUES)
    check_against(hessian_diagonal(lambda: mlp_loss(*params), params), params, mlp_hessian)


def test_mixed_shapes_scalar_matrix_conv_kernel():
    hessian = fd_hessian(mixed_loss, MIXED_VALUES)
    assert_not_diagonal(hessian)
    params = variables(MIXED_VALUES)
    assert [len(p.shape) for p in params] == [0, 2, 4, 1]
    check_against(hessian_diagonal(lambda: mixed_loss(*params), params), params, hessian)


def test_unconnected_parameter_gives_exact_zeros():
    w = tf.Variable(W_COUPLED)
    unused = tf.Variable(RNG.normal(size=(2, 3)))
    result = hessian_diagonal(lambda: coupled_loss(w), [unused, w])
    assert result[0].shape == (2, 3)
    np.testing.assert_array_equal(result[0].numpy(), np.zeros((2, 3)))
    check_against(result[1:], [w], fd_hessian(coupled_loss, [W_COUPLED]))


def kinds_loss(a, k, t):
    """Couples a tf.Variable ``a`` (2,), a keras.Variable ``k`` (3,) and a tensor ``t`` (2, 2)."""
    return (
        tf.reduce_sum(tf.sin(tf.linalg.matvec(t, a) * k[:2]))
        + tf.reduce_sum(k) ** 3 * tf.reduce_sum(a**2) / 10.0
        + tf.reduce_sum(tf.tanh(t) ** 2 * k[2])
    )


KINDS_VALUES = [np.array([0.3, -0.6]), np.array([0.5, 1.1, -0.4]), RNG.normal(size=(2, 2))]


def test_keras_variable_tf_variable_and_tensor_params():
    a = tf.Variable(KINDS_VALUES[0])
    k = keras.Variable(KINDS_VALUES[1], dtype="float64")
    t = tf.constant(KINDS_VALUES[2])
    assert isinstance(k, keras.Variable) and not isinstance(t, tf.Variable)
    hessian = fd_hessian(kinds_loss, KINDS_VALUES)
    assert_not_diagonal(hessian)
    result = hessian_diagonal(lambda: kinds_loss(a, k, t), [a, k, t])
    check_against(result, [a, k, t], hessian)


def test_tensor_param_must_be_the_tensor_the_loss_reads():
    t = tf.constant(KINDS_VALUES[2])
    copy = tf.identity(t)  # equal values, but not the object the loss closes over
    a, k = tf.constant(KINDS_VALUES[0]), tf.constant(KINDS_VALUES[1])
    result = hessian_diagonal(lambda: kinds_loss(a, k, t), [copy, t])
    np.testing.assert_array_equal(result[0].numpy(), np.zeros((2, 2)))
    hessian = fd_hessian(kinds_loss, KINDS_VALUES)
    np.testing.assert_allclose(result[1].numpy().ravel(), np.diag(hessian)[5:], rtol=RTOL)


def test_float32_preserves_dtype_and_matches_float64(mlp_hessian):
    params32 = variables(MLP_VALUES, tf.float32)
    result = hessian_diagonal(lambda: mlp_loss(*params32), params32)
    assert all(r.dtype == tf.float32 for r in result)
    assert [r.shape for r in result] == [p.shape for p in params32]
    expected = np.diag(mlp_hessian)
    scale = float(np.abs(expected).max())
    np.testing.assert_allclose(flat(result), expected, rtol=1e-4, atol=1e-5 * scale)


def test_mixed_float32_and_float64_params():
    def loss(w, v):
        return coupled_loss(tf.concat([tf.cast(w, tf.float64), v], axis=0))

    w = tf.Variable(W_COUPLED[:2], dtype=tf.float32)
    v = tf.Variable(W_COUPLED[2:], dtype=tf.float64)
    result = hessian_diagonal(lambda: loss(w, v), [w, v])
    assert [r.dtype for r in result] == [tf.float32, tf.float64]
    expected = np.diag(fd_hessian(coupled_loss, [W_COUPLED]))
    np.testing.assert_allclose(result[0].numpy(), expected[:2], rtol=1e-5)
    np.testing.assert_allclose(result[1].numpy(), expected[2:], rtol=RTOL)


def mlp_dataset(batch_size: int = 4) -> tf.data.Dataset:
    return tf.data.Dataset.from_tensor_slices((X_DATA, Y_DATA)).batch(batch_size)


def test_dataset_with_partial_last_batch_gives_diagonal_of_summed_loss(mlp_hessian):
    dataset = mlp_dataset(4)  # batches of 4, 4 and 2 examples
    assert [int(x.shape[0]) for x, _ in dataset] == [4, 4, 2]
    params = variables(MLP_VALUES)
    result = hessian_diagonal(lambda batch: mlp_loss(*params, *batch), params, data=dataset)
    # mlp_loss sums over examples, so the sum over batches is the full-data loss.
    check_against(result, params, mlp_hessian)


@pytest.mark.parametrize("chunk_size", [1, 3, None])
def test_chunk_sizes_agree(chunk_size, mlp_hessian):
    params = variables(MLP_VALUES)  # sizes 15, 5, 15, 3: 3 does not divide 5
    result = hessian_diagonal(lambda: mlp_loss(*params), params, chunk_size=chunk_size)
    check_against(result, params, mlp_hessian)
    reference = hessian_diagonal(lambda: mlp_loss(*params), params, chunk_size=64)
    np.testing.assert_allclose(flat(result), flat(reference), rtol=1e-12, atol=1e-14)


def gather_loss(table, v):
    rows = tf.gather(table, [0, 2, 2, 4])  # gradient of ``table`` is IndexedSlices
    return tf.reduce_sum(tf.tanh(tf.linalg.matvec(rows, v)) ** 2)


GATHER_VALUES = [RNG.normal(size=(5, 3)), RNG.normal(size=(3,))]


def test_gathered_parameter_with_sparse_gradient():
    params = variables(GATHER_VALUES)
    hessian = fd_hessian(gather_loss, GATHER_VALUES)
    assert_not_diagonal(hessian)
    check_against(hessian_diagonal(lambda: gather_loss(*params), params), params, hessian)


def test_nested_tapes_give_row_sums_not_the_diagonal():
    hessian = fd_hessian(coupled_loss, [W_COUPLED])
    w = tf.Variable(W_COUPLED)
    with tf.GradientTape() as outer:
        with tf.GradientTape() as inner:
            loss = coupled_loss(w)
        gradient = inner.gradient(loss, w)
    nested = outer.gradient(gradient, w).numpy()
    np.testing.assert_allclose(nested, hessian @ np.ones(len(W_COUPLED)), rtol=RTOL)
    diagonal = np.diag(hessian)
    assert np.abs(nested - diagonal).max() > 0.1 * np.abs(diagonal).max()
    np.testing.assert_allclose(hessian_diagonal(lambda: coupled_loss(w), [w])[0], diagonal, RTOL)


# ---------------------------------------------------------------------------------------
# Hutchinson
# ---------------------------------------------------------------------------------------

X_DENSE = RNG.normal(size=(6, 8)) / 2.0
W_DENSE = RNG.normal(size=(8,))


def dense_loss(w):
    """Non-quadratic loss whose Hessian is dense (every pair of entries coupled)."""
    return tf.reduce_sum(tf.tanh(tf.linalg.matvec(X_DENSE, w)) ** 2) + tf.reduce_sum(w**4) / 12


def test_hutchinson_is_unbiased_within_standard_errors():
    hessian = fd_hessian(dense_loss, [W_DENSE])
    assert_not_diagonal(hessian)
    num_samples = 4000
    w = tf.Variable(W_DENSE)
    estimate = hutchinson_diagonal(
        lambda: dense_loss(w), [w], num_samples=num_samples, seed=7, chunk_size=500
    )[0].numpy()
    assert estimate.dtype == np.float64 and estimate.shape == W_DENSE.shape
    diagonal = np.diag(hessian)
    # Rademacher probes: Var(v_j (H v)_j) = sum_{k != j} H_jk^2 per probe.
    standard_error = np.sqrt(((hessian**2).sum(axis=1) - diagonal**2) / num_samples)
    z = (estimate - diagonal) / standard_error
    assert np.all(np.abs(z) < 5.0), z
    # ... and the spread is that of a Monte Carlo mean, not of an exact (or wild) value.
    assert 0.2 < np.sqrt(np.mean(z**2)) < 3.0, z


def test_hutchinson_is_exact_for_a_diagonal_hessian():
    w = tf.Variable(W_DENSE)

    def loss():
        return tf.reduce_sum(tf.sin(w) * w**3)

    estimate = hutchinson_diagonal(loss, [w], num_samples=3, seed=0)[0].numpy()
    expected = np.diag(fd_hessian(lambda u: tf.reduce_sum(tf.sin(u) * u**3), [W_DENSE]))
    np.testing.assert_allclose(estimate, expected, rtol=RTOL)


def test_hutchinson_seed_reproducible_and_seeds_differ():
    params = variables(MIXED_VALUES)

    def run(seed):
        result = hutchinson_diagonal(
            lambda: mixed_loss(*params), params, num_samples=20, seed=seed, chunk_size=8
        )
        assert [r.shape for r in result] == [p.shape for p in params]
        return flat(result)

    first = run(11)
    np.testing.assert_array_equal(first, run(11))
    assert np.abs(first - run(12)).max() > 1e-6


def test_hutchinson_dataset_equals_single_summed_loss_with_same_seed():
    params = variables(MLP_VALUES)
    kwargs = {"num_samples": 50, "seed": 3, "chunk_size": 16}
    batched = hutchinson_diagonal(
        lambda batch: mlp_loss(*params, *batch), params, data=mlp_dataset(4), **kwargs
    )
    single = hutchinson_diagonal(lambda: mlp_loss(*params), params, **kwargs)
    np.testing.assert_allclose(flat(batched), flat(single), rtol=1e-10, atol=1e-12)
    # The estimate is a real (noisy) one: it is not the exact diagonal.
    exact = flat(hessian_diagonal(lambda: mlp_loss(*params), params))
    assert np.abs(flat(single) - exact).max() > 1e-3


def test_hutchinson_gathered_parameter_with_sparse_gradient():
    params = variables(GATHER_VALUES)
    hessian = fd_hessian(gather_loss, GATHER_VALUES)
    estimate = hutchinson_diagonal(lambda: gather_loss(*params), params, num_samples=4000, seed=1)
    diagonal = np.diag(hessian)
    standard_error = np.sqrt(((hessian**2).sum(axis=1) - diagonal**2) / 4000)
    assert np.all(np.abs(flat(estimate) - diagonal) <= 5.0 * standard_error + 1e-12)


# ---------------------------------------------------------------------------------------
# Errors
# ---------------------------------------------------------------------------------------


def _w():
    return tf.Variable(W_COUPLED)


@pytest.mark.parametrize("method", ["exact", "hutchinson"])
@pytest.mark.parametrize(
    ("case", "error"),
    [
        ("empty_params", ValueError),
        ("non_scalar_loss", ValueError),
        ("integer_param", TypeError),
        ("chunk_size_zero", ValueError),
        ("empty_dataset", ValueError),
    ],
)
def test_invalid_inputs_raise(method, case, error):
    w = _w()
    loss_fn, params, kwargs = (lambda: coupled_loss(w)), [w], {}
    if case == "empty_params":
        params = []
    elif case == "non_scalar_loss":
        loss_fn = lambda: w**2  # noqa: E731
    elif case == "integer_param":
        params = [tf.Variable([1, 2])]
        loss_fn = lambda: tf.reduce_sum(params[0] ** 2)  # noqa: E731
    elif case == "chunk_size_zero":
        kwargs["chunk_size"] = 0
    elif case == "empty_dataset":
        kwargs["data"] = tf.data.Dataset.from_tensor_slices(X_DATA).take(0)
        loss_fn = lambda batch: coupled_loss(w) + tf.reduce_sum(batch)  # noqa: E731
    if method == "hutchinson":
        kwargs.update(num_samples=4, seed=0)
        function = hutchinson_diagonal
    else:
        function = hessian_diagonal
    with pytest.raises(error):
        function(loss_fn, params, **kwargs)


@pytest.mark.parametrize("num_samples", [0, -3])
def test_hutchinson_requires_positive_num_samples(num_samples):
    w = _w()
    with pytest.raises(ValueError, match="num_samples"):
        hutchinson_diagonal(lambda: coupled_loss(w), [w], num_samples=num_samples, seed=0)
