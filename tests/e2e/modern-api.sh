#!/usr/bin/env bash
# The CRD suite against a real Kubernetes 1.36 API server (tests/apiserver/: apiextensions-
# apiserver built from Debian sid's Go sources, cached outside the checkout), as CI runs it:
# bring the server up, run tests/tests/modern_api.rs, tear the server down.
#
#   tests/e2e/modern-api.sh                     # everything, then tear down
#   WEIR_KEEP_APISERVER=1 tests/e2e/modern-api.sh   # leave the server up afterwards
set -euo pipefail
cd "$(dirname "$0")/../.."

WEIR_MODERN_API_KUBECONFIG=$(tests/apiserver/up.sh | tail -1)
export WEIR_MODERN_API_KUBECONFIG
teardown() {
  if [ "${WEIR_KEEP_APISERVER:-0}" != 1 ]; then tests/apiserver/down.sh || true; fi
}
trap teardown EXIT

# `weir render` is half of the parity check.
cargo build --locked -p weir --bin weir
cargo test --locked -p weir-e2e --test modern_api -- --nocapture
