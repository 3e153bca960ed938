// End-to-end: `gmem serve`'s options, through the real binary. A bad option fails at start, with
// a message naming it and an exit code other than 0, before the socket exists; nothing is left
// to fail later, VM after VM.
#include <gtest/gtest.h>
#include <sys/stat.h>
#include <sys/wait.h>

#include <filesystem>
#include <fstream>
#include <string>
#include <vector>

#include "serve_fixture.h"

namespace guestmem::e2e {
namespace {

using ServeCliTest = ServeTest;

// Runs `gmem serve` with `args` and expects it to exit by itself, soon, with a non-zero code and
// `fragment` in its output.
void ExpectRefusedAtStart(const std::string& dir, const std::string& socket,
                          const std::string& mem_file, const std::vector<std::string>& args,
                          const std::string& fragment) {
  std::string shown;
  for (const std::string& a : args) shown += " " + a;
  SCOPED_TRACE("gmem serve" + shown);
  std::vector<std::string> argv = {GMEM_BINARY, "serve", socket, mem_file};
  argv.insert(argv.end(), args.begin(), args.end());
  static int run = 0;
  Subprocess serve(argv, dir + "/refused-" + std::to_string(++run) + ".log");
  const std::optional<int> status = serve.Wait(20s);
  ASSERT_TRUE(status.has_value()) << "still running:\n" << serve.Output();
  ASSERT_TRUE(WIFEXITED(*status)) << "killed by signal " << WTERMSIG(*status) << ":\n"
                                  << serve.Output();
  EXPECT_NE(WEXITSTATUS(*status), 0) << serve.Output();
  EXPECT_NE(serve.Output().find(fragment), std::string::npos) << "wanted '" << fragment << "' in:\n"
                                                              << serve.Output();
  EXPECT_FALSE(std::filesystem::exists(socket)) << "the socket was created";
}

// Regression: --socket-mode abc aborted (std::stoul threw), 0668 gave 0066, a uid of 2^32
// wrapped to 0 (root), fault-around sizes the handler refuses and a zero handshake timeout
// started a daemon that then rejected every VM. Fill rates out of range, and a background fill
// with fault-all (which fills everything already), are refused as well.
TEST_F(ServeCliTest, BadOptionsFailAtStartWithAClearMessage) {
  const std::string mem = snapshot_->path();
  struct Case {
    std::vector<std::string> args;
    std::string fragment;
  };
  const std::vector<Case> cases = {
      {{"--socket-mode", "abc"}, "--socket-mode"},
      {{"--socket-mode", "0668"}, "--socket-mode"},
      {{"--socket-mode", "17777"}, "--socket-mode"},
      {{"--socket-mode", ""}, "--socket-mode"},
      {{"--socket-owner", "4294967296"}, "--socket-owner"},
      {{"--socket-owner", "4294967295"}, "--socket-owner"},
      {{"--socket-owner=-1"}, "--socket-owner"},
      {{"--socket-owner", "root"}, "--socket-owner"},
      {{"--socket-group", "99999999999"}, "--socket-group"},
      {{"--allow-uid", "4294967296"}, "--allow-uid"},
      {{"--allow-gid", "x"}, "--allow-gid"},
      {{"--fault-around-kib", "3"}, "--fault-around-kib"},
      {{"--fault-around-kib", "0"}, "--fault-around-kib"},
      {{"--fault-around-kib", "4194304"}, "--fault-around-kib"},
      {{"--fault-around-kib", "2"}, "--fault-around-kib"},
      {{"--handshake-timeout-ms", "0"}, "--handshake-timeout-ms"},
      {{"--max-pending-handshakes", "0"}, "--max-pending-handshakes"},
      {{"--max-active-vms", "0"}, "--max-active-vms"},
      {{"--workers", "100000"}, "--workers"},
      {{"--chunk-cache-mib", "0"}, "--chunk-cache-mib"},
      {{"--chunk-cache-mib", "99999999999999999999"}, "--chunk-cache-mib"},
      {{"--chunk-cache-mib", "1G"}, "--chunk-cache-mib"},
      {{"--fill", "everything"}, "--fill"},
      {{"--fill", "background", "--mode", "fault-all"}, "--mode fault-all"},
      {{"--fill-rate-mib", "0"}, "--fill-rate-mib"},
      {{"--fill-rate-mib", "1048577"}, "--fill-rate-mib"},
      {{"--fill-rate-mib", "-1"}, "--fill-rate-mib"},
      {{"--fill-rate-mib", "64M"}, "--fill-rate-mib"},
      {{"--fill-rate-mib", "99999999999999999999999"}, "--fill-rate-mib"},
  };
  for (const Case& c : cases) ExpectRefusedAtStart(dir_, socket_, mem, c.args, c.fragment);
}

// Regression: a FIFO as the memory file blocked start-up forever in open(2).
TEST_F(ServeCliTest, AMemoryFileThatIsNotARegularFileOrBlockDeviceIsRefusedAtOnce) {
  const std::string fifo = dir_ + "/memory.fifo";
  ASSERT_EQ(mkfifo(fifo.c_str(), 0600), 0);
  ExpectRefusedAtStart(dir_, socket_, fifo, {}, "not a regular file or a block device");
  ExpectRefusedAtStart(dir_, socket_, "/dev/zero", {}, "not a regular file or a block device");
  ExpectRefusedAtStart(dir_, socket_, dir_ + "/missing", {}, "missing");
}

TEST_F(ServeCliTest, APackedSnapshotThatIsNotWholeIsRefusedAtStartWithWhatIsWrong) {
  // The packed magic and version, then nothing a packed snapshot holds.
  const std::string torn = dir_ + "/torn.gmp";
  {
    std::ofstream out(torn, std::ios::binary);
    out << "GMEMPACK" << std::string("\x01\x00\x00\x00", 4) << std::string(300, '\x01');
  }
  ExpectRefusedAtStart(dir_, socket_, torn, {}, "header checksum mismatch");
  // Another version is named as such.
  {
    std::ofstream out(torn, std::ios::binary | std::ios::trunc);
    out << "GMEMPACK" << std::string("\x09\x00\x00\x00", 4) << std::string(300, '\x01');
  }
  ExpectRefusedAtStart(dir_, socket_, torn, {}, "format version 9 (this gmem reads version 1)");
}

TEST_F(ServeCliTest, GoodOptionsAreTakenAsWritten) {
  // Octal with or without its leading 0; the largest fault-around; a uid given as a number.
  StartServer({"--socket-mode", "660", "--fault-around-kib", "1048576", "--socket-owner",
               std::to_string(getuid()), "--handshake-timeout-ms", "1"});
  struct stat st {};
  ASSERT_EQ(stat(socket_.c_str(), &st), 0);
  EXPECT_EQ(st.st_mode & 07777, 0660u);
  EXPECT_NE(server_->Output().find("1048576 KiB fault-around"), std::string::npos)
      << server_->Output();
  server_.reset();
  std::filesystem::remove(socket_);
  StartServer({"--socket-mode", "0640", "--fault-around-kib", "4"});
  ASSERT_EQ(stat(socket_.c_str(), &st), 0);
  EXPECT_EQ(st.st_mode & 07777, 0640u);
  ExpectVmVerifies({"--workload", "random", "--threads", "2", "--verify"});
}

}  // namespace
}  // namespace guestmem::e2e
