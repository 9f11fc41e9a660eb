// CPU feature detection and the active-ISA setting used by
// FUSEDNN_ISA_SELECT.
#include "cpu/isa.h"

#include <atomic>
#include <cstdlib>

namespace fusednn {
namespace cpu {
namespace {

Isa best_supported() {
#if defined(__x86_64__) || defined(_M_X64)
  __builtin_cpu_init();
#if defined(FUSEDNN_HAVE_AVX512)
  if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
      __builtin_cpu_supports("avx512dq") && __builtin_cpu_supports("avx512vl") &&
      __builtin_cpu_supports("fma"))
    return Isa::avx512;
#endif
#if defined(FUSEDNN_HAVE_AVX2)
  if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
      __builtin_cpu_supports("f16c"))
    return Isa::avx2;
#endif
#endif
  return Isa::generic;
}

bool parse(const std::string& name, Isa& isa) {
  if (name == "generic") isa = Isa::generic;
  else if (name == "avx2") isa = Isa::avx2;
  else if (name == "avx512") isa = Isa::avx512;
  else return false;
  return true;
}

Isa initial_isa() {
  Isa isa = best_supported();
  const char* requested = std::getenv("FUSEDNN_ISA");
  Isa wanted;
  if (requested != nullptr && parse(requested, wanted) && wanted < isa) isa = wanted;
  return isa;
}

std::atomic<int>& active() {
  static std::atomic<int> isa{static_cast<int>(initial_isa())};
  return isa;
}

}  // namespace

Isa active_isa() { return static_cast<Isa>(active().load(std::memory_order_relaxed)); }

const char* isa_name(Isa isa) {
  switch (isa) {
    case Isa::avx512: return "avx512";
    case Isa::avx2: return "avx2";
    default: return "generic";
  }
}

bool isa_available(Isa isa) { return isa <= best_supported(); }

bool set_isa(const std::string& name) {
  Isa isa;
  if (!parse(name, isa) || !isa_available(isa)) return false;
  active().store(static_cast<int>(isa));
  return true;
}

}  // namespace cpu
}  // namespace fusednn
