"""Dropout on the CPU: masks bit-exact to the Philox contract for any size,
seed, offset, layout, thread count and SIMD path; outputs against the
float64 reference; statistics of the mask; backward from the mask and from
(seed, offset); and bad input rejected before anything is written."""
import numpy as np
import pytest

import fusednn as fn
from fusednn import _cpu
from fusednn import reference as ref

SIZES = [0, 1, 3, 4, 5, 7, 8, 9, 63, 64, 65, 1000, 4097, 2**16 + 13, 3 * 2**17 + 5]
STREAMS = [(0, 0), (1, 2), (2**32 + 5, 2**32 + 7), (2**64 - 1, 2**64 - 1), (987654321, 2**40)]


def unpacked(mask, n):
    return np.unpackbits(mask, bitorder="little")[:n].astype(bool)


@pytest.mark.parametrize("n", SIZES)
@pytest.mark.parametrize("seed,offset", STREAMS)
def test_mask_matches_contract(n, seed, offset):
    p = 0.37
    mask = fn.dropout_mask(n, p, seed=seed, offset=offset)
    assert mask.dtype == np.uint8 and mask.shape == ((n + 7) // 8,)
    np.testing.assert_array_equal(mask, ref.dropout_mask(n, p, seed=seed, offset=offset))
    if n % 8:
        assert mask[-1] >> (n % 8) == 0  # bits past the end are 0


@pytest.mark.parametrize("n", SIZES)
def test_returned_mask_and_output_match_reference(n):
    rng = np.random.default_rng(n)
    seed, offset = int(rng.integers(0, 2**63)), int(rng.integers(2**32, 2**63))
    x = rng.standard_normal(n)
    for dtype in (np.float32, np.float64):
        xd = x.astype(dtype)
        y, mask = fn.dropout(xd, 0.25, seed=seed, offset=offset, return_mask=True)
        y_ref, mask_ref = ref.dropout(xd, 0.25, seed=seed, offset=offset, return_mask=True)
        np.testing.assert_array_equal(mask, mask_ref)
        assert y.dtype == dtype
        # x * float(1/keep): within one rounding of x / keep.
        np.testing.assert_array_max_ulp(y, y_ref.astype(dtype), maxulp=1)


@pytest.mark.parametrize("p", [0.0, 0.1, 0.5, 0.9, 1.0])
def test_random_seeds_bit_exact(p):
    rng = np.random.default_rng(int(p * 10))
    for _ in range(5):
        n = int(rng.integers(1, 5000))
        seed, offset = (int(v) for v in rng.integers(0, 2**64, size=2, dtype=np.uint64))
        np.testing.assert_array_equal(fn.dropout_mask(n, p, seed=seed, offset=offset),
                                      ref.dropout_mask(n, p, seed=seed, offset=offset))


def strided_views(dtype=np.float64):
    base = np.random.default_rng(3).standard_normal((37, 29, 6)).astype(dtype)
    return {
        "sliced": base[::2, 1::3, :5],
        "transposed": base.transpose(2, 0, 1),
        "reversed": base[::-1, :, ::-2],
        "broadcast_row": np.broadcast_to(base[0, 0], (11, 6)),
        "column": base[:, 3, 2],
    }


@pytest.mark.parametrize("name", list(strided_views()))
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_strided_input_uses_logical_order(name, dtype):
    x = strided_views(dtype)[name]
    assert not x.flags.c_contiguous
    y, mask = fn.dropout(x, 0.5, seed=11, offset=3, return_mask=True)
    np.testing.assert_array_equal(mask, ref.dropout_mask(x.shape, 0.5, seed=11, offset=3))
    np.testing.assert_array_equal(y, fn.dropout(np.ascontiguousarray(x), 0.5, seed=11, offset=3))


def test_strided_out():
    x = np.random.default_rng(0).standard_normal((50, 40)).astype(np.float32)
    holder = np.full((50, 80), 7.0, dtype=np.float32)
    out = holder[:, ::2]
    y = fn.dropout(x, 0.3, seed=1, offset=2, out=out)
    assert y is out
    np.testing.assert_array_equal(out, fn.dropout(x, 0.3, seed=1, offset=2))
    assert np.all(holder[:, 1::2] == 7.0)


def test_zero_d_and_empty():
    y, mask = fn.dropout(np.float64(3.0), 0.0, seed=1, return_mask=True)
    assert y.shape == () and y == 3.0 and mask.tolist() == [1]
    y, mask = fn.dropout(np.zeros((0, 5), np.float32), 0.5, seed=1, return_mask=True)
    assert y.shape == (0, 5) and mask.shape == (0,)
    assert fn.dropout_mask((), 0.5, seed=1).shape == (1,)
    assert fn.dropout_mask((4, 0), 0.5, seed=1).shape == (0,)


def test_mask_independent_of_dtype():
    x = np.random.default_rng(1).standard_normal(1001)
    _, m64 = fn.dropout(x, 0.3, seed=5, return_mask=True)
    _, m32 = fn.dropout(x.astype(np.float32), 0.3, seed=5, return_mask=True)
    np.testing.assert_array_equal(m64, m32)
    np.testing.assert_array_equal(m64, fn.dropout_mask(x.shape, 0.3, seed=5))


def test_same_bits_for_every_thread_count(restore_threads):
    x = np.random.default_rng(2).standard_normal(5 * 2**16 + 77).astype(np.float32)
    results = []
    for threads in (1, 2, 3, 4, 7):
        fn.set_num_threads(threads)
        y, mask = fn.dropout(x, 0.4, seed=99, offset=2**33, return_mask=True)
        g = fn.dropout_backward(x, 0.4, seed=99, offset=2**33)
        results.append((y, mask, g, fn.dropout_mask(x.shape, 0.4, seed=99, offset=2**33)))
    for other in results[1:]:
        for a, b in zip(results[0], other):
            np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(results[0][1], ref.dropout_mask(x.shape, 0.4, seed=99,
                                                                  offset=2**33))


@pytest.mark.parametrize("n", [3 * 2**16 + 77, 2**22 + 77])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("shift", [0, 1, 3])
def test_outputs_at_any_alignment_over_many_chunks(n, dtype, shift):
    # Large slices draw the next chunk's keep bits between pieces of the
    # current one, with pieces cut where the output's 64-byte lines start;
    # 2^22 + 77 elements also stream their outputs past the cache. The mask
    # alone (fn.dropout_mask, checked against the reference above) comes
    # from the plain chunk loop.
    x = np.random.default_rng(6).standard_normal(n).astype(dtype)
    mask_alone = fn.dropout_mask(n, 0.35, seed=12, offset=2**40 + 8)
    keep = np.unpackbits(mask_alone, bitorder="little")[:n].astype(bool)
    expected = np.where(keep, x * dtype(1 / 0.65), dtype(0))
    buffer = np.empty(n + 8, dtype)
    out = buffer[shift:shift + n]
    y, mask = fn.dropout(x, 0.35, seed=12, offset=2**40 + 8, return_mask=True, out=out)
    assert y is out
    np.testing.assert_array_equal(mask, mask_alone)
    np.testing.assert_array_equal(y, expected)
    grad = fn.dropout_backward(x, 0.35, seed=12, offset=2**40 + 8, out=buffer[shift:shift + n])
    np.testing.assert_array_equal(grad, expected)


def test_same_bits_for_every_simd_path(restore_simd):
    rng = np.random.default_rng(4)
    x = rng.standard_normal(3 * 2**16 + 5).astype(np.float32)
    strided = rng.standard_normal((300, 7))[:, ::2]
    results = {}
    for path in _cpu.available_simd():
        _cpu.set_simd(path)
        y, mask = fn.dropout(x, 0.2, seed=1234, offset=5, return_mask=True)
        ys, mask_s = fn.dropout(strided, 0.7, seed=4321, offset=2**40, return_mask=True)
        packed_back = fn.dropout_backward(x, 0.2, mask=mask)
        results[path] = (y, mask, ys, mask_s, packed_back)
    expected = results["generic"]
    np.testing.assert_array_equal(expected[1], ref.dropout_mask(x.shape, 0.2, seed=1234, offset=5))
    for path, got in results.items():
        for a, b in zip(expected, got):
            np.testing.assert_array_equal(a, b, err_msg=path)


def test_p_zero_keeps_all_and_p_one_drops_all():
    x = np.random.default_rng(5).standard_normal(1003).astype(np.float32)
    y, mask = fn.dropout(x, 0.0, seed=3, return_mask=True)
    np.testing.assert_array_equal(y, x)
    assert unpacked(mask, x.size).all() and mask[-1] == 0b111
    y, mask = fn.dropout(x, 1.0, seed=3, return_mask=True)
    assert not np.any(y) and not np.any(mask)
    np.testing.assert_array_equal(fn.dropout_backward(x, 1.0, seed=3), np.zeros_like(x))


def test_nan_and_infinity_propagate_like_pytorch():
    x = np.array([np.nan, np.inf, -np.inf, -2.0] * 16, dtype=np.float32)
    y, mask = fn.dropout(x, 0.5, seed=8, return_mask=True)
    kept = unpacked(mask, x.size)
    assert np.isnan(y[0::4]).all()  # NaN * anything
    assert np.all(np.isnan(y[1::4][~kept[1::4]]))  # inf * 0
    assert np.all(y[1::4][kept[1::4]] == np.inf)
    assert np.all(np.signbit(y[3::4]))  # -2 * 0 = -0


def test_inference_returns_input():
    x = np.random.default_rng(6).standard_normal((4, 5))
    y = fn.dropout(x, 0.5, seed=1, training=False)
    assert y is not x
    np.testing.assert_array_equal(y, x)
    out = np.empty_like(x)
    assert fn.dropout(x, 0.5, seed=1, training=False, out=out) is out
    np.testing.assert_array_equal(out, x)
    y, mask = fn.dropout(x, 0.5, seed=1, training=False, return_mask=True)
    assert unpacked(mask, x.size).all() and mask[-1] == 0b1111


def test_in_place():
    x = np.random.default_rng(7).standard_normal(2000).astype(np.float32)
    expected = fn.dropout(x, 0.3, seed=4, offset=9)
    assert fn.dropout(x, 0.3, seed=4, offset=9, out=x) is x
    np.testing.assert_array_equal(x, expected)


@pytest.mark.parametrize("p", [0.05, 0.5, 0.8])
def test_kept_fraction_in_binomial_band(p):
    n = 2**20
    kept = int(np.unpackbits(fn.dropout_mask(n, p, seed=2024, offset=1)).sum())
    mean, std = n * (1 - p), np.sqrt(n * p * (1 - p))
    assert abs(kept - mean) < 5 * std


def test_neighbouring_streams_and_elements_uncorrelated():
    n = 2**18
    bound = 5 / np.sqrt(n)
    base = unpacked(fn.dropout_mask(n, 0.5, seed=77, offset=1000), n).astype(float)
    others = [unpacked(fn.dropout_mask(n, 0.5, seed=s, offset=o), n).astype(float)
              for s, o in [(78, 1000), (76, 1000), (77, 1001), (77, 999), (77 + 2**32, 1000)]]
    for other in others:
        assert abs(np.corrcoef(base, other)[0, 1]) < bound
    for lag in (1, 2, 3, 4, 8):
        assert abs(np.corrcoef(base[:-lag], base[lag:])[0, 1]) < bound


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("n", [1, 13, 64, 2**16 + 3])
def test_backward_from_mask_equals_backward_from_seed(dtype, n):
    rng = np.random.default_rng(n)
    x = rng.standard_normal(n).astype(dtype)
    g = rng.standard_normal(n).astype(dtype)
    _, mask = fn.dropout(x, 0.3, seed=12, offset=2**35, return_mask=True)
    from_mask = fn.dropout_backward(g, 0.3, mask=mask)
    from_seed = fn.dropout_backward(g, 0.3, seed=12, offset=2**35)
    np.testing.assert_array_equal(from_mask, from_seed)
    np.testing.assert_array_max_ulp(from_mask, ref.dropout_backward(g, 0.3, mask=mask).astype(dtype),
                                    maxulp=1)
    # The backward of dropout is dropout with the same mask.
    np.testing.assert_array_equal(from_seed, fn.dropout(g, 0.3, seed=12, offset=2**35))


def test_backward_strided_grad_and_out():
    g = np.random.default_rng(8).standard_normal((40, 60))[:, ::3]
    mask = fn.dropout_mask(g.shape, 0.6, seed=2, offset=1)
    out = np.empty(g.shape)
    assert fn.dropout_backward(g, 0.6, mask=mask, out=out) is out
    np.testing.assert_allclose(out, ref.dropout_backward(g, 0.6, mask=mask), rtol=1e-15)


# ---- bad input: a clear exception, and nothing written ----------------------

def _sentinel(shape=(10,), dtype=np.float32):
    return np.full(shape, 42.0, dtype=dtype)


@pytest.mark.parametrize("p,error", [(-0.1, ValueError), (1.5, ValueError), (float("nan"), ValueError),
                                     ("0.5", TypeError), (None, TypeError), (True, TypeError)])
def test_bad_p(p, error):
    x, out = np.ones(10, np.float32), _sentinel()
    with pytest.raises(error):
        fn.dropout(x, p, seed=1, out=out)
    with pytest.raises(error):
        fn.dropout_backward(x, p, seed=1, out=out)
    with pytest.raises(error):
        fn.dropout_mask(10, p, seed=1)
    assert np.all(out == 42.0)


@pytest.mark.parametrize("name", ["seed", "offset"])
@pytest.mark.parametrize("value,error", [(-1, ValueError), (2**64, ValueError), (1.0, TypeError),
                                         ("3", TypeError), (True, TypeError),
                                         (np.float64(2), TypeError)])
def test_bad_seed_or_offset(name, value, error):
    x, out = np.ones(10, np.float32), _sentinel()
    kwargs = {"seed": 1, "offset": 0, name: value}
    with pytest.raises(error):
        fn.dropout(x, 0.5, out=out, **kwargs)
    with pytest.raises(error):
        fn.dropout_backward(x, 0.5, out=out, **kwargs)
    with pytest.raises(error):
        fn.dropout_mask(10, 0.5, **kwargs)
    assert np.all(out == 42.0)


def test_numpy_integer_seed_accepted():
    a = fn.dropout_mask(100, 0.5, seed=np.uint64(2**64 - 1), offset=np.int32(3))
    np.testing.assert_array_equal(a, fn.dropout_mask(100, 0.5, seed=2**64 - 1, offset=3))


def test_bad_mask():
    g, out = np.ones(10, np.float32), _sentinel()
    for mask, error in [(np.zeros(1, np.uint8), ValueError), (np.zeros(3, np.uint8), ValueError),
                        (np.zeros(2, np.int8), TypeError), (np.zeros(2, np.float32), TypeError),
                        ([255, 3], TypeError)]:
        with pytest.raises(error):
            fn.dropout_backward(g, 0.5, mask=mask, out=out)
    with pytest.raises(ValueError, match="mask, or the seed"):
        fn.dropout_backward(g, 0.5, out=out)
    with pytest.raises(ValueError, match="not both"):
        fn.dropout_backward(g, 0.5, mask=np.zeros(2, np.uint8), seed=1, out=out)
    assert np.all(out == 42.0)


def test_bad_arrays():
    x = np.ones(10, np.float32)
    with pytest.raises(TypeError, match="float32, float64"):
        fn.dropout(np.ones(10, np.int32), 0.5, seed=1)
    with pytest.raises(TypeError):
        fn.dropout([1.0, 2.0], 0.5, seed=1)
    with pytest.raises(ValueError, match="shape"):
        fn.dropout(x, 0.5, seed=1, out=_sentinel((11,)))
    with pytest.raises(ValueError, match="dtype"):
        fn.dropout(x, 0.5, seed=1, out=_sentinel(dtype=np.float64))
    read_only = _sentinel()
    read_only.flags.writeable = False
    with pytest.raises(ValueError, match="read-only"):
        fn.dropout(x, 0.5, seed=1, out=read_only)
    assert np.all(read_only == 42.0)


def test_bad_mask_shape_or_device():
    with pytest.raises(ValueError):
        fn.dropout_mask((3, -1), 0.5, seed=1)
    with pytest.raises(TypeError):
        fn.dropout_mask(2.5, 0.5, seed=1)
    with pytest.raises(ValueError):
        fn.dropout_mask(4, 0.5, seed=1, device="tpu")
    with pytest.raises((RuntimeError, NotImplementedError)):
        fn.dropout_mask(4, 0.5, seed=1, device="cuda")
