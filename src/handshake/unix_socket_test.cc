#include "guestmem/unix_socket.h"

#include <fcntl.h>
#include <grp.h>
#include <gtest/gtest.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <cstdlib>
#include <filesystem>
#include <vector>

#include "testutil/error_code.h"

namespace guestmem {
namespace {

class UnixSocketTest : public ::testing::Test {
 protected:
  void SetUp() override {
    std::string pattern = (std::filesystem::temp_directory_path() / "guestmem-sock-XXXXXX");
    ASSERT_NE(mkdtemp(pattern.data()), nullptr);
    dir_ = pattern;
  }
  void TearDown() override { std::filesystem::remove_all(dir_); }

  static struct stat Stat(const std::string& path) {
    struct stat st {};
    EXPECT_EQ(lstat(path.c_str(), &st), 0) << path;
    return st;
  }

  std::string dir_;
};

TEST_F(UnixSocketTest, ListensOwnerOnlyAndKnowsThePeer) {
  const std::string path = dir_ + "/s";
  const mode_t old_umask = umask(0);  // a permissive umask must not widen the default
  auto listener = ListenUnix(path);
  umask(old_umask);
  ASSERT_TRUE(listener.has_value()) << listener.error().ToString();
  const struct stat st = Stat(path);
  EXPECT_TRUE(S_ISSOCK(st.st_mode));
  EXPECT_EQ(st.st_mode & 07777, 0600u);
  EXPECT_TRUE(fcntl(listener->get(), F_GETFD) & FD_CLOEXEC);
  EXPECT_TRUE(fcntl(listener->get(), F_GETFL) & O_NONBLOCK);

  auto client = ConnectUnix(path);
  ASSERT_TRUE(client.has_value()) << client.error().ToString();
  UniqueFd server(accept4(listener->get(), nullptr, nullptr, SOCK_CLOEXEC));
  ASSERT_TRUE(server.valid());
  auto peer = GetPeerCredentials(server.get());
  ASSERT_TRUE(peer.has_value()) << peer.error().ToString();
  EXPECT_EQ(peer->pid, getpid());
  EXPECT_EQ(peer->uid, getuid());
  EXPECT_EQ(peer->gid, getgid());
  std::vector<gid_t> ours(static_cast<size_t>(getgroups(0, nullptr)));
  ASSERT_EQ(getgroups(static_cast<int>(ours.size()), ours.data()), static_cast<int>(ours.size()));
  std::vector<gid_t> theirs = peer->groups;
  std::sort(ours.begin(), ours.end());
  std::sort(theirs.begin(), theirs.end());
  EXPECT_EQ(theirs, ours);
  // The connection works both ways.
  ASSERT_EQ(write(client->get(), "ping", 4), 4);
  char buf[4];
  ASSERT_EQ(read(server.get(), buf, 4), 4);
  EXPECT_EQ(std::string(buf, 4), "ping");

  // A second daemon on the same path is refused while the first listens, and changes nothing.
  auto second = ListenUnix(path);
  ASSERT_FALSE(second.has_value());
  EXPECT_EQ(second.error().code(), ErrorCode::kAlreadyExists);
  EXPECT_NE(second.error().context().find("listens on"), std::string::npos);
  EXPECT_EQ(Stat(path).st_ino, st.st_ino);
  EXPECT_TRUE(ConnectUnix(path).has_value());
}

TEST_F(UnixSocketTest, ModeOwnerAndGroupAreApplied) {
  const std::string path = dir_ + "/s";
  const mode_t old_umask = umask(027);  // would clear the group's write bit
  auto listener = ListenUnix(path, {.mode = 0660, .group = 1});
  umask(old_umask);
  if (!listener.has_value() && listener.error().code() == ErrorCode::kPermissionDenied) {
    GTEST_SKIP() << "cannot chown here: " << listener.error().ToString();
  }
  ASSERT_TRUE(listener.has_value()) << listener.error().ToString();
  const struct stat st = Stat(path);
  EXPECT_EQ(st.st_mode & 07777, 0660u);
  EXPECT_EQ(st.st_gid, 1u);
  EXPECT_EQ(st.st_uid, getuid());
}

TEST_F(UnixSocketTest, StaleSocketIsReplacedUnlessForbidden) {
  const std::string path = dir_ + "/s";
  ino_t stale_inode;
  {
    auto first = ListenUnix(path);
    ASSERT_TRUE(first.has_value());
    stale_inode = Stat(path).st_ino;
  }  // closed: the file stays behind, and nobody listens on it
  auto refused = ListenUnix(path, {.replace_stale = false});
  ASSERT_FALSE(refused.has_value());
  EXPECT_EQ(refused.error().code(), ErrorCode::kAlreadyExists);
  EXPECT_NE(refused.error().context().find("stale"), std::string::npos);
  EXPECT_EQ(Stat(path).st_ino, stale_inode);  // left alone
  EXPECT_FALSE(ConnectUnix(path).has_value());

  auto again = ListenUnix(path);
  ASSERT_TRUE(again.has_value()) << again.error().ToString();
  EXPECT_TRUE(S_ISSOCK(Stat(path).st_mode));
  EXPECT_TRUE(ConnectUnix(path).has_value());  // a live socket now
}

TEST_F(UnixSocketTest, BadPathsAreRefusedAndChangeNothing) {
  const std::string file = dir_ + "/regular";
  {
    int fd = open(file.c_str(), O_CREAT | O_WRONLY | O_CLOEXEC, 0644);
    ASSERT_GE(fd, 0);
    ASSERT_EQ(write(fd, "keep", 4), 4);
    close(fd);
  }
  auto regular = ListenUnix(file);
  ASSERT_FALSE(regular.has_value());
  EXPECT_EQ(regular.error().code(), ErrorCode::kAlreadyExists);
  EXPECT_NE(regular.error().context().find("is not a socket"), std::string::npos);
  EXPECT_TRUE(S_ISREG(Stat(file).st_mode));
  EXPECT_EQ(Stat(file).st_size, 4);

  auto directory = ListenUnix(dir_);
  ASSERT_FALSE(directory.has_value());
  EXPECT_EQ(directory.error().code(), ErrorCode::kAlreadyExists);

  const std::string too_long = dir_ + "/" + std::string(200, 'x');
  auto listen_long = ListenUnix(too_long);
  ASSERT_FALSE(listen_long.has_value());
  EXPECT_EQ(listen_long.error().code(), ErrorCode::kInvalidArgument);
  EXPECT_NE(listen_long.error().context().find("1 to 107 bytes"), std::string::npos)
      << listen_long.error().ToString();
  EXPECT_FALSE(std::filesystem::exists(too_long.substr(0, 107)));
  auto connect_long = ConnectUnix(too_long);
  ASSERT_FALSE(connect_long.has_value());
  EXPECT_EQ(connect_long.error().code(), ErrorCode::kInvalidArgument);
  auto listen_empty = ListenUnix("");
  ASSERT_FALSE(listen_empty.has_value());
  EXPECT_EQ(listen_empty.error().code(), ErrorCode::kInvalidArgument);

  EXPECT_EQ(testutil::ErrorCodeOf(ConnectUnix(dir_ + "/nobody")), ErrorCode::kNotFound);
  EXPECT_EQ(testutil::ErrorCodeOf(ListenUnix(dir_ + "/missing-dir/s")), ErrorCode::kNotFound);
}

TEST_F(UnixSocketTest, PeerGroupsBeyondTheFirstGuessAreAllRead) {
  if (geteuid() != 0) GTEST_SKIP() << "needs root to set supplementary groups";
  const pid_t child = fork();
  if (child == 0) {
    // In a child: 40 supplementary groups, more than the first buffer holds.
    std::vector<gid_t> groups;
    for (gid_t g = 50000; g < 50040; ++g) groups.push_back(g);
    if (setgroups(groups.size(), groups.data()) != 0) _exit(2);
    int sv[2];
    if (socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, sv) != 0) _exit(3);
    auto peer = GetPeerCredentials(sv[0]);
    if (!peer) _exit(4);
    std::vector<gid_t> got = peer->groups;
    std::sort(got.begin(), got.end());
    _exit(got == groups ? 0 : 5);
  }
  ASSERT_GT(child, 0);
  int status = 0;
  ASSERT_EQ(waitpid(child, &status, 0), child);
  ASSERT_TRUE(WIFEXITED(status));
  EXPECT_EQ(WEXITSTATUS(status), 0);
}

TEST_F(UnixSocketTest, PeerCredentialsOfANonSocketFail) {
  UniqueFd fd(open("/dev/null", O_RDONLY | O_CLOEXEC));
  auto creds = GetPeerCredentials(fd.get());
  ASSERT_FALSE(creds.has_value());
  EXPECT_EQ(creds.error().sys_errno(), ENOTSOCK);
}

}  // namespace
}  // namespace guestmem
