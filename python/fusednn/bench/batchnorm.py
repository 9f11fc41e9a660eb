"""The batch-normalization family of ``python -m fusednn bench``: the
training forward and the backward over NCHW (axis=1) and NHWC (axis=-1);
the check against fusednn.reference with per-value bounds, on a batch with
a channel whose mean is 1e4 times its spread, a constant channel and a NaN;
and the peers: PyTorch's native_batch_norm (NHWC as channels_last views of
the same memory), the same through torch.compile, and the two-pass
statistics and the backward formula written in jax.numpy under jax.jit.
float16 and bfloat16 x run with float32 gamma, beta and running
statistics, as mixed-precision training keeps them (PyTorch's CPU kernel
takes the same mix).
"""
from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import Callable

import numpy as np

from .. import reference
from ..batchnorm import batch_norm, batch_norm_backward
from .cases import Case, FamilyText, Plan, Runners, on_device, shape_text
from .checks import CheckResult, compare_bounded, finfo, standard_normal
from .peers import jax_peer, torch_check_tensors, torch_peers, torch_view

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
# The channels _batch_norm_check_inputs makes special (mean 1e4 times the
# spread, constant, holding a NaN) come first.
SPECIAL_CHANNELS = 3
# The check's bounds (see _batch_norm_check): y and grad_input absolute, as
# the design states them for outputs of unit variance; the running
# statistics relative, as docs/batchnorm.md promises them. float64 has no
# target in the design: the kernels carry a channel's mean in one double,
# merged over the reduction's units, so at mean/std = 1e4 (ulp 1.8e-12) y
# is off by about 1e-12; 1e-11 allows for that and still rejects any wrong
# formula.
# float16 and bfloat16 are computed in float32 and rounded once: the
# float32 bounds, plus half a unit in the last place of the storage type
# on y and grad_input (half_ulp); their statistics are float32.
BATCH_NORM_TOLERANCE = {"float32": 1e-5, "float64": 1e-11, "float16": 1e-5, "bfloat16": 1e-5}
RUNNING_STATISTICS_TOLERANCE = {"float32": 1e-6, "float64": 1e-12, "float16": 1e-6,
                                "bfloat16": 1e-6}


def _is_half(dtype: np.dtype) -> bool:
    return dtype.itemsize == 2


def _parameter_dtype(dtype: np.dtype) -> np.dtype:
    """gamma, beta, the running and the saved statistics: float32 for the
    half types, else x's dtype."""
    return np.dtype(np.float32) if _is_half(dtype) else dtype


def half_ulp(values: np.ndarray, dtype: np.dtype) -> np.ndarray | float:
    """Half the spacing of the storage type around |values| (the larger one
    at a power of two): what rounding a float32 result to it may add. 0 for
    float32 and float64, whose bounds include their own rounding."""
    if not _is_half(dtype):
        return 0.0
    info = finfo(dtype)
    with np.errstate(all="ignore"):
        exponent = np.floor(np.log2(np.abs(values)))
    exponent = np.where(np.isfinite(exponent), exponent, info.minexp)
    return 0.5 * np.exp2(np.maximum(exponent, info.minexp) - info.nmant)


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


def _to_nchw(layout: str) -> tuple:
    """The transpose that takes an array in `layout` to NCHW order."""
    order = BATCH_NORM_LAYOUTS[layout][1]
    return tuple(order.index(d) for d in range(len(order)))


def _reference_samples(plan: Plan, nchw: tuple) -> int:
    """How many samples of the batch the reference is timed on: about
    plan.reference_elements elements, and at least 2 (training needs more
    than one value per channel)."""
    per_sample = math.prod(nchw[1:])
    return min(nchw[0], max(2, plan.reference_elements // per_sample))


def _ordinary_channels(errors: np.ndarray) -> np.ndarray:
    """The errors of the channels of _batch_norm_check_inputs that are
    ordinary normal samples (all but the first SPECIAL_CHANNELS), in an
    NCHW output or a per-channel one."""
    return errors[:, SPECIAL_CHANNELS:] if errors.ndim == 4 else errors[SPECIAL_CHANNELS:]


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
            {name: a.astype(_parameter_dtype(dtype)) for name, a in per_channel.items()})


@dataclass
class BatchNormCheck:
    """The check inputs of one case, on the host and in the case's layout
    (per-channel arrays as they are), and judge(outputs), which holds
    outputs in NCHW order to the bounds of _batch_norm_check_data: for the
    forward (y, save_mean, save_invstd, running_mean, running_var) after one
    training step from `running`, for the backward (grad_input, grad_gamma,
    grad_beta) from the saved statistics given."""
    x: np.ndarray
    grad: np.ndarray
    gamma: np.ndarray
    beta: np.ndarray
    running: tuple            # (running_mean, running_var) before the step
    saved: tuple              # (save_mean, save_invstd) as batch_norm returns them
    judge: Callable[[tuple], CheckResult]


def _batch_norm_check_data(layout: str, direction: str, dtype) -> BatchNormCheck:
    """The inputs of _batch_norm_check_inputs laid out as `layout`, and the
    float64 reference on the same values in NCHW (where numpy's sums are
    pairwise, hence accurate enough to judge float64 kernels by).
    Bounds, t being BATCH_NORM_TOLERANCE: y within t; save_mean within
    t * max(|mean|, std); save_invstd within t relative; the running
    statistics within RUNNING_STATISTICS_TOLERANCE of the sum of their
    terms' magnitudes. The backward takes the reference's statistics rounded
    to the dtype the forward returns them in, grad_input within t times
    its channel's gain gamma * invstd (grad_output is of order one),
    grad_gamma and grad_beta within t of the sum of |grad_output * xhat| and
    |grad_output| they add up. Errors are reported at (n, c, h, w) indices
    whatever the layout. Half-precision y and grad_input may be off by
    half_ulp more."""
    dtype = np.dtype(dtype)
    order = BATCH_NORM_LAYOUTS[layout][1]
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
    save_mean, save_invstd = (a.astype(_parameter_dtype(dtype)) for a in (mean, invstd))
    dims = {4: "nchw", 1: "c"}
    if direction == "forward":
        running = RUNNING_STATISTICS_TOLERANCE[dtype.name]
        momentum = BATCH_NORM_MOMENTUM
        bounds = {
            "y": (expected.y, tolerance + half_ulp(expected.y, dtype)),
            "save_mean": (mean, tolerance * np.maximum(np.abs(mean), 1 / invstd)),
            "save_invstd": (invstd, tolerance * invstd),
            "running_mean": (running_mean, running * (
                (1 - momentum) * np.abs(p["running_mean"].astype(np.float64))
                + momentum * np.abs(mean))),
            "running_var": (running_var, running * running_var),
        }
    else:
        want = reference.batch_norm_backward(grad, x, p["gamma"], save_mean, save_invstd)
        grad64 = grad.astype(np.float64)
        xhat = ((x.astype(np.float64) - save_mean.astype(np.float64).reshape(per_channel_shape))
                * save_invstd.astype(np.float64).reshape(per_channel_shape))
        gain = np.abs(p["gamma"].astype(np.float64) * save_invstd.astype(np.float64))
        with np.errstate(invalid="ignore"):
            bounds = {
                "grad_input": (want[0], tolerance * gain.reshape(per_channel_shape)
                               + half_ulp(want[0], dtype)),
                "grad_gamma": (want[1], tolerance * np.abs(grad64 * xhat).sum(axis=reduced)),
                "grad_beta": (want[2], tolerance * np.abs(grad64).sum(axis=reduced)),
            }

    def judge(outputs):
        return compare_bounded({name: (np.asarray(ours), *bound)
                                for ours, (name, bound) in zip(outputs, bounds.items())},
                               x.size, dims, _ordinary_channels)

    return BatchNormCheck(x_laid, grad_laid, p["gamma"], p["beta"],
                          (p["running_mean"], p["running_var"]), (save_mean, save_invstd), judge)


def _batch_norm_check(layout: str, direction: str, data: BatchNormCheck,
                      device: str = "cpu") -> CheckResult:
    """fusednn's kernel on the check inputs (on the GPU, on CuPy copies of
    them) against the reference."""
    put, get = on_device(device)
    axis = BATCH_NORM_LAYOUTS[layout][0]
    to_nchw = _to_nchw(layout)
    settings = {"momentum": BATCH_NORM_MOMENTUM, "eps": BATCH_NORM_EPS}
    if direction == "forward":
        running_mean, running_var = (put(a.copy()) for a in data.running)
        y, mean, invstd = (get(a) for a in batch_norm(
            put(data.x), put(data.gamma), put(data.beta), running_mean, running_var, axis=axis,
            **settings))
        return data.judge((y.transpose(to_nchw), mean, invstd, get(running_mean),
                           get(running_var)))
    grad_input, grad_gamma, grad_beta = (get(a) for a in batch_norm_backward(
        put(data.grad), put(data.x), put(data.gamma), *(put(a) for a in data.saved), axis=axis))
    return data.judge((grad_input.transpose(to_nchw), grad_gamma, grad_beta))


class BatchNormArrays:
    """The arrays the batch-norm cases share, made once per run: x and
    grad_output (standard normal) and out, one buffer each that either
    layout views in its own shape; gamma, beta; running statistics for each
    caller, which every training forward updates in place (per-channel
    arrays float32 for half-precision x). All on the plan's device (numpy
    or CuPy) but the reference's, which stay on the host; to_host copies
    device arrays back for the reference."""

    def __init__(self, nchw: tuple, dtype: np.dtype, device: str = "cpu"):
        rng = np.random.default_rng(0)
        put, self.to_host = on_device(device)
        size, channels = math.prod(nchw), nchw[1]
        parameters = _parameter_dtype(dtype)
        self.x = put(standard_normal(rng, size, dtype))
        self.grad = put(standard_normal(rng, size, dtype))
        self.out = put(np.empty(size, dtype=dtype))
        self.gamma = put(rng.uniform(0.5, 1.5, channels).astype(parameters))
        self.beta = put(rng.uniform(-1.0, 1.0, channels).astype(parameters))
        self.running = {caller: (np.zeros(channels, parameters), np.ones(channels, parameters))
                        for caller in ("ours", "reference", "torch")}
        for caller in ("ours", "torch"):
            self.running[caller] = tuple(put(a) for a in self.running[caller])


def jax_batch_norm(jax, x, gamma, beta, running_mean, running_var, *, axis):
    """The training forward in jax.numpy: two-pass statistics (the mean,
    then the mean square of x - mean), as a careful JAX user writes it."""
    jnp = jax.numpy
    axes = tuple(d for d in range(x.ndim) if d != axis % x.ndim)
    shape = [1] * x.ndim
    shape[axis] = -1
    m = x.size // x.shape[axis]
    mean = x.mean(axes)
    centered = x - mean.reshape(shape)
    var = jnp.mean(centered * centered, axes)
    invstd = jax.lax.rsqrt(var + BATCH_NORM_EPS)
    y = centered * (invstd * gamma).reshape(shape) + beta.reshape(shape)
    momentum = BATCH_NORM_MOMENTUM
    return (y, mean, invstd, (1 - momentum) * running_mean + momentum * mean,
            (1 - momentum) * running_var + momentum * var * (m / (m - 1)))


def jax_batch_norm_backward(jax, grad, x, gamma, save_mean, save_invstd, *, axis):
    """The backward of the design (section 4) in jax.numpy, from the saved
    statistics: (grad_input, grad_gamma, grad_beta)."""
    axes = tuple(d for d in range(x.ndim) if d != axis % x.ndim)
    shape = [1] * x.ndim
    shape[axis] = -1
    m = x.size // x.shape[axis]
    xhat = (x - save_mean.reshape(shape)) * save_invstd.reshape(shape)
    grad_beta = grad.sum(axes)
    grad_gamma = (grad * xhat).sum(axes)
    grad_input = ((gamma * save_invstd / m).reshape(shape)
                  * (m * grad - grad_beta.reshape(shape) - xhat * grad_gamma.reshape(shape)))
    return grad_input, grad_gamma, grad_beta


def _torch_peers(layout: str, direction: str, plan: Plan, tensors: dict, data: BatchNormCheck,
                 runners: Runners) -> None:
    """PyTorch takes NCHW-shaped tensors; other layouts are permuted views
    of the same buffers (NHWC: channels_last), so that torch reads the same
    memory in the same order as ours."""
    torch = plan.torch
    aten = torch.ops.aten
    momentum, eps = BATCH_NORM_MOMENTUM, BATCH_NORM_EPS
    to_nchw = _to_nchw(layout)

    def laid(*arrays):
        return [t.permute(to_nchw) for t in torch_check_tensors(plan, *arrays)]

    if direction == "forward":
        def function(x, gamma, beta, running_mean, running_var, out, save_mean, save_invstd):
            aten.native_batch_norm.out(x, gamma, beta, running_mean, running_var, True,
                                       momentum, eps, out=out, save_mean=save_mean,
                                       save_invstd=save_invstd)
            return out, save_mean, save_invstd, running_mean, running_var

        # Dynamo refuses out= tensors that are not contiguous (NHWC's):
        # the compiled function stores the functional op's results.
        def compiled(x, gamma, beta, running_mean, running_var, out, save_mean, save_invstd):
            y, mean, invstd = aten.native_batch_norm(x, gamma, beta, running_mean, running_var,
                                                     True, momentum, eps)
            return (out.copy_(y), save_mean.copy_(mean), save_invstd.copy_(invstd),
                    running_mean, running_var)

        def check_args():
            x, = laid(data.x)
            per_channel = torch_check_tensors(plan, data.gamma, data.beta, *data.running)
            return [x, *per_channel, torch.empty_like(x),
                    *(torch.empty_like(per_channel[0]) for _ in range(2))]

        timed = [tensors[name] for name in ("x", "gamma", "beta", "running_mean",
                                            "running_var", "out")]
        timed += [torch.empty_like(tensors["gamma"]) for _ in range(2)]
        peers, errors = torch_peers(plan, "native_batch_norm.out", function, timed, check_args,
                                    data.judge, compiled=compiled)
    else:
        def function(grad, x, gamma, save_mean, save_invstd, out):
            return aten.native_batch_norm_backward(grad, x, gamma, None, None, save_mean,
                                                   save_invstd, True, eps, [True, True, True])

        def compiled(grad, x, gamma, save_mean, save_invstd, out):
            grad_input, grad_gamma, grad_beta = function(grad, x, gamma, save_mean,
                                                         save_invstd, out)
            return out.copy_(grad_input), grad_gamma, grad_beta

        def check_args():
            grad, x = laid(data.grad, data.x)
            return [grad, x, *torch_check_tensors(plan, data.gamma, *data.saved),
                    torch.empty_like(x)]

        _, save_mean, save_invstd = aten.native_batch_norm(
            tensors["x"], tensors["gamma"], tensors["beta"], None, None, True, momentum, eps)
        timed = [tensors["grad"], tensors["x"], tensors["gamma"], save_mean, save_invstd,
                 tensors["out"]]
        peers, errors = torch_peers(
            plan, "native_batch_norm_backward", function, timed, check_args, data.judge,
            allocates="its .out overload fills a new tensor and copies it, which is slower",
            compiled=compiled)
    runners.peers += peers
    runners.peer_errors.update(errors)


def _jax_peer(layout: str, direction: str, plan: Plan, arrays: BatchNormArrays, shape: tuple,
              saved: tuple, data: BatchNormCheck) -> list:
    jax = plan.jax
    axis = BATCH_NORM_LAYOUTS[layout][0]
    to_nchw = _to_nchw(layout)

    def judge(outputs):
        return data.judge((outputs[0].transpose(to_nchw), *outputs[1:]))

    if direction == "forward":
        return jax_peer(
            plan, "jax.jit(two-pass batch norm in jax.numpy)",
            functools.partial(jax_batch_norm, jax, axis=axis),
            [arrays.x.reshape(shape), arrays.gamma, arrays.beta, *arrays.running["reference"]],
            lambda: [data.x, data.gamma, data.beta, *data.running], judge)
    return jax_peer(
        plan, "jax.jit(the backward formula in jax.numpy)",
        functools.partial(jax_batch_norm_backward, jax, axis=axis),
        [arrays.grad.reshape(shape), arrays.x.reshape(shape), arrays.gamma, *saved],
        lambda: [data.grad, data.x, data.gamma, *data.saved], judge)


def _batch_norm_runners(layout: str, direction: str, plan: Plan, nchw: tuple,
                        arrays: BatchNormArrays, data: BatchNormCheck) -> Runners:
    axis = BATCH_NORM_LAYOUTS[layout][0]
    shape = _in_layout(nchw, layout)
    x, grad, out = (a.reshape(shape) for a in (arrays.x, arrays.grad, arrays.out))
    gamma, beta = arrays.gamma, arrays.beta
    samples = _reference_samples(plan, nchw)
    x_few, grad_few = arrays.to_host(x[:samples]), arrays.to_host(grad[:samples])
    gamma_host, beta_host = arrays.to_host(gamma), arrays.to_host(beta)
    settings = {"momentum": BATCH_NORM_MOMENTUM, "eps": BATCH_NORM_EPS, "axis": axis}
    saved_host = ()
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
        # On the GPU the tensors share CuPy's memory through DLPack.
        view = torch_view(plan)
        to_nchw = _to_nchw(layout)
        tensors = {name: view(a).permute(to_nchw) for name, a in (("x", x), ("grad", grad),
                                                                  ("out", out))}
        tensors.update(gamma=view(gamma), beta=view(beta))
        tensors["running_mean"], tensors["running_var"] = (
            view(a) for a in arrays.running["torch"])
        _torch_peers(layout, direction, plan, tensors, data, runners)
    if plan.jax is not None:
        runners.peers += _jax_peer(layout, direction, plan, arrays, shape, saved_host, data)
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
            # The check's inputs and expected values serve fusednn's check
            # and, later, the peers'.
            data = functools.cache(functools.partial(_batch_norm_check_data, layout, direction,
                                                     plan.dtype))
            cases.append(Case(
                family="batchnorm", name=kernel, direction=direction,
                shape=_in_layout(nchw, layout),
                bytes_per_element=(reads + writes) * item, traffic=f"{reads}r+{writes}w",
                check=lambda l=layout, d=direction, c=data: _batch_norm_check(l, d, c(),
                                                                              plan.device),
                prepare=lambda l=layout, d=direction, c=data: _batch_norm_runners(
                    l, d, plan, nchw, arrays(), c())))
    return cases


def describe_batch_norm(plan: Plan, checks: dict) -> FamilyText:
    nchw = batch_norm_shape(plan)
    kernel_layouts = dict(zip(BATCH_NORM_KERNELS, BATCH_NORM_LAYOUTS))
    timed = dict.fromkeys(kernel_layouts[case.name] for case in checks)
    layouts = " and ".join(f"{shape_text(_in_layout(nchw, layout))} ({layout}, "
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
    rounding = f" + half an ulp of {plan.dtype.name}" if _is_half(plan.dtype) else ""
    parameters = (", gamma, beta and running statistics float32" if _is_half(plan.dtype)
                  else "")
    return FamilyText(
        arrays=f"batch_norm x {layouts}, {math.prod(nchw)} {plan.dtype.name} elements"
               f"{parameters}",
        check=(f"within per-value bounds (largest error {largest:.2g} of its bound) on x of "
               f"{shape_text(BATCH_NORM_CHECK_SHAPE)} (NCHW) in each kernel's layout, with a "
               "channel at mean/std = 1e4, a constant one and one holding a NaN"),
        check_notes=[f"bounds: y {tolerance:g}{rounding}; grad_input {tolerance:g} * gamma * "
                     f"invstd{rounding}; "
                     f"save_mean {tolerance:g} * max(|mean|, std); save_invstd {tolerance:g} "
                     f"relative; grad_gamma, grad_beta {tolerance:g} * the sum of their terms' "
                     f"magnitudes; running statistics {running:g} * the same"],
        reference=reference_text,
        torch="torch.ops.aten.native_batch_norm.out writing preallocated outputs, "
              "native_batch_norm_backward allocating grad_input (fn.batch_norm_backward "
              "writes a preallocated out=); NHWC as channels_last views of the same memory",
        jax="two-pass statistics and the design's backward formula in jax.numpy, over the "
            "same layout's axes",
        over_roof="its traffic counts x (and the backward's grad_output) as read twice, for "
                  "the statistics and to normalize; where they fit in the cache (above) the "
                  "second read comes from it, so fewer bytes cross to memory than are counted")
