// CUDA loops for the activations: y = f(x) and grad_input = g * f'(.) on
// device arrays of any shape and strides, float32, float64, float16 and bfloat16
// (computed in float32). The math is fusednn/activations.h, the same
// functions the CPU kernels run; this file only decides the grid.
// Contiguous operands move in 16-byte packs when every pointer is aligned
// to 16 bytes; anything else takes the strided loop, which computes each
// operand's offset from the merged layout.
#include "cuda/activations.h"
#include "cuda/elementwise.cuh"

namespace fusednn {
namespace cuda {
namespace {

template <class Op, class St> struct Forward {
  using C = typename St::Compute;
  ActivationParams p;
  __device__ __forceinline__ C operator()(const C (&v)[1]) const {
    return Op::template forward<C>(v[0], p);
  }
};

// v = {grad_output, saved}: saved is y when kFromOutput, else x.
template <class Op, class St, bool kFromOutput> struct Backward {
  using C = typename St::Compute;
  ActivationParams p;
  __device__ __forceinline__ C operator()(const C (&v)[2]) const {
    if constexpr (kFromOutput) {
      return Op::template backward_y<C>(v[0], v[1], p);
    } else {
      return Op::template backward_x<C>(v[0], v[1], p);
    }
  }
};

template <class St, int kIn> struct Operands {
  const typename St::Stored* in[kIn];
  typename St::Stored* out;
};

// Packs each thread loads before it computes any: with one 16-byte load
// per operand in flight per thread, even a full GPU keeps too few bytes in
// flight to cover the memory latency of an H100-class part.
constexpr int kPacksInFlight = 2;

// Every operand contiguous: packs of 16 bytes when `packed` (all pointers
// 16-byte aligned), then the remaining elements one by one. Each step of
// the grid-stride loop covers kPacksInFlight strides of the grid, all loads
// issued before the first computation.
template <class St, int kIn, class Fn>
__global__ void __launch_bounds__(kThreads)
    map_contiguous(Fn fn, Operands<St, kIn> ops, int64_t n, bool packed) {
  using S = typename St::Stored;
  using C = typename St::Compute;
  using P = Pack<S>;
  const int64_t start = global_thread();
  const int64_t stride = grid_threads();
  const int64_t packs = packed ? n / P::kSize : 0;
  for (int64_t first = start; first < packs; first += stride * kPacksInFlight) {
    P in[kPacksInFlight][kIn];
#pragma unroll
    for (int u = 0; u < kPacksInFlight; ++u) {
      const int64_t i = first + u * stride;
      if (i < packs) {
#pragma unroll
        for (int k = 0; k < kIn; ++k) in[u][k] = reinterpret_cast<const P*>(ops.in[k])[i];
      }
    }
#pragma unroll
    for (int u = 0; u < kPacksInFlight; ++u) {
      const int64_t i = first + u * stride;
      if (i >= packs) break;
      P out;
#pragma unroll
      for (int j = 0; j < P::kSize; ++j) {
        C v[kIn];
#pragma unroll
        for (int k = 0; k < kIn; ++k) v[k] = St::load(in[u][k].v[j]);
        out.v[j] = St::store(fn(v));
      }
      reinterpret_cast<P*>(ops.out)[i] = out;
    }
  }
  for (int64_t i = packs * P::kSize + start; i < n; i += stride) {
    C v[kIn];
#pragma unroll
    for (int k = 0; k < kIn; ++k) v[k] = St::load(ops.in[k][i]);
    ops.out[i] = St::store(fn(v));
  }
}

template <class St, int kIn, class Fn>
__global__ void __launch_bounds__(kThreads)
    map_strided(Fn fn, Operands<St, kIn> ops, Layout<kIn + 1> layout) {
  using C = typename St::Compute;
  for (int64_t i = global_thread(); i < layout.size; i += grid_threads()) {
    int64_t off[kIn + 1];
    layout.offsets(i, off);
    C v[kIn];
#pragma unroll
    for (int k = 0; k < kIn; ++k) v[k] = St::load(ops.in[k][off[k]]);
    ops.out[off[kIn]] = St::store(fn(v));
  }
}

// arrays = inputs..., output; all of one shape and dtype.
template <class St, int kIn, class Fn>
void launch_map(const Fn& fn, const DeviceArrayRef* const (&arrays)[kIn + 1],
                const LaunchTarget& target, const char* what) {
  using S = typename St::Stored;
  const Layout<kIn + 1> layout = make_layout(arrays, /*any_order=*/true);
  if (layout.size == 0) return;
  const DeviceScope scope(target.device);
  Operands<St, kIn> ops;
  bool packed = aligned16(arrays[kIn]->data);
  for (int k = 0; k < kIn; ++k) {
    ops.in[k] = static_cast<const S*>(arrays[k]->data);
    packed = packed && aligned16(arrays[k]->data);
  }
  ops.out = static_cast<S*>(arrays[kIn]->data);
  const cudaStream_t stream = stream_of(target);
  if (layout.contiguous()) {
    const int64_t n = layout.size;
    const int64_t work = packed ? (n + Pack<S>::kSize - 1) / Pack<S>::kSize : n;
    map_contiguous<St, kIn, Fn>
        <<<grid_for(work, target.device), kThreads, 0, stream>>>(fn, ops, n, packed);
  } else {
    map_strided<St, kIn, Fn>
        <<<grid_for(layout.size, target.device), kThreads, 0, stream>>>(fn, ops, layout);
  }
  check_launch(what);
}

}  // namespace

void activation_forward(Activation act, const ActivationParams& p, const DeviceArrayRef& x,
                        const DeviceArrayRef& y, const LaunchTarget& target) {
  const DeviceArrayRef* const arrays[2] = {&x, &y};
  visit_activation(act, p, [&](auto op) {
    using Op = decltype(op);
    visit_dtype(x.dtype, [&](auto storage) {
      using St = decltype(storage);
      launch_map<St, 1>(Forward<Op, St>{p}, arrays, target, "activation forward");
    });
  });
}

void activation_backward(Activation act, const ActivationParams& p, bool from_output,
                         const DeviceArrayRef& grad_output, const DeviceArrayRef& saved,
                         const DeviceArrayRef& grad_input, const LaunchTarget& target) {
  const DeviceArrayRef* const arrays[3] = {&grad_output, &saved, &grad_input};
  visit_activation(act, p, [&](auto op) {
    using Op = decltype(op);
    if constexpr (!Op::kBackwardFromY) {
      if (from_output) throw std::invalid_argument("this activation's derivative needs x, not y");
    }
    visit_dtype(grad_output.dtype, [&](auto storage) {
      using St = decltype(storage);
      if constexpr (Op::kBackwardFromY) {
        if (from_output) {
          launch_map<St, 2>(Backward<Op, St, true>{p}, arrays, target, "activation backward");
          return;
        }
      }
      launch_map<St, 2>(Backward<Op, St, false>{p}, arrays, target, "activation backward");
    });
  });
}

}  // namespace cuda
}  // namespace fusednn
