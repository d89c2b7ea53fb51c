//! The sidecar's config contract: what the operator (and `weir render`, `weir up`) writes into the
//! `<name>-weir-proxy` ConfigMap as `proxy.json`, and what `weir-proxy` reads at start and on change.
//!
//! Every value here is resolved: no defaults left to apply, durations in milliseconds, addresses
//! concrete. The operator owns the defaults (in the CRD types); the proxy only validates.

use serde::{Deserialize, Serialize};
use std::net::SocketAddr;

/// The ConfigMap key holding the config, and the file name under the mount path.
pub const CONFIG_KEY: &str = "proxy.json";
/// Where the ConfigMap is mounted in the sidecar container.
pub const CONFIG_MOUNT_PATH: &str = "/etc/weir";
/// Default port of the inbound listener (the Service's target port).
pub const INBOUND_PORT: u16 = 15001;
/// Default port of the admin listener (`/metrics`, `/healthz`, `/readyz`, `/config`).
pub const ADMIN_PORT: u16 = 15090;
/// First local port handed to dependencies; dependency `i` listens on `OUTBOUND_BASE_PORT + i`.
pub const OUTBOUND_BASE_PORT: u16 = 15100;

/// The whole of `proxy.json`: one sidecar's listeners, dependencies, messaging and edge, all
/// resolved, so the sidecar has nothing to look up or default.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ProxyConfig {
    /// The Microservice this sidecar serves (used in metrics, traces and logs).
    pub service: String,
    /// The Microservice's namespace (in metrics, traces, logs and the `source` of its events).
    pub namespace: String,
    /// The listener in front of the app, and the limits that protect it.
    pub inbound: InboundConfig,
    /// The listener for probes, metrics, the config in force and the publish endpoint.
    pub admin: AdminConfig,
    /// One local listener per dependency, in the order of the spec's `dependencies`.
    #[serde(default)]
    pub outbound: Vec<OutboundConfig>,
    /// Span export; left out: nothing exported.
    #[serde(default)]
    pub tracing: TracingConfig,
    /// How long in-flight requests may take to finish after SIGTERM.
    pub shutdown_grace_ms: u64,
    /// Queues and consumers (pub/sub bridge); absent when the service neither publishes nor consumes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub messaging: Option<MessagingConfig>,
    /// Edge mode (the gateway): JWT validation, identity headers, routes, CORS, per-client limits.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub edge: Option<EdgeConfig>,
    /// The namespace's identity key: which `x-user-*` headers this sidecar may trust and sign.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub identity: Option<IdentityConfig>,
    /// The workload's own certificate, for mutual TLS between sidecars; absent: none.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mtls: Option<MtlsConfig>,
}

/// The inbound listener: every request for the app passes it, so its limits are the app's.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct InboundConfig {
    /// Where the pod's traffic arrives.
    pub listen: SocketAddr,
    /// The app container's port on loopback.
    pub app: SocketAddr,
    /// Deadline (ms) for the app to answer a request; past it the caller gets 504.
    pub timeout_ms: u64,
    /// A request whose bodies carry nothing for this long (ms) is ended.
    #[serde(default = "default_stream_idle_ms")]
    pub stream_idle_timeout_ms: u64,
    /// Concurrent requests passed to the app; `None` means no limit.
    #[serde(default)]
    pub max_concurrent: Option<u32>,
    /// Requests waiting for a slot when `max_concurrent` is reached; beyond it: 503.
    #[serde(default)]
    pub max_queue: u32,
    /// One token bucket for all inbound requests; beyond it: 429. `None` means no limit.
    #[serde(default)]
    pub rate_limit: Option<RateLimitConfig>,
    /// Largest request body accepted; beyond it: 413.
    pub max_body_bytes: u64,
    /// The app's liveness path: the admin listener serves `/app-health/liveness` by calling it,
    /// so the kubelet probes the app through the sidecar and the app may listen on loopback only.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub liveness_path: Option<String>,
    /// The app's readiness path, served as `/app-health/readiness` on the admin listener.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub readiness_path: Option<String>,
    /// Probe liveness with the gRPC health protocol instead of a path: `/app-health/liveness`
    /// calls `grpc.health.v1.Health/Check` for this service (empty: the whole server) over
    /// HTTP/2 and is healthy when the app answers `SERVING`. Not with `liveness_path`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub liveness_grpc_service: Option<String>,
    /// As `liveness_grpc_service`, for `/app-health/readiness`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub readiness_grpc_service: Option<String>,
    /// What the inbound listener does with request header names containing `_`.
    #[serde(default, skip_serializing_if = "UnderscoreHeaders::is_default")]
    pub underscore_headers: UnderscoreHeaders,
    /// How the sidecar speaks to the app (`spec.protocol`): HTTP/1.1, or HTTP/2 with prior
    /// knowledge for `http2` and `grpc` apps. Callers may use either on the listener.
    #[serde(default, skip_serializing_if = "WireProtocol::is_default")]
    pub app_protocol: WireProtocol,
}

/// The HTTP version spoken on one hop the sidecar opens. Listeners always accept both (the
/// version is read off the connection's first bytes); this says what the sidecar itself sends.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum WireProtocol {
    /// HTTP/1.1 with keep-alive.
    #[default]
    Http1,
    /// HTTP/2: cleartext with prior knowledge (h2c) for `http://`, ALPN `h2` for `https://`.
    /// Calls from many app connections share a few multiplexed connections.
    Http2,
}

impl WireProtocol {
    /// Whether this is the default (`Http1`), which is then left out of `proxy.json`.
    pub(crate) fn is_default(&self) -> bool {
        *self == WireProtocol::default()
    }

    /// The name used in `proxy.json` and in messages.
    pub fn as_str(&self) -> &'static str {
        match self {
            WireProtocol::Http1 => "http1",
            WireProtocol::Http2 => "http2",
        }
    }
}

/// Request header names containing `_`, as they reach the app.
///
/// CGI, Rack, PHP and WSGI hand headers to the app as `HTTP_X_USER_ID`, mapping `-` to `_`: there
/// `x_user_id: admin` and the signed `x-user-id` are the same variable, and whichever comes last
/// wins. A name that normalises (`_` to `-`, any case) to a reserved one (`x-user-*`,
/// `x-weir-*`) is therefore removed whatever this says (refused with `Reject`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum UnderscoreHeaders {
    /// Passed on, except look-alikes of reserved names (removed).
    Allow,
    /// Removed before the request is forwarded; the request goes on without them.
    #[default]
    Drop,
    /// The request is refused with 400 `underscore-header`.
    Reject,
}

impl UnderscoreHeaders {
    /// Whether this is the default (`Drop`), which is then left out of `proxy.json`.
    pub(crate) fn is_default(&self) -> bool {
        *self == UnderscoreHeaders::default()
    }
}

/// A token bucket shared by all inbound requests (`spec.inbound.rateLimit`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct RateLimitConfig {
    /// Tokens added per second.
    pub requests_per_second: f64,
    /// Bucket size: the largest burst admitted at once.
    pub burst: u32,
}

/// The admin listener, apart from the inbound one so that probes and scrapes pass none of the
/// app's limits.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct AdminConfig {
    /// Where it listens; must differ from the inbound listener.
    pub listen: SocketAddr,
}

/// One dependency: a local listener the app calls (`<NAME>_URL`) and the policy applied on the way.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct OutboundConfig {
    /// The dependency's name: the app's `<NAME>_URL` and the `dependency` label of metrics;
    /// unique in the config.
    pub name: String,
    /// Local address the app calls, e.g. `127.0.0.1:15100`.
    pub listen: SocketAddr,
    /// Where calls go, e.g. `http://users.shop.svc.cluster.local:80` or an external URL.
    pub upstream: String,
    /// What the sidecar speaks to `upstream`: HTTP/2 to another Weir sidecar (whatever the
    /// app speaks), the dependency's declared `protocol` to an external URL.
    #[serde(default, skip_serializing_if = "WireProtocol::is_default")]
    pub protocol: WireProtocol,
    /// Deadline (ms) of a whole call, retries included; past it the app gets 504.
    pub timeout_ms: u64,
    /// A call whose bodies carry nothing for this long (ms) is ended.
    #[serde(default = "default_stream_idle_ms")]
    pub stream_idle_timeout_ms: u64,
    /// Retries of failed calls; `None`: each call is sent once.
    #[serde(default)]
    pub retry: Option<RetryConfig>,
    /// Stops calling an upstream that keeps failing; `None`: no breaker.
    #[serde(default)]
    pub circuit_breaker: Option<CircuitBreakerConfig>,
    /// Caps concurrent calls, so one slow upstream cannot take all of the app's workers;
    /// `None`: no cap.
    #[serde(default)]
    pub bulkhead: Option<BulkheadConfig>,
    /// Served when the breaker or the bulkhead refuses a call; `None`: 503.
    #[serde(default)]
    pub fallback: Option<FallbackConfig>,
    /// Where the dependency's endpoints are found, so calls are balanced per request across
    /// them. Left out: the `upstream`'s own host is resolved the same way, so an external URL
    /// whose name has several addresses is balanced too; a single address is called as before.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub endpoints: Option<EndpointsConfig>,
    /// How a call picks one of several endpoints.
    #[serde(default, skip_serializing_if = "LoadBalancerConfig::is_default")]
    pub load_balancer: LoadBalancerConfig,
    /// When an endpoint is left out of the choice for failing, and for how long.
    #[serde(default, skip_serializing_if = "OutlierDetectionConfig::is_default")]
    pub outlier_detection: OutlierDetectionConfig,
    /// The identity the dependency's sidecar must present (`spiffe://…`): set, every call is
    /// mutual TLS with this workload's certificate (needs `mtls`); left out, plaintext (or
    /// HTTPS as the `upstream` says).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub peer_identity: Option<String>,
}

/// Where a dependency's endpoints come from. When discovery has no answer yet (or never had
/// one), calls go to `upstream` by name, as without discovery; a failed resolution keeps the
/// last answer.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct EndpointsConfig {
    /// `host:port` whose A/AAAA records are the endpoints, resolved every `refresh_ms`: the
    /// dependency's headless `<name>-weir-endpoints` Service (its ready pods) and the sidecar's
    /// inbound port.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dns: Option<String>,
    /// Fixed endpoints (`weir up`: each replica's inbound listener). Not with `dns`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub addresses: Vec<SocketAddr>,
    /// How often `dns` is resolved (ms).
    #[serde(default = "default_refresh_ms")]
    pub refresh_ms: u64,
}

/// Default interval between two resolutions of a dependency's endpoints.
pub const DEFAULT_REFRESH_MS: u64 = 5_000;

fn default_refresh_ms() -> u64 {
    DEFAULT_REFRESH_MS
}

/// How a call picks an endpoint (`dependencies[].loadBalancer`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct LoadBalancerConfig {
    /// The choice itself.
    #[serde(default)]
    pub algorithm: BalanceAlgorithm,
    /// How fast the latency estimate forgets a slow answer (ms, the EWMA's time constant).
    #[serde(default = "default_decay_ms")]
    pub decay_ms: u64,
    /// How long a new endpoint takes to get its full share (ms; 0: at once).
    #[serde(default = "default_slow_start_ms")]
    pub slow_start_ms: u64,
    /// The latency an endpoint is assumed to have before its first answer, when no peer has
    /// been measured either (ms).
    #[serde(default = "default_rtt_ms")]
    pub default_rtt_ms: u64,
}

impl Default for LoadBalancerConfig {
    fn default() -> Self {
        LoadBalancerConfig {
            algorithm: BalanceAlgorithm::default(),
            decay_ms: default_decay_ms(),
            slow_start_ms: default_slow_start_ms(),
            default_rtt_ms: default_rtt_ms(),
        }
    }
}

impl LoadBalancerConfig {
    fn is_default(&self) -> bool {
        *self == Self::default()
    }
}

fn default_decay_ms() -> u64 {
    10_000
}
fn default_slow_start_ms() -> u64 {
    10_000
}
fn default_rtt_ms() -> u64 {
    30
}

/// How one of several endpoints is chosen for a call.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum BalanceAlgorithm {
    /// Power of two choices over peak-EWMA latency weighted by calls in flight (Linkerd's).
    #[default]
    PeakEwma,
    /// Each endpoint in turn, blind to latency and load (what a Service's virtual IP gives,
    /// per connection rather than per call).
    RoundRobin,
}

/// Outlier ejection per endpoint (`dependencies[].outlierDetection`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct OutlierDetectionConfig {
    /// Gateway failures in a row (connect error, reset, 502/503/504, gRPC `UNAVAILABLE`) that
    /// eject an endpoint.
    #[serde(default = "default_consecutive_failures")]
    pub consecutive_failures: u32,
    /// The first ejection's length (ms); each next one doubles it.
    #[serde(default = "default_base_ejection_ms")]
    pub base_ejection_ms: u64,
    /// The longest ejection (ms).
    #[serde(default = "default_max_ejection_ms")]
    pub max_ejection_ms: u64,
    /// The largest share of endpoints ejected at once, in percent (0: never eject); at least
    /// one endpoint always stays.
    #[serde(default = "default_max_ejected_percent")]
    pub max_ejected_percent: u32,
}

impl Default for OutlierDetectionConfig {
    fn default() -> Self {
        OutlierDetectionConfig {
            consecutive_failures: default_consecutive_failures(),
            base_ejection_ms: default_base_ejection_ms(),
            max_ejection_ms: default_max_ejection_ms(),
            max_ejected_percent: default_max_ejected_percent(),
        }
    }
}

impl OutlierDetectionConfig {
    fn is_default(&self) -> bool {
        *self == Self::default()
    }
}

fn default_consecutive_failures() -> u32 {
    5
}
fn default_base_ejection_ms() -> u64 {
    30_000
}
fn default_max_ejection_ms() -> u64 {
    300_000
}
fn default_max_ejected_percent() -> u32 {
    50
}

/// Retries of one dependency's failed calls: exponential backoff with full jitter, bounded by a
/// budget.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct RetryConfig {
    /// Total attempts including the first (so 3 = one call and up to two retries).
    pub attempts: u32,
    /// Longest wait (ms) before the first retry; it doubles at each retry after.
    pub backoff_base_ms: u64,
    /// Cap (ms) on the longest wait before any retry.
    pub backoff_max_ms: u64,
    /// Retry POST/PATCH too (only when the upstream is known to be idempotent).
    #[serde(default)]
    pub retry_non_idempotent: bool,
    /// Keeps retries in proportion to traffic, so they cannot multiply the load on a failing
    /// upstream.
    pub budget: RetryBudgetConfig,
    /// gRPC statuses retried (any method), when answered before any message.
    #[serde(default = "default_grpc_retries")]
    pub grpc_statuses: Vec<u16>,
}

/// Retries allowed = `ratio` × requests seen in the last `ttl`, plus `min_per_second` × ttl.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct RetryBudgetConfig {
    /// Retries allowed per request seen, 0.0 to 1.0 (the spec's `percent` / 100).
    pub ratio: f64,
    /// Retries per second allowed whatever the traffic, so a quiet dependency is still retried.
    pub min_per_second: u32,
    /// Length (ms) of the sliding window the budget counts over.
    pub ttl_ms: u64,
}

/// A circuit breaker over a rolling window: while open it refuses calls at once (503, or the
/// fallback) rather than let them wait on a failing upstream.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct CircuitBreakerConfig {
    /// Opens when failures / calls × 100 exceeds this (strictly), with at least `volume_threshold` calls.
    pub error_threshold_percentage: u32,
    /// Calls the window must hold before the breaker may open, so that a few failures in little
    /// traffic do not open it.
    pub volume_threshold: u32,
    /// Length (ms) of the window calls are counted over; a multiple of `buckets`.
    pub rolling_window_ms: u64,
    /// Equal slices of the window; the oldest rolls out as time passes.
    pub buckets: u32,
    /// Time open before one trial call is let through (half-open).
    pub reset_timeout_ms: u64,
    /// What counts as a failure.
    pub failure_on: FailureClassConfig,
}

/// Which outcomes of a call the breaker counts as failures.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct FailureClassConfig {
    /// A 5xx answer from the upstream.
    pub status_5xx: bool,
    /// The upstream could not be reached, or broke the connection.
    pub connect_errors: bool,
    /// An attempt that ran out of time.
    pub timeouts: bool,
    /// gRPC statuses (`grpc-status`, in the headers or the trailers) that count as failures.
    #[serde(default = "default_grpc_failures")]
    pub grpc_statuses: Vec<u16>,
}

/// The gRPC statuses a breaker counts as failures unless told otherwise: `UNKNOWN`,
/// `DEADLINE_EXCEEDED`, `INTERNAL`, `UNAVAILABLE`, `DATA_LOSS` (the server or the path to it is
/// unwell). What a healthy server answers a bad call with (`NOT_FOUND`, `INVALID_ARGUMENT`, …)
/// is not its failure.
pub const DEFAULT_GRPC_FAILURE_STATUSES: [u16; 5] = [2, 4, 13, 14, 15];
/// The gRPC statuses retried unless told otherwise: `UNAVAILABLE`, the one status that says
/// the call was not processed.
pub const DEFAULT_GRPC_RETRY_STATUSES: [u16; 1] = [14];

/// Five minutes: what a config written before the field existed gets.
fn default_stream_idle_ms() -> u64 {
    300_000
}

/// The names of the gRPC statuses, by number (`UNAVAILABLE` is 14), as resources spell them.
pub const GRPC_CODE_NAMES: [&str; 17] = [
    "OK",
    "CANCELLED",
    "UNKNOWN",
    "INVALID_ARGUMENT",
    "DEADLINE_EXCEEDED",
    "NOT_FOUND",
    "ALREADY_EXISTS",
    "PERMISSION_DENIED",
    "RESOURCE_EXHAUSTED",
    "FAILED_PRECONDITION",
    "ABORTED",
    "OUT_OF_RANGE",
    "UNIMPLEMENTED",
    "INTERNAL",
    "UNAVAILABLE",
    "DATA_LOSS",
    "UNAUTHENTICATED",
];

/// The name of gRPC status `code`, as metrics label it; a number beyond the specification is
/// `UNKNOWN`, as gRPC clients read it.
pub fn grpc_code_name(code: u16) -> &'static str {
    GRPC_CODE_NAMES
        .get(usize::from(code))
        .copied()
        .unwrap_or("UNKNOWN")
}

fn default_grpc_failures() -> Vec<u16> {
    DEFAULT_GRPC_FAILURE_STATUSES.to_vec()
}

fn default_grpc_retries() -> Vec<u16> {
    DEFAULT_GRPC_RETRY_STATUSES.to_vec()
}

/// A cap on concurrent calls to one dependency; a call finding it and the queue full is refused
/// at once (503, or the fallback).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct BulkheadConfig {
    /// Calls in flight at once; at least 1.
    pub max_concurrent: u32,
    /// Calls waiting for a slot, first come first served.
    pub max_queue: u32,
}

/// The response served instead of the upstream's when the breaker is open or the bulkhead is full.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct FallbackConfig {
    /// HTTP status, 200 to 599.
    pub status: u16,
    /// Response body, as given.
    pub body: String,
    /// The `Content-Type` of `body`.
    pub content_type: String,
    /// For gRPC calls: this `grpc-status` (Trailers-Only) instead of the HTTP answer; `None`:
    /// gRPC calls get the refusal as a status.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub grpc_status: Option<u16>,
    /// The `grpc-message` sent with `grpc_status`.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub grpc_message: String,
}

/// Span export; the default exports nothing.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct TracingConfig {
    /// OTLP/HTTP endpoint (e.g. `http://otel-collector:4318`); `None` disables export.
    #[serde(default)]
    pub otlp_endpoint: Option<String>,
    /// Fraction of new traces sampled, 0.0 to 1.0.
    #[serde(default)]
    pub sampling_ratio: f64,
}

/// The pub/sub bridge: what the app may publish and which queues are pushed to it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct MessagingConfig {
    /// Broker URL, e.g. `nats://nats.weir-system:4222`.
    pub broker_url: String,
    /// Broker kind: `nats`, `rabbitmq` or `redis`.
    pub broker_kind: String,
    /// File holding broker credentials, if any (mounted from the Broker's Secret).
    #[serde(default)]
    pub credentials_file: Option<String>,
    /// Queues the app may publish to (`POST /v1/publish/<queue>`).
    #[serde(default)]
    pub publishes: Vec<PublishConfig>,
    /// Queues whose events the sidecar pushes to the app.
    #[serde(default)]
    pub consumes: Vec<ConsumeConfig>,
}

/// A Queue the app publishes to, with where its events go on the broker.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct PublishConfig {
    /// The Queue resource name (the app posts to `/v1/publish/<queue>`).
    pub queue: String,
    /// Stream (or queue) name on the broker.
    pub stream: String,
    /// Subject the event is published on.
    pub subject: String,
    /// JSON Schema (draft 2020-12) every event must satisfy; `None` accepts any JSON.
    #[serde(default)]
    pub schema: Option<serde_json::Value>,
    /// CloudEvents `type` given to events published here.
    pub event_type: String,
    /// Redis: how long a published event id is remembered to drop a repeat (JetStream and
    /// RabbitMQ: unused). Absent: 2 minutes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub duplicate_window_ms: Option<u64>,
    /// Redis: the stream is trimmed to about this many entries at each publish (`MAXLEN ~`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_messages: Option<u64>,
    /// Redis: entries older than this are trimmed at each publish (`MINID ~`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_age_ms: Option<u64>,
}

/// A Queue whose events the sidecar pushes to the app, one POST per event.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ConsumeConfig {
    /// The Queue resource name (in logs and metrics; the `type` and `source` of plain messages).
    pub queue: String,
    /// Stream (or queue) name on the broker the events are read from.
    pub stream: String,
    /// Durable consumer name on the broker.
    pub consumer: String,
    /// Path on the app that receives each event (POST).
    pub path: String,
    /// Events pushed to the app and not yet answered, at most.
    pub max_in_flight: u32,
    /// Deliveries of one event before it is dead-lettered; at least 1.
    pub max_deliveries: u32,
    /// Time (ms) the broker waits for the sidecar to settle an event before it delivers it again.
    pub ack_wait_ms: u64,
    /// Delay (ms) before the redelivery after failed delivery `n` is the `n`-th entry (the last
    /// repeats); empty: redelivered without delay.
    #[serde(default)]
    pub backoff_ms: Vec<u64>,
    /// Stream that receives dead letters.
    pub dead_letter_stream: String,
    /// Subject dead letters are published on; empty with `deadLetterStream` when the Queue's
    /// dead letters are disabled (a failed event is then dropped).
    pub dead_letter_subject: String,
    /// JSON Schema (draft 2020-12) each event must satisfy, else it is dead-lettered; `None`
    /// accepts any JSON.
    #[serde(default)]
    pub schema: Option<serde_json::Value>,
    /// How long a processed event id is remembered for deduplication.
    pub dedup_window_ms: u64,
    /// The Queue's CloudEvents `type` (its `eventType`, else its name): the `ce-type` given to a
    /// plain message, one another producer wrote without a CloudEvents envelope. Absent: the
    /// queue's name.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub event_type: Option<String>,
    /// RabbitMQ: the limits of the consumer queue, set when the sidecar declares it (the
    /// operator declares the same); empty elsewhere.
    #[serde(default, skip_serializing_if = "QueueLimits::is_empty")]
    pub limits: QueueLimits,
}

/// A RabbitMQ consumer queue's limits, from the Queue's `maxMessages`, `maxBytes`, `maxAge`
/// and `replicas`. Each consuming Microservice has its own queue, so each holds at most this
/// much that it has not consumed yet.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct QueueLimits {
    /// Messages held at most (`x-max-length`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_messages: Option<u64>,
    /// Bytes of message bodies held at most (`x-max-length-bytes`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_bytes: Option<u64>,
    /// Age (ms) past which a message is dropped (`x-message-ttl`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_age_ms: Option<u64>,
    /// Quorum queue's initial group size; `None` leaves RabbitMQ's default (the cluster's size
    /// up to its configured maximum).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub replicas: Option<u32>,
}

impl QueueLimits {
    /// Whether no limit is set; the field is then left out of `proxy.json`.
    pub fn is_empty(&self) -> bool {
        *self == Self::default()
    }

    /// The queue arguments these limits become (one mapping for the operator and the
    /// sidecar, which must declare identical arguments): `x-max-length`,
    /// `x-max-length-bytes`, `x-message-ttl`, `x-quorum-initial-group-size`.
    pub fn amqp_arguments(&self) -> Vec<(&'static str, i64)> {
        let as_i64 = |v: u64| i64::try_from(v).unwrap_or(i64::MAX);
        [
            ("x-max-length", self.max_messages.map(as_i64)),
            ("x-max-length-bytes", self.max_bytes.map(as_i64)),
            ("x-message-ttl", self.max_age_ms.map(as_i64)),
            ("x-quorum-initial-group-size", self.replicas.map(i64::from)),
        ]
        .into_iter()
        .filter_map(|(k, v)| v.map(|v| (k, v)))
        .collect()
    }
}

/// Edge mode: every inbound request needs a valid JWT unless an `anonymous` rule admits it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct EdgeConfig {
    /// How tokens are validated and which claims become identity headers.
    pub jwt: JwtConfig,
    /// Requests that need no token (a token, if sent, is still validated).
    #[serde(default)]
    pub anonymous: Vec<AnonymousRuleConfig>,
    /// Path prefixes sent to a dependency's outbound stack instead of the app.
    #[serde(default)]
    pub routes: Vec<EdgeRouteConfig>,
    /// CORS for browser clients; `None`: no `Access-Control-*` headers are added.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cors: Option<CorsConfig>,
    /// A token bucket per client; `None`: no per-client limit.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rate_limit: Option<ClientRateLimitConfig>,
    /// False for a pure gateway: no app container, and a path no route matches gets 404.
    #[serde(default = "yes")]
    pub app: bool,
    /// Proxies in front of the edge that append to `X-Forwarded-For`; 0 trusts no such header
    /// and takes the client IP from the connection.
    #[serde(default)]
    pub xff_num_trusted_hops: u32,
}

fn yes() -> bool {
    true
}

/// How tokens are validated. Exactly one key source is set; the key decides the algorithm.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct JwtConfig {
    /// The `iss` claim must equal this.
    pub issuer: String,
    /// The `aud` claim must contain one of these.
    pub audiences: Vec<String>,
    /// A JWKS document (RS256 RSA keys, ES256 P-256 keys), inline.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub jwks: Option<String>,
    /// A file holding a JWKS document (mounted from a Secret); re-read every `jwksRefreshMs`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub jwks_file: Option<String>,
    /// An `http(s)://` URL serving a JWKS document, fetched every `jwksRefreshMs`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub jwks_uri: Option<String>,
    /// How often (ms) `jwksFile` is re-read and `jwksUri` fetched: at least 1000, default
    /// 300000 (5 minutes).
    #[serde(default = "default_jwks_refresh_ms")]
    pub jwks_refresh_ms: u64,
    /// A file holding the HS256 shared secret (mounted from a Secret).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hmac_secret_file: Option<String>,
    /// Clock skew tolerated on `exp` and `nbf`.
    pub leeway_ms: u64,
    /// Claim copied into `x-user-id` (a dotted path reaches into objects).
    pub user_id_claim: String,
    /// Claim copied into `x-user-role` (a list is joined with `,`).
    pub role_claim: String,
    /// Keep the `Authorization` header on the forwarded request.
    #[serde(default)]
    pub forward_token: bool,
    /// Longer tokens are refused before any parsing.
    pub max_token_bytes: u32,
}

fn default_jwks_refresh_ms() -> u64 {
    300_000
}

/// Requests admitted without a token: a path prefix, and the methods it applies to.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct AnonymousRuleConfig {
    /// Matches this path and everything below it (`/catalog` matches `/catalog/3`, not `/catalogs`).
    pub path_prefix: String,
    /// Upper-case methods; empty means every method.
    #[serde(default)]
    pub methods: Vec<String>,
}

/// A path prefix the edge sends to a dependency rather than the app (a gateway's routes).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct EdgeRouteConfig {
    /// Matches this path and everything below it; unique among the routes.
    pub path_prefix: String,
    /// Name of an entry of `outbound`.
    pub dependency: String,
    /// Remove the prefix before forwarding (`/orders/3` arrives as `/3`).
    #[serde(default)]
    pub strip_prefix: bool,
}

/// CORS: the edge answers preflights itself and adds `Access-Control-*` headers for allowed
/// origins.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct CorsConfig {
    /// Exact origins (`https://shop.example.com`), or `*` when credentials are not allowed.
    pub allow_origins: Vec<String>,
    /// Upper-case methods allowed cross-origin (`Access-Control-Allow-Methods`).
    pub allow_methods: Vec<String>,
    /// Request headers allowed cross-origin (`Access-Control-Allow-Headers`).
    #[serde(default)]
    pub allow_headers: Vec<String>,
    /// Response headers a page's script may read (`Access-Control-Expose-Headers`).
    #[serde(default)]
    pub expose_headers: Vec<String>,
    /// How long (seconds) a browser may cache a preflight's answer (`Access-Control-Max-Age`).
    pub max_age_secs: u64,
    /// Cookies and `Authorization` allowed cross-origin; `*` is then refused as an origin.
    #[serde(default)]
    pub allow_credentials: bool,
}

/// One token bucket per client, in a map of at most `maxClients` entries.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ClientRateLimitConfig {
    /// Tokens added per second to each client's bucket.
    pub requests_per_second: f64,
    /// Size of each client's bucket: the largest burst one client is admitted at once.
    pub burst: u32,
    /// `user`: the user id when authenticated, else the client IP; `ip`: always the client IP.
    pub key: String,
    /// Buckets kept at most, so that a flood of distinct clients cannot exhaust memory; when
    /// full, refilled buckets go first, then the least recently used.
    pub max_clients: u32,
}

/// The namespace's identity key (the `weir-identity` Secret). Inbound `x-user-*` headers are kept
/// only with a valid `x-weir-identity` signature made with it; calls to the listed dependencies
/// that carry `x-user-*` headers are signed with it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct IdentityConfig {
    /// File holding the key; while it is missing nothing is trusted or signed.
    pub key_file: String,
    /// Dependencies (other Microservices of the namespace) whose calls are signed.
    #[serde(default)]
    pub sign_for: Vec<String>,
}

/// The workload's certificate: who it is, whom it trusts, and where it asks for the certificate.
/// The sidecar makes its own key (it never leaves the process), asks the issuer with the pod's
/// token, and renews at `renewAtPercent` of the lifetime it got; it is not ready without a
/// valid certificate.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct MtlsConfig {
    /// This workload's identity: `spiffe://<trust-domain>/ns/<namespace>/ms/<name>`.
    pub identity: String,
    /// The trust anchors (PEM): a peer's chain must end at one of them.
    pub trust_bundle_file: String,
    /// The issuer's endpoint, `https://host:port`.
    pub issuer_url: String,
    /// The token the sidecar proves itself with (the pod's projected ServiceAccount token),
    /// read anew for each request: the kubelet rotates it.
    pub token_file: String,
    /// Renew once this share of the certificate's lifetime has passed.
    #[serde(default = "default_renew_at_percent")]
    pub renew_at_percent: u8,
    /// What the inbound listener does with plaintext from outside the pod (loopback plaintext,
    /// the pod's own containers, is always admitted; the admin listener is always plaintext).
    #[serde(default, skip_serializing_if = "InboundMtlsMode::is_default")]
    pub inbound: InboundMtlsMode,
    /// Which mutual-TLS callers the inbound listener admits.
    #[serde(default)]
    pub authorization: AuthorizationConfig,
}

/// Plaintext from the pod network on the inbound listener.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum InboundMtlsMode {
    /// Refused: 403 `mtls-required` (gRPC `UNAUTHENTICATED`).
    #[default]
    Strict,
    /// Admitted and counted (`transport="plaintext"`): the migration path, and the edge's
    /// listener, where outside traffic enters.
    Permissive,
}

impl InboundMtlsMode {
    pub(crate) fn is_default(&self) -> bool {
        *self == InboundMtlsMode::default()
    }
}

/// Who may call over mutual TLS: the callers the declared graph allows, and `allow`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct AuthorizationConfig {
    /// What happens to a caller not in `allow`.
    #[serde(default)]
    pub mode: AuthorizationMode,
    /// The callers admitted: `<namespace>/<name>` (a Microservice), `<namespace>/saga/<name>`
    /// (a Saga's coordinator) or `<namespace>/*` (every workload of the namespace).
    #[serde(default)]
    pub allow: Vec<String>,
}

/// What the inbound listener does with a mutual-TLS caller outside `authorization.allow`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum AuthorizationMode {
    /// Refused: 403 `caller-not-allowed` (gRPC `PERMISSION_DENIED`), counted and logged.
    #[default]
    Enforce,
    /// Admitted, and counted and logged as it would have been refused.
    Audit,
    /// Every verified caller admitted.
    Open,
}

/// Whether `entry` is an `authorization.allow` entry: `<ns>/<name>`, `<ns>/saga/<name>` or
/// `<ns>/*`, each part a DNS label.
pub fn is_allow_entry(entry: &str) -> bool {
    let label = |s: &str| {
        !s.is_empty()
            && s.len() <= 63
            && s.bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
            && !s.starts_with('-')
            && !s.ends_with('-')
    };
    let parts: Vec<&str> = entry.split('/').collect();
    match parts.as_slice() {
        [ns, "*"] => label(ns),
        [ns, name] => label(ns) && label(name),
        [ns, "saga", name] => label(ns) && label(name),
        _ => false,
    }
}

fn default_renew_at_percent() -> u8 {
    70
}

pub use crate::config_error::ConfigError;

impl ProxyConfig {
    /// Parses and validates a config file's contents; the error names the offending field.
    pub fn from_json(text: &str) -> Result<Self, ConfigError> {
        let cfg: ProxyConfig = crate::config_error::parse_json(text)?;
        cfg.validate()?;
        Ok(cfg)
    }

    /// Checks what serde cannot: ranges, uniqueness, URLs, cross-field rules.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let err = |field: String, message: &str| ConfigError {
            field,
            message: message.to_string(),
        };
        if self.service.is_empty() {
            return Err(err("service".into(), "must not be empty"));
        }
        if self.inbound.timeout_ms == 0 {
            return Err(err("inbound.timeoutMs".into(), "must be greater than 0"));
        }
        if self.inbound.stream_idle_timeout_ms == 0 {
            return Err(err(
                "inbound.streamIdleTimeoutMs".into(),
                "must be greater than 0",
            ));
        }
        for (which, path, grpc) in [
            (
                "liveness",
                &self.inbound.liveness_path,
                &self.inbound.liveness_grpc_service,
            ),
            (
                "readiness",
                &self.inbound.readiness_path,
                &self.inbound.readiness_grpc_service,
            ),
        ] {
            if path.is_some() && grpc.is_some() {
                return Err(err(
                    format!("inbound.{which}GrpcService"),
                    &format!("not with inbound.{which}Path: a probe is one or the other"),
                ));
            }
        }
        if self.inbound.max_concurrent == Some(0) {
            return Err(err(
                "inbound.maxConcurrent".into(),
                "must be greater than 0 when set",
            ));
        }
        if let Some(rl) = &self.inbound.rate_limit {
            if !(rl.requests_per_second.is_finite() && rl.requests_per_second > 0.0) {
                return Err(err(
                    "inbound.rateLimit.requestsPerSecond".into(),
                    "must be a positive number",
                ));
            }
            if rl.burst == 0 {
                return Err(err("inbound.rateLimit.burst".into(), "must be at least 1"));
            }
        }
        if !(0.0..=1.0).contains(&self.tracing.sampling_ratio) {
            return Err(err(
                "tracing.samplingRatio".into(),
                "must be between 0 and 1",
            ));
        }
        if let Some(ep) = &self.tracing.otlp_endpoint
            && !(ep.starts_with("http://") || ep.starts_with("https://"))
        {
            return Err(err(
                "tracing.otlpEndpoint".into(),
                "must be an http:// or https:// URL",
            ));
        }
        let mut names = std::collections::BTreeSet::new();
        let mut listens =
            std::collections::BTreeSet::from([self.inbound.listen, self.admin.listen]);
        if self.inbound.listen == self.admin.listen {
            return Err(err(
                "admin.listen".into(),
                "must differ from inbound.listen",
            ));
        }
        for (i, o) in self.outbound.iter().enumerate() {
            let at = |f: &str| format!("outbound[{i}].{f}");
            if o.name.is_empty() {
                return Err(err(at("name"), "must not be empty"));
            }
            if !names.insert(o.name.as_str()) {
                return Err(err(
                    at("name"),
                    &format!("duplicate dependency name {:?}", o.name),
                ));
            }
            if let Some(id) = &o.peer_identity {
                if self.mtls.is_none() {
                    return Err(err(
                        at("peerIdentity"),
                        "needs mtls: the sidecar has no certificate to call with",
                    ));
                }
                if !id.starts_with("spiffe://") {
                    return Err(err(
                        at("peerIdentity"),
                        "must be a SPIFFE ID: spiffe://<trust-domain>/ns/<namespace>/ms/<name>",
                    ));
                }
                if o.upstream.starts_with("https://") {
                    return Err(err(
                        at("peerIdentity"),
                        "is for a Weir sidecar's http:// upstream; an https:// URL is verified by its own name",
                    ));
                }
            }
            if !listens.insert(o.listen) {
                return Err(err(
                    at("listen"),
                    &format!("address {} is already used by another listener", o.listen),
                ));
            }
            if !(o.upstream.starts_with("http://") || o.upstream.starts_with("https://")) {
                return Err(err(at("upstream"), "must be an http:// or https:// URL"));
            }
            if o.timeout_ms == 0 {
                return Err(err(at("timeoutMs"), "must be greater than 0"));
            }
            if o.stream_idle_timeout_ms == 0 {
                return Err(err(at("streamIdleTimeoutMs"), "must be greater than 0"));
            }
            if let Some(r) = &o.retry {
                if r.attempts == 0 {
                    return Err(err(at("retry.attempts"), "must be at least 1"));
                }
                if r.backoff_max_ms < r.backoff_base_ms {
                    return Err(err(
                        at("retry.backoffMaxMs"),
                        "must be at least backoffBaseMs",
                    ));
                }
                if !(r.budget.ratio.is_finite() && (0.0..=1.0).contains(&r.budget.ratio)) {
                    return Err(err(at("retry.budget.ratio"), "must be between 0 and 1"));
                }
                if r.budget.ttl_ms == 0 {
                    return Err(err(at("retry.budget.ttlMs"), "must be greater than 0"));
                }
            }
            if let Some(b) = &o.circuit_breaker {
                if !(1..=100).contains(&b.error_threshold_percentage) {
                    return Err(err(
                        at("circuitBreaker.errorThresholdPercentage"),
                        "must be between 1 and 100",
                    ));
                }
                if b.buckets == 0 {
                    return Err(err(at("circuitBreaker.buckets"), "must be at least 1"));
                }
                if b.rolling_window_ms == 0 || b.rolling_window_ms % u64::from(b.buckets) != 0 {
                    return Err(err(
                        at("circuitBreaker.rollingWindowMs"),
                        "must be a positive multiple of buckets",
                    ));
                }
                if b.reset_timeout_ms == 0 {
                    return Err(err(
                        at("circuitBreaker.resetTimeoutMs"),
                        "must be greater than 0",
                    ));
                }
            }
            if let Some(b) = &o.bulkhead
                && b.max_concurrent == 0
            {
                return Err(err(at("bulkhead.maxConcurrent"), "must be at least 1"));
            }
            if let Some(e) = &o.endpoints {
                match (&e.dns, e.addresses.is_empty()) {
                    (Some(_), false) => {
                        return Err(err(
                            at("endpoints.addresses"),
                            "not with endpoints.dns: endpoints are resolved or fixed",
                        ));
                    }
                    (None, true) => {
                        return Err(err(
                            at("endpoints"),
                            "set endpoints.dns or endpoints.addresses",
                        ));
                    }
                    (Some(d), true) => {
                        let ok = d.rsplit_once(':').is_some_and(|(h, p)| {
                            !h.is_empty() && p.parse::<u16>().is_ok_and(|p| p > 0)
                        });
                        if !ok {
                            return Err(err(at("endpoints.dns"), "must be host:port"));
                        }
                    }
                    (None, false) => {}
                }
                if e.refresh_ms == 0 {
                    return Err(err(at("endpoints.refreshMs"), "must be greater than 0"));
                }
            }
            if o.load_balancer.decay_ms == 0 {
                return Err(err(at("loadBalancer.decayMs"), "must be greater than 0"));
            }
            let od = &o.outlier_detection;
            if od.consecutive_failures == 0 {
                return Err(err(
                    at("outlierDetection.consecutiveFailures"),
                    "must be at least 1",
                ));
            }
            if od.max_ejected_percent > 100 {
                return Err(err(
                    at("outlierDetection.maxEjectedPercent"),
                    "must be between 0 and 100",
                ));
            }
            if od.base_ejection_ms == 0 || od.max_ejection_ms < od.base_ejection_ms {
                return Err(err(
                    at("outlierDetection.maxEjectionMs"),
                    "must be at least baseEjectionMs, which must be greater than 0",
                ));
            }
            if let Some(f) = &o.fallback
                && !(200..=599).contains(&f.status)
            {
                return Err(err(
                    at("fallback.status"),
                    "must be an HTTP status between 200 and 599",
                ));
            }
        }
        if let Some(e) = &self.edge {
            e.validate(&self.outbound)?;
        }
        if let Some(m) = &self.mtls {
            if !m.identity.starts_with("spiffe://") {
                return Err(err(
                    "mtls.identity".into(),
                    "must be a SPIFFE ID: spiffe://<trust-domain>/ns/<namespace>/ms/<name>",
                ));
            }
            for (field, value) in [
                ("mtls.trustBundleFile", &m.trust_bundle_file),
                ("mtls.tokenFile", &m.token_file),
            ] {
                if value.is_empty() {
                    return Err(err(field.into(), "must not be empty"));
                }
            }
            if !m.issuer_url.starts_with("https://") {
                return Err(err("mtls.issuerUrl".into(), "must be https://host:port"));
            }
            if !(10..=90).contains(&m.renew_at_percent) {
                return Err(err(
                    "mtls.renewAtPercent".into(),
                    "must be between 10 and 90",
                ));
            }
            for (i, a) in m.authorization.allow.iter().enumerate() {
                if !is_allow_entry(a) {
                    return Err(err(
                        format!("mtls.authorization.allow[{i}]"),
                        &format!(
                            "{a:?} must be <namespace>/<name>, <namespace>/saga/<name> or <namespace>/*"
                        ),
                    ));
                }
            }
        }
        if let Some(id) = &self.identity {
            if id.key_file.is_empty() {
                return Err(err("identity.keyFile".into(), "must not be empty"));
            }
            for (i, d) in id.sign_for.iter().enumerate() {
                if !names.contains(d.as_str()) {
                    return Err(err(
                        format!("identity.signFor[{i}]"),
                        &format!("no dependency named {d:?}"),
                    ));
                }
            }
        }
        Ok(())
    }
}

fn valid_path_prefix(p: &str) -> bool {
    p.starts_with('/') && !p.contains(['?', '#', ' ']) && (p == "/" || !p.ends_with('/'))
}

fn valid_method(m: &str) -> bool {
    !m.is_empty() && m.bytes().all(|b| b.is_ascii_uppercase())
}

fn valid_header_name(h: &str) -> bool {
    !h.is_empty()
        && h.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b))
}

impl EdgeConfig {
    fn validate(&self, outbound: &[OutboundConfig]) -> Result<(), ConfigError> {
        let err = |field: String, message: String| ConfigError { field, message };
        let j = &self.jwt;
        if j.issuer.is_empty() {
            return Err(err("edge.jwt.issuer".into(), "must not be empty".into()));
        }
        if j.audiences.is_empty() || j.audiences.iter().any(String::is_empty) {
            return Err(err(
                "edge.jwt.audiences".into(),
                "needs at least one non-empty audience".into(),
            ));
        }
        let sources = [
            j.jwks.is_some(),
            j.jwks_file.is_some(),
            j.jwks_uri.is_some(),
            j.hmac_secret_file.is_some(),
        ];
        if sources.iter().filter(|s| **s).count() != 1 {
            return Err(err(
                "edge.jwt".into(),
                "set exactly one of jwks, jwksFile, jwksUri or hmacSecretFile".into(),
            ));
        }
        if let Some(u) = &j.jwks_uri
            && !(u.starts_with("http://") || u.starts_with("https://"))
        {
            return Err(err(
                "edge.jwt.jwksUri".into(),
                "must be an http:// or https:// URL".into(),
            ));
        }
        if j.jwks_refresh_ms < 1000 {
            return Err(err(
                "edge.jwt.jwksRefreshMs".into(),
                "must be at least 1000".into(),
            ));
        }
        if j.leeway_ms > 600_000 {
            return Err(err(
                "edge.jwt.leewayMs".into(),
                "must be at most 600000 (10 minutes)".into(),
            ));
        }
        if j.user_id_claim.is_empty() {
            return Err(err(
                "edge.jwt.userIdClaim".into(),
                "must not be empty".into(),
            ));
        }
        if j.role_claim.is_empty() {
            return Err(err("edge.jwt.roleClaim".into(), "must not be empty".into()));
        }
        if !(64..=65536).contains(&j.max_token_bytes) {
            return Err(err(
                "edge.jwt.maxTokenBytes".into(),
                "must be between 64 and 65536".into(),
            ));
        }
        for (i, a) in self.anonymous.iter().enumerate() {
            if !valid_path_prefix(&a.path_prefix) {
                return Err(err(
                    format!("edge.anonymous[{i}].pathPrefix"),
                    "must start with / and not end with / (unless it is /)".into(),
                ));
            }
            if let Some(m) = a.methods.iter().find(|m| !valid_method(m)) {
                return Err(err(
                    format!("edge.anonymous[{i}].methods"),
                    format!("{m:?} is not an upper-case HTTP method"),
                ));
            }
        }
        let mut prefixes = std::collections::BTreeSet::new();
        for (i, r) in self.routes.iter().enumerate() {
            if !valid_path_prefix(&r.path_prefix) {
                return Err(err(
                    format!("edge.routes[{i}].pathPrefix"),
                    "must start with / and not end with / (unless it is /)".into(),
                ));
            }
            if !prefixes.insert(r.path_prefix.as_str()) {
                return Err(err(
                    format!("edge.routes[{i}].pathPrefix"),
                    format!("duplicate prefix {:?}", r.path_prefix),
                ));
            }
            if !outbound.iter().any(|o| o.name == r.dependency) {
                return Err(err(
                    format!("edge.routes[{i}].dependency"),
                    format!("no dependency named {:?}", r.dependency),
                ));
            }
        }
        if !self.app && self.routes.is_empty() {
            return Err(err(
                "edge.routes".into(),
                "an edge without an app needs at least one route".into(),
            ));
        }
        if let Some(c) = &self.cors {
            if c.allow_origins.is_empty() {
                return Err(err(
                    "edge.cors.allowOrigins".into(),
                    "needs at least one origin".into(),
                ));
            }
            for o in &c.allow_origins {
                let ok = o == "*"
                    || ((o.starts_with("http://") || o.starts_with("https://"))
                        && !o.ends_with('/')
                        && !o.contains(char::is_whitespace));
                if !ok {
                    return Err(err(
                        "edge.cors.allowOrigins".into(),
                        format!("{o:?} is not an origin (scheme://host[:port]) or *"),
                    ));
                }
            }
            if c.allow_credentials && c.allow_origins.iter().any(|o| o == "*") {
                return Err(err(
                    "edge.cors.allowOrigins".into(),
                    "* is not allowed with allowCredentials".into(),
                ));
            }
            if c.allow_methods.is_empty() {
                return Err(err(
                    "edge.cors.allowMethods".into(),
                    "needs at least one method".into(),
                ));
            }
            if let Some(m) = c.allow_methods.iter().find(|m| !valid_method(m)) {
                return Err(err(
                    "edge.cors.allowMethods".into(),
                    format!("{m:?} is not an upper-case HTTP method"),
                ));
            }
            for (f, list) in [
                ("allowHeaders", &c.allow_headers),
                ("exposeHeaders", &c.expose_headers),
            ] {
                if let Some(h) = list.iter().find(|h| !valid_header_name(h)) {
                    return Err(err(
                        format!("edge.cors.{f}"),
                        format!("{h:?} is not a header name"),
                    ));
                }
            }
        }
        if let Some(rl) = &self.rate_limit {
            if !(rl.requests_per_second.is_finite() && rl.requests_per_second > 0.0) {
                return Err(err(
                    "edge.rateLimit.requestsPerSecond".into(),
                    "must be a positive number".into(),
                ));
            }
            if rl.burst == 0 {
                return Err(err(
                    "edge.rateLimit.burst".into(),
                    "must be at least 1".into(),
                ));
            }
            if rl.key != "user" && rl.key != "ip" {
                return Err(err(
                    "edge.rateLimit.key".into(),
                    "must be user or ip".into(),
                ));
            }
            if rl.max_clients == 0 {
                return Err(err(
                    "edge.rateLimit.maxClients".into(),
                    "must be at least 1".into(),
                ));
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    pub(crate) fn sample() -> ProxyConfig {
        ProxyConfig {
            service: "orders".into(),
            namespace: "shop".into(),
            inbound: InboundConfig {
                listen: "0.0.0.0:15001".parse().unwrap(),
                app: "127.0.0.1:8080".parse().unwrap(),
                timeout_ms: 3000,
                stream_idle_timeout_ms: 300_000,
                max_concurrent: Some(100),
                max_queue: 50,
                rate_limit: None,
                max_body_bytes: 1 << 20,
                liveness_path: Some("/healthz".into()),
                readiness_path: Some("/readyz".into()),
                liveness_grpc_service: None,
                readiness_grpc_service: None,
                underscore_headers: UnderscoreHeaders::Drop,
                app_protocol: WireProtocol::Http1,
            },
            admin: AdminConfig {
                listen: "0.0.0.0:15090".parse().unwrap(),
            },
            outbound: vec![OutboundConfig {
                name: "users".into(),
                listen: "127.0.0.1:15100".parse().unwrap(),
                upstream: "http://users.shop.svc.cluster.local:80".into(),
                protocol: WireProtocol::Http2,
                timeout_ms: 3000,
                stream_idle_timeout_ms: 300_000,
                retry: None,
                circuit_breaker: Some(CircuitBreakerConfig {
                    error_threshold_percentage: 50,
                    volume_threshold: 20,
                    rolling_window_ms: 10_000,
                    buckets: 10,
                    reset_timeout_ms: 10_000,
                    failure_on: FailureClassConfig {
                        status_5xx: true,
                        connect_errors: true,
                        timeouts: true,
                        grpc_statuses: vec![2, 4, 13, 14, 15],
                    },
                }),
                bulkhead: None,
                fallback: None,
                endpoints: Some(EndpointsConfig {
                    dns: Some("users-weir-endpoints.shop.svc.cluster.local.:15001".into()),
                    addresses: vec![],
                    refresh_ms: DEFAULT_REFRESH_MS,
                }),
                load_balancer: LoadBalancerConfig::default(),
                outlier_detection: OutlierDetectionConfig::default(),
                peer_identity: None,
            }],
            tracing: TracingConfig::default(),
            shutdown_grace_ms: 30_000,
            messaging: None,
            edge: None,
            identity: None,
            mtls: None,
        }
    }

    #[test]
    fn endpoints_and_ejection_settings_are_checked_naming_the_field() {
        let bad = |f: &dyn Fn(&mut OutboundConfig)| {
            let mut cfg = sample();
            f(&mut cfg.outbound[0]);
            cfg.validate().unwrap_err().to_string()
        };
        let e = bad(&|o| {
            o.endpoints.as_mut().unwrap().addresses = vec!["127.0.0.2:1".parse().unwrap()]
        });
        assert!(e.contains("outbound[0].endpoints.addresses"), "{e}");
        let e = bad(&|o| o.endpoints.as_mut().unwrap().dns = None);
        assert!(e.contains("outbound[0].endpoints:"), "{e}");
        let e = bad(&|o| o.endpoints.as_mut().unwrap().dns = Some("users".into()));
        assert!(
            e.contains("outbound[0].endpoints.dns: must be host:port"),
            "{e}"
        );
        let e = bad(&|o| o.endpoints.as_mut().unwrap().refresh_ms = 0);
        assert!(e.contains("outbound[0].endpoints.refreshMs"), "{e}");
        let e = bad(&|o| o.load_balancer.decay_ms = 0);
        assert!(e.contains("outbound[0].loadBalancer.decayMs"), "{e}");
        let e = bad(&|o| o.outlier_detection.consecutive_failures = 0);
        assert!(
            e.contains("outbound[0].outlierDetection.consecutiveFailures"),
            "{e}"
        );
        let e = bad(&|o| o.outlier_detection.max_ejected_percent = 101);
        assert!(
            e.contains("outbound[0].outlierDetection.maxEjectedPercent"),
            "{e}"
        );
        let e = bad(&|o| o.outlier_detection.max_ejection_ms = 1);
        assert!(
            e.contains("outbound[0].outlierDetection.maxEjectionMs"),
            "{e}"
        );
        // Left out, the blocks take their defaults and are not written.
        let mut cfg = sample();
        cfg.outbound[0].endpoints = None;
        let text = serde_json::to_string(&cfg).unwrap();
        assert!(
            !text.contains("loadBalancer") && !text.contains("outlierDetection"),
            "{text}"
        );
    }

    #[test]
    fn round_trips_and_validates() {
        let cfg = sample();
        let text = serde_json::to_string(&cfg).unwrap();
        assert_eq!(ProxyConfig::from_json(&text).unwrap(), cfg);
    }

    #[test]
    fn underscore_headers_default_to_drop_and_are_left_out_when_default() {
        let cfg = sample();
        let text = serde_json::to_string(&cfg).unwrap();
        assert!(!text.contains("underscoreHeaders"), "{text}");
        let mut v: serde_json::Value = serde_json::from_str(&text).unwrap();
        v["inbound"]["underscoreHeaders"] = "reject".into();
        let strict = ProxyConfig::from_json(&v.to_string()).unwrap();
        assert_eq!(strict.inbound.underscore_headers, UnderscoreHeaders::Reject);
        v["inbound"]["underscoreHeaders"] = "keep".into();
        assert!(ProxyConfig::from_json(&v.to_string()).is_err());
    }

    #[test]
    fn errors_name_the_field() {
        let mut cfg = sample();
        cfg.outbound[0]
            .circuit_breaker
            .as_mut()
            .unwrap()
            .error_threshold_percentage = 0;
        let e = cfg.validate().unwrap_err();
        assert_eq!(
            e.field,
            "outbound[0].circuitBreaker.errorThresholdPercentage"
        );

        let mut cfg = sample();
        cfg.outbound.push(cfg.outbound[0].clone());
        assert_eq!(cfg.validate().unwrap_err().field, "outbound[1].name");

        let e = ProxyConfig::from_json(r#"{"service": "x", "bogus": 1}"#).unwrap_err();
        assert!(e.message.contains("bogus"), "{e}");
    }
}
