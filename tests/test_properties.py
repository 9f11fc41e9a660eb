"""Property-based tests over every public function: hypothesis draws the
dtype (byte order and unsupported dtypes included), the shape (0-d, empty,
odd sizes, up to four dimensions), the layout (contiguous, transposed,
strided with negative steps, unaligned), the parameters (edge values
included) and ``out`` (none, fresh, strided, in place, overlapping an input,
with elements that share memory). Each call must either match
``fusednn.reference`` within the documented bounds and leave its inputs
unchanged, or raise TypeError/ValueError with ``out`` untouched, and the
test knows in advance which of the two a draw deserves.

The array library is drawn too (numpy, torch, JAX where installed): every
function must give the numpy call's bits in the caller's library.

The default profile ("ci", registered in conftest.py) keeps the run short;
``--hypothesis-profile=thorough`` draws 10,000 examples per test.
"""
from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, note
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp
from numpy.lib.stride_tricks import as_strided

import fusednn as fn
from fusednn import reference as ref

from conftest import (LIBRARY_CALLS, PARAM_SETS, accepts_output, check_backward_x,
                      check_backward_y, check_forward, flat_results, library_call_data)

SUPPORTED = (np.float32, np.float64)
UNSUPPORTED = (np.int32, np.complex64, np.uint8)


# ---- building arrays of any layout that hold given values ---------------------------


@st.composite
def shapes(draw, min_dims=0, max_dims=4, min_side=0, max_side=5):
    return draw(hnp.array_shapes(min_dims=min_dims, max_dims=max_dims, min_side=min_side,
                                 max_side=max_side))


def float_values(dtype, *, finite=False, max_magnitude=None, subnormal=True):
    width = 32 if np.dtype(dtype) == np.float32 else 64
    if max_magnitude is not None:
        # hypothesis wants bounds that the width can hold exactly
        max_magnitude = float(np.asarray(max_magnitude).astype(dtype))
    if max_magnitude is None:
        return st.floats(width=width, allow_nan=not finite, allow_infinity=not finite,
                         allow_subnormal=subnormal)
    bounded = st.floats(-max_magnitude, max_magnitude, width=width, allow_subnormal=subnormal)
    if finite:
        return bounded
    return st.one_of(bounded, st.sampled_from([math.nan, math.inf, -math.inf]))


@st.composite
def placed(draw, values: np.ndarray, *, layouts=("contiguous", "transposed", "strided",
                                                 "unaligned", "swapped")):
    """An array equal to `values` (shape, dtype, elements) laid out in memory
    as one of `layouts`; "unaligned" and "swapped" (non-native byte order)
    are copied once by the kernels, the others are read in place."""
    layout = draw(st.sampled_from(layouts))
    note(f"layout {layout}")
    if layout == "contiguous" or values.ndim == 0 and layout in ("transposed", "strided"):
        return values.copy()
    if layout == "transposed":
        order = draw(st.permutations(range(values.ndim)))
        inverse = np.argsort(order)
        return np.ascontiguousarray(values.transpose(order)).transpose(inverse)
    if layout == "strided":
        steps = [draw(st.sampled_from([1, 2, 3, -1, -2])) for _ in range(values.ndim)]
        big = np.zeros([max(1, n) * abs(s) for n, s in zip(values.shape, steps)], values.dtype)
        view = big[tuple(slice(None, None, s) if s > 0 else slice(None, None, s)
                         for s in steps)]
        view = view[tuple(slice(0, n) for n in values.shape)]
        view[...] = values
        return view
    if layout == "unaligned":
        raw = np.zeros(values.nbytes + values.itemsize, np.uint8)
        view = raw[1:1 + values.nbytes].view(values.dtype).reshape(values.shape)
        view[...] = values
        return view
    return values.astype(values.dtype.newbyteorder())  # "swapped"


@st.composite
def arrays(draw, dtype, shape, *, finite=False, max_magnitude=None, layouts=None):
    values = draw(hnp.arrays(dtype, shape, elements=float_values(
        dtype, finite=finite, max_magnitude=max_magnitude)))
    kwargs = {} if layouts is None else {"layouts": layouts}
    return draw(placed(values, **kwargs))


def brute_force_overlap(a: np.ndarray) -> bool:
    """Whether two elements of a share memory, address by address."""
    offsets = [sum(i * s for i, s in zip(index, a.strides)) for index in np.ndindex(*a.shape)]
    return len(set(offsets)) < len(offsets)


@st.composite
def outs(draw, like: np.ndarray, *, allow_in_place=True, allow_shifted=True):
    """(kind, out) for an output of like's shape and dtype: None, a fresh
    array (maybe strided), `like` itself, a view of like's buffer shifted by
    a few elements (when like is contiguous), or a view whose elements share
    memory."""
    kinds = ["none", "fresh", "strided", "self_overlap"]
    if allow_in_place:
        kinds.append("in_place")
    if allow_shifted and like.ndim > 0 and like.flags.c_contiguous and like.size > 1:
        kinds.append("shifted")
    kind = draw(st.sampled_from(kinds))
    note(f"out {kind}")
    dtype = like.dtype.newbyteorder("=")
    if kind == "none":
        return kind, None
    if kind == "fresh":
        return kind, np.full(like.shape, 7.0, dtype)
    if kind == "strided":
        big = np.full([2 * n for n in like.shape], 7.0, dtype)
        return kind, big[(Ellipsis, *(slice(None, None, 2) for _ in like.shape))]
    if kind == "in_place":
        return kind, like
    if kind == "shifted":
        return kind, None  # built by the caller, which owns the shared buffer
    # self_overlap: some dimension (or all) repeats the same bytes
    buffer = np.full(max(1, like.size), 7.0, dtype)
    strides = [draw(st.sampled_from([0, dtype.itemsize])) for _ in like.shape]
    return kind, as_strided(buffer, shape=like.shape, strides=strides)


def shifted_pair(values: np.ndarray, shift: int):
    """(x, out): x holds `values`, out is x's buffer moved by `shift`
    elements (either way), both contiguous views of one buffer."""
    n = values.size
    buffer = np.zeros(n + abs(shift), values.dtype.newbyteorder("="))
    if shift > 0:
        x, out = buffer[shift:], buffer[:n]
    else:
        x, out = buffer[:n], buffer[-shift:]
    x = x.reshape(values.shape)
    x[...] = values
    return x, out.reshape(values.shape)


def expect_outcome(out_kind, out, x, *, dtype_ok=True):
    """'type', 'value' or 'ok': what a call writing `out` must do."""
    if not dtype_ok:
        return "type"
    if out_kind == "self_overlap" and brute_force_overlap(out):
        return "value"
    if out_kind == "in_place" and (not x.dtype.isnative or not x.flags.aligned):
        return "value"
    return "ok"


def run_expecting(outcome, call, out):
    """Runs call(); checks it raises for 'type'/'value' with out unchanged,
    and returns its result for 'ok'."""
    if outcome == "ok":
        return call()
    snapshot = None if out is None else np.array(out, copy=True)
    error = TypeError if outcome == "type" else ValueError
    with pytest.raises(error):
        call()
    if snapshot is not None:
        np.testing.assert_array_equal(out, snapshot)
    return None


def assert_unchanged(before: np.ndarray, after: np.ndarray):
    np.testing.assert_array_equal(after, before)


# ---- activations ------------------------------------------------------------------


dtypes = st.sampled_from(SUPPORTED)


@given(data=st.data())
def test_activation_forward(data):
    name, params = data.draw(st.sampled_from(PARAM_SETS), label="activation")
    dtype = data.draw(dtypes)
    shape = data.draw(shapes())
    x = data.draw(arrays(dtype, shape))
    out_kind, out = data.draw(outs(x))
    if out_kind == "shifted":
        x, out = shifted_pair(x, data.draw(st.sampled_from([1, 2, -1, -5])))
    x_before = np.array(x, copy=True)
    outcome = expect_outcome(out_kind, out, x)
    y = run_expecting(outcome, lambda: fn.activation(name, x, out=out, **params), out)
    if y is None:
        return
    if out is not None:
        assert y is out
    assert y.shape == x_before.shape and y.dtype == x_before.dtype.newbyteorder("=")
    check_forward(name, params, x_before, np.asarray(y, y.dtype.newbyteorder("=")))
    if out_kind not in ("in_place", "shifted"):
        assert_unchanged(x_before, x)


@given(data=st.data())
def test_activation_backward(data):
    name, params = data.draw(st.sampled_from(PARAM_SETS), label="activation")
    dtype = data.draw(dtypes)
    shape = data.draw(shapes())
    from_y = accepts_output(name, params) and data.draw(st.booleans(), label="from y")
    x = data.draw(hnp.arrays(dtype, shape, elements=float_values(dtype)))
    saved = fn.activation(name, x, **params) if from_y else x
    saved = data.draw(placed(saved))
    g = data.draw(arrays(dtype, shape, max_magnitude=1e6))
    out_kind, out = data.draw(outs(g))
    if out_kind == "shifted":
        g, out = shifted_pair(g, data.draw(st.sampled_from([1, -2])))
    g_before, saved_before = np.array(g, copy=True), np.array(saved, copy=True)
    outcome = expect_outcome(out_kind, out, g)
    keyword = {"y": saved} if from_y else {"x": saved}
    gi = run_expecting(outcome, lambda: fn.activation_backward(name, g, out=out, **keyword,
                                                               **params), out)
    if gi is None:
        return
    gi = np.asarray(gi, gi.dtype.newbyteorder("="))
    if from_y:
        check_backward_y(name, params, g_before, saved_before, gi)
    else:
        check_backward_x(name, params, g_before, saved_before, gi)
    assert_unchanged(saved_before, saved)
    if out_kind not in ("in_place", "shifted"):
        assert_unchanged(g_before, g)


@given(data=st.data())
def test_unsupported_dtypes_raise_type_error(data):
    dtype = data.draw(st.sampled_from(UNSUPPORTED))
    x = np.zeros(data.draw(shapes(max_dims=2)), dtype)
    function = data.draw(st.sampled_from(["relu", "batch_norm", "dropout", "backward"]))
    with pytest.raises(TypeError, match="float32"):
        if function == "relu":
            fn.relu(x)
        elif function == "batch_norm":
            fn.batch_norm(x.reshape(-1, 1) if x.ndim == 0 else x)
        elif function == "dropout":
            fn.dropout(x, 0.5, seed=1)
        else:
            fn.activation_backward("tanh", x, y=x)


# ---- batch normalization ------------------------------------------------------------


def per_channel(data, channels, dtype, *, positive=False):
    """gamma, beta or statistics: finite, without subnormals (a subnormal
    gamma makes every coefficient it scales subnormal, and results then
    differ from the reference by a few hundred subnormal units, which no
    relative bound describes)."""
    values = np.abs(data.draw(hnp.arrays(dtype, channels, elements=float_values(
        dtype, finite=True, max_magnitude=1e3, subnormal=False))))
    # float64 values below 1e-150 are flushed: the backward forms
    # gamma * invstd^2 * ... in double, which for gamma near 1e-305 falls
    # into double's subnormals (docs/batchnorm.md)
    values[values < (1e-150 if np.dtype(dtype) == np.float64 else 0)] = 0
    if not positive:
        values = values * data.draw(hnp.arrays(dtype, channels,
                                               elements=st.sampled_from([-1.0, 1.0])))
    return data.draw(placed(values.astype(dtype), layouts=("contiguous", "strided")))


def batch_norm_tolerance(dtype, x64, expected, gamma, beta, shape, axis):
    """The error bound of y: few roundings of gamma * xhat + beta at the
    scale of the channel's largest |xhat| (the statistics' own rounding is a
    fraction of the spread, which every element of the channel inherits),
    plus the mean's own error (it is a double, a few 2^-53 of |mean|, which
    both the kernels and the reference carry; not below the smallest
    subnormal) scaled by gamma * invstd, and the rounding of gamma * invstd itself, which is
    subnormal for tiny gamma."""
    info = np.finfo(dtype)
    eps = 4e-6 if np.dtype(dtype) == np.float32 else 1e-13
    others = tuple(d for d in range(x64.ndim) if d != axis % x64.ndim)
    gamma64 = 1.0 if gamma is None else np.abs(np.asarray(gamma, np.float64)).reshape(shape)
    beta64 = 0.0 if beta is None else np.abs(np.asarray(beta, np.float64)).reshape(shape)
    xhat = np.abs(x64 - expected.save_mean.reshape(shape)) * np.abs(
        expected.save_invstd).reshape(shape)
    widest = np.nanmax(np.where(np.isfinite(xhat), xhat, 0.0), axis=others, keepdims=True,
                       initial=0.0)
    scale = np.abs(expected.y) + gamma64 * widest + beta64
    mean_error = np.abs(expected.save_mean) * 2.0 ** -50 + float(info.smallest_subnormal)
    gain = (np.abs(expected.save_invstd) * mean_error).reshape(shape) * gamma64
    tiny = float(info.smallest_subnormal)
    # a subnormal gamma * invstd is off by up to half a subnormal, times x - mean
    deviation = np.abs(x64 - expected.save_mean.reshape(shape))
    return eps * scale + gain + tiny * (2 * np.where(np.isfinite(deviation), deviation, 0) + 1)


@given(data=st.data())
def test_batch_norm(data):
    dtype = data.draw(dtypes)
    shape = data.draw(shapes(min_dims=1, max_dims=4, min_side=1))
    axis = data.draw(st.integers(-len(shape), len(shape) - 1))
    channels = shape[axis]
    magnitude = data.draw(st.sampled_from([1.0, 1e3, 1e19, 1e30]))
    x = data.draw(arrays(dtype, shape, finite=True, max_magnitude=magnitude * 1e4 if
                         dtype == np.float64 else 3e38))
    training = data.draw(st.booleans())
    gamma = per_channel(data, channels, dtype) if data.draw(st.booleans()) else None
    beta = per_channel(data, channels, dtype) if data.draw(st.booleans()) else None
    stats_dtype = data.draw(dtypes)
    with_stats = not training or data.draw(st.booleans())
    running_mean = per_channel(data, channels, stats_dtype) if with_stats else None
    running_var = per_channel(data, channels, stats_dtype, positive=True) if with_stats else None
    momentum = data.draw(st.sampled_from([0.0, 0.1, 1.0, 0.5]))
    eps = data.draw(st.sampled_from([1e-5, 1e-30, 1.0]))
    out_kind, out = data.draw(outs(x, allow_shifted=False))
    m = math.prod(shape) // channels
    outcome = expect_outcome(out_kind, out, x)
    if outcome == "ok" and training and m < 2:
        outcome = "value"
    if outcome == "ok" and training and running_mean is not None and (
            not running_mean.dtype.isnative or not running_mean.flags.aligned):
        outcome = "value"
    inputs = [a for a in (x, gamma, beta, running_mean, running_var) if a is not None]
    before = [np.array(a, copy=True) for a in inputs]
    ref_mean = None if running_mean is None else np.array(running_mean, np.float64)
    ref_var = None if running_var is None else np.array(running_var, np.float64)
    result = run_expecting(outcome, lambda: fn.batch_norm(
        x, gamma, beta, running_mean, running_var, training=training, momentum=momentum, eps=eps,
        axis=axis, out=out), out)
    if result is None:
        for a, b in zip(inputs, before):
            np.testing.assert_array_equal(a, b)
        return
    expected = ref.batch_norm(before[0], gamma, beta, ref_mean, ref_var, training=training,
                              momentum=momentum, eps=eps, axis=axis)
    y = np.asarray(result.y, np.float64)
    broadcast = [1] * len(shape)
    broadcast[axis % len(shape)] = channels
    with np.errstate(all="ignore"):
        tol = batch_norm_tolerance(dtype, np.asarray(before[0], np.float64), expected, gamma,
                                   beta, broadcast, axis)
    with np.errstate(invalid="ignore"):
        good = (np.abs(y - expected.y) <= tol) | (np.isnan(y) & np.isnan(expected.y))
    if not training:
        # inference: (x - mean) * invstd may round past the float32 range
        good |= np.isinf(y) & (np.abs(expected.y) > np.finfo(dtype).max / 2)
    assert good.all(), (y[~good][:4], expected.y[~good][:4])
    # invstd's relative error: a few roundings, plus the mean's own error
    # (2^-50 of |mean|) over sqrt(var + eps), which counts for data whose
    # spread is at the scale of the mean's last bits
    with np.errstate(all="ignore"):
        allowed = 2e-6 + 8 * np.abs(expected.save_mean) * 2.0 ** -50 * np.abs(
            expected.save_invstd)
    invstd_error = np.abs(result.save_invstd - expected.save_invstd)
    assert np.all((invstd_error <= allowed * np.abs(expected.save_invstd))
                  | (np.isnan(result.save_invstd) & np.isnan(expected.save_invstd)))
    if training and running_mean is not None:
        # the update rounded once to the statistics' dtype (past its range: infinite)
        with np.errstate(over="ignore"):
            want_mean, want_var = (a.astype(stats_dtype) for a in (ref_mean, ref_var))
        # the batch mean is resolved to a few 2^-53 of the channel's largest
        # |x| (cancellation between huge values of both signs), in the
        # kernels and the reference alike
        others = tuple(d for d in range(len(shape)) if d != axis % len(shape))
        largest = np.abs(np.asarray(before[0], np.float64)).max(axis=others)
        np.testing.assert_allclose(running_mean, want_mean, rtol=2e-6,
                                   atol=1e-6 * np.abs(ref_mean).max(initial=0)
                                   + momentum * 2.0 ** -48 * largest.max() + 1e-30)
        np.testing.assert_allclose(running_var, want_var, rtol=2e-6, atol=1e-30)
    if out_kind != "in_place":
        np.testing.assert_array_equal(x, before[0])


@given(data=st.data())
def test_batch_norm_split_phases(data):
    """A batch cut into slices along a non-channel dimension, each slice
    reduced on its own and the statistics combined: y within the
    one-process bound of the float64 reference on the whole batch."""
    dtype = data.draw(dtypes)
    shape = data.draw(shapes(min_dims=2, max_dims=4, min_side=1))
    axis = data.draw(st.integers(-len(shape), len(shape) - 1))
    cut_dim = 1 if axis % len(shape) == 0 else 0
    x = data.draw(arrays(dtype, shape, finite=True, max_magnitude=1e6))
    channels = shape[axis]
    if math.prod(shape) // channels < 2:
        return
    gamma = per_channel(data, channels, dtype) if data.draw(st.booleans()) else None
    bounds = sorted(data.draw(st.lists(st.integers(0, shape[cut_dim]), max_size=3)))
    edges = [0, *bounds, shape[cut_dim]]
    slices = [np.take(x, range(lo, hi), axis=cut_dim) for lo, hi in zip(edges, edges[1:])]
    stats = [fn.batch_norm_stats(s, axis=axis) for s in slices]
    merged = fn.batch_norm_combine([s.count for s in stats], np.stack([s.mean for s in stats]),
                                   np.stack([s.m2 for s in stats]))
    invstd = fn.batch_norm_finalize(merged.mean, merged.var, merged.count)
    y = np.concatenate([np.asarray(fn.batch_norm_apply(s, merged.mean, invstd, gamma, axis=axis))
                        for s in slices], axis=cut_dim).astype(np.float64)
    x64 = np.asarray(x, np.float64)
    expected = ref.batch_norm(x64, gamma, axis=axis)
    broadcast = [1] * len(shape)
    broadcast[axis % len(shape)] = channels
    tol = batch_norm_tolerance(dtype, x64, expected, gamma, None, broadcast, axis)
    assert np.all(np.abs(y - expected.y) <= tol), np.max(np.abs(y - expected.y) - tol)


@given(data=st.data())
def test_batch_norm_backward(data):
    dtype = data.draw(dtypes)
    shape = data.draw(shapes(min_dims=1, max_dims=4, min_side=1))
    axis = data.draw(st.integers(-len(shape), len(shape) - 1))
    channels = shape[axis]
    x = data.draw(arrays(dtype, shape, finite=True, max_magnitude=1e6))
    # no subnormal gradients: the coefficients they make (sum(dy) and
    # sum(dy * (x - mean)) scaled) round at the subnormal grid, and their
    # errors compound past any bound stated in units of the result
    g = data.draw(placed(data.draw(hnp.arrays(dtype, shape, elements=float_values(
        dtype, finite=True, max_magnitude=1e3, subnormal=False)))))
    training = data.draw(st.booleans())
    gamma = per_channel(data, channels, dtype) if data.draw(st.booleans()) else None
    m = math.prod(shape) // channels
    if training and m >= 2:
        forward = fn.batch_norm(np.asarray(x, x.dtype.newbyteorder("=")), axis=axis)
        save_mean, save_invstd = forward.save_mean, forward.save_invstd
    else:
        save_mean = per_channel(data, channels, dtype)
        save_invstd = per_channel(data, channels, dtype, positive=True)
    out_kind, out = data.draw(outs(g, allow_shifted=False))
    outcome = expect_outcome(out_kind, out, g)
    before = [np.array(a, copy=True) for a in (g, x)]
    result = run_expecting(outcome, lambda: fn.batch_norm_backward(
        g, x, gamma, save_mean, save_invstd, axis=axis, training=training, out=out), out)
    if result is None:
        return
    gi, gg, gb = (np.asarray(a, np.float64) for a in result)
    ei, eg, eb = ref.batch_norm_backward(before[0], before[1], gamma, save_mean, save_invstd,
                                         axis=axis, training=training)
    eps = 2e-5 if np.dtype(dtype) == np.float32 else 1e-11
    # Relative to the size of the formula's terms, each a product of few
    # roundings: |a| (|dy| + |sum dy| / m + |xhat| |sum dy xhat| / m).
    axis_ = axis % len(shape)
    broadcast = [1] * len(shape)
    broadcast[axis_] = channels
    others = tuple(d for d in range(len(shape)) if d != axis_)
    gamma64 = np.ones(channels) if gamma is None else np.asarray(gamma, np.float64)
    invstd64 = np.asarray(save_invstd, np.float64)
    dy = before[0].astype(np.float64)
    xhat = (before[1].astype(np.float64) - np.asarray(save_mean, np.float64).reshape(
        broadcast)) * invstd64.reshape(broadcast)
    terms = np.abs(dy)
    if training:
        terms = terms + (np.abs(dy.sum(axis=others)).reshape(broadcast)
                         + np.abs(xhat) * np.abs((dy * xhat).sum(axis=others)).reshape(
                             broadcast)) / m
    scale_i = np.abs(gamma64 * invstd64).reshape(broadcast) * terms
    # plus the roundings of subnormal coefficients (a, e, k of a * dy - e -
    # k * xhat, subnormal when dy or invstd is tiny), each off by up to half
    # a subnormal and then multiplied by dy, 1 or xhat
    floor = 4 * float(np.finfo(dtype).smallest_subnormal) * (1 + np.abs(dy) + np.abs(xhat))
    assert np.all(np.abs(gi - ei) <= eps * scale_i + floor), np.max(np.abs(gi - ei) - eps * scale_i)
    per_sum = np.abs(before[0]).astype(np.float64).sum() + 1e-30
    # grad_gamma and grad_beta are stored in x's dtype: plus its rounding
    # of a result below its smallest subnormal
    np.testing.assert_allclose(gb, eb, rtol=0, atol=eps * per_sum + floor.max(initial=0))
    xhat_bound = np.abs(np.asarray(save_invstd, np.float64)).max() * (
        np.abs(before[1]).max(initial=0) + np.abs(np.asarray(save_mean, np.float64)).max())
    np.testing.assert_allclose(gg, eg, rtol=0,
                               atol=eps * per_sum * (xhat_bound + 1e-30) + floor.max(initial=0))
    if out_kind != "in_place":
        np.testing.assert_array_equal(g, before[0])
    np.testing.assert_array_equal(x, before[1])


# ---- dropout and the fused epilogue ---------------------------------------------------


probabilities = st.one_of(st.sampled_from([0.0, 1.0, 0.5, 2.0**-32, 1 - 2.0**-32]),
                          st.floats(0.0, 1.0))
counters = st.one_of(st.sampled_from([0, 1, 2**32 - 1, 2**32, 2**64 - 1]),
                     st.integers(0, 2**64 - 1))


@given(data=st.data())
def test_dropout(data):
    dtype = data.draw(dtypes)
    x = data.draw(arrays(dtype, data.draw(shapes())))
    p = data.draw(probabilities)
    seed, offset = data.draw(counters), data.draw(counters)
    training = data.draw(st.booleans())
    out_kind, out = data.draw(outs(x))
    if out_kind == "shifted":
        x, out = shifted_pair(x, data.draw(st.sampled_from([1, -3])))
    x_before = np.array(x, copy=True)
    outcome = expect_outcome(out_kind, out, x)
    result = run_expecting(outcome, lambda: fn.dropout(x, p, seed=seed, offset=offset,
                                                       training=training, return_mask=True,
                                                       out=out), out)
    if result is None:
        return
    y, mask = result
    expected, expected_mask = ref.dropout(x_before, p, seed=seed, offset=offset,
                                          training=training, return_mask=True)
    np.testing.assert_array_equal(mask, expected_mask)
    y = np.asarray(y, y.dtype.newbyteorder("="))
    with np.errstate(over="ignore"):
        # x * (1 / keep) rounded once: within one ulp of x / keep
        np.testing.assert_array_max_ulp(y, expected.astype(y.dtype), maxulp=1)
    if out_kind not in ("in_place", "shifted"):
        assert_unchanged(x_before, x)


@given(data=st.data())
def test_dropout_backward(data):
    dtype = data.draw(dtypes)
    g = data.draw(arrays(dtype, data.draw(shapes())))
    p = data.draw(probabilities)
    seed, offset = data.draw(counters), data.draw(counters)
    by_mask = data.draw(st.booleans())
    out_kind, out = data.draw(outs(g, allow_shifted=False))
    mask = fn.dropout_mask(g.shape, p, seed=seed, offset=offset) if by_mask else None
    if by_mask and out is not None and out_kind == "fresh" and out.nbytes >= mask.nbytes:
        # the mask stored in out's own bytes
        inside = out.reshape(-1).view(np.uint8)[:mask.size]
        inside[...] = mask
        mask = inside
    g_before = np.array(g, copy=True)
    mask_before = None if mask is None else mask.copy()
    outcome = expect_outcome(out_kind, out, g)
    source = {"mask": mask} if by_mask else {"seed": seed, "offset": offset}
    result = run_expecting(outcome, lambda: fn.dropout_backward(g, p, out=out, **source), out)
    if result is None:
        return
    expected = ref.dropout_backward(g_before, p, mask=mask_before, seed=None if by_mask else seed,
                                    offset=offset)
    result = np.asarray(result, result.dtype.newbyteorder("="))
    with np.errstate(over="ignore"):
        np.testing.assert_array_max_ulp(result, expected.astype(result.dtype), maxulp=1)
    if out_kind != "in_place":
        assert_unchanged(g_before, g)


@given(shape=shapes(max_side=9), p=probabilities, seed=counters, offset=counters)
def test_dropout_mask(shape, p, seed, offset):
    mask = fn.dropout_mask(shape, p, seed=seed, offset=offset)
    np.testing.assert_array_equal(mask, ref.dropout_mask(shape, p, seed=seed, offset=offset))


@given(data=st.data())
def test_bias_act_dropout(data):
    name, params = data.draw(st.sampled_from(PARAM_SETS), label="activation")
    dtype = data.draw(dtypes)
    shape = data.draw(shapes(min_dims=1))
    axis = data.draw(st.integers(-len(shape), len(shape) - 1))
    h = data.draw(arrays(dtype, shape))
    bias = data.draw(arrays(dtype, (shape[axis],), layouts=("contiguous", "strided")))
    p = data.draw(probabilities)
    seed, offset = data.draw(counters), data.draw(counters)
    out_kind, out = data.draw(outs(h, allow_shifted=False))
    h_before, bias_before = np.array(h, copy=True), np.array(bias, copy=True)
    outcome = expect_outcome(out_kind, out, h)
    result = run_expecting(outcome, lambda: fn.bias_act_dropout(
        h, bias, name, p, seed=seed, offset=offset, axis=axis, out=out, **params), out)
    if result is None:
        return
    # The fused kernel gives the bits of the separate kernels (h + bias is
    # one rounding either way); those are held to the reference elsewhere.
    broadcast = [1] * len(shape)
    broadcast[axis] = -1
    with np.errstate(all="ignore"):
        z = (h_before.astype(h_before.dtype.newbyteorder("="))
             + bias_before.astype(h_before.dtype.newbyteorder("=")).reshape(broadcast))
    separate = fn.dropout(fn.activation(name, z, **params), p, seed=seed, offset=offset)
    np.testing.assert_array_equal(result, separate)
    assert_unchanged(bias_before, bias)
    if out_kind != "in_place":
        assert_unchanged(h_before, h)


@given(data=st.data())
def test_bias_act_dropout_backward(data):
    name, params = data.draw(st.sampled_from(PARAM_SETS), label="activation")
    dtype = data.draw(dtypes)
    shape = data.draw(shapes(min_dims=1))
    axis = data.draw(st.integers(-len(shape), len(shape) - 1))
    h = data.draw(arrays(dtype, shape, finite=True, max_magnitude=1e4))
    g = data.draw(arrays(dtype, shape, finite=True, max_magnitude=1e3))
    bias = data.draw(arrays(dtype, (shape[axis],), finite=True, max_magnitude=1e4,
                            layouts=("contiguous", "strided")))
    p = data.draw(probabilities)
    seed, offset = data.draw(counters), data.draw(counters)
    by_mask = data.draw(st.booleans())
    mask = fn.dropout_mask(shape, p, seed=seed, offset=offset) if by_mask else None
    kind = data.draw(st.sampled_from(["none", "fresh", "in_place", "mask_inside"]))
    native = g.dtype.isnative and g.flags.aligned and g.flags.c_contiguous
    out = {"none": None, "in_place": g}.get(kind, np.zeros(shape, g.dtype.newbyteorder("=")))
    if kind == "mask_inside" and by_mask and out.nbytes >= mask.nbytes:
        inside = out.reshape(-1).view(np.uint8)[-mask.size:] if mask.size else mask
        inside[...] = mask
        mask = inside
    source = {"mask": mask} if by_mask else {"seed": seed, "offset": offset}
    g_before, h_before = np.array(g, copy=True), np.array(h, copy=True)
    outcome = "value" if kind == "in_place" and not native else "ok"
    result = run_expecting(outcome, lambda: fn.bias_act_dropout_backward(
        g, h, bias, name, p, axis=axis, out=out, **source, **params), out)
    if result is None:
        return
    grad_h, grad_bias = result
    broadcast = [1] * len(shape)
    broadcast[axis] = -1
    native_dtype = h_before.dtype.newbyteorder("=")
    z = h_before.astype(native_dtype) + np.asarray(bias, native_dtype).reshape(broadcast)
    separate = fn.activation_backward(
        name, fn.dropout_backward(g_before.astype(native_dtype), p, seed=seed, offset=offset),
        x=z, **params)
    np.testing.assert_array_equal(grad_h, separate)
    others = tuple(d for d in range(len(shape)) if d != axis % len(shape))
    exact_sum = separate.astype(np.float64).sum(axis=others)
    # summation in another order: up to n roundings of the running sum
    summed = math.prod(shape) // max(1, shape[axis]) + 2
    bound = np.abs(separate.astype(np.float64)).sum(axis=others) * np.finfo(dtype).eps * summed
    assert np.all(np.abs(grad_bias - exact_sum) <= bound + 1e-300)
    np.testing.assert_array_equal(h, h_before)


# ---- the array library ----------------------------------------------------------------


def _available_libraries() -> list:
    libraries = ["numpy"]
    for name in ("torch", "jax"):
        try:
            __import__(name)
        except ImportError:
            continue
        libraries.append(name)
    return libraries


LIBRARIES = _available_libraries()


def _maker(library):
    """(make, to_numpy, scope): how a draw's numpy arrays become the
    library's, without a copy where the library can view them (torch), and
    the scope in which the library keeps float64 (JAX's x64)."""
    import contextlib
    if library == "torch":
        import torch
        return torch.from_numpy, lambda r: r.numpy(), contextlib.nullcontext()
    if library == "jax":
        import jax
        return jax.numpy.asarray, np.asarray, jax.enable_x64(True)
    return (lambda a: a), (lambda r: r), contextlib.nullcontext()


@given(data=st.data())
def test_every_library_gives_the_numpy_bits(data):
    """The library drawn (numpy, torch, JAX) changes nothing but the type of
    the results: the same bits as the numpy call, for every public function,
    any supported dtype, contiguous and transposed layouts, non-finite
    values included."""
    library = data.draw(st.sampled_from(LIBRARIES), label="library")
    call = data.draw(st.sampled_from(sorted(LIBRARY_CALLS)), label="call")
    dtype = data.draw(st.sampled_from(SUPPORTED), label="dtype")
    shape = (data.draw(st.integers(2, 7)), data.draw(st.integers(1, 6)))
    values = data.draw(hnp.arrays(dtype, shape, elements=float_values(dtype)))
    x = data.draw(placed(values, layouts=("contiguous", "transposed")))
    arrays = library_call_data(x, seed=data.draw(st.integers(0, 3)))
    expected = flat_results(LIBRARY_CALLS[call](lambda a: a, arrays))
    make, to_numpy, scope = _maker(library)
    with scope:
        got = flat_results(LIBRARY_CALLS[call](make, arrays))
    assert len(got) == len(expected)
    for g, e in zip(got, expected):
        g = to_numpy(g)
        assert g.dtype == e.dtype and g.shape == e.shape
        np.testing.assert_array_equal(g, e)
