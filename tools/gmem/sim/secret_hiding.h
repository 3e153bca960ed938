// The secret-hiding half of `gmem vmm-sim`: Firecracker's vCPU side of a restore from a guest
// memory file that KVM reads directly, with every guest access gated by the userfault bitmap.
//
// VcpuFaultBroker plays what Firecracker and KVM do for each vCPU fault:
//   sync      the vCPU sends FaultRequest{vcpu, 0, 0x10, gpa} on the Uffd socket and waits until
//             a FaultReply names it (Firecracker's VMM thread routes replies by vcpu; a reply
//             while the vCPU waits for none leaves it resolved, so that its next fault returns at
//             once, as Firecracker's flag does);
//   apf       the same with flags 0x30 on the APF socket; the reply must carry the gpa;
//   exitless  the vCPU stands in for KVM: it pushes {gpa, 0x30} into its notify ring, writes the
//             notify eventfd if the handler armed it, and waits for {gpa, 0} in its complete ring.
// Every reply is checked byte for byte: decoded, re-encoded (it must be the minimal encoding
// Rust's derive writes), and compared with what the request asks to be echoed (vcpu, offset 0,
// len 4096, flags, gpa, zero false). A reply that answers a request answered before is counted
// as spurious (Firecracker tolerates it); one that answers no request at all, or any malformed
// frame, is a protocol violation.
//
// RunSecretHidingWorkload runs a plan's first `vcpus` lists on vCPU threads, which, for a page
// whose bit is set, fault it in (and check that its bit is clear once answered) before reading it
// through the guest memory file's second mapping, as KVM reads guest_memfd; the other lists run
// on VMM threads, which touch the uffd-registered mapping as Firecracker's device emulation does
// (missing and minor faults). With read-only access the VMM threads also read the vCPUs' pages
// back, so that pages populated by either path are met by the other. Every byte read is checked
// against the memory file; at the end every touched page's bit must be clear.
//
// Thread safety: FaultIn from one thread per vCPU at a time; the broker's reader threads are
// internal.
#ifndef GUESTMEM_TOOLS_GMEM_SIM_SECRET_HIDING_H_
#define GUESTMEM_TOOLS_GMEM_SIM_SECRET_HIDING_H_

#include <chrono>
#include <cstdint>
#include <memory>
#include <nlohmann/json.hpp>
#include <optional>
#include <string>
#include <string_view>

#include "guestmem/result.h"
#include "sim/guest_vm.h"
#include "sim/workload.h"

namespace guestmem::sim {

enum class VcpuFaultPath { kSync, kApf, kExitless, kMixed };
std::string_view VcpuFaultPathName(VcpuFaultPath path);
Result<VcpuFaultPath> ParseVcpuFaultPath(std::string_view name);

struct VcpuFaultCounts {
  uint64_t sync = 0;  // requests sent, by path
  uint64_t apf = 0;
  uint64_t exitless = 0;
  uint64_t answered = 0;               // faults answered with the bit clear afterwards
  uint64_t spurious = 0;               // replies (or completions) for requests answered already
  uint64_t answered_with_bit_set = 0;  // the answer came before the bit was cleared
  uint64_t violations = 0;             // malformed replies, replies to no request
  std::string first_violation;
};

class VcpuFaultBroker {
 public:
  struct Options {
    unsigned vcpus = 1;
    bool exitless = false;  // make rings (REQUIRES: the VM has its APF socket)
    std::chrono::milliseconds answer_timeout{60000};
  };
  // REQUIRES: `vm` connected (message 1 sent), secret hiding. Starts the reply readers.
  static Result<std::unique_ptr<VcpuFaultBroker>> Start(const GuestVm& vm, const Options& options);
  ~VcpuFaultBroker();
  VcpuFaultBroker(const VcpuFaultBroker&) = delete;
  VcpuFaultBroker& operator=(const VcpuFaultBroker&) = delete;

  // The descriptors message 2 announces (empty without exitless rings).
  std::vector<int> exitless_fds() const;
  bool has_apf() const;
  bool has_rings() const;

  // Asks for the page at memory-file offset `file_offset` through `path` (kSync, kApf or
  // kExitless) for vCPU `vcpu` and blocks until the vCPU may run again: its answer came, or (sync)
  // a reply that came earlier for another request of this vCPU let it go at once, as Firecracker's
  // flag does. *answered tells which. ERRORS: kPeerGone when nothing came within the timeout,
  // naming the request; the socket's errors.
  Status FaultIn(unsigned vcpu, uint64_t file_offset, VcpuFaultPath path, bool* answered);

  VcpuFaultCounts counts() const;

 private:
  struct State;
  explicit VcpuFaultBroker(std::unique_ptr<State> state);
  std::unique_ptr<State> s_;
};

struct SecretHidingOptions {
  unsigned vcpus = 1;
  unsigned vmm_threads = 1;
  VcpuFaultPath path = VcpuFaultPath::kSync;
};

struct SecretHidingResult {
  WorkloadResult workload;  // what was read and written, and every mismatch
  VcpuFaultCounts faults;
  uint64_t vcpu_pages = 0;     // pages the vCPU threads read through the guest memory file
  uint64_t vmm_pages = 0;      // pages the VMM threads touched through the registered mapping
  uint64_t bits_left_set = 0;  // touched pages whose bit was still set at the end
  std::optional<uint64_t> first_bit_left_set;
  // Pages a vCPU gave up on: answered again and again with their bit still set (a livelock).
  uint64_t stuck_pages = 0;
  std::optional<uint64_t> first_stuck_page;
  bool apf_socket = false;
  bool exitless = false;

  bool passed() const {
    return workload.passed() && faults.violations == 0 && faults.answered_with_bit_set == 0 &&
           bits_left_set == 0 && stuck_pages == 0;
  }
};

// Runs `plan` (vcpus + vmm_threads lists) over `vm` with `broker`. Errors as RunWorkload's, and a
// fault that got no answer.
Result<SecretHidingResult> RunSecretHidingWorkload(const GuestVm& vm, VcpuFaultBroker& broker,
                                                   const WorkloadPlan& plan,
                                                   const SecretHidingOptions& options,
                                                   const RunOptions& run);

nlohmann::json SecretHidingResultToJson(const SecretHidingResult& result);

}  // namespace guestmem::sim

#endif  // GUESTMEM_TOOLS_GMEM_SIM_SECRET_HIDING_H_
