"""Every public function on GPU arrays of each library: torch CUDA tensors
(through their data pointers, without CuPy), CuPy arrays and JAX GPU
arrays, each called on a non-default stream. Results must come back in the
caller's library on the caller's device, agree with the numpy call (masks
bit for bit, values within the GPU kernels' documented ulp bounds), and
``out=`` and running statistics must be written in place.

Each library's tests skip unless it imports, sees a CUDA device, and this
fusednn was built with its CUDA module.
"""
from __future__ import annotations

import numpy as np
import pytest

import fusednn as fn

from conftest import LIBRARY_CALLS, flat_results, library_call_data

pytestmark = pytest.mark.gpu

if not fn.info()["cuda_built"] or not fn.info().get("cuda_devices"):
    pytest.skip("no CUDA module or no CUDA device", allow_module_level=True)

RNG = np.random.default_rng(23)


def normals(shape, dtype=np.float32):
    return RNG.standard_normal(shape).astype(dtype)


def assert_agrees(got: np.ndarray, expected: np.ndarray, what: str):
    assert got.dtype == expected.dtype and got.shape == expected.shape, what
    if expected.dtype == np.uint8:  # masks: the same bits on every device
        np.testing.assert_array_equal(got, expected, err_msg=what)
    else:
        eps = np.finfo(expected.dtype).eps
        np.testing.assert_allclose(got, expected, rtol=64 * eps, atol=64 * eps, err_msg=what)


# ---- torch CUDA -------------------------------------------------------------------------


@pytest.fixture
def torch_cuda():
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available():
        pytest.skip("torch sees no CUDA device")
    return torch


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("call", list(LIBRARY_CALLS))
def test_torch_cuda_every_function_on_a_side_stream(torch_cuda, call, dtype):
    torch = torch_cuda
    data = library_call_data(normals((64, 33), dtype), seed=1)
    expected = flat_results(LIBRARY_CALLS[call](lambda a: a, data))
    stream = torch.cuda.Stream()
    with torch.cuda.stream(stream):
        # made and read on the side stream: a launch on another stream would race
        make = lambda a: torch.from_numpy(np.array(a)).cuda() * 1  # noqa: E731
        got = flat_results(LIBRARY_CALLS[call](make, data))
    stream.synchronize()
    for g, e in zip(got, expected):
        assert isinstance(g, torch.Tensor) and g.device.type == "cuda", call
        assert_agrees(g.cpu().numpy(), e, call)


def test_torch_cuda_out_and_running_statistics_in_place(torch_cuda):
    torch = torch_cuda
    x = normals((32, 6))
    t = torch.from_numpy(x).cuda()
    out = torch.empty_like(t)
    assert fn.relu(t, out=out) is out
    assert_agrees(out.cpu().numpy(), fn.relu(x), "relu out=")
    running_mean = torch.zeros(6, device="cuda")
    running_var = torch.ones(6, device="cuda")
    pointer = running_mean.data_ptr()
    fn.batch_norm(t, None, None, running_mean, running_var)
    rm, rv = np.zeros(6, np.float32), np.ones(6, np.float32)
    fn.batch_norm(x, None, None, rm, rv)
    assert running_mean.data_ptr() == pointer
    assert_agrees(running_mean.cpu().numpy(), rm, "running_mean")
    assert_agrees(running_var.cpu().numpy(), rv, "running_var")


def test_torch_cuda_float16_and_mixing(torch_cuda):
    torch = torch_cuda
    t = torch.randn(8, 4, device="cuda", dtype=torch.float16)
    y = fn.silu(t)
    assert y.dtype == torch.float16 and y.device == t.device
    with pytest.raises(TypeError, match="one library on one device"):
        fn.batch_norm(t.float(), torch.ones(4))  # gamma on the CPU
    with pytest.raises(ValueError, match="out"):
        fn.relu(t, out=torch.empty(8, 4, dtype=torch.float16))


def test_torch_cuda_mask_device_matches_dropout_mask(torch_cuda):
    torch = torch_cuda
    t = torch.randn(1000, device="cuda")
    _, mask = fn.dropout(t, 0.4, seed=9, offset=3, return_mask=True)
    assert mask.dtype == torch.uint8 and mask.is_cuda
    np.testing.assert_array_equal(mask.cpu().numpy(),
                                  fn.dropout_mask(1000, 0.4, seed=9, offset=3))


# ---- CuPy and JAX GPU -------------------------------------------------------------------


@pytest.fixture
def cupy_gpu():
    cp = pytest.importorskip("cupy")
    try:
        if cp.cuda.runtime.getDeviceCount() == 0:
            pytest.skip("CuPy sees no CUDA device")
    except cp.cuda.runtime.CUDARuntimeError:
        pytest.skip("CuPy sees no CUDA device")
    return cp


@pytest.mark.parametrize("call", list(LIBRARY_CALLS))
def test_cupy_every_function_on_a_side_stream(cupy_gpu, call):
    cp = cupy_gpu
    data = library_call_data(normals((64, 33)), seed=2)
    expected = flat_results(LIBRARY_CALLS[call](lambda a: a, data))
    stream = cp.cuda.Stream(non_blocking=True)
    with stream:
        got = flat_results(LIBRARY_CALLS[call](lambda a: cp.asarray(a) * 1, data))
    stream.synchronize()
    for g, e in zip(got, expected):
        assert isinstance(g, cp.ndarray), call
        assert_agrees(cp.asnumpy(g), e, call)


@pytest.fixture
def jax_gpu(cupy_gpu):
    jax = pytest.importorskip("jax")
    try:
        gpus = jax.devices("gpu")
    except RuntimeError:
        gpus = []
    if not gpus:
        pytest.skip("JAX sees no GPU")
    return jax


@pytest.mark.parametrize("call", list(LIBRARY_CALLS))
def test_jax_gpu_every_function(jax_gpu, cupy_gpu, call):
    jax, cp = jax_gpu, cupy_gpu
    data = library_call_data(normals((64, 33)), seed=3)
    expected = flat_results(LIBRARY_CALLS[call](lambda a: a, data))
    gpu = jax.devices("gpu")[0]
    stream = cp.cuda.Stream(non_blocking=True)
    with stream:  # JAX arrays are synchronized, then run on CuPy's current stream
        got = flat_results(LIBRARY_CALLS[call](lambda a: jax.device_put(a, gpu), data))
    stream.synchronize()
    for g, e in zip(got, expected):
        assert isinstance(g, jax.Array) and {d.platform for d in g.devices()} == {"gpu"}, call
        assert_agrees(np.asarray(g), e, call)
