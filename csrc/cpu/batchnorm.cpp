// CPU loops for batch normalization: the per-channel reductions (batch
// statistics in the forward pass; sum(dy) and sum(dy * (x - mean)) in the
// backward pass) and the elementwise passes that write y and grad_input.
// The math is fusednn/batchnorm.h; this file decides how to loop.
//
// Each array is viewed as (outer, C, inner) around the channel axis. Two
// loop shapes cover every layout: inner > 1 (NCHW and the like: runs of
// `inner` elements share one channel) and inner == 1 (channels-last:
// consecutive elements are consecutive channels, vectorized across C).
//
// When one channel's samples fit in a core's cache (inner > 1, contiguous
// rows), one task reduces a channel and then writes its outputs while the
// samples are still cached, so the inputs come from memory once instead of
// twice. Channels-last training batches do the same in bands of rows, one
// per thread (run_row_bands). The units and their merge order are those of the
// two-pass loop, so every path gives the same bits.
//
// Determinism: the reductions are split into units that depend on the
// shape alone, each unit sums its elements in a fixed lane order in double
// (channels-last units: in the data type over kPartialRows rows at a time,
// those partial sums then in double; half-precision units likewise, in
// float32 partials over kPartialVectors vectors),
// and the units of a channel are merged in index order. The thread count
// only decides who computes a unit, and every ISA build assigns the same
// elements to the same lanes, so the statistics have the same bits for any
// thread count and SIMD path. Compiled once per ISA into namespace
// FUSEDNN_ISA.
//
// The loops are written for a storage type S (the arrays' elements) and
// its compute type T = Storage<S>::Compute (fusednn/half.h): the same type
// for float and double, whose loads and stores are then plain copies.
// Per-channel coefficients and partial sums are of T.
#include "fusednn/channel_layout.h"
#include "cpu/batchnorm.h"

#include <algorithm>
#include <array>
#include <atomic>
#include <cmath>
#include <cstring>
#include <initializer_list>
#include <stdexcept>
#include <thread>
#include <type_traits>
#include <vector>

#include "cpu/activations.h"
#include "cpu/elementwise.h"
#include "cpu/half_convert.h"
#include "cpu/scratch.h"
#include "fusednn/batchnorm.h"
#include "fusednn/half.h"

namespace fusednn {
namespace cpu {
namespace FUSEDNN_ISA {
namespace {

// Elements per reduction unit: large enough that merging the units' partial
// results costs little, small enough to give every thread work.
constexpr int64_t kUnitElements = int64_t(1) << 16;

// Nanoseconds per float32 element of each loop, one core, data in cache
// (measured on (256, 1024), (32, 4096) and (64, 64, 16, 16) batches): what
// decides how many threads share a call (slice_count). A (32, 1024) batch
// is about 6 us of reduction and 10 us of normalization, too little to pay
// for waking a second thread; a (32, 4096) batch shares both.
constexpr double kReduceNanoseconds = 0.25;
constexpr double kPassNanoseconds = 0.35;
// A cache-resident channel reduced and then written in one task: forward
// and backward.
constexpr double kResidentForwardNanoseconds = 0.7;
constexpr double kResidentBackwardNanoseconds = 1.0;

// A call's work: its elements (float32 equivalents) at ns_per_element.
struct CallCost {
  int64_t elements;
  double ns_per_element;
  // How many threads the work pays for (slice_count).
  int64_t slices() const { return slice_count(elements, ns_per_element); }
};

// The cost of n elements of storage type S at ns_per_element per float32
// element: wider elements count as more.
template <class S> CallCost call_cost(int64_t n, double ns_per_element) {
  return {n, ns_per_element * std::max(1.0, double(sizeof(S)) / 4.0)};
}

// Runs task(t) for t in [0, tasks), in slices of consecutive tasks on the
// pool: as many slices as `cost` pays for, so that a small batch's few
// units do not wake a worker for less work than the hand-off costs. The
// tasks are the same whoever runs them, so results do not change.
// With every thread paid for, the tasks go to the pool one by one as
// before, so that a thread that falls behind (a shared machine) takes fewer.
template <class Task> void run_tasks(int64_t tasks, const CallCost& cost, const Task& task) {
  const int64_t slices = std::min(tasks, cost.slices());
  if (slices <= 1) {
    for (int64_t t = 0; t < tasks; ++t) task(t);
    return;
  }
  if (slices >= num_threads()) {
    parallel_for(tasks, task);
    return;
  }
  parallel_for(slices, [&](int64_t s) {
    const int64_t end = tasks * (s + 1) / slices;
    for (int64_t t = tasks * s / slices; t < end; ++t) task(t);
  });
}
// Elements per task of the elementwise passes (a multiple of 64).
constexpr int64_t kPassChunk = int64_t(1) << 15;
// Channels per channels-last unit: their accumulators stay in L1.
constexpr int64_t kChannelBlock = 256;
// Rows a channels-last unit sums in the data type before adding the
// partial sums into its double sums (StatisticsSums::add_partial).
constexpr int64_t kPartialRows = 16;
// Vectors of kLanes that a half-precision run (inner > 1) sums in float
// lanes before adding them into its double lanes (accumulate_run).
constexpr int64_t kPartialVectors = 16;
// How far ahead a channels-last unit asks for its rows: the hardware
// prefetcher alone left the statistics pass at about 60% of a bare sum's
// read rate; 8 KiB ahead made it about 15% faster (NHWC 32x56x56x128
// training forward 5.97 -> 5.61 ms, medians of 10 paired runs).
constexpr int64_t kRowPrefetchBytes = 8192;
// Independent accumulators per unit (inner > 1): a fixed number, so that the
// summation order does not follow the vector width.
constexpr int kLanes = 16;
// Bytes of input per channel (all operands read) up to which a channel is
// reduced and written in one task: about a core's L2, with the shared L3
// behind it catching what spills.
constexpr int64_t kResidentChannelBytes = int64_t(1) << 20;
// Bytes of input and output of a band of such channels (band_unit_sums):
// a quarter of a core's L2. Bands of 1 MiB (two 64x128x28x28 channels,
// input and output) made that forward 1.08-1.17x slower than one channel
// at a time.
constexpr int64_t kResidentBandBytes = int64_t(1) << 19;
// The same for the backward's bands of several channels, which do not ask
// for the next band while they write: up to 1.5 MiB (eight 64x16x16
// channels of x, dy and grad_input). Two channels a band with the next
// band asked for row by row as each was written took 1.2-1.45 times as
// long for a 64x64x16x16 backward (one and two threads, medians of 15);
// the prefetch instructions and the loads they raced with were most of
// the write's time.
constexpr int64_t kResidentBackwardBandBytes = int64_t(3) << 19;

// The compute type of storage type S.
template <class S> using ComputeOf = typename Storage<S>::Compute;

// An element of storage type S as its compute type, and back.
template <class S> inline ComputeOf<S> load_value(S v) { return Storage<S>::load(v); }
template <class S> inline S store_value(ComputeOf<S> v) { return Storage<S>::store(v); }

// Whether S is a half type, stored apart from its compute type float.
template <class S> constexpr bool kWidened = !std::is_same_v<S, ComputeOf<S>>;

// The contiguous loops over half-precision data widen 16 inputs at a time
// into a line of floats in registers, run the float32 arithmetic on it and
// narrow two such lines into one 64-byte line of outputs
// (write_half_lines): the float32 code's operations on the same values, so
// each output is the float32 loop's result rounded once. Where a row does
// not fill a line (its ends, short rows), in_widened_blocks runs the
// float32 loops on blocks of kHalfBlock elements widened into float
// buffers and narrows their results.
// compute(out, in, b, n) writes the n float results of block [b, b + n)
// to out from in[k], the block of inputs[k] widened; they are narrowed into
// dst + b.
template <int K, class S, class Compute>
inline void in_widened_blocks(S* dst, int64_t len, const S* const (&inputs)[K],
                              const Compute& compute) {
  alignas(64) float in[K][kHalfBlock];
  alignas(64) float out[kHalfBlock];
  for (int64_t b = 0; b < len; b += kHalfBlock) {
    const int64_t n = std::min(kHalfBlock, len - b);
    for (int k = 0; k < K; ++k) widen(inputs[k] + b, in[k], n);
    compute(out, in, b, n);
    narrow(out, dst + b, n);
  }
}

// The channel layout of fusednn/channel_layout.h plus the array's data.
struct ChannelView : ChannelLayout {
  const char* data;
};

ChannelView channel_view(const ArrayRef& a, int axis) {
  ChannelView v;
  static_cast<ChannelLayout&>(v) = channel_layout(a.shape, a.strides, a.ndim, itemsize(a.dtype), axis);
  v.data = static_cast<const char*>(a.data);
  return v;
}

// Whether a's dimensions merge into an (outer, C, inner) view around axis.
bool has_channel_view(const ArrayRef& a, int axis) {
  const int item = itemsize(a.dtype);
  int64_t size, stride;
  return merge_extent(a.shape, a.strides, item, 0, axis, size, stride) &&
         merge_extent(a.shape, a.strides, item, axis + 1, a.ndim, size, stride);
}

// A per-channel operand as doubles (fill where it is absent): one typed
// loop per call, not a dtype test per channel, and a vectorized one for
// the usual contiguous operand (strided loads and stores one channel at a
// time were 5% of a (32, 4096) forward).
template <class E> void load_typed(const char* p, int64_t stride, int64_t channels, double* out) {
  if (stride == int64_t(sizeof(E))) {
    const E* v = reinterpret_cast<const E*>(p);
#pragma omp simd
    for (int64_t c = 0; c < channels; ++c) out[c] = static_cast<double>(load_value(v[c]));
    return;
  }
  for (int64_t c = 0; c < channels; ++c)
    out[c] = static_cast<double>(load_value(*reinterpret_cast<const E*>(p + c * stride)));
}

template <class E> void store_typed(char* p, int64_t stride, int64_t channels, const double* values) {
  if (stride == int64_t(sizeof(E))) {
    E* v = reinterpret_cast<E*>(p);
#pragma omp simd
    for (int64_t c = 0; c < channels; ++c) v[c] = Storage<E>::store_double(values[c]);
    return;
  }
  for (int64_t c = 0; c < channels; ++c)
    *reinterpret_cast<E*>(p + c * stride) = Storage<E>::store_double(values[c]);
}

void load_channels(const ArrayRef* a, int64_t channels, double fill, double* out) {
  if (a == nullptr) {
    std::fill_n(out, channels, fill);
    return;
  }
  const char* p = static_cast<const char*>(a->data);
  visit_storage(a->dtype, [&](auto tag) {
    load_typed<decltype(tag)>(p, a->strides[0], channels, out);
  });
}

// A per-channel operand read into the scope's scratch as doubles.
double* loaded_channels(ScratchScope& scratch, const ArrayRef* a, int64_t channels, double fill) {
  double* values = scratch.take<double>(static_cast<size_t>(channels));
  load_channels(a, channels, fill, values);
  return values;
}

// Rounded once to a's dtype.
void store_channels(const ArrayRef& a, int64_t channels, const double* values) {
  char* p = static_cast<char*>(a.data);
  visit_storage(a.dtype, [&](auto tag) {
    store_typed<decltype(tag)>(p, a.strides[0], channels, values);
  });
}

// The fixed split of a reduction into units. inner > 1: a unit is one
// channel over a block of outer rows and a block of the inner extent.
// inner == 1: a unit is a block of channels over a block of outer rows.
struct Partition {
  int64_t outer, channels, inner;
  int64_t outer_block, outer_blocks;
  int64_t inner_block, inner_blocks;
  int64_t channel_block, channel_blocks;

  explicit Partition(const ChannelView& v) : outer(v.outer), channels(v.channels), inner(v.inner) {
    if (inner > 1) {
      inner_block = std::min(inner, kUnitElements);
      channel_block = 1;
    } else {
      inner_block = 1;
      channel_block = std::max<int64_t>(1, std::min(channels, kChannelBlock));
    }
    inner_blocks = (inner + inner_block - 1) / inner_block;
    channel_blocks = (channels + channel_block - 1) / channel_block;
    outer_block = std::max<int64_t>(1, kUnitElements / (inner_block * channel_block));
    outer_blocks = (outer + outer_block - 1) / outer_block;
  }
  int64_t units_per_channel() const { return outer_blocks * inner_blocks; }
  int64_t tasks() const { return channel_blocks * units_per_channel(); }
};

// One unit's sums around `center`, with the element count.
struct Partial {
  double count;
  double center;
  double s1;
  double s2;
};

// The median of a unit's first, middle and last samples: the center of its
// sums.
template <class S> double median_of_three(const S* first, const S* middle, const S* last) {
  return fusednn::median_of_three(static_cast<double>(load_value(*first)),
                                  static_cast<double>(load_value(*middle)),
                                  static_cast<double>(load_value(*last)));
}

double sum_lanes(double* lanes) {
  for (int width = kLanes / 2; width > 0; width /= 2)
    for (int j = 0; j < width; ++j) lanes[j] += lanes[j + width];
  return lanes[0];
}

// Adds a run of n elements into the lanes: element i goes to lane i % kLanes.
// The gradient g reaches the sums through Grad (masked by the fused ReLU's
// output m, or as given, when m is not read).
template <class Sums, class Grad, class S>
void accumulate_run(const S* x, const S* g, const S* m, int64_t n, int64_t stride_x,
                    int64_t stride_g, int64_t stride_m, double center, double* s1, double* s2) {
  if constexpr (kWidened<S>) {
    // Contiguous runs a vector of kLanes at a time, widened in registers,
    // element i to lane i % kLanes as below. Each lane sums in float
    // (Sums::add_partial: d from the center as a float hi + lo pair, d^2
    // by one fused multiply-add) over blocks of kPartialVectors vectors,
    // even and odd vectors apart (8 terms a partial), and those partials
    // then join the lane's double sum: a third of the arithmetic of
    // double lanes and no conversion per element, with rounding near
    // 2^-24 of a partial, as channels-last's partials. (float data keeps
    // its double lanes, and its bits.)
    static_assert(kLanes == 16, "one line of floats is the lanes");
    if (stride_x == 1 && stride_g == 1 && stride_m == 1) {
      const float center_hi = static_cast<float>(center);
      const float center_lo = static_cast<float>(center - static_cast<double>(center_hi));
      const int64_t whole = n / kLanes * kLanes;
      int64_t i = 0;
      // The vector at i added into the float lanes p1, p2.
      const auto add_vector = [&](float (&p1)[kLanes], float (&p2)[kLanes], int64_t i) {
        alignas(64) float xb[kLanes], gb[kLanes];
        const Line<float> xf = widen_line(x + i);
        std::memcpy(xb, &xf, sizeof xb);
        if constexpr (Sums::kReadsGradient) {
          const Line<float> dy = widen_line(g + i);
          const Line<float> gf = Grad::kReadsOutput ? Grad::gradient(dy, widen_line(m + i)) : dy;
          std::memcpy(gb, &gf, sizeof gb);
        }
        const float* gp = Sums::kReadsGradient ? gb : xb;  // unread unless the sums read it
#pragma omp simd
        for (int j = 0; j < kLanes; ++j)
          Sums::add_partial(p1[j], p2[j], xb[j], gp[j], center_hi, center_lo);
      };
      while (i < whole) {
        const int64_t begin = i;
        const int64_t stop = std::min(whole, i + kLanes * kPartialVectors);
        // Even and odd vectors in partials of their own, two chains of
        // additions instead of one.
        float a1[kLanes] = {}, a2[kLanes] = {}, b1[kLanes] = {}, b2[kLanes] = {};
        for (; i + 2 * kLanes <= stop; i += 2 * kLanes) {
          add_vector(a1, a2, i);
          add_vector(b1, b2, i + kLanes);
        }
        if (i < stop) {
          add_vector(a1, a2, i);
          i += kLanes;
        }
        int finite = 1;
#pragma omp simd reduction(& : finite)
        for (int j = 0; j < kLanes; ++j)
          finite &= std::isfinite(a1[j]) & std::isfinite(a2[j]) & std::isfinite(b1[j]) &
                    std::isfinite(b2[j]);
        if (__builtin_expect(finite != 0, 1)) {
#pragma omp simd
          for (int j = 0; j < kLanes; ++j) {
            s1[j] += static_cast<double>(a1[j]);
            s1[j] += static_cast<double>(b1[j]);
            s2[j] += static_cast<double>(a2[j]);
            s2[j] += static_cast<double>(b2[j]);
          }
          continue;
        }
        // A float partial overflows where the inputs' spread does
        // (bfloat16 squares above float's range) or meets a NaN: these
        // vectors again in double, which cannot overflow for finite inputs.
        for (int64_t k = begin; k < stop; ++k)
          Sums::add(s1[k % kLanes], s2[k % kLanes], load_value(x[k]),
                    Grad::gradient(load_value(g[k]), load_value(m[k])), center);
      }
      for (int j = 0; i < n; ++i, ++j)
        Sums::add(s1[j], s2[j], load_value(x[i]),
                  Grad::gradient(load_value(g[i]), load_value(m[i])), center);
      return;
    }
  }
  const auto add = [&](int j, int64_t ix, int64_t ig, int64_t im) {
    Sums::add(s1[j], s2[j], load_value(x[ix]), Grad::gradient(load_value(g[ig]), load_value(m[im])),
              center);
  };
  int64_t i = 0;
  if (stride_x == 1 && stride_g == 1 && stride_m == 1) {
    for (; i + kLanes <= n; i += kLanes) {
#pragma omp simd
      for (int j = 0; j < kLanes; ++j) add(j, i + j, i + j, i + j);
    }
  } else {
    for (; i + kLanes <= n; i += kLanes)
      for (int j = 0; j < kLanes; ++j)
        add(j, (i + j) * stride_x, (i + j) * stride_g, (i + j) * stride_m);
  }
  for (int j = 0; i < n; ++i, ++j) add(j, i * stride_x, i * stride_g, i * stride_m);
}

// The sums of unit `unit` of channel c when inner > 1: a block of outer
// rows times a block of the inner extent. center: the channel's center, or
// null to center the unit on the median of three of its samples.
template <class Sums, class Grad, class S>
Partial inner_unit_sums(const ChannelView& xv, const ChannelView& gv, const ChannelView& mv,
                        const Partition& part, int64_t c, int64_t unit, const double* center) {
  const S* x = reinterpret_cast<const S*>(xv.data);
  const S* g = reinterpret_cast<const S*>(gv.data);
  const S* m = reinterpret_cast<const S*>(mv.data);
  const int64_t o0 = unit / part.inner_blocks * part.outer_block;
  const int64_t o1 = std::min(part.outer, o0 + part.outer_block);
  const int64_t i0 = (unit % part.inner_blocks) * part.inner_block;
  const int64_t n = std::min(part.inner, i0 + part.inner_block) - i0;
  const S* xc = x + c * xv.stride_channel + i0 * xv.stride_inner;
  const S* gc = g + c * gv.stride_channel + i0 * gv.stride_inner;
  const S* mc = m + c * mv.stride_channel + i0 * mv.stride_inner;
  const double shift =
      center != nullptr
          ? *center
          : median_of_three(xc + o0 * xv.stride_outer,
                            xc + (o0 + o1 - 1) / 2 * xv.stride_outer + n / 2 * xv.stride_inner,
                            xc + (o1 - 1) * xv.stride_outer + (n - 1) * xv.stride_inner);
  alignas(64) double s1[kLanes] = {};
  alignas(64) double s2[kLanes] = {};
  for (int64_t o = o0; o < o1; ++o)
    accumulate_run<Sums, Grad>(xc + o * xv.stride_outer, gc + o * gv.stride_outer,
                               mc + o * mv.stride_outer, n, xv.stride_inner, gv.stride_inner,
                               mv.stride_inner, shift, s1, s2);
  return Partial{static_cast<double>((o1 - o0) * n), shift, sum_lanes(s1), sum_lanes(s2)};
}

// Asks for n elements at p to be brought into L2.
template <class T> inline void prefetch_to_l2(const T* p, int64_t n) {
  const char* bytes = reinterpret_cast<const char*>(p);
  const int64_t size = n * int64_t(sizeof(T));
  for (int64_t i = 0; i < size; i += 64) __builtin_prefetch(bytes + i, 0, 2);
}

// One thread's share of a channels-last unit that several threads sum
// (a batch of up to 256 rows is one unit per channel block, see
// split_unit_count): rows [begin, end) from the unit's first row, whole
// row blocks of kPartialRows. The first share (begin == 0) leaves each
// channel's center and double sums s1 and s2 over its rows in sums (three
// arrays of one entry per channel); every later share leaves its
// data-type partial sums of each row block in kept, which
// finish_split_unit adds into those doubles in row block order: the
// additions one thread makes over the whole unit, so the same bits.
struct UnitShare {
  int64_t begin, end;
  double* sums;
  void* kept;
};

// Whether s1[k] and s2[k] are finite for every k < n. Out of line, as
// store_partials: one copy for every kernel.
__attribute__((noinline)) bool all_finite(const double* s1, const double* s2, int64_t n) {
  int finite = 1;
#pragma omp simd reduction(& : finite)
  for (int64_t k = 0; k < n; ++k) finite &= std::isfinite(s1[k]) & std::isfinite(s2[k]);
  return finite != 0;
}

// partials[k] = (count, center[k], s1[k], s2[k]) for k < n.
__attribute__((noinline)) void store_partials(Partial* partials, double count, const double* center,
                                              const double* s1, const double* s2, int64_t n) {
  for (int64_t k = 0; k < n; ++k) partials[k] = Partial{count, center[k], s1[k], s2[k]};
}

// The end of a channels-last unit's sums over channels [c0, c0 + width):
// channels whose data-type partials overflowed are summed again in double,
// and each channel's (count, center, s1, s2) goes to partials[unit *
// channels + c].
template <class Sums, class Grad, class S>
void finish_channels_last_unit(const ChannelView& xv, const ChannelView& gv, const ChannelView& mv,
                               const Partition& part, int64_t unit, int64_t c0, int64_t width,
                               const double* center, double* s1, double* s2, Partial* partials) {
  const S* xc = reinterpret_cast<const S*>(xv.data) + c0 * xv.stride_channel;
  const S* gc = reinterpret_cast<const S*>(gv.data) + c0 * gv.stride_channel;
  const S* mc = reinterpret_cast<const S*>(mv.data) + c0 * mv.stride_channel;
  const int64_t o0 = unit * part.outer_block;
  const int64_t o1 = std::min(part.outer, o0 + part.outer_block);
  // A data-type partial overflows where the inputs' spread does (float32
  // squares above about 1e19); those channels' sums are taken again in
  // double, which cannot overflow for finite float inputs. NaN inputs
  // land here too and stay NaN.
  if (__builtin_expect(!all_finite(s1, s2, width), 0)) {
    for (int64_t k = 0; k < width; ++k) {
      if (std::isfinite(s1[k]) && std::isfinite(s2[k])) continue;
      s1[k] = s2[k] = 0.0;
      const S* xk = xc + k * xv.stride_channel;
      const S* gk = gc + k * gv.stride_channel;
      const S* mk = mc + k * mv.stride_channel;
      for (int64_t o = o0; o < o1; ++o)
        Sums::add(s1[k], s2[k], load_value(xk[o * xv.stride_outer]),
                  Grad::gradient(load_value(gk[o * gv.stride_outer]),
                                 load_value(mk[o * mv.stride_outer])),
                  center[k]);
    }
  }
  store_partials(partials + unit * part.channels + c0, static_cast<double>(o1 - o0), center, s1,
                 s2, width);
}

// The sums of the units of channel blocks [block_begin, block_end) over
// outer block `unit` when inner == 1 (blocks of channels over a block of
// outer rows), into partials[unit * channels + c] for their channels c:
// a unit's partials side by side (see unit_rows_moments).
// centers: one per channel, or null to center each channel of a unit on the
// median of three of its samples.
// The blocks are walked together, a row block of kPartialRows rows at a
// time across all of their channels, so that a task of every block reads
// whole rows (a row block of a (N, C) batch is one stretch of memory) and
// the blocks' sums stay in registers over a row block however many
// channels there are. Each channel's operations and their order are those
// of its block alone, so which blocks a task groups never changes a bit.
// Out of line: the bands and reduce_units share one copy.
// share: null for the whole unit; else one thread's share of a unit split
// by rows (see UnitShare), whose sums are left there for
// finish_split_unit instead of becoming the unit's partials.
template <class Sums, class Grad, class S>
__attribute__((noinline)) void channels_last_unit_sums(const ChannelView& xv, const ChannelView& gv,
                                                       const ChannelView& mv, const Partition& part,
                                                       const double* centers, int64_t block_begin,
                                                       int64_t block_end, int64_t unit,
                                                       Partial* partials,
                                                       const UnitShare* share = nullptr) {
  using T = ComputeOf<S>;
  const S* x = reinterpret_cast<const S*>(xv.data);
  const S* g = reinterpret_cast<const S*>(gv.data);
  const S* m = reinterpret_cast<const S*>(mv.data);
  const int64_t o0 = unit * part.outer_block;
  const int64_t o1 = std::min(part.outer, o0 + part.outer_block);
  const int64_t c0 = block_begin * part.channel_block;
  const int64_t width = std::min(part.channels, block_end * part.channel_block) - c0;
  const S* xc = x + c0 * xv.stride_channel;
  const S* gc = g + c0 * gv.stride_channel;
  const S* mc = m + c0 * mv.stride_channel;
  ScratchScope scratch;
  const size_t w = static_cast<size_t>(width);
  double* center = scratch.take<double>(w);
  T* center_hi = scratch.take<T>(w);
  T* center_lo = scratch.take<T>(w);
  double* s1 = scratch.take<double>(w);
  double* s2 = scratch.take<double>(w);
  std::fill_n(s1, width, 0.0);
  std::fill_n(s2, width, 0.0);
  if (centers != nullptr) {
    std::copy_n(centers + c0, width, center);
  } else if (xv.stride_channel == 1) {
    // The three rows' channels side by side: one vectorized loop.
    const S* first = xc + o0 * xv.stride_outer;
    const S* middle = xc + (o0 + o1 - 1) / 2 * xv.stride_outer;
    const S* last = xc + (o1 - 1) * xv.stride_outer;
#pragma omp simd
    for (int64_t k = 0; k < width; ++k)
      center[k] = median_of_three(first + k, middle + k, last + k);
  } else {
    for (int64_t k = 0; k < width; ++k) {
      const S* xk = xc + k * xv.stride_channel;
      center[k] = median_of_three(xk + o0 * xv.stride_outer,
                                  xk + (o0 + o1 - 1) / 2 * xv.stride_outer,
                                  xk + (o1 - 1) * xv.stride_outer);
    }
  }
#pragma omp simd
  for (int64_t k = 0; k < width; ++k) {
    center_hi[k] = static_cast<T>(center[k]);
    center_lo[k] = static_cast<T>(center[k] - static_cast<double>(center_hi[k]));
  }
  const bool contiguous =
      xv.stride_channel == 1 && gv.stride_channel == 1 && mv.stride_channel == 1;
  // Channels [0, wide) of contiguous rows are summed a vector block of
  // kWide at a time (two 64-byte lines; one where the ISA has no FMA
  // instruction and calls a function per element), the rest row by row.
#if defined(__FMA__)
  constexpr int64_t kWide = 128 / int64_t(sizeof(T));
#else
  constexpr int64_t kWide = 64 / int64_t(sizeof(T));
#endif
  static_assert(kChannelBlock % kWide == 0, "only the last block has channels past the vectors");
  const int64_t wide = contiguous ? width / kWide * kWide : 0;
  // The row-by-row channels' data-type partials over a row block.
  T* p1 = scratch.take<T>(w);
  T* p2 = scratch.take<T>(w);
  // Half types: a row block's wide channels widened side by side.
  const size_t widened = kWidened<S> ? static_cast<size_t>(kPartialRows * wide) : 0;
  float* xw = scratch.take<float>(widened);
  float* gw = scratch.take<float>(Sums::kReadsGradient ? widened : 0);
  float* mw = scratch.take<float>(Grad::kReadsOutput ? widened : 0);
  // Rows are asked for a whole number of row blocks ahead, at least
  // kRowPrefetchBytes of the walk (a row block of every channel) ahead.
  const int64_t block_bytes = kPartialRows * width * int64_t(sizeof(S));
  const int64_t rows_ahead =
      kPartialRows * std::max<int64_t>(1, (kRowPrefetchBytes + block_bytes - 1) / block_bytes);
  // The rows summed here, the end of those asked for ahead, and where a
  // later share keeps each row block's partials (2 * channels a row
  // block: s1's, then s2's).
  const int64_t r0 = share != nullptr ? o0 + share->begin : o0;
  const int64_t r1 = share != nullptr ? std::min(o1, o0 + share->end) : o1;
  const int64_t ahead_end = share != nullptr ? r1 : part.outer;
  T* kept = share != nullptr && share->begin > 0 ? static_cast<T*>(share->kept) : nullptr;
  for (int64_t row_block = r0; row_block < r1; row_block += kPartialRows) {
    const int64_t row_end = std::min(r1, row_block + kPartialRows);
    T* kept1 = kept != nullptr
                   ? kept + (row_block - r0) / kPartialRows * 2 * part.channels + c0
                   : nullptr;
    const int64_t rows = row_end - row_block;
    // The wide channels a vector block at a time over the row block's
    // rows, each channel's partials in a register, the channels across
    // the vector: the same operations per channel as the row-by-row loop
    // below, without its loads and stores of the partials per row (the
    // channels-last statistics of 32 channels took twice a copy's time
    // with them, a (256, 1024) batch's 1.6 times). A vector block's slice
    // of each row is asked for rows_ahead rows ahead as it is read: in the
    // order the loads go, which with many channels are a row apart (the
    // hardware's prefetchers alone left a 51 MB channels-last batch of 128
    // channels 1.2-1.35 times as long as row by row).
    // The row block's rows at xb, gb, mb, xs, gs, ms elements apart.
    const auto sum_rows = [&](const auto* xb, int64_t xs, const auto* gb, int64_t gs,
                              const auto* mb, int64_t ms, bool prefetch) {
      for (int64_t k0 = 0; k0 < wide; k0 += kWide) {
        // Fixed-size partials, which the compiler keeps in registers.
        T a1[kWide] = {}, a2[kWide] = {};
        const T* hi = center_hi + k0;
        const T* lo = center_lo + k0;
        for (int64_t r = 0; r < rows; ++r) {
          const auto* xr = xb + r * xs + k0;
          const auto* gr = gb + r * gs + k0;
          const auto* mr = mb + r * ms + k0;
          if (prefetch && row_block + r + rows_ahead < ahead_end) {
            prefetch_to_l2(xr + rows_ahead * xs, kWide);
            if (Sums::kReadsGradient) prefetch_to_l2(gr + rows_ahead * gs, kWide);
            if (Grad::kReadsOutput) prefetch_to_l2(mr + rows_ahead * ms, kWide);
          }
#pragma omp simd
          for (int64_t j = 0; j < kWide; ++j)
            Sums::add_partial(a1[j], a2[j], T(xr[j]), Grad::gradient(T(gr[j]), T(mr[j])), hi[j],
                              lo[j]);
        }
        if (kept1 != nullptr) {
          std::copy_n(a1, kWide, kept1 + k0);
          std::copy_n(a2, kWide, kept1 + part.channels + k0);
          continue;
        }
        double* t1 = s1 + k0;
        double* t2 = s2 + k0;
#pragma omp simd
        for (int64_t j = 0; j < kWide; ++j) {
          t1[j] += static_cast<double>(a1[j]);
          t2[j] += static_cast<double>(a2[j]);
        }
      }
    };
    const S* xb = xc + row_block * xv.stride_outer;
    const S* gb = gc + row_block * gv.stride_outer;
    const S* mb = mc + row_block * mv.stride_outer;
    if constexpr (kWidened<S>) {
      // Widened row by row, each row asked for as the one rows_ahead
      // before it is widened.
      for (int64_t r = 0; wide > 0 && r < rows; ++r) {
        if (row_block + r + rows_ahead < ahead_end) {
          prefetch_to_l2(xb + (r + rows_ahead) * xv.stride_outer, wide);
          if (Sums::kReadsGradient) prefetch_to_l2(gb + (r + rows_ahead) * gv.stride_outer, wide);
          if (Grad::kReadsOutput) prefetch_to_l2(mb + (r + rows_ahead) * mv.stride_outer, wide);
        }
        widen(xb + r * xv.stride_outer, xw + r * wide, wide);
        if (Sums::kReadsGradient) widen(gb + r * gv.stride_outer, gw + r * wide, wide);
        if (Grad::kReadsOutput) widen(mb + r * mv.stride_outer, mw + r * wide, wide);
      }
      const float* gp = Sums::kReadsGradient ? gw : xw;  // as the strided loop: unread
      const float* mp = Grad::kReadsOutput ? mw : gp;    // dy again unless masked by y
      sum_rows(xw, wide, gp, wide, mp, wide, false);
    } else {
      sum_rows(xb, xv.stride_outer, gb, gv.stride_outer, mb, mv.stride_outer, true);
    }
    if (wide == width) continue;
    // The channels past the vector blocks, and every channel where they
    // lie apart in some operand: row by row, the partials per row in
    // memory.
    std::fill(p1 + wide, p1 + width, T(0));
    std::fill(p2 + wide, p2 + width, T(0));
    for (int64_t o = row_block; o < row_end; ++o) {
      const S* xr = xc + o * xv.stride_outer;
      const S* gr = gc + o * gv.stride_outer;
      const S* mr = mc + o * mv.stride_outer;
      if (contiguous) {
        if (wide == 0 && o + rows_ahead < ahead_end) {  // rows narrower than a vector block
          prefetch_to_l2(xr + rows_ahead * xv.stride_outer, width);
          if (Sums::kReadsGradient) prefetch_to_l2(gr + rows_ahead * gv.stride_outer, width);
          if (Grad::kReadsOutput) prefetch_to_l2(mr + rows_ahead * mv.stride_outer, width);
        }
        const int64_t n = width - wide;
        const auto add_row = [&](const auto* xs, const auto* gs, const auto* ms) {
#pragma omp simd
          for (int64_t k = 0; k < n; ++k)
            Sums::add_partial(p1[wide + k], p2[wide + k], load_value(xs[k]),
                              Grad::gradient(load_value(gs[k]), load_value(ms[k])),
                              center_hi[wide + k], center_lo[wide + k]);
        };
        if constexpr (kWidened<S>) {
          alignas(64) float xb[kWide], gb[kWide], mb[kWide];
          widen(xr + wide, xb, n);
          const float* gp = xb;
          if (Sums::kReadsGradient) {
            widen(gr + wide, gb, n);
            gp = gb;
          }
          const float* mp = gp;
          if (Grad::kReadsOutput) {
            widen(mr + wide, mb, n);
            mp = mb;
          }
          add_row(xb, gp, mp);
        } else {
          add_row(xr + wide, gr + wide, mr + wide);
        }
        continue;
      }
      for (int64_t k = 0; k < width; ++k)
        Sums::add_partial(p1[k], p2[k], load_value(xr[k * xv.stride_channel]),
                          Grad::gradient(load_value(gr[k * gv.stride_channel]),
                                         load_value(mr[k * mv.stride_channel])),
                          center_hi[k], center_lo[k]);
    }
    if (kept1 != nullptr) {
      std::copy(p1 + wide, p1 + width, kept1 + wide);
      std::copy(p2 + wide, p2 + width, kept1 + part.channels + wide);
      continue;
    }
#pragma omp simd
    for (int64_t k = wide; k < width; ++k) {
      s1[k] += static_cast<double>(p1[k]);
      s2[k] += static_cast<double>(p2[k]);
    }
  }
  if (share != nullptr) {
    if (share->begin == 0) {
      std::copy_n(center, width, share->sums + c0);
      std::copy_n(s1, width, share->sums + part.channels + c0);
      std::copy_n(s2, width, share->sums + 2 * part.channels + c0);
    }
    return;
  }
  finish_channels_last_unit<Sums, Grad, S>(xv, gv, mv, part, unit, c0, width, center, s1, s2,
                                           partials);
}

// Fills the partials of every channel c and unit u (channels *
// units_per_channel entries, all written): partials[c * units_per_channel
// + u] when inner > 1, partials[u * channels + c] when inner == 1.
// centers: one per channel, or null to center each unit on the median of
// three of its samples. mv: the fused ReLU's output, read when Grad masks g.
template <class Sums, class Grad, class S>
void reduce_units(const ChannelView& xv, const ChannelView& gv, const ChannelView& mv,
                  const Partition& part, const double* centers, Partial* partials) {
  const int64_t units = part.units_per_channel();
  const int64_t elements = part.outer * part.channels * part.inner;
  const CallCost cost = call_cost<S>(elements, kReduceNanoseconds);
  if (part.inner > 1) {
    run_tasks(part.tasks(), cost, [&](int64_t task) {
      const int64_t block = task / units;
      partials[task] = inner_unit_sums<Sums, Grad, S>(
          xv, gv, mv, part, block, task % units, centers != nullptr ? centers + block : nullptr);
    });
    return;
  }
  // inner == 1: a task sums one outer block of a run of channel blocks
  // (every block where the outer blocks alone give each thread about two
  // tasks), walking their rows together; tasks in memory order.
  const int64_t slices = cost.slices();
  const int64_t groups =
      slices <= 1 ? 1
                  : std::min(part.channel_blocks,
                             std::max<int64_t>(1, (2 * slices + units - 1) / units));
  run_tasks(units * groups, cost, [&](int64_t task) {
    const int64_t group = task % groups;
    channels_last_unit_sums<Sums, Grad, S>(
        xv, gv, mv, part, centers, part.channel_blocks * group / groups,
        part.channel_blocks * (group + 1) / groups, task / groups, partials);
  });
}

// ---- channels-last training batches in bands of rows ------------------------
//
// A channels-last batch whose inputs, split into one band of rows per
// thread, fit in the threads' own caches is reduced and written in one
// parallel region: each thread sums its band's units, the channels'
// coefficients are made once from every unit (a run of channels per
// thread), and each thread then writes its band while the band's inputs
// are still in its cache, so that they
// come from the shared cache or memory once instead of twice (a
// 16x32x32x32 channels-last forward on two threads: the two-pass loops
// read 2 MB twice from the shared L3, the bands 1 MB once per core). The
// units and their merge order are those of the two-pass loops: same bits.

// The most bands of one call: one per thread, held in fixed arrays.
constexpr int64_t kMaxBands = 64;
// Bytes of input per band: a core's L2 (2 MiB here) and half again, since
// the second step reads the band backwards and finds the last 2 MiB the
// first step read still there. 16x32x32x32 and 16x64x16x16 channels-last
// backwards with the ReLU mask (3 MB and 1.5 MB a band on two threads)
// took 0.89 and 0.64 of the two-pass loops' time with this bound, 1.0
// with 1 MiB (medians of 5 alternating runs).
constexpr int64_t kBandBytes = int64_t(3) << 20;

// How many bands a channels-last call of `reads` operands splits into, or
// 0 where the two-pass loops serve: at least two, each of whole units, as
// many as the work pays threads for (ns_per_element, see run_tasks), and
// each band's inputs at most kBandBytes.
template <class S>
int64_t band_count(const Partition& part, int reads, double ns_per_element) {
  if (part.inner != 1) return 0;
  const int64_t size = part.outer * part.channels;
  const int64_t bands =
      std::min({part.outer_blocks, call_cost<S>(size, ns_per_element).slices(), kMaxBands});
  if (bands < 2 || size * int64_t(sizeof(S)) * reads > bands * kBandBytes) return 0;
  return bands;
}

// The join between the two steps of a banded region, without a barrier
// (which would never open when the pool runs the region's tasks one after
// another on one thread, as it does inside another region or while
// another caller holds it): each band's first step is claimed by the
// first thread to reach it, and a task claims its own band's and then any
// unclaimed band's after it before it waits, so it waits only for first steps
// running on other threads. The join itself is cut into `slices` parts,
// claimed the same way once every first step is in; last() runs once,
// on the thread that ends the last part, and every thread waits for it.
// Nothing in the steps may throw.
class BandJoin {
 public:
  BandJoin(int64_t bands, int64_t slices) : bands_(bands), slices_(slices) {}

  void first_steps(int64_t band, TaskRef first, TaskRef join, TaskRef last) {
    for (int64_t i = 0; i < bands_; ++i) {
      const int64_t b = (band + i) % bands_;
      if (claim(claimed_[b])) {
        first(b);
        done_.fetch_add(1, std::memory_order_acq_rel);
      }
    }
    wait_until([this] { return done_.load(std::memory_order_acquire) == bands_; });
    for (int64_t i = 0; i < slices_; ++i) {
      const int64_t s = (band + i) % slices_;
      if (claim(join_claimed_[s])) {
        join(s);
        if (joined_.fetch_add(1, std::memory_order_acq_rel) + 1 == slices_) {
          last(0);
          finished_.store(true, std::memory_order_release);
        }
      }
    }
    wait_until([this] { return finished_.load(std::memory_order_acquire); });
  }

 private:
  static bool claim(std::atomic<bool>& flag) {
    return !flag.exchange(true, std::memory_order_acq_rel);
  }

  // Spins, yielding now and then: the thread waited for may share a core.
  template <class Ready> static void wait_until(const Ready& ready) {
    for (unsigned i = 1; !ready(); ++i) {
#if defined(__x86_64__) || defined(__i386__)
      __builtin_ia32_pause();
#endif
      if (i % 256 == 0) std::this_thread::yield();
    }
  }

  int64_t bands_, slices_;
  std::atomic<bool> claimed_[kMaxBands] = {};
  std::atomic<bool> join_claimed_[kMaxBands] = {};
  std::atomic<int64_t> done_{0};
  std::atomic<int64_t> joined_{0};
  std::atomic<bool> finished_{false};
};

// A callable as f(begin, end), referred to, not owned (as TaskRef).
class RangeRef {
 public:
  template <class F>
  RangeRef(const F& f)
      : f_(&f), call_([](const void* g, int64_t a, int64_t b) { (*static_cast<const F*>(g))(a, b); }) {}
  void operator()(int64_t a, int64_t b) const { call_(f_, a, b); }

 private:
  const void* f_;
  void (*call_)(const void*, int64_t, int64_t);
};

// Runs a banded region over `bands` bands of rows, band b being rows
// [bounds[b], bounds[b + 1]) of `channels` channels: first(b) for each
// band, join(s) for s in [0, slices) once all have run, last(0) once all
// of those have, then second(begin, end) over each band's flat elements,
// a chunk at a time. A task writes its own band's chunks and then helps
// with the others' still unclaimed: on this shared machine one thread
// often runs behind, and with each band's chunks its own thread's, the
// other waited for it (a cycles profile of a (256, 4096) forward on two
// threads: 4% of the first thread's samples in that wait). Out of line
// and through references, one copy for every kernel.
__attribute__((noinline)) void run_row_bands(int64_t bands, int64_t slices, int64_t channels,
                                             const int64_t* bounds, TaskRef first, TaskRef join,
                                             TaskRef last, RangeRef second) {
  BandJoin barrier(bands, slices);
  struct alignas(64) Claimed {
    std::atomic<int64_t> chunks{0};
  };
  Claimed claimed[kMaxBands];
  parallel_for(bands, [&](int64_t band) {
    barrier.first_steps(band, first, join, last);
    // Each band's elements in chunks from its end backwards: the first
    // step read the end last, so where the band is larger than the cache
    // its end is still there.
    for (int64_t k = 0; k < bands; ++k) {
      const int64_t b = (band + k) % bands;
      const int64_t begin = bounds[b] * channels;
      const int64_t end = bounds[b + 1] * channels;
      for (int64_t i = claimed[b].chunks.fetch_add(1, std::memory_order_relaxed);
           end - i * kPassChunk > begin;
           i = claimed[b].chunks.fetch_add(1, std::memory_order_relaxed)) {
        const int64_t stop = end - i * kPassChunk;
        second(std::max(begin, stop - kPassChunk), stop);
      }
    }
  });
}

// The outer blocks [u0, u1) of band b of `bands` bands of whole outer
// blocks.
inline std::pair<int64_t, int64_t> band_units(const Partition& part, int64_t bands, int64_t b) {
  return {part.outer_blocks * b / bands, part.outer_blocks * (b + 1) / bands};
}

// The first row of each of `count` bands of rows and the end of the last
// (run_row_bands), in scratch: bands of whole outer blocks, or the shares
// of a split unit.
int64_t* band_bounds(ScratchScope& scratch, const Partition& part, int64_t count,
                     const UnitShare* shares) {
  int64_t* bounds = scratch.take<int64_t>(static_cast<size_t>(count + 1));
  for (int64_t b = 0; b < count; ++b)
    bounds[b] = shares != nullptr ? shares[b].begin : band_units(part, count, b).first * part.outer_block;
  bounds[count] = part.outer;
  return bounds;
}

// ---- channels-last batches of one outer block, split by rows ---------------
//
// A channels-last batch whose rows all fall in one outer block (up to 256
// rows at 256 channels or more) has one unit per channel block, so the
// bands above cannot cut it. Its unit is shared out by rows instead, one
// run of row blocks per thread (UnitShare): each thread sums its rows of
// every channel, the first thread's double sums take the others' row
// block partials in row block order once all are in (finish_split_unit),
// and each thread then writes the rows it read. The join is shared out
// by channels (join_channels). The two-pass loops split the sums by
// channel blocks and the write by rows, so each thread wrote from data
// the other core had read.

// The most bytes of a share's inputs and output: a core's L2 here, so
// that each thread writes from its own cache. Two threads at (256, 1024)
// took 0.80-0.92 of the two-pass loops' time forward and 0.85-0.89
// backward, (256, 2048) forward 0.88-0.95; at (256, 4096), whose shares
// take twice this, 0.94-1.10 (the kept partials and the join cost what
// the cache saves).
constexpr int64_t kShareBytes = int64_t(2) << 20;

// How many shares a contiguous channels-last call of `reads` operands (and
// one output) splits its one outer block into, or 0 where it does not: at
// least two (as many as the work pays threads for), each of whole row
// blocks, each share's bytes at most kShareBytes.
template <class S>
int64_t split_unit_count(const Partition& part, int reads, double ns_per_element) {
  if (part.inner != 1 || part.outer_blocks != 1) return 0;
  const int64_t size = part.outer * part.channels;
  const int64_t row_blocks = (part.outer + kPartialRows - 1) / kPartialRows;
  const int64_t shares =
      std::min({row_blocks, call_cost<S>(size, ns_per_element).slices(), kMaxBands});
  if (shares < 2 || size * int64_t(sizeof(S)) * (reads + 1) > shares * kShareBytes) return 0;
  return shares;
}

// `count` shares of the one unit's rows, with the first share's sums and
// the later shares' kept partials (of the compute type T) in scratch.
template <class T>
UnitShare* split_unit_shares(ScratchScope& scratch, const Partition& part, int64_t count) {
  UnitShare* shares = scratch.take<UnitShare>(static_cast<size_t>(count));
  const int64_t row_blocks = (part.outer + kPartialRows - 1) / kPartialRows;
  for (int64_t b = 0; b < count; ++b) {
    const int64_t k0 = row_blocks * b / count, k1 = row_blocks * (b + 1) / count;
    UnitShare& share = shares[b];
    share.begin = k0 * kPartialRows;
    share.end = std::min(part.outer, k1 * kPartialRows);
    share.sums = b == 0 ? scratch.take<double>(static_cast<size_t>(3 * part.channels)) : nullptr;
    share.kept = b == 0 ? nullptr
                        : scratch.take<T>(static_cast<size_t>((k1 - k0) * 2 * part.channels));
  }
  return shares;
}

// A row's bytes that a share sums at a time: its rows a group of channel
// blocks at a time, as reduce_units groups them on two threads.
constexpr int64_t kShareGroupBytes = 4096;

// Share `share` of the one unit's sums (see UnitShare), a group of channel
// blocks at a time; centers as in channels_last_unit_sums.
template <class Sums, class Grad, class S>
void sum_unit_share(const ChannelView& xv, const ChannelView& gv, const ChannelView& mv,
                    const Partition& part, const double* centers, const UnitShare& share) {
  const int64_t group =
      std::max<int64_t>(1, kShareGroupBytes / (part.channel_block * int64_t(sizeof(S))));
  for (int64_t b = 0; b < part.channel_blocks; b += group)
    channels_last_unit_sums<Sums, Grad, S>(xv, gv, mv, part, centers, b,
                                           std::min(part.channel_blocks, b + group), 0, nullptr,
                                           &share);
}

// Channels [c0, c1) of the first share's double sums (see UnitShare) with
// the later shares' row block partials added in row block order.
template <class T>
void add_kept_partials(const UnitShare* shares, int64_t count, int64_t channels, int64_t c0,
                       int64_t c1) {
  double* s1 = shares[0].sums + channels;
  double* s2 = s1 + channels;
  for (int64_t b = 1; b < count; ++b) {
    const T* kept = static_cast<const T*>(shares[b].kept);
    for (int64_t r = shares[b].begin; r < shares[b].end; r += kPartialRows, kept += 2 * channels) {
#pragma omp simd
      for (int64_t k = c0; k < c1; ++k) {
        s1[k] += static_cast<double>(kept[k]);
        s2[k] += static_cast<double>(kept[channels + k]);
      }
    }
  }
}

// The unit's partials of channels [c0, c1) (partials[c]) from its `count`
// shares once all have been summed: as channels_last_unit_sums ends.
template <class Sums, class Grad, class S>
void finish_split_unit(const ChannelView& xv, const ChannelView& gv, const ChannelView& mv,
                       const Partition& part, const UnitShare* shares, int64_t count, int64_t c0,
                       int64_t c1, Partial* partials) {
  const int64_t channels = part.channels;
  add_kept_partials<ComputeOf<S>>(shares, count, channels, c0, c1);
  const double* center = shares[0].sums;
  double* s1 = shares[0].sums + channels;
  double* s2 = s1 + channels;
  finish_channels_last_unit<Sums, Grad, S>(xv, gv, mv, part, 0, c0, c1 - c0, center + c0, s1 + c0,
                                           s2 + c0, partials);
}

// The channels of join part s of `slices` (run_row_bands): whole runs of
// kJoinChannels, so that parts write no line in common.
constexpr int64_t kJoinChannels = 64;
inline int64_t join_slices(int64_t shares, int64_t channels) {
  return std::max<int64_t>(1, std::min(shares, (channels + kJoinChannels - 1) / kJoinChannels));
}
inline std::pair<int64_t, int64_t> join_channels(int64_t s, int64_t slices, int64_t channels) {
  const int64_t runs = (channels + kJoinChannels - 1) / kJoinChannels;
  return {std::min(channels, runs * s / slices * kJoinChannels),
          std::min(channels, runs * (s + 1) / slices * kJoinChannels)};
}

// ---- channels-last batches of few rows in bands of channels -----------------
//
// A channels-last batch whose rows all fall in one outer block (up to 256
// rows of 256 channels or more) has one unit per channel, so it cannot be
// cut into bands of rows without changing its units. It is cut into bands
// of channel blocks instead, one per thread: each thread sums its channels
// over every row, makes their coefficients and writes those channels, with
// no join between the steps, reading only what its own core read before.
// The two-pass loops split the reduction by channels and the write by
// rows, so each thread wrote from data the other core had read: a (32,
// 4096) forward's statistics took 38 us on two threads, 27 on one. A
// channel's units, centers and additions are those of the two-pass loops:
// the same bits.

// The bytes of one operand a column band spans at most, and the fewest
// bytes of a row it spans. Taller or narrower bands wrote their columns
// slower than the two-pass loops write whole rows (two threads, medians of
// 7 alternating runs: (128, 4096), 1 MiB a band, 1.10x forward and 1.21x
// backward; (256, 1024), 2 KiB of a row, 1.25-1.38x forward), where
// (32, 4096) took 0.86x forward and (32, 8192) 0.83-0.84x both ways.
constexpr int64_t kColumnBandBytes = int64_t(1) << 19;
constexpr int64_t kColumnBandRowBytes = 4096;

// How many bands of channel blocks a contiguous channels-last call
// splits into, or 0 where it does not: one outer block, at least two
// bands (as many as the work pays threads for), each within the bounds
// above.
template <class S> int64_t column_band_count(const Partition& part, double ns_per_element) {
  if (part.inner != 1 || part.outer_blocks != 1) return 0;
  const int64_t size = part.outer * part.channels;
  const int64_t bands = std::min(
      {part.channel_blocks, call_cost<S>(size, ns_per_element).slices(), kMaxBands});
  if (bands < 2) return 0;
  // The narrowest and the widest band's bytes of a row: whole channel
  // blocks.
  const int64_t block_bytes = part.channel_block * int64_t(sizeof(S));
  const int64_t narrowest = part.channel_blocks / bands * block_bytes;
  const int64_t widest = (part.channel_blocks + bands - 1) / bands * block_bytes;
  if (narrowest < kColumnBandRowBytes || part.outer * widest > kColumnBandBytes) return 0;
  return bands;
}

// Runs band(c0, c1, block_begin, block_end) for `bands` runs of
// consecutive channel blocks (block_begin to block_end, channels c0 to c1)
// on the pool.
template <class Band>
void run_column_bands(const Partition& part, int64_t bands, const Band& band) {
  parallel_for(bands, [&](int64_t b) {
    const int64_t b0 = part.channel_blocks * b / bands;
    const int64_t b1 = part.channel_blocks * (b + 1) / bands;
    band(b0 * part.channel_block, std::min(part.channels, b1 * part.channel_block), b0, b1);
  });
}

// Whether channels are reduced and written in bands of channels, each band
// in one task: rows of `inner` contiguous elements in every operand, and a
// channel's inputs (reads operands) small enough to stay cached between
// the two steps.
bool channel_resident(const ChannelView& v, int64_t item, int reads,
                      std::initializer_list<const ChannelView*> operands) {
  if (v.inner <= 1 || v.outer * v.inner * item * reads > kResidentChannelBytes) return false;
  for (const ChannelView* o : operands)
    if (o->stride_inner != 1) return false;
  return true;
}

// The channels of one resident band: as many as keep the band's inputs
// (reads operands) and its output within band_bytes, at least one.
int64_t resident_band_channels(const ChannelView& v, int64_t item, int reads,
                               int64_t band_bytes = kResidentBandBytes) {
  return std::max<int64_t>(1, band_bytes / (v.outer * v.inner * item * (reads + 1)));
}

// Runs fn(c0, c1, next) for bands of consecutive channels that cover [0,
// channels): bands of at most band_channels, each thread over a run of
// consecutive bands (as many runs as `cost` pays threads for, see
// run_tasks). next tells whether the same thread goes on with the band
// after, so that fn can ask for its rows while it writes this one.
template <class Fn>
void for_each_resident_band(int64_t channels, int64_t band_channels, const CallCost& cost,
                            const Fn& fn) {
  const int64_t slices = std::max<int64_t>(1, std::min(cost.slices(), channels));
  const int64_t bands =
      std::max((channels + band_channels - 1) / band_channels, slices);
  parallel_for(slices, [&](int64_t s) {
    const int64_t end = bands * (s + 1) / slices;
    for (int64_t b = bands * s / slices; b < end; ++b)
      fn(channels * b / bands, channels * (b + 1) / bands, b + 1 < end);
  });
}

// The unit sums of channels [c0, c1) when inner > 1, into partials[c *
// units + unit] (as inner_unit_sums, whose lanes, centers and order of
// additions they keep: the same bits), walking memory in its order: for
// each outer row the band's rows side by side, not one channel's rows
// apart. In NCHW those are one contiguous stretch per image where one
// channel's rows are an image apart, which for power-of-two images (64
// channels of 16x16) fall into the same cache sets: the channel-by-channel
// walk of a 64x64x16x16 forward took 1.56x the time of 64x65x16x16's.
// centers: one per channel, or null for the median of three of each
// unit's samples. lanes: 2 * kLanes doubles per channel of the band.
template <class Sums, class Grad, class S>
void band_unit_sums(const ChannelView& xv, const ChannelView& gv, const ChannelView& mv,
                    const Partition& part, int64_t c0, int64_t c1, const double* centers,
                    double* lanes, Partial* partials) {
  const int64_t units = part.units_per_channel();
  if (c1 - c0 == 1) {  // the sums in registers, as the two-pass loops take them
    for (int64_t unit = 0; unit < units; ++unit)
      partials[c0 * units + unit] = inner_unit_sums<Sums, Grad, S>(
          xv, gv, mv, part, c0, unit, centers != nullptr ? centers + c0 : nullptr);
    return;
  }
  const S* x = reinterpret_cast<const S*>(xv.data);
  const S* g = reinterpret_cast<const S*>(gv.data);
  const S* m = reinterpret_cast<const S*>(mv.data);
  for (int64_t unit = 0; unit < units; ++unit) {
    const int64_t o0 = unit / part.inner_blocks * part.outer_block;
    const int64_t o1 = std::min(part.outer, o0 + part.outer_block);
    const int64_t i0 = (unit % part.inner_blocks) * part.inner_block;
    const int64_t n = std::min(part.inner, i0 + part.inner_block) - i0;
    for (int64_t c = c0; c < c1; ++c) {
      double* s = lanes + (c - c0) * 2 * kLanes;
      std::fill_n(s, 2 * kLanes, 0.0);
      const S* xc = x + c * xv.stride_channel + i0 * xv.stride_inner;
      Partial& p = partials[c * units + unit];
      p.count = static_cast<double>((o1 - o0) * n);
      p.center = centers != nullptr
                     ? centers[c]
                     : median_of_three(
                           xc + o0 * xv.stride_outer,
                           xc + (o0 + o1 - 1) / 2 * xv.stride_outer + n / 2 * xv.stride_inner,
                           xc + (o1 - 1) * xv.stride_outer + (n - 1) * xv.stride_inner);
    }
    for (int64_t o = o0; o < o1; ++o) {
      for (int64_t c = c0; c < c1; ++c) {
        double* s = lanes + (c - c0) * 2 * kLanes;
        accumulate_run<Sums, Grad>(
            x + o * xv.stride_outer + c * xv.stride_channel + i0 * xv.stride_inner,
            g + o * gv.stride_outer + c * gv.stride_channel + i0 * gv.stride_inner,
            m + o * mv.stride_outer + c * mv.stride_channel + i0 * mv.stride_inner, n,
            xv.stride_inner, gv.stride_inner, mv.stride_inner, partials[c * units + unit].center,
            s, s + kLanes);
      }
    }
    for (int64_t c = c0; c < c1; ++c) {
      double* s = lanes + (c - c0) * 2 * kLanes;
      Partial& p = partials[c * units + unit];
      p.s1 = sum_lanes(s);
      p.s2 = sum_lanes(s + kLanes);
    }
  }
}

// Writes out[o, c, :] = row(dst, o, c, start, count) for every outer row o
// and channel c of [c0, c1), in memory order (see band_unit_sums),
// streaming when `stream` is set. The half types' rows are handed the
// output itself (count = inner), and stream their own lines when `stream`
// is set (NormalizeSegment::row). The callers' rows ask for the same rows
// of the thread's next band while they write (one channel a band: a
// 64x128x28x28 backward on one thread took 1.09x the time without). row(dst, o, c, start, count) computes
// elements [start, start + count) of row (o, c) into dst.
template <class S, class Row>
void write_band_rows(const ChannelView& out, int64_t c0, int64_t c1, bool stream, const Row& row) {
  S* base = const_cast<S*>(reinterpret_cast<const S*>(out.data));
  for (int64_t o = 0; o < out.outer; ++o) {
    for (int64_t c = c0; c < c1; ++c) {
      S* dst = base + o * out.stride_outer + c * out.stride_channel;
      if constexpr (kWidened<S>) {
        row(dst, o, c, 0, out.inner);
      } else {
        produce<kWideStageBytes>(dst, out.inner, stream, [&](S* d, int64_t start, int64_t count) {
          row(d, o, c, start, count);
        });
      }
    }
  }
  if (stream) store_fence();
}

// Runs fn(c) for every channel on the pool, in blocks of channels.
template <class Fn> void for_each_channel(int64_t channels, int64_t work_per_channel, Fn fn) {
  const int64_t per_task = std::max<int64_t>(1, kUnitElements / std::max<int64_t>(1, work_per_channel));
  parallel_for((channels + per_task - 1) / per_task, [&](int64_t t) {
    const int64_t end = std::min(channels, (t + 1) * per_task);
    for (int64_t c = t * per_task; c < end; ++c) fn(c);
  });
}

// Coefficient arrays of at least this many elements for the channels-last
// passes: runs along them are long enough that the per-run overhead stays
// small next to the vector loop.
constexpr int64_t kMinCoefficientPeriod = 512;

// The coefficient arrays' length in the channels-last passes: a multiple of
// the channel count, each array repeated that many times.
int64_t coefficient_period(int64_t channels) {
  return channels * std::max<int64_t>(1, kMinCoefficientPeriod / std::max<int64_t>(1, channels));
}

// The length of the coefficient arrays the channels-last passes read:
// coefficient_period entries plus one line, so that stream_lines never
// wraps inside a line.
template <class T> int64_t repeated_length(int64_t channels) {
  return coefficient_period(channels) + kLineElems<T>;
}

// Repeats v[0, channels) (one value per channel) through v[0, length), a
// block of channels at a time: an index modulo the channel count per
// element took longer than the whole normalization of a (32, 4096) batch.
template <class T> void repeat_channels(T* v, int64_t channels, int64_t length) {
  for (int64_t i = channels; i < length; i += channels)
    std::copy_n(v, std::min(channels, length - i), v + i);
}

// Per-element cost of the scalar passes over strided arrays (slice_count).
constexpr double kStridedPassNanoseconds = 1.0;


// Streams outputs [begin, end) of map_contiguous a line at a time from
// registers: segment.line(pos, coefficient) gives the line of outputs at
// flat index pos, coefficient(array) the line of a coefficient array's
// entries for those outputs. Lines hold one channel's entries broadcast
// (inner > 1) or consecutive entries of the coefficient arrays (inner ==
// 1; they are `period` long plus one line of their repetition, so a line
// never wraps). The unaligned head, the partial tail and (inner > 1) the
// lines that cross into the next channel go through write(dst, start,
// count) with ordinary stores.
template <class T, class Segment, class Write>
inline void stream_lines(T* out, int64_t begin, int64_t end, int64_t channels, int64_t inner,
                         int64_t period, const Segment& segment, const Write& write) {
  constexpr int64_t kLine = kLineElems<T>;
  const int64_t head = elements_to_line(out + begin, end - begin);
  write(out + begin, 0, head);
  int64_t pos = begin + head;
  const int64_t lines = (end - pos) / kLine;
  if (inner == 1) {
    int64_t j = pos % period;
    for (int64_t l = 0; l < lines; ++l, pos += kLine) {
      stream_line(out + pos, segment.line(pos, [j](const T* a) { return load_line(a + j); }));
      j += kLine;
      if (j >= period) j -= period;
    }
  } else {
    int64_t c = pos / inner % channels;
    int64_t offset = pos % inner;
    for (int64_t l = 0; l < lines; ++l, pos += kLine) {
      if (inner - offset >= kLine) {
        stream_line(out + pos, segment.line(pos, [c](const T* a) { return broadcast_line(a[c]); }));
      } else {
        write(out + pos, pos - begin, kLine);
      }
      offset += kLine;
      if (offset >= inner) {
        offset -= inner;
        c = c + 1 == channels ? 0 : c + 1;
      }
    }
  }
  write(out + pos, pos - begin, end - pos);
}

// Bytes of the coefficient arrays a channels-last pass reads while it
// walks a stretch of rows (map_range): about a third of a core's L1.
constexpr int64_t kCoefficientTileBytes = int64_t(1) << 14;

// Channels a tile of the channels-last passes spans: a multiple of a line
// whose coefficients take kCoefficientTileBytes.
template <class T, class Segment> constexpr int64_t coefficient_tile() {
  return kCoefficientTileBytes / int64_t(Segment::coefficients().size() * sizeof(T)) /
         kLineElems<T> * kLineElems<T>;
}

// Outputs [begin, end) of map_contiguous, on the calling thread; `stream`
// as map_contiguous decided for the whole array. Out of line: map_contiguous
// and the bands share one copy of the segment's loops.
// Channels-last rows whose coefficients take more than
// kCoefficientTileBytes are written a tile of channels at a time down the
// range's rows, so that the tile's coefficients stay in L1 (read along
// whole rows, the four 16 KiB arrays of a (256, 4096) normalization came
// from L2 beside every line of x: 1.2 times the tiled time), except where
// the output is streamed: from memory, rows read a tile's slice at a time
// measured 1.04-1.2 times as long as whole rows, software prefetch of the
// next row's slice included.
template <class S, class Segment>
__attribute__((noinline)) void map_range(S* out, int64_t begin, int64_t end, int64_t channels, int64_t inner,
               int64_t period, bool stream, const Segment& segment) {
  using T = ComputeOf<S>;
  const Segment local = segment;
  // Runs end at multiples of `run`: rows of one channel, or whole
  // periods of the coefficient arrays.
  const int64_t run = inner > 1 ? inner : period;
  constexpr int64_t kTile = coefficient_tile<T, Segment>();
  const bool tiled = inner == 1 && channels > kTile && !stream;
  // Outputs [span_begin, span_end).
  int64_t span_begin = begin;
  // stream_half: the half types' runs stream their own whole lines.
  const auto write = [&](S* dst, int64_t start, int64_t count, bool stream_half = false) {
    int64_t pos = span_begin + start;
    const int64_t stop = pos + count;
    const int64_t first_run = pos / run;
    int64_t offset = pos - first_run * run;
    int64_t c = first_run % channels;
    while (pos < stop) {
      const int64_t len = std::min(run - offset, stop - pos);
      if (inner > 1) {
        local.broadcast(dst, pos, len, c, stream_half);
      } else {
        local.across(dst, pos, len, offset, stream_half);
      }
      pos += len;
      dst += len;
      offset = 0;
      if (++c == channels) c = 0;
    }
  };
  // Untiled: one span, [begin, end). Tiled: the spans of each tile of
  // channels in the range's rows, tile after tile.
  const int64_t row0 = tiled ? begin / channels : 0;
  const int64_t row1 = tiled ? (end - 1) / channels + 1 : 1;
  for (int64_t k = 0; k < (tiled ? channels : 1); k += (tiled ? kTile : 1)) {
    for (int64_t r = row0; r < row1; ++r) {
      span_begin = tiled ? std::max(begin, r * channels + k) : begin;
      const int64_t span_end =
          tiled ? std::min(end, r * channels + std::min(channels, k + kTile)) : end;
      if (span_begin >= span_end) continue;
      // Lines straight from registers: the half types' runs write their
      // own (write_half_lines); float and double lines come from
      // stream_lines.
      if constexpr (kWidened<S>) {
        write(out + span_begin, 0, span_end - span_begin, stream);
      } else if (stream && (inner == 1 || inner >= kLineElems<S>)) {
        stream_lines(out, span_begin, span_end, channels, inner, period, local, write);
      } else {
        produce<kWideStageBytes>(out + span_begin, span_end - span_begin, stream, write);
      }
    }
  }
}

// Channels [c0, c1) of every one of `rows` rows of a contiguous
// channels-last output that is not streamed (a column band), on the
// calling thread: a tile of channels down all rows at a time, as map_range
// tiles, so that the tile's coefficients stay in L1. The coefficient
// arrays hold at least one entry per channel.
template <class S, class Segment>
__attribute__((noinline)) void map_columns(S* out, int64_t rows, int64_t channels, int64_t c0,
                                           int64_t c1, const Segment& segment) {
  constexpr int64_t kTile = coefficient_tile<ComputeOf<S>, Segment>();
  const Segment local = segment;
  for (int64_t k = c0; k < c1; k += kTile) {
    const int64_t len = std::min(c1, k + kTile) - k;
    for (int64_t r = 0; r < rows; ++r) {
      const int64_t pos = r * channels + k;
      local.across(out + pos, pos, len, k);
    }
  }
}

// Produces the contiguous output `out` (size elements, laid out like the
// contiguous input) in chunks handed out from the end of the array
// backwards: the reduction before the pass read the end last, so the first
// chunks find their inputs still in the last-level cache. Within a chunk,
// calls segment.broadcast(dst, pos, len, c) for runs of one channel
// (inner > 1) and segment.across(dst, pos, len, j) for runs that start at
// entry j of coefficient arrays `period` long (inner == 1). pos is the
// flat index of the run's first element, dst where its outputs go.
template <class S, class Segment>
void map_contiguous(S* out, int64_t size, int64_t channels, int64_t inner, int64_t period,
                    const Segment& segment) {
  const bool stream = size * int64_t(sizeof(S)) >= kStreamBytes;
  const int64_t chunks = (size + kPassChunk - 1) / kPassChunk;
  run_tasks(chunks, call_cost<S>(size, kPassNanoseconds), [&](int64_t task) {
    const int64_t begin = (chunks - 1 - task) * kPassChunk;
    const int64_t end = std::min(size, begin + kPassChunk);
    map_range(out, begin, end, channels, inner, period, stream, segment);
    if (stream) store_fence();
  });
}

// map_contiguous for a pass over all of v's contiguous array. Channels-last
// runs read seg's coefficient arrays (Segment::coefficients()) along the
// run, so those must hold repeated_length entries (repeat_channels):
// already so when seg.repeated is set (the tables below lay them out that
// way), else copied here.
template <class S, class Segment>
void map_contiguous_pass(S* out, const ChannelView& v, Segment seg) {
  using T = ComputeOf<S>;
  const int64_t size = v.outer * v.channels * v.inner;
  if (v.inner > 1) {
    map_contiguous(out, size, v.channels, v.inner, v.channels, seg);
    return;
  }
  ScratchScope scratch;
  if (!seg.repeated) {
    const int64_t length = repeated_length<T>(v.channels);
    for (const auto member : Segment::coefficients()) {
      T* copy = scratch.take<T>(static_cast<size_t>(length));
      std::copy_n(seg.*member, v.channels, copy);
      repeat_channels(copy, v.channels, length);
      seg.*member = copy;
    }
  }
  map_contiguous(out, size, v.channels, 1, coefficient_period(v.channels), seg);
}

// Per-channel coefficient arrays as pseudo-operands of a StridedLoop: they
// step along the channel axis only.
struct ChannelStrides {
  std::vector<int64_t> strides;
  ChannelStrides(const ArrayRef& a, int axis, int item) : strides(static_cast<size_t>(a.ndim), 0) {
    strides[static_cast<size_t>(axis)] = item;
  }
};

template <class S> struct NormalizeSegment {
  using T = ComputeOf<S>;
  const S* x;
  const T* mean_hi;
  const T* mean_lo;
  const T* scale;
  const T* shift;
  bool relu = false;  // a fused ReLU after the normalization
  // Whether the coefficient arrays hold repeated_length entries (see
  // map_contiguous_pass), not one per channel.
  bool repeated = false;

  // The output of a normalized value v (a scalar or a line).
  template <class V> V activate(V v) const { return relu ? relu_after_normalize(v) : v; }

  // The coefficient arrays, one entry per channel (see map_contiguous_pass).
  static constexpr std::array<const T* NormalizeSegment::*, 4> coefficients() {
    return {&NormalizeSegment::mean_hi, &NormalizeSegment::mean_lo, &NormalizeSegment::scale,
            &NormalizeSegment::shift};
  }
  // len outputs of channel c from the run of inputs at src.
  template <class Out, class In> void row_of(Out* dst, const In* src, int64_t len, int64_t c) const {
    const T hi = mean_hi[c], lo = mean_lo[c], s = scale[c], b = shift[c];
#pragma omp simd
    for (int64_t i = 0; i < len; ++i)
      dst[i] = store_value<Out>(activate(normalize(load_value(src[i]), hi, lo, s, b)));
  }
  // stream: for the half types, which write dst themselves a line at a
  // time from registers (write_half_lines), whether those lines go past
  // the cache; float and double rows are staged by the caller (produce).
  void row(S* dst, const S* src, int64_t len, int64_t c, bool stream = false) const {
    if constexpr (kWidened<S>) {
      const Line<T> hi = broadcast_line(mean_hi[c]), lo = broadcast_line(mean_lo[c]),
                    s = broadcast_line(scale[c]), b = broadcast_line(shift[c]);
      write_half_lines(
          dst, len, stream,
          [=](int64_t i) FUSEDNN_INLINE_LAMBDA {
            return activate(normalize(widen_line(src + i), hi, lo, s, b));
          },
          [&](int64_t start, int64_t n) {
            in_widened_blocks(dst + start, n, {src + start}, [&](float* out, auto in, int64_t,
                                                                 int64_t m) {
              row_of(out, in[0], m, c);
            });
          });
    } else {
      row_of(dst, src, len, c);
    }
  }
  void broadcast(S* dst, int64_t pos, int64_t len, int64_t c, bool stream = false) const {
    row(dst, x + pos, len, c, stream);
  }
  // See stream_lines.
  template <class Coefficient> Line<T> line(int64_t pos, const Coefficient& coefficient) const {
    return activate(normalize(load_line(x + pos), coefficient(mean_hi), coefficient(mean_lo),
                              coefficient(scale), coefficient(shift)));
  }
  // len outputs from the run of inputs at src, whose coefficients start at
  // entry j of the coefficient arrays.
  template <class Out, class In>
  void across_of(Out* dst, const In* src, int64_t len, int64_t j) const {
    const T* hi = mean_hi + j;
    const T* lo = mean_lo + j;
    const T* s = scale + j;
    const T* b = shift + j;
#pragma omp simd
    for (int64_t i = 0; i < len; ++i)
      dst[i] = store_value<Out>(activate(normalize(load_value(src[i]), hi[i], lo[i], s[i], b[i])));
  }
  // stream: as in row().
  void across(S* dst, int64_t pos, int64_t len, int64_t j, bool stream = false) const {
    if constexpr (kWidened<S>) {
      const S* src = x + pos;
      const T* hi = mean_hi + j;
      const T* lo = mean_lo + j;
      const T* s = scale + j;
      const T* b = shift + j;
      write_half_lines(
          dst, len, stream,
          [=](int64_t i) FUSEDNN_INLINE_LAMBDA {
            return activate(normalize(widen_line(src + i), load_line(hi + i), load_line(lo + i),
                                      load_line(s + i), load_line(b + i)));
          },
          [&](int64_t start, int64_t n) {
            in_widened_blocks(dst + start, n, {src + start},
                              [&](float* out, auto in, int64_t b0, int64_t m) {
                                across_of(out, in[0], m, j + start + b0);
                              });
          });
    } else {
      across_of(dst, x + pos, len, j);
    }
  }
};

template <class S>
void normalize_pass(const ArrayRef& x, const ArrayRef& y, int axis, const NormalizeSegment<S>& seg) {
  using T = ComputeOf<S>;
  if (is_contiguous(x) && is_contiguous(y)) {
    map_contiguous_pass(static_cast<S*>(y.data), channel_view(x, axis), seg);
    return;
  }
  // Any strides: a scalar loop over runs, the coefficients as operands.
  const ChannelStrides cs(x, axis, int(sizeof(T)));
  const int64_t* strides[6] = {x.strides, y.strides, cs.strides.data(), cs.strides.data(),
                               cs.strides.data(), cs.strides.data()};
  int sizes[6];
  std::fill(sizes, sizes + 6, int(sizeof(T)));
  sizes[0] = sizes[1] = int(sizeof(S));
  const StridedLoop<6> loop(x.ndim, x.shape, strides, sizes);
  char* base[6] = {static_cast<char*>(x.data), static_cast<char*>(y.data),
                   reinterpret_cast<char*>(const_cast<T*>(seg.mean_hi)),
                   reinterpret_cast<char*>(const_cast<T*>(seg.mean_lo)),
                   reinterpret_cast<char*>(const_cast<T*>(seg.scale)),
                   reinterpret_cast<char*>(const_cast<T*>(seg.shift))};
  struct Body {
    const NormalizeSegment<S>* seg;
    void operator()(char* const* p, int64_t len, const int64_t* in) {
      const S* src = reinterpret_cast<const S*>(p[0]);
      S* dst = reinterpret_cast<S*>(p[1]);
      const T* hi = reinterpret_cast<const T*>(p[2]);
      const T* lo = reinterpret_cast<const T*>(p[3]);
      const T* s = reinterpret_cast<const T*>(p[4]);
      const T* b = reinterpret_cast<const T*>(p[5]);
      for (int64_t i = 0; i < len; ++i)
        dst[i * in[1]] = store_value<S>(seg->activate(normalize(
            load_value(src[i * in[0]]), hi[i * in[2]], lo[i * in[3]], s[i * in[4]], b[i * in[5]])));
    }
    void finish() {}
  };
  loop.run(base, sizes, kStridedPassNanoseconds, [&seg] { return Body{&seg}; });
}

// Grad: the gradient as given, or masked by the fused ReLU's output y
// (read only then; y may be dy itself otherwise).
template <class S, class Grad> struct InputGradSegment {
  using T = ComputeOf<S>;
  const S* dy;
  const S* x;
  const S* y;
  const T* mean_hi;
  const T* mean_lo;
  const T* invstd;
  const T* a;
  const T* e;
  const T* k;
  bool repeated = false;  // see NormalizeSegment::repeated

  static constexpr std::array<const T* InputGradSegment::*, 6> coefficients() {
    return {&InputGradSegment::mean_hi, &InputGradSegment::mean_lo, &InputGradSegment::invstd,
            &InputGradSegment::a,       &InputGradSegment::e,       &InputGradSegment::k};
  }
  // len outputs of channel c from the runs of dy at g, of x at v and of y
  // at m.
  template <class Out, class In>
  void row_of(Out* dst, const In* g, const In* v, const In* m, int64_t len, int64_t c) const {
    const T hi = mean_hi[c], lo = mean_lo[c], s = invstd[c], ac = a[c], ec = e[c], kc = k[c];
#pragma omp simd
    for (int64_t i = 0; i < len; ++i)
      dst[i] = store_value<Out>(input_grad(Grad::gradient(load_value(g[i]), load_value(m[i])),
                                           load_value(v[i]), hi, lo, s, ac, ec, kc));
  }
  // stream: as in NormalizeSegment::row.
  void row(S* dst, const S* g, const S* v, const S* m, int64_t len, int64_t c,
           bool stream = false) const {
    if constexpr (kWidened<S>) {
      const Line<T> hi = broadcast_line(mean_hi[c]), lo = broadcast_line(mean_lo[c]),
                    s = broadcast_line(invstd[c]), ac = broadcast_line(a[c]),
                    ec = broadcast_line(e[c]), kc = broadcast_line(k[c]);
      write_half_lines(
          dst, len, stream,
          [=](int64_t i) FUSEDNN_INLINE_LAMBDA {
            return input_grad(gradient_line(g + i, m + i), widen_line(v + i), hi, lo, s, ac, ec,
                              kc);
          },
          [&](int64_t start, int64_t n) {
            widened(dst + start, n, g + start, v + start, m + start,
                    [&](float* out, const float* gb, const float* vb, const float* mb, int64_t,
                        int64_t count) { row_of(out, gb, vb, mb, count, c); });
          });
    } else {
      row_of(dst, g, v, m, len, c);
    }
  }
  // The gradient of 16 elements widened: dy at g, through Grad with y at m.
  static Line<float> gradient_line(const S* g, const S* m) {
    const Line<float> dy = widen_line(g);
    if constexpr (Grad::kReadsOutput) return Grad::gradient(dy, widen_line(m));
    return dy;
  }
  void broadcast(S* dst, int64_t pos, int64_t len, int64_t c, bool stream = false) const {
    row(dst, dy + pos, x + pos, y + pos, len, c, stream);
  }
  // See stream_lines.
  template <class Coefficient> Line<T> line(int64_t pos, const Coefficient& coefficient) const {
    return input_grad(Grad::gradient(load_line(dy + pos), load_line(y + pos)), load_line(x + pos),
                      coefficient(mean_hi), coefficient(mean_lo), coefficient(invstd),
                      coefficient(a), coefficient(e), coefficient(k));
  }
  // The blocks of in_widened_blocks over dy at g, x at v and (read only
  // when Grad masks dy with it) y at m: compute(out, gb, vb, mb, b, n).
  template <class Compute>
  static void widened(S* dst, int64_t len, const S* g, const S* v, const S* m,
                      const Compute& compute) {
    if constexpr (Grad::kReadsOutput) {
      in_widened_blocks(dst, len, {g, v, m},
                        [&](float* out, auto in, int64_t b, int64_t n) {
                          compute(out, in[0], in[1], in[2], b, n);
                        });
    } else {
      in_widened_blocks(dst, len, {g, v},
                        [&](float* out, auto in, int64_t b, int64_t n) {
                          compute(out, in[0], in[1], in[0], b, n);
                        });
    }
  }
  // stream: as in NormalizeSegment::row.
  void across(S* dst, int64_t pos, int64_t len, int64_t j, bool stream = false) const {
    if constexpr (kWidened<S>) {
      const S* g = dy + pos;
      const S* v = x + pos;
      const S* m = y + pos;
      const T* hi = mean_hi + j;
      const T* lo = mean_lo + j;
      const T* s = invstd + j;
      const T* ac = a + j;
      const T* ec = e + j;
      const T* kc = k + j;
      write_half_lines(
          dst, len, stream,
          [=](int64_t i) FUSEDNN_INLINE_LAMBDA {
            return input_grad(gradient_line(g + i, m + i), widen_line(v + i), load_line(hi + i),
                              load_line(lo + i), load_line(s + i), load_line(ac + i),
                              load_line(ec + i), load_line(kc + i));
          },
          [&](int64_t start, int64_t n) {
            widened(dst + start, n, g + start, v + start, m + start,
                    [&](float* out, const float* gb, const float* vb, const float* mb, int64_t b,
                        int64_t count) { across_of(out, gb, vb, mb, count, j + start + b); });
          });
    } else {
      across_of(dst, dy + pos, x + pos, y + pos, len, j);
    }
  }
  template <class Out, class In>
  void across_of(Out* dst, const In* g, const In* v, const In* m, int64_t len, int64_t j) const {
    const T* hi = mean_hi + j;
    const T* lo = mean_lo + j;
    const T* s = invstd + j;
    const T* ac = a + j;
    const T* ec = e + j;
    const T* kc = k + j;
#pragma omp simd
    for (int64_t i = 0; i < len; ++i)
      dst[i] = store_value<Out>(input_grad(Grad::gradient(load_value(g[i]), load_value(m[i])),
                                           load_value(v[i]), hi[i], lo[i], s[i], ac[i], ec[i],
                                           kc[i]));
  }
};

// m: the fused ReLU's output when Grad reads it, else dy again.
template <class S, class Grad>
void input_grad_pass(const ArrayRef& dy, const ArrayRef& x, const ArrayRef& m, const ArrayRef& dx,
                     int axis, const InputGradSegment<S, Grad>& seg) {
  using T = ComputeOf<S>;
  if (is_contiguous(dy) && is_contiguous(x) && is_contiguous(m) && is_contiguous(dx)) {
    map_contiguous_pass(static_cast<S*>(dx.data), channel_view(x, axis), seg);
    return;
  }
  const ChannelStrides cs(x, axis, int(sizeof(T)));
  const int64_t* strides[10] = {dy.strides,        x.strides,         m.strides,
                                dx.strides,        cs.strides.data(), cs.strides.data(),
                                cs.strides.data(), cs.strides.data(), cs.strides.data(),
                                cs.strides.data()};
  int sizes[10];
  std::fill(sizes, sizes + 10, int(sizeof(T)));
  std::fill(sizes, sizes + 4, int(sizeof(S)));
  const StridedLoop<10> loop(x.ndim, x.shape, strides, sizes);
  auto coef = [](const T* p) { return reinterpret_cast<char*>(const_cast<T*>(p)); };
  char* base[10] = {static_cast<char*>(dy.data), static_cast<char*>(x.data),
                    static_cast<char*>(m.data),  static_cast<char*>(dx.data),
                    coef(seg.mean_hi),           coef(seg.mean_lo),
                    coef(seg.invstd),            coef(seg.a),
                    coef(seg.e),                 coef(seg.k)};
  struct Body {
    void operator()(char* const* p, int64_t len, const int64_t* in) {
      const S* g = reinterpret_cast<const S*>(p[0]);
      const S* v = reinterpret_cast<const S*>(p[1]);
      const S* y = reinterpret_cast<const S*>(p[2]);
      S* dst = reinterpret_cast<S*>(p[3]);
      const T* hi = reinterpret_cast<const T*>(p[4]);
      const T* lo = reinterpret_cast<const T*>(p[5]);
      const T* s = reinterpret_cast<const T*>(p[6]);
      const T* a = reinterpret_cast<const T*>(p[7]);
      const T* e = reinterpret_cast<const T*>(p[8]);
      const T* k = reinterpret_cast<const T*>(p[9]);
      for (int64_t i = 0; i < len; ++i)
        dst[i * in[3]] = store_value<S>(input_grad(
            Grad::gradient(load_value(g[i * in[0]]), load_value(y[i * in[2]])),
            load_value(v[i * in[1]]), hi[i * in[4]], lo[i * in[5]], s[i * in[6]], a[i * in[7]],
            e[i * in[8]], k[i * in[9]]));
    }
    void finish() {}
  };
  loop.run(base, sizes, kStridedPassNanoseconds, [] { return Body{}; });
}

// normalize_wide of an element of storage type S, with the fused ReLU when
// relu is set: for the half types in double from the widened input, rounded
// once to S.
template <class S>
S normalize_wide_value(S x, double mean, double scale, double shift, bool relu) {
  if constexpr (std::is_same_v<S, ComputeOf<S>>) {
    const S v = normalize_wide(x, mean, scale, shift);
    return relu ? relu_after_normalize(v) : v;
  } else {
    const double v = normalize_wide(static_cast<double>(load_value(x)), mean, scale, shift);
    return Storage<S>::store_double(relu ? relu_after_normalize(v) : v);
  }
}

// Normalizes every element with normalize_wide, in double: the pass for
// calls where some channel's shift may overflow (shift_may_overflow).
// Elementwise, so in place works; slow, and taken only for such data.
template <class S>
void normalize_wide_pass(const ArrayRef& x, const ArrayRef& y, int axis,
                         const double* mean, const double* scale, const double* shift, bool relu) {
  const ChannelStrides cs(x, axis, int(sizeof(double)));
  const int64_t* strides[5] = {x.strides, y.strides, cs.strides.data(), cs.strides.data(),
                               cs.strides.data()};
  const int sizes[5] = {int(sizeof(S)), int(sizeof(S)), int(sizeof(double)),
                        int(sizeof(double)), int(sizeof(double))};
  const StridedLoop<5> loop(x.ndim, x.shape, strides, sizes);
  auto coef = [](const double* v) { return reinterpret_cast<char*>(const_cast<double*>(v)); };
  char* base[5] = {static_cast<char*>(x.data), static_cast<char*>(y.data), coef(mean),
                   coef(scale), coef(shift)};
  struct Body {
    bool relu;
    void operator()(char* const* p, int64_t len, const int64_t* in) {
      const S* src = reinterpret_cast<const S*>(p[0]);
      S* dst = reinterpret_cast<S*>(p[1]);
      const double* m = reinterpret_cast<const double*>(p[2]);
      const double* s = reinterpret_cast<const double*>(p[3]);
      const double* b = reinterpret_cast<const double*>(p[4]);
      for (int64_t i = 0; i < len; ++i)
        dst[i * in[1]] =
            normalize_wide_value(src[i * in[0]], m[i * in[2]], s[i * in[3]], b[i * in[4]], relu);
    }
    void finish() {}
  };
  loop.run(base, sizes, kStridedPassNanoseconds, [relu] { return Body{relu}; });
}

// The length of a per-channel table in scratch: one entry per channel, or
// repeated_length for the channels-last passes (`repeated`).
template <class T> size_t table_length(int64_t channels, bool repeated) {
  return static_cast<size_t>(repeated ? repeated_length<T>(channels) : channels);
}

// The normalizing pass's per-channel coefficients (normalize_coefficients),
// and the double ones of normalize_wide for channels whose shift may
// overflow T, in scratch memory. `repeated`: laid out for the
// channels-last pass (map_contiguous_pass), which apply() completes.
template <class S> struct NormalizeTables {
  using T = ComputeOf<S>;
  int64_t channels;
  bool repeated;
  T* mean_hi;
  T* mean_lo;
  T* scale;
  T* shift;
  double* scale_wide;
  double* shift_wide;
  char* wide;
  // Whether some channel filled so far is wide; bands fill their channels
  // at once.
  std::atomic<bool> any_wide{false};

  NormalizeTables(ScratchScope& scratch, int64_t channels, bool repeated)
      : channels(channels), repeated(repeated) {
    const size_t length = table_length<T>(channels, repeated);
    for (T** table : {&mean_hi, &mean_lo, &scale, &shift}) *table = scratch.take<T>(length);
    scale_wide = scratch.take<double>(static_cast<size_t>(channels));
    shift_wide = scratch.take<double>(static_cast<size_t>(channels));
    wide = scratch.take<char>(static_cast<size_t>(channels));
  }

  // Channels [c0, c1) from their mean, invstd, gamma and beta, in a loop
  // that vectorizes; whether one of them is wide.
  bool fill(int64_t c0, int64_t c1, const double* mu, const double* inv, const double* g,
            const double* b) {
    T* hi = mean_hi;
    T* lo = mean_lo;
    T* sc = scale;
    T* sh = shift;
    double* scw = scale_wide;
    double* shw = shift_wide;
    char* wd = wide;
    int any = 0;
#pragma omp simd reduction(| : any)
    for (int64_t c = c0; c < c1; ++c) {
      const NormalizeCoefficients<T> k = normalize_coefficients<T>(mu[c], inv[c], g[c], b[c]);
      hi[c] = k.mean_hi;
      lo[c] = k.mean_lo;
      sc[c] = k.scale;
      sh[c] = k.shift;
      scw[c] = g[c] * inv[c];
      shw[c] = b[c];
      wd[c] = shift_may_overflow<T>(mu[c]);
      any |= wd[c];
    }
    if (any != 0) any_wide.store(true, std::memory_order_relaxed);
    return any != 0;
  }

  // relu: a ReLU fused after the normalization.
  NormalizeSegment<S> segment(const S* x, bool relu = false) const {
    return {x, mean_hi, mean_lo, scale, shift, relu, repeated};
  }

  // Writes y for every element of x once every channel is filled; mean is
  // the double mean fill() had.
  void apply(const ArrayRef& x, const ArrayRef& y, int axis, const double* mean,
             bool relu = false) {
    if (any_wide) {
      normalize_wide_pass<S>(x, y, axis, mean, scale_wide, shift_wide, relu);
      return;
    }
    repeat();
    normalize_pass<S>(x, y, axis, segment(static_cast<const S*>(x.data), relu));
  }

  // Once every channel is filled, before a channels-last pass.
  void repeat() {
    if (!repeated) return;
    const int64_t length = repeated_length<T>(channels);
    for (T* table : {mean_hi, mean_lo, scale, shift}) repeat_channels(table, channels, length);
  }
};

// The input-gradient pass's per-channel coefficients
// (input_grad_coefficients), in scratch memory; `repeated` as in
// NormalizeTables, completed by repeat().
template <class S> struct InputGradTables {
  using T = ComputeOf<S>;
  int64_t channels;
  bool repeated;
  T* mean_hi;
  T* mean_lo;
  T* invstd;
  T* a;
  T* e;
  T* k;

  InputGradTables(ScratchScope& scratch, int64_t channels, bool repeated)
      : channels(channels), repeated(repeated) {
    const size_t length = table_length<T>(channels, repeated);
    for (T** table : {&mean_hi, &mean_lo, &invstd, &a, &e, &k}) *table = scratch.take<T>(length);
  }

  // Channels [c0, c1) of a batch of `count` elements per channel, in a loop
  // that vectorizes.
  void fill(int64_t c0, int64_t c1, double count, const double* mu, const double* inv,
            const double* g, const double* sum_dy, const double* sum_dy_xhat) {
    T* hi = mean_hi;
    T* lo = mean_lo;
    T* inv_t = invstd;
    T* pa = a;
    T* pe = e;
    T* pk = k;
#pragma omp simd
    for (int64_t c = c0; c < c1; ++c) {
      const InputGradCoefficients<T> q =
          input_grad_coefficients<T>(count, mu[c], inv[c], g[c], sum_dy[c], sum_dy_xhat[c]);
      hi[c] = q.mean_hi;
      lo[c] = q.mean_lo;
      inv_t[c] = q.invstd;
      pa[c] = q.a;
      pe[c] = q.e;
      pk[c] = q.k;
    }
  }

  // Once every channel is filled, before a channels-last pass.
  void repeat() {
    if (!repeated) return;
    const int64_t length = repeated_length<T>(channels);
    for (T* table : {mean_hi, mean_lo, invstd, a, e, k}) repeat_channels(table, channels, length);
  }

  // y: the fused ReLU's output when Grad masks dy with it, else dy again.
  template <class Grad = GradientAsGiven>
  InputGradSegment<S, Grad> segment(const S* dy, const S* x, const S* y) const {
    return {dy, x, y, mean_hi, mean_lo, invstd, a, e, k, repeated};
  }
};

// Fills invstd[c0, c1) from the variances, in a loop of its own that
// vectorizes: one scalar square root and division per channel took most of
// the time of a (32, 4096) batch.
void fill_inverse_std(int64_t c0, int64_t c1, const double* var, double eps, double* invstd) {
#pragma omp simd
  for (int64_t c = c0; c < c1; ++c) invstd[c] = inverse_std(var[c], eps);
}

// running <- running_update(running, batch, momentum) per channel, in
// place; nothing when running is absent. scratch: channels doubles.
void update_running(const ArrayRef* running, int64_t channels, const double* batch,
                    double momentum, double* scratch) {
  if (running == nullptr) return;
  load_channels(running, channels, 0.0, scratch);
  for (int64_t c = 0; c < channels; ++c) scratch[c] = running_update(scratch[c], batch[c], momentum);
  store_channels(*running, channels, scratch);
}

// A channel's moments from its units' sums, merged in unit order.
Moments merge_units(const Partial* p, int64_t units) {
  Moments acc = moments_from_shifted_sums(p[0].count, p[0].center, p[0].s1, p[0].s2);
  for (int64_t u = 1; u < units; ++u)
    acc = merge_moments(acc, moments_from_shifted_sums(p[u].count, p[u].center, p[u].s1, p[u].s2));
  return acc;
}

// A channel's sum(dy) and sum(dy * xhat) from its units' sums, added in unit
// order.
void sum_units(const Partial* p, int64_t units, double invstd, double& sum_dy,
               double& sum_dy_xhat) {
  double s1 = 0.0, s2 = 0.0;
  for (int64_t u = 0; u < units; ++u) {
    s1 += p[u].s1;
    s2 += p[u].s2;
  }
  sum_dy = s1;
  sum_dy_xhat = s2 * invstd;
}

// Channels per block of the merges below: their running results stay in L1.
constexpr int64_t kMergeBlock = 256;

// mean[c] and m2[c] for channels [c0, c1) from channels-last partials,
// which lie a unit's channels side by side (partials[u * channels + c]):
// merge_units's operations, in its unit order, with the channels across
// the vector. A channel's partials one after another, merged one channel
// at a time, were written a unit apart: those strided stores and the
// scalar merge took about a fifth of a (8192, 1024) statistics pass.
void unit_rows_moments(const Partial* partials, int64_t units, int64_t channels, int64_t c0,
                       int64_t c1, double* mean, double* m2) {
  for (int64_t b = c0; b < c1; b += kMergeBlock) {
    const int64_t n = std::min(kMergeBlock, c1 - b);
    double count[kMergeBlock];
    double* mu = mean + b;
    double* mm = m2 + b;
    const Partial* p = partials + b;
#pragma omp simd
    for (int64_t k = 0; k < n; ++k) {
      const Moments m = moments_from_shifted_sums(p[k].count, p[k].center, p[k].s1, p[k].s2);
      count[k] = m.count;
      mu[k] = m.mean;
      mm[k] = m.m2;
    }
    for (int64_t u = 1; u < units; ++u) {
      const Partial* q = p + u * channels;
#pragma omp simd
      for (int64_t k = 0; k < n; ++k) {
        const Moments m = merge_moments(
            Moments{count[k], mu[k], mm[k]},
            moments_from_shifted_sums(q[k].count, q[k].center, q[k].s1, q[k].s2));
        count[k] = m.count;
        mu[k] = m.mean;
        mm[k] = m.m2;
      }
    }
  }
}

// sum_units for channels [c0, c1) of channels-last partials laid out as in
// unit_rows_moments: the same additions in the same order.
void unit_rows_sums(const Partial* partials, int64_t units, int64_t channels, int64_t c0,
                    int64_t c1, const double* invstd, double* sum_dy, double* sum_dy_xhat) {
  for (int64_t b = c0; b < c1; b += kMergeBlock) {
    const int64_t n = std::min(kMergeBlock, c1 - b);
    double s2[kMergeBlock];
    double* s1 = sum_dy + b;
    const Partial* p = partials + b;
#pragma omp simd
    for (int64_t k = 0; k < n; ++k) {
      s1[k] = 0.0;
      s2[k] = 0.0;
    }
    for (int64_t u = 0; u < units; ++u) {
      const Partial* q = p + u * channels;
#pragma omp simd
      for (int64_t k = 0; k < n; ++k) {
        s1[k] += q[k].s1;
        s2[k] += q[k].s2;
      }
    }
#pragma omp simd
    for (int64_t k = 0; k < n; ++k) sum_dy_xhat[b + k] = s2[k] * invstd[b + k];
  }
}

// Runs fn(c0, c1) over runs of channels that cover [0, channels) on the
// pool, a run per task of about kUnitElements partials.
template <class Fn> void for_each_channel_run(int64_t channels, int64_t units, const Fn& fn) {
  const int64_t per_task =
      std::max<int64_t>(1, kUnitElements / std::max<int64_t>(1, units));
  parallel_for((channels + per_task - 1) / per_task, [&](int64_t t) {
    fn(t * per_task, std::min(channels, (t + 1) * per_task));
  });
}

// Every channel's mean and M2 over a view with at least one element per
// channel. With one unit per channel (every batch of up to 256 rows in
// the channels-last layout), merging is one vectorized loop over the
// channels: the same arithmetic as merge_units.
template <class S>
void channel_moments(const ChannelView& xv, double* mean, double* m2) {
  const Partition part(xv);
  const int64_t units = part.units_per_channel();
  ScratchScope scratch;
  Partial* partials = scratch.take<Partial>(static_cast<size_t>(xv.channels * units));
  reduce_units<StatisticsSums, GradientAsGiven, S>(xv, xv, xv, part, nullptr, partials);
  if (units == 1) {
#pragma omp simd
    for (int64_t c = 0; c < xv.channels; ++c) {
      const Partial& p = partials[c];
      const Moments m = moments_from_shifted_sums(p.count, p.center, p.s1, p.s2);
      mean[c] = m.mean;
      m2[c] = m.m2;
    }
    return;
  }
  if (part.inner == 1) {
    for_each_channel_run(xv.channels, units, [&](int64_t c0, int64_t c1) {
      unit_rows_moments(partials, units, xv.channels, c0, c1, mean, m2);
    });
    return;
  }
  for_each_channel(xv.channels, units, [&](int64_t c) {
    const Moments m = merge_units(partials + c * units, units);
    mean[c] = m.mean;
    m2[c] = m.m2;
  });
}

// Every channel's sum(dy) and sum(dy * xhat) around the given statistics,
// over views with at least one element per channel; dy through Grad (mv:
// the fused ReLU's output, or gv again).
template <class S, class Grad = GradientAsGiven>
void gradient_sums(const ChannelView& xv, const ChannelView& gv, const ChannelView& mv,
                   const double* mean, const double* invstd, double* sum_dy, double* sum_dy_xhat) {
  const Partition part(xv);
  const int64_t units = part.units_per_channel();
  ScratchScope scratch;
  Partial* partials = scratch.take<Partial>(static_cast<size_t>(xv.channels * units));
  reduce_units<GradientSums, Grad, S>(xv, gv, mv, part, mean, partials);
  if (units == 1) {  // as in channel_moments
#pragma omp simd
    for (int64_t c = 0; c < xv.channels; ++c)
      sum_units(partials + c, 1, invstd[c], sum_dy[c], sum_dy_xhat[c]);
    return;
  }
  if (part.inner == 1) {
    for_each_channel_run(xv.channels, units, [&](int64_t c0, int64_t c1) {
      unit_rows_sums(partials, units, xv.channels, c0, c1, invstd, sum_dy, sum_dy_xhat);
    });
    return;
  }
  for_each_channel(xv.channels, units, [&](int64_t c) {
    sum_units(partials + c * units, units, invstd[c], sum_dy[c], sum_dy_xhat[c]);
  });
}

template <class S>
void forward_typed(const ArrayRef& x, const ArrayRef& y, const BatchNormForwardArgs& args) {
  const ChannelView xv = channel_view(x, args.axis);
  const bool y_has_view = has_channel_view(y, args.axis);
  const ChannelView yv = y_has_view ? channel_view(y, args.axis) : xv;
  const int64_t channels = xv.channels;
  const int64_t count = xv.outer * xv.inner;
  // Checked here too, not only in Python: the reductions read a sample of
  // every unit, and a direct call must raise, never read out of bounds.
  if (args.training && channels > 0 && count < 2)
    throw std::invalid_argument("batch_norm: training needs more than one value per channel");
  if (!args.training && (args.running_mean == nullptr || args.running_var == nullptr))
    throw std::invalid_argument("batch_norm: inference needs running_mean and running_var");
  const size_t nc = static_cast<size_t>(channels);
  ScratchScope scratch;
  double* mean = scratch.take<double>(nc);
  double* var = scratch.take<double>(nc);
  double* m2 = scratch.take<double>(nc);
  double* invstd = scratch.take<double>(nc);
  const double* gamma = loaded_channels(scratch, args.gamma, channels, 1.0);
  const double* beta = loaded_channels(scratch, args.beta, channels, 0.0);
  NormalizeTables<S> tables(scratch, channels, xv.inner == 1);
  // Out of line: the bands, the resident channels and the two-pass loops
  // share one copy.
  // Whether some channel of [c0, c1) is wide.
  auto set_coefficients = [&](int64_t c0, int64_t c1) __attribute__((noinline)) {
    fill_inverse_std(c0, c1, var, args.eps, invstd);
    return tables.fill(c0, c1, mean, invstd, gamma, beta);
  };
  const Partition part(xv);
  const bool banded = args.training && count > 0 && is_contiguous(x) && is_contiguous(y);
  const int64_t bands =
      banded ? band_count<S>(part, 1, kReduceNanoseconds + kPassNanoseconds) : 0;
  // Column bands write y before every band's statistics are in, so y must
  // not be x (see the wide case below).
  const char* x_bytes = static_cast<const char*>(x.data);
  const char* y_bytes = static_cast<const char*>(y.data);
  const int64_t bytes = count * channels * int64_t(sizeof(S));
  const bool apart = x_bytes + bytes <= y_bytes || y_bytes + bytes <= x_bytes;
  const int64_t columns =
      banded && bands == 0 && apart
          ? column_band_count<S>(part, kReduceNanoseconds + kPassNanoseconds)
          : 0;
  // Rows of one outer block shared out among threads (in place too: every
  // share is summed before any is written).
  const int64_t split = banded && bands == 0 && columns == 0
                            ? split_unit_count<S>(part, 1, kReduceNanoseconds + kPassNanoseconds)
                            : 0;
  if (bands > 0 || split > 0) {
    const int64_t units = part.units_per_channel();
    Partial* partials = scratch.take<Partial>(nc * static_cast<size_t>(units));
    const UnitShare* shares =
        split > 0 ? split_unit_shares<ComputeOf<S>>(scratch, part, split) : nullptr;
    const NormalizeSegment<S> segment = tables.segment(static_cast<const S*>(x.data), args.relu);
    const bool stream = count * channels * int64_t(sizeof(S)) >= kStreamBytes;
    // Channels [c0, c1) once every unit is summed: as channel_moments and
    // the two-pass branch below.
    const auto join = [&](int64_t c0, int64_t c1) {
      if (shares != nullptr)
        finish_split_unit<StatisticsSums, GradientAsGiven, S>(xv, xv, xv, part, shares, split,
                                                              c0, c1, partials);
      unit_rows_moments(partials, units, channels, c0, c1, mean, m2);
      for (int64_t c = c0; c < c1; ++c) var[c] = m2[c] / static_cast<double>(count);
      set_coefficients(c0, c1);
    };
    const auto write = [&](int64_t begin, int64_t end) {
      if (tables.any_wide) return;  // the whole array below, in double
      map_range(static_cast<S*>(y.data), begin, end, channels, 1, coefficient_period(channels),
                stream, segment);
      if (stream) store_fence();
    };
    const int64_t regions = shares != nullptr ? split : bands;
    const int64_t slices = join_slices(regions, channels);
    run_row_bands(
        regions, slices, channels, band_bounds(scratch, part, regions, shares),
        [&](int64_t b) {
          if (shares != nullptr) {
            sum_unit_share<StatisticsSums, GradientAsGiven, S>(xv, xv, xv, part, nullptr,
                                                               shares[b]);
            return;
          }
          const auto [u0, u1] = band_units(part, bands, b);
          for (int64_t unit = u0; unit < u1; ++unit)
            channels_last_unit_sums<StatisticsSums, GradientAsGiven, S>(
                xv, xv, xv, part, nullptr, 0, part.channel_blocks, unit, partials);
        },
        [&](int64_t s) {
          const auto [c0, c1] = join_channels(s, slices, channels);
          join(c0, c1);
        },
        [&](int64_t) { tables.repeat(); }, write);
    if (tables.any_wide) tables.apply(x, y, args.axis, mean, args.relu);
  } else if (columns > 0) {
    Partial* partials = scratch.take<Partial>(nc);
    const NormalizeSegment<S> segment = tables.segment(static_cast<const S*>(x.data), args.relu);
    S* y_data = static_cast<S*>(y.data);
    run_column_bands(part, columns, [&](int64_t c0, int64_t c1, int64_t b0, int64_t b1) {
      channels_last_unit_sums<StatisticsSums, GradientAsGiven, S>(xv, xv, xv, part, nullptr, b0,
                                                                  b1, 0, partials);
      for (int64_t c = c0; c < c1; ++c) {  // as channel_moments and the two-pass branch
        const Partial& p = partials[c];
        const Moments m = moments_from_shifted_sums(p.count, p.center, p.s1, p.s2);
        mean[c] = m.mean;
        m2[c] = m.m2;
        var[c] = m.m2 / static_cast<double>(count);
      }
      // With a wide channel anywhere, the whole array is written again
      // below in double, as the other paths write it, from x (apart from
      // y).
      if (!set_coefficients(c0, c1)) map_columns(y_data, count, channels, c0, c1, segment);
    });
    if (tables.any_wide) tables.apply(x, y, args.axis, mean, args.relu);
  } else if (args.training && count > 0 && y_has_view &&
             channel_resident(xv, sizeof(S), 1, {&xv, &yv})) {
    const int64_t units = part.units_per_channel();
    const NormalizeSegment<S> segment = tables.segment(static_cast<const S*>(x.data), args.relu);
    const bool stream = count * channels * int64_t(sizeof(S)) >= kStreamBytes;
    // Each channel's unit sums; a band uses the `units` entries of its
    // channels.
    Partial* partials = scratch.take<Partial>(nc * static_cast<size_t>(units));
    double* lanes = scratch.take<double>(nc * 2 * kLanes);
    const CallCost cost = call_cost<S>(count * channels, kResidentForwardNanoseconds);
    const S* x_data = static_cast<const S*>(x.data);
    for_each_resident_band(
        channels, resident_band_channels(xv, sizeof(S), 1), cost,
        [&](int64_t c0, int64_t c1, bool next) {
          band_unit_sums<StatisticsSums, GradientAsGiven, S>(xv, xv, xv, part, c0, c1, nullptr,
                                                             lanes + c0 * 2 * kLanes, partials);
          for (int64_t c = c0; c < c1; ++c) {
            const Moments m = merge_units(partials + c * units, units);
            mean[c] = m.mean;
            m2[c] = m.m2;
            var[c] = m.m2 / m.count;
          }
          set_coefficients(c0, c1);
          write_band_rows<S>(yv, c0, c1, stream,
                             [&](S* dst, int64_t o, int64_t c, int64_t start, int64_t n) {
            const S* src = x_data + o * xv.stride_outer + c * xv.stride_channel + start;
            if (next) prefetch_to_l2(src + (c1 - c0) * xv.stride_channel, n);
            if (tables.wide[c]) {
              for (int64_t j = 0; j < n; ++j)
                dst[j] = normalize_wide_value(src[j], mean[c], tables.scale_wide[c],
                                              tables.shift_wide[c], args.relu);
            } else {
              segment.row(dst, src, n, c, stream);
            }
          });
        });
  } else {
    if (args.training) {
      if (count > 0) channel_moments<S>(xv, mean, m2);
      for (size_t i = 0; i < nc; ++i) var[i] = m2[i] / static_cast<double>(count);
    } else {
      load_channels(args.running_mean, channels, 0.0, mean);
      load_channels(args.running_var, channels, 0.0, var);
    }
    set_coefficients(0, channels);
    if (count > 0 && channels > 0) tables.apply(x, y, args.axis, mean, args.relu);
  }

  store_channels(*args.save_mean, channels, mean);
  store_channels(*args.save_invstd, channels, invstd);
  if (!args.training) return;
  // The unbiased variance into m2, and `var` (no longer needed) as scratch.
  for (size_t i = 0; i < nc; ++i) m2[i] /= static_cast<double>(count - 1);
  update_running(args.running_mean, channels, mean, args.momentum, var);
  update_running(args.running_var, channels, m2, args.momentum, var);
}

// m: the fused ReLU's output, whose mask Grad applies to dy, or dy itself
// when Grad takes dy as given.
template <class S, class Grad>
void backward_typed(const ArrayRef& dy, const ArrayRef& x, const ArrayRef& m, const ArrayRef& dx,
                    const BatchNormBackwardArgs& args) {
  const ChannelView xv = channel_view(x, args.axis);
  const ChannelView gv = channel_view(dy, args.axis);
  const ChannelView mv = channel_view(m, args.axis);
  const bool dx_has_view = has_channel_view(dx, args.axis);
  const ChannelView dv = dx_has_view ? channel_view(dx, args.axis) : xv;
  const int64_t channels = xv.channels;
  const int64_t count = xv.outer * xv.inner;
  const size_t nc = static_cast<size_t>(channels);
  ScratchScope scratch;
  const double* mean = loaded_channels(scratch, args.save_mean, channels, 0.0);
  const double* invstd = loaded_channels(scratch, args.save_invstd, channels, 0.0);
  const double* gamma = loaded_channels(scratch, args.gamma, channels, 1.0);
  double* sum_dy = scratch.take<double>(nc);
  double* sum_dy_xhat = scratch.take<double>(nc);
  InputGradTables<S> tables(scratch, channels, xv.inner == 1);
  // grad_gamma = sum(dy * xhat) and grad_beta = sum(dy).
  auto store_parameter_grads = [&] {
    store_channels(*args.grad_gamma, channels, sum_dy_xhat);
    store_channels(*args.grad_beta, channels, sum_dy);
  };
  if (count == 0 || channels == 0) {
    std::fill_n(sum_dy, nc, 0.0);
    std::fill_n(sum_dy_xhat, nc, 0.0);
    store_parameter_grads();
    return;
  }
  const double n = static_cast<double>(count);
  const S* dy_data = static_cast<const S*>(dy.data);
  const S* x_data = static_cast<const S*>(x.data);
  const S* m_data = static_cast<const S*>(m.data);
  // Channels [c0, c1)'s coefficients once their sums are in; out of line,
  // the column bands, the row bands and the two-pass loops share one copy.
  const auto fill_tables = [&](int64_t c0, int64_t c1) __attribute__((noinline)) {
    tables.fill(c0, c1, n, mean, invstd, gamma, sum_dy, sum_dy_xhat);
  };
  const int reads = Grad::kReadsOutput ? 3 : 2;
  const Partition part(xv);
  const int64_t bands =
      args.training && is_contiguous(dy) && is_contiguous(x) && is_contiguous(m) &&
              is_contiguous(dx)
          ? band_count<S>(part, reads, kReduceNanoseconds + kPassNanoseconds)
          : 0;
  const int64_t columns =
      args.training && bands == 0 && is_contiguous(dy) && is_contiguous(x) && is_contiguous(m) &&
              is_contiguous(dx)
          ? column_band_count<S>(part, kReduceNanoseconds + kPassNanoseconds)
          : 0;
  if (columns > 0) {
    Partial* partials = scratch.take<Partial>(nc);
    const InputGradSegment<S, Grad> segment = tables.template segment<Grad>(dy_data, x_data, m_data);
    run_column_bands(part, columns, [&](int64_t c0, int64_t c1, int64_t b0, int64_t b1) {
      channels_last_unit_sums<GradientSums, Grad, S>(xv, gv, mv, part, mean, b0, b1, 0, partials);
      for (int64_t c = c0; c < c1; ++c)  // as gradient_sums and the two-pass branch
        sum_units(partials + c, 1, invstd[c], sum_dy[c], sum_dy_xhat[c]);
      fill_tables(c0, c1);
      map_columns(static_cast<S*>(dx.data), count, channels, c0, c1, segment);
    });
    store_parameter_grads();
    return;
  }
  // Rows of one outer block shared out among threads, as in the forward.
  const int64_t split =
      args.training && bands == 0 && columns == 0 && is_contiguous(dy) && is_contiguous(x) &&
              is_contiguous(m) && is_contiguous(dx)
          ? split_unit_count<S>(part, reads, kReduceNanoseconds + kPassNanoseconds)
          : 0;
  if (bands > 0 || split > 0) {
    const int64_t units = part.units_per_channel();
    Partial* partials = scratch.take<Partial>(nc * static_cast<size_t>(units));
    const UnitShare* shares =
        split > 0 ? split_unit_shares<ComputeOf<S>>(scratch, part, split) : nullptr;
    const InputGradSegment<S, Grad> segment = tables.template segment<Grad>(dy_data, x_data, m_data);
    const bool stream = count * channels * int64_t(sizeof(S)) >= kStreamBytes;
    // Channels [c0, c1) once every unit is summed: as gradient_sums and
    // the two-pass branch below.
    const auto join = [&](int64_t c0, int64_t c1) {
      if (shares != nullptr)
        finish_split_unit<GradientSums, Grad, S>(xv, gv, mv, part, shares, split, c0, c1,
                                                 partials);
      unit_rows_sums(partials, units, channels, c0, c1, invstd, sum_dy, sum_dy_xhat);
      fill_tables(c0, c1);
    };
    const auto write = [&](int64_t begin, int64_t end) {
      map_range(static_cast<S*>(dx.data), begin, end, channels, 1, coefficient_period(channels),
                stream, segment);
      if (stream) store_fence();
    };
    const int64_t regions = shares != nullptr ? split : bands;
    const int64_t slices = join_slices(regions, channels);
    run_row_bands(
        regions, slices, channels, band_bounds(scratch, part, regions, shares),
        [&](int64_t b) {
          if (shares != nullptr) {
            sum_unit_share<GradientSums, Grad, S>(xv, gv, mv, part, mean, shares[b]);
            return;
          }
          const auto [u0, u1] = band_units(part, bands, b);
          for (int64_t unit = u0; unit < u1; ++unit)
            channels_last_unit_sums<GradientSums, Grad, S>(xv, gv, mv, part, mean, 0,
                                                           part.channel_blocks, unit, partials);
        },
        [&](int64_t s) {
          const auto [c0, c1] = join_channels(s, slices, channels);
          join(c0, c1);
        },
        [&](int64_t) { tables.repeat(); }, write);
    store_parameter_grads();
    return;
  }
  if (args.training && dx_has_view &&
      channel_resident(xv, sizeof(S), reads, {&xv, &gv, &mv, &dv})) {
    const int64_t units = part.units_per_channel();
    const InputGradSegment<S, Grad> segment = tables.template segment<Grad>(dy_data, x_data, m_data);
    const bool stream = count * channels * int64_t(sizeof(S)) >= kStreamBytes;
    Partial* partials = scratch.take<Partial>(nc * static_cast<size_t>(units));
    double* lanes = scratch.take<double>(nc * 2 * kLanes);
    const CallCost cost = call_cost<S>(count * channels, kResidentBackwardNanoseconds);
    // Channels too large for two a band keep one a band and ask for the
    // next while they write (see write_band_rows); smaller ones go in
    // bands of up to kResidentBackwardBandBytes, without.
    const int64_t band_channels =
        resident_band_channels(xv, sizeof(S), reads) == 1
            ? 1
            : resident_band_channels(xv, sizeof(S), reads, kResidentBackwardBandBytes);
    for_each_resident_band(
        channels, band_channels, cost, [&](int64_t c0, int64_t c1, bool next) {
          band_unit_sums<GradientSums, Grad, S>(xv, gv, mv, part, c0, c1, mean,
                                                lanes + c0 * 2 * kLanes, partials);
          for (int64_t c = c0; c < c1; ++c)
            sum_units(partials + c * units, units, invstd[c], sum_dy[c], sum_dy_xhat[c]);
          fill_tables(c0, c1);
          write_band_rows<S>(dv, c0, c1, stream,
                             [&](S* dst, int64_t o, int64_t c, int64_t start, int64_t len) {
            const S* g = dy_data + o * gv.stride_outer + c * gv.stride_channel + start;
            const S* v = x_data + o * xv.stride_outer + c * xv.stride_channel + start;
            const S* y = m_data + o * mv.stride_outer + c * mv.stride_channel + start;
            if (next && c1 - c0 == 1) {
              const int64_t ahead = 1;
              prefetch_to_l2(g + ahead * gv.stride_channel, len);
              prefetch_to_l2(v + ahead * xv.stride_channel, len);
              if (Grad::kReadsOutput) prefetch_to_l2(y + ahead * mv.stride_channel, len);
            }
            segment.row(dst, g, v, y, len, c, stream);
          });
        });
    store_parameter_grads();
    return;
  }
  gradient_sums<S, Grad>(xv, gv, mv, mean, invstd, sum_dy, sum_dy_xhat);
  store_parameter_grads();
  if (args.training) {
    fill_tables(0, channels);
    tables.repeat();
    input_grad_pass<S>(dy, x, m, dx, args.axis,
                       tables.template segment<Grad>(dy_data, x_data, m_data));
    return;
  }
  // Inference: dx = gamma * invstd * dy, written by the forward's normalize
  // loops over dy (hi, lo and shift zero). With the fused ReLU, dy is
  // masked into dx first and scaled there: inference's input gradient is
  // elementwise, so the extra pass is the only cost of the mask.
  const ArrayRef* scaled = &dy;
  if (Grad::kReadsOutput) {
    activation_backward(Activation::relu, ActivationParams{}, /*from_output=*/true, dy, m, dx);
    scaled = &dx;
  }
  using T = ComputeOf<S>;
  T* zeros = scratch.take<T>(nc);
  T* scale = scratch.take<T>(nc);
  std::fill_n(zeros, nc, T(0));
  for (size_t i = 0; i < nc; ++i)
    scale[i] = inference_input_grad_coefficients<T>(invstd[i], gamma[i]).scale;
  normalize_pass<S>(*scaled, dx, args.axis,
                    NormalizeSegment<S>{static_cast<const S*>(scaled->data), zeros, zeros, scale,
                                        zeros});
}

// ---- the split phases of data-parallel batch normalization -----------------

template <class S> void stats_typed(const ArrayRef& x, int axis, const ArrayRef& mean_out,
                                    const ArrayRef& m2_out) {
  const ChannelView xv = channel_view(x, axis);
  const size_t nc = static_cast<size_t>(xv.channels);
  ScratchScope scratch;
  double* mean = scratch.take<double>(nc);
  double* m2 = scratch.take<double>(nc);
  if (xv.outer * xv.inner > 0) {
    channel_moments<S>(xv, mean, m2);
  } else {  // a process with no samples contributes nothing (count 0): zeros
    std::fill_n(mean, nc, 0.0);
    std::fill_n(m2, nc, 0.0);
  }
  store_channels(mean_out, xv.channels, mean);
  store_channels(m2_out, xv.channels, m2);
}

template <class S>
void apply_typed(const ArrayRef& x, const ArrayRef& y, const BatchNormApplyArgs& args) {
  const ChannelView xv = channel_view(x, args.axis);
  const int64_t channels = xv.channels;
  const size_t nc = static_cast<size_t>(channels);
  ScratchScope scratch;
  const double* mean = loaded_channels(scratch, args.mean, channels, 0.0);
  const double* invstd = loaded_channels(scratch, args.invstd, channels, 0.0);
  const double* gamma = loaded_channels(scratch, args.gamma, channels, 1.0);
  const double* beta = loaded_channels(scratch, args.beta, channels, 0.0);
  NormalizeTables<S> tables(scratch, channels, xv.inner == 1);
  tables.fill(0, channels, mean, invstd, gamma, beta);
  if (xv.outer * xv.inner > 0 && channels > 0) tables.apply(x, y, args.axis, mean);
}

template <class S>
void backward_reduce_typed(const ArrayRef& dy, const ArrayRef& x, const BatchNormReduceArgs& args) {
  const ChannelView xv = channel_view(x, args.axis);
  const ChannelView gv = channel_view(dy, args.axis);
  const size_t nc = static_cast<size_t>(xv.channels);
  ScratchScope scratch;
  const double* mean = loaded_channels(scratch, args.mean, xv.channels, 0.0);
  const double* invstd = loaded_channels(scratch, args.invstd, xv.channels, 0.0);
  double* sum_dy = scratch.take<double>(nc);
  double* sum_dy_xhat = scratch.take<double>(nc);
  if (xv.outer * xv.inner > 0) {
    gradient_sums<S>(xv, gv, gv, mean, invstd, sum_dy, sum_dy_xhat);
  } else {
    std::fill_n(sum_dy, nc, 0.0);
    std::fill_n(sum_dy_xhat, nc, 0.0);
  }
  store_channels(*args.sum_dy, xv.channels, sum_dy);
  store_channels(*args.sum_dy_xhat, xv.channels, sum_dy_xhat);
}

template <class S>
void backward_apply_typed(const ArrayRef& dy, const ArrayRef& x, const ArrayRef& dx,
                          const BatchNormBackwardApplyArgs& args) {
  const ChannelView xv = channel_view(x, args.axis);
  const int64_t channels = xv.channels;
  if (xv.outer * xv.inner == 0 || channels == 0) return;
  const size_t nc = static_cast<size_t>(channels);
  ScratchScope scratch;
  const double* mean = loaded_channels(scratch, args.mean, channels, 0.0);
  const double* invstd = loaded_channels(scratch, args.invstd, channels, 0.0);
  const double* gamma = loaded_channels(scratch, args.gamma, channels, 1.0);
  const double* sum_dy = loaded_channels(scratch, args.sum_dy, channels, 0.0);
  const double* sum_dy_xhat = loaded_channels(scratch, args.sum_dy_xhat, channels, 0.0);
  InputGradTables<S> tables(scratch, channels, xv.inner == 1);
  tables.fill(0, channels, args.count, mean, invstd, gamma, sum_dy, sum_dy_xhat);
  tables.repeat();
  const S* dy_data = static_cast<const S*>(dy.data);
  input_grad_pass<S>(dy, x, dy, dx, args.axis,
                     tables.segment(dy_data, static_cast<const S*>(x.data), dy_data));
}

// The element at row r, column c of a 2-D float64 array.
double element(const ArrayRef& a, int64_t r, int64_t c) {
  return *reinterpret_cast<const double*>(static_cast<const char*>(a.data) + r * a.strides[0] +
                                          c * a.strides[1]);
}

}  // namespace

void batch_norm_forward(const ArrayRef& x, const ArrayRef& y, const BatchNormForwardArgs& args) {
  visit_storage(x.dtype, [&](auto tag) { forward_typed<decltype(tag)>(x, y, args); });
}

void batch_norm_backward(const ArrayRef& grad_output, const ArrayRef& x, const ArrayRef& grad_input,
                         const BatchNormBackwardArgs& args) {
  const ArrayRef* relu = args.relu_output;
  visit_storage(x.dtype, [&](auto tag) {
    using S = decltype(tag);
    if (relu != nullptr) {
      backward_typed<S, GradientThroughRelu>(grad_output, x, *relu, grad_input, args);
    } else {
      backward_typed<S, GradientAsGiven>(grad_output, x, grad_output, grad_input, args);
    }
  });
}

void batch_norm_stats(const ArrayRef& x, int axis, const ArrayRef& mean, const ArrayRef& m2) {
  visit_storage(x.dtype, [&](auto tag) { stats_typed<decltype(tag)>(x, axis, mean, m2); });
}

void batch_norm_combine(const std::vector<double>& counts, const ArrayRef& means,
                        const ArrayRef& m2s, const ArrayRef& mean, const ArrayRef& var) {
  const int64_t ranks = static_cast<int64_t>(counts.size());
  const int64_t channels = means.shape[1];
  std::vector<double> merged_mean(static_cast<size_t>(channels)), merged_var(merged_mean.size());
  for (int64_t c = 0; c < channels; ++c) {
    const Moments m = merge_ranks(ranks, counts.data(), [&](int64_t r, double count) {
      return Moments{count, element(means, r, c), element(m2s, r, c)};
    });
    merged_mean[static_cast<size_t>(c)] = m.mean;
    merged_var[static_cast<size_t>(c)] = m.m2 / m.count;
  }
  store_channels(mean, channels, merged_mean.data());
  store_channels(var, channels, merged_var.data());
}

void batch_norm_finalize(const BatchNormFinalizeArgs& args) {
  const int64_t channels = args.var->shape[0];
  const size_t nc = static_cast<size_t>(channels);
  std::vector<double> mean(nc), var(nc), invstd(nc);
  load_channels(args.mean, channels, 0.0, mean.data());
  load_channels(args.var, channels, 0.0, var.data());
  fill_inverse_std(0, channels, var.data(), args.eps, invstd.data());
  store_channels(*args.invstd, channels, invstd.data());
  update_running(args.running_mean, channels, mean.data(), args.momentum, invstd.data());
  for (size_t i = 0; i < nc; ++i) var[i] = unbiased_variance(var[i], args.count);
  update_running(args.running_var, channels, var.data(), args.momentum, invstd.data());
}

void batch_norm_apply(const ArrayRef& x, const ArrayRef& y, const BatchNormApplyArgs& args) {
  visit_storage(x.dtype, [&](auto tag) { apply_typed<decltype(tag)>(x, y, args); });
}

void batch_norm_backward_reduce(const ArrayRef& grad_output, const ArrayRef& x,
                                const BatchNormReduceArgs& args) {
  visit_storage(x.dtype,
                    [&](auto tag) { backward_reduce_typed<decltype(tag)>(grad_output, x, args); });
}

void batch_norm_backward_apply(const ArrayRef& grad_output, const ArrayRef& x,
                               const ArrayRef& grad_input, const BatchNormBackwardApplyArgs& args) {
  visit_storage(x.dtype, [&](auto tag) {
    backward_apply_typed<decltype(tag)>(grad_output, x, grad_input, args);
  });
}

}  // namespace FUSEDNN_ISA
}  // namespace cpu
}  // namespace fusednn
