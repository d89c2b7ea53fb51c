#!/usr/bin/env bash
# The end-to-end suites on the local single-node cluster (tests/cluster/), as CI runs them:
# bring the cluster up (cached builds), import Weir's images, `helm install` the chart with
# the operator in a pod, run the suites, tear the cluster down.
#
#   tests/e2e/local-cluster.sh            # everything, then tear down
#   WEIR_KEEP_CLUSTER=1 tests/e2e/local-cluster.sh   # leave the cluster up afterwards
#   WEIR_E2E_SCALE=1 ...                  # also the 1,000-Microservice scale benchmark
#   WEIR_E2E_FILTER=NAME ...              # only the tests whose name contains NAME
set -euo pipefail
cd "$(dirname "$0")/../.."
ROOT=$PWD
export PATH="$ROOT/.tools/bin:$PATH"
VERSION=$(sed -n 's/^version = "\(.*\)"/\1/p' Cargo.toml | head -1)

KUBECONFIG=$(tests/cluster/up.sh | tail -1)
export KUBECONFIG
teardown() {
  if [ "${WEIR_KEEP_CLUSTER:-0}" != 1 ]; then tests/cluster/down.sh || true; fi
}
trap teardown EXIT

tests/e2e/images.sh

minor=$(kubectl version -o json 2>/dev/null | python3 -c 'import json,sys; print(json.load(sys.stdin)["serverVersion"]["minor"].rstrip("+"))')
native=true
[ "$minor" -lt 29 ] && native=false
# When the operator does not become ready, say why: the pods, their events and the
# operator's log are what a reader of CI needs, not only helm's "context deadline exceeded".
diagnose() {
  echo "== helm install failed; the operator's namespace as the cluster sees it" >&2
  kubectl get pods -n weir-system -o wide >&2 || true
  kubectl describe pods -n weir-system >&2 || true
  kubectl get events -n weir-system --sort-by=.lastTimestamp >&2 || true
  kubectl logs -n weir-system -l app.kubernetes.io/name=weir --all-containers --tail 200 >&2 || true
  kubectl logs -n weir-system -l app.kubernetes.io/name=weir --all-containers --previous --tail 100 >&2 || true
  kubectl logs -n weir-system -l app.kubernetes.io/component=dashboard --tail 100 >&2 || true
}
install() {
  helm upgrade --install weir charts/weir -n weir-system --create-namespace --wait --timeout 180s \
    --set image.pullPolicy=Never --set proxy.image.pullPolicy=Never \
    --set image.tag="$VERSION" --set proxy.image.tag="$VERSION" \
    --set sidecar.native=$native --set logLevel=info --set mtls.enabled=true --set mtls.mode=permissive \
    --set dashboard.enabled=true
}
# One more try after the diagnosis: a node that was slow to take the first pod (image
# unpacking, a kubelet still settling) should not fail the whole suite; an operator that
# cannot start fails twice, with the reason printed above.
if ! install; then
  diagnose
  echo "== helm install: second and last try" >&2
  install || { diagnose; exit 1; }
fi

kubectl get pods -n weir-system -o wide
cargo build --locked -p weir
NATS_VERSION=$(nats-server --version | sed -n 's/.*v\([0-9.]*\).*/\1/p')
WEIR_E2E_NATS_IMAGE="weir-e2e/nats:$NATS_VERSION" WEIR_E2E_REDIS_IMAGE=weir-e2e/redis:local \
WEIR_E2E=1 WEIR_E2E_OPERATOR=cluster WEIR_E2E_PODS=1 WEIR_E2E_PULL_POLICY=Never \
  cargo test --locked --no-fail-fast -p weir-e2e -- --nocapture --test-threads 1 ${WEIR_E2E_FILTER:+"$WEIR_E2E_FILTER"}
