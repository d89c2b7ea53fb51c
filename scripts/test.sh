#!/usr/bin/env bash
# Weir's test command: installs what is missing, then runs every test and check that needs no
# cluster. With WEIR_E2E=1 and a KUBECONFIG, the end-to-end suites in tests/ run against that
# cluster too (they say that they skipped otherwise).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
export PATH="$PWD/.tools/bin:$PATH"

echo "== cargo test (workspace)"
cargo build --workspace --locked --bins
cargo test --workspace --locked

if [ "${WEIR_E2E:-}" != 1 ]; then
  echo "NOTE: end-to-end suites SKIPPED (no cluster): set WEIR_E2E=1 and KUBECONFIG to run them (tests/README.md)"
fi

echo "== chart checks"
charts/check.sh

echo "== rendered examples validate against the Kubernetes schema"
out=$(mktemp)
trap 'rm -f "$out"' EXIT
cargo run -q --locked -p weir -- render -f examples/ > "$out"
kubernetes-validate --strict --kubernetes-version 1.33 "$out"
cargo run -q --locked -p weir -- render -f examples/ --legacy-sidecar > "$out"
kubernetes-validate --strict --kubernetes-version 1.25 "$out"
echo "scripts/test.sh: all checks passed"
