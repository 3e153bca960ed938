// gmem ws show|clear SNAPSHOT: what gmem serve has learned of a snapshot's working set (the pages
// its restores need, in the order they need them), and forgetting it.
#include <CLI/CLI.hpp>
#include <cstdio>
#include <memory>
#include <nlohmann/json.hpp>
#include <string>

#include "commands.h"
#include "guestmem/page_source.h"
#include "guestmem/snapshot_cache.h"
#include "guestmem/working_set.h"

namespace guestmem::cli {
namespace {

struct WsArgs {
  std::string snapshot;
  std::string cache_dir;
  bool json = false;
};

int Fail(const std::string& what) {
  std::fprintf(stderr, "gmem ws: %s\n", what.c_str());
  return 1;
}

Result<SnapshotCache> OpenCache(const WsArgs& args) {
  return SnapshotCache::Open(args.cache_dir.empty() ? SnapshotCache::DefaultDirectory()
                                                    : args.cache_dir);
}

int Show(const WsArgs& args) {
  auto cache = OpenCache(args);
  if (!cache) return Fail(cache.error().ToString());
  auto snapshot = RawFileSource::Open(args.snapshot);
  if (!snapshot) return Fail(snapshot.error().ToString());
  auto identity = IdentifySnapshot(**snapshot);
  if (!identity) return Fail(identity.error().ToString());
  auto learned = cache->WorkingSetFor(*identity);
  if (!learned && learned.error().code() != ErrorCode::kNotFound) {
    return Fail(learned.error().ToString());
  }
  const size_t pages = learned ? learned->size() : 0;
  const uint32_t restores = learned ? learned->restores() : 0;
  if (args.json) {
    nlohmann::json out = {{"snapshot", args.snapshot},
                          {"entry", cache->WorkingSetPath(identity->file)},
                          {"learned", learned.has_value()},
                          {"restores", restores},
                          {"pages", pages},
                          {"bytes", pages * kPageSize4K}};
    if (learned) {
      nlohmann::json first = nlohmann::json::array();
      for (const WorkingSet::Entry& e : learned->entries()) {
        if (first.size() == 16) break;
        first.push_back(e.page);
      }
      out["first_pages"] = first;
    }
    std::printf("%s\n", out.dump(2).c_str());
    return 0;
  }
  if (!learned) {
    std::printf("%s: nothing learned yet (%s)\n", args.snapshot.c_str(),
                cache->WorkingSetPath(identity->file).c_str());
    return 0;
  }
  std::printf("%s: %zu pages (%.1f MiB) learned over %u restores\n  kept in %s\n",
              args.snapshot.c_str(), pages, static_cast<double>(pages * kPageSize4K) / (1 << 20),
              restores, cache->WorkingSetPath(identity->file).c_str());
  std::string first;
  size_t shown = 0;
  for (const WorkingSet::Entry& e : learned->entries()) {
    if (shown++ == 16) break;
    first += (first.empty() ? "" : " ") + std::to_string(e.page);
  }
  std::printf("  needed first (4 KiB pages): %s%s\n", first.c_str(), pages > 16 ? " ..." : "");
  return 0;
}

int Clear(const WsArgs& args) {
  auto cache = OpenCache(args);
  if (!cache) return Fail(cache.error().ToString());
  auto file = IdentifyFile(args.snapshot);
  if (!file) return Fail(file.error().ToString());
  if (Status forgotten = cache->ForgetWorkingSet(*file); !forgotten) {
    return Fail(forgotten.error().ToString());
  }
  std::printf("%s: what was learned is forgotten (a running gmem serve keeps what it knows until "
              "it restarts)\n",
              args.snapshot.c_str());
  return 0;
}

void AddCommon(CLI::App* cmd, WsArgs* args) {
  cmd->add_option("snapshot", args->snapshot, "The snapshot memory file")->required();
  cmd->add_option("--cache-dir", args->cache_dir,
                  "The cache gmem serve keeps (default: as gmem serve's)");
}

}  // namespace

void RegisterWorkingSetCommand(CLI::App& app) {
  auto args = std::make_shared<WsArgs>();
  CLI::App* ws = app.add_subcommand("ws", "Show or forget the working set learned of a snapshot");
  ws->require_subcommand(1);
  CLI::App* show = ws->add_subcommand("show", "What gmem serve has learned of SNAPSHOT");
  AddCommon(show, args.get());
  show->add_flag("--json", args->json, "Print JSON");
  show->callback([args] { CommandExitCode() = Show(*args); });
  CLI::App* clear = ws->add_subcommand("clear", "Forget what was learned of SNAPSHOT");
  AddCommon(clear, args.get());
  clear->callback([args] { CommandExitCode() = Clear(*args); });
}

}  // namespace guestmem::cli
