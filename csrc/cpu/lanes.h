// One vector register of float lanes (FloatLanes), for the forms of the
// header math written for float or a vector alike (fusednn/activations.h:
// GeluErf::forward_core_pieces), which the CPU loops evaluate a vector at
// a time where the ISA has one: AVX-512 (16 lanes) and AVX2 (8 lanes). The
// operations are those of the scalar form, each rounding lane by lane as
// the scalar one does, so both give the same bits; the one without a
// scalar twin in the vectorizer's reach is lookup16, a coefficient per
// lane from a 16-entry table: a permute of the table held in registers,
// where the vectorized scalar form would gather from memory or, as GCC
// does, not vectorize at all. Found by argument-dependent lookup from the
// header's templates. Compiled once per ISA, like elementwise.h.
#pragma once

#include <cstdint>

#if defined(__AVX2__) || defined(__AVX512F__)
#include <immintrin.h>
#endif

#if !defined(FUSEDNN_ISA)
#error "cpu/lanes.h belongs to the per-ISA kernel files (FUSEDNN_ISA undefined)"
#endif

namespace fusednn {
namespace cpu {
namespace FUSEDNN_ISA {

#if defined(__AVX512F__)
#define FUSEDNN_FLOAT_LANES 1
struct FloatLanes {
  static constexpr int kCount = 16;
  __m512 v;
  explicit FloatLanes(__m512 value) : v(value) {}
  explicit FloatLanes(float value) : v(_mm512_set1_ps(value)) {}
  static FloatLanes load(const float* p) { return FloatLanes(_mm512_load_ps(p)); }
  void store(float* p) const { _mm512_store_ps(p, v); }
};
struct LaneBits {
  __m512i v;
};
inline FloatLanes operator-(FloatLanes a, FloatLanes b) {
  return FloatLanes(_mm512_sub_ps(a.v, b.v));
}
inline FloatLanes fmadd(FloatLanes a, FloatLanes b, FloatLanes c) {
  return FloatLanes(_mm512_fmadd_ps(a.v, b.v, c.v));
}
inline FloatLanes magnitude(FloatLanes x) { return FloatLanes(_mm512_abs_ps(x.v)); }
inline LaneBits bits_of(FloatLanes x) { return {_mm512_castps_si512(x.v)}; }
// vpermps uses an index's low 4 bits: table[index mod 16].
inline FloatLanes lookup16(const float* table, LaneBits index) {
  return FloatLanes(_mm512_permutexvar_ps(index.v, _mm512_loadu_ps(table)));
}
// max returns its second operand where both are zeros or either is NaN.
inline FloatLanes keep_nonnegative(FloatLanes x) {
  return FloatLanes(_mm512_max_ps(_mm512_set1_ps(-0.0f), x.v));
}
#elif defined(__AVX2__)
#define FUSEDNN_FLOAT_LANES 1
struct FloatLanes {
  static constexpr int kCount = 8;
  __m256 v;
  explicit FloatLanes(__m256 value) : v(value) {}
  explicit FloatLanes(float value) : v(_mm256_set1_ps(value)) {}
  // Two 16-byte loads: GCC's generic tuning copies a vector's inputs into
  // the aligned buffer that p is in two 16-byte halves, and a 32-byte load
  // of them cannot take its data from those stores (a stall of about 15
  // cycles per vector: the gelu forward's loop ran 2.5x slower).
  static FloatLanes load(const float* p) {
    return FloatLanes(_mm256_insertf128_ps(_mm256_castps128_ps256(_mm_load_ps(p)),
                                           _mm_load_ps(p + 4), 1));
  }
  void store(float* p) const { _mm256_store_ps(p, v); }
};
struct LaneBits {
  __m256i v;
};
inline FloatLanes operator-(FloatLanes a, FloatLanes b) {
  return FloatLanes(_mm256_sub_ps(a.v, b.v));
}
inline FloatLanes fmadd(FloatLanes a, FloatLanes b, FloatLanes c) {
  return FloatLanes(_mm256_fmadd_ps(a.v, b.v, c.v));
}
inline FloatLanes magnitude(FloatLanes x) {
  return FloatLanes(_mm256_and_ps(x.v, _mm256_castsi256_ps(_mm256_set1_epi32(0x7fffffff))));
}
inline LaneBits bits_of(FloatLanes x) { return {_mm256_castps_si256(x.v)}; }
// Each half of the table by vpermps (an index's low 3 bits), the half
// chosen by bit 3, shifted into the sign that blendv reads.
inline FloatLanes lookup16(const float* table, LaneBits index) {
  const __m256 low = _mm256_permutevar8x32_ps(_mm256_loadu_ps(table), index.v);
  const __m256 high = _mm256_permutevar8x32_ps(_mm256_loadu_ps(table + 8), index.v);
  return FloatLanes(_mm256_blendv_ps(low, high, _mm256_castsi256_ps(_mm256_slli_epi32(index.v, 28))));
}
inline FloatLanes keep_nonnegative(FloatLanes x) {
  return FloatLanes(_mm256_max_ps(_mm256_set1_ps(-0.0f), x.v));
}
#endif

}  // namespace FUSEDNN_ISA
}  // namespace cpu
}  // namespace fusednn
