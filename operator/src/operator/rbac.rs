//! The operator's RBAC, stated beside the code that needs it: every verb here is used by an API
//! call of the operator (named in the comment), and nothing else. The Helm chart's ClusterRole
//! and leader-election Role (charts/weir/templates/rbac.yaml) must grant exactly these; the test
//! below renders the chart and fails on a verb either side lacks, so a new API call without its
//! grant, or a grant no call needs, cannot slip through.

/// Where a rule is granted: the ClusterRole (bound cluster-wide, or in `watchNamespace`), or
/// the Role in the release namespace.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Scope {
    Watched,
    ReleaseNamespace,
    /// Cluster-scoped requests, bound cluster-wide whatever `watchNamespace` says.
    Cluster,
}

/// One grant: scope, API group ("" for core), resource, verbs.
pub type Rule = (Scope, &'static str, &'static str, &'static [&'static str]);

use Scope::{Cluster, ReleaseNamespace, Watched};

/// The verbs the operator uses. Server-side apply is a `patch`; one that creates the object is
/// also authorized as `create` by the API server, so applied kinds need both. Watches
/// (controllers, reflectors, metadata watchers) are `list` and `watch`.
pub const RULES: &[Rule] = &[
    // Controller and reflector of every kind; `get` of a dependency (microservice.rs), of the
    // Queues and Broker of a bridge or Saga (queue.rs, saga.rs); Queue finalizers by merge
    // patch (queue.rs).
    (
        Watched,
        "weir.dev",
        "microservices",
        &["get", "list", "watch"],
    ),
    (
        Watched,
        "weir.dev",
        "queues",
        &["get", "list", "watch", "patch"],
    ),
    // Sagas also read by name: the identity endpoint checks a coordinator account's live owner.
    (Watched, "weir.dev", "sagas", &["get", "list", "watch"]),
    (Watched, "weir.dev", "brokers", &["get", "list", "watch"]),
    // Status by server-side apply (`patch_status`), never read or replaced.
    (Watched, "weir.dev", "microservices/status", &["patch"]),
    (Watched, "weir.dev", "queues/status", &["patch"]),
    (Watched, "weir.dev", "sagas/status", &["patch"]),
    (Watched, "weir.dev", "brokers/status", &["patch"]),
    // Owner references with blockOwnerDeletion (controller_owner_ref) on the children of
    // Microservices, Sagas and Brokers: the OwnerReferencesPermissionEnforcement admission
    // plugin requires `update` on the owner's finalizers. Queues own nothing.
    (Watched, "weir.dev", "microservices/finalizers", &["update"]),
    (Watched, "weir.dev", "sagas/finalizers", &["update"]),
    (Watched, "weir.dev", "brokers/finalizers", &["update"]),
    // Children, server-side applied and watched by metadata (Microservice, Saga) or whole
    // (a managed Broker's StatefulSet; a Microservice's Deployments, cached trimmed). Deleted by the garbage collector, never by the operator.
    // Deployments also read by name: whose field manager holds `replicas` before an autoscaler
    // takes them over (autoscaling.rs).
    (
        Watched,
        "apps",
        "deployments",
        &["get", "list", "watch", "create", "patch"],
    ),
    // What scales a Microservice (autoscaling.rs): server-side applied, and deleted by the
    // operator when `spec.autoscaling` no longer renders it (the garbage collector removes
    // them with the Microservice). Never read: the status says what was applied.
    (
        Watched,
        "autoscaling",
        "horizontalpodautoscalers",
        &["create", "patch", "delete"],
    ),
    (
        Watched,
        "keda.sh",
        "scaledobjects",
        &["create", "patch", "delete"],
    ),
    (
        Watched,
        "keda.sh",
        "triggerauthentications",
        &["create", "patch", "delete"],
    ),
    (
        Watched,
        "apps",
        "statefulsets",
        &["list", "watch", "create", "patch"],
    ),
    (
        Watched,
        "",
        "services",
        &["list", "watch", "create", "patch"],
    ),
    // ConfigMaps also read by name: a Queue's schema from a ConfigMap key (queue.rs).
    (
        Watched,
        "",
        "configmaps",
        &["get", "list", "watch", "create", "patch"],
    ),
    // Read by name only (a Broker's credentials; secrets::create_once checks before it
    // creates the identity key or a managed RabbitMQ user). Never listed or watched: a
    // cluster-wide list would hand the operator every token Secret of every namespace.
    (Watched, "", "secrets", &["get", "create"]),
    // The identity endpoint (identity.rs): the ServiceAccount of a reviewed token, by name;
    // under the mesh, each Microservice's own account, server-side applied (workload.rs).
    // Under the mesh, watched by metadata (applied.rs knows their versions).
    (
        Watched,
        "",
        "serviceaccounts",
        &["get", "list", "watch", "create", "patch"],
    ),
    // ... and the TokenReview itself.
    (
        Cluster,
        "authentication.k8s.io",
        "tokenreviews",
        &["create"],
    ),
    // The mesh's CA (mesh_ca.rs): its Secrets in the operator's namespace, read and created
    // once when absent.
    (ReleaseNamespace, "", "secrets", &["get", "create"]),
    // kube's Recorder: the first Event of a series is created, repeats patch it.
    (Watched, "events.k8s.io", "events", &["create", "patch"]),
    // Leader election (leader.rs): get, create the Lease, replace it with its resourceVersion.
    (
        ReleaseNamespace,
        "coordination.k8s.io",
        "leases",
        &["get", "create", "update"],
    ),
];

#[cfg(test)]
mod tests {
    use super::*;
    use serde::Deserialize;
    use std::collections::BTreeSet;
    use std::path::{Path, PathBuf};

    type Grant = (Scope, String, String, String);

    fn table() -> BTreeSet<Grant> {
        RULES
            .iter()
            .flat_map(|(s, g, r, verbs)| {
                verbs
                    .iter()
                    .map(move |v| (*s, g.to_string(), r.to_string(), v.to_string()))
            })
            .collect()
    }

    /// The grants of the rendered ClusterRole and Role, one per verb.
    fn grants(rendered: &str) -> BTreeSet<Grant> {
        let mut out = BTreeSet::new();
        for doc in serde_yaml::Deserializer::from_str(rendered) {
            let v = serde_yaml::Value::deserialize(doc).expect("rendered YAML");
            let cluster = v["metadata"]["name"]
                .as_str()
                .is_some_and(|n| n.ends_with("-identity"));
            let scope = match v["kind"].as_str() {
                Some("ClusterRole") if cluster => Cluster,
                Some("ClusterRole") => Watched,
                Some("Role") => ReleaseNamespace,
                _ => continue,
            };
            let strs = |x: &serde_yaml::Value| -> Vec<String> {
                x.as_sequence()
                    .expect("a list")
                    .iter()
                    .map(|s| s.as_str().expect("a string").to_string())
                    .collect()
            };
            for rule in v["rules"].as_sequence().expect("rules") {
                for g in strs(&rule["apiGroups"]) {
                    for r in strs(&rule["resources"]) {
                        for verb in strs(&rule["verbs"]) {
                            out.insert((scope, g.clone(), r.clone(), verb));
                        }
                    }
                }
            }
        }
        out
    }

    /// What the chart grants beyond the table, and what it lacks of it.
    fn diff(chart: &BTreeSet<Grant>, table: &BTreeSet<Grant>) -> Vec<String> {
        let extra = chart
            .difference(table)
            .map(|g| format!("granted but not in rbac::RULES: {g:?}"));
        let missing = table
            .difference(chart)
            .map(|g| format!("in rbac::RULES but not granted: {g:?}"));
        extra.chain(missing).collect()
    }

    fn helm() -> PathBuf {
        let local = Path::new(env!("CARGO_MANIFEST_DIR")).join("../.tools/bin/helm");
        if local.exists() {
            return local;
        }
        // On PATH otherwise; a missing helm fails the test below (scripts/setup.sh installs it).
        PathBuf::from("helm")
    }

    fn render(extra: &[&str]) -> String {
        let chart = Path::new(env!("CARGO_MANIFEST_DIR")).join("../charts/weir");
        let out = std::process::Command::new(helm())
            .args(["template", "weir"])
            .arg(&chart)
            .args([
                "--namespace",
                "weir-system",
                "--show-only",
                "templates/rbac.yaml",
            ])
            .args(extra)
            .output()
            .expect("helm runs (scripts/setup.sh installs it into .tools/bin)");
        assert!(
            out.status.success(),
            "helm template: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap()
    }

    #[test]
    fn the_charts_rbac_grants_exactly_the_verbs_the_operator_uses() {
        let table = table();
        for values in [&[][..], &["--set", "watchNamespace=apps"][..]] {
            let chart = grants(&render(values));
            assert!(!chart.is_empty(), "no rules rendered ({values:?})");
            let d = diff(&chart, &table);
            assert!(
                d.is_empty(),
                "chart vs rbac::RULES ({values:?}):\n{}",
                d.join("\n")
            );
        }
    }

    #[test]
    fn no_secret_is_listed_or_watched() {
        for (_, g, r, verbs) in RULES {
            if g.is_empty() && *r == "secrets" {
                assert!(!verbs.contains(&"list") && !verbs.contains(&"watch"));
            }
        }
    }

    /// The comparison itself: an extra verb in the chart and a verb it lacks are both named.
    #[test]
    fn the_comparison_names_an_extra_and_a_missing_verb() {
        let table = table();
        let mut chart = table.clone();
        assert!(diff(&chart, &table).is_empty());
        chart.insert((Watched, "".into(), "secrets".into(), "list".into()));
        chart.remove(&(
            ReleaseNamespace,
            "coordination.k8s.io".into(),
            "leases".into(),
            "update".into(),
        ));
        let d = diff(&chart, &table);
        assert_eq!(d.len(), 2, "{d:?}");
        assert!(d[0].starts_with("granted but not in rbac::RULES") && d[0].contains("\"list\""));
        assert!(d[1].starts_with("in rbac::RULES but not granted") && d[1].contains("\"update\""));
    }
}
