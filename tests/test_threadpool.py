"""The CPU thread pool and how work is split over it: every thread joins a
region that needs it, an idle process stops using CPU after its workers'
bounded spin, results keep their bits for any thread count at the sizes
where the split changes, and ``bench --sweep`` reports what it measured.
Where PyTorch is installed, the same on the process's OpenMP team, which
regions run on once PyTorch (GNU OpenMP) is loaded: the same bits as the
pool's own workers, concurrent callers, the choice and its environment
variable, and a forked child, which goes back to the pool's own workers.

Nothing here checks speed (that is the bench's business); the idle test
checks that workers go to sleep, which a pool that never stops spinning
would fail by a wide margin on any machine.
"""
from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

import fusednn as fn
from fusednn import _cpu
from fusednn.__main__ import main
from fusednn.bench import sweep

from conftest import run_at_once, same_bits


def process_cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


@pytest.fixture(params=["fusednn", "openmp"])
def pool(request, restore_thread_pool):
    """Each test once on the pool's own workers and once on the OpenMP team
    (skipped where there is none)."""
    if request.param == "openmp":
        request.getfixturevalue("openmp_team")
    else:
        fn.set_thread_pool("fusednn")
    return request.param


@pytest.mark.parametrize("threads", [1, 2, 3, 4])
def test_every_thread_joins_a_region_that_needs_it(threads, pool, restore_threads):
    # Each task waits until all have started: the call raises unless the
    # pool runs them all at once, and returns the median region's seconds.
    # With more threads than cores the waiting tasks hold the cores until
    # the scheduler preempts them (milliseconds), which is the probe's cost,
    # not the pool's.
    fn.set_num_threads(threads)
    seconds = _cpu.pool_region_seconds(threads, 50)
    assert 0 < seconds < 1
    assert fn.info()["thread_pool"] == (pool if threads > 1 else "fusednn")


def test_region_probe_rejects_bad_arguments(restore_threads):
    fn.set_num_threads(2)
    for tasks, regions in [(0, 10), (3, 10), (2, 0)]:
        with pytest.raises(ValueError, match="pool_region_seconds"):
            _cpu.pool_region_seconds(tasks, regions)


def test_idle_workers_stop_using_cpu(restore_threads, restore_thread_pool):
    # The pool's own workers (the OpenMP team follows its runtime's wait
    # policy, OMP_WAIT_POLICY).
    fn.set_thread_pool("fusednn")
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


def current_cpu() -> int:
    """The core the calling thread runs on (field 39 of its stat line)."""
    with open("/proc/thread-self/stat", encoding="ascii") as file:
        return int(file.read().rsplit(")", 1)[1].split()[36])


def pool_threads() -> list[int]:
    tasks = Path("/proc/self/task")
    return [int(t.name) for t in tasks.iterdir()
            if (t / "comm").read_text().strip() == "fusednn-pool"]


@pytest.mark.skipif(not sys.platform.startswith("linux") or len(os.sched_getaffinity(0)) < 2,
                    reason="needs Linux and two cores")
def test_workers_keep_off_the_callers_core(restore_threads, restore_thread_pool):
    # A region on the pool's own workers sets their affinity to the caller's
    # cores less the one it runs on. The caller may move between the region
    # and the check, so the check is retried; a pool that leaves the masks
    # alone never passes.
    fn.set_thread_pool("fusednn")
    fn.set_num_threads(2)
    x = np.ones(2**20, np.float32)
    for _ in range(50):
        fn.relu(x, out=x)
        cpu = current_cpu()
        masks = [os.sched_getaffinity(tid) for tid in pool_threads()]
        if masks and all(m and cpu not in m for m in masks):
            break
    else:
        pytest.fail(f"pool threads' masks {masks} include the caller's core {cpu}")
    # With more threads than cores no worker is kept off a core.
    fn.set_num_threads(2 * len(os.sched_getaffinity(0)))
    fn.relu(x, out=x)
    assert all(os.sched_getaffinity(tid) == os.sched_getaffinity(0) for tid in pool_threads())


@pytest.mark.parametrize("name", ["relu", "gelu", "hardtanh"])
@pytest.mark.parametrize("size", [4096, 20_000, 40_000, 65_536, 100_000, 300_000])
def test_same_bits_where_the_split_changes(name, size, pool, restore_threads):
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
def test_batch_norm_same_bits_for_any_thread_count_at_layer_shapes(shape, pool, restore_threads):
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


def test_the_team_gives_the_pools_bits(openmp_team):
    # Every kernel family on 2 threads: on the OpenMP team, on the pool's
    # own workers and with the automatic choice, the same bits.
    rng = np.random.default_rng(7)
    x = rng.standard_normal((512, 1024), dtype=np.float32)
    g = rng.standard_normal((512, 1024), dtype=np.float32)
    bias = rng.standard_normal(1024, dtype=np.float32)
    gamma = rng.standard_normal(1024, dtype=np.float32)

    def run():
        y, mean, invstd = fn.batch_norm(x, gamma, None)
        return (fn.gelu(x), fn.activation_backward("silu", g, x=x), fn.dropout(x, 0.2, seed=3),
                fn.bias_act_dropout(x, bias, "gelu", 0.1, seed=4),
                *fn.bias_act_dropout_backward(g, x, bias, "gelu", 0.1, seed=4),
                y, mean, invstd, *fn.batch_norm_backward(g, x, gamma, mean, invstd),
                fn.batch_norm(x.reshape(8, 64, 32, 32), axis=1)[0])

    on_team = run()
    assert fn.info()["thread_pool"] == "openmp"
    fn.set_thread_pool("fusednn")
    own = run()
    fn.set_thread_pool("auto")
    assert all(same_bits(got, want) for got, want in zip(run(), own))
    for got, want in zip(on_team, own):
        assert same_bits(got, want)


def test_concurrent_callers_beside_the_team(openmp_team):
    # One caller at a time runs on the team; the others run serially on
    # their own thread, as with the pool's own workers.
    inputs = [np.random.default_rng(s).standard_normal(1_000_000, dtype=np.float32)
              for s in range(4)]
    expected = [fn.silu(x) for x in inputs]
    results = [None] * 4

    def work(i):
        for _ in range(5):
            results[i] = fn.silu(inputs[i])

    assert not run_at_once(4, work)
    for got, want in zip(results, expected):
        assert same_bits(got, want)


def test_thread_pool_choice(restore_thread_pool, restore_threads):
    assert fn.get_thread_pool() in ("auto", "openmp", "fusednn")
    fn.set_num_threads(2)
    for kind in ("fusednn", "openmp", "auto"):
        fn.set_thread_pool(kind)
        assert fn.get_thread_pool() == kind
        # "fusednn" where the team is out of reach (no GNU OpenMP loaded).
        assert fn.info()["thread_pool"] in (kind, "fusednn")
    fn.set_thread_pool("fusednn")
    assert fn.info()["thread_pool"] == "fusednn"
    fn.set_thread_pool("openmp")
    fn.set_num_threads(1)
    assert fn.info()["thread_pool"] == "fusednn"  # one thread: no region at all
    for bad in ("OpenMP", "", None, 1):
        with pytest.raises(ValueError, match="set_thread_pool"):
            fn.set_thread_pool(bad)
    assert fn.get_thread_pool() == "openmp"


def test_thread_pool_environment_variable():
    pytest.importorskip("torch")
    code = ("import torch, fusednn as fn; fn.set_num_threads(2); "
            "print(fn.get_thread_pool(), fn.info()['thread_pool'])")
    for kind in ("fusednn", "openmp", "auto"):
        env = dict(os.environ, FUSEDNN_THREAD_POOL=kind)
        out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True,
                             text=True, timeout=120, check=True).stdout.split()
        assert out[0] == kind and out[1] in (kind, "fusednn")


FORKED_CHILD = """
import os, sys
import numpy as np
import torch
import fusednn as fn

fn.set_thread_pool("openmp")
fn.set_num_threads(2)
x = np.random.default_rng(9).standard_normal(2**20, dtype=np.float32)
want = fn.gelu(x)
if fn.info()["thread_pool"] != "openmp":
    sys.exit(3)
pid = os.fork()
if pid == 0:  # the child reports by its exit status alone
    ok = False
    try:
        ok = fn.info()["thread_pool"] == "fusednn" and fn.gelu(x).tobytes() == want.tobytes()
    finally:
        os._exit(0 if ok else 1)
_, status = os.waitpid(pid, 0)
sys.exit(os.waitstatus_to_exitcode(status))
"""


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork")
def test_a_forked_child_runs_on_the_pools_own_workers():
    # The parent's OpenMP team threads are not forked with it: the child's
    # regions go to the pool's own workers (GNU OpenMP can wait for ever
    # there), and get the parent's results. In a process of its own, which
    # has no other library's threads to warn about.
    pytest.importorskip("torch")
    run = subprocess.run([sys.executable, "-c", FORKED_CHILD], capture_output=True, text=True,
                         timeout=120)
    if run.returncode == 3:
        pytest.skip("no GNU OpenMP team in a process with PyTorch here")
    assert run.returncode == 0, run.stdout + run.stderr


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
