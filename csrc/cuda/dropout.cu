// CUDA loops for dropout and the fused bias + activation + dropout
// epilogue. Each thread step owns one unit of 8 consecutive elements of the
// logical (C-order) index range: two whole Philox blocks and one whole mask
// byte, so masks are written without atomics and element i's decision is
// the one philox.h gives for i, whatever the grid. The per-element math is
// fusednn/activations.h, the same functions the CPU kernels run. Layouts
// are merged in logical order only (never reordered by stride), because the
// mask is a function of the logical index; contiguous operands move in
// 16-byte packs when every pointer is aligned, anything else takes a
// strided loop. grad_bias is reduced in two stages whose partition is fixed
// by the shape alone and whose partial sums are combined in a fixed order.
#include "cuda/dropout.h"

#include <limits>

#include "cuda/elementwise.cuh"
#include "fusednn/half.h"
#include "fusednn/philox.h"

namespace fusednn {
namespace cuda {
namespace {

// Elements per thread step: one mask byte, two Philox blocks.
constexpr int kUnit = 8;
static_assert(kUnit == 2 * philox::kLanes, "a unit is two Philox blocks");

// grad_bias along the last axis (inner = 1): blocks of 32 channels x 8 row
// lanes, each block summing one group of rows.
constexpr int kColumnLanes = 32;
constexpr int kRowLanes = kThreads / kColumnLanes;
constexpr int64_t kRowsPerGroup = 256;
// grad_bias along any other axis: one block per (channel, group), each
// summing about this many elements of its channel.
constexpr int64_t kElementsPerGroup = 16384;
// At most this many groups per channel (the float64 workspace is groups x
// channels).
constexpr int64_t kMaxGroups = 512;

// The device copy of DropoutSpec's source of decisions.
struct KeepSource {
  uint64_t seed;
  uint64_t offset;
  uint64_t threshold;
  philox::BlockStart blocks;  // of spec.start
  const uint8_t* mask_in;
  uint8_t* mask_out;
};

// The keep bits of elements [8 * unit, 8 * unit + count), count in 1..8,
// bit j for element 8 * unit + j (global index start + 8 * unit + j); bits
// past count are zero. Drawn ones are also stored in mask_out when it is
// set. A unit's elements fill two whole blocks when start % 4 == 0, and
// otherwise reach into a third, whose lanes are shifted into place; the
// branch is the same for every thread.
__device__ __forceinline__ uint32_t unit_keeps(const KeepSource& k, int64_t unit, int count) {
  if (k.mask_in != nullptr) return k.mask_in[unit];
  const uint64_t first = k.blocks.first_block + 2 * static_cast<uint64_t>(unit);
  uint32_t bits = 0;
  if (k.blocks.lane_shift == 0) {
#pragma unroll
    for (int b = 0; b < 2; ++b)
      if (b * philox::kLanes < count)
        bits |= philox::dropout_block_keeps(k.seed, k.offset, first + b, k.threshold)
                << (b * philox::kLanes);
  } else {
    const int lanes = count + static_cast<int>(k.blocks.lane_shift);
#pragma unroll
    for (int b = 0; b < 3; ++b)
      if (b * philox::kLanes < lanes)
        bits |= philox::dropout_block_keeps(k.seed, k.offset, first + b, k.threshold)
                << (b * philox::kLanes);
    bits >>= k.blocks.lane_shift;
  }
  if (count < kUnit) bits &= (1u << count) - 1u;
  if (k.mask_out != nullptr) k.mask_out[unit] = static_cast<uint8_t>(bits);
  return bits;
}

// a / b for non-negative operands: the 32-bit division is several times
// cheaper, and most operands fit.
__device__ __forceinline__ int64_t divide(int64_t a, int64_t b) {
  if (((a | b) >> 32) == 0) return static_cast<uint32_t>(a) / static_cast<uint32_t>(b);
  return a / b;
}

// Plain dropout has no bias.
template <class St> struct NoBias {
  using C = typename St::Compute;
  __device__ __forceinline__ void seek(int64_t) {}
  __device__ __forceinline__ C value() const { return C(0); }
  __device__ __forceinline__ void next() {}
};

// The bias of the fused epilogue: element i of h (logical index) adds
// bias[(i / inner) % channels]. A thread seeks once per unit and then steps
// element by element, which needs no division.
template <class St> struct ChannelBias {
  using S = typename St::Stored;
  using C = typename St::Compute;
  const S* data;
  int64_t stride;  // in elements
  int64_t channels;
  int64_t inner;   // product of h's extents after the bias axis
  int64_t within = 0;
  int64_t channel = 0;

  __device__ __forceinline__ void seek(int64_t i) {
    const int64_t q = divide(i, inner);
    within = i - q * inner;
    channel = q - divide(q, channels) * channels;
  }
  __device__ __forceinline__ C value() const { return St::load(data[channel * stride]); }
  __device__ __forceinline__ void next() {
    if (++within == inner) {
      within = 0;
      if (++channel == channels) channel = 0;
    }
  }
};

// The elementwise step of each kernel, in the compute type: v holds the
// operands read at the element, bias its bias (0 without one), factor the
// scale when the element is kept and 0 when it is dropped. The products and
// sums are the CPU kernels' own, in the same order.
template <class St> struct DropoutStep {
  using C = typename St::Compute;
  // Half types keep x * scale to one rounding: the float32 product is
  // rounded to odd, so that narrowing it is the exact product's rounding
  // (the CPU kernels' arithmetic, so both devices give the same bits).
  __device__ __forceinline__ C operator()(const C (&v)[1], C, C factor) const {
    if constexpr (sizeof(typename St::Stored) == 2) {
      return multiply_to_odd(v[0], factor);
    } else {
      return v[0] * factor;
    }
  }
};

template <class Op, class St> struct BiasActForwardStep {
  using C = typename St::Compute;
  ActivationParams p;
  // v = {h}
  __device__ __forceinline__ C operator()(const C (&v)[1], C bias, C factor) const {
    return Op::template forward<C>(v[0] + bias, p) * factor;
  }
};

template <class Op, class St> struct BiasActBackwardStep {
  using C = typename St::Compute;
  ActivationParams p;
  // v = {grad_output, h}
  __device__ __forceinline__ C operator()(const C (&v)[2], C bias, C factor) const {
    return Op::template backward_x<C>(v[0] * factor, v[1] + bias, p);
  }
};

template <class St, int kIn> struct Pointers {
  const typename St::Stored* in[kIn];
  typename St::Stored* out;
};

// Every operand contiguous in logical order. Whole units move in 16-byte
// packs when `packed` (all pointers 16-byte aligned; a unit is 16, 32 or 64
// bytes, so its packs stay aligned); the last, partial unit and unaligned
// arrays go element by element.
template <class St, int kIn, class Step, class Bias>
__global__ void __launch_bounds__(kThreads)
    dropout_contiguous(Step step, Pointers<St, kIn> ops, Bias bias, KeepSource keep,
                       typename St::Compute scale, int64_t n, bool packed) {
  using S = typename St::Stored;
  using C = typename St::Compute;
  using P = Pack<S>;
  constexpr int kPacks = kUnit * int(sizeof(S)) / 16;
  static_assert(kPacks * P::kSize == kUnit, "a unit is whole packs");
  const int64_t units = (n + kUnit - 1) / kUnit;
  const int64_t whole = packed ? n / kUnit : 0;
  for (int64_t u = global_thread(); u < units; u += grid_threads()) {
    const int64_t first = u * kUnit;
    const int count = n - first < kUnit ? int(n - first) : kUnit;
    // The unit's loads are issued before the Philox rounds, so that the
    // arithmetic runs while they are in flight: after the mask byte's store
    // (a byte store may alias anything) the compiler could not move them up.
    P in[kIn][kPacks];
    if (u < whole) {
#pragma unroll
      for (int k = 0; k < kIn; ++k)
#pragma unroll
        for (int q = 0; q < kPacks; ++q)
          in[k][q] = reinterpret_cast<const P*>(ops.in[k] + first)[q];
    }
    const uint32_t bits = unit_keeps(keep, u, count);
    bias.seek(first);
    if (u < whole) {
      P out[kPacks];
#pragma unroll
      for (int j = 0; j < kUnit; ++j) {
        C v[kIn];
#pragma unroll
        for (int k = 0; k < kIn; ++k) v[k] = St::load(in[k][j / P::kSize].v[j % P::kSize]);
        const C factor = (bits >> j) & 1u ? scale : C(0);
        out[j / P::kSize].v[j % P::kSize] = St::store(step(v, bias.value(), factor));
        bias.next();
      }
#pragma unroll
      for (int q = 0; q < kPacks; ++q) reinterpret_cast<P*>(ops.out + first)[q] = out[q];
    } else {
      for (int j = 0; j < count; ++j) {
        C v[kIn];
#pragma unroll
        for (int k = 0; k < kIn; ++k) v[k] = St::load(ops.in[k][first + j]);
        const C factor = (bits >> j) & 1u ? scale : C(0);
        ops.out[first + j] = St::store(step(v, bias.value(), factor));
        bias.next();
      }
    }
  }
}

// Any layout: each unit finds its first element's offsets from the merged
// layout, then steps along the innermost dimension, recomputing the offsets
// only where that dimension wraps.
template <class St, int kIn, class Step, class Bias>
__global__ void __launch_bounds__(kThreads)
    dropout_strided(Step step, Pointers<St, kIn> ops, Layout<kIn + 1> layout, Bias bias,
                    KeepSource keep, typename St::Compute scale) {
  using C = typename St::Compute;
  const int64_t n = layout.size;
  const int64_t units = (n + kUnit - 1) / kUnit;
  const int last = layout.ndim - 1;
  const int64_t extent = layout.shape[last];
  for (int64_t u = global_thread(); u < units; u += grid_threads()) {
    const int64_t first = u * kUnit;
    const int count = n - first < kUnit ? int(n - first) : kUnit;
    const uint32_t bits = unit_keeps(keep, u, count);
    bias.seek(first);
    int64_t off[kIn + 1];
    layout.offsets(first, off);
    int64_t along = first - divide(first, extent) * extent;
    for (int j = 0; j < count; ++j) {
      if (j > 0) {
        if (++along < extent) {
#pragma unroll
          for (int k = 0; k <= kIn; ++k) off[k] += layout.strides[k][last];
        } else {
          along = 0;
          layout.offsets(first + j, off);
        }
      }
      C v[kIn];
#pragma unroll
      for (int k = 0; k < kIn; ++k) v[k] = St::load(ops.in[k][off[k]]);
      const C factor = (bits >> j) & 1u ? scale : C(0);
      ops.out[off[kIn]] = St::store(step(v, bias.value(), factor));
      bias.next();
    }
  }
}

__global__ void __launch_bounds__(kThreads) dropout_mask_kernel(KeepSource keep, int64_t n) {
  const int64_t units = (n + kUnit - 1) / kUnit;
  for (int64_t u = global_thread(); u < units; u += grid_threads()) {
    const int64_t first = u * kUnit;
    unit_keeps(keep, u, n - first < kUnit ? int(n - first) : kUnit);
  }
}

KeepSource keep_source(const DropoutSpec& spec) {
  return KeepSource{spec.seed,          spec.offset,   spec.threshold,
                    philox::block_start(spec.start), spec.mask_in, spec.mask_out};
}

// arrays = inputs..., output; all of one shape and dtype.
template <class St, int kIn, class Step, class Bias>
void launch_dropout(const Step& step, const DeviceArrayRef* const (&arrays)[kIn + 1],
                    const Bias& bias, const DropoutSpec& spec, const LaunchTarget& target,
                    const char* what) {
  using S = typename St::Stored;
  using C = typename St::Compute;
  const Layout<kIn + 1> layout = make_layout(arrays, /*any_order=*/false);
  if (layout.size == 0) return;
  const DeviceScope scope(target.device);
  Pointers<St, kIn> ops;
  bool packed = aligned16(arrays[kIn]->data);
  for (int k = 0; k < kIn; ++k) {
    ops.in[k] = static_cast<const S*>(arrays[k]->data);
    packed = packed && aligned16(arrays[k]->data);
  }
  ops.out = static_cast<S*>(arrays[kIn]->data);
  const KeepSource keep = keep_source(spec);
  const C scale = static_cast<C>(spec.scale);
  const cudaStream_t stream = stream_of(target);
  const int64_t units = (layout.size + kUnit - 1) / kUnit;
  const unsigned grid = grid_for(units, target.device);
  if (layout.contiguous()) {
    dropout_contiguous<St, kIn, Step, Bias>
        <<<grid, kThreads, 0, stream>>>(step, ops, bias, keep, scale, layout.size, packed);
  } else {
    dropout_strided<St, kIn, Step, Bias>
        <<<grid, kThreads, 0, stream>>>(step, ops, layout, bias, keep, scale);
  }
  check_launch(what);
}

// (channels, inner) of the bias axis of an array of `shape`.
void bias_extents(int ndim, const int64_t* shape, int axis, int64_t& channels, int64_t& inner) {
  if (axis < 0 || axis >= ndim) throw std::invalid_argument("bias axis out of range");
  channels = shape[axis];
  inner = 1;
  for (int d = axis + 1; d < ndim; ++d) inner *= shape[d];
}

template <class St>
ChannelBias<St> channel_bias(const DeviceArrayRef& bias, const DeviceArrayRef& h, int axis) {
  int64_t channels = 0, inner = 0;
  bias_extents(h.ndim, h.shape, axis, channels, inner);
  if (bias.ndim != 1 || bias.shape[0] != channels || bias.dtype != h.dtype)
    throw std::invalid_argument("bias must be 1-d, of h's dtype and length h.shape[axis]");
  ChannelBias<St> view{};
  view.data = static_cast<const typename St::Stored*>(bias.data);
  view.stride = bias.strides[0] / itemsize(bias.dtype);
  view.channels = channels;
  view.inner = inner;
  return view;
}

// ---- grad_bias --------------------------------------------------------------

// The rows (outer indices) of `group` when `outer` rows are split into
// `groups` groups of nearly equal size, the first ones one row larger.
__host__ __device__ __forceinline__ void group_rows(int64_t outer, int64_t groups, int64_t group,
                                                    int64_t& first, int64_t& last) {
  const int64_t base = outer / groups;
  const int64_t extra = outer % groups;
  first = group * base + (group < extra ? group : extra);
  last = first + base + (group < extra ? 1 : 0);
}

// The number of row groups for grad_h viewed as (outer, channels, inner): a
// function of the shape alone, so the summation order never depends on the
// device or the grid. 0 when there is nothing to sum.
int64_t bias_grad_groups(int64_t outer, int64_t channels, int64_t inner) {
  if (outer == 0 || channels == 0 || inner == 0) return 0;
  int64_t groups = 0;
  if (inner == 1) {
    groups = (outer + kRowsPerGroup - 1) / kRowsPerGroup;
  } else {
    const int64_t per_channel = outer * inner;
    groups = std::min<int64_t>(outer, (per_channel + kElementsPerGroup - 1) / kElementsPerGroup);
  }
  return std::max<int64_t>(1, std::min<int64_t>(groups, kMaxGroups));
}

template <class St> __device__ __forceinline__ double as_double(typename St::Stored s) {
  return static_cast<double>(St::load(s));
}

// One rounding from the float64 sum to the stored type (float16 and
// bfloat16 directly, not through float32).
template <class St> __device__ __forceinline__ typename St::Stored from_double(double s) {
  if constexpr (sizeof(typename St::Stored) == 2) {
    return St::from_double(s);
  } else {
    return static_cast<typename St::Stored>(s);
  }
}

// inner = 1: block (x: 32 channels, y: one row group); thread (c, lane)
// sums rows first + lane, first + lane + 8, ... of channel c, and the 8
// lanes are added in order.
template <class St>
__global__ void __launch_bounds__(kThreads)
    bias_grad_columns(const typename St::Stored* grad_h,  // (outer, channels)
                      int64_t outer, int64_t channels, int64_t groups, double* partial) {
  __shared__ double lanes[kRowLanes][kColumnLanes];
  const int64_t c = int64_t(blockIdx.x) * kColumnLanes + threadIdx.x;
  const int64_t group = blockIdx.y;
  int64_t first = 0, last = 0;
  group_rows(outer, groups, group, first, last);
  double sum = 0.0;
  if (c < channels) {
#pragma unroll 4
    for (int64_t r = first + threadIdx.y; r < last; r += kRowLanes)
      sum += as_double<St>(grad_h[r * channels + c]);
  }
  lanes[threadIdx.y][threadIdx.x] = sum;
  __syncthreads();
  if (threadIdx.y == 0 && c < channels) {
    double total = lanes[0][threadIdx.x];
#pragma unroll
    for (int k = 1; k < kRowLanes; ++k) total += lanes[k][threadIdx.x];
    partial[group * channels + c] = total;
  }
}

// inner > 1: block (x: channel, y: row group); its threads walk the
// group's (row, position) pairs of that channel in a fixed interleaving,
// and a fixed tree adds the threads' sums.
template <class St>
__global__ void __launch_bounds__(kThreads)
    bias_grad_slabs(const typename St::Stored* grad_h,  // (outer, channels, inner)
                    int64_t outer, int64_t channels, int64_t inner, int64_t groups,
                    double* partial) {
  __shared__ double sums[kThreads];
  const int64_t c = blockIdx.x;
  const int64_t group = blockIdx.y;
  int64_t first = 0, last = 0;
  group_rows(outer, groups, group, first, last);
  const int64_t step_rows = kThreads / inner;
  const int64_t step_within = kThreads % inner;
  int64_t row = first + threadIdx.x / inner;
  int64_t within = threadIdx.x % inner;
  double sum = 0.0;
  while (row < last) {
    sum += as_double<St>(grad_h[(row * channels + c) * inner + within]);
    row += step_rows;
    within += step_within;
    if (within >= inner) {
      within -= inner;
      ++row;
    }
  }
  sums[threadIdx.x] = sum;
  __syncthreads();
#pragma unroll
  for (int width = kThreads / 2; width > 0; width /= 2) {
    if (threadIdx.x < width) sums[threadIdx.x] += sums[threadIdx.x + width];
    __syncthreads();
  }
  if (threadIdx.x == 0) partial[group * channels + c] = sums[0];
}

// grad_bias[c] = partial[0][c] + partial[1][c] + ..., in group order.
template <class St>
__global__ void __launch_bounds__(kThreads)
    bias_grad_finish(const double* partial,  // (groups, channels)
                     int64_t groups, int64_t channels, typename St::Stored* grad_bias,
                     int64_t stride) {
  for (int64_t c = global_thread(); c < channels; c += grid_threads()) {
    double total = 0.0;
    for (int64_t g = 0; g < groups; ++g) total += partial[g * channels + c];
    grad_bias[c * stride] = from_double<St>(total);
  }
}

}  // namespace

void dropout_apply(const DropoutSpec& spec, const DeviceArrayRef& x, const DeviceArrayRef& y,
                   const LaunchTarget& target) {
  const DeviceArrayRef* const arrays[2] = {&x, &y};
  visit_dtype(x.dtype, [&](auto storage) {
    using St = decltype(storage);
    launch_dropout<St, 1>(DropoutStep<St>{}, arrays, NoBias<St>{}, spec, target, "dropout");
  });
}

void dropout_mask(const DropoutSpec& spec, int64_t n, const LaunchTarget& target) {
  if (n < 0) throw std::invalid_argument("dropout_mask: n must be non-negative");
  if (n == 0) return;
  if (spec.mask_out == nullptr) throw std::invalid_argument("dropout_mask: no mask to write");
  const DeviceScope scope(target.device);
  const int64_t units = (n + kUnit - 1) / kUnit;
  dropout_mask_kernel<<<grid_for(units, target.device), kThreads, 0, stream_of(target)>>>(
      keep_source(spec), n);
  check_launch("dropout_mask");
}

void bias_act_dropout_forward(Activation act, const ActivationParams& p, const DropoutSpec& spec,
                              const DeviceArrayRef& h, const DeviceArrayRef& bias, int axis,
                              const DeviceArrayRef& out, const LaunchTarget& target) {
  const DeviceArrayRef* const arrays[2] = {&h, &out};
  visit_activation(act, p, [&](auto op) {
    using Op = decltype(op);
    visit_dtype(h.dtype, [&](auto storage) {
      using St = decltype(storage);
      launch_dropout<St, 1>(BiasActForwardStep<Op, St>{p}, arrays, channel_bias<St>(bias, h, axis),
                            spec, target, "bias_act_dropout forward");
    });
  });
}

void bias_act_dropout_backward(Activation act, const ActivationParams& p,
                               const DropoutSpec& spec, const DeviceArrayRef& grad_output,
                               const DeviceArrayRef& h, const DeviceArrayRef& bias, int axis,
                               const DeviceArrayRef& grad_h, const LaunchTarget& target) {
  const DeviceArrayRef* const arrays[3] = {&grad_output, &h, &grad_h};
  visit_activation(act, p, [&](auto op) {
    using Op = decltype(op);
    visit_dtype(h.dtype, [&](auto storage) {
      using St = decltype(storage);
      launch_dropout<St, 2>(BiasActBackwardStep<Op, St>{p}, arrays,
                            channel_bias<St>(bias, h, axis), spec, target,
                            "bias_act_dropout backward");
    });
  });
}

int64_t bias_grad_workspace(int ndim, const int64_t* shape, int axis) {
  int64_t channels = 0, inner = 0;
  bias_extents(ndim, shape, axis, channels, inner);
  int64_t outer = 1;
  for (int d = 0; d < axis; ++d) outer *= shape[d];
  return bias_grad_groups(outer, channels, inner) * channels;
}

void bias_grad(const DeviceArrayRef& grad_h, int axis, const DeviceArrayRef& grad_bias,
               double* workspace, int64_t workspace_size, const LaunchTarget& target) {
  int64_t channels = 0, inner = 0;
  bias_extents(grad_h.ndim, grad_h.shape, axis, channels, inner);
  int64_t outer = 1;
  for (int d = 0; d < axis; ++d) outer *= grad_h.shape[d];
  if (grad_bias.ndim != 1 || grad_bias.shape[0] != channels || grad_bias.dtype != grad_h.dtype)
    throw std::invalid_argument(
        "bias_grad: grad_bias must be 1-d, of grad_h's dtype and length grad_h.shape[axis]");
  // C-contiguous: each stride is the product of the extents after it
  // (extents of 1 and empty arrays place no constraint).
  if (outer * channels * inner != 0) {
    int64_t expected = itemsize(grad_h.dtype);
    for (int d = grad_h.ndim - 1; d >= 0; --d) {
      if (grad_h.shape[d] != 1 && grad_h.strides[d] != expected)
        throw std::invalid_argument("bias_grad: grad_h must be C-contiguous");
      expected *= grad_h.shape[d];
    }
  }
  const int64_t groups = bias_grad_groups(outer, channels, inner);
  if (workspace_size < groups * channels)
    throw std::invalid_argument("bias_grad: workspace too small");
  if (channels == 0) return;
  if (groups > 0 && channels > std::numeric_limits<int>::max())
    throw std::invalid_argument("bias_grad: more than 2^31 - 1 channels");
  const DeviceScope scope(target.device);
  const cudaStream_t stream = stream_of(target);
  visit_dtype(grad_h.dtype, [&](auto storage) {
    using St = decltype(storage);
    using S = typename St::Stored;
    const S* g = static_cast<const S*>(grad_h.data);
    if (groups > 0) {
      if (inner == 1) {
        const dim3 grid(static_cast<unsigned>((channels + kColumnLanes - 1) / kColumnLanes),
                        static_cast<unsigned>(groups));
        bias_grad_columns<St><<<grid, dim3(kColumnLanes, kRowLanes), 0, stream>>>(
            g, outer, channels, groups, workspace);
      } else {
        const dim3 grid(static_cast<unsigned>(channels), static_cast<unsigned>(groups));
        bias_grad_slabs<St><<<grid, kThreads, 0, stream>>>(g, outer, channels, inner, groups,
                                                           workspace);
      }
      check_launch("bias_grad partial sums");
    }
    bias_grad_finish<St><<<grid_for(channels, target.device), kThreads, 0, stream>>>(
        workspace, groups, channels, static_cast<S*>(grad_bias.data),
        grad_bias.strides[0] / itemsize(grad_bias.dtype));
    check_launch("bias_grad");
  });
}

}  // namespace cuda
}  // namespace fusednn
