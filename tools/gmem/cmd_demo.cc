// gmem demo: the whole restore path on one machine, in one command.
//
// Writes a demo memory file, starts the page-fault handler daemon (in this process), restores the
// "VM" with `gmem vmm-sim` child processes (real separate processes that map guest memory and hand
// over their uffd exactly as Firecracker does) on demand and with fault-all, verifies every byte
// they read, and prints what happened. Exits non-zero if anything failed verification.
#include <unistd.h>

#include <CLI/CLI.hpp>
#include <algorithm>
#include <chrono>
#include <cstdio>
#include <filesystem>
#include <mutex>
#include <nlohmann/json.hpp>
#include <string>
#include <thread>
#include <vector>

#include "child_process.h"
#include "commands.h"
#include "guestmem/address.h"
#include "guestmem/log.h"
#include "progress.h"
#include "serve/handler_server.h"
#include "snapshot_maker.h"

namespace guestmem::cli {
namespace {

using Clock = std::chrono::steady_clock;

struct DemoArgs {
  uint64_t size_mib = 256;
  unsigned threads = 2;
  std::string dir;
  bool keep = false;
  bool verbose = false;
};

struct Scenario {
  std::string title;       // shown in the table
  bool fault_all = false;  // daemon mode
  std::vector<std::string> workload;
  // Learn the working set from this restore and prefetch what earlier learning ones taught; off,
  // each restore's figures are its own.
  bool learn = false;
};

struct Outcome {
  std::string title;
  bool ok = false;
  double seconds = 0;
  uint64_t pages_touched = 0;
  uint64_t mismatches = 0;
  FaultStats stats;
  std::string error;
};

double SecondsSince(Clock::time_point start) {
  return std::chrono::duration<double>(Clock::now() - start).count();
}

// One restore: a daemon in a thread, one vmm-sim child against it.
Outcome RunScenario(const Scenario& scenario, const std::string& socket, const std::string& mem,
                    unsigned threads) {
  Outcome out;
  out.title = scenario.title;
  std::mutex mu;
  ServeOptions options;
  options.socket_path = socket;
  options.mem_file_path = mem;
  options.fill = scenario.fault_all ? FillMode::kAtFirstFault : FillMode::kNone;
  options.max_vms = 1;
  options.keeper = false;  // the demo's VMs are its own children: no daemon outlives them
  options.learn = scenario.learn;
  // The demo's snapshot is new each run: what is learnt of it stays beside it.
  options.cache_dir = std::filesystem::path(mem).parent_path().string() + "/cache";
  options.on_vm_finished = [&](const std::string&, const FaultStats& stats) {
    std::lock_guard lock(mu);
    out.stats = stats;
  };
  auto server = HandlerServer::Start(options);
  if (!server) {
    out.error = server.error().ToString();
    return out;
  }
  Status served;
  std::thread daemon([&] { served = (*server)->Run(); });

  std::vector<std::string> argv = {
      SelfExecutable(),        "vmm-sim",  "--socket", socket, "--mem-file", mem, "--threads",
      std::to_string(threads), "--verify", "--json"};
  argv.insert(argv.end(), scenario.workload.begin(), scenario.workload.end());
  const auto start = Clock::now();
  auto child = RunChild(argv);
  out.seconds = SecondsSince(start);
  if (!child || child->exit_code != 0) {
    (*server)->Stop();
  }
  daemon.join();
  server->reset();
  if (!child) {
    out.error = child.error().ToString();
    return out;
  }
  try {
    auto report = nlohmann::json::parse(child->output);
    out.pages_touched = report.value("pages_touched", uint64_t{0});
    out.mismatches = report.value("mismatches", uint64_t{0});
    out.seconds = report.value("elapsed_ms", out.seconds * 1000) / 1000.0;
  } catch (const nlohmann::json::exception& e) {
    out.error = std::string("unreadable vmm-sim report: ") + e.what();
    return out;
  }
  if (child->exit_code != 0) {
    out.error = "vmm-sim exited with " + std::to_string(child->exit_code);
    return out;
  }
  if (!served) {
    out.error = served.error().ToString();
    return out;
  }
  out.ok = out.mismatches == 0;
  if (!out.ok) out.error = std::to_string(out.mismatches) + " page(s) differ from the snapshot";
  return out;
}

void PrintTable(const std::vector<Outcome>& outcomes) {
  std::printf("\n%-38s %8s %9s %8s %9s %8s %8s %9s %s\n", "restore", "time", "touched", "faults",
              "copied", "zeroed", "contin.", "p50 lat", "verified");
  for (const Outcome& o : outcomes) {
    std::printf("%-38s %7.3fs %9llu %8llu %9llu %8llu %8llu %7lluus %s\n", o.title.c_str(),
                o.seconds, static_cast<unsigned long long>(o.pages_touched),
                static_cast<unsigned long long>(o.stats.faults()),
                static_cast<unsigned long long>(o.stats.pages_copied),
                static_cast<unsigned long long>(o.stats.pages_zeroed),
                static_cast<unsigned long long>(o.stats.pages_continued),
                static_cast<unsigned long long>(o.stats.latency_p50_ns / 1000),
                o.ok ? "every byte" : ("FAILED: " + o.error).c_str());
  }
}

int RunDemo(const DemoArgs& args) {
  SetLogSink({}, args.verbose ? LogLevel::kInfo : LogLevel::kWarning);
  std::string dir = args.dir;
  bool made_dir = false;
  if (dir.empty()) {
    char tmpl[] = "/tmp/gmem-demo-XXXXXX";
    if (mkdtemp(tmpl) == nullptr) {
      std::perror("mkdtemp");
      return 1;
    }
    dir = tmpl;
    made_dir = true;
  }
  std::filesystem::create_directories(dir);
  const std::string mem = dir + "/demo.mem";
  const std::string socket = dir + "/uffd.sock";

  std::printf("guestmem demo: lazy restore of a %llu MiB VM memory snapshot\n\n",
              static_cast<unsigned long long>(args.size_mib));
  const std::vector<Scenario> scenarios = {
      {"on demand: sequential scan", false, {"--workload", "sequential"}},
      {"on demand: sparse working set", false, {"--workload", "sparse"}, /*learn=*/true},
      {"on demand: random 4 KiB reads", false, {"--workload", "random"}},
      {"on demand: secret hiding (minor trap)", false, {"--workload", "sparse", "--secret-hiding"}},
      {"fault-all: sequential scan", true, {"--workload", "sequential"}},
      {"learned: sparse again, 2nd restore", false, {"--workload", "sparse"}, /*learn=*/true},
  };
  const size_t steps = scenarios.size() + 1;
  std::printf("[1/%zu] writing the demo memory file %s ...\n", steps, mem.c_str());
  std::fflush(stdout);
  auto start = Clock::now();
  Progress progress("demo: writing the memory file", "MiB", args.size_mib, /*quiet=*/false);
  auto made = MakeSnapshot(mem, {.size_bytes = args.size_mib << 20,
                                 .overwrite = true,
                                 .progress = [&](uint64_t done, uint64_t) {
                                   progress.Update(done * kPageSize4K >> 20);
                                 }});
  progress.Clear();
  if (!made) {
    std::fprintf(stderr, "could not write the memory file: %s\n", made.error().ToString().c_str());
    return 1;
  }
  std::printf("      %llu pages: %llu zero, %llu text, %llu random  (%.2fs)\n",
              static_cast<unsigned long long>(made->pages),
              static_cast<unsigned long long>(made->zero_pages),
              static_cast<unsigned long long>(made->text_pages),
              static_cast<unsigned long long>(made->random_pages), SecondsSince(start));

  std::vector<Outcome> outcomes;
  for (size_t i = 0; i < scenarios.size(); ++i) {
    const Scenario& scenario = scenarios[i];
    std::printf("[%zu/%zu] %s, %u vmm-sim threads ...\n", i + 2, steps, scenario.title.c_str(),
                args.threads);
    std::fflush(stdout);
    outcomes.push_back(RunScenario(scenario, socket, mem, args.threads));
    const Outcome& o = outcomes.back();
    std::printf("      %s in %.3fs: %llu pages touched, %llu faults served\n",
                o.ok ? "verified" : ("FAILED (" + o.error + ")").c_str(), o.seconds,
                static_cast<unsigned long long>(o.pages_touched),
                static_cast<unsigned long long>(o.stats.faults()));
  }
  PrintTable(outcomes);
  if (!args.keep && made_dir) std::filesystem::remove_all(dir);
  const bool all_ok =
      std::all_of(outcomes.begin(), outcomes.end(), [](const Outcome& o) { return o.ok; });
  std::printf("\n%s\n", all_ok ? "All restores read back exactly the snapshot's bytes."
                               : "Some restores FAILED verification.");
  return all_ok ? 0 : 1;
}

}  // namespace

void RegisterDemoCommand(CLI::App& app) {
  auto args = std::make_shared<DemoArgs>();
  CLI::App* cmd = app.add_subcommand(
      "demo", "Build a demo snapshot, serve it and restore it on demand and with fault-all");
  cmd->add_option("--size-mib", args->size_mib, "Size of the demo memory file")
      ->check(CLI::Range(16, 65536))
      ->capture_default_str();
  cmd->add_option("--threads", args->threads, "vmm-sim threads touching memory")
      ->check(CLI::Range(1, 64))
      ->capture_default_str();
  cmd->add_option("--dir", args->dir,
                  "Where to put the memory file and socket (default: a temp dir)");
  cmd->add_flag("--keep", args->keep, "Keep the temp dir");
  cmd->add_flag("-v,--verbose", args->verbose, "Show the daemon's log");
  cmd->callback([args] { CommandExitCode() = RunDemo(*args); });
}

}  // namespace guestmem::cli
