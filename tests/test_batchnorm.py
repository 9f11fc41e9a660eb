"""Tests of fn.batch_norm and fn.batch_norm_backward on the CPU: every
channel layout against the float64 reference (ordinary data and channels
whose mean is 1e4 times their spread), the reference's gradients against
finite differences, running statistics, determinism across thread counts
and SIMD paths, out= and strided arrays, edge sizes, and bad input that
must leave out and the running statistics untouched.
"""
from __future__ import annotations

import numpy as np
import pytest

import fusednn as fn
from fusednn import _cpu
from fusednn import reference as ref
from conftest import numeric_gradient

DTYPES = (np.float32, np.float64)
# y and grad_input tolerance: absolute, on outputs of order one.
TOL = {np.float32: 1e-5, np.float64: 1e-12}

# (shape, axis): NC, NCL, NCHW, NCDHW, channels-last, other axes, and
# shapes whose reductions span several units (inner beyond one unit, more
# channels than one channels-last block, many outer blocks).
LAYOUTS = [
    ((16, 5), 1),
    ((4, 3, 7), 1),
    ((2, 3, 5, 6), 1),
    ((2, 3, 4, 5, 6), 1),
    ((2, 5, 6, 3), -1),
    ((3, 4, 5), 0),
    ((2, 3, 4, 5, 6), 2),
    ((7, 1, 9), 1),
    ((1, 2, 70001), 1),
    ((900, 300), -1),
    ((3, 700, 2), 1),
    ((3, 2, 100001), 1),
]


def _data(shape, axis, dtype, seed=0, loc=1.0, scale=3.0):
    rng = np.random.default_rng(seed)
    channels = shape[axis]
    bshape = [1] * len(shape)
    bshape[axis] = channels
    centers = rng.uniform(-2, 2, channels).reshape(bshape) * loc
    x = (rng.standard_normal(shape) * scale + centers).astype(dtype)
    gamma = rng.uniform(0.5, 1.5, channels).astype(dtype)
    beta = rng.standard_normal(channels).astype(dtype)
    return x, gamma, beta


def _check_close(actual, expected, dtype, scale=1.0):
    assert actual.dtype == dtype
    expected = np.asarray(expected, dtype=np.float64)
    assert np.all(np.isfinite(actual))
    err = np.max(np.abs(actual.astype(np.float64) - expected), initial=0.0)
    assert err <= TOL[dtype] * scale, err


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape,axis", LAYOUTS)
def test_training_forward_matches_reference(shape, axis, dtype):
    x, gamma, beta = _data(shape, axis, dtype)
    channels = shape[axis]
    rm, rv = np.zeros(channels, dtype), np.ones(channels, dtype)
    rm_ref, rv_ref = np.zeros(channels), np.ones(channels)
    result = fn.batch_norm(x, gamma, beta, rm, rv, axis=axis)
    expected = ref.batch_norm(x, gamma, beta, rm_ref, rv_ref, axis=axis)
    assert isinstance(result, fn.BatchNormResult)
    _check_close(result.y, expected.y, dtype, scale=2.0)
    _check_close(result.save_mean, expected.save_mean, dtype, scale=np.abs(expected.save_mean).max())
    np.testing.assert_allclose(result.save_invstd, expected.save_invstd, rtol=TOL[dtype])
    np.testing.assert_allclose(rm, rm_ref, rtol=1e-6, atol=1e-6 * np.abs(rm_ref).max())
    np.testing.assert_allclose(rv, rv_ref, rtol=1e-6)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape,axis", LAYOUTS[:6])
def test_inference_forward_matches_reference(shape, axis, dtype):
    x, gamma, beta = _data(shape, axis, dtype)
    rng = np.random.default_rng(1)
    rm = rng.standard_normal(shape[axis]).astype(dtype)
    rv = rng.uniform(0.5, 9.0, shape[axis]).astype(dtype)
    before = rm.copy(), rv.copy()
    result = fn.batch_norm(x, gamma, beta, rm, rv, training=False, axis=axis, eps=1e-3)
    expected = ref.batch_norm(x, gamma, beta, rm, rv, training=False, axis=axis, eps=1e-3)
    _check_close(result.y, expected.y, dtype, scale=4.0)
    # In inference the returned statistics are the ones used: the running
    # mean and 1 / sqrt(running_var + eps).
    np.testing.assert_array_equal(result.save_mean, rm)
    np.testing.assert_allclose(result.save_invstd, 1 / np.sqrt(rv.astype(np.float64) + 1e-3),
                               rtol=TOL[dtype])
    np.testing.assert_array_equal(rm, before[0])
    np.testing.assert_array_equal(rv, before[1])


@pytest.mark.parametrize("shape,axis", [((8, 6, 500), 1), ((4000, 6), -1), ((1, 3, 70001), 1)])
def test_float32_accurate_when_mean_is_1e4_times_std(shape, axis):
    x, _, _ = _data(shape, axis, np.float32, loc=5e3, scale=1.0)
    mean = x.astype(np.float64).mean(axis=tuple(d for d in range(x.ndim) if d != axis % x.ndim))
    assert np.abs(mean).max() > 5e3  # the case PyTorch's CPU kernel gets wrong by ~8e-4
    result = fn.batch_norm(x, axis=axis)
    expected = ref.batch_norm(x, axis=axis)
    _check_close(result.y, expected.y, np.float32)
    # The backward is as accurate when handed float64 statistics.
    dy = np.random.default_rng(2).standard_normal(shape).astype(np.float32)
    grads = fn.batch_norm_backward(dy, x, None, expected.save_mean, expected.save_invstd, axis=axis)
    expected_grads = ref.batch_norm_backward(dy, x, None, expected.save_mean,
                                             expected.save_invstd, axis=axis)
    _check_close(grads[0], expected_grads[0], np.float32, scale=10.0)


def test_statistics_are_stable_for_an_outlying_first_sample():
    x = np.random.default_rng(3).standard_normal((4000, 2))
    x[0] += 1e6
    result = fn.batch_norm(x, axis=-1)
    expected = ref.batch_norm(x, axis=-1)
    _check_close(result.y, expected.y, np.float64)


@pytest.mark.parametrize("shape,axis", [((5, 3), 1), ((2, 3, 4), 1), ((3, 2, 2, 3), -1)])
def test_reference_gradients_match_finite_differences(shape, axis):
    x, gamma, beta = _data(shape, axis, np.float64)
    weights = np.random.default_rng(4).standard_normal(shape)

    def loss():
        return float(np.sum(ref.batch_norm(x, gamma, beta, axis=axis).y * weights))

    forward = ref.batch_norm(x, gamma, beta, axis=axis)
    grad_x, grad_gamma, grad_beta = ref.batch_norm_backward(
        weights, x, gamma, forward.save_mean, forward.save_invstd, axis=axis)
    np.testing.assert_allclose(grad_x, numeric_gradient(loss, x), rtol=1e-6, atol=1e-8)
    np.testing.assert_allclose(grad_gamma, numeric_gradient(loss, gamma), rtol=1e-6, atol=1e-8)
    np.testing.assert_allclose(grad_beta, numeric_gradient(loss, beta), rtol=1e-6, atol=1e-8)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("with_gamma", [True, False])
@pytest.mark.parametrize("shape,axis", LAYOUTS)
def test_backward_matches_reference(shape, axis, dtype, with_gamma):
    x, gamma, _ = _data(shape, axis, dtype)
    gamma = gamma if with_gamma else None
    dy = np.random.default_rng(5).standard_normal(shape).astype(dtype)
    forward = fn.batch_norm(x, gamma, axis=axis)
    grads = fn.batch_norm_backward(dy, x, gamma, forward.save_mean, forward.save_invstd, axis=axis)
    expected = ref.batch_norm_backward(dy, x, gamma, forward.save_mean, forward.save_invstd,
                                       axis=axis)
    m = x.size // shape[axis]
    _check_close(grads[0], expected[0], dtype, scale=2.0)
    # grad_gamma and grad_beta are sums of m terms of order one.
    _check_close(grads[1], expected[1], dtype, scale=np.sqrt(m))
    _check_close(grads[2], expected[2], dtype, scale=np.sqrt(m))


def test_running_statistics_conventions():
    x, _, _ = _data((50, 4), 1, np.float64)
    m = x.shape[0]
    rm, rv = np.full(4, 2.0), np.full(4, 3.0)
    fn.batch_norm(x, running_mean=rm, running_var=rv, momentum=0.25)
    np.testing.assert_allclose(rm, 0.75 * 2.0 + 0.25 * x.mean(0), rtol=1e-14)
    np.testing.assert_allclose(rv, 0.75 * 3.0 + 0.25 * x.var(0) * m / (m - 1), rtol=1e-14)
    # momentum 0 keeps the running statistics, 1 replaces them.
    fn.batch_norm(x, running_mean=rm, running_var=rv, momentum=0.0)
    np.testing.assert_allclose(rm, 0.75 * 2.0 + 0.25 * x.mean(0), rtol=1e-14)
    fn.batch_norm(x, running_mean=rm, running_var=rv, momentum=1.0)
    np.testing.assert_allclose(rm, x.mean(0), rtol=1e-14)
    np.testing.assert_allclose(rv, x.var(0, ddof=1), rtol=1e-14)


@pytest.mark.parametrize("running_dtype", DTYPES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_running_statistics_keep_their_dtype(dtype, running_dtype):
    x, _, _ = _data((30, 3, 4), 1, dtype)
    rm, rv = np.zeros(3, running_dtype), np.ones(3, running_dtype)
    result = fn.batch_norm(x, running_mean=rm, running_var=rv)
    assert rm.dtype == running_dtype and rv.dtype == running_dtype
    assert result.save_mean.dtype == dtype and result.save_invstd.dtype == dtype
    expected_rm, expected_rv = np.zeros(3), np.ones(3)
    ref.batch_norm(x, running_mean=expected_rm, running_var=expected_rv)
    np.testing.assert_allclose(rm, expected_rm, rtol=1e-6)
    np.testing.assert_allclose(rv, expected_rv, rtol=1e-6)
    y = fn.batch_norm(x, running_mean=rm, running_var=rv, training=False).y
    assert y.dtype == dtype


def _all_outputs(x, dy, axis):
    channels = x.shape[axis]
    rm, rv = np.zeros(channels, x.dtype), np.ones(channels, x.dtype)
    result = fn.batch_norm(x, None, None, rm, rv, axis=axis)
    grads = fn.batch_norm_backward(dy, x, None, result.save_mean, result.save_invstd, axis=axis)
    return [*result, rm, rv, *grads]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape,axis", [((6, 5, 30001), 1), ((40000, 37), -1), ((3, 300, 7), 1),
                                        ((3, 3, 100001), 1)])
def test_same_bits_for_any_thread_count_and_simd_path(shape, axis, dtype, restore_settings):
    x, _, _ = _data(shape, axis, dtype)
    dy = np.random.default_rng(6).standard_normal(shape).astype(dtype)
    fn.set_num_threads(1)
    _cpu.set_simd("generic")
    baseline = _all_outputs(x, dy, axis)
    for path in _cpu.available_simd():
        _cpu.set_simd(path)
        for threads in (1, 2, 3):
            fn.set_num_threads(threads)
            for got, want in zip(_all_outputs(x, dy, axis), baseline):
                np.testing.assert_array_equal(got.view(np.uint8), want.view(np.uint8))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(6, 5, 30001), (40, 7, 33)])
def test_cached_and_two_pass_loops_give_the_same_bits(shape, dtype, restore_settings):
    # Contiguous rows let a channel be reduced and written in one cached
    # step; rows with a stride take the two-pass loop. Both sum the same
    # units in the same order.
    x, _, _ = _data(shape, 1, dtype)
    dy = np.random.default_rng(8).standard_normal(shape).astype(dtype)
    strided_x = np.empty((*shape, 2), dtype)[..., 0]
    strided_dy = np.empty((*shape, 2), dtype)[..., 0]
    strided_x[...] = x
    strided_dy[...] = dy
    for threads in (1, 2):
        fn.set_num_threads(threads)
        for got, want in zip(_all_outputs(strided_x, strided_dy, 1), _all_outputs(x, dy, 1)):
            np.testing.assert_array_equal(got.view(np.uint8), want.view(np.uint8))


# Channels-last training batches that fit the threads' caches split into one
# band of rows per thread: each thread sums its band, the coefficients are
# made once from every band's sums, and each thread writes its band. The
# bands sum the two-pass loop's units in its order: same bits for any thread
# count, and for callers the pool runs one task after another (a second
# caller while the pool is busy). 37 channels leave a remainder past the
# vector blocks; 300 span two channel blocks.
BANDED = [(16, 32, 32, 32), (4000, 37), (2000, 300)]


def _relu_outputs(x, dy, gamma, beta):
    result = fn.batch_norm(x, gamma, beta, axis=-1, activation="relu")
    grads = fn.batch_norm_backward(dy, x, gamma, result.save_mean, result.save_invstd, axis=-1,
                                   activation="relu", y=result.y)
    return [*result, *grads]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", BANDED)
def test_banded_channels_last_gives_the_bits_of_one_thread(shape, dtype, restore_settings):
    x, gamma, beta = _data(shape, -1, dtype)
    dy = np.random.default_rng(9).standard_normal(shape).astype(dtype)
    fn.set_num_threads(1)
    baseline = _relu_outputs(x, dy, gamma, beta) + _all_outputs(x, dy, -1)
    strided = np.empty((*shape[:-1], 2 * shape[-1]), dtype)[..., ::2]
    strided[...] = x
    for threads in (2, 3):
        fn.set_num_threads(threads)
        got = _relu_outputs(x, dy, gamma, beta) + _all_outputs(x, dy, -1)
        for g, w in zip(got, baseline):
            np.testing.assert_array_equal(g.view(np.uint8), w.view(np.uint8))
    # Channels apart (a strided view) take the two-pass loops.
    for g, w in zip(_all_outputs(strided, dy, -1), baseline[6:]):
        np.testing.assert_array_equal(g.view(np.uint8), w.view(np.uint8))


def _assert_concurrent_callers_agree(outputs, x, dy, gamma, beta):
    """Four threads calling at once on 2 pool threads get the bits of one caller alone."""
    import threading
    fn.set_num_threads(2)
    baseline = outputs(x, dy, gamma, beta)
    failures = []

    def work():
        for _ in range(5):
            got = outputs(x, dy, gamma, beta)
            if any(g.tobytes() != w.tobytes() for g, w in zip(got, baseline)):
                failures.append(1)

    threads = [threading.Thread(target=work) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not any(t.is_alive() for t in threads)
    assert not failures


def test_banded_channels_last_with_concurrent_callers(restore_settings):
    x, gamma, beta = _data(BANDED[0], -1, np.float32)
    dy = np.random.default_rng(10).standard_normal(BANDED[0]).astype(np.float32)
    _assert_concurrent_callers_agree(_relu_outputs, x, dy, gamma, beta)


# Channels-last batches whose rows all fall in one unit (up to 256 rows of
# 256 channels or more) share the unit's rows out among threads: each
# thread sums its rows, the first thread's sums take the others' partial
# sums in row order, and each thread writes the rows it read. The
# additions are one thread's, in its order: same bits for any thread
# count, in place too, and where a float32 partial overflows (a channel
# summed again in double) or meets a NaN. 1030 channels leave a
# remainder past the vector blocks and 200 rows a partial row block.
SHARED_UNIT = [(256, 1024), (200, 1030)]


@pytest.mark.parametrize("dtype", [*DTYPES, np.float16])
@pytest.mark.parametrize("shape", SHARED_UNIT)
def test_shared_unit_gives_the_bits_of_one_thread(shape, dtype, restore_settings):
    x, gamma, beta = _data(shape, -1, dtype)
    dy = np.random.default_rng(11).standard_normal(shape).astype(dtype)
    wild = x.copy()
    if dtype == np.float32:
        wild[:, 3] *= np.float32(1e25)
    wild[7, 5] = np.nan

    def outputs():
        in_place = x.copy()
        fn.batch_norm(in_place, gamma, beta, axis=-1, out=in_place)
        return [*_relu_outputs(x, dy, gamma, beta), *_all_outputs(x, dy, -1),
                *_all_outputs(wild, dy, -1), in_place]

    fn.set_num_threads(1)
    baseline = outputs()
    for threads in (2, 3):
        fn.set_num_threads(threads)
        for got, want in zip(outputs(), baseline):
            np.testing.assert_array_equal(got.view(np.uint8), want.view(np.uint8))


def test_shared_unit_with_concurrent_callers(restore_settings):
    x, gamma, beta = _data(SHARED_UNIT[0], -1, np.float32)
    dy = np.random.default_rng(12).standard_normal(SHARED_UNIT[0]).astype(np.float32)
    _assert_concurrent_callers_agree(_relu_outputs, x, dy, gamma, beta)


# Batches with the channel axis inside (NCHW) whose channels fit a core's
# cache are reduced and written in bands of channels, each band walked in
# memory order (an image's rows of the band, then the next image's); rows
# with a stride take the two-pass loops, one channel at a time. Both sum
# the same units in the same order: same bits at any thread count, fused
# ReLU or not, and for concurrent callers. (3, 700, 2) has rows shorter
# than the lanes; (5, 37, 7, 9) bands of uneven size.
CHANNEL_BANDS = [(16, 128, 8, 8), (8, 64, 16, 16), (5, 37, 7, 9), (3, 700, 2)]


def _channel_band_outputs(x, dy, gamma, beta):
    result = fn.batch_norm(x, gamma, beta, axis=1, activation="relu")
    grads = fn.batch_norm_backward(dy, x, gamma, result.save_mean, result.save_invstd, axis=1,
                                   activation="relu", y=result.y)
    return [*result, *grads] + _all_outputs(x, dy, 1)


def _strided_twin(a):
    twin = np.empty((*a.shape, 2), a.dtype)[..., 0]
    twin[...] = a
    return twin


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", CHANNEL_BANDS)
def test_channel_bands_give_the_bits_of_the_two_pass_loops(shape, dtype, restore_settings):
    x, gamma, beta = _data(shape, 1, dtype)
    dy = np.random.default_rng(11).standard_normal(shape).astype(dtype)
    fn.set_num_threads(1)
    baseline = _channel_band_outputs(_strided_twin(x), _strided_twin(dy), gamma, beta)
    for threads in (1, 2, 3):
        fn.set_num_threads(threads)
        for got, want in zip(_channel_band_outputs(x, dy, gamma, beta), baseline):
            np.testing.assert_array_equal(got.view(np.uint8), want.view(np.uint8))


def test_channel_bands_with_concurrent_callers(restore_settings):
    x, gamma, beta = _data(CHANNEL_BANDS[0], 1, np.float32)
    dy = np.random.default_rng(12).standard_normal(CHANNEL_BANDS[0]).astype(np.float32)
    _assert_concurrent_callers_agree(_channel_band_outputs, x, dy, gamma, beta)


# Outputs of 16 MiB and more are streamed a 64-byte line at a time from
# registers; rows of 45 x 45 make lines cross channel boundaries, and 24
# channels make channels-last lines run past the end of the repeated
# coefficients.
STREAMED = [((70, 32, 45, 45), 1), ((12_000, 15, 24), -1)]


@pytest.mark.parametrize("shape,axis", STREAMED)
def test_streamed_lines_give_the_bits_of_the_strided_loop(shape, axis):
    x, gamma, beta = _data(shape, axis, np.float32)
    assert x.nbytes >= 16 << 20
    dy = np.random.default_rng(3).standard_normal(shape).astype(np.float32)
    channels = shape[axis]
    running_mean = np.linspace(-1, 1, channels).astype(np.float32)
    running_var = np.linspace(0.5, 2, channels).astype(np.float32)
    # Contiguous outputs one element past a 64-byte boundary (an unaligned
    # head), and strided outputs, which the elementwise loop writes.
    flat = np.empty(x.size + 16, np.float32)
    contiguous = flat[1 : x.size + 1].reshape(shape)
    strided = np.empty((*shape, 2), np.float32)[..., 0]
    for training in (False, True):
        for out in (contiguous, strided):
            fn.batch_norm(x, gamma, beta, running_mean.copy(), running_var.copy(),
                          training=training, axis=axis, out=out)
        np.testing.assert_array_equal(contiguous.view(np.uint32), strided.view(np.uint32))
    stats = fn.batch_norm(x, gamma, beta, axis=axis)
    for out in (contiguous, strided):
        fn.batch_norm_backward(dy, x, gamma, stats.save_mean, stats.save_invstd, axis=axis,
                               out=out)
    np.testing.assert_array_equal(contiguous.view(np.uint32), strided.view(np.uint32))


@pytest.mark.parametrize("dtype", DTYPES)
def test_out_is_written_and_returned(dtype):
    x, gamma, beta = _data((4, 3, 5, 5), 1, dtype)
    out = np.full_like(x, np.nan)
    result = fn.batch_norm(x, gamma, beta, out=out)
    assert result.y is out
    _check_close(out, ref.batch_norm(x, gamma, beta).y, dtype, scale=2.0)


@pytest.mark.parametrize("axis", [1, -1])
def test_strided_out_is_written_in_place(axis):
    x, gamma, beta = _data((4, 6, 5, 6), axis, np.float64)
    base = np.zeros((4, 6, 10, 7))
    out = base[:, :, ::2, 1:]
    fn.batch_norm(x, gamma, beta, axis=axis, out=out)
    _check_close(out, ref.batch_norm(x, gamma, beta, axis=axis).y, np.float64, scale=2.0)
    assert np.all(base[:, :, 1::2] == 0) and np.all(base[..., 0] == 0)


def test_in_place():
    x, gamma, beta = _data((8, 4, 9), 1, np.float32)
    expected = ref.batch_norm(x, gamma, beta).y
    fn.batch_norm(x, gamma, beta, out=x)
    _check_close(x, expected, np.float32, scale=2.0)


@pytest.mark.parametrize("view", ["slice", "transpose", "fortran", "reversed", "channel_slice"])
@pytest.mark.parametrize("axis", [1, -1])
def test_non_contiguous_inputs(view, axis):
    x, _, _ = _data((6, 8, 10, 12), 1, np.float32)
    dy = np.random.default_rng(7).standard_normal(x.shape).astype(np.float32)
    make = {
        "slice": lambda a: a[:, :, ::2, 1:],
        "transpose": lambda a: a.transpose(0, 3, 2, 1),
        "fortran": np.asfortranarray,
        "reversed": lambda a: a[::-1, :, :, ::-1],
        "channel_slice": lambda a: a[:, ::2],
    }[view]
    xv, dyv = make(x), make(dy)
    gamma = np.linspace(0.5, 1.5, xv.shape[axis]).astype(np.float32)
    result = fn.batch_norm(xv, gamma, axis=axis)
    expected = ref.batch_norm(xv, gamma, axis=axis)
    _check_close(result.y, expected.y, np.float32, scale=2.0)
    grads = fn.batch_norm_backward(dyv, xv, gamma, result.save_mean, result.save_invstd, axis=axis)
    expected_grads = ref.batch_norm_backward(dyv, xv, gamma, result.save_mean, result.save_invstd,
                                             axis=axis)
    _check_close(grads[0], expected_grads[0], np.float32, scale=2.0)
    _check_close(grads[1], expected_grads[1], np.float32, scale=30.0)


def test_nan_stays_in_its_channel():
    x, gamma, beta = _data((6, 4, 5), 1, np.float32)
    x[2, 1, 3] = np.nan
    rm, rv = np.zeros(4, np.float32), np.ones(4, np.float32)
    result = fn.batch_norm(x, gamma, beta, rm, rv)
    assert np.all(np.isnan(result.y[:, 1]))
    assert np.isnan(rm[1]) and np.isnan(rv[1])
    others = [0, 2, 3]
    _check_close(result.y[:, others], ref.batch_norm(x[:, others], gamma[others], beta[others]).y,
                 np.float32, scale=2.0)
    assert np.all(np.isfinite(rm[others])) and np.all(np.isfinite(rv[others]))
    dy = np.ones_like(x)
    grad_x, grad_gamma, grad_beta = fn.batch_norm_backward(dy, x, gamma, result.save_mean,
                                                           result.save_invstd)
    assert np.all(np.isnan(grad_x[:, 1])) and np.all(np.isfinite(grad_x[:, others]))
    assert np.isnan(grad_gamma[1]) and np.all(np.isfinite(grad_gamma[others]))


@pytest.mark.parametrize("shape,axis", [((5, 0, 3), 1), ((0, 3), -1), ((0, 3, 4), 1)])
def test_empty_in_inference(shape, axis):
    channels = shape[axis]
    x = np.zeros(shape, np.float32)
    rm, rv = np.arange(channels, dtype=np.float32), np.full(channels, 4.0, np.float32)
    result = fn.batch_norm(x, running_mean=rm, running_var=rv, training=False, axis=axis)
    assert result.y.shape == shape
    np.testing.assert_array_equal(result.save_mean, rm)
    grads = fn.batch_norm_backward(x, x, None, rm, rv, axis=axis)
    assert grads[0].shape == shape
    np.testing.assert_array_equal(grads[1], np.zeros(channels, np.float32))
    np.testing.assert_array_equal(grads[2], np.zeros(channels, np.float32))


def test_zero_channels_in_training():
    result = fn.batch_norm(np.zeros((4, 0, 3)))
    assert result.y.shape == (4, 0, 3) and result.save_mean.shape == (0,)


def test_one_channel_and_one_dimension():
    x = np.random.default_rng(8).standard_normal((50, 1))
    _check_close(fn.batch_norm(x, axis=-1).y, ref.batch_norm(x, axis=-1).y, np.float64)
    # A 1-D array is one value per channel: inference only.
    v = np.arange(4.0)
    rm, rv = np.ones(4), np.full(4, 4.0)
    y = fn.batch_norm(v, running_mean=rm, running_var=rv, training=False, axis=0, eps=1e-12).y
    np.testing.assert_allclose(y, (v - 1) / 2, rtol=1e-12)
    with pytest.raises(ValueError, match="more than one value per channel"):
        fn.batch_norm(v, axis=0)


def _bad_calls():
    """(label, arguments replacing those of a good call, the exception)."""
    f32 = np.float32
    return [
        ("gamma length", {"gamma": np.ones(3, f32)}, ValueError),
        ("beta length", {"beta": np.ones(5, f32)}, ValueError),
        ("gamma 2-d", {"gamma": np.ones((1, 4), f32)}, ValueError),
        ("gamma dtype", {"gamma": np.ones(4)}, TypeError),
        ("beta dtype", {"beta": np.ones(4, np.int32)}, TypeError),
        ("gamma list", {"gamma": [1.0] * 4}, TypeError),
        ("running_mean length", {"running_mean": np.zeros(3, f32)}, ValueError),
        ("running_var dtype", {"running_var": np.ones(4, np.int32)}, TypeError),
        ("eps zero", {"eps": 0.0}, ValueError),
        ("eps negative", {"eps": -1e-5}, ValueError),
        ("eps nan", {"eps": float("nan")}, ValueError),
        ("momentum above one", {"momentum": 1.5}, ValueError),
        ("momentum negative", {"momentum": -0.1}, ValueError),
        ("momentum string", {"momentum": "0.1"}, TypeError),
        ("axis out of range", {"axis": 4}, ValueError),
        ("axis negative out of range", {"axis": -5}, ValueError),
        ("axis float", {"axis": 1.0}, TypeError),
        ("training not bool", {"training": "yes"}, TypeError),
        ("out shape", {"out": np.zeros((2, 4, 3), f32)}, ValueError),
        ("out dtype", {"out": np.zeros((2, 4, 3, 3))}, ValueError),
        ("x dtype", {"x": np.zeros((2, 4, 3, 3), np.int64)}, TypeError),
        ("one value per channel", {"x": np.zeros((1, 4, 1, 1), f32), "out": None}, ValueError),
        ("inference without running stats",
         {"training": False, "running_var": None}, ValueError),
    ]


@pytest.mark.parametrize("label,override,error", _bad_calls(), ids=[c[0] for c in _bad_calls()])
def test_bad_input_raises_and_changes_nothing(label, override, error):
    x, gamma, beta = _data((2, 4, 3, 3), 1, np.float32)
    kwargs = {"x": x, "gamma": gamma, "beta": beta,
              "running_mean": np.zeros(4, np.float32), "running_var": np.ones(4, np.float32),
              "out": np.full(x.shape, 7.0, np.float32)}
    kwargs.update(override)
    snapshots = {k: v.copy() for k, v in kwargs.items() if isinstance(v, np.ndarray)}
    with pytest.raises(error):
        fn.batch_norm(**kwargs)
    for k, before in snapshots.items():
        np.testing.assert_array_equal(kwargs[k], before, err_msg=k)


@pytest.mark.parametrize("name", ["running_mean", "running_var", "out"])
def test_read_only_outputs_are_rejected_before_writing(name):
    x, _, _ = _data((5, 4), 1, np.float32)
    arrays = {"running_mean": np.zeros(4, np.float32), "running_var": np.ones(4, np.float32),
              "out": np.full(x.shape, 7.0, np.float32)}
    snapshots = {k: v.copy() for k, v in arrays.items()}
    arrays[name].flags.writeable = False
    with pytest.raises(ValueError, match="read-only"):
        fn.batch_norm(x, **arrays)
    for k, before in snapshots.items():
        np.testing.assert_array_equal(arrays[k], before)


def test_read_only_running_stats_are_fine_in_inference():
    x, _, _ = _data((5, 4), 1, np.float32)
    rm, rv = np.zeros(4, np.float32), np.ones(4, np.float32)
    rm.flags.writeable = rv.flags.writeable = False
    fn.batch_norm(x, running_mean=rm, running_var=rv, training=False)


def test_bad_backward_input():
    x, gamma, _ = _data((6, 4, 3), 1, np.float32)
    result = fn.batch_norm(x, gamma)
    good = (np.ones_like(x), x, gamma, result.save_mean, result.save_invstd)
    with pytest.raises(ValueError):
        fn.batch_norm_backward(np.ones((6, 4)), *good[1:])
    with pytest.raises(TypeError):
        fn.batch_norm_backward(np.ones(x.shape), *good[1:])
    with pytest.raises(TypeError):
        fn.batch_norm_backward(*good[:2], gamma.astype(np.float64), *good[3:])
    with pytest.raises(ValueError):
        fn.batch_norm_backward(*good[:3], result.save_mean[:3], good[4])
    with pytest.raises(TypeError):
        fn.batch_norm_backward(*good[:3], None, good[4])
    with pytest.raises(ValueError):
        fn.batch_norm_backward(*good, axis=3)


def _backward_out_case(axis):
    """(base, gamma, dy, x, forward result, expected gradients) for the
    backward out= tests: x is a copy of base's first 5 samples, so that an
    out of base[1:] can overlap a view x = base[:5] with the same values."""
    shape = (5, 4, 6, 3) if axis == 1 else (5, 6, 3, 4)
    base, gamma, _ = _data((6, *shape[1:]), axis, np.float64)
    dy = np.random.default_rng(9).standard_normal(shape)
    x = base[:5].copy()
    result = fn.batch_norm(x, gamma, axis=axis)
    expected = ref.batch_norm_backward(dy, x, gamma, result.save_mean, result.save_invstd,
                                       axis=axis)
    return base, gamma, dy, x, result, expected


@pytest.mark.parametrize("axis", [1, -1])
@pytest.mark.parametrize("target", ["fresh", "strided", "grad_output", "x", "overlapping"])
def test_backward_out(target, axis):
    base, gamma, dy, x, result, expected = _backward_out_case(axis)
    shape = dy.shape
    if target == "fresh":
        out = np.full(shape, np.nan)
    elif target == "strided":
        out = np.zeros((*shape, 2))[..., 1]
    elif target == "grad_output":
        out = dy
    elif target == "x":
        out = x
    else:
        x = base[:5]
        out = base[1:]
    got = fn.batch_norm_backward(dy, x, gamma, result.save_mean, result.save_invstd, axis=axis,
                                 out=out)
    assert got[0] is out
    for value, want in zip(got, expected):
        np.testing.assert_allclose(value, want, rtol=1e-10, atol=1e-10)


def test_bad_backward_out_raises_and_writes_nothing():
    x, gamma, _ = _data((6, 4, 3), 1, np.float32)
    result = fn.batch_norm(x, gamma)
    dy = np.ones_like(x)
    read_only = np.zeros_like(x)
    read_only.flags.writeable = False
    for out in (np.zeros((6, 4)), np.zeros(x.shape, np.float64), read_only, [0.0] * 72):
        before = np.array(out, copy=True)
        with pytest.raises(ValueError):
            fn.batch_norm_backward(dy, x, gamma, result.save_mean, result.save_invstd, out=out)
        np.testing.assert_array_equal(np.asarray(out), before)
    out = np.full_like(x, 7.0)
    with pytest.raises(ValueError):
        fn.batch_norm_backward(dy, x, gamma, result.save_mean[:3], result.save_invstd, out=out)
    assert np.all(out == 7.0)


def test_backward_accepts_float64_statistics_for_float32_data():
    x, gamma, _ = _data((6, 4, 3), 1, np.float32)
    dy = np.random.default_rng(9).standard_normal(x.shape).astype(np.float32)
    stats = ref.batch_norm(x, gamma)
    grads = fn.batch_norm_backward(dy, x, gamma, stats.save_mean, stats.save_invstd)
    expected = ref.batch_norm_backward(dy, x, gamma, stats.save_mean, stats.save_invstd)
    assert all(g.dtype == np.float32 for g in grads)
    _check_close(grads[0], expected[0], np.float32, scale=2.0)


def test_partially_overlapping_out():
    base, gamma, beta = _data((9, 3, 4), 1, np.float64)
    x = base[:8]
    expected = ref.batch_norm(x, gamma, beta).y
    fn.batch_norm(x, gamma, beta, out=base[1:])
    _check_close(base[1:], expected, np.float64, scale=2.0)


class _FakeCupyArray:
    """Stands for a CuPy array: the package recognizes those by their type's
    module, so this exercises the path a real one takes."""
    shape = (4, 3)
    ndim = 2
    dtype = np.dtype(np.float32)


_FakeCupyArray.__module__ = "cupy._core.core"


def test_cupy_like_input_without_cuda_module_names_the_fix(monkeypatch):
    from fusednn import _backend
    monkeypatch.setattr(_backend, "_cuda", None)
    with pytest.raises(RuntimeError, match="CUDA"):
        fn.batch_norm(_FakeCupyArray())
    with pytest.raises(RuntimeError, match="CUDA"):
        fn.batch_norm_backward(_FakeCupyArray(), _FakeCupyArray(), None, _FakeCupyArray(),
                               _FakeCupyArray())


def test_numpy_and_cupy_arrays_mixed_is_a_type_error_naming_the_fix():
    x = np.ones((4, 3), np.float32)
    rm, rv = np.zeros(3, np.float32), np.ones(3, np.float32)
    with pytest.raises(TypeError, match="cupy.asarray"):
        fn.batch_norm(x, _FakeCupyArray(), running_mean=rm, running_var=rv)
    with pytest.raises(TypeError, match="cupy.asnumpy"):
        fn.batch_norm(_FakeCupyArray(), running_mean=rm)
    with pytest.raises(TypeError, match="save_mean on the GPU"):
        fn.batch_norm_backward(x, x, None, _FakeCupyArray(), rv)
    np.testing.assert_array_equal(rm, np.zeros(3, np.float32))


def test_cupy_like_out_for_numpy_input_is_a_value_error():
    x, _, _ = _data((4, 3), 1, np.float32)
    with pytest.raises(ValueError, match="device"):
        fn.batch_norm(x, out=_FakeCupyArray())
