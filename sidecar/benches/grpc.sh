#!/usr/bin/env bash
# gRPC proxy benchmark: unary gRPC through weir-proxy (every policy on), Envoy, HAProxy
# (`proto h2`) and nginx (`grpc_pass`, when its build has it), in one run on one machine.
#
#   sidecar/benches/grpc.sh
#
# h2load (nghttp2) sends `shop.Inventory/Check` (a 12-byte framed message) to the example's
# tonic server (weir-grpc-inventory, release build) directly or through each proxy: 1 thread,
# GRPC_BENCH_CONNECTIONS connections with GRPC_BENCH_STREAMS concurrent streams each. h2load and
# the server are pinned to CPU BENCH_CPU_LOAD, the proxy under test to CPU BENCH_CPU_PROXY with
# one worker/thread. Every target gets a BENCH_WARMUP s warm-up, then a BENCH_DURATION s
# measured run; p50/p99 come from h2load's per-request log, proxy CPU per request from
# /proc/<pid>/stat (utime+stime) over the measured run, peak RSS from VmHWM. Before measuring,
# one call through each target must end with `grpc-status: 0`.
#
# Env (defaults): BENCH_DURATION=10 BENCH_WARMUP=3 GRPC_BENCH_CONNECTIONS=8
# GRPC_BENCH_STREAMS=4 BENCH_CPU_LOAD=0 BENCH_CPU_PROXY=1 GRPC_BENCH_PORT_BASE=18180 (uses 10
# ports from there) BENCH_NO_BUILD=1 (skip cargo build). Everything listens on 127.0.0.1 only;
# every process the script starts is stopped on exit.
set -euo pipefail
cd "$(dirname "$0")/../.."
ROOT=$PWD
DURATION=${BENCH_DURATION:-10}
WARMUP=${BENCH_WARMUP:-3}
CONNS=${GRPC_BENCH_CONNECTIONS:-8}
STREAMS=${GRPC_BENCH_STREAMS:-4}
CPU_LOAD=${BENCH_CPU_LOAD:-0}
CPU_PROXY=${BENCH_CPU_PROXY:-1}
BASE=${GRPC_BENCH_PORT_BASE:-18180}
TARGET_DIR=${CARGO_TARGET_DIR:-$ROOT/target}
export PATH="$ROOT/.tools/bin:/usr/sbin:$PATH"

P_UP=$BASE
P_WEIR_IN=$((BASE + 1))
P_WEIR_OUT=$((BASE + 2))
P_WEIR_ADMIN=$((BASE + 3))
P_NGINX=$((BASE + 4))
P_HAPROXY=$((BASE + 5))
P_ENVOY=$((BASE + 6))
P_ENVOY_ADMIN=$((BASE + 7))
P_UNUSED=$((BASE + 8)) # otlp endpoint: never contacted with sampling 0

BENCH_NAME=grpc-bench
# shellcheck source=sidecar/benches/lib.sh
. "$ROOT/sidecar/benches/lib.sh"

need_tools h2load haproxy envoy nginx taskset curl
build_release -p weir-proxy -p weir-example-grpc
WEIR=$TARGET_DIR/release/weir-proxy
SERVER=$TARGET_DIR/release/weir-grpc-inventory
if [ ! -x "$WEIR" ] || [ ! -x "$SERVER" ]; then log "missing $WEIR or $SERVER"; exit 1; fi

bench_workdir

ports_free "$BASE" $((BASE + 9)) GRPC_BENCH_PORT_BASE

# StockQuery { sku: "apple" }, framed: uncompressed, 7 bytes.
printf '\x00\x00\x00\x00\x07\x0a\x05apple' >"$WORK/check.bin"
grpc_ok() { # base-url [seconds]: until one Check ends with grpc-status 0
  local url=$1/shop.Inventory/Check deadline=$((SECONDS + ${2:-20}))
  while [ "$SECONDS" -lt "$deadline" ]; do
    if curl -sv --http2-prior-knowledge --max-time 2 -H 'content-type: application/grpc' \
      -H 'te: trailers' --data-binary @"$WORK/check.bin" -o /dev/null "$url" 2>&1 |
      grep -qi '^< grpc-status: 0'; then
      return 0
    fi
    sleep 0.2
  done
  log "no grpc-status 0 from $url"; return 1
}

# --- configs ----------------------------------------------------------------------------------
cat >"$WORK/haproxy.cfg" <<EOF
global
  nbthread 1
  maxconn 4000
defaults
  mode http
  timeout connect 5s
  timeout client 120s
  timeout server 120s
  http-reuse always
frontend fe
  bind 127.0.0.1:$P_HAPROXY proto h2
  default_backend be
backend be
  server up 127.0.0.1:$P_UP proto h2
EOF

{
  envoy_head AUTO 'cluster: up'
  cat <<EOF
    typed_extension_protocol_options:
      envoy.extensions.upstreams.http.v3.HttpProtocolOptions:
        "@type": type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions
        explicit_http_config: {http2_protocol_options: {}}
    load_assignment:
      cluster_name: up
      endpoints: [{lb_endpoints: [{endpoint: {address: {socket_address: {address: 127.0.0.1, port_value: $P_UP}}}}]}]
EOF
} >"$WORK/envoy.yaml"

NGINX_GRPC=0
if nginx -V 2>&1 | grep -q -- '--with-http_v2_module' && ! nginx -V 2>&1 | grep -q -- '--without-http_grpc_module'; then
  NGINX_GRPC=1
  cat >"$WORK/nginx.conf" <<EOF
daemon off;
master_process off;
worker_processes 1;
pid $WORK/nginx.pid;
error_log $WORK/nginx.err warn;
events { worker_connections 4096; }
http {
  access_log off;
  client_body_temp_path $WORK/body;
  # Requests per client connection: 1000 by default, after which nginx closes it.
  keepalive_requests 10000000;
  upstream up { server 127.0.0.1:$P_UP; keepalive 64; keepalive_requests 10000000; }
  server {
    listen 127.0.0.1:$P_NGINX http2;
    location / { grpc_pass grpc://up; }
  }
}
EOF
fi

# weir-proxy: the app spoken to in HTTP/2 (spec.protocol: grpc); every inbound policy on, and an
# outbound listener with timeout, retries (UNAVAILABLE), breaker on gRPC statuses, bulkhead and
# a gRPC fallback.
cat >"$WORK/weir.json" <<EOF
{"service":"bench","namespace":"bench",
 "inbound":{"listen":"127.0.0.1:$P_WEIR_IN","app":"127.0.0.1:$P_UP","appProtocol":"http2","timeoutMs":5000,
   "maxConcurrent":64,"maxQueue":0,"rateLimit":{"requestsPerSecond":10000000,"burst":1000000},
   "maxBodyBytes":1048576},
 "admin":{"listen":"127.0.0.1:$P_WEIR_ADMIN"},
 "outbound":[{"name":"inventory","listen":"127.0.0.1:$P_WEIR_OUT","protocol":"http2",
   "upstream":"http://127.0.0.1:$P_UP","timeoutMs":5000,
   "retry":{"attempts":3,"backoffBaseMs":10,"backoffMaxMs":100,"grpcStatuses":[14],
     "budget":{"ratio":0.2,"minPerSecond":10,"ttlMs":10000}},
   "circuitBreaker":{"errorThresholdPercentage":50,"volumeThreshold":20,"rollingWindowMs":10000,
     "buckets":10,"resetTimeoutMs":5000,
     "failureOn":{"status5xx":true,"connectErrors":true,"timeouts":true,"grpcStatuses":[2,4,13,14,15]}},
   "bulkhead":{"maxConcurrent":64,"maxQueue":0},
   "fallback":{"status":200,"body":"","contentType":"text/plain","grpcStatus":14,"grpcMessage":"resting"}}],
 "tracing":{"otlpEndpoint":"http://127.0.0.1:$P_UNUSED","samplingRatio":0},
 "shutdownGraceMs":1000}
EOF

# --- measurement ------------------------------------------------------------------------------
ROWS=()
measure() { # label base-url pid ('-' = no proxy)
  local label=$1 url=$2 pid=$3 t0 t1 out
  grpc_ok "$url"
  local args=(-t1 -c"$CONNS" -m"$STREAMS" -d "$WORK/check.bin"
    -H 'content-type: application/grpc' -H 'te: trailers')
  taskset -c "$CPU_LOAD" h2load "${args[@]}" -D "$WARMUP" "$url/shop.Inventory/Check" >/dev/null
  [ "$pid" = - ] || t0=$(cpu_ticks "$pid")
  out=$(taskset -c "$CPU_LOAD" h2load "${args[@]}" -D "$DURATION" --log-file="$WORK/requests.tsv" \
    "$url/shop.Inventory/Check")
  local cpu=- rss=-
  local done_n ok rps p50 p99
  done_n=$(sed -n 's/^requests: .* \([0-9]*\) done.*/\1/p' <<<"$out")
  ok=$(sed -n 's/^status codes: \([0-9]*\) 2xx.*/\1/p' <<<"$out")
  rps=$(sed -n 's/^finished in .*, \([0-9.]*\) req\/s.*/\1/p' <<<"$out")
  read -r p50 p99 < <(cut -f3 "$WORK/requests.tsv" | sort -n | awk '{v[NR] = $1} END {
    i50 = int(NR * 0.50); if (i50 < 1) i50 = 1; i99 = int(NR * 0.99); if (i99 < 1) i99 = 1
    printf "%d %d\n", v[i50], v[i99] }')
  if [ "$pid" != - ]; then
    t1=$(cpu_ticks "$pid")
    cpu=$(awk -v d=$((t1 - t0)) -v hz="$CLK_TCK" -v n="$done_n" 'BEGIN {printf "%.1f", d * 1e6 / hz / n}')
    rss=$(awk -v k="$(hwm_kb "$pid")" 'BEGIN {printf "%.1f", k / 1024}')
  fi
  ROWS+=("$label|$rps|$p50|$p99|$cpu|$rss|$((done_n - ${ok:-0}))")
  log "$label: $rps req/s, p50 ${p50} µs, p99 ${p99} µs, done $done_n, 2xx ${ok:-0}, cpu_us_per_req=$cpu peak_rss_mib=$rss"
}

LOAD_BEFORE=$(cut -d' ' -f1-3 /proc/loadavg)
log "load average before: $LOAD_BEFORE; $(nproc) CPUs; h2load+server on CPU $CPU_LOAD, proxy on CPU $CPU_PROXY"

start server "$CPU_LOAD" env PORT="$P_UP" BIND=127.0.0.1 "$SERVER"
measure "direct (tonic server, no proxy)" "http://127.0.0.1:$P_UP" -

start weir-in "$CPU_PROXY" "$WEIR" --config "$WORK/weir.json" --workers 1 --no-access-log
pid=$START_PID
measure "weir-proxy inbound (all policies)" "http://127.0.0.1:$P_WEIR_IN" "$pid"
stop "$pid"
start weir-out "$CPU_PROXY" "$WEIR" --config "$WORK/weir.json" --workers 1 --no-access-log
pid=$START_PID
measure "weir-proxy outbound (timeout, retry, breaker, bulkhead, fallback)" "http://127.0.0.1:$P_WEIR_OUT" "$pid"
stop "$pid"

if [ "$NGINX_GRPC" = 1 ]; then
  start nginx "$CPU_PROXY" nginx -e "$WORK/nginx.err" -p "$WORK" -c "$WORK/nginx.conf"
  pid=$START_PID
  measure "nginx $(nginx -v 2>&1 | grep -o '[0-9.]*$') (grpc_pass)" "http://127.0.0.1:$P_NGINX" "$pid"
  stop "$pid"
else
  log "nginx: this build has no HTTP/2 or gRPC module; no nginx row"
fi

start haproxy "$CPU_PROXY" haproxy -db -f "$WORK/haproxy.cfg"
pid=$START_PID
measure "HAProxy $(haproxy -v | awk 'NR==1 {print $3}') (proto h2)" "http://127.0.0.1:$P_HAPROXY" "$pid"
stop "$pid"

start envoy "$CPU_PROXY" envoy -c "$WORK/envoy.yaml" --concurrency 1 --disable-hot-restart -l warning
pid=$START_PID
measure "Envoy $(envoy --version 2>/dev/null | grep -o '/[0-9.]*/' | tr -d / | head -1) (--concurrency 1)" "http://127.0.0.1:$P_ENVOY" "$pid"
stop "$pid"
LOAD_AFTER=$(cut -d' ' -f1-3 /proc/loadavg)

# --- report -----------------------------------------------------------------------------------
echo
echo "weir-proxy gRPC benchmark, $(date -u '+%Y-%m-%d %H:%M UTC'), $(nproc) CPUs ($(sed -n 's/^model name\s*: //p' /proc/cpuinfo | head -1)), load average before $LOAD_BEFORE, after $LOAD_AFTER"
echo "h2load -t1 -c$CONNS -m$STREAMS -D ${DURATION}s (after ${WARMUP}s warm-up), unary shop.Inventory/Check; h2load + tonic server on CPU $CPU_LOAD, proxy on CPU $CPU_PROXY, one worker each"
echo
printf '%s\n' "${ROWS[@]}" | awk -F'|' '
  function ms(us) { return sprintf("%.3f", us / 1000) }
  { label[NR] = $1; rps[NR] = $2; p50[NR] = $3; p99[NR] = $4; cpu[NR] = $5; rss[NR] = $6; bad[NR] = $7
    if ($1 ~ /^Envoy/) envoy = $5; if ($1 ~ /^HAProxy/) haproxy = $5; if ($1 ~ /^Envoy/) envoy99 = $4 }
  END {
    print "| target | req/s | p50 ms | p99 ms | proxy CPU µs/req | proxy peak RSS MiB | req/s vs direct | CPU/req vs Envoy | CPU/req vs HAProxy | p99 vs Envoy | non-2xx |"
    print "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"
    for (i = 1; i <= NR; i++) {
      ce = (cpu[i] == "-" || envoy == "" || envoy == 0) ? "-" : sprintf("%.2f×", cpu[i] / envoy)
      ch = (cpu[i] == "-" || haproxy == "" || haproxy == 0) ? "-" : sprintf("%.2f×", cpu[i] / haproxy)
      pe = (envoy99 == "" || envoy99 == 0) ? "-" : sprintf("%.2f×", p99[i] / envoy99)
      printf "| %s | %.0f | %s | %s | %s | %s | %.2f× | %s | %s | %s | %d |\n", label[i], rps[i], ms(p50[i]), ms(p99[i]), cpu[i], rss[i], rps[i] / rps[1], ce, ch, pe, bad[i]
    }
  }'
