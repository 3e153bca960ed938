// ServeMetrics (totals that never go down, the exposition's families and labels) and its
// endpoints (the --metrics address parser, the HTTP server, the control socket) without a daemon.
#include "serve/serve_metrics.h"

#include <gtest/gtest.h>
#include <httplib.h>
#include <sys/socket.h>

#include <map>
#include <mutex>
#include <optional>
#include <string>
#include <thread>

#include "base/temp_dir.h"
#include "guestmem/unix_socket.h"
#include "serve/endpoints.h"

namespace guestmem::cli {
namespace {

// Spaces whose statistics the test sets; a space not set is gone.
class FakeSpaces {
 public:
  void Set(SpaceId id, FaultStats stats) {
    std::lock_guard lock(mu_);
    spaces_[id] = stats;
  }
  void Remove(SpaceId id) {
    std::lock_guard lock(mu_);
    spaces_.erase(id);
  }
  ServeMetrics::StatsFn Fn() {
    return [this](SpaceId id) -> std::optional<FaultStats> {
      std::lock_guard lock(mu_);
      auto it = spaces_.find(id);
      if (it == spaces_.end()) return std::nullopt;
      return it->second;
    };
  }

 private:
  std::mutex mu_;
  std::map<SpaceId, FaultStats> spaces_;
};

FaultStats Faults(uint64_t missing, uint64_t copied) {
  FaultStats s;
  s.faults_missing = missing;
  s.pages_copied = copied;
  s.queue_latency.count = missing;
  s.queue_latency.cumulative.fill(missing);
  s.queue_latency.sum_ns = missing * 3000;
  return s;
}

std::string Line(const std::string& text, const std::string& prefix) {
  const size_t at = text.find("\n" + prefix);
  if (at == std::string::npos) return "";
  return text.substr(at + 1, text.find('\n', at + 1) - at - 1);
}

TEST(ServeMetricsTest, TotalsAddLiveAndEndedVmsAndNeverGoDown) {
  FakeSpaces spaces;
  ServeMetrics metrics(spaces.Fn());
  spaces.Set(11, Faults(5, 80));
  spaces.Set(12, Faults(2, 10));
  metrics.VmStarted(11, {1, 100, "/snap/a"});
  metrics.VmStarted(12, {2, 200, "/snap/b"});
  ServeMetrics::Snapshot s = metrics.Collect();
  ASSERT_EQ(s.vms.size(), 2u);
  EXPECT_EQ(s.total.faults_missing, 7u);
  EXPECT_EQ(s.total.queue_latency.count, 7u);

  // VM 1's space goes before the daemon has finished it: what was read last stands in.
  spaces.Set(11, Faults(6, 90));
  EXPECT_EQ(metrics.Collect().total.faults_missing, 8u);
  spaces.Remove(11);
  EXPECT_EQ(metrics.Collect().total.faults_missing, 8u);
  // Finished with its statistics lost: the last read are kept.
  metrics.VmFinished(1, FaultStats{});
  s = metrics.Collect();
  EXPECT_EQ(s.vms.size(), 1u);
  EXPECT_EQ(s.vms_finished, 1u);
  EXPECT_EQ(s.total.faults_missing, 8u);
  EXPECT_EQ(s.total.pages_copied, 100u);
  // Finished with its final statistics: they count.
  spaces.Remove(12);
  metrics.VmFinished(2, Faults(4, 20));
  s = metrics.Collect();
  EXPECT_TRUE(s.vms.empty());
  EXPECT_EQ(s.total.faults_missing, 10u);
  EXPECT_EQ(s.ended.faults_missing, 10u);
}

TEST(ServeMetricsTest, ExpositionHasEveryFamilyOnceWithVmLabelsEscaped) {
  FakeSpaces spaces;
  ServeMetrics metrics(spaces.Fn());
  spaces.Set(3, Faults(9, 144));
  metrics.VmStarted(3, {7, 4242, "/snap/odd \"name\"\\x"});
  metrics.HandshakeRejected(RejectReason::kTimeout);
  metrics.HandshakeRejected(RejectReason::kTimeout);
  const std::string text = FormatPrometheus(metrics.Collect());
  const std::string labels = R"(vm="7",pid="4242",snapshot="/snap/odd \"name\"\\x")";
  EXPECT_EQ(Line(text, "gmem_vm_faults_total{"),
            "gmem_vm_faults_total{" + labels + ",kind=\"missing\"} 9");
  EXPECT_EQ(Line(text, "gmem_faults_total{"), "gmem_faults_total{kind=\"missing\"} 9");
  EXPECT_EQ(Line(text, "gmem_pages_installed_total{"),
            "gmem_pages_installed_total{way=\"copy\"} 144");
  EXPECT_EQ(Line(text, "gmem_vms_connected"), "gmem_vms_connected 1");
  EXPECT_EQ(Line(text, "gmem_handshakes_rejected_total{reason=\"timeout\""),
            "gmem_handshakes_rejected_total{reason=\"timeout\"} 2");
  EXPECT_EQ(Line(text, "gmem_vm_fault_queue_seconds_bucket{" + labels + ",le=\"1e-06\""),
            "gmem_vm_fault_queue_seconds_bucket{" + labels + ",le=\"1e-06\"} 9");
  EXPECT_EQ(Line(text, "gmem_fault_queue_seconds_sum"), "gmem_fault_queue_seconds_sum 2.7e-05");
  EXPECT_EQ(Line(text, "gmem_fault_queue_seconds_count"), "gmem_fault_queue_seconds_count 9");
  EXPECT_NE(text.find("\nprocess_cpu_seconds_total "), std::string::npos);
  EXPECT_NE(text.find("\nprocess_open_fds "), std::string::npos);
  // Every family's TYPE once, and a family's samples together after it.
  std::map<std::string, int> types;
  for (size_t at = text.find("# TYPE "); at != std::string::npos;
       at = text.find("# TYPE ", at + 1)) {
    const size_t name_end = text.find(' ', at + 7);
    ++types[text.substr(at + 7, name_end - at - 7)];
  }
  for (const auto& [name, n] : types) EXPECT_EQ(n, 1) << name;
  EXPECT_EQ(types.count("gmem_vm_fault_install_seconds"), 1u);
}

TEST(ServeMetricsTest, StatusJsonListsTheLiveVms) {
  FakeSpaces spaces;
  ServeMetrics metrics(spaces.Fn());
  spaces.Set(3, Faults(9, 144));
  metrics.VmStarted(3, {7, 4242, "/snap/a"});
  const nlohmann::json status = StatusJson(metrics.Collect());
  ASSERT_EQ(status["vms"].size(), 1u);
  EXPECT_EQ(status["vms"][0]["pid"], 4242);
  EXPECT_EQ(status["vms"][0]["stats"]["faults"]["missing"], 9);
  EXPECT_EQ(status["vms"][0]["stats"]["pages_installed"]["copy"], 144);
  EXPECT_EQ(status["total"]["source_read_bytes"], 0);
  EXPECT_EQ(status["handshakes_rejected"]["denied"], 0);
}

TEST(MetricsAddressTest, TakesIpLiteralsAndPortsAndRefusesTheRest) {
  auto v4 = ParseMetricsAddress("127.0.0.1:9464");
  ASSERT_TRUE(v4.has_value());
  EXPECT_EQ(v4->host, "127.0.0.1");
  EXPECT_EQ(v4->port, 9464);
  auto v6 = ParseMetricsAddress("[::1]:0");
  ASSERT_TRUE(v6.has_value());
  EXPECT_EQ(v6->host, "::1");
  EXPECT_EQ(v6->ToString(), "[::1]:0");
  const std::map<std::string, std::string> bad = {
      {"", "expected IP:PORT"},
      {"127.0.0.1", "no port"},
      {"127.0.0.1:", "is not a number"},
      {"127.0.0.1:65536", "is not a number from 0 to 65535"},
      {"127.0.0.1:-1", "is not a number"},
      {"127.0.0.1:12ab", "is not a number"},
      {"127.0.0.1:99999999999999999999", "is not a number"},
      {"localhost:9464", "host names are not looked up"},
      {"1.2.3.4.5:80", "is not an IPv4 address"},
      {"[::zz]:80", "is not an IPv6 address"},
      {"::1:80", "is not an IPv4 address"},
      {"/run/gmem/metrics.sock", "Unix socket path"},
      {std::string("127.0.0.1\0:80", 13), "control"},
      {"127.0.0.1 :80", "a space"},
  };
  for (const auto& [text, why] : bad) {
    auto parsed = ParseMetricsAddress(text);
    ASSERT_FALSE(parsed.has_value()) << text;
    EXPECT_NE(parsed.error().context().find("--metrics"), std::string::npos) << text;
    EXPECT_NE(parsed.error().context().find(why), std::string::npos)
        << text << ": " << parsed.error().context();
  }
}

TEST(MetricsHttpServerTest, ServesTheExpositionOnTheChosenPort) {
  FakeSpaces spaces;
  ServeMetrics metrics(spaces.Fn());
  spaces.Set(1, Faults(3, 3));
  metrics.VmStarted(1, {1, 1, "/s"});
  auto server = MetricsHttpServer::Start({"127.0.0.1", 0}, &metrics);
  ASSERT_TRUE(server.has_value()) << server.error().ToString();
  ASSERT_GT((*server)->address().port, 0);
  httplib::Client client("127.0.0.1", (*server)->address().port);
  client.set_read_timeout(10, 0);
  auto response = client.Get("/metrics");
  ASSERT_TRUE(response);
  EXPECT_EQ(response->status, 200);
  EXPECT_EQ(response->get_header_value("Content-Type"), "text/plain; version=0.0.4; charset=utf-8");
  EXPECT_NE(response->body.find("gmem_faults_total{kind=\"missing\"} 3"), std::string::npos);
  EXPECT_EQ(client.Get("/nothing")->status, 404);
  // The port is taken now: a second server there fails at start, saying so.
  auto second = MetricsHttpServer::Start((*server)->address(), &metrics);
  ASSERT_FALSE(second.has_value());
  EXPECT_NE(second.error().context().find("cannot bind"), std::string::npos);
}

TEST(ControlServerTest, AnswersStatusAndMetricsAndRefusesWhatItDoesNotKnow) {
  TempDir dir;
  FakeSpaces spaces;
  ServeMetrics metrics(spaces.Fn());
  spaces.Set(5, Faults(2, 2));
  metrics.VmStarted(5, {9, 99, "/s"});
  const std::string path = dir.File("ctl.sock");
  auto server = ControlServer::Start(path, &metrics);
  ASSERT_TRUE(server.has_value()) << server.error().ToString();
  // A client that connects and says nothing holds the server for its deadline only.
  auto silent = ConnectUnix(path);
  ASSERT_TRUE(silent.has_value());
  auto status = QueryControl(path, "status");
  ASSERT_TRUE(status.has_value()) << status.error().ToString();
  EXPECT_EQ((*status)["vms"][0]["vm"], 9);
  auto text = QueryControl(path, "metrics");
  ASSERT_TRUE(text.has_value()) << text.error().ToString();
  EXPECT_NE((*text)["metrics"].get<std::string>().find("gmem_vms_connected 1"), std::string::npos);
  auto unknown = QueryControl(path, "reboot");
  ASSERT_FALSE(unknown.has_value());
  EXPECT_EQ(unknown.error().code(), ErrorCode::kProtocolError);
  server->reset();
  auto gone = QueryControl(path, "status");
  EXPECT_FALSE(gone.has_value());
}

}  // namespace
}  // namespace guestmem::cli
