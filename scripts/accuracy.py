"""Measures the float32 kernels' accuracy against the float64 reference.

For every activation, forward and backward (from x, and from y where the
activation allows it), evaluates the kernel on a sweep of float32 inputs
(+-0, subnormals, +-inf, NaN, magnitudes up to 3.4e38, a dense grid over
[-20, 20] and random bit patterns) and prints the largest error in float32
ulp of the reference value. The backward from x runs twice: with gradients
in [0.5, 2], and with large ones, 2^k for k uniform in [0, 127.9] (both
signs), where g f'(x) stays a normal number while f'(x) alone is subnormal
or 0, or where g times a factor of f' would overflow first. Backward errors
near a root of the derivative, where its terms cancel, are also reported
in units of 2^-24 * |grad|, the bound that applies there. Run after
installing:  python scripts/accuracy.py
"""
from __future__ import annotations

import argparse
import sys

import numpy as np

import fusednn as fn
from fusednn import reference as ref

# Parameter sets beyond the defaults that the sweep also covers.
EXTRA_PARAMS = {
    "leaky_relu": [{"negative_slope": 0.2}],
    "elu": [{"alpha": 0.5}],
    "gelu": [{"approximate": "tanh"}],
    "softplus": [{"beta": 2.5, "threshold": 15.0}],
    "hardtanh": [{"min_val": -2.0, "max_val": 0.5}],
}
EXACT = {"relu", "leaky_relu", "hardtanh"}
# Activations whose derivative has a root where its terms cancel (gelu' near
# -0.75, silu' near -1.28, mish' near -1.19). Around it, where the
# derivative is below CANCELLING_BELOW in magnitude, the bound is an
# absolute 8 * 2^-24 * |grad| instead of 4 ulp.
ROOT_CANCELLING = {"gelu", "silu", "mish"}
CANCELLING_BELOW = 0.5


def sweep(seed=0, dense=2_000_001, random_bits=1_000_000) -> np.ndarray:
    f32 = np.finfo(np.float32)
    specials = np.array([0.0, -0.0, np.inf, -np.inf, np.nan, f32.max, -f32.max, f32.tiny, -f32.tiny,
                         1e-45, -1e-45, 1e-40, -1e-40, 3e38, -3e38, 1.0, -1.0, 3.0, -3.0, 20.0,
                         -20.0, 40.0, -40.0, 88.7, -88.7, 104.0, -104.0], dtype=np.float32)
    grid = np.linspace(-20, 20, dense, dtype=np.float32)
    mags = np.logspace(-45, np.log10(3.4e38), 200_001).astype(np.float32)
    rng = np.random.default_rng(seed)
    bits = rng.integers(0, 2**32, random_bits, dtype=np.uint64).astype(np.uint32).view(np.float32)
    return np.concatenate([specials, grid, mags, -mags, bits])


def ulp_error(actual32: np.ndarray, expected64: np.ndarray) -> np.ndarray:
    """|actual - expected| in ulp of expected (rounded to float32); 0 where
    both are the same infinity or both NaN, inf where only one is NaN."""
    a = actual32.astype(np.float64)
    e = expected64
    with np.errstate(all="ignore"):
        e32 = e.astype(np.float32)
        ulp = np.spacing(np.abs(e32)).astype(np.float64)
        ulp = np.where(np.isinf(e32), np.spacing(np.float32(f32max())), ulp)
        err = np.abs(a - e) / ulp
    both_nan = np.isnan(a) & np.isnan(e)
    same_inf = np.isinf(a) & (a == e32)
    err = np.where(both_nan | same_inf, 0.0, err)
    return np.where(np.isnan(err), np.inf, err)


def f32max():
    return np.finfo(np.float32).max


def measure(name: str, params: dict, x: np.ndarray, rng) -> dict:
    row = {}
    with np.errstate(invalid="ignore"):  # the random bit patterns include signalling NaNs
        x = x.astype(np.float64).astype(np.float32)
    y = fn.activation(name, x, **params)
    row["forward"] = float(ulp_error(y, ref.activation(name, x, **params)).max())
    g = rng.uniform(0.5, 2.0, x.shape).astype(np.float32)
    large = (rng.choice([-1.0, 1.0], x.shape) * np.exp2(rng.uniform(0.0, 127.9, x.shape)))
    for key, grad in (("backward_x", g), ("backward_x_large", large.astype(np.float32))):
        with np.errstate(over="ignore"):
            gi = fn.activation_backward(name, grad, x=x, **params)
        expected = ref.activation_backward(name, grad, x=x, **params)
        err = ulp_error(gi, expected)
        if name in ROOT_CANCELLING:
            with np.errstate(all="ignore"):
                abs_units = np.abs(gi.astype(np.float64) - expected) / (2.0**-24 * np.abs(grad))
                slope = ref.activation_backward(name, np.ones_like(x), x=x, **params)
                near_root = (np.abs(slope) < CANCELLING_BELOW) & (x > -5) & (x < 0)
            row[key] = float(np.where(near_root, 0, err).max())
            row["near_root_abs"] = max(row.get("near_root_abs", 0.0),
                                       float(np.where(near_root, abs_units, 0).max()))
        else:
            row[key] = float(err.max())
    try:
        gy = fn.activation_backward(name, g, y=y, **params)
    except ValueError:
        row["backward_y"] = None
    else:
        row["backward_y"] = float(ulp_error(gy, ref.activation_backward(name, g, y=y, **params)).max())
    return row


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a smaller sweep")
    args = parser.parse_args(argv)
    x = sweep(dense=200_001 if args.quick else 2_000_001,
              random_bits=100_000 if args.quick else 1_000_000)
    rng = np.random.default_rng(1)
    print(f"fusednn {fn.info()['version']}, simd {fn.info()['simd']}, {x.size} float32 inputs")
    print("max error in float32 ulp; near-root: max |error| / (2^-24 |grad|) where the "
          f"derivative's terms cancel (|f'| < {CANCELLING_BELOW} around its root; bound 8)")
    print(f"{'activation':<34} {'forward':>8} {'bwd(x)':>8} {'large g':>8} {'bwd(y)':>8}  near-root")
    worst = 0.0
    failed = []
    for name in fn.ACTIVATIONS:
        for params in [{}] + EXTRA_PARAMS.get(name, []):
            row = measure(name, params, x, rng)
            label = name + ("" if not params else " " + ",".join(f"{k}={v}" for k, v in params.items()))
            by = "-" if row["backward_y"] is None else f"{row['backward_y']:.2f}"
            root = f"{row['near_root_abs']:.2f}" if "near_root_abs" in row else ""
            print(f"{label:<34} {row['forward']:8.2f} {row['backward_x']:8.2f} "
                  f"{row['backward_x_large']:8.2f} {by:>8}  {root}")
            values = [row["forward"], row["backward_x"], row["backward_x_large"]] + (
                [row["backward_y"]] if row["backward_y"] is not None else [])
            worst = max(worst, *values)
            if name in EXACT and row["forward"] > 0.5:
                failed.append(f"{label} forward not exact")
            if max(values) > 4:
                failed.append(f"{label}: {max(values):.2f} ulp")
            if row.get("near_root_abs", 0) > 8:
                failed.append(f"{label}: {row['near_root_abs']:.2f} x 2^-24 |grad| near the root")
    print(f"worst: {worst:.2f} ulp (bound 4)")
    for line in failed:
        print("FAIL", line)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
