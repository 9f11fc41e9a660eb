"""What memory traffic and the mask draw alone cost, next to the kernels.

Two speed targets sit near what this kind of machine allows, and this script
measures the floors side by side with the kernels, in one run:

- Channels-last batch-norm training forward (32x56x56x128 float32): the
  statistics need every row before any output, so x is read once for them
  and once more with the write of y. Its floor is the fastest full read of
  x plus a copy of x; PyTorch's time divided by that floor is the most any
  implementation with this traffic can gain over PyTorch.
- Dropout of 2^24 float32: `fn.dropout_mask` draws the Philox mask without
  touching data. With the draw alone taking about as long as a copy, the
  dropout's share of the copy roof rests on how much of the memory traffic
  hides under the draw.

Every timed call starts with the caches cleared of its operands (a 128 MiB
copy in between), after one untimed round; medians over the rounds. PyTorch
rows appear when torch is installed. Run from anywhere: `python3
scripts/memory_bounds.py [--rounds N]`.
"""
import argparse
import os
import threading
import time

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch starts its threads

import numpy as np

import fusednn as fn
from fusednn import _cpu

try:
    import torch
except ImportError:
    torch = None


def split_read(reduce, x, parts):
    """reduce over `parts` slices of x, one thread each (numpy drops the GIL)."""
    bounds = [x.size * i // parts for i in range(parts + 1)]
    workers = [threading.Thread(target=reduce, args=(x[lo:hi],))
               for lo, hi in zip(bounds[1:-1], bounds[2:])]
    for worker in workers:
        worker.start()
    reduce(x[:bounds[1]])
    for worker in workers:
        worker.join()


def read_candidates(x):
    """Full reads of x by routines that do little per element, on as many
    threads as the kernels use where the routine lets us choose."""
    flat = x.reshape(-1)
    words = flat.view(np.uint64)
    threads = fn.get_num_threads()
    found = {
        "np.dot(x, x)": lambda: np.dot(flat, flat),
        f"np.bitwise_or.reduce, {threads} threads":
            lambda: split_read(np.bitwise_or.reduce, words, threads),
    }
    if torch is not None:
        flat_t = torch.from_numpy(flat)
        found["torch.sum"] = lambda: flat_t.sum()
    return found


def measure(calls, rounds):
    """Median seconds of each call, every call after a cache-clearing copy.
    An untimed round first keeps first-touch page faults out of the times."""
    flush_src = np.ones(1 << 25, np.float32)
    flush_dst = np.empty_like(flush_src)
    for call in calls.values():
        call()
    times = {name: [] for name in calls}
    for _ in range(rounds):
        for name, call in calls.items():
            _cpu.copy(flush_src, flush_dst)
            start = time.perf_counter()
            call()
            times[name].append(time.perf_counter() - start)
    return {name: float(np.median(t)) for name, t in times.items()}


def batch_norm_bounds(rounds):
    x = np.random.default_rng(0).standard_normal((32, 56, 56, 128), dtype=np.float32)
    channels = x.shape[-1]
    gamma = np.ones(channels, np.float32)
    beta = np.zeros(channels, np.float32)
    running_mean = np.zeros(channels, np.float32)
    running_var = np.ones(channels, np.float32)
    y = np.empty_like(x)
    reads = read_candidates(x)
    calls = {"copy x -> y": lambda: _cpu.copy(x, y), **reads}
    calls["fusednn inference (1 read + 1 write)"] = lambda: fn.batch_norm(
        x, gamma, beta, running_mean, running_var, training=False, axis=-1, out=y)
    calls["fusednn training forward"] = lambda: fn.batch_norm(
        x, gamma, beta, running_mean, running_var, training=True, axis=-1, out=y)
    if torch is not None:
        xt = torch.from_numpy(x).permute(0, 3, 1, 2)  # channels_last view of the same memory
        yt = torch.empty_like(xt)
        stats = [torch.empty(channels) for _ in range(2)]
        weights = [torch.from_numpy(a) for a in (gamma, beta, running_mean.copy(), running_var.copy())]
        calls["torch native_batch_norm (channels_last)"] = lambda: torch.ops.aten.native_batch_norm.out(
            xt, *weights, True, 0.1, 1e-5, out=yt, save_mean=stats[0], save_invstd=stats[1])
    t = measure(calls, rounds)
    print(f"batch norm forward, NHWC {'x'.join(map(str, x.shape))} float32 ({x.nbytes / 1e6:.1f} MB)")
    for name, seconds in t.items():
        print(f"  {name:42s} {seconds * 1e3:7.3f} ms")
    fastest_read = min(reads, key=t.get)
    floor = t[fastest_read] + t["copy x -> y"]
    ours = t["fusednn training forward"]
    print(f"  floor: fastest read ({fastest_read}) + copy = {floor * 1e3:.3f} ms; "
          f"fusednn training at {floor / ours * 100:.0f}% of it, "
          f"{1.5 * t['copy x -> y'] / ours * 100:.0f}% of the 1.5-copy roof")
    if torch is not None:
        theirs = t["torch native_batch_norm (channels_last)"]
        print(f"  PyTorch / fusednn = {theirs / ours:.2f}x; PyTorch / floor = {theirs / floor:.2f}x "
              "(the most any kernel reading x twice can reach)")


def dropout_bounds(rounds):
    n = 1 << 24
    x = np.random.default_rng(0).standard_normal(n, dtype=np.float32)
    y = np.empty_like(x)
    offsets = iter(range(1 << 30))
    calls = {
        "copy x -> y": lambda: _cpu.copy(x, y),
        "fn.dropout_mask (the draw alone)": lambda: fn.dropout_mask((n,), 0.5, seed=7, offset=next(offsets)),
        "fn.dropout, mask returned": lambda: fn.dropout(
            x, 0.5, seed=7, offset=next(offsets), return_mask=True, out=y),
        "fn.dropout_backward from (seed, offset)": lambda: fn.dropout_backward(
            x, 0.5, seed=7, offset=next(offsets), out=y),
    }
    if torch is not None:
        xt = torch.from_numpy(x)
        calls["torch native_dropout"] = lambda: torch.ops.aten.native_dropout(xt, 0.5, True)
    t = measure(calls, rounds)
    copy = t["copy x -> y"]
    print(f"dropout, 2^24 float32 ({x.nbytes / 1e6:.1f} MB)")
    for name, seconds in t.items():
        print(f"  {name:42s} {seconds * 1e3:7.3f} ms  copy / this = {copy / seconds * 100:4.0f}%")
    if torch is not None:
        print(f"  PyTorch / fn.dropout = {t['torch native_dropout'] / t['fn.dropout, mask returned']:.1f}x")


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=15)
    args = parser.parse_args()
    if torch is not None:
        torch.set_num_threads(fn.get_num_threads())
    print(f"fusednn {fn.__version__}, {fn.get_num_threads()} threads, torch "
          f"{torch.__version__ if torch is not None else 'not installed'}")
    batch_norm_bounds(args.rounds)
    dropout_bounds(args.rounds)


if __name__ == "__main__":
    main()
