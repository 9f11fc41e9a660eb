"""Tests of batch norm with a fused ReLU (``activation="relu"``) on the CPU:
the forward equals fusednn's relu of the plain forward and the backward
equals the plain backward of fusednn's relu backward, bit for bit, on
every channel layout, loop shape (cached channel, two-pass, streamed,
strided), thread count and SIMD path; both against the float64 reference,
whose fused gradients are checked against finite differences; special
values, odd strides, channels-last torch tensors, aliasing, inference
mode and bad input.
"""
from __future__ import annotations

import numpy as np
import pytest

import fusednn as fn
from fusednn import _cpu
from fusednn import reference as ref
from conftest import numeric_gradient

DTYPES = (np.float32, np.float64)
TOL = {np.float32: 1e-5, np.float64: 1e-12}

# As tests/test_batchnorm.py's layouts, plus streamed sizes (16 MiB and
# more) and both loop shapes of the backward.
LAYOUTS = [
    ((16, 5), 1),
    ((4, 3, 7), 1),
    ((2, 3, 5, 6), 1),
    ((2, 5, 6, 3), -1),
    ((3, 4, 5), 0),
    ((2, 3, 4, 5, 6), 2),
    ((1, 2, 70001), 1),
    ((900, 300), -1),
    ((3, 700, 2), 1),
    ((3, 2, 100001), 1),
    ((70, 32, 45, 45), 1),
    ((12_000, 15, 24), -1),
]


def _data(shape, axis, dtype, seed=0):
    rng = np.random.default_rng(seed)
    channels = shape[axis]
    bshape = [1] * len(shape)
    bshape[axis] = channels
    x = (rng.standard_normal(shape) * 3.0
         + rng.uniform(-2, 2, channels).reshape(bshape)).astype(dtype)
    gamma = rng.uniform(0.5, 1.5, channels).astype(dtype)
    beta = rng.standard_normal(channels).astype(dtype)
    dy = rng.standard_normal(shape).astype(dtype)
    return x, gamma, beta, dy


def _same_bits(got, want):
    np.testing.assert_array_equal(np.ascontiguousarray(got).view(np.uint8),
                                  np.ascontiguousarray(want).view(np.uint8))


def _fused(x, gamma, beta, dy, axis, training=True, **kwargs):
    """Forward and backward with the fused ReLU: (y, save_mean, save_invstd,
    grad_x, grad_gamma, grad_beta)."""
    channels = x.shape[axis]
    rm, rv = np.zeros(channels), np.ones(channels)
    y, mean, invstd = fn.batch_norm(x, gamma, beta, rm, rv, training=training, axis=axis,
                                    activation="relu")
    grads = fn.batch_norm_backward(dy, x, gamma, mean, invstd, axis=axis, training=training,
                                   activation="relu", y=y, **kwargs)
    return (y, mean, invstd, *grads)


def _separate(x, gamma, beta, dy, axis, training=True):
    """The same through fusednn's batch norm and relu called one by one."""
    channels = x.shape[axis]
    rm, rv = np.zeros(channels), np.ones(channels)
    z, mean, invstd = fn.batch_norm(x, gamma, beta, rm, rv, training=training, axis=axis)
    y = fn.activation("relu", z)
    masked = fn.activation_backward("relu", dy, y=y)
    grads = fn.batch_norm_backward(masked, x, gamma, mean, invstd, axis=axis, training=training)
    return (y, mean, invstd, *grads)


@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape,axis", LAYOUTS)
def test_fused_equals_separate_calls_bit_for_bit(shape, axis, dtype, training):
    x, gamma, beta, dy = _data(shape, axis, dtype)
    for got, want in zip(_fused(x, gamma, beta, dy, axis, training),
                         _separate(x, gamma, beta, dy, axis, training)):
        _same_bits(got, want)


@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape,axis", LAYOUTS[:10])
def test_fused_matches_reference(shape, axis, dtype, training):
    x, gamma, beta, dy = _data(shape, axis, dtype)
    channels = x.shape[axis]
    running = (np.full(channels, 0.5), np.full(channels, 2.0))
    y, mean, invstd = fn.batch_norm(x, gamma, beta, *(r.copy() for r in running),
                                    training=training, axis=axis, activation="relu")
    want = ref.batch_norm(x, gamma, beta, *(r.copy() for r in running), training=training,
                          axis=axis, activation="relu")
    np.testing.assert_allclose(y, want.y, rtol=0, atol=4 * TOL[dtype])
    assert (y >= 0).all()
    grads = fn.batch_norm_backward(dy, x, gamma, mean, invstd, axis=axis, training=training,
                                   activation="relu", y=y)
    # The reference masks with the kernel's own y, so that both take the
    # same elements (a y within rounding of 0 could fall either way).
    expected = ref.batch_norm_backward(dy, x, gamma, mean, invstd, axis=axis, training=training,
                                       activation="relu", y=y)
    m = x.size // channels
    np.testing.assert_allclose(grads[0], expected[0], rtol=0, atol=8 * TOL[dtype])
    for got, want_sum in zip(grads[1:], expected[1:]):
        np.testing.assert_allclose(got, want_sum, rtol=0, atol=4 * TOL[dtype] * np.sqrt(m))


@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("shape,axis", [((6, 3), 1), ((2, 3, 4), 1), ((3, 2, 2, 3), -1)])
def test_reference_gradients_match_finite_differences(shape, axis, training):
    x, gamma, beta, weights = _data(shape, axis, np.float64, seed=3)
    channels = x.shape[axis]
    running = (np.full(channels, 0.3), np.full(channels, 4.0))

    def forward():
        return ref.batch_norm(x, gamma, beta, *(r.copy() for r in running), training=training,
                              axis=axis, activation="relu")

    def loss():
        return float(np.sum(forward().y * weights))

    result = forward()
    # No output within the finite-difference step of the ReLU's kink.
    assert np.abs(ref.batch_norm(x, gamma, beta, *(r.copy() for r in running),
                                 training=training, axis=axis).y).min() > 1e-4
    grads = ref.batch_norm_backward(weights, x, gamma, result.save_mean, result.save_invstd,
                                    axis=axis, training=training, activation="relu", y=result.y)
    for got, values in zip(grads, (x, gamma, beta)):
        np.testing.assert_allclose(got, numeric_gradient(loss, values), rtol=1e-6, atol=1e-8)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape,axis", [((6, 5, 30001), 1), ((40000, 37), -1), ((3, 300, 7), 1)])
def test_same_bits_for_any_thread_count_and_simd_path(shape, axis, dtype, restore_settings):
    x, gamma, beta, dy = _data(shape, axis, dtype)
    fn.set_num_threads(1)
    _cpu.set_simd("generic")
    baseline = _fused(x, gamma, beta, dy, axis)
    for path in _cpu.available_simd():
        _cpu.set_simd(path)
        for threads in (1, 2, 3):
            fn.set_num_threads(threads)
            for got, want in zip(_fused(x, gamma, beta, dy, axis), baseline):
                _same_bits(got, want)


def _strided(a):
    out = np.zeros((*a.shape, 2), a.dtype)[..., 1]
    out[...] = a
    return out


@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("axis", [1, -1])
@pytest.mark.parametrize("which", ["x", "dy", "y", "out", "all"])
def test_odd_strides_give_the_contiguous_bits(which, axis, training):
    shape = (5, 4, 6, 3) if axis == 1 else (5, 6, 3, 4)
    x, gamma, beta, dy = _data(shape, axis, np.float32)
    want = _fused(x, gamma, beta, dy, axis, training)
    y = want[0]
    if which in ("x", "all"):
        x = _strided(x)
    if which in ("dy", "all"):
        dy = _strided(dy)
    if which in ("y", "all"):
        y = _strided(y)
    out = _strided(np.full(shape, np.nan, np.float32)) if which in ("out", "all") else None
    y_got = fn.batch_norm(x, gamma, beta, training=training, axis=axis, activation="relu",
                          running_mean=np.zeros(shape[axis]), running_var=np.ones(shape[axis]),
                          out=None if out is None else _strided(np.zeros(shape, np.float32))).y
    _same_bits(y_got, want[0])
    grads = fn.batch_norm_backward(dy, x, gamma, want[1], want[2], axis=axis, training=training,
                                   activation="relu", y=y, out=out)
    if out is not None:
        assert grads[0] is out
    for got, expected in zip(grads, want[3:]):
        _same_bits(got, expected)


@pytest.mark.parametrize("target", ["grad_output", "x", "y"])
def test_backward_may_write_over_its_inputs(target):
    shape, axis = (4, 3, 5, 6), 1
    x, gamma, beta, dy = _data(shape, axis, np.float64)
    want = _fused(x, gamma, beta, dy, axis)
    y = want[0].copy()
    out = {"grad_output": dy, "x": x, "y": y}[target]
    grads = fn.batch_norm_backward(dy, x, gamma, want[1], want[2], axis=axis,
                                   activation="relu", y=y, out=out)
    assert grads[0] is out
    for got, expected in zip(grads, want[3:]):
        _same_bits(got, expected)


def test_special_values():
    # One channel per case: NaN in x (the channel's outputs are NaN, which
    # pass the ReLU, and so does their gradient); an infinity; outputs
    # exactly -0 (x equal to the mean, gamma = -1, beta = -0: relu keeps
    # -0 and masks its gradient); subnormal and huge values.
    rows = 8
    x = np.array([[1.0, 2.0, np.inf, 3.0, 1e-40, 1e30],
                  [np.nan, 2.0, 1.0, 3.0, -1e-40, -1e30]] * (rows // 2), np.float32)
    x[:, 3] = 3.0  # a constant channel: x - mean = 0 everywhere
    gamma = np.array([1.0, 1.0, 1.0, -1.0, 1.0, 1.0], np.float32)
    beta = np.array([0.0, 0.0, 0.0, -0.0, 0.0, 0.0], np.float32)  # -0 + -0 keeps the sign
    dy = np.linspace(-1.0, 1.0, x.size, dtype=np.float32).reshape(x.shape)
    fused = _fused(x, gamma, beta, dy, 1)
    for got, want in zip(fused, _separate(x, gamma, beta, dy, 1)):
        _same_bits(got, want)
    y, _, _, grad_x, grad_gamma, grad_beta = fused
    assert np.isnan(y[1::2, 0]).all() and np.isnan(grad_x[:, 0]).all()
    # gamma = -1 on a constant channel: (x - mean) * -invstd = -0.
    assert (y[:, 3] == 0).all() and np.signbit(y[:, 3]).all()
    assert (grad_beta[3] == 0) and (grad_x[:, 3] == 0).all()
    with np.errstate(invalid="ignore"):  # the infinite channel
        want_y = ref.batch_norm(x, gamma, beta, activation="relu").y
    finite = np.isfinite(want_y[:, 4:])
    np.testing.assert_allclose(y[:, 4:][finite], want_y[:, 4:][finite], atol=1e-5)


def test_nan_y_passes_the_gradient_and_negative_zero_masks_it():
    x, gamma, beta, dy = _data((6, 2), 1, np.float64)
    result = fn.batch_norm(x, gamma, beta, activation="relu")
    y = result.y.copy()
    y[0, 0], y[1, 0], y[2, 0] = np.nan, -0.0, 0.0
    got = fn.batch_norm_backward(dy, x, gamma, result.save_mean, result.save_invstd,
                                 activation="relu", y=y)
    masked = np.where(y <= 0, 0.0, dy)  # NaN <= 0 is False: the NaN keeps dy
    assert masked[0, 0] == dy[0, 0]
    want = fn.batch_norm_backward(masked, x, gamma, result.save_mean, result.save_invstd)
    for a, b in zip(got, want):
        _same_bits(a, b)


def test_channels_last_torch_tensors():
    torch = pytest.importorskip("torch")
    x, gamma, beta, dy = _data((4, 8, 5, 6), 1, np.float32)
    xt = torch.from_numpy(x).contiguous(memory_format=torch.channels_last)
    dyt = torch.from_numpy(dy).contiguous(memory_format=torch.channels_last)
    want = _fused(x, gamma, beta, dy, 1)
    result = fn.batch_norm(xt, torch.from_numpy(gamma), torch.from_numpy(beta),
                           activation="relu")
    _same_bits(result.y.numpy(), want[0])
    grads = fn.batch_norm_backward(dyt, xt, torch.from_numpy(gamma), result.save_mean,
                                   result.save_invstd, activation="relu", y=result.y)
    for got, expected in zip(grads, want[3:]):
        _same_bits(got.numpy(), expected)


def _bad_calls():
    x, gamma, beta, dy = _data((4, 3, 5), 1, np.float64)
    result = fn.batch_norm(x, gamma, beta, activation="relu")
    stats = (result.save_mean, result.save_invstd)
    return [
        ("forward gelu", lambda out: fn.batch_norm(x, activation="gelu", out=out), ValueError),
        ("forward not a string", lambda out: fn.batch_norm(x, activation=1, out=out), ValueError),
        ("backward without y", lambda out: fn.batch_norm_backward(
            dy, x, gamma, *stats, activation="relu", out=out), TypeError),
        ("backward y without relu", lambda out: fn.batch_norm_backward(
            dy, x, gamma, *stats, y=result.y, out=out), ValueError),
        ("backward y shape", lambda out: fn.batch_norm_backward(
            dy, x, gamma, *stats, activation="relu", y=result.y[:2], out=out), ValueError),
        ("backward y dtype", lambda out: fn.batch_norm_backward(
            dy, x, gamma, *stats, activation="relu", y=result.y.astype(np.float32), out=out),
         TypeError),
        ("backward gelu", lambda out: fn.batch_norm_backward(
            dy, x, gamma, *stats, activation="gelu", y=result.y, out=out), ValueError),
    ]


@pytest.mark.parametrize("label,call,error", _bad_calls(), ids=[c[0] for c in _bad_calls()])
def test_bad_input_raises_and_writes_nothing(label, call, error):
    out = np.full((4, 3, 5), 7.0)
    with pytest.raises(error):
        call(out)
    assert (out == 7.0).all()
