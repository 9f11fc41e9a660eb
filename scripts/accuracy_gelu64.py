"""Measures float64 GELU (erf form), forward and backward, against mpmath.

The float32 sweep of scripts/accuracy.py takes the float64 reference as its
truth; this script checks that truth itself, and the float64 kernel, against
Phi(x) and phi(x) evaluated by mpmath with 160-bit precision. Inputs: a dense
grid over [-40, 40], a denser one over [-38.7, -37.3] (where x Phi(x) and
Phi(x) + x phi(x) are subnormal), random points of [-40, 0], magnitudes from
the smallest subnormal to the largest double, and +-0, +-inf, NaN. Errors are
in ulp of the exact value, an ulp being 2^-1074 in the subnormal range; where
the derivative's terms cancel (|Phi + x phi| < (|Phi| + |x phi|) / 2, around
its root near -0.75) the backward error is reported instead in units of
2^-53 |grad|. Needs mpmath (not a dependency of fusednn). Run after
installing:
  python scripts/accuracy_gelu64.py [--quick] [--cuda]
"""
from __future__ import annotations

import argparse
import sys

import mpmath
import numpy as np

import fusednn as fn
from fusednn import reference as ref

mpmath.mp.prec = 160
BOUND = 4.0


def inputs(dense: int, band: int, random: int, seed: int = 0) -> np.ndarray:
    specials = np.array([0.0, -0.0, np.inf, -np.inf, np.nan, 5e-324, -5e-324,
                         2.2250738585072014e-308, -2.2250738585072014e-308, 1e-300, -1e-300,
                         1e-8, -1e-8, 1.0, -1.0,
                         -0.7517915241, -7.0, -30.0, -37.5, -37.9497, -38.5, -38.7, -39.0, 38.5,
                         39.0, 40.0, -40.0, 100.0, -100.0, 1e10, -1e10, 1.3e154, -1.3e154,
                         1.4e154, -1.4e154, 1e300, -1e300, 1.7976931348623157e308,
                         -1.7976931348623157e308])
    mags = np.exp2(np.linspace(-1074.0, 1023.99, 4001))
    rng = np.random.default_rng(seed)
    return np.concatenate([specials, np.linspace(-40.0, 40.0, dense),
                           np.linspace(-38.7, -37.3, band), rng.uniform(-40.0, 0.0, random),
                           mags, -mags])


def ulp_of(value: mpmath.mpf) -> mpmath.mpf:
    """The spacing of doubles at |value|, 2^-1074 below 2^-1022."""
    if value == 0:
        return mpmath.ldexp(1, -1074)
    _, exponent = mpmath.frexp(value)  # |value| in [2^(exponent-1), 2^exponent)
    return mpmath.ldexp(1, max(exponent - 1, -1022) - 52)


def exact_gelu(x: float, g: float):
    """(x Phi(x), g (Phi(x) + x phi(x)), whether Phi and x phi cancel), the
    first two as mpmath numbers, or the floats the kernels must return for
    non-finite x."""
    if np.isnan(x):
        return np.nan, np.nan, False
    if np.isinf(x):
        return (x if x > 0 else np.nan), np.nan, False  # x * Phi(x); the slope has inf * 0
    v = mpmath.mpf(x)
    pdf = mpmath.exp(-v * v / 2) / mpmath.sqrt(2 * mpmath.pi)
    if abs(v) < 1e6:
        cdf = mpmath.erfc(-v / mpmath.sqrt(2)) / 2
    else:
        # mpmath's erfc fails on such arguments; the tail's asymptotic series
        # phi(v) / |v| (1 - 1 / v^2) is exact to 3 / v^4 relative.
        tail = pdf / abs(v) * (1 - 1 / (v * v))
        cdf = tail if v < 0 else 1 - tail
    cancels = 2 * abs(cdf + v * pdf) < abs(cdf) + abs(v * pdf)
    return v * cdf, mpmath.mpf(g) * (cdf + v * pdf), cancels


def error(actual: float, expected, grad: float = 1.0):
    """(error in ulp, error in 2^-53 |grad|); NaN and infinities must match."""
    if not isinstance(expected, mpmath.mpf):
        same = (np.isnan(expected) and np.isnan(actual)) or actual == expected
        return (0.0 if same else np.inf), 0.0
    if not np.isfinite(actual):
        return np.inf, np.inf
    diff = abs(mpmath.mpf(actual) - expected)
    return float(diff / ulp_of(expected)), float(diff / (mpmath.ldexp(1, -53) * abs(grad)))


def measure(x: np.ndarray, g: np.ndarray, truths, forward: np.ndarray, backward: np.ndarray):
    worst = {key: (0.0, float("nan")) for key in ("forward", "backward", "near_root")}

    def note(key, err, at):
        if err > worst[key][0]:
            worst[key] = (err, at)

    for xi, gi, (f, d, cancels), yf, yb in zip(x, g, truths, forward, backward):
        note("forward", error(yf, f)[0], xi)
        ulps, units = error(yb, d, gi)
        if cancels:
            note("near_root", units, xi)
        else:
            note("backward", ulps, xi)
    return worst


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a smaller sweep")
    parser.add_argument("--cuda", action="store_true", help="also the CUDA kernel (needs CuPy)")
    args = parser.parse_args(argv)
    scale = 10 if args.quick else 1
    x = inputs(dense=400_001 // scale, band=100_001 // scale, random=100_000 // scale)
    g = np.random.default_rng(1).uniform(0.5, 2.0, x.shape)
    truths = [exact_gelu(float(xi), float(gi)) for xi, gi in zip(x, g)]
    print(f"fusednn {fn.info()['version']}, simd {fn.info()['simd']}, {x.size} float64 inputs")
    print("max error in ulp (2^-1074 in the subnormal range); near-root: max |error| / "
          "(2^-53 |grad|) where Phi + x phi cancels by a factor 2 or more")
    print(f"{'gelu float64':<12} {'forward':>20} {'backward':>20} {'near-root':>20}")
    rows = [("kernel", fn.activation("gelu", x), fn.activation_backward("gelu", g, x=x)),
            ("reference", ref.activation("gelu", x), ref.activation_backward("gelu", g, x=x))]
    if args.cuda:
        import cupy
        xd, gd = cupy.asarray(x), cupy.asarray(g)
        rows.insert(1, ("kernel CUDA", cupy.asnumpy(fn.activation("gelu", xd)),
                        cupy.asnumpy(fn.activation_backward("gelu", gd, x=xd))))
    failed = []
    for label, forward, backward in rows:
        worst = measure(x, g, truths, forward, backward)
        cells = [f"{err:7.2f} (x={at:.6g})" for err, at in worst.values()]
        print(f"{label:<12} " + " ".join(f"{c:>20}" for c in cells))
        for key, (err, at) in worst.items():
            if err > BOUND:
                failed.append(f"{label} {key}: {err:.2f} at x = {at!r}")
    for line in failed:
        print("FAIL", line)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
