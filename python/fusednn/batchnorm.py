"""Batch normalization on arrays of any library the array layer takes
(numpy, CuPy, torch, JAX, DLPack; see _arrays): the training and inference
forward pass and the training backward pass, over any channel axis (NC,
NCL, NCHW, NCDHW with axis=1; channels-last with axis=-1).

Everything is validated here, once and the same way for every device,
before a kernel runs, so bad input raises without touching ``out`` or the
running statistics. An ordinary call on numpy arrays or torch CPU tensors
is first offered to the CPU module's quick path (csrc/bindings/
quick_cpu.cpp), which checks, runs and returns it in one compiled call or
declines it, writing nothing, to the path here; see docs/arrays.md. See docs/batchnorm.md for the conventions (which follow
PyTorch) and the numerics, and docs/cuda.md for the GPU.

``activation="relu"`` fuses a ReLU after the normalization: the forward
writes ``relu(batch_norm(x))`` in its one pass, and the backward, given
that output as ``y``, masks grad_output by ``y > 0`` inside its own passes,
so the pair costs the memory traffic of batch norm alone.
"""
from __future__ import annotations

import functools
import math
import numbers

import numpy as np

from . import _arrays, _backend, _cpu
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


def _weight_dtypes(dtype) -> tuple:
    """The dtypes gamma and beta may have for x of `dtype`: x's own, and
    float32 too for float16 and bfloat16 x (as mixed-precision training
    keeps them)."""
    allowed = _WEIGHT_DTYPES.get(dtype)
    if allowed is None:
        allowed = _WEIGHT_DTYPES[dtype] = (
            (np.dtype(dtype), np.dtype(np.float32)) if _backend.is_half(dtype)
            else (np.dtype(dtype),))
    return allowed


def _statistics_dtype(dtype) -> np.dtype:
    """save_mean, save_invstd, grad_gamma and grad_beta: x's dtype, float32
    for float16 and bfloat16 x (a per-channel sum of half-precision values
    may not fit one, nor keep their accuracy)."""
    statistics = _STATISTICS_DTYPES.get(dtype)
    if statistics is None:
        statistics = _STATISTICS_DTYPES[dtype] = (
            np.dtype(np.float32) if _backend.is_half(dtype) else np.dtype(dtype))
    return statistics


# The two tables above, filled as dtypes arrive (a call's fixed cost is
# what decides small batches).
_WEIGHT_DTYPES: dict = {}
_STATISTICS_DTYPES: dict = {}


def _per_channel(place, a, name: str, channels: int, function: str, *, weights_of=None,
                 writable: bool = False):
    """The descriptor of a per-channel array: a supported dtype (one of
    _weight_dtypes(weights_of) when given), shape (channels,); arrays
    updated in place (`writable`) must be writable where they are."""
    if a is None:
        return None
    a = place.view(a, name, function, writable=writable)
    if weights_of is not None:
        allowed = _weight_dtypes(weights_of)
        if a.dtype not in allowed:
            if len(allowed) == 1:
                raise TypeError(f"fusednn.{function}: {name} has dtype {a.dtype}; it must "
                                f"match x's dtype {weights_of}")
            raise TypeError(f"fusednn.{function}: {name} has dtype {a.dtype}; it must be "
                            f"{' or '.join(d.name for d in allowed)} here")
    if a.shape != (channels,):
        raise ValueError(f"fusednn.{function}: {name} has shape {a.shape}; expected "
                         f"({channels},), one value per channel")
    return a


def _merges(shape, strides) -> bool:
    """Whether these dimensions form one strided extent."""
    dims = [(n, s) for n, s in zip(shape, strides) if n != 1]
    return all(s == s_next * n_next for (_, s), (n_next, s_next) in zip(dims, dims[1:]))


def _channel_viewable(place, x, axis: int):
    """x itself when the dimensions before and after the channel axis each
    merge into one strided extent (what the reductions walk), else one
    contiguous copy."""
    if x.size == 0 or place.c_contiguous(x) or (_merges(x.shape[:axis], x.strides[:axis])
                       and _merges(x.shape[axis + 1:], x.strides[axis + 1:])):
        return x
    return place.contiguous(x)


# What `activation` may name: the activations fused after the normalization.
ACTIVATIONS = ("relu",)


def _activation(activation, function: str) -> bool:
    """Whether a ReLU follows the normalization (activation None or "relu")."""
    if activation is None:
        return False
    if isinstance(activation, str) and activation in ACTIVATIONS:
        return True
    raise ValueError(f"fusednn.{function}: activation must be None or 'relu', "
                     f"got {activation!r}")


def _check_gradient_matches(grad_output, x, function: str) -> None:
    """grad_output must have x's shape and dtype."""
    if grad_output.shape != x.shape:
        raise ValueError(f"fusednn.{function}: grad_output and x must have the same shape, "
                         f"got {grad_output.shape} and {x.shape}")
    if grad_output.dtype != x.dtype:
        raise TypeError(f"fusednn.{function}: grad_output and x must have the same dtype, "
                        f"got {grad_output.dtype} and {x.dtype}")


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


_OPERAND_NAMES = ("out", "x", "gamma", "beta", "running_mean", "running_var")


def _check_running_statistics(place, training: bool, x, out, gamma, beta, running_mean,
                              running_var, function: str, meeting=None) -> None:
    """Training writes the running statistics in place after it has read
    x, gamma and beta and written out, so they must be separate from all of
    those and from each other, with no two of their own elements sharing
    memory: a ValueError otherwise. `meeting`, when the caller has it, is
    place.meeting_extents of (out, x, gamma, beta, running_mean,
    running_var)."""
    if not training or (running_mean is None and running_var is None):
        return
    operands = (out, x, gamma, beta, running_mean, running_var)
    extents, meets = meeting or place.meeting_extents(*operands)
    for index in (4, 5):
        statistic = operands[index]
        if statistic is None:
            continue
        # (channels,) arrays: the 1-d test of check_no_internal_overlap,
        # inline (this runs on every training call).
        stride, itemsize = statistic.strides[0], statistic.dtype.itemsize
        if statistic.shape[0] > 1 and -itemsize < stride < itemsize:
            _arrays.check_no_internal_overlap(statistic, _OPERAND_NAMES[index], function)
        if not meets[index]:  # apart from every other operand: the usual case
            continue
        for other_index in range(6):
            if meets[index] >> other_index & 1 and place.may_share_memory(
                    statistic, operands[other_index], (extents[index], extents[other_index])):
                raise ValueError(f"fusednn.{function}: {_OPERAND_NAMES[index]} is updated in "
                                 f"place but shares memory with {_OPERAND_NAMES[other_index]}; "
                                 "pass separate arrays")


# ---- public functions -----------------------------------------------------------

# The compiled quick paths (csrc/bindings/quick_cpu.cpp), which return the
# same BatchNormResult as the general path.
_batch_norm_quick = _cpu.batch_norm_quick
_batch_norm_backward_quick = _cpu.batch_norm_backward_quick
_cpu.register_batch_norm_result(BatchNormResult)


def _workspace(place, x, axis: int):
    """The backend's scratch buffer for a batch-norm call on x (the CPU
    needs none: its places have no workspaces)."""
    if not place.has_workspaces:
        return None
    return place.workspace(_workspace_bytes(place.backend, x.shape, axis, x.dtype))


@functools.lru_cache(maxsize=256)
def _workspace_bytes(backend, shape: tuple, axis: int, dtype) -> int:
    """The backend's answer, remembered: a training loop asks about the
    same few shapes every step, and asking costs more than remembering."""
    return backend.batch_norm_workspace_bytes(shape, axis, _arrays.dtype_code(dtype))


def batch_norm(x, gamma=None, beta=None, running_mean=None, running_var=None, *,
               training=True, momentum=0.1, eps=1e-5, axis=1, activation=None, out=None):
    """Normalizes x over every axis but the channel axis ``axis``:
    ``y = (x - mean) / sqrt(var + eps) * gamma + beta``.

    training=True uses the batch mean and biased variance, and updates
    ``running_mean`` and ``running_var`` in place when given
    (``running = (1 - momentum) * running + momentum * batch``, the
    variance with the unbiased ``var * m / (m - 1)``). training=False uses
    the running statistics, which are then required. gamma/beta default to
    ones/zeros and must have x's dtype (or float32 for float16 and bfloat16
    x); the running statistics may be of any float dtype whatever x's.

    Returns ``BatchNormResult(y, save_mean, save_invstd)`` with the mean and
    ``1 / sqrt(var + eps)`` that were used (batch statistics in training,
    the running ones in inference), in x's dtype (float32 for float16 and
    bfloat16 x, which are computed in float32 and rounded once to y).

    ``activation="relu"`` returns ``relu(y)`` instead of y, written in the
    same pass (fusednn's relu: -0 and NaN pass); its backward is
    ``batch_norm_backward(..., activation="relu", y=<that output>)``.

    On the GPU (CuPy, torch CUDA tensors) float16 x is accepted the same way.
    """
    # Ordinary calls (numpy arrays or torch CPU tensors of float32/float64
    # in the usual layouts, valid scalars) are checked and run in one
    # compiled call, which declines everything else, errors included, with
    # nothing written: those take the path below.
    result = _batch_norm_quick(x, gamma, beta, running_mean, running_var, out, training,
                               momentum, eps, axis, activation, False)
    if result is not None:
        return result
    function = "batch_norm"
    place = _arrays.locate(function, ("x", "gamma", "beta", "running_mean", "running_var"), x,
                           gamma, beta, running_mean, running_var)
    x = place.view(x, "x", function)
    if x.ndim == 0:
        raise ValueError(f"fusednn.{function}: x must have at least one dimension (the channels)")
    ax = _channel_axis(axis, x.ndim, function)
    training, momentum, eps = _settings(training, momentum, eps, function)
    relu = _activation(activation, function)
    channels = x.shape[ax]
    gamma = _per_channel(place, gamma, "gamma", channels, function, weights_of=x.dtype)
    beta = _per_channel(place, beta, "beta", channels, function, weights_of=x.dtype)
    running_mean = _per_channel(place, running_mean, "running_mean", channels, function,
                                writable=training)
    running_var = _per_channel(place, running_var, "running_var", channels, function,
                               writable=training)
    if training and (x.size // channels if channels else _values_per_channel(x.shape, ax)) < 2:
        raise ValueError(f"fusednn.{function}: training needs more than one value per channel, "
                         f"got input shape {x.shape} with channel axis {ax}")
    if not training and (running_mean is None or running_var is None):
        raise ValueError(f"fusednn.{function}: training=False normalizes with running_mean "
                         "and running_var; pass both")
    y = place.output(out, x, function)
    # One look at every operand's bytes serves the checks and the copies.
    meeting = extents, meets = place.meeting_extents(y, x, gamma, beta, running_mean,
                                                     running_var)
    _check_running_statistics(place, training, x, y, gamma, beta, running_mean, running_var,
                              function, meeting)
    if meets[0]:  # some operand's bytes reach into y's: copy those that share memory with it
        y_extent = extents[0]
        x = place.detach(x, y, extents=(extents[1], y_extent))
        gamma = place.detach(gamma, y, elementwise=False, extents=(extents[2], y_extent))
        beta = place.detach(beta, y, elementwise=False, extents=(extents[3], y_extent))
        if not training:
            running_mean = place.detach(running_mean, y, elementwise=False,
                                        extents=(extents[4], y_extent))
            running_var = place.detach(running_var, y, elementwise=False,
                                       extents=(extents[5], y_extent))
    x = _channel_viewable(place, x, ax)
    statistics = _statistics_dtype(x.dtype)
    save_mean = place.empty((channels,), statistics)
    save_invstd = place.empty((channels,), statistics)
    workspace = _workspace(place, x, ax)
    place.backend.batch_norm_forward(x, y, gamma, beta, running_mean, running_var, save_mean,
                                     save_invstd, workspace, training, momentum, eps, ax, relu)
    return BatchNormResult(place.result(y, out), place.result(save_mean),
                           place.result(save_invstd))


def batch_norm_backward(grad_output, x, gamma, save_mean, save_invstd, *, axis=1,
                        training=True, activation=None, y=None, out=None):
    """Gradients of batch_norm.

    ``save_mean`` and ``save_invstd`` are what batch_norm returned (float32
    or float64; pass float64 for full accuracy when a channel's mean is
    thousands of times its spread). gamma=None means ones. Returns
    ``(grad_input, grad_gamma, grad_beta)`` with ``grad_gamma = sum(dy * xhat)``
    and ``grad_beta = sum(dy)``; grad_gamma and grad_beta are float32 for
    float16 and bfloat16 x.

    ``training=True`` (the default) is the backward of the training forward,
    whose batch statistics depend on x:
    ``grad_input = gamma * invstd / m * (m * dy - sum(dy) - xhat * sum(dy * xhat))``.
    ``training=False`` is the backward of the inference forward, whose
    statistics (the running ones it returned as save_mean/save_invstd) are
    constants: ``grad_input = gamma * invstd * dy``, as PyTorch's eval mode.

    ``activation="relu"`` is the backward of ``batch_norm(...,
    activation="relu")``: ``y``, that forward's output (x's shape and
    dtype), is then required, and dy is taken as 0 where ``y <= 0``
    (fusednn's relu backward) inside the passes that read dy, for
    grad_input, grad_gamma and grad_beta alike. The mask comes from y
    rather than from x normalized again, so it is exactly the forward's:
    y is what a framework keeps for the next layer anyway.

    ``out``, when given, receives grad_input (x's shape and dtype; it may be
    grad_output or x itself), so that a training loop can reuse one buffer
    instead of allocating, and touching fresh pages for, every call.
    """
    # Ordinary calls in one compiled call, as in batch_norm.
    result = _batch_norm_backward_quick(grad_output, x, gamma, save_mean, save_invstd, axis,
                                        training, activation, y, out, False)
    if result is not None:
        return result
    function = "batch_norm_backward"
    if not isinstance(training, (bool, np.bool_)):
        raise TypeError(f"fusednn.{function}: training must be a bool, "
                        f"not {type(training).__name__}")
    training = bool(training)
    relu = _activation(activation, function)
    if relu and y is None:
        raise TypeError(f"fusednn.{function}: activation='relu' needs y, the forward's output, "
                        "to mask grad_output with")
    if not relu and y is not None:
        raise ValueError(f"fusednn.{function}: y is read only with activation='relu'")
    place = _arrays.locate(function,
                           ("grad_output", "x", "gamma", "save_mean", "save_invstd", "y"),
                           grad_output, x, gamma, save_mean, save_invstd, y)
    grad_output = place.view(grad_output, "grad_output", function)
    x = place.view(x, "x", function)
    _check_gradient_matches(grad_output, x, function)
    if relu:
        y = place.view(y, "y", function)
        if y.shape != x.shape:
            raise ValueError(f"fusednn.{function}: y must have x's shape {x.shape}, "
                             f"got {y.shape}")
        if y.dtype != x.dtype:
            raise TypeError(f"fusednn.{function}: y must have x's dtype {x.dtype}, "
                            f"got {y.dtype}")
    if x.ndim == 0:
        raise ValueError(f"fusednn.{function}: x must have at least one dimension (the channels)")
    ax = _channel_axis(axis, x.ndim, function)
    channels = x.shape[ax]
    gamma = _per_channel(place, gamma, "gamma", channels, function, weights_of=x.dtype)
    if save_mean is None or save_invstd is None:
        raise TypeError(f"fusednn.{function}: save_mean and save_invstd are required "
                        "(batch_norm returns them)")
    save_mean = _per_channel(place, save_mean, "save_mean", channels, function)
    save_invstd = _per_channel(place, save_invstd, "save_invstd", channels, function)
    grad_input = place.output(out, x, function)
    extents, meets = place.meeting_extents(grad_input, grad_output, x, y, gamma, save_mean,
                                           save_invstd)
    if meets[0]:  # some operand's bytes reach into grad_input's: copy those that share it
        out_extent = extents[0]
        grad_output = place.detach(grad_output, grad_input, extents=(extents[1], out_extent))
        x = place.detach(x, grad_input, extents=(extents[2], out_extent))
        if relu:
            y = place.detach(y, grad_input, extents=(extents[3], out_extent))
        gamma, save_mean, save_invstd = (
            place.detach(a, grad_input, elementwise=False, extents=(extent, out_extent))
            for a, extent in zip((gamma, save_mean, save_invstd), extents[4:]))
    grad_output = _channel_viewable(place, grad_output, ax)
    x = _channel_viewable(place, x, ax)
    if relu:
        y = _channel_viewable(place, y, ax)
    statistics = _statistics_dtype(x.dtype)
    grad_gamma = place.empty((channels,), statistics)
    grad_beta = place.empty((channels,), statistics)
    workspace = _workspace(place, x, ax)
    place.backend.batch_norm_backward(grad_output, x, grad_input, gamma, save_mean,
                                      save_invstd, grad_gamma, grad_beta, workspace, ax,
                                      training, y)
    return place.result(grad_input, out), place.result(grad_gamma), place.result(grad_beta)
