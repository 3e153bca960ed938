// End-to-end: the real `gmem serve` daemon serving Firecracker's secret-hiding restores, played by
// real `gmem vmm-sim --secret-hiding` processes (docs/secret-hiding.md) and, where a test needs
// to say exactly what goes on the wire, by a client in the test built from the same simulated VM
// (a guest memory file registered MISSING|MINOR, the userfault bitmap, message 2, frames).
//
// Every path a page can take is covered, each verified byte for byte: Firecracker's own accesses
// through its registered mapping (uffd MISSING and MINOR faults), vCPU faults as FaultRequest
// frames on the Uffd socket (sync) and on the APF socket, exitless APF rings; many VMs over all of
// them at once; a VMM killed mid-restore and a VMM that sends a garbage frame, each of which costs
// only its own VM; and fault-all, whose background fill clears every bit so that no vCPU exits.
#include <gtest/gtest.h>
#include <poll.h>
#include <sys/socket.h>
#include <unistd.h>

#include <chrono>
#include <cstdint>
#include <fstream>
#include <memory>
#include <nlohmann/json.hpp>
#include <optional>
#include <sstream>
#include <string>
#include <vector>

#include "guestmem/apf_control.h"
#include "guestmem/vcpu_fault_frames.h"
#include "serve_fixture.h"
#include "sim/guest_vm.h"
#include "testutil/snapshot_file.h"
#include "testutil/subprocess.h"
#include "testutil/test_vm.h"

namespace guestmem::e2e {
namespace {

// What `vmm-sim --json` printed: its last line that is a JSON object.
nlohmann::json VmReport(const Subprocess& vm) {
  std::istringstream lines(vm.Output());
  nlohmann::json report;
  for (std::string line; std::getline(lines, line);) {
    if (!line.empty() && line.front() == '{') report = nlohmann::json::parse(line, nullptr, false);
  }
  return report;
}

// The number after `label` in `line` ("missing " in "faults=9 (missing 5, minor 4"), or -1.
int64_t NumberAfter(const std::string& line, const std::string& label) {
  const size_t at = line.find(label);
  if (at == std::string::npos) return -1;
  size_t end = at + label.size();
  int64_t value = -1;
  while (end < line.size() && line[end] >= '0' && line[end] <= '9') {
    value = (value < 0 ? 0 : value * 10) + (line[end++] - '0');
  }
  return value;
}

class ServeSecretHidingTest : public ServeTest {
 protected:
  // Runs one secret-hiding VM to its end and returns its report; it must pass.
  nlohmann::json RunVm(const std::string& name, std::vector<std::string> extra) {
    std::vector<std::string> args = {"--secret-hiding", "--verify", "--json"};
    args.insert(args.end(), extra.begin(), extra.end());
    auto vm = StartVm(name, args);
    EXPECT_EQ(vm->ExitCode(120s), 0) << name << ":\n"
                                     << vm->Output() << "\nserve log:\n"
                                     << server_->Output();
    nlohmann::json report = VmReport(*vm);
    EXPECT_TRUE(report.is_object()) << vm->Output();
    if (!report.is_object()) return nlohmann::json::object();
    EXPECT_EQ(report["mismatches"], 0) << report.dump();
    EXPECT_EQ(report["bits_left_set"], 0) << report.dump();
    EXPECT_EQ(report["vcpu_faults"]["violations"], 0) << report.dump();
    EXPECT_EQ(report["vcpu_faults"]["answered_with_bit_set"], 0) << report.dump();
    return report;
  }

  // Lets `vm`, held by --start-when `go` while its memory was filled, run: it must pass with every
  // byte verified, every bit clear and no vCPU fault.
  void ExpectFilledVmNeedsNoVcpuFault(Subprocess& vm, const std::string& go) {
    std::ofstream(go).put('x');
    ASSERT_EQ(vm.ExitCode(120s), 0) << vm.Output() << "\nserve log:\n" << server_->Output();
    const nlohmann::json report = VmReport(vm);
    EXPECT_EQ(report["mismatches"], 0) << report.dump();
    EXPECT_EQ(report["bits_left_set"], 0) << report.dump();
    EXPECT_EQ(report["vcpu_faults"].value("sync", int64_t{-1}), 0) << report.dump();
    EXPECT_EQ(report["vcpu_faults"]["violations"], 0) << report.dump();
  }

  // The daemon's end-of-VM line for the VM numbered `n`.
  std::string VmEnd(int n) {
    const std::string line = WaitForVmEnd("vm " + std::to_string(n) + " (");
    EXPECT_FALSE(line.empty()) << server_->Output();
    return line;
  }
};

// Firecracker's VMM threads (device emulation) touch guest memory through the mapping it
// registered MISSING|MINOR: pages nobody populated yet are missing faults (content installed, bit
// cleared), pages the vCPUs' faults put into the guest memory file are minor faults (only mapped).
TEST_F(ServeSecretHidingTest, VmmThreadsAreServedByMissingAndMinorFaults) {
  StartServer();
  const nlohmann::json report =
      RunVm("vm", {"--threads", "2", "--vmm-threads", "2", "--workload", "random"});
  EXPECT_GT(report.value("vmm_pages", 0), 0) << report.dump();
  EXPECT_GT(report.value("vcpu_pages", 0), 0) << report.dump();
  const std::string end = VmEnd(1);
  EXPECT_GT(NumberAfter(end, "missing "), 0) << end;
  EXPECT_GT(NumberAfter(end, "minor "), 0) << end;
  EXPECT_GT(NumberAfter(end, "continued "), 0) << end;
  EXPECT_EQ(NumberAfter(end, "copied "), 0) << "content goes into the guest memory file\n" << end;
}

// VMM threads alone: every page they touch is a missing fault of the registered mapping.
TEST_F(ServeSecretHidingTest, VmmThreadsAloneNeedNoVcpuFault) {
  StartServer();
  const nlohmann::json report =
      RunVm("vm", {"--threads", "0", "--vmm-threads", "3", "--workload", "sequential"});
  EXPECT_EQ(report["vcpu_faults"]["sync"], 0) << report.dump();
  const std::string end = VmEnd(1);
  EXPECT_GT(NumberAfter(end, "missing "), 0) << end;
  EXPECT_EQ(end.find("guest faults "), std::string::npos) << end;
}

// Synchronous vCPU faults: FaultRequest frames on the Uffd socket, each answered with a FaultReply
// after the page is in the guest memory file and its bit is clear.
TEST_F(ServeSecretHidingTest, SyncVcpuFaultsOnTheSocket) {
  StartServer();
  const nlohmann::json report =
      RunVm("vm", {"--vcpu-faults", "sync", "--threads", "3", "--vmm-threads", "0", "--workload",
                   "random", "--regions", "3"});
  EXPECT_GT(report["vcpu_faults"].value("sync", 0), 0) << report.dump();
  EXPECT_EQ(report["vcpu_faults"]["apf"], 0);
  EXPECT_EQ(report["vcpu_faults"]["exitless"], 0);
  const std::string end = VmEnd(1);
  EXPECT_GT(NumberAfter(end, "vCPU faults: socket "), 0) << end;
  EXPECT_NE(end.find("service (request read to reply written) p50 "), std::string::npos) << end;
  EXPECT_NE(server_->FindLine({"vm 1 (", "message 2: no exitless APF"}), "") << server_->Output();
}

// Async faults Firecracker could not make exitless: frames on the APF socket beside the Uffd
// socket (--apf), paired with their VM, answered there with the gpa echoed.
TEST_F(ServeSecretHidingTest, ApfSocketFaults) {
  StartServer({"--apf"});
  const nlohmann::json report = RunVm("vm", {"--vcpu-faults", "apf", "--threads", "2",
                                             "--vmm-threads", "1", "--workload", "random"});
  EXPECT_TRUE(report.value("apf_socket", false)) << report.dump();
  EXPECT_GT(report["vcpu_faults"].value("apf", 0), 0) << report.dump();
  const std::string end = VmEnd(1);
  EXPECT_GT(NumberAfter(end, "APF "), 0) << end;
}

// Without --apf nobody listens on the APF socket: the VM goes on without it, as Firecracker does,
// and its vCPU faults take the synchronous path.
TEST_F(ServeSecretHidingTest, WithoutTheApfSocketVcpuFaultsTakeTheSocket) {
  StartServer();
  const nlohmann::json report =
      RunVm("vm", {"--vcpu-faults", "apf", "--threads", "2", "--workload", "random"});
  EXPECT_FALSE(report.value("apf_socket", true)) << report.dump();
  EXPECT_GT(report["vcpu_faults"].value("sync", 0), 0) << report.dump();
  EXPECT_EQ(report["vcpu_faults"]["apf"], 0);
}

// Exitless APF: message 2 announces each vCPU's rings (notify eventfd, complete eventfd, the ring
// page); the daemon drains notifications, populates, pushes completions and re-arms.
TEST_F(ServeSecretHidingTest, ExitlessApfRings) {
  StartServer({"--apf"});
  const nlohmann::json report =
      RunVm("vm", {"--vcpu-faults", "exitless", "--threads", "3", "--vmm-threads", "1",
                   "--workload", "random", "--access", "mixed"});
  EXPECT_TRUE(report.value("exitless", false)) << report.dump();
  EXPECT_GT(report["vcpu_faults"].value("exitless", 0), 0) << report.dump();
  EXPECT_NE(server_->WaitForLine({"vm 1 (", "exitless APF rings for 3 vCPU(s)"}), "")
      << server_->Output();
  const std::string end = VmEnd(1);
  EXPECT_GT(NumberAfter(end, "exitless "), 0) << end;
}

// Many VMs at once, over every path and beside a VM of the plain Uffd protocol.
TEST_F(ServeSecretHidingTest, ManyVmsAtOnceOverEveryPath) {
  StartServer({"--apf"});
  const std::vector<std::vector<std::string>> specs = {
      {"--secret-hiding", "--vcpu-faults", "sync", "--threads", "2"},
      {"--secret-hiding", "--vcpu-faults", "apf", "--threads", "2"},
      {"--secret-hiding", "--vcpu-faults", "exitless", "--threads", "2"},
      {"--secret-hiding", "--vcpu-faults", "mixed", "--threads", "3", "--regions", "2"},
      {"--secret-hiding", "--threads", "0", "--vmm-threads", "2"},
      {"--threads", "2"},  // not secret hiding
  };
  std::vector<std::unique_ptr<Subprocess>> vms;
  for (size_t i = 0; i < specs.size(); ++i) {
    std::vector<std::string> args = specs[i];
    args.insert(args.end(), {"--workload", i % 2 ? "random" : "sparse", "--seed",
                             std::to_string(i + 1), "--verify"});
    vms.push_back(StartVm("vm" + std::to_string(i), args));
  }
  for (size_t i = 0; i < vms.size(); ++i) {
    EXPECT_EQ(vms[i]->ExitCode(120s), 0) << "vm" << i << ":\n"
                                         << vms[i]->Output() << "\nserve log:\n"
                                         << server_->Output();
    EXPECT_NE(vms[i]->Output().find("every byte matches"), std::string::npos) << vms[i]->Output();
  }
}

// A VMM killed while its vCPUs and VMM threads fault (or, on a fast day, just after, holding its
// memory): the daemon ends that VM alone, with what it had taken from it, and the VMs restoring
// beside it complete byte for byte.
TEST_F(ServeSecretHidingTest, AVmmKilledMidRestoreCostsOnlyItsOwnVm) {
  StartServer({"--apf"});
  auto doomed = StartVm(
      "doomed", {"--secret-hiding", "--vcpu-faults", "mixed", "--threads", "4", "--vmm-threads",
                 "2", "--workload", "random", "--pages", "1000000", "--hold-ms", "600000"});
  const std::string pid = "pid " + std::to_string(doomed->pid());
  ASSERT_NE(server_->WaitForLine({pid, "message 2: exitless APF rings"}, 60s), "")
      << server_->Output();
  std::vector<std::unique_ptr<Subprocess>> others;
  for (const char* path : {"sync", "apf", "exitless"}) {
    others.push_back(StartVm(std::string("other-") + path,
                             {"--secret-hiding", "--vcpu-faults", path, "--threads", "2",
                              "--vmm-threads", "1", "--workload", "random", "--verify"}));
  }
  doomed->Signal(SIGKILL);
  EXPECT_EQ(doomed->ExitCode(10s), -SIGKILL);
  EXPECT_NE(WaitForVmEnd(pid, 30s), "") << server_->Output();
  for (auto& vm : others) {
    EXPECT_EQ(vm->ExitCode(120s), 0) << vm->Output() << "\nserve log:\n" << server_->Output();
  }
  RunVm("after", {"--vcpu-faults", "mixed", "--threads", "2", "--workload", "sparse"});
  EXPECT_EQ(server_->Wait(0ms), std::nullopt) << "the daemon must still be running";
}

// The second restore of a snapshot: the pages the first VM had populated are its working set,
// put into the second VM's guest memory file (bits cleared) right after its message 2, so that
// its vCPUs, doing what the first one's did, hardly exit. The workload waits until the daemon says
// the working set is in, so that the count does not depend on who is faster.
TEST_F(ServeSecretHidingTest, TheSecondRestoreOfASnapshotNeedsFewVcpuFaults) {
  StartServer();
  const std::vector<std::string> workload = {"--vcpu-faults", "sync", "--threads",  "2",
                                             "--vmm-threads", "1",    "--workload", "sparse",
                                             "--seed",        "3"};
  const nlohmann::json first = RunVm("first", workload);
  const int64_t first_faults = first["vcpu_faults"].value("sync", int64_t{0});
  ASSERT_GT(first_faults, 0) << first.dump();
  VmEnd(1);
  const std::string go = dir_ + "/go";
  std::vector<std::string> args = {"--secret-hiding", "--verify", "--json", "--start-when", go};
  args.insert(args.end(), workload.begin(), workload.end());
  auto second = StartVm("second", args);
  ASSERT_NE(server_->WaitForLine({"vm 2 (", "working set in: "}, 60s), "") << server_->Output();
  std::ofstream(go).put('x');
  ASSERT_EQ(second->ExitCode(120s), 0) << second->Output() << "\nserve log:\n" << server_->Output();
  const nlohmann::json report = VmReport(*second);
  EXPECT_EQ(report["mismatches"], 0) << report.dump();
  EXPECT_EQ(report["bits_left_set"], 0) << report.dump();
  const int64_t second_faults = report["vcpu_faults"].value("sync", int64_t{-1});
  EXPECT_GE(second_faults, 0) << report.dump();
  EXPECT_LE(second_faults * 10, first_faults)
      << "first restore " << first_faults << " vCPU faults, second " << second_faults;
}

// --fill background with secret hiding: the fill waits for message 2 (Firecracker sets every bit
// after message 1), follows the working set learned from the first restore, and puts every page
// into the guest memory file with its bit cleared: the guest, let go after it, takes no vCPU
// fault at all.
TEST_F(ServeSecretHidingTest, BackgroundFillFollowsTheWorkingSetAndLeavesNoVcpuFault) {
  StartServer({"--fill", "background", "--fill-rate-mib", "256"});
  const std::vector<std::string> workload = {"--threads", "2",      "--workload",
                                             "sparse",    "--seed", "3"};
  // The first restore teaches its working set (it ends before its fill can).
  RunVm("first", workload);
  VmEnd(1);
  const std::string go = dir_ + "/go";
  std::vector<std::string> args = {"--secret-hiding", "--verify",  "--json",
                                   "--start-when",    go,          "--workload",
                                   "sequential",      "--threads", "2"};
  auto second = StartVm("second", args);
  ASSERT_NE(server_->WaitForLine({"vm 2 (", ": fill done: "}, 120s), "") << server_->Output();
  const std::string output = server_->Output();
  const size_t working_set = output.find("vm 2 (");
  EXPECT_LT(output.find("working set in: ", working_set), output.find(": fill done: ", working_set))
      << "the fill did not follow the working set:\n"
      << output;
  ExpectFilledVmNeedsNoVcpuFault(*second, go);
}

// A secret-hiding VM taken over after its message 2 has its background fill started by the
// successor at once (the message will not come again): it ends, and the guest takes no vCPU fault.
TEST_F(ServeSecretHidingTest, ABackgroundFillStartsAtOnceForAVmTakenOverAfterMessage2) {
  StartServer({"--fill", "background", "--fill-rate-mib", "1"});  // 32 MiB: half a minute
  const std::string go = dir_ + "/go";
  auto vm = StartVm("held", {"--secret-hiding", "--verify", "--json", "--start-when", go,
                             "--workload", "sequential", "--threads", "2"});
  ASSERT_NE(server_->WaitForLine({"vm 1 (", "message 2: "}, 60s), "") << server_->Output();
  server_->Signal(SIGKILL);
  EXPECT_EQ(server_->ExitCode(20s), -SIGKILL);
  StartServer({"--fill", "background", "--fill-rate-mib", "1024"});
  ASSERT_NE(server_->WaitForLine({"[taken over]", ": fill done: "}, 120s), "") << server_->Output();
  ExpectFilledVmNeedsNoVcpuFault(*vm, go);
}

// --no-learn: nothing is learned; the second restore faults as the first did.
TEST_F(ServeSecretHidingTest, WithoutWorkingSetsNothingIsPopulatedAhead) {
  StartServer({"--no-learn"});
  RunVm("first", {"--threads", "2", "--workload", "sparse", "--seed", "3"});
  VmEnd(1);
  RunVm("second", {"--threads", "2", "--workload", "sparse", "--seed", "3"});
  VmEnd(2);
  EXPECT_EQ(server_->FindLine({"working set"}), "") << server_->Output();
}

// --- a VMM written in the test --------------------------------------------------------------

// Firecracker's restore up to its first vCPU fault, in this process: message 1, every bit set,
// message 2 (no exitless rings); then frames written and read by hand.
class HandMadeVmm {
 public:
  explicit HandMadeVmm(uint64_t memory_bytes) {
    auto vm = sim::GuestVm::Create({.memory_bytes = memory_bytes, .secret_hiding = true});
    if (!vm && vm.error().code() == ErrorCode::kUnsupported) {
      skip_reason_ = vm.error().ToString();
      return;
    }
    EXPECT_TRUE(vm.has_value()) << vm.error().ToString();
    if (vm) vm_ = std::move(*vm);
  }
  const std::string& skip_reason() const { return skip_reason_; }
  sim::GuestVm& vm() { return *vm_; }

  void Restore(const std::string& socket) {
    ASSERT_TRUE(vm_->Connect(socket).has_value());
    vm_->FillUserfaultBitmap();
    ASSERT_TRUE(vm_->SendApfControl({}).has_value());
  }

  void SendBytes(std::span<const uint8_t> bytes) {
    ASSERT_EQ(send(vm_->socket_fd(), bytes.data(), bytes.size(), MSG_NOSIGNAL),
              static_cast<ssize_t>(bytes.size()));
  }

  // Asks for the page at `file_offset` as vCPU `vcpu` and waits for its reply.
  std::optional<FaultReply> FaultIn(uint32_t vcpu, uint64_t file_offset) {
    const FaultRequest request{.vcpu = vcpu,
                               .offset = 0,
                               .flags = kMemoryFaultUserfault,
                               .gpa = vm_->GuestPhys(file_offset)};
    SendBytes(EncodeFaultRequest(request).bytes());
    std::vector<uint8_t> got;
    const auto deadline = std::chrono::steady_clock::now() + 60s;
    while (std::chrono::steady_clock::now() < deadline) {
      auto size = FrameSize(got, kMaxFaultReplyPayload);
      EXPECT_TRUE(size.has_value()) << size.error().ToString();
      if (!size) return std::nullopt;
      if (size->has_value()) {
        auto reply = DecodeFaultReply(std::span(got).subspan(kFrameHeaderBytes));
        EXPECT_TRUE(reply.has_value()) << reply.error().ToString();
        if (!reply) return std::nullopt;
        // The minimal encoding Rust's derive writes, and nothing after it.
        EXPECT_EQ(EncodeFaultReply(*reply).size(), got.size());
        return *reply;
      }
      pollfd pfd{vm_->socket_fd(), POLLIN, 0};
      if (poll(&pfd, 1, 100) != 1) continue;
      uint8_t byte;
      if (recv(vm_->socket_fd(), &byte, 1, 0) != 1) return std::nullopt;  // one byte: no overread
      got.push_back(byte);
    }
    ADD_FAILURE() << "no reply within the deadline";
    return std::nullopt;
  }

 private:
  std::unique_ptr<sim::GuestVm> vm_;
  std::string skip_reason_;
};

// A VMM that sends a garbage frame after good ones: its connection is dropped with a logged
// protocol error, and the VMs restoring beside it are not disturbed.
TEST_F(ServeSecretHidingTest, AGarbageFrameDropsThatVmAloneWithAProtocolError) {
  StartServer({"--apf"});
  struct Garbage {
    std::string name;
    std::vector<uint8_t> bytes;
    std::string reason;
  };
  const std::vector<Garbage> cases = {
      // vcpu's header byte 0x07 is no width bitcode defines for a u32.
      {"bad integer header", {0x02, 0x00, 0x00, 0x00, 0x07, 0x00}, "vcpu"},
      {"a length no request can have", {0xa0, 0x0f, 0x00, 0x00, 0x04}, "payload bytes"},
      {"a byte after the request",
       {0x0a, 0x00, 0x00, 0x00, 0x04, 0x00, 0x06, 0x00, 0x06, 0x10, 0x01, 0x06, 0x00, 0xff},
       "trailing"},
  };
  std::vector<std::unique_ptr<Subprocess>> others;
  for (const char* path : {"sync", "exitless"}) {
    others.push_back(StartVm(std::string("other-") + path,
                             {"--secret-hiding", "--vcpu-faults", path, "--threads", "2",
                              "--workload", "random", "--verify"}));
  }
  for (const Garbage& g : cases) {
    SCOPED_TRACE(g.name);
    HandMadeVmm vmm(snapshot_->size());
    if (!vmm.skip_reason().empty()) GTEST_SKIP() << vmm.skip_reason();
    ASSERT_NO_FATAL_FAILURE(vmm.Restore(socket_));
    // A good frame first: answered, the page in the guest memory file, its bit clear.
    const uint64_t offset = 11 * kPageSize4K;
    std::optional<FaultReply> reply = vmm.FaultIn(3, offset);
    ASSERT_TRUE(reply.has_value());
    EXPECT_EQ(*reply, ReplyTo({.vcpu = 3,
                               .offset = 0,
                               .flags = kMemoryFaultUserfault,
                               .gpa = vmm.vm().GuestPhys(offset)}));
    EXPECT_FALSE(vmm.vm().UserfaultBitSet(offset));
    EXPECT_EQ(
        snapshot_->CheckPage(11, reinterpret_cast<const uint8_t*>(vmm.vm().KvmAddress(offset))),
        "");
    vmm.SendBytes(g.bytes);
    EXPECT_TRUE(ClosedByPeer(vmm.vm().socket_fd(), 20s)) << "connection not closed";
    const std::string dropped =
        server_->WaitForLine({"pid " + std::to_string(getpid()), "dropped: ", g.reason}, 20s);
    EXPECT_NE(dropped, "") << server_->Output();
    EXPECT_NE(dropped.find("protocol error"), std::string::npos) << dropped;
    ASSERT_EQ(server_->Wait(0ms), std::nullopt) << "the daemon died\n" << server_->Output();
  }
  for (auto& vm : others) {
    EXPECT_EQ(vm->ExitCode(120s), 0) << vm->Output() << "\nserve log:\n" << server_->Output();
  }
  RunVm("after", {"--vcpu-faults", "sync", "--threads", "2", "--workload", "sparse"});
}

// Fault-all: the first vCPU fault starts the background fill, which puts every page into the
// guest memory file and clears its bit after the content is in. Once it is done no page has its
// bit set, so the vCPUs never exit again; every page reads as the snapshot through the file.
TEST_F(ServeSecretHidingTest, FaultAllFillsTheFileAndClearsEveryBit) {
  StartServer({"--mode", "fault-all"});
  HandMadeVmm vmm(snapshot_->size());
  if (!vmm.skip_reason().empty()) GTEST_SKIP() << vmm.skip_reason();
  ASSERT_NO_FATAL_FAILURE(vmm.Restore(socket_));
  ASSERT_TRUE(vmm.FaultIn(0, 5 * kPageSize4K).has_value());
  ASSERT_TRUE(server_->WaitForOutput("Finished Faulting All: ", 120s)) << server_->Output();
  uint64_t set = 0;
  uint64_t differ = 0;
  for (uint64_t p = 0; p < snapshot_->pages(); ++p) {
    set += vmm.vm().UserfaultBitSet(p * kPageSize4K) ? 1 : 0;
    const auto* page = reinterpret_cast<const uint8_t*>(vmm.vm().KvmAddress(p * kPageSize4K));
    differ += snapshot_->CheckPage(p, page).empty() ? 0 : 1;
  }
  EXPECT_EQ(set, 0u) << "pages whose vCPU access would still exit";
  EXPECT_EQ(differ, 0u);
  // And a vCPU fault that comes anyway (a reply raced the fill) is still answered.
  std::optional<FaultReply> reply = vmm.FaultIn(1, 100 * kPageSize4K);
  ASSERT_TRUE(reply.has_value());
  EXPECT_EQ(reply->vcpu, 1u);
}

// The background fill of a secret-hiding VM starts at its message 2, not at its handshake:
// Firecracker sets every bit after message 1, so the bits of pages filled before it would stay
// set although their content is in. Here the fill's first burst (2 MiB, then 1 MiB/s) comes after
// the bits are set, and clears them.
TEST_F(ServeSecretHidingTest, ABackgroundFillStartsAtMessage2) {
  StartServer({"--fill", "background", "--fill-rate-mib", "1"});
  HandMadeVmm vmm(snapshot_->size());
  if (!vmm.skip_reason().empty()) GTEST_SKIP() << vmm.skip_reason();
  ASSERT_TRUE(vmm.vm().Connect(socket_).has_value());
  // Served from here on: a fill that did not wait would have its burst in by now.
  ASSERT_NE(server_->WaitForLine({"vm 1 (", " connected: "}, 60s), "") << server_->Output();
  vmm.vm().FillUserfaultBitmap();
  ASSERT_TRUE(vmm.vm().SendApfControl({}).has_value());
  constexpr uint64_t kBurstPages = kHugePageSize2M / kPageSize4K;
  auto bits_set = [&] {
    uint64_t set = 0;
    for (uint64_t p = 0; p < kBurstPages; ++p) {
      set += vmm.vm().UserfaultBitSet(p * kPageSize4K) ? 1 : 0;
    }
    return set;
  };
  EXPECT_TRUE(testutil::WaitUntil([&] { return bits_set() == 0; }, 60s))
      << bits_set() << " of the first " << kBurstPages << " pages kept their bit set";
  for (uint64_t p = 0; p < kBurstPages; ++p) {
    const auto* page = reinterpret_cast<const uint8_t*>(vmm.vm().KvmAddress(p * kPageSize4K));
    ASSERT_EQ(snapshot_->CheckPage(p, page), "") << p;
  }
}

}  // namespace
}  // namespace guestmem::e2e
