# shellcheck shell=bash
# What the benchmark scripts of this folder share; each sources it after setting BENCH_NAME
# (the prefix of its log lines) and ROOT (the repository root):
#
#   log MSG...               a line on stderr, prefixed [BENCH_NAME]
#   need_tools TOOL...       runs scripts/setup.sh --bench once if any is missing
#   build_release ARGS...    cargo build --release -q ARGS (skipped with BENCH_NO_BUILD=1)
#   bench_workdir            makes $WORK, stops every process `start` started on exit (their
#                            logs' last lines shown when the script fails)
#   ports_free BASE LAST VAR [IP...]   fails, naming VAR, when a port BASE..LAST is taken on
#                            127.0.0.1 or one of IP
#   start NAME CPU CMD...    CMD pinned to CPU, logging to $WORK/NAME.log; sets START_PID
#   stop PID                 TERM, up to 5 s, then KILL
#   wait_http URL [SECONDS]  until URL answers 2xx (20 s)
#   cpu_ticks PID, hwm_kb PID, CLK_TCK   CPU time (utime+stime, ticks) and peak RSS of PID
#   envoy_head CODEC ROUTE   Envoy's config up to the fields of its cluster `up`
#   nginx_conf NAME BODY     $WORK/NAME.conf: one nginx worker in the foreground, keep-alive
#                            without limits, BODY inside its http block
#   weir_bench_conf FILE INBOUND ADMIN APP OTLP OUTBOUND
#                            weir-proxy's config with every inbound policy on (ports on
#                            127.0.0.1) and the OUTBOUND JSON array
#   weir_policies_outbound NAME LISTEN UPSTREAM
#                            an OUTBOUND array of one dependency with timeout, retry budget,
#                            breaker, bulkhead (64) and fallback (ports on 127.0.0.1)

log() { printf '[%s] %s\n' "$BENCH_NAME" "$*" >&2; }

need_tools() {
  local tool
  for tool in "$@"; do
    if ! command -v "$tool" >/dev/null; then
      log "$tool missing: running scripts/setup.sh --bench"
      "$ROOT/scripts/setup.sh" --bench
      return
    fi
  done
}

build_release() {
  if [ "${BENCH_NO_BUILD:-0}" != 1 ]; then
    log "cargo build --release $*"
    cargo build --release -q "$@"
  fi
}

PIDS=()
stop() {
  local pid=$1 deadline=$((SECONDS + 5))
  kill -TERM "$pid" 2>/dev/null || return 0
  while [ "$SECONDS" -lt "$deadline" ]; do
    kill -0 "$pid" 2>/dev/null || break
    sleep 0.1
  done
  kill -KILL "$pid" 2>/dev/null || true
  wait "$pid" 2>/dev/null || true
}
bench_cleanup() {
  local rc=$? pid f
  for pid in "${PIDS[@]}"; do stop "$pid"; done
  if [ "$rc" != 0 ]; then
    for f in "$WORK"/*.log "$WORK"/*.err; do
      [ -s "$f" ] && { log "--- $f"; tail -n 5 "$f" >&2; }
    done
  fi
  rm -rf "$WORK"
}
bench_workdir() {
  WORK=$(mktemp -d "/tmp/weir-$BENCH_NAME.XXXXXX")
  trap bench_cleanup EXIT
  trap 'exit 130' INT TERM
}

ports_free() {
  local base=$1 last=$2 var=$3 ip p
  shift 3
  for ip in 127.0.0.1 "$@"; do
    for p in $(seq "$base" "$last"); do
      if (exec 3<>"/dev/tcp/$ip/$p") 2>/dev/null; then
        log "port $ip:$p is in use: set $var"
        exit 1
      fi
    done
  done
}

START_PID=
start() {
  local name=$1 cpu=$2
  shift 2
  taskset -c "$cpu" "$@" >"$WORK/$name.log" 2>&1 &
  START_PID=$!
  PIDS+=("$START_PID")
}

wait_http() {
  local url=$1 deadline=$((SECONDS + ${2:-20}))
  while [ "$SECONDS" -lt "$deadline" ]; do
    curl -fsS -o /dev/null --max-time 1 "$url" 2>/dev/null && return 0
    sleep 0.1
  done
  log "no answer from $url"
  return 1
}

cpu_ticks() { awk '{print $14 + $15}' "/proc/$1/stat"; }
hwm_kb() { awk '/^VmHWM:/ {print $2}' "/proc/$1/status"; }
CLK_TCK=$(getconf CLK_TCK)

# Envoy's static config up to its cluster `up` (type STATIC, name and connect timeout given):
# admin on $P_ENVOY_ADMIN, one listener on $P_ENVOY routing everything to `up`.
envoy_head() { # codec_type route (the route's fields, `cluster: up` and any more)
  cat <<YAML
admin:
  address: {socket_address: {address: 127.0.0.1, port_value: $P_ENVOY_ADMIN}}
static_resources:
  listeners:
  - name: bench
    address: {socket_address: {address: 127.0.0.1, port_value: $P_ENVOY}}
    filter_chains:
    - filters:
      - name: envoy.filters.network.http_connection_manager
        typed_config:
          "@type": type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager
          stat_prefix: bench
          codec_type: $1
          route_config:
            virtual_hosts:
            - name: all
              domains: ["*"]
              routes: [{match: {prefix: "/"}, route: {$2}}]
          http_filters:
          - name: envoy.filters.http.router
            typed_config: {"@type": type.googleapis.com/envoy.extensions.filters.http.router.v3.Router}
  clusters:
  - name: up
    type: STATIC
    connect_timeout: 1s
YAML
}

nginx_conf() { # name http-block-body
  cat >"$WORK/$1.conf" <<EOF
daemon off;
master_process off;
worker_processes 1;
pid $WORK/$1.pid;
error_log $WORK/$1.err warn;
events { worker_connections 4096; }
http {
  access_log off;
  keepalive_requests 10000000;
  keepalive_timeout 120s;
  client_body_temp_path $WORK/body;
  proxy_temp_path $WORK/proxy;
  $2
}
EOF
}

# Every inbound policy on: rate limit far above the load, concurrency limit above the connection
# count, tracing configured with sampling 0 (its endpoint never contacted), metrics always on.
weir_bench_conf() { # file inbound-port admin-port app-port otlp-port outbound-json-array
  cat >"$1" <<EOF
{"service":"bench","namespace":"bench",
 "inbound":{"listen":"127.0.0.1:$2","app":"127.0.0.1:$4","timeoutMs":5000,
   "maxConcurrent":64,"maxQueue":0,"rateLimit":{"requestsPerSecond":10000000,"burst":1000000},
   "maxBodyBytes":1048576},
 "admin":{"listen":"127.0.0.1:$3"},
 "outbound":$6,
 "tracing":{"otlpEndpoint":"http://127.0.0.1:$5","samplingRatio":0},
 "shutdownGraceMs":1000}
EOF
}

weir_policies_outbound() { # name listen-port upstream-port
  cat <<EOF
[{"name":"$1","listen":"127.0.0.1:$2",
   "upstream":"http://127.0.0.1:$3","timeoutMs":5000,
   "retry":{"attempts":3,"backoffBaseMs":10,"backoffMaxMs":100,
     "budget":{"ratio":0.2,"minPerSecond":10,"ttlMs":10000}},
   "circuitBreaker":{"errorThresholdPercentage":50,"volumeThreshold":20,"rollingWindowMs":10000,
     "buckets":10,"resetTimeoutMs":5000,
     "failureOn":{"status5xx":true,"connectErrors":true,"timeouts":true}},
   "bulkhead":{"maxConcurrent":64,"maxQueue":0},
   "fallback":{"status":200,"body":"fallback","contentType":"text/plain"}}]
EOF
}
