"""Batch normalization on numpy arrays (CPU kernels) and CuPy arrays (CUDA
kernels, on CuPy's current stream): the training and inference forward
pass and the training backward pass, over any channel axis (NC, NCL, NCHW,
NCDHW with axis=1; channels-last with axis=-1).

Everything is validated here before a kernel runs, so bad input raises
without touching ``out`` or the running statistics. See docs/batchnorm.md
for the conventions (which follow PyTorch) and the numerics, and
docs/cuda.md for the GPU.
"""
from __future__ import annotations

import math
import numbers

import numpy as np

from . import _backend, _interop
from ._backend import _cpu, _cuda
from .reference import BatchNormResult

__all__ = ["BatchNormResult", "batch_norm", "batch_norm_backward"]


def _channel_axis(axis, ndim: int, function: str) -> int:
    if type(axis) is not int and (isinstance(axis, bool)
                                  or not isinstance(axis, numbers.Integral)):
        raise TypeError(f"fusednn.{function}: axis must be an integer, not {type(axis).__name__}")
    if not -ndim <= axis < ndim:
        raise ValueError(f"fusednn.{function}: axis {axis} is out of range for an array "
                         f"with {ndim} dimension(s)")
    return int(axis) % ndim


def _per_channel(a, name: str, channels: int, function: str, *, dtype=None,
                 writable: bool = False):
    """Checks a per-channel array: numpy, float32/float64 (exactly `dtype`
    when given), shape (channels,); writable arrays must also be writable in
    place (native byte order, aligned)."""
    if a is None:
        return None
    if _backend.is_cupy_array(a):
        raise _backend.cuda_unavailable(function)
    if not isinstance(a, np.ndarray):
        raise TypeError(f"fusednn.{function}: {name} must be a numpy array or None, "
                        f"not {type(a).__name__}")
    _backend.check_dtype(a.dtype, name, function)
    if dtype is not None and a.dtype != dtype and a.dtype.newbyteorder("=") != dtype:
        raise TypeError(f"fusednn.{function}: {name} has dtype {a.dtype}; it must match "
                        f"x's dtype {np.dtype(dtype)}")
    if a.shape != (channels,):
        raise ValueError(f"fusednn.{function}: {name} has shape {a.shape}; expected "
                         f"({channels},), one value per channel")
    if writable:
        flags = a.flags
        if not flags.writeable:
            raise ValueError(f"fusednn.{function}: {name} is read-only but is updated in place")
        if not a.dtype.isnative or not flags.aligned:
            raise ValueError(f"fusednn.{function}: {name} is updated in place and must be "
                             "aligned and in native byte order")
        return a
    return _backend.as_cpu_array(a, name, function)


def _merges(shape, strides) -> bool:
    """Whether these dimensions form one strided extent."""
    dims = [(n, s) for n, s in zip(shape, strides) if n != 1]
    return all(s == s_next * n_next for (_, s), (n_next, s_next) in zip(dims, dims[1:]))


def _channel_viewable(x, axis: int):
    """x (numpy or CuPy) itself when the dimensions before and after the
    channel axis each merge into one strided extent (what the reductions
    walk), else one contiguous copy."""
    if x.size == 0 or x.flags.c_contiguous or (_merges(x.shape[:axis], x.strides[:axis])
                       and _merges(x.shape[axis + 1:], x.strides[axis + 1:])):
        return x
    if _backend.is_cupy_array(x):
        return _backend._cupy().ascontiguousarray(x)
    return np.ascontiguousarray(x)


def _settings(training, momentum, eps, function: str):
    """Checks the forward's scalar arguments; returns them as bool, float, float."""
    if not isinstance(training, (bool, np.bool_)):
        raise TypeError(f"fusednn.{function}: training must be a bool, "
                        f"not {type(training).__name__}")
    momentum = _backend.check_real(momentum, "momentum", function)
    if not 0.0 <= momentum <= 1.0:
        raise ValueError(f"fusednn.{function}: momentum must be in [0, 1], got {momentum}")
    eps = _backend.check_real(eps, "eps", function)
    if eps <= 0.0:
        raise ValueError(f"fusednn.{function}: eps must be positive, got {eps}")
    return bool(training), momentum, eps


def _values_per_channel(shape: tuple, axis: int) -> int:
    return math.prod(shape[:axis] + shape[axis + 1:])


def _check_running_statistics(training: bool, x, out, gamma, beta, running_mean, running_var,
                              function: str) -> None:
    """Training writes the running statistics in place after it has read
    x, gamma and beta and written out, so they must be separate from all of
    those and from each other, with no two of their own elements sharing
    memory: a ValueError otherwise."""
    if not training:
        return
    statistics = {"running_mean": running_mean, "running_var": running_var}
    operands = {"out": out, "x": x, "gamma": gamma, "beta": beta, **statistics}
    for name, statistic in statistics.items():
        if statistic is None:
            continue
        _backend.check_no_internal_overlap(statistic, name, function)
        for other_name, other in operands.items():
            if (other is not None and other_name != name
                    and _backend._may_share_memory(statistic, other)):
                raise ValueError(f"fusednn.{function}: {name} is updated in place but "
                                 f"shares memory with {other_name}; pass separate arrays")


# ---- CuPy arrays (CUDA kernels) ----------------------------------------------


def _cuda_weight_dtypes(dtype) -> tuple:
    """The dtypes gamma and beta may have for x of `dtype` on the GPU: x's
    own, and float32 too for float16 x (as mixed-precision training keeps
    them)."""
    if dtype == np.float16:
        return (np.dtype(np.float16), np.dtype(np.float32))
    return (np.dtype(dtype),)


_CUDA_ANY = tuple(np.dtype(d) for d in _backend.SUPPORTED_CUDA_DTYPES)


def _cuda_statistics_dtype(dtype) -> np.dtype:
    """save_mean, save_invstd, grad_gamma and grad_beta: x's dtype, float32
    for float16 x (a per-channel sum of float16 values may not fit one)."""
    return np.dtype(np.float32) if dtype == np.float16 else np.dtype(dtype)


def _cuda_per_channel(a, name: str, channels: int, function: str, dtypes: tuple, *,
                      writable: bool = False):
    """Checks a per-channel CuPy array: a dtype of `dtypes`, shape
    (channels,), on the current device; arrays updated in place must also
    be aligned (others are copied once if they are not)."""
    if a is None:
        return None
    cupy = _backend._cupy()
    if not isinstance(a, cupy.ndarray):
        raise TypeError(f"fusednn.{function}: {name} must be a CuPy array or None, "
                        f"not {type(a).__name__}")
    if a.dtype not in dtypes:
        raise TypeError(f"fusednn.{function}: {name} has dtype {a.dtype}; it must be "
                        f"{' or '.join(d.name for d in dtypes)} here")
    if a.shape != (channels,):
        raise ValueError(f"fusednn.{function}: {name} has shape {a.shape}; expected "
                         f"({channels},), one value per channel")
    if not writable:
        return _backend.as_cuda_array(a, name, function)
    current = cupy.cuda.Device().id
    if a.device.id != current:
        raise ValueError(f"fusednn.{function}: {name} is on GPU {a.device.id} but the current "
                         f"CuPy device is GPU {current}")
    if a.data.ptr % a.dtype.itemsize or any(s % a.dtype.itemsize for s in a.strides):
        raise ValueError(f"fusednn.{function}: {name} is updated in place and must be aligned "
                         "to its item size")
    return a


def _cuda_workspace(x, axis: int):
    """Device scratch memory for the kernels' partial sums and coefficients,
    from CuPy's pool (on the current stream)."""
    code = _backend.cuda_operand(x)[1]
    nbytes = _cuda.batch_norm_workspace_bytes(list(x.shape), axis, code)
    return _backend._cupy().empty(max(1, -(-nbytes // 8)), dtype=np.float64)


def _operand_or_none(a):
    return None if a is None else _backend.cuda_operand(a)


def _batch_norm_cuda(x, gamma, beta, running_mean, running_var, training, momentum, eps,
                     axis, out):
    function = "batch_norm"
    cupy = _backend._cupy()
    x = _backend.as_cuda_array(x, "x", function)
    if x.ndim == 0:
        raise ValueError(f"fusednn.{function}: x must have at least one dimension (the channels)")
    ax = _channel_axis(axis, x.ndim, function)
    training, momentum, eps = _settings(training, momentum, eps, function)
    channels = x.shape[ax]
    weights = _cuda_weight_dtypes(x.dtype)
    gamma = _cuda_per_channel(gamma, "gamma", channels, function, weights)
    beta = _cuda_per_channel(beta, "beta", channels, function, weights)
    running_mean = _cuda_per_channel(running_mean, "running_mean", channels, function,
                                     _CUDA_ANY, writable=training)
    running_var = _cuda_per_channel(running_var, "running_var", channels, function,
                                    _CUDA_ANY, writable=training)
    if training and _values_per_channel(x.shape, ax) < 2:
        raise ValueError(f"fusednn.{function}: training needs more than one value per channel, "
                         f"got input shape {x.shape} with channel axis {ax}")
    if not training and (running_mean is None or running_var is None):
        raise ValueError(f"fusednn.{function}: training=False normalizes with running_mean "
                         "and running_var; pass both")
    out = _backend.prepare_cuda_out(out, x, function)
    _check_running_statistics(training, x, out, gamma, beta, running_mean, running_var, function)
    x = _channel_viewable(_backend.detach_from_cuda_out(x, out), ax)
    gamma, beta = (_backend.detach_from_cuda_out(a, out, elementwise=False) for a in (gamma, beta))
    if not training:
        running_mean, running_var = (_backend.detach_from_cuda_out(a, out, elementwise=False)
                                     for a in (running_mean, running_var))
    statistics = _cuda_statistics_dtype(x.dtype)
    save_mean = cupy.empty(channels, dtype=statistics)
    save_invstd = cupy.empty(channels, dtype=statistics)
    workspace = _cuda_workspace(x, ax)
    operand = _backend.cuda_operand
    _cuda.batch_norm_forward(operand(x), operand(out), _operand_or_none(gamma),
                             _operand_or_none(beta), _operand_or_none(running_mean),
                             _operand_or_none(running_var), operand(save_mean),
                             operand(save_invstd), workspace.data.ptr, workspace.nbytes,
                             training, momentum, eps, ax, *_backend.cuda_target(x))
    return BatchNormResult(out, save_mean, save_invstd)


def _batch_norm_backward_cuda(grad_output, x, gamma, save_mean, save_invstd, axis, training,
                              out):
    function = "batch_norm_backward"
    cupy = _backend._cupy()
    grad_output = _backend.as_cuda_array(grad_output, "grad_output", function)
    x = _backend.as_cuda_array(x, "x", function)
    _backend.check_same(grad_output, x, "grad_output and x", function)
    if x.ndim == 0:
        raise ValueError(f"fusednn.{function}: x must have at least one dimension (the channels)")
    ax = _channel_axis(axis, x.ndim, function)
    channels = x.shape[ax]
    gamma = _cuda_per_channel(gamma, "gamma", channels, function, _cuda_weight_dtypes(x.dtype))
    if save_mean is None or save_invstd is None:
        raise TypeError(f"fusednn.{function}: save_mean and save_invstd are required "
                        "(batch_norm returns them)")
    save_mean = _cuda_per_channel(save_mean, "save_mean", channels, function, _CUDA_ANY)
    save_invstd = _cuda_per_channel(save_invstd, "save_invstd", channels, function, _CUDA_ANY)
    grad_input = _backend.prepare_cuda_out(out, x, function)
    grad_output = _channel_viewable(_backend.detach_from_cuda_out(grad_output, grad_input), ax)
    x = _channel_viewable(_backend.detach_from_cuda_out(x, grad_input), ax)
    gamma, save_mean, save_invstd = (
        _backend.detach_from_cuda_out(a, grad_input, elementwise=False)
        for a in (gamma, save_mean, save_invstd))
    statistics = _cuda_statistics_dtype(x.dtype)
    grad_gamma = cupy.empty(channels, dtype=statistics)
    grad_beta = cupy.empty(channels, dtype=statistics)
    workspace = _cuda_workspace(x, ax)
    operand = _backend.cuda_operand
    _cuda.batch_norm_backward(operand(grad_output), operand(x), operand(grad_input),
                              _operand_or_none(gamma), operand(save_mean), operand(save_invstd),
                              operand(grad_gamma), operand(grad_beta), workspace.data.ptr,
                              workspace.nbytes, ax, training, *_backend.cuda_target(x))
    return grad_input, grad_gamma, grad_beta


# ---- public functions -----------------------------------------------------------


def batch_norm(x, gamma=None, beta=None, running_mean=None, running_var=None, *,
               training=True, momentum=0.1, eps=1e-5, axis=1, out=None):
    """Normalizes x over every axis but the channel axis ``axis``:
    ``y = (x - mean) / sqrt(var + eps) * gamma + beta``.

    training=True uses the batch mean and biased variance, and updates
    ``running_mean`` and ``running_var`` in place when given
    (``running = (1 - momentum) * running + momentum * batch``, the
    variance with the unbiased ``var * m / (m - 1)``). training=False uses
    the running statistics, which are then required. gamma/beta default to
    ones/zeros and must have x's dtype; the running statistics may be
    float32 or float64 whatever x's dtype.

    Returns ``BatchNormResult(y, save_mean, save_invstd)`` with the mean and
    ``1 / sqrt(var + eps)`` that were used (batch statistics in training,
    the running ones in inference), in x's dtype (float32 for float16 x).

    CuPy arrays run on the GPU, where float16 x is also accepted (computed
    in float32; gamma and beta may then be float16 or float32) and the
    running statistics may be float16, float32 or float64.
    """
    function = "batch_norm"
    device = _backend.device_of(function, x=x, gamma=gamma, beta=beta, running_mean=running_mean,
                                running_var=running_var)
    if device == "foreign":
        return _interop.call(
            lambda **arrays: batch_norm(**arrays, training=training, momentum=momentum, eps=eps,
                                       axis=axis),
            {"x": x, "gamma": gamma, "beta": beta, "running_mean": running_mean,
             "running_var": running_var, "out": out}, function, "x")
    if device == "cuda":
        return _batch_norm_cuda(x, gamma, beta, running_mean, running_var, training, momentum,
                                eps, axis, out)
    x = _backend.as_cpu_array(x, "x", function)
    if x.ndim == 0:
        raise ValueError(f"fusednn.{function}: x must have at least one dimension (the channels)")
    ax = _channel_axis(axis, x.ndim, function)
    training, momentum, eps = _settings(training, momentum, eps, function)
    channels = x.shape[ax]
    per_channel = _values_per_channel(x.shape, ax)
    gamma = _per_channel(gamma, "gamma", channels, function, dtype=x.dtype)
    beta = _per_channel(beta, "beta", channels, function, dtype=x.dtype)
    running_mean = _per_channel(running_mean, "running_mean", channels, function,
                                writable=training)
    running_var = _per_channel(running_var, "running_var", channels, function,
                               writable=training)
    if training and per_channel < 2:
        raise ValueError(f"fusednn.{function}: training needs more than one value per channel, "
                         f"got input shape {x.shape} with channel axis {ax}")
    if not training and (running_mean is None or running_var is None):
        raise ValueError(f"fusednn.{function}: training=False normalizes with running_mean "
                         "and running_var; pass both")
    out = _backend.prepare_out(out, x.shape, x.dtype, function)
    _check_running_statistics(training, x, out, gamma, beta, running_mean, running_var, function)
    x = _channel_viewable(_backend.detach_from_out(x, out), ax)
    gamma, beta = (_backend.detach_from_out(a, out, elementwise=False) for a in (gamma, beta))
    if not training:
        running_mean, running_var = (_backend.detach_from_out(a, out, elementwise=False)
                                     for a in (running_mean, running_var))
    save_mean = np.empty(channels, dtype=x.dtype)
    save_invstd = np.empty(channels, dtype=x.dtype)
    _cpu.batch_norm_forward(x, out, gamma, beta, running_mean, running_var, save_mean,
                            save_invstd, training, momentum, eps, ax)
    return BatchNormResult(out, save_mean, save_invstd)


def batch_norm_backward(grad_output, x, gamma, save_mean, save_invstd, *, axis=1,
                        training=True, out=None):
    """Gradients of batch_norm.

    ``save_mean`` and ``save_invstd`` are what batch_norm returned (float32
    or float64; pass float64 for full accuracy when a channel's mean is
    thousands of times its spread). gamma=None means ones. Returns
    ``(grad_input, grad_gamma, grad_beta)`` with ``grad_gamma = sum(dy * xhat)``
    and ``grad_beta = sum(dy)``; grad_gamma and grad_beta are float32 for
    float16 x (GPU only).

    ``training=True`` (the default) is the backward of the training forward,
    whose batch statistics depend on x:
    ``grad_input = gamma * invstd / m * (m * dy - sum(dy) - xhat * sum(dy * xhat))``.
    ``training=False`` is the backward of the inference forward, whose
    statistics (the running ones it returned as save_mean/save_invstd) are
    constants: ``grad_input = gamma * invstd * dy``, as PyTorch's eval mode.

    ``out``, when given, receives grad_input (x's shape and dtype; it may be
    grad_output or x itself), so that a training loop can reuse one buffer
    instead of allocating, and touching fresh pages for, every call.
    """
    function = "batch_norm_backward"
    if not isinstance(training, (bool, np.bool_)):
        raise TypeError(f"fusednn.{function}: training must be a bool, "
                        f"not {type(training).__name__}")
    training = bool(training)
    device = _backend.device_of(function, grad_output=grad_output, x=x, gamma=gamma,
                                save_mean=save_mean, save_invstd=save_invstd)
    if device == "foreign":
        return _interop.call(
            lambda **arrays: batch_norm_backward(**arrays, axis=axis, training=training),
            {"grad_output": grad_output, "x": x, "gamma": gamma, "save_mean": save_mean,
             "save_invstd": save_invstd, "out": out}, function, "grad_output")
    if device == "cuda":
        return _batch_norm_backward_cuda(grad_output, x, gamma, save_mean, save_invstd, axis,
                                         training, out)
    grad_output = _backend.as_cpu_array(grad_output, "grad_output", function)
    x = _backend.as_cpu_array(x, "x", function)
    _backend.check_same(grad_output, x, "grad_output and x", function)
    if x.ndim == 0:
        raise ValueError(f"fusednn.{function}: x must have at least one dimension (the channels)")
    ax = _channel_axis(axis, x.ndim, function)
    channels = x.shape[ax]
    gamma = _per_channel(gamma, "gamma", channels, function, dtype=x.dtype)
    if save_mean is None or save_invstd is None:
        raise TypeError(f"fusednn.{function}: save_mean and save_invstd are required "
                        "(batch_norm returns them)")
    save_mean = _per_channel(save_mean, "save_mean", channels, function)
    save_invstd = _per_channel(save_invstd, "save_invstd", channels, function)
    grad_input = _backend.prepare_out(out, x.shape, x.dtype, function)
    grad_output = _channel_viewable(_backend.detach_from_out(grad_output, grad_input), ax)
    x = _channel_viewable(_backend.detach_from_out(x, grad_input), ax)
    gamma, save_mean, save_invstd = (_backend.detach_from_out(a, grad_input, elementwise=False)
                                     for a in (gamma, save_mean, save_invstd))
    grad_gamma = np.empty(channels, dtype=x.dtype)
    grad_beta = np.empty(channels, dtype=x.dtype)
    _cpu.batch_norm_backward(grad_output, x, grad_input, gamma, save_mean, save_invstd,
                             grad_gamma, grad_beta, ax, training)
    return grad_input, grad_gamma, grad_beta
