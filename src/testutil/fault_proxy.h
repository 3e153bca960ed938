// FaultProxy: a TCP proxy on 127.0.0.1 for testing clients against a bad network or a bad server.
// Every connection it accepts is forwarded to 127.0.0.1:target_port over an upstream connection
// of its own; it can be told to answer the next requests itself (a 503, or any canned answer),
// to swallow them and never answer (stall), or to close the connection right after one (drop).
// It parses just enough HTTP/1.1 to find where each request ends (the header block, then
// Content-Length bytes of body) and counts requests and connections.
//
// Thread safety: every method may be called from any thread; one thread of its own serves every
// connection with poll().
#ifndef GUESTMEM_TESTUTIL_FAULT_PROXY_H_
#define GUESTMEM_TESTUTIL_FAULT_PROXY_H_

#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <mutex>
#include <string>
#include <string_view>
#include <thread>

#include "guestmem/unique_fd.h"

namespace guestmem::testutil {

class FaultProxy {
 public:
  static constexpr std::string_view k503 =
      "HTTP/1.1 503 Service Unavailable\r\nContent-Length: 0\r\n\r\n";

  // Listens on a free port of 127.0.0.1; port() is 0 if it could not.
  explicit FaultProxy(uint16_t target_port);
  ~FaultProxy();
  FaultProxy(const FaultProxy&) = delete;
  FaultProxy& operator=(const FaultProxy&) = delete;

  uint16_t port() const { return port_; }

  // What happens to the requests that arrive from now on: the next `count` meet the fault,
  // those after pass to the target again.
  void Pass() { Set(Fault::kNone, 0, ""); }
  void Answer503(int count) { Set(Fault::kAnswer, count, std::string(k503)); }
  // `response`: a whole HTTP response, head and body, sent as it is.
  void AnswerWith(std::string response, int count) {
    Set(Fault::kAnswer, count, std::move(response));
  }
  // The connection stays open and the request is never answered.
  void Stall(int count) { Set(Fault::kStall, count, ""); }
  // The connection (and its upstream one) is closed right after the request arrives.
  void Drop(int count) { Set(Fault::kDrop, count, ""); }

  uint64_t requests() const;     // requests seen whole, faulted or not
  uint64_t faulted() const;      // requests that met a fault
  uint64_t connections() const;  // client connections accepted
  // Whether requests() reached `n` before `timeout`.
  bool WaitForRequests(uint64_t n, std::chrono::milliseconds timeout) const;

 private:
  enum class Fault { kNone, kAnswer, kStall, kDrop };
  struct Connection;
  struct Decision {
    Fault fault = Fault::kNone;
    std::string answer;
  };

  void Set(Fault fault, int count, std::string answer);
  Decision NextRequest();  // counts the request and takes the fault it meets
  void Run();

  uint16_t port_ = 0;
  UniqueFd listener_;
  UniqueFd wake_;  // an eventfd: Stop
  const uint16_t target_port_;

  mutable std::mutex mu_;
  mutable std::condition_variable changed_;
  Fault fault_ = Fault::kNone;  // GUARDED_BY(mu_)
  int remaining_ = 0;           // GUARDED_BY(mu_)
  std::string answer_;          // GUARDED_BY(mu_)
  uint64_t requests_ = 0;       // GUARDED_BY(mu_)
  uint64_t faulted_ = 0;        // GUARDED_BY(mu_)
  uint64_t connections_ = 0;    // GUARDED_BY(mu_)

  std::thread thread_;
};

}  // namespace guestmem::testutil

#endif  // GUESTMEM_TESTUTIL_FAULT_PROXY_H_
