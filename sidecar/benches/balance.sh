#!/usr/bin/env bash
# Balancing benchmark: one dependency over three endpoints, one of them 20 ms slower, through
# weir-proxy (P2C over peak-EWMA), weir-proxy in round robin (what a Service's virtual IP gives:
# each endpoint its third, whatever it does), and Envoy (LEAST_REQUEST), in one run on one
# machine. Then the cost of balancing: weir-proxy's CPU per request over three fast endpoints
# against the same config with a single upstream.
#
#   sidecar/benches/balance.sh
#
# The endpoints are weir-echo (release build) on 127.0.0.2, .3 and .4, one port; the one on .4
# waits BALANCE_SLOW_MS (20) before each answer. wrk (1 thread, BALANCE_CONNECTIONS keep-alive
# connections, GET /) and the endpoints run on CPU BENCH_CPU_LOAD, the proxy under test on CPU
# BENCH_CPU_PROXY with one worker/thread. Every target gets a BENCH_WARMUP s warm-up, then a
# BENCH_DURATION s measured run: p50/p99 from wrk, the slow endpoint's share from the endpoints'
# own counts (GET /requests) over the measured run, proxy CPU per request from /proc/<pid>/stat.
#
# Env (defaults): BENCH_DURATION=10 BENCH_WARMUP=3 BALANCE_CONNECTIONS=16 BALANCE_SLOW_MS=20
# BENCH_CPU_LOAD=0 BENCH_CPU_PROXY=1 BALANCE_PORT_BASE=18280 (uses 8 ports from there, on
# 127.0.0.1 to .4) BENCH_NO_BUILD=1 (skip cargo build). Every process the script starts is
# stopped on exit.
set -euo pipefail
cd "$(dirname "$0")/../.."
ROOT=$PWD
DURATION=${BENCH_DURATION:-10}
WARMUP=${BENCH_WARMUP:-3}
CONNS=${BALANCE_CONNECTIONS:-16}
SLOW_MS=${BALANCE_SLOW_MS:-20}
CPU_LOAD=${BENCH_CPU_LOAD:-0}
CPU_PROXY=${BENCH_CPU_PROXY:-1}
BASE=${BALANCE_PORT_BASE:-18280}
TARGET_DIR=${CARGO_TARGET_DIR:-$ROOT/target}
export PATH="$ROOT/.tools/bin:/usr/sbin:$PATH"

P_EP=$BASE # on 127.0.0.2, .3, .4
P_WEIR=$((BASE + 1))
P_WEIR_ADMIN=$((BASE + 2))
P_WEIR_IN=$((BASE + 3))
P_ENVOY=$((BASE + 4))
P_ENVOY_ADMIN=$((BASE + 5))
P_APP=$((BASE + 6)) # the inbound listener's app: never called
EPS=(127.0.0.2 127.0.0.3 127.0.0.4)
SLOW=127.0.0.4

BENCH_NAME=balance-bench
# shellcheck source=sidecar/benches/lib.sh
. "$ROOT/sidecar/benches/lib.sh"

need_tools wrk envoy taskset curl
build_release -p weir-proxy -p weir-example-echo
WEIR=$TARGET_DIR/release/weir-proxy
ECHO=$TARGET_DIR/release/weir-echo
if [ ! -x "$WEIR" ] || [ ! -x "$ECHO" ]; then log "missing $WEIR or $ECHO"; exit 1; fi

bench_workdir

ports_free "$BASE" $((BASE + 7)) BALANCE_PORT_BASE "${EPS[@]}"

answered() { # ip: requests the endpoint on ip has answered
  curl -fsS --max-time 2 "http://$1:$P_EP/requests" | sed -E 's/.*"requests":([0-9]+).*/\1/'
}

# --- the endpoints ----------------------------------------------------------------------------
for ip in "${EPS[@]}"; do
  delay=0
  [ "$ip" = "$SLOW" ] && delay=$SLOW_MS
  start "echo-$ip" "$CPU_LOAD" env BIND="$ip" PORT="$P_EP" DELAY_MS="$delay" \
    SERVICE_NAME="ep-$ip" "$ECHO"
done
for ip in "${EPS[@]}"; do wait_http "http://$ip:$P_EP/healthz"; done

# --- configs ----------------------------------------------------------------------------------
weir_conf() { # file algorithm endpoints-json-or-empty
  local endpoints=""
  [ -n "$3" ] && endpoints=",\"endpoints\":{\"addresses\":$3},\"loadBalancer\":{\"algorithm\":\"$2\"}"
  cat >"$1" <<EOF
{"service":"bench","namespace":"bench",
 "inbound":{"listen":"127.0.0.1:$P_WEIR_IN","app":"127.0.0.1:$P_APP","timeoutMs":5000,"maxBodyBytes":1048576},
 "admin":{"listen":"127.0.0.1:$P_WEIR_ADMIN"},
 "outbound":[{"name":"backend","listen":"127.0.0.1:$P_WEIR","upstream":"http://127.0.0.2:$P_EP",
   "timeoutMs":5000$endpoints}],
 "tracing":{"samplingRatio":0},
 "shutdownGraceMs":1000}
EOF
}
ADDRS="[\"127.0.0.2:$P_EP\",\"127.0.0.3:$P_EP\",\"127.0.0.4:$P_EP\"]"
weir_conf "$WORK/weir-ewma.json" peakEwma "$ADDRS"
weir_conf "$WORK/weir-rr.json" roundRobin "$ADDRS"
weir_conf "$WORK/weir-single.json" peakEwma ""

{
  envoy_head AUTO 'cluster: up, timeout: 5s'
  cat <<EOF
    lb_policy: LEAST_REQUEST
    load_assignment:
      cluster_name: up
      endpoints:
      - lb_endpoints:
        - endpoint: {address: {socket_address: {address: 127.0.0.2, port_value: $P_EP}}}
        - endpoint: {address: {socket_address: {address: 127.0.0.3, port_value: $P_EP}}}
        - endpoint: {address: {socket_address: {address: 127.0.0.4, port_value: $P_EP}}}
EOF
} >"$WORK/envoy.yaml"

# --- one target -------------------------------------------------------------------------------
ROWS=()
CPU_PER_REQ=()
run() { # label url pid
  local label=$1 url=$2 pid=$3
  wait_http "$url" 30
  taskset -c "$CPU_LOAD" wrk -t1 -c"$CONNS" -d"${WARMUP}s" "$url" >/dev/null
  local -a before
  local ip t0 t1 out
  for ip in "${EPS[@]}"; do before+=("$(answered "$ip")"); done
  t0=$(cpu_ticks "$pid")
  out=$(taskset -c "$CPU_LOAD" wrk -t1 -c"$CONNS" -d"${DURATION}s" -s sidecar/benches/proxy-stats.lua "$url" | grep '^WRK ')
  t1=$(cpu_ticks "$pid")
  local total=0 slow=0 i=0 n
  for ip in "${EPS[@]}"; do
    n=$(($(answered "$ip") - before[i]))
    total=$((total + n))
    [ "$ip" = "$SLOW" ] && slow=$n
    i=$((i + 1))
  done
  local req p50 p99 non2xx
  req=$(sed -E 's/.*requests=([0-9]+).*/\1/' <<<"$out")
  p50=$(sed -E 's/.*p50_us=([0-9]+).*/\1/' <<<"$out")
  p99=$(sed -E 's/.* p99_us=([0-9]+).*/\1/' <<<"$out")
  non2xx=$(sed -E 's/.*non2xx=([0-9]+).*/\1/' <<<"$out")
  local cpu_us share
  cpu_us=$(awk -v t=$((t1 - t0)) -v hz="$CLK_TCK" -v n="$req" 'BEGIN { printf "%.1f", n ? t * 1e6 / hz / n : 0 }')
  share=$(awk -v s="$slow" -v t="$total" 'BEGIN { printf "%.2f", t ? 100 * s / t : 0 }')
  ROWS+=("$(printf '| %s | %d | %.2f | %.2f | %s %% | %s | %s | %s |' "$label" "$((req / DURATION))" \
    "$(awk -v x="$p50" 'BEGIN{print x/1000}')" "$(awk -v x="$p99" 'BEGIN{print x/1000}')" \
    "$share" "$cpu_us" "$(($(hwm_kb "$pid") / 1024))" "$non2xx")")
  CPU_PER_REQ+=("$cpu_us")
  log "$label: $req requests, p50 ${p50} µs, p99 ${p99} µs, slow share $share %, $cpu_us µs CPU/request, non-2xx $non2xx"
}

weir() { # label config
  start "weir-$1" "$CPU_PROXY" "$WEIR" --config "$2" --workers 1 --no-access-log
  local pid=$START_PID
  wait_http "http://127.0.0.1:$P_WEIR_ADMIN/readyz"
  run "$1" "http://127.0.0.1:$P_WEIR/" "$pid"
  stop "$pid"
}

weir "weir-proxy (P2C peak-EWMA)" "$WORK/weir-ewma.json"
weir "weir-proxy (round robin, as a VIP)" "$WORK/weir-rr.json"
start envoy "$CPU_PROXY" envoy -c "$WORK/envoy.yaml" --concurrency 1 --log-level warn
ENVOY_PID=$START_PID
run "Envoy (LEAST_REQUEST)" "http://127.0.0.1:$P_ENVOY/" "$ENVOY_PID"
stop "$ENVOY_PID"
SLOW_ROWS=("${ROWS[@]}")

# --- the cost of balancing: three fast endpoints vs a single upstream ---------------------------
ROWS=()
CPU_PER_REQ=()
stop "${PIDS[2]}" # the slow endpoint, restarted fast
start "echo-fast-$SLOW" "$CPU_LOAD" env BIND="$SLOW" PORT="$P_EP" SERVICE_NAME="ep-$SLOW" "$ECHO"
wait_http "http://$SLOW:$P_EP/healthz"
weir "weir-proxy, three endpoints (P2C peak-EWMA)" "$WORK/weir-ewma.json"
weir "weir-proxy, single upstream" "$WORK/weir-single.json"
RATIO=$(awk -v a="${CPU_PER_REQ[0]}" -v b="${CPU_PER_REQ[1]}" 'BEGIN { printf "%.2f", b ? a / b : 0 }')

echo
echo "Three endpoints, $SLOW one ${SLOW_MS} ms slower; wrk -t1 -c$CONNS, ${DURATION}s measured after ${WARMUP}s warm-up:"
echo
echo "| through | req/s | p50 ms | p99 ms | to the slow endpoint | proxy CPU µs/req | peak RSS MiB | non-2xx |"
echo "|---|---|---|---|---|---|---|---|"
printf '%s\n' "${SLOW_ROWS[@]}"
echo
echo "The cost of balancing (three equal endpoints vs one upstream, same config otherwise):"
echo
echo "| through | req/s | p50 ms | p99 ms | to $SLOW | proxy CPU µs/req | peak RSS MiB | non-2xx |"
echo "|---|---|---|---|---|---|---|---|"
printf '%s\n' "${ROWS[@]}"
echo
echo "CPU per request, balanced / single: $RATIO"
