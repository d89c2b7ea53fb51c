#!/usr/bin/env bash
# Checks of the Weir Helm chart (charts/weir). Run scripts/setup.sh first: it installs helm and
# kubernetes-validate into .tools/bin, and promtool (Debian's prometheus package).
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
#    object must be validated: a kind without a schema is a failure, not a warning. The one
#    exception is the PrometheusRule (a CRD of the Prometheus Operator): its rules are checked
#    with `promtool check rules` instead.
# 3. Contract assertions on the rendered manifests: API versions limited to the ones served by
#    Kubernetes 1.20 and later, the operator's flags for each values file, the CRDs from
#    charts/weir/crds/ (none yet is fine) all rendered, the web dashboard (off by default; its
#    args, hardening, Service and least rights read-only and with actions).
# 4. Negative checks: every charts/testdata/bad-*-values.yaml must make both `helm lint --strict`
#    and `helm template` fail through values.schema.json.
# 5. Alerts and dashboards: `promtool check rules` and `promtool test rules` on
#    charts/weir/rules/ (every alert with a summary, description and runbook), the PrometheusRule
#    rendered with the default values equal to rules/weir-alerts.yaml (its one definition), and
#    the PromQL of every dashboard in charts/weir/dashboards/ parsed by promtool. That the
#    metrics they name are exported is checked by `cargo test -p weir --test chart_metrics`.
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

for tool in helm kubernetes-validate promtool; do
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
  # Split the stream: CustomResourceDefinitions (from crds/), the PrometheusRule's rule groups
  # (no schema of kubernetes-validate knows the kind; promtool checks them) and the chart's
  # templates.
  "$PY" -c '
import sys, yaml
docs = [d for d in yaml.safe_load_all(open(sys.argv[1])) if d]
crds = [d for d in docs if d.get("kind") == "CustomResourceDefinition"]
rules = [d for d in docs if d.get("kind") == "PrometheusRule"]
rest = [d for d in docs if d.get("kind") not in ("CustomResourceDefinition", "PrometheusRule")]
yaml.safe_dump_all(crds, open(sys.argv[2], "w"), sort_keys=False)
yaml.safe_dump_all(rest, open(sys.argv[3], "w"), sort_keys=False)
for n, d in enumerate(rules):
    yaml.safe_dump(d["spec"], open("%s-%d.yaml" % (sys.argv[4], n), "w"), sort_keys=False)
' "$rendered" "$work/crds-$i.yaml" "$work/templates-$i.yaml" "$work/prometheusrule-$i"
  for f in "$work/prometheusrule-$i"-*.yaml; do
    [ -e "$f" ] || continue
    if out=$(promtool check rules "$f" 2>&1); then
      pass "promtool check rules, the rendered PrometheusRule ($vs): $(grep -o '[0-9]* rules found' <<<"$out")"
    else
      printf '%s\n' "$out" | sed 's/^/       /'
      fail "promtool check rules, the rendered PrometheusRule ($vs)"
    fi
  done
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
# monitoring.coreos.com/v1 is the Prometheus Operator's (prometheusRules.enabled, off by default).
allowed='^(v1|apps/v1|rbac.authorization.k8s.io/v1|coordination.k8s.io/v1|events.k8s.io/v1|apiextensions.k8s.io/v1|policy/v1|networking.k8s.io/v1|monitoring.coreos.com/v1)$'
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
# Dashboards and alerts are off by default; observability-values turns them on.
if [ -e "$d" ]; then
  objects "$d" >"$work/default-objects-obs"
  if grep -qE '^monitoring.coreos.com/v1 PrometheusRule ' "$work/default-objects-obs"; then fail "default: PrometheusRule rendered"; fi
  if grep -q 'grafana_dashboard' "$d"; then fail "default: dashboard ConfigMaps rendered"; fi
fi
ob="$work/by-name-observability-values.yaml"
if [ -e "$ob" ]; then
  # The dashboards: one ConfigMap per dashboards/*.json, in grafana.dashboards.namespace, with
  # the label and value asked for, holding the file's JSON unchanged.
  got=$("$PY" -c '
import json, sys, yaml
for d in yaml.safe_load_all(open(sys.argv[1])):
    if d and d.get("kind") == "ConfigMap" and (d["metadata"].get("labels") or {}).get("weir.dev/dashboard") == "true":
        for key, text in d["data"].items():
            same = json.loads(text) == json.load(open(sys.argv[2] + "/" + key))
            print(d["metadata"]["namespace"], key, "same" if same else "differs")
' "$ob" "$CHART/dashboards")
  want=$(for f in "$CHART"/dashboards/*.json; do echo "monitoring $(basename "$f") same"; done)
  [ "$got" = "$want" ] || fail "observability: dashboard ConfigMaps '$got', expected '$want'"
  # The PrometheusRule: labelled for the ruleSelector, with the values' `for` and severity, and
  # without the alert turned off.
  got=$("$PY" -c '
import sys, yaml
for d in yaml.safe_load_all(open(sys.argv[1])):
    if d and d.get("kind") == "PrometheusRule":
        print("release=" + d["metadata"]["labels"].get("release", ""))
        for g in d["spec"]["groups"]:
            for r in g["rules"]:
                print(r["alert"], r["for"], r["labels"]["severity"])
' "$ob")
  want="release=kube-prometheus-stack
WeirCircuitBreakerOpen 10m critical
WeirDeadLettersGrowing 0m warning
WeirSagaCompensationFailed 0m critical
WeirConsumerLagGrowing 30m warning"
  [ "$got" = "$want" ] || fail "observability: PrometheusRule '$got', expected '$want'"
fi
# The web dashboard is off by default; dashboard-values turns it on read-only (from a
# Prometheus), dashboard-actions-values with actions and one watched namespace.
dashboard_facts() { # file: the dashboard's args, its securityContext and probes, and its rights
  "$PY" -c '
import sys, yaml
for d in yaml.safe_load_all(open(sys.argv[1])):
    if not d or (d.get("metadata") or {}).get("labels", {}).get("app.kubernetes.io/component") != "dashboard":
        continue
    k = d["kind"]
    if k == "Deployment":
        c = d["spec"]["template"]["spec"]["containers"][0]
        print("pod name label " + d["spec"]["template"]["metadata"]["labels"]["app.kubernetes.io/name"])
        for a in c.get("args", []):
            print("arg " + a)
        sc = c.get("securityContext") or {}
        print("readOnlyRootFilesystem=%s runAsNonRoot=%s" % (sc.get("readOnlyRootFilesystem"), sc.get("runAsNonRoot")))
        print("probes=%s,%s" % (c["livenessProbe"]["httpGet"]["port"], c["readinessProbe"]["httpGet"]["port"]))
    elif k == "Service":
        p = d["spec"]["ports"][0]
        print("service %s %s %s->%s" % (d["metadata"]["name"], d["spec"]["type"], p["port"], p["targetPort"]))
    elif k == "ClusterRole":
        for r in d["rules"]:
            for g in r["apiGroups"]:
                for res in r["resources"]:
                    for v in r["verbs"]:
                        print("grant %s/%s %s" % (g, res, v))
    elif k in ("ClusterRoleBinding", "RoleBinding"):
        print("binding %s %s" % (k, d["metadata"].get("namespace", "")))
    elif k == "NetworkPolicy":
        print("networkpolicy ingress=%s" % d["spec"].get("ingress"))
' "$1"
}
if [ -e "$d" ]; then
  if [ -n "$(dashboard_facts "$d")" ]; then fail "default: the dashboard rendered without dashboard.enabled"; fi
fi
expect_facts() { # label facts present|absent lines...
  local label=$1 facts=$2 mode=$3; shift 3
  for l in "$@"; do
    if [ "$mode" = present ] && ! grep -qxF -- "$l" <<<"$facts"; then fail "$label: dashboard '$l' missing"; fi
    if [ "$mode" = absent ] && grep -qxF -- "$l" <<<"$facts"; then fail "$label: dashboard '$l' unexpected"; fi
  done
}
db="$work/by-name-dashboard-values.yaml"
if [ -e "$db" ]; then
  f=$(dashboard_facts "$db")
  expect_facts dashboard "$f" present "arg dashboard" "arg serve" "arg --listen=0.0.0.0:9900" \
    "arg --prometheus=http://prometheus-operated.monitoring:9090" \
    "readOnlyRootFilesystem=True runAsNonRoot=True" "probes=http,http" \
    "service weir-dashboard ClusterIP 80->http" "binding ClusterRoleBinding " \
    "grant weir.dev/microservices list" "grant weir.dev/queues list" "grant weir.dev/sagas list" \
    "grant weir.dev/brokers list" "grant /pods list" "grant /pods/proxy get" \
    "pod name label weir-dashboard" "networkpolicy ingress=[]"
  # Its pods are not the operator's (`-l app.kubernetes.io/name=weir` selects the operator).
  # Read-only: no POST through the pod proxy, no Secret, nothing written.
  expect_facts dashboard "$f" absent "arg --actions" "grant /pods/proxy create" "grant /secrets get"
  w=$(grep -E '^grant ' <<<"$f" | grep -vE ' (get|list|watch)$' || true)
  [ -z "$w" ] || fail "dashboard: read-only dashboard may write: $(tr '\n' ' ' <<<"$w")"
fi
da="$work/by-name-dashboard-actions-values.yaml"
if [ -e "$da" ]; then
  f=$(dashboard_facts "$da")
  expect_facts dashboard-actions "$f" present "arg --actions" "arg --namespace=apps" \
    "grant /pods/proxy create" "grant /secrets get" "binding RoleBinding apps"
  expect_facts dashboard-actions "$f" absent "binding ClusterRoleBinding " "grant /secrets list" "grant /secrets watch" \
    "networkpolicy ingress=[]"
fi
[ "${#failures[@]}" -eq "$n_before" ] && pass "API versions, kinds, operator flags, CRDs, dashboards and alerts as expected"

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

# --- 5. alerts and dashboards: promtool ------------------------------------------------------
step "alerting rules and dashboards (promtool)"
RULES=$CHART/rules/weir-alerts.yaml
if out=$(promtool check rules "$RULES" 2>&1); then
  pass "promtool check rules $RULES: $(grep -o '[0-9]* rules found' <<<"$out")"
else
  printf '%s\n' "$out" | sed 's/^/       /'
  fail "promtool check rules $RULES"
fi
for t in "$CHART"/rules/*_test.yaml; do
  [ -e "$t" ] || continue
  if out=$(promtool test rules "$t" 2>&1); then
    pass "promtool test rules $t: $(grep -c 'alertname:' "$t") alert checks"
  else
    printf '%s\n' "$out" | sed 's/^/       /'
    fail "promtool test rules $t"
  fi
done
# Every alert says what it is and what to do, and is tested firing and not firing.
if out=$("$PY" -c '
import sys, yaml
rules = yaml.safe_load(open(sys.argv[1]))
tests = yaml.safe_load(open(sys.argv[2]))
firing, quiet = set(), set()
for t in tests["tests"]:
    for a in t.get("alert_rule_test", []):
        (firing if a.get("exp_alerts") else quiet).add(a["alertname"])
bad = []
for g in rules["groups"]:
    for r in g["rules"]:
        name = r.get("alert") or r.get("record")
        missing = [k for k in ("summary", "description", "runbook") if not (r.get("annotations") or {}).get(k)]
        if "alert" in r and missing:
            bad.append("%s: no %s annotation" % (name, ", ".join(missing)))
        if "alert" in r and name not in firing:
            bad.append("%s: no test where it fires" % name)
        if "alert" in r and name not in quiet:
            bad.append("%s: no test where it does not fire" % name)
print("\n".join(bad))
sys.exit(1 if bad else 0)
' "$RULES" "$CHART/rules/weir-alerts_test.yaml" 2>&1); then
  pass "every alert has a summary, a description and a runbook, and tests firing and not firing"
else
  printf '%s\n' "$out" | sed 's/^/       /'
  fail "alerts without their annotations or tests"
fi
# One definition: the PrometheusRule rendered with the default values is the rule file.
if helm template "$RELEASE" "$CHART" --namespace "$NAMESPACE" --set prometheusRules.enabled=true \
    --show-only templates/prometheusrule.yaml >"$work/prometheusrule-default.yaml" 2>"$work/err" &&
  out=$("$PY" -c '
import sys, yaml
rendered = yaml.safe_load(open(sys.argv[1]))["spec"]
source = yaml.safe_load(open(sys.argv[2]))
if rendered != source:
    for g1, g2 in zip(rendered["groups"], source["groups"]):
        for r1, r2 in zip(g1["rules"], g2["rules"]):
            if r1 != r2:
                print("%s: rendered %s, rules file %s" % (r2.get("alert"), {k: v for k, v in r1.items() if r2.get(k) != v}, {k: v for k, v in r2.items() if r1.get(k) != v}))
    sys.exit(1)
' "$work/prometheusrule-default.yaml" "$RULES" 2>&1); then
  pass "the PrometheusRule rendered with the default values is $RULES"
else
  { cat "$work/err"; printf '%s\n' "$out"; } | sed 's/^/       /'
  fail "the PrometheusRule rendered with the default values differs from $RULES (prometheusRules.alerts in values.yaml?)"
fi
# The dashboards' PromQL, with Grafana's variables given values, as recording rules.
if "$PY" -c '
import glob, json, sys, yaml
values = {"$__rate_interval": "5m", "$__range": "1h", "$namespace": "ns", "$microservice": ".*", "$queue": ".*", "$saga": ".*"}
def panels(ps):
    for p in ps:
        yield p
        yield from panels(p.get("panels", []))
rules = []
for f in sorted(glob.glob(sys.argv[1] + "/*.json")):
    d = json.load(open(f))
    for p in panels(d["panels"]):
        for t in p.get("targets", []):
            expr = t["expr"]
            for k, v in values.items():
                expr = expr.replace(k, v)
            if "$" in expr:
                sys.exit("%s, panel %r: a variable this check does not know: %s" % (f, p["title"], expr))
            rules.append({"record": "weir_dashboard:%s:%d" % (d["uid"].replace("-", "_"), len(rules)), "expr": expr})
yaml.safe_dump({"groups": [{"name": "dashboards", "rules": rules}]}, open(sys.argv[2], "w"))
' "$CHART/dashboards" "$work/dashboard-exprs.yaml" 2>"$work/err" && out=$(promtool check rules "$work/dashboard-exprs.yaml" 2>&1); then
  pass "the PromQL of $(ls "$CHART"/dashboards/*.json | wc -l) dashboards parses: $(grep -o '[0-9]* rules found' <<<"$out" | sed 's/rules/queries/')"
else
  { cat "$work/err"; printf '%s\n' "${out:-}"; } | sed 's/^/       /'
  fail "the dashboards' PromQL"
fi

# --- summary ---------------------------------------------------------------------------------
echo
if [ "${#failures[@]}" -gt 0 ]; then
  echo "chart checks FAILED (${#failures[@]}):"
  printf '  - %s\n' "${failures[@]}"
  exit 1
fi
echo "chart checks passed"
