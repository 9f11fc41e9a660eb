// CPU loops for dropout and the fused bias + activation + dropout epilogue.
// The keep decisions are drawn on the fly, a chunk at a time, as packed
// bits (the layout of the returned mask, so returning it is a copy), then
// spread into a small cache-resident buffer of one byte per element that
// the elementwise loop reads next to its inputs. Every chunk starts on a
// multiple of 64 elements, so chunks own whole Philox blocks and whole mask
// words, and the bits are the same for any thread count or SIMD width.
// float16 and bfloat16 widen each piece to float32 and round each result
// once: plain dropout rounds the exact x * scale (multiply_to_odd), the
// fused loops the float32 kernels' results. The fused loops take the
// activation's arithmetic from the activation kernels as function
// pointers (cpu/activation_kernels.h), so nothing here is compiled per
// activation. Compiled once per ISA into namespace FUSEDNN_ISA.
#include "cpu/dropout.h"

#include <algorithm>
#include <cstring>
#include <numeric>
#include <type_traits>
#include <vector>

#if defined(__AVX512F__) && defined(__AVX512BW__)
#include <immintrin.h>
#define FUSEDNN_DROPOUT_AVX512 1
#endif

#include "cpu/activation_kernels.h"
#include "cpu/activation_runs.h"
#include "cpu/elementwise.h"
#include "cpu/half_convert.h"
#include "fusednn/philox.h"

// Mask words are uint64 views of the packed mask bytes, which puts element
// 64q + k at bit k of word q only on little-endian CPUs.
static_assert(__BYTE_ORDER__ == __ORDER_LITTLE_ENDIAN__, "dropout kernels assume little-endian");

namespace fusednn {
namespace cpu {
namespace FUSEDNN_ISA {
namespace {

// Elements per keep buffer; a multiple of 128 (whole mask words and whole
// steps of the AVX-512 draw), small enough for the buffers to stay in L1.
// Long chunks measured faster: 2^25 float32 forward went from about 53% of
// a copy at 2048 to about 60% at 4096 and 8192, and fell to 33% at 256.
constexpr int64_t kChunk = 8192;
constexpr int64_t kChunkWords = kChunk / 64;
// Thread slices start on multiples of this, for the same reason.
constexpr int64_t kSliceAlign = 64;
// Elements per piece of KeepCursor::drawn_bit_pieces: one draw_words_128.
// Drawing the next chunk a piece at a time between the pieces of this one
// took dropout of 2^24 float32 from 6.58 to 5.73 ms forward and from 6.28
// to 5.31 ms backward (medians of 8 paired runs; a copy: 3.2-3.3 ms).
constexpr int64_t kOverlapPiece = 128;
// Row groups of the grad_bias reduction: fixed by the shape alone, so the
// summation order never depends on the thread count.
constexpr int64_t kBiasGroups = 16;

// What the draw of one (seed, offset, threshold) stream needs, formed once
// per slice: the round keys and the offset's counter words.
struct PhiloxStream {
  uint32_t key0[philox::kRounds];
  uint32_t key1[philox::kRounds];
  uint32_t offset_lo;
  uint32_t offset_hi;
  // keep iff draw < T, i.e. draw <= T - 1, which fits in 32 bits (T = 0,
  // drop all, never reaches the draw).
  uint32_t limit;

  explicit PhiloxStream(const DropoutSpec& spec)
      : offset_lo(static_cast<uint32_t>(spec.offset)),
        offset_hi(static_cast<uint32_t>(spec.offset >> 32)),
        limit(static_cast<uint32_t>(spec.threshold - 1)) {
    uint32_t k0 = static_cast<uint32_t>(spec.seed);
    uint32_t k1 = static_cast<uint32_t>(spec.seed >> 32);
    for (int r = 0; r < philox::kRounds; ++r) {
      key0[r] = k0;
      key1[r] = k1;
      k0 += philox::kKeyStep0;
      k1 += philox::kKeyStep1;
    }
  }
};

#if defined(FUSEDNN_DROPOUT_AVX512)
// Keep bits of the 128 elements of blocks [block, block + 32) into two
// words. Philox runs in 64-bit lanes whose low halves carry the 32-bit
// words: a round is then one vpmuludq, one shift and one three-way xor per
// product, with no repacking (the upper halves hold garbage that vpmuludq
// ignores). Four independent sets of 8 blocks hide the multiply latency.
// Within a set, lane 2j holds block j and lane 2j + 1 block 4 + j, so that
// two in-lane unpacks gather the draws of blocks 0-3 and 4-7 in element
// order, and a compare yields their keep bits directly.
inline void draw_words_128(const PhiloxStream& stream, uint64_t block, uint64_t out[2]) {
  const __m512i mul0 = _mm512_set1_epi64(philox::kMul0);
  const __m512i mul1 = _mm512_set1_epi64(philox::kMul1);
  const __m512i lane_block = _mm512_set_epi64(7, 3, 6, 2, 5, 1, 4, 0);
  const __m512i offset_lo = _mm512_set1_epi64(stream.offset_lo);
  const __m512i offset_hi = _mm512_set1_epi64(stream.offset_hi);
  constexpr int kSets = 4;
  __m512i w0[kSets], w1[kSets], w2[kSets], w3[kSets];
  for (int s = 0; s < kSets; ++s) {
    // The whole 64-bit block number: its low half is c0, and shifted down
    // it is c1, so the carry into c1 comes for free.
    w0[s] = _mm512_add_epi64(_mm512_set1_epi64(static_cast<int64_t>(block + 8 * s)), lane_block);
    w1[s] = _mm512_srli_epi64(w0[s], 32);
    w2[s] = offset_lo;
    w3[s] = offset_hi;
  }
#pragma GCC unroll 10
  for (int r = 0; r < philox::kRounds; ++r) {
    const __m512i key0 = _mm512_set1_epi32(static_cast<int>(stream.key0[r]));
    const __m512i key1 = _mm512_set1_epi32(static_cast<int>(stream.key1[r]));
#pragma GCC unroll 4
    for (int s = 0; s < kSets; ++s) {
      const __m512i p0 = _mm512_mul_epu32(w0[s], mul0);
      const __m512i p1 = _mm512_mul_epu32(w2[s], mul1);
      w0[s] = _mm512_ternarylogic_epi64(_mm512_srli_epi64(p1, 32), w1[s], key0, 0x96);  // a^b^c
      w2[s] = _mm512_ternarylogic_epi64(_mm512_srli_epi64(p0, 32), w3[s], key1, 0x96);
      w1[s] = p1;
      w3[s] = p0;
    }
  }
  const __m512i limit = _mm512_set1_epi32(static_cast<int>(stream.limit));
  uint64_t bits[kSets];
  for (int s = 0; s < kSets; ++s) {
    // Odd dwords take the even dwords of w1 (w3): each 64-bit lane becomes
    // (c0, c1) and (c2, c3) of its block.
    const __m512i c01 = _mm512_mask_shuffle_epi32(w0[s], 0xAAAA, w1[s], _MM_PERM_CCAA);
    const __m512i c23 = _mm512_mask_shuffle_epi32(w2[s], 0xAAAA, w3[s], _MM_PERM_CCAA);
    const uint64_t first = _mm512_cmple_epu32_mask(_mm512_unpacklo_epi64(c01, c23), limit);
    const uint64_t second = _mm512_cmple_epu32_mask(_mm512_unpackhi_epi64(c01, c23), limit);
    bits[s] = first | (second << 16);
  }
  out[0] = bits[0] | (bits[1] << 32);
  out[1] = bits[2] | (bits[3] << 32);
}
#endif

// Moves a bit string down by `shift` (1..3) bits: bit k of words[0,
// count) becomes bit k + shift of the string, so words[count] is read.
inline void shift_bits_down(uint64_t* words, int64_t count, uint32_t shift) {
  for (int64_t q = 0; q < count; ++q)
    words[q] = (words[q] >> shift) | (words[q + 1] << (64 - shift));
}

// Supplies the keep decision of each element of one thread's slice
// [begin, end), in increasing order, a chunk at a time. Element i takes
// global index spec.start + i: a chunk's bits are drawn from the blocks of
// its global indices, which start on a block when start % 4 == 0 (the
// usual case, start = 0, draws exactly that) and otherwise lane_shift
// elements into one, so that one more block is drawn and the chunk's bits
// are shifted down into place (shift_bits_down, a pass over 129 words per
// chunk of 8192 elements).
class KeepCursor {
 public:
  KeepCursor(const DropoutSpec& spec, int64_t begin, int64_t end)
      : spec_(spec), stream_(spec), blocks_(philox::block_start(spec.start)), begin_(begin),
        end_(end) {}

  // Calls fn(keep, done, m) for consecutive pieces covering [pos, pos +
  // count): keep[k] (0 or 1) decides element pos + done + k. Positions
  // must not decrease from one call to the next.
  template <class Fn> void pieces(int64_t pos, int64_t count, Fn&& fn) {
    int64_t done = 0;
    while (done < count) {
      const int64_t at = pos + done;
      if (at >= chunk_end_ || at < chunk_begin_) load(at);
      if (!spread_) spread();
      const int64_t m = std::min(count - done, chunk_end_ - at);
      fn(keep_ + (at - chunk_begin_), done, m);
      done += m;
    }
  }

#if defined(FUSEDNN_DROPOUT_AVX512)
  // bit_pieces over the whole slice when its keep bits are drawn (no
  // mask_in), with the next chunk's draw spread among the pieces of the
  // current one: fn gets pieces of at most kOverlapPiece elements, and
  // before each the next kOverlapPiece keep bits of the following chunk are
  // drawn, so that the Philox arithmetic runs between fn's loads and
  // streaming stores instead of in a burst of its own. Piece boundaries
  // lie `phase` elements past multiples of kOverlapPiece from the slice
  // start, where the caller's outputs start 64-byte lines.
  template <class Fn> void drawn_bit_pieces(int64_t phase, Fn&& fn) {
    uint64_t* current = words_;
    uint64_t* next = next_words_;
    int64_t chunk_begin = begin_;
    int64_t count = std::min(kChunk, end_ - chunk_begin);
    chunk_begin_ = chunk_begin;
    draw(count);
    while (count > 0) {
      const int64_t chunk_end = chunk_begin + count;
      const int64_t next_count = std::min(kChunk, end_ - chunk_end);
      const int64_t next_groups = next_count == 0 ? 0 : drawn_words(next_count) / 2;
      int64_t drawn = 0;
      for (int64_t at = chunk_begin; at < chunk_end;) {
        const int64_t since_phase = at - begin_ - phase;
        const int64_t cut = since_phase < 0 ? begin_ + phase
                                            : at + kOverlapPiece - since_phase % kOverlapPiece;
        const int64_t m = std::min(chunk_end, cut) - at;
        if (drawn < next_groups) {
          draw_groups(next, chunk_end, drawn, drawn + 1);
          ++drawn;
        }
        fn(reinterpret_cast<const uint8_t*>(current), at - chunk_begin, at - begin_, m);
        at += m;
      }
      draw_groups(next, chunk_end, drawn, next_groups);
      if (blocks_.lane_shift != 0)
        shift_bits_down(next, (next_count + 63) / 64, blocks_.lane_shift);
      if (spec_.mask_out != nullptr) store_mask(current, chunk_begin, count);
      std::swap(current, next);
      chunk_begin = chunk_end;
      count = next_count;
    }
  }
  // bit_pieces (below) over [pos, pos + count), through drawn_bit_pieces
  // where that is the whole slice and its bits are drawn (no mask_in);
  // phase as for drawn_bit_pieces.
  template <class Fn> void slice_bit_pieces(int64_t pos, int64_t count, int64_t phase, Fn&& fn) {
    if (spec_.mask_in == nullptr && pos == begin_ && pos + count == end_) {
      drawn_bit_pieces(phase, fn);
    } else {
      bit_pieces(pos, count, fn);
    }
  }
#endif

  // The same with packed bits: fn(bits, first_bit, done, m), where bit
  // first_bit + k of the little-endian bit string at bits decides element
  // pos + done + k; at least 4 bytes past the piece's last bit are
  // readable.
  template <class Fn> void bit_pieces(int64_t pos, int64_t count, Fn&& fn) {
    int64_t done = 0;
    while (done < count) {
      const int64_t at = pos + done;
      if (at >= chunk_end_ || at < chunk_begin_) load(at);
      const int64_t m = std::min(count - done, chunk_end_ - at);
      fn(reinterpret_cast<const uint8_t*>(words_), at - chunk_begin_, done, m);
      done += m;
    }
  }

 private:
  // load and spread run once per chunk, out of line: inlined, the Philox
  // draw in them was copied to every loop that reaches a chunk boundary,
  // several per kernel instantiation.
  __attribute__((noinline)) void load(int64_t at) {
    chunk_begin_ = begin_ + (at - begin_) / kChunk * kChunk;
    chunk_end_ = std::min(chunk_begin_ + kChunk, end_);
    const int64_t count = chunk_end_ - chunk_begin_;
    if (spec_.mask_in != nullptr) {
      std::memcpy(words_, spec_.mask_in + chunk_begin_ / 8, static_cast<size_t>((count + 7) / 8));
    } else {
      draw(count);
      if (spec_.mask_out != nullptr) store_mask(count);
    }
    spread_ = false;
  }

  // Words of bits to draw for `count` elements from the chunk's first
  // block: lane_shift more than count, in whole steps of the draw (two
  // words on AVX-512, one elsewhere).
  int64_t drawn_words(int64_t count) const {
    const int64_t words = (count + blocks_.lane_shift + 63) / 64;
#if defined(FUSEDNN_DROPOUT_AVX512)
    return (words + 1) / 2 * 2;
#else
    return words;
#endif
  }

  // Fills words_ with the keep bits of the chunk's count elements; bits
  // past count are drawn for elements that do not exist.
  void draw(int64_t count) {
    if (spec_.threshold == 0) {
      std::memset(words_, 0, sizeof words_);
      return;
    }
    const int64_t words = drawn_words(count);
#if defined(FUSEDNN_DROPOUT_AVX512)
    draw_groups(words_, chunk_begin_, 0, words / 2);
#else
    const uint64_t first_block = chunk_first_block(chunk_begin_);
    // One Philox block per iteration, four decisions as a nibble; the loop
    // vectorizes across blocks. The 64-bit block number in 32-bit halves,
    // carrying by hand, keeps it in 32-bit lanes.
    const int64_t blocks = words * 16;
    const uint32_t first_lo = static_cast<uint32_t>(first_block);
    const uint32_t first_hi = static_cast<uint32_t>(first_block >> 32);
    const PhiloxStream stream = stream_;  // by value: the vectorizer needs it in registers
    uint8_t* nibbles = nibbles_;
#pragma omp simd
    for (int64_t j = 0; j < blocks; ++j) {
      uint32_t c0 = first_lo + static_cast<uint32_t>(j);
      uint32_t c1 = first_hi + (c0 < first_lo ? 1u : 0u);
      uint32_t c2 = stream.offset_lo;
      uint32_t c3 = stream.offset_hi;
      philox::philox4x32_10(c0, c1, c2, c3, stream.key0[0], stream.key1[0]);
      const uint32_t limit = stream.limit;
      nibbles[j] = static_cast<uint8_t>((c0 <= limit ? 1u : 0u) | (c1 <= limit ? 2u : 0u) |
                                        (c2 <= limit ? 4u : 0u) | (c3 <= limit ? 8u : 0u));
    }
    for (int64_t q = 0; q < words; ++q) {
      uint64_t word = 0;
      for (int l = 0; l < 16; ++l) word |= uint64_t(nibbles[16 * q + l]) << (4 * l);
      words_[q] = word;
    }
#endif
    if (blocks_.lane_shift != 0) shift_bits_down(words_, (count + 63) / 64, blocks_.lane_shift);
  }

  // The block holding the global index of the chunk's first element (a
  // multiple of 64 past begin_, so of 4).
  uint64_t chunk_first_block(int64_t chunk_begin) const {
    return blocks_.first_block + static_cast<uint64_t>(chunk_begin) / philox::kLanes;
  }

#if defined(FUSEDNN_DROPOUT_AVX512)
  // The keep bits of elements [chunk_begin + 128 g, chunk_begin + 128 g +
  // 128) for groups g in [from, to), as words[2 g] and words[2 g + 1].
  // Out of line: drawn_bit_pieces reaches it from three places, and
  // inlined, the unrolled Philox rounds were copied three times into the
  // fused forward of every activation and dtype; a call per 128 elements
  // is small beside the draw itself.
  __attribute__((noinline)) void draw_groups(uint64_t* words, int64_t chunk_begin, int64_t from,
                                             int64_t to) {
    const uint64_t first_block = chunk_first_block(chunk_begin);
    for (int64_t g = from; g < to; ++g) {
      if (spec_.threshold == 0) {
        words[2 * g] = words[2 * g + 1] = 0;
      } else {
        draw_words_128(stream_, first_block + 32 * static_cast<uint64_t>(g), words + 2 * g);
      }
    }
  }
#endif

  // Writes the chunk's mask bytes; bits past the end of the array stay 0.
  void store_mask(int64_t count) { store_mask(words_, chunk_begin_, count); }
  void store_mask(const uint64_t* words, int64_t chunk_begin, int64_t count) {
    const int64_t bytes = (count + 7) / 8;
    uint8_t* dst = spec_.mask_out + chunk_begin / 8;
    std::memcpy(dst, words, static_cast<size_t>(bytes));
    if (count % 8 != 0) dst[bytes - 1] &= static_cast<uint8_t>((1u << (count % 8)) - 1);
  }

  // Spreads the chunk's bits into keep_, one 0 or 1 per element.
  __attribute__((noinline)) void spread() {
    spread_ = true;
    const uint8_t* mask_bytes = reinterpret_cast<const uint8_t*>(words_);
    const int64_t bytes = (chunk_end_ - chunk_begin_ + 7) / 8;
#if defined(FUSEDNN_DROPOUT_AVX512)
    int64_t q = 0;
    for (; q + 8 <= bytes; q += 8) {
      uint64_t word;
      std::memcpy(&word, mask_bytes + q, sizeof word);
      _mm512_store_si512(keep_ + 8 * q, _mm512_maskz_set1_epi8(word, 1));
    }
    if (q < bytes) {
      uint64_t word = 0;
      std::memcpy(&word, mask_bytes + q, static_cast<size_t>(bytes - q));
      _mm512_store_si512(keep_ + 8 * q, _mm512_maskz_set1_epi8(word, 1));
    }
#else
    // Replicate each byte over 8, keep bit k in byte k, and turn each
    // nonzero byte into 1 (adding 0x7f sets bit 7 of a nonzero byte without
    // carrying into the next).
    uint64_t* out = reinterpret_cast<uint64_t*>(keep_);
#pragma omp simd
    for (int64_t q = 0; q < bytes; ++q) {
      const uint64_t spread = (uint64_t(mask_bytes[q]) * 0x0101010101010101ull) & 0x8040201008040201ull;
      out[q] = ((spread + 0x7f7f7f7f7f7f7f7full) >> 7) & 0x0101010101010101ull;
    }
#endif
  }

  DropoutSpec spec_;
  PhiloxStream stream_;
  philox::BlockStart blocks_;
  int64_t begin_;
  int64_t end_;
  int64_t chunk_begin_ = 0;
  int64_t chunk_end_ = 0;
  bool spread_ = false;
  // Two words more than a chunk needs: the draw of a shifted chunk's last
  // elements (drawn_words), which also keeps 4-byte reads of the bits
  // inside.
  alignas(64) uint64_t words_[kChunkWords + 2] = {};
#if defined(FUSEDNN_DROPOUT_AVX512)
  alignas(64) uint64_t next_words_[kChunkWords + 2] = {};
#endif
  alignas(64) uint8_t keep_[kChunk];
#if !defined(FUSEDNN_DROPOUT_AVX512)
  alignas(64) uint8_t nibbles_[(kChunkWords + 1) * 16];
#endif
};

// Nanoseconds per float32 element of the keep-bit draw and its use, on one
// core with the data in cache (as cpu/activation_runs.h's costs).
constexpr double kDropoutNanoseconds = 0.6;

// Splits [0, size) into slice_count slices, boundaries on multiples of
// kSliceAlign, and calls fn(begin, end) for each on the pool.
template <class Fn> void for_each_slice(int64_t size, double ns_per_element, Fn fn) {
  if (size == 0) return;
  const int64_t slices = slice_count(size, ns_per_element, kMinElementwiseTaskNanoseconds);
  parallel_for(slices, [&](int64_t s) {
    const int64_t begin = s == 0 ? 0 : (size * s / slices) & ~(kSliceAlign - 1);
    const int64_t end = s == slices - 1 ? size : (size * (s + 1) / slices) & ~(kSliceAlign - 1);
    fn(begin, end);
  });
}

// Runs fn(group) for each of the `groups` row groups of a grad_bias
// reduction over `size` elements. The groups are fixed by the shape (so
// are the sums' bits); whether they go to the pool follows for_each_slice's
// rule: where one slice would do, the calling thread runs them all and the
// call skips the hand-off to a worker. A loop here calling fn directly
// compiled each kernel's body a second time (82 KB of the three-ISA
// module); parallel_for's thread limit keeps one copy.
template <class Fn>
void for_each_group(int64_t groups, int64_t size, double ns_per_element, const Fn& fn) {
  const bool split = slice_count(size, ns_per_element, kMinElementwiseTaskNanoseconds) > 1;
  parallel_for(groups, fn, split ? kMaxThreads : 1);
}

// Walks each slice of for_each_slice; make_body(begin, end) builds a
// slice's body.
template <int N, class MakeBody>
void run_slices(const StridedLoop<N>& loop, char* const base[N], const int sizes[N],
                double ns_per_element, MakeBody make_body) {
  for_each_slice(loop.size, ns_per_element, [&](int64_t begin, int64_t end) {
    auto body = make_body(begin, end);
    loop.walk(base, sizes, begin, end, body);
    body.finish();
  });
}

#if defined(FUSEDNN_DROPOUT_AVX512)
// y[k] = x[k] * (keep_k ? scale : 0) for k < n, where bit first_bit + k of
// the bit string at bits holds keep_k: the bits become the vector masks
// directly, with no byte per element. Streamed outputs get a masked head
// up to the first 64-byte boundary and non-temporal stores after it.
template <class T>
void apply_bits(const T* x, T* y, int64_t n, const uint8_t* bits, int64_t first_bit, T scale,
                bool stream) {
  constexpr int64_t kLanes = 64 / sizeof(T);
  using Mask = std::conditional_t<sizeof(T) == 4, __mmask16, __mmask8>;
  const auto mask_at = [&](int64_t k) {
    uint32_t word;
    std::memcpy(&word, bits + ((first_bit + k) >> 3), sizeof word);
    return static_cast<Mask>(word >> ((first_bit + k) & 7));
  };
  const auto step = [&](int64_t k, Mask valid, bool aligned_stream) {
    const Mask keep = static_cast<Mask>(mask_at(k) & valid);
    if constexpr (sizeof(T) == 4) {
      const __m512 v = _mm512_mul_ps(_mm512_maskz_loadu_ps(valid, x + k),
                                     _mm512_maskz_mov_ps(keep, _mm512_set1_ps(scale)));
      if (aligned_stream) _mm512_stream_ps(y + k, v);
      else _mm512_mask_storeu_ps(y + k, valid, v);
    } else {
      const __m512d v = _mm512_mul_pd(_mm512_maskz_loadu_pd(valid, x + k),
                                      _mm512_maskz_mov_pd(keep, _mm512_set1_pd(scale)));
      if (aligned_stream) _mm512_stream_pd(y + k, v);
      else _mm512_mask_storeu_pd(y + k, valid, v);
    }
  };
  const Mask all = static_cast<Mask>(~0u);
  int64_t k = 0;
  stream = stream && reinterpret_cast<uintptr_t>(y) % sizeof(T) == 0;
  if (stream) {
    const int64_t head =
        std::min<int64_t>(n, ((64 - (reinterpret_cast<uintptr_t>(y) & 63)) & 63) / sizeof(T));
    if (head > 0) step(0, static_cast<Mask>((1u << head) - 1), false);
    k = head;
  }
  // Whole vectors: each step's bits lie kLanes / 8 bytes past the last
  // one's, at the same shift, which mask_at would recompute from k.
  const uint8_t* lane_bits = bits + ((first_bit + k) >> 3);
  const unsigned shift = static_cast<unsigned>((first_bit + k) & 7);
  for (; k + kLanes <= n; k += kLanes, lane_bits += kLanes / 8) {
    uint32_t word;
    std::memcpy(&word, lane_bits, sizeof word);
    const Mask keep = static_cast<Mask>(word >> shift);
    if constexpr (sizeof(T) == 4) {
      const __m512 v = _mm512_mul_ps(_mm512_loadu_ps(x + k),
                                     _mm512_maskz_mov_ps(keep, _mm512_set1_ps(scale)));
      if (stream) _mm512_stream_ps(y + k, v);
      else _mm512_storeu_ps(y + k, v);
    } else {
      const __m512d v = _mm512_mul_pd(_mm512_loadu_pd(x + k),
                                      _mm512_maskz_mov_pd(keep, _mm512_set1_pd(scale)));
      if (stream) _mm512_stream_pd(y + k, v);
      else _mm512_storeu_pd(y + k, v);
    }
  }
  if (k < n) step(k, static_cast<Mask>((1u << (n - k)) - 1), false);
}
#endif

#if defined(FUSEDNN_DROPOUT_AVX512)
// multiply_to_odd (fusednn/half.h) on 16 lanes: the product's float32
// bits, moved one step toward the exact product where it is inexact,
// finite and even.
inline __m512 multiply_to_odd_lanes(__m512 a, __m512 b) {
  const __m512 zero = _mm512_setzero_ps();
  const __m512i one = _mm512_set1_epi32(1);
  const __m512i exponent = _mm512_set1_epi32(0x7f800000);
  const __m512 p = _mm512_mul_ps(a, b);
  const __m512 error = _mm512_fmsub_ps(a, b, p);  // exact: p + error == a * b
  const __m512i u = _mm512_castps_si512(p);
  const __mmask16 moves = _mm512_cmp_ps_mask(error, zero, _CMP_NEQ_UQ) &
                          _mm512_cmpneq_epi32_mask(_mm512_and_si512(u, exponent), exponent) &
                          _mm512_testn_epi32_mask(u, one);
  const __mmask16 up = _mm512_cmp_ps_mask(p, zero, _CMP_EQ_OQ) |
                       static_cast<__mmask16>(~(_mm512_cmp_ps_mask(error, zero, _CMP_GT_OQ) ^
                                                _mm512_cmp_ps_mask(p, zero, _CMP_GT_OQ)));
  __m512i r = _mm512_mask_add_epi32(u, moves & up, u, one);
  r = _mm512_mask_sub_epi32(r, moves & static_cast<__mmask16>(~up), u, one);
  return _mm512_castsi512_ps(r);
}

// How far ahead (elements, 2 KiB) apply_bits_half asks for x's lines: the
// Philox draws between its pieces of 128 elements leave no loads in flight,
// and without the prefetch bfloat16 dropout of 2^24 elements on 2 threads
// took 13.6 ms (float16 8.3 ms), with it 7.1-7.4 ms (6.6-6.9 ms).
constexpr int64_t kHalfDropoutPrefetchAhead = 1024;

// apply_bits for float16 and bfloat16: y[k] = x[k] * (keep_k ? scale : 0)
// computed in float32 and rounded once (multiply_to_odd, then the
// storage type's rounding), 32 elements (one output line) a step, from
// the same vector masks, so that no keep byte per element is spread.
template <class S>
void apply_bits_half(const S* x, S* y, int64_t n, const uint8_t* bits, int64_t first_bit,
                     float scale, bool stream) {
  const auto lanes = [&](int64_t k, __mmask16 valid) {
    uint32_t word;
    std::memcpy(&word, bits + ((first_bit + k) >> 3), sizeof word);
    const __mmask16 keep = static_cast<__mmask16>(word >> ((first_bit + k) & 7)) & valid;
    const __m512 v = widen_lanes(_mm256_maskz_loadu_epi16(valid, x + k), S{});
    return multiply_to_odd_lanes(v, _mm512_maskz_mov_ps(keep, _mm512_set1_ps(scale)));
  };
  // Up to 16 elements with ordinary (masked) stores.
  const auto part = [&](int64_t k, int64_t m) {
    const __mmask16 valid = first_lanes(m);
    _mm256_mask_storeu_epi16(y + k, valid, narrow_lanes(lanes(k, valid), S{}));
  };
  const __mmask16 all = static_cast<__mmask16>(0xffff);
  int64_t k = 0;
  stream = stream && reinterpret_cast<uintptr_t>(y) % sizeof(S) == 0;
  if (stream) {
    const int64_t head = elements_to_line(y, n);
    for (; k < head; k += 16) part(k, std::min<int64_t>(16, head - k));
    k = head;
  }
  for (; k + 32 <= n; k += 32) {
    __builtin_prefetch(x + k + kHalfDropoutPrefetchAhead, 0, 3);
    const HalfLine line = narrow_lines(reinterpret_cast<Line<float>>(lanes(k, all)),
                                       reinterpret_cast<Line<float>>(lanes(k + 16, all)), S{});
    uint16_t* out = reinterpret_cast<uint16_t*>(y + k);
    if (stream) {
      stream_line(out, line);
    } else {
      std::memcpy(out, &line, sizeof line);
    }
  }
  for (; k < n; k += 16) part(k, std::min<int64_t>(16, n - k));
}
#endif

template <class T> bool streams(int64_t size) { return size * int64_t(sizeof(T)) >= kStreamBytes; }

template <class T> struct DropoutBody {
  KeepCursor cursor;
  int64_t pos;
  T scale;
  bool stream;

  void operator()(char* const* ptr, int64_t len, const int64_t* inner) {
    const T* x = reinterpret_cast<const T*>(ptr[0]);
    T* y = reinterpret_cast<T*>(ptr[1]);
    const int64_t at = pos;
    pos += len;
    if (inner[0] == 1 && inner[1] == 1) {
#if defined(FUSEDNN_DROPOUT_AVX512)
      const auto apply = [&](const uint8_t* bits, int64_t first_bit, int64_t done, int64_t m) {
        apply_bits(x + done, y + done, m, bits, first_bit, scale, stream);
      };
      cursor.slice_bit_pieces(at, len, elements_to_line(y, len), apply);
#else
      produce<kWideStageBytes>(y, len, stream, [&](T* dst, int64_t start, int64_t count) {
        cursor.pieces(at + start, count, [&](const uint8_t* keep, int64_t done, int64_t m) {
          const T* src = x + start + done;
          T* out = dst + done;
          const T s = scale;
#pragma omp simd
          for (int64_t k = 0; k < m; ++k) out[k] = src[k] * (keep[k] ? s : T(0));
        });
      });
#endif
    } else {
      cursor.pieces(at, len, [&](const uint8_t* keep, int64_t done, int64_t m) {
        for (int64_t k = 0; k < m; ++k)
          y[(done + k) * inner[1]] = x[(done + k) * inner[0]] * (keep[k] ? scale : T(0));
      });
    }
  }
  void finish() {
    if (stream) store_fence();
  }
};

// Elements per L1 stage of the fused loops' strided runs below.
constexpr int64_t kFusedStage = 256;

// Elements of T that the AVX-512 fused forwards (the rows loop and the
// contiguous runs of the walk) evaluate per call of the activation's
// biased block: an L1 stage, so that a call (with its vector loops' setup
// and ends) serves many pieces of keep bits.
template <class T> constexpr int64_t kRowsStage = kWideStageBytes / int64_t(sizeof(T));

// The fused loops' arithmetic over elements done + k, k < m, of a run
// with other strides than one (inner, in elements: h, b, out): gathered
// into L1 stages for the activation's fused block (FusedForwardBlock,
// cpu/activation_kernels.h) and scattered from them, so that these runs
// too take the vectorized arithmetic; S stores, float32 computes for the
// half types.
template <class S>
__attribute__((noinline)) void bias_act_forward_strided(
    S* o, const S* h, const S* b, const int64_t* inner, int64_t done, int64_t m,
    const uint8_t* keep, const ComputeOf<S> scale, const ActivationParams q,
    FusedForwardBlock<ComputeOf<S>> act) {
  using C = ComputeOf<S>;
  alignas(64) C hs[kFusedStage];
  alignas(64) C bs[kFusedStage];
  alignas(64) C results[kFusedStage];
  for (int64_t p = 0; p < m; p += kFusedStage) {
    const int64_t n = std::min(kFusedStage, m - p);
    for (int64_t k = 0; k < n; ++k) {
      const int64_t i = done + p + k;
      hs[k] = Storage<S>::load(h[i * inner[0]]);
      bs[k] = Storage<S>::load(b[i * inner[1]]);
    }
    act(results, n, hs, bs, keep + p, scale, q);
    for (int64_t k = 0; k < n; ++k) o[(done + p + k) * inner[2]] = Storage<S>::store(results[k]);
  }
}

// inner: g, h, b, out.
template <class S>
__attribute__((noinline)) void bias_act_backward_strided(
    S* gh, const S* g, const S* h, const S* b, const int64_t* inner, int64_t done, int64_t m,
    const uint8_t* keep, const ComputeOf<S> scale, const ActivationParams q,
    FusedBackwardBlock<ComputeOf<S>> act) {
  using C = ComputeOf<S>;
  alignas(64) C gs[kFusedStage];
  alignas(64) C hs[kFusedStage];
  alignas(64) C bs[kFusedStage];
  alignas(64) C results[kFusedStage];
  for (int64_t p = 0; p < m; p += kFusedStage) {
    const int64_t n = std::min(kFusedStage, m - p);
    for (int64_t k = 0; k < n; ++k) {
      const int64_t i = done + p + k;
      gs[k] = Storage<S>::load(g[i * inner[0]]);
      hs[k] = Storage<S>::load(h[i * inner[1]]);
      bs[k] = Storage<S>::load(b[i * inner[2]]);
    }
    act(results, n, gs, hs, bs, keep + p, scale, q);
    for (int64_t k = 0; k < n; ++k) gh[(done + p + k) * inner[3]] = Storage<S>::store(results[k]);
  }
}

// The bias along one contiguous run of a fused loop: the bias array where
// it varies along the run, or, where it is broadcast (one channel's value
// over a run of the inner axes), an L1 buffer filled with that value. The
// pieces above then need one instantiation for both layouts, with the same
// sums h + b; filling the buffer costs one store per line of the run.
template <class T> class BiasRun {
 public:
  static constexpr int64_t kMax = kWideStageBytes / int64_t(sizeof(T));

  BiasRun(const T* bias, bool broadcast, int64_t len) : bias_(bias), broadcast_(broadcast) {
    if (broadcast) std::fill_n(value_, std::min(len, kMax), *bias);
  }

  // Calls fn(bs, k, n) for consecutive [k, k + n) covering [0, m), where
  // bs[j] is the bias of the run's element start + k + j.
  template <class Fn> void pieces(int64_t start, int64_t m, Fn&& fn) const {
    if (!broadcast_) {
      fn(bias_ + start, int64_t(0), m);
      return;
    }
    for (int64_t k = 0; k < m; k += kMax)
      fn(static_cast<const T*>(value_), k, std::min(kMax, m - k));
  }

 private:
  const T* bias_;
  bool broadcast_;
  alignas(64) T value_[kMax];
};

// The fused bodies run once per innermost run and are reached from more
// than one walk (run_slices, the grad_bias row groups), so they too stay
// out of line.
template <class T> struct BiasActForwardBody {
  KeepCursor cursor;
  int64_t pos;
  T scale;
  bool stream;
  ActivationParams params;
  FusedForwardBlock<T> act;
#if defined(FUSEDNN_DROPOUT_AVX512)
  BiasedForwardBlock<T> biased;
#endif

  __attribute__((noinline)) void operator()(char* const* ptr, int64_t len,
                                            const int64_t* inner) {
    const T* h = reinterpret_cast<const T*>(ptr[0]);
    const T* b = reinterpret_cast<const T*>(ptr[1]);
    T* o = reinterpret_cast<T*>(ptr[2]);
    const int64_t at = pos;
    pos += len;
    if (inner[0] == 1 && inner[2] == 1 && (inner[1] == 1 || inner[1] == 0)) {
      const BiasRun<T> bias(b, inner[1] == 0, len);
#if defined(FUSEDNN_DROPOUT_AVX512)
      // As the rows loop: act(h + b) a stage at a time, then apply_bits
      // multiplies by the keep bits (vector masks, no byte per element and
      // no factor per element) and streams the stage out. Stages after the
      // first start on output lines. Against the fused block on spread
      // keep bytes, float64 NCHW runs of 512 (2^22, one thread) took
      // 0.66-0.92x the time, float32 0.94-1.04x.
      constexpr int64_t kStage = kRowsStage<T>;
      cursor.bit_pieces(at, len, [&](const uint8_t* bits, int64_t first_bit, int64_t done,
                                     int64_t m) {
        const int64_t head = elements_to_line(o + done, m);
        for (int64_t k = 0; k < m;) {
          const int64_t n = std::min(m - k, k == 0 && head > 0 ? head + kStage - kLineElems<T>
                                                               : kStage);
          alignas(64) T stage[kStage];
          bias.pieces(done + k, n, [&](const T* bs, int64_t j, int64_t c) {
            biased(stage + j, c, h + done + k + j, bs, params);
          });
          apply_bits(stage, o + done + k, n, bits, first_bit + k, scale, stream);
          k += n;
        }
      });
#else
      produce<kWideStageBytes>(o, len, stream, [&](T* dst, int64_t start, int64_t count) {
        cursor.pieces(at + start, count, [&](const uint8_t* keep, int64_t done, int64_t m) {
          bias.pieces(start + done, m, [&](const T* bs, int64_t k, int64_t n) {
            act(dst + done + k, n, h + start + done + k, bs, keep + k, scale, params);
          });
        });
      });
#endif
    } else {
      cursor.pieces(at, len, [&](const uint8_t* keep, int64_t done, int64_t m) {
        bias_act_forward_strided<T>(o, h, b, inner, done, m, keep, scale, params, act);
      });
    }
  }
  void finish() {
    if (stream) store_fence();
  }
};

// sums[(first + k) % channels] += v[k] for k in [0, m), in double.
template <class T>
inline void add_to_channels(double* sums, const T* v, int64_t m, int64_t first, int64_t channels) {
  int64_t c = first % channels;
  for (int64_t k = 0; k < m;) {
    const int64_t run = std::min(channels - c, m - k);
    double* s = sums + c;
    const T* x = v + k;
#pragma omp simd
    for (int64_t j = 0; j < run; ++j) s[j] += static_cast<double>(x[j]);
    k += run;
    c = 0;
  }
}

// The first row of grad_bias row group `group` of `groups` over `outer`
// rows. With one value per channel per row (inner == 1) group starts are
// rounded down to rows that start on a multiple of kSliceAlign elements,
// so that the fused backward can draw each group's keep bits on its own;
// the separate reduction takes the same groups, so both give the same
// bits.
inline int64_t bias_group_row(int64_t outer, int64_t channels, int64_t inner, int64_t group,
                              int64_t groups) {
  if (group >= groups) return outer;
  const int64_t row = outer * group / groups;
  if (inner != 1) return row;
  const int64_t row_align = kSliceAlign / std::gcd(channels, kSliceAlign);
  return row / row_align * row_align;
}

// lane_sum (below) of one run's values, given a piece at a time in order:
// the run's value j goes to lane j % 8, as lane_sum adds it, so that the
// sum is lane_sum's bit for bit however the run is cut.
struct RunLanes {
  double lanes[8] = {0, 0, 0, 0, 0, 0, 0, 0};
  int64_t count = 0;

  template <class T> void add(const T* v, int64_t m) {
    int64_t i = 0;
    for (; i < m && (count + i) % 8 != 0; ++i) lanes[(count + i) % 8] += static_cast<double>(v[i]);
    for (; i + 8 <= m; i += 8)
      for (int l = 0; l < 8; ++l) lanes[l] += static_cast<double>(v[i + l]);
    for (int l = 0; i < m; ++i, ++l) lanes[l] += static_cast<double>(v[i]);
    count += m;
  }
  double take() {
    const double sum = ((lanes[0] + lanes[1]) + (lanes[2] + lanes[3])) +
                       ((lanes[4] + lanes[5]) + (lanes[6] + lanes[7]));
    *this = RunLanes{};
    return sum;
  }
};

template <class T> struct BiasActBackwardBody {
  KeepCursor cursor;
  int64_t pos;
  T scale;
  bool stream;
  ActivationParams params;
  FusedBackwardBlock<T> act;
  // With bias_sums set (grad_h C-contiguous), the grad_h values are also
  // summed into bias_sums as they are produced, in increasing flat order:
  // with run_length 0 (bias along the last axis) each value goes to
  // bias_sums[flat index % channels]; otherwise each run (one channel's
  // run_length values, the bias broadcast along it) goes through
  // RunLanes to bias_sums[its channel].
  double* bias_sums = nullptr;
  int64_t channels = 1;
  int64_t run_length = 0;
  RunLanes run_lanes = {};  // the current run's sums, with run_length set

  __attribute__((noinline)) void operator()(char* const* ptr, int64_t len,
                                            const int64_t* inner) {
    const T* g = reinterpret_cast<const T*>(ptr[0]);
    const T* h = reinterpret_cast<const T*>(ptr[1]);
    const T* b = reinterpret_cast<const T*>(ptr[2]);
    T* gh = reinterpret_cast<T*>(ptr[3]);
    const int64_t at = pos;
    pos += len;
    if (inner[0] == 1 && inner[1] == 1 && inner[3] == 1 && (inner[2] == 1 || inner[2] == 0)) {
      const BiasRun<T> bias(b, inner[2] == 0, len);
      produce<kWideStageBytes>(gh, len, stream, [&](T* dst, int64_t start, int64_t count) {
        cursor.pieces(at + start, count, [&](const uint8_t* keep, int64_t done, int64_t m) {
          T* out = dst + done;
          bias.pieces(start + done, m, [&](const T* bs, int64_t k, int64_t n) {
            act(out + k, n, g + start + done + k, h + start + done + k, bs, keep + k, scale,
                params);
          });
          if (bias_sums == nullptr) return;
          if (run_length == 0) {
            add_to_channels(bias_sums, out, m, at + start + done, channels);
          } else {
            run_lanes.add(out, m);
          }
        });
      });
      if (bias_sums != nullptr && run_length != 0)
        bias_sums[at / run_length % channels] += run_lanes.take();
    } else {
      cursor.pieces(at, len, [&](const uint8_t* keep, int64_t done, int64_t m) {
        bias_act_backward_strided<T>(gh, g, h, b, inner, done, m, keep, scale, params, act);
      });
    }
  }

  void finish() {
    if (stream) store_fence();
  }
};

template <class T> void dropout_typed(const DropoutSpec& spec, const ArrayRef& x, const ArrayRef& y) {
  const int64_t* strides[2] = {x.strides, y.strides};
  const int sizes[2] = {int(sizeof(T)), int(sizeof(T))};
  const StridedLoop<2> loop(x.ndim, x.shape, strides, sizes);
  char* base[2] = {static_cast<char*>(x.data), static_cast<char*>(y.data)};
  const bool stream = streams<T>(loop.size);
  run_slices(loop, base, sizes, cost_of<T>(kDropoutNanoseconds), [&](int64_t begin, int64_t end) {
    return DropoutBody<T>{KeepCursor(spec, begin, end), begin, T(spec.scale), stream};
  });
}

#if defined(FUSEDNN_DROPOUT_AVX512)
// The fused forward where h and out are C-contiguous and the bias runs
// along the last axis (at least kOverlapPiece long): each thread walks its
// slice as one run, as plain dropout does, so that the next chunk's keep
// bits are drawn between its pieces (drawn_bit_pieces). The activation's
// biased block evaluates a stage at a time, split where rows end (a call
// per piece of 128 cost light activations up to 1.5x), and apply_bits
// multiplies each piece of the stage by its keep bits and streams it out.
// Returns false, having written nothing, for the layouts it does not take.
template <class T>
bool bias_act_forward_rows(const ActivationParams& params, double ns_per_element,
                           const DropoutSpec& spec, const ArrayRef& h, const ArrayRef& bias,
                           const ArrayRef& out, BiasedForwardBlock<T> act) {
  if (h.ndim == 0 || spec.mask_in != nullptr || !is_contiguous(h) || !is_contiguous(out))
    return false;
  const int last = h.ndim - 1;
  const int64_t channels = h.shape[last];
  if (channels < kOverlapPiece || bias.strides[last] != int64_t(sizeof(T))) return false;
  int64_t size = 1;
  for (int d = 0; d < h.ndim; ++d) {
    if (d != last && bias.strides[d] != 0) return false;
    size *= h.shape[d];
  }
  const T* hp = static_cast<const T*>(h.data);
  const T* bp = static_cast<const T*>(bias.data);
  T* op = static_cast<T*>(out.data);
  const bool stream = streams<T>(size);
  constexpr int64_t kStage = kRowsStage<T>;
  for_each_slice(size, ns_per_element, [&](int64_t begin, int64_t end) {
    KeepCursor cursor(spec, begin, end);
    const T scale = T(spec.scale);
    const int64_t len = end - begin;
    const int64_t phase = elements_to_line(op + begin, len);
    alignas(64) T stage[kStage];
    // The stage holds slice elements [stage_begin, stage_end).
    int64_t stage_begin = 0, stage_end = 0;
    const auto fill = [&](int64_t from) {
      // The stage ends where a piece ends (drawn_bit_pieces cuts at chunk
      // ends and at phase + multiples of kOverlapPiece), so that no piece
      // straddles two stages.
      int64_t to = std::min({len, from + kStage, (from / kChunk + 1) * kChunk});
      if (to < len && to % kChunk != 0)
        to = std::max(phase + (to - phase) / kOverlapPiece * kOverlapPiece, from + 1);
      for (int64_t k = from; k < to;) {
        const int64_t channel = (begin + k) % channels;
        const int64_t n = std::min(to - k, channels - channel);
        act(stage + (k - from), n, hp + begin + k, bp + channel, params);
        k += n;
      }
      stage_begin = from;
      stage_end = to;
    };
    const auto piece = [&](const uint8_t* bits, int64_t first_bit, int64_t done, int64_t m) {
      if (done < stage_begin || done + m > stage_end) fill(done);
      // The lines of h a stage ahead of this piece's, so that the next
      // fill's loads are spread over this stage's pieces, in flight during
      // their Philox arithmetic: filled in a burst of their own, they made
      // bias+gelu+dropout over (8192, 4096) float32 1.2x slower, and
      // bias+silu+dropout 1.34x, than evaluating each piece between draws.
      const int64_t ahead = std::min(done + kStage, len);
      const char* next = reinterpret_cast<const char*>(hp + begin + ahead);
      const int64_t next_bytes = std::min(m, len - ahead) * int64_t(sizeof(T));
      for (int64_t line = 0; line < next_bytes; line += 64) __builtin_prefetch(next + line, 0, 3);
      apply_bits(stage + (done - stage_begin), op + begin + done, m, bits, first_bit, scale,
                 stream);
    };
    cursor.drawn_bit_pieces(phase, piece);
    if (stream) store_fence();
  });
  return true;
}
#endif

// The fused forward's walk over any layout, once per dtype for all
// activations.
template <class T>
__attribute__((noinline)) void bias_act_forward_walk(
    const ActivationParams& params, double ns_per_element, const DropoutSpec& spec,
    const ArrayRef& h, const ArrayRef& bias, const ArrayRef& out, FusedBlocks<T> blocks) {
  const int64_t* strides[3] = {h.strides, bias.strides, out.strides};
  const int sizes[3] = {int(sizeof(T)), int(sizeof(T)), int(sizeof(T))};
  const StridedLoop<3> loop(h.ndim, h.shape, strides, sizes);
  char* base[3] = {static_cast<char*>(h.data), static_cast<char*>(bias.data),
                   static_cast<char*>(out.data)};
  const bool stream = streams<T>(loop.size);
  run_slices(loop, base, sizes, ns_per_element, [&](int64_t begin, int64_t end) {
#if defined(FUSEDNN_DROPOUT_AVX512)
    return BiasActForwardBody<T>{KeepCursor(spec, begin, end), begin, T(spec.scale), stream,
                                 params, blocks.forward, blocks.biased};
#else
    return BiasActForwardBody<T>{KeepCursor(spec, begin, end), begin, T(spec.scale), stream,
                                 params, blocks.forward};
#endif
  });
}

template <class T>
void bias_act_forward_typed(const ActivationParams& params, double activation_ns,
                            const DropoutSpec& spec, const ArrayRef& h, const ArrayRef& bias,
                            const ArrayRef& out, const FusedBlocks<T>& blocks) {
  const double ns_per_element = cost_of<T>(activation_ns + kDropoutNanoseconds);
#if defined(FUSEDNN_DROPOUT_AVX512)
  if (bias_act_forward_rows<T>(params, ns_per_element, spec, h, bias, out, blocks.biased)) return;
#endif
  bias_act_forward_walk<T>(params, ns_per_element, spec, h, bias, out, blocks);
}

// A double sum rounded once to storage.
template <class T> inline T from_double(double v) {
  if constexpr (std::is_floating_point_v<T>) {
    return static_cast<T>(v);
  } else {
    return Storage<T>::store_double(v);
  }
}

// Calls add(k, values, m) over n stored values at x, with values[j] the
// (k + j)-th as a float or double, m <= kHalfBlock at a time: the half
// types widened by the ISA's conversions (cpu/half_convert.h) first: the
// scalar conversion (fusednn/half.h), inlined into the sums below, left
// float16 to about 30 integer instructions per 16 values where bfloat16
// takes two, and held float16's fused backward to 2x bfloat16's time
// (4096 x 4096, 2 threads, relu from a mask: 15.6 against 7.4 ms).
// Widening is exact, so the sums are the same on every path.
template <class T, class Add> inline void widened_pieces(const T* x, int64_t n, Add add) {
  if constexpr (std::is_floating_point_v<T>) {
    add(int64_t(0), x, n);
  } else {
    for (int64_t k = 0; k < n; k += kHalfBlock) {
      const int64_t m = std::min(kHalfBlock, n - k);
      alignas(64) float values[kHalfBlock];
      widen(x + k, values, m);
      add(k, static_cast<const float*>(values), m);
    }
  }
}

// Sum of n contiguous values in 8 interleaved double accumulators combined
// pairwise: the same operations in the same order on every ISA (the
// pieces of widened_pieces are multiples of 8 but for the last).
template <class T> double lane_sum(const T* x, int64_t n) {
  double lanes[8] = {0, 0, 0, 0, 0, 0, 0, 0};
  widened_pieces(x, n, [&](int64_t, const auto* v, int64_t m) {
    int64_t k = 0;
    for (; k + 8 <= m; k += 8)
      for (int l = 0; l < 8; ++l) lanes[l] += double(v[k + l]);
    for (int l = 0; k + l < m; ++l) lanes[l] += double(v[k + l]);
  });
  return ((lanes[0] + lanes[1]) + (lanes[2] + lanes[3])) +
         ((lanes[4] + lanes[5]) + (lanes[6] + lanes[7]));
}

// grad_bias[c] = the groups' sums of channel c added in group order, rounded
// once to T. partial holds `groups` rows of `channels` sums.
// This and bias_grad_typed depend on T only and are reached from both
// backward walks: out of line.
template <class T>
__attribute__((noinline)) void store_channel_sums(std::vector<double>& partial, int64_t groups,
                                                  int64_t channels, const ArrayRef& grad_bias) {
  T* out = static_cast<T*>(grad_bias.data);
  const int64_t out_stride = grad_bias.ndim > 0 ? grad_bias.strides[0] / int64_t(sizeof(T)) : 1;
  for (int64_t group = 1; group < groups; ++group) {
    const double* acc = partial.data() + group * channels;
#pragma omp simd
    for (int64_t c = 0; c < channels; ++c) partial[c] += acc[c];
  }
  for (int64_t c = 0; c < channels; ++c) out[c * out_stride] = from_double<T>(partial[c]);
}

// grad_bias[c] = sum of grad_h over every axis but `axis`, in a fixed order
// that does not depend on the thread count or the ISA; grad_h is
// C-contiguous.
template <class T>
__attribute__((noinline)) void bias_grad_typed(const ArrayRef& grad_h, int axis,
                                               const ArrayRef& grad_bias) {
  int64_t outer = 1, inner = 1;
  for (int d = 0; d < axis; ++d) outer *= grad_h.shape[d];
  for (int d = axis + 1; d < grad_h.ndim; ++d) inner *= grad_h.shape[d];
  const int64_t channels = grad_h.shape[axis];
  const T* g = static_cast<const T*>(grad_h.data);
  if (channels == 0) return;
  const int64_t groups = std::max<int64_t>(1, std::min(outer, kBiasGroups));
  std::vector<double> partial(static_cast<size_t>(groups * channels), 0.0);
  if (inner > 0) {
    for_each_group(groups, outer * channels * inner, cost_of<T>(kCopyNanoseconds),
                   [&](int64_t group) {
      double* acc = partial.data() + group * channels;
      const int64_t first = bias_group_row(outer, channels, inner, group, groups);
      const int64_t last = bias_group_row(outer, channels, inner, group + 1, groups);
      for (int64_t o = first; o < last; ++o) {
        const T* rows = g + o * channels * inner;
        if (inner == 1) {
          widened_pieces(rows, channels, [&](int64_t k, const auto* v, int64_t m) {
#pragma omp simd
            for (int64_t c = 0; c < m; ++c) acc[k + c] += double(v[c]);
          });
        } else {
          for (int64_t c = 0; c < channels; ++c) acc[c] += lane_sum(rows + c * inner, inner);
        }
      }
    });
  }
  store_channel_sums<T>(partial, groups, channels, grad_bias);
}

// The fused backward where g, h and grad_h are C-contiguous and the bias
// runs along an axis before the last (NCHW-like: each channel's bias
// broadcast along runs of the inner axes): grad_bias is summed from each
// stage of grad_h while it is in cache, each run through RunLanes, one
// task per row group of bias_grad_typed, instead of in a second pass that
// reads grad_h back from memory (a third of the float32 relu backward's
// time). The same groups, runs and order as bias_grad_typed, so the same
// bits; returns false, having written nothing, where a group would not
// start on a kSliceAlign boundary (its keep bits are drawn on their own)
// or the groups would share the threads unevenly.
template <class T>
bool bias_act_backward_runs(const ActivationParams& params, double activation_ns,
                            const DropoutSpec& spec,
                            const StridedLoop<4>& loop, char* const base[4], const int sizes[4],
                            bool stream, int64_t channels, int64_t run_length,
                            FusedBackwardBlock<T> act, const ArrayRef& grad_bias) {
  // The walk's runs must be whole channel runs: the innermost loop axis
  // is the inner axes merged, with the bias broadcast along it.
  if (run_length < 2 || loop.shape[loop.ndim - 1] != run_length ||
      loop.strides[2][loop.ndim - 1] != 0)
    return false;
  const int64_t outer = loop.size / (channels * run_length);
  const int64_t groups = std::max<int64_t>(1, std::min(outer, kBiasGroups));
  const int64_t threads = num_threads();
  if (groups % threads != 0 && groups < 4 * threads) return false;
  for (int64_t group = 0; group < groups; ++group) {
    if (bias_group_row(outer, channels, run_length, group, groups) * channels * run_length %
            kSliceAlign != 0)
      return false;
  }
  std::vector<double> partial(static_cast<size_t>(groups * channels), 0.0);
  for_each_group(groups, loop.size, cost_of<T>(activation_ns + kDropoutNanoseconds),
                 [&](int64_t group) {
    const int64_t row_elements = channels * run_length;
    const int64_t begin = bias_group_row(outer, channels, run_length, group, groups) * row_elements;
    const int64_t end = bias_group_row(outer, channels, run_length, group + 1, groups) * row_elements;
    if (begin == end) return;
    BiasActBackwardBody<T> body{KeepCursor(spec, begin, end), begin, T(spec.scale), stream,
                                params, act, partial.data() + group * channels, channels,
                                run_length};
    loop.walk(base, sizes, begin, end, body);
    body.finish();
  });
  store_channel_sums<T>(partial, groups, channels, grad_bias);
  return true;
}

// The fused backward, once per dtype like bias_act_forward_walk.
template <class T>
__attribute__((noinline)) void bias_act_backward_walk(
    const ActivationParams& params, double activation_ns, const DropoutSpec& spec,
    const ArrayRef& g, const ArrayRef& h, const ArrayRef& bias, const ArrayRef& gh, int axis,
    const ArrayRef& grad_bias, FusedBackwardBlock<T> act) {
  const int64_t* strides[4] = {g.strides, h.strides, bias.strides, gh.strides};
  const int sizes[4] = {int(sizeof(T)), int(sizeof(T)), int(sizeof(T)), int(sizeof(T))};
  const StridedLoop<4> loop(g.ndim, g.shape, strides, sizes);
  char* base[4] = {static_cast<char*>(g.data), static_cast<char*>(h.data),
                   static_cast<char*>(bias.data), static_cast<char*>(gh.data)};
  const bool stream = streams<T>(loop.size);
  const int64_t channels = gh.shape[axis];
  const int64_t item = int64_t(sizeof(T));
  // Bias along the last axis of contiguous arrays: grad_bias is summed
  // from each stage of grad_h while it is in cache, one task per row group
  // of bias_grad_typed, instead of in a second pass over grad_h. The
  // loop's innermost run is then the channel axis, unit-stride in every
  // operand (or, with one channel, a broadcast bias), so the body always
  // takes its vector branch, the one that adds to bias_sums.
  const bool contiguous = channels > 0 && loop.size > 0 && is_contiguous(g) &&
                          is_contiguous(h) && is_contiguous(gh) && bias.strides[axis] == item;
  const bool fused_sums = contiguous && axis == gh.ndim - 1;
  if (!fused_sums) {
    int64_t inner = 1;
    for (int d = axis + 1; d < gh.ndim; ++d) inner *= gh.shape[d];
    if (contiguous && bias_act_backward_runs<T>(params, activation_ns, spec, loop, base, sizes,
                                                stream, channels, inner, act, grad_bias))
      return;
    run_slices(loop, base, sizes, cost_of<T>(activation_ns + kDropoutNanoseconds),
               [&](int64_t begin, int64_t end) {
      return BiasActBackwardBody<T>{KeepCursor(spec, begin, end), begin, T(spec.scale), stream,
                                    params, act};
    });
    bias_grad_typed<T>(gh, axis, grad_bias);
    return;
  }
  const int64_t outer = loop.size / channels;
  const int64_t groups = std::max<int64_t>(1, std::min(outer, kBiasGroups));
  std::vector<double> partial(static_cast<size_t>(groups * channels), 0.0);
  for_each_group(groups, loop.size, cost_of<T>(activation_ns + kDropoutNanoseconds),
                 [&](int64_t group) {
    const int64_t begin = bias_group_row(outer, channels, 1, group, groups) * channels;
    const int64_t end = bias_group_row(outer, channels, 1, group + 1, groups) * channels;
    if (begin == end) return;
    BiasActBackwardBody<T> body{KeepCursor(spec, begin, end), begin, T(spec.scale), stream,
                                params, act, partial.data() + group * channels, channels};
    loop.walk(base, sizes, begin, end, body);
    body.finish();
  });
  store_channel_sums<T>(partial, groups, channels, grad_bias);
}

// ---- float16 and bfloat16 -------------------------------------------------------

template <class S> struct DropoutHalfBody {
  KeepCursor cursor;
  int64_t pos;
  float scale;
  bool stream;

  void operator()(char* const* ptr, int64_t len, const int64_t* inner) {
    const S* x = reinterpret_cast<const S*>(ptr[0]);
    S* y = reinterpret_cast<S*>(ptr[1]);
    const int64_t at = pos;
    pos += len;
    const float s = scale;
    if (inner[0] == 1 && inner[1] == 1) {
#if defined(FUSEDNN_DROPOUT_AVX512)
      const auto apply = [&](const uint8_t* bits, int64_t first_bit, int64_t done, int64_t m) {
        apply_bits_half(x + done, y + done, m, bits, first_bit, s, stream);
      };
      cursor.slice_bit_pieces(at, len, elements_to_line(y, len), apply);
#else
      produce<kWideStageBytes>(y, len, stream, [&](S* dst, int64_t start, int64_t count) {
        cursor.pieces(at + start, count, [&](const uint8_t* keep, int64_t done, int64_t m) {
          for (int64_t b = 0; b < m; b += kHalfBlock) {
            const int64_t n = std::min(kHalfBlock, m - b);
            alignas(64) float v[kHalfBlock];
            widen(x + start + done + b, v, n);
            const uint8_t* kb = keep + b;
#pragma omp simd
            for (int64_t k = 0; k < n; ++k) v[k] = multiply_to_odd(v[k], kb[k] ? s : 0.0f);
            narrow(v, dst + done + b, n);
          }
        });
      });
#endif
    } else {
      cursor.pieces(at, len, [&](const uint8_t* keep, int64_t done, int64_t m) {
        for (int64_t k = 0; k < m; ++k)
          y[(done + k) * inner[1]] = Storage<S>::store(
              multiply_to_odd(Storage<S>::load(x[(done + k) * inner[0]]), keep[k] ? s : 0.0f));
      });
    }
  }
  void finish() {
    if (stream) store_fence();
  }
};

template <class S> void dropout_half(const DropoutSpec& spec, const ArrayRef& x, const ArrayRef& y) {
  const int64_t* strides[2] = {x.strides, y.strides};
  const int sizes[2] = {int(sizeof(S)), int(sizeof(S))};
  const StridedLoop<2> loop(x.ndim, x.shape, strides, sizes);
  char* base[2] = {static_cast<char*>(x.data), static_cast<char*>(y.data)};
  const bool stream = streams<S>(loop.size);
  run_slices(loop, base, sizes, kDropoutNanoseconds, [&](int64_t begin, int64_t end) {
    return DropoutHalfBody<S>{KeepCursor(spec, begin, end), begin, float(spec.scale), stream};
  });
}

// Fills dst[0, n) with the bias of a run's elements [k, k + n) as float32:
// one widened value where the bias is broadcast along the run.
template <class S>
inline void bias_block(const S* b, bool broadcast, int64_t k, int64_t n, float* dst) {
  if (broadcast) {
    std::fill_n(dst, n, Storage<S>::load(*b));
  } else {
    widen(b + k, dst, n);
  }
}

template <class S> struct BiasActForwardHalfBody {
  KeepCursor cursor;
  int64_t pos;
  float scale;
  bool stream;
  ActivationParams params;
  FusedForwardBlock<float> act;

  __attribute__((noinline)) void operator()(char* const* ptr, int64_t len,
                                            const int64_t* inner) {
    const S* h = reinterpret_cast<const S*>(ptr[0]);
    const S* b = reinterpret_cast<const S*>(ptr[1]);
    S* o = reinterpret_cast<S*>(ptr[2]);
    const int64_t at = pos;
    pos += len;
    if (inner[0] == 1 && inner[2] == 1 && (inner[1] == 1 || inner[1] == 0)) {
      const bool broadcast = inner[1] == 0;
      produce_lines(o, len, stream, [&](S* dst, int64_t start, int64_t count, auto streamed) {
        contiguous(dst, h + start, broadcast ? b : b + start, broadcast, at + start, count,
                   decltype(streamed)::value);
      });
    } else {
      cursor.pieces(at, len, [&](const uint8_t* keep, int64_t done, int64_t m) {
        bias_act_forward_strided<S>(o, h, b, inner, done, m, keep, scale, params, act);
      });
    }
  }
  void finish() {
    if (stream) store_fence();
  }

  // count outputs of a contiguous run from slice position `first`, for
  // both parts of produce_lines (one copy of the loop).
  __attribute__((noinline)) void contiguous(S* dst, const S* h, const S* b, bool broadcast,
                                            int64_t first, int64_t count, bool streamed) {
    cursor.pieces(first, count, [&](const uint8_t* keep, int64_t done, int64_t m) {
      for (int64_t k = 0; k < m; k += kHalfBlock) {
        const int64_t n = std::min(kHalfBlock, m - k);
        alignas(64) float hs[kHalfBlock], bs[kHalfBlock], out[kHalfBlock];
        widen(h + done + k, hs, n);
        bias_block(b, broadcast, done + k, n, bs);
        act(out, n, hs, bs, keep + k, scale, params);
        narrow_to(out, dst + done + k, n, streamed);
      }
    });
  }
};

template <class S> struct BiasActBackwardHalfBody {
  KeepCursor cursor;
  int64_t pos;
  float scale;
  bool stream;
  ActivationParams params;
  FusedBackwardBlock<float> act;

  __attribute__((noinline)) void operator()(char* const* ptr, int64_t len,
                                            const int64_t* inner) {
    const S* g = reinterpret_cast<const S*>(ptr[0]);
    const S* h = reinterpret_cast<const S*>(ptr[1]);
    const S* b = reinterpret_cast<const S*>(ptr[2]);
    S* gh = reinterpret_cast<S*>(ptr[3]);
    const int64_t at = pos;
    pos += len;
    if (inner[0] == 1 && inner[1] == 1 && inner[3] == 1 && (inner[2] == 1 || inner[2] == 0)) {
      const bool broadcast = inner[2] == 0;
      produce_lines(gh, len, stream, [&](S* dst, int64_t start, int64_t count, auto streamed) {
        contiguous(dst, g + start, h + start, broadcast ? b : b + start, broadcast, at + start,
                   count, decltype(streamed)::value);
      });
    } else {
      cursor.pieces(at, len, [&](const uint8_t* keep, int64_t done, int64_t m) {
        bias_act_backward_strided<S>(gh, g, h, b, inner, done, m, keep, scale, params, act);
      });
    }
  }
  void finish() {
    if (stream) store_fence();
  }

  // As BiasActForwardHalfBody::contiguous.
  __attribute__((noinline)) void contiguous(S* dst, const S* g, const S* h, const S* b,
                                            bool broadcast, int64_t first, int64_t count,
                                            bool streamed) {
    cursor.pieces(first, count, [&](const uint8_t* keep, int64_t done, int64_t m) {
      for (int64_t k = 0; k < m; k += kHalfBlock) {
        const int64_t n = std::min(kHalfBlock, m - k);
        alignas(64) float gs[kHalfBlock], hs[kHalfBlock], bs[kHalfBlock], out[kHalfBlock];
        widen(g + done + k, gs, n);
        widen(h + done + k, hs, n);
        bias_block(b, broadcast, done + k, n, bs);
        act(out, n, gs, hs, bs, keep + k, scale, params);
        narrow_to(out, dst + done + k, n, streamed);
      }
    });
  }
};

// The half loops' per-element costs are float32's (the same arithmetic).
// Once per storage type, like bias_act_forward_walk.
template <class S>
__attribute__((noinline)) void bias_act_forward_half_walk(
    const ActivationParams& params, double activation_ns, const DropoutSpec& spec,
    const ArrayRef& h, const ArrayRef& bias, const ArrayRef& out, FusedForwardBlock<float> act) {
  const int64_t* strides[3] = {h.strides, bias.strides, out.strides};
  const int sizes[3] = {int(sizeof(S)), int(sizeof(S)), int(sizeof(S))};
  const StridedLoop<3> loop(h.ndim, h.shape, strides, sizes);
  char* base[3] = {static_cast<char*>(h.data), static_cast<char*>(bias.data),
                   static_cast<char*>(out.data)};
  const bool stream = streams<S>(loop.size);
  run_slices(loop, base, sizes, activation_ns + kDropoutNanoseconds,
             [&](int64_t begin, int64_t end) {
    return BiasActForwardHalfBody<S>{KeepCursor(spec, begin, end), begin, float(spec.scale),
                                     stream, params, act};
  });
}

// grad_bias is the sum of the stored (rounded) grad_h, as for the other
// dtypes, accumulated in double and rounded once to the bias's dtype.
template <class S>
__attribute__((noinline)) void bias_act_backward_half_walk(
    const ActivationParams& params, double activation_ns, const DropoutSpec& spec,
    const ArrayRef& g, const ArrayRef& h, const ArrayRef& bias, const ArrayRef& gh, int axis,
    const ArrayRef& grad_bias, FusedBackwardBlock<float> act) {
  const int64_t* strides[4] = {g.strides, h.strides, bias.strides, gh.strides};
  const int sizes[4] = {int(sizeof(S)), int(sizeof(S)), int(sizeof(S)), int(sizeof(S))};
  const StridedLoop<4> loop(g.ndim, g.shape, strides, sizes);
  char* base[4] = {static_cast<char*>(g.data), static_cast<char*>(h.data),
                   static_cast<char*>(bias.data), static_cast<char*>(gh.data)};
  const bool stream = streams<S>(loop.size);
  run_slices(loop, base, sizes, activation_ns + kDropoutNanoseconds,
             [&](int64_t begin, int64_t end) {
    return BiasActBackwardHalfBody<S>{KeepCursor(spec, begin, end), begin, float(spec.scale),
                                      stream, params, act};
  });
  bias_grad_typed<S>(gh, axis, grad_bias);
}

}  // namespace

void dropout_apply(const DropoutSpec& spec, const ArrayRef& x, const ArrayRef& y) {
  visit_storage(x.dtype, [&](auto stored) {
    using T = decltype(stored);
    if constexpr (std::is_floating_point_v<T>) {
      dropout_typed<T>(spec, x, y);
    } else {
      dropout_half<T>(spec, x, y);
    }
  });
}

void dropout_mask(const DropoutSpec& spec, int64_t n) {
  for_each_slice(n, kDropoutNanoseconds, [&](int64_t begin, int64_t end) {
    KeepCursor cursor(spec, begin, end);
    cursor.bit_pieces(begin, end - begin, [](const uint8_t*, int64_t, int64_t, int64_t) {});
  });
}

void bias_act_dropout_forward(Activation act, const ActivationParams& p, const DropoutSpec& spec,
                              const ArrayRef& h, const ArrayRef& bias, const ArrayRef& out) {
  const double ns = activation_cost(act).forward;
  visit_storage(h.dtype, [&](auto stored) {
    using S = decltype(stored);
    const FusedBlocks<ComputeOf<S>> blocks = fused_blocks<ComputeOf<S>>(act, p);
    if constexpr (std::is_floating_point_v<S>) {
      bias_act_forward_typed<S>(p, ns, spec, h, bias, out, blocks);
    } else {
      bias_act_forward_half_walk<S>(p, ns, spec, h, bias, out, blocks.forward);
    }
  });
}

void bias_act_dropout_backward(Activation act, const ActivationParams& p, const DropoutSpec& spec,
                               const ArrayRef& grad_output, const ArrayRef& h,
                               const ArrayRef& bias, const ArrayRef& grad_h, int axis,
                               const ArrayRef& grad_bias) {
  const double ns = activation_cost(act).backward;
  visit_storage(h.dtype, [&](auto stored) {
    using S = decltype(stored);
    const FusedBackwardBlock<ComputeOf<S>> block = fused_blocks<ComputeOf<S>>(act, p).backward;
    if constexpr (std::is_floating_point_v<S>) {
      bias_act_backward_walk<S>(p, ns, spec, grad_output, h, bias, grad_h, axis, grad_bias, block);
    } else {
      bias_act_backward_half_walk<S>(p, ns, spec, grad_output, h, bias, grad_h, axis, grad_bias,
                                     block);
    }
  });
}

}  // namespace FUSEDNN_ISA
}  // namespace cpu
}  // namespace fusednn
