// The loop driver shared by the elementwise CPU kernels: it merges the
// dimensions that all operands traverse contiguously, splits the flat index
// range into one slice per thread, and hands the body runs along the
// innermost dimension. Also the streaming-store helpers: large outputs are
// written with non-temporal stores, because the output is not re-read soon
// and a normal store would first read each line into the cache.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <type_traits>

#if defined(__SSE2__)
#include <immintrin.h>
#endif

#include "cpu/array.h"
#include "cpu/strided_dims.h"
#include "cpu/threadpool.h"

#if !defined(FUSEDNN_ISA)
#error "cpu/elementwise.h belongs to the per-ISA kernel files (FUSEDNN_ISA undefined)"
#endif

namespace fusednn {
namespace cpu {
// Everything here is compiled once per ISA, so it lives in that ISA's
// namespace: an inline function shared by name across the builds would be
// merged by the linker into one copy, possibly the AVX-512 one, and called
// from the generic build on a CPU without AVX-512.
namespace FUSEDNN_ISA {

// Work per task below which handing it to another thread does not pay: a
// worker joins an empty parallel region in about 2 us here (bench --sweep's
// pool row). This minimum goes with batch norm's costs (cpu/batchnorm.cpp),
// which were measured on whole calls.
constexpr double kMinTaskNanoseconds = 8000;
// The same minimum for the elementwise loops, whose costs
// (cpu/activation_runs.h, kCopyNanoseconds, dropout's) are a loop's
// marginal cost in L1. A layer-sized call reads from L2 and costs more than
// that. Back-to-back calls on one and two threads: a relu of 2^17 elements
// (10.5 us at its cost) took 22.5 and 13.5 us, a silu of 2^15 (10.2 us)
// 11.0 and 10.1, a gelu of 2^15 (9.8 us) 11.2 and 10.8, a dropout of 2^15
// (19.7 us) 21.2 and 17.6: a call splits in two from 10 us at these costs,
// where the second thread's gain begins.
constexpr double kMinElementwiseTaskNanoseconds = 5000;

// How many slices to split `size` elements costing about ns_per_element
// each (float32, one core, data in cache) into: one per thread, fewer where
// a slice would carry less than min_task_ns. A fixed element count would
// split a relu (0.08 ns per element) as finely as a gelu backward (0.75 ns).
inline int64_t slice_count(int64_t size, double ns_per_element,
                           double min_task_ns = kMinTaskNanoseconds) {
  const double slices = double(size) * ns_per_element / min_task_ns;
  return slices < 2 ? 1 : std::min<int64_t>(num_threads(), int64_t(slices));
}

// Per-element costs of the loops that are not activations, measured like
// the activations' (cpu/activation_runs.h).
constexpr double kCopyNanoseconds = 0.05;
// Outputs at least this large are streamed past the cache.
constexpr int64_t kStreamBytes = int64_t(16) << 20;
// Size of the cache-resident staging buffer for the streamed outputs of
// produce() (the plain copy). With 1 KiB the activations and the copy ran
// 5-30% faster here than with 8 KiB, likely because small buffers spread
// the streaming stores between stretches of arithmetic where a large one
// sends them in bursts; the activations have since gone further, to one
// line at a time (write_run).
constexpr int kStageBytes = 1024;
// The dropout and batch-norm loops keep 8 KiB: both measured slower with
// 1 KiB (batch norm's large two-pass outputs stream lines instead, see
// Line below).
constexpr int kWideStageBytes = 8192;

template <int N> struct StridedLoop {
  int ndim = 0;
  int64_t size = 0;
  int64_t shape[kMaxDims];
  int64_t strides[N][kMaxDims];  // in elements

  // All operands share `shape`; strides are in bytes (0 broadcasts). Out
  // of line: inlined, the call's setup was copied into every kernel
  // instantiation.
  __attribute__((noinline)) StridedLoop(int in_ndim, const int64_t* in_shape,
                                        const int64_t* const in_strides[N],
                                        const int itemsizes[N]) {
    ndim = merge_dimensions(N, in_ndim, in_shape, in_strides, itemsizes, shape, strides[0],
                            &size);
  }

  // Calls body(ptrs, len, inner_strides) for consecutive runs along the
  // innermost dimension covering flat indices [begin, end).
  template <class Body>
  void walk(char* const base[N], const int itemsizes[N], int64_t begin, int64_t end,
            Body& body) const {
    int64_t index[kMaxDims];
    char* ptr[N];
    locate_flat_index(N, ndim, shape, strides[0], itemsizes, base, begin, index, ptr);
    int64_t inner[N];
    for (int k = 0; k < N; ++k) inner[k] = strides[k][ndim - 1];
    const int last = ndim - 1;
    int64_t pos = begin;
    while (pos < end) {
      const int64_t len = std::min(shape[last] - index[last], end - pos);
      body(ptr, len, inner);
      pos += len;
      for (int k = 0; k < N; ++k) ptr[k] += len * inner[k] * itemsizes[k];
      index[last] += len;
      for (int d = last; d > 0 && index[d] == shape[d]; --d) {
        index[d] = 0;
        ++index[d - 1];
        for (int k = 0; k < N; ++k)
          ptr[k] += (strides[k][d - 1] - shape[d] * strides[k][d]) * itemsizes[k];
      }
    }
  }

  // Splits [0, size) into equal slices (slice_count of them, boundaries on
  // 64-element multiples) and walks each on the pool. make_body(slice)
  // returns the body for one slice; its finish() runs when the slice ends.
  template <class MakeBody>
  void run(char* const base[N], const int itemsizes[N], double ns_per_element,
           MakeBody make_body, double min_task_ns = kMinTaskNanoseconds) const {
    if (size == 0) return;
    const int64_t slices = slice_count(size, ns_per_element, min_task_ns);
    parallel_for(slices, [&](int64_t s) {
      const int64_t begin = s == 0 ? 0 : (size * s / slices) & ~int64_t(63);
      const int64_t end = s == slices - 1 ? size : (size * (s + 1) / slices) & ~int64_t(63);
      auto body = make_body();
      walk(base, itemsizes, begin, end, body);
      body.finish();
    });
  }
};

// Copies n bytes to dst with non-temporal stores where the ISA has them.
// src must be 64-byte aligned; dst is aligned by the caller's staging.
inline void stream_bytes(void* dst, const void* src, size_t n) {
  char* d = static_cast<char*>(dst);
  const char* s = static_cast<const char*>(src);
  size_t i = 0;
#if defined(__AVX512F__)
  if ((reinterpret_cast<uintptr_t>(d) & 63) == 0)
    for (; i + 64 <= n; i += 64)
      _mm512_stream_si512(reinterpret_cast<__m512i*>(d + i),
                          _mm512_load_si512(reinterpret_cast<const __m512i*>(s + i)));
#elif defined(__AVX__)
  if ((reinterpret_cast<uintptr_t>(d) & 31) == 0)
    for (; i + 32 <= n; i += 32)
      _mm256_stream_si256(reinterpret_cast<__m256i*>(d + i),
                          _mm256_load_si256(reinterpret_cast<const __m256i*>(s + i)));
#elif defined(__SSE2__)
  if ((reinterpret_cast<uintptr_t>(d) & 15) == 0)
    for (; i + 16 <= n; i += 16)
      _mm_stream_si128(reinterpret_cast<__m128i*>(d + i),
                       _mm_load_si128(reinterpret_cast<const __m128i*>(s + i)));
#endif
  if (i < n) std::memcpy(d + i, s + i, n - i);
}

inline void store_fence() {
#if defined(__SSE2__)
  _mm_sfence();
#endif
}

// One 64-byte line of T as a GCC generic vector, for loops that write whole
// lines straight from registers: the math headers' arithmetic templates take
// it as their T, and each ISA build lowers it to one zmm, two ymm or four
// xmm registers. Streaming a line from registers avoids the staging copy of
// produce() and spreads the stores among the loads and arithmetic: the
// channels-last batch-norm normalization of 51 MB went from 3.9 to 3.15 ms
// (a copy of the same bytes: 2.4 ms).
template <class T> struct LineOf {
  typedef T type __attribute__((vector_size(64)));
};
template <class T> using Line = typename LineOf<T>::type;
template <class T> constexpr int64_t kLineElems = 64 / int64_t(sizeof(T));

template <class T> inline Line<T> load_line(const T* p) {
  Line<T> v;
  std::memcpy(&v, p, sizeof v);
  return v;
}

// value in every lane. value - 0 is value bit for bit (-0 included), and
// compilers fold it into a broadcast; a lane-by-lane fill compiled to one
// masked broadcast per lane.
template <class T> inline Line<T> broadcast_line(T value) { return value - Line<T>{}; }

// Writes a line to 64-byte-aligned dst, past the cache where the ISA has
// non-temporal stores.
template <class T> inline void stream_line(T* dst, Line<T> v) {
#if defined(__AVX512F__)
  _mm512_stream_si512(reinterpret_cast<__m512i*>(dst), reinterpret_cast<__m512i&>(v));
#elif defined(__AVX__)
  __m256i* d = reinterpret_cast<__m256i*>(dst);
  _mm256_stream_si256(d, reinterpret_cast<const __m256i*>(&v)[0]);
  _mm256_stream_si256(d + 1, reinterpret_cast<const __m256i*>(&v)[1]);
#elif defined(__SSE2__)
  __m128i* d = reinterpret_cast<__m128i*>(dst);
  for (int k = 0; k < 4; ++k) _mm_stream_si128(d + k, reinterpret_cast<const __m128i*>(&v)[k]);
#else
  std::memcpy(dst, &v, sizeof v);
#endif
}

// Elements from p to the next 64-byte boundary, at most len.
template <class T> inline int64_t elements_to_line(const T* p, int64_t len) {
  const int64_t misalignment = static_cast<int64_t>(reinterpret_cast<uintptr_t>(p) & 63);
  return std::min<int64_t>(len, ((64 - misalignment) & 63) / int64_t(sizeof(T)));
}

// Produces len contiguous outputs at y. compute(dst, start, count) writes
// outputs [start, start + count) to dst. With stream set, outputs go
// through a cache-resident buffer and are streamed out in 64-byte-aligned
// blocks of kStage bytes; otherwise compute writes y directly.
// Each form of compute is called from one place (the direct writes, head
// or all, from one call): compute is inlined, often with a whole
// activation's vectorized loops, and every call site held a copy of them.
template <int kStage = kStageBytes, class T, class Compute>
inline void produce(T* y, int64_t len, bool stream, Compute&& compute) {
  const int64_t head = stream ? elements_to_line(y, len) : len;
  if (head > 0) compute(y, 0, head);
  if (!stream) return;
  constexpr int64_t kBlock = kStage / sizeof(T);
  alignas(64) T stage[kBlock];
  for (int64_t i = head; i < len; i += kBlock) {
    const int64_t count = std::min(kBlock, len - i);
    compute(stage, i, count);
    stream_bytes(y + i, stage, static_cast<size_t>(count) * sizeof(T));
  }
}

// Produces len contiguous outputs at y, as compute(dst, start, count,
// streamed) writing outputs [start, start + count) to dst, where streamed is
// std::true_type for the part whose lines go past the cache as they are
// computed (write_run<true>; dst is then 64-byte aligned) and
// std::false_type elsewhere. With stream unset, one call writes all.
// As in produce, each form of compute is called from one place.
template <class T, class Compute>
inline void produce_lines(T* y, int64_t len, bool stream, Compute&& compute) {
  const int64_t head = stream ? elements_to_line(y, len) : len;
  if (head > 0) compute(y, 0, head, std::false_type{});
  if (stream) compute(y + head, head, len - head, std::true_type{});
}

// For the lambdas handed to run_core_blocks: each is called once per
// element inside a loop that must vectorize, which it does only once the
// lambda is inlined, and the compiler's size heuristics may decline that.
// They capture by value: a scalar reached through a captured reference is
// a memory load, and a conditional one (keep ? scale : 0) stops the
// vectorizer.
#define FUSEDNN_INLINE_LAMBDA __attribute__((always_inline))

// Elements per block that run_core_blocks tests at once.
constexpr int kCoreBlock = 64;

// out[k] = value(k) for k in [0, count), a line at a time: each line of
// out is computed into registers, then streamed past the cache where
// `stream` is set (out then 64-byte aligned) or stored. Streamed one line
// at a time, the stores trickle out between stretches of arithmetic, and
// the memory traffic overlaps the arithmetic. Staged through a 1 KiB
// buffer instead, 16 lines leave in a burst that stalls the core: against
// that, float32 activations of 2^25 elements (2 threads, medians of 15
// paired calls) ran 7-23% faster where their arithmetic is heavy (gelu
// forward 0.376 -> 0.326 ns per element, softplus backward 0.227 -> 0.184)
// and within 3% where it is light (relu, hardtanh). The partial last line
// takes ordinary stores. With `stream` a run-time value, one copy of the
// arithmetic serves streamed and cached outputs alike.
template <class T, class Value>
inline void write_lines(T* out, int64_t count, bool stream, Value value) {
  constexpr int64_t kLine = kLineElems<T>;
  int64_t k = 0;
  for (; k + kLine <= count; k += kLine) {
    alignas(64) T line[kLine];
#pragma omp simd
    for (int64_t j = 0; j < kLine; ++j) line[j] = value(k + j);
    // Cached stores fall through: a light activation's line is a few
    // instructions, and jumping around them cost float16 hardtanh 10%.
    if (__builtin_expect(stream, false)) {
      stream_line(out + k, load_line(line));
    } else {
      std::memcpy(out + k, line, sizeof line);
    }
  }
  const int64_t done = k;
  // Fewer than a line remain; said so in the bound, since GCC otherwise
  // finds paths (a block of a constant count, inlined) on which it reports
  // the loop as running 2^62 times (-Waggressive-loop-optimizations).
  const int64_t rest = std::min(count - done, kLine - 1);
#pragma omp simd
  for (int64_t j = 0; j < rest; ++j) out[done + j] = value(done + j);
}

// out[k] = value(k) for k in [0, count): with kStream, write_lines
// streaming every whole line (out 64-byte aligned); otherwise one
// vectorized loop.
template <bool kStream, class T, class Value>
inline void write_run(T* out, int64_t count, Value value) {
  if constexpr (kStream) {
    write_lines(out, count, true, value);
  } else {
#pragma omp simd
    for (int64_t j = 0; j < count; ++j) out[j] = value(j);
  }
}

// Whether arg(at + j) lies in [-bound, bound] for every j < kCoreBlock
// (NaN lies outside). With AVX-512, a line at a time: |arg| compared into a
// lane mask, the masks or-ed and tested once per block. Written as an int
// reduction, the test compiled to or-ed lane vectors folded across their
// lanes at the end of each block, about ten more instructions per block:
// against that, the float32 core loops of silu, sigmoid, tanh and mish (16K
// elements, one core, data in cache) ran 7-10% faster this way, gelu 2-3%.
template <class Arg> inline bool core_block_inside(Arg arg, int64_t at, float bound) {
#if defined(__AVX512F__)
  if constexpr (std::is_same_v<std::decay_t<decltype(arg(at))>, float>) {
    constexpr int kLine = int(kLineElems<float>);
    const __m512 limit = _mm512_set1_ps(bound);
    __mmask16 outside = 0;
    for (int l = 0; l < kCoreBlock; l += kLine) {
      alignas(64) float line[kLine];
#pragma omp simd
      for (int j = 0; j < kLine; ++j) line[j] = arg(at + l + j);
      outside |= _mm512_cmp_ps_mask(_mm512_abs_ps(_mm512_load_ps(line)), limit, _CMP_NLE_UQ);
    }
    return outside == 0;
  } else
#endif
  {
    int outside = 0;
#pragma omp simd reduction(| : outside)
    for (int j = 0; j < kCoreBlock; ++j) outside |= !(std::fabs(arg(at + j)) <= bound);
    return outside == 0;
  }
}

// out[k] = full(k) for k in [0, count), where blocks of kCoreBlock whose
// arguments arg(k) all lie in [-bound, bound] (NaN lies outside) take
// core(k) instead: a cheaper evaluation that equals full(k) there, so the
// blocking decides speed, never bits. Each loop vectorizes; only the
// choice between them branches. With kLines the loops are
// write_lines, streaming where `stream` is set; otherwise write_run's
// single loops.
// The callables are taken by value, so that once inlined their captures
// are locals the compiler keeps in registers rather than reloads through a
// reference that the stores to out might alias.
// With a second core evaluation, alternate_core, taken instead of core
// where `alternate` is set (the half types' cores: see activation_run):
// one more loop for the blocks inside the bound, while the rarer blocks
// beyond it share full's loop, which must then equal alternate_core inside
// the bound where `alternate` is set.
template <bool kLines, class T, class Arg, class Core, class AlternateCore, class Full>
inline void run_core_blocks(T* out, int64_t count, float bound, Arg arg, Core core,
                            AlternateCore alternate_core, bool alternate, Full full, bool stream) {
  const auto write = [stream](T* dst, int64_t n, auto value) FUSEDNN_INLINE_LAMBDA {
    if constexpr (kLines) {
      write_lines(dst, n, stream, value);
    } else {
      write_run<false>(dst, n, value);
    }
  };
  int64_t i = 0;
  for (; i + kCoreBlock <= count; i += kCoreBlock) {
    const int64_t at = i;
    if (!core_block_inside(arg, at, bound)) {
      write(out + at, kCoreBlock, [=](int64_t j) FUSEDNN_INLINE_LAMBDA { return full(at + j); });
    } else if (!alternate) {
      write(out + at, kCoreBlock, [=](int64_t j) FUSEDNN_INLINE_LAMBDA { return core(at + j); });
    } else {
      write(out + at, kCoreBlock,
            [=](int64_t j) FUSEDNN_INLINE_LAMBDA { return alternate_core(at + j); });
    }
  }
  const int64_t done = i;
  write(out + done, count - done, [=](int64_t j) FUSEDNN_INLINE_LAMBDA { return full(done + j); });
}

// run_core_blocks with core alone: `alternate` false folds the second loop away.
template <bool kLines = false, class T, class Arg, class Core, class Full>
inline void run_core_blocks(T* out, int64_t count, float bound, Arg arg, Core core, Full full,
                            bool stream = kLines) {
  run_core_blocks<kLines>(out, count, bound, arg, core, core, false, full, stream);
}

}  // namespace FUSEDNN_ISA
}  // namespace cpu
}  // namespace fusednn
