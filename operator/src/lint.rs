//! `weir lint`: static checks over a set of manifests, for the mistakes that decide whether
//! microservices pay off. Each finding has a rule id, the objects involved and a fix hint.

use crate::manifest::{Loaded, Object};
use std::collections::{BTreeMap, BTreeSet};
use weir_crds::Microservice;
use weir_crds::microservice::AppProtocol;

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Severity {
    Error,
    Warning,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Finding {
    pub rule: &'static str,
    pub name: &'static str,
    pub severity: Severity,
    /// `Microservice/orders`, `Queue/orders-created`, ...
    pub objects: Vec<String>,
    pub message: String,
    pub hint: &'static str,
}

impl std::fmt::Display for Finding {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let sev = match self.severity {
            Severity::Error => "error",
            Severity::Warning => "warning",
        };
        write!(
            f,
            "{sev}[{}] {}: {}\n  objects: {}\n  hint: {}",
            self.rule,
            self.name,
            self.message,
            self.objects.join(", "),
            self.hint
        )
    }
}

#[derive(Debug, Clone)]
pub struct LintConfig {
    /// Longest synchronous call chain (in calls) before a warning.
    pub max_chain_depth: usize,
    /// Most event types one service may consume before a warning.
    pub max_consumed_events: usize,
}

impl Default for LintConfig {
    fn default() -> Self {
        Self {
            max_chain_depth: 2,
            max_consumed_events: 5,
        }
    }
}

type Key = (String, String); // (namespace, name)

fn key_of(meta: &k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta) -> Key {
    (
        meta.namespace.clone().unwrap_or_default(),
        meta.name.clone().unwrap_or_default(),
    )
}

fn ms_ref(k: &Key) -> String {
    format!("Microservice/{}", k.1)
}

/// Runs every rule; findings sorted errors first.
pub fn lint(objects: &[Loaded], cfg: &LintConfig) -> Vec<Finding> {
    let services: BTreeMap<Key, &Microservice> = objects
        .iter()
        .filter_map(|l| match &l.object {
            Object::Microservice(m) => Some((key_of(&m.metadata), m)),
            _ => None,
        })
        .collect();
    let mut out = Vec::new();
    shared_databases(&services, &mut out);
    let graph = call_graph(&services);
    cycles(&graph, &mut out);
    deep_chains(&graph, cfg.max_chain_depth, &mut out);
    unprotected(&services, &mut out);
    grpc(&services, &mut out);
    events(objects, &services, cfg, &mut out);
    open_authorization(&services, &mut out);
    autoscaling_without_requests(&services, &mut out);
    out.sort_by(|a, b| (a.severity, a.rule, &a.objects).cmp(&(b.severity, b.rule, &b.objects)));
    out
}

pub fn has_errors(findings: &[Finding]) -> bool {
    findings.iter().any(|f| f.severity == Severity::Error)
}

// --- WEIR001 shared database ------------------------------------------------------------

fn is_db_var(name: &str) -> bool {
    let n = name.to_ascii_uppercase();
    [
        "DATABASE", "DB_", "_DB", "DSN", "POSTGRES", "PG", "MYSQL", "MONGO", "SQL",
    ]
    .iter()
    .any(|p| n.contains(p))
}

fn is_db_url(value: &str) -> bool {
    [
        "postgres://",
        "postgresql://",
        "mysql://",
        "mariadb://",
        "mongodb://",
        "mongodb+srv://",
        "sqlserver://",
        "jdbc:",
    ]
    .iter()
    .any(|s| value.starts_with(s))
}

/// What identifies a database in a service's env: URLs, host+name pairs, Secret references.
fn database_identities(ms: &Microservice) -> BTreeSet<String> {
    let mut ids = BTreeSet::new();
    let mut host = None;
    let mut name = None;
    for e in &ms.spec.env {
        let upper = e.name.to_ascii_uppercase();
        if let Some(v) = &e.value {
            if is_db_url(v) || (is_db_var(&e.name) && v.contains("://")) {
                ids.insert(format!("url {}", strip_credentials(v)));
            }
            if is_db_var(&e.name) && upper.ends_with("HOST") {
                host = Some(v.clone());
            }
            if is_db_var(&e.name) && (upper.ends_with("NAME") || upper.ends_with("DATABASE")) {
                name = Some(v.clone());
            }
        }
        if let Some(s) = e
            .value_from
            .as_ref()
            .and_then(|f| f.secret_key_ref.as_ref())
            && is_db_var(&e.name)
        {
            ids.insert(format!("secret {}/{}", s.name, s.key));
        }
    }
    if let (Some(h), Some(n)) = (host, name) {
        ids.insert(format!("host {h} database {n}"));
    }
    ids
}

/// `postgres://user:pw@host/db` → `postgres://host/db`: the same database whoever logs in.
fn strip_credentials(url: &str) -> String {
    match (url.find("://"), url.find('@')) {
        (Some(s), Some(at)) if at > s => format!("{}{}", &url[..s + 3], &url[at + 1..]),
        _ => url.to_string(),
    }
}

fn shared_databases(services: &BTreeMap<Key, &Microservice>, out: &mut Vec<Finding>) {
    let mut by_id: BTreeMap<String, BTreeSet<&Key>> = BTreeMap::new();
    for (k, ms) in services {
        for id in database_identities(ms) {
            by_id.entry(format!("{}|{id}", k.0)).or_default().insert(k);
        }
    }
    for (id, owners) in by_id {
        if owners.len() > 1 {
            let what = id.split_once('|').map(|x| x.1).unwrap_or(&id);
            out.push(Finding {
                rule: "WEIR001",
                name: "shared-database",
                severity: Severity::Error,
                objects: owners.iter().map(|k| ms_ref(k)).collect(),
                message: format!("{} services use the same database ({what}): a distributed monolith", owners.len()),
                hint: "give each service its own database; share data through its API or through events",
            });
        }
    }
}

// --- the synchronous call graph ---------------------------------------------------------

fn call_graph(services: &BTreeMap<Key, &Microservice>) -> BTreeMap<Key, Vec<Key>> {
    services
        .iter()
        .map(|(k, ms)| {
            let targets = ms
                .spec
                .dependencies
                .iter()
                .filter_map(|d| d.microservice.as_ref())
                .map(|t| (k.0.clone(), t.clone()))
                .filter(|t| services.contains_key(t))
                .collect();
            (k.clone(), targets)
        })
        .collect()
}

fn cycles(graph: &BTreeMap<Key, Vec<Key>>, out: &mut Vec<Finding>) {
    // Depth-first search; each cycle reported once, from its smallest member.
    let mut reported: BTreeSet<Vec<Key>> = BTreeSet::new();
    for start in graph.keys() {
        let mut stack = vec![(start.clone(), vec![start.clone()])];
        while let Some((node, path)) = stack.pop() {
            for next in graph.get(&node).into_iter().flatten() {
                if next == start {
                    let mut members = path.clone();
                    members.sort();
                    if reported.insert(members) && path.iter().min() == Some(start) {
                        let mut chain: Vec<String> = path.iter().map(|k| k.1.clone()).collect();
                        chain.push(start.1.clone());
                        out.push(Finding {
                            rule: "WEIR002",
                            name: "sync-cycle",
                            severity: Severity::Error,
                            objects: path.iter().map(ms_ref).collect(),
                            message: format!("synchronous calls form a cycle: {}", chain.join(" → ")),
                            hint: "break the cycle: one direction becomes an event, or the shared part moves into one service",
                        });
                    }
                } else if !path.contains(next) {
                    let mut p = path.clone();
                    p.push(next.clone());
                    stack.push((next.clone(), p));
                }
            }
        }
    }
}

fn longest_chain(graph: &BTreeMap<Key, Vec<Key>>, node: &Key, seen: &mut Vec<Key>) -> Vec<Key> {
    seen.push(node.clone());
    let mut best = vec![node.clone()];
    for next in graph.get(node).into_iter().flatten() {
        if seen.contains(next) {
            continue; // cycles are WEIR002's
        }
        let mut chain = longest_chain(graph, next, seen);
        if chain.len() + 1 > best.len() {
            chain.insert(0, node.clone());
            best = chain;
        }
    }
    seen.pop();
    best
}

fn deep_chains(graph: &BTreeMap<Key, Vec<Key>>, limit: usize, out: &mut Vec<Finding>) {
    let has_caller: BTreeSet<&Key> = graph.values().flatten().collect();
    for root in graph
        .keys()
        .filter(|k| !has_caller.contains(k) || graph.len() == 1)
    {
        let chain = longest_chain(graph, root, &mut Vec::new());
        let calls = chain.len().saturating_sub(1);
        if calls > limit {
            out.push(Finding {
                rule: "WEIR003",
                name: "deep-call-chain",
                severity: Severity::Warning,
                objects: chain.iter().map(ms_ref).collect(),
                message: format!(
                    "a synchronous chain of {calls} calls ({}) exceeds {limit}: latency and failure add up along it",
                    chain.iter().map(|k| k.1.as_str()).collect::<Vec<_>>().join(" → ")
                ),
                hint: "call fewer services per request: cache or replicate the data you need (from events), or merge services that always change together",
            });
        }
    }
}

// --- WEIR004 unprotected dependencies ---------------------------------------------------

fn unprotected(services: &BTreeMap<Key, &Microservice>, out: &mut Vec<Finding>) {
    for (k, ms) in services {
        for d in &ms.spec.dependencies {
            if d.circuit_breaker.is_none() {
                out.push(Finding {
                    rule: "WEIR004",
                    name: "unprotected-dependency",
                    severity: Severity::Warning,
                    objects: vec![ms_ref(k)],
                    message: format!("dependency {:?} has no circuit breaker (only the {} timeout)", d.name, d.timeout),
                    hint: "add `circuitBreaker: {}` (defaults: 50 % over 10s, 20 calls) and a fallback where a degraded answer beats an error",
                });
            }
        }
    }
}

// --- WEIR011 open authorization ---------------------------------------------------------

fn open_authorization(services: &BTreeMap<Key, &Microservice>, out: &mut Vec<Finding>) {
    use weir_crds::microservice::AuthorizationPolicy;
    for (k, ms) in services {
        if ms.spec.inbound.authorization == Some(AuthorizationPolicy::Open) {
            out.push(Finding {
                rule: "WEIR011",
                name: "open-authorization",
                severity: Severity::Warning,
                objects: vec![ms_ref(k)],
                message: "inbound.authorization: open admits every workload of the mesh, not only the callers the graph declares".into(),
                hint: "leave authorization out (graph) and add the callers that are not in the graph to `inbound.allowFrom`; `audit` shows who they are first",
            });
        }
    }
}

// --- WEIR012 a utilization target without the request it is a percentage of -------------

fn autoscaling_without_requests(services: &BTreeMap<Key, &Microservice>, out: &mut Vec<Finding>) {
    for (k, ms) in services {
        let Some(a) = &ms.spec.autoscaling else {
            continue;
        };
        let requests = ms.spec.resources.as_ref().and_then(|r| r.requests.as_ref());
        for (target, set, resource) in [
            (
                "targetCPUUtilizationPercentage",
                a.target_cpu_utilization_percentage,
                "cpu",
            ),
            (
                "targetMemoryUtilizationPercentage",
                a.target_memory_utilization_percentage,
                "memory",
            ),
        ] {
            if set.is_some() && !requests.is_some_and(|r| r.contains_key(resource)) {
                out.push(Finding {
                    rule: "WEIR012",
                    name: "utilization-without-request",
                    severity: Severity::Warning,
                    objects: vec![ms_ref(k)],
                    message: format!(
                        "autoscaling.{target} is a percentage of the app's {resource} request, and spec.resources.requests.{resource} is not set: the autoscaler cannot compute it and never scales"
                    ),
                    hint: "set spec.resources.requests (the sidecar's requests are set by Weir)",
                });
            }
        }
    }
}

/// What a dependency speaks: its `protocol` for a URL, the target's `spec.protocol` for a
/// Microservice of the set (`None`: a Microservice not in the set, unknown).
fn dependency_protocol(
    ns: &str,
    d: &weir_crds::microservice::Dependency,
    services: &BTreeMap<Key, &Microservice>,
) -> Option<AppProtocol> {
    match (&d.microservice, &d.url) {
        (Some(target), _) => services
            .get(&(ns.to_string(), target.clone()))
            .map(|m| m.spec.protocol),
        (None, Some(_)) => Some(d.protocol.unwrap_or_default()),
        (None, None) => None,
    }
}

/// gRPC dependencies: a fallback that gRPC callers cannot read (WEIR009), and gRPC settings on
/// a dependency that does not speak gRPC, which never apply (WEIR010).
fn grpc(services: &BTreeMap<Key, &Microservice>, out: &mut Vec<Finding>) {
    for (k, ms) in services {
        for d in &ms.spec.dependencies {
            let Some(protocol) = dependency_protocol(&k.0, d, services) else {
                continue;
            };
            let fallback_grpc = d.fallback.as_ref().map(|f| f.grpc_status.is_some());
            if protocol == AppProtocol::Grpc && fallback_grpc == Some(false) {
                out.push(Finding {
                    rule: "WEIR009",
                    name: "grpc-fallback-without-status",
                    severity: Severity::Warning,
                    objects: vec![ms_ref(k)],
                    message: format!(
                        "dependency {:?} speaks gRPC but its fallback has no grpcStatus: gRPC callers get the refusal (UNAVAILABLE) and the fallback's body is never used",
                        d.name
                    ),
                    hint: "add `fallback.grpcStatus` (and `grpcMessage`): the status gRPC callers get while the breaker is open or the bulkhead full",
                });
            }
            let grpc_settings = d.grpc.is_some() || fallback_grpc == Some(true);
            if protocol != AppProtocol::Grpc && grpc_settings {
                out.push(Finding {
                    rule: "WEIR010",
                    name: "grpc-settings-on-a-non-grpc-dependency",
                    severity: Severity::Warning,
                    objects: vec![ms_ref(k)],
                    message: format!(
                        "dependency {:?} has gRPC settings (grpc, fallback.grpcStatus) but speaks {}: they apply to gRPC calls only",
                        d.name,
                        protocol.as_str()
                    ),
                    hint: "set `protocol: grpc` on the target Microservice (or on the url dependency), or drop the gRPC settings",
                });
            }
        }
    }
}

// --- events: DLQ, orphans, fan-in -------------------------------------------------------

fn events(
    objects: &[Loaded],
    services: &BTreeMap<Key, &Microservice>,
    cfg: &LintConfig,
    out: &mut Vec<Finding>,
) {
    let queues: BTreeMap<Key, &weir_crds::Queue> = objects
        .iter()
        .filter_map(|l| match &l.object {
            Object::Queue(q) => Some((key_of(&q.metadata), q)),
            _ => None,
        })
        .collect();
    let mut publishers: BTreeMap<Key, Vec<String>> = BTreeMap::new();
    let mut consumers: BTreeMap<Key, Vec<String>> = BTreeMap::new();
    for (k, ms) in services {
        for p in &ms.spec.publishes {
            publishers
                .entry((k.0.clone(), p.queue.clone()))
                .or_default()
                .push(ms_ref(k));
        }
        for c in &ms.spec.consumes {
            consumers
                .entry((k.0.clone(), c.queue.clone()))
                .or_default()
                .push(ms_ref(k));
        }
        if ms.spec.consumes.len() > cfg.max_consumed_events {
            out.push(Finding {
                rule: "WEIR008",
                name: "too-many-consumed-events",
                severity: Severity::Warning,
                objects: vec![ms_ref(k)],
                message: format!("consumes {} event types (limit {})", ms.spec.consumes.len(), cfg.max_consumed_events),
                hint: "a service that must react to everything knows too much: split it by capability, or let a saga coordinate",
            });
        }
    }
    for l in objects {
        if let Object::Saga(s) = &l.object {
            let ns = s.metadata.namespace.clone().unwrap_or_default();
            let me = format!("Saga/{}", s.metadata.name.clone().unwrap_or_default());
            if let Some(q) = &s.spec.trigger.queue {
                consumers
                    .entry((ns.clone(), q.clone()))
                    .or_default()
                    .push(me.clone());
            }
            for o in [&s.spec.on_completed, &s.spec.on_failed]
                .into_iter()
                .flatten()
            {
                publishers
                    .entry((ns.clone(), o.queue.clone()))
                    .or_default()
                    .push(me.clone());
            }
        }
    }
    for (qk, q) in &queues {
        let qref = format!("Queue/{}", qk.1);
        let cons = consumers.get(qk);
        let pubs = publishers.get(qk);
        if let Some(c) = cons
            && !q.spec.dead_letter.enabled
        {
            out.push(Finding {
                rule: "WEIR005",
                name: "consumer-without-dead-letter-queue",
                severity: Severity::Warning,
                objects: std::iter::once(qref.clone()).chain(c.iter().cloned()).collect(),
                message: "the queue has consumers but no dead-letter queue: a message that keeps failing blocks or is lost".into(),
                hint: "set `deadLetter.enabled: true` (the default)",
            });
        }
        match (pubs, cons) {
            (None, Some(c)) => out.push(Finding {
                rule: "WEIR006",
                name: "consumed-never-published",
                severity: Severity::Warning,
                objects: std::iter::once(qref.clone())
                    .chain(c.iter().cloned())
                    .collect(),
                message: format!(
                    "events on {} are consumed but nothing here publishes them",
                    qk.1
                ),
                hint: "add the publisher's `publishes` entry, or remove the consumer",
            }),
            (Some(p), None) => out.push(Finding {
                rule: "WEIR007",
                name: "published-never-consumed",
                severity: Severity::Warning,
                objects: std::iter::once(qref.clone())
                    .chain(p.iter().cloned())
                    .collect(),
                message: format!(
                    "events on {} are published but nothing here consumes them",
                    qk.1
                ),
                hint: "add a consumer, or stop publishing",
            }),
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::manifest::{Schemas, load};

    fn lint_yaml(yaml: &str) -> Vec<Finding> {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("m.yaml");
        std::fs::write(&f, yaml).unwrap();
        let (loaded, _) = load(&[f], &Schemas::new()).unwrap();
        lint(&loaded, &LintConfig::default())
    }

    fn ms(name: &str, extra: &str) -> String {
        format!(
            "---\napiVersion: weir.dev/v1alpha1\nkind: Microservice\nmetadata: {{name: {name}}}\nspec:\n  image: {name}:1\n{extra}"
        )
    }

    fn dep(target: &str) -> String {
        format!("  - name: {target}\n    microservice: {target}\n    circuitBreaker: {{}}\n")
    }

    fn rules(f: &[Finding]) -> Vec<&str> {
        f.iter().map(|f| f.rule).collect()
    }

    #[test]
    fn open_authorization_is_a_warning_and_graph_or_audit_are_not() {
        let f = lint_yaml(&format!(
            "{}{}{}",
            ms("a", "  inbound: {authorization: open}\n"),
            ms("b", "  inbound: {authorization: audit}\n"),
            ms("c", "  inbound: {allowFrom: [ops/*]}\n"),
        ));
        let open: Vec<_> = f.iter().filter(|f| f.rule == "WEIR011").collect();
        assert_eq!(open.len(), 1, "{f:?}");
        assert_eq!(open[0].objects, ["Microservice/a"]);
        assert_eq!(open[0].severity, Severity::Warning);
    }

    #[test]
    fn a_utilization_target_without_its_request_is_a_warning() {
        let f = lint_yaml(&format!(
            "{}{}",
            ms(
                "a",
                "  autoscaling: {maxReplicas: 3, targetCPUUtilizationPercentage: 50, targetMemoryUtilizationPercentage: 50}\n  resources: {requests: {memory: 64Mi}}\n"
            ),
            ms(
                "b",
                "  autoscaling: {maxReplicas: 3, targetCPUUtilizationPercentage: 50}\n  resources: {requests: {cpu: 100m}}\n"
            ),
        ));
        let found: Vec<_> = f.iter().filter(|f| f.rule == "WEIR012").collect();
        assert_eq!(found.len(), 1, "{f:?}");
        assert_eq!(found[0].objects, ["Microservice/a"]);
        assert!(
            found[0].message.contains("requests.cpu"),
            "{}",
            found[0].message
        );
    }

    #[test]
    fn the_hello_example_is_clean_of_errors() {
        let files = crate::manifest::expand_paths(&[std::path::PathBuf::from(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../examples/hello"
        ))])
        .unwrap();
        let (loaded, _) = load(&files, &Schemas::new()).unwrap();
        assert!(!has_errors(&lint(&loaded, &LintConfig::default())));
    }

    #[test]
    fn shared_database_url_is_an_error() {
        let f = lint_yaml(&format!(
            "{}{}",
            ms(
                "a",
                "  env:\n  - {name: DATABASE_URL, value: 'postgres://a:x@db:5432/shop'}\n"
            ),
            ms(
                "b",
                "  env:\n  - {name: DB_URL, value: 'postgres://b:y@db:5432/shop'}\n"
            )
        ));
        assert_eq!(rules(&f), ["WEIR001"]);
        assert_eq!(f[0].objects, ["Microservice/a", "Microservice/b"]);
    }

    #[test]
    fn shared_secret_and_host_name_pair_are_errors() {
        let secret = "  env:\n  - name: DB_PASSWORD\n    valueFrom: {secretKeyRef: {name: shop-db, key: password}}\n";
        let host = "  - {name: DB_HOST, value: pg.internal}\n  - {name: DB_NAME, value: shop}\n";
        let f = lint_yaml(&format!(
            "{}{}",
            ms("a", &format!("{secret}{host}")),
            ms("b", &format!("{secret}{host}"))
        ));
        assert_eq!(rules(&f), ["WEIR001", "WEIR001"]);
    }

    #[test]
    fn different_databases_are_fine() {
        let f = lint_yaml(&format!(
            "{}{}",
            ms(
                "a",
                "  env:\n  - {name: DATABASE_URL, value: 'postgres://db/a'}\n"
            ),
            ms(
                "b",
                "  env:\n  - {name: DATABASE_URL, value: 'postgres://db/b'}\n"
            )
        ));
        assert!(f.is_empty(), "{f:?}");
    }

    #[test]
    fn a_cycle_is_an_error_reported_once() {
        let f = lint_yaml(&format!(
            "{}{}",
            ms("a", &format!("  dependencies:\n{}", dep("b"))),
            ms("b", &format!("  dependencies:\n{}", dep("a")))
        ));
        assert_eq!(rules(&f), ["WEIR002"]);
        assert!(f[0].message.contains("a → b → a"), "{}", f[0].message);
    }

    #[test]
    fn a_deep_chain_is_a_warning() {
        let f = lint_yaml(&format!(
            "{}{}{}{}",
            ms("orders", &format!("  dependencies:\n{}", dep("users"))),
            ms("users", &format!("  dependencies:\n{}", dep("auth"))),
            ms("auth", &format!("  dependencies:\n{}", dep("roles"))),
            ms("roles", "")
        ));
        assert_eq!(rules(&f), ["WEIR003"]);
        assert!(
            f[0].message.contains("orders → users → auth → roles"),
            "{}",
            f[0].message
        );
    }

    #[test]
    fn grpc_dependencies_get_a_readable_fallback_and_grpc_settings_need_grpc() {
        let yaml = [
            ms("inventory", "  protocol: grpc\n"),
            ms("users", ""),
            ms(
                "storefront",
                "  dependencies:\n  - name: inventory\n    microservice: inventory\n    circuitBreaker: {}\n    fallback: {status: 200, body: '{}'}\n  - name: users\n    microservice: users\n    circuitBreaker: {}\n    grpc: {retryOn: [UNAVAILABLE]}\n  - name: geo\n    url: https://geo.example.com\n    protocol: grpc\n    circuitBreaker: {}\n    fallback: {grpcStatus: UNAVAILABLE, grpcMessage: resting}\n",
            ),
        ]
        .concat();
        let f = lint_yaml(&yaml);
        let grpc: Vec<_> = f.iter().filter(|f| f.rule >= "WEIR009").collect();
        assert_eq!(grpc.len(), 2, "{f:#?}");
        assert_eq!(grpc[0].rule, "WEIR009");
        assert!(
            grpc[0].message.contains("\"inventory\""),
            "{}",
            grpc[0].message
        );
        assert_eq!(grpc[1].rule, "WEIR010");
        assert!(grpc[1].message.contains("\"users\"") && grpc[1].message.contains("speaks http"));
        // geo (a gRPC url with a gRPC fallback) is fine, and so is the gRPC example.
        let files = crate::manifest::expand_paths(&[std::path::PathBuf::from(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../examples/grpc"
        ))])
        .unwrap();
        let (loaded, _) = load(&files, &Schemas::new()).unwrap();
        let example = lint(&loaded, &LintConfig::default());
        assert!(example.is_empty(), "{example:#?}");
    }

    #[test]
    fn a_dependency_without_breaker_is_a_warning() {
        let f = lint_yaml(&format!(
            "{}{}",
            ms("a", "  dependencies:\n  - {name: b, microservice: b}\n"),
            ms("b", "")
        ));
        assert_eq!(rules(&f), ["WEIR004"]);
    }

    #[test]
    fn event_rules() {
        let queue = |name: &str, dlq: bool| {
            format!(
                "---\napiVersion: weir.dev/v1alpha1\nkind: Queue\nmetadata: {{name: {name}}}\nspec:\n  broker: nats\n  deadLetter: {{enabled: {dlq}}}\n"
            )
        };
        let consumes: String = (0..6)
            .map(|i| format!("  - {{queue: q{i}, path: /e}}\n"))
            .collect();
        let mut yaml = ms(
            "a",
            &format!("  publishes:\n  - {{queue: lonely}}\n  consumes:\n{consumes}"),
        );
        yaml.push_str(&queue("lonely", true));
        yaml.push_str(&queue("q0", false));
        for i in 1..6 {
            yaml.push_str(&queue(&format!("q{i}"), true));
        }
        let f = lint_yaml(&yaml);
        let r = rules(&f);
        assert!(r.contains(&"WEIR005"), "{r:?}");
        assert!(r.contains(&"WEIR006"), "{r:?}");
        assert!(r.contains(&"WEIR007"), "{r:?}");
        assert!(r.contains(&"WEIR008"), "{r:?}");
    }
}
