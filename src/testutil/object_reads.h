// Helpers for tests of ObjectStore (object_store.h): content to put in an object, and ranged reads
// of it checked byte for byte, from one thread or from many at once.
//
// Thread safety: ReadAndCompare may be called from many threads; the rest are for one.
#ifndef GUESTMEM_TESTUTIL_OBJECT_READS_H_
#define GUESTMEM_TESTUTIL_OBJECT_READS_H_

#include <algorithm>
#include <barrier>
#include <cstddef>
#include <cstdint>
#include <random>
#include <span>
#include <string>
#include <thread>
#include <vector>

#include "guestmem/object_store.h"

namespace guestmem::testutil {

// `size` bytes, the same for the same seed.
inline std::vector<std::byte> Pattern(size_t size, uint32_t seed) {
  std::mt19937 random(seed);
  std::vector<std::byte> bytes(size);
  for (std::byte& b : bytes) b = static_cast<std::byte>(random());
  return bytes;
}

// Reads [offset, offset + size) of `url`, whose content is `content`, and checks it; "" when it
// matched, else what went wrong.
inline std::string ReadAndCompare(const ObjectStore& store, const ObjectUrl& url,
                                  std::span<const std::byte> content, uint64_t offset,
                                  size_t size) {
  std::vector<std::byte> out(size);
  Status read = store.ReadRange(url, offset, out);
  if (!read) return read.error().ToString();
  if (!std::equal(out.begin(), out.end(), content.begin() + static_cast<ptrdiff_t>(offset))) {
    return "bytes differ at " + std::to_string(offset) + "+" + std::to_string(size);
  }
  return "";
}

// `threads` threads, started together, each making `reads` reads of 1 to `max_size` bytes at
// random offsets of `url` (seeded by the thread's number), each checked as above. What went wrong
// in each thread (its first failure), "" for a thread whose reads all matched.
inline std::vector<std::string> ReadFromThreads(const ObjectStore& store, const ObjectUrl& url,
                                                std::span<const std::byte> content, int threads,
                                                int reads, size_t max_size) {
  std::barrier start(threads);
  std::vector<std::string> failures(static_cast<size_t>(threads));
  std::vector<std::thread> running;
  for (int t = 0; t < threads; ++t) {
    running.emplace_back([&, t] {
      std::mt19937 random(static_cast<uint32_t>(t));
      std::string& failure = failures[static_cast<size_t>(t)];
      start.arrive_and_wait();
      for (int i = 0; i < reads && failure.empty(); ++i) {
        const size_t size = 1 + random() % max_size;
        const uint64_t offset = random() % (content.size() - size);
        failure = ReadAndCompare(store, url, content, offset, size);
      }
    });
  }
  for (std::thread& thread : running) thread.join();
  return failures;
}

}  // namespace guestmem::testutil

#endif  // GUESTMEM_TESTUTIL_OBJECT_READS_H_
