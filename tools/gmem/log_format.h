// How gmem's commands print the library's log: text lines or JSON lines, with a timestamp.
#ifndef GUESTMEM_TOOLS_GMEM_LOG_FORMAT_H_
#define GUESTMEM_TOOLS_GMEM_LOG_FORMAT_H_

namespace guestmem::cli {

// Installs the log sink: "2026-11-25T06:40:29.123Z info    message" on stderr, or one JSON
// object a line ({"ts":..., "level":..., "msg":...}) when `json`.
void InstallLogFormat(bool json, bool verbose);

}  // namespace guestmem::cli

#endif  // GUESTMEM_TOOLS_GMEM_LOG_FORMAT_H_
