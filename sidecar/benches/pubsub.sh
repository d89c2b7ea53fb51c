#!/usr/bin/env bash
# Pub/sub benchmark: raw async-nats publish-with-ack vs publish through weir-proxy (schema
# validation on), and end-to-end consume throughput into a trivial app. Prints a Markdown table.
#   sidecar/benches/pubsub.sh             (PUBSUB_N=20000 PUBSUB_CONCURRENCY=64 by default)
set -euo pipefail
cd "$(dirname "$0")/../.."
if [ ! -x .tools/bin/nats-server ] && ! command -v nats-server >/dev/null; then
  scripts/setup.sh
fi
export PATH="$PWD/.tools/bin:$PATH"
exec cargo bench -p weir-proxy --bench pubsub "$@"
