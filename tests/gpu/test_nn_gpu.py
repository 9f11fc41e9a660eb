"""fn.init and fusednn.nn on CuPy arrays: a seed gives the same weights on
both devices, and a model built with device='cuda' computes what the same
model computes on the CPU, its gradients included.

Skipped unless CuPy imports and a CUDA device is visible; the model test
also needs fusednn's CUDA module (its activation kernels).
"""
from __future__ import annotations

import numpy as np
import pytest

import fusednn as fn
from fusednn import nn

from conftest import cupy_or_skip

cp = cupy_or_skip(kernels=False)

pytestmark = pytest.mark.gpu
needs_kernels = pytest.mark.skipif(not fn.info()["cuda_built"],
                                   reason="fusednn was built without its CUDA module")


@pytest.mark.parametrize("name", fn.init.INITIALIZERS)
@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_same_seed_same_weights_on_both_devices(name, dtype):
    make = getattr(fn.init, name)
    on_gpu = make((64, 32, 3), seed=9, dtype=dtype, device="cuda")
    assert isinstance(on_gpu, cp.ndarray) and on_gpu.dtype == np.dtype(dtype)
    assert np.array_equal(cp.asnumpy(on_gpu), make((64, 32, 3), seed=9, dtype=dtype))


def _model(device):
    return nn.Sequential(nn.Dense(8, 16, init="he_normal", seed=0, dtype="float64",
                                  device=device),
                         nn.Activation("tanh"),
                         nn.Dense(16, 3, seed=1, dtype="float64", device=device))


@needs_kernels
def test_model_matches_cpu_forward_and_backward():
    x = np.random.default_rng(0).standard_normal((10, 8))
    labels = np.arange(10) % 3
    cpu, gpu = _model("cpu"), _model("cuda")
    loss_cpu, grad_cpu = nn.softmax_cross_entropy(cpu(x), labels)
    loss_gpu, grad_gpu = nn.softmax_cross_entropy(gpu(cp.asarray(x)), cp.asarray(labels))
    assert loss_gpu == pytest.approx(loss_cpu, rel=1e-12)
    cpu.backward(grad_cpu)
    gpu.backward(grad_gpu)
    for p_cpu, p_gpu in zip(cpu.parameters(), gpu.parameters()):
        np.testing.assert_allclose(cp.asnumpy(p_gpu.grad), p_cpu.grad, rtol=1e-10, atol=1e-13)


def test_numpy_input_to_cuda_model_is_refused():
    layer = nn.Dense(4, 2, device="cuda")
    with pytest.raises(TypeError, match="numpy array but the layer's parameters are CuPy"):
        layer(np.zeros((3, 4), np.float32))
