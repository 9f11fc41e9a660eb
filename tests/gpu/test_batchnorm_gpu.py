"""The CUDA batch-norm kernels on CuPy arrays: the CPU tests' cases checked
against the float64 reference to the same tolerances and against the CPU
kernel on the same data, plus what is particular to the device: float16
(computed in float32, float32 statistics), the same bits on every run and
for any strides or alignment of the inputs, results on CuPy's current
stream, and arrays of mixed devices refused before anything is written.

The whole module is skipped unless CuPy imports, a CUDA device is visible
and this fusednn was built with its CUDA module.
"""
from __future__ import annotations

import numpy as np
import pytest

import fusednn as fn
from fusednn import reference as ref

from conftest import cupy_or_skip, same_bits
from test_batchnorm import LAYOUTS, TOL, _backward_out_case, _bad_calls, _data

cp = cupy_or_skip()

pytestmark = pytest.mark.gpu

DTYPES = (np.float32, np.float64)
dtypes = pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: np.dtype(d).name)
layouts = pytest.mark.parametrize("shape,axis", LAYOUTS)
# float16 outputs are rounded once from float32: within half an ulp
# (2^-11 relative) plus the float32 error, and the sums within float32's.
HALF_TOL = 2.0**-10


def host(a):
    assert isinstance(a, cp.ndarray), type(a)
    return cp.asnumpy(a)


def check_close(actual, expected, tol):
    expected = np.asarray(expected, dtype=np.float64)
    assert np.all(np.isfinite(actual))
    err = np.max(np.abs(actual.astype(np.float64) - expected), initial=0.0)
    assert err <= tol, err


def forward_both(x, gamma, beta, axis, **kwargs):
    """The GPU and the CPU forward on the same data, with running statistics
    updated on each: (gpu result on the host, gpu running stats, cpu result,
    cpu running stats)."""
    channels = x.shape[axis]
    rm, rv = np.zeros(channels, x.dtype), np.ones(channels, x.dtype)
    rm_d, rv_d = cp.asarray(rm), cp.asarray(rv)
    gpu = fn.batch_norm(cp.asarray(x), cp.asarray(gamma), cp.asarray(beta), rm_d, rv_d,
                        axis=axis, **kwargs)
    cpu = fn.batch_norm(x, gamma, beta, rm, rv, axis=axis, **kwargs)
    return [host(a) for a in gpu], (host(rm_d), host(rv_d)), cpu, (rm, rv)


@dtypes
@layouts
def test_training_forward_matches_reference_and_cpu(shape, axis, dtype):
    x, gamma, beta = _data(shape, axis, dtype)
    gpu, gpu_running, cpu, cpu_running = forward_both(x, gamma, beta, axis)
    expected = ref.batch_norm(x, gamma, beta, np.zeros(shape[axis]), np.ones(shape[axis]),
                              axis=axis)
    assert all(a.dtype == dtype for a in gpu)
    check_close(gpu[0], expected.y, 2 * TOL[dtype])
    check_close(gpu[0], cpu.y, 4 * TOL[dtype])
    check_close(gpu[1], expected.save_mean, TOL[dtype] * np.abs(expected.save_mean).max())
    np.testing.assert_allclose(gpu[2], expected.save_invstd, rtol=TOL[dtype])
    for got, want in zip(gpu_running, cpu_running):
        np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6 * np.abs(want).max())


@dtypes
@pytest.mark.parametrize("shape,axis", LAYOUTS[:6])
def test_inference_forward_matches_reference(shape, axis, dtype):
    x, gamma, beta = _data(shape, axis, dtype)
    rng = np.random.default_rng(1)
    rm = rng.standard_normal(shape[axis]).astype(dtype)
    rv = rng.uniform(0.5, 9.0, shape[axis]).astype(dtype)
    rm_d, rv_d = cp.asarray(rm), cp.asarray(rv)
    result = fn.batch_norm(cp.asarray(x), cp.asarray(gamma), cp.asarray(beta), rm_d, rv_d,
                           training=False, axis=axis, eps=1e-3)
    expected = ref.batch_norm(x, gamma, beta, rm, rv, training=False, axis=axis, eps=1e-3)
    check_close(host(result.y), expected.y, 4 * TOL[dtype])
    np.testing.assert_array_equal(host(result.save_mean), rm)
    assert same_bits(host(rm_d), rm) and same_bits(host(rv_d), rv)


@pytest.mark.parametrize("shape,axis", [((8, 6, 500), 1), ((4000, 6), -1), ((1, 3, 70001), 1)])
def test_float32_accurate_when_mean_is_1e4_times_std(shape, axis):
    x, _, _ = _data(shape, axis, np.float32, loc=5e3, scale=1.0)
    result = fn.batch_norm(cp.asarray(x), axis=axis)
    expected = ref.batch_norm(x, axis=axis)
    check_close(host(result.y), expected.y, TOL[np.float32])
    dy = np.random.default_rng(2).standard_normal(shape).astype(np.float32)
    grads = fn.batch_norm_backward(cp.asarray(dy), cp.asarray(x), None,
                                   cp.asarray(expected.save_mean),
                                   cp.asarray(expected.save_invstd), axis=axis)
    expected_grads = ref.batch_norm_backward(dy, x, None, expected.save_mean,
                                             expected.save_invstd, axis=axis)
    check_close(host(grads[0]), expected_grads[0], 10 * TOL[np.float32])


@dtypes
@pytest.mark.parametrize("with_gamma", [True, False])
@layouts
def test_backward_matches_reference_and_cpu(shape, axis, dtype, with_gamma):
    x, gamma, _ = _data(shape, axis, dtype)
    gamma = gamma if with_gamma else None
    gamma_d = None if gamma is None else cp.asarray(gamma)
    dy = np.random.default_rng(5).standard_normal(shape).astype(dtype)
    forward = fn.batch_norm(x, gamma, axis=axis)
    grads = [host(g) for g in fn.batch_norm_backward(
        cp.asarray(dy), cp.asarray(x), gamma_d, cp.asarray(forward.save_mean),
        cp.asarray(forward.save_invstd), axis=axis)]
    cpu = fn.batch_norm_backward(dy, x, gamma, forward.save_mean, forward.save_invstd, axis=axis)
    expected = ref.batch_norm_backward(dy, x, gamma, forward.save_mean, forward.save_invstd,
                                       axis=axis)
    m = x.size // shape[axis]
    assert all(g.dtype == dtype for g in grads)
    check_close(grads[0], expected[0], 2 * TOL[dtype])
    check_close(grads[0], cpu[0], 4 * TOL[dtype])
    for got, want in zip(grads[1:], expected[1:]):
        check_close(got, want, TOL[dtype] * np.sqrt(m))


@pytest.mark.parametrize("axis", [1, -1])
@pytest.mark.parametrize("target", ["fresh", "strided", "grad_output", "overlapping"])
def test_backward_out(target, axis):
    base, gamma, dy, x, forward, expected = _backward_out_case(axis)
    shape = dy.shape
    dy_d, x_d = cp.asarray(dy), cp.asarray(x)
    if target == "fresh":
        out = cp.full(shape, cp.nan)
    elif target == "strided":
        out = cp.zeros((*shape, 2))[..., 1]
    elif target == "grad_output":
        out = dy_d
    else:
        base_d = cp.asarray(base)
        x_d, out = base_d[:5], base_d[1:]
    grads = fn.batch_norm_backward(dy_d, x_d, cp.asarray(gamma), cp.asarray(forward.save_mean),
                                   cp.asarray(forward.save_invstd), axis=axis, out=out)
    assert grads[0] is out
    for got, want in zip(grads, expected):
        check_close(host(got), want, 1e-10)


@pytest.mark.parametrize("shape,axis", [((4, 3, 50), 1), ((300, 24), -1), ((2, 16, 7, 9), 1)])
@pytest.mark.parametrize("weights", [np.float16, np.float32], ids=["half-weights", "float-weights"])
def test_float16(shape, axis, weights):
    x, gamma, beta = _data(shape, axis, np.float16, scale=1.0)
    x64 = x.astype(np.float64)
    rm, rv = cp.zeros(shape[axis], cp.float16), cp.ones(shape[axis], cp.float32)
    result = fn.batch_norm(cp.asarray(x), cp.asarray(gamma.astype(weights)),
                           cp.asarray(beta.astype(weights)), rm, rv, axis=axis)
    expected = ref.batch_norm(x64, gamma.astype(weights).astype(np.float64),
                              beta.astype(weights).astype(np.float64), axis=axis)
    y = host(result.y)
    assert y.dtype == np.float16
    assert result.save_mean.dtype == np.float32 and result.save_invstd.dtype == np.float32
    assert rm.dtype == np.float16 and rv.dtype == np.float32
    check_close(y, expected.y, HALF_TOL * max(1.0, np.abs(expected.y).max()))
    check_close(host(result.save_mean), expected.save_mean,
                1e-6 * max(1.0, np.abs(expected.save_mean).max()))
    dy = np.random.default_rng(3).standard_normal(shape).astype(np.float16)
    grads = fn.batch_norm_backward(cp.asarray(dy), cp.asarray(x), cp.asarray(gamma.astype(weights)),
                                   result.save_mean, result.save_invstd, axis=axis)
    want = ref.batch_norm_backward(dy.astype(np.float64), x64,
                                   gamma.astype(weights).astype(np.float64),
                                   host(result.save_mean), host(result.save_invstd), axis=axis)
    assert grads[0].dtype == cp.float16 and grads[1].dtype == cp.float32
    gi = host(grads[0])
    check_close(gi, want[0], HALF_TOL * max(1.0, np.abs(want[0]).max()))
    m = x.size // shape[axis]
    check_close(host(grads[1]), want[1], 1e-5 * np.sqrt(m))
    check_close(host(grads[2]), want[2], 1e-5 * np.sqrt(m))


def _all_outputs(x, dy, axis):
    channels = x.shape[axis]
    rm, rv = cp.zeros(channels, x.dtype), cp.ones(channels, x.dtype)
    result = fn.batch_norm(x, None, None, rm, rv, axis=axis)
    grads = fn.batch_norm_backward(dy, x, None, result.save_mean, result.save_invstd, axis=axis)
    return [host(a) for a in (*result, rm, rv, *grads)]


@dtypes
@pytest.mark.parametrize("shape,axis", [((6, 5, 30001), 1), ((40000, 37), -1), ((3, 300, 7), 1),
                                        ((64, 128, 14, 14), 1), ((64, 14, 14, 128), -1)])
def test_same_bits_every_run_and_for_any_strides(shape, axis, dtype):
    """The units depend on the shape alone and the vector loads fetch what
    the scalar ones would, in the same order: a run, a rerun, a reversed
    view, a view of a transposed copy and an unaligned copy give the same
    bits."""
    x, _, _ = _data(shape, axis, dtype)
    dy = np.random.default_rng(6).standard_normal(shape).astype(dtype)
    xd, dyd = cp.asarray(x), cp.asarray(dy)
    baseline = _all_outputs(xd, dyd, axis)
    assert all(same_bits(a, b) for a, b in zip(_all_outputs(xd, dyd, axis), baseline))
    for make in (lambda a: cp.ascontiguousarray(a[::-1])[::-1],
                 lambda a: cp.asfortranarray(a),
                 lambda a: cp.concatenate([cp.zeros(1, a.dtype), a.ravel()])[1:].reshape(a.shape)):
        got = _all_outputs(make(xd), make(dyd), axis)
        for a, b in zip(got, baseline):
            assert same_bits(a, b)


def test_out_in_place_and_overlap():
    x, gamma, beta = _data((8, 4, 9, 5), 1, np.float32)
    xd, gd, bd = cp.asarray(x), cp.asarray(gamma), cp.asarray(beta)
    expected = host(fn.batch_norm(xd, gd, bd).y)
    out = cp.full_like(xd, cp.nan)
    assert fn.batch_norm(xd, gd, bd, out=out).y is out
    assert same_bits(host(out), expected)
    holder = cp.zeros((8, 4, 18, 6), cp.float32)
    strided = holder[:, :, ::2, 1:]
    fn.batch_norm(xd, gd, bd, out=strided)
    assert same_bits(host(strided), expected)
    assert bool((holder[:, :, 1::2] == 0).all()) and bool((holder[..., 0] == 0).all())
    work = xd.copy()
    fn.batch_norm(work, gd, bd, out=work)
    assert same_bits(host(work), expected)
    base = cp.concatenate([xd, xd[:1]])
    fn.batch_norm(base[:8], gd, bd, out=base[1:])
    assert same_bits(host(base[1:]), expected)


@pytest.mark.parametrize("view", ["slice", "transpose", "fortran", "reversed", "channel_slice"])
@pytest.mark.parametrize("axis", [1, -1])
def test_non_contiguous_inputs(view, axis):
    x, _, _ = _data((6, 8, 10, 12), 1, np.float32)
    dy = np.random.default_rng(7).standard_normal(x.shape).astype(np.float32)
    make = {
        "slice": lambda a: a[:, :, ::2, 1:],
        "transpose": lambda a: a.transpose(0, 3, 2, 1),
        "fortran": lambda a: a.T.copy().T,
        "reversed": lambda a: a[::-1, :, :, ::-1],
        "channel_slice": lambda a: a[:, ::2],
    }[view]
    xv, dyv = make(x), make(dy)
    xd, dyd = make(cp.asarray(x)), make(cp.asarray(dy))
    gamma = np.linspace(0.5, 1.5, xv.shape[axis]).astype(np.float32)
    result = fn.batch_norm(xd, cp.asarray(gamma), axis=axis)
    expected = ref.batch_norm(xv, gamma, axis=axis)
    check_close(host(result.y), expected.y, 2 * TOL[np.float32])
    grads = fn.batch_norm_backward(dyd, xd, cp.asarray(gamma), result.save_mean,
                                   result.save_invstd, axis=axis)
    want = ref.batch_norm_backward(dyv, xv, gamma, host(result.save_mean),
                                   host(result.save_invstd), axis=axis)
    check_close(host(grads[0]), want[0], 2 * TOL[np.float32])
    check_close(host(grads[1]), want[1], 30 * TOL[np.float32])


def test_nan_stays_in_its_channel():
    x, gamma, beta = _data((6, 4, 5), 1, np.float32)
    x[2, 1, 3] = np.nan
    rm, rv = cp.zeros(4, cp.float32), cp.ones(4, cp.float32)
    result = fn.batch_norm(cp.asarray(x), cp.asarray(gamma), cp.asarray(beta), rm, rv)
    y = host(result.y)
    others = [0, 2, 3]
    assert np.all(np.isnan(y[:, 1])) and np.all(np.isfinite(y[:, others]))
    assert np.isnan(host(rm)[1]) and np.all(np.isfinite(host(rv)[others]))
    grads = fn.batch_norm_backward(cp.ones_like(result.y), cp.asarray(x), cp.asarray(gamma),
                                   result.save_mean, result.save_invstd)
    gi = host(grads[0])
    assert np.all(np.isnan(gi[:, 1])) and np.all(np.isfinite(gi[:, others]))


@pytest.mark.parametrize("shape,axis", [((5, 0, 3), 1), ((0, 3), -1), ((0, 3, 4), 1)])
def test_empty_in_inference_and_backward(shape, axis):
    channels = shape[axis]
    x = cp.zeros(shape, cp.float32)
    rm, rv = cp.arange(channels, dtype=cp.float32), cp.full(channels, 4.0, cp.float32)
    result = fn.batch_norm(x, running_mean=rm, running_var=rv, training=False, axis=axis)
    assert result.y.shape == shape
    np.testing.assert_array_equal(host(result.save_mean), host(rm))
    grads = fn.batch_norm_backward(x, x, None, rm, rv, axis=axis)
    assert grads[0].shape == shape
    np.testing.assert_array_equal(host(grads[1]), np.zeros(channels, np.float32))
    np.testing.assert_array_equal(host(grads[2]), np.zeros(channels, np.float32))


def test_zero_channels_in_training():
    result = fn.batch_norm(cp.zeros((4, 0, 3)))
    assert result.y.shape == (4, 0, 3) and result.save_mean.shape == (0,)


def test_runs_on_the_current_stream():
    x, gamma, beta = _data((16, 32, 40, 40), 1, np.float32)
    xd, gd, bd = cp.asarray(x), cp.asarray(gamma), cp.asarray(beta)
    expected = [host(a) for a in fn.batch_norm(xd, gd, bd)]
    cp.cuda.Device().synchronize()  # a non-blocking stream does not wait for the default one
    stream = cp.cuda.Stream(non_blocking=True)
    with stream:
        result = fn.batch_norm(xd, gd, bd)
        grads = fn.batch_norm_backward(result.y, xd, gd, result.save_mean, result.save_invstd)
    stream.synchronize()
    assert all(same_bits(host(a), b) for a, b in zip(result, expected))
    assert np.all(np.isfinite(host(grads[0])))


def _on_device(value):
    return cp.asarray(value) if isinstance(value, np.ndarray) else value


@pytest.mark.parametrize("label,override,error", _bad_calls(), ids=[c[0] for c in _bad_calls()])
def test_bad_input_raises_and_changes_nothing(label, override, error):
    x, gamma, beta = _data((2, 4, 3, 3), 1, np.float32)
    kwargs = {"x": x, "gamma": gamma, "beta": beta,
              "running_mean": np.zeros(4, np.float32), "running_var": np.ones(4, np.float32),
              "out": np.full(x.shape, 7.0, np.float32)}
    kwargs.update(override)
    if label == "running_var dtype":  # float16 running statistics are fine on the GPU
        kwargs["running_var"] = np.ones(4, np.int32)
    kwargs = {k: _on_device(v) for k, v in kwargs.items()}
    snapshots = {k: host(v) for k, v in kwargs.items() if isinstance(v, cp.ndarray)}
    with pytest.raises(error):
        fn.batch_norm(**kwargs)
    for k, before in snapshots.items():
        np.testing.assert_array_equal(host(kwargs[k]), before, err_msg=k)


def test_mixed_devices_are_refused_and_change_nothing():
    x, gamma, _ = _data((5, 4), 1, np.float32)
    xd = cp.asarray(x)
    rm = cp.zeros(4, cp.float32)
    with pytest.raises(TypeError, match="cupy"):
        fn.batch_norm(xd, gamma, running_mean=rm)
    with pytest.raises(TypeError, match="cupy"):
        fn.batch_norm(x, running_mean=rm)
    assert bool((rm == 0).all())
    host_out = np.full(x.shape, 5.0, np.float32)
    with pytest.raises(ValueError, match="out"):
        fn.batch_norm(xd, out=host_out)
    assert (host_out == 5.0).all()
    result = fn.batch_norm(xd)
    with pytest.raises(TypeError, match="cupy"):
        fn.batch_norm_backward(xd, x, None, result.save_mean, result.save_invstd)


def test_float16_weights_of_other_dtypes_are_refused():
    x = cp.ones((4, 3), cp.float16)
    with pytest.raises(TypeError, match="float16 or float32"):
        fn.batch_norm(x, cp.ones(3, cp.float64))
    with pytest.raises(TypeError, match="float32"):
        fn.batch_norm(cp.ones((4, 3), cp.float32), cp.ones(3, cp.float16))
