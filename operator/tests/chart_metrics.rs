//! The chart's Grafana dashboards and alerting rules name only metrics that Weir exports.
//!
//! Every metric name in the PromQL of `charts/weir/dashboards/*.json` (panel queries and template
//! variables) and of `charts/weir/rules/weir-alerts.yaml` is looked up in what Weir's binaries
//! serve on `/metrics`:
//!
//! - a real `weir-proxy`, run with the config the operator renders for a Microservice whose
//!   dependency has a retry, a circuit breaker, a bulkhead and a fallback, balanced over two
//!   endpoints;
//! - prometheus-client writes a family (its `# TYPE` line) only once it has a label set, and some
//!   are made at their first use: a queue's counters when a sidecar publishes or consumes, a
//!   dead-letter reason at its first dead letter, a gRPC method at its first call. For those the
//!   sidecar's registry (`weir_proxy::metrics::Metrics`, what `/metrics` encodes) is made in
//!   the test and each is used once through the API the sidecar uses;
//! - the saga coordinator's and the operator's registries (`SagaMetrics`, `Metrics`), each family
//!   used once, encoded as their `/metrics` endpoints encode them.
//!
//! A family is known from its `# TYPE` line: a counter is exposed as `<name>_total`, a histogram
//! as `<name>_bucket`, `_sum` and `_count`. Names of other exporters (kube-state-metrics) must be
//! listed in [`EXTERNAL`].
//!
//! Needs the `weir-proxy` binary beside `weir` (`cargo build --workspace --bins`, as
//! scripts/test.sh does first).

use serde_json::Value;
use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use weir::render::proxy_config::{self, Placement};
use weir_crds::proxy::EndpointsConfig;
use weir_testkit::{Proxy, free_addr};

/// Metrics the chart reads from exporters other than Weir's binaries, and why.
const EXTERNAL: &[(&str, &str)] = &[
    (
        "kube_pod_container_status_ready",
        "kube-state-metrics: WeirSidecarNotReady, weir-proxy as a plain container",
    ),
    (
        "kube_pod_init_container_status_ready",
        "kube-state-metrics: WeirSidecarNotReady, weir-proxy as a native sidecar",
    ),
];

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// Where each metric is referenced: name → places ("weir-sagas.json: Step p99").
type References = BTreeMap<String, BTreeSet<String>>;

/// The metric names of the chart's dashboards and rules.
fn referenced() -> References {
    let mut refs = References::new();
    let mut add = |expr: &str, place: String| {
        for name in metric_names(expr) {
            refs.entry(name).or_default().insert(place.clone());
        }
    };
    let dir = root().join("charts/weir/dashboards");
    let mut files: Vec<_> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|x| x == "json"))
        .collect();
    files.sort();
    assert!(
        files.len() >= 3,
        "dashboards in {}: {files:?}",
        dir.display()
    );
    for file in files {
        let name = file.file_name().unwrap().to_string_lossy().into_owned();
        let d: Value = serde_json::from_str(&std::fs::read_to_string(&file).unwrap())
            .unwrap_or_else(|e| panic!("{name}: {e}"));
        let mut exprs = 0;
        let mut panels: Vec<&Value> = d["panels"].as_array().unwrap().iter().collect();
        while let Some(p) = panels.pop() {
            if let Some(inner) = p["panels"].as_array() {
                panels.extend(inner);
            }
            for t in p["targets"].as_array().into_iter().flatten() {
                let expr = t["expr"].as_str().unwrap_or_else(|| panic!("{name}: {t}"));
                add(
                    expr,
                    format!("{name}: {}", p["title"].as_str().unwrap_or("")),
                );
                exprs += 1;
            }
        }
        for v in d["templating"]["list"].as_array().into_iter().flatten() {
            if v["type"] == "query" {
                let q = v["query"]["query"]
                    .as_str()
                    .or(v["query"].as_str())
                    .unwrap();
                add(
                    &variable_query(q),
                    format!("{name}: variable {}", v["name"]),
                );
            }
        }
        assert!(exprs > 0, "{name}: no panel queries found");
    }
    let path = root().join("charts/weir/rules/weir-alerts.yaml");
    let rules: serde_yaml::Value =
        serde_yaml::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    for group in rules["groups"].as_sequence().unwrap() {
        for rule in group["rules"].as_sequence().unwrap() {
            let name = rule["alert"].as_str().or(rule["record"].as_str()).unwrap();
            add(
                rule["expr"].as_str().unwrap(),
                format!("weir-alerts.yaml: {name}"),
            );
        }
    }
    refs
}

/// The PromQL of a Grafana template variable's query: `label_values(<selector>, <label>)` reads
/// the selector's series, `label_values(<label>)` none; anything else is a query.
fn variable_query(q: &str) -> String {
    let q = q.trim();
    match q
        .strip_prefix("label_values(")
        .and_then(|r| r.strip_suffix(')'))
    {
        Some(args) => match args.rfind(',') {
            Some(i) => args[..i].to_string(),
            None => String::new(),
        },
        None => q.strip_prefix("query_result(").map_or(q, |r| r).to_string(),
    }
}

/// PromQL's aggregation operators and keywords: words that are not metric names.
const KEYWORDS: &[&str] = &[
    "sum",
    "min",
    "max",
    "avg",
    "group",
    "stddev",
    "stdvar",
    "count",
    "count_values",
    "bottomk",
    "topk",
    "quantile",
    "limitk",
    "limit_ratio",
    "by",
    "without",
    "on",
    "ignoring",
    "group_left",
    "group_right",
    "bool",
    "and",
    "or",
    "unless",
    "offset",
    "atan2",
    "inf",
    "nan",
    "start",
    "end",
];

/// The metric names in a PromQL expression: identifiers that are not functions (followed by
/// `(`), keywords or aggregation operators, outside of strings, label matchers (`{...}`), ranges
/// (`[...]`), the label lists of `by`, `without`, `on`, `ignoring` and `group_*`, Grafana
/// variables (`$name`, `${name}`) and numbers.
fn metric_names(expr: &str) -> BTreeSet<String> {
    let c: Vec<char> = expr.chars().collect();
    let mut names = BTreeSet::new();
    let mut i = 0;
    // Skips from an opening bracket to its closing one, strings inside included.
    let skip_to = |mut i: usize, close: char| -> usize {
        while i < c.len() && c[i] != close {
            if matches!(c[i], '"' | '\'' | '`') {
                let q = c[i];
                i += 1;
                while i < c.len() && c[i] != q {
                    i += if c[i] == '\\' { 2 } else { 1 };
                }
            }
            i += 1;
        }
        i + 1
    };
    let ident = |ch: char| ch.is_ascii_alphanumeric() || ch == '_' || ch == ':';
    while i < c.len() {
        match c[i] {
            '"' | '\'' | '`' => i = skip_to(i + 1, c[i]),
            '{' => i = skip_to(i + 1, '}'),
            '[' => i = skip_to(i + 1, ']'),
            '#' => i = skip_to(i + 1, '\n'),
            '$' => {
                i += 1;
                if c.get(i) == Some(&'{') {
                    i = skip_to(i + 1, '}');
                } else {
                    while i < c.len() && ident(c[i]) {
                        i += 1;
                    }
                }
            }
            ch if ch.is_ascii_digit() || ch == '.' => {
                while i < c.len() && (ident(c[i]) || c[i] == '.') {
                    i += 1;
                }
            }
            ch if ch.is_ascii_alphabetic() || ch == '_' || ch == ':' => {
                let start = i;
                while i < c.len() && ident(c[i]) {
                    i += 1;
                }
                let word: String = c[start..i].iter().collect();
                let mut j = i;
                while j < c.len() && c[j].is_whitespace() {
                    j += 1;
                }
                let called = c.get(j) == Some(&'(');
                let lower = word.to_ascii_lowercase();
                if matches!(
                    lower.as_str(),
                    "by" | "without" | "on" | "ignoring" | "group_left" | "group_right"
                ) {
                    if called {
                        i = skip_to(j + 1, ')');
                    }
                } else if !called && !KEYWORDS.contains(&lower.as_str()) {
                    names.insert(word);
                }
            }
            _ => i += 1,
        }
    }
    names
}

/// The series names an exposition holds: from each `# TYPE` line (a family known before its
/// first sample) and from the samples themselves.
fn exposed(text: &str) -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    for line in text.lines() {
        if let Some(rest) = line.strip_prefix("# TYPE ") {
            let mut parts = rest.split_whitespace();
            let (Some(name), Some(kind)) = (parts.next(), parts.next()) else {
                continue;
            };
            let suffixes: &[&str] = match kind {
                "counter" => &["_total"],
                "histogram" => &["_bucket", "_sum", "_count"],
                "summary" => &["", "_sum", "_count"],
                "info" => &["_info"],
                _ => &[""],
            };
            names.extend(suffixes.iter().map(|s| format!("{name}{s}")));
        } else if !line.starts_with('#') && !line.is_empty() {
            let end = line.find(['{', ' ']).unwrap_or(line.len());
            names.insert(line[..end].to_string());
        }
    }
    names
}

/// Loopback ports for the rendered config.
struct Loopback {
    inbound: SocketAddr,
    admin: SocketAddr,
    outbound: Vec<SocketAddr>,
}

impl Placement for Loopback {
    fn inbound(&self) -> SocketAddr {
        self.inbound
    }
    fn admin(&self) -> SocketAddr {
        self.admin
    }
    fn app(&self, port: u16) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], port))
    }
    fn outbound(&self, index: usize) -> SocketAddr {
        self.outbound[index]
    }
    fn microservice_url(&self, _namespace: &str, name: &str) -> String {
        panic!("no Microservice dependency here ({name})")
    }
}

/// What a `weir-proxy` serves on `/metrics`, run with the config the operator renders for a
/// Microservice with every policy of a dependency.
async fn proxy_metrics() -> String {
    let bin = Path::new(env!("CARGO_BIN_EXE_weir")).with_file_name("weir-proxy");
    assert!(
        bin.is_file(),
        "{} not built: run `cargo build --workspace --bins` first",
        bin.display()
    );
    let spec: weir_crds::microservice::MicroserviceSpec = serde_yaml::from_str(
        r#"
image: orders:1
port: 8080
dependencies:
  - name: users
    url: http://127.0.0.1:9
    timeout: 2s
    retry: {attempts: 3, backoff: {base: 50ms, max: 1s}}
    circuitBreaker: {errorThresholdPercentage: 50, volumeThreshold: 20, resetTimeout: 10s}
    bulkhead: {maxConcurrent: 32, maxQueue: 16}
    fallback: {status: 200, body: '{"name": "Unknown"}'}
inbound: {timeout: 30s, maxConcurrent: 100, rateLimit: {requestsPerSecond: 200}}
"#,
    )
    .expect("the Microservice spec");
    let placement = Loopback {
        inbound: free_addr(),
        admin: free_addr(),
        outbound: vec![free_addr()],
    };
    let mut config = proxy_config::build("orders", "shop", &spec, &placement).expect("rendered");
    config.inbound.app = free_addr();
    config.outbound[0].endpoints = Some(EndpointsConfig {
        dns: None,
        addresses: vec![free_addr(), free_addr()],
        refresh_ms: 5_000,
    });
    let dep = &config.outbound[0];
    assert!(
        dep.retry.is_some()
            && dep.circuit_breaker.is_some()
            && dep.bulkhead.is_some()
            && dep.fallback.is_some(),
        "{dep:?}"
    );
    let proxy = Proxy::spawn(&bin, config, &[], &[]);
    proxy.wait_ready().await;
    proxy.metrics().await
}

/// The sidecar's families whose label sets are made at their first use, each used once.
fn proxy_families_made_on_use() -> String {
    let m = weir_proxy::metrics::Metrics::new();
    let q = m.bridge.queue("orders-created");
    q.dead_lettered("rejected").inc();
    m.grpc_metrics("inbound", "")
        .record("/shop.Orders/Place", 0, 0.01);
    m.config_reload(true);
    m.connection("inbound", "http2");
    m.encode()
}

/// The saga coordinator's registry, each family used once.
fn saga_metrics() -> String {
    use weir_saga::metrics::{SagaLabel, SagaMetrics, StepLabel};
    let m = SagaMetrics::default();
    let saga = SagaLabel {
        saga: "place-order".into(),
    };
    for family in [
        &m.started,
        &m.completed,
        &m.compensated,
        &m.failed,
        &m.compensation_failed,
        &m.cancelled,
        &m.resumed,
    ] {
        family.get_or_create(&saga).inc();
    }
    m.step_duration
        .get_or_create(&StepLabel {
            saga: "place-order".into(),
            step: "charge".into(),
            kind: "action".into(),
            outcome: "ok".into(),
        })
        .observe(0.01);
    m.encode()
}

/// The operator's registry, each family used once.
async fn operator_metrics() -> String {
    let m = weir::operator::metrics::Metrics::default();
    m.reconcile("Microservice", async {}).await;
    m.failed("Microservice", "DependencyNotFound");
    m.leader.set(1);
    m.encode()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dashboards_and_alerts_name_only_exported_metrics() {
    let refs = referenced();
    assert!(refs.len() >= 20, "few metric names found: {refs:?}");

    let proxy = proxy_metrics().await;
    let on_use = proxy_families_made_on_use();
    let saga = saga_metrics();
    let operator = operator_metrics().await;
    let mut known = BTreeSet::new();
    for (binary, text) in [
        ("weir-proxy", &proxy),
        ("weir-proxy's registry", &on_use),
        ("saga coordinator", &saga),
        ("operator", &operator),
    ] {
        let names = exposed(text);
        assert!(names.len() > 3, "{binary} exposes nothing:\n{text}");
        known.extend(names);
    }
    let external: BTreeSet<&str> = EXTERNAL.iter().map(|(n, _)| *n).collect();

    let mut missing = Vec::new();
    for (name, places) in &refs {
        if !known.contains(name) && !external.contains(name.as_str()) {
            let places: Vec<_> = places.iter().map(String::as_str).collect();
            missing.push(format!("{name} (in {})", places.join("; ")));
        }
    }
    assert!(
        missing.is_empty(),
        "metrics referenced by the chart's dashboards or rules that no Weir binary exports and \
         EXTERNAL does not list:\n  {}\n(weir-proxy, the saga coordinator and the operator \
         export: {})",
        missing.join("\n  "),
        known.iter().cloned().collect::<Vec<_>>().join(" ")
    );
    for name in &external {
        assert!(
            !known.contains(*name),
            "{name} is exported by Weir: remove it from EXTERNAL"
        );
        assert!(
            refs.contains_key(*name),
            "{name} is listed in EXTERNAL but referenced nowhere"
        );
    }
    let weir_names = refs.keys().filter(|n| known.contains(*n)).count();
    eprintln!(
        "{} metric names referenced: {weir_names} exported by Weir's binaries, {} external",
        refs.len(),
        external.len()
    );
}

#[test]
fn metric_names_are_told_from_functions_labels_and_variables() {
    let got = metric_names(
        r#"histogram_quantile(0.99, sum by (microservice, le) (rate(weir_request_duration_seconds_bucket{namespace="$namespace", direction=~"in{b}ound"}[$__rate_interval])))
          / on (namespace) group_left (saga) max without (pod) (weir_saga_instances_started_total offset 10m)
          or ignoring(pod) kube_pod_container_status_ready{container="weir-proxy"} > bool 0.5e3
          unless ${x} and sum(count_values("v", up)) > 1"#,
    );
    let want: BTreeSet<String> = [
        "weir_request_duration_seconds_bucket",
        "weir_saga_instances_started_total",
        "kube_pod_container_status_ready",
        "up",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    assert_eq!(got, want);
    assert_eq!(
        variable_query(
            r#"label_values(weir_requests_total{namespace="$namespace"}, microservice)"#
        ),
        r#"weir_requests_total{namespace="$namespace"}"#
    );
    assert_eq!(variable_query("label_values(namespace)"), "");
}

#[test]
fn exposition_families_give_their_series_names() {
    let text = "# HELP weir_requests Requests.\n# TYPE weir_requests counter\n\
                # HELP weir_d Time.\n# TYPE weir_d histogram\n\
                # TYPE weir_g gauge\nweir_g 1\n# EOF\n";
    let got: Vec<String> = exposed(text).into_iter().collect();
    assert_eq!(
        got,
        [
            "weir_d_bucket",
            "weir_d_count",
            "weir_d_sum",
            "weir_g",
            "weir_requests_total"
        ]
    );
}
