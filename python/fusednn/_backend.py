"""Array plumbing shared by the public functions: which compiled module an
array belongs to (numpy arrays run on ``_cpu``, CuPy arrays on ``_cuda``),
dtype and ``out=`` validation, and build information.

Validation happens here, once, before any kernel runs, so that a bad
argument raises without writing anything. CuPy is imported only when a
CuPy array arrives, so fusednn never needs it to import.
"""
from __future__ import annotations

import math
import numbers

import numpy as np

from . import _cpu, _interop

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
    "dropout", "dropout_backward", "bias_act_dropout", "bias_act_dropout_backward"))
# The CUDA kernels also take float16 (computed in float32); the codes are
# the binding's DType.
SUPPORTED_CUDA_DTYPES = ("float32", "float64", "float16")
_CUDA_DTYPE_CODES = {np.dtype(d): code for code, d in enumerate(SUPPORTED_CUDA_DTYPES)}


def is_cupy_array(a) -> bool:
    kind = type(a)
    if kind is np.ndarray:  # the common case, checked first: calls are often small
        return False
    module = kind.__module__
    return module == "cupy" or module.startswith("cupy.")


def cuda_unavailable(function: str) -> Exception:
    """The error for a CuPy array passed to a function without a CUDA kernel."""
    if _cuda is None:
        return RuntimeError(
            f"fusednn.{function}: got a CuPy array, but this fusednn was built without "
            "CUDA. Reinstall with nvcc on PATH (FUSEDNN_CUDA=ON pip install . "
            "-Ccmake.fresh=true), or pass numpy arrays.")
    return NotImplementedError(
        f"fusednn.{function}: this version has no CUDA kernel for this function; "
        "pass numpy arrays (cupy.asnumpy) to run it on the CPU.")


def device_of(function: str, **arrays) -> str:
    """'cuda' when the given arrays (None skipped) are CuPy arrays, 'cpu'
    when they are numpy arrays, and 'foreign' when one comes from another
    library (torch, JAX, DLPack: the caller hands the call to
    _interop.call). Mixing numpy and CuPy is a TypeError, a CuPy array
    without the CUDA module a RuntimeError; both name the fix."""
    for a in arrays.values():
        if a is not None and type(a) is not np.ndarray:
            break
    else:
        return "cpu"
    if any(_interop.is_foreign(a) for a in arrays.values()):
        return "foreign"
    on_gpu = [name for name, a in arrays.items() if a is not None and is_cupy_array(a)]
    if not on_gpu:
        return "cpu"
    on_cpu = [name for name, a in arrays.items() if a is not None and not is_cupy_array(a)]
    if on_cpu:
        raise TypeError(
            f"fusednn.{function}: {', '.join(on_gpu)} on the GPU (CuPy) but "
            f"{', '.join(on_cpu)} on the CPU; put every array on one device "
            "(cupy.asarray(a) moves a numpy array to the GPU, cupy.asnumpy(a) brings a "
            "CuPy array back)")
    if _cuda is None:
        raise cuda_unavailable(function)
    return "cuda"


def _cupy():
    import cupy
    return cupy


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


def check_cuda_dtype(dtype, name: str, function: str) -> None:
    if np.dtype(dtype) not in _CUDA_DTYPE_CODES:
        raise TypeError(f"fusednn.{function}: {name} has dtype {np.dtype(dtype)}; supported "
                        f"dtypes are {', '.join(SUPPORTED_CUDA_DTYPES)} (float16 on the GPU only)")


def as_cuda_array(x, name: str, function: str):
    """Checks that x is a CuPy array of a supported dtype on the current
    CuPy device, and returns it aligned to its item size (copying once
    only if it is not)."""
    cupy = _cupy()
    if not isinstance(x, cupy.ndarray):
        raise TypeError(f"fusednn.{function}: {name} must be a numpy or CuPy array, "
                        f"not {type(x).__name__}")
    check_cuda_dtype(x.dtype, name, function)
    current = cupy.cuda.Device().id
    if x.device.id != current:
        raise ValueError(f"fusednn.{function}: {name} is on GPU {x.device.id} but the current "
                         f"CuPy device is GPU {current}; call it inside "
                         f"`with cupy.cuda.Device({x.device.id}):`")
    if x.data.ptr % x.dtype.itemsize or any(s % x.dtype.itemsize for s in x.strides):
        x = cupy.ascontiguousarray(x)
    return x


def prepare_cuda_out(out, like, function: str):
    """Returns out after checking it against the CuPy array `like` (shape,
    dtype, device), or a new CuPy array when out is None."""
    cupy = _cupy()
    if out is None:
        return cupy.empty(like.shape, dtype=like.dtype)
    if not isinstance(out, cupy.ndarray):
        raise ValueError(f"fusednn.{function}: out is a {type(out).__module__.split('.')[0]} "
                         f"{type(out).__name__} but the inputs are CuPy arrays; out must be a "
                         "CuPy array on the inputs' device")
    if out.shape != like.shape:
        raise ValueError(f"fusednn.{function}: out has shape {out.shape}, expected {like.shape}")
    if out.dtype != like.dtype:
        raise ValueError(f"fusednn.{function}: out has dtype {out.dtype}, expected {like.dtype}")
    if out.device.id != like.device.id:
        raise ValueError(f"fusednn.{function}: out is on GPU {out.device.id}, the inputs on "
                         f"GPU {like.device.id}")
    itemsize = out.dtype.itemsize
    if out.data.ptr % itemsize or any(s % itemsize for s in out.strides):
        raise ValueError(f"fusednn.{function}: out is not aligned to its item size")
    check_no_internal_overlap(out, "out", function)
    return out


def detach_from_cuda_out(x, out, *, elementwise: bool = True):
    """As detach_from_out, for CuPy arrays."""
    if x is None or not _cupy().may_share_memory(x, out):
        return x
    if elementwise and (out is x or (x.data.ptr == out.data.ptr and x.strides == out.strides
                                     and x.shape == out.shape)):
        return x
    return x.copy()


def cuda_operand(a) -> tuple:
    """A CuPy array as the CUDA module takes it: (device pointer, dtype
    code, shape, byte strides)."""
    return (a.data.ptr, _CUDA_DTYPE_CODES[a.dtype], a.shape, a.strides)


def cuda_target(a) -> tuple:
    """(device id, CuPy's current stream as an integer) for a launch on a's
    device."""
    return a.device.id, _cupy().cuda.get_current_stream().ptr


def as_cpu_array(x, name: str, function: str) -> np.ndarray:
    """Checks that x is a numpy array of a supported dtype and returns it in
    native byte order and aligned (copying once only if it is not)."""
    if is_cupy_array(x):
        raise cuda_unavailable(function)
    if isinstance(x, np.generic):
        x = np.asarray(x)
    if not isinstance(x, np.ndarray):
        raise TypeError(f"fusednn.{function}: {name} must be a numpy or CuPy array, "
                        f"not {type(x).__name__}")
    check_dtype(x.dtype, name, function)
    if not x.dtype.isnative:
        x = x.astype(x.dtype.newbyteorder("="))
    if not x.flags.aligned:
        x = x.copy()
    return x


def is_half(dtype) -> bool:
    """Whether dtype is float16 or ml_dtypes' bfloat16 (found by name, so
    that ml_dtypes is never imported here: an array of it already was)."""
    dtype = np.dtype(dtype)
    return dtype.itemsize == 2 and (dtype.kind == "f" or dtype.name == "bfloat16")


def check_dtype(dtype, name: str, function: str) -> None:
    if dtype in _SUPPORTED:
        return
    if function in _HALF_CPU_FUNCTIONS and is_half(dtype):
        return
    if np.dtype(dtype) not in _SUPPORTED and np.dtype(dtype).newbyteorder("=") not in _SUPPORTED:
        supported = SUPPORTED_DTYPES + (HALF_DTYPES if function in _HALF_CPU_FUNCTIONS else ())
        raise TypeError(f"fusednn.{function}: {name} has dtype {np.dtype(dtype)}; "
                        f"supported dtypes are {', '.join(supported)}")


def check_same(a: np.ndarray, b: np.ndarray, names: str, function: str) -> None:
    if a.shape != b.shape:
        raise ValueError(f"fusednn.{function}: {names} must have the same shape, "
                         f"got {a.shape} and {b.shape}")
    if a.dtype != b.dtype:
        raise TypeError(f"fusednn.{function}: {names} must have the same dtype, "
                        f"got {a.dtype} and {b.dtype}")


def prepare_out(out, shape, dtype, function: str) -> np.ndarray:
    """Returns out after checking it, or a new array when out is None."""
    if out is None:
        return np.empty(shape, dtype=dtype)
    if is_cupy_array(out):
        raise ValueError(f"fusednn.{function}: out is a CuPy array but the inputs are "
                         "numpy arrays; out must be on the inputs' device")
    if not isinstance(out, np.ndarray):
        raise ValueError(f"fusednn.{function}: out must be a numpy array, "
                         f"not {type(out).__name__}")
    if out.shape != tuple(shape):
        raise ValueError(f"fusednn.{function}: out has shape {out.shape}, expected {tuple(shape)}")
    if out.dtype != dtype:
        if out.dtype.newbyteorder("=") == dtype:
            raise ValueError(
                f"fusednn.{function}: out has dtype {out.dtype.str}, {np.dtype(dtype)} in the "
                "other byte order; kernels write native byte order only. Pass out=None (or a "
                "native array) and byte-swap the result if you need it: "
                "y.astype(y.dtype.newbyteorder())")
        raise ValueError(f"fusednn.{function}: out has dtype {out.dtype}, expected {np.dtype(dtype)}")
    flags = out.flags
    if not flags.writeable:
        raise ValueError(f"fusednn.{function}: out is read-only")
    if not flags.aligned:
        raise ValueError(f"fusednn.{function}: out is not aligned to its item size")
    check_no_internal_overlap(out, "out", function)
    return out


def _same_view(a: np.ndarray, b: np.ndarray) -> bool:
    return (a.__array_interface__["data"][0] == b.__array_interface__["data"][0]
            and a.strides == b.strides and a.shape == b.shape)


def detach_from_out(x, out: np.ndarray, *, elementwise: bool = True):
    """x itself, or a copy of it when it shares memory with out (None
    passes through).

    Kernels write out while they read their inputs, so an input that
    overlaps out in any other way would be read after parts of it were
    overwritten. The exception is the documented in-place form: an
    `elementwise` operand (one read at the element it writes) that is the
    very same view as out."""
    if x is None or not np.may_share_memory(x, out):
        return x
    if elementwise and (out is x or _same_view(x, out)):
        return x
    return x.copy()


# Up to this many elements an output whose strides leave the quick test
# undecided is checked address by address.
_OVERLAP_ENUMERATION_LIMIT = 1 << 20


def has_internal_overlap(shape, strides, itemsize: int) -> bool:
    """Whether two elements of a view with these dimensions and byte
    strides share memory.

    Sorted by stride, each dimension must step past everything the smaller
    ones span; views that fail that test (rare interleavings, stride 0)
    are checked exactly when small enough, and counted as overlapping
    otherwise."""
    if 0 in shape:
        return False
    dims = sorted((abs(s), n) for n, s in zip(shape, strides) if n > 1)
    span = itemsize
    for stride, n in dims:
        if stride < span:
            break
        span += stride * (n - 1)
    else:
        return False
    if math.prod(n for _, n in dims) > _OVERLAP_ENUMERATION_LIMIT:
        return True
    offsets = np.zeros(1, dtype=np.int64)
    for stride, n in dims:
        offsets = (offsets[:, None] + np.arange(n, dtype=np.int64) * stride).reshape(-1)
    offsets.sort()
    return bool(np.any(np.diff(offsets) < itemsize))


def check_no_internal_overlap(a, name: str, function: str) -> None:
    """A ValueError for an array the kernels would write when two of its
    elements share memory (a stride-0 view, say): which write lands last
    would depend on thread timing."""
    if has_internal_overlap(a.shape, a.strides, a.dtype.itemsize):
        raise ValueError(f"fusednn.{function}: {name} has elements that share memory (strides "
                         f"{a.strides} for shape {a.shape}), so writes to it would collide; "
                         "pass an array without overlapping elements (e.g. a contiguous one)")


def _may_share_memory(a, b) -> bool:
    if is_cupy_array(a):
        return bool(_cupy().may_share_memory(a, b))
    return bool(np.may_share_memory(a, b))


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


def info() -> dict:
    """Build configuration: version, cuda_built, cuda_archs, simd, threads."""
    result = {
        "version": _cpu.version,
        "cuda_built": _cuda is not None,
        "cuda_archs": list(_cuda.archs()) if _cuda is not None else [],
        "simd": _cpu.simd(),
        "simd_available": list(_cpu.available_simd()),
        "threads": _cpu.get_num_threads(),
    }
    if _cuda is not None:
        result["cuda_runtime"] = _cuda.runtime_version()
        result["cuda_driver"] = _cuda.driver_version()  # 0: no driver
        result["cuda_devices"] = _cuda.device_count()
        # Why there are no devices (cudaErrorInsufficientDriver: the driver is
        # older than the runtime; cudaErrorNoDevice), None when there are.
        result["cuda_error"] = _cuda.device_error()
    return result
