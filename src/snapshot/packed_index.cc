#include "guestmem/packed_index.h"

#include <xxhash.h>

#include <algorithm>
#include <cstring>

#include "base/byte_cursor.h"

namespace guestmem {
namespace {

constexpr uint64_t kPage = 4096;
constexpr uint64_t kRunBytes = 32;
constexpr uint64_t kChunkBytes = 40;
constexpr uint64_t kCountsBytes = 8 * 4 + 4 * 2;
constexpr uint32_t kFlagParent = 1;

Error Corrupt(const std::string& why) {
  return Error(ErrorCode::kDataLoss, "packed snapshot: " + why);
}

// Reads `n` reserved bytes; false unless they are all zero (so that an index has one form).
bool Reserved(ByteReader& in, size_t n) {
  uint8_t b = 0, any = 0;
  for (size_t i = 0; i < n; ++i) {
    in.Get8(&b);
    any |= b;
  }
  return any == 0;
}

bool IsZero(const ChunkHash& hash) {
  return std::all_of(hash.begin(), hash.end(), [](uint8_t b) { return b == 0; });
}

}  // namespace

std::string_view PageKindName(PageKind kind) {
  switch (kind) {
    case PageKind::kZero:
      return "zero";
    case PageKind::kStored:
      return "stored";
    case PageKind::kParent:
      return "parent";
  }
  return "unknown";
}

void PackIndex::IndexChunks() {
  chunk_first.assign(1, 0);
  for (const ChunkRef& c : chunks) chunk_first.push_back(chunk_first.back() + c.pages);
}

size_t PackIndex::ChunkOf(uint64_t stored) const {
  auto it = std::upper_bound(chunk_first.begin(), chunk_first.end(), stored);
  return static_cast<size_t>(it - chunk_first.begin()) - 1;
}

const PageRun& PackIndex::RunAt(uint64_t page) const {
  auto it = std::upper_bound(runs.begin(), runs.end(), page,
                             [](uint64_t p, const PageRun& r) { return p < r.first_page; });
  return *std::prev(it);
}

ChunkHash PackIndex::Identity() const {
  ByteWriter w;
  w.Put64(raw_size);
  w.Put32(chunk_pages);
  for (const PageRun& r : runs) {
    w.Put64(r.first_page);
    w.Put64(r.pages);
    w.Put8(static_cast<uint8_t>(r.kind));
  }
  for (const ChunkRef& c : chunks) w.PutBytes(c.hash.data(), c.hash.size());
  w.PutBytes(parent_id.data(), parent_id.size());
  return HashChunk(std::as_bytes(std::span(w.bytes())));
}

std::vector<PageRun> PackIndex::PagesOfChunk(size_t chunk) const {
  const uint64_t begin = chunk_first.at(chunk);
  const uint64_t end = chunk_first.at(chunk + 1);
  std::vector<PageRun> out;
  for (const PageRun& r : runs) {
    if (r.kind != PageKind::kStored) continue;
    const uint64_t lo = std::max(begin, r.stored_first);
    const uint64_t hi = std::min(end, r.stored_first + r.pages);
    if (lo >= hi) continue;
    out.push_back(PageRun{.first_page = r.first_page + (lo - r.stored_first),
                          .pages = hi - lo,
                          .stored_first = lo,
                          .kind = PageKind::kStored});
  }
  return out;
}

std::string PackIndex::SerializeIndex() const {
  ByteWriter w;
  w.Put64(runs.size());
  w.Put64(chunks.size());
  uint64_t stored = 0;
  for (const ChunkRef& c : chunks) stored += c.pages;
  w.Put64(stored);
  w.Put64(working_set.size());
  w.Put32(static_cast<uint32_t>(parent_path.size()));
  w.Put32(static_cast<uint32_t>(store_path.size()));
  for (const PageRun& r : runs) {
    w.Put64(r.first_page);
    w.Put64(r.pages);
    w.Put64(r.kind == PageKind::kStored ? r.stored_first : 0);
    w.Put8(static_cast<uint8_t>(r.kind));
    w.PutZeros(7);
  }
  for (const ChunkRef& c : chunks) {
    w.PutBytes(c.hash.data(), c.hash.size());
    w.Put64(c.location == ChunkLocation::kInline ? c.offset : 0);
    w.Put32(c.compressed_bytes);
    w.Put32(c.pages);
    w.Put8(static_cast<uint8_t>(c.codec));
    w.Put8(static_cast<uint8_t>(c.location));
    w.PutZeros(6);
  }
  w.PutBytes(parent_path.data(), parent_path.size());
  w.PutBytes(store_path.data(), store_path.size());
  for (uint64_t page : working_set) w.Put64(page);
  return w.Take();
}

std::string PackIndex::SerializeHeader(uint64_t index_offset,
                                       std::span<const std::byte> index) const {
  ByteWriter w;
  w.PutBytes(kMagic, 8);
  w.Put32(kVersion);
  w.Put32(kHeaderBytes);
  w.Put64(raw_size);
  w.Put32(kPage);
  w.Put32(chunk_pages);
  w.Put64(index_offset);
  w.Put64(index.size());
  w.Put64(XXH3_64bits(index.data(), index.size()));
  const ChunkHash id = Identity();
  w.PutBytes(id.data(), id.size());
  w.PutBytes(parent_id.data(), parent_id.size());
  w.Put32(has_parent() ? kFlagParent : 0);
  w.PutZeros(kHeaderBytes - 8 - w.size());
  w.Put64(XXH3_64bits(w.bytes().data(), w.size()));
  return w.Take();
}

bool LooksPacked(std::span<const std::byte> bytes) {
  return bytes.size() >= 8 && std::memcmp(bytes.data(), PackIndex::kMagic, 8) == 0;
}

Result<PackHeader> ParsePackHeader(std::span<const std::byte> header, uint64_t file_size) {
  if (header.size() < PackIndex::kHeaderBytes || !LooksPacked(header)) {
    return Corrupt("no packed-snapshot header (wrong magic or shorter than " +
                   std::to_string(PackIndex::kHeaderBytes) + " bytes)");
  }
  header = header.first(PackIndex::kHeaderBytes);
  ByteReader in(header);
  in.Skip(8);
  uint32_t version = 0, header_bytes = 0, page_size = 0, flags = 0;
  PackHeader h;
  in.Get32(&version);
  if (version != PackIndex::kVersion) {
    return Error(ErrorCode::kUnsupported,
                 "packed snapshot: format version " + std::to_string(version) +
                     " (this gmem reads version " + std::to_string(PackIndex::kVersion) + ")");
  }
  uint64_t sealed = 0;
  ByteReader tail(header.subspan(PackIndex::kHeaderBytes - 8));
  tail.Get64(&sealed);
  if (XXH3_64bits(header.data(), PackIndex::kHeaderBytes - 8) != sealed) {
    return Corrupt("header checksum mismatch (a torn or corrupt file)");
  }
  in.Get32(&header_bytes);
  in.Get64(&h.raw_size);
  in.Get32(&page_size);
  in.Get32(&h.chunk_pages);
  in.Get64(&h.index_offset);
  in.Get64(&h.index_bytes);
  in.Get64(&h.index_checksum);
  in.GetBytes(h.identity.data(), h.identity.size());
  in.GetBytes(h.parent_id.data(), h.parent_id.size());
  in.Get32(&flags);
  if (header_bytes != PackIndex::kHeaderBytes || page_size != kPage) {
    return Corrupt("header size " + std::to_string(header_bytes) + " or page size " +
                   std::to_string(page_size) + " is not this format's");
  }
  if (h.raw_size % kPage != 0 || h.raw_size > PackIndex::kMaxRawBytes) {
    return Corrupt("raw size " + std::to_string(h.raw_size) +
                   " is not a whole number of pages below 2^48");
  }
  if (h.chunk_pages < PackIndex::kMinChunkPages || h.chunk_pages > PackIndex::kMaxChunkPages) {
    return Corrupt("chunk of " + std::to_string(h.chunk_pages) + " pages (allowed: " +
                   std::to_string(PackIndex::kMinChunkPages) + " to " +
                   std::to_string(PackIndex::kMaxChunkPages) + ")");
  }
  // The index ends the file: every byte of a packed snapshot is checked by one checksum or hash.
  if (h.index_offset < PackIndex::kDataStart || h.index_offset > file_size ||
      h.index_bytes != file_size - h.index_offset) {
    return Corrupt("index at " + std::to_string(h.index_offset) + " (" +
                   std::to_string(h.index_bytes) + " bytes) does not end the file of " +
                   std::to_string(file_size) + " bytes (truncated or extended?)");
  }
  if (((flags & kFlagParent) != 0) == IsZero(h.parent_id)) {
    return Corrupt("parent flag and parent identity disagree");
  }
  return h;
}

Result<PackIndex> ParsePackIndex(const PackHeader& header, std::span<const std::byte> index) {
  if (index.size() != header.index_bytes ||
      XXH3_64bits(index.data(), index.size()) != header.index_checksum) {
    return Corrupt("index checksum mismatch (a torn or corrupt file)");
  }
  ByteReader in(index);
  uint64_t run_count = 0, chunk_count = 0, stored_pages = 0, ws_count = 0;
  uint32_t parent_len = 0, store_len = 0;
  if (!in.Get64(&run_count) || !in.Get64(&chunk_count) || !in.Get64(&stored_pages) ||
      !in.Get64(&ws_count) || !in.Get32(&parent_len) || !in.Get32(&store_len)) {
    return Corrupt("index shorter than its counts");
  }
  PackIndex out;
  out.raw_size = header.raw_size;
  out.chunk_pages = header.chunk_pages;
  out.parent_id = header.parent_id;
  const uint64_t pages = out.page_count();
  // Each count is bounded by what the index can hold before anything is sized from it.
  const uint64_t left = in.left();
  if (run_count > left / kRunBytes || chunk_count > left / kChunkBytes ||
      ws_count > left / 8 || ws_count > pages || parent_len > PackIndex::kMaxPathBytes ||
      store_len > PackIndex::kMaxPathBytes ||
      run_count * kRunBytes + chunk_count * kChunkBytes + parent_len + store_len + ws_count * 8 !=
          left) {
    return Corrupt("index counts (" + std::to_string(run_count) + " runs, " +
                   std::to_string(chunk_count) + " chunks) do not match its " +
                   std::to_string(index.size()) + " bytes");
  }
  if ((pages == 0) != (run_count == 0) || run_count > pages) {
    return Corrupt(std::to_string(run_count) + " runs for " + std::to_string(pages) + " pages");
  }
  if (stored_pages > pages || chunk_count > stored_pages ||
      chunk_count < (stored_pages + header.chunk_pages - 1) / header.chunk_pages) {
    return Corrupt(std::to_string(chunk_count) + " chunks for " + std::to_string(stored_pages) +
                   " stored pages of at most " + std::to_string(header.chunk_pages) +
                   " per chunk");
  }
  out.runs.resize(run_count);
  uint64_t next_page = 0, next_stored = 0;
  for (PageRun& r : out.runs) {
    uint8_t kind = 0;
    in.Get64(&r.first_page);
    in.Get64(&r.pages);
    in.Get64(&r.stored_first);
    in.Get8(&kind);
    if (!Reserved(in, 7)) return Corrupt("reserved bytes of a run are not zero");
    if (kind > static_cast<uint8_t>(PageKind::kParent) ||
        (kind == static_cast<uint8_t>(PageKind::kParent) && IsZero(header.parent_id))) {
      return Corrupt("run at page " + std::to_string(r.first_page) + " of unknown kind " +
                     std::to_string(kind));
    }
    r.kind = static_cast<PageKind>(kind);
    if (r.first_page != next_page || r.pages == 0 || r.pages > pages - next_page) {
      return Corrupt("runs do not cover the pages in order (at page " +
                     std::to_string(next_page) + ")");
    }
    if (&r != &out.runs.front() && std::prev(&r)->kind == r.kind) {
      return Corrupt("two neighbouring runs of one kind at page " + std::to_string(r.first_page));
    }
    if (r.kind == PageKind::kStored) {
      if (r.stored_first != next_stored) {
        return Corrupt("stored pages out of order at page " + std::to_string(r.first_page));
      }
      next_stored += r.pages;
    } else if (r.stored_first != 0) {
      return Corrupt("a " + std::string(PageKindName(r.kind)) + " run names stored pages");
    }
    next_page += r.pages;
  }
  if (next_page != pages || next_stored != stored_pages) {
    return Corrupt("runs cover " + std::to_string(next_page) + " pages and " +
                   std::to_string(next_stored) + " stored ones, not " + std::to_string(pages) +
                   " and " + std::to_string(stored_pages));
  }
  out.chunks.resize(chunk_count);
  bool any_in_store = false;
  uint64_t chunked = 0;
  for (size_t i = 0; i < out.chunks.size(); ++i) {
    ChunkRef& c = out.chunks[i];
    uint8_t codec = 0, location = 0;
    in.GetBytes(c.hash.data(), c.hash.size());
    in.Get64(&c.offset);
    in.Get32(&c.compressed_bytes);
    in.Get32(&c.pages);
    in.Get8(&codec);
    in.Get8(&location);
    if (!Reserved(in, 6)) return Corrupt("reserved bytes of a chunk are not zero");
    if (codec > static_cast<uint8_t>(Codec::kZstd) ||
        location > static_cast<uint8_t>(ChunkLocation::kStore) || c.pages == 0 ||
        c.pages > header.chunk_pages || c.pages > stored_pages - chunked) {
      return Corrupt("chunk " + std::to_string(i) + ": unknown codec or location, or " +
                     std::to_string(c.pages) + " pages (at most " +
                     std::to_string(header.chunk_pages) + ", and " +
                     std::to_string(stored_pages - chunked) + " stored pages left)");
    }
    chunked += c.pages;
    c.codec = static_cast<Codec>(codec);
    c.location = static_cast<ChunkLocation>(location);
    const uint64_t raw_bytes = c.raw_bytes();
    if (c.compressed_bytes == 0 || c.compressed_bytes > CompressBound(c.codec, raw_bytes)) {
      return Corrupt("chunk " + std::to_string(i) + ": " + std::to_string(c.compressed_bytes) +
                     " bytes cannot hold " + std::to_string(c.pages) + " pages");
    }
    if (c.location == ChunkLocation::kInline &&
        (c.offset < PackIndex::kDataStart || c.offset > header.index_offset ||
         c.compressed_bytes > header.index_offset - c.offset)) {
      return Corrupt("chunk " + std::to_string(i) + " lies outside the file's chunk data");
    }
    if (c.location == ChunkLocation::kStore && c.offset != 0) {
      return Corrupt("chunk " + std::to_string(i) + " in the store names a file offset");
    }
    any_in_store |= c.location == ChunkLocation::kStore;
  }
  if (chunked != stored_pages) {
    return Corrupt("chunks hold " + std::to_string(chunked) + " pages, not the " +
                   std::to_string(stored_pages) + " stored");
  }
  out.IndexChunks();
  out.parent_path.resize(parent_len);
  out.store_path.resize(store_len);
  in.GetBytes(out.parent_path.data(), parent_len);
  in.GetBytes(out.store_path.data(), store_len);
  if (out.parent_path.empty() != IsZero(header.parent_id) ||
      (any_in_store && out.store_path.empty())) {
    return Corrupt("a parent or a store is used but not named");
  }
  if (out.parent_path.find('\0') != std::string::npos ||
      out.store_path.find('\0') != std::string::npos) {
    return Corrupt("a path holds a NUL byte");
  }
  out.working_set.resize(ws_count);
  for (uint64_t& page : out.working_set) {
    in.Get64(&page);
    if (page >= pages) return Corrupt("working set names page " + std::to_string(page));
  }
  return out;
}

Result<PackIndex> ParseSealedPackIndex(const PackHeader& header, std::span<const std::byte> index,
                                       const std::string& name) {
  auto parsed = ParsePackIndex(header, index);
  if (!parsed) return std::move(parsed).error().WithContext(name);
  if (parsed->Identity() != header.identity) {
    return Error(ErrorCode::kDataLoss,
                 name + ": packed snapshot: its index is not the one its header names");
  }
  return parsed;
}

}  // namespace guestmem
