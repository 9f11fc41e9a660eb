"""Whole training steps in ``python -m fusednn bench --kernels training``:
one step (forward, cross-entropy loss, backward, SGD update) of a PyTorch
model as written (stock), the same model patched with ``fusednn.torch``,
and both through ``torch.compile`` (inductor), timed in interleaved rounds
like the kernels so that the machine's load hits all four alike.

The models are the issue's: an MLP 1024-4096-4096-10 with BatchNorm1d,
GELU and Dropout(0.1) after each hidden layer, batch 512; and a small CNN,
three blocks of bias-free 3x3 convolution, BatchNorm2d and ReLU (32, 64
and 128 channels, the last two with stride 2) then average pooling and a
linear layer, batch 64 at 32x32, in NCHW and in channels_last. ``--quick``
quarters the MLP's widths and the CNN's batch.

Each row is checked before it is timed: the patched model's logits
against the stock model's (same weights, training mode, dropout layers
off), relative to their largest magnitude. The patched model's dropout draws other masks
than torch's, so training losses are compared in the tests (with p = 0),
not here.

A row's times are medians over the rounds; ``x`` is stock over patched
(above 1: the patched step is faster), eager and compiled alike.
Compilation (the first two calls of each compiled model) is outside the
rounds and reported once. Training steps are not part of ``--kernels
all``: they need PyTorch, and the MLP takes seconds per step on a small
CPU.
"""
from __future__ import annotations

import copy
import datetime
import json
import os
import statistics
import time
import warnings
from dataclasses import asdict, dataclass

from .._backend import get_num_threads, set_num_threads
from .cases import BenchError, UsageError
from .output import cpu_model, progress
from .peers import import_torch
from .timing import interleaved_seconds

TRAINING_KERNELS = ("mlp", "cnn[NCHW]", "cnn[NHWC]")
MLP_WIDTHS = (1024, 4096, 4096, 10)
MLP_BATCH = 512
CNN_CHANNELS = (3, 32, 64, 128)
CNN_BATCH = 64
CNN_SIDE = 32
CLASSES = 10
LEARNING_RATE = 0.01
# The patched model's logits against the stock one's, relative to their
# largest magnitude: a few float32 roundings through the model.
CHECK_TOLERANCE = {"float32": 1e-4, "float64": 1e-10}
# Dynamo instantiates torch.autograd.Function when it traces one (the
# patched batch norm's autograd), which torch answers with this warning.
_TORCH_WARNING = ".*should not be instantiated"


def selected(spec: str) -> tuple | None:
    """The training rows --kernels names ("training", or "training:" plus
    row names), None when it names no training rows. A list that mixes
    them with kernels is a UsageError: the two report different things."""
    tokens = [t.strip() for t in spec.split(",") if t.strip()]
    ours = [t for t in tokens if t == "training" or t.startswith("training:")]
    if not ours:
        return None
    if len(ours) != len(tokens):
        raise UsageError("--kernels: training steps are benchmarked on their own; "
                         "name them without kernels (e.g. --kernels training)")
    rows = []
    for token in ours:
        name = token.partition(":")[2]
        picked = TRAINING_KERNELS if not name else tuple(
            k for k in TRAINING_KERNELS if name in (k, k.partition("[")[0]))
        if not picked:
            raise UsageError(f"--kernels: unknown training row {name!r}; "
                             f"known: {', '.join(TRAINING_KERNELS)}")
        rows += [k for k in picked if k not in rows]
    return tuple(rows)


def _mlp(torch, quick: bool):
    widths = [w // 4 if quick and w != CLASSES else w for w in MLP_WIDTHS]
    layers = []
    for n_in, n_out in zip(widths[:-2], widths[1:-1]):
        layers += [torch.nn.Linear(n_in, n_out), torch.nn.BatchNorm1d(n_out), torch.nn.GELU(),
                   torch.nn.Dropout(0.1)]
    layers.append(torch.nn.Linear(widths[-2], widths[-1]))
    batch = MLP_BATCH // 4 if quick else MLP_BATCH
    return torch.nn.Sequential(*layers), (batch, widths[0])


def _cnn(torch, quick: bool):
    layers = []
    for i, (n_in, n_out) in enumerate(zip(CNN_CHANNELS[:-1], CNN_CHANNELS[1:])):
        layers += [torch.nn.Conv2d(n_in, n_out, 3, stride=1 if i == 0 else 2, padding=1,
                                   bias=False),
                   torch.nn.BatchNorm2d(n_out), torch.nn.ReLU()]
    layers += [torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(),
               torch.nn.Linear(CNN_CHANNELS[-1], CLASSES)]
    batch = CNN_BATCH // 4 if quick else CNN_BATCH
    return torch.nn.Sequential(*layers), (batch, CNN_CHANNELS[0], CNN_SIDE, CNN_SIDE)


@dataclass
class TrainingRow:
    model: str
    input_shape: list
    replaced: dict
    check_error: float
    stock_ms: float
    patched_ms: float
    x: float
    compiled_stock_ms: float | None
    compiled_patched_ms: float | None
    x_compiled: float | None
    compile_seconds: dict
    stock_ms_samples: list
    patched_ms_samples: list


class _Step:
    """One training step of a model on fixed data, as a call."""

    def __init__(self, torch, model, x, target):
        self.torch, self.model, self.x, self.target = torch, model, x, target
        self.optimizer = torch.optim.SGD(model.parameters(), lr=LEARNING_RATE)

    def __call__(self):
        loss = self.torch.nn.functional.cross_entropy(self.model(self.x), self.target)
        self.optimizer.zero_grad(set_to_none=False)
        loss.backward()
        self.optimizer.step()
        if self.x.is_cuda:
            self.torch.cuda.synchronize()


def _check(torch, stock, patched, x) -> float:
    """The largest difference of the two models' logits in training mode
    (batch statistics) with their dropout layers off, relative to the
    largest logit."""
    dropouts = [m for model in (stock, patched) for m in model.modules()
                if isinstance(m, torch.nn.Dropout)]
    for m in dropouts:
        m.eval()
    with torch.no_grad():
        expected, got = stock(x), patched(x)
    for m in dropouts:
        m.train()
    return float((got - expected).abs().max() / expected.abs().max())


def _row(torch, name: str, quick: bool, dtype, device: str, repeat: int, compile_too: bool):
    import fusednn.torch as ft

    make = _mlp if name == "mlp" else _cnn
    torch.manual_seed(0)
    stock, shape = make(torch, quick)
    stock = stock.to(device=device, dtype=dtype)
    x = torch.randn(*shape, device=device, dtype=dtype)
    if name == "cnn[NHWC]":
        stock = stock.to(memory_format=torch.channels_last)
        x = x.contiguous(memory_format=torch.channels_last)
    target = torch.randint(0, CLASSES, (shape[0],), device=device)
    result = ft.patch(stock, inplace=False)
    patched = result.model
    error = _check(torch, stock, patched, x)
    tolerance = CHECK_TOLERANCE[str(dtype).removeprefix("torch.")]
    if not error <= tolerance:
        raise BenchError(f"training {name}: the patched model's logits differ from the "
                         f"stock model's by {error:.3g} (relative), more than {tolerance}")
    steps = {"stock": _Step(torch, stock, x, target), "patched": _Step(torch, patched, x, target)}
    compile_seconds = {}
    if compile_too:
        for label, model in (("compiled stock", stock), ("compiled patched", patched)):
            step = _Step(torch, torch.compile(copy.deepcopy(model), fullgraph=True), x, target)
            start = time.perf_counter()
            step()
            step()
            compile_seconds[label] = time.perf_counter() - start
            steps[label] = step
    samples = interleaved_seconds(steps, repeat)
    ms = {label: statistics.median(s) * 1e3 for label, s in samples.items()}
    compiled = compile_too and "compiled stock" in ms
    return TrainingRow(
        model=name, input_shape=list(shape), replaced=result.replaced, check_error=error,
        stock_ms=ms["stock"], patched_ms=ms["patched"], x=ms["stock"] / ms["patched"],
        compiled_stock_ms=ms.get("compiled stock"),
        compiled_patched_ms=ms.get("compiled patched"),
        x_compiled=ms["compiled stock"] / ms["compiled patched"] if compiled else None,
        compile_seconds=compile_seconds,
        stock_ms_samples=[s * 1e3 for s in samples["stock"]],
        patched_ms_samples=[s * 1e3 for s in samples["patched"]])


def _cell(value: float | None, digits: str = ".1f") -> str:
    return "-" if value is None else format(value, digits)


def report_text(head: dict, rows: list) -> str:
    lines = [
        f"fusednn bench: training steps, {head['date']}",
        f"machine: {head['machine']} (load average {head['load_average'][0]:.1f} at the "
        f"start); device {head['device']}; {head['threads']} threads (fusednn and torch); "
        f"torch {head['torch_version']}; {head['dtype']}",
        "one step = forward + cross-entropy + backward + SGD update; medians of "
        f"{head['repeat']} interleaved rounds; x = stock / patched (> 1: patched is faster)",
        "",
        "| model | input | stock ms | patched ms | x | compiled stock ms | compiled patched ms "
        "| x compiled |",
        "|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        shape = "x".join(map(str, r.input_shape))
        lines.append(f"| {r.model} | {shape} | {r.stock_ms:.1f} | {r.patched_ms:.1f} | "
                     f"{r.x:.2f} | {_cell(r.compiled_stock_ms)} | "
                     f"{_cell(r.compiled_patched_ms)} | {_cell(r.x_compiled, '.2f')} |")
    lines.append("")
    for r in rows:
        replaced = ", ".join(f"{n} {k}" for k, n in r.replaced.items())
        compiling = ", ".join(f"{k} {s:.0f} s" for k, s in r.compile_seconds.items())
        lines.append(f"{r.model}: patched {replaced}; logits (training mode, no dropout) "
                     f"within {r.check_error:.1e} (relative) of stock" + (f"; compile (first two steps): {compiling}"
                                               if compiling else ""))
    if not head["compiled"]:
        lines.append(f"torch.compile: not timed ({head['compile_note']})")
    return "\n".join(lines)


def run(args, rows: tuple) -> int:
    """Times the training rows named by --kernels; prints the table and
    writes --json when asked."""
    if args.plot or args.compare:
        raise UsageError("--plot and --compare apply to kernels, not to --kernels training")
    torch, note = import_torch(args.device)
    if torch is None:
        raise BenchError(f"--kernels training needs PyTorch, which is {note} "
                         "(pip install torch==2.13.0)")
    peers = {t.strip() for t in args.peers.split(",")}
    compile_too = bool(peers & {"all", "torch.compile"})
    threads = args.threads or get_num_threads()
    repeat = args.repeat or (3 if args.quick else 5)
    dtype = getattr(torch, args.dtype)
    previous = get_num_threads(), torch.get_num_threads()
    # Other work on a shared machine slows every column alike (the rounds
    # interleave them); the load says how much of the machine there was.
    load = os.getloadavg()
    results = []
    try:
        set_num_threads(threads)
        torch.set_num_threads(threads)
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", _TORCH_WARNING, DeprecationWarning)
            for i, name in enumerate(rows, 1):
                progress(f"[{i}/{len(rows)}] training step {name}")
                results.append(_row(torch, name, args.quick, dtype, args.device, repeat,
                                    compile_too))
    finally:
        set_num_threads(previous[0])
        torch.set_num_threads(previous[1])
    head = {"date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
            "machine": f"{cpu_model()}, {os.cpu_count()} logical CPUs",
            "load_average": list(load), "device": args.device, "threads": threads,
            "torch_version": torch.__version__, "dtype": args.dtype, "repeat": repeat,
            "quick": bool(args.quick), "compiled": compile_too,
            "compile_note": None if compile_too else "not selected with --peers"}
    print(report_text(head, results))
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump({"header": head, "training": [asdict(r) for r in results]}, f, indent=2)
            f.write("\n")
        progress(f"wrote {args.json}")
    return 0
