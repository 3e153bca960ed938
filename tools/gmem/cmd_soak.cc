// gmem soak: the chaos soak (docs/soak.md). Many VMs restore at once from a snapshot through the
// fault engine, each checking every byte, while balloon storms, munmaps, forks, kills and source
// I/O errors are injected. Exit status: 0 when everything checked out, 1 on the first wrong byte,
// hang, leak or unexpected signal (named on the last line), 2 when the soak could not run.
#include <CLI/CLI.hpp>
#include <cstdio>
#include <memory>
#include <string>

#include "commands.h"
#include "soak/soak.h"

namespace guestmem::cli {

void RegisterSoakCommand(CLI::App& app) {
  auto* cmd = app.add_subcommand(
      "soak", "Chaos soak: many VMs restore with byte-for-byte checks while faults are injected");
  auto options = std::make_shared<soak::SoakOptions>();
  auto inject = std::make_shared<std::string>("all");
  cmd->add_option("--seconds", options->seconds, "Stop after this long (with --faults: first)")
      ->check(CLI::Range(0.0, 1e7));
  cmd->add_option("--faults", options->faults, "Stop after this many faults were served");
  cmd->add_option("--vms", options->vms, "VMs restoring at a time")
      ->check(CLI::Range(1, 64))
      ->capture_default_str();
  cmd->add_option("--threads", options->threads, "Threads per VM")
      ->check(CLI::Range(1, 16))
      ->capture_default_str();
  cmd->add_option("--memory-mib", options->memory_mib,
                  "The snapshot's size, and each VM's memory (a multiple of 8)")
      ->check(CLI::Range(8, 4096))
      ->capture_default_str();
  cmd->add_option("--regions", options->max_regions, "Each VM splits its memory into 1..N regions")
      ->check(CLI::Range(1, 8))
      ->capture_default_str();
  cmd->add_option("--operations", options->operations,
                  "Operations (reads, writes, balloons) per VM before it exits")
      ->check(CLI::Range(uint64_t{100}, uint64_t{1} << 40))
      ->capture_default_str();
  cmd->add_option("--inject", *inject,
                  "What to inject: a comma-separated list of balloon, munmap, fork, kill, ioerror; "
                  "all; none")
      ->capture_default_str();
  cmd->add_option("--fault-around-kib", options->fault_around_kib,
                  "The handler's fault-around window (4: one page per fault)")
      ->capture_default_str();
  CLI::Option* fault_all =
      cmd->add_flag("--fault-all", options->fault_all, "Serve in fault-all mode");
  cmd->add_flag("--background-fill", options->background_fill,
                "Fill every VM in the background at the default rate (gmem serve --fill "
                "background)")
      ->excludes(fault_all);
  cmd->add_option("--workers", options->workers, "Fault engine worker threads")
      ->check(CLI::Range(1, 16))
      ->capture_default_str();
  cmd->add_flag("--huge-pages", options->huge_pages,
                "Every other VM on 2 MiB pages, if enough are free");
  cmd->add_option("--reserve-huge-pages", options->reserve_huge_pages,
                  "Raise vm.nr_hugepages by this many for the run (root)");
  cmd->add_option("--ioerror-permille", options->ioerror_permille,
                  "Snapshot data pages, per mille, whose reads fail")
      ->check(CLI::Range(0, 1000))
      ->capture_default_str();
  cmd->add_option("--hang-seconds", options->hang_seconds,
                  "A VM making no progress this long is a hang")
      ->check(CLI::Range(0.1, 3600.0))
      ->capture_default_str();
  cmd->add_option("--leak-seconds", options->leak_seconds,
                  "How long the daemon has to free everything once the VMs are gone")
      ->check(CLI::Range(0.0, 3600.0))
      ->capture_default_str();
  cmd->add_option("--seed", options->seed, "Seed of everything random")->capture_default_str();
  cmd->add_flag("--verbose", options->verbose, "Print the fault engine's log lines");
  cmd->add_option("--corrupt-page", options->corrupt_page,
                  "Flip a byte of this snapshot page (to see the soak catch it)");
  cmd->callback([options, inject] {
    auto parsed = soak::ParseInjections(*inject);
    if (!parsed) {
      std::fprintf(stderr, "gmem soak: --inject: %s\n", parsed.error().context().c_str());
      CommandExitCode() = soak::kSoakCannotRun;
      return;
    }
    options->inject = *parsed;
    CommandExitCode() = soak::RunSoak(*options, stdout);
  });
}

}  // namespace guestmem::cli
