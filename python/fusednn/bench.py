"""``python -m fusednn bench``: checks every kernel against the float64
reference, then times it against the memory roof, the reference and PyTorch.

What a row counts: ``bytes/elem`` is the memory traffic one element costs
(an activation's forward reads x and writes y: 1 read + 1 write; its
backward reads grad_output and x or y and writes grad_input: 2 reads + 1
write; batch norm's forward reads x twice, for the statistics and to
normalize, and writes y: 2 reads + 1 write; its backward reads x and
grad_output twice each and writes grad_input: 4 reads + 1 write). GB/s is
bytes moved (elements x bytes/elem) per second, 1 GB = 1e9 bytes. The roof
is a plain copy of the same number of bytes, timed in each row's rounds
(a row's % roof uses the copies of its own rounds): on the CPU the faster of
``fusednn._cpu.copy`` (threaded, streaming stores) and ``np.copyto``; on the
GPU (``--device cuda``) the faster of a device-to-device ``cudaMemcpyAsync``
and ``cupy.copyto``. The copy, the numpy reference and PyTorch are timed in
the same rounds as each kernel (one call of each per round, medians over the
rounds), so that the load of a busy machine hits them alike and every ratio
comes from one run. GPU work is timed with CUDA events on CuPy's current
stream, with the GPU held busy while the host enqueues each timed call, so
that only device time counts; the numpy reference always runs on the host,
by wall clock.

Kernel families plug in through ``FAMILIES``: a family names its kernels and
gives, per device, a function that builds its ``Case`` objects (the array
shape, bytes per element, the calls to time, the check against
``fusednn.reference``) and the lines that tell how it is checked and timed.
The families are the activations, batch normalization and dropout (with the
fused bias + activation + dropout); a device needs a
copy roof in ``COPY_ROOFS`` before any family can be timed on it.
"""
from __future__ import annotations

import argparse
import dataclasses
import datetime
import functools
import json
import math
import os
import platform
import statistics
import sys
import time
from dataclasses import KW_ONLY, dataclass, field
from typing import Callable

import numpy as np

from . import reference
from ._backend import _cpu, get_num_threads, info, set_num_threads
from .activations import activation, activation_backward
from .batchnorm import batch_norm, batch_norm_backward
from .dropout import bias_act_dropout, bias_act_dropout_backward, dropout, dropout_backward

DEFAULT_SIZE = 2**25
QUICK_SIZE = 2**22
# A GPU streams 2^22 elements in microseconds, where launch overhead and
# caches would decide; these sizes measure memory bandwidth.
CUDA_DEFAULT_SIZE = 2**28
CUDA_QUICK_SIZE = 2**26
DEFAULT_REPEAT = 7
QUICK_REPEAT = 5
WARMUP = 1
# The reference runs in Python-level float64 (gelu calls math.erfc per
# element), so it is timed on a prefix of this many elements and scaled.
REFERENCE_ELEMENTS = 2**20

# Accuracy the check demands, in ulp of the reference rounded to the dtype.
# float32 is the design's number; float64 has no target there, and this
# bound still rejects any wrong formula (about 1e-12 relative).
TOLERANCE_ULP = {"float32": 4.0, "float64": 4096.0}
# Where a derivative's two terms cancel near its root (their magnitudes
# add up to CANCELLATION_FACTOR times their sum or more), the design allows
# an absolute error of CANCELLATION_UNITS * 2^-p * |grad_output| instead,
# p the dtype's precision (24 for float32).
CANCELLATION_UNITS = 8.0
CANCELLATION_FACTOR = 2.0
CHECK_RANDOM_VALUES = 4096


class UsageError(Exception):
    """A bad option value; the CLI reports it as an argparse error."""


class BenchError(Exception):
    """The benchmark cannot run here (no CUDA, no matplotlib, ...)."""


@dataclass
class Plan:
    """What one run measures, shared by every case builder."""
    device: str
    dtype: np.dtype
    size: int
    repeat: int
    threads: int
    reference_elements: int
    torch: object | None      # the torch module, or None when not importable
    torch_note: str           # why there is no torch column, or its version
    # Families with shapes of their own (batch norm) keep them unless
    # --size is given, and take a smaller one with --quick.
    size_given: bool = False
    quick: bool = False


@dataclass
class Runners:
    """The calls one case times, with its inputs already in place."""
    ours: Callable[[], object]
    reference: Callable[[], object]          # on the first reference_elements elements
    reference_elements: int
    torch: Callable[[], object] | None = None
    torch_op: str | None = None
    # Why torch allocates its result, where it does (no out= overload, or
    # because ours does too); None where it writes a preallocated output.
    torch_allocates: str | None = None


@dataclass
class CheckResult:
    """How one kernel compares with fusednn.reference on its family's check
    inputs. Errors are in `unit`: "ulp" of the reference rounded to the
    dtype, or "bound" where every value has an error bound of its own (1
    bound is the most allowed)."""
    error: float              # the largest error (outside the cancellation allowance)
    tolerance: float
    unit: str
    inputs: int
    worst: str                # where the largest error occurs, for the failure message
    cancelling: bool = False  # the absolute bound where the derivative's terms cancel applies

    @property
    def passed(self) -> bool:
        return self.error <= self.tolerance

    def describe(self) -> str:
        """The largest error and where it occurs."""
        if self.unit == "bound":
            return (f"{self.error:.3g} times the allowed error from fusednn.reference "
                    f"{self.worst}")
        allowed = "exact" if self.tolerance == 0 else f"{self.tolerance:g} {self.unit}"
        return (f"{self.error:.3g} {self.unit} from fusednn.reference {self.worst} "
                f"(allowed: {allowed})")


@dataclass(eq=False)  # compared and hashed by identity: checks are keyed by case
class Case:
    """One kernel in one direction, as its family's builder makes it: the
    shape of its input, the memory traffic it costs per element, check()
    against fusednn.reference, and prepare(), which puts its inputs in place
    and returns the calls to time."""
    family: str
    name: str
    direction: str            # "forward" or "backward"
    shape: tuple              # of x, the array the traffic is counted in
    bytes_per_element: float
    traffic: str              # what bytes_per_element counts: "2r+1w" is 2 arrays read, 1 written
    check: Callable[[], CheckResult]
    prepare: Callable[[], Runners]

    @property
    def label(self) -> str:
        return f"{self.name} {self.direction}"

    @property
    def elements(self) -> int:
        return math.prod(self.shape)


@dataclass
class FamilyText:
    """What the report says about one family's cases; each piece follows a
    heading of the report ("check: all N agree with fusednn.reference ...")."""
    arrays: str               # the arrays' sizes and dtype
    check: str                # the bounds, and on what inputs
    reference: str            # how the numpy reference is timed
    torch: str                # the PyTorch ops, and how they are called
    check_notes: list = field(default_factory=list)   # further lines about the check


@dataclass
class Result:
    """One row of the table, and of the JSON results."""
    family: str
    kernel: str
    direction: str
    shape: list
    elements: int
    traffic: str
    bytes_per_element: float
    bytes_moved: int
    time_ms: float
    gb_per_s: float
    roof_gb_per_s: float
    roof_source: str          # the faster copy routine
    percent_of_roof: float
    check_error: float
    check_unit: str           # "ulp", or "bound" (see CheckResult)
    reference_ms: float       # scaled to the full size
    reference_elements: int   # how many elements it was timed on
    x_numpy_reference: float
    torch_op: str | None = None
    torch_allocates: bool = False
    torch_allocates_why: str | None = None
    torch_ms: float | None = None
    x_torch: float | None = None


# ---- the check: kernel against fusednn.reference on a small input ------------

def check_inputs(dtype) -> tuple[np.ndarray, np.ndarray]:
    """x: random normal values and the special ones (+-0, subnormals, +-inf,
    NaN, huge magnitudes, the kinks at +-1 and +-3); grad_output: random
    normal values. The same for every run."""
    dtype = np.dtype(dtype)
    finfo = np.finfo(dtype)
    special = [0.0, -0.0, np.inf, -np.inf, np.nan, finfo.smallest_subnormal,
               -finfo.smallest_subnormal, finfo.tiny / 4, -finfo.tiny / 4, finfo.tiny, -finfo.tiny,
               finfo.max, -finfo.max, 1e30, -1e30, 1e4, -1e4, 100.0, -100.0, 20.0, -20.0,
               3.0, -3.0, 1.0, -1.0]
    rng = np.random.default_rng(0)
    x = np.concatenate([np.array(special, dtype=dtype),
                        (3.0 * rng.standard_normal(CHECK_RANDOM_VALUES)).astype(dtype)])
    return x, rng.standard_normal(x.size).astype(dtype)


def ulp_errors(ours: np.ndarray, expected: np.ndarray) -> np.ndarray:
    """|ours - expected| in units of the last place of expected in ours'
    dtype: 0 where ours equals expected rounded to that dtype (the same
    infinity and NaN included), inf where only one of them is NaN."""
    finfo = np.finfo(ours.dtype)
    with np.errstate(all="ignore"):
        expected = np.asarray(expected, dtype=np.float64)
        rounded = expected.astype(ours.dtype)
        _, exponent = np.frexp(np.abs(expected))
        ulp = np.maximum(np.ldexp(1.0, exponent - (finfo.nmant + 1)),
                         float(finfo.smallest_subnormal))
        ulp = np.where(expected == 0, float(finfo.smallest_subnormal), ulp)
        errors = np.abs(ours.astype(np.float64) - expected) / ulp
    errors = np.where(np.isnan(errors), np.inf, errors)
    agree = (ours == rounded) | (np.isnan(ours) & np.isnan(rounded))
    return np.where(agree, 0.0, errors)


def compare(ours, expected, tolerance_ulp, inputs: dict, grad=None, terms=None) -> CheckResult:
    """Errors of ours against the reference. Where the derivative's two
    terms (float64 arrays) cancel, an absolute error up to
    CANCELLATION_UNITS * 2^-p * |grad| is accepted instead of the ulp
    bound, p the dtype's precision."""
    errors = ulp_errors(ours, expected)
    if terms is not None:
        finfo = np.finfo(ours.dtype)
        with np.errstate(all="ignore"):
            cancels = (np.abs(terms[0]) + np.abs(terms[1])
                       >= CANCELLATION_FACTOR * np.abs(terms[0] + terms[1]))
            absolute = np.abs(ours.astype(np.float64) - expected)
            allowed = absolute <= CANCELLATION_UNITS * (finfo.eps / 2) * np.abs(grad)
        errors = np.where(cancels & allowed, 0.0, errors)
    i = int(np.argmax(errors))
    where = ", ".join(f"{name}={values[i]!s}" for name, values in inputs.items())
    worst = f"at {where}: got {ours[i]!s}, reference {np.float64(expected[i])!s}"
    return CheckResult(float(errors[i]), tolerance_ulp, "ulp", int(errors.size), worst,
                       terms is not None)


# ---- activations --------------------------------------------------------------

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


def on_device(device: str):
    """(to_device, to_host) array conversions for the kernels of `device`:
    identities on the CPU, CuPy's asarray and asnumpy on the GPU."""
    if device == "cuda":
        import cupy
        return cupy.asarray, cupy.asnumpy
    return (lambda a: a), (lambda a: a)


class ActivationArrays:
    """The arrays every activation case shares, so that they are made once
    per run: x and grad_output (standard normal), y (the forward output, for
    backward passes that read it) and out, on the plan's device (numpy or
    CuPy), with zero-copy torch views; to_host copies a prefix back for the
    numpy reference."""

    def __init__(self, size: int, dtype: np.dtype, torch, device: str = "cpu"):
        rng = np.random.default_rng(0)
        put, self.to_host = on_device(device)
        self.x = put(rng.standard_normal(size, dtype=dtype))
        self.grad = put(rng.standard_normal(size, dtype=dtype))
        self.y = put(np.empty(size, dtype=dtype))
        self.out = put(np.empty(size, dtype=dtype))
        if torch is not None:
            view = torch.from_numpy if device == "cpu" else torch.from_dlpack
            self.tensors = {name: view(getattr(self, name)) for name in ("x", "grad", "y", "out")}


def _activation_check(kernel: ActivationKernel, direction: str, dtype,
                      device: str = "cpu") -> CheckResult:
    x, grad = check_inputs(dtype)
    params = kernel.params
    tolerance = 0.0 if kernel.exact else TOLERANCE_ULP[np.dtype(dtype).name]
    put, get = on_device(device)
    if direction == "forward":
        ours = get(activation(kernel.activation, put(x), **params))
        return compare(ours, reference.activation(kernel.activation, x, **params), tolerance,
                       {"x": x})
    saved = x
    if kernel.backward_from == "y":
        saved = get(activation(kernel.activation, put(x), **params))
    saved_arg = {kernel.backward_from: saved}
    ours = get(activation_backward(kernel.activation, put(grad),
                                   **{kernel.backward_from: put(saved)}, **params))
    expected = reference.activation_backward(kernel.activation, grad, **saved_arg, **params)
    inputs = {"x": x, "grad_output": grad}
    if kernel.backward_from == "y":
        inputs["y"] = saved
    terms = None
    if kernel.derivative_terms is not None:
        with np.errstate(all="ignore"):
            terms = kernel.derivative_terms(x.astype(np.float64))
    return compare(ours, expected, tolerance, inputs, grad=grad, terms=terms)


def _activation_runners(kernel: ActivationKernel, direction: str, plan: Plan,
                        arrays: ActivationArrays) -> Runners:
    name, params = kernel.activation, kernel.params
    m = min(plan.size, plan.reference_elements)
    x, grad, out = arrays.x, arrays.grad, arrays.out
    x_host = arrays.to_host(x[:m])
    if direction == "forward":
        runners = Runners(ours=lambda: activation(name, x, out=out, **params),
                          reference=lambda: reference.activation(name, x_host, **params),
                          reference_elements=m)
        peer, tensors = kernel.torch_forward, ("x",)
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
        peer, tensors = kernel.torch_backward, ("grad", from_saved)
    if plan.torch is not None:
        aten = plan.torch.ops.aten
        args = [arrays.tensors[t] for t in tensors] + [arrays.tensors["out"]]
        runners.torch = lambda: peer.call(aten, params, *args)
        runners.torch_op = peer.op
        runners.torch_allocates = "no out= overload" if peer.allocates else None
    return runners


def activation_cases(plan: Plan) -> list[Case]:
    """Forward and backward of every activation, as in ACTIVATION_KERNELS."""
    arrays = functools.cache(
        lambda: ActivationArrays(plan.size, plan.dtype, plan.torch, plan.device))
    item = plan.dtype.itemsize
    arrays_moved = {"forward": (1, 1), "backward": (2, 1)}  # (read, written)
    cases = []
    for kernel in ACTIVATION_KERNELS:
        for direction, (reads, writes) in arrays_moved.items():
            cases.append(Case(
                family="activations", name=kernel.name, direction=direction,
                shape=(plan.size,),
                bytes_per_element=(reads + writes) * item, traffic=f"{reads}r+{writes}w",
                check=functools.partial(_activation_check, kernel, direction, plan.dtype,
                                        plan.device),
                prepare=lambda k=kernel, d=direction: _activation_runners(k, d, plan, arrays())))
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
        precision = np.finfo(plan.dtype).nmant + 1
        check_notes.append(
            f"where the derivative's two terms cancel (by a factor >= {CANCELLATION_FACTOR:g}) "
            f"|error| <= {CANCELLATION_UNITS:g} * 2^-{precision} * |grad_output| is accepted "
            f"instead: {', '.join(cancelling)}")
    m = min(plan.size, plan.reference_elements)
    reference_text = (f"timed on the first {m} elements and scaled linearly to {plan.size}"
                      if m < plan.size else f"timed on all {plan.size} elements")
    return FamilyText(
        arrays=f"{_size_text(plan.size)} {plan.dtype.name} elements",
        check=check, check_notes=check_notes, reference=reference_text,
        torch="torch.ops.aten <op>.out / <op>_backward.grad_input writing a preallocated "
              "output")


# ---- batch normalization ---------------------------------------------------------

# (N, C, H, W) of the timed cases: the shape of the design's numbers, and
# with --quick 2^22 elements (as many as the activations' QUICK_SIZE).
BATCH_NORM_SHAPE = (32, 128, 56, 56)
BATCH_NORM_QUICK_SHAPE = (32, 128, 32, 32)
BATCH_NORM_MOMENTUM = 0.1
BATCH_NORM_EPS = 1e-5
# layout -> (channel axis, the N, C, H, W dimensions in memory order)
BATCH_NORM_LAYOUTS = {"NCHW": (1, (0, 1, 2, 3)), "NHWC": (-1, (0, 2, 3, 1))}
BATCH_NORM_KERNELS = tuple(f"batch_norm[{layout}]" for layout in BATCH_NORM_LAYOUTS)
# The check's (N, C, H, W): more values per channel than one reduction
# unit of the kernels (65536), and runs (H * W) and a channel count that
# are not multiples of a vector.
BATCH_NORM_CHECK_SHAPE = (24, 20, 50, 57)
# The check's bounds (see _batch_norm_check): y and grad_input absolute, as
# the design states them for outputs of unit variance; the running
# statistics relative, as docs/batchnorm.md promises them. float64 has no
# target in the design: the kernels carry a channel's mean in one double,
# merged over the reduction's units, so at mean/std = 1e4 (ulp 1.8e-12) y
# is off by about 1e-12; 1e-11 allows for that and still rejects any wrong
# formula.
BATCH_NORM_TOLERANCE = {"float32": 1e-5, "float64": 1e-11}
RUNNING_STATISTICS_TOLERANCE = {"float32": 1e-6, "float64": 1e-12}


def batch_norm_shape(plan: Plan) -> tuple:
    """(N, C, H, W): BATCH_NORM_SHAPE, BATCH_NORM_QUICK_SHAPE with --quick,
    and with --size n the same N and C with H = W = round(sqrt(n / (N C))),
    at least 1, so that x has about n elements."""
    if not plan.size_given:
        return BATCH_NORM_QUICK_SHAPE if plan.quick else BATCH_NORM_SHAPE
    batch, channels = BATCH_NORM_SHAPE[:2]
    side = max(1, round(math.sqrt(plan.size / (batch * channels))))
    return (batch, channels, side, side)


def _in_layout(nchw: tuple, layout: str) -> tuple:
    return tuple(nchw[d] for d in BATCH_NORM_LAYOUTS[layout][1])


def _shape_text(shape: tuple) -> str:
    return "x".join(str(n) for n in shape)


def _reference_samples(plan: Plan, nchw: tuple) -> int:
    """How many samples of the batch the reference is timed on: about
    plan.reference_elements elements, and at least 2 (training needs more
    than one value per channel)."""
    per_sample = math.prod(nchw[1:])
    return min(nchw[0], max(2, plan.reference_elements // per_sample))


def _batch_norm_check_inputs(dtype: np.dtype):
    """x of BATCH_NORM_CHECK_SHAPE (NCHW): each channel a normal sample
    around its own center with its own spread, except channel 0 (mean 1e4
    times its spread, where a float32 shift x - mean loses the result),
    channel 1 (constant: variance 0; 0.75, so that every sum of it is exact)
    and channel 2 (one NaN). grad_output standard normal; gamma, beta and
    running statistics of order one."""
    rng = np.random.default_rng(0)
    batch, channels, height, width = BATCH_NORM_CHECK_SHAPE
    center = rng.uniform(-2.0, 2.0, channels)
    spread = rng.uniform(0.5, 2.0, channels)
    center[0], spread[0] = 1e4, 1.0
    center[1], spread[1] = 0.75, 0.0
    x = (center[:, None, None]
         + spread[:, None, None] * rng.standard_normal(BATCH_NORM_CHECK_SHAPE))
    x[batch // 2, 2, height // 2, width // 2] = np.nan
    grad = rng.standard_normal(BATCH_NORM_CHECK_SHAPE)
    per_channel = {"gamma": rng.uniform(0.5, 1.5, channels),
                   "beta": rng.uniform(-1.0, 1.0, channels),
                   "running_mean": rng.standard_normal(channels),
                   "running_var": rng.uniform(0.5, 2.0, channels)}
    return (x.astype(dtype), grad.astype(dtype),
            {name: a.astype(dtype) for name, a in per_channel.items()})


def bounded_errors(ours: np.ndarray, expected: np.ndarray, bound) -> np.ndarray:
    """|ours - expected| / bound: 0 where ours equals expected (the same
    infinity included) or both are NaN, inf where only one is NaN."""
    with np.errstate(all="ignore"):
        errors = np.abs(ours.astype(np.float64) - expected) / bound
        agree = (ours == expected) | (np.isnan(ours) & np.isnan(expected))
    errors = np.where(np.isnan(errors), np.inf, errors)
    return np.where(agree, 0.0, errors)


def compare_bounded(outputs: dict, inputs: int, dims: dict | None = None) -> CheckResult:
    """outputs: name -> (ours, expected, bound), the bound broadcasting to
    ours' shape. The error is the largest |ours - expected| / bound. dims
    names the axes of an output with that many dimensions, e.g.
    {4: "nchw"}, for the failure message."""
    largest, worst = -1.0, ""
    for name, (ours, expected, bound) in outputs.items():
        expected = np.asarray(expected, dtype=np.float64)
        bound = np.broadcast_to(bound, ours.shape)
        errors = bounded_errors(ours, expected, bound)
        i = np.unravel_index(int(np.argmax(errors)), errors.shape)
        if errors[i] > largest:
            largest = float(errors[i])
            with np.errstate(all="ignore"):
                absolute = abs(float(ours[i]) - expected[i])
            names = (dims or {}).get(ours.ndim)
            index = ", ".join(f"{names[d]}={int(k)}" if names else str(int(k))
                              for d, k in enumerate(i))
            worst = (f"in {name}[{index}]: got {ours[i]!s}, "
                     f"reference {expected[i]!s} (|error| {absolute:.3g}, "
                     f"allowed {bound[i]:.3g})")
    return CheckResult(largest, 1.0, "bound", inputs, worst)


def _batch_norm_check(layout: str, direction: str, dtype, device: str = "cpu") -> CheckResult:
    """The kernel, on _batch_norm_check_inputs laid out as `layout`, against
    the float64 reference on the same values in NCHW (where numpy's sums are
    pairwise, hence accurate enough to judge float64 kernels by).
    Bounds, t being BATCH_NORM_TOLERANCE: y within t; save_mean within
    t * max(|mean|, std); save_invstd within t relative; the running
    statistics within RUNNING_STATISTICS_TOLERANCE of the sum of their
    terms' magnitudes. The backward takes the reference's statistics rounded
    to x's dtype (as the forward returns them), grad_input within t times
    its channel's gain gamma * invstd (grad_output is of order one),
    grad_gamma and grad_beta within t of the sum of |grad_output * xhat| and
    |grad_output| they add up. Errors are reported at (n, c, h, w) indices
    whatever the layout. On the GPU the kernel runs on CuPy copies of the
    same inputs."""
    dtype = np.dtype(dtype)
    put, get = on_device(device)
    axis, order = BATCH_NORM_LAYOUTS[layout]
    to_nchw = tuple(order.index(d) for d in range(len(order)))
    x, grad, p = _batch_norm_check_inputs(dtype)
    x_laid, grad_laid = (np.ascontiguousarray(a.transpose(order)) for a in (x, grad))
    reduced, per_channel_shape = (0, 2, 3), (1, -1, 1, 1)
    tolerance = BATCH_NORM_TOLERANCE[dtype.name]
    settings = {"momentum": BATCH_NORM_MOMENTUM, "eps": BATCH_NORM_EPS}
    running_mean = p["running_mean"].astype(np.float64)
    running_var = p["running_var"].astype(np.float64)
    expected = reference.batch_norm(x, p["gamma"], p["beta"], running_mean, running_var,
                                    **settings)
    mean, invstd = expected.save_mean, expected.save_invstd
    if direction == "forward":
        ours_running_mean, ours_running_var = put(p["running_mean"].copy()), put(
            p["running_var"].copy())
        ours = [get(a) for a in batch_norm(put(x_laid), put(p["gamma"]), put(p["beta"]),
                                           ours_running_mean, ours_running_var, axis=axis,
                                           **settings)]
        ours_running_mean, ours_running_var = get(ours_running_mean), get(ours_running_var)
        running = RUNNING_STATISTICS_TOLERANCE[dtype.name]
        momentum = BATCH_NORM_MOMENTUM
        outputs = {
            "y": (ours[0].transpose(to_nchw), expected.y, tolerance),
            "save_mean": (ours[1], mean, tolerance * np.maximum(np.abs(mean), 1 / invstd)),
            "save_invstd": (ours[2], invstd, tolerance * invstd),
            "running_mean": (ours_running_mean, running_mean, running * (
                (1 - momentum) * np.abs(p["running_mean"].astype(np.float64))
                + momentum * np.abs(mean))),
            "running_var": (ours_running_var, running_var, running * running_var),
        }
    else:
        save_mean, save_invstd = mean.astype(dtype), invstd.astype(dtype)
        ours = [get(a) for a in batch_norm_backward(put(grad_laid), put(x_laid), put(p["gamma"]),
                                                    put(save_mean), put(save_invstd), axis=axis)]
        want = reference.batch_norm_backward(grad, x, p["gamma"], save_mean, save_invstd)
        grad64 = grad.astype(np.float64)
        xhat = ((x.astype(np.float64) - save_mean.astype(np.float64).reshape(per_channel_shape))
                * save_invstd.astype(np.float64).reshape(per_channel_shape))
        gain = np.abs(p["gamma"].astype(np.float64) * save_invstd.astype(np.float64))
        with np.errstate(invalid="ignore"):
            outputs = {
                "grad_input": (ours[0].transpose(to_nchw), want[0],
                               tolerance * gain.reshape(per_channel_shape)),
                "grad_gamma": (ours[1], want[1],
                               tolerance * np.abs(grad64 * xhat).sum(axis=reduced)),
                "grad_beta": (ours[2], want[2], tolerance * np.abs(grad64).sum(axis=reduced)),
            }
    return compare_bounded(outputs, x.size, {4: "nchw", 1: "c"})


class BatchNormArrays:
    """The arrays the batch-norm cases share, made once per run: x and
    grad_output (standard normal) and out, one buffer each that either
    layout views in its own shape; gamma, beta; running statistics for each
    caller, which every training forward updates in place. All on the
    plan's device (numpy or CuPy) but the reference's, which stay on the
    host; to_host copies device arrays back for the reference."""

    def __init__(self, nchw: tuple, dtype: np.dtype, device: str = "cpu"):
        rng = np.random.default_rng(0)
        put, self.to_host = on_device(device)
        size, channels = math.prod(nchw), nchw[1]
        self.x = put(rng.standard_normal(size, dtype=dtype))
        self.grad = put(rng.standard_normal(size, dtype=dtype))
        self.out = put(np.empty(size, dtype=dtype))
        self.gamma = put(rng.uniform(0.5, 1.5, channels).astype(dtype))
        self.beta = put(rng.uniform(-1.0, 1.0, channels).astype(dtype))
        self.running = {caller: (np.zeros(channels, dtype), np.ones(channels, dtype))
                        for caller in ("ours", "reference", "torch")}
        for caller in ("ours", "torch"):
            self.running[caller] = tuple(put(a) for a in self.running[caller])


def _batch_norm_runners(layout: str, direction: str, plan: Plan, nchw: tuple,
                        arrays: BatchNormArrays) -> Runners:
    axis, order = BATCH_NORM_LAYOUTS[layout]
    shape = _in_layout(nchw, layout)
    x, grad, out = (a.reshape(shape) for a in (arrays.x, arrays.grad, arrays.out))
    gamma, beta = arrays.gamma, arrays.beta
    samples = _reference_samples(plan, nchw)
    x_few, grad_few = arrays.to_host(x[:samples]), arrays.to_host(grad[:samples])
    gamma_host, beta_host = arrays.to_host(gamma), arrays.to_host(beta)
    settings = {"momentum": BATCH_NORM_MOMENTUM, "eps": BATCH_NORM_EPS, "axis": axis}
    if direction == "forward":
        running_mean, running_var = arrays.running["ours"]
        reference_running = arrays.running["reference"]
        runners = Runners(
            ours=lambda: batch_norm(x, gamma, beta, running_mean, running_var, out=out,
                                    **settings),
            reference=lambda: reference.batch_norm(x_few, gamma_host, beta_host,
                                                   *reference_running, **settings),
            reference_elements=x_few.size)
    else:
        saved = batch_norm(x, gamma, beta, **settings)
        saved_host = [arrays.to_host(a) for a in saved[1:]]
        runners = Runners(
            ours=lambda: batch_norm_backward(grad, x, gamma, saved.save_mean, saved.save_invstd,
                                             axis=axis, out=out),
            reference=lambda: reference.batch_norm_backward(
                grad_few, x_few, gamma_host, *saved_host, axis=axis),
            reference_elements=x_few.size)
    if plan.torch is not None:
        torch = plan.torch
        aten = torch.ops.aten
        # torch takes NCHW-shaped tensors; other layouts are permuted views
        # of the same buffers (NHWC: channels_last), so that torch reads the
        # same memory in the same order as ours. On the GPU they share
        # CuPy's memory through DLPack.
        view = torch.from_numpy if plan.device == "cpu" else torch.from_dlpack
        to_nchw = tuple(order.index(d) for d in range(len(order)))
        tx, tgrad, tout = (view(a).permute(to_nchw) for a in (x, grad, out))
        tgamma, tbeta = view(gamma), view(beta)
        trunning_mean, trunning_var = (view(a) for a in arrays.running["torch"])
        momentum, eps = BATCH_NORM_MOMENTUM, BATCH_NORM_EPS
        if direction == "forward":
            tmean, tinvstd = (torch.empty_like(tgamma) for _ in range(2))
            runners.torch = lambda: aten.native_batch_norm.out(
                tx, tgamma, tbeta, trunning_mean, trunning_var, True, momentum, eps,
                out=tout, save_mean=tmean, save_invstd=tinvstd)
            runners.torch_op = "native_batch_norm.out"
        else:
            _, tmean, tinvstd = aten.native_batch_norm(tx, tgamma, tbeta, None, None, True,
                                                       momentum, eps)
            runners.torch = lambda: aten.native_batch_norm_backward(
                tgrad, tx, tgamma, trunning_mean, trunning_var, tmean, tinvstd, True, eps,
                [True, True, True])
            runners.torch_op = "native_batch_norm_backward"
            runners.torch_allocates = ("its .out overload fills a new tensor and copies it, "
                                       "which is slower")
    return runners


def batch_norm_cases(plan: Plan) -> list[Case]:
    """Training forward and backward of batch_norm in each layout of
    BATCH_NORM_LAYOUTS, on batch_norm_shape(plan)."""
    nchw = batch_norm_shape(plan)
    arrays = functools.cache(lambda: BatchNormArrays(nchw, plan.dtype, plan.device))
    item = plan.dtype.itemsize
    # The forward reads x for the statistics, then x again to write y; the
    # backward reads x and grad_output for its sums, then both again to
    # write grad_input.
    arrays_moved = {"forward": (2, 1), "backward": (4, 1)}  # (read, written)
    cases = []
    for layout, kernel in zip(BATCH_NORM_LAYOUTS, BATCH_NORM_KERNELS):
        for direction, (reads, writes) in arrays_moved.items():
            cases.append(Case(
                family="batchnorm", name=kernel, direction=direction,
                shape=_in_layout(nchw, layout),
                bytes_per_element=(reads + writes) * item, traffic=f"{reads}r+{writes}w",
                check=functools.partial(_batch_norm_check, layout, direction, plan.dtype,
                                        plan.device),
                prepare=lambda l=layout, d=direction: _batch_norm_runners(l, d, plan, nchw,
                                                                          arrays())))
    return cases


def describe_batch_norm(plan: Plan, checks: dict) -> FamilyText:
    nchw = batch_norm_shape(plan)
    kernel_layouts = dict(zip(BATCH_NORM_KERNELS, BATCH_NORM_LAYOUTS))
    timed = dict.fromkeys(kernel_layouts[case.name] for case in checks)
    layouts = " and ".join(f"{_shape_text(_in_layout(nchw, layout))} ({layout}, "
                           f"axis={BATCH_NORM_LAYOUTS[layout][0]})" for layout in timed)
    largest = max(c.error for c in checks.values())
    tolerance = BATCH_NORM_TOLERANCE[plan.dtype.name]
    running = RUNNING_STATISTICS_TOLERANCE[plan.dtype.name]
    samples = _reference_samples(plan, nchw)
    if samples < nchw[0]:
        reference_text = (f"timed on the first {samples} of {nchw[0]} samples "
                          f"({samples * math.prod(nchw[1:])} elements) and scaled linearly")
    else:
        reference_text = "timed on the whole batch"
    return FamilyText(
        arrays=f"batch_norm x {layouts}, {math.prod(nchw)} {plan.dtype.name} elements",
        check=(f"within per-value bounds (largest error {largest:.2g} of its bound) on x of "
               f"{_shape_text(BATCH_NORM_CHECK_SHAPE)} (NCHW) in each kernel's layout, with a "
               "channel at mean/std = 1e4, a constant one and one holding a NaN"),
        check_notes=[f"bounds: y {tolerance:g}; grad_input {tolerance:g} * gamma * invstd; "
                     f"save_mean {tolerance:g} * max(|mean|, std); save_invstd {tolerance:g} "
                     f"relative; grad_gamma, grad_beta {tolerance:g} * the sum of their terms' "
                     f"magnitudes; running statistics {running:g} * the same"],
        reference=reference_text,
        torch="torch.ops.aten.native_batch_norm.out writing preallocated outputs, "
              "native_batch_norm_backward allocating grad_input (fn.batch_norm_backward "
              "writes a preallocated out=); NHWC as channels_last views of the same memory")


# ---- dropout and the fused epilogue ----------------------------------------------

DROPOUT_P = 0.1
DROPOUT_SEED = 20240601
DROPOUT_OFFSET = 2**33 + 7
DROPOUT_SCALE_ULP = 1.5


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


def _activation_kernel(name: str) -> ActivationKernel:
    return next(k for k in ACTIVATION_KERNELS if k.name == name)


def _dropout_check(kernel: DropoutKernel, direction: str, dtype,
                   device: str = "cpu") -> CheckResult:
    """The output against the reference (whose masks follow the contract
    bit for bit); a forward mask that differs in any bit fails outright."""
    x, grad = check_inputs(dtype)
    stream = dict(seed=DROPOUT_SEED, offset=DROPOUT_OFFSET)
    put, get = on_device(device)
    if kernel.activation is None:
        # Kept elements are x times 1 / keep rounded to the dtype: two
        # roundings, at most 1.5 ulp of x / keep.
        tolerance = DROPOUT_SCALE_ULP
        if direction == "forward":
            ours, mask = (get(a) for a in dropout(put(x), DROPOUT_P, return_mask=True,
                                                  **stream))
            expected = reference.dropout(x, DROPOUT_P, **stream)
        else:
            ours = get(dropout_backward(put(grad), DROPOUT_P, **stream))
            expected = reference.dropout_backward(grad, DROPOUT_P, **stream)
            mask = None
        inputs = {"x": x} if direction == "forward" else {"grad_output": grad}
        result = compare(ours, expected, tolerance, inputs)
    else:
        act = _activation_kernel(kernel.name.split("_")[1])
        tolerance = DROPOUT_SCALE_ULP + (0.0 if act.exact else TOLERANCE_ULP[np.dtype(dtype).name])
        h = x.reshape(-1, 1)
        bias = np.zeros(1, dtype=dtype)  # h + 0 is exact: the error is the kernel's own
        if direction == "forward":
            ours, mask = (get(a) for a in bias_act_dropout(
                put(h), put(bias), kernel.activation, DROPOUT_P, return_mask=True, **stream,
                **kernel.params))
            expected = reference.bias_act_dropout(h, bias, kernel.activation, DROPOUT_P,
                                                  **stream, **kernel.params)
            result = compare(ours.reshape(-1), expected.reshape(-1), tolerance, {"h": x})
        else:
            g = grad.reshape(-1, 1)
            ours = get(bias_act_dropout_backward(
                put(g), put(h), put(bias), kernel.activation, DROPOUT_P, **stream,
                **kernel.params)[0])
            expected, _ = reference.bias_act_dropout_backward(
                g, h, bias, kernel.activation, DROPOUT_P, **stream, **kernel.params)
            mask = None
            terms = None
            if act.derivative_terms is not None:
                with np.errstate(all="ignore"):
                    terms = act.derivative_terms(x.astype(np.float64))
            scaled = grad.astype(np.float64) / (1.0 - DROPOUT_P)
            result = compare(ours.reshape(-1), expected.reshape(-1), tolerance,
                             {"h": x, "grad_output": grad}, grad=scaled, terms=terms)
    if mask is not None and not np.array_equal(
            mask, reference.dropout_mask(x.shape, DROPOUT_P, **stream)):
        result.error, result.worst = math.inf, "the mask differs from the Philox contract"
    return result


class DropoutArrays:
    """Inputs shared by the dropout cases, on the plan's device (numpy or
    CuPy): x and grad_output as flat arrays, and the same memory viewed as
    (rows, 4096) with a bias of 4096 for the fused epilogue, plus zero-copy
    torch views; to_host copies a prefix back for the numpy reference."""

    COLUMNS = 4096

    @classmethod
    def shape_for(cls, size: int) -> tuple:
        columns = cls.COLUMNS if size % cls.COLUMNS == 0 else 1
        return (size // columns, columns)

    def __init__(self, size: int, dtype: np.dtype, torch, device: str = "cpu"):
        rng = np.random.default_rng(0)
        put, self.to_host = on_device(device)
        self.x = put(rng.standard_normal(size, dtype=dtype))
        self.grad = put(rng.standard_normal(size, dtype=dtype))
        self.out = put(np.empty(size, dtype=dtype))
        self.shape = self.shape_for(size)
        self.bias = put(rng.standard_normal(self.shape[1], dtype=dtype))
        if torch is not None:
            view = torch.from_numpy if device == "cpu" else torch.from_dlpack
            self.tensors = {name: view(getattr(self, name)) for name in ("x", "grad", "bias")}
            _, self.torch_mask = torch.ops.aten.native_dropout(self.tensors["x"], DROPOUT_P, True)


def _dropout_runners(kernel: DropoutKernel, direction: str, plan: Plan,
                     arrays: DropoutArrays) -> Runners:
    m = min(plan.size, plan.reference_elements)
    stream = dict(seed=DROPOUT_SEED, offset=DROPOUT_OFFSET)
    x, grad, out = arrays.x, arrays.grad, arrays.out
    x_host, grad_host = arrays.to_host(x[:m]), arrays.to_host(grad[:m])
    scale = 1.0 / (1.0 - DROPOUT_P)
    if kernel.activation is None:
        if direction == "forward":
            runners = Runners(
                ours=lambda: dropout(x, DROPOUT_P, return_mask=True, out=out,
                                                    **stream),
                reference=lambda: reference.dropout(x_host, DROPOUT_P, **stream),
                reference_elements=m)
            torch_op = "native_dropout"
            torch_call = lambda t: t.ops.aten.native_dropout(arrays.tensors["x"], DROPOUT_P, True)
        else:
            runners = Runners(
                ours=lambda: dropout_backward(grad, DROPOUT_P, out=out, **stream),
                reference=lambda: reference.dropout_backward(grad_host, DROPOUT_P, **stream),
                reference_elements=m)
            torch_op = "native_dropout_backward (stored mask)"
            torch_call = lambda t: t.ops.aten.native_dropout_backward(
                arrays.tensors["grad"], arrays.torch_mask, scale)
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
            torch_op = f"add + {name} + native_dropout"

            def torch_call(t):
                z = t.add(arrays.tensors["x"].view(arrays.shape), arrays.tensors["bias"])
                return t.ops.aten.native_dropout(getattr(t.nn.functional, name)(z), DROPOUT_P,
                                                 True)
        else:
            runners = Runners(
                ours=lambda: bias_act_dropout_backward(
                    g, h, arrays.bias, name, DROPOUT_P, out=o, **stream, **params),
                reference=lambda: reference.bias_act_dropout_backward(
                    g_host, h_host, bias_host, name, DROPOUT_P, **stream, **params),
                reference_elements=rows * arrays.shape[1])
            torch_op = f"native_dropout_backward + {name}_backward + sum"

            def torch_call(t):
                aten = t.ops.aten
                hh = arrays.tensors["x"].view(arrays.shape)
                z = t.add(hh, arrays.tensors["bias"])
                dz = aten.native_dropout_backward(arrays.tensors["grad"].view(arrays.shape),
                                                  arrays.torch_mask.view(arrays.shape), scale)
                dz = (aten.gelu_backward(dz, z) if name == "gelu"
                      else aten.threshold_backward(dz, z, 0))
                return dz, dz.sum(0)
    if plan.torch is not None:
        runners.torch = functools.partial(torch_call, plan.torch)
        runners.torch_op = torch_op
        runners.torch_allocates = "no out= overload"
    return runners


def dropout_cases(plan: Plan) -> list[Case]:
    """Dropout (forward returning the packed mask, backward regenerating it
    from (seed, offset)) and the fused bias + activation + dropout."""
    arrays = functools.cache(
        lambda: DropoutArrays(plan.size, plan.dtype, plan.torch, plan.device))
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
            cases.append(Case(
                family="dropout", name=kernel.name, direction=direction, shape=shape,
                bytes_per_element=moved, traffic=label,
                check=functools.partial(_dropout_check, kernel, direction, plan.dtype,
                                        plan.device),
                prepare=lambda k=kernel, d=direction: _dropout_runners(k, d, plan, arrays())))
    return cases


def describe_dropout(plan: Plan, checks: dict) -> FamilyText:
    inputs = next(iter(checks.values())).inputs
    m = min(plan.size, plan.reference_elements)
    reference_text = (f"timed on the first {m} elements and scaled linearly to {plan.size}"
                      if m < plan.size else f"timed on all {plan.size} elements")
    rows, columns = DropoutArrays.shape_for(plan.size)
    return FamilyText(
        arrays=(f"{_size_text(plan.size)} {plan.dtype.name} elements; the fused kernels on "
                f"({rows}, {columns}) with a bias of {columns}; p = {DROPOUT_P}"),
        check=(f"masks bit-exact to the Philox contract; outputs within "
               f"{DROPOUT_SCALE_ULP:g} ulp (+ the activation's "
               f"{TOLERANCE_ULP[plan.dtype.name]:g}) on {inputs} inputs incl. +-0, "
               "subnormals, +-inf, NaN"),
        reference=reference_text,
        torch=("torch.ops.aten native_dropout / native_dropout_backward (from its stored "
               "mask), and add + activation + native_dropout for the fused rows"))


# ---- registry and selection ---------------------------------------------------

@dataclass
class Family:
    name: str
    kernels: tuple            # kernel names, for --kernels
    directions: tuple
    builders: dict            # device -> function(plan) -> list[Case]
    describe: Callable        # (plan, {case: CheckResult}) -> FamilyText

    @property
    def variants(self) -> tuple:
        """The names before "[" of kernels that come in variants
        ("batch_norm" of "batch_norm[NCHW]"), each selecting them all."""
        return tuple(dict.fromkeys(k.partition("[")[0] for k in self.kernels if "[" in k))

    def select(self, name: str) -> tuple:
        """The kernels `name` picks: all of them for "all" or the family's
        name, else the kernel of that name or every variant of it."""
        if name in ("all", self.name):
            return self.kernels
        return tuple(k for k in self.kernels if name in (k, k.partition("[")[0]))


FAMILIES = {
    "activations": Family("activations", tuple(k.name for k in ACTIVATION_KERNELS),
                          ("forward", "backward"),
                          {"cpu": activation_cases, "cuda": activation_cases},
                          describe_activations),
    "batchnorm": Family("batchnorm", BATCH_NORM_KERNELS, ("forward", "backward"),
                        {"cpu": batch_norm_cases, "cuda": batch_norm_cases},
                        describe_batch_norm),
    "dropout": Family("dropout", tuple(k.name for k in DROPOUT_KERNELS), ("forward", "backward"),
                      {"cpu": dropout_cases, "cuda": dropout_cases}, describe_dropout),
}


def parse_selection(spec: str) -> dict:
    """--kernels: comma-separated family or kernel names (or the name of a
    kernel's variants, e.g. batch_norm), each optionally ':forward' or
    ':backward'. Returns {family: {(kernel, direction)}}."""
    known = ", ".join(list(FAMILIES) + [k for f in FAMILIES.values()
                                        for k in f.kernels + f.variants])
    selected: dict = {}
    for token in (t.strip() for t in spec.split(",")):
        if not token:
            continue
        name, _, direction = token.partition(":")
        matched = False
        for family in FAMILIES.values():
            kernels = family.select(name)
            if not kernels:
                continue
            if direction and direction not in family.directions:
                raise UsageError(f"--kernels: unknown direction {direction!r} in {token!r}; "
                                 f"use {' or '.join(family.directions)}")
            directions = (direction,) if direction else family.directions
            selected.setdefault(family.name, set()).update(
                (k, d) for k in kernels for d in directions)
            matched = True
        if not matched:
            raise UsageError(f"--kernels: unknown kernel or family {name!r}; known: all, {known}")
    if not selected:
        raise UsageError("--kernels: no kernel named")
    return selected


def check_device(device: str, selection: dict) -> None:
    """Raises BenchError unless every selected family has kernels on device."""
    if device == "cuda" and not info()["cuda_built"]:
        raise BenchError("--device cuda: this fusednn was built without CUDA; reinstall with "
                         "nvcc on PATH (FUSEDNN_CUDA=ON pip install . -Ccmake.fresh=true)")
    if device == "cuda":
        cupy, note = _import_cupy()
        if cupy is None:
            raise BenchError(f"--device cuda: needs CuPy, which is {note} (pip install "
                             "cupy-cuda12x, or fusednn[cuda])")
    missing = [f for f in selection if device not in FAMILIES[f].builders]
    if missing:
        raise BenchError(f"--device {device}: no {device.upper()} kernels yet for "
                         f"{', '.join(missing)}; run with --device cpu")


def build_cases(plan: Plan, selection: dict) -> list[Case]:
    cases = []
    for family, wanted in selection.items():
        cases += [c for c in FAMILIES[family].builders[plan.device](plan)
                  if (c.name, c.direction) in wanted]
    return cases


# ---- timing -------------------------------------------------------------------

def wall_seconds(call) -> float:
    """Seconds call() takes by the host's clock (CPU kernels, the reference)."""
    start = time.perf_counter()
    call()
    return time.perf_counter() - start


# A one-thread kernel that keeps the GPU busy for a fixed number of clock
# cycles (about a millisecond): queued ahead of the start event, it lets the
# host finish enqueueing the timed call before the GPU reaches that event.
_CUDA_LEAD_SOURCE = r"""
extern "C" __global__ void fusednn_bench_lead(long long cycles) {
  const long long start = clock64();
  while (clock64() - start < cycles) {
  }
}
"""
CUDA_LEAD_CYCLES = 2_000_000


class CudaEventClock:
    """Seconds of GPU work call() enqueues on CuPy's current stream, from two
    CUDA events around it. A busy-wait kernel queued before the start event
    holds the GPU while the host enqueues the call, so host-side overhead
    (argument checks, launches, allocations; up to about a millisecond) is
    not counted: the events bracket the device work alone, for fusednn and
    its peers alike."""

    def __init__(self):
        import cupy
        self.cupy = cupy
        self.start, self.end = cupy.cuda.Event(), cupy.cuda.Event()
        self.lead = cupy.RawKernel(_CUDA_LEAD_SOURCE, "fusednn_bench_lead")

    def __call__(self, call) -> float:
        self.lead((1,), (1,), (np.int64(CUDA_LEAD_CYCLES),))
        self.start.record()
        call()
        self.end.record()
        self.end.synchronize()
        return self.cupy.cuda.get_elapsed_time(self.start, self.end) / 1e3


def interleaved_seconds(calls: dict, repeat: int, warmup: int = WARMUP,
                        clocks: dict | None = None) -> dict:
    """Times of each call, `repeat` samples each, by the clock `clocks`
    gives for its label (wall_seconds by default). Rounds interleave the
    calls (one of each per round) so that a change in machine load hits all
    of them."""
    clocks = clocks or {}
    for call in calls.values():
        for _ in range(warmup):
            call()
    samples = {label: [] for label in calls}
    for _ in range(repeat):
        for label, call in calls.items():
            samples[label].append(clocks.get(label, wall_seconds)(call))
    return samples


class CpuCopyRoof:
    """A plain copy moving the same bytes as a case, half read and half
    written: fusednn._cpu.copy (threaded, streaming stores) and np.copyto
    (one thread), on buffers sized for the largest case."""

    clock = staticmethod(wall_seconds)
    description = "the faster of fusednn._cpu.copy (threaded, streaming) and np.copyto"

    def __init__(self, plan: Plan, cases: list):
        self.itemsize = plan.dtype.itemsize
        largest = max(self.copied(c.elements, c.bytes_per_element) for c in cases)
        # Written, so that reading it does not hit the shared zero page.
        self.source = np.ones(largest, dtype=plan.dtype)
        self.target = np.empty(largest, dtype=plan.dtype)

    def copied(self, elements: int, bytes_per_element: float) -> int:
        """How many elements the copy of that traffic copies."""
        return round(elements * bytes_per_element / (2 * self.itemsize))

    def calls(self, elements: int, bytes_per_element: float) -> tuple[int, dict]:
        """(bytes the copy moves, {routine: call})."""
        n = self.copied(elements, bytes_per_element)
        src, dst = self.source[:n], self.target[:n]
        return 2 * n * self.itemsize, {"fusednn._cpu.copy": lambda: _cpu.copy(src, dst),
                                       "np.copyto": lambda: np.copyto(dst, src)}


class CudaCopyRoof(CpuCopyRoof):
    """The GPU's copy of the same bytes, device to device on CuPy's current
    stream: cudaMemcpyAsync (the driver's copy path) and cupy.copyto (an
    elementwise kernel), timed by CUDA events like the kernels and peers."""

    description = "the faster of a device-to-device cudaMemcpyAsync and cupy.copyto"

    def __init__(self, plan: Plan, cases: list):
        import cupy
        self.cupy = cupy
        self.clock = CudaEventClock()
        self.itemsize = plan.dtype.itemsize
        largest = max(self.copied(c.elements, c.bytes_per_element) for c in cases)
        self.source = cupy.ones(largest, dtype=plan.dtype)
        self.target = cupy.empty(largest, dtype=plan.dtype)

    def calls(self, elements: int, bytes_per_element: float) -> tuple[int, dict]:
        n = self.copied(elements, bytes_per_element)
        src, dst = self.source[:n], self.target[:n]
        nbytes = n * self.itemsize
        return 2 * nbytes, {
            "cudaMemcpyAsync": lambda: dst.data.copy_from_device_async(src.data, nbytes),
            "cupy.copyto": lambda: self.cupy.copyto(dst, src)}


COPY_ROOFS = {"cpu": CpuCopyRoof, "cuda": CudaCopyRoof}


@dataclass
class Timing:
    case: Case
    runners: Runners
    samples: dict             # "ours", "reference", "torch", copy routines -> seconds
    copy_bytes: int
    copies: tuple             # the copy routines' labels in samples


def time_case(case: Case, plan: Plan, roof) -> Timing:
    """Times the case with its peers and the copy of the same bytes, all in
    the same rounds."""
    runners = case.prepare()
    copy_bytes, copies = roof.calls(case.elements, case.bytes_per_element)
    calls = {"ours": runners.ours, **copies, "reference": runners.reference}
    if runners.torch is not None:
        calls["torch"] = runners.torch
    # Everything but the host-side reference runs on the roof's device.
    clocks = {label: roof.clock for label in calls if label != "reference"}
    return Timing(case, runners, interleaved_seconds(calls, plan.repeat, clocks=clocks),
                  copy_bytes, tuple(copies))


@dataclass
class Roof:
    """The copy roof for one traffic (bytes/elem over a number of elements):
    each routine's median over every copy timed alongside the cases with
    that traffic in this run."""
    bytes_per_element: float
    elements: int
    samples: int
    gb_per_s: dict            # copy routine -> GB/s

    @property
    def source(self) -> str:
        return max(self.gb_per_s, key=self.gb_per_s.get)

    @property
    def best(self) -> float:
        return self.gb_per_s[self.source]


def traffic_key(case: Case) -> tuple:
    """Cases with the same key share a roof."""
    return case.bytes_per_element, case.elements


def pool_roofs(timings: list) -> dict:
    roofs = {}
    for key in sorted({traffic_key(t.case) for t in timings}):
        group = [t for t in timings if traffic_key(t.case) == key]
        rates = {name: [t.copy_bytes / s / 1e9 for t in group for s in t.samples[name]]
                 for name in group[0].copies}
        roofs[key] = Roof(*key, sum(len(v) for v in rates.values()),
                          {name: statistics.median(v) for name, v in rates.items()})
    return roofs


def row_roof(timing: Timing) -> tuple[str, float]:
    """(routine, GB/s): the faster copy routine's median over the copies
    timed in this case's own rounds. A row's % roof uses it rather than the
    run's pooled roof, so that a change of machine load between rows, which
    on a shared machine can move a pooled ratio by tens of points, cancels."""
    rates = {name: statistics.median(timing.copy_bytes / s / 1e9 for s in timing.samples[name])
             for name in timing.copies}
    source = max(rates, key=rates.get)
    return source, rates[source]


def summarize(timing: Timing, check: CheckResult) -> Result:
    case, runners = timing.case, timing.runners
    seconds = {label: statistics.median(s) for label, s in timing.samples.items()}
    moved = round(case.elements * case.bytes_per_element)
    gb_per_s = moved / seconds["ours"] / 1e9
    roof_source, roof_gb_per_s = row_roof(timing)
    reference_s = seconds["reference"] * case.elements / runners.reference_elements
    result = Result(
        family=case.family, kernel=case.name, direction=case.direction,
        shape=list(case.shape), elements=case.elements, traffic=case.traffic,
        bytes_per_element=case.bytes_per_element, bytes_moved=moved,
        time_ms=seconds["ours"] * 1e3, gb_per_s=gb_per_s, roof_gb_per_s=roof_gb_per_s,
        roof_source=roof_source, percent_of_roof=100.0 * gb_per_s / roof_gb_per_s,
        check_error=check.error, check_unit=check.unit, reference_ms=reference_s * 1e3,
        reference_elements=runners.reference_elements,
        x_numpy_reference=reference_s / seconds["ours"])
    if "torch" in seconds:
        result.torch_op = runners.torch_op
        result.torch_allocates = runners.torch_allocates is not None
        result.torch_allocates_why = runners.torch_allocates
        result.torch_ms = seconds["torch"] * 1e3
        result.x_torch = seconds["torch"] / seconds["ours"]
    return result


# ---- output -------------------------------------------------------------------

def progress(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def header(plan: Plan) -> dict:
    build = info()
    return {
        "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "machine": f"{cpu_model()}, {os.cpu_count()} logical CPUs, {platform.system()} "
                   f"{platform.release()}"
                   + (f"; {gpu_model()}" if plan.device == "cuda" else ""),
        "device": plan.device,
        "threads": plan.threads,
        "simd": build["simd"],
        "fusednn_version": build["version"],
        "numpy_version": np.__version__,
        "torch_version": plan.torch.__version__ if plan.torch is not None else None,
        "dtype": plan.dtype.name,
        "size": plan.size,
        "repeat": plan.repeat,
        "warmup": WARMUP,
        "reference_elements": min(plan.size, plan.reference_elements),
    }


def _size_text(n: int) -> str:
    exponent = n.bit_length() - 1
    return f"{n} (2^{exponent})" if n == 1 << exponent else str(n)


def family_texts(plan: Plan, checks: dict) -> dict:
    """{family name: FamilyText}, in the order the cases come."""
    by_family: dict = {}
    for case, result in checks.items():
        by_family.setdefault(case.family, {})[case] = result
    return {name: FAMILIES[name].describe(plan, family_checks)
            for name, family_checks in by_family.items()}


def _per_family(texts: dict, piece: str) -> str:
    """One piece of every family's text: as it is for one family, else each
    after its family's name."""
    if len(texts) == 1:
        return getattr(next(iter(texts.values())), piece)
    return "; ".join(f"{name}: {getattr(text, piece)}" for name, text in texts.items())


def report_text(plan: Plan, head: dict, checks: dict, roofs: dict, results: list) -> str:
    texts = family_texts(plan, checks)
    lines = [
        f"fusednn bench  {head['date']}",
        f"machine: {head['machine']}",
        f"fusednn {head['fusednn_version']}, simd {head['simd']}, device {plan.device}, "
        f"threads {plan.threads}; numpy {head['numpy_version']}; torch {plan.torch_note}",
        f"{_per_family(texts, 'arrays')}; median of {plan.repeat} "
        f"repeat{'s' if plan.repeat > 1 else ''} after {WARMUP} warm-up, peers interleaved",
    ]
    if len(texts) == 1:
        text = next(iter(texts.values()))
        lines.append(f"check: all {len(checks)} agree with fusednn.reference {text.check}")
        lines += [f"  {note}" for note in text.check_notes]
    else:
        lines.append(f"check: all {len(checks)} agree with fusednn.reference:")
        for name, text in texts.items():
            lines.append(f"  {name}: {text.check}")
            lines += [f"    {note}" for note in text.check_notes]
    lines.append("bytes/elem: memory traffic per element, e.g. 2r+1w = 2 arrays read and 1 "
                 "written; GB/s = 1e9 bytes/s")
    lines.append("roof: a plain copy of the same bytes, timed in the same rounds as each "
                 f"kernel, by {COPY_ROOFS[plan.device].description}"
                 + (" (CUDA events)" if plan.device == "cuda" else "")
                 + "; a row's % roof is against the faster routine's median over that row's "
                 "own rounds, so that load changing between rows cancels; medians over the "
                 "whole run:")
    for roof in roofs.values():
        both = ", ".join(f"{name} {rate:.1f}" for name, rate in roof.gb_per_s.items())
        lines.append(f"  {roof.bytes_per_element:g} bytes/elem x {roof.elements} elements: "
                     f"{roof.best:.1f} GB/s by {roof.source} ({both} GB/s; "
                     f"{roof.samples} copies)")
    lines.append(f"x numpy-ref: fusednn.reference (float64) {_per_family(texts, 'reference')}")
    if plan.torch is None:
        lines.append(f"x torch: skipped ({plan.torch_note})")
    else:
        where = ("on the GPU, same stream" if plan.device == "cuda"
                 else f"torch threads {plan.threads}")
        lines.append(f"x torch: {_per_family(texts, 'torch')}; {where}")
    lines.append("")
    columns = ("kernel", "direction", "bytes/elem", "time (ms)", "GB/s", "% roof",
               "x numpy-ref", "x torch")
    rows = []
    allocating = {r.torch_op: r.torch_allocates_why for r in results if r.torch_allocates}
    for r in results:
        torch_cell = "-"
        if r.x_torch is not None:
            torch_cell = f"{r.x_torch:.2f}"
        if allocating:  # a marker column, so that the numbers stay aligned
            torch_cell += "*" if r.torch_allocates else " "
        rows.append((r.kernel, r.direction,
                     f"{r.bytes_per_element:g} ({r.traffic})",
                     f"{r.time_ms:.3f}", f"{r.gb_per_s:.1f}", f"{r.percent_of_roof:.0f}%",
                     f"{r.x_numpy_reference:.1f}", torch_cell))
    widths = [max(len(c), *(len(row[i]) for row in rows)) for i, c in enumerate(columns)]
    left = 2  # kernel and direction are left-aligned, numbers right-aligned
    for row in (columns, *rows):
        lines.append("  ".join(cell.ljust(w) if i < left else cell.rjust(w)
                               for i, (cell, w) in enumerate(zip(row, widths))).rstrip())
    if allocating:
        lines.append("* torch allocates its result: "
                     + "; ".join(f"{op} ({why})" for op, why in sorted(allocating.items())))
    return "\n".join(lines)


def write_json(path: str, head: dict, checks: dict, roofs: dict, results: list) -> None:
    document = {
        "header": head,
        "roofs": [{"bytes_per_element": r.bytes_per_element, "elements": r.elements,
                   "copies": r.samples, "gb_per_s": r.gb_per_s, "source": r.source}
                  for r in roofs.values()],
        "checks": [{"family": c.family, "kernel": c.name, "direction": c.direction,
                    "error": result.error, "tolerance": result.tolerance, "unit": result.unit,
                    "inputs": result.inputs, "passed": result.passed}
                   for c, result in checks.items()],
        "results": [dataclasses.asdict(r) for r in results],
    }
    with open(path, "w", encoding="utf-8") as f:
        json.dump(document, f, indent=2)
        f.write("\n")


def _require_matplotlib():
    try:
        from matplotlib.figure import Figure
    except ImportError:
        raise BenchError("--plot needs matplotlib, which is not installed "
                         "(pip install matplotlib, or pip install fusednn[bench])") from None
    return Figure


def write_plot(path: str, plan: Plan, head: dict, results: list) -> None:
    """A horizontal bar chart of % of the copy roof, one bar per case."""
    figure_class = _require_matplotlib()
    figure = figure_class(figsize=(8, 1.6 + 0.25 * len(results)))
    axes = figure.add_subplot()
    for direction, color in (("forward", "tab:blue"), ("backward", "tab:orange")):
        rows = [i for i, r in enumerate(results) if r.direction == direction]
        if rows:
            axes.barh(rows, [results[i].percent_of_roof for i in rows], color=color,
                      label=direction)
    axes.set_yticks(range(len(results)), [f"{r.kernel} {r.direction}" for r in results],
                    fontsize=8)
    axes.invert_yaxis()
    axes.axvline(100, color="black", linewidth=0.8)
    axes.legend(loc="lower right", fontsize=8)
    axes.set_xlabel("% of a plain copy of the same bytes (measured in the same run)")
    axes.set_title(f"fusednn {head['fusednn_version']} {plan.dtype.name}, "
                   f"{plan.threads} threads\n{head['machine']}", fontsize=9)
    figure.tight_layout()
    figure.savefig(path, dpi=120)


# ---- the command ----------------------------------------------------------------

def _size(text: str) -> int:
    """A positive element count: 4096, 2^25 or 2**25."""
    base, sep, exponent = text.replace("**", "^").partition("^")
    try:
        value = int(base) ** int(exponent) if sep else int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer or 2^k, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {text!r}")
    return value


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def add_arguments(parser: argparse.ArgumentParser) -> None:
    names = ", ".join(k.name for k in ACTIVATION_KERNELS)
    parser.add_argument("--kernels", default="all", metavar="LIST",
                        help="comma-separated families or kernels, each optionally :forward or "
                             f":backward (default: all). Families: {', '.join(FAMILIES)}; "
                             f"activations: {names}; batchnorm: "
                             f"{', '.join(BATCH_NORM_KERNELS)} (batch_norm: both)")
    batch, channels = BATCH_NORM_SHAPE[:2]
    parser.add_argument("--size", type=_size, metavar="N",
                        help="elements per array (default 2^25, 2^22 with --quick; on --device "
                             "cuda 2^28, 2^26 with --quick). Batch norm "
                             f"takes x of {_shape_text(BATCH_NORM_SHAPE)} (NCHW, and its NHWC "
                             f"twin; {_shape_text(BATCH_NORM_QUICK_SHAPE)} with --quick); "
                             f"with --size, {batch}x{channels}xHxW with H = W = "
                             f"round(sqrt(N / {batch * channels})), at least 1")
    parser.add_argument("--dtype", choices=("float32", "float64"), default="float32")
    parser.add_argument("--threads", type=_positive, metavar="N",
                        help="CPU threads for fusednn and torch (default: fusednn's current "
                             "setting)")
    parser.add_argument("--repeat", type=_positive, metavar="K",
                        help=f"timed repeats per call, median reported (default {DEFAULT_REPEAT}; "
                             f"{QUICK_REPEAT} with --quick)")
    parser.add_argument("--json", metavar="FILE", help="also write the results as JSON")
    parser.add_argument("--plot", metavar="FILE",
                        help="also write a PNG bar chart of %% of roof (needs matplotlib)")
    parser.add_argument("--quick", action="store_true",
                        help="a smaller size and fewer repeats, for a look in seconds")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")


def _import_torch(device: str = "cpu"):
    # PyTorch's OpenMP workers otherwise spin for a while after each of its
    # calls, taking the cores from the kernel timed next: with peers
    # interleaved that would slow every kernel but PyTorch's.
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    try:
        import torch
    except ImportError as error:
        return None, f"not importable ({error})"
    if device == "cuda" and not torch.cuda.is_available():
        return None, f"{torch.__version__} without CUDA"
    return torch, f"{torch.__version__} (OMP_WAIT_POLICY={os.environ['OMP_WAIT_POLICY']})"


def _import_cupy():
    """(cupy, its version) when it sees a CUDA device, else (None, why not)."""
    try:
        import cupy
    except ImportError as error:
        return None, f"not importable ({error})"
    try:
        count = cupy.cuda.runtime.getDeviceCount()
    except cupy.cuda.runtime.CUDARuntimeError as error:
        return None, f"installed but sees no CUDA device ({error})"
    if count == 0:
        return None, "installed but sees no CUDA device"
    return cupy, cupy.__version__


def gpu_model() -> str:
    import cupy
    device = cupy.cuda.Device()
    name = cupy.cuda.runtime.getDeviceProperties(device.id)["name"]
    name = name.decode() if isinstance(name, bytes) else name
    return f"GPU {device.id}: {name}, compute capability {device.compute_capability}"


def run(args: argparse.Namespace) -> int:
    """Runs the benchmark; returns the exit status (1 when a check fails).
    Raises UsageError for bad option values and BenchError when the
    benchmark cannot run here."""
    selection = parse_selection(args.kernels)
    check_device(args.device, selection)
    if args.plot:
        _require_matplotlib()
    dtype = np.dtype(args.dtype)
    torch, torch_note = _import_torch(args.device)
    if args.device == "cuda":
        quick_size, default_size = CUDA_QUICK_SIZE, CUDA_DEFAULT_SIZE
    else:
        quick_size, default_size = QUICK_SIZE, DEFAULT_SIZE
    plan = Plan(device=args.device, dtype=dtype,
                size=args.size or (quick_size if args.quick else default_size),
                repeat=args.repeat or (QUICK_REPEAT if args.quick else DEFAULT_REPEAT),
                threads=args.threads or get_num_threads(),
                reference_elements=REFERENCE_ELEMENTS, torch=torch, torch_note=torch_note,
                size_given=args.size is not None, quick=args.quick)
    cases = build_cases(plan, selection)

    progress(f"checking {len(cases)} kernels against fusednn.reference ({dtype.name})")
    checks = {case: case.check() for case in cases}
    failed = [(case, result) for case, result in checks.items() if not result.passed]
    if failed:
        for case, result in failed:
            progress(f"check failed: {case.label} ({dtype.name}): {result.describe()}")
        progress(f"fusednn bench: {len(failed)} of {len(cases)} kernels disagree with "
                 "fusednn.reference; not timing them")
        return 1

    previous_threads = get_num_threads()
    previous_torch_threads = torch.get_num_threads() if torch is not None else None
    try:
        set_num_threads(plan.threads)
        if torch is not None:
            torch.set_num_threads(plan.threads)
        roof = COPY_ROOFS[plan.device](plan, cases)
        timings = []
        for i, case in enumerate(cases, 1):
            progress(f"[{i}/{len(cases)}] timing {case.label}")
            timings.append(time_case(case, plan, roof))
    finally:
        set_num_threads(previous_threads)
        if torch is not None:
            torch.set_num_threads(previous_torch_threads)

    roofs = pool_roofs(timings)
    results = [summarize(t, checks[t.case]) for t in timings]
    head = header(plan)
    print(report_text(plan, head, checks, roofs, results))
    if args.json:
        write_json(args.json, head, checks, roofs, results)
        progress(f"wrote {args.json}")
    if args.plot:
        write_plot(args.plot, plan, head, results)
        progress(f"wrote {args.plot}")
    return 0
