// TestFaultServer: a deliberately small page-fault handler for tests of the simulated VMM.
//
// It receives one Firecracker handshake on an accepted socket and serves the uffd in a thread:
// a missing fault is answered with UFFDIO_COPY of the page read from the memory file; in the
// secret-hiding variant (is_guest_memfd) the content is pwritten into the guest memory file and
// mapped with UFFDIO_CONTINUE, and, with a userfault bitmap, the page's bit is cleared. It then
// reads message 2 from the socket and answers the FaultRequest frames after it, one page each
// (pwrite, clear the bit, reply). Pages named by a REMOVE event (balloon) are served as zeros the
// next time. A test can make it serve one corrupted byte, ignore REMOVE events, or answer vCPU
// faults without clearing their bits, to check that the VM side notices. It is independent of the
// real fault engine on purpose: tests of vmm-sim must not depend on the code vmm-sim exists to
// test.
//
// Thread safety: construct, query and stop from one thread; the serving thread is internal.
#ifndef GUESTMEM_TOOLS_GMEM_SIM_TEST_FAULT_SERVER_H_
#define GUESTMEM_TOOLS_GMEM_SIM_TEST_FAULT_SERVER_H_

#include <fcntl.h>
#include <poll.h>
#include <sys/eventfd.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <unistd.h>

#include <atomic>
#include <chrono>
#include <cstring>
#include <deque>
#include <memory>
#include <mutex>
#include <optional>
#include <string>
#include <thread>
#include <vector>

#include "guestmem/address.h"
#include "guestmem/apf_control.h"
#include "guestmem/handshake.h"
#include "guestmem/mapping.h"
#include "guestmem/result.h"
#include "guestmem/unique_fd.h"
#include "guestmem/userfaultfd.h"
#include "guestmem/vcpu_fault_frames.h"

namespace guestmem::sim::testutil {

struct TestFaultServerOptions {
  std::string mem_file;                    // the snapshot memory file to serve
  std::optional<uint64_t> corrupt_offset;  // this file offset is served with its bits flipped
  bool ignore_remove = false;              // serve file content even after a REMOVE
  bool answer_before_clearing = false;     // reply to vCPU faults without clearing their bits
};

class TestFaultServer {
 public:
  // Accepts one connection on `listen_fd` (waiting up to `timeout`), receives its handshake and
  // starts serving it.
  static Result<std::unique_ptr<TestFaultServer>> AcceptAndStart(
      int listen_fd, const TestFaultServerOptions& options,
      std::chrono::milliseconds timeout = std::chrono::seconds(10)) {
    pollfd p{listen_fd, POLLIN, 0};
    const int ready = poll(&p, 1, static_cast<int>(timeout.count()));
    if (ready <= 0) return Error(ErrorCode::kPeerGone, "test server: nobody connected");
    UniqueFd socket(accept4(listen_fd, nullptr, nullptr, SOCK_CLOEXEC));
    if (!socket) return PosixError(errno, "test server: accept");
    GM_ASSIGN_OR_RETURN(ReceivedHandshake handshake, ReceiveHandshake(socket.get(), timeout));
    return Start(std::move(socket), std::move(handshake), options);
  }

  static Result<std::unique_ptr<TestFaultServer>> Start(UniqueFd socket,
                                                        ReceivedHandshake handshake,
                                                        const TestFaultServerOptions& options) {
    std::unique_ptr<TestFaultServer> s(new TestFaultServer(options));
    s->socket_ = std::move(socket);
    s->mem_.reset(open(options.mem_file.c_str(), O_RDONLY | O_CLOEXEC));
    if (!s->mem_) return PosixError(errno, "test server: open " + options.mem_file);
    uint64_t end = 0;
    for (const HandshakeRegion& r : handshake.regions) end = std::max(end, r.offset + r.size);
    s->state_.assign(end / kPageSize4K, kFresh);
    GM_ASSIGN_OR_RETURN(Userfaultfd uffd, Userfaultfd::Adopt(std::move(handshake.fds[0])));
    s->uffd_ = std::make_unique<Userfaultfd>(std::move(uffd));
    if (handshake.fds.size() > 1) s->guest_memfd_ = std::move(handshake.fds[1]);
    if (handshake.fds.size() > 2) {
      struct stat st {};
      if (fstat(handshake.fds[2].get(), &st) != 0) return PosixError(errno, "test server: fstat");
      GM_ASSIGN_OR_RETURN(
          s->bitmap_,
          Mapping::Map(
              AlignUp(static_cast<uint64_t>(st.st_size), kPageSize4K).value_or(kPageSize4K),
              PROT_READ | PROT_WRITE, MAP_SHARED, handshake.fds[2].get(), 0));
    }
    s->handshake_ = std::move(handshake);
    s->stop_.reset(eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK));
    s->thread_ = std::thread([raw = s.get()] { raw->Serve(); });
    return s;
  }

  ~TestFaultServer() { Stop(); }

  void Stop() {
    if (!thread_.joinable()) return;
    const uint64_t one = 1;
    (void)!write(stop_.get(), &one, sizeof(one));
    thread_.join();
  }

  const ReceivedHandshake& handshake() const { return handshake_; }
  // The VM closed its end of the handshake socket (it exited, as far as a handler can tell).
  bool PeerHungUp() const {
    pollfd p{socket_.get(), POLLRDHUP, 0};
    return poll(&p, 1, 0) == 1 && (p.revents & (POLLRDHUP | POLLHUP)) != 0;
  }
  // Pages this server mapped (faults found already resolved are not counted). Final only after
  // Stop(): the faulting thread may run on before the count is updated.
  uint64_t pages_served() const { return pages_served_.load(); }
  uint64_t zero_pages_served() const { return zero_pages_served_.load(); }
  // The first thing that went wrong while serving, or "".
  std::string error() const {
    std::lock_guard lock(mu_);
    return error_;
  }
  // Message 2 as it came ("" until then), and the FaultRequests answered, in order.
  std::string apf_control() const {
    std::lock_guard lock(mu_);
    return apf_control_;
  }
  std::vector<FaultRequest> requests() const {
    std::lock_guard lock(mu_);
    return requests_;
  }

 private:
  enum : uint8_t { kFresh, kServed, kRemoved };
  enum class Served { kDone, kRetry, kStop };

  explicit TestFaultServer(const TestFaultServerOptions& options) : options_(options) {}

  void Fail(const std::string& what) {
    std::lock_guard lock(mu_);
    if (error_.empty()) error_ = what;
  }

  void ClearBit(uint64_t file_offset, uint64_t length) {
    if (!bitmap_.valid() || options_.answer_before_clearing) return;
    auto* bytes = static_cast<uint8_t*>(bitmap_.data());
    for (uint64_t p = file_offset / kPageSize4K; p < (file_offset + length) / kPageSize4K; ++p) {
      std::atomic_ref<uint8_t>(bytes[p / 8])
          .fetch_and(static_cast<uint8_t>(~(1u << (p % 8))), std::memory_order_release);
    }
  }

  // The page of a vCPU fault into the guest memory file (once), its bit cleared, then the reply.
  bool AnswerRequest(const FaultRequest& request) {
    const HandshakeRegion* r = nullptr;
    for (const HandshakeRegion& region : handshake_.regions) {
      const uint64_t start = region.gpa_start.value_or(region.offset);
      if (request.gpa && *request.gpa >= start && *request.gpa - start < region.size) r = &region;
    }
    if (r == nullptr) {
      Fail("a FaultRequest outside every region: " + Describe(request));
      return false;
    }
    const uint64_t page = r->page_size;
    const uint64_t file_offset =
        r->offset + AlignDown(*request.gpa - r->gpa_start.value_or(r->offset), page);
    uint8_t& state = state_[file_offset / kPageSize4K];
    if (state != kServed) {
      buffer_.assign(page, std::byte{0});
      if (state != kRemoved &&
          pread(mem_.get(), buffer_.data(), page, static_cast<off_t>(file_offset)) !=
              static_cast<ssize_t>(page)) {
        Fail("pread of the memory file failed at " + std::to_string(file_offset));
        return false;
      }
      if (pwrite(guest_memfd_.get(), buffer_.data(), page, static_cast<off_t>(file_offset)) !=
          static_cast<ssize_t>(page)) {
        Fail("pwrite of the guest memory file failed at " + std::to_string(file_offset));
        return false;
      }
      state = kServed;
      ++pages_served_;
    }
    ClearBit(file_offset, page);
    {
      std::lock_guard lock(mu_);
      requests_.push_back(request);
    }
    const Frame reply = EncodeFaultReply(ReplyTo(request));
    if (send(socket_.get(), reply.bytes().data(), reply.size(), MSG_NOSIGNAL) !=
        static_cast<ssize_t>(reply.size())) {
      Fail("sending a FaultReply failed");
      return false;
    }
    return true;
  }

  // Message 2, then the frames after it. False when serving must stop.
  bool ReadSocket() {
    if (!control_read_) {
      auto control = PeekApfControl(socket_.get());
      if (!control) {
        if (control.error().code() != ErrorCode::kPeerGone) Fail(control.error().ToString());
        return false;
      }
      if (!*control) return true;
      if (!ConsumeApfControl(socket_.get(), (*control)->bytes)) return false;
      std::lock_guard lock(mu_);
      apf_control_ = (*control)->vcpus == 0
                         ? std::string(kNoExitlessApf)
                         : std::string(kExitlessApfPrefix) + std::to_string((*control)->vcpus);
      control_read_ = true;
      return true;
    }
    const ssize_t n =
        recv(socket_.get(), frames_ + frames_size_, sizeof(frames_) - frames_size_, MSG_DONTWAIT);
    if (n == 0) return false;
    if (n < 0) return errno == EAGAIN || errno == EINTR;
    frames_size_ += static_cast<size_t>(n);
    size_t pos = 0;
    while (true) {
      const std::span<const uint8_t> rest(frames_ + pos, frames_size_ - pos);
      auto size = FrameSize(rest, kMaxFaultRequestPayload);
      if (!size) {
        Fail(size.error().ToString());
        return false;
      }
      if (!*size) break;
      auto request =
          DecodeFaultRequest(rest.subspan(kFrameHeaderBytes, **size - kFrameHeaderBytes));
      if (!request) {
        Fail(request.error().ToString());
        return false;
      }
      if (!AnswerRequest(*request)) return false;
      pos += **size;
    }
    std::memmove(frames_, frames_ + pos, frames_size_ - pos);
    frames_size_ -= pos;
    return true;
  }

  const HandshakeRegion* RegionOf(uint64_t addr) const {
    for (const HandshakeRegion& r : handshake_.regions) {
      if (addr >= r.base_host_virt_addr && addr - r.base_host_virt_addr < r.size) return &r;
    }
    return nullptr;
  }

  void MarkRemoved(const RemoveEvent& e) {
    if (options_.ignore_remove) return;
    for (const HandshakeRegion& r : handshake_.regions) {
      const uint64_t lo = std::max(e.start.value(), r.base_host_virt_addr);
      const uint64_t hi = std::min(e.end.value(), r.base_host_virt_addr + r.size);
      for (uint64_t a = lo; a + r.page_size <= hi; a += r.page_size) {
        state_[(r.offset + a - r.base_host_virt_addr) / kPageSize4K] = kRemoved;
      }
    }
  }

  // `*installed`: this call mapped the page (rather than finding it mapped already).
  Served Settle(const Result<UffdProgress>& done, HostVirtAddr host, uint64_t length,
                bool* installed = nullptr) {
    if (!done) {
      Fail(done.error().ToString());
      return Served::kStop;
    }
    switch (done->outcome) {
      case UffdProgress::Outcome::kDone:
        if (installed != nullptr) *installed = true;
        return Served::kDone;
      case UffdProgress::Outcome::kAgain:
        return Served::kRetry;
      case UffdProgress::Outcome::kTaskGone:
        return Served::kStop;
      case UffdProgress::Outcome::kExists:
      case UffdProgress::Outcome::kNoMapping:  // unmapped meanwhile: wake whoever waits
        break;
    }
    auto woken = uffd_->Wake(host, length);
    if (!woken) Fail(woken.error().ToString());
    return woken ? Served::kDone : Served::kStop;
  }

  Served ServeFault(const PagefaultEvent& fault) {
    const HandshakeRegion* r = RegionOf(fault.address.value());
    if (r == nullptr) {
      Fail("fault outside every region");
      return Served::kStop;
    }
    const uint64_t page = r->page_size;
    const uint64_t in_region = AlignDown(fault.address.value() - r->base_host_virt_addr, page);
    const uint64_t file_offset = r->offset + in_region;
    const HostVirtAddr host(r->base_host_virt_addr + in_region);
    uint8_t& state = state_[file_offset / kPageSize4K];
    const bool in_file = r->is_guest_memfd.value_or(false);
    if (in_file && state == kServed) {
      ClearBit(file_offset, page);
      return Settle(uffd_->Continue(host, page), host, page);
    }
    buffer_.assign(page, std::byte{0});
    const bool zero = state == kRemoved;
    if (!zero) {
      if (pread(mem_.get(), buffer_.data(), page, static_cast<off_t>(file_offset)) !=
          static_cast<ssize_t>(page)) {
        Fail("pread of the memory file failed at " + std::to_string(file_offset));
        return Served::kStop;
      }
      if (options_.corrupt_offset && *options_.corrupt_offset >= file_offset &&
          *options_.corrupt_offset - file_offset < page) {
        buffer_[*options_.corrupt_offset - file_offset] ^= std::byte{0xff};
      }
    }
    Served served;
    bool installed = false;
    if (in_file) {
      if (pwrite(guest_memfd_.get(), buffer_.data(), page, static_cast<off_t>(file_offset)) !=
          static_cast<ssize_t>(page)) {
        Fail("pwrite of the guest memory file failed at " + std::to_string(file_offset));
        return Served::kStop;
      }
      state = kServed;
      ClearBit(file_offset, page);
      served = Settle(uffd_->Continue(host, page), host, page, &installed);
    } else {
      served = Settle(uffd_->Copy(host, buffer_.data(), page), host, page, &installed);
      if (served == Served::kDone) state = kServed;
    }
    if (installed) {
      ++pages_served_;
      if (zero) ++zero_pages_served_;
    }
    return served;
  }

  void Serve() {
    std::deque<PagefaultEvent> pending;
    std::vector<UffdEvent> events;
    while (true) {
      // The socket is read only for a VM with a bitmap: others send nothing after message 1.
      pollfd fds[3] = {{uffd_->fd(), POLLIN, 0},
                       {stop_.get(), POLLIN, 0},
                       {bitmap_.valid() && socket_open_ ? socket_.get() : -1, POLLIN, 0}};
      poll(fds, 3, pending.empty() ? 200 : 1);
      if (fds[1].revents != 0) return;
      if (fds[2].revents != 0 && !ReadSocket()) socket_open_ = false;
      events.clear();
      auto read = uffd_->ReadEvents(&events);
      if (!read) {
        Fail(read.error().ToString());
        return;
      }
      for (UffdEvent& e : events) {  // removals first: they may precede faults read with them
        if (auto* remove = std::get_if<RemoveEvent>(&e)) MarkRemoved(*remove);
      }
      for (UffdEvent& e : events) {
        if (auto* fault = std::get_if<PagefaultEvent>(&e)) pending.push_back(*fault);
      }
      while (!pending.empty()) {
        const Served served = ServeFault(pending.front());
        if (served == Served::kStop) return;
        if (served == Served::kRetry) break;  // an event is pending: read it first
        pending.pop_front();
      }
    }
  }

  TestFaultServerOptions options_;
  UniqueFd socket_;
  UniqueFd mem_;
  UniqueFd guest_memfd_;
  UniqueFd stop_;
  std::unique_ptr<Userfaultfd> uffd_;
  ReceivedHandshake handshake_;
  Mapping bitmap_;  // the userfault bitmap (secret hiding)
  bool control_read_ = false;
  bool socket_open_ = true;
  uint8_t frames_[4096];
  size_t frames_size_ = 0;
  std::string apf_control_;             // GUARDED_BY(mu_)
  std::vector<FaultRequest> requests_;  // GUARDED_BY(mu_)
  std::vector<uint8_t> state_;          // per 4 KiB of file: kFresh / kServed / kRemoved
  std::vector<std::byte> buffer_;
  std::atomic<uint64_t> pages_served_{0};
  std::atomic<uint64_t> zero_pages_served_{0};
  mutable std::mutex mu_;
  std::string error_;
  std::thread thread_;
};

}  // namespace guestmem::sim::testutil

#endif  // GUESTMEM_TOOLS_GMEM_SIM_TEST_FAULT_SERVER_H_
