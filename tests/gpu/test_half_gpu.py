"""bfloat16 on the GPU: the CUDA kernels' __nv_bfloat16 paths, called
through the private CUDA module with torch CUDA tensors (the public
functions are tested in test_bfloat16_public_gpu.py). Activations over every
bfloat16 input within 1 ulp of the float64 reference, dropout masks and
values bit for bit the CPU kernel's, the fused epilogue as the float32
kernel rounded once, and batch norm's float32 statistics.

Skipped unless torch sees a CUDA device and this fusednn was built with its
CUDA module.
"""
from __future__ import annotations

import numpy as np
import pytest

import fusednn as fn
from fusednn import _backend
from fusednn import reference as ref

from conftest import same_bits

torch = pytest.importorskip("torch")
ml_dtypes = pytest.importorskip("ml_dtypes")
if not torch.cuda.is_available() or _backend._cuda is None:
    pytest.skip("needs a CUDA device and the CUDA module", allow_module_level=True)

pytestmark = pytest.mark.gpu
_cuda = _backend._cuda
# The binding's dtype codes (csrc/bindings/operand.h).
CODES = {torch.float32: 0, torch.bfloat16: 3, torch.uint8: 4}


def operand(t) -> tuple:
    """(pointer, dtype code, shape, byte strides, device, stream) of a CUDA
    tensor, on torch's current stream."""
    return (t.data_ptr(), CODES[t.dtype], tuple(t.shape),
            tuple(s * t.element_size() for s in t.stride()), t.device.index or 0,
            torch.cuda.current_stream(t.device).cuda_stream)


def to_host(t) -> np.ndarray:
    torch.cuda.synchronize()
    if t.dtype == torch.bfloat16:
        return t.cpu().view(torch.int16).numpy().view(ml_dtypes.bfloat16)
    return t.cpu().numpy()


def every_bfloat16():
    host = np.arange(1 << 16, dtype=np.uint32).astype(np.uint16).view(ml_dtypes.bfloat16)
    device = torch.from_numpy(host.view(np.int16)).view(torch.bfloat16).cuda()
    return host, device


def bf16_ulp_error(actual: np.ndarray, expected: np.ndarray) -> np.ndarray:
    a = actual.astype(np.float64)
    with np.errstate(all="ignore"):
        exponent = np.floor(np.log2(np.abs(expected)))
        exponent = np.where(np.isfinite(exponent), np.maximum(exponent, -126), -126)
        err = np.abs(a - expected) / np.exp2(exponent - 7)
    same = (a == expected) | (np.isnan(a) & np.isnan(expected)) | \
        (np.isinf(a) & (np.abs(expected) > float(np.finfo(ml_dtypes.bfloat16).max)))
    return np.where(same, 0.0, np.where(np.isnan(err), np.inf, err))


@pytest.mark.parametrize("name", fn.ACTIVATIONS)
def test_activations_every_bfloat16_input(name):
    from fusednn.activations import _DEFAULT_KERNEL_PARAMS, _IDS
    host, x = every_bfloat16()
    y = torch.empty_like(x)
    _cuda.activation_forward(_IDS[name], operand(x), operand(y), *_DEFAULT_KERNEL_PARAMS[name])
    assert bf16_ulp_error(to_host(y), ref.activation(name, host)).max() <= 1
    g = torch.ones_like(x)
    gi = torch.empty_like(x)
    _cuda.activation_backward(_IDS[name], False, operand(g), operand(x), operand(gi),
                              *_DEFAULT_KERNEL_PARAMS[name])
    expected = ref.activation_backward(name, np.ones_like(host), x=host)
    assert bf16_ulp_error(to_host(gi), expected).max() <= 1


def test_dropout_matches_the_cpu_bit_for_bit():
    host, x = every_bfloat16()
    y = torch.empty_like(x)
    mask = torch.empty((x.numel() + 7) // 8, dtype=torch.uint8, device=x.device)
    _cuda.dropout_forward(operand(x), operand(y), 0.3, 5, 2**33, 0, operand(mask))
    expected, expected_mask = fn.dropout(host, 0.3, seed=5, offset=2**33, return_mask=True)
    np.testing.assert_array_equal(mask.cpu().numpy(), expected_mask)
    assert same_bits(to_host(y), expected)


def test_fused_epilogue_is_the_float32_kernel_rounded_once():
    from fusednn.activations import _DEFAULT_KERNEL_PARAMS, _IDS
    rng = np.random.default_rng(3)
    h = torch.from_numpy(rng.standard_normal((64, 300)).astype(np.float32)).cuda().bfloat16()
    bias = torch.from_numpy(rng.standard_normal(300).astype(np.float32)).cuda().bfloat16()
    outputs = {}
    for dtype in (torch.bfloat16, torch.float32):
        hh, bb = h.to(dtype), bias.to(dtype)
        out = torch.empty_like(hh)
        _cuda.bias_act_dropout_forward(_IDS["gelu"], operand(hh), operand(bb), 1, operand(out),
                                       *_DEFAULT_KERNEL_PARAMS["gelu"], 0.1, 8, 0, 0, None)
        outputs[dtype] = out
    torch.cuda.synchronize()
    assert torch.equal(outputs[torch.bfloat16], outputs[torch.float32].bfloat16())
