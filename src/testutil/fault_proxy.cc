#include "testutil/fault_proxy.h"

#include <arpa/inet.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <poll.h>
#include <sys/eventfd.h>
#include <sys/socket.h>
#include <unistd.h>

#include <algorithm>
#include <cctype>
#include <cerrno>
#include <cstdlib>
#include <memory>
#include <vector>

namespace guestmem::testutil {
namespace {

// Past this much unsent in one direction, the proxy stops reading the other side.
constexpr size_t kMaxBuffered = 1 << 20;
// A request head longer than this is not one a test sends.
constexpr size_t kMaxHead = 64 * 1024;

sockaddr_in Loopback(uint16_t port) {
  sockaddr_in addr{};
  addr.sin_family = AF_INET;
  addr.sin_port = htons(port);
  addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  return addr;
}

// The Content-Length of a request head, 0 when it has none.
uint64_t ContentLength(std::string head) {
  std::transform(head.begin(), head.end(), head.begin(),
                 [](unsigned char c) { return static_cast<char>(std::tolower(c)); });
  const size_t at = head.find("\r\ncontent-length:");
  if (at == std::string::npos) return 0;
  return std::strtoull(head.c_str() + at + 17, nullptr, 10);
}

// Sends what it can of `pending` without blocking; false when the connection is broken.
bool Flush(int fd, std::string* pending) {
  while (!pending->empty()) {
    const ssize_t n = send(fd, pending->data(), pending->size(), MSG_NOSIGNAL | MSG_DONTWAIT);
    if (n > 0) {
      pending->erase(0, static_cast<size_t>(n));
    } else if (n < 0 && (errno == EAGAIN || errno == EINTR)) {
      return true;
    } else {
      return false;
    }
  }
  return true;
}

}  // namespace

struct FaultProxy::Connection {
  UniqueFd client, upstream;
  std::string from_client;  // the start of a request not yet whole
  std::string to_upstream, to_client;
  uint64_t body_left = 0;  // body bytes of the current request still to come
  bool forward_body = false;
  bool stalled = false;  // everything from the client is swallowed
  bool upstream_closed = false;
  bool dead = false;
};

FaultProxy::FaultProxy(uint16_t target_port) : target_port_(target_port) {
  UniqueFd listener(socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0));
  sockaddr_in addr = Loopback(0);
  socklen_t length = sizeof(addr);
  if (!listener || bind(listener.get(), reinterpret_cast<sockaddr*>(&addr), sizeof(addr)) != 0 ||
      listen(listener.get(), 64) != 0 ||
      getsockname(listener.get(), reinterpret_cast<sockaddr*>(&addr), &length) != 0) {
    return;
  }
  wake_ = UniqueFd(eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK));
  if (!wake_) return;
  listener_ = std::move(listener);
  port_ = ntohs(addr.sin_port);
  thread_ = std::thread([this] { Run(); });
}

FaultProxy::~FaultProxy() {
  if (thread_.joinable()) {
    const uint64_t one = 1;
    (void)!write(wake_.get(), &one, sizeof(one));
    thread_.join();
  }
}

void FaultProxy::Set(Fault fault, int count, std::string answer) {
  std::lock_guard lock(mu_);
  fault_ = fault;
  remaining_ = count;
  answer_ = std::move(answer);
}

FaultProxy::Decision FaultProxy::NextRequest() {
  Decision decision;
  {
    std::lock_guard lock(mu_);
    ++requests_;
    if (remaining_ > 0 && fault_ != Fault::kNone) {
      --remaining_;
      ++faulted_;
      decision.fault = fault_;
      decision.answer = answer_;
    }
  }
  changed_.notify_all();
  return decision;
}

uint64_t FaultProxy::requests() const {
  std::lock_guard lock(mu_);
  return requests_;
}

uint64_t FaultProxy::faulted() const {
  std::lock_guard lock(mu_);
  return faulted_;
}

uint64_t FaultProxy::connections() const {
  std::lock_guard lock(mu_);
  return connections_;
}

bool FaultProxy::WaitForRequests(uint64_t n, std::chrono::milliseconds timeout) const {
  std::unique_lock lock(mu_);
  return changed_.wait_for(lock, timeout, [&] { return requests_ >= n; });
}

void FaultProxy::Run() {
  std::vector<std::unique_ptr<Connection>> connections;

  // Takes the whole requests out of what the client sent and does with each what the fault says.
  const auto take_requests = [&](Connection& c) {
    while (!c.from_client.empty() && !c.dead && !c.stalled) {
      if (c.body_left > 0) {
        const size_t n = std::min<uint64_t>(c.body_left, c.from_client.size());
        if (c.forward_body) c.to_upstream.append(c.from_client, 0, n);
        c.from_client.erase(0, n);
        c.body_left -= n;
        continue;
      }
      const size_t end = c.from_client.find("\r\n\r\n");
      if (end == std::string::npos) {
        c.dead = c.from_client.size() > kMaxHead;
        return;
      }
      const std::string head = c.from_client.substr(0, end + 4);
      c.from_client.erase(0, end + 4);
      c.body_left = ContentLength(head);
      c.forward_body = false;
      Decision decision = NextRequest();
      switch (decision.fault) {
        case Fault::kNone:
          c.to_upstream += head;
          c.forward_body = true;
          break;
        case Fault::kAnswer:
          c.to_client += decision.answer;
          break;
        case Fault::kStall:
          c.stalled = true;
          c.from_client.clear();
          break;
        case Fault::kDrop:
          c.dead = true;
          break;
      }
    }
  };

  const auto accept_one = [&] {
    UniqueFd client(accept4(listener_.get(), nullptr, nullptr, SOCK_NONBLOCK | SOCK_CLOEXEC));
    if (!client) return;
    {
      std::lock_guard lock(mu_);
      ++connections_;
    }
    // A blocking connect: the target is on this machine, so it is immediate.
    UniqueFd upstream(socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0));
    const sockaddr_in target = Loopback(target_port_);
    if (!upstream ||
        connect(upstream.get(), reinterpret_cast<const sockaddr*>(&target), sizeof(target)) != 0) {
      return;  // the client sees its connection closed
    }
    fcntl(upstream.get(), F_SETFL, fcntl(upstream.get(), F_GETFL) | O_NONBLOCK);
    auto c = std::make_unique<Connection>();
    c->client = std::move(client);
    c->upstream = std::move(upstream);
    connections.push_back(std::move(c));
  };

  char buffer[64 * 1024];
  std::vector<pollfd> fds;
  while (true) {
    fds.clear();
    fds.push_back({wake_.get(), POLLIN, 0});
    fds.push_back({listener_.get(), POLLIN, 0});
    for (const auto& c : connections) {
      short client_events = 0, upstream_events = 0;
      if (c->to_upstream.size() < kMaxBuffered) client_events |= POLLIN;
      if (!c->to_client.empty()) client_events |= POLLOUT;
      if (c->to_client.size() < kMaxBuffered) upstream_events |= POLLIN;
      if (!c->to_upstream.empty()) upstream_events |= POLLOUT;
      fds.push_back({c->client.get(), client_events, 0});
      fds.push_back({c->upstream_closed ? -1 : c->upstream.get(), upstream_events, 0});
    }
    if (poll(fds.data(), fds.size(), -1) < 0) {
      if (errno == EINTR) continue;
      return;
    }
    if (fds[0].revents != 0) return;  // the destructor
    for (size_t i = 0; i < connections.size(); ++i) {
      Connection& c = *connections[i];
      const short client_ready = fds[2 + 2 * i].revents;
      const short upstream_ready = fds[3 + 2 * i].revents;
      if (client_ready & (POLLIN | POLLHUP | POLLERR)) {
        const ssize_t n = recv(c.client.get(), buffer, sizeof(buffer), 0);
        if (n > 0 && !c.stalled) {
          c.from_client.append(buffer, static_cast<size_t>(n));
          take_requests(c);
        } else if (n == 0 || (n < 0 && errno != EAGAIN && errno != EINTR)) {
          c.dead = true;
        }
      }
      if (!c.dead && (upstream_ready & (POLLIN | POLLHUP | POLLERR))) {
        const ssize_t n = recv(c.upstream.get(), buffer, sizeof(buffer), 0);
        if (n > 0) {
          c.to_client.append(buffer, static_cast<size_t>(n));
        } else if (n == 0 || (n < 0 && errno != EAGAIN && errno != EINTR)) {
          c.upstream_closed = true;
        }
      }
      if (!c.dead && !Flush(c.client.get(), &c.to_client)) c.dead = true;
      if (!c.dead && !c.upstream_closed && !Flush(c.upstream.get(), &c.to_upstream)) {
        c.upstream_closed = true;
      }
      // What the target said has been passed on: the client's connection ends as the target's.
      if (c.upstream_closed && c.to_client.empty()) c.dead = true;
    }
    std::erase_if(connections, [](const auto& c) { return c->dead; });
    if (fds[1].revents & POLLIN) accept_one();
  }
}

}  // namespace guestmem::testutil
