"""The dropout family of ``python -m fusednn bench``: inverted dropout
(the forward also writing the bit-packed mask, the backward regenerating it
from (seed, offset)) and the fused bias + activation + dropout epilogue;
the check against fusednn.reference, whose masks follow the Philox
contract bit for bit; and the peers, whose masks come from generators of
their own, by the reference computed with the peer's mask: PyTorch's
native_dropout and its add + activation + native_dropout, the same through
torch.compile, and jax.random.bernoulli masks under jax.jit (regenerated
from the key in the backward, as fusednn regenerates its own).
"""
from __future__ import annotations

import functools
import math
from dataclasses import dataclass, field
from typing import Callable

import numpy as np

from .. import reference
from ..dropout import bias_act_dropout, bias_act_dropout_backward, dropout, dropout_backward
from .activations import activation_kernel
from .cases import Case, FamilyText, Plan, Runners, on_device, reference_text, size_text
from .checks import (ORDINARY, TOLERANCE_ULP, CheckResult, check_dropped_fraction,
                     check_inputs, compare, standard_normal)
from .peers import jax_peer, torch_check_tensors, torch_peers, torch_view

DROPOUT_P = 0.1
DROPOUT_SEED = 20240601
DROPOUT_OFFSET = 2**33 + 7
DROPOUT_SCALE_ULP = 1.5
# The key of the JAX peer's masks.
JAX_SEED = 0


@dataclass
class DropoutKernel:
    name: str                 # in the table and in --kernels
    activation: str | None    # None: plain dropout; else bias + activation + dropout
    params: dict = field(default_factory=dict)


DROPOUT_KERNELS = (
    DropoutKernel("dropout", None),
    DropoutKernel("bias_relu_dropout", "relu"),
    DropoutKernel("bias_gelu_dropout", "gelu", {"approximate": "none"}),
)


@dataclass
class DropoutCheck:
    """The check inputs of one case (x, or h = x as a column with a zero
    bias; grad_output) and its bound; judge() holds a peer's output to the
    reference computed with the peer's own mask."""
    kernel: DropoutKernel
    direction: str
    x: np.ndarray
    grad: np.ndarray
    tolerance: float
    inputs: dict
    scaled_grad: np.ndarray | None = None   # for the cancellation allowance
    terms: tuple | None = None

    @property
    def h(self) -> np.ndarray:
        return self.x.reshape(-1, 1)

    @property
    def bias(self) -> np.ndarray:
        # h + 0 is exact: the error is the kernel's own.
        return np.zeros(1, dtype=self.x.dtype)

    def expected(self, keep: np.ndarray) -> np.ndarray:
        """The reference's output with the keep mask given (booleans)."""
        mask = np.packbits(np.asarray(keep, dtype=bool).reshape(-1), bitorder="little")
        kernel = self.kernel
        if kernel.activation is None:
            scaled = self.x if self.direction == "forward" else self.grad
            return reference.dropout_backward(scaled, DROPOUT_P, mask=mask)
        if self.direction == "forward":
            return reference.dropout_backward(
                reference.activation(kernel.activation, self.x, **kernel.params), DROPOUT_P,
                mask=mask)
        return reference.bias_act_dropout_backward(
            self.grad.reshape(-1, 1), self.h, self.bias, kernel.activation, DROPOUT_P,
            mask=mask, **kernel.params)[0].reshape(-1)

    def judge(self, output, keep) -> CheckResult:
        """A peer's output, given the mask it applied."""
        keep = np.asarray(keep, dtype=bool).reshape(-1)
        result = compare(np.asarray(output).reshape(-1), self.expected(keep), self.tolerance,
                         self.inputs, grad=self.scaled_grad, terms=self.terms, ordinary=ORDINARY)
        return check_dropped_fraction(result, keep, DROPOUT_P)


def _dropout_check_data(kernel: DropoutKernel, direction: str, dtype) -> DropoutCheck:
    x, grad = check_inputs(dtype)
    if kernel.activation is None:
        # Kept elements are x times 1 / keep rounded to the dtype: two
        # roundings, at most 1.5 ulp of x / keep.
        inputs = {"x": x} if direction == "forward" else {"grad_output": grad}
        return DropoutCheck(kernel, direction, x, grad, DROPOUT_SCALE_ULP, inputs)
    act = activation_kernel(kernel.name.split("_")[1])
    tolerance = DROPOUT_SCALE_ULP + (0.0 if act.exact else TOLERANCE_ULP[np.dtype(dtype).name])
    data = DropoutCheck(kernel, direction, x, grad, tolerance, {"h": x})
    if direction == "backward":
        data.inputs["grad_output"] = grad
        data.scaled_grad = grad.astype(np.float64) / (1.0 - DROPOUT_P)
        if act.derivative_terms is not None:
            with np.errstate(all="ignore"):
                data.terms = act.derivative_terms(x.astype(np.float64))
    return data


def _dropout_check(kernel: DropoutKernel, direction: str, data: DropoutCheck,
                   device: str = "cpu") -> CheckResult:
    """fusednn's output against the reference with the contract's mask; a
    forward mask that differs in any bit fails outright."""
    x, grad = data.x, data.grad
    stream = dict(seed=DROPOUT_SEED, offset=DROPOUT_OFFSET)
    put, get = on_device(device)
    mask = None
    if kernel.activation is None:
        if direction == "forward":
            ours, mask = (get(a) for a in dropout(put(x), DROPOUT_P, return_mask=True,
                                                  **stream))
            expected = reference.dropout(x, DROPOUT_P, **stream)
        else:
            ours = get(dropout_backward(put(grad), DROPOUT_P, **stream))
            expected = reference.dropout_backward(grad, DROPOUT_P, **stream)
    elif direction == "forward":
        ours, mask = (get(a) for a in bias_act_dropout(
            put(data.h), put(data.bias), kernel.activation, DROPOUT_P, return_mask=True,
            **stream, **kernel.params))
        expected = reference.bias_act_dropout(data.h, data.bias, kernel.activation, DROPOUT_P,
                                              **stream, **kernel.params)
    else:
        g = grad.reshape(-1, 1)
        ours = get(bias_act_dropout_backward(
            put(g), put(data.h), put(data.bias), kernel.activation, DROPOUT_P, **stream,
            **kernel.params)[0])
        expected, _ = reference.bias_act_dropout_backward(
            g, data.h, data.bias, kernel.activation, DROPOUT_P, **stream, **kernel.params)
    result = compare(ours.reshape(-1), expected.reshape(-1), data.tolerance, data.inputs,
                     grad=data.scaled_grad, terms=data.terms)
    if mask is not None and not np.array_equal(
            mask, reference.dropout_mask(x.shape, DROPOUT_P, **stream)):
        result.error, result.worst = math.inf, "the mask differs from the Philox contract"
    return result


class DropoutArrays:
    """Inputs shared by the dropout cases, on the plan's device (numpy or
    CuPy): x and grad_output as flat arrays, and the same memory viewed as
    (rows, 4096) with a bias of 4096 for the fused epilogue, plus zero-copy
    torch views (and PyTorch's own mask, for its backward) and JAX copies
    where those peers run; to_host copies a prefix back for the numpy
    reference."""

    COLUMNS = 4096

    @classmethod
    def shape_for(cls, size: int) -> tuple:
        columns = cls.COLUMNS if size % cls.COLUMNS == 0 else 1
        return (size // columns, columns)

    def __init__(self, plan: Plan):
        rng = np.random.default_rng(0)
        put, self.to_host = on_device(plan.device)
        size = plan.size
        self.x = put(standard_normal(rng, size, plan.dtype))
        self.grad = put(standard_normal(rng, size, plan.dtype))
        self.out = put(np.empty(size, dtype=plan.dtype))
        self.shape = self.shape_for(size)
        self.bias = put(standard_normal(rng, self.shape[1], plan.dtype))
        torch, jax = plan.torch, plan.jax
        if torch is not None:
            view = torch_view(plan)
            self.tensors = {name: view(getattr(self, name)) for name in ("x", "grad", "bias",
                                                                         "out")}
            _, self.tensors["mask"] = torch.ops.aten.native_dropout(self.tensors["x"], DROPOUT_P,
                                                                    True)
            self.tensors["mask_out"] = torch.empty_like(self.tensors["mask"])
        if jax is not None:
            self.jax = {name: jax.device_put(getattr(self, name)) for name in ("x", "grad",
                                                                               "bias")}
            self.jax_key = jax.random.key(JAX_SEED)


def torch_dropout_functions(torch, kernel: DropoutKernel, direction: str):
    """(op, eager function, compiled function) of PyTorch's version, each
    returning its output first and the mask it applied last (for the
    check). The eager one allocates (no out= overloads); the compiled one
    writes the preallocated `out` and `mask_out`. PyTorch's generator cannot
    regenerate a mask, so its forward passes store one and its backward
    passes read it."""
    aten = torch.ops.aten
    scale = 1.0 / (1.0 - DROPOUT_P)
    name = kernel.activation
    if name is None and direction == "forward":
        def eager(x, out, mask_out):
            return aten.native_dropout(x, DROPOUT_P, True)

        def compiled(x, out, mask_out):
            y, mask = eager(x, out, mask_out)
            return out.copy_(y), mask_out.copy_(mask)

        return "native_dropout", eager, compiled
    if name is None:
        def eager(grad, mask, out):
            return aten.native_dropout_backward(grad, mask, scale), mask

        def compiled(grad, mask, out):
            return out.copy_(eager(grad, mask, out)[0]), mask

        return "native_dropout_backward (stored mask)", eager, compiled
    if direction == "forward":
        def eager(h, bias, out, mask_out):
            z = torch.add(h, bias)
            return aten.native_dropout(getattr(torch.nn.functional, name)(z), DROPOUT_P, True)

        def compiled(h, bias, out, mask_out):
            y, mask = eager(h, bias, out, mask_out)
            return out.copy_(y), mask_out.copy_(mask)

        return f"add + {name} + native_dropout", eager, compiled

    def eager(grad, h, bias, mask, out):
        z = torch.add(h, bias)
        dz = aten.native_dropout_backward(grad, mask, scale)
        dz = aten.gelu_backward(dz, z) if name == "gelu" else aten.threshold_backward(dz, z, 0)
        return dz, dz.sum(0), mask

    def compiled(grad, h, bias, mask, out):
        dz, grad_bias, _ = eager(grad, h, bias, mask, out)
        return out.copy_(dz), grad_bias, mask

    return f"native_dropout_backward + {name}_backward + sum (stored mask)", eager, compiled


def jax_dropout_function(jax, kernel: DropoutKernel, direction: str) -> tuple[str, Callable]:
    """(op, function) of JAX's version: masks from jax.random.bernoulli of
    a key, regenerated in the backward."""
    jnp = jax.numpy
    keep = 1.0 - DROPOUT_P

    def mask(key, shape):
        return jax.random.bernoulli(key, keep, shape)

    if kernel.activation is None and direction == "forward":
        def forward(x, key):
            kept = mask(key, x.shape)
            return jnp.where(kept, x / keep, 0), kept

        return "jax.random.bernoulli + where, returning the mask", forward
    if kernel.activation is None:
        def backward(grad, key):
            return jnp.where(mask(key, grad.shape), grad / keep, 0)

        return "where(bernoulli regenerated from the key)", backward
    act = activation_kernel(kernel.name.split("_")[1])
    if direction == "forward":
        def fused(h, bias, key):
            return jnp.where(mask(key, h.shape), act.jax_forward(jax, h + bias) / keep, 0)

        return f"h + bias, jax.nn.{kernel.activation}, bernoulli mask", fused

    def fused_backward(grad, h, bias, key):
        _, vjp = jax.vjp(lambda z: act.jax_forward(jax, z), h + bias)
        grad_h = vjp(jnp.where(mask(key, h.shape), grad / keep, 0))[0]
        return grad_h, grad_h.sum(0)

    return f"jax.vjp of jax.nn.{kernel.activation}, bernoulli mask regenerated", fused_backward


def _torch_peers(kernel: DropoutKernel, direction: str, plan: Plan, arrays: DropoutArrays,
                 data: DropoutCheck, runners: Runners) -> None:
    torch = plan.torch
    op, eager, compiled = torch_dropout_functions(torch, kernel, direction)
    t = arrays.tensors
    fused = kernel.activation is not None
    shaped = {name: t[name].view(arrays.shape) if fused else t[name]
              for name in ("x", "grad", "mask", "mask_out", "out")}
    check_x, check_grad = (torch_check_tensors(plan, a.reshape(-1, 1) if fused else a)[0]
                           for a in (data.x, data.grad))
    check_mask = torch.ops.aten.native_dropout(check_x, DROPOUT_P, True)[1]
    bias = torch_check_tensors(plan, data.bias) if fused else []
    outputs = [torch.empty_like(check_x)]
    if direction == "forward":
        timed = [shaped["x"], *([t["bias"]] if fused else []), shaped["out"], shaped["mask_out"]]
        check = [check_x, *bias, *outputs, torch.empty_like(check_mask)]
    elif fused:
        timed = [shaped["grad"], shaped["x"], t["bias"], shaped["mask"], shaped["out"]]
        check = [check_grad, check_x, *bias, check_mask, *outputs]
    else:
        timed = [shaped["grad"], shaped["mask"], shaped["out"]]
        check = [check_grad, check_mask, *outputs]
    peers, errors = torch_peers(plan, op, eager, timed, lambda: check,
                                lambda outputs: data.judge(outputs[0], outputs[-1]),
                                allocates="no out= overload", compiled=compiled)
    runners.peers += peers
    runners.peer_errors.update(errors)


def _jax_peer(kernel: DropoutKernel, direction: str, plan: Plan, arrays: DropoutArrays,
              data: DropoutCheck) -> list:
    jax = plan.jax
    op, function = jax_dropout_function(jax, kernel, direction)
    j, key = arrays.jax, arrays.jax_key

    def judge(outputs):
        if kernel.activation is None and direction == "forward":
            return data.judge(outputs[0], outputs[1])
        # The same key draws the same mask outside the jitted function.
        output = outputs[0] if isinstance(outputs, tuple) else outputs
        keep = jax.random.bernoulli(key, 1.0 - DROPOUT_P, output.shape)
        return data.judge(output, jax.device_get(keep))

    if kernel.activation is None:
        name = "x" if direction == "forward" else "grad"
        return jax_peer(plan, op, function, [j[name], key],
                        lambda: [getattr(data, name), key], judge)
    h = j["x"].reshape(arrays.shape)
    if direction == "forward":
        return jax_peer(plan, op, function, [h, j["bias"], key],
                        lambda: [data.h, data.bias, key], judge)
    return jax_peer(plan, op, function, [j["grad"].reshape(arrays.shape), h, j["bias"], key],
                    lambda: [data.grad.reshape(-1, 1), data.h, data.bias, key], judge)


def _dropout_runners(kernel: DropoutKernel, direction: str, plan: Plan,
                     arrays: DropoutArrays, data: DropoutCheck) -> Runners:
    m = min(plan.size, plan.reference_elements)
    stream = dict(seed=DROPOUT_SEED, offset=DROPOUT_OFFSET)
    x, grad, out = arrays.x, arrays.grad, arrays.out
    x_host, grad_host = arrays.to_host(x[:m]), arrays.to_host(grad[:m])
    if kernel.activation is None:
        if direction == "forward":
            runners = Runners(
                ours=lambda: dropout(x, DROPOUT_P, return_mask=True, out=out, **stream),
                reference=lambda: reference.dropout(x_host, DROPOUT_P, **stream),
                reference_elements=m)
        else:
            runners = Runners(
                ours=lambda: dropout_backward(grad, DROPOUT_P, out=out, **stream),
                reference=lambda: reference.dropout_backward(grad_host, DROPOUT_P, **stream),
                reference_elements=m)
    else:
        name, params = kernel.activation, kernel.params
        h, g, o = (a.reshape(arrays.shape) for a in (x, grad, out))
        rows = max(1, m // arrays.shape[1])
        h_host, g_host = arrays.to_host(h[:rows]), arrays.to_host(g[:rows])
        bias_host = arrays.to_host(arrays.bias)
        if direction == "forward":
            runners = Runners(
                ours=lambda: bias_act_dropout(h, arrays.bias, name, DROPOUT_P,
                                              out=o, **stream, **params),
                reference=lambda: reference.bias_act_dropout(h_host, bias_host, name,
                                                             DROPOUT_P, **stream, **params),
                reference_elements=rows * arrays.shape[1])
        else:
            runners = Runners(
                ours=lambda: bias_act_dropout_backward(
                    g, h, arrays.bias, name, DROPOUT_P, out=o, **stream, **params),
                reference=lambda: reference.bias_act_dropout_backward(
                    g_host, h_host, bias_host, name, DROPOUT_P, **stream, **params),
                reference_elements=rows * arrays.shape[1])
    if plan.torch is not None:
        _torch_peers(kernel, direction, plan, arrays, data, runners)
    if plan.jax is not None:
        runners.peers += _jax_peer(kernel, direction, plan, arrays, data)
    return runners


def dropout_cases(plan: Plan) -> list[Case]:
    """Dropout (forward returning the packed mask, backward regenerating it
    from (seed, offset)) and the fused bias + activation + dropout."""
    arrays = functools.cache(lambda: DropoutArrays(plan))
    arrays_shape = DropoutArrays.shape_for(plan.size)
    item = plan.dtype.itemsize
    cases = []
    for kernel in DROPOUT_KERNELS:
        fused = kernel.activation is not None
        # The forward of plain dropout also writes the packed mask: 1/8 byte.
        traffic = {"forward": ("1r+1w" if fused else "1r+1w+mask",
                               2 * item + (0 if fused else 1 / 8)),
                   "backward": ("2r+1w" if fused else "1r+1w", (3 if fused else 2) * item)}
        for direction, (label, moved) in traffic.items():
            shape = (plan.size,) if kernel.activation is None else arrays_shape
            # The check's inputs and expected values serve fusednn's check
            # and, later, the peers'.
            data = functools.cache(functools.partial(_dropout_check_data, kernel, direction,
                                                     plan.dtype))
            cases.append(Case(
                family="dropout", name=kernel.name, direction=direction, shape=shape,
                bytes_per_element=moved, traffic=label,
                check=lambda k=kernel, d=direction, c=data: _dropout_check(k, d, c(),
                                                                           plan.device),
                prepare=lambda k=kernel, d=direction, c=data: _dropout_runners(
                    k, d, plan, arrays(), c())))
    return cases


def describe_dropout(plan: Plan, checks: dict) -> FamilyText:
    inputs = next(iter(checks.values())).inputs
    rows, columns = DropoutArrays.shape_for(plan.size)
    return FamilyText(
        arrays=(f"{size_text(plan.size)} {plan.dtype.name} elements; the fused kernels on "
                f"({rows}, {columns}) with a bias of {columns}; p = {DROPOUT_P}"),
        check=(f"masks bit-exact to the Philox contract; outputs within "
               f"{DROPOUT_SCALE_ULP:g} ulp (+ the activation's "
               f"{TOLERANCE_ULP[plan.dtype.name]:g}) on {inputs} inputs incl. +-0, "
               "subnormals, +-inf, NaN"),
        reference=reference_text(plan),
        torch=("torch.ops.aten native_dropout / native_dropout_backward (from its stored "
               "mask), and add + activation + native_dropout for the fused rows"),
        jax=("masks by jax.random.bernoulli, regenerated from the key in the backward; "
             "activations from jax.nn, their backward by jax.vjp"))
