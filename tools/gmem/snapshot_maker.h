// SnapshotMaker: writes a demo guest memory file, as a snapshot of a real VM would look.
//
// The file is made of 4 KiB pages of three kinds, in runs of 1-16 pages of the same kind (real
// memory is clustered: free memory, page cache, heaps), with the proportions asked for (on
// average; defaults ~50% zero, ~30% text-like, ~20% random):
//   zero    written as zeros, as Firecracker writes a snapshot's free memory (or, with `holes`,
//           left as sparse holes, never written);
//   text    printable lines of words and code-like tokens, distinct per page (compresses well);
//   random  pseudo-random bytes (does not compress).
// The content is a pure function of the seed and the page index: the same options always write
// the same bytes.
//
// Thread safety: free function; no shared state.
#ifndef GUESTMEM_TOOLS_GMEM_SNAPSHOT_MAKER_H_
#define GUESTMEM_TOOLS_GMEM_SNAPSHOT_MAKER_H_

#include <cstddef>
#include <cstdint>
#include <functional>
#include <span>
#include <string>

#include "guestmem/result.h"

namespace guestmem {
class Os;
}

namespace guestmem::cli {

struct SnapshotMakerOptions {
  uint64_t size_bytes = 0;  // a non-zero multiple of 4 KiB
  uint64_t seed = 1;
  double zero_fraction = 0.5;
  double text_fraction = 0.3;
  double random_fraction = 0.2;
  bool holes = false;      // leave zero pages as sparse holes instead of writing zeros
  bool overwrite = false;  // replace an existing file (else kAlreadyExists)
  // Told how many pages are done so far, now and then and at the end (null: nobody).
  std::function<void(uint64_t done, uint64_t pages)> progress;
  Os* os = nullptr;  // Os::Default() when null
};

struct SnapshotSummary {
  uint64_t size_bytes = 0;
  uint64_t pages = 0;
  uint64_t zero_pages = 0;
  uint64_t text_pages = 0;
  uint64_t random_pages = 0;
  uint64_t seed = 0;
};

enum class SnapshotPageKind { kZero, kText, kRandom };

// Writes the memory file at `path`. kInvalidArgument: size not a non-zero multiple of 4 KiB, a
// negative fraction, fractions not adding up to 1. kAlreadyExists: `path` exists and not
// `overwrite`. The PosixError of a failed open, ftruncate or pwrite (naming the offset; a file
// that failed half-way is left as it is).
Result<SnapshotSummary> MakeSnapshot(const std::string& path, const SnapshotMakerOptions& options);

// The content of one non-zero page (what MakeSnapshot writes there). REQUIRES: out.size() == 4096.
void FillSnapshotPage(SnapshotPageKind kind, uint64_t seed, uint64_t page,
                      std::span<std::byte> out);

// A snapshot of the same VM taken later: a copy of the memory file `base` in which about
// `change_fraction` of its pages, scattered one by one, hold new content (text-like or random, 3
// to 2, as MakeSnapshot writes them). With `diff_only`, only the changed pages are written and
// every other page is left a hole — as Firecracker writes a diff snapshot over its base.
struct VariantOptions {
  double change_fraction = 0.05;
  uint64_t seed = 1;
  bool diff_only = false;
  bool overwrite = false;
};
struct VariantSummary {
  uint64_t pages = 0;
  uint64_t changed_pages = 0;
};
// ERRORS: kInvalidArgument for a fraction outside [0, 1] or a base that is not whole pages;
// kAlreadyExists; the PosixError of reading the base or writing the variant.
Result<VariantSummary> MakeVariant(const std::string& base, const std::string& path,
                                   const VariantOptions& options);

}  // namespace guestmem::cli

#endif  // GUESTMEM_TOOLS_GMEM_SNAPSHOT_MAKER_H_
