// PackIndex: what a packed snapshot says of itself (docs/snapshot-format.md).
//
// A packed snapshot stands for a raw memory file of raw_size bytes, in 4 KiB pages. Each page is
// one of three kinds, listed as runs in page order:
//   zero    — all zeros; nothing is stored;
//   stored  — its content is the next page of the snapshot's stored pages;
//   parent  — as in the parent snapshot (a layer stores only the pages that differ from its
//             parent: Firecracker's diff snapshot over its base).
// The stored pages, in page order, are cut into chunks: chunk boundaries fall at every
// chunk_pages-th guest page (so a change in one part of guest memory leaves the chunks of every
// other part as they were, and shared), each chunk holding the stored pages of its part. Each is
// compressed on its own (chunk_codec.h) and named by the XXH3-128 of its content: inline in the file, or in a
// content-addressed store directory (chunk_store.h) that the snapshots of one template share.
// The index also carries the parent's path and identity, the store's path and a working set (the
// pages earlier restores needed, in order).
//
// Parse() trusts nothing: every count, offset and size is checked against the others and against
// the file before anything is sized from it, so a hostile file is an error, never a crash or an
// allocation larger than the file.
//
// Thread safety: immutable after Parse; safe from many threads.
#ifndef GUESTMEM_PACKED_INDEX_H_
#define GUESTMEM_PACKED_INDEX_H_

#include <cstddef>
#include <cstdint>
#include <span>
#include <string>
#include <vector>

#include "guestmem/chunk_codec.h"
#include "guestmem/result.h"

namespace guestmem {

enum class PageKind : uint8_t { kZero = 0, kStored = 1, kParent = 2 };
std::string_view PageKindName(PageKind kind);

struct PageRun {
  uint64_t first_page = 0;
  uint64_t pages = 0;
  uint64_t stored_first = 0;  // kStored: the index of its first page among the stored pages
  PageKind kind = PageKind::kZero;
  uint64_t end_page() const { return first_page + pages; }
  bool operator==(const PageRun&) const = default;
};

enum class ChunkLocation : uint8_t { kInline = 0, kStore = 1 };

struct ChunkRef {
  ChunkHash hash{};           // XXH3-128 of the uncompressed content
  uint64_t offset = 0;        // kInline: where its compressed bytes start in the file
  uint32_t compressed_bytes = 0;
  uint32_t pages = 0;         // stored pages it holds: 1 to chunk_pages
  Codec codec = Codec::kNone;
  ChunkLocation location = ChunkLocation::kInline;
  // The bytes of its uncompressed content (at most kMaxChunkPages pages: it fits).
  uint32_t raw_bytes() const { return pages * 4096; }
  bool operator==(const ChunkRef&) const = default;
};

struct PackIndex {
  static constexpr char kMagic[9] = "GMEMPACK";
  static constexpr uint32_t kVersion = 1;
  static constexpr uint64_t kHeaderBytes = 128;
  static constexpr uint64_t kDataStart = kHeaderBytes;  // inline chunks follow the header
  static constexpr uint32_t kMinChunkPages = 16;    // 64 KiB
  static constexpr uint32_t kMaxChunkPages = 1024;  // 4 MiB
  static constexpr uint64_t kMaxPathBytes = 4096;
  static constexpr uint64_t kMaxRawBytes = uint64_t{1} << 48;

  uint64_t raw_size = 0;
  uint32_t chunk_pages = 0;
  std::vector<PageRun> runs;  // cover [0, page_count()) in order, no two neighbours of one kind
  std::vector<ChunkRef> chunks;
  ChunkHash parent_id{};        // all zero when there is no parent
  std::string parent_path;      // relative to the snapshot's directory unless absolute
  std::string store_path;       // likewise; empty when every chunk is inline
  std::vector<uint64_t> working_set;  // pages, in the order a restore should install them

  uint64_t page_count() const { return raw_size / 4096; }
  uint64_t stored_pages() const { return chunk_first.empty() ? 0 : chunk_first.back(); }
  // chunk_first[i]: the index among the stored pages of chunk i's first page; one more entry
  // holds stored_pages(). Made by Parse, or by IndexChunks() after chunks is filled.
  std::vector<uint64_t> chunk_first;
  void IndexChunks();
  // The chunk that holds stored page `stored`. REQUIRES: stored < stored_pages().
  size_t ChunkOf(uint64_t stored) const;
  bool has_parent() const { return !parent_path.empty(); }
  // The run that holds `page`. REQUIRES: page < page_count().
  const PageRun& RunAt(uint64_t page) const;
  // The identity children name as their parent: XXH3-128 of raw_size, the runs, the chunks'
  // hashes and the parent's identity (not of paths, which may move).
  ChunkHash Identity() const;
  // The page runs (in guest pages) that chunk `chunk`'s pages stand for.
  std::vector<PageRun> PagesOfChunk(size_t chunk) const;

  // The index's bytes, and the header that seals them (index_offset: where the index is written).
  std::string SerializeIndex() const;
  std::string SerializeHeader(uint64_t index_offset, std::span<const std::byte> index) const;
};

// Where the header says the index is.
struct PackHeader {
  uint64_t raw_size = 0;
  uint32_t chunk_pages = 0;
  uint64_t index_offset = 0;
  uint64_t index_bytes = 0;
  uint64_t index_checksum = 0;
  ChunkHash identity{};
  ChunkHash parent_id{};
};

// True when `bytes` starts with the packed-snapshot magic.
bool LooksPacked(std::span<const std::byte> bytes);

// ERRORS: kDataLoss for a header that is not one (magic, checksum, sizes), naming what is wrong;
// kUnsupported for another version.
Result<PackHeader> ParsePackHeader(std::span<const std::byte> header, uint64_t file_size);
// ERRORS: kDataLoss for an index that does not match its header's checksum or is inconsistent in
// itself. Whether it is the index the header names (header.identity == Identity()) is for the
// caller to check: ParseSealedPackIndex does.
Result<PackIndex> ParsePackIndex(const PackHeader& header, std::span<const std::byte> index);
// ParsePackIndex, and the index must be the one the header names: what a reader of a packed
// snapshot takes. `name` (its path or URL) heads the messages. ERRORS: kDataLoss.
Result<PackIndex> ParseSealedPackIndex(const PackHeader& header, std::span<const std::byte> index,
                                       const std::string& name);

}  // namespace guestmem

#endif  // GUESTMEM_PACKED_INDEX_H_
