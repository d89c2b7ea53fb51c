//! Semantic checks that mirror the CRD's CEL rules, for places with no apiserver to run them:
//! `weir render`, `weir up`, and clusters older than 1.25 that ignore `x-kubernetes-validations`.
//! The operator reports what these find as a status condition and an Event.

use crate::broker::{BrokerKind, BrokerSpec};
use crate::duration;
use crate::microservice::{EdgeSpec, MicroserviceSpec};
use crate::queue::QueueSpec;
use crate::saga::SagaSpec;
use std::collections::BTreeSet;

/// One invalid field, named by its path from the object root (`spec.dependencies[0].timeout`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FieldError {
    /// Path of the field from the object root.
    pub field: String,
    /// What is wrong with it.
    pub message: String,
}

impl std::fmt::Display for FieldError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {}", self.field, self.message)
    }
}

fn push(errs: &mut Vec<FieldError>, field: String, message: impl Into<String>) {
    errs.push(FieldError {
        field,
        message: message.into(),
    });
}

fn check_duration(
    errs: &mut Vec<FieldError>,
    field: String,
    value: &str,
) -> Option<std::time::Duration> {
    match duration::parse(value) {
        Ok(d) => Some(d),
        Err(e) => {
            push(errs, field, e.to_string());
            None
        }
    }
}

/// A duration greater than zero at `at(field)`; the message names `field` as the CRD's rule
/// does.
fn check_positive_duration(
    errs: &mut Vec<FieldError>,
    at: &dyn Fn(&str) -> String,
    field: &str,
    value: &str,
) -> Option<std::time::Duration> {
    let d = check_duration(errs, at(field), value)?;
    if d.is_zero() {
        push(errs, at(field), format!("{field} must be greater than 0"));
    }
    Some(d)
}

/// The pattern of a DNS label, as the Microservice CRD states it for `metadata.name`.
pub(crate) const DNS_LABEL_PATTERN: &str = "^[a-z]([-a-z0-9]*[a-z0-9])?$";

/// A DNS label as Kubernetes names Services: the rule Microservice names must follow.
pub(crate) fn is_dns_label(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 63
        && s.starts_with(|c: char| c.is_ascii_lowercase())
        && s.ends_with(|c: char| c.is_ascii_lowercase() || c.is_ascii_digit())
        && s.chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-')
}

/// What a Microservice's name must be, as the CRD's description of `metadata.name` says it.
pub(crate) const MICROSERVICE_NAME_RULE: &str = "A DNS label of at most 48 characters (it names the Service, and with -weir-endpoints the headless Service of its pods): lowercase letters, digits and '-'.";

/// Every invalid field of Microservice `name`; empty when it is valid.
pub fn microservice(name: &str, spec: &MicroserviceSpec) -> Vec<FieldError> {
    let mut errs = Vec::new();
    if !is_dns_label(name) || name.len() > crate::microservice::MAX_NAME_LEN {
        push(
            &mut errs,
            "metadata.name".into(),
            "must be a DNS label of at most 48 characters (it names the Service, and with -weir-endpoints the headless Service of its pods): lowercase letters, digits and '-'",
        );
    }
    if !(1..=65535).contains(&spec.port) {
        push(&mut errs, "spec.port".into(), "must be between 1 and 65535");
    } else if spec.port == 15001 || spec.port == 15090 || (15100..=15199).contains(&spec.port) {
        push(
            &mut errs,
            "spec.port".into(),
            "port collides with a weir-proxy port (15001, 15090, 15100-15199)",
        );
    }
    if spec.replicas < 0 {
        push(&mut errs, "spec.replicas".into(), "must be >= 0");
    }
    for (which, p) in [
        ("liveness", &spec.probes.liveness),
        ("readiness", &spec.probes.readiness),
    ] {
        if p.path.as_deref().is_some_and(|p| !p.starts_with('/')) {
            push(
                &mut errs,
                format!("spec.probes.{which}.path"),
                "must start with /",
            );
        }
        if p.path.is_some() && p.grpc.is_some() {
            push(
                &mut errs,
                format!("spec.probes.{which}"),
                "set path (an HTTP probe) or grpc (a gRPC health check), not both",
            );
        }
    }
    let grpc_probe = spec.probes.liveness.grpc.is_some() || spec.probes.readiness.grpc.is_some();
    if grpc_probe && spec.protocol == crate::microservice::AppProtocol::Http {
        push(
            &mut errs,
            "spec.probes".into(),
            "a gRPC probe needs an app that speaks HTTP/2: set spec.protocol to grpc",
        );
    }
    let mut names = BTreeSet::new();
    if spec.dependencies.len() > 100 {
        push(
            &mut errs,
            "spec.dependencies".into(),
            "at most 100 dependencies (one local port each)",
        );
    }
    for (i, d) in spec.dependencies.iter().enumerate() {
        let at = |f: &str| format!("spec.dependencies[{i}].{f}");
        if !names.insert(d.name.as_str()) {
            // The item, as the apiserver names a duplicate key of a list-map.
            push(
                &mut errs,
                format!("spec.dependencies[{i}]"),
                format!("duplicate dependency name {:?}", d.name),
            );
        }
        if !is_dns_label(&d.name) || d.name.len() > 40 {
            push(
                &mut errs,
                at("name"),
                "must be lowercase letters, digits and '-', at most 40",
            );
        }
        match (&d.microservice, &d.url) {
            (Some(_), Some(_)) | (None, None) => push(
                &mut errs,
                format!("spec.dependencies[{i}]"),
                "set exactly one of microservice or url",
            ),
            (None, Some(u)) if !(u.starts_with("http://") || u.starts_with("https://")) => {
                push(&mut errs, at("url"), "must start with http:// or https://")
            }
            _ => {}
        }
        if d.protocol.is_some() && d.url.is_none() {
            push(
                &mut errs,
                at("protocol"),
                "protocol is for url dependencies; a Microservice dependency speaks what its own spec.protocol says",
            );
        }
        check_duration(&mut errs, at("timeout"), &d.timeout);
        check_duration(&mut errs, at("streamIdleTimeout"), &d.stream_idle_timeout);
        if let Some(r) = &d.retry {
            let base = check_duration(&mut errs, at("retry.backoff.base"), &r.backoff.base);
            let max = check_duration(&mut errs, at("retry.backoff.max"), &r.backoff.max);
            if let (Some(b), Some(m)) = (base, max)
                && m < b
            {
                push(
                    &mut errs,
                    at("retry.backoff.max"),
                    "must be at least retry.backoff.base",
                );
            }
            check_duration(&mut errs, at("retry.budget.ttl"), &r.budget.ttl);
            if !(1..=10).contains(&r.attempts) {
                push(&mut errs, at("retry.attempts"), "must be between 1 and 10");
            }
        }
        if let Some(b) = &d.circuit_breaker {
            if !(1..=100).contains(&b.error_threshold_percentage) {
                push(
                    &mut errs,
                    at("circuitBreaker.errorThresholdPercentage"),
                    "must be between 1 and 100",
                );
            }
            if !(1..=100).contains(&b.buckets) {
                push(
                    &mut errs,
                    at("circuitBreaker.buckets"),
                    "must be between 1 and 100",
                );
            }
            if let Some(w) = check_duration(
                &mut errs,
                at("circuitBreaker.rollingWindow"),
                &b.rolling_window,
            ) && (w.as_millis() as u64) < u64::from(b.buckets)
            {
                push(
                    &mut errs,
                    at("circuitBreaker.rollingWindow"),
                    "must be at least 1ms per bucket",
                );
            }
            check_duration(
                &mut errs,
                at("circuitBreaker.resetTimeout"),
                &b.reset_timeout,
            );
        }
        if let Some(lb) = &d.load_balancer {
            check_positive_duration(&mut errs, &at, "loadBalancer.decay", &lb.decay);
            check_duration(&mut errs, at("loadBalancer.slowStart"), &lb.slow_start);
        }
        if let Some(od) = &d.outlier_detection {
            if !(1..=1000).contains(&od.consecutive_failures) {
                push(
                    &mut errs,
                    at("outlierDetection.consecutiveFailures"),
                    "must be between 1 and 1000",
                );
            }
            if od.max_ejection_percent > 100 {
                push(
                    &mut errs,
                    at("outlierDetection.maxEjectionPercent"),
                    "must be between 0 and 100",
                );
            }
            let base = check_positive_duration(
                &mut errs,
                &at,
                "outlierDetection.baseEjectionTime",
                &od.base_ejection_time,
            );
            let max = check_duration(
                &mut errs,
                at("outlierDetection.maxEjectionTime"),
                &od.max_ejection_time,
            );
            if let (Some(b), Some(m)) = (base, max)
                && m < b
            {
                push(
                    &mut errs,
                    at("outlierDetection.maxEjectionTime"),
                    "outlierDetection.maxEjectionTime must be at least outlierDetection.baseEjectionTime",
                );
            }
        }
        if let Some(f) = &d.fallback
            && !(200..=599).contains(&f.status)
        {
            push(
                &mut errs,
                at("fallback.status"),
                "must be between 200 and 599",
            );
        }
    }
    check_duration(
        &mut errs,
        "spec.inbound.timeout".into(),
        &spec.inbound.timeout,
    );
    check_duration(
        &mut errs,
        "spec.inbound.streamIdleTimeout".into(),
        &spec.inbound.stream_idle_timeout,
    );
    if spec.inbound.max_queue.unwrap_or(0) > 0 && spec.inbound.max_concurrent.is_none() {
        push(
            &mut errs,
            "spec.inbound.maxQueue".into(),
            "maxQueue needs maxConcurrent",
        );
    }
    for (i, a) in spec.inbound.allow_from.iter().enumerate() {
        if !crate::proxy::is_allow_entry(a) {
            push(
                &mut errs,
                format!("spec.inbound.allowFrom[{i}]"),
                format!(
                    "{a:?} must be <namespace>/<name>, <namespace>/saga/<name> or <namespace>/*"
                ),
            );
        }
    }
    if let Some(t) = &spec.tracing
        && !(0.0..=1.0).contains(&t.sampling_ratio)
    {
        push(
            &mut errs,
            "spec.tracing.samplingRatio".into(),
            "must be between 0 and 1",
        );
    }
    if spec.image.is_empty() && spec.edge.as_ref().is_none_or(|e| e.routes.is_empty()) {
        push(
            &mut errs,
            "spec.image".into(),
            "image is required unless the Microservice is an edge with routes (a gateway without an app)",
        );
    }
    if let Some(e) = &spec.edge {
        edge(&mut errs, e, spec);
    }
    once_each(
        &mut errs,
        "spec.consumes",
        spec.consumes.iter().map(|c| c.queue.as_str()),
    );
    once_each(
        &mut errs,
        "spec.publishes",
        spec.publishes.iter().map(|p| p.queue.as_str()),
    );
    if let Some(a) = &spec.autoscaling {
        autoscaling(&mut errs, a, spec);
    }
    errs
}

/// `spec.autoscaling`: the rules its CEL states (ranges and patterns are the schema's).
fn autoscaling(
    errs: &mut Vec<FieldError>,
    a: &crate::microservice::AutoscalingSpec,
    spec: &MicroserviceSpec,
) {
    if a.min_replicas > a.max_replicas {
        push(
            errs,
            "spec.autoscaling.minReplicas".into(),
            "minReplicas must be at most maxReplicas",
        );
    }
    if a.target_cpu_utilization_percentage.is_none()
        && a.target_memory_utilization_percentage.is_none()
        && a.queue_lag.is_empty()
    {
        push(
            errs,
            "spec.autoscaling".into(),
            "set a target: targetCPUUtilizationPercentage, targetMemoryUtilizationPercentage or queueLag",
        );
    }
    if a.min_replicas == 0 && a.queue_lag.is_empty() {
        push(
            errs,
            "spec.autoscaling.minReplicas".into(),
            "minReplicas 0 needs a queueLag target: CPU and memory cannot wake a Microservice with no pods",
        );
    }
    if a.queue_lag
        .iter()
        .any(|q| !spec.consumes.iter().any(|c| c.queue == q.queue))
    {
        push(
            errs,
            "spec.autoscaling.queueLag".into(),
            "autoscaling.queueLag names a queue this Microservice does not consume (spec.consumes)",
        );
    }
    once_each(
        errs,
        "spec.autoscaling.queueLag",
        a.queue_lag.iter().map(|q| q.queue.as_str()),
    );
}

/// Each queue named once in the list at `field`.
fn once_each<Q: Ord + std::fmt::Debug>(
    errs: &mut Vec<FieldError>,
    field: &str,
    queues: impl IntoIterator<Item = Q>,
) {
    let mut seen = BTreeSet::new();
    for (i, q) in queues.into_iter().enumerate() {
        if seen.contains(&q) {
            push(
                errs,
                format!("{field}[{i}]"),
                format!("duplicate queue {q:?}"),
            );
        } else {
            seen.insert(q);
        }
    }
}

/// A path prefix as the schema's pattern allows it: `/` or `/a/b`, no empty segment, no query.
pub(crate) fn is_path_prefix(p: &str) -> bool {
    p == "/"
        || (p.starts_with('/')
            && p[1..].split('/').all(|seg| {
                !seg.is_empty() && !seg.contains(['?', '#']) && !seg.contains(char::is_whitespace)
            }))
}

fn edge(errs: &mut Vec<FieldError>, e: &EdgeSpec, spec: &MicroserviceSpec) {
    let j = &e.jwt;
    let sources = [
        j.jwks.is_some(),
        j.jwks_secret_ref.is_some(),
        j.jwks_uri.is_some(),
        j.hmac_secret_ref.is_some(),
    ];
    if sources.iter().filter(|s| **s).count() != 1 {
        push(
            errs,
            "spec.edge.jwt".into(),
            "set exactly one of jwks, jwksSecretRef, jwksUri or hmacSecretRef",
        );
    }
    if j.issuer.is_empty() {
        push(errs, "spec.edge.jwt.issuer".into(), "must not be empty");
    }
    if j.audiences.is_empty() || j.audiences.iter().any(String::is_empty) {
        push(
            errs,
            "spec.edge.jwt.audiences".into(),
            "needs at least one non-empty audience",
        );
    }
    if let Some(doc) = &j.jwks {
        let keys = serde_json::from_str::<serde_json::Value>(doc)
            .ok()
            .and_then(|v| v.get("keys").and_then(|k| k.as_array()).map(Vec::len));
        if keys.is_none_or(|n| n == 0) {
            push(
                errs,
                "spec.edge.jwt.jwks".into(),
                "must be a JWKS document: a JSON object with a non-empty keys array",
            );
        }
    }
    if let Some(u) = &j.jwks_uri
        && !(u.starts_with("http://") || u.starts_with("https://"))
    {
        push(
            errs,
            "spec.edge.jwt.jwksUri".into(),
            "must start with http:// or https://",
        );
    }
    if let Some(d) = check_duration(
        errs,
        "spec.edge.jwt.jwksRefreshInterval".into(),
        &j.jwks_refresh_interval,
    ) && d < std::time::Duration::from_secs(1)
    {
        push(
            errs,
            "spec.edge.jwt.jwksRefreshInterval".into(),
            "must be at least 1s",
        );
    }
    if let Some(d) = check_duration(errs, "spec.edge.jwt.leeway".into(), &j.leeway)
        && d > std::time::Duration::from_secs(600)
    {
        push(errs, "spec.edge.jwt.leeway".into(), "must be at most 10m");
    }
    if !(64..=65536).contains(&j.max_token_bytes) {
        push(
            errs,
            "spec.edge.jwt.maxTokenBytes".into(),
            "must be between 64 and 65536",
        );
    }
    for (i, a) in e.anonymous.iter().enumerate() {
        if !is_path_prefix(&a.path_prefix) {
            push(
                errs,
                format!("spec.edge.anonymous[{i}].pathPrefix"),
                "must be / or /segment[/segment...] (no trailing /, query or whitespace)",
            );
        }
    }
    let mut prefixes = BTreeSet::new();
    for (i, r) in e.routes.iter().enumerate() {
        if !is_path_prefix(&r.path_prefix) {
            push(
                errs,
                format!("spec.edge.routes[{i}].pathPrefix"),
                "must be / or /segment[/segment...] (no trailing /, query or whitespace)",
            );
        }
        if !prefixes.insert(r.path_prefix.as_str()) {
            push(
                errs,
                format!("spec.edge.routes[{i}]"),
                format!("duplicate prefix {:?}", r.path_prefix),
            );
        }
        if !spec.dependencies.iter().any(|d| d.name == r.dependency) {
            push(
                errs,
                format!("spec.edge.routes[{i}].dependency"),
                format!("no entry of dependencies is named {:?}", r.dependency),
            );
        }
    }
    if let Some(c) = &e.cors {
        for (i, o) in c.allow_origins.iter().enumerate() {
            let ok = o == "*"
                || ((o.starts_with("http://") || o.starts_with("https://"))
                    && !o
                        .split_once("://")
                        .is_some_and(|(_, h)| h.is_empty() || h.contains('/'))
                    && !o.contains(char::is_whitespace));
            if !ok {
                push(
                    errs,
                    format!("spec.edge.cors.allowOrigins[{i}]"),
                    "must be an origin (scheme://host[:port]) or *",
                );
            }
        }
        if c.allow_credentials && c.allow_origins.iter().any(|o| o == "*") {
            push(
                errs,
                "spec.edge.cors.allowOrigins".into(),
                "allowOrigins may not contain * when allowCredentials is true",
            );
        }
        check_duration(errs, "spec.edge.cors.maxAge".into(), &c.max_age);
    }
}

/// Every invalid field of a Queue; empty when it is valid.
pub fn queue(spec: &QueueSpec) -> Vec<FieldError> {
    let mut errs = Vec::new();
    if let Some(a) = &spec.max_age {
        check_duration(&mut errs, "spec.maxAge".into(), a);
    }
    check_duration(
        &mut errs,
        "spec.duplicateWindow".into(),
        &spec.duplicate_window,
    );
    check_duration(
        &mut errs,
        "spec.consumer.ackWait".into(),
        &spec.consumer.ack_wait,
    );
    for (i, b) in spec.consumer.backoff.iter().enumerate() {
        check_duration(&mut errs, format!("spec.consumer.backoff[{i}]"), &b.0);
    }
    if spec.consumer.backoff.len() > spec.consumer.max_deliveries.max(0) as usize {
        push(
            &mut errs,
            "spec.consumer.backoff".into(),
            "backoff has more entries than maxDeliveries",
        );
    }
    if let Some(s) = &spec.schema
        && s.inline.is_some() == s.config_map_ref.is_some()
    {
        push(
            &mut errs,
            "spec.schema".into(),
            "set exactly one of inline or configMapRef",
        );
    }
    errs
}

/// The Broker's rules (`spec.url` xor `spec.managed`; `vhost` only on RabbitMQ), as its CEL
/// rules state them.
pub fn broker(spec: &BrokerSpec) -> Vec<FieldError> {
    let mut errs = Vec::new();
    if spec.url.is_some() == spec.managed.is_some() {
        push(
            &mut errs,
            "spec".into(),
            "set exactly one of url or managed",
        );
    }
    if spec.vhost.is_some() && spec.kind != BrokerKind::Rabbitmq {
        push(
            &mut errs,
            "spec.vhost".into(),
            "vhost applies to rabbitmq only",
        );
    }
    if spec.kind == BrokerKind::Kafka {
        if spec.managed.is_some() {
            push(&mut errs, "spec.managed".into(), KAFKA_NOT_MANAGED);
        }
        if let Some(url) = &spec.url
            && !is_kafka_url(url)
        {
            push(&mut errs, "spec.url".into(), KAFKA_URL);
        }
    }
    errs
}

/// Why a kafka Broker cannot be `managed` (the CRD's rule says the same).
pub const KAFKA_NOT_MANAGED: &str = "Weir does not run Kafka: run it with Strimzi (strimzi.io) and set url to its bootstrap servers";

/// What a kafka Broker's `url` looks like (the CRD's rule says the same).
const KAFKA_URL: &str = "a kafka url is kafka://host:port[,host:port…] or kafka+ssl://…, with ?sasl=plain|scram-sha-256|scram-sha-512 at most";

/// The CRD's kafka URL rule, `^kafka(\+ssl)?://[^,/?@:]+:[0-9]{1,5}(,[^,/?@:]+:[0-9]{1,5})*/?
/// (\?sasl=(plain|scram-sha-256|scram-sha-512))?$`, without a regex engine. The operator then
/// reads the URL with `weir_broker::kafka::Bootstrap`, which checks the port's range too.
fn is_kafka_url(url: &str) -> bool {
    let Some(rest) = url
        .strip_prefix("kafka://")
        .or_else(|| url.strip_prefix("kafka+ssl://"))
    else {
        return false;
    };
    let (hosts, query) = match rest.split_once('?') {
        Some((h, q)) => (h, Some(q)),
        None => (rest, None),
    };
    if let Some(q) = query
        && !matches!(
            q,
            "sasl=plain" | "sasl=scram-sha-256" | "sasl=scram-sha-512"
        )
    {
        return false;
    }
    let hosts = hosts.strip_suffix('/').unwrap_or(hosts);
    hosts.split(',').all(|server| {
        server.split_once(':').is_some_and(|(host, port)| {
            !host.is_empty()
                && !host.contains(['/', '@'])
                && (1..=5).contains(&port.len())
                && port.bytes().all(|b| b.is_ascii_digit())
        })
    })
}

/// Every invalid field of a Saga; empty when it is valid.
pub fn saga(spec: &SagaSpec) -> Vec<FieldError> {
    let mut errs = Vec::new();
    if spec.steps.is_empty() {
        push(&mut errs, "spec.steps".into(), "needs at least one step");
    }
    let mut names = BTreeSet::new();
    for (i, s) in spec.steps.iter().enumerate() {
        if !names.insert(s.name.as_str()) {
            push(
                &mut errs,
                format!("spec.steps[{i}]"),
                format!("duplicate step name {:?}", s.name),
            );
        }
        check_duration(&mut errs, format!("spec.steps[{i}].timeout"), &s.timeout);
        let actions = std::iter::once(("action", &s.action))
            .chain(s.compensation.as_ref().map(|c| ("compensation", c)));
        for (which, a) in actions {
            let at = format!("spec.steps[{i}].{which}");
            match (&a.http, &a.request) {
                (Some(h), None) => {
                    if h.microservice.is_some() == h.url.is_some() {
                        push(
                            &mut errs,
                            format!("{at}.http"),
                            "set exactly one of microservice or url",
                        );
                    }
                }
                (None, Some(_)) => {}
                _ => push(&mut errs, at, "set exactly one of http or request"),
            }
        }
    }
    if let Some(r) = &spec.retention
        && let Err(e) = duration::parse_long(r)
    {
        push(&mut errs, "spec.retention".into(), e.to_string());
    }
    errs
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ms(yaml: &str) -> MicroserviceSpec {
        serde_yaml::from_str(yaml).unwrap()
    }

    #[test]
    fn a_saga_retention_counts_days_and_names_its_field() {
        let spec = |retention: &str| -> SagaSpec {
            serde_yaml::from_str(&format!(
                "broker: nats\nretention: {retention}\nsteps:\n- name: a\n  action: {{request: {{subject: x}}}}\n"
            ))
            .unwrap()
        };
        assert_eq!(saga(&spec("7d12h")), vec![]);
        let errs = saga(&spec("1w"));
        assert_eq!(errs.len(), 1);
        assert_eq!(errs[0].field, "spec.retention");
    }

    #[test]
    fn a_minimal_microservice_is_valid() {
        assert_eq!(microservice("users", &ms("image: users:1")), vec![]);
    }

    #[test]
    fn errors_name_the_field() {
        let spec = ms(r#"
image: orders:1
port: 15001
dependencies:
  - name: users
    microservice: users
    url: http://x
    timeout: 3x
  - name: users
    url: http://users
    retry: {backoff: {base: 2s, max: 1s}}
inbound: {maxQueue: 5}
"#);
        let fields: Vec<_> = microservice("orders", &spec)
            .into_iter()
            .map(|e| e.field)
            .collect();
        assert_eq!(
            fields,
            [
                "spec.port",
                "spec.dependencies[0]",
                "spec.dependencies[0].timeout",
                "spec.dependencies[1]",
                "spec.dependencies[1].retry.backoff.max",
                "spec.inbound.maxQueue",
            ]
        );
        assert!(!microservice("Bad_Name", &ms("image: x")).is_empty());
    }

    #[test]
    fn balancing_and_ejection_errors_name_the_field() {
        let spec = ms(r#"
image: orders:1
dependencies:
  - name: users
    microservice: users
    loadBalancer: {decay: 0s, slowStart: 0s}
    outlierDetection: {baseEjectionTime: 1m, maxEjectionTime: 30s}
  - name: geo
    url: https://geo.example.com
    loadBalancer: {algorithm: roundRobin, slowStart: soon}
    outlierDetection: {consecutiveFailures: 0, maxEjectionPercent: 101, baseEjectionTime: 0s}
  - name: ok
    url: https://ok.example.com
    loadBalancer: {}
    outlierDetection: {maxEjectionPercent: 0, baseEjectionTime: 5m, maxEjectionTime: 5m}
"#);
        let fields: Vec<_> = microservice("orders", &spec)
            .into_iter()
            .map(|e| e.field)
            .collect();
        assert_eq!(
            fields,
            [
                "spec.dependencies[0].loadBalancer.decay",
                "spec.dependencies[0].outlierDetection.maxEjectionTime",
                "spec.dependencies[1].loadBalancer.slowStart",
                "spec.dependencies[1].outlierDetection.consecutiveFailures",
                "spec.dependencies[1].outlierDetection.maxEjectionPercent",
                "spec.dependencies[1].outlierDetection.baseEjectionTime",
            ]
        );
        let bad: Result<MicroserviceSpec, _> = serde_yaml::from_str(
            "image: x\ndependencies: [{name: a, url: 'http://a', loadBalancer: {algorithm: random}}]\n",
        );
        assert!(bad.unwrap_err().to_string().contains("random"));
    }

    #[test]
    fn autoscaling_errors_name_the_field() {
        let fields = |yaml: &str| -> Vec<String> {
            microservice("worker", &ms(yaml))
                .into_iter()
                .map(|e| e.field)
                .collect()
        };
        let consumer = "image: w:1\nconsumes: [{queue: jobs, path: /jobs}]\n";
        assert_eq!(
            fields(&format!(
                "{consumer}autoscaling: {{minReplicas: 0, maxReplicas: 5, queueLag: [{{queue: jobs, targetLagPerReplica: 10}}]}}"
            )),
            Vec::<String>::new()
        );
        assert_eq!(
            fields(&format!(
                "{consumer}autoscaling: {{minReplicas: 6, maxReplicas: 5, targetCPUUtilizationPercentage: 50}}"
            )),
            ["spec.autoscaling.minReplicas"]
        );
        assert_eq!(
            fields(&format!("{consumer}autoscaling: {{maxReplicas: 5}}")),
            ["spec.autoscaling"]
        );
        assert_eq!(
            fields(&format!(
                "{consumer}autoscaling: {{minReplicas: 0, maxReplicas: 5, targetCPUUtilizationPercentage: 50}}"
            )),
            ["spec.autoscaling.minReplicas"]
        );
        assert_eq!(
            fields(&format!(
                "{consumer}autoscaling: {{maxReplicas: 5, queueLag: [{{queue: invoices, targetLagPerReplica: 10}}]}}"
            )),
            ["spec.autoscaling.queueLag"]
        );
        assert_eq!(
            fields(&format!(
                "{consumer}autoscaling: {{maxReplicas: 5, queueLag: [{{queue: jobs, targetLagPerReplica: 10}}, {{queue: jobs, targetLagPerReplica: 20}}]}}"
            )),
            ["spec.autoscaling.queueLag[1]"]
        );
        // The names users copy from the HorizontalPodAutoscaler: a misspelt one is refused.
        let typo: Result<MicroserviceSpec, _> = serde_yaml::from_str(
            "image: w:1\nautoscaling: {maxReplicas: 5, targetCpuUtilizationPercentage: 50}",
        );
        assert!(
            typo.unwrap_err()
                .to_string()
                .contains("targetCpuUtilizationPercentage"),
        );
    }

    #[test]
    fn a_microservice_name_leaves_room_for_its_headless_service() {
        assert_eq!(crate::microservice::MAX_NAME_LEN, 48);
        let spec = ms("image: x");
        assert_eq!(microservice(&"a".repeat(48), &spec), vec![]);
        let errs = microservice(&"a".repeat(49), &spec);
        assert_eq!(errs.len(), 1, "{errs:?}");
        assert_eq!(errs[0].field, "metadata.name");
        assert!(errs[0].message.contains("48"), "{}", errs[0].message);
        assert!(MICROSERVICE_NAME_RULE.contains("48"));
    }

    #[test]
    fn allow_from_entries_name_a_workload_or_a_namespace() {
        let errs = microservice(
            "users",
            &ms(
                "image: u\nport: 8080\ninbound: {allowFrom: [shop/orders, shop/saga/checkout, ops/*, Shop/x, shop, a/b/c]}",
            ),
        );
        let fields: Vec<&str> = errs.iter().map(|e| e.field.as_str()).collect();
        assert_eq!(
            fields,
            [
                "spec.inbound.allowFrom[3]",
                "spec.inbound.allowFrom[4]",
                "spec.inbound.allowFrom[5]"
            ],
            "{errs:?}"
        );
    }

    #[test]
    fn protocol_is_for_url_dependencies_only() {
        let spec = ms(r#"
image: orders:1
protocol: grpc
dependencies:
  - {name: users, microservice: users, protocol: grpc}
  - {name: geo, url: "https://geo.example.com", protocol: http2}
"#);
        let errs = microservice("orders", &spec);
        assert_eq!(
            errs.iter().map(|e| e.field.as_str()).collect::<Vec<_>>(),
            ["spec.dependencies[0].protocol"]
        );
        assert!(errs[0].message.contains("url dependencies"), "{errs:?}");
        // An unknown protocol is refused by the type, naming the value.
        let bad: Result<MicroserviceSpec, _> = serde_yaml::from_str("image: x\nprotocol: thrift\n");
        assert!(bad.unwrap_err().to_string().contains("thrift"));
    }

    #[test]
    fn a_grpc_probe_is_one_kind_and_needs_an_http2_app() {
        let fields = |yaml: &str| {
            microservice("orders", &ms(yaml))
                .into_iter()
                .map(|e| e.field)
                .collect::<Vec<_>>()
        };
        assert!(fields("image: x\nprotocol: grpc\nprobes: {readiness: {grpc: {}}, liveness: {grpc: {service: shop.Orders}}}\n").is_empty());
        assert!(
            fields("image: x\nprobes: {readiness: {periodSeconds: 5}}\n").is_empty(),
            "a probe with neither is the default path"
        );
        assert_eq!(
            fields("image: x\nprotocol: grpc\nprobes: {readiness: {path: /ready, grpc: {}}}\n"),
            ["spec.probes.readiness"]
        );
        assert_eq!(
            fields("image: x\nprobes: {liveness: {grpc: {}}}\n"),
            ["spec.probes"]
        );
    }

    #[test]
    fn edge_errors_name_the_field() {
        let spec = ms(r#"
dependencies:
  - {name: orders, microservice: orders}
edge:
  jwt:
    issuer: https://id.example.com/
    audiences: [shop]
    jwks: '{"keys": []}'
    jwksUri: ftp://keys
    leeway: 1h
  anonymous:
    - {pathPrefix: /catalog/}
  routes:
    - {pathPrefix: /orders, dependency: orders}
    - {pathPrefix: /orders, dependency: billing}
  cors:
    allowOrigins: ["*", "https://shop.example.com/"]
    allowCredentials: true
"#);
        let fields: Vec<_> = microservice("gateway", &spec)
            .into_iter()
            .map(|e| e.field)
            .collect();
        assert_eq!(
            fields,
            [
                "spec.edge.jwt",
                "spec.edge.jwt.jwks",
                "spec.edge.jwt.jwksUri",
                "spec.edge.jwt.leeway",
                "spec.edge.anonymous[0].pathPrefix",
                "spec.edge.routes[1]",
                "spec.edge.routes[1].dependency",
                "spec.edge.cors.allowOrigins[1]",
                "spec.edge.cors.allowOrigins",
            ]
        );
        // A gateway without an app is valid with routes, and an image is needed without them.
        let gateway = ms(r#"
dependencies: [{name: orders, microservice: orders}]
edge:
  jwt: {issuer: i, audiences: [a], jwksUri: "https://id/jwks.json"}
  routes: [{pathPrefix: /orders, dependency: orders}]
"#);
        assert_eq!(microservice("gateway", &gateway), vec![]);
        let no_routes = ms(r#"
edge:
  jwt: {issuer: i, audiences: [a], jwksUri: "https://id/jwks.json"}
"#);
        let errs = microservice("gateway", &no_routes);
        assert_eq!(errs.len(), 1);
        assert_eq!(errs[0].field, "spec.image");
    }

    fn kafka(yaml: &str) -> BrokerSpec {
        serde_yaml::from_str(yaml).unwrap()
    }

    #[test]
    fn kafka_urls_follow_the_crd_rule() {
        for ok in [
            "kafka://k:9092",
            "kafka://k1:9092,k2.example:19092/",
            "kafka+ssl://k:9093?sasl=scram-sha-512",
            "kafka://10.0.0.1:9092/?sasl=plain",
        ] {
            assert!(is_kafka_url(ok), "{ok}");
        }
        for bad in [
            "kafka://",
            "kafka://k",
            "kafka://k:",
            "kafka://k:123456",
            "kafka://k:90a2",
            "kafka://u:p@k:9092",
            "kafka://k:9092,",
            "kafka://k:9092//",
            "kafka://k:9092/topic",
            "kafka://k:9092?acks=all",
            "kafka://k:9092?sasl=gssapi",
            "KAFKA://k:9092",
            "kafka+tls://k:9092",
            "nats://k:4222",
        ] {
            assert!(!is_kafka_url(bad), "{bad}");
        }
        let errs = broker(&kafka("{kind: kafka, url: \"kafka://k\"}"));
        assert_eq!(errs.len(), 1, "{errs:?}");
        assert_eq!(errs[0].field, "spec.url");
        assert!(broker(&kafka("{kind: kafka, url: \"kafka://k:9092\"}")).is_empty());
        // The rule is Kafka's: another kind's URL is the scheme check's (BrokerSpec::check).
        assert!(broker(&kafka("{kind: nats, url: \"nats://k\"}")).is_empty());
    }

    #[test]
    fn a_managed_kafka_points_at_strimzi() {
        let errs = broker(&kafka("{kind: kafka, managed: {}}"));
        assert_eq!(errs.len(), 1, "{errs:?}");
        assert_eq!(errs[0].field, "spec.managed");
        assert!(errs[0].message.contains("Strimzi"), "{}", errs[0].message);
    }

    /// `weir render` and clusters without CEL say what the API server says.
    #[test]
    fn the_crd_rules_carry_the_same_messages() {
        let crd = serde_json::to_value(<crate::Broker as kube::CustomResourceExt>::crd()).unwrap();
        let rules = crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"]
            ["x-kubernetes-validations"]
            .as_array()
            .unwrap()
            .clone();
        let message_of = |field: &str| {
            rules
                .iter()
                .find(|r| r["fieldPath"] == field)
                .and_then(|r| r["message"].as_str())
                .unwrap_or_default()
                .to_string()
        };
        assert_eq!(message_of(".managed"), KAFKA_NOT_MANAGED);
        assert_eq!(message_of(".url"), KAFKA_URL);
    }
}
