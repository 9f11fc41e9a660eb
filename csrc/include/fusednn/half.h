// The half-precision storage types, float16 (IEEE binary16) and bfloat16
// (the top half of a float32), and their exact conversions to and from
// float32. Kernels load half inputs as float32, compute with the float32
// math, and round once to the storage type with float_to_half or
// float_to_bfloat16: round to nearest, ties to even, subnormals kept,
// overflow to infinity. NaN stays NaN of the same sign, made quiet, with
// the top bits of its payload: the rule of the x86 conversion instructions
// (vcvtps2ph, vcvtph2ps), so the scalar and the F16C paths give the same
// bits for every input. The AVX-512 BF16 instruction (vcvtneps2bf16) is not
// used: it flushes float32 subnormals to zero instead of rounding them.
//
// Written with integer selects rather than branches, so that compilers
// vectorize loops over them on paths without conversion instructions.
#pragma once

#include <cstdint>

#include "fusednn/config.h"

namespace fusednn {

// The 16 bits of a float16 or bfloat16 element: kernels see storage, never
// arithmetic, so neither type has operators.
struct Float16 {
  uint16_t bits;
};
struct BFloat16 {
  uint16_t bits;
};

FUSEDNN_HD float half_to_float(uint16_t h) {
  const uint32_t sign = uint32_t(h & 0x8000u) << 16;
  const uint32_t magnitude = uint32_t(h & 0x7fffu) << 13;  // exponent and fraction in place
  const uint32_t exponent = magnitude & 0x0f800000u;
  // Rebias the exponent from 15 to 127; infinity and NaN (exponent 31)
  // go to exponent 255.
  uint32_t normal = magnitude + 0x38000000u;
  normal = exponent == 0x0f800000u ? normal + 0x38000000u : normal;
  // A signaling NaN comes out quiet, as from vcvtph2ps.
  normal = (h & 0x7fffu) > 0x7c00u ? normal | 0x00400000u : normal;
  // Zero and subnormals: m * 2^-24 = (2^-14 + m * 2^-24) - 2^-14, where
  // the first term is the float with exponent -14 and fraction m; exact.
  const float subnormal = float_from_bits(magnitude + 0x38800000u) - float_from_bits(0x38800000u);
  const uint32_t result = exponent == 0 ? bits_of(subnormal) : normal;
  return float_from_bits(result | sign);
}

FUSEDNN_HD uint16_t float_to_half(float f) {
  const uint32_t u = bits_of(f);
  const uint32_t sign = (u >> 16) & 0x8000u;
  const uint32_t a = u & 0x7fffffffu;
  // Normal results: rebias the exponent (127 -> 15, adding -112 << 23 mod
  // 2^32) and round the 13 dropped bits to nearest even by adding 0xfff
  // plus the kept lowest bit; a carry out of the fraction bumps the
  // exponent, and past 65504 lands on infinity (0x7c00).
  const uint32_t normal = (a + 0xc8000fffu + ((a >> 13) & 1u)) >> 13;
  // Below 2^-14 the result is subnormal (or zero): adding 0.5 puts the
  // float's value in units of 2^-24 into the low fraction bits, rounded to
  // nearest even by the float addition itself.
  const uint32_t subnormal = bits_of(float_from_bits(a) + 0.5f) - 0x3f000000u;
  const uint32_t nan = 0x7e00u | ((a >> 13) & 0x3ffu);
  uint32_t h = a < 0x38800000u ? subnormal : normal;
  h = a >= 0x47800000u ? 0x7c00u : h;  // 2^16 and up, infinity included
  h = a > 0x7f800000u ? nan : h;
  return static_cast<uint16_t>(h | sign);
}

FUSEDNN_HD float bfloat16_to_float(uint16_t b) { return float_from_bits(uint32_t(b) << 16); }

FUSEDNN_HD uint16_t float_to_bfloat16(float f) {
  const uint32_t u = bits_of(f);
  // Round the 16 dropped bits to nearest even; the same carry handles
  // subnormals, the step from one exponent to the next, and overflow to
  // infinity, because bfloat16 keeps float32's exponent.
  const uint32_t rounded = (u + 0x7fffu + ((u >> 16) & 1u)) >> 16;
  const uint32_t nan = (u >> 16) | 0x40u;
  return static_cast<uint16_t>((u & 0x7fffffffu) > 0x7f800000u ? nan : rounded);
}

// The float32 nearest to a * b on the side of the exact product whose last
// significand bit is 1 (round to odd) where the product is not exact and
// finite. Rounded on to a type of at most 22 significand bits (float16,
// bfloat16), it gives the single rounding of the exact product: the odd
// last bit stands for the bits that the float32 rounding dropped, so no
// tie can appear that the exact product does not have.
FUSEDNN_HD float multiply_to_odd(float a, float b) {
  const float p = a * b;
  const float error = fmadd(a, b, -p);  // exact: p + error == a * b
  const uint32_t u = bits_of(p);
  const bool inexact = error != 0.0f && (u & 0x7f800000u) != 0x7f800000u;
  // Toward the exact product: up in magnitude when the error has p's sign
  // or p underflowed to zero (whose sign is the product's).
  const bool up = p == 0.0f || (error > 0.0f) == (p > 0.0f);
  const uint32_t toward = up ? u + 1 : u - 1;
  return float_from_bits(inexact && (u & 1u) == 0 ? toward : u);
}

// The float32 nearest to d on the side whose last significand bit is 1,
// where d is not exactly a float32 (round to odd), for the same single
// rounding from double to a half type.
FUSEDNN_HD float double_to_odd_float(double d) {
  const float f = static_cast<float>(d);
  const uint32_t u = bits_of(f);
  const bool inexact = static_cast<double>(f) != d && (u & 0x7f800000u) != 0x7f800000u;
  const double magnitude = d < 0 ? -d : d;
  const double rounded = f < 0.0f ? -static_cast<double>(f) : static_cast<double>(f);
  const uint32_t toward = rounded < magnitude ? u + 1 : u - 1;  // sign and magnitude bits
  return float_from_bits(inexact && (u & 1u) == 0 ? toward : u);
}

// Load and store between a storage type and its compute type: float32 for
// the half types, the type itself otherwise.
template <class T> struct Storage {
  using Compute = T;
  static FUSEDNN_HD Compute load(T v) { return v; }
  static FUSEDNN_HD T store(Compute v) { return v; }
  static FUSEDNN_HD T store_double(double v) { return static_cast<T>(v); }
};
template <> struct Storage<Float16> {
  using Compute = float;
  static FUSEDNN_HD float load(Float16 v) { return half_to_float(v.bits); }
  static FUSEDNN_HD Float16 store(float v) { return Float16{float_to_half(v)}; }
  // One rounding from a double (a float64 sum, say).
  static FUSEDNN_HD Float16 store_double(double v) { return store(double_to_odd_float(v)); }
};
template <> struct Storage<BFloat16> {
  using Compute = float;
  static FUSEDNN_HD float load(BFloat16 v) { return bfloat16_to_float(v.bits); }
  static FUSEDNN_HD BFloat16 store(float v) { return BFloat16{float_to_bfloat16(v)}; }
  static FUSEDNN_HD BFloat16 store_double(double v) { return store(double_to_odd_float(v)); }
};

}  // namespace fusednn
