// ObjectUrl, and the text of URLs that ObjectStore shares (url_text.h).
#include <algorithm>
#include <charconv>
#include <vector>

#include "guestmem/object_store.h"
#include "remote/url_text.h"

namespace guestmem {
namespace {

// S3 refuses longer keys; other servers have their own limits, which they report.
constexpr size_t kMaxKeyBytes = 1024;

bool IsLowerAlnum(char c) { return (c >= 'a' && c <= 'z') || (c >= '0' && c <= '9'); }
bool IsAlnum(char c) { return IsLowerAlnum(c) || (c >= 'A' && c <= 'Z'); }

Error BadUrl(std::string_view text, std::string_view why) {
  return Error(ErrorCode::kInvalidArgument,
               "object URL \"" + Printable(text) + "\": " + std::string(why));
}

bool LooksLikeIpv4(std::string_view s) {
  int dots = 0;
  for (const char c : s) {
    if (c == '.') {
      ++dots;
    } else if (c < '0' || c > '9') {
      return false;
    }
  }
  return dots == 3;
}

// The ...Problem functions: what is wrong with a part of a URL, "" when nothing is.

// The rules of S3's general purpose buckets (the part that matters for naming them in a URL).
std::string BucketProblem(std::string_view bucket) {
  if (bucket.size() < 3 || bucket.size() > 63) {
    return "a bucket name has 3 to 63 characters";
  }
  for (const char c : bucket) {
    if (!IsLowerAlnum(c) && c != '.' && c != '-') {
      return "a bucket name has only lowercase letters, digits, '.' and '-'";
    }
  }
  if (!IsLowerAlnum(bucket.front()) || !IsLowerAlnum(bucket.back())) {
    return "a bucket name starts and ends with a letter or a digit";
  }
  if (bucket.find("..") != std::string_view::npos) {
    return "a bucket name has no two '.' in a row";
  }
  if (LooksLikeIpv4(bucket)) return "a bucket name is not an IP address";
  return "";
}

// A key or path: no control characters; no "." or ".." segment (Resolve gives them their
// meaning, and curl would squash them); for http(s), no query or fragment.
std::string PathProblem(ObjectUrl::Scheme scheme, std::string_view path) {
  if (scheme == ObjectUrl::Scheme::kS3 && path.size() > kMaxKeyBytes) {
    return "a key has at most 1024 bytes";
  }
  for (const char ch : path) {
    const auto c = static_cast<unsigned char>(ch);
    if (c < 0x20 || c == 0x7f) return "control characters are not allowed";
    if (scheme != ObjectUrl::Scheme::kS3 && (c == '?' || c == '#')) {
      return "queries and fragments ('?', '#') are not supported";
    }
  }
  size_t start = 0;
  while (start <= path.size()) {
    const size_t end = std::min(path.find('/', start), path.size());
    const std::string_view segment = path.substr(start, end - start);
    if (segment == "." || segment == "..") {
      return "a path has no \".\" or \"..\" segment";
    }
    start = end + 1;
  }
  return "";
}

// `path` with "." and empty segments dropped and ".." taking the one before it away (never above
// the root); a path that named a directory keeps its trailing '/'.
std::string NormalizePath(std::string_view path) {
  std::vector<std::string_view> kept;
  bool directory = false;
  size_t start = 0;
  while (start <= path.size()) {
    const size_t end = std::min(path.find('/', start), path.size());
    const std::string_view segment = path.substr(start, end - start);
    directory = segment.empty() || segment == "." || segment == "..";
    if (segment == "..") {
      if (!kept.empty()) kept.pop_back();
    } else if (!segment.empty() && segment != ".") {
      kept.push_back(segment);
    }
    start = end + 1;
  }
  std::string out;
  for (const std::string_view segment : kept) {
    if (!out.empty()) out += '/';
    out += segment;
  }
  if (directory && !out.empty()) out += '/';
  return out;
}

}  // namespace

// ------------------------------------------------------------------------------------------------
// url_text.h

std::string_view SchemePrefix(ObjectUrl::Scheme scheme) {
  switch (scheme) {
    case ObjectUrl::Scheme::kS3:
      return kS3Prefix;
    case ObjectUrl::Scheme::kHttp:
      return kHttpPrefix;
    case ObjectUrl::Scheme::kHttps:
      return kHttpsPrefix;
  }
  return kS3Prefix;
}

std::string Printable(std::string_view text) {
  static constexpr char kHex[] = "0123456789abcdef";
  std::string out;
  for (const char ch : text) {
    const auto c = static_cast<unsigned char>(ch);
    if (c >= 0x20 && c < 0x7f) {
      out += ch;
    } else {
      out += "\\x";
      out += kHex[c >> 4];
      out += kHex[c & 0xf];
    }
  }
  return out;
}

std::string AuthorityProblem(std::string_view authority) {
  if (authority.find('@') != std::string_view::npos) {
    return "credentials in the URL are not supported";
  }
  std::string_view host = authority;
  std::string_view port;
  if (authority.starts_with('[')) {
    const size_t close = authority.find(']');
    if (close == std::string_view::npos) return "an IPv6 host lacks its ']'";
    host = authority.substr(0, close + 1);
    std::string_view rest = authority.substr(close + 1);
    if (!rest.empty() && !rest.starts_with(':')) return "junk after the IPv6 host";
    if (!rest.empty()) port = rest.substr(1);
    for (const char c : host.substr(1, host.size() - 2)) {
      if (!IsAlnum(c) && c != ':' && c != '.') return "a bad IPv6 host";
    }
  } else {
    const size_t colon = authority.find(':');
    if (colon != std::string_view::npos) {
      host = authority.substr(0, colon);
      port = authority.substr(colon + 1);
    }
    if (host.empty()) return "no host";
    for (const char c : host) {
      if (!IsAlnum(c) && c != '.' && c != '-') {
        return "a host name has only letters, digits, '.' and '-'";
      }
    }
  }
  if (authority.find(':', host.size()) != std::string_view::npos) {
    unsigned value = 0;
    const auto [end, ec] = std::from_chars(port.data(), port.data() + port.size(), value);
    if (port.empty() || ec != std::errc() || end != port.data() + port.size() || value == 0 ||
        value > 65535) {
      return "the port is not a number from 1 to 65535";
    }
  }
  return "";
}

std::string EncodePath(std::string_view path) {
  static constexpr char kHex[] = "0123456789ABCDEF";
  std::string out;
  out.reserve(path.size());
  for (const char ch : path) {
    const auto c = static_cast<unsigned char>(ch);
    if (IsAlnum(ch) || ch == '-' || ch == '.' || ch == '_' || ch == '~' || ch == '/') {
      out += ch;
    } else {
      out += '%';
      out += kHex[c >> 4];
      out += kHex[c & 0xf];
    }
  }
  return out;
}

std::string_view HostOf(std::string_view authority) {
  if (authority.starts_with('[')) return authority.substr(0, authority.find(']') + 1);
  return authority.substr(0, authority.find(':'));
}

bool IsLoopback(std::string_view host) {
  return host == "localhost" || host.ends_with(".localhost") || host.starts_with("127.") ||
         host == "[::1]";
}

// ------------------------------------------------------------------------------------------------
// ObjectUrl

bool ObjectUrl::Names(std::string_view text) {
  return text.starts_with(kS3Prefix) || text.starts_with(kHttpPrefix) ||
         text.starts_with(kHttpsPrefix);
}

Result<ObjectUrl> ObjectUrl::Parse(std::string_view text) {
  ObjectUrl url;
  std::string_view rest;
  if (text.starts_with(kS3Prefix)) {
    url.scheme = Scheme::kS3;
    rest = text.substr(kS3Prefix.size());
  } else if (text.starts_with(kHttpPrefix)) {
    url.scheme = Scheme::kHttp;
    rest = text.substr(kHttpPrefix.size());
  } else if (text.starts_with(kHttpsPrefix)) {
    url.scheme = Scheme::kHttps;
    rest = text.substr(kHttpsPrefix.size());
  } else if (const size_t colon = text.find("://"); colon != std::string_view::npos) {
    return BadUrl(text, "the scheme \"" + Printable(text.substr(0, colon)) +
                            "\" is not one of s3, http, https");
  } else {
    return BadUrl(text, "not a URL (s3://BUCKET/KEY, http(s)://HOST/PATH)");
  }
  const size_t slash = rest.find('/');
  const std::string_view authority = rest.substr(0, slash);
  const std::string_view path =
      slash == std::string_view::npos ? std::string_view() : rest.substr(slash + 1);
  if (url.scheme == Scheme::kS3) {
    if (authority.empty()) return BadUrl(text, "no bucket");
    if (std::string why = BucketProblem(authority); !why.empty()) return BadUrl(text, why);
    if (path.empty()) return BadUrl(text, "no key");
  } else {
    if (authority.empty()) return BadUrl(text, "no host");
    if (std::string why = AuthorityProblem(authority); !why.empty()) return BadUrl(text, why);
    if (path.empty()) return BadUrl(text, "no path");
  }
  if (std::string why = PathProblem(url.scheme, path); !why.empty()) return BadUrl(text, why);
  url.authority = std::string(authority);
  url.path = std::string(path);
  return url;
}

std::string ObjectUrl::ToString() const {
  return std::string(SchemePrefix(scheme)) + authority + "/" + path;
}

ObjectUrl ObjectUrl::Resolve(std::string_view relative) const {
  if (Names(relative)) {
    if (Result<ObjectUrl> whole = Parse(relative)) return *std::move(whole);
  }
  std::string combined;
  if (relative.starts_with('/')) {
    combined = relative.substr(1);
  } else {
    const size_t last_slash = path.rfind('/');
    if (last_slash != std::string::npos) combined = path.substr(0, last_slash + 1);
    combined += relative;
  }
  ObjectUrl out = *this;
  out.path = NormalizePath(combined);
  return out;
}

}  // namespace guestmem
