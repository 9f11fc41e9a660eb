// The per-thread arena behind ScratchScope (scratch.h): a list of blocks
// filled in order. A take that does not fit the current block moves on to
// the next one, allocating it if need be, so earlier memory never moves;
// a scope's end rewinds to where it began. Once the outermost scope ends,
// an arena that needed several blocks is merged into one block of their
// total size for the next call, and one larger than kKeptBytes is freed.
#include "cpu/scratch.h"

#include <algorithm>
#include <new>
#include <vector>

namespace fusednn {
namespace cpu {
namespace {

constexpr size_t kAlignment = 64;
constexpr size_t kFirstBlockBytes = size_t(64) << 10;
// An arena larger than this is freed once its call ends: a call on a
// huge batch should not pin its tables' memory for the thread's lifetime.
constexpr size_t kKeptBytes = size_t(16) << 20;

struct Block {
  unsigned char* memory;
  size_t size;
};

struct Arena {
  std::vector<Block> blocks;
  size_t block = 0;   // the block being filled
  size_t offset = 0;  // bytes of it taken
  int depth = 0;      // open scopes

  ~Arena() { release(); }

  void release() {
    for (const Block& b : blocks) ::operator delete(b.memory, std::align_val_t(kAlignment));
    blocks.clear();
    block = offset = 0;
  }

  size_t capacity() const {
    size_t total = 0;
    for (const Block& b : blocks) total += b.size;
    return total;
  }

  void add_block(size_t size) {
    blocks.push_back(
        Block{static_cast<unsigned char*>(::operator new(size, std::align_val_t(kAlignment))),
              size});
  }
};

thread_local Arena t_arena;

}  // namespace

ScratchScope::ScratchScope() : block_(t_arena.block), offset_(t_arena.offset) { ++t_arena.depth; }

ScratchScope::~ScratchScope() {
  Arena& a = t_arena;
  a.block = block_;
  a.offset = offset_;
  if (--a.depth > 0) return;
  const size_t total = a.capacity();
  if (total > kKeptBytes) {
    a.release();
  } else if (a.blocks.size() > 1) {
    a.release();
    a.add_block(total);
  }
}

void* ScratchScope::take_bytes(size_t bytes) {
  Arena& a = t_arena;
  bytes = (std::max<size_t>(bytes, 1) + kAlignment - 1) / kAlignment * kAlignment;
  while (a.block < a.blocks.size()) {
    Block& b = a.blocks[a.block];
    if (b.size - a.offset >= bytes) {
      void* p = b.memory + a.offset;
      a.offset += bytes;
      return p;
    }
    ++a.block;
    a.offset = 0;
  }
  const size_t last = a.blocks.empty() ? 0 : a.blocks.back().size;
  a.add_block(std::max({bytes, 2 * last, kFirstBlockBytes}));
  a.block = a.blocks.size() - 1;
  a.offset = bytes;
  return a.blocks.back().memory;
}

}  // namespace cpu
}  // namespace fusednn
