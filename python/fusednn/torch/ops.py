"""fusednn's kernels as PyTorch operators: ``torch.ops.fusednn.*``.

Each kernel is an operator of the ``fusednn`` namespace, defined with its
schema on a ``torch.library.Library`` and implemented for the CPU and CUDA
dispatch keys by a plain Python function, with a fake (meta)
implementation that propagates shape, dtype, strides and device, so that
``torch.compile(fullgraph=True)`` and ``torch.export`` trace through it,
and an autograd formula whose backward is fusednn's own backward kernel,
itself an operator here. The implementations call fusednn's public
functions on the tensors (CPU tensors are viewed as numpy arrays, CUDA
tensors as CuPy arrays, without copies), writing into outputs allocated
here by torch, so that results keep the input's memory format
(channels_last stays channels_last) and CUDA memory comes from torch's
caching allocator; the batch-norm kernels first try the CPU module's
quick paths, one compiled call for an ordinary call on CPU tensors.

Why not ``torch.library.custom_op``: it wraps every call in layers of
Python (its own autograd and ADInplaceOrView kernels, a backend wrapper,
argument defaults, a dynamo-disable wrapper) that cost a batch-norm call
about 70 us on top of the kernel's 30 us, and a compiled graph calls the
operators through all of them. A kernel registered per dispatch key is
one Python call behind the C++ dispatcher. Batch norm and the
activations carry the ``flexible_layout`` tag: they take any strides
(channels_last included) and their outputs follow the input's, so that
inductor, which keeps convolution outputs channels_last on the CPU, does
not copy them to NCHW and back around each operator. Batch norm's
backward instead has inductor lay grad_output and relu_output out like x
(``_laid_out_like_x``).

Dropout takes its random stream as ``rng``, a CPU int64 tensor
``[seed, offset]`` (read modulo 2**64), rather than Python integers: a
compiled graph can then draw it with ``torch.randint`` without a host
synchronisation or a recompilation per step. The mask is the one
``fusednn.dropout`` draws for that (seed, offset); backward regenerates it
from ``rng`` (``dropout``, ``bias_act_dropout``) or reads the bit-packed
mask saved by the forward (``dropout_with_mask``), never a byte mask.

``fusednn::batch_norm`` declares that it mutates ``running_mean`` and
``running_var``, which its fused kernel updates in place; torch.library
attaches autograd formulas to functional operators only (register_autograd
raises for this schema), so its autograd is an ``autograd.Function``
around it (``batch_norm`` here), which ``torch.compile`` traces as well.
``relu=True`` fuses a ReLU after the normalization: the forward returns
``relu(batch_norm(x))`` from the same pass, the autograd saves that output,
and ``fusednn::batch_norm_backward`` masks grad_output with it
(``relu_output``) inside its own passes. ``fusednn::batch_norm_backward_in_place``
writes grad_input over grad_output instead of into a new tensor; it is
offered to inductor's reinplacing pass as batch_norm_backward's in-place
form, which inductor takes where that gradient is dead afterwards, as its
own batch-norm backward writes into a dead buffer (see
``_offer_in_place_backward_to_inductor``). Double backward is registered where the
backward is linear in the gradient and constant in the saved tensor, so
that it is its own derivative: dropout (both forms) and the
piecewise-linear activations relu, leaky_relu and hardtanh.

The differentiable functions here (``activation``, ``batch_norm``,
``dropout``, ``bias_act_dropout``) are ``autograd.Function``s that, in
plain eager mode, call the kernel functions themselves rather than the
operators: the dispatcher adds nothing inside a Function that already does
autograd, and an operator's registered autograd binds its arguments with
``inspect`` on every call. Under tracing they call the operators, so that a
graph holds them as single nodes.
"""
from __future__ import annotations

import operator
import sys
from typing import Optional

import torch
from torch import Tensor
from torch.utils._python_dispatch import _len_torch_dispatch_stack

import fusednn as fn
from fusednn import _arrays, _cpu

__all__ = [
    "ACTIVATION_PARAMETERS", "activation", "activation_backward", "batch_norm",
    "batch_norm_backward", "batch_norm_backward_in_place", "bias_act_dropout", "bias_act_dropout_backward", "draw_rng", "dropout",
    "dropout_backward", "dropout_backward_with_mask", "dropout_with_mask",
]

_UINT64 = 1 << 64

# Each activation's keyword parameters with PyTorch's defaults, in the
# order of torch.nn.functional's signatures; the schemas are built from it.
ACTIVATION_PARAMETERS: dict[str, tuple[tuple[str, str, object], ...]] = {
    "sigmoid": (),
    "tanh": (),
    "relu": (),
    "leaky_relu": (("negative_slope", "float", 0.01),),
    "elu": (("alpha", "float", 1.0),),
    "selu": (),
    "gelu": (("approximate", "str", "none"),),
    "silu": (),
    "softplus": (("beta", "float", 1.0), ("threshold", "float", 20.0)),
    "mish": (),
    "hardsigmoid": (),
    "hardswish": (),
    "hardtanh": (("min_val", "float", -1.0), ("max_val", "float", 1.0)),
}

# Activations whose derivative fusednn forms from the forward output y
# (with the parameter condition that makes y enough). Saving y instead of
# x lets the forward input be freed when only the next layer needs y.
_FROM_OUTPUT = {
    "sigmoid": None, "tanh": None, "relu": None, "selu": None, "hardtanh": None,
    "leaky_relu": "negative_slope", "elu": "alpha",
}

# The piecewise-linear activations: their backward is linear in
# grad_output and constant in the saved tensor (almost everywhere), so its
# own gradient is the backward again.
_PIECEWISE_LINEAR = ("relu", "leaky_relu", "hardtanh")


def _memory_format(x: Tensor) -> torch.memory_format:
    """channels_last (4-d) or channels_last_3d (5-d) when x is laid out so
    and not also C-contiguous, else contiguous_format."""
    if x.dim() == 4 and not x.is_contiguous() and \
            x.is_contiguous(memory_format=torch.channels_last):
        return torch.channels_last
    if x.dim() == 5 and not x.is_contiguous() and \
            x.is_contiguous(memory_format=torch.channels_last_3d):
        return torch.channels_last_3d
    return torch.contiguous_format


def _in_memory_order(layout: Tensor, *tensors: Tensor) -> tuple[Tensor, ...]:
    """The tensors (of layout's shape) with their channels moved last when
    `layout` is channels_last: for tensors laid out like it, the same
    memory seen C-contiguous, which the kernels stream through, where the
    NCHW view would have them stride across it. One decision for all, so
    that elementwise operands keep meeting element for element."""
    if _memory_format(layout) == torch.contiguous_format:
        return tensors
    return tuple(t.movedim(1, -1) for t in tensors)


def _schema_default(value) -> str:
    return f"'{value}'" if isinstance(value, str) else repr(value)


def _parameter_schema(name: str) -> str:
    return "".join(f", {kind} {key}={_schema_default(default)}"
                   for key, kind, default in ACTIVATION_PARAMETERS[name])


def _keywords(name: str, values) -> dict:
    """The activation's parameters by name from their values in schema
    order; the dispatcher leaves out trailing arguments that equal their
    defaults, which come from ACTIVATION_PARAMETERS."""
    return {key: values[i] if i < len(values) else default
            for i, (key, _, default) in enumerate(ACTIVATION_PARAMETERS[name])}


def _saves_output(name: str, params: dict) -> bool:
    if name not in _FROM_OUTPUT:
        return False
    condition = _FROM_OUTPUT[name]
    return condition is None or params[condition] >= 0


# ---- operator definitions ------------------------------------------------------------

_LIBRARY = torch.library.Library("fusednn", "DEF")
# The tags of operators that take inputs of any strides and lay their
# outputs out like their inputs (see the module docstring).
_FLEXIBLE = (torch.Tag.pt2_compliant_tag, torch.Tag.flexible_layout)
_FIXED = (torch.Tag.pt2_compliant_tag,)


def _define(name: str, schema: str, kernel, fake, *, tags=_FIXED):
    """Defines fusednn::<name><schema>, implemented by `kernel` on the CPU
    and CUDA dispatch keys (the dispatcher fills in defaults and passes
    every argument positionally) and by `fake` for fake tensors; returns
    the operator overload."""
    _LIBRARY.define(f"{name}{schema}", tags=tags)
    for key in ("CPU", "CUDA"):
        _LIBRARY.impl(name, kernel, key)
    torch.library.register_fake(f"fusednn::{name}", fake, lib=_LIBRARY)
    return getattr(torch.ops.fusednn, name).default


def _register_autograd(op, backward, setup_context) -> None:
    torch.library.register_autograd(op, backward, setup_context=setup_context, lib=_LIBRARY)


def _refuse_gradient(name: str, advice: str, *tensors) -> None:
    """Raises, before any work, when an operator with no derivative formula
    of its own is called directly where a gradient would be recorded
    (grad mode on, an input that requires grad), rather than letting
    autograd's fallback record a node that cannot backpropagate. Checked in
    the operator's kernel, which the fallback (C++, no Python) runs with
    grad mode as the caller had it: a Python kernel on the Autograd key
    would cost every call a second pass through the dispatcher."""
    if torch.is_grad_enabled():
        for t in tensors:
            if t is not None and t.requires_grad:
                raise RuntimeError(f"fusednn::{name} has no autograd formula: {advice}")


def _eager(x: Tensor) -> bool:
    """Whether a call on x runs in plain eager mode: a plain tensor, no
    compilation or export tracing it, no dispatch mode (fake tensors,
    make_fx) active. There the autograd.Functions below call the kernel
    functions themselves (see the module docstring); traced code keeps the
    operators as single nodes."""
    return (type(x) is torch.Tensor and not torch.compiler.is_compiling()
            and _len_torch_dispatch_stack() == 0)


def _eager_backward(grad: Tensor) -> bool:
    """_eager for a Function's backward, which must also build a graph
    (through the operators' own autograd) when it runs with
    create_graph=True."""
    return not torch.is_grad_enabled() and _eager(grad)


# ---- activations ------------------------------------------------------------------


class _Activation:
    """One activation: its two operators and the kernels behind them."""

    def __init__(self, name: str) -> None:
        self.name = name
        params = _parameter_schema(name)
        self.forward_op = _define(name, f"(Tensor x{params}) -> Tensor", self.forward,
                                  self.forward_fake, tags=_FLEXIBLE)
        self.backward_op = _define(
            f"{name}_backward",
            f"(Tensor grad_output, Tensor saved, bool saved_is_output{params}) -> Tensor",
            self.backward, self.backward_fake, tags=_FLEXIBLE)
        _register_autograd(self.forward_op, self.op_backward, self.op_setup_context)
        if name in _PIECEWISE_LINEAR:
            _register_autograd(self.backward_op, self.double_backward,
                               self.backward_setup_context)

    def forward(self, x, *values):
        params = _keywords(self.name, values)
        if x.is_cpu and x.is_contiguous():
            # fusednn allocates the C-contiguous result itself, which its
            # out= checks would cost as much again as this call on small
            # tensors. On CUDA, out= keeps the memory in torch's allocator.
            return fn.activation(self.name, x, **params)
        out = torch.empty_like(x)
        x_view, out_view = _in_memory_order(x, x, out)
        fn.activation(self.name, x_view, out=out_view, **params)
        return out

    @staticmethod
    def forward_fake(x, *values):
        return torch.empty_like(x)

    def backward(self, grad_output, saved, saved_is_output, *values):
        params = _keywords(self.name, values)
        which = "y" if saved_is_output else "x"
        layout = _memory_format(saved)
        grad_output = grad_output.contiguous(memory_format=layout)
        if layout == torch.contiguous_format and saved.is_cpu and saved.is_contiguous():
            return fn.activation_backward(self.name, grad_output, **{which: saved}, **params)
        out = torch.empty_like(grad_output, memory_format=layout)
        grad_view, saved_view, out_view = _in_memory_order(saved, grad_output, saved, out)
        fn.activation_backward(self.name, grad_view, out=out_view, **{which: saved_view},
                               **params)
        return out

    @staticmethod
    def backward_fake(grad_output, saved, saved_is_output, *values):
        return torch.empty_like(grad_output, memory_format=_memory_format(saved))

    def saves_output(self, values) -> bool:
        return _saves_output(self.name, _keywords(self.name, values))

    # The operators' own autograd, for callers of torch.ops.fusednn.<name>.

    def op_setup_context(self, ctx, inputs, output):
        x, *values = inputs
        ctx.values = values
        ctx.saved_is_output = self.saves_output(values)
        ctx.save_for_backward(output if ctx.saved_is_output else x)

    def op_backward(self, ctx, grad_output):
        (saved,) = ctx.saved_tensors
        grad = self.backward_op(grad_output, saved, ctx.saved_is_output, *ctx.values)
        return (grad,) + (None,) * len(ctx.values)

    @staticmethod
    def backward_setup_context(ctx, inputs, output):
        _, saved, saved_is_output, *values = inputs
        ctx.values = (saved_is_output, *values)
        ctx.save_for_backward(saved)

    def double_backward(self, ctx, grad_grad):
        (saved,) = ctx.saved_tensors
        return (self.backward_op(grad_grad, saved, *ctx.values), None) + \
            (None,) * len(ctx.values)


_ACTIVATIONS = {name: _Activation(name) for name in ACTIVATION_PARAMETERS}


class _ActivationFunction(torch.autograd.Function):
    """activation() below: the operators' autograd without their dispatch
    in eager mode (see the module docstring)."""

    @staticmethod
    def forward(ctx, x, name, values):
        activation = _ACTIVATIONS[name]
        y = (activation.forward if _eager(x) else activation.forward_op)(x, *values)
        ctx.name, ctx.values = name, values
        ctx.saved_is_output = activation.saves_output(values)
        ctx.save_for_backward(y if ctx.saved_is_output else x)
        return y

    @staticmethod
    def backward(ctx, grad_output):
        (saved,) = ctx.saved_tensors
        activation = _ACTIVATIONS[ctx.name]
        run = activation.backward if _eager_backward(grad_output) else activation.backward_op
        return run(grad_output, saved, ctx.saved_is_output, *ctx.values), None, None


def _activation(name: str) -> _Activation:
    if name not in _ACTIVATIONS:
        raise ValueError(f"fusednn.torch: unknown activation {name!r}; "
                         f"choose one of {', '.join(ACTIVATION_PARAMETERS)}")
    return _ACTIVATIONS[name]


def _values(name: str, params: dict) -> tuple:
    """params as the positional values of the schema's parameters, with
    PyTorch's defaults for those not given."""
    known = [key for key, _, _ in ACTIVATION_PARAMETERS[name]]
    unknown = sorted(set(params) - set(known))
    if unknown:
        raise TypeError(f"fusednn.torch: {name} takes {', '.join(known) or 'no parameters'}, "
                        f"not {', '.join(unknown)}")
    return tuple(params.get(key, default) for key, _, default in ACTIVATION_PARAMETERS[name])


def activation(name: str, x: Tensor, **params) -> Tensor:
    """The differentiable activation ``name`` (one of
    ``fusednn.ACTIVATIONS``) with PyTorch's parameter names and defaults:
    ``torch.ops.fusednn.<name>(x, **params)``, whose autograd it shares."""
    _activation(name)
    return _ActivationFunction.apply(x, name, _values(name, params))


def activation_backward(name: str, grad_output: Tensor, x: Tensor, **params) -> Tensor:
    """The gradient of ``activation(name, x, **params)`` for
    ``grad_output``, from the forward input x."""
    return _activation(name).backward_op(grad_output, x, False, *_values(name, params))


# ---- batch normalization ----------------------------------------------------------


def _statistics_dtype(x: Tensor) -> torch.dtype:
    """save_mean, save_invstd, grad_weight and grad_bias: float32 for the
    half types, else x's dtype."""
    return torch.float32 if x.dtype in (torch.float16, torch.bfloat16) else x.dtype


# The compiled quick paths of fusednn.batch_norm and batch_norm_backward,
# called here with channels_last=True: they run an ordinary call (plain CPU
# tensors of float32/float64, valid arguments) in one compiled call,
# reading a channels_last x, and out laid out like it, with the channels
# last as _channel_last_views does, and decline everything else (CUDA
# tensors, other dtypes, layouts that need a copy, errors) with nothing
# written, which then takes the public functions' path. The operators'
# kernels call them directly: under torch.compile the schema and fake
# implementation have fixed the arguments, and the checks these make are
# what keeps a direct call to torch.ops.fusednn.* safe.
_batch_norm_quick = _cpu.batch_norm_quick
_batch_norm_backward_quick = _cpu.batch_norm_backward_quick
# They take torch tensors once registered, which viewing one does.
_arrays.TORCH_CPU.numpy_view(torch.ones(1), "x", "batch_norm")


def _batch_norm_kernel(x: Tensor, weight: Optional[Tensor], bias: Optional[Tensor],
                       running_mean: Optional[Tensor], running_var: Optional[Tensor],
                       training: bool, momentum: float, eps: float,
                       axis: int, relu: bool = False) -> tuple[Tensor, Tensor, Tensor]:
    """``fusednn.batch_norm`` over channel axis ``axis``: returns (y,
    save_mean, save_invstd); training updates the running statistics in
    place (when given), inference normalizes with them. relu: y is
    relu(batch_norm(x)), written in the same pass."""
    _refuse_gradient("batch_norm", "differentiate fusednn.torch.ops.batch_norm, which has one",
                     x, weight, bias, running_mean, running_var)
    out = torch.empty_like(x)
    result = _batch_norm_quick(x, weight, bias, running_mean, running_var, out, training,
                               momentum, eps, axis, "relu" if relu else None, True)
    if result is None:
        x_view, out_view, view_axis = _channel_last_views(x, out, axis)
        result = fn.batch_norm(x_view, weight, bias, running_mean, running_var,
                               training=training, momentum=momentum, eps=eps, axis=view_axis,
                               activation="relu" if relu else None, out=out_view)
    if training and running_mean is not None:
        # The kernel wrote them through their memory, which autograd's
        # version counters do not see.
        torch.autograd.graph.increment_version((running_mean, running_var))
    return out, result.save_mean, result.save_invstd


def _channel_last_views(x: Tensor, other: Tensor, axis: int):
    """(x, other, axis) as batch norm's kernels read them fastest: for a
    channels_last x normalized over axis 1, both with the channels moved
    last and axis -1 (other shares x's layout)."""
    if axis % max(x.dim(), 1) == 1 and _memory_format(x) != torch.contiguous_format:
        return x.movedim(1, -1), other.movedim(1, -1), -1
    return x, other, axis


def _batch_norm_fake(x, weight, bias, running_mean, running_var, training, momentum, eps, axis,
                     relu=False):
    channels = x.shape[axis]
    dtype = _statistics_dtype(x)
    return (torch.empty_like(x), x.new_empty(channels, dtype=dtype),
            x.new_empty(channels, dtype=dtype))


_batch_norm_op = _define(
    "batch_norm",
    "(Tensor x, Tensor? weight, Tensor? bias, Tensor(a!)? running_mean, "
    "Tensor(b!)? running_var, bool training, float momentum, float eps, SymInt axis, "
    "bool relu=False) -> (Tensor, Tensor, Tensor)",
    _batch_norm_kernel, _batch_norm_fake, tags=_FLEXIBLE)


def _batch_norm_backward_kernel(grad_output: Tensor, x: Tensor, weight: Optional[Tensor],
                                save_mean: Tensor, save_invstd: Tensor, training: bool,
                                axis: int, relu_output: Optional[Tensor] = None
                                ) -> tuple[Tensor, Tensor, Tensor]:
    """``fusednn.batch_norm_backward``: (grad_input, grad_weight,
    grad_bias); training=False is the backward of the inference forward.
    relu_output: the output of a forward with relu=True, whose mask
    (relu_output > 0) applies to grad_output."""
    _refuse_gradient("batch_norm_backward", "batch norm has no double backward in fusednn.torch",
                     grad_output, x, weight, save_mean, save_invstd, relu_output)
    out = torch.empty_like(x)
    result = _batch_norm_backward_quick(grad_output, x, weight, save_mean, save_invstd, axis,
                                        training, None if relu_output is None else "relu",
                                        relu_output, out, True)
    if result is not None:
        return result
    grad_output, relu_output = _laid_out_like(x, grad_output, relu_output)
    result = _batch_norm_backward_quick(grad_output, x, weight, save_mean, save_invstd, axis,
                                        training, None if relu_output is None else "relu",
                                        relu_output, out, True)
    if result is not None:
        return result
    x_view, out_view, view_axis = _channel_last_views(x, out, axis)
    if view_axis != axis:
        grad_output = grad_output.movedim(1, -1)
        if relu_output is not None:
            relu_output = relu_output.movedim(1, -1)
    _, grad_weight, grad_bias = fn.batch_norm_backward(
        grad_output, x_view, weight, save_mean, save_invstd, axis=view_axis, training=training,
        activation=None if relu_output is None else "relu", y=relu_output, out=out_view)
    return out, grad_weight, grad_bias


def _laid_out_like(x: Tensor, grad_output: Tensor, relu_output: Optional[Tensor]
                   ) -> tuple[Tensor, Optional[Tensor]]:
    """grad_output and relu_output in x's memory format, which the kernels
    need. Under torch.compile without the layout constraint
    (_laid_out_like_x) they can differ: inductor lays convolution outputs
    (x) out channels_last, but keeps a saved batch-norm output that no
    convolution reads (the last block's, before the pooling) in the
    strides seen when tracing, and makes the pooling's gradient
    C-contiguous. When relu_output and grad_output share a layout unlike
    x's, the mask is applied in that layout first (torch's
    threshold_backward: 0 where relu_output <= 0, the kernels' own mask, so
    the same bits), and only the masked gradient is copied: one copy that
    changes the layout instead of two."""
    layout = _memory_format(x)
    if (relu_output is not None and not relu_output.is_contiguous(memory_format=layout)
            and _memory_format(relu_output) == _memory_format(grad_output)
            and relu_output.is_contiguous(memory_format=_memory_format(relu_output))
            and grad_output.shape == relu_output.shape == x.shape
            and grad_output.dtype == relu_output.dtype == x.dtype
            and grad_output.device == relu_output.device == x.device):
        masked = torch.ops.aten.threshold_backward(grad_output, relu_output, 0)
        return masked.contiguous(memory_format=layout), None
    if relu_output is not None:
        relu_output = relu_output.contiguous(memory_format=layout)
    return grad_output.contiguous(memory_format=layout), relu_output


def _batch_norm_backward_fake(grad_output, x, weight, save_mean, save_invstd, training, axis,
                              relu_output=None):
    _offer_in_place_backward_to_inductor()
    _offer_layout_constraint_to_inductor()
    channels = x.shape[axis]
    dtype = _statistics_dtype(x)
    return (torch.empty_like(x), x.new_empty(channels, dtype=dtype),
            x.new_empty(channels, dtype=dtype))


# No flexible_layout tag: under inductor its inputs take the layout
# constraint below (grad_output and relu_output laid out like x), which a
# tag would override.
batch_norm_backward = _define(
    "batch_norm_backward",
    "(Tensor grad_output, Tensor x, Tensor? weight, Tensor save_mean, Tensor save_invstd, "
    "bool training, SymInt axis, Tensor? relu_output=None) -> (Tensor, Tensor, Tensor)",
    _batch_norm_backward_kernel, _batch_norm_backward_fake, tags=_FIXED)


def _batch_norm_backward_in_place_kernel(grad_output: Tensor, x: Tensor, weight: Optional[Tensor],
                                         save_mean: Tensor, save_invstd: Tensor, training: bool,
                                         axis: int, relu_output: Optional[Tensor] = None
                                         ) -> tuple[Tensor, Tensor]:
    """``fusednn::batch_norm_backward`` with grad_input written over
    grad_output; returns (grad_weight, grad_bias)."""
    _refuse_gradient("batch_norm_backward_in_place",
                     "batch norm has no double backward in fusednn.torch",
                     grad_output, x, weight, save_mean, save_invstd, relu_output)
    result = _batch_norm_backward_quick(grad_output, x, weight, save_mean, save_invstd, axis,
                                        training, None if relu_output is None else "relu",
                                        relu_output, grad_output, True)
    if result is None:
        # Layouts the quick path does not take in place (grad_output laid
        # out unlike x): the out-of-place kernel, then one copy back.
        grad_input, grad_weight, grad_bias = _batch_norm_backward_kernel(
            grad_output, x, weight, save_mean, save_invstd, training, axis, relu_output)
        grad_output.copy_(grad_input)
        return grad_weight, grad_bias
    # Written through its memory, which autograd's version counter does not see.
    torch.autograd.graph.increment_version(grad_output)
    return result[1], result[2]


def _batch_norm_backward_in_place_fake(grad_output, x, weight, save_mean, save_invstd, training,
                                       axis, relu_output=None):
    return _batch_norm_backward_fake(grad_output, x, weight, save_mean, save_invstd, training,
                                     axis, relu_output)[1:]


# batch_norm_backward's (grad_weight, grad_bias), grad_input written over
# grad_output. Inductor substitutes it for batch_norm_backward where that
# gradient is dead afterwards (below).
batch_norm_backward_in_place = _define(
    "batch_norm_backward_in_place",
    "(Tensor(a!) grad_output, Tensor x, Tensor? weight, Tensor save_mean, Tensor save_invstd, "
    "bool training, SymInt axis, Tensor? relu_output=None) -> (Tensor, Tensor)",
    _batch_norm_backward_in_place_kernel, _batch_norm_backward_in_place_fake, tags=_FLEXIBLE)


def _reinplace_batch_norm_backward(node) -> bool:
    """Inductor's check before it rewrites a batch_norm_backward node into
    batch_norm_backward_in_place (its reinplacing pass has already found
    grad_output unused afterwards). Taken for a gradient straight from a
    convolution's backward, which inductor lays out like the convolution's
    output, x: the layout the quick path writes in place. A gradient from
    elsewhere (the pooling after the last block) could be laid out unlike
    x, since the in-place operator has no layout constraint, and writing
    over it would cost a copy back. On yes, the node's users
    are renumbered for the two results of the in-place operator, and those
    of grad_input read grad_output, which holds it after the call. CPU
    only: torch's CUDA caching allocator keeps freed memory, and a CUDA
    call would take the out-of-place kernel and a copy back."""
    grad_output = node.args[0]
    if not (isinstance(grad_output, torch.fx.Node) and grad_output.target is operator.getitem
            and grad_output.args[0].target is torch.ops.aten.convolution_backward.default
            and getattr(grad_output.meta.get("val"), "is_cpu", False)
            and all(user.target is operator.getitem for user in node.users)):
        return False
    for user in list(node.users):
        index = user.args[1]
        if index == 0:
            user.replace_all_uses_with(grad_output)
            node.graph.erase_node(user)
        else:
            user.args = (node, index - 1)
    if "val" in node.meta:
        node.meta["val"] = tuple(node.meta["val"][1:])
    return True


_offered_to_inductor = False


def _offer_in_place_backward_to_inductor() -> None:
    """Registers batch_norm_backward_in_place as the in-place form of
    batch_norm_backward with inductor's reinplacing pass, the first time a
    backward is traced once inductor is loaded: the peak memory of a
    compiled step then matches inductor's own batch norm, whose backward
    writes into a dead buffer too, instead of holding one gradient more
    (an 8 MB gradient in the CNN of ``--kernels training``, which glibc
    returned to the system and faulted in again every step). Done from the
    fake implementation, which runs while a graph is traced and before
    inductor's passes, so that ``import fusednn.torch`` does not import
    inductor (seconds). A torch without that registry (a private one)
    keeps the out-of-place operator."""
    global _offered_to_inductor
    if _offered_to_inductor:
        return
    reinplace = sys.modules.get("torch._inductor.fx_passes.reinplace")
    if reinplace is None:
        return
    _offered_to_inductor = True
    if hasattr(reinplace, "inplaceable_ops") and hasattr(reinplace, "InplaceableOp"):
        reinplace.inplaceable_ops[batch_norm_backward] = reinplace.InplaceableOp(
            batch_norm_backward_in_place, 0, extra_check=_reinplace_batch_norm_backward)


def _laid_out_like_x(fx_node, *args, **kwargs):
    """Inductor's layout constraint for batch_norm_backward: grad_output
    and relu_output in the stride order of x, as the kernels read them
    (any other layout costs a copy in the kernel). A gradient that
    inductor computes itself (the pooling's before a CNN's last block) is
    then written in that layout at no cost; a tensor already laid out
    otherwise is copied by inductor. x itself is left as it comes: a
    convolution's output, channels_last on the CPU even in an NCHW
    model."""
    from torch._inductor import ir
    from torch._inductor.virtualized import V

    args = list(args)
    x = args[1]
    try:
        layout = x.get_layout()
    except (AttributeError, NotImplementedError):
        return tuple(args), kwargs
    if isinstance(layout, ir.FlexibleLayout):
        return tuple(args), kwargs
    # The shape environment orders symbolic strides (dynamic shapes).
    order = ir.get_stride_order(layout.stride, V.graph.sizevars.shape_env)

    def like_x(t):
        return t if t is None else ir.ExternKernel.require_stride_order(t, order)

    args[0] = like_x(args[0])
    if len(args) > 7:
        args[7] = like_x(args[7])
    if kwargs.get("relu_output") is not None:
        kwargs = {**kwargs, "relu_output": like_x(kwargs["relu_output"])}
    return tuple(args), kwargs


_layout_offered_to_inductor = False


def _offer_layout_constraint_to_inductor() -> None:
    """Registers batch_norm_backward's lowering with the layout constraint
    above, the first time a backward is traced once inductor is loaded (as
    _offer_in_place_backward_to_inductor, and for the same reason). A torch
    without these (private) functions lowers the operator with inductor's
    default for operators without a layout tag, the strides seen when
    tracing: correct, with copies around it."""
    global _layout_offered_to_inductor
    if _layout_offered_to_inductor:
        return
    lowering = sys.modules.get("torch._inductor.lowering")
    if lowering is None:
        return
    _layout_offered_to_inductor = True
    if hasattr(lowering, "make_fallback") and batch_norm_backward not in lowering.lowerings:
        lowering.make_fallback(batch_norm_backward, layout_constraint=_laid_out_like_x,
                               warn=False)


class _BatchNorm(torch.autograd.Function):
    """Autograd for fusednn::batch_norm. torch.library registers autograd
    formulas only for functional operators, and this one updates the
    running statistics in place inside the fused kernel; an
    autograd.Function keeps that single pass, and torch.compile traces it
    (functionalizing the declared mutation). forward takes ctx itself: the
    separate setup_context form costs about 60 us more per call in
    PyTorch 2.13, which binds the arguments to the signature with
    inspect on every call."""

    @staticmethod
    def forward(ctx, x, weight, bias, running_mean, running_var, training, momentum, eps, axis,
                relu):
        run = _batch_norm_kernel if _eager(x) else _batch_norm_op
        y, save_mean, save_invstd = run(x, weight, bias, running_mean, running_var, training,
                                        momentum, eps, axis, relu)
        ctx.mark_non_differentiable(save_mean, save_invstd)
        ctx.training, ctx.axis, ctx.has_bias = training, axis, bias is not None
        # With the fused ReLU, backward masks with y, which the next layer
        # keeps anyway; without it, None.
        ctx.save_for_backward(x, weight, save_mean, save_invstd, y if relu else None)
        return y, save_mean, save_invstd

    @staticmethod
    def backward(ctx, grad_y, grad_mean, grad_invstd):
        x, weight, save_mean, save_invstd, relu_output = ctx.saved_tensors
        run = _batch_norm_backward_kernel if _eager_backward(grad_y) else batch_norm_backward
        grad_x, grad_weight, grad_bias = run(grad_y, x, weight, save_mean, save_invstd,
                                             ctx.training, ctx.axis, relu_output)
        if weight is not None and grad_weight.dtype != weight.dtype:
            # half-precision weights: their gradients come as float32
            grad_weight, grad_bias = grad_weight.to(weight.dtype), grad_bias.to(weight.dtype)
        if weight is None:
            grad_weight = None
        if not ctx.has_bias:
            grad_bias = None
        return grad_x, grad_weight, grad_bias, None, None, None, None, None, None, None


def batch_norm(x: Tensor, weight: Optional[Tensor] = None, bias: Optional[Tensor] = None,
               running_mean: Optional[Tensor] = None, running_var: Optional[Tensor] = None,
               training: bool = True, momentum: float = 0.1, eps: float = 1e-5,
               axis: int = 1, relu: bool = False) -> Tensor:
    """Differentiable batch norm (x, weight and bias) on
    ``torch.ops.fusednn.batch_norm``; returns y, or relu(y) from the same
    pass with relu=True. Training updates the running statistics in place
    when given; training=False normalizes with them, and its backward
    treats them as constants."""
    return _BatchNorm.apply(x, weight, bias, running_mean, running_var, training, momentum,
                            eps, axis, relu)[0]


# ---- dropout ------------------------------------------------------------------------


def _stream(rng: Tensor) -> tuple[int, int, int]:
    """(seed, offset, start) as fusednn takes them, from the int64 pair
    ``[seed, offset]`` or triple ``[seed, offset, start]``: start, the
    global index of the first element, places a rank's slice of a batch
    split across processes (docs/distributed.md); 0 when absent."""
    values = rng.tolist()
    start = values[2] if len(values) == 3 else 0
    return values[0] % _UINT64, values[1] % _UINT64, start


def draw_rng(generator: Optional[torch.Generator] = None) -> Tensor:
    """A fresh ``[seed, offset]`` pair drawn from ``generator`` (the default
    CPU generator when None), so that ``torch.manual_seed`` reproduces the
    masks. Under ``torch.compile`` the draw is part of the graph."""
    return torch.randint(-(1 << 63), (1 << 63) - 1, (2,), dtype=torch.int64,
                         generator=generator)


def _like_first(first, *args):
    """The fake result of an operator whose one result has the shape,
    dtype and layout of its first argument."""
    return torch.empty_like(first)


def _mask_bytes(x: Tensor) -> int:
    return (x.numel() + 7) // 8


def _dropout_kernel(x: Tensor, p: float, rng: Tensor) -> Tensor:
    seed, offset, start = _stream(rng)
    out = torch.empty_like(x)
    fn.dropout(x, p, seed=seed, offset=offset, start=start, out=out)
    return out


def _dropout_backward_kernel(grad_output: Tensor, p: float, rng: Tensor) -> Tensor:
    seed, offset, start = _stream(rng)
    out = torch.empty_like(grad_output)
    fn.dropout_backward(grad_output, p, seed=seed, offset=offset, start=start, out=out)
    return out


_dropout_op = _define("dropout", "(Tensor x, float p, Tensor rng) -> Tensor", _dropout_kernel,
                      _like_first)
# ``grad_output * mask / (1 - p)``, the mask regenerated from rng.
dropout_backward = _define("dropout_backward",
                           "(Tensor grad_output, float p, Tensor rng) -> Tensor",
                           _dropout_backward_kernel, _like_first)


def _dropout_setup_context(ctx, inputs, output):
    _, ctx.p, rng = inputs
    ctx.save_for_backward(rng)


def _dropout_gradient(ctx, grad):
    """The gradient of dropout and of its backward alike: both multiply
    by the same mask / (1 - p)."""
    (rng,) = ctx.saved_tensors
    return dropout_backward(grad, ctx.p, rng), None, None


_register_autograd(_dropout_op, _dropout_gradient, _dropout_setup_context)
_register_autograd(dropout_backward, _dropout_gradient, _dropout_setup_context)


class _Dropout(torch.autograd.Function):
    """dropout() below: fusednn::dropout's autograd without the dispatch
    in eager mode (see the module docstring)."""

    @staticmethod
    def forward(ctx, x, p, rng):
        y = (_dropout_kernel if _eager(x) else _dropout_op)(x, p, rng)
        ctx.p = p
        ctx.save_for_backward(rng)
        return y

    @staticmethod
    def backward(ctx, grad):
        (rng,) = ctx.saved_tensors
        run = _dropout_backward_kernel if _eager_backward(grad) else dropout_backward
        return run(grad, ctx.p, rng), None, None


def dropout(x: Tensor, p: float, rng: Tensor) -> Tensor:
    """Inverted dropout ``x * mask / (1 - p)`` with the mask of ``rng =
    [seed, offset]`` (``torch.ops.fusednn.dropout``); backward regenerates
    the mask."""
    return _Dropout.apply(x, p, rng)


def _dropout_with_mask_kernel(x: Tensor, p: float, rng: Tensor) -> tuple[Tensor, Tensor]:
    seed, offset, start = _stream(rng)
    out = torch.empty_like(x)
    _, mask = fn.dropout(x, p, seed=seed, offset=offset, start=start, return_mask=True,
                         out=out)
    return out, mask


def _dropout_with_mask_fake(x, p, rng):
    return torch.empty_like(x), x.new_empty(_mask_bytes(x), dtype=torch.uint8)


def _dropout_backward_with_mask_kernel(grad_output: Tensor, mask: Tensor, p: float) -> Tensor:
    out = torch.empty_like(grad_output)
    fn.dropout_backward(grad_output, p, mask=mask, out=out)
    return out


# ``dropout`` that also returns the bit-packed uint8 mask
# (``(x.numel() + 7) // 8`` bytes), which backward reads instead of
# regenerating it.
dropout_with_mask = _define("dropout_with_mask",
                            "(Tensor x, float p, Tensor rng) -> (Tensor, Tensor)",
                            _dropout_with_mask_kernel, _dropout_with_mask_fake)
# ``grad_output * mask / (1 - p)`` with the bit-packed mask.
dropout_backward_with_mask = _define(
    "dropout_backward_with_mask", "(Tensor grad_output, Tensor mask, float p) -> Tensor",
    _dropout_backward_with_mask_kernel, _like_first)


def _masked_setup_context(ctx, inputs, output):
    _, ctx.p, _ = inputs
    mask = output[1]
    ctx.mark_non_differentiable(mask)
    ctx.save_for_backward(mask)


def _masked_backward(ctx, grad_output, grad_mask):
    (mask,) = ctx.saved_tensors
    return dropout_backward_with_mask(grad_output, mask, ctx.p), None, None


def _masked_backward_setup_context(ctx, inputs, output):
    _, mask, ctx.p = inputs
    ctx.save_for_backward(mask)


def _masked_backward_backward(ctx, grad_grad):
    (mask,) = ctx.saved_tensors
    return dropout_backward_with_mask(grad_grad, mask, ctx.p), None, None


_register_autograd(dropout_with_mask, _masked_backward, _masked_setup_context)
_register_autograd(dropout_backward_with_mask, _masked_backward_backward,
                   _masked_backward_setup_context)


# ---- bias + activation + dropout ------------------------------------------------------


# The activation parameters of the epilogue's schema, in its order, with
# their defaults (those of the activations' PyTorch modules).
_EPILOGUE_DEFAULTS = {"negative_slope": 0.01, "alpha": 1.0, "approximate": "none", "beta": 1.0,
                      "threshold": 20.0, "min_val": -1.0, "max_val": 1.0}


def _act_params(act: str, *values) -> dict:
    """act's parameters by name from the epilogue's values in schema order
    (the dispatcher leaves out trailing ones that equal their defaults)."""
    if act not in ACTIVATION_PARAMETERS:
        raise ValueError(f"fusednn.torch: unknown activation {act!r}; "
                         f"choose one of {', '.join(ACTIVATION_PARAMETERS)}")
    given = {**_EPILOGUE_DEFAULTS, **dict(zip(_EPILOGUE_DEFAULTS, values))}
    return {key: given[key] for key, _, _ in ACTIVATION_PARAMETERS[act]}


def _bias_act_dropout_kernel(h: Tensor, bias: Tensor, act: str, p: float, rng: Tensor,
                             axis: int = -1, *values) -> Tensor:
    seed, offset, start = _stream(rng)
    out = torch.empty_like(h)
    fn.bias_act_dropout(h, bias, act, p, seed=seed, offset=offset, start=start, axis=axis,
                        out=out, **_act_params(act, *values))
    return out


def _bias_act_dropout_backward_kernel(grad_output: Tensor, h: Tensor, bias: Tensor, act: str,
                                      p: float, rng: Tensor, axis: int = -1,
                                      *values) -> tuple[Tensor, Tensor]:
    seed, offset, start = _stream(rng)
    # C-contiguous: the kernel reduces grad_bias from grad_h as written,
    # which it needs C-contiguous.
    grad_h = torch.empty(h.shape, dtype=h.dtype, device=h.device)
    _, grad_bias = fn.bias_act_dropout_backward(grad_output, h, bias, act, p, seed=seed,
                                                offset=offset, start=start, axis=axis,
                                                out=grad_h, **_act_params(act, *values))
    return grad_h, grad_bias


def _bias_act_dropout_backward_fake(grad_output, h, bias, *args):
    return h.new_empty(h.shape), bias.new_empty(bias.shape)


_EVERY_ACTIVATION_PARAMETER = "SymInt axis=-1" + "".join(
    f", {'str' if isinstance(default, str) else 'float'} {key}={_schema_default(default)}"
    for key, default in _EPILOGUE_DEFAULTS.items())
# The fused epilogue ``mask * act(h + bias) / (1 - p)``, bias broadcast
# along ``axis``; only the parameters of ``act`` are read.
_bias_act_dropout_op = _define(
    "bias_act_dropout",
    f"(Tensor h, Tensor bias, str act, float p, Tensor rng, {_EVERY_ACTIVATION_PARAMETER}) "
    "-> Tensor", _bias_act_dropout_kernel, _like_first)
# (grad_h, grad_bias) of ``bias_act_dropout``, the mask regenerated from rng.
bias_act_dropout_backward = _define(
    "bias_act_dropout_backward",
    f"(Tensor grad_output, Tensor h, Tensor bias, str act, float p, Tensor rng, "
    f"{_EVERY_ACTIVATION_PARAMETER}) -> (Tensor, Tensor)",
    _bias_act_dropout_backward_kernel, _bias_act_dropout_backward_fake)


def _fused_setup_context(ctx, inputs, output):
    h, bias, *rest = inputs
    ctx.rest = rest
    ctx.save_for_backward(h, bias)


def _fused_backward(ctx, grad_output):
    h, bias = ctx.saved_tensors
    grad_h, grad_bias = bias_act_dropout_backward(grad_output, h, bias, *ctx.rest)
    return (grad_h, grad_bias) + (None,) * len(ctx.rest)


_register_autograd(_bias_act_dropout_op, _fused_backward, _fused_setup_context)

class _BiasActDropout(torch.autograd.Function):
    """bias_act_dropout() below: the operator's autograd without its
    dispatch in eager mode (see the module docstring)."""

    @staticmethod
    def forward(ctx, h, bias, act, p, rng, axis, values):
        run = _bias_act_dropout_kernel if _eager(h) else _bias_act_dropout_op
        out = run(h, bias, act, p, rng, axis, *values)
        ctx.rest = (act, p, axis, values)
        ctx.save_for_backward(h, bias, rng)
        return out

    @staticmethod
    def backward(ctx, grad_output):
        h, bias, rng = ctx.saved_tensors
        act, p, axis, values = ctx.rest
        run = (_bias_act_dropout_backward_kernel if _eager_backward(grad_output)
               else bias_act_dropout_backward)
        grad_h, grad_bias = run(grad_output, h, bias, act, p, rng, axis, *values)
        return grad_h, grad_bias, None, None, None, None, None


def bias_act_dropout(h: Tensor, bias: Tensor, act: str, p: float, rng: Tensor, axis: int = -1,
                     **params) -> Tensor:
    """The fused epilogue ``mask * act(h + bias) / (1 - p)``, bias broadcast
    along ``axis`` (``torch.ops.fusednn.bias_act_dropout``), with the
    activation's PyTorch parameters as keywords; backward regenerates the
    mask."""
    unknown = sorted(set(params) - set(_EPILOGUE_DEFAULTS))
    if unknown:
        raise TypeError(f"fusednn.torch: bias_act_dropout takes the activation parameters "
                        f"{', '.join(_EPILOGUE_DEFAULTS)}, not {', '.join(unknown)}")
    _act_params(act)  # an unknown activation raises here, before any work
    values = tuple(params.get(key, default) for key, default in _EPILOGUE_DEFAULTS.items())
    return _BiasActDropout.apply(h, bias, act, p, rng, axis, values)
