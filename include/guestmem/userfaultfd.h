// Userfaultfd: a thin RAII layer over Linux userfaultfd(2).
//
// A Userfaultfd owns one uffd descriptor. It is created through /dev/userfaultfd (or the syscall
// where the device is missing), negotiates features with UFFDIO_API, registers ranges in MISSING /
// MINOR / WP mode and resolves faults with COPY, ZEROPAGE, CONTINUE, WAKE, WRITEPROTECT, POISON
// and MOVE. A uffd received from another process (Firecracker's) is adopted as it is.
//
// Install operations report kernel outcomes that are part of normal operation as a UffdProgress,
// not as an Error:
//   kExists   (EEXIST) a page in the range is already mapped;
//   kAgain    (EAGAIN) a non-fault event (REMOVE, UNMAP...) is pending: read events, retry;
//             also how the kernel reports a partial install (bytes > 0) that stopped early,
//             e.g. at a page already present: retry the rest;
//   kTaskGone (ESRCH)  the process whose memory this is has exited.
// `bytes` says how much was installed before the kernel stopped, and stays signed.
// Anything else (EINVAL, EFAULT, ENOMEM, ...) is an Error.
//
// All system calls go through the Os seam. Methods return -errno conventions are never exposed.
//
// Thread safety: the ioctls may be issued from several threads at once (the kernel serializes
// what must be); ReadEvents from one thread at a time.
#ifndef GUESTMEM_USERFAULTFD_H_
#define GUESTMEM_USERFAULTFD_H_

#include <cstdint>
#include <string>
#include <string_view>
#include <variant>
#include <vector>

#include "guestmem/address.h"
#include "guestmem/result.h"
#include "guestmem/uffd_modes.h"
#include "guestmem/unique_fd.h"

namespace guestmem {

class Os;

// Feature bits of UFFDIO_API, with the kernel's values (newer ones than the installed headers).
inline constexpr uint64_t kUffdFeaturePagefaultFlagWp = 1 << 0;
inline constexpr uint64_t kUffdFeatureEventFork = 1 << 1;
inline constexpr uint64_t kUffdFeatureEventRemap = 1 << 2;
inline constexpr uint64_t kUffdFeatureEventRemove = 1 << 3;
inline constexpr uint64_t kUffdFeatureMissingHugetlbfs = 1 << 4;
inline constexpr uint64_t kUffdFeatureMissingShmem = 1 << 5;
inline constexpr uint64_t kUffdFeatureEventUnmap = 1 << 6;
inline constexpr uint64_t kUffdFeatureSigbus = 1 << 7;
inline constexpr uint64_t kUffdFeatureThreadId = 1 << 8;
inline constexpr uint64_t kUffdFeatureMinorHugetlbfs = 1 << 9;
inline constexpr uint64_t kUffdFeatureMinorShmem = 1 << 10;
inline constexpr uint64_t kUffdFeatureExactAddress = 1 << 11;
inline constexpr uint64_t kUffdFeatureWpHugetlbfsShmem = 1 << 12;
inline constexpr uint64_t kUffdFeatureWpUnpopulated = 1 << 13;
inline constexpr uint64_t kUffdFeaturePoison = 1 << 14;
inline constexpr uint64_t kUffdFeatureWpAsync = 1 << 15;
inline constexpr uint64_t kUffdFeatureMove = 1 << 16;

// "EVENT_REMOVE" for one bit; "" for an unknown bit.
std::string_view UffdFeatureName(uint64_t bit);
// The names of every bit set in `features`, lowest first.
std::vector<std::string> UffdFeatureNames(uint64_t features);

struct UffdOptions {
  uint64_t required_features = 0;  // Create fails with kUnsupported naming any the kernel lacks
  uint64_t optional_features = 0;  // asked for too; dropped silently where the kernel lacks them
  bool non_blocking = true;        // O_NONBLOCK: ReadEvents returns 0 instead of waiting
  bool user_mode_only = false;     // UFFD_USER_MODE_ONLY: only faults from user space trap
  Os* os = nullptr;                // Os::Default() when null
};

struct UffdKernelInfo {
  uint64_t features = 0;  // every feature the running kernel offers
  uint64_t ioctls = 0;    // bit i set: ioctl number i is supported on the uffd itself
  bool device = false;    // /dev/userfaultfd is usable (else the syscall is used)
};

struct UffdProgress {
  enum class Outcome { kDone, kExists, kAgain, kTaskGone };
  Outcome outcome = Outcome::kDone;
  int64_t bytes = 0;  // bytes installed before stopping (all of them when kDone)
};

enum class PagefaultKind { kMissing, kMinor, kWriteProtect };

struct PagefaultEvent {
  HostVirtAddr address;
  PagefaultKind kind = PagefaultKind::kMissing;
  bool write = false;
  uint32_t thread_id = 0;  // with kUffdFeatureThreadId, else 0
};
struct ForkEvent {
  UniqueFd child_uffd;  // the uffd of the forked child's copy of the registered memory
};
struct RemapEvent {
  HostVirtAddr from;
  HostVirtAddr to;
  uint64_t length = 0;
};
struct RemoveEvent {  // MADV_DONTNEED / MADV_REMOVE of [start, end)
  HostVirtAddr start;
  HostVirtAddr end;
};
struct UnmapEvent {  // munmap of [start, end)
  HostVirtAddr start;
  HostVirtAddr end;
};
using UffdEvent = std::variant<PagefaultEvent, ForkEvent, RemapEvent, RemoveEvent, UnmapEvent>;

struct UffdCopyFlags {
  bool dont_wake = false;
  bool write_protect = false;  // map the page write-protected (needs WP registration)
};

class Userfaultfd {
 public:
  static Result<Userfaultfd> Create(const UffdOptions& options = {});
  // A uffd that went through UFFDIO_API elsewhere (received over a socket). `features`: what its
  // creator negotiated, if known (0 otherwise: the kernel still enforces what was negotiated).
  static Result<Userfaultfd> Adopt(UniqueFd fd, uint64_t features = 0, Os* os = nullptr);
  // What the running kernel offers, from a throwaway uffd.
  static Result<UffdKernelInfo> Probe(Os* os = nullptr);

  Userfaultfd(Userfaultfd&&) noexcept = default;
  Userfaultfd& operator=(Userfaultfd&&) noexcept = default;

  int fd() const { return fd_.get(); }
  uint64_t features() const { return features_; }
  bool HasFeature(uint64_t feature) const { return (features_ & feature) == feature; }

  // Registers [start, start + length) (page aligned); returns the ioctls allowed on it (bit i:
  // ioctl number i).
  Result<uint64_t> Register(HostVirtAddr start, uint64_t length, UffdModes modes);
  Status Unregister(HostVirtAddr start, uint64_t length);

  Result<UffdProgress> Copy(HostVirtAddr dst, const void* src, uint64_t length,
                            UffdCopyFlags flags = {});
  Result<UffdProgress> ZeroPage(HostVirtAddr dst, uint64_t length, bool dont_wake = false);
  Result<UffdProgress> Continue(HostVirtAddr dst, uint64_t length, bool dont_wake = false);
  Result<UffdProgress> Poison(HostVirtAddr dst, uint64_t length, bool dont_wake = false);
  // Moves pages from src to dst (both registered in this uffd's mm). `allow_src_holes` lets
  // unpopulated source pages through.
  Result<UffdProgress> Move(HostVirtAddr dst, HostVirtAddr src, uint64_t length,
                            bool dont_wake = false, bool allow_src_holes = false);
  Status Wake(HostVirtAddr start, uint64_t length);
  Status WriteProtect(HostVirtAddr start, uint64_t length, bool protect, bool dont_wake = false);

  // Reads up to max_events pending events with one read(2) and appends them decoded to *out.
  // Returns how many were read: 0 when none is pending (non-blocking uffd).
  Result<size_t> ReadEvents(std::vector<UffdEvent>* out, size_t max_events = 64);

 private:
  Userfaultfd(UniqueFd fd, uint64_t features, Os* os)
      : fd_(std::move(fd)), features_(features), os_(os) {}

  // Runs one install ioctl whose struct reports progress in `*progress_field`.
  Result<UffdProgress> Install(unsigned long request, void* arg, const long long* progress_field,
                               const char* what, HostVirtAddr dst, uint64_t length);

  UniqueFd fd_;
  uint64_t features_ = 0;
  Os* os_ = nullptr;
};

}  // namespace guestmem

#endif  // GUESTMEM_USERFAULTFD_H_
