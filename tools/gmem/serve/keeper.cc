#include "serve/keeper.h"

#include <fcntl.h>
#include <poll.h>
#include <spawn.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <chrono>
#include <cstring>
#include <map>
#include <nlohmann/json.hpp>
#include <optional>
#include <thread>

#include "guestmem/log.h"
#include "guestmem/unix_socket.h"

extern char** environ;

namespace guestmem::cli {
namespace {

using Json = nlohmann::json;

constexpr uint32_t kMaxMessageBytes = 4u << 20;
constexpr size_t kMaxFdsPerMessage = kMaxKeptFds;
constexpr std::chrono::seconds kIoTimeout{5};

struct Message {
  Json json;
  std::vector<UniqueFd> fds;
};

Error Protocol(const std::string& what) {
  return Error(ErrorCode::kProtocolError, "keeper: " + what);
}

void SetTimeouts(int fd) {
  timeval tv{static_cast<time_t>(kIoTimeout.count()), 0};
  (void)setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof(tv));
  (void)setsockopt(fd, SOL_SOCKET, SO_SNDTIMEO, &tv, sizeof(tv));
}

Status SendMessage(int fd, const Json& json, std::span<const int> fds) {
  if (fds.size() > kMaxFdsPerMessage) return Protocol("too many descriptors in one message");
  const std::string body = json.dump();
  std::string data(4, '\0');
  const auto length = static_cast<uint32_t>(body.size());
  for (int i = 0; i < 4; ++i) data[i] = static_cast<char>((length >> (8 * i)) & 0xff);
  data += body;
  alignas(cmsghdr) char control[CMSG_SPACE(sizeof(int) * kMaxFdsPerMessage)];
  size_t done = 0;
  while (done < data.size()) {
    iovec iov{data.data() + done, data.size() - done};
    msghdr msg{};
    msg.msg_iov = &iov;
    msg.msg_iovlen = 1;
    if (done == 0 && !fds.empty()) {
      msg.msg_control = control;
      msg.msg_controllen = CMSG_SPACE(sizeof(int) * fds.size());
      cmsghdr* cmsg = CMSG_FIRSTHDR(&msg);
      cmsg->cmsg_level = SOL_SOCKET;
      cmsg->cmsg_type = SCM_RIGHTS;
      cmsg->cmsg_len = CMSG_LEN(sizeof(int) * fds.size());
      std::memcpy(CMSG_DATA(cmsg), fds.data(), sizeof(int) * fds.size());
    }
    const ssize_t n = sendmsg(fd, &msg, MSG_NOSIGNAL);
    if (n < 0 && errno == EINTR) continue;
    if (n < 0) return PosixError(errno, "keeper: send");
    done += static_cast<size_t>(n);
  }
  return OkStatus();
}

// Reads exactly `out.size()` bytes; the descriptors riding on them are appended to *fds.
// kPeerGone on a hang-up before the first byte.
Status ReceiveExactly(int fd, std::span<char> out, std::vector<UniqueFd>* fds) {
  size_t done = 0;
  while (done < out.size()) {
    iovec iov{out.data() + done, out.size() - done};
    alignas(cmsghdr) char control[CMSG_SPACE(sizeof(int) * kMaxFdsPerMessage)];
    msghdr msg{};
    msg.msg_iov = &iov;
    msg.msg_iovlen = 1;
    msg.msg_control = control;
    msg.msg_controllen = sizeof(control);
    const ssize_t n = recvmsg(fd, &msg, MSG_CMSG_CLOEXEC);
    if (n < 0 && errno == EINTR) continue;
    if (n < 0) return PosixError(errno, "keeper: receive");
    for (cmsghdr* c = CMSG_FIRSTHDR(&msg); c != nullptr; c = CMSG_NXTHDR(&msg, c)) {
      if (c->cmsg_level != SOL_SOCKET || c->cmsg_type != SCM_RIGHTS) continue;
      const size_t count = (c->cmsg_len - CMSG_LEN(0)) / sizeof(int);
      for (size_t i = 0; i < count; ++i) {
        int received;
        std::memcpy(&received, CMSG_DATA(c) + i * sizeof(int), sizeof(int));
        fds->emplace_back(received);
      }
    }
    if ((msg.msg_flags & MSG_CTRUNC) != 0) return Protocol("too many descriptors");
    if (n == 0) {
      if (done == 0) return Error(ErrorCode::kPeerGone, "keeper: the other side hung up");
      return Protocol("message cut short");
    }
    done += static_cast<size_t>(n);
  }
  return OkStatus();
}

Result<Message> ReceiveMessage(int fd) {
  Message message;
  char header[4];
  GM_RETURN_IF_ERROR(ReceiveExactly(fd, header, &message.fds));
  uint32_t length = 0;
  for (int i = 0; i < 4; ++i) length |= uint32_t{static_cast<uint8_t>(header[i])} << (8 * i);
  if (length > kMaxMessageBytes) return Protocol("message of " + std::to_string(length) + " bytes");
  std::string body(length, '\0');
  GM_RETURN_IF_ERROR(ReceiveExactly(fd, body, &message.fds));
  message.json = Json::parse(body, nullptr, /*allow_exceptions=*/false);
  if (!message.json.is_object()) return Protocol("a message is not a JSON object");
  return message;
}

std::vector<int> Raw(const std::vector<UniqueFd>& fds) {
  std::vector<int> raw;
  for (const UniqueFd& fd : fds) raw.push_back(fd.get());
  return raw;
}

std::optional<uint64_t> UnsignedAt(const Json& json, const char* key) {
  auto it = json.find(key);
  if (it == json.end() || !it->is_number_unsigned()) return std::nullopt;
  return it->get<uint64_t>();
}

// --- the keeper process ------------------------------------------------------------------------

class Keeper {
 public:
  explicit Keeper(UniqueFd listener) : listener_(std::move(listener)) {}

  Status Run() {
    while (true) {
      std::vector<pollfd> fds;
      std::vector<uint64_t> watched;  // the VM of fds[i] for i >= 2
      fds.push_back({listener_.get(), POLLIN, 0});
      fds.push_back({owner_ ? owner_.get() : -1, POLLIN, 0});
      for (const auto& [id, vm] : vms_) {
        fds.push_back({vm.fds[vm.watch].get(), POLLRDHUP, 0});
        watched.push_back(id);
      }
      if (poll(fds.data(), fds.size(), -1) < 0) {
        if (errno == EINTR) continue;
        return PosixError(errno, "keeper: poll");
      }
      if (fds[1].revents != 0 && !ServeOwner()) return OkStatus();  // released
      for (size_t i = 2; i < fds.size(); ++i) {
        if (fds[i].revents == 0) continue;
        Log(LogLevel::kInfo,
            "keeper: VM " + std::to_string(watched[i - 2]) + " hung up; letting it go");
        vms_.erase(watched[i - 2]);
      }
      if (fds[0].revents != 0) Accept();
      if (!owner_ && vms_.empty()) {
        Log(LogLevel::kInfo, "keeper: no daemon and nothing kept; exiting");
        return OkStatus();
      }
    }
  }

 private:
  struct Vm {
    std::string description;
    std::vector<UniqueFd> fds;
    size_t watch = 0;
  };

  void Accept() {
    UniqueFd conn(accept4(listener_.get(), nullptr, nullptr, SOCK_CLOEXEC));
    if (!conn) return;
    SetTimeouts(conn.get());
    auto peer = GetPeerCredentials(conn.get());
    if (!peer || (peer->uid != getuid() && peer->uid != 0)) {
      Log(LogLevel::kWarning, "keeper: refused a connection from uid " +
                                  (peer ? std::to_string(peer->uid) : std::string("?")));
      return;
    }
    auto request = ReceiveMessage(conn.get());
    if (!request || request->json.value("op", "") != "take") {
      Log(LogLevel::kWarning, "keeper: a connection did not begin with a takeover");
      return;
    }
    if (owner_) {
      (void)SendMessage(conn.get(), {{"ok", false}, {"error", "another daemon owns the keeper"}},
                        {});
      return;
    }
    Json reply = {{"ok", true},
                  {"vms", vms_.size()},
                  {"listener", static_cast<bool>(kept_listener_)},
                  {"apf_listener", static_cast<bool>(kept_apf_listener_)}};
    if (!SendMessage(conn.get(), reply, {})) return;
    for (const auto& [id, vm] : vms_) {
      const std::vector<int> raw = Raw(vm.fds);
      if (!SendMessage(conn.get(), {{"id", id}, {"description", vm.description}}, raw)) return;
    }
    if (kept_listener_) {
      const int raw = kept_listener_.get();
      if (!SendMessage(conn.get(), {{"listener", true}}, std::span(&raw, 1))) return;
    }
    if (kept_apf_listener_) {
      const int raw = kept_apf_listener_.get();
      if (!SendMessage(conn.get(), {{"apf_listener", true}}, std::span(&raw, 1))) return;
    }
    Log(LogLevel::kInfo, "keeper: a daemon took over " + std::to_string(vms_.size()) + " VM(s)");
    // The owner is trusted to finish what it sends: only its hang-up ends its ownership.
    timeval none{0, 0};
    (void)setsockopt(conn.get(), SOL_SOCKET, SO_RCVTIMEO, &none, sizeof(none));
    owner_ = std::move(conn);
  }

  // Handles one request of the owner. Returns false when the keeper must end (released).
  bool ServeOwner() {
    auto request = ReceiveMessage(owner_.get());
    if (!request) {
      Log(LogLevel::kInfo, "keeper: the daemon went away (" + request.error().ToString() +
                               "); holding " + std::to_string(vms_.size()) +
                               " VM(s) for its successor");
      owner_.reset();
      return true;
    }
    const std::string op = request->json.value("op", "");
    Status done = OkStatus();
    bool go_on = true;
    if (op == "keep") {
      const auto id = UnsignedAt(request->json, "id");
      const auto watch = UnsignedAt(request->json, "watch");
      auto description = request->json.find("description");
      if (!id || !watch || *watch >= request->fds.size() || description == request->json.end() ||
          !description->is_string()) {
        done = Protocol("a malformed keep request");
      } else {
        vms_[*id] = Vm{description->get<std::string>(), std::move(request->fds),
                       static_cast<size_t>(*watch)};
      }
    } else if (op == "forget") {
      const auto id = UnsignedAt(request->json, "id");
      if (id) vms_.erase(*id);
      if (!id) done = Protocol("a malformed forget request");
    } else if (op == "listener") {
      if (request->fds.size() != 1) {
        done = Protocol("a listener request without its descriptor");
      } else if (request->json.value("role", "uffd") == "apf") {
        kept_apf_listener_ = std::move(request->fds[0]);
      } else {
        kept_listener_ = std::move(request->fds[0]);
      }
    } else if (op == "release") {
      Log(LogLevel::kInfo,
          "keeper: released by the daemon; letting " + std::to_string(vms_.size()) + " VM(s) go");
      go_on = false;
    } else {
      done = Protocol("unknown request \"" + op + "\"");
    }
    Json reply =
        done ? Json{{"ok", true}} : Json{{"ok", false}, {"error", done.error().ToString()}};
    if (!SendMessage(owner_.get(), reply, {})) owner_.reset();
    return go_on;
  }

  UniqueFd listener_;
  UniqueFd owner_;
  UniqueFd kept_listener_;
  UniqueFd kept_apf_listener_;
  std::map<uint64_t, Vm> vms_;
};

Status ReplyStatus(const Message& reply) {
  if (reply.json.value("ok", false)) return OkStatus();
  const std::string error = reply.json.value("error", std::string("no reason given"));
  if (error.find("another daemon") != std::string::npos) {
    return Error(ErrorCode::kFailedPrecondition, "keeper: " + error);
  }
  return Protocol(error);
}

// Runs `gmem keeper PATH` and waits until it listens (its first process exits once it does).
Status StartKeeper(const std::string& path, const std::string& program) {
  std::vector<std::string> args = {"gmem", "keeper", path};
  std::vector<char*> argv;
  for (std::string& arg : args) argv.push_back(arg.data());
  argv.push_back(nullptr);
  pid_t pid = 0;
  const int rc = posix_spawn(&pid, program.c_str(), nullptr, nullptr, argv.data(), environ);
  if (rc != 0) return PosixError(rc, "keeper: starting " + program);
  int status = 0;
  while (waitpid(pid, &status, 0) < 0) {
    if (errno != EINTR) return PosixError(errno, "keeper: waiting for it to start");
  }
  if (!WIFEXITED(status) || WEXITSTATUS(status) != 0) {
    return Error(
        ErrorCode::kFailedPrecondition,
        "keeper: `gmem keeper " + path + "` did not start (status " + std::to_string(status) + ")");
  }
  return OkStatus();
}

}  // namespace

// --- the daemon's side ---------------------------------------------------------------------------

Result<std::unique_ptr<KeeperClient>> KeeperClient::Open(const std::string& path,
                                                         const std::string& program) {
  auto connected = ConnectUnix(path);
  if (!connected) {
    // Nobody there (or a keeper another daemon just started won the race: then connect again).
    auto started = StartKeeper(path, program);
    connected = ConnectUnix(path);
    if (!connected) {
      if (!started) return std::move(started).error();
      return std::move(connected).error();
    }
  }
  SetTimeouts(connected->get());
  return std::unique_ptr<KeeperClient>(new KeeperClient(path, std::move(*connected)));
}

Status KeeperClient::Call(std::string_view json, std::span<const int> fds) {
  GM_RETURN_IF_ERROR(SendMessage(socket_.get(), Json::parse(json), fds));
  GM_ASSIGN_OR_RETURN(Message reply, ReceiveMessage(socket_.get()));
  return ReplyStatus(reply);
}

Result<Inheritance> KeeperClient::TakeOver() {
  GM_RETURN_IF_ERROR(SendMessage(socket_.get(), {{"op", "take"}}, {}));
  GM_ASSIGN_OR_RETURN(Message reply, ReceiveMessage(socket_.get()));
  GM_RETURN_IF_ERROR(ReplyStatus(reply));
  Inheritance out;
  const uint64_t count = UnsignedAt(reply.json, "vms").value_or(0);
  for (uint64_t i = 0; i < count; ++i) {
    GM_ASSIGN_OR_RETURN(Message vm, ReceiveMessage(socket_.get()));
    const auto id = UnsignedAt(vm.json, "id");
    auto description = vm.json.find("description");
    if (!id || description == vm.json.end() || !description->is_string()) {
      return Protocol("a kept VM without its id or description");
    }
    out.vms.push_back(KeptVm{*id, description->get<std::string>(), std::move(vm.fds)});
  }
  if (reply.json.value("listener", false)) {
    GM_ASSIGN_OR_RETURN(Message listener, ReceiveMessage(socket_.get()));
    if (listener.fds.size() != 1) return Protocol("the kept listener came without its descriptor");
    out.listener = std::move(listener.fds[0]);
  }
  if (reply.json.value("apf_listener", false)) {
    GM_ASSIGN_OR_RETURN(Message listener, ReceiveMessage(socket_.get()));
    if (listener.fds.size() != 1) {
      return Protocol("the kept APF listener came without its descriptor");
    }
    out.apf_listener = std::move(listener.fds[0]);
  }
  return out;
}

Status KeeperClient::KeepListener(int listener_fd, ListenerRole role) {
  return Call(
      role == ListenerRole::kApf ? R"({"op":"listener","role":"apf"})" : R"({"op":"listener"})",
      std::span(&listener_fd, 1));
}

Status KeeperClient::Keep(uint64_t id, std::string_view description, std::span<const int> fds,
                          size_t watch) {
  const Json request = {{"op", "keep"}, {"id", id}, {"description", description}, {"watch", watch}};
  return Call(request.dump(), fds);
}

Status KeeperClient::Forget(uint64_t id) {
  return Call(Json{{"op", "forget"}, {"id", id}}.dump(), {});
}

Status KeeperClient::Release() { return Call(R"({"op":"release"})", {}); }

// --- `gmem keeper PATH`
// ---------------------------------------------------------------------------

Status RunKeeper(const std::string& path) {
  GM_ASSIGN_OR_RETURN(UniqueFd listener, ListenUnix(path, UnixListenOptions{.mode = 0600}));
  // The first process returns once the socket listens (the daemon waits for that); the keeper
  // goes on in a new session of its own, so that signals to the daemon's group do not reach it.
  const pid_t child = fork();
  if (child < 0) return PosixError(errno, "keeper: fork");
  if (child > 0) _exit(0);
  (void)setsid();
  // Blocking accepts: one daemon at a time talks to the keeper.
  const int flags = fcntl(listener.get(), F_GETFL);
  if (flags >= 0) (void)fcntl(listener.get(), F_SETFL, flags & ~O_NONBLOCK);
  Keeper keeper(std::move(listener));
  Status run = keeper.Run();
  unlink(path.c_str());
  return run;
}

}  // namespace guestmem::cli
