#include "guestmem/exitless_ring.h"

#include <fcntl.h>
#include <gtest/gtest.h>
#include <sys/mman.h>
#include <unistd.h>

#include <atomic>
#include <cstring>
#include <set>
#include <thread>
#include <vector>

#include "guestmem/unique_fd.h"

namespace guestmem {
namespace {

// A memfd of four pages stands for a KVM vCPU fd: the ring page is the fourth.
UniqueFd VcpuFd() {
  UniqueFd fd(memfd_create("vcpu", MFD_CLOEXEC | MFD_ALLOW_SEALING));
  EXPECT_EQ(ftruncate(fd.get(), 4 * 4096), 0);
  EXPECT_EQ(fcntl(fd.get(), F_ADD_SEALS, F_SEAL_SHRINK | F_SEAL_GROW), 0);
  return fd;
}

uint32_t WordAt(int fd, size_t offset) {
  uint32_t v = 0;
  EXPECT_EQ(pread(fd, &v, sizeof(v), static_cast<off_t>(kExitlessRingPageOffset + offset)), 4);
  return v;
}

TEST(ExitlessRingTest, TheLayoutIsTheKernelsByteForByte) {
  UniqueFd vcpu = VcpuFd();
  auto kernel = ExitlessRing::Initialize(vcpu.get());
  ASSERT_TRUE(kernel.has_value()) << kernel.error().ToString();
  EXPECT_EQ(WordAt(vcpu.get(), 0), 1u);   // version
  EXPECT_EQ(WordAt(vcpu.get(), 4), 64u);  // ring_size
  EXPECT_EQ(WordAt(vcpu.get(), 8), 16u);  // entry_size
  auto handler = ExitlessRing::Map(vcpu.get());
  ASSERT_TRUE(handler.has_value()) << handler.error().ToString();
  bool signal = false;
  ASSERT_TRUE(kernel->Notify({0x7d000, 0x30}, &signal));
  EXPECT_FALSE(signal);                               // not armed
  EXPECT_EQ(WordAt(vcpu.get(), 64), 1u);              // notify head
  EXPECT_EQ(WordAt(vcpu.get(), 64 + 128), 0x7d000u);  // entry 0's gpa, low word
  EXPECT_EQ(WordAt(vcpu.get(), 64 + 132), 0u);
  EXPECT_EQ(WordAt(vcpu.get(), 64 + 136), 0x30u);  // its flags
  ExitlessEntry got[4];
  auto n = handler->Pending(got);
  ASSERT_TRUE(n.has_value());
  ASSERT_EQ(*n, 1u);
  EXPECT_EQ(got[0].gpa, 0x7d000u);
  EXPECT_EQ(got[0].flags, 0x30u);
  handler->Consume(1);
  EXPECT_EQ(WordAt(vcpu.get(), 64 + 64), 1u);  // notify tail
  ASSERT_TRUE(handler->PushCompletion(0x7d000));
  EXPECT_EQ(WordAt(vcpu.get(), 1216), 1u);              // complete head
  EXPECT_EQ(WordAt(vcpu.get(), 1216 + 128), 0x7d000u);  // its entry's gpa
  EXPECT_EQ(WordAt(vcpu.get(), 1216 + 136), 0u);        // flags 0
  EXPECT_EQ(kernel->TakeCompletions(got), 1u);
  EXPECT_EQ(got[0].gpa, 0x7d000u);
  EXPECT_EQ(WordAt(vcpu.get(), 1216 + 64), 1u);  // complete tail
  // Armed: the next notification signals, once; then the handler must arm again.
  EXPECT_TRUE(handler->Arm());
  EXPECT_EQ(WordAt(vcpu.get(), 12) & kExitlessNotifyArmed, 1u);
  ASSERT_TRUE(kernel->Notify({0x1000, 0x30}, &signal));
  EXPECT_TRUE(signal);
  ASSERT_TRUE(kernel->Notify({0x2000, 0x30}, &signal));
  EXPECT_FALSE(signal);
  // Entries are waiting: arming refuses (and stays disarmed) so that they are drained first.
  EXPECT_FALSE(handler->Arm());
  EXPECT_EQ(WordAt(vcpu.get(), 12) & kExitlessNotifyArmed, 0u);
}

TEST(ExitlessRingTest, AHeaderThatIsNotVersionOneIsRefused) {
  UniqueFd vcpu = VcpuFd();  // all zero: no header
  auto ring = ExitlessRing::Map(vcpu.get());
  ASSERT_FALSE(ring.has_value());
  EXPECT_EQ(ring.error().code(), ErrorCode::kProtocolError);
  // No fourth page to map (it would be a SIGBUS), or a file that could shrink under the mapping.
  UniqueFd small(memfd_create("small", MFD_CLOEXEC));
  ASSERT_EQ(ftruncate(small.get(), 4096), 0);
  ring = ExitlessRing::Map(small.get());
  ASSERT_FALSE(ring.has_value());
  EXPECT_NE(ring.error().ToString().find("ring page ends at byte 16384"), std::string::npos)
      << ring.error().ToString();
  UniqueFd unsealed(memfd_create("unsealed", MFD_CLOEXEC));
  ASSERT_EQ(ftruncate(unsealed.get(), 4 * 4096), 0);
  ASSERT_TRUE(ExitlessRing::Initialize(unsealed.get()).has_value());
  ring = ExitlessRing::Map(unsealed.get());
  ASSERT_FALSE(ring.has_value());
  EXPECT_NE(ring.error().ToString().find("F_SEAL_SHRINK"), std::string::npos);
}

TEST(ExitlessRingTest, FullRingsSayNoIndicesWrapAndAHeadTooFarAheadIsAProtocolError) {
  UniqueFd vcpu = VcpuFd();
  auto kernel = ExitlessRing::Initialize(vcpu.get());
  ASSERT_TRUE(kernel.has_value());
  // Every index just below 2^32, so that the rings wrap.
  const uint32_t near_wrap = 0xfffffff0u;
  for (size_t offset : {64, 128, 1216, 1280}) {
    ASSERT_EQ(
        pwrite(vcpu.get(), &near_wrap, 4, static_cast<off_t>(kExitlessRingPageOffset + offset)), 4);
  }
  auto handler = ExitlessRing::Map(vcpu.get());
  ASSERT_TRUE(handler.has_value());
  bool signal;
  for (uint32_t i = 0; i < 64; ++i) ASSERT_TRUE(kernel->Notify({i * 4096ull, 0x30}, &signal));
  EXPECT_FALSE(kernel->Notify({0, 0x30}, &signal));
  for (uint32_t i = 0; i < 64; ++i) ASSERT_TRUE(handler->PushCompletion(i * 4096ull));
  EXPECT_FALSE(handler->PushCompletion(0));
  ExitlessEntry got[64];
  ASSERT_EQ(*handler->Pending(got), 64u);
  for (uint32_t i = 0; i < 64; ++i) EXPECT_EQ(got[i].gpa, i * 4096ull) << i;
  EXPECT_EQ(handler->notify_tail(), near_wrap);
  handler->Consume(64);
  EXPECT_EQ(handler->notify_tail(), near_wrap + 64);  // wrapped to 0x30
  EXPECT_EQ(kernel->TakeCompletions(got), 64u);
  for (uint32_t i = 0; i < 64; ++i) EXPECT_EQ(got[i].gpa, i * 4096ull) << i;
  ASSERT_TRUE(kernel->Notify({0x5000, 0x30}, &signal));
  ASSERT_EQ(*handler->Pending(got), 1u);
  EXPECT_EQ(got[0].gpa, 0x5000u);
  // A head more than 64 ahead of tail: no kernel wrote that.
  const uint32_t bad_head = near_wrap + 64 + 1000;
  ASSERT_EQ(pwrite(vcpu.get(), &bad_head, 4, static_cast<off_t>(kExitlessRingPageOffset + 64)), 4);
  auto pending = handler->Pending(got);
  ASSERT_FALSE(pending.has_value());
  EXPECT_EQ(pending.error().code(), ErrorCode::kProtocolError);
}

// The kernel's side and the handler's in two threads: every notification is seen once, every
// completion arrives, none is lost to a race between arming and producing.
TEST(ExitlessRingTest, NoNotificationIsLostBetweenArmingAndProducing) {
  UniqueFd vcpu = VcpuFd();
  auto kernel = ExitlessRing::Initialize(vcpu.get());
  auto handler = ExitlessRing::Map(vcpu.get());
  ASSERT_TRUE(kernel.has_value() && handler.has_value());
  constexpr uint64_t kFaults = 5000;
  std::atomic<uint64_t> signals{0};  // stands for the notify eventfd's counter
  std::thread guest([&] {
    uint64_t produced = 0, taken = 0;
    std::set<uint64_t> outstanding;
    ExitlessEntry done[64];
    while (taken < kFaults) {
      bool signal = false;
      if (produced < kFaults && outstanding.size() < 64 &&
          kernel->Notify({produced * 4096, 0x30}, &signal)) {
        outstanding.insert(produced * 4096);
        ++produced;
        if (signal) signals.fetch_add(1);
      }
      const size_t n = kernel->TakeCompletions(done);
      for (size_t i = 0; i < n; ++i) ASSERT_EQ(outstanding.erase(done[i].gpa), 1u);
      taken += n;
    }
  });
  uint64_t seen = 0;
  uint64_t next = 0;
  ExitlessEntry got[16];
  while (seen < kFaults) {
    // Sleep only when armed with nothing waiting, until signalled.
    if (handler->Arm()) {
      while (signals.load() == 0) std::this_thread::yield();
      signals.fetch_sub(1);
    }
    auto n = handler->Pending(got);
    ASSERT_TRUE(n.has_value());
    for (size_t i = 0; i < *n; ++i) {
      ASSERT_EQ(got[i].gpa, next * 4096);
      ++next;
      while (!handler->PushCompletion(got[i].gpa)) std::this_thread::yield();
    }
    handler->Consume(static_cast<uint32_t>(*n));
    seen += *n;
  }
  guest.join();
  EXPECT_EQ(next, kFaults);
}

}  // namespace
}  // namespace guestmem
