#!/usr/bin/env bash
# Starts the modern CRD API server (built or reused by build.sh) with its own etcd, both on
# loopback, and prints the path of an admin kubeconfig on its last line. Idempotent: when the
# server is already up and healthy it only prints the path.
#
#   export WEIR_MODERN_API_KUBECONFIG=$(tests/apiserver/up.sh | tail -1)
#   tests/apiserver/down.sh
#
# The server serves CustomResourceDefinitions and custom resources only: no core API and no
# group list. kube-rs and raw requests use it directly; kubectl goes through a small front that
# serves those two discovery documents: KUBECONFIG=/var/lib/weir-apiserver/kubectl.kubeconfig.
# See README.md beside this file.
source "$(dirname "$0")/lib.sh"

ETCD_PORT="${WEIR_APISERVER_ETCD_PORT:-23791}"
ETCD_PEER_PORT="${WEIR_APISERVER_ETCD_PEER_PORT:-23792}"
API_PORT="${WEIR_APISERVER_PORT:-26443}"
SHIM_PORT="${WEIR_APISERVER_KUBECTL_PORT:-26444}"
KUBECONFIG_ADMIN="$STATE/kubeconfig"
PKI="$STATE/pki"

# /healthz, not /readyz: readiness waits for an informer of core Services (used to resolve
# conversion webhooks) that can never sync without a core API; CRDs and custom resources are
# served regardless.
healthy() {
  [ -f "$KUBECONFIG_ADMIN" ] && curl -sf --max-time 2 --cacert "$PKI/ca.crt" --cert "$PKI/admin.crt" \
    --key "$PKI/admin.key" "https://127.0.0.1:$API_PORT/healthz" >/dev/null 2>&1 &&
  curl -sf --max-time 2 --cacert "$PKI/ca.crt" --cert "$PKI/admin.crt" \
    --key "$PKI/admin.key" "https://127.0.0.1:$SHIM_PORT/api" >/dev/null 2>&1
}

if healthy; then
  echo "$KUBECONFIG_ADMIN"
  exit 0
fi

V=$("$APISERVER_DIR/build.sh" | tail -1)
BIN="$V/bin/apiextensions-apiserver"
[ -x "$BIN" ] || die "no server binary at $BIN"
# What the scripts and the suite call; installed from Debian when missing (kubectl: any version
# will do, as for tests/cluster/).
missing=()
command -v openssl >/dev/null || missing+=(openssl)
command -v curl >/dev/null || missing+=(curl)
command -v kubectl >/dev/null || missing+=(kubernetes-client)
if [ ${#missing[@]} -gt 0 ]; then
  log "apt-get install ${missing[*]}"
  DEBIAN_FRONTEND=noninteractive apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

"$APISERVER_DIR/down.sh" >/dev/null 2>&1 || true
mkdir -p "$STATE/run" "$STATE/logs" "$PKI" "$STATE/etcd"

log "certificates (openssl, ECDSA P-256)"
(
  cd "$PKI"
  newkey() { openssl genpkey -algorithm EC -pkeyopt ec_paramgen_curve:P-256 -out "$1.key" 2>/dev/null; }
  newkey ca
  openssl req -x509 -new -key ca.key -subj "/CN=weir-modern-apiserver-ca" -days 3650 -out ca.crt 2>/dev/null
  sign() { # name subject extensions
    newkey "$1"
    openssl req -new -key "$1.key" -subj "$2" -out "$1.csr" 2>/dev/null
    printf '%s\n' "$3" > "$1.ext"
    openssl x509 -req -in "$1.csr" -CA ca.crt -CAkey ca.key -CAcreateserial -days 3650 \
      -extfile "$1.ext" -out "$1.crt" 2>/dev/null
  }
  sign serving "/CN=weir-modern-apiserver" \
    "subjectAltName=IP:127.0.0.1,DNS:localhost
extendedKeyUsage=serverAuth"
  # system:masters: the server's delegated authorization always allows that group.
  sign admin "/O=system:masters/CN=weir-test-admin" "extendedKeyUsage=clientAuth"
)

start() { # name command...
  local name=$1; shift
  setsid "$@" >>"$STATE/logs/$name.log" 2>&1 </dev/null 9>&- &
  echo $! > "$STATE/run/$name.pid"
}

log "etcd on 127.0.0.1:$ETCD_PORT"
start etcd "$TOOLS/bin/etcd" --name weir-modern --data-dir "$STATE/etcd" \
  --listen-client-urls "http://127.0.0.1:$ETCD_PORT" --advertise-client-urls "http://127.0.0.1:$ETCD_PORT" \
  --listen-peer-urls "http://127.0.0.1:$ETCD_PEER_PORT" --initial-advertise-peer-urls "http://127.0.0.1:$ETCD_PEER_PORT" \
  --initial-cluster "weir-modern=http://127.0.0.1:$ETCD_PEER_PORT" --log-level warn
for _ in $(seq 1 100); do
  curl -sf --max-time 1 "http://127.0.0.1:$ETCD_PORT/health" >/dev/null 2>&1 && break
  sleep 0.1
done
curl -sf --max-time 1 "http://127.0.0.1:$ETCD_PORT/health" >/dev/null || die "etcd did not start: $(tail -5 "$STATE/logs/etcd.log")"

# The server delegates authentication (TokenReview) and authorization (SubjectAccessReview) to
# a kube-apiserver, which this setup does not have. It needs a kubeconfig for both all the same
# (else it looks for an in-cluster one); it is given its own address, which is never asked:
# clients authenticate with certificates from ca.crt, and the group system:masters is always
# authorized.
cat > "$STATE/delegation.kubeconfig" <<EOF
apiVersion: v1
kind: Config
clusters: [{name: self, cluster: {server: "https://127.0.0.1:$API_PORT", certificate-authority: "$PKI/ca.crt"}}]
users: [{name: self, user: {client-certificate: "$PKI/admin.crt", client-key: "$PKI/admin.key"}}]
contexts: [{name: self, context: {cluster: self, user: self}}]
current-context: self
EOF

log "apiextensions-apiserver on 127.0.0.1:$API_PORT"
start apiserver "$BIN" \
  --authentication-kubeconfig "$STATE/delegation.kubeconfig" \
  --authorization-kubeconfig "$STATE/delegation.kubeconfig" \
  --kubeconfig "$STATE/delegation.kubeconfig" \
  --disable-admission-plugins NamespaceLifecycle,MutatingAdmissionPolicy,MutatingAdmissionWebhook,ValidatingAdmissionPolicy,ValidatingAdmissionWebhook \
  --enable-priority-and-fairness=false \
  --etcd-servers "http://127.0.0.1:$ETCD_PORT" \
  --bind-address 127.0.0.1 --secure-port "$API_PORT" \
  --tls-cert-file "$PKI/serving.crt" --tls-private-key-file "$PKI/serving.key" \
  --client-ca-file "$PKI/ca.crt" \
  --authentication-skip-lookup \
  --cert-dir "$STATE/certs"

# kubectl needs discovery of the core group and of the group list, which this server does not
# serve: a front on the next port answers those two and passes the rest (discovery-shim.py).
start kubectl-front python3 "$APISERVER_DIR/discovery-shim.py" "$SHIM_PORT" "$API_PORT" "$PKI"

for kc in "$KUBECONFIG_ADMIN:$API_PORT" "$STATE/kubectl.kubeconfig:$SHIM_PORT"; do
cat > "${kc%%:*}" <<EOF
apiVersion: v1
kind: Config
clusters:
- name: weir-modern
  cluster:
    server: https://127.0.0.1:${kc##*:}
    certificate-authority: $PKI/ca.crt
users:
- name: admin
  user:
    client-certificate: $PKI/admin.crt
    client-key: $PKI/admin.key
contexts:
- name: weir-modern
  context: {cluster: weir-modern, user: admin}
current-context: weir-modern
EOF
done

for _ in $(seq 1 300); do
  healthy && break
  if ! kill -0 "$(cat "$STATE/run/apiserver.pid")" 2>/dev/null; then
    die "the server exited: $(tail -20 "$STATE/logs/apiserver.log")"
  fi
  sleep 0.1
done
healthy || die "the server is not ready after 30 s: $(tail -20 "$STATE/logs/apiserver.log")"
log "ready"
echo "$KUBECONFIG_ADMIN"
