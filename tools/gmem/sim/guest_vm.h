// GuestVm: plays Firecracker's side of a Uffd snapshot restore, in-process.
//
// Create() maps guest memory and prepares its userfaultfd exactly as Firecracker does before
// `PUT /snapshot/load` with the Uffd backend:
//   - memory is split into `regions` regions laid out back to back in the memory file, with a gap
//     of unmapped (PROT_NONE) address space between them in the host, like x86's MMIO hole;
//   - each region is mapped MAP_PRIVATE|MAP_ANONYMOUS|MAP_NORESERVE (plus MAP_HUGETLB for 2 MiB
//     pages); in the secret-hiding variant it is instead a MAP_SHARED mapping of a shmem guest
//     memory file (hugetlb memfd for 2 MiB pages) at the region's offset;
//   - one uffd is created non-blocking and close-on-exec, not user-mode-only, with EVENT_REMOVE
//     (and MINOR for the guest memory file in the secret-hiding variant), and every region is
//     registered MISSING (secret hiding: MISSING|MINOR);
//   - the handshake regions are built: offset is the running sum of earlier sizes, page_size and
//     page_size_kib both in bytes; secret hiding adds gpa_start and is_guest_memfd = true, and
//     sends the guest memory file and a bitmap memfd (one bit per guest page) after the uffd.
// Connect() connects to the handler's socket and sends the handshake as ONE message; like
// Firecracker, the VM keeps the socket open (the handler sees hang-up only when the VM goes away)
// and keeps its own copy of the uffd. Nothing is global: several GuestVms may live in one process,
// with their handlers in threads of the same process.
//
// The secret-hiding variant plays the rest of Firecracker's restore too, step by step for its
// caller (sim/secret_hiding.h): ConnectApf() before Connect() (Firecracker tries the APF socket
// first and goes on without it), FillUserfaultBitmap() after message 1 (every bit set: no page is
// populated yet), SendApfControl() (message 2). The bitmap is a sealed memfd of one bit per 4 KiB
// page, as Firecracker's; KvmAddress() reads the guest memory file through a second mapping that
// no uffd covers, as KVM reads guest_memfd.
//
// Thread safety: Create/Connect/destruction from one thread. Once connected, guest memory may be
// touched from any number of threads; the accessors are const and safe to call concurrently.
#ifndef GUESTMEM_TOOLS_GMEM_SIM_GUEST_VM_H_
#define GUESTMEM_TOOLS_GMEM_SIM_GUEST_VM_H_

#include <cstddef>
#include <cstdint>
#include <memory>
#include <span>
#include <string>
#include <vector>

#include "guestmem/address.h"
#include "guestmem/handshake.h"
#include "guestmem/mapping.h"
#include "guestmem/result.h"
#include "guestmem/unique_fd.h"
#include "guestmem/userfaultfd.h"

namespace guestmem {
class Os;
}

namespace guestmem::sim {

struct GuestVmOptions {
  uint64_t memory_bytes = 0;             // total guest memory; a multiple of page_size
  uint64_t page_size = kPageSize4K;      // kPageSize4K or kHugePageSize2M
  int regions = 1;                       // 1..memory_bytes / page_size
  uint64_t gap_bytes = kHugePageSize2M;  // host (and guest) gap between regions; page aligned
  bool secret_hiding = false;            // the experimental secret-hiding handshake (3 descriptors)
  Os* os = nullptr;                      // Os::Default() when null
};

// One guest memory region as the VM sees it.
struct GuestVmRegion {
  std::span<std::byte> host;  // where it is mapped in this process
  uint64_t file_offset = 0;   // where its content starts in the memory file
  uint64_t guest_phys = 0;    // where the guest sees it
};

class GuestVm {
 public:
  // kInvalidArgument for bad options (naming them); kResourceExhausted if 2 MiB pages are asked
  // for and fewer huge pages are free than the memory needs; kUnsupported if the kernel lacks a
  // userfaultfd feature the variant needs (naming it).
  static Result<std::unique_ptr<GuestVm>> Create(const GuestVmOptions& options);

  GuestVm(const GuestVm&) = delete;
  GuestVm& operator=(const GuestVm&) = delete;
  ~GuestVm();

  // Connects to the handler listening at `socket_path` and sends the handshake.
  // kFailedPrecondition if already connected (a VM hands its memory over once).
  Status Connect(const std::string& socket_path);
  // The same over a socket the caller already connected (the VM keeps it open).
  Status SendHandshakeOn(UniqueFd socket);
  bool connected() const { return socket_.valid(); }
  int socket_fd() const { return socket_.get(); }

  // --- secret hiding (REQUIRES secret_hiding())
  // Connects to the APF socket at `path`; its errors (nobody listens) leave the VM without one.
  Status ConnectApf(const std::string& path);
  int apf_socket_fd() const { return apf_socket_.get(); }
  // Sets every bit of the userfault bitmap.
  void FillUserfaultBitmap();
  // Whether the page at memory-file offset `file_offset` is still to be populated (acquire).
  bool UserfaultBitSet(uint64_t file_offset) const;
  // Message 2 on the connected socket: no_exitless_apf, or exitless_apf:N with these 3·N
  // descriptors. kFailedPrecondition before Connect().
  Status SendApfControl(std::span<const int> exitless_fds);
  // The guest memory file at `file_offset` through a mapping no uffd covers.
  std::byte* KvmAddress(uint64_t file_offset) const;
  // The guest-physical address of memory-file offset `file_offset` (in a region).
  uint64_t GuestPhys(uint64_t file_offset) const;

  uint64_t memory_bytes() const { return options_.memory_bytes; }
  uint64_t page_size() const { return options_.page_size; }
  bool secret_hiding() const { return options_.secret_hiding; }
  const std::vector<GuestVmRegion>& regions() const { return regions_; }
  const std::vector<HandshakeRegion>& handshake_regions() const { return handshake_; }
  // The descriptors the handshake carries: the uffd, then (secret hiding) the guest memory file
  // and the bitmap.
  std::vector<int> handshake_fds() const;
  const Userfaultfd& uffd() const { return uffd_; }
  // The guest memory file (secret hiding only; -1 otherwise).
  int memory_file_fd() const { return memory_file_.get(); }

  // Where memory-file offset `file_offset` is mapped, or nullptr if no region holds it.
  std::byte* HostAddress(uint64_t file_offset) const;

 private:
  GuestVm(const GuestVmOptions& options, Userfaultfd uffd)
      : options_(options), uffd_(std::move(uffd)) {}

  GuestVmOptions options_;
  Mapping reservation_;  // every region and the gaps between them
  UniqueFd memory_file_;
  UniqueFd bitmap_;
  Mapping kvm_view_;     // the guest memory file, not registered with the uffd
  Mapping bitmap_view_;  // the userfault bitmap
  UniqueFd apf_socket_;
  Userfaultfd uffd_;
  std::vector<GuestVmRegion> regions_;  // in file (and host) order
  std::vector<HandshakeRegion> handshake_;
  UniqueFd socket_;  // declared last: closed first, so the handler sees hang-up before unmapping
};

}  // namespace guestmem::sim

#endif  // GUESTMEM_TOOLS_GMEM_SIM_GUEST_VM_H_
