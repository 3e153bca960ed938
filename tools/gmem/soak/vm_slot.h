// VmSlot: what the soak's driver and one VM process share, in a MAP_SHARED mapping made before
// any VM is forked. The driver tells the VM to stop; the VM reports its progress (every
// operation completed, in any of its threads or in a forked child of it), its counters, what each
// thread is doing (for a hang report) and its first failure, as text.
//
// Thread safety: every field is a lock-free atomic, shared across processes, except `failure`,
// which only the one thread that wins `failed` writes, before the VM exits.
#ifndef GUESTMEM_TOOLS_GMEM_SOAK_VM_SLOT_H_
#define GUESTMEM_TOOLS_GMEM_SOAK_VM_SLOT_H_

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <cstring>
#include <string_view>

namespace guestmem::soak {

inline constexpr unsigned kMaxVmThreads = 16;

// What a VM thread is doing, for hang reports.
enum class VmOp : uint32_t { kIdle, kRead, kWrite, kBalloon, kMunmap, kFork, kCheckCopy, kDone };
const char* VmOpName(VmOp op);

struct VmSlot {
  static_assert(std::atomic<uint64_t>::is_always_lock_free);

  // Driver to VM.
  std::atomic<uint32_t> stop{0};

  // VM to driver.
  std::atomic<uint64_t> progress{0};        // operations completed
  std::atomic<uint64_t> bytes_verified{0};  // guest bytes compared with what they must be
  std::atomic<uint64_t> balloons{0};        // MADV_DONTNEED calls
  std::atomic<uint64_t> balloon_units{0};   // pages (of the VM's page size) they removed
  std::atomic<uint64_t> storms{0};          // balloon storms begun
  std::atomic<uint64_t> munmaps{0};
  std::atomic<uint64_t> forks{0};        // forked children that checked their copy
  std::atomic<uint64_t> sigbus{0};       // SIGBUS on a page the source cannot supply
  std::atomic<uint64_t> sigsegv{0};      // SIGSEGV on memory the VM had just unmapped
  std::atomic<uint64_t> handed_over{0};  // 1 once the handshake was sent
  struct Doing {
    std::atomic<uint32_t> op{0};
    std::atomic<uint64_t> unit{0};
  };
  Doing doing[kMaxVmThreads + 1];  // the workers, then the VM's main thread

  std::atomic<uint32_t> failed{0};
  char failure[1024] = {};

  // Records the first failure (later ones are dropped), cut to fit.
  void Fail(std::string_view text) {
    if (failed.exchange(1) != 0) return;
    const size_t n = std::min(text.size(), sizeof(failure) - 1);
    std::memcpy(failure, text.data(), n);
    failure[n] = '\0';
  }
};

}  // namespace guestmem::soak

#endif  // GUESTMEM_TOOLS_GMEM_SOAK_VM_SLOT_H_
