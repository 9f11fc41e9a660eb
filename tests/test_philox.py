"""Philox4x32-10 and the dropout threshold against their published and
documented values: the compiled header (the one the CPU and CUDA kernels
share) and the numpy reference must both give them."""
import numpy as np
import pytest

from fusednn import _cpu
from fusednn import reference as ref

# (counter, key) -> output, from the Random123 known-answer tests.
KNOWN_ANSWERS = [
    ((0, 0, 0, 0), (0, 0), (0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8)),
    ((0xFFFFFFFF,) * 4, (0xFFFFFFFF, 0xFFFFFFFF), (0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD)),
    ((0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344), (0xA4093822, 0x299F31D0),
     (0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1)),
]


@pytest.mark.parametrize("counter,key,expected", KNOWN_ANSWERS)
def test_compiled_known_answers(counter, key, expected):
    assert _cpu.philox4x32_10(*counter, *key) == expected


@pytest.mark.parametrize("counter,key,expected", KNOWN_ANSWERS)
def test_reference_known_answers(counter, key, expected):
    assert tuple(int(v) for v in ref.philox4x32_10(counter, key)) == expected


def test_compiled_matches_reference_on_random_counters():
    rng = np.random.default_rng(7)
    words = rng.integers(0, 2**32, size=(200, 6), dtype=np.uint64)
    expected = np.stack(ref.philox4x32_10(words[:, :4].T, words[:, 4:].T), axis=1)
    for row, want in zip(words, expected):
        assert _cpu.philox4x32_10(*(int(w) for w in row)) == tuple(int(v) for v in want)


@pytest.mark.parametrize("p", [0.0, 1.0, 0.5, 0.1, 0.9, 1e-12, 1 - 1e-12, 0.3333333333333333])
def test_threshold_matches_reference(p):
    assert _cpu.dropout_threshold(1.0 - p) == ref.dropout_threshold(p)


def test_threshold_bounds_and_rounding():
    assert ref.dropout_threshold(0.0) == 2**32  # keep = 1 keeps every uint32 draw
    assert ref.dropout_threshold(1.0) == 0
    # keep * 2**32 = 1.5 and 2.5: both round to 2 (half to even).
    for keep in (1.5 * 2.0**-32, 2.5 * 2.0**-32):
        assert _cpu.dropout_threshold(keep) == 2
        assert ref.dropout_threshold(1.0 - keep) == 2


def test_draw_layout():
    # Element i is lane i % 4 of the counter (i // 4, offset) under key seed.
    seed, offset = 0x0123456789ABCDEF, 0xFEDCBA9876543210
    draws = ref.dropout_draws(10, seed=seed, offset=offset)
    for i in range(10):
        block = i // 4
        lanes = _cpu.philox4x32_10(block & 0xFFFFFFFF, block >> 32, offset & 0xFFFFFFFF,
                                   offset >> 32, seed & 0xFFFFFFFF, seed >> 32)
        assert int(draws[i]) == lanes[i % 4]
