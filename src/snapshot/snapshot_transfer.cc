#include "guestmem/snapshot_transfer.h"

#include <algorithm>
#include <atomic>
#include <cstring>
#include <filesystem>
#include <mutex>
#include <optional>
#include <thread>
#include <unordered_set>

#include "base/whole_file.h"
#include "guestmem/chunk_store.h"
#include "guestmem/packed_index.h"
#include "guestmem/packed_source.h"
#include "guestmem/remote_pack_storage.h"

namespace guestmem {
namespace {

namespace fs = std::filesystem;

// The most a layer's object may hold when pulled: it is read whole.
constexpr uint64_t kMaxLayerBytes = uint64_t{16} << 30;

// `to` as a relative path from the directory of `from`, both keys (or paths) of one bucket.
std::string RelativeKey(const std::string& to, const std::string& from) {
  return fs::path("/" + to).lexically_relative(fs::path("/" + from).parent_path()).string();
}

// Runs `work(i)` for i in [0, count) on `threads` threads, telling `progress` (when set) after
// each; the first error stops the rest.
Status ForEachParallel(size_t count, unsigned threads, const std::function<Status(size_t)>& work,
                       const std::function<void(uint64_t done, uint64_t total)>& progress) {
  std::atomic<size_t> next{0}, done{0};
  std::mutex mu;
  std::optional<Error> first_error;
  auto run = [&] {
    for (size_t i = next++; i < count; i = next++) {
      {
        std::lock_guard lock(mu);
        if (first_error) return;
      }
      if (Status worked = work(i); !worked) {
        std::lock_guard lock(mu);
        if (!first_error) first_error = std::move(worked).error();
        return;
      }
      const size_t finished = ++done;
      if (progress) progress(finished, count);
    }
  };
  std::vector<std::thread> pool;
  const unsigned n = std::max(1u, std::min<unsigned>(threads, static_cast<unsigned>(count)));
  for (unsigned t = 0; t < n; ++t) pool.emplace_back(run);
  for (std::thread& t : pool) t.join();
  if (first_error) return *std::move(first_error);
  return OkStatus();
}

std::vector<std::byte> Concatenate(const std::string& a, const std::string& b) {
  std::vector<std::byte> out(a.size() + b.size());
  std::memcpy(out.data(), a.data(), a.size());
  std::memcpy(out.data() + a.size(), b.data(), b.size());
  return out;
}

}  // namespace

Result<TransferSummary> PushSnapshot(const std::string& snapshot, const ObjectUrl& to,
                                     const ObjectStore& store, const TransferOptions& options) {
  GM_ASSIGN_OR_RETURN(std::unique_ptr<PackedSource> top,
                      PackedSource::Open(snapshot, PackedSourceOptions{.decode_threads = 0}));
  // The layers, top first, with the object each goes to and the parent each names there.
  struct Layer {
    const PackedSource* source;
    ObjectUrl object;
    std::string parent_path;
  };
  std::vector<Layer> layers;
  ObjectUrl at = to;
  for (const PackedSource* l = top.get(); l != nullptr; l = l->parent()) {
    std::string parent_path = l->index().parent_path;
    // A parent named by an absolute path goes beside its child.
    if (!parent_path.empty() && parent_path.front() == '/') {
      parent_path = fs::path(parent_path).filename().string();
    }
    layers.push_back({l, at, parent_path});
    if (!parent_path.empty()) at = at.Resolve(parent_path);
  }
  const ObjectUrl chunk_store = to.Resolve(options.store);

  struct Job {
    const PackedSource* layer;
    size_t chunk;
  };
  std::vector<Job> jobs;
  std::unordered_set<ChunkHash, ChunkHashHasher> seen;
  for (const Layer& l : layers) {
    for (size_t c = 0; c < l.source->index().chunks.size(); ++c) {
      if (seen.insert(l.source->index().chunks[c].hash).second) jobs.push_back({l.source, c});
    }
  }
  TransferSummary summary{.chunks = jobs.size()};
  std::atomic<uint64_t> moved{0}, bytes{0};
  auto push_chunk = [&](size_t i) -> Status {
    const Job& job = jobs[i];
    const ChunkRef& ref = job.layer->index().chunks[job.chunk];
    const ObjectUrl object = ChunkObject(chunk_store, ref.hash);
    GM_ASSIGN_OR_RETURN(const bool there, store.Exists(object));
    if (there) return OkStatus();
    GM_ASSIGN_OR_RETURN(StoredChunk stored,
                        job.layer->storage().ReadChunk(ref, ref.raw_bytes(), /*again=*/false));
    // Checked before it goes: a store is never given a chunk that is not what its name says.
    if (!ChunkStore::IsWhole(stored, ref.hash, ref.raw_bytes())) {
      return Error(ErrorCode::kDataLoss, job.layer->storage().name() + ": chunk " +
                                             std::to_string(job.chunk) + " (" + ToHex(ref.hash) +
                                             ") does not match its hash");
    }
    const std::vector<std::byte> file = ChunkStore::Encode(stored);
    GM_RETURN_IF_ERROR(store.Put(object, file));
    moved.fetch_add(1);
    bytes.fetch_add(file.size());
    return OkStatus();
  };
  GM_RETURN_IF_ERROR(ForEachParallel(jobs.size(), options.threads, push_chunk, options.progress));
  // Parents first: a layer's object is written once all it names is there.
  for (auto l = layers.rbegin(); l != layers.rend(); ++l) {
    PackIndex index = l->source->index();
    for (ChunkRef& c : index.chunks) {
      c.location = ChunkLocation::kStore;
      c.offset = 0;
    }
    index.store_path = index.chunks.empty() ? "" : RelativeKey(chunk_store.path, l->object.path);
    index.parent_path = l->parent_path;
    const std::string index_bytes = index.SerializeIndex();
    const std::string header =
        index.SerializeHeader(PackIndex::kHeaderBytes, std::as_bytes(std::span(index_bytes)));
    const std::vector<std::byte> pack = Concatenate(header, index_bytes);
    GM_RETURN_IF_ERROR(store.Put(l->object, pack));
    bytes.fetch_add(pack.size());
    summary.layers.insert(summary.layers.begin(), l->object.ToString());
  }
  summary.chunks_moved = moved;
  summary.bytes_moved = bytes;
  return summary;
}

Result<TransferSummary> PullSnapshot(const ObjectUrl& from, const std::string& snapshot,
                                     const ObjectStore& store, const TransferOptions& options) {
  TransferSummary summary;
  std::unordered_set<ChunkHash, ChunkHashHasher> seen;
  ObjectUrl url = from;
  std::string path = snapshot;
  for (int depth = 0;; ++depth) {
    if (depth >= PackedSource::kMaxLayers) {
      return Error(ErrorCode::kFailedPrecondition, from.ToString() + ": more than " +
                                                       std::to_string(PackedSource::kMaxLayers) +
                                                       " layers (a cycle?)");
    }
    GM_ASSIGN_OR_RETURN(std::vector<std::byte> pack, store.ReadWhole(url, kMaxLayerBytes));
    auto header = ParsePackHeader(pack, pack.size());
    if (!header) return std::move(header).error().WithContext(url.ToString());
    auto index = ParseSealedPackIndex(
        *header, std::span(pack).subspan(header->index_offset, header->index_bytes),
        url.ToString());
    if (!index) return std::move(index).error();
    // A layer names its parent and its store by paths relative to it, never by URL or by an
    // absolute path: what it names is fetched with our credentials and written where it says.
    for (const std::string* name : {&index->parent_path, &index->store_path}) {
      if (ObjectUrl::Names(*name) || (!name->empty() && name->front() == '/')) {
        return Error(ErrorCode::kDataLoss, url.ToString() + " names " + *name +
                                               "; a pulled layer may name only relative paths");
      }
    }
    // Its chunks before it, so that a pulled layer is never found without them.
    if (!index->store_path.empty()) {
      const std::string local_store =
          (fs::path(path).parent_path() / index->store_path).lexically_normal().string();
      GM_ASSIGN_OR_RETURN(ChunkStore chunks, ChunkStore::Open(local_store, /*create=*/true));
      const ObjectUrl remote_store = url.Resolve(index->store_path);
      std::vector<const ChunkRef*> wanted;
      for (const ChunkRef& c : index->chunks) {
        if (c.location == ChunkLocation::kStore && seen.insert(c.hash).second) {
          wanted.push_back(&c);
        }
      }
      summary.chunks += wanted.size();
      std::atomic<uint64_t> moved{0}, bytes{0};
      auto pull_chunk = [&](size_t i) -> Status {
        const ChunkRef& ref = *wanted[i];
        const uint64_t max = ChunkStore::MaxCompressed(ref.raw_bytes());
        if (auto have = chunks.Get(ref.hash, max);
            have && ChunkStore::IsWhole(*have, ref.hash, ref.raw_bytes())) {
          return OkStatus();
        }
        const ObjectUrl object = ChunkObject(remote_store, ref.hash);
        GM_ASSIGN_OR_RETURN(std::vector<std::byte> file,
                            store.ReadWhole(object, ChunkStore::kHeaderBytes + max));
        GM_ASSIGN_OR_RETURN(StoredChunk got, ChunkStore::Decode(file, object.ToString()));
        if (!ChunkStore::IsWhole(got, ref.hash, ref.raw_bytes())) {
          return Error(ErrorCode::kDataLoss, object.ToString() + " is not the chunk its name says");
        }
        GM_RETURN_IF_ERROR(chunks.Write(ref.hash, got));
        moved.fetch_add(1);
        bytes.fetch_add(file.size());
        return OkStatus();
      };
      GM_RETURN_IF_ERROR(
          ForEachParallel(wanted.size(), options.threads, pull_chunk, options.progress));
      summary.chunks_moved += moved;
      summary.bytes_moved += bytes;
    } else {
      summary.chunks += index->chunks.size();
    }
    GM_RETURN_IF_ERROR(WriteFileAtomically(path, pack, Durability::kSynced, "snapshot pull"));
    summary.bytes_moved += pack.size();
    summary.layers.push_back(path);
    if (!index->has_parent()) break;
    url = url.Resolve(index->parent_path);
    path = (fs::path(path).parent_path() / index->parent_path).lexically_normal().string();
  }
  return summary;
}

}  // namespace guestmem
