// End-to-end: the real `gmem serve` daemon and real `gmem vmm-sim` processes (which map, register
// and hand over guest memory exactly as Firecracker does), plus hand-made bad clients.
#include <fcntl.h>
#include <gtest/gtest.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <unistd.h>

#include <chrono>
#include <filesystem>
#include <fstream>
#include <memory>
#include <string>
#include <thread>
#include <vector>

#include "base/temp_dir.h"
#include "guestmem/handshake.h"
#include "guestmem/unix_socket.h"
#include "guestmem/userfaultfd.h"
#include "serve_fixture.h"
#include "testutil/huge_pages.h"
#include "testutil/snapshot_file.h"
#include "testutil/subprocess.h"
#include "testutil/test_vm.h"

namespace guestmem::e2e {
namespace {

using ServeE2eTest = ServeTest;

TEST_F(ServeE2eTest, SocketIsOwnerOnlyByDefault) {
  StartServer();
  struct stat st {};
  ASSERT_EQ(stat(socket_.c_str(), &st), 0);
  EXPECT_TRUE(S_ISSOCK(st.st_mode));
  EXPECT_EQ(st.st_mode & 0777, 0600u);
}

TEST_F(ServeE2eTest, OnDemandRestoreVerifiesEveryByte) {
  StartServer();
  ExpectVmVerifies({"--workload", "sequential", "--threads", "2", "--verify"});
  ExpectVmVerifies({"--workload", "random", "--threads", "2", "--access", "mixed", "--verify"},
                   "random");
  ASSERT_FALSE(WaitForVmEnd("vm 1 (").empty()) << server_->Output();
  EXPECT_NE(server_->Output().find("pid "), std::string::npos);  // SO_PEERCRED logged
}

TEST_F(ServeE2eTest, FaultAllRestoreLogsFirecrackersLine) {
  StartServer({"--mode", "fault-all"});
  // The fill runs in the background after the first fault: the VM stays until it is done.
  auto vm = StartVm("held", {"--workload", "sparse", "--verify", "--hold-ms", "600000"});
  EXPECT_TRUE(vm->WaitForOutput("every byte matches", 120s)) << vm->Output();
  EXPECT_TRUE(server_->WaitForOutput("Finished Faulting All: ", 120s)) << server_->Output();
}

// --fill background: the daemon installs the whole guest memory by itself, at its rate, and logs
// when it is done; the guest, let go only then, reads every page the snapshot's without a fault.
TEST_F(ServeE2eTest, BackgroundFillInstallsEveryPageBeforeTheGuestAsks) {
  StartServer({"--fill", "background", "--fill-rate-mib", "64"});
  EXPECT_NE(server_->Output().find("background fill at 64 MiB/s"), std::string::npos)
      << server_->Output();
  const std::string go = dir_ + "/go";
  auto vm = StartVm("filled", {"--workload", "sequential", "--verify", "--start-when", go});
  const std::string done = server_->WaitForLine({"vm 1 (", ": fill done: "}, 120s);
  ASSERT_NE(done, "") << server_->Output();
  EXPECT_NE(done.find(" " + std::to_string(snapshot_->pages()) + " pages in "), std::string::npos)
      << done;
  std::ofstream(go).put('x');
  EXPECT_EQ(vm->ExitCode(120s), 0) << vm->Output() << "\nserve log:\n" << server_->Output();
  EXPECT_TRUE(vm->WaitForOutput("verify: " + std::to_string(snapshot_->pages()) + " page read(s)"))
      << vm->Output();
  EXPECT_TRUE(vm->WaitForOutput("every byte matches")) << vm->Output();
  const std::string end = WaitForVmEnd("vm 1 (");
  EXPECT_NE(end.find("faults=0 "), std::string::npos) << "the fill left pages to fault: " << end;
}

// A guest that runs while its memory is being filled is served first: each byte verifies, the
// fill installs only what the guest's faults did not, and still ends.
TEST_F(ServeE2eTest, BackgroundFillYieldsToAGuestThatRunsMeanwhile) {
  StartServer({"--fill", "background", "--fill-rate-mib", "16"});
  auto vm = StartVm("busy",
                    {"--workload", "random", "--threads", "2", "--verify", "--hold-ms", "600000"});
  EXPECT_TRUE(vm->WaitForOutput("every byte matches", 120s)) << vm->Output();
  const std::string done = server_->WaitForLine({"vm 1 (", ": fill done: "}, 120s);
  ASSERT_NE(done, "") << server_->Output();
}

TEST_F(ServeE2eTest, SeveralRegionsWithGaps) {
  StartServer();
  ExpectVmVerifies({"--regions", "3", "--workload", "random", "--threads", "2", "--verify"});
}

TEST_F(ServeE2eTest, BalloonedPagesReadAsZero) {
  StartServer();
  ExpectVmVerifies({"--workload", "sequential", "--verify", "--balloon", "0x100000:0x200000"});
}

TEST_F(ServeE2eTest, SecretHidingVariantUsesTheMinorTrap) {
  StartServer();
  ExpectVmVerifies({"--secret-hiding", "--workload", "random", "--threads", "2", "--verify"});
  ASSERT_FALSE(WaitForVmEnd("vm 1 (").empty()) << server_->Output();
  EXPECT_NE(server_->Output().find("continued"), std::string::npos) << server_->Output();
}

TEST_F(ServeE2eTest, HugePageGuestMemoryIsServedInWholeHugePages) {
  testutil::HugePageReservation reservation(16);  // the 32 MiB guest
  if (!reservation.ok()) GTEST_SKIP() << reservation.why();
  StartServer();
  ExpectVmVerifies({"--page-size", "2m", "--workload", "random", "--threads", "2", "--verify"});
  ExpectVmVerifies({"--page-size", "2m", "--regions", "2", "--workload", "sparse", "--verify"},
                   "two-regions");
}

// Regression: in the minor trap with 2 MiB pages and fault-all, a zero run of several huge pages
// was copied from past the 2 MiB of zeros (a copy of what the VM faulted first, ~500 pages
// differed); in copy mode only the first huge page of such a run was installed.
TEST_F(ServeE2eTest, HugePagesWithFaultAllInBothModesWithLongZeroRuns) {
  testutil::HugePageReservation reservation(32);  // two 32 MiB guests at once, at most
  if (!reservation.ok()) GTEST_SKIP() << reservation.why();
  const uint64_t per_huge = kHugePageSize2M / kPageSize4K;
  // Huge pages 2..9 are all zero (holes): the fill meets zero runs of several huge pages.
  snapshot_ = std::make_unique<testutil::SnapshotFile>(8192, [&](uint64_t p) {
    const uint64_t huge = p / per_huge;
    return (huge >= 2 && huge < 10) || p % 7 == 3;
  });
  StartServer({"--mode", "fault-all"});
  ExpectVmVerifies({"--page-size", "2m", "--secret-hiding", "--workload", "random", "--verify"},
                   "minor-trap");
  ExpectVmVerifies({"--page-size", "2m", "--workload", "random", "--verify"}, "copy");
  ASSERT_FALSE(WaitForVmEnd("vm 2 (").empty()) << server_->Output();
}

TEST_F(ServeE2eTest, ManyVmsAtOnce) {
  StartServer();
  std::vector<std::unique_ptr<Subprocess>> vms;
  for (int i = 0; i < 4; ++i) {
    vms.push_back(StartVm("vm" + std::to_string(i), {"--workload", i % 2 ? "random" : "sequential",
                                                     "--seed", std::to_string(i), "--verify"}));
  }
  for (auto& vm : vms) EXPECT_EQ(vm->ExitCode(120s), 0) << vm->Output();
}

TEST_F(ServeE2eTest, KilledVmIsCleanedUpAndOthersGoOn) {
  StartServer();
  // The VM restores and verifies everything, then stays alive (memory mapped, socket open) until
  // it is killed: whatever the machine's speed, the kill finds it connected.
  auto doomed = StartVm(
      "doomed", {"--workload", "random", "--threads", "2", "--verify", "--hold-ms", "600000"});
  const std::string pid = "pid " + std::to_string(doomed->pid());
  ASSERT_NE(server_->WaitForLine({pid, "connected: "}, 60s), "") << server_->Output();
  ASSERT_TRUE(doomed->WaitForOutput("every byte matches", 60s)) << doomed->Output();
  EXPECT_EQ(doomed->Wait(0ms), std::nullopt) << "the VM must still be alive\n" << doomed->Output();
  EXPECT_EQ(server_->FindLine({pid, "faults="}), "") << server_->Output();
  doomed->Signal(SIGKILL);
  EXPECT_EQ(doomed->ExitCode(10s), -SIGKILL);
  // The daemon notices the hang-up and logs the VM's end with its statistics.
  const std::string end = WaitForVmEnd(pid, 30s);
  EXPECT_NE(end, "") << server_->Output();
  ExpectVmVerifies({"--workload", "sequential", "--verify"}, "survivor");
  EXPECT_EQ(server_->Wait(0ms), std::nullopt) << "the daemon must still be running";
}

TEST_F(ServeE2eTest, SigtermWithoutAKeeperShutsDownGracefully) {
  StartServer({"--no-keeper"});
  auto vm = StartVm("held", {"--workload", "sequential", "--verify", "--hold-ms", "20000"});
  ASSERT_TRUE(server_->WaitForOutput("connected: ")) << server_->Output();
  server_->Signal(SIGTERM);
  EXPECT_EQ(server_->ExitCode(20s), 0) << server_->Output();
  EXPECT_NE(server_->Output().find("detached at shutdown"), std::string::npos);
  EXPECT_FALSE(std::filesystem::exists(socket_));
  EXPECT_FALSE(std::filesystem::exists(socket_ + ".keeper"));
}

// With nothing connected, a stopped daemon releases its keeper: both sockets are gone.
TEST_F(ServeE2eTest, SigtermWithNoVmReleasesTheKeeper) {
  StartServer();
  ExpectVmVerifies({"--workload", "sparse", "--verify"});
  ASSERT_FALSE(WaitForVmEnd("vm 1 (").empty()) << server_->Output();
  server_->Signal(SIGTERM);
  EXPECT_EQ(server_->ExitCode(20s), 0) << server_->Output();
  EXPECT_FALSE(std::filesystem::exists(socket_));
  EXPECT_TRUE(testutil::WaitUntil([&] { return !std::filesystem::exists(socket_ + ".keeper"); }))
      << "the keeper did not end";
}

// A daemon stopped (SIGTERM) with a VM connected leaves it to its keeper; the next daemon takes
// it over and serves it.
TEST_F(ServeE2eTest, SigtermLeavesConnectedVmsToTheNextDaemon) {
  StartServer();
  const std::string go = dir_ + "/go";
  auto vm =
      StartVm("held", {"--workload", "random", "--threads", "2", "--verify", "--start-when", go});
  ASSERT_TRUE(server_->WaitForOutput("connected: ")) << server_->Output();
  server_->Signal(SIGTERM);
  EXPECT_EQ(server_->ExitCode(20s), 0) << server_->Output();
  EXPECT_NE(server_->Output().find("left 1 VM(s) to the keeper"), std::string::npos)
      << server_->Output();
  EXPECT_TRUE(std::filesystem::exists(socket_));  // the keeper holds the listener
  StartServer();
  ASSERT_TRUE(server_->WaitForOutput("taken over from the previous daemon")) << server_->Output();
  std::ofstream(go).put('x');
  EXPECT_EQ(vm->ExitCode(120s), 0) << vm->Output() << "\nserve log:\n" << server_->Output();
  ExpectVmVerifies({"--workload", "sparse", "--verify"}, "new");  // and new VMs as before
}

// A VM taken over in the middle of its background fill is filled on by the successor, at the
// successor's rate, from where its predecessor got to: every page verifies without a fault.
TEST_F(ServeE2eTest, ABackgroundFillGoesOnAfterATakeOver) {
  StartServer({"--fill", "background", "--fill-rate-mib", "1"});  // 32 MiB: half a minute
  const std::string go = dir_ + "/go";
  auto vm = StartVm("held", {"--workload", "sequential", "--verify", "--start-when", go});
  ASSERT_TRUE(server_->WaitForOutput("connected: ")) << server_->Output();
  server_->Signal(SIGKILL);
  EXPECT_EQ(server_->ExitCode(20s), -SIGKILL);
  EXPECT_EQ(server_->FindLine({"fill done: "}), "") << server_->Output();
  StartServer({"--fill", "background", "--fill-rate-mib", "1024"});
  ASSERT_NE(server_->WaitForLine({"[taken over]", ": fill done: "}, 120s), "") << server_->Output();
  std::ofstream(go).put('x');
  EXPECT_EQ(vm->ExitCode(120s), 0) << vm->Output() << "\nserve log:\n" << server_->Output();
  EXPECT_TRUE(vm->WaitForOutput("every byte matches")) << vm->Output();
  const std::string end = server_->WaitForAnyLine({{"[taken over]", " disconnected "}}, 20s);
  EXPECT_NE(end.find("faults=0 "), std::string::npos) << end << "\n" << server_->Output();
}

// Killed mid-restore (SIGKILL: nothing runs after it), the daemon's VMs are taken over by the
// next one and complete byte for byte, in copy mode and in the minor trap: some stopped while they
// run (with faults in flight when the daemon dies, unless they were quick enough to be done: they
// stay connected, holding, either way), and some that start only after the takeover, so that the
// successor surely serves them from their first fault.
TEST_F(ServeE2eTest, AKilledDaemonsVmsAreTakenOverAndCompleteVerified) {
  StartServer({"--fault-around-kib", "4"});
  const std::string go = dir_ + "/go";
  struct Vm {
    std::string name;
    std::vector<std::string> args;
    bool gated;  // starts its workload only after the takeover; else runs, then holds
  };
  const std::vector<Vm> specs = {
      {"copy-running", {"--workload", "random", "--threads", "2", "--pages", "200000"}, false},
      {"minor-running", {"--secret-hiding", "--workload", "random", "--threads", "2"}, false},
      {"copy-after", {"--workload", "sequential", "--threads", "2"}, true},
      {"minor-after", {"--secret-hiding", "--workload", "random"}, true},
  };
  std::vector<std::unique_ptr<Subprocess>> vms;
  for (size_t i = 0; i < specs.size(); ++i) {
    std::vector<std::string> args = specs[i].args;
    args.insert(args.end(), {"--verify", "--seed", std::to_string(i + 1)});
    if (specs[i].gated) {
      args.insert(args.end(), {"--start-when", go});
    } else {
      args.insert(args.end(), {"--hold-ms", "600000"});  // connected until the test ends it
    }
    vms.push_back(StartVm(specs[i].name, args));
    // One at a time, so that each is connected (and the running ones stopped mid-workload)
    // before the next.
    ASSERT_TRUE(server_->WaitForOutput("vm " + std::to_string(i + 1) + " (pid"))
        << server_->Output();
    ASSERT_FALSE(
        server_->WaitForLine({"vm " + std::to_string(i + 1) + " (", "connected: "}).empty())
        << server_->Output();
    if (!specs[i].gated) vms.back()->Signal(SIGSTOP);
  }
  server_->Signal(SIGKILL);
  EXPECT_EQ(server_->ExitCode(20s), -SIGKILL);
  StartServer({"--fault-around-kib", "4"});
  for (size_t i = 0; i < specs.size(); ++i) {
    EXPECT_FALSE(server_->WaitForLine({"vm " + std::to_string(i + 1) + " (", "taken over"}).empty())
        << specs[i].name << " was not taken over\n"
        << server_->Output();
  }
  for (size_t i = 0; i < specs.size(); ++i) {
    if (!specs[i].gated) vms[i]->Signal(SIGCONT);
  }
  std::ofstream(go).put('x');
  for (size_t i = 0; i < specs.size(); ++i) {
    if (specs[i].gated) {
      EXPECT_EQ(vms[i]->ExitCode(120s), 0) << specs[i].name << ":\n"
                                           << vms[i]->Output() << "\nserve log:\n"
                                           << server_->Output();
    } else {
      EXPECT_TRUE(vms[i]->WaitForOutput("every byte matches", 120s))
          << specs[i].name << ":\n"
          << vms[i]->Output() << "\nserve log:\n"
          << server_->Output();
      vms[i]->Signal(SIGKILL);  // it holds; its end is the hang-up the successor logs
    }
  }
  // The successor served them: each ends in its log with what it installed.
  for (size_t i = 0; i < specs.size(); ++i) {
    EXPECT_FALSE(WaitForVmEnd("vm " + std::to_string(i + 1) + " (").empty()) << server_->Output();
  }
  EXPECT_EQ(server_->Wait(0ms), std::nullopt) << "the successor must still be running";
}

// Regression: the memory file's holes were found once, at start-up, so after the file was filled
// in, or truncated and written anew, new VMs read zeros where data now was. Each new VM finds the
// file as it is; a file shrunk below a VM's regions fails that VM's handshake.
TEST_F(ServeE2eTest, NewVmsSeeTheMemoryFileAsItIsNow) {
  StartServer();
  ExpectVmVerifies({"--workload", "sequential", "--verify"}, "before");
  const std::string path = snapshot_->path();
  std::vector<uint8_t> page(kPageSize4K);
  {
    // Fill every hole with data, in place.
    UniqueFd fd(open(path.c_str(), O_WRONLY | O_CLOEXEC));
    ASSERT_TRUE(fd.valid());
    for (uint64_t p = 0; p < snapshot_->pages(); ++p) {
      if (!snapshot_->hole(p)) continue;
      testutil::FillSnapshotPage(p, page.data());
      ASSERT_EQ(pwrite(fd.get(), page.data(), page.size(), static_cast<off_t>(p * kPageSize4K)),
                static_cast<ssize_t>(page.size()));
    }
  }
  ExpectVmVerifies({"--workload", "sequential", "--verify"}, "filled");
  EXPECT_NE(server_->WaitForLine({"memory file", "changed"}, 20s), "") << server_->Output();
  {
    // Truncate and grow it again, with data where the first holes were and holes elsewhere.
    UniqueFd fd(open(path.c_str(), O_WRONLY | O_CLOEXEC));
    ASSERT_TRUE(fd.valid());
    ASSERT_EQ(ftruncate(fd.get(), 0), 0);
    ASSERT_EQ(ftruncate(fd.get(), static_cast<off_t>(snapshot_->size())), 0);
    for (uint64_t p = 0; p < snapshot_->pages(); p += 3) {
      testutil::FillSnapshotPage(p, page.data());
      ASSERT_EQ(pwrite(fd.get(), page.data(), page.size(), static_cast<off_t>(p * kPageSize4K)),
                static_cast<ssize_t>(page.size()));
    }
  }
  ExpectVmVerifies({"--workload", "random", "--threads", "2", "--verify"}, "regrown");
  {
    // Shrunk to half: a VM laid out for the whole file is refused, one for the half is served.
    UniqueFd fd(open(path.c_str(), O_WRONLY | O_CLOEXEC));
    ASSERT_TRUE(fd.valid());
    ASSERT_EQ(ftruncate(fd.get(), static_cast<off_t>(snapshot_->size() / 2)), 0);
  }
  BadClientMemory memory;
  const HandshakeRegion whole{memory.base(), snapshot_->size(), 0,           4096,
                              4096,          std::nullopt,      std::nullopt};
  auto sock = ConnectUnix(socket_);
  ASSERT_TRUE(sock.has_value()) << sock.error().ToString();
  int fds[] = {memory.uffd->fd()};
  ASSERT_TRUE(SendHandshake(sock->get(), std::span(&whole, 1), fds));
  EXPECT_TRUE(ClosedByPeer(sock->get(), 20s)) << "connection not closed";
  EXPECT_NE(server_->WaitForLine({"rejected", "beyond the end of the memory file"}, 20s), "")
      << server_->Output();
  ExpectVmVerifies({"--workload", "sequential", "--verify"}, "half");
  EXPECT_EQ(server_->Wait(0ms), std::nullopt) << "the daemon must still be running";
}

// --- bad clients -------------------------------------------------------------------------------

TEST_F(ServeE2eTest, MalformedHandshakesAreRejectedWhileAGoodVmCompletes) {
  StartServer({"--handshake-timeout-ms", "1500"});
  auto good = StartVm("good", {"--workload", "random", "--threads", "2", "--verify"});
  BadClientMemory memory;
  const uint64_t file = snapshot_->size();
  auto region = [&](uint64_t addr, uint64_t size, uint64_t offset, uint64_t page) {
    return HandshakeRegion{addr, size, offset, page, page, std::nullopt, std::nullopt};
  };
  struct Case {
    std::string name;
    std::string expected_reason;  // a fragment of the logged reason
    std::function<void(int sock)> send;
  };
  std::vector<Case> cases = {
      {"garbage", "JSON", [&](int s) { SendRaw(s, "this is not json", memory.uffd->fd()); }},
      {"byte order mark", "byte order mark",
       [&](int s) {
         SendRaw(
             s,
             "\xEF\xBB\xBF" + EncodeHandshake(std::vector{region(memory.base(), 1 << 20, 0, 4096)}),
             memory.uffd->fd());
       }},
      {"truncated", "truncated",
       [&](int s) {
         SendRaw(s, R"([{"base_host_virt_addr":1234,"size":4096)", memory.uffd->fd());
       }},
      {"no descriptor", "descriptor",
       [&](int s) {
         SendRaw(s, EncodeHandshake(std::vector{region(memory.base(), 1 << 20, 0, 4096)}));
       }},
      {"unaligned", "align",
       [&](int s) {
         auto r = std::vector{region(memory.base() + 100, 1 << 20, 0, 4096)};
         int fds[] = {memory.uffd->fd()};
         ASSERT_TRUE(SendHandshake(s, r, fds));
       }},
      {"overlapping", "overlap",
       [&](int s) {
         auto r = std::vector{region(memory.base(), 2 << 20, 0, 4096),
                              region(memory.base() + (1 << 20), 2 << 20, 2 << 20, 4096)};
         int fds[] = {memory.uffd->fd()};
         ASSERT_TRUE(SendHandshake(s, r, fds));
       }},
      {"outside the file", "file",
       [&](int s) {
         auto r = std::vector{region(memory.base(), 4 << 20, file, 4096)};
         int fds[] = {memory.uffd->fd()};
         ASSERT_TRUE(SendHandshake(s, r, fds));
       }},
      {"bad page size", "page",
       [&](int s) {
         auto r = std::vector{region(memory.base(), 1 << 20, 0, 8192)};
         int fds[] = {memory.uffd->fd()};
         ASSERT_TRUE(SendHandshake(s, r, fds));
       }},
      {"not a uffd", "userfaultfd",
       [&](int s) {
         auto r = std::vector{region(memory.base(), 1 << 20, 0, 4096)};
         int fds[] = {STDERR_FILENO};
         ASSERT_TRUE(SendHandshake(s, r, fds));
       }},
      {"silent", "", [&](int) { std::this_thread::sleep_for(2500ms); }},
  };
  for (const Case& c : cases) {
    SCOPED_TRACE(c.name);
    auto sock = ConnectUnix(socket_);
    ASSERT_TRUE(sock.has_value()) << sock.error().ToString();
    c.send(sock->get());
    if (c.name != "truncated" && c.name != "silent") {
      // The daemon closes the connection: we see EOF.
      EXPECT_TRUE(ClosedByPeer(sock->get(), 20s)) << "connection not closed";
    }
  }
  EXPECT_EQ(good->ExitCode(120s), 0) << good->Output() << "\nserve log:\n" << server_->Output();
  const std::string log = server_->Output();
  int rejected = 0;
  for (size_t pos = log.find("rejected"); pos != std::string::npos;
       pos = log.find("rejected", pos + 1)) {
    ++rejected;
  }
  EXPECT_EQ(rejected, static_cast<int>(cases.size())) << log;
  for (const Case& c : cases) {
    if (!c.expected_reason.empty()) {
      EXPECT_NE(log.find(c.expected_reason), std::string::npos) << c.name << ": reason not logged\n"
                                                                << log;
    }
  }
  EXPECT_EQ(server_->Wait(0ms), std::nullopt) << "the daemon must still be running";
}

// Regression: the page-state map of a secret-hiding VM was sized from the guest memory file the
// client sent, so a file ftruncate'd to 2^62 bytes aborted the daemon (bad_alloc) and one of 2^40
// cost 64 MiB per connection. The file must cover the regions and be no larger than the snapshot.
TEST_F(ServeE2eTest, GuestMemoryFileSizeIsCheckedAgainstTheSnapshot) {
  StartServer();
  BadClientMemory memory;
  struct Case {
    std::string name;
    uint64_t file_bytes;
    std::string expected_reason;
  };
  const std::vector<Case> cases = {
      {"2^62 bytes", uint64_t{1} << 62, "larger than the snapshot"},
      {"2^40 bytes", uint64_t{1} << 40, "larger than the snapshot"},
      {"one page more than the snapshot", snapshot_->size() + 4096, "larger than the snapshot"},
      {"shorter than the regions", 4096, "does not cover"},
  };
  for (const Case& c : cases) {
    SCOPED_TRACE(c.name);
    UniqueFd guest_memfd(memfd_create("hostile-guest-memory", MFD_CLOEXEC));
    UniqueFd bitmap(memfd_create("hostile-bitmap", MFD_CLOEXEC));
    ASSERT_TRUE(guest_memfd.valid() && bitmap.valid());
    ASSERT_EQ(ftruncate(guest_memfd.get(), static_cast<off_t>(c.file_bytes)), 0);
    ASSERT_EQ(ftruncate(bitmap.get(), 4096), 0);
    HandshakeRegion r{memory.base(), 1 << 20, 0, 4096, 4096, 0, true};
    auto sock = ConnectUnix(socket_);
    ASSERT_TRUE(sock.has_value()) << sock.error().ToString();
    int fds[] = {memory.uffd->fd(), guest_memfd.get(), bitmap.get()};
    ASSERT_TRUE(SendHandshake(sock->get(), std::span(&r, 1), fds));
    EXPECT_TRUE(ClosedByPeer(sock->get(), 20s)) << "connection not closed";
    EXPECT_NE(server_->WaitForLine({"rejected", c.expected_reason}, 20s), "") << server_->Output();
    ASSERT_EQ(server_->Wait(0ms), std::nullopt) << "the daemon died\n" << server_->Output();
  }
  ExpectVmVerifies({"--secret-hiding", "--workload", "random", "--threads", "2", "--verify"});
}

}  // namespace
}  // namespace guestmem::e2e
