"""What the bench's pieces hand each other: the run's Plan, a family's Case
(one kernel in one direction: its traffic, its check, and prepare(), which
puts the inputs in place and returns the calls to time), the Peer versions
of a case, the words a family contributes to the report, and one Result row
of the table and the JSON.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable

import numpy as np

from .checks import CheckResult

# The peer columns, in the table's order: PyTorch eager, torch.compile of the
# same PyTorch function, jax.jit of the equivalent JAX function.
PEERS = ("torch", "torch.compile", "jax.jit")


class UsageError(Exception):
    """A bad option value; the CLI reports it as an argparse error."""


class BenchError(Exception):
    """The benchmark cannot run here (no CUDA, no matplotlib, ...)."""


@dataclass
class Plan:
    """What one run measures, shared by every case builder."""
    device: str
    dtype: np.dtype
    size: int
    repeat: int
    threads: int
    reference_elements: int
    torch: object | None      # the torch module where torch or torch.compile is timed
    torch_note: str           # why there is no torch column, or its version
    # Families with shapes of their own (batch norm) keep them unless
    # --size is given, and take a smaller one with --quick.
    size_given: bool = False
    quick: bool = False
    peers: frozenset = frozenset()   # the labels of PEERS to time
    compile_note: str = ""    # why there is no torch.compile column
    jax: object | None = None
    jax_note: str = ""        # why there is no jax.jit column, or its version


@dataclass
class Peer:
    """A peer's version of one case: the timed call with its inputs in
    place, and check(), its output on the family's check inputs judged by
    the same bounds as fusednn's."""
    label: str                # one of PEERS
    op: str                   # what it runs, for the report
    call: Callable[[], object]
    check: Callable[[], CheckResult]
    # Why it allocates its result, where it does; None where it writes a
    # preallocated output.
    allocates: str | None = None
    compile_seconds: float | None = None   # compiling for the timed shape, excluded


@dataclass
class Runners:
    """The calls one case times, with its inputs already in place."""
    ours: Callable[[], object]
    reference: Callable[[], object]          # on the first reference_elements elements
    reference_elements: int
    peers: list = field(default_factory=list)          # Peer
    # Peers that could not be built for this case: label -> why.
    peer_errors: dict = field(default_factory=dict)


@dataclass(eq=False)  # compared and hashed by identity: checks are keyed by case
class Case:
    """One kernel in one direction, as its family's builder makes it: the
    shape of its input, the memory traffic it costs per element, check()
    against fusednn.reference, and prepare(), which puts its inputs in place
    and returns the calls to time."""
    family: str
    name: str
    direction: str            # "forward" or "backward"
    shape: tuple              # of x, the array the traffic is counted in
    bytes_per_element: float
    traffic: str              # what bytes_per_element counts: "2r+1w" is 2 arrays read, 1 written
    check: Callable[[], CheckResult]
    prepare: Callable[[], Runners]

    @property
    def label(self) -> str:
        return f"{self.name} {self.direction}"

    @property
    def elements(self) -> int:
        return math.prod(self.shape)


@dataclass
class FamilyText:
    """What the report says about one family's cases; each piece follows a
    heading of the report ("check: all N agree with fusednn.reference ...")."""
    arrays: str               # the arrays' sizes and dtype
    check: str                # the bounds, and on what inputs
    reference: str            # how the numpy reference is timed
    torch: str                # the PyTorch ops, and how they are called
    jax: str                  # the JAX functions
    check_notes: list = field(default_factory=list)   # further lines about the check
    # Why one of this family's rows may pass its copy roof by more than
    # output.ROOF_NOTE_PERCENT: the footnote such a row gets.
    over_roof: str = ("the kernel moves the bytes its roof copies, no fewer, so the two were "
                      "timed under different load within the rounds (the samples are in "
                      "the JSON)")


@dataclass
class PeerResult:
    """One peer's cell of a row."""
    op: str
    ms: float
    x: float                  # the peer's time over fusednn's: > 1 where fusednn is faster
    allocates: bool
    allocates_why: str | None
    compile_seconds: float | None
    check_error: float
    check_unit: str
    check_tolerance: float
    check_passed: bool
    check_ordinary_error: float | None   # on the ordinary inputs alone (CheckResult)
    check_worst: str

    @property
    def marker(self) -> str:
        """"!" where the peer is off on ordinary inputs, "~" where it is off
        on special ones only, "" where it is within the bound."""
        if self.check_passed:
            return ""
        ordinary = self.check_ordinary_error
        return "~" if ordinary is not None and ordinary <= self.check_tolerance else "!"


@dataclass
class Result:
    """One row of the table, and of the JSON results."""
    family: str
    kernel: str
    direction: str
    shape: list
    elements: int
    traffic: str
    bytes_per_element: float
    bytes_moved: int
    time_ms: float
    time_ms_samples: list     # every repeat, for the run-to-run noise --compare judges by
    gb_per_s: float
    roof_gb_per_s: float
    roof_source: str          # the faster copy routine
    percent_of_roof: float
    check_error: float
    check_unit: str           # "ulp", or "bound" (see CheckResult)
    reference_ms: float       # scaled to the full size
    reference_elements: int   # how many elements it was timed on
    x_numpy_reference: float
    peers: dict = field(default_factory=dict)         # label -> PeerResult
    peer_errors: dict = field(default_factory=dict)   # label -> why it is missing here


def names_alone(spec: str, name: str) -> bool:
    """Whether --kernels names the table `name`, which runs on its own: a
    UsageError when the list names it beside kernels."""
    tokens = [t.strip() for t in spec.split(",") if t.strip()]
    if name not in tokens:
        return False
    if tokens != [name]:
        raise UsageError(f"--kernels: {name} is benchmarked on its own; name it without "
                         f"kernels (--kernels {name})")
    return True


def on_device(device: str):
    """(to_device, to_host) array conversions for the kernels of `device`:
    identities on the CPU, CuPy's asarray and asnumpy on the GPU."""
    if device == "cuda":
        import cupy
        return cupy.asarray, cupy.asnumpy
    return (lambda a: a), (lambda a: a)


def size_text(n: int) -> str:
    exponent = n.bit_length() - 1
    return f"{n} (2^{exponent})" if n == 1 << exponent else str(n)


def shape_text(shape: tuple) -> str:
    return "x".join(str(n) for n in shape)


def reference_text(plan: Plan) -> str:
    """How a family on flat arrays of plan.size times the numpy reference."""
    m = min(plan.size, plan.reference_elements)
    return (f"timed on the first {m} elements and scaled linearly to {plan.size}"
            if m < plan.size else f"timed on all {plan.size} elements")
