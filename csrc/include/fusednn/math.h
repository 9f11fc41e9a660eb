// Elementary functions for the kernels, written once for float and double,
// for the host and the device. They are branch-free (selects, no loops or
// table look-ups, but for lookup16, whose callers the CPU evaluates a vector
// at a time: cpu/lanes.h) so that a CPU loop calling them vectorizes, and they keep
// their accuracy over the whole input range: exp is within about 1 ulp,
// expm1 and log1p keep relative accuracy near zero. Special values follow
// IEEE: NaN in gives NaN out, overflow gives infinity, underflow degrades
// through the subnormals.
#pragma once

#include "fusednn/config.h"

namespace fusednn {
namespace math {

template <class T> struct Traits;

template <> struct Traits<float> {
  using Bits = uint32_t;
  using SBits = int32_t;
  static constexpr int kMantissaBits = 23;
  static constexpr int kExponentBias = 127;
  // Adding 1.5 * 2^23 rounds to an integer and leaves it in the low bits.
  static constexpr float kRoundShifter = 12582912.0f;
  static constexpr float kLn2Hi = 0.693147182464599609375f;
  static constexpr float kLn2Lo = -1.904654299957768e-09f;
  // exp_scaled returns e^x * 2^kExpScale, which is a normal number for every
  // x in [kExpMin, kExpMax]; below kExpMin e^x rounds to 0 anyway.
  static constexpr float kMaxFinite = 3.40282347e+38f;
  static constexpr int kExpScale = 64;
  static constexpr float kExpScaleValue = 18446744073709551616.0f;  // 2^64
  static constexpr float kExpUnscale = 5.42101086242752217e-20f;    // 2^-64
  static constexpr float kExpMin = -112.0f;
  // x e^x and its derivative are 0 (or NaN for -inf) below this.
  static constexpr float kNegligibleBelow = -200.0f;
  static constexpr float kExpMax = 44.0f;
  // expm1(x) rounds to -1 below this.
  static constexpr float kExpm1Min = -30.0f;
};

template <> struct Traits<double> {
  using Bits = uint64_t;
  using SBits = int64_t;
  static constexpr int kMantissaBits = 52;
  static constexpr int kExponentBias = 1023;
  static constexpr double kRoundShifter = 6755399441055744.0;  // 1.5 * 2^52
  static constexpr double kLn2Hi = 0x1.62e42fefa39efp-1;
  static constexpr double kLn2Lo = 0x1.abc9e3b39803fp-56;
  static constexpr double kMaxFinite = 1.7976931348623157e308;
  static constexpr int kExpScale = 600;
  static constexpr double kExpScaleValue = 0x1p600;
  static constexpr double kExpUnscale = 0x1p-600;
  static constexpr double kExpMin = -760.0;
  static constexpr double kNegligibleBelow = -800.0;
  static constexpr double kExpMax = 290.0;
  static constexpr double kExpm1Min = -60.0;
};

template <class T> FUSEDNN_HD T from_bits(typename Traits<T>::Bits b);
template <> FUSEDNN_HD float from_bits<float>(uint32_t b) { return float_from_bits(b); }
template <> FUSEDNN_HD double from_bits<double>(uint64_t b) { return double_from_bits(b); }

template <class T> FUSEDNN_HD bool is_nan(T x) { return x != x; }

template <class T> FUSEDNN_HD T abs_(T x) { return x < T(0) ? -x : x; }  // -0 -> -0 is fine here

// c x^n + next x^(n-1) + ... by Horner's scheme, coefficients from the
// highest degree down: one fused multiply-add per degree, in that order,
// so every polynomial here rounds the same way wherever it is evaluated.
template <class T> FUSEDNN_HD T horner(T, T constant) { return constant; }
template <class T, class... Lower> FUSEDNN_HD T horner(T x, T c, T next, Lower... lower) {
  return horner(x, fmadd(c, x, next), lower...);
}

// |x| by clearing the sign bit: one instruction where abs_ takes a compare
// and a select (NaN keeps its payload, -0 becomes +0).
FUSEDNN_HD float magnitude(float x) { return float_from_bits(bits_of(x) & 0x7fffffffu); }

// x where x >= 0 (and NaN), -0 below zero: the addend that keeps the sign
// of GELU's zeros. As written, x86 vector code takes it as one maximum,
// max(-0, x), which returns its second operand x for zeros and NaN.
FUSEDNN_HD float keep_nonnegative(float x) { return x < 0.0f ? -0.0f : x; }

// table[index mod 16]: a coefficient of one of 16 polynomial pieces
// (activations.h), as the CPU's vector permutes look it up (cpu/lanes.h).
// Not for the GPU, whose device code cannot read a host table.
inline float lookup16(const float* table, uint32_t index) { return table[index & 15u]; }

template <class T> FUSEDNN_HD T copysign_(T magnitude, T sign_source) {
  using Tr = Traits<T>;
  constexpr typename Tr::Bits sign_bit = typename Tr::Bits(1) << (sizeof(T) * 8 - 1);
  return from_bits<T>((bits_of(magnitude) & ~sign_bit) | (bits_of(sign_source) & sign_bit));
}

// 2^k for k in the normal exponent range.
template <class T> FUSEDNN_HD T pow2i(typename Traits<T>::SBits k) {
  using Tr = Traits<T>;
  using Bits = typename Tr::Bits;
  return from_bits<T>(static_cast<Bits>(k + Tr::kExponentBias) << Tr::kMantissaBits);
}

// The integer n that `shifted` = n + kRoundShifter (a sum already rounded
// to T) holds in its low bits: sets kf = n as a T and returns n.
template <class T>
FUSEDNN_HD typename Traits<T>::SBits unshift(T shifted, T& kf) {
  using Tr = Traits<T>;
  kf = shifted - Tr::kRoundShifter;
  return static_cast<typename Tr::SBits>(bits_of(shifted) - bits_of(Tr::kRoundShifter));
}

// Cody-Waite reduction x = k ln2 + r with |r| <= ln2/2 (plus rounding);
// returns r and sets k.
template <class T>
FUSEDNN_HD T reduce_ln2(T x, T& kf, typename Traits<T>::SBits& k) {
  using Tr = Traits<T>;
  k = unshift(x * T(1.4426950408889634) + Tr::kRoundShifter, kf);
  T r = fmadd(kf, -Tr::kLn2Hi, x);
  return fmadd(kf, -Tr::kLn2Lo, r);
}

// e^r - 1 for |r| <= 0.35: Taylor series, to degree 8 (float) or 14 (double),
// whose truncation error is far below half an ulp.
FUSEDNN_HD float expm1_reduced(float r) {
  const float p = horner(
      r, 1.0f / 40320, 1.0f / 5040, 1.0f / 720, 1.0f / 120, 1.0f / 24, 1.0f / 6, 0.5f);
  return fmadd(p, r * r, r);
}

FUSEDNN_HD double expm1_reduced(double r) {
  const double p = horner(
      r, 1.0 / 87178291200.0, 1.0 / 6227020800.0, 1.0 / 479001600.0, 1.0 / 39916800.0,
      1.0 / 3628800.0, 1.0 / 362880.0, 1.0 / 40320.0, 1.0 / 5040.0, 1.0 / 720.0, 1.0 / 120.0,
      1.0 / 24.0, 1.0 / 6.0, 0.5);
  return fmadd(p, r * r, r);
}

// e^x * 2^kExpScale for x <= kExpMax (larger x is clamped). The extra
// scale keeps results whose e^x is subnormal in the normal range, so a
// caller that multiplies e^x by a large factor (silu, mish) rounds only once,
// when it finally multiplies by kExpUnscale. NaN propagates.
template <class T> FUSEDNN_HD T exp_scaled_clamped(T xc);

template <class T> FUSEDNN_HD T exp_scaled(T x) {
  using Tr = Traits<T>;
  const T xc = x < Tr::kExpMin ? Tr::kExpMin : x;
  return exp_scaled_clamped(xc > Tr::kExpMax ? Tr::kExpMax : xc);
}

// exp_scaled for x <= 0 (-|x| and the like): one clamp fewer.
template <class T> FUSEDNN_HD T exp_scaled_nonpositive(T x) {
  return exp_scaled_clamped(x < Traits<T>::kExpMin ? Traits<T>::kExpMin : x);
}

// exp_scaled on an argument already inside [kExpMin, kExpMax] (or NaN).
template <class T> FUSEDNN_HD T exp_scaled_clamped(T xc) {
  using Tr = Traits<T>;
  using SBits = typename Tr::SBits;
  T kf;
  SBits k;
  const T r = reduce_ln2(xc, kf, k);
  const T p = expm1_reduced(r) + T(1);
  return p * pow2i<T>(k + Tr::kExpScale);
}

// e^x for x <= kExpMax (44 in float, 290 in double; larger x is clamped):
// within about 1 ulp, subnormal results rounded once, NaN propagates. Every
// caller's argument is bounded this way.
template <class T> FUSEDNN_HD T exp_(T x) { return exp_scaled(x) * Traits<T>::kExpUnscale; }

// e^x * 2^kExpScale (of T) in double, from the exponential evaluated in T,
// and exactly 0 below kExpMin. For float input the float exponential
// (within about 1 ulp) becomes exact in double, so the arithmetic that
// follows can run in double and round once, while the costly part stays
// in float; for double input the scale keeps the subnormal tail.
template <class T> FUSEDNN_HD double exp_scaled_wide(T x) {
  return x < Traits<T>::kExpMin ? 0.0 : double(exp_scaled(x));
}

// e^-(hi + lo) * 2^64 in float, left unrounded as scale * (1 + m1) with
// scale a power of two, for 0 <= hi <= 128 and |lo| <= ulp(hi): the
// callers fold (1 + m1) into their next fused multiply-add, which saves
// the rounding of the exponential itself, and the scale keeps results far
// into the subnormal range exact until their final multiply by 2^-64.
struct ExpParts {
  float scale;
  float m1;
  // scale (1 + m1) rounded once.
  FUSEDNN_HD float rounded() const { return fmadd(scale, m1, scale); }
};

// e^-(hi + lo) = 2^k (1 + m1), returning m1 and setting k, for the
// argument pair of exp_neg_pair_parts; the two forms below differ only in
// the type and offset of their scale 2^k.
FUSEDNN_HD float exp_neg_pair_mantissa(float hi, float lo, int32_t& k) {
  float kf;
  const float r = reduce_ln2(-hi, kf, k);
  const float p = expm1_reduced(r);
  // (1 + p) e^-lo = 1 + (p - lo - p lo) to within lo^2.
  return fmadd(-p, lo, p - lo);
}

FUSEDNN_HD ExpParts exp_neg_pair_parts(float hi, float lo) {
  int32_t k;
  const float m1 = exp_neg_pair_mantissa(hi, lo, k);
  return {pow2i<float>(k + Traits<float>::kExpScale), m1};
}

// e^-(hi + lo) as scale (1 + m1), scale = 2^k a double, for an argument
// pair as exp_neg_pair_parts takes it, hi clamped to [0, kWideExpMax] (NaN
// passes). Where a gradient g times the derivative is a normal float while
// the derivative alone is not (e^-hi below 2^-126, hi > 87; or g times a
// factor of it overflows first), the float scales of ExpParts run out: 2^64
// keeps e^-hi normal only to hi = 131, and g up to 2^128 leaves g e^-hi a
// nonzero float to hi = 176 (more with a polynomial factor). The double
// scale reaches e^-700 and is exact, so that the derivative's float
// factors, times it and times g (times_wide), round once.
struct WideExpParts {
  double scale;
  float m1;
  // scale (1 + m1) in double, without rounding 1 + m1 to float.
  FUSEDNN_HD double value() const { return fmadd(double(m1), scale, scale); }
  // The same rounded to float: 0 or subnormal far down, for the sums with 1
  // that the derivatives' ratios take.
  FUSEDNN_HD float rounded() const { return float(value()); }
};

// Beyond this argument every derivative here times any float g rounds to
// 0 (e^-700 = 2^-1010 times g <= 2^128 and polynomial factors below 2^20),
// and 2^k stays a normal double.
constexpr float kWideExpMax = 700.0f;

FUSEDNN_HD WideExpParts exp_neg_pair_wide(float hi, float lo) {
  const bool clamped = hi > kWideExpMax;
  // Past the clamp lo (a rounding error of a larger hi) no longer belongs
  // to the argument.
  int32_t k;
  const float m1 = exp_neg_pair_mantissa(clamped ? kWideExpMax : hi, clamped ? 0.0f : lo, k);
  return {pow2i<double>(int64_t(k)), m1};
}
FUSEDNN_HD WideExpParts exp_neg_wide(float t) { return exp_neg_pair_wide(t, 0.0f); }

// g d rounded once to float, for a derivative d formed in double from
// float factors and a WideExpParts scale: neither g d's overflow where it
// is finite nor a subnormal d's lost bits reach the result. An infinite g
// gives g times d rounded to float, as a float derivative would: NaN where
// d rounds to 0 (PyTorch forms the derivative first).
FUSEDNN_HD float times_wide(float g, double d) {
  const float product = float(double(g) * d);
  return magnitude(g) <= Traits<float>::kMaxFinite ? product : g * float(d);
}

// The core-range exponentials below serve the activations' core
// evaluations (see activations.h), whose arguments keep e^-x far from the
// subnormals: no 2^64 offset, no clamps, and degree-7 polynomials, whose
// truncation error (0.347^8 / 8! = 5.3e-9) is far below half an ulp of
// 1 + m1.

// e^-x for |x| <= 80 as scale * (1 + m1), left unrounded.
FUSEDNN_HD ExpParts exp_neg_core(float x) {
  using Tr = Traits<float>;
  float kf;
  const int32_t k = unshift(fmadd(x, -1.4426950408889634f, Tr::kRoundShifter), kf);
  const float r = fmadd(kf, -Tr::kLn2Lo, fmadd(kf, -Tr::kLn2Hi, -x));
  const float p = horner(r, 1.0f / 5040, 1.0f / 720, 1.0f / 120, 1.0f / 24, 1.0f / 6, 0.5f, 1.0f);
  return {pow2i<float>(k), p * r};
}

// e^x for |x| <= 80, rounded: within about 1 ulp.
FUSEDNN_HD float exp_core(float x) {
  return exp_neg_core(-x).rounded();
}

// exp_neg_core of an argument carried as a pair hi + lo, |hi| <= 80 and
// |lo| <= ulp(hi): (1 + m1) e^-lo = 1 + (m1 - lo - m1 lo) to within lo^2.
FUSEDNN_HD ExpParts exp_neg_pair_core(float hi, float lo) {
  const ExpParts e = exp_neg_core(hi);
  return {e.scale, fmadd(-e.m1, lo, e.m1 - lo)};
}

// e^x - 1 for |x| <= 80, with relative accuracy near zero: where the
// reduction leaves k = 0 the reduced argument is x itself and the result
// is r P(r); elsewhere 2^k - 1 is exact for k >= -24, and below, where
// the result lies within 2^-24 of -1, its rounding costs at most an ulp.
// Zeros keep their sign; expm1_core_plus_zero gives +0 for both, a select
// fewer for callers that set the sign themselves.
FUSEDNN_HD float expm1_core_plus_zero(float x) {
  const ExpParts e = exp_neg_core(-x);
  return fmadd(e.scale, e.m1, e.scale - 1.0f);
}
FUSEDNN_HD float expm1_core(float x) {
  const float y = expm1_core_plus_zero(x);
  return x == 0.0f ? x : y;
}

// e^(c - (p + p_lo) / 2) / 2 as scale * (1 + m1), left unrounded, for an
// exact pair p + p_lo in [0, 20] (p_lo a rounding error of p), |c| <= 0.34
// and an estimate of c within 0.025: the GELU core evaluations' single
// exponential, in which a polynomial c joins the exponent instead of
// multiplying the result. k is picked from the estimate, so that the
// reduction runs beside the polynomial c rather than after it, and the
// reduced argument, carried doubled as u = 2r = 2c - (p + p_lo) - 2k ln2,
// stays within |u| <= 0.75, where e^(u/2) - 1 = u q(u), q of degree 5
// (scripts/fit_normal_tail.py, relative error 2.2e-8). -p - 2k ln2_hi is
// exact wherever k = 0 or p >= 1: 2 ln2_hi has 21 significant bits, its
// last at 2^-20, so the sum is a multiple of 2^-23, and it is below 2 in
// magnitude (|u| + 2 |c|). Elsewhere (k = -1, p < 1) it rounds by at most
// 2^-24. So u's roundings are those of 2c + that sum and of the small
// corrections, at |u| <= 0.75. The shifter 1.5 * 2^23 + 126 leaves k + 126
// in the low bits of the rounded sum, which shifted into the exponent field
// is 2^(k - 1).
FUSEDNN_HD ExpParts half_exp_pair_plus_core(float p, float p_lo, float c, float c_estimate) {
  using Tr = Traits<float>;
  constexpr float kShifter = 12583038.0f;  // 1.5 * 2^23 + 126
  const float shifted = fmadd(fmadd(c_estimate, 2.0f, -p), 0.7213475204444817f, kShifter);
  const float kf = shifted - kShifter;
  const float exact = fmadd(kf, -2.0f * Tr::kLn2Hi, -p);
  const float u = fmadd(c, 2.0f, exact) - fmadd(kf, 2.0f * Tr::kLn2Lo, p_lo);
  const float q = horner(
      u, 2.1688616e-05f, 0.00026162813f, 0.0026042128f, 0.020833123f, 0.12499999f, 0.5f);
  return {float_from_bits(bits_of(shifted) << 23), q * u};
}

// 2^q for q in [-126, 1], to a relative error of 2.9e-6 (about 2^-18.4):
// for results rounded to float16 or bfloat16, whose half ulp is at least
// 2^-12 of the value, not float32's. q = k + f with k = round(q) and f =
// q - k exact in [-1/2, 1/2], 2^f a degree-4 polynomial (fitted for least
// relative error by scripts/fit_normal_tail.py --half), 2^k from the rounded
// sum's low bits: the shifter 1.5 * 2^23 + 127 leaves k + 127 there, which
// shifted into the exponent field is 2^k.
FUSEDNN_HD float exp2_coarse(float q) {
  constexpr float kShifter = 12583039.0f;  // 1.5 * 2^23 + 127
  const float shifted = q + kShifter;
  const float f = q - (shifted - kShifter);
  const float p = horner(f, 0.009582941f, 0.05590498f, 0.24024087f, 0.69312435f, 1.0f);
  return p * float_from_bits(bits_of(shifted) << 23);
}

// e^x for the half types' forms as scale (1 + fp), scale = 2^k a float and
// fp = 2^f - 1, for |x| <= 87 (k in [-126, 126]): q = x log2(e) = k + f
// with k = round(q), f = x log2(e) - k rounded once (|f| <= 1/2), and
// 2^f - 1 = f P(f), P of degree 3 (fitted for least relative error of
// f P(f) by scripts/fit_normal_tail.py --half: 1.55e-5, about
// 2^-16, against the 2^-12 of half an ulp of float16; log2(e) rounded to
// float moves q by 1.3e-8 |q|). The reduction without a Cody-Waite pair
// and three fused multiply-adds for the polynomial where exp_neg_core
// takes six: for results rounded to float16 or bfloat16 only. f P(f) keeps the relative accuracy
// of e^x - 1 where k = 0 (|x| < 0.35); elsewhere 2^k - 1 is exact. Where
// k = 0 the sum adds -0 (-(1 - 1)) to f P(f), so that e^x - 1 keeps the
// sign of a zero x.
struct CoarseExpParts {
  float scale;
  float fp;
  FUSEDNN_HD float exp() const { return fmadd(scale, fp, scale); }
  FUSEDNN_HD float expm1() const { return fmadd(scale, fp, -(1.0f - scale)); }
};
FUSEDNN_HD CoarseExpParts exp_coarse_parts(float x) {
  constexpr float kShifter = 12583039.0f;  // 1.5 * 2^23 + 127
  constexpr float kLog2e = 1.44269504f;
  const float shifted = fmadd(x, kLog2e, kShifter);
  const float kf = shifted - kShifter;
  const float f = fmadd(x, kLog2e, -kf);
  const float fp = f * horner(f, 0.009617577f, 0.055835363f, 0.24023253f, 0.693137f);
  return {float_from_bits(bits_of(shifted) << 23), fp};
}

// e^(hi + lo) where |lo| is a rounding error of hi (|lo| <= ulp(hi)): the
// second factor is 1 + lo to within lo^2.
template <class T> FUSEDNN_HD T exp_pair(T hi, T lo) {
  const T e = exp_(hi);
  return fmadd(e, lo, e);
}

// e^x - 1 for x <= 0 (positive x is treated as 0). Relative accuracy holds
// near zero; -0 and NaN pass through.
template <class T> FUSEDNN_HD T expm1_nonpositive(T x) {
  using Tr = Traits<T>;
  using SBits = typename Tr::SBits;
  T xc = x < Tr::kExpm1Min ? Tr::kExpm1Min : x;
  xc = xc > T(0) ? T(0) : xc;
  T kf;
  SBits k;
  const T r = reduce_ln2(xc, kf, k);
  const T p = expm1_reduced(r);
  const T scale = pow2i<T>(k);
  // 2^k (p + 1) - 1, with 2^k - 1 exact for the k that matter.
  const T y = fmadd(scale, p, scale - T(1));
  return (x == T(0) || is_nan(x)) ? x : y;
}

// log(1 + u) for u in [0, 1]: the u <= sqrt(2) - 1 half uses u itself as the
// reduced argument (no rounding), the rest reduces 1 + u by a factor 2 and
// adds back the rounding error of 1 + u. Series in s = f / (2 + f).
FUSEDNN_HD float log1p_series(float z) {
  const float r = horner(z, 2.0f / 9, 2.0f / 7, 2.0f / 5, 2.0f / 3);
  return r * z;
}

FUSEDNN_HD double log1p_series(double z) {
  const double r = horner(
      z, 2.0 / 21, 2.0 / 19, 2.0 / 17, 2.0 / 15, 2.0 / 13, 2.0 / 11, 2.0 / 9, 2.0 / 7, 2.0 / 5,
      2.0 / 3);
  return r * z;
}

template <class T> FUSEDNN_HD T log1p_unit(T u) {
  using Tr = Traits<T>;
  const bool reduced = u > T(0.41421356237309503);
  const T w = T(1) + u;
  const T f = reduced ? w * T(0.5) - T(1) : u;
  // The rounding error of w, divided by w; a first-order 1/w suffices because
  // the correction itself is below an ulp of the result.
  const T correction = reduced ? (u - (w - T(1))) * (T(0.5) - T(0.5) * f) : T(0);
  const T k = reduced ? T(1) : T(0);
  const T s = f / (T(2) + f);
  const T half_f_sq = T(0.5) * f * f;
  const T log1p_f = f - (half_f_sq - s * (half_f_sq + log1p_series(s * s)));
  return fmadd(k, Tr::kLn2Hi, log1p_f + fmadd(k, Tr::kLn2Lo, correction));
}

// max(v, 0) that keeps NaN (std::fmax would drop it).
template <class T> FUSEDNN_HD T positive_part(T v) { return v < T(0) ? T(0) : v; }

// a / b correctly rounded in double for a constant b with inv_b = RN(1/b),
// without a division instruction: the remainder a - q b is exact with an
// FMA, and one correction step makes q the correctly rounded quotient
// (Markstein's theorem), so the result has the same bits as a / b.
FUSEDNN_HD double divide_by(double a, double b, double inv_b) {
  const double q = a * inv_b;
  const double corrected = fmadd(fmadd(-q, b, a), inv_b, q);
  // Zeros (keeping their sign), infinities and NaN need no correction (and
  // would get NaN from it).
  const bool plain = a == 0.0 || !(abs_(a) <= Traits<double>::kMaxFinite);
  return plain ? a * inv_b : corrected;
}

// The logistic function 1 / (1 + e^-x), from e = e^-|x| so nothing
// overflows and the small side keeps its relative accuracy.
template <class T> FUSEDNN_HD T sigmoid_from_exp(T x, T e) {
  return (x >= T(0) ? T(1) : e) / (T(1) + e);
}

template <class T> FUSEDNN_HD T sigmoid_(T x) {
  using Tr = Traits<T>;
  const T scaled = exp_scaled_nonpositive(-abs_(x));
  const T e = scaled * Tr::kExpUnscale;
  return ((x >= T(0) ? Tr::kExpScaleValue : scaled) / (T(1) + e)) * Tr::kExpUnscale;
}

// g (1 + small) rounded once, for |small| < 1 (an infinite g gives g times
// 1 + small rather than the NaN of inf - inf).
template <class T> FUSEDNN_HD T mul_one_plus(T g, T small) {
  return abs_(g) <= Traits<T>::kMaxFinite ? fmadd(g, small, g) : g * (T(1) + small);
}

// g c e for a constant c and e = e^x <= 1 (elu's and selu's float64
// derivative): (g c) e, whose product rounds once where e is subnormal,
// and g (c e) where g c overflows while the result need not.
template <class T> FUSEDNN_HD T times_constant_exp(T g, T c, T e) {
  const T gc = g * c;
  return abs_(gc) <= Traits<T>::kMaxFinite ? gc * e : g * (c * e);
}

// (1 + e)^2 for e in [0, 1] with one rounding after the exact-ish e + 2.
template <class T> FUSEDNN_HD T one_plus_squared(T e) { return fmadd(e, e + T(2), T(1)); }

template <class T> FUSEDNN_HD T tanh_(T x) {
  const T t = expm1_nonpositive(T(-2) * abs_(x));
  return copysign_(-t / (t + T(2)), x);
}

// The standard normal tail Phi(-t) = e^(-t^2/2) M(t) for float32 GELU,
// t = |x|, in float arithmetic. The Mills-type ratio M (about
// 1 / (t sqrt(2 pi)) for large t) is w K(v) with w = 8 / (t + 4) and
// v = 1 - w, K a polynomial fitted by scripts/fit_normal_tail.py (relative
// error 1.8e-8 on [0, 16]). Writing M as w times K keeps M's relative error
// that of w, which is carried to twice float precision, rather than the
// rounding of a variable near 1 magnified by M's slope. t^2 is an exact
// pair, so e^(-t^2/2) is as accurate as the float exponential, and the
// factors are returned unrounded (see ExpParts) so that each caller rounds
// the product once.
//
// M(t) = w K (1 + mills_m1), alone for 0 <= t <= 20: K's fit on [0, 16]
// holds M within 4.4e-7 (relative) to t = 20, where the derivative's
// t / sqrt(2 pi) - M, 400 times M, needs it within 2^-16.
struct MillsF32 {
  float w;
  float k;
  float mills_m1;
};
struct NormalTailF32 {
  ExpParts gauss;  // e^(-t^2/2) 2^64
  MillsF32 mills;  // M(t)
  float t;         // t, clamped to 16
  bool beyond;     // t > 16 (or infinite): every float32 GELU tail term underflows
};
FUSEDNN_HD MillsF32 mills_f32(float tc) {
  MillsF32 n;
  // t + 4 = d + d_lo exactly (the error of adding the smaller term).
  const float d = tc + 4.0f;
  const float d_lo = (tc > 4.0f ? 4.0f : tc) - (d - (tc > 4.0f ? tc : 4.0f));
  const float inv_d = 1.0f / d;
  // 1 / (d + d_lo) = inv_d (1 + mills_m1) to within 2^-46.
  n.mills_m1 = fmadd(-inv_d, d_lo, fmadd(-inv_d, d, 1.0f));
  const float w = 8.0f * inv_d;  // exact
  // v = 1 - w (1 + mills_m1): near t = 0 w's error would otherwise reach v
  // at full size (w is about 2 there).
  const float v = fmadd(-w, n.mills_m1, 1.0f - w);
  const float k = horner(
      v, -1.6832455e-05f, 2.2403046e-05f, 0.00019666464f, -0.0004394569f, -0.0009410649f,
      0.0075507178f, -0.023315318f, 0.048392069f, -0.07598708f, 0.094410643f);
  n.w = w;
  n.k = k;
  return n;
}

FUSEDNN_HD NormalTailF32 normal_tail_f32(float t) {
  NormalTailF32 n;
  n.beyond = t > 16.0f;
  const float tc = n.beyond ? 16.0f : t;  // NaN passes and propagates
  n.t = tc;
  const float sq = tc * tc;
  n.gauss = exp_neg_pair_parts(0.5f * sq, 0.5f * fmadd(tc, tc, -sq));
  n.mills = mills_f32(tc);
  return n;
}

// The standard normal density and CDF for float64 results. Both come
// multiplied by 2^kExpScale (of double), so that where phi(x), Phi(x) or
// their products with x are subnormal (x below about -37.5) the scaled
// values stay normal and a caller rounds to the subnormal grid once, when
// it multiplies by kExpUnscale.
constexpr double kNormalTail = 26.0;        // Phi(-t) from the Mills-ratio series for t > this
constexpr double kNormalNegligible = -40.0;  // phi(x), Phi(x) and x Phi(x) round to 0 below this

// phi(x) * 2^kExpScale, and 0 where x^2 / 2 > -kExpMin (|x| > 39; phi is
// far below the subnormals there).
// x^2 is carried exactly as sq + sq_lo (an FMA two-product): rounding it
// would cost a relative (x^2 / 2) 2^-53, 16 ulp at |x| = 10. 1/sqrt(2 pi)
// is a pair as well.
FUSEDNN_HD double normal_pdf_scaled(double x) {
  constexpr double kInvSqrt2PiHi = 0x1.9884533d43651p-2;
  constexpr double kInvSqrt2PiLo = -0x1.cbc0d30ebfd15p-56;
  const double sq = x * x;
  const double sq_lo = fmadd(x, x, -sq);
  const double half = -0.5 * sq;
  // e c (1 + lo) = e c_hi + e (c_lo + c_hi lo) for e = e^half: one rounding
  // for both the constant's pair and the exponent's.
  const double e = exp_scaled(half);
  const double pdf = fmadd(e, kInvSqrt2PiHi, e * fmadd(kInvSqrt2PiHi, -0.5 * sq_lo, kInvSqrt2PiLo));
  return half < Traits<double>::kExpMin ? 0.0 : pdf;  // also x^2 = inf, where lo is inf
}

// S(t) = t Phi(-t) / phi(t) for t >= kNormalTail (smaller t is clamped):
// the asymptotic series sum_k (-1)^k (2k - 1)!! / t^(2k), whose remainder is
// below its first omitted term, 17!! / 26^18 = 1.2e-18.
FUSEDNN_HD double normal_tail_series(double t) {
  const double tc = t < kNormalTail ? kNormalTail : t;
  const double u = 1.0 / (tc * tc);
  return horner(u, 2027025.0, -135135.0, 10395.0, -945.0, 105.0, -15.0, 3.0, -1.0, 1.0);
}

// Phi(x) * 2^kExpScale, given pdf_s = normal_pdf_scaled(x) and
// tail = normal_tail_series(-x). From x = -kNormalTail up, erfc(w) / 2 with
// w = -x / sqrt(2) carried as w_hi + w_lo: the library's erfc is accurate
// at w_hi, and d/dw erfc(w) / 2 = -sqrt(2) phi(x) corrects for w_lo to
// first order. (Rounding w alone would cost a relative 2 w^2 2^-53 of Phi,
// 25 ulp at x = -7.) Below, phi(x) S(-x) / -x, where erfc would soon be
// subnormal. x is clamped to [-40, 40] for the erfc form, beyond which its
// value no longer changes and where w_lo would meet infinities.
FUSEDNN_HD double normal_cdf_scaled(double x, double pdf_s, double tail) {
  constexpr double kInvSqrt2Hi = 0x1.6a09e667f3bcdp-1;
  constexpr double kInvSqrt2Lo = -0x1.bdd3413b26456p-55;
  const double xc = x < -40.0 ? -40.0 : (x > 40.0 ? 40.0 : x);
  const double w = -xc * kInvSqrt2Hi;
  const double w_lo = fmadd(-xc, kInvSqrt2Hi, -w) + -xc * kInvSqrt2Lo;
#if defined(__CUDA_ARCH__)
  const double erfc_w = ::erfc(w);
#else
  const double erfc_w = std::erfc(w);
#endif
  const double central =
      fmadd(w_lo * -1.4142135623730951, pdf_s, (0.5 * Traits<double>::kExpScaleValue) * erfc_w);
  return x < -kNormalTail ? pdf_s * tail / -x : central;
}

}  // namespace math
}  // namespace fusednn
