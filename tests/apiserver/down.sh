#!/usr/bin/env bash
# Stops the modern CRD API server and its etcd and removes their state (certificates, data,
# logs). The build cache stays (see README.md beside this file).
source "$(dirname "$0")/lib.sh"

for name in kubectl-front apiserver etcd; do
  pidfile="$STATE/run/$name.pid"
  [ -f "$pidfile" ] || continue
  pid=$(cat "$pidfile")
  if kill -0 "$pid" 2>/dev/null; then
    kill -TERM "$pid" 2>/dev/null || true
    for _ in $(seq 1 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
    if kill -0 "$pid" 2>/dev/null; then
      log "$name did not exit 5 s after SIGTERM; killing it"
      kill -KILL "$pid" 2>/dev/null || true
    fi
  fi
done
if [ "${WEIR_APISERVER_KEEP_LOGS:-0}" = 1 ]; then
  rm -rf "$STATE/run" "$STATE/etcd" "$STATE/pki" "$STATE/certs" "$STATE/kubeconfig"
else
  rm -rf "$STATE"
fi
