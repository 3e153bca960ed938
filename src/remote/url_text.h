// The text of object URLs, shared by ObjectUrl and ObjectStore: the schemes' prefixes, what is
// wrong with a server's name, a path as it goes on the request line.
//
// Thread safety: pure functions.
#ifndef GUESTMEM_REMOTE_URL_TEXT_H_
#define GUESTMEM_REMOTE_URL_TEXT_H_

#include <string>
#include <string_view>

#include "guestmem/object_store.h"

namespace guestmem {

inline constexpr std::string_view kS3Prefix = "s3://";
inline constexpr std::string_view kHttpPrefix = "http://";
inline constexpr std::string_view kHttpsPrefix = "https://";

std::string_view SchemePrefix(ObjectUrl::Scheme scheme);

// `text` for a message: control characters (and bytes above 0x7e) as \xNN.
std::string Printable(std::string_view text);

// What is wrong with "host", "host:port" or "[v6]:port" as a server's name; "" when nothing is.
std::string AuthorityProblem(std::string_view authority);

// The path as it goes on the request line: every byte but the unreserved ones and '/'
// percent-encoded, which is also the canonical URI SigV4 signs for S3.
std::string EncodePath(std::string_view path);

// The host of "host[:port]" or "[v6][:port]".
std::string_view HostOf(std::string_view authority);
// Whether `host` (as HostOf gives it) is this machine: localhost, 127.x.y.z, [::1].
bool IsLoopback(std::string_view host);

}  // namespace guestmem

#endif  // GUESTMEM_REMOTE_URL_TEXT_H_
