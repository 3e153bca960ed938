#include "guestmem/memory_file.h"

#include <fcntl.h>
#include <linux/magic.h>
#include <sys/file.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <sys/vfs.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cerrno>
#include <chrono>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <fstream>
#include <memory>
#include <mutex>
#include <ostream>
#include <random>
#include <string>
#include <thread>
#include <vector>

#include "base/fault_injection_os.h"
#include "base/temp_dir.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "guestmem/address_registry.h"
#include "guestmem/os.h"
#include "testutil/huge_pages.h"

namespace guestmem {

// Test names and failure messages show a backend by its name.
void PrintTo(MemoryBackend backend, std::ostream* out) { *out << MemoryBackendName(backend); }

namespace {

using Call = FaultInjectionOs::Call;
using ::testing::HasSubstr;

// ---------------------------------------------------------------------------------------------
// Helpers

// Page `page`'s test content for `seed`: no byte is zero, and pages and seeds differ.
std::vector<std::byte> Pattern(uint64_t page_size, uint64_t page, uint8_t seed = 0) {
  std::vector<std::byte> out(page_size);
  for (uint64_t i = 0; i < page_size; ++i) {
    out[i] = static_cast<std::byte>((page * 251 + i * 7 + (i >> 9) + seed * 37u) % 255 + 1);
  }
  return out;
}

bool HoldsPattern(const std::byte* data, uint64_t page_size, uint64_t page, uint8_t seed = 0) {
  const auto expected = Pattern(page_size, page, seed);
  return std::memcmp(data, expected.data(), page_size) == 0;
}

bool IsZero(const std::byte* data, uint64_t size) {
  for (uint64_t i = 0; i < size; ++i) {
    if (data[i] != std::byte{0}) return false;
  }
  return true;
}

std::vector<PageState> States(const MemoryFile& file) {
  std::vector<PageState> out;
  for (uint64_t p = 0; p < file.page_count(); ++p) out.push_back(file.pages().Get(p));
  return out;
}

// Whether `result` failed with `code`, a context containing `text` and, unless kAnyErrno, the
// system call's errno `err`.
constexpr int kAnyErrno = -1;
template <typename R>
::testing::AssertionResult Fails(const R& result, ErrorCode code, std::string_view text,
                                 int err = kAnyErrno) {
  if (result.has_value()) return ::testing::AssertionFailure() << "it succeeded";
  const Error& error = result.error();
  if (error.code() != code || error.context().find(text) == std::string::npos ||
      (err != kAnyErrno && error.sys_errno() != err)) {
    return ::testing::AssertionFailure()
           << "it failed with \"" << error.ToString() << "\", not with " << ErrorCodeName(code)
           << " about \"" << text << "\" (errno " << err << ")";
  }
  return ::testing::AssertionSuccess();
}

std::string HexOf(uint64_t v) {
  char buf[24];
  std::snprintf(buf, sizeof(buf), "0x%llx", static_cast<unsigned long long>(v));
  return buf;
}

uint64_t TotalCalls(const FaultInjectionOs& os) {
  uint64_t total = 0;
  for (int c = 0; c < static_cast<int>(Call::kCount_); ++c) total += os.calls(static_cast<Call>(c));
  return total;
}

// Records every callback, and any made after it was detached.
class RecordingBinding : public Binding {
 public:
  enum class Kind { kBegin, kRelease, kEnd };
  struct Event {
    Kind kind;
    uint64_t offset;
    uint64_t length;
    bool operator==(const Event&) const = default;
  };

  explicit RecordingBinding(bool may_mmap = true) : may_mmap_(may_mmap) {}

  void InvalidateBegin(FileOffset offset, uint64_t length) override {
    Record({Kind::kBegin, offset.value(), length});
  }
  void InvalidateEnd(FileOffset offset, uint64_t length) override {
    Record({Kind::kEnd, offset.value(), length});
  }
  void Release(FileOffset page) override { Record({Kind::kRelease, page.value(), 0}); }
  bool MayMmap() const override { return may_mmap_; }

  std::vector<Event> events() const {
    std::lock_guard lock(mu_);
    return events_;
  }
  void MarkDetached() { detached_.store(true); }
  int calls_after_detach() const { return calls_after_detach_.load(); }

  // True if the log is a sequence of Begin, Release..., End with matching ranges and every
  // release inside its range.
  bool WellFormed() const {
    std::lock_guard lock(mu_);
    const Event* open = nullptr;
    for (const Event& e : events_) {
      switch (e.kind) {
        case Kind::kBegin:
          if (open != nullptr) return false;
          open = &e;
          break;
        case Kind::kRelease:
          if (open == nullptr || e.offset < open->offset ||
              e.offset >= open->offset + open->length) {
            return false;
          }
          break;
        case Kind::kEnd:
          if (open == nullptr || open->offset != e.offset || open->length != e.length) {
            return false;
          }
          open = nullptr;
          break;
      }
    }
    return open == nullptr;
  }

 private:
  void Record(Event e) {
    if (detached_.load()) ++calls_after_detach_;
    std::lock_guard lock(mu_);
    events_.push_back(e);
  }

  const bool may_mmap_;
  mutable std::mutex mu_;
  std::vector<Event> events_;
  std::atomic<bool> detached_{false};
  std::atomic<int> calls_after_detach_{0};
};

using Ev = RecordingBinding::Event;
using Kind = RecordingBinding::Kind;

using testutil::HugePageReservation;

constexpr uint64_t kPages = 6;         // pages in the files of the per-backend tests
constexpr uint64_t kReservedHuge = 8;  // huge pages a hugetlb test reserves

bool Populates(MemoryBackend backend) {
  return backend != MemoryBackend::kAnonymous && backend != MemoryBackend::kSecret;
}
bool Punches(MemoryBackend backend) { return backend != MemoryBackend::kSecret; }

// ---------------------------------------------------------------------------------------------
// Every operation, on every backend this machine has

class BackendTest : public ::testing::TestWithParam<MemoryBackend> {
 protected:
  void SetUp() override {
    if (backend() == MemoryBackend::kHugetlb) {
      reservation_ = std::make_unique<HugePageReservation>(kReservedHuge);
      if (!reservation_->ok()) GTEST_SKIP() << reservation_->why();
    }
    auto probe = ProbeBackend(backend());
    if (!probe && probe.error().code() == ErrorCode::kUnsupported) {
      GTEST_SKIP() << probe.error().ToString();
    }
    ASSERT_TRUE(probe.has_value()) << probe.error().ToString();
    page_ = probe->page_size;
  }

  MemoryBackend backend() const { return GetParam(); }

  std::shared_ptr<MemoryFile> Make(Os* os = nullptr, bool mmap_allowed = true,
                                   uint64_t pages = kPages) {
    MemoryFileOptions options;
    options.size_bytes = pages * page_;
    options.backend = backend();
    options.name = "test-" + std::string(MemoryBackendName(backend()));
    options.mmap_allowed = mmap_allowed;
    options.os = os;
    auto file = MemoryFile::Create(options);
    EXPECT_TRUE(file.has_value()) << file.error().ToString();
    return file ? *file : nullptr;
  }

  // Puts page `page`'s pattern into the file the way its backend takes content: write(2) where
  // it can, else a write through `mapping` and MarkPrepared.
  void Install(MemoryFile& file, const MemoryMapping& mapping, uint64_t page, uint8_t seed = 0) {
    const auto content = Pattern(page_, page, seed);
    if (Populates(backend())) {
      ASSERT_TRUE(file.Populate(FileOffset(page * page_), content));
    } else {
      std::memcpy(mapping.bytes() + page * page_, content.data(), page_);
      ASSERT_TRUE(file.MarkPrepared(FileOffset(page * page_), page_));
    }
  }

  uint64_t page_ = kPageSize4K;
  std::unique_ptr<HugePageReservation> reservation_;
};

TEST_P(BackendTest, CreateReportsWhatTheKernelOffers) {
  auto file = Make();
  ASSERT_NE(file, nullptr);
  EXPECT_EQ(file->backend(), backend());
  EXPECT_EQ(file->size_bytes(), kPages * page_);
  EXPECT_EQ(file->page_count(), kPages);
  EXPECT_EQ(file->page_size(),
            backend() == MemoryBackend::kHugetlb ? kHugePageSize2M : kPageSize4K);
  EXPECT_EQ(file->fd() < 0, backend() == MemoryBackend::kAnonymous);
  EXPECT_TRUE(file->mmap_allowed());
  for (uint64_t p = 0; p < kPages; ++p) EXPECT_EQ(file->pages().Get(p), PageState::kAbsent);

  const BackendCapabilities& caps = file->capabilities();
  EXPECT_EQ(caps.backend, backend());
  EXPECT_EQ(caps.page_size, file->page_size());
  EXPECT_TRUE(caps.mmap_allowed);
  EXPECT_EQ(caps.direct_map_removed, backend() == MemoryBackend::kSecret);
  EXPECT_FALSE(caps.note.empty());
  EXPECT_EQ(caps.note.find('\n'), std::string::npos);
  const UffdModes all = UffdModes::kMissing | UffdModes::kWriteProtect | UffdModes::kMinor;
  switch (backend()) {
    case MemoryBackend::kShmem:
      EXPECT_TRUE(caps.populate_by_write);
      EXPECT_EQ(caps.uffd_modes, all) << caps.note;
      break;
    case MemoryBackend::kHugetlb:
      EXPECT_FALSE(caps.populate_by_write);  // hugetlbfs has no write(2)
      EXPECT_EQ(caps.uffd_modes, all) << caps.note;
      break;
    case MemoryBackend::kAnonymous:
      EXPECT_FALSE(caps.populate_by_write);
      EXPECT_EQ(caps.uffd_modes, UffdModes::kMissing | UffdModes::kWriteProtect) << caps.note;
      break;
    case MemoryBackend::kSecret:
      EXPECT_FALSE(caps.populate_by_write);
      EXPECT_EQ(caps.uffd_modes, UffdModes::kNone) << caps.note;
      break;
    case MemoryBackend::kGuestMemfd:
      break;  // depends on the kernel's KVM
  }
  // The probe creates the same kind of object, so it reports the same.
  auto probe = ProbeBackend(backend());
  ASSERT_TRUE(probe.has_value());
  EXPECT_EQ(probe->page_size, caps.page_size);
  EXPECT_EQ(probe->populate_by_write, caps.populate_by_write);
  EXPECT_EQ(probe->uffd_modes, caps.uffd_modes);
  EXPECT_EQ(probe->direct_map_removed, caps.direct_map_removed);
  EXPECT_EQ(probe->note, caps.note);
}

TEST_P(BackendTest, ContentReadsBackThroughTheMappingPageByPage) {
  auto file = Make();
  ASSERT_NE(file, nullptr);
  auto mapping = file->Map();
  ASSERT_TRUE(mapping.has_value()) << mapping.error().ToString();
  ASSERT_EQ(mapping->size(), file->size_bytes());
  for (uint64_t p = 0; p < kPages; p += 2) Install(*file, *mapping, p);
  for (uint64_t p = 0; p < kPages; ++p) {
    const std::byte* data = mapping->bytes() + p * page_;
    if (p % 2 == 0) {
      EXPECT_EQ(file->StateAt(FileOffset(p * page_)), PageState::kPrepared) << p;
      EXPECT_TRUE(HoldsPattern(data, page_, p)) << "page " << p;
    } else {
      EXPECT_EQ(file->StateAt(FileOffset(p * page_)), PageState::kAbsent) << p;
      EXPECT_TRUE(IsZero(data, page_)) << "page " << p;
    }
  }
}

TEST_P(BackendTest, PopulateWritesOnceOrSaysWhyItCannot) {
  auto file = Make();
  ASSERT_NE(file, nullptr);
  const auto first = Pattern(page_, 1, 1);
  const auto second = Pattern(page_, 1, 2);
  if (!Populates(backend())) {
    auto populated = file->Populate(FileOffset(page_), first);
    ASSERT_TRUE(Fails(populated, ErrorCode::kUnsupported, "MarkPrepared"));
    EXPECT_EQ(States(*file), std::vector<PageState>(kPages, PageState::kAbsent));
    return;
  }
  ASSERT_TRUE(file->Populate(FileOffset(page_), first));
  // A second populate of a prepared page is refused and changes nothing.
  auto again = file->Populate(FileOffset(0), [&] {
    std::vector<std::byte> two(2 * page_);
    std::memcpy(two.data() + page_, second.data(), page_);
    return two;
  }());
  ASSERT_TRUE(Fails(again, ErrorCode::kAlreadyExists, "is already prepared"));
  EXPECT_EQ(file->StateAt(FileOffset(0)), PageState::kAbsent);
  EXPECT_EQ(file->StateAt(FileOffset(page_)), PageState::kPrepared);
  auto mapping = file->Map();
  ASSERT_TRUE(mapping.has_value());
  EXPECT_TRUE(IsZero(mapping->bytes(), page_));
  EXPECT_TRUE(HoldsPattern(mapping->bytes() + page_, page_, 1, 1));
}

TEST_P(BackendTest, AllocateThenPunchMovesStatesAndZeroesContent) {
  auto file = Make();
  ASSERT_NE(file, nullptr);
  auto mapping = file->Map();
  ASSERT_TRUE(mapping.has_value());
  ASSERT_TRUE(file->Allocate(FileOffset(0), 4 * page_));
  for (uint64_t p = 0; p < 4; ++p) EXPECT_EQ(file->pages().Get(p), PageState::kAllocated);
  EXPECT_EQ(file->pages().Get(4), PageState::kAbsent);
  Install(*file, *mapping, 1);
  Install(*file, *mapping, 2);
  // Allocating again keeps prepared content.
  ASSERT_TRUE(file->Allocate(FileOffset(0), 4 * page_));
  EXPECT_EQ(file->pages().Get(1), PageState::kPrepared);
  EXPECT_TRUE(HoldsPattern(mapping->bytes() + page_, page_, 1));
  EXPECT_TRUE(IsZero(mapping->bytes(), page_));

  const auto before = States(*file);
  auto punched = file->PunchHole(FileOffset(0), 4 * page_);
  if (!Punches(backend())) {
    ASSERT_TRUE(Fails(punched, ErrorCode::kUnsupported, "memfd_secret"));
    EXPECT_EQ(States(*file), before);
    EXPECT_TRUE(HoldsPattern(mapping->bytes() + page_, page_, 1));
    return;
  }
  ASSERT_TRUE(punched.has_value()) << punched.error().ToString();
  EXPECT_EQ(*punched, 2u);
  EXPECT_EQ(States(*file),
            (std::vector<PageState>{PageState::kAbsent, PageState::kRemoved, PageState::kRemoved,
                                    PageState::kAbsent, PageState::kAbsent, PageState::kAbsent}));
  for (uint64_t p = 0; p < kPages; ++p) {
    EXPECT_TRUE(IsZero(mapping->bytes() + p * page_, page_)) << "page " << p;
  }
  // A removed page takes content again.
  Install(*file, *mapping, 2, 9);
  EXPECT_EQ(file->pages().Get(2), PageState::kPrepared);
  EXPECT_TRUE(HoldsPattern(mapping->bytes() + 2 * page_, page_, 2, 9));
  // Punching nothing prepared releases nothing.
  auto empty = file->PunchHole(FileOffset(4 * page_), 2 * page_);
  ASSERT_TRUE(empty.has_value());
  EXPECT_EQ(*empty, 0u);
}

TEST_P(BackendTest, BindingsAreToldBeforeAndAfterInOrder) {
  auto file = Make();
  ASSERT_NE(file, nullptr);
  auto mapping = file->Map();
  ASSERT_TRUE(mapping.has_value());
  RecordingBinding a, b;
  auto id_a = file->Attach(&a);
  auto id_b = file->Attach(&b);
  ASSERT_TRUE(id_a.has_value());
  ASSERT_TRUE(id_b.has_value());
  EXPECT_NE(*id_a, *id_b);
  Install(*file, *mapping, 2);
  Install(*file, *mapping, 4);
  Install(*file, *mapping, 5);
  auto punched = file->PunchHole(FileOffset(page_), 4 * page_);
  if (!Punches(backend())) {
    ASSERT_FALSE(punched);
    EXPECT_TRUE(a.events().empty());
    EXPECT_TRUE(b.events().empty());
    return;
  }
  ASSERT_TRUE(punched.has_value());
  EXPECT_EQ(*punched, 2u);
  const std::vector<Ev> expected = {{Kind::kBegin, page_, 4 * page_},
                                    {Kind::kRelease, 2 * page_, 0},
                                    {Kind::kRelease, 4 * page_, 0},
                                    {Kind::kEnd, page_, 4 * page_}};
  EXPECT_EQ(a.events(), expected);
  EXPECT_EQ(b.events(), expected);
  // A detached binding hears nothing more.
  ASSERT_TRUE(file->Detach(*id_a));
  ASSERT_TRUE(file->PunchHole(FileOffset(5 * page_), page_).has_value());
  EXPECT_EQ(a.events().size(), expected.size());
  EXPECT_EQ(b.events().size(), expected.size() + 3);
  EXPECT_TRUE(b.WellFormed());
}

TEST_P(BackendTest, MapNeedsTheOwnerAndEveryBindingToAgree) {
  auto forbidden = Make(nullptr, /*mmap_allowed=*/false);
  ASSERT_NE(forbidden, nullptr);
  EXPECT_FALSE(forbidden->mmap_allowed());
  auto refused = forbidden->Map();
  ASSERT_TRUE(Fails(refused, ErrorCode::kPermissionDenied, "does not allow mmap"));

  auto file = Make();
  ASSERT_NE(file, nullptr);
  RecordingBinding willing, unwilling(/*may_mmap=*/false);
  ASSERT_TRUE(file->Attach(&willing).has_value());
  auto id = file->Attach(&unwilling);
  ASSERT_TRUE(id.has_value());
  const size_t registered = AddressRegistry::Global().size();
  auto denied = file->Map();
  ASSERT_TRUE(Fails(denied, ErrorCode::kPermissionDenied, "binding"));
  EXPECT_EQ(AddressRegistry::Global().size(), registered);
  ASSERT_TRUE(file->Detach(*id));
  auto mapped = file->Map();
  ASSERT_TRUE(mapped.has_value()) << mapped.error().ToString();
  EXPECT_EQ(AddressRegistry::Global().size(), registered + 1);
}

TEST_P(BackendTest, PartialMappingIsRegisteredAtItsFileOffset) {
  auto file = Make();
  ASSERT_NE(file, nullptr);
  {
    auto whole = file->Map();
    ASSERT_TRUE(whole.has_value());
    Install(*file, *whole, 3);
  }
  auto part = file->Map(FileOffset(2 * page_), 3 * page_);
  ASSERT_TRUE(part.has_value()) << part.error().ToString();
  EXPECT_EQ(part->file_offset(), FileOffset(2 * page_));
  EXPECT_EQ(part->size(), 3 * page_);
  EXPECT_EQ(part->file(), file);
  EXPECT_TRUE(IsZero(part->bytes(), page_));
  EXPECT_TRUE(HoldsPattern(part->bytes() + page_, page_, 3));

  const HostVirtAddr start = part->host_address();
  auto found = FindGuestMemory(start.UncheckedAdd(page_ + 5));
  ASSERT_TRUE(found.has_value());
  EXPECT_EQ(found->file, file);
  EXPECT_EQ(found->offset, FileOffset(3 * page_ + 5));
  EXPECT_EQ(found->mapping_start, start);
  EXPECT_EQ(found->mapping_size, 3 * page_);
  part->reset();
  EXPECT_FALSE(part->valid());
  EXPECT_FALSE(FindGuestMemory(start.UncheckedAdd(page_ + 5)).has_value());
}

TEST_P(BackendTest, MappingsShareTheFileOrAnonymousMemoryHasOneView) {
  auto file = Make();
  ASSERT_NE(file, nullptr);
  auto first = file->Map();
  ASSERT_TRUE(first.has_value());
  auto second = file->Map();
  if (backend() == MemoryBackend::kAnonymous) {
    ASSERT_TRUE(Fails(second, ErrorCode::kFailedPrecondition, ""));
    first->bytes()[7] = std::byte{42};
    first->reset();
    // The view comes back once the first is gone, over the same memory.
    auto again = file->Map();
    ASSERT_TRUE(again.has_value()) << again.error().ToString();
    EXPECT_EQ(again->bytes()[7], std::byte{42});
    return;
  }
  ASSERT_TRUE(second.has_value()) << second.error().ToString();
  EXPECT_NE(first->data(), second->data());
  const auto content = Pattern(page_, 4, 3);
  std::memcpy(first->bytes() + 4 * page_, content.data(), page_);
  EXPECT_TRUE(HoldsPattern(second->bytes() + 4 * page_, page_, 4, 3));
  // Moving a mapping keeps it registered once, under its address.
  const HostVirtAddr at = first->host_address();
  MemoryMapping moved = std::move(*first);
  EXPECT_FALSE(first->valid());
  EXPECT_EQ(moved.host_address(), at);
  ASSERT_TRUE(FindGuestMemory(at).has_value());
  EXPECT_EQ(FindGuestMemory(at)->file, file);
}

// Bad ranges: each its own error code, and nothing at all happens.
TEST_P(BackendTest, BadRangesChangeNothing) {
  FaultInjectionOs os;
  auto file = Make(&os);
  ASSERT_NE(file, nullptr);
  auto mapping = file->Map();
  ASSERT_TRUE(mapping.has_value());
  Install(*file, *mapping, 1);
  RecordingBinding binding;
  ASSERT_TRUE(file->Attach(&binding).has_value());
  const uint64_t size = file->size_bytes();
  const uint64_t top = AlignDown(UINT64_MAX, page_);
  struct Case {
    const char* what;
    uint64_t offset;
    uint64_t length;
    ErrorCode code;
    std::string message;
  };
  const std::vector<Case> cases = {
      {"unaligned offset", page_ + 1, page_, ErrorCode::kInvalidArgument,
       "offset " + HexOf(page_ + 1) + " is not aligned to " + std::to_string(page_)},
      {"unaligned length", 0, page_ + 1, ErrorCode::kInvalidArgument,
       "is not a multiple of the page size"},
      {"zero length", page_, 0, ErrorCode::kInvalidArgument, "zero length"},
      {"past the end", size, page_, ErrorCode::kOutOfRange, "is past the end"},
      {"across the end", size - page_, 2 * page_, ErrorCode::kOutOfRange, "is past the end"},
      {"overflow", top, page_, ErrorCode::kOutOfRange, "overflows"},
      {"overflow of a long range", page_, top, ErrorCode::kOutOfRange, "overflows"},
  };
  const auto states = States(*file);
  const uint64_t calls = TotalCalls(os);
  const size_t registered = AddressRegistry::Global().size();
  for (const Case& c : cases) {
    SCOPED_TRACE(c.what);
    auto fails = [&](const auto& result, const std::string& op) {
      return Fails(result, c.code, op + ": ", /*err=*/0) && Fails(result, c.code, c.message, 0);
    };
    EXPECT_TRUE(fails(file->Allocate(FileOffset(c.offset), c.length), "allocate"));
    EXPECT_TRUE(fails(file->MarkPrepared(FileOffset(c.offset), c.length), "mark_prepared"));
    EXPECT_TRUE(fails(file->Map(FileOffset(c.offset), c.length), "map"));
    if (Punches(backend())) {
      EXPECT_TRUE(fails(file->PunchHole(FileOffset(c.offset), c.length), "punch_hole"));
    }
    // Populate takes its length from the content: a length that cannot be allocated is covered
    // by the offset cases.
    if (Populates(backend()) && c.length <= size + page_) {
      std::vector<std::byte> content(c.length, std::byte{1});
      EXPECT_TRUE(fails(file->Populate(FileOffset(c.offset), content), "populate"));
    }
  }
  EXPECT_EQ(States(*file), states);
  EXPECT_EQ(TotalCalls(os), calls) << "a bad range made a system call";
  EXPECT_TRUE(binding.events().empty());
  EXPECT_EQ(AddressRegistry::Global().size(), registered);
  EXPECT_TRUE(HoldsPattern(mapping->bytes() + page_, page_, 1));
}

TEST_P(BackendTest, CreateRejectsBadSizesWithoutTouchingTheKernel) {
  FaultInjectionOs os;
  MemoryFileOptions options;
  options.backend = backend();
  options.os = &os;
  struct Case {
    uint64_t size;
    ErrorCode code;
    const char* message;
  };
  for (const Case& c :
       {Case{0, ErrorCode::kInvalidArgument, "size 0"},
        Case{page_ + page_ / 2, ErrorCode::kInvalidArgument, "is not a multiple of the page size"},
        Case{AlignDown(UINT64_MAX, page_), ErrorCode::kOutOfRange,
             "beyond the largest file offset"}}) {
    options.size_bytes = c.size;
    EXPECT_TRUE(Fails(MemoryFile::Create(options), c.code, c.message, 0));
  }
  EXPECT_EQ(TotalCalls(os), 0u);
}

INSTANTIATE_TEST_SUITE_P(AllBackends, BackendTest,
                         ::testing::Values(MemoryBackend::kShmem, MemoryBackend::kHugetlb,
                                           MemoryBackend::kAnonymous, MemoryBackend::kSecret,
                                           MemoryBackend::kGuestMemfd),
                         [](const ::testing::TestParamInfo<MemoryBackend>& param_info) {
                           return std::string(MemoryBackendName(param_info.param));
                         });

// ---------------------------------------------------------------------------------------------
// Names, probes, adoption

TEST(MemoryBackendTest, Names) {
  EXPECT_EQ(MemoryBackendName(MemoryBackend::kShmem), "shmem");
  EXPECT_EQ(MemoryBackendName(MemoryBackend::kHugetlb), "hugetlb");
  EXPECT_EQ(MemoryBackendName(MemoryBackend::kAnonymous), "anonymous");
  EXPECT_EQ(MemoryBackendName(MemoryBackend::kSecret), "secret");
  EXPECT_EQ(MemoryBackendName(MemoryBackend::kGuestMemfd), "guest_memfd");
}

TEST(ProbeBackendTest, HugetlbWithoutFreePagesSaysWhy) {
  FaultInjectionOs os;
  os.FailNext(Call::kFallocate, ENOSPC);  // what an empty pool answers
  auto probe = ProbeBackend(MemoryBackend::kHugetlb, &os);
  ASSERT_FALSE(probe);
  if (probe.error().context().find("MFD_HUGETLB") != std::string::npos) {
    GTEST_SKIP() << probe.error().ToString();
  }
  EXPECT_TRUE(Fails(probe, ErrorCode::kUnsupported,
                    "hugetlbfs has no free 2 MiB pages (vm.nr_hugepages=", ENOSPC));
}

TEST(ProbeBackendTest, GuestMemfdWithoutKvmSaysWhy) {
  FaultInjectionOs os;
  os.FailNext(Call::kOpen, ENOENT);  // as on a machine without /dev/kvm
  auto probe = ProbeBackend(MemoryBackend::kGuestMemfd, &os);
  ASSERT_TRUE(Fails(probe, ErrorCode::kUnsupported, ""));
  EXPECT_EQ(probe.error().context(), "no /dev/kvm: KVM guest_memfd unavailable");
  EXPECT_EQ(os.calls(Call::kIoctl), 0u);
}

TEST(ProbeBackendTest, GuestMemfdOnThisMachineIsRealOrExplained) {
  auto probe = ProbeBackend(MemoryBackend::kGuestMemfd);
  if (!probe) {
    EXPECT_EQ(probe.error().code(), ErrorCode::kUnsupported) << probe.error().ToString();
    GTEST_SKIP() << probe.error().ToString();
  }
  EXPECT_EQ(probe->backend, MemoryBackend::kGuestMemfd);
  EXPECT_TRUE(probe->mmap_allowed);
}

TEST(ProbeBackendTest, SecretMemoryIsOutOfTheDirectMapAndOutOfReachOfUffd) {
  auto probe = ProbeBackend(MemoryBackend::kSecret);
  if (!probe && probe.error().code() == ErrorCode::kUnsupported) {
    GTEST_SKIP() << probe.error().ToString();
  }
  ASSERT_TRUE(probe.has_value()) << probe.error().ToString();
  EXPECT_TRUE(probe->direct_map_removed);
  EXPECT_FALSE(probe->populate_by_write);
  EXPECT_EQ(probe->uffd_modes, UffdModes::kNone);
  EXPECT_TRUE(probe->mmap_allowed);
}

TEST(MemoryFileTest, CreateReportsTheKernelsRefusal) {
  FaultInjectionOs os;
  os.FailNext(Call::kMemfdCreate, EMFILE);
  auto file = MemoryFile::Create({.size_bytes = kPageSize4K, .os = &os});
  ASSERT_TRUE(Fails(file, ErrorCode::kResourceExhausted, "memfd_create", EMFILE));

  os.FailNext(Call::kFtruncate, EFBIG);
  file = MemoryFile::Create({.size_bytes = kPageSize4K, .os = &os});
  EXPECT_TRUE(Fails(file, ErrorCode::kOutOfRange, "ftruncate", EFBIG));
}

TEST(MemoryFileTest, AdoptTakesTheFileAsItIs) {
  const int raw = memfd_create("adopted", MFD_CLOEXEC);
  ASSERT_GE(raw, 0);
  UniqueFd fd(raw);
  ASSERT_EQ(ftruncate(fd.get(), 8 * kPageSize4K), 0);
  const auto data = Pattern(kPageSize4K, 2);
  ASSERT_EQ(pwrite(fd.get(), data.data(), kPageSize4K, 2 * kPageSize4K),
            static_cast<ssize_t>(kPageSize4K));
  MemoryFileOptions options;
  options.name = "adopted";
  auto file = MemoryFile::Adopt(std::move(fd), options);
  ASSERT_TRUE(file.has_value()) << file.error().ToString();
  EXPECT_EQ((*file)->size_bytes(), 8 * kPageSize4K);
  // Data of unknown standing is allocated, not prepared; holes are absent.
  for (uint64_t p = 0; p < 8; ++p) {
    EXPECT_EQ((*file)->pages().Get(p), p == 2 ? PageState::kAllocated : PageState::kAbsent) << p;
  }
  ASSERT_TRUE((*file)->Populate(FileOffset(2 * kPageSize4K), Pattern(kPageSize4K, 2, 5)));
  auto mapping = (*file)->Map();
  ASSERT_TRUE(mapping.has_value());
  EXPECT_TRUE(HoldsPattern(mapping->bytes() + 2 * kPageSize4K, kPageSize4K, 2, 5));
}

TEST(MemoryFileTest, AdoptRefusesWhatItCannotTake) {
  MemoryFileOptions options;
  options.backend = MemoryBackend::kAnonymous;
  auto anonymous = MemoryFile::Adopt(UniqueFd(), options);
  ASSERT_TRUE(Fails(anonymous, ErrorCode::kInvalidArgument, ""));

  const int raw = memfd_create("small", MFD_CLOEXEC);
  ASSERT_GE(raw, 0);
  ASSERT_EQ(ftruncate(raw, kPageSize4K), 0);
  options.backend = MemoryBackend::kShmem;
  options.size_bytes = 2 * kPageSize4K;
  auto too_big = MemoryFile::Adopt(UniqueFd(raw), options);
  ASSERT_TRUE(Fails(too_big, ErrorCode::kOutOfRange, "larger than the file"));
}

// Regression: the page-state map was sized from whatever the adopted file's size was; a client's
// memfd ftruncate'd to 2^62 bytes made the daemon throw bad_alloc.
TEST(MemoryFileTest, AdoptRefusesAFileLargerThanTheBoundBeforeAllocating) {
  const int raw = memfd_create("huge", MFD_CLOEXEC);
  ASSERT_GE(raw, 0);
  ASSERT_EQ(ftruncate(raw, off_t{1} << 62), 0);
  MemoryFileOptions options;
  options.max_size_bytes = 16 * kPageSize4K;
  auto huge = MemoryFile::Adopt(UniqueFd(raw), options);
  ASSERT_TRUE(Fails(huge, ErrorCode::kOutOfRange, "more than the most allowed (0x10000 bytes)"));

  // size_bytes beyond the bound is refused too, however large the file.
  const int big = memfd_create("big", MFD_CLOEXEC);
  ASSERT_GE(big, 0);
  ASSERT_EQ(ftruncate(big, 64 * kPageSize4K), 0);
  options.size_bytes = 32 * kPageSize4K;
  auto sized = MemoryFile::Adopt(UniqueFd(big), options);
  ASSERT_TRUE(Fails(sized, ErrorCode::kOutOfRange, "more than the most allowed"));

  // Within the bound it is taken as it is.
  const int fits = memfd_create("fits", MFD_CLOEXEC);
  ASSERT_GE(fits, 0);
  ASSERT_EQ(ftruncate(fits, 16 * kPageSize4K), 0);
  options.size_bytes = 0;
  auto taken = MemoryFile::Adopt(UniqueFd(fits), options);
  ASSERT_TRUE(taken.has_value()) << taken.error().ToString();
  EXPECT_EQ((*taken)->size_bytes(), 16 * kPageSize4K);
}

TEST(MemoryFileTest, AdoptWithoutABoundReportsAnUnallocatableMapAsAnError) {
#if defined(__SANITIZE_ADDRESS__) || defined(__SANITIZE_THREAD__)
  GTEST_SKIP() << "sanitizer allocators abort on an impossible allocation instead of throwing";
#endif
  const int raw = memfd_create("huge", MFD_CLOEXEC);
  ASSERT_GE(raw, 0);
  ASSERT_EQ(ftruncate(raw, off_t{1} << 62), 0);
  auto huge = MemoryFile::Adopt(UniqueFd(raw), MemoryFileOptions{});
  ASSERT_TRUE(Fails(huge, ErrorCode::kResourceExhausted, "no memory for the state of"));
}

TEST_P(BackendTest, IdentifyBackendNamesTheFilesBackend) {
  if (backend() == MemoryBackend::kAnonymous) GTEST_SKIP() << "anonymous memory has no file";
  auto file = Make();
  ASSERT_NE(file, nullptr);
  auto identified = IdentifyBackend(file->fd());
  ASSERT_TRUE(identified.has_value()) << identified.error().ToString();
  EXPECT_EQ(*identified, backend());
}

TEST(MemoryFileTest, IdentifyBackendRefusesWhatIsNotGuestMemory) {
  TempDir dir;
  const std::string path = dir.File("plain");
  UniqueFd on_disk(open(path.c_str(), O_CREAT | O_RDWR | O_CLOEXEC, 0600));
  ASSERT_TRUE(on_disk.valid());
  // /tmp may itself be a tmpfs; then a file there is shmem as far as the kernel is concerned.
  struct statfs fs = {};
  ASSERT_EQ(statfs(dir.path().c_str(), &fs), 0);
  auto plain = IdentifyBackend(on_disk.get());
  if (fs.f_type == TMPFS_MAGIC) {
    ASSERT_TRUE(plain.has_value()) << plain.error().ToString();
    EXPECT_EQ(*plain, MemoryBackend::kShmem);
  } else {
    EXPECT_TRUE(Fails(plain, ErrorCode::kInvalidArgument, "is not a guest memory file"));
  }
  int sv[2];
  ASSERT_EQ(socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, sv), 0);
  UniqueFd a(sv[0]), b(sv[1]);
  EXPECT_TRUE(Fails(IdentifyBackend(a.get()), ErrorCode::kInvalidArgument, "socket:"));
  EXPECT_TRUE(Fails(IdentifyBackend(-1), ErrorCode::kInvalidArgument, ""));
}

// ---------------------------------------------------------------------------------------------
// Failures of the kernel leave states as they were

TEST(MemoryFileFaultTest, AllocateEnospcLeavesStatesUnchanged) {
  FaultInjectionOs os;
  auto file = MemoryFile::Create({.size_bytes = 8 * kPageSize4K, .os = &os});
  ASSERT_TRUE(file.has_value());
  ASSERT_TRUE((*file)->Populate(FileOffset(kPageSize4K), Pattern(kPageSize4K, 1)));
  const auto before = States(**file);
  os.FailNext(Call::kFallocate, ENOSPC);
  auto allocated = (*file)->Allocate(FileOffset(0), 4 * kPageSize4K);
  ASSERT_TRUE(Fails(allocated, ErrorCode::kResourceExhausted, "allocate: fallocate [0x0, +0x4000)",
                    ENOSPC));
  EXPECT_EQ(States(**file), before);
  ASSERT_TRUE((*file)->Allocate(FileOffset(0), 4 * kPageSize4K));
  EXPECT_EQ((*file)->pages().Get(0), PageState::kAllocated);
  EXPECT_EQ((*file)->pages().Get(1), PageState::kPrepared);
}

TEST(MemoryFileFaultTest, PopulateEioLeavesStatesUnchanged) {
  FaultInjectionOs os;
  auto file = MemoryFile::Create({.size_bytes = 8 * kPageSize4K, .os = &os});
  ASSERT_TRUE(file.has_value());
  os.FailNext(Call::kPwrite, EIO);
  auto populated = (*file)->Populate(FileOffset(kPageSize4K), Pattern(kPageSize4K, 1));
  ASSERT_TRUE(Fails(populated, ErrorCode::kIoError, "populate: pwrite", EIO));
  EXPECT_EQ(States(**file), std::vector<PageState>(8, PageState::kAbsent));
  // The failed populate is over: the page can be populated now.
  ASSERT_TRUE((*file)->Populate(FileOffset(kPageSize4K), Pattern(kPageSize4K, 1)));
  EXPECT_EQ((*file)->pages().Get(1), PageState::kPrepared);
}

TEST(MemoryFileFaultTest, FailedPunchEndsWhatItBeganAndReleasesNothing) {
  FaultInjectionOs os;
  auto file = MemoryFile::Create({.size_bytes = 4 * kPageSize4K, .os = &os});
  ASSERT_TRUE(file.has_value());
  ASSERT_TRUE((*file)->Populate(FileOffset(0), Pattern(kPageSize4K, 0)));
  RecordingBinding binding;
  ASSERT_TRUE((*file)->Attach(&binding).has_value());
  os.FailNext(Call::kFallocate, EIO);
  auto punched = (*file)->PunchHole(FileOffset(0), 2 * kPageSize4K);
  ASSERT_TRUE(Fails(punched, ErrorCode::kIoError, "PUNCH_HOLE"));
  EXPECT_EQ(binding.events(), (std::vector<Ev>{{Kind::kBegin, 0, 2 * kPageSize4K},
                                               {Kind::kEnd, 0, 2 * kPageSize4K}}));
  EXPECT_EQ((*file)->pages().Get(0), PageState::kPrepared);
  auto mapping = (*file)->Map();
  ASSERT_TRUE(mapping.has_value());
  EXPECT_TRUE(HoldsPattern(mapping->bytes(), kPageSize4K, 0));
}

// write(2) may write less than asked: Populate goes on until all is written.
class ShortWriteOs : public OsWrapper {
 public:
  ssize_t Pwrite(int fd, const void* buf, size_t count, off_t offset) override {
    ++calls;
    return OsWrapper::Pwrite(fd, buf, std::min<size_t>(count, 1000), offset);
  }
  std::atomic<int> calls{0};
};

TEST(MemoryFileFaultTest, PopulateCompletesShortWrites) {
  ShortWriteOs os;
  auto file = MemoryFile::Create({.size_bytes = 4 * kPageSize4K, .os = &os});
  ASSERT_TRUE(file.has_value());
  const int probe_calls = os.calls.load();
  std::vector<std::byte> content(2 * kPageSize4K);
  for (uint64_t p = 0; p < 2; ++p) {
    auto page = Pattern(kPageSize4K, p + 1);
    std::memcpy(content.data() + p * kPageSize4K, page.data(), kPageSize4K);
  }
  ASSERT_TRUE((*file)->Populate(FileOffset(kPageSize4K), content));
  EXPECT_EQ(os.calls.load() - probe_calls, 9);  // 8192 bytes, 1000 at a time
  auto mapping = (*file)->Map();
  ASSERT_TRUE(mapping.has_value());
  EXPECT_TRUE(HoldsPattern(mapping->bytes() + kPageSize4K, kPageSize4K, 1));
  EXPECT_TRUE(HoldsPattern(mapping->bytes() + 2 * kPageSize4K, kPageSize4K, 2));
}

TEST(MemoryFileFaultTest, FailedMmapRegistersNothing) {
  FaultInjectionOs os;
  auto file = MemoryFile::Create({.size_bytes = 4 * kPageSize4K, .os = &os});
  ASSERT_TRUE(file.has_value());
  const size_t registered = AddressRegistry::Global().size();
  os.FailNext(Call::kMmap, ENOMEM);
  auto mapping = (*file)->Map();
  ASSERT_TRUE(Fails(mapping, ErrorCode::kResourceExhausted, ""));
  EXPECT_EQ(AddressRegistry::Global().size(), registered);
}

// ---------------------------------------------------------------------------------------------
// Races

// Makes every write(2) linger before returning, so that a punch has every chance to land between
// a populate's write and its marking of the pages as prepared.
class SlowWriteOs : public OsWrapper {
 public:
  ssize_t Pwrite(int fd, const void* buf, size_t count, off_t offset) override {
    const ssize_t n = OsWrapper::Pwrite(fd, buf, count, offset);
    std::this_thread::sleep_for(std::chrono::microseconds(20));
    return n;
  }
};

// After any interleaving of populates and punches, every page marked prepared holds its content
// and every other page reads zero. Checked after each of many short rounds of racing.
TEST(MemoryFileRaceTest, PopulateVersusPunchKeepsStatesTrue) {
  constexpr uint64_t kFilePages = 32;
  SlowWriteOs os;
  auto file = MemoryFile::Create({.size_bytes = kFilePages * kPageSize4K, .os = &os});
  ASSERT_TRUE(file.has_value());
  MemoryFile& f = **file;
  std::vector<std::vector<std::byte>> runs;  // content of pages [p, p + 4) for every p
  for (uint64_t p = 0; p < kFilePages; ++p) {
    std::vector<std::byte> run;
    for (uint64_t q = p; q < p + 4; ++q) {
      auto page = Pattern(kPageSize4K, q);
      run.insert(run.end(), page.begin(), page.end());
    }
    runs.push_back(std::move(run));
  }
  auto mapping = f.Map();
  ASSERT_TRUE(mapping.has_value());
  std::atomic<int> unexpected{0};
  std::atomic<uint64_t> populated{0}, refused{0}, released{0};
  for (int round = 0; round < 60; ++round) {
    std::vector<std::thread> threads;
    for (int t = 0; t < 3; ++t) {
      threads.emplace_back([&, t] {
        std::mt19937_64 rng(round * 16 + t);
        for (int i = 0; i < 20; ++i) {
          const uint64_t count = 1 + rng() % 4;
          const uint64_t first = rng() % (kFilePages - count + 1);
          auto status = f.Populate(FileOffset(first * kPageSize4K),
                                   std::span(runs[first]).first(count * kPageSize4K));
          if (status) {
            ++populated;
          } else if (status.error().code() == ErrorCode::kAlreadyExists) {
            ++refused;
          } else {
            ++unexpected;
          }
        }
      });
    }
    threads.emplace_back([&] {
      std::mt19937_64 rng(round);
      for (int i = 0; i < 40; ++i) {
        const uint64_t count = 1 + rng() % 8;
        const uint64_t first = rng() % (kFilePages - count + 1);
        auto punched = f.PunchHole(FileOffset(first * kPageSize4K), count * kPageSize4K);
        if (punched) {
          released += *punched;
        } else {
          ++unexpected;
        }
        std::this_thread::yield();
      }
    });
    for (auto& th : threads) th.join();
    for (uint64_t p = 0; p < kFilePages; ++p) {
      const std::byte* data = mapping->bytes() + p * kPageSize4K;
      const PageState state = f.pages().Get(p);
      if (state == PageState::kPrepared) {
        ASSERT_TRUE(HoldsPattern(data, kPageSize4K, p))
            << "round " << round << ": prepared page " << p << " lost its content";
      } else {
        ASSERT_TRUE(IsZero(data, kPageSize4K))
            << "round " << round << ": " << PageStateName(state) << " page " << p << " is not zero";
      }
    }
  }
  EXPECT_EQ(unexpected.load(), 0);
  EXPECT_GT(populated.load(), 0u);
  EXPECT_GT(refused.load(), 0u);
  EXPECT_GT(released.load(), 0u);
}

// Overlapping populates started together: exactly one writes, the rest are told the pages are
// prepared, and no page mixes two writers' content.
TEST(MemoryFileRaceTest, OverlappingPopulatesHaveOneWinner) {
  constexpr uint64_t kFilePages = 8;
  auto file = MemoryFile::Create({.size_bytes = kFilePages * kPageSize4K});
  ASSERT_TRUE(file.has_value());
  MemoryFile& f = **file;
  // Thread t writes pages [t, t + 4) with seed t + 1: every range holds page 3.
  constexpr int kThreads = 4;
  std::vector<std::vector<std::byte>> content(kThreads);
  for (int t = 0; t < kThreads; ++t) {
    for (uint64_t p = t; p < static_cast<uint64_t>(t) + 4; ++p) {
      auto page = Pattern(kPageSize4K, p, static_cast<uint8_t>(t + 1));
      content[t].insert(content[t].end(), page.begin(), page.end());
    }
  }
  auto mapping = f.Map();
  ASSERT_TRUE(mapping.has_value());
  for (int round = 0; round < 200; ++round) {
    ASSERT_TRUE(f.PunchHole(FileOffset(0), kFilePages * kPageSize4K).has_value());
    std::atomic<int> ready{0};
    std::vector<Status> results(kThreads);
    std::vector<std::thread> threads;
    for (int t = 0; t < kThreads; ++t) {
      threads.emplace_back([&, t] {
        ++ready;
        while (ready.load() < kThreads) std::this_thread::yield();
        results[t] = f.Populate(FileOffset(t * kPageSize4K), content[t]);
      });
    }
    for (auto& th : threads) th.join();
    int winner = -1;
    for (int t = 0; t < kThreads; ++t) {
      if (results[t]) {
        ASSERT_EQ(winner, -1) << "two populates of page 3 both succeeded in round " << round;
        winner = t;
      } else {
        ASSERT_EQ(results[t].error().code(), ErrorCode::kAlreadyExists);
      }
    }
    ASSERT_NE(winner, -1) << "round " << round;
    for (uint64_t p = 0; p < kFilePages; ++p) {
      const bool written =
          p >= static_cast<uint64_t>(winner) && p < static_cast<uint64_t>(winner) + 4;
      const std::byte* data = mapping->bytes() + p * kPageSize4K;
      ASSERT_EQ(f.pages().Get(p) == PageState::kPrepared, written) << "page " << p;
      if (written) {
        ASSERT_TRUE(HoldsPattern(data, kPageSize4K, p, static_cast<uint8_t>(winner + 1)));
      } else {
        ASSERT_TRUE(IsZero(data, kPageSize4K));
      }
    }
  }
}

// Bindings come and go while punches run: each gets whole Begin/Release/End groups, and nothing
// after its Detach returned.
TEST(MemoryFileRaceTest, AttachDetachVersusPunch) {
  constexpr uint64_t kFilePages = 16;
  auto file = MemoryFile::Create({.size_bytes = kFilePages * kPageSize4K});
  ASSERT_TRUE(file.has_value());
  MemoryFile& f = **file;
  std::atomic<bool> stop{false};
  std::atomic<int> errors{0};
  std::thread puncher([&] {
    std::mt19937_64 rng(5);
    const auto page = Pattern(kPageSize4K, 0);
    while (!stop.load()) {
      const uint64_t p = rng() % kFilePages;
      auto populated = f.Populate(FileOffset(p * kPageSize4K), page);
      if (!populated && populated.error().code() != ErrorCode::kAlreadyExists) ++errors;
      if (!f.PunchHole(FileOffset(0), kFilePages * kPageSize4K)) ++errors;
    }
  });
  std::atomic<uint64_t> heard{0};
  std::vector<std::thread> attachers;
  for (int t = 0; t < 2; ++t) {
    attachers.emplace_back([&] {
      for (int i = 0; i < 300; ++i) {
        auto binding = std::make_unique<RecordingBinding>();
        auto id = f.Attach(binding.get());
        if (!id) {
          ++errors;
          continue;
        }
        std::this_thread::yield();
        if (!f.Detach(*id)) ++errors;
        binding->MarkDetached();
        if (!binding->WellFormed()) ++errors;
        std::this_thread::yield();
        if (binding->calls_after_detach() != 0) ++errors;
        heard += binding->events().size();
        // Destroying the binding now is safe: the file will never call it again.
      }
    });
  }
  for (auto& th : attachers) th.join();
  stop.store(true);
  puncher.join();
  EXPECT_EQ(errors.load(), 0);
  EXPECT_GT(heard.load(), 0u) << "no binding ever overlapped a punch";
  EXPECT_EQ(f.pages().CountPrepared(0, kFilePages), 0u);
}

TEST(MemoryFileTest, AttachRejectsNullDuplicatesAndUnknownIds) {
  auto file = MemoryFile::Create({.size_bytes = kPageSize4K});
  ASSERT_TRUE(file.has_value());
  auto null = (*file)->Attach(nullptr);
  ASSERT_TRUE(Fails(null, ErrorCode::kInvalidArgument, ""));
  RecordingBinding binding;
  auto id = (*file)->Attach(&binding);
  ASSERT_TRUE(id.has_value());
  auto twice = (*file)->Attach(&binding);
  ASSERT_TRUE(Fails(twice, ErrorCode::kAlreadyExists, ""));
  ASSERT_TRUE((*file)->Detach(*id));
  auto unknown = (*file)->Detach(*id);
  ASSERT_TRUE(Fails(unknown, ErrorCode::kNotFound, ""));
}

}  // namespace
}  // namespace guestmem
