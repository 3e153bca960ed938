// ServeMetrics: what `gmem serve` tells its monitoring — the VMs it serves and what their fault
// pipelines did, the VMs that ended, and the handshakes it rejected.
//
// The counters themselves live in each VM's fault pipeline (FaultHandler::stats(): relaxed
// atomics written by the VM's worker); this registry only knows which VMs are live and under what
// labels, keeps the sum of the VMs that ended, and reads the live ones when asked. Totals never go
// down: a VM's final statistics replace the last ones read of it, and statistics lost with a VM
// (dropped for want of memory) leave the last ones read.
//
// Formats: Prometheus' text exposition (FormatPrometheus, with the process' own metrics) and the
// JSON of `gmem status` (StatusJson).
//
// Thread safety: every method from any thread (one mutex; Collect() calls the stats function
// under it, which must not call back into the registry).
#ifndef GUESTMEM_TOOLS_GMEM_SERVE_SERVE_METRICS_H_
#define GUESTMEM_TOOLS_GMEM_SERVE_SERVE_METRICS_H_

#include <sys/types.h>

#include <array>
#include <chrono>
#include <cstdint>
#include <functional>
#include <map>
#include <mutex>
#include <nlohmann/json.hpp>
#include <optional>
#include <string>
#include <vector>

#include "guestmem/disk_chunk_cache.h"
#include "guestmem/fault_engine.h"
#include "guestmem/fault_stats.h"
#include "guestmem/object_store.h"

namespace guestmem::cli {

// Why a connection did not become a served VM (the `reason` label).
enum class RejectReason {
  kDenied,        // its peer is not allowed (--allow-uid/--allow-gid)
  kPendingLimit,  // too many connections waiting for their handshake
  kVmLimit,       // too many VMs served (--max-active-vms)
  kTimeout,       // no complete handshake by its deadline
  kMalformed,     // the handshake did not parse
  kInvalid,       // it parsed but does not fit the snapshot (regions, descriptors)
  kError,         // the daemon failed to serve it (memory, descriptors, the kernel)
  kShed,          // closed unread from the backlog: the daemon was out of descriptors
};
inline constexpr size_t kRejectReasons = 8;
const char* RejectReasonName(RejectReason reason);

// The labels of a VM's series.
struct VmLabels {
  uint64_t vm = 0;
  pid_t pid = 0;  // 0: unknown
  std::string snapshot;
};

// What the object store behind a snapshot named by a URL has done, and the disk cache of its
// chunks (remote_pack_storage.h).
struct StoreView {
  ObjectStore::Counters requests;
  std::optional<DiskChunkCache::Counters> disk_cache;
};

class ServeMetrics {
 public:
  // `stats_of`: a live space's statistics, or std::nullopt once it is gone.
  using StatsFn = std::function<std::optional<FaultStats>(SpaceId)>;
  // `store_of`: the object store's figures, or std::nullopt when no snapshot comes from one.
  using StoreFn = std::function<std::optional<StoreView>()>;
  explicit ServeMetrics(StatsFn stats_of, StoreFn store_of = {});

  void VmStarted(SpaceId space, VmLabels labels);
  // `final`: its last statistics (all zero when they were lost: the last read are kept).
  void VmFinished(uint64_t vm, const FaultStats& final);
  void HandshakeRejected(RejectReason reason);

  struct VmView {
    VmLabels labels;
    double connected_seconds = 0;
    FaultStats stats;
  };
  struct Snapshot {
    std::vector<VmView> vms;  // live, by VM number
    FaultStats ended;         // the sum of every VM that ended
    FaultStats total;         // ended + live
    uint64_t vms_finished = 0;
    std::array<uint64_t, kRejectReasons> rejected{};
    std::optional<StoreView> store;
  };
  Snapshot Collect() const;

 private:
  struct Live {
    SpaceId space = 0;
    VmLabels labels;
    std::chrono::steady_clock::time_point started;
    FaultStats last;  // what Collect() read last
  };
  StatsFn stats_of_;
  StoreFn store_of_;
  mutable std::mutex mu_;
  mutable std::map<uint64_t, Live> live_;            // GUARDED_BY(mu_)
  FaultStats ended_;                                 // GUARDED_BY(mu_)
  uint64_t vms_finished_ = 0;                        // GUARDED_BY(mu_)
  std::array<uint64_t, kRejectReasons> rejected_{};  // GUARDED_BY(mu_)
};

// The Prometheus text exposition (version 0.0.4) of `snapshot`, then the process' metrics.
std::string FormatPrometheus(const ServeMetrics::Snapshot& snapshot);

// `gmem status`'s document: {"vms_connected", "vms_finished", "handshakes_rejected": {reason: n},
// "total": stats, "vms": [{"vm", "pid", "snapshot", "connected_seconds", "stats"}]}.
nlohmann::json StatusJson(const ServeMetrics::Snapshot& snapshot);
nlohmann::json StatsJson(const FaultStats& stats);

}  // namespace guestmem::cli

#endif  // GUESTMEM_TOOLS_GMEM_SERVE_SERVE_METRICS_H_
