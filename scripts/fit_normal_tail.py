"""Fit the polynomials of the float32 GELU kernels.

GELU (exact form) evaluates Phi(-t) = exp(-t^2/2) * M(t) in float
arithmetic, where the Mills-type ratio M(t) = Phi(-t) exp(t^2/2) is smooth
and falls like 1 / (t sqrt(2 pi)). M is written as w * K(v) with
w = 8 / (t + 4) and v = 1 - w, so that M's relative error is that of w
(which the kernel carries to twice float precision) and K is a gentle
function of v. K is fitted on t in [0, 16]; beyond 16 every float32 GELU
tail term underflows. The kernels' core range, |x| <= 4, where most inputs
lie, has a K of its own of lower degree.

The tanh form, below |x| = 0.75, is x / 2 + x^2 P(x^2) with derivative
1/2 + x R(x^2), where P = tanh(u) / (2x) and R = (tanh(u) / 2 +
x u' sech^2(u) / 2) / x, u = sqrt(2/pi) (x + 0.044715 x^3).

Every fit is for least maximum relative error, with coefficients that are
float32 values: each is rounded in turn, lowest degree first, and the
higher ones refitted around it. Prints the coefficients (highest degree
first, the order of the kernels' Horner schemes) and each fit's maximum
relative error with the rounded coefficients.
"""
import mpmath
import numpy as np

REWEIGHTING_ROUNDS = 12
mpmath.mp.dps = 30  # in double, erfc, exp and tanh lose the last bits that
                    # decide the rounding of the smallest coefficients

MILLS_DEGREE = 9
SHIFT = 4.0  # w = 2 SHIFT / (t + SHIFT); a power of two keeps w = 8 / d exact
T_MAX = 16.0
CORE_DEGREE = 6
CORE_T_MAX = 4.0

TANH_DEGREE = 6
CENTRAL = 0.75
SQRT_2_OVER_PI = mpmath.sqrt(2 / mpmath.pi)
CUBIC = mpmath.mpf(0.044715)  # the float64 constant, as the reference uses it


def mills(t):
    return np.array([float(mpmath.ncdf(-ti) * mpmath.exp(mpmath.mpf(ti) ** 2 / 2)) for ti in t])


def tanh_ratio(x):
    """P(x^2) = tanh(u) / (2x)."""
    x = mpmath.mpf(x)
    return float(mpmath.tanh(SQRT_2_OVER_PI * (x + CUBIC * x ** 3)) / (2 * x))


def tanh_slope_ratio(x):
    """R(x^2) = (gelu'(x) - 1/2) / x."""
    x = mpmath.mpf(x)
    u = SQRT_2_OVER_PI * (x + CUBIC * x ** 3)
    du = SQRT_2_OVER_PI * (1 + 3 * CUBIC * x ** 2)
    return float((mpmath.tanh(u) / 2 + x * du / (2 * mpmath.cosh(u) ** 2)) / x)


def minimax_relative(basis, rest, target):
    """Coefficients c minimizing max |(basis @ c - rest) / target|
    approximately: least squares reweighted by the error (Lawson's
    iteration)."""
    a = basis / target[:, None]
    b = rest / target
    weight = np.ones_like(target)
    for _ in range(REWEIGHTING_ROUNDS):
        coefficients, *_ = np.linalg.lstsq(a * weight[:, None], b * weight, rcond=None)
        weight = weight * np.sqrt(np.abs(a @ coefficients - b)) + 1e-300  # keeps weights positive
        weight /= weight.mean()
    return coefficients


def fit_float32(variable, target, degree):
    """Polynomial coefficients in `variable`, lowest degree first, each a
    float32 value."""
    powers = np.vander(variable, degree + 1, increasing=True)
    coefficients = np.zeros(degree + 1)
    for fixed in range(degree + 1):
        rest = target - powers[:, :fixed] @ coefficients[:fixed]
        coefficients[fixed:] = minimax_relative(powers[:, fixed:], rest, target)
        coefficients[fixed] = float(np.float32(coefficients[fixed]))
    return coefficients, np.max(np.abs(powers @ coefficients / target - 1.0))


def report(name, coefficients, err):
    print(f"// {name}: max relative error of the fit {err:.2e}")
    for c in coefficients[::-1]:
        print(f"    {str(np.float32(c))}f,")


def main():
    t = np.concatenate([np.linspace(0.0, T_MAX, 20000), np.linspace(0.0, 2.0, 2000)])
    w = 2.0 * SHIFT / (t + SHIFT)
    report("K(v), normal tail", *fit_float32(1.0 - w, mills(t) / w, MILLS_DEGREE))
    t = np.concatenate([np.linspace(0.0, CORE_T_MAX, 8000), np.linspace(0.0, 0.5, 1000)])
    w = 2.0 * SHIFT / (t + SHIFT)
    report("K(v), core range", *fit_float32(1.0 - w, mills(t) / w, CORE_DEGREE))
    x = np.linspace(1e-4, CENTRAL, 3000)
    report("P(x^2), gelu tanh", *fit_float32(x * x, np.array([tanh_ratio(v) for v in x]), TANH_DEGREE))
    report("R(x^2), gelu tanh derivative",
           *fit_float32(x * x, np.array([tanh_slope_ratio(v) for v in x]), TANH_DEGREE))


if __name__ == "__main__":
    main()
