// The soak's VM: one process that restores its guest memory from the soak's snapshot through a
// page-fault handler, exactly as Firecracker hands its memory over, and checks every byte it reads.
//
// RunGuest maps guest memory (`regions` anonymous private regions, back to back in the memory
// file, with unmapped gaps between them in the host; MAP_HUGETLB for 2 MiB pages), creates a uffd
// with EVENT_REMOVE (and EVENT_FORK when fork injection is on), registers every region MISSING,
// connects to the handler's socket and sends the handshake. Then `threads` workers run
// operations on pages they own until the VM's budget of operations is spent or the driver says
// stop:
//   - read a page and compare it with what it must hold;
//   - write the VM's own pattern over a page and read it back;
//   - balloon: MADV_DONTNEED a run of pages, then read them: zero until written again.
// Pages are owned in runs of 8 (half a 64 KiB fault-around window; 2 MiB pages one by one), so
// every window is shared by two threads, and all threads work in the same few windows at a time
// (the focus, which moves every few hundred operations): one thread's fault then races another's
// balloon in the same window. The VM's main thread injects, at points of the budget chosen by the
// seed: balloon storms (workers balloon half the time), munmap of a 64 KiB window where the
// workers are (their pending faults included), and fork, when the kernel offers EVENT_FORK: the
// workers pause, the child checks a sample of its copy of memory (its faults are served through
// the child's uffd) and exits.
//
// What a page must hold: the snapshot's content until the VM writes it, zero after a balloon
// until written, the VM's pattern once written; SIGBUS instead, as long as it holds the snapshot's
// content, if that content cannot be read from the source (the failing set, when I/O errors are
// injected); SIGSEGV only on memory the VM has unmapped. Anything else is a failure: the first one
// is written to the VmSlot (VM, page, offset, expected and actual byte) and the VM exits 1 at once.
//
// Thread safety: RunGuest runs once per process, in the launcher's child.
#ifndef GUESTMEM_TOOLS_GMEM_SOAK_GUEST_H_
#define GUESTMEM_TOOLS_GMEM_SOAK_GUEST_H_

#include <cstdint>
#include <string>

#include "soak/vm_slot.h"

namespace guestmem::soak {

inline constexpr int kGuestExitOk = 0;
inline constexpr int kGuestExitFailed = 1;  // the slot's failure says what was wrong
inline constexpr int kGuestExitSetup = 2;   // could not map, register or hand over memory

struct GuestSpec {
  uint32_t index = 0;
  uint64_t seed = 1;
  std::string socket_path;
  uint64_t memory_bytes = 0;  // the whole snapshot
  uint64_t page_size = 4096;
  uint32_t regions = 1;
  uint64_t region_gap = uint64_t{2} << 20;
  unsigned threads = 3;
  uint64_t operations = 20000;
  bool balloon = true;
  bool munmap = true;
  bool fork = true;
  uint32_t failing_permille = 0;  // the source's failing pages (0: no I/O errors injected)
};

int RunGuest(const GuestSpec& spec, VmSlot* slot);

}  // namespace guestmem::soak

#endif  // GUESTMEM_TOOLS_GMEM_SOAK_GUEST_H_
