// Portability macros shared by the CPU and CUDA kernels: one spelling for
// "inline on the host, __host__ __device__ under nvcc", and the bit casts and
// fused multiply-adds that the math headers need on both sides.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>

#if defined(__CUDACC__)
#define FUSEDNN_HD __host__ __device__ __forceinline__
#else
// always_inline keeps the per-element math inside the caller's loop, which
// is what lets the compiler vectorize it.
#define FUSEDNN_HD inline __attribute__((always_inline))
#endif

namespace fusednn {

FUSEDNN_HD uint32_t bits_of(float x) {
#if defined(__CUDA_ARCH__)
  return __float_as_uint(x);
#else
  uint32_t u;
  std::memcpy(&u, &x, sizeof u);
  return u;
#endif
}

FUSEDNN_HD uint64_t bits_of(double x) {
#if defined(__CUDA_ARCH__)
  return static_cast<uint64_t>(__double_as_longlong(x));
#else
  uint64_t u;
  std::memcpy(&u, &x, sizeof u);
  return u;
#endif
}

FUSEDNN_HD float float_from_bits(uint32_t u) {
#if defined(__CUDA_ARCH__)
  return __uint_as_float(u);
#else
  float x;
  std::memcpy(&x, &u, sizeof x);
  return x;
#endif
}

FUSEDNN_HD double double_from_bits(uint64_t u) {
#if defined(__CUDA_ARCH__)
  return __longlong_as_double(static_cast<long long>(u));
#else
  double x;
  std::memcpy(&x, &u, sizeof x);
  return x;
#endif
}

// Explicit fused multiply-add: the builds turn off implicit contraction so
// that every instruction-set path rounds the same way; where a formula needs
// the single rounding of an FMA it says so by calling this.
FUSEDNN_HD float fmadd(float a, float b, float c) {
#if defined(__CUDA_ARCH__)
  return __fmaf_rn(a, b, c);
#else
  return std::fma(a, b, c);
#endif
}

FUSEDNN_HD double fmadd(double a, double b, double c) {
#if defined(__CUDA_ARCH__)
  return __fma_rn(a, b, c);
#else
  return std::fma(a, b, c);
#endif
}

}  // namespace fusednn
