// Reusable per-thread scratch memory for the per-channel tables of one
// kernel call. Batch norm at small batches ((32, C) layers) does as much
// per-channel work as elementwise work, and a dozen zero-filled heap
// vectors per call were about a fifth of a (32, 64) call's compiled cost.
// Memory here comes from an arena owned by the calling thread, kept
// between calls, so a call takes its tables without malloc, free or
// memset. Compiled once (not per ISA): one arena per thread whatever
// instruction set the kernels run.
#pragma once

#include <cstddef>

namespace fusednn {
namespace cpu {

// Memory taken from the calling thread's arena, given back when the scope
// ends. Scopes nest (the inner one ends first); memory is uninitialized,
// 64-byte aligned, and stays where it is until its scope ends, whatever
// is taken after it. Pool workers may read and write it: it belongs to the
// calling thread only in where it comes from.
class ScratchScope {
 public:
  ScratchScope();
  ~ScratchScope();
  ScratchScope(const ScratchScope&) = delete;
  ScratchScope& operator=(const ScratchScope&) = delete;

  void* take_bytes(size_t bytes);
  template <class T> T* take(size_t count) {
    return static_cast<T*>(take_bytes(count * sizeof(T)));
  }

 private:
  size_t block_;   // where the arena stood when the scope began
  size_t offset_;
};

}  // namespace cpu
}  // namespace fusednn
