"""``python -m fusednn bench --kernels split``: the split phases of
data-parallel batch normalization (fusednn.batchnorm_split) on one process
against the fused one-process kernels, on the same arrays.

A training step's forward is batch_norm_stats, batch_norm_combine (of one
rank), batch_norm_finalize and batch_norm_apply; its backward is
batch_norm_backward_reduce and batch_norm_backward_apply. The fused side
is batch_norm and batch_norm_backward. Both write into preallocated
outputs (out=), and their calls alternate in each round, so that the load
of a busy machine hits them alike; medians over the rounds. The table adds
what one step sends per rank to the other ranks: the forward's all-gather
of 2C + 1 float64 values and the backward's all-reduce of 2C.
"""
from __future__ import annotations

import argparse
import json
import textwrap
import time

import numpy as np

import fusednn as fn

from .cases import UsageError, names_alone
from .output import progress

SPLIT_KERNEL = "split"
# (label, shape, channel axis): real layers' shapes, NC and NCHW and the
# channels-last twin.
SHAPES = [("NC (256, 1024)", (256, 1024), 1), ("NC (8192, 1024)", (8192, 1024), 1),
          ("NCHW (64, 128, 28, 28)", (64, 128, 28, 28), 1),
          ("NHWC (64, 28, 28, 128)", (64, 28, 28, 128), -1)]
QUICK_SHAPES = [("NC (256, 1024)", (256, 1024), 1),
                ("NCHW (64, 64, 16, 16)", (64, 64, 16, 16), 1),
                ("NHWC (64, 16, 16, 64)", (64, 16, 16, 64), -1)]
TARGET_RATIO = 1.3


def selected(spec: str) -> bool:
    """Whether --kernels names this table, which runs on its own."""
    return names_alone(spec, SPLIT_KERNEL)


def steps(shape, axis: int) -> dict:
    """{name: (forward, backward)} zero-argument calls on one set of arrays."""
    rng = np.random.default_rng(0)
    x = rng.standard_normal(shape).astype(np.float32)
    dy = rng.standard_normal(shape).astype(np.float32)
    channels = shape[axis]
    gamma, beta = np.ones(channels, np.float32), np.zeros(channels, np.float32)
    running_mean, running_var = np.zeros(channels, np.float32), np.ones(channels, np.float32)
    y, dx = np.empty_like(x), np.empty_like(x)
    saved = {}

    def fused_forward():
        saved["fused"] = fn.batch_norm(x, gamma, beta, running_mean, running_var, axis=axis,
                                       out=y)

    def fused_backward():
        result = saved["fused"]
        fn.batch_norm_backward(dy, x, gamma, result.save_mean, result.save_invstd, axis=axis,
                               out=dx)

    def split_forward():
        stats = fn.batch_norm_stats(x, axis=axis)
        merged = fn.batch_norm_combine([stats.count], stats.mean[None], stats.m2[None])
        invstd = fn.batch_norm_finalize(merged.mean, merged.var, merged.count,
                                        running_mean=running_mean, running_var=running_var)
        fn.batch_norm_apply(x, merged.mean, invstd, gamma, beta, axis=axis, out=y)
        saved["split"] = (merged, invstd)

    def split_backward():
        merged, invstd = saved["split"]
        sum_dy, sum_dy_xhat = fn.batch_norm_backward_reduce(dy, x, merged.mean, invstd,
                                                            axis=axis)
        fn.batch_norm_backward_apply(dy, x, merged.mean, invstd, gamma, sum_dy, sum_dy_xhat,
                                     merged.count, axis=axis, out=dx)

    return {"fused": (fused_forward, fused_backward), "split": (split_forward, split_backward)}


def seconds(call) -> float:
    start = time.perf_counter()
    call()
    return time.perf_counter() - start


def run(args: argparse.Namespace) -> int:
    if args.device != "cpu":
        raise UsageError("--kernels split: measured on the CPU (the CUDA split phases have not "
                         "been timed on a GPU yet)")
    shapes = QUICK_SHAPES if args.quick else SHAPES
    repeat = args.repeat or (7 if args.quick else 15)
    threads = args.threads or fn.get_num_threads()
    previous = fn.get_num_threads()
    fn.set_num_threads(threads)
    rows = []
    try:
        for label, shape, axis in shapes:
            progress(f"timing {label}")
            calls = steps(shape, axis)
            times = {(name, phase): [] for name in calls for phase in (0, 1)}
            for name, (forward, backward) in calls.items():  # warm-up: pages, pool
                forward()
                backward()
            for _ in range(repeat):
                for name, (forward, backward) in calls.items():
                    times[(name, 0)].append(seconds(forward))
                    times[(name, 1)].append(seconds(backward))
            medians = {key: float(np.median(value)) * 1e3 for key, value in times.items()}
            channels = shape[axis]
            rows.append({"shape": label, "channels": channels, **{
                f"{name}_{'forward' if phase == 0 else 'backward'}_ms": value
                for (name, phase), value in medians.items()},
                "bytes_per_rank": (4 * channels + 1) * 8})
    finally:
        fn.set_num_threads(previous)
    header = (f"fusednn {fn.info()['version']}: split-phase batch norm on one process against "
              f"the fused kernels, float32, {threads} thread(s), median of {repeat} rounds, "
              "milliseconds; target: split / fused <= 1.3 for forward + backward")
    lines = [textwrap.fill(header, 100), "",
             f"{'shape':26s}{'fused fwd':>10s}{'split fwd':>10s}{'fused bwd':>10s}"
             f"{'split bwd':>10s}{'split/fused':>13s}{'sent/rank/step':>16s}"]
    worst = 0.0
    for row in rows:
        fused = row["fused_forward_ms"] + row["fused_backward_ms"]
        split = row["split_forward_ms"] + row["split_backward_ms"]
        ratio = split / fused
        worst = max(worst, ratio)
        row["ratio"] = ratio
        lines.append(f"{row['shape']:26s}{row['fused_forward_ms']:10.3f}"
                     f"{row['split_forward_ms']:10.3f}{row['fused_backward_ms']:10.3f}"
                     f"{row['split_backward_ms']:10.3f}{ratio:12.2f}x"
                     f"{row['bytes_per_rank']:>14d} B")
    lines += ["", textwrap.fill(f"worst split/fused: {worst:.2f}x (target <= {TARGET_RATIO}x); "
                                "sent per rank and step: (2C + 1) float64 gathered + 2C "
                                "float64 all-reduced", 100)]
    print("\n".join(lines))
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump({"header": header, "unit": "ms", "rows": rows}, f, indent=2)
        progress(f"wrote {args.json}")
    return 0
