"""``fusednn.torch`` on CUDA tensors: opcheck of the operators on the GPU,
the same dropout masks on both devices for the same ``[seed, offset]``,
batch norm (NCHW and channels_last) and activations against torch's CUDA
modules, and training steps of a patched model tracking the stock one.

Skipped unless PyTorch sees a CUDA device, CuPy imports and fusednn was
built with its CUDA module.
"""
from __future__ import annotations

import numpy as np
import pytest

from conftest import cupy_or_skip

cupy_or_skip()
torch = pytest.importorskip("torch")
if not torch.cuda.is_available():
    pytest.skip("PyTorch sees no CUDA device", allow_module_level=True)

import fusednn.torch as ft  # noqa: E402
from fusednn.torch import nn as fnn, ops  # noqa: E402

pytestmark = pytest.mark.gpu
CUDA = torch.device("cuda")


def normals(*shape, dtype=torch.float32):
    return torch.randn(*shape, dtype=dtype, device=CUDA)


def rng_pair():
    return torch.tensor([987654321, 5], dtype=torch.int64)


def test_operators_pass_opcheck_on_cuda():
    x = normals(6, 4, 5, dtype=torch.float64).requires_grad_()
    torch.library.opcheck(torch.ops.fusednn.gelu.default, (x,), {"approximate": "tanh"})
    torch.library.opcheck(torch.ops.fusednn.dropout.default, (x, 0.3, rng_pair()))
    torch.library.opcheck(torch.ops.fusednn.bias_act_dropout.default,
                          (x, normals(5, dtype=torch.float64).requires_grad_(), "relu", 0.2,
                           rng_pair()))
    torch.library.opcheck(torch.ops.fusednn.batch_norm.default,
                          (x.detach(), None, None, torch.zeros(4, dtype=torch.float64,
                                                               device=CUDA),
                           torch.ones(4, dtype=torch.float64, device=CUDA), True, 0.1, 1e-5, 1))


def test_dropout_masks_are_the_same_on_both_devices():
    x = torch.ones(37, 29, dtype=torch.float64)
    on_cpu = ops.dropout(x, 0.3, rng_pair())
    on_gpu = ops.dropout(x.to(CUDA), 0.3, rng_pair())
    assert torch.equal(on_gpu.cpu(), on_cpu)
    torch.manual_seed(2)
    a = fnn.Dropout(0.3)(x.to(CUDA))
    torch.manual_seed(2)
    assert torch.equal(fnn.Dropout(0.3)(x).to(CUDA), a)


@pytest.mark.parametrize("memory_format", [torch.contiguous_format, torch.channels_last])
def test_batch_norm_matches_torch_on_cuda(memory_format):
    stock, fused = torch.nn.BatchNorm2d(8).to(CUDA), fnn.BatchNorm2d(8).to(CUDA)
    x = normals(16, 8, 7, 5).contiguous(memory_format=memory_format)
    for _ in range(2):
        xs, xf = x.clone().requires_grad_(), x.clone().requires_grad_()
        ys, yf = stock(xs), fused(xf)
        torch.testing.assert_close(yf, ys, rtol=1e-5, atol=2e-5)
        g = torch.randn_like(ys)
        ys.backward(g)
        yf.backward(g)
        torch.testing.assert_close(xf.grad, xs.grad, rtol=1e-5, atol=2e-5)
        torch.testing.assert_close(fused.weight.grad, stock.weight.grad, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(fused.running_var, stock.running_var)
    assert yf.is_contiguous(memory_format=memory_format)


@pytest.mark.parametrize("name", ["ReLU", "GELU", "SiLU", "Tanh", "Hardswish"])
def test_activations_match_torch_on_cuda(name):
    x = normals(33, 17)
    xs, xf = x.clone().requires_grad_(), x.clone().requires_grad_()
    ys, yf = getattr(torch.nn, name)()(xs), getattr(fnn, name)()(xf)
    torch.testing.assert_close(yf, ys, rtol=1e-5, atol=1e-6)
    ys.sum().backward()
    yf.sum().backward()
    torch.testing.assert_close(xf.grad, xs.grad, rtol=1e-5, atol=1e-6)


def test_training_steps_track_the_stock_model_on_cuda():
    torch.manual_seed(0)
    stock = torch.nn.Sequential(
        torch.nn.Linear(20, 32), torch.nn.BatchNorm1d(32), torch.nn.GELU(), torch.nn.Dropout(0.0),
        torch.nn.Linear(32, 4)).to(device=CUDA, dtype=torch.float64)
    patched = ft.patch(stock, inplace=False).model
    x = normals(64, 20, dtype=torch.float64)
    target = torch.randint(0, 4, (64,), device=CUDA)
    losses = []
    for model in (stock, patched):
        optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
        history = []
        for _ in range(20):
            loss = torch.nn.functional.cross_entropy(model(x), target)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            history.append(loss.item())
        losses.append(history)
    np.testing.assert_allclose(losses[1], losses[0], rtol=1e-5)
