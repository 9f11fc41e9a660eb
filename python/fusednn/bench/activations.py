"""The activation family of ``python -m fusednn bench``: forward and
backward of every activation, on flat arrays; the check against
fusednn.reference on special and random inputs; and each activation's
peers: PyTorch's aten op (writing a preallocated output where it has an
out= overload), the same op through torch.compile, and jax.nn's function
under jax.jit (its backward by jax.vjp, from x).
"""
from __future__ import annotations

import functools
import math
from dataclasses import KW_ONLY, dataclass, field
from typing import Callable

import numpy as np

from .. import reference
from ..activations import activation, activation_backward
from .cases import Case, FamilyText, Plan, Runners, on_device, reference_text, size_text
from .checks import (CANCELLATION_FACTOR, CANCELLATION_UNITS, ORDINARY, TOLERANCE_ULP,
                     CheckResult, check_inputs, compare, finfo, standard_normal)
from .peers import jax_peer, torch_check_tensors, torch_peers, torch_view


@dataclass
class TorchPeer:
    op: str                   # the aten overload, e.g. "sigmoid.out"
    call: Callable            # (aten, params, *tensors, out): runs the op once
    allocates: bool = False


@dataclass
class ActivationKernel:
    name: str                 # in the table and in --kernels
    activation: str           # the fusednn activation
    params: dict = field(default_factory=dict)
    _: KW_ONLY
    torch_forward: TorchPeer
    torch_backward: TorchPeer
    # The saved tensor backward reads: y where the kernel accepts it, as
    # autograd saves it, else x.
    backward_from: str = "x"
    exact: bool = False
    # For derivatives that are the sum of two terms of opposite sign below
    # their root: x -> the two terms, in float64.
    derivative_terms: Callable | None = None

    def jax_forward(self, jax, x):
        """The equivalent jax.nn function of x."""
        return JAX_FORWARD[self.name][1](jax, self.params, x)


def _gelu_terms(x):
    """gelu'(x) = Phi(x) + x phi(x)."""
    return reference.normal_cdf(x), x * reference.normal_pdf(x)


def _gelu_tanh_terms(x):
    """gelu'(x) = s + x s (1 - s) 2u' with s = sigmoid(2u), u = c (x + 0.044715 x^3)."""
    c = math.sqrt(2.0 / math.pi)
    two_u = 2.0 * c * (x + 0.044715 * x**3)
    s = reference.sigmoid(two_u)
    return s, x * s * reference.sigmoid(-two_u) * 2.0 * c * (1.0 + 3 * 0.044715 * x * x)


def _silu_terms(x):
    """silu'(x) = s + x s (1 - s) with s = sigmoid(x)."""
    s = reference.sigmoid(x)
    return s, x * s * reference.sigmoid(-x)


def _mish_terms(x):
    """mish'(x) = tanh(sp) + x sigmoid(x) sech^2(sp) with sp = softplus(x)."""
    sp = reference.softplus(x)
    return np.tanh(sp), x * reference.sigmoid(x) / np.cosh(sp) ** 2


# The JAX user's spelling of each kernel: its name in the report, and
# (jax, params, x) -> y. Softplus has
# no threshold in JAX; above it PyTorch's result (x) differs from the exact
# one by less than exp(-20), far below a float32 ulp of x.
JAX_FORWARD = {
    "sigmoid": ("jax.nn.sigmoid", lambda jax, p, x: jax.nn.sigmoid(x)),
    "tanh": ("jax.numpy.tanh", lambda jax, p, x: jax.numpy.tanh(x)),
    "relu": ("jax.nn.relu", lambda jax, p, x: jax.nn.relu(x)),
    "leaky_relu": ("jax.nn.leaky_relu",
                   lambda jax, p, x: jax.nn.leaky_relu(x, p["negative_slope"])),
    "elu": ("jax.nn.elu", lambda jax, p, x: jax.nn.elu(x, p["alpha"])),
    "selu": ("jax.nn.selu", lambda jax, p, x: jax.nn.selu(x)),
    "gelu": ("jax.nn.gelu", lambda jax, p, x: jax.nn.gelu(x, approximate=False)),
    "gelu_tanh": ("jax.nn.gelu", lambda jax, p, x: jax.nn.gelu(x, approximate=True)),
    "silu": ("jax.nn.silu", lambda jax, p, x: jax.nn.silu(x)),
    "softplus": ("jax.nn.softplus",
                 lambda jax, p, x: jax.nn.softplus(p["beta"] * x) / p["beta"]),
    "mish": ("jax.nn.mish", lambda jax, p, x: jax.nn.mish(x)),
    "hardsigmoid": ("jax.nn.hard_sigmoid", lambda jax, p, x: jax.nn.hard_sigmoid(x)),
    "hardswish": ("jax.nn.hard_swish", lambda jax, p, x: jax.nn.hard_swish(x)),
    "hardtanh": ("jax.numpy.clip",
                 lambda jax, p, x: jax.numpy.clip(x, p["min_val"], p["max_val"])),
}


# PyTorch's peers take (aten, params, *tensors, out): x for forward; grad
# and the same saved tensor as ours for backward.
ACTIVATION_KERNELS = (
    ActivationKernel(
        "sigmoid", "sigmoid", backward_from="y",
        torch_forward=TorchPeer(
            "sigmoid.out", lambda a, p, x, o: a.sigmoid.out(x, out=o)),
        torch_backward=TorchPeer(
            "sigmoid_backward.grad_input",
            lambda a, p, g, y, o: a.sigmoid_backward.grad_input(g, y, grad_input=o))),
    ActivationKernel(
        "tanh", "tanh", backward_from="y",
        torch_forward=TorchPeer(
            "tanh.out", lambda a, p, x, o: a.tanh.out(x, out=o)),
        torch_backward=TorchPeer(
            "tanh_backward.grad_input",
            lambda a, p, g, y, o: a.tanh_backward.grad_input(g, y, grad_input=o))),
    ActivationKernel(
        "relu", "relu", backward_from="y", exact=True,
        torch_forward=TorchPeer(
            "relu.out", lambda a, p, x, o: a.relu.out(x, out=o)),
        torch_backward=TorchPeer(
            "threshold_backward.grad_input",
            lambda a, p, g, y, o: a.threshold_backward.grad_input(g, y, 0, grad_input=o))),
    ActivationKernel(
        "leaky_relu", "leaky_relu", {"negative_slope": 0.01}, backward_from="y", exact=True,
        torch_forward=TorchPeer(
            "leaky_relu.out",
            lambda a, p, x, o: a.leaky_relu.out(x, p["negative_slope"], out=o)),
        torch_backward=TorchPeer(
            "leaky_relu_backward.grad_input",
            lambda a, p, g, y, o: a.leaky_relu_backward.grad_input(
                g, y, p["negative_slope"], True, grad_input=o))),
    ActivationKernel(
        "elu", "elu", {"alpha": 1.0}, backward_from="y",
        torch_forward=TorchPeer(
            "elu.out", lambda a, p, x, o: a.elu.out(x, p["alpha"], 1, 1, out=o)),
        torch_backward=TorchPeer(
            "elu_backward.grad_input",
            lambda a, p, g, y, o: a.elu_backward.grad_input(
                g, p["alpha"], 1, 1, True, y, grad_input=o))),
    ActivationKernel(
        "selu", "selu", backward_from="y",
        torch_forward=TorchPeer(
            "elu.out",
            lambda a, p, x, o: a.elu.out(
                x, reference.SELU_ALPHA, reference.SELU_SCALE, 1, out=o)),
        torch_backward=TorchPeer(
            "elu_backward.grad_input",
            lambda a, p, g, y, o: a.elu_backward.grad_input(
                g, reference.SELU_ALPHA, reference.SELU_SCALE, 1, True, y, grad_input=o))),
    ActivationKernel(
        "gelu", "gelu", {"approximate": "none"}, derivative_terms=_gelu_terms,
        torch_forward=TorchPeer(
            "gelu.out", lambda a, p, x, o: a.gelu.out(x, approximate=p["approximate"], out=o)),
        torch_backward=TorchPeer(
            "gelu_backward.grad_input",
            lambda a, p, g, x, o: a.gelu_backward.grad_input(
                g, x, approximate=p["approximate"], grad_input=o))),
    ActivationKernel(
        "gelu_tanh", "gelu", {"approximate": "tanh"}, derivative_terms=_gelu_tanh_terms,
        torch_forward=TorchPeer(
            "gelu.out", lambda a, p, x, o: a.gelu.out(x, approximate=p["approximate"], out=o)),
        torch_backward=TorchPeer(
            "gelu_backward.grad_input",
            lambda a, p, g, x, o: a.gelu_backward.grad_input(
                g, x, approximate=p["approximate"], grad_input=o))),
    ActivationKernel(
        "silu", "silu", derivative_terms=_silu_terms,
        torch_forward=TorchPeer(
            "silu.out", lambda a, p, x, o: a.silu.out(x, out=o)),
        torch_backward=TorchPeer(
            "silu_backward.grad_input",
            lambda a, p, g, x, o: a.silu_backward.grad_input(g, x, grad_input=o))),
    ActivationKernel(
        "softplus", "softplus", {"beta": 1.0, "threshold": 20.0},
        torch_forward=TorchPeer(
            "softplus.out",
            lambda a, p, x, o: a.softplus.out(x, p["beta"], p["threshold"], out=o)),
        torch_backward=TorchPeer(
            "softplus_backward.grad_input",
            lambda a, p, g, x, o: a.softplus_backward.grad_input(
                g, x, p["beta"], p["threshold"], grad_input=o))),
    ActivationKernel(
        "mish", "mish", derivative_terms=_mish_terms,
        torch_forward=TorchPeer(
            "mish.out", lambda a, p, x, o: a.mish.out(x, out=o)),
        # mish_backward has no out= overload.
        torch_backward=TorchPeer(
            "mish_backward", lambda a, p, g, x, o: a.mish_backward(g, x), allocates=True)),
    ActivationKernel(
        "hardsigmoid", "hardsigmoid",
        torch_forward=TorchPeer(
            "hardsigmoid.out", lambda a, p, x, o: a.hardsigmoid.out(x, out=o)),
        torch_backward=TorchPeer(
            "hardsigmoid_backward.grad_input",
            lambda a, p, g, x, o: a.hardsigmoid_backward.grad_input(g, x, grad_input=o))),
    ActivationKernel(
        "hardswish", "hardswish",
        torch_forward=TorchPeer(
            "hardswish.out", lambda a, p, x, o: a.hardswish.out(x, out=o)),
        torch_backward=TorchPeer(
            "hardswish_backward.out",
            lambda a, p, g, x, o: a.hardswish_backward.out(g, x, out=o))),
    ActivationKernel(
        "hardtanh", "hardtanh", {"min_val": -1.0, "max_val": 1.0}, backward_from="y", exact=True,
        torch_forward=TorchPeer(
            "hardtanh.out",
            lambda a, p, x, o: a.hardtanh.out(x, p["min_val"], p["max_val"], out=o)),
        torch_backward=TorchPeer(
            "hardtanh_backward.grad_input",
            lambda a, p, g, y, o: a.hardtanh_backward.grad_input(
                g, y, p["min_val"], p["max_val"], grad_input=o))),
)




class ActivationArrays:
    """The arrays every activation case shares, so that they are made once
    per run: x and grad_output (standard normal), y (the forward output, for
    backward passes that read it) and out, on the plan's device (numpy or
    CuPy), with zero-copy torch views and JAX copies where those peers run;
    to_host copies a prefix back for the numpy reference."""

    def __init__(self, plan: Plan):
        rng = np.random.default_rng(0)
        put, self.to_host = on_device(plan.device)
        self.x = put(standard_normal(rng, plan.size, plan.dtype))
        self.grad = put(standard_normal(rng, plan.size, plan.dtype))
        self.y = put(np.empty(plan.size, dtype=plan.dtype))
        self.out = put(np.empty(plan.size, dtype=plan.dtype))
        if plan.torch is not None:
            view = torch_view(plan)
            self.tensors = {name: view(getattr(self, name)) for name in ("x", "grad", "y", "out")}
        if plan.jax is not None:
            self.jax = {name: plan.jax.device_put(getattr(self, name)) for name in ("x", "grad")}


@dataclass
class ActivationCheck:
    """The check inputs of one case, on the host, and judge(), which holds
    an output (fusednn's or a peer's) on them to the kernel's bound."""
    x: np.ndarray
    grad: np.ndarray | None   # backward only
    saved: np.ndarray | None  # what the backward reads besides grad_output (x or y)
    judge: Callable[[np.ndarray], CheckResult]


def activation_check_data(kernel: ActivationKernel, direction: str, dtype,
                          device: str = "cpu") -> ActivationCheck:
    """The check inputs and judge of a case; y, where the backward reads it,
    is fusednn's own forward output."""
    x, grad = check_inputs(dtype)
    params = kernel.params
    tolerance = 0.0 if kernel.exact else TOLERANCE_ULP[np.dtype(dtype).name]
    if direction == "forward":
        expected = reference.activation(kernel.activation, x, **params)
        return ActivationCheck(x, None, None,
                               lambda out: compare(out, expected, tolerance, {"x": x},
                                                   ordinary=ORDINARY))
    put, get = on_device(device)
    saved = x
    if kernel.backward_from == "y":
        saved = get(activation(kernel.activation, put(x), **params))
    expected = reference.activation_backward(kernel.activation, grad,
                                             **{kernel.backward_from: saved}, **params)
    inputs = {"x": x, "grad_output": grad}
    if kernel.backward_from == "y":
        inputs["y"] = saved
    terms = None
    if kernel.derivative_terms is not None:
        with np.errstate(all="ignore"):
            terms = kernel.derivative_terms(x.astype(np.float64))
    return ActivationCheck(x, grad, saved, lambda out: compare(
        out, expected, tolerance, inputs, grad=grad, terms=terms, ordinary=ORDINARY))


def _activation_check(kernel: ActivationKernel, direction: str, data: ActivationCheck,
                      device: str = "cpu") -> CheckResult:
    put, get = on_device(device)
    if direction == "forward":
        return data.judge(get(activation(kernel.activation, put(data.x), **kernel.params)))
    return data.judge(get(activation_backward(
        kernel.activation, put(data.grad), **{kernel.backward_from: put(data.saved)},
        **kernel.params)))


def _torch_peers(kernel: ActivationKernel, direction: str, plan: Plan, arrays: ActivationArrays,
                 data: ActivationCheck, runners: Runners) -> None:
    aten, params = plan.torch.ops.aten, kernel.params
    if direction == "forward":
        peer, names, check = kernel.torch_forward, ("x",), (data.x,)
    else:
        peer = kernel.torch_backward
        names, check = ("grad", kernel.backward_from), (data.grad, data.saved)

    def function(*tensors):
        return peer.call(aten, params, *tensors)

    def check_args():
        inputs = torch_check_tensors(plan, *check)
        return [*inputs, plan.torch.empty_like(inputs[0])]

    # An op without out= writes its result into the preallocated output
    # under torch.compile, where the copy fuses into the kernel.
    compiled = (lambda *tensors: tensors[-1].copy_(function(*tensors))) if peer.allocates else None
    peers, errors = torch_peers(
        plan, peer.op, function, [arrays.tensors[t] for t in (*names, "out")], check_args,
        data.judge, allocates="no out= overload" if peer.allocates else None, compiled=compiled)
    runners.peers += peers
    runners.peer_errors.update(errors)


def _jax_peer(kernel: ActivationKernel, direction: str, plan: Plan, arrays: ActivationArrays,
              data: ActivationCheck) -> list:
    jax = plan.jax
    if direction == "forward":
        return jax_peer(plan, f"jax.jit({JAX_FORWARD[kernel.name][0]})",
                        lambda x: kernel.jax_forward(jax, x), [arrays.jax["x"]],
                        lambda: [data.x], data.judge)

    def backward(grad, x):
        _, vjp = jax.vjp(lambda v: kernel.jax_forward(jax, v), x)
        return vjp(grad)[0]

    return jax_peer(plan, f"jax.jit(jax.vjp of {JAX_FORWARD[kernel.name][0]})", backward,
                    [arrays.jax["grad"], arrays.jax["x"]], lambda: [data.grad, data.x],
                    data.judge)


def _activation_runners(kernel: ActivationKernel, direction: str, plan: Plan,
                        arrays: ActivationArrays, data: ActivationCheck) -> Runners:
    name, params = kernel.activation, kernel.params
    m = min(plan.size, plan.reference_elements)
    x, grad, out = arrays.x, arrays.grad, arrays.out
    x_host = arrays.to_host(x[:m])
    if direction == "forward":
        runners = Runners(ours=lambda: activation(name, x, out=out, **params),
                          reference=lambda: reference.activation(name, x_host, **params),
                          reference_elements=m)
    else:
        if kernel.backward_from == "y":
            activation(name, x, out=arrays.y, **params)
        from_saved = kernel.backward_from
        saved = getattr(arrays, from_saved)
        grad_host, saved_host = arrays.to_host(grad[:m]), arrays.to_host(saved[:m])
        runners = Runners(
            ours=lambda: activation_backward(name, grad, **{from_saved: saved}, out=out, **params),
            reference=lambda: reference.activation_backward(
                name, grad_host, **{from_saved: saved_host}, **params),
            reference_elements=m)
    if plan.torch is not None:
        _torch_peers(kernel, direction, plan, arrays, data, runners)
    if plan.jax is not None:
        runners.peers += _jax_peer(kernel, direction, plan, arrays, data)
    return runners


def activation_cases(plan: Plan) -> list[Case]:
    """Forward and backward of every activation, as in ACTIVATION_KERNELS."""
    arrays = functools.cache(lambda: ActivationArrays(plan))
    item = plan.dtype.itemsize
    arrays_moved = {"forward": (1, 1), "backward": (2, 1)}  # (read, written)
    cases = []
    for kernel in ACTIVATION_KERNELS:
        for direction, (reads, writes) in arrays_moved.items():
            # The check's inputs and expected values serve fusednn's check
            # and, later, the peers'.
            data = functools.cache(functools.partial(activation_check_data, kernel, direction,
                                                     plan.dtype, plan.device))
            cases.append(Case(
                family="activations", name=kernel.name, direction=direction,
                shape=(plan.size,),
                bytes_per_element=(reads + writes) * item, traffic=f"{reads}r+{writes}w",
                check=lambda k=kernel, d=direction, c=data: _activation_check(k, d, c(),
                                                                              plan.device),
                prepare=lambda k=kernel, d=direction, c=data: _activation_runners(
                    k, d, plan, arrays(), c())))
    return cases


def describe_activations(plan: Plan, checks: dict) -> FamilyText:
    exact = sorted({case.name for case, c in checks.items() if c.tolerance == 0})
    cancelling = sorted({case.label for case, c in checks.items() if c.cancelling})
    inputs = next(iter(checks.values())).inputs
    check = (f"within {TOLERANCE_ULP[plan.dtype.name]:g} ulp"
             + (f" ({', '.join(exact)} exact)" if exact else "")
             + f" on {inputs} inputs incl. +-0, subnormals, +-inf, NaN, huge magnitudes")
    check_notes = []
    if cancelling:
        precision = finfo(plan.dtype).nmant + 1
        check_notes.append(
            f"where the derivative's two terms cancel (by a factor >= {CANCELLATION_FACTOR:g}) "
            f"|error| <= {CANCELLATION_UNITS:g} * 2^-{precision} * |grad_output| is accepted "
            f"instead: {', '.join(cancelling)}")
    return FamilyText(
        arrays=f"{size_text(plan.size)} {plan.dtype.name} elements",
        check=check, check_notes=check_notes, reference=reference_text(plan),
        torch="torch.ops.aten <op>.out / <op>_backward.grad_input writing a preallocated "
              "output",
        jax="jax.nn's function (jnp.tanh, jnp.clip for tanh and hardtanh), its backward by "
            "jax.vjp from x")


def activation_kernel(name: str) -> ActivationKernel:
    return next(k for k in ACTIVATION_KERNELS if k.name == name)
