#!/usr/bin/env bash
# Weir's main command: installs what is missing, builds weir, weir-proxy and the example apps,
# and runs an example system on this machine with `weir up` (no cluster needed).
#
#   scripts/run.sh                  # examples/events: a publisher and a consumer on a broker
#   scripts/run.sh examples/hello   # any directory of manifests
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
export PATH="$PWD/.tools/bin:$PATH"
cargo build --locked --bins -p weir -p weir-proxy -p weir-example-echo
exec target/debug/weir up -f "${1:-examples/events}" "${@:2}"
