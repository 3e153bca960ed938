#include "guestmem/packed_source.h"

#include <algorithm>
#include <cstring>
#include <filesystem>

#include "guestmem/log.h"

namespace guestmem {
namespace {

constexpr uint64_t kPage = 4096;

// Set on the background decoders' threads: what they decode is ahead already, not read ahead of.
thread_local bool t_decoding_ahead = false;

// `name` as the layer at `from` names it: relative to that file's directory unless absolute.
std::string Beside(const std::string& from, const std::string& name) {
  if (name.empty() || name.front() == '/') return name;
  return (std::filesystem::path(from).parent_path() / name).lexically_normal().string();
}

std::string Pages(const std::vector<PageRun>& runs) {
  std::string out;
  for (size_t i = 0; i < runs.size() && i < 4; ++i) {
    if (!out.empty()) out += ", ";
    out += std::to_string(runs[i].first_page);
    if (runs[i].pages > 1) out += "-" + std::to_string(runs[i].end_page() - 1);
  }
  if (runs.size() > 4) out += " and " + std::to_string(runs.size() - 4) + " more runs";
  return out;
}

}  // namespace

Result<std::unique_ptr<PackedSource>> PackedSource::Open(const std::string& path,
                                                         PackedSourceOptions options) {
  std::shared_ptr<ChunkCache> cache =
      options.cache ? options.cache : std::make_shared<ChunkCache>(options.cache_bytes);
  return OpenLayer(path, options, cache, 0);
}

Result<std::unique_ptr<PackedSource>> PackedSource::OpenLayer(
    const std::string& path, const PackedSourceOptions& options,
    const std::shared_ptr<ChunkCache>& cache, int depth) {
  if (depth >= kMaxLayers) {
    return Error(ErrorCode::kFailedPrecondition,
                 path + ": more than " + std::to_string(kMaxLayers) + " layers (a cycle?)");
  }
  GM_ASSIGN_OR_RETURN(std::unique_ptr<RawFileSource> file, RawFileSource::Open(path));
  std::vector<std::byte> header(std::min<uint64_t>(PackIndex::kHeaderBytes, file->size()));
  GM_RETURN_IF_ERROR(file->ReadAt(FileOffset(0), header));
  auto parsed_header = ParsePackHeader(header, file->size());
  if (!parsed_header) return std::move(parsed_header).error().WithContext(path);
  std::vector<std::byte> index_bytes(parsed_header->index_bytes);
  GM_RETURN_IF_ERROR(file->ReadAt(FileOffset(parsed_header->index_offset), index_bytes));
  auto index = ParsePackIndex(*parsed_header, index_bytes);
  if (!index) return std::move(index).error().WithContext(path);
  if (index->Identity() != parsed_header->identity) {
    return Error(ErrorCode::kDataLoss,
                 path + ": packed snapshot: its index is not the one its header names");
  }

  std::unique_ptr<PackedSource> parent;
  if (index->has_parent()) {
    const std::string parent_path = Beside(path, index->parent_path);
    auto opened = OpenLayer(parent_path, options, cache, depth + 1);
    if (!opened) {
      return std::move(opened).error().WithContext(path + ": its parent " + parent_path);
    }
    parent = std::move(*opened);
    if (parent->index().Identity() != index->parent_id) {
      return Error(ErrorCode::kFailedPrecondition,
                   path + ": its parent " + parent_path +
                       " is not the snapshot it was packed over (identity " +
                       ToHex(parent->index().Identity()) + ", expected " +
                       ToHex(index->parent_id) + ")");
    }
    if (parent->index().page_count() < index->page_count()) {
      return Error(ErrorCode::kFailedPrecondition,
                   path + ": its parent " + parent_path + " is smaller than it");
    }
  }
  std::optional<ChunkStore> store;
  if (!index->store_path.empty()) {
    const std::string dir = options.store_directory.empty()
                                ? Beside(path, index->store_path)
                                : options.store_directory;
    GM_ASSIGN_OR_RETURN(ChunkStore opened, ChunkStore::Open(dir, /*create=*/false));
    store = std::move(opened);
  }
  return std::unique_ptr<PackedSource>(new PackedSource(std::move(file), std::move(*index),
                                                        std::move(parent), std::move(store),
                                                        cache, options.decode_threads));
}

PackedSource::PackedSource(std::unique_ptr<RawFileSource> file, PackIndex index,
                           std::unique_ptr<PackedSource> parent, std::optional<ChunkStore> store,
                           std::shared_ptr<ChunkCache> cache, unsigned decode_threads)
    : file_(std::move(file)),
      index_(std::move(index)),
      parent_(std::move(parent)),
      store_(std::move(store)),
      cache_(std::move(cache)) {
  for (unsigned i = 0; i < decode_threads && !index_.chunks.empty(); ++i) {
    decoders_.emplace_back([this] { DecodeLoop(); });
  }
}

PackedSource::~PackedSource() {
  {
    std::lock_guard lock(decode_mu_);
    stopping_ = true;
  }
  decode_cv_.notify_all();
  for (std::thread& t : decoders_) t.join();
}

Error PackedSource::ChunkError(size_t chunk, const Error& why) const {
  return Error(why.code(),
               file_->path() + ": chunk " + std::to_string(chunk) + " (" +
                   ToHex(index_.chunks[chunk].hash) + ", pages " +
                   Pages(index_.PagesOfChunk(chunk)) + "): " + why.ToString(),
               why.sys_errno());
}

Result<ChunkCache::Chunk> PackedSource::LoadChunk(size_t chunk) const {
  const ChunkRef& ref = index_.chunks.at(chunk);
  const uint64_t raw_bytes = uint64_t{ref.pages} * kPage;
  std::vector<std::byte> compressed;
  Codec codec = ref.codec;
  if (ref.location == ChunkLocation::kInline) {
    compressed.resize(ref.compressed_bytes);
    if (Status read = file_->ReadAt(FileOffset(ref.offset), compressed); !read) {
      return ChunkError(chunk, read.error());
    }
  } else {
    auto stored = store_->Get(ref.hash, CompressBound(ref.codec, raw_bytes));
    if (!stored) return ChunkError(chunk, stored.error());
    if (stored->raw_bytes != raw_bytes) {
      return ChunkError(chunk, Error(ErrorCode::kDataLoss,
                                     "the store holds " + std::to_string(stored->raw_bytes) +
                                         " bytes under its name"));
    }
    codec = stored->codec;
    compressed = std::move(stored->compressed);
  }
  auto decoded = std::make_shared<DecodedChunk>(raw_bytes);
  if (Status ok = DecompressChunk(codec, compressed, decoded->mutable_bytes()); !ok) {
    return ChunkError(chunk, ok.error());
  }
  if (HashChunk(decoded->bytes()) != ref.hash) {
    return ChunkError(chunk, Error(ErrorCode::kDataLoss, "content does not match its hash"));
  }
  return ChunkCache::Chunk(std::move(decoded));
}

Result<ChunkCache::Chunk> PackedSource::Chunk(size_t chunk) const {
  bool loaded_here = false;
  auto got = cache_->Get(index_.chunks.at(chunk).hash, [this, chunk, &loaded_here] {
    loaded_here = true;
    return LoadChunk(chunk);
  });
  if (loaded_here && !t_decoding_ahead) {
    // A reader waited for this one: the next ones are decoded while it installs it.
    std::vector<size_t> next;
    for (size_t c = chunk + 1; c < index_.chunks.size() && next.size() < kReadAheadChunks; ++c) {
      next.push_back(c);
    }
    DecodeAhead(next);
  }
  return got;
}

Result<PageSource::HeldView> PackedSource::HoldView(FileOffset offset, uint64_t length) const {
  if (length == 0 || offset.value() >= size() || length > size() - offset.value() ||
      offset.value() % kPage != 0) {
    return HeldView{};
  }
  const uint64_t page = offset.value() / kPage;
  const PageRun& run = index_.RunAt(page);
  const uint64_t pages = (length + kPage - 1) / kPage;
  if (run.kind != PageKind::kStored || page + pages > run.end_page()) {
    if (run.kind == PageKind::kParent && page + pages <= run.end_page()) {
      return parent_->HoldView(offset, length);
    }
    return HeldView{};
  }
  const uint64_t stored = run.stored_first + (page - run.first_page);
  const size_t chunk = index_.ChunkOf(stored);
  if (stored + pages > index_.chunk_first[chunk + 1]) return HeldView{};  // spans two chunks
  GM_ASSIGN_OR_RETURN(ChunkCache::Chunk content, Chunk(chunk));
  const uint64_t in_chunk = (stored - index_.chunk_first[chunk]) * kPage;
  return HeldView{.bytes = content->bytes().subspan(in_chunk, length), .keep = content};
}

Status PackedSource::ReadAt(FileOffset offset, std::span<std::byte> out) const {
  if (offset.value() > size() || out.size() > size() - offset.value()) {
    return Error(ErrorCode::kOutOfRange, Describe() + ": read of " + std::to_string(out.size()) +
                                             " bytes at " + std::to_string(offset.value()) +
                                             " past its end");
  }
  uint64_t at = offset.value();
  size_t done = 0;
  while (done < out.size()) {
    const uint64_t page = at / kPage;
    const PageRun& run = index_.RunAt(page);
    const uint64_t run_end = run.end_page() * kPage;
    uint64_t n = std::min<uint64_t>(out.size() - done, run_end - at);
    std::span<std::byte> piece = out.subspan(done, n);
    switch (run.kind) {
      case PageKind::kZero:
        std::memset(piece.data(), 0, piece.size());
        break;
      case PageKind::kParent:
        GM_RETURN_IF_ERROR(parent_->ReadAt(FileOffset(at), piece));
        break;
      case PageKind::kStored: {
        const uint64_t stored = run.stored_first + (page - run.first_page);
        const size_t chunk = index_.ChunkOf(stored);
        const uint64_t in_chunk = (stored - index_.chunk_first[chunk]) * kPage + at % kPage;
        GM_ASSIGN_OR_RETURN(ChunkCache::Chunk content, Chunk(chunk));
        n = std::min<uint64_t>(n, content->bytes().size() - in_chunk);
        std::memcpy(piece.data(), content->bytes().data() + in_chunk, n);
        break;
      }
    }
    at += n;
    done += n;
  }
  return OkStatus();
}

Result<Extent> PackedSource::ExtentAt(FileOffset offset) const {
  if (offset.value() >= size()) {
    return Error(ErrorCode::kOutOfRange,
                 Describe() + ": no extent at " + std::to_string(offset.value()));
  }
  const PageRun& run = index_.RunAt(offset.value() / kPage);
  const uint64_t run_end = run.end_page() * kPage;
  if (run.kind == PageKind::kParent) {
    GM_ASSIGN_OR_RETURN(Extent below, parent_->ExtentAt(offset));
    below.length = std::min(below.length, run_end - offset.value());
    return below;
  }
  return Extent{.offset = offset,
                .length = run_end - offset.value(),
                .kind = run.kind == PageKind::kZero ? ExtentKind::kZero : ExtentKind::kData};
}

void PackedSource::WillNeed(FileOffset offset, uint64_t length) const {
  if (offset.value() >= size()) return;
  length = std::min(length, size() - offset.value());
  uint64_t page = offset.value() / kPage;
  const uint64_t end = (offset.value() + length + kPage - 1) / kPage;
  std::vector<size_t> chunks;
  while (page < end) {
    const PageRun& run = index_.RunAt(page);
    const uint64_t stop = std::min(end, run.end_page());
    if (run.kind == PageKind::kParent) {
      parent_->WillNeed(FileOffset(page * kPage), (stop - page) * kPage);
    } else if (run.kind == PageKind::kStored) {
      const uint64_t first = index_.ChunkOf(run.stored_first + page - run.first_page);
      const uint64_t last = index_.ChunkOf(run.stored_first + stop - 1 - run.first_page);
      for (uint64_t c = first; c <= last; ++c) {
        if (chunks.empty() || chunks.back() != c) chunks.push_back(c);
      }
    }
    page = stop;
  }
  DecodeAhead(chunks);
}

void PackedSource::DecodeAhead(const std::vector<size_t>& chunks) const {
  if (decoders_.empty() || chunks.empty()) return;
  {
    std::lock_guard lock(decode_mu_);
    // Bounded: hints beyond what the cache could hold would only evict each other.
    const size_t limit = std::max<size_t>(1, cache_->capacity() / chunk_bytes());
    for (size_t c : chunks) {
      if (decode_queue_.size() >= limit) break;
      decode_queue_.push_back(c);
    }
  }
  decode_cv_.notify_all();
}

void PackedSource::DecodeLoop() {
  t_decoding_ahead = true;
  std::unique_lock lock(decode_mu_);
  while (true) {
    decode_cv_.wait(lock, [this] { return stopping_ || !decode_queue_.empty(); });
    if (stopping_) return;
    const size_t chunk = decode_queue_.front();
    decode_queue_.pop_front();
    lock.unlock();
    if (!cache_->Contains(index_.chunks[chunk].hash)) {
      // A chunk that cannot be read fails again for the read that needs it, which reports it.
      (void)Chunk(chunk);
    }
    lock.lock();
  }
}

std::string PackedSource::Describe() const {
  const uint64_t stored = index_.stored_pages();
  const uint64_t pages = std::max<uint64_t>(1, index_.page_count());
  return "packed snapshot " + file_->path() + " (" + std::to_string(size() >> 20) + " MiB, " +
         std::to_string(layers()) + (layers() == 1 ? " layer, " : " layers, ") +
         std::to_string(100 * stored / pages) + "% stored in " +
         std::to_string(index_.chunks.size()) + " chunks of " +
         std::to_string(chunk_bytes() >> 10) + " KiB)";
}

Result<std::unique_ptr<PageSource>> OpenAnySnapshot(const std::string& path,
                                                    PackedSourceOptions options) {
  GM_ASSIGN_OR_RETURN(std::unique_ptr<RawFileSource> raw, RawFileSource::Open(path));
  std::byte magic[8] = {};
  if (raw->size() >= sizeof(magic) && raw->ReadAt(FileOffset(0), magic) && LooksPacked(magic)) {
    raw.reset();
    GM_ASSIGN_OR_RETURN(std::unique_ptr<PackedSource> packed,
                        PackedSource::Open(path, std::move(options)));
    return std::unique_ptr<PageSource>(std::move(packed));
  }
  return std::unique_ptr<PageSource>(std::move(raw));
}

}  // namespace guestmem
