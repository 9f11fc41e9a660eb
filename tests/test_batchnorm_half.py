"""Batch norm on float16 and bfloat16 arrays on the CPU: the fused forward
(training and inference, with and without the fused ReLU), the backward,
and the split phases of data-parallel training.

Half-precision x is loaded as float32 and every output element is rounded
once to x's dtype; save_mean, save_invstd, grad_gamma and grad_beta are
float32. The statistics and the backward's sums are taken in float32
partial sums that join double sums every few terms (float32 x sums in
double throughout), so the outputs are checked two ways:

- against the float64 reference computed from the same exactly converted
  inputs: y and grad_input within half a unit in the last place of the
  storage type plus 2e-5, the float32 kernel's own bound
  (test_batchnorm.py holds the float32 kernel to 2e-5 on these outputs of
  order one): the float32 value before the rounding is within that bound
  of the reference, and rounding it once adds at most half the spacing of
  the storage type around it; the statistics and sums within 1e-6
  relative, as for float32 x;
- where the statistics are given (inference, the split phases' apply
  steps), bit for bit against the float32 kernel run on the exactly
  widened inputs, its result rounded once to the storage type (numpy's
  and ml_dtypes' float32 conversions round to nearest even).
"""
from __future__ import annotations

import numpy as np
import pytest

import fusednn as fn
from fusednn import _cpu
from fusednn import reference as ref

ml_dtypes = pytest.importorskip("ml_dtypes")

HALF = {"float16": np.dtype(np.float16), "bfloat16": np.dtype(ml_dtypes.bfloat16)}
# (mantissa bits, smallest normal exponent) of each storage type.
FORMATS = {"float16": (10, -14), "bfloat16": (7, -126)}
# The float32 kernel's bound against the reference on y and grad_input
# (test_batchnorm.py: 1e-5 on outputs of order one, times 2).
FLOAT32_BOUND = 2e-5

# (shape, axis): NC, NCL, NCHW, channels-last, another axis, reductions over
# several units, more channels than one channels-last block.
LAYOUTS = [
    ((16, 5), 1),
    ((4, 3, 7), 1),
    ((2, 3, 5, 6), 1),
    ((2, 5, 6, 3), -1),
    ((3, 4, 5), 0),
    ((1, 2, 70001), 1),
    ((900, 300), -1),
    ((3, 700, 2), 1),
]


def spacing(dtype_name: str, value) -> np.ndarray:
    """The distance between neighbouring values of the storage type around
    |value| (the larger one at a power of two)."""
    mantissa_bits, min_exponent = FORMATS[dtype_name]
    with np.errstate(all="ignore"):
        exponent = np.floor(np.log2(np.abs(np.asarray(value, dtype=np.float64))))
    exponent = np.where(np.isfinite(exponent), exponent, min_exponent)
    return np.exp2(np.maximum(exponent, min_exponent) - mantissa_bits)


def assert_within_rounding(actual, expected, dtype_name: str, float32_bound: float):
    """actual (of the storage type) is the rounding of a float32 value
    within float32_bound of expected."""
    actual = np.asarray(actual).astype(np.float64)
    expected = np.asarray(expected, dtype=np.float64)
    assert np.all(np.isfinite(actual))
    largest = np.maximum(np.abs(actual), np.abs(expected)) + float32_bound
    bound = 0.5 * spacing(dtype_name, largest) + float32_bound
    excess = np.abs(actual - expected) - bound
    assert excess.max(initial=-1.0) <= 0, (
        f"{np.count_nonzero(excess > 0)} values off by more than half a {dtype_name} ulp plus "
        f"{float32_bound}; worst {np.abs(actual - expected).ravel()[np.argmax(excess)]}")


def assert_same_bits(actual, expected):
    actual, expected = np.asarray(actual), np.asarray(expected)
    assert actual.dtype == expected.dtype and actual.shape == expected.shape
    width = {2: np.uint16, 4: np.uint32, 8: np.uint64}[actual.dtype.itemsize]
    np.testing.assert_array_equal(actual.view(width), expected.view(width))


def rounded(values32: np.ndarray, dtype) -> np.ndarray:
    """A float32 result rounded once to the storage type."""
    assert values32.dtype == np.float32
    return values32.astype(dtype)


def data(shape, axis, dtype, seed=0):
    """x of the storage type, and float32 gamma and beta."""
    rng = np.random.default_rng(seed)
    channels = shape[axis]
    bshape = [1] * len(shape)
    bshape[axis] = channels
    centers = rng.uniform(-2, 2, channels).reshape(bshape)
    x = (rng.standard_normal(shape) * 3 + centers).astype(dtype)
    gamma = rng.uniform(0.5, 1.5, channels).astype(np.float32)
    beta = rng.standard_normal(channels).astype(np.float32)
    return x, gamma, beta


def as64(a):
    return None if a is None else np.asarray(a).astype(np.float64)


@pytest.mark.parametrize("relu", [None, "relu"])
@pytest.mark.parametrize("weights", ["float32", "x", "none"])
@pytest.mark.parametrize("shape,axis", LAYOUTS)
@pytest.mark.parametrize("dtype_name", HALF)
def test_training_forward_and_backward(dtype_name, shape, axis, weights, relu):
    dtype = HALF[dtype_name]
    x, gamma, beta = data(shape, axis, dtype)
    if weights == "x":
        gamma, beta = gamma.astype(dtype), beta.astype(dtype)
    elif weights == "none":
        gamma = beta = None
    channels = shape[axis]
    rm, rv = np.zeros(channels, np.float32), np.ones(channels, np.float32)

    result = fn.batch_norm(x, gamma, beta, rm, rv, axis=axis, activation=relu)
    assert result.y.dtype == dtype
    assert result.save_mean.dtype == np.float32 and result.save_invstd.dtype == np.float32

    rm_ref, rv_ref = np.zeros(channels), np.ones(channels)
    expected = ref.batch_norm(as64(x), as64(gamma), as64(beta), rm_ref, rv_ref, axis=axis)
    y_ref = np.maximum(expected.y, 0) if relu else expected.y
    assert_within_rounding(result.y, y_ref, dtype_name, FLOAT32_BOUND)
    np.testing.assert_allclose(result.save_mean, expected.save_mean, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(result.save_invstd, expected.save_invstd, rtol=1e-6)
    np.testing.assert_allclose(rm, rm_ref, rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(rv, rv_ref, rtol=1e-6)

    dy = np.random.default_rng(1).standard_normal(shape).astype(dtype)
    y_kept = result.y if relu else None
    grads = fn.batch_norm_backward(dy, x, gamma, result.save_mean, result.save_invstd,
                                   axis=axis, activation=relu, y=y_kept)
    assert grads[0].dtype == dtype
    assert grads[1].dtype == np.float32 and grads[2].dtype == np.float32

    # The reference's gradient through the fused ReLU: dy masked by the
    # forward's (stored) output.
    dy_ref = as64(dy) * (as64(y_kept) > 0) if relu else as64(dy)
    expected_grads = ref.batch_norm_backward(dy_ref, as64(x), as64(gamma), as64(result.save_mean),
                                             as64(result.save_invstd), axis=axis)
    assert_within_rounding(grads[0], expected_grads[0], dtype_name, FLOAT32_BOUND)
    m = x.size // channels
    np.testing.assert_allclose(grads[1], expected_grads[1], rtol=0, atol=1e-5 * np.sqrt(m))
    np.testing.assert_allclose(grads[2], expected_grads[2], rtol=0, atol=1e-5 * np.sqrt(m))


@pytest.mark.parametrize("relu", [None, "relu"])
@pytest.mark.parametrize("shape,axis", [((16, 5), 1), ((2, 3, 5, 6), 1), ((2, 5, 6, 3), -1)])
@pytest.mark.parametrize("dtype_name", HALF)
def test_inference_forward_and_backward(dtype_name, shape, axis, relu):
    dtype = HALF[dtype_name]
    x, gamma, beta = data(shape, axis, dtype, seed=2)
    channels = shape[axis]
    rng = np.random.default_rng(3)
    rm = rng.standard_normal(channels).astype(np.float32)
    rv = rng.uniform(0.5, 4, channels).astype(np.float32)
    result = fn.batch_norm(x, gamma, beta, rm, rv, training=False, axis=axis, activation=relu)
    result32 = fn.batch_norm(x.astype(np.float32), gamma, beta, rm, rv, training=False,
                             axis=axis, activation=relu)
    assert_same_bits(result.y, rounded(result32.y, dtype))
    expected = ref.batch_norm(as64(x), as64(gamma), as64(beta), as64(rm), as64(rv),
                              training=False, axis=axis)
    y_ref = np.maximum(expected.y, 0) if relu else expected.y
    assert_within_rounding(result.y, y_ref, dtype_name, FLOAT32_BOUND)

    dy = rng.standard_normal(shape).astype(dtype)
    y_kept = result.y if relu else None
    grads = fn.batch_norm_backward(dy, x, gamma, result.save_mean, result.save_invstd,
                                   axis=axis, training=False, activation=relu, y=y_kept)
    grads32 = fn.batch_norm_backward(
        dy.astype(np.float32), x.astype(np.float32), gamma, result.save_mean,
        result.save_invstd, axis=axis, training=False, activation=relu,
        y=None if y_kept is None else y_kept.astype(np.float32))
    assert_same_bits(grads[0], rounded(grads32[0], dtype))
    dy_ref = as64(dy) * (as64(y_kept) > 0) if relu else as64(dy)
    bshape = [1] * len(shape)
    bshape[axis] = channels
    dx_ref = dy_ref * (as64(gamma) * as64(result.save_invstd)).reshape(bshape)
    assert_within_rounding(grads[0], dx_ref, dtype_name, FLOAT32_BOUND)
    expected = ref.batch_norm_backward(dy_ref, as64(x), as64(gamma), as64(result.save_mean),
                                       as64(result.save_invstd), axis=axis)
    m = x.size // channels
    for got, want in zip(grads[1:], expected[1:]):
        np.testing.assert_allclose(got, want, rtol=0, atol=1e-5 * np.sqrt(m))


@pytest.mark.parametrize("dtype_name", HALF)
def test_strided_and_channels_last_views(dtype_name):
    dtype = HALF[dtype_name]
    base, gamma, beta = data((6, 8, 10, 12), 1, dtype, seed=4)
    views = {
        "every other row and column": (base[::2, :, :, ::3], 1),
        "channels last, transposed": (base.transpose(0, 2, 3, 1), -1),
        "reversed": (base[::-1, :, ::-1], 1),
        "channel slice": (base[:, 1:7], 1),
    }
    for label, (x, axis) in views.items():
        channels = x.shape[axis]
        g, b = gamma[:channels], beta[:channels]
        result = fn.batch_norm(x, g, b, axis=axis)
        expected = ref.batch_norm(as64(x), as64(g), as64(b), axis=axis)
        assert_within_rounding(result.y, expected.y, dtype_name, FLOAT32_BOUND)
        dy = np.random.default_rng(5).standard_normal(x.shape).astype(dtype)[..., ::-1]
        grads = fn.batch_norm_backward(dy, x, g, result.save_mean, result.save_invstd, axis=axis)
        expected_grads = ref.batch_norm_backward(as64(dy), as64(x), as64(g),
                                                 as64(result.save_mean),
                                                 as64(result.save_invstd), axis=axis)
        assert_within_rounding(grads[0], expected_grads[0], dtype_name, FLOAT32_BOUND)
        # The split phases' elementwise steps on the same statistics: the
        # float32 kernel's values rounded once.
        mean, invstd = as64(result.save_mean), as64(result.save_invstd)
        assert_same_bits(fn.batch_norm_apply(x, mean, invstd, g, b, axis=axis),
                         rounded(fn.batch_norm_apply(x.astype(np.float32), mean, invstd, g, b,
                                                     axis=axis), dtype)), label
        # out= of another layout is written in place.
        out = np.empty(x.shape[::-1], dtype).T
        assert fn.batch_norm(x, g, b, axis=axis, out=out).y is out
        assert_same_bits(out, result.y)


# Outputs of at least 16 MiB, which the kernels stream past the cache a
# 64-byte line at a time from registers: rows that start and end inside a
# line (odd inner extents), channels cached between their sums and their
# outputs (NCHW, under 1 MiB a channel) or not, and channels-last rows.
STREAMED_LAYOUTS = [((2, 41, 104729), 1), ((4, 3, 700001), 1), ((65601, 128), -1)]


@pytest.mark.parametrize("shape,axis", STREAMED_LAYOUTS)
@pytest.mark.parametrize("dtype_name", HALF)
def test_streamed_outputs(dtype_name, shape, axis):
    dtype = HALF[dtype_name]
    x, gamma, beta = data(shape, axis, dtype, seed=13)
    assert x.nbytes >= 16 << 20
    x32 = x.astype(np.float32)
    result = fn.batch_norm(x, gamma, beta, axis=axis, activation="relu")
    expected = ref.batch_norm(as64(x), as64(gamma), as64(beta), axis=axis)
    assert_within_rounding(result.y, np.maximum(expected.y, 0), dtype_name, FLOAT32_BOUND)
    dy = np.random.default_rng(14).standard_normal(shape).astype(dtype)
    grads = fn.batch_norm_backward(dy, x, gamma, result.save_mean, result.save_invstd, axis=axis)
    mean, invstd = as64(result.save_mean), as64(result.save_invstd)
    expected_grads = ref.batch_norm_backward(as64(dy), as64(x), as64(gamma), mean, invstd,
                                             axis=axis)
    assert_within_rounding(grads[0], expected_grads[0], dtype_name, FLOAT32_BOUND)
    m = x.size // shape[axis]
    for got, want in zip(grads[1:], expected_grads[1:]):
        np.testing.assert_allclose(got, want, rtol=0, atol=1e-5 * np.sqrt(m))
    # The two-pass elementwise steps on given statistics, streamed too: the
    # float32 kernel's values rounded once.
    y = fn.batch_norm_apply(x, mean, invstd, gamma, beta, axis=axis)
    assert_same_bits(y, rounded(fn.batch_norm_apply(x32, mean, invstd, gamma, beta, axis=axis),
                                dtype))
    count = x.size // shape[axis]
    sums = [as64(grads[2]), as64(grads[1]) / invstd]
    dx = fn.batch_norm_backward_apply(dy, x, mean, invstd, gamma, *sums, count, axis=axis)
    dx32 = fn.batch_norm_backward_apply(dy.astype(np.float32), x32, mean, invstd, gamma, *sums,
                                        count, axis=axis)
    assert_same_bits(dx, rounded(dx32, dtype))


@pytest.mark.parametrize("dtype_name", HALF)
def test_channel_whose_mean_is_far_above_its_spread(dtype_name):
    """x - mean stays accurate where the mean is hundreds of times the
    spread (the mean is split into a float32 pair as for float32 x)."""
    dtype = HALF[dtype_name]
    rng = np.random.default_rng(6)
    center, spread = (1500.0, 4.0) if dtype_name == "float16" else (20000.0, 200.0)
    x = (center + spread * rng.standard_normal((4000, 3))).astype(dtype)
    result = fn.batch_norm(x, axis=-1)
    expected = ref.batch_norm(as64(x), axis=-1)
    assert_within_rounding(result.y, expected.y, dtype_name, FLOAT32_BOUND)


@pytest.mark.parametrize("dtype_name", HALF)
def test_nan_stays_in_its_channel(dtype_name):
    dtype = HALF[dtype_name]
    x, _, _ = data((8, 3, 5), 1, dtype, seed=7)
    x[2, 1, 3] = np.nan
    result = fn.batch_norm(x)
    assert np.isnan(result.y[:, 1].astype(np.float32)).all()
    assert np.isfinite(result.y[:, [0, 2]].astype(np.float32)).all()


@pytest.mark.parametrize("dtype_name", HALF)
def test_the_bound_catches_a_one_ulp_change(dtype_name):
    """The bound y is held to fails once one output moves one ulp of the
    storage type away from the reference, so the checks above can fail."""
    dtype = HALF[dtype_name]
    x, gamma, beta = data((4, 3, 300), 1, dtype, seed=15)
    y = fn.batch_norm(x, gamma, beta).y
    expected = ref.batch_norm(as64(x), as64(gamma), as64(beta)).y
    assert_within_rounding(y, expected, dtype_name, FLOAT32_BOUND)
    # The output of order one closest to its reference, moved away from it.
    error = np.where((np.abs(as64(y)) > 0.5) & (np.abs(as64(y)) < 2), as64(y) - expected, np.inf)
    index = np.unravel_index(np.argmin(np.abs(error)), y.shape)
    away = 1 if error[index] >= 0 else -1
    bits = y.view(np.uint16).astype(np.int64)
    bits[index] += away if y[index] > 0 else -away  # sign and magnitude
    bits = bits.astype(np.uint16)
    with pytest.raises(AssertionError, match="half a"):
        assert_within_rounding(bits.view(dtype), expected, dtype_name, FLOAT32_BOUND)


@pytest.mark.parametrize("dtype_name", HALF)
def test_sums_of_long_runs_with_nan_and_huge_spread(dtype_name):
    """Runs long enough for the float partial sums: a NaN stays in its
    channel, and a bfloat16 channel whose squares overflow float32 gets
    its statistics from double sums."""
    dtype = HALF[dtype_name]
    x, gamma, beta = data((4, 3, 301), 1, dtype, seed=16)
    x[1, 0, 77] = np.nan
    if dtype_name == "bfloat16":
        x[:, 2] = (np.random.default_rng(17).standard_normal((4, 301)) * 1e30).astype(dtype)
    result = fn.batch_norm(x, gamma, beta)
    y = as64(result.y)
    assert np.isnan(y[:, 0]).all() and np.isfinite(y[:, 1:]).all()
    expected = ref.batch_norm(as64(x[:, 1:]), as64(gamma[1:]), as64(beta[1:]))
    assert_within_rounding(result.y[:, 1:], expected.y, dtype_name, FLOAT32_BOUND)
    np.testing.assert_allclose(result.save_invstd[1:], expected.save_invstd, rtol=1e-6)
    dy = np.random.default_rng(18).standard_normal(x.shape).astype(dtype)
    grads = fn.batch_norm_backward(dy, x, gamma, result.save_mean, result.save_invstd)
    expected_grads = ref.batch_norm_backward(as64(dy[:, 1:]), as64(x[:, 1:]), as64(gamma[1:]),
                                             as64(result.save_mean[1:]),
                                             as64(result.save_invstd[1:]))
    assert_within_rounding(grads[0][:, 1:], expected_grads[0], dtype_name, FLOAT32_BOUND)
    assert np.isnan(as64(grads[0][:, 0])).all()


@pytest.mark.parametrize("dtype_name", HALF)
def test_same_bits_for_any_thread_count_and_simd_path(dtype_name, restore_settings):
    dtype = HALF[dtype_name]
    cases = [((6, 5, 30001), 1), ((40000, 37), -1), ((3, 300, 7), 1)]
    for shape, axis in cases:
        x, gamma, beta = data(shape, axis, dtype, seed=8)
        dy = np.random.default_rng(9).standard_normal(shape).astype(dtype)

        def outputs():
            r = fn.batch_norm(x, gamma, beta, axis=axis)
            return [*r, *fn.batch_norm_backward(dy, x, gamma, r.save_mean, r.save_invstd,
                                                axis=axis)]

        fn.set_num_threads(1)
        _cpu.set_simd("generic")
        baseline = outputs()
        for path in _cpu.available_simd():
            _cpu.set_simd(path)
            for threads in (1, 2, 3):
                fn.set_num_threads(threads)
                for got, want in zip(outputs(), baseline):
                    assert_same_bits(got, want)


@pytest.mark.parametrize("dtype_name", HALF)
def test_running_statistics_of_other_dtypes(dtype_name):
    """Running statistics are float32 or float64 (or of a half type, then
    rounded once) whatever x's dtype."""
    dtype = HALF[dtype_name]
    x, _, _ = data((30, 3, 4), 1, dtype, seed=10)
    rm64, rv64 = np.zeros(3), np.ones(3)
    fn.batch_norm(x, running_mean=rm64, running_var=rv64)
    expected_rm, expected_rv = np.zeros(3), np.ones(3)
    ref.batch_norm(as64(x), running_mean=expected_rm, running_var=expected_rv)
    np.testing.assert_allclose(rm64, expected_rm, rtol=1e-12, atol=1e-15)
    np.testing.assert_allclose(rv64, expected_rv, rtol=1e-12)
    rm16, rv16 = np.zeros(3, dtype), np.ones(3, dtype)
    fn.batch_norm(x, running_mean=rm16, running_var=rv16)
    assert_within_rounding(rm16, expected_rm, dtype_name, 1e-12)
    assert_within_rounding(rv16, expected_rv, dtype_name, 1e-12)


def test_weights_must_be_the_inputs_dtype_or_float32():
    x = np.ones((4, 3), np.float16)
    for bad in (np.ones(3), np.ones(3, ml_dtypes.bfloat16)):
        with pytest.raises(TypeError, match="float16 or float32"):
            fn.batch_norm(x, bad)
    with pytest.raises(TypeError, match="bfloat16 or float32"):
        fn.batch_norm(x.astype(ml_dtypes.bfloat16), None, np.ones(3, np.float16))
    with pytest.raises(TypeError, match="same dtype"):
        fn.batch_norm_backward(np.ones((4, 3), np.float32), x, None, np.zeros(3, np.float32),
                               np.ones(3, np.float32))
    with pytest.raises(ValueError, match="dtype"):
        fn.batch_norm(x, out=np.empty((4, 3), np.float32))


# ---- the split phases --------------------------------------------------------------

@pytest.mark.parametrize("shape,axis", [((16, 5), 1), ((2, 3, 5, 6), 1), ((2, 5, 6, 3), -1),
                                        ((1, 2, 70001), 1)])
@pytest.mark.parametrize("dtype_name", HALF)
def test_split_phases(dtype_name, shape, axis):
    dtype = HALF[dtype_name]
    x, gamma, beta = data(shape, axis, dtype, seed=11)
    x32 = x.astype(np.float32)
    dy = np.random.default_rng(12).standard_normal(shape).astype(dtype)
    dy32 = dy.astype(np.float32)

    stats = fn.batch_norm_stats(x, axis=axis)
    axes = tuple(a for a in range(len(shape)) if a != axis % len(shape))
    bshape = [1] * len(shape)
    bshape[axis] = shape[axis]
    mean_ref = as64(x).mean(axis=axes)
    m2_ref = ((as64(x) - mean_ref.reshape(bshape)) ** 2).sum(axis=axes)
    assert stats.count == x.size // shape[axis]
    np.testing.assert_allclose(stats.mean, mean_ref, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(stats.m2, m2_ref, rtol=1e-6)
    count, mean, var = fn.batch_norm_combine([stats.count], stats.mean[None], stats.m2[None])
    invstd = fn.batch_norm_finalize(mean, var, count)

    y = fn.batch_norm_apply(x, mean, invstd, gamma, beta, axis=axis)
    assert y.dtype == dtype
    assert_same_bits(y, rounded(fn.batch_norm_apply(x32, mean, invstd, gamma, beta, axis=axis),
                                dtype))
    assert_within_rounding(y, ref.batch_norm(as64(x), as64(gamma), as64(beta), axis=axis).y,
                           dtype_name, FLOAT32_BOUND)

    sums = fn.batch_norm_backward_reduce(dy, x, mean, invstd, axis=axis)
    sum_dy_ref = as64(dy).sum(axis=axes)
    sum_dy_xhat_ref = (as64(dy) * (as64(x) - mean.reshape(bshape))).sum(axis=axes) * invstd
    for got, want in zip(sums, (sum_dy_ref, sum_dy_xhat_ref)):
        np.testing.assert_allclose(got, want, rtol=0, atol=1e-5 * np.sqrt(stats.count))
    dx = fn.batch_norm_backward_apply(dy, x, mean, invstd, gamma, *sums, count, axis=axis)
    dx32 = fn.batch_norm_backward_apply(dy32, x32, mean, invstd, gamma, *sums, count, axis=axis)
    assert dx.dtype == dtype
    assert_same_bits(dx, rounded(dx32, dtype))
    expected = ref.batch_norm_backward(as64(dy), as64(x), as64(gamma), mean, invstd, axis=axis)
    assert_within_rounding(dx, expected[0], dtype_name, FLOAT32_BOUND)


# ---- other libraries --------------------------------------------------------------

def test_torch_half_tensors():
    torch = pytest.importorskip("torch")
    for dtype in (torch.float16, torch.bfloat16):
        x = (torch.randn(6, 4, 5, 3, generator=torch.Generator().manual_seed(0)) * 2 + 1)
        x = x.to(dtype)[:, :, ::2]
        gamma = torch.rand(4) + 0.5
        running_mean, running_var = torch.zeros(4), torch.ones(4)
        result = fn.batch_norm(x, gamma, None, running_mean, running_var)
        assert isinstance(result.y, torch.Tensor) and result.y.dtype == dtype
        assert result.save_mean.dtype == torch.float32
        result32 = fn.batch_norm(x.float(), gamma)
        assert torch.equal(result.y, result32.y.to(dtype))
        dy = torch.ones_like(x)
        grad_x, grad_gamma, _ = fn.batch_norm_backward(dy, x, gamma.to(dtype), result.save_mean,
                                                       result.save_invstd)
        assert grad_x.dtype == dtype and grad_gamma.dtype == torch.float32
        # channels-last memory format
        x_cl = x.contiguous(memory_format=torch.channels_last)
        assert torch.equal(fn.batch_norm(x_cl, gamma).y, result.y)


def test_jax_bfloat16_arrays():
    jnp = pytest.importorskip("jax.numpy")
    x = jnp.linspace(-4, 4, 60, dtype=jnp.bfloat16).reshape(12, 5)
    result = fn.batch_norm(x)
    assert result.y.dtype == jnp.bfloat16
    np.testing.assert_array_equal(np.asarray(result.y), fn.batch_norm(np.asarray(x)).y)
