#include "guestmem/userfaultfd.h"

#include <fcntl.h>
#include <unistd.h>

#include <algorithm>
#include <array>
#include <cerrno>
#include <charconv>
#include <cstring>
#include <string>

#include "base/hex.h"
#include "guestmem/os.h"
#include "uffd/uffd_abi.h"

namespace guestmem {
namespace {

static_assert(kUffdFeaturePagefaultFlagWp == UFFD_FEATURE_PAGEFAULT_FLAG_WP);
static_assert(kUffdFeatureEventFork == UFFD_FEATURE_EVENT_FORK);
static_assert(kUffdFeatureEventRemap == UFFD_FEATURE_EVENT_REMAP);
static_assert(kUffdFeatureEventRemove == UFFD_FEATURE_EVENT_REMOVE);
static_assert(kUffdFeatureMissingHugetlbfs == UFFD_FEATURE_MISSING_HUGETLBFS);
static_assert(kUffdFeatureMissingShmem == UFFD_FEATURE_MISSING_SHMEM);
static_assert(kUffdFeatureEventUnmap == UFFD_FEATURE_EVENT_UNMAP);
static_assert(kUffdFeatureSigbus == UFFD_FEATURE_SIGBUS);
static_assert(kUffdFeatureThreadId == UFFD_FEATURE_THREAD_ID);
static_assert(kUffdFeatureMinorHugetlbfs == UFFD_FEATURE_MINOR_HUGETLBFS);
static_assert(kUffdFeatureMinorShmem == UFFD_FEATURE_MINOR_SHMEM);
static_assert(kUffdFeatureExactAddress == UFFD_FEATURE_EXACT_ADDRESS);
static_assert(kUffdFeatureWpHugetlbfsShmem == UFFD_FEATURE_WP_HUGETLBFS_SHMEM);
static_assert(kUffdFeatureWpUnpopulated == UFFD_FEATURE_WP_UNPOPULATED);
static_assert(kUffdFeaturePoison == UFFD_FEATURE_POISON);
static_assert(kUffdFeatureWpAsync == UFFD_FEATURE_WP_ASYNC);
static_assert(kUffdFeatureMove == UFFD_FEATURE_MOVE);
static_assert(static_cast<unsigned>(UffdIoctl::kCopy) == _UFFDIO_COPY);
static_assert(static_cast<unsigned>(UffdIoctl::kContinue) == _UFFDIO_CONTINUE);
static_assert(static_cast<unsigned>(UffdIoctl::kMove) == _UFFDIO_MOVE);
static_assert(static_cast<unsigned>(UffdIoctl::kPoison) == _UFFDIO_POISON);
static_assert(static_cast<unsigned>(UffdIoctl::kApi) == _UFFDIO_API);
static_assert(sizeof(uffd_msg) == 32);

// Indexed by bit number.
constexpr std::array<std::string_view, 17> kFeatureNames = {
    "PAGEFAULT_FLAG_WP",
    "EVENT_FORK",
    "EVENT_REMAP",
    "EVENT_REMOVE",
    "MISSING_HUGETLBFS",
    "MISSING_SHMEM",
    "EVENT_UNMAP",
    "SIGBUS",
    "THREAD_ID",
    "MINOR_HUGETLBFS",
    "MINOR_SHMEM",
    "EXACT_ADDRESS",
    "WP_HUGETLBFS_SHMEM",
    "WP_UNPOPULATED",
    "POISON",
    "WP_ASYNC",
    "MOVE",
};

// The kernel's internal "UFFDIO_API done" bit, shown in fdinfo next to the negotiated features.
constexpr uint64_t kFdInfoInitializedBit = uint64_t{1} << 31;

constexpr const char kDevice[] = "/dev/userfaultfd";

std::string Range(HostVirtAddr start, uint64_t length) {
  return "[" + Hex(start.value()) + ", +" + Hex(length) + ")";
}

uint64_t PageSize() {
  static const uint64_t kSize = static_cast<uint64_t>(sysconf(_SC_PAGESIZE));
  return kSize;
}

// The checks every range argument gets before it reaches the kernel, so that bad input is
// reported precisely and changes nothing: `op: what 0x... is not aligned to the page size 4096`.
Status CheckRange(const char* op, const char* what, uint64_t start, uint64_t length) {
  const uint64_t page = PageSize();
  if (length == 0) return Error(ErrorCode::kInvalidArgument, std::string(op) + ": length is 0");
  if (!IsAligned(start, page)) {
    return Error(ErrorCode::kInvalidArgument, std::string(op) + ": " + what + " " + Hex(start) +
                                                  " is not aligned to the page size " +
                                                  std::to_string(page));
  }
  if (!IsAligned(length, page)) {
    return Error(ErrorCode::kInvalidArgument, std::string(op) + ": length " + Hex(length) +
                                                  " is not a multiple of the page size " +
                                                  std::to_string(page));
  }
  if (!CheckedAdd(start, length)) {
    return Error(ErrorCode::kInvalidArgument, std::string(op) + ": " + what + " " +
                                                  Range(HostVirtAddr(start), length) +
                                                  " wraps around the address space");
  }
  return OkStatus();
}

int CreateFlags(bool non_blocking, bool user_mode_only) {
  return O_CLOEXEC | (non_blocking ? O_NONBLOCK : 0) | (user_mode_only ? UFFD_USER_MODE_ONLY : 0);
}

// Opens a uffd: /dev/userfaultfd first (its access is a file permission, independent of the
// vm.unprivileged_userfaultfd sysctl), then the system call.
Result<UniqueFd> OpenUffd(int flags, Os* os, bool* via_device) {
  int device_err = 0;
  const int dev = os->Open(kDevice, O_RDWR | O_CLOEXEC, 0);
  if (dev >= 0) {
    UniqueFd device(dev);
    // The ioctl takes the flags as its argument value, not through a pointer.
    const int fd = os->Ioctl(device.get(), USERFAULTFD_IOC_NEW,
                             reinterpret_cast<void*>(  // NOLINT(performance-no-int-to-ptr)
                                 static_cast<uintptr_t>(flags)));
    if (fd >= 0) {
      if (via_device != nullptr) *via_device = true;
      return UniqueFd(fd);
    }
    device_err = -fd;
  } else {
    device_err = -dev;
  }
  if (via_device != nullptr) *via_device = false;
  const int fd = os->Userfaultfd(flags);
  if (fd < 0) {
    return PosixError(-fd, std::string("create userfaultfd: ") + kDevice + " failed (" +
                               strerrordesc_np(device_err) + "), and so did userfaultfd(2)");
  }
  return UniqueFd(fd);
}

// UFFDIO_API asking for `features`. Returns 0 or -errno; on success *api holds what the kernel
// offers (every feature it knows, not only the granted ones) and its ioctls.
int Handshake(Os* os, int fd, uint64_t features, uffdio_api* api) {
  *api = {};
  api->api = UFFD_API;
  api->features = features;
  return os->Ioctl(fd, UFFDIO_API, api);
}

// What a successful UFFDIO_API asking for `asked` enabled, given what the kernel `offered`.
uint64_t Granted(uint64_t asked, uint64_t offered) {
  uint64_t granted = asked & offered;
  // The kernel turns WP_UNPOPULATED on whenever WP_ASYNC is (the one relies on the other).
  if ((granted & kUffdFeatureWpAsync) != 0) granted |= offered & kUffdFeatureWpUnpopulated;
  return granted;
}

Error LacksFeatures(uint64_t missing, uint64_t offered) {
  return Error(ErrorCode::kUnsupported,
               "create userfaultfd: the running kernel lacks required feature(s) " +
                   UffdFeatureList(missing) + " (it offers " + UffdFeatureList(offered) + ")");
}

// Parses the kernel's fdinfo of a uffd ("pending:\tN\ntotal:\tN\nAPI:\taa:<features>:<ioctls>").
// std::nullopt if the text is not a uffd's.
std::optional<UffdFdInfo> ParseFdInfo(std::string_view text) {
  auto field = [&](std::string_view key) -> std::optional<std::string_view> {
    size_t at = 0;
    while (at < text.size()) {
      const size_t eol = std::min(text.find('\n', at), text.size());
      std::string_view line = text.substr(at, eol - at);
      if (line.substr(0, key.size()) == key) {
        line.remove_prefix(key.size());
        while (!line.empty() && (line.front() == '\t' || line.front() == ' '))
          line.remove_prefix(1);
        return line;
      }
      at = eol + 1;
    }
    return std::nullopt;
  };
  auto number = [](std::string_view s, int base, uint64_t* out) {
    const auto [end, ec] = std::from_chars(s.data(), s.data() + s.size(), *out, base);
    return ec == std::errc() ? end - s.data() : -1;
  };
  const auto pending = field("pending:");
  const auto total = field("total:");
  const auto api = field("API:");
  if (!pending || !total || !api) return std::nullopt;
  UffdFdInfo info;
  if (number(*pending, 10, &info.pending_faults) <= 0) return std::nullopt;
  if (number(*total, 10, &info.blocked_faults) <= 0) return std::nullopt;
  // "aa:<features>:<ioctls>", all hex.
  const size_t colon = api->find(':');
  if (colon == std::string_view::npos) return std::nullopt;
  uint64_t features = 0;
  if (number(api->substr(colon + 1), 16, &features) <= 0) return std::nullopt;
  info.features = features & ~kFdInfoInitializedBit;
  return info;
}

// Reads the kernel's description of `fd`. kNotFound if /proc is not there.
Result<UffdFdInfo> ReadFdInfo(Os* os, int fd) {
  const std::string path = "/proc/self/fdinfo/" + std::to_string(fd);
  const int rc = os->Open(path.c_str(), O_RDONLY | O_CLOEXEC, 0);
  if (rc < 0) return PosixError(-rc, "inspect userfaultfd: open " + path);
  UniqueFd file(rc);
  std::array<char, 1024> buf;
  size_t used = 0;
  while (used < buf.size()) {
    const ssize_t n = os->Read(file.get(), buf.data() + used, buf.size() - used);
    if (n < 0) return PosixError(static_cast<int>(-n), "inspect userfaultfd: read " + path);
    if (n == 0) break;
    used += static_cast<size_t>(n);
  }
  auto info = ParseFdInfo(std::string_view(buf.data(), used));
  if (!info) {
    return Error(ErrorCode::kInvalidArgument,
                 "inspect userfaultfd: descriptor " + std::to_string(fd) + " is not a userfaultfd");
  }
  return *info;
}

}  // namespace

std::string_view UffdFeatureName(uint64_t bit) {
  for (size_t i = 0; i < kFeatureNames.size(); ++i) {
    if (bit == (uint64_t{1} << i)) return kFeatureNames[i];
  }
  return "";
}

std::vector<std::string> UffdFeatureNames(uint64_t features) {
  std::vector<std::string> names;
  for (int i = 0; i < 64; ++i) {
    const uint64_t bit = uint64_t{1} << i;
    if ((features & bit) == 0) continue;
    const std::string_view name = UffdFeatureName(bit);
    names.push_back(name.empty() ? "bit" + std::to_string(i) : std::string(name));
  }
  return names;
}

std::string UffdFeatureList(uint64_t features) {
  std::string list;
  for (const std::string& name : UffdFeatureNames(features)) {
    if (!list.empty()) list += ", ";
    list += name;
  }
  return list.empty() ? "none" : list;
}

std::string_view UffdOutcomeName(UffdProgress::Outcome outcome) {
  switch (outcome) {
    case UffdProgress::Outcome::kDone:
      return "done";
    case UffdProgress::Outcome::kExists:
      return "exists";
    case UffdProgress::Outcome::kAgain:
      return "again";
    case UffdProgress::Outcome::kTaskGone:
      return "task gone";
    case UffdProgress::Outcome::kNoMapping:
      return "no mapping";
  }
  return "unknown";
}

Result<UffdKernelInfo> Userfaultfd::Probe(Os* os) {
  if (os == nullptr) os = Os::Default();
  UffdKernelInfo info;
  GM_ASSIGN_OR_RETURN(UniqueFd fd, OpenUffd(CreateFlags(true, false), os, &info.device));
  // Asking for no feature is always accepted and reports every feature the kernel offers.
  uffdio_api api;
  const int rc = Handshake(os, fd.get(), 0, &api);
  if (rc < 0) return PosixError(-rc, "probe userfaultfd: UFFDIO_API");
  info.features = api.features;
  info.ioctls = api.ioctls;
  return info;
}

Result<Userfaultfd> Userfaultfd::Create(const UffdOptions& options) {
  Os* os = options.os != nullptr ? options.os : Os::Default();
  GM_ASSIGN_OR_RETURN(
      UniqueFd fd,
      OpenUffd(CreateFlags(options.non_blocking, options.user_mode_only), os, nullptr));
  const uint64_t required = options.required_features;
  uint64_t asked = required | options.optional_features;
  uffdio_api api;
  int rc = Handshake(os, fd.get(), asked, &api);
  if (rc == -EINVAL || rc == -EPERM) {
    // The kernel refused part of the request without saying which part (it clears the answer),
    // and left the uffd unconfigured. Ask what it offers, then retry with what it has.
    if (rc == -EPERM && (asked & kUffdFeatureEventFork) != 0) {
      if ((required & kUffdFeatureEventFork) != 0) {
        return PosixError(EPERM,
                          "create userfaultfd: required feature EVENT_FORK needs CAP_SYS_PTRACE");
      }
      asked &= ~kUffdFeatureEventFork;
    }
    GM_ASSIGN_OR_RETURN(UffdKernelInfo kernel, Probe(os));
    if ((required & ~kernel.features) != 0) {
      return LacksFeatures(required & ~kernel.features, kernel.features);
    }
    asked &= kernel.features;  // keeps every required feature: checked just above
    rc = Handshake(os, fd.get(), asked, &api);
  }
  if (rc < 0) {
    return PosixError(-rc,
                      "create userfaultfd: UFFDIO_API with features " + UffdFeatureList(asked));
  }
  // Older kernels accept feature bits they do not know without complaint.
  if ((required & ~api.features) != 0) return LacksFeatures(required & ~api.features, api.features);
  return Userfaultfd(std::move(fd), Granted(asked, api.features), os);
}

Result<Userfaultfd> Userfaultfd::Adopt(UniqueFd fd, std::optional<uint64_t> features, Os* os) {
  if (os == nullptr) os = Os::Default();
  if (!fd.valid()) {
    return Error(ErrorCode::kInvalidArgument,
                 "adopt userfaultfd: descriptor " + std::to_string(fd.get()) + " is not open");
  }
  if (!features) {
    Result<UffdFdInfo> info = ReadFdInfo(os, fd.get());
    if (info) {
      features = info->features;
    } else if (info.error().code() == ErrorCode::kInvalidArgument) {
      return std::move(info).error().WithContext("adopt userfaultfd");
    } else {
      features = 0;  // no /proc: nothing to learn from, nothing to check against
    }
  }
  return Userfaultfd(std::move(fd), *features, os);
}

Result<UffdFdInfo> Userfaultfd::Inspect() const { return ReadFdInfo(os_, fd_.get()); }

Result<uint64_t> Userfaultfd::Register(HostVirtAddr start, uint64_t length, UffdModes modes) {
  GM_RETURN_IF_ERROR(CheckRange("UFFDIO_REGISTER", "range", start.value(), length));
  const UffdModes known = UffdModes::kMissing | UffdModes::kWriteProtect | UffdModes::kMinor;
  if (modes == UffdModes::kNone || !HasMode(known, modes)) {
    return Error(ErrorCode::kInvalidArgument, "UFFDIO_REGISTER " + Range(start, length) +
                                                  ": invalid modes " +
                                                  Hex(static_cast<uint32_t>(modes)));
  }
  uffdio_register reg{};
  reg.range.start = start.value();
  reg.range.len = length;
  if (HasMode(modes, UffdModes::kMissing)) reg.mode |= UFFDIO_REGISTER_MODE_MISSING;
  if (HasMode(modes, UffdModes::kWriteProtect)) reg.mode |= UFFDIO_REGISTER_MODE_WP;
  if (HasMode(modes, UffdModes::kMinor)) reg.mode |= UFFDIO_REGISTER_MODE_MINOR;
  const int rc = os_->Ioctl(fd_.get(), UFFDIO_REGISTER, &reg);
  if (rc < 0) {
    return PosixError(-rc, "UFFDIO_REGISTER " + Range(start, length) + " modes " +
                               Hex(static_cast<uint32_t>(modes)));
  }
  return static_cast<uint64_t>(reg.ioctls);
}

Status Userfaultfd::Unregister(HostVirtAddr start, uint64_t length) {
  GM_RETURN_IF_ERROR(CheckRange("UFFDIO_UNREGISTER", "range", start.value(), length));
  uffdio_range range{start.value(), length};
  const int rc = os_->Ioctl(fd_.get(), UFFDIO_UNREGISTER, &range);
  if (rc < 0) return PosixError(-rc, "UFFDIO_UNREGISTER " + Range(start, length));
  return OkStatus();
}

Result<UffdProgress> Userfaultfd::Install(unsigned long request, void* arg,
                                          const long long* progress_field, const char* what,
                                          HostVirtAddr dst, uint64_t length) {
  const int rc = os_->Ioctl(fd_.get(), request, arg);
  if (rc == 0) return UffdProgress{UffdProgress::Outcome::kDone, static_cast<int64_t>(length)};
  // The kernel wrote bytes done, or -errno, into the struct (or nothing, when it failed before
  // looking at the range): only a positive value is a count.
  const int64_t reported = *progress_field;
  const int64_t bytes = reported > 0 ? reported : 0;
  switch (-rc) {
    case EEXIST:
      return UffdProgress{UffdProgress::Outcome::kExists, bytes};
    case EAGAIN:
      return UffdProgress{UffdProgress::Outcome::kAgain, bytes};
    case ESRCH:
      return UffdProgress{UffdProgress::Outcome::kTaskGone, bytes};
    case ENOENT:
      // UFFDIO_MOVE's ENOENT is about its source (an empty page): an error, not an outcome.
      if (request == UFFDIO_MOVE) break;
      return UffdProgress{UffdProgress::Outcome::kNoMapping, bytes};
    default:
      break;
  }
  return PosixError(-rc, std::string(what) + " " + Range(dst, length));
}

Result<UffdProgress> Userfaultfd::Copy(HostVirtAddr dst, const void* src, uint64_t length,
                                       UffdCopyFlags flags) {
  GM_RETURN_IF_ERROR(CheckRange("UFFDIO_COPY", "dst", dst.value(), length));
  const auto src_addr = reinterpret_cast<uint64_t>(src);
  if (src == nullptr || !CheckedAdd(src_addr, length)) {
    return Error(ErrorCode::kInvalidArgument,
                 "UFFDIO_COPY: src " + Range(HostVirtAddr(src_addr), length) + " is not a buffer");
  }
  uffdio_copy copy{};
  copy.dst = dst.value();
  copy.src = src_addr;
  copy.len = length;
  copy.mode = (flags.dont_wake ? UFFDIO_COPY_MODE_DONTWAKE : 0) |
              (flags.write_protect ? UFFDIO_COPY_MODE_WP : 0);
  return Install(UFFDIO_COPY, &copy, &copy.copy, "UFFDIO_COPY", dst, length);
}

Result<UffdProgress> Userfaultfd::ZeroPage(HostVirtAddr dst, uint64_t length, bool dont_wake) {
  GM_RETURN_IF_ERROR(CheckRange("UFFDIO_ZEROPAGE", "dst", dst.value(), length));
  uffdio_zeropage zero{};
  zero.range = {dst.value(), length};
  zero.mode = dont_wake ? UFFDIO_ZEROPAGE_MODE_DONTWAKE : 0;
  return Install(UFFDIO_ZEROPAGE, &zero, &zero.zeropage, "UFFDIO_ZEROPAGE", dst, length);
}

Result<UffdProgress> Userfaultfd::Continue(HostVirtAddr dst, uint64_t length, bool dont_wake) {
  GM_RETURN_IF_ERROR(CheckRange("UFFDIO_CONTINUE", "dst", dst.value(), length));
  uffdio_continue cont{};
  cont.range = {dst.value(), length};
  cont.mode = dont_wake ? UFFDIO_CONTINUE_MODE_DONTWAKE : 0;
  return Install(UFFDIO_CONTINUE, &cont, &cont.mapped, "UFFDIO_CONTINUE", dst, length);
}

Result<UffdProgress> Userfaultfd::Poison(HostVirtAddr dst, uint64_t length, bool dont_wake) {
  GM_RETURN_IF_ERROR(CheckRange("UFFDIO_POISON", "dst", dst.value(), length));
  uffdio_poison poison{};
  poison.range = {dst.value(), length};
  poison.mode = dont_wake ? UFFDIO_POISON_MODE_DONTWAKE : 0;
  return Install(UFFDIO_POISON, &poison, &poison.updated, "UFFDIO_POISON", dst, length);
}

Result<UffdProgress> Userfaultfd::Move(HostVirtAddr dst, HostVirtAddr src, uint64_t length,
                                       bool dont_wake, bool allow_src_holes) {
  GM_RETURN_IF_ERROR(CheckRange("UFFDIO_MOVE", "dst", dst.value(), length));
  GM_RETURN_IF_ERROR(CheckRange("UFFDIO_MOVE", "src", src.value(), length));
  uffdio_move move{};
  move.dst = dst.value();
  move.src = src.value();
  move.len = length;
  move.mode = (dont_wake ? UFFDIO_MOVE_MODE_DONTWAKE : 0) |
              (allow_src_holes ? UFFDIO_MOVE_MODE_ALLOW_SRC_HOLES : 0);
  return Install(UFFDIO_MOVE, &move, &move.move, "UFFDIO_MOVE", dst, length);
}

Status Userfaultfd::Wake(HostVirtAddr start, uint64_t length) {
  GM_RETURN_IF_ERROR(CheckRange("UFFDIO_WAKE", "range", start.value(), length));
  uffdio_range range{start.value(), length};
  const int rc = os_->Ioctl(fd_.get(), UFFDIO_WAKE, &range);
  if (rc < 0) return PosixError(-rc, "UFFDIO_WAKE " + Range(start, length));
  return OkStatus();
}

Status Userfaultfd::WriteProtect(HostVirtAddr start, uint64_t length, bool protect,
                                 bool dont_wake) {
  GM_RETURN_IF_ERROR(CheckRange("UFFDIO_WRITEPROTECT", "range", start.value(), length));
  uffdio_writeprotect wp{};
  wp.range = {start.value(), length};
  wp.mode = (protect ? UFFDIO_WRITEPROTECT_MODE_WP : 0) |
            (dont_wake ? UFFDIO_WRITEPROTECT_MODE_DONTWAKE : 0);
  const int rc = os_->Ioctl(fd_.get(), UFFDIO_WRITEPROTECT, &wp);
  if (rc < 0) {
    return PosixError(-rc, std::string("UFFDIO_WRITEPROTECT ") + (protect ? "on " : "off ") +
                               Range(start, length));
  }
  return OkStatus();
}

Result<bool> Userfaultfd::OwnerAlive(HostVirtAddr registered_page) const {
  GM_RETURN_IF_ERROR(
      CheckRange("UFFDIO_WRITEPROTECT", "probe", registered_page.value(), kPageSize4K));
  uffdio_writeprotect wp{};
  wp.range = {registered_page.value(), kPageSize4K};
  wp.mode = UFFDIO_WRITEPROTECT_MODE_DONTWAKE;  // unprotect, and wake nobody
  const int rc = os_->Ioctl(fd_.get(), UFFDIO_WRITEPROTECT, &wp);
  switch (rc < 0 ? -rc : 0) {
    case 0:
    case ENOENT:  // not registered for write protection: the kernel found the mm alive
    case EAGAIN:  // a non-fault event is pending: the mm is alive and changing
      return true;
    case ESRCH:
      return false;
    default:
      return PosixError(
          -rc, "liveness probe UFFDIO_WRITEPROTECT " + Range(registered_page, kPageSize4K));
  }
}

Result<size_t> Userfaultfd::ReadEvents(std::vector<UffdEvent>* out, size_t max_events) {
  if (out == nullptr || max_events == 0) {
    return Error(ErrorCode::kInvalidArgument, "read userfaultfd events: no room (max_events " +
                                                  std::to_string(max_events) +
                                                  (out == nullptr ? ", no output vector)" : ")"));
  }
  std::array<uffd_msg, kUffdMaxEventBatch> msgs;
  const size_t want = std::min(max_events, kUffdMaxEventBatch);
  const ssize_t n = os_->Read(fd_.get(), msgs.data(), want * sizeof(uffd_msg));
  if (n == -EAGAIN) return size_t{0};
  if (n < 0) {
    return PosixError(static_cast<int>(-n),
                      "read userfaultfd events from descriptor " + std::to_string(fd_.get()));
  }
  const size_t count = static_cast<size_t>(n) / sizeof(uffd_msg);
  // Fork events carry a new descriptor each: own them first, so that an error below closes them.
  std::vector<UniqueFd> fork_fds;
  for (size_t i = 0; i < count; ++i) {
    if (msgs[i].event == UFFD_EVENT_FORK) {
      fork_fds.emplace_back(static_cast<int>(msgs[i].arg.fork.ufd));
    }
  }
  if (static_cast<size_t>(n) % sizeof(uffd_msg) != 0) {
    return Error(ErrorCode::kProtocolError, "read userfaultfd events: " + std::to_string(n) +
                                                " bytes is not a whole number of messages");
  }
  for (size_t i = 0; i < count; ++i) {
    switch (msgs[i].event) {
      case UFFD_EVENT_PAGEFAULT:
      case UFFD_EVENT_FORK:
      case UFFD_EVENT_REMAP:
      case UFFD_EVENT_REMOVE:
      case UFFD_EVENT_UNMAP:
        break;
      default:
        return Error(ErrorCode::kProtocolError,
                     "read userfaultfd events: unknown event type " + Hex(msgs[i].event) +
                         " in message " + std::to_string(i) + " of " + std::to_string(count));
    }
  }
  out->reserve(out->size() + count);
  size_t next_fork = 0;
  for (size_t i = 0; i < count; ++i) {
    const uffd_msg& m = msgs[i];
    switch (m.event) {
      case UFFD_EVENT_PAGEFAULT: {
        PagefaultEvent event;
        event.address = HostVirtAddr(m.arg.pagefault.address);
        const uint64_t flags = m.arg.pagefault.flags;
        if ((flags & UFFD_PAGEFAULT_FLAG_MINOR) != 0) {
          event.kind = PagefaultKind::kMinor;
        } else if ((flags & UFFD_PAGEFAULT_FLAG_WP) != 0) {
          event.kind = PagefaultKind::kWriteProtect;
        } else {
          event.kind = PagefaultKind::kMissing;
        }
        event.write = (flags & UFFD_PAGEFAULT_FLAG_WRITE) != 0;
        event.thread_id = m.arg.pagefault.feat.ptid;
        out->emplace_back(event);
        break;
      }
      case UFFD_EVENT_FORK:
        out->emplace_back(ForkEvent{std::move(fork_fds[next_fork++])});
        break;
      case UFFD_EVENT_REMAP:
        out->emplace_back(RemapEvent{HostVirtAddr(m.arg.remap.from), HostVirtAddr(m.arg.remap.to),
                                     m.arg.remap.len});
        break;
      case UFFD_EVENT_REMOVE:
        out->emplace_back(
            RemoveEvent{HostVirtAddr(m.arg.remove.start), HostVirtAddr(m.arg.remove.end)});
        break;
      case UFFD_EVENT_UNMAP:  // the kernel reports unmaps in the `remove` layout
        out->emplace_back(
            UnmapEvent{HostVirtAddr(m.arg.remove.start), HostVirtAddr(m.arg.remove.end)});
        break;
    }
  }
  return count;
}

}  // namespace guestmem
