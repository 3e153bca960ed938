// MemoryFile: a guest memory file, the seed's guestmem library in user space.
//
// A MemoryFile is N pages of guest memory over one backend (a shmem memfd, a hugetlbfs memfd with
// 2 MiB pages, private anonymous memory, memfd_secret, or KVM guest_memfd) together with the state
// of every page (absent -> allocated -> prepared -> removed, see page_state.h). It can allocate
// backing, punch holes, take content by write(2) (Populate) or be told that content arrived another
// way (MarkPrepared, after UFFDIO_COPY / UFFDIO_CONTINUE / a write through a mapping), and be
// mapped MAP_SHARED when its owner and every binding allow it. Mappings are registered in the
// process-wide AddressRegistry (address_registry.h) for as long as they live.
//
// Bindings are the consumers attached to a file (a hypervisor's view, a fault engine). They are
// told before and after any range is invalidated (PunchHole) and about every prepared page whose
// content is released, in this order, exactly once each per binding:
//   InvalidateBegin(range), Release(page) for each prepared page in it, InvalidateEnd(range).
//
// Thread safety: every method may be called from any thread at any time. Populate, Allocate and
// MarkPrepared run concurrently with each other; PunchHole excludes all three (the invalidate
// lock: taken shared by them, exclusive by the punch, as the kernel's filemap invalidate_lock), so
// a page is never left marked prepared when its content was punched. Two Populate calls of
// overlapping ranges never both write: one wins, the other waits for it and then gets
// kAlreadyExists. Attach and Detach wait for a punch in progress, so a binding gets both or none
// of InvalidateBegin/InvalidateEnd, and none after Detach returns.
// Binding callbacks run on the punching thread with the file's locks held: they must not call
// Attach, Detach, PunchHole, Populate, Allocate, MarkPrepared or Map on the same file (deadlock).
//
// Every range argument must be page aligned (to the backend's page size), non-empty, inside the
// file and free of overflow; otherwise the call fails with kInvalidArgument or kOutOfRange and
// changes nothing (no system call is made, no state changes, no binding is told).
#ifndef GUESTMEM_MEMORY_FILE_H_
#define GUESTMEM_MEMORY_FILE_H_

#include <atomic>
#include <condition_variable>
#include <cstddef>
#include <cstdint>
#include <memory>
#include <mutex>
#include <shared_mutex>
#include <span>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

#include "guestmem/address.h"
#include "guestmem/mapping.h"
#include "guestmem/page_state.h"
#include "guestmem/result.h"
#include "guestmem/uffd_modes.h"
#include "guestmem/unique_fd.h"

namespace guestmem {

class Os;

enum class MemoryBackend {
  kShmem,       // memfd_create(MFD_CLOEXEC): 4 KiB pages, write(2), every userfaultfd mode
  kHugetlb,     // memfd_create(MFD_HUGETLB | MFD_HUGE_2MB): 2 MiB pages from vm.nr_hugepages
  kAnonymous,   // one private anonymous MAP_NORESERVE mapping; content by UFFDIO_COPY
  kSecret,      // memfd_secret(2): pages out of the kernel direct map; no write(2), no uffd
  kGuestMemfd,  // KVM_CREATE_GUEST_MEMFD with GUEST_MEMFD_FLAG_MMAP; needs /dev/kvm
};

// "shmem", "hugetlb", "anonymous", "secret", "guest_memfd".
std::string_view MemoryBackendName(MemoryBackend backend);

// What a backend can do on the running kernel, found by creating a real object (never assumed).
struct BackendCapabilities {
  MemoryBackend backend = MemoryBackend::kShmem;
  uint64_t page_size = kPageSize4K;
  bool mmap_allowed = false;        // the object can be mapped MAP_SHARED (anonymous: its view)
  bool populate_by_write = false;   // write(2) fills its pages
  bool direct_map_removed = false;  // its pages are out of the kernel's direct map
  UffdModes uffd_modes = UffdModes::kNone;  // modes a mapping of it can be registered in
  std::string note;                         // one line for humans
};

// Probes the running kernel: creates and destroys a one-page object of `backend` (for hugetlb it
// also allocates its one huge page) and returns its capabilities, or kUnsupported with the reason
// ("no /dev/kvm: KVM guest_memfd unavailable",
// "hugetlbfs has no free 2 MiB pages (vm.nr_hugepages=0)"). `os`: Os::Default() when null.
Result<BackendCapabilities> ProbeBackend(MemoryBackend backend, Os* os = nullptr);

// Which backend the file behind `fd` is (a descriptor received from a VMM): a KVM guest_memfd,
// memfd_secret memory, a hugetlbfs file or a shmem/tmpfs file. kInvalidArgument, naming what the
// descriptor is, for anything else (a regular file on disk, a socket...).
Result<MemoryBackend> IdentifyBackend(int fd);

struct MemoryFileOptions {
  uint64_t size_bytes = 0;  // a multiple of the backend's page size, > 0
  // Adopt only: the largest file taken (0: no bound). A descriptor received from a client can
  // name a file of any size, and the page-state map is sized from it: bound it by what the
  // caller can serve (e.g. the snapshot's size) before anything is allocated.
  uint64_t max_size_bytes = 0;
  MemoryBackend backend = MemoryBackend::kShmem;
  std::string name = "guestmem";  // the memfd's name (shows in /proc/<pid>/maps)
  bool mmap_allowed = true;       // the owner's say on mmap
  Os* os = nullptr;               // Os::Default() when null
};

// A consumer attached to a file (a hypervisor's view of it, a fault engine...). The callbacks
// have empty defaults; override those that matter. See the header comment for when they run and
// what they must not do.
class Binding {
 public:
  virtual ~Binding() = default;
  // [offset, offset + length) is about to lose its content.
  virtual void InvalidateBegin(FileOffset /*offset*/, uint64_t /*length*/) {}
  // The invalidation announced by InvalidateBegin is over (whether or not it succeeded).
  virtual void InvalidateEnd(FileOffset /*offset*/, uint64_t /*length*/) {}
  // The prepared page at `page` has had its content released.
  virtual void Release(FileOffset /*page*/) {}
  // Whether the file may be mapped into user space while this binding is attached.
  virtual bool MayMmap() const { return true; }
};

// Names one attachment of a binding to a file.
enum class BindingId : uint64_t {};

class MemoryMapping;

class MemoryFile : public std::enable_shared_from_this<MemoryFile> {
 public:
  // Creates the backend object and a page-state map with every page kAbsent.
  static Result<std::shared_ptr<MemoryFile>> Create(const MemoryFileOptions& options);

  // Takes over an existing file of `options.backend` (a guest_memfd or memfd received from a
  // VMM). Its size is options.size_bytes when non-zero (which must not exceed the file's), else
  // the file's size. Pages where the file holds data (SEEK_DATA) start kAllocated, holes kAbsent;
  // where the file cannot tell, every page starts kAllocated.
  // ERRORS: kOutOfRange when the file (or size_bytes) is larger than options.max_size_bytes
  // (checked before anything is allocated) or size_bytes is larger than the file;
  // kResourceExhausted when the page-state map cannot be allocated (never an exception).
  // REQUIRES: options.backend != kAnonymous.
  static Result<std::shared_ptr<MemoryFile>> Adopt(UniqueFd fd, const MemoryFileOptions& options);

  MemoryFile(const MemoryFile&) = delete;
  MemoryFile& operator=(const MemoryFile&) = delete;
  ~MemoryFile();

  MemoryBackend backend() const { return caps_.backend; }
  const BackendCapabilities& capabilities() const { return caps_; }
  const std::string& name() const { return name_; }
  uint64_t size_bytes() const { return size_; }
  uint64_t page_size() const { return caps_.page_size; }
  uint64_t page_count() const { return pages_.page_count(); }
  // The owner's and the backend's say together (bindings are asked at Map time).
  bool mmap_allowed() const { return mmap_allowed_ && caps_.mmap_allowed; }
  // The backend's descriptor; -1 for kAnonymous.
  int fd() const { return fd_.get(); }

  const PageStateMap& pages() const { return pages_; }
  // REQUIRES: offset < size_bytes().
  PageState StateAt(FileOffset offset) const;

  // Allocates backing (fallocate; anonymous: MADV_POPULATE_WRITE; secret: a read fault of each
  // page through a temporary mapping). kAbsent/kRemoved -> kAllocated; prepared pages keep their
  // content. On failure page states are unchanged.
  Status Allocate(FileOffset offset, uint64_t length);

  // Frees the range (fallocate PUNCH_HOLE|KEEP_SIZE; anonymous: MADV_DONTNEED), telling every
  // binding before and after. kPrepared -> kRemoved, kAllocated -> kAbsent; the range then reads
  // as zero. Returns how many prepared pages were released. If the kernel refuses, bindings still
  // get InvalidateEnd but no Release, and states are unchanged. kSecret: kUnsupported
  // (memfd_secret cannot free single pages).
  Result<uint64_t> PunchHole(FileOffset offset, uint64_t length);

  // Writes `content` at `offset` (pwrite; where the file has no write(2), as on hugetlbfs,
  // through a temporary shared mapping of the range, which no userfaultfd watches) and marks the
  // pages kPrepared once it is all written. Fails with kAlreadyExists, changing nothing, if any
  // page in the range is already prepared (a removed page may be populated again). kAnonymous
  // and kSecret: kUnsupported (write into a mapping, then MarkPrepared). On a write error page
  // states are unchanged and the range's content is unspecified.
  Status Populate(FileOffset offset, std::span<const std::byte> content);

  // Records that the range's content arrived another way (UFFDIO_COPY / ZEROPAGE / CONTINUE, a
  // write through a mapping): every page -> kPrepared. Already prepared pages are fine. Waits for
  // a Populate of an overlapping range to finish first. The caller must make sure no PunchHole
  // of the range ran between installing the content and this call.
  Status MarkPrepared(FileOffset offset, uint64_t length);

  // Attaches a binding (not owned; it must outlive its attachment). kInvalidArgument for null,
  // kAlreadyExists if it is attached already. Waits for a punch in progress.
  Result<BindingId> Attach(Binding* binding);
  // Detaches; after it returns the binding is never called again. kNotFound for an unknown id.
  // Waits for a punch in progress.
  Status Detach(BindingId id);

  // Maps the whole file (or [offset, offset + length)) MAP_SHARED read-write and registers the
  // mapping in the AddressRegistry. kPermissionDenied when the owner (options.mmap_allowed) or
  // any attached binding (MayMmap) forbids it. kAnonymous: returns a view of its one mapping;
  // while a view lives another Map fails with kFailedPrecondition.
  Result<MemoryMapping> Map();
  Result<MemoryMapping> Map(FileOffset offset, uint64_t length);

 private:
  friend class MemoryMapping;
  struct PassKey {};
  enum class WriteMethod { kNone, kPwrite, kThroughMapping };

 public:
  // For make_shared only; use Create or Adopt.
  MemoryFile(PassKey, const MemoryFileOptions& options, BackendCapabilities caps, uint64_t size,
             UniqueFd fd, UniqueFd vm_fd, Mapping anonymous);

 private:
  struct PageRange {
    uint64_t first;
    uint64_t count;
    bool Overlaps(const PageRange& other) const {
      return first < other.first + other.count && other.first < first + count;
    }
  };

  static Result<std::shared_ptr<MemoryFile>> Finish(const MemoryFileOptions& options, uint64_t size,
                                                    UniqueFd fd, UniqueFd vm_fd, Mapping anonymous);

  // kInvalidArgument / kOutOfRange unless [offset, offset + length) is a valid page range.
  Status CheckRange(std::string_view op, FileOffset offset, uint64_t length) const;
  PageRange PagesOf(FileOffset offset, uint64_t length) const;
  Status WriteContent(FileOffset offset, std::span<const std::byte> content);
  Status FreeRange(FileOffset offset, uint64_t length);
  Status AllocateRange(FileOffset offset, uint64_t length);
  // Waits until no in-flight populate overlaps `range`. REQUIRES: lock holds inflight_mu_.
  void WaitForInflight(std::unique_lock<std::mutex>& lock, const PageRange& range);
  void EndInflight(const PageRange& range);
  void ReleaseAnonymousView();

  const std::string name_;
  const BackendCapabilities caps_;
  const uint64_t size_;
  const bool mmap_allowed_;
  const WriteMethod write_method_;
  Os* const os_;
  const UniqueFd fd_;
  const UniqueFd vm_fd_;     // guest_memfd: the VM it was created in
  const Mapping anonymous_;  // kAnonymous: the memory itself
  std::atomic<bool> anonymous_view_taken_{false};
  PageStateMap pages_;

  // Shared: Populate, Allocate, MarkPrepared. Exclusive: PunchHole.
  std::shared_mutex invalidate_lock_;
  // Page ranges being populated, so overlapping populates never write the same page at once.
  std::mutex inflight_mu_;
  std::condition_variable inflight_cv_;
  std::vector<PageRange> inflight_;  // GUARDED_BY(inflight_mu_)
  // Held by PunchHole from the first InvalidateBegin to the last InvalidateEnd.
  mutable std::mutex bindings_mu_;
  std::vector<std::pair<BindingId, Binding*>> bindings_;  // GUARDED_BY(bindings_mu_)
  uint64_t next_binding_id_ = 1;                          // GUARDED_BY(bindings_mu_)
};

// A live mapping of (part of) a MemoryFile, registered in the AddressRegistry for as long as it
// lives. Move-only; keeps its file alive. Destruction unregisters it, then unmaps it (for
// kAnonymous, gives the view back to the file).
//
// Thread safety: the object is not synchronized; the memory it maps may be used from any thread.
class MemoryMapping {
 public:
  MemoryMapping() = default;
  MemoryMapping(MemoryMapping&& other) noexcept;
  MemoryMapping& operator=(MemoryMapping&& other) noexcept;
  MemoryMapping(const MemoryMapping&) = delete;
  MemoryMapping& operator=(const MemoryMapping&) = delete;
  ~MemoryMapping() { reset(); }

  void* data() const { return data_; }
  std::byte* bytes() const { return static_cast<std::byte*>(data_); }
  uint64_t size() const { return size_; }
  std::span<std::byte> span() const { return {bytes(), static_cast<size_t>(size_)}; }
  HostVirtAddr host_address() const { return HostVirtAddr(reinterpret_cast<uint64_t>(data_)); }
  // Where in the file the mapping starts.
  FileOffset file_offset() const { return offset_; }
  const std::shared_ptr<MemoryFile>& file() const { return file_; }
  bool valid() const { return data_ != nullptr; }

  // Unregisters and unmaps now; the object becomes empty.
  void reset();

 private:
  friend class MemoryFile;
  MemoryMapping(std::shared_ptr<MemoryFile> file, FileOffset offset, Mapping owned, void* data,
                uint64_t size)
      : file_(std::move(file)),
        offset_(offset),
        owned_(std::move(owned)),
        data_(data),
        size_(size) {}

  std::shared_ptr<MemoryFile> file_;
  FileOffset offset_;
  Mapping owned_;  // empty for a view of anonymous memory
  void* data_ = nullptr;
  uint64_t size_ = 0;
};

}  // namespace guestmem

#endif  // GUESTMEM_MEMORY_FILE_H_
