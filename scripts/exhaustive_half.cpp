// Checks the scalar half-precision conversions of fusednn/half.h against
// the x86 conversion instructions on every input: float16 -> float32 against
// vcvtph2ps (all 65,536), float32 -> float16 against vcvtps2ph (all 2^32,
// round to nearest even), and float32 -> bfloat16 against vcvtneps2bf16
// where the CPU has AVX-512 BF16 (all 2^32; that instruction flushes
// subnormal inputs to zero, so those are counted apart, not as errors).
// The CPU kernels use the scalar code on the generic path and F16C on the
// others, so agreement here is what makes both give the same bits.
//   g++ -O2 -mf16c -Icsrc/include scripts/exhaustive_half.cpp -o /tmp/eh && /tmp/eh
#include <immintrin.h>

#include <cstdio>
#include <cstring>

#include "fusednn/half.h"

using fusednn::bits_of;
using fusednn::float_from_bits;

__attribute__((target("avx512bf16,avx512f,avx512vl"))) static uint16_t hardware_bfloat16(float f) {
  const __m128bh r = _mm_cvtneps_pbh(_mm_set1_ps(f));
  uint16_t out;
  std::memcpy(&out, &r, sizeof out);
  return out;
}

int main() {
  long widen_errors = 0;
  for (uint32_t h = 0; h < 65536; ++h)
    if (bits_of(fusednn::half_to_float(uint16_t(h))) != bits_of(_cvtsh_ss(uint16_t(h)))) ++widen_errors;
  const bool has_bf16 = __builtin_cpu_supports("avx512bf16");
  long half_errors = 0, bf16_errors = 0, bf16_flushed = 0;
  for (uint64_t u = 0; u < (uint64_t(1) << 32); ++u) {
    const float f = float_from_bits(uint32_t(u));
    if (fusednn::float_to_half(f) != _cvtss_sh(f, _MM_FROUND_TO_NEAREST_INT)) ++half_errors;
    if (has_bf16 && fusednn::float_to_bfloat16(f) != hardware_bfloat16(f)) {
      if (((u >> 23) & 0xff) == 0) ++bf16_flushed;
      else ++bf16_errors;
    }
  }
  std::printf("float16 -> float32: %ld of 65536 differ from vcvtph2ps\n", widen_errors);
  std::printf("float32 -> float16: %ld of 2^32 differ from vcvtps2ph\n", half_errors);
  if (has_bf16)
    std::printf("float32 -> bfloat16: %ld of 2^32 differ from vcvtneps2bf16 (and %ld subnormal "
                "inputs that it flushes to zero)\n", bf16_errors, bf16_flushed);
  else
    std::printf("float32 -> bfloat16: no AVX-512 BF16 on this CPU\n");
  return widen_errors || half_errors || bf16_errors ? 1 : 0;
}
