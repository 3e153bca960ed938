// gmem bench: restore strategies side by side, in one process.
//
// For each workload configuration (kind x threads x access) it plans the accesses once, runs one
// warm-up round of every contestant, then `--rounds` rounds in which the contestants take turns
// (the order rotates each round), each on fresh destination memory. It reports the median time of
// each contestant and the median over rounds of its speed-up against the File backend and against
// the per-page reference handler measured in the same round. Any run whose memory differs from
// the snapshot fails the whole benchmark.
#include <unistd.h>

#include <CLI/CLI.hpp>
#include <algorithm>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <map>
#include <memory>
#include <mutex>
#include <nlohmann/json.hpp>
#include <optional>
#include <string>
#include <thread>
#include <vector>

#include "base/temp_dir.h"
#include "bench/restore_bench.h"
#include "guestmem/chunk_codec.h"
#include "commands.h"
#include "guestmem/log.h"
#include "guestmem/restore_trace.h"
#include "progress.h"
#include "report/restore_report.h"
#include "serve/endpoints.h"
#include "serve/serve_metrics.h"
#include "sim/workload.h"
#include "snapshot_maker.h"

namespace guestmem::cli {
namespace {

using bench::Contestant;

std::vector<std::string> AllContestantNames() {
  std::vector<std::string> names;
  for (Contestant c : bench::kAllContestants) names.emplace_back(bench::ContestantName(c));
  return names;
}

struct BenchArgs {
  std::string mem_file;  // empty: write a demo snapshot of size_mib into a temp dir
  uint64_t size_mib = 256;
  unsigned rounds = 5;
  std::vector<std::string> workloads = {"sparse", "sequential", "random"};
  std::vector<unsigned> threads = {1, 2};
  std::vector<std::string> access = {"read", "write"};
  std::vector<std::string> contestants = AllContestantNames();
  uint64_t fault_around_kib = kDefaultFaultAroundBytes / 1024;
  bool fixed_windows = false;
  unsigned workers = 1;
  uint64_t seed = 1;
  bool cold = false;
  bool holes = false;  // the demo snapshot's zero pages as sparse holes
  std::string pack_codec = "zstd";  // the packed contestants' snapshot
  int pack_level = 3;
  uint32_t pack_chunk_kib = 256;
  bool json = false;
  unsigned vms = 0;  // > 0: N VMs restoring at once against one VM's floor, instead of the tables
  unsigned workers_given = 0;  // --workers was on the command line
  std::string report;          // --report: the HTML page of the contestants' traces
  std::string metrics;         // --metrics: serve the runs' metrics as gmem serve does
};

// --metrics: the timed restores' spaces as live VMs of a ServeMetrics, each while it is served.
class BenchMetrics {
 public:
  static Result<std::unique_ptr<BenchMetrics>> Start(const std::string& address) {
    GM_ASSIGN_OR_RETURN(MetricsAddress parsed, ParseMetricsAddress(address));
    std::unique_ptr<BenchMetrics> out(new BenchMetrics());
    GM_ASSIGN_OR_RETURN(out->http_, MetricsHttpServer::Start(parsed, &out->metrics_));
    return out;
  }
  ~BenchMetrics() { http_.reset(); }  // before the registry it reads
  const MetricsAddress& address() const { return http_->address(); }

  // Hooks RestoreOptions' callbacks up to the registry.
  void Observe(bench::RestoreOptions& options, const std::string& snapshot) {
    options.on_serving = [this, snapshot](const FaultEngine& engine, SpaceId space) {
      {
        std::lock_guard lock(mu_);
        engine_ = &engine;
      }
      metrics_.VmStarted(space, VmLabels{++runs_, getpid(), snapshot});
    };
    options.on_served = [this](SpaceId, const FaultStats& stats) {
      {
        std::lock_guard lock(mu_);
        engine_ = nullptr;
      }
      metrics_.VmFinished(runs_, stats);
    };
  }

 private:
  BenchMetrics()
      : metrics_([this](SpaceId space) -> std::optional<FaultStats> {
          std::lock_guard lock(mu_);
          return engine_ != nullptr ? engine_->Stats(space) : std::nullopt;
        }) {}
  std::mutex mu_;
  const FaultEngine* engine_ = nullptr;  // GUARDED_BY(mu_): the engine of the run being served
  uint64_t runs_ = 0;                    // the bench's thread only
  ServeMetrics metrics_;
  std::unique_ptr<MetricsHttpServer> http_;
};

bool IsGuestmem(Contestant c) {
  return c == Contestant::kOnDemand || c == Contestant::kLearned || c == Contestant::kFaultAll ||
         c == Contestant::kMinorTrap;
}

struct Config {
  sim::WorkloadKind kind;
  unsigned threads;
  sim::AccessMode access;
  std::string Label() const {
    return std::string(sim::WorkloadKindName(kind)) + ", " + std::to_string(threads) +
           (threads == 1 ? " thread, " : " threads, ") +
           (access == sim::AccessMode::kRead ? "reads" : "writes");
  }
};

// Every run of one contestant in one configuration, by round.
struct Series {
  std::vector<bench::RestoreRun> runs;
};

double Median(std::vector<double> values) {
  if (values.empty()) return 0;
  std::sort(values.begin(), values.end());
  const size_t n = values.size();
  return n % 2 == 1 ? values[n / 2] : (values[n / 2 - 1] + values[n / 2]) / 2;
}

double Ms(uint64_t ns) { return static_cast<double>(ns) / 1e6; }

// The median over rounds of base's time / contestant's time: > 1 means the contestant is faster.
std::optional<double> MedianSpeedup(const Series& base, const Series& contestant) {
  if (base.runs.size() != contestant.runs.size() || base.runs.empty()) return std::nullopt;
  std::vector<double> ratios;
  for (size_t r = 0; r < base.runs.size(); ++r) {
    ratios.push_back(static_cast<double>(base.runs[r].elapsed_ns) /
                     static_cast<double>(std::max<uint64_t>(contestant.runs[r].elapsed_ns, 1)));
  }
  return Median(ratios);
}

// The median over rounds of contestant's time / floor's time: how far from the floor it is.
std::optional<double> MedianOverFloor(const Series& floor, const Series& contestant) {
  if (floor.runs.size() != contestant.runs.size() || floor.runs.empty()) return std::nullopt;
  std::vector<double> ratios;
  for (size_t r = 0; r < floor.runs.size(); ++r) {
    ratios.push_back(static_cast<double>(contestant.runs[r].elapsed_ns) /
                     static_cast<double>(std::max<uint64_t>(floor.runs[r].elapsed_ns, 1)));
  }
  return Median(ratios);
}

template <typename Field>
double MedianOf(const Series& series, Field field) {
  std::vector<double> values;
  for (const bench::RestoreRun& run : series.runs) values.push_back(field(run));
  return Median(values);
}

Result<std::vector<Config>> ParseConfigs(const BenchArgs& args) {
  std::vector<Config> configs;
  for (const std::string& workload : args.workloads) {
    GM_ASSIGN_OR_RETURN(sim::WorkloadKind kind, sim::ParseWorkloadKind(workload));
    for (unsigned threads : args.threads) {
      for (const std::string& access : args.access) {
        GM_ASSIGN_OR_RETURN(sim::AccessMode mode, sim::ParseAccessMode(access));
        configs.push_back({kind, threads, mode});
      }
    }
  }
  return configs;
}

struct ConfigResult {
  Config config;
  uint64_t accesses = 0;
  uint64_t distinct_pages = 0;
  std::map<Contestant, Series> series;
};

// What the table and the JSON report of one contestant in one configuration.
struct Summary {
  Contestant contestant;
  std::vector<double> times_ms;  // by round
  double median_ms = 0;
  double faults = 0;
  double pages_installed = 0;
  double latency_p50_us = 0;  // 0: not measured (not a guestmem contestant)
  std::optional<double> vs_file;
  std::optional<double> vs_per_page;
  std::optional<double> over_floor;  // contestant's time / the floor's, same round
  double fault_all_ns = 0;           // kFaultAll: the time to install everything; else 0
  double pages_prefetched = 0;       // kLearned: installed ahead of the guest's faults
};

std::vector<Summary> Summarize(const ConfigResult& result) {
  const auto series_of = [&](Contestant c) {
    auto it = result.series.find(c);
    return it == result.series.end() ? nullptr : &it->second;
  };
  const Series* file = series_of(Contestant::kFileBackend);
  const Series* per_page = series_of(Contestant::kPerPage);
  const Series* floor = series_of(Contestant::kFloor);
  std::vector<Summary> summaries;
  for (const auto& [contestant, series] : result.series) {
    Summary s{.contestant = contestant};
    for (const bench::RestoreRun& run : series.runs) s.times_ms.push_back(Ms(run.elapsed_ns));
    s.median_ms = Median(s.times_ms);
    s.faults = MedianOf(series, [](const bench::RestoreRun& r) { return double(r.faults); });
    s.pages_installed =
        MedianOf(series, [](const bench::RestoreRun& r) { return double(r.pages_installed); });
    s.latency_p50_us =
        MedianOf(series, [](const bench::RestoreRun& r) { return r.latency_p50_ns / 1e3; });
    if (file != nullptr) s.vs_file = MedianSpeedup(*file, series);
    if (per_page != nullptr) s.vs_per_page = MedianSpeedup(*per_page, series);
    if (floor != nullptr) s.over_floor = MedianOverFloor(*floor, series);
    s.fault_all_ns =
        MedianOf(series, [](const bench::RestoreRun& r) { return double(r.fault_all_ns); });
    s.pages_prefetched =
        MedianOf(series, [](const bench::RestoreRun& r) { return double(r.pages_prefetched); });
    summaries.push_back(std::move(s));
  }
  return summaries;
}

std::string Speedup(const std::optional<double>& ratio) {
  if (!ratio) return "-";
  char buf[32];
  (void)std::snprintf(buf, sizeof(buf), "%.2fx", *ratio);
  return buf;
}

void PrintConfig(const ConfigResult& result, double memcpy_bytes_per_s, uint64_t size) {
  std::printf("\n%s: %llu accesses, %llu distinct pages\n", result.config.Label().c_str(),
              static_cast<unsigned long long>(result.accesses),
              static_cast<unsigned long long>(result.distinct_pages));
  std::printf("  %-31s %10s %9s %10s %9s %12s %8s %9s\n", "contestant", "median ms", "faults",
              "installed", "vs file", "vs per-page", "x floor", "p50 lat");
  for (const Summary& s : Summarize(result)) {
    const std::string latency =
        s.latency_p50_us > 0 ? std::to_string(static_cast<int>(s.latency_p50_us)) + "us" : "-";
    std::printf("  %-31s %10.2f %9.0f %10.0f %9s %12s %8s %9s\n",
                std::string(bench::ContestantTitle(s.contestant)).c_str(), s.median_ms, s.faults,
                s.pages_installed, Speedup(s.vs_file).c_str(), Speedup(s.vs_per_page).c_str(),
                Speedup(s.over_floor).c_str(), latency.c_str());
    if (s.fault_all_ns > 0) {
      const double bytes_per_s = static_cast<double>(size) * 1e9 / s.fault_all_ns;
      std::printf("  %-31s installs everything in %.1f ms: %.2f GB/s, %.0f%% of memcpy\n", "",
                  s.fault_all_ns / 1e6, bytes_per_s / 1e9, 100 * bytes_per_s / memcpy_bytes_per_s);
    }
    if (s.pages_prefetched > 0) {
      std::printf("  %-31s %.0f pages prefetched from the working set learned\n", "",
                  s.pages_prefetched);
    }
  }
}

nlohmann::json ToJson(const ConfigResult& result, uint64_t size) {
  const auto optional = [](const std::optional<double>& v) {
    return v ? nlohmann::json(*v) : nlohmann::json(nullptr);
  };
  nlohmann::json contestants = nlohmann::json::array();
  for (const Summary& s : Summarize(result)) {
    nlohmann::json c = {{"name", bench::ContestantName(s.contestant)},
                        {"times_ms", s.times_ms},
                        {"median_ms", s.median_ms},
                        {"faults", s.faults},
                        {"pages_installed", s.pages_installed},
                        {"latency_p50_us", s.latency_p50_us},
                        {"speedup_vs_file", optional(s.vs_file)},
                        {"speedup_vs_per_page", optional(s.vs_per_page)},
                        {"times_the_floor", optional(s.over_floor)},
                        {"pages_prefetched", s.pages_prefetched}};
    if (s.contestant == Contestant::kFaultAll) {
      c["fault_all_gb_per_s"] =
          s.fault_all_ns > 0 ? static_cast<double>(size) / s.fault_all_ns : 0.0;
    }
    contestants.push_back(std::move(c));
  }
  return {{"workload", sim::WorkloadKindName(result.config.kind)},
          {"threads", result.config.threads},
          {"access", sim::AccessModeName(result.config.access)},
          {"accesses", result.accesses},
          {"distinct_pages", result.distinct_pages},
          {"contestants", std::move(contestants)}};
}

// --vms N: N VMs restore at once on one engine (one worker per CPU unless --workers says), each
// config's plan per VM; compared, round by round, with the bound 2 x (N x one VM's floor / CPUs).
int RunManyVmsBench(const BenchArgs& args, const bench::RestoreSnapshot& snapshot,
                    const std::vector<Config>& configs, bench::RestoreOptions options) {
  const unsigned cpus = std::max(1u, std::thread::hardware_concurrency());
  bool failed = false;
  for (const Config& config : configs) {
    auto plan = sim::PlanWorkload({.kind = config.kind,
                                   .access = config.access,
                                   .threads = config.threads,
                                   .seed = args.seed},
                                  snapshot.size());
    if (!plan) {
      std::fprintf(stderr, "bench: %s\n", plan.error().ToString().c_str());
      return 2;
    }
    std::vector<double> totals, medians, floors, over_bound;
    for (unsigned round = 0; round <= args.rounds; ++round) {  // round 0 is the warm-up
      auto floor = bench::RunRestore(Contestant::kFloor, snapshot, *plan, options);
      auto many = bench::RunManyVms(snapshot, *plan, args.vms, options);
      if (!floor || !many) {
        std::fprintf(stderr, "bench: %s\n",
                     (!floor ? floor.error() : many.error()).ToString().c_str());
        return 1;
      }
      if (many->mismatches != 0 || floor->mismatches != 0) failed = true;
      if (round == 0) continue;
      const double bound_ms = Ms(floor->elapsed_ns) * args.vms / cpus;
      totals.push_back(Ms(many->total_ns));
      medians.push_back(Ms(many->median_vm_ns));
      floors.push_back(Ms(floor->elapsed_ns));
      over_bound.push_back(Ms(many->total_ns) / bound_ms);
    }
    std::printf("\n%s, %u VMs at once on %u CPUs (engine workers: %s)\n", config.Label().c_str(),
                args.vms, cpus,
                options.workers == 0 ? "one per CPU" : std::to_string(options.workers).c_str());
    std::printf("  all VMs done: median %.2f ms; one VM's own time, median over VMs: %.2f ms\n",
                Median(totals), Median(medians));
    std::printf(
        "  one VM's floor: %.2f ms; N x floor / CPUs: %.2f ms; all VMs / that: %.2fx "
        "(target <= 2x)\n",
        Median(floors), Median(floors) * args.vms / cpus, Median(over_bound));
  }
  std::printf(failed ? "\nMISMATCH: some VM read wrong bytes.\n" : "\nEvery VM verified.\n");
  return failed ? 1 : 0;
}

int RunBench(const BenchArgs& args) {
  SetLogSink({}, LogLevel::kWarning);  // the handlers' info lines would break up the tables
  auto configs = ParseConfigs(args);
  std::vector<Contestant> contestants;
  for (const std::string& name : args.contestants) {
    auto c = bench::ParseContestant(name);
    if (!c) {
      std::fprintf(stderr, "bench: %s\n", c.error().ToString().c_str());
      return 2;
    }
    contestants.push_back(*c);
  }
  if (!configs) {
    std::fprintf(stderr, "bench: %s\n", configs.error().ToString().c_str());
    return 2;
  }
  TempDir temp;
  std::string path = args.mem_file;
  if (path.empty()) {
    path = temp.File("bench.mem");
    auto made = MakeSnapshot(
        path, {.size_bytes = args.size_mib << 20, .seed = args.seed, .holes = args.holes});
    if (!made) {
      std::fprintf(stderr, "bench: %s\n", made.error().ToString().c_str());
      return 1;
    }
  }
  auto snapshot = bench::RestoreSnapshot::Open(path);
  if (!snapshot) {
    std::fprintf(stderr, "bench: %s\n", snapshot.error().ToString().c_str());
    return 1;
  }
  if (std::any_of(contestants.begin(), contestants.end(), bench::UsesPacked)) {
    const std::optional<Codec> codec = ParseCodec(args.pack_codec);
    auto packed = snapshot->MakePacked(temp.File("bench.gmp"),
                                       {.codec = codec.value_or(Codec::kZstd),
                                        .level = args.pack_level,
                                        .chunk_pages = args.pack_chunk_kib / 4});
    if (!packed) {
      std::fprintf(stderr, "bench: packing: %s\n", packed.error().ToString().c_str());
      return 1;
    }
    if (!args.json) {
      std::printf("packed snapshot: %s %d, %u KiB chunks: %.1f MiB in %.2f s\n",
                  args.pack_codec.c_str(), args.pack_level, args.pack_chunk_kib,
                  static_cast<double>(packed->file_bytes) / (1 << 20), packed->seconds);
    }
  }
  const double memcpy_bw = bench::MeasureMemcpyBandwidth(*snapshot);
  bench::RestoreOptions options{.fault_around_bytes = args.fault_around_kib * 1024,
                                .adaptive_windows = !args.fixed_windows,
                                .workers = args.workers,
                                .cold = args.cold};
  std::unique_ptr<BenchMetrics> metrics;
  if (!args.metrics.empty()) {
    auto started = BenchMetrics::Start(args.metrics);
    if (!started) {
      std::fprintf(stderr, "bench: %s\n", started.error().ToString().c_str());
      return 2;
    }
    metrics = std::move(*started);
    metrics->Observe(options, path);
    std::fprintf(stderr, "bench: metrics at http://%s/metrics\n",
                 metrics->address().ToString().c_str());
  }
  if (args.vms > 0) {
    bench::RestoreOptions many = options;
    if (args.workers_given == 0) many.workers = 0;
    return RunManyVmsBench(args, *snapshot, *configs, many);
  }
  if (!args.json) {
    std::printf("gmem bench: %s (%llu MiB), %u rounds after a warm-up, contestants alternating%s\n",
                path.c_str(), static_cast<unsigned long long>(snapshot->size() >> 20), args.rounds,
                args.cold ? ", page cache cold before each run" : "");
    std::printf("single-thread memcpy of the snapshot: %.2f GB/s\n", memcpy_bw / 1e9);
    std::printf("speed-ups are medians over rounds of (other's time / contestant's time)\n");
    std::fflush(stdout);
  }

  std::vector<ConfigResult> results;
  bool failed = false;
  Progress progress("bench", "runs", configs->size() * (args.rounds + 1) * contestants.size(),
                    args.json);
  uint64_t runs_done = 0;
  // --report: the first configuration's first measured round, one trace per guestmem contestant.
  std::vector<report::ReportColumn> report_columns;
  for (const Config& config : *configs) {
    auto plan = sim::PlanWorkload({.kind = config.kind,
                                   .access = config.access,
                                   .threads = config.threads,
                                   .seed = args.seed},
                                  snapshot->size());
    if (!plan) {
      std::fprintf(stderr, "bench: %s\n", plan.error().ToString().c_str());
      return 2;
    }
    ConfigResult result{
        .config = config, .accesses = plan->accesses(), .distinct_pages = plan->distinct_pages()};
    for (unsigned round = 0; round <= args.rounds; ++round) {  // round 0 is the warm-up
      for (size_t i = 0; i < contestants.size(); ++i) {
        const Contestant c = contestants[(i + round) % contestants.size()];
        progress.Update(runs_done++, config.Label() + ": " + std::string(bench::ContestantName(c)));
        bench::RestoreOptions run_options = options;
        const bool traced = !args.report.empty() && results.empty() && round == 1 && IsGuestmem(c);
        if (traced) {
          run_options.trace_path = temp.File(std::string(bench::ContestantName(c)) + ".gmtrace");
        }
        auto run = bench::RunRestore(c, *snapshot, *plan, run_options);
        if (run && traced) {
          auto trace = ReadRestoreTrace(run_options.trace_path);
          if (!trace) {
            std::fprintf(stderr, "bench: --report: %s\n", trace.error().ToString().c_str());
            return 1;
          }
          report_columns.push_back({std::string(bench::ContestantTitle(c)), std::move(*trace)});
        }
        if (!run) {
          std::fprintf(stderr, "bench: %s, %s: %s\n", config.Label().c_str(),
                       std::string(bench::ContestantName(c)).c_str(),
                       run.error().ToString().c_str());
          return 1;
        }
        if (run->mismatches != 0) {
          std::fprintf(stderr, "bench: %s, %s: %llu of %llu pages differ from the snapshot\n",
                       config.Label().c_str(), std::string(bench::ContestantName(c)).c_str(),
                       static_cast<unsigned long long>(run->mismatches),
                       static_cast<unsigned long long>(run->pages_verified));
          failed = true;
        }
        if (round > 0) result.series[c].runs.push_back(*run);
      }
    }
    progress.Clear();
    if (!args.json) {
      PrintConfig(result, memcpy_bw, snapshot->size());
      std::fflush(stdout);
    }
    if (results.empty() && !args.report.empty()) {
      // In the order the contestants were given, not the order of the first round's turns.
      std::stable_sort(report_columns.begin(), report_columns.end(),
                       [&](const report::ReportColumn& a, const report::ReportColumn& b) {
                         auto rank = [&](const std::string& title) {
                           for (size_t k = 0; k < contestants.size(); ++k) {
                             if (bench::ContestantTitle(contestants[k]) == title) return k;
                           }
                           return contestants.size();
                         };
                         return rank(a.title) < rank(b.title);
                       });
      std::ofstream page(args.report, std::ios::binary | std::ios::trunc);
      page << report::RenderRestoreReport(
          "gmem bench: " + config.Label() + ", " + std::to_string(snapshot->size() >> 20) + " MiB",
          report_columns);
      page.close();
      if (!page) {
        std::fprintf(stderr, "bench: --report: cannot write %s\n", args.report.c_str());
        return 1;
      }
      if (!args.json) std::printf("  report of its first round: %s\n", args.report.c_str());
    }
    results.push_back(std::move(result));
  }
  if (args.json) {
    nlohmann::json j = {
        {"memory_file", path},        {"size_bytes", snapshot->size()},
        {"rounds", args.rounds},      {"fault_around_bytes", options.fault_around_bytes},
        {"workers", options.workers}, {"memcpy_gb_per_s", memcpy_bw / 1e9},
        {"cold", args.cold}};
    nlohmann::json configs_json = nlohmann::json::array();
    for (const ConfigResult& r : results) configs_json.push_back(ToJson(r, snapshot->size()));
    j["configs"] = configs_json;
    std::printf("%s\n", j.dump(2).c_str());
  } else {
    std::printf("\n%s\n", failed ? "Some runs FAILED verification." : "Every run verified.");
  }
  return failed ? 1 : 0;
}

}  // namespace

void RegisterBenchCommand(CLI::App& app) {
  auto args = std::make_shared<BenchArgs>();
  CLI::App* cmd = app.add_subcommand(
      "bench", "Restore strategies side by side: File backend, per-page handler, guestmem");
  cmd->add_option("--mem-file", args->mem_file,
                  "Snapshot memory file (default: a demo snapshot of --size-mib in a temp dir)")
      ->check(CLI::ExistingFile);
  cmd->add_option("--size-mib", args->size_mib, "Size of the demo snapshot")
      ->check(CLI::Range(16, 65536))
      ->capture_default_str();
  cmd->add_option("--rounds", args->rounds, "Measured rounds after the warm-up")
      ->check(CLI::Range(1, 1000))
      ->capture_default_str();
  cmd->add_option("--workloads", args->workloads, "sparse, sequential, random")
      ->check(CLI::IsMember({"sparse", "sequential", "random"}))
      ->delimiter(',')
      ->capture_default_str();
  cmd->add_option("--threads", args->threads, "Guest threads touching memory")
      ->check(CLI::Range(1, 64))
      ->delimiter(',')
      ->capture_default_str();
  cmd->add_option("--access", args->access, "read, write (every access a write)")
      ->check(CLI::IsMember({"read", "write"}))
      ->delimiter(',')
      ->capture_default_str();
  cmd->add_option("--contestants", args->contestants,
                  "file, per-page, on-demand, fault-all, minor-trap, floor")
      ->check(CLI::IsMember(AllContestantNames()))
      ->delimiter(',')
      ->capture_default_str();
  cmd->add_option("--pack-codec", args->pack_codec, "Codec of the packed contestants' snapshot")
      ->check(CLI::IsMember({"zstd", "lz4", "none"}))
      ->capture_default_str();
  cmd->add_option("--pack-level", args->pack_level, "Its compression level")
      ->check(CLI::Range(1, 19))
      ->capture_default_str();
  cmd->add_option("--pack-chunk-kib", args->pack_chunk_kib, "Its chunk size in KiB")
      ->check(CLI::IsMember({"64", "128", "256", "512", "1024", "2048", "4096"}))
      ->capture_default_str();
  cmd->add_flag("--fixed-windows", args->fixed_windows,
                "Every fault brings its aligned --fault-around-kib window (default: windows that "
                "follow the guest)");
  cmd->add_option("--fault-around-kib", args->fault_around_kib,
                  "guestmem's window installed around each fault, KiB")
      ->capture_default_str();
  cmd->add_option("--workers", args->workers,
                  "guestmem fault engine threads (with --vms: default one per CPU)")
      ->check(CLI::Range(1, 64))
      ->capture_default_str()
      ->each([args](const std::string&) { args->workers_given = 1; });
  cmd->add_option("--vms", args->vms,
                  "Restore N VMs at once on one engine and compare with N x one VM's floor / "
                  "CPUs, instead of the contestants' tables")
      ->check(CLI::Range(1, 1024));
  cmd->add_option("--seed", args->seed, "Seed of the snapshot and the workloads")
      ->capture_default_str();
  cmd->add_flag("--holes", args->holes,
                "The demo snapshot's zero pages as sparse holes (default: written as zeros)");
  cmd->add_flag("--cold", args->cold,
                "Drop the memory file from the page cache before every run (it must be on a disk)");
  cmd->add_flag("--json", args->json, "Print one JSON object instead of tables");
  cmd->add_option("--report", args->report,
                  "Write an HTML page drawing guestmem's contestants side by side (the first "
                  "workload's first measured round, from their restore traces)");
  cmd->add_option("--metrics", args->metrics,
                  "Serve the runs' Prometheus metrics over HTTP at IP:PORT while benchmarking, "
                  "as gmem serve --metrics does");
  cmd->callback([args] { CommandExitCode() = RunBench(*args); });
}

}  // namespace guestmem::cli
