"""PyTorch tensors and JAX arrays through every public function on the CPU:
the same bits as the numpy call, results in the caller's library and on
its device, inputs read and results returned without copies (data
pointers compared), ``out=`` and running statistics written in place,
strided and transposed views, 0-d and empty arrays, and clear errors for
mixed libraries and for ``out=`` with immutable JAX arrays. Each library's
tests skip when it is not installed.
"""
from __future__ import annotations

import contextlib

import numpy as np
import pytest

import fusednn as fn
from fusednn import _arrays

from conftest import LIBRARY_CALLS, flat_results, library_call_data

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
        fn.batch_norm(th.ones(3, 2, dtype=th.int32))
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


# ---- every public function, torch and JAX ----------------------------------------------


def _float64_arrays(library):
    """A scope in which the library keeps float64 arrays (JAX makes them
    float32 unless x64 is enabled)."""
    if library == "jax":
        import jax
        return jax.enable_x64(True)
    return contextlib.nullcontext()


def _make_for(library):
    if library == "torch":
        torch = pytest.importorskip("torch")
        return lambda a: torch.from_numpy(np.array(a)), lambda r: r.numpy(), torch.Tensor
    jax = pytest.importorskip("jax")
    return jax.numpy.asarray, np.asarray, jax.Array


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("call", list(LIBRARY_CALLS))
@pytest.mark.parametrize("library", ["torch", "jax"])
def test_every_function_gives_the_numpy_bits_in_the_callers_library(library, call, dtype):
    make, to_numpy, kind = _make_for(library)
    data = library_call_data(normals((6, 5), dtype), seed=3)
    expected = flat_results(LIBRARY_CALLS[call](lambda a: a, data))
    with _float64_arrays(library):
        got = flat_results(LIBRARY_CALLS[call](make, data))
    assert len(got) == len(expected)
    for g, e in zip(got, expected):
        assert isinstance(g, kind), type(g)
        if library == "torch":
            assert g.device.type == "cpu" and not g.requires_grad
        else:
            assert {d.platform for d in g.devices()} == {"cpu"}
        g = to_numpy(g)
        assert g.dtype == e.dtype and g.shape == e.shape
        np.testing.assert_array_equal(g, e)


def test_torch_results_share_the_kernels_memory():
    torch = pytest.importorskip("torch")
    view = np.empty((3, 4), np.float32)
    wrapped = _arrays.TORCH_CPU.result(view)
    assert isinstance(wrapped, torch.Tensor)
    assert wrapped.data_ptr() == view.__array_interface__["data"][0]


def test_torch_out_in_place_for_every_function_that_takes_out():
    torch = pytest.importorskip("torch")
    x = normals((6, 5))
    data = library_call_data(x, seed=4)
    t = lambda a: torch.from_numpy(np.array(a))  # noqa: E731
    calls = {
        "relu": lambda make, out: fn.relu(make(x), out=out),
        "activation_backward": lambda make, out: fn.activation_backward(
            "mish", make(data["g"]), x=make(x), out=out),
        "dropout": lambda make, out: fn.dropout(make(x), 0.5, seed=1, out=out),
        "dropout[eval]": lambda make, out: fn.dropout(make(x), 0.5, seed=1, training=False,
                                                      out=out),
        "dropout_backward": lambda make, out: fn.dropout_backward(make(data["g"]), 0.5, seed=1,
                                                                  out=out),
        "bias_act_dropout": lambda make, out: fn.bias_act_dropout(
            make(x), make(data["bias"]), "relu", 0.5, seed=1, axis=1, out=out),
        "bias_act_dropout_backward": lambda make, out: fn.bias_act_dropout_backward(
            make(data["g"]), make(x), make(data["bias"]), "relu", 0.5, seed=1, axis=1,
            out=out)[0],
        "batch_norm": lambda make, out: fn.batch_norm(make(x), out=out).y,
        "batch_norm_backward": lambda make, out: fn.batch_norm_backward(
            make(data["g"]), make(x), None, make(data["save_mean"]), make(data["save_invstd"]),
            out=out)[0],
    }
    for name, call in calls.items():
        out = torch.full(x.shape, 7.0)
        pointer = out.data_ptr()
        assert call(t, out) is out, name
        assert out.data_ptr() == pointer
        np.testing.assert_array_equal(out.numpy(), call(lambda a: a, None), err_msg=name)


def test_torch_in_place_on_the_input_itself():
    torch = pytest.importorskip("torch")
    x = normals((5, 7))
    t = torch.from_numpy(x.copy())
    assert fn.gelu(t, out=t) is t
    np.testing.assert_array_equal(t.numpy(), fn.gelu(x))


@pytest.mark.parametrize("library", ["torch", "jax"])
def test_strided_and_transposed_views(library):
    make, to_numpy, _ = _make_for(library)
    base = normals((12, 10), np.float64)
    views = {"transposed": lambda a: a.T, "strided": lambda a: a[::3, 1::2]}
    for name, take in views.items():
        expected = take(base)
        g = normals(expected.shape, np.float64)
        statistics = fn.batch_norm(expected)[1:]
        with _float64_arrays(library):
            if library == "torch":
                arg = take(make(base))
                # no copy in: the kernels read the tensor's own memory
                assert _arrays.TORCH_CPU.view(arg, "x", "t").__array_interface__["data"][0] == \
                    arg.data_ptr()
            else:
                arg = take(make(base))
            y = to_numpy(fn.silu(arg))
            grad = to_numpy(fn.batch_norm_backward(make(g), arg, None, *map(make, statistics))[0])
        np.testing.assert_array_equal(y, fn.silu(expected), err_msg=name)
        np.testing.assert_array_equal(
            grad, fn.batch_norm_backward(g, expected, None, *statistics)[0], err_msg=name)


@pytest.mark.parametrize("library", ["torch", "jax"])
def test_zero_d_and_empty(library):
    make, to_numpy, _ = _make_for(library)
    for shape in [(), (0,), (2, 0)]:
        x = normals(shape)
        np.testing.assert_array_equal(to_numpy(fn.elu(make(x))), fn.elu(x))
        y, mask = fn.dropout(make(x), 0.5, seed=1, return_mask=True)
        assert tuple(y.shape) == shape and to_numpy(mask).size == fn.dropout_mask(shape, 0.5,
                                                                                 seed=1).size
    empty = normals((0, 3))
    result = fn.batch_norm(make(empty), training=False, running_mean=make(np.zeros(3, np.float32)),
                           running_var=make(np.ones(3, np.float32)))
    assert tuple(result.y.shape) == (0, 3)


def test_torch_running_statistics_updated_in_their_own_storage():
    torch = pytest.importorskip("torch")
    x = normals((8, 3, 2))
    running_mean, running_var = torch.zeros(3), torch.ones(3)
    pointers = running_mean.data_ptr(), running_var.data_ptr()
    fn.batch_norm(torch.from_numpy(x), None, None, running_mean, running_var, momentum=0.5)
    rm, rv = np.zeros(3, np.float32), np.ones(3, np.float32)
    fn.batch_norm(x, None, None, rm, rv, momentum=0.5)
    assert (running_mean.data_ptr(), running_var.data_ptr()) == pointers
    np.testing.assert_array_equal(running_mean.numpy(), rm)
    np.testing.assert_array_equal(running_var.numpy(), rv)
    # a parameter that requires grad is read as data; its statistics still update
    gamma = torch.nn.Parameter(torch.ones(3))
    fn.batch_norm(torch.from_numpy(x), gamma, None, running_mean, running_var)
    assert not np.array_equal(running_mean.numpy(), rm)


def test_jax_running_statistics_cannot_be_updated():
    jax = pytest.importorskip("jax")
    x = jax.numpy.asarray(normals((8, 3)))
    with pytest.raises(ValueError, match="read-only"):
        fn.batch_norm(x, running_mean=jax.numpy.zeros(3), running_var=jax.numpy.ones(3))


def test_mixing_libraries_names_the_arrays_and_the_fix():
    torch = pytest.importorskip("torch")
    jax = pytest.importorskip("jax")
    t = torch.ones(4, 3)
    with pytest.raises(TypeError, match=r"gamma on the CPU \(JAX\).*jax.numpy.asarray"):
        fn.batch_norm(t, jax.numpy.ones(3))
    with pytest.raises(TypeError, match=r"mask on the CPU \(numpy\).*torch.from_numpy"):
        fn.dropout_backward(t, 0.5, mask=np.zeros(2, np.uint8))
    out = np.zeros((4, 3), np.float32)
    with pytest.raises(ValueError, match="out is a numpy array on the CPU"):
        fn.relu(t, out=out)
    assert not out.any()
    with pytest.raises(ValueError, match="out is a torch array"):
        fn.relu(out, out=t)
    with pytest.raises(TypeError, match="must be an array"):
        fn.bias_act_dropout(t, [1.0, 2.0, 3.0], "relu", 0.5, seed=1)


def test_torch_mask_of_another_dtype_is_a_type_error():
    torch = pytest.importorskip("torch")
    with pytest.raises(TypeError, match="uint8"):
        fn.dropout_backward(torch.ones(16), 0.5, mask=torch.ones(2, dtype=torch.int32))


# ---- device= of the functions that read no array -------------------------------------


def device_cases():
    """(label, device, library of the result): every CPU destination."""
    torch = pytest.importorskip("torch")
    jnp = pytest.importorskip("jax.numpy")
    return [("'cpu'", "cpu", np.ndarray), ("numpy array", np.zeros(2), np.ndarray),
            ("torch.device('cpu')", torch.device("cpu"), torch.Tensor),
            ("torch tensor", torch.zeros(2), torch.Tensor),
            ("JAX array", jnp.zeros(2), type(jnp.zeros(2)))]


@pytest.mark.parametrize("index", range(5))
def test_dropout_mask_device_gives_the_same_bytes_in_that_library(index):
    label, device, kind = device_cases()[index]
    expected = fn.dropout_mask((7, 5), 0.3, seed=11, offset=4)
    mask = fn.dropout_mask((7, 5), 0.3, seed=11, offset=4, device=device)
    assert isinstance(mask, kind), label
    np.testing.assert_array_equal(np.asarray(mask), expected)
    assert np.asarray(mask).dtype == np.uint8


@pytest.mark.parametrize("index", range(5))
@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"])
def test_initializer_device_gives_the_same_values_in_that_library(index, dtype):
    label, device, kind = device_cases()[index]
    if dtype == "bfloat16":
        pytest.importorskip("ml_dtypes")
    expected = fn.init.he_uniform((6, 4), seed=3, dtype=dtype)
    weights = fn.init.he_uniform((6, 4), seed=3, dtype=dtype, device=device)
    assert isinstance(weights, kind), label
    if kind.__module__.startswith("torch"):
        assert str(weights.dtype) == f"torch.{dtype}"
        weights = weights.float().numpy()
    np.testing.assert_array_equal(np.asarray(weights, dtype=np.float32),
                                  expected.astype(np.float32))


def test_bad_devices_are_named():
    torch = pytest.importorskip("torch")
    for device in ("tpu", "gpu", "cuda:", "cuda:x"):
        with pytest.raises(ValueError, match="device must be 'cpu', 'cuda', 'cuda:N'"):
            fn.dropout_mask(4, 0.5, seed=1, device=device)
    with pytest.raises(TypeError, match="not int"):
        fn.init.uniform((2,), device=3)
    with pytest.raises(TypeError, match="meta is not supported"):
        fn.dropout_mask(4, 0.5, seed=1, device=torch.device("meta"))
    if not torch.cuda.is_available():
        with pytest.raises(RuntimeError, match="CUDA"):
            fn.dropout_mask(4, 0.5, seed=1, device=torch.device("cuda"))
        with pytest.raises(RuntimeError, match="no CUDA device"):
            fn.init.uniform((2,), device=torch.device("cuda:0"))
    if not fn.info()["cuda_built"]:
        with pytest.raises(RuntimeError, match="built without CUDA"):
            fn.dropout_mask(4, 0.5, seed=1, device="cuda:1")


# ---- torch CPU tensors read from their DLPack export -------------------------------------


def test_torch_views_are_those_of_tensor_numpy():
    """_cpu.torch_view gives Tensor.numpy()'s array (same address, shape,
    strides, dtype, writable) for strided, transposed, reversed, 0-d and
    requires-grad tensors, and keeps the memory alive after the tensor is
    gone; it declines (None) what Tensor.numpy()'s path must handle."""
    torch = pytest.importorskip("torch")
    from fusednn import _cpu
    to_dlpack = torch._C._to_dlpack
    tensors = [torch.randn(4, 5)[:, 1:], torch.randn(3, dtype=torch.float64),
               torch.randn(2, 3).half().t(), torch.randn(5, requires_grad=True),
               torch.randn(6).flip(0)[::2], torch.tensor(3.0), torch.randn(2, 3, 4)[:, 1]]
    for t in tensors:
        view, expected = _cpu.torch_view(t, to_dlpack), t.detach().numpy()
        assert view.dtype == expected.dtype and view.shape == expected.shape
        assert view.strides == expected.strides and view.flags.writeable
        assert view.__array_interface__["data"][0] == expected.__array_interface__["data"][0]
        np.testing.assert_array_equal(view, expected)
    for declined in (torch._neg_view(torch.randn(3)), torch.empty(0, 3),
                     torch.randn(3).bfloat16(), torch.arange(3)):
        assert _cpu.torch_view(declined, to_dlpack) is None
    with pytest.raises(RuntimeError):
        _cpu.torch_view(torch.randn(3, 3).to_sparse(), to_dlpack)
    t = torch.arange(8, dtype=torch.float32)
    view = _cpu.torch_view(t, to_dlpack)
    del t
    assert view.sum() == 28.0
    # A negative view (memory holding the negated values) goes through
    # Tensor.numpy()'s path, which refuses it, rather than reading the memory.
    with pytest.raises(RuntimeError, match="negative"):
        fn.relu(torch._neg_view(torch.randn(3)))


def test_torch_out_is_written_through_the_view():
    torch = pytest.importorskip("torch")
    x = torch.randn(4, 6)
    out = torch.empty(6, 4).t()
    assert fn.relu(x, out=out) is out
    assert torch.equal(out, torch.relu(x))
