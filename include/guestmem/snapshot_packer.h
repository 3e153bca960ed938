// Making, checking, unpacking and comparing packed snapshots (packed_index.h).
//
// PackSnapshot reads a memory file (or any PageSource) once: zero pages are noted and not stored;
// over a parent, pages equal to the parent's are noted as the parent's (and, read as Firecracker's
// diff snapshot, the source's holes are the parent's pages); the rest is cut into chunks that are
// compressed on several threads at once, each written once however many times it occurs
// (inline, or into a chunk store that other snapshots share). The file is written beside its
// final name and renamed into place when whole.
//
// Thread safety: each call is independent; the sources must be safe from many threads.
#ifndef GUESTMEM_SNAPSHOT_PACKER_H_
#define GUESTMEM_SNAPSHOT_PACKER_H_

#include <cstdint>
#include <functional>
#include <string>
#include <vector>

#include "guestmem/chunk_codec.h"
#include "guestmem/packed_source.h"
#include "guestmem/page_source.h"
#include "guestmem/result.h"

namespace guestmem {

// Told how many of the source's bytes are done, out of how many.
using Progress = std::function<void(uint64_t done, uint64_t total)>;

// What a hole of the source (a run PageSource::ExtentAt calls kZero) stands for.
enum class HoleMeaning {
  kAuto,    // the parent's pages when packed over a parent (a diff snapshot), else zeros
  kZero,
  kParent,  // REQUIRES a parent
};

struct PackOptions {
  Codec codec = Codec::kZstd;
  int level = 3;
  uint32_t chunk_pages = 64;  // 256 KiB: see docs/benchmarks.md for why
  std::string parent_path;    // a packed snapshot; "" for a full one
  std::string store_directory;  // "" keeps chunks inline
  HoleMeaning holes = HoleMeaning::kAuto;
  unsigned threads = 0;  // compressing threads; 0: one per CPU
  std::vector<uint64_t> working_set;  // kept with the snapshot (pages, in order)
  Progress progress;
};

struct PackSummary {
  uint64_t raw_bytes = 0;
  uint64_t pages = 0, zero_pages = 0, parent_pages = 0, stored_pages = 0;
  uint64_t chunks = 0, chunks_shared = 0;  // shared: already written (inline or in the store)
  uint64_t compressed_bytes = 0;           // of the chunks written by this pack
  uint64_t file_bytes = 0;
  double seconds = 0;
};

// ERRORS: kInvalidArgument for bad options (a chunk size outside 64 KiB..4 MiB, a source whose
// size is not whole pages, kParent holes without a parent, a parent of another size); the
// source's and the parent's read errors; the PosixError of writing.
Result<PackSummary> PackSnapshot(const PageSource& source, const std::string& out_path,
                                 const PackOptions& options);

// Writes the raw memory file `source` stands for (zero pages as holes: the same bytes).
Status UnpackSnapshot(const PageSource& source, const std::string& out_path,
                      const Progress& progress = {});

// Every chunk of every layer read and checked against its hash. One entry per bad chunk.
struct BadChunk {
  std::string layer;  // the file
  size_t chunk = 0;
  Error why;
};
std::vector<BadChunk> VerifySnapshot(const PackedSource& source, const Progress& progress = {});

// Where two snapshots of one size differ, in runs of pages. ERRORS: kInvalidArgument for
// snapshots of different sizes; their read errors.
struct SnapshotDiff {
  uint64_t pages = 0, differing_pages = 0;
  std::vector<PageRun> runs;  // kind unused
};
Result<SnapshotDiff> DiffSnapshots(const PageSource& a, const PageSource& b,
                                   const Progress& progress = {});

}  // namespace guestmem

#endif  // GUESTMEM_SNAPSHOT_PACKER_H_
