#include "sim/guest_vm.h"

#include <dirent.h>
#include <fcntl.h>
#include <gtest/gtest.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <sstream>
#include <string>
#include <vector>

#include "base/fault_injection_os.h"
#include "base/temp_dir.h"
#include "guestmem/unix_socket.h"
#include "sim/test_fault_server.h"
#include "sim/workload.h"
#include "snapshot_maker.h"
#include "testutil/huge_pages.h"

namespace guestmem::sim {
namespace {

using testutil::TestFaultServer;
using testutil::TestFaultServerOptions;

constexpr uint64_t kMiB = 1 << 20;

// A temp dir with a demo memory file and a listening socket, as a handler would have them.
class GuestVmTest : public ::testing::Test {
 protected:
  void SetUp() override {
    ASSERT_FALSE(dir_.empty());
    auto listener = ListenUnix(socket_path_);
    ASSERT_TRUE(listener.has_value()) << listener.error().ToString();
    listener_ = std::move(*listener);
  }

  // A demo memory file of `bytes` (zero holes, text, random pages).
  std::string MakeMemFile(uint64_t bytes) {
    const std::string path = dir_ + "/mem" + std::to_string(files_++);
    cli::SnapshotMakerOptions options;
    options.size_bytes = bytes;
    options.seed = 7;
    auto made = cli::MakeSnapshot(path, options);
    EXPECT_TRUE(made.has_value()) << made.error().ToString();
    return path;
  }

  std::unique_ptr<GuestVm> NewVm(uint64_t bytes, int regions = 1, bool secret = false,
                                 uint64_t page_size = kPageSize4K) {
    GuestVmOptions options;
    options.memory_bytes = bytes;
    options.regions = regions;
    options.secret_hiding = secret;
    options.page_size = page_size;
    auto vm = GuestVm::Create(options);
    EXPECT_TRUE(vm.has_value()) << vm.error().ToString();
    return vm ? std::move(*vm) : nullptr;
  }

  // Connects `vm` to a TestFaultServer serving `mem_file`.
  std::unique_ptr<TestFaultServer> Serve(GuestVm& vm, const std::string& mem_file,
                                         TestFaultServerOptions options = {}) {
    options.mem_file = mem_file;
    auto connected = vm.Connect(socket_path_);
    EXPECT_TRUE(connected.has_value()) << connected.error().ToString();
    auto server = TestFaultServer::AcceptAndStart(listener_.get(), options);
    EXPECT_TRUE(server.has_value()) << server.error().ToString();
    return server ? std::move(*server) : nullptr;
  }

  struct Restore {
    std::string mem;
    std::unique_ptr<GuestVm> vm;
    std::unique_ptr<TestFaultServer> server;  // null if anything failed
  };
  // A memory file, a VM of the same size and a TestFaultServer serving it.
  Restore StartRestore(uint64_t bytes, int regions = 1, bool secret = false,
                       TestFaultServerOptions options = {}, uint64_t page_size = kPageSize4K) {
    Restore restore;
    restore.mem = MakeMemFile(bytes);
    restore.vm = NewVm(bytes, regions, secret, page_size);
    if (restore.vm != nullptr) restore.server = Serve(*restore.vm, restore.mem, options);
    return restore;
  }

  WorkloadResult Run(const GuestVm& vm, const std::string& mem_file, WorkloadSpec spec,
                     std::optional<BalloonSpec> balloon = std::nullopt) {
    auto plan = PlanWorkload(spec, vm.memory_bytes());
    EXPECT_TRUE(plan.has_value()) << plan.error().ToString();
    UniqueFd mem(open(mem_file.c_str(), O_RDONLY | O_CLOEXEC));
    RunOptions run;
    run.verify = true;
    run.mem_file_fd = mem.get();
    run.balloon = balloon;
    auto result = RunWorkload(vm, *plan, run);
    EXPECT_TRUE(result.has_value()) << result.error().ToString();
    return result ? *result : WorkloadResult{};
  }

  TempDir temp_;
  const std::string dir_ = temp_.path();
  const std::string socket_path_ = dir_ + "/uffd.sock";
  UniqueFd listener_;
  int files_ = 0;
};

std::string ReadProcFile(const std::string& path) {
  std::ifstream in(path);
  std::stringstream ss;
  ss << in.rdbuf();
  return ss.str();
}

// The /proc/self/maps line of the mapping that starts at `addr`, or "".
std::string MapsLineAt(const void* addr) {
  char prefix[32];
  std::snprintf(prefix, sizeof(prefix), "%lx-", reinterpret_cast<unsigned long>(addr));
  std::istringstream maps(ReadProcFile("/proc/self/maps"));
  for (std::string line; std::getline(maps, line);) {
    if (line.rfind(prefix, 0) == 0) return line;
  }
  return "";
}

size_t OpenFdCount() {
  size_t n = 0;
  for (const auto& e : std::filesystem::directory_iterator("/proc/self/fd")) {
    (void)e;
    ++n;
  }
  return n;
}

TEST_F(GuestVmTest, RegionsAreMappedBackToBackInTheFileWithGapsInTheHost) {
  GuestVmOptions options;
  options.memory_bytes = 10 * kMiB;
  options.regions = 3;
  options.gap_bytes = 4 * kMiB;
  auto vm = GuestVm::Create(options);
  ASSERT_TRUE(vm.has_value()) << vm.error().ToString();
  const auto& regions = (*vm)->regions();
  ASSERT_EQ(regions.size(), 3u);
  const uint64_t pages = 10 * kMiB / kPageSize4K;
  EXPECT_EQ(regions[0].host.size(), pages / 3 * kPageSize4K);
  EXPECT_EQ(regions[1].host.size(), pages / 3 * kPageSize4K);
  EXPECT_EQ(regions[2].host.size(), 10 * kMiB - 2 * (pages / 3) * kPageSize4K);
  uint64_t offset = 0;
  for (size_t i = 0; i < regions.size(); ++i) {
    SCOPED_TRACE(i);
    EXPECT_EQ(regions[i].file_offset, offset);
    EXPECT_EQ(regions[i].guest_phys, offset + i * 4 * kMiB);
    const std::string line = MapsLineAt(regions[i].host.data());
    EXPECT_NE(line.find(" rw-p "), std::string::npos) << line;  // private, read-write
    if (i > 0) {
      const std::byte* prev_end = regions[i - 1].host.data() + regions[i - 1].host.size();
      EXPECT_EQ(regions[i].host.data() - prev_end, static_cast<ptrdiff_t>(4 * kMiB));
      // The gap is address space nobody may touch.
      EXPECT_NE(MapsLineAt(prev_end).find(" ---p "), std::string::npos) << MapsLineAt(prev_end);
    }
    EXPECT_EQ((*vm)->HostAddress(offset), regions[i].host.data());
    EXPECT_EQ((*vm)->HostAddress(offset + regions[i].host.size() - 1),
              regions[i].host.data() + regions[i].host.size() - 1);
    offset += regions[i].host.size();
  }
  EXPECT_EQ((*vm)->HostAddress(10 * kMiB), nullptr);
}

TEST_F(GuestVmTest, HandshakeDescribesTheRegionsAsFirecrackerDoes) {
  auto vm = NewVm(8 * kMiB, 2);
  ASSERT_NE(vm, nullptr);
  const auto& h = vm->handshake_regions();
  ASSERT_EQ(h.size(), 2u);
  for (size_t i = 0; i < h.size(); ++i) {
    SCOPED_TRACE(i);
    EXPECT_EQ(h[i].base_host_virt_addr, reinterpret_cast<uint64_t>(vm->regions()[i].host.data()));
    EXPECT_EQ(h[i].size, 4 * kMiB);
    EXPECT_EQ(h[i].offset, i * 4 * kMiB);
    EXPECT_EQ(h[i].page_size, 4096u);
    EXPECT_EQ(h[i].page_size_kib, std::optional<uint64_t>(4096));  // bytes, despite the name
    EXPECT_FALSE(h[i].gpa_start.has_value());
    EXPECT_FALSE(h[i].is_guest_memfd.has_value());
  }
  EXPECT_EQ(vm->handshake_fds(), std::vector<int>{vm->uffd().fd()});
  EXPECT_EQ(vm->memory_file_fd(), -1);
}

TEST_F(GuestVmTest, UffdIsCreatedAsFirecrackerCreatesIt) {
  auto vm = NewVm(4 * kMiB);
  ASSERT_NE(vm, nullptr);
  const int fd = vm->uffd().fd();
  EXPECT_NE(fcntl(fd, F_GETFL) & O_NONBLOCK, 0);
  EXPECT_NE(fcntl(fd, F_GETFD) & FD_CLOEXEC, 0);
  EXPECT_TRUE(vm->uffd().HasFeature(kUffdFeatureEventRemove));
  EXPECT_FALSE(vm->uffd().HasFeature(kUffdFeatureMinorShmem));
}

TEST_F(GuestVmTest, EveryRegionIsRegisteredMissing) {
  auto vm = NewVm(6 * kMiB, 3);
  ASSERT_NE(vm, nullptr);
  auto other = Userfaultfd::Create({});
  ASSERT_TRUE(other.has_value());
  for (const GuestVmRegion& r : vm->regions()) {
    const HostVirtAddr start(reinterpret_cast<uint64_t>(r.host.data()));
    // A range registered with one uffd cannot be registered with another.
    auto twice = other->Register(start, r.host.size(), UffdModes::kMissing);
    ASSERT_FALSE(twice.has_value());
    EXPECT_EQ(twice.error().sys_errno(), EBUSY) << twice.error().ToString();
    // And the VM's own uffd resolves a missing page there: the page then reads as zero.
    auto own = Userfaultfd::Adopt(UniqueFd(dup(vm->uffd().fd())));
    ASSERT_TRUE(own.has_value());
    auto zeroed = own->ZeroPage(start, kPageSize4K);
    ASSERT_TRUE(zeroed.has_value()) << zeroed.error().ToString();
    EXPECT_EQ(zeroed->outcome, UffdProgress::Outcome::kDone);
    EXPECT_EQ(r.host[0], std::byte{0});
  }
}

TEST_F(GuestVmTest, SecretHidingMapsTheGuestMemoryFileAndSendsThreeDescriptors) {
  auto vm = NewVm(6 * kMiB, 2, /*secret=*/true);
  ASSERT_NE(vm, nullptr);
  ASSERT_GE(vm->memory_file_fd(), 0);
  struct stat st {};
  ASSERT_EQ(fstat(vm->memory_file_fd(), &st), 0);
  EXPECT_EQ(static_cast<uint64_t>(st.st_size), 6 * kMiB);
  const std::vector<int> fds = vm->handshake_fds();
  ASSERT_EQ(fds.size(), 3u);
  EXPECT_EQ(fds[0], vm->uffd().fd());
  EXPECT_EQ(fds[1], vm->memory_file_fd());
  ASSERT_EQ(fstat(fds[2], &st), 0);
  EXPECT_EQ(static_cast<uint64_t>(st.st_size), 6 * kMiB / kPageSize4K / 8);  // one bit a page
  EXPECT_TRUE(vm->uffd().HasFeature(kUffdFeatureMinorShmem));
  for (size_t i = 0; i < 2; ++i) {
    SCOPED_TRACE(i);
    const HandshakeRegion& h = vm->handshake_regions()[i];
    EXPECT_EQ(h.offset, i * 3 * kMiB);
    EXPECT_EQ(h.gpa_start, std::optional<uint64_t>(vm->regions()[i].guest_phys));
    EXPECT_EQ(h.is_guest_memfd, std::optional<bool>(true));
    // A shared mapping of the memory file at the region's offset.
    const std::string line = MapsLineAt(vm->regions()[i].host.data());
    EXPECT_NE(line.find(" rw-s "), std::string::npos) << line;
    EXPECT_NE(line.find("guestmem-guest-memory"), std::string::npos) << line;
    char offset[32];
    std::snprintf(offset, sizeof(offset), " %08llx ", static_cast<unsigned long long>(h.offset));
    EXPECT_NE(line.find(offset), std::string::npos) << line;
  }
  // Registered MISSING|MINOR: a page put in the file is mapped by UFFDIO_CONTINUE.
  const std::byte* guest = vm->regions()[1].host.data();
  const char content[] = "minor";
  ASSERT_EQ(pwrite(vm->memory_file_fd(), content, sizeof(content), 3 * kMiB),
            static_cast<ssize_t>(sizeof(content)));
  auto own = Userfaultfd::Adopt(UniqueFd(dup(vm->uffd().fd())));
  ASSERT_TRUE(own.has_value());
  auto continued = own->Continue(HostVirtAddr(reinterpret_cast<uint64_t>(guest)), kPageSize4K);
  ASSERT_TRUE(continued.has_value()) << continued.error().ToString();
  EXPECT_EQ(continued->outcome, UffdProgress::Outcome::kDone);
  EXPECT_EQ(std::memcmp(guest, content, sizeof(content)), 0);
}

TEST_F(GuestVmTest, BadOptionsAreRefusedAndChangeNothing) {
  const size_t fds_before = OpenFdCount();
  FaultInjectionOs os;  // counts the system calls made: none may be
  struct Case {
    const char* name;
    GuestVmOptions options;
    const char* fragment;
  };
  const Case cases[] = {
      {"page size", {.memory_bytes = kMiB, .page_size = 8192}, "page size 8192"},
      {"zero memory", {.memory_bytes = 0}, "memory size 0x0"},
      {"unaligned memory", {.memory_bytes = kMiB + 100}, "memory size 0x100064"},
      {"huge unaligned", {.memory_bytes = kMiB, .page_size = kHugePageSize2M}, "memory size"},
      {"no regions", {.memory_bytes = kMiB, .regions = 0}, "0 regions"},
      {"more regions than pages", {.memory_bytes = 2 * kPageSize4K, .regions = 3}, "3 regions"},
      {"gap", {.memory_bytes = kMiB, .regions = 2, .gap_bytes = 100}, "gap 0x64"},
      {"overflow",
       {.memory_bytes = kMiB, .regions = 3, .gap_bytes = uint64_t{1} << 63},
       "overflows"},
  };
  for (const Case& c : cases) {
    SCOPED_TRACE(c.name);
    GuestVmOptions options = c.options;
    options.os = &os;
    auto vm = GuestVm::Create(options);
    ASSERT_FALSE(vm.has_value());
    EXPECT_EQ(vm.error().code(), ErrorCode::kInvalidArgument);
    EXPECT_NE(vm.error().context().find(c.fragment), std::string::npos) << vm.error().ToString();
  }
  for (auto call : {FaultInjectionOs::Call::kOpen, FaultInjectionOs::Call::kUserfaultfd,
                    FaultInjectionOs::Call::kMmap, FaultInjectionOs::Call::kMemfdCreate}) {
    EXPECT_EQ(os.calls(call), 0u);
  }
  EXPECT_EQ(OpenFdCount(), fds_before);
}

TEST_F(GuestVmTest, SystemCallFailuresAreReportedAndLeakNothing) {
  const size_t fds_before = OpenFdCount();
  struct Case {
    FaultInjectionOs::Call call;
    int err;
    int skip;
    bool secret;
    ErrorCode code;
    const char* fragment;
  };
  const Case cases[] = {
      {FaultInjectionOs::Call::kMmap, ENOMEM, 0, false, ErrorCode::kResourceExhausted, "mmap"},
      {FaultInjectionOs::Call::kMmap, ENOMEM, 2, false, ErrorCode::kResourceExhausted,
       "mmap region 1"},
      {FaultInjectionOs::Call::kMemfdCreate, EMFILE, 0, true, ErrorCode::kResourceExhausted,
       "memfd_create guestmem-guest-memory"},
      {FaultInjectionOs::Call::kFtruncate, ENOSPC, 1, true, ErrorCode::kResourceExhausted,
       "ftruncate guestmem-guest-memory-bitmap"},
  };
  for (const Case& c : cases) {
    SCOPED_TRACE(c.fragment);
    FaultInjectionOs os;
    os.FailNext(c.call, c.err, 1, c.skip);
    auto vm = GuestVm::Create(
        {.memory_bytes = 4 * kMiB, .regions = 2, .secret_hiding = c.secret, .os = &os});
    ASSERT_FALSE(vm.has_value());
    EXPECT_EQ(vm.error().code(), c.code) << vm.error().ToString();
    EXPECT_EQ(vm.error().sys_errno(), c.err);
    EXPECT_NE(vm.error().context().find(c.fragment), std::string::npos) << vm.error().ToString();
    EXPECT_EQ(OpenFdCount(), fds_before);
  }
}

TEST_F(GuestVmTest, HugePagesWithoutReservedPagesAreRefusedUpFront) {
  std::ifstream free_pages("/sys/kernel/mm/hugepages/hugepages-2048kB/free_hugepages");
  uint64_t free = 0;
  if (!(free_pages >> free)) GTEST_SKIP() << "no 2 MiB huge page pool on this kernel";
  GuestVmOptions options;
  options.memory_bytes = (free + 1) * kHugePageSize2M;
  options.page_size = kHugePageSize2M;
  auto vm = GuestVm::Create(options);
  ASSERT_FALSE(vm.has_value());
  EXPECT_EQ(vm.error().code(), ErrorCode::kResourceExhausted);
  EXPECT_NE(vm.error().context().find("huge page"), std::string::npos) << vm.error().ToString();
}

TEST_F(GuestVmTest, ConnectSendsExactlyOneMessageAndKeepsTheSocketOpen) {
  auto vm = NewVm(6 * kMiB, 3);
  ASSERT_NE(vm, nullptr);
  ASSERT_TRUE(vm->Connect(socket_path_));
  EXPECT_TRUE(vm->connected());
  UniqueFd peer(accept4(listener_.get(), nullptr, nullptr, SOCK_CLOEXEC));
  ASSERT_TRUE(peer.valid()) << std::strerror(errno);

  const std::string expected = EncodeHandshake(vm->handshake_regions());
  std::vector<char> data(expected.size() + 4096);
  iovec iov{data.data(), data.size()};
  alignas(cmsghdr) char control[CMSG_SPACE(4 * sizeof(int))];
  msghdr msg{};
  msg.msg_iov = &iov;
  msg.msg_iovlen = 1;
  msg.msg_control = control;
  msg.msg_controllen = sizeof(control);
  const ssize_t n = recvmsg(peer.get(), &msg, MSG_CMSG_CLOEXEC);
  ASSERT_EQ(n, static_cast<ssize_t>(expected.size()));
  EXPECT_EQ(std::string(data.data(), static_cast<size_t>(n)), expected);
  cmsghdr* cmsg = CMSG_FIRSTHDR(&msg);
  ASSERT_NE(cmsg, nullptr);
  EXPECT_EQ(cmsg->cmsg_type, SCM_RIGHTS);
  ASSERT_EQ(cmsg->cmsg_len, CMSG_LEN(sizeof(int)));  // the uffd and nothing else
  int received = -1;
  std::memcpy(&received, CMSG_DATA(cmsg), sizeof(int));
  UniqueFd uffd(received);
  EXPECT_EQ(CMSG_NXTHDR(&msg, cmsg), nullptr);

  // Nothing more, and no EOF: the VM keeps the connection open while it lives.
  char more;
  EXPECT_EQ(recv(peer.get(), &more, 1, MSG_DONTWAIT), -1);
  EXPECT_EQ(errno, EAGAIN);

  auto parsed = ParseHandshake(std::string_view(data.data(), static_cast<size_t>(n)));
  ASSERT_TRUE(parsed.has_value()) << parsed.error().ToString();
  ASSERT_EQ(parsed->size(), 3u);
  for (size_t i = 0; i < 3; ++i) {
    EXPECT_EQ((*parsed)[i].base_host_virt_addr, vm->handshake_regions()[i].base_host_virt_addr);
    EXPECT_EQ((*parsed)[i].size, vm->handshake_regions()[i].size);
    EXPECT_EQ((*parsed)[i].offset, vm->handshake_regions()[i].offset);
    EXPECT_EQ((*parsed)[i].page_size, 4096u);
  }

  // A VM hands its memory over once.
  auto again = vm->Connect(socket_path_);
  ASSERT_FALSE(again.has_value());
  EXPECT_EQ(again.error().code(), ErrorCode::kFailedPrecondition);

  // Hang-up only when the VM goes away.
  vm.reset();
  EXPECT_EQ(recv(peer.get(), &more, 1, 0), 0);
}

TEST_F(GuestVmTest, ConnectToNobodyFailsAndLeavesTheVmReadyToConnect) {
  auto vm = NewVm(4 * kMiB);
  ASSERT_NE(vm, nullptr);
  auto refused = vm->Connect(dir_ + "/nobody.sock");
  ASSERT_FALSE(refused.has_value());
  EXPECT_EQ(refused.error().code(), ErrorCode::kNotFound) << refused.error().ToString();
  EXPECT_NE(refused.error().context().find("nobody.sock"), std::string::npos);
  EXPECT_FALSE(vm->connected());
  EXPECT_TRUE(vm->Connect(socket_path_));
}

TEST_F(GuestVmTest, SendFailureIsReportedAndLeavesTheVmUnconnected) {
  FaultInjectionOs os;
  auto vm = GuestVm::Create({.memory_bytes = 4 * kMiB, .os = &os});
  ASSERT_TRUE(vm.has_value());
  os.FailNext(FaultInjectionOs::Call::kSendmsg, EPIPE);
  auto sent = (*vm)->Connect(socket_path_);
  ASSERT_FALSE(sent.has_value());
  EXPECT_EQ(sent.error().code(), ErrorCode::kPeerGone) << sent.error().ToString();
  EXPECT_FALSE((*vm)->connected());
}

TEST_F(GuestVmTest, ReceivedUffdServesAVerifyingWorkload) {
  auto [mem, vm, server] = StartRestore(16 * kMiB, 3);
  ASSERT_NE(server, nullptr);
  EXPECT_EQ(server->handshake().regions.size(), 3u);
  const WorkloadResult r = Run(*vm, mem, {.kind = WorkloadKind::kSequential, .threads = 2});
  EXPECT_EQ(r.pages_touched, 16 * kMiB / kPageSize4K);
  EXPECT_EQ(r.distinct_pages, 16 * kMiB / kPageSize4K);
  EXPECT_EQ(r.mismatches, 0u);
  EXPECT_FALSE(r.first_mismatch.has_value());
  EXPECT_TRUE(r.passed());
  server->Stop();  // its counters are final once it has stopped
  EXPECT_EQ(server->pages_served(), 16 * kMiB / kPageSize4K);
  EXPECT_EQ(server->error(), "");
}

TEST_F(GuestVmTest, VerifyReportsExactlyTheCorruptedOffset) {
  const uint64_t corrupt = 5 * kMiB + 3 * kPageSize4K + 1234;  // inside the second region
  auto [mem, vm, server] = StartRestore(8 * kMiB, 2, false, {.corrupt_offset = corrupt});
  ASSERT_NE(server, nullptr);
  const WorkloadResult r = Run(*vm, mem, {.kind = WorkloadKind::kSequential, .threads = 2});
  EXPECT_EQ(r.mismatches, 1u);
  ASSERT_TRUE(r.first_mismatch.has_value());
  EXPECT_EQ(r.first_mismatch->offset, corrupt);
  EXPECT_EQ(r.first_mismatch->got, static_cast<uint8_t>(r.first_mismatch->want ^ 0xff));
  EXPECT_FALSE(r.first_mismatch->written);
  EXPECT_FALSE(r.passed());
}

TEST_F(GuestVmTest, MixedWritesAreReadBackAndLaterReadsSeeThem) {
  auto [mem, vm, server] = StartRestore(8 * kMiB);
  ASSERT_NE(server, nullptr);
  const WorkloadResult r = Run(*vm, mem,
                               {.kind = WorkloadKind::kRandom,
                                .access = AccessMode::kMixed,
                                .threads = 2,
                                .pages = 8192,
                                .seed = 3});
  EXPECT_EQ(r.pages_touched, 8192u);
  EXPECT_GT(r.pages_written, 3000u);
  EXPECT_GT(r.pages_read, 3000u);
  EXPECT_LT(r.distinct_pages, 8192u);  // random pages repeat
  EXPECT_EQ(r.mismatches, 0u);
  // Written pages hold the pattern in guest memory.
  std::vector<std::byte> pattern(kPageSize4K);
  auto plan = PlanWorkload({.kind = WorkloadKind::kRandom,
                            .access = AccessMode::kMixed,
                            .threads = 2,
                            .pages = 8192,
                            .seed = 3},
                           8 * kMiB);
  ASSERT_TRUE(plan.has_value());
  auto write = std::find_if(plan->threads[0].begin(), plan->threads[0].end(),
                            [](const Access& a) { return a.write; });
  ASSERT_NE(write, plan->threads[0].end());
  FillWritePattern(write->offset, pattern.data());
  EXPECT_EQ(std::memcmp(vm->HostAddress(write->offset), pattern.data(), kPageSize4K), 0);
}

TEST_F(GuestVmTest, BalloonedPagesReadAsZero) {
  auto [mem, vm, server] = StartRestore(8 * kMiB, 2);
  ASSERT_NE(server, nullptr);
  // Across the boundary of the two regions.
  const WorkloadResult r =
      Run(*vm, mem, {.kind = WorkloadKind::kSequential}, BalloonSpec{3 * kMiB, 2 * kMiB});
  EXPECT_EQ(r.mismatches, 0u);
  ASSERT_TRUE(r.balloon.has_value());
  EXPECT_EQ(r.balloon->pages_checked, 512u);
  EXPECT_EQ(r.balloon->nonzero_pages, 0u);
  EXPECT_TRUE(r.passed());
  server->Stop();  // its counters are final once it has stopped
  EXPECT_EQ(server->zero_pages_served(), 512u);
}

TEST_F(GuestVmTest, BalloonCheckCatchesAHandlerThatIgnoresRemove) {
  auto [mem, vm, server] = StartRestore(4 * kMiB, 1, false, {.ignore_remove = true});
  ASSERT_NE(server, nullptr);
  const WorkloadResult r =
      Run(*vm, mem, {.kind = WorkloadKind::kSequential}, BalloonSpec{0, 4 * kMiB});
  ASSERT_TRUE(r.balloon.has_value());
  // About half of a demo file is data: those pages come back with content.
  EXPECT_GT(r.balloon->nonzero_pages, 256u);
  ASSERT_TRUE(r.balloon->first_nonzero.has_value());
  EXPECT_FALSE(r.passed());
  // And the reported byte really is the first non-zero byte of the file.
  UniqueFd fd(open(mem.c_str(), O_RDONLY | O_CLOEXEC));
  std::vector<uint8_t> file(4 * kMiB);
  ASSERT_EQ(pread(fd.get(), file.data(), file.size(), 0), static_cast<ssize_t>(file.size()));
  uint64_t first = 0;
  while (file[first] == 0) ++first;
  EXPECT_EQ(*r.balloon->first_nonzero, first);
}

TEST_F(GuestVmTest, SecretHidingRestoreFillsTheGuestMemoryFile) {
  auto [mem, vm, server] = StartRestore(8 * kMiB, 2, /*secret=*/true);
  ASSERT_NE(server, nullptr);
  EXPECT_EQ(server->handshake().fds.size(), 3u);
  const WorkloadResult r = Run(*vm, mem, {.kind = WorkloadKind::kSparse, .threads = 2, .seed = 9},
                               BalloonSpec{kMiB, kMiB});
  EXPECT_GT(r.pages_touched, 100u);
  EXPECT_EQ(r.mismatches, 0u);
  ASSERT_TRUE(r.balloon.has_value());
  EXPECT_EQ(r.balloon->nonzero_pages, 0u);
  EXPECT_EQ(server->error(), "");
  // Content went into the guest memory file: a touched page there equals the snapshot's.
  auto plan = PlanWorkload({.kind = WorkloadKind::kSparse, .threads = 2, .seed = 9}, 8 * kMiB);
  ASSERT_TRUE(plan.has_value());
  auto outside = std::find_if(plan->threads[0].begin(), plan->threads[0].end(),
                              [](const Access& a) { return a.offset >= 2 * kMiB; });
  ASSERT_NE(outside, plan->threads[0].end());
  std::vector<char> want(kPageSize4K), got(kPageSize4K);
  UniqueFd fd(open(mem.c_str(), O_RDONLY | O_CLOEXEC));
  ASSERT_EQ(pread(fd.get(), want.data(), kPageSize4K, static_cast<off_t>(outside->offset)), 4096);
  ASSERT_EQ(
      pread(vm->memory_file_fd(), got.data(), kPageSize4K, static_cast<off_t>(outside->offset)),
      4096);
  EXPECT_EQ(want, got);
}

TEST_F(GuestVmTest, RunWorkloadRefusesBadInputWithoutTouchingMemory) {
  auto [mem, vm, server] = StartRestore(4 * kMiB);
  ASSERT_NE(server, nullptr);
  UniqueFd fd(open(mem.c_str(), O_RDONLY | O_CLOEXEC));
  WorkloadPlan beyond;
  beyond.threads = {{{0, false}}, {{4 * kMiB, false}}};
  WorkloadPlan unaligned;
  unaligned.threads = {{{100, false}}};
  const WorkloadPlan no_threads;
  auto good = PlanWorkload({}, 4 * kMiB);
  ASSERT_TRUE(good.has_value());
  struct Case {
    const char* name;
    const WorkloadPlan* plan;
    RunOptions options;
    ErrorCode code;
    const char* fragment;
  };
  const Case cases[] = {
      {"beyond", &beyond, {}, ErrorCode::kInvalidArgument, "thread 1 access 0: offset 0x400000"},
      {"unaligned", &unaligned, {}, ErrorCode::kInvalidArgument, "offset 0x64"},
      {"no threads", &no_threads, {}, ErrorCode::kInvalidArgument, "no threads"},
      {"verify without file", &*good, {.verify = true}, ErrorCode::kInvalidArgument, "memory file"},
      {"balloon unaligned",
       &*good,
       {.balloon = BalloonSpec{100, 4096}},
       ErrorCode::kInvalidArgument,
       "balloon 0x64:0x1000: not aligned"},
      {"balloon empty",
       &*good,
       {.balloon = BalloonSpec{0, 0}},
       ErrorCode::kInvalidArgument,
       "empty"},
      {"balloon beyond",
       &*good,
       {.balloon = BalloonSpec{4 * kMiB - 4096, 8192}},
       ErrorCode::kInvalidArgument,
       "beyond guest memory"},
  };
  for (const Case& c : cases) {
    SCOPED_TRACE(c.name);
    auto result = RunWorkload(*vm, *c.plan, c.options);
    ASSERT_FALSE(result.has_value());
    EXPECT_EQ(result.error().code(), c.code);
    EXPECT_NE(result.error().context().find(c.fragment), std::string::npos)
        << result.error().ToString();
  }
  // A memory file shorter than guest memory cannot verify it.
  UniqueFd short_file(open((dir_ + "/short").c_str(), O_CREAT | O_RDWR | O_CLOEXEC, 0600));
  ASSERT_EQ(ftruncate(short_file.get(), kMiB), 0);
  auto too_short = RunWorkload(*vm, *good, {.verify = true, .mem_file_fd = short_file.get()});
  ASSERT_FALSE(too_short.has_value());
  EXPECT_EQ(too_short.error().code(), ErrorCode::kDataLoss);
  server->Stop();  // its counters are final once it has stopped
  EXPECT_EQ(server->pages_served(), 0u);
}

TEST_F(GuestVmTest, RunWorkloadReportsFailedSystemCalls) {
  auto [mem, vm, server] = StartRestore(4 * kMiB);
  ASSERT_NE(server, nullptr);
  UniqueFd fd(open(mem.c_str(), O_RDONLY | O_CLOEXEC));
  auto plan = PlanWorkload({.threads = 2}, 4 * kMiB);
  ASSERT_TRUE(plan.has_value());

  FaultInjectionOs os;
  os.FailNext(FaultInjectionOs::Call::kPread, EIO, 1, 10);
  auto read_failed = RunWorkload(*vm, *plan, {.verify = true, .mem_file_fd = fd.get(), .os = &os});
  ASSERT_FALSE(read_failed.has_value());
  EXPECT_EQ(read_failed.error().code(), ErrorCode::kIoError);
  EXPECT_EQ(read_failed.error().sys_errno(), EIO);
  EXPECT_NE(read_failed.error().context().find("pread memory file at 0x"), std::string::npos)
      << read_failed.error().ToString();

  os.FailNext(FaultInjectionOs::Call::kMadvise, EINVAL);
  auto balloon_failed = RunWorkload(*vm, *plan, {.balloon = BalloonSpec{0, kMiB}, .os = &os});
  ASSERT_FALSE(balloon_failed.has_value());
  EXPECT_EQ(balloon_failed.error().code(), ErrorCode::kInvalidArgument);
  EXPECT_NE(balloon_failed.error().context().find("madvise(MADV_DONTNEED) 0x100000 bytes"),
            std::string::npos)
      << balloon_failed.error().ToString();
}

using guestmem::testutil::HugePageReservation;

TEST_F(GuestVmTest, HugePageRestoreVerifies) {
  HugePageReservation reservation(4);
  if (!reservation.ok()) GTEST_SKIP() << reservation.why();
  auto [mem, vm, server] = StartRestore(8 * kMiB, 2, false, {}, kHugePageSize2M);
  ASSERT_NE(server, nullptr);
  EXPECT_NE(MapsLineAt(vm->regions()[0].host.data()).find("anon_hugepage"), std::string::npos)
      << MapsLineAt(vm->regions()[0].host.data());
  EXPECT_EQ(vm->handshake_regions()[0].page_size, kHugePageSize2M);
  EXPECT_EQ(vm->handshake_regions()[0].page_size_kib, std::optional<uint64_t>(kHugePageSize2M));
  const WorkloadResult r = Run(*vm, mem, {.kind = WorkloadKind::kRandom, .threads = 2});
  EXPECT_EQ(r.mismatches, 0u);
  server->Stop();                         // its counters are final once it has stopped
  EXPECT_EQ(server->pages_served(), 4u);  // one fault per huge page
  EXPECT_EQ(server->error(), "");
}

}  // namespace
}  // namespace guestmem::sim
