#include "serve/endpoints.h"

#include <arpa/inet.h>
#include <httplib.h>
#include <poll.h>
#include <sys/eventfd.h>
#include <sys/socket.h>
#include <unistd.h>

#include <cerrno>
#include <chrono>
#include <cstring>
#include <utility>

#include "guestmem/log.h"
#include "guestmem/unix_socket.h"

namespace guestmem::cli {
namespace {

// What one request to the control socket may be, and how long it may take to arrive.
constexpr size_t kMaxRequestBytes = 4096;
constexpr int kRequestTimeoutMs = 1000;
// How long a reply may take to be written or read.
constexpr time_t kReplyTimeoutSeconds = 5;
// How long Start() waits for the HTTP thread to be accepting.
constexpr auto kStartTimeout = std::chrono::seconds(10);

Error BadAddress(const std::string& text, const std::string& why) {
  return Error(ErrorCode::kInvalidArgument, "--metrics '" + text + "': " + why);
}

void SetTimeouts(int fd, time_t seconds) {
  timeval tv{seconds, 0};
  (void)setsockopt(fd, SOL_SOCKET, SO_SNDTIMEO, &tv, sizeof(tv));
  (void)setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof(tv));
}

// Writes all of `bytes` (the socket has a send timeout); false if the peer went away.
bool WriteAll(int fd, const std::string& bytes) {
  size_t done = 0;
  while (done < bytes.size()) {
    const ssize_t n = send(fd, bytes.data() + done, bytes.size() - done, MSG_NOSIGNAL);
    if (n < 0 && errno == EINTR) continue;
    if (n <= 0) return false;
    done += static_cast<size_t>(n);
  }
  return true;
}

}  // namespace

std::string MetricsAddress::ToString() const {
  const bool v6 = host.find(':') != std::string::npos;
  return (v6 ? "[" + host + "]" : host) + ":" + std::to_string(port);
}

Result<MetricsAddress> ParseMetricsAddress(const std::string& text) {
  const std::string expected =
      "expected IP:PORT, e.g. 127.0.0.1:9464 or [::1]:9464 (port 0: any free port)";
  if (text.empty()) return BadAddress(text, expected);
  for (const char c : text) {
    if (static_cast<unsigned char>(c) < 0x21 || static_cast<unsigned char>(c) > 0x7e) {
      return BadAddress(text, "a space, control or non-ASCII character; " + expected);
    }
  }
  if (text.find('/') != std::string::npos) {
    return BadAddress(text,
                      "a Unix socket path: the HTTP library of this build (cpp-httplib 0.11) "
                      "listens only on IP addresses; use 127.0.0.1:PORT, or read the same "
                      "metrics over the control socket with `gmem status SOCKET --metrics`");
  }
  const size_t colon = text.rfind(':');
  if (colon == std::string::npos) return BadAddress(text, "no port; " + expected);
  MetricsAddress address;
  address.host = text.substr(0, colon);
  const std::string port = text.substr(colon + 1);
  if (address.host.size() >= 2 && address.host.front() == '[' && address.host.back() == ']') {
    address.host = address.host.substr(1, address.host.size() - 2);
    in6_addr v6{};
    if (inet_pton(AF_INET6, address.host.c_str(), &v6) != 1) {
      return BadAddress(text, "'" + address.host + "' is not an IPv6 address");
    }
  } else {
    in_addr v4{};
    if (inet_pton(AF_INET, address.host.c_str(), &v4) != 1) {
      return BadAddress(text, "'" + address.host +
                                  "' is not an IPv4 address (host names are not looked up; "
                                  "an IPv6 address goes in brackets)");
    }
  }
  if (port.empty() || port.size() > 5 ||
      port.find_first_not_of("0123456789") != std::string::npos || std::stoi(port) > 65535) {
    return BadAddress(text, "port '" + port + "' is not a number from 0 to 65535");
  }
  address.port = std::stoi(port);
  return address;
}

// ---------------------------------------------------------------------------------------------
// MetricsHttpServer

Result<std::unique_ptr<MetricsHttpServer>> MetricsHttpServer::Start(const MetricsAddress& address,
                                                                    const ServeMetrics* metrics) {
  auto server = std::make_unique<httplib::Server>();
  // A scrape at a time is plenty; a second thread keeps a slow client from stalling the next.
  server->new_task_queue = [] { return new httplib::ThreadPool(2); };
  server->set_read_timeout(kReplyTimeoutSeconds, 0);
  server->set_write_timeout(kReplyTimeoutSeconds, 0);
  server->set_keep_alive_max_count(16);
  // SO_REUSEADDR only: httplib's default adds SO_REUSEPORT, with which a second daemon on the
  // same port would share it silently instead of failing.
  server->set_socket_options([](int fd) {
    const int yes = 1;
    (void)setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &yes, sizeof(yes));
  });
  server->Get("/metrics", [metrics](const httplib::Request&, httplib::Response& response) {
    response.set_content(FormatPrometheus(metrics->Collect()),
                         "text/plain; version=0.0.4; charset=utf-8");
  });
  server->Get("/", [](const httplib::Request&, httplib::Response& response) {
    response.set_content("gmem serve: metrics at /metrics\n", "text/plain; charset=utf-8");
  });
  MetricsAddress bound = address;
  if (address.port == 0) {
    bound.port = server->bind_to_any_port(address.host);
    if (bound.port < 0) {
      return Error(ErrorCode::kFailedPrecondition,
                   "--metrics " + address.ToString() + ": cannot bind");
    }
  } else if (!server->bind_to_port(address.host, address.port)) {
    return Error(ErrorCode::kFailedPrecondition, "--metrics " + address.ToString() +
                                                     ": cannot bind (in use, or not an address "
                                                     "of this host)");
  }
  std::unique_ptr<MetricsHttpServer> out(new MetricsHttpServer(std::move(server), bound));
  httplib::Server* s = out->server_.get();
  out->thread_ = std::thread([s] { s->listen_after_bind(); });
  // stop() reaches only a server that is running: wait for it, so that the destructor can.
  const auto deadline = std::chrono::steady_clock::now() + kStartTimeout;
  while (!s->is_running()) {
    if (std::chrono::steady_clock::now() > deadline) {
      return Error(ErrorCode::kInternal, "--metrics: the HTTP server did not start");
    }
    std::this_thread::sleep_for(std::chrono::milliseconds(1));
  }
  return out;
}

MetricsHttpServer::MetricsHttpServer(std::unique_ptr<httplib::Server> server,
                                     MetricsAddress address)
    : server_(std::move(server)), address_(std::move(address)) {}

MetricsHttpServer::~MetricsHttpServer() {
  if (thread_.joinable()) {
    server_->stop();
    thread_.join();
  }
}

// ---------------------------------------------------------------------------------------------
// ControlServer

std::string DefaultControlPath(const std::string& socket_path) { return socket_path + ".control"; }

Result<std::unique_ptr<ControlServer>> ControlServer::Start(const std::string& path,
                                                            const ServeMetrics* metrics) {
  GM_ASSIGN_OR_RETURN(UniqueFd listener, ListenUnix(path, UnixListenOptions{.mode = 0600}));
  UniqueFd stop(eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK));
  if (!stop) return PosixError(errno, "control socket: eventfd");
  std::unique_ptr<ControlServer> out(
      new ControlServer(path, std::move(listener), std::move(stop), metrics));
  out->thread_ = std::thread([s = out.get()] { s->Run(); });
  return out;
}

ControlServer::ControlServer(std::string path, UniqueFd listener, UniqueFd stop,
                             const ServeMetrics* metrics)
    : path_(std::move(path)),
      listener_(std::move(listener)),
      stop_(std::move(stop)),
      metrics_(metrics) {}

ControlServer::~ControlServer() {
  const uint64_t one = 1;
  (void)!write(stop_.get(), &one, sizeof(one));
  if (thread_.joinable()) thread_.join();
  unlink(path_.c_str());
}

void ControlServer::Run() {
  while (true) {
    pollfd fds[2] = {{stop_.get(), POLLIN, 0}, {listener_.get(), POLLIN, 0}};
    if (poll(fds, 2, -1) < 0) {
      if (errno == EINTR) continue;
      Log(LogLevel::kError, std::string("control socket: poll: ") + std::strerror(errno));
      return;
    }
    if (fds[0].revents != 0) return;
    if (fds[1].revents == 0) continue;
    UniqueFd client(accept4(listener_.get(), nullptr, nullptr, SOCK_CLOEXEC));
    if (!client) continue;  // gone already, or out of descriptors: the next poll tells
    try {
      Answer(client.get());
    } catch (const std::exception& e) {
      Log(LogLevel::kWarning, std::string("control socket: ") + e.what());
    }
  }
}

void ControlServer::Answer(int fd) {
  SetTimeouts(fd, kReplyTimeoutSeconds);
  // One line, at most kMaxRequestBytes, within kRequestTimeoutMs in all.
  std::string request;
  const auto deadline =
      std::chrono::steady_clock::now() + std::chrono::milliseconds(kRequestTimeoutMs);
  while (request.find('\n') == std::string::npos && request.size() < kMaxRequestBytes) {
    const auto left = std::chrono::duration_cast<std::chrono::milliseconds>(
                          deadline - std::chrono::steady_clock::now())
                          .count();
    pollfd pfd{fd, POLLIN, 0};
    if (left <= 0 || poll(&pfd, 1, static_cast<int>(left)) != 1) return;
    char buffer[512];
    const ssize_t n = recv(fd, buffer, sizeof(buffer), MSG_DONTWAIT);
    if (n < 0 && (errno == EINTR || errno == EAGAIN)) continue;
    if (n <= 0) break;
    request.append(buffer, static_cast<size_t>(n));
  }
  nlohmann::json reply;
  const nlohmann::json parsed = nlohmann::json::parse(request.substr(0, request.find('\n')),
                                                      nullptr, /*allow_exceptions=*/false);
  const std::string command =
      parsed.is_object() && parsed.contains("command") && parsed["command"].is_string()
          ? parsed["command"].get<std::string>()
          : "";
  if (command == "status") {
    reply = StatusJson(metrics_->Collect());
  } else if (command == "metrics") {
    reply = {{"metrics", FormatPrometheus(metrics_->Collect())}};
  } else {
    reply = {{"error", "expected one JSON line {\"command\": \"status\" or \"metrics\"}"}};
  }
  (void)WriteAll(fd, reply.dump() + "\n");
}

Result<nlohmann::json> QueryControl(const std::string& path, const std::string& command) {
  GM_ASSIGN_OR_RETURN(UniqueFd socket, ConnectUnix(path));
  SetTimeouts(socket.get(), kReplyTimeoutSeconds);
  if (!WriteAll(socket.get(), nlohmann::json({{"command", command}}).dump() + "\n")) {
    return PosixError(errno, "control socket " + path + ": sending the request");
  }
  std::string reply;
  char buffer[65536];
  while (true) {
    const ssize_t n = recv(socket.get(), buffer, sizeof(buffer), 0);
    if (n < 0 && errno == EINTR) continue;
    if (n < 0 && (errno == EAGAIN || errno == EWOULDBLOCK)) {
      return Error(ErrorCode::kIoError, "control socket " + path + ": no reply within " +
                                            std::to_string(kReplyTimeoutSeconds) + " s");
    }
    if (n < 0) return PosixError(errno, "control socket " + path + ": reading the reply");
    if (n == 0) break;
    reply.append(buffer, static_cast<size_t>(n));
  }
  nlohmann::json parsed = nlohmann::json::parse(reply, nullptr, /*allow_exceptions=*/false);
  if (parsed.is_discarded() || !parsed.is_object()) {
    return Error(ErrorCode::kProtocolError,
                 "control socket " + path + ": the reply is not a JSON object");
  }
  if (parsed.contains("error")) {
    return Error(ErrorCode::kProtocolError,
                 "control socket " + path + ": " + parsed["error"].dump());
  }
  return parsed;
}

}  // namespace guestmem::cli
