"""What the bench writes: the report and its table on stdout (progress on
stderr), the JSON document, the PNG plot, and the comparison with an
earlier run's JSON (``--compare``), whose per-row noise comes from the
spread of each run's repeats.
"""
from __future__ import annotations

import dataclasses
import datetime
import json
import os
import platform
import statistics
import sys
import textwrap

import numpy as np

from .._backend import info
from .cases import PEERS, BenchError, Plan, UsageError
from .timing import COPY_ROOFS, WARMUP, last_level_cache

# The header fields that make two runs comparable; --compare names those
# that differ.
COMPARABLE = ("machine", "device", "dtype", "size", "threads", "simd")
# The report's text (all but the table's rows) is wrapped to this width.
REPORT_COLUMNS = 100
# Rows above this % of their roof get a footnote on why.
ROOF_NOTE_PERCENT = 110


def progress(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def gpu_model() -> str:
    import cupy
    device = cupy.cuda.Device()
    name = cupy.cuda.runtime.getDeviceProperties(device.id)["name"]
    name = name.decode() if isinstance(name, bytes) else name
    return f"GPU {device.id}: {name}, compute capability {device.compute_capability}"


def peer_notes(plan: Plan) -> dict:
    """{peer label: its version and settings, or why it is skipped}."""
    return {"torch": plan.torch_note, "torch.compile": plan.compile_note, "jax.jit": plan.jax_note}


def header(plan: Plan) -> dict:
    build = info()
    return {
        "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "machine": f"{cpu_model()}, {os.cpu_count()} logical CPUs, {platform.system()} "
                   f"{platform.release()}"
                   + (f"; {gpu_model()}" if plan.device == "cuda" else ""),
        "device": plan.device,
        "threads": plan.threads,
        "simd": build["simd"],
        "fusednn_version": build["version"],
        "numpy_version": np.__version__,
        "torch_version": plan.torch.__version__ if plan.torch is not None else None,
        "jax_version": plan.jax.__version__ if plan.jax is not None else None,
        "peers": peer_notes(plan),
        "dtype": plan.dtype.name,
        "size": plan.size,
        "repeat": plan.repeat,
        "warmup": WARMUP,
        "reference_elements": min(plan.size, plan.reference_elements),
    }


def _per_family(texts: dict, piece: str) -> str:
    """One piece of every family's text: as it is for one family, else each
    after its family's name."""
    if len(texts) == 1:
        return getattr(next(iter(texts.values())), piece)
    return "; ".join(f"{name}: {getattr(text, piece)}" for name, text in texts.items())


def _compile_text(results: list, label: str) -> str:
    seconds = [r.peers[label].compile_seconds for r in results if label in r.peers]
    return f"{label} {sum(seconds):.1f} s for {len(seconds)} functions" if seconds else ""


def _peer_lines(plan: Plan, texts: dict, results: list) -> list:
    notes = peer_notes(plan)
    lines = []
    if plan.torch is None or "torch" not in plan.peers:
        lines.append(f"x torch: skipped ({notes['torch']})")
    else:
        where = ("on the GPU, same stream" if plan.device == "cuda"
                 else f"torch threads {plan.threads}")
        lines.append(f"x torch: {_per_family(texts, 'torch')}; {where}")
    if plan.torch is None or "torch.compile" not in plan.peers:
        lines.append(f"x torch.compile: skipped ({notes['torch.compile']})")
    else:
        lines.append("x torch.compile: the same PyTorch functions through torch.compile "
                     "(inductor, fullgraph, static shapes), storing into the preallocated "
                     "outputs where torch writes them or fusednn does")
    if plan.jax is None:
        lines.append(f"x jax.jit: skipped ({notes['jax.jit']})")
    else:
        lines.append(f"x jax.jit: jax {notes['jax.jit']}: {_per_family(texts, 'jax')}; "
                     "inputs on JAX's device ahead of the rounds, results allocated, on "
                     "XLA's own threads (--threads does not reach them)")
    compiled = [text for text in (_compile_text(results, label)
                                  for label in ("torch.compile", "jax.jit")) if text]
    if compiled:
        lines.append("compile time, once per function and excluded from the timings: "
                     + ", ".join(compiled))
    return lines


def _peer_cell(result, label: str, allocating: bool, flagged: bool) -> str:
    peer = result.peers.get(label)
    cell = "-" if peer is None else f"{peer.x:.2f}"
    # Marker slots, so that the numbers stay aligned.
    if allocating:
        cell += "*" if peer is not None and peer.allocates else " "
    if flagged:
        cell += (peer.marker if peer is not None else "") or " "
    return cell


def _footnotes(results: list) -> list:
    lines = []
    for label in PEERS:
        cells = [r for r in results if label in r.peers]
        allocating = {r.peers[label].op: r.peers[label].allocates_why
                      for r in cells if r.peers[label].allocates}
        if not allocating:
            continue
        if all(r.peers[label].allocates for r in cells) and len(set(allocating.values())) == 1:
            what = f"every row ({next(iter(allocating.values()))})"
        else:
            ops_by_why: dict = {}
            for op, why in sorted(allocating.items()):
                ops_by_why.setdefault(why, []).append(op)
            what = "; ".join(f"{', '.join(ops)} ({why})" for why, ops in ops_by_why.items())
        lines.append(f"* {label} allocates its result: {what}")
    for r in results:
        for label, peer in r.peers.items():
            if peer.marker == "!":
                lines.append(f"! {label} {r.kernel} {r.direction} is off on ordinary inputs "
                             f"({peer.check_ordinary_error:.3g} {peer.check_unit}, allowed "
                             f"{peer.check_tolerance:g}); the largest error: {peer.check_worst}")
    special = [f"{label} {r.kernel} {r.direction}" for r in results
               for label, peer in r.peers.items() if peer.marker == "~"]
    if special:
        lines.append("~ within fusednn's bound on ordinary inputs but off on special ones "
                     "(+-0, subnormals, +-inf, NaN, huge magnitudes; batch norm's channels at "
                     "mean/std 1e4, constant, with a NaN), the largest error of each in the "
                     "JSON: " + ", ".join(special))
    for r in results:
        for label, why in r.peer_errors.items():
            lines.append(f"- {label} {r.kernel} {r.direction}: {why}")
    return lines


def wrapped(lines: list, width: int = REPORT_COLUMNS) -> list:
    """Each line cut at spaces to width columns, its continuations indented
    two more columns than it (words longer than a line are kept whole)."""
    out = []
    for line in lines:
        indent = line[:len(line) - len(line.lstrip())]
        out += textwrap.wrap(line, width, subsequent_indent=indent + "  ",
                             break_long_words=False, break_on_hyphens=False) or [line]
    return out


def _mib(n: float) -> str:
    return f"{n / (1 << 20):.0f} MiB" if n >= 1 << 20 else f"{n / (1 << 10):.0f} KiB"


def cache_line(results: list) -> str | None:
    """Where the CPU rows' bytes live: whether each row's arrays (and its
    roof's copy, as large) fit in the last-level cache, and so whether the
    roof is an in-cache copy rate or memory's."""
    cache = last_level_cache()
    if cache is None or not results:
        return None
    level, size = cache
    moved = sorted({r.bytes_moved for r in results})
    span = _mib(moved[0]) if len(moved) == 1 else f"{_mib(moved[0])} to {_mib(moved[-1])}"
    if moved[-1] <= size:
        where = ("so kernel and copy alike may find their inputs in it from the round "
                 "before: at this size the roof is the rate of an in-cache copy")
    elif moved[0] > size:
        where = "so kernel and copy alike stream from memory: the roof is memory's copy rate"
    else:
        where = ("so the smaller rows may find their inputs in it and the larger ones "
                 "stream from memory, kernel and copy alike")
    return (f"cache: each row moves {span} (its roof copies as much); the L{level} cache "
            f"holds {_mib(size)}, {where}")


def _over_roof_lines(texts: dict, results: list) -> list:
    lines = []
    for family, text in texts.items():
        over = [f"{r.kernel} {r.direction}" for r in results
                if r.family == family and r.percent_of_roof > ROOF_NOTE_PERCENT]
        if over:
            lines.append(f"^ above {ROOF_NOTE_PERCENT}% of the roof ({', '.join(over)}): "
                         f"{text.over_roof}")
    return lines


def report_text(plan: Plan, head: dict, checks: dict, texts: dict, roofs: dict,
                results: list) -> str:
    lines = [
        f"fusednn bench  {head['date']}",
        f"machine: {head['machine']}",
        f"fusednn {head['fusednn_version']}, simd {head['simd']}, device {plan.device}, "
        f"threads {plan.threads}; numpy {head['numpy_version']}; torch {plan.torch_note}; "
        f"jax {plan.jax_note}",
        f"{_per_family(texts, 'arrays')}; median of {plan.repeat} "
        f"repeat{'s' if plan.repeat > 1 else ''} after {WARMUP} warm-up, peers interleaved",
    ]
    if len(texts) == 1:
        text = next(iter(texts.values()))
        lines.append(f"check: all {len(checks)} agree with fusednn.reference {text.check}")
        lines += [f"  {note}" for note in text.check_notes]
    else:
        lines.append(f"check: all {len(checks)} agree with fusednn.reference:")
        for name, text in texts.items():
            lines.append(f"  {name}: {text.check}")
            lines += [f"    {note}" for note in text.check_notes]
    lines.append("bytes/elem: memory traffic per element, e.g. 2r+1w = 2 arrays read and 1 "
                 "written; GB/s = 1e9 bytes/s")
    lines.append("roof: a plain copy of the same bytes, timed in the same rounds as each "
                 f"kernel, by {COPY_ROOFS[plan.device].description}"
                 + (" (CUDA events)" if plan.device == "cuda" else "")
                 + "; a row's % roof is against the faster routine's median over that row's "
                 "own rounds, so that load changing between rows cancels; medians over the "
                 "whole run:")
    if plan.device == "cpu" and (cache := cache_line(results)):
        lines.insert(-1, cache)
    for roof in roofs.values():
        both = ", ".join(f"{name} {rate:.1f}" for name, rate in roof.gb_per_s.items())
        lines.append(f"  {roof.bytes_per_element:g} bytes/elem x {roof.elements} elements: "
                     f"{roof.best:.1f} GB/s by {roof.source} ({both} GB/s; "
                     f"{roof.samples} copies)")
    lines.append(f"x numpy-ref: fusednn.reference (float64) {_per_family(texts, 'reference')}")
    lines += _peer_lines(plan, texts, results)
    lines.append("x <peer>: the peer's time over fusednn's (> 1: fusednn is faster); each "
                 "peer's output is checked against fusednn.reference by the kernel's bounds: "
                 "! off on ordinary inputs, ~ off on special ones only")
    lines = wrapped(lines)
    lines.append("")
    columns = ("kernel", "direction", "bytes/elem", "time (ms)", "GB/s", "% roof",
               "x numpy-ref", *(f"x {label}" for label in PEERS))
    markers = {label: ([r.peers[label].allocates for r in results if label in r.peers],
                       [r.peers[label].marker for r in results if label in r.peers])
               for label in PEERS}
    over_roof = any(r.percent_of_roof > ROOF_NOTE_PERCENT for r in results)
    rows = []
    for r in results:
        percent = f"{r.percent_of_roof:.0f}%"
        if over_roof:  # a marker slot, so that the numbers stay aligned
            percent += "^" if r.percent_of_roof > ROOF_NOTE_PERCENT else " "
        rows.append((r.kernel, r.direction,
                     f"{r.bytes_per_element:g} ({r.traffic})",
                     f"{r.time_ms:.3f}", f"{r.gb_per_s:.1f}", percent,
                     f"{r.x_numpy_reference:.1f}",
                     *(_peer_cell(r, label, any(markers[label][0]), any(markers[label][1]))
                       for label in PEERS)))
    widths = [max(len(c), *(len(row[i]) for row in rows)) for i, c in enumerate(columns)]
    left = 2  # kernel and direction are left-aligned, numbers right-aligned
    for row in (columns, *rows):
        lines.append("  ".join(cell.ljust(w) if i < left else cell.rjust(w)
                               for i, (cell, w) in enumerate(zip(row, widths))).rstrip())
    lines += wrapped(_over_roof_lines(texts, results) + _footnotes(results))
    return "\n".join(lines)


def json_document(head: dict, checks: dict, roofs: dict, results: list) -> dict:
    rows = []
    for r in results:
        row = dataclasses.asdict(r)
        # The eager PyTorch cell under its earlier names, for readers of
        # files written before the other peers came.
        torch = r.peers.get("torch")
        row.update(torch_op=torch and torch.op, torch_allocates=bool(torch and torch.allocates),
                   torch_allocates_why=torch and torch.allocates_why,
                   torch_ms=torch and torch.ms, x_torch=torch and torch.x)
        rows.append(row)
    return {
        "header": head,
        "roofs": [{"bytes_per_element": r.bytes_per_element, "elements": r.elements,
                   "copies": r.samples, "gb_per_s": r.gb_per_s, "source": r.source}
                  for r in roofs.values()],
        "checks": [{"family": c.family, "kernel": c.name, "direction": c.direction,
                    "error": result.error, "tolerance": result.tolerance, "unit": result.unit,
                    "inputs": result.inputs, "passed": result.passed}
                   for c, result in checks.items()],
        "results": rows,
    }


def write_json(path: str, document: dict) -> None:
    with open(path, "w", encoding="utf-8") as f:
        json.dump(document, f, indent=2)
        f.write("\n")


def require_matplotlib():
    try:
        from matplotlib.figure import Figure
    except ImportError:
        raise BenchError("--plot needs matplotlib, which is not installed "
                         "(pip install matplotlib, or pip install fusednn[bench])") from None
    return Figure


def write_plot(path: str, plan: Plan, head: dict, results: list) -> None:
    """A horizontal bar chart of % of the copy roof, one bar per case."""
    figure_class = require_matplotlib()
    figure = figure_class(figsize=(8, 1.6 + 0.25 * len(results)))
    axes = figure.add_subplot()
    for direction, color in (("forward", "tab:blue"), ("backward", "tab:orange")):
        rows = [i for i, r in enumerate(results) if r.direction == direction]
        if rows:
            axes.barh(rows, [results[i].percent_of_roof for i in rows], color=color,
                      label=direction)
    axes.set_yticks(range(len(results)), [f"{r.kernel} {r.direction}" for r in results],
                    fontsize=8)
    axes.invert_yaxis()
    axes.axvline(100, color="black", linewidth=0.8)
    axes.legend(loc="lower right", fontsize=8)
    axes.set_xlabel("% of a plain copy of the same bytes (measured in the same run)")
    axes.set_title(f"fusednn {head['fusednn_version']} {plan.dtype.name}, "
                   f"{plan.threads} threads\n{head['machine']}", fontsize=9)
    figure.tight_layout()
    figure.savefig(path, dpi=120)


# ---- --compare ------------------------------------------------------------------

def load_previous(path: str) -> dict:
    """An earlier --json file; UsageError when it cannot be read as one."""
    try:
        with open(path, encoding="utf-8") as f:
            document = json.load(f)
    except (OSError, ValueError) as error:
        raise UsageError(f"--compare: cannot read {path}: {error}") from None
    if (not isinstance(document, dict) or not isinstance(document.get("results"), list)
            or not isinstance(document.get("header"), dict)):
        raise UsageError(f"--compare: {path} is not a JSON file of fusednn bench --json")
    return document


def spread(samples) -> float | None:
    """The interquartile range of a row's repeats over their median, or
    None with fewer than 3 repeats."""
    if samples is None or len(samples) < 3:
        return None
    q1, _, q3 = statistics.quantiles(samples, n=4, method="inclusive")
    return (q3 - q1) / statistics.median(samples)


@dataclasses.dataclass
class RowChange:
    """One row of the comparison: then (the old file) and now."""
    kernel: str
    direction: str
    then_ms: float | None     # None: the old file has no such row, or of another size
    now_ms: float
    noise: float | None       # relative; None where neither run measured it
    note: str = ""

    @property
    def ratio(self) -> float | None:
        return None if self.then_ms is None else self.now_ms / self.then_ms

    @property
    def change(self) -> str:
        """"slower" or "faster" beyond the noise, else ""."""
        if self.ratio is None:
            return ""
        allowed = 1.0 + (self.noise or 0.0)
        if self.ratio > allowed:
            return "slower"
        return "faster" if self.ratio < 1.0 / allowed else ""

    def regressed(self, percent: float) -> bool:
        """Slower beyond the noise and by more than percent."""
        return self.change == "slower" and self.ratio > 1.0 + percent / 100.0


def compare_runs(old: dict, new: dict) -> tuple[list, list]:
    """([RowChange] for every row of new, [header fields that differ]).
    A row's noise is the larger spread() of its repeats in the two runs."""
    then = {(r["kernel"], r["direction"]): r for r in old["results"]}
    changes = []
    for r in new["results"]:
        before = then.get((r["kernel"], r["direction"]))
        spreads = [s for s in (spread(r.get("time_ms_samples")),
                               spread(before and before.get("time_ms_samples")))
                   if s is not None]
        noise = max(spreads) if spreads else None
        if before is None:
            changes.append(RowChange(r["kernel"], r["direction"], None, r["time_ms"], noise,
                                     "not in the old file"))
        elif before.get("elements") != r["elements"]:
            changes.append(RowChange(r["kernel"], r["direction"], None, r["time_ms"], noise,
                                     f"{before.get('elements')} elements then, not compared"))
        else:
            changes.append(RowChange(r["kernel"], r["direction"], before["time_ms"],
                                     r["time_ms"], noise))
    differs = [key for key in COMPARABLE if old["header"].get(key) != new["header"].get(key)]
    return changes, differs


def comparison_text(path: str, old: dict, new: dict, changes: list, differs: list,
                    percent: float | None) -> str:
    head = old["header"]
    lines = [f"compared with {path} ({head.get('date', 'undated')}): now/then is this run's "
             "time over that one's; noise is the larger interquartile spread of the two "
             "runs' repeats, relative to their median"]
    for key in differs:
        lines.append(f"  differs: {key} {new['header'].get(key)!r} now, "
                     f"{head.get(key)!r} then; the ratios mix in that change")
    columns = ("kernel", "direction", "then (ms)", "now (ms)", "now/then", "noise", "change")
    rows = []
    for c in changes:
        rows.append((c.kernel, c.direction,
                     "-" if c.then_ms is None else f"{c.then_ms:.3f}", f"{c.now_ms:.3f}",
                     "-" if c.ratio is None else f"{c.ratio:.3f}",
                     "n/a" if c.noise is None else f"{100 * c.noise:.1f}%",
                     c.note or c.change))
    widths = [max(len(col), *(len(row[i]) for row in rows)) for i, col in enumerate(columns)]
    for row in (columns, *rows):
        lines.append("  ".join(cell.ljust(w) if i in (0, 1, 6) else cell.rjust(w)
                               for i, (cell, w) in enumerate(zip(row, widths))).rstrip())
    slower = [c for c in changes if c.change == "slower"]
    faster = [c for c in changes if c.change == "faster"]
    lines.append(f"{len(slower)} slower and {len(faster)} faster beyond the noise, of "
                 f"{sum(c.ratio is not None for c in changes)} compared"
                 + ("" if percent is None else
                    f"; --fail-on-regression {percent:g}: "
                    f"{sum(c.regressed(percent) for c in changes)} slower by more than "
                    f"{percent:g}%"))
    return "\n".join(lines)


def regression_message(changes: list, percent: float) -> str | None:
    """What fails the run under --fail-on-regression, or None."""
    regressed = [c for c in changes if c.regressed(percent)]
    if not regressed:
        return None
    return (f"{len(regressed)} row{'s' if len(regressed) > 1 else ''} slower than the old file "
            f"by more than {percent:g}% and the noise: "
            + ", ".join(f"{c.kernel} {c.direction} ({c.ratio:.2f}x)" for c in regressed))
