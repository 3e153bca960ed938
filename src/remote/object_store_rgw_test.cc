// ObjectStore against a real S3 store: a single-node Ceph RGW on 127.0.0.1, signed with SigV4.
//
// The RGW is shared by every test of the run: ctest's fixture remote.rgw_up starts it
// (tests/remote/rgw_fixture.sh) and writes GUESTMEM_RGW_DIR/s3.env, or GUESTMEM_RGW_DIR/skip-reason
// when it could not, and these tests skip with that reason. Run by hand, the program takes the
// store from S3_ENDPOINT, S3_ACCESS_KEY, S3_SECRET_KEY (and S3_REGION) when they are set.
#include <gmock/gmock.h>
#include <gtest/gtest.h>
#include <stdlib.h>

#include <algorithm>
#include <fstream>
#include <map>
#include <random>
#include <sstream>
#include <thread>

#include "guestmem/object_store.h"
#include "testutil/object_reads.h"
#include "testutil/rgw_env.h"
#include "testutil/subprocess.h"

namespace guestmem {
namespace {

using ::testing::AllOf;
using ::testing::HasSubstr;
using Clock = std::chrono::steady_clock;
using testutil::Pattern;
using testutil::S3Env;

constexpr const char* kBucket = "guestmem-objstore-test";

ObjectUrl Url(const std::string& key) { return ObjectUrl{ObjectUrl::Scheme::kS3, kBucket, key}; }

class RgwTest : public ::testing::Test {
 protected:
  static constexpr size_t kSize = 1024 * 1024 + 4099;

  void SetUp() override {
    Result<S3Env> env =
        testutil::FindRgw(GUESTMEM_RGW_DIR, "start one with " GUESTMEM_RGW_FIXTURE
                                            " up " GUESTMEM_RGW_DIR " " GUESTMEM_RGW_TOOLS);
    if (!env) GTEST_SKIP() << env.error().context();
    env_ = *env;
    store_ = Store();
    ASSERT_NE(store_, nullptr);
    Status created = store_->CreateBucket(Url(""));
    ASSERT_TRUE(created.has_value()) << created.error().ToString();
    content_ = Pattern(kSize, 11);
    object_ =
        Url("objects/" +
            std::string(::testing::UnitTest::GetInstance()->current_test_info()->name()) + ".bin");
    Status put = store_->Put(object_, content_);
    ASSERT_TRUE(put.has_value()) << put.error().ToString();
  }

  ObjectStoreOptions Options() const {
    ObjectStoreOptions options;
    options.endpoint = env_.endpoint;
    options.region = env_.region;
    options.access_key_id = env_.access_key;
    options.secret_access_key = env_.secret_key;
    options.backoff_base = std::chrono::milliseconds(5);
    return options;
  }

  std::unique_ptr<ObjectStore> Store(std::optional<ObjectStoreOptions> options = std::nullopt) {
    auto store = ObjectStore::Create(options ? *std::move(options) : Options());
    EXPECT_TRUE(store.has_value()) << store.error().ToString();
    return store ? std::move(store).value() : nullptr;
  }

  // Reads [offset, offset + size) of object_ and checks it; "" when it matched.
  std::string ReadAndCompare(const ObjectStore& store, uint64_t offset, size_t size) const {
    return testutil::ReadAndCompare(store, object_, content_, offset, size);
  }

  S3Env env_;
  std::unique_ptr<ObjectStore> store_;
  std::vector<std::byte> content_;
  ObjectUrl object_;
};

TEST_F(RgwTest, SizeAndExists) {
  Result<uint64_t> size = store_->Size(object_);
  ASSERT_TRUE(size.has_value()) << size.error().ToString();
  EXPECT_EQ(*size, kSize);
  EXPECT_EQ(store_->Exists(object_).value_or(false), true);
  Result<bool> missing = store_->Exists(Url("objects/never-written"));
  ASSERT_TRUE(missing.has_value()) << missing.error().ToString();
  EXPECT_FALSE(*missing);
}

TEST_F(RgwTest, ReadRangeIsByteExact) {
  const struct {
    uint64_t offset;
    size_t size;
  } ranges[] = {{0, 1},
                {0, 4096},
                {1, 4095},
                {4096, 262144},
                {777777, 12345},
                {kSize - 1, 1},
                {kSize - 5000, 5000},
                {0, kSize}};
  for (const auto& r : ranges) {
    EXPECT_EQ(ReadAndCompare(*store_, r.offset, r.size), "") << r.offset << "+" << r.size;
  }
}

TEST_F(RgwTest, ReadWholeIsBoundedBySize) {
  Result<std::vector<std::byte>> whole = store_->ReadWhole(object_, kSize);
  ASSERT_TRUE(whole.has_value()) << whole.error().ToString();
  EXPECT_TRUE(*whole == content_);
  whole = store_->ReadWhole(object_, 4096);
  ASSERT_FALSE(whole.has_value());
  EXPECT_EQ(whole.error().code(), ErrorCode::kOutOfRange);
  EXPECT_THAT(whole.error().context(), HasSubstr("has " + std::to_string(kSize) + " bytes"));
}

TEST_F(RgwTest, RangesPastTheEndAreOutOfRange) {
  std::vector<std::byte> out(100);
  Status read = store_->ReadRange(object_, kSize, out);  // starts past the end: 416
  ASSERT_FALSE(read.has_value());
  EXPECT_EQ(read.error().code(), ErrorCode::kOutOfRange);
  EXPECT_THAT(read.error().context(), AllOf(HasSubstr(object_.ToString()), HasSubstr("HTTP 416")));
  std::cout << "416: " << read.error().ToString() << "\n";
  read = store_->ReadRange(object_, kSize - 10, out);  // runs past it: 206 with 10 bytes
  ASSERT_FALSE(read.has_value());
  EXPECT_EQ(read.error().code(), ErrorCode::kOutOfRange);
  EXPECT_THAT(read.error().context(), HasSubstr("the object has " + std::to_string(kSize)));
  std::cout << "past the end: " << read.error().ToString() << "\n";
}

TEST_F(RgwTest, MissingKeyAndBucketAreNotFound) {
  std::vector<std::byte> out(100);
  const ObjectUrl missing = Url("objects/never-written");
  Status read = store_->ReadRange(missing, 0, out);
  ASSERT_FALSE(read.has_value());
  EXPECT_EQ(read.error().code(), ErrorCode::kNotFound);
  EXPECT_THAT(read.error().context(), AllOf(HasSubstr("GET " + missing.ToString() + " bytes 0-99"),
                                            HasSubstr("HTTP 404"), HasSubstr("NoSuchKey")));
  std::cout << "missing key: " << read.error().ToString() << "\n";
  Result<uint64_t> size = store_->Size(missing);
  ASSERT_FALSE(size.has_value());
  EXPECT_EQ(size.error().code(), ErrorCode::kNotFound);
  // A HEAD's answer has no body: the cause comes from a GET of one byte.
  EXPECT_THAT(size.error().context(), AllOf(HasSubstr("HTTP 404"), HasSubstr("NoSuchKey")));

  const ObjectUrl no_bucket{ObjectUrl::Scheme::kS3, "guestmem-no-such-bucket", "key"};
  read = store_->ReadRange(no_bucket, 0, out);
  ASSERT_FALSE(read.has_value());
  EXPECT_EQ(read.error().code(), ErrorCode::kNotFound);
  EXPECT_THAT(read.error().context(), HasSubstr("NoSuchBucket"));
  EXPECT_EQ(store_->counters().retries, 0u);
}

TEST_F(RgwTest, WrongSecretIsPermissionDenied) {
  ObjectStoreOptions options = Options();
  options.secret_access_key = "not-the-secret";
  auto store = Store(options);
  std::vector<std::byte> out(100);
  Status read = store->ReadRange(object_, 0, out);
  ASSERT_FALSE(read.has_value());
  EXPECT_EQ(read.error().code(), ErrorCode::kPermissionDenied);
  EXPECT_THAT(read.error().context(),
              AllOf(HasSubstr(object_.ToString()), HasSubstr("SignatureDoesNotMatch")));
  std::cout << "wrong secret: " << read.error().ToString() << "\n";
  Status put = store->Put(object_, content_);
  ASSERT_FALSE(put.has_value());
  EXPECT_EQ(put.error().code(), ErrorCode::kPermissionDenied);
  // A HEAD, refused, then a GET of one byte for the cause: two requests failed.
  Result<uint64_t> size = store->Size(object_);
  ASSERT_FALSE(size.has_value());
  EXPECT_EQ(size.error().code(), ErrorCode::kPermissionDenied);
  EXPECT_THAT(size.error().context(),
              AllOf(HasSubstr("HTTP 403"), HasSubstr("SignatureDoesNotMatch")));
  EXPECT_EQ(store->counters().retries, 0u);
  EXPECT_EQ(store->counters().failures, 4u);
}

TEST_F(RgwTest, WrongKeyIdIsPermissionDenied) {
  ObjectStoreOptions options = Options();
  options.access_key_id = "NOSUCHACCESSKEY00000";
  auto store = Store(options);
  std::vector<std::byte> out(100);
  Status read = store->ReadRange(object_, 0, out);
  ASSERT_FALSE(read.has_value());
  EXPECT_EQ(read.error().code(), ErrorCode::kPermissionDenied);
  EXPECT_THAT(read.error().context(), HasSubstr("InvalidAccessKeyId"));
  std::cout << "wrong key id: " << read.error().ToString() << "\n";
}

TEST_F(RgwTest, PutOverwritesAndKeepsEveryKindOfKey) {
  // Keys whose bytes must be percent-encoded, and signed as encoded.
  for (const std::string key : {"odd keys/with space+plus=equals&amp~tilde,comma;semi",
                                "odd keys/percent%41?question*star'quote",
                                "odd keys/\xc3\xa9t\xc3\xa9", "odd keys/trailing/"}) {
    const std::vector<std::byte> content = Pattern(1000 + key.size(), 3);
    Status put = store_->Put(Url(key), content);
    ASSERT_TRUE(put.has_value()) << put.error().ToString();
    Result<std::vector<std::byte>> back = store_->ReadWhole(Url(key), 1 << 20);
    ASSERT_TRUE(back.has_value()) << back.error().ToString();
    EXPECT_TRUE(*back == content) << key;
  }
  const std::vector<std::byte> second = Pattern(5000, 99);
  ASSERT_TRUE(store_->Put(object_, second).has_value());
  EXPECT_EQ(store_->Size(object_).value_or(0), second.size());
  std::vector<std::byte> out(10);
  ASSERT_TRUE(store_->ReadRange(object_, 4990, out).has_value());
  EXPECT_TRUE(std::equal(out.begin(), out.end(), second.end() - 10));
}

TEST_F(RgwTest, EmptyObject) {
  const ObjectUrl empty = Url("objects/empty");
  ASSERT_TRUE(store_->Put(empty, {}).has_value());
  EXPECT_EQ(store_->Size(empty).value_or(1), 0u);
  Result<std::vector<std::byte>> whole = store_->ReadWhole(empty, 100);
  ASSERT_TRUE(whole.has_value()) << whole.error().ToString();
  EXPECT_TRUE(whole->empty());
  EXPECT_TRUE(store_->ReadRange(empty, 0, {}).has_value());
  std::vector<std::byte> out(1);
  EXPECT_EQ(store_->ReadRange(empty, 0, out).error().code(), ErrorCode::kOutOfRange);
}

TEST_F(RgwTest, CreateBucketTwiceIsSuccess) {
  Status again = store_->CreateBucket(Url("ignored-key"));
  EXPECT_TRUE(again.has_value()) << again.error().ToString();
}

TEST_F(RgwTest, ManyThreadsReadAtOnce) {
  ObjectStoreOptions options = Options();
  options.max_connections = 4;
  auto store = Store(options);
  constexpr int kThreads = 8, kReads = 20;
  const std::vector<std::string> failures =
      testutil::ReadFromThreads(*store, object_, content_, kThreads, kReads, 100000);
  for (int t = 0; t < kThreads; ++t) EXPECT_EQ(failures[t], "") << "thread " << t;
  EXPECT_EQ(store->counters().requests, static_cast<uint64_t>(kThreads * kReads));
  EXPECT_EQ(store->counters().failures, 0u);
}

TEST_F(RgwTest, CountersCountRequestsAndBytes) {
  auto store = Store();
  const std::vector<std::byte> content = Pattern(12345, 5);
  ASSERT_TRUE(store->Put(Url("objects/counted"), content).has_value());
  std::vector<std::byte> out(1000);
  ASSERT_TRUE(store->ReadRange(Url("objects/counted"), 10, out).has_value());
  ASSERT_TRUE(store->Size(Url("objects/counted")).has_value());
  EXPECT_FALSE(store->ReadRange(Url("objects/not-there"), 0, out).has_value());
  const ObjectStore::Counters counters = store->counters();
  EXPECT_EQ(counters.requests, 4u);
  EXPECT_EQ(counters.retries, 0u);
  EXPECT_EQ(counters.failures, 1u);
  EXPECT_EQ(counters.bytes_sent, content.size());
  EXPECT_EQ(counters.bytes_received, out.size());
}

// How long ranged GETs take on a reused connection: reported, not asserted (it depends on the
// machine).
TEST_F(RgwTest, RangedReadLatency) {
  auto store = Store();
  for (const size_t size : {size_t{64} << 10, size_t{256} << 10}) {
    std::vector<std::byte> out(size);
    ASSERT_TRUE(store->ReadRange(object_, 0, out).has_value());  // the connection is made
    std::vector<double> ms;
    std::mt19937 random(1);
    for (int i = 0; i < 50; ++i) {
      const uint64_t offset = random() % (kSize - size);
      const auto start = Clock::now();
      Status read = store->ReadRange(object_, offset, out);
      ms.push_back(std::chrono::duration<double, std::milli>(Clock::now() - start).count());
      ASSERT_TRUE(read.has_value()) << read.error().ToString();
    }
    std::sort(ms.begin(), ms.end());
    std::ostringstream line;
    line.precision(3);
    line << (size >> 10) << " KiB ranged GET, reused connection, 50 reads: p50 "
         << ms[ms.size() / 2] << " ms, p90 " << ms[ms.size() * 9 / 10] << " ms, max " << ms.back()
         << " ms";
    std::cout << line.str() << "\n";
    RecordProperty("latency_" + std::to_string(size >> 10) + "k", line.str());
  }
}

}  // namespace
}  // namespace guestmem
