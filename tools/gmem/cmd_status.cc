// gmem status SOCKET: asks a running `gmem serve` (over its control socket) for its live VMs and
// their counters.
#include <CLI/CLI.hpp>
#include <cstdio>
#include <memory>
#include <nlohmann/json.hpp>
#include <string>

#include "commands.h"
#include "serve/endpoints.h"

namespace guestmem::cli {
namespace {

struct StatusArgs {
  std::string socket_path;
  std::string control_socket;
  bool json = false;
  bool metrics = false;
};

uint64_t Count(const nlohmann::json& stats, const char* family, const char* split = nullptr) {
  const nlohmann::json* v = &stats.at(family);
  if (split != nullptr) v = &v->at(split);
  return v->get<uint64_t>();
}

uint64_t Sum(const nlohmann::json& object) {
  uint64_t sum = 0;
  for (const auto& [key, value] : object.items()) sum += value.get<uint64_t>();
  return sum;
}

void PrintTable(const nlohmann::json& status) {
  std::printf("gmem serve (pid %d): %zu VM(s) connected, %zu finished", status.at("pid").get<int>(),
              status.at("vms_connected").get<size_t>(), status.at("vms_finished").get<size_t>());
  const uint64_t rejected = Sum(status.at("handshakes_rejected"));
  if (rejected > 0) {
    std::printf(", %llu handshake(s) rejected (", static_cast<unsigned long long>(rejected));
    const char* sep = "";
    for (const auto& [reason, n] : status.at("handshakes_rejected").items()) {
      if (n.get<uint64_t>() == 0) continue;
      std::printf("%s%s %llu", sep, reason.c_str(),
                  static_cast<unsigned long long>(n.get<uint64_t>()));
      sep = ", ";
    }
    std::printf(")");
  }
  std::printf("\n");
  if (status.at("vms").empty()) return;
  std::printf("%6s %8s %9s %9s %9s %9s %9s %9s %9s  %s\n", "vm", "pid", "seconds", "faults",
              "copied", "zeroed", "prefetch", "read MiB", "p99 us", "snapshot");
  for (const nlohmann::json& vm : status.at("vms")) {
    const nlohmann::json& s = vm.at("stats");
    std::printf("%6llu %8d %9.1f %9llu %9llu %9llu %9llu %9.1f %9.0f  %s\n",
                static_cast<unsigned long long>(vm.at("vm").get<uint64_t>()),
                vm.at("pid").get<int>(), vm.at("connected_seconds").get<double>(),
                static_cast<unsigned long long>(Sum(s.at("faults"))),
                static_cast<unsigned long long>(Count(s, "pages_installed", "copy")),
                static_cast<unsigned long long>(Count(s, "pages_installed", "zero")),
                static_cast<unsigned long long>(Count(s, "pages_prefetched")),
                static_cast<double>(Count(s, "source_read_bytes")) / (1 << 20),
                s.at("latency_seconds").at("p99").get<double>() * 1e6,
                vm.at("snapshot").get<std::string>().c_str());
  }
}

int RunStatus(const StatusArgs& args) {
  const std::string path =
      args.control_socket.empty() ? DefaultControlPath(args.socket_path) : args.control_socket;
  auto reply = QueryControl(path, args.metrics ? "metrics" : "status");
  if (!reply) {
    std::fprintf(stderr, "gmem status: %s\n", reply.error().ToString().c_str());
    return 1;
  }
  try {
    if (args.metrics) {
      std::fputs(reply->at("metrics").get<std::string>().c_str(), stdout);
    } else if (args.json) {
      std::printf("%s\n", reply->dump(2).c_str());
    } else {
      PrintTable(*reply);
    }
  } catch (const nlohmann::json::exception& e) {
    std::fprintf(stderr, "gmem status: the daemon's reply is not what was expected: %s\n",
                 e.what());
    return 1;
  }
  return 0;
}

}  // namespace

void RegisterStatusCommand(CLI::App& app) {
  auto args = std::make_shared<StatusArgs>();
  CLI::App* cmd =
      app.add_subcommand("status", "Ask a running gmem serve for its live VMs and their counters");
  cmd->add_option("socket_path", args->socket_path, "The socket gmem serve listens on")->required();
  cmd->add_option("--control-socket", args->control_socket,
                  "The daemon's control socket (default: SOCKET.control)");
  cmd->add_flag("--json", args->json, "Print the daemon's JSON reply");
  cmd->add_flag("--metrics", args->metrics,
                "Print the Prometheus exposition (as --metrics serves it over HTTP)");
  cmd->callback([args] { CommandExitCode() = RunStatus(*args); });
}

}  // namespace guestmem::cli
