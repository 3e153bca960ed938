#include "guestmem/snapshot_packer.h"

#include <fcntl.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <condition_variable>
#include <cstring>
#include <deque>
#include <filesystem>
#include <map>
#include <mutex>
#include <optional>
#include <thread>
#include <unordered_map>

#include "base/whole_file.h"
#include "base/zero_page.h"
#include "guestmem/chunk_store.h"

namespace guestmem {
namespace {

constexpr uint64_t kPage = 4096;
constexpr uint64_t kSegmentBytes = uint64_t{8} << 20;  // read and classified at a time

// Chunks compressed and hashed on worker threads, handed back in the order they came.
class ChunkCompressor {
 public:
  struct Done {
    std::vector<std::byte> compressed;
    Codec codec = Codec::kNone;
    ChunkHash hash{};
    uint32_t pages = 0;
  };

  ChunkCompressor(Codec codec, int level, unsigned threads) : codec_(codec), level_(level) {
    for (unsigned i = 0; i < std::max(1u, threads); ++i) workers_.emplace_back([this] { Work(); });
  }
  ~ChunkCompressor() {
    {
      std::lock_guard lock(mu_);
      stopping_ = true;
    }
    cv_.notify_all();
    for (std::thread& t : workers_) t.join();
  }

  size_t in_flight() const { return submitted_ - taken_; }
  size_t threads() const { return workers_.size(); }

  void Submit(std::vector<std::byte> raw) {
    {
      std::lock_guard lock(mu_);
      jobs_.push_back({submitted_, std::move(raw)});
    }
    ++submitted_;
    cv_.notify_all();
  }

  // The oldest chunk not yet taken. REQUIRES: in_flight() > 0.
  Done Next() {
    std::unique_lock lock(mu_);
    done_cv_.wait(lock, [this] { return done_.count(taken_) != 0; });
    Done out = std::move(done_.at(taken_));
    done_.erase(taken_);
    ++taken_;
    return out;
  }

 private:
  struct Job {
    size_t serial;
    std::vector<std::byte> raw;
  };

  void Work() {
    std::unique_lock lock(mu_);
    while (true) {
      cv_.wait(lock, [this] { return stopping_ || !jobs_.empty(); });
      if (jobs_.empty()) return;
      Job job = std::move(jobs_.front());
      jobs_.pop_front();
      lock.unlock();
      Done done;
      done.hash = HashChunk(job.raw);
      done.pages = static_cast<uint32_t>(job.raw.size() / kPage);
      done.codec = CompressChunk(codec_, level_, job.raw, &done.compressed);
      lock.lock();
      done_.emplace(job.serial, std::move(done));
      done_cv_.notify_all();
    }
  }

  const Codec codec_;
  const int level_;
  std::mutex mu_;
  std::condition_variable cv_, done_cv_;
  std::deque<Job> jobs_;             // GUARDED_BY(mu_)
  std::map<size_t, Done> done_;      // GUARDED_BY(mu_)
  bool stopping_ = false;            // GUARDED_BY(mu_)
  size_t submitted_ = 0, taken_ = 0;  // the submitting thread's
  std::vector<std::thread> workers_;
};

Status WriteAt(int fd, uint64_t offset, std::span<const std::byte> bytes, const std::string& path) {
  size_t done = 0;
  while (done < bytes.size()) {
    const ssize_t n = pwrite(fd, bytes.data() + done, bytes.size() - done,
                             static_cast<off_t>(offset + done));
    if (n < 0 && errno == EINTR) continue;
    if (n < 0) return PosixError(errno, "write " + path);
    done += static_cast<size_t>(n);
  }
  return OkStatus();
}

// A file written under a temporary name, renamed to its own when whole, removed otherwise.
class PendingFile {
 public:
  static Result<PendingFile> Create(const std::string& path) {
    PendingFile f;
    f.path_ = path;
    f.temporary_ = TemporaryPathFor(path);
    const int fd = open(f.temporary_.c_str(), O_RDWR | O_CREAT | O_EXCL | O_CLOEXEC, 0644);
    if (fd < 0) return PosixError(errno, "create " + f.temporary_);
    f.fd_ = UniqueFd(fd);
    return f;
  }
  PendingFile(PendingFile&&) = default;
  ~PendingFile() {
    if (fd_.get() >= 0) unlink(temporary_.c_str());
  }
  int fd() const { return fd_.get(); }
  const std::string& path() const { return temporary_; }
  Status Commit() {
    if (fsync(fd_.get()) != 0) return PosixError(errno, "sync " + temporary_);
    if (rename(temporary_.c_str(), path_.c_str()) != 0) {
      return PosixError(errno, "rename " + temporary_ + " to " + path_);
    }
    fd_.reset();
    return OkStatus();
  }

 private:
  PendingFile() = default;
  std::string path_, temporary_;
  UniqueFd fd_;
};

// Where the packer is: the runs so far, the chunk being filled and where chunks go.
class Packer {
 public:
  Packer(const PackOptions& options, PendingFile* out, const ChunkStore* store)
      : options_(options),
        out_(out),
        store_(store),
        compressor_(options.codec, options.level,
                    options.threads != 0 ? options.threads
                                         : std::max(1u, std::thread::hardware_concurrency())) {
    chunk_.reserve(uint64_t{options.chunk_pages} * kPage);
  }

  void AddPages(PageKind kind, uint64_t n) {
    if (n == 0) return;
    if (!index_.runs.empty() && index_.runs.back().kind == kind) {
      index_.runs.back().pages += n;
    } else {
      index_.runs.push_back(PageRun{.first_page = next_page_,
                                    .pages = n,
                                    .stored_first = kind == PageKind::kStored ? stored_ : 0,
                                    .kind = kind});
    }
    next_page_ += n;
    (kind == PageKind::kZero ? summary_.zero_pages
     : kind == PageKind::kParent ? summary_.parent_pages
                                 : summary_.stored_pages) += n;
    if (kind == PageKind::kStored) stored_ += n;
  }

  // Guest page `page`'s content, stored: appended to the chunk of its part of guest memory.
  Status Store(uint64_t page, const std::byte* content) {
    if (!chunk_.empty() && page / options_.chunk_pages != chunk_part_) GM_RETURN_IF_ERROR(Flush());
    chunk_part_ = page / options_.chunk_pages;
    AddPages(PageKind::kStored, 1);
    chunk_.insert(chunk_.end(), content, content + kPage);
    if (chunk_.size() == uint64_t{options_.chunk_pages} * kPage) return Flush();
    return OkStatus();
  }

  Status Flush() {
    if (!chunk_.empty()) {
      while (compressor_.in_flight() >= 4 * compressor_.threads()) {
        GM_RETURN_IF_ERROR(Write(compressor_.Next()));
      }
      compressor_.Submit(std::move(chunk_));
      chunk_ = {};
      chunk_.reserve(uint64_t{options_.chunk_pages} * kPage);
    }
    return OkStatus();
  }

  Result<PackSummary> Finish(uint64_t raw_size, const ChunkHash& parent_id,
                             const std::string& parent_ref, const std::string& store_ref) {
    GM_RETURN_IF_ERROR(Flush());
    while (compressor_.in_flight() > 0) GM_RETURN_IF_ERROR(Write(compressor_.Next()));
    index_.raw_size = raw_size;
    index_.chunk_pages = options_.chunk_pages;
    index_.IndexChunks();
    index_.parent_id = parent_id;
    index_.parent_path = parent_ref;
    index_.store_path = store_ref;
    for (uint64_t page : options_.working_set) {
      if (page < index_.page_count()) index_.working_set.push_back(page);
    }
    const std::string index = index_.SerializeIndex();
    const auto index_bytes = std::as_bytes(std::span(index));
    GM_RETURN_IF_ERROR(WriteAt(out_->fd(), data_end_, index_bytes, out_->path()));
    const std::string header = index_.SerializeHeader(data_end_, index_bytes);
    GM_RETURN_IF_ERROR(WriteAt(out_->fd(), 0, std::as_bytes(std::span(header)), out_->path()));
    summary_.raw_bytes = raw_size;
    summary_.pages = index_.page_count();
    summary_.chunks = index_.chunks.size();
    summary_.file_bytes = data_end_ + index.size();
    return summary_;
  }

 private:
  Status Write(ChunkCompressor::Done done) {
    ChunkRef ref{.hash = done.hash,
                 .compressed_bytes = static_cast<uint32_t>(done.compressed.size()),
                 .pages = done.pages,
                 .codec = done.codec};
    if (auto seen = written_.find(done.hash); seen != written_.end()) {
      ++summary_.chunks_shared;
      ref = seen->second;
      ref.pages = done.pages;
    } else if (store_ != nullptr) {
      GM_ASSIGN_OR_RETURN(ChunkStore::Kept kept,
                          store_->Put(done.hash, done.codec, done.pages * kPage, done.compressed));
      ref.location = ChunkLocation::kStore;
      ref.codec = kept.codec;
      ref.compressed_bytes = kept.compressed_bytes;
      if (kept.added) {
        summary_.compressed_bytes += kept.compressed_bytes;
      } else {
        ++summary_.chunks_shared;
      }
      written_.emplace(done.hash, ref);
    } else {
      ref.offset = data_end_;
      GM_RETURN_IF_ERROR(WriteAt(out_->fd(), data_end_, done.compressed, out_->path()));
      data_end_ += done.compressed.size();
      summary_.compressed_bytes += done.compressed.size();
      written_.emplace(done.hash, ref);
    }
    index_.chunks.push_back(ref);
    return OkStatus();
  }

  const PackOptions& options_;
  PendingFile* out_;
  const ChunkStore* store_;
  ChunkCompressor compressor_;
  PackIndex index_;
  PackSummary summary_;
  std::vector<std::byte> chunk_;
  uint64_t next_page_ = 0, stored_ = 0;
  uint64_t chunk_part_ = 0;  // the part of guest memory (chunk_pages pages) chunk_ is of
  uint64_t data_end_ = PackIndex::kDataStart;
  std::unordered_map<ChunkHash, ChunkRef, ChunkHashHasher> written_;
};

// `target` as a file at `from` names it: relative to from's directory, so that files moved
// together still find each other.
std::string Reference(const std::string& target, const std::string& from) {
  namespace fs = std::filesystem;
  std::error_code error;
  const fs::path dir = fs::absolute(fs::path(from), error).parent_path();
  const fs::path relative = fs::relative(fs::absolute(target, error), dir, error);
  return error || relative.empty() ? fs::absolute(target, error).string() : relative.string();
}

bool HolesAreOnlyHoles(const PageSource& source) {
  const auto* raw = dynamic_cast<const RawFileSource*>(&source);
  return raw != nullptr && raw->zero_map() == nullptr;
}

}  // namespace

Result<PackSummary> PackSnapshot(const PageSource& source, const std::string& out_path,
                                 const PackOptions& options) {
  const auto start = std::chrono::steady_clock::now();
  if (options.chunk_pages < PackIndex::kMinChunkPages ||
      options.chunk_pages > PackIndex::kMaxChunkPages) {
    return Error(ErrorCode::kInvalidArgument,
                 "pack: chunks of " + std::to_string(options.chunk_pages * 4) +
                     " KiB (allowed: 64 to 4096 KiB)");
  }
  if (source.size() % kPage != 0 || source.size() > PackIndex::kMaxRawBytes) {
    return Error(ErrorCode::kInvalidArgument,
                 "pack: " + source.Describe() + " is not a whole number of 4 KiB pages");
  }
  std::unique_ptr<PackedSource> parent;
  if (!options.parent_path.empty()) {
    GM_ASSIGN_OR_RETURN(parent, PackedSource::Open(options.parent_path,
                                                   PackedSourceOptions{.decode_threads = 0}));
    if (parent->size() != source.size()) {
      return Error(ErrorCode::kInvalidArgument,
                   "pack: the parent " + options.parent_path + " stands for " +
                       std::to_string(parent->size()) + " bytes, the snapshot for " +
                       std::to_string(source.size()));
    }
  } else if (options.holes == HoleMeaning::kParent) {
    return Error(ErrorCode::kInvalidArgument, "pack: holes cannot be the parent's without one");
  }
  const bool holes_are_parent =
      parent != nullptr && (options.holes == HoleMeaning::kParent ||
                            (options.holes == HoleMeaning::kAuto && HolesAreOnlyHoles(source)));
  std::optional<ChunkStore> store;
  if (!options.store_directory.empty()) {
    GM_ASSIGN_OR_RETURN(ChunkStore opened, ChunkStore::Open(options.store_directory, true));
    store = std::move(opened);
  }
  GM_ASSIGN_OR_RETURN(PendingFile out, PendingFile::Create(out_path));
  Packer packer(options, &out, store ? &*store : nullptr);

  std::vector<std::byte> content(kSegmentBytes), below(parent ? kSegmentBytes : 0);
  const uint64_t size = source.size();
  uint64_t at = 0;
  while (at < size) {
    GM_ASSIGN_OR_RETURN(Extent extent, source.ExtentAt(FileOffset(at)));
    const uint64_t n = std::min({extent.length, kSegmentBytes, size - at});
    const uint64_t pages = n / kPage;
    if (extent.kind == ExtentKind::kZero) {
      packer.AddPages(holes_are_parent ? PageKind::kParent : PageKind::kZero, pages);
    } else {
      GM_RETURN_IF_ERROR(source.ReadAt(FileOffset(at), std::span(content).first(n)));
      if (parent) GM_RETURN_IF_ERROR(parent->ReadAt(FileOffset(at), std::span(below).first(n)));
      for (uint64_t p = 0; p < pages; ++p) {
        const std::byte* page = content.data() + p * kPage;
        if (IsZeroPage(page)) {
          packer.AddPages(PageKind::kZero, 1);
        } else if (parent && std::memcmp(page, below.data() + p * kPage, kPage) == 0) {
          packer.AddPages(PageKind::kParent, 1);
        } else {
          GM_RETURN_IF_ERROR(packer.Store(at / kPage + p, page));
        }
      }
    }
    at += n;
    if (options.progress) options.progress(at, size);
  }
  const std::string parent_ref = parent ? Reference(options.parent_path, out_path) : "";
  const std::string store_ref = store ? Reference(options.store_directory, out_path) : "";
  GM_ASSIGN_OR_RETURN(PackSummary summary,
                      packer.Finish(size, parent ? parent->index().Identity() : ChunkHash{},
                                    parent_ref, store_ref));
  GM_RETURN_IF_ERROR(out.Commit());
  summary.seconds =
      std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  return summary;
}

Status UnpackSnapshot(const PageSource& source, const std::string& out_path,
                      const Progress& progress) {
  GM_ASSIGN_OR_RETURN(PendingFile out, PendingFile::Create(out_path));
  const uint64_t size = source.size();
  if (ftruncate(out.fd(), static_cast<off_t>(size)) != 0) {
    return PosixError(errno, "unpack: size " + out.path());
  }
  std::vector<std::byte> content(kSegmentBytes);
  uint64_t at = 0;
  while (at < size) {
    GM_ASSIGN_OR_RETURN(Extent extent, source.ExtentAt(FileOffset(at)));
    const uint64_t n = std::min({extent.length, kSegmentBytes, size - at});
    if (extent.kind == ExtentKind::kData) {
      std::span<std::byte> piece = std::span(content).first(n);
      GM_RETURN_IF_ERROR(source.ReadAt(FileOffset(at), piece));
      GM_RETURN_IF_ERROR(WriteAt(out.fd(), at, piece, out.path()));
    }
    at += n;
    if (progress) progress(at, size);
  }
  return out.Commit();
}

std::vector<BadChunk> VerifySnapshot(const PackedSource& source, const Progress& progress) {
  std::vector<BadChunk> bad;
  uint64_t total = 0, done = 0;
  for (const PackedSource* layer = &source; layer != nullptr; layer = layer->parent()) {
    total += layer->index().chunks.size();
  }
  for (const PackedSource* layer = &source; layer != nullptr; layer = layer->parent()) {
    for (size_t i = 0; i < layer->index().chunks.size(); ++i) {
      if (auto loaded = layer->LoadChunk(i); !loaded) {
        bad.push_back(
            BadChunk{.layer = layer->storage().name(), .chunk = i, .why = loaded.error()});
      }
      if (progress) progress(++done, total);
    }
  }
  return bad;
}

Result<SnapshotDiff> DiffSnapshots(const PageSource& a, const PageSource& b,
                                   const Progress& progress) {
  if (a.size() != b.size()) {
    return Error(ErrorCode::kInvalidArgument, "diff: " + a.Describe() + " and " + b.Describe() +
                                                  " are of different sizes");
  }
  SnapshotDiff diff;
  diff.pages = a.size() / kPage;
  auto differs = [&](uint64_t page) {
    ++diff.differing_pages;
    if (!diff.runs.empty() && diff.runs.back().end_page() == page) {
      ++diff.runs.back().pages;
    } else {
      diff.runs.push_back(PageRun{.first_page = page, .pages = 1});
    }
  };
  std::vector<std::byte> left(kSegmentBytes), right(kSegmentBytes);
  const uint64_t size = a.size();
  uint64_t at = 0;
  while (at < size) {
    GM_ASSIGN_OR_RETURN(Extent ea, a.ExtentAt(FileOffset(at)));
    GM_ASSIGN_OR_RETURN(Extent eb, b.ExtentAt(FileOffset(at)));
    const uint64_t n = std::min({ea.length, eb.length, kSegmentBytes, size - at});
    if (ea.kind != ExtentKind::kZero || eb.kind != ExtentKind::kZero) {
      GM_RETURN_IF_ERROR(a.ReadAt(FileOffset(at), std::span(left).first(n)));
      GM_RETURN_IF_ERROR(b.ReadAt(FileOffset(at), std::span(right).first(n)));
      for (uint64_t p = 0; p * kPage < n; ++p) {
        const uint64_t o = p * kPage;
        const uint64_t len = std::min(kPage, n - o);
        if (std::memcmp(left.data() + o, right.data() + o, len) != 0) differs(at / kPage + p);
      }
    }
    at += n;
    if (progress) progress(at, size);
  }
  return diff;
}

}  // namespace guestmem
