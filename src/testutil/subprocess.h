// Subprocess: runs a program as a child process for end-to-end tests, with its output captured
// to a file, and waits for it with a deadline (a test never hangs on a child).
#ifndef GUESTMEM_TESTUTIL_SUBPROCESS_H_
#define GUESTMEM_TESTUTIL_SUBPROCESS_H_

#include <fcntl.h>
#include <signal.h>
#include <sys/wait.h>
#include <unistd.h>

#include <chrono>
#include <fstream>
#include <optional>
#include <sstream>
#include <string>
#include <thread>
#include <vector>

namespace guestmem::testutil {

// The whole content of the file at `path` ("" if it cannot be read).
inline std::string ReadFile(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  std::stringstream ss;
  ss << in.rdbuf();
  return ss.str();
}

class Subprocess {
 public:
  // Starts `argv` with stdout and stderr both appended to `log_path`.
  Subprocess(std::vector<std::string> argv, std::string log_path) : log_path_(std::move(log_path)) {
    pid_ = fork();
    if (pid_ == 0) {
      int fd = open(log_path_.c_str(), O_WRONLY | O_CREAT | O_APPEND | O_CLOEXEC, 0644);
      dup2(fd, STDOUT_FILENO);
      dup2(fd, STDERR_FILENO);
      std::vector<char*> args;
      for (auto& a : argv) args.push_back(a.data());
      args.push_back(nullptr);
      execv(args[0], args.data());
      _exit(127);
    }
  }
  Subprocess(const Subprocess&) = delete;
  Subprocess& operator=(const Subprocess&) = delete;
  ~Subprocess() {
    if (!exited_) {
      kill(pid_, SIGKILL);
      Wait(std::chrono::seconds(10));
    }
  }

  pid_t pid() const { return pid_; }

  // The wait status, or std::nullopt if still running at the deadline.
  std::optional<int> Wait(std::chrono::milliseconds timeout) {
    if (exited_) return status_;
    const auto deadline = std::chrono::steady_clock::now() + timeout;
    while (true) {
      int status = 0;
      pid_t r = waitpid(pid_, &status, WNOHANG);
      if (r == pid_) {
        exited_ = true;
        status_ = status;
        return status;
      }
      if (std::chrono::steady_clock::now() >= deadline) return std::nullopt;
      std::this_thread::sleep_for(std::chrono::milliseconds(5));
    }
  }

  // Exit code if it exited normally, -signal if killed, 999 if still running at the deadline.
  int ExitCode(std::chrono::milliseconds timeout = std::chrono::seconds(60)) {
    auto status = Wait(timeout);
    if (!status) return 999;
    if (WIFEXITED(*status)) return WEXITSTATUS(*status);
    return -WTERMSIG(*status);
  }

  void Signal(int sig) { kill(pid_, sig); }

  std::string Output() const { return ReadFile(log_path_); }

  // Waits until the output contains `text`; false at the deadline.
  bool WaitForOutput(const std::string& text,
                     std::chrono::milliseconds timeout = std::chrono::seconds(20)) const {
    const auto deadline = std::chrono::steady_clock::now() + timeout;
    while (std::chrono::steady_clock::now() < deadline) {
      if (Output().find(text) != std::string::npos) return true;
      std::this_thread::sleep_for(std::chrono::milliseconds(10));
    }
    return false;
  }

  // The first line of the output that contains every one of `fragments`, or "" if none does.
  std::string FindLine(const std::vector<std::string>& fragments) const {
    std::istringstream lines(Output());
    for (std::string line; std::getline(lines, line);) {
      bool all = true;
      for (const std::string& f : fragments) all = all && line.find(f) != std::string::npos;
      if (all) return line;
    }
    return "";
  }

  // Waits until one line of the output contains every one of `fragments`; returns that line, or
  // "" at the deadline.
  std::string WaitForLine(const std::vector<std::string>& fragments,
                          std::chrono::milliseconds timeout = std::chrono::seconds(20)) const {
    return WaitForAnyLine({fragments}, timeout);
  }
  // The first line that holds every fragment of one of `alternatives`, waiting for it up to
  // `timeout`; "" at the deadline.
  std::string WaitForAnyLine(const std::vector<std::vector<std::string>>& alternatives,
                             std::chrono::milliseconds timeout = std::chrono::seconds(20)) const {
    const auto deadline = std::chrono::steady_clock::now() + timeout;
    while (true) {
      for (const std::vector<std::string>& fragments : alternatives) {
        if (std::string line = FindLine(fragments); !line.empty()) return line;
      }
      if (std::chrono::steady_clock::now() >= deadline) return "";
      std::this_thread::sleep_for(std::chrono::milliseconds(10));
    }
  }

 private:
  std::string log_path_;
  pid_t pid_ = -1;
  bool exited_ = false;
  int status_ = 0;
};

}  // namespace guestmem::testutil

#endif  // GUESTMEM_TESTUTIL_SUBPROCESS_H_
