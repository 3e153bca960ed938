#include "sim/secret_hiding.h"

#include <fcntl.h>
#include <poll.h>
#include <sys/eventfd.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cerrno>
#include <condition_variable>
#include <cstring>
#include <latch>
#include <mutex>
#include <set>
#include <thread>
#include <vector>

#include "base/hex.h"
#include "guestmem/exitless_ring.h"
#include "guestmem/os.h"
#include "guestmem/unique_fd.h"
#include "guestmem/vcpu_fault_frames.h"

namespace guestmem::sim {
namespace {

using Clock = std::chrono::steady_clock;

constexpr uint64_t kSyncFlags = kMemoryFaultUserfault;
constexpr uint64_t kApfFlags = kMemoryFaultUserfault | kMemoryFaultApf;
// Answers a vCPU may get for one access with the page's bit still set (stale wake-ups after
// spurious replies) before the simulation calls it a livelock and gives the page up.
constexpr int kMaxAttempts = 100;
// How long the end-of-run check waits for the bits of pages served through the uffd, which are
// cleared after the faulting thread was woken.
constexpr std::chrono::seconds kBitsSettle{20};

Error Invalid(const std::string& what) {
  return Error(ErrorCode::kInvalidArgument, "secret hiding: " + what);
}

Status SendAll(int fd, std::span<const uint8_t> bytes) {
  size_t done = 0;
  while (done < bytes.size()) {
    const ssize_t n = send(fd, bytes.data() + done, bytes.size() - done, MSG_NOSIGNAL);
    if (n < 0 && errno == EINTR) continue;
    if (n < 0) return PosixError(errno, "vCPU fault: send");
    done += static_cast<size_t>(n);
  }
  return OkStatus();
}

}  // namespace

std::string_view VcpuFaultPathName(VcpuFaultPath path) {
  switch (path) {
    case VcpuFaultPath::kSync:
      return "sync";
    case VcpuFaultPath::kApf:
      return "apf";
    case VcpuFaultPath::kExitless:
      return "exitless";
    case VcpuFaultPath::kMixed:
      return "mixed";
  }
  return "?";
}

Result<VcpuFaultPath> ParseVcpuFaultPath(std::string_view name) {
  for (VcpuFaultPath p : {VcpuFaultPath::kSync, VcpuFaultPath::kApf, VcpuFaultPath::kExitless,
                          VcpuFaultPath::kMixed}) {
    if (VcpuFaultPathName(p) == name) return p;
  }
  return Invalid("unknown vCPU fault path \"" + std::string(name) +
                 "\" (expected sync, apf, exitless or mixed)");
}

// --- the broker ---------------------------------------------------------------------------------

struct VcpuState {
  std::mutex mu;
  std::condition_variable cv;
  bool resolved = false;                 // sync: a reply came (Firecracker's per-vCPU flag)
  std::multiset<uint64_t> sync_waiting;  // gpas asked on the Uffd socket, not yet answered
  std::set<uint64_t> sync_answered;
  std::multiset<uint64_t> apf_waiting;
  std::set<uint64_t> apf_answered;
  std::multiset<uint64_t> apf_ready;  // answered on the APF socket, not yet taken by the vCPU
  // Exitless: the memfd standing for the KVM vCPU fd, its eventfds and ring (the kernel's side).
  UniqueFd vcpu_fd;
  UniqueFd notify;
  UniqueFd complete;
  std::optional<ExitlessRing> ring;
  std::set<uint64_t> exitless_answered;
};

struct VcpuFaultBroker::State {
  State(const GuestVm& v, const Options& o) : vm(v), options(o) {}

  const GuestVm& vm;
  const Options options;
  std::vector<std::unique_ptr<VcpuState>> vcpus;
  std::mutex uffd_write_mu;
  std::mutex apf_write_mu;
  UniqueFd stop;
  std::thread uffd_reader;
  std::thread apf_reader;
  mutable std::mutex counts_mu;
  VcpuFaultCounts counts;  // GUARDED_BY(counts_mu)

  void Violation(const std::string& what) {
    std::lock_guard lock(counts_mu);
    if (counts.violations++ == 0) counts.first_violation = what;
  }
  void Count(uint64_t VcpuFaultCounts::*field) {
    std::lock_guard lock(counts_mu);
    ++(counts.*field);
  }

  void ReadReplies(int fd, bool apf);
  void Route(const FaultReply& reply, bool apf);
};

void VcpuFaultBroker::State::Route(const FaultReply& reply, bool apf) {
  const char* where = apf ? "APF socket" : "Uffd socket";
  if (!reply.vcpu || *reply.vcpu >= vcpus.size()) {
    Violation(std::string(where) + ": " + Describe(reply) + " names no vCPU of this VM");
    return;
  }
  const uint64_t want_flags = apf ? kApfFlags : kSyncFlags;
  if (reply.offset != 0 || reply.len != kPageSize4K || reply.zero || reply.flags != want_flags ||
      !reply.gpa) {
    Violation(std::string(where) + ": " + Describe(reply) +
              " does not echo its request (offset 0, len 4096, flags " + Hex(want_flags) +
              ", the gpa, zero false)");
    return;
  }
  VcpuState& v = *vcpus[*reply.vcpu];
  std::lock_guard lock(v.mu);
  auto& waiting = apf ? v.apf_waiting : v.sync_waiting;
  auto& answered = apf ? v.apf_answered : v.sync_answered;
  if (auto it = waiting.find(*reply.gpa); it != waiting.end()) {
    waiting.erase(it);
    answered.insert(*reply.gpa);
    if (apf) v.apf_ready.insert(*reply.gpa);
  } else if (answered.count(*reply.gpa) != 0) {
    Count(&VcpuFaultCounts::spurious);
  } else {
    Violation(std::string(where) + ": " + Describe(reply) + " answers no request");
    return;
  }
  // Firecracker's flag: set by any reply for this vCPU, taken by its next wait.
  if (!apf) v.resolved = true;
  v.cv.notify_all();
}

void VcpuFaultBroker::State::ReadReplies(int fd, bool apf) {
  const char* where = apf ? "APF socket" : "Uffd socket";
  uint8_t buf[4096];
  size_t have = 0;
  while (true) {
    pollfd p[2] = {{fd, POLLIN, 0}, {stop.get(), POLLIN, 0}};
    if (poll(p, 2, -1) < 0) {
      if (errno == EINTR) continue;
      return;
    }
    if (p[1].revents != 0) return;
    const ssize_t n = recv(fd, buf + have, sizeof(buf) - have, MSG_DONTWAIT);
    if (n < 0 && (errno == EAGAIN || errno == EINTR)) continue;
    if (n <= 0) return;  // the handler closed it: waiting vCPUs time out
    have += static_cast<size_t>(n);
    size_t pos = 0;
    while (true) {
      const std::span<const uint8_t> rest(buf + pos, have - pos);
      auto size = FrameSize(rest, kMaxFaultReplyPayload);
      if (!size) {
        // Firecracker would never consume it: the channel is wedged for good.
        Violation(std::string(where) + ": " + size.error().context());
        return;
      }
      if (!*size) break;
      const std::span<const uint8_t> frame = rest.first(**size);
      auto reply = DecodeFaultReply(frame.subspan(kFrameHeaderBytes));
      if (!reply) {
        Violation(std::string(where) + ": " + reply.error().context());
        return;
      }
      const Frame canonical = EncodeFaultReply(*reply);
      if (!std::equal(frame.begin(), frame.end(), canonical.bytes().begin(),
                      canonical.bytes().end())) {
        Violation(std::string(where) + ": " + Describe(*reply) +
                  " is not in the encoding bitcode's derive writes");
      }
      Route(*reply, apf);
      pos += **size;
    }
    std::memmove(buf, buf + pos, have - pos);
    have -= pos;
  }
}

VcpuFaultBroker::VcpuFaultBroker(std::unique_ptr<State> state) : s_(std::move(state)) {}

VcpuFaultBroker::~VcpuFaultBroker() {
  const uint64_t one = 1;
  (void)!write(s_->stop.get(), &one, sizeof(one));
  if (s_->uffd_reader.joinable()) s_->uffd_reader.join();
  if (s_->apf_reader.joinable()) s_->apf_reader.join();
}

Result<std::unique_ptr<VcpuFaultBroker>> VcpuFaultBroker::Start(const GuestVm& vm,
                                                                const Options& options) {
  if (!vm.secret_hiding() || !vm.connected()) {
    return Error(ErrorCode::kFailedPrecondition,
                 "vCPU faults: the VM must be a connected secret-hiding VM");
  }
  if (options.exitless && vm.apf_socket_fd() < 0) {
    return Invalid("exitless APF rings need the APF socket, as Firecracker's do");
  }
  auto state = std::make_unique<State>(vm, options);
  state->stop.reset(eventfd(0, EFD_CLOEXEC));
  if (!state->stop) return PosixError(errno, "vCPU faults: eventfd");
  for (unsigned i = 0; i < options.vcpus; ++i) {
    auto v = std::make_unique<VcpuState>();
    if (options.exitless) {
      // A memfd of four pages stands for the KVM vCPU fd; its fourth is the ring page.
      v->vcpu_fd.reset(memfd_create("gmem-vmm-sim-vcpu", MFD_CLOEXEC | MFD_ALLOW_SEALING));
      v->notify.reset(eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK));
      v->complete.reset(eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK));
      if (!v->vcpu_fd || !v->notify || !v->complete) {
        return PosixError(errno, "vCPU faults: the descriptors of vCPU " + std::to_string(i));
      }
      if (ftruncate(v->vcpu_fd.get(),
                    static_cast<off_t>(kExitlessRingPageOffset + kExitlessRingPageBytes)) != 0 ||
          fcntl(v->vcpu_fd.get(), F_ADD_SEALS, F_SEAL_SHRINK | F_SEAL_GROW | F_SEAL_SEAL) != 0) {
        return PosixError(errno, "vCPU faults: sizing the ring page of vCPU " + std::to_string(i));
      }
      GM_ASSIGN_OR_RETURN(ExitlessRing ring, ExitlessRing::Initialize(v->vcpu_fd.get()));
      v->ring.emplace(std::move(ring));
    }
    state->vcpus.push_back(std::move(v));
  }
  State* raw = state.get();
  state->uffd_reader = std::thread([raw] { raw->ReadReplies(raw->vm.socket_fd(), false); });
  if (vm.apf_socket_fd() >= 0) {
    state->apf_reader = std::thread([raw] { raw->ReadReplies(raw->vm.apf_socket_fd(), true); });
  }
  return std::unique_ptr<VcpuFaultBroker>(new VcpuFaultBroker(std::move(state)));
}

std::vector<int> VcpuFaultBroker::exitless_fds() const {
  std::vector<int> fds;
  for (const auto& v : s_->vcpus) {
    if (!v->ring) continue;
    fds.insert(fds.end(), {v->notify.get(), v->complete.get(), v->vcpu_fd.get()});
  }
  return fds;
}

bool VcpuFaultBroker::has_apf() const { return s_->vm.apf_socket_fd() >= 0; }
bool VcpuFaultBroker::has_rings() const { return s_->options.exitless; }

VcpuFaultCounts VcpuFaultBroker::counts() const {
  std::lock_guard lock(s_->counts_mu);
  return s_->counts;
}

Status VcpuFaultBroker::FaultIn(unsigned vcpu, uint64_t file_offset, VcpuFaultPath path,
                                bool* answered) {
  State& s = *s_;
  *answered = true;
  VcpuState& v = *s.vcpus.at(vcpu);
  const uint64_t gpa = s.vm.GuestPhys(AlignDown(file_offset, kPageSize4K));
  const Clock::time_point deadline = Clock::now() + s.options.answer_timeout;
  auto timed_out = [&](const char* how) {
    return Error(ErrorCode::kPeerGone,
                 "vCPU " + std::to_string(vcpu) + ": no answer " + how + " for gpa " + Hex(gpa) +
                     " within " + std::to_string(s.options.answer_timeout.count()) + " ms");
  };
  if (path == VcpuFaultPath::kExitless) {
    s.Count(&VcpuFaultCounts::exitless);
    bool signal = false;
    while (!v.ring->Notify({gpa, kApfFlags}, &signal)) {
      if (Clock::now() >= deadline) return timed_out("(notify ring full)");
      std::this_thread::sleep_for(std::chrono::milliseconds(1));
    }
    if (signal) {
      const uint64_t one = 1;
      (void)!write(v.notify.get(), &one, sizeof(one));
    }
    while (true) {
      ExitlessEntry done[kExitlessRingEntries];
      const size_t n = v.ring->TakeCompletions(done);
      bool found = false;
      for (size_t i = 0; i < n; ++i) {
        if (done[i].flags != 0) {
          s.Violation("exitless ring of vCPU " + std::to_string(vcpu) + ": completion for " +
                      Hex(done[i].gpa) + " with flags " + Hex(done[i].flags) + " (0 expected)");
        }
        if (done[i].gpa == gpa && !found) {
          found = true;
        } else if (v.exitless_answered.count(done[i].gpa) != 0) {
          s.Count(&VcpuFaultCounts::spurious);
        } else {
          s.Violation("exitless ring of vCPU " + std::to_string(vcpu) + ": a completion for " +
                      Hex(done[i].gpa) + ", which was never notified");
        }
        v.exitless_answered.insert(done[i].gpa);
      }
      if (found) return OkStatus();
      const auto left = std::chrono::ceil<std::chrono::milliseconds>(deadline - Clock::now());
      if (left.count() <= 0) return timed_out("in the complete ring");
      pollfd p{v.complete.get(), POLLIN, 0};
      if (poll(&p, 1, static_cast<int>(left.count())) > 0) {
        uint64_t count;
        (void)!read(v.complete.get(), &count, sizeof(count));
      }
    }
  }
  const bool apf = path == VcpuFaultPath::kApf;
  s.Count(apf ? &VcpuFaultCounts::apf : &VcpuFaultCounts::sync);
  size_t asked = 0;
  {
    std::lock_guard lock(v.mu);
    auto& waiting = apf ? v.apf_waiting : v.sync_waiting;
    waiting.insert(gpa);
    asked = waiting.count(gpa);
  }
  const Frame frame = EncodeFaultRequest(
      {.vcpu = vcpu, .offset = 0, .flags = apf ? kApfFlags : kSyncFlags, .gpa = gpa});
  {
    std::lock_guard lock(apf ? s.apf_write_mu : s.uffd_write_mu);
    GM_RETURN_IF_ERROR(SendAll(apf ? s.vm.apf_socket_fd() : s.vm.socket_fd(), frame.bytes()));
  }
  std::unique_lock lock(v.mu);
  if (apf) {
    if (!v.cv.wait_until(lock, deadline, [&] { return v.apf_ready.count(gpa) != 0; })) {
      return timed_out("on the APF socket");
    }
    v.apf_ready.erase(v.apf_ready.find(gpa));
    return OkStatus();
  }
  // Firecracker's flag: a reply that came for an earlier request ends this wait at once too.
  if (!v.cv.wait_until(lock, deadline, [&] { return v.resolved; })) {
    return timed_out("on the Uffd socket");
  }
  v.resolved = false;
  *answered = v.sync_waiting.count(gpa) < asked;
  return OkStatus();
}

// --- the workload -------------------------------------------------------------------------------

namespace {

struct Outcome {
  Status status;
  uint64_t ns = 0;
  uint64_t read = 0;
  uint64_t written = 0;
  uint64_t mismatches = 0;
  std::optional<Mismatch> first;
  uint64_t answered = 0;
  uint64_t answered_with_bit_set = 0;
  uint64_t stuck = 0;
  std::optional<uint64_t> first_stuck;
};

void Check(const std::byte* got, const std::byte* want, uint64_t offset, bool written,
           Outcome& out) {
  CompareAccess(got, want, offset, written, out.mismatches, out.first);
}

Status ReadFilePage(int fd, uint64_t offset, std::byte* out) {
  size_t done = 0;
  while (done < kAccessBytes) {
    const ssize_t n = pread(fd, out + done, kAccessBytes - done, static_cast<off_t>(offset + done));
    if (n < 0 && errno == EINTR) continue;
    if (n < 0) return PosixError(errno, "verify: pread memory file at " + Hex(offset));
    if (n == 0) return Error(ErrorCode::kDataLoss, "verify: memory file ends at " + Hex(offset));
    done += static_cast<size_t>(n);
  }
  return OkStatus();
}

// Reads (or writes, then reads back) one page at `page` (guest memory through either mapping),
// checking it against the memory file.
Status Touch(const std::byte* page_read, std::byte* page_write, const sim::Access& a,
             const RunOptions& run, bool written_before, Outcome& out) {
  alignas(64) std::byte want[kAccessBytes];
  if (a.write) {
    FillWritePattern(a.offset, page_write);
    ++out.written;
    if (run.verify) {
      FillWritePattern(a.offset, want);
      Check(page_read, want, a.offset, true, out);
    }
    return OkStatus();
  }
  ++out.read;
  if (!run.verify) {
    (void)*reinterpret_cast<volatile const uint8_t*>(page_read);
    return OkStatus();
  }
  if (written_before) {
    FillWritePattern(a.offset, want);
  } else {
    GM_RETURN_IF_ERROR(ReadFilePage(run.mem_file_fd, a.offset, want));
  }
  Check(page_read, want, a.offset, written_before, out);
  return OkStatus();
}

uint64_t Nanos(Clock::duration d) {
  return static_cast<uint64_t>(std::chrono::duration_cast<std::chrono::nanoseconds>(d).count());
}

}  // namespace

Result<SecretHidingResult> RunSecretHidingWorkload(const GuestVm& vm, VcpuFaultBroker& broker,
                                                   const WorkloadPlan& plan,
                                                   const SecretHidingOptions& options,
                                                   const RunOptions& run) {
  if (plan.threads.size() != static_cast<size_t>(options.vcpus) + options.vmm_threads) {
    return Invalid("the plan has " + std::to_string(plan.threads.size()) + " lists for " +
                   std::to_string(options.vcpus) + " vCPU(s) and " +
                   std::to_string(options.vmm_threads) + " VMM thread(s)");
  }
  if (run.verify && run.mem_file_fd < 0) return Invalid("verify needs the memory file");
  for (const auto& list : plan.threads) {
    for (const sim::Access& a : list) {
      if (!IsAligned(a.offset, kAccessBytes) || a.offset >= vm.memory_bytes()) {
        return Invalid("access at " + Hex(a.offset) + " is not a page of guest memory");
      }
    }
  }
  // The paths this VM can take: without the APF socket Firecracker has neither the APF nor the
  // exitless path, and takes every fault synchronously.
  std::vector<VcpuFaultPath> paths;
  auto can = [&](VcpuFaultPath p) {
    return p == VcpuFaultPath::kSync || (p == VcpuFaultPath::kApf && broker.has_apf()) ||
           (p == VcpuFaultPath::kExitless && broker.has_rings());
  };
  if (options.path == VcpuFaultPath::kMixed) {
    for (VcpuFaultPath p : {VcpuFaultPath::kSync, VcpuFaultPath::kApf, VcpuFaultPath::kExitless}) {
      if (can(p)) paths.push_back(p);
    }
  } else {
    paths.push_back(can(options.path) ? options.path : VcpuFaultPath::kSync);
  }

  const size_t threads = plan.threads.size();
  std::vector<uint8_t> touched(vm.memory_bytes() / kAccessBytes, 0);  // 1: touched, 2: written
  for (const auto& list : plan.threads) {
    for (const sim::Access& a : list) {
      touched[a.offset / kAccessBytes] |= a.write ? 3 : 1;
    }
  }
  const bool read_only = plan.access == AccessMode::kRead && plan.kind != WorkloadKind::kTrace;
  std::vector<Outcome> outcomes(threads);
  std::latch ready(static_cast<std::ptrdiff_t>(threads));
  std::latch go(1);
  std::vector<std::thread> workers;
  workers.reserve(threads);
  for (size_t t = 0; t < threads; ++t) {
    workers.emplace_back([&, t] {
      Outcome& out = outcomes[t];
      ready.count_down();
      go.wait();
      const auto start = Clock::now();
      std::vector<uint8_t> written(vm.memory_bytes() / kAccessBytes, 0);
      if (t < options.vcpus) {
        // A vCPU: KVM lets it at a page only once the page's bit is clear.
        const auto vcpu = static_cast<unsigned>(t);
        uint64_t k = 0;
        for (const sim::Access& a : plan.threads[t]) {
          const VcpuFaultPath path = paths[(k++ + t) % paths.size()];
          int attempt = 0;
          for (; vm.UserfaultBitSet(a.offset) && attempt < kMaxAttempts; ++attempt) {
            bool answered = false;
            if (Status in = broker.FaultIn(vcpu, a.offset, path, &answered); !in) {
              out.status = std::move(in);
              return;
            }
            if (answered) {
              ++out.answered;
              if (vm.UserfaultBitSet(a.offset)) ++out.answered_with_bit_set;
            }
          }
          if (attempt == kMaxAttempts) {
            // KVM would exit again and again: the guest is stuck on this page.
            ++out.stuck;
            if (!out.first_stuck) out.first_stuck = a.offset;
            continue;
          }
          std::byte* page = vm.KvmAddress(a.offset);
          if (Status s = Touch(page, page, a, run, written[a.offset / kAccessBytes] != 0, out);
              !s) {
            out.status = std::move(s);
            return;
          }
          if (a.write) written[a.offset / kAccessBytes] = 1;
        }
      } else {
        // The VMM's own accesses (device emulation), through the registered mapping.
        std::vector<sim::Access> accesses = plan.threads[t];
        if (read_only && options.vcpus > 0) {
          const auto& theirs = plan.threads[(t - options.vcpus) % options.vcpus];
          accesses.insert(accesses.end(), theirs.rbegin(), theirs.rend());
        }
        for (const sim::Access& a : accesses) {
          std::byte* page = vm.HostAddress(a.offset);
          if (Status s = Touch(page, page, a, run, written[a.offset / kAccessBytes] != 0, out);
              !s) {
            out.status = std::move(s);
            return;
          }
          if (a.write) written[a.offset / kAccessBytes] = 1;
        }
      }
      out.ns = Nanos(Clock::now() - start);
    });
  }
  ready.wait();
  const auto start = Clock::now();
  go.count_down();
  for (std::thread& w : workers) w.join();

  SecretHidingResult result;
  WorkloadResult& wr = result.workload;
  wr.elapsed_ns = Nanos(Clock::now() - start);
  wr.kind = plan.kind;
  wr.access = plan.access;
  wr.verified = run.verify;
  for (size_t t = 0; t < threads; ++t) {
    Outcome& o = outcomes[t];
    if (!o.status) {
      return std::move(o.status).error().WithContext(
          t < options.vcpus ? "vCPU " + std::to_string(t)
                            : "VMM thread " + std::to_string(t - options.vcpus));
    }
    wr.thread_ns.push_back(o.ns);
    wr.pages_touched += o.read + o.written;
    wr.pages_read += o.read;
    wr.pages_written += o.written;
    wr.mismatches += o.mismatches;
    if (o.first) KeepLowest(wr.first_mismatch, *o.first);
    (t < options.vcpus ? result.vcpu_pages : result.vmm_pages) += o.read + o.written;
  }
  result.faults = broker.counts();
  for (const Outcome& o : outcomes) {
    result.faults.answered += o.answered;
    result.faults.answered_with_bit_set += o.answered_with_bit_set;
    result.stuck_pages += o.stuck;
    if (o.first_stuck && (!result.first_stuck_page || *o.first_stuck < *result.first_stuck_page)) {
      result.first_stuck_page = o.first_stuck;
    }
  }
  wr.distinct_pages = static_cast<uint64_t>(
      std::count_if(touched.begin(), touched.end(), [](uint8_t s) { return s != 0; }));
  // A page served through the uffd has its bit cleared after the faulting thread was woken:
  // wait (bounded) for the last ones.
  // (Not when pages were given up on already: theirs never clear.)
  const Clock::time_point settle =
      Clock::now() + (result.stuck_pages > 0 ? Clock::duration{} : Clock::duration{kBitsSettle});
  for (uint64_t p = 0; p < touched.size(); ++p) {
    if (touched[p] == 0) continue;
    while (vm.UserfaultBitSet(p * kAccessBytes) && Clock::now() < settle) {
      std::this_thread::sleep_for(std::chrono::milliseconds(1));
    }
    if (vm.UserfaultBitSet(p * kAccessBytes)) {
      ++result.bits_left_set;
      if (!result.first_bit_left_set) result.first_bit_left_set = p * kAccessBytes;
    }
  }
  result.apf_socket = broker.has_apf();
  result.exitless = broker.has_rings();
  return result;
}

nlohmann::json SecretHidingResultToJson(const SecretHidingResult& r) {
  nlohmann::json j = WorkloadResultToJson(r.workload);
  j["vcpu_pages"] = r.vcpu_pages;
  j["vmm_pages"] = r.vmm_pages;
  j["bits_left_set"] = r.bits_left_set;
  j["first_bit_left_set"] =
      r.first_bit_left_set ? nlohmann::json(*r.first_bit_left_set) : nlohmann::json(nullptr);
  j["stuck_pages"] = r.stuck_pages;
  j["first_stuck_page"] =
      r.first_stuck_page ? nlohmann::json(*r.first_stuck_page) : nlohmann::json(nullptr);
  j["apf_socket"] = r.apf_socket;
  j["exitless"] = r.exitless;
  j["vcpu_faults"] = {{"sync", r.faults.sync},
                      {"apf", r.faults.apf},
                      {"exitless", r.faults.exitless},
                      {"answered", r.faults.answered},
                      {"spurious", r.faults.spurious},
                      {"answered_with_bit_set", r.faults.answered_with_bit_set},
                      {"violations", r.faults.violations},
                      {"first_violation", r.faults.first_violation}};
  j["passed"] = r.passed();
  return j;
}

}  // namespace guestmem::sim
