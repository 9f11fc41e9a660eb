"""The peers a user would pick instead of fusednn: PyTorch eager, the same
PyTorch function through ``torch.compile`` (inductor), and the equivalent
JAX function under ``jax.jit``. Each is optional: a library that is missing
(or that cannot run on the device) leaves its column empty with a note.

Families describe a peer's work as a function of arrays plus the arrays to
time it on and a judge of its output on the check inputs; this module turns
that into Peer objects: it compiles where the peer compiles (timing the
compilation for the timed shapes once, outside the timed rounds), and runs
the check so that a peer that is wrong on the bench's inputs is flagged.
"""
from __future__ import annotations

import importlib
import os
import time
import warnings
from typing import Callable

import numpy as np

from .cases import Peer, Plan

JAX_ALLOCATES = "JAX arrays are immutable"


def import_torch(device: str = "cpu"):
    """(torch, its version and settings) or (None, why not)."""
    # PyTorch's OpenMP workers otherwise spin for a while after each of its
    # calls, taking the cores from the kernel timed next: with peers
    # interleaved that would slow every kernel but PyTorch's.
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    try:
        import torch
    except ImportError as error:
        return None, f"not importable ({error})"
    if device == "cuda" and not torch.cuda.is_available():
        return None, f"{torch.__version__} without CUDA"
    return torch, f"{torch.__version__} (OMP_WAIT_POLICY={os.environ['OMP_WAIT_POLICY']})"


def import_jax(device: str = "cpu"):
    """(jax, its version and backend) or (None, why not)."""
    if device == "cuda":
        # JAX runs on CUDA streams of its own, which the CUDA events on
        # CuPy's stream that time everything else would not bracket.
        return None, "not timed with --device cuda (JAX uses its own CUDA streams)"
    try:
        import jax
    except ImportError as error:
        return None, f"not importable ({error})"
    return jax, f"{jax.__version__} (XLA:CPU)"


def import_cupy():
    """(cupy, its version) when it sees a CUDA device, else (None, why not)."""
    try:
        import cupy
    except ImportError as error:
        return None, f"not importable ({error})"
    try:
        count = cupy.cuda.runtime.getDeviceCount()
    except cupy.cuda.runtime.CUDARuntimeError as error:
        return None, f"installed but sees no CUDA device ({error})"
    if count == 0:
        return None, "installed but sees no CUDA device"
    return cupy, cupy.__version__


def _quietly(call):
    """call(), with the warnings torch's and JAX's compilers raise about
    their own internals (deprecated modules they import) silenced: they say
    nothing about the work timed."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return call()


def torch_to_numpy(outputs):
    """A tensor, or a tuple of them, as host numpy arrays (bfloat16 as
    ml_dtypes arrays)."""
    if isinstance(outputs, (tuple, list)):
        return tuple(torch_to_numpy(t) for t in outputs)
    tensor = outputs.detach().cpu()
    if str(tensor.dtype) == "torch.bfloat16":
        import ml_dtypes
        import torch
        return tensor.view(torch.int16).numpy().view(ml_dtypes.bfloat16)
    return tensor.numpy()


def torch_view(plan: Plan):
    """A function giving the torch tensor that shares an array's memory:
    torch.from_numpy (bfloat16 through its bits: torch does not take
    ml_dtypes arrays), or from_dlpack for CuPy arrays."""
    torch = plan.torch
    if plan.device != "cpu":
        return torch.from_dlpack

    def view(a):
        if a.dtype.name == "bfloat16":
            return torch.from_numpy(a.view(np.int16)).view(torch.bfloat16)
        return torch.from_numpy(a)
    return view


def torch_check_tensors(plan: Plan, *arrays) -> list:
    """Tensors on the plan's device holding copies of host arrays."""
    if plan.device == "cpu":
        view = torch_view(plan)
        return [view(np.array(a)) for a in arrays]
    return [plan.torch.tensor(a, device=plan.device) for a in arrays]


def torch_peers(plan: Plan, op: str, function: Callable, timed: list,
                check_args: Callable[[], list], judge: Callable, *,
                allocates: str | None = None,
                compiled: Callable | None = None) -> tuple[list, dict]:
    """([Peer], {label: why not}) for PyTorch eager and torch.compile, as
    the plan asks for them. function(*tensors) runs the eager op and returns
    what judge() reads (as numpy); timed are its tensors on the timed
    inputs, check_args() makes fresh ones on the check inputs; allocates
    says why the eager op allocates its result, where it does. compiled is
    the function given to torch.compile (default: function itself, e.g. an
    aten .out op, whose write into the preallocated output inductor keeps);
    it writes the preallocated outputs."""
    torch = plan.torch
    peers, errors = [], {}
    if "torch" in plan.peers:
        peers.append(Peer("torch", op, lambda: function(*timed),
                          lambda: judge(torch_to_numpy(function(*check_args()))), allocates))
    if "torch.compile" not in plan.peers:
        return peers, errors
    # Every row compiles anew: dynamo's caches hold a bounded number of
    # versions per function, past which it would silently run eager code.
    _quietly(lambda: importlib.import_module("torch._dynamo").reset())
    synchronize = torch.cuda.synchronize if plan.device == "cuda" else (lambda: None)

    def first_call():
        start = time.perf_counter()
        fast(*timed)
        synchronize()
        return time.perf_counter() - start

    try:
        fast = torch.compile(compiled or function, dynamic=False, fullgraph=True)
        seconds = _quietly(first_call)
    except Exception as error:  # inductor needs a working C++ or Triton toolchain
        errors["torch.compile"] = f"torch.compile failed: {type(error).__name__}: {error}"
        return peers, errors
    peers.append(Peer("torch.compile", f"torch.compile({op})", lambda: fast(*timed),
                      lambda: judge(torch_to_numpy(_quietly(lambda: fast(*check_args())))),
                      None, seconds))
    return peers, errors


def jax_peer(plan: Plan, op: str, function: Callable, timed_host: list,
             check_args: Callable[[], list], judge: Callable) -> list:
    """[Peer] for jax.jit(function). timed_host are the host arrays to
    time it on (put on JAX's device once, here); check_args() gives host
    arrays of the check inputs. Compilation for the timed shapes is timed
    once, ahead of time."""
    jax = plan.jax
    jitted = jax.jit(function)
    timed = [jax.device_put(a) for a in timed_host]
    start = time.perf_counter()
    compiled = _quietly(lambda: jitted.lower(*timed).compile())
    seconds = time.perf_counter() - start

    def check():
        outputs = jax.device_get(_quietly(lambda: jitted(*check_args())))
        return judge(outputs)

    return [Peer("jax.jit", op, lambda: jax.block_until_ready(compiled(*timed)), check,
                 JAX_ALLOCATES, seconds)]
