// Times the activation loops on data that stays in L1, one thread, so
// that no memory traffic enters: what each kernel's arithmetic alone costs
// per element. Against a streamed copy's cost per element (as
// `python -m fusednn bench` measures it), this bounds the share of the copy
// roof a kernel can reach however well its memory traffic overlaps: with n
// cores, at most copy_ns / (floor_ns / n), for a forward, and
// 1.5 copy_ns / (floor_ns / n) for a backward (two reads, one write).
//
// It runs the library's own AVX-512 loops over 4096 normal inputs clipped
// to |x| < 3.8 so that every block takes its core form: with no argument
// the float32 loops (cpu/activation_runs.h); with `half`, the float16 and
// bfloat16 kernels' blocks (cpu/activation_loops.h: widening, the half
// types' forms of the arithmetic, rounding), for every activation the bench
// times, the backward from y where the bench takes it. Build and run from
// the repository root on an AVX-512 machine:
//   g++ -std=c++17 -O3 -ffp-contract=off -fno-math-errno -fno-trapping-math \
//       -fopenmp-simd -mavx512f -mavx512bw -mavx512dq -mavx512vl -mavx2 -mfma -mf16c \
//       -mprefer-vector-width=512 -Icsrc/include -Icsrc \
//       scripts/compute_floor.cpp -o /tmp/compute_floor
//   /tmp/compute_floor; /tmp/compute_floor half
// Medians are noisy on a shared machine: run it twice and read the lower.
#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <random>
#include <vector>

#define FUSEDNN_ISA avx512
#include "cpu/activation_loops.h"
#include "cpu/activation_runs.h"

namespace {

using fusednn::ActivationParams;
namespace act = fusednn::act;
namespace loops = fusednn::cpu::avx512;

constexpr int kElements = 4096;
constexpr int kCallsPerRound = 2000;
constexpr int kRounds = 9;

// The best over kRounds of the mean time per element of kCallsPerRound calls.
template <class Call> double ns_per_element(Call call) {
  double best = 1e30;
  for (int round = 0; round < kRounds; ++round) {
    const auto start = std::chrono::steady_clock::now();
    for (int k = 0; k < kCallsPerRound; ++k) {
      call();
      asm volatile("" ::: "memory");  // keeps every call's stores
    }
    const std::chrono::duration<double> took = std::chrono::steady_clock::now() - start;
    best = std::min(best, took.count() / kCallsPerRound / kElements * 1e9);
  }
  return best;
}

template <class Op> __attribute__((noinline)) void forward(const float* x, float* y, ActivationParams q) {
  const auto input = [=](int64_t i) FUSEDNN_INLINE_LAMBDA { return x[i]; };
  const auto as_is = [](int64_t, float v) FUSEDNN_INLINE_LAMBDA { return v; };
  loops::activation_run<Op>(y, kElements, q, input, as_is);
}

template <class Op>
__attribute__((noinline)) void backward(const float* g, const float* x, float* y, ActivationParams q) {
  const auto input = [=](int64_t i) FUSEDNN_INLINE_LAMBDA { return x[i]; };
  const auto grad = [=](int64_t i) FUSEDNN_INLINE_LAMBDA { return g[i]; };
  loops::activation_backward_run<Op, false, float>(y, kElements, q, input, grad);
}

struct Data {
  std::vector<float> x, g, y;
  Data() : x(kElements), g(kElements), y(kElements) {
    std::mt19937 gen(1);
    std::normal_distribution<float> normal;
    for (float& v : x) {
      v = normal(gen);
      if (std::fabs(v) >= 3.8f) v = 1.0f;
    }
    for (float& v : g) v = normal(gen);
  }
};

template <class Op> void report(const char* name, Data& d, ActivationParams q) {
  const double f = ns_per_element([&] { forward<Op>(d.x.data(), d.y.data(), q); });
  const double b = ns_per_element([&] { backward<Op>(d.g.data(), d.x.data(), d.y.data(), q); });
  std::printf("%-10s %8.3f %9.3f\n", name, f, b);
}

}  // namespace

// The float16 or bfloat16 kernels' blocks of Op (storage S): forward, and
// backward from x, or from y where from_y is set, on the stored values.
template <class Op, class S>
void report_half(const char* name, const Data& d, ActivationParams q, bool from_y) {
  using Forward = typename loops::HalfForward<Op>::Form;
  const loops::BlockMode mode{loops::block_storage_of<S>(), false};
  std::vector<S> x(kElements), g(kElements), y(kElements), out(kElements);
  for (int i = 0; i < kElements; ++i) {
    x[i] = fusednn::Storage<S>::store(d.x[i]);
    g[i] = fusednn::Storage<S>::store(d.g[i]);
  }
  loops::forward_block<Forward, float>(y.data(), x.data(), kElements, q, mode);
  const double f = ns_per_element(
      [&] { loops::forward_block<Forward, float>(out.data(), x.data(), kElements, q, mode); });
  double b;
  if constexpr (Op::kBackwardFromY) {
    if (from_y) {
      b = ns_per_element([&] {
        loops::backward_block<typename loops::HalfBackward<Op, true>::Form, float, true>(
            out.data(), g.data(), y.data(), kElements, q, mode);
      });
    }
  }
  if (!from_y) {
    b = ns_per_element([&] {
      loops::backward_block<typename loops::HalfBackward<Op, false>::Form, float, false>(
          out.data(), g.data(), x.data(), kElements, q, mode);
    });
  }
  std::printf("%-12s %8.3f %9.3f%s\n", name, f, b, from_y ? "  (backward from y)" : "");
}

template <class S> void report_half_all(const Data& d) {
  const ActivationParams none = fusednn::make_activation_params(0.0, 0.0, false);
  report_half<act::Relu, S>("relu", d, none, true);
  report_half<act::LeakyReluFloatSlope, S>("leaky_relu", d,
                                           fusednn::make_activation_params(0.01, 0.0, false), true);
  report_half<act::Hardtanh, S>("hardtanh", d, fusednn::make_activation_params(-1.0, 1.0, false),
                                true);
  report_half<act::Hardsigmoid, S>("hardsigmoid", d, none, false);
  report_half<act::Hardswish, S>("hardswish", d, none, false);
  report_half<act::Sigmoid, S>("sigmoid", d, none, true);
  report_half<act::Tanh, S>("tanh", d, none, true);
  report_half<act::Elu, S>("elu", d, fusednn::make_activation_params(1.0, 0.0, false), true);
  report_half<act::Selu, S>("selu", d, none, true);
  report_half<act::GeluErf, S>("gelu", d, none, false);
  report_half<act::GeluTanh, S>("gelu_tanh", d, fusednn::make_activation_params(0.0, 0.0, true),
                                false);
  report_half<act::Silu, S>("silu", d, none, false);
  report_half<act::SoftplusUnitBeta, S>("softplus", d,
                                        fusednn::make_activation_params(1.0, 20.0, false), false);
  report_half<act::Mish, S>("mish", d, none, false);
}

int main(int argc, char** argv) {
  Data d;
  if (argc > 1 && std::strcmp(argv[1], "half") == 0) {
    std::printf("ns per element per core, float16 blocks, data in L1\n");
    std::printf("%-12s %8s %9s\n", "kernel", "forward", "backward");
    report_half_all<fusednn::Float16>(d);
    std::printf("ns per element per core, bfloat16 blocks, data in L1\n");
    std::printf("%-12s %8s %9s\n", "kernel", "forward", "backward");
    report_half_all<fusednn::BFloat16>(d);
    return 0;
  }
  const ActivationParams none = fusednn::make_activation_params(0.0, 0.0, false);
  std::printf("ns per element per core, float32, data in L1\n");
  std::printf("%-10s %8s %9s\n", "kernel", "forward", "backward");
  report<act::Relu>("relu", d, none);
  report<act::Sigmoid>("sigmoid", d, none);
  report<act::Tanh>("tanh", d, none);
  report<act::Elu>("elu", d, fusednn::make_activation_params(1.0, 0.0, false));
  report<act::Selu>("selu", d, none);
  report<act::GeluErf>("gelu", d, none);
  report<act::GeluTanh>("gelu_tanh", d, fusednn::make_activation_params(0.0, 0.0, true));
  report<act::Silu>("silu", d, none);
  report<act::SoftplusUnitBeta>("softplus", d, fusednn::make_activation_params(1.0, 20.0, false));
  report<act::Mish>("mish", d, none);
}
