// gmem vmm-sim: plays Firecracker's side of a Uffd snapshot restore against a page-fault handler.
//
// Maps guest memory as Firecracker does, hands its userfaultfd to the handler listening on
// --socket (one handshake message), runs a workload over the memory from several threads,
// verifies what it reads against the memory file if asked, and reports. Exit status: 0 when the
// workload ran and (with --verify / --balloon) every page checked out; 1 when a page did not (or,
// with --secret-hiding, the handler broke the protocol); 2 when the simulation could not run at
// all.
//
// --secret-hiding plays Firecracker's secret-hiding restore (sim/secret_hiding.h): with
// --vcpu-faults apf, exitless or mixed it first connects to the APF socket beside --socket (and
// goes on without it, as Firecracker does, if nobody listens); message 1 with the guest memory
// file and the userfault bitmap; every bit set; message 2 (exitless_apf:N with each vCPU's rings
// when --vcpu-faults takes the exitless path and the APF socket is there, else no_exitless_apf);
// then --threads vCPU threads, which fault pages in over the sockets or rings before reading them
// through a mapping no uffd covers, alongside --vmm-threads VMM threads touching the registered
// mapping.
#include <fcntl.h>
#include <unistd.h>

#include <CLI/CLI.hpp>
#include <chrono>
#include <cstdio>
#include <memory>
#include <nlohmann/json.hpp>
#include <optional>
#include <string>
#include <thread>

#include "base/hex.h"
#include "commands.h"
#include "guestmem/apf_control.h"
#include "guestmem/os.h"
#include "guestmem/unique_fd.h"
#include "sim/guest_vm.h"
#include "sim/secret_hiding.h"
#include "sim/trace.h"
#include "sim/workload.h"

namespace guestmem::cli {
namespace {

constexpr int kExitMismatch = 1;
constexpr int kExitError = 2;

struct VmmSimArgs {
  std::string socket;
  std::string mem_file;
  std::string page_size = "4k";
  int regions = 1;
  bool secret_hiding = false;
  std::string workload = "sequential";
  unsigned threads = 1;
  std::string access = "read";
  uint64_t pages = 0;
  uint64_t seed = 1;
  bool verify = false;
  std::string balloon;
  bool json = false;
  uint64_t hold_ms = 0;
  std::string start_when;  // wait for this file to exist before the workload
  std::string vcpu_faults = "sync";
  unsigned vmm_threads = 1;
};

Result<sim::BalloonSpec> ParseBalloon(const std::string& text) {
  const size_t colon = text.find(':');
  auto bad = [&](const std::string& why) {
    return Error(ErrorCode::kInvalidArgument, "--balloon " + text + ": " + why);
  };
  if (colon == std::string::npos) return bad("expected OFFSET:LENGTH");
  sim::BalloonSpec spec;
  uint64_t* fields[] = {&spec.offset, &spec.length};
  const std::string parts[] = {text.substr(0, colon), text.substr(colon + 1)};
  for (int i = 0; i < 2; ++i) {
    size_t used = 0;
    try {
      *fields[i] = std::stoull(parts[i], &used, 0);
    } catch (const std::exception&) {
      used = std::string::npos;
    }
    if (parts[i].empty() || used != parts[i].size() || parts[i][0] == '-') {
      return bad("'" + parts[i] + "' is not a number (decimal, or hex with 0x)");
    }
  }
  return spec;
}

// Threads the plan deals pages to: the vCPUs and, with secret hiding, the VMM threads too.
unsigned PlanThreads(const VmmSimArgs& args) {
  return args.secret_hiding ? args.threads + args.vmm_threads : args.threads;
}

Result<sim::WorkloadSpec> MakeWorkloadSpec(const VmmSimArgs& args) {
  sim::WorkloadSpec spec;
  spec.threads = PlanThreads(args);
  spec.pages = args.pages;
  spec.seed = args.seed;
  GM_ASSIGN_OR_RETURN(spec.access, sim::ParseAccessMode(args.access));
  const std::string trace_prefix = "trace:";
  if (args.workload.rfind(trace_prefix, 0) == 0) {
    spec.kind = sim::WorkloadKind::kTrace;
    GM_ASSIGN_OR_RETURN(spec.trace, sim::LoadTrace(args.workload.substr(trace_prefix.size())));
    return spec;
  }
  auto kind = sim::ParseWorkloadKind(args.workload);
  if (!kind) {
    return Error(ErrorCode::kInvalidArgument, "--workload " + args.workload +
                                                  ": expected sequential, random, sparse or "
                                                  "trace:FILE");
  }
  spec.kind = *kind;
  return spec;
}

struct Simulation {
  std::unique_ptr<sim::GuestVm> vm;
  sim::WorkloadResult result;
  std::optional<sim::SecretHidingResult> secret_hiding;
};

void WaitToStart(const VmmSimArgs& args) {
  if (args.start_when.empty()) return;
  std::fprintf(stderr, "vmm-sim: handed over; waiting for %s\n", args.start_when.c_str());
  while (access(args.start_when.c_str(), F_OK) != 0) {
    std::this_thread::sleep_for(std::chrono::milliseconds(5));
  }
}

// Firecracker's secret-hiding restore, in its order (sim/secret_hiding.h).
Status SimulateSecretHiding(const VmmSimArgs& args, const sim::WorkloadPlan& plan,
                            const sim::RunOptions& run, Simulation& simulation) {
  GM_ASSIGN_OR_RETURN(const sim::VcpuFaultPath path, sim::ParseVcpuFaultPath(args.vcpu_faults));
  sim::GuestVm& vm = *simulation.vm;
  if (path != sim::VcpuFaultPath::kSync) {
    // Firecracker tries the APF socket before anything else, and goes on without it.
    const std::string apf = ApfSocketPath(args.socket);
    if (Status connected = vm.ConnectApf(apf); !connected) {
      std::fprintf(stderr, "vmm-sim: no APF socket (%s): vCPU faults take the synchronous path\n",
                   connected.error().ToString().c_str());
    }
  }
  GM_RETURN_IF_ERROR(vm.Connect(args.socket));  // message 1
  vm.FillUserfaultBitmap();                     // no page is populated yet
  const bool exitless = vm.apf_socket_fd() >= 0 && (path == sim::VcpuFaultPath::kExitless ||
                                                    path == sim::VcpuFaultPath::kMixed);
  GM_ASSIGN_OR_RETURN(
      auto broker, sim::VcpuFaultBroker::Start(vm, {.vcpus = args.threads, .exitless = exitless}));
  GM_RETURN_IF_ERROR(vm.SendApfControl(broker->exitless_fds()));  // message 2
  WaitToStart(args);
  sim::SecretHidingOptions options;
  options.vcpus = args.threads;
  options.vmm_threads = args.vmm_threads;
  options.path = path;
  GM_ASSIGN_OR_RETURN(simulation.secret_hiding,
                      sim::RunSecretHidingWorkload(vm, *broker, plan, options, run));
  simulation.result = simulation.secret_hiding->workload;
  return OkStatus();
}

Result<Simulation> Simulate(const VmmSimArgs& args) {
  Os* os = Os::Default();
  const int opened = os->Open(args.mem_file.c_str(), O_RDONLY | O_CLOEXEC, 0);
  if (opened < 0) return PosixError(-opened, "open memory file " + args.mem_file);
  UniqueFd mem_fd(opened);
  const off_t size = os->Lseek(mem_fd.get(), 0, SEEK_END);
  if (size < 0) return PosixError(static_cast<int>(-size), "size of " + args.mem_file);

  GM_ASSIGN_OR_RETURN(sim::WorkloadSpec spec, MakeWorkloadSpec(args));
  sim::RunOptions run;
  run.verify = args.verify;
  run.mem_file_fd = mem_fd.get();
  if (!args.balloon.empty()) {
    GM_ASSIGN_OR_RETURN(run.balloon, ParseBalloon(args.balloon));
  }
  GM_ASSIGN_OR_RETURN(sim::WorkloadPlan plan, sim::PlanWorkload(spec, static_cast<uint64_t>(size)));

  sim::GuestVmOptions vm_options;
  vm_options.memory_bytes = static_cast<uint64_t>(size);
  vm_options.page_size = args.page_size == "2m" ? kHugePageSize2M : kPageSize4K;
  if (run.balloon) {  // refused before the handler is bothered
    if (args.secret_hiding) {
      return Error(ErrorCode::kInvalidArgument,
                   "--balloon with --secret-hiding: Firecracker refuses a balloon device in a "
                   "secret-free VM");
    }
    GM_RETURN_IF_ERROR(
        sim::ValidateBalloon(*run.balloon, vm_options.memory_bytes, vm_options.page_size));
  }
  if (PlanThreads(args) == 0) {
    return Error(ErrorCode::kInvalidArgument, "--threads 0 needs --secret-hiding and VMM threads");
  }
  vm_options.regions = args.regions;
  vm_options.secret_hiding = args.secret_hiding;
  Simulation simulation;
  GM_ASSIGN_OR_RETURN(simulation.vm, sim::GuestVm::Create(vm_options));
  if (args.secret_hiding) {
    GM_RETURN_IF_ERROR(SimulateSecretHiding(args, plan, run, simulation));
    return simulation;
  }
  GM_RETURN_IF_ERROR(simulation.vm->Connect(args.socket));
  WaitToStart(args);
  GM_ASSIGN_OR_RETURN(simulation.result, sim::RunWorkload(*simulation.vm, plan, run));
  return simulation;
}

void PrintSecretHiding(const sim::SecretHidingResult& sh) {
  const sim::VcpuFaultCounts& f = sh.faults;
  std::printf(
      "secret hiding: %llu page(s) read by vCPUs through the guest memory file, %llu by "
      "VMM threads through the registered mapping; APF socket %s, exitless rings %s\n",
      static_cast<unsigned long long>(sh.vcpu_pages), static_cast<unsigned long long>(sh.vmm_pages),
      sh.apf_socket ? "yes" : "no", sh.exitless ? "yes" : "no");
  std::printf(
      "  vCPU faults: %llu sync, %llu APF, %llu exitless; %llu answered, %llu spurious "
      "replies\n",
      static_cast<unsigned long long>(f.sync), static_cast<unsigned long long>(f.apf),
      static_cast<unsigned long long>(f.exitless), static_cast<unsigned long long>(f.answered),
      static_cast<unsigned long long>(f.spurious));
  if (f.violations > 0) {
    std::printf("  PROTOCOL VIOLATIONS: %llu; first: %s\n",
                static_cast<unsigned long long>(f.violations), f.first_violation.c_str());
  }
  if (f.answered_with_bit_set > 0) {
    std::printf("  %llu answer(s) came while the page's bit was still set\n",
                static_cast<unsigned long long>(f.answered_with_bit_set));
  }
  if (sh.stuck_pages > 0) {
    std::printf(
        "  %llu page(s) never had their bit cleared however often answered (a livelock); "
        "the first at offset %s\n",
        static_cast<unsigned long long>(sh.stuck_pages), Hex(*sh.first_stuck_page).c_str());
  }
  if (sh.bits_left_set > 0) {
    std::printf("  %llu touched page(s) kept their bit set; the first at offset %s\n",
                static_cast<unsigned long long>(sh.bits_left_set),
                Hex(*sh.first_bit_left_set).c_str());
  } else {
    std::printf("  every touched page's bit is clear\n");
  }
}

void PrintHuman(const VmmSimArgs& args, const sim::GuestVm& vm, const sim::WorkloadResult& r) {
  std::printf("vmm-sim: %llu MiB of guest memory in %zu region(s) of %s pages%s, handed to %s\n",
              static_cast<unsigned long long>(vm.memory_bytes() >> 20), vm.regions().size(),
              vm.page_size() == kHugePageSize2M ? "2 MiB" : "4 KiB",
              vm.secret_hiding() ? " (secret hiding: guest memory file, MISSING|MINOR)" : "",
              args.socket.c_str());
  const double ms = static_cast<double>(r.elapsed_ns) / 1e6;
  std::printf("%s %s, %zu thread(s): %llu page touches (%llu distinct pages) in %.3f ms",
              args.workload.c_str(), std::string(sim::AccessModeName(r.access)).c_str(),
              r.thread_ns.size(), static_cast<unsigned long long>(r.pages_touched),
              static_cast<unsigned long long>(r.distinct_pages), ms);
  if (ms > 0) std::printf(", %.0f pages/s", static_cast<double>(r.pages_touched) / ms * 1000);
  std::printf("\n  per thread:");
  for (uint64_t ns : r.thread_ns) std::printf(" %.3f ms", static_cast<double>(ns) / 1e6);
  std::printf("\n");
  if (r.verified) {
    std::printf("verify: %llu page read(s), %llu page write(s) checked against %s: ",
                static_cast<unsigned long long>(r.pages_read),
                static_cast<unsigned long long>(r.pages_written), args.mem_file.c_str());
    if (r.mismatches == 0) {
      std::printf("every byte matches\n");
    } else {
      const sim::Mismatch& m = *r.first_mismatch;
      std::printf("%llu page(s) DIFFER; first at offset %s (got 0x%02x, want 0x%02x%s)\n",
                  static_cast<unsigned long long>(r.mismatches), Hex(m.offset).c_str(), m.got,
                  m.want, m.written ? ", the pattern written there" : "");
    }
  }
  if (r.balloon) {
    const sim::BalloonResult& b = *r.balloon;
    std::printf("balloon %s:%s (MADV_DONTNEED): ", Hex(b.offset).c_str(), Hex(b.length).c_str());
    if (b.nonzero_pages == 0) {
      std::printf("all %llu page(s) read back as zero\n",
                  static_cast<unsigned long long>(b.pages_checked));
    } else {
      std::printf("%llu of %llu page(s) NOT zero; first non-zero byte at offset %s\n",
                  static_cast<unsigned long long>(b.nonzero_pages),
                  static_cast<unsigned long long>(b.pages_checked), Hex(*b.first_nonzero).c_str());
    }
  }
}

int RunVmmSim(const VmmSimArgs& args) {
  auto simulation = Simulate(args);
  if (!simulation) {
    const std::string message = simulation.error().ToString();
    if (args.json) std::printf("%s\n", nlohmann::json{{"error", message}}.dump().c_str());
    std::fprintf(stderr, "vmm-sim: %s\n", message.c_str());
    return kExitError;
  }
  const sim::GuestVm& vm = *simulation->vm;
  const sim::WorkloadResult& result = simulation->result;
  const auto& secret_hiding = simulation->secret_hiding;
  if (args.json) {
    nlohmann::json j = secret_hiding ? sim::SecretHidingResultToJson(*secret_hiding)
                                     : sim::WorkloadResultToJson(result);
    j["memory_bytes"] = vm.memory_bytes();
    j["page_size"] = vm.page_size();
    j["regions"] = vm.regions().size();
    j["secret_hiding"] = vm.secret_hiding();
    j["seed"] = args.seed;
    std::printf("%s\n", j.dump().c_str());
  } else {
    PrintHuman(args, vm, result);
    if (secret_hiding) PrintSecretHiding(*secret_hiding);
  }
  std::fflush(stdout);
  // The VM stays alive (memory mapped, socket open) for as long as asked.
  if (args.hold_ms > 0) std::this_thread::sleep_for(std::chrono::milliseconds(args.hold_ms));
  const bool passed = secret_hiding ? secret_hiding->passed() : result.passed();
  return passed ? 0 : kExitMismatch;
}

}  // namespace

void RegisterVmmSimCommand(CLI::App& app) {
  auto args = std::make_shared<VmmSimArgs>();
  CLI::App* cmd =
      app.add_subcommand("vmm-sim",
                         "Play Firecracker's side of a Uffd restore: map guest memory, hand its "
                         "userfaultfd to a handler, touch the memory and verify it");
  cmd->add_option("--socket", args->socket, "The handler's Unix socket")->required();
  cmd->add_option("--mem-file", args->mem_file,
                  "The snapshot memory file (sets the guest memory size; read to verify)")
      ->required();
  cmd->add_option("--page-size", args->page_size, "Guest page size")
      ->check(CLI::IsMember({"4k", "2m"}))
      ->capture_default_str();
  cmd->add_option("--regions", args->regions, "Memory regions, with gaps between them")
      ->check(CLI::Range(1, 64))
      ->capture_default_str();
  cmd->add_flag("--secret-hiding", args->secret_hiding,
                "Firecracker's secret-hiding restore: guest memory file and userfault bitmap "
                "(MISSING|MINOR), message 2, vCPU faults over the socket (and APF socket, rings)");
  cmd->add_option("--vcpu-faults", args->vcpu_faults,
                  "--secret-hiding: how vCPU faults travel: sync (Uffd socket), apf (APF socket), "
                  "exitless (APF rings), mixed (each in turn)")
      ->check(CLI::IsMember({"sync", "apf", "exitless", "mixed"}))
      ->capture_default_str();
  cmd->add_option("--vmm-threads", args->vmm_threads,
                  "--secret-hiding: threads touching the uffd-registered mapping beside the "
                  "--threads vCPU threads")
      ->check(CLI::Range(0, 64))
      ->capture_default_str();
  cmd->add_option("--workload", args->workload, "sequential, random, sparse or trace:FILE")
      ->capture_default_str();
  cmd->add_option("--threads", args->threads,
                  "Threads touching memory (--secret-hiding: vCPU threads, 0 allowed)")
      ->check(CLI::Range(0, 256))
      ->capture_default_str();
  cmd->add_option("--access", args->access, "read, write or mixed")
      ->check(CLI::IsMember({"read", "write", "mixed"}))
      ->capture_default_str();
  cmd->add_option("--pages", args->pages,
                  "sequential: first N pages; random: N accesses; sparse: ~N working-set pages "
                  "(default: all pages / as many as pages / ~10%)");
  cmd->add_option("--seed", args->seed, "Seed of the random and sparse workloads")
      ->capture_default_str();
  cmd->add_flag("--verify", args->verify,
                "Compare every page read with the memory file; read written pages back");
  cmd->add_option("--balloon", args->balloon,
                  "After the workload, MADV_DONTNEED OFFSET:LENGTH and check it reads as zero");
  cmd->add_flag("--json", args->json, "Print one JSON object instead of the summary");
  cmd->add_option("--hold-ms", args->hold_ms, "Keep the VM alive this long after the workload");
  cmd->add_option("--start-when", args->start_when,
                  "After handing over its memory, wait until this file exists, then run");
  cmd->callback([args] { CommandExitCode() = RunVmmSim(*args); });
}

}  // namespace guestmem::cli
