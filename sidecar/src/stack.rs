//! Builds the per-listener service stacks from a config. Stateful parts (breakers, retry budgets,
//! bulkheads, the inbound limiter and token bucket, the span exporter) are carried over from the
//! previous build when their own config is unchanged, so a reload does not reset them.

use crate::balance::{Balancer, Settings};
use crate::body::Reason;
use crate::discovery::{Discovery, Resolver};
use crate::edge::client_limit::ClientLimiter;
use crate::edge::identity::IdentityKey;
use crate::edge::keys::KeySource;
use crate::edge::{Edge, EdgeCounters, EdgeLayer};
use crate::forward::{Balanced, Clients, Forward, Target};
use crate::layers::attempt_timeout::AttemptTimeoutLayer;
use crate::layers::authorize::{AuthorizeLayer, Authorizer};
use crate::layers::body_limit::BodyLimitLayer;
use crate::layers::breaker::{Breaker, BreakerLayer};
use crate::layers::concurrency::{ConcurrencyLimitLayer, Limiter};
use crate::layers::fallback::{FallbackLayer, FallbackResponse};
use crate::layers::grpc::GrpcLayer;
use crate::layers::guard::GuardLayer;
use crate::layers::header_names::HeaderNamesLayer;
use crate::layers::identity::{InboundIdentityLayer, SignIdentityLayer};
use crate::layers::observe::{ObserveLayer, Observer};
use crate::layers::rate_limit::{RateLimitLayer, TokenBucket};
use crate::layers::retry::{RetryBudget, RetryLayer, RetryPolicy};
use crate::layers::stream_idle::StreamIdleLayer;
use crate::layers::timeout::TimeoutLayer;
use crate::layers::trace::{TraceLayer, TraceSettings};
use crate::metrics::Metrics;
use crate::otlp::{self, SpanSink};
use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;
use tower::ServiceBuilder;
use tower::util::BoxCloneSyncService;
use weir_crds::proxy::{
    CircuitBreakerConfig, ClientRateLimitConfig, JwtConfig, LoadBalancerConfig, OutboundConfig,
    OutlierDetectionConfig, ProxyConfig, RateLimitConfig, RetryBudgetConfig, TracingConfig,
};

use crate::service::Stack;

/// What stacks are built with.
#[derive(Clone, Debug)]
pub struct Env {
    pub metrics: Arc<Metrics>,
    /// One cleartext client per HTTP version, shared by every stack.
    pub clients: Clients,
    pub access_log: bool,
    pub otlp_flush_interval: Duration,
    /// How discovery resolves names (the system's resolver but in tests).
    pub resolver: Resolver,
}

#[derive(Clone, Debug, Default)]
struct DepState {
    breaker: Option<(CircuitBreakerConfig, Arc<Breaker>)>,
    budget: Option<(RetryBudgetConfig, Arc<RetryBudget>)>,
    bulkhead: Option<((u32, u32), Arc<Limiter>)>,
    balancing: Option<(BalanceKey, Balancing)>,
}

/// What a dependency's balancer and discovery are made of: a reload that changes none of it
/// keeps both, with every endpoint's latency estimate and ejection.
#[derive(Clone, Debug, PartialEq)]
struct BalanceKey {
    load_balancer: LoadBalancerConfig,
    outlier_detection: OutlierDetectionConfig,
    /// The name resolved, and how often; `None`: fixed addresses.
    resolve: Option<(String, u64)>,
}

#[derive(Clone, Debug)]
struct Balancing {
    balancer: Balancer,
    /// Balanced only when the name has two addresses or more (an external URL's own host).
    implicit: bool,
    _discovery: Option<Arc<Discovery>>,
}

/// What to balance a dependency over: its configured endpoints, else the upstream URL's host
/// when it is a name (an address literal is a single endpoint: nothing to balance).
fn balance_key(o: &OutboundConfig) -> Option<(BalanceKey, bool)> {
    let key = |resolve| BalanceKey {
        load_balancer: o.load_balancer.clone(),
        outlier_detection: o.outlier_detection.clone(),
        resolve,
    };
    match &o.endpoints {
        Some(e) => Some((key(e.dns.clone().map(|d| (d, e.refresh_ms))), false)),
        None => {
            let uri: http::Uri = o.upstream.parse().ok()?;
            let host = uri.host()?;
            let bare = host.trim_start_matches('[').trim_end_matches(']');
            if bare.parse::<std::net::IpAddr>().is_ok() {
                return None;
            }
            let port = uri.port_u16().unwrap_or(match uri.scheme_str() {
                Some("https") => 443,
                _ => 80,
            });
            Some((
                key(Some((
                    format!("{host}:{port}"),
                    weir_crds::proxy::DEFAULT_REFRESH_MS,
                ))),
                true,
            ))
        }
    }
}

/// The stateful components behind a snapshot.
#[derive(Clone, Debug, Default)]
pub struct Components {
    limiter: Option<((u32, u32), Arc<Limiter>)>,
    bucket: Option<(RateLimitConfig, Arc<TokenBucket>)>,
    exporter: Option<(TracingConfig, String, SpanSink)>,
    deps: HashMap<String, DepState>,
    /// Edge: the JWT keys (a fetched JWKS stays cached across reloads) and per-client buckets.
    jwt_keys: Option<(JwtConfig, Arc<KeySource>)>,
    client_limiter: Option<(ClientRateLimitConfig, Arc<ClientLimiter>)>,
    identity_key: Option<(String, Arc<IdentityKey>)>,
    /// The workload's certificate, kept across reloads while its config is the same.
    workload_cert: Option<(weir_crds::proxy::MtlsConfig, Arc<crate::mtls::CertManager>)>,
}

impl Components {
    /// The workload's certificate, when `mtls` is configured.
    pub fn workload_cert(&self) -> Option<&Arc<crate::mtls::CertManager>> {
        self.workload_cert.as_ref().map(|(_, m)| m)
    }

    /// The span exporter's sink, when spans are exported.
    pub fn span_sink(&self) -> Option<&SpanSink> {
        self.exporter.as_ref().map(|(_, _, s)| s)
    }

    pub fn breaker(&self, dependency: &str) -> Option<&Arc<Breaker>> {
        self.deps.get(dependency)?.breaker.as_ref().map(|(_, b)| b)
    }

    /// The balancer of a dependency with endpoints to balance over.
    pub fn balancer(&self, dependency: &str) -> Option<&Balancer> {
        self.deps
            .get(dependency)?
            .balancing
            .as_ref()
            .map(|(_, b)| &b.balancer)
    }

    /// Every balanced dependency's endpoints, for `GET /endpoints`.
    pub fn endpoints_view(
        &self,
    ) -> std::collections::BTreeMap<String, Vec<crate::balance::EndpointView>> {
        self.deps
            .iter()
            .filter_map(|(name, d)| {
                let (_, b) = d.balancing.as_ref()?;
                Some((name.clone(), b.balancer.view()))
            })
            .collect()
    }
}

/// One config turned into services.
pub struct Snapshot {
    pub config: Arc<ProxyConfig>,
    pub inbound: Stack,
    pub outbound: HashMap<Arc<str>, Stack>,
    pub components: Components,
}

fn reuse<C: PartialEq + Clone, T: Clone>(
    prev: Option<&(C, T)>,
    cfg: &C,
    make: impl FnOnce() -> T,
) -> (C, T) {
    match prev {
        Some((c, t)) if c == cfg => (c.clone(), t.clone()),
        _ => (cfg.clone(), make()),
    }
}

pub fn build(
    config: Arc<ProxyConfig>,
    prev: Option<&Components>,
    env: &Env,
) -> Result<Snapshot, String> {
    let empty = Components::default();
    let prev = prev.unwrap_or(&empty);
    let m = &env.metrics;
    let mut comps = Components::default();

    // Tracing: one exporter per endpoint; sampling applies to new traces only.
    let sink = match &config.tracing.otlp_endpoint {
        Some(ep) if ep.starts_with("http://") => {
            let key = (config.tracing.clone(), config.service.clone());
            let e = match &prev.exporter {
                Some((t, s, sink)) if *t == key.0 && *s == key.1 => {
                    (t.clone(), s.clone(), sink.clone())
                }
                _ => {
                    let sink = otlp::start_exporter(
                        ep,
                        &config.service,
                        &config.namespace,
                        env.clients.http1.clone(),
                        env.otlp_flush_interval,
                        m.spans_exported.clone(),
                        m.spans_dropped.clone(),
                    );
                    (key.0, key.1, sink)
                }
            };
            let sink = e.2.clone();
            comps.exporter = Some(e);
            Some(sink)
        }
        Some(ep) => {
            tracing::warn!(endpoint = %ep, "OTLP export over https is not supported; spans are not exported");
            None
        }
        None => None,
    };
    let ratio = config.tracing.sampling_ratio;

    // Identity headers: the namespace key, kept across reloads while its file is the same.
    comps.identity_key = config.identity.as_ref().map(|id| {
        reuse(prev.identity_key.as_ref(), &id.key_file, || {
            IdentityKey::start(&id.key_file)
        })
    });
    let identity_key = comps.identity_key.as_ref().map(|(_, k)| k.clone());
    // Kept across reloads while what the certificate depends on is the same: a new allowed
    // set (the graph changed) must not make a new key and ask again.
    comps.workload_cert = config.mtls.as_ref().map(|m| {
        let key = weir_crds::proxy::MtlsConfig {
            inbound: Default::default(),
            authorization: Default::default(),
            ..m.clone()
        };
        reuse(prev.workload_cert.as_ref(), &key, || {
            crate::mtls::CertManager::start(m)
        })
    });
    let sign_for = |dep: &str| {
        config
            .identity
            .as_ref()
            .is_some_and(|id| id.sign_for.iter().any(|d| d == dep))
    };

    // Outbound, one stack per dependency.
    let mut outbound = HashMap::new();
    for o in &config.outbound {
        let name = o.name.as_str();
        let old = prev.deps.get(name).cloned().unwrap_or_default();
        let breaker = o.circuit_breaker.as_ref().map(|c| {
            reuse(old.breaker.as_ref(), c, || {
                Breaker::new(
                    name,
                    c,
                    m.breaker_metrics(name),
                    m.rejections("outbound", name, Reason::CircuitOpen),
                )
            })
        });
        let budget = o.retry.as_ref().map(|r| {
            reuse(old.budget.as_ref(), &r.budget, || {
                RetryBudget::new(&r.budget)
            })
        });
        let bulkhead = o.bulkhead.as_ref().map(|b| {
            reuse(
                old.bulkhead.as_ref(),
                &(b.max_concurrent, b.max_queue),
                || {
                    Limiter::new(
                        b.max_concurrent,
                        b.max_queue,
                        Reason::BulkheadFull,
                        m.rejections("outbound", name, Reason::BulkheadFull),
                    )
                },
            )
        });
        let balancing = balance_key(o).map(|(key, implicit)| {
            reuse(old.balancing.as_ref(), &key, || {
                let balancer = Balancer::observed(
                    Settings::from_config(&o.load_balancer, &o.outlier_detection),
                    Some(m.endpoints.observer(name)),
                );
                let discovery = key.resolve.as_ref().map(|(dns, every)| {
                    Arc::new(Discovery::start(
                        name,
                        dns.clone(),
                        Duration::from_millis(*every),
                        balancer.clone(),
                        env.resolver.clone(),
                    ))
                });
                Balancing {
                    balancer,
                    implicit,
                    _discovery: discovery,
                }
            })
        });
        // Fixed addresses (`weir up`) are the set as given; a reload may change them.
        if let (Some(e), Some((_, b))) = (&o.endpoints, &balancing)
            && e.dns.is_none()
        {
            b.balancer.update(&e.addresses);
        }
        let st = DepState {
            breaker,
            budget,
            bulkhead,
            balancing,
        };
        let target = Target::upstream(&o.upstream, o.protocol)
            .map_err(|e| format!("outbound[{name}].upstream: {e}"))?;
        // Mutual TLS to the dependency's sidecar, which must be the identity declared.
        let mtls = match (&o.peer_identity, &comps.workload_cert) {
            (Some(id), Some((_, certs))) => {
                let expected = weir_identity::WorkloadId::parse(id)
                    .map_err(|e| format!("outbound[{name}].peerIdentity: {e}"))?;
                Some(crate::mtls::MtlsConnector::new(
                    certs.clone(),
                    expected,
                    o.protocol == weir_crds::proxy::WireProtocol::Http2,
                    m.mtls.clone(),
                ))
            }
            _ => None,
        };
        let forward = match &st.balancing {
            Some((_, b)) => tower::util::Either::Left(
                Balanced::new(
                    &env.clients,
                    target,
                    Reason::UpstreamConnect,
                    b.balancer.clone(),
                    b.implicit,
                )
                .with_mtls(mtls),
            ),
            None => tower::util::Either::Right(
                Forward::new(&env.clients, target, Reason::UpstreamConnect).with_mtls(mtls),
            ),
        };
        let svc = ServiceBuilder::new()
            // Outermost: gRPC callers get every answer below as a gRPC status.
            .layer(GrpcLayer)
            .layer(StreamIdleLayer::new(
                Duration::from_millis(o.stream_idle_timeout_ms),
                m.rejections("outbound", name, Reason::StreamIdleTimeout),
            ))
            .layer(SignIdentityLayer {
                key: identity_key.clone(),
                sign: sign_for(name),
            })
            .layer(TraceLayer::new(TraceSettings {
                sampling_ratio: ratio,
                sink: sink.clone(),
                kind: otlp::SPAN_KIND_CLIENT,
                dependency: Some(name.into()),
            }))
            .layer(ObserveLayer::new(Observer {
                direction: "outbound",
                dependency: name.into(),
                metrics: m.request_metrics("outbound", name),
                grpc: m.grpc_metrics("outbound", name),
                access_log: env.access_log,
            }))
            .layer(GuardLayer::new(name, |r| m.rejections("outbound", name, r)))
            .option_layer(
                o.fallback
                    .as_ref()
                    .map(|f| FallbackLayer::new(FallbackResponse::from_config(f))),
            )
            .layer(TimeoutLayer::new(Duration::from_millis(o.timeout_ms)))
            .option_layer(
                st.bulkhead
                    .as_ref()
                    .map(|(_, l)| ConcurrencyLimitLayer::new(l.clone())),
            )
            .option_layer(o.retry.as_ref().zip(st.budget.as_ref()).map(|(r, (_, b))| {
                RetryLayer::new(RetryPolicy::new(r, b.clone(), m.retry_metrics(name)))
            }))
            .option_layer(
                st.breaker
                    .as_ref()
                    .map(|(_, b)| BreakerLayer::new(b.clone())),
            )
            // Only the breaker needs to see a timed-out attempt; without one the outer timeout
            // alone answers 504 (one timer per request instead of two).
            .option_layer(st.breaker.as_ref().map(|_| AttemptTimeoutLayer))
            .service(forward);
        outbound.insert(Arc::<str>::from(name), BoxCloneSyncService::new(svc));
        comps.deps.insert(name.to_string(), st);
    }
    // Edge mode: JWT, CORS, per-client limits and routes to the outbound stacks above.
    let edge = match &config.edge {
        None => None,
        Some(e) => {
            let keys = match &prev.jwt_keys {
                Some((c, k)) if *c == e.jwt => (c.clone(), k.clone()),
                _ => (
                    e.jwt.clone(),
                    KeySource::start(&e.jwt, env.clients.http1.clone())?,
                ),
            };
            comps.jwt_keys = Some(keys.clone());
            comps.client_limiter = e.rate_limit.as_ref().map(|rl| {
                reuse(prev.client_limiter.as_ref(), rl, || {
                    Arc::new(ClientLimiter::new(
                        rl.requests_per_second,
                        rl.burst,
                        rl.max_clients,
                    ))
                })
            });
            let counters = EdgeCounters {
                auth: m.edge.auth(),
                unauthorized: m.rejections("inbound", "", Reason::Unauthorized),
                no_route: m.rejections("inbound", "", Reason::NoRoute),
                client_rate_limited: m.rejections("inbound", "", Reason::ClientRateLimited),
                cors_rejected: m.rejections("inbound", "", Reason::CorsRejected),
                bad_path: m.rejections("inbound", "", Reason::BadRequest),
            };
            Some(EdgeLayer::new(Edge::new(
                &config.service,
                e,
                keys.1,
                comps.client_limiter.as_ref().map(|(_, l)| l.clone()),
                |dep| outbound.get(dep).cloned(),
                counters,
            )?))
        }
    };
    let identity_removed = Arc::new(m.edge.identity_removed());

    // Inbound.
    let ib = &config.inbound;
    comps.limiter = ib.max_concurrent.map(|max| {
        reuse(prev.limiter.as_ref(), &(max, ib.max_queue), || {
            Limiter::new(
                max,
                ib.max_queue,
                Reason::ConcurrencyLimit,
                m.rejections("inbound", "", Reason::ConcurrencyLimit),
            )
        })
    });
    comps.bucket = ib.rate_limit.as_ref().map(|rl| {
        reuse(prev.bucket.as_ref(), rl, || {
            TokenBucket::new(
                rl.requests_per_second,
                rl.burst,
                m.rejections("inbound", "", Reason::RateLimited),
            )
        })
    });
    let inbound = ServiceBuilder::new()
        .layer(GrpcLayer)
        .layer(StreamIdleLayer::new(
            Duration::from_millis(ib.stream_idle_timeout_ms),
            m.rejections("inbound", "", Reason::StreamIdleTimeout),
        ))
        .layer(TraceLayer::new(TraceSettings {
            sampling_ratio: ratio,
            sink: sink.clone(),
            kind: otlp::SPAN_KIND_SERVER,
            dependency: None,
        }))
        .layer(ObserveLayer::new(Observer {
            direction: "inbound",
            dependency: "".into(),
            metrics: m.request_metrics("inbound", ""),
            grpc: m.grpc_metrics("inbound", ""),
            access_log: env.access_log,
        }))
        .layer(GuardLayer::new("inbound", |r| {
            m.rejections("inbound", "", r)
        }))
        .option_layer(
            config
                .mtls
                .as_ref()
                .map(|c| AuthorizeLayer::new(Arc::new(Authorizer::new(c, m)))),
        )
        .layer(HeaderNamesLayer::new(
            ib.underscore_headers,
            m.header_name_counters(),
        ))
        .layer(InboundIdentityLayer {
            edge: config.edge.is_some(),
            key: identity_key.clone(),
            removed: identity_removed,
        })
        .option_layer(
            comps
                .bucket
                .as_ref()
                .map(|(_, b)| RateLimitLayer::new(b.clone())),
        )
        .layer(BodyLimitLayer::new(ib.max_body_bytes))
        .option_layer(edge)
        .layer(TimeoutLayer::new(Duration::from_millis(ib.timeout_ms)))
        .option_layer(
            comps
                .limiter
                .as_ref()
                .map(|(_, l)| ConcurrencyLimitLayer::new(l.clone())),
        )
        .service(Forward::new(
            &env.clients,
            Target::app(ib.app, ib.app_protocol),
            Reason::AppConnect,
        ));
    let inbound = BoxCloneSyncService::new(inbound);

    Ok(Snapshot {
        config,
        inbound,
        outbound,
        components: comps,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use weir_crds::proxy::EndpointsConfig;

    fn outbound(upstream: &str, endpoints: Option<EndpointsConfig>) -> OutboundConfig {
        serde_json::from_value(serde_json::json!({
            "name": "d", "listen": "127.0.0.1:1", "upstream": upstream, "timeoutMs": 1000,
            "endpoints": endpoints,
        }))
        .unwrap()
    }

    #[test]
    fn what_a_dependency_is_balanced_over() {
        // An address literal is one endpoint: called as before, no balancer.
        assert!(balance_key(&outbound("http://10.0.0.1:8080", None)).is_none());
        assert!(balance_key(&outbound("https://[fd00::1]/v1", None)).is_none());
        // A URL's name is resolved, and balanced only when it has several addresses.
        let (k, implicit) = balance_key(&outbound("https://api.example.com/v1", None)).unwrap();
        assert!(implicit);
        assert_eq!(
            k.resolve,
            Some((
                "api.example.com:443".into(),
                weir_crds::proxy::DEFAULT_REFRESH_MS
            ))
        );
        let (k, _) = balance_key(&outbound("http://api.example.com", None)).unwrap();
        assert_eq!(k.resolve.unwrap().0, "api.example.com:80");
        // Configured endpoints: balanced whatever their number; fixed ones are not resolved.
        let dns = EndpointsConfig {
            dns: Some("users-weir-endpoints.shop.svc.cluster.local.:15001".into()),
            addresses: vec![],
            refresh_ms: 2000,
        };
        let (k, implicit) = balance_key(&outbound(
            "http://users.shop.svc.cluster.local:80",
            Some(dns),
        ))
        .unwrap();
        assert!(!implicit);
        assert_eq!(
            k.resolve,
            Some((
                "users-weir-endpoints.shop.svc.cluster.local.:15001".into(),
                2000
            ))
        );
        let fixed = EndpointsConfig {
            dns: None,
            addresses: vec!["127.0.0.1:2".parse().unwrap()],
            refresh_ms: 5000,
        };
        let (k, implicit) = balance_key(&outbound("http://127.0.0.1:2", Some(fixed))).unwrap();
        assert!(!implicit);
        assert_eq!(k.resolve, None);
    }
}
