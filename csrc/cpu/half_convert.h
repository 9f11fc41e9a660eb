// Conversions between the half-precision storage types and float32 over
// contiguous runs, and the staged loop that the half-precision elementwise
// kernels share: widen a block of inputs to float32, run the float32 loop
// on it, narrow the results once. The float32 loops are the very code the
// float32 kernels run, so a half-precision result is the float32 kernel's
// result rounded once to the storage type. Compiled once per ISA, like
// elementwise.h: float16 uses the F16C instructions where the ISA has them
// (bit for bit the scalar conversions of fusednn/half.h, NaN payloads
// included); bfloat16 is integer arithmetic that the compiler vectorizes.
#pragma once

#include <algorithm>
#include <cstdint>

#if defined(__F16C__) || defined(__AVX512F__)
#include <immintrin.h>
#endif

#include "cpu/elementwise.h"
#include "fusednn/half.h"

#if !defined(FUSEDNN_ISA)
#error "cpu/half_convert.h belongs to the per-ISA kernel files (FUSEDNN_ISA undefined)"
#endif

namespace fusednn {
namespace cpu {
namespace FUSEDNN_ISA {

// Elements per staged block: two float32 blocks of this size stay in L1.
constexpr int64_t kHalfBlock = 256;

inline void widen(const Float16* src, float* dst, int64_t n) {
  int64_t i = 0;
#if defined(__AVX512F__)
  for (; i + 16 <= n; i += 16)
    _mm512_storeu_ps(dst + i, _mm512_cvtph_ps(_mm256_loadu_si256(
                                  reinterpret_cast<const __m256i*>(src + i))));
#elif defined(__F16C__)
  for (; i + 8 <= n; i += 8)
    _mm256_storeu_ps(dst + i,
                     _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(src + i))));
#endif
  for (; i < n; ++i) dst[i] = half_to_float(src[i].bits);
}

inline void narrow(const float* src, Float16* dst, int64_t n) {
  int64_t i = 0;
#if defined(__AVX512F__)
  for (; i + 16 <= n; i += 16)
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst + i),
                        _mm512_cvtps_ph(_mm512_loadu_ps(src + i),
                                        _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
#elif defined(__F16C__)
  for (; i + 8 <= n; i += 8)
    _mm_storeu_si128(reinterpret_cast<__m128i*>(dst + i),
                     _mm256_cvtps_ph(_mm256_loadu_ps(src + i),
                                     _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
#endif
  for (; i < n; ++i) dst[i].bits = float_to_half(src[i]);
}

inline void widen(const BFloat16* src, float* dst, int64_t n) {
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) dst[i] = bfloat16_to_float(src[i].bits);
}

inline void narrow(const float* src, BFloat16* dst, int64_t n) {
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) dst[i].bits = float_to_bfloat16(src[i]);
}

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

// Produces count half-precision outputs at dst from K half-precision input
// runs: each block of kHalfBlock elements of every input is widened into a
// float32 buffer, compute(out, ins, n) writes n float32 results from those
// buffers, and the results are narrowed into dst, streamed with kStream
// (dst then 64-byte aligned; blocks keep the alignment).
template <bool kStream, int K, class S, class Compute>
inline void staged_run(S* dst, int64_t count, const S* const (&inputs)[K], Compute&& compute) {
  alignas(64) float in[K][kHalfBlock];
  alignas(64) float out[kHalfBlock];
  for (int64_t b = 0; b < count; b += kHalfBlock) {
    const int64_t n = std::min(kHalfBlock, count - b);
    const float* ins[K];
    for (int k = 0; k < K; ++k) {
      widen(inputs[k] + b, in[k], n);
      ins[k] = in[k];
    }
    compute(out, ins, n);
    if constexpr (kStream) {
      narrow_streamed(out, dst + b, n);
    } else {
      narrow(out, dst + b, n);
    }
  }
}

}  // namespace FUSEDNN_ISA
}  // namespace cpu
}  // namespace fusednn
