#include "guestmem/memory_file.h"

#include <linux/falloc.h>
#include <sys/mman.h>

#include <algorithm>
#include <cerrno>
#include <cstring>
#include <limits>
#include <new>
#include <string>
#include <utility>

#include "base/hex.h"
#include "guestmem/address_registry.h"
#include "guestmem/os.h"
#include "memory/backend.h"

namespace guestmem {

std::string_view MemoryBackendName(MemoryBackend backend) {
  switch (backend) {
    case MemoryBackend::kShmem:
      return "shmem";
    case MemoryBackend::kHugetlb:
      return "hugetlb";
    case MemoryBackend::kAnonymous:
      return "anonymous";
    case MemoryBackend::kSecret:
      return "secret";
    case MemoryBackend::kGuestMemfd:
      return "guest_memfd";
  }
  return "unknown";
}

Result<BackendCapabilities> ProbeBackend(MemoryBackend backend, Os* os) {
  MemoryFileOptions options;
  options.backend = backend;
  options.size_bytes = memory_internal::BackendPageSize(backend);
  options.name = "guestmem-probe";
  options.os = os;
  GM_ASSIGN_OR_RETURN(auto file, MemoryFile::Create(options));
  // Creating a file takes no memory yet: allocate its one page, so that a backend whose pages
  // cannot be had (an empty huge page pool) is reported as unusable.
  auto allocated = file->Allocate(FileOffset(0), options.size_bytes);
  if (!allocated) {
    if (backend == MemoryBackend::kHugetlb &&
        allocated.error().code() == ErrorCode::kResourceExhausted) {
      return Error(ErrorCode::kUnsupported,
                   "hugetlbfs has no free 2 MiB pages (vm.nr_hugepages=" +
                       memory_internal::NrHugepages(os == nullptr ? Os::Default() : os) + ")",
                   allocated.error().sys_errno());
    }
    return std::move(allocated).error().WithContext("probe " +
                                                    std::string(MemoryBackendName(backend)));
  }
  return file->capabilities();
}

// ---------------------------------------------------------------------------------------------
// MemoryFile: creation

MemoryFile::MemoryFile(PassKey, const MemoryFileOptions& options, BackendCapabilities caps,
                       uint64_t size, UniqueFd fd, UniqueFd vm_fd, Mapping anonymous)
    : name_(options.name),
      caps_(std::move(caps)),
      size_(size),
      mmap_allowed_(options.mmap_allowed),
      write_method_(caps_.populate_by_write ? WriteMethod::kPwrite
                    : caps_.mmap_allowed && caps_.backend != MemoryBackend::kAnonymous &&
                            caps_.backend != MemoryBackend::kSecret
                        ? WriteMethod::kThroughMapping
                        : WriteMethod::kNone),
      os_(options.os == nullptr ? Os::Default() : options.os),
      fd_(std::move(fd)),
      vm_fd_(std::move(vm_fd)),
      anonymous_(std::move(anonymous)),
      pages_(size / caps_.page_size) {}

MemoryFile::~MemoryFile() = default;

namespace {

Status CheckSize(std::string_view op, MemoryBackend backend, uint64_t size) {
  const uint64_t page = memory_internal::BackendPageSize(backend);
  const std::string what =
      std::string(op) + " " + std::string(MemoryBackendName(backend)) + " memory file";
  if (size == 0) return Error(ErrorCode::kInvalidArgument, what + ": size 0");
  if (!IsAligned(size, page)) {
    return Error(ErrorCode::kInvalidArgument, what + ": size " + Hex(size) +
                                                  " is not a multiple of the page size " +
                                                  std::to_string(page));
  }
  if (size > static_cast<uint64_t>(std::numeric_limits<off_t>::max())) {
    return Error(ErrorCode::kOutOfRange,
                 what + ": size " + Hex(size) + " is beyond the largest file offset");
  }
  return OkStatus();
}

}  // namespace

Result<std::shared_ptr<MemoryFile>> MemoryFile::Finish(const MemoryFileOptions& options,
                                                       uint64_t size, UniqueFd fd, UniqueFd vm_fd,
                                                       Mapping anonymous) {
  Os* os = options.os == nullptr ? Os::Default() : options.os;
  BackendCapabilities caps = memory_internal::DescribeBackend(options.backend, fd.get(), os);
  const uint64_t pages = size / caps.page_size;
  try {
    return std::make_shared<MemoryFile>(PassKey{}, options, std::move(caps), size, std::move(fd),
                                        std::move(vm_fd), std::move(anonymous));
  } catch (const std::bad_alloc&) {
    // The page-state map is the only allocation that grows with the file.
    return Error(ErrorCode::kResourceExhausted,
                 std::string(MemoryBackendName(options.backend)) + " memory file \"" +
                     options.name + "\" of " + Hex(size) + " bytes: no memory for the state of " +
                     std::to_string(pages) + " pages");
  }
}

Result<std::shared_ptr<MemoryFile>> MemoryFile::Create(const MemoryFileOptions& options) {
  GM_RETURN_IF_ERROR(CheckSize("create", options.backend, options.size_bytes));
  Os* os = options.os == nullptr ? Os::Default() : options.os;
  GM_ASSIGN_OR_RETURN(
      memory_internal::BackendObject object,
      memory_internal::CreateBackendObject(options.backend, options.name, options.size_bytes, os));
  return Finish(options, options.size_bytes, std::move(object.fd), std::move(object.vm_fd),
                std::move(object.anonymous));
}

Result<std::shared_ptr<MemoryFile>> MemoryFile::Adopt(UniqueFd fd,
                                                      const MemoryFileOptions& options) {
  const std::string what = "adopt " + std::string(MemoryBackendName(options.backend)) +
                           " memory file \"" + options.name + "\"";
  if (options.backend == MemoryBackend::kAnonymous) {
    return Error(ErrorCode::kInvalidArgument, what + ": anonymous memory has no file to adopt");
  }
  if (!fd.valid()) return Error(ErrorCode::kInvalidArgument, what + ": no descriptor");
  Os* os = options.os == nullptr ? Os::Default() : options.os;
  const off_t end = os->Lseek(fd.get(), 0, SEEK_END);
  uint64_t size = options.size_bytes;
  const uint64_t max = options.max_size_bytes;
  if (max != 0 && end >= 0 && static_cast<uint64_t>(end) > max) {
    return Error(ErrorCode::kOutOfRange, what + ": the file is " + Hex(static_cast<uint64_t>(end)) +
                                             " bytes, more than the most allowed (" + Hex(max) +
                                             " bytes)");
  }
  if (max != 0 && size > max) {
    return Error(
        ErrorCode::kOutOfRange,
        what + ": size " + Hex(size) + " is more than the most allowed (" + Hex(max) + " bytes)");
  }
  if (end >= 0 && size > static_cast<uint64_t>(end)) {
    return Error(ErrorCode::kOutOfRange, what + ": size " + Hex(size) +
                                             " is larger than the file (" +
                                             Hex(static_cast<uint64_t>(end)) + " bytes)");
  }
  if (size == 0) {
    if (end < 0) {
      return PosixError(static_cast<int>(-end),
                        what + ": the file cannot tell its size (lseek SEEK_END); pass size_bytes");
    }
    size = static_cast<uint64_t>(end);
  }
  GM_RETURN_IF_ERROR(CheckSize("adopt", options.backend, size));
  GM_ASSIGN_OR_RETURN(auto file, Finish(options, size, std::move(fd), UniqueFd(), Mapping()));
  // Pages with data behind them may hold anything: allocated, not prepared.
  const uint64_t page = file->page_size();
  PageStateMap& pages = file->pages_;
  for (uint64_t pos = 0; pos < size;) {
    const off_t data = os->Lseek(file->fd(), static_cast<off_t>(pos), SEEK_DATA);
    if (data == -ENXIO) break;  // no data after pos
    if (data < 0) {             // the file cannot tell: assume everything has backing
      pages.Set(0, pages.page_count(), PageState::kAllocated);
      break;
    }
    off_t hole = os->Lseek(file->fd(), data, SEEK_HOLE);
    const uint64_t hole_at = hole < 0 ? size : std::min(static_cast<uint64_t>(hole), size);
    const uint64_t first = AlignDown(static_cast<uint64_t>(data), page) / page;
    const uint64_t last = AlignUp(hole_at, page).value_or(size) / page;
    if (first < last) pages.Set(first, last - first, PageState::kAllocated);
    pos = hole_at;
  }
  return file;
}

// ---------------------------------------------------------------------------------------------
// MemoryFile: ranges and states

Status MemoryFile::CheckRange(std::string_view op, FileOffset offset, uint64_t length) const {
  const std::string what(op);
  const uint64_t page = caps_.page_size;
  if (length == 0) {
    return Error(ErrorCode::kInvalidArgument,
                 what + ": zero length at offset " + Hex(offset.value()));
  }
  if (!offset.IsAligned(page)) {
    return Error(ErrorCode::kInvalidArgument, what + ": offset " + Hex(offset.value()) +
                                                  " is not aligned to " + std::to_string(page));
  }
  if (!IsAligned(length, page)) {
    return Error(ErrorCode::kInvalidArgument, what + ": length " + Hex(length) +
                                                  " is not a multiple of the page size " +
                                                  std::to_string(page));
  }
  auto end = offset.CheckedAdd(length);
  if (!end) {
    return Error(ErrorCode::kOutOfRange, what + ": offset " + Hex(offset.value()) + " + length " +
                                             Hex(length) + " overflows");
  }
  if (end->value() > size_) {
    return Error(ErrorCode::kOutOfRange, what + ": range [" + Hex(offset.value()) + ", " +
                                             Hex(end->value()) + ") is past the end of \"" + name_ +
                                             "\" (" + Hex(size_) + " bytes)");
  }
  return OkStatus();
}

MemoryFile::PageRange MemoryFile::PagesOf(FileOffset offset, uint64_t length) const {
  return PageRange{offset.value() / caps_.page_size, length / caps_.page_size};
}

PageState MemoryFile::StateAt(FileOffset offset) const {
  return pages_.Get(offset.value() / caps_.page_size);
}

void MemoryFile::WaitForInflight(std::unique_lock<std::mutex>& lock, const PageRange& range) {
  inflight_cv_.wait(lock, [&] {
    return std::none_of(inflight_.begin(), inflight_.end(),
                        [&](const PageRange& other) { return other.Overlaps(range); });
  });
}

void MemoryFile::EndInflight(const PageRange& range) {
  {
    std::lock_guard lock(inflight_mu_);
    auto it = std::find_if(inflight_.begin(), inflight_.end(), [&](const PageRange& other) {
      return other.first == range.first && other.count == range.count;
    });
    if (it != inflight_.end()) inflight_.erase(it);
  }
  inflight_cv_.notify_all();
}

// ---------------------------------------------------------------------------------------------
// MemoryFile: allocate, punch, populate

Status MemoryFile::AllocateRange(FileOffset offset, uint64_t length) {
  const std::string where =
      "[" + Hex(offset.value()) + ", +" + Hex(length) + ") of \"" + name_ + "\"";
  switch (caps_.backend) {
    case MemoryBackend::kAnonymous: {
      const int rc = os_->Madvise(anonymous_.bytes() + offset.value(), length, MADV_POPULATE_WRITE);
      if (rc < 0) return PosixError(-rc, "allocate: MADV_POPULATE_WRITE " + where);
      return OkStatus();
    }
    case MemoryBackend::kSecret: {
      // memfd_secret has no fallocate: its pages are allocated by the first fault on them.
      auto view = Mapping::Map(length, PROT_READ, MAP_SHARED, fd_.get(),
                               static_cast<off_t>(offset.value()), nullptr, os_);
      if (!view) return std::move(view).error().WithContext("allocate " + where);
      for (uint64_t at = 0; at < length; at += caps_.page_size) {
        (void)*static_cast<volatile const std::byte*>(view->bytes() + at);
      }
      return OkStatus();
    }
    default: {
      const int rc = os_->Fallocate(fd_.get(), FALLOC_FL_KEEP_SIZE,
                                    static_cast<off_t>(offset.value()), static_cast<off_t>(length));
      if (rc < 0) return PosixError(-rc, "allocate: fallocate " + where);
      return OkStatus();
    }
  }
}

Status MemoryFile::Allocate(FileOffset offset, uint64_t length) {
  GM_RETURN_IF_ERROR(CheckRange("allocate", offset, length));
  const PageRange range = PagesOf(offset, length);
  std::shared_lock invalidate(invalidate_lock_);
  GM_RETURN_IF_ERROR(AllocateRange(offset, length));
  pages_.MarkAllocated(range.first, range.count);
  return OkStatus();
}

Status MemoryFile::FreeRange(FileOffset offset, uint64_t length) {
  const std::string where =
      "[" + Hex(offset.value()) + ", +" + Hex(length) + ") of \"" + name_ + "\"";
  if (caps_.backend == MemoryBackend::kAnonymous) {
    const int rc = os_->Madvise(anonymous_.bytes() + offset.value(), length, MADV_DONTNEED);
    if (rc < 0) return PosixError(-rc, "punch_hole: MADV_DONTNEED " + where);
    return OkStatus();
  }
  const int rc = os_->Fallocate(fd_.get(), FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE,
                                static_cast<off_t>(offset.value()), static_cast<off_t>(length));
  if (rc < 0) return PosixError(-rc, "punch_hole: fallocate PUNCH_HOLE " + where);
  return OkStatus();
}

Result<uint64_t> MemoryFile::PunchHole(FileOffset offset, uint64_t length) {
  if (caps_.backend == MemoryBackend::kSecret) {
    return Error(ErrorCode::kUnsupported,
                 "punch_hole: memfd_secret cannot free single pages (no fallocate(2), no "
                 "MADV_DONTNEED); its memory is freed when the file is closed");
  }
  GM_RETURN_IF_ERROR(CheckRange("punch_hole", offset, length));
  const PageRange range = PagesOf(offset, length);
  const uint64_t end = range.first + range.count;
  std::unique_lock invalidate(invalidate_lock_);
  std::lock_guard bindings_lock(bindings_mu_);
  for (const auto& [id, binding] : bindings_) binding->InvalidateBegin(offset, length);
  const Status freed = FreeRange(offset, length);
  uint64_t released = 0;
  if (freed) {
    if (bindings_.empty()) {
      released = pages_.MarkPunched(range.first, range.count);
    } else {
      // Nothing else changes states while the invalidate lock is held exclusively.
      for (uint64_t p = pages_.NextPrepared(range.first, end); p < end;
           p = pages_.NextPrepared(p + 1, end)) {
        pages_.MarkPunched(p, 1);
        ++released;
        for (const auto& [id, binding] : bindings_) {
          binding->Release(FileOffset(p * caps_.page_size));
        }
      }
      pages_.MarkPunched(range.first, range.count);  // the allocated ones
    }
  }
  for (const auto& [id, binding] : bindings_) binding->InvalidateEnd(offset, length);
  if (!freed) return freed.error();
  return released;
}

Status MemoryFile::WriteContent(FileOffset offset, std::span<const std::byte> content) {
  if (write_method_ == WriteMethod::kThroughMapping) {
    auto view = Mapping::Map(content.size(), PROT_READ | PROT_WRITE, MAP_SHARED, fd_.get(),
                             static_cast<off_t>(offset.value()), nullptr, os_);
    if (!view) {
      return std::move(view).error().WithContext("populate [" + Hex(offset.value()) + ", +" +
                                                 Hex(content.size()) + ") of \"" + name_ + "\"");
    }
    std::memcpy(view->data(), content.data(), content.size());
    return OkStatus();
  }
  for (size_t done = 0; done < content.size();) {
    const uint64_t at = offset.value() + done;
    const ssize_t n = os_->Pwrite(fd_.get(), content.data() + done, content.size() - done,
                                  static_cast<off_t>(at));
    if (n < 0) {
      return PosixError(static_cast<int>(-n), "populate: pwrite " + Hex(content.size() - done) +
                                                  " bytes at " + Hex(at) + " of \"" + name_ + "\"");
    }
    if (n == 0) {
      return Error(ErrorCode::kIoError,
                   "populate: pwrite at " + Hex(at) + " of \"" + name_ + "\" wrote nothing");
    }
    done += static_cast<size_t>(n);
  }
  return OkStatus();
}

Status MemoryFile::Populate(FileOffset offset, std::span<const std::byte> content) {
  if (write_method_ == WriteMethod::kNone) {
    if (caps_.backend == MemoryBackend::kAnonymous) {
      return Error(ErrorCode::kUnsupported,
                   "populate: anonymous memory has no file to write; content arrives by "
                   "UFFDIO_COPY, then MarkPrepared");
    }
    if (caps_.backend == MemoryBackend::kSecret) {
      return Error(ErrorCode::kUnsupported,
                   "populate: memfd_secret has no write(2) and takes no userfaultfd; write the "
                   "content through a mapping, then MarkPrepared");
    }
    return Error(ErrorCode::kUnsupported,
                 "populate: " + std::string(MemoryBackendName(caps_.backend)) + " file \"" + name_ +
                     "\" can be neither written nor mapped");
  }
  GM_RETURN_IF_ERROR(CheckRange("populate", offset, content.size()));
  const PageRange range = PagesOf(offset, content.size());
  const uint64_t end = range.first + range.count;
  std::shared_lock invalidate(invalidate_lock_);
  {
    std::unique_lock lock(inflight_mu_);
    WaitForInflight(lock, range);
    const uint64_t prepared = pages_.NextPrepared(range.first, end);
    if (prepared != end) {
      return Error(ErrorCode::kAlreadyExists, "populate: the page at " +
                                                  Hex(prepared * caps_.page_size) + " of \"" +
                                                  name_ + "\" is already prepared");
    }
    inflight_.push_back(range);
  }
  const Status written = WriteContent(offset, content);
  if (written) pages_.MarkPrepared(range.first, range.count);
  EndInflight(range);
  return written;
}

Status MemoryFile::MarkPrepared(FileOffset offset, uint64_t length) {
  GM_RETURN_IF_ERROR(CheckRange("mark_prepared", offset, length));
  const PageRange range = PagesOf(offset, length);
  std::shared_lock invalidate(invalidate_lock_);
  std::unique_lock lock(inflight_mu_);
  WaitForInflight(lock, range);
  pages_.MarkPrepared(range.first, range.count);
  return OkStatus();
}

// ---------------------------------------------------------------------------------------------
// MemoryFile: bindings

Result<BindingId> MemoryFile::Attach(Binding* binding) {
  if (binding == nullptr) {
    return Error(ErrorCode::kInvalidArgument, "attach to \"" + name_ + "\": null binding");
  }
  std::lock_guard lock(bindings_mu_);
  for (const auto& [id, attached] : bindings_) {
    if (attached == binding) {
      return Error(ErrorCode::kAlreadyExists, "attach to \"" + name_ +
                                                  "\": the binding is attached already as id " +
                                                  std::to_string(static_cast<uint64_t>(id)));
    }
  }
  const BindingId id{next_binding_id_++};
  bindings_.emplace_back(id, binding);
  return id;
}

Status MemoryFile::Detach(BindingId id) {
  std::lock_guard lock(bindings_mu_);
  auto it = std::find_if(bindings_.begin(), bindings_.end(),
                         [&](const auto& entry) { return entry.first == id; });
  if (it == bindings_.end()) {
    return Error(ErrorCode::kNotFound, "detach from \"" + name_ + "\": no binding with id " +
                                           std::to_string(static_cast<uint64_t>(id)));
  }
  bindings_.erase(it);
  return OkStatus();
}

// ---------------------------------------------------------------------------------------------
// MemoryFile: mappings

Result<MemoryMapping> MemoryFile::Map() { return Map(FileOffset(0), size_); }

Result<MemoryMapping> MemoryFile::Map(FileOffset offset, uint64_t length) {
  GM_RETURN_IF_ERROR(CheckRange("map", offset, length));
  if (!mmap_allowed_) {
    return Error(ErrorCode::kPermissionDenied,
                 "map: the owner of \"" + name_ + "\" does not allow mmap");
  }
  if (!caps_.mmap_allowed) {
    return Error(ErrorCode::kUnsupported, "map: " + std::string(MemoryBackendName(caps_.backend)) +
                                              " file \"" + name_ + "\" cannot be mapped");
  }
  {
    std::lock_guard lock(bindings_mu_);
    for (const auto& [id, binding] : bindings_) {
      if (!binding->MayMmap()) {
        return Error(ErrorCode::kPermissionDenied, "map: binding " +
                                                       std::to_string(static_cast<uint64_t>(id)) +
                                                       " of \"" + name_ + "\" does not allow mmap");
      }
    }
  }
  Mapping owned;
  void* data = nullptr;
  if (caps_.backend == MemoryBackend::kAnonymous) {
    if (anonymous_view_taken_.exchange(true)) {
      return Error(ErrorCode::kFailedPrecondition,
                   "map: anonymous memory \"" + name_ +
                       "\" has one mapping, and a view of it is alive already");
    }
    data = anonymous_.bytes() + offset.value();
  } else {
    auto mapped = Mapping::Map(length, PROT_READ | PROT_WRITE, MAP_SHARED, fd_.get(),
                               static_cast<off_t>(offset.value()), nullptr, os_);
    if (!mapped) return std::move(mapped).error().WithContext("map \"" + name_ + "\"");
    owned = std::move(*mapped);
    data = owned.data();
  }
  const HostVirtAddr start(reinterpret_cast<uint64_t>(data));
  auto registered = AddressRegistry::Global().Register(start, length, shared_from_this(), offset);
  if (!registered) {
    if (!owned.valid()) ReleaseAnonymousView();
    return std::move(registered).error().WithContext("map \"" + name_ + "\"");
  }
  return MemoryMapping(shared_from_this(), offset, std::move(owned), data, length);
}

void MemoryFile::ReleaseAnonymousView() { anonymous_view_taken_.store(false); }

MemoryMapping::MemoryMapping(MemoryMapping&& other) noexcept
    : file_(std::move(other.file_)),
      offset_(other.offset_),
      owned_(std::move(other.owned_)),
      data_(std::exchange(other.data_, nullptr)),
      size_(std::exchange(other.size_, 0)) {}

MemoryMapping& MemoryMapping::operator=(MemoryMapping&& other) noexcept {
  if (this != &other) {
    reset();
    file_ = std::move(other.file_);
    offset_ = other.offset_;
    owned_ = std::move(other.owned_);
    data_ = std::exchange(other.data_, nullptr);
    size_ = std::exchange(other.size_, 0);
  }
  return *this;
}

void MemoryMapping::reset() {
  if (data_ != nullptr) {
    // Unregister first: once the range is unmapped, another mapping may take its address.
    (void)AddressRegistry::Global().Unregister(host_address());
    if (owned_.valid()) {
      owned_.reset();
    } else {
      file_->ReleaseAnonymousView();
    }
  }
  file_.reset();
  data_ = nullptr;
  size_ = 0;
  offset_ = FileOffset();
}

}  // namespace guestmem
