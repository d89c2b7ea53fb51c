#!/usr/bin/env bash
# Weir's main command: installs what is missing, builds weir, weir-proxy and the example apps,
# and runs the shop (examples/shop) on this machine with `weir up` (no cluster needed): six
# services with their sidecars, a nats-server, the queues and the place-order saga coordinator.
#
#   scripts/run.sh                   # the shop; the gateway on http://127.0.0.1:8080
#   scripts/run.sh examples/events   # any directory of manifests
#   scripts/run.sh examples/shop --otlp-endpoint http://127.0.0.1:4318   # extra weir up flags
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
export PATH="$PWD/.tools/bin:$PATH"
cargo build --locked --bins -p weir -p weir-proxy -p weir-example-echo -p weir-example-shop
exec target/debug/weir up -f "${1:-examples/shop}" "${@:2}"
