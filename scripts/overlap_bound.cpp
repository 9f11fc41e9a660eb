// How much of the copy roof a float16 or bfloat16 activation can reach on
// this machine for the arithmetic it does, measured rather than modelled.
// compute_floor.cpp bounds a kernel by its arithmetic alone (data in L1,
// perfect overlap with memory); this program runs the same library blocks
// over arrays the size of the bench's (2^24 values, two threads on the
// library's pool, outputs streamed) and times them against a threaded
// streamed copy of the same bytes in the same rounds, as the bench does.
//
// Besides the library's own activations it runs synthetic cores through
// the very same block loop: a chain of K fused multiply-adds per value
// (K = 0 is the blocks' widening, core check and rounding alone) and a bare
// coarse exponential (math::exp_coarse_parts, the cheapest exponential
// the half types' cores use); for backward passes from x (two reads, one
// write, against a copy of as many bytes) the same chains times g, g times
// each exponential, and softplus's gradient in its cheapest form. Their
// rows give the share of the roof that arithmetic of a given cost in L1
// leaves, whatever computes it: the curve that an activation's own L1
// cost is read against.
//
// Build and run from the repository root on an AVX-512 machine:
//   g++ -std=c++17 -O3 -ffp-contract=off -fno-math-errno -fno-trapping-math \
//       -fopenmp-simd -mavx512f -mavx512bw -mavx512dq -mavx512vl -mavx2 -mfma -mf16c \
//       -mprefer-vector-width=512 -pthread -Icsrc/include -Icsrc \
//       scripts/overlap_bound.cpp csrc/cpu/threadpool.cpp -o /tmp/overlap_bound
//   /tmp/overlap_bound [float16|bfloat16] [threads]
// Timings are medians of interleaved rounds; on a shared machine run it
// twice and compare.
#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <random>
#include <string>
#include <vector>

#define FUSEDNN_ISA avx512
#include "cpu/activation_loops.h"
#include "cpu/activation_runs.h"
#include "cpu/elementwise.h"
#include "cpu/threadpool.h"

namespace {

using fusednn::ActivationParams;
namespace act = fusednn::act;
namespace loops = fusednn::cpu::avx512;
namespace math = fusednn::math;

// K dependent fused multiply-adds per value, in the form of an activation
// with a core for every input: the half types' blocks run it as they run
// the exponential activations' cores (blocks of kHalfBlock, core check).
template <int K> struct Chain {
  static constexpr bool kBackwardFromY = false;
  static constexpr float kForwardCoreBound = 3.0e38f;
  FUSEDNN_HD static float chain(float x) {
    for (int k = 0; k < K; ++k) x = fusednn::fmadd(x, 0.9990234375f, 0.0009765625f);
    return x;
  }
  FUSEDNN_HD static float forward_core_f32(float x, const ActivationParams&) { return chain(x); }
  FUSEDNN_HD static float forward_core_half(float x, const ActivationParams&) { return chain(x); }
  template <class T> FUSEDNN_HD static T forward(T x, const ActivationParams&) {
    return T(chain(float(x)));
  }
  // g times the chain of x: a backward from x with K multiply-adds.
  static constexpr float kBackwardCoreBound = 3.0e38f;
  FUSEDNN_HD static float backward_core_f32(float g, float x, const ActivationParams&) {
    return g * chain(x);
  }
  template <class T> FUSEDNN_HD static T backward_x(T g, T x, const ActivationParams&) {
    return T(float(g) * chain(float(x)));
  }
};

// e^x by the half types' coarse exponential and nothing else.
struct CoarseExp {
  static constexpr bool kBackwardFromY = false;
  static constexpr float kForwardCoreBound = 80.0f;
  FUSEDNN_HD static float forward_core_f32(float x, const ActivationParams&) {
    return math::exp_coarse_parts(x).exp();
  }
  FUSEDNN_HD static float forward_core_half(float x, const ActivationParams& p) {
    return forward_core_f32(x, p);
  }
  template <class T> FUSEDNN_HD static T forward(T x, const ActivationParams&) {
    return T(std::exp(float(x)));
  }
  static constexpr float kBackwardCoreBound = 80.0f;
  FUSEDNN_HD static float backward_core_f32(float g, float x, const ActivationParams&) {
    return g * math::exp_coarse_parts(x).exp();
  }
  template <class T> FUSEDNN_HD static T backward_x(T g, T x, const ActivationParams&) {
    return T(float(g) * std::exp(float(x)));
  }
};

// Backward cores only: g e^x with the float32 kernels' exponential
// (math::exp_core), and softplus's gradient g sigmoid(x) with the coarse
// exponential (its arithmetic and nothing else: the cheapest form of it).
struct ExactExpGradient {
  static constexpr bool kBackwardFromY = false;
  static constexpr float kBackwardCoreBound = 80.0f;
  FUSEDNN_HD static float backward_core_f32(float g, float x, const ActivationParams&) {
    return g * math::exp_core(x);
  }
  template <class T> FUSEDNN_HD static T backward_x(T g, T x, const ActivationParams&) {
    return T(float(g) * std::exp(float(x)));
  }
};
struct CoarseSigmoidGradient {
  static constexpr bool kBackwardFromY = false;
  static constexpr float kBackwardCoreBound = 80.0f;
  FUSEDNN_HD static float backward_core_f32(float g, float x, const ActivationParams& p) {
    const float e = math::exp_coarse_parts(-math::magnitude(x)).exp();
    return x > float(p.b) ? g : g * math::sigmoid_from_exp(x, e);
  }
  template <class T> FUSEDNN_HD static T backward_x(T g, T x, const ActivationParams&) {
    return T(float(g) / (1.0f + std::exp(-float(x))));
  }
};

constexpr int64_t kL1Elements = 4096;
constexpr int64_t kStreamElements = int64_t(1) << 24;
constexpr int kRounds = 9;

using Seconds = std::chrono::duration<double>;

template <class Call> double seconds_of(Call call) {
  const auto start = std::chrono::steady_clock::now();
  call();
  return Seconds(std::chrono::steady_clock::now() - start).count();
}

double median(std::vector<double> v) {
  std::sort(v.begin(), v.end());
  return v[v.size() / 2];
}

// x, g and y of n values, and a copy's source and target of 3n/2 (a
// backward's traffic), every page touched before any timing.
template <class S> struct Arrays {
  int64_t n;
  S *x, *g, *y, *copy_source, *copy_target;
  explicit Arrays(int64_t count) : n(count) {
    x = take(n);
    g = take(n);
    y = take(n);
    copy_source = take(n * 3 / 2);
    copy_target = take(n * 3 / 2);
    std::mt19937 gen(1);
    std::normal_distribution<float> normal;
    for (int64_t i = 0; i < n; ++i) {
      float v = normal(gen);
      if (std::fabs(v) >= 3.8f) v = 1.0f;
      x[i] = fusednn::Storage<S>::store(v);
      g[i] = fusednn::Storage<S>::store(normal(gen));
      y[i] = x[i];
    }
    std::fill(copy_source, copy_source + n * 3 / 2, x[0]);
    std::fill(copy_target, copy_target + n * 3 / 2, x[0]);
  }
  ~Arrays() {
    for (S* p : {x, g, y, copy_source, copy_target}) std::free(p);
  }
  static S* take(int64_t count) {
    return static_cast<S*>(std::aligned_alloc(64, sizeof(S) * count));
  }
};

// With kBackward, y = the gradient from x, with x's values for the
// gradient too (a third stream all the same).
template <class Form, bool kBackward, class S>
void run_blocks(const Arrays<S>& a, int threads, bool stream) {
  const ActivationParams q = fusednn::make_activation_params(1.0, 20.0, false);
  const loops::BlockMode mode{loops::block_storage_of<S>(), stream};
  fusednn::cpu::parallel_for(threads, [&](int64_t t) {
    const int64_t begin = (a.n * t / threads) & ~int64_t(63);
    const int64_t end = t == threads - 1 ? a.n : (a.n * (t + 1) / threads) & ~int64_t(63);
    if constexpr (kBackward) {
      loops::backward_block<Form, float, false>(a.y + begin, a.g + begin, a.x + begin,
                                               end - begin, q, mode);
    } else {
      loops::forward_block<Form, float>(a.y + begin, a.x + begin, end - begin, q, mode);
    }
    if (stream) loops::store_fence();
  });
}

// The roof: a streamed copy moving the same bytes, half read and half
// written, as the bench's: n values for a forward (one read, one write),
// 3n/2 for a backward (two reads, one write).
template <bool kBackward, class S> void copy_streamed(const Arrays<S>& a, int threads) {
  const int64_t n = kBackward ? a.n * 3 / 2 : a.n;
  fusednn::cpu::parallel_for(threads, [&](int64_t t) {
    const int64_t begin = (n * t / threads) & ~int64_t(63);
    const int64_t end = t == threads - 1 ? n : (n * (t + 1) / threads) & ~int64_t(63);
    loops::stream_bytes(a.copy_target + begin, a.copy_source + begin, sizeof(S) * (end - begin));
    loops::store_fence();
  });
}

// One thread, data in L1: the arithmetic's cost per value (as
// compute_floor.cpp), the best of kRounds means.
template <class Form, bool kBackward, class S> double l1_ns(const Arrays<S>& small) {
  double best = 1e30;
  for (int round = 0; round < kRounds; ++round) {
    const int calls = 2000;
    const double s = seconds_of([&] {
      for (int k = 0; k < calls; ++k) {
        run_blocks<Form, kBackward>(small, 1, false);
        asm volatile("" ::: "memory");
      }
    });
    best = std::min(best, s / calls / small.n * 1e9);
  }
  return best;
}

template <class Form, bool kBackward = false, class S>
void report(const char* name, const Arrays<S>& small, const Arrays<S>& big, int threads) {
  const double l1 = l1_ns<Form, kBackward>(small);
  std::vector<double> kernel, copy;
  run_blocks<Form, kBackward>(big, threads, true);
  for (int round = 0; round < kRounds; ++round) {
    copy.push_back(seconds_of([&] { copy_streamed<kBackward>(big, threads); }));
    kernel.push_back(seconds_of([&] { run_blocks<Form, kBackward>(big, threads, true); }));
  }
  const double kernel_s = median(kernel), copy_s = median(copy);
  // The copy's time per value of the kernel on one core while all
  // `threads` copy: what a kernel's arithmetic must overlap with.
  const double copy_core_ns = copy_s / big.n * threads * 1e9;
  std::printf("%-16s %7.3f %9.3f %8.2f %8.2f %6.0f%% %6.0f%%\n", name, l1, copy_core_ns,
              kernel_s * 1e3, copy_s * 1e3, 100.0 * copy_s / kernel_s,
              std::min(100.0, 100.0 * copy_core_ns / l1));
}

template <class S> void report_all(int threads) {
  const Arrays<S> small(kL1Elements);
  const Arrays<S> big(kStreamElements);
  std::printf("%-16s %7s %9s %8s %8s %7s %7s\n", "core", "L1 ns", "copy ns", "ms", "copy ms",
              "% roof", "cap");
  report<act::Relu>("relu", small, big, threads);
  report<Chain<0>>("chain 0", small, big, threads);
  report<Chain<2>>("chain 2", small, big, threads);
  report<Chain<4>>("chain 4", small, big, threads);
  report<Chain<6>>("chain 6", small, big, threads);
  report<Chain<8>>("chain 8", small, big, threads);
  report<Chain<12>>("chain 12", small, big, threads);
  report<Chain<16>>("chain 16", small, big, threads);
  report<Chain<24>>("chain 24", small, big, threads);
  report<CoarseExp>("coarse exp", small, big, threads);
  report<loops::HalfForward<act::Sigmoid>::Form>("sigmoid", small, big, threads);
  report<loops::HalfForward<act::Tanh>::Form>("tanh", small, big, threads);
  report<loops::HalfForward<act::Elu>::Form>("elu", small, big, threads);
  report<loops::HalfForward<act::Selu>::Form>("selu", small, big, threads);
  report<loops::HalfForward<act::GeluErf>::Form>("gelu", small, big, threads);
  report<loops::HalfForward<act::Silu>::Form>("silu", small, big, threads);
  std::printf("backward from x (two reads, one write)\n");
  report<Chain<0>, true>("chain 0", small, big, threads);
  report<Chain<4>, true>("chain 4", small, big, threads);
  report<Chain<8>, true>("chain 8", small, big, threads);
  report<Chain<12>, true>("chain 12", small, big, threads);
  report<CoarseExp, true>("g * coarse exp", small, big, threads);
  report<ExactExpGradient, true>("g * exp", small, big, threads);
  report<CoarseSigmoidGradient, true>("g * coarse sigm", small, big, threads);
  report<loops::HalfBackward<act::Silu, false>::Form, true>("silu", small, big, threads);
  report<loops::HalfBackward<act::SoftplusUnitBeta, false>::Form, true>("softplus", small, big, threads);
}

}  // namespace

int main(int argc, char** argv) {
  const std::string type = argc > 1 ? argv[1] : "bfloat16";
  const int threads = argc > 2 ? std::atoi(argv[2]) : 2;
  fusednn::cpu::set_num_threads(threads);
  std::printf("%s forward, %lld values, %d threads; L1 ns: one core, data in L1; copy ns: the\n"
              "streamed copy's time per value per core; %% roof: copy ms / ms; cap: copy ns / L1 ns\n",
              type.c_str(), static_cast<long long>(kStreamElements), threads);
  if (type == "float16") {
    report_all<fusednn::Float16>(threads);
  } else {
    report_all<fusednn::BFloat16>(threads);
  }
}
