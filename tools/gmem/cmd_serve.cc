// gmem serve <socket_path> <mem_file_path> [options]: the page-fault handler daemon.
#include <signal.h>

#include <CLI/CLI.hpp>
#include <cstdio>

#include "commands.h"
#include "guestmem/log.h"
#include "log_format.h"
#include "serve/handler_server.h"
#include "serve/keeper.h"

namespace guestmem::cli {
namespace {

HandlerServer* g_server = nullptr;  // for the signal handler only

void OnSignal(int) {
  if (g_server != nullptr) g_server->Stop();
}

struct ServeArgs {
  ServeOptions options;
  std::string mode = "on-demand";
  uint64_t fault_around_kib = kDefaultFaultAroundBytes / 1024;
  std::string socket_mode = "0600";
  int64_t owner = -1;
  int64_t group = -1;
  uint64_t handshake_timeout_ms = 5000;
  bool json_logs = false;
  bool verbose = false;
};

int RunServe(ServeArgs& args) {
  InstallLogFormat(args.json_logs, args.verbose);
  ServeOptions& options = args.options;
  options.fault_all = args.mode == "fault-all";
  options.fault_around_bytes = args.fault_around_kib * 1024;
  options.socket_mode = static_cast<mode_t>(std::stoul(args.socket_mode, nullptr, 8));
  if (args.owner >= 0) options.socket_owner = static_cast<uid_t>(args.owner);
  if (args.group >= 0) options.socket_group = static_cast<gid_t>(args.group);
  options.handshake_timeout = std::chrono::milliseconds(args.handshake_timeout_ms);

  auto server = HandlerServer::Start(options);
  if (!server) {
    Log(LogLevel::kError, "cannot serve: " + server.error().ToString());
    return 1;
  }
  g_server = server->get();
  struct sigaction action = {};
  action.sa_handler = OnSignal;
  sigemptyset(&action.sa_mask);
  sigaction(SIGINT, &action, nullptr);
  sigaction(SIGTERM, &action, nullptr);
  signal(SIGPIPE, SIG_IGN);
  Status run = (*server)->Run();
  g_server = nullptr;
  server->reset();
  if (!run) {
    Log(LogLevel::kError, run.error().ToString());
    return 1;
  }
  Log(LogLevel::kInfo, "stopped");
  return 0;
}

}  // namespace

void RegisterServeCommand(CLI::App& app) {
  auto args = std::make_shared<ServeArgs>();
  CLI::App* cmd = app.add_subcommand(
      "serve", "Serve page faults for VMs restoring from a memory file (Firecracker Uffd backend)");
  cmd->add_option("socket_path", args->options.socket_path, "Unix socket to listen on")->required();
  cmd->add_option("mem_file_path", args->options.mem_file_path,
                  "Snapshot memory file (regions back to back; holes are zero pages)")
      ->required()
      ->check(CLI::ExistingFile);
  cmd->add_option("--mode", args->mode, "on-demand (with fault-around) or fault-all")
      ->check(CLI::IsMember({"on-demand", "fault-all"}))
      ->capture_default_str();
  cmd->add_option("--fault-around-kib", args->fault_around_kib,
                  "Window installed around each fault, KiB (power of two; 4 = one page)")
      ->capture_default_str();
  cmd->add_option("--workers", args->options.workers, "Fault-serving threads (0: one per CPU)")
      ->capture_default_str();
  cmd->add_option("--socket-mode", args->socket_mode, "Socket file permissions (octal)")
      ->capture_default_str();
  cmd->add_option("--socket-owner", args->owner, "Socket file owner uid");
  cmd->add_option("--socket-group", args->group, "Socket file group gid");
  cmd->add_option("--handshake-timeout-ms", args->handshake_timeout_ms,
                  "How long a new connection may take to send its handshake")
      ->capture_default_str();
  cmd->add_option("--max-vms", args->options.max_vms,
                  "Exit after this many VMs have come and gone (0: serve until SIGINT/SIGTERM)")
      ->capture_default_str();
  cmd->add_flag("--log-json", args->json_logs, "Log JSON lines instead of text");
  cmd->add_flag("-v,--verbose", args->verbose, "Log debug messages too");
  cmd->callback([args] { CommandExitCode() = RunServe(*args); });

  // The keeper `gmem serve` starts for itself (see serve/keeper.h); not for people to run.
  auto path = std::make_shared<std::string>();
  CLI::App* keeper = app.add_subcommand(
      "keeper", "Hold the VMs of a gmem serve for its successor (started by gmem serve)");
  keeper->group("");  // hidden from --help
  keeper->add_option("path", *path, "Unix socket to listen on")->required();
  keeper->callback([path] {
    InstallLogFormat(/*json=*/false, /*verbose=*/false);
    Status run = RunKeeper(*path);
    if (!run) Log(LogLevel::kError, "keeper: " + run.error().ToString());
    CommandExitCode() = run ? 0 : 1;
  });
}

}  // namespace guestmem::cli
