// Entry points of the CPU activation kernels: the dispatch to each
// activation's kernels (cpu/activation_kernels.h, compiled in the
// activations_*.cpp files); the loops that all activations share (threads,
// contiguous, streamed and strided runs), which take an activation's
// arithmetic as function pointers;
// and the plain copy used as the memory roof, with the conversions between
// float32 and the half types. Compiled once per ISA into namespace
// FUSEDNN_ISA.
#include "cpu/activations.h"

#include "cpu/activation_kernels.h"
#include "cpu/activation_runs.h"
#include "cpu/elementwise.h"
#include "cpu/half_convert.h"

namespace fusednn {
namespace cpu {
namespace FUSEDNN_ISA {

// Elements per block of a strided run of float32 or a half type (float64
// has its own strided loops, ForwardArithmetic): its buffers stay in L1,
// and its gathers and scatters alternate with the arithmetic finely enough
// to overlap with it (blocks of 256 made a float64 sigmoid over every
// other element of 2^22 1.6 times slower than 64). The gather and scatter
// loops are vectorized on request: left scalar, they made up most of a
// strided run's time.
constexpr int64_t kStridedBlock = 64;

template <class S>
__attribute__((noinline, noclone)) void strided_forward_run(const S* x, S* out, int64_t len,
                                                            const int64_t* inner,
                                                            ForwardBlock<ComputeOf<S>> block,
                                                            ActivationParams q) {
  using C = ComputeOf<S>;
  alignas(64) C in[kStridedBlock];
  alignas(64) C results[kStridedBlock];
  const int64_t x_step = inner[0], out_step = inner[1];
  for (int64_t b = 0; b < len; b += kStridedBlock) {
    const int64_t n = std::min(kStridedBlock, len - b);
#pragma omp simd
    for (int64_t i = 0; i < n; ++i) in[i] = Storage<S>::load(x[(b + i) * x_step]);
    block(results, in, n, q, {BlockStorage::compute, false});
#pragma omp simd
    for (int64_t i = 0; i < n; ++i) out[(b + i) * out_step] = Storage<S>::store(results[i]);
  }
}

template <class S>
__attribute__((noinline, noclone)) void strided_backward_run(const S* grad, const S* value, S* out,
                                                             int64_t len, const int64_t* inner,
                                                             BackwardBlock<ComputeOf<S>> block,
                                                             ActivationParams q) {
  using C = ComputeOf<S>;
  alignas(64) C g[kStridedBlock];
  alignas(64) C v[kStridedBlock];
  alignas(64) C results[kStridedBlock];
  const int64_t grad_step = inner[0], value_step = inner[1], out_step = inner[2];
  for (int64_t b = 0; b < len; b += kStridedBlock) {
    const int64_t n = std::min(kStridedBlock, len - b);
#pragma omp simd
    for (int64_t i = 0; i < n; ++i) {
      g[i] = Storage<S>::load(grad[(b + i) * grad_step]);
      v[i] = Storage<S>::load(value[(b + i) * value_step]);
    }
    block(results, g, v, n, q, {BlockStorage::compute, false});
#pragma omp simd
    for (int64_t i = 0; i < n; ++i) out[(b + i) * out_step] = Storage<S>::store(results[i]);
  }
}

// Elements per unit of a kernel's cost: a float64 vector holds half as
// many elements as a float32 one; the half types compute in float32 and
// their conversions are cheap.
template <class S> constexpr double storage_cost(double ns) {
  return cost_of<typename Storage<S>::Compute>(ns);
}

// y = f(x) for storage type S; noclone: once per storage type, not again
// for each activation's functions GCC sees passed to it.
template <class S>
__attribute__((noclone)) void forward_loops(const ActivationParams& params,
                                            double ns_per_element, const ArrayRef& x,
                                            const ArrayRef& y, ForwardArithmetic<S> fns) {
  const int64_t* strides[2] = {x.strides, y.strides};
  const int sizes[2] = {int(sizeof(S)), int(sizeof(S))};
  const StridedLoop<2> loop(x.ndim, x.shape, strides, sizes);
  const bool stream = loop.size * int64_t(sizeof(S)) >= kStreamBytes;
  char* base[2] = {static_cast<char*>(x.data), static_cast<char*>(y.data)};
  struct Body {
    ActivationParams p;
    bool stream;
    ForwardArithmetic<S> fns;
    void operator()(char* const* ptr, int64_t len, const int64_t* inner) {
      const S* in = reinterpret_cast<const S*>(ptr[0]);
      S* out = reinterpret_cast<S*>(ptr[1]);
      const ActivationParams local = p;
      if (inner[0] == 1 && inner[1] == 1) {
        produce_lines(out, len, stream, [&](S* dst, int64_t start, int64_t count, auto streamed) {
          fns.block(dst, in + start, count, local,
                    {block_storage_of<S>(), decltype(streamed)::value});
        });
      } else if constexpr (std::is_same_v<S, double>) {
        fns.strided(in, out, len, inner, local);
      } else {
        strided_forward_run<S>(in, out, len, inner, fns.block, local);
      }
    }
    void finish() {
      if (stream) store_fence();
    }
  };
  loop.run(base, sizes, storage_cost<S>(ns_per_element),
           [&] { return Body{params, stream, fns}; }, kMinElementwiseTaskNanoseconds);
}

// grad_input = g * f'(.) for storage type S, from x or y as `fns` do.
template <class S>
__attribute__((noclone)) void backward_loops(const ActivationParams& params,
                                             double ns_per_element, const ArrayRef& g,
                                             const ArrayRef& saved, const ArrayRef& gi,
                                             BackwardArithmetic<S> fns) {
  const int64_t* strides[3] = {g.strides, saved.strides, gi.strides};
  const int sizes[3] = {int(sizeof(S)), int(sizeof(S)), int(sizeof(S))};
  const StridedLoop<3> loop(g.ndim, g.shape, strides, sizes);
  const bool stream = loop.size * int64_t(sizeof(S)) >= kStreamBytes;
  char* base[3] = {static_cast<char*>(g.data), static_cast<char*>(saved.data),
                   static_cast<char*>(gi.data)};
  struct Body {
    ActivationParams p;
    bool stream;
    BackwardArithmetic<S> fns;
    void operator()(char* const* ptr, int64_t len, const int64_t* inner) {
      const S* grad = reinterpret_cast<const S*>(ptr[0]);
      const S* value = reinterpret_cast<const S*>(ptr[1]);
      S* out = reinterpret_cast<S*>(ptr[2]);
      const ActivationParams local = p;
      if (inner[0] == 1 && inner[1] == 1 && inner[2] == 1) {
        produce_lines(out, len, stream, [&](S* dst, int64_t start, int64_t count, auto streamed) {
          fns.block(dst, grad + start, value + start, count, local,
                    {block_storage_of<S>(), decltype(streamed)::value});
        });
      } else if constexpr (std::is_same_v<S, double>) {
        fns.strided(grad, value, out, len, inner, local);
      } else {
        strided_backward_run<S>(grad, value, out, len, inner, fns.block, local);
      }
    }
    void finish() {
      if (stream) store_fence();
    }
  };
  loop.run(base, sizes, storage_cost<S>(ns_per_element),
           [&] { return Body{params, stream, fns}; }, kMinElementwiseTaskNanoseconds);
}

#define FUSEDNN_LOOPS(S)                                                                     \
  template void forward_loops<S>(const ActivationParams&, double, const ArrayRef&,           \
                                 const ArrayRef&, ForwardArithmetic<S>);                     \
  template void backward_loops<S>(const ActivationParams&, double, const ArrayRef&,          \
                                  const ArrayRef&, const ArrayRef&, BackwardArithmetic<S>);
FUSEDNN_LOOPS(float)
FUSEDNN_LOOPS(double)
FUSEDNN_LOOPS(Float16)
FUSEDNN_LOOPS(BFloat16)
#undef FUSEDNN_LOOPS

namespace {

template <class T> void copy_typed(const ArrayRef& src, const ArrayRef& dst) {
  const int64_t* strides[2] = {src.strides, dst.strides};
  const int sizes[2] = {int(sizeof(T)), int(sizeof(T))};
  const StridedLoop<2> loop(src.ndim, src.shape, strides, sizes);
  const bool stream = loop.size * int64_t(sizeof(T)) >= kStreamBytes;
  char* base[2] = {static_cast<char*>(src.data), static_cast<char*>(dst.data)};
  struct Body {
    bool stream;
    void operator()(char* const* ptr, int64_t len, const int64_t* inner) {
      const T* in = reinterpret_cast<const T*>(ptr[0]);
      T* out = reinterpret_cast<T*>(ptr[1]);
      if (inner[0] == 1 && inner[1] == 1) {
        // The activations' own store path with no arithmetic, so that as a
        // roof it moves bytes the way they do: staged through a buffer
        // (memcpy, then streamed in bursts) it copied at 7 GB/s on one
        // thread where relu streamed 24 GB/s.
        produce_lines(out, len, stream, [&](T* dst, int64_t start, int64_t count, auto streamed) {
          const T* src = in + start;
          write_run<decltype(streamed)::value>(
              dst, count, [=](int64_t i) FUSEDNN_INLINE_LAMBDA { return src[i]; });
        });
      } else {
        for (int64_t i = 0; i < len; ++i) out[i * inner[1]] = in[i * inner[0]];
      }
    }
    void finish() {
      if (stream) store_fence();
    }
  };
  loop.run(base, sizes, cost_of<T>(kCopyNanoseconds), [&] { return Body{stream}; },
           kMinElementwiseTaskNanoseconds);
}

// dst = src converted between float32 and a half type S (one of From, To),
// rounding to nearest even where it narrows.
template <class From, class To> void convert_typed(const ArrayRef& src, const ArrayRef& dst) {
  const int64_t* strides[2] = {src.strides, dst.strides};
  const int sizes[2] = {int(sizeof(From)), int(sizeof(To))};
  const StridedLoop<2> loop(src.ndim, src.shape, strides, sizes);
  char* base[2] = {static_cast<char*>(src.data), static_cast<char*>(dst.data)};
  struct Body {
    void operator()(char* const* ptr, int64_t len, const int64_t* inner) {
      const From* in = reinterpret_cast<const From*>(ptr[0]);
      To* out = reinterpret_cast<To*>(ptr[1]);
      if (inner[0] == 1 && inner[1] == 1) {
        if constexpr (std::is_same_v<From, float>) {
          narrow(in, out, len);
        } else {
          widen(in, out, len);
        }
      } else {
        for (int64_t i = 0; i < len; ++i)
          out[i * inner[1]] = Storage<To>::store(Storage<From>::load(in[i * inner[0]]));
      }
    }
    void finish() {}
  };
  loop.run(base, sizes, kCopyNanoseconds, [] { return Body{}; }, kMinElementwiseTaskNanoseconds);
}

}  // namespace

void activation_forward(Activation act, const ActivationParams& p, const ArrayRef& x,
                        const ArrayRef& y) {
  const double ns = activation_cost(act).forward;
  visit_activation(act, p, [&](auto op) { activation_forward_op<decltype(op)>(p, ns, x, y); });
}

void activation_backward(Activation act, const ActivationParams& p, bool from_output,
                         const ArrayRef& grad_output, const ArrayRef& saved,
                         const ArrayRef& grad_input) {
  const double ns = activation_cost(act).backward;
  visit_activation(act, p, [&](auto op) {
    activation_backward_op<decltype(op)>(p, ns, from_output, grad_output, saved, grad_input);
  });
}

template <class T> FusedBlocks<T> fused_blocks(Activation act, const ActivationParams& p) {
  FusedBlocks<T> blocks{};
  visit_activation(act, p, [&](auto op) { blocks = fused_blocks_op<decltype(op), T>(); });
  return blocks;
}
template FusedBlocks<float> fused_blocks<float>(Activation, const ActivationParams&);
template FusedBlocks<double> fused_blocks<double>(Activation, const ActivationParams&);

void copy(const ArrayRef& src, const ArrayRef& dst) {
  if (src.dtype != dst.dtype) {
    if (src.dtype != DType::float32 && dst.dtype != DType::float32)
      throw std::invalid_argument("copy converts between float32 and float16 or bfloat16 only");
    const auto half_side = src.dtype == DType::float32 ? dst.dtype : src.dtype;
    visit_storage(half_side, [&](auto stored) {
      using S = decltype(stored);
      if constexpr (std::is_floating_point_v<S>) {
        throw std::invalid_argument("copy converts between float32 and float16 or bfloat16 only");
      } else if (src.dtype == DType::float32) {
        convert_typed<float, S>(src, dst);
      } else {
        convert_typed<S, float>(src, dst);
      }
    });
    return;
  }
  if (src.dtype == DType::float64) {
    copy_typed<double>(src, dst);
  } else if (is_half(src.dtype)) {
    copy_typed<uint16_t>(src, dst);
  } else {
    copy_typed<float>(src, dst);
  }
}

}  // namespace FUSEDNN_ISA
}  // namespace cpu
}  // namespace fusednn
