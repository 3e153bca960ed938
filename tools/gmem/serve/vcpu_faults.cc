#include "serve/vcpu_faults.h"

#include <sys/socket.h>
#include <sys/uio.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstring>

#include "base/hex.h"
#include "guestmem/address.h"

namespace guestmem::cli {
namespace {

// What one look at a socket takes at most: many frames (the longest valid one is 51 bytes).
constexpr size_t kPeekBytes = 4096;
// Descriptors a peek has room for: any at all is a protocol error, but they must be received to be
// closed.
constexpr size_t kPeekControlFds = 16;
// Frames written per sendmsg.
constexpr size_t kFramesPerWrite = 64;
// Drain-and-arm rounds of one ring per call before it yields to the rest of the loop.
constexpr int kRingRounds = 4;

const char* ChannelName(VcpuChannel channel) {
  switch (channel) {
    case VcpuChannel::kUffdSocket:
      return "the Uffd socket";
    case VcpuChannel::kApfSocket:
      return "the APF socket";
    case VcpuChannel::kExitlessRing:
      return "an exitless ring";
  }
  return "?";
}

uint64_t PageGpa(uint64_t gpa) { return gpa & ~(kPageSize4K - 1); }

}  // namespace

struct VcpuFaults::Ring {
  uint32_t vcpu = 0;
  UniqueFd notify;
  UniqueFd complete;
  UniqueFd vcpu_fd;
  ExitlessRing ring;
  uint32_t in_flight = 0;        // taken and not yet pushed back
  std::deque<uint32_t> waiting;  // slots whose completion found the complete ring full
  bool signal = false;           // completions pushed since the eventfd was last written
  bool blocked = false;          // stopped draining for want of room
};

VcpuFaults::VcpuFaults(std::string name, int uffd_socket, std::unique_ptr<VcpuRequestTable> table)
    : name_(std::move(name)),
      uffd_socket_(uffd_socket),
      table_(std::move(table)),
      taken_at_(VcpuRequestTable::kSlots) {}

VcpuFaults::~VcpuFaults() = default;

Status VcpuFaults::SetUpExitless(std::vector<UniqueFd> fds) {
  std::vector<std::unique_ptr<Ring>> rings;
  for (size_t i = 0; i + 2 < fds.size(); i += 3) {
    const auto vcpu = static_cast<uint32_t>(i / 3);
    auto mapped = ExitlessRing::Map(fds[i + 2].get());
    if (!mapped) {
      return std::move(mapped).error().WithContext("exitless APF ring of vCPU " +
                                                   std::to_string(vcpu));
    }
    auto ring = std::unique_ptr<Ring>(new Ring{vcpu, std::move(fds[i]), std::move(fds[i + 1]),
                                               std::move(fds[i + 2]), std::move(*mapped)});
    rings.push_back(std::move(ring));
  }
  rings_ = std::move(rings);
  return OkStatus();
}

int VcpuFaults::ring_notify_fd(size_t index) const { return rings_[index]->notify.get(); }

std::vector<int> VcpuFaults::ring_fds() const {
  std::vector<int> out;
  for (const auto& r : rings_) {
    out.insert(out.end(), {r->notify.get(), r->complete.get(), r->vcpu_fd.get()});
  }
  return out;
}

void VcpuFaults::AttachApf(UniqueFd socket) { apf_ = std::move(socket); }

void VcpuFaults::DetachApf() {
  apf_.reset();
  // Its replies have nowhere to go: their requests are answered, as far as this side can.
  for (const Outgoing& o : apf_out_.queue) Answered(o.slot);
  apf_out_.queue.clear();
}

int VcpuFaults::SocketOf(VcpuChannel channel) const {
  return channel == VcpuChannel::kApfSocket ? apf_.get() : uffd_socket_;
}

VcpuFaults::Output& VcpuFaults::OutputOf(VcpuChannel channel) {
  return channel == VcpuChannel::kApfSocket ? apf_out_ : uffd_out_;
}

Result<VcpuFaults::ReadOutcome> VcpuFaults::ReadFrames(VcpuChannel channel, size_t budget,
                                                       const PostFn& post) {
  const int fd = SocketOf(channel);
  bool& blocked = channel == VcpuChannel::kApfSocket ? apf_blocked_ : uffd_blocked_;
  ReadOutcome outcome;
  if (fd < 0) return outcome;
  auto protocol = [&](const std::string& what) {
    return Error(ErrorCode::kProtocolError, name_ + ": " + ChannelName(channel) + ": " + what);
  };
  size_t taken = 0;
  while (taken < budget) {
    if (table_->full()) {
      blocked = true;
      return outcome;
    }
    uint8_t buf[kPeekBytes];
    alignas(cmsghdr) char control[CMSG_SPACE(sizeof(int) * kPeekControlFds)];
    iovec iov{buf, sizeof(buf)};
    msghdr msg{};
    msg.msg_iov = &iov;
    msg.msg_iovlen = 1;
    msg.msg_control = control;
    msg.msg_controllen = sizeof(control);
    const ssize_t n = recvmsg(fd, &msg, MSG_PEEK | MSG_DONTWAIT | MSG_CMSG_CLOEXEC);
    if (n < 0 && errno == EINTR) continue;
    if (n < 0 && (errno == EAGAIN || errno == EWOULDBLOCK)) return outcome;
    if (n < 0 && (errno == ECONNRESET || errno == EPIPE)) {
      outcome.hung_up = true;
      return outcome;
    }
    if (n < 0) return PosixError(errno, name_ + ": " + ChannelName(channel) + ": recvmsg");
    size_t fds = 0;
    for (cmsghdr* c = CMSG_FIRSTHDR(&msg); c != nullptr; c = CMSG_NXTHDR(&msg, c)) {
      if (c->cmsg_level != SOL_SOCKET || c->cmsg_type != SCM_RIGHTS) continue;
      const size_t count = (c->cmsg_len - CMSG_LEN(0)) / sizeof(int);
      for (size_t i = 0; i < count; ++i) {
        int received;
        std::memcpy(&received, CMSG_DATA(c) + i * sizeof(int), sizeof(int));
        UniqueFd closed(received);
        ++fds;
      }
    }
    if (fds > 0 || (msg.msg_flags & MSG_CTRUNC) != 0) {
      return protocol("descriptors came with the frames (" + std::to_string(fds) + ")");
    }
    if (n == 0) {
      outcome.hung_up = true;
      return outcome;
    }
    const std::span<const uint8_t> data(buf, static_cast<size_t>(n));
    size_t consumed = 0;
    size_t frames = 0;
    Status failed = OkStatus();
    while (taken < budget && !table_->full()) {
      auto size = FrameSize(data.subspan(consumed), kMaxFaultRequestPayload);
      if (!size) {
        failed = protocol(size.error().context());
        break;
      }
      if (!*size) break;  // a partial frame stays on the socket
      const auto payload = data.subspan(consumed + kFrameHeaderBytes, **size - kFrameHeaderBytes);
      auto request = DecodeFaultRequest(payload);
      if (!request) {
        failed = protocol("frame at byte " + std::to_string(consumed) +
                          " of what waits: " + request.error().context());
        break;
      }
      if (!request->gpa) {
        failed = protocol(Describe(*request) + " names no gpa");
        break;
      }
      const VcpuRequest recorded{channel,         request->vcpu,  0,
                                 request->offset, request->flags, *request->gpa};
      const std::optional<uint32_t> slot = table_->Record(recorded);  // not full: checked
      taken_at_[*slot] = Clock::now();
      const GuestFault fault{.vcpu = request->vcpu,
                             .flags = request->flags,
                             .gpa = GuestPhysAddr(PageGpa(*request->gpa))};
      if (Status posted = post(fault, *slot); !posted) {
        table_->Release(*slot);
        failed = std::move(posted).error();
        break;
      }
      consumed += **size;
      ++frames;
      ++taken;
    }
    if (consumed > 0) {
      // Exactly the frames taken: the peek showed they are there, and only this thread reads.
      ssize_t got;
      do {
        got = recv(fd, buf, consumed, MSG_DONTWAIT);
      } while (got < 0 && errno == EINTR);
      if (got != static_cast<ssize_t>(consumed)) {
        return Error(ErrorCode::kInternal, name_ + ": " + ChannelName(channel) + ": consumed " +
                                               std::to_string(got) + " of the " +
                                               std::to_string(consumed) + " bytes looked at");
      }
    }
    if (!failed) return std::move(failed).error();
    if (frames == 0) {
      if (table_->full()) blocked = true;
      return outcome;  // only a partial frame (or room ran out)
    }
  }
  outcome.more = true;
  return outcome;
}

Result<bool> VcpuFaults::DrainRing(size_t index, const PostFn& post) {
  Ring& r = *rings_[index];
  for (int round = 0; round < kRingRounds; ++round) {
    const size_t room = std::min<size_t>(kExitlessRingEntries - r.in_flight,
                                         VcpuRequestTable::kSlots - table_->used());
    if (room == 0) {
      r.blocked = true;  // TakeUnblocked() gives it back once answers went out
      return false;
    }
    ExitlessEntry entries[kExitlessRingEntries];
    GM_ASSIGN_OR_RETURN(const size_t n, r.ring.Pending(std::span<ExitlessEntry>(
                                            entries, std::min<size_t>(room, std::size(entries)))));
    if (n == 0) {
      if (r.ring.Arm()) return false;  // empty and armed: the kernel signals the next one
      continue;                        // entries came while arming
    }
    const uint32_t tail = r.ring.notify_tail();
    for (size_t i = 0; i < n; ++i) {
      const VcpuRequest recorded{
          VcpuChannel::kExitlessRing, r.vcpu,        tail + static_cast<uint32_t>(i), 0,
          entries[i].flags,           entries[i].gpa};
      const std::optional<uint32_t> slot = table_->Record(recorded);  // room: checked
      taken_at_[*slot] = Clock::now();
      ++r.in_flight;
      const GuestFault fault{
          .vcpu = r.vcpu, .flags = entries[i].flags, .gpa = GuestPhysAddr(PageGpa(entries[i].gpa))};
      if (Status posted = post(fault, *slot); !posted) {
        // The VM is dropped: what was recorded and not consumed stays in the ring.
        r.ring.Consume(static_cast<uint32_t>(i));
        return std::move(posted).error();
      }
    }
    r.ring.Consume(static_cast<uint32_t>(n));
  }
  return true;  // busy: come back after the rest of the loop had its turn
}

void VcpuFaults::AcknowledgeNotify(size_t index) {
  uint64_t count;
  (void)!read(rings_[index]->notify.get(), &count, sizeof(count));
}

void VcpuFaults::Complete(uint32_t slot) {
  const VcpuRequest& request = table_->at(slot);
  if (request.channel == VcpuChannel::kExitlessRing) {
    if (request.vcpu >= rings_.size()) {  // a predecessor's record of a ring no longer here
      Answered(slot);
      return;
    }
    Ring& r = *rings_[request.vcpu];
    if (!r.waiting.empty() || !r.ring.PushCompletion(PageGpa(request.gpa))) {
      r.waiting.push_back(slot);
      return;
    }
    r.signal = true;
    --r.in_flight;
    Answered(slot);
    return;
  }
  if (request.channel == VcpuChannel::kApfSocket && !apf_) {
    Answered(slot);  // the APF socket hung up: nobody waits for this reply
    return;
  }
  const FaultRequest asked{request.vcpu, request.offset, request.flags, request.gpa};
  OutputOf(request.channel).queue.push_back(Outgoing{EncodeFaultReply(ReplyTo(asked)), slot, 0});
}

Result<bool> VcpuFaults::Write(int fd, Output& out) {
  while (!out.queue.empty()) {
    iovec iov[kFramesPerWrite];
    size_t count = 0;
    for (auto it = out.queue.begin(); it != out.queue.end() && count < kFramesPerWrite;
         ++it, ++count) {
      iov[count].iov_base = const_cast<uint8_t*>(it->frame.bytes().data() + it->written);
      iov[count].iov_len = it->frame.size() - it->written;
    }
    msghdr msg{};
    msg.msg_iov = iov;
    msg.msg_iovlen = count;
    const ssize_t n = sendmsg(fd, &msg, MSG_DONTWAIT | MSG_NOSIGNAL);
    if (n < 0 && errno == EINTR) continue;
    if (n < 0 && (errno == EAGAIN || errno == EWOULDBLOCK)) return true;
    if (n < 0 && (errno == EPIPE || errno == ECONNRESET)) {
      return Error(ErrorCode::kPeerGone, name_ + ": the peer hung up while replies were due");
    }
    if (n < 0) return PosixError(errno, name_ + ": sending replies");
    auto left = static_cast<size_t>(n);
    while (left > 0) {
      Outgoing& front = out.queue.front();
      const size_t rest = front.frame.size() - front.written;
      if (left < rest) {
        front.written += left;  // the rest of this frame goes out first, next time
        break;
      }
      left -= rest;
      Answered(front.slot);
      out.queue.pop_front();
    }
  }
  return false;
}

Result<VcpuFaults::FlushOutcome> VcpuFaults::FinishBatch() {
  for (const auto& r : rings_) {
    while (!r->waiting.empty() &&
           r->ring.PushCompletion(PageGpa(table_->at(r->waiting.front()).gpa))) {
      --r->in_flight;
      Answered(r->waiting.front());
      r->waiting.pop_front();
      r->signal = true;
    }
    if (r->signal) {
      const uint64_t one = 1;
      (void)!write(r->complete.get(), &one, sizeof(one));
      r->signal = false;
    }
  }
  FlushOutcome outcome;
  GM_ASSIGN_OR_RETURN(outcome.queued, Write(uffd_socket_, uffd_out_));
  if (apf_) {
    auto apf_left = Write(apf_.get(), apf_out_);
    if (!apf_left && apf_left.error().code() == ErrorCode::kPeerGone) {
      outcome.apf_gone = true;  // the VM goes on; its owner detaches the socket
    } else if (!apf_left) {
      return std::move(apf_left).error();
    } else {
      outcome.queued |= *apf_left;
    }
  }
  return outcome;
}

bool VcpuFaults::completions_waiting() const {
  return std::any_of(rings_.begin(), rings_.end(),
                     [](const auto& r) { return !r->waiting.empty(); });
}

VcpuFaults::Unblocked VcpuFaults::TakeUnblocked() {
  Unblocked out;
  if (table_->full()) return out;
  out.uffd_socket = std::exchange(uffd_blocked_, false);
  out.apf_socket = std::exchange(apf_blocked_, false);
  for (size_t i = 0; i < rings_.size(); ++i) {
    Ring& r = *rings_[i];
    if (r.blocked && r.in_flight < kExitlessRingEntries) {
      r.blocked = false;
      out.rings.push_back(i);
    }
  }
  return out;
}

void VcpuFaults::Answered(uint32_t slot) {
  const VcpuRequest& request = table_->at(slot);
  switch (request.channel) {
    case VcpuChannel::kUffdSocket:
      ++answered_socket_;
      break;
    case VcpuChannel::kApfSocket:
      ++answered_apf_;
      break;
    case VcpuChannel::kExitlessRing:
      ++answered_exitless_;
      break;
  }
  service_.Record(static_cast<uint64_t>(
      std::chrono::duration_cast<std::chrono::nanoseconds>(Clock::now() - taken_at_[slot])
          .count()));
  table_->Release(slot);
}

Result<size_t> VcpuFaults::Replay(const PostFn& post) {
  size_t posted = 0;
  for (const uint32_t slot : table_->Recorded()) {
    const VcpuRequest request = table_->at(slot);
    taken_at_[slot] = Clock::now();
    if (request.channel == VcpuChannel::kExitlessRing) {
      if (request.vcpu >= rings_.size()) {
        table_->Release(slot);
        continue;
      }
      Ring& r = *rings_[request.vcpu];
      // Still in the ring (recorded, then the predecessor died before the tail moved past it):
      // it is read from there again.
      const uint32_t behind_tail = r.ring.notify_tail() - request.ring_index;
      if (behind_tail == 0 || behind_tail > kExitlessRingEntries) {
        table_->Release(slot);
        continue;
      }
      ++r.in_flight;
    } else if (request.channel == VcpuChannel::kApfSocket && !apf_) {
      table_->Release(slot);  // its socket died with the predecessor
      continue;
    }
    const GuestFault fault{
        .vcpu = request.vcpu, .flags = request.flags, .gpa = GuestPhysAddr(PageGpa(request.gpa))};
    GM_RETURN_IF_ERROR(post(fault, slot));
    ++posted;
  }
  return posted;
}

std::string VcpuFaults::StatsNote() const {
  if (answered() == 0) return "";
  auto us = [](uint64_t ns) { return std::to_string(ns / 1000) + "us"; };
  return "vCPU faults: socket " + std::to_string(answered_socket_) + ", APF " +
         std::to_string(answered_apf_) + ", exitless " + std::to_string(answered_exitless_) +
         "; service (request read to reply written) p50 " + us(service_.Percentile(0.50)) +
         " p99 " + us(service_.Percentile(0.99)) + " max " + us(service_.max());
}

}  // namespace guestmem::cli
