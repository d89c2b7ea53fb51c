#!/usr/bin/env bash
# Smoke test of the running test cluster: an image packed by image.sh from
# Debian's static busybox serves HTTP in two pods behind a Service; a pod in
# another namespace fetches it by the Service's DNS name; kubectl logs/exec
# work. Cleans up after itself. Exit 0 when everything answered.
# Usage: smoke.sh [KUBECONFIG]   (default: the one up.sh wrote)
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
export KUBECONFIG=${1:-${KUBECONFIG:-$KUBECONFIG_ADMIN}}
T0=$SECONDS
if [[ ! -x /bin/busybox ]] || ! dpkg-query -W -f='${Status}' busybox-static 2>/dev/null | grep -q 'install ok installed'; then
  log "installing busybox-static"
  DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends busybox-static >&2 \
    || { apt-get update >&2 && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends busybox-static >&2; }
fi
"$CLUSTER_DIR/image.sh" weir-smoke-busybox:1 /bin/busybox 2>&1 | tail -1 >&2

S=weir-smoke-server C=weir-smoke-client
cleanup() {
  kubectl delete namespace "$S" "$C" --ignore-not-found --wait=false >/dev/null 2>&1 || true
  kubectl delete crd smokes.smoke.weir.test --ignore-not-found --wait=false >/dev/null 2>&1 || true
}
trap cleanup EXIT
cleanup
kubectl wait --for=delete namespace/"$S" namespace/"$C" --timeout=120s >/dev/null 2>&1 || true
kubectl create namespace "$S" >/dev/null
kubectl create namespace "$C" >/dev/null
kubectl -n "$S" apply -f - >/dev/null <<'YAML'
apiVersion: apps/v1
kind: Deployment
metadata: {name: web}
spec:
  replicas: 2
  selector: {matchLabels: {app: web}}
  template:
    metadata: {labels: {app: web}}
    spec:
      terminationGracePeriodSeconds: 1
      containers:
      - name: web
        image: weir-smoke-busybox:1
        imagePullPolicy: Never
        command: ["/busybox", "sh", "-c", "mkdir -p /www && echo \"hello from $(hostname)\" > /www/index.html && exec /busybox httpd -f -p 8080 -h /www"]
        ports: [{containerPort: 8080}]
        readinessProbe: {httpGet: {path: /, port: 8080}, periodSeconds: 1}
---
apiVersion: v1
kind: Service
metadata: {name: web}
spec:
  selector: {app: web}
  ports: [{port: 80, targetPort: 8080}]
YAML
kubectl -n "$S" rollout status deploy/web --timeout=120s >&2 || die "web deployment not ready"

# The name resolves once dns-sync has seen the Service (within ~2 s).
kubectl -n "$C" apply -f - >/dev/null <<YAML
apiVersion: v1
kind: Pod
metadata: {name: client}
spec:
  restartPolicy: Never
  containers:
  - name: client
    image: weir-smoke-busybox:1
    imagePullPolicy: Never
    command: ["/busybox", "sh", "-c", "for i in 1 2 3 4 5 6 7 8 9 10; do /busybox wget -qO- http://web.$S.svc.cluster.local/ && break; sleep 1; done; for i in 1 2 3 4 5 6; do /busybox wget -qO- http://web.$S/; done"]
YAML
for i in $(seq 1 90); do
  phase=$(kubectl -n "$C" get pod client -o jsonpath='{.status.phase}' 2>/dev/null || true)
  [[ $phase == Succeeded || $phase == Failed ]] && break; sleep 1
done
out=$(kubectl -n "$C" logs client)
echo "$out" >&2
[[ $phase == Succeeded ]] || die "client pod ended $phase"
n=$(grep -c '^hello from web-' <<<"$out" || true)
backends=$(grep '^hello from web-' <<<"$out" | sort -u | wc -l)
(( n >= 7 )) || die "expected 7 answers through the Service, got $n"
log "Service answered $n times from $backends backend pod(s) via DNS name web.$S.svc.cluster.local"
pod=$(kubectl -n "$S" get pod -l app=web -o jsonpath='{.items[0].metadata.name}')
[[ "$(kubectl -n "$S" exec "$pod" -- /busybox cat /www/index.html)" == "hello from $pod" ]] || die "kubectl exec failed"
log "kubectl exec and logs work"
# A CustomResourceDefinition and an object of it: the apiserver encodes maps
# here (this crashed a build with the vendored reflect2 v1.0.1 under Go 1.19).
kubectl apply -f - >/dev/null <<'YAML'
apiVersion: apiextensions.k8s.io/v1
kind: CustomResourceDefinition
metadata: {name: smokes.smoke.weir.test}
spec:
  group: smoke.weir.test
  scope: Namespaced
  names: {plural: smokes, singular: smoke, kind: Smoke}
  versions:
  - name: v1
    served: true
    storage: true
    schema:
      openAPIV3Schema:
        type: object
        properties:
          spec:
            type: object
            properties:
              labels: {type: object, additionalProperties: {type: string}}
YAML
kubectl wait --for=condition=Established crd/smokes.smoke.weir.test --timeout=60s >/dev/null
kubectl -n "$S" apply -f - >/dev/null <<'YAML'
apiVersion: smoke.weir.test/v1
kind: Smoke
metadata: {name: one, labels: {b: "2", a: "1"}}
spec: {labels: {c: "3", b: "2", a: "1"}}
YAML
[[ "$(kubectl -n "$S" get smoke one -o jsonpath='{.spec.labels.b}')" == 2 ]] || die "custom resource not served"
kubectl get --raw /openapi/v2 >/dev/null || die "apiserver cannot serve /openapi/v2"
kubectl delete crd smokes.smoke.weir.test --wait=false >/dev/null
component_pid kube-apiserver >/dev/null || die "kube-apiserver exited"
log "CustomResourceDefinition and custom object served"
log "smoke test passed in $((SECONDS - T0))s"
