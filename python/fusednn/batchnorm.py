"""Batch normalization on numpy arrays (CPU kernels): the training and
inference forward pass and the training backward pass, over any channel
axis (NC, NCL, NCHW, NCDHW with axis=1; channels-last with axis=-1).

Everything is validated here before a kernel runs, so bad input raises
without touching ``out`` or the running statistics. See docs/batchnorm.md
for the conventions (which follow PyTorch) and the numerics.
"""
from __future__ import annotations

import numbers

import numpy as np

from . import _backend
from ._backend import _cpu
from .reference import BatchNormResult

__all__ = ["BatchNormResult", "batch_norm", "batch_norm_backward"]


def _channel_axis(axis, ndim: int, function: str) -> int:
    if isinstance(axis, bool) or not isinstance(axis, numbers.Integral):
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
    if dtype is not None and a.dtype.newbyteorder("=") != dtype:
        raise TypeError(f"fusednn.{function}: {name} has dtype {a.dtype}; it must match "
                        f"x's dtype {np.dtype(dtype)}")
    if a.shape != (channels,):
        raise ValueError(f"fusednn.{function}: {name} has shape {a.shape}; expected "
                         f"({channels},), one value per channel")
    if writable:
        if not a.flags.writeable:
            raise ValueError(f"fusednn.{function}: {name} is read-only but is updated in place")
        if not a.dtype.isnative or not a.flags.aligned:
            raise ValueError(f"fusednn.{function}: {name} is updated in place and must be "
                             "aligned and in native byte order")
        return a
    return _backend.as_cpu_array(a, name, function)


def _merges(shape, strides) -> bool:
    """Whether these dimensions form one strided extent."""
    dims = [(n, s) for n, s in zip(shape, strides) if n != 1]
    return all(s == s_next * n_next for (_, s), (n_next, s_next) in zip(dims, dims[1:]))


def _channel_viewable(x: np.ndarray, axis: int) -> np.ndarray:
    """x itself when the dimensions before and after the channel axis each
    merge into one strided extent (what the reductions walk), else one
    contiguous copy."""
    if x.size == 0 or (_merges(x.shape[:axis], x.strides[:axis])
                       and _merges(x.shape[axis + 1:], x.strides[axis + 1:])):
        return x
    return np.ascontiguousarray(x)


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
    the running ones in inference), in x's dtype.
    """
    function = "batch_norm"
    x = _backend.as_cpu_array(x, "x", function)
    if x.ndim == 0:
        raise ValueError(f"fusednn.{function}: x must have at least one dimension (the channels)")
    ax = _channel_axis(axis, x.ndim, function)
    if not isinstance(training, (bool, np.bool_)):
        raise TypeError(f"fusednn.{function}: training must be a bool, "
                        f"not {type(training).__name__}")
    training = bool(training)
    momentum = _backend.check_real(momentum, "momentum", function)
    if not 0.0 <= momentum <= 1.0:
        raise ValueError(f"fusednn.{function}: momentum must be in [0, 1], got {momentum}")
    eps = _backend.check_real(eps, "eps", function)
    if eps <= 0.0:
        raise ValueError(f"fusednn.{function}: eps must be positive, got {eps}")
    channels = x.shape[ax]
    per_channel = x.size // channels if channels else int(np.prod(x.shape[:ax] + x.shape[ax + 1:]))
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
    x = _channel_viewable(_backend.detach_from_out(x, out), ax)
    save_mean = np.empty(channels, dtype=x.dtype)
    save_invstd = np.empty(channels, dtype=x.dtype)
    _cpu.batch_norm_forward(x, out, gamma, beta, running_mean, running_var, save_mean,
                            save_invstd, training, momentum, eps, ax)
    return BatchNormResult(out, save_mean, save_invstd)


def batch_norm_backward(grad_output, x, gamma, save_mean, save_invstd, *, axis=1):
    """Gradients of training-mode batch_norm (batch statistics).

    ``save_mean`` and ``save_invstd`` are what batch_norm returned (float32
    or float64; pass float64 for full accuracy when a channel's mean is
    thousands of times its spread). gamma=None means ones. Returns
    ``(grad_input, grad_gamma, grad_beta)`` with
    ``grad_input = gamma * invstd / m * (m * dy - sum(dy) - xhat * sum(dy * xhat))``,
    ``grad_gamma = sum(dy * xhat)`` and ``grad_beta = sum(dy)``.
    """
    function = "batch_norm_backward"
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
    grad_output = _channel_viewable(grad_output, ax)
    x = _channel_viewable(x, ax)
    grad_input = np.empty(x.shape, dtype=x.dtype)
    grad_gamma = np.empty(channels, dtype=x.dtype)
    grad_beta = np.empty(channels, dtype=x.dtype)
    _cpu.batch_norm_backward(grad_output, x, grad_input, gamma, save_mean, save_invstd,
                             grad_gamma, grad_beta, ax)
    return grad_input, grad_gamma, grad_beta
