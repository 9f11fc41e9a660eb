"""The CUDA dropout kernels and the fused bias + activation + dropout
epilogue on CuPy arrays: masks equal to the CPU's and the reference's bit
for bit (random seeds, offsets past 2^32, odd sizes, strided and unaligned
views, arrays past 2^31 elements, starts inside a Philox block and past
2^62), outputs equal to the CPU kernel's
(float16 bit for bit the CPU kernel's float16), backward from the mask
and from (seed, offset), grad_bias reduced deterministically, results on
CuPy's current stream, and bad input refused before anything is written.

The whole module is skipped unless CuPy imports, a CUDA device is visible
and this fusednn was built with its CUDA module.
"""
from __future__ import annotations

import math

import numpy as np
import pytest

import fusednn as fn
from fusednn import nn
from fusednn import reference as ref

from conftest import EXACT, cupy_or_skip, same_bits

cp = cupy_or_skip()

pytestmark = pytest.mark.gpu

DTYPES = (np.float32, np.float64, np.float16)
dtypes = pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: np.dtype(d).name)
SIZES = [0, 1, 3, 4, 5, 7, 8, 9, 15, 63, 64, 65, 1000, 4097, 2**16 + 13, 3 * 2**17 + 5]
STREAMS = [(0, 0), (1, 2), (2**32 + 5, 2**32 + 7), (2**64 - 1, 2**64 - 1), (987654321, 2**40)]
ACTIVATION_CASES = [(name, {}) for name in fn.ACTIVATIONS] + [
    ("leaky_relu", {"negative_slope": 0.2}), ("elu", {"alpha": 0.5}),
    ("gelu", {"approximate": "tanh"}), ("softplus", {"beta": 2.0, "threshold": 5.0}),
    ("hardtanh", {"min_val": -0.5, "max_val": 2.0}),
]
ACTIVATION_IDS = [name + "".join(f"-{k}={v}" for k, v in params.items())
                  for name, params in ACTIVATION_CASES]
activation_cases = pytest.mark.parametrize(("act", "params"), ACTIVATION_CASES,
                                           ids=ACTIVATION_IDS)


def host(result, like_shape=None, dtype=None):
    """Checks that result is a CuPy array (of the given shape and dtype) and
    returns it on the host."""
    assert isinstance(result, cp.ndarray), type(result)
    if like_shape is not None:
        assert result.shape == tuple(like_shape)
    if dtype is not None:
        assert result.dtype == dtype
    return cp.asnumpy(result)


def cpu_dropout(x, p, **kwargs):
    """The CPU kernel's dropout (float16 included: both devices round the
    exact x * scale once)."""
    return fn.dropout(x, p, **kwargs)


def random_stream(rng):
    return tuple(int(v) for v in rng.integers(0, 2**64, size=2, dtype=np.uint64))


# ---- the mask ---------------------------------------------------------------------

@pytest.mark.parametrize("n", SIZES)
@pytest.mark.parametrize("seed,offset", STREAMS)
def test_mask_equals_cpu_and_reference(n, seed, offset):
    mask = host(fn.dropout_mask(n, 0.37, seed=seed, offset=offset, device="cuda"),
                ((n + 7) // 8,), np.uint8)
    np.testing.assert_array_equal(mask, fn.dropout_mask(n, 0.37, seed=seed, offset=offset))
    np.testing.assert_array_equal(mask, ref.dropout_mask(n, 0.37, seed=seed, offset=offset))


@pytest.mark.parametrize("p", [0.0, 0.1, 0.5, 0.9, 1.0])
def test_mask_random_seeds(p):
    rng = np.random.default_rng(int(p * 10) + 100)
    for _ in range(8):
        n = int(rng.integers(1, 70_000))
        seed, offset = random_stream(rng)
        shape = (n // 7, 7) if n % 2 else (n,)
        gpu = host(fn.dropout_mask(shape, p, seed=seed, offset=offset, device="cuda"))
        np.testing.assert_array_equal(gpu, fn.dropout_mask(shape, p, seed=seed, offset=offset))


def test_mask_of_zero_d_and_empty_shapes():
    assert host(fn.dropout_mask((), 0.5, seed=1, device="cuda")).shape == (1,)
    assert host(fn.dropout_mask((4, 0), 0.5, seed=1, device="cuda")).shape == (0,)


# ---- dropout forward and backward ------------------------------------------------------

@pytest.mark.parametrize("n", SIZES)
@dtypes
def test_forward_equals_cpu(n, dtype):
    rng = np.random.default_rng(n)
    seed, offset = int(rng.integers(0, 2**63)), int(rng.integers(2**32, 2**63))
    x = (rng.standard_normal(n) * 3).astype(dtype)
    y, mask = fn.dropout(cp.asarray(x), 0.25, seed=seed, offset=offset, return_mask=True)
    y, mask = host(y, x.shape, dtype), host(mask, ((n + 7) // 8,), np.uint8)
    np.testing.assert_array_equal(mask, ref.dropout_mask(n, 0.25, seed=seed, offset=offset))
    assert same_bits(y, cpu_dropout(x, 0.25, seed=seed, offset=offset))
    plain = host(fn.dropout(cp.asarray(x), 0.25, seed=seed, offset=offset))
    assert same_bits(plain, y)


@dtypes
@pytest.mark.parametrize("p", [0.0, 0.3, 1.0])
def test_backward_from_mask_and_from_seed(dtype, p):
    rng = np.random.default_rng(5)
    n = 2**16 + 3
    g = rng.standard_normal(n).astype(dtype)
    gd = cp.asarray(g)
    _, mask = fn.dropout(gd, p, seed=12, offset=2**35, return_mask=True)
    from_mask = host(fn.dropout_backward(gd, p, mask=mask), g.shape, dtype)
    from_seed = host(fn.dropout_backward(gd, p, seed=12, offset=2**35), g.shape, dtype)
    assert same_bits(from_mask, from_seed)
    assert same_bits(from_seed, cpu_dropout(g, p, seed=12, offset=2**35))
    # A mask drawn on the CPU gives the same gradient.
    cpu_mask = cp.asarray(fn.dropout_mask(n, p, seed=12, offset=2**35))
    assert same_bits(host(fn.dropout_backward(gd, p, mask=cpu_mask)), from_seed)


# ---- start: a slice of a larger array ------------------------------------------------

START_SIZES = [0, 1, 3, 4, 7, 8, 9, 17, 1000, 100003]
STARTS = [0, 1, 2, 3, 4, 5, 7, 63, 64, 65, 2**32 - 3, 2**62 - 3, 2**62 + 1, 2**64 - 100003]


@pytest.mark.parametrize("start", STARTS)
@pytest.mark.parametrize("n", START_SIZES)
def test_start_masks_equal_cpu_and_reference(n, start):
    kw = {"seed": 2**40 + 977, "offset": 2**33 + 5, "start": start}
    mask = host(fn.dropout_mask(n, 0.37, device="cuda", **kw), ((n + 7) // 8,), np.uint8)
    np.testing.assert_array_equal(mask, fn.dropout_mask(n, 0.37, **kw))
    np.testing.assert_array_equal(mask, ref.dropout_mask(n, 0.37, **kw))


@pytest.mark.parametrize("start", [1, 2, 3, 4, 65, 2**62 + 1])
@dtypes
def test_start_outputs_equal_cpu(start, dtype):
    rng = np.random.default_rng(start % 1000)
    kw = {"seed": 77, "offset": 2**35, "start": start}
    for shape in [(100003,), (37, 5, 3), (300, 257)]:
        x = rng.standard_normal(shape).astype(dtype)
        bias = rng.standard_normal(shape[-1]).astype(dtype)
        xd, bd = cp.asarray(x), cp.asarray(bias)
        y, mask = fn.dropout(xd, 0.3, return_mask=True, **kw)
        np.testing.assert_array_equal(host(mask), ref.dropout_mask(shape, 0.3, **kw))
        assert same_bits(host(y), cpu_dropout(x, 0.3, **kw))
        assert same_bits(host(fn.dropout_backward(xd, 0.3, **kw)), host(y))
        out, omask = fn.bias_act_dropout(xd, bd, "relu", 0.3, return_mask=True, **kw)
        np.testing.assert_array_equal(host(omask), host(mask))
        agrees("relu", host(out), on_cpu(fn.bias_act_dropout, x, bias, act="relu", p=0.3, **kw))
        gh, gb = fn.bias_act_dropout_backward(xd, xd, bd, "relu", 0.3, **kw)
        gh_m, gb_m = fn.bias_act_dropout_backward(xd, xd, bd, "relu", 0.3, mask=mask)
        assert same_bits(host(gh), host(gh_m)) and same_bits(host(gb), host(gb_m))


@pytest.mark.parametrize("start", [1, 3, 2**32 - 3])
def test_start_strided_views_use_logical_order(start):
    base = np.random.default_rng(3).standard_normal((37, 29, 6)).astype(np.float32)
    views, device_views = _views(base), _views(cp.asarray(base))
    for name, x in views.items():
        xd = device_views[name]
        y, mask = fn.dropout(xd, 0.4, seed=5, start=start, return_mask=True)
        np.testing.assert_array_equal(host(mask), ref.dropout_mask(x.shape, 0.4, seed=5,
                                                                   start=start), err_msg=name)
        assert same_bits(host(y), fn.dropout(x, 0.4, seed=5, start=start)), name
        assert same_bits(host(fn.dropout_backward(xd, 0.4, seed=5, start=start)), host(y)), name


def _views(array):
    """Strided views of a (37, 29, 6) array (numpy or CuPy), by name."""
    xp = cp.get_array_module(array)
    return {
        "sliced": array[::2, 1::3, :5],
        "transposed": array.transpose(2, 0, 1),
        "reversed": array[::-1, :, ::-2],
        "broadcast_row": xp.broadcast_to(array[0, 0], (11, 6)),
        "column": array[:, 3, 2],
        "flat_step": array.reshape(-1)[::3],
    }


@pytest.mark.parametrize("name", list(_views(np.zeros((37, 29, 6)))))
@dtypes
def test_strided_inputs_use_logical_order(name, dtype):
    base = (np.random.default_rng(3).standard_normal((37, 29, 6)) * 2).astype(dtype)
    x, xd = _views(base)[name], _views(cp.asarray(base))[name]
    y, mask = fn.dropout(xd, 0.5, seed=11, offset=2**33 + 3, return_mask=True)
    np.testing.assert_array_equal(host(mask), ref.dropout_mask(x.shape, 0.5, seed=11,
                                                               offset=2**33 + 3))
    expected = cpu_dropout(np.ascontiguousarray(x), 0.5, seed=11, offset=2**33 + 3)
    assert same_bits(host(y, x.shape), expected)
    g = host(fn.dropout_backward(xd, 0.5, seed=11, offset=2**33 + 3))
    assert same_bits(g, expected)


@dtypes
def test_strided_out_and_in_place(dtype):
    x = cp.asarray(np.random.default_rng(0).standard_normal((50, 40)).astype(dtype))
    expected = host(fn.dropout(x, 0.3, seed=1, offset=2))
    holder = cp.full((50, 80), 7.0, dtype=dtype)
    out = holder[:, ::-2]
    assert fn.dropout(x, 0.3, seed=1, offset=2, out=out) is out
    assert same_bits(host(out), expected)
    assert bool((holder[:, 0::2] == 7.0).all())
    work = x.copy()
    assert fn.dropout(work, 0.3, seed=1, offset=2, out=work) is work
    assert same_bits(host(work), expected)
    # An overlapping but different view is read before it is written.
    buffer = cp.concatenate([x.reshape(-1), x.reshape(-1)[:5]])
    fn.dropout(buffer[:2000].reshape(50, 40), 0.3, seed=1, offset=2,
               out=buffer[5:].reshape(50, 40))
    assert same_bits(host(buffer[5:]).reshape(50, 40), expected)


@dtypes
def test_unaligned_views_equal_aligned_copies(dtype):
    """Views that start off a 16-byte boundary take the element-wise path;
    starts off a multiple of 8 elements put the mask's bytes elsewhere in
    memory than the array's units. Both must agree with aligned copies."""
    x = cp.asarray(np.random.default_rng(2).standard_normal(4133).astype(dtype))
    for start in range(1, 10):
        view = x[start:]
        y, mask = fn.dropout(view, 0.4, seed=3, offset=7, return_mask=True)
        y_copy, mask_copy = fn.dropout(view.copy(), 0.4, seed=3, offset=7, return_mask=True)
        assert same_bits(host(y), host(y_copy))
        np.testing.assert_array_equal(host(mask), host(mask_copy))
        out = cp.empty(view.size + 1, dtype=dtype)[1:]
        assert fn.dropout(view, 0.4, seed=3, offset=7, out=out) is out
        assert same_bits(host(out), host(y_copy))


def test_nan_infinity_and_signed_zero_like_the_cpu():
    x = np.array([np.nan, np.inf, -np.inf, -2.0] * 16, dtype=np.float32)
    y = host(fn.dropout(cp.asarray(x), 0.5, seed=8))
    assert same_bits(y, fn.dropout(x, 0.5, seed=8))
    assert np.isnan(y[0::4]).all() and np.all(np.signbit(y[3::4]))


def test_inference_and_zero_d():
    x = cp.asarray(np.random.default_rng(6).standard_normal((4, 5)))
    y, mask = fn.dropout(x, 0.5, seed=1, training=False, return_mask=True)
    assert y is not x and bool((y == x).all())
    assert host(mask).tolist() == [255, 255, 15]
    out = cp.empty_like(x)
    assert fn.dropout(x, 0.5, seed=1, training=False, out=out) is out
    assert bool((out == x).all())
    y, mask = fn.dropout(cp.asarray(np.float32(3.0)), 0.0, seed=1, return_mask=True)
    assert y.shape == () and float(y) == 3.0 and host(mask).tolist() == [1]
    y, mask = fn.dropout(cp.zeros((0, 5), cp.float32), 0.5, seed=1, return_mask=True)
    assert y.shape == (0, 5) and mask.shape == (0,)


def test_runs_on_the_current_stream():
    x = cp.asarray(np.random.default_rng(9).standard_normal(3_000_001).astype(np.float32))
    expected_y, expected_mask = (host(a) for a in fn.dropout(x, 0.2, seed=4, offset=5,
                                                            return_mask=True))
    cp.cuda.Device().synchronize()  # a non-blocking stream does not wait for the default one
    stream = cp.cuda.Stream(non_blocking=True)
    with stream:
        y, mask = fn.dropout(x, 0.2, seed=4, offset=5, return_mask=True)
        g = fn.dropout_backward(y, 0.2, mask=mask)
        drawn = fn.dropout_mask(x.shape, 0.2, seed=4, offset=5, device="cuda")
    stream.synchronize()
    assert same_bits(host(y), expected_y)
    np.testing.assert_array_equal(host(mask), expected_mask)
    np.testing.assert_array_equal(host(drawn), expected_mask)
    assert same_bits(host(g), host(fn.dropout(y, 0.2, seed=4, offset=5)))


def test_more_than_2_31_elements():
    n = 2**31 + 37
    free, _ = cp.cuda.Device().mem_info
    if free < 2 * 2 * n + n // 8 + (1 << 30):
        pytest.skip("needs about 10 GB of free GPU memory")
    x = cp.ones(n, dtype=cp.float16)
    y, mask = fn.dropout(x, 0.5, seed=21, offset=2**40, return_mask=True)
    expected = fn.dropout_mask(n, 0.5, seed=21, offset=2**40)
    got = cp.asnumpy(mask)
    np.testing.assert_array_equal(got, expected)
    del mask
    valid = 7 * 8 + n % 8  # bits of the last 8 mask bytes that hold elements
    keep = np.unpackbits(expected[-8:], bitorder="little")[:valid][-37:].astype(bool)
    tail = cp.asnumpy(y[-37:])
    np.testing.assert_array_equal(tail, np.where(keep, 2.0, 0.0).astype(np.float16))
    ones_per_byte = np.array([bin(b).count("1") for b in range(256)], dtype=np.uint8)
    assert int(cp.count_nonzero(y)) == int(ones_per_byte[expected].sum(dtype=np.int64))


# ---- the fused epilogue ----------------------------------------------------------------

def exact_sum_inputs(shape, axis, dtype, seed=0):
    """h and bias whose sum is exact in the dtype (few significant bits), so
    that the comparisons see the kernels' own errors."""
    rng = np.random.default_rng(seed)
    h = np.round(rng.uniform(-6, 6, shape) * 2**6) / 2**6
    bias = np.round(rng.uniform(-2, 2, shape[axis]) * 2**3) / 2**3
    return h.astype(dtype), bias.astype(dtype)


def on_cpu(function, *arrays, **kwargs):
    """function run by the CPU kernels; float16 arrays in float32, the
    results rounded back to float16 (what the GPU computes)."""
    half = arrays[0].dtype == np.float16
    args = [a.astype(np.float32) if half else a for a in arrays]
    result = function(*args, **kwargs)
    if not half:
        return result
    if isinstance(result, tuple):
        return tuple(r.astype(np.float16) if r.dtype == np.float32 else r for r in result)
    return result.astype(np.float16)


def agrees(name, gpu, cpu, grad=None):
    """Bit-identical to the CPU for the activations that round once;
    elsewhere within the activations' ulp bound of each other (both are
    held to the reference by the CPU and activation tests), with the same
    NaN positions. For gradients (grad: grad_output / keep), where a
    derivative's terms cancel near its root, an absolute 8 eps * |grad|
    instead (DESIGN section 6): float64 GELU calls the device's own erfc,
    whose last bit the cancellation magnifies."""
    if name in EXACT[gpu.dtype]:
        assert same_bits(gpu, cpu)
        return
    np.testing.assert_array_equal(np.isnan(gpu), np.isnan(cpu))
    finite = np.isfinite(cpu)
    # The activation's bound each way plus the scale's rounding (float16:
    # one rounding of float32 values that may differ in their last bits).
    ulps = {np.float16: 1, np.float32: 10, np.float64: 64}[gpu.dtype.type]
    allowed = ulps * np.spacing(np.abs(cpu[finite])).astype(np.float64)
    if grad is not None:
        allowed += 8 * np.finfo(gpu.dtype).eps * np.abs(grad[finite].astype(np.float64))
    error = np.abs(gpu[finite].astype(np.float64) - cpu[finite].astype(np.float64))
    assert np.all(error <= allowed), f"largest excess {np.max(error - allowed)}"


@activation_cases
@dtypes
def test_fused_forward_equals_cpu(act, params, dtype):
    h, bias = exact_sum_inputs((64, 33), 1, dtype)
    out, mask = fn.bias_act_dropout(cp.asarray(h), cp.asarray(bias), act, 0.3, seed=5,
                                    offset=2**33, return_mask=True, **params)
    out, mask = host(out, h.shape, dtype), host(mask)
    np.testing.assert_array_equal(mask, ref.dropout_mask(h.shape, 0.3, seed=5, offset=2**33))
    cpu = on_cpu(fn.bias_act_dropout, h, bias, act=act, p=0.3, seed=5, offset=2**33, **params)
    agrees(act, out, cpu)


@activation_cases
@dtypes
def test_fused_backward_equals_cpu(act, params, dtype):
    h, bias = exact_sum_inputs((96, 17), 1, dtype, seed=1)
    g = np.random.default_rng(2).standard_normal(h.shape).astype(dtype)
    hd, bd, gd = cp.asarray(h), cp.asarray(bias), cp.asarray(g)
    grad_h, grad_bias = fn.bias_act_dropout_backward(gd, hd, bd, act, 0.25, seed=9, offset=4,
                                                     **params)
    grad_h, grad_bias = host(grad_h, h.shape, dtype), host(grad_bias, (17,), dtype)
    cpu_h, _ = on_cpu(fn.bias_act_dropout_backward, g, h, bias, act=act, p=0.25, seed=9,
                      offset=4, **params)
    agrees(act, grad_h, cpu_h, grad=g / 0.75)
    # grad_bias is the sum of the GPU's own grad_h, accumulated in float64:
    # for float32 and float16 one rounding at the end; for float64 the
    # summation itself rounds, at most once per row, each error at most eps
    # times the sum of magnitudes.
    want = np.array([math.fsum(column) for column in grad_h.astype(np.float64).T])
    roundings = h.shape[0] if dtype == np.float64 else 1
    tolerance = roundings * np.finfo(dtype).eps * (
        np.abs(grad_h).astype(np.float64).sum(axis=0) + 1e-30)
    assert np.all(np.abs(grad_bias.astype(np.float64) - want) <= tolerance)
    _, mask = fn.bias_act_dropout(hd, bd, act, 0.25, seed=9, offset=4, return_mask=True,
                                  **params)
    from_mask = fn.bias_act_dropout_backward(gd, hd, bd, act, 0.25, mask=mask, **params)
    assert same_bits(host(from_mask[0]), grad_h) and same_bits(host(from_mask[1]), grad_bias)


@pytest.mark.parametrize("shape,axis", [
    ((7, 5, 3, 4), 1), ((7, 5, 3, 4), -1), ((7, 5, 3, 4), 0), ((9, 130), -1), ((130,), 0),
    ((3, 1, 1), 1), ((1000, 37), -1), ((70_001, 5), 1), ((600, 3, 50), 1), ((6, 40, 4099), 1),
    ((2, 3, 70_000), 2), ((40_000, 2, 3), 0), ((64, 2, 20_000), 1)])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_grad_bias_exact_sums_equal_the_cpu(shape, axis, dtype):
    """With p = 0 and relu on positive inputs grad_h is grad_output, and
    small integers sum exactly: any element summed twice, missed or put in
    the wrong channel shows, whatever the order of the sums."""
    rng = np.random.default_rng(len(shape) + shape[0])
    h = rng.uniform(1, 2, shape).astype(dtype)
    bias = np.zeros(shape[axis], dtype)
    g = rng.integers(-8, 9, shape).astype(dtype)
    grad_h, grad_bias = fn.bias_act_dropout_backward(cp.asarray(g), cp.asarray(h),
                                                     cp.asarray(bias), "relu", 0.0, seed=1,
                                                     axis=axis)
    cpu_h, cpu_bias = fn.bias_act_dropout_backward(g, h, bias, "relu", 0.0, seed=1, axis=axis)
    assert same_bits(host(grad_h, shape, dtype), cpu_h)
    assert same_bits(host(grad_bias, (shape[axis],), dtype), cpu_bias)


@pytest.mark.parametrize("shape,axis", [((3000, 100), -1), ((40, 16, 30, 30), 1),
                                        ((50_000, 3), 0)])
def test_grad_bias_same_bits_every_run(shape, axis):
    rng = np.random.default_rng(10)
    h = cp.asarray(rng.standard_normal(shape).astype(np.float32))
    bias = cp.asarray(np.linspace(-1, 1, shape[axis], dtype=np.float32))
    runs = [fn.bias_act_dropout_backward(h, h, bias, "gelu", 0.3, seed=7, axis=axis)
            for _ in range(3)]
    for grad_h, grad_bias in runs[1:]:
        assert same_bits(host(grad_h), host(runs[0][0]))
        assert same_bits(host(grad_bias), host(runs[0][1]))
    _, want = ref.bias_act_dropout_backward(cp.asnumpy(h), cp.asnumpy(h), cp.asnumpy(bias),
                                            "gelu", 0.3, seed=7, axis=axis)
    np.testing.assert_allclose(host(runs[0][1]), want, rtol=1e-4, atol=1e-4 * np.sqrt(h.size))


@pytest.mark.parametrize("axis", [0, 1, -1])
@dtypes
def test_fused_axes_strides_and_out(axis, dtype):
    rng = np.random.default_rng(5)
    base = (rng.standard_normal((30, 8, 20)) * 2).astype(dtype)
    h = base[:, ::2, ::3]
    bias_base = rng.standard_normal(2 * h.shape[axis]).astype(dtype)
    bias = bias_base[::-2]
    g_base = rng.standard_normal((30, 4, 7)).astype(dtype)
    g = g_base[::-1]
    hd = cp.asarray(base)[:, ::2, ::3]
    bd = cp.asarray(bias_base)[::-2]
    gd = cp.asarray(g_base)[::-1]
    holder = cp.zeros((30, 4, 14), dtype)
    out = holder[:, :, ::2]
    assert fn.bias_act_dropout(hd, bd, "tanh", 0.5, seed=2, axis=axis, out=out) is out
    cpu = on_cpu(fn.bias_act_dropout, np.ascontiguousarray(h), np.ascontiguousarray(bias),
                 act="tanh", p=0.5, seed=2, axis=axis)
    agrees("tanh", host(out), cpu)
    assert not bool(holder[:, :, 1::2].any())
    grad_h, grad_bias = fn.bias_act_dropout_backward(gd, hd, bd, "tanh", 0.5, seed=2, axis=axis)
    cpu_h, _ = on_cpu(fn.bias_act_dropout_backward, np.ascontiguousarray(g),
                      np.ascontiguousarray(h), np.ascontiguousarray(bias), act="tanh", p=0.5,
                      seed=2, axis=axis)
    agrees("tanh", host(grad_h, h.shape), cpu_h, grad=g / 0.5)
    other = tuple(d for d in range(3) if d != axis % 3)
    want = host(grad_h).astype(np.float64).sum(axis=other)
    np.testing.assert_allclose(host(grad_bias).astype(np.float64), want,
                               rtol=np.finfo(dtype).eps, atol=np.finfo(dtype).eps * 10)


def test_fused_in_place_zero_size_and_p_one():
    h, bias = exact_sum_inputs((20, 6), 1, np.float32, seed=9)
    hd, bd = cp.asarray(h), cp.asarray(bias)
    expected = host(fn.bias_act_dropout(hd, bd, "elu", 0.2, seed=4))
    assert fn.bias_act_dropout(hd, bd, "elu", 0.2, seed=4, out=hd) is hd
    assert same_bits(host(hd), expected)
    empty = cp.zeros((0, 4), cp.float32)
    ones = cp.ones(4, cp.float32)
    assert fn.bias_act_dropout(empty, ones, "relu", 0.5, seed=1).shape == (0, 4)
    grad_h, grad_bias = fn.bias_act_dropout_backward(empty, empty, ones, "relu", 0.5, seed=1)
    assert grad_h.shape == (0, 4) and host(grad_bias).tolist() == [0.0] * 4
    grad_h, grad_bias = fn.bias_act_dropout_backward(cp.ones((20, 6), cp.float32),
                                                     cp.asarray(h), bd, "sigmoid", 1.0, seed=1)
    assert not bool(grad_h.any()) and not bool(grad_bias.any())


def test_nn_dropout_layer_draws_the_cpu_masks():
    """fusednn.nn.Dropout on CuPy arrays: step after step, the outputs and
    the gradients (mask regenerated from (seed, offset)) of the CPU layer."""
    x = np.random.default_rng(12).standard_normal((33, 17)).astype(np.float32)
    on_cpu_layer = nn.Dropout(0.4, seed=5, offset=2**33)
    on_gpu_layer = nn.Dropout(0.4, seed=5, offset=2**33)
    for _ in range(3):
        y = on_gpu_layer(cp.asarray(x))
        assert same_bits(host(y, x.shape), on_cpu_layer(x))
        g = on_gpu_layer.backward(cp.asarray(x))
        assert same_bits(host(g, x.shape), on_cpu_layer.backward(x))


# ---- bad input: a clear exception, and nothing written ----------------------------------

def test_mixed_devices_are_refused():
    x = np.ones(16, np.float32)
    xd = cp.asarray(x)
    mask = fn.dropout_mask(16, 0.5, seed=1)
    with pytest.raises(TypeError, match="cupy"):
        fn.dropout_backward(xd, 0.5, mask=mask)
    with pytest.raises(TypeError, match="cupy"):
        fn.dropout_backward(x, 0.5, mask=cp.asarray(mask))
    with pytest.raises(TypeError, match="cupy"):
        fn.bias_act_dropout(xd.reshape(4, 4), np.ones(4, np.float32), "relu", 0.5, seed=1)
    with pytest.raises(TypeError, match="cupy"):
        fn.bias_act_dropout_backward(xd.reshape(4, 4), x.reshape(4, 4), cp.ones(4, cp.float32),
                                     "relu", 0.5, seed=1)
    device_out = cp.full_like(xd, 5.0)
    with pytest.raises(ValueError, match="out"):
        fn.dropout(x, 0.5, seed=1, out=device_out)
    assert bool((device_out == 5.0).all())
    host_out = np.full_like(x, 5.0)
    with pytest.raises(ValueError, match="out"):
        fn.dropout(xd, 0.5, seed=1, out=host_out)
    assert (host_out == 5.0).all()


def test_bad_input_writes_nothing():
    x = cp.ones(10, cp.float32)
    out = cp.full(10, 42.0, cp.float32)
    bad = [
        (lambda: fn.dropout(x, 1.5, seed=1, out=out), ValueError),
        (lambda: fn.dropout(x, 0.5, seed=-1, out=out), ValueError),
        (lambda: fn.dropout(x, 0.5, seed=1, out=cp.full(11, 42.0, cp.float32)), ValueError),
        (lambda: fn.dropout(x, 0.5, seed=1, out=cp.full(10, 42.0, cp.float64)), ValueError),
        (lambda: fn.dropout(cp.ones(10, cp.int32), 0.5, seed=1), TypeError),
        (lambda: fn.dropout_backward(x, 0.5, out=out), ValueError),
        (lambda: fn.dropout_backward(x, 0.5, mask=cp.zeros(3, cp.uint8), out=out), ValueError),
        (lambda: fn.dropout_backward(x, 0.5, mask=cp.zeros(2, cp.int8), out=out), TypeError),
        (lambda: fn.dropout_backward(x, 0.5, mask=cp.zeros(2, cp.uint8), seed=1, out=out),
         ValueError),
        (lambda: fn.dropout_mask(10, float("nan"), seed=1, device="cuda"), ValueError),
    ]
    for call, error in bad:
        with pytest.raises(error):
            call()
    assert bool((out == 42.0).all())


def test_fused_bad_input_writes_nothing():
    h = cp.ones((4, 5), cp.float32)
    out = cp.full((4, 5), 42.0, cp.float32)
    bad = [
        (dict(bias=cp.ones(4, cp.float32)), ValueError),
        (dict(bias=cp.ones((1, 5), cp.float32)), ValueError),
        (dict(bias=cp.ones(5, cp.float64)), TypeError),
        (dict(bias=cp.ones(5, cp.float32), axis=2), ValueError),
        (dict(bias=cp.ones(5, cp.float32), act="swish"), ValueError),
        (dict(bias=cp.ones(5, cp.float32), p=2.0), ValueError),
    ]
    for changes, error in bad:
        kwargs = dict(bias=cp.ones(5, cp.float32), act="relu", p=0.5, seed=1)
        kwargs.update(changes)
        bias, act, p = kwargs.pop("bias"), kwargs.pop("act"), kwargs.pop("p")
        with pytest.raises(error):
            fn.bias_act_dropout(h, bias, act, p, out=out, **kwargs)
        with pytest.raises(error):
            fn.bias_act_dropout_backward(h, h, bias, act, p, **kwargs)
    assert bool((out == 42.0).all())
    with pytest.raises(ValueError, match="bytes"):
        fn.bias_act_dropout_backward(h, h, cp.ones(5, cp.float32), "relu", 0.5,
                                     mask=cp.zeros(2, cp.uint8))
    with pytest.raises(ValueError, match="same shape"):
        fn.bias_act_dropout_backward(cp.ones((4, 6), cp.float32), h, cp.ones(5, cp.float32),
                                     "relu", 0.5, seed=1)


def test_fused_backward_out():
    rng = np.random.default_rng(12)
    h = cp.asarray(rng.standard_normal((40, 33)).astype(np.float32))
    g = cp.asarray(rng.standard_normal((40, 33)).astype(np.float32))
    bias = cp.asarray(rng.standard_normal(33).astype(np.float32))
    want_h, want_bias = fn.bias_act_dropout_backward(g, h, bias, "silu", 0.2, seed=4)
    out = cp.full((40, 33), np.nan, dtype=cp.float32)
    grad_h, grad_bias = fn.bias_act_dropout_backward(g, h, bias, "silu", 0.2, seed=4, out=out)
    assert grad_h is out
    assert same_bits(cp.asnumpy(grad_h), cp.asnumpy(want_h))
    assert same_bits(cp.asnumpy(grad_bias), cp.asnumpy(want_bias))
    in_place, _ = fn.bias_act_dropout_backward(g, h, bias, "silu", 0.2, seed=4, out=g)
    assert in_place is g and same_bits(cp.asnumpy(g), cp.asnumpy(want_h))
    strided = cp.zeros((40, 33, 2), dtype=cp.float32)[..., 0]
    with pytest.raises(ValueError, match="C-contiguous"):
        fn.bias_act_dropout_backward(h, h, bias, "silu", 0.2, seed=4, out=strided)
