"""Fit the polynomials of the float32 GELU kernels.

GELU (exact form) evaluates Phi(-t) = exp(-t^2/2) * M(t) in float
arithmetic, where the Mills-type ratio M(t) = Phi(-t) exp(t^2/2) is smooth
and falls like 1 / (t sqrt(2 pi)). M is written as w * K(v) with
w = 8 / (t + 4) and v = 1 - w, so that M's relative error is that of w
(which the kernel carries to twice float precision) and K is a gentle
function of v. K is fitted on t in [0, 16]; beyond 16 every float32 GELU
tail term underflows.

The kernels' core range, |x| <= 4, where most inputs lie, takes no
division: Phi(-t) = e^(c - (t^2 + t) / 2) / 2 and Phi(-t) - t phi(t) =
(t0 - t) e^(c - t^2 / 2) / 2, t0 the root of gelu' at -t0, each with a
polynomial c in s = t - 2 inside the exponential: c = log M + ln 2 + t / 2
and c = log(2 G), G = (M(t) - t / sqrt(2 pi)) / (t0 - t). Both are fitted
for least maximum absolute error (an absolute error in the exponent is
the same relative error in the result) on the float32 values of s, with
a quadratic estimate of each (from which the kernels pick the exponential's
reduction before c is ready). The exponential's polynomial, e^(u/2) - 1 =
u q(u), is fitted for least relative error on |u| <= 0.75, the reduced
range that the estimates leave.

The tanh form, below |x| = 0.75, is x / 2 + x^2 P(x^2) with derivative
1/2 + x R(x^2), where P = tanh(u) / (2x) and R = (tanh(u) / 2 +
x u' sech^2(u) / 2) / x, u = sqrt(2/pi) (x + 0.044715 x^3).

With --pieces, the piecewise core of GELU's float32 forward on the CPU
(GeluErf::forward_core_pieces): Phi(-t) on 0 <= t < 3.875 as 16
polynomials of degree 6, piece i = round(4t) in s = 4t - i (exact, |s| <=
1/2), each fitted for least maximum relative error on the float32 values
of t in its piece, coefficients rounded to float32 in turn. Printed
negated, as the kernel's table holds them (-t times the polynomial joins
x or -0 in one fused multiply-add).

With --half, the coarser fits of GELU's forward for float16 and bfloat16
storage instead (GeluErfHalf): log2 Phi(-t) and the log2 of the
derivative's S(t) / (t0 - t) as polynomials in t, and the base-2
exponential's polynomial; and the polynomial of 2^f - 1 that the other
half-type cores' exponential takes (math::exp_coarse_parts).

Every other fit is for least maximum relative error, with coefficients
that are float32 values: each is rounded in turn, lowest degree first, and the
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
CORE_T_MAX = 4.0
CORE_CENTER = 2.0  # s = t - 2 is exact for t >= 1
MILLS_EXPONENT_DEGREE = 10
SLOPE_EXPONENT_DEGREE = 11
CORE_REWEIGHTING_ROUNDS = 14
ESTIMATE_REWEIGHTING_ROUNDS = 30
EXP_DEGREE = 5
EXP_REDUCED = 0.75

PIECE_COUNT = 16
PIECES_PER_UNIT = 4  # pieces of width 1/4: s = 4t - i is exact
PIECE_DEGREE = 6
PIECE_SAMPLES = 2000

HALF_LOG2_TAIL_DEGREE = 5
HALF_LOG2_SLOPE_DEGREE = 7
HALF_EXP2_DEGREE = 4
HALF_EXPM1_DEGREE = 4  # f P(f), P of degree 3

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


def minimax_relative(basis, rest, target, rounds=REWEIGHTING_ROUNDS):
    """Coefficients c minimizing max |(basis @ c - rest) / target|
    approximately: least squares reweighted by the error (Lawson's
    iteration)."""
    a = basis / target[:, None]
    b = rest / target
    weight = np.ones_like(target)
    for _ in range(rounds):
        coefficients, *_ = np.linalg.lstsq(a * weight[:, None], b * weight, rcond=None)
        weight = weight * np.sqrt(np.abs(a @ coefficients - b)) + 1e-300  # keeps weights positive
        weight /= weight.mean()
    return coefficients


def fit_float32(variable, target, degree, rounds=REWEIGHTING_ROUNDS, absolute=False):
    """Polynomial coefficients in `variable`, lowest degree first, each a
    float32 value; for least absolute error where `absolute` is set."""
    powers = np.vander(variable, degree + 1, increasing=True)
    coefficients = np.zeros(degree + 1)
    scale = np.ones_like(target) if absolute else target
    for fixed in range(degree + 1):
        rest = target - powers[:, :fixed] @ coefficients[:fixed]
        coefficients[fixed:] = minimax_relative(powers[:, fixed:], rest, scale, rounds)
        coefficients[fixed] = float(np.float32(coefficients[fixed]))
    return coefficients, np.max(np.abs((powers @ coefficients - target) / scale))


def estimate(variable, target, degree):
    """Least maximum absolute error, float64 coefficients (lowest degree
    first), and that error."""
    powers = np.vander(variable, degree + 1, increasing=True)
    weight = np.ones_like(target)
    for _ in range(ESTIMATE_REWEIGHTING_ROUNDS):
        coefficients, *_ = np.linalg.lstsq(powers * weight[:, None], target * weight, rcond=None)
        weight = weight * np.sqrt(np.abs(powers @ coefficients - target)) + 1e-30
        weight /= weight.mean()
    return coefficients, np.max(np.abs(powers @ coefficients - target))


def gelu_slope_root():
    """t0 > 0 with Phi(-t0) = t0 phi(t0): gelu'(-t0) = 0."""
    return mpmath.findroot(lambda s: mills_mp(s) - s / mpmath.sqrt(2 * mpmath.pi), 0.75)


def mills_mp(t):
    t = mpmath.mpf(float(t)) if not isinstance(t, mpmath.mpf) else t
    return mpmath.ncdf(-t) * mpmath.exp(t * t / 2)


def mills_exponent(t):
    """log M(t) + ln 2 + t / 2."""
    return np.array([float(mpmath.log(mills_mp(ti)) + mpmath.log(2) + mpmath.mpf(float(ti)) / 2)
                     for ti in t])


def slope_exponent(t, root):
    """log(2 G(t)), G = (M(t) - t / sqrt(2 pi)) / (t0 - t) (its limit at t0)."""
    def difference(s):
        return mills_mp(s) - s / mpmath.sqrt(2 * mpmath.pi)
    out = []
    for ti in t:
        ti = mpmath.mpf(float(ti))
        g = difference(ti) / (root - ti) if abs(ti - root) > 1e-10 else -mpmath.diff(difference, root)
        out.append(float(mpmath.log(2 * g)))
    return np.array(out)


def report(name, coefficients, err):
    print(f"// {name}: max relative error of the fit {err:.2e}")
    for c in coefficients[::-1]:
        print(f"    {str(np.float32(c))}f,")


def main():
    t = np.concatenate([np.linspace(0.0, T_MAX, 20000), np.linspace(0.0, 2.0, 2000)])
    w = 2.0 * SHIFT / (t + SHIFT)
    report("K(v), normal tail", *fit_float32(1.0 - w, mills(t) / w, MILLS_DEGREE))
    root = gelu_slope_root()
    root_hi = np.float32(float(root))
    print(f"// t0 = {str(root_hi)}f + {str(np.float32(float(root - mpmath.mpf(float(root_hi)))))}f")
    t = np.concatenate([np.linspace(0.0, CORE_T_MAX, 4000), np.linspace(0.0, 0.6, 400)])
    t = t.astype(np.float32).astype(np.float64)
    s = (t.astype(np.float32) - np.float32(CORE_CENTER)).astype(np.float64)  # as the kernels round it
    for name, target, degree in (("mills_exponent", mills_exponent(t), MILLS_EXPONENT_DEGREE),
                                 ("slope_exponent", slope_exponent(t, root), SLOPE_EXPONENT_DEGREE)):
        coefficients, err = fit_float32(s, target, degree, CORE_REWEIGHTING_ROUNDS, absolute=True)
        print(f"// {name}(s): max absolute error of the fit {err:.2e}")
        for c in coefficients[::-1]:
            print(f"    {str(np.float32(c))}f,")
        grid = np.linspace(0.0, CORE_T_MAX, 2001)
        fn = mills_exponent(grid) if name == "mills_exponent" else slope_exponent(grid, root)
        rough, rough_err = estimate(grid - CORE_CENTER, fn, 2)
        print(f"// its quadratic estimate, max absolute error {rough_err:.3f}:")
        print("    " + ", ".join(f"{str(np.float32(c))}f" for c in rough[::-1]))
    u = np.linspace(-EXP_REDUCED, EXP_REDUCED, 20001)
    u = u[np.abs(u) > 1e-6]
    ratio = np.array([float(mpmath.expm1(mpmath.mpf(v) / 2) / mpmath.mpf(v)) for v in u])
    report("q(u), e^(u/2) - 1 = u q(u)", *fit_float32(u, ratio, EXP_DEGREE, CORE_REWEIGHTING_ROUNDS))
    x = np.linspace(1e-4, CENTRAL, 3000)
    report("P(x^2), gelu tanh", *fit_float32(x * x, np.array([tanh_ratio(v) for v in x]), TANH_DEGREE))
    report("R(x^2), gelu tanh derivative",
           *fit_float32(x * x, np.array([tanh_slope_ratio(v) for v in x]), TANH_DEGREE))


def half_fits():
    """The coarser fits of GELU for float16 and bfloat16 storage
    (GeluErfHalf, math::exp2_coarse), whose results need about 2^-12
    relative accuracy before their final rounding: Q(t) = log2 Phi(-t) and
    log2((Phi(-t) - t phi(t)) / (t0 - t)) on [0, 4] for least absolute error
    (an absolute error in the exponent is the same relative error, times
    ln 2, in the result), and 2^f - 1 = f p(f) on |f| <= 1/2 for least
    relative error of 2^f; and for the other half-type forms
    (math::exp_coarse_parts) 2^f - 1 = f P(f) for least relative error of
    2^f - 1 itself."""
    t = np.linspace(0.0, CORE_T_MAX, 4001).astype(np.float32).astype(np.float64)
    log2_tail = np.array([float(mpmath.log(mpmath.ncdf(-mpmath.mpf(float(v))), 2)) for v in t])
    coefficients, err = fit_one_plus(t, log2_tail + 1.0, np.ones_like(t), HALF_LOG2_TAIL_DEGREE)
    print(f"// log2_tail(t) = -1 + t p(t): max absolute error of the fit {err:.2e}")
    for c in coefficients[::-1]:
        print(f"    {str(np.float32(c))}f,")
    root = gelu_slope_root()
    log2_slope = slope_exponent(t, root) / np.log(2.0) - t * t / (2.0 * np.log(2.0)) - 1.0
    coefficients, err = fit_float32(t, log2_slope, HALF_LOG2_SLOPE_DEGREE, CORE_REWEIGHTING_ROUNDS,
                                    absolute=True)
    print(f"// log2_slope(t) = log2((Phi(-t) - t phi(t)) / (t0 - t)): max absolute error of the "
          f"fit {err:.2e}")
    for c in coefficients[::-1]:
        print(f"    {str(np.float32(c))}f,")
    f = np.linspace(-0.5, 0.5, 20001)
    f = f[np.abs(f) > 1e-6]
    exp2 = np.array([float(mpmath.power(2, mpmath.mpf(v))) for v in f])
    report("2^f = 1 + f p(f), exp2_coarse", *fit_one_plus(f, exp2 - 1.0, exp2, HALF_EXP2_DEGREE))
    report("2^f - 1 = f P(f), exp_coarse_parts",
           *fit_one_plus(f, exp2 - 1.0, exp2 - 1.0, HALF_EXPM1_DEGREE))


def tail_pieces():
    """Phi(-t) = P_i(s), s = 4t - i, i = round(4t), for t in [0, 3.875):
    each piece fitted for least maximum relative error on the float32 t of
    [(i - 1/2) / 4, (i + 1/2) / 4] (t >= 0), float32 coefficients. Prints
    the negated coefficients, degree 0 first, one row of 16 pieces per
    degree, and the largest relative error of a piece."""
    rows = np.zeros((PIECE_DEGREE + 1, PIECE_COUNT))
    worst = 0.0
    for i in range(PIECE_COUNT):
        low = max(0.0, (i - 0.5) / PIECES_PER_UNIT)
        high = (i + 0.5) / PIECES_PER_UNIT
        t = np.unique(np.linspace(low, high, PIECE_SAMPLES).astype(np.float32)).astype(np.float64)
        s = PIECES_PER_UNIT * t - i
        tail = np.array([float(mpmath.ncdf(-mpmath.mpf(float(v)))) for v in t])
        coefficients, err = fit_float32(s, tail, PIECE_DEGREE, CORE_REWEIGHTING_ROUNDS)
        rows[:, i] = -coefficients
        worst = max(worst, err)
    print(f"// -Phi(-t) in {PIECE_COUNT} pieces of degree {PIECE_DEGREE}: max relative error of "
          f"the fit {worst:.2e}")
    for row in rows:
        print("    {" + ", ".join(f"{str(np.float32(c))}f" for c in row) + "},")


def fit_one_plus(variable, target, scale, degree):
    """target = v p(v), p of degree - 1 with float32 coefficients (lowest
    degree first), for least maximum error relative to `scale`: the
    constant term of the approximated function stays exact (-1 for
    log2 Phi(-t), so that Phi(-t) rounds below 1/2 for every t > 0 that
    float16 holds, and x Phi(x) falls on the right side of the storage
    type's ties near zero; 1 for 2^f)."""
    powers = np.vander(variable, degree, increasing=True) * variable[:, None]  # v, v^2, ...
    coefficients = np.zeros(degree)
    for fixed in range(degree):
        rest = target - powers[:, :fixed] @ coefficients[:fixed]
        coefficients[fixed:] = minimax_relative(powers[:, fixed:], rest, scale,
                                                CORE_REWEIGHTING_ROUNDS)
        coefficients[fixed] = float(np.float32(coefficients[fixed]))
    return coefficients, np.max(np.abs((powers @ coefficients - target) / scale))


if __name__ == "__main__":
    import sys
    if sys.argv[1:] == ["--half"]:
        half_fits()
    elif sys.argv[1:] == ["--pieces"]:
        tail_pieces()
    else:
        main()
