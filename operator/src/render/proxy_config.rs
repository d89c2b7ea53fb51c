//! The sidecar config of a Microservice: spec defaults resolved, durations in milliseconds,
//! addresses concrete. Where things listen is a [`Placement`], so the same function serves a
//! pod (fixed ports, Service DNS names) and `weir up` (free loopback ports).

use super::RenderError;
use std::net::SocketAddr;
use weir_crds::duration;
use weir_crds::microservice::{
    ClientKey, Dependency, EdgeSpec, LIVENESS_PATH, MicroserviceSpec, ProbeKind, READINESS_PATH,
    endpoints_service_name,
};
use weir_crds::policy::{
    CircuitBreakerPolicy, GrpcCode, GrpcPolicy, LoadBalancerAlgorithm, LoadBalancerPolicy,
    OutlierDetectionPolicy, RetryPolicy,
};
use weir_crds::proxy::{
    AdminConfig, AnonymousRuleConfig, BalanceAlgorithm, BulkheadConfig, CircuitBreakerConfig,
    ClientRateLimitConfig, CorsConfig, DEFAULT_REFRESH_MS, EdgeConfig, EdgeRouteConfig,
    EndpointsConfig, FailureClassConfig, FallbackConfig, IdentityConfig, InboundConfig, JwtConfig,
    LoadBalancerConfig, OutboundConfig, OutlierDetectionConfig, ProxyConfig, RateLimitConfig,
    RetryBudgetConfig, RetryConfig, TracingConfig, UnderscoreHeaders, WireProtocol,
};

/// Where the edge's JWKS Secret key is mounted in the sidecar (`spec.edge.jwt.jwksSecretRef`).
pub const EDGE_JWKS_FILE: &str = "/etc/weir/edge/jwks/jwks.json";
/// Where the edge's HS256 Secret key is mounted in the sidecar (`spec.edge.jwt.hmacSecretRef`).
pub const EDGE_HMAC_FILE: &str = "/etc/weir/edge/hmac/secret";
/// The namespace's identity key: Secret `weir-identity`, key `key`, mounted (optional) into
/// every sidecar. Without it no sidecar trusts or signs `x-user-*` headers.
pub const IDENTITY_SECRET: &str = "weir-identity";
pub const IDENTITY_SECRET_KEY: &str = "key";
pub const IDENTITY_KEY_FILE: &str = "/etc/weir/identity/key";

/// Where a sidecar's listeners are and where its dependencies are reached.
pub trait Placement {
    fn inbound(&self) -> SocketAddr;
    fn admin(&self) -> SocketAddr;
    fn app(&self, port: u16) -> SocketAddr;
    /// Local listener of the `index`-th dependency.
    fn outbound(&self, index: usize) -> SocketAddr;
    /// Base URL of another Microservice, as seen from this one.
    fn microservice_url(&self, namespace: &str, name: &str) -> String;
    /// Where the endpoints of another Microservice are found, for per-request balancing;
    /// `None`: calls go to `microservice_url` alone.
    fn microservice_endpoints(&self, _namespace: &str, _name: &str) -> Option<EndpointsConfig> {
        None
    }
    /// File holding the namespace's identity key, if this placement has one.
    fn identity_key_file(&self) -> Option<String> {
        None
    }
}

/// Placement inside a pod: fixed ports, Services by their cluster DNS names.
#[derive(Debug, Clone)]
pub struct PodPlacement {
    pub cluster_domain: String,
}

impl Placement for PodPlacement {
    fn inbound(&self) -> SocketAddr {
        SocketAddr::from(([0, 0, 0, 0], weir_crds::proxy::INBOUND_PORT))
    }
    fn admin(&self) -> SocketAddr {
        SocketAddr::from(([0, 0, 0, 0], weir_crds::proxy::ADMIN_PORT))
    }
    fn app(&self, port: u16) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], port))
    }
    fn outbound(&self, index: usize) -> SocketAddr {
        SocketAddr::from((
            [127, 0, 0, 1],
            weir_crds::proxy::OUTBOUND_BASE_PORT + index as u16,
        ))
    }
    fn microservice_url(&self, namespace: &str, name: &str) -> String {
        format!("http://{name}.{namespace}.svc.{}:80", self.cluster_domain)
    }
    /// The A records of a headless Service are its ready pods: the sidecar's periodic
    /// resolution of `<name>-weir-endpoints` is the discovery, with no API-server watch per pod
    /// and nothing of the operator's on the request path. The port is each pod's inbound
    /// sidecar. The name is absolute (a trailing dot): a pod's `ndots:5` would otherwise try
    /// each search domain first, three failed queries every resolution.
    fn microservice_endpoints(&self, namespace: &str, name: &str) -> Option<EndpointsConfig> {
        Some(EndpointsConfig {
            dns: Some(format!(
                "{}.{namespace}.svc.{}.:{}",
                endpoints_service_name(name),
                self.cluster_domain,
                weir_crds::proxy::INBOUND_PORT
            )),
            addresses: vec![],
            refresh_ms: DEFAULT_REFRESH_MS,
        })
    }
    fn identity_key_file(&self) -> Option<String> {
        Some(IDENTITY_KEY_FILE.into())
    }
}

fn ms(field: &str, value: &str) -> Result<u64, RenderError> {
    duration::parse(value)
        .map(|d| d.as_millis() as u64)
        .map_err(|e| RenderError::Field {
            field: field.to_string(),
            message: e.to_string(),
        })
}

/// Builds the sidecar config of `spec`. Errors name the field (`spec.dependencies[0].timeout`).
pub fn build(
    name: &str,
    namespace: &str,
    spec: &MicroserviceSpec,
    placement: &dyn Placement,
) -> Result<ProxyConfig, RenderError> {
    let port = u16::try_from(spec.port)
        .ok()
        .filter(|p| *p > 0)
        .ok_or_else(|| RenderError::Field {
            field: "spec.port".into(),
            message: "must be between 1 and 65535".into(),
        })?;
    let inbound = &spec.inbound;
    let outbound = spec
        .dependencies
        .iter()
        .enumerate()
        .map(|(i, d)| outbound(i, d, namespace, placement))
        .collect::<Result<Vec<_>, _>>()?;
    let tracing = spec
        .tracing
        .as_ref()
        .map(|t| TracingConfig {
            otlp_endpoint: t.otlp_endpoint.clone(),
            sampling_ratio: t.sampling_ratio,
        })
        .unwrap_or_default();
    let has_app = !spec.image.is_empty();
    let edge = spec.edge.as_ref().map(|e| edge(e, has_app)).transpose()?;
    // Calls to the namespace's Microservices carry signed identity; external URLs never do.
    let identity = placement
        .identity_key_file()
        .map(|key_file| IdentityConfig {
            key_file,
            sign_for: spec
                .dependencies
                .iter()
                .filter(|d| d.microservice.is_some())
                .map(|d| d.name.clone())
                .collect(),
        });
    Ok(ProxyConfig {
        service: name.to_string(),
        namespace: namespace.to_string(),
        inbound: InboundConfig {
            listen: placement.inbound(),
            app: placement.app(port),
            timeout_ms: ms("spec.inbound.timeout", &inbound.timeout)?,
            stream_idle_timeout_ms: ms(
                "spec.inbound.streamIdleTimeout",
                &inbound.stream_idle_timeout,
            )?,
            max_concurrent: inbound.max_concurrent,
            max_queue: inbound.max_queue.unwrap_or(0),
            rate_limit: inbound.rate_limit.as_ref().map(|r| RateLimitConfig {
                requests_per_second: f64::from(r.requests_per_second),
                burst: r.burst.unwrap_or(r.requests_per_second),
            }),
            max_body_bytes: inbound.max_body_bytes,
            liveness_path: has_app
                .then(|| http_path(spec.probes.liveness.kind(LIVENESS_PATH)))
                .flatten(),
            readiness_path: has_app
                .then(|| http_path(spec.probes.readiness.kind(READINESS_PATH)))
                .flatten(),
            liveness_grpc_service: has_app
                .then(|| grpc_service(spec.probes.liveness.kind(LIVENESS_PATH)))
                .flatten(),
            readiness_grpc_service: has_app
                .then(|| grpc_service(spec.probes.readiness.kind(READINESS_PATH)))
                .flatten(),
            underscore_headers: UnderscoreHeaders::default(),
            app_protocol: spec.protocol.wire(),
        },
        admin: AdminConfig {
            listen: placement.admin(),
        },
        outbound,
        tracing,
        shutdown_grace_ms: (spec.termination_grace_period_seconds.max(1) as u64) * 1000,
        messaging: None,
        edge,
        identity,
        mtls: None,
    })
}

fn edge(e: &EdgeSpec, has_app: bool) -> Result<EdgeConfig, RenderError> {
    let j = &e.jwt;
    let methods = |m: &[weir_crds::microservice::HttpMethod]| {
        m.iter().map(|m| m.as_str().to_string()).collect::<Vec<_>>()
    };
    Ok(EdgeConfig {
        jwt: JwtConfig {
            issuer: j.issuer.clone(),
            audiences: j.audiences.clone(),
            jwks: j.jwks.clone(),
            jwks_file: j.jwks_secret_ref.as_ref().map(|_| EDGE_JWKS_FILE.into()),
            jwks_uri: j.jwks_uri.clone(),
            jwks_refresh_ms: ms(
                "spec.edge.jwt.jwksRefreshInterval",
                &j.jwks_refresh_interval,
            )?,
            hmac_secret_file: j.hmac_secret_ref.as_ref().map(|_| EDGE_HMAC_FILE.into()),
            leeway_ms: ms("spec.edge.jwt.leeway", &j.leeway)?,
            user_id_claim: j.user_id_claim.clone(),
            role_claim: j.role_claim.clone(),
            forward_token: j.forward_token,
            max_token_bytes: j.max_token_bytes,
        },
        anonymous: e
            .anonymous
            .iter()
            .map(|a| AnonymousRuleConfig {
                path_prefix: a.path_prefix.clone(),
                methods: methods(&a.methods),
            })
            .collect(),
        routes: e
            .routes
            .iter()
            .map(|r| EdgeRouteConfig {
                path_prefix: r.path_prefix.clone(),
                dependency: r.dependency.clone(),
                strip_prefix: r.strip_prefix,
            })
            .collect(),
        cors: e
            .cors
            .as_ref()
            .map(|c| -> Result<CorsConfig, RenderError> {
                Ok(CorsConfig {
                    allow_origins: c.allow_origins.clone(),
                    allow_methods: methods(&c.allow_methods),
                    allow_headers: c.allow_headers.clone(),
                    expose_headers: c.expose_headers.clone(),
                    max_age_secs: ms("spec.edge.cors.maxAge", &c.max_age)? / 1000,
                    allow_credentials: c.allow_credentials,
                })
            })
            .transpose()?,
        rate_limit: e.rate_limit.as_ref().map(|r| ClientRateLimitConfig {
            requests_per_second: f64::from(r.requests_per_second),
            burst: r.burst.unwrap_or(r.requests_per_second),
            key: match r.key {
                ClientKey::User => "user".into(),
                ClientKey::Ip => "ip".into(),
            },
            max_clients: r.max_clients,
        }),
        app: has_app,
        xff_num_trusted_hops: e.xff_num_trusted_hops,
    })
}

fn outbound(
    i: usize,
    d: &Dependency,
    namespace: &str,
    placement: &dyn Placement,
) -> Result<OutboundConfig, RenderError> {
    let at = |f: &str| format!("spec.dependencies[{i}].{f}");
    // Another Microservice is reached through its inbound sidecar, which speaks HTTP/2 whatever
    // the app behind it speaks; an external URL is spoken to as declared.
    let (upstream, protocol, endpoints) = match (&d.microservice, &d.url) {
        (Some(target), None) => (
            placement.microservice_url(namespace, target),
            WireProtocol::Http2,
            placement.microservice_endpoints(namespace, target),
        ),
        (None, Some(url)) => (
            url.trim_end_matches('/').to_string(),
            d.protocol.unwrap_or_default().wire(),
            None,
        ),
        _ => {
            return Err(RenderError::Field {
                field: format!("spec.dependencies[{i}]"),
                message: "set exactly one of microservice or url".into(),
            });
        }
    };
    Ok(OutboundConfig {
        name: d.name.clone(),
        listen: placement.outbound(i),
        upstream,
        protocol,
        timeout_ms: ms(&at("timeout"), &d.timeout)?,
        stream_idle_timeout_ms: ms(&at("streamIdleTimeout"), &d.stream_idle_timeout)?,
        retry: d
            .retry
            .as_ref()
            .map(|r| retry(r, d.grpc.as_ref(), &at))
            .transpose()?,
        circuit_breaker: d
            .circuit_breaker
            .as_ref()
            .map(|b| breaker(b, d.grpc.as_ref(), &at))
            .transpose()?,
        bulkhead: d.bulkhead.as_ref().map(|b| BulkheadConfig {
            max_concurrent: b.max_concurrent,
            max_queue: b.max_queue,
        }),
        fallback: d.fallback.as_ref().map(|f| FallbackConfig {
            status: f.status,
            body: f.body.clone(),
            content_type: f.content_type.clone(),
            grpc_status: f.grpc_status.map(GrpcCode::code),
            grpc_message: f.grpc_message.clone(),
        }),
        endpoints,
        load_balancer: load_balancer(d.load_balancer.as_ref(), &at)?,
        outlier_detection: outlier_detection(d.outlier_detection.as_ref(), &at)?,
        peer_identity: None,
    })
}

/// The balancer of a dependency; the block's defaults (the contract's) when left out.
fn load_balancer(
    lb: Option<&LoadBalancerPolicy>,
    at: &dyn Fn(&str) -> String,
) -> Result<LoadBalancerConfig, RenderError> {
    let Some(lb) = lb else {
        return Ok(LoadBalancerConfig::default());
    };
    Ok(LoadBalancerConfig {
        algorithm: match lb.algorithm {
            LoadBalancerAlgorithm::PeakEwma => BalanceAlgorithm::PeakEwma,
            LoadBalancerAlgorithm::RoundRobin => BalanceAlgorithm::RoundRobin,
        },
        decay_ms: ms(&at("loadBalancer.decay"), &lb.decay)?,
        slow_start_ms: ms(&at("loadBalancer.slowStart"), &lb.slow_start)?,
        ..LoadBalancerConfig::default()
    })
}

/// The outlier ejection of a dependency; the block's defaults (the contract's) when left out.
fn outlier_detection(
    od: Option<&OutlierDetectionPolicy>,
    at: &dyn Fn(&str) -> String,
) -> Result<OutlierDetectionConfig, RenderError> {
    let Some(od) = od else {
        return Ok(OutlierDetectionConfig::default());
    };
    Ok(OutlierDetectionConfig {
        consecutive_failures: od.consecutive_failures,
        base_ejection_ms: ms(
            &at("outlierDetection.baseEjectionTime"),
            &od.base_ejection_time,
        )?,
        max_ejection_ms: ms(
            &at("outlierDetection.maxEjectionTime"),
            &od.max_ejection_time,
        )?,
        max_ejected_percent: od.max_ejection_percent,
    })
}

/// The codes of `given`, or `default` when left out.
fn codes(given: Option<&[GrpcCode]>, default: &[u16]) -> Vec<u16> {
    given.map_or_else(
        || default.to_vec(),
        |g| g.iter().map(|c| c.code()).collect(),
    )
}

fn retry(
    r: &RetryPolicy,
    grpc: Option<&GrpcPolicy>,
    at: &dyn Fn(&str) -> String,
) -> Result<RetryConfig, RenderError> {
    Ok(RetryConfig {
        attempts: r.attempts,
        backoff_base_ms: ms(&at("retry.backoff.base"), &r.backoff.base)?,
        backoff_max_ms: ms(&at("retry.backoff.max"), &r.backoff.max)?,
        retry_non_idempotent: r.retry_non_idempotent,
        budget: RetryBudgetConfig {
            ratio: f64::from(r.budget.percent) / 100.0,
            min_per_second: r.budget.min_per_second,
            ttl_ms: ms(&at("retry.budget.ttl"), &r.budget.ttl)?,
        },
        grpc_statuses: codes(
            grpc.and_then(|g| g.retry_on.as_deref()),
            &weir_crds::proxy::DEFAULT_GRPC_RETRY_STATUSES,
        ),
    })
}

fn breaker(
    b: &CircuitBreakerPolicy,
    grpc: Option<&GrpcPolicy>,
    at: &dyn Fn(&str) -> String,
) -> Result<CircuitBreakerConfig, RenderError> {
    let window = ms(&at("circuitBreaker.rollingWindow"), &b.rolling_window)?;
    let buckets = b.buckets.max(1);
    // The window is a whole number of equal buckets: round it down to one.
    let bucket_ms = (window / u64::from(buckets)).max(1);
    Ok(CircuitBreakerConfig {
        error_threshold_percentage: b.error_threshold_percentage,
        volume_threshold: b.volume_threshold,
        rolling_window_ms: bucket_ms * u64::from(buckets),
        buckets,
        reset_timeout_ms: ms(&at("circuitBreaker.resetTimeout"), &b.reset_timeout)?,
        failure_on: FailureClassConfig {
            status_5xx: b.failure_on.status5xx,
            connect_errors: b.failure_on.connect_errors,
            timeouts: b.failure_on.timeouts,
            grpc_statuses: codes(
                grpc.and_then(|g| g.failure_on.as_deref()),
                &weir_crds::proxy::DEFAULT_GRPC_FAILURE_STATUSES,
            ),
        },
    })
}

/// The env var through which the app reaches a dependency: `users` → `USERS_URL`.
pub fn dependency_env_name(dependency: &str) -> String {
    let mut s: String = dependency
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() {
                c.to_ascii_uppercase()
            } else {
                '_'
            }
        })
        .collect();
    s.push_str("_URL");
    s
}

fn http_path(kind: ProbeKind<'_>) -> Option<String> {
    match kind {
        ProbeKind::Http(p) => Some(p.to_string()),
        ProbeKind::Grpc(_) => None,
    }
}

fn grpc_service(kind: ProbeKind<'_>) -> Option<String> {
    match kind {
        ProbeKind::Grpc(s) => Some(s.to_string()),
        ProbeKind::Http(_) => None,
    }
}
