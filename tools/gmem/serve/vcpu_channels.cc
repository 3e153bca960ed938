// The server loop's part for a secret-hiding VM's vCPU faults (HandlerServer::Impl; see
// handler_server_impl.h): its sockets and rings in the epoll set, message 2 read off its Uffd
// socket, frames read from its Uffd and APF sockets and rings drained into the engine, and the
// answers written once the engine has served them. VcpuFaults (vcpu_faults.h) does the reading
// and answering; this file decides, for the loop, what each outcome means for the VM: read again
// soon, a hang-up, or a protocol error that drops that VM alone.
#include <sys/epoll.h>
#include <sys/socket.h>

#include <cerrno>
#include <string>
#include <utility>

#include "guestmem/apf_control.h"
#include "guestmem/log.h"
#include "serve/handler_server_impl.h"

namespace guestmem::cli {

Status HandlerServer::Impl::WatchServing(Connection& c) {
  // Edge-triggered: frames are only looked at until whole, so a partial one must not keep the
  // socket "readable" for the loop; what a turn leaves is in `ready`.
  epoll_event ev{};
  ev.events = EPOLLIN | EPOLLOUT | EPOLLRDHUP | EPOLLET;
  ev.data.u64 = Token(TokenKind::kConnection, c.vm);
  if (epoll_ctl(epoll.get(), EPOLL_CTL_MOD, c.socket.get(), &ev) != 0) {
    return PosixError(errno, "serve: epoll_ctl MOD of " + c.name + "'s socket");
  }
  if (c.vcpu->apf_fd() >= 0) {
    GM_RETURN_IF_ERROR(Watch(c.vcpu->apf_fd(), Token(TokenKind::kApfSocket, c.vm),
                             EPOLLIN | EPOLLOUT | EPOLLRDHUP | EPOLLET));
  }
  for (size_t i = 0; i < c.vcpu->ring_count(); ++i) {
    GM_RETURN_IF_ERROR(Watch(c.vcpu->ring_notify_fd(i), Token(TokenKind::kRingNotify, c.vm, i),
                             EPOLLIN | EPOLLET));
  }
  return OkStatus();
}

void HandlerServer::Impl::UnwatchServing(Connection& c) {
  // Explicitly: the keeper holds copies of these descriptors, so closing ours would not take
  // them out of the epoll set.
  if (!c.vcpu) return;
  if (c.vcpu->apf_fd() >= 0) epoll_ctl(epoll.get(), EPOLL_CTL_DEL, c.vcpu->apf_fd(), nullptr);
  for (size_t i = 0; i < c.vcpu->ring_count(); ++i) {
    epoll_ctl(epoll.get(), EPOLL_CTL_DEL, c.vcpu->ring_notify_fd(i), nullptr);
  }
}

VcpuFaults::PostFn HandlerServer::Impl::PostFor(const Connection& c) {
  const uint64_t vm = c.vm;
  const SpaceId space = c.space;
  return [this, vm, space](const GuestFault& fault, uint32_t slot) {
    return engine->PostGuestFault(space, fault,
                                  [this, vm, slot](const GuestFault&, const Status& status) {
                                    OnGuestFaultDone(vm, slot, status);
                                  });
  };
}

void HandlerServer::Impl::OnGuestFaultDone(uint64_t vm, uint32_t slot, const Status& status) {
  // A worker thread: only post.
  try {
    std::lock_guard lock(mu);
    guest_done.push_back(GuestFaultDone{vm, slot, status});
  } catch (...) {
    // Its answer is lost until a successor replays the request table.
    Log(LogLevel::kError, "vm " + std::to_string(vm) +
                              ": a served vCPU fault could not be posted back for want of memory");
    return;
  }
  SignalEventFd(notice_fd.get());
}

void HandlerServer::Impl::VcpuSocketReady(Connection& c, VcpuChannel channel, uint32_t events) {
  const bool uffd = channel == VcpuChannel::kUffdSocket;
  if ((events & (EPOLLHUP | EPOLLRDHUP | EPOLLERR)) != 0) {
    if (uffd) {
      Hangup(c, "disconnected");
    } else {
      DetachApf(c, "hung up");
    }
    return;
  }
  if ((events & EPOLLOUT) != 0 && !FinishVcpuBatch(c)) return;
  if ((events & EPOLLIN) == 0) return;
  if (uffd && !ReadControl(c)) return;
  auto read = c.vcpu->ReadFrames(channel, VcpuFaults::kFramesPerTurn, PostFor(c));
  if (!read) {
    Drop(c.vm, read.error().ToString());
    return;
  }
  if (read->hung_up) {
    if (uffd) {
      Hangup(c, "disconnected");
    } else {
      DetachApf(c, "hung up");
    }
    return;
  }
  if (read->more) {
    ready.push_back(Token(uffd ? TokenKind::kConnection : TokenKind::kApfSocket, c.vm));
  }
}

bool HandlerServer::Impl::ReadControl(Connection& c) {
  if (c.control_may_linger) {
    // Taken over: message 2 was kept, and may still be on the socket, in front of the frames.
    uint8_t first = 0;
    const ssize_t n = recv(c.socket.get(), &first, 1, MSG_PEEK | MSG_DONTWAIT);
    if (n < 0 && (errno == EAGAIN || errno == EWOULDBLOCK || errno == EINTR)) return false;
    if (n <= 0) return true;  // EOF or an error: reading the frames tells
    if (StartsLikeApfControl(first)) {
      auto left = PeekApfControl(c.socket.get());
      if (!left) {
        Drop(c.vm, left.error().ToString());
        return false;
      }
      if (!*left) return false;  // not all there yet
      if (Status consumed = ConsumeApfControl(c.socket.get(), (*left)->bytes); !consumed) {
        Drop(c.vm, consumed.error().ToString());
        return false;
      }
      Log(LogLevel::kInfo, c.name +
                               ": took message 2 off the socket (the previous daemon had set "
                               "up what it said, and died before consuming it)");
    }
    c.control_may_linger = false;
    return true;
  }
  if (c.control != Control::kAwaiting) return true;
  auto peeked = PeekApfControl(c.socket.get());
  if (!peeked) {
    EndForError(c, peeked.error());
    return false;
  }
  if (!*peeked) return false;  // not all of it yet: the socket signals again when more comes
  ApfControl& control = **peeked;
  if (control.vcpus > 0) {
    if (Status set = c.vcpu->SetUpExitless(std::move(control.fds)); !set) {
      Drop(c.vm, set.error().ToString());
      return false;
    }
    for (size_t i = 0; i < c.vcpu->ring_count(); ++i) {
      if (Status watched = Watch(c.vcpu->ring_notify_fd(i), Token(TokenKind::kRingNotify, c.vm, i),
                                 EPOLLIN | EPOLLET);
          !watched) {
        Drop(c.vm, watched.error().ToString());
        return false;
      }
      ready.push_back(Token(TokenKind::kRingNotify, c.vm, i));  // drain, then arm
    }
    c.control = Control::kExitless;
  } else {
    c.control = Control::kNoExitless;
  }
  // Kept before it is consumed: a daemon that dies in between leaves it on the socket, and its
  // successor, told that it was read, takes it off.
  KeepVm(c);
  if (Status consumed = ConsumeApfControl(c.socket.get(), control.bytes); !consumed) {
    Drop(c.vm, consumed.error().ToString());
    return false;
  }
  Log(LogLevel::kInfo, c.name + ": message 2: " +
                           (control.vcpus > 0 ? "exitless APF rings for " +
                                                    std::to_string(control.vcpus) + " vCPU(s)"
                                              : std::string("no exitless APF")));
  StartBackgroundWork(c);  // the bitmap is Firecracker's now: bits cleared from here on stay clear
  return true;
}

void HandlerServer::Impl::StartBackgroundWork(Connection& c) {
  std::shared_ptr<const WorkingSet> learned = std::move(c.deferred_prefetch);
  if (learned != nullptr && !learned->empty()) {
    if (Status started = engine->Prefetch(c.space, std::move(learned)); !started) {
      Log(LogLevel::kWarning,
          c.name + ": working set not prefetched: " + started.error().ToString());
    }
  }
  // After the prefetch, as the handler orders them.
  if (!std::exchange(c.deferred_fill, false)) return;
  if (Status started = engine->StartBackgroundFill(c.space); !started) {
    Log(LogLevel::kWarning, c.name + ": no background fill: " + started.error().ToString());
  }
}

void HandlerServer::Impl::EndForError(Connection& c, const Error& error) {
  if (error.code() == ErrorCode::kPeerGone) {
    Hangup(c, "disconnected");
  } else {
    Drop(c.vm, error.ToString());
  }
}

void HandlerServer::Impl::RingReady(Connection& c, size_t index) {
  auto more = c.vcpu->DrainRing(index, PostFor(c));
  if (!more) {
    Drop(c.vm, more.error().ToString());
    return;
  }
  if (*more) ready.push_back(Token(TokenKind::kRingNotify, c.vm, index));
}

bool HandlerServer::Impl::FinishVcpuBatch(Connection& c) {
  auto flushed = c.vcpu->FinishBatch();
  if (!flushed) {
    EndForError(c, flushed.error());
    return false;
  }
  if (flushed->apf_gone) DetachApf(c, "hung up");
  if (c.vcpu->completions_waiting()) {
    completion_retry.insert(c.vm);
  } else {
    completion_retry.erase(c.vm);
  }
  const VcpuFaults::Unblocked unblocked = c.vcpu->TakeUnblocked();
  if (unblocked.uffd_socket) ready.push_back(Token(TokenKind::kConnection, c.vm));
  if (unblocked.apf_socket) ready.push_back(Token(TokenKind::kApfSocket, c.vm));
  for (const size_t i : unblocked.rings) ready.push_back(Token(TokenKind::kRingNotify, c.vm, i));
  return true;
}

void HandlerServer::Impl::DetachApf(Connection& c, const char* why) {
  if (!c.vcpu || c.vcpu->apf_fd() < 0) return;
  epoll_ctl(epoll.get(), EPOLL_CTL_DEL, c.vcpu->apf_fd(), nullptr);
  c.vcpu->DetachApf();
  Log(LogLevel::kWarning, c.name + ": its APF socket " + why +
                              "; its vCPU faults go on over the "
                              "Uffd socket");
  KeepVm(c);
}

}  // namespace guestmem::cli
