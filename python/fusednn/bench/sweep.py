"""``python -m fusednn bench --sweep``: speed against size, where layers live.

The main bench measures one large size per kernel; real layers are 2^12 to
2^22 elements, where what decides speed is the cost of handing work to the
thread pool and how the work is split, not the kernel's inner loop. The
sweep times one kernel of every family at every power of two from 2^12 to
2^26 float32 elements, on 1 and 2 threads (or the --threads given), beside
PyTorch eager's op writing a preallocated output (aten ``.out`` overloads;
PyTorch's dropout has no out= form and allocates) and a copy of the same
bytes (the roof: at sizes that fit a cache level it is that level's copy
speed). It also times batch norm on the shapes of real layers, and the
pool itself: a parallel region of two tasks that each wait until the
other has started (so that both threads must join), and the CPU the process
burns while idle after a call.

Each point is the median of rounds that interleave fusednn, PyTorch and the
copy; each sample repeats its call until it lasts SAMPLE_SECONDS, so that a
4 us call is not timed by a clock read. PyTorch keeps its default OpenMP
wait policy (as in a user's process) unless OMP_WAIT_POLICY is set: its
workers then spin for about 10 ms after each op, on the core the next
routine's second thread needs, so each routine's sample starts after a
pause longer than that.
"""
from __future__ import annotations

import math
import resource
import statistics
import time
from dataclasses import dataclass
from typing import Callable

import numpy as np

from .._backend import _cpu, get_num_threads, get_thread_pool, set_num_threads, set_thread_pool
from .cases import BenchError
from .output import progress, require_matplotlib
from .timing import wall_seconds

SIZES = tuple(2**k for k in range(12, 27))
QUICK_SIZES = tuple(2**k for k in range(12, 23, 2))
SAMPLE_SECONDS = 0.002
SETTLE_SECONDS = 0.015
BIAS_COLUMNS = 1024
BATCH_NORM_CHANNELS = 256
DROPOUT_P = 0.1
EPS = 1e-5
# Batch-norm shapes of real layers: (N, C) and NCHW; NCHW ones are also run
# channels-last (the same values laid out NHWC).
LAYER_SHAPES = tuple((n, c) for n in (32, 256, 8192) for c in (64, 1024, 4096)) + (
    (64, 64, 16, 16), (64, 128, 28, 28))


@dataclass
class SweepKernel:
    name: str
    bytes_per_element: int       # what fusednn's kernel reads and writes, float32
    # (buffers, n, torch or None) -> (fusednn call, PyTorch call or None)
    make: Callable


class Buffers:
    """float32 inputs and outputs for the largest size, sliced per point so
    that no point allocates; torch tensors are views of the same memory."""

    def __init__(self, largest: int, torch):
        rng = np.random.default_rng(0)
        self.x = rng.standard_normal(largest, dtype=np.float32)
        self.grad = rng.standard_normal(largest, dtype=np.float32)
        self.out = np.empty(largest, dtype=np.float32)
        self.bias = rng.standard_normal(BIAS_COLUMNS, dtype=np.float32)
        self.torch = torch

    def arrays(self, n: int, *names: str) -> list:
        return [getattr(self, name)[:n] for name in names]

    def tensors(self, *arrays) -> list:
        return [self.torch.from_numpy(a) for a in arrays]


def _activation(name: str):
    def make(buffers: Buffers, n: int, torch):
        import fusednn as fn
        x, out = buffers.arrays(n, "x", "out")
        function = getattr(fn, name)
        ours = lambda: function(x, out=out)  # noqa: E731
        if torch is None:
            return ours, None
        tx, tout = buffers.tensors(x, out)
        op = getattr(torch.ops.aten, name).out
        return ours, lambda: op(tx, out=tout)
    return make


def _gelu_backward(buffers: Buffers, n: int, torch):
    import fusednn as fn
    grad, x, out = buffers.arrays(n, "grad", "x", "out")
    ours = lambda: fn.activation_backward("gelu", grad, x=x, out=out)  # noqa: E731
    if torch is None:
        return ours, None
    tgrad, tx, tout = buffers.tensors(grad, x, out)
    op = torch.ops.aten.gelu_backward.grad_input
    return ours, lambda: op(tgrad, tx, grad_input=tout)


def _dropout(buffers: Buffers, n: int, torch):
    import fusednn as fn
    x, out = buffers.arrays(n, "x", "out")
    ours = lambda: fn.dropout(x, DROPOUT_P, seed=1, out=out)  # noqa: E731
    if torch is None:
        return ours, None
    tx, = buffers.tensors(x)
    return ours, lambda: torch.ops.aten.native_dropout(tx, DROPOUT_P, True)


def _dropout_backward(buffers: Buffers, n: int, torch):
    import fusednn as fn
    grad, out = buffers.arrays(n, "grad", "out")
    ours = lambda: fn.dropout_backward(grad, DROPOUT_P, seed=1, out=out)  # noqa: E731
    if torch is None:
        return ours, None
    tgrad, tout = buffers.tensors(grad, out)
    mask = torch.ops.aten.native_dropout(tgrad, DROPOUT_P, True)[1]
    op = torch.ops.aten.native_dropout_backward.out
    return ours, lambda: op(tgrad, mask, 1.0 / (1.0 - DROPOUT_P), out=tout)


def _bias_gelu_dropout(buffers: Buffers, n: int, torch):
    import fusednn as fn
    h, out = (a.reshape(-1, BIAS_COLUMNS) for a in buffers.arrays(n, "x", "out"))
    bias = buffers.bias
    ours = lambda: fn.bias_act_dropout(h, bias, "gelu", DROPOUT_P, seed=1, out=out)  # noqa: E731
    if torch is None:
        return ours, None
    th, tbias = buffers.tensors(h, bias)
    gelu, dropout = torch.nn.functional.gelu, torch.ops.aten.native_dropout
    return ours, lambda: dropout(gelu(th + tbias), DROPOUT_P, True)


def _batch_norm_forward(buffers: Buffers, n: int, torch):
    x, out = (a.reshape(-1, BATCH_NORM_CHANNELS) for a in buffers.arrays(n, "x", "out"))
    return batch_norm_calls(x, out, None, torch, "forward")


def _batch_norm_backward(buffers: Buffers, n: int, torch):
    x, grad, out = (a.reshape(-1, BATCH_NORM_CHANNELS)
                    for a in buffers.arrays(n, "x", "grad", "out"))
    return batch_norm_calls(x, out, grad, torch, "backward")


def batch_norm_calls(x, out, grad, torch, direction: str, axis: int = 1, to_nchw=None):
    """fusednn's and PyTorch's training batch norm (forward, or backward
    from the forward's saved statistics) on x with channels on `axis`;
    PyTorch sees x permuted by to_nchw (channels second)."""
    import fusednn as fn
    channels = x.shape[axis]
    gamma = np.linspace(0.5, 1.5, channels, dtype=np.float32)
    beta = np.linspace(-0.1, 0.1, channels, dtype=np.float32)
    running = [np.zeros(channels, np.float32), np.ones(channels, np.float32)]
    if direction == "forward":
        ours = lambda: fn.batch_norm(x, gamma, beta, *running, axis=axis, out=out)  # noqa: E731
    else:
        _, mean, invstd = fn.batch_norm(x, gamma, beta, axis=axis, out=out)
        ours = lambda: fn.batch_norm_backward(grad, x, gamma, mean, invstd,  # noqa: E731
                                              axis=axis)
    if torch is None:
        return ours, None
    view = (lambda a: torch.from_numpy(a).permute(to_nchw)) if to_nchw else torch.from_numpy
    tx, tout = view(x), view(out)
    tgamma, tbeta, tmean, tvar = (torch.from_numpy(a) for a in (gamma, beta, *running))
    aten = torch.ops.aten
    if direction == "forward":
        save = [torch.empty(channels), torch.empty(channels)]
        return ours, lambda: aten.native_batch_norm.out(
            tx, tgamma, tbeta, tmean, tvar, True, 0.1, EPS, out=tout, save_mean=save[0],
            save_invstd=save[1])
    tgrad = view(grad)
    _, save_mean, save_invstd = aten.native_batch_norm(tx, tgamma, tbeta, None, None, True,
                                                       0.1, EPS)
    return ours, lambda: aten.native_batch_norm_backward(
        tgrad, tx, tgamma, None, None, save_mean, save_invstd, True, EPS, [True, True, True])


SWEEP_KERNELS = (
    SweepKernel("relu", 8, _activation("relu")),
    SweepKernel("gelu", 8, _activation("gelu")),
    SweepKernel("gelu backward", 12, _gelu_backward),
    SweepKernel("silu", 8, _activation("silu")),
    SweepKernel("dropout", 8, _dropout),
    SweepKernel("dropout backward", 8, _dropout_backward),
    SweepKernel("bias+gelu+dropout", 8, _bias_gelu_dropout),
    SweepKernel(f"batch_norm (N, {BATCH_NORM_CHANNELS})", 12, _batch_norm_forward),
    SweepKernel(f"batch_norm backward (N, {BATCH_NORM_CHANNELS})", 20, _batch_norm_backward),
)


def calls_per_sample(call) -> int:
    """How many back-to-back calls last about SAMPLE_SECONDS."""
    call()
    start = time.perf_counter()
    call()
    once = time.perf_counter() - start
    return max(1, min(100_000, math.ceil(SAMPLE_SECONDS / max(once, 1e-7))))


def interleaved_medians(calls: dict, repeat: int) -> dict:
    """Median seconds per call of each routine over `repeat` rounds."""
    counts = {label: calls_per_sample(call) for label, call in calls.items()}
    samples: dict = {label: [] for label in calls}
    for _ in range(repeat):
        for label, call in calls.items():
            time.sleep(SETTLE_SECONDS)
            count = counts[label]
            start = time.perf_counter()
            for _ in range(count):
                call()
            samples[label].append((time.perf_counter() - start) / count)
    return {label: statistics.median(values) for label, values in samples.items()}


def copy_call(src: np.ndarray, dst: np.ndarray) -> Callable:
    """The faster of fusednn's threaded streaming copy and np.copyto of src
    into dst, as one routine."""
    threaded = lambda: _cpu.copy(src, dst)  # noqa: E731
    single = lambda: np.copyto(dst, src)  # noqa: E731
    return min((threaded, single), key=lambda c: min(wall_seconds(c) for _ in range(3)))


def pool_probe(threads: int, repeat: int) -> dict:
    """A parallel region of `threads` tasks that wait until all have
    started (empty ones would time only the caller): its median cost over
    back-to-back regions on fusednn's own pool, and the process's CPU use
    while idle from 1 ms after the last region to 100 ms later (worker
    threads included); where the process's OpenMP team is within reach
    (PyTorch loaded), the region's cost on it too."""
    set_num_threads(threads)
    choice = get_thread_pool()
    try:
        set_thread_pool("fusednn")
        regions = [_cpu.pool_region_seconds(threads, 2000) for _ in range(repeat)]
        time.sleep(0.001)
        before = resource.getrusage(resource.RUSAGE_SELF)
        wall = time.perf_counter()
        time.sleep(0.1)
        wall = time.perf_counter() - wall
        after = resource.getrusage(resource.RUSAGE_SELF)
        set_thread_pool("openmp")
        team = None
        if _cpu.openmp_team_available():
            team = statistics.median(
                _cpu.pool_region_seconds(threads, 2000) for _ in range(repeat)) * 1e6
    finally:
        set_thread_pool(choice)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return {"threads": threads, "region_us": statistics.median(regions) * 1e6,
            "idle_cpu_percent": 100.0 * cpu / wall, "openmp_region_us": team}


@dataclass
class Point:
    kernel: str
    elements: int
    threads: int
    ours_s: float
    torch_s: float | None
    copy_s: float
    bytes_moved: int

    @property
    def gb_per_s(self) -> float:
        return self.bytes_moved / self.ours_s / 1e9

    @property
    def x_torch(self) -> float | None:
        return None if self.torch_s is None else self.torch_s / self.ours_s


def measure(name: str, elements: int, nbytes: int, ours, peer, copy, threads_list, repeat,
            torch) -> list:
    """Points of one call (and its PyTorch peer, where there is one) at
    each thread count, timed in rounds with the copy of nbytes."""
    points = []
    for threads in threads_list:
        set_num_threads(threads)
        if torch is not None:
            torch.set_num_threads(threads)
        calls = {"ours": ours, "copy": copy}
        if peer is not None:
            calls["torch"] = peer
        medians = interleaved_medians(calls, repeat)
        points.append(Point(name, elements, threads, medians["ours"], medians.get("torch"),
                            medians["copy"], nbytes))
    return points


def run_sweep(sizes, threads_list, repeat, torch) -> list:
    buffers = Buffers(max(sizes), torch)
    points = []
    for kernel in SWEEP_KERNELS:
        for n in sizes:
            ours, peer = kernel.make(buffers, n, torch)
            nbytes = n * kernel.bytes_per_element
            n_copied = max(1, nbytes // 8)
            copy = copy_call(buffers.grad[:n_copied], buffers.out[:n_copied])
            points += measure(kernel.name, n, nbytes, ours, peer, copy, threads_list, repeat,
                              torch)
            progress(f"  {kernel.name} 2^{n.bit_length() - 1} done")
    return points


def layer_shapes_points(threads_list, repeat, torch) -> list:
    """Batch norm forward and backward on LAYER_SHAPES (NCHW ones also
    channels-last), as Points named by shape and layout."""
    points = []
    rng = np.random.default_rng(1)
    for shape in LAYER_SHAPES:
        layouts = [("", shape, 1, None)]
        if len(shape) == 4:
            n, c, h, w = shape
            layouts.append((" channels-last", (n, h, w, c), 3, (0, 3, 1, 2)))
        for suffix, laid, axis, to_nchw in layouts:
            x = rng.standard_normal(laid, dtype=np.float32)
            grad = rng.standard_normal(laid, dtype=np.float32)
            out = np.empty_like(x)
            for direction, traffic in (("forward", 12), ("backward", 20)):
                ours, peer = batch_norm_calls(x, out, grad, torch, direction, axis, to_nchw)
                source = np.ones(max(1, x.size * traffic // 8), np.float32)
                copy = copy_call(source, np.empty_like(source))
                points += measure(f"batch_norm {direction} {shape}{suffix}", x.size,
                                  x.size * traffic, ours, peer, copy, threads_list, repeat, torch)
            progress(f"  batch_norm {shape}{suffix} done")
    return points


def format_sweep(points: list, threads_list) -> list[str]:
    """One table per kernel: GB/s of fusednn, PyTorch and the copy, and
    PyTorch's time over fusednn's, for each size and thread count."""
    lines = []
    kernels = list(dict.fromkeys(p.kernel for p in points))
    for kernel in kernels:
        rows = [p for p in points if p.kernel == kernel]
        header = "| elements |" + "".join(
            f" {t}t GB/s | {t}t torch GB/s | {t}t x torch | {t}t copy GB/s |"
            for t in threads_list)
        lines += [f"#### {kernel}", "", header,
                  "|---|" + "---|" * (4 * len(threads_list))]
        for n in sorted({p.elements for p in rows}):
            cells = []
            for t in threads_list:
                p = next(q for q in rows if q.elements == n and q.threads == t)
                torch_gb = "" if p.torch_s is None else f"{p.bytes_moved / p.torch_s / 1e9:.1f}"
                x = "" if p.x_torch is None else f"{p.x_torch:.2f}"
                cells.append(f" {p.gb_per_s:.1f} | {torch_gb} | {x} | "
                             f"{p.bytes_moved / p.copy_s / 1e9:.1f} |")
            label = f"2^{n.bit_length() - 1}" if n & (n - 1) == 0 else str(n)
            lines.append(f"| {label} |" + "".join(cells))
        lines.append("")
    return lines


def summary_lines(points: list, threads_list) -> list[str]:
    """Where fusednn trails PyTorch, and where more threads were slower."""
    lines = []
    behind = [p for p in points if p.x_torch is not None and p.x_torch < 1.0]
    lines.append(f"points: {len(points)}; behind PyTorch: {len(behind)}")
    for p in sorted(behind, key=lambda p: p.x_torch)[:20]:
        lines.append(f"  {p.kernel} {p.elements} elements, {p.threads}t: {p.x_torch:.2f}x")
    if len(threads_list) > 1:
        fewer, more = min(threads_list), max(threads_list)
        slower = []
        for p in points:
            if p.threads != more:
                continue
            q = next((q for q in points if q.kernel == p.kernel and q.elements == p.elements
                      and q.threads == fewer), None)
            if q is not None and p.ours_s > q.ours_s:
                slower.append((p, q.ours_s / p.ours_s))
        lines.append(f"slower on {more} threads than on {fewer}: {len(slower)}")
        for p, ratio in sorted(slower, key=lambda s: s[1])[:20]:
            lines.append(f"  {p.kernel} {p.elements} elements: {ratio:.2f}x")
    return lines


def plot_sweep(points: list, threads_list, path: str) -> None:
    from matplotlib.figure import Figure
    kernels = [k.name for k in SWEEP_KERNELS if any(p.kernel == k.name for p in points)]
    columns = 3
    rows = math.ceil(len(kernels) / columns)
    figure = Figure(figsize=(5 * columns, 3.6 * rows), layout="constrained")
    for index, kernel in enumerate(kernels):
        axes = figure.add_subplot(rows, columns, index + 1)
        for t in threads_list:
            series = sorted((p for p in points if p.kernel == kernel and p.threads == t),
                            key=lambda p: p.elements)
            sizes = [p.elements for p in series]
            axes.plot(sizes, [p.gb_per_s for p in series], "o-", label=f"fusednn {t}t")
            if all(p.torch_s is not None for p in series):
                axes.plot(sizes, [p.bytes_moved / p.torch_s / 1e9 for p in series], "s--",
                          label=f"PyTorch {t}t")
            if t == max(threads_list):
                axes.plot(sizes, [p.bytes_moved / p.copy_s / 1e9 for p in series], ":",
                          color="gray", label=f"copy {t}t")
        axes.set_xscale("log", base=2)
        axes.set_title(kernel)
        axes.set_xlabel("elements (float32)")
        axes.set_ylabel("GB/s")
        axes.legend(fontsize="small")
    figure.savefig(path)


def run(args, peers: frozenset) -> int:
    """Runs the sweep for the bench's CLI (its --quick, --threads, --repeat,
    --json, --plot; of the peers only PyTorch eager has a column)."""
    # One thread and the default count (the cores this process may use).
    threads_list = [args.threads] if args.threads else sorted({1, get_num_threads()})
    if args.device != "cpu":
        raise BenchError("--sweep measures the CPU kernels (--device cpu)")
    if args.plot:
        require_matplotlib()
    torch = None
    if "torch" in peers:
        try:
            import torch
        except ImportError:
            torch = None
    previous = get_num_threads()
    try:
        sizes = QUICK_SIZES if args.quick else SIZES
        repeat = args.repeat or (3 if args.quick else 5)
        pool = [pool_probe(t, repeat) for t in threads_list]
        points = run_sweep(sizes, threads_list, repeat, torch)
        layers = [] if args.quick else layer_shapes_points(threads_list, repeat, torch)
    finally:
        set_num_threads(previous)
    lines = ["## pool", ""]
    for entry in pool:
        team = entry["openmp_region_us"]
        lines.append(f"  {entry['threads']} threads: a region of {entry['threads']} tasks that all "
                     f"join {entry['region_us']:.2f} us on fusednn's pool (idle CPU 1-101 ms "
                     f"after it {entry['idle_cpu_percent']:.1f}%)"
                     + (f", {team:.2f} us on the process's OpenMP team" if team else ""))
    lines += ["", "## sweep (float32)", ""] + format_sweep(points, threads_list)
    if layers:
        lines += ["## batch norm at layer shapes (float32)", ""]
        lines += format_sweep(layers, threads_list)
    lines += summary_lines(points + layers, threads_list)
    print("\n".join(lines))
    if args.json:
        import json
        with open(args.json, "w", encoding="utf-8") as file:
            json.dump({"pool": pool, "points": [vars(p) for p in points + layers]}, file,
                      indent=1)
    if args.plot:
        plot_sweep(points, threads_list, args.plot)
    return 0
