// gmem snapshot create: writes a demo guest memory file with a realistic mix of zero (sparse
// holes), text-like and random pages, and prints what it made on one line.
#include <CLI/CLI.hpp>
#include <cstdio>
#include <memory>
#include <string>

#include "commands.h"
#include "guestmem/address.h"
#include "progress.h"
#include "snapshot_maker.h"

namespace guestmem::cli {
namespace {

struct SnapshotCreateArgs {
  std::string path;
  std::string from;  // a variant of this memory file instead
  VariantOptions variant;
  uint64_t size_mib = 0;
  uint64_t size_bytes = 0;
  SnapshotMakerOptions options;
};

double Percent(uint64_t part, uint64_t whole) {
  return whole == 0 ? 0 : 100.0 * static_cast<double>(part) / static_cast<double>(whole);
}

int RunVariantCreate(const SnapshotCreateArgs& args) {
  auto made = MakeVariant(args.from, args.path, args.variant);
  if (!made) {
    std::fprintf(stderr, "snapshot create: %s\n", made.error().ToString().c_str());
    return 1;
  }
  std::printf("%s: %llu of %llu pages of %s changed (%.1f%%)%s; seed %llu\n", args.path.c_str(),
              static_cast<unsigned long long>(made->changed_pages),
              static_cast<unsigned long long>(made->pages), args.from.c_str(),
              Percent(made->changed_pages, made->pages),
              args.variant.diff_only ? ", only they written (a diff snapshot)" : "",
              static_cast<unsigned long long>(args.variant.seed));
  return 0;
}

int RunSnapshotCreate(SnapshotCreateArgs& args) {
  if (!args.from.empty()) return RunVariantCreate(args);
  args.options.size_bytes = args.size_bytes != 0 ? args.size_bytes : args.size_mib << 20;
  Progress progress("snapshot create", "MiB", args.options.size_bytes >> 20, /*quiet=*/false);
  args.options.progress = [&](uint64_t done, uint64_t) {
    progress.Update(done * kPageSize4K >> 20, args.path);
  };
  auto made = MakeSnapshot(args.path, args.options);
  progress.Clear();
  if (!made) {
    std::fprintf(stderr, "snapshot create: %s\n", made.error().ToString().c_str());
    return 1;
  }
  const SnapshotSummary& s = *made;
  std::printf(
      "%s: %llu bytes, %llu pages: %llu zero (%.1f%%, sparse holes), %llu text (%.1f%%), "
      "%llu random (%.1f%%); seed %llu\n",
      args.path.c_str(), static_cast<unsigned long long>(s.size_bytes),
      static_cast<unsigned long long>(s.pages), static_cast<unsigned long long>(s.zero_pages),
      Percent(s.zero_pages, s.pages), static_cast<unsigned long long>(s.text_pages),
      Percent(s.text_pages, s.pages), static_cast<unsigned long long>(s.random_pages),
      Percent(s.random_pages, s.pages), static_cast<unsigned long long>(s.seed));
  return 0;
}

}  // namespace

int SnapshotFailed(const char* command, const std::string& what) {
  std::fprintf(stderr, "gmem snapshot %s: %s\n", command, what.c_str());
  return 1;
}

void RegisterSnapshotCommand(CLI::App& app) {
  CLI::App* snapshot = app.add_subcommand("snapshot", "Snapshot memory file tools");
  snapshot->require_subcommand(1);
  auto args = std::make_shared<SnapshotCreateArgs>();
  CLI::App* create =
      snapshot->add_subcommand("create",
                               "Write a demo memory file: ~50% zero pages, ~30% text-like, "
                               "~20% random (seeded, deterministic)");
  create->add_option("path", args->path, "The memory file to write")->required();
  auto* mib = create->add_option("--size-mib", args->size_mib, "Size in MiB")
                  ->check(CLI::Range(uint64_t{1}, uint64_t{1} << 30));
  auto* bytes =
      create->add_option("--size-bytes", args->size_bytes, "Size in bytes (a multiple of 4096)");
  mib->excludes(bytes);
  create->add_option("--seed", args->options.seed, "Seed of the content")->capture_default_str();
  create->add_option("--zero", args->options.zero_fraction, "Fraction of zero pages")
      ->check(CLI::Range(0.0, 1.0))
      ->capture_default_str();
  create->add_option("--text", args->options.text_fraction, "Fraction of text-like pages")
      ->check(CLI::Range(0.0, 1.0))
      ->capture_default_str();
  create->add_option("--random", args->options.random_fraction, "Fraction of random pages")
      ->check(CLI::Range(0.0, 1.0))
      ->capture_default_str();
  create->add_flag("--holes", args->options.holes,
                   "Leave zero pages as sparse holes (default: written as zeros, as Firecracker "
                   "writes them)");
  create->add_flag("--force", args->options.overwrite, "Replace an existing file");
  create->add_option("--from", args->from,
                     "Write a later snapshot of this memory file instead: --change of its pages "
                     "rewritten, scattered (--seed picks them)");
  create->add_option("--change", args->variant.change_fraction,
                     "With --from: the fraction of pages that change")
      ->check(CLI::Range(0.0, 1.0))
      ->capture_default_str();
  create->add_flag("--diff-only", args->variant.diff_only,
                   "With --from: write only the changed pages, the rest holes (a diff snapshot)");
  RegisterPackedSnapshotCommands(*snapshot);
  RegisterRemoteSnapshotCommands(*snapshot);
  create->callback([args] {
    args->variant.seed = args->options.seed;
    args->variant.overwrite = args->options.overwrite;
    if (args->from.empty() && args->size_mib == 0 && args->size_bytes == 0) {
      std::fprintf(stderr, "snapshot create: give --size-mib or --size-bytes\n");
      CommandExitCode() = 1;
      return;
    }
    CommandExitCode() = RunSnapshotCreate(*args);
  });
}

}  // namespace guestmem::cli
