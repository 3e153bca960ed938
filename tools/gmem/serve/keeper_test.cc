// The keeper against real processes: the `gmem keeper` it starts, daemons that die (their
// connections close) and successors that take over, descriptors compared by what they refer to.
#include "serve/keeper.h"

#include <gtest/gtest.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <unistd.h>

#include <filesystem>
#include <string>
#include <vector>

#include "base/temp_dir.h"
#include "guestmem/unix_socket.h"
#include "testutil/test_vm.h"

namespace guestmem::cli {
namespace {

using testutil::WaitUntil;

// The file a descriptor refers to, for comparing descriptors across processes.
std::pair<dev_t, ino_t> Identity(int fd) {
  struct stat st {};
  EXPECT_EQ(fstat(fd, &st), 0);
  return {st.st_dev, st.st_ino};
}

UniqueFd Memfd(const char* name) { return UniqueFd(memfd_create(name, MFD_CLOEXEC)); }

class KeeperTest : public ::testing::Test {
 protected:
  std::unique_ptr<KeeperClient> Open() {
    auto client = KeeperClient::Open(path_, GMEM_BINARY);
    EXPECT_TRUE(client.has_value()) << client.error().ToString();
    return client ? std::move(*client) : nullptr;
  }
  // Waits until the keeper has exited (it removes its socket).
  bool KeeperGone() {
    return WaitUntil([&] { return !std::filesystem::exists(path_); });
  }

  TempDir dir_;
  const std::string path_ = dir_.File("serve.sock.keeper");
};

TEST_F(KeeperTest, AFreshKeeperHoldsNothingAndEndsWhenReleased) {
  auto daemon = Open();
  ASSERT_NE(daemon, nullptr);
  EXPECT_TRUE(std::filesystem::exists(path_));
  auto inheritance = daemon->TakeOver();
  ASSERT_TRUE(inheritance.has_value()) << inheritance.error().ToString();
  EXPECT_TRUE(inheritance->vms.empty());
  EXPECT_FALSE(inheritance->listener);
  ASSERT_TRUE(daemon->Release());
  EXPECT_TRUE(KeeperGone());
}

TEST_F(KeeperTest, ADeadDaemonsVmsAndListenerGoToItsSuccessor) {
  auto listener = ListenUnix(dir_.File("serve.sock"));
  ASSERT_TRUE(listener.has_value());
  UniqueFd uffd_like = Memfd("uffd");
  UniqueFd tracker = Memfd("tracker");
  int vm_conn[2];
  ASSERT_EQ(socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, vm_conn), 0);
  UniqueFd vm_side(vm_conn[1]);
  UniqueFd daemon_side(vm_conn[0]);
  {
    auto first = Open();
    ASSERT_NE(first, nullptr);
    ASSERT_TRUE(first->TakeOver().has_value());
    ASSERT_TRUE(first->KeepListener(listener->get()));
    const int fds[] = {uffd_like.get(), daemon_side.get(), tracker.get()};
    ASSERT_TRUE(first->Keep(7, R"({"regions":[1,2]})", fds, /*watch=*/1));
    ASSERT_TRUE(first->Keep(9, "first version", fds, 1));
    ASSERT_TRUE(first->Keep(9, "second version", fds, 1));  // replaces
    ASSERT_TRUE(first->Keep(11, "forgotten", fds, 1));
    ASSERT_TRUE(first->Forget(11));
  }  // the first daemon dies: its connection closes without a release

  auto successor = Open();
  ASSERT_NE(successor, nullptr);
  auto inheritance = successor->TakeOver();
  ASSERT_TRUE(inheritance.has_value()) << inheritance.error().ToString();
  ASSERT_EQ(inheritance->vms.size(), 2u);
  const KeptVm& seven = inheritance->vms[0];
  const KeptVm& nine = inheritance->vms[1];
  EXPECT_EQ(seven.id, 7u);
  EXPECT_EQ(seven.description, R"({"regions":[1,2]})");
  EXPECT_EQ(nine.id, 9u);
  EXPECT_EQ(nine.description, "second version");
  ASSERT_EQ(seven.fds.size(), 3u);
  EXPECT_EQ(Identity(seven.fds[0].get()), Identity(uffd_like.get()));
  EXPECT_EQ(Identity(seven.fds[1].get()), Identity(daemon_side.get()));
  EXPECT_EQ(Identity(seven.fds[2].get()), Identity(tracker.get()));
  ASSERT_TRUE(inheritance->listener);
  EXPECT_EQ(Identity(inheritance->listener.get()), Identity(listener->get()));
  // The successor is the owner now: a third daemon is refused.
  auto third = Open();
  ASSERT_NE(third, nullptr);
  auto refused = third->TakeOver();
  ASSERT_FALSE(refused.has_value());
  EXPECT_EQ(refused.error().code(), ErrorCode::kFailedPrecondition) << refused.error().ToString();
  ASSERT_TRUE(successor->Release());
  EXPECT_TRUE(KeeperGone());
}

TEST_F(KeeperTest, AVmThatHangsUpIsLetGoAndAnEmptyKeeperEnds) {
  int a[2], b[2];
  ASSERT_EQ(socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, a), 0);
  ASSERT_EQ(socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, b), 0);
  UniqueFd a_daemon(a[0]), a_vm(a[1]), b_daemon(b[0]), b_vm(b[1]);
  {
    auto first = Open();
    ASSERT_NE(first, nullptr);
    ASSERT_TRUE(first->TakeOver().has_value());
    const int fds_a[] = {a_daemon.get()};
    const int fds_b[] = {b_daemon.get()};
    ASSERT_TRUE(first->Keep(1, "a", fds_a, 0));
    ASSERT_TRUE(first->Keep(2, "b", fds_b, 0));
  }
  a_vm.reset();  // VM 1's VMM exits while no daemon runs
  auto successor = Open();
  ASSERT_NE(successor, nullptr);
  auto inheritance = successor->TakeOver();
  ASSERT_TRUE(inheritance.has_value()) << inheritance.error().ToString();
  ASSERT_EQ(inheritance->vms.size(), 1u);
  EXPECT_EQ(inheritance->vms[0].id, 2u);
  successor.reset();  // this one dies too, and then the last VM hangs up: nothing is left
  b_vm.reset();
  inheritance->vms.clear();
  EXPECT_TRUE(KeeperGone());
}

TEST_F(KeeperTest, GarbageFromAClientDoesNotHurtTheKeeper) {
  auto owner = Open();
  ASSERT_NE(owner, nullptr);
  ASSERT_TRUE(owner->TakeOver().has_value());
  UniqueFd kept = Memfd("kept");
  const int fds[] = {kept.get()};
  ASSERT_TRUE(owner->Keep(3, "kept", fds, 0));
  for (const std::string& junk :
       {std::string("\xff\xff\xff\xff"), std::string("\x05\x00\x00\x00[1,2"),
        std::string("\x02\x00\x00\x00{}"), std::string("\x04\x00\x00\x00null")}) {
    auto conn = ConnectUnix(path_);
    ASSERT_TRUE(conn.has_value());
    ASSERT_EQ(write(conn->get(), junk.data(), junk.size()), static_cast<ssize_t>(junk.size()));
  }
  // The owner is served as before.
  EXPECT_TRUE(owner->Forget(3));
  auto unknown = owner->Forget(12345);
  EXPECT_TRUE(unknown.has_value());
  ASSERT_TRUE(owner->Release());
  EXPECT_TRUE(KeeperGone());
}

}  // namespace
}  // namespace guestmem::cli
