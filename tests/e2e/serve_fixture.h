// The fixture of the end-to-end tests of `gmem serve`: a snapshot, the real daemon, real
// `gmem vmm-sim` processes (which map, register and hand over guest memory exactly as Firecracker
// does), and the parts of hand-made bad clients.
#ifndef GUESTMEM_TESTS_E2E_SERVE_FIXTURE_H_
#define GUESTMEM_TESTS_E2E_SERVE_FIXTURE_H_

#include <gtest/gtest.h>
#include <poll.h>
#include <signal.h>
#include <sys/mman.h>
#include <sys/socket.h>

#include <cerrno>
#include <chrono>
#include <cstring>
#include <memory>
#include <string>
#include <thread>
#include <vector>

#include "base/temp_dir.h"
#include "guestmem/userfaultfd.h"
#include "testutil/snapshot_file.h"
#include "testutil/subprocess.h"

namespace guestmem::e2e {

using namespace std::chrono_literals;
using testutil::Subprocess;

class ServeTest : public ::testing::Test {
 protected:
  void SetUp() override {
    ASSERT_FALSE(dir_.empty());
    // 32 MiB snapshot, every 5th page a hole.
    snapshot_ =
        std::make_unique<testutil::SnapshotFile>(8192, [](uint64_t p) { return p % 5 == 2; });
  }
  void TearDown() override { server_.reset(); }

  // Starts `gmem serve` on the snapshot, `prefix` before it on the command line (a wrapper such
  // as prlimit), `extra` after it.
  void StartServer(std::vector<std::string> extra = {}, std::vector<std::string> prefix = {}) {
    std::vector<std::string> argv = prefix;
    const std::string served = served_path_.empty() ? snapshot_->path() : served_path_;
    for (const std::string& a : {std::string(GMEM_BINARY), std::string("serve"), socket_, served,
                                 std::string("--cache-dir"), dir_ + "/cache"}) {
      argv.push_back(a);
    }
    argv.insert(argv.end(), extra.begin(), extra.end());
    // A log of its own per start, so that waiting for its first line cannot find an earlier one.
    const std::string log =
        dir_ + (servers_started_++ == 0 ? "/serve.log"
                                        : "/serve-" + std::to_string(servers_started_) + ".log");
    server_ = std::make_unique<Subprocess>(argv, log);
    ASSERT_TRUE(server_->WaitForOutput("serving ")) << server_->Output();
  }

  std::unique_ptr<Subprocess> StartVm(const std::string& name, std::vector<std::string> extra) {
    std::vector<std::string> argv = {GMEM_BINARY, "vmm-sim",    "--socket",
                                     socket_,     "--mem-file", snapshot_->path()};
    argv.insert(argv.end(), extra.begin(), extra.end());
    return std::make_unique<Subprocess>(argv, dir_ + "/" + name + ".log");
  }

  // The daemon's line that tells the end of the VM named by `who` ("vm 3 (" or its pid):
  // " disconnected " when its socket hung up first, " ended after " when its space found first that
  // its process had exited. "" at the deadline.
  std::string WaitForVmEnd(const std::string& who, std::chrono::milliseconds timeout = 20s) {
    return server_->WaitForAnyLine({{who, " disconnected "}, {who, " ended after "}}, timeout);
  }

  void ExpectVmVerifies(std::vector<std::string> extra, const std::string& name = "vm") {
    auto vm = StartVm(name, extra);
    EXPECT_EQ(vm->ExitCode(120s), 0) << "vmm-sim output:\n"
                                     << vm->Output() << "\nserve log:\n"
                                     << server_->Output();
  }

  TempDir temp_;
  const std::string dir_ = temp_.path();
  const std::string socket_ = temp_.File("uffd.sock");
  std::unique_ptr<testutil::SnapshotFile> snapshot_;
  std::string served_path_;  // what the daemon serves, when not snapshot_ (a packed snapshot)
  std::unique_ptr<Subprocess> server_;
  int servers_started_ = 0;
};

// Whether a process that exited with `exit_code` (testutil::Subprocess: -signal when killed),
// printing `output`, died of SIGBUS: killed by it, or under a sanitizer, which catches the signal,
// reported by it (ASan may name a SIGBUS near a thread's stack a stack overflow).
inline bool DiedOfSigbus(int exit_code, const std::string& output) {
  return exit_code == -SIGBUS || output.find("Sanitizer: BUS") != std::string::npos ||
         output.find("AddressSanitizer:DEADLYSIGNAL") != std::string::npos;
}

// --- bad clients ---------------------------------------------------------------------------

// Whether the daemon has closed `fd`, waiting at most `timeout`: EOF, or ECONNRESET when the
// daemon closed it with bytes of ours still unread.
inline bool ClosedByPeer(int fd, std::chrono::milliseconds timeout) {
  pollfd pfd{fd, POLLIN, 0};
  if (poll(&pfd, 1, static_cast<int>(timeout.count())) != 1) return false;
  char byte;
  const ssize_t n = recv(fd, &byte, 1, MSG_DONTWAIT | MSG_PEEK);
  return n == 0 || (n < 0 && errno == ECONNRESET);
}

// A uffd with real registered memory, for handshakes that are wrong in other ways.
struct BadClientMemory {
  BadClientMemory() {
    mem = mmap(nullptr, 4 << 20, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    auto u = Userfaultfd::Create({});
    EXPECT_TRUE(u.has_value());
    uffd = std::make_unique<Userfaultfd>(std::move(*u));
    EXPECT_TRUE(uffd->Register(HostVirtAddr(reinterpret_cast<uint64_t>(mem)), 4 << 20,
                               UffdModes::kMissing));
  }
  ~BadClientMemory() { munmap(mem, 4 << 20); }
  uint64_t base() const { return reinterpret_cast<uint64_t>(mem); }
  void* mem;
  std::unique_ptr<Userfaultfd> uffd;
};

inline void SendRaw(int sock, const std::string& bytes, int fd = -1) {
  iovec iov{const_cast<char*>(bytes.data()), bytes.size()};
  msghdr msg{};
  msg.msg_iov = &iov;
  msg.msg_iovlen = 1;
  alignas(cmsghdr) char control[CMSG_SPACE(sizeof(int))];
  if (fd >= 0) {
    msg.msg_control = control;
    msg.msg_controllen = sizeof(control);
    cmsghdr* cmsg = CMSG_FIRSTHDR(&msg);
    cmsg->cmsg_level = SOL_SOCKET;
    cmsg->cmsg_type = SCM_RIGHTS;
    cmsg->cmsg_len = CMSG_LEN(sizeof(int));
    std::memcpy(CMSG_DATA(cmsg), &fd, sizeof(int));
  }
  ASSERT_EQ(sendmsg(sock, &msg, 0), static_cast<ssize_t>(bytes.size()));
}

}  // namespace guestmem::e2e

#endif  // GUESTMEM_TESTS_E2E_SERVE_FIXTURE_H_
