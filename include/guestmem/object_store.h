// ObjectStore: reads and writes objects of an S3-compatible store (AWS S3, Ceph RGW, MinIO) or
// of a plain web server over HTTP(S), by byte range, through libcurl.
//
// An object is named by an ObjectUrl: `s3://BUCKET/KEY` (reached at the store's endpoint with
// path-style addressing, every request signed with AWS SigV4) or `http://HOST[:PORT]/PATH` /
// `https://…` (unsigned; any server that honours `Range`). Credentials, region and endpoint come
// the way the AWS CLI takes them (ObjectStoreOptions::FromEnvironment).
//
// Connections are kept and reused: each request takes an idle libcurl handle from a pool (at
// most max_connections at once, so that many requests may be in flight from many threads) and
// gives it back with its connection open.
//
// Failures: a connection that cannot be made or breaks, a request that takes longer than
// request_timeout, and a 5xx answer (or 408, 429) are tried again, after a backoff that doubles
// from backoff_base up to backoff_max with full jitter, until max_attempts or the request's
// deadline; then kIoError names the URL, the range and the last failure. 401/403 are
// kPermissionDenied and 404 is kNotFound, never retried, their message naming the S3 error code
// (SignatureDoesNotMatch, InvalidAccessKeyId, NoSuchBucket, NoSuchKey, …) when the store sent one
// (a HEAD's answer has no body: its message names the HTTP status). A ranged read returns
// exactly the bytes asked for or fails (kDataLoss for an answer that is shorter, longer, or not
// the range asked for); an answer larger than asked is never buffered.
//
// Thread safety: every method is safe from many threads at once.
#ifndef GUESTMEM_OBJECT_STORE_H_
#define GUESTMEM_OBJECT_STORE_H_

#include <atomic>
#include <chrono>
#include <cstddef>
#include <cstdint>
#include <memory>
#include <optional>
#include <span>
#include <string>
#include <string_view>
#include <vector>

#include "guestmem/result.h"

namespace guestmem {

struct ObjectUrl {
  enum class Scheme { kS3, kHttp, kHttps };
  Scheme scheme = Scheme::kS3;
  std::string authority;  // kS3: the bucket; kHttp(s): "host[:port]"
  std::string path;       // the key (kS3) or the path without its leading '/' (kHttp(s))
                          // as the name it is: requests percent-encode it, Parse decodes nothing

  // Whether `text` names an object rather than a local file: it starts with s3://, http:// or
  // https://.
  static bool Names(std::string_view text);
  // ERRORS: kInvalidArgument naming what is wrong (no bucket, no key, a bucket name S3 would
  // refuse, characters that are not allowed, another scheme).
  static Result<ObjectUrl> Parse(std::string_view text);

  std::string ToString() const;  // s3://bucket/key or http://host/path
  // The object `relative` names from this one, as a relative path in a file system does from a
  // file (".." goes up; an absolute path starts at the bucket's or the server's root). A whole URL
  // that Parse accepts names itself.
  ObjectUrl Resolve(std::string_view relative) const;
  bool operator==(const ObjectUrl&) const = default;
};

struct ObjectStoreOptions {
  // The S3 endpoint, as "http(s)://host[:port]"; empty: https://s3.REGION.amazonaws.com.
  std::string endpoint;
  std::string region = "us-east-1";
  std::string access_key_id, secret_access_key, session_token;

  std::chrono::milliseconds connect_timeout{2000};
  std::chrono::milliseconds request_timeout{10000};  // one attempt, answer included
  std::chrono::milliseconds deadline{30000};         // every attempt of one request
  int max_attempts = 6;
  std::chrono::milliseconds backoff_base{50};
  std::chrono::milliseconds backoff_max{2000};
  unsigned max_connections = 16;

  // From AWS_ENDPOINT_URL (or AWS_ENDPOINT_URL_S3), AWS_REGION (or AWS_DEFAULT_REGION),
  // AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_SESSION_TOKEN; the rest as above.
  static ObjectStoreOptions FromEnvironment();
};

class ObjectStore {
 public:
  struct Counters {
    uint64_t requests = 0;        // attempts sent, retries included
    uint64_t retries = 0;         // attempts after the first of a request
    uint64_t failures = 0;        // requests that failed after every attempt
    uint64_t bytes_received = 0;  // body bytes of the objects read (error answers not counted)
    uint64_t bytes_sent = 0;      // body bytes of the objects written, every attempt's
  };

  // ERRORS: kInvalidArgument for an endpoint that is not an http(s) URL; kInternal when libcurl
  // cannot be set up.
  static Result<std::unique_ptr<ObjectStore>> Create(ObjectStoreOptions options);
  ~ObjectStore();
  ObjectStore(const ObjectStore&) = delete;
  ObjectStore& operator=(const ObjectStore&) = delete;

  // The object's size (a HEAD). ERRORS: kNotFound, kPermissionDenied (their S3 code learnt by
  // a GET of the first byte, as the answer to a HEAD has no body), kIoError.
  Result<uint64_t> Size(const ObjectUrl& url) const;
  // Whether the object exists (a HEAD). ERRORS: kPermissionDenied, kIoError.
  Result<bool> Exists(const ObjectUrl& url) const;
  // Bytes [offset, offset + out.size()) of the object, by one ranged GET (retried as above).
  // `deadline`, when given, bounds every attempt of this request instead of options.deadline.
  // ERRORS: kNotFound, kPermissionDenied, kIoError, kDataLoss (not the range asked for),
  // kOutOfRange (the object ends before offset + out.size()).
  Status ReadRange(const ObjectUrl& url, uint64_t offset, std::span<std::byte> out,
                   std::optional<std::chrono::milliseconds> deadline = std::nullopt) const;
  // The whole object, when it holds at most `max_bytes`. ERRORS: as ReadRange; kOutOfRange for
  // a larger object.
  Result<std::vector<std::byte>> ReadWhole(
      const ObjectUrl& url, uint64_t max_bytes,
      std::optional<std::chrono::milliseconds> deadline = std::nullopt) const;
  // Writes the object (a PUT with its content's SHA-256 signed, for kS3). ERRORS: as ReadRange.
  Status Put(const ObjectUrl& url, std::span<const std::byte> content) const;
  // Creates the bucket of the s3:// `bucket_url` (its key is ignored, so
  // ObjectUrl{ObjectUrl::Scheme::kS3, "name", ""} will do); a bucket this account already owns
  // is success. ERRORS: kInvalidArgument for a URL that is not s3://; kAlreadyExists for a bucket
  // someone else owns; as ReadRange.
  Status CreateBucket(const ObjectUrl& bucket_url) const;

  Counters counters() const;
  const ObjectStoreOptions& options() const;

 private:
  struct Impl;
  explicit ObjectStore(std::unique_ptr<Impl> impl);
  std::unique_ptr<Impl> impl_;
};

}  // namespace guestmem

#endif  // GUESTMEM_OBJECT_STORE_H_
