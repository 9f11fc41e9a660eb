"""The ``fusednn`` command (also ``python -m fusednn``).

    fusednn info [--json]     build configuration: version, CUDA, SIMD path, threads
    fusednn bench [options]   check every kernel against fusednn.reference, then
                              time it against a memory copy, the reference and its
                              peers (PyTorch, torch.compile, jax.jit); --compare an
                              earlier run
    fusednn demo [options]    the lecture's experiments (initialization, batch norm,
                              dropout, pruning) with fusednn.nn on scikit-learn's digits

``main(argv)`` returns the exit status: 0, 1 when the benchmark or the demo
cannot run, a kernel fails its check or (bench --fail-on-regression) a row
is slower than the compared run, 2 for a usage error.
"""
from __future__ import annotations

import argparse
import json
import sys

from . import bench, demo
from ._backend import info


def _format_value(value) -> str:
    if isinstance(value, (list, tuple)):
        return ", ".join(str(v) for v in value) if value else "(none)"
    return str(value)


def _info(args: argparse.Namespace) -> int:
    build = info()
    if args.json:
        print(json.dumps(build, indent=2))
    else:
        for key, value in build.items():
            print(f"{key}: {_format_value(value)}")
    return 0


def _bench(args: argparse.Namespace) -> int:
    try:
        return bench.run(args)
    except bench.UsageError as error:
        args.parser.error(str(error))
    except bench.BenchError as error:
        print(f"fusednn bench: {error}", file=sys.stderr)
        return 1


def _demo(args: argparse.Namespace) -> int:
    try:
        return demo.run(args)
    except demo.DemoError as error:
        print(f"fusednn demo: {error}", file=sys.stderr)
        return 1


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fusednn",
        description="Fused training kernels: build information, benchmarks and a demo.")
    parser.add_argument("--version", action="version", version=f"fusednn {info()['version']}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")

    info_parser = commands.add_parser(
        "info", help="print the build configuration",
        description="Prints fusednn.info(): version, CUDA build and architectures, SIMD path, "
                    "threads; one key per line.")
    info_parser.add_argument("--json", action="store_true", help="print it as JSON")
    info_parser.set_defaults(handler=_info)

    bench_parser = commands.add_parser(
        "bench", help="check and time the kernels",
        description="Checks every selected kernel against fusednn.reference on special and "
                    "random inputs (exit status 1 if one fails), then times it: bytes moved, "
                    "GB/s, % of a plain copy of the same bytes, and speed-up over the numpy "
                    "reference and the peers PyTorch, torch.compile and jax.jit (each when "
                    "installed, each checked against the reference too). --compare prints "
                    "the change from an earlier --json run. Table on stdout, progress on "
                    "stderr.")
    bench.add_arguments(bench_parser)
    bench_parser.set_defaults(handler=_bench, parser=bench_parser)

    demo_parser = commands.add_parser(
        "demo", help="run the lecture's experiments on handwritten digits",
        description="Trains small networks built with fusednn.nn on scikit-learn's digits: "
                    "pre-activation variance by layer for three initializations, vanishing "
                    "gradients and dead ReLU units, learning curves with and without batch "
                    "norm and dropout, the train/test gap, and accuracy against pruned "
                    "fraction. Tables on stdout, progress on stderr, PNG plots in --out. "
                    "Needs scikit-learn (and matplotlib for plots): "
                    "pip install 'fusednn[demo]'.")
    demo.add_arguments(demo_parser)
    demo_parser.set_defaults(handler=_demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 0
    return args.handler(args)


if __name__ == "__main__":
    sys.exit(main())
