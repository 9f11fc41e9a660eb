// CPU loops for the activations: y = f(x) and grad_input = g * f'(.) over
// arrays of any shape and strides, plus the plain copy used as the memory
// roof. The math is fusednn/activations.h; this file only decides how to
// loop (vectorized contiguous runs, strided fallback, threads, streaming
// stores). Compiled once per ISA into namespace FUSEDNN_ISA.
#include "cpu/activations.h"

#include "cpu/activation_runs.h"
#include "cpu/elementwise.h"

namespace fusednn {
namespace cpu {
namespace FUSEDNN_ISA {
namespace {

template <class Op, class T>
void forward_typed(const ActivationParams& params, double ns_per_element, const ArrayRef& x,
                   const ArrayRef& y) {
  const int64_t* strides[2] = {x.strides, y.strides};
  const int sizes[2] = {int(sizeof(T)), int(sizeof(T))};
  const StridedLoop<2> loop(x.ndim, x.shape, strides, sizes);
  const bool stream = loop.size * int64_t(sizeof(T)) >= kStreamBytes;
  char* base[2] = {static_cast<char*>(x.data), static_cast<char*>(y.data)};
  struct Body {
    ActivationParams p;
    bool stream;
    void operator()(char* const* ptr, int64_t len, const int64_t* inner) {
      const T* in = reinterpret_cast<const T*>(ptr[0]);
      T* out = reinterpret_cast<T*>(ptr[1]);
      const ActivationParams local = p;
      if (inner[0] == 1 && inner[1] == 1) {
        produce_lines(out, len, stream, [&](T* dst, int64_t start, int64_t count, auto streamed) {
          const T* src = in + start;
          const ActivationParams q = local;  // by value: the vectorizer needs it in registers
          const auto input = [=](int64_t i) FUSEDNN_INLINE_LAMBDA { return src[i]; };
          const auto as_is = [](int64_t, T y) FUSEDNN_INLINE_LAMBDA { return y; };
          activation_run<Op, decltype(streamed)::value>(dst, count, q, input, as_is);
        });
      } else {
        for (int64_t i = 0; i < len; ++i)
          out[i * inner[1]] = Op::template forward<T>(in[i * inner[0]], local);
      }
    }
    void finish() {
      if (stream) store_fence();
    }
  };
  loop.run(base, sizes, cost_of<T>(ns_per_element), [&] { return Body{params, stream}; });
}

template <class Op, class T, bool kFromOutput>
void backward_typed(const ActivationParams& params, double ns_per_element, const ArrayRef& g,
                    const ArrayRef& saved, const ArrayRef& gi) {
  const int64_t* strides[3] = {g.strides, saved.strides, gi.strides};
  const int sizes[3] = {int(sizeof(T)), int(sizeof(T)), int(sizeof(T))};
  const StridedLoop<3> loop(g.ndim, g.shape, strides, sizes);
  const bool stream = loop.size * int64_t(sizeof(T)) >= kStreamBytes;
  char* base[3] = {static_cast<char*>(g.data), static_cast<char*>(saved.data),
                   static_cast<char*>(gi.data)};
  struct Body {
    ActivationParams p;
    bool stream;
    FUSEDNN_HD static T one(T grad, T value, const ActivationParams& q) {
      if constexpr (kFromOutput) {
        return Op::template backward_y<T>(grad, value, q);
      } else {
        return Op::template backward_x<T>(grad, value, q);
      }
    }
    void operator()(char* const* ptr, int64_t len, const int64_t* inner) {
      const T* grad = reinterpret_cast<const T*>(ptr[0]);
      const T* value = reinterpret_cast<const T*>(ptr[1]);
      T* out = reinterpret_cast<T*>(ptr[2]);
      const ActivationParams local = p;
      if (inner[0] == 1 && inner[1] == 1 && inner[2] == 1) {
        produce_lines(out, len, stream, [&](T* dst, int64_t start, int64_t count, auto streamed) {
          constexpr bool kStream = decltype(streamed)::value;
          const T* gs = grad + start;
          const T* vs = value + start;
          const ActivationParams q = local;  // by value: the vectorizer needs it in registers
          if constexpr (kFromOutput) {
            write_run<kStream>(dst, count, [=](int64_t i) FUSEDNN_INLINE_LAMBDA {
              return one(gs[i], vs[i], q);
            });
          } else {
            const auto input = [=](int64_t i) FUSEDNN_INLINE_LAMBDA { return vs[i]; };
            const auto grad_at = [=](int64_t i) FUSEDNN_INLINE_LAMBDA { return gs[i]; };
            activation_backward_run<Op, kStream>(dst, count, q, input, grad_at);
          }
        });
      } else {
        for (int64_t i = 0; i < len; ++i)
          out[i * inner[2]] = one(grad[i * inner[0]], value[i * inner[1]], local);
      }
    }
    void finish() {
      if (stream) store_fence();
    }
  };
  loop.run(base, sizes, cost_of<T>(ns_per_element), [&] { return Body{params, stream}; });
}

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
  loop.run(base, sizes, cost_of<T>(kCopyNanoseconds), [&] { return Body{stream}; });
}

}  // namespace

void activation_forward(Activation act, const ActivationParams& p, const ArrayRef& x,
                        const ArrayRef& y) {
  const double ns = activation_cost(act).forward;
  visit_activation(act, p, [&](auto op) {
    using Op = decltype(op);
    if (x.dtype == DType::float64) {
      forward_typed<Op, double>(p, ns, x, y);
    } else {
      forward_typed<Op, float>(p, ns, x, y);
    }
  });
}

void activation_backward(Activation act, const ActivationParams& p, bool from_output,
                         const ArrayRef& grad_output, const ArrayRef& saved,
                         const ArrayRef& grad_input) {
  const double ns = activation_cost(act).backward;
  visit_activation(act, p, [&](auto op) {
    using Op = decltype(op);
    if constexpr (Op::kBackwardFromY) {
      if (from_output) {
        if (grad_output.dtype == DType::float64) {
          backward_typed<Op, double, true>(p, ns, grad_output, saved, grad_input);
        } else {
          backward_typed<Op, float, true>(p, ns, grad_output, saved, grad_input);
        }
        return;
      }
    } else if (from_output) {
      throw std::invalid_argument("this activation's derivative needs x, not y");
    }
    if (grad_output.dtype == DType::float64) {
      backward_typed<Op, double, false>(p, ns, grad_output, saved, grad_input);
    } else {
      backward_typed<Op, float, false>(p, ns, grad_output, saved, grad_input);
    }
  });
}

void copy(const ArrayRef& src, const ArrayRef& dst) {
  if (src.dtype == DType::float64) {
    copy_typed<double>(src, dst);
  } else {
    copy_typed<float>(src, dst);
  }
}

}  // namespace FUSEDNN_ISA
}  // namespace cpu
}  // namespace fusednn
