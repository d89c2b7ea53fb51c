//! Prometheus metrics. Label sets are created when a listener's stack is built (one per direction,
//! dependency and status class), never per request: the hot path only increments.

use crate::body::{Reason, STATUS_CLASSES};
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;
use std::sync::Arc;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RequestLabels {
    pub direction: String,
    pub dependency: String,
    pub status_class: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct DependencyLabels {
    pub dependency: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct TransitionLabels {
    pub dependency: String,
    pub to: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RejectionLabels {
    pub direction: String,
    pub dependency: String,
    pub reason: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct KindLabels {
    pub kind: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ConnectionLabels {
    /// `inbound`, `admin` or the dependency's name.
    pub listener: String,
    /// `http1` or `http2`.
    pub version: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct GoawayLabels {
    pub listener: String,
    /// The HTTP/2 error code, as RFC 9113 names it (`ENHANCE_YOUR_CALM`, …).
    pub reason: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct GrpcLabels {
    pub direction: String,
    pub dependency: String,
    /// `package.Service`, or `other` (see [`GrpcMetrics`]).
    pub grpc_service: String,
    pub grpc_method: String,
    /// The status name (`OK`, `UNAVAILABLE`, …).
    pub grpc_status: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct GrpcMethodLabels {
    pub direction: String,
    pub dependency: String,
    pub grpc_service: String,
    pub grpc_method: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ResultLabels {
    pub result: String,
}

type HistogramFamily = Family<RequestLabels, Histogram, fn() -> Histogram>;

fn latency_histogram() -> Histogram {
    Histogram::new([
        0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
    ])
}

pub struct Metrics {
    registry: Registry,
    requests: Family<RequestLabels, Counter>,
    latency: HistogramFamily,
    breaker_state: Family<DependencyLabels, Gauge>,
    breaker_transitions: Family<TransitionLabels, Counter>,
    rejections: Family<RejectionLabels, Counter>,
    retries: Family<DependencyLabels, Counter>,
    retries_refused: Family<DependencyLabels, Counter>,
    config_reloads: Family<ResultLabels, Counter>,
    underscore_removed: Family<KindLabels, Counter>,
    connections: Family<ConnectionLabels, Counter>,
    h2_goaways: Family<GoawayLabels, Counter>,
    grpc_calls: Family<GrpcLabels, Counter>,
    grpc_latency: Family<GrpcMethodLabels, Histogram, fn() -> Histogram>,
    pub spans_exported: Counter,
    pub spans_dropped: Counter,
    /// The pub/sub bridge's counters (`weir_messaging_*`).
    pub bridge: crate::bridge::metrics::BridgeMetrics,
    /// Edge and identity-header counters (`weir_auth_rejections_*`, `weir_identity_*`).
    pub edge: crate::edge::metrics::EdgeMetrics,
    /// Per dependency and endpoint (`weir_endpoint_*`, `weir_endpoints*`).
    pub endpoints: crate::endpoint_metrics::EndpointFamilies,
    /// Mutual TLS and authorization (`weir_inbound_authorizations_total`, `weir_tls_handshakes_total`).
    pub mtls: crate::mtls::MtlsMetrics,
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Metrics")
    }
}

/// Per direction and dependency: a counter and a latency histogram per status class.
#[derive(Clone, Debug)]
pub struct RequestMetrics {
    pub requests: [Counter; 5],
    pub latency: [Histogram; 5],
    /// `weir_rejections_total{reason="client-body-error"}`: requests whose body broke on the
    /// client's side, found by the innermost forwarding, so counted where every answer passes.
    pub client_body_errors: Counter,
}

/// How many methods of one direction and dependency get label sets of their own; calls to
/// further methods are counted as `grpc_service="other", grpc_method="other"`.
pub const GRPC_METHODS_MAX: usize = 100;

/// gRPC calls by service, method and status (`weir_grpc_requests_total`,
/// `weir_grpc_request_duration_seconds`). The method set comes from traffic, so it is bounded:
/// a method gets its own label set when its first call ends, unless [`GRPC_METHODS_MAX`] are
/// taken, its path is not `/package.Service/Method` (plain letters, digits, `_` and `.`), or
/// the call was answered `UNIMPLEMENTED` (a client probing for methods would otherwise take
/// every slot): those are counted as `other`. A method's status series appear as statuses occur.
#[derive(Debug)]
pub struct GrpcMetrics {
    calls: Family<GrpcLabels, Counter>,
    latency: Family<GrpcMethodLabels, Histogram, fn() -> Histogram>,
    direction: String,
    dependency: String,
    methods: std::sync::RwLock<std::collections::HashMap<Box<str>, Arc<GrpcMethod>>>,
    other: std::sync::OnceLock<Arc<GrpcMethod>>,
}

/// One method's series, created as they are first needed.
#[derive(Debug)]
struct GrpcMethod {
    service: String,
    method: String,
    latency: Histogram,
    statuses: [std::sync::OnceLock<Counter>; 17],
}

impl GrpcMetrics {
    /// Counts a call to `path` that ended with status `code` after `seconds`.
    pub fn record(&self, path: &str, code: u16, seconds: f64) {
        let m = self.method(path, code);
        let i = if code < 17 { usize::from(code) } else { 2 };
        m.statuses[i]
            .get_or_init(|| {
                self.calls.get_or_create_owned(&GrpcLabels {
                    direction: self.direction.clone(),
                    dependency: self.dependency.clone(),
                    grpc_service: m.service.clone(),
                    grpc_method: m.method.clone(),
                    grpc_status: weir_crds::proxy::grpc_code_name(code).to_string(),
                })
            })
            .inc();
        m.latency.observe(seconds);
    }

    fn method(&self, path: &str, code: u16) -> Arc<GrpcMethod> {
        let known = self
            .methods
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .get(path)
            .cloned();
        if let Some(m) = known {
            return m;
        }
        let name = crate::layers::grpc::service_and_method(path);
        if let Some((service, method)) =
            name.filter(|_| code != crate::layers::grpc::code::UNIMPLEMENTED)
        {
            let mut methods = self.methods.write().unwrap_or_else(|e| e.into_inner());
            if let Some(m) = methods.get(path) {
                return m.clone();
            }
            if methods.len() < GRPC_METHODS_MAX {
                let m = Arc::new(self.new_method(service, method));
                methods.insert(path.into(), m.clone());
                return m;
            }
        }
        self.other
            .get_or_init(|| Arc::new(self.new_method("other", "other")))
            .clone()
    }

    fn new_method(&self, service: &str, method: &str) -> GrpcMethod {
        GrpcMethod {
            service: service.to_string(),
            method: method.to_string(),
            latency: self.latency.get_or_create_owned(&GrpcMethodLabels {
                direction: self.direction.clone(),
                dependency: self.dependency.clone(),
                grpc_service: service.to_string(),
                grpc_method: method.to_string(),
            }),
            statuses: Default::default(),
        }
    }
}

#[derive(Clone, Debug)]
pub struct BreakerMetrics {
    /// 0 closed, 1 open, 2 half-open.
    pub state: Gauge,
    /// Transitions into closed, open, half-open.
    pub transitions: [Counter; 3],
}

#[derive(Clone, Debug, Default)]
pub struct RetryMetrics {
    pub attempted: Counter,
    pub refused_by_budget: Counter,
}

impl Metrics {
    pub fn new() -> Arc<Self> {
        let mut registry = Registry::with_prefix("weir");
        let requests = Family::<RequestLabels, Counter>::default();
        let latency: HistogramFamily = Family::new_with_constructor(latency_histogram);
        let breaker_state = Family::<DependencyLabels, Gauge>::default();
        let breaker_transitions = Family::<TransitionLabels, Counter>::default();
        let rejections = Family::<RejectionLabels, Counter>::default();
        let retries = Family::<DependencyLabels, Counter>::default();
        let retries_refused = Family::<DependencyLabels, Counter>::default();
        let config_reloads = Family::<ResultLabels, Counter>::default();
        let underscore_removed = Family::<KindLabels, Counter>::default();
        let spans_exported = Counter::default();
        let spans_dropped = Counter::default();
        let connections = Family::<ConnectionLabels, Counter>::default();
        registry.register(
            "connections",
            "Connections accepted, by listener and the HTTP version the client spoke",
            connections.clone(),
        );
        let h2_goaways = Family::<GoawayLabels, Counter>::default();
        registry.register(
            "http2_goaways_sent",
            "HTTP/2 connections the proxy closed for the client's misbehaviour (floods, rapid resets, protocol errors), by listener and error code",
            h2_goaways.clone(),
        );
        registry.register(
            "requests",
            "Requests answered, by direction, dependency and status class",
            requests.clone(),
        );
        let grpc_calls = Family::<GrpcLabels, Counter>::default();
        registry.register(
            "grpc_requests",
            "gRPC calls ended, by direction, dependency, service, method and the gRPC status the caller read",
            grpc_calls.clone(),
        );
        let grpc_latency: Family<GrpcMethodLabels, Histogram, fn() -> Histogram> =
            Family::new_with_constructor(latency_histogram);
        registry.register(
            "grpc_request_duration_seconds",
            "gRPC calls: time to the call's status (the end of a stream), by direction, dependency, service and method",
            grpc_latency.clone(),
        );
        registry.register(
            "request_duration_seconds",
            "Time to response headers, by direction, dependency and status class",
            latency.clone(),
        );
        registry.register(
            "circuit_breaker_state",
            "Circuit breaker state: 0 closed, 1 open, 2 half-open",
            breaker_state.clone(),
        );
        registry.register(
            "circuit_breaker_transitions",
            "Circuit breaker transitions, by the state entered",
            breaker_transitions.clone(),
        );
        registry.register(
            "rejections",
            "Requests refused by a policy or for bad input, by reason (the x-weir-reason of the answer)",
            rejections.clone(),
        );
        registry.register("retries", "Retries attempted", retries.clone());
        registry.register(
            "retries_refused_by_budget",
            "Retries wanted but refused because the retry budget was spent",
            retries_refused.clone(),
        );
        registry.register(
            "config_reloads",
            "Config reloads, by result (success, failure)",
            config_reloads.clone(),
        );
        registry.register(
            "underscore_headers_removed",
            "Inbound requests from which header names with _ were removed, by kind (look-alike of x-user-* or x-weir-*, other)",
            underscore_removed.clone(),
        );
        registry.register(
            "spans_exported",
            "Spans sent to the OTLP endpoint",
            spans_exported.clone(),
        );
        registry.register(
            "spans_dropped",
            "Spans dropped (export queue full or export failed)",
            spans_dropped.clone(),
        );
        let bridge = crate::bridge::metrics::BridgeMetrics::register(&mut registry);
        let edge = crate::edge::metrics::EdgeMetrics::register(&mut registry);
        let endpoints = crate::endpoint_metrics::EndpointFamilies::register(&mut registry);
        let mtls = crate::mtls::MtlsMetrics::register(&mut registry);
        Arc::new(Metrics {
            registry,
            requests,
            latency,
            breaker_state,
            breaker_transitions,
            rejections,
            retries,
            retries_refused,
            config_reloads,
            underscore_removed,
            connections,
            h2_goaways,
            grpc_calls,
            grpc_latency,
            spans_exported,
            spans_dropped,
            bridge,
            edge,
            endpoints,
            mtls,
        })
    }

    pub fn request_metrics(&self, direction: &str, dependency: &str) -> RequestMetrics {
        let labels = |i: usize| RequestLabels {
            direction: direction.to_string(),
            dependency: dependency.to_string(),
            status_class: STATUS_CLASSES[i].to_string(),
        };
        RequestMetrics {
            requests: std::array::from_fn(|i| self.requests.get_or_create_owned(&labels(i))),
            latency: std::array::from_fn(|i| self.latency.get_or_create_owned(&labels(i))),
            client_body_errors: self.rejections(direction, dependency, Reason::ClientBodyError),
        }
    }

    pub fn rejections(&self, direction: &str, dependency: &str, reason: Reason) -> Counter {
        self.rejections.get_or_create_owned(&RejectionLabels {
            direction: direction.to_string(),
            dependency: dependency.to_string(),
            reason: reason.as_str().to_string(),
        })
    }

    pub fn breaker_metrics(&self, dependency: &str) -> BreakerMetrics {
        let t = |to: &str| {
            self.breaker_transitions
                .get_or_create_owned(&TransitionLabels {
                    dependency: dependency.to_string(),
                    to: to.to_string(),
                })
        };
        BreakerMetrics {
            state: self.breaker_state.get_or_create_owned(&DependencyLabels {
                dependency: dependency.to_string(),
            }),
            transitions: [t("closed"), t("open"), t("half_open")],
        }
    }

    pub fn retry_metrics(&self, dependency: &str) -> RetryMetrics {
        let l = DependencyLabels {
            dependency: dependency.to_string(),
        };
        RetryMetrics {
            attempted: self.retries.get_or_create_owned(&l),
            refused_by_budget: self.retries_refused.get_or_create_owned(&l),
        }
    }

    /// The gRPC call metrics of one direction and dependency.
    pub fn grpc_metrics(&self, direction: &str, dependency: &str) -> GrpcMetrics {
        GrpcMetrics {
            calls: self.grpc_calls.clone(),
            latency: self.grpc_latency.clone(),
            direction: direction.to_string(),
            dependency: dependency.to_string(),
            methods: Default::default(),
            other: Default::default(),
        }
    }

    /// The inbound listener's counters for header names with `_`.
    pub fn header_name_counters(&self) -> crate::layers::header_names::HeaderNameCounters {
        let kind = |k: &str| {
            self.underscore_removed.get_or_create_owned(&KindLabels {
                kind: k.to_string(),
            })
        };
        crate::layers::header_names::HeaderNameCounters {
            look_alike_removed: kind("look-alike"),
            underscore_removed: kind("other"),
            rejected: self.rejections("inbound", "", Reason::UnderscoreHeader),
        }
    }

    /// Counts a connection accepted on `listener` speaking `version` (the label set of a
    /// listener exists once it has had a connection: listeners are few, versions two).
    pub fn connection(&self, listener: &str, version: &str) {
        self.connections
            .get_or_create(&ConnectionLabels {
                listener: listener.to_string(),
                version: version.to_string(),
            })
            .inc();
    }

    pub fn h2_goaway(&self, listener: &str, reason: h2::Reason) {
        self.h2_goaways
            .get_or_create(&GoawayLabels {
                listener: listener.to_string(),
                reason: format!("{reason:?}"),
            })
            .inc();
    }

    pub fn config_reload(&self, ok: bool) {
        let result = if ok { "success" } else { "failure" };
        self.config_reloads
            .get_or_create(&ResultLabels {
                result: result.to_string(),
            })
            .inc();
    }

    /// The Prometheus text exposition.
    pub fn encode(&self) -> String {
        let mut out = String::with_capacity(16 * 1024);
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pre_created_handles_feed_the_exposition() {
        let m = Metrics::new();
        let r = m.request_metrics("outbound", "users");
        r.requests[1].inc();
        r.latency[1].observe(0.002);
        m.rejections("inbound", "", Reason::RateLimited).inc();
        let again = m.request_metrics("outbound", "users");
        again.requests[1].inc();
        let text = m.encode();
        assert!(
            text.contains(r#"weir_requests_total{direction="outbound",dependency="users",status_class="2xx"} 2"#),
            "{text}"
        );
        assert!(text.contains(
            r#"weir_rejections_total{direction="inbound",dependency="",reason="rate-limited"} 1"#
        ));
        assert!(text.contains("weir_request_duration_seconds_bucket{"));
    }

    #[test]
    fn grpc_methods_are_bounded_and_unimplemented_or_odd_paths_are_other() {
        let m = Metrics::new();
        let g = m.grpc_metrics("inbound", "");
        g.record("/shop.Orders/Place", 0, 0.01);
        g.record("/shop.Orders/Place", 0, 0.01);
        g.record("/shop.Orders/Place", 14, 0.01);
        g.record("/shop.Orders/Probe", 12, 0.01); // UNIMPLEMENTED: not admitted
        g.record("/not a method", 2, 0.01);
        g.record("/shop.Orders/Place", 99, 0.01); // beyond the specification: UNKNOWN
        for i in 0..GRPC_METHODS_MAX + 20 {
            g.record(&format!("/junk.S/M{i}"), 0, 0.0);
        }
        let text = m.encode();
        let line = |svc: &str, method: &str, status: &str| {
            format!(
                r#"weir_grpc_requests_total{{direction="inbound",dependency="",grpc_service="{svc}",grpc_method="{method}",grpc_status="{status}"}}"#
            )
        };
        assert!(
            text.contains(&format!("{} 2\n", line("shop.Orders", "Place", "OK"))),
            "{text}"
        );
        assert!(text.contains(&format!(
            "{} 1\n",
            line("shop.Orders", "Place", "UNAVAILABLE")
        )));
        assert!(text.contains(&format!("{} 1\n", line("shop.Orders", "Place", "UNKNOWN"))));
        assert!(text.contains(&format!("{} 1\n", line("other", "other", "UNIMPLEMENTED"))));
        assert!(text.contains(&format!("{} 1\n", line("other", "other", "UNKNOWN"))));
        // 99 junk methods got a slot (one went to Place); the other 21 are `other`.
        assert!(
            text.contains(&format!("{} 21\n", line("other", "other", "OK"))),
            "{text}"
        );
        let methods = text
            .lines()
            .filter(|l| l.starts_with("weir_grpc_requests_total{"))
            .count();
        assert_eq!(methods, GRPC_METHODS_MAX + 5, "{text}");
        assert!(text.contains(r#"weir_grpc_request_duration_seconds_count{direction="inbound",dependency="",grpc_service="shop.Orders",grpc_method="Place"} 4"#));
    }
}
