// PageInstaller: puts content into a VM's guest memory, one contiguous range at a time.
//
// The last stage of the fault pipeline. A caller (the fault handler) decides what to install and
// fetches it; an installer maps it with the userfaultfd ioctls that fit the memory:
//   CopyInstaller       anonymous memory (Firecracker's default, registered MISSING): data with
//                       UFFDIO_COPY, zeros with UFFDIO_ZEROPAGE (hugetlb has none: a copy of a
//                       zero huge page, one huge page per ioctl), zeros a write fault is about to
//                       dirty as real zeroed pages (a copy), so that the write takes no second
//                       copy-on-write fault;
//   MinorTrapInstaller  file-backed memory in the seed's full minor trap (registered
//                       MISSING|MINOR over a MemoryFile): the content is written into the file
//                       (MemoryFile::Populate), then UFFDIO_CONTINUE maps it; pages the file
//                       already holds are only continued; 4 KiB zeros go straight into the file's
//                       page cache and the mapping with UFFDIO_ZEROPAGE.
//
// An install reports how far it got. A page found already mapped (EEXIST) counts as installed:
// the rest of the range is then installed page by page, and the threads waiting on a page that
// was already there are woken. Content is never read past the range it covers.
//
// Thread safety: an installer may be used from one thread at a time; its counters may be read
// from any thread.
#ifndef GUESTMEM_PAGE_INSTALLER_H_
#define GUESTMEM_PAGE_INSTALLER_H_

#include <atomic>
#include <cstdint>
#include <memory>
#include <span>

#include "guestmem/guest_layout.h"
#include "guestmem/mapping.h"
#include "guestmem/memory_file.h"
#include "guestmem/result.h"
#include "guestmem/userfaultfd.h"

namespace guestmem {

enum class ContentKind {
  kData,         // bytes from the snapshot
  kZero,         // zeros: the shared zero page where the memory allows
  kZeroToWrite,  // zeros a write fault is about to dirty: real zeroed pages
  kInFile,       // minor trap: the guest memory file holds the content already; only map it
};

// What to install: for kData, exactly the range's bytes; nothing for the other kinds.
struct Content {
  ContentKind kind = ContentKind::kData;
  std::span<const std::byte> data;
};

struct InstallProgress {
  enum class Outcome {
    kDone,       // every page of the range is mapped (by this call or before it)
    kAgain,      // a non-fault event is pending (EAGAIN): the first `bytes` are mapped; read
                 // events, apply them, then install the rest
    kNoMapping,  // the range (from `bytes` on) is no longer registered: the VM unmapped it
    kTaskGone,   // the VM's process has exited
  };
  Outcome outcome = Outcome::kDone;
  uint64_t bytes = 0;  // installed from the start of the range, page aligned
};

// Pages installed, by how (4 KiB units).
struct InstallCounters {
  std::atomic<uint64_t> copied{0};     // UFFDIO_COPY of data
  std::atomic<uint64_t> zeroed{0};     // zero pages (UFFDIO_ZEROPAGE, or a copy of zeros)
  std::atomic<uint64_t> continued{0};  // UFFDIO_CONTINUE of content written into the file
  std::atomic<uint64_t> populated{0};  // written into the file only, for KVM to map (Populate)
};

class PageInstaller {
 public:
  virtual ~PageInstaller() = default;
  // Installs `content` at [offset, offset + length) of `region` (offsets within the region).
  // REQUIRES: offset and length aligned to region.page_size, length > 0, the range inside the
  // region; for kData, content.data.size() == length.
  // ERRORS: what the kernel or the memory file report for real failures (ENOMEM, EFAULT, a
  // failed write into the file); EEXIST/EAGAIN/ENOENT/ESRCH are outcomes, not errors.
  virtual Result<InstallProgress> Install(const GuestRegion& region, uint64_t offset,
                                          uint64_t length, const Content& content) = 0;

  const InstallCounters& counters() const { return counters_; }

 protected:
  InstallCounters counters_;
};

// A read-only mapping of zeros to copy from (never written, so every page of it is the kernel's
// shared zero page and costs no memory). `bytes` is rounded up to 2 MiB.
Result<Mapping> MapZeros(uint64_t bytes);

class CopyInstaller final : public PageInstaller {
 public:
  // `zeros`: a MapZeros() mapping of at least 2 MiB. Both must outlive the installer.
  CopyInstaller(Userfaultfd* uffd, const Mapping* zeros) : uffd_(uffd), zeros_(zeros) {}
  Result<InstallProgress> Install(const GuestRegion& region, uint64_t offset, uint64_t length,
                                  const Content& content) override;

 private:
  // Copies `length` bytes of zeros in steps no larger than the zero mapping (and one huge page
  // per ioctl on hugetlb).
  Result<InstallProgress> CopyZeros(const GuestRegion& region, uint64_t offset, uint64_t length,
                                    std::atomic<uint64_t>& counter);

  Userfaultfd* uffd_;
  const Mapping* zeros_;
};

class MinorTrapInstaller final : public PageInstaller {
 public:
  // `file`: the guest memory file behind the regions (region i's content at the same offset in
  // the file as in the snapshot). All must outlive the installer.
  MinorTrapInstaller(Userfaultfd* uffd, MemoryFile* file, const Mapping* zeros)
      : uffd_(uffd), file_(file), zeros_(zeros) {}
  Result<InstallProgress> Install(const GuestRegion& region, uint64_t offset, uint64_t length,
                                  const Content& content) override;
  // Puts the content into the file only, mapping nothing (a guest fault of a secret-hiding VM:
  // KVM maps the page from the file itself). Pages the file holds already are left as they are.
  Status Populate(const GuestRegion& region, uint64_t offset, uint64_t length,
                  const Content& content);

 private:
  // The length of the run of pages from region offset `at` (up to `end`) that the file holds
  // already (*prepared) or that it does not (!*prepared).
  uint64_t RunFrom(const GuestRegion& region, uint64_t at, uint64_t end, bool* prepared) const;
  // One run of pages that the file holds already (prepared) or not.
  Result<InstallProgress> InstallRun(const GuestRegion& region, uint64_t offset, uint64_t length,
                                     bool prepared, const Content& content);
  // Writes `length` bytes of zeros into the file, one zero mapping's worth at a time.
  Status PopulateZeros(uint64_t file_offset, uint64_t length);

  Userfaultfd* uffd_;
  MemoryFile* file_;
  const Mapping* zeros_;
};

}  // namespace guestmem

#endif  // GUESTMEM_PAGE_INSTALLER_H_
