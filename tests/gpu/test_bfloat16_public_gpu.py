"""bfloat16 on the GPU through the public functions: torch CUDA bfloat16
tensors (and JAX GPU bfloat16 arrays) reach every kernel family, the
results come back as tensors (arrays) of the caller's library in bfloat16,
and agree with the CPU's bfloat16 kernels on the same values: dropout bit
for bit (the same mask and the same single rounding of x * scale),
activations within 1 bfloat16 ulp of the float64 reference, batch norm
within half an ulp plus the float32 bound of the reference, with float32
statistics.

Skipped unless torch sees a CUDA device and this fusednn was built with its
CUDA module (the JAX case also needs a JAX GPU backend).
"""
from __future__ import annotations

import numpy as np
import pytest

import fusednn as fn
from fusednn import _backend
from fusednn import reference as ref

torch = pytest.importorskip("torch")
ml_dtypes = pytest.importorskip("ml_dtypes")
if not torch.cuda.is_available() or _backend._cuda is None:
    pytest.skip("needs a CUDA device and the CUDA module", allow_module_level=True)

pytestmark = pytest.mark.gpu
BF16 = torch.bfloat16


def host(t) -> np.ndarray:
    torch.cuda.synchronize()
    return t.detach().cpu().view(torch.int16).numpy().view(ml_dtypes.bfloat16)


def spacing(values) -> np.ndarray:
    with np.errstate(all="ignore"):
        exponent = np.floor(np.log2(np.abs(np.asarray(values, dtype=np.float64))))
    exponent = np.where(np.isfinite(exponent), np.maximum(exponent, -126), -126)
    return np.exp2(exponent - 7)


def normals(*shape, seed=0, scale=1.0, shift=0.0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(*shape, generator=g) * scale + shift).to(BF16).cuda()


@pytest.mark.parametrize("name", ["relu", "gelu", "silu", "tanh", "mish", "hardswish"])
def test_activations_take_torch_bfloat16(name):
    x = normals(4097, scale=4.0)
    y = fn.activation(name, x)
    assert isinstance(y, torch.Tensor) and y.dtype == BF16 and y.is_cuda
    expected = ref.activation(name, host(x))
    assert np.all(np.abs(host(y).astype(np.float64) - expected) <= spacing(expected))
    dy = torch.ones_like(x)
    grad = fn.activation_backward(name, dy, x=x)
    assert grad.dtype == BF16
    expected = ref.activation_backward(name, np.ones(4097), x=host(x))
    assert np.all(np.abs(host(grad).astype(np.float64) - expected) <= spacing(expected))
    out = torch.empty_like(x)
    assert fn.activation(name, x, out=out) is out


def test_dropout_and_fused_epilogue_match_the_cpu_bit_for_bit():
    x = normals(3, 1000, seed=1)
    y, mask = fn.dropout(x, 0.3, seed=7, offset=2, return_mask=True)
    y_cpu, mask_cpu = fn.dropout(host(x), 0.3, seed=7, offset=2, return_mask=True)
    assert y.dtype == BF16
    np.testing.assert_array_equal(host(y).view(np.uint16), y_cpu.view(np.uint16))
    np.testing.assert_array_equal(mask.cpu().numpy(), mask_cpu)
    grad = fn.dropout_backward(torch.ones_like(x), 0.3, seed=7, offset=2)
    np.testing.assert_array_equal(
        host(grad).view(np.uint16),
        fn.dropout_backward(np.ones((3, 1000), ml_dtypes.bfloat16), 0.3, seed=7,
                            offset=2).view(np.uint16))
    bias = normals(1000, seed=2)
    o = fn.bias_act_dropout(x, bias, "relu", 0.2, seed=3)
    o_cpu = fn.bias_act_dropout(host(x), host(bias), "relu", 0.2, seed=3)
    np.testing.assert_array_equal(host(o).view(np.uint16), o_cpu.view(np.uint16))


@pytest.mark.parametrize("channels_last", [False, True])
def test_batch_norm_takes_torch_bfloat16(channels_last):
    x = normals(8, 16, 12, 10, seed=3, scale=2.0, shift=0.5)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    gamma = torch.rand(16, generator=torch.Generator().manual_seed(4)).cuda() + 0.5
    running_mean, running_var = torch.zeros(16, device="cuda"), torch.ones(16, device="cuda")
    result = fn.batch_norm(x, gamma, None, running_mean, running_var)
    assert result.y.dtype == BF16 and result.save_mean.dtype == torch.float32
    x64 = host(x).astype(np.float64)
    gamma64 = gamma.cpu().numpy().astype(np.float64)
    expected = ref.batch_norm(x64, gamma64)
    error = np.abs(host(result.y).astype(np.float64) - expected.y)
    assert np.all(error <= 0.5 * spacing(np.abs(expected.y) + 2e-5) + 2e-5)
    dy = normals(8, 16, 12, 10, seed=5)
    grad_x, grad_gamma, grad_beta = fn.batch_norm_backward(
        dy, x, gamma.to(BF16), result.save_mean, result.save_invstd)
    assert grad_x.dtype == BF16 and grad_gamma.dtype == torch.float32
    want = ref.batch_norm_backward(host(dy).astype(np.float64), x64,
                                   gamma.to(BF16).cpu().float().numpy(),
                                   result.save_mean.cpu().numpy(),
                                   result.save_invstd.cpu().numpy())
    error = np.abs(host(grad_x).astype(np.float64) - want[0])
    assert np.all(error <= 0.5 * spacing(np.abs(want[0]) + 1e-4) + 1e-4)
    np.testing.assert_allclose(grad_gamma.cpu().numpy(), want[1], atol=1e-3)
    np.testing.assert_allclose(grad_beta.cpu().numpy(), want[2], atol=1e-3)


def test_split_phases_take_torch_bfloat16():
    x = normals(6, 5, 7, seed=6, shift=1.0)
    stats = fn.batch_norm_stats(x)
    stats_cpu = fn.batch_norm_stats(host(x))
    np.testing.assert_allclose(stats.mean.cpu().numpy(), stats_cpu.mean, rtol=1e-12)
    np.testing.assert_allclose(stats.m2.cpu().numpy(), stats_cpu.m2, rtol=1e-10)
    invstd = 1.0 / torch.sqrt(stats.m2 / stats.count + 1e-5)
    y = fn.batch_norm_apply(x, stats.mean, invstd)
    assert y.dtype == BF16


def test_torch_modules_run_bfloat16_on_fusednn():
    from fusednn.torch import nn as fnn
    assert fnn.supports(BF16, "cuda") is None
    module = fnn.BatchNorm2d(16).cuda()
    y = module(normals(4, 16, 5, 5, seed=8))
    assert y.dtype == BF16


def test_jax_bfloat16_on_the_gpu():
    jax = pytest.importorskip("jax")
    try:
        device = jax.devices("gpu")[0]
    except RuntimeError:
        pytest.skip("JAX has no GPU backend here")
    x_host = np.linspace(-4, 4, 1000).astype(ml_dtypes.bfloat16)
    x = jax.device_put(jax.numpy.asarray(x_host), device)
    y = fn.silu(x)
    assert y.dtype == jax.numpy.bfloat16
    expected = ref.activation("silu", x_host)
    assert np.all(np.abs(np.asarray(y).astype(np.float64) - expected) <= spacing(expected))
