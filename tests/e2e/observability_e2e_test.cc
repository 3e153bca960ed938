// `gmem serve` seen from outside, as an operator's host sees it: Debian's real Prometheus scrapes
// its --metrics while it restores VMs and finds their fault counters; promtool finds nothing to
// say about the exposition; `gmem status` lists the live VMs over the control socket; and a
// daemon started by systemd-socket-activate (socket activation, sd_notify) restores a VM.
#include <arpa/inet.h>
#include <gtest/gtest.h>
#include <httplib.h>
#include <netinet/in.h>
#include <poll.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <unistd.h>

#include <fstream>
#include <nlohmann/json.hpp>
#include <string>
#include <vector>

#include "guestmem/unix_socket.h"
#include "serve_fixture.h"
#include "testutil/test_vm.h"

namespace guestmem::e2e {
namespace {

using testutil::ReadFile;
using testutil::WaitUntil;

bool Executable(const std::string& path) { return access(path.c_str(), X_OK) == 0; }

// A port nobody listens on now: bound to 127.0.0.1:0, read back, closed.
int FreePort() {
  const int fd = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
  sockaddr_in addr{};
  addr.sin_family = AF_INET;
  addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  socklen_t len = sizeof(addr);
  if (bind(fd, reinterpret_cast<sockaddr*>(&addr), sizeof(addr)) != 0 ||
      getsockname(fd, reinterpret_cast<sockaddr*>(&addr), &len) != 0) {
    close(fd);
    return -1;
  }
  close(fd);
  return ntohs(addr.sin_port);
}

// "... metrics at http://127.0.0.1:PORT/metrics" -> PORT.
int MetricsPort(const std::string& line) {
  const std::string marker = "http://127.0.0.1:";
  const size_t at = line.find(marker);
  if (at == std::string::npos) return -1;
  return std::stoi(line.substr(at + marker.size()));
}

class ObservabilityTest : public ServeTest {
 protected:
  // Starts the daemon with --metrics on a free port and returns that port.
  int StartWithMetrics(std::vector<std::string> extra = {}) {
    extra.insert(extra.end(), {"--metrics", "127.0.0.1:0"});
    StartServer(extra);
    if (HasFatalFailure()) return -1;
    return MetricsPort(server_->WaitForLine({"metrics at http://"}));
  }

  static std::string Scrape(int port) {
    httplib::Client client("127.0.0.1", port);
    client.set_read_timeout(10, 0);
    auto response = client.Get("/metrics");
    return response && response->status == 200 ? response->body : "";
  }

  // A VM that restores a few hundred random pages and stays connected.
  std::unique_ptr<Subprocess> StartHeldVm(const std::string& name) {
    return StartVm(name,
                   {"--workload", "random", "--pages", "300", "--verify", "--hold-ms", "600000"});
  }
};

TEST_F(ObservabilityTest, PrometheusScrapesTheFaultCountersOfTheVmsBeingRestored) {
  if (!Executable("/usr/bin/prometheus"))
    GTEST_SKIP() << "no /usr/bin/prometheus (Debian's prometheus)";
  const int port = StartWithMetrics();
  ASSERT_GT(port, 0) << server_->Output();
  auto vm1 = StartHeldVm("vm1");
  auto vm2 = StartHeldVm("vm2");
  for (auto* vm : {vm1.get(), vm2.get()}) {
    ASSERT_FALSE(server_->WaitForLine({"(pid " + std::to_string(vm->pid()), " connected"}).empty())
        << server_->Output();
  }

  const int prometheus_port = FreePort();
  ASSERT_GT(prometheus_port, 0);
  const std::string config = dir_ + "/prometheus.yml";
  std::ofstream(config) << "global:\n  scrape_interval: 1s\n  scrape_timeout: 1s\n"
                        << "scrape_configs:\n  - job_name: gmem\n    static_configs:\n"
                        << "      - targets: ['127.0.0.1:" << port << "']\n";
  Subprocess prometheus(
      {"/usr/bin/prometheus", "--config.file=" + config, "--storage.tsdb.path=" + dir_ + "/tsdb",
       "--web.listen-address=127.0.0.1:" + std::to_string(prometheus_port)},
      dir_ + "/prometheus.log");
  ASSERT_TRUE(prometheus.WaitForOutput("Server is ready to receive web requests", 120s))
      << prometheus.Output();

  // Each VM's missing faults, as Prometheus' HTTP API reports them once it has scraped.
  httplib::Client api("127.0.0.1", prometheus_port);
  api.set_read_timeout(10, 0);
  nlohmann::json result;
  auto faults_of = [&](pid_t pid) -> double {
    for (const nlohmann::json& series : result) {
      if (series["metric"].value("pid", "") == std::to_string(pid)) {
        return std::stod(series["value"][1].get<std::string>());
      }
    }
    return -1;
  };
  const bool found = WaitUntil(
      [&] {
        auto response =
            api.Get("/api/v1/query?query=" +
                    httplib::detail::encode_query_param("gmem_vm_faults_total{kind=\"missing\"}"));
        if (!response || response->status != 200) return false;
        const nlohmann::json body = nlohmann::json::parse(response->body, nullptr, false);
        if (body.is_discarded() || body.value("status", "") != "success") return false;
        result = body["data"]["result"];
        return faults_of(vm1->pid()) > 0 && faults_of(vm2->pid()) > 0;
      },
      120s);
  ASSERT_TRUE(found) << "Prometheus' answer: " << result.dump() << "\n" << prometheus.Output();
  for (const nlohmann::json& series : result) {
    EXPECT_EQ(series["metric"]["job"], "gmem");
    EXPECT_EQ(series["metric"]["snapshot"], snapshot_->path());
  }
  // The daemon-wide total is there too, and at least the sum of the two.
  auto total = api.Get("/api/v1/query?query=" + httplib::detail::encode_query_param(
                                                    "sum(gmem_faults_total{kind=\"missing\"})"));
  ASSERT_TRUE(total);
  const nlohmann::json body = nlohmann::json::parse(total->body, nullptr, false);
  ASSERT_FALSE(body.is_discarded()) << total->body;
  ASSERT_EQ(body["data"]["result"].size(), 1u) << total->body;
  EXPECT_GE(std::stod(body["data"]["result"][0]["value"][1].get<std::string>()),
            faults_of(vm1->pid()) + faults_of(vm2->pid()));
}

TEST_F(ObservabilityTest, PromtoolHasNothingToSayAboutTheExposition) {
  if (!Executable("/usr/bin/promtool"))
    GTEST_SKIP() << "no /usr/bin/promtool (Debian's prometheus)";
  const int port = StartWithMetrics({"--max-pending-handshakes", "8"});
  ASSERT_GT(port, 0) << server_->Output();
  // One VM that ended, one being served, one handshake rejected: every kind of series is there.
  ExpectVmVerifies({"--workload", "sequential", "--verify"}, "ended");
  auto held = StartHeldVm("held");
  {
    auto bad = ConnectUnix(socket_);
    ASSERT_TRUE(bad.has_value());
    SendRaw(bad->get(), "this is not a handshake");
    ASSERT_TRUE(ClosedByPeer(bad->get(), 20s));
  }
  std::string text;
  ASSERT_TRUE(WaitUntil([&] {
    text = Scrape(port);
    return text.find("gmem_vms_finished_total 1") != std::string::npos &&
           text.find("gmem_vms_connected 1") != std::string::npos &&
           text.find("gmem_handshakes_rejected_total{reason=\"malformed\"} 1") != std::string::npos;
  })) << text
      << server_->Output();
  EXPECT_NE(text.find("pid=\"" + std::to_string(held->pid()) + "\""), std::string::npos);
  const std::string exposition = dir_ + "/metrics.txt";
  std::ofstream(exposition) << text;
  Subprocess promtool({"/bin/sh", "-c", "exec /usr/bin/promtool check metrics < " + exposition},
                      dir_ + "/promtool.log");
  EXPECT_EQ(promtool.ExitCode(60s), 0) << promtool.Output();
  EXPECT_EQ(promtool.Output(), "") << "promtool had something to say";
}

TEST_F(ObservabilityTest, StatusListsTheLiveVmsAndTheirCounters) {
  StartServer();
  auto vm = StartHeldVm("vm");
  const std::string pid = std::to_string(vm->pid());
  ASSERT_FALSE(server_->WaitForLine({"(pid " + pid, " connected"}).empty()) << server_->Output();
  nlohmann::json status;
  ASSERT_TRUE(WaitUntil([&] {
    Subprocess query({GMEM_BINARY, "status", socket_, "--json"}, dir_ + "/status.json");
    if (query.ExitCode(30s) != 0) return false;
    status = nlohmann::json::parse(ReadFile(dir_ + "/status.json"), nullptr, false);
    std::remove((dir_ + "/status.json").c_str());
    return !status.is_discarded() && status["vms"].size() == 1 &&
           status["vms"][0]["stats"]["faults"]["missing"].get<uint64_t>() > 0;
  })) << status.dump(2);
  EXPECT_EQ(status["vms"][0]["pid"], vm->pid());
  EXPECT_EQ(status["vms"][0]["snapshot"], snapshot_->path());
  EXPECT_EQ(status["vms_connected"], 1);
  EXPECT_EQ(status["pid"], server_->pid());

  Subprocess table({GMEM_BINARY, "status", socket_}, dir_ + "/status.txt");
  ASSERT_EQ(table.ExitCode(30s), 0) << table.Output();
  EXPECT_NE(table.Output().find("1 VM(s) connected"), std::string::npos) << table.Output();
  EXPECT_NE(table.Output().find(" " + pid + " "), std::string::npos) << table.Output();

  // Nobody there: a clear error, not a hang.
  Subprocess nobody({GMEM_BINARY, "status", dir_ + "/nothing.sock"}, dir_ + "/nobody.txt");
  EXPECT_EQ(nobody.ExitCode(30s), 1);
  EXPECT_NE(nobody.Output().find("gmem status: "), std::string::npos) << nobody.Output();
  EXPECT_NE(nobody.Output().find("nothing.sock.control"), std::string::npos) << nobody.Output();
}

TEST_F(ObservabilityTest, BadMetricsAddressesStopTheDaemonAtStartWithAReason) {
  const int taken = FreePort();
  httplib::Server holder;
  ASSERT_TRUE(holder.bind_to_port("127.0.0.1", taken));
  const std::vector<std::pair<std::string, std::string>> bad = {
      {"localhost:9464", "host names are not looked up"},
      {"127.0.0.1:70000", "is not a number from 0 to 65535"},
      {"/run/gmem/metrics.sock", "Unix socket path"},
      {"0.0.0.0", "no port"},
  };
  for (const auto& [address, why] : bad) {
    Subprocess serve({GMEM_BINARY, "serve", socket_, snapshot_->path(), "--metrics", address},
                     dir_ + "/bad.log");
    EXPECT_EQ(serve.ExitCode(30s), 2) << address;
    EXPECT_NE(serve.Output().find("--metrics '" + address + "': "), std::string::npos)
        << serve.Output();
    EXPECT_NE(serve.Output().find(why), std::string::npos) << serve.Output();
    std::remove((dir_ + "/bad.log").c_str());
  }
  Subprocess in_use({GMEM_BINARY, "serve", socket_, snapshot_->path(), "--cache-dir",
                     dir_ + "/cache", "--metrics", "127.0.0.1:" + std::to_string(taken)},
                    dir_ + "/in-use.log");
  EXPECT_EQ(in_use.ExitCode(30s), 1);
  EXPECT_NE(in_use.Output().find("cannot bind"), std::string::npos) << in_use.Output();
}

// systemd-socket-activate plays systemd: it listens, starts the daemon when the first VM connects,
// with the socket in LISTEN_FDS, and NOTIFY_SOCKET is where the daemon says it is ready.
TEST_F(ObservabilityTest, ASocketActivatedDaemonRestoresAVmAndNotifiesReadiness) {
  const std::string activate = "/usr/bin/systemd-socket-activate";
  if (!Executable(activate)) GTEST_SKIP() << "no " << activate << " (Debian's systemd)";
  const std::string notify_path = dir_ + "/notify.sock";
  UniqueFd notify(socket(AF_UNIX, SOCK_DGRAM | SOCK_CLOEXEC, 0));
  sockaddr_un addr{};
  addr.sun_family = AF_UNIX;
  std::snprintf(addr.sun_path, sizeof(addr.sun_path), "%s", notify_path.c_str());
  ASSERT_EQ(bind(notify.get(), reinterpret_cast<sockaddr*>(&addr), sizeof(addr)), 0);

  server_ = std::make_unique<Subprocess>(
      // The daemon gets only the environment -E gives it (and LISTEN_*).
      std::vector<std::string>{activate, "-E", "NOTIFY_SOCKET=" + notify_path, "-l", socket_,
                               GMEM_BINARY, "serve", socket_, snapshot_->path(), "--cache-dir",
                               dir_ + "/cache", "--max-vms", "1"},
      dir_ + "/serve.log");
  ASSERT_TRUE(server_->WaitForOutput("Listening on " + socket_)) << server_->Output();
  auto vm = StartVm("vm", {"--workload", "random", "--pages", "500", "--verify"});
  EXPECT_EQ(vm->ExitCode(120s), 0) << vm->Output() << "\n" << server_->Output();
  EXPECT_FALSE(server_->WaitForLine({"serving ", "; socket from systemd"}).empty())
      << server_->Output();
  EXPECT_FALSE(WaitForVmEnd("vm 1 (").empty()) << server_->Output();
  EXPECT_EQ(server_->ExitCode(60s), 0) << server_->Output();

  std::string said;
  pollfd pfd{notify.get(), POLLIN, 0};
  while (said.find("READY=1") == std::string::npos && poll(&pfd, 1, 20000) == 1) {
    char buffer[4096];
    const ssize_t n = recv(notify.get(), buffer, sizeof(buffer), 0);
    if (n <= 0) break;
    said.append(buffer, static_cast<size_t>(n));
    said += '\n';
  }
  EXPECT_NE(said.find("READY=1"), std::string::npos) << said;
  EXPECT_NE(said.find("STATUS=serving " + socket_), std::string::npos) << said;
  // systemd made the socket file; the daemon leaves it to systemd.
  EXPECT_EQ(access(socket_.c_str(), F_OK), 0);
}

}  // namespace
}  // namespace guestmem::e2e
