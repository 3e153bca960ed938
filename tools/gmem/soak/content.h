// The soak's snapshot and what every byte of a guest page must read, as pure functions.
//
// The snapshot is a memory file of 4 KiB pages. Which pages are holes (sparse, read as zero) and
// which fail to read (the I/O error injection) is a function of the page number, and so is every
// data word: a VM checks its memory against these functions, never against a copy of the file, so
// a wrong byte cannot hide behind a wrong reference.
//   - holes: whole 64 KiB windows (one in seven) and single pages (one in 23), so that a
//     fault-around window mixes data and holes;
//   - failing pages: data pages only, `permille` of them, spread by a hash;
//   - data: word w of page p is SnapshotWord(p, w);
//   - what a VM writes: word w of unit u, generation g, is PatternWord(seed, u, g, w).
//
// Thread safety: pure functions.
#ifndef GUESTMEM_TOOLS_GMEM_SOAK_CONTENT_H_
#define GUESTMEM_TOOLS_GMEM_SOAK_CONTENT_H_

#include <cstdint>
#include <string>

#include "guestmem/address.h"

namespace guestmem::soak {

inline constexpr uint64_t kWordsPerPage = kPageSize4K / sizeof(uint64_t);
inline constexpr uint64_t kWindowPages = 16;  // 64 KiB, the fault handler's default window

// SplitMix64's finalizer: a good 64-bit mix.
constexpr uint64_t Mix64(uint64_t z) {
  z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ULL;
  z = (z ^ (z >> 27)) * 0x94d049bb133111ebULL;
  return z ^ (z >> 31);
}

constexpr bool IsHolePage(uint64_t page) {
  return Mix64((page / kWindowPages) ^ 0x401e5ULL) % 7 == 0 || Mix64(page ^ 0x5e1fULL) % 23 == 0;
}

// A data page whose read from the source fails (per mille of the data pages; 0: none).
constexpr bool IsFailingPage(uint64_t page, uint32_t permille) {
  return permille != 0 && !IsHolePage(page) && Mix64(page ^ 0xfa11ULL) % 1000 < permille;
}

// Cheap enough to check gigabytes with, and different at every word of every page.
constexpr uint64_t SnapshotWord(uint64_t page, uint64_t word) {
  return ((page + 1) * 0x9e3779b97f4a7c15ULL) ^ ((word + 1) * 0xc2b2ae3d27d4eb4fULL);
}

// What a page reads before anyone writes it: its data, or zero for a hole.
constexpr uint64_t InitialWord(uint64_t page, uint64_t word) {
  return IsHolePage(page) ? 0 : SnapshotWord(page, word);
}

constexpr uint64_t PatternWord(uint64_t seed, uint64_t unit, uint32_t generation, uint64_t word) {
  return (Mix64(seed ^ (unit << 20) ^ generation) | 1) * (word + 0x100000001ULL);
}

// What a unit of guest memory (a page of the VM's page size) must read, as the VM tracks it.
// Stored in one 32-bit word per unit; the values from kFirstGeneration on are the generation of
// the VM's own pattern.
enum UnitState : uint32_t {
  kSnapshot = 0,  // never written: the snapshot's content (zero for holes)
  kZero = 1,      // removed by the balloon (MADV_DONTNEED) and not written since
  kFirstGeneration = 2,
};

// "snapshot data", "zero (ballooned)", "the VM's pattern, generation 4".
std::string DescribeState(uint32_t state, bool hole);

}  // namespace guestmem::soak

#endif  // GUESTMEM_TOOLS_GMEM_SOAK_CONTENT_H_
