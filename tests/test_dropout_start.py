"""Dropout of a slice of a larger array (``start=``), on the CPU: element i
of a call with ``start=g`` takes the decision of global index g + i, so the
masks of the slices of a batch split across ranks are the slices of the
one-process mask, bit for bit. Checked for starts at every lane of a
Philox block, at mask-word and 32-bit boundaries and near 2**62 and 2**64,
sizes from 0 to past a chunk, every dtype, strided inputs, the fused
epilogue's layouts, every thread count and SIMD path; the mask-only path
and the regenerating path against each other and against the reference;
bad starts refused with nothing written.
"""
from __future__ import annotations

import numpy as np
import pytest

import fusednn as fn
from fusednn import _cpu
from fusednn import reference as ref

from conftest import same_bits

ml_dtypes = pytest.importorskip("ml_dtypes")

P = 0.35
SEED, OFFSET = 2**40 + 977, 2**33 + 5
SIZES = [0, 1, 3, 4, 17, 1000, 100003]
SMALL_STARTS = [0, 1, 2, 3, 4, 5, 7, 63, 64, 65]
LARGE_STARTS = [2**32 - 3, 2**62 - 3, 2**62, 2**62 + 1]
DTYPES = [np.dtype(np.float32), np.dtype(np.float64), np.dtype(np.float16),
          np.dtype(ml_dtypes.bfloat16)]
dtypes = pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: d.name)


def unpacked(mask, n):
    return np.unpackbits(mask, bitorder="little")[:n].astype(bool)


def packed(keep):
    return np.packbits(keep.reshape(-1), bitorder="little")


def contract_keep(n, start, p=P, seed=SEED, offset=OFFSET):
    """The keep decisions of global indices [start, start + n), element by
    element from the compiled Philox, written from the contract alone."""
    threshold = ref.dropout_threshold(p)
    keep = np.empty(n, bool)
    for j in range(n):
        block, lane = divmod(start + j, 4)
        draws = _cpu.philox4x32_10(block & 0xFFFFFFFF, block >> 32, offset & 0xFFFFFFFF,
                                   offset >> 32, seed & 0xFFFFFFFF, seed >> 32)
        keep[j] = draws[lane] < threshold
    return keep


def expected_keep(n, start):
    """Bits [start, start + n) of the one-process mask: the kernels' mask of
    the whole start + n elements where that is small, else the reference's
    (itself held to the contract by test_reference_slices_follow_the_contract)."""
    if start + n <= 200_000:
        return unpacked(fn.dropout_mask(start + n, P, seed=SEED, offset=OFFSET), start + n)[start:]
    return ref.dropout_keep(n, P, seed=SEED, offset=OFFSET, start=start)


# ---- the reference -------------------------------------------------------------

@pytest.mark.parametrize("start", SMALL_STARTS + LARGE_STARTS + [2**64 - 9])
@pytest.mark.parametrize("n", [0, 1, 3, 9])
def test_reference_slices_follow_the_contract(n, start):
    np.testing.assert_array_equal(ref.dropout_keep(n, P, seed=SEED, offset=OFFSET, start=start),
                                  contract_keep(n, start))


def test_reference_start_zero_is_the_whole_mask_and_starts_are_its_slices():
    whole = ref.dropout_keep(300, P, seed=SEED, offset=OFFSET)
    np.testing.assert_array_equal(whole, ref.dropout_keep(300, P, seed=SEED, offset=OFFSET,
                                                          start=0))
    for start in (1, 2, 3, 4, 5, 7, 63, 64, 65, 130):
        np.testing.assert_array_equal(
            ref.dropout_keep(300 - start, P, seed=SEED, offset=OFFSET, start=start),
            whole[start:])


def test_reference_refuses_indices_past_64_bits():
    with pytest.raises(ValueError):
        ref.dropout_keep(10, P, seed=1, start=2**64 - 9)
    with pytest.raises(ValueError):
        ref.dropout_keep(1, P, seed=1, start=-1)


# ---- every function against the one-process mask ------------------------------

@pytest.mark.parametrize("start", SMALL_STARTS + LARGE_STARTS)
@pytest.mark.parametrize("n", SIZES)
def test_mask_is_the_slice_of_the_whole_mask(n, start):
    keep = expected_keep(n, start)
    mask = fn.dropout_mask(n, P, seed=SEED, offset=OFFSET, start=start)
    assert mask.dtype == np.uint8 and mask.shape == ((n + 7) // 8,)
    np.testing.assert_array_equal(mask, packed(keep))
    if start + n > 200_000:  # the kernels against the reference past the first check
        np.testing.assert_array_equal(
            mask, ref.dropout_mask(n, P, seed=SEED, offset=OFFSET, start=start))


def scaled(x, keep, p=P):
    """x * (1 / keep) rounded as the kernels round it where kept, x * 0
    (a signed zero) where dropped. float16 and bfloat16 round the exact
    product once."""
    if x.dtype.itemsize == 2:
        factor = np.where(keep, np.float64(np.float32(1 / (1 - p))), 0.0)
        return (x.astype(np.float64) * factor).astype(x.dtype)
    return x * np.where(keep, x.dtype.type(1 / (1 - p)), x.dtype.type(0))


@pytest.mark.parametrize("start", SMALL_STARTS + LARGE_STARTS)
@pytest.mark.parametrize("n", SIZES)
@dtypes
def test_dropout_and_backward_draw_the_slice(n, start, dtype):
    keep = expected_keep(n, start)
    x = np.random.default_rng(n + start % 1000).standard_normal(n).astype(dtype)
    y, mask = fn.dropout(x, P, seed=SEED, offset=OFFSET, start=start, return_mask=True)
    np.testing.assert_array_equal(mask, packed(keep))
    assert same_bits(y, scaled(x, keep))
    assert same_bits(fn.dropout_backward(x, P, seed=SEED, offset=OFFSET, start=start), y)
    assert same_bits(fn.dropout_backward(x, P, mask=mask), y)


@pytest.mark.parametrize("start", SMALL_STARTS + LARGE_STARTS)
@pytest.mark.parametrize("n", SIZES)
@dtypes
def test_fused_epilogue_draws_the_slice(n, start, dtype):
    keep = expected_keep(n, start)
    rng = np.random.default_rng(n + 7)
    h = rng.standard_normal(n).astype(dtype)
    bias = rng.standard_normal(n).astype(dtype)
    go = rng.standard_normal(n).astype(dtype)
    o, mask = fn.bias_act_dropout(h, bias, "gelu", P, seed=SEED, offset=OFFSET, start=start,
                                  axis=0, return_mask=True)
    np.testing.assert_array_equal(mask, packed(keep))
    # The same kernel from the expected mask: the backward's mask path
    # reads bits, it does not draw them.
    gh_mask, gb_mask = fn.bias_act_dropout_backward(go, h, bias, "gelu", P, mask=packed(keep),
                                                    axis=0)
    gh, gb = fn.bias_act_dropout_backward(go, h, bias, "gelu", P, seed=SEED, offset=OFFSET,
                                          start=start, axis=0)
    assert same_bits(gh, gh_mask) and same_bits(gb, gb_mask)
    assert np.all(o[~keep] == 0) and np.all(gh[~keep] == 0)
    if start + n <= 200_000:
        # The slice of the one-process run on an array with `start`
        # elements before h (a 1-d h: the bias runs along it).
        before = rng.standard_normal((3, start)).astype(dtype)
        whole_h, whole_bias, whole_go = (np.concatenate([b, a]) for a, b in
                                         zip((h, bias, go), before))
        whole = fn.bias_act_dropout(whole_h, whole_bias, "gelu", P, seed=SEED, offset=OFFSET,
                                    axis=0)
        assert same_bits(o, whole[start:])
        whole_gh, _ = fn.bias_act_dropout_backward(whole_go, whole_h, whole_bias, "gelu", P,
                                                   seed=SEED, offset=OFFSET, axis=0)
        assert same_bits(gh, whole_gh[start:])
    elif dtype.itemsize > 2:
        # act(h + bias) alone (p = 0 scales by exactly 1), scaled where kept.
        plain = fn.bias_act_dropout(h, bias, "gelu", 0.0, seed=SEED, axis=0)
        assert same_bits(o, scaled(plain, keep))


# ---- ranks: a batch split unevenly, one rank empty -------------------------------

def split(batch, counts):
    """The ranks' slices along the first axis and each slice's start: the
    flat index of its first element in the concatenated batch."""
    rows = np.cumsum([0] + counts)
    inner = int(np.prod(batch.shape[1:]))
    return [(batch[a:b], int(a) * inner) for a, b in zip(rows[:-1], rows[1:])]


@pytest.mark.parametrize("shape,counts", [((37, 5, 3), [10, 0, 27]), ((9, 131), [1, 5, 3]),
                                          ((300, 257), [77, 150, 0, 73])])
@dtypes
def test_ranks_masks_and_outputs_equal_the_one_process_run(shape, counts, dtype):
    rng = np.random.default_rng(11)
    x = rng.standard_normal(shape).astype(dtype)
    go = rng.standard_normal(shape).astype(dtype)
    bias = rng.standard_normal(shape[-1]).astype(dtype)
    kw = {"seed": SEED, "offset": OFFSET}
    y, mask = fn.dropout(x, P, return_mask=True, **kw)
    g = fn.dropout_backward(go, P, **kw)
    o = fn.bias_act_dropout(x, bias, "relu", P, **kw)
    gh, _ = fn.bias_act_dropout_backward(go, x, bias, "relu", P, **kw)
    keep = unpacked(mask, x.size)
    rank_outputs = {name: [] for name in ("y", "g", "o", "gh", "mask")}
    for (part, start), (part_go, _) in zip(split(x, counts), split(go, counts)):
        yr, mr = fn.dropout(part, P, start=start, return_mask=True, **kw)
        rank_outputs["y"].append(yr)
        rank_outputs["mask"].append(unpacked(mr, part.size))
        np.testing.assert_array_equal(
            mr, fn.dropout_mask(part.shape, P, start=start, **kw))
        rank_outputs["g"].append(fn.dropout_backward(part_go, P, start=start, **kw))
        rank_outputs["o"].append(fn.bias_act_dropout(part, bias, "relu", P, start=start, **kw))
        rank_outputs["gh"].append(
            fn.bias_act_dropout_backward(part_go, part, bias, "relu", P, start=start, **kw)[0])
    np.testing.assert_array_equal(np.concatenate(rank_outputs["mask"]), keep)
    for name, whole in (("y", y), ("g", g), ("o", o), ("gh", gh)):
        assert same_bits(np.concatenate(rank_outputs[name]), whole), name


# ---- layouts, threads, SIMD paths ----------------------------------------------

def strided_views(dtype):
    base = np.random.default_rng(3).standard_normal((40, 30, 6)).astype(dtype)
    yield "step", base.reshape(-1)[::3]
    yield "transposed", base.transpose(2, 0, 1)
    yield "negative", base[::-1, :, ::-2]
    yield "column", base[:, 7, :]


@pytest.mark.parametrize("start", [1, 3, 64, 2**32 - 3, 2**62 + 1])
@dtypes
def test_strided_inputs_use_the_logical_order(start, dtype):
    for name, x in strided_views(dtype):
        keep = ref.dropout_keep(x.shape, P, seed=SEED, offset=OFFSET, start=start)
        y, mask = fn.dropout(x, P, seed=SEED, offset=OFFSET, start=start, return_mask=True)
        np.testing.assert_array_equal(mask, packed(keep), err_msg=name)
        assert same_bits(y, scaled(np.ascontiguousarray(x), keep)), name
        out = np.empty(x.shape + (2,), dtype)[..., 1]  # a strided out
        g = fn.dropout_backward(x, P, seed=SEED, offset=OFFSET, start=start, out=out)
        assert g is out and same_bits(g, y), name
        bias = np.linspace(-1, 1, x.shape[-1]).astype(dtype)
        o, o_mask = fn.bias_act_dropout(x, bias, "silu", P, seed=SEED, offset=OFFSET,
                                        start=start, return_mask=True)
        np.testing.assert_array_equal(o_mask, packed(keep), err_msg=name)
        assert np.all(o[~keep] == 0), name
        gh, gb = fn.bias_act_dropout_backward(x, x, bias, "silu", P, seed=SEED, offset=OFFSET,
                                              start=start)
        gh_m, gb_m = fn.bias_act_dropout_backward(x, x, bias, "silu", P, mask=packed(keep))
        assert same_bits(gh, gh_m) and same_bits(gb, gb_m), name


# Large enough for several chunks of 8192 per thread slice, the AVX-512
# loop that draws the next chunk between pieces of the current one, and the
# fused loops along a long last axis (their row-walking forward, and the
# backward that sums grad_bias by row groups).
@pytest.mark.parametrize("start", [0, 1, 2, 3, 4, 65, 2**62 + 3])
@pytest.mark.parametrize("threads", [1, 2, 3, 7])
def test_every_thread_count_and_simd_path(start, threads, restore_threads, restore_simd):
    rng = np.random.default_rng(5)
    x = rng.standard_normal(3 * 2**17 + 5).astype(np.float32)
    h = rng.standard_normal((1031, 300)).astype(np.float32)
    bias = rng.standard_normal(300).astype(np.float32)
    keep_x = ref.dropout_keep(x.size, P, seed=SEED, offset=OFFSET, start=start)
    keep_h = ref.dropout_keep(h.shape, P, seed=SEED, offset=OFFSET, start=start)
    fn.set_num_threads(threads)
    results = {}
    for path in _cpu.available_simd():
        _cpu.set_simd(path)
        kw = {"seed": SEED, "offset": OFFSET, "start": start}
        y, mask = fn.dropout(x, P, return_mask=True, **kw)
        np.testing.assert_array_equal(mask, packed(keep_x), err_msg=path)
        np.testing.assert_array_equal(fn.dropout_mask(x.size, P, **kw), mask, err_msg=path)
        assert same_bits(y, scaled(x, keep_x)), path
        buffer = np.empty(x.size + 3, np.float32)
        g = fn.dropout_backward(x, P, out=buffer[3:], **kw)  # unaligned output lines
        assert same_bits(g, y), path
        o, o_mask = fn.bias_act_dropout(h, bias, "relu", P, return_mask=True, **kw)
        np.testing.assert_array_equal(o_mask, packed(keep_h), err_msg=path)
        assert same_bits(o, scaled(np.maximum(h + bias, np.float32(0)), keep_h)), path
        gh, gb = fn.bias_act_dropout_backward(h, h, bias, "relu", P, **kw)
        gh_m, gb_m = fn.bias_act_dropout_backward(h, h, bias, "relu", P, mask=packed(keep_h))
        assert same_bits(gh, gh_m) and same_bits(gb, gb_m), path
        results[path] = (y, o, gh, gb)
    for path, got in results.items():
        for a, b in zip(results["generic"], got):
            assert same_bits(a, b), path


def test_start_zero_is_the_default():
    x = np.random.default_rng(9).standard_normal(4099)
    kw = {"seed": SEED, "offset": OFFSET}
    assert same_bits(fn.dropout(x, P, start=0, **kw), fn.dropout(x, P, **kw))
    np.testing.assert_array_equal(fn.dropout_mask(x.size, P, start=0, **kw),
                                  ref.dropout_mask(x.size, P, **kw))


def test_numpy_integer_starts_and_the_last_index():
    n = 21
    for start in (np.uint64(2**63 + 1), np.int64(5), np.uint8(3), 2**64 - n):
        np.testing.assert_array_equal(
            fn.dropout_mask(n, P, seed=SEED, offset=OFFSET, start=start),
            ref.dropout_mask(n, P, seed=SEED, offset=OFFSET, start=int(start)))
    assert fn.dropout_mask(0, P, seed=SEED, start=2**64 - 1).size == 0


def test_a_given_mask_is_read_as_it_is():
    x = np.random.default_rng(4).standard_normal(103)
    y, mask = fn.dropout(x, P, seed=SEED, offset=OFFSET, start=5, return_mask=True)
    for start in (0, 5, 77):
        assert same_bits(fn.dropout_backward(x, P, mask=mask, start=start), y)


# ---- bad starts: a clear exception, and nothing written -------------------------

BAD_STARTS = [(-1, ValueError), (2**64, ValueError), (2**64 - 9, ValueError),
              (2**70, ValueError), (np.int64(-3), ValueError), (1.0, TypeError),
              (np.float64(2), TypeError), ("3", TypeError), (True, TypeError),
              (np.bool_(False), TypeError), (None, TypeError)]


@pytest.mark.parametrize("start,error", BAD_STARTS, ids=repr)
def test_bad_start_raises_and_writes_nothing(start, error):
    n = 10  # 2**64 - 9 + 10 > 2**64
    x = np.ones(n, np.float32)
    bias = np.ones(n, np.float32)
    out = np.full(n, 42.0, np.float32)
    mask_out_before = out.copy()
    calls = [
        lambda: fn.dropout(x, P, seed=1, start=start, out=out),
        lambda: fn.dropout(x, P, seed=1, start=start, out=out, training=False),
        lambda: fn.dropout_backward(x, P, seed=1, start=start, out=out),
        lambda: fn.dropout_backward(x, P, mask=np.zeros(2, np.uint8), start=start, out=out),
        lambda: fn.dropout_mask(n, P, seed=1, start=start),
        lambda: fn.bias_act_dropout(x, bias, "relu", P, seed=1, start=start, axis=0, out=out),
        lambda: fn.bias_act_dropout_backward(x, x, bias, "relu", P, seed=1, start=start, axis=0,
                                             out=out),
    ]
    for call in calls:
        with pytest.raises(error, match="start"):
            call()
    np.testing.assert_array_equal(out, mask_out_before)


def test_the_compiled_module_refuses_indices_past_64_bits():
    mask = np.zeros(2, np.uint8)
    with pytest.raises(ValueError, match="start"):
        _cpu.dropout_mask(10, P, 1, 0, 2**64 - 9, mask)
    x, out = np.ones(10, np.float32), np.full(10, 42.0, np.float32)
    with pytest.raises(ValueError, match="start"):
        _cpu.dropout_forward(x, out, P, 1, 0, 2**64 - 9, None)
    assert np.all(mask == 0) and np.all(out == 42.0)
    _cpu.dropout_mask(10, P, 1, 0, 2**64 - 10, mask)
    np.testing.assert_array_equal(mask, ref.dropout_mask(10, P, seed=1, start=2**64 - 10))
