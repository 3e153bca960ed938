// FaultHandler: serves the userfaultfd events of one VM's guest memory.
//
// A handler owns one uffd, knows the VM's guest layout (which host ranges map which offsets of
// the snapshot) and where content comes from (a PageSource). Each call to ServeReadyEvents()
// reads the pending events in one batch and resolves them:
//   - MISSING faults on anonymous memory: the content is read from the source and installed with
//     UFFDIO_COPY (InstallMode::kCopy, Firecracker's default);
//   - file-backed memory (shmem, hugetlbfs) in the seed's *full minor trap*
//     (InstallMode::kMinorTrap, the range registered MISSING|MINOR): the content is written into
//     the guest memory file (MemoryFile::Populate), then mapped with UFFDIO_CONTINUE; a page whose
//     content is already in the file is only continued. The file's page states stay true;
//   - zero pages (holes in the source, pages removed by the balloon) are installed with
//     UFFDIO_ZEROPAGE, without copying a zero buffer (hugetlb: a copy of a shared zero page);
//   - fault-around: an aligned window around the faulting page (never crossing a region edge,
//     skipping pages already installed) is installed with the faulting page;
//   - REMOVE events (balloon MADV_DONTNEED) make those pages read as zero afterwards, and are
//     applied before any fault of the same batch (a REMOVE read after a fault may causally
//     precede it); UNMAP forgets the range; REMAP follows a region that moved whole; FORK yields
//     a child handler (TakeForkedChildren) serving the child's copy of memory;
//   - EAGAIN from an install (a non-fault event is pending) drains the events and retries;
//   - when the source cannot supply a page, the faulting page is poisoned (UFFDIO_POISON: the
//     faulting access gets SIGBUS) and the reason logged. On a kernel without UFFDIO_POISON the
//     handler fails with the source's error instead, so that its owner tears the VM's space down:
//     guestmem never installs a zero page where data was expected.
//   - fault-all (options.fault_all): the first fault installs every page of every region.
//
// Thread safety: ServeReadyEvents/InstallAll from one thread at a time (the engine gives each
// handler to one worker); stats() from any thread.
#ifndef GUESTMEM_FAULT_HANDLER_H_
#define GUESTMEM_FAULT_HANDLER_H_

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "guestmem/fault_stats.h"
#include "guestmem/guest_layout.h"
#include "guestmem/memory_file.h"
#include "guestmem/page_source.h"
#include "guestmem/result.h"
#include "guestmem/userfaultfd.h"

namespace guestmem {

enum class InstallMode {
  kCopy,       // UFFDIO_COPY into anonymous memory (regions registered MISSING)
  kMinorTrap,  // write into the guest memory file, then UFFDIO_CONTINUE (MISSING|MINOR)
};

inline constexpr uint64_t kDefaultFaultAroundBytes = 64 * 1024;

struct FaultHandlerOptions {
  std::string name = "vm";   // for log lines: "vm 3 (pid 4242)"
  InstallMode mode = InstallMode::kCopy;
  // Window installed around each fault, a power of two >= 4 KiB; 4 KiB = one page per fault.
  // Regions of 2 MiB pages are always served one 2 MiB page at a time.
  uint64_t fault_around_bytes = kDefaultFaultAroundBytes;
  bool fault_all = false;    // the first fault installs everything
  // kMinorTrap: the guest memory file behind the mappings. Region i's content lives at the same
  // offset in this file as in the source (layout.regions()[i].file_offset).
  std::shared_ptr<MemoryFile> memory_file;
};

class FaultHandler {
 public:
  // Validates that every region lies inside the source (and inside the memory file in
  // kMinorTrap), and the options; kInvalidArgument / kOutOfRange otherwise.
  static Result<std::unique_ptr<FaultHandler>> Create(Userfaultfd uffd, GuestLayout layout,
                                                      std::shared_ptr<const PageSource> source,
                                                      FaultHandlerOptions options);
  ~FaultHandler();
  FaultHandler(const FaultHandler&) = delete;
  FaultHandler& operator=(const FaultHandler&) = delete;

  // The uffd to poll for readability.
  int fd() const;
  const std::string& name() const;
  const GuestLayout& layout() const;

  // Reads every pending event (in batches) and serves it. Returns OK when nothing is pending
  // any more; kPeerGone when the VM's process has exited (the handler is finished); another
  // error when the VM can no longer be served (then the owner should drop the handler).
  Status ServeReadyEvents();

  // Installs every page not installed yet, region by region, in large chunks.
  Status InstallAll();

  // Handlers for children forked since the last call (UFFD_EVENT_FORK), sharing this handler's
  // source and options, starting from this handler's installed-page state.
  std::vector<std::unique_ptr<FaultHandler>> TakeForkedChildren();

  FaultStats stats() const;

 private:
  struct State;
  explicit FaultHandler(std::unique_ptr<State> state);
  std::unique_ptr<State> s_;
};

}  // namespace guestmem

#endif  // GUESTMEM_FAULT_HANDLER_H_
