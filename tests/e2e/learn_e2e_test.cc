// End-to-end: gmem serve learns a snapshot's working set from one restore and prefetches it in
// the next ones, keeps it across daemon restarts, and `gmem ws` shows and forgets it.
#include <gtest/gtest.h>

#include <chrono>
#include <nlohmann/json.hpp>
#include <string>
#include <vector>

#include "serve_fixture.h"
#include "testutil/subprocess.h"

namespace guestmem::e2e {
namespace {

using LearnE2eTest = ServeTest;

// What `gmem ws show --json` says of the fixture's snapshot.
nlohmann::json ShowWorkingSet(const std::string& dir, const std::string& snapshot) {
  static int shown = 0;  // a log of its own each time
  Subprocess show({GMEM_BINARY, "ws", "show", snapshot, "--cache-dir", dir + "/cache", "--json"},
                  dir + "/ws-show-" + std::to_string(++shown) + ".log");
  EXPECT_EQ(show.ExitCode(60s), 0) << show.Output();
  auto parsed = nlohmann::json::parse(show.Output(), nullptr, false);
  EXPECT_TRUE(parsed.is_object()) << show.Output();
  return parsed;
}

const std::vector<std::string> kSparseVm = {"--workload", "sparse", "--seed", "11", "--verify"};

TEST_F(LearnE2eTest, TheSecondRestoreIsPrefetchedWhatTheFirstNeededAndBothVerify) {
  StartServer();
  ExpectVmVerifies(kSparseVm, "first");
  const std::string first = WaitForVmEnd("vm 1 (");
  ASSERT_FALSE(first.empty()) << server_->Output();
  EXPECT_EQ(first.find("prefetched"), std::string::npos) << first;  // nothing learned before it

  // Learned at the first VM's end, kept in the cache.
  nlohmann::json learned = ShowWorkingSet(dir_, snapshot_->path());
  EXPECT_EQ(learned.value("restores", 0), 1);
  EXPECT_GT(learned.value("pages", 0), 0);

  ExpectVmVerifies(kSparseVm, "second");
  const std::string second = WaitForVmEnd("vm 2 (");
  ASSERT_FALSE(second.empty()) << server_->Output();
  EXPECT_NE(server_->FindLine({"vm 2 (", " connected: ", "; prefetching "}), "")
      << server_->Output();
  EXPECT_EQ(ShowWorkingSet(dir_, snapshot_->path()).value("restores", 0), 2);

  // A new daemon finds it in the cache, and its VM verifies too; `ws clear` forgets it.
  server_.reset();
  StartServer();
  ExpectVmVerifies(kSparseVm, "third");
  EXPECT_TRUE(server_->WaitForOutput("learned over 2 restores", 60s)) << server_->Output();
  // Given what was learned (how much of it the prefetch installs before the guest faults it in
  // depends on their speeds).
  EXPECT_NE(server_->FindLine({"vm 1 (", " connected: ", "; prefetching "}), "")
      << server_->Output();
  EXPECT_FALSE(WaitForVmEnd("vm 1 (").empty()) << server_->Output();
  Subprocess clear({GMEM_BINARY, "ws", "clear", snapshot_->path(), "--cache-dir", dir_ + "/cache"},
                   dir_ + "/ws-clear.log");
  EXPECT_EQ(clear.ExitCode(60s), 0) << clear.Output();
  EXPECT_FALSE(ShowWorkingSet(dir_, snapshot_->path()).value("learned", true));
}

TEST_F(LearnE2eTest, NoLearnKeepsNothingAndPrefetchesNothing) {
  StartServer({"--no-learn"});
  ExpectVmVerifies(kSparseVm, "first");
  ASSERT_FALSE(WaitForVmEnd("vm 1 (").empty()) << server_->Output();
  ExpectVmVerifies(kSparseVm, "second");
  const std::string second = WaitForVmEnd("vm 2 (");
  ASSERT_FALSE(second.empty()) << server_->Output();
  EXPECT_EQ(second.find("prefetched"), std::string::npos) << second;
  EXPECT_EQ(server_->FindLine({"vm 2 (", " connected: ", "; prefetching "}), "")
      << server_->Output();
  EXPECT_FALSE(ShowWorkingSet(dir_, snapshot_->path()).value("learned", true));
}

}  // namespace
}  // namespace guestmem::e2e
