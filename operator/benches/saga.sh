#!/usr/bin/env bash
# Saga benchmark: 3-step saga throughput (instances/s) against trivial step services, one
# instance's latency, and the time from a coordinator's kill -9 to the resumption of its
# instances by another replica. Prints a Markdown table.
#
#   operator/benches/saga.sh                 # release build
#   PROFILE=dev operator/benches/saga.sh     # quicker to build, slower to run
#   SAGA_BENCH_INSTANCES=5000 SAGA_BENCH_CLIENTS=64 operator/benches/saga.sh
#
# Needs nats-server (PATH, .tools/bin, or $NATS_SERVER; scripts/setup.sh installs it).
set -euo pipefail
cd "$(dirname "$0")/../.."
profile="${PROFILE:-release}"
args=(--test saga_bench -p weir)
if [[ "$profile" == "release" ]]; then
  args+=(--release)
fi
cargo test "${args[@]}" -- --ignored --nocapture --test-threads 1 saga_benchmark 2>&1 \
  | grep '^|'
