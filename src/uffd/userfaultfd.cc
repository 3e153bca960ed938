#include "guestmem/userfaultfd.h"

#include <fcntl.h>

#include <cerrno>
#include <cstring>
#include <string>

#include "guestmem/os.h"
#include "uffd/uffd_abi.h"

namespace guestmem {
namespace {

static_assert(kUffdFeatureEventRemove == UFFD_FEATURE_EVENT_REMOVE);
static_assert(kUffdFeatureMinorShmem == UFFD_FEATURE_MINOR_SHMEM);
static_assert(kUffdFeaturePoison == UFFD_FEATURE_POISON);
static_assert(kUffdFeatureMove == UFFD_FEATURE_MOVE);

constexpr const char* kFeatureNames[] = {
    "PAGEFAULT_FLAG_WP", "EVENT_FORK",     "EVENT_REMAP",        "EVENT_REMOVE",
    "MISSING_HUGETLBFS", "MISSING_SHMEM",  "EVENT_UNMAP",        "SIGBUS",
    "THREAD_ID",         "MINOR_HUGETLBFS", "MINOR_SHMEM",       "EXACT_ADDRESS",
    "WP_HUGETLBFS_SHMEM", "WP_UNPOPULATED", "POISON",            "WP_ASYNC",
    "MOVE",
};

std::string Hex(uint64_t v) {
  char buf[24];
  std::snprintf(buf, sizeof(buf), "0x%llx", static_cast<unsigned long long>(v));
  return buf;
}

std::string Range(HostVirtAddr start, uint64_t length) {
  return "[" + Hex(start.value()) + ", +" + Hex(length) + ")";
}

// Opens a uffd: /dev/userfaultfd first (works without the vm.unprivileged_userfaultfd sysctl),
// then the syscall.
Result<UniqueFd> OpenUffd(int flags, Os* os, bool* via_device) {
  const int dev = os->Open("/dev/userfaultfd", O_RDWR | O_CLOEXEC, 0);
  if (dev >= 0) {
    UniqueFd device(dev);
    const int fd = os->Ioctl(device.get(), USERFAULTFD_IOC_NEW, reinterpret_cast<void*>(
                                                                    static_cast<intptr_t>(flags)));
    if (fd >= 0) {
      if (via_device != nullptr) *via_device = true;
      return UniqueFd(fd);
    }
  }
  if (via_device != nullptr) *via_device = false;
  const int fd = os->Userfaultfd(flags);
  if (fd < 0) {
    return PosixError(-fd, "creating a userfaultfd (neither /dev/userfaultfd nor the syscall)");
  }
  return UniqueFd(fd);
}

// UFFDIO_API asking for `features`; returns what the kernel granted and its ioctls.
Result<uffdio_api> Handshake(int fd, uint64_t features, Os* os) {
  uffdio_api api{};
  api.api = UFFD_API;
  api.features = features;
  const int rc = os->Ioctl(fd, UFFDIO_API, &api);
  if (rc < 0) return PosixError(-rc, "UFFDIO_API with features " + Hex(features));
  return api;
}

int CreateFlags(bool non_blocking, bool user_mode_only) {
  return O_CLOEXEC | (non_blocking ? O_NONBLOCK : 0) | (user_mode_only ? UFFD_USER_MODE_ONLY : 0);
}

}  // namespace

std::string_view UffdFeatureName(uint64_t bit) {
  for (size_t i = 0; i < std::size(kFeatureNames); ++i) {
    if (bit == (uint64_t{1} << i)) return kFeatureNames[i];
  }
  return "";
}

std::vector<std::string> UffdFeatureNames(uint64_t features) {
  std::vector<std::string> names;
  for (int i = 0; i < 64; ++i) {
    const uint64_t bit = uint64_t{1} << i;
    if ((features & bit) == 0) continue;
    std::string_view name = UffdFeatureName(bit);
    names.push_back(name.empty() ? "bit" + std::to_string(i) : std::string(name));
  }
  return names;
}

Result<UffdKernelInfo> Userfaultfd::Probe(Os* os) {
  if (os == nullptr) os = Os::Default();
  UffdKernelInfo info;
  GM_ASSIGN_OR_RETURN(UniqueFd fd, OpenUffd(CreateFlags(true, false), os, &info.device));
  // Asking for no feature reports every feature the kernel knows.
  GM_ASSIGN_OR_RETURN(uffdio_api api, Handshake(fd.get(), 0, os));
  info.features = api.features;
  info.ioctls = api.ioctls;
  return info;
}

Result<Userfaultfd> Userfaultfd::Create(const UffdOptions& options) {
  Os* os = options.os != nullptr ? options.os : Os::Default();
  GM_ASSIGN_OR_RETURN(UffdKernelInfo kernel, Probe(os));
  const uint64_t missing = options.required_features & ~kernel.features;
  if (missing != 0) {
    std::string names;
    for (const std::string& n : UffdFeatureNames(missing)) names += (names.empty() ? "" : ", ") + n;
    return Error(ErrorCode::kUnsupported,
                 "userfaultfd: the running kernel lacks required feature(s) " + names);
  }
  const uint64_t wanted =
      options.required_features | (options.optional_features & kernel.features);
  GM_ASSIGN_OR_RETURN(UniqueFd fd, OpenUffd(CreateFlags(options.non_blocking,
                                                        options.user_mode_only),
                                            os, nullptr));
  GM_ASSIGN_OR_RETURN(uffdio_api api, Handshake(fd.get(), wanted, os));
  return Userfaultfd(std::move(fd), api.features & wanted, os);
}

Result<Userfaultfd> Userfaultfd::Adopt(UniqueFd fd, uint64_t features, Os* os) {
  if (!fd.valid()) return Error(ErrorCode::kInvalidArgument, "adopt userfaultfd: no descriptor");
  return Userfaultfd(std::move(fd), features, os != nullptr ? os : Os::Default());
}

Result<uint64_t> Userfaultfd::Register(HostVirtAddr start, uint64_t length, UffdModes modes) {
  uffdio_register reg{};
  reg.range.start = start.value();
  reg.range.len = length;
  if (HasMode(modes, UffdModes::kMissing)) reg.mode |= UFFDIO_REGISTER_MODE_MISSING;
  if (HasMode(modes, UffdModes::kWriteProtect)) reg.mode |= UFFDIO_REGISTER_MODE_WP;
  if (HasMode(modes, UffdModes::kMinor)) reg.mode |= UFFDIO_REGISTER_MODE_MINOR;
  if (reg.mode == 0) return Error(ErrorCode::kInvalidArgument, "UFFDIO_REGISTER: no mode");
  const int rc = os_->Ioctl(fd_.get(), UFFDIO_REGISTER, &reg);
  if (rc < 0) return PosixError(-rc, "UFFDIO_REGISTER " + Range(start, length));
  return static_cast<uint64_t>(reg.ioctls);
}

Status Userfaultfd::Unregister(HostVirtAddr start, uint64_t length) {
  uffdio_range range{start.value(), length};
  const int rc = os_->Ioctl(fd_.get(), UFFDIO_UNREGISTER, &range);
  if (rc < 0) return PosixError(-rc, "UFFDIO_UNREGISTER " + Range(start, length));
  return OkStatus();
}

Result<UffdProgress> Userfaultfd::Install(unsigned long request, void* arg,
                                          const long long* progress_field, const char* what,
                                          HostVirtAddr dst, uint64_t length) {
  const int rc = os_->Ioctl(fd_.get(), request, arg);
  // The kernel writes bytes done (or -errno) into the struct; keep it signed.
  const int64_t reported = *progress_field;
  if (rc == 0) return UffdProgress{UffdProgress::Outcome::kDone, static_cast<int64_t>(length)};
  const int64_t partial = reported > 0 ? reported : 0;
  switch (-rc) {
    case EEXIST: return UffdProgress{UffdProgress::Outcome::kExists, partial};
    case EAGAIN: return UffdProgress{UffdProgress::Outcome::kAgain, partial};
    case ESRCH: return UffdProgress{UffdProgress::Outcome::kTaskGone, partial};
    default: return PosixError(-rc, std::string(what) + " " + Range(dst, length));
  }
}

Result<UffdProgress> Userfaultfd::Copy(HostVirtAddr dst, const void* src, uint64_t length,
                                       UffdCopyFlags flags) {
  uffdio_copy copy{};
  copy.dst = dst.value();
  copy.src = reinterpret_cast<uint64_t>(src);
  copy.len = length;
  copy.mode = (flags.dont_wake ? UFFDIO_COPY_MODE_DONTWAKE : 0) |
              (flags.write_protect ? UFFDIO_COPY_MODE_WP : 0);
  return Install(UFFDIO_COPY, &copy, &copy.copy, "UFFDIO_COPY", dst, length);
}

Result<UffdProgress> Userfaultfd::ZeroPage(HostVirtAddr dst, uint64_t length, bool dont_wake) {
  uffdio_zeropage zero{};
  zero.range = {dst.value(), length};
  zero.mode = dont_wake ? UFFDIO_ZEROPAGE_MODE_DONTWAKE : 0;
  return Install(UFFDIO_ZEROPAGE, &zero, &zero.zeropage, "UFFDIO_ZEROPAGE", dst, length);
}

Result<UffdProgress> Userfaultfd::Continue(HostVirtAddr dst, uint64_t length, bool dont_wake) {
  uffdio_continue cont{};
  cont.range = {dst.value(), length};
  cont.mode = dont_wake ? UFFDIO_CONTINUE_MODE_DONTWAKE : 0;
  return Install(UFFDIO_CONTINUE, &cont, &cont.mapped, "UFFDIO_CONTINUE", dst, length);
}

Result<UffdProgress> Userfaultfd::Poison(HostVirtAddr dst, uint64_t length, bool dont_wake) {
  uffdio_poison poison{};
  poison.range = {dst.value(), length};
  poison.mode = dont_wake ? UFFDIO_POISON_MODE_DONTWAKE : 0;
  return Install(UFFDIO_POISON, &poison, &poison.updated, "UFFDIO_POISON", dst, length);
}

Result<UffdProgress> Userfaultfd::Move(HostVirtAddr dst, HostVirtAddr src, uint64_t length,
                                       bool dont_wake, bool allow_src_holes) {
  uffdio_move move{};
  move.dst = dst.value();
  move.src = src.value();
  move.len = length;
  move.mode = (dont_wake ? UFFDIO_MOVE_MODE_DONTWAKE : 0) |
              (allow_src_holes ? UFFDIO_MOVE_MODE_ALLOW_SRC_HOLES : 0);
  return Install(UFFDIO_MOVE, &move, &move.move, "UFFDIO_MOVE", dst, length);
}

Status Userfaultfd::Wake(HostVirtAddr start, uint64_t length) {
  uffdio_range range{start.value(), length};
  const int rc = os_->Ioctl(fd_.get(), UFFDIO_WAKE, &range);
  if (rc < 0) return PosixError(-rc, "UFFDIO_WAKE " + Range(start, length));
  return OkStatus();
}

Status Userfaultfd::WriteProtect(HostVirtAddr start, uint64_t length, bool protect,
                                 bool dont_wake) {
  uffdio_writeprotect wp{};
  wp.range = {start.value(), length};
  wp.mode = (protect ? UFFDIO_WRITEPROTECT_MODE_WP : 0) |
            (dont_wake ? UFFDIO_WRITEPROTECT_MODE_DONTWAKE : 0);
  const int rc = os_->Ioctl(fd_.get(), UFFDIO_WRITEPROTECT, &wp);
  if (rc < 0) return PosixError(-rc, "UFFDIO_WRITEPROTECT " + Range(start, length));
  return OkStatus();
}

Result<size_t> Userfaultfd::ReadEvents(std::vector<UffdEvent>* out, size_t max_events) {
  constexpr size_t kMaxBatch = 256;
  uffd_msg msgs[kMaxBatch];
  const size_t want = std::min(std::max<size_t>(max_events, 1), kMaxBatch);
  const ssize_t n = os_->Read(fd_.get(), msgs, want * sizeof(uffd_msg));
  if (n == -EAGAIN || n == -EWOULDBLOCK) return size_t{0};
  if (n < 0) return PosixError(static_cast<int>(-n), "reading userfaultfd events");
  if (n % static_cast<ssize_t>(sizeof(uffd_msg)) != 0) {
    return Error(ErrorCode::kInternal, "userfaultfd read returned a partial message");
  }
  const size_t count = static_cast<size_t>(n) / sizeof(uffd_msg);
  for (size_t i = 0; i < count; ++i) {
    const uffd_msg& m = msgs[i];
    switch (m.event) {
      case UFFD_EVENT_PAGEFAULT: {
        PagefaultEvent ev;
        ev.address = HostVirtAddr(m.arg.pagefault.address);
        const uint64_t flags = m.arg.pagefault.flags;
        ev.kind = (flags & UFFD_PAGEFAULT_FLAG_MINOR) != 0 ? PagefaultKind::kMinor
                  : (flags & UFFD_PAGEFAULT_FLAG_WP) != 0  ? PagefaultKind::kWriteProtect
                                                           : PagefaultKind::kMissing;
        ev.write = (flags & UFFD_PAGEFAULT_FLAG_WRITE) != 0;
        ev.thread_id = m.arg.pagefault.feat.ptid;
        out->emplace_back(ev);
        break;
      }
      case UFFD_EVENT_FORK:
        out->emplace_back(ForkEvent{UniqueFd(static_cast<int>(m.arg.fork.ufd))});
        break;
      case UFFD_EVENT_REMAP:
        out->emplace_back(RemapEvent{HostVirtAddr(m.arg.remap.from), HostVirtAddr(m.arg.remap.to),
                                     m.arg.remap.len});
        break;
      case UFFD_EVENT_REMOVE:
        out->emplace_back(
            RemoveEvent{HostVirtAddr(m.arg.remove.start), HostVirtAddr(m.arg.remove.end)});
        break;
      case UFFD_EVENT_UNMAP:
        out->emplace_back(
            UnmapEvent{HostVirtAddr(m.arg.remove.start), HostVirtAddr(m.arg.remove.end)});
        break;
      default:
        return Error(ErrorCode::kProtocolError,
                     "userfaultfd: unknown event type " + std::to_string(m.event));
    }
  }
  return count;
}

}  // namespace guestmem
