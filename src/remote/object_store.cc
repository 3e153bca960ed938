#include "guestmem/object_store.h"

#include <curl/curl.h>
#include <openssl/evp.h>

#include <algorithm>
#include <condition_variable>
#include <cstdio>
#include <cstdlib>
#include <mutex>
#include <random>
#include <thread>
#include <utility>

#include "remote/body_sink.h"
#include "remote/url_text.h"

namespace guestmem {
namespace {

using Clock = std::chrono::steady_clock;
using std::chrono::milliseconds;

// How much of an error answer's body is kept to find its S3 <Code> and <Message>.
constexpr size_t kMaxErrorBody = 16 * 1024;

// ------------------------------------------------------------------------------------------------
// What an answer says

// The text of the first <NAME> element of an S3 error document ("" when there is none).
std::string XmlElement(std::string_view xml, std::string_view name) {
  const std::string open = "<" + std::string(name) + ">";
  const std::string close = "</" + std::string(name) + ">";
  const size_t begin = xml.find(open);
  if (begin == std::string_view::npos) return "";
  const size_t from = begin + open.size();
  const size_t end = xml.find(close, from);
  if (end == std::string_view::npos) return "";
  return std::string(xml.substr(from, std::min<size_t>(end - from, 300)));
}

std::string_view ReasonPhrase(long status) {
  switch (status) {
    case 301:
      return "Moved Permanently";
    case 307:
      return "Temporary Redirect";
    case 400:
      return "Bad Request";
    case 401:
      return "Unauthorized";
    case 403:
      return "Forbidden";
    case 404:
      return "Not Found";
    case 408:
      return "Request Timeout";
    case 409:
      return "Conflict";
    case 416:
      return "Range Not Satisfiable";
    case 429:
      return "Too Many Requests";
    case 500:
      return "Internal Server Error";
    case 502:
      return "Bad Gateway";
    case 503:
      return "Service Unavailable";
    case 504:
      return "Gateway Timeout";
    default:
      return "";
  }
}

std::string HeaderValue(CURL* curl, const char* name) {
  curl_header* header = nullptr;
  if (curl_easy_header(curl, name, 0, CURLH_HEADER, -1, &header) != CURLHE_OK) return "";
  return header->value;
}

// ------------------------------------------------------------------------------------------------
// libcurl set-up

Status InitCurlOnce() {
  static std::once_flag once;
  static CURLcode code = CURLE_OK;
  std::call_once(once, [] { code = curl_global_init(CURL_GLOBAL_DEFAULT); });
  if (code != CURLE_OK) {
    return Error(ErrorCode::kInternal,
                 std::string("curl_global_init: ") + curl_easy_strerror(code));
  }
  // CURLOPT_PROTOCOLS_STR and curl_easy_header came with 7.85 (CURLOPT_AWS_SIGV4 with 7.75).
  const curl_version_info_data* info = curl_version_info(CURLVERSION_NOW);
  if (info->version_num < 0x075500) {
    return Error(ErrorCode::kInternal,
                 std::string("libcurl ") + info->version + " is older than the 7.85 needed");
  }
  return OkStatus();
}

struct SlistFree {
  void operator()(curl_slist* list) const { curl_slist_free_all(list); }
};
using HeaderList = std::unique_ptr<curl_slist, SlistFree>;

// Whether a failed transfer is worth another attempt: the connection could not be made or broke,
// or the attempt ran out of time.
bool IsTransient(CURLcode code) {
  switch (code) {
    case CURLE_COULDNT_RESOLVE_HOST:
    case CURLE_COULDNT_CONNECT:
    case CURLE_OPERATION_TIMEDOUT:
    case CURLE_SEND_ERROR:
    case CURLE_RECV_ERROR:
    case CURLE_GOT_NOTHING:
    case CURLE_PARTIAL_FILE:
    case CURLE_SSL_CONNECT_ERROR:
    case CURLE_HTTP2:
    case CURLE_HTTP2_STREAM:
      return true;
    default:
      return false;
  }
}

Result<std::string> Sha256Hex(std::span<const std::byte> data) {
  unsigned char digest[EVP_MAX_MD_SIZE];
  unsigned int length = 0;
  if (EVP_Digest(data.data(), data.size(), digest, &length, EVP_sha256(), nullptr) != 1) {
    return Error(ErrorCode::kInternal, "SHA-256 of the body (OpenSSL EVP_Digest) failed");
  }
  static constexpr char kHex[] = "0123456789abcdef";
  std::string hex;
  for (unsigned int i = 0; i < length; ++i) {
    hex += kHex[digest[i] >> 4];
    hex += kHex[digest[i] & 0xf];
  }
  return hex;
}

milliseconds Remaining(Clock::time_point deadline) {
  return std::chrono::duration_cast<milliseconds>(deadline - Clock::now());
}

long Millis(milliseconds ms) { return static_cast<long>(ms.count()); }

// ------------------------------------------------------------------------------------------------
// The pool of handles

// A curl easy handle and its error buffer. The handle keeps its connection between requests.
struct Handle {
  CURL* curl = nullptr;
  char error[CURL_ERROR_SIZE] = {};

  Handle() = default;
  Handle(const Handle&) = delete;
  Handle& operator=(const Handle&) = delete;
  ~Handle() {
    if (curl != nullptr) curl_easy_cleanup(curl);
  }
};

// At most `max` handles exist; a request takes one for all its attempts and gives it back.
class HandlePool {
 public:
  class Lease {
   public:
    Lease(HandlePool* pool, std::unique_ptr<Handle> handle)
        : pool_(pool), handle_(std::move(handle)) {}
    Lease(Lease&& other) noexcept = default;
    Lease& operator=(Lease&&) = delete;
    ~Lease() {
      if (handle_) pool_->Give(std::move(handle_));
    }
    Handle& operator*() const { return *handle_; }

   private:
    HandlePool* pool_;
    std::unique_ptr<Handle> handle_;
  };

  explicit HandlePool(unsigned max) : max_(max) {}

  // The idle handle given back last (its connection is the likeliest to be alive), a new one
  // while fewer than max exist, or else the first one given back before `deadline`.
  Result<Lease> Take(Clock::time_point deadline) {
    std::unique_lock lock(mu_);
    while (idle_.empty() && created_ >= max_) {
      if (freed_.wait_until(lock, deadline) == std::cv_status::timeout && idle_.empty() &&
          created_ >= max_) {
        return Error(ErrorCode::kIoError,
                     "all " + std::to_string(max_) + " connections stayed busy until the deadline");
      }
    }
    if (!idle_.empty()) {
      std::unique_ptr<Handle> handle = std::move(idle_.back());
      idle_.pop_back();
      return Lease(this, std::move(handle));
    }
    auto handle = std::make_unique<Handle>();
    handle->curl = curl_easy_init();
    if (handle->curl == nullptr) return Error(ErrorCode::kInternal, "curl_easy_init failed");
    ++created_;
    return Lease(this, std::move(handle));
  }

 private:
  void Give(std::unique_ptr<Handle> handle) {
    {
      std::lock_guard lock(mu_);
      idle_.push_back(std::move(handle));
    }
    freed_.notify_one();
  }

  const unsigned max_;
  std::mutex mu_;
  std::condition_variable freed_;
  std::vector<std::unique_ptr<Handle>> idle_;  // GUARDED_BY(mu_)
  unsigned created_ = 0;                       // GUARDED_BY(mu_)
};

// ------------------------------------------------------------------------------------------------
// Requests

struct Request {
  const char* method = "GET";  // GET, HEAD or PUT
  ObjectUrl url;
  std::optional<ByteRange> range;       // GET
  std::span<const std::byte> body;      // PUT
  BodySink* sink = nullptr;             // GET: takes the body of a 2xx answer
  milliseconds deadline{0};             // every attempt, and the wait for a connection
  std::vector<std::string> ok_codes;    // S3 error codes that mean success
  bool not_found_is_an_answer = false;  // a 404 is not counted as a failure (Exists)

  // "GET s3://bucket/key bytes 0-4095", as every message about the request starts.
  std::string Describe() const {
    std::string out = std::string(method) + " " + url.ToString();
    if (range) out += " " + range->ToString();
    if (std::string_view(method) == "PUT") out += " (" + std::to_string(body.size()) + " bytes)";
    return out;
  }
};

// How one attempt ended.
struct Outcome {
  enum class Kind { kDone, kRetry, kFatal };
  Kind kind = Kind::kFatal;
  AnswerHead answer;           // kDone
  std::optional<Error> error;  // kFatal
  std::string cause;           // kRetry: why, for the message if none succeeds

  static Outcome Done(AnswerHead answer) {
    Outcome o;
    o.kind = Kind::kDone;
    o.answer = std::move(answer);
    return o;
  }
  static Outcome Retry(std::string cause) {
    Outcome o;
    o.kind = Kind::kRetry;
    o.cause = std::move(cause);
    return o;
  }
  static Outcome Fatal(Error error) {
    Outcome o;
    o.error = std::move(error);
    return o;
  }
};

// The state of one attempt that libcurl's callbacks see.
struct Transfer {
  CURL* curl = nullptr;
  BodySink* sink = nullptr;
  std::span<const std::byte> upload;
  size_t uploaded = 0;
  bool began = false;
  bool success = false;  // the answer is 2xx: its body goes to the sink
  std::string error_body;
  std::optional<Error> sink_error;
  std::atomic<uint64_t>* bytes_received = nullptr;
  std::atomic<uint64_t>* bytes_sent = nullptr;

  size_t TakeBody(const char* data, size_t size) {
    if (!began) {
      began = true;
      long status = 0;
      curl_off_t length = -1;
      curl_easy_getinfo(curl, CURLINFO_RESPONSE_CODE, &status);
      curl_easy_getinfo(curl, CURLINFO_CONTENT_LENGTH_DOWNLOAD_T, &length);
      success = status >= 200 && status < 300;
      if (success && sink != nullptr && !Keep(sink->Begin(status, length))) return 0;
    }
    if (!success) {
      error_body.append(data, std::min(size, kMaxErrorBody - error_body.size()));
      return size;
    }
    if (sink == nullptr) return size;  // the body of a PUT's answer
    if (!Keep(sink->Write({reinterpret_cast<const std::byte*>(data), size}))) return 0;
    bytes_received->fetch_add(size, std::memory_order_relaxed);
    return size;
  }

  size_t GiveUpload(char* buffer, size_t size) {
    const size_t n = std::min(size, upload.size() - uploaded);
    std::copy_n(upload.begin() + static_cast<ptrdiff_t>(uploaded), n,
                reinterpret_cast<std::byte*>(buffer));
    uploaded += n;
    bytes_sent->fetch_add(n, std::memory_order_relaxed);
    return n;
  }

  // Whether `status` is success; if not, keeps its error to report after the transfer.
  bool Keep(Status status) {
    if (status) return true;
    sink_error = std::move(status).error();
    return false;
  }
};

size_t OnBody(char* data, size_t size, size_t count, void* transfer) {
  return static_cast<Transfer*>(transfer)->TakeBody(data, size * count);
}

size_t OnUpload(char* buffer, size_t size, size_t count, void* transfer) {
  return static_cast<Transfer*>(transfer)->GiveUpload(buffer, size * count);
}

// curl rewinds an upload when it has to send it again on a new connection.
int OnSeek(void* transfer, curl_off_t offset, int origin) {
  auto* t = static_cast<Transfer*>(transfer);
  if (origin != SEEK_SET || offset < 0 || static_cast<uint64_t>(offset) > t->upload.size()) {
    return CURL_SEEKFUNC_FAIL;
  }
  t->uploaded = static_cast<size_t>(offset);
  return CURL_SEEKFUNC_OK;
}

}  // namespace

// ------------------------------------------------------------------------------------------------
// ObjectStoreOptions

ObjectStoreOptions ObjectStoreOptions::FromEnvironment() {
  const auto env = [](const char* name) -> std::string {
    // Unsafe only against a setenv at the same time, which a program does while it starts.
    const char* value = std::getenv(name);  // NOLINT(concurrency-mt-unsafe)
    return value != nullptr ? value : "";
  };
  // As in the AWS CLI, the service's own variable wins over the general one.
  const auto first_set = [](std::string a, std::string b) {
    return a.empty() ? std::move(b) : std::move(a);
  };
  ObjectStoreOptions options;
  options.endpoint = first_set(env("AWS_ENDPOINT_URL_S3"), env("AWS_ENDPOINT_URL"));
  if (std::string region = first_set(env("AWS_REGION"), env("AWS_DEFAULT_REGION"));
      !region.empty()) {
    options.region = std::move(region);
  }
  options.access_key_id = env("AWS_ACCESS_KEY_ID");
  options.secret_access_key = env("AWS_SECRET_ACCESS_KEY");
  options.session_token = env("AWS_SESSION_TOKEN");
  return options;
}

// ------------------------------------------------------------------------------------------------
// ObjectStore

struct ObjectStore::Impl {
  ObjectStoreOptions options;
  std::string endpoint;  // "http(s)://host[:port]", without a trailing '/'
  std::string sigv4;     // "aws:amz:REGION:s3"
  bool endpoint_is_loopback;
  HandlePool pool;
  std::atomic<uint64_t> requests{0}, retries{0}, failures{0}, bytes_received{0}, bytes_sent{0};

  Impl(ObjectStoreOptions o, std::string e)
      : options(std::move(o)),
        endpoint(std::move(e)),
        sigv4("aws:amz:" + options.region + ":s3"),
        endpoint_is_loopback(
            IsLoopback(HostOf(std::string_view(endpoint).substr(endpoint.find("://") + 3)))),
        pool(options.max_connections) {}

  // Every attempt of `request`, until one succeeds, one fails for good, or the attempts or the
  // deadline run out.
  Result<AnswerHead> Perform(const Request& request) {
    const Clock::time_point start = Clock::now();
    const Clock::time_point deadline = start + request.deadline;
    const auto fail = [&](Error error) {
      if (!(request.not_found_is_an_answer && error.code() == ErrorCode::kNotFound)) {
        failures.fetch_add(1, std::memory_order_relaxed);
      }
      return std::move(error).WithContext(request.Describe());
    };
    Result<HeaderList> headers = Headers(request);
    if (!headers) return fail(std::move(headers).error());
    Result<HandlePool::Lease> lease = pool.Take(deadline);
    if (!lease) return fail(std::move(lease).error());
    const std::string url = UrlOf(request.url);
    std::string last_failure = "no time left for an attempt";
    int attempts = 0;
    while (attempts < options.max_attempts) {
      if (attempts > 0) {
        const milliseconds pause = Backoff(attempts);
        if (Clock::now() + pause >= deadline) break;
        std::this_thread::sleep_for(pause);
      }
      const milliseconds left = Remaining(deadline);
      if (left < milliseconds(1)) break;
      if (attempts > 0) retries.fetch_add(1, std::memory_order_relaxed);
      requests.fetch_add(1, std::memory_order_relaxed);
      ++attempts;
      Outcome outcome = Attempt(**lease, request, url, headers->get(), left);
      if (outcome.kind == Outcome::Kind::kDone) return std::move(outcome.answer);
      if (outcome.kind == Outcome::Kind::kFatal) return fail(*std::move(outcome.error));
      last_failure = std::move(outcome.cause);
    }
    const auto elapsed = std::chrono::duration_cast<milliseconds>(Clock::now() - start);
    return fail(Error(ErrorCode::kIoError,
                      "gave up after " + std::to_string(attempts) + " attempt(s) in " +
                          std::to_string(elapsed.count()) + " ms (deadline " +
                          std::to_string(request.deadline.count()) + " ms): " + last_failure));
  }

  // A pause before attempt `attempt` + 1: uniform in [0, min(max, base * 2^(attempt - 1))]
  // ("full jitter", so that clients that failed together do not come back together).
  milliseconds Backoff(int attempt) const {
    const int64_t base = std::max<int64_t>(options.backoff_base.count(), 0);
    const int64_t max = std::max<int64_t>(options.backoff_max.count(), 0);
    const int doublings = std::min(attempt - 1, 30);
    const int64_t ceiling = base > (max >> doublings) ? max : base << doublings;
    thread_local std::minstd_rand random(std::random_device{}());
    return milliseconds(std::uniform_int_distribution<int64_t>(0, ceiling)(random));
  }

  std::string UrlOf(const ObjectUrl& url) const {
    if (url.scheme != ObjectUrl::Scheme::kS3) {
      return std::string(SchemePrefix(url.scheme)) + url.authority + "/" + EncodePath(url.path);
    }
    std::string out = endpoint + "/" + url.authority;  // path-style: the bucket in the path
    if (!url.path.empty()) out += "/" + EncodePath(url.path);
    return out;
  }

  Result<HeaderList> Headers(const Request& request) const {
    std::vector<std::string> lines;
    if (request.range) {
      lines.push_back("Range: bytes=" + std::to_string(request.range->offset) + "-" +
                      std::to_string(request.range->last()));
    }
    const bool put = std::string_view(request.method) == "PUT";
    if (request.url.scheme == ObjectUrl::Scheme::kS3) {
      // curl's SigV4 signs this header's value as the payload's hash but does not send it by
      // itself; S3 and RGW refuse a signed request without it.
      std::string payload = "UNSIGNED-PAYLOAD";
      if (put) {
        GM_ASSIGN_OR_RETURN(payload, Sha256Hex(request.body));
      }
      lines.push_back("x-amz-content-sha256: " + payload);
      if (!options.session_token.empty()) {
        lines.push_back("x-amz-security-token: " + options.session_token);
      }
    }
    HeaderList list;
    for (const std::string& line : lines) {
      curl_slist* grown = curl_slist_append(list.get(), line.c_str());
      if (grown == nullptr) return Error(ErrorCode::kResourceExhausted, "curl_slist_append");
      (void)list.release();  // now owned by `grown`
      list.reset(grown);
    }
    return list;
  }

  Outcome Attempt(Handle& handle, const Request& request, const std::string& url,
                  curl_slist* headers, milliseconds left) {
    Transfer transfer;
    transfer.curl = handle.curl;
    transfer.sink = request.sink;
    transfer.upload = request.body;
    transfer.bytes_received = &bytes_received;
    transfer.bytes_sent = &bytes_sent;
    if (request.sink != nullptr) request.sink->Restart();
    Configure(handle, request, url, headers, left, &transfer);
    const CURLcode code = curl_easy_perform(handle.curl);
    if (transfer.sink_error) return Outcome::Fatal(*std::move(transfer.sink_error));
    if (code != CURLE_OK) {
      std::string cause = handle.error[0] != '\0' ? handle.error : curl_easy_strerror(code);
      cause += " (curl error " + std::to_string(static_cast<int>(code)) + ")";
      if (IsTransient(code)) return Outcome::Retry(std::move(cause));
      return Outcome::Fatal(Error(ErrorCode::kIoError, std::move(cause)));
    }
    AnswerHead answer;
    curl_easy_getinfo(handle.curl, CURLINFO_RESPONSE_CODE, &answer.status);
    if (answer.status < 200 || answer.status >= 300) {
      return Failed(handle.curl, request, answer.status, transfer.error_body);
    }
    curl_off_t length = -1;
    curl_easy_getinfo(handle.curl, CURLINFO_CONTENT_LENGTH_DOWNLOAD_T, &length);
    answer.content_length = length;
    answer.content_range = HeaderValue(handle.curl, "Content-Range");
    if (request.sink != nullptr) {
      if (Status checked = request.sink->Finish(answer); !checked) {
        return Outcome::Fatal(std::move(checked).error());
      }
    }
    return Outcome::Done(std::move(answer));
  }

  // An answer that is not 2xx: what it means, and its status and S3 code for the message.
  Outcome Failed(CURL* curl, const Request& request, long status, const std::string& body) {
    const std::string code = XmlElement(body, "Code");
    if (!code.empty() && std::find(request.ok_codes.begin(), request.ok_codes.end(), code) !=
                             request.ok_codes.end()) {
      return Outcome::Done(AnswerHead{.status = status});
    }
    std::string cause = "HTTP " + std::to_string(status);
    if (const std::string_view reason = ReasonPhrase(status); !reason.empty()) {
      cause += " " + std::string(reason);
    }
    if (!code.empty()) cause += " " + Printable(code);
    if (const std::string message = XmlElement(body, "Message"); !message.empty()) {
      cause += " (" + Printable(message) + ")";
    }
    if (status == 401 || status == 403) {
      return Outcome::Fatal(Error(ErrorCode::kPermissionDenied, std::move(cause)));
    }
    if (status == 404) return Outcome::Fatal(Error(ErrorCode::kNotFound, std::move(cause)));
    if (status == 409) return Outcome::Fatal(Error(ErrorCode::kAlreadyExists, std::move(cause)));
    if (status == 416) {
      if (const auto total = UnsatisfiedRangeTotal(HeaderValue(curl, "Content-Range"))) {
        cause += ": the object has " + std::to_string(*total) + " bytes";
      }
      return Outcome::Fatal(Error(ErrorCode::kOutOfRange, std::move(cause)));
    }
    if (status == 408 || status == 429 || status >= 500) return Outcome::Retry(std::move(cause));
    return Outcome::Fatal(Error(ErrorCode::kIoError, std::move(cause)));
  }

  void Configure(Handle& handle, const Request& request, const std::string& url,
                 curl_slist* headers, milliseconds left, Transfer* transfer) const {
    CURL* curl = handle.curl;
    // Back to the defaults; the handle keeps its connection.
    curl_easy_reset(curl);
    handle.error[0] = '\0';
    curl_easy_setopt(curl, CURLOPT_URL, url.c_str());
    curl_easy_setopt(curl, CURLOPT_ERRORBUFFER, handle.error);
    curl_easy_setopt(curl, CURLOPT_PROTOCOLS_STR, "http,https");
    curl_easy_setopt(curl, CURLOPT_USERAGENT, "guestmem/0.1");
    // No signals from timeouts in a multi-threaded program.
    curl_easy_setopt(curl, CURLOPT_NOSIGNAL, 1L);
    // One connection per handle, so that max_connections bounds the connections too.
    curl_easy_setopt(curl, CURLOPT_MAXCONNECTS, 1L);
    curl_easy_setopt(curl, CURLOPT_TCP_KEEPALIVE, 1L);
    curl_easy_setopt(curl, CURLOPT_CONNECTTIMEOUT_MS,
                     Millis(std::min(options.connect_timeout, left)));
    curl_easy_setopt(curl, CURLOPT_TIMEOUT_MS, Millis(std::min(options.request_timeout, left)));
    // A proxy from the environment must not get between us and a store on this machine.
    if (request.url.scheme == ObjectUrl::Scheme::kS3 ? endpoint_is_loopback
                                                     : IsLoopback(HostOf(request.url.authority))) {
      curl_easy_setopt(curl, CURLOPT_NOPROXY, "*");
    }
    curl_easy_setopt(curl, CURLOPT_HTTPHEADER, headers);
    curl_easy_setopt(curl, CURLOPT_WRITEFUNCTION, OnBody);
    curl_easy_setopt(curl, CURLOPT_WRITEDATA, transfer);
    const std::string_view method = request.method;
    if (method == "HEAD") curl_easy_setopt(curl, CURLOPT_NOBODY, 1L);
    if (method == "PUT") {
      curl_easy_setopt(curl, CURLOPT_UPLOAD, 1L);
      curl_easy_setopt(curl, CURLOPT_READFUNCTION, OnUpload);
      curl_easy_setopt(curl, CURLOPT_READDATA, transfer);
      curl_easy_setopt(curl, CURLOPT_SEEKFUNCTION, OnSeek);
      curl_easy_setopt(curl, CURLOPT_SEEKDATA, transfer);
      curl_easy_setopt(curl, CURLOPT_INFILESIZE_LARGE,
                       static_cast<curl_off_t>(request.body.size()));
      // curl asks "Expect: 100-continue" before a large body; a server that ignores it costs this
      // long, not a second. (It cannot be turned off with an empty "Expect:" header: curl 7.88
      // signs the header it is told to leave out, and the store finds the signature wrong.)
      curl_easy_setopt(curl, CURLOPT_EXPECT_100_TIMEOUT_MS, 200L);
    }
    if (request.url.scheme == ObjectUrl::Scheme::kS3) {
      curl_easy_setopt(curl, CURLOPT_AWS_SIGV4, sigv4.c_str());
      curl_easy_setopt(curl, CURLOPT_USERNAME, options.access_key_id.c_str());
      curl_easy_setopt(curl, CURLOPT_PASSWORD, options.secret_access_key.c_str());
    }
  }

  Request MakeRequest(const char* method, const ObjectUrl& url, milliseconds deadline) const {
    Request request;
    request.method = method;
    request.url = url;
    request.deadline = deadline;
    return request;
  }
};

namespace {

// "http(s)://host[:port]" from the option (a trailing '/' dropped), or AWS's endpoint for the
// region when it is empty.
Result<std::string> EndpointOf(const ObjectStoreOptions& options) {
  if (options.endpoint.empty()) return "https://s3." + options.region + ".amazonaws.com";
  std::string_view text = options.endpoint;
  while (text.ends_with('/')) text.remove_suffix(1);
  const auto bad = [&](std::string_view why) {
    return Error(ErrorCode::kInvalidArgument,
                 "S3 endpoint \"" + Printable(options.endpoint) + "\": " + std::string(why));
  };
  std::string_view authority;
  if (text.starts_with(kHttpPrefix)) {
    authority = text.substr(kHttpPrefix.size());
  } else if (text.starts_with(kHttpsPrefix)) {
    authority = text.substr(kHttpsPrefix.size());
  } else {
    return bad("not an http:// or https:// URL");
  }
  if (authority.empty()) return bad("no host");
  if (authority.find('/') != std::string_view::npos) {
    return bad("has a path (path-style addressing puts the bucket there)");
  }
  if (std::string why = AuthorityProblem(authority); !why.empty()) return bad(why);
  return std::string(text);
}

}  // namespace

Result<std::unique_ptr<ObjectStore>> ObjectStore::Create(ObjectStoreOptions options) {
  GM_ASSIGN_OR_RETURN(std::string endpoint, EndpointOf(options));
  if (options.max_connections == 0 || options.max_attempts < 1) {
    return Error(ErrorCode::kInvalidArgument,
                 "object store: max_connections and max_attempts must be at least 1");
  }
  GM_RETURN_IF_ERROR(InitCurlOnce());
  auto impl = std::make_unique<Impl>(std::move(options), std::move(endpoint));
  return std::unique_ptr<ObjectStore>(new ObjectStore(std::move(impl)));
}

ObjectStore::ObjectStore(std::unique_ptr<Impl> impl) : impl_(std::move(impl)) {}
ObjectStore::~ObjectStore() = default;

Result<uint64_t> ObjectStore::Size(const ObjectUrl& url) const {
  const Request request = impl_->MakeRequest("HEAD", url, impl_->options.deadline);
  Result<AnswerHead> answered = impl_->Perform(request);
  if (!answered) {
    const ErrorCode code = answered.error().code();
    // The answer to a HEAD has no body: a refusal is asked again as a GET of one byte, whose
    // body names the cause (SignatureDoesNotMatch, InvalidAccessKeyId, NoSuchBucket, …).
    if (code == ErrorCode::kPermissionDenied || code == ErrorCode::kNotFound) {
      std::byte first[1];
      Status why = ReadRange(url, 0, first);
      if (!why && why.error().code() == code) return std::move(why).error();
    }
    return std::move(answered).error();
  }
  const AnswerHead& answer = *answered;
  if (answer.content_length < 0) {
    impl_->failures.fetch_add(1, std::memory_order_relaxed);
    return Error(ErrorCode::kIoError, request.Describe() + ": the answer has no Content-Length");
  }
  return static_cast<uint64_t>(answer.content_length);
}

Result<bool> ObjectStore::Exists(const ObjectUrl& url) const {
  Request request = impl_->MakeRequest("HEAD", url, impl_->options.deadline);
  request.not_found_is_an_answer = true;
  Result<AnswerHead> answer = impl_->Perform(request);
  if (answer) return true;
  if (answer.error().code() == ErrorCode::kNotFound) return false;
  return std::move(answer).error();
}

Status ObjectStore::ReadRange(const ObjectUrl& url, uint64_t offset, std::span<std::byte> out,
                              std::optional<std::chrono::milliseconds> deadline) const {
  if (out.empty()) {
    // Nothing to read; the object must still exist and reach `offset`.
    GM_ASSIGN_OR_RETURN(const uint64_t size, Size(url));
    if (offset > size) {
      return Error(ErrorCode::kOutOfRange, "read " + url.ToString() + " at " +
                                               std::to_string(offset) + ": the object has " +
                                               std::to_string(size) + " bytes");
    }
    return OkStatus();
  }
  if (offset > UINT64_MAX - out.size()) {
    return Error(ErrorCode::kInvalidArgument,
                 "read " + url.ToString() + ": offset + size overflows 64 bits");
  }
  const ByteRange range{offset, out.size()};
  RangeSink sink(range, out);
  Request request = impl_->MakeRequest("GET", url, deadline.value_or(impl_->options.deadline));
  request.range = range;
  request.sink = &sink;
  GM_RETURN_IF_ERROR(impl_->Perform(request));
  return OkStatus();
}

Result<std::vector<std::byte>> ObjectStore::ReadWhole(
    const ObjectUrl& url, uint64_t max_bytes,
    std::optional<std::chrono::milliseconds> deadline) const {
  WholeSink sink(max_bytes);
  Request request = impl_->MakeRequest("GET", url, deadline.value_or(impl_->options.deadline));
  request.sink = &sink;
  GM_RETURN_IF_ERROR(impl_->Perform(request));
  return sink.Take();
}

Status ObjectStore::Put(const ObjectUrl& url, std::span<const std::byte> content) const {
  Request request = impl_->MakeRequest("PUT", url, impl_->options.deadline);
  request.body = content;
  GM_RETURN_IF_ERROR(impl_->Perform(request));
  return OkStatus();
}

Status ObjectStore::CreateBucket(const ObjectUrl& bucket_url) const {
  if (bucket_url.scheme != ObjectUrl::Scheme::kS3) {
    return Error(ErrorCode::kInvalidArgument,
                 "create bucket " + bucket_url.ToString() + ": not an s3:// URL");
  }
  ObjectUrl bucket = bucket_url;
  bucket.path.clear();
  // Outside us-east-1, S3 wants the region named in the body.
  std::string body;
  if (impl_->options.region != "us-east-1") {
    body =
        "<CreateBucketConfiguration xmlns=\"http://s3.amazonaws.com/doc/2006-03-01/\">"
        "<LocationConstraint>" +
        impl_->options.region + "</LocationConstraint></CreateBucketConfiguration>";
  }
  Request request = impl_->MakeRequest("PUT", bucket, impl_->options.deadline);
  request.body = std::as_bytes(std::span(body));
  request.ok_codes = {"BucketAlreadyOwnedByYou"};
  GM_RETURN_IF_ERROR(impl_->Perform(request));
  return OkStatus();
}

ObjectStore::Counters ObjectStore::counters() const {
  Counters c;
  c.requests = impl_->requests.load(std::memory_order_relaxed);
  c.retries = impl_->retries.load(std::memory_order_relaxed);
  c.failures = impl_->failures.load(std::memory_order_relaxed);
  c.bytes_received = impl_->bytes_received.load(std::memory_order_relaxed);
  c.bytes_sent = impl_->bytes_sent.load(std::memory_order_relaxed);
  return c;
}

const ObjectStoreOptions& ObjectStore::options() const { return impl_->options; }

}  // namespace guestmem
