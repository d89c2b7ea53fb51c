#!/usr/bin/env bash
# The end-to-end suites on kind, for users with Docker: create a cluster, build and load
# Weir's images, install the chart, run the same suites CI runs on tests/cluster/.
#
#   tests/e2e/kind.sh                    # cluster "weir-e2e", deleted afterwards
#   KEEP=1 tests/e2e/kind.sh             # keep the cluster
#   KIND_NODE_IMAGE=kindest/node:v1.31.0 tests/e2e/kind.sh
#
# Needs docker, kind, kubectl and helm on PATH. Written for users; CI here has no Docker and
# runs tests/e2e/local-cluster.sh instead.
set -euo pipefail
cd "$(dirname "$0")/../.."
CLUSTER=${KIND_CLUSTER:-weir-e2e}
VERSION=$(sed -n 's/^version = "\(.*\)"/\1/p' Cargo.toml | head -1)
REGISTRY=${WEIR_IMAGE_REGISTRY:-ghcr.io/weir-dev}

for tool in docker kind kubectl helm cargo; do
  command -v "$tool" >/dev/null || { echo "kind.sh: $tool not found on PATH" >&2; exit 1; }
done

if ! kind get clusters | grep -qx "$CLUSTER"; then
  kind create cluster --name "$CLUSTER" ${KIND_NODE_IMAGE:+--image "$KIND_NODE_IMAGE"} --wait 120s
fi
cleanup() { [ "${KEEP:-0}" = 1 ] || kind delete cluster --name "$CLUSTER"; }
trap cleanup EXIT
export KUBECONFIG
KUBECONFIG=$(mktemp)
kind get kubeconfig --name "$CLUSTER" > "$KUBECONFIG"

# The same images users run: the Dockerfiles, built from the workspace root.
docker build -f operator/Dockerfile -t "$REGISTRY/weir:$VERSION" .
docker build -f sidecar/Dockerfile -t "$REGISTRY/weir-proxy:$VERSION" .
# The example app: the operator's build image is enough to compile it.
docker build -t "$REGISTRY/weir-echo:$VERSION" -f - . <<DOCKERFILE
FROM rust:1-bookworm AS build
WORKDIR /src
COPY . .
RUN cargo build --release --locked -p weir-example-echo
FROM gcr.io/distroless/cc-debian12:nonroot
COPY --from=build /src/target/release/weir-echo /usr/local/bin/weir-echo
ENTRYPOINT ["/usr/local/bin/weir-echo"]
DOCKERFILE
for image in weir weir-proxy weir-echo; do
  kind load docker-image --name "$CLUSTER" "$REGISTRY/$image:$VERSION"
done

minor=$(kubectl version -o json | python3 -c 'import json,sys; print(json.load(sys.stdin)["serverVersion"]["minor"].rstrip("+"))')
native=true
[ "$minor" -lt 29 ] && native=false
helm upgrade --install weir charts/weir -n weir-system --create-namespace --wait --timeout 180s \
  --set image.pullPolicy=IfNotPresent --set proxy.image.pullPolicy=IfNotPresent \
  --set sidecar.native=$native --set dashboard.enabled=true

WEIR_E2E=1 WEIR_E2E_OPERATOR=cluster WEIR_E2E_PODS=1 WEIR_E2E_PULL_POLICY=IfNotPresent \
  cargo test --locked -p weir-e2e -- --nocapture --test-threads 1
