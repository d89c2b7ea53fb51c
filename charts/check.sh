#!/usr/bin/env bash
# Checks of the Weir Helm chart (charts/weir). Run scripts/setup.sh first: it installs helm and
# kubernetes-validate into .tools/bin.
#
#   charts/check.sh
#
# 1. `helm lint --strict` with the default values and with every charts/weir/ci/*-values.yaml.
# 2. `helm template ... --include-crds` for the same values, validated offline by
#    `kubernetes-validate --strict`: the templates against each version in WEIR_K8S_VERSIONS
#    (default "1.25 1.33": 1.25 is the oldest schema kubernetes-validate ships, the nearest to
#    the 1.20 test cluster; 1.33 is the API level the operator is built against), the CRDs from
#    crds/ against WEIR_CRD_K8S_VERSIONS (default "1.33": they use CEL rules with fieldPath,
#    which the CRD schema knows from 1.28; older API servers drop those fields). Every rendered
#    object must be validated: a kind without a schema is a failure, not a warning.
# 3. Contract assertions on the rendered manifests: API versions limited to the ones served by
#    Kubernetes 1.20 and later, the operator's flags for each values file, the CRDs from
#    charts/weir/crds/ (none yet is fine) all rendered.
# 4. Negative checks: every charts/testdata/bad-*-values.yaml must make both `helm lint --strict`
#    and `helm template` fail through values.schema.json.
#
# Exits non-zero when anything failed, after printing every failure.
set -uo pipefail

cd "$(dirname "$0")/.." || exit 1
ROOT=$PWD
CHART=charts/weir
RELEASE=weir
NAMESPACE=weir-system
export PATH="$ROOT/.tools/bin:$PATH"
K8S_VERSIONS=${WEIR_K8S_VERSIONS:-"1.25 1.33"}
CRD_K8S_VERSIONS=${WEIR_CRD_K8S_VERSIONS:-"1.33"}
PY="$ROOT/.tools/venv/bin/python"

failures=()
fail() { failures+=("$1"); printf '  FAIL %s\n' "$1"; }
pass() { printf '  ok   %s\n' "$1"; }
step() { printf '\n== %s\n' "$1"; }

for tool in helm kubernetes-validate; do
  if ! command -v "$tool" >/dev/null; then
    echo "check.sh: $tool not found; run scripts/setup.sh first" >&2
    exit 1
  fi
done
[ -x "$PY" ] || PY=python3
if ! "$PY" -c 'import yaml' 2>/dev/null; then
  echo "check.sh: $PY has no PyYAML; run scripts/setup.sh first" >&2
  exit 1
fi

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

# Objects in a YAML stream: "<apiVersion> <kind> <name>" per line.
objects() {
  "$PY" -c '
import sys, yaml
for d in yaml.safe_load_all(open(sys.argv[1])):
    if d:
        print(d.get("apiVersion"), d.get("kind"), (d.get("metadata") or {}).get("name"))
' "$1"
}

# The operator container's args, one per line.
operator_args() {
  "$PY" -c '
import sys, yaml
for d in yaml.safe_load_all(open(sys.argv[1])):
    if d and d.get("kind") == "Deployment":
        for c in d["spec"]["template"]["spec"]["containers"]:
            if c["name"] == "operator":
                print("\n".join(c.get("args", [])))
                print("imagePullPolicy=" + c.get("imagePullPolicy", ""))
' "$1"
}

# Fixtures: the default values plus every positive CI values file.
declare -a value_sets=("default")
for f in "$CHART"/ci/*-values.yaml; do
  [ -e "$f" ] && value_sets+=("$f")
done
values_args() { [ "$1" = default ] || printf -- '-f\n%s\n' "$1"; }

crd_files=()
for f in "$CHART"/crds/*.yaml "$CHART"/crds/*.yml; do
  [ -e "$f" ] && crd_files+=("$f")
done
echo "chart: $CHART, CRD files in crds/: ${#crd_files[@]}, Kubernetes versions: templates $K8S_VERSIONS, CRDs $CRD_K8S_VERSIONS"

# --- 1. helm lint --strict -------------------------------------------------------------------
step "helm lint --strict"
for vs in "${value_sets[@]}"; do
  mapfile -t va < <(values_args "$vs")
  if out=$(helm lint --strict "$CHART" --namespace "$NAMESPACE" "${va[@]}" 2>&1); then
    pass "helm lint --strict ($vs)"
  else
    printf '%s\n' "$out" | sed 's/^/       /'
    fail "helm lint --strict ($vs)"
  fi
done

# --- 2. helm template | kubernetes-validate --------------------------------------------------
step "helm template --include-crds | kubernetes-validate --strict"
i=0
for vs in "${value_sets[@]}"; do
  i=$((i + 1))
  mapfile -t va < <(values_args "$vs")
  rendered="$work/rendered-$i.yaml"
  # policy/v1 is offered so the Capabilities-guarded PodDisruptionBudget renders and is validated.
  if ! helm template "$RELEASE" "$CHART" --namespace "$NAMESPACE" --include-crds \
      --api-versions policy/v1/PodDisruptionBudget "${va[@]}" >"$rendered" 2>"$work/err"; then
    sed 's/^/       /' "$work/err"
    fail "helm template ($vs)"
    continue
  fi
  cp "$rendered" "$work/by-name-$(basename "$vs")"
  # Split the stream: CustomResourceDefinitions (from crds/) and the chart's templates.
  "$PY" -c '
import sys, yaml
docs = [d for d in yaml.safe_load_all(open(sys.argv[1])) if d]
crds = [d for d in docs if d.get("kind") == "CustomResourceDefinition"]
rest = [d for d in docs if d.get("kind") != "CustomResourceDefinition"]
yaml.safe_dump_all(crds, open(sys.argv[2], "w"), sort_keys=False)
yaml.safe_dump_all(rest, open(sys.argv[3], "w"), sort_keys=False)
' "$rendered" "$work/crds-$i.yaml" "$work/templates-$i.yaml"
  for part in templates crds; do
    file="$work/$part-$i.yaml"
    total=$(objects "$file" | wc -l)
    if [ "$part" = crds ]; then
      # crds/ is empty until `weir crd` has written it; the CRDs do not depend on values.
      { [ "$total" -eq 0 ] || [ "$i" -gt 1 ]; } && continue
      versions=$CRD_K8S_VERSIONS
    else
      [ "$total" -gt 0 ] || { fail "no objects parsed from the rendered templates ($vs)"; continue; }
      versions=$K8S_VERSIONS
    fi
    for v in $versions; do
      out=$(kubernetes-validate --strict -k "$v" "$file" 2>&1)
      rc=$?
      passed=$(grep -c '^INFO .* passed for resource' <<<"$out")
      if [ "$rc" -ne 0 ] || grep -qE '^(ERROR|WARN|FATAL)' <<<"$out" || [ "$passed" -ne "$total" ]; then
        grep -vE '^INFO ' <<<"$out" | sed 's/^/       /'
        fail "kubernetes-validate --strict -k $v, $part ($vs): $passed of $total objects validated (rc $rc)"
      else
        pass "kubernetes-validate --strict -k $v, $part ($vs): $total objects"
      fi
    done
  done
done

# --- 3. contract assertions ------------------------------------------------------------------
step "rendered manifests match the operator's contract"
n_before=${#failures[@]}
# API versions a Kubernetes 1.20 cluster serves (policy/v1 only behind its Capabilities guard).
allowed='^(v1|apps/v1|rbac.authorization.k8s.io/v1|coordination.k8s.io/v1|events.k8s.io/v1|apiextensions.k8s.io/v1|policy/v1)$'
for f in "$work"/rendered-*.yaml; do
  [ -e "$f" ] || continue
  bad=$(objects "$f" | awk '{print $1}' | sort -u | grep -vE "$allowed" || true)
  if [ -n "$bad" ]; then fail "$(basename "$f"): API versions not served by Kubernetes 1.20: $(tr '\n' ' ' <<<"$bad")"; fi
done
pdb_guard=$(helm template "$RELEASE" "$CHART" --namespace "$NAMESPACE" --kube-version 1.20.0 \
  --set podDisruptionBudget.enabled=true 2>&1 | grep -c 'kind: PodDisruptionBudget')
if [ "$pdb_guard" = 0 ]; then pass "PodDisruptionBudget skipped where policy/v1 is not served"; else fail "PodDisruptionBudget rendered without policy/v1"; fi

expect_kinds() { # file kinds...
  local f=$1; shift
  local have; have=$(objects "$f" | awk '{print $2}' | sort -u)
  for k in "$@"; do
    grep -qx "$k" <<<"$have" || fail "$(basename "$f"): no $k rendered"
  done
}
expect_args() { # file label present|absent arg...
  local f=$1 label=$2 mode=$3; shift 3
  local args; args=$(operator_args "$f")
  for a in "$@"; do
    if [ "$mode" = present ] && ! grep -qxF -- "$a" <<<"$args"; then fail "$label: operator arg '$a' missing"; fi
    if [ "$mode" = absent ] && grep -qxF -- "$a" <<<"$args"; then fail "$label: operator arg '$a' unexpected"; fi
  done
}
d="$work/by-name-default"
if [ -e "$d" ]; then
  expect_kinds "$d" ServiceAccount ClusterRole ClusterRoleBinding Role RoleBinding Service Deployment
  expect_args "$d" default present operator "--proxy-image=ghcr.io/weir-dev/weir-proxy:0.1.0" \
    "--proxy-image-pull-policy=IfNotPresent" "--lease-namespace=$NAMESPACE" \
    "--metrics-addr=0.0.0.0:8080" "--cluster-domain=cluster.local"
  # Leader election is on with the default single replica too: `kubectl scale` cannot make
  # two leaders.
  expect_args "$d" default present --leader-elect
  expect_args "$d" default absent --legacy-sidecar
  strategy=$("$PY" -c '
import sys, yaml
for d in yaml.safe_load_all(open(sys.argv[1])):
    if d and d.get("kind") == "Deployment":
        print(d["spec"]["strategy"]["type"])
' "$d")
  [ "$strategy" = RollingUpdate ] || fail "default: Deployment strategy $strategy, expected RollingUpdate"
  if grep -q -- '^--watch-namespace' <<<"$(operator_args "$d")"; then fail "default: --watch-namespace set"; fi
  # Every CRD in crds/ is rendered by --include-crds (a file may hold several documents).
  want=0
  for f in "${crd_files[@]}"; do want=$((want + $(objects "$f" | wc -l))); done
  crds=$(objects "$d" | awk '$2 == "CustomResourceDefinition"' | wc -l)
  [ "$crds" -eq "$want" ] || fail "default: $crds CRDs rendered, $want in crds/"
fi
h="$work/by-name-ha-legacy-values.yaml"
if [ -e "$h" ]; then
  expect_args "$h" ha-legacy present --legacy-sidecar --leader-elect \
    "--proxy-image=weir-proxy:dev" "--proxy-image-pull-policy=Never" "imagePullPolicy=Never"
fi
s="$work/by-name-single-namespace-values.yaml"
if [ -e "$s" ]; then
  expect_args "$s" single-namespace present --leader-elect "--watch-namespace=apps" "--metrics-addr=0.0.0.0:9090"
  expect_args "$s" single-namespace absent --legacy-sidecar
  expect_kinds "$s" RoleBinding PodDisruptionBudget
  # The watch rights are bound in the namespace only; the one cluster-wide binding left is the
  # identity endpoint's TokenReview (cluster-scoped). Read whole, then matched: `grep -q` on a
  # pipe under pipefail would make a match look like a failure of the pipe.
  crbs=$(objects "$s" | awk '$2 == "ClusterRoleBinding" {print $3}')
  if [ -n "$crbs" ] && grep -qvxF "$RELEASE-identity" <<<"$crbs"; then
    fail "single-namespace: ClusterRoleBinding rendered: $(tr '\n' ' ' <<<"$crbs")"
  fi
fi
m="$work/by-name-mtls-values.yaml"
if [ -e "$m" ]; then
  expect_args "$m" mtls present --mtls "--trust-domain=mesh.example.com" "--identity-addr=0.0.0.0:9443" "--mtls-mode=permissive"
  # Sidecars ask https://weir-identity.<namespace>.svc: the Service's name is fixed.
  objects "$m" >"$work/mtls-objects"
  grep -qx 'v1 Service weir-identity' "$work/mtls-objects" || fail "mtls: no Service weir-identity"
fi
# The mesh is on by default (strict); mtls.enabled=false turns all of it off.
if [ -e "$d" ]; then
  expect_args "$d" default present --mtls "--trust-domain=cluster.local" "--identity-addr=0.0.0.0:8443" "--mtls-mode=strict"
  objects "$d" >"$work/default-objects"
  grep -qx 'v1 Service weir-identity' "$work/default-objects" || fail "default: no Service weir-identity"
fi
o="$work/by-name-mtls-own-pki-values.yaml"
if [ -e "$o" ]; then
  # Your own PKI: the chart makes weir-issuer (tls.crt, tls.key, ca.crt) from the values.
  keys=$("$PY" -c '
import sys, yaml
for d in yaml.safe_load_all(open(sys.argv[1])):
    if d and d.get("kind") == "Secret" and d["metadata"]["name"] == "weir-issuer":
        print(" ".join(sorted(d["stringData"])))
' "$o")
  [ "$keys" = "ca.crt tls.crt tls.key" ] || fail "mtls-own-pki: Secret weir-issuer with keys '$keys'"
fi
if [ -e "$d" ]; then
  objects "$d" >"$work/default-objects-pki"
  if grep -qx 'v1 Secret weir-issuer' "$work/default-objects-pki"; then fail "default: Secret weir-issuer rendered without mtls.issuer"; fi
fi
n="$work/by-name-no-mtls-values.yaml"
if [ -e "$n" ]; then
  expect_args "$n" no-mtls absent --mtls
  objects "$n" >"$work/no-mtls-objects"
  if grep -qx 'v1 Service weir-identity' "$work/no-mtls-objects"; then fail "no-mtls: Service weir-identity without mtls.enabled"; fi
fi
[ "${#failures[@]}" -eq "$n_before" ] && pass "API versions, kinds, operator flags and CRDs as expected"

# --- 4. negative checks: values.schema.json rejects bad values -------------------------------
step "values.schema.json rejects wrong values (these must fail)"
for f in charts/testdata/bad-*-values.yaml; do
  [ -e "$f" ] || continue
  lint_out=$(helm lint --strict "$CHART" -f "$f" 2>&1); lint_rc=$?
  tmpl_out=$(helm template "$RELEASE" "$CHART" --namespace "$NAMESPACE" -f "$f" 2>&1); tmpl_rc=$?
  reason=$(grep -m1 -E "^- at " <<<"$tmpl_out" || true)
  if [ "$lint_rc" -ne 0 ] && [ "$tmpl_rc" -ne 0 ] && grep -q 'schema' <<<"$lint_out$tmpl_out"; then
    pass "$f rejected (helm lint rc $lint_rc, helm template rc $tmpl_rc): ${reason#- }"
  else
    { printf '%s\n' "$lint_out" | tail -n 5; printf '%s\n' "$tmpl_out" | head -n 5; } | sed 's/^/       /'
    fail "$f was not rejected by values.schema.json (helm lint rc $lint_rc, helm template rc $tmpl_rc)"
  fi
done

# --- summary ---------------------------------------------------------------------------------
echo
if [ "${#failures[@]}" -gt 0 ]; then
  echo "chart checks FAILED (${#failures[@]}):"
  printf '  - %s\n' "${failures[@]}"
  exit 1
fi
echo "chart checks passed"
