// The activation functions and their derivatives, one struct per
// activation, shared by the CPU and CUDA kernels. Each struct has
//   forward(x, params)            -> y
//   backward_x(g, x, params)      -> g * f'(x)
//   backward_y(g, y, params)      -> g * f'(x), from y = f(x)
// the last one only where kBackwardFromY says the derivative can be formed
// from the output. Conventions follow PyTorch (parameters, the one-sided
// derivative at kinks, NaN and infinity handling); float32 inputs are
// evaluated in float32 where that stays within a few ulp, and in double
// where a float32 evaluation would not (the GELUs, products with a
// parameter that is not a float32 value).
#pragma once

#include <cmath>
#include <limits>

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
  // a and b rounded down and up to float: a float x compares with these
  // exactly as it compares with a and b, without converting x to double
  // (which a GPU does at a fraction of its float rate). Set by
  // make_activation_params.
  float a_down = 0.0f, a_up = 0.0f, b_down = 0.0f, b_up = 0.0f;
};

// The smallest float >= a (a not NaN; +inf above the float range).
inline float float_at_least(double a) {
  constexpr double kFloatMax = 3.4028234663852886e38;
  if (a > kFloatMax) return std::numeric_limits<float>::infinity();
  if (a < -kFloatMax)
    return a == -std::numeric_limits<double>::infinity() ? -std::numeric_limits<float>::infinity()
                                                         : -std::numeric_limits<float>::max();
  const float f = static_cast<float>(a);
  return static_cast<double>(f) < a ? std::nextafter(f, std::numeric_limits<float>::infinity())
                                    : f;
}

// The largest float <= a.
inline float float_at_most(double a) { return -float_at_least(-a); }

inline ActivationParams make_activation_params(double a, double b, bool tanh_approximation) {
  ActivationParams p;
  p.a = a;
  p.b = b;
  p.tanh_approximation = tanh_approximation;
  if (a == a && b == b) {
    p.a_down = float_at_most(a);
    p.a_up = float_at_least(a);
    p.b_down = float_at_most(b);
    p.b_up = float_at_least(b);
  }
  return p;
}

namespace act {

using math::abs_;
using math::exp_;

constexpr double kSeluScale = 1.0507009873554804934193349852946;
constexpr double kSeluAlpha = 1.6732632423543772848170429916717;

struct Sigmoid {
  static constexpr bool kBackwardFromY = true;
  template <class T> FUSEDNN_HD static T forward(T x, const ActivationParams&) {
    return math::sigmoid_(x);
  }
  // e / (1 + e)^2 with e = exp(-|x|): symmetric and free of 1 - s; the
  // scaled exponential keeps the subnormal tail accurate.
  template <class T> FUSEDNN_HD static T backward_x(T g, T x, const ActivationParams&) {
    using Tr = math::Traits<T>;
    const T scaled = math::exp_scaled_nonpositive(-abs_(x));
    const T e = scaled * Tr::kExpUnscale;
    return g * ((scaled / math::one_plus_squared(e)) * Tr::kExpUnscale);
  }
  template <class T> FUSEDNN_HD static T backward_y(T g, T y, const ActivationParams&) {
    return g * (y * (T(1) - y));
  }
};

struct Tanh {
  static constexpr bool kBackwardFromY = true;
  template <class T> FUSEDNN_HD static T forward(T x, const ActivationParams&) {
    return math::tanh_(x);
  }
  // 1 - tanh^2 = 4e / (1 + e)^2 with e = exp(-2|x|).
  template <class T> FUSEDNN_HD static T backward_x(T g, T x, const ActivationParams&) {
    using Tr = math::Traits<T>;
    const T scaled = math::exp_scaled_nonpositive(T(-2) * abs_(x));
    const T e = scaled * Tr::kExpUnscale;
    return g * ((T(4) * scaled / math::one_plus_squared(e)) * Tr::kExpUnscale);
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

struct Elu {
  static constexpr bool kBackwardFromY = true;  // for alpha >= 0
  template <class T> FUSEDNN_HD static T forward(T x, const ActivationParams& p) {
    return x > T(0) ? x : T(p.a) * math::expm1_nonpositive(x);
  }
  template <class T> FUSEDNN_HD static T backward_x(T g, T x, const ActivationParams& p) {
    return x <= T(0) ? g * T(p.a) * exp_(x) : g;
  }
  // y + alpha in double: near y = -alpha it cancels, and alpha need not be
  // a float32 value.
  template <class T> FUSEDNN_HD static T backward_y(T g, T y, const ActivationParams& p) {
    return y <= T(0) ? T(double(g) * (double(y) + p.a)) : g;
  }
};

struct Selu {
  static constexpr bool kBackwardFromY = true;
  template <class T> FUSEDNN_HD static T forward(T x, const ActivationParams&) {
    return x > T(0) ? T(kSeluScale) * x
                    : T(kSeluScale * kSeluAlpha) * math::expm1_nonpositive(x);
  }
  template <class T> FUSEDNN_HD static T backward_x(T g, T x, const ActivationParams&) {
    return x <= T(0) ? g * T(kSeluScale * kSeluAlpha) * exp_(x) : g * T(kSeluScale);
  }
  template <class T> FUSEDNN_HD static T backward_y(T g, T y, const ActivationParams&) {
    return y <= T(0) ? T(double(g) * (double(y) + kSeluScale * kSeluAlpha)) : g * T(kSeluScale);
  }
};

// GELU, exact (x Phi(x)) or with the tanh approximation
// 0.5 x (1 + tanh(u)) = x * sigmoid(2u), u = sqrt(2/pi) (x + 0.044715 x^3).
// Evaluated in double: the tails need Phi and sigmoid(2u) with relative
// accuracy where u itself is large. Float inputs use the float-exponential
// Phi of math.h. Double inputs use its scaled Phi and phi, which keep their
// accuracy down the tail where the results are subnormal; in the tail
// (x < -kNormalTail) x Phi(x) = -phi(x) S(-x) is formed as one product.
struct GeluErf {
  static constexpr bool kBackwardFromY = false;
  template <class T> FUSEDNN_HD static T forward(T x, const ActivationParams&) {
    if constexpr (sizeof(T) == sizeof(float)) {
      double cdf, pdf;
      math::normal_cdf_pdf_f32(x, cdf, pdf);
      return T(double(x) * cdf);
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
  template <class T> FUSEDNN_HD static T backward_x(T g, T x, const ActivationParams&) {
    if constexpr (sizeof(T) == sizeof(float)) {
      double cdf, pdf;
      math::normal_cdf_pdf_f32(x, cdf, pdf);
      return T(double(g) * fmadd(double(x), pdf, cdf));
    } else {
      const double pdf = math::normal_pdf_scaled(x);
      const double cdf = math::normal_cdf_scaled(x, pdf, math::normal_tail_series(-x));
      return g * (fmadd(x, pdf, cdf) * math::Traits<double>::kExpUnscale);
    }
  }
};

struct GeluTanh {
  static constexpr bool kBackwardFromY = false;
  static constexpr double kSqrt2OverPi = 0.79788456080286535588;
  static constexpr double kCubic = 0.044715;
  // sigmoid(2u) and e = exp(-|2u|) for float input: 2u in double, the
  // exponential in float (exp_neg_wide); for double input all in double.
  template <class T> FUSEDNN_HD static double exp_neg(double a) {
    if constexpr (sizeof(T) == sizeof(float)) {
      return math::exp_neg_wide(a);
    } else {
      return exp_(-a);
    }
  }
  template <class T> FUSEDNN_HD static T forward(T x, const ActivationParams&) {
    const double xd = x;
    const double two_u = 2.0 * kSqrt2OverPi * (xd + kCubic * xd * xd * xd);
    const double e = exp_neg<T>(abs_(two_u));
    return T(xd * math::sigmoid_from_exp(two_u, e));
  }
  template <class T> FUSEDNN_HD static T backward_x(T g, T x, const ActivationParams&) {
    const double xd = x;
    const double x2 = xd * xd;
    const double two_u = 2.0 * kSqrt2OverPi * (xd + kCubic * x2 * xd);
    const double e = exp_neg<T>(abs_(two_u));
    const double q = 1.0 + e;
    const double s = math::sigmoid_from_exp(two_u, e);
    const double ds = e / (q * q);  // s (1 - s)
    const double d_two_u = 2.0 * kSqrt2OverPi * (1.0 + 3.0 * kCubic * x2);
    // Where sigmoid' has underflowed, x^2 may have overflowed: the slope term
    // is then x * 0 (NaN only for infinite x, as in PyTorch).
    const double slope = abs_(xd) > 1e10 ? xd * 0.0 : xd * ds * d_two_u;
    return T(double(g) * (s + slope));
  }
};

// silu(x) = x sigmoid(x). The forward runs in the input's precision, with
// the numerator x e^x formed from the scaled exponential so that far-negative
// x (e^x subnormal) rounds once; the backward evaluates its exponential in
// the input's precision and the rest in double.
struct Silu {
  static constexpr bool kBackwardFromY = false;
  template <class T> FUSEDNN_HD static T forward(T x, const ActivationParams&) {
    using Tr = math::Traits<T>;
    const T scaled = math::exp_scaled_nonpositive(-abs_(x));
    const T e = scaled * Tr::kExpUnscale;
    const bool positive = x >= T(0);
    const T ratio = (positive ? x : x * scaled) / (T(1) + e);
    const T y = positive ? ratio : ratio * Tr::kExpUnscale;
    return x < Tr::kNegligibleBelow ? x * T(0) : y;  // -inf gives NaN, as in PyTorch
  }
  // s (1 + x (1 - s)) = a (q + x b) / q^2 with q = 1 + e, e = exp(-|x|),
  // (a, b) = (1, e) for x >= 0 and (e, 1) below: no 1 - s cancellation.
  // The exponential runs in T, the rest in double; below zero the scaled
  // exponential keeps the subnormal tail of a float64 result.
  template <class T> FUSEDNN_HD static T backward_x(T g, T x, const ActivationParams&) {
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
  template <class T> FUSEDNN_HD static T backward_x(T g, T x, const ActivationParams& p) {
    T hi, lo;
    scaled(x, p, hi, lo);
    const bool positive = hi >= T(0);
    const T tail = -abs_(hi);
    const T e = kUnitBeta ? math::exp_(tail) : math::exp_pair(tail, positive ? -lo : lo);
    return hi > T(p.b) ? g : g * math::sigmoid_from_exp(hi, e);
  }
};
using Softplus = SoftplusWith<false>;
using SoftplusUnitBeta = SoftplusWith<true>;

// mish(x) = x tanh(softplus(x)); with n = e^x,
// tanh(softplus(x)) = n (n + 2) / (n (n + 2) + 2), which neither cancels nor
// overflows once x is capped (beyond 40 the ratio is 1 in double). The
// exponential is evaluated in the input's precision, the rest in double.
struct Mish {
  static constexpr bool kBackwardFromY = false;
  static constexpr double kCap = 40.0;
  template <class T> FUSEDNN_HD static T forward(T x, const ActivationParams&) {
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
  // d/dx = tanh(sp) + x sech^2(sp) sigmoid(x)
  //      = n ((n + 2) / D + 4 x (n + 1) / D^2),  D = n (n + 2) + 2.
  // Past the cap the slope term is x * 0, so +inf gives NaN as in PyTorch;
  // far below zero the derivative underflows and is x * 0 (NaN for -inf).
  template <class T> FUSEDNN_HD static T backward_x(T g, T x, const ActivationParams&) {
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
};

// The hard activations are evaluated in double: then (x + 3) / 6 and the
// products round once, exactly as the float64 reference rounds to float32
// (the divisions by 6 and 3 are exact-quotient multiplications, divide_by).
struct Hardsigmoid {
  static constexpr bool kBackwardFromY = false;
  template <class T> FUSEDNN_HD static T forward(T x, const ActivationParams&) {
    const double xd = x;
    return xd <= -3.0 ? T(0) : (xd >= 3.0 ? T(1) : T(math::divide_by(xd + 3.0, 6.0, 1.0 / 6.0)));
  }
  template <class T> FUSEDNN_HD static T backward_x(T g, T x, const ActivationParams&) {
    return (x > T(-3) && x < T(3)) ? T(math::divide_by(double(g), 6.0, 1.0 / 6.0)) : T(0);
  }
};

struct Hardswish {
  static constexpr bool kBackwardFromY = false;
  // x * clamp(x + 3, 0, 6) / 6, and x itself from 3 on (x * 6 could
  // overflow): -inf gives NaN, as in PyTorch.
  template <class T> FUSEDNN_HD static T forward(T x, const ActivationParams&) {
    const double xd = x;
    const double r = xd + 3.0 < 0.0 ? 0.0 : xd + 3.0;
    return xd >= 3.0 ? x : T(math::divide_by(xd * r, 6.0, 1.0 / 6.0));
  }
  // PyTorch's one-sided choices: 0 at x = -3, 1 at x = 3.
  template <class T> FUSEDNN_HD static T backward_x(T g, T x, const ActivationParams&) {
    const double xd = x;
    const double slope = math::divide_by(xd, 3.0, 1.0 / 3.0) + 0.5;
    return xd <= -3.0 ? T(0) : (xd < 3.0 ? T(double(g) * slope) : g);
  }
};

struct Hardtanh {
  static constexpr bool kBackwardFromY = true;
  // float x: compared with the float bounds, which is exact (see
  // ActivationParams); double x with a and b themselves.
  template <class T> FUSEDNN_HD static T forward(T x, const ActivationParams& p) {
    if constexpr (sizeof(T) == sizeof(float)) {
      return x < p.a_up ? T(p.a) : (x > p.b_down ? T(p.b) : x);
    } else {
      return x < p.a ? T(p.a) : (x > p.b ? T(p.b) : x);
    }
  }
  template <class T> FUSEDNN_HD static T backward_x(T g, T x, const ActivationParams& p) {
    if constexpr (sizeof(T) == sizeof(float)) {
      return (x <= p.a_down || x >= p.b_up) ? T(0) : g;
    } else {
      return (x <= p.a || x >= p.b) ? T(0) : g;
    }
  }
  template <class T> FUSEDNN_HD static T backward_y(T g, T y, const ActivationParams& p) {
    return backward_x(g, y, p);
  }
};

}  // namespace act

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
