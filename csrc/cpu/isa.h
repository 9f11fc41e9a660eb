// Runtime choice among the instruction-set builds of the CPU kernels.
// Kernel files are compiled once per ISA into namespaces generic, avx2 and
// avx512 (x86-64) or generic only (elsewhere); FUSEDNN_ISA_SELECT(fn) picks
// the best build of fn that the running CPU supports.
#pragma once

#include <string>

namespace fusednn {
namespace cpu {

enum class Isa { generic = 0, avx2 = 1, avx512 = 2 };

// The ISA in use: the best the CPU supports, lowered by FUSEDNN_ISA
// (generic|avx2|avx512) or set_isa.
Isa active_isa();
const char* isa_name(Isa isa);
// Returns false (and changes nothing) if the name is unknown or the CPU or
// this build lacks that ISA.
bool set_isa(const std::string& name);
bool isa_available(Isa isa);

// Only generic deduces Fn: a build without some ISA (FUSEDNN_CPU_ISAS)
// passes nullptr for it.
template <class Fn> struct SameType {
  using type = Fn;
};
template <class Fn>
Fn select_isa(Fn generic, typename SameType<Fn>::type avx2, typename SameType<Fn>::type avx512) {
  switch (active_isa()) {
    case Isa::avx512: if (avx512) return avx512; [[fallthrough]];
    case Isa::avx2: if (avx2) return avx2; [[fallthrough]];
    default: return generic;
  }
}

}  // namespace cpu
}  // namespace fusednn

#if defined(FUSEDNN_HAVE_AVX2)
#define FUSEDNN_AVX2_FN(fn) &::fusednn::cpu::avx2::fn
#else
#define FUSEDNN_AVX2_FN(fn) nullptr
#endif
#if defined(FUSEDNN_HAVE_AVX512)
#define FUSEDNN_AVX512_FN(fn) &::fusednn::cpu::avx512::fn
#else
#define FUSEDNN_AVX512_FN(fn) nullptr
#endif
#define FUSEDNN_ISA_SELECT(fn) \
  ::fusednn::cpu::select_isa(&::fusednn::cpu::generic::fn, FUSEDNN_AVX2_FN(fn), FUSEDNN_AVX512_FN(fn))

// Declares a kernel family's entry points in every ISA namespace; each
// family header invokes it with a macro listing its declarations.
#define FUSEDNN_DECLARE_FOR_EACH_ISA(DECLS) \
  namespace fusednn { namespace cpu {       \
  namespace generic { DECLS }               \
  namespace avx2 { DECLS }                  \
  namespace avx512 { DECLS }                \
  } }
