// CPU loops for the activations: y = f(x) and grad_input = g * f'(.) over
// arrays of any shape and strides, plus the plain copy used as the memory
// roof. The math is fusednn/activations.h; this file only decides how to
// loop (vectorized contiguous runs, strided fallback, threads, streaming
// stores). float16 and bfloat16 run the float32 loops on blocks widened to
// float32 and round each result once (cpu/half_convert.h). Compiled once
// per ISA into namespace FUSEDNN_ISA.
#include "cpu/activations.h"

#include "cpu/activation_runs.h"
#include "cpu/elementwise.h"
#include "cpu/half_convert.h"

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

// forward_typed for a half-precision storage type S. The per-element cost
// is float32's: the arithmetic is the same, the conversions cheap.
template <class Op, class S>
void forward_half(const ActivationParams& params, double ns_per_element, const ArrayRef& x,
                  const ArrayRef& y) {
  const int64_t* strides[2] = {x.strides, y.strides};
  const int sizes[2] = {int(sizeof(S)), int(sizeof(S))};
  const StridedLoop<2> loop(x.ndim, x.shape, strides, sizes);
  const bool stream = loop.size * int64_t(sizeof(S)) >= kStreamBytes;
  char* base[2] = {static_cast<char*>(x.data), static_cast<char*>(y.data)};
  struct Body {
    ActivationParams p;
    bool stream;
    void operator()(char* const* ptr, int64_t len, const int64_t* inner) {
      const S* in = reinterpret_cast<const S*>(ptr[0]);
      S* out = reinterpret_cast<S*>(ptr[1]);
      const ActivationParams local = p;
      if (inner[0] == 1 && inner[1] == 1) {
        produce_lines(out, len, stream, [&](S* dst, int64_t start, int64_t count, auto streamed) {
          const S* const inputs[1] = {in + start};
          constexpr bool kStream = decltype(streamed)::value;
          staged_run<kStream, 1>(dst, count, inputs,
                                 [local](float* o, const float* const* ins, int64_t n) {
            const float* src = ins[0];
            const ActivationParams q = local;
            const auto input = [=](int64_t i) FUSEDNN_INLINE_LAMBDA { return src[i]; };
            const auto as_is = [](int64_t, float v) FUSEDNN_INLINE_LAMBDA { return v; };
            activation_run<Op>(o, n, q, input, as_is);
          });
        });
      } else {
        for (int64_t i = 0; i < len; ++i)
          out[i * inner[1]] = Storage<S>::store(
              Op::template forward<float>(Storage<S>::load(in[i * inner[0]]), local));
      }
    }
    void finish() {
      if (stream) store_fence();
    }
  };
  loop.run(base, sizes, ns_per_element, [&] { return Body{params, stream}; });
}

// backward_typed for a half-precision storage type S.
template <class Op, class S, bool kFromOutput>
void backward_half(const ActivationParams& params, double ns_per_element, const ArrayRef& g,
                   const ArrayRef& saved, const ArrayRef& gi) {
  const int64_t* strides[3] = {g.strides, saved.strides, gi.strides};
  const int sizes[3] = {int(sizeof(S)), int(sizeof(S)), int(sizeof(S))};
  const StridedLoop<3> loop(g.ndim, g.shape, strides, sizes);
  const bool stream = loop.size * int64_t(sizeof(S)) >= kStreamBytes;
  char* base[3] = {static_cast<char*>(g.data), static_cast<char*>(saved.data),
                   static_cast<char*>(gi.data)};
  struct Body {
    ActivationParams p;
    bool stream;
    FUSEDNN_HD static float one(float grad, float value, const ActivationParams& q) {
      if constexpr (kFromOutput) {
        return Op::template backward_y<float>(grad, value, q);
      } else {
        return Op::template backward_x<float>(grad, value, q);
      }
    }
    void operator()(char* const* ptr, int64_t len, const int64_t* inner) {
      const S* grad = reinterpret_cast<const S*>(ptr[0]);
      const S* value = reinterpret_cast<const S*>(ptr[1]);
      S* out = reinterpret_cast<S*>(ptr[2]);
      const ActivationParams local = p;
      if (inner[0] == 1 && inner[1] == 1 && inner[2] == 1) {
        produce_lines(out, len, stream, [&](S* dst, int64_t start, int64_t count, auto streamed) {
          const S* const inputs[2] = {grad + start, value + start};
          constexpr bool kStream = decltype(streamed)::value;
          staged_run<kStream, 2>(dst, count, inputs,
                                 [local](float* o, const float* const* ins, int64_t n) {
            const float* gs = ins[0];
            const float* vs = ins[1];
            const ActivationParams q = local;
            if constexpr (kFromOutput) {
              write_run<false>(o, n, [=](int64_t i) FUSEDNN_INLINE_LAMBDA {
                return one(gs[i], vs[i], q);
              });
            } else {
              const auto input = [=](int64_t i) FUSEDNN_INLINE_LAMBDA { return vs[i]; };
              const auto grad_at = [=](int64_t i) FUSEDNN_INLINE_LAMBDA { return gs[i]; };
              activation_backward_run<Op>(o, n, q, input, grad_at);
            }
          });
        });
      } else {
        for (int64_t i = 0; i < len; ++i)
          out[i * inner[2]] = Storage<S>::store(one(Storage<S>::load(grad[i * inner[0]]),
                                                    Storage<S>::load(value[i * inner[1]]), local));
      }
    }
    void finish() {
      if (stream) store_fence();
    }
  };
  loop.run(base, sizes, ns_per_element, [&] { return Body{params, stream}; });
}

// Calls fn(T{}) with T the storage type of dtype d.
template <class Fn> void visit_storage(DType d, Fn&& fn) {
  switch (d) {
    case DType::float64: fn(double{}); return;
    case DType::float16: fn(Float16{}); return;
    case DType::bfloat16: fn(BFloat16{}); return;
    default: fn(float{}); return;
  }
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
  loop.run(base, sizes, kCopyNanoseconds, [] { return Body{}; });
}

}  // namespace

void activation_forward(Activation act, const ActivationParams& p, const ArrayRef& x,
                        const ArrayRef& y) {
  const double ns = activation_cost(act).forward;
  visit_activation(act, p, [&](auto op) {
    using Op = decltype(op);
    visit_storage(x.dtype, [&](auto stored) {
      using T = decltype(stored);
      if constexpr (std::is_floating_point_v<T>) {
        forward_typed<Op, T>(p, ns, x, y);
      } else {
        forward_half<Op, T>(p, ns, x, y);
      }
    });
  });
}

void activation_backward(Activation act, const ActivationParams& p, bool from_output,
                         const ArrayRef& grad_output, const ArrayRef& saved,
                         const ArrayRef& grad_input) {
  const double ns = activation_cost(act).backward;
  visit_activation(act, p, [&](auto op) {
    using Op = decltype(op);
    const auto run = [&](auto from_y) {
      constexpr bool kFromOutput = decltype(from_y)::value;
      visit_storage(grad_output.dtype, [&](auto stored) {
        using T = decltype(stored);
        if constexpr (std::is_floating_point_v<T>) {
          backward_typed<Op, T, kFromOutput>(p, ns, grad_output, saved, grad_input);
        } else {
          backward_half<Op, T, kFromOutput>(p, ns, grad_output, saved, grad_input);
        }
      });
    };
    if constexpr (Op::kBackwardFromY) {
      if (from_output) {
        run(std::true_type{});
        return;
      }
    } else if (from_output) {
      throw std::invalid_argument("this activation's derivative needs x, not y");
    }
    run(std::false_type{});
  });
}

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
