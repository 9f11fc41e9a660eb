"""The ``torch.ops.fusednn`` operators: ``torch.library.opcheck`` (schema,
fake implementation, autograd registration, AOT dispatch) for every
operator, gradcheck in float64 for every differentiable one and
gradgradcheck where double backward is registered, the same bits as
fusednn's functions, dropout's mask as DESIGN section 5 draws it for the
``[seed, offset]`` pair, and tracing under ``torch.compile(fullgraph=True)``
and ``torch.export``; the eager Functions bypass the dispatcher while
traces keep the operators, and inductor passes convolution outputs to
batch norm without layout copies. Skips when PyTorch is not installed.
"""
from __future__ import annotations

import re

import numpy as np
import pytest

torch = pytest.importorskip("torch")

import fusednn as fn  # noqa: E402
from fusednn.torch import ops  # noqa: E402
from conftest import compiled_training_step, conv_bn_relu_blocks  # noqa: E402

F64 = torch.float64
GEN = torch.Generator().manual_seed(5)

# Each activation with parameters other than its defaults, where it has any.
ACTIVATION_CASES = [
    ("sigmoid", {}), ("tanh", {}), ("relu", {}), ("leaky_relu", {"negative_slope": 0.2}),
    ("leaky_relu", {"negative_slope": -0.3}), ("elu", {"alpha": 0.7}), ("selu", {}),
    ("gelu", {"approximate": "none"}), ("gelu", {"approximate": "tanh"}), ("silu", {}),
    ("softplus", {"beta": 2.0, "threshold": 3.0}), ("mish", {}), ("hardsigmoid", {}),
    ("hardswish", {}), ("hardtanh", {"min_val": -0.5, "max_val": 2.0}),
]
CASE_IDS = [f"{name}-{'-'.join(map(str, params.values()))}" for name, params in ACTIVATION_CASES]


def normals(*shape, dtype=F64, requires_grad=False, scale=1.0):
    t = torch.randn(*shape, generator=GEN, dtype=dtype) * scale
    return t.requires_grad_(requires_grad)


def rng_pair(seed=123456789, offset=42):
    return torch.tensor([seed, offset], dtype=torch.int64)


def test_every_kernel_is_an_operator():
    names = {name for name in dir(torch.ops.fusednn) if not name.startswith("_")}
    expected = set(fn.ACTIVATIONS) | {f"{a}_backward" for a in fn.ACTIVATIONS} | {
        "batch_norm", "batch_norm_backward", "dropout", "dropout_backward", "dropout_with_mask",
        "dropout_backward_with_mask", "bias_act_dropout", "bias_act_dropout_backward"}
    assert expected <= names


# ---- activations ------------------------------------------------------------------


@pytest.mark.parametrize("name, params", ACTIVATION_CASES, ids=CASE_IDS)
def test_activation_opcheck(name, params):
    op = getattr(torch.ops.fusednn, name)
    x = normals(5, 7, scale=3.0, requires_grad=True)
    torch.library.opcheck(op.default, (x,), params)
    backward = getattr(torch.ops.fusednn, f"{name}_backward")
    torch.library.opcheck(backward.default, (normals(5, 7), x.detach(), False), params)


@pytest.mark.parametrize("name, params", ACTIVATION_CASES, ids=CASE_IDS)
def test_activation_gradcheck(name, params):
    x = normals(4, 6, scale=2.0, requires_grad=True)
    assert torch.autograd.gradcheck(lambda t: ops.activation(name, t, **params), (x,))


@pytest.mark.parametrize("name, params", [c for c in ACTIVATION_CASES
                                          if c[0] in ("relu", "leaky_relu", "hardtanh")])
def test_piecewise_linear_activation_gradgradcheck(name, params):
    x = normals(4, 6, scale=2.0, requires_grad=True)
    assert torch.autograd.gradgradcheck(lambda t: ops.activation(name, t, **params), (x,))


@pytest.mark.parametrize("dtype", [torch.float32, F64])
@pytest.mark.parametrize("name, params", ACTIVATION_CASES, ids=CASE_IDS)
def test_activation_same_bits_as_fusednn(name, params, dtype):
    x = normals(33, 9, dtype=dtype, scale=3.0, requires_grad=True)
    y = ops.activation(name, x, **params)
    assert torch.equal(y, fn.activation(name, x.detach(), **params))
    g = normals(33, 9, dtype=dtype)
    (gx,) = torch.autograd.grad(y, x, g)
    # Autograd forms the derivative from y where fusednn can, as
    # activation_backward does when given both.
    assert torch.equal(gx, fn.activation_backward(name, g, x=x.detach(), y=y.detach(),
                                                  **params))
    assert torch.equal(ops.activation_backward(name, g, x.detach(), **params),
                       fn.activation_backward(name, g, x=x.detach(), **params))


ODD_TENSORS = {
    "0-d": lambda: torch.tensor(0.5, dtype=F64),
    "empty": lambda: torch.empty(0, 3, dtype=F64),
    "transposed": lambda: normals(6, 8).t(),
    "strided": lambda: normals(6, 8)[:, ::2],
}


@pytest.mark.parametrize("kind", ODD_TENSORS)
def test_odd_shapes_and_strides(kind):
    x = ODD_TENSORS[kind]()
    for name in ("gelu", "tanh"):
        torch.library.opcheck(getattr(torch.ops.fusednn, name).default, (x,))
        torch.testing.assert_close(ops.activation(name, x),
                                   getattr(torch.nn.functional, name)(x))
    torch.library.opcheck(torch.ops.fusednn.dropout.default, (x, 0.3, rng_pair()))
    leaf = x.detach().clone().requires_grad_()
    y = ops.dropout(ops.activation("tanh", leaf), 0.3, rng_pair())
    (y.mT if y.dim() == 2 else y).sum().backward()  # a transposed gradient too
    expected = (y.detach() != 0) / 0.7 * (1 - torch.tanh(x) ** 2)
    torch.testing.assert_close(leaf.grad, expected)


def test_relu_saves_its_output_and_gelu_its_input():
    # Backward from y lets the forward input be freed when only y lives on.
    x = normals(6, 4, requires_grad=True)
    y = ops.activation("relu", x)
    (saved,) = y.grad_fn.saved_tensors
    assert saved.data_ptr() == y.data_ptr()
    y = ops.activation("gelu", x)
    (saved,) = y.grad_fn.saved_tensors
    assert saved.data_ptr() == x.data_ptr()


def test_unknown_activation_is_a_value_error():
    with pytest.raises(ValueError, match="unknown activation 'swish'"):
        ops.activation("swish", normals(3))


# ---- batch normalization ----------------------------------------------------------


@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("affine", [True, False])
def test_batch_norm_opcheck(training, affine):
    x = normals(6, 3, 5)
    weight, bias = (normals(3), normals(3)) if affine else (None, None)
    mean, var = normals(3), normals(3).abs() + 0.5
    torch.library.opcheck(torch.ops.fusednn.batch_norm.default,
                          (x, weight, bias, mean, var, training, 0.1, 1e-5, 1))
    result = torch.ops.fusednn.batch_norm(x, weight, bias, mean.clone(), var.clone(), training,
                                          0.1, 1e-5, 1)
    torch.library.opcheck(torch.ops.fusednn.batch_norm_backward.default,
                          (normals(6, 3, 5), x, weight, result[1], result[2], training, 1))


def test_batch_norm_updates_running_statistics_as_fusednn():
    x = normals(16, 4, 3, dtype=torch.float32)
    mean, var = torch.zeros(4), torch.ones(4)
    expected_mean, expected_var = mean.clone(), var.clone()
    y, save_mean, save_invstd = torch.ops.fusednn.batch_norm(x, None, None, mean, var, True,
                                                             0.3, 1e-5, 1)
    reference = fn.batch_norm(x, None, None, expected_mean, expected_var, momentum=0.3)
    assert torch.equal(y, reference.y) and torch.equal(save_invstd, reference.save_invstd)
    assert torch.equal(mean, expected_mean) and torch.equal(var, expected_var)
    assert not torch.equal(mean, torch.zeros(4))


@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("shape, axis", [((7, 3), 1), ((5, 3, 4), 1), ((3, 4, 2, 3), -1)])
def test_batch_norm_gradcheck(shape, axis, training):
    channels = shape[axis]
    x = normals(*shape, requires_grad=True)
    weight, bias = normals(channels, requires_grad=True), normals(channels, requires_grad=True)
    mean, var = normals(channels), normals(channels).abs() + 0.5

    def f(x, weight, bias):
        # Fresh statistics per call: gradcheck calls f many times.
        return ops.batch_norm(x, weight, bias, mean.clone(), var.clone(), training, 0.1, 1e-5,
                              axis)

    assert torch.autograd.gradcheck(f, (x, weight, bias))


def test_batch_norm_without_weight_gradcheck():
    x = normals(6, 3, requires_grad=True)
    assert torch.autograd.gradcheck(lambda t: ops.batch_norm(t), (x,))
    y = ops.batch_norm(x, normals(3, requires_grad=True), None)
    y.sum().backward()  # no grad for the missing bias, and no error


@pytest.mark.parametrize("dims, memory_format", [(4, torch.channels_last),
                                                 (5, torch.channels_last_3d)])
def test_batch_norm_keeps_channels_last(dims, memory_format):
    shape = (4, 3, 5, 6, 2)[:dims]
    x = normals(*shape).contiguous(memory_format=memory_format).requires_grad_()
    y = ops.batch_norm(x, normals(3), normals(3))
    assert y.is_contiguous(memory_format=memory_format)
    (gx,) = torch.autograd.grad(y, x, normals(*shape))
    expected = ops.batch_norm(x.detach().contiguous())
    torch.testing.assert_close(ops.batch_norm(x.detach()), expected, rtol=0, atol=1e-12)
    assert gx.shape == x.shape


def test_channels_last_opcheck_and_gradients_with_mixed_layouts():
    # channels_last tensors run as their channels-last views; a gradient
    # in the other layout must still meet the right elements.
    x = normals(4, 3, 5, 6).contiguous(memory_format=torch.channels_last)
    weight, bias = normals(3), normals(3)
    torch.library.opcheck(torch.ops.fusednn.batch_norm.default,
                          (x, weight, bias, None, None, True, 0.1, 1e-5, 1))
    _, mean, invstd = torch.ops.fusednn.batch_norm(x, weight, bias, None, None, True, 0.1,
                                                   1e-5, 1)
    grad = normals(4, 3, 5, 6)  # NCHW
    torch.library.opcheck(torch.ops.fusednn.batch_norm_backward.default,
                          (grad, x, weight, mean, invstd, True, 1))
    expected = ops.batch_norm_backward(grad, x.contiguous(), weight, mean, invstd, True, 1)
    for got, want in zip(ops.batch_norm_backward(grad, x, weight, mean, invstd, True, 1),
                         expected):
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    torch.library.opcheck(torch.ops.fusednn.gelu_backward.default, (grad, x, False))
    torch.testing.assert_close(ops.activation_backward("gelu", grad, x),
                               ops.activation_backward("gelu", grad, x.contiguous()),
                               rtol=0, atol=0)
    torch.library.opcheck(torch.ops.fusednn.relu.default, (x,))


# ---- dropout -----------------------------------------------------------------------


@pytest.mark.parametrize("seed, offset", [(123456789, 42), (-5, -(1 << 63))])
def test_dropout_mask_is_the_counter_based_one(seed, offset):
    x = torch.ones(7, 13, dtype=F64)
    y = ops.dropout(x, 0.25, rng_pair(seed, offset))
    mask = fn.dropout_mask(x.shape, 0.25, seed=seed % (1 << 64), offset=offset % (1 << 64))
    bits = np.unpackbits(mask, bitorder="little")[:x.numel()].reshape(x.shape)
    np.testing.assert_array_equal(y.numpy(), bits / 0.75)
    y2, packed = ops.dropout_with_mask(x, 0.25, rng_pair(seed, offset))
    assert torch.equal(y, y2)
    np.testing.assert_array_equal(packed.numpy(), mask)


def test_dropout_opcheck_gradcheck_and_gradgradcheck():
    x = normals(9, 5, requires_grad=True)
    for op in (torch.ops.fusednn.dropout, torch.ops.fusednn.dropout_with_mask):
        torch.library.opcheck(op.default, (x, 0.3, rng_pair()))
    torch.library.opcheck(torch.ops.fusednn.dropout_backward.default,
                          (normals(9, 5, requires_grad=True), 0.3, rng_pair()))
    _, mask = ops.dropout_with_mask(x, 0.3, rng_pair())
    torch.library.opcheck(torch.ops.fusednn.dropout_backward_with_mask.default,
                          (normals(9, 5, requires_grad=True), mask, 0.3))
    for f in (lambda t: ops.dropout(t, 0.3, rng_pair()),
              lambda t: ops.dropout_with_mask(t, 0.3, rng_pair())[0]):
        assert torch.autograd.gradcheck(f, (x,))
        assert torch.autograd.gradgradcheck(f, (x,))


def test_dropout_backward_regenerates_the_forward_mask():
    x = normals(40, 30, requires_grad=True)
    y = ops.dropout(x, 0.4, rng_pair(7, 8))
    (gx,) = torch.autograd.grad(y, x, torch.ones_like(y))
    assert torch.equal(gx != 0, y != 0)
    y2, _ = ops.dropout_with_mask(x, 0.4, rng_pair(7, 8))
    (gx2,) = torch.autograd.grad(y2, x, torch.ones_like(y))
    assert torch.equal(gx, gx2)


def test_draw_rng_follows_manual_seed():
    torch.manual_seed(3)
    first = ops.draw_rng()
    torch.manual_seed(3)
    assert torch.equal(ops.draw_rng(), first)
    assert not torch.equal(ops.draw_rng(), first)
    assert torch.equal(ops.draw_rng(torch.Generator().manual_seed(9)),
                       ops.draw_rng(torch.Generator().manual_seed(9)))


# ---- bias + activation + dropout ------------------------------------------------------


@pytest.mark.parametrize("act, params, axis", [
    ("relu", {}, -1), ("gelu", {"approximate": "tanh"}, 1), ("elu", {"alpha": 0.5}, -1),
    ("softplus", {"beta": 2.0}, 1)])
def test_bias_act_dropout_opcheck_and_gradcheck(act, params, axis):
    h = normals(6, 5, 3, requires_grad=True)
    bias = normals(h.shape[axis], requires_grad=True)
    args = (h, bias, act, 0.2, rng_pair(), axis)
    torch.library.opcheck(torch.ops.fusednn.bias_act_dropout.default, args, params)
    torch.library.opcheck(torch.ops.fusednn.bias_act_dropout_backward.default,
                          (normals(6, 5, 3), h.detach(), bias.detach()) + args[2:], params)
    assert torch.autograd.gradcheck(
        lambda h, b: ops.bias_act_dropout(h, b, act, 0.2, rng_pair(), axis, **params), (h, bias))


def test_bias_act_dropout_is_the_three_ops():
    h, bias = normals(20, 8, dtype=torch.float32), normals(8, dtype=torch.float32)
    fused = ops.bias_act_dropout(h, bias, "gelu", 0.3, rng_pair(1, 2), approximate="tanh")
    separate = ops.dropout(torch.nn.functional.gelu(h + bias, approximate="tanh"), 0.3,
                           rng_pair(1, 2))
    torch.testing.assert_close(fused, separate, rtol=1e-6, atol=1e-6)


# ---- tracing ------------------------------------------------------------------------


def every_op(x, weight, bias, mean, var, rng):
    y = ops.batch_norm(x, weight, bias, mean, var, True, 0.1, 1e-5, 1)
    y = ops.activation("gelu", y, approximate="tanh") + ops.activation("leaky_relu", y)
    y = ops.dropout(y, 0.2, rng) + ops.dropout_with_mask(y, 0.1, rng)[0]
    return ops.bias_act_dropout(y, bias, "silu", 0.3, rng, 1)


def every_op_inputs(requires_grad):
    return (normals(8, 4, 3, requires_grad=requires_grad),
            normals(4, requires_grad=requires_grad), normals(4, requires_grad=requires_grad),
            torch.zeros(4, dtype=F64), torch.ones(4, dtype=F64), rng_pair())


# Dynamo instantiates torch.autograd.Function when it traces one (batch
# norm's autograd), which torch itself deprecates with a warning.
TORCH_AUTOGRAD_FUNCTION_WARNING = "ignore:.*should not be instantiated:DeprecationWarning"


@pytest.mark.filterwarnings(TORCH_AUTOGRAD_FUNCTION_WARNING)
def test_compile_fullgraph_traces_every_op_forward_and_backward():
    torch._dynamo.reset()
    eager_inputs, compiled_inputs = every_op_inputs(True), every_op_inputs(True)
    for a, b in zip(eager_inputs, compiled_inputs):
        b.data.copy_(a.data)
    compiled = torch.compile(every_op, fullgraph=True, backend="aot_eager")
    expected, got = every_op(*eager_inputs), compiled(*compiled_inputs)
    torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-12)
    g = normals(*expected.shape)
    for a, b in zip(torch.autograd.grad(expected, eager_inputs[:3], g),
                    torch.autograd.grad(got, compiled_inputs[:3], g)):
        torch.testing.assert_close(b, a, rtol=1e-12, atol=1e-12)
    # The running statistics were updated in place by the compiled graph too.
    torch.testing.assert_close(compiled_inputs[3], eager_inputs[3], rtol=0, atol=0)


def test_export_keeps_the_operators():
    class Block(torch.nn.Module):
        def forward(self, x, rng):
            return every_op(x, torch.ones(4, dtype=F64), torch.zeros(4, dtype=F64),
                            torch.zeros(4, dtype=F64), torch.ones(4, dtype=F64), rng)

    exported = torch.export.export(Block(), every_op_inputs(False)[:1] + (rng_pair(),))
    targets = {str(node.target) for node in exported.graph.nodes if node.op == "call_function"}
    assert {"fusednn.batch_norm.default", "fusednn.gelu.default", "fusednn.dropout.default",
            "fusednn.bias_act_dropout.default"} <= targets


# ---- the eager path and the compiled path -----------------------------------------


def fusednn_operators_run(step) -> set:
    """The fusednn operators the dispatcher saw while step() ran."""
    with torch.profiler.profile() as profile:
        step()
    return {event.name for event in profile.events() if event.name.startswith("fusednn::")}


def test_eager_calls_skip_the_dispatcher():
    # ops.activation, ops.dropout and ops.batch_norm run the kernel
    # functions themselves in eager mode, forward and backward; the
    # operators' own autograd still serves direct callers.
    x = normals(6, 3, 4, requires_grad=True)
    weight, bias = normals(3, requires_grad=True), normals(3, requires_grad=True)

    def step():
        y = ops.activation("gelu", x, approximate="tanh")
        y = ops.dropout(y, 0.3, rng_pair())
        y = ops.batch_norm(y, weight, bias, None, None, True, 0.1, 1e-5, 1, relu=True)
        y = ops.bias_act_dropout(y, bias, "leaky_relu", 0.2, rng_pair(), 1, negative_slope=0.3)
        y.sum().backward()

    assert fusednn_operators_run(step) == set()
    assert fusednn_operators_run(
        lambda: torch.ops.fusednn.gelu(x).sum().backward()) == {"fusednn::gelu",
                                                                 "fusednn::gelu_backward"}


def test_eager_functions_match_the_operators():
    x = normals(7, 5, requires_grad=True)
    g, bias = normals(7, 5), normals(5)
    for f, op in ((lambda t: ops.activation("elu", t, alpha=0.7),
                   lambda t: torch.ops.fusednn.elu(t, alpha=0.7)),
                  (lambda t: ops.dropout(t, 0.4, rng_pair(3, 4)),
                   lambda t: torch.ops.fusednn.dropout(t, 0.4, rng_pair(3, 4))),
                  (lambda t: ops.bias_act_dropout(t, bias, "softplus", 0.3, rng_pair(), beta=2.0),
                   lambda t: torch.ops.fusednn.bias_act_dropout(t, bias, "softplus", 0.3,
                                                                rng_pair(), beta=2.0))):
        expected, got = op(x), f(x)
        assert torch.equal(got, expected)
        assert torch.equal(torch.autograd.grad(got, x, g)[0],
                           torch.autograd.grad(expected, x, g)[0])


def test_make_fx_records_the_activation_and_dropout_operators():
    from torch.fx.experimental.proxy_tensor import make_fx

    def step(x, g):
        y = ops.dropout(ops.activation("silu", x), 0.2, rng_pair())
        return torch.autograd.grad(y, x, g)[0]

    graph = make_fx(step)(normals(4, 5, requires_grad=True), normals(4, 5))
    targets = {str(node.target) for node in graph.graph.nodes if node.op == "call_function"}
    assert {"fusednn.silu.default", "fusednn.silu_backward.default", "fusednn.dropout.default",
            "fusednn.dropout_backward.default"} <= targets


def test_batch_norm_operators_refuse_to_record_a_gradient():
    x, weight = normals(6, 3, requires_grad=True), normals(3)
    with pytest.raises(RuntimeError, match="fusednn::batch_norm has no autograd formula"):
        torch.ops.fusednn.batch_norm(x, weight, None, None, None, True, 0.1, 1e-5, 1)
    with pytest.raises(RuntimeError, match="fusednn::batch_norm_backward has no autograd"):
        torch.ops.fusednn.batch_norm_backward(normals(6, 3), x, weight, normals(3), normals(3),
                                              True, 1)
    with torch.no_grad():  # without a gradient to record, the call goes through
        y, _, _ = torch.ops.fusednn.batch_norm(x, weight, None, None, None, True, 0.1, 1e-5, 1)
    assert torch.equal(y, ops.batch_norm(x.detach(), weight, None, None, None, True, 0.1, 1e-5,
                                         1))


def test_batch_norm_bumps_the_running_statistics_versions():
    mean, var = torch.zeros(3, dtype=F64), torch.ones(3, dtype=F64)
    versions = mean._version, var._version
    ops.batch_norm(normals(6, 3), None, None, mean, var, True, 0.1, 1e-5, 1)
    assert mean._version > versions[0] and var._version > versions[1]
    versions = mean._version, var._version
    ops.batch_norm(normals(6, 3), None, None, mean, var, False, 0.1, 1e-5, 1)
    assert (mean._version, var._version) == versions  # inference only reads them


@pytest.mark.filterwarnings(TORCH_AUTOGRAD_FUNCTION_WARNING)
# Inductor's own code calls a deprecated torch.jit decorator.
@pytest.mark.filterwarnings("ignore:.*torch.jit.script_method.*:DeprecationWarning")
def test_inductor_hands_convolution_outputs_to_batch_norm_as_they_are():
    # On the CPU inductor keeps convolution outputs channels_last; batch
    # norm's flexible_layout tag lets it pass them on without a copy to the
    # NCHW strides seen when tracing. Checked on the generated code of a
    # training step, and the step against eager.
    import fusednn.torch as ft

    model = ft.patch(torch.nn.Sequential(*conv_bn_relu_blocks())).model
    code = compiled_training_step(model, torch.randn(2, 3, 8, 8))
    forward = code[0]
    convolutions = set(re.findall(r"(buf\d+) = extern_kernels\.convolution\(", forward))
    batch_norm_inputs = re.findall(r"torch\.ops\.fusednn\.batch_norm\.default\((buf\d+),",
                                   forward)
    assert len(batch_norm_inputs) == 3 and set(batch_norm_inputs) <= convolutions
