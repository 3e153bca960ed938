# Shared by the scripts in this folder: installs what is missing, configures and builds.
# Sourced, not run.
set -euo pipefail

GUESTMEM_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"

# Debian packages the build, tests and benchmarks need.
GUESTMEM_PACKAGES=(
  g++ cmake ninja-build pkg-config
  googletest libgtest-dev libgmock-dev libbenchmark-dev
  nlohmann-json3-dev libcli11-dev libfmt-dev libxxhash-dev libzstd-dev liblz4-dev
  libcpp-httplib-dev libsystemd-dev libpng-dev
  # The observability tests: a real Prometheus and promtool, headless Chromium, and
  # systemd-socket-activate.
  prometheus chromium systemd
  # scripts/metrics_cost.sh: a scraper and the JSON of gmem bench.
  curl jq bc
  # The object-store client (libcurl, SHA-256 of PUT bodies from OpenSSL) and the servers its
  # tests start: nginx, and a single-node Ceph RGW (../shared/tools/ceph-rgw).
  libcurl4-openssl-dev libssl-dev nginx-light
  ceph-mon ceph-osd radosgw uuid-runtime
)
# What the fuzz preset needs on top: clang and its runtimes (libFuzzer, ASan, UBSan).
GUESTMEM_FUZZ_PACKAGES=(clang libclang-rt-14-dev)

# gm_install_missing_packages [package...]: installs those of the packages (default: every one in
# GUESTMEM_PACKAGES) that are not installed yet.
gm_install_missing_packages() {
  local wanted=("$@")
  [ ${#wanted[@]} -eq 0 ] && wanted=("${GUESTMEM_PACKAGES[@]}")
  local missing=()
  for pkg in "${wanted[@]}"; do
    dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" ||
      missing+=("$pkg")
  done
  [ ${#missing[@]} -eq 0 ] && return 0
  echo "guestmem: installing missing packages: ${missing[*]}"
  local sudo=""
  [ "$(id -u)" -ne 0 ] && sudo="sudo"
  $sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq "${missing[@]}" >/dev/null
}

# gm_build <preset>: configures (once) and builds build/<preset>.
gm_build() {
  local preset="$1"
  cd "$GUESTMEM_ROOT"
  if [ ! -f "build/$preset/build.ninja" ]; then
    cmake --preset "$preset" >/dev/null
  fi
  cmake --build --preset "$preset" -j "$(nproc)"
}
