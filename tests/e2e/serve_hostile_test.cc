// End-to-end: what hostile or broken clients can make `gmem serve` do. Nothing a client does may
// crash or hang the daemon, decide how many threads it runs or how much memory it holds beyond
// fixed bounds, or keep it from serving other VMs.
#include <gtest/gtest.h>
#include <poll.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <chrono>
#include <fstream>
#include <sstream>
#include <string>
#include <vector>

#include "guestmem/handshake.h"
#include "guestmem/unix_socket.h"
#include "serve_fixture.h"

namespace guestmem::e2e {
namespace {

using ServeHostileTest = ServeTest;

// A field of /proc/<pid>/status ("Threads", "VmRSS" in kB), or -1.
int64_t ProcStatus(pid_t pid, const std::string& field) {
  std::ifstream in("/proc/" + std::to_string(pid) + "/status");
  for (std::string line; std::getline(in, line);) {
    if (line.rfind(field + ":", 0) == 0) return std::stoll(line.substr(field.size() + 1));
  }
  return -1;
}

// Lines of `text` that contain `fragment`.
size_t CountLines(const std::string& text, const std::string& fragment) {
  std::istringstream lines(text);
  size_t n = 0;
  for (std::string line; std::getline(lines, line);) n += line.find(fragment) != std::string::npos;
  return n;
}

// Whether the daemon has closed `fd` (EOF readable), waiting at most `timeout`.
bool ClosedByPeer(int fd, std::chrono::milliseconds timeout) {
  pollfd pfd{fd, POLLIN, 0};
  if (poll(&pfd, 1, static_cast<int>(timeout.count())) != 1) return false;
  char byte;
  return recv(fd, &byte, 1, MSG_DONTWAIT | MSG_PEEK) == 0;
}

void RaiseDescriptorLimit(rlim_t want) {
  rlimit limit{};
  ASSERT_EQ(getrlimit(RLIMIT_NOFILE, &limit), 0);
  if (limit.rlim_cur >= want) return;
  if (limit.rlim_max < want) GTEST_SKIP() << "RLIMIT_NOFILE hard limit is " << limit.rlim_max;
  limit.rlim_cur = want;
  ASSERT_EQ(setrlimit(RLIMIT_NOFILE, &limit), 0);
}

// Regression: each accepted connection got a thread of its own until its handshake arrived, so
// 20,000 idle connections made 19,992 threads and 1.4 GB of RSS, and a failed thread creation
// aborted the daemon. Handshakes are read by the server's loop; beyond a bound, connections
// waiting for their handshake are accepted and closed.
TEST_F(ServeHostileTest, IdleConnectionsCostNoThreadsAndTheirNumberIsBounded) {
  constexpr size_t kConnections = 1000;
  constexpr size_t kPendingBound = 256;  // the daemon's default
  RaiseDescriptorLimit(kConnections + 200);
  if (HasFatalFailure() || IsSkipped()) return;
  StartServer({"--handshake-timeout-ms", "60000"});
  const pid_t daemon = server_->pid();
  const int64_t threads_at_start = ProcStatus(daemon, "Threads");
  const int64_t rss_at_start = ProcStatus(daemon, "VmRSS");
  ASSERT_GT(threads_at_start, 0);
  int64_t most_threads = threads_at_start;
  std::vector<UniqueFd> clients;
  for (size_t i = 0; i < kConnections; ++i) {
    auto sock = ConnectUnix(socket_);
    ASSERT_TRUE(sock.has_value()) << i << ": " << sock.error().ToString();
    clients.push_back(std::move(*sock));
    if (i % 50 == 0) most_threads = std::max(most_threads, ProcStatus(daemon, "Threads"));
  }
  // Those beyond the bound are closed at once; the others wait for their handshake.
  size_t closed = 0;
  const auto deadline = std::chrono::steady_clock::now() + 60s;
  while (closed < kConnections - kPendingBound && std::chrono::steady_clock::now() < deadline) {
    closed = 0;
    for (const UniqueFd& c : clients) closed += ClosedByPeer(c.get(), 0ms);
    most_threads = std::max(most_threads, ProcStatus(daemon, "Threads"));
  }
  most_threads = std::max(most_threads, ProcStatus(daemon, "Threads"));
  EXPECT_EQ(closed, kConnections - kPendingBound) << server_->Output().substr(0, 4000);
  EXPECT_EQ(most_threads, threads_at_start) << "threads grew with the connections";
  const int64_t rss_growth_kib = ProcStatus(daemon, "VmRSS") - rss_at_start;
  EXPECT_LT(rss_growth_kib, 32 * 1024) << "RSS grew by " << rss_growth_kib << " KiB";
  // One refusal line, the rest folded into counts.
  const std::string log = server_->Output();
  EXPECT_GE(CountLines(log, "refused"), 1u) << log.substr(0, 4000);
  EXPECT_LE(CountLines(log, "refused"), 5u) << log.substr(0, 4000);

  // Once they go, a VM is served as ever.
  clients.clear();
  const auto gone_by = std::chrono::steady_clock::now() + 60s;
  while (CountLines(server_->Output(), "closed before its handshake") < kPendingBound &&
         std::chrono::steady_clock::now() < gone_by) {
    std::this_thread::sleep_for(10ms);
  }
  EXPECT_EQ(CountLines(server_->Output(), "closed before its handshake"), kPendingBound);
  ExpectVmVerifies({"--workload", "random", "--threads", "2", "--verify"});
  EXPECT_EQ(server_->Wait(0ms), std::nullopt) << "the daemon must still be running";
}

// Regression: a space that ended before its connection was queued lost its record, so the VM was
// later logged with empty statistics and its connection stayed open. A uffd on which UFFDIO_API
// was never called reports an error at once, so its space ends as soon as it is served.
TEST_F(ServeHostileTest, ASpaceThatEndsAtOnceIsLoggedWithItsStatisticsAndItsConnectionClosed) {
  StartServer();
  constexpr int kVms = 20;
  for (int i = 0; i < kVms; ++i) {
    SCOPED_TRACE(i);
    UniqueFd uffd(static_cast<int>(syscall(SYS_userfaultfd, O_CLOEXEC | O_NONBLOCK)));
    ASSERT_TRUE(uffd.valid()) << "userfaultfd: " << std::strerror(errno);
    const HandshakeRegion r{0x7f0000000000, 1 << 20, 0, 4096, 4096, std::nullopt, std::nullopt};
    auto sock = ConnectUnix(socket_);
    ASSERT_TRUE(sock.has_value()) << sock.error().ToString();
    int fds[] = {uffd.get()};
    ASSERT_TRUE(SendHandshake(sock->get(), std::span(&r, 1), fds));
    EXPECT_TRUE(ClosedByPeer(sock->get(), 20s)) << "the daemon kept the connection of a dead VM\n"
                                                << server_->Output();
  }
  for (int vm = 1; vm <= kVms; ++vm) {
    const std::string line =
        server_->WaitForLine({"vm " + std::to_string(vm) + " (", "ended", "faults="}, 20s);
    EXPECT_NE(line, "") << "vm " << vm << " was not logged with its statistics\n"
                        << server_->Output();
    EXPECT_NE(line.find("uffd reports an error"), std::string::npos) << line;
  }
  ExpectVmVerifies({"--workload", "sequential", "--verify"});
}

}  // namespace
}  // namespace guestmem::e2e
