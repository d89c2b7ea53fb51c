#!/usr/bin/env bash
# The cost of mutual TLS on the sidecar-to-sidecar hop, measured in one run on one machine:
#
# 1. CPU per request of the two sidecars of a call (the caller's, the callee's) on reused
#    connections, mutual TLS against plaintext: `weir up` runs front -> back (weir-echo apps)
#    twice, with its CA (the default) and with --no-mtls; wrk (1 thread, MTLS_CONNECTIONS
#    keep-alive connections, GET /) calls front's outbound listener for back, so each request
#    crosses front's sidecar, the hop (HTTP/2, one connection), back's sidecar and back's app.
#    Both sidecars' CPU from /proc/<pid>/stat over the measured run, divided by wrk's requests.
# 2. New mutual-TLS connections per second per core on the callee's sidecar: `openssl s_time
#    -new` with a certificate of the run's CA for default/front (full TLS 1.3 handshakes, no
#    resumption), back's sidecar's CPU over the run.
# 3. The same hop between two Envoys, in the same run: a caller's Envoy (HTTP/1.1 in, HTTP/2
#    out) and a callee's Envoy (HTTP/2 in, HTTP/1.1 to a weir-echo), plaintext and then TLS 1.3
#    with client certificates both ways (an openssl CA of the run), both Envoys' CPU per
#    request, one worker each, on the sidecars' CPU.
#
#   sidecar/benches/mtls.sh
#
# The sidecars run on CPU BENCH_CPU_PROXY, wrk, openssl and the apps on BENCH_CPU_LOAD.
# Env (defaults): BENCH_DURATION=10 BENCH_WARMUP=3 MTLS_CONNECTIONS=16 BENCH_CPU_LOAD=0
# BENCH_CPU_PROXY=1 BENCH_NO_BUILD=1 (skip cargo build) MTLS_ENVOY_PORT=19400 (five ports from
# it, for the Envoys and their app). Everything started is stopped on exit.
set -euo pipefail
cd "$(dirname "$0")/../.."
ROOT=$PWD
DURATION=${BENCH_DURATION:-10}
WARMUP=${BENCH_WARMUP:-3}
CONNS=${MTLS_CONNECTIONS:-16}
CPU_LOAD=${BENCH_CPU_LOAD:-0}
CPU_PROXY=${BENCH_CPU_PROXY:-1}
TARGET_DIR=${CARGO_TARGET_DIR:-$ROOT/target}
export PATH="$ROOT/.tools/bin:/usr/sbin:$PATH"

BENCH_NAME=mtls-bench
# shellcheck source=sidecar/benches/lib.sh
. "$ROOT/sidecar/benches/lib.sh"

need_tools wrk taskset curl jq openssl envoy
build_release -p weir -p weir-proxy -p weir-example-echo
WEIR=$TARGET_DIR/release/weir
for b in "$WEIR" "$TARGET_DIR/release/weir-proxy" "$TARGET_DIR/release/weir-echo"; do
  [ -x "$b" ] || { log "missing $b"; exit 1; }
done
bench_workdir

cat >"$WORK/services.yaml" <<'EOF'
apiVersion: weir.dev/v1alpha1
kind: Microservice
metadata:
  name: front
  annotations: {weir.dev/local-command: weir-echo}
spec:
  image: weir-echo
  dependencies: [{name: back, microservice: back, timeout: 5s}]
---
apiVersion: weir.dev/v1alpha1
kind: Microservice
metadata:
  name: back
  annotations: {weir.dev/local-command: weir-echo}
spec:
  image: weir-echo
EOF

UP_PID=
up() { # extra weir up args...
  rm -f "$WORK/state.json"
  "$WEIR" up -f "$WORK/services.yaml" --any-port --state-file "$WORK/state.json" \
    --work-dir "$WORK/run-$#" "$@" >"$WORK/up-$#.log" 2>&1 &
  UP_PID=$!
  PIDS+=("$UP_PID")
  local deadline=$((SECONDS + 60))
  until [ -s "$WORK/state.json" ]; do
    [ "$SECONDS" -lt "$deadline" ] || { log "weir up not ready"; exit 1; }
    kill -0 "$UP_PID" 2>/dev/null || { log "weir up exited"; exit 1; }
    sleep 0.2
  done
  state() { jq -r "$1" "$WORK/state.json"; }
  FRONT_PROXY=$(state .services.front.proxyPid)
  BACK_PROXY=$(state .services.back.proxyPid)
  OUT=$(state '.services.front.outbound[0]')
  BACK_IN=$(state .services.back.inbound)
  # The sidecars on their CPU, the apps beside the load generator.
  for p in "$FRONT_PROXY" "$BACK_PROXY"; do taskset -a -pc "$CPU_PROXY" "$p" >/dev/null; done
  for p in $(state .services.front.pid) $(state .services.back.pid); do taskset -a -pc "$CPU_LOAD" "$p" >/dev/null; done
  wait_http "http://127.0.0.1:$OUT/"
}
down() {
  stop "$UP_PID"
}

declare -A RPS US
measure() { # label
  local label=$1 f0 b0 f1 b1 out reqs
  taskset -c "$CPU_LOAD" wrk -t1 -c"$CONNS" -d"${WARMUP}s" "http://127.0.0.1:$OUT/" >/dev/null
  f0=$(cpu_ticks "$FRONT_PROXY"); b0=$(cpu_ticks "$BACK_PROXY")
  out=$(taskset -c "$CPU_LOAD" wrk -t1 -c"$CONNS" -d"${DURATION}s" "http://127.0.0.1:$OUT/")
  f1=$(cpu_ticks "$FRONT_PROXY"); b1=$(cpu_ticks "$BACK_PROXY")
  reqs=$(awk '/requests in/ {print $1}' <<<"$out")
  if grep -q 'Non-2xx' <<<"$out"; then log "$label: non-2xx answers:"; echo "$out" >&2; exit 1; fi
  RPS[$label]=$(awk -v r="$reqs" -v d="$DURATION" 'BEGIN {printf "%.0f", r / d}')
  US[$label]=$(awk -v t=$((f1 - f0 + b1 - b0)) -v r="$reqs" -v hz="$CLK_TCK" 'BEGIN {printf "%.1f", t * 1e6 / hz / r}')
  log "$label: ${RPS[$label]} req/s, ${US[$label]} us of sidecar CPU per request (both sidecars)"
}

log "plaintext between the sidecars (weir up --no-mtls)"
up --no-mtls
measure plaintext
down

log "mutual TLS between the sidecars (weir up's CA)"
up
# The hop really is mutual TLS: back's sidecar counts front as a verified caller.
metrics=$(curl -fsS "http://127.0.0.1:$(jq -r .services.back.admin "$WORK/state.json")/metrics")
grep -q 'weir_inbound_authorizations_total{transport="mtls",caller="default/front",decision="allowed"}' <<<"$metrics" \
  || { log "back's sidecar saw no mutual-TLS caller"; exit 1; }
measure mtls

# New handshakes against back's sidecar, as default/front, with a certificate of the run's CA.
M=$(dirname "$(jq -r .mtls.issuerKey "$WORK/state.json")")
openssl ecparam -genkey -name prime256v1 2>/dev/null | openssl pkcs8 -topk8 -nocrypt -out "$WORK/k.pem"
openssl req -new -key "$WORK/k.pem" -subj /CN=front -out "$WORK/r.csr" \
  -addext subjectAltName=URI:spiffe://cluster.local/ns/default/ms/front 2>/dev/null
openssl x509 -req -in "$WORK/r.csr" -CA "$M/issuer.pem" -CAkey "$M/issuer.key" -days 1 \
  -copy_extensions copy 2>/dev/null | cat - "$M/issuer.pem" >"$WORK/chain.pem"
b0=$(cpu_ticks "$BACK_PROXY")
st=$(taskset -c "$CPU_LOAD" openssl s_time -connect "127.0.0.1:$BACK_IN" -new -tls1_3 \
  -cert "$WORK/chain.pem" -key "$WORK/k.pem" -time "$DURATION" 2>&1 || true)
b1=$(cpu_ticks "$BACK_PROXY")
conns=$(awk '/connections in .* real seconds/ {print $1; exit}' <<<"$st")
[ -n "$conns" ] || { log "openssl s_time: $st"; exit 1; }
per_core=$(awk -v c="$conns" -v t=$((b1 - b0)) -v hz="$CLK_TCK" 'BEGIN {printf "%.0f", c / (t / hz)}')
per_s=$(awk -v c="$conns" -v d="$DURATION" 'BEGIN {printf "%.0f", c / d}')
down

# 3. Two Envoys: the caller's (A) and the callee's (B), in front of a weir-echo.
EB=${MTLS_ENVOY_PORT:-19400}
P_EA=$EB P_EB=$((EB + 1)) P_AA=$((EB + 2)) P_AB=$((EB + 3)) P_APP=$((EB + 4))
ports_free "$P_EA" "$P_APP" MTLS_ENVOY_PORT
openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -days 1 -subj /CN=bench-ca \
  -keyout "$WORK/ca.key" -out "$WORK/ca.crt" 2>/dev/null
for who in caller callee; do
  openssl req -new -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -subj "/CN=$who" \
    -keyout "$WORK/$who.key" -out "$WORK/$who.csr" -addext "subjectAltName=DNS:$who" 2>/dev/null
  openssl x509 -req -in "$WORK/$who.csr" -CA "$WORK/ca.crt" -CAkey "$WORK/ca.key" -days 1 \
    -copy_extensions copy -out "$WORK/$who.crt" 2>/dev/null
done
tls_context() { # who (its certificate), peer SAN to require or "" ; the common_tls_context
  cat <<YAML
          common_tls_context:
            tls_params: {tls_minimum_protocol_version: TLSv1_3, tls_maximum_protocol_version: TLSv1_3}
            alpn_protocols: [h2]
            tls_certificates: [{certificate_chain: {filename: $WORK/$1.crt}, private_key: {filename: $WORK/$1.key}}]
            validation_context:
              trusted_ca: {filename: $WORK/ca.crt}
YAML
  [ -z "$2" ] || echo "              match_typed_subject_alt_names: [{san_type: DNS, matcher: {exact: $2}}]"
}
hcm() { # stat prefix, cluster
  cat <<YAML
      - name: envoy.filters.network.http_connection_manager
        typed_config:
          "@type": type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager
          stat_prefix: $1
          codec_type: AUTO
          route_config: {virtual_hosts: [{name: all, domains: ["*"], routes: [{match: {prefix: "/"}, route: {cluster: $2, timeout: 5s}}]}]}
          http_filters: [{name: envoy.filters.http.router, typed_config: {"@type": type.googleapis.com/envoy.extensions.filters.http.router.v3.Router}}]
YAML
}
envoy_pair() { # plaintext|mtls: writes $WORK/envoy-a.yaml and envoy-b.yaml
  {
    cat <<YAML
admin: {address: {socket_address: {address: 127.0.0.1, port_value: $P_AA}}}
static_resources:
  listeners:
  - name: out
    address: {socket_address: {address: 127.0.0.1, port_value: $P_EA}}
    filter_chains:
    - filters:
YAML
    hcm out hop
    cat <<YAML
  clusters:
  - name: hop
    type: STATIC
    connect_timeout: 1s
    typed_extension_protocol_options:
      envoy.extensions.upstreams.http.v3.HttpProtocolOptions:
        "@type": type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions
        explicit_http_config: {http2_protocol_options: {}}
    load_assignment: {cluster_name: hop, endpoints: [{lb_endpoints: [{endpoint: {address: {socket_address: {address: 127.0.0.1, port_value: $P_EB}}}}]}]}
YAML
    if [ "$1" = mtls ]; then
      cat <<YAML
    transport_socket:
      name: envoy.transport_sockets.tls
      typed_config:
        "@type": type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.UpstreamTlsContext
        sni: callee
YAML
      tls_context caller callee | sed 's/^  //'
    fi
  } >"$WORK/envoy-a.yaml"
  {
    cat <<YAML
admin: {address: {socket_address: {address: 127.0.0.1, port_value: $P_AB}}}
static_resources:
  listeners:
  - name: in
    address: {socket_address: {address: 127.0.0.1, port_value: $P_EB}}
    filter_chains:
    - filters:
YAML
    hcm in app
    if [ "$1" = mtls ]; then
      cat <<YAML
      transport_socket:
        name: envoy.transport_sockets.tls
        typed_config:
          "@type": type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.DownstreamTlsContext
          require_client_certificate: true
YAML
      tls_context callee ""
    fi
    cat <<YAML
  clusters:
  - name: app
    type: STATIC
    connect_timeout: 1s
    load_assignment: {cluster_name: app, endpoints: [{lb_endpoints: [{endpoint: {address: {socket_address: {address: 127.0.0.1, port_value: $P_APP}}}}]}]}
YAML
  } >"$WORK/envoy-b.yaml"
}
PORT=$P_APP start envoy-app "$CPU_LOAD" "$TARGET_DIR/release/weir-echo"
APP_PID=$START_PID
wait_http "http://127.0.0.1:$P_APP/"
for mode in plaintext mtls; do
  log "two Envoys, $mode between them"
  envoy_pair "$mode"
  start "envoy-b-$mode" "$CPU_PROXY" envoy -c "$WORK/envoy-b.yaml" --concurrency 1 --log-level warn --base-id 41
  EB_PID=$START_PID
  start "envoy-a-$mode" "$CPU_PROXY" envoy -c "$WORK/envoy-a.yaml" --concurrency 1 --log-level warn --base-id 42
  EA_PID=$START_PID
  wait_http "http://127.0.0.1:$P_EA/"
  FRONT_PROXY=$EA_PID BACK_PROXY=$EB_PID OUT=$P_EA
  measure "envoy-$mode"
  if [ "$mode" = mtls ]; then
    # The hop really is TLS with a client certificate: the callee's Envoy counts handshakes.
    hs=$(curl -fsS "http://127.0.0.1:$P_AB/stats" | awk -F': ' '/^listener\..*ssl\.handshake:/ {s += $2} END {print s + 0}')
    [ "$hs" -ge 1 ] || { log "the callee's Envoy saw no TLS handshake"; exit 1; }
    nocert=$(curl -fsS "http://127.0.0.1:$P_AB/stats" | awk -F': ' '/ssl\.no_certificate:/ {s += $2} END {print s + 0}')
    [ "$nocert" -eq 0 ] || { log "the callee's Envoy saw handshakes without a client certificate"; exit 1; }
  fi
  stop "$EA_PID"
  stop "$EB_PID"
done
stop "$APP_PID"

ratio=$(awk -v m="${US[mtls]}" -v p="${US[plaintext]}" 'BEGIN {printf "%.2f", m / p}')
eratio=$(awk -v m="${US[envoy-mtls]}" -v p="${US[envoy-plaintext]}" 'BEGIN {printf "%.2f", m / p}')
target=$(awk -v r="$ratio" 'BEGIN {print (r <= 1.15) ? "met" : "missed"}')
cat <<EOF

| sidecar-to-sidecar hop ($CONNS connections, ${DURATION}s) | req/s | sidecar CPU per request (both) |
|---|---|---|
| plaintext | ${RPS[plaintext]} | ${US[plaintext]} us |
| mutual TLS 1.3 | ${RPS[mtls]} | ${US[mtls]} us |
| mutual TLS / plaintext | | ${ratio}x (target <= 1.15: $target) |

New mutual-TLS connections (full TLS 1.3 handshakes, openssl s_time -new): $per_s/s offered by
one client, $per_core per second per core of the callee's sidecar.

| the same hop between two Envoys (same run) | req/s | Envoy CPU per request (both) |
|---|---|---|
| plaintext (h2c) | ${RPS[envoy-plaintext]} | ${US[envoy-plaintext]} us |
| mutual TLS 1.3 | ${RPS[envoy-mtls]} | ${US[envoy-mtls]} us |
| mutual TLS / plaintext | | ${eratio}x |
EOF
