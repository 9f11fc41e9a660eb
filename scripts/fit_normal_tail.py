"""Fit the polynomial that gives the normal tail Phi(-t) for t >= 0.

GELU for float32 inputs evaluates Phi(-t) = exp(-t^2/2) * M(t), where the
Mills-type ratio M(t) = Phi(-t) exp(t^2/2) is smooth and slowly varying.
M is fitted as a polynomial in v = (t - 3) / (t + 3) on t in [0, 16]
(beyond 16 every float32 GELU value underflows), minimizing the relative
error. Prints the coefficients (lowest degree first) in the form used by
csrc/include/fusednn/math.h and the fit's maximum relative error.
"""
import math

import numpy as np

DEGREE = 13
CENTER = 3.0


def mills(t):
    return np.array([0.5 * math.erfc(ti / math.sqrt(2.0)) * math.exp(ti * ti / 2.0) for ti in t])


def main():
    t = np.concatenate([np.linspace(0.0, 16.0, 60000), np.linspace(0.0, 2.0, 5000)])
    v = (t - CENTER) / (t + CENTER)
    m = mills(t)
    basis = np.polynomial.chebyshev.chebvander(v, DEGREE) / m[:, None]
    cheb, *_ = np.linalg.lstsq(basis, np.ones_like(m), rcond=None)
    power = np.polynomial.chebyshev.cheb2poly(cheb)
    err = np.max(np.abs(np.polynomial.polynomial.polyval(v, power) / m - 1.0))
    print(f"// max relative error of the fit: {err:.2e}")
    for c in power:
        print(f"    {float(c)!r},")


if __name__ == "__main__":
    main()
