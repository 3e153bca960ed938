// gmem serve from packed snapshots in an object store: a real Ceph RGW (the ctest fixture
// remote.rgw_up) reached through a fault-injecting proxy that counts requests, and nginx for
// plain HTTP ranges; gmem snapshot push and pull.
#include <gtest/gtest.h>
#include <signal.h>
#include <stdlib.h>

#include <filesystem>
#include <fstream>
#include <memory>
#include <nlohmann/json.hpp>
#include <set>
#include <span>
#include <string>
#include <vector>

#include "guestmem/object_store.h"
#include "guestmem/packed_index.h"
#include "guestmem/packed_source.h"
#include "serve_fixture.h"
#include "testutil/fault_proxy.h"
#include "testutil/nginx_server.h"
#include "testutil/rgw_env.h"
#include "testutil/subprocess.h"

namespace guestmem::e2e {
namespace {

// Requests a daemon makes to open a one-layer snapshot: a HEAD for its size, its header, its index.
constexpr uint64_t kOpenRequests = 3;

uint16_t PortOf(const std::string& endpoint) {
  return static_cast<uint16_t>(std::stoi(endpoint.substr(endpoint.rfind(':') + 1)));
}

class RemoteE2eTest : public ServeTest {
 protected:
  void SetUp() override {
    ServeTest::SetUp();
    auto env = testutil::FindRgw(GUESTMEM_RGW_DIR, "start one with the remote.rgw_up test");
    if (!env) GTEST_SKIP() << env.error().context();
    rgw_ = *env;
    proxy_ = std::make_unique<testutil::FaultProxy>(PortOf(rgw_.endpoint));
    ASSERT_NE(proxy_->port(), 0);
    UseStore("http://127.0.0.1:" + std::to_string(proxy_->port()), rgw_.secret_key);
    bucket_ = "gmem-e2e-" + std::to_string(getpid());
    auto store = ObjectStore::Create(ObjectStoreOptions::FromEnvironment());
    ASSERT_TRUE(store) << store.error().ToString();
    Status created = (*store)->CreateBucket(ObjectUrl{ObjectUrl::Scheme::kS3, bucket_, ""});
    ASSERT_TRUE(created) << created.error().ToString();
    packed_ = dir_ + "/snap.gmp";
    Gmem({"snapshot", "pack", snapshot_->path(), packed_, "--chunk-kib", "64", "--no-working-set"});
    url_ = "s3://" + bucket_ + "/snapshots/snap.gmp";
    Gmem({"snapshot", "push", packed_, url_});
    served_path_ = url_;
  }

  // The environment `gmem` inherits: the store at `endpoint`, signed with `secret`.
  void UseStore(const std::string& endpoint, const std::string& secret) {
    setenv("AWS_ENDPOINT_URL", endpoint.c_str(), 1);
    setenv("AWS_ACCESS_KEY_ID", rgw_.access_key.c_str(), 1);
    setenv("AWS_SECRET_ACCESS_KEY", secret.c_str(), 1);
    setenv("AWS_REGION", rgw_.region.c_str(), 1);
  }

  std::string Gmem(std::vector<std::string> args, int exit_code = 0) {
    args.insert(args.begin(), GMEM_BINARY);
    Subprocess tool(args, dir_ + "/gmem-" + std::to_string(++runs_) + ".log");
    EXPECT_EQ(tool.ExitCode(120s), exit_code) << tool.Output();
    return tool.Output();
  }

  // The distinct chunks of the packed snapshot: what a restore of all of it must fetch.
  uint64_t DistinctChunks() {
    auto source = PackedSource::Open(packed_, {.decode_threads = 0});
    EXPECT_TRUE(source) << source.error().ToString();
    if (!source) return 0;
    std::set<ChunkHash> hashes;
    for (const ChunkRef& c : (*source)->index().chunks) hashes.insert(c.hash);
    return hashes.size();
  }

  std::unique_ptr<Subprocess> Vm(const std::string& name, const std::string& workload) {
    return std::make_unique<Subprocess>(
        std::vector<std::string>{GMEM_BINARY, "vmm-sim", "--socket", socket_, "--mem-file",
                                 snapshot_->path(), "--workload", workload, "--verify"},
        dir_ + "/" + name + ".log");
  }

  testutil::S3Env rgw_;
  std::unique_ptr<testutil::FaultProxy> proxy_;
  std::string bucket_, packed_, url_;
  int runs_ = 0;
};

// 16 VMs restore one snapshot at once from RGW, every byte checked; each chunk is fetched once,
// and a daemon started again finds every chunk in its disk cache.
TEST_F(RemoteE2eTest, ManyVmsRestoreByteExactAndEachChunkIsFetchedOnce) {
  const uint64_t chunks = DistinctChunks();
  ASSERT_GT(chunks, 8u);
  const uint64_t before = proxy_->requests();
  StartServer();
  EXPECT_NE(server_->Output().find("serving packed snapshot " + url_), std::string::npos)
      << server_->Output();
  std::vector<std::unique_ptr<Subprocess>> vms;
  for (int i = 0; i < 16; ++i) vms.push_back(Vm("vm" + std::to_string(i), "random"));
  for (auto& vm : vms) {
    EXPECT_EQ(vm->ExitCode(120s), 0) << vm->Output() << "\nserve log:\n" << server_->Output();
  }
  EXPECT_EQ(proxy_->requests() - before, kOpenRequests + chunks)
      << "each of the " << chunks << " chunks must be fetched once\n"
      << server_->Output();

  server_.reset();
  const uint64_t warm_start = proxy_->requests();
  StartServer();
  EXPECT_NE(server_->Output().find("chunk cache " + dir_ +
                                   "/cache/chunks: " + std::to_string(chunks) + " chunks"),
            std::string::npos)
      << server_->Output();
  auto again = Vm("again", "sequential");
  EXPECT_EQ(again->ExitCode(120s), 0) << again->Output() << "\nserve log:\n" << server_->Output();
  EXPECT_EQ(proxy_->requests() - warm_start, kOpenRequests) << "a warm restore fetched chunks";
  // What gmem status (and the metrics) say of it: every chunk from the disk cache.
  Subprocess query({GMEM_BINARY, "status", socket_, "--json"}, dir_ + "/status.json");
  ASSERT_EQ(query.ExitCode(60s), 0) << query.Output();
  const auto status =
      nlohmann::json::parse(testutil::ReadFile(dir_ + "/status.json"), nullptr, false);
  ASSERT_FALSE(status.is_discarded()) << query.Output();
  EXPECT_EQ(status["object_store"]["requests"], kOpenRequests) << status.dump(2);
  EXPECT_EQ(status["object_store"]["disk_cache"]["hits"], chunks) << status.dump(2);
  EXPECT_EQ(status["object_store"]["disk_cache"]["entries"], chunks) << status.dump(2);

  // Two entries of the disk cache swapped: each is a whole chunk, but not the one its name says.
  // Found out by its hash, each is fetched again; no VM sees a wrong byte.
  server_.reset();
  std::vector<std::filesystem::path> entries;
  for (const auto& e : std::filesystem::recursive_directory_iterator(dir_ + "/cache/chunks")) {
    if (e.is_regular_file()) entries.push_back(e.path());
  }
  ASSERT_GE(entries.size(), 2u);
  std::filesystem::rename(entries[0], dir_ + "/swap");
  std::filesystem::rename(entries[1], entries[0]);
  std::filesystem::rename(dir_ + "/swap", entries[1]);
  const uint64_t swapped_start = proxy_->requests();
  StartServer();
  auto checked = Vm("checked", "sequential");
  EXPECT_EQ(checked->ExitCode(120s), 0) << checked->Output() << "\nserve log:\n"
                                        << server_->Output();
  EXPECT_EQ(proxy_->requests() - swapped_start, kOpenRequests + 2) << server_->Output();
}

// The store stops answering mid-restore — its requests hang (a stalled store) or its
// connections are cut as soon as they speak (a store that went away): the pages it cannot have
// within the fetch deadline are poisoned (the VM gets SIGBUS, it does not hang) with the object
// and range logged; the daemon lives on and serves the next VM once the store is back.
class StoreFailureTest : public RemoteE2eTest, public ::testing::WithParamInterface<bool> {};

TEST_P(StoreFailureTest, PoisonsPagesAndTheDaemonLivesOn) {
  const bool stall = GetParam();
  StartServer({"--fetch-deadline-ms", "1500", "--fetch-threads", "2"});
  if (stall) {
    proxy_->Stall(1'000'000);
  } else {
    proxy_->Drop(1'000'000);
  }
  auto doomed = Vm("doomed", "sequential");
  const int doomed_exit = doomed->ExitCode(120s);
  EXPECT_TRUE(DiedOfSigbus(doomed_exit, doomed->Output())) << doomed_exit << "\n"
                                                           << doomed->Output();
  EXPECT_NE(server_->WaitForLine({"poisoned (the VM gets SIGBUS", url_}, 60s), "")
      << server_->Output();
  EXPECT_EQ(server_->Wait(0ms), std::nullopt) << "the daemon must still be running";

  // Back: a chunk whose fetch failed is asked for again once its failure is a second old, so
  // VMs started before then still meet it; one started after verifies.
  proxy_->Pass();
  bool verified = false;
  const auto deadline = std::chrono::steady_clock::now() + 60s;
  for (int attempt = 0; !verified && std::chrono::steady_clock::now() < deadline; ++attempt) {
    auto next = Vm("next" + std::to_string(attempt), "sequential");
    verified = next->ExitCode(120s) == 0;
  }
  EXPECT_TRUE(verified) << server_->Output().substr(0, 4000);
}

INSTANTIATE_TEST_SUITE_P(StalledOrGone, StoreFailureTest, ::testing::Bool(),
                         [](const auto& param) { return param.param ? "stalled" : "gone"; });

// Wrong credentials and a missing snapshot fail at start, naming the cause.
TEST_F(RemoteE2eTest, WrongCredentialsAndMissingSnapshotsFailAtStartNamingTheCause) {
  UseStore(rgw_.endpoint, "not-the-secret");
  const std::string denied = Gmem({"serve", socket_, url_, "--cache-dir", dir_ + "/cache"}, 1);
  EXPECT_NE(denied.find("permission denied"), std::string::npos) << denied;
  EXPECT_NE(denied.find("403"), std::string::npos) << denied;
  EXPECT_NE(denied.find("SignatureDoesNotMatch"), std::string::npos) << denied;
  EXPECT_NE(denied.find(url_), std::string::npos) << denied;

  UseStore(rgw_.endpoint, rgw_.secret_key);
  const std::string missing =
      Gmem({"serve", socket_, url_ + ".missing", "--cache-dir", dir_ + "/cache"}, 1);
  EXPECT_NE(missing.find("not found"), std::string::npos) << missing;
  EXPECT_NE(missing.find("404"), std::string::npos) << missing;
  EXPECT_NE(missing.find("NoSuchKey"), std::string::npos) << missing;
}

// Pulled back, the snapshot is the one pushed; a second push uploads nothing.
TEST_F(RemoteE2eTest, PushUploadsOnlyMissingChunksAndPullGivesTheSnapshotBack) {
  const std::string again = Gmem({"snapshot", "push", packed_, url_, "--json"});
  EXPECT_NE(again.find("\"chunks_moved\": 0"), std::string::npos) << again;
  const std::string pulled = dir_ + "/pulled/snap.gmp";
  Gmem({"snapshot", "pull", url_, pulled});
  Gmem({"snapshot", "diff", snapshot_->path(), pulled});
  Gmem({"snapshot", "verify", pulled});
}

// A packed snapshot on a plain web server that honours Range, its chunks inline.
TEST_F(RemoteE2eTest, ServesAPackedSnapshotFromAWebServer) {
  if (!testutil::NginxServer::Available()) GTEST_SKIP() << "no nginx";
  testutil::NginxServer nginx;
  const std::string why = nginx.Start(dir_);
  ASSERT_EQ(why, "") << why;
  served_path_ = "http://127.0.0.1:" + std::to_string(nginx.port()) + "/snap.gmp";
  StartServer();
  for (const char* workload : {"sparse", "random"}) {
    auto vm = Vm(std::string("http-") + workload, workload);
    EXPECT_EQ(vm->ExitCode(120s), 0) << vm->Output() << "\nserve log:\n" << server_->Output();
  }
}

// A pack may name its parent and its store only by paths beside it: one on a web server that
// names its parent by an s3:// URL would have the daemon read, with its credentials, whatever
// the pack's author chose into a guest.
TEST_F(RemoteE2eTest, APackThatNamesItsParentByUrlIsRefused) {
  if (!testutil::NginxServer::Available()) GTEST_SKIP() << "no nginx";
  const std::string layer = dir_ + "/layer.gmp";
  Gmem({"snapshot", "pack", snapshot_->path(), layer, "--parent", packed_, "--no-working-set"});
  // The layer again, its parent named by the URL the base was pushed to.
  const std::string bytes = testutil::ReadFile(layer);
  const auto file = std::as_bytes(std::span(bytes.data(), bytes.size()));
  auto header = ParsePackHeader(file, file.size());
  ASSERT_TRUE(header) << header.error().ToString();
  auto index = ParsePackIndex(*header, file.subspan(header->index_offset));
  ASSERT_TRUE(index) << index.error().ToString();
  ASSERT_TRUE(index->has_parent());
  index->parent_path = url_;
  const std::string index_bytes = index->SerializeIndex();
  const std::string evil = bytes.substr(0, header->index_offset) + index_bytes;
  const std::string rewritten =
      index->SerializeHeader(header->index_offset, std::as_bytes(std::span(index_bytes))) +
      evil.substr(PackIndex::kHeaderBytes);
  {
    std::ofstream out(dir_ + "/evil.gmp", std::ios::binary);
    out << rewritten;
  }
  testutil::NginxServer nginx;
  const std::string why = nginx.Start(dir_);
  ASSERT_EQ(why, "") << why;
  const std::string refused =
      Gmem({"serve", socket_, "http://127.0.0.1:" + std::to_string(nginx.port()) + "/evil.gmp",
            "--cache-dir", dir_ + "/cache"},
           1);
  EXPECT_NE(refused.find("names its parent by a URL (" + url_ + ")"), std::string::npos) << refused;
}

}  // namespace
}  // namespace guestmem::e2e
