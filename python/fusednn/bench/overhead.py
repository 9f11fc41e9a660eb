"""``python -m fusednn bench --kernels overhead``: what a small call costs
beyond its kernel, per array library.

Each public function is called on 16-element arrays (batch norm on a
(4, 3, 2, 2) input), where the kernels take a few hundred nanoseconds and
the rest is the Python layer: finding the arrays' library and device,
validation, allocation and wrapping results back. The same calls run on
numpy arrays and on torch CPU tensors (when torch is installed), so the
table shows the price of each library's path; one thread, so that no
thread pool wakes.
"""
from __future__ import annotations

import argparse
import json
import timeit

import numpy as np

import fusednn as fn

from .cases import UsageError, names_alone
from .output import progress
from .peers import import_torch

OVERHEAD_KERNEL = "overhead"
ELEMENTS = 16
BATCH_NORM_SHAPE = (4, 3, 2, 2)
CALLS_PER_REPEAT = 2000
QUICK_CALLS_PER_REPEAT = 300


def selected(spec: str) -> bool:
    """Whether --kernels names this table, which runs on its own."""
    return names_alone(spec, OVERHEAD_KERNEL)


def calls(make) -> dict:
    """The timed calls, {label: zero-argument function}, on arrays that
    `make` turns from numpy into the library's."""
    rng = np.random.default_rng(0)
    x = make(rng.standard_normal(ELEMENTS).astype(np.float32))
    y = make(np.empty(ELEMENTS, np.float32))
    g = make(rng.standard_normal(ELEMENTS).astype(np.float32))
    bias = make(rng.standard_normal(ELEMENTS).astype(np.float32))
    x4 = make(rng.standard_normal(BATCH_NORM_SHAPE).astype(np.float32))
    g4 = make(rng.standard_normal(BATCH_NORM_SHAPE).astype(np.float32))
    channels = BATCH_NORM_SHAPE[1]
    gamma, beta = make(np.ones(channels, np.float32)), make(np.zeros(channels, np.float32))
    running_mean = make(np.zeros(channels, np.float32))
    running_var = make(np.ones(channels, np.float32))
    _, mask = fn.dropout(x, 0.5, seed=1, return_mask=True)
    saved = fn.batch_norm(x4, gamma, beta)
    return {
        "gelu(x, out=y)": lambda: fn.gelu(x, out=y),
        "relu(x)": lambda: fn.relu(x),
        "activation_backward('relu', g, y=x)": lambda: fn.activation_backward("relu", g, y=x),
        "dropout(x, 0.5, seed=1)": lambda: fn.dropout(x, 0.5, seed=1),
        "dropout_backward(g, 0.5, mask=mask)": lambda: fn.dropout_backward(g, 0.5, mask=mask),
        "bias_act_dropout(x, bias, 'relu', 0.5)": lambda: fn.bias_act_dropout(x, bias, "relu",
                                                                              0.5, seed=1),
        "batch_norm training": lambda: fn.batch_norm(x4, gamma, beta, running_mean,
                                                     running_var),
        "batch_norm inference": lambda: fn.batch_norm(x4, gamma, beta, running_mean, running_var,
                                                      training=False),
        "batch_norm_backward": lambda: fn.batch_norm_backward(g4, x4, gamma, saved.save_mean,
                                                              saved.save_invstd),
    }


def per_call_microseconds(call, number: int, repeat: int) -> float:
    """The median over `repeat` runs of `number` back-to-back calls."""
    call()
    runs = timeit.repeat(call, number=number, repeat=repeat)
    return float(np.median(runs)) / number * 1e6


def run(args: argparse.Namespace) -> int:
    if args.device != "cpu":
        raise UsageError("--kernels overhead: measured on the CPU (a GPU call adds its launch "
                         "and stream lookups; time those with the GPU's own profiler)")
    number = QUICK_CALLS_PER_REPEAT if args.quick else CALLS_PER_REPEAT
    repeat = args.repeat or (5 if args.quick else 7)
    libraries = {"numpy": lambda a: a}
    torch, note = import_torch("cpu")
    if torch is not None:
        libraries["torch"] = torch.from_numpy
    threads = fn.get_num_threads()
    fn.set_num_threads(1)
    try:
        table: dict = {}
        for library, make in libraries.items():
            progress(f"timing {library} calls")
            for label, call in calls(make).items():
                table.setdefault(label, {})[library] = per_call_microseconds(call, number,
                                                                             repeat)
    finally:
        fn.set_num_threads(threads)
    header = (f"fusednn {fn.info()['version']}: per-call cost of small calls "
              f"({ELEMENTS} elements; batch norm {BATCH_NORM_SHAPE}), one thread, "
              f"median of {repeat} x {number} calls, microseconds")
    lines = [header, ""]
    columns = list(libraries)
    lines.append(f"{'call':42s}" + "".join(f"{c:>10s}" for c in columns)
                 + ("   torch - numpy" if "torch" in columns else ""))
    for label, row in table.items():
        text = f"{label:42s}" + "".join(f"{row[c]:10.2f}" for c in columns)
        if "torch" in columns:
            text += f"   {row['torch'] - row['numpy']:+13.2f}"
        lines.append(text)
    if torch is None:
        lines += ["", f"torch: {note}"]
    print("\n".join(lines))
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump({"header": header, "unit": "us", "calls": table}, f, indent=2)
        progress(f"wrote {args.json}")
    return 0
