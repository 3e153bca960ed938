#include "serve/serve_metrics.h"

#include <sys/resource.h>
#include <unistd.h>

#include <cstdio>
#include <fstream>
#include <sstream>
#include <utility>

#include "base/open_fds.h"

namespace guestmem::cli {
namespace {

using Clock = std::chrono::steady_clock;

// The counters of FaultStats as metric families: "<prefix><name>" with an optional label that
// splits it (kind="missing", ...). One table for both formats and for VMs and totals alike.
struct CounterFamily {
  const char* name;
  const char* help;
  const char* label;  // nullptr: one series
  std::vector<std::pair<const char*, uint64_t FaultStats::*>> series;
};

const std::vector<CounterFamily>& CounterFamilies() {
  static const std::vector<CounterFamily> families = {
      {"faults_total",
       "Fault events read, by kind (guest: a vCPU fault forwarded by a secret-hiding VMM)",
       "kind",
       {{"missing", &FaultStats::faults_missing},
        {"minor", &FaultStats::faults_minor},
        {"write_protect", &FaultStats::faults_write_protect},
        {"guest", &FaultStats::faults_guest}}},
      {"stray_faults_total",
       "Faults outside the VM's declared regions (poisoned or woken)",
       nullptr,
       {{"", &FaultStats::faults_stray}}},
      {"events_total",
       "Non-fault userfaultfd events read, by kind",
       "kind",
       {{"remove", &FaultStats::events_remove},
        {"unmap", &FaultStats::events_unmap},
        {"remap", &FaultStats::events_remap},
        {"fork", &FaultStats::events_fork}}},
      {"pages_installed_total",
       "4 KiB pages installed, by way (copy: UFFDIO_COPY, zero: zero page, continue: "
       "UFFDIO_CONTINUE after writing the guest memory file, populate: written into the file "
       "for KVM)",
       "way",
       {{"copy", &FaultStats::pages_copied},
        {"zero", &FaultStats::pages_zeroed},
        {"continue", &FaultStats::pages_continued},
        {"populate", &FaultStats::pages_populated}}},
      {"pages_prefetched_total",
       "4 KiB pages of the learned working set installed ahead of faults",
       nullptr,
       {{"", &FaultStats::pages_prefetched}}},
      {"pages_filled_total",
       "4 KiB pages installed by fault-all's background fill",
       nullptr,
       {{"", &FaultStats::pages_filled}}},
      {"prefetch_hits_total",
       "Faults on a page the prefetch had already installed",
       nullptr,
       {{"", &FaultStats::prefetch_hits}}},
      {"prefetch_misses_total",
       "Faults that installed their page themselves while a working set was prefetched",
       nullptr,
       {{"", &FaultStats::prefetch_misses}}},
      {"source_read_bytes_total",
       "Bytes read from the snapshot's memory file",
       nullptr,
       {{"", &FaultStats::bytes_read}}},
      {"eagain_retries_total",
       "Installs retried after EAGAIN (a non-fault event was pending)",
       nullptr,
       {{"", &FaultStats::eagain_retries}}},
      {"content_waits_total",
       "Installs that waited for the source to bring content in (a packed chunk being decoded)",
       nullptr,
       {{"", &FaultStats::content_waits}}},
      {"poisoned_pages_total",
       "4 KiB pages poisoned because the source could not supply them",
       nullptr,
       {{"", &FaultStats::pages_poisoned}}},
  };
  return families;
}

struct HistogramFamily {
  const char* name;
  const char* help;
  LatencyBuckets FaultStats::*buckets;
};

const std::vector<HistogramFamily>& HistogramFamilies() {
  static const std::vector<HistogramFamily> families = {
      {"fault_queue_seconds", "Time a uffd fault waited from being read to its service",
       &FaultStats::queue_latency},
      {"fault_fetch_seconds", "Time a uffd fault's service spent reading content from the source",
       &FaultStats::fetch_latency},
      {"fault_install_seconds",
       "Time a uffd fault's service spent installing pages (the kernel's ioctls)",
       &FaultStats::install_latency},
  };
  return families;
}

std::string Number(double value) {
  char text[32];
  (void)std::snprintf(text, sizeof(text), "%.9g", value);
  return text;
}

std::string EscapeLabel(const std::string& value) {
  std::string out;
  out.reserve(value.size());
  for (const char c : value) {
    if (c == '\\') {
      out += "\\\\";
    } else if (c == '"') {
      out += "\\\"";
    } else if (c == '\n') {
      out += "\\n";
    } else {
      out += c;
    }
  }
  return out;
}

// Writes families one at a time: HELP and TYPE, then every series of it.
class Exposition {
 public:
  void Family(const std::string& name, const std::string& help, const char* type) {
    out_ += "# HELP " + name + " " + help + "\n# TYPE " + name + " " + type + "\n";
  }
  // `labels`: `a="x",b="y"` or empty.
  void Sample(const std::string& name, const std::string& labels, const std::string& value) {
    out_ += name;
    if (!labels.empty()) out_ += "{" + labels + "}";
    out_ += " " + value + "\n";
  }
  std::string Take() { return std::move(out_); }

 private:
  std::string out_;
};

std::string Join(const std::string& a, const std::string& b) {
  if (a.empty()) return b;
  if (b.empty()) return a;
  return a + "," + b;
}

std::string VmLabelText(const VmLabels& l) {
  return "vm=\"" + std::to_string(l.vm) + "\",pid=\"" + std::to_string(l.pid) + "\",snapshot=\"" +
         EscapeLabel(l.snapshot) + "\"";
}

// Every FaultStats family under `prefix`: once for `total` (no VM labels) when it is set, once
// for each VM of `vms`.
void WriteStatsFamilies(Exposition& e, const std::string& prefix, const std::string& scope,
                        const std::vector<std::pair<std::string, const FaultStats*>>& sets) {
  for (const CounterFamily& f : CounterFamilies()) {
    const std::string name = prefix + f.name;
    e.Family(name, std::string(f.help) + scope, "counter");
    for (const auto& [labels, stats] : sets) {
      for (const auto& [value, member] : f.series) {
        const std::string split =
            f.label == nullptr ? "" : std::string(f.label) + "=\"" + value + "\"";
        e.Sample(name, Join(labels, split), std::to_string(stats->*member));
      }
    }
  }
  for (const HistogramFamily& f : HistogramFamilies()) {
    const std::string name = prefix + f.name;
    e.Family(name, std::string(f.help) + scope, "histogram");
    for (const auto& [labels, stats] : sets) {
      const LatencyBuckets& b = stats->*f.buckets;
      for (size_t i = 0; i < b.cumulative.size(); ++i) {
        e.Sample(name + "_bucket",
                 Join(labels, "le=\"" + Number(LatencyBuckets::kBoundsNs[i] / 1e9) + "\""),
                 std::to_string(b.cumulative[i]));
      }
      e.Sample(name + "_bucket", Join(labels, "le=\"+Inf\""), std::to_string(b.count));
      e.Sample(name + "_sum", labels, Number(static_cast<double>(b.sum_ns) / 1e9));
      e.Sample(name + "_count", labels, std::to_string(b.count));
    }
  }
}

// The process' own metrics, named as Prometheus' client libraries name them.
void WriteProcessMetrics(Exposition& e) {
  std::ifstream stat_file("/proc/self/stat");
  std::string stat((std::istreambuf_iterator<char>(stat_file)), std::istreambuf_iterator<char>());
  // Fields after the command name (which may hold spaces), from field 3 on.
  const size_t paren = stat.rfind(')');
  if (paren == std::string::npos) return;
  std::istringstream fields(stat.substr(paren + 2));
  std::vector<std::string> f;
  for (std::string field; fields >> field;) f.push_back(field);
  if (f.size() < 22) return;
  // f[0] is field 3 (state): utime is field 14, stime 15, num_threads 20, starttime 22,
  // vsize 23, rss 24.
  const double ticks = static_cast<double>(sysconf(_SC_CLK_TCK));
  const double cpu = (std::stod(f[11]) + std::stod(f[12])) / ticks;
  double boot_time = 0;
  std::ifstream proc_stat("/proc/stat");
  for (std::string line; std::getline(proc_stat, line);) {
    if (line.rfind("btime ", 0) == 0) boot_time = std::stod(line.substr(6));
  }
  const double page = static_cast<double>(sysconf(_SC_PAGESIZE));
  e.Family("process_cpu_seconds_total", "User and system CPU time spent, seconds", "counter");
  e.Sample("process_cpu_seconds_total", "", Number(cpu));
  e.Family("process_resident_memory_bytes", "Resident memory size, bytes", "gauge");
  e.Sample("process_resident_memory_bytes", "", Number(std::stod(f[21]) * page));
  e.Family("process_virtual_memory_bytes", "Virtual memory size, bytes", "gauge");
  e.Sample("process_virtual_memory_bytes", "", f[20]);
  e.Family("process_start_time_seconds", "Start time of the process since the Unix epoch", "gauge");
  char start[32];
  (void)std::snprintf(start, sizeof(start), "%.2f", boot_time + std::stod(f[19]) / ticks);
  e.Sample("process_start_time_seconds", "", start);
  e.Family("process_threads", "Threads of the process", "gauge");
  e.Sample("process_threads", "", f[17]);
  if (const int open = CountOpenFds(); open > 0) {
    e.Family("process_open_fds", "Open file descriptors", "gauge");
    e.Sample("process_open_fds", "", std::to_string(open - 1));  // not the one that counted
  }
  rlimit limit{};
  if (getrlimit(RLIMIT_NOFILE, &limit) == 0) {
    e.Family("process_max_fds", "Maximum number of open file descriptors", "gauge");
    e.Sample("process_max_fds", "", std::to_string(limit.rlim_cur));
  }
}

bool AllZero(const FaultStats& s) {
  return s.faults() == 0 && s.pages_installed() == 0 && s.bytes_read == 0 &&
         s.pages_poisoned == 0 && s.faults_stray == 0 && s.queue_latency.count == 0;
}

// One counter or gauge of a single sample.
void WriteOne(Exposition& e, const std::string& name, const std::string& help, const char* type,
              uint64_t value) {
  e.Family(name, help, type);
  e.Sample(name, "", std::to_string(value));
}

void WriteStoreFamilies(Exposition& e, const StoreView& store) {
  const ObjectStore::Counters& r = store.requests;
  WriteOne(e, "gmem_object_store_requests_total",
           "Requests sent to the object store, retries included", "counter", r.requests);
  WriteOne(e, "gmem_object_store_retries_total", "Requests to the object store that were retries",
           "counter", r.retries);
  WriteOne(e, "gmem_object_store_failures_total",
           "Requests to the object store that failed after every attempt", "counter", r.failures);
  WriteOne(e, "gmem_object_store_received_bytes_total", "Object content received", "counter",
           r.bytes_received);
  if (!store.disk_cache) return;
  const DiskChunkCache::Counters& d = *store.disk_cache;
  WriteOne(e, "gmem_chunk_disk_cache_hits_total", "Chunks found in the disk cache", "counter",
           d.hits);
  WriteOne(e, "gmem_chunk_disk_cache_misses_total",
           "Chunks looked for in the disk cache and fetched", "counter", d.misses);
  WriteOne(e, "gmem_chunk_disk_cache_evictions_total",
           "Chunks dropped from the disk cache to keep within its bound", "counter", d.evicted);
  WriteOne(e, "gmem_chunk_disk_cache_corrupt_total",
           "Disk cache entries found torn or corrupt and dropped", "counter", d.forgotten);
  WriteOne(e, "gmem_chunk_disk_cache_entries", "Chunks in the disk cache", "gauge", d.entries);
  WriteOne(e, "gmem_chunk_disk_cache_bytes", "Bytes of the disk cache's entries", "gauge", d.bytes);
}

nlohmann::json StoreJson(const StoreView& store) {
  nlohmann::json out = {{"requests", store.requests.requests},
                        {"retries", store.requests.retries},
                        {"failures", store.requests.failures},
                        {"bytes_received", store.requests.bytes_received}};
  if (store.disk_cache) {
    const DiskChunkCache::Counters& d = *store.disk_cache;
    out["disk_cache"] = {{"hits", d.hits},         {"misses", d.misses},   {"evicted", d.evicted},
                         {"corrupt", d.forgotten}, {"entries", d.entries}, {"bytes", d.bytes}};
  }
  return out;
}

}  // namespace

const char* RejectReasonName(RejectReason reason) {
  switch (reason) {
    case RejectReason::kDenied:
      return "denied";
    case RejectReason::kPendingLimit:
      return "pending_limit";
    case RejectReason::kVmLimit:
      return "vm_limit";
    case RejectReason::kTimeout:
      return "timeout";
    case RejectReason::kMalformed:
      return "malformed";
    case RejectReason::kInvalid:
      return "invalid";
    case RejectReason::kShed:
      return "out_of_descriptors";
    case RejectReason::kError:
      return "error";
  }
  return "error";
}

ServeMetrics::ServeMetrics(StatsFn stats_of, StoreFn store_of)
    : stats_of_(std::move(stats_of)), store_of_(std::move(store_of)) {}

void ServeMetrics::VmStarted(SpaceId space, VmLabels labels) {
  std::lock_guard lock(mu_);
  const uint64_t vm = labels.vm;
  live_[vm] = Live{space, std::move(labels), Clock::now(), FaultStats{}};
}

void ServeMetrics::VmFinished(uint64_t vm, const FaultStats& final) {
  std::lock_guard lock(mu_);
  auto it = live_.find(vm);
  if (it == live_.end()) return;
  ended_ += AllZero(final) ? it->second.last : final;
  ++vms_finished_;
  live_.erase(it);
}

void ServeMetrics::HandshakeRejected(RejectReason reason) {
  std::lock_guard lock(mu_);
  ++rejected_[static_cast<size_t>(reason)];
}

ServeMetrics::Snapshot ServeMetrics::Collect() const {
  Snapshot out;
  std::lock_guard lock(mu_);
  const auto now = Clock::now();
  out.ended = ended_;
  out.total = ended_;
  out.vms_finished = vms_finished_;
  out.rejected = rejected_;
  if (store_of_) out.store = store_of_();
  out.vms.reserve(live_.size());
  for (auto& [vm, live] : live_) {
    // A space that has just gone (its VM about to be finished) keeps what was read of it last.
    if (std::optional<FaultStats> stats = stats_of_(live.space)) live.last = *stats;
    out.total += live.last;
    out.vms.push_back(
        VmView{live.labels, std::chrono::duration<double>(now - live.started).count(), live.last});
  }
  return out;
}

std::string FormatPrometheus(const ServeMetrics::Snapshot& s) {
  Exposition e;
  e.Family("gmem_vms_connected", "VMs being served", "gauge");
  e.Sample("gmem_vms_connected", "", std::to_string(s.vms.size()));
  e.Family("gmem_vms_finished_total", "VMs served that have ended", "counter");
  e.Sample("gmem_vms_finished_total", "", std::to_string(s.vms_finished));
  e.Family("gmem_handshakes_rejected_total",
           "Connections that did not become a served VM, by "
           "reason",
           "counter");
  for (size_t i = 0; i < kRejectReasons; ++i) {
    e.Sample("gmem_handshakes_rejected_total",
             std::string("reason=\"") + RejectReasonName(static_cast<RejectReason>(i)) + "\"",
             std::to_string(s.rejected[i]));
  }
  WriteStatsFamilies(e, "gmem_", " (every VM this daemon served)", {{"", &s.total}});
  if (s.store) WriteStoreFamilies(e, *s.store);
  std::vector<std::pair<std::string, const FaultStats*>> vms;
  for (const ServeMetrics::VmView& v : s.vms) vms.emplace_back(VmLabelText(v.labels), &v.stats);
  e.Family("gmem_vm_connected_seconds", "How long the VM has been served", "gauge");
  for (const ServeMetrics::VmView& v : s.vms) {
    e.Sample("gmem_vm_connected_seconds", VmLabelText(v.labels), Number(v.connected_seconds));
  }
  WriteStatsFamilies(e, "gmem_vm_", " (one VM being served)", vms);
  WriteProcessMetrics(e);
  return e.Take();
}

nlohmann::json StatsJson(const FaultStats& stats) {
  nlohmann::json out = nlohmann::json::object();
  auto key = [](const char* name) {
    std::string k = name;
    const std::string suffix = "_total";
    if (k.size() > suffix.size() && k.ends_with(suffix)) k.resize(k.size() - suffix.size());
    return k;
  };
  for (const CounterFamily& f : CounterFamilies()) {
    if (f.label == nullptr) {
      out[key(f.name)] = stats.*(f.series.front().second);
      continue;
    }
    nlohmann::json split = nlohmann::json::object();
    for (const auto& [value, member] : f.series) split[value] = stats.*member;
    out[key(f.name)] = std::move(split);
  }
  for (const HistogramFamily& f : HistogramFamilies()) {
    const LatencyBuckets& b = stats.*f.buckets;
    out[f.name] = {{"count", b.count}, {"sum", static_cast<double>(b.sum_ns) / 1e9}};
  }
  out["latency_seconds"] = {{"p50", static_cast<double>(stats.latency_p50_ns) / 1e9},
                            {"p99", static_cast<double>(stats.latency_p99_ns) / 1e9},
                            {"max", static_cast<double>(stats.latency_max_ns) / 1e9}};
  return out;
}

nlohmann::json StatusJson(const ServeMetrics::Snapshot& s) {
  nlohmann::json rejected = nlohmann::json::object();
  for (size_t i = 0; i < kRejectReasons; ++i) {
    rejected[RejectReasonName(static_cast<RejectReason>(i))] = s.rejected[i];
  }
  nlohmann::json vms = nlohmann::json::array();
  for (const ServeMetrics::VmView& v : s.vms) {
    vms.push_back({{"vm", v.labels.vm},
                   {"pid", v.labels.pid},
                   {"snapshot", v.labels.snapshot},
                   {"connected_seconds", v.connected_seconds},
                   {"stats", StatsJson(v.stats)}});
  }
  nlohmann::json out = {{"pid", getpid()},
                        {"vms_connected", s.vms.size()},
                        {"vms_finished", s.vms_finished},
                        {"handshakes_rejected", std::move(rejected)},
                        {"total", StatsJson(s.total)},
                        {"vms", std::move(vms)}};
  if (s.store) out["object_store"] = StoreJson(*s.store);
  return out;
}

}  // namespace guestmem::cli
