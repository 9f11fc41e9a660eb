"""``python -m fusednn bench``: its options, all validated here before any
work starts (a bad value is a UsageError, which the CLI reports as an
argparse error with exit status 2), the registry of kernel families, and
run(), which checks every selected kernel, times it with its peers, prints
the table and writes what was asked for.
"""
from __future__ import annotations

import argparse
import os
from dataclasses import dataclass
from typing import Callable

import numpy as np

from .._backend import _cpu, cupy_install_hint, get_num_threads, info, set_num_threads
from . import output, overhead, peers, split, sweep, training
from .activations import ACTIVATION_KERNELS, activation_cases, describe_activations
from .batchnorm import (BATCH_NORM_KERNELS, BATCH_NORM_QUICK_SHAPE, BATCH_NORM_SHAPE,
                        batch_norm_cases, describe_batch_norm)
from .cases import PEERS, BenchError, Case, Plan, UsageError, shape_text
from .dropout import DROPOUT_KERNELS, describe_dropout, dropout_cases
from .output import progress
from .timing import COPY_ROOFS, pool_roofs, summarize, time_case

DEFAULT_SIZE = 2**25
QUICK_SIZE = 2**22
# A GPU streams 2^22 elements in microseconds, where launch overhead and
# caches would decide; these sizes measure memory bandwidth.
CUDA_DEFAULT_SIZE = 2**28
CUDA_QUICK_SIZE = 2**26
DEFAULT_REPEAT = 7
QUICK_REPEAT = 5
# The reference runs in Python-level float64 (gelu calls math.erfc per
# element), so it is timed on a prefix of this many elements and scaled.
REFERENCE_ELEMENTS = 2**20


@dataclass
class Family:
    name: str
    kernels: tuple            # kernel names, for --kernels
    directions: tuple
    builders: dict            # device -> function(plan) -> list[Case]
    describe: Callable        # (plan, {case: CheckResult}) -> FamilyText

    @property
    def variants(self) -> tuple:
        """The names before "[" of kernels that come in variants
        ("batch_norm" of "batch_norm[NCHW]"), each selecting them all."""
        return tuple(dict.fromkeys(k.partition("[")[0] for k in self.kernels if "[" in k))

    def select(self, name: str) -> tuple:
        """The kernels `name` picks: all of them for "all" or the family's
        name, else the kernel of that name or every variant of it."""
        if name in ("all", self.name):
            return self.kernels
        return tuple(k for k in self.kernels if name in (k, k.partition("[")[0]))


FAMILIES = {
    "activations": Family("activations", tuple(k.name for k in ACTIVATION_KERNELS),
                          ("forward", "backward"),
                          {"cpu": activation_cases, "cuda": activation_cases},
                          describe_activations),
    "batchnorm": Family("batchnorm", BATCH_NORM_KERNELS, ("forward", "backward"),
                        {"cpu": batch_norm_cases, "cuda": batch_norm_cases},
                        describe_batch_norm),
    "dropout": Family("dropout", tuple(k.name for k in DROPOUT_KERNELS), ("forward", "backward"),
                      {"cpu": dropout_cases, "cuda": dropout_cases}, describe_dropout),
}


def parse_selection(spec: str) -> dict:
    """--kernels: comma-separated family or kernel names (or the name of a
    kernel's variants, e.g. batch_norm), each optionally ':forward' or
    ':backward'. Returns {family: {(kernel, direction)}}."""
    known = ", ".join(list(FAMILIES) + [k for f in FAMILIES.values()
                                        for k in f.kernels + f.variants])
    selected: dict = {}
    for token in (t.strip() for t in spec.split(",")):
        if not token:
            continue
        name, _, direction = token.partition(":")
        matched = False
        for family in FAMILIES.values():
            kernels = family.select(name)
            if not kernels:
                continue
            if direction and direction not in family.directions:
                raise UsageError(f"--kernels: unknown direction {direction!r} in {token!r}; "
                                 f"use {' or '.join(family.directions)}")
            directions = (direction,) if direction else family.directions
            selected.setdefault(family.name, set()).update(
                (k, d) for k in kernels for d in directions)
            matched = True
        if not matched:
            raise UsageError(f"--kernels: unknown kernel or family {name!r}; known: all, {known}")
    if not selected:
        raise UsageError("--kernels: no kernel named")
    return selected


def parse_peers(spec: str) -> frozenset:
    """--peers: comma-separated peer names, "all" or "none"."""
    names = {t.strip() for t in spec.split(",") if t.strip()}
    if names == {"none"}:
        return frozenset()
    if "all" in names:
        names = (names - {"all"}) | set(PEERS)
    unknown = ", ".join(repr(name) for name in sorted(names - set(PEERS))) or repr(spec)
    if names - set(PEERS) or not names:
        raise UsageError(f"--peers: unknown peer {unknown}; "
                         f"use all, none or some of {', '.join(PEERS)}")
    return frozenset(names)


def _cuda_version(code: int) -> str:
    """A CUDA version as the runtime reports it (13000) in words (13.0)."""
    return f"{code // 1000}.{code % 1000 // 10}"


def no_gpu_reason(build: dict) -> str:
    """Why fusednn's CUDA module finds no GPU, from info()'s cuda_error."""
    error, runtime = build["cuda_error"], _cuda_version(build["cuda_runtime"])
    if error == "cudaErrorInsufficientDriver":
        if not build.get("cuda_driver"):
            why = "no NVIDIA driver is loaded"
        else:
            why = (f"the NVIDIA driver supports CUDA {_cuda_version(build['cuda_driver'])} "
                   "only")
        return (f"{error}: {why}, and this build's CUDA runtime is {runtime}; install or "
                f"update the driver to one for CUDA {runtime} or newer")
    if error == "cudaErrorNoDevice":
        return f"{error}: the NVIDIA driver finds no GPU"
    return f"{error} (CUDA runtime {runtime})"


def check_device(device: str, selection: dict) -> None:
    """Raises BenchError unless every selected family has kernels on device,
    saying what is missing: the CUDA module, a GPU the driver can run (the
    module's own error), or a CuPy that sees it."""
    build = info()
    if device == "cuda" and not build["cuda_built"]:
        raise BenchError("--device cuda: this fusednn was built without CUDA; reinstall with "
                         "nvcc on PATH (FUSEDNN_CUDA=ON pip install . -Ccmake.fresh=true)")
    if device == "cuda" and build.get("cuda_error"):
        raise BenchError(f"--device cuda: fusednn's CUDA module finds no GPU: "
                         f"{no_gpu_reason(build)}")
    if device == "cuda":
        cupy, note = peers.import_cupy()
        if cupy is None and note.startswith("installed"):
            # fusednn's module sees a GPU (above), so this CuPy is the wrong one.
            raise BenchError(f"--device cuda: CuPy is {note}, while fusednn's CUDA module "
                             f"sees {build.get('cuda_devices', 'a')} GPU(s): this CuPy is "
                             f"likely built for another CUDA version ({cupy_install_hint()})")
        if cupy is None:
            raise BenchError(f"--device cuda: needs CuPy, which is {note} "
                             f"({cupy_install_hint()})")
    missing = [f for f in selection if device not in FAMILIES[f].builders]
    if missing:
        raise BenchError(f"--device {device}: no {device.upper()} kernels yet for "
                         f"{', '.join(missing)}; run with --device cpu")


def resolve_dtype(name: str) -> np.dtype:
    """The numpy dtype of --dtype; bfloat16 is ml_dtypes' (imported here,
    where it is asked for)."""
    if name == "bfloat16":
        try:
            import ml_dtypes
        except ImportError:
            raise UsageError("--dtype bfloat16 needs ml_dtypes (pip install ml_dtypes)") from None
        return np.dtype(ml_dtypes.bfloat16)
    return np.dtype(name)


def check_half_device(args: argparse.Namespace) -> None:
    """Every family has float16 and bfloat16 kernels on the CPU; the GPU
    bench runs on CuPy, which has no bfloat16 (a UsageError)."""
    if args.device == "cuda" and args.dtype == "bfloat16":
        raise UsageError("--dtype bfloat16 --device cuda: CuPy, which the GPU bench runs on, "
                         "has no bfloat16; use float16 on the GPU")


def build_cases(plan: Plan, selection: dict) -> list[Case]:
    cases = []
    for family, wanted in selection.items():
        cases += [c for c in FAMILIES[family].builders[plan.device](plan)
                  if (c.name, c.direction) in wanted]
    return cases


def family_texts(plan: Plan, checks: dict) -> dict:
    """{family name: FamilyText}, in the order the cases come."""
    by_family: dict = {}
    for case, result in checks.items():
        by_family.setdefault(case.family, {})[case] = result
    return {name: FAMILIES[name].describe(plan, family_checks)
            for name, family_checks in by_family.items()}


# ---- options ----------------------------------------------------------------------

def _size(text: str) -> int:
    """A positive element count: 4096, 2^25 or 2**25."""
    base, sep, exponent = text.replace("**", "^").partition("^")
    try:
        value = int(base) ** int(exponent) if sep else int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer or 2^k, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {text!r}")
    return value


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def _threads(text: str) -> int:
    value = _positive(text)
    if value > _cpu.max_num_threads:
        raise argparse.ArgumentTypeError(f"must be at most {_cpu.max_num_threads}, got {value}")
    return value


# Arrays of --size elements a CPU case holds at once, at most (inputs,
# outputs, gradients and the peers' outputs): the bound --size is held to.
ARRAYS_PER_CASE = 8


def _check_memory(size: int, dtype: np.dtype) -> None:
    """A UsageError when --size arrays cannot fit in this machine's memory."""
    try:
        physical = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):  # not on this platform
        return
    needed = size * dtype.itemsize * ARRAYS_PER_CASE
    if needed > physical:
        raise UsageError(f"--size {size}: the arrays need about {needed / 2**30:.3g} GiB, more "
                         f"than this machine's {physical / 2**30:.3g} GiB of memory")


def _check_output_path(path: str | None, option: str) -> None:
    """A UsageError when the file cannot be written, found before the run
    instead of after it: the file is opened for appending (which changes
    nothing in an existing file) and removed again if it was new."""
    if path is None:
        return
    existed = os.path.exists(path)
    try:
        with open(path, "a", encoding="utf-8"):
            pass
    except OSError as error:
        raise UsageError(f"{option}: cannot write {path}: {error.strerror}") from None
    if not existed:
        os.remove(path)


def _percent(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not value >= 0:
        raise argparse.ArgumentTypeError(f"must be a percentage >= 0, got {text!r}")
    return value


def add_arguments(parser: argparse.ArgumentParser) -> None:
    names = ", ".join(k.name for k in ACTIVATION_KERNELS)
    parser.add_argument("--kernels", default="all", metavar="LIST",
                        help="comma-separated families or kernels, each optionally :forward or "
                             f":backward (default: all). Families: {', '.join(FAMILIES)}; "
                             f"activations: {names}; batchnorm: "
                             f"{', '.join(BATCH_NORM_KERNELS)} (batch_norm: both); dropout: "
                             f"{', '.join(k.name for k in DROPOUT_KERNELS)}. training (on its "
                             "own, not in all): whole training steps of PyTorch models, stock "
                             "and patched by fusednn.torch: "
                             f"{', '.join(training.TRAINING_KERNELS)}. overhead (on its own): "
                             "the per-call cost of small calls on numpy arrays and torch "
                             "tensors. split (on its own): data-parallel batch norm's split "
                             "phases on one process against the fused kernels")
    batch, channels = BATCH_NORM_SHAPE[:2]
    parser.add_argument("--size", type=_size, metavar="N",
                        help="elements per array (default 2^25, 2^22 with --quick; on --device "
                             "cuda 2^28, 2^26 with --quick). Batch norm "
                             f"takes x of {shape_text(BATCH_NORM_SHAPE)} (NCHW, and its NHWC "
                             f"twin; {shape_text(BATCH_NORM_QUICK_SHAPE)} with --quick); "
                             f"with --size, {batch}x{channels}xHxW with H = W = "
                             f"round(sqrt(N / {batch * channels})), at least 1")
    parser.add_argument("--dtype", choices=("float32", "float64", "float16", "bfloat16"),
                        default="float32",
                        help="float16 and bfloat16 (ml_dtypes arrays, torch bfloat16 peers): "
                             "the activations, dropout and batchnorm families (batch norm "
                             "with float32 gamma, beta and running statistics, as mixed-"
                             "precision training keeps them); bfloat16 on the CPU only (the GPU "
                             "bench runs on CuPy, which has none)")
    parser.add_argument("--threads", type=_threads, metavar="N",
                        help="CPU threads for fusednn and torch (default: fusednn's current "
                             "setting)")
    parser.add_argument("--repeat", type=_positive, metavar="K",
                        help=f"timed repeats per call, median reported (default {DEFAULT_REPEAT}; "
                             f"{QUICK_REPEAT} with --quick)")
    parser.add_argument("--peers", default="all", metavar="LIST",
                        help=f"the peers to time beside fusednn: all (default), none, or some "
                             f"of {', '.join(PEERS)}; a peer that is not installed is skipped "
                             "with a note. torch.compile takes seconds per kernel to compile, "
                             "once, outside the timings")
    parser.add_argument("--json", metavar="FILE", help="also write the results as JSON")
    parser.add_argument("--plot", metavar="FILE",
                        help="also write a PNG: a bar chart of %% of roof, or with --sweep GB/s "
                             "against size (needs matplotlib)")
    parser.add_argument("--compare", metavar="OLD.json",
                        help="print each row's time against an earlier --json file of the same "
                             "machine and options, marking changes beyond the noise of the "
                             "two runs' repeats")
    parser.add_argument("--fail-on-regression", type=_percent, metavar="PCT",
                        help="with --compare: exit with status 1 when a row is slower than the "
                             "old file by more than PCT percent and beyond the noise")
    parser.add_argument("--quick", action="store_true",
                        help="a smaller size and fewer repeats, for a look in seconds")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--sweep", action="store_true",
                        help="instead of the table: speed against size (2^12 to 2^26 float32 "
                             "elements, 1 thread and the default count) of one kernel per "
                             "family beside PyTorch and a copy, batch norm at layer shapes, "
                             "and the pool's own cost; --plot draws GB/s against size")


@dataclass
class Options:
    """The options as run() uses them, after validation."""
    selection: dict
    peers: frozenset
    previous: dict | None     # the --compare document


def validate(args: argparse.Namespace) -> Options:
    """Every check of the options' values that argparse's types cannot make
    alone; raises UsageError before any work starts."""
    check_half_device(args)
    selection = parse_selection(args.kernels)
    wanted = parse_peers(args.peers)
    if args.fail_on_regression is not None and args.compare is None:
        raise UsageError("--fail-on-regression needs --compare OLD.json")
    _check_output_path(args.json, "--json")
    _check_output_path(args.plot, "--plot")
    if args.size is not None and args.device == "cpu":
        _check_memory(args.size, resolve_dtype(args.dtype))
    previous = output.load_previous(args.compare) if args.compare else None
    return Options(selection, wanted, previous)


# ---- the command ------------------------------------------------------------------

def _peer_libraries(device: str, dtype: np.dtype, wanted: frozenset) -> dict:
    """The Plan's peer fields: the libraries of the wanted peers, and notes
    on those that are not timed."""
    unwanted = "not selected (--peers)"
    fields = {"torch": None, "torch_note": unwanted, "jax": None, "jax_note": unwanted,
              "compile_note": unwanted}
    if wanted & {"torch", "torch.compile"}:
        torch, note = peers.import_torch(device)
        fields.update(torch=torch, torch_note=note if "torch" in wanted else unwanted)
        if "torch.compile" in wanted:
            fields["compile_note"] = note if torch is not None else f"needs torch, {note}"
    if "jax.jit" in wanted:
        fields["jax"], fields["jax_note"] = peers.import_jax(device)
    return fields


def run(args: argparse.Namespace) -> int:
    """Runs the benchmark; returns the exit status (1 when a check fails or,
    with --fail-on-regression, a row regressed). Raises UsageError for bad
    option values and BenchError when the benchmark cannot run here."""
    if args.sweep and args.kernels != "all":
        raise UsageError("--sweep measures its own set (one kernel per family, batch norm at "
                         "layer shapes, the pool) and takes no --kernels")
    training_rows = training.selected(args.kernels)
    if training_rows is not None:
        return training.run(args, training_rows)
    if overhead.selected(args.kernels):
        return overhead.run(args)
    if split.selected(args.kernels):
        return split.run(args)
    options = validate(args)
    if args.sweep:
        return sweep.run(args, options.peers)
    check_device(args.device, options.selection)
    if args.plot:
        output.require_matplotlib()
    dtype = resolve_dtype(args.dtype)
    if args.device == "cuda":
        quick_size, default_size = CUDA_QUICK_SIZE, CUDA_DEFAULT_SIZE
    else:
        quick_size, default_size = QUICK_SIZE, DEFAULT_SIZE
    plan = Plan(device=args.device, dtype=dtype,
                size=args.size or (quick_size if args.quick else default_size),
                repeat=args.repeat or (QUICK_REPEAT if args.quick else DEFAULT_REPEAT),
                threads=args.threads or get_num_threads(),
                reference_elements=REFERENCE_ELEMENTS, size_given=args.size is not None,
                quick=args.quick, peers=options.peers,
                **_peer_libraries(args.device, dtype, options.peers))
    cases = build_cases(plan, options.selection)

    progress(f"checking {len(cases)} kernels against fusednn.reference ({dtype.name})")
    checks = {case: case.check() for case in cases}
    failed = [(case, result) for case, result in checks.items() if not result.passed]
    if failed:
        for case, result in failed:
            progress(f"check failed: {case.label} ({dtype.name}): {result.describe()}")
        progress(f"fusednn bench: {len(failed)} of {len(cases)} kernels disagree with "
                 "fusednn.reference; not timing them")
        return 1

    torch, jax = plan.torch, plan.jax
    previous_threads = get_num_threads()
    previous_torch_threads = torch.get_num_threads() if torch is not None else None
    previous_x64 = jax.config.jax_enable_x64 if jax is not None else None
    try:
        set_num_threads(plan.threads)
        if torch is not None:
            torch.set_num_threads(plan.threads)
        if jax is not None:
            # JAX computes in float32 unless told otherwise, process-wide.
            jax.config.update("jax_enable_x64", dtype == np.float64)
        roof = COPY_ROOFS[plan.device](plan, cases)
        timings = []
        for i, case in enumerate(cases, 1):
            progress(f"[{i}/{len(cases)}] timing {case.label}")
            timings.append(time_case(case, plan, roof))
    finally:
        set_num_threads(previous_threads)
        if torch is not None:
            torch.set_num_threads(previous_torch_threads)
        if jax is not None:
            jax.config.update("jax_enable_x64", previous_x64)

    roofs = pool_roofs(timings)
    results = [summarize(t, checks[t.case]) for t in timings]
    head = output.header(plan)
    print(output.report_text(plan, head, checks, family_texts(plan, checks), roofs, results))
    document = output.json_document(head, checks, roofs, results)
    if args.json:
        output.write_json(args.json, document)
        progress(f"wrote {args.json}")
    if args.plot:
        output.write_plot(args.plot, plan, head, results)
        progress(f"wrote {args.plot}")
    if options.previous is not None:
        changes, differs = output.compare_runs(options.previous, document)
        print()
        print(output.comparison_text(args.compare, options.previous, document, changes,
                                     differs, args.fail_on_regression))
        if args.fail_on_regression is not None:
            failure = output.regression_message(changes, args.fail_on_regression)
            if failure:
                progress(f"fusednn bench: {failure}")
                return 1
    return 0
