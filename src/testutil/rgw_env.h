// FindRgw: the Ceph RGW the tests of a run share, as ctest's fixture remote.rgw_up started it
// (tests/remote/rgw_fixture.sh): it writes `dir`/s3.env, or `dir`/skip-reason when it could not,
// and the tests skip with that reason. Run by hand, a test takes the store from S3_ENDPOINT,
// S3_ACCESS_KEY, S3_SECRET_KEY (and S3_REGION) when they are set.
//
// Thread safety: a pure function of the environment and the files.
#ifndef GUESTMEM_TESTUTIL_RGW_ENV_H_
#define GUESTMEM_TESTUTIL_RGW_ENV_H_

#include <cstdlib>
#include <fstream>
#include <map>
#include <string>

#include "guestmem/result.h"
#include "testutil/subprocess.h"

namespace guestmem::testutil {

struct S3Env {
  std::string endpoint, access_key, secret_key, region = "us-east-1";
};

// `how_to_start`: what to tell the reader when the fixture did not run.
inline Result<S3Env> FindRgw(const std::string& dir, const std::string& how_to_start) {
  S3Env env;
  if (const char* endpoint = getenv("S3_ENDPOINT"); endpoint != nullptr && *endpoint != '\0') {
    env.endpoint = endpoint;
    env.access_key = getenv("S3_ACCESS_KEY") != nullptr ? getenv("S3_ACCESS_KEY") : "";
    env.secret_key = getenv("S3_SECRET_KEY") != nullptr ? getenv("S3_SECRET_KEY") : "";
    if (const char* region = getenv("S3_REGION"); region != nullptr) env.region = region;
    return env;
  }
  std::ifstream in(dir + "/s3.env");
  if (!in) {
    std::string reason = ReadFile(dir + "/skip-reason");
    if (reason.empty()) {
      reason = "no RGW: the ctest fixture remote.rgw_up did not run (run through ctest, or " +
               how_to_start + ", or set S3_ENDPOINT, S3_ACCESS_KEY and S3_SECRET_KEY)";
    }
    return Error(ErrorCode::kNotFound, reason);
  }
  std::map<std::string, std::string> vars;
  for (std::string line; std::getline(in, line);) {
    const size_t eq = line.find('=');
    if (eq != std::string::npos) vars[line.substr(0, eq)] = line.substr(eq + 1);
  }
  env.endpoint = vars["S3_ENDPOINT"];
  env.access_key = vars["S3_ACCESS_KEY"];
  env.secret_key = vars["S3_SECRET_KEY"];
  if (!vars["S3_REGION"].empty()) env.region = vars["S3_REGION"];
  if (env.endpoint.empty()) return Error(ErrorCode::kNotFound, dir + "/s3.env has no S3_ENDPOINT");
  return env;
}

}  // namespace guestmem::testutil

#endif  // GUESTMEM_TESTUTIL_RGW_ENV_H_
