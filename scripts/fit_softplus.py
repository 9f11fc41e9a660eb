"""Fit the polynomial of the float32 softplus kernel.

softplus(x) = max(x, 0) + log1p(e) with e = exp(-|x|) in (0, 1]. The
kernel forms log1p(e) = e G(e) without a logarithm or a division, G(e) =
log1p(e) / e = 1 + e Q(e) a polynomial in e with constant term exactly 1,
so that the last fused multiply-add of its Horner scheme adds the
dominant term exactly and rounds once. G falls from 1 to ln 2 on [0, 1]
and its nearest singularity is at e = -1, so a polynomial of modest degree
reaches float32 precision over the whole interval.

The fit is for least maximum relative error of G with float32
coefficients, rounded lowest degree first as in fit_normal_tail.py. Prints
the coefficients highest degree first (Horner order), the constant 1
omitted, and the fit's maximum relative error with the rounded
coefficients.
"""
import mpmath
import numpy as np

from fit_normal_tail import minimax_relative

DEGREE = 9
mpmath.mp.dps = 30


def log1p_ratio(e):
    return np.array([float(mpmath.log1p(mpmath.mpf(v)) / v) if v > 0 else 1.0 for v in e])


def main():
    e = np.concatenate([np.linspace(0.0, 1.0, 20000), np.geomspace(1e-6, 0.05, 2000)])
    target = log1p_ratio(e)
    powers = np.vander(e, DEGREE + 1, increasing=True)[:, 1:]
    coefficients = np.zeros(DEGREE)
    for fixed in range(DEGREE):
        rest = target - 1.0 - powers[:, :fixed] @ coefficients[:fixed]
        coefficients[fixed:] = minimax_relative(powers[:, fixed:], rest, target)
        coefficients[fixed] = float(np.float32(coefficients[fixed]))
    err = np.max(np.abs((1.0 + powers @ coefficients) / target - 1.0))
    print(f"// G(e) = 1 + e Q(e), degree {DEGREE}: max relative error of the fit {err:.2e}")
    for c in coefficients[::-1]:
        print(f"    {str(np.float32(c))}f,")


if __name__ == "__main__":
    main()
