// The activation functions and their derivatives, one struct per
// activation, shared by the CPU and CUDA kernels. Each struct has
//   forward(x, params)            -> y
//   backward_x(g, x, params)      -> g * f'(x)
//   backward_y(g, y, params)      -> g * f'(x), from y = f(x)
// the last one only where kBackwardFromY says the derivative can be formed
// from the output. Conventions follow PyTorch (parameters, the one-sided
// derivative at kinks, NaN and infinity handling); float32 inputs are
// evaluated in float32 where that stays within a few ulp, and in double
// where a float32 evaluation would not (products with a parameter that is
// not a float32 value).
#pragma once

#include <cmath>
#include <limits>
#include <type_traits>
#include <utility>

#include "fusednn/math.h"

namespace fusednn {

enum class Activation : int {
  sigmoid = 0,
  tanh,
  relu,
  leaky_relu,
  elu,
  selu,
  gelu,
  silu,
  softplus,
  mish,
  hardsigmoid,
  hardswish,
  hardtanh,
  count
};

// Parameters by activation: leaky_relu (a = negative_slope), elu (a = alpha),
// gelu (tanh_approximation), softplus (a = beta, b = threshold), hardtanh
// (a = min_val, b = max_val).
struct ActivationParams {
  double a = 0.0;
  double b = 0.0;
  bool tanh_approximation = false;
};

inline ActivationParams make_activation_params(double a, double b, bool tanh_approximation) {
  ActivationParams p;
  p.a = a;
  p.b = b;
  p.tanh_approximation = tanh_approximation;
  return p;
}

namespace act {

using math::abs_;
using math::exp_;
using math::keep_nonnegative;
using math::lookup16;
using math::magnitude;

constexpr double kSeluScale = 1.0507009873554804934193349852946;
constexpr double kSeluAlpha = 1.6732632423543772848170429916717;

struct Sigmoid {
  static constexpr bool kBackwardFromY = true;
  // Within the core range e^-|x| stays normal: no clamp and no 2^64 offset.
  static constexpr float kForwardCoreBound = 64.0f;
  // 1 / (1 + e) above zero, e / (1 + e) below: one division.
  FUSEDNN_HD static float forward_core_f32(float x, const ActivationParams&) {
    const math::ExpParts e = math::exp_neg_core(math::magnitude(x));
    const float e_rounded = e.rounded();
    const float numerator = x >= 0.0f ? 1.0f : e_rounded;
    return numerator / (1.0f + e_rounded);
  }
  // For float16 and bfloat16 storage (see HasHalfForwardCore): the same
  // division, e from math::exp_coarse_parts (relative error 1.5e-5).
  FUSEDNN_HD static float forward_core_half(float x, const ActivationParams&) {
    const float e = math::exp_coarse_parts(-math::magnitude(x)).exp();
    return (x >= 0.0f ? 1.0f : e) / (1.0f + e);
  }
  template <class T> FUSEDNN_HD static T forward(T x, const ActivationParams& p) {
    if constexpr (sizeof(T) == sizeof(float)) {
      return abs_(x) <= kForwardCoreBound ? forward_core_f32(x, p) : math::sigmoid_(x);
    } else {
      return math::sigmoid_(x);
    }
  }
  // e / (1 + e)^2 with e = exp(-|x|): symmetric and free of 1 - s; the
  // scaled exponential keeps the subnormal tail accurate, and inside the
  // core range, where e stays normal, the core exponential serves.
  static constexpr float kBackwardCoreBound = 64.0f;
  FUSEDNN_HD static float backward_core_f32(float g, float x, const ActivationParams&) {
    const math::ExpParts e = math::exp_neg_core(math::magnitude(x));
    const float e_rounded = e.rounded();
    return g * (e_rounded / math::one_plus_squared(e_rounded));
  }
  // Beyond the core e < 2^-92, so the derivative is e to within 2e, and
  // g e rounds once (math::times_wide): e itself is subnormal from |x| = 87
  // on, while g e stays a normal float to |x| = 176.
  FUSEDNN_HD static float backward_outer_f32(float g, float x) {
    return math::times_wide(g, math::exp_neg_wide(math::magnitude(x)).value());
  }
  template <class T> FUSEDNN_HD static T backward_x(T g, T x, const ActivationParams& p) {
    if constexpr (sizeof(T) == sizeof(float)) {
      return abs_(x) <= kBackwardCoreBound ? backward_core_f32(g, x, p) : backward_outer_f32(g, x);
    } else {
      using Tr = math::Traits<T>;
      const T scaled = math::exp_scaled_nonpositive(-abs_(x));
      const T e = scaled * Tr::kExpUnscale;
      return g * ((scaled / math::one_plus_squared(e)) * Tr::kExpUnscale);
    }
  }
  template <class T> FUSEDNN_HD static T backward_y(T g, T y, const ActivationParams&) {
    return g * (y * (T(1) - y));
  }
};

struct Tanh {
  static constexpr bool kBackwardFromY = true;
  // Within the core range e^-2|x| stays normal, so expm1 needs no clamp;
  // beyond |x| = 9.1 tanh rounds to +-1 anyway.
  static constexpr float kForwardCoreBound = 40.0f;
  // tanh|x| = -m / (m + 2) with m = e^-2|x| - 1, as math::tanh_ forms it.
  FUSEDNN_HD static float forward_core_f32(float x, const ActivationParams&) {
    const float m = math::expm1_core_plus_zero(-2.0f * math::magnitude(x));
    return math::copysign_(-m / (m + 2.0f), x);
  }
  // For float16 and bfloat16 storage: the same quotient, m from
  // math::exp_coarse_parts (relative error about 3.6e-5 where m is near
  // -0.3, its largest; 1.5e-5 near zero, where f P(f) is m itself).
  FUSEDNN_HD static float forward_core_half(float x, const ActivationParams&) {
    const float m = math::exp_coarse_parts(-2.0f * math::magnitude(x)).expm1();
    return math::copysign_(-m / (m + 2.0f), x);
  }
  template <class T> FUSEDNN_HD static T forward(T x, const ActivationParams& p) {
    if constexpr (sizeof(T) == sizeof(float)) {
      return abs_(x) <= kForwardCoreBound ? forward_core_f32(x, p) : math::tanh_(x);
    } else {
      return math::tanh_(x);
    }
  }
  // 1 - tanh^2 = 4e / (1 + e)^2 with e = exp(-2|x|), from the core
  // exponential where e stays normal.
  static constexpr float kBackwardCoreBound = 40.0f;
  FUSEDNN_HD static float backward_core_f32(float g, float x, const ActivationParams&) {
    const math::ExpParts e = math::exp_neg_core(2.0f * math::magnitude(x));
    const float e_rounded = e.rounded();
    return g * (4.0f * e_rounded / math::one_plus_squared(e_rounded));
  }
  // Beyond the core e < 2^-115: the derivative is 4e to within 8e, and g
  // times it rounds once, as in Sigmoid (2|x| overflows only past the clamp).
  FUSEDNN_HD static float backward_outer_f32(float g, float x) {
    return math::times_wide(g, 4.0 * math::exp_neg_wide(2.0f * math::magnitude(x)).value());
  }
  template <class T> FUSEDNN_HD static T backward_x(T g, T x, const ActivationParams& p) {
    if constexpr (sizeof(T) == sizeof(float)) {
      return abs_(x) <= kBackwardCoreBound ? backward_core_f32(g, x, p) : backward_outer_f32(g, x);
    } else {
      using Tr = math::Traits<T>;
      const T scaled = math::exp_scaled_nonpositive(T(-2) * abs_(x));
      const T e = scaled * Tr::kExpUnscale;
      return g * ((T(4) * scaled / math::one_plus_squared(e)) * Tr::kExpUnscale);
    }
  }
  // (1 - y)(1 + y) is exact where y*y would cancel.
  template <class T> FUSEDNN_HD static T backward_y(T g, T y, const ActivationParams&) {
    return g * ((T(1) - y) * (T(1) + y));
  }
};

struct Relu {
  static constexpr bool kBackwardFromY = true;
  template <class T> FUSEDNN_HD static T forward(T x, const ActivationParams&) {
    return x < T(0) ? T(0) : x;  // -0 and NaN pass, as in PyTorch
  }
  template <class T> FUSEDNN_HD static T backward_x(T g, T x, const ActivationParams&) {
    return x <= T(0) ? T(0) : g;
  }
  template <class T> FUSEDNN_HD static T backward_y(T g, T y, const ActivationParams& p) {
    return backward_x(g, y, p);
  }
};

// The product with the slope is formed in double and rounded once, so the
// float32 result is the correctly rounded float64 one.
struct LeakyRelu {
  static constexpr bool kBackwardFromY = true;  // for negative_slope >= 0
  template <class T> FUSEDNN_HD static T forward(T x, const ActivationParams& p) {
    return x > T(0) ? x : T(double(x) * p.a);
  }
  template <class T> FUSEDNN_HD static T backward_x(T g, T x, const ActivationParams& p) {
    return x > T(0) ? g : T(double(g) * p.a);
  }
  template <class T> FUSEDNN_HD static T backward_y(T g, T y, const ActivationParams& p) {
    return backward_x(g, y, p);
  }
};

// leaky_relu with the slope's product in float: the slope rounded to
// float once, x times it rounded once. Not LeakyRelu's bits in general;
// the CPU kernels take it for float16 and bfloat16 storage only where they
// have checked, over every value of the storage type, that both round to
// the same stored results for the slope at hand (as they do for 0.01 and
// 0.2), since the double product's conversions were most of the half
// kernels' arithmetic.
struct LeakyReluFloatSlope {
  static constexpr bool kBackwardFromY = true;  // for negative_slope >= 0
  template <class T> FUSEDNN_HD static T forward(T x, const ActivationParams& p) {
    return x > T(0) ? x : x * T(p.a);
  }
  template <class T> FUSEDNN_HD static T backward_x(T g, T x, const ActivationParams& p) {
    return x > T(0) ? g : g * T(p.a);
  }
  template <class T> FUSEDNN_HD static T backward_y(T g, T y, const ActivationParams& p) {
    return backward_x(g, y, p);
  }
};

// elu and selu: within their core range |x| <= 80 e^x and e^x - 1 need no
// clamps (math::exp_core, math::expm1_core); they are evaluated for
// positive x too, where they stay finite and go unused.
struct Elu {
  static constexpr bool kBackwardFromY = true;  // for alpha >= 0
  static constexpr float kForwardCoreBound = 80.0f;
  FUSEDNN_HD static float forward_core_f32(float x, const ActivationParams& p) {
    return x > 0.0f ? x : float(p.a) * math::expm1_core(x);
  }
  // For float16 and bfloat16 storage: e^x - 1 from math::exp_coarse_parts
  // (which keeps the sign of zero).
  FUSEDNN_HD static float forward_core_half(float x, const ActivationParams& p) {
    return x > 0.0f ? x : float(p.a) * math::exp_coarse_parts(x).expm1();
  }
  template <class T> FUSEDNN_HD static T forward(T x, const ActivationParams& p) {
    if constexpr (sizeof(T) == sizeof(float)) {
      if (abs_(x) <= kForwardCoreBound) return forward_core_f32(x, p);
    }
    return x > T(0) ? x : T(p.a) * math::expm1_nonpositive(x);
  }
  // float: g (alpha e^x), not (g alpha) e^x: g alpha overflows for the
  // largest g where the result does not.
  static constexpr float kBackwardCoreBound = 80.0f;
  FUSEDNN_HD static float backward_core_f32(float g, float x, const ActivationParams& p) {
    return x <= 0.0f ? g * (float(p.a) * math::exp_core(x)) : g;
  }
  // Beyond the core e^x < 2^-115 is subnormal from x = -87 on, while g
  // alpha e^x can stay a normal float to x = -176 (further for a large
  // alpha): formed in double, alpha unrounded, and rounded once.
  FUSEDNN_HD static float backward_outer_f32(float g, float x, const ActivationParams& p) {
    return x <= 0.0f ? math::times_wide(g, p.a * math::exp_neg_wide(-x).value()) : g;
  }
  template <class T> FUSEDNN_HD static T backward_x(T g, T x, const ActivationParams& p) {
    if constexpr (sizeof(T) == sizeof(float)) {
      return abs_(x) <= kBackwardCoreBound ? backward_core_f32(g, x, p)
                                           : backward_outer_f32(g, x, p);
    } else {
      return x <= T(0) ? math::times_constant_exp(g, T(p.a), exp_(x)) : g;
    }
  }
  // y + alpha in double: near y = -alpha it cancels, and alpha need not be
  // a float32 value. Where the tail has rounded y to -alpha (or below), the
  // true alpha e^x is positive but smaller than y can tell: 0, never a
  // negative slope.
  template <class T> FUSEDNN_HD static T backward_y(T g, T y, const ActivationParams& p) {
    return y <= T(0) ? T(double(g) * math::positive_part(double(y) + p.a)) : g;
  }
};

struct Selu {
  static constexpr bool kBackwardFromY = true;
  static constexpr float kForwardCoreBound = 80.0f;
  FUSEDNN_HD static float forward_core_f32(float x, const ActivationParams&) {
    return x > 0.0f ? float(kSeluScale) * x : float(kSeluScale * kSeluAlpha) * math::expm1_core(x);
  }
  FUSEDNN_HD static float forward_core_half(float x, const ActivationParams&) {
    return x > 0.0f ? float(kSeluScale) * x
                    : float(kSeluScale * kSeluAlpha) * math::exp_coarse_parts(x).expm1();
  }
  template <class T> FUSEDNN_HD static T forward(T x, const ActivationParams& p) {
    if constexpr (sizeof(T) == sizeof(float)) {
      if (abs_(x) <= kForwardCoreBound) return forward_core_f32(x, p);
    }
    return x > T(0) ? T(kSeluScale) * x
                    : T(kSeluScale * kSeluAlpha) * math::expm1_nonpositive(x);
  }
  // As Elu's: g (scale alpha e^x), since g scale alpha (1.76 g) overflows
  // for g > 1.9e38 where the result does not.
  static constexpr float kBackwardCoreBound = 80.0f;
  FUSEDNN_HD static float backward_core_f32(float g, float x, const ActivationParams&) {
    return x <= 0.0f ? g * (float(kSeluScale * kSeluAlpha) * math::exp_core(x))
                     : g * float(kSeluScale);
  }
  FUSEDNN_HD static float backward_outer_f32(float g, float x) {
    return x <= 0.0f ? math::times_wide(g, kSeluScale * kSeluAlpha * math::exp_neg_wide(-x).value())
                     : g * float(kSeluScale);
  }
  template <class T> FUSEDNN_HD static T backward_x(T g, T x, const ActivationParams& p) {
    if constexpr (sizeof(T) == sizeof(float)) {
      return abs_(x) <= kBackwardCoreBound ? backward_core_f32(g, x, p) : backward_outer_f32(g, x);
    } else {
      return x <= T(0) ? math::times_constant_exp(g, T(kSeluScale * kSeluAlpha), exp_(x))
                       : g * T(kSeluScale);
    }
  }
  // As Elu::backward_y, with alpha = scale * alpha.
  template <class T> FUSEDNN_HD static T backward_y(T g, T y, const ActivationParams&) {
    return y <= T(0) ? T(double(g) * math::positive_part(double(y) + kSeluScale * kSeluAlpha))
                     : g * T(kSeluScale);
  }
};

// elu and selu with the backward from y in float arithmetic, for float16
// and bfloat16 storage: not the float32 bits of Elu and Selu (whose sum
// y + alpha runs in double), but within one ulp of the storage type. alpha
// is split into a float pair hi + lo (lo the rounding error of hi, to
// within 2^-48 alpha): near y = -alpha, where y + alpha cancels, y + hi is
// exact (Sterbenz: y in [-2 hi, -hi / 2]) and adding lo rounds once, and
// elsewhere each of the two sums rounds by at most 2^-24 of a result that is
// no smaller than hi / 2. With g's product, the float result lies within
// 3 * 2^-24 (relative) of g (y + alpha), far below the 2^-12 of half an
// ulp of either storage type (results below the types' normal range are
// still normal floats, or, for bfloat16, float subnormals rounded 2^17
// times finer than bfloat16's). The sign of the sum is exact: y + hi is 0
// or at least an ulp of y (2^-11 alpha), and |lo| <= 2^-24 alpha. The
// double sum and its conversions were most of the half kernels' arithmetic.
struct EluHalf : Elu {
  template <class T> FUSEDNN_HD static T backward_y(T g, T y, const ActivationParams& p) {
    const float hi = float(p.a);
    const float lo = float(p.a - double(hi));
    return y <= T(0) ? g * math::positive_part((y + T(hi)) + T(lo)) : g;
  }
};
struct SeluHalf : Selu {
  static constexpr float kAlphaHi = float(kSeluScale * kSeluAlpha);
  static constexpr float kAlphaLo = float(kSeluScale * kSeluAlpha - double(kAlphaHi));
  template <class T> FUSEDNN_HD static T backward_y(T g, T y, const ActivationParams&) {
    return y <= T(0) ? g * math::positive_part((y + T(kAlphaHi)) + T(kAlphaLo))
                     : g * T(kSeluScale);
  }
};

// GELU, exact (x Phi(x)) or with the tanh approximation
// 0.5 x (1 + tanh(u)) = x * sigmoid(2u), u = sqrt(2/pi) (x + 0.044715 x^3).
// The tails need Phi and sigmoid(2u) with relative accuracy where their
// exponent is large, so the exponent is carried as an exact (hi, lo) pair
// and the exponential left unrounded (math::ExpParts) until the final
// products. float32 runs entirely in float arithmetic this way. float64
// uses the scaled Phi and phi of math.h, which keep their accuracy down the
// tail where the results are subnormal; in the tail (x < -kNormalTail)
// x Phi(x) = -phi(x) S(-x) is formed as one product.
struct GeluErf {
  static constexpr bool kBackwardFromY = false;
  // 1 / sqrt(2 pi) as a float pair.
  static constexpr float kInvSqrt2PiHi = 0.3989423f;
  static constexpr float kInvSqrt2PiLo = -1.133517e-08f;

  // The core ranges hold nearly every input in practice: |x| < 3.875 for
  // the forward (below, where round(4t) names one of 16 pieces) and
  // |x| <= 4 for the derivative. There the CPU's forward is a polynomial
  // of Phi(-t) per piece (forward_core_pieces), and the derivative and
  // the GPU's forward are one exponential each, e^(c(t) - p / 2) / 2
  // (math::half_exp_pair_plus_core), with the logarithm of their smooth
  // factor folded into the exponent as a polynomial c: no division, no
  // clamps, no 2^64 offset.
  static constexpr float kForwardCoreBound = 3.8749998f;  // the float below 15.5 / 4
  static constexpr float kBackwardCoreBound = 4.0f;

  // Phi(-t) for 0 <= t < 3.875 in 16 pieces, i = round(4t), each a
  // degree-6 polynomial in s = 4t - i (|s| <= 1/2), fitted by
  // scripts/fit_normal_tail.py --pieces for least relative error on the
  // float32 t of its piece (3.3e-8 with float32 coefficients); the table
  // holds them negated, lowest degree first, a row of 16 pieces per
  // degree. Horner's scheme over coefficients looked up per element: where
  // the CPU evaluates a vector at a time (cpu/lanes.h), each look-up is one
  // permute of a 16-entry row held in a register, and the whole form about
  // 19 vector operations where the single exponential takes about 40.
  // round(4t) is left in the low bits of 4t + 1.5 * 2^23, whose difference
  // from 4t is exact (|s| <= 1/2, Sterbenz for i >= 1). A GPU would look
  // the rows up in memory, one load per coefficient; it keeps the
  // exponential (forward_core_f32).
  static constexpr float kPieceShifter = 12582912.0f;  // 1.5 * 2^23
  static constexpr int kPieceDegree = 6;
  static constexpr float kMinusTailPieces[kPieceDegree + 1][16] = {
      {-0.5f, -0.40129367f, -0.30853754f, -0.22662735f, -0.15865526f, -0.10564978f, -0.0668072f, -0.040059157f, -0.022750132f, -0.012224473f, -0.0062096654f, -0.0029797633f, -0.001349898f, -0.00057702506f, -0.00023262909f, -8.8417284e-05f},
      {0.09973557f, 0.09666703f, 0.08801633f, 0.075284354f, 0.060492683f, 0.045662273f, 0.0323794f, 0.02156933f, 0.013497742f, 0.007934913f, 0.0043820753f, 0.0022733908f, 0.0011079621f, 0.000507262f, 0.00021817068f, 8.814892e-05f},
      {-7.934063e-08f, -0.0030214484f, -0.005500751f, -0.007058066f, -0.007561453f, -0.007134534f, -0.006071029f, -0.0047183014f, -0.0033744464f, -0.0022316694f, -0.0013693917f, -0.00078147335f, -0.0004154844f, -0.00020607428f, -9.5449315e-05f, -4.1319847e-05f},
      {-0.0010381873f, -0.00094395736f, -0.0006876444f, -0.00034300378f, -5.9125348e-08f, 0.00026749453f, 0.00042156677f, 0.0004633946f, 0.0004218014f, 0.00033578026f, 0.00023964053f, 0.00015540395f, 9.232984e-05f, 5.0527833e-05f, 2.5566615e-05f, 1.1994235e-05f},
      {-2.9011733e-06f, 5.2380685e-05f, 7.604548e-05f, 9.111981e-05f, 7.74825e-05f, 5.1495717e-05f, 2.2669192e-05f, -1.4240618e-06f, -1.7461645e-05f, -2.420989e-05f, -2.3240971e-05f, -1.861142e-05f, -1.2996703e-05f, -8.125357e-06f, -4.6017094e-06f, -2.3804796e-06f},
      {1.5035785e-05f, 7.924719e-06f, 4.599586e-06f, -5.042515e-07f, -3.6707581e-06f, -5.554474e-06f, -5.5360365e-06f, -4.1780695e-06f, -2.192156e-06f, -4.167286e-07f, 6.64863e-07f, 1.1085459e-06f, 1.0827677e-06f, 8.4646825e-07f, 5.6650083e-07f, 3.3435578e-07f},
      {-3.6456488e-06f, -1.6314365e-05f, 6.287559e-06f, -4.4495405e-06f, 2.6664786e-06f, 4.617097e-06f, 2.7196681e-06f, 2.0547326e-08f, 3.5851684e-08f, 8.1082953e-07f, 2.661224e-07f, 1.2249207e-07f, 2.80971e-09f, -2.6815556e-08f, -3.659929e-08f, -3.2733446e-08f},
  };
  // -t Phi(-t) + (x or -0), as forward_core_f32 below forms it. F is float
  // or one of the CPU's vectors of float lanes (cpu/lanes.h), which
  // provide the same operations, each rounding alike lane by lane: the
  // vector and scalar forms give the same bits.
  template <class F> static F forward_core_pieces(F x) {
    const F t = magnitude(x);
    const F shifted = fmadd(t, F(4.0f), F(kPieceShifter));
    const F s = fmadd(t, F(4.0f), F(kPieceShifter) - shifted);
    const auto piece = bits_of(shifted);
    F q = lookup16(kMinusTailPieces[kPieceDegree], piece);
    for (int degree = kPieceDegree - 1; degree >= 0; --degree)
      q = fmadd(q, s, lookup16(kMinusTailPieces[degree], piece));
    return fmadd(t, q, keep_nonnegative(x));
  }

  // The polynomials c(t) of the core exponents, in s = t - 2 (exact for
  // t >= 1; below, its rounding moves c by at most 2e-8), fitted by
  // scripts/fit_normal_tail.py for least absolute error on [0, 4]. Both
  // stay below 0.34 in magnitude, so their own rounding is below 2^-26.
  // They are evaluated in Estrin's scheme (pairs of terms joined by s^2 and
  // s^4): with a Horner chain of dependent FMAs before the exponential, the
  // loops waited on latency, and a quadratic estimate of each lets the
  // exponential's reduction start before them.
  // log M(t) + ln 2 + t / 2, M(t) = Phi(-t) e^(t^2/2) the Mills-type ratio:
  // Phi(-t) = e^(c - (t^2 + t) / 2) / 2 (fit error 1.7e-8).
  FUSEDNN_HD static float mills_exponent(float s) {
    const float s2 = s * s;
    const float s4 = s2 * s2;
    const float low = fmadd(fmadd(-0.0098928735f, s, 0.05713944f), s2,
                            fmadd(0.12678452f, s, -0.090037145f));
    const float middle = fmadd(fmadd(-1.9404722e-06f, s, 2.8452685e-05f), s2,
                               fmadd(-0.0002421843f, s, 0.0016427955f));
    const float high = fmadd(-3.6990343e-08f, s2, fmadd(1.8568207e-07f, s, -2.5625855e-07f));
    return fmadd(fmadd(high, s4, middle), s4, low);
  }
  FUSEDNN_HD static float mills_exponent_estimate(float s) {  // within 0.023
    return fmadd(fmadd(0.06594274f, s, 0.09479256f), s, -0.09724138f);
  }
  // Phi(-t) - t phi(t) = (t0 - t) e^(c - t^2 / 2) / 2, t0 = 0.75179... the
  // root of gelu' at -t0: c = log(2 G(t)), G = (Phi(-t) e^(t^2/2) -
  // t / sqrt(2 pi)) / (t0 - t) > 0 (fit error 1.7e-8).
  FUSEDNN_HD static float slope_exponent(float s) {
    const float s2 = s * s;
    const float s4 = s2 * s2;
    const float low = fmadd(fmadd(-0.004628193f, s, 0.018375084f), s2,
                            fmadd(-0.06806899f, s, 0.009057222f));
    const float middle = fmadd(fmadd(-8.340804e-06f, s, 4.7358582e-05f), s2,
                               fmadd(-0.00023783484f, s, 0.001087651f));
    const float high = fmadd(fmadd(1.6722474e-08f, s, -2.403427e-08f), s2,
                             fmadd(-2.6079968e-07f, s, 1.5186365e-06f));
    return fmadd(fmadd(high, s4, middle), s4, low);
  }
  FUSEDNN_HD static float slope_exponent_estimate(float s) {  // within 0.013
    return fmadd(fmadd(0.024987746f, s, -0.08455882f), s, 0.0034100995f);
  }
  // t0 as a float pair: t0_hi - t is exact for t in [t0 / 2, 2 t0].
  static constexpr float kRootHi = 0.75179154f;
  static constexpr float kRootLo = -1.211445e-08f;

  // x Phi(x) in the core range: x Phi(-t) below zero, x - x Phi(-t)
  // above, as -|x| Phi(-t) + (x or -0): the zeros keep their sign, since
  // -0 + -0 is -0 and -0 + +0 is +0. On the CPU, the pieces above; on the
  // GPU, one exponential, with t^2 + t = t v, v = t + 1, as the exact pair
  // p + p_lo: v - 1 and t - (v - 1), v's rounding error, are exact for
  // every v in [1, 5].
  FUSEDNN_HD static float forward_core_f32(float x, const ActivationParams&) {
#if !defined(__CUDA_ARCH__)
    return forward_core_pieces(x);
#else
    const float t = math::magnitude(x);
    const float v = t + 1.0f;
    const float v_lo = t - (v - 1.0f);
    const float p = t * v;
    const float p_lo = fmadd(t, v_lo, fmadd(t, v, -p));
    const float s = t - 2.0f;
    const math::ExpParts e =
        math::half_exp_pair_plus_core(p, p_lo, mills_exponent(s), mills_exponent_estimate(s));
    const float tail = fmadd(e.scale, e.m1, e.scale);  // Phi(-t)
    return fmadd(-t, tail, x >= 0.0f ? x : -0.0f);
#endif
  }
  // Beyond the core: the tail, where Phi(-t) reaches the subnormals, and
  // the special values.
  FUSEDNN_HD static float forward_outer_f32(float x) {
    const math::NormalTailF32 n = math::normal_tail_f32(abs_(x));
    // e^(-t^2/2) M(t) with both factors' corrections in one rounding.
    const float m1 = fmadd(n.gauss.m1, n.mills.mills_m1, n.gauss.m1 + n.mills.mills_m1);
    const float mills = n.mills.w * n.mills.k;
    const float tail_scaled = n.beyond ? 0.0f : n.gauss.scale * fmadd(m1, mills, mills);
    const float unscale = math::Traits<float>::kExpUnscale;
    const float below = (x * tail_scaled) * unscale;  // 0 * -inf: NaN, as in PyTorch
    const float above = fmadd(-x, tail_scaled * unscale, x);
    return x < 0.0f ? below : (n.beyond ? x : above);
  }
  FUSEDNN_HD static float forward_f32(float x, const ActivationParams& p) {
    return abs_(x) <= kForwardCoreBound ? forward_core_f32(x, p) : forward_outer_f32(x);
  }

  // Phi(x) + x phi(x) for |x| <= 4: S = Phi(-t) - t phi(t) below zero
  // and 1 - S above, S = (t0 - t) e^(c - t^2/2) / 2 with t^2 as an exact
  // pair. The factor t0 - t keeps S's relative accuracy through the root,
  // where Phi(-t) and t phi(t) cancel (no central series is needed).
  FUSEDNN_HD static float backward_core_f32(float g, float x, const ActivationParams&) {
    const float t = math::magnitude(x);
    const float sq = t * t;
    const float s = t - 2.0f;
    const math::ExpParts e = math::half_exp_pair_plus_core(sq, fmadd(t, t, -sq), slope_exponent(s),
                                                           slope_exponent_estimate(s));
    const float gap = (kRootHi - t) + kRootLo;
    const float slope = e.scale * fmadd(e.m1, gap, gap);
    // g (1 - S) in one rounding (an infinite g would give inf - inf).
    return x < 0.0f ? g * slope : math::mul_one_plus(g, -slope);
  }
  // Beyond the core the derivative is 1 - D above zero and D below, D =
  // e^(-t^2/2) (t / sqrt(2 pi) - M(t)) (math::mills_f32), D formed in double
  // with the exponential's scale (math::WideExpParts) so that g D rounds
  // once: D is subnormal from t = 13.3 on, and g D for g up to 2^128 a
  // normal float to t = 18.9 (beyond kBackwardTail, to t = 20, every g D
  // rounds to 0).
  static constexpr float kBackwardTail = 20.0f;
  FUSEDNN_HD static float backward_outer_f32(float g, float x) {
    const float t = abs_(x);
    const bool beyond = t > kBackwardTail;
    const float tc = beyond ? kBackwardTail : t;  // NaN passes and propagates
    const math::MillsF32 m = math::mills_f32(tc);
    const float minus_mills = fmadd(-m.w, fmadd(m.k, m.mills_m1, m.k), tc * kInvSqrt2PiLo);
    const float diff = fmadd(tc, kInvSqrt2PiHi, minus_mills);
    const float sq = tc * tc;
    const math::WideExpParts gauss = math::exp_neg_pair_wide(0.5f * sq, 0.5f * fmadd(tc, tc, -sq));
    const double slope = gauss.scale * double(fmadd(gauss.m1, diff, diff));
    const float below = math::times_wide(g, -slope);
    const float above = math::mul_one_plus(g, float(slope));
    // Beyond, the derivative is 1 or 0 plus x * 0, NaN at the infinities as
    // in PyTorch.
    const float far = g * ((x > 0.0f ? 1.0f : 0.0f) + x * 0.0f);
    return beyond ? far : (x < 0.0f ? below : above);
  }
  FUSEDNN_HD static float backward_x_f32(float g, float x, const ActivationParams& p) {
    return abs_(x) <= kBackwardCoreBound ? backward_core_f32(g, x, p) : backward_outer_f32(g, x);
  }

  template <class T> FUSEDNN_HD static T forward(T x, const ActivationParams& p) {
    if constexpr (sizeof(T) == sizeof(float)) {
      return forward_f32(x, p);
    } else {
      constexpr double unscale = math::Traits<double>::kExpUnscale;
      const double pdf = math::normal_pdf_scaled(x);
      const double tail = math::normal_tail_series(-x);
      const double cdf = math::normal_cdf_scaled(x, pdf, tail);
      const double y = x < -math::kNormalTail ? -(pdf * tail) * unscale : x * (cdf * unscale);
      return x < math::kNormalNegligible ? x * 0.0 : y;  // -inf gives NaN, as in PyTorch
    }
  }
  // g (Phi(x) + x phi(x)); for double the scaled sum is unscaled once.
  template <class T> FUSEDNN_HD static T backward_x(T g, T x, const ActivationParams& p) {
    if constexpr (sizeof(T) == sizeof(float)) {
      return backward_x_f32(g, x, p);
    } else {
      const double pdf = math::normal_pdf_scaled(x);
      const double cdf = math::normal_cdf_scaled(x, pdf, math::normal_tail_series(-x));
      return g * (fmadd(x, pdf, cdf) * math::Traits<double>::kExpUnscale);
    }
  }
};

// GELU's exact form for float16 and bfloat16 storage, forward and
// backward, where a result
// needs about 2^-12 relative accuracy before its final rounding, not
// float32's 2^-24: within the core range |x| <= 4 Phi(-t) = 2^Q(t), t =
// |x|, with Q = log2 Phi(-t) a degree-5 polynomial in t (absolute error
// 8.2e-5, fitted by scripts/fit_normal_tail.py --half) and the coarse base-2
// exponential (math::exp2_coarse). Q's constant term is exactly -1, so
// that for every t > 0 that float16 holds Phi(-t) rounds below 1/2, and
// x Phi(x) = x / 2 + x^2 phi(0) + ... lands on the right side of the
// storage type's ties between subnormals (x / 2 for odd multiples of the
// smallest subnormal): about 18 vector operations where GeluErf's core
// takes about 40 (a degree-6 Q, absolute error 2.3e-6, took the half
// blocks 1.08-1.15x the time). The result, -t Phi(-t) + (x or -0) as in
// GeluErf, lies within 6.1e-5 (relative, rounding included) of x Phi(x),
// so after its final rounding within 0.63 ulp of float16 and 0.52 of
// bfloat16: not the float32 kernel's bits rounded (the two differ where
// the float32 values straddle a rounding boundary of the storage type),
// but within the same one-ulp bound; the backward likewise, below. Beyond the core, GeluErf's
// float32 evaluation (the tails, where the results reach the subnormals,
// and the special values).
struct GeluErfHalf : GeluErf {
  static constexpr float kForwardCoreBound = 4.0f;
  FUSEDNN_HD static float log2_tail(float t) {
    return math::horner(
        t, -0.00036708987f, 0.0062758923f, -0.049750306f, -0.46201515f, -1.1502539f, -1.0f);
  }
  FUSEDNN_HD static float forward_core_f32(float x, const ActivationParams&) {
    const float t = math::magnitude(x);
    const float tail = math::exp2_coarse(log2_tail(t));  // Phi(-t)
    return fmadd(-t, tail, x >= 0.0f ? x : -0.0f);
  }
  template <class T> FUSEDNN_HD static T forward(T x, const ActivationParams& p) {
    static_assert(sizeof(T) == sizeof(float), "float arithmetic for half storage");
    return abs_(x) <= kForwardCoreBound ? forward_core_f32(x, p) : forward_outer_f32(x);
  }
  // log2 of the derivative's S(t) / (t0 - t), S = Phi(-t) - t phi(t), a
  // degree-7 polynomial in t (absolute error 3.8e-6).
  FUSEDNN_HD static float log2_slope(float t) {
    return math::horner(
        t, -1.42e-05f, 0.0002830291f, -0.00254106f, 0.013935737f, -0.053859428f, -0.5612089f,
        -0.38308084f, -0.58840835f);
  }
  // g S below zero and g (1 - S) above, as GeluErf's core forms them, with
  // S = (t0 - t) 2^log2_slope(t): t0 - t exact near the root (Sterbenz),
  // so S keeps its relative accuracy (within 7e-6) where Phi(-t) and
  // t phi(t) cancel; about 24 vector operations where GeluErf's backward
  // core takes about 45.
  FUSEDNN_HD static float backward_core_f32(float g, float x, const ActivationParams&) {
    const float t = math::magnitude(x);
    const float gap = (kRootHi - t) + kRootLo;
    const float slope = gap * math::exp2_coarse(log2_slope(t));
    return x < 0.0f ? g * slope : math::mul_one_plus(g, -slope);
  }
  template <class T> FUSEDNN_HD static T backward_x(T g, T x, const ActivationParams& p) {
    static_assert(sizeof(T) == sizeof(float), "float arithmetic for half storage");
    return abs_(x) <= kBackwardCoreBound ? backward_core_f32(g, x, p) : backward_outer_f32(g, x);
  }
};

struct GeluTanh {
  static constexpr bool kBackwardFromY = false;
  static constexpr double kSqrt2OverPi = 0.79788456080286535588;
  static constexpr double kCubic = 0.044715;
  // 2u = x (a + b x^2): a = 2 sqrt(2/pi) and b = 0.044715 a as float pairs,
  // and 3b for 2u'.
  static constexpr float kLinearHi = 1.5957692f;
  static constexpr float kLinearLo = -4.534068e-08f;
  static constexpr float kCubicHi = 0.071354814f;
  static constexpr float kCubicLo = 2.3988325e-09f;
  static constexpr float kSlopeCubic = 0.21406445f;
  // Beyond |x| = 11.5, |2u| > 126: e^-|2u| times anything here underflows,
  // and below it 2^64 e^-|2u| stays a normal float.
  static constexpr float kBeyond = 11.5f;

  // Below |x| = 0.75, gelu = x / 2 + x^2 P(x^2) and gelu' = 1/2 + x R(x^2),
  // polynomials fitted by scripts/fit_normal_tail.py (relative error 2.9e-8,
  // the rounding of 1 / sqrt(2 pi) at x = 0): there e^-|2u| is near 1, and
  // its rounding, and that of (1 + e)^2, would reach the result at full size.
  static constexpr float kCentral = 0.75f;
  FUSEDNN_HD static float central_half_tanh_ratio(float sq) {
    return math::horner(
        sq, 0.0006415121f, -0.0010950686f, 0.00081076054f, -0.0014469649f, 0.010228807f,
        -0.06682082f, 0.3989423f);
  }
  FUSEDNN_HD static float central_slope_odd(float sq) {
    return math::horner(
        sq, 0.0012366446f, -0.0021909585f, 0.0025249838f, -0.010342758f, 0.061262954f,
        -0.26728058f, 0.7978846f);
  }

  // |2u| = hi + lo, to about 2^-44 relative, for t = |x| <= 14: every
  // product and the sum carry their rounding error, since the exponential
  // turns an absolute error in |2u| into the same relative error.
  FUSEDNN_HD static void two_u_pair(float t, float sq, float& hi, float& lo) {
    const float sq_lo = fmadd(t, t, -sq);
    const float cubic = kCubicHi * sq;
    const float cubic_lo = fmadd(kCubicHi, sq, -cubic);
    const float coefficient = kLinearHi + cubic;
    const float big = cubic > kLinearHi ? cubic : kLinearHi;
    const float small = cubic > kLinearHi ? kLinearHi : cubic;
    const float sum_lo = small - (coefficient - big);
    const float coefficient_lo =
        sum_lo + fmadd(kCubicHi, sq_lo, fmadd(kCubicLo, sq, cubic_lo + kLinearLo));
    hi = t * coefficient;
    lo = fmadd(t, coefficient_lo, fmadd(t, coefficient, -hi));
  }

  // Within the core range |2u| <= 67 and x e^-|2u| stays normal: no clamp,
  // no 2^64 offset, and one division for both signs.
  static constexpr float kForwardCoreBound = 9.0f;
  FUSEDNN_HD static float forward_core_f32(float x, const ActivationParams&) {
    const float t = math::magnitude(x);
    float hi, lo;
    two_u_pair(t, t * t, hi, lo);
    const math::ExpParts e = math::exp_neg_pair_core(hi, lo);
    const float q = e.rounded() + 1.0f;
    const float numerator = x < 0.0f ? e.scale * fmadd(x, e.m1, x) : x;
    const float x_sq = x * x;
    const float central = fmadd(x_sq, central_half_tanh_ratio(x_sq), 0.5f * x);
    const float inside = t < kCentral ? central : numerator / q;
    return x == 0.0f ? x : inside;
  }
  // x sigmoid(2u) = x / (1 + e) above zero and x e / (1 + e) below, with
  // e = e^-|2u| scaled by 2^64 so that a subnormal result rounds once.
  FUSEDNN_HD static float forward_outer_f32(float x) {
    const float t = abs_(x);
    const bool beyond = t > kBeyond;
    const float tc = beyond ? kBeyond : t;  // NaN passes and propagates
    float hi, lo;
    two_u_pair(tc, tc * tc, hi, lo);
    const math::ExpParts e = math::exp_neg_pair_parts(hi, lo);
    const float unscale = math::Traits<float>::kExpUnscale;
    const float q = fmadd(e.scale, fmadd(e.m1, unscale, unscale), 1.0f);  // 1 + e
    const float below = ((e.scale * fmadd(x, e.m1, x)) / q) * unscale;
    const float x_sq = x * x;
    const float central = fmadd(x_sq, central_half_tanh_ratio(x_sq), 0.5f * x);  // +0 for -0
    const float tail = x < 0.0f ? below : x / q;
    const float inside = x == 0.0f ? x : (t < kCentral ? central : tail);
    return beyond ? (x < 0.0f ? x * 0.0f : x) : inside;  // -inf: NaN, as in PyTorch
  }
  // q - |x| 2u' = q - a |x| - 3b |x| x^2 (for |x| = t, q = 1 + e, e
  // rounded) cancels where the derivative's terms do, so its parts are
  // exact pairs (q, 3b |x|, x^2, a) whose small halves are summed first; of
  // the large terms, the smaller of a |x| and 3b |x|^3 is subtracted from q
  // first (they cross at |x| = sqrt(a / 3b)), so that the intermediate
  // rounding is the lesser.
  FUSEDNN_HD static float q_minus_slope(float t, float sq, float e, float q) {
    const float cubic_slope = t * kSlopeCubic;
    const float small_parts =
        fmadd(-cubic_slope, fmadd(t, t, -sq),
              fmadd(-fmadd(t, kSlopeCubic, -cubic_slope), sq,
                    fmadd(-t, kLinearLo, e - (q - 1.0f))));
    const bool cubic_first = t < 2.73f;
    const float first = cubic_first ? fmadd(-cubic_slope, sq, q) : fmadd(-t, kLinearHi, q);
    return cubic_first ? fmadd(-t, kLinearHi, first + small_parts)
                       : fmadd(-cubic_slope, sq, first + small_parts);
  }
  // The derivative as backward_outer_f32 forms it, inside the core range of
  // the forward: one division for both signs, no 2^64 offset.
  static constexpr float kBackwardCoreBound = kForwardCoreBound;
  FUSEDNN_HD static float backward_core_f32(float g, float x, const ActivationParams&) {
    const float t = math::magnitude(x);
    const float sq = t * t;
    float hi, lo;
    two_u_pair(t, sq, hi, lo);
    const math::ExpParts e = math::exp_neg_pair_core(hi, lo);
    const float e_rounded = e.rounded();
    const float q = 1.0f + e_rounded;
    const float below_sum = q_minus_slope(t, sq, e_rounded, q);
    const float above_sum = fmadd(t, fmadd(kSlopeCubic, sq, kLinearHi), -q);  // |x| 2u' - q
    const float numerator = x < 0.0f ? e.scale * fmadd(e.m1, below_sum, below_sum)
                                     : e_rounded * above_sum;
    const float quotient = numerator / math::one_plus_squared(e_rounded);
    const float central = g * fmadd(x, central_slope_odd(sq), 0.5f);
    const float tail = x < 0.0f ? g * quotient : math::mul_one_plus(g, quotient);
    return t < kCentral ? central : tail;
  }
  // sigmoid(2u) + x sigmoid'(2u) 2u' with e = e^-|2u| and q = 1 + e:
  // e (q + x 2u') / q^2 below zero, 1 + e (x 2u' - q) / q^2 above. Below
  // zero the derivative is formed in double with the exponential's scale
  // (math::WideExpParts), so that g times it rounds once: it is subnormal
  // from |x| = 10.2 on, and g times it a normal float to |x| = 13.1 for g
  // up to 2^128; beyond kBackwardBeyond (|2u| > 218) every such product
  // rounds to 0.
  static constexpr float kBackwardBeyond = 14.0f;
  FUSEDNN_HD static float backward_outer_f32(float g, float x) {
    const float t = abs_(x);
    const bool beyond = t > kBackwardBeyond;
    const float tc = beyond ? kBackwardBeyond : t;
    const float sq = tc * tc;
    float hi, lo;
    two_u_pair(tc, sq, hi, lo);
    const math::WideExpParts e = math::exp_neg_pair_wide(hi, lo);
    const float e_unscaled = e.rounded();
    const float q_squared = math::one_plus_squared(e_unscaled);
    const float q = 1.0f + e_unscaled;
    const float slope = fmadd(kSlopeCubic, sq, kLinearHi);  // 2u'
    const float below_sum = q_minus_slope(tc, sq, e_unscaled, q);
    const float below = math::times_wide(
        g, e.scale * double(fmadd(e.m1, below_sum, below_sum) / q_squared));
    // Above zero, 1 + e (x 2u' - q) / q^2: the rounding of the quotient is
    // scaled down by e.
    const float above = math::mul_one_plus(g, e_unscaled * (fmadd(tc, slope, -q) / q_squared));
    // Beyond, sigmoid' has underflowed: 1 or 0 plus x * 0, NaN at the
    // infinities as in PyTorch.
    const float far = g * ((x > 0.0f ? 1.0f : 0.0f) + x * 0.0f);
    const float central = g * fmadd(x, central_slope_odd(x * x), 0.5f);
    return t < kCentral ? central : (beyond ? far : (x < 0.0f ? below : above));
  }

  template <class T> FUSEDNN_HD static T forward(T x, const ActivationParams& p) {
    if constexpr (sizeof(T) == sizeof(float)) {
      return abs_(x) <= kForwardCoreBound ? forward_core_f32(x, p) : forward_outer_f32(x);
    } else {
      const double xd = x;
      const double two_u = 2.0 * kSqrt2OverPi * (xd + kCubic * xd * xd * xd);
      const double e = exp_(-abs_(two_u));
      return T(xd * math::sigmoid_from_exp(two_u, e));
    }
  }
  template <class T> FUSEDNN_HD static T backward_x(T g, T x, const ActivationParams& p) {
    if constexpr (sizeof(T) == sizeof(float)) {
      return abs_(x) <= kBackwardCoreBound ? backward_core_f32(g, x, p) : backward_outer_f32(g, x);
    } else {
      const double xd = x;
      const double x2 = xd * xd;
      const double two_u = 2.0 * kSqrt2OverPi * (xd + kCubic * x2 * xd);
      const double e = exp_(-abs_(two_u));
      const double q = 1.0 + e;
      const double s = math::sigmoid_from_exp(two_u, e);
      const double ds = e / (q * q);  // s (1 - s)
      const double d_two_u = 2.0 * kSqrt2OverPi * (1.0 + 3.0 * kCubic * x2);
      // Where sigmoid' has underflowed, x^2 may have overflowed: the slope
      // term is then x * 0 (NaN only for infinite x, as in PyTorch).
      const double slope = abs_(xd) > 1e10 ? xd * 0.0 : xd * ds * d_two_u;
      return T(double(g) * (s + slope));
    }
  }
};

// silu(x) = x sigmoid(x). The forward runs in the input's precision, with
// the numerator x e^x formed from the scaled exponential so that far-negative
// x (e^x subnormal) rounds once. float32's derivative runs in float
// arithmetic (backward_x_f32); float64's in double.
struct Silu {
  static constexpr bool kBackwardFromY = false;
  // Core ranges: within them e^-|x| and every product with it stay normal,
  // and below -5 the derivative needs the series of backward_x_f32.
  static constexpr float kForwardCoreBound = 64.0f;
  static constexpr float kBackwardCoreBound = 5.0f;

  // x / (1 + e) above zero and x e / (1 + e) below, e = e^-|x| left
  // unrounded in the product x e. One division serves both signs.
  FUSEDNN_HD static float forward_core_f32(float x, const ActivationParams&) {
    const math::ExpParts e = math::exp_neg_core(math::magnitude(x));
    const float e_rounded = e.rounded();
    const float numerator = x >= 0.0f ? x : e.scale * fmadd(x, e.m1, x);
    return numerator / (1.0f + e_rounded);
  }
  // For float16 and bfloat16 storage: x / (1 + e) and x e / (1 + e) with e
  // from math::exp_coarse_parts, rounded.
  FUSEDNN_HD static float forward_core_half(float x, const ActivationParams&) {
    const float e = math::exp_coarse_parts(-math::magnitude(x)).exp();
    return (x >= 0.0f ? x : x * e) / (1.0f + e);
  }
  template <class T> FUSEDNN_HD static T forward_full(T x) {
    using Tr = math::Traits<T>;
    const T scaled = math::exp_scaled_nonpositive(-abs_(x));
    const T e = scaled * Tr::kExpUnscale;
    const bool positive = x >= T(0);
    const T ratio = (positive ? x : x * scaled) / (T(1) + e);
    const T y = positive ? ratio : ratio * Tr::kExpUnscale;
    return x < Tr::kNegligibleBelow ? x * T(0) : y;  // -inf gives NaN, as in PyTorch
  }
  template <class T> FUSEDNN_HD static T forward(T x, const ActivationParams& p) {
    if constexpr (sizeof(T) == sizeof(float)) {
      return abs_(x) <= kForwardCoreBound ? forward_core_f32(x, p) : forward_full(x);
    } else {
      return forward_full(x);
    }
  }

  // The derivative as backward_x_f32 forms it inside the core range:
  // 1 + e (x - q) / q^2 above zero, e (q + x) / q^2 below, q = 1 + e.
  FUSEDNN_HD static float backward_core_f32(float g, float x, const ActivationParams&) {
    const math::ExpParts e = math::exp_neg_core(math::magnitude(x));
    const float e_rounded = e.rounded();
    const bool positive = x >= 0.0f;
    const float numerator = positive ? x - (1.0f + e_rounded) : (1.0f + x) + e_rounded;
    const float ratio = numerator / math::one_plus_squared(e_rounded);
    const float above = math::mul_one_plus(g, e_rounded * ratio);
    const float below = g * (e.scale * fmadd(e.m1, ratio, ratio));
    return positive ? above : below;
  }
  // silu' < 0.5 everywhere below zero; its terms cancel around the root
  // near -1.28, and past -5 they no longer do.
  static constexpr float kCancelling = 5.0f;
  // With e = e^-|x| and q = 1 + e: 1 + e (x - q) / q^2 above zero, where
  // the small term's rounding is scaled down by e, and e (q + x) / q^2
  // below, where q + x = (1 + x) + e (1 + x exact near the root) cancels
  // with the derivative. One division serves both. Below zero the
  // exponential stays unrounded, its scale in double (math::WideExpParts),
  // until the product with g, which rounds once: the derivative is
  // subnormal from x = -92 on, and g times it a normal float to x = -181 for
  // g up to 2^128. Below -kWideExpMax the derivative is x * 0, as in the
  // float64 path.
  FUSEDNN_HD static float backward_x_f32(float g, float x, const ActivationParams&) {
    const float t = abs_(x);
    const math::WideExpParts e = math::exp_neg_wide(t);
    const float e_unscaled = e.rounded();
    const float q = 1.0f + e_unscaled;
    const bool positive = x >= 0.0f;
    const float numerator = positive ? x - q : (1.0f + x) + e_unscaled;
    const float ratio = numerator / math::one_plus_squared(e_unscaled);
    // +inf: 0 * inf, NaN as in PyTorch.
    const float above = math::mul_one_plus(g, e_unscaled * ratio);
    // Past the cancelling range, (q + x) / q^2 = sum (1 - w), sum = q + x, with
    // w = 1 - 1 / q^2 = e (e + 2) (1 - 2e + 3e^2 - 4e^3) to within 5e^4
    // (e < 0.007): w's roundings are scaled down by w, where rounding q^2
    // would cost up to an ulp.
    const float inverse_series = math::horner(e_unscaled, -4.0f, 3.0f, -2.0f, 1.0f);
    const float w = (e_unscaled * (e_unscaled + 2.0f)) * inverse_series;
    // (1 + x) + (e - sum w) rounds once; 1 + x is exact for x in [-2^24, -1].
    const float far = (1.0f + x) + fmadd(-numerator, w, e_unscaled);
    const float below_ratio = t > kCancelling ? far : ratio;
    const float below =
        math::times_wide(g, e.scale * double(fmadd(e.m1, below_ratio, below_ratio)));
    return x < -math::kWideExpMax ? g * (x * 0.0f) : (positive ? above : below);
  }

  // s (1 + x (1 - s)) = a (q + x b) / q^2 with q = 1 + e, e = exp(-|x|),
  // (a, b) = (1, e) for x >= 0 and (e, 1) below: no 1 - s cancellation.
  // Below zero the scaled exponential keeps the subnormal tail.
  template <class T> FUSEDNN_HD static T backward_x(T g, T x, const ActivationParams& p) {
    if constexpr (sizeof(T) == sizeof(float)) {
      return abs_(x) <= kBackwardCoreBound ? backward_core_f32(g, x, p) : backward_x_f32(g, x, p);
    } else {
      const double unscale = math::Traits<T>::kExpUnscale;
      const double xd = x;
      const double scaled = math::exp_scaled_wide(-abs_(x));
      const double e = scaled * unscale;
      const bool positive = xd >= 0.0;
      const double q = 1.0 + e;
      const double d = (positive ? 1.0 : scaled) * fmadd(xd, positive ? e : 1.0, q) / (q * q);
      const double derivative = positive ? d : d * unscale;
      return x < math::Traits<T>::kNegligibleBelow ? g * (x * T(0)) : T(double(g) * derivative);
    }
  }
};

// silu's derivative for float16 and bfloat16 storage: within |x| <= 40
// from E = e^-x itself (no sign split: E stays below e^40 and Q^2 below
// 2^116), silu'(x) = ((1 + x) E + 1) / Q^2 with Q = 1 + E, about 20
// vector operations where Silu's core takes about 33 and covers |x| <= 5
// only. The numerator cancels around the root near -1.28, where 1 + x is
// exact (x in [-2, -0.5]) and so is a + 1 for a = (1 + x) 2^k, E = 2^k
// (1 + m1) left unrounded (math::ExpParts): the numerator a m1 + (a + 1)
// rounds once, and its error is m1's, about 2^-28 of E, as in Silu's
// (1 + x) + e. Elsewhere nothing cancels, and every operation rounds by
// 2^-24 of its result: within about 6 * 2^-24 of the derivative, against
// the 2^-12 of half an ulp of either storage type. Not the float32
// kernel's bits rounded (they differ where the float32 values straddle a
// rounding boundary of the storage type), but within one ulp. Beyond the
// core, Silu's float32 evaluation (the tails and the special values).
struct SiluHalf : Silu {
  static constexpr float kBackwardCoreBound = 40.0f;
  FUSEDNN_HD static float backward_core_f32(float g, float x, const ActivationParams&) {
    const math::ExpParts e = math::exp_neg_core(x);
    const float q = 1.0f + e.rounded();
    const float a = (1.0f + x) * e.scale;
    const float numerator = fmadd(a, e.m1, a + 1.0f);
    return g * (numerator / (q * q));
  }
  template <class T> FUSEDNN_HD static T backward_x(T g, T x, const ActivationParams& p) {
    static_assert(sizeof(T) == sizeof(float), "float arithmetic for half storage");
    return abs_(x) <= kBackwardCoreBound ? backward_core_f32(g, x, p) : backward_x_f32(g, x, p);
  }
};

// softplus(x) = log1p(exp(beta x)) / beta, and x where beta x > threshold
// (PyTorch). The product beta x is carried as a pair (hi + lo) so that
// beta != 1 costs no accuracy in the exponential tail.
// kUnitBeta: the default beta = 1, where beta x = x exactly and the pair
// and the final division fall away (the dispatcher picks it).
template <bool kUnitBeta> struct SoftplusWith {
  static constexpr bool kBackwardFromY = false;
  template <class T> FUSEDNN_HD static void scaled(T x, const ActivationParams& p, T& hi, T& lo) {
    if constexpr (kUnitBeta) {
      hi = x;
      lo = T(0);
    } else {
      const T beta = T(p.a);
      hi = x * beta;
      lo = fmadd(x, beta, -hi);
      lo = abs_(hi) <= math::Traits<T>::kMaxFinite ? lo : T(0);  // x * beta overflowed
    }
  }
  template <class T> FUSEDNN_HD static T forward(T x, const ActivationParams& p) {
    T hi, lo;
    scaled(x, p, hi, lo);
    const bool positive = hi > T(0);
    const T tail = -abs_(hi);
    const T e = kUnitBeta ? math::exp_(tail) : math::exp_pair(tail, positive ? -lo : lo);
    const T sp = (positive ? hi : T(0)) + (math::log1p_unit(e) + (positive ? lo : T(0)));
    return hi > T(p.b) ? x : (kUnitBeta ? sp : sp * T(1.0 / p.a));
  }
  // float: g / (1 + e) above zero and g e / (1 + e) below, e = e^-|beta x|,
  // the latter formed in double with the exponential's scale
  // (math::WideExpParts), so that g times it rounds once: e is subnormal
  // from |beta x| = 87 on, and g e a normal float to |beta x| = 176 for g
  // up to 2^128.
  FUSEDNN_HD static float backward_f32(float g, float x, const ActivationParams& p) {
    float hi, lo;
    scaled(x, p, hi, lo);
    const bool positive = hi >= 0.0f;
    const math::WideExpParts e = math::exp_neg_pair_wide(abs_(hi), positive ? lo : -lo);
    const float inverse = 1.0f / (1.0f + e.rounded());
    const float below = math::times_wide(g, e.scale * double(fmadd(e.m1, inverse, inverse)));
    return hi > float(p.b) ? g : (positive ? g * inverse : below);
  }
  // g sigmoid(beta x) from the exponential evaluated in T and rounded:
  // float64's form, and float32's where e is normal (Softplus's core).
  template <class T> FUSEDNN_HD static T backward_rounded(T g, T x, const ActivationParams& p) {
    T hi, lo;
    scaled(x, p, hi, lo);
    const bool positive = hi >= T(0);
    const T tail = -abs_(hi);
    const T e = kUnitBeta ? math::exp_(tail) : math::exp_pair(tail, positive ? -lo : lo);
    return hi > T(p.b) ? g : g * math::sigmoid_from_exp(hi, e);
  }
  template <class T> FUSEDNN_HD static T backward_x(T g, T x, const ActivationParams& p) {
    if constexpr (sizeof(T) == sizeof(float)) {
      return backward_f32(g, x, p);
    } else {
      return backward_rounded(g, x, p);
    }
  }
};
// beta != 1, with a backward core range |beta x| <= 80, where e = e^-|beta x|
// is normal and the derivative takes the float exponential rounded: the
// tails' double scale (backward_f32), on every element, made the backward
// 1.5-2.2 times slower.
struct Softplus : SoftplusWith<false> {
  static constexpr float kBackwardCoreBound = 80.0f;  // on |beta x|
  FUSEDNN_HD static float backward_core_bound(const ActivationParams& p) {
    return float(double(kBackwardCoreBound) / abs_(p.a));
  }
  FUSEDNN_HD static float backward_core_f32(float g, float x, const ActivationParams& p) {
    return backward_rounded(g, x, p);
  }
  template <class T> FUSEDNN_HD static T backward_x(T g, T x, const ActivationParams& p) {
    if constexpr (sizeof(T) == sizeof(float)) {
      return abs_(x) <= backward_core_bound(p) ? backward_core_f32(g, x, p) : backward_f32(g, x, p);
    } else {
      return backward_rounded(g, x, p);
    }
  }
};

// The default beta = 1, with float32 core evaluations: within |x| <= 80
// e = e^-|x| is normal, and log1p(e) = e G(e) takes a polynomial instead
// of a logarithm and its division.
struct SoftplusUnitBeta : SoftplusWith<true> {
  static constexpr float kForwardCoreBound = 80.0f;
  static constexpr float kBackwardCoreBound = 80.0f;
  // G(e) = log1p(e) / e = 1 + e Q(e) on [0, 1], fitted by
  // scripts/fit_softplus.py (relative error 5.3e-9); the constant 1 is
  // added exactly in the last fused multiply-add.
  FUSEDNN_HD static float log1p_ratio(float e) {
    return math::horner(
        e, -0.0033144243f, 0.020184098f, -0.057621263f, 0.1067564f, -0.15352122f, 0.19694112f,
        -0.249583f, 0.3333048f, -0.4999993f, 1.0f);
  }
  // max(x, 0) + e G(e), with e = scale (1 + m1) left unrounded in the
  // product: below zero it is the whole result.
  FUSEDNN_HD static float forward_core_f32(float x, const ActivationParams& p) {
    const math::ExpParts e = math::exp_neg_core(math::magnitude(x));
    const float ratio = log1p_ratio(e.rounded());
    const float log_term = e.scale * fmadd(e.m1, ratio, ratio);
    const float sp = x > 0.0f ? x + log_term : log_term;
    return x > float(p.b) ? x : sp;
  }
  FUSEDNN_HD static float backward_core_f32(float g, float x, const ActivationParams& p) {
    const math::ExpParts e = math::exp_neg_core(math::magnitude(x));
    const float e_rounded = e.rounded();
    return x > float(p.b) ? g : g * math::sigmoid_from_exp(x, e_rounded);
  }
  template <class T> FUSEDNN_HD static T forward(T x, const ActivationParams& p) {
    if constexpr (sizeof(T) == sizeof(float)) {
      if (abs_(x) <= kForwardCoreBound) return forward_core_f32(x, p);
    }
    return SoftplusWith<true>::forward(x, p);
  }
  template <class T> FUSEDNN_HD static T backward_x(T g, T x, const ActivationParams& p) {
    if constexpr (sizeof(T) == sizeof(float)) {
      return abs_(x) <= kBackwardCoreBound ? backward_core_f32(g, x, p) : backward_f32(g, x, p);
    } else {
      return SoftplusWith<true>::backward_x(g, x, p);
    }
  }
};

// mish(x) = x tanh(softplus(x)); with n = e^x,
// tanh(softplus(x)) = n (n + 2) / (n (n + 2) + 2), which neither cancels nor
// overflows once x is capped (beyond 40 the ratio is 1 in double).
// float32 runs in float arithmetic from e = e^-|x| (n = e below zero,
// 1 / e above): tanh(softplus(x)) = e (e + 2) / D below zero,
// D = e (e + 2) + 2, and 1 - 2e^2 / P above, P = 2e (e + 1) + 1, so
// above zero the result is x (1 + small) with the small term's rounding
// scaled down, and below it the exponential stays unrounded and scaled by
// 2^64 (math::ExpParts; the derivative's scale a double, see
// backward_outer_f32) until the last product, so the subnormal tail rounds
// once. Below kExpMin the forward is x * 0 (the derivative below
// -kWideExpMax), as in the float64 path.
// Inside the core range the same formulas run without the offset and the
// guards. float64 evaluates its exponential in double and the rest likewise.
struct Mish {
  static constexpr bool kBackwardFromY = false;
  static constexpr double kCap = 40.0;

  // e = e^-|x| (clamped below kExpMin) as unrounded parts and rounded, and
  // the denominator of either sign: P above zero, D below.
  struct SoftplusTanhF32 {
    math::ExpParts parts;
    float e;
    float den;
  };
  FUSEDNN_HD static SoftplusTanhF32 softplus_tanh_f32(float t, bool positive) {
    using Tr = math::Traits<float>;
    const float tc = t > -Tr::kExpMin ? -Tr::kExpMin : t;  // NaN passes and propagates
    SoftplusTanhF32 s;
    s.parts = math::exp_neg_pair_parts(tc, 0.0f);
    s.e = s.parts.scale * fmadd(s.parts.m1, Tr::kExpUnscale, Tr::kExpUnscale);
    const float c = positive ? 1.0f : 2.0f;
    s.den = fmadd(positive ? 2.0f * s.e : s.e, s.e + c, c);
    return s;
  }

  // Core range: within |x| <= 64, e = e^-|x| and the results below zero
  // (about |x| e) stay normal, so the forms below need no clamps, no 2^64
  // offset, and no guard for an infinite x or g.
  static constexpr float kForwardCoreBound = 64.0f;
  static constexpr float kBackwardCoreBound = 64.0f;
  // e^-t as unrounded parts and rounded, and P (above zero) or D (below).
  FUSEDNN_HD static SoftplusTanhF32 softplus_tanh_core(float t, bool positive) {
    SoftplusTanhF32 s;
    s.parts = math::exp_neg_core(t);
    s.e = s.parts.rounded();
    const float c = positive ? 1.0f : 2.0f;
    s.den = fmadd(positive ? 2.0f * s.e : s.e, s.e + c, c);
    return s;
  }
  FUSEDNN_HD static float forward_core_f32(float x, const ActivationParams&) {
    const bool positive = x >= 0.0f;
    const SoftplusTanhF32 s = softplus_tanh_core(math::magnitude(x), positive);
    const float quotient = (positive ? -2.0f * s.e : s.e + 1.0f) * s.e / s.den;
    const float above = fmadd(x, quotient, x);
    const float ratio = fmadd(-x, quotient, x);
    const float below = s.parts.scale * fmadd(s.parts.m1, ratio, ratio);
    const float y = positive ? above : below;
    return x == 0.0f ? x : y;  // keeps -0
  }
  // The bracket of backward_x_f32 below zero, (1 + x) - e N / D^2, from
  // the numerator N = x e_poly + (1 + e) D; 1 + x as an exact pair.
  FUSEDNN_HD static float below_ratio(float x, float e, float quotient) {
    const float one_plus_x = 1.0f + x;
    const float one_plus_x_lo = x - (one_plus_x - 1.0f);
    return one_plus_x + fmadd(-e, quotient, one_plus_x_lo);
  }
  FUSEDNN_HD static float derivative_numerator(float x, bool positive, float e, float den) {
    const float e_poly = fmadd(fmadd(e + 4.0f, e, 8.0f), e, 4.0f);
    return positive ? fmadd(2.0f * x, e, 2.0f * x) - den : fmadd(x, e_poly, (1.0f + e) * den);
  }
  FUSEDNN_HD static float backward_core_f32(float g, float x, const ActivationParams&) {
    const bool positive = x >= 0.0f;
    const SoftplusTanhF32 s = softplus_tanh_core(math::magnitude(x), positive);
    const float quotient = derivative_numerator(x, positive, s.e, s.den) / (s.den * s.den);
    const float above = math::mul_one_plus(g, (2.0f * (s.e * s.e)) * quotient);
    const float ratio = below_ratio(x, s.e, quotient);
    const float below = g * (s.parts.scale * fmadd(s.parts.m1, ratio, ratio));
    return positive ? above : below;
  }

  FUSEDNN_HD static float forward_outer_f32(float x) {
    using Tr = math::Traits<float>;
    const bool positive = x >= 0.0f;
    const SoftplusTanhF32 s = softplus_tanh_f32(abs_(x), positive);
    // One division for both signs: -2e^2 / P, and e (e + 1) / D for
    // x (e + 2) / D = x (1 - e (e + 1) / D), whose rounding is scaled down.
    const float quotient = (positive ? -2.0f * s.e : s.e + 1.0f) * s.e / s.den;
    const float above = math::mul_one_plus(x, quotient);  // +inf stays +inf
    const float ratio = fmadd(-x, quotient, x);
    const float below = (s.parts.scale * fmadd(s.parts.m1, ratio, ratio)) * Tr::kExpUnscale;
    const float y = x == 0.0f ? x : (positive ? above : below);  // keeps -0
    return x < Tr::kExpMin ? x * 0.0f : y;  // -inf: NaN, as in PyTorch
  }
  // From d/dx = n ((n + 2) / D + 4 x (n + 1) / D^2) in terms of e:
  // 1 + 2e^2 (2x (1 + e) - P) / P^2 above zero and
  // e ((e + 2) D + 4x (e + 1)) / D^2 below, whose bracket cancels around
  // the root near -1.19; one division serves both.
  // Below zero the exponential stays unrounded, its scale in double
  // (math::WideExpParts), until the product with g, which rounds once: the
  // derivative is subnormal from x = -92 on, and g times it a normal float
  // to x = -181 for g up to 2^128.
  FUSEDNN_HD static float backward_outer_f32(float g, float x) {
    using Tr = math::Traits<float>;
    const float t = abs_(x);
    const bool positive = x >= 0.0f;
    const math::WideExpParts wide = math::exp_neg_wide(t);
    const float e = wide.rounded();
    const float c = positive ? 1.0f : 2.0f;
    const float den = fmadd(positive ? 2.0f * e : e, e + c, c);
    const float x_capped = positive && t > -Tr::kExpMin ? -Tr::kExpMin : x;
    // Below zero the bracket over D^2 is taken as
    // (1 + x) - e ((1 + e) D + x (4 + 8e + 4e^2 + e^3)) / D^2 (from
    // D^2 - 4 (1 + e) = e (4 + 8e + 4e^2 + e^3)): the quotient's roundings,
    // D^2's included, are scaled down by e. 1 + x is an exact pair: its
    // rounding (for |x| < 1/2) would otherwise reach the result at full size.
    const float quotient = derivative_numerator(x_capped, positive, e, den) / (den * den);
    // Where e^2 has underflowed the term is x * 0: NaN at +inf, as in PyTorch.
    const float small = t > -Tr::kExpMin ? x * 0.0f : (2.0f * (e * e)) * quotient;
    const float above = math::mul_one_plus(g, small);
    const float ratio = below_ratio(x, e, quotient);
    const float below = math::times_wide(g, wide.scale * double(fmadd(wide.m1, ratio, ratio)));
    return x < -math::kWideExpMax ? g * (x * 0.0f) : (positive ? above : below);
  }

  template <class T> FUSEDNN_HD static T forward(T x, const ActivationParams& p) {
    if constexpr (sizeof(T) == sizeof(float)) {
      return abs_(x) <= kForwardCoreBound ? forward_core_f32(x, p) : forward_outer_f32(x);
    } else {
      const double unscale = math::Traits<T>::kExpUnscale;
      const double xd = x;
      const double scaled = math::exp_scaled_wide(x > T(kCap) ? T(kCap) : x);
      const double n = scaled * unscale;
      const double u = n * (n + 2.0);
      const bool positive = xd >= 0.0;
      const double ratio = (positive ? u : scaled * (n + 2.0)) / (u + 2.0);
      const double y = positive ? xd * ratio : xd * ratio * unscale;
      return x < math::Traits<T>::kNegligibleBelow ? x * T(0) : T(y);  // -inf: NaN, as in PyTorch
    }
  }
  // d/dx = tanh(sp) + x sech^2(sp) sigmoid(x)
  //      = n ((n + 2) / D + 4 x (n + 1) / D^2),  D = n (n + 2) + 2.
  // Past the cap the slope term is x * 0, so +inf gives NaN as in PyTorch;
  // far below zero the derivative underflows and is x * 0 (NaN for -inf).
  template <class T> FUSEDNN_HD static T backward_x(T g, T x, const ActivationParams& p) {
    if constexpr (sizeof(T) == sizeof(float)) {
      return abs_(x) <= kBackwardCoreBound ? backward_core_f32(g, x, p) : backward_outer_f32(g, x);
    } else {
      const double unscale = math::Traits<T>::kExpUnscale;
      const bool capped = x > T(kCap);
      const double xd = x;
      const double scaled = math::exp_scaled_wide(capped ? T(kCap) : x);
      const double n = scaled * unscale;
      const double inv_den = 1.0 / (n * (n + 2.0) + 2.0);
      const double slope = capped ? xd * 0.0 : 4.0 * xd * (n + 1.0) * inv_den * inv_den;
      const double bracket = fmadd(n + 2.0, inv_den, slope);
      const double d = xd >= 0.0 ? n * bracket : scaled * bracket * unscale;
      return x < math::Traits<T>::kNegligibleBelow ? g * (x * T(0)) : T(double(g) * d);
    }
  }
};

// float32 evaluates the hard activations in float arithmetic, as PyTorch
// does: three roundings at most (about 1.5 ulp), and the sum x + 3 is exact
// near the kink at -3 (Sterbenz). In double they would be exact but
// compute-bound on the CPU. float64 keeps double with divisions that round
// as a / b does (divide_by).
struct Hardsigmoid {
  static constexpr bool kBackwardFromY = false;
  template <class T> FUSEDNN_HD static T forward(T x, const ActivationParams&) {
    if constexpr (sizeof(T) == sizeof(float)) {
      return x <= T(-3) ? T(0) : (x >= T(3) ? T(1) : (x + T(3)) / T(6));
    } else {
      return x <= -3.0 ? T(0) : (x >= 3.0 ? T(1) : T(math::divide_by(x + 3.0, 6.0, 1.0 / 6.0)));
    }
  }
  template <class T> FUSEDNN_HD static T backward_x(T g, T x, const ActivationParams&) {
    if constexpr (sizeof(T) == sizeof(float)) {
      return (x > T(-3) && x < T(3)) ? g / T(6) : T(0);
    } else {
      return (x > T(-3) && x < T(3)) ? T(math::divide_by(double(g), 6.0, 1.0 / 6.0)) : T(0);
    }
  }
};

struct Hardswish {
  static constexpr bool kBackwardFromY = false;
  // x * clamp(x + 3, 0, 6) / 6, and x itself from 3 on (x * 6 could
  // overflow): -inf gives NaN, as in PyTorch.
  template <class T> FUSEDNN_HD static T forward(T x, const ActivationParams&) {
    if constexpr (sizeof(T) == sizeof(float)) {
      const T r = x + T(3) < T(0) ? T(0) : x + T(3);
      return x >= T(3) ? x : x * r / T(6);
    } else {
      const double r = x + 3.0 < 0.0 ? 0.0 : x + 3.0;
      return x >= 3.0 ? x : T(math::divide_by(x * r, 6.0, 1.0 / 6.0));
    }
  }
  // PyTorch's one-sided choices: 0 at x = -3, 1 at x = 3. The slope is
  // (2x + 3) / 6, whose sum is exact around its root at -1.5, where
  // x / 3 + 1/2 would cancel.
  template <class T> FUSEDNN_HD static T backward_x(T g, T x, const ActivationParams&) {
    if constexpr (sizeof(T) == sizeof(float)) {
      const T slope = (x + x + T(3)) / T(6);
      return x <= T(-3) ? T(0) : (x < T(3) ? g * slope : g);
    } else {
      const double slope = math::divide_by(x, 3.0, 1.0 / 3.0) + 0.5;
      return x <= -3.0 ? T(0) : (x < 3.0 ? T(g * slope) : g);
    }
  }
};

// hardsigmoid, and hardswish's forward, with the division by 6 as a
// product with the float nearest 1/6, for float16 and bfloat16 storage:
// not the float32 bits of Hardsigmoid and Hardswish, but the same results
// once rounded to the storage type, for every input of each type (and for
// every gradient in hardsigmoid's g / 6; the half tests check all 65,536
// of each). The float32 division (vdivps) was most of their half kernels'
// arithmetic. Hardswish's
// backward slope is (2x + 3) times the float nearest 1/6: three roundings
// of 2^-24 (2x + 3 is exact around its root at -1.5), so g times it lies
// within 2^-22 of g (2x + 3) / 6, and within one ulp of either storage type
// after its rounding, but not always the float32 kernel's result rounded
// (the products differ for some of the 2^32 pairs of inputs); the division
// held it to about 78% of a copy.
struct HardsigmoidHalf {
  static constexpr bool kBackwardFromY = false;
  static constexpr float kSixth = 1.0f / 6.0f;
  template <class T> FUSEDNN_HD static T forward(T x, const ActivationParams&) {
    return x <= T(-3) ? T(0) : (x >= T(3) ? T(1) : (x + T(3)) * T(kSixth));
  }
  template <class T> FUSEDNN_HD static T backward_x(T g, T x, const ActivationParams&) {
    return (x > T(-3) && x < T(3)) ? g * T(kSixth) : T(0);
  }
};
struct HardswishHalf : Hardswish {
  template <class T> FUSEDNN_HD static T forward(T x, const ActivationParams&) {
    const T r = x + T(3) < T(0) ? T(0) : x + T(3);
    return x >= T(3) ? x : x * r * T(HardsigmoidHalf::kSixth);
  }
  template <class T> FUSEDNN_HD static T backward_x(T g, T x, const ActivationParams&) {
    const T slope = (x + x + T(3)) * T(HardsigmoidHalf::kSixth);
    return x <= T(-3) ? T(0) : (x < T(3) ? g * slope : g);
  }
};

// As PyTorch: the bounds are first rounded to x's type (a = min_val,
// b = max_val), and the slope is 1 strictly between the rounded bounds. So
// forward, backward from x and backward from y agree: y is a rounded bound
// exactly where the slope is 0.
struct Hardtanh {
  static constexpr bool kBackwardFromY = true;
  template <class T> FUSEDNN_HD static T forward(T x, const ActivationParams& p) {
    const T lo = T(p.a), hi = T(p.b);
    return x < lo ? lo : (x > hi ? hi : x);
  }
  template <class T> FUSEDNN_HD static T backward_x(T g, T x, const ActivationParams& p) {
    return (x <= T(p.a) || x >= T(p.b)) ? T(0) : g;
  }
  template <class T> FUSEDNN_HD static T backward_y(T g, T y, const ActivationParams& p) {
    return backward_x(g, y, p);
  }
};

// hardtanh for float16 and bfloat16 storage: the same results as Hardtanh
// wherever min_val <= max_val (the Python layer checks it), clamped to the
// lower bound, then to the upper: each comparison and select is one
// vmaxps or vminps (NaN passes both), where Hardtanh's nested selects
// took four comparisons and a mask operation, which held bfloat16 hardtanh
// forward to 77% of a copy.
struct HardtanhHalf : Hardtanh {
  template <class T> FUSEDNN_HD static T forward(T x, const ActivationParams& p) {
    const T lo = T(p.a), hi = T(p.b);
    const T above_lo = x < lo ? lo : x;
    return above_lo > hi ? hi : above_lo;
  }
};

}  // namespace act

// Whether an activation has float32 core evaluations: forward_core_f32(x, p)
// (and backward_core_f32(g, x, p)) equal to forward (backward_x) wherever
// |x| <= kForwardCoreBound (kBackwardCoreBound), at less arithmetic. A
// vectorized loop takes them for whole blocks of inputs inside the bound.
template <class Op, class = void> struct HasForwardCore : std::false_type {};
template <class Op>
struct HasForwardCore<Op, std::void_t<decltype(Op::kForwardCoreBound)>> : std::true_type {};
template <class Op, class = void> struct HasBackwardCore : std::false_type {};
template <class Op>
struct HasBackwardCore<Op, std::void_t<decltype(Op::kBackwardCoreBound)>> : std::true_type {};

// Whether an activation has a forward core of its own for float16 and
// bfloat16 storage: forward_core_half(x, p) within the same bound as
// forward_core_f32, in cheaper float arithmetic whose results, once
// rounded to the storage type, lie within one ulp of the exact values but
// are not always the float32 core's rounded. The half types' kernels take
// it for every element inside the bound (cpu/activation_runs.h:
// activation_run).
template <class Op, class = void> struct HasHalfForwardCore : std::false_type {};
template <class Op>
struct HasHalfForwardCore<
    Op, std::void_t<decltype(Op::forward_core_half(0.0f, std::declval<const ActivationParams&>()))>>
    : std::true_type {};

// The bound on |x| of Op's backward core range: kBackwardCoreBound, or
// Op::backward_core_bound(p) where the range depends on the parameters
// (softplus with beta != 1: |beta x| <= 80).
template <class Op, class = void> struct HasParameterCoreBound : std::false_type {};
template <class Op>
struct HasParameterCoreBound<
    Op, std::void_t<decltype(Op::backward_core_bound(std::declval<const ActivationParams&>()))>>
    : std::true_type {};
template <class Op> FUSEDNN_HD float backward_core_bound(const ActivationParams& p) {
  if constexpr (HasParameterCoreBound<Op>::value) {
    return Op::backward_core_bound(p);
  } else {
    return Op::kBackwardCoreBound;
  }
}

// Calls fn(Op{}) with the struct for `a`; used by the CPU and CUDA
// dispatchers so that the list of activations lives in one place.
template <class Fn>
decltype(auto) visit_activation(Activation a, const ActivationParams& p, Fn&& fn) {
  switch (a) {
    case Activation::sigmoid: return fn(act::Sigmoid{});
    case Activation::tanh: return fn(act::Tanh{});
    case Activation::relu: return fn(act::Relu{});
    case Activation::leaky_relu: return fn(act::LeakyRelu{});
    case Activation::elu: return fn(act::Elu{});
    case Activation::selu: return fn(act::Selu{});
    case Activation::gelu:
      if (p.tanh_approximation) return fn(act::GeluTanh{});
      return fn(act::GeluErf{});
    case Activation::silu: return fn(act::Silu{});
    case Activation::softplus:
      if (p.a == 1.0) return fn(act::SoftplusUnitBeta{});
      return fn(act::Softplus{});
    case Activation::mish: return fn(act::Mish{});
    case Activation::hardsigmoid: return fn(act::Hardsigmoid{});
    case Activation::hardswish: return fn(act::Hardswish{});
    case Activation::hardtanh: return fn(act::Hardtanh{});
    default: break;
  }
  return fn(act::Relu{});  // unreachable: the bindings validate the id
}

}  // namespace fusednn
