// End-to-end: gmem serve restores VMs from packed snapshots (gmem snapshot pack) — full ones,
// layers over a base — byte-exact as vmm-sim --verify checks against the raw memory file; and a
// corrupt chunk poisons the pages that need it, is logged by name, and the daemon serves on.
#include <fcntl.h>
#include <gtest/gtest.h>
#include <signal.h>
#include <unistd.h>

#include <nlohmann/json.hpp>
#include <string>
#include <vector>

#include "guestmem/packed_source.h"
#include "serve_fixture.h"
#include "testutil/subprocess.h"

namespace guestmem::e2e {
namespace {

class PackedE2eTest : public ServeTest {
 protected:
  // Runs `gmem snapshot ARGS...` and expects `exit_code`; returns its output.
  std::string Snapshot(std::vector<std::string> args, int exit_code = 0) {
    static int runs = 0;
    args.insert(args.begin(), {GMEM_BINARY, "snapshot"});
    Subprocess tool(args, dir_ + "/snapshot-" + std::to_string(++runs) + ".log");
    EXPECT_EQ(tool.ExitCode(120s), exit_code) << tool.Output();
    return tool.Output();
  }

  // A VM reading the pages of `workload`, checked against `raw` (the raw memory file).
  void ExpectVerifies(const std::string& raw, const std::string& workload,
                      const std::string& name) {
    Subprocess vm({GMEM_BINARY, "vmm-sim", "--socket", socket_, "--mem-file", raw, "--workload",
                   workload, "--threads", "2", "--verify"},
                  dir_ + "/" + name + ".log");
    EXPECT_EQ(vm.ExitCode(120s), 0) << vm.Output() << "\nserve log:\n" << server_->Output();
  }
};

TEST_F(PackedE2eTest, RestoresFromAPackedSnapshotByteExactWithEveryCodec) {
  for (const char* codec : {"zstd", "lz4", "none"}) {
    served_path_ = dir_ + "/snap-" + codec + ".gmp";
    Snapshot({"pack", snapshot_->path(), served_path_, "--codec", codec, "--chunk-kib", "64",
              "--no-working-set"});
    StartServer();
    EXPECT_NE(server_->Output().find("serving packed snapshot"), std::string::npos)
        << server_->Output();
    for (const char* workload : {"sequential", "sparse", "random"}) {
      ExpectVerifies(snapshot_->path(), workload, std::string(codec) + "-" + workload);
    }
    server_.reset();
  }
}

TEST_F(PackedE2eTest, RestoresALayerOverItsBaseAsTheMergedMemoryFile) {
  // The base: the fixture's snapshot. The diff: every 7th page rewritten, the rest holes (as
  // Firecracker writes a diff snapshot); the merged file is what the layer must read as.
  const std::string diff = dir_ + "/diff.mem", merged = dir_ + "/merged.mem";
  {
    const int d = open(diff.c_str(), O_CREAT | O_RDWR | O_CLOEXEC, 0600);
    const int m = open(merged.c_str(), O_CREAT | O_RDWR | O_CLOEXEC, 0600);
    ASSERT_GE(d, 0);
    ASSERT_GE(m, 0);
    ASSERT_EQ(ftruncate(d, static_cast<off_t>(snapshot_->size())), 0);
    ASSERT_EQ(ftruncate(m, static_cast<off_t>(snapshot_->size())), 0);
    std::vector<uint8_t> page(kPageSize4K);
    for (uint64_t p = 0; p < snapshot_->pages(); ++p) {
      const bool changed = p % 7 == 3;
      if (changed) {
        for (uint64_t i = 0; i < page.size(); ++i) page[i] = static_cast<uint8_t>(p * 3 + i * 5);
      } else if (snapshot_->hole(p)) {
        continue;
      } else {
        testutil::FillSnapshotPage(p, page.data());
      }
      const off_t at = static_cast<off_t>(p * kPageSize4K);
      ASSERT_EQ(pwrite(m, page.data(), page.size(), at), static_cast<ssize_t>(page.size()));
      if (changed) {
        ASSERT_EQ(pwrite(d, page.data(), page.size(), at), static_cast<ssize_t>(page.size()));
      }
    }
    close(d);
    close(m);
  }
  Snapshot({"pack", snapshot_->path(), dir_ + "/base.gmp", "--no-working-set"});
  const std::string packed =
      Snapshot({"pack", diff, dir_ + "/layer.gmp", "--parent", dir_ + "/base.gmp", "--json",
                "--no-working-set"});
  const auto summary = nlohmann::json::parse(packed, nullptr, false);
  ASSERT_TRUE(summary.is_object()) << packed;
  EXPECT_EQ(summary.value("stored_pages", 0u), (snapshot_->pages() + 3) / 7);
  const std::string inspected = Snapshot({"inspect", dir_ + "/layer.gmp", "--json"});
  const auto inspect = nlohmann::json::parse(inspected, nullptr, false);
  ASSERT_TRUE(inspect.is_object()) << inspected;
  EXPECT_EQ(inspect["layers"].size(), 2u);

  // What unpack writes is the merged file, byte for byte; diff finds nothing between them.
  Snapshot({"unpack", dir_ + "/layer.gmp", dir_ + "/unpacked.mem"});
  Snapshot({"diff", merged, dir_ + "/unpacked.mem"});
  Snapshot({"diff", snapshot_->path(), dir_ + "/layer.gmp"}, /*exit_code=*/1);

  served_path_ = dir_ + "/layer.gmp";
  StartServer();
  ExpectVerifies(merged, "sequential", "layer-sequential");
  ExpectVerifies(merged, "random", "layer-random");
}

TEST_F(PackedE2eTest, ACorruptChunkPoisonsItsPagesAndTheDaemonServesOn) {
  // The fixture's pages repeat every 256 pages, so chunks repeat and are stored once: page 7000
  // is made unlike any other, so that its chunk is its own and corrupting it touches no other.
  {
    const int fd = open(snapshot_->path().c_str(), O_RDWR | O_CLOEXEC);
    ASSERT_GE(fd, 0);
    std::vector<uint8_t> unique(kPageSize4K);
    for (uint64_t i = 0; i < unique.size(); ++i) unique[i] = static_cast<uint8_t>(i * i + 17);
    ASSERT_EQ(pwrite(fd, unique.data(), unique.size(), static_cast<off_t>(7000 * kPageSize4K)),
              static_cast<ssize_t>(unique.size()));
    close(fd);
  }
  served_path_ = dir_ + "/snap.gmp";
  Snapshot({"pack", snapshot_->path(), served_path_, "--chunk-kib", "64", "--no-working-set"});
  // Corrupt the chunk that holds page 7000 (of 8192): its pages are past the second VM's.
  uint64_t offset = 0, bytes = 0;
  size_t chunk = 0;
  {
    auto source = PackedSource::Open(served_path_, {.decode_threads = 0});
    ASSERT_TRUE(source) << source.error().ToString();
    const PackIndex& index = (*source)->index();
    const PageRun& run = index.RunAt(7000);
    ASSERT_EQ(run.kind, PageKind::kStored);
    chunk = index.ChunkOf(run.stored_first + 7000 - run.first_page);
    offset = index.chunks[chunk].offset;
    bytes = index.chunks[chunk].compressed_bytes;
  }
  {
    const int fd = open(served_path_.c_str(), O_RDWR | O_CLOEXEC);
    ASSERT_GE(fd, 0);
    const char junk[16] = "not the content";
    ASSERT_EQ(pwrite(fd, junk, sizeof(junk), static_cast<off_t>(offset + bytes / 2)), 16);
    close(fd);
  }
  const std::string verify = Snapshot({"verify", served_path_}, /*exit_code=*/1);
  EXPECT_NE(verify.find("chunk " + std::to_string(chunk) + " "), std::string::npos) << verify;

  StartServer();
  // A VM that reads every page: the corrupt chunk's pages are poisoned, so it dies of SIGBUS
  // there (vmm-sim's --verify would report a wrong byte; it finds none before the signal).
  Subprocess doomed({GMEM_BINARY, "vmm-sim", "--socket", socket_, "--mem-file", snapshot_->path(),
                     "--workload", "sequential", "--verify"},
                    dir_ + "/doomed.log");
  const int doomed_exit = doomed.ExitCode(120s);
  EXPECT_TRUE(DiedOfSigbus(doomed_exit, doomed.Output())) << doomed_exit << "\n" << doomed.Output();
  EXPECT_FALSE(
      server_->WaitForAnyLine({{"poisoned (the VM gets SIGBUS", "chunk " + std::to_string(chunk) + " ("}}, 60s)
          .empty())
      << server_->Output();
  // The daemon lives on and serves the pages it can.
  Subprocess next({GMEM_BINARY, "vmm-sim", "--socket", socket_, "--mem-file", snapshot_->path(),
                   "--workload", "sequential", "--pages", "2048", "--verify"},
                  dir_ + "/next.log");
  EXPECT_EQ(next.ExitCode(120s), 0) << next.Output() << "\nserve log:\n" << server_->Output();
}

}  // namespace
}  // namespace guestmem::e2e
