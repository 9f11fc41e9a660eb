"""PyTorch tensors and JAX arrays through every public function on the CPU:
the same bits as the numpy call, results in the caller's library, inputs
read and ``out=`` and running statistics written in place without copies,
and clear errors for mixed libraries and for ``out=`` with immutable JAX
arrays. Each library's tests skip when it is not installed.
"""
from __future__ import annotations

import numpy as np
import pytest

import fusednn as fn
from fusednn import _arrays

RNG = np.random.default_rng(11)


def normals(shape, dtype=np.float32):
    return RNG.standard_normal(shape).astype(dtype)


# ---- PyTorch -------------------------------------------------------------------

@pytest.fixture
def th():
    return pytest.importorskip("torch")


def as_numpy(t):
    return t.detach().numpy()


def test_torch_activations_same_bits_and_type(th):
    x = normals((33, 17))
    t = th.from_numpy(x.copy())
    for name in fn.ACTIVATIONS:
        y = fn.activation(name, t)
        assert isinstance(y, th.Tensor) and y.dtype == th.float32 and y.device.type == "cpu"
        np.testing.assert_array_equal(as_numpy(y), fn.activation(name, x))
        g = th.from_numpy(normals(x.shape))
        gi = fn.activation_backward(name, g, x=t)
        np.testing.assert_array_equal(as_numpy(gi), fn.activation_backward(name, as_numpy(g),
                                                                           x=x))


def test_torch_views_are_read_in_place(th):
    base = th.from_numpy(normals((40, 30), np.float64))
    view = base.t()[::2]  # transposed and strided: a view, no copy
    assert _arrays.TORCH_CPU.view(view, "x", "t").__array_interface__["data"][0] \
        == view.data_ptr()
    np.testing.assert_array_equal(as_numpy(fn.tanh(view)), fn.tanh(as_numpy(view)))


def test_torch_out_is_written_in_place_and_returned(th):
    t = th.from_numpy(normals((8, 9)))
    expected = fn.relu(as_numpy(t).copy())
    result = fn.relu(t, out=t)
    assert result is t
    np.testing.assert_array_equal(as_numpy(t), expected)
    out = th.empty(8, 9)
    assert fn.gelu(t, out=out) is out


def test_torch_zero_d_empty_and_requires_grad(th):
    for shape in [(), (0,), (3, 0)]:
        x = normals(shape)
        y = fn.silu(th.from_numpy(x.copy()))
        assert tuple(y.shape) == shape
        np.testing.assert_array_equal(as_numpy(y), fn.silu(x))
    leaf = th.ones(5, requires_grad=True)
    y = fn.sigmoid(leaf)
    assert not y.requires_grad  # taken as data: no autograd graph
    np.testing.assert_array_equal(as_numpy(y), fn.sigmoid(np.ones(5, np.float32)))


def test_torch_batch_norm_updates_running_statistics_in_place(th):
    x = normals((16, 4, 5))
    running_mean, running_var = th.zeros(4), th.ones(4)
    gamma, beta = th.from_numpy(normals(4)), th.from_numpy(normals(4))
    result = fn.batch_norm(th.from_numpy(x), gamma, beta, running_mean, running_var)
    assert isinstance(result, fn.BatchNormResult)
    assert all(isinstance(a, th.Tensor) for a in result)
    rm, rv = np.zeros(4, np.float32), np.ones(4, np.float32)
    expected = fn.batch_norm(x, as_numpy(gamma), as_numpy(beta), rm, rv)
    for got, want in zip(result, expected):
        np.testing.assert_array_equal(as_numpy(got), want)
    np.testing.assert_array_equal(as_numpy(running_mean), rm)
    np.testing.assert_array_equal(as_numpy(running_var), rv)
    g = normals(x.shape)
    grads = fn.batch_norm_backward(th.from_numpy(g), th.from_numpy(x), gamma, result.save_mean,
                                   result.save_invstd)
    for got, want in zip(grads, fn.batch_norm_backward(g, x, as_numpy(gamma), expected.save_mean,
                                                       expected.save_invstd)):
        np.testing.assert_array_equal(as_numpy(got), want)


def test_torch_dropout_and_fused(th):
    x = normals((64, 32))
    y, mask = fn.dropout(th.from_numpy(x), 0.3, seed=4, offset=1, return_mask=True)
    y_np, mask_np = fn.dropout(x, 0.3, seed=4, offset=1, return_mask=True)
    assert mask.dtype == th.uint8
    np.testing.assert_array_equal(as_numpy(y), y_np)
    np.testing.assert_array_equal(as_numpy(mask), mask_np)
    g = normals(x.shape)
    np.testing.assert_array_equal(
        as_numpy(fn.dropout_backward(th.from_numpy(g), 0.3, mask=mask)),
        fn.dropout_backward(g, 0.3, mask=mask_np))
    bias = normals(32)
    o = fn.bias_act_dropout(th.from_numpy(x), th.from_numpy(bias), "gelu", 0.2, seed=1)
    np.testing.assert_array_equal(as_numpy(o), fn.bias_act_dropout(x, bias, "gelu", 0.2, seed=1))
    gh, gb = fn.bias_act_dropout_backward(th.from_numpy(g), th.from_numpy(x), th.from_numpy(bias),
                                          "gelu", 0.2, seed=1)
    want_h, want_b = fn.bias_act_dropout_backward(g, x, bias, "gelu", 0.2, seed=1)
    np.testing.assert_array_equal(as_numpy(gh), want_h)
    np.testing.assert_array_equal(as_numpy(gb), want_b)


def test_torch_mixed_with_numpy_is_a_type_error(th):
    x = th.from_numpy(normals((6, 3)))
    with pytest.raises(TypeError, match="one library"):
        fn.batch_norm(x, np.ones(3, np.float32))
    with pytest.raises(TypeError, match="one library"):
        fn.dropout_backward(x, 0.5, mask=np.zeros(3, np.uint8))


def test_torch_unsupported_dtype_names_the_supported_ones(th):
    with pytest.raises(TypeError, match="float32"):
        fn.batch_norm(th.ones(3, 2, dtype=th.bfloat16))
    with pytest.raises(TypeError, match="float32, float64, float16, bfloat16"):
        fn.relu(th.ones(3, dtype=th.int64))


# ---- JAX -------------------------------------------------------------------------


@pytest.fixture
def jnp():
    jax = pytest.importorskip("jax")
    return jax.numpy


def test_jax_activation_and_backward(jnp):
    x = normals((21, 5))
    a = jnp.asarray(x)
    y = fn.gelu(a)
    assert type(y).__module__.startswith("jax")
    np.testing.assert_array_equal(np.asarray(y), fn.gelu(x))
    g = normals(x.shape)
    np.testing.assert_array_equal(np.asarray(fn.activation_backward("mish", jnp.asarray(g), x=a)),
                                  fn.activation_backward("mish", g, x=x))


def test_jax_batch_norm_and_dropout(jnp):
    x = normals((10, 3))
    result = fn.batch_norm(jnp.asarray(x), axis=1)
    for got, want in zip(result, fn.batch_norm(x, axis=1)):
        np.testing.assert_array_equal(np.asarray(got), want)
    y, mask = fn.dropout(jnp.asarray(x), 0.5, seed=2, return_mask=True)
    y_np, mask_np = fn.dropout(x, 0.5, seed=2, return_mask=True)
    np.testing.assert_array_equal(np.asarray(y), y_np)
    np.testing.assert_array_equal(np.asarray(mask), mask_np)


def test_jax_out_is_a_type_error(jnp):
    a = jnp.ones(4)
    with pytest.raises(TypeError, match="immutable"):
        fn.relu(a, out=a)
