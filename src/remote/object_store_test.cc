// ObjectUrl, ObjectStoreOptions, and ObjectStore over plain HTTP: against a real nginx, and
// through a FaultProxy in front of it that answers 503, stalls or drops connections.
#include "guestmem/object_store.h"

#include <gmock/gmock.h>
#include <gtest/gtest.h>
#include <netinet/in.h>
#include <stdlib.h>
#include <sys/socket.h>

#include <filesystem>
#include <fstream>
#include <random>
#include <thread>

#include "base/temp_dir.h"
#include "remote/body_sink.h"
#include "testutil/fault_proxy.h"
#include "testutil/nginx_server.h"
#include "testutil/object_reads.h"

namespace guestmem {
namespace {

using std::chrono::milliseconds;
using std::chrono::seconds;
using ::testing::AllOf;
using ::testing::HasSubstr;
using Clock = std::chrono::steady_clock;

ObjectUrl MustParse(std::string_view text) {
  Result<ObjectUrl> url = ObjectUrl::Parse(text);
  EXPECT_TRUE(url.has_value()) << text << ": " << url.error().ToString();
  return url.value_or(ObjectUrl{});
}

// ------------------------------------------------------------------------------------------------
// ObjectUrl

TEST(ObjectUrlTest, ParsesS3Urls) {
  const ObjectUrl url = MustParse("s3://my-bucket.v2/dir/sub/snapshot.mem");
  EXPECT_EQ(url.scheme, ObjectUrl::Scheme::kS3);
  EXPECT_EQ(url.authority, "my-bucket.v2");
  EXPECT_EQ(url.path, "dir/sub/snapshot.mem");
  // Keys may hold what S3 allows in a key, '?' and spaces included.
  EXPECT_EQ(MustParse("s3://abc/a b?c=d&e+f").path, "a b?c=d&e+f");
  EXPECT_EQ(MustParse("s3://abc/dir/").path, "dir/");
}

TEST(ObjectUrlTest, ParsesHttpUrls) {
  ObjectUrl url = MustParse("http://127.0.0.1:8080/snapshots/vm.mem");
  EXPECT_EQ(url.scheme, ObjectUrl::Scheme::kHttp);
  EXPECT_EQ(url.authority, "127.0.0.1:8080");
  EXPECT_EQ(url.path, "snapshots/vm.mem");
  url = MustParse("https://Example.COM/x");
  EXPECT_EQ(url.scheme, ObjectUrl::Scheme::kHttps);
  EXPECT_EQ(url.authority, "Example.COM");
  url = MustParse("http://[::1]:9000/a/b");
  EXPECT_EQ(url.authority, "[::1]:9000");
  EXPECT_EQ(url.path, "a/b");
}

TEST(ObjectUrlTest, NamesOnlyObjectUrls) {
  EXPECT_TRUE(ObjectUrl::Names("s3://b/k"));
  EXPECT_TRUE(ObjectUrl::Names("http://h/p"));
  EXPECT_TRUE(ObjectUrl::Names("https://h/p"));
  EXPECT_TRUE(ObjectUrl::Names("s3://"));  // names one, if a bad one: Parse says why
  EXPECT_FALSE(ObjectUrl::Names("/var/lib/snapshot.mem"));
  EXPECT_FALSE(ObjectUrl::Names("snapshot.mem"));
  EXPECT_FALSE(ObjectUrl::Names("ftp://h/p"));
  EXPECT_FALSE(ObjectUrl::Names("s3:/b/k"));
}

TEST(ObjectUrlTest, RefusesWhatIsNotAnObjectSayingWhy) {
  const std::string long_bucket(64, 'a');
  const std::string long_key(1025, 'k');
  const struct {
    std::string text;
    std::string why;
  } cases[] = {
      {"s3://", "no bucket"},
      {"s3:///key", "no bucket"},
      {"s3://bucket", "no key"},
      {"s3://bucket/", "no key"},
      {"s3://ab/key", "3 to 63"},
      {"s3://" + long_bucket + "/key", "3 to 63"},
      {"s3://My-Bucket/key", "lowercase"},
      {"s3://my_bucket/key", "lowercase"},
      {"s3://-bucket/key", "starts and ends"},
      {"s3://bucket-/key", "starts and ends"},
      {"s3://a..b/key", "two '.'"},
      {"s3://192.168.10.1/key", "IP address"},
      {"s3://bucket/" + long_key, "1024"},
      {"s3://bucket/a\nb", "control characters"},
      {"s3://bucket/a\x7f", "control characters"},
      {"s3://bucket/a/../b", "segment"},
      {"s3://bucket/./b", "segment"},
      {"s3://bucket/..", "segment"},
      {"ftp://host/file", "scheme \"ftp\""},
      {"snapshot.mem", "not a URL"},
      {"http://", "no host"},
      {"http:///file", "no host"},
      {"http://host", "no path"},
      {"http://host/", "no path"},
      {"http://:80/file", "no host"},
      {"http://host:0/file", "port"},
      {"http://host:65536/file", "port"},
      {"http://host:http/file", "port"},
      {"http://host:/file", "port"},
      {"http://user:pw@host/file", "credentials"},
      {"http://ho st/file", "host name"},
      {"http://[::1/file", "']'"},
      {"http://host/file?x=1", "queries"},
      {"https://host/file#part", "queries"},
  };
  for (const auto& c : cases) {
    Result<ObjectUrl> url = ObjectUrl::Parse(c.text);
    ASSERT_FALSE(url.has_value()) << c.text;
    EXPECT_EQ(url.error().code(), ErrorCode::kInvalidArgument) << c.text;
    EXPECT_THAT(url.error().context(), HasSubstr(c.why)) << c.text;
  }
  // The message names the URL, control characters shown escaped.
  EXPECT_THAT(ObjectUrl::Parse("s3://bucket/a\nb").error().context(),
              HasSubstr("\"s3://bucket/a\\x0ab\""));
}

TEST(ObjectUrlTest, ToStringRoundTrips) {
  for (const char* text : {"s3://bucket/key", "s3://abc/dir/sub/x.bin", "http://h:1/p/q",
                           "https://example.com/a b", "http://[::1]:9000/x"}) {
    const ObjectUrl url = MustParse(text);
    EXPECT_EQ(url.ToString(), text);
    EXPECT_EQ(MustParse(url.ToString()), url);
  }
}

TEST(ObjectUrlTest, ResolvesAsAFileSystemDoes) {
  const ObjectUrl base = MustParse("s3://bucket/a/b/index.json");
  EXPECT_EQ(base.Resolve("chunk.bin"), MustParse("s3://bucket/a/b/chunk.bin"));
  EXPECT_EQ(base.Resolve("./chunk.bin"), MustParse("s3://bucket/a/b/chunk.bin"));
  EXPECT_EQ(base.Resolve("c/chunk.bin"), MustParse("s3://bucket/a/b/c/chunk.bin"));
  EXPECT_EQ(base.Resolve("../chunk.bin"), MustParse("s3://bucket/a/chunk.bin"));
  EXPECT_EQ(base.Resolve("../../chunk.bin"), MustParse("s3://bucket/chunk.bin"));
  EXPECT_EQ(base.Resolve("../../../../chunk.bin"), MustParse("s3://bucket/chunk.bin"));
  EXPECT_EQ(base.Resolve("c/../d//chunk.bin"), MustParse("s3://bucket/a/b/d/chunk.bin"));
  EXPECT_EQ(base.Resolve("/top.bin"), MustParse("s3://bucket/top.bin"));
  EXPECT_EQ(base.Resolve("/x/../y/z"), MustParse("s3://bucket/y/z"));
  EXPECT_EQ(base.Resolve("sub/").path, "a/b/sub/");
  EXPECT_EQ(base.Resolve("..").path, "a/");
  // From an object at the bucket's root.
  EXPECT_EQ(MustParse("s3://bucket/index").Resolve("chunk"), MustParse("s3://bucket/chunk"));
  // The scheme and the server stay.
  EXPECT_EQ(MustParse("http://h:8080/s/i.json").Resolve("../c.bin"),
            MustParse("http://h:8080/c.bin"));
  // A whole URL names itself.
  EXPECT_EQ(base.Resolve("https://other/x/y"), MustParse("https://other/x/y"));
  EXPECT_EQ(base.Resolve("s3://other-bucket/k"), MustParse("s3://other-bucket/k"));
}

// ------------------------------------------------------------------------------------------------
// What answers say

TEST(ContentRangeTest, ParsesWhatServersSend) {
  std::optional<ContentRange> range = ContentRange::Parse("bytes 100-199/1000");
  ASSERT_TRUE(range.has_value());
  EXPECT_EQ(range->first, 100u);
  EXPECT_EQ(range->last, 199u);
  EXPECT_EQ(range->total, 1000u);
  range = ContentRange::Parse("bytes 0-0/*");
  ASSERT_TRUE(range.has_value());
  EXPECT_FALSE(range->total.has_value());
  for (const char* bad :
       {"", "bytes", "bytes 5-4/10", "bytes 1-2", "bytes -2/10", "bytes 1-/10", "items 1-2/10",
        "bytes 1-2/x", "bytes */10", "bytes 1-2/10 ", "bytes 0-10/10", "bytes 0-95409/8192"}) {
    EXPECT_FALSE(ContentRange::Parse(bad).has_value()) << bad;
  }
  EXPECT_EQ(UnsatisfiedRangeTotal("bytes */4096"), 4096u);
  EXPECT_FALSE(UnsatisfiedRangeTotal("bytes 0-1/4096").has_value());
}

// ------------------------------------------------------------------------------------------------
// ObjectStoreOptions and Create

// Sets environment variables for one test and puts the old values back.
class ScopedEnv {
 public:
  void Set(const char* name, const char* value) {
    const char* old = getenv(name);
    saved_.emplace_back(name, old != nullptr ? std::optional<std::string>(old) : std::nullopt);
    if (value != nullptr) {
      setenv(name, value, 1);
    } else {
      unsetenv(name);
    }
  }
  ~ScopedEnv() {
    for (auto it = saved_.rbegin(); it != saved_.rend(); ++it) {
      if (it->second) {
        setenv(it->first.c_str(), it->second->c_str(), 1);
      } else {
        unsetenv(it->first.c_str());
      }
    }
  }

 private:
  std::vector<std::pair<std::string, std::optional<std::string>>> saved_;
};

TEST(ObjectStoreOptionsTest, FromEnvironmentReadsWhatTheAwsCliReads) {
  ScopedEnv env;
  env.Set("AWS_ENDPOINT_URL", "http://general:1");
  env.Set("AWS_ENDPOINT_URL_S3", "http://s3-only:2");
  env.Set("AWS_REGION", "eu-west-3");
  env.Set("AWS_DEFAULT_REGION", "ap-south-1");
  env.Set("AWS_ACCESS_KEY_ID", "AKID");
  env.Set("AWS_SECRET_ACCESS_KEY", "SECRET");
  env.Set("AWS_SESSION_TOKEN", "TOKEN");
  ObjectStoreOptions options = ObjectStoreOptions::FromEnvironment();
  EXPECT_EQ(options.endpoint, "http://s3-only:2");
  EXPECT_EQ(options.region, "eu-west-3");
  EXPECT_EQ(options.access_key_id, "AKID");
  EXPECT_EQ(options.secret_access_key, "SECRET");
  EXPECT_EQ(options.session_token, "TOKEN");

  env.Set("AWS_ENDPOINT_URL_S3", nullptr);
  env.Set("AWS_REGION", nullptr);
  options = ObjectStoreOptions::FromEnvironment();
  EXPECT_EQ(options.endpoint, "http://general:1");
  EXPECT_EQ(options.region, "ap-south-1");

  env.Set("AWS_ENDPOINT_URL", nullptr);
  env.Set("AWS_DEFAULT_REGION", nullptr);
  env.Set("AWS_SESSION_TOKEN", nullptr);
  options = ObjectStoreOptions::FromEnvironment();
  EXPECT_EQ(options.endpoint, "");
  EXPECT_EQ(options.region, "us-east-1");
  EXPECT_EQ(options.session_token, "");
}

TEST(ObjectStoreTest, CreateRefusesBadOptions) {
  for (const char* endpoint : {"ftp://host", "localhost:9000", "http://", "http://host/prefix",
                               "http://host:99999", "https://user@host"}) {
    ObjectStoreOptions options;
    options.endpoint = endpoint;
    auto store = ObjectStore::Create(options);
    ASSERT_FALSE(store.has_value()) << endpoint;
    EXPECT_EQ(store.error().code(), ErrorCode::kInvalidArgument) << endpoint;
    EXPECT_THAT(store.error().context(), HasSubstr(endpoint));
  }
  ObjectStoreOptions options;
  options.max_connections = 0;
  EXPECT_EQ(ObjectStore::Create(options).error().code(), ErrorCode::kInvalidArgument);
  options.max_connections = 1;
  options.max_attempts = 0;
  EXPECT_EQ(ObjectStore::Create(options).error().code(), ErrorCode::kInvalidArgument);

  for (const char* endpoint : {"", "http://127.0.0.1:9000", "https://s3.example.com/"}) {
    ObjectStoreOptions good;
    good.endpoint = endpoint;
    EXPECT_TRUE(ObjectStore::Create(good).has_value()) << endpoint;
  }
}

TEST(ObjectStoreTest, CreateBucketWantsAnS3Url) {
  auto store = ObjectStore::Create({});
  ASSERT_TRUE(store.has_value());
  Status created = (*store)->CreateBucket(MustParse("http://127.0.0.1:1/x"));
  ASSERT_FALSE(created.has_value());
  EXPECT_EQ(created.error().code(), ErrorCode::kInvalidArgument);
}

ObjectStoreOptions FastRetries() {
  ObjectStoreOptions options;
  options.backoff_base = milliseconds(5);
  options.backoff_max = milliseconds(40);
  return options;
}

TEST(ObjectStoreTest, RefusedConnectionsAreRetriedThenAnIoError) {
  const uint16_t port = testutil::FreeLoopbackPort();  // nothing listens there
  ASSERT_NE(port, 0);
  ObjectStoreOptions options = FastRetries();
  options.max_attempts = 4;
  auto store = ObjectStore::Create(options);
  ASSERT_TRUE(store.has_value());
  const ObjectUrl url = MustParse("http://127.0.0.1:" + std::to_string(port) + "/x.bin");
  std::vector<std::byte> out(100);
  Status read = (*store)->ReadRange(url, 1000, out);
  ASSERT_FALSE(read.has_value());
  EXPECT_EQ(read.error().code(), ErrorCode::kIoError);
  EXPECT_THAT(read.error().context(),
              AllOf(HasSubstr("GET " + url.ToString() + " bytes 1000-1099"),
                    HasSubstr("after 4 attempt(s)"), HasSubstr("curl error 7")));
  const ObjectStore::Counters counters = (*store)->counters();
  EXPECT_EQ(counters.requests, 4u);
  EXPECT_EQ(counters.retries, 3u);
  EXPECT_EQ(counters.failures, 1u);
  EXPECT_EQ(counters.bytes_received, 0u);
}

// ------------------------------------------------------------------------------------------------
// Against nginx

void WriteFile(const std::string& path, std::span<const std::byte> bytes) {
  std::filesystem::create_directories(std::filesystem::path(path).parent_path());
  std::ofstream out(path, std::ios::binary);
  out.write(reinterpret_cast<const char*>(bytes.data()),
            static_cast<std::streamsize>(bytes.size()));
}

// nginx serving `content_` as /data/object.bin, started once for the test.
class NginxTest : public ::testing::Test {
 protected:
  static constexpr size_t kSize = 300 * 1024 + 17;

  void SetUp() override {
    if (!testutil::NginxServer::Available()) {
      GTEST_SKIP() << testutil::NginxServer::kBinary << " is missing (Debian's nginx-light)";
    }
    content_ = testutil::Pattern(kSize, 7);
    WriteFile(root_.File("data/object.bin"), content_);
    const std::string why = nginx_.Start(root_.path());
    ASSERT_EQ(why, "");
    url_ = Url(nginx_.port(), "data/object.bin");
  }

  static ObjectUrl Url(uint16_t port, const std::string& path) {
    return MustParse("http://127.0.0.1:" + std::to_string(port) + "/" + path);
  }

  std::unique_ptr<ObjectStore> Store(ObjectStoreOptions options = FastRetries()) {
    auto store = ObjectStore::Create(std::move(options));
    EXPECT_TRUE(store.has_value());
    return std::move(store).value();
  }

  // Reads [offset, offset + size) and checks it against the content; "" when it matched.
  std::string ReadAndCompare(const ObjectStore& store, const ObjectUrl& url, uint64_t offset,
                             size_t size) {
    return testutil::ReadAndCompare(store, url, content_, offset, size);
  }

  TempDir root_;
  testutil::NginxServer nginx_;
  std::vector<std::byte> content_;
  ObjectUrl url_;
};

TEST_F(NginxTest, ReadRangeIsByteExact) {
  auto store = Store();
  const struct {
    uint64_t offset;
    size_t size;
  } ranges[] = {{0, 1},
                {0, 4096},
                {1, 4095},
                {4096, 65536},
                {12345, 100000},
                {kSize - 1, 1},
                {kSize - 4096, 4096},
                {0, kSize}};
  uint64_t bytes = 0;
  for (const auto& r : ranges) {
    EXPECT_EQ(ReadAndCompare(*store, url_, r.offset, r.size), "") << r.offset << "+" << r.size;
    bytes += r.size;
  }
  EXPECT_EQ(store->counters().bytes_received, bytes);
  EXPECT_EQ(store->counters().retries, 0u);
}

TEST_F(NginxTest, SizeIsTheHeadAnswersContentLength) {
  auto store = Store();
  Result<uint64_t> size = store->Size(url_);
  ASSERT_TRUE(size.has_value()) << size.error().ToString();
  EXPECT_EQ(*size, kSize);
  EXPECT_EQ(store->Exists(url_).value_or(false), true);
  EXPECT_EQ(store->counters().bytes_received, 0u);  // a HEAD has no body
}

TEST_F(NginxTest, MissingFileIsNotFound) {
  auto store = Store();
  const ObjectUrl missing = Url(nginx_.port(), "data/missing.bin");
  std::vector<std::byte> out(10);
  Status read = store->ReadRange(missing, 0, out);
  ASSERT_FALSE(read.has_value());
  EXPECT_EQ(read.error().code(), ErrorCode::kNotFound);
  EXPECT_THAT(read.error().context(),
              AllOf(HasSubstr(missing.ToString()), HasSubstr("bytes 0-9"), HasSubstr("HTTP 404")));
  Result<uint64_t> size = store->Size(missing);
  ASSERT_FALSE(size.has_value());
  EXPECT_EQ(size.error().code(), ErrorCode::kNotFound);
  // Its HEAD refused, Size asks again for the first byte: a GET, whose answer may name why.
  EXPECT_THAT(size.error().context(), AllOf(HasSubstr("GET " + missing.ToString() + " bytes 0-0"),
                                            HasSubstr("HTTP 404 Not Found")));
  Result<bool> exists = store->Exists(missing);
  ASSERT_TRUE(exists.has_value()) << exists.error().ToString();
  EXPECT_FALSE(*exists);
  // Not found is not retried; Exists's answer is not a failure.
  EXPECT_EQ(store->counters().requests, 4u);
  EXPECT_EQ(store->counters().retries, 0u);
  EXPECT_EQ(store->counters().failures, 3u);
}

TEST_F(NginxTest, RangesPastTheEndAreOutOfRange) {
  auto store = Store();
  std::vector<std::byte> out(100);
  // Starting past the end: 416.
  Status read = store->ReadRange(url_, kSize, out);
  ASSERT_FALSE(read.has_value());
  EXPECT_EQ(read.error().code(), ErrorCode::kOutOfRange);
  EXPECT_THAT(read.error().context(),
              AllOf(HasSubstr("HTTP 416"), HasSubstr("the object has " + std::to_string(kSize))));
  // Running past the end: a 206 with what there is.
  read = store->ReadRange(url_, kSize - 50, out);
  ASSERT_FALSE(read.has_value());
  EXPECT_EQ(read.error().code(), ErrorCode::kOutOfRange);
  EXPECT_THAT(read.error().context(), HasSubstr("the object has " + std::to_string(kSize)));
  // Nothing at the very end is fine; past it is not.
  EXPECT_TRUE(store->ReadRange(url_, kSize, {}).has_value());
  EXPECT_EQ(store->ReadRange(url_, kSize + 1, {}).error().code(), ErrorCode::kOutOfRange);
  EXPECT_EQ(store->ReadRange(url_, UINT64_MAX - 10, out).error().code(),
            ErrorCode::kInvalidArgument);
}

TEST_F(NginxTest, ReadWholeIsBoundedBySize) {
  auto store = Store();
  Result<std::vector<std::byte>> whole = store->ReadWhole(url_, kSize);
  ASSERT_TRUE(whole.has_value()) << whole.error().ToString();
  EXPECT_TRUE(*whole == content_);
  whole = store->ReadWhole(url_, kSize - 1);
  ASSERT_FALSE(whole.has_value());
  EXPECT_EQ(whole.error().code(), ErrorCode::kOutOfRange);
  EXPECT_THAT(whole.error().context(),
              AllOf(HasSubstr(url_.ToString()), HasSubstr("has " + std::to_string(kSize))));
  // The bound stopped the transfer before the body came.
  EXPECT_EQ(store->counters().bytes_received, kSize);
}

// ------------------------------------------------------------------------------------------------
// Through a FaultProxy in front of nginx

class ProxyTest : public NginxTest {
 protected:
  void SetUp() override {
    NginxTest::SetUp();
    if (IsSkipped() || HasFatalFailure()) return;
    proxy_ = std::make_unique<testutil::FaultProxy>(nginx_.port());
    ASSERT_NE(proxy_->port(), 0);
    proxied_ = Url(proxy_->port(), "data/object.bin");
  }

  std::unique_ptr<testutil::FaultProxy> proxy_;
  ObjectUrl proxied_;
};

TEST_F(ProxyTest, RetriesTwo503sThenSucceeds) {
  auto store = Store();
  proxy_->Answer503(2);
  EXPECT_EQ(ReadAndCompare(*store, proxied_, 5000, 70000), "");
  EXPECT_EQ(proxy_->faulted(), 2u);
  EXPECT_EQ(proxy_->requests(), 3u);
  const ObjectStore::Counters counters = store->counters();
  EXPECT_EQ(counters.requests, 3u);
  EXPECT_EQ(counters.retries, 2u);
  EXPECT_EQ(counters.failures, 0u);
  // A HEAD is retried alike.
  proxy_->Answer503(1);
  EXPECT_EQ(store->Size(proxied_).value_or(0), kSize);
  EXPECT_EQ(store->counters().retries, 3u);
}

TEST_F(ProxyTest, TooMany503sAreAnIoErrorNamingTheStatus) {
  ObjectStoreOptions options = FastRetries();
  options.max_attempts = 3;
  auto store = Store(options);
  proxy_->Answer503(1000);
  std::vector<std::byte> out(10);
  Status read = store->ReadRange(proxied_, 20, out);
  ASSERT_FALSE(read.has_value());
  EXPECT_EQ(read.error().code(), ErrorCode::kIoError);
  EXPECT_THAT(read.error().context(),
              AllOf(HasSubstr(proxied_.ToString()), HasSubstr("bytes 20-29"),
                    HasSubstr("after 3 attempt(s)"), HasSubstr("HTTP 503 Service Unavailable")));
  EXPECT_EQ(proxy_->requests(), 3u);
  EXPECT_EQ(store->counters().failures, 1u);
}

TEST_F(ProxyTest, StallFailsWithTheDeadline) {
  ObjectStoreOptions options = FastRetries();
  options.request_timeout = seconds(30);  // longer than the deadline: the deadline must cut it
  auto store = Store(options);
  proxy_->Stall(1000);
  std::vector<std::byte> out(4096);
  const milliseconds deadline(2000);
  const auto start = Clock::now();
  Status read = store->ReadRange(proxied_, 0, out, deadline);
  const auto elapsed = Clock::now() - start;
  ASSERT_FALSE(read.has_value());
  EXPECT_EQ(read.error().code(), ErrorCode::kIoError);
  EXPECT_THAT(read.error().context(), AllOf(HasSubstr("bytes 0-4095"), HasSubstr("curl error 28")));
  EXPECT_GE(proxy_->requests(), 1u);
  // It waited for the answer until the deadline (a clock only ever runs late)...
  EXPECT_GE(elapsed, deadline - milliseconds(100));
  // ...and no longer than it, give or take a loaded machine.
  EXPECT_LT(elapsed, seconds(60));
}

TEST_F(ProxyTest, StalledAttemptsTimeOutAndAreRetried) {
  ObjectStoreOptions options = FastRetries();
  options.request_timeout = milliseconds(1000);
  auto store = Store(options);
  proxy_->Stall(1);  // the first request only
  EXPECT_EQ(ReadAndCompare(*store, proxied_, 100, 1000), "");
  // At least one retry (more only if the machine is so slow that a good attempt times out too).
  EXPECT_GE(store->counters().retries, 1u);
  EXPECT_GE(proxy_->connections(), 2u);  // the stalled connection is not reused
}

TEST_F(ProxyTest, DroppedConnectionIsRetried) {
  auto store = Store();
  // The first request on a fresh connection (on a reused one, curl itself would try again).
  proxy_->Drop(1);
  EXPECT_EQ(ReadAndCompare(*store, proxied_, 300, 3000), "");
  EXPECT_EQ(proxy_->faulted(), 1u);
  EXPECT_EQ(proxy_->connections(), 2u);
  EXPECT_EQ(store->counters().retries, 1u);
}

TEST_F(ProxyTest, SequentialReadsReuseOneConnection) {
  auto store = Store();
  for (int i = 0; i < 20; ++i) {
    ASSERT_EQ(ReadAndCompare(*store, proxied_, static_cast<uint64_t>(i) * 9000, 8192), "") << i;
  }
  ASSERT_TRUE(store->Size(proxied_).has_value());
  EXPECT_EQ(proxy_->requests(), 21u);
  EXPECT_EQ(proxy_->connections(), 1u);
}

TEST_F(ProxyTest, ConcurrentReadsOpenAtMostMaxConnections) {
  ObjectStoreOptions options = FastRetries();
  options.max_connections = 3;
  auto store = Store(options);
  constexpr int kThreads = 8, kReads = 10;
  const std::vector<std::string> failures =
      testutil::ReadFromThreads(*store, proxied_, content_, kThreads, kReads, 40000);
  for (int t = 0; t < kThreads; ++t) EXPECT_EQ(failures[t], "") << "thread " << t;
  EXPECT_EQ(proxy_->requests(), static_cast<uint64_t>(kThreads * kReads));
  EXPECT_GE(proxy_->connections(), 1u);
  EXPECT_LE(proxy_->connections(), 3u);
  EXPECT_EQ(store->counters().retries, 0u);
}

// Canned answers: what a broken server might say to a ranged GET.
std::string Answer(const std::string& status_and_headers, const std::string& body) {
  return "HTTP/1.1 " + status_and_headers + "\r\nContent-Length: " + std::to_string(body.size()) +
         "\r\n\r\n" + body;
}

TEST_F(ProxyTest, AnswersThatAreNotTheRangeAreDataLoss) {
  auto store = Store();
  std::vector<std::byte> out(10);
  const struct {
    std::string answer;
    std::string why;
  } cases[] = {
      // More bytes than asked: the transfer is cut short, nothing past the buffer is written.
      {Answer("206 Partial Content\r\nContent-Range: bytes 0-19/100", std::string(20, 'x')),
       "more than the 10 bytes"},
      {Answer("206 Partial Content\r\nContent-Range: bytes 5-14/100", std::string(10, 'x')),
       "another range"},
      {Answer("206 Partial Content", std::string(10, 'x')), "Content-Range \"\""},
      {Answer("206 Partial Content\r\nContent-Range: bytes 0-9/100", std::string(5, 'x')),
       "5 of the 10"},
      // The whole object when a part was asked for.
      {Answer("200 OK", std::string(100, 'x')), "ignored the range"},
      {Answer("204 No Content", ""), "HTTP 204"},
  };
  for (const auto& c : cases) {
    proxy_->AnswerWith(c.answer, 1);
    Status read = store->ReadRange(proxied_, 0, out);
    ASSERT_FALSE(read.has_value()) << c.why;
    EXPECT_EQ(read.error().code(), ErrorCode::kDataLoss) << read.error().ToString();
    EXPECT_THAT(read.error().context(), AllOf(HasSubstr("bytes 0-9"), HasSubstr(c.why)));
  }
  EXPECT_EQ(store->counters().retries, 0u);
  // The whole object for a range that is the whole object is fine.
  proxy_->AnswerWith(Answer("200 OK", "0123456789"), 1);
  ASSERT_TRUE(store->ReadRange(proxied_, 0, out).has_value());
  EXPECT_EQ(std::string(reinterpret_cast<const char*>(out.data()), out.size()), "0123456789");
  // A 200 with less than asked: the object ends first.
  proxy_->AnswerWith(Answer("200 OK", "01234"), 1);
  EXPECT_EQ(store->ReadRange(proxied_, 0, out).error().code(), ErrorCode::kOutOfRange);
}

TEST_F(ProxyTest, S3ErrorCodesAreNamed) {
  auto store = Store();
  const std::string xml =
      "<?xml version=\"1.0\"?><Error><Code>AccessDenied</Code><Message>No way</Message></Error>";
  proxy_->AnswerWith(Answer("403 Forbidden\r\nContent-Type: application/xml", xml), 1);
  std::vector<std::byte> out(10);
  Status read = store->ReadRange(proxied_, 0, out);
  ASSERT_FALSE(read.has_value());
  EXPECT_EQ(read.error().code(), ErrorCode::kPermissionDenied);
  EXPECT_THAT(read.error().context(), HasSubstr("HTTP 403 Forbidden AccessDenied (No way)"));
  EXPECT_EQ(store->counters().retries, 0u);
}

TEST_F(ProxyTest, ManyRequestsWaitForFewConnections) {
  ObjectStoreOptions options = FastRetries();
  options.max_connections = 1;
  auto store = Store(options);
  // One connection, stalled: the others wait for it and, with it never given back in time,
  // give up at their deadline instead of opening another.
  proxy_->Stall(1);
  std::vector<std::byte> out(100);
  std::thread stalled([&] { (void)store->ReadRange(proxied_, 0, out, milliseconds(4000)); });
  ASSERT_TRUE(proxy_->WaitForRequests(1, seconds(60)));
  std::vector<std::byte> other(100);
  Status waited = store->ReadRange(proxied_, 0, other, milliseconds(200));
  stalled.join();
  ASSERT_FALSE(waited.has_value());
  EXPECT_EQ(waited.error().code(), ErrorCode::kIoError);
  EXPECT_THAT(waited.error().context(), HasSubstr("connections stayed busy"));
  EXPECT_EQ(proxy_->connections(), 1u);
  // Given back, the connection serves the next request.
  EXPECT_EQ(ReadAndCompare(*store, proxied_, 0, 100), "");
}

}  // namespace
}  // namespace guestmem
