// CUDA loops for batch normalization: the per-channel reductions (batch
// statistics in the forward pass; sum(dy) and sum(dy * (x - mean)) in the
// backward pass), a per-channel step that merges their partial results and
// forms the coefficients, and the elementwise passes that write y and
// grad_input. The math is fusednn/batchnorm.h, the functions the CPU kernels
// run; this file decides the grid.
//
// Each array is viewed as (outer, C, inner) around the channel axis, and the
// reduction is split into units fixed by that shape alone, one thread block
// each:
// - inner > 1 (NCHW and the like): a unit is one channel over a block of
//   outer rows and a block of the inner extent; the block's threads walk
//   its runs of `inner` elements in 16-byte groups.
// - inner == 1 (channels-last): a unit is a block of channels over a block
//   of rows; each thread owns one 16-byte group of channels, consecutive
//   threads take consecutive groups (coalesced across C), and the warps
//   stride over the rows.
// Every thread sums a fixed set of elements in a fixed order (in double,
// around a center taken from the unit's samples), the block combines its
// threads in a fixed tree, and a warp per channel merges the units with
// Chan's formula in a fixed tree. No atomics: the statistics and gradients
// have the same bits on every run, for every GPU and grid size, and for any
// strides or alignment of the inputs (16-byte vector loads fetch exactly
// the elements the scalar loads would, in the same order).
#include "fusednn/channel_layout.h"
#include "cuda/batchnorm.h"

#include <algorithm>
#include <climits>
#include <stdexcept>
#include <string>
#include <vector>

#include "cuda/elementwise.cuh"
#include "fusednn/batchnorm.h"

namespace fusednn {
namespace cuda {
namespace {

// Elements per reduction unit: enough work per block that combining its
// threads costs little, few enough that NCHW activations of a few MB still
// give every multiprocessor several blocks.
constexpr int64_t kUnitElements = 16384;
constexpr int kWarps = kThreads / 32;
constexpr unsigned kFullMask = 0xffffffffu;
// Groups each thread loads before it adds them up: several 16-byte loads in
// flight per thread keep the memory system busy.
constexpr int kSliceUnroll = 4;
constexpr int kRowUnroll = 2;

// One unit's sums around `center`, with its element count.
struct Partial {
  double count;
  double center;
  double s1;
  double s2;
};

using ChannelView = ChannelLayout;

ChannelView channel_view(const DeviceArrayRef& a, int axis) {
  return channel_layout(a.shape, a.strides, a.ndim, itemsize(a.dtype), axis);
}

bool contiguous(const DeviceArrayRef& a) {
  return is_contiguous_layout(a.shape, a.strides, a.ndim, itemsize(a.dtype));
}

int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// The fixed split of a reduction into units (see the top of the file).
// `group` is the elements in 16 bytes of the dtype.
struct Partition {
  int64_t outer, channels, inner;
  int64_t outer_block, outer_blocks;
  // inner > 1
  int64_t inner_block, inner_blocks;
  // inner == 1: threads sharing a row, each owning one group of channels
  int64_t lanes_per_row;
  int64_t channel_block, channel_blocks;

  __host__ __device__ int64_t units_per_channel() const { return outer_blocks * inner_blocks; }
  int64_t blocks() const {
    return inner > 1 ? channels * units_per_channel() : channel_blocks * outer_blocks;
  }
};

Partition make_partition(int64_t outer, int64_t channels, int64_t inner, int group) {
  Partition p{};
  p.outer = outer;
  p.channels = channels;
  p.inner = inner;
  if (inner > 1) {
    p.inner_block = std::min(inner, kUnitElements);
    p.outer_block = std::max<int64_t>(1, kUnitElements / p.inner_block);
    p.lanes_per_row = 0;
    p.channel_block = 1;
    p.channel_blocks = channels;
  } else {
    const int64_t groups = std::max<int64_t>(1, ceil_div(channels, group));
    int64_t lanes = 1;
    while (lanes < 32 && lanes < groups) lanes *= 2;
    const int64_t rows_per_step = kThreads / lanes;
    p.inner_block = 1;
    p.lanes_per_row = lanes;
    p.channel_block = lanes * group;
    p.channel_blocks = ceil_div(channels, p.channel_block);
    p.outer_block = std::max(rows_per_step,
                             kUnitElements / p.channel_block / rows_per_step * rows_per_step);
  }
  const bool empty = outer == 0 || inner == 0 || channels == 0;
  p.inner_blocks = empty ? 0 : ceil_div(inner, p.inner_block);
  p.outer_blocks = empty ? 0 : ceil_div(outer, p.outer_block);
  return p;
}

template <class C> constexpr int64_t coefficient_bytes() {
  return std::max(sizeof(NormalizeCoefficients<C>), sizeof(InputGradCoefficients<C>));
}

// Where the partials and the coefficients lie in the workspace.
struct WorkspaceLayout {
  int64_t coefficients_offset;
  int64_t bytes;
};

WorkspaceLayout workspace_layout(DType dtype, const Partition& p) {
  const int64_t partials = p.channels * p.units_per_channel() * int64_t(sizeof(Partial));
  const int64_t offset = ceil_div(partials, 16) * 16;
  const int64_t per_channel =
      dtype == DType::float64 ? coefficient_bytes<double>() : coefficient_bytes<float>();
  return {offset, offset + p.channels * per_channel};
}

int group_size(DType dtype) { return 16 / itemsize(dtype); }

// A per-channel array: any supported dtype, any stride; data == nullptr
// stands for an absent optional argument.
struct ChannelArray {
  void* data;
  DType dtype;
  int64_t stride;  // elements
};

ChannelArray channel_array(const DeviceArrayRef* a) {
  if (a == nullptr) return {nullptr, DType::float32, 0};
  return {a->data, a->dtype, a->ndim == 1 ? a->strides[0] / itemsize(a->dtype) : 1};
}

__device__ double load_channel(const ChannelArray& a, int64_t c, double absent) {
  if (a.data == nullptr) return absent;
  const int64_t i = c * a.stride;
  switch (a.dtype) {
    case DType::float64: return static_cast<const double*>(a.data)[i];
    case DType::float16: return __half2float(static_cast<const __half*>(a.data)[i]);
    case DType::bfloat16: return __bfloat162float(static_cast<const __nv_bfloat16*>(a.data)[i]);
    default: return static_cast<const float*>(a.data)[i];
  }
}

// Rounds once from double to the array's dtype.
__device__ void store_channel(const ChannelArray& a, int64_t c, double value) {
  const int64_t i = c * a.stride;
  switch (a.dtype) {
    case DType::float64: static_cast<double*>(a.data)[i] = value; return;
    case DType::float16: static_cast<__half*>(a.data)[i] = __double2half(value); return;
    case DType::bfloat16: static_cast<__nv_bfloat16*>(a.data)[i] = __double2bfloat16(value); return;
    default: static_cast<float*>(a.data)[i] = static_cast<float>(value); return;
  }
}

template <class St> __device__ __forceinline__ double load_double(const typename St::Stored* p) {
  return static_cast<double>(St::load(*p));
}

// The G elements of a group starting at p, `valid` of them present (the
// rest are zero and never added): one 16-byte load when `packed` (then
// valid == G, stride == 1 and p is aligned), else one load per element.
template <class St, int G>
__device__ __forceinline__ void load_group(const typename St::Stored* p, int64_t stride,
                                           int valid, bool packed,
                                           typename St::Compute (&v)[G]) {
  using S = typename St::Stored;
  if (packed) {
    const Pack<S> pack = *reinterpret_cast<const Pack<S>*>(p);
#pragma unroll
    for (int j = 0; j < G; ++j) v[j] = St::load(pack.v[j]);
  } else {
#pragma unroll
    for (int j = 0; j < G; ++j)
      v[j] = j < valid ? St::load(p[j * stride]) : typename St::Compute(0);
  }
}

// Sums a and b over the block in a fixed order; thread 0 gets the totals.
// Every thread of the block must call it.
__device__ __forceinline__ void block_sum(double& a, double& b) {
  __shared__ double shared_a[kWarps];
  __shared__ double shared_b[kWarps];
#pragma unroll
  for (int offset = 16; offset > 0; offset /= 2) {
    a += __shfl_down_sync(kFullMask, a, offset);
    b += __shfl_down_sync(kFullMask, b, offset);
  }
  const int warp = threadIdx.x / 32;
  if (threadIdx.x % 32 == 0) {
    shared_a[warp] = a;
    shared_b[warp] = b;
  }
  __syncthreads();
  if (threadIdx.x == 0) {
    a = shared_a[0];
    b = shared_b[0];
    for (int w = 1; w < kWarps; ++w) {
      a += shared_a[w];
      b += shared_b[w];
    }
  }
}

// inner > 1: one block per unit of one channel, partials[c * units + u].
// centers: the saved mean per channel, or absent to center each unit on
// the median of three of its samples. g reaches the sums through Grad:
// masked by the fused ReLU's output m, or as given (m unread).
template <class St, class Sums, class Grad>
__global__ void __launch_bounds__(kThreads)
    reduce_channel_slices(const typename St::Stored* x,  // (outer, C, inner)
                          const typename St::Stored* g,  // (outer, C, inner); read if Sums needs it
                          const typename St::Stored* m,  // (outer, C, inner); read if Grad needs it
                          ChannelView xv, ChannelView gv, ChannelView mv, Partition part,
                          ChannelArray centers, bool packed, Partial* __restrict__ partials) {
  using S = typename St::Stored;
  using C = typename St::Compute;
  constexpr int G = Pack<S>::kSize;
  const int64_t units = part.units_per_channel();
  const int64_t c = blockIdx.x / units;
  const int64_t u = blockIdx.x % units;
  const int64_t o0 = u / part.inner_blocks * part.outer_block;
  const int64_t i0 = u % part.inner_blocks * part.inner_block;
  const int rows = static_cast<int>(min(part.outer, o0 + part.outer_block) - o0);
  const int n = static_cast<int>(min(part.inner, i0 + part.inner_block) - i0);
  const S* xc = x + c * xv.stride_channel + o0 * xv.stride_outer + i0 * xv.stride_inner;
  const S* gc = g + c * gv.stride_channel + o0 * gv.stride_outer + i0 * gv.stride_inner;
  const S* mc = m + c * mv.stride_channel + o0 * mv.stride_outer + i0 * mv.stride_inner;
  const double center =
      centers.data != nullptr
          ? load_channel(centers, c, 0.0)
          : median_of_three(
                load_double<St>(xc),
                load_double<St>(xc + (rows - 1) / 2 * xv.stride_outer + n / 2 * xv.stride_inner),
                load_double<St>(xc + (rows - 1) * xv.stride_outer + (n - 1) * xv.stride_inner));
  const int groups_per_row = (n + G - 1) / G;
  const int total = rows * groups_per_row;
  double s1 = 0.0;
  double s2 = 0.0;
  for (int first = threadIdx.x; first < total; first += kThreads * kSliceUnroll) {
    C xs[kSliceUnroll][G];
    C gs[kSliceUnroll][G];
    C ms[kSliceUnroll][G];
    int valid[kSliceUnroll];
#pragma unroll
    for (int k = 0; k < kSliceUnroll; ++k) {
      const int group = first + k * kThreads;
      valid[k] = 0;
      if (group < total) {
        const int row = group / groups_per_row;
        const int start = (group - row * groups_per_row) * G;
        valid[k] = min(G, n - start);
        load_group<St, G>(xc + row * xv.stride_outer + start * xv.stride_inner, xv.stride_inner,
                          valid[k], packed, xs[k]);
        if constexpr (Sums::kReadsGradient)
          load_group<St, G>(gc + row * gv.stride_outer + start * gv.stride_inner,
                            gv.stride_inner, valid[k], packed, gs[k]);
        if constexpr (Grad::kReadsOutput)
          load_group<St, G>(mc + row * mv.stride_outer + start * mv.stride_inner,
                            mv.stride_inner, valid[k], packed, ms[k]);
      }
    }
#pragma unroll
    for (int k = 0; k < kSliceUnroll; ++k) {
#pragma unroll
      for (int j = 0; j < G; ++j) {
        if (j >= valid[k]) continue;
        if constexpr (Grad::kReadsOutput) {
          Sums::add(s1, s2, xs[k][j], Grad::gradient(gs[k][j], ms[k][j]), center);
        } else if constexpr (Sums::kReadsGradient) {
          Sums::add(s1, s2, xs[k][j], gs[k][j], center);
        } else {
          Sums::add(s1, s2, xs[k][j], xs[k][j], center);
        }
      }
    }
  }
  block_sum(s1, s2);
  if (threadIdx.x == 0)
    partials[c * units + u] = Partial{static_cast<double>(rows) * n, center, s1, s2};
}

// The center of channel c's sums over rows [o0, o1) (inner == 1); x points
// at the channel's first row.
template <class St>
__device__ double row_center(const typename St::Stored* x, int64_t stride_outer, int64_t o0,
                             int64_t o1, const ChannelArray& centers, int64_t c) {
  if (centers.data != nullptr) return load_channel(centers, c, 0.0);
  return median_of_three(load_double<St>(x + o0 * stride_outer),
                         load_double<St>(x + (o0 + o1 - 1) / 2 * stride_outer),
                         load_double<St>(x + (o1 - 1) * stride_outer));
}

// inner == 1: one block per unit of channel_block channels over
// outer_block rows, partials[c * outer_blocks + u].
template <class St, class Sums, class Grad>
__global__ void __launch_bounds__(kThreads)
    reduce_rows(const typename St::Stored* x,  // (outer, C)
                const typename St::Stored* g,  // (outer, C); read if Sums needs it
                const typename St::Stored* m,  // (outer, C); read if Grad needs it
                ChannelView xv, ChannelView gv, ChannelView mv, Partition part,
                ChannelArray centers, bool packed, Partial* __restrict__ partials) {
  using S = typename St::Stored;
  using C = typename St::Compute;
  constexpr int G = Pack<S>::kSize;
  const int64_t u = blockIdx.x % part.outer_blocks;
  const int64_t c0 = blockIdx.x / part.outer_blocks * part.channel_block;
  const int width = static_cast<int>(min(part.channel_block, part.channels - c0));
  const int64_t o0 = u * part.outer_block;
  const int64_t o1 = min(part.outer, o0 + part.outer_block);
  const int lanes = static_cast<int>(part.lanes_per_row);
  const int rows_per_step = kThreads / lanes;
  const int slot = threadIdx.x / lanes;
  const int start = threadIdx.x % lanes * G;
  const int valid = max(0, min(G, width - start));
  const S* xc = x + (c0 + start) * xv.stride_channel;
  const S* gc = g + (c0 + start) * gv.stride_channel;
  const S* mc = m + (c0 + start) * mv.stride_channel;
  double center[G];
  double s1[G];
  double s2[G];
#pragma unroll
  for (int j = 0; j < G; ++j) {
    s1[j] = 0.0;
    s2[j] = 0.0;
    center[j] = j < valid ? row_center<St>(xc + j * xv.stride_channel, xv.stride_outer, o0, o1,
                                           centers, c0 + start + j)
                          : 0.0;
  }
  if (valid > 0) {
    for (int64_t first = o0 + slot; first < o1; first += int64_t(rows_per_step) * kRowUnroll) {
      C xs[kRowUnroll][G];
      C gs[kRowUnroll][G];
      C ms[kRowUnroll][G];
      bool present[kRowUnroll];
#pragma unroll
      for (int k = 0; k < kRowUnroll; ++k) {
        const int64_t row = first + k * rows_per_step;
        present[k] = row < o1;
        if (!present[k]) continue;
        load_group<St, G>(xc + row * xv.stride_outer, xv.stride_channel, valid, packed, xs[k]);
        if constexpr (Sums::kReadsGradient)
          load_group<St, G>(gc + row * gv.stride_outer, gv.stride_channel, valid, packed, gs[k]);
        if constexpr (Grad::kReadsOutput)
          load_group<St, G>(mc + row * mv.stride_outer, mv.stride_channel, valid, packed, ms[k]);
      }
#pragma unroll
      for (int k = 0; k < kRowUnroll; ++k) {
        if (!present[k]) continue;
#pragma unroll
        for (int j = 0; j < G; ++j) {
          if (j >= valid) continue;
          if constexpr (Grad::kReadsOutput) {
            Sums::add(s1[j], s2[j], xs[k][j], Grad::gradient(gs[k][j], ms[k][j]), center[j]);
          } else if constexpr (Sums::kReadsGradient) {
            Sums::add(s1[j], s2[j], xs[k][j], gs[k][j], center[j]);
          } else {
            Sums::add(s1[j], s2[j], xs[k][j], xs[k][j], center[j]);
          }
        }
      }
    }
  }
  // [slot][channel in block]: rows_per_step slots of channel_block columns.
  __shared__ double shared_s1[kThreads * G];
  __shared__ double shared_s2[kThreads * G];
#pragma unroll
  for (int j = 0; j < G; ++j) {
    shared_s1[slot * part.channel_block + start + j] = s1[j];
    shared_s2[slot * part.channel_block + start + j] = s2[j];
  }
  __syncthreads();
  for (int w = threadIdx.x; w < width; w += kThreads) {
    double a = 0.0;
    double b = 0.0;
    for (int s = 0; s < rows_per_step; ++s) {
      a += shared_s1[s * part.channel_block + w];
      b += shared_s2[s * part.channel_block + w];
    }
    const int64_t c = c0 + w;
    partials[c * part.outer_blocks + u] = Partial{
        static_cast<double>(o1 - o0),
        row_center<St>(x + c * xv.stride_channel, xv.stride_outer, o0, o1, centers, c), a, b};
  }
}

// A channel's moments from its units' partials, merged by one warp in a
// fixed tree (lane 0 gets the result); every lane of the warp must call it.
__device__ Moments merge_units(const Partial* p, int64_t units, int lane) {
  Moments acc{0.0, 0.0, 0.0};
  for (int64_t u = lane; u < units; u += 32)
    acc = merge_moments(acc, moments_from_shifted_sums(p[u].count, p[u].center, p[u].s1, p[u].s2));
#pragma unroll
  for (int offset = 16; offset > 0; offset /= 2) {
    const Moments other{__shfl_down_sync(kFullMask, acc.count, offset),
                        __shfl_down_sync(kFullMask, acc.mean, offset),
                        __shfl_down_sync(kFullMask, acc.m2, offset)};
    acc = merge_moments(acc, other);
  }
  return acc;
}

// A channel's two gradient sums from its units' partials, added by one warp
// in a fixed tree (lane 0 gets them); every lane of the warp must call it.
__device__ void sum_units(const Partial* p, int64_t units, int lane, double& sum_dy,
                          double& sum_dy_centered) {
  sum_dy = 0.0;
  sum_dy_centered = 0.0;
  for (int64_t u = lane; u < units; u += 32) {
    sum_dy += p[u].s1;
    sum_dy_centered += p[u].s2;
  }
#pragma unroll
  for (int offset = 16; offset > 0; offset /= 2) {
    sum_dy += __shfl_down_sync(kFullMask, sum_dy, offset);
    sum_dy_centered += __shfl_down_sync(kFullMask, sum_dy_centered, offset);
  }
}

struct ForwardChannels {
  ChannelArray gamma, beta, running_mean, running_var, save_mean, save_invstd;
};

// One warp per channel: merges the channel's units (training), forms the
// mean and invstd, writes save_mean, save_invstd and the running statistics,
// and the coefficients of the normalizing pass.
template <class C>
__global__ void __launch_bounds__(kThreads)
    finalize_forward(const Partial* __restrict__ partials, int64_t units, int64_t channels,
                     bool training, double momentum, double eps, ForwardChannels arrays,
                     NormalizeCoefficients<C>* __restrict__ coefficients) {
  const int64_t c = (int64_t(blockIdx.x) * kThreads + threadIdx.x) / 32;
  const int lane = threadIdx.x % 32;
  if (c >= channels) return;  // the whole warp
  const Moments acc = training ? merge_units(partials + c * units, units, lane)
                               : Moments{0.0, 0.0, 0.0};
  if (lane != 0) return;
  const double mean = training ? acc.mean : load_channel(arrays.running_mean, c, 0.0);
  const double var = training ? acc.m2 / acc.count : load_channel(arrays.running_var, c, 1.0);
  const double invstd = inverse_std(var, eps);
  store_channel(arrays.save_mean, c, mean);
  store_channel(arrays.save_invstd, c, invstd);
  if (training && arrays.running_mean.data != nullptr)
    store_channel(arrays.running_mean, c,
                  running_update(load_channel(arrays.running_mean, c, 0.0), mean, momentum));
  if (training && arrays.running_var.data != nullptr)
    store_channel(arrays.running_var, c,
                  running_update(load_channel(arrays.running_var, c, 1.0),
                                 acc.m2 / (acc.count - 1.0), momentum));
  coefficients[c] = normalize_coefficients<C>(mean, invstd, load_channel(arrays.gamma, c, 1.0),
                                              load_channel(arrays.beta, c, 0.0));
}

struct BackwardChannels {
  ChannelArray gamma, save_mean, save_invstd, grad_gamma, grad_beta;
};

// One warp per channel: adds up the channel's units, writes grad_gamma and
// grad_beta, and the coefficients of the input-gradient pass: training's
// (InputGradCoefficients) or, for inference, the normalize coefficients
// that the forward's map applies to dy.
template <class C>
__global__ void __launch_bounds__(kThreads)
    finalize_backward(const Partial* __restrict__ partials, int64_t units, int64_t channels,
                      double count, bool training, BackwardChannels arrays,
                      void* __restrict__ coefficients) {
  const int64_t c = (int64_t(blockIdx.x) * kThreads + threadIdx.x) / 32;
  const int lane = threadIdx.x % 32;
  if (c >= channels) return;  // the whole warp
  double sum_dy, sum_dy_centered;
  sum_units(partials + c * units, units, lane, sum_dy, sum_dy_centered);
  if (lane != 0) return;
  const double mean = load_channel(arrays.save_mean, c, 0.0);
  const double invstd = load_channel(arrays.save_invstd, c, 1.0);
  const double sum_dy_xhat = sum_dy_centered * invstd;
  store_channel(arrays.grad_gamma, c, sum_dy_xhat);
  store_channel(arrays.grad_beta, c, sum_dy);
  if (count == 0.0) return;
  const double gamma = load_channel(arrays.gamma, c, 1.0);
  if (training) {
    static_cast<InputGradCoefficients<C>*>(coefficients)[c] =
        input_grad_coefficients<C>(count, mean, invstd, gamma, sum_dy, sum_dy_xhat);
  } else {
    static_cast<NormalizeCoefficients<C>*>(coefficients)[c] =
        inference_input_grad_coefficients<C>(invstd, gamma);
  }
}

// ---- the split phases of data-parallel batch normalization ----------------

// One warp per channel: the channel's mean and M2 from its units (zeros for a
// slice with no elements).
__global__ void __launch_bounds__(kThreads)
    store_moments(const Partial* __restrict__ partials, int64_t units, int64_t channels,
                  ChannelArray mean, ChannelArray m2) {
  const int64_t c = (int64_t(blockIdx.x) * kThreads + threadIdx.x) / 32;
  const int lane = threadIdx.x % 32;
  if (c >= channels) return;  // the whole warp
  const Moments acc = merge_units(partials + c * units, units, lane);
  if (lane != 0) return;
  store_channel(mean, c, acc.count > 0.0 ? acc.mean : 0.0);
  store_channel(m2, c, acc.count > 0.0 ? acc.m2 : 0.0);
}

// A (ranks, C) float64 array.
struct RankRows {
  const double* data;
  int64_t row_stride;  // elements
  int64_t column_stride;
};

// One thread per channel: the ranks' rows merged in rank order.
__global__ void __launch_bounds__(kThreads)
    combine_ranks(const double* __restrict__ counts, int64_t ranks, int64_t channels,
                  RankRows means, RankRows m2s, ChannelArray mean, ChannelArray var) {
  const int64_t c = global_thread();
  if (c >= channels) return;
  const Moments m = merge_ranks(ranks, counts, [&](int64_t r, double count) {
    return Moments{count, means.data[r * means.row_stride + c * means.column_stride],
                   m2s.data[r * m2s.row_stride + c * m2s.column_stride]};
  });
  store_channel(mean, c, m.mean);
  store_channel(var, c, m.m2 / m.count);
}

struct FinalizeChannels {
  ChannelArray mean, var, invstd, running_mean, running_var;
};

// One thread per channel: invstd and the running statistics.
__global__ void __launch_bounds__(kThreads)
    finalize_statistics(int64_t channels, double count, double eps, double momentum,
                        FinalizeChannels arrays) {
  const int64_t c = global_thread();
  if (c >= channels) return;
  const double var = load_channel(arrays.var, c, 1.0);
  store_channel(arrays.invstd, c, inverse_std(var, eps));
  if (arrays.running_mean.data != nullptr)
    store_channel(arrays.running_mean, c,
                  running_update(load_channel(arrays.running_mean, c, 0.0),
                                 load_channel(arrays.mean, c, 0.0), momentum));
  if (arrays.running_var.data != nullptr)
    store_channel(arrays.running_var, c,
                  running_update(load_channel(arrays.running_var, c, 1.0),
                                 unbiased_variance(var, count), momentum));
}

// One thread per channel: the normalizing pass's coefficients from given
// statistics.
template <class C>
__global__ void __launch_bounds__(kThreads)
    apply_coefficients(int64_t channels, ChannelArray mean, ChannelArray invstd,
                       ChannelArray gamma, ChannelArray beta,
                       NormalizeCoefficients<C>* __restrict__ coefficients) {
  const int64_t c = global_thread();
  if (c >= channels) return;
  coefficients[c] = normalize_coefficients<C>(load_channel(mean, c, 0.0),
                                              load_channel(invstd, c, 1.0),
                                              load_channel(gamma, c, 1.0),
                                              load_channel(beta, c, 0.0));
}

// One warp per channel: sum(dy) and sum(dy * xhat) from the units.
__global__ void __launch_bounds__(kThreads)
    store_gradient_sums(const Partial* __restrict__ partials, int64_t units, int64_t channels,
                        ChannelArray invstd, ChannelArray sum_dy, ChannelArray sum_dy_xhat) {
  const int64_t c = (int64_t(blockIdx.x) * kThreads + threadIdx.x) / 32;
  const int lane = threadIdx.x % 32;
  if (c >= channels) return;  // the whole warp
  double s1, s2;
  sum_units(partials + c * units, units, lane, s1, s2);
  if (lane != 0) return;
  store_channel(sum_dy, c, s1);
  store_channel(sum_dy_xhat, c, s2 * load_channel(invstd, c, 1.0));
}

struct BackwardApplyChannels {
  ChannelArray mean, invstd, gamma, sum_dy, sum_dy_xhat;
};

// One thread per channel: the input-gradient coefficients from the whole
// batch's sums and count.
template <class C>
__global__ void __launch_bounds__(kThreads)
    backward_apply_coefficients(int64_t channels, double count, BackwardApplyChannels arrays,
                                InputGradCoefficients<C>* __restrict__ coefficients) {
  const int64_t c = global_thread();
  if (c >= channels) return;
  coefficients[c] = input_grad_coefficients<C>(
      count, load_channel(arrays.mean, c, 0.0), load_channel(arrays.invstd, c, 1.0),
      load_channel(arrays.gamma, c, 1.0), load_channel(arrays.sum_dy, c, 0.0),
      load_channel(arrays.sum_dy_xhat, c, 0.0));
}

// Input: its one input as given (the forward's x; inference backward's dy)
// or, for the inference backward of a fused ReLU, dy masked by the ReLU's
// output, a second input. relu: a ReLU after the normalization (forward).
template <class C, class Input> struct NormalizeOp {
  using Coefficients = NormalizeCoefficients<C>;
  static constexpr int kInputs = Input::kReadsOutput ? 2 : 1;  // x or dy [, y]
  bool relu;
  __device__ __forceinline__ C operator()(const Coefficients& k, const C (&v)[kInputs]) const {
    C in = v[0];
    if constexpr (Input::kReadsOutput) in = Input::gradient(v[0], v[kInputs - 1]);
    C y = normalize(in, k.mean_hi, k.mean_lo, k.scale, k.shift);
    // x - mean can overflow float data near the top of its range (see
    // shift_may_overflow); such elements are taken again in double. The
    // test costs a compare where the loads are the bound.
    if (!isfinite(y) && isfinite(in))
      y = normalize_wide(in, double(k.mean_hi) + double(k.mean_lo), double(k.scale),
                         double(k.shift));
    return relu ? relu_after_normalize(y) : y;
  }
};

template <class C, class Grad> struct InputGradOp {
  using Coefficients = InputGradCoefficients<C>;
  static constexpr int kInputs = Grad::kReadsOutput ? 3 : 2;  // grad_output, x [, y]
  __device__ __forceinline__ C operator()(const Coefficients& k, const C (&v)[kInputs]) const {
    return input_grad(Grad::gradient(v[0], v[kInputs - 1]), v[1], k.mean_hi, k.mean_lo, k.invstd,
                      k.a, k.e, k.k);
  }
};

template <class St, int kIn> struct Operands {
  const typename St::Stored* in[kIn];
  typename St::Stored* out;
};

// Every operand contiguous and 16-byte aligned, and no group of 16 bytes
// straddling two channels of an NCHW-like layout: one pack per step. With
// inner > 1 a pack lies in one channel; with inner == 1 it covers
// consecutive channels.
template <class St, class Op>
__global__ void __launch_bounds__(kThreads)
    map_channels_packed(Op op, Operands<St, Op::kInputs> ops,
                        const typename Op::Coefficients* __restrict__ coefficients, int64_t packs,
                        int64_t channels, int64_t inner) {
  using S = typename St::Stored;
  using C = typename St::Compute;
  using P = Pack<S>;
  constexpr int kIn = Op::kInputs;
  for (int64_t i = global_thread(); i < packs; i += grid_threads()) {
    P in[kIn];
#pragma unroll
    for (int k = 0; k < kIn; ++k) in[k] = reinterpret_cast<const P*>(ops.in[k])[i];
    const int64_t first = i * P::kSize;
    P out;
    if (inner > 1) {
      const typename Op::Coefficients coef = coefficients[first / inner % channels];
#pragma unroll
      for (int j = 0; j < P::kSize; ++j) {
        C v[kIn];
#pragma unroll
        for (int k = 0; k < kIn; ++k) v[k] = St::load(in[k].v[j]);
        out.v[j] = St::store(op(coef, v));
      }
    } else {
      const int64_t c0 = first % channels;
#pragma unroll
      for (int j = 0; j < P::kSize; ++j) {
        C v[kIn];
#pragma unroll
        for (int k = 0; k < kIn; ++k) v[k] = St::load(in[k].v[j]);
        out.v[j] = St::store(op(coefficients[c0 + j], v));
      }
    }
    reinterpret_cast<P*>(ops.out)[i] = out;
  }
}

// Any strides: the layout's operands are the inputs, the channel index (a
// pseudo-operand stepping along the channel axis only) and the output.
template <class St, class Op>
__global__ void __launch_bounds__(kThreads)
    map_channels_strided(Op op, Operands<St, Op::kInputs> ops,
                         const typename Op::Coefficients* __restrict__ coefficients,
                         Layout<Op::kInputs + 2> layout) {
  using C = typename St::Compute;
  constexpr int kIn = Op::kInputs;
  for (int64_t i = global_thread(); i < layout.size; i += grid_threads()) {
    int64_t off[kIn + 2];
    layout.offsets(i, off);
    C v[kIn];
#pragma unroll
    for (int k = 0; k < kIn; ++k) v[k] = St::load(ops.in[k][off[k]]);
    ops.out[off[kIn + 1]] = St::store(op(coefficients[off[kIn]], v));
  }
}

unsigned blocks_for(int64_t blocks) {
  if (blocks > INT_MAX) throw std::invalid_argument("batch_norm: array too large for one grid");
  return static_cast<unsigned>(blocks);
}

// arrays = inputs..., output; all of x's shape and dtype.
template <class St, class Op>
void launch_channel_map(const Op& op, const DeviceArrayRef* const (&arrays)[Op::kInputs + 1],
                        int axis, const ChannelView& view,
                        const typename Op::Coefficients* coefficients, const LaunchTarget& target,
                        cudaStream_t stream, const char* what) {
  using S = typename St::Stored;
  constexpr int kIn = Op::kInputs;
  constexpr int G = Pack<S>::kSize;
  const int64_t size = view.outer * view.channels * view.inner;
  if (size == 0) return;
  Operands<St, kIn> ops;
  for (int k = 0; k < kIn; ++k) ops.in[k] = static_cast<const S*>(arrays[k]->data);
  ops.out = static_cast<S*>(arrays[kIn]->data);
  bool packed = view.inner > 1 ? view.inner % G == 0 : view.channels % G == 0;
  for (const DeviceArrayRef* a : arrays) packed = packed && contiguous(*a) && aligned16(a->data);
  if (packed) {
    const int64_t packs = size / G;
    map_channels_packed<St, Op><<<grid_for(packs, target.device), kThreads, 0, stream>>>(
        op, ops, coefficients, packs, view.channels, view.inner);
  } else {
    const DeviceArrayRef& first = *arrays[0];
    std::vector<int64_t> channel_strides(static_cast<size_t>(first.ndim), 0);
    channel_strides[static_cast<size_t>(axis)] = itemsize(first.dtype);
    const DeviceArrayRef channel{nullptr, first.dtype, first.ndim, first.shape,
                                 channel_strides.data()};
    const DeviceArrayRef* layout_arrays[kIn + 2];
    for (int k = 0; k < kIn; ++k) layout_arrays[k] = arrays[k];
    layout_arrays[kIn] = &channel;
    layout_arrays[kIn + 1] = arrays[kIn];
    const Layout<kIn + 2> layout = make_layout(layout_arrays, /*any_order=*/true);
    map_channels_strided<St, Op><<<grid_for(layout.size, target.device), kThreads, 0, stream>>>(
        op, ops, coefficients, layout);
  }
  check_launch(what);
}

// Whether the units' 16-byte groups of this view can be loaded as packs.
bool slices_packed(const ChannelView& v, const void* data, int group) {
  return v.stride_inner == 1 && v.inner % group == 0 &&
         (v.outer == 1 || v.stride_outer % group == 0) &&
         (v.channels == 1 || v.stride_channel % group == 0) && aligned16(data);
}

bool rows_packed(const ChannelView& v, const void* data, int group) {
  return (v.stride_channel == 1 || v.channels == 1) && v.channels % group == 0 &&
         (v.outer == 1 || v.stride_outer % group == 0) && aligned16(data);
}

// Fills every unit's partial; g is read only by Sums that need it, m (the
// fused ReLU's output) only by a Grad that masks g.
template <class St, class Sums, class Grad>
void launch_reduction(const ChannelView& xv, const typename St::Stored* x, const ChannelView& gv,
                      const typename St::Stored* g, const ChannelView& mv,
                      const typename St::Stored* m, const Partition& part,
                      const ChannelArray& centers, Partial* partials, cudaStream_t stream) {
  constexpr int G = Pack<typename St::Stored>::kSize;
  const int64_t blocks = part.blocks();
  if (blocks == 0) return;
  if (xv.inner > 1) {
    const bool packed = slices_packed(xv, x, G) &&
                        (!Sums::kReadsGradient || slices_packed(gv, g, G)) &&
                        (!Grad::kReadsOutput || slices_packed(mv, m, G));
    reduce_channel_slices<St, Sums, Grad><<<blocks_for(blocks), kThreads, 0, stream>>>(
        x, g, m, xv, gv, mv, part, centers, packed, partials);
  } else {
    const bool packed = rows_packed(xv, x, G) && (!Sums::kReadsGradient || rows_packed(gv, g, G)) &&
                        (!Grad::kReadsOutput || rows_packed(mv, m, G));
    reduce_rows<St, Sums, Grad><<<blocks_for(blocks), kThreads, 0, stream>>>(
        x, g, m, xv, gv, mv, part, centers, packed, partials);
  }
  check_launch("batch_norm reduction");
}

unsigned finalize_blocks(int64_t channels) { return blocks_for(ceil_div(channels * 32, kThreads)); }

template <class St>
void forward_typed(const DeviceArrayRef& x, const DeviceArrayRef& y,
                   const BatchNormForwardArgs& args, const Workspace& workspace,
                   const LaunchTarget& target) {
  using S = typename St::Stored;
  using C = typename St::Compute;
  const ChannelView xv = channel_view(x, args.axis);
  if (xv.channels == 0) return;
  const int64_t count = xv.outer * xv.inner;
  if (args.training && count < 2)
    throw std::invalid_argument("batch_norm: training needs more than one value per channel");
  if (!args.training && (args.running_mean == nullptr || args.running_var == nullptr))
    throw std::invalid_argument("batch_norm: inference needs the running statistics");
  const Partition part = make_partition(xv.outer, xv.channels, xv.inner, group_size(x.dtype));
  const WorkspaceLayout layout = workspace_layout(x.dtype, part);
  if (workspace.bytes < layout.bytes) throw std::invalid_argument("batch_norm: workspace too small");
  char* base = static_cast<char*>(workspace.data);
  Partial* partials = reinterpret_cast<Partial*>(base);
  auto* coefficients = reinterpret_cast<NormalizeCoefficients<C>*>(base + layout.coefficients_offset);
  const DeviceScope scope(target.device);
  const cudaStream_t stream = stream_of(target);
  const S* xp = static_cast<const S*>(x.data);
  if (args.training)
    launch_reduction<St, StatisticsSums, GradientAsGiven>(xv, xp, xv, xp, xv, xp, part,
                                                          channel_array(nullptr), partials, stream);
  const ForwardChannels arrays{channel_array(args.gamma),        channel_array(args.beta),
                               channel_array(args.running_mean), channel_array(args.running_var),
                               channel_array(args.save_mean),    channel_array(args.save_invstd)};
  finalize_forward<C><<<finalize_blocks(xv.channels), kThreads, 0, stream>>>(
      partials, args.training ? part.units_per_channel() : 0, xv.channels, args.training,
      args.momentum, args.eps, arrays, coefficients);
  check_launch("batch_norm statistics");
  const DeviceArrayRef* const operands[2] = {&x, &y};
  launch_channel_map<St>(NormalizeOp<C, GradientAsGiven>{args.relu}, operands, args.axis, xv,
                         coefficients, target, stream, "batch_norm forward");
}

// m: the fused ReLU's output, whose mask Grad applies to grad_output, or
// grad_output itself when Grad takes it as given.
template <class St, class Grad>
void backward_typed(const DeviceArrayRef& grad_output, const DeviceArrayRef& x,
                    const DeviceArrayRef& m, const DeviceArrayRef& grad_input,
                    const BatchNormBackwardArgs& args, const Workspace& workspace,
                    const LaunchTarget& target) {
  using S = typename St::Stored;
  using C = typename St::Compute;
  const ChannelView xv = channel_view(x, args.axis);
  const ChannelView gv = channel_view(grad_output, args.axis);
  const ChannelView mv = channel_view(m, args.axis);
  if (xv.channels == 0) return;
  const int64_t count = xv.outer * xv.inner;
  const Partition part = make_partition(xv.outer, xv.channels, xv.inner, group_size(x.dtype));
  const WorkspaceLayout layout = workspace_layout(x.dtype, part);
  if (workspace.bytes < layout.bytes) throw std::invalid_argument("batch_norm: workspace too small");
  char* base = static_cast<char*>(workspace.data);
  Partial* partials = reinterpret_cast<Partial*>(base);
  void* const coefficients = base + layout.coefficients_offset;
  const DeviceScope scope(target.device);
  const cudaStream_t stream = stream_of(target);
  launch_reduction<St, GradientSums, Grad>(xv, static_cast<const S*>(x.data), gv,
                                           static_cast<const S*>(grad_output.data), mv,
                                           static_cast<const S*>(m.data), part,
                                           channel_array(args.save_mean), partials, stream);
  const BackwardChannels arrays{channel_array(args.gamma), channel_array(args.save_mean),
                                channel_array(args.save_invstd), channel_array(args.grad_gamma),
                                channel_array(args.grad_beta)};
  finalize_backward<C><<<finalize_blocks(xv.channels), kThreads, 0, stream>>>(
      partials, part.units_per_channel(), xv.channels, static_cast<double>(count), args.training,
      arrays, coefficients);
  check_launch("batch_norm backward statistics");
  if (!args.training) {
    if constexpr (Grad::kReadsOutput) {
      const DeviceArrayRef* const operands[3] = {&grad_output, &m, &grad_input};
      launch_channel_map<St>(NormalizeOp<C, Grad>{false}, operands, args.axis, gv,
                             static_cast<const NormalizeCoefficients<C>*>(coefficients), target,
                             stream, "batch_norm backward");
    } else {
      const DeviceArrayRef* const operands[2] = {&grad_output, &grad_input};
      launch_channel_map<St>(NormalizeOp<C, Grad>{false}, operands, args.axis, gv,
                             static_cast<const NormalizeCoefficients<C>*>(coefficients), target,
                             stream, "batch_norm backward");
    }
    return;
  }
  if constexpr (Grad::kReadsOutput) {
    const DeviceArrayRef* const operands[4] = {&grad_output, &x, &m, &grad_input};
    launch_channel_map<St>(InputGradOp<C, Grad>{}, operands, args.axis, xv,
                           static_cast<const InputGradCoefficients<C>*>(coefficients), target,
                           stream, "batch_norm backward");
  } else {
    const DeviceArrayRef* const operands[3] = {&grad_output, &x, &grad_input};
    launch_channel_map<St>(InputGradOp<C, Grad>{}, operands, args.axis, xv,
                           static_cast<const InputGradCoefficients<C>*>(coefficients), target,
                           stream, "batch_norm backward");
  }
}

// The workspace of a call on x's view: partials, then coefficients.
struct Scratch {
  Partition part;
  Partial* partials;
  void* coefficients;
};

Scratch scratch(const DeviceArrayRef& x, const ChannelView& xv, const Workspace& workspace,
                const char* function) {
  const Partition part = make_partition(xv.outer, xv.channels, xv.inner, group_size(x.dtype));
  const WorkspaceLayout layout = workspace_layout(x.dtype, part);
  if (workspace.bytes < layout.bytes)
    throw std::invalid_argument(std::string(function) + ": workspace too small");
  char* base = static_cast<char*>(workspace.data);
  return {part, reinterpret_cast<Partial*>(base), base + layout.coefficients_offset};
}

unsigned channel_threads_blocks(int64_t channels) { return blocks_for(ceil_div(channels, kThreads)); }

template <class St>
void stats_typed(const DeviceArrayRef& x, int axis, const DeviceArrayRef& mean,
                 const DeviceArrayRef& m2, const Workspace& workspace, const LaunchTarget& target) {
  using S = typename St::Stored;
  const ChannelView xv = channel_view(x, axis);
  if (xv.channels == 0) return;
  const Scratch ws = scratch(x, xv, workspace, "batch_norm_stats");
  const DeviceScope scope(target.device);
  const cudaStream_t stream = stream_of(target);
  const S* xp = static_cast<const S*>(x.data);
  launch_reduction<St, StatisticsSums, GradientAsGiven>(xv, xp, xv, xp, xv, xp, ws.part,
                                                        channel_array(nullptr), ws.partials,
                                                        stream);
  store_moments<<<finalize_blocks(xv.channels), kThreads, 0, stream>>>(
      ws.partials, ws.part.units_per_channel(), xv.channels, channel_array(&mean),
      channel_array(&m2));
  check_launch("batch_norm_stats");
}

template <class St>
void apply_typed(const DeviceArrayRef& x, const DeviceArrayRef& y, const BatchNormApplyArgs& args,
                 const Workspace& workspace, const LaunchTarget& target) {
  using C = typename St::Compute;
  const ChannelView xv = channel_view(x, args.axis);
  if (xv.channels == 0) return;
  const Scratch ws = scratch(x, xv, workspace, "batch_norm_apply");
  auto* coefficients = static_cast<NormalizeCoefficients<C>*>(ws.coefficients);
  const DeviceScope scope(target.device);
  const cudaStream_t stream = stream_of(target);
  apply_coefficients<C><<<channel_threads_blocks(xv.channels), kThreads, 0, stream>>>(
      xv.channels, channel_array(args.mean), channel_array(args.invstd),
      channel_array(args.gamma), channel_array(args.beta), coefficients);
  check_launch("batch_norm_apply coefficients");
  const DeviceArrayRef* const operands[2] = {&x, &y};
  launch_channel_map<St>(NormalizeOp<C, GradientAsGiven>{false}, operands, args.axis, xv,
                         coefficients, target, stream, "batch_norm_apply");
}

template <class St>
void backward_reduce_typed(const DeviceArrayRef& dy, const DeviceArrayRef& x,
                           const BatchNormReduceArgs& args, const Workspace& workspace,
                           const LaunchTarget& target) {
  using S = typename St::Stored;
  const ChannelView xv = channel_view(x, args.axis);
  const ChannelView gv = channel_view(dy, args.axis);
  if (xv.channels == 0) return;
  const Scratch ws = scratch(x, xv, workspace, "batch_norm_backward_reduce");
  const DeviceScope scope(target.device);
  const cudaStream_t stream = stream_of(target);
  const S* dyp = static_cast<const S*>(dy.data);
  launch_reduction<St, GradientSums, GradientAsGiven>(xv, static_cast<const S*>(x.data), gv, dyp,
                                                      gv, dyp, ws.part, channel_array(args.mean),
                                                      ws.partials, stream);
  store_gradient_sums<<<finalize_blocks(xv.channels), kThreads, 0, stream>>>(
      ws.partials, ws.part.units_per_channel(), xv.channels, channel_array(args.invstd),
      channel_array(args.sum_dy), channel_array(args.sum_dy_xhat));
  check_launch("batch_norm_backward_reduce");
}

template <class St>
void backward_apply_typed(const DeviceArrayRef& dy, const DeviceArrayRef& x,
                          const DeviceArrayRef& dx, const BatchNormBackwardApplyArgs& args,
                          const Workspace& workspace, const LaunchTarget& target) {
  using C = typename St::Compute;
  const ChannelView xv = channel_view(x, args.axis);
  if (xv.channels == 0) return;
  const Scratch ws = scratch(x, xv, workspace, "batch_norm_backward_apply");
  auto* coefficients = static_cast<InputGradCoefficients<C>*>(ws.coefficients);
  const DeviceScope scope(target.device);
  const cudaStream_t stream = stream_of(target);
  const BackwardApplyChannels arrays{channel_array(args.mean), channel_array(args.invstd),
                                     channel_array(args.gamma), channel_array(args.sum_dy),
                                     channel_array(args.sum_dy_xhat)};
  backward_apply_coefficients<C><<<channel_threads_blocks(xv.channels), kThreads, 0, stream>>>(
      xv.channels, args.count, arrays, coefficients);
  check_launch("batch_norm_backward_apply coefficients");
  const DeviceArrayRef* const operands[3] = {&dy, &x, &dx};
  launch_channel_map<St>(InputGradOp<C, GradientAsGiven>{}, operands, args.axis, xv,
                         coefficients, target, stream, "batch_norm_backward_apply");
}

RankRows rank_rows(const DeviceArrayRef& a) {
  return {static_cast<const double*>(a.data), a.strides[0] / 8, a.strides[1] / 8};
}

}  // namespace

int64_t batch_norm_workspace_bytes(DType dtype, int64_t outer, int64_t channels, int64_t inner) {
  return workspace_layout(dtype, make_partition(outer, channels, inner, group_size(dtype))).bytes;
}

void batch_norm_forward(const DeviceArrayRef& x, const DeviceArrayRef& y,
                        const BatchNormForwardArgs& args, const Workspace& workspace,
                        const LaunchTarget& target) {
  visit_dtype(x.dtype, [&](auto storage) {
    forward_typed<decltype(storage)>(x, y, args, workspace, target);
  });
}

void batch_norm_backward(const DeviceArrayRef& grad_output, const DeviceArrayRef& x,
                         const DeviceArrayRef& grad_input, const BatchNormBackwardArgs& args,
                         const Workspace& workspace, const LaunchTarget& target) {
  visit_dtype(x.dtype, [&](auto storage) {
    using St = decltype(storage);
    if (args.relu_output != nullptr) {
      backward_typed<St, GradientThroughRelu>(grad_output, x, *args.relu_output, grad_input, args,
                                              workspace, target);
    } else {
      backward_typed<St, GradientAsGiven>(grad_output, x, grad_output, grad_input, args,
                                          workspace, target);
    }
  });
}

void batch_norm_stats(const DeviceArrayRef& x, int axis, const DeviceArrayRef& mean,
                      const DeviceArrayRef& m2, const Workspace& workspace,
                      const LaunchTarget& target) {
  visit_dtype(x.dtype, [&](auto storage) {
    stats_typed<decltype(storage)>(x, axis, mean, m2, workspace, target);
  });
}

int64_t batch_norm_combine_workspace_bytes(int64_t ranks) { return ranks * int64_t(sizeof(double)); }

void batch_norm_combine(const std::vector<double>& counts, const DeviceArrayRef& means,
                        const DeviceArrayRef& m2s, const DeviceArrayRef& mean,
                        const DeviceArrayRef& var, const Workspace& workspace,
                        const LaunchTarget& target) {
  const int64_t ranks = static_cast<int64_t>(counts.size());
  const int64_t channels = means.shape[1];
  if (workspace.bytes < batch_norm_combine_workspace_bytes(ranks))
    throw std::invalid_argument("batch_norm_combine: workspace too small");
  if (channels == 0 || ranks == 0) return;
  const DeviceScope scope(target.device);
  const cudaStream_t stream = stream_of(target);
  double* device_counts = static_cast<double*>(workspace.data);
  // From pageable memory: staged before the call returns, so `counts` may go.
  check_cuda(cudaMemcpyAsync(device_counts, counts.data(), size_t(ranks) * sizeof(double),
                             cudaMemcpyHostToDevice, stream),
             "batch_norm_combine counts");
  combine_ranks<<<channel_threads_blocks(channels), kThreads, 0, stream>>>(
      device_counts, ranks, channels, rank_rows(means), rank_rows(m2s), channel_array(&mean),
      channel_array(&var));
  check_launch("batch_norm_combine");
}

void batch_norm_finalize(const BatchNormFinalizeArgs& args, const LaunchTarget& target) {
  const int64_t channels = args.var->shape[0];
  if (channels == 0) return;
  const DeviceScope scope(target.device);
  const cudaStream_t stream = stream_of(target);
  const FinalizeChannels arrays{channel_array(args.mean), channel_array(args.var),
                                channel_array(args.invstd), channel_array(args.running_mean),
                                channel_array(args.running_var)};
  finalize_statistics<<<channel_threads_blocks(channels), kThreads, 0, stream>>>(
      channels, args.count, args.eps, args.momentum, arrays);
  check_launch("batch_norm_finalize");
}

void batch_norm_apply(const DeviceArrayRef& x, const DeviceArrayRef& y,
                      const BatchNormApplyArgs& args, const Workspace& workspace,
                      const LaunchTarget& target) {
  visit_dtype(x.dtype, [&](auto storage) {
    apply_typed<decltype(storage)>(x, y, args, workspace, target);
  });
}

void batch_norm_backward_reduce(const DeviceArrayRef& grad_output, const DeviceArrayRef& x,
                                const BatchNormReduceArgs& args, const Workspace& workspace,
                                const LaunchTarget& target) {
  visit_dtype(x.dtype, [&](auto storage) {
    backward_reduce_typed<decltype(storage)>(grad_output, x, args, workspace, target);
  });
}

void batch_norm_backward_apply(const DeviceArrayRef& grad_output, const DeviceArrayRef& x,
                               const DeviceArrayRef& grad_input,
                               const BatchNormBackwardApplyArgs& args, const Workspace& workspace,
                               const LaunchTarget& target) {
  visit_dtype(x.dtype, [&](auto storage) {
    backward_apply_typed<decltype(storage)>(grad_output, x, grad_input, args, workspace, target);
  });
}

}  // namespace cuda
}  // namespace fusednn
