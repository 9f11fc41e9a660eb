"""The CUDA kernels of split-phase batch normalization on CuPy arrays: a
batch cut into uneven slices (one empty) reduced, combined and normalized
on the GPU must give what the GPU's one-process kernels and the CPU's
split phases give; the merge has the same bits on every run; float16 x
keeps float64 statistics. Skipped unless CuPy imports, a CUDA device is
visible and this fusednn was built with its CUDA module.
"""
from __future__ import annotations

import numpy as np
import pytest

import fusednn as fn

from conftest import cupy_or_skip
from test_batchnorm_split import CUTS, LAYOUTS, _data, _slices

cp = cupy_or_skip()

pytestmark = pytest.mark.gpu

TOL = {np.float32: 1e-5, np.float64: 1e-12}


def _phases(x_slices, dy_slices, gamma, beta, axis, running):
    stats = [fn.batch_norm_stats(s, axis=axis) for s in x_slices]
    xp = cp if isinstance(stats[0].mean, cp.ndarray) else np
    merged = fn.batch_norm_combine([s.count for s in stats], xp.stack([s.mean for s in stats]),
                                   xp.stack([s.m2 for s in stats]))
    invstd = fn.batch_norm_finalize(merged.mean, merged.var, merged.count,
                                    running_mean=running[0], running_var=running[1])
    ys = [fn.batch_norm_apply(s, merged.mean, invstd, gamma, beta, axis=axis) for s in x_slices]
    sums = [fn.batch_norm_backward_reduce(g, s, merged.mean, invstd, axis=axis)
            for g, s in zip(dy_slices, x_slices)]
    sum_dy = sum(s[0] for s in sums)
    sum_dy_xhat = sum(s[1] for s in sums)
    dxs = [fn.batch_norm_backward_apply(g, s, merged.mean, invstd, gamma, sum_dy, sum_dy_xhat,
                                        merged.count, axis=axis)
           for g, s in zip(dy_slices, x_slices)]
    return merged, invstd, xp.concatenate(ys), xp.concatenate(dxs), sum_dy, sum_dy_xhat


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("shape,axis", LAYOUTS)
@pytest.mark.parametrize("starts", CUTS)
def test_gpu_split_phases_match_cpu_and_one_process(shape, axis, dtype, starts):
    x, gamma, beta, dy = _data(shape, axis, dtype)
    channels = shape[axis]
    run_gpu = (cp.zeros(channels, np.float32), cp.ones(channels, np.float32))
    run_cpu = (np.zeros(channels, np.float32), np.ones(channels, np.float32))
    gpu = _phases(_slices(cp.asarray(x), starts), _slices(cp.asarray(dy), starts),
                  cp.asarray(gamma), cp.asarray(beta), axis, run_gpu)
    cpu = _phases(_slices(x, starts), _slices(dy, starts), gamma, beta, axis, run_cpu)
    tol = TOL[dtype]
    for g, c in zip(gpu[1:], cpu[1:]):
        np.testing.assert_allclose(cp.asnumpy(g), c, rtol=tol, atol=tol)
    np.testing.assert_allclose(cp.asnumpy(gpu[0].mean), cpu[0].mean, rtol=tol, atol=tol)
    for g, c in zip(run_gpu, run_cpu):
        np.testing.assert_allclose(cp.asnumpy(g), c, rtol=tol, atol=tol)
    one = fn.batch_norm(cp.asarray(x), cp.asarray(gamma), cp.asarray(beta), axis=axis)
    np.testing.assert_allclose(cp.asnumpy(gpu[2]), cp.asnumpy(one.y), rtol=tol, atol=tol)


def test_gpu_combine_same_bits_and_empty_rank():
    rng = np.random.default_rng(3)
    parts = [cp.asarray(rng.standard_normal((n, 6)) + 4) for n in (7, 0, 5)]
    stats = [fn.batch_norm_stats(p) for p in parts]
    assert stats[1].count == 0
    assert not cp.any(stats[1].mean) and not cp.any(stats[1].m2)
    args = ([s.count for s in stats], cp.stack([s.mean for s in stats]),
            cp.stack([s.m2 for s in stats]))
    first, second = fn.batch_norm_combine(*args), fn.batch_norm_combine(*args)
    assert cp.asnumpy(first.var).tobytes() == cp.asnumpy(second.var).tobytes()
    whole = cp.asnumpy(cp.concatenate(parts))
    np.testing.assert_allclose(cp.asnumpy(first.mean), whole.mean(axis=0), rtol=1e-13)
    np.testing.assert_allclose(cp.asnumpy(first.var), whole.var(axis=0), rtol=1e-12)


def test_gpu_half_input_keeps_float64_statistics():
    x = np.random.default_rng(4).standard_normal((64, 8, 5)).astype(np.float16)
    stats = fn.batch_norm_stats(cp.asarray(x))
    assert stats.mean.dtype == np.float64
    expected = fn.batch_norm_stats(x.astype(np.float32))
    np.testing.assert_allclose(cp.asnumpy(stats.mean), expected.mean, rtol=1e-6, atol=1e-6)
