"""The compiled modules (``_cpu`` always, ``_cuda`` when the build found
nvcc), checks of scalar arguments shared by the public functions, thread
settings and build information. Arrays are the business of ``_arrays``.
"""
from __future__ import annotations

import math
import numbers

import numpy as np

from . import _cpu

try:  # the CUDA module exists only when the build found nvcc
    from . import _cuda
except ImportError:  # pragma: no cover - depends on the build
    _cuda = None

SUPPORTED_DTYPES = ("float32", "float64")
_SUPPORTED = tuple(np.dtype(d) for d in SUPPORTED_DTYPES)
# Half-precision storage, computed in float32 and rounded once: numpy's
# float16 and ml_dtypes' bfloat16 (numpy has none of its own), on the CPU
# for the functions named here.
HALF_DTYPES = ("float16", "bfloat16")
_HALF_CPU_FUNCTIONS = frozenset((
    "sigmoid", "tanh", "relu", "leaky_relu", "elu", "selu", "gelu", "silu", "softplus", "mish",
    "hardsigmoid", "hardswish", "hardtanh", "activation", "activation_backward",
    "dropout", "dropout_backward", "bias_act_dropout", "bias_act_dropout_backward",
    "batch_norm", "batch_norm_backward", "batch_norm_stats", "batch_norm_apply",
    "batch_norm_backward_reduce", "batch_norm_backward_apply"))


def is_cupy_array(a) -> bool:
    kind = type(a)
    if kind is np.ndarray:  # the common case, checked first: calls are often small
        return False
    module = kind.__module__
    return module == "cupy" or module.startswith("cupy.")


def cuda_unavailable(function: str) -> Exception:
    """The error for a CUDA array passed to a build without the CUDA module."""
    return RuntimeError(
        f"fusednn.{function}: got a CUDA array, but this fusednn was built without "
        "CUDA. Reinstall with nvcc on PATH (FUSEDNN_CUDA=ON pip install . "
        "-Ccmake.fresh=true), or pass CPU arrays (numpy, cupy.asnumpy(a), t.cpu()).")


def is_half(dtype) -> bool:
    """Whether dtype is float16 or ml_dtypes' bfloat16 (found by name, so
    that ml_dtypes is never imported here: an array of it already was)."""
    dtype = np.dtype(dtype)
    return dtype.itemsize == 2 and (dtype.kind == "f" or dtype.name == "bfloat16")




# The CUDA major version whose CuPy the [cuda] extra installs
# (pyproject.toml: cupy-cuda13x), the toolkit release wheels are built with.
EXTRA_CUDA_MAJOR = 13


def cupy_install_hint() -> str:
    """How to install the CuPy this build needs, for error messages: CuPy
    must match the CUDA major version the CUDA module was compiled with,
    which is the [cuda] extra's unless a source build used another
    toolkit."""
    major = _cuda.runtime_version() // 1000 if _cuda is not None else EXTRA_CUDA_MAJOR
    if major == EXTRA_CUDA_MAJOR:
        return f"pip install 'fusednn[cuda]': cupy-cuda{major}x, for CUDA {major} like this build"
    return (f"pip install cupy-cuda{major}x: this build's CUDA module is compiled with CUDA "
            f"{major}, and the [cuda] extra's cupy-cuda{EXTRA_CUDA_MAJOR}x is for CUDA "
            f"{EXTRA_CUDA_MAJOR}")


# Element counts from 2**63 up cannot be indexed (numpy's sizes are int64).
_SIZE_LIMIT = 1 << 63


def check_element_count(dims: tuple, function: str) -> tuple:
    """dims, unless their product is past what an array can index: a
    ValueError then (numpy's own int64 product would wrap around, e.g. to 0
    for (2**32, 2**32))."""
    size = math.prod(dims)
    if size >= _SIZE_LIMIT:
        raise ValueError(f"fusednn.{function}: shape {dims} has {size} elements, more than an "
                         "array can index (2**63 - 1)")
    return dims


def check_shape(shape, function: str) -> tuple:
    """A shape argument (an integer or a sequence of integers) as a tuple
    of ints, with its element count checked by check_element_count."""
    if isinstance(shape, numbers.Integral) and not isinstance(shape, (bool, np.bool_)):
        shape = (shape,)
    try:
        dims = tuple(shape)
    except TypeError:
        raise TypeError(f"fusednn.{function}: shape must be an integer or a tuple of "
                        f"integers, not {type(shape).__name__}") from None
    for d in dims:
        if isinstance(d, (bool, np.bool_)) or not isinstance(d, numbers.Integral):
            raise TypeError(f"fusednn.{function}: shape must hold integers, got {shape!r}")
        if d < 0:
            raise ValueError(f"fusednn.{function}: shape must not be negative, got {shape!r}")
    return check_element_count(tuple(int(d) for d in dims), function)


def check_real(value, name: str, function: str) -> float:
    if type(value) is float and math.isfinite(value):  # the common case, checked first
        return value
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"fusednn.{function}: {name} must be a real number, "
                        f"not {type(value).__name__}")
    value = float(value)
    if not np.isfinite(value):
        raise ValueError(f"fusednn.{function}: {name} must be finite, got {value}")
    return value


def get_num_threads() -> int:
    """Threads the CPU kernels use."""
    return _cpu.get_num_threads()


def set_num_threads(n: int) -> None:
    """Sets the CPU kernels' thread count, 1 to ``_cpu.max_num_threads``
    (results do not depend on it)."""
    if (isinstance(n, (bool, np.bool_)) or not isinstance(n, numbers.Integral)
            or not 1 <= n <= _cpu.max_num_threads):
        raise ValueError(f"fusednn.set_num_threads: n must be an integer in "
                         f"[1, {_cpu.max_num_threads}], got {n!r}")
    _cpu.set_num_threads(int(n))


def set_thread_pool(kind: str) -> None:
    """Chooses the threads that run the CPU kernels' parallel regions;
    results do not depend on it.

    Where the process has GNU OpenMP loaded (PyTorch's CPU builds load it),
    a region can run on the calling thread's OpenMP team, the threads
    PyTorch's own operators run on, which under OpenMP's default wait
    policy spin for milliseconds after each operator on the cores
    fusednn's own workers would need. ``"auto"`` (the default) takes the
    team while its other threads are awake (running or spinning) and the
    caller has kept busy for some milliseconds, as in a training loop, and
    fusednn's own pool otherwise; ``"openmp"`` takes the team whenever the
    runtime is there; ``"fusednn"`` always fusednn's own pool. Where there
    is no GNU OpenMP, or inside an OpenMP region, or in a child process
    forked after the team ran, fusednn's own pool serves whatever the
    choice. ``FUSEDNN_THREAD_POOL`` in the environment sets the first
    choice.
    """
    if kind not in ("auto", "openmp", "fusednn"):
        raise ValueError(f"fusednn.set_thread_pool: kind must be 'auto', 'openmp' or "
                         f"'fusednn', got {kind!r}")
    _cpu.set_thread_pool(kind)


def get_thread_pool() -> str:
    """The choice set_thread_pool made: ``"auto"``, ``"openmp"`` or
    ``"fusednn"``."""
    return _cpu.get_thread_pool()


def info() -> dict:
    """Build configuration: version, cuda_built, cuda_archs (SASS), cuda_ptx,
    simd, threads, thread_pool."""
    result = {
        "version": _cpu.version,
        "cuda_built": _cuda is not None,
        "cuda_archs": list(_cuda.archs()) if _cuda is not None else [],
        # The PTX architecture, which the driver compiles for GPUs that none
        # of cuda_archs runs on; None without the CUDA module.
        "cuda_ptx": _cuda.ptx_arch() if _cuda is not None else None,
        "simd": _cpu.simd(),
        "simd_available": list(_cpu.available_simd()),
        "threads": _cpu.get_num_threads(),
        # The threads this thread's parallel regions may run on: the
        # choice ("auto", "openmp") where the process's GNU OpenMP team is
        # within reach, "fusednn" (its own pool) where it is not.
        "thread_pool": _cpu.get_thread_pool() if _cpu.openmp_team_available() else "fusednn",
    }
    if _cuda is not None:
        result["cuda_runtime"] = _cuda.runtime_version()
        result["cuda_driver"] = _cuda.driver_version()  # 0: no driver
        result["cuda_devices"] = _cuda.device_count()
        # Why there are no devices (cudaErrorInsufficientDriver: the driver is
        # older than the runtime; cudaErrorNoDevice), None when there are.
        result["cuda_error"] = _cuda.device_error()
    return result
