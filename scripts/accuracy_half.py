"""Measures the float16 and bfloat16 activation kernels against the float64
reference, exhaustively: every one of the 65,536 inputs of each type,
forward and backward (from x, and from y where the activation allows it).

The reference is computed in float64 from the exactly converted inputs
(for backward from y: from the stored half-precision y). Errors are in ulp
of the storage type at the reference value (its subnormal spacing below
the smallest normal); a result equal to the correctly rounded reference,
the same infinity included, counts 0, and NaN must meet NaN. "misrounded"
counts the results (forward / backward from x, of 65,536) that differ
from the correctly rounded reference: the float32 result (the float32
kernel's, or that of the half types' own form) sat too close to a rounding
boundary of the storage type. Run after building:  python scripts/accuracy_half.py
"""
from __future__ import annotations

import argparse
import sys

import numpy as np

import fusednn as fn
from fusednn import reference as ref

EXTRA_PARAMS = {
    "leaky_relu": [{"negative_slope": 0.2}],
    "elu": [{"alpha": 0.5}],
    "gelu": [{"approximate": "tanh"}],
    "softplus": [{"beta": 2.5, "threshold": 15.0}],
    "hardtanh": [{"min_val": -2.0, "max_val": 0.5}],
}
EXACT = {"relu", "leaky_relu", "hardtanh"}
BOUND_ULP = 1.0


def storage_types():
    import ml_dtypes
    return {"float16": np.dtype(np.float16), "bfloat16": np.dtype(ml_dtypes.bfloat16)}


def every_value(dtype: np.dtype) -> np.ndarray:
    return np.arange(1 << 16, dtype=np.uint32).astype(np.uint16).view(dtype)


def spacing(dtype: np.dtype, value: np.ndarray) -> np.ndarray:
    """The distance between neighbours of the storage type around |value|
    (float64), for finite values."""
    info = {"float16": (10, -14), "bfloat16": (7, -126)}[dtype.name]
    mantissa_bits, min_exponent = info
    with np.errstate(all="ignore"):
        exponent = np.floor(np.log2(np.abs(value)))
    exponent = np.where(np.isfinite(exponent), exponent, min_exponent)
    return np.exp2(np.maximum(exponent, min_exponent) - mantissa_bits)


def round_to(dtype: np.dtype, value: np.ndarray) -> np.ndarray:
    """value (float64) rounded once to the storage type, to nearest even,
    as float64 (ml_dtypes rounds float64 through float32: twice)."""
    largest = float(np.finfo(dtype).max)
    step = spacing(dtype, value)
    with np.errstate(all="ignore"):
        rounded = np.round(value / step) * step  # a power-of-two scaling: exact
    rounded = np.where(np.abs(rounded) > largest, np.copysign(np.inf, value), rounded)
    return np.where(np.isfinite(value), rounded, value)


def ulp_error(actual: np.ndarray, expected: np.ndarray) -> np.ndarray:
    """|actual - expected| in ulp of actual's storage type at expected."""
    dtype = actual.dtype
    a = actual.astype(np.float64)
    rounded = round_to(dtype, expected)
    with np.errstate(all="ignore"):
        err = np.abs(a - expected) / spacing(dtype, expected)
    both_nan = np.isnan(a) & np.isnan(expected)
    err = np.where(both_nan | (a == rounded), 0.0, err)
    return np.where(np.isnan(err), np.inf, err)


def correctly_rounded(actual: np.ndarray, expected: np.ndarray) -> np.ndarray:
    rounded = round_to(actual.dtype, expected)
    a = actual.astype(np.float64)
    return (a == rounded) | (np.isnan(a) & np.isnan(rounded))


def measure(name: str, params: dict, x: np.ndarray, grad: np.ndarray) -> dict:
    row = {}
    y = fn.activation(name, x, **params)
    expected = ref.activation(name, x, **params)
    row["forward"] = float(ulp_error(y, expected).max())
    row["misrounded"] = int((~correctly_rounded(y, expected)).sum())
    gi = fn.activation_backward(name, grad, x=x, **params)
    expected_gi = ref.activation_backward(name, grad, x=x, **params)
    row["backward_x"] = float(ulp_error(gi, expected_gi).max())
    row["misrounded_x"] = int((~correctly_rounded(gi, expected_gi)).sum())
    try:
        gy = fn.activation_backward(name, grad, y=y, **params)
    except ValueError:
        row["backward_y"] = None
    else:
        row["backward_y"] = float(ulp_error(gy, ref.activation_backward(name, grad, y=y, **params)).max())
    return row


def main(argv=None) -> int:
    argparse.ArgumentParser(description=__doc__.splitlines()[0]).parse_args(argv)
    print(f"fusednn {fn.info()['version']}, simd {fn.info()['simd']}; all 65,536 inputs per type; "
          "grad_output uniform in [0.5, 2] rounded to the type")
    failed = []
    for dtype_name, dtype in storage_types().items():
        x = every_value(dtype)
        grad = np.random.default_rng(1).uniform(0.5, 2.0, x.shape).astype(dtype)
        print(f"\n{dtype_name}: max error in ulp of {dtype_name}")
        print("| activation | forward | backward from x | backward from y | misrounded |")
        print("|---|---|---|---|---|")
        for name in fn.ACTIVATIONS:
            for params in [{}] + EXTRA_PARAMS.get(name, []):
                row = measure(name, params, x, grad)
                label = name + ("" if not params else " (" + ",".join(f"{k}={v}" for k, v in params.items()) + ")")
                by = "-" if row["backward_y"] is None else f"{row['backward_y']:.2f}"
                print(f"| {label} | {row['forward']:.2f} | {row['backward_x']:.2f} | {by} | "
                      f"{row['misrounded']} / {row['misrounded_x']} |")
                values = [row["forward"], row["backward_x"]] + ([row["backward_y"]] if row["backward_y"] is not None else [])
                if max(values) > BOUND_ULP:
                    failed.append(f"{dtype_name} {label}: {max(values):.2f} ulp")
    for line in failed:
        print("FAIL", line)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
