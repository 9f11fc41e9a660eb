"""Batch normalization in split phases, for data-parallel training: each
process reduces its own slice of the batch, the processes exchange a few
numbers per channel, and each writes its slice with the statistics of the
whole batch.

Forward, on every rank::

    count, mean, m2 = batch_norm_stats(x)                 # this rank's slice
    (all-gather the counts and the (C,) mean and m2 rows of every rank)
    n, mean, var = batch_norm_combine(counts, means, m2s)  # rank order
    invstd = batch_norm_finalize(mean, var, n, eps=eps,
                                 running_mean=rm, running_var=rv)
    y = batch_norm_apply(x, mean, invstd, gamma, beta)

Backward::

    sum_dy, sum_dy_xhat = batch_norm_backward_reduce(dy, x, mean, invstd)
    (all-reduce both sums over the ranks)
    dx = batch_norm_backward_apply(dy, x, mean, invstd, gamma,
                                   sum_dy, sum_dy_xhat, n)

Per-channel results are float64 whatever x's dtype. With one rank the
phases give what batch_norm and batch_norm_backward give (the fused
one-process kernels, which stay the faster path there). The layers
fusednn.nn.SyncBatchNorm (mpi4py) and fusednn.torch.nn.SyncBatchNorm
(torch.distributed) run these phases; docs/distributed.md has the math and
the determinism rule.
"""
from __future__ import annotations

import collections
import numbers

import numpy as np

from . import _arrays, _backend
from .batchnorm import (_channel_axis, _channel_viewable, _check_gradient_matches, _per_channel,
                        _values_per_channel)

__all__ = ["BatchNormMoments", "BatchNormStats", "batch_norm_apply",
           "batch_norm_backward_apply", "batch_norm_backward_reduce", "batch_norm_combine",
           "batch_norm_finalize", "batch_norm_stats"]

BatchNormStats = collections.namedtuple("BatchNormStats", ["count", "mean", "m2"])
BatchNormStats.__doc__ = """One process's statistics: ``count`` values per channel (an int),
their per-channel ``mean`` and ``m2`` (sum of squared deviations from the
mean), float64 arrays of shape (C,)."""

BatchNormMoments = collections.namedtuple("BatchNormMoments", ["count", "mean", "var"])
BatchNormMoments.__doc__ = """The whole batch's statistics: ``count`` values per channel (an
int), the per-channel ``mean`` and biased variance ``var``, float64 arrays of
shape (C,)."""

_FLOAT64 = np.dtype(np.float64)
_STATISTICS_DTYPES = (np.dtype(np.float32), _FLOAT64)


def _data(place, x, name: str, function: str):
    """x's descriptor: at least one dimension (the channels)."""
    x = place.view(x, name, function)
    if x.ndim == 0:
        raise ValueError(f"fusednn.{function}: {name} must have at least one dimension "
                         "(the channels)")
    return x


def _statistic(place, a, name: str, channels: int, function: str, *, writable: bool = False):
    """A per-channel statistic: float32 or float64, shape (channels,)."""
    if a is None:
        raise TypeError(f"fusednn.{function}: {name} is required")
    a = _per_channel(place, a, name, channels, function, writable=writable)
    if a.dtype not in _STATISTICS_DTYPES:
        raise TypeError(f"fusednn.{function}: {name} has dtype {a.dtype}; it must be float32 "
                        "or float64")
    return a


def _count(count, name: str, function: str, *, minimum: int) -> int:
    if isinstance(count, (bool, np.bool_)) or not isinstance(count, numbers.Integral):
        raise TypeError(f"fusednn.{function}: {name} must be an integer, "
                        f"not {type(count).__name__}")
    if count < minimum:
        raise ValueError(f"fusednn.{function}: {name} must be at least {minimum}, got {count}")
    return int(count)


def _workspace(place, x, axis: int):
    return place.workspace(place.backend.batch_norm_workspace_bytes(
        x.shape, axis, _arrays.dtype_code(x.dtype)))


def batch_norm_stats(x, *, axis=1) -> BatchNormStats:
    """This process's per-channel statistics of x, channel axis ``axis``:
    ``BatchNormStats(count, mean, m2)``, mean and m2 float64 arrays of x's
    library and device. Summed as batch_norm sums (in double around a
    sample of each block, blocks merged in a fixed order), so they are as
    accurate as the one-process statistics and have the same bits for any
    thread count. A slice with no values gives count 0 and zeros. (JAX
    holds float64 only in x64 mode: enable it for JAX arrays.)"""
    function = "batch_norm_stats"
    place = _arrays.locate(function, ("x",), x)
    place.check_result_dtype(_FLOAT64, function)
    x = _data(place, x, "x", function)
    ax = _channel_axis(axis, x.ndim, function)
    x = _channel_viewable(place, x, ax)
    channels = x.shape[ax]
    mean = place.empty((channels,), _FLOAT64)
    m2 = place.empty((channels,), _FLOAT64)
    place.backend.batch_norm_stats(x, mean, m2, _workspace(place, x, ax), ax)
    return BatchNormStats(_values_per_channel(x.shape, ax), place.result(mean),
                          place.result(m2))


def _stats_row(stats: BatchNormStats, row):
    """Fills the 1-D float64 array row (2C + 1 values, of any library that
    takes slice assignment) with this rank's ``[count, mean..., m2...]``,
    the row each rank all-gathers; returns it."""
    channels = (row.shape[0] - 1) // 2
    row[0] = stats.count
    row[1:channels + 1] = stats.mean
    row[channels + 1:] = stats.m2
    return row


def _combine_rows(rows) -> BatchNormMoments:
    """batch_norm_combine of the gathered (R, 2C + 1) rows of _stats_row."""
    channels = (rows.shape[1] - 1) // 2
    return batch_norm_combine(rows[:, 0].tolist(), rows[:, 1:channels + 1],
                              rows[:, channels + 1:])


def _host_counts(counts, function: str) -> list:
    values = counts.tolist() if hasattr(counts, "tolist") else counts
    try:
        values = list(values)
    except TypeError:
        raise TypeError(f"fusednn.{function}: counts must be a sequence of integers, one per "
                        f"rank, not {type(counts).__name__}") from None
    out = []
    for value in values:
        if isinstance(value, float) and value.is_integer():
            value = int(value)  # gathered as a float array
        out.append(_count(value, "every count", function, minimum=0))
    return out


def batch_norm_combine(counts, means, m2s) -> BatchNormMoments:
    """Merges the ranks' statistics into the whole batch's:
    ``BatchNormMoments(count, mean, var)``.

    ``counts``: the values per channel of each of R ranks (a sequence of
    ints, or a 1-D array read back to the host); ``means`` and ``m2s``: the
    ranks' batch_norm_stats rows stacked in rank order, float64 arrays of
    shape (R, C) of one library and device. Chan's parallel formula merges
    the rows in rank order, so the same inputs give the same bits; ranks
    with no values are skipped. ``var`` is the biased variance."""
    function = "batch_norm_combine"
    place = _arrays.locate(function, ("means", "m2s"), means, m2s)
    place.check_result_dtype(_FLOAT64, function)
    means = place.view(means, "means", function)
    m2s = place.view(m2s, "m2s", function)
    counts = _host_counts(counts, function)
    for name, a in (("means", means), ("m2s", m2s)):
        if a.dtype != _FLOAT64:
            raise TypeError(f"fusednn.{function}: {name} has dtype {a.dtype}; it must be "
                            "float64, as batch_norm_stats returns")
        if a.ndim != 2 or a.shape[0] != len(counts):
            raise ValueError(f"fusednn.{function}: {name} has shape {a.shape}; expected "
                             f"({len(counts)}, C), one row per count")
    if means.shape != m2s.shape:
        raise ValueError(f"fusednn.{function}: means and m2s have shapes {means.shape} and "
                         f"{m2s.shape}; they must match")
    total = sum(counts)
    if total == 0:
        raise ValueError(f"fusednn.{function}: every rank has zero values; the batch has no "
                         "statistics")
    channels = means.shape[1]
    mean = place.empty((channels,), _FLOAT64)
    var = place.empty((channels,), _FLOAT64)
    workspace = place.workspace(place.backend.batch_norm_combine_workspace_bytes(len(counts)))
    place.backend.batch_norm_combine([float(c) for c in counts], means, m2s, mean, var,
                                     workspace)
    return BatchNormMoments(total, place.result(mean), place.result(var))


def batch_norm_finalize(mean, var, count, *, eps=1e-5, running_mean=None, running_var=None,
                        momentum=0.1):
    """``invstd = 1 / sqrt(var + eps)`` (float64, for batch_norm_apply and the
    backward phases) from batch_norm_combine's result, and the running
    statistics updated in place as batch_norm's training forward does:
    ``running = (1 - momentum) * running + momentum * batch``, the variance
    with the unbiased ``var * count / (count - 1)`` of the whole batch."""
    function = "batch_norm_finalize"
    place = _arrays.locate(function, ("mean", "var", "running_mean", "running_var"), mean,
                           var, running_mean, running_var)
    place.check_result_dtype(_FLOAT64, function)
    var = place.view(var, "var", function)
    if var.ndim != 1:
        raise ValueError(f"fusednn.{function}: var has shape {var.shape}; expected (C,)")
    channels = var.shape[0]
    mean = _statistic(place, mean, "mean", channels, function)
    var = _statistic(place, var, "var", channels, function)
    eps = _backend.check_real(eps, "eps", function)
    if not eps > 0.0:
        raise ValueError(f"fusednn.{function}: eps must be positive, got {eps}")
    momentum = _backend.check_real(momentum, "momentum", function)
    if not 0.0 <= momentum <= 1.0:
        raise ValueError(f"fusednn.{function}: momentum must be in [0, 1], got {momentum}")
    updates = running_mean is not None or running_var is not None
    count = _count(count, "count", function, minimum=2 if updates else 1)
    running = {}
    for name, a in (("running_mean", running_mean), ("running_var", running_var)):
        if a is not None:
            running[name] = _statistic(place, a, name, channels, function, writable=True)
    _check_separate(place, running, {"mean": mean, "var": var}, function)
    invstd = place.empty((channels,), _FLOAT64)
    place.backend.batch_norm_finalize(mean, var, invstd, running.get("running_mean"),
                                      running.get("running_var"), float(count), eps, momentum)
    return place.result(invstd)


def _check_separate(place, updated: dict, read: dict, function: str) -> None:
    """Arrays updated in place must not share memory with each other, with
    the arrays the call reads, or between their own elements."""
    for name, a in updated.items():
        if not place.c_contiguous(a):  # contiguous views never overlap themselves
            _arrays.check_no_internal_overlap(a, name, function)
        for other_name, other in {**read, **updated}.items():
            if other_name != name and place.may_share_memory(a, other):
                raise ValueError(f"fusednn.{function}: {name} is updated in place but shares "
                                 f"memory with {other_name}; pass separate arrays")


def batch_norm_apply(x, mean, invstd, gamma=None, beta=None, *, axis=1, out=None):
    """``y = (x - mean) * invstd * gamma + beta`` with given per-channel
    statistics (float32 or float64; the whole batch's in data-parallel
    training). gamma/beta default to ones/zeros and must have x's dtype
    (or float32 for float16 and bfloat16 x).
    ``out``, when given, receives y (it may be x itself)."""
    function = "batch_norm_apply"
    place = _arrays.locate(function, ("x", "mean", "invstd", "gamma", "beta"), x, mean,
                           invstd, gamma, beta)
    x = _data(place, x, "x", function)
    ax = _channel_axis(axis, x.ndim, function)
    channels = x.shape[ax]
    mean = _statistic(place, mean, "mean", channels, function)
    invstd = _statistic(place, invstd, "invstd", channels, function)
    gamma = _per_channel(place, gamma, "gamma", channels, function, weights_of=x.dtype)
    beta = _per_channel(place, beta, "beta", channels, function, weights_of=x.dtype)
    y = place.output(out, x, function)
    x = _channel_viewable(place, place.detach(x, y), ax)
    mean, invstd, gamma, beta = (place.detach(a, y, elementwise=False)
                                 for a in (mean, invstd, gamma, beta))
    place.backend.batch_norm_apply(x, y, mean, invstd, gamma, beta, _workspace(place, x, ax), ax)
    return place.result(y, out)


def _gradient_operands(place, grad_output, x, mean, invstd, axis, function: str):
    grad_output = _data(place, grad_output, "grad_output", function)
    x = _data(place, x, "x", function)
    _check_gradient_matches(grad_output, x, function)
    ax = _channel_axis(axis, x.ndim, function)
    channels = x.shape[ax]
    mean = _statistic(place, mean, "mean", channels, function)
    invstd = _statistic(place, invstd, "invstd", channels, function)
    return grad_output, x, mean, invstd, ax, channels


def batch_norm_backward_reduce(grad_output, x, mean, invstd, *, axis=1):
    """This process's backward sums: ``(sum_dy, sum_dy_xhat)`` per channel,
    float64, with ``xhat = (x - mean) * invstd`` for the given (whole
    batch's) statistics. After an all-reduce over the ranks they are the
    batch's grad_beta and grad_gamma, and batch_norm_backward_apply's
    inputs."""
    function = "batch_norm_backward_reduce"
    place = _arrays.locate(function, ("grad_output", "x", "mean", "invstd"), grad_output, x,
                           mean, invstd)
    place.check_result_dtype(_FLOAT64, function)
    grad_output, x, mean, invstd, ax, channels = _gradient_operands(
        place, grad_output, x, mean, invstd, axis, function)
    grad_output = _channel_viewable(place, grad_output, ax)
    x = _channel_viewable(place, x, ax)
    sum_dy = place.empty((channels,), _FLOAT64)
    sum_dy_xhat = place.empty((channels,), _FLOAT64)
    place.backend.batch_norm_backward_reduce(grad_output, x, mean, invstd, sum_dy, sum_dy_xhat,
                                             _workspace(place, x, ax), ax)
    return place.result(sum_dy), place.result(sum_dy_xhat)


def batch_norm_backward_apply(grad_output, x, mean, invstd, gamma, sum_dy, sum_dy_xhat, count,
                              *, axis=1, out=None):
    """grad_input of training-mode batch norm over the whole batch:
    ``gamma * invstd / n * (n * dy - sum_dy - xhat * sum_dy_xhat)`` with
    ``n = count`` values per channel in the whole batch (batch_norm_combine's
    count) and the all-reduced sums. gamma=None means ones. ``out``, when
    given, receives grad_input (it may be grad_output or x itself)."""
    function = "batch_norm_backward_apply"
    place = _arrays.locate(function, ("grad_output", "x", "mean", "invstd", "gamma", "sum_dy",
                                      "sum_dy_xhat"),
                           grad_output, x, mean, invstd, gamma, sum_dy, sum_dy_xhat)
    grad_output, x, mean, invstd, ax, channels = _gradient_operands(
        place, grad_output, x, mean, invstd, axis, function)
    gamma = _per_channel(place, gamma, "gamma", channels, function, weights_of=x.dtype)
    sum_dy = _statistic(place, sum_dy, "sum_dy", channels, function)
    sum_dy_xhat = _statistic(place, sum_dy_xhat, "sum_dy_xhat", channels, function)
    count = _count(count, "count", function, minimum=1)
    grad_input = place.output(out, x, function)
    grad_output = _channel_viewable(place, place.detach(grad_output, grad_input), ax)
    x = _channel_viewable(place, place.detach(x, grad_input), ax)
    mean, invstd, gamma, sum_dy, sum_dy_xhat = (
        place.detach(a, grad_input, elementwise=False)
        for a in (mean, invstd, gamma, sum_dy, sum_dy_xhat))
    place.backend.batch_norm_backward_apply(grad_output, x, grad_input, mean, invstd, gamma,
                                            sum_dy, sum_dy_xhat, float(count),
                                            _workspace(place, x, ax), ax)
    return place.result(grad_input, out)
