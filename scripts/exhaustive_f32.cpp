// Checks float32 activation kernels on every float32 input up to a bound,
// against double-precision references (erfc and exp, whose own error is
// far below a float32 ulp in these ranges), and prints the largest error
// in float32 ulp of the reference. Where a derivative's two terms cancel by
// a factor of 2 or more, the error is reported instead in units of
// 8 * 2^-24 (the tests' bound there for a unit gradient).
//
// It calls the header math (fusednn/activations.h) directly, which is what
// the CPU and CUDA kernels evaluate per element. Build and run from the
// repository root:
//   g++ -std=c++17 -O2 -ffp-contract=off -fno-math-errno -fopenmp -mfma \
//       -Icsrc/include scripts/exhaustive_f32.cpp -o /tmp/exhaustive_f32
//   /tmp/exhaustive_f32 gelu 20
// BOUND `all` takes every one of the 2^32 bit patterns: infinities and NaN
// too, where a result counts as exact if it is the reference's value (an
// infinity) or both are NaN.
//
// Built for AVX-512 (add -DFUSEDNN_ISA=avx512 -Icsrc -mavx512f -mavx512bw
// -mavx512dq -mavx512vl -mavx2 -mf16c), it also runs the gelu forward's
// inputs through the CPU kernels' own loop (cpu/activation_runs.h, whose
// core blocks evaluate the header's form a vector at a time) and counts
// the results whose bits differ from the per-element evaluation.
// Kernels: gelu gelu_b gelu_tanh gelu_tanh_b silu silu_b sigmoid sigmoid_b tanh
// tanh_b elu elu_b selu selu_b softplus softplus_b mish mish_b.
// A kernel takes one to two minutes on two cores for |x| <= 20.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <string>

#include "fusednn/activations.h"
#if defined(FUSEDNN_ISA)
#include "cpu/activation_runs.h"
#endif

#define FUSEDNN_STRINGIFY_VALUE(x) #x
#define FUSEDNN_STRINGIFY(x) FUSEDNN_STRINGIFY_VALUE(x)

namespace {

using fusednn::ActivationParams;
namespace act = fusednn::act;

double ulp_of(double reference) {
  const float rounded = std::fabs(static_cast<float>(reference));
  return static_cast<double>(std::nextafter(rounded, INFINITY)) - rounded;
}

double normal_cdf(double x) { return 0.5 * std::erfc(-x / std::sqrt(2.0)); }
double normal_pdf(double x) { return std::exp(-0.5 * x * x) / std::sqrt(2.0 * M_PI); }
double logistic(double x) { return 1.0 / (1.0 + std::exp(-x)); }

struct Evaluation {
  double got;
  double reference;
  double largest_term;  // 0 for forwards: no cancellation rule
};

bool evaluate(const std::string& kernel, float x, Evaluation& e) {
  const ActivationParams p{};
  // PyTorch's defaults: elu alpha = 1, softplus beta = 1 and threshold = 20.
  static const ActivationParams unit_alpha = fusednn::make_activation_params(1.0, 0.0, false);
  static const ActivationParams softplus = fusednn::make_activation_params(1.0, 20.0, false);
  const double xd = x;
  if (kernel == "gelu") {
    e = {act::GeluErf::forward<float>(x, p), xd * normal_cdf(xd), 0.0};
  } else if (kernel == "gelu_b") {
    const double cdf = normal_cdf(xd), slope = xd * normal_pdf(xd);
    e = {act::GeluErf::backward_x<float>(1.0f, x, p), cdf + slope,
         std::max(std::fabs(cdf), std::fabs(slope))};
  } else if (kernel == "silu") {
    e = {act::Silu::forward<float>(x, p), xd * logistic(xd), 0.0};
  } else if (kernel == "silu_b") {
    const double s = logistic(xd), slope = xd * s * (1.0 - s);
    e = {act::Silu::backward_x<float>(1.0f, x, p), s + slope,
         std::max(std::fabs(s), std::fabs(slope))};
  } else if (kernel == "sigmoid") {
    e = {act::Sigmoid::forward<float>(x, p), logistic(xd), 0.0};
  } else if (kernel == "gelu_tanh") {
    const double u = act::GeluTanh::kSqrt2OverPi * (xd + act::GeluTanh::kCubic * xd * xd * xd);
    // x sigmoid(2u): 1 + tanh(u) would cancel below zero.
    e = {act::GeluTanh::forward<float>(x, p), xd * logistic(2.0 * u), 0.0};
  } else if (kernel == "gelu_tanh_b") {
    const double two_u =
        2.0 * act::GeluTanh::kSqrt2OverPi * (xd + act::GeluTanh::kCubic * xd * xd * xd);
    const double ex = std::exp(-std::fabs(two_u));  // sigmoid' = e / (1 + e)^2, free of 1 - s
    const double s = xd >= 0 ? 1.0 / (1.0 + ex) : ex / (1.0 + ex);
    const double slope = xd * ex / ((1.0 + ex) * (1.0 + ex)) * 2.0 * act::GeluTanh::kSqrt2OverPi *
                         (1.0 + 3.0 * act::GeluTanh::kCubic * xd * xd);
    e = {act::GeluTanh::backward_x<float>(1.0f, x, p), s + slope,
         std::max(std::fabs(s), std::fabs(slope))};
  } else if (kernel == "mish") {
    e = {act::Mish::forward<float>(x, p), xd * std::tanh(std::log1p(std::exp(xd))), 0.0};
  } else if (kernel == "mish_b") {
    const double softplus = std::log1p(std::exp(xd)), t = std::tanh(softplus);
    const double slope = xd * logistic(xd) / (std::cosh(softplus) * std::cosh(softplus));
    e = {act::Mish::backward_x<float>(1.0f, x, p), t + slope,
         std::max(std::fabs(t), std::fabs(slope))};
  } else if (kernel == "sigmoid_b") {
    const double ex = std::exp(-std::fabs(xd));
    e = {act::Sigmoid::backward_x<float>(1.0f, x, p), ex / ((1.0 + ex) * (1.0 + ex)), 0.0};
  } else if (kernel == "tanh_b") {
    const double ex = std::exp(-2.0 * std::fabs(xd));
    e = {act::Tanh::backward_x<float>(1.0f, x, p), 4.0 * ex / ((1.0 + ex) * (1.0 + ex)), 0.0};
  } else if (kernel == "elu_b") {
    e = {act::Elu::backward_x<float>(1.0f, x, unit_alpha), xd > 0 ? 1.0 : std::exp(xd), 0.0};
  } else if (kernel == "selu_b") {
    const double slope = xd > 0 ? 1.0 : fusednn::act::kSeluAlpha * std::exp(xd);
    e = {act::Selu::backward_x<float>(1.0f, x, p), fusednn::act::kSeluScale * slope, 0.0};
  } else if (kernel == "tanh") {
    e = {act::Tanh::forward<float>(x, p), std::tanh(xd), 0.0};
  } else if (kernel == "elu") {
    e = {act::Elu::forward<float>(x, unit_alpha), xd > 0 ? xd : std::expm1(xd), 0.0};
  } else if (kernel == "selu") {
    const double y = xd > 0 ? xd : fusednn::act::kSeluAlpha * std::expm1(xd);
    e = {act::Selu::forward<float>(x, p), fusednn::act::kSeluScale * y, 0.0};
  } else if (kernel == "softplus") {
    e = {act::SoftplusUnitBeta::forward<float>(x, softplus),
         xd > 20.0 ? xd : std::log1p(std::exp(xd)), 0.0};
  } else if (kernel == "softplus_b") {
    e = {act::SoftplusUnitBeta::backward_x<float>(1.0f, x, softplus),
         xd > 20.0 ? 1.0 : logistic(xd), 0.0};
  } else {
    return false;
  }
  return true;
}

}  // namespace

int main(int argc, char** argv) {
  if (argc < 3) {
    std::fprintf(stderr,
                 "usage: %s KERNEL BOUND\n"
                 "kernels: gelu gelu_b gelu_tanh gelu_tanh_b silu silu_b sigmoid sigmoid_b tanh\n"
                 "         tanh_b elu elu_b selu selu_b softplus softplus_b mish mish_b\n",
                 argv[0]);
    return 2;
  }
  const std::string kernel = argv[1];
  const bool every_pattern = std::string(argv[2]) == "all";
  const float bound = every_pattern ? INFINITY : std::strtof(argv[2], nullptr);
  Evaluation probe;
  if (!evaluate(kernel, 1.0f, probe)) {
    std::fprintf(stderr, "unknown kernel %s\n", kernel.c_str());
    return 2;
  }
  uint32_t top;
  std::memcpy(&top, &bound, sizeof top);
  if (every_pattern) top = 0x7fffffffu;
  double worst_ulp = 0, worst_ulp_x = 0, worst_cancel = 0, worst_cancel_x = 0;
  int64_t loop_differs = 0;
#pragma omp parallel
  {
    double ulp = 0, ulp_x = 0, cancel = 0, cancel_x = 0;
    int64_t differs = 0;
#pragma omp for schedule(dynamic, 1 << 20)
    for (int64_t magnitude = 0; magnitude <= static_cast<int64_t>(top); ++magnitude) {
#if defined(FUSEDNN_ISA)
      // A chunk of consecutive magnitudes of both signs through the loop.
      constexpr int64_t kChunk = 4096;
      if (kernel == "gelu" && magnitude % kChunk == 0) {
        static thread_local float xs[2 * kChunk], ys[2 * kChunk];
        const int64_t count = std::min<int64_t>(kChunk, static_cast<int64_t>(top) - magnitude + 1);
        for (int64_t k = 0; k < count; ++k) {
          for (uint32_t half : {0u, 1u}) {
            const uint32_t bits = static_cast<uint32_t>(magnitude + k) | (half << 31);
            std::memcpy(&xs[2 * k + half], &bits, sizeof bits);
          }
        }
        const float* in = xs;
        fusednn::cpu::FUSEDNN_ISA::activation_run<act::GeluErf>(
            ys, 2 * count, ActivationParams{}, [=](int64_t i) { return in[i]; },
            [](int64_t, float y) { return y; });
        for (int64_t k = 0; k < 2 * count; ++k) {
          const float scalar = act::GeluErf::forward<float>(xs[k], ActivationParams{});
          differs += std::memcmp(&scalar, &ys[k], sizeof scalar) != 0;
        }
      }
#endif
      for (uint32_t sign : {0u, 0x80000000u}) {
        const uint32_t bits = static_cast<uint32_t>(magnitude) | sign;
        float x;
        std::memcpy(&x, &bits, sizeof x);
        Evaluation e;
        evaluate(kernel, x, e);
        if (e.got == e.reference || (std::isnan(e.got) && std::isnan(e.reference))) continue;
        const double error = std::fabs(e.got - e.reference);
        if (e.largest_term >= 2.0 * std::fabs(e.reference)) {
          const double scaled = error / (8.0 * std::ldexp(1.0, -24));
          if (!(scaled <= cancel)) cancel = scaled, cancel_x = x;
        } else {
          const double in_ulp = error / ulp_of(e.reference);
          if (!(in_ulp <= ulp)) ulp = in_ulp, ulp_x = x;  // NaN counts as worst
        }
      }
    }
#pragma omp critical
    {
      loop_differs += differs;
      if (!(ulp <= worst_ulp)) worst_ulp = ulp, worst_ulp_x = ulp_x;
      if (!(cancel <= worst_cancel)) worst_cancel = cancel, worst_cancel_x = cancel_x;
    }
  }
  std::printf("%s, every float32 %s%g: max %.3f ulp at x = %.9g; where the terms cancel: "
              "max |error| = %.3f x 8 * 2^-24 at x = %.9g\n",
              kernel.c_str(), every_pattern ? "(NaN too), |x| <= " : "|x| <= ", bound, worst_ulp,
              worst_ulp_x, worst_cancel, worst_cancel_x);
#if defined(FUSEDNN_ISA)
  if (kernel == "gelu")
    std::printf("gelu forward through the %s loop: %lld results differ from the per-element "
                "evaluation\n", FUSEDNN_STRINGIFY(FUSEDNN_ISA), static_cast<long long>(loop_differs));
#endif
  return 0;
}
