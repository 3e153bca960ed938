// gmem snapshot pack|inspect|verify|unpack|diff: packed snapshots (docs/snapshot-format.md).
#include <CLI/CLI.hpp>
#include <cstdio>
#include <map>
#include <memory>
#include <nlohmann/json.hpp>
#include <set>
#include <string>

#include "commands.h"
#include "guestmem/packed_source.h"
#include "guestmem/snapshot_cache.h"
#include "guestmem/snapshot_packer.h"
#include "guestmem/working_set.h"
#include "progress.h"

namespace guestmem::cli {
namespace {

double Mib(uint64_t bytes) { return static_cast<double>(bytes) / (1 << 20); }

// Progress in MiB of a snapshot of `bytes` bytes, as the library's Progress callbacks tell it.
struct MibProgress {
  MibProgress(const std::string& what, uint64_t bytes, bool quiet)
      : line("snapshot " + what, "MiB", bytes >> 20, quiet) {}
  guestmem::Progress Callback() {
    return [this](uint64_t done, uint64_t) { line.Update(done >> 20); };
  }
  cli::Progress line;
};
double Percent(uint64_t part, uint64_t whole) {
  return whole == 0 ? 0 : 100.0 * static_cast<double>(part) / static_cast<double>(whole);
}

// ---------------------------------------------------------------------------------------------
// pack

struct PackArgs {
  std::string source, out;
  std::string codec = "zstd";
  int level = 3;
  uint32_t chunk_kib = 256;
  std::string parent, store, holes = "auto", cache_dir;
  unsigned threads = 0;
  bool no_working_set = false, json = false;
};

// What gmem serve has learned of `source` (the pages its restores needed), if anything.
std::vector<uint64_t> LearnedPages(const RawFileSource& source, const std::string& cache_dir) {
  auto cache = SnapshotCache::Open(cache_dir.empty() ? SnapshotCache::DefaultDirectory()
                                                     : cache_dir);
  if (!cache) return {};
  auto identity = IdentifySnapshot(source);
  if (!identity) return {};
  auto learned = cache->WorkingSetFor(*identity);
  return learned ? learned->Pages() : std::vector<uint64_t>{};
}

int RunPack(const PackArgs& args) {
  const std::optional<Codec> codec = ParseCodec(args.codec);
  if (!codec) return SnapshotFailed("pack", "--codec " + args.codec + ": not zstd, lz4 or none");
  const HoleMeaning holes = args.holes == "zero"     ? HoleMeaning::kZero
                            : args.holes == "parent" ? HoleMeaning::kParent
                                                     : HoleMeaning::kAuto;
  auto opened = OpenAnySnapshot(args.source, PackedSourceOptions{.decode_threads = 0});
  if (!opened) return SnapshotFailed("pack", opened.error().ToString());
  PackOptions options{.codec = *codec,
                      .level = args.level,
                      .chunk_pages = args.chunk_kib / 4,
                      .parent_path = args.parent,
                      .store_directory = args.store,
                      .holes = holes,
                      .threads = args.threads};
  if (const auto* raw = dynamic_cast<const RawFileSource*>(opened->get());
      raw != nullptr && !args.no_working_set) {
    options.working_set = LearnedPages(*raw, args.cache_dir);
  } else if (const auto* packed = dynamic_cast<const PackedSource*>(opened->get())) {
    options.working_set = packed->index().working_set;
  }
  MibProgress progress("pack", (*opened)->size(), args.json);
  options.progress = progress.Callback();
  auto summary = PackSnapshot(**opened, args.out, options);
  progress.line.Clear();
  if (!summary) return SnapshotFailed("pack", summary.error().ToString());
  const PackSummary& s = *summary;
  const double mb_per_s = s.seconds > 0 ? static_cast<double>(s.raw_bytes) / 1e6 / s.seconds : 0;
  if (args.json) {
    nlohmann::json out = {{"out", args.out},
                          {"raw_bytes", s.raw_bytes},
                          {"pages", s.pages},
                          {"zero_pages", s.zero_pages},
                          {"parent_pages", s.parent_pages},
                          {"stored_pages", s.stored_pages},
                          {"chunks", s.chunks},
                          {"chunks_shared", s.chunks_shared},
                          {"compressed_bytes", s.compressed_bytes},
                          {"file_bytes", s.file_bytes},
                          {"working_set_pages", options.working_set.size()},
                          {"seconds", s.seconds},
                          {"mb_per_second", mb_per_s}};
    std::printf("%s\n", out.dump(2).c_str());
    return 0;
  }
  std::printf(
      "%s: %.1f MiB packed into %.2f MiB (%s) in %.2f s, %.0f MB/s\n"
      "  pages: %llu zero (%.1f%%), %llu the parent's (%.1f%%), %llu stored (%.1f%%) in %llu "
      "chunks (%llu shared)\n",
      args.out.c_str(), Mib(s.raw_bytes), Mib(s.file_bytes + (args.store.empty() ? 0 : s.compressed_bytes)),
      args.store.empty() ? "one file" : ("index; new chunks in " + args.store).c_str(), s.seconds,
      mb_per_s, static_cast<unsigned long long>(s.zero_pages), Percent(s.zero_pages, s.pages),
      static_cast<unsigned long long>(s.parent_pages), Percent(s.parent_pages, s.pages),
      static_cast<unsigned long long>(s.stored_pages), Percent(s.stored_pages, s.pages),
      static_cast<unsigned long long>(s.chunks), static_cast<unsigned long long>(s.chunks_shared));
  if (!options.working_set.empty()) {
    std::printf("  working set: %zu pages kept with it\n", options.working_set.size());
  }
  return 0;
}

// ---------------------------------------------------------------------------------------------
// inspect

struct InspectArgs {
  std::string snapshot;
  bool json = false;
};

nlohmann::json DescribeLayer(const PackedSource& layer) {
  const PackIndex& index = layer.index();
  uint64_t zero = 0, parent = 0, stored = 0, compressed = 0, in_store = 0;
  std::map<std::string, uint64_t> codecs;
  std::set<ChunkHash> distinct;
  for (const PageRun& r : index.runs) {
    (r.kind == PageKind::kZero ? zero : r.kind == PageKind::kParent ? parent : stored) += r.pages;
  }
  for (const ChunkRef& c : index.chunks) {
    ++codecs[std::string(CodecName(c.codec))];
    if (distinct.insert(c.hash).second) compressed += c.compressed_bytes;
    in_store += c.location == ChunkLocation::kStore ? 1 : 0;
  }
  return {{"file", layer.storage().name()},
          {"file_bytes", layer.storage().size()},
          {"identity", ToHex(index.Identity())},
          {"pages", index.page_count()},
          {"zero_pages", zero},
          {"parent_pages", parent},
          {"stored_pages", stored},
          {"chunk_bytes", layer.chunk_bytes()},
          {"chunks", index.chunks.size()},
          {"chunks_distinct", distinct.size()},
          {"chunks_in_store", in_store},
          {"codecs", codecs},
          {"compressed_bytes", compressed},
          {"store", index.store_path},
          {"parent", index.parent_path},
          {"working_set_pages", index.working_set.size()}};
}

int RunInspect(const InspectArgs& args) {
  auto source = PackedSource::Open(args.snapshot, PackedSourceOptions{.decode_threads = 0});
  if (!source) return SnapshotFailed("inspect", source.error().ToString());
  nlohmann::json layers = nlohmann::json::array();
  uint64_t compressed = 0, shared = 0, chunk_refs = 0;
  std::set<ChunkHash> distinct;
  for (const PackedSource* layer = source->get(); layer != nullptr; layer = layer->parent()) {
    layers.push_back(DescribeLayer(*layer));
    for (const ChunkRef& c : layer->index().chunks) {
      ++chunk_refs;
      if (distinct.insert(c.hash).second) {
        compressed += c.compressed_bytes;
      } else {
        ++shared;
      }
    }
  }
  const PackIndex& top = (*source)->index();
  // Zero pages of the whole chain: what a restore never reads.
  uint64_t zero_bytes = 0;
  for (uint64_t at = 0; at < (*source)->size();) {
    auto extent = (*source)->ExtentAt(FileOffset(at));
    if (!extent) return SnapshotFailed("inspect", extent.error().ToString());
    if (extent->kind == ExtentKind::kZero) zero_bytes += extent->length;
    at += extent->length;
  }
  const uint64_t raw = top.raw_size;
  const double ratio = compressed == 0 ? 0 : static_cast<double>(raw) / static_cast<double>(compressed);
  if (args.json) {
    nlohmann::json out = {{"snapshot", args.snapshot},
                          {"format_version", PackIndex::kVersion},
                          {"raw_bytes", raw},
                          {"zero_fraction", raw == 0 ? 0.0 : static_cast<double>(zero_bytes) / static_cast<double>(raw)},
                          {"compressed_bytes", compressed},
                          {"ratio", ratio},
                          {"chunks", chunk_refs},
                          {"chunks_shared", shared},
                          {"working_set_pages", top.working_set.size()},
                          {"layers", layers}};
    std::printf("%s\n", out.dump(2).c_str());
    return 0;
  }
  std::printf("%s: packed snapshot (format %u) of %.1f MiB, %zu layer%s\n", args.snapshot.c_str(),
              PackIndex::kVersion, Mib(raw), layers.size(), layers.size() == 1 ? "" : "s");
  std::printf("  zero: %.1f%% of its pages (never stored, never read)\n",
              Percent(zero_bytes, raw));
  std::printf("  chunks: %.2f MiB compressed in %llu distinct chunks (%llu more shared), %.2fx "
              "the raw size\n",
              Mib(compressed), static_cast<unsigned long long>(distinct.size()),
              static_cast<unsigned long long>(shared), ratio);
  std::printf("  working set: %zu pages\n", top.working_set.size());
  for (const nlohmann::json& l : layers) {
    std::string codecs;
    for (const auto& [name, n] : l["codecs"].items()) {
      codecs += (codecs.empty() ? "" : ", ") + name + " " + std::to_string(n.get<uint64_t>());
    }
    std::printf("  layer %s: %llu stored, %llu zero, %llu the parent's pages; %llu chunks of <= %llu "
                "KiB (%s)%s%s\n",
                l["file"].get<std::string>().c_str(),
                static_cast<unsigned long long>(l["stored_pages"].get<uint64_t>()),
                static_cast<unsigned long long>(l["zero_pages"].get<uint64_t>()),
                static_cast<unsigned long long>(l["parent_pages"].get<uint64_t>()),
                static_cast<unsigned long long>(l["chunks"].get<uint64_t>()),
                static_cast<unsigned long long>(l["chunk_bytes"].get<uint64_t>() >> 10),
                codecs.c_str(),
                l["store"].get<std::string>().empty()
                    ? ""
                    : (", store " + l["store"].get<std::string>()).c_str(),
                l["parent"].get<std::string>().empty()
                    ? ""
                    : (", over " + l["parent"].get<std::string>()).c_str());
  }
  return 0;
}

// ---------------------------------------------------------------------------------------------
// verify, unpack, diff

struct PathArgs {
  std::string a, b;
  bool json = false;
};

int RunVerify(const PathArgs& args) {
  auto source = PackedSource::Open(args.a, PackedSourceOptions{.decode_threads = 0});
  if (!source) return SnapshotFailed("verify", source.error().ToString());
  uint64_t chunks = 0;
  for (const PackedSource* l = source->get(); l != nullptr; l = l->parent()) {
    chunks += l->index().chunks.size();
  }
  Progress progress("snapshot verify", "chunks", chunks, args.json);
  const std::vector<BadChunk> bad =
      VerifySnapshot(**source, [&](uint64_t done, uint64_t) { progress.Update(done); });
  progress.Clear();
  if (args.json) {
    nlohmann::json out = {{"snapshot", args.a}, {"chunks", chunks}, {"bad", nlohmann::json::array()}};
    for (const BadChunk& b : bad) {
      out["bad"].push_back({{"layer", b.layer}, {"chunk", b.chunk}, {"error", b.why.ToString()}});
    }
    std::printf("%s\n", out.dump(2).c_str());
  } else {
    for (const BadChunk& b : bad) std::printf("BAD %s\n", b.why.ToString().c_str());
    std::printf("%s: %llu chunks checked, %zu bad\n", args.a.c_str(),
                static_cast<unsigned long long>(chunks), bad.size());
  }
  return bad.empty() ? 0 : 1;
}

int RunUnpack(const PathArgs& args) {
  auto source = OpenAnySnapshot(args.a);
  if (!source) return SnapshotFailed("unpack", source.error().ToString());
  MibProgress progress("unpack", (*source)->size(), args.json);
  const Status done = UnpackSnapshot(**source, args.b, progress.Callback());
  progress.line.Clear();
  if (!done) {
    return SnapshotFailed("unpack", done.error().ToString());
  }
  if (!args.json) std::printf("%s: %.1f MiB written\n", args.b.c_str(), Mib((*source)->size()));
  return 0;
}

int RunDiff(const PathArgs& args) {
  auto a = OpenAnySnapshot(args.a);
  if (!a) return SnapshotFailed("diff", a.error().ToString());
  auto b = OpenAnySnapshot(args.b);
  if (!b) return SnapshotFailed("diff", b.error().ToString());
  MibProgress progress("diff", (*a)->size(), args.json);
  auto diff = DiffSnapshots(**a, **b, progress.Callback());
  progress.line.Clear();
  if (!diff) return SnapshotFailed("diff", diff.error().ToString());
  if (args.json) {
    nlohmann::json runs = nlohmann::json::array();
    for (const PageRun& r : diff->runs) runs.push_back({r.first_page, r.pages});
    std::printf("%s\n", nlohmann::json{{"pages", diff->pages},
                                       {"differing_pages", diff->differing_pages},
                                       {"runs", runs}}
                            .dump(2)
                            .c_str());
  } else {
    std::printf("%llu of %llu pages differ (%.2f%%) in %zu runs\n",
                static_cast<unsigned long long>(diff->differing_pages),
                static_cast<unsigned long long>(diff->pages),
                Percent(diff->differing_pages, diff->pages), diff->runs.size());
    for (size_t i = 0; i < diff->runs.size() && i < 20; ++i) {
      const PageRun& r = diff->runs[i];
      std::printf("  pages %llu-%llu (offset 0x%llx, %llu KiB)\n",
                  static_cast<unsigned long long>(r.first_page),
                  static_cast<unsigned long long>(r.end_page() - 1),
                  static_cast<unsigned long long>(r.first_page * 4096),
                  static_cast<unsigned long long>(r.pages * 4));
    }
    if (diff->runs.size() > 20) std::printf("  ... %zu more runs\n", diff->runs.size() - 20);
  }
  return diff->differing_pages == 0 ? 0 : 1;
}

}  // namespace

void RegisterPackedSnapshotCommands(CLI::App& snapshot) {
  auto pack_args = std::make_shared<PackArgs>();
  CLI::App* pack = snapshot.add_subcommand(
      "pack", "Pack a memory file: zero pages dropped, the rest in compressed, hashed chunks");
  pack->add_option("source", pack_args->source, "The memory file (or a packed snapshot)")
      ->required();
  pack->add_option("out", pack_args->out, "The packed snapshot to write")->required();
  pack->add_option("--codec", pack_args->codec, "zstd, lz4 or none")
      ->check(CLI::IsMember({"zstd", "lz4", "none"}))
      ->capture_default_str();
  pack->add_option("--level", pack_args->level, "Compression level (zstd 1-19; lz4 1 fast, 2-12 HC)")
      ->check(CLI::Range(1, 19))
      ->capture_default_str();
  pack->add_option("--chunk-kib", pack_args->chunk_kib, "Chunk size in KiB (64 to 4096, a power of two)")
      ->check([](const std::string& text) -> std::string {
        uint64_t v = 0;
        try {
          v = std::stoull(text);
        } catch (...) {
          return "not a number";
        }
        if (v < 64 || v > 4096 || (v & (v - 1)) != 0) return "a power of two from 64 to 4096";
        return "";
      })
      ->capture_default_str();
  pack->add_option("--parent", pack_args->parent,
                   "A packed snapshot to layer over: only pages that differ from it are stored");
  pack->add_option("--store", pack_args->store,
                   "A chunk store directory shared by snapshots (chunks kept once by content)");
  pack->add_option("--holes", pack_args->holes,
                   "What the source's holes are: zero, parent, or auto (the parent's pages with "
                   "--parent, as in a Firecracker diff snapshot; zeros without)")
      ->check(CLI::IsMember({"auto", "zero", "parent"}))
      ->capture_default_str();
  pack->add_option("--threads", pack_args->threads, "Compressing threads (0: one per CPU)")
      ->check(CLI::Range(0u, 256u));
  pack->add_option("--cache-dir", pack_args->cache_dir,
                   "Where gmem serve keeps what it learned (its working set is packed along)");
  pack->add_flag("--no-working-set", pack_args->no_working_set,
                 "Do not keep the learned working set with the snapshot");
  pack->add_flag("--json", pack_args->json, "Print the summary as JSON (and no progress)");
  pack->callback([pack_args] { CommandExitCode() = RunPack(*pack_args); });

  auto inspect_args = std::make_shared<InspectArgs>();
  CLI::App* inspect = snapshot.add_subcommand(
      "inspect", "Sizes, ratio, layers, shared chunks, zero fraction and working set");
  inspect->add_option("snapshot", inspect_args->snapshot, "A packed snapshot")->required();
  inspect->add_flag("--json", inspect_args->json, "Print JSON");
  inspect->callback([inspect_args] { CommandExitCode() = RunInspect(*inspect_args); });

  auto verify_args = std::make_shared<PathArgs>();
  CLI::App* verify = snapshot.add_subcommand(
      "verify", "Check every chunk of every layer against its hash (exit 1 naming bad chunks)");
  verify->add_option("snapshot", verify_args->a, "A packed snapshot")->required();
  verify->add_flag("--json", verify_args->json, "Print JSON");
  verify->callback([verify_args] { CommandExitCode() = RunVerify(*verify_args); });

  auto unpack_args = std::make_shared<PathArgs>();
  CLI::App* unpack = snapshot.add_subcommand(
      "unpack", "Write the raw memory file a snapshot stands for (layers merged)");
  unpack->add_option("snapshot", unpack_args->a, "A packed snapshot")->required();
  unpack->add_option("out", unpack_args->b, "The memory file to write")->required();
  unpack->add_flag("--quiet", unpack_args->json, "No progress or summary");
  unpack->callback([unpack_args] { CommandExitCode() = RunUnpack(*unpack_args); });

  auto diff_args = std::make_shared<PathArgs>();
  CLI::App* diff = snapshot.add_subcommand(
      "diff", "The pages where two snapshots (raw or packed) differ (exit 1 when they do)");
  diff->add_option("a", diff_args->a, "A snapshot")->required();
  diff->add_option("b", diff_args->b, "Another of the same size")->required();
  diff->add_flag("--json", diff_args->json, "Print JSON");
  diff->callback([diff_args] { CommandExitCode() = RunDiff(*diff_args); });
}

}  // namespace guestmem::cli
