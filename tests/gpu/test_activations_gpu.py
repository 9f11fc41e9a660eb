"""The CUDA activation kernels on CuPy arrays: the same cases as the CPU
tests, checked against the float64 reference to the same ulp bounds and
against the CPU kernel, plus what is particular to the device: float16
(computed in float32, held to 1 ulp), the packed and unpacked contiguous
paths, arrays past 2^31 elements, results that stay CuPy arrays on CuPy's
current stream, and arrays from different devices in one call refused
before anything is written.

The whole module is skipped unless CuPy imports, a CUDA device is visible
and this fusednn was built with its CUDA module.
"""
from __future__ import annotations

import numpy as np
import pytest

import fusednn as fn

from conftest import (EXACT, GELU_TAIL, INPUT_KINDS, PARAM_IDS, PARAM_SETS, accepts_output,
                      assert_matches, check_backward_x, check_backward_y, check_forward,
                      cupy_or_skip, grad_for, make_inputs, random_normals, same_bits)

cp = cupy_or_skip()

pytestmark = pytest.mark.gpu

DTYPES = (np.float32, np.float64, np.float16)
dtypes = pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: np.dtype(d).name)
param_sets = pytest.mark.parametrize(("name", "params"), PARAM_SETS, ids=PARAM_IDS)
kinds = pytest.mark.parametrize("kind", INPUT_KINDS)
DEFAULT_SETS = [(name, {}) for name in fn.ACTIVATIONS] + [("gelu", {"approximate": "tanh"})]
default_sets = pytest.mark.parametrize(("name", "params"), DEFAULT_SETS,
                                       ids=[n + ("-tanh" if p else "") for n, p in DEFAULT_SETS])


def on_device(result, like):
    """Checks that result is a CuPy array shaped like `like` and returns it
    on the host."""
    assert isinstance(result, cp.ndarray), type(result)
    assert result.shape == like.shape and result.dtype == like.dtype
    return cp.asnumpy(result)


def on_cpu(function, name, array, **kwargs):
    """function(name, array, **kwargs) run by the CPU kernel; float16, which
    only the GPU takes, is computed in float32 and rounded, as the GPU does."""
    if array.dtype != np.float16:
        return function(name, array, **kwargs)
    kwargs = {k: v.astype(np.float32) if isinstance(v, np.ndarray) else v
              for k, v in kwargs.items()}
    with np.errstate(over="ignore"):
        return function(name, array.astype(np.float32), **kwargs).astype(np.float16)


def agrees_with_cpu(name, gpu: np.ndarray, cpu: np.ndarray) -> None:
    """Bit-identical to the CPU kernel for the exact activations; elsewhere
    the same NaN positions (the values are held to the reference)."""
    if name in EXACT[gpu.dtype]:
        assert same_bits(gpu, cpu)
    else:
        np.testing.assert_array_equal(np.isnan(gpu), np.isnan(cpu))


@param_sets
@dtypes
@kinds
def test_forward(name, params, dtype, kind):
    x = make_inputs(kind, dtype)
    y = on_device(fn.activation(name, cp.asarray(x), **params), x)
    check_forward(name, params, x, y, what=f"CUDA {name}{params} forward")
    agrees_with_cpu(name, y, on_cpu(fn.activation, name, x, **params))
    named = on_device(getattr(fn, name)(cp.asarray(x), **params), x)
    assert same_bits(named, y)


@param_sets
@dtypes
@kinds
def test_backward_from_x(name, params, dtype, kind):
    x = make_inputs(kind, dtype)
    g = grad_for(x)
    gi = on_device(fn.activation_backward(name, cp.asarray(g), x=cp.asarray(x), **params), x)
    check_backward_x(name, params, g, x, gi, what=f"CUDA {name}{params} backward from x")
    agrees_with_cpu(name, gi, on_cpu(fn.activation_backward, name, g, x=x, **params))


@param_sets
@dtypes
@kinds
def test_backward_from_y(name, params, dtype, kind):
    x = make_inputs(kind, dtype)
    y = on_device(fn.activation(name, cp.asarray(x), **params), x)
    g = grad_for(x)
    if not accepts_output(name, params):
        with pytest.raises(ValueError):
            fn.activation_backward(name, cp.asarray(g), y=cp.asarray(y), **params)
        return
    gi = on_device(fn.activation_backward(name, cp.asarray(g), y=cp.asarray(y), **params), x)
    check_backward_y(name, params, g, y, gi, what=f"CUDA {name}{params} backward from y")


SHAPES = [(), (0,), (3, 0, 2), (1,), (7,), (1023,), (65537,), (3, 5, 7), (2, 1, 3, 1, 4)]


@default_sets
@dtypes
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_shapes(name, params, dtype, shape):
    n = int(np.prod(shape))
    x = random_normals(dtype, max(n, 1))[:n].reshape(shape)
    y = on_device(fn.activation(name, cp.asarray(x), **params), x)
    check_forward(name, params, x, y)
    g = grad_for(x)
    gi = on_device(fn.activation_backward(name, cp.asarray(g), x=cp.asarray(x), **params), x)
    check_backward_x(name, params, g, x, gi)


@pytest.mark.parametrize("series", [True, False], ids=["series", "erfc"])
def test_float64_gelu_tail_against_exact_values(series):
    # Below -26 Phi comes from the Mills-ratio series, as on the CPU: 4 ulp.
    # Above, the device's erfc, whose last bits differ from glibc's, gets
    # twice that.
    x, value, slope = (np.array(c) for c in zip(*GELU_TAIL))
    pick = (x < -26) == series
    x, value, slope = x[pick], value[pick], slope[pick]
    ulps = 4 if series else 8
    y = on_device(fn.gelu(cp.asarray(x)), x)
    assert_matches(y, value, ulps=ulps, inputs={"x": x}, what="gelu")
    gi = on_device(fn.activation_backward("gelu", cp.ones(x.shape), x=cp.asarray(x)), x)
    assert_matches(gi, slope, ulps=ulps, inputs={"x": x}, what="gelu'")


@pytest.mark.parametrize("name", ["relu", "sigmoid", "gelu"])
def test_large_array(name):
    x = (np.random.default_rng(11).standard_normal((2_000, 2_500)) * 4).astype(np.float32)
    y = on_device(fn.activation(name, cp.asarray(x)), x)
    check_forward(name, {}, x, y)


def _views(x3, x2, flat):
    return [flat[::3], flat[::-1], x2.T, x2[:, 5], x3[::-2, 1:, ::3],
            x3.transpose(2, 0, 1)[:, ::-1]]


@default_sets
@dtypes
def test_non_contiguous(name, params, dtype):
    host = (random_normals(dtype, 6 * 10 * 14).reshape(6, 10, 14),
            random_normals(dtype, 37 * 29, seed=3).reshape(37, 29),
            random_normals(dtype, 3001, seed=4))
    device = tuple(cp.asarray(a) for a in host)
    for xh, xd in zip(_views(*host), _views(*device)):
        expected = on_device(fn.activation(name, cp.ascontiguousarray(xd), **params), xh)
        assert same_bits(on_device(fn.activation(name, xd, **params), xh), expected)
        g = grad_for(np.ascontiguousarray(xh))
        gd = cp.asarray(g)
        expected = on_device(fn.activation_backward(name, gd, x=cp.ascontiguousarray(xd),
                                                    **params), xh)
        assert same_bits(on_device(fn.activation_backward(name, gd, x=xd, **params), xh),
                         expected)


@default_sets
@dtypes
def test_out_in_place_and_overlap(name, params, dtype):
    x = cp.asarray(random_normals(dtype, 4099))
    expected = cp.asnumpy(fn.activation(name, x, **params))
    out = cp.full_like(x, cp.nan)
    assert fn.activation(name, x, out=out, **params) is out
    assert same_bits(cp.asnumpy(out), expected)

    holder = cp.full((2, 4099), 7.0, dtype=dtype)
    strided_out = holder[0, ::-1]
    assert fn.activation(name, x[::-1], out=strided_out, **params) is strided_out
    assert same_bits(cp.asnumpy(holder[0]), expected)
    assert bool((holder[1] == 7.0).all())

    work = x.copy()
    assert fn.activation(name, work, out=work, **params) is work
    assert same_bits(cp.asnumpy(work), expected)

    buffer = cp.concatenate([x, x[:3]])
    fn.activation(name, buffer[:4099], out=buffer[3:], **params)
    assert same_bits(cp.asnumpy(buffer[3:]), expected)


@default_sets
def test_deterministic(name, params):
    x = cp.asarray(random_normals(np.float32, 1_000_003))
    g = cp.asarray(grad_for(cp.asnumpy(x)))
    first = cp.asnumpy(fn.activation_backward(name, g, x=x, **params))
    second = cp.asnumpy(fn.activation_backward(name, g, x=x, **params))
    assert same_bits(first, second)


@default_sets
@dtypes
def test_unaligned_contiguous(name, params, dtype):
    """Views that start off a 16-byte boundary take the element-wise loop;
    their results must equal those of aligned copies, bit for bit."""
    x = cp.asarray(random_normals(dtype, 4133))
    g = cp.asarray(grad_for(cp.asnumpy(x)))
    for start in range(1, 9):
        view, grad = x[start:], g[start:]
        expected = cp.asnumpy(fn.activation(name, view.copy(), **params))
        assert same_bits(cp.asnumpy(fn.activation(name, view, **params)), expected)
        expected = cp.asnumpy(fn.activation_backward(name, grad.copy(), x=view.copy(), **params))
        assert same_bits(cp.asnumpy(fn.activation_backward(name, grad, x=view, **params)),
                         expected)
        out = cp.empty(view.size + 1, dtype=dtype)[1:]
        assert fn.activation(name, x[:-start], out=out, **params) is out
        assert same_bits(cp.asnumpy(out), cp.asnumpy(fn.activation(name, x[:-start], **params)))


def test_more_than_2_31_elements():
    n = 2**31 + 37
    free, _ = cp.cuda.Device().mem_info
    if free < 3 * 2 * n + (1 << 30):
        pytest.skip("needs about 14 GB of free GPU memory")
    x = cp.full(n, -1.0, dtype=cp.float16)
    x[-5:] = 2.0
    x[2**31 - 2: 2**31 + 2] = 3.0
    y = fn.relu(x)
    assert int(cp.count_nonzero(y)) == 9
    assert bool((y[-5:] == 2.0).all()) and bool((y[2**31 - 2: 2**31 + 2] == 3.0).all())
    del y
    gi = fn.activation_backward("relu", x, x=x)
    assert float(gi[-1]) == 2.0 and float(gi[2**31]) == 3.0 and int(cp.count_nonzero(gi)) == 9


def test_runs_on_the_current_stream():
    host = random_normals(np.float32, 3_000_000)
    x = cp.asarray(host)
    expected = cp.asnumpy(fn.silu(x))
    cp.cuda.Device().synchronize()  # a non-blocking stream does not wait for the default one
    stream = cp.cuda.Stream(non_blocking=True)
    with stream:
        y = fn.silu(x)
        gi = fn.activation_backward("silu", y, x=x)
    stream.synchronize()
    assert same_bits(cp.asnumpy(y), expected)
    check_backward_x("silu", {}, expected, host, on_device(gi, host))


def test_mixed_devices_are_refused():
    host = random_normals(np.float32, 16)
    device = cp.asarray(host)
    with pytest.raises((TypeError, RuntimeError)):
        fn.activation_backward("tanh", device, x=host)
    with pytest.raises((TypeError, RuntimeError)):
        fn.activation_backward("tanh", host, x=device)
    device_out = cp.full_like(device, 5.0)
    with pytest.raises(ValueError, match="out"):
        fn.tanh(host, out=device_out)
    assert bool((device_out == 5.0).all())
    host_out = np.full_like(host, 5.0)
    with pytest.raises(ValueError, match="out"):
        fn.tanh(device, out=host_out)
    assert (host_out == 5.0).all()


@pytest.mark.parametrize("dtype", [np.int32, np.int64, np.complex64, np.bool_],
                         ids=lambda d: np.dtype(d).name)
def test_unsupported_dtype(dtype):
    with pytest.raises(TypeError, match="float32.*float64"):
        fn.relu(cp.zeros(4, dtype=dtype))


def test_bad_out_is_untouched():
    x = cp.asarray(random_normals(np.float32, 20)).reshape(4, 5)
    for out in (cp.full((5, 4), 3.0, cp.float32), cp.full((4, 5), 3.0, cp.float64)):
        with pytest.raises(ValueError, match="out"):
            fn.relu(x, out=out)
        assert bool((out == 3.0).all())
    out = cp.full((4, 5), 3.0, cp.float32)
    with pytest.raises(ValueError):
        fn.leaky_relu(x, negative_slope=float("nan"), out=out)
    assert bool((out == 3.0).all())
