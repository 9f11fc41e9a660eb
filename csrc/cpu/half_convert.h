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
// integer arithmetic of float_to_bfloat16 on 16 lanes, narrowed by
// vpmovdw.
inline __mmask16 first_lanes(int64_t n) { return static_cast<__mmask16>((1u << n) - 1); }

inline void widen(const Float16* src, float* dst, int64_t n) {
  int64_t i = 0;
  for (; i + 16 <= n; i += 16)
    _mm512_storeu_ps(dst + i, _mm512_cvtph_ps(_mm256_loadu_si256(
                                  reinterpret_cast<const __m256i*>(src + i))));
  if (i < n) {
    const __mmask16 k = first_lanes(n - i);
    _mm512_mask_storeu_ps(dst + i, k, _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(k, src + i)));
  }
}

inline void narrow(const float* src, Float16* dst, int64_t n) {
  constexpr int kRound = _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC;
  int64_t i = 0;
  for (; i + 16 <= n; i += 16)
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst + i),
                        _mm512_cvtps_ph(_mm512_loadu_ps(src + i), kRound));
  if (i < n) {
    const __mmask16 k = first_lanes(n - i);
    _mm256_mask_storeu_epi16(dst + i, k, _mm512_cvtps_ph(_mm512_maskz_loadu_ps(k, src + i), kRound));
  }
}

inline __m512 bfloat16_lanes_to_float(__m256i b) {
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(b), 16));
}

inline void widen(const BFloat16* src, float* dst, int64_t n) {
  int64_t i = 0;
  for (; i + 16 <= n; i += 16)
    _mm512_storeu_ps(dst + i, bfloat16_lanes_to_float(_mm256_loadu_si256(
                                  reinterpret_cast<const __m256i*>(src + i))));
  if (i < n) {
    const __mmask16 k = first_lanes(n - i);
    _mm512_mask_storeu_ps(dst + i, k, bfloat16_lanes_to_float(_mm256_maskz_loadu_epi16(k, src + i)));
  }
}

// float_to_bfloat16 of 16 floats, in the low halves of 32-bit lanes.
inline __m512i float_lanes_to_bfloat16(__m512 f) {
  const __m512i u = _mm512_castps_si512(f);
  const __m512i high = _mm512_srli_epi32(u, 16);
  const __m512i odd = _mm512_and_si512(high, _mm512_set1_epi32(1));
  const __m512i rounded =
      _mm512_srli_epi32(_mm512_add_epi32(_mm512_add_epi32(u, _mm512_set1_epi32(0x7fff)), odd), 16);
  const __m512i nan = _mm512_or_si512(high, _mm512_set1_epi32(0x40));
  const __mmask16 is_nan = _mm512_cmpgt_epu32_mask(
      _mm512_and_si512(u, _mm512_set1_epi32(0x7fffffff)), _mm512_set1_epi32(0x7f800000));
  return _mm512_mask_blend_epi32(is_nan, rounded, nan);
}

inline void narrow(const float* src, BFloat16* dst, int64_t n) {
  int64_t i = 0;
  for (; i + 16 <= n; i += 16)
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst + i),
                        _mm512_cvtepi32_epi16(float_lanes_to_bfloat16(_mm512_loadu_ps(src + i))));
  if (i < n) {
    const __mmask16 k = first_lanes(n - i);
    _mm512_mask_cvtepi32_storeu_epi16(dst + i, k,
                                      float_lanes_to_bfloat16(_mm512_maskz_loadu_ps(k, src + i)));
  }
}
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

// Narrows n results to dst, 64-byte aligned, streaming whole lines past
// the cache (each narrowed into a register-sized local first) and storing
// the partial last line.
template <class S> inline void narrow_streamed(const float* src, S* dst, int64_t n) {
  constexpr int64_t kLine = 64 / int64_t(sizeof(S));
  int64_t i = 0;
  for (; i + kLine <= n; i += kLine) {
    alignas(64) S line[kLine];
    narrow(src + i, line, kLine);
    uint16_t* d = reinterpret_cast<uint16_t*>(dst + i);
    stream_line(d, load_line(reinterpret_cast<const uint16_t*>(line)));
  }
  narrow(src + i, dst + i, n - i);
}

}  // namespace FUSEDNN_ISA
}  // namespace cpu
}  // namespace fusednn
