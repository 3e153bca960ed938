// gmem: the guestmem command line. Each subcommand lives in its own cmd_*.cc and is a thin layer
// over the library.
#include <CLI/CLI.hpp>

#include "commands.h"

namespace guestmem::cli {
int& CommandExitCode() {
  static int code = 0;
  return code;
}
}  // namespace guestmem::cli

int main(int argc, char** argv) {
  namespace cli = guestmem::cli;
  CLI::App app{"gmem: guest memory and lazy snapshot restore over userfaultfd"};
  app.require_subcommand(1);
  app.set_version_flag("--version", "gmem 0.1.0");
  cli::RegisterDemoCommand(app);
  cli::RegisterServeCommand(app);
  cli::RegisterStatusCommand(app);
  cli::RegisterReportCommand(app);
  cli::RegisterVmmSimCommand(app);
  cli::RegisterSnapshotCommand(app);
  cli::RegisterBenchCommand(app);
  cli::RegisterSoakCommand(app);
  cli::RegisterWorkingSetCommand(app);
  cli::RegisterCapabilitiesCommand(app);
  CLI11_PARSE(app, argc, argv);
  return cli::CommandExitCode();
}
