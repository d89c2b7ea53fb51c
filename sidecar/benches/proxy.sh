#!/usr/bin/env bash
# HTTP proxy benchmark: weir-proxy vs nginx, HAProxy and Envoy, in one run on one machine.
#
#   sidecar/benches/proxy.sh
#
# wrk (1 thread, BENCH_CONNECTIONS keep-alive connections, GET of a 2-byte file) and the
# upstream (nginx, one process) are pinned to CPU BENCH_CPU_LOAD; the proxy under test gets CPU
# BENCH_CPU_PROXY and one worker/thread. Every target gets a BENCH_WARMUP s warm-up, then a
# BENCH_DURATION s measured run. Proxy CPU per request = (utime+stime) delta from
# /proc/<pid>/stat / requests; peak RSS = VmHWM. Then the bulkhead scenario: weir-proxy's
# outbound listener with a bulkhead of 256 (maxQueue 0) in front of weir-echo's /sleep/20, at
# 200 and at BENCH_OVERLOAD_CONNECTIONS connections.
#
# Env (defaults): BENCH_DURATION=10 BENCH_WARMUP=3 BENCH_CONNECTIONS=32 BENCH_CPU_LOAD=0
# BENCH_CPU_PROXY=1 BENCH_PORT_BASE=18080 (uses 16 ports from there) BENCH_OVERLOAD_CONNECTIONS=300
# BENCH_CPU_ECHO=$BENCH_CPU_LOAD (the slow upstream) BENCH_NO_BUILD=1 (skip cargo build)
# BENCH_GRPC=0 (skip the gRPC table, sidecar/benches/grpc.sh, which otherwise runs after this
# one in the same run) BENCH_WEIR_BEFORE=path/to/weir-proxy (another build measured in the same
# run, inbound and outbound, labelled BENCH_BEFORE_LABEL, default "before"). Everything listens on 127.0.0.1 only; every process the script starts
# is stopped on exit.
set -euo pipefail
cd "$(dirname "$0")/../.."
ROOT=$PWD
DURATION=${BENCH_DURATION:-10}
WARMUP=${BENCH_WARMUP:-3}
CONNS=${BENCH_CONNECTIONS:-32}
OVER=${BENCH_OVERLOAD_CONNECTIONS:-300}
CPU_LOAD=${BENCH_CPU_LOAD:-0}
CPU_PROXY=${BENCH_CPU_PROXY:-1}
BASE=${BENCH_PORT_BASE:-18080}
TARGET_DIR=${CARGO_TARGET_DIR:-$ROOT/target}
export PATH="$ROOT/.tools/bin:/usr/sbin:$PATH"

P_UP=$BASE            # upstream nginx (static file)
P_WEIR_IN=$((BASE + 1))
P_WEIR_OUT=$((BASE + 2))
P_WEIR_ADMIN=$((BASE + 3))
P_NGINX=$((BASE + 4))
P_HAPROXY=$((BASE + 5))
P_ENVOY=$((BASE + 6))
P_ENVOY_ADMIN=$((BASE + 7))
P_ECHO=$((BASE + 8))
P_BULK=$((BASE + 9))
P_BULK_ADMIN=$((BASE + 10))
P_UNUSED=$((BASE + 11)) # otlp endpoint: never contacted with sampling 0

BENCH_NAME=bench
# shellcheck source=sidecar/benches/lib.sh
. "$ROOT/sidecar/benches/lib.sh"

need_tools nginx haproxy wrk envoy taskset curl
build_release -p weir-proxy -p weir-example-echo
WEIR=$TARGET_DIR/release/weir-proxy
ECHO=$TARGET_DIR/release/weir-echo
if [ ! -x "$WEIR" ] || [ ! -x "$ECHO" ]; then log "missing $WEIR or $ECHO"; exit 1; fi

bench_workdir

ports_free "$BASE" $((BASE + 11)) BENCH_PORT_BASE

# --- configs ----------------------------------------------------------------------------------
mkdir -p "$WORK/www"
printf 'ok' >"$WORK/www/ok"
nginx_conf upstream "server { listen 127.0.0.1:$P_UP; location / { root $WORK/www; } }"
nginx_conf nginx "upstream up { server 127.0.0.1:$P_UP; keepalive 64; keepalive_requests 10000000; }
  server { listen 127.0.0.1:$P_NGINX; location / { proxy_pass http://up; proxy_http_version 1.1; proxy_set_header Connection \"\"; } }"

cat >"$WORK/haproxy.cfg" <<EOF
global
  nbthread 1
  maxconn 4000
defaults
  mode http
  timeout connect 5s
  timeout client 120s
  timeout server 120s
  timeout http-keep-alive 120s
  option http-keep-alive
  http-reuse always
frontend fe
  bind 127.0.0.1:$P_HAPROXY
  default_backend be
backend be
  server up 127.0.0.1:$P_UP
EOF

{
  envoy_head HTTP1 'cluster: up'
  cat <<EOF
    load_assignment:
      cluster_name: up
      endpoints: [{lb_endpoints: [{endpoint: {address: {socket_address: {address: 127.0.0.1, port_value: $P_UP}}}}]}]
EOF
} >"$WORK/envoy.yaml"

# weir-proxy: every inbound policy on and one outbound listener with timeout, retry budget,
# breaker, bulkhead (64) and fallback (lib.sh); the bulkhead scenario's listener apart.
weir_bench_conf "$WORK/weir.json" "$P_WEIR_IN" "$P_WEIR_ADMIN" "$P_UP" "$P_UNUSED" \
  "$(weir_policies_outbound up "$P_WEIR_OUT" "$P_UP")"
weir_bench_conf "$WORK/bulkhead.json" "$((BASE + 12))" "$P_BULK_ADMIN" "$P_UP" "$P_UNUSED" "[{\"name\":\"slow\",\"listen\":\"127.0.0.1:$P_BULK\",
   \"upstream\":\"http://127.0.0.1:$P_ECHO\",\"timeoutMs\":5000,
   \"bulkhead\":{\"maxConcurrent\":256,\"maxQueue\":0}}]"

# --- measurement ------------------------------------------------------------------------------
LUA=$ROOT/sidecar/benches/proxy-stats.lua
WRK_OUT=
run_wrk() { # conns url: warm-up, then the measured run; sets WRK_OUT to the WRK line
  local conns=$1 url=$2
  taskset -c "$CPU_LOAD" wrk -t1 -c"$conns" -d"${WARMUP}s" "$url" >/dev/null
  WRK_OUT=$(taskset -c "$CPU_LOAD" wrk -t1 -c"$conns" -d"${DURATION}s" --latency -s "$LUA" "$url" | grep '^WRK ')
}
field() { # name: value from WRK_OUT
  tr ' ' '\n' <<<"$WRK_OUT" | sed -n "s/^$1=//p"
}

ROWS=()
measure() { # label url pid ('-' = no proxy)
  local label=$1 url=$2 pid=$3 t0 t1
  wait_http "$url"
  taskset -c "$CPU_LOAD" wrk -t1 -c"$CONNS" -d"${WARMUP}s" "$url" >/dev/null
  [ "$pid" = - ] || t0=$(cpu_ticks "$pid")
  WRK_OUT=$(taskset -c "$CPU_LOAD" wrk -t1 -c"$CONNS" -d"${DURATION}s" --latency -s "$LUA" "$url" | grep '^WRK ')
  local cpu=- rss=- anon=-
  if [ "$pid" != - ]; then
    t1=$(cpu_ticks "$pid")
    cpu=$(awk -v d=$((t1 - t0)) -v hz="$CLK_TCK" -v n="$(field requests)" 'BEGIN {printf "%.1f", d * 1e6 / hz / n}')
    rss=$(awk -v k="$(hwm_kb "$pid")" 'BEGIN {printf "%.1f", k / 1024}')
    anon=$(awk '/^RssAnon:/ {printf "%.1f", $2 / 1024}' "/proc/$pid/status")
  fi
  ROWS+=("$label|$(field requests)|$(field duration_us)|$(field p50_us)|$(field p99_us)|$(field non2xx)|$(field sockerr)|$cpu|$rss|$anon")
  log "$label: $WRK_OUT cpu_us_per_req=$cpu peak_rss_mib=$rss anon_mib=$anon"
}

LOAD_BEFORE=$(cut -d' ' -f1-3 /proc/loadavg)
log "load average before: $LOAD_BEFORE; $(nproc) CPUs; wrk+upstream on CPU $CPU_LOAD, proxy on CPU $CPU_PROXY"

start upstream "$CPU_LOAD" nginx -e "$WORK/upstream.err" -p "$WORK" -c "$WORK/upstream.conf"
measure "direct (nginx static, no proxy)" "http://127.0.0.1:$P_UP/ok" -

start weir "$CPU_PROXY" "$WEIR" --config "$WORK/weir.json" --workers 1 --no-access-log
pid=$START_PID
wait_http "http://127.0.0.1:$P_WEIR_ADMIN/readyz"
measure "weir-proxy inbound (all policies)" "http://127.0.0.1:$P_WEIR_IN/ok" "$pid"
stop "$pid"
start weir-out "$CPU_PROXY" "$WEIR" --config "$WORK/weir.json" --workers 1 --no-access-log
pid=$START_PID
wait_http "http://127.0.0.1:$P_WEIR_ADMIN/readyz"
measure "weir-proxy outbound (timeout, retry, breaker, bulkhead, fallback)" "http://127.0.0.1:$P_WEIR_OUT/ok" "$pid"
stop "$pid"
start weir-log "$CPU_PROXY" "$WEIR" --config "$WORK/weir.json" --workers 1
pid=$START_PID
wait_http "http://127.0.0.1:$P_WEIR_ADMIN/readyz"
measure "weir-proxy inbound + access log (to a file)" "http://127.0.0.1:$P_WEIR_IN/ok" "$pid"
stop "$pid"

# Another build of weir-proxy measured in the same run (the figures before a change).
if [ -n "${BENCH_WEIR_BEFORE:-}" ]; then
  before=${BENCH_BEFORE_LABEL:-before}
  start weir-before "$CPU_PROXY" "$BENCH_WEIR_BEFORE" --config "$WORK/weir.json" --workers 1 --no-access-log
  pid=$START_PID
  wait_http "http://127.0.0.1:$P_WEIR_ADMIN/readyz"
  measure "weir-proxy inbound, $before" "http://127.0.0.1:$P_WEIR_IN/ok" "$pid"
  measure "weir-proxy outbound, $before" "http://127.0.0.1:$P_WEIR_OUT/ok" "$pid"
  stop "$pid"
fi

start nginx "$CPU_PROXY" nginx -e "$WORK/nginx.err" -p "$WORK" -c "$WORK/nginx.conf"
pid=$START_PID
measure "nginx (reverse proxy, keep-alive upstream)" "http://127.0.0.1:$P_NGINX/ok" "$pid"
stop "$pid"

start haproxy "$CPU_PROXY" haproxy -db -f "$WORK/haproxy.cfg"
pid=$START_PID
measure "HAProxy $(haproxy -v | awk 'NR==1 {print $3}')" "http://127.0.0.1:$P_HAPROXY/ok" "$pid"
stop "$pid"

start envoy "$CPU_PROXY" envoy -c "$WORK/envoy.yaml" --concurrency 1 --disable-hot-restart -l warning
pid=$START_PID
measure "Envoy $(envoy --version 2>/dev/null | grep -o '/[0-9.]*/' | tr -d / | head -1) (--concurrency 1)" "http://127.0.0.1:$P_ENVOY/ok" "$pid"
stop "$pid"

# --- bulkhead scenario ------------------------------------------------------------------------
start echo "${BENCH_CPU_ECHO:-$CPU_LOAD}" env PORT="$P_ECHO" BIND=127.0.0.1 "$ECHO"
wait_http "http://127.0.0.1:$P_ECHO/healthz"
start weir-bulkhead "$CPU_PROXY" "$WEIR" --config "$WORK/bulkhead.json" --workers 1 --no-access-log
bpid=$START_PID
wait_http "http://127.0.0.1:$P_BULK_ADMIN/readyz"
metrics() { curl -fsS --max-time 2 "http://127.0.0.1:$P_BULK_ADMIN/metrics" >"$WORK/metrics.$1"; }
rejections() { # metrics-file: weir_rejections_total{reason="bulkhead-full"}
  awk '/^weir_rejections_total\{.*reason="bulkhead-full"/ {s += $NF} END {print s + 0}' "$1"
}
# The proxy's own view, from the weir_request_duration_seconds histogram deltas: 2xx mean and
# share within 25/50 ms; 503 (5xx) share answered within 0.5/1 ms.
proxy_view() { # before-file after-file
  awk '
    /^weir_request_duration_seconds/ {
      for (c = 1; c <= 2; c++) {
        cls = (c == 1) ? "2xx" : "5xx"
        if (!index($0, "status_class=\"" cls "\"") || !index($0, "direction=\"outbound\"")) continue
        v = $NF * (FILENAME == before ? -1 : 1)
        if ($1 ~ /_sum/) sum[cls] += v
        else if ($1 ~ /_count/) cnt[cls] += v
        else if (match($1, /le="[^"]*"/)) { le = substr($1, RSTART + 4, RLENGTH - 5); b[cls, le] += v }
      }
    }
    END {
      n2 = cnt["2xx"]; n5 = cnt["5xx"]
      printf "%.2f|%.1f|%.1f|%.1f|%.1f", (n2 ? sum["2xx"] / n2 * 1000 : 0), (n2 ? 100 * b["2xx", "0.025"] / n2 : 0), (n2 ? 100 * b["2xx", "0.05"] / n2 : 0), (n5 ? 100 * b["5xx", "0.0005"] / n5 : 0), (n5 ? 100 * b["5xx", "0.001"] / n5 : 0)
    }' before="$1" "$1" "$2"
}
BROWS=()
for c in 200 "$OVER"; do
  taskset -c "$CPU_LOAD" wrk -t1 -c"$c" -d"${WARMUP}s" "http://127.0.0.1:$P_BULK/sleep/20" >/dev/null
  metrics "$c.0"
  t0=$(cpu_ticks "$bpid")
  WRK_OUT=$(taskset -c "$CPU_LOAD" wrk -t1 -c"$c" -d"${DURATION}s" --latency -s "$LUA" "http://127.0.0.1:$P_BULK/sleep/20" | grep '^WRK ')
  t1=$(cpu_ticks "$bpid")
  metrics "$c.1"
  busy=$(awk -v d=$((t1 - t0)) -v hz="$CLK_TCK" -v us="$(field duration_us)" 'BEGIN {printf "%.0f", 100 * d / hz / (us / 1e6)}')
  rej=$(($(rejections "$WORK/metrics.$c.1") - $(rejections "$WORK/metrics.$c.0")))
  view=$(proxy_view "$WORK/metrics.$c.0" "$WORK/metrics.$c.1")
  BROWS+=("$c|$(field requests)|$(field duration_us)|$(field non2xx)|$rej|$(field p50_us)|$(field p99_us)|$(field adm_p50_us)|$(field adm_p99_us)|$(field rej_max_us)|$(field sockerr)|$view|$busy")
  log "bulkhead $c connections: $WRK_OUT rejections(bulkhead-full)=$rej proxy_cpu=$busy% proxy_view(2xx mean ms|2xx<=25ms %|2xx<=50ms %|5xx<=0.5ms %|5xx<=1ms %)=$view"
done
BULK_RSS=$(awk -v k="$(hwm_kb "$bpid")" 'BEGIN {printf "%.1f", k / 1024}')
LOAD_AFTER=$(cut -d' ' -f1-3 /proc/loadavg)

# --- report -----------------------------------------------------------------------------------
echo
echo "weir-proxy benchmark, $(date -u '+%Y-%m-%d %H:%M UTC'), $(nproc) CPUs ($(sed -n 's/^model name\s*: //p' /proc/cpuinfo | head -1)), load average before $LOAD_BEFORE, after $LOAD_AFTER"
echo "wrk -t1 -c$CONNS -d${DURATION}s (after ${WARMUP}s warm-up), GET of a 2-byte file; wrk + upstream nginx on CPU $CPU_LOAD, proxy on CPU $CPU_PROXY, one worker each"
echo
printf '%s\n' "${ROWS[@]}" | awk -F'|' '
  function ms(us) { return sprintf("%.3f", us / 1000) }
  { label[NR] = $1; rps[NR] = $2 * 1e6 / $3; p50[NR] = $4; p99[NR] = $5; bad[NR] = $6 + $7
    cpu[NR] = $8; rss[NR] = $9; anon[NR] = $10
    if ($1 ~ /^Envoy/) envoy = $8; if ($1 ~ /^HAProxy/) haproxy = $8; if ($1 ~ /^nginx/) nginx = $8 }
  function vs(c, peer) { return (c == "-" || peer == "" || peer == 0) ? "-" : sprintf("%.2f×", c / peer) }
  END {
    print "| target | req/s | p50 ms | p99 ms | proxy CPU µs/req | proxy peak RSS MiB | anonymous MiB after | req/s vs direct | p99 vs direct | CPU/req vs nginx | CPU/req vs HAProxy | CPU/req vs Envoy | errors |"
    print "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"
    for (i = 1; i <= NR; i++) {
      printf "| %s | %.0f | %s | %s | %s | %s | %s | %.2f× | %.2f× | %s | %s | %s | %d |\n", label[i], rps[i], ms(p50[i]), ms(p99[i]), cpu[i], rss[i], anon[i], rps[i] / rps[1], p99[i] / p99[1], vs(cpu[i], nginx), vs(cpu[i], haproxy), vs(cpu[i], envoy), bad[i]
    }
  }'
echo
echo "Bulkhead scenario: weir-proxy outbound, bulkhead maxConcurrent 256 maxQueue 0, upstream weir-echo /sleep/20 (wrk -t1 -d${DURATION}s); admitted = 2xx; proxy peak RSS $BULK_RSS MiB"
echo
printf '%s\n' "${BROWS[@]}" | awk -F'|' '
  function ms(us) { return sprintf("%.2f", us / 1000) }
  BEGIN {
    print "| connections | req/s | 2xx/s | non-2xx (503) | rejections_total bulkhead-full | p50 all ms | p99 all ms | p50 2xx ms | p99 2xx ms | 503 max¹ ms | proxy: 2xx mean ms | proxy: 2xx ≤ 25 ms | proxy: 503 ≤ 0.5 ms | proxy: 503 ≤ 1 ms | proxy CPU busy | socket errors |"
    print "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"
  }
  { s = $3 / 1e6
    printf "| %d | %.0f | %.0f | %d | %d | %s | %s | %s | %s | %s | %s | %s%% | %s | %s | %s%% | %d |\n", $1, $2 / s, ($2 - $4) / s, $4, $5, ms($6), ms($7), ms($8), ms($9), ($4 > 0 ? ms($10) : "-"), $12, $13, ($4 > 0 ? $15 "%" : "-"), ($4 > 0 ? $16 "%" : "-"), $17, $11 }'
echo
echo "¹ client side (wrk), 2xx/503 split by latency rank: every 2xx takes >= 20 ms, so the 2xx columns are exact when every 503 is faster than every 2xx (then '503 max' is the slowest 503). The proxy columns come from weir_request_duration_seconds (outbound) deltas over the measured run."

if [ "${BENCH_GRPC:-1}" != 0 ]; then
  for pid in "${PIDS[@]}"; do stop "$pid"; done
  PIDS=()
  echo
  "$ROOT/sidecar/benches/grpc.sh"
fi
