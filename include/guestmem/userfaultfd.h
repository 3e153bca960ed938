// Userfaultfd: a thin RAII layer over Linux userfaultfd(2).
//
// A Userfaultfd owns one uffd descriptor. Create() makes one through /dev/userfaultfd (or the
// userfaultfd(2) system call where the device is missing or refuses) and negotiates features with
// UFFDIO_API; Adopt() takes one that another process created and sent over a socket
// (Firecracker's). Ranges are registered in MISSING / MINOR / WRITE-PROTECT mode; faults arrive as
// events from ReadEvents() and are resolved with Copy, ZeroPage, Continue, Poison, Move, Wake and
// WriteProtect. Nothing here decides policy: callers compose these calls into a fault loop.
//
// Outcomes, not errors. The install calls (Copy, ZeroPage, Continue, Poison, Move) report what
// the kernel did as a UffdProgress when it is part of normal operation:
//   kDone      everything was installed;
//   kExists    (EEXIST) the first page of the range is already mapped: someone got there first;
//   kAgain     (EAGAIN) the kernel stopped early. Either a non-fault event (REMOVE, UNMAP,
//              REMAP, FORK) is waiting to be read -- read events, then retry -- or, with
//              bytes > 0, it installed a prefix and met a page already present: retry the rest,
//              [dst + bytes, dst + length), which may then report kExists;
//   kTaskGone  (ESRCH) the process whose memory this is has exited;
//   kNoMapping (ENOENT) no range registered with this uffd covers dst (any more): the VMM
//              unmapped it (a fault queued before the munmap may still be waiting: Wake it).
//              Move reports an empty source page (also ENOENT) as an error instead.
// `bytes` is how much was installed before the kernel stopped. It is signed and never negative:
// the kernel's own field holds -errno on failure, which is never passed on as a count.
// Every other failure (EINVAL, EFAULT, ENOENT, ENOMEM, ...) is an Error. Arguments are checked
// before any system call (page-aligned addresses, non-zero lengths that do not wrap), so bad input
// fails with kInvalidArgument and changes nothing.
//
// Every system call goes through the Os seam (Os::Default() unless UffdOptions::os is set).
//
// Thread safety: a Userfaultfd holds no mutable state after creation. Every method may be called
// from several threads at once (the kernel serializes what it must; concurrent ReadEvents calls
// each receive different events). Moving or destroying it needs exclusive access. Destroying it
// closes the descriptor, which releases every thread still blocked on a fault in its ranges.
#ifndef GUESTMEM_USERFAULTFD_H_
#define GUESTMEM_USERFAULTFD_H_

#include <cstddef>
#include <cstdint>
#include <optional>
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

// UFFDIO_API feature bits, with the kernel's values (including ones newer than the installed
// headers). UffdKernelInfo::features says which the running kernel offers.
inline constexpr uint64_t kUffdFeaturePagefaultFlagWp = uint64_t{1} << 0;
inline constexpr uint64_t kUffdFeatureEventFork = uint64_t{1} << 1;  // needs CAP_SYS_PTRACE
inline constexpr uint64_t kUffdFeatureEventRemap = uint64_t{1} << 2;
inline constexpr uint64_t kUffdFeatureEventRemove = uint64_t{1} << 3;
inline constexpr uint64_t kUffdFeatureMissingHugetlbfs = uint64_t{1} << 4;
inline constexpr uint64_t kUffdFeatureMissingShmem = uint64_t{1} << 5;
inline constexpr uint64_t kUffdFeatureEventUnmap = uint64_t{1} << 6;
inline constexpr uint64_t kUffdFeatureSigbus = uint64_t{1} << 7;
inline constexpr uint64_t kUffdFeatureThreadId = uint64_t{1} << 8;
inline constexpr uint64_t kUffdFeatureMinorHugetlbfs = uint64_t{1} << 9;
inline constexpr uint64_t kUffdFeatureMinorShmem = uint64_t{1} << 10;
inline constexpr uint64_t kUffdFeatureExactAddress = uint64_t{1} << 11;
inline constexpr uint64_t kUffdFeatureWpHugetlbfsShmem = uint64_t{1} << 12;
inline constexpr uint64_t kUffdFeatureWpUnpopulated = uint64_t{1} << 13;
inline constexpr uint64_t kUffdFeaturePoison = uint64_t{1} << 14;
inline constexpr uint64_t kUffdFeatureWpAsync = uint64_t{1} << 15;
inline constexpr uint64_t kUffdFeatureMove = uint64_t{1} << 16;

// "EVENT_REMOVE" for kUffdFeatureEventRemove; "" for a value that is not one known feature bit.
std::string_view UffdFeatureName(uint64_t bit);
// The name of every bit set in `features`, lowest first; unknown bits as "bit<N>".
std::vector<std::string> UffdFeatureNames(uint64_t features);
// The same, joined with ", " (for messages and reports); "none" for 0.
std::string UffdFeatureList(uint64_t features);

// The ioctls a uffd offers, by number: bit n of UffdKernelInfo::ioctls and of the mask Register()
// returns is set when ioctl number n is available.
enum class UffdIoctl : uint8_t {
  kRegister = 0x00,
  kUnregister = 0x01,
  kWake = 0x02,
  kCopy = 0x03,
  kZeroPage = 0x04,
  kMove = 0x05,
  kWriteProtect = 0x06,
  kContinue = 0x07,
  kPoison = 0x08,
  kApi = 0x3f,
};
constexpr uint64_t UffdIoctlBit(UffdIoctl ioctl) {
  return uint64_t{1} << static_cast<unsigned>(ioctl);
}
constexpr bool HasUffdIoctl(uint64_t mask, UffdIoctl ioctl) {
  return (mask & UffdIoctlBit(ioctl)) != 0;
}

// The most events one ReadEvents call returns.
inline constexpr size_t kUffdMaxEventBatch = 256;

struct UffdOptions {
  uint64_t required_features = 0;  // Create fails with kUnsupported naming any the kernel lacks
  uint64_t optional_features = 0;  // asked for too; left out where the kernel lacks them
  bool non_blocking = true;        // O_NONBLOCK: ReadEvents returns 0 instead of waiting
  bool user_mode_only = false;     // UFFD_USER_MODE_ONLY: faults taken in the kernel do not trap
  Os* os = nullptr;                // Os::Default() when null
};

// What the running kernel offers (Probe).
struct UffdKernelInfo {
  uint64_t features = 0;  // every feature bit UFFDIO_API offers
  uint64_t ioctls = 0;    // UffdIoctlBit()s usable on a uffd itself (API, REGISTER, UNREGISTER)
  bool device = false;    // /dev/userfaultfd works here (else the system call is used)
};

// What the kernel reports about one uffd (Inspect).
struct UffdFdInfo {
  uint64_t features = 0;        // the features negotiated by whoever ran UFFDIO_API on it
  uint64_t pending_faults = 0;  // faults queued and not yet read
  uint64_t blocked_faults = 0;  // threads blocked on a fault, read or not
};

struct UffdProgress {
  enum class Outcome { kDone, kExists, kAgain, kTaskGone, kNoMapping };
  Outcome outcome = Outcome::kDone;
  int64_t bytes = 0;  // bytes installed before the kernel stopped (all of them when kDone)
};
// "done", "exists", "again", "task gone", "no mapping".
std::string_view UffdOutcomeName(UffdProgress::Outcome outcome);

enum class PagefaultKind { kMissing, kMinor, kWriteProtect };

struct PagefaultEvent {
  HostVirtAddr address;  // page aligned unless kUffdFeatureExactAddress was negotiated
  PagefaultKind kind = PagefaultKind::kMissing;
  bool write = false;      // a write access (else a read or an instruction fetch)
  uint32_t thread_id = 0;  // the faulting thread, with kUffdFeatureThreadId; else 0
};
struct ForkEvent {      // kUffdFeatureEventFork: the registered process forked
  UniqueFd child_uffd;  // a new uffd for the child's copy of the registered ranges (see Adopt)
};
struct RemapEvent {  // kUffdFeatureEventRemap: mremap moved [from, from + length) to `to`
  HostVirtAddr from;
  HostVirtAddr to;
  uint64_t length = 0;
};
struct RemoveEvent {  // kUffdFeatureEventRemove: MADV_DONTNEED / MADV_REMOVE of [start, end)
  HostVirtAddr start;
  HostVirtAddr end;
};
struct UnmapEvent {  // kUffdFeatureEventUnmap: munmap of [start, end)
  HostVirtAddr start;
  HostVirtAddr end;
};
using UffdEvent = std::variant<PagefaultEvent, ForkEvent, RemapEvent, RemoveEvent, UnmapEvent>;

struct UffdCopyFlags {
  bool dont_wake = false;      // leave the faulting threads asleep (Wake them later)
  bool write_protect = false;  // map the pages write-protected (the range needs WP mode)
};

class Userfaultfd {
 public:
  // A new uffd: /dev/userfaultfd (USERFAULTFD_IOC_NEW) first, the system call when the device is
  // missing or refuses. Then UFFDIO_API asking for required | optional features; if the kernel
  // refuses, asks it what it offers and retries without the optional features it lacks.
  // ERRORS: kUnsupported naming the required features the kernel lacks; kPermissionDenied when
  // neither way to create a uffd is allowed, or EVENT_FORK is required without CAP_SYS_PTRACE.
  static Result<Userfaultfd> Create(const UffdOptions& options = {});

  // Takes ownership of a uffd that went through UFFDIO_API elsewhere (received over a socket, or
  // a ForkEvent's). `features` is what its creator negotiated; when not given, it is read from
  // the kernel (/proc/self/fdinfo), or 0 if /proc is not available.
  // ERRORS: kInvalidArgument if `fd` is not open, or the kernel says it is not a userfaultfd (the
  // descriptor is closed then).
  static Result<Userfaultfd> Adopt(UniqueFd fd, std::optional<uint64_t> features = std::nullopt,
                                   Os* os = nullptr);

  // What the running kernel offers, from a throwaway uffd.
  static Result<UffdKernelInfo> Probe(Os* os = nullptr);

  Userfaultfd(Userfaultfd&&) noexcept = default;
  Userfaultfd& operator=(Userfaultfd&&) noexcept = default;
  Userfaultfd(const Userfaultfd&) = delete;
  Userfaultfd& operator=(const Userfaultfd&) = delete;
  ~Userfaultfd() = default;

  // The descriptor, for poll/epoll and for sending to another process. Stays owned.
  int fd() const { return fd_.get(); }
  // The negotiated features (Create), or what Adopt was told or found.
  uint64_t features() const { return features_; }
  // True if every bit of `features` was negotiated.
  bool HasFeature(uint64_t features) const { return (features_ & features) == features; }

  // What the kernel reports about this uffd now: negotiated features and queued faults.
  Result<UffdFdInfo> Inspect() const;

  // Registers [start, start + length) in `modes`. Returns the UffdIoctlBit()s usable on it.
  // REQUIRES: start and length page aligned, length > 0, modes not kNone.
  // ERRORS: kInvalidArgument (bad range or mode, or the kernel refuses this memory in this mode),
  // kFailedPrecondition (EBUSY: registered with another uffd).
  Result<uint64_t> Register(HostVirtAddr start, uint64_t length, UffdModes modes);
  // Ends every registration in the range (waking any thread blocked on it).
  Status Unregister(HostVirtAddr start, uint64_t length);

  // Installs a copy of [src, src + length) at dst (MISSING faults). src needs no alignment.
  Result<UffdProgress> Copy(HostVirtAddr dst, const void* src, uint64_t length,
                            UffdCopyFlags flags = {});
  // Maps zero pages at [dst, dst + length) (MISSING faults; anonymous and shmem memory).
  Result<UffdProgress> ZeroPage(HostVirtAddr dst, uint64_t length, bool dont_wake = false);
  // Maps the pages already in the page cache at [dst, dst + length) (MINOR faults, or MISSING
  // faults of file-backed memory once the content was written into the file).
  // ERRORS: kIoError (EFAULT) when a page is not in the page cache.
  Result<UffdProgress> Continue(HostVirtAddr dst, uint64_t length, bool dont_wake = false);
  // Marks [dst, dst + length) so that touching it raises SIGBUS (a page that cannot be supplied).
  // The kernel accepts it whether or not kUffdFeaturePoison was negotiated. A later Copy or
  // ZeroPage over a poisoned page replaces the poison.
  Result<UffdProgress> Poison(HostVirtAddr dst, uint64_t length, bool dont_wake = false);
  // Moves anonymous pages from src to dst without copying (dst registered with this uffd); src is
  // left empty. `allow_src_holes` skips unpopulated source pages instead of failing (ENOENT).
  Result<UffdProgress> Move(HostVirtAddr dst, HostVirtAddr src, uint64_t length,
                            bool dont_wake = false, bool allow_src_holes = false);
  // Wakes the threads blocked on faults in the range, so that they retry the access.
  Status Wake(HostVirtAddr start, uint64_t length);
  // Write-protects (protect) or unprotects the range; unprotecting wakes the blocked writers
  // unless dont_wake. The range needs WP mode. An EAGAIN error (sys_errno()) means an event is
  // waiting to be read: read events, then retry.
  Status WriteProtect(HostVirtAddr start, uint64_t length, bool protect, bool dont_wake = false);

  // Whether the process whose memory this uffd covers is still alive (an adopted uffd outlives
  // it: nothing is reported when it exits). Asks the kernel to write-unprotect the page at
  // `registered_page`, which fails with ESRCH once the process has gone and with ENOENT, changing
  // nothing, on a range not registered for write protection. On a range registered in WP mode
  // the page is unprotected, as serving a write-protect fault would.
  // REQUIRES: registered_page page aligned.
  Result<bool> OwnerAlive(HostVirtAddr registered_page) const;

  // Reads up to min(max_events, kUffdMaxEventBatch) pending events with one read(2) and appends
  // them, decoded, to *out. Returns how many: 0 when none is pending on a non-blocking uffd (a
  // blocking one waits for the first). Either the whole batch is appended or, on error, nothing.
  // ERRORS: kInvalidArgument (null out, max_events 0), kProtocolError (an event type this layer
  // does not know, or a torn message: the batch is lost, any uffd it carried is closed).
  Result<size_t> ReadEvents(std::vector<UffdEvent>* out, size_t max_events = 64);

 private:
  Userfaultfd(UniqueFd fd, uint64_t features, Os* os)
      : fd_(std::move(fd)), features_(features), os_(os) {}

  // Runs one install ioctl whose argument struct reports progress in `*progress_field`.
  Result<UffdProgress> Install(unsigned long request, void* arg, const long long* progress_field,
                               const char* what, HostVirtAddr dst, uint64_t length);

  UniqueFd fd_;
  uint64_t features_ = 0;
  Os* os_ = nullptr;
};

}  // namespace guestmem

#endif  // GUESTMEM_USERFAULTFD_H_
