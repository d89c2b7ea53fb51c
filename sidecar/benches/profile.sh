#!/usr/bin/env bash
# Where weir-proxy's time per request goes: instructions per request (callgrind, repeatable
# whatever else the machine does) on the inbound and the outbound listener with every policy on
# (the config of proxy.sh), the functions that spend them grouped by crate, and the resident
# memory idle and after a load.
#
#   sidecar/benches/profile.sh
#
# The proxy is the `profiling` build (release with symbols, Cargo.toml). Under callgrind it
# starts uninstrumented; after PROFILE_WARMUP requests through a listener the counting is
# switched on for PROFILE_REQUESTS requests (h2load --h1, 32 connections, GET of a 2-byte file
# from an nginx upstream), then off. Each listener runs in a proxy of its own. The callgrind
# files are kept in PROFILE_OUT (default target/profile) for callgrind_annotate.
#
# Env (defaults): PROFILE_REQUESTS=20000 PROFILE_WARMUP=2000 PROFILE_PORT_BASE=18180 (uses 8
# ports) PROFILE_OUT=target/profile BENCH_NO_BUILD=1 (skip cargo build).
set -euo pipefail
cd "$(dirname "$0")/../.."
ROOT=$PWD
N=${PROFILE_REQUESTS:-20000}
WARM=${PROFILE_WARMUP:-2000}
BASE=${PROFILE_PORT_BASE:-18180}
TARGET_DIR=${CARGO_TARGET_DIR:-$ROOT/target}
OUT=${PROFILE_OUT:-$TARGET_DIR/profile}
export PATH="$ROOT/.tools/bin:/usr/sbin:$PATH"

P_UP=$BASE
P_IN=$((BASE + 1))
P_OUT=$((BASE + 2))
P_ADMIN=$((BASE + 3))
P_UNUSED=$((BASE + 4))

BENCH_NAME=profile
# shellcheck source=sidecar/benches/lib.sh
. "$ROOT/sidecar/benches/lib.sh"

need_tools nginx h2load valgrind callgrind_annotate callgrind_control
if [ "${BENCH_NO_BUILD:-0}" != 1 ]; then
  log "cargo build --profile profiling -p weir-proxy"
  cargo build --profile profiling -q -p weir-proxy
fi
WEIR=$TARGET_DIR/profiling/weir-proxy
[ -x "$WEIR" ] || { log "missing $WEIR"; exit 1; }
mkdir -p "$OUT"
bench_workdir
ports_free "$BASE" $((BASE + 4)) PROFILE_PORT_BASE

mkdir -p "$WORK/www"
printf 'ok' >"$WORK/www/ok"
nginx_conf upstream "server { listen 127.0.0.1:$P_UP; location / { root $WORK/www; } }"
# The config of proxy.sh (lib.sh): every inbound policy, and an outbound listener with timeout,
# retry budget, breaker, bulkhead and fallback.
weir_bench_conf "$WORK/weir.json" "$P_IN" "$P_ADMIN" "$P_UP" "$P_UNUSED" \
  "$(weir_policies_outbound up "$P_OUT" "$P_UP")"

start upstream 0 nginx -e "$WORK/upstream.err" -p "$WORK" -c "$WORK/upstream.conf"
wait_http "http://127.0.0.1:$P_UP/ok"

load() { # port requests
  h2load --h1 -n "$2" -c 32 "http://127.0.0.1:$1/ok" >"$WORK/h2load.out"
  grep -q "$2 succeeded" "$WORK/h2load.out" || { log "not every request succeeded:"; cat "$WORK/h2load.out" >&2; exit 1; }
}

# --- instructions per request --------------------------------------------------------------
declare -A PER_REQ
for side in inbound outbound; do
  port=$P_IN
  [ "$side" = outbound ] && port=$P_OUT
  cg=$OUT/callgrind.$side.out
  rm -f "$cg"
  start "cg-$side" 1 valgrind --tool=callgrind --instr-atstart=no --callgrind-out-file="$cg" \
    "$WEIR" --config "$WORK/weir.json" --workers 1 --no-access-log
  pid=$START_PID
  wait_http "http://127.0.0.1:$P_ADMIN/readyz" 120
  load "$port" "$WARM"
  callgrind_control -i on "$pid" >/dev/null
  load "$port" "$N"
  callgrind_control -i off "$pid" >/dev/null
  stop "$pid"
  total=$(callgrind_annotate "$cg" 2>/dev/null | awk '/PROGRAM TOTALS/ {gsub(",", "", $1); print $1}')
  PER_REQ[$side]=$((total / N))
  log "$side: $total instructions over $N requests"
done

# --- resident memory ---------------------------------------------------------------------------
start weir 1 "$WEIR" --config "$WORK/weir.json" --workers 1 --no-access-log
pid=$START_PID
wait_http "http://127.0.0.1:$P_ADMIN/readyz"
sleep 1
rss() { awk -v k="$1" '$1 == k":" {printf "%.1f", $2 / 1024}' "/proc/$pid/status"; }
IDLE_RSS=$(rss VmRSS) IDLE_ANON=$(rss RssAnon) IDLE_FILE=$(rss RssFile)
load "$P_IN" 100000
load "$P_OUT" 100000
PEAK=$(rss VmHWM) LOAD_ANON=$(rss RssAnon) LOAD_FILE=$(rss RssFile)
stop "$pid"

# --- report ------------------------------------------------------------------------------------
echo
echo "weir-proxy profile, $(date -u '+%Y-%m-%d %H:%M UTC'), $(git -C "$ROOT" rev-parse --short HEAD 2>/dev/null || echo '?'), $(nproc) CPUs"
echo
echo "| listener (every policy on) | instructions per request |"
echo "|---|---:|"
echo "| inbound | ${PER_REQ[inbound]} |"
echo "| outbound | ${PER_REQ[outbound]} |"
echo
echo "| memory | resident MiB | anonymous MiB | file-backed MiB |"
echo "|---|---:|---:|---:|"
echo "| idle, after start | $IDLE_RSS | $IDLE_ANON | $IDLE_FILE |"
echo "| peak, after 2 × 100 000 requests at 32 connections | $PEAK | $LOAD_ANON | $LOAD_FILE |"
for side in inbound outbound; do
  echo
  echo "Instructions per request by crate, $side (self cost; the top 15):"
  echo
  callgrind_annotate "$OUT/callgrind.$side.out" 2>/dev/null | awk -v n="$N" '
    /^ *[0-9,]+ \( *[0-9.]+%\) +[^ ]+:/ {
      c = $1; gsub(",", "", c); f = $0; sub(/^ *[0-9,]+ \( *[0-9.]+%\) +/, "", f); sub(/:.*/, "", f)
      if (f ~ /\.cargo\/registry\/src\//) { sub(/.*\.cargo\/registry\/src\/[^\/]+\//, "", f); sub(/\/.*/, "", f) }
      else if (f ~ /^\/rustc\//) { sub(/^\/rustc\/[^\/]+\/library\//, "std:", f); sub(/\/.*/, "", f) }
      else if (f ~ /^\/rust\/deps\//) { sub(/^\/rust\/deps\//, "", f); sub(/\/.*/, "", f) }
      else if (f ~ /sidecar\/src\//) { sub(/.*sidecar\/src\//, "weir-proxy: ", f) }
      else if (f ~ /malloc|mimalloc/) { f = "allocator" }
      else if (f ~ /^\.\//) { f = "libc" }
      by[f] += c; total += c
    }
    END { for (f in by) printf "%9.0f %5.1f%%  %s\n", by[f] / n, 100 * by[f] / total, f }' | sort -rn | awk 'NR <= 15'
done
echo
echo "callgrind files: $OUT (callgrind_annotate --inclusive=yes FILE)"
