#!/usr/bin/env bash
# Pub/sub benchmark, per broker (nats-server, redis-server, rabbitmq-server, Tansu for Kafka):
# the raw client's publish-with-confirmation vs publish through weir-proxy (schema validation
# on), and end-to-end consume throughput into a trivial app. Prints one Markdown table.
#   sidecar/benches/pubsub.sh      (PUBSUB_N=20000 PUBSUB_CONCURRENCY=64
#                                   PUBSUB_BROKERS=nats,redis,rabbitmq,kafka by default)
set -euo pipefail
cd "$(dirname "$0")/../.."
if { [ ! -x .tools/bin/nats-server ] && ! command -v nats-server >/dev/null; } \
  || ! command -v redis-server >/dev/null || [ ! -x /usr/lib/rabbitmq/bin/rabbitmq-server ] \
  || { [ ! -x .tools/bin/tansu ] && ! command -v tansu >/dev/null; }; then
  scripts/setup.sh
fi
export PATH="$PWD/.tools/bin:$PATH"
exec cargo bench -p weir-proxy --bench pubsub "$@"
