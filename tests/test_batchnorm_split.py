"""The split phases of batch normalization (fusednn.batchnorm_split): a batch
cut into uneven slices (an empty one included), each slice reduced on its
own, the statistics combined and the slices written with them, must give
what the one-process kernels give on the whole batch; the per-slice
statistics are checked against float64 numpy from first principles, and
the combination for determinism and accuracy at a large mean.
"""
from __future__ import annotations

import numpy as np
import pytest

import fusednn as fn
from fusednn import reference as ref

LAYOUTS = [((13, 5, 7, 3), 1), ((29, 6), 1), ((17, 4, 9), -1), ((11, 3, 2, 2, 5), 1)]
DTYPES = [np.float32, np.float64]
# Agreement with the one-process kernels, relative to max(1, |value|).
TOL = {np.float32: 1e-6, np.float64: 1e-12}
CUTS = [[0, 3, 3, 8], [0, 1], [0, 5, 6]]  # slice starts along axis 0; [3, 3) is empty


def _data(shape, axis, dtype, seed=0, loc=1.0):
    rng = np.random.default_rng(seed)
    ax = axis % len(shape)
    bshape = [1] * len(shape)
    bshape[ax] = shape[ax]
    centers = rng.uniform(-2, 2, shape[ax]).reshape(bshape) * loc
    x = (rng.standard_normal(shape) * 3.0 + centers).astype(dtype)
    gamma = rng.uniform(0.5, 1.5, shape[ax]).astype(dtype)
    beta = rng.standard_normal(shape[ax]).astype(dtype)
    dy = rng.standard_normal(shape).astype(dtype)
    return x, gamma, beta, dy


def _slices(a, starts):
    bounds = list(starts) + [a.shape[0]]
    return [a[b0:b1] for b0, b1 in zip(bounds, bounds[1:])]


def _assert_close(actual, expected, dtype):
    actual = np.asarray(actual, dtype=np.float64)
    expected = np.asarray(expected, dtype=np.float64)
    assert actual.shape == expected.shape
    err = np.abs(actual - expected) / np.maximum(1.0, np.abs(expected))
    assert np.max(err, initial=0.0) <= TOL[dtype], np.max(err)


def _forward(x_slices, gamma, beta, axis, running=None, eps=1e-5, momentum=0.1):
    stats = [fn.batch_norm_stats(s, axis=axis) for s in x_slices]
    merged = fn.batch_norm_combine([s.count for s in stats], np.stack([s.mean for s in stats]),
                                   np.stack([s.m2 for s in stats]))
    rm, rv = running if running is not None else (None, None)
    invstd = fn.batch_norm_finalize(merged.mean, merged.var, merged.count, eps=eps,
                                    running_mean=rm, running_var=rv, momentum=momentum)
    ys = [fn.batch_norm_apply(s, merged.mean, invstd, gamma, beta, axis=axis) for s in x_slices]
    return merged, invstd, ys


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape,axis", LAYOUTS)
@pytest.mark.parametrize("starts", CUTS)
def test_split_phases_match_the_one_process_kernels(shape, axis, dtype, starts):
    x, gamma, beta, dy = _data(shape, axis, dtype, seed=len(starts))
    channels = shape[axis]
    rm_split, rv_split = np.full(channels, 0.5), np.full(channels, 2.0)
    rm_one, rv_one = rm_split.copy(), rv_split.copy()
    merged, invstd, ys = _forward(_slices(x, starts), gamma, beta, axis, (rm_split, rv_split))
    one = fn.batch_norm(x, gamma, beta, rm_one, rv_one, axis=axis)
    assert merged.count == x.size // channels
    _assert_close(np.concatenate(ys), one.y, dtype)
    _assert_close(merged.mean, one.save_mean, dtype)
    _assert_close(invstd, one.save_invstd, dtype)
    _assert_close(rm_split, rm_one, dtype)
    _assert_close(rv_split, rv_one, dtype)

    sums = [fn.batch_norm_backward_reduce(g, s, merged.mean, invstd, axis=axis)
            for g, s in zip(_slices(dy, starts), _slices(x, starts))]
    sum_dy = np.sum([s[0] for s in sums], axis=0)
    sum_dy_xhat = np.sum([s[1] for s in sums], axis=0)
    dxs = [fn.batch_norm_backward_apply(g, s, merged.mean, invstd, gamma, sum_dy, sum_dy_xhat,
                                        merged.count, axis=axis)
           for g, s in zip(_slices(dy, starts), _slices(x, starts))]
    dx, dgamma, dbeta = fn.batch_norm_backward(dy, x, gamma, one.save_mean, one.save_invstd,
                                               axis=axis)
    _assert_close(np.concatenate(dxs), dx, dtype)
    # The one-process kernel sums around its statistics rounded to x's dtype;
    # the split sums use the float64 ones, and match the float64 reference.
    expected = ref.batch_norm_backward(dy, x, gamma, merged.mean, invstd, axis=axis)
    # Channels-last float32 sums add a few rows in float32 before double.
    sums_tol = 1e-5 if dtype == np.float32 else 1e-12
    np.testing.assert_allclose(sum_dy_xhat, expected[1], rtol=sums_tol, atol=sums_tol)
    np.testing.assert_allclose(sum_dy, expected[2], rtol=sums_tol, atol=sums_tol)
    np.testing.assert_allclose(sum_dy_xhat, dgamma, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(sum_dy, dbeta, rtol=1e-5, atol=1e-5)
    _assert_close(np.concatenate(dxs), expected[0], np.float32)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape,axis", LAYOUTS)
def test_stats_from_first_principles(shape, axis, dtype):
    x = _data(shape, axis, dtype)[0]
    stats = fn.batch_norm_stats(x, axis=axis)
    ax = axis % x.ndim
    others = tuple(d for d in range(x.ndim) if d != ax)
    x64 = x.astype(np.float64)
    mean = x64.mean(axis=others)
    m2 = ((x64 - np.expand_dims(mean, others)) ** 2).sum(axis=others)
    assert stats.count == x.size // x.shape[ax]
    assert stats.mean.dtype == np.float64 and stats.m2.dtype == np.float64
    # As batch_norm: in double, except that channels-last float32 data adds a
    # few rows in float32 first (about 2^-24 of those partial sums).
    rtol = 1e-6 if dtype == np.float32 else 1e-13
    spread = np.sqrt(m2 / stats.count)
    assert np.all(np.abs(stats.mean - mean) <= rtol * (np.abs(mean) + spread))
    np.testing.assert_allclose(stats.m2, m2, rtol=10 * rtol)


def test_empty_slice_gives_count_zero_and_zeros():
    stats = fn.batch_norm_stats(np.empty((0, 3, 4), np.float32))
    assert stats.count == 0
    np.testing.assert_array_equal(stats.mean, 0.0)
    np.testing.assert_array_equal(stats.m2, 0.0)
    sums = fn.batch_norm_backward_reduce(np.empty((0, 3)), np.empty((0, 3)), np.zeros(3),
                                         np.ones(3))
    np.testing.assert_array_equal(sums[0], 0.0)
    np.testing.assert_array_equal(sums[1], 0.0)


def test_combine_first_principles_and_same_bits():
    rng = np.random.default_rng(5)
    parts = [rng.standard_normal((n, 4)) * 2 + 7 for n in (5, 0, 9, 1)]
    stats = [fn.batch_norm_stats(p, axis=1) for p in parts]
    args = ([s.count for s in stats], np.stack([s.mean for s in stats]),
            np.stack([s.m2 for s in stats]))
    merged = fn.batch_norm_combine(*args)
    whole = np.concatenate(parts)
    assert merged.count == 15
    np.testing.assert_allclose(merged.mean, whole.mean(axis=0), rtol=1e-14)
    np.testing.assert_allclose(merged.var, whole.var(axis=0), rtol=1e-13)
    again = fn.batch_norm_combine(*args)
    assert again.mean.tobytes() == merged.mean.tobytes()
    assert again.var.tobytes() == merged.var.tobytes()
    # Counts may arrive as a gathered array, integers stored as floats.
    from_array = fn.batch_norm_combine(np.array(args[0], dtype=np.float64), args[1], args[2])
    assert from_array.var.tobytes() == merged.var.tobytes()


@pytest.mark.parametrize("shape,axis", [((8, 6, 500), 1), ((4000, 6), -1)])
def test_float32_accurate_when_mean_is_1e4_times_std(shape, axis):
    x = _data(shape, axis, np.float32, loc=5e3)[0] / 3.0
    starts = [0, 3, 5]
    merged, invstd, ys = _forward(_slices(x, starts), None, None, axis)
    expected = ref.batch_norm(x, axis=axis)
    err = np.max(np.abs(np.concatenate(ys).astype(np.float64) - expected.y))
    assert err <= 1e-5, err


def test_in_place_and_out():
    x, gamma, beta, dy = _data((6, 3, 5), 1, np.float32)
    merged, invstd, _ = _forward([x], gamma, beta, 1)
    expected = fn.batch_norm_apply(x, merged.mean, invstd, gamma, beta)
    y = x.copy()
    assert fn.batch_norm_apply(y, merged.mean, invstd, gamma, beta, out=y) is y
    np.testing.assert_array_equal(y, expected)
    sum_dy, sum_dy_xhat = fn.batch_norm_backward_reduce(dy, x, merged.mean, invstd)
    expected = fn.batch_norm_backward_apply(dy, x, merged.mean, invstd, gamma, sum_dy,
                                            sum_dy_xhat, merged.count)
    g = dy.copy()
    assert fn.batch_norm_backward_apply(g, x, merged.mean, invstd, gamma, sum_dy, sum_dy_xhat,
                                        merged.count, out=g) is g
    np.testing.assert_array_equal(g, expected)


def test_strided_inputs_match_contiguous():
    x, gamma, beta, dy = _data((8, 4, 6), 1, np.float64)
    xs, dys = x[:, :, ::2], dy[:, :, ::2]
    stats = fn.batch_norm_stats(xs)
    contiguous = fn.batch_norm_stats(np.ascontiguousarray(xs))
    np.testing.assert_allclose(stats.mean, contiguous.mean, rtol=1e-15)
    invstd = 1 / np.sqrt(stats.m2 / stats.count + 1e-5)
    np.testing.assert_array_equal(fn.batch_norm_apply(xs, stats.mean, invstd, gamma, beta),
                                  fn.batch_norm_apply(np.ascontiguousarray(xs), stats.mean,
                                                      invstd, gamma, beta))
    sums = fn.batch_norm_backward_reduce(dys, xs, stats.mean, invstd)
    sums_c = fn.batch_norm_backward_reduce(np.ascontiguousarray(dys), np.ascontiguousarray(xs),
                                           stats.mean, invstd)
    np.testing.assert_allclose(sums[0], sums_c[0], rtol=1e-14)
    np.testing.assert_allclose(sums[1], sums_c[1], rtol=1e-13)


def test_torch_tensors_in_and_out():
    torch = pytest.importorskip("torch")
    x, gamma, beta, dy = _data((6, 3, 5), 1, np.float32)
    stats = fn.batch_norm_stats(torch.from_numpy(x))
    assert isinstance(stats.mean, torch.Tensor) and stats.mean.dtype == torch.float64
    merged = fn.batch_norm_combine([stats.count], stats.mean[None], stats.m2[None])
    invstd = fn.batch_norm_finalize(merged.mean, merged.var, merged.count)
    y = fn.batch_norm_apply(torch.from_numpy(x), merged.mean, invstd)
    assert isinstance(y, torch.Tensor)
    np.testing.assert_allclose(y.numpy(), fn.batch_norm(x).y, rtol=1e-6, atol=1e-6)


def test_bad_input_raises_and_writes_nothing():
    x = np.ones((4, 3), np.float32)
    mean, invstd = np.zeros(3), np.ones(3)
    with pytest.raises(ValueError, match="one row per count"):
        fn.batch_norm_combine([4], np.zeros((2, 3)), np.zeros((2, 3)))
    with pytest.raises(ValueError, match="zero values"):
        fn.batch_norm_combine([0, 0], np.zeros((2, 3)), np.zeros((2, 3)))
    with pytest.raises(TypeError, match="float64"):
        fn.batch_norm_combine([4], np.zeros((1, 3), np.float32), np.zeros((1, 3)))
    with pytest.raises(ValueError, match="at least 0"):
        fn.batch_norm_combine([-1, 5], np.zeros((2, 3)), np.zeros((2, 3)))
    with pytest.raises(TypeError, match="integer"):
        fn.batch_norm_combine([1.5], np.zeros((1, 3)), np.zeros((1, 3)))
    rm = np.zeros(3)
    with pytest.raises(ValueError, match="at least 2"):
        fn.batch_norm_finalize(mean, np.ones(3), 1, running_mean=rm)
    with pytest.raises(ValueError, match="shares memory"):
        fn.batch_norm_finalize(mean, np.ones(3), 4, running_mean=rm, running_var=rm)
    with pytest.raises(ValueError, match="shares memory"):
        fn.batch_norm_finalize(rm, np.ones(3), 4, running_mean=rm)
    with pytest.raises(ValueError, match="eps"):
        fn.batch_norm_finalize(mean, np.ones(3), 4, eps=0.0)
    with pytest.raises(ValueError, match="one value per channel"):
        fn.batch_norm_apply(x, np.zeros(4), invstd)
    with pytest.raises(TypeError, match="int64"):
        fn.batch_norm_apply(x, np.zeros(3, np.int64), invstd)
    with pytest.raises(TypeError, match="float16"):
        fn.batch_norm_apply(x, np.zeros(3, np.float16), invstd)
    out = np.full((4, 3), 7.0, np.float32)
    with pytest.raises(ValueError, match="shape"):
        fn.batch_norm_backward_apply(x, np.ones((4, 4), np.float32), mean, invstd, None,
                                     mean, mean, 4, out=out)
    with pytest.raises(ValueError, match="at least 1"):
        fn.batch_norm_backward_apply(x, x, mean, invstd, None, mean, mean, 0, out=out)
    np.testing.assert_array_equal(out, 7.0)
    np.testing.assert_array_equal(rm, 0.0)


def test_jax_arrays_in_and_out():
    jax = pytest.importorskip("jax")
    jnp = jax.numpy
    x, gamma, beta, dy = _data((6, 3, 5), 1, np.float32)
    x64 = jax.config.jax_enable_x64
    if not x64:
        with pytest.raises(TypeError, match="jax_enable_x64"):
            fn.batch_norm_stats(jnp.asarray(x))
    jax.config.update("jax_enable_x64", True)
    try:
        _jax_round_trip(jnp, x)
    finally:
        jax.config.update("jax_enable_x64", x64)


def _jax_round_trip(jnp, x):
    stats = fn.batch_norm_stats(jnp.asarray(x))
    assert stats.mean.dtype == np.float64
    assert type(stats.mean) is type(jnp.asarray(x))
    merged = fn.batch_norm_combine([stats.count], np.asarray(stats.mean)[None],
                                   np.asarray(stats.m2)[None])
    invstd = fn.batch_norm_finalize(merged.mean, merged.var, merged.count)
    y = fn.batch_norm_apply(jnp.asarray(x), jnp.asarray(merged.mean), jnp.asarray(invstd))
    np.testing.assert_allclose(np.asarray(y), fn.batch_norm(x).y, rtol=1e-6, atol=1e-6)
    with pytest.raises(TypeError, match="immutable"):
        fn.batch_norm_apply(jnp.asarray(x), jnp.asarray(merged.mean), jnp.asarray(invstd),
                            out=jnp.asarray(x))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape,axis", LAYOUTS)
def test_each_phase_matches_the_reference(shape, axis, dtype):
    x, gamma, beta, dy = _data(shape, axis, dtype, seed=7)
    slices = _slices(x, [0, 4, 4])
    stats = [fn.batch_norm_stats(s, axis=axis) for s in slices]
    expected = [ref.batch_norm_stats(s, axis=axis) for s in slices]
    rtol = 1e-6 if dtype == np.float32 else 1e-13
    for got, want in zip(stats, expected):
        assert got.count == want[0]
        spread = np.sqrt(want[2] / max(want[0], 1))
        assert np.all(np.abs(got.mean - want[1]) <= rtol * (np.abs(want[1]) + spread))
        np.testing.assert_allclose(got.m2, want[2], rtol=10 * rtol, atol=0)
    args = ([s.count for s in stats], np.stack([s.mean for s in stats]),
            np.stack([s.m2 for s in stats]))
    merged, want = fn.batch_norm_combine(*args), ref.batch_norm_combine(*args)
    assert merged.count == want[0]
    np.testing.assert_allclose(merged.mean, want[1], rtol=1e-13, atol=1e-13)
    np.testing.assert_allclose(merged.var, want[2], rtol=1e-12)
    invstd = fn.batch_norm_finalize(merged.mean, merged.var, merged.count)
    np.testing.assert_allclose(invstd, 1 / np.sqrt(want[2] + 1e-5), rtol=1e-15)
    y = fn.batch_norm_apply(x, merged.mean, invstd, gamma, beta, axis=axis)
    _assert_close(y, ref.batch_norm_apply(x, merged.mean, invstd, gamma, beta, axis=axis), dtype)
    sums = fn.batch_norm_backward_reduce(dy, x, merged.mean, invstd, axis=axis)
    want = ref.batch_norm_backward_reduce(dy, x, merged.mean, invstd, axis=axis)
    sums_tol = 1e-5 if dtype == np.float32 else 1e-12
    for got, expect in zip(sums, want):
        np.testing.assert_allclose(got, expect, rtol=sums_tol, atol=sums_tol)
    dx = fn.batch_norm_backward_apply(dy, x, merged.mean, invstd, gamma, *sums, merged.count,
                                      axis=axis)
    _assert_close(dx, ref.batch_norm_backward_apply(dy, x, merged.mean, invstd, gamma, *sums,
                                                    merged.count, axis=axis), dtype)


def test_reference_phases_compose_to_the_reference_batch_norm():
    """The split reference against the one-process reference, so that a
    mistake shared by kernel and reference would show."""
    x, gamma, beta, dy = _data((15, 4, 3), 1, np.float64, seed=9)
    parts = [ref.batch_norm_stats(s) for s in _slices(x, [0, 6, 6, 11])]
    count, mean, var = ref.batch_norm_combine([p[0] for p in parts],
                                              np.stack([p[1] for p in parts]),
                                              np.stack([p[2] for p in parts]))
    invstd = 1 / np.sqrt(var + 1e-5)
    whole = ref.batch_norm(x, gamma, beta)
    np.testing.assert_allclose(ref.batch_norm_apply(x, mean, invstd, gamma, beta), whole.y,
                               rtol=1e-12, atol=1e-12)
    sums = ref.batch_norm_backward_reduce(dy, x, mean, invstd)
    dx = ref.batch_norm_backward_apply(dy, x, mean, invstd, gamma, *sums, count)
    expected = ref.batch_norm_backward(dy, x, gamma, whole.save_mean, whole.save_invstd)
    np.testing.assert_allclose(dx, expected[0], rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(sums[1], expected[1], rtol=1e-12, atol=1e-12)
