// The gmem subcommands. Each Register*Command adds one subcommand (its options and the function
// it runs) to the application; main.cc only calls these.
#ifndef GUESTMEM_TOOLS_GMEM_COMMANDS_H_
#define GUESTMEM_TOOLS_GMEM_COMMANDS_H_

#include <string>

namespace CLI {
class App;
}

namespace guestmem::cli {

// A subcommand's callback stores its exit status here; main() returns it.
int& CommandExitCode();

void RegisterCapabilitiesCommand(CLI::App& app);
void RegisterServeCommand(CLI::App& app);
void RegisterVmmSimCommand(CLI::App& app);
void RegisterSnapshotCommand(CLI::App& app);
// pack, inspect, verify, unpack and diff, under `snapshot` (cmd_snapshot_packed.cc).
void RegisterPackedSnapshotCommands(CLI::App& snapshot);
// push and pull, under `snapshot` (cmd_snapshot_remote.cc).
void RegisterRemoteSnapshotCommands(CLI::App& snapshot);
// Prints "gmem snapshot COMMAND: WHAT" to stderr; returns the exit status 1.
int SnapshotFailed(const char* command, const std::string& what);
void RegisterDemoCommand(CLI::App& app);
void RegisterBenchCommand(CLI::App& app);
void RegisterSoakCommand(CLI::App& app);
void RegisterWorkingSetCommand(CLI::App& app);
void RegisterStatusCommand(CLI::App& app);
void RegisterReportCommand(CLI::App& app);

}  // namespace guestmem::cli

#endif  // GUESTMEM_TOOLS_GMEM_COMMANDS_H_
