// The daemon's two windows onto its ServeMetrics, each served by a thread of its own so that a
// slow reader never holds up the event loop or a fault:
//
//   MetricsHttpServer  Prometheus' text exposition at GET /metrics, over HTTP (cpp-httplib) on an
//                      IP address and port (--metrics 127.0.0.1:9464; port 0: any free one).
//   ControlServer      `gmem status` over a Unix socket (SOCKET.control, owner-only): a client
//                      sends one JSON line {"command": "status" | "metrics"} and gets one reply,
//                      StatusJson() or {"metrics": exposition}, and the connection is closed.
//                      Requests are read with a size bound and a deadline; one client at a time.
//
// Thread safety: Start() from one thread; destroying either stops its thread (from any thread but
// its own). Both read their ServeMetrics, which must outlive them.
#ifndef GUESTMEM_TOOLS_GMEM_SERVE_ENDPOINTS_H_
#define GUESTMEM_TOOLS_GMEM_SERVE_ENDPOINTS_H_

#include <cstdint>
#include <memory>
#include <nlohmann/json.hpp>
#include <string>
#include <thread>

#include "guestmem/result.h"
#include "guestmem/unique_fd.h"
#include "serve/serve_metrics.h"

namespace httplib {
class Server;
}

namespace guestmem::cli {

// Where --metrics listens: an IPv4 literal or a bracketed IPv6 literal, and a port.
struct MetricsAddress {
  std::string host;  // without brackets
  int port = 0;      // 0: any free port
  std::string ToString() const;
};
// "127.0.0.1:9464", "[::1]:0". Host names are refused (no lookup at start), and so is a Unix
// socket path, which Debian 12's cpp-httplib (0.11) cannot listen on: `gmem status --metrics`
// reads the same exposition over the control socket.
// ERRORS: kInvalidArgument saying what is wrong, naming --metrics.
Result<MetricsAddress> ParseMetricsAddress(const std::string& text);

class MetricsHttpServer {
 public:
  // Binds (so that a port in use fails here) and serves in a thread of its own.
  static Result<std::unique_ptr<MetricsHttpServer>> Start(const MetricsAddress& address,
                                                          const ServeMetrics* metrics);
  ~MetricsHttpServer();
  // The address bound, with the port the kernel chose for port 0.
  const MetricsAddress& address() const { return address_; }

 private:
  MetricsHttpServer(std::unique_ptr<httplib::Server> server, MetricsAddress address);
  std::unique_ptr<httplib::Server> server_;
  MetricsAddress address_;
  std::thread thread_;
};

class ControlServer {
 public:
  // Listens on `path` (owner-only; a stale socket file is replaced).
  static Result<std::unique_ptr<ControlServer>> Start(const std::string& path,
                                                      const ServeMetrics* metrics);
  ~ControlServer();
  const std::string& path() const { return path_; }

 private:
  ControlServer(std::string path, UniqueFd listener, UniqueFd stop, const ServeMetrics* metrics);
  void Run();
  void Answer(int fd);

  std::string path_;
  UniqueFd listener_;
  UniqueFd stop_;  // eventfd: the destructor asks Run() to return
  const ServeMetrics* metrics_;
  std::thread thread_;
};

// The control socket `gmem serve SOCKET` listens on by default.
std::string DefaultControlPath(const std::string& socket_path);

// Asks the daemon at `path` (a ControlServer) `command` and returns its reply.
// ERRORS: kNotFound / ECONNREFUSED when nobody listens there; kProtocolError for a reply that is
// not JSON or that carries {"error": ...}; kIoError when no reply comes in time.
Result<nlohmann::json> QueryControl(const std::string& path, const std::string& command);

}  // namespace guestmem::cli

#endif  // GUESTMEM_TOOLS_GMEM_SERVE_ENDPOINTS_H_
