"""Batch norm with the ReLU after it fused, in PyTorch: the operators
(``torch.ops.fusednn.batch_norm(..., relu=True)`` and
``batch_norm_backward(..., relu_output)``) under opcheck and gradcheck in
float64, the same bits as fusednn's functions, ``BatchNormReLU*d`` against
torch's BatchNorm then ReLU (train and eval, NCHW and channels_last), what
``patch`` fuses and what it leaves, ``unpatch``, and compiled models
without graph breaks. Skips when PyTorch is not installed.
"""
from __future__ import annotations

import functools
import re

import numpy as np
import pytest

torch = pytest.importorskip("torch")

import fusednn as fn  # noqa: E402
import fusednn.torch as ft  # noqa: E402
from fusednn.torch import nn as fnn  # noqa: E402
from fusednn.torch import ops  # noqa: E402
from conftest import compiled_training_step, conv_bn_relu_blocks  # noqa: E402

F32, F64 = torch.float32, torch.float64
GEN = torch.Generator().manual_seed(11)
# Dynamo instantiates torch.autograd.Function when it traces one (batch
# norm's autograd), which torch itself deprecates with a warning.
TORCH_AUTOGRAD_FUNCTION_WARNING = "ignore:.*should not be instantiated:DeprecationWarning"


def normals(*shape, dtype=F64, requires_grad=False):
    return torch.randn(*shape, generator=GEN, dtype=dtype).requires_grad_(requires_grad)


# ---- operators ----------------------------------------------------------------------


@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
@pytest.mark.parametrize("training", [True, False])
def test_opcheck(training, layout):
    x = normals(6, 3, 4, 5)
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    weight, bias = normals(3), normals(3)
    mean, var = normals(3), normals(3).abs() + 0.5
    torch.library.opcheck(torch.ops.fusednn.batch_norm.default,
                          (x, weight, bias, mean, var, training, 0.1, 1e-5, 1, True))
    y, save_mean, save_invstd = torch.ops.fusednn.batch_norm(
        x, weight, bias, mean.clone(), var.clone(), training, 0.1, 1e-5, 1, True)
    torch.library.opcheck(torch.ops.fusednn.batch_norm_backward.default,
                          (normals(6, 3, 4, 5), x, weight, save_mean, save_invstd, training, 1, y))


def test_same_bits_as_fusednn():
    x, dy = normals(8, 4, 3, dtype=F32), normals(8, 4, 3, dtype=F32)
    weight, bias = normals(4, dtype=F32), normals(4, dtype=F32)
    y, mean, invstd = torch.ops.fusednn.batch_norm(x, weight, bias, None, None, True, 0.1, 1e-5,
                                                   1, True)
    want = fn.batch_norm(x, weight, bias, activation="relu")
    assert torch.equal(y, want.y) and torch.equal(invstd, want.save_invstd)
    got = torch.ops.fusednn.batch_norm_backward(dy, x, weight, mean, invstd, True, 1, y)
    expected = fn.batch_norm_backward(dy, x, weight, mean, invstd, activation="relu", y=y)
    for a, b in zip(got, expected):
        assert torch.equal(a, b)


@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("shape, axis", [((7, 3), 1), ((5, 3, 4), 1), ((3, 4, 2, 3), -1)])
def test_gradcheck(shape, axis, training):
    channels = shape[axis]
    x = normals(*shape, requires_grad=True)
    weight, bias = normals(channels, requires_grad=True), normals(channels, requires_grad=True)
    mean, var = normals(channels), normals(channels).abs() + 0.5

    def f(x, weight, bias):
        return ops.batch_norm(x, weight, bias, mean.clone(), var.clone(), training, 0.1, 1e-5,
                              axis, relu=True)

    # No output within gradcheck's step of the ReLU's kink.
    plain = ops.batch_norm(x, weight, bias, mean.clone(), var.clone(), training, 0.1, 1e-5, axis)
    assert plain.abs().min() > 1e-4
    assert torch.autograd.gradcheck(f, (x, weight, bias))


@pytest.mark.parametrize("memory_format", [torch.contiguous_format, torch.channels_last])
def test_channels_last_output_and_mixed_layout_gradient(memory_format):
    x = normals(4, 3, 5, 6).contiguous(memory_format=memory_format).requires_grad_()
    weight, bias = normals(3), normals(3)
    y = ops.batch_norm(x, weight, bias, relu=True)
    assert y.is_contiguous(memory_format=memory_format)
    grad = normals(4, 3, 5, 6)  # NCHW whatever x's layout
    (gx,) = torch.autograd.grad(y, x, grad)
    x0 = x.detach().clone().requires_grad_()  # the same layout, so the same statistics
    y0 = torch.relu(ops.batch_norm(x0, weight, bias))
    (want,) = torch.autograd.grad(y0, x0, grad)
    torch.testing.assert_close(y, y0, rtol=0, atol=0)
    torch.testing.assert_close(gx, want, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("dtype", [F32, F64])
@pytest.mark.parametrize("grad_format, relu_format", [
    (torch.contiguous_format, torch.contiguous_format),
    (torch.contiguous_format, torch.channels_last),
    (torch.channels_last, torch.contiguous_format)])
def test_backward_with_gradient_and_output_laid_out_unlike_x(grad_format, relu_format, dtype):
    # What inductor hands the last block's backward: x (a convolution's
    # output) channels_last, the saved output and the pooling's gradient
    # in the traced NCHW strides. Same bits as with everything laid out
    # like x, NaN gradients included, and a result laid out like x.
    cl = torch.channels_last
    x = normals(4, 6, 5, 3, dtype=dtype).contiguous(memory_format=cl)
    weight, bias = normals(6, dtype=dtype), normals(6, dtype=dtype)
    y, mean, invstd = torch.ops.fusednn.batch_norm(x, weight, bias, None, None, True, 0.1,
                                                   1e-5, 1, True)
    grad = normals(4, 6, 5, 3, dtype=dtype).contiguous(memory_format=cl)
    grad[0, 1, :, 0] = float("nan")  # where y > 0 and where y == 0 alike
    want = torch.ops.fusednn.batch_norm_backward(grad, x, weight, mean, invstd, True, 1, y)
    got = torch.ops.fusednn.batch_norm_backward(grad.contiguous(memory_format=grad_format), x,
                                                weight, mean, invstd, True, 1,
                                                y.contiguous(memory_format=relu_format))
    assert got[0].is_contiguous(memory_format=cl)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=0, atol=0, equal_nan=True)


@pytest.mark.parametrize("dtype", [F32, F64])
@pytest.mark.parametrize("relu", [False, True])
@pytest.mark.parametrize("x_format, grad_format", [
    (torch.contiguous_format, torch.contiguous_format),
    (torch.channels_last, torch.channels_last),
    (torch.channels_last, torch.contiguous_format)])
def test_in_place_backward_writes_the_gradients_bits_over_it(x_format, grad_format, relu,
                                                             dtype):
    # batch_norm_backward_in_place: grad_input over grad_output, the same
    # bits as batch_norm_backward's new tensor (NaN gradients included),
    # in place on the quick path (grad_output laid out like x) and through
    # a copy back otherwise; opcheck checks the declared mutation.
    x = normals(4, 6, 5, 3, dtype=dtype).contiguous(memory_format=x_format)
    weight, bias = normals(6, dtype=dtype), normals(6, dtype=dtype)
    y, mean, invstd = torch.ops.fusednn.batch_norm(x, weight, bias, None, None, True, 0.1,
                                                   1e-5, 1, relu)
    relu_output = y if relu else None
    grad = normals(4, 6, 5, 3, dtype=dtype).contiguous(memory_format=grad_format)
    torch.library.opcheck(torch.ops.fusednn.batch_norm_backward_in_place.default,
                          (grad.clone(), x, weight, mean, invstd, True, 1, relu_output))
    grad[0, 1, :, 0] = float("nan")
    want = torch.ops.fusednn.batch_norm_backward(grad, x, weight, mean, invstd, True, 1,
                                                 relu_output)
    written = grad.clone()
    address, version = written.data_ptr(), written._version
    got = torch.ops.fusednn.batch_norm_backward_in_place(written, x, weight, mean, invstd, True,
                                                         1, relu_output)
    assert written.data_ptr() == address and written._version > version
    for g, w in zip((written, *got), want):
        torch.testing.assert_close(g, w, rtol=0, atol=0, equal_nan=True)


def patched_pooled_cnn(strides=(1, 1, 1)):
    """conv_bn_relu_blocks, global average pooling and a linear layer, patched."""
    layers = conv_bn_relu_blocks(strides) + [torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(),
                                             torch.nn.Linear(16, 4)]
    return ft.patch(torch.nn.Sequential(*layers)).model


@functools.lru_cache(maxsize=None)
def compiled_cnn_backward(layout):
    """The generated backward code of an inductor-compiled step of a small
    CNN (three conv-BN-ReLU blocks, pooling, linear) in `layout`, after
    checking the step against eager's."""
    model = patched_pooled_cnn()
    x = normals(4, 3, 6, 6, dtype=F32)
    if layout == "channels_last":
        model = model.to(memory_format=torch.channels_last)
        x = x.contiguous(memory_format=torch.channels_last)
    return compiled_training_step(model, x)[1]


def strides_in(code, name):
    """The strides the generated code gives the buffer or input `name`."""
    found = re.search(rf"{name} = empty_strided_cpu\(\([\d, ]+\), \(([\d, ]+)\)", code) or \
        re.search(rf"assert_size_stride\({name}, \([\d, ]+\), \(([\d, ]+)\)", code)
    return tuple(int(s) for s in found.group(1).split(",") if s.strip())


@pytest.mark.filterwarnings(TORCH_AUTOGRAD_FUNCTION_WARNING)
@pytest.mark.filterwarnings("ignore:.*torch.jit.script_method.*:DeprecationWarning")
@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
def test_inductor_writes_convolution_gradients_over_themselves(layout):
    # Under inductor, a block whose gradient comes straight from a
    # convolution's backward (and is dead after batch norm's backward)
    # runs batch_norm_backward_in_place; the last block, whose gradient
    # comes from the pooling, keeps batch_norm_backward. The step's
    # gradients match eager's.
    backward = compiled_cnn_backward(layout)
    in_place = re.findall(r"fusednn\.batch_norm_backward_in_place\.default\((buf\d+),", backward)
    from_convolutions = {out for out, src in re.findall(r"(buf\d+) = (buf\d+)\[0\]", backward)
                         if f"{src} = torch.ops.aten.convolution_backward" in backward}
    assert len(in_place) == 2 and set(in_place) <= from_convolutions
    assert len(re.findall(r"fusednn\.batch_norm_backward\.default\(", backward)) == 1


@pytest.mark.filterwarnings(TORCH_AUTOGRAD_FUNCTION_WARNING)
@pytest.mark.filterwarnings("ignore:.*torch.jit.script_method.*:DeprecationWarning")
@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
def test_inductor_lays_the_last_blocks_gradient_out_like_x(layout):
    # The last block's gradient comes from the pooling, which inductor
    # computes itself; its layout constraint on batch_norm_backward has
    # it written in x's layout (channels_last, a convolution's output,
    # even in an NCHW model) and the saved output copied to it, so that
    # the kernel takes them as they come. Under inductor's default (the
    # traced NCHW strides) both were NCHW against a channels_last x.
    backward = compiled_cnn_backward(layout)
    (call,) = re.findall(r"fusednn\.batch_norm_backward\.default\((\w+), (\w+), .*, (\w+)\)",
                         backward)
    grad_output, x, relu_output = call
    assert strides_in(backward, x) == (576, 1, 96, 16)  # channels_last (4, 16, 6, 6)
    assert strides_in(backward, grad_output) == strides_in(backward, relu_output) == \
        strides_in(backward, x)
    assert "threshold_backward" not in backward


@pytest.mark.filterwarnings(TORCH_AUTOGRAD_FUNCTION_WARNING)
@pytest.mark.filterwarnings("ignore:.*torch.jit.script_method.*:DeprecationWarning")
def test_inductor_layout_constraint_takes_dynamic_shapes():
    # With dynamic shapes x's strides are symbolic (after strided
    # convolutions, expressions whose order holds only for sizes inductor
    # assumes); the constraint orders them as inductor's own constraints
    # do. The last block's inputs still come laid out like x, and the
    # gradients match eager's.
    model = patched_pooled_cnn(strides=(1, 2, 2))
    code = compiled_training_step(model, normals(4, 3, 12, 12, dtype=F32), dynamic=True)
    assert "fusednn.batch_norm_backward.default(" in code[1]
    assert "threshold_backward" not in code[1]


# ---- modules --------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [F32, F64])
@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
@pytest.mark.parametrize("train", [True, False])
def test_batch_norm_relu_module_matches_torch(train, layout, dtype):
    torch.manual_seed(0)
    stock = torch.nn.Sequential(torch.nn.BatchNorm2d(5), torch.nn.ReLU()).to(dtype)
    with torch.no_grad():
        stock[0].weight.uniform_(0.5, 1.5)
        stock[0].bias.normal_()
        stock[0].running_mean.normal_()
        stock[0].running_var.uniform_(0.5, 2.0)
    patched = ft.patch(stock, inplace=False).model
    assert type(patched[0]) is fnn.BatchNormReLU2d and type(patched[1]) is fnn.FoldedReLU
    stock.train(train)
    patched.train(train)
    x = normals(6, 5, 7, 4, dtype=dtype)
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    xs, xp = x.clone().requires_grad_(), x.clone().requires_grad_()
    ys, yp = stock(xs), patched(xp)
    tol = {F32: 1e-5, F64: 1e-10}[dtype]
    torch.testing.assert_close(yp, ys, rtol=tol, atol=tol)
    if layout == "channels_last":
        assert yp.is_contiguous(memory_format=torch.channels_last)
    grad = normals(6, 5, 7, 4, dtype=dtype)
    ys.backward(grad)
    yp.backward(grad)
    torch.testing.assert_close(xp.grad, xs.grad, rtol=tol, atol=tol)
    for a, b in zip(patched.parameters(), stock.parameters()):
        torch.testing.assert_close(a.grad, b.grad, rtol=tol, atol=tol * 10)
    for a, b in zip(patched.buffers(), stock.buffers()):
        torch.testing.assert_close(a, b, rtol=tol, atol=tol)


def test_unsupported_dtype_falls_back_to_torch_with_the_relu(monkeypatch):
    # bfloat16 without ml_dtypes is a configuration fusednn cannot run
    monkeypatch.setattr(fnn, "_bfloat16_readable", lambda: False)
    module = fnn.BatchNormReLU1d(4).to(torch.bfloat16)
    x = normals(8, 4, dtype=F32).to(torch.bfloat16)
    expected = torch.relu(torch.nn.functional.batch_norm(
        x, torch.zeros(4, dtype=torch.bfloat16), torch.ones(4, dtype=torch.bfloat16),
        module.weight, module.bias, True, 0.1, 1e-5))
    torch.testing.assert_close(module(x), expected)


# ---- patch ------------------------------------------------------------------------------


def cnn():
    return torch.nn.Sequential(
        torch.nn.Conv2d(3, 8, 3, padding=1, bias=False), torch.nn.BatchNorm2d(8),
        torch.nn.ReLU(inplace=True),
        torch.nn.Conv2d(8, 8, 3, padding=1, bias=False), torch.nn.BatchNorm2d(8), torch.nn.ReLU(),
        torch.nn.BatchNorm2d(8), torch.nn.GELU(),
        torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(8, 4))


def test_patch_fuses_batch_norm_then_relu_and_unpatch_restores():
    model = cnn()
    keys = list(model.state_dict())
    result = ft.patch(model)
    assert result.replaced == {"BatchNormReLU2d": 2, "FoldedReLU": 2, "BatchNorm2d": 1,
                               "GELU": 1}
    assert type(model[1]) is fnn.BatchNormReLU2d and type(model[2]) is fnn.FoldedReLU
    assert type(model[6]) is fnn.BatchNorm2d  # followed by GELU: not fused
    assert list(model.state_dict()) == keys
    restored = ft.unpatch(model)
    assert restored.replaced == {"BatchNorm2d": 3, "ReLU": 2, "GELU": 1}
    assert [type(m) for m in model] == [type(m) for m in cnn()]
    assert model[2].inplace


def test_patch_without_fusing():
    model = cnn()
    model[2].inplace = False
    result = ft.patch(model, fuse=False)
    assert result.replaced == {"BatchNorm2d": 3, "ReLU": 2, "GELU": 1}


def test_shared_relu_hooks_and_custom_blocks_are_not_fused():
    shared = torch.nn.ReLU()
    hooked = torch.nn.Sequential(torch.nn.BatchNorm1d(4), torch.nn.ReLU())
    hooked[0].register_forward_hook(lambda *args: None)

    class Block(torch.nn.Module):  # a ResNet-like block: the order is in forward
        def __init__(self):
            super().__init__()
            self.bn = torch.nn.BatchNorm1d(4)
            self.relu = torch.nn.ReLU()

        def forward(self, x):
            return self.relu(self.bn(x) + x)

    model = torch.nn.Sequential(torch.nn.BatchNorm1d(4), shared, torch.nn.Linear(4, 4), shared,
                                hooked, Block())
    result = ft.patch(model)
    assert "BatchNormReLU1d" not in result.replaced and "FoldedReLU" not in result.replaced
    assert type(model[0]) is fnn.BatchNorm1d and type(model[1]) is fnn.ReLU
    assert type(model[4][0]) is fnn.BatchNorm1d and type(model[5].relu) is fnn.ReLU


@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
def test_fused_model_trains_as_the_stock_model(layout):
    torch.manual_seed(0)
    stock = cnn().to(F64)
    patched = ft.patch(stock, inplace=False).model
    memory_format = torch.channels_last if layout == "channels_last" else torch.contiguous_format
    stock, patched = (m.to(memory_format=memory_format) for m in (stock, patched))
    inputs = [normals(4, 3, 6, 6).contiguous(memory_format=memory_format) for _ in range(3)]
    targets = [torch.randint(0, 4, (4,), generator=GEN) for _ in range(3)]
    losses = {}
    for label, model in (("stock", stock), ("patched", patched)):
        optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
        losses[label] = []
        for step in range(20):
            loss = torch.nn.functional.cross_entropy(model(inputs[step % 3]), targets[step % 3])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            losses[label].append(loss.item())
    np.testing.assert_allclose(losses["patched"], losses["stock"], rtol=1e-8)


@pytest.mark.filterwarnings(TORCH_AUTOGRAD_FUNCTION_WARNING)
def test_compiled_fused_model_has_no_graph_break():
    torch._dynamo.reset()
    torch.manual_seed(0)
    model = cnn()
    ft.patch(model)
    eager = cnn()
    eager.load_state_dict(model.state_dict())
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    x = normals(4, 3, 6, 6, dtype=F32)
    y = compiled(x)
    y.sum().backward()
    assert all(p.grad is not None for p in model.parameters())
    assert int(model[1].num_batches_tracked) == 1
    want = eager(x)
    torch.testing.assert_close(y, want, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("relu", [False, True])
def test_eager_calls_skip_the_dispatcher_and_traces_keep_the_operator(relu):
    # Eager autograd runs the kernel functions directly; anything that
    # traces (here make_fx, a dispatch mode) must still see the operators.
    from torch.fx.experimental.proxy_tensor import make_fx

    x, weight, bias = normals(6, 3, 4), normals(3), normals(3)
    eager = ops.batch_norm(x.requires_grad_(), weight, bias, None, None, True, 0.1, 1e-5, 1,
                           relu=relu)
    via_op = torch.ops.fusednn.batch_norm(x.detach(), weight, bias, None, None, True, 0.1, 1e-5,
                                          1, relu)[0]
    assert torch.equal(eager, via_op)

    def step(x, g):
        y = ops.batch_norm(x, weight, bias, None, None, True, 0.1, 1e-5, 1, relu=relu)
        return torch.autograd.grad(y, x, g)[0]

    graph = make_fx(step)(x.detach().requires_grad_(), normals(6, 3, 4))
    targets = {str(node.target) for node in graph.graph.nodes if node.op == "call_function"}
    assert {"fusednn.batch_norm.default", "fusednn.batch_norm_backward.default"} <= targets
