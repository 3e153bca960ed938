// NginxServer: a real nginx serving a directory on 127.0.0.1, for tests of HTTP clients. It runs
// as a child process (nginx -p PREFIX -c CONF -e ERRORLOG -g 'daemon off;') with its
// configuration, logs and temporary files in a directory of its own, on a port that was free, and
// is stopped when the object goes away.
//
// Thread safety: a value owned by one thread. Start it before the test starts threads of its own
// (it forks).
#ifndef GUESTMEM_TESTUTIL_NGINX_SERVER_H_
#define GUESTMEM_TESTUTIL_NGINX_SERVER_H_

#include <arpa/inet.h>
#include <netinet/in.h>
#include <signal.h>
#include <sys/socket.h>
#include <unistd.h>

#include <chrono>
#include <fstream>
#include <memory>
#include <string>
#include <thread>

#include "base/temp_dir.h"
#include "guestmem/unique_fd.h"
#include "testutil/subprocess.h"

namespace guestmem::testutil {

// A port on 127.0.0.1 that was free a moment ago (0 if none could be had).
inline uint16_t FreeLoopbackPort() {
  UniqueFd fd(socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0));
  sockaddr_in addr{};
  addr.sin_family = AF_INET;
  addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  socklen_t length = sizeof(addr);
  if (!fd || bind(fd.get(), reinterpret_cast<sockaddr*>(&addr), sizeof(addr)) != 0 ||
      getsockname(fd.get(), reinterpret_cast<sockaddr*>(&addr), &length) != 0) {
    return 0;
  }
  return ntohs(addr.sin_port);
}

class NginxServer {
 public:
  static constexpr const char* kBinary = "/usr/sbin/nginx";
  static bool Available() { return access(kBinary, X_OK) == 0; }

  NginxServer() = default;
  NginxServer(const NginxServer&) = delete;
  NginxServer& operator=(const NginxServer&) = delete;
  ~NginxServer() {
    if (process_) {
      process_->Signal(SIGTERM);  // a fast shutdown
      process_->Wait(std::chrono::seconds(10));
    }  // ~Subprocess kills it if it did not stop
  }

  // Starts nginx serving the files below `root`. "" once it accepts connections; else why not.
  std::string Start(const std::string& root) {
    if (prefix_.path().empty()) return "cannot make a directory for nginx";
    std::string why;
    // The port was free when asked for; another process may take it before nginx binds it.
    for (int tries = 0; tries < 3; ++tries) {
      why = TryStart(root);
      if (why.empty()) return "";
    }
    return why;
  }

  uint16_t port() const { return port_; }
  std::string ErrorLog() const { return ReadFile(prefix_.File("error.log")); }

 private:
  std::string TryStart(const std::string& root) {
    process_.reset();
    port_ = FreeLoopbackPort();
    if (port_ == 0) return "no free port on 127.0.0.1";
    const std::string conf = prefix_.File("nginx.conf");
    {
      std::ofstream out(conf);
      // One process (no workers to outlive it, no switch to another user), everything in PREFIX.
      out << "master_process off;\n"
          << "worker_processes 1;\n"
          << "pid " << prefix_.File("nginx.pid") << ";\n"
          << "error_log " << prefix_.File("error.log") << " info;\n"
          << "events { worker_connections 256; }\n"
          << "http {\n"
          << "  access_log " << prefix_.File("access.log") << ";\n"
          << "  client_body_temp_path " << prefix_.File("client_body") << ";\n"
          << "  proxy_temp_path " << prefix_.File("proxy") << ";\n"
          << "  fastcgi_temp_path " << prefix_.File("fastcgi") << ";\n"
          << "  uwsgi_temp_path " << prefix_.File("uwsgi") << ";\n"
          << "  scgi_temp_path " << prefix_.File("scgi") << ";\n"
          << "  keepalive_requests 100000;\n"
          << "  server {\n"
          << "    listen 127.0.0.1:" << port_ << ";\n"
          << "    root " << root << ";\n"
          << "  }\n"
          << "}\n";
    }
    process_ = std::make_unique<Subprocess>(
        std::vector<std::string>{kBinary, "-p", prefix_.path() + "/", "-c", conf, "-e",
                                 prefix_.File("error.log"), "-g", "daemon off;"},
        prefix_.File("nginx.out"));
    const auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(20);
    while (std::chrono::steady_clock::now() < deadline) {
      if (Accepts(port_)) return "";
      if (process_->Wait(std::chrono::milliseconds(0))) {
        return "nginx exited: " + ReadFile(prefix_.File("nginx.out")) + ErrorLog();
      }
      std::this_thread::sleep_for(std::chrono::milliseconds(10));
    }
    return "nginx did not accept connections on 127.0.0.1:" + std::to_string(port_) +
           " within 20 s: " + ErrorLog();
  }

  static bool Accepts(uint16_t port) {
    UniqueFd fd(socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0));
    sockaddr_in addr{};
    addr.sin_family = AF_INET;
    addr.sin_port = htons(port);
    addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    return fd && connect(fd.get(), reinterpret_cast<sockaddr*>(&addr), sizeof(addr)) == 0;
  }

  TempDir prefix_;
  uint16_t port_ = 0;
  std::unique_ptr<Subprocess> process_;
};

}  // namespace guestmem::testutil

#endif  // GUESTMEM_TESTUTIL_NGINX_SERVER_H_
