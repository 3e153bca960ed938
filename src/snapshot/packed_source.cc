#include "guestmem/packed_source.h"

#include <algorithm>
#include <cstring>

#include "guestmem/log.h"
#include "snapshot/background_loader.h"

namespace guestmem {
namespace {

constexpr uint64_t kPage = 4096;

// Set on the background decoders' threads: what they decode is ahead already, not read ahead of.
thread_local bool t_decoding_ahead = false;

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
  GM_ASSIGN_OR_RETURN(std::unique_ptr<LocalPackStorage> storage,
                      LocalPackStorage::Open(path, options.store_directory));
  return Open(std::move(storage), std::move(options));
}

Result<std::unique_ptr<PackedSource>> PackedSource::Open(std::unique_ptr<PackStorage> storage,
                                                         PackedSourceOptions options) {
  std::shared_ptr<ChunkCache> cache =
      options.cache ? options.cache : std::make_shared<ChunkCache>(options.cache_bytes);
  return OpenLayer(std::move(storage), options, cache, 0);
}

Result<std::unique_ptr<PackedSource>> PackedSource::OpenLayer(
    std::unique_ptr<PackStorage> storage, const PackedSourceOptions& options,
    const std::shared_ptr<ChunkCache>& cache, int depth) {
  const std::string path = storage->name();
  if (depth >= kMaxLayers) {
    return Error(ErrorCode::kFailedPrecondition,
                 path + ": more than " + std::to_string(kMaxLayers) + " layers (a cycle?)");
  }
  std::vector<std::byte> header(std::min<uint64_t>(PackIndex::kHeaderBytes, storage->size()));
  GM_RETURN_IF_ERROR(storage->ReadAt(0, header));
  auto parsed_header = ParsePackHeader(header, storage->size());
  if (!parsed_header) return std::move(parsed_header).error().WithContext(path);
  std::vector<std::byte> index_bytes(parsed_header->index_bytes);
  GM_RETURN_IF_ERROR(storage->ReadAt(parsed_header->index_offset, index_bytes));
  auto index = ParseSealedPackIndex(*parsed_header, index_bytes, path);
  if (!index) return std::move(index).error();

  std::unique_ptr<PackedSource> parent;
  if (index->has_parent()) {
    auto parent_storage = storage->OpenParent(index->parent_path);
    if (!parent_storage) {
      return std::move(parent_storage).error().WithContext(path + ": its parent");
    }
    const std::string parent_path = (*parent_storage)->name();
    auto opened = OpenLayer(std::move(*parent_storage), options, cache, depth + 1);
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
  if (!index->store_path.empty()) GM_RETURN_IF_ERROR(storage->OpenStore(index->store_path));
  return std::unique_ptr<PackedSource>(new PackedSource(
      std::move(storage), std::move(*index), std::move(parent), cache, options.decode_threads));
}

PackedSource::PackedSource(std::unique_ptr<PackStorage> storage, PackIndex index,
                           std::unique_ptr<PackedSource> parent, std::shared_ptr<ChunkCache> cache,
                           unsigned decode_threads)
    : storage_(std::move(storage)),
      index_(std::move(index)),
      parent_(std::move(parent)),
      cache_(std::move(cache)) {
  // Chunks wanted ahead beyond what the cache could hold would only evict each other.
  const size_t ahead_limit = std::max<size_t>(1, cache_->capacity() / chunk_bytes());
  decoder_ = std::make_unique<BackgroundLoader>(index_.chunks.empty() ? 0 : decode_threads,
                                                ahead_limit, [this](size_t chunk) -> Status {
                                                  t_decoding_ahead = true;
                                                  auto loaded = Chunk(chunk);
                                                  if (!loaded) return std::move(loaded).error();
                                                  return OkStatus();
                                                });
}

PackedSource::~PackedSource() = default;

Error PackedSource::ChunkError(size_t chunk, const Error& why) const {
  return Error(why.code(),
               storage_->name() + ": chunk " + std::to_string(chunk) + " (" +
                   ToHex(index_.chunks[chunk].hash) + ", pages " +
                   Pages(index_.PagesOfChunk(chunk)) + "): " + why.ToString(),
               why.sys_errno());
}

Result<ChunkCache::Chunk> PackedSource::LoadChunk(size_t chunk) const {
  const ChunkRef& ref = index_.chunks.at(chunk);
  const uint32_t raw_bytes = ref.raw_bytes();
  // A copy kept on the way (a remote chunk cached on disk) may be torn: the chunk is read once
  // more from where it comes from before it is taken to be corrupt.
  Error why(ErrorCode::kInternal, "not read");
  for (bool again : {false, true}) {
    auto stored = storage_->ReadChunk(ref, raw_bytes, again);
    if (!stored) {
      if (stored.error().code() != ErrorCode::kDataLoss) return ChunkError(chunk, stored.error());
      why = std::move(stored).error();
      continue;
    }
    if (stored->raw_bytes != raw_bytes) {
      why = Error(ErrorCode::kDataLoss,
                  "the store holds " + std::to_string(stored->raw_bytes) + " bytes under its name");
      continue;
    }
    auto decoded = std::make_shared<DecodedChunk>(raw_bytes);
    if (Status ok = DecompressChunk(stored->codec, stored->compressed, decoded->mutable_bytes());
        !ok) {
      why = ok.error();
      continue;
    }
    if (HashChunk(decoded->bytes()) != ref.hash) {
      why = Error(ErrorCode::kDataLoss, "content does not match its hash");
      continue;
    }
    return ChunkCache::Chunk(std::move(decoded));
  }
  return ChunkError(chunk, why);
}

Result<ChunkCache::Chunk> PackedSource::Chunk(size_t chunk) const {
  // A reader meets a failure its loaders just had, rather than trying again on its own thread
  // (a fetch from a store that stopped answering would hold it for a whole deadline).
  if (!t_decoding_ahead) {
    if (std::optional<Error> failed = decoder_->Failed(chunk);
        failed && !cache_->Contains(index_.chunks[chunk].hash)) {
      return *std::move(failed);
    }
  }
  bool loaded_here = false;
  auto got = cache_->Get(index_.chunks.at(chunk).hash, [this, chunk, &loaded_here] {
    loaded_here = true;
    return LoadChunk(chunk);
  });
  if (loaded_here && !t_decoding_ahead) ReadAheadAfter(chunk);  // a reader waited for this one
  return got;
}

void PackedSource::ReadAheadAfter(size_t chunk) const {
  std::vector<size_t> next;
  for (size_t c = chunk + 1; c < index_.chunks.size() && next.size() < kReadAheadChunks; ++c) {
    if (!cache_->Contains(index_.chunks[c].hash)) next.push_back(c);
  }
  decoder_->Ahead(next);
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

void PackedSource::ChunksOf(uint64_t page, uint64_t end, std::vector<size_t>* chunks,
                            std::vector<std::pair<uint64_t, uint64_t>>* parent_ranges) const {
  while (page < end) {
    const PageRun& run = index_.RunAt(page);
    const uint64_t stop = std::min(end, run.end_page());
    if (run.kind == PageKind::kParent) {
      parent_ranges->emplace_back(page, stop);
    } else if (run.kind == PageKind::kStored) {
      const size_t first = index_.ChunkOf(run.stored_first + page - run.first_page);
      const size_t last = index_.ChunkOf(run.stored_first + stop - 1 - run.first_page);
      for (size_t c = first; c <= last; ++c) {
        if (chunks->empty() || chunks->back() != c) chunks->push_back(c);
      }
    }
    page = stop;
  }
}

bool PackedSource::ContentReady(FileOffset offset, uint64_t length,
                                const std::function<void()>& ready) const {
  if (length == 0 || offset.value() >= size() || !decoder_->enabled()) return true;
  length = std::min(length, size() - offset.value());
  std::vector<size_t> chunks;
  std::vector<std::pair<uint64_t, uint64_t>> parent_ranges;
  ChunksOf(offset.value() / kPage, (offset.value() + length + kPage - 1) / kPage, &chunks,
           &parent_ranges);
  bool all_ready = true;
  for (const auto& [first, end] : parent_ranges) {
    all_ready &= parent_->ContentReady(FileOffset(first * kPage), (end - first) * kPage, ready);
  }
  for (size_t c : chunks) {
    if (cache_->Contains(index_.chunks[c].hash) || decoder_->Failed(c).has_value()) continue;
    decoder_->Need(c, ready);
    all_ready = false;
  }
  if (!all_ready && !chunks.empty()) ReadAheadAfter(chunks.back());
  return all_ready;
}

void PackedSource::WillNeed(FileOffset offset, uint64_t length) const {
  if (length == 0 || offset.value() >= size()) return;
  length = std::min(length, size() - offset.value());
  std::vector<size_t> chunks;
  std::vector<std::pair<uint64_t, uint64_t>> parent_ranges;
  ChunksOf(offset.value() / kPage, (offset.value() + length + kPage - 1) / kPage, &chunks,
           &parent_ranges);
  for (const auto& [first, end] : parent_ranges) {
    parent_->WillNeed(FileOffset(first * kPage), (end - first) * kPage);
  }
  decoder_->Ahead(chunks);
}

std::string PackedSource::Describe() const {
  const uint64_t stored = index_.stored_pages();
  const uint64_t pages = std::max<uint64_t>(1, index_.page_count());
  return "packed snapshot " + storage_->name() + " (" + std::to_string(size() >> 20) + " MiB, " +
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
