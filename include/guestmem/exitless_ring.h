// ExitlessRing: one vCPU's exitless async-page-fault rings (Firecracker's secret-hiding branch,
// x86), shared between KVM and the page-fault handler without a VM exit.
//
// Each vCPU's KVM fd, mapped at offset 3·PAGE_SIZE, is one page (all fields little-endian):
//   header at 0       u32 version (1), ring_size (64), entry_size (16), flags; u64 reserved[6]
//   notify at 64      the kernel produces: {u64 gpa, u64 flags = 0x30} for each fault it made
//                     asynchronous; the handler consumes
//   complete at 1216  the handler produces {u64 gpa, u64 flags = 0} once a page is in; the kernel
//                     consumes
// Each ring is u32 head, 15 u32 of padding, u32 tail, 15 u32 of padding, then 64 entries. Indices
// run free (u32, wrapping); an entry's slot is index & 63; a ring is full when head - tail == 64.
// A producer writes the entry, then stores head with release; a consumer loads head with acquire,
// reads the entries, then stores tail with release.
//
// Notifications: the kernel writes the vCPU's notify eventfd only while the header's flags hold
// NOTIFY_ARMED (bit 0). Before it sleeps the handler arms (fetch_or, release), fences (seq_cst)
// and looks at the ring again: if entries came meanwhile it disarms and drains them instead of
// sleeping (Arm() returns false). After pushing completions it writes the complete eventfd.
//
// Both sides are here: the handler's (Pending, Consume, PushCompletion, Arm), and the kernel's
// (Initialize, Notify, TakeCompletions), with which `gmem vmm-sim` stands in for KVM.
//
// Thread safety: one thread per side at a time; the two sides may run concurrently in different
// processes or threads (that is the point).
#ifndef GUESTMEM_EXITLESS_RING_H_
#define GUESTMEM_EXITLESS_RING_H_

#include <cstddef>
#include <cstdint>
#include <span>

#include "guestmem/mapping.h"
#include "guestmem/result.h"

namespace guestmem {

class Os;

inline constexpr uint32_t kExitlessRingVersion = 1;
inline constexpr uint32_t kExitlessRingEntries = 64;
inline constexpr uint32_t kExitlessEntryBytes = 16;
inline constexpr uint32_t kExitlessNotifyArmed = 1;
inline constexpr uint64_t kExitlessRingPageOffset = 3 * 4096;  // in the vCPU fd
inline constexpr size_t kExitlessRingPageBytes = 4096;
inline constexpr size_t kExitlessNotifyOffset = 64;
inline constexpr size_t kExitlessCompleteOffset = 1216;

struct ExitlessEntry {
  uint64_t gpa = 0;
  uint64_t flags = 0;
};

class ExitlessRing {
 public:
  // Maps the ring page of `vcpu_fd` (MAP_SHARED at kExitlessRingPageOffset) and checks its header.
  // A regular file standing for the vCPU fd must hold the page and be sealed against shrinking
  // (F_SEAL_SHRINK), so that the mapping can never fault past its end.
  // ERRORS: mmap's; kProtocolError for a header other than version 1, 64 entries of 16 bytes, or
  // a file too short or not sealed.
  static Result<ExitlessRing> Map(int vcpu_fd, Os* os = nullptr);
  // The kernel's side: writes a fresh header and empty rings into the ring page of `vcpu_fd`
  // (which must be at least kExitlessRingPageOffset + one page long), then maps it.
  static Result<ExitlessRing> Initialize(int vcpu_fd, Os* os = nullptr);

  ExitlessRing(ExitlessRing&&) noexcept = default;
  ExitlessRing& operator=(ExitlessRing&&) noexcept = default;

  // --- the handler's side
  // Copies up to out.size() notifications from the notify ring's tail on, without consuming them;
  // returns how many. ERRORS: kProtocolError when head is more than 64 ahead of tail (the ring is
  // not one a kernel wrote).
  Result<size_t> Pending(std::span<ExitlessEntry> out) const;
  // The free-running index of the next notification Pending() returns (the notify ring's tail).
  uint32_t notify_tail() const;
  // Consumes `count` notifications (stores tail with release). REQUIRES: Pending() returned at
  // least `count`.
  void Consume(uint32_t count);
  // Pushes a completion {gpa, 0}; false when the complete ring is full (the kernel has not taken
  // 64 earlier ones yet).
  bool PushCompletion(uint64_t gpa);
  // Arms notifications; false (disarmed again) when notifications are waiting, so that the caller
  // drains them instead of sleeping.
  bool Arm();

  // --- the kernel's side
  // Produces a notification; false when the notify ring is full. Returns through *signal whether
  // the handler was armed (then the caller writes the notify eventfd; the arm is used up).
  bool Notify(const ExitlessEntry& entry, bool* signal);
  // Consumes up to out.size() completions; returns how many.
  size_t TakeCompletions(std::span<ExitlessEntry> out);

 private:
  explicit ExitlessRing(Mapping page) : page_(std::move(page)) {}
  Mapping page_;
};

}  // namespace guestmem

#endif  // GUESTMEM_EXITLESS_RING_H_
