// Every contestant restores a real snapshot under real workloads and the result is verified page
// by page; the counters say what each one did.
#include "bench/restore_bench.h"

#include <fcntl.h>
#include <gtest/gtest.h>
#include <sys/mman.h>

#include <algorithm>
#include <fstream>
#include <optional>
#include <string>

#include "base/temp_dir.h"
#include "snapshot_maker.h"

namespace guestmem::bench {
namespace {

constexpr uint64_t kSize = 16 << 20;

class RestoreBenchTest : public ::testing::TestWithParam<Contestant> {
 protected:
  void SetUp() override {
    const std::string path = dir_.File("bench.mem");
    ASSERT_TRUE(cli::MakeSnapshot(path, {.size_bytes = kSize, .seed = 7}));
    auto snapshot = RestoreSnapshot::Open(path);
    ASSERT_TRUE(snapshot.has_value()) << snapshot.error().ToString();
    snapshot_.emplace(std::move(*snapshot));
    if (UsesPacked(GetParam())) {
      auto packed = snapshot_->MakePacked(dir_.File("bench.gmp"), {.chunk_pages = 16});
      ASSERT_TRUE(packed.has_value()) << packed.error().ToString();
    }
  }

  sim::WorkloadPlan Plan(sim::WorkloadKind kind, sim::AccessMode access, unsigned threads) {
    auto plan =
        sim::PlanWorkload({.kind = kind, .access = access, .threads = threads, .seed = 3}, kSize);
    EXPECT_TRUE(plan.has_value()) << plan.error().ToString();
    return plan.value_or(sim::WorkloadPlan{});
  }

  TempDir dir_;
  std::optional<RestoreSnapshot> snapshot_;
};

TEST_P(RestoreBenchTest, SequentialReadsRestoreEveryPage) {
  const auto plan = Plan(sim::WorkloadKind::kSequential, sim::AccessMode::kRead, 2);
  auto run = RunRestore(GetParam(), *snapshot_, plan);
  ASSERT_TRUE(run.has_value()) << run.error().ToString();
  EXPECT_EQ(run->pages_verified, kSize / kPageSize4K);
  EXPECT_EQ(run->mismatches, 0u);
  EXPECT_GT(run->elapsed_ns, 0u);
  // The floor takes no fault; the learned restore may take none either, when its prefetch gets
  // ahead of the guest (a slow guest, a sanitizer build): how many it takes depends on speed.
  if (GetParam() != Contestant::kFloor && GetParam() != Contestant::kLearned &&
      GetParam() != Contestant::kPackedLearned) {
    EXPECT_GT(run->faults, 0u);
  }
  switch (GetParam()) {
    case Contestant::kFileBackend:
      EXPECT_EQ(run->pages_installed, 0u);  // the kernel pages in, nobody installs
      break;
    case Contestant::kPerPage:
      // One fault, one 4 KiB copy: every page of memory.
      EXPECT_EQ(run->pages_installed, kSize / kPageSize4K);
      EXPECT_GE(run->faults, kSize / kPageSize4K);
      break;
    case Contestant::kPacked:
    case Contestant::kPackedShared:
      // A fault that waits for its chunk to be decoded lets the other thread's stream run on
      // meanwhile, so how far windows grow depends on the decoder's speed: still far fewer
      // faults than pages.
      EXPECT_EQ(run->pages_installed, kSize / kPageSize4K);
      EXPECT_LE(run->faults, kSize / kPageSize4K / 4);
      break;
    case Contestant::kOnDemand:
    case Contestant::kMinorTrap:
      // Windows that grow along each thread's scan: far fewer faults than pages.
      EXPECT_EQ(run->pages_installed, kSize / kPageSize4K);
      EXPECT_LE(run->faults, kSize / kDefaultFaultAroundBytes + 8);
      EXPECT_GT(run->latency_p50_ns, 0u);
      break;
    case Contestant::kLearned:
    case Contestant::kPackedLearned:
      // Every page once, by the prefetch or by a fault: which of the two gets a page first
      // depends on the guest's speed against the prefetch's, so only the sum is checked.
      EXPECT_EQ(run->pages_installed, kSize / kPageSize4K);
      EXPECT_LE(run->pages_prefetched, run->pages_installed);
      break;
    case Contestant::kFaultAll:
      EXPECT_EQ(run->pages_installed, kSize / kPageSize4K);
      EXPECT_GT(run->fault_all_ns, 0u);
      break;
    case Contestant::kFloor:
      // Everything touched installed before the workload ran: not one fault.
      EXPECT_EQ(run->pages_installed, kSize / kPageSize4K);
      EXPECT_EQ(run->faults, 0u);
      break;
  }
}

TEST_P(RestoreBenchTest, SparseWritesAreReadBackOverTheSnapshot) {
  const auto plan = Plan(sim::WorkloadKind::kSparse, sim::AccessMode::kWrite, 2);
  auto run = RunRestore(GetParam(), *snapshot_, plan);
  ASSERT_TRUE(run.has_value()) << run.error().ToString();
  EXPECT_EQ(run->pages_verified, plan.distinct_pages());
  EXPECT_EQ(run->mismatches, 0u);
  if (GetParam() == Contestant::kPerPage) {
    EXPECT_EQ(run->pages_installed, plan.distinct_pages());
  }
}

TEST_P(RestoreBenchTest, RandomReadsWithOnePagePerFault) {
  const auto plan = Plan(sim::WorkloadKind::kRandom, sim::AccessMode::kRead, 1);
  auto run = RunRestore(GetParam(), *snapshot_, plan,
                        {.fault_around_bytes = kPageSize4K, .adaptive_windows = false});
  ASSERT_TRUE(run.has_value()) << run.error().ToString();
  EXPECT_EQ(run->pages_verified, plan.distinct_pages());
  EXPECT_EQ(run->mismatches, 0u);
  if (GetParam() == Contestant::kOnDemand || GetParam() == Contestant::kMinorTrap) {
    EXPECT_EQ(run->pages_installed, plan.distinct_pages());  // nothing around the faults
  }
}

TEST_P(RestoreBenchTest, ColdRunsReadTheMemoryFileFromTheDisk) {
  // The page cache holds the file (Open read it through); Evict drops it.
  auto resident = [&] {
    UniqueFd fd(open(snapshot_->path().c_str(), O_RDONLY | O_CLOEXEC));
    void* map = mmap(nullptr, kSize, PROT_READ, MAP_SHARED, fd.get(), 0);
    std::vector<unsigned char> in_core(kSize / kPageSize4K);
    EXPECT_EQ(mincore(map, kSize, in_core.data()), 0);
    munmap(map, kSize);
    return std::count_if(in_core.begin(), in_core.end(), [](unsigned char c) { return c & 1; });
  };
  ASSERT_TRUE(snapshot_->Evict());
  if (resident() != 0) GTEST_SKIP() << "this file system keeps the file in memory (tmpfs?)";
  const auto plan = Plan(sim::WorkloadKind::kSparse, sim::AccessMode::kRead, 1);
  auto run = RunRestore(GetParam(), *snapshot_, plan, {.cold = true});
  ASSERT_TRUE(run.has_value()) << run.error().ToString();
  EXPECT_EQ(run->mismatches, 0u);
  EXPECT_EQ(run->pages_verified, plan.distinct_pages());
}

INSTANTIATE_TEST_SUITE_P(AllContestants, RestoreBenchTest, ::testing::ValuesIn(kAllContestants),
                         [](const ::testing::TestParamInfo<Contestant>& param_info) {
                           std::string name(ContestantName(param_info.param));
                           std::erase(name, '-');
                           return name;
                         });

TEST(RestoreBenchNamesTest, NamesRoundTrip) {
  for (Contestant c : kAllContestants) {
    auto parsed = ParseContestant(ContestantName(c));
    ASSERT_TRUE(parsed.has_value());
    EXPECT_EQ(*parsed, c);
    EXPECT_FALSE(ContestantTitle(c).empty());
  }
  auto bad = ParseContestant("uffd");
  ASSERT_FALSE(bad.has_value());
  EXPECT_EQ(bad.error().code(), ErrorCode::kInvalidArgument);
  EXPECT_NE(bad.error().ToString().find("per-page"), std::string::npos);
}

TEST(RestoreSnapshotTest, RefusesFilesThatAreNotSnapshots) {
  TempDir dir;
  auto missing = RestoreSnapshot::Open(dir.File("missing"));
  ASSERT_FALSE(missing.has_value());
  EXPECT_EQ(missing.error().code(), ErrorCode::kNotFound);
  const std::string odd = dir.File("odd");
  std::ofstream(odd) << "not a multiple of 4 KiB";
  auto refused = RestoreSnapshot::Open(odd);
  ASSERT_FALSE(refused.has_value());
  EXPECT_EQ(refused.error().code(), ErrorCode::kInvalidArgument);
}

TEST(MemcpyBandwidthTest, IsMeasured) {
  TempDir dir;
  const std::string path = dir.File("bench.mem");
  ASSERT_TRUE(cli::MakeSnapshot(path, {.size_bytes = kSize}));
  auto snapshot = RestoreSnapshot::Open(path);
  ASSERT_TRUE(snapshot.has_value());
  EXPECT_GT(MeasureMemcpyBandwidth(*snapshot), 1e8);  // any machine copies 100 MB/s
}

// Many VMs at once on one engine: every VM's pages verified.
TEST(RestoreBenchManyVmsTest, ManyVmsAtOnceEachReadEveryByte) {
  TempDir dir;
  const std::string path = dir.File("bench.mem");
  ASSERT_TRUE(cli::MakeSnapshot(path, {.size_bytes = kSize, .seed = 7}));
  auto snapshot = RestoreSnapshot::Open(path);
  ASSERT_TRUE(snapshot.has_value()) << snapshot.error().ToString();
  auto plan = sim::PlanWorkload({.kind = sim::WorkloadKind::kSparse, .threads = 1}, kSize);
  ASSERT_TRUE(plan.has_value()) << plan.error().ToString();
  auto run = RunManyVms(*snapshot, *plan, 4, {.workers = 2});
  ASSERT_TRUE(run.has_value()) << run.error().ToString();
  EXPECT_EQ(run->mismatches, 0u);
  EXPECT_EQ(run->pages_verified, 4 * plan->distinct_pages());
  EXPECT_GT(run->faults, 0u);
  EXPECT_GE(run->total_ns, run->median_vm_ns);
}

}  // namespace
}  // namespace guestmem::bench
