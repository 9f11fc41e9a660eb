// Philox4x32-10 (Salmon et al., SC'11) and the dropout mask rule built on
// it, shared by the CPU and CUDA kernels so that both draw the same bits.
// Element i of an array dropped with (seed, offset, p) is kept iff lane
// i % 4 of philox(counter = (i / 4, offset), key = seed) is below
// T = round(keep * 2^32); nothing else (threads, SIMD width, grid, dtype)
// enters. The functions take and return plain uint32 scalars so that a CPU
// loop over many counters vectorizes them lane by lane.
#pragma once

#include <cmath>
#include <cstdint>

#include "fusednn/config.h"

namespace fusednn {
namespace philox {

constexpr uint32_t kMul0 = 0xD2511F53u;  // multiplies c0
constexpr uint32_t kMul1 = 0xCD9E8D57u;  // multiplies c2
constexpr uint32_t kKeyStep0 = 0x9E3779B9u;
constexpr uint32_t kKeyStep1 = 0xBB67AE85u;
constexpr int kRounds = 10;
// Elements drawn from one counter.
constexpr int kLanes = 4;

// A 32x32 -> 64-bit product split in halves: one widening multiply, which
// SIMD units have (vpmuludq) and GPUs lower to mul.hi/mul.lo.
FUSEDNN_HD void mulhilo(uint32_t a, uint32_t b, uint32_t& hi, uint32_t& lo) {
  const uint64_t product = static_cast<uint64_t>(a) * b;
  hi = static_cast<uint32_t>(product >> 32);
  lo = static_cast<uint32_t>(product);
}

FUSEDNN_HD void round_once(uint32_t& c0, uint32_t& c1, uint32_t& c2, uint32_t& c3, uint32_t k0,
                           uint32_t k1) {
  uint32_t hi0, lo0, hi1, lo1;
  mulhilo(kMul0, c0, hi0, lo0);
  mulhilo(kMul1, c2, hi1, lo1);
  c0 = hi1 ^ c1 ^ k0;
  c1 = lo1;
  c2 = hi0 ^ c3 ^ k1;
  c3 = lo0;
}

// Philox4x32-10 in place: the counter (c0..c3) becomes the four outputs.
FUSEDNN_HD void philox4x32_10(uint32_t& c0, uint32_t& c1, uint32_t& c2, uint32_t& c3, uint32_t k0,
                              uint32_t k1) {
  round_once(c0, c1, c2, c3, k0, k1);
  for (int r = 1; r < kRounds; ++r) {
    k0 += kKeyStep0;
    k1 += kKeyStep1;
    round_once(c0, c1, c2, c3, k0, k1);
  }
}

// The four draws for elements [4 * block, 4 * block + 4) of the stream
// (seed, offset).
FUSEDNN_HD void dropout_block(uint64_t seed, uint64_t offset, uint64_t block, uint32_t out[4]) {
  uint32_t c0 = static_cast<uint32_t>(block);
  uint32_t c1 = static_cast<uint32_t>(block >> 32);
  uint32_t c2 = static_cast<uint32_t>(offset);
  uint32_t c3 = static_cast<uint32_t>(offset >> 32);
  philox4x32_10(c0, c1, c2, c3, static_cast<uint32_t>(seed), static_cast<uint32_t>(seed >> 32));
  out[0] = c0;
  out[1] = c1;
  out[2] = c2;
  out[3] = c3;
}

// Where a call's elements sit in the blocks. A call may cover a slice of a
// larger array (one rank's part of a batch split across processes): its
// element i then takes the decision of global index start + i, so that the
// slices' masks put together are the whole array's. Blocks stay aligned to
// global index 0: with start = 4 * first_block + lane_shift, element i is
// lane (i + lane_shift) % 4 of block first_block + (i + lane_shift) / 4,
// i.e. the call's decisions are those of the blocks from first_block on,
// shifted down by lane_shift elements. start + i must fit in 64 bits.
struct BlockStart {
  uint64_t first_block;
  uint32_t lane_shift;  // 0..3; 0 is the aligned case, with no shift
};

FUSEDNN_HD BlockStart block_start(uint64_t start) {
  return BlockStart{start / kLanes, static_cast<uint32_t>(start % kLanes)};
}

// T = round(keep * 2^32), half to even (the rounding of rint and of
// Python's round), in [0, 2^32]: 64 bits, so that keep = 1 keeps every
// uint32 draw. keep * 2^32 is exact in double, so only this one rounding
// happens.
FUSEDNN_HD uint64_t dropout_threshold(double keep) {
  if (!(keep > 0.0)) return 0;
  if (keep >= 1.0) return uint64_t(1) << 32;
  return static_cast<uint64_t>(rint(keep * 4294967296.0));
}

FUSEDNN_HD bool keeps(uint32_t draw, uint64_t threshold) {
  return static_cast<uint64_t>(draw) < threshold;
}

// The keep decisions of the four elements of `block` as bits 0..3 (bit l
// for lane l).
FUSEDNN_HD uint32_t dropout_block_keeps(uint64_t seed, uint64_t offset, uint64_t block,
                                        uint64_t threshold) {
  uint32_t draws[kLanes];
  dropout_block(seed, offset, block, draws);
  uint32_t bits = 0;
  for (int l = 0; l < kLanes; ++l) bits |= (keeps(draws[l], threshold) ? 1u : 0u) << l;
  return bits;
}

// Whether element `index` of the stream (seed, offset) is kept: the
// contract in one call, for tests and for kernels that draw one element at
// a time.
FUSEDNN_HD bool dropout_keeps(uint64_t seed, uint64_t offset, uint64_t index,
                              uint64_t threshold) {
  uint32_t draws[4];
  dropout_block(seed, offset, index / kLanes, draws);
  return keeps(draws[index % kLanes], threshold);
}

}  // namespace philox
}  // namespace fusednn
