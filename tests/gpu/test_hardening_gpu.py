"""The hardening rules on the GPU: CuPy operands that share memory with
``out`` are copied first and outputs whose elements share memory are
refused; the inference backward of batch norm; float32 batch norm at
magnitudes near the float32 limit (the element-by-element double fallback);
hardtanh's rounded bounds and elu's from-y tail; and torch CUDA tensors
through the same functions on torch's current stream.

Skipped unless CuPy imports, a CUDA device is visible and this fusednn was
built with its CUDA module.
"""
from __future__ import annotations

import numpy as np
import pytest

import fusednn as fn
from fusednn import reference as ref

from conftest import cupy_or_skip

cp = cupy_or_skip()

pytestmark = pytest.mark.gpu

RNG = np.random.default_rng(5)


def normals(shape, dtype=np.float32, scale=1.0):
    return (RNG.standard_normal(shape) * scale).astype(dtype)


def test_gamma_inside_out_is_copied_first():
    x = cp.asarray(normals((64, 8)))
    out = cp.asarray(normals((64, 8)))
    gamma = out[3]
    expected = ref.batch_norm(cp.asnumpy(x), cp.asnumpy(gamma))
    y = fn.batch_norm(x, gamma, out=out).y
    np.testing.assert_allclose(cp.asnumpy(y), expected.y, rtol=0, atol=2e-6)


def test_mask_inside_out_is_copied_first():
    n = 1 << 20
    g = cp.asarray(normals(n))
    buffer = cp.asarray(normals(n))
    mask = buffer.view(cp.uint8)[:n // 8]
    mask[...] = fn.dropout_mask(n, 0.3, seed=5, offset=2, device="cuda")
    expected = ref.dropout_backward(cp.asnumpy(g), 0.3, mask=cp.asnumpy(mask))
    result = fn.dropout_backward(g, 0.3, mask=mask, out=buffer)
    np.testing.assert_array_max_ulp(cp.asnumpy(result), expected.astype(np.float32), maxulp=1)


def test_out_with_shared_elements_is_refused():
    base = cp.zeros(8, cp.float32)
    out = cp.lib.stride_tricks.as_strided(base, shape=(4, 8), strides=(0, 4))
    with pytest.raises(ValueError, match="share memory"):
        fn.relu(cp.asarray(normals((4, 8))), out=out)


@pytest.mark.parametrize("axis, shape", [(1, (6, 4, 9)), (-1, (30, 5))])
def test_inference_backward(axis, shape):
    x, g = normals(shape), normals(shape)
    channels = shape[axis]
    gamma = normals(channels)
    mean, invstd = normals(channels), np.abs(normals(channels)) + 0.5
    gi, gg, gb = fn.batch_norm_backward(cp.asarray(g), cp.asarray(x), cp.asarray(gamma),
                                        cp.asarray(mean), cp.asarray(invstd), axis=axis,
                                        training=False)
    ei, eg, eb = ref.batch_norm_backward(g, x, gamma, mean, invstd, axis=axis, training=False)
    np.testing.assert_allclose(cp.asnumpy(gi), ei, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(cp.asnumpy(gg), eg, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(cp.asnumpy(gb), eb, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("scale", [1e19, 1e30, 1e37])
@pytest.mark.parametrize("axis, shape", [(1, (8, 3, 50)), (-1, (400, 3))])
def test_batch_norm_at_any_magnitude(scale, axis, shape):
    x = normals(shape, scale=scale)
    y, mean, invstd = fn.batch_norm(cp.asarray(x), axis=axis)
    expected = ref.batch_norm(x, axis=axis)
    np.testing.assert_allclose(cp.asnumpy(y), expected.y, rtol=0, atol=1e-5)
    g = normals(shape)
    gi = fn.batch_norm_backward(cp.asarray(g), cp.asarray(x), None, mean, invstd, axis=axis)[0]
    ei = ref.batch_norm_backward(g, x, None, expected.save_mean, expected.save_invstd,
                                 axis=axis)[0]
    np.testing.assert_allclose(cp.asnumpy(gi), ei, rtol=0, atol=2e-5 * np.abs(ei).max())


def test_batch_norm_extremes_of_both_signs():
    x = np.array([3.0e38, -3.0e38, 1.0e38, -2.5e38, 0.0, 3.4e38], np.float32).reshape(3, 2)
    y = fn.batch_norm(cp.asarray(x), axis=-1).y
    np.testing.assert_allclose(cp.asnumpy(y), ref.batch_norm(x, axis=-1).y, rtol=0, atol=1e-5)


def test_hardtanh_rounded_bounds_and_elu_tail():
    x = np.array([-2, .05, .1, .4, .7, .9, 5], np.float32)
    g = np.ones_like(x)
    y = fn.hardtanh(cp.asarray(x), 0.1, 0.7)
    for kw in ({"x": cp.asarray(x)}, {"y": y}):
        grad = fn.activation_backward("hardtanh", cp.asarray(g), min_val=0.1, max_val=0.7, **kw)
        np.testing.assert_array_equal(cp.asnumpy(grad), [0, 0, 0, 1, 0, 0, 0])
    tail = cp.asarray(np.array([-17, -20, -40], np.float32))
    from_y = fn.activation_backward("elu", cp.ones(3, cp.float32),
                                    y=fn.elu(tail, alpha=7.3), alpha=7.3)
    assert bool((from_y >= 0).all())


def test_torch_cuda_tensors_on_torch_stream():
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available():
        pytest.skip("torch has no CUDA here")
    x = normals((128, 64))
    stream = torch.cuda.Stream()
    with torch.cuda.stream(stream):
        t = torch.from_numpy(x).cuda()
        y = fn.gelu(t)
        out = torch.empty_like(t)
        assert fn.silu(t, out=out) is out
    stream.synchronize()
    assert isinstance(y, torch.Tensor) and y.device == t.device
    np.testing.assert_array_equal(y.cpu().numpy(), fn.gelu(x))
    np.testing.assert_array_equal(out.cpu().numpy(), fn.silu(x))
