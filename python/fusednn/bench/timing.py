"""How the bench times: the clocks (the host's wall clock; CUDA events on
CuPy's current stream, with the GPU held busy while the host enqueues),
rounds that interleave a kernel with its peers and the copy of the same
bytes so that a change of machine load hits them alike, the copy roofs, and
the summary of one case's samples into a Result row.
"""
from __future__ import annotations

import os
import statistics
import time
from dataclasses import dataclass

import numpy as np

from .._backend import _cpu
from .cases import Case, Peer, PeerResult, Plan, Result, Runners
from .checks import CheckResult

WARMUP = 1


def wall_seconds(call) -> float:
    """Seconds call() takes by the host's clock (CPU kernels, the reference)."""
    start = time.perf_counter()
    call()
    return time.perf_counter() - start


# A one-thread kernel that keeps the GPU busy for a fixed number of clock
# cycles (about a millisecond): queued ahead of the start event, it lets the
# host finish enqueueing the timed call before the GPU reaches that event.
_CUDA_LEAD_SOURCE = r"""
extern "C" __global__ void fusednn_bench_lead(long long cycles) {
  const long long start = clock64();
  while (clock64() - start < cycles) {
  }
}
"""
CUDA_LEAD_CYCLES = 2_000_000


class CudaEventClock:
    """Seconds of GPU work call() enqueues on CuPy's current stream, from two
    CUDA events around it. A busy-wait kernel queued before the start event
    holds the GPU while the host enqueues the call, so host-side overhead
    (argument checks, launches, allocations; up to about a millisecond) is
    not counted: the events bracket the device work alone, for fusednn and
    its peers alike."""

    def __init__(self):
        import cupy
        self.cupy = cupy
        self.start, self.end = cupy.cuda.Event(), cupy.cuda.Event()
        self.lead = cupy.RawKernel(_CUDA_LEAD_SOURCE, "fusednn_bench_lead")

    def __call__(self, call) -> float:
        self.lead((1,), (1,), (np.int64(CUDA_LEAD_CYCLES),))
        self.start.record()
        call()
        self.end.record()
        self.end.synchronize()
        return self.cupy.cuda.get_elapsed_time(self.start, self.end) / 1e3


def interleaved_seconds(calls: dict, repeat: int, warmup: int = WARMUP,
                        clocks: dict | None = None) -> dict:
    """Times of each call, `repeat` samples each, by the clock `clocks`
    gives for its label (wall_seconds by default). Rounds interleave the
    calls (one of each per round) so that a change in machine load hits all
    of them."""
    clocks = clocks or {}
    for call in calls.values():
        for _ in range(warmup):
            call()
    samples = {label: [] for label in calls}
    for _ in range(repeat):
        for label, call in calls.items():
            samples[label].append(clocks.get(label, wall_seconds)(call))
    return samples


class CpuCopyRoof:
    """A plain copy moving the same bytes as a case, half read and half
    written: fusednn._cpu.copy (threaded, storing as the kernels do: lines
    streamed past the cache once an output reaches 16 MiB) and np.copyto
    (one thread), on buffers sized for the largest case. Its buffers stay
    in the cache between rounds exactly when a case's arrays do (they are
    as large, and timed in the same rounds), so at a size that fits in the
    last-level cache the roof is an in-cache copy, not DRAM's rate."""

    clock = staticmethod(wall_seconds)
    description = ("the faster of fusednn._cpu.copy (threaded, with the kernels' stores) and "
                   "np.copyto")

    def __init__(self, plan: Plan, cases: list):
        self.itemsize = plan.dtype.itemsize
        largest = max(self.copied(c.elements, c.bytes_per_element) for c in cases)
        # Written, so that reading it does not hit the shared zero page.
        self.source = np.ones(largest, dtype=plan.dtype)
        self.target = np.empty(largest, dtype=plan.dtype)

    def copied(self, elements: int, bytes_per_element: float) -> int:
        """How many elements the copy of that traffic copies."""
        return round(elements * bytes_per_element / (2 * self.itemsize))

    def calls(self, elements: int, bytes_per_element: float) -> tuple[int, dict]:
        """(bytes the copy moves, {routine: call})."""
        n = self.copied(elements, bytes_per_element)
        src, dst = self.source[:n], self.target[:n]
        return 2 * n * self.itemsize, {"fusednn._cpu.copy": lambda: _cpu.copy(src, dst),
                                       "np.copyto": lambda: np.copyto(dst, src)}


class CudaCopyRoof(CpuCopyRoof):
    """The GPU's copy of the same bytes, device to device on CuPy's current
    stream: cudaMemcpyAsync (the driver's copy path) and cupy.copyto (an
    elementwise kernel), timed by CUDA events like the kernels and peers."""

    description = "the faster of a device-to-device cudaMemcpyAsync and cupy.copyto"

    def __init__(self, plan: Plan, cases: list):
        import cupy
        self.cupy = cupy
        self.clock = CudaEventClock()
        self.itemsize = plan.dtype.itemsize
        largest = max(self.copied(c.elements, c.bytes_per_element) for c in cases)
        self.source = cupy.ones(largest, dtype=plan.dtype)
        self.target = cupy.empty(largest, dtype=plan.dtype)

    def calls(self, elements: int, bytes_per_element: float) -> tuple[int, dict]:
        n = self.copied(elements, bytes_per_element)
        src, dst = self.source[:n], self.target[:n]
        nbytes = n * self.itemsize
        return 2 * nbytes, {
            "cudaMemcpyAsync": lambda: dst.data.copy_from_device_async(src.data, nbytes),
            "cupy.copyto": lambda: self.cupy.copyto(dst, src)}


COPY_ROOFS = {"cpu": CpuCopyRoof, "cuda": CudaCopyRoof}


def last_level_cache(root: str = "/sys/devices/system/cpu/cpu0/cache") -> tuple | None:
    """(level, bytes) of the CPU's last data (or unified) cache, from Linux's
    sysfs; None where it cannot be read."""
    best = None
    try:
        entries = os.listdir(root)
    except OSError:
        return None
    for entry in entries:
        if not entry.startswith("index"):
            continue
        try:
            def read(name: str) -> str:
                with open(os.path.join(root, entry, name), encoding="ascii") as f:
                    return f.read().strip()
            if read("type") == "Instruction":
                continue
            level, size = int(read("level")), read("size")
        except (OSError, ValueError):
            continue
        units = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}
        scale = units.get(size[-1:].upper(), 1)
        digits = size[:-1] if scale > 1 else size
        if not digits.isdigit():
            continue
        if best is None or level > best[0]:
            best = (level, int(digits) * scale)
    return best


@dataclass
class Timing:
    case: Case
    runners: Runners
    samples: dict             # "ours", "reference", peer labels, copy routines -> seconds
    copy_bytes: int
    copies: tuple             # the copy routines' labels in samples
    peer_checks: dict         # peer label -> CheckResult on the check inputs


def time_case(case: Case, plan: Plan, roof) -> Timing:
    """Checks the case's peers, then times the case with its peers and the
    copy of the same bytes, all in the same rounds."""
    runners = case.prepare()
    peer_checks = {}
    for peer in list(runners.peers):
        try:
            peer_checks[peer.label] = peer.check()
        except Exception as error:  # a peer's own failure leaves its cell empty
            runners.peers.remove(peer)
            runners.peer_errors[peer.label] = (f"failed on the check inputs: "
                                               f"{type(error).__name__}: {error}")
    copy_bytes, copies = roof.calls(case.elements, case.bytes_per_element)
    calls = {"ours": runners.ours, **copies, "reference": runners.reference,
             **{peer.label: peer.call for peer in runners.peers}}
    # Everything but the host-side reference runs on the roof's device.
    clocks = {label: roof.clock for label in calls if label != "reference"}
    return Timing(case, runners, interleaved_seconds(calls, plan.repeat, clocks=clocks),
                  copy_bytes, tuple(copies), peer_checks)


@dataclass
class Roof:
    """The copy roof for one traffic (bytes/elem over a number of elements):
    each routine's median over every copy timed alongside the cases with
    that traffic in this run."""
    bytes_per_element: float
    elements: int
    samples: int
    gb_per_s: dict            # copy routine -> GB/s

    @property
    def source(self) -> str:
        return max(self.gb_per_s, key=self.gb_per_s.get)

    @property
    def best(self) -> float:
        return self.gb_per_s[self.source]


def traffic_key(case: Case) -> tuple:
    """Cases with the same key share a roof."""
    return case.bytes_per_element, case.elements


def pool_roofs(timings: list) -> dict:
    roofs = {}
    for key in sorted({traffic_key(t.case) for t in timings}):
        group = [t for t in timings if traffic_key(t.case) == key]
        rates = {name: [t.copy_bytes / s / 1e9 for t in group for s in t.samples[name]]
                 for name in group[0].copies}
        roofs[key] = Roof(*key, sum(len(v) for v in rates.values()),
                          {name: statistics.median(v) for name, v in rates.items()})
    return roofs


def row_roof(timing: Timing) -> tuple[str, float]:
    """(routine, GB/s): the faster copy routine's median over the copies
    timed in this case's own rounds. A row's % roof uses it rather than the
    run's pooled roof, so that a change of machine load between rows, which
    on a shared machine can move a pooled ratio by tens of points, cancels."""
    rates = {name: statistics.median(timing.copy_bytes / s / 1e9 for s in timing.samples[name])
             for name in timing.copies}
    source = max(rates, key=rates.get)
    return source, rates[source]


def _peer_result(peer: Peer, seconds: float, ours: float, check: CheckResult) -> PeerResult:
    return PeerResult(
        op=peer.op, ms=seconds * 1e3, x=seconds / ours, allocates=peer.allocates is not None,
        allocates_why=peer.allocates, compile_seconds=peer.compile_seconds,
        check_error=check.error, check_unit=check.unit, check_tolerance=check.tolerance,
        check_passed=check.passed, check_ordinary_error=check.ordinary_error,
        check_worst=check.describe())


def summarize(timing: Timing, check: CheckResult) -> Result:
    case, runners = timing.case, timing.runners
    seconds = {label: statistics.median(s) for label, s in timing.samples.items()}
    moved = round(case.elements * case.bytes_per_element)
    gb_per_s = moved / seconds["ours"] / 1e9
    roof_source, roof_gb_per_s = row_roof(timing)
    reference_s = seconds["reference"] * case.elements / runners.reference_elements
    return Result(
        family=case.family, kernel=case.name, direction=case.direction,
        shape=list(case.shape), elements=case.elements, traffic=case.traffic,
        bytes_per_element=case.bytes_per_element, bytes_moved=moved,
        time_ms=seconds["ours"] * 1e3,
        time_ms_samples=[s * 1e3 for s in timing.samples["ours"]],
        gb_per_s=gb_per_s, roof_gb_per_s=roof_gb_per_s,
        roof_source=roof_source, percent_of_roof=100.0 * gb_per_s / roof_gb_per_s,
        check_error=check.error, check_unit=check.unit, reference_ms=reference_s * 1e3,
        reference_elements=runners.reference_elements,
        x_numpy_reference=reference_s / seconds["ours"],
        peers={peer.label: _peer_result(peer, seconds[peer.label], seconds["ours"],
                                        timing.peer_checks[peer.label])
               for peer in runners.peers},
        peer_errors=dict(runners.peer_errors))
