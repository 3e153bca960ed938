// gmem serve <socket_path> <mem_file_path> [options]: the page-fault handler daemon.
#include <signal.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <systemd/sd-daemon.h>
#include <unistd.h>

#include <CLI/CLI.hpp>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <exception>
#include <limits>
#include <optional>
#include <string>
#include <vector>

#include "commands.h"
#include "guestmem/log.h"
#include "log_format.h"
#include "serve/endpoints.h"
#include "serve/handler_server.h"
#include "serve/keeper.h"

namespace guestmem::cli {
namespace {

HandlerServer* g_server = nullptr;  // for the signal handler only

void OnSignal(int) {
  if (g_server != nullptr) g_server->Stop();
}

// Options are taken as text and parsed here, so that every bad value is refused with a message
// naming it instead of being wrapped, truncated or thrown about.
struct ServeArgs {
  ServeOptions options;
  std::string mode = "on-demand";
  std::string fill = "none";
  std::string fill_rate_mib = std::to_string(kDefaultFillBytesPerSecond >> 20);
  std::string fault_around_kib = std::to_string(kDefaultFaultAroundBytes / 1024);
  std::string socket_mode = "0600";
  std::string owner;
  std::string group;
  std::vector<std::string> allow_uids;
  std::vector<std::string> allow_gids;
  std::string handshake_timeout_ms = "5000";
  std::string workers = "0";
  std::string max_pending_handshakes = "256";
  std::string max_active_vms = "1024";
  std::string max_vms = "0";
  std::string chunk_cache_mib = "256";
  std::string cache_max_gib = "10";
  std::string fetch_deadline_ms = "10000";
  std::string fetch_threads = "8";
  std::string metrics;
  std::string trace_dir;
  std::string control_socket;
  bool control = true;
  bool json_logs = false;
  bool verbose = false;
};

Error Bad(const std::string& option, const std::string& value, const std::string& why) {
  return Error(ErrorCode::kInvalidArgument, option + " '" + value + "': " + why);
}

// A decimal number from `min` to `max`: digits only (no sign, no spaces, no suffix).
Result<uint64_t> ParseNumber(const std::string& option, const std::string& value, uint64_t min,
                             uint64_t max) {
  const std::string range =
      "expected a decimal number from " + std::to_string(min) + " to " + std::to_string(max);
  if (value.empty() || value.size() > 20) return Bad(option, value, range);
  uint64_t n = 0;
  for (const char c : value) {
    if (c < '0' || c > '9') return Bad(option, value, range);
    const uint64_t digit = static_cast<uint64_t>(c - '0');
    if (n > (std::numeric_limits<uint64_t>::max() - digit) / 10) return Bad(option, value, range);
    n = n * 10 + digit;
  }
  if (n < min || n > max) return Bad(option, value, range);
  return n;
}

// Permission bits in octal, as chmod(1) takes them: 1 to 4 octal digits (0660, 660, 1770).
Result<mode_t> ParseMode(const std::string& option, const std::string& value) {
  const std::string expected = "expected permission bits in octal, 1 to 4 digits 0-7 (e.g. 0660)";
  if (value.empty() || value.size() > 4) return Bad(option, value, expected);
  mode_t mode = 0;
  for (const char c : value) {
    if (c < '0' || c > '7') return Bad(option, value, expected);
    mode = static_cast<mode_t>(mode * 8 + static_cast<mode_t>(c - '0'));
  }
  return mode;
}

// A uid or gid as a number. (uid_t)-1 means "unchanged" to chown(2), so it is no id.
Result<uint32_t> ParseId(const std::string& option, const std::string& value) {
  GM_ASSIGN_OR_RETURN(uint64_t id,
                      ParseNumber(option, value, 0, std::numeric_limits<uint32_t>::max() - 1));
  return static_cast<uint32_t>(id);
}

Status ParseArgs(ServeArgs& args) {
  ServeOptions& options = args.options;
  if (args.mode == "fault-all") options.fill = FillMode::kAtFirstFault;
  if (args.fill == "background") {
    if (options.fill == FillMode::kAtFirstFault) {
      return Bad("--fill", args.fill,
                 "--mode fault-all installs everything at the first fault "
                 "already; a background fill is for --mode on-demand");
    }
    options.fill = FillMode::kBackground;
  }
  GM_ASSIGN_OR_RETURN(const uint64_t fill_mib,
                      ParseNumber("--fill-rate-mib", args.fill_rate_mib,
                                  kMinFillBytesPerSecond >> 20, kMaxFillBytesPerSecond >> 20));
  options.fill_bytes_per_second = fill_mib << 20;
  GM_ASSIGN_OR_RETURN(const uint64_t kib,
                      ParseNumber("--fault-around-kib", args.fault_around_kib,
                                  kMinFaultAroundBytes / 1024, kMaxFaultAroundBytes / 1024));
  options.fault_around_bytes = kib * 1024;
  GM_ASSIGN_OR_RETURN(options.socket_mode, ParseMode("--socket-mode", args.socket_mode));
  if (!args.owner.empty()) {
    GM_ASSIGN_OR_RETURN(options.socket_owner, ParseId("--socket-owner", args.owner));
  }
  if (!args.group.empty()) {
    GM_ASSIGN_OR_RETURN(options.socket_group, ParseId("--socket-group", args.group));
  }
  for (const std::string& uid : args.allow_uids) {
    GM_ASSIGN_OR_RETURN(const uint32_t id, ParseId("--allow-uid", uid));
    options.allow_uids.push_back(id);
  }
  for (const std::string& gid : args.allow_gids) {
    GM_ASSIGN_OR_RETURN(const uint32_t id, ParseId("--allow-gid", gid));
    options.allow_gids.push_back(id);
  }
  GM_ASSIGN_OR_RETURN(const uint64_t timeout_ms,
                      ParseNumber("--handshake-timeout-ms", args.handshake_timeout_ms, 1,
                                  std::numeric_limits<int32_t>::max()));
  options.handshake_timeout = std::chrono::milliseconds(timeout_ms);
  GM_ASSIGN_OR_RETURN(const uint64_t workers,
                      ParseNumber("--workers", args.workers, 0, kMaxWorkers));
  options.workers = static_cast<unsigned>(workers);
  GM_ASSIGN_OR_RETURN(
      options.max_pending_handshakes,
      ParseNumber("--max-pending-handshakes", args.max_pending_handshakes, 1, 1'000'000));
  GM_ASSIGN_OR_RETURN(options.max_active_vms,
                      ParseNumber("--max-active-vms", args.max_active_vms, 1, 1'000'000));
  GM_ASSIGN_OR_RETURN(const uint64_t max_vms, ParseNumber("--max-vms", args.max_vms, 0,
                                                          std::numeric_limits<int32_t>::max()));
  options.max_vms = static_cast<int>(max_vms);
  GM_ASSIGN_OR_RETURN(const uint64_t chunk_cache_mib,
                      ParseNumber("--chunk-cache-mib", args.chunk_cache_mib, 1, uint64_t{1} << 20));
  options.chunk_cache_bytes = chunk_cache_mib << 20;
  GM_ASSIGN_OR_RETURN(const uint64_t cache_max_gib,
                      ParseNumber("--cache-max-gib", args.cache_max_gib, 1, uint64_t{1} << 20));
  options.chunk_disk_bytes = cache_max_gib << 30;
  GM_ASSIGN_OR_RETURN(const uint64_t fetch_deadline_ms,
                      ParseNumber("--fetch-deadline-ms", args.fetch_deadline_ms, 1,
                                  std::numeric_limits<int32_t>::max()));
  options.fetch_deadline = std::chrono::milliseconds(fetch_deadline_ms);
  GM_ASSIGN_OR_RETURN(const uint64_t fetch_threads,
                      ParseNumber("--fetch-threads", args.fetch_threads, 1, 256));
  options.fetch_threads = static_cast<unsigned>(fetch_threads);
  if (!args.metrics.empty()) {
    GM_ASSIGN_OR_RETURN(options.metrics_address, ParseMetricsAddress(args.metrics));
  }
  if (!args.trace_dir.empty()) {
    struct stat st {};
    if (stat(args.trace_dir.c_str(), &st) != 0) {
      return Bad("--trace-dir", args.trace_dir, std::strerror(errno));
    }
    if (!S_ISDIR(st.st_mode)) return Bad("--trace-dir", args.trace_dir, "not a directory");
    if (access(args.trace_dir.c_str(), W_OK | X_OK) != 0) {
      return Bad("--trace-dir", args.trace_dir,
                 std::string("cannot write there: ") + std::strerror(errno));
    }
    options.trace_dir = args.trace_dir;
  }
  if (args.control) {
    options.control_path =
        args.control_socket.empty() ? DefaultControlPath(options.socket_path) : args.control_socket;
  }
  // A power of two is the last check: the parsers above already named a value out of range.
  return ValidateServeOptions(options);
}

// systemd's socket activation: the listening socket passed in LISTEN_FDS (one, a Unix stream
// socket listening at socket_path), or -1 when none was passed.
Result<int> SocketFromSystemd(const std::string& socket_path) {
  const int n = sd_listen_fds(/*unset_environment=*/1);
  if (n < 0) return PosixError(-n, "LISTEN_FDS");
  if (n == 0) return -1;
  if (n > 1) {
    return Error(ErrorCode::kInvalidArgument,
                 "LISTEN_FDS: systemd passed " + std::to_string(n) +
                     " sockets; gmem serve takes one (the socket Firecracker connects to)");
  }
  const int fd = SD_LISTEN_FDS_START;
  if (sd_is_socket_unix(fd, SOCK_STREAM, /*listening=*/1, socket_path.c_str(), 0) <= 0) {
    return Error(ErrorCode::kInvalidArgument,
                 "LISTEN_FDS: the socket systemd passed is not a listening Unix stream socket "
                 "at " +
                     socket_path + " (ListenStream= in the .socket unit must be that path)");
  }
  return fd;
}

int Serve(ServeArgs& args) {
  if (Status parsed = ParseArgs(args); !parsed) {
    Log(LogLevel::kError, "cannot serve: " + parsed.error().context());
    return 2;
  }
  auto activated = SocketFromSystemd(args.options.socket_path);
  if (!activated) {
    Log(LogLevel::kError, "cannot serve: " + activated.error().ToString());
    return 2;
  }
  args.options.listen_fd = *activated;
  auto server = HandlerServer::Start(args.options);
  if (!server) {
    Log(LogLevel::kError, "cannot serve: " + server.error().ToString());
    return 1;
  }
  // Under systemd (Type=notify): ready once the socket is served; a no-op elsewhere.
  (void)sd_notify(0, ("READY=1\nSTATUS=serving " + args.options.socket_path).c_str());
  g_server = server->get();
  struct sigaction action = {};
  action.sa_handler = OnSignal;
  sigemptyset(&action.sa_mask);
  sigaction(SIGINT, &action, nullptr);
  sigaction(SIGTERM, &action, nullptr);
  signal(SIGPIPE, SIG_IGN);
  Status run = (*server)->Run();
  (void)sd_notify(0, "STOPPING=1");
  g_server = nullptr;
  server->reset();
  if (!run) {
    Log(LogLevel::kError, run.error().ToString());
    return 1;
  }
  Log(LogLevel::kInfo, "stopped");
  return 0;
}

int RunServe(ServeArgs& args) {
  InstallLogFormat(args.json_logs, args.verbose);
  // The server turns failures while serving into errors of one VM; what is left (memory running
  // out while starting or stopping) ends the daemon with a message, never an abort.
  try {
    return Serve(args);
  } catch (const std::exception& e) {
    g_server = nullptr;
    Log(LogLevel::kError, std::string("gmem serve: ") + e.what());
    return 1;
  }
}

}  // namespace

void RegisterServeCommand(CLI::App& app) {
  auto args = std::make_shared<ServeArgs>();
  CLI::App* cmd = app.add_subcommand(
      "serve", "Serve page faults for VMs restoring from a memory file (Firecracker Uffd backend)");
  cmd->add_option("socket_path", args->options.socket_path, "Unix socket to listen on")->required();
  cmd->add_option("mem_file_path", args->options.mem_file_path,
                  "Snapshot memory file: a regular file (regions back to back; holes are zero "
                  "pages) or a block device; or a packed snapshot (a file, or s3://BUCKET/KEY, "
                  "http(s)://HOST/PATH: AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_REGION and "
                  "AWS_ENDPOINT_URL say how the store is reached)")
      ->required();
  cmd->add_option("--mode", args->mode, "on-demand (with fault-around) or fault-all")
      ->check(CLI::IsMember({"on-demand", "fault-all"}))
      ->capture_default_str();
  cmd->add_option("--fill", args->fill,
                  "none, or background: once a VM's learned working set is in (at once without "
                  "one), every page not yet served is installed at --fill-rate-mib, faults first")
      ->check(CLI::IsMember({"none", "background"}))
      ->capture_default_str();
  cmd->add_option("--fill-rate-mib", args->fill_rate_mib,
                  "A background fill's rate per VM, MiB/s: 1 to 1048576 (1 TiB/s)")
      ->capture_default_str();
  cmd->add_option("--fault-around-kib", args->fault_around_kib,
                  "Window installed around each fault, KiB: a power of two from 4 (one page) to "
                  "1048576 (1 GiB)")
      ->capture_default_str();
  cmd->add_option("--workers", args->workers, "Fault-serving threads (0: one per CPU, at most 4)")
      ->capture_default_str();
  cmd->add_option("--socket-mode", args->socket_mode, "Socket file permissions (octal)")
      ->capture_default_str();
  cmd->add_option("--socket-owner", args->owner, "Socket file owner (a uid)");
  cmd->add_option("--socket-group", args->group, "Socket file group (a gid)");
  cmd->add_option("--allow-uid", args->allow_uids,
                  "Allow peers with this uid (SO_PEERCRED; repeatable). With neither --allow-uid "
                  "nor --allow-gid, whoever the socket's mode lets in");
  cmd->add_option("--allow-gid", args->allow_gids,
                  "Allow peers with this primary or supplementary gid (repeatable)");
  cmd->add_option("--handshake-timeout-ms", args->handshake_timeout_ms,
                  "How long a new connection may take to send its handshake")
      ->capture_default_str();
  cmd->add_option("--max-pending-handshakes", args->max_pending_handshakes,
                  "Connections that may wait for their handshake at once; more are closed")
      ->capture_default_str();
  cmd->add_option("--max-active-vms", args->max_active_vms,
                  "VMs served at once; handshakes beyond are rejected")
      ->capture_default_str();
  cmd->add_option("--max-vms", args->max_vms,
                  "Exit after this many VMs have come and gone (0: serve until SIGINT/SIGTERM)")
      ->capture_default_str();
  cmd->add_flag("--apf", args->options.apf,
                "Also listen for Firecracker's APF socket, at dirname(SOCKET)/apf.socket "
                "(secret-hiding VMs' async page faults)");
  cmd->add_flag("!--no-keeper", args->options.keeper,
                "Do not keep VMs for a successor: a daemon that dies (or stops) leaves its VMs "
                "frozen");
  cmd->add_option("--cache-dir", args->options.cache_dir,
                  "Where zero maps and working sets of snapshots are kept between runs (default: "
                  "/var/cache/guestmem as root, $XDG_CACHE_HOME/guestmem otherwise)");
  cmd->add_option("--chunk-cache-mib", args->chunk_cache_mib,
                  "A packed snapshot's decompressed chunks kept in memory, shared by its VMs, in "
                  "MiB (1 to 1048576)")
      ->capture_default_str();
  cmd->add_option("--cache-max-gib", args->cache_max_gib,
                  "Chunks of snapshots named by a URL kept on disk in CACHE_DIR/chunks, shared by "
                  "every VM and snapshot, least recently used dropped first, in GiB")
      ->capture_default_str();
  cmd->add_option("--fetch-deadline-ms", args->fetch_deadline_ms,
                  "How long a chunk may take to fetch from the object store, retries included; "
                  "past it the pages that need it are poisoned (SIGBUS in the guest)")
      ->capture_default_str();
  cmd->add_option("--fetch-threads", args->fetch_threads,
                  "Threads that fetch chunks from the object store, each with one request in "
                  "flight (1 to 256)")
      ->capture_default_str();
  cmd->add_flag("--no-learn{false}", args->options.learn,
                "Do not learn working sets: each restore faults its pages in as if it were the "
                "first (gmem ws clear forgets what was learned)");
  cmd->add_option("--keeper-socket", args->options.keeper_path,
                  "Where the keeper listens (default: SOCKET.keeper)");
  cmd->add_option("--metrics", args->metrics,
                  "Serve Prometheus metrics over HTTP at IP:PORT (e.g. 127.0.0.1:9464; port 0: "
                  "any free port, logged)");
  cmd->add_option("--trace-dir", args->trace_dir,
                  "Write each VM's restore trace here (one .gmtrace file per VM; `gmem report` "
                  "draws it)");
  cmd->add_option("--control-socket", args->control_socket,
                  "Where `gmem status` asks this daemon (default: SOCKET.control, owner-only)");
  cmd->add_flag("!--no-control", args->control, "No control socket (`gmem status` cannot ask)");
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
