#!/usr/bin/env bash
# Measures the operator's failover on the local cluster: with two replicas (`helm upgrade
# --set replicas=2`), deletes the pod holding the Lease `weir-operator` and times until the
# other replica holds it. Fails when that takes 2 s or more (issue #22, 5). Then, unless
# WEIR_FAILOVER_CRASH=0, `kill -9` of the leader's process (found by its pid in containerd's
# task list; no release possible) and the time until a replica renews the Lease again: the
# kubelet restarts the killed container, which takes its own Lease back at once (same pod name)
# unless the standby got it first once it expired (10 to 15 s after the last renewal).
#
#   KUBECONFIG=$(tests/cluster/up.sh | tail -1) tests/e2e/failover.sh
# Needs the chart installed as tests/e2e/local-cluster.sh installs it (release weir in
# weir-system).
set -euo pipefail
cd "$(dirname "$0")/../.."
NS=weir-system
LEASE=weir-operator
TARGET_MS=${WEIR_FAILOVER_TARGET_MS:-2000}

holder() { kubectl -n "$NS" get lease "$LEASE" -o jsonpath='{.spec.holderIdentity}' 2>/dev/null || true; }
now_ms() { date +%s%3N; }

helm upgrade weir charts/weir -n "$NS" --reuse-values --set replicas=2 --wait --timeout 180s >/dev/null
kubectl -n "$NS" rollout status deployment/weir --timeout 180s >/dev/null
# Both replicas running, one of them leading.
for _ in $(seq 1 100); do [[ -n "$(holder)" ]] && break; sleep 0.2; done
pods=$(kubectl -n "$NS" get pods -l app.kubernetes.io/name=weir -o jsonpath='{.items[*].metadata.name}')
echo "operator pods: $pods; leader: $(holder)"

# Waits until the Lease names a holder other than $1; prints the milliseconds since $2.
wait_new_holder() {
  local old=$1 t0=$2 h
  while :; do
    h=$(holder)
    if [[ -n "$h" && "$h" != "$old" ]]; then echo "$(( $(now_ms) - t0 )) $h"; return; fi
    (( $(now_ms) - t0 > 60000 )) && { echo "timeout"; return 1; }
    sleep 0.05
  done
}

leader=$(holder)
t0=$(now_ms)
kubectl -n "$NS" delete pod "$leader" --wait=false >/dev/null
read -r ms new < <(wait_new_holder "$leader" "$t0")
echo "graceful: deleted $leader; $new holds the Lease after ${ms} ms"
kubectl -n "$NS" rollout status deployment/weir --timeout 180s >/dev/null
(( ms < TARGET_MS )) || { echo "FAIL: graceful failover took ${ms} ms (target < ${TARGET_MS} ms)"; exit 1; }

if [[ "${WEIR_FAILOVER_CRASH:-1}" == 1 ]] && command -v ctr >/dev/null; then
  leader=$(holder)
  cid=$(kubectl -n "$NS" get pod "$leader" -o jsonpath='{.status.containerStatuses[?(@.name=="operator")].containerID}')
  cid=${cid#containerd://}
  pid=$(ctr -n k8s.io task ls | awk -v c="$cid" '$1 == c {print $2}')
  [[ -n "$pid" ]] || { echo "cannot find the pid of $leader's operator container"; exit 1; }
  t0=$(now_ms)
  kill -KILL "$pid"
  while :; do
    renew=$(kubectl -n "$NS" get lease "$LEASE" -o jsonpath='{.spec.renewTime}')
    renew_ms=$(date -d "$renew" +%s%3N)
    (( renew_ms > t0 )) && break
    (( $(now_ms) - t0 > 60000 )) && { echo "FAIL: nobody renewed the Lease within 60 s"; exit 1; }
    sleep 0.05
  done
  echo "crash: kill -9 of $leader (pid $pid); $(holder) renewed the Lease after $(( $(now_ms) - t0 )) ms"
  kubectl -n "$NS" rollout status deployment/weir --timeout 180s >/dev/null
fi
