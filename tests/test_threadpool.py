"""The CPU thread pool and how work is split over it: every thread joins a
region that needs it, an idle process stops using CPU after its workers'
bounded spin, results keep their bits for any thread count at the sizes
where the split changes, and ``bench --sweep`` reports what it measured.

Nothing here checks speed (that is the bench's business); the idle test
checks that workers go to sleep, which a pool that never stops spinning
would fail by a wide margin on any machine.
"""
from __future__ import annotations

import json
import resource
import time

import numpy as np
import pytest

import fusednn as fn
from fusednn import _cpu
from fusednn.__main__ import main
from fusednn.bench import sweep

from conftest import same_bits


def process_cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


@pytest.mark.parametrize("threads", [1, 2, 3, 4])
def test_every_thread_joins_a_region_that_needs_it(threads, restore_threads):
    # Each task waits until all have started: the call raises unless the
    # pool runs them all at once, and returns the median region's seconds.
    # With more threads than cores the waiting tasks hold the cores until
    # the scheduler preempts them (milliseconds), which is the probe's cost,
    # not the pool's.
    fn.set_num_threads(threads)
    seconds = _cpu.pool_region_seconds(threads, 50)
    assert 0 < seconds < 1


def test_region_probe_rejects_bad_arguments(restore_threads):
    fn.set_num_threads(2)
    for tasks, regions in [(0, 10), (3, 10), (2, 0)]:
        with pytest.raises(ValueError, match="pool_region_seconds"):
            _cpu.pool_region_seconds(tasks, regions)


def test_idle_workers_stop_using_cpu(restore_threads):
    fn.set_num_threads(2)
    x = np.ones(2**20, np.float32)
    for _ in range(20):
        fn.gelu(x, out=x)
    # Workers spin for a fraction of a millisecond after a region, then
    # sleep: measured from 50 ms after the last call, the process is idle.
    time.sleep(0.05)
    before, start = process_cpu_seconds(), time.perf_counter()
    time.sleep(0.3)
    used = (process_cpu_seconds() - before) / (time.perf_counter() - start)
    assert used < 0.1, f"{used:.0%} of a core while idle"


@pytest.mark.parametrize("name", ["relu", "gelu", "hardtanh"])
@pytest.mark.parametrize("size", [4096, 20_000, 40_000, 65_536, 100_000, 300_000])
def test_same_bits_where_the_split_changes(name, size, restore_threads):
    # The split follows each kernel's cost: these sizes give a cheap and an
    # expensive activation one, two and three slices at some thread count.
    rng = np.random.default_rng(size)
    x = rng.standard_normal(size, dtype=np.float32)
    g = rng.standard_normal(size, dtype=np.float32)
    results = {}
    for threads in (1, 2, 3):
        fn.set_num_threads(threads)
        results[threads] = (fn.activation(name, x), fn.activation_backward(name, g, x=x),
                            fn.dropout(x, 0.3, seed=5), fn.dropout_backward(g, 0.3, seed=5))
    for threads in (2, 3):
        for got, want in zip(results[threads], results[1]):
            assert same_bits(got, want), f"{threads} threads"


@pytest.mark.parametrize("shape", [(32, 64), (32, 4096), (256, 1024), (4, 700, 3)])
def test_batch_norm_same_bits_for_any_thread_count_at_layer_shapes(shape, restore_threads):
    rng = np.random.default_rng(len(shape))
    x = rng.standard_normal(shape).astype(np.float32) * 3 + 1
    dy = rng.standard_normal(shape).astype(np.float32)
    gamma = rng.standard_normal(shape[1]).astype(np.float32)
    beta = rng.standard_normal(shape[1]).astype(np.float32)
    results = {}
    for threads in (1, 2, 3):
        fn.set_num_threads(threads)
        y, mean, invstd = fn.batch_norm(x, gamma, beta)
        results[threads] = (y, mean, invstd,
                            *fn.batch_norm_backward(dy, x, gamma, mean, invstd))
    for threads in (2, 3):
        for got, want in zip(results[threads], results[1]):
            assert same_bits(got, want), f"{threads} threads"


@pytest.fixture
def tiny_sweep(monkeypatch):
    """bench --sweep --quick on two sizes, two kernels and short samples."""
    monkeypatch.setattr(sweep, "QUICK_SIZES", (4096, 8192))
    monkeypatch.setattr(sweep, "SWEEP_KERNELS", tuple(
        k for k in sweep.SWEEP_KERNELS if k.name in ("relu", "dropout backward")))
    monkeypatch.setattr(sweep, "SAMPLE_SECONDS", 0.0002)
    monkeypatch.setattr(sweep, "SETTLE_SECONDS", 0.0)


def test_bench_sweep_reports_every_point(tiny_sweep, tmp_path, capsys, restore_threads):
    path = tmp_path / "sweep.json"
    before = fn.get_num_threads()
    assert main(["bench", "--sweep", "--quick", "--repeat", "1", "--threads", "2",
                 "--peers", "none", "--json", str(path)]) == 0
    assert fn.get_num_threads() == before
    out = capsys.readouterr().out
    assert "2 threads: a region of 2 tasks that all join" in out
    assert "#### relu" in out and "#### dropout backward" in out
    document = json.loads(path.read_text())
    points = document["points"]
    assert {(p["kernel"], p["elements"], p["threads"]) for p in points} == {
        (k, n, 2) for k in ("relu", "dropout backward") for n in (4096, 8192)}
    for p in points:
        assert p["ours_s"] > 0 and p["copy_s"] > 0 and p["torch_s"] is None
        assert p["bytes_moved"] == 8 * p["elements"]
    assert document["pool"][0]["threads"] == 2


def test_bench_sweep_times_pytorch_beside_fusednn(tiny_sweep, capsys, restore_threads):
    pytest.importorskip("torch")
    assert main(["bench", "--sweep", "--quick", "--repeat", "1", "--threads", "1"]) == 0
    out = capsys.readouterr().out
    row = next(line for line in out.splitlines() if line.startswith("| 2^12 |"))
    cells = [c.strip() for c in row.strip("|").split("|")]
    # elements, GB/s, torch GB/s, x torch, copy GB/s: all filled.
    assert len(cells) == 5 and all(cells)


@pytest.mark.parametrize("kernels", ["batchnorm", "training", "relu:forward"])
def test_bench_sweep_refuses_a_kernel_selection(kernels, capsys):
    # The sweep's kernels are fixed: a selection would otherwise be ignored
    # (or, for training, run instead of the sweep).
    with pytest.raises(SystemExit) as usage_error:
        main(["bench", "--sweep", "--kernels", kernels])
    assert usage_error.value.code == 2
    assert "--sweep measures its own set" in capsys.readouterr().err


def test_bench_sweep_is_for_the_cpu(capsys):
    assert main(["bench", "--sweep", "--device", "cuda"]) == 1
    assert "--sweep measures the CPU kernels" in capsys.readouterr().err
