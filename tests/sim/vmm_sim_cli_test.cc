// `gmem vmm-sim` and `gmem snapshot create` as a user runs them: real processes, a real socket,
// and a small test handler (not the real daemon) serving the simulated VM's faults.
#include <gtest/gtest.h>
#include <poll.h>
#include <sys/stat.h>
#include <unistd.h>

#include <chrono>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <memory>
#include <nlohmann/json.hpp>
#include <string>
#include <vector>

#include "base/temp_dir.h"
#include "guestmem/unix_socket.h"
#include "guestmem/vcpu_fault_frames.h"
#include "sim/test_fault_server.h"
#include "sim/trace.h"
#include "snapshot_maker.h"
#include "testutil/subprocess.h"

namespace guestmem {
namespace {

using namespace std::chrono_literals;
using sim::testutil::TestFaultServer;
using sim::testutil::TestFaultServerOptions;
using testutil::Subprocess;

constexpr uint64_t kMiB = 1 << 20;
constexpr uint64_t kMemory = 8 * kMiB;

class VmmSimCliTest : public ::testing::Test {
 protected:
  void SetUp() override {
    ASSERT_FALSE(dir_.empty());
    ASSERT_TRUE(cli::MakeSnapshot(mem_, {.size_bytes = kMemory, .seed = 4}));
    auto listener = ListenUnix(socket_);
    ASSERT_TRUE(listener.has_value()) << listener.error().ToString();
    listener_ = std::move(*listener);
  }
  void TearDown() override { server_.reset(); }

  std::unique_ptr<Subprocess> Start(std::vector<std::string> extra, const std::string& log) {
    std::vector<std::string> argv = {GMEM_BINARY, "vmm-sim",    "--socket",
                                     socket_,     "--mem-file", mem_};
    argv.insert(argv.end(), extra.begin(), extra.end());
    return std::make_unique<Subprocess>(argv, dir_ + "/" + log);
  }

  // Starts vmm-sim, serves it with a test handler and waits for it to exit.
  int Run(std::vector<std::string> extra, TestFaultServerOptions options = {},
          const std::string& log = "vm.log") {
    auto vm = Start(std::move(extra), log);
    options.mem_file = mem_;
    auto server = TestFaultServer::AcceptAndStart(listener_.get(), options);
    EXPECT_TRUE(server.has_value()) << server.error().ToString() << "\n" << vm->Output();
    if (server) server_ = std::move(*server);
    const int code = vm->ExitCode(120s);
    output_ = vm->Output();
    return code;
  }

  // The JSON report: the last line of the output.
  nlohmann::json Report() const {
    std::string text = output_;
    while (!text.empty() && text.back() == '\n') text.pop_back();
    const size_t line = text.rfind('\n');
    return nlohmann::json::parse(line == std::string::npos ? text : text.substr(line + 1), nullptr,
                                 /*allow_exceptions=*/false);
  }

  bool SomebodyConnected() {
    pollfd p{listener_.get(), POLLIN, 0};
    return poll(&p, 1, 0) == 1;
  }

  TempDir temp_;
  const std::string dir_ = temp_.path();
  const std::string socket_ = dir_ + "/uffd.sock";
  std::string mem_ = dir_ + "/snapshot.mem";
  UniqueFd listener_;
  std::unique_ptr<TestFaultServer> server_;
  std::string output_;
};

TEST_F(VmmSimCliTest, VerifiedRunExitsZeroWithAJsonReport) {
  ASSERT_EQ(Run({"--regions", "2", "--workload", "random", "--threads", "2", "--access", "mixed",
                 "--verify", "--json"}),
            0)
      << output_;
  const nlohmann::json j = Report();
  ASSERT_TRUE(j.is_object()) << output_;
  EXPECT_EQ(j["workload"], "random");
  EXPECT_EQ(j["access"], "mixed");
  EXPECT_EQ(j["threads"], 2);
  EXPECT_EQ(j["regions"], 2);
  EXPECT_EQ(j["memory_bytes"], kMemory);
  EXPECT_EQ(j["page_size"], 4096);
  EXPECT_EQ(j["pages_touched"], kMemory / 4096);
  EXPECT_GT(j["pages_written"].get<uint64_t>(), 0u);
  EXPECT_EQ(j["verified"], true);
  EXPECT_EQ(j["mismatches"], 0);
  EXPECT_EQ(j["passed"], true);
  EXPECT_EQ(j["thread_ms"].size(), 2u);
  EXPECT_GT(j["elapsed_ms"].get<double>(), 0.0);
  EXPECT_EQ(server_->handshake().regions.size(), 2u);
  EXPECT_EQ(server_->handshake().fds.size(), 1u);
  server_->Stop();
  EXPECT_EQ(server_->error(), "");
  EXPECT_GT(server_->pages_served(), 0u);
}

TEST_F(VmmSimCliTest, CorruptPageExitsOneAndNamesTheOffset) {
  const uint64_t corrupt = 6 * kMiB + 5 * 4096 + 77;
  ASSERT_EQ(Run({"--workload", "sequential", "--threads", "2", "--verify", "--json"},
                {.corrupt_offset = corrupt}),
            1)
      << output_;
  const nlohmann::json j = Report();
  ASSERT_TRUE(j.is_object()) << output_;
  EXPECT_EQ(j["mismatches"], 1);
  EXPECT_EQ(j["first_mismatch"]["offset"], corrupt);
  EXPECT_EQ(j["passed"], false);
}

TEST_F(VmmSimCliTest, HumanSummaryNamesTheMismatch) {
  const uint64_t corrupt = 3 * kMiB + 12;
  ASSERT_EQ(Run({"--workload", "sequential", "--verify"}, {.corrupt_offset = corrupt}), 1)
      << output_;
  EXPECT_NE(output_.find("8 MiB of guest memory in 1 region(s) of 4 KiB pages"), std::string::npos)
      << output_;
  EXPECT_NE(output_.find("2048 page touches"), std::string::npos) << output_;
  EXPECT_NE(output_.find("1 page(s) DIFFER; first at offset 0x30000c"), std::string::npos)
      << output_;
}

TEST_F(VmmSimCliTest, TraceWorkloadReplaysTheTrace) {
  const std::vector<sim::TraceAccess> trace = {
      {0x1000, false, 0}, {0x7ff000, true, 0}, {0x1234, false, 0}, {0x400000, false, 0}};
  std::ofstream(dir_ + "/ws.trace") << "# working set\n" << sim::FormatTrace(trace);
  ASSERT_EQ(
      Run({"--workload", "trace:" + dir_ + "/ws.trace", "--threads", "2", "--verify", "--json"}), 0)
      << output_;
  const nlohmann::json j = Report();
  EXPECT_EQ(j["workload"], "trace");
  EXPECT_EQ(j["pages_touched"], 4);
  EXPECT_EQ(j["distinct_pages"], 3);
  EXPECT_EQ(j["pages_written"], 1);
  server_->Stop();
  EXPECT_EQ(server_->pages_served(), 3u);
}

TEST_F(VmmSimCliTest, BalloonedPagesReadAsZero) {
  ASSERT_EQ(Run({"--regions", "3", "--workload", "sparse", "--verify", "--balloon",
                 "0x100000:0x200000", "--json"}),
            0)
      << output_;
  const nlohmann::json j = Report();
  EXPECT_EQ(j["balloon"]["pages_checked"], 512);
  EXPECT_EQ(j["balloon"]["nonzero_pages"], 0);
}

// Firecracker's secret-hiding restore as the handler sees it: three descriptors, message 2, then
// FaultRequests for the vCPUs' pages (each echoed in its reply) beside the VMM's uffd faults.
TEST_F(VmmSimCliTest, SecretHidingPlaysFirecrackersRestore) {
  ASSERT_EQ(Run({"--secret-hiding", "--regions", "3", "--workload", "sparse", "--threads", "2",
                 "--vmm-threads", "1", "--verify", "--json"}),
            0)
      << output_;
  const nlohmann::json j = Report();
  EXPECT_EQ(j["secret_hiding"], true);
  EXPECT_EQ(j["mismatches"], 0);
  EXPECT_EQ(j["bits_left_set"], 0);
  EXPECT_EQ(j["vcpu_faults"]["violations"], 0) << j["vcpu_faults"]["first_violation"];
  EXPECT_GT(j["vcpu_faults"]["sync"].get<uint64_t>(), 0u);
  EXPECT_GT(j["vmm_pages"].get<uint64_t>(), 0u);
  server_->Stop();
  EXPECT_EQ(server_->error(), "");
  EXPECT_EQ(server_->handshake().fds.size(), 3u);
  EXPECT_EQ(server_->handshake().regions[2].is_guest_memfd, std::optional<bool>(true));
  EXPECT_EQ(server_->apf_control(), "no_exitless_apf");
  const std::vector<FaultRequest> requests = server_->requests();
  EXPECT_EQ(requests.size(), j["vcpu_faults"]["sync"].get<uint64_t>());
  for (const FaultRequest& r : requests) {
    EXPECT_LT(r.vcpu, 2u);
    EXPECT_EQ(r.offset, 0u);
    EXPECT_EQ(r.flags, 0x10u);
    ASSERT_TRUE(r.gpa.has_value());
    EXPECT_EQ(*r.gpa % 4096, 0u);
    bool in_region = false;
    for (const HandshakeRegion& region : server_->handshake().regions) {
      in_region |= *r.gpa >= *region.gpa_start && *r.gpa - *region.gpa_start < region.size;
    }
    EXPECT_TRUE(in_region) << Describe(r);
  }
}

// A handler that answers before it clears the page's bit: the vCPU finds the bit still set after
// each answer (on KVM it would exit again, for ever); vmm-sim reports it and fails.
TEST_F(VmmSimCliTest, AnswersBeforeTheBitIsClearedAreCaught) {
  EXPECT_EQ(Run({"--secret-hiding", "--workload", "sequential", "--pages", "4", "--threads", "1",
                 "--vmm-threads", "0", "--verify", "--json"},
                {.answer_before_clearing = true}),
            1)
      << output_;
  const nlohmann::json j = Report();
  EXPECT_GT(j["vcpu_faults"]["answered_with_bit_set"].get<uint64_t>(), 0u);
  EXPECT_EQ(j["stuck_pages"], 4);
  EXPECT_EQ(j["passed"], false);
}

TEST_F(VmmSimCliTest, SecretHidingRefusesABalloonAsFirecrackerDoes) {
  auto vm = Start({"--secret-hiding", "--balloon", "0:0x100000"}, "balloon.log");
  EXPECT_EQ(vm->ExitCode(60s), 2) << vm->Output();
  EXPECT_NE(vm->Output().find("refuses a balloon"), std::string::npos) << vm->Output();
}

TEST_F(VmmSimCliTest, BalloonThatStaysFullExitsOne) {
  ASSERT_EQ(Run({"--workload", "sequential", "--balloon", "0:0x800000", "--json"},
                {.ignore_remove = true}),
            1)
      << output_;
  const nlohmann::json j = Report();
  EXPECT_GT(j["balloon"]["nonzero_pages"].get<uint64_t>(), 0u);
  EXPECT_EQ(j["passed"], false);
}

TEST_F(VmmSimCliTest, HoldKeepsTheVmAndItsSocketAlive) {
  auto vm = Start({"--workload", "sequential", "--json", "--hold-ms", "2000"}, "held.log");
  auto server = TestFaultServer::AcceptAndStart(listener_.get(), {.mem_file = mem_});
  ASSERT_TRUE(server.has_value()) << server.error().ToString();
  ASSERT_TRUE(vm->WaitForOutput("\"passed\":true", 60s)) << vm->Output();
  EXPECT_EQ(vm->Wait(200ms), std::nullopt) << "vmm-sim must hold on";
  EXPECT_FALSE((*server)->PeerHungUp());
  EXPECT_EQ(vm->ExitCode(20s), 0) << vm->Output();
  EXPECT_TRUE((*server)->PeerHungUp());
}

TEST_F(VmmSimCliTest, BadInputExitsTwoBeforeConnecting) {
  std::ofstream(dir_ + "/bad.trace") << "r 0x1000\nr 0x2000\nz 0x3000\n";
  std::ofstream(dir_ + "/far.trace") << "r 0x1000\nw 0x900000\n";
  struct Case {
    std::vector<std::string> args;
    const char* message;
  };
  const Case cases[] = {
      {{"--workload", "trace:" + dir_ + "/bad.trace"}, "trace line 3: expected 'r' or 'w'"},
      {{"--workload", "trace:" + dir_ + "/far.trace"}, "trace line 2: offset 0x900000 is beyond"},
      {{"--workload", "trace:" + dir_ + "/none.trace"}, "none.trace"},
      {{"--workload", "zigzag"}, "--workload zigzag: expected"},
      {{"--balloon", "12"}, "--balloon 12: expected OFFSET:LENGTH"},
      {{"--balloon", "0x1000:lots"}, "'lots' is not a number"},
      {{"--balloon", "0x1000:0x100"}, "not aligned"},
      {{}, "open memory file"},  // with the memory file missing, below
  };
  const std::string real_mem = mem_;
  for (const Case& c : cases) {
    SCOPED_TRACE(c.message);
    mem_ = c.args.empty() ? dir_ + "/missing.mem" : real_mem;
    auto vm = Start(c.args, "bad.log");
    EXPECT_EQ(vm->ExitCode(30s), 2) << vm->Output();
    EXPECT_NE(vm->Output().find(c.message), std::string::npos) << vm->Output();
    EXPECT_FALSE(SomebodyConnected());
    std::filesystem::remove(dir_ + "/bad.log");
  }
}

TEST_F(VmmSimCliTest, NoHandlerExitsTwo) {
  std::filesystem::remove(socket_);
  auto vm = Start({"--json"}, "alone.log");
  EXPECT_EQ(vm->ExitCode(30s), 2) << vm->Output();
  output_ = vm->Output();
  const nlohmann::json j = Report();
  ASSERT_TRUE(j.is_object()) << output_;
  EXPECT_NE(j["error"].get<std::string>().find("uffd.sock"), std::string::npos) << output_;
}

TEST_F(VmmSimCliTest, SnapshotCreate) {
  const std::string path = dir_ + "/demo.mem";
  auto run = [&](std::vector<std::string> extra) {
    std::vector<std::string> argv = {GMEM_BINARY, "snapshot", "create", path};
    argv.insert(argv.end(), extra.begin(), extra.end());
    std::filesystem::remove(dir_ + "/create.log");
    Subprocess p(argv, dir_ + "/create.log");
    const int code = p.ExitCode(60s);
    output_ = p.Output();
    return code;
  };
  ASSERT_EQ(run({"--size-mib", "4", "--seed", "9"}), 0) << output_;
  EXPECT_NE(output_.find(path + ": 4194304 bytes, 1024 pages: "), std::string::npos) << output_;
  EXPECT_NE(output_.find("seed 9"), std::string::npos) << output_;
  EXPECT_EQ(std::count(output_.begin(), output_.end(), '\n'), 1) << "one line";
  EXPECT_EQ(std::filesystem::file_size(path), 4 * kMiB);

  EXPECT_EQ(run({"--size-mib", "4"}), 1) << output_;
  EXPECT_NE(output_.find("already exists"), std::string::npos) << output_;
  EXPECT_EQ(run({"--size-bytes", "8192", "--force"}), 0) << output_;
  EXPECT_EQ(std::filesystem::file_size(path), 8192u);
  EXPECT_EQ(run({}), 1) << output_;
  EXPECT_NE(output_.find("--size-mib or --size-bytes"), std::string::npos) << output_;
  EXPECT_NE(run({"--size-mib", "4", "--zero", "0.9"}), 0) << output_;
  EXPECT_NE(output_.find("add up to"), std::string::npos) << output_;
}

}  // namespace
}  // namespace guestmem
