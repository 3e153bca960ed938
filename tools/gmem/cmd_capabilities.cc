// gmem capabilities: what this machine's kernel offers guestmem (userfaultfd features, each
// guest memory backend), probed, not assumed.
#include <sys/utsname.h>

#include <CLI/CLI.hpp>
#include <cstdio>
#include <nlohmann/json.hpp>
#include <string>

#include "commands.h"
#include "guestmem/memory_file.h"
#include "guestmem/userfaultfd.h"

namespace guestmem::cli {
namespace {

std::string ModesText(UffdModes modes) {
  std::string out;
  auto add = [&](UffdModes bit, const char* name) {
    if ((modes & bit) != UffdModes::kNone) out += out.empty() ? name : std::string("|") + name;
  };
  add(UffdModes::kMissing, "MISSING");
  add(UffdModes::kWriteProtect, "WP");
  add(UffdModes::kMinor, "MINOR");
  return out.empty() ? "none" : out;
}

nlohmann::json Probe() {
  nlohmann::json report;
  utsname uts{};
  uname(&uts);
  report["kernel"] = std::string(uts.release);
  auto uffd = Userfaultfd::Probe();
  if (uffd) {
    report["userfaultfd"] = {{"available", true},
                             {"features", UffdFeatureNames(uffd->features)},
                             {"poison", (uffd->features & kUffdFeaturePoison) != 0},
                             {"move", (uffd->features & kUffdFeatureMove) != 0}};
  } else {
    report["userfaultfd"] = {{"available", false}, {"reason", uffd.error().ToString()}};
  }
  nlohmann::json backends = nlohmann::json::array();
  for (MemoryBackend backend :
       {MemoryBackend::kShmem, MemoryBackend::kHugetlb, MemoryBackend::kAnonymous,
        MemoryBackend::kSecret, MemoryBackend::kGuestMemfd}) {
    nlohmann::json entry = {{"backend", std::string(MemoryBackendName(backend))}};
    auto caps = ProbeBackend(backend);
    if (caps) {
      entry["available"] = true;
      entry["page_size"] = caps->page_size;
      entry["mmap"] = caps->mmap_allowed;
      entry["populate_by_write"] = caps->populate_by_write;
      entry["direct_map_removed"] = caps->direct_map_removed;
      entry["uffd_modes"] = ModesText(caps->uffd_modes);
      entry["note"] = caps->note;
    } else {
      entry["available"] = false;
      entry["reason"] = caps.error().ToString();
    }
    backends.push_back(entry);
  }
  report["backends"] = backends;
  return report;
}

void PrintText(const nlohmann::json& report) {
  std::printf("guestmem capabilities of this machine (kernel %s)\n\n",
              report["kernel"].get<std::string>().c_str());
  const auto& uffd = report["userfaultfd"];
  if (uffd["available"].get<bool>()) {
    std::string features;
    for (const auto& f : uffd["features"]) features += " " + f.get<std::string>();
    std::printf("userfaultfd: available\n  features:%s\n\n", features.c_str());
  } else {
    std::printf("userfaultfd: unavailable: %s\n\n", uffd["reason"].get<std::string>().c_str());
  }
  std::printf("%-12s %-9s %-9s %-5s %-8s %-17s %s\n", "backend", "available", "page", "mmap",
              "write()", "uffd", "notes");
  for (const auto& b : report["backends"]) {
    if (b["available"].get<bool>()) {
      std::printf("%-12s %-9s %-9s %-5s %-8s %-17s %s\n", b["backend"].get<std::string>().c_str(),
                  "yes", b["page_size"].get<uint64_t>() >= (1u << 20) ? "2 MiB" : "4 KiB",
                  b["mmap"].get<bool>() ? "yes" : "no",
                  b["populate_by_write"].get<bool>() ? "yes" : "no",
                  b["uffd_modes"].get<std::string>().c_str(), b["note"].get<std::string>().c_str());
    } else {
      std::printf("%-12s %-9s %s\n", b["backend"].get<std::string>().c_str(), "no",
                  b["reason"].get<std::string>().c_str());
    }
  }
}

}  // namespace

void RegisterCapabilitiesCommand(CLI::App& app) {
  auto json = std::make_shared<bool>(false);
  CLI::App* cmd = app.add_subcommand(
      "capabilities", "Report what this machine's kernel offers (userfaultfd, memory backends)");
  cmd->add_flag("--json", *json, "Print one JSON object");
  cmd->callback([json] {
    nlohmann::json report = Probe();
    if (*json) {
      std::printf("%s\n", report.dump(2).c_str());
    } else {
      PrintText(report);
    }
    CommandExitCode() = 0;
  });
}

}  // namespace guestmem::cli
