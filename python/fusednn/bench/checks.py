"""How the bench judges an output against ``fusednn.reference``: errors in
ulp of the reference rounded to the output's dtype, or against a bound of
each value's own; the check inputs every activation-like kernel shares; and,
for peers whose dropout masks come from their own random generators, a check
of the fraction they drop. fusednn's kernels and every peer are held to the same
bounds, so that a peer that is off on the bench's inputs is flagged rather
than timed as if it did the same work.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import numpy as np

# Accuracy the check demands, in ulp of the reference rounded to the dtype.
# float32 is the design's number; float64 has no target there, and this
# bound still rejects any wrong formula (about 1e-12 relative).
# float16 and bfloat16: the float32 result rounded once is within 1 ulp.
TOLERANCE_ULP = {"float32": 4.0, "float64": 4096.0, "float16": 1.0, "bfloat16": 1.0}
# Where a derivative's two terms cancel near its root (their magnitudes
# add up to CANCELLATION_FACTOR times their sum or more), the design allows
# an absolute error of CANCELLATION_UNITS * 2^-p * |grad_output| instead,
# p the dtype's precision (24 for float32).
CANCELLATION_UNITS = 8.0
CANCELLATION_FACTOR = 2.0
CHECK_RANDOM_VALUES = 4096
# A peer's dropout keeps each element with probability 1 - p by its own
# generator: its dropped fraction must lie within this many standard
# deviations of p.
DROPPED_FRACTION_SIGMAS = 6.0


@dataclass
class CheckResult:
    """How one output compares with fusednn.reference on its family's check
    inputs. Errors are in `unit`: "ulp" of the reference rounded to the
    dtype, or "bound" where every value has an error bound of its own (1
    bound is the most allowed)."""
    error: float              # the largest error (outside the cancellation allowance)
    tolerance: float
    unit: str
    inputs: int
    worst: str                # where the largest error occurs, for the failure message
    cancelling: bool = False  # the absolute bound where the derivative's terms cancel applies
    # The largest error on the ordinary inputs alone (see ORDINARY), where
    # the caller asked for it: a peer may differ on special values only.
    ordinary_error: float | None = None

    @property
    def passed(self) -> bool:
        return self.error <= self.tolerance

    def describe(self) -> str:
        """The largest error and where it occurs."""
        if self.unit == "bound":
            return (f"{self.error:.3g} times the allowed error from fusednn.reference "
                    f"{self.worst}")
        allowed = "exact" if self.tolerance == 0 else f"{self.tolerance:g} {self.unit}"
        return (f"{self.error:.3g} {self.unit} from fusednn.reference {self.worst} "
                f"(allowed: {allowed})")


def finfo(dtype):
    """np.finfo, and ml_dtypes' for bfloat16 (numpy's does not know it)."""
    dtype = np.dtype(dtype)
    if dtype.name == "bfloat16":
        import ml_dtypes
        return ml_dtypes.finfo(dtype)
    return np.finfo(dtype)


def standard_normal(rng, size, dtype) -> np.ndarray:
    """Standard normal values of dtype; half types are drawn in float32
    (numpy draws float32 and float64 only) and rounded."""
    dtype = np.dtype(dtype)
    if dtype.itemsize == 2:
        return rng.standard_normal(size, dtype=np.float32).astype(dtype)
    return rng.standard_normal(size, dtype=dtype)


def _special_values(finfo) -> list:
    """+-0, subnormals, +-inf, NaN, huge magnitudes, the kinks at +-1 and +-3."""
    return [0.0, -0.0, np.inf, -np.inf, np.nan, finfo.smallest_subnormal,
            -finfo.smallest_subnormal, finfo.tiny / 4, -finfo.tiny / 4, finfo.tiny, -finfo.tiny,
            finfo.max, -finfo.max, 1e30, -1e30, 1e4, -1e4, 100.0, -100.0, 20.0, -20.0,
            3.0, -3.0, 1.0, -1.0]


# check_inputs() puts the special values first; the random normal ones
# after them are the ordinary inputs, like those the bench times.
ORDINARY = slice(len(_special_values(np.finfo(np.float32))), None)


def check_inputs(dtype) -> tuple[np.ndarray, np.ndarray]:
    """x: the special values, then random normal ones; grad_output: random
    normal values. The same for every run."""
    dtype = np.dtype(dtype)
    special = _special_values(finfo(dtype))
    rng = np.random.default_rng(0)
    with np.errstate(over="ignore"):  # float16: 1e30 and 1e4 become inf
        special = np.array(special, dtype=dtype)
    x = np.concatenate([special,
                        (3.0 * rng.standard_normal(CHECK_RANDOM_VALUES)).astype(dtype)])
    return x, rng.standard_normal(x.size).astype(dtype)


def ulp_errors(ours: np.ndarray, expected: np.ndarray) -> np.ndarray:
    """|ours - expected| in units of the last place of expected in ours'
    dtype: 0 where ours equals expected rounded to that dtype (the same
    infinity and NaN included), inf where only one of them is NaN."""
    info = finfo(ours.dtype)
    with np.errstate(all="ignore"):
        expected = np.asarray(expected, dtype=np.float64)
        rounded = expected.astype(ours.dtype)
        _, exponent = np.frexp(np.abs(expected))
        ulp = np.maximum(np.ldexp(1.0, exponent - (info.nmant + 1)),
                         float(info.smallest_subnormal))
        ulp = np.where(expected == 0, float(info.smallest_subnormal), ulp)
        errors = np.abs(ours.astype(np.float64) - expected) / ulp
    errors = np.where(np.isnan(errors), np.inf, errors)
    agree = (ours == rounded) | (np.isnan(ours) & np.isnan(rounded))
    return np.where(agree, 0.0, errors)


def compare(ours, expected, tolerance_ulp, inputs: dict, grad=None, terms=None,
            ordinary: slice | None = None) -> CheckResult:
    """Errors of ours against the reference. Where the derivative's two
    terms (float64 arrays) cancel, an absolute error up to
    CANCELLATION_UNITS * 2^-p * |grad| is accepted instead of the ulp
    bound, p the dtype's precision. With `ordinary`, the largest error on
    those elements is kept too."""
    errors = ulp_errors(ours, expected)
    if terms is not None:
        info = finfo(ours.dtype)
        with np.errstate(all="ignore"):
            cancels = (np.abs(terms[0]) + np.abs(terms[1])
                       >= CANCELLATION_FACTOR * np.abs(terms[0] + terms[1]))
            absolute = np.abs(ours.astype(np.float64) - expected)
            allowed = absolute <= CANCELLATION_UNITS * (float(info.eps) / 2) * np.abs(grad)
        errors = np.where(cancels & allowed, 0.0, errors)
    i = int(np.argmax(errors))
    where = ", ".join(f"{name}={values[i]!s}" for name, values in inputs.items())
    worst = f"at {where}: got {ours[i]!s}, reference {np.float64(expected[i])!s}"
    return CheckResult(float(errors[i]), tolerance_ulp, "ulp", int(errors.size), worst,
                       terms is not None,
                       None if ordinary is None else float(errors[ordinary].max()))


def check_dropped_fraction(result: CheckResult, keep: np.ndarray, p: float) -> CheckResult:
    """Fails result (with an infinite error) unless the fraction of
    elements a peer's own generator dropped (keep False) lies within
    DROPPED_FRACTION_SIGMAS standard deviations of p."""
    n = keep.size
    fraction = 1.0 - float(np.count_nonzero(keep)) / n
    allowed = DROPPED_FRACTION_SIGMAS * math.sqrt(p * (1 - p) / n)
    if abs(fraction - p) > allowed:
        result.error = math.inf
        result.worst = (f"in the dropped fraction: {fraction:.4f} of {n} elements, "
                        f"p = {p:g} +- {allowed:.4f}")
    return result


def bounded_errors(ours: np.ndarray, expected: np.ndarray, bound) -> np.ndarray:
    """|ours - expected| / bound: 0 where ours equals expected (the same
    infinity included) or both are NaN, inf where only one is NaN."""
    with np.errstate(all="ignore"):
        errors = np.abs(ours.astype(np.float64) - expected) / bound
        agree = (ours == expected) | (np.isnan(ours) & np.isnan(expected))
    errors = np.where(np.isnan(errors), np.inf, errors)
    return np.where(agree, 0.0, errors)


def compare_bounded(outputs: dict, inputs: int, dims: dict | None = None,
                    ordinary: Callable | None = None) -> CheckResult:
    """outputs: name -> (ours, expected, bound), the bound broadcasting to
    ours' shape. The error is the largest |ours - expected| / bound. dims
    names the axes of an output with that many dimensions, e.g.
    {4: "nchw"}, for the failure message. ordinary(errors), where given,
    picks the errors of the ordinary inputs out of an output's."""
    largest, worst = -1.0, ""
    ordinary_largest = 0.0
    for name, (ours, expected, bound) in outputs.items():
        expected = np.asarray(expected, dtype=np.float64)
        bound = np.broadcast_to(bound, ours.shape)
        errors = bounded_errors(ours, expected, bound)
        if ordinary is not None:
            ordinary_largest = max(ordinary_largest, float(ordinary(errors).max()))
        i = np.unravel_index(int(np.argmax(errors)), errors.shape)
        if errors[i] > largest:
            largest = float(errors[i])
            with np.errstate(all="ignore"):
                absolute = abs(float(ours[i]) - expected[i])
            names = (dims or {}).get(ours.ndim)
            index = ", ".join(f"{names[d]}={int(k)}" if names else str(int(k))
                              for d, k in enumerate(i))
            worst = (f"in {name}[{index}]: got {ours[i]!s}, "
                     f"reference {expected[i]!s} (|error| {absolute:.3g}, "
                     f"allowed {bound[i]:.3g})")
    return CheckResult(largest, 1.0, "bound", inputs, worst,
                       ordinary_error=None if ordinary is None else ordinary_largest)
