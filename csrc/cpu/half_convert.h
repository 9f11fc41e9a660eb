// Conversions between the half-precision storage types and float32 over
// contiguous runs, for the half-precision elementwise kernels, which widen
// a block of inputs to float32, run the float32 loop on it and narrow the
// results once. The float32 loops are the very code the float32 kernels
// run, so a half-precision result is the float32 kernel's result rounded
// once to the storage type. Compiled once per ISA, like
// elementwise.h: float16 uses the F16C instructions where the ISA has them
// (bit for bit the scalar conversions of fusednn/half.h, NaN payloads
// included); bfloat16 is integer arithmetic that the compiler vectorizes.
#pragma once

#include <algorithm>
#include <cstdint>
#include <cstring>

#if defined(__F16C__) || defined(__AVX512F__)
#include <immintrin.h>
#endif

#include "cpu/array.h"
#include "cpu/elementwise.h"
#include "fusednn/half.h"

#if !defined(FUSEDNN_ISA)
#error "cpu/half_convert.h belongs to the per-ISA kernel files (FUSEDNN_ISA undefined)"
#endif

namespace fusednn {
namespace cpu {
namespace FUSEDNN_ISA {

// Calls fn(S{}) with S the storage type of dtype d: the kernels of every
// family pick their storage type this way.
template <class Fn> void visit_storage(DType d, Fn&& fn) {
  switch (d) {
    case DType::float64: fn(double{}); return;
    case DType::float16: fn(Float16{}); return;
    case DType::bfloat16: fn(BFloat16{}); return;
    default: fn(float{}); return;
  }
}

// Elements per staged block: two float32 blocks of this size stay in L1.
constexpr int64_t kHalfBlock = 256;

#if defined(__AVX512F__) && defined(__AVX512BW__)
// AVX-512: whole vectors, then one masked vector for the rest, so that a
// conversion is a few instructions wherever it is inlined (compiled from
// the scalar formulas, each loop came with vectorized and scalar ends of
// its own, most of the code of every loop that converts). bfloat16 is the
// integer arithmetic of float_to_bfloat16 on 16 lanes.
inline __mmask16 first_lanes(int64_t n) { return static_cast<__mmask16>((1u << n) - 1); }

// 16 stored values (a 32-byte vector) to float32 lanes, and back.
inline __m512 widen_lanes(__m256i h, Float16) { return _mm512_cvtph_ps(h); }
inline __m512 bfloat16_lanes_to_float(__m256i b) {
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(b), 16));
}
inline __m512 widen_lanes(__m256i b, BFloat16) { return bfloat16_lanes_to_float(b); }

// float_to_bfloat16 of 16 floats, in the high halves of their 32-bit
// lanes: u + 0x7fff plus the kept lowest bit (bit 16) rounds the dropped
// half to nearest even, and a NaN keeps its top bits with the quiet bit
// (bit 22) set. Five instructions: the carry-in as a masked add and NaN
// as vfpclassps, where the scalar formula's shifts and compares took nine.
inline __m512i bfloat16_in_high_halves(__m512 f) {
  const __m512i u = _mm512_castps_si512(f);
  const __mmask16 odd = _mm512_test_epi32_mask(u, _mm512_set1_epi32(0x10000));
  const __m512i half_down = _mm512_add_epi32(u, _mm512_set1_epi32(0x7fff));
  const __m512i rounded = _mm512_mask_add_epi32(half_down, odd, half_down, _mm512_set1_epi32(1));
  const __mmask16 is_nan = _mm512_fpclass_ps_mask(f, 0x81);  // quiet or signaling NaN
  return _mm512_mask_or_epi32(rounded, is_nan, u, _mm512_set1_epi32(0x00400000));
}

// The same in the low halves.
inline __m512i float_lanes_to_bfloat16(__m512 f) {
  return _mm512_srli_epi32(bfloat16_in_high_halves(f), 16);
}

// Whether the CPU has AVX-512 BF16, whose vcvtneps2bf16 and
// vcvtne2ps2bf16 round as float_to_bfloat16 does (to nearest even, NaN
// quieted the same way) except that they take subnormal inputs as zero.
// They are used where no lane is subnormal, through inline assembly, so
// that the ISA build needs no -mavx512bf16 (which would make the CPU
// dispatch demand it): one instruction per 16 or 32 values where the
// integer rounding takes five per 16 on the two vector ports that 512-bit
// code has, which bounded bfloat16 relu at 2^24 elements to ~65% of a
// copy where float16 (vcvtps2ph) reached ~80%.
inline const bool kHasBFloat16Conversions = [] {
  __builtin_cpu_init();
  return __builtin_cpu_supports("avx512bf16") != 0;
}();
constexpr int kSubnormalClass = 0x20;

inline __m256i narrow_lanes(__m512 f, Float16) {
  return _mm512_cvtps_ph(f, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
}
inline __m256i narrow_lanes(__m512 f, BFloat16) {
  if (kHasBFloat16Conversions && _mm512_fpclass_ps_mask(f, kSubnormalClass) == 0) {
    __m256i rounded;
    asm("vcvtneps2bf16 %1, %0" : "=v"(rounded) : "v"(f));
    return rounded;
  }
  return _mm512_cvtepi32_epi16(float_lanes_to_bfloat16(f));
}

template <class S> inline void widen_lanes_of(const S* src, float* dst, int64_t n) {
  int64_t i = 0;
  for (; i + 16 <= n; i += 16)
    _mm512_storeu_ps(dst + i, widen_lanes(_mm256_loadu_si256(
                                  reinterpret_cast<const __m256i*>(src + i)), S{}));
  if (i < n) {
    const __mmask16 k = first_lanes(n - i);
    _mm512_mask_storeu_ps(dst + i, k, widen_lanes(_mm256_maskz_loadu_epi16(k, src + i), S{}));
  }
}

template <class S> inline void narrow_lanes_of(const float* src, S* dst, int64_t n) {
  int64_t i = 0;
  for (; i + 16 <= n; i += 16)
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst + i),
                        narrow_lanes(_mm512_loadu_ps(src + i), S{}));
  if (i < n) {
    const __mmask16 k = first_lanes(n - i);
    _mm256_mask_storeu_epi16(dst + i, k, narrow_lanes(_mm512_maskz_loadu_ps(k, src + i), S{}));
  }
}
inline void widen(const Float16* src, float* dst, int64_t n) { widen_lanes_of(src, dst, n); }
inline void widen(const BFloat16* src, float* dst, int64_t n) { widen_lanes_of(src, dst, n); }
inline void narrow(const float* src, Float16* dst, int64_t n) { narrow_lanes_of(src, dst, n); }
inline void narrow(const float* src, BFloat16* dst, int64_t n) { narrow_lanes_of(src, dst, n); }
#else
#if defined(__F16C__)
// The scalar ends of the vector loops below, fewer than a vector's
// elements: out of line and left scalar, since inlined and vectorized on
// their own they were most of the code of every loop that converts.
__attribute__((noinline, optimize("no-tree-vectorize"))) inline void widen_tail(
    const Float16* src, float* dst, int64_t n) {
  for (int64_t i = 0; i < n; ++i) dst[i] = half_to_float(src[i].bits);
}
__attribute__((noinline, optimize("no-tree-vectorize"))) inline void narrow_tail(
    const float* src, Float16* dst, int64_t n) {
  for (int64_t i = 0; i < n; ++i) dst[i].bits = float_to_half(src[i]);
}
#endif

inline void widen(const Float16* src, float* dst, int64_t n) {
  int64_t i = 0;
#if defined(__F16C__)
  for (; i + 8 <= n; i += 8)
    _mm256_storeu_ps(dst + i,
                     _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(src + i))));
  if (i < n) widen_tail(src + i, dst + i, n - i);
#else
  for (; i < n; ++i) dst[i] = half_to_float(src[i].bits);
#endif
}

inline void narrow(const float* src, Float16* dst, int64_t n) {
  int64_t i = 0;
#if defined(__F16C__)
  for (; i + 8 <= n; i += 8)
    _mm_storeu_si128(reinterpret_cast<__m128i*>(dst + i),
                     _mm256_cvtps_ph(_mm256_loadu_ps(src + i),
                                     _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
  if (i < n) narrow_tail(src + i, dst + i, n - i);
#else
  for (; i < n; ++i) dst[i].bits = float_to_half(src[i]);
#endif
}

inline void widen(const BFloat16* src, float* dst, int64_t n) {
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) dst[i] = bfloat16_to_float(src[i].bits);
}

inline void narrow(const float* src, BFloat16* dst, int64_t n) {
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) dst[i].bits = float_to_bfloat16(src[i]);
}
#endif

// For T = float, the same calls as plain copies, so that loops written for
// any storage type need no special case.
inline void widen(const float* src, float* dst, int64_t n) { std::copy(src, src + n, dst); }
inline void narrow(const float* src, float* dst, int64_t n) { std::copy(src, src + n, dst); }

// ---- lines in registers ----------------------------------------------------
//
// For loops that widen and narrow in registers instead of through float
// buffers: 16 elements of a half type as one Line<float> (elementwise.h),
// and two Line<float> as the 32 elements of one 64-byte line of the half
// type. Bit for bit the conversions of widen and narrow.
constexpr int64_t kHalfLineElems = 32;
// The 64 bytes of one line of a half type, as 32 storage words.
using HalfLine = Line<uint16_t>;

inline Line<float> widen_line(const float* src) { return load_line(src); }

#if defined(__AVX512F__) && defined(__AVX512BW__)
inline Line<float> widen_line(const Float16* src) {
  return reinterpret_cast<Line<float>>(
      _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(src))));
}

inline Line<float> widen_line(const BFloat16* src) {
  return reinterpret_cast<Line<float>>(
      bfloat16_lanes_to_float(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(src))));
}

inline HalfLine narrow_lines(Line<float> low, Line<float> high, Float16) {
  constexpr int kRound = _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC;
  const __m256i a = _mm512_cvtps_ph(reinterpret_cast<__m512>(low), kRound);
  const __m256i b = _mm512_cvtps_ph(reinterpret_cast<__m512>(high), kRound);
  return reinterpret_cast<HalfLine>(_mm512_inserti64x4(_mm512_castsi256_si512(a), b, 1));
}

// Word j of the line is word 2j + 1 of (low, high) rounded: the high
// halves of the 32-bit lanes in order, one vpermt2w for the 32 values
// (where two vpmovdw and an insert were three shuffles).
inline HalfLine narrow_lines(Line<float> low, Line<float> high, BFloat16) {
  if (kHasBFloat16Conversions) {
    const __m512 a = reinterpret_cast<__m512>(low), b = reinterpret_cast<__m512>(high);
    if ((_mm512_fpclass_ps_mask(a, kSubnormalClass) | _mm512_fpclass_ps_mask(b, kSubnormalClass)) ==
        0) {
      __m512i rounded;  // words 0-15 from low, 16-31 from high
      asm("vcvtne2ps2bf16 %2, %1, %0" : "=v"(rounded) : "v"(b), "v"(a));
      return reinterpret_cast<HalfLine>(rounded);
    }
  }
  const __m512i odd_words = _mm512_set_epi16(63, 61, 59, 57, 55, 53, 51, 49, 47, 45, 43, 41, 39,
                                             37, 35, 33, 31, 29, 27, 25, 23, 21, 19, 17, 15, 13,
                                             11, 9, 7, 5, 3, 1);
  return reinterpret_cast<HalfLine>(
      _mm512_permutex2var_epi16(bfloat16_in_high_halves(reinterpret_cast<__m512>(low)), odd_words,
                                bfloat16_in_high_halves(reinterpret_cast<__m512>(high))));
}
#else
template <class S> inline Line<float> widen_line(const S* src) {
  alignas(64) float lanes[16];
  widen(src, lanes, 16);
  return load_line(lanes);
}

template <class S> inline HalfLine narrow_lines(Line<float> low, Line<float> high, S) {
  alignas(64) float lanes[32];
  std::memcpy(lanes, &low, sizeof low);
  std::memcpy(lanes + 16, &high, sizeof high);
  alignas(64) S line[32];
  narrow(lanes, line, 32);
  HalfLine v;
  std::memcpy(&v, line, sizeof v);
  return v;
}
#endif

// A line of 16 floats as two lines of 8 doubles (lanes 0-7 and 8-15).
inline void widen_to_double(Line<float> v, Line<double>& low, Line<double>& high) {
#if defined(__AVX512F__)
  // GCC lowers __builtin_convertvector of 8 floats through xmm halves and
  // inserts; one vcvtps2pd per line here.
  const __m512 lanes = reinterpret_cast<__m512>(v);
  low = reinterpret_cast<Line<double>>(_mm512_cvtps_pd(_mm512_castps512_ps256(lanes)));
  high = reinterpret_cast<Line<double>>(
      _mm512_cvtps_pd(_mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(lanes), 1))));
#else
  low = __builtin_convertvector(__builtin_shufflevector(v, v, 0, 1, 2, 3, 4, 5, 6, 7),
                                Line<double>);
  high = __builtin_convertvector(__builtin_shufflevector(v, v, 8, 9, 10, 11, 12, 13, 14, 15),
                                 Line<double>);
#endif
}

// Writes len outputs of half type S to dst from registers: value(i) is the
// Line<float> of outputs [i, i + 16), two of which are narrowed into each
// 64-byte line; with `stream` the lines from dst's first line boundary go
// past the cache. rest(start, count) writes the outputs that do not fill
// a line (head and tail, fewer than a line each), which value() must not
// be asked for since their inputs may end before a whole vector.
// A short run that starts inside a line is stored, not streamed: its head
// and tail through rest() cost more than the stores save (numpy arrays
// often start 16 bytes past a line, and channels-last runs are 512 long).
constexpr int64_t kMinUnalignedStreamElems = 2048;
template <class S, class Value, class Rest>
inline void write_half_lines(S* dst, int64_t len, bool stream, const Value& value,
                             const Rest& rest) {
  int64_t head = stream ? elements_to_line(dst, len) : 0;
  if (head > 0 && len < kMinUnalignedStreamElems) {
    stream = false;
    head = 0;
  }
  if (head > 0) rest(0, head);
  int64_t i = head;
  for (; i + kHalfLineElems <= len; i += kHalfLineElems) {
    const HalfLine line = narrow_lines(value(i), value(i + 16), S{});
    uint16_t* out = reinterpret_cast<uint16_t*>(dst + i);
    if (stream) {
      stream_line(out, line);
    } else {
      std::memcpy(out, &line, sizeof line);
    }
  }
  if (i < len) rest(i, len - i);
}

// Narrows n results to dst, streaming the whole lines from dst's first
// line boundary past the cache (each narrowed in registers: narrowed into
// memory by two 32-byte stores and read back by one 64-byte load, each
// streamed line stalled on a failed store-to-load forward, and float16
// relu over 2^24 elements on 2 threads took 0.19 ns per element where a
// copy took 0.07) and storing the partial lines at either end.
template <class S> inline void narrow_streamed(const float* src, S* dst, int64_t n) {
  const int64_t head = elements_to_line(dst, n);
  narrow(src, dst, head);
  int64_t i = head;
  for (; i + kHalfLineElems <= n; i += kHalfLineElems)
    stream_line(reinterpret_cast<uint16_t*>(dst + i),
                narrow_lines(load_line(src + i), load_line(src + i + 16), S{}));
  narrow(src + i, dst + i, n - i);
}

// narrow_streamed or narrow, chosen at run time, so that the loops around
// it are compiled once for the streamed and the cached parts of an output.
template <class S>
__attribute__((always_inline)) inline void narrow_to(const float* src, S* dst, int64_t n,
                                                     bool stream) {
  if (stream) {
    narrow_streamed(src, dst, n);
  } else {
    narrow(src, dst, n);
  }
}

}  // namespace FUSEDNN_ISA
}  // namespace cpu
}  // namespace fusednn
