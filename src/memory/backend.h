// The kernel objects behind each MemoryBackend: how one is created, and how to find out what it
// can do by trying (write(2), mmap, each userfaultfd mode) rather than by assuming. Also the KVM
// ABI values that older installed kernel headers lack.
//
// Private to the memory component. Thread safety: free functions without shared state; every
// system call goes through the Os passed in.
#ifndef GUESTMEM_MEMORY_BACKEND_H_
#define GUESTMEM_MEMORY_BACKEND_H_

#include <sys/ioctl.h>

#include <cstdint>
#include <string>

#include "guestmem/mapping.h"
#include "guestmem/memory_file.h"
#include "guestmem/result.h"
#include "guestmem/unique_fd.h"

namespace guestmem {

class Os;

namespace memory_internal {

// include/uapi/linux/kvm.h (Linux 6.8 and later), with the kernel's values.
struct KvmCreateGuestMemfd {
  uint64_t size;
  uint64_t flags;
  uint64_t reserved[6];
};
inline constexpr unsigned long kKvmCreateGuestMemfd = _IOWR(0xAE, 0xd4, KvmCreateGuestMemfd);
inline constexpr uint64_t kGuestMemfdFlagMmap = uint64_t{1} << 0;        // Linux 6.17
inline constexpr uint64_t kGuestMemfdFlagInitShared = uint64_t{1} << 1;  // Linux 6.18

uint64_t BackendPageSize(MemoryBackend backend);

struct BackendObject {
  UniqueFd fd;        // the file; invalid for kAnonymous
  UniqueFd vm_fd;     // kGuestMemfd: the VM the file belongs to
  Mapping anonymous;  // kAnonymous: the memory itself
};

// Creates `backend`'s object of `size` bytes (a multiple of its page size), named `name` where
// the backend takes a name. kUnsupported, with the reason, where the kernel lacks the backend.
Result<BackendObject> CreateBackendObject(MemoryBackend backend, const std::string& name,
                                          uint64_t size, Os* os);

// What an object of `backend` whose descriptor is `fd` (ignored for kAnonymous) can do, found by
// trying on it: a zero-length pwrite (write(2) support), a MAP_NORESERVE mapping of its first
// page, and registering that mapping with a scratch userfaultfd in each mode.
BackendCapabilities DescribeBackend(MemoryBackend backend, int fd, Os* os);

// The value of vm.nr_hugepages as text, or "unknown".
std::string NrHugepages(Os* os);

}  // namespace memory_internal
}  // namespace guestmem

#endif  // GUESTMEM_MEMORY_BACKEND_H_
