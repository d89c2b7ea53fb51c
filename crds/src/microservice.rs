//! `Microservice`: an app container, its sidecar, and the policies on every call it makes.

use crate::duration::DURATION_PATTERN;
use crate::policy::{
    BulkheadPolicy, CircuitBreakerPolicy, FallbackPolicy, GrpcPolicy, LoadBalancerPolicy,
    OutlierDetectionPolicy, RetryPolicy, default_timeout,
};
use k8s_openapi::api::core::v1::{EnvVar, ResourceRequirements};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition;
use kube::CustomResource;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// A service and everything it needs to run safely: the app container, the `weir-proxy`
/// sidecar, a Service in front, and a resilience policy on each dependency.
#[derive(CustomResource, Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[kube(
    group = "weir.dev",
    version = "v1alpha1",
    kind = "Microservice",
    doc = "A service run with the weir-proxy sidecar: its app container, a Service, and a resilience policy (timeout, retries, circuit breaker, bulkhead, fallback) on each call it makes; what it publishes and consumes; optionally the edge.",
    namespaced,
    status = "MicroserviceStatus",
    shortname = "ms",
    category = "weir",
    printcolumn(
        name = "Ready",
        type_ = "string",
        json_path = ".status.conditions[?(@.type==\"Ready\")].status"
    ),
    printcolumn(
        name = "Replicas",
        type_ = "string",
        json_path = ".status.replicaSummary",
        description = "ready/desired"
    ),
    printcolumn(
        name = "Dependencies",
        type_ = "string",
        json_path = ".status.dependencySummary",
        description = "ready/declared: dependencies that can answer now (a Microservice with a ready pod; an external URL counts as ready)"
    ),
    printcolumn(
        name = "Reason",
        type_ = "string",
        json_path = ".status.conditions[?(@.type==\"Ready\")].reason",
        priority = 1
    ),
    printcolumn(
        name = "Age",
        type_ = "date",
        json_path = ".metadata.creationTimestamp"
    )
)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
#[schemars(extend("x-kubernetes-validations" = [
    {"rule": "self.port != 15001 && self.port != 15090 && (self.port < 15100 || self.port > 15199)", "message": "port collides with a weir-proxy port (15001, 15090, 15100-15199)", "fieldPath": ".port"},
    {"rule": "has(self.image) || (has(self.edge) && has(self.edge.routes) && size(self.edge.routes) > 0)", "message": "image is required unless the Microservice is an edge with routes (a gateway without an app)", "fieldPath": ".image"},
    {"rule": "!has(self.probes) || ((!has(self.probes.liveness) || !has(self.probes.liveness.grpc)) && (!has(self.probes.readiness) || !has(self.probes.readiness.grpc))) || (has(self.protocol) && self.protocol != 'http')", "message": "a gRPC probe needs an app that speaks HTTP/2: set spec.protocol to grpc", "fieldPath": ".probes"},
    {"rule": "!has(self.autoscaling) || !has(self.autoscaling.queueLag) || self.autoscaling.queueLag.all(q, has(self.consumes) && self.consumes.exists(c, c.queue == q.queue))", "message": "autoscaling.queueLag names a queue this Microservice does not consume (spec.consumes)", "fieldPath": ".autoscaling.queueLag"}
]))]
pub struct MicroserviceSpec {
    /// The app's container image. Left out for an edge that only routes: the pod then runs
    /// `weir-proxy` alone.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    #[schemars(length(min = 1))]
    pub image: String,
    /// When the kubelet pulls the app's image: `Always`, `IfNotPresent` or `Never` (Kubernetes'
    /// default when left out: `Always` for `:latest`, else `IfNotPresent`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(extend("enum" = ["Always", "IfNotPresent", "Never"]))]
    pub image_pull_policy: Option<String>,
    /// Replaces the image's entrypoint (the container's `command`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub command: Option<Vec<String>>,
    /// Arguments to the entrypoint (the container's `args`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub args: Option<Vec<String>>,
    /// Environment variables of the app container, as in a Pod. Weir adds `<NAME>_URL` for each
    /// dependency, `WEIR_SIDECAR_URL` and `PORT`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub env: Vec<EnvVar>,
    /// Port the app listens on (on loopback is enough: only the sidecar calls it).
    #[serde(default = "default_port")]
    #[schemars(range(min = 1, max = 65535))]
    pub port: i32,
    /// What the app speaks on `port`: `http` (HTTP/1.1, the default), `http2` (HTTP/2 with prior
    /// knowledge, h2c) or `grpc` (gRPC over h2c). Callers may use HTTP/1.1 or HTTP/2 either way:
    /// the sidecar's listeners accept both, and sidecars talk HTTP/2 to each other.
    #[serde(default, skip_serializing_if = "AppProtocol::is_default")]
    pub protocol: AppProtocol,
    /// Pods to run (0 stops the service but keeps its Service and config). With `autoscaling`,
    /// the autoscaler sets the count instead and this is not applied.
    #[serde(default = "default_replicas")]
    #[schemars(range(min = 0, max = 1000))]
    pub replicas: i32,
    /// Replicas from load: CPU and memory through a HorizontalPodAutoscaler, the lag of the
    /// queues it consumes through KEDA. Fixed at `replicas` when left out.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub autoscaling: Option<AutoscalingSpec>,
    /// CPU and memory requests and limits of the app container, as in a Pod.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resources: Option<ResourceRequirements>,
    /// Probes on the app (HTTP GET, or the gRPC health protocol), made through the sidecar: the
    /// pod is ready only when the app answers.
    #[serde(default)]
    pub probes: Probes,
    /// Calls this service makes. Each becomes `<NAME>_URL=http://127.0.0.1:<port>` in the app.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 100), extend("x-kubernetes-list-type" = "map", "x-kubernetes-list-map-keys" = ["name"]))]
    pub dependencies: Vec<Dependency>,
    /// Limits on requests arriving at this service: timeout, concurrency, queue, rate and body size.
    #[serde(default)]
    pub inbound: InboundPolicy,
    /// OTLP traces of every call through the sidecar; off when left out.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tracing: Option<TracingSpec>,
    /// Queues this service publishes to (through `POST /v1/publish/<queue>` on its sidecar).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 100), extend("x-kubernetes-list-type" = "map", "x-kubernetes-list-map-keys" = ["queue"]))]
    pub publishes: Vec<PublishSpec>,
    /// Queues whose messages the sidecar pushes to this service.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 100), extend("x-kubernetes-list-type" = "map", "x-kubernetes-list-map-keys" = ["queue"]))]
    pub consumes: Vec<ConsumeSpec>,
    /// Time the pod gets to finish in-flight work after SIGTERM.
    #[serde(default = "default_grace")]
    #[schemars(range(min = 1, max = 3600))]
    pub termination_grace_period_seconds: i64,
    /// Makes this Microservice the edge (the gateway clients call): its sidecar validates a JWT
    /// on every request, sets `x-user-id` / `x-user-role`, routes path prefixes to dependencies,
    /// answers CORS and limits each client.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub edge: Option<Box<EdgeSpec>>,
}

/// What a Microservice's name gets to name its headless Service (see
/// [`endpoints_service_name`]).
pub const ENDPOINTS_SERVICE_SUFFIX: &str = "-weir-endpoints";

/// The longest Microservice name: a Service name is a DNS label of at most 63 characters, and
/// the name must leave room for [`ENDPOINTS_SERVICE_SUFFIX`].
pub const MAX_NAME_LEN: usize = 63 - ENDPOINTS_SERVICE_SUFFIX.len();

/// The headless Service beside Microservice `name`'s own: its A records are the ready pods,
/// which callers' sidecars resolve to balance each call across them.
pub fn endpoints_service_name(name: &str) -> String {
    format!("{name}{ENDPOINTS_SERVICE_SUFFIX}")
}

fn default_port() -> i32 {
    8080
}
fn default_replicas() -> i32 {
    1
}
fn default_grace() -> i64 {
    30
}

/// Liveness and readiness probes on the app.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Probes {
    /// Restarts the pod when the app stops answering.
    #[serde(default = "ProbeSpec::liveness")]
    pub liveness: ProbeSpec,
    /// Takes the pod out of its Service while the app does not answer.
    #[serde(default = "ProbeSpec::readiness")]
    pub readiness: ProbeSpec,
}

/// A probe on the app, made through the sidecar: an HTTP GET of `path` (the default, with
/// `/healthz` for liveness and `/readyz` for readiness), or with `grpc`, a call of the gRPC
/// health protocol (`grpc.health.v1.Health/Check`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
#[schemars(extend("x-kubernetes-validations" = [
    {"rule": "!(has(self.path) && has(self.grpc))", "message": "set path (an HTTP probe) or grpc (a gRPC health check), not both"}
]))]
pub struct ProbeSpec {
    /// Path on the app, called with GET; 2xx or 3xx is healthy. Left out (and no `grpc`):
    /// `/healthz` for liveness, `/readyz` for readiness.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(regex(pattern = r"^/"))]
    pub path: Option<String>,
    /// Probe with the gRPC health protocol instead: healthy when the app answers `SERVING`.
    /// Needs `spec.protocol: grpc`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub grpc: Option<GrpcProbe>,
    /// Seconds between two probes.
    #[serde(default = "default_period")]
    #[schemars(range(min = 1, max = 300))]
    pub period_seconds: i32,
    /// Failed probes in a row before the pod counts as failing.
    #[serde(default = "default_failure_threshold")]
    #[schemars(range(min = 1, max = 100))]
    pub failure_threshold: i32,
    /// Seconds after the container starts before the first probe.
    #[serde(default)]
    #[schemars(range(min = 0, max = 3600))]
    pub initial_delay_seconds: i32,
}

/// The liveness probe's path when a probe names none.
pub const LIVENESS_PATH: &str = "/healthz";
/// The readiness probe's path when a probe names none.
pub const READINESS_PATH: &str = "/readyz";

/// A gRPC health check (grpc/doc/health-checking.md).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct GrpcProbe {
    /// The service to ask about (`HealthCheckRequest.service`); empty: the server as a whole.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    #[schemars(length(max = 256))]
    pub service: String,
}

/// What a probe does, resolved: see [`ProbeSpec::kind`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ProbeKind<'a> {
    /// GET this path.
    Http(&'a str),
    /// `grpc.health.v1.Health/Check` for this service.
    Grpc(&'a str),
}

fn default_period() -> i32 {
    10
}
fn default_failure_threshold() -> i32 {
    3
}

impl ProbeSpec {
    /// What this probe does; `default_path` when it names neither a path nor gRPC (a gRPC
    /// probe wins over a path: validation refuses both).
    pub fn kind<'a>(&'a self, default_path: &'a str) -> ProbeKind<'a> {
        match (&self.grpc, &self.path) {
            (Some(g), _) => ProbeKind::Grpc(&g.service),
            (None, Some(p)) => ProbeKind::Http(p),
            (None, None) => ProbeKind::Http(default_path),
        }
    }

    /// The default liveness probe: [`LIVENESS_PATH`].
    pub(crate) fn liveness() -> Self {
        Self::at(LIVENESS_PATH)
    }
    /// The default readiness probe: [`READINESS_PATH`].
    pub(crate) fn readiness() -> Self {
        Self::at(READINESS_PATH)
    }
    fn at(path: &str) -> Self {
        Self {
            path: Some(path.into()),
            grpc: None,
            period_seconds: default_period(),
            failure_threshold: default_failure_threshold(),
            initial_delay_seconds: 0,
        }
    }
}

impl Default for Probes {
    fn default() -> Self {
        Self {
            liveness: ProbeSpec::liveness(),
            readiness: ProbeSpec::readiness(),
        }
    }
}

/// A call this service makes, to another Microservice in the namespace or to an external URL.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
#[schemars(extend("x-kubernetes-validations" = [
    {"rule": "has(self.microservice) != has(self.url)", "message": "set exactly one of microservice or url"},
    {"rule": "!has(self.protocol) || has(self.url)", "message": "protocol is for url dependencies; a Microservice dependency speaks what its own spec.protocol says", "fieldPath": ".protocol"},
    {"rule": "!has(self.retry) || !has(self.retry.backoff) || duration(self.retry.backoff.max) >= duration(self.retry.backoff.base)", "message": "retry.backoff.max must be at least retry.backoff.base", "fieldPath": ".retry.backoff.max"},
    {"rule": "!has(self.loadBalancer) || duration(self.loadBalancer.decay) > duration('0s')", "message": "loadBalancer.decay must be greater than 0", "fieldPath": ".loadBalancer.decay"},
    {"rule": "!has(self.outlierDetection) || duration(self.outlierDetection.baseEjectionTime) > duration('0s')", "message": "outlierDetection.baseEjectionTime must be greater than 0", "fieldPath": ".outlierDetection.baseEjectionTime"},
    {"rule": "!has(self.outlierDetection) || duration(self.outlierDetection.maxEjectionTime) >= duration(self.outlierDetection.baseEjectionTime)", "message": "outlierDetection.maxEjectionTime must be at least outlierDetection.baseEjectionTime", "fieldPath": ".outlierDetection.maxEjectionTime"}
]))]
pub struct Dependency {
    /// Also names the env var: `users` gives `USERS_URL`.
    #[schemars(regex(pattern = r"^[a-z]([-a-z0-9]{0,38}[a-z0-9])?$"))]
    pub name: String,
    /// Name of a Microservice in the same namespace.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub microservice: Option<String>,
    /// An external base URL (`http://` or `https://`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(regex(pattern = r"^https?://[^\s/]+(/\S*)?$"))]
    pub url: Option<String>,
    /// What the `url` speaks: `http` (HTTP/1.1, the default), `http2` or `grpc` (HTTP/2: h2c
    /// for `http://`, ALPN `h2` for `https://`). Only with `url`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub protocol: Option<AppProtocol>,
    /// Deadline of one call, retries included, to the response headers; the body that follows
    /// is bounded by `streamIdleTimeout`.
    #[serde(default = "default_timeout")]
    #[schemars(pattern(DURATION_PATTERN))]
    pub timeout: String,
    /// A call whose bodies (either way) carry nothing for this long is ended (gRPC:
    /// `DEADLINE_EXCEEDED`), so a stalled stream does not hold the app's connection forever.
    #[serde(default = "default_stream_idle_timeout")]
    #[schemars(pattern(DURATION_PATTERN))]
    pub stream_idle_timeout: String,
    /// Retries with exponential backoff and full jitter, bounded by a budget; none when left out.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retry: Option<RetryPolicy>,
    /// A circuit breaker on this dependency; none when left out.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub circuit_breaker: Option<CircuitBreakerPolicy>,
    /// A cap on concurrent calls to this dependency; none when left out.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bulkhead: Option<BulkheadPolicy>,
    /// The answer served when the breaker is open or the bulkhead is full, instead of a 503.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fallback: Option<FallbackPolicy>,
    /// Which gRPC statuses are retried and which count as the breaker's failures.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub grpc: Option<GrpcPolicy>,
    /// How each call picks one of the dependency's endpoints (a Microservice's ready pods, or
    /// the addresses a URL's host resolves to); peak-EWMA with its defaults when left out.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub load_balancer: Option<LoadBalancerPolicy>,
    /// When an endpoint that keeps failing is left out of the choice, and for how long; on,
    /// with its defaults, when left out.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub outlier_detection: Option<OutlierDetectionPolicy>,
}

/// Limits on traffic arriving at this service.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
#[schemars(extend("x-kubernetes-validations" = [
    {"rule": "!has(self.maxQueue) || self.maxQueue == 0 || has(self.maxConcurrent)", "message": "maxQueue needs maxConcurrent", "fieldPath": ".maxQueue"}
]))]
pub struct InboundPolicy {
    /// Deadline of one inbound request, from arrival to the app's response headers (504, or
    /// `DEADLINE_EXCEEDED` for gRPC, when exceeded). The body that follows is bounded by
    /// `streamIdleTimeout` instead, so a long healthy stream is not cut.
    #[serde(default = "default_inbound_timeout")]
    #[schemars(pattern(DURATION_PATTERN))]
    pub timeout: String,
    /// A request whose bodies (either way) carry nothing for this long is ended: an HTTP/2
    /// stream is reset, an HTTP/1.1 connection closed, a gRPC call ended with
    /// `DEADLINE_EXCEEDED`.
    #[serde(default = "default_stream_idle_timeout")]
    #[schemars(pattern(DURATION_PATTERN))]
    pub stream_idle_timeout: String,
    /// Requests the app handles at once; more wait in a queue of `maxQueue`. Unlimited when left out.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 100000))]
    pub max_concurrent: Option<u32>,
    /// Requests waiting for a slot when `maxConcurrent` are in flight; beyond it, 503 at once.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0, max = 100000))]
    pub max_queue: Option<u32>,
    /// A token bucket on all inbound requests (429 when empty); none when left out.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rate_limit: Option<RateLimitSpec>,
    /// Largest request body accepted, in bytes.
    #[serde(default = "default_max_body")]
    #[schemars(range(min = 1, max = 1073741824))]
    pub max_body_bytes: u64,
    /// Plaintext from outside the pod under the mesh's mutual TLS ([`MtlsMode`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mtls: Option<MtlsMode>,
    /// Who may call over mutual TLS ([`AuthorizationPolicy`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub authorization: Option<AuthorizationPolicy>,
    /// Callers admitted besides the graph's: `<namespace>/<name>` (a Microservice),
    /// `<namespace>/saga/<name>` (a Saga's coordinator) or `<namespace>/*`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(
        length(max = 100),
        inner(regex(
            pattern = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?/(\*|saga/[a-z0-9]([-a-z0-9]*[a-z0-9])?|[a-z0-9]([-a-z0-9]*[a-z0-9])?)$"
        ))
    )]
    pub allow_from: Vec<String>,
}

impl Default for InboundPolicy {
    fn default() -> Self {
        Self {
            timeout: default_inbound_timeout(),
            stream_idle_timeout: default_stream_idle_timeout(),
            max_concurrent: None,
            max_queue: None,
            rate_limit: None,
            max_body_bytes: default_max_body(),
            mtls: None,
            authorization: None,
            allow_from: Vec::new(),
        }
    }
}

/// With the mesh's mutual TLS on, what happens to plaintext from outside the pod: `strict`
/// refuses it (403 `mtls-required`), `permissive` admits and counts it (the migration path).
/// Left out: the operator's default (the chart's `mtls.mode`). An edge Microservice admits
/// plaintext whatever this says: outside traffic enters there.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub enum MtlsMode {
    /// Plaintext from outside the pod refused.
    Strict,
    /// Plaintext admitted and counted.
    Permissive,
}

/// Who may call over mutual TLS. `graph` (the default): the Microservices that declare this one
/// a dependency, the Sagas with a step on it, and `allowFrom`; anyone else gets 403
/// `caller-not-allowed`. `audit`: everyone admitted, and those `graph` would refuse counted and
/// logged. `open`: every workload of the mesh.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub enum AuthorizationPolicy {
    /// The declared graph and `allowFrom`.
    #[default]
    Graph,
    /// Everyone admitted; what `graph` would refuse counted and logged.
    Audit,
    /// Every workload of the mesh.
    Open,
}

fn default_inbound_timeout() -> String {
    "30s".into()
}
fn default_stream_idle_timeout() -> String {
    "5m".into()
}
fn default_max_body() -> u64 {
    1 << 20
}

/// A token bucket: `requestsPerSecond` sustained, bursts up to `burst`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct RateLimitSpec {
    /// Sustained rate admitted.
    #[schemars(range(min = 1, max = 1000000))]
    pub requests_per_second: u32,
    /// Largest burst; defaults to one second's worth.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 1000000))]
    pub burst: Option<u32>,
}

/// Where the sidecar sends OTLP traces, and how many it records.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct TracingSpec {
    /// OTLP/HTTP endpoint, e.g. `http://otel-collector.observability:4318`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(regex(pattern = r"^https?://\S+$"))]
    pub otlp_endpoint: Option<String>,
    /// Fraction of new traces recorded (0 to 1); a caller's sampled flag is always followed.
    #[serde(default = "default_sampling")]
    #[schemars(range(min = 0.0, max = 1.0))]
    pub sampling_ratio: f64,
}

fn default_sampling() -> f64 {
    0.1
}

/// A Queue this service publishes to.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct PublishSpec {
    /// Name of a Queue in the same namespace.
    pub queue: String,
}

/// A Queue whose messages the sidecar delivers to a path of the app.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ConsumeSpec {
    /// Name of a Queue in the same namespace.
    pub queue: String,
    /// Path on the app that receives each event as a POST.
    #[schemars(regex(pattern = r"^/"))]
    pub path: String,
    /// Events pushed to the app at once; the next waits for an answer.
    #[serde(default = "default_in_flight")]
    #[schemars(range(min = 1, max = 10000))]
    pub max_in_flight: u32,
}

fn default_in_flight() -> u32 {
    16
}

/// The edge: JWT validation, identity headers, routes, CORS and per-client rate limits.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct EdgeSpec {
    /// How tokens are checked: where the signing keys are, and what the token must say.
    pub jwt: JwtSpec,
    /// Requests admitted without a token (a token sent anyway is still validated). Everything
    /// else needs one.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 50))]
    pub anonymous: Vec<AnonymousRule>,
    /// Path prefixes sent to a dependency (with its timeout, retries and breaker) instead of the
    /// app; the longest matching prefix wins.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 50), extend("x-kubernetes-list-type" = "map", "x-kubernetes-list-map-keys" = ["pathPrefix"]))]
    pub routes: Vec<EdgeRoute>,
    /// Cross-origin answers for browsers; no CORS headers when left out.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cors: Option<CorsSpec>,
    /// A token bucket per client (user id, or client IP for anonymous requests).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rate_limit: Option<ClientRateLimitSpec>,
    /// Proxies in front of the edge that append to `X-Forwarded-For` (1 behind a cloud load
    /// balancer); 0 takes the client IP from the connection.
    #[serde(default, skip_serializing_if = "is_zero")]
    #[schemars(range(min = 0, max = 10))]
    pub xff_num_trusted_hops: u32,
}

fn is_zero(v: &u32) -> bool {
    *v == 0
}

/// Where signing keys come from (exactly one source) and what a token must say.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
#[schemars(extend("x-kubernetes-validations" = [
    {"rule": "[has(self.jwks), has(self.jwksSecretRef), has(self.jwksUri), has(self.hmacSecretRef)].filter(x, x).size() == 1", "message": "set exactly one of jwks, jwksSecretRef, jwksUri or hmacSecretRef"}
]))]
pub struct JwtSpec {
    /// The `iss` claim must equal this.
    #[schemars(length(min = 1, max = 1024))]
    pub issuer: String,
    /// The `aud` claim must contain one of these.
    #[schemars(length(min = 1, max = 20))]
    pub audiences: Vec<String>,
    /// A JWKS document (JSON) with RS256 RSA or ES256 P-256 keys.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 65536))]
    pub jwks: Option<String>,
    /// A Secret key holding a JWKS document; mounted into the sidecar, re-read on refresh.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub jwks_secret_ref: Option<SecretKeyRef>,
    /// The issuer's JWKS URL, fetched at start, every `jwksRefreshInterval`, and again (at most
    /// every 30s) when a token names an unknown key id.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(regex(pattern = r"^https?://\S+$"))]
    pub jwks_uri: Option<String>,
    /// How often `jwksUri` or `jwksSecretRef` is read again.
    #[serde(default = "default_jwks_refresh")]
    #[schemars(pattern(DURATION_PATTERN))]
    pub jwks_refresh_interval: String,
    /// A Secret key holding the HS256 shared secret (at least 32 bytes).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hmac_secret_ref: Option<SecretKeyRef>,
    /// Clock skew tolerated on `exp` and `nbf`.
    #[serde(default = "default_leeway")]
    #[schemars(pattern(DURATION_PATTERN))]
    pub leeway: String,
    /// Claim copied into `x-user-id`; a dotted path reaches into objects.
    #[serde(default = "default_user_id_claim")]
    #[schemars(length(min = 1, max = 256))]
    pub user_id_claim: String,
    /// Claim copied into `x-user-role`; a list is joined with `,`.
    #[serde(default = "default_role_claim")]
    #[schemars(length(min = 1, max = 256))]
    pub role_claim: String,
    /// Keep the `Authorization` header on the forwarded request.
    #[serde(default)]
    pub forward_token: bool,
    /// Longer tokens are refused unread.
    #[serde(default = "default_max_token_bytes")]
    #[schemars(range(min = 64, max = 65536))]
    pub max_token_bytes: u32,
}

fn default_jwks_refresh() -> String {
    "5m".into()
}
fn default_leeway() -> String {
    "60s".into()
}
fn default_user_id_claim() -> String {
    "sub".into()
}
fn default_role_claim() -> String {
    "role".into()
}
fn default_max_token_bytes() -> u32 {
    8192
}

/// One key of a Secret in the Microservice's namespace.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct SecretKeyRef {
    /// Name of the Secret, in the Microservice's namespace.
    #[schemars(length(min = 1, max = 253))]
    pub name: String,
    /// Key in the Secret's data.
    #[schemars(length(min = 1, max = 253))]
    pub key: String,
}

/// Requests under a path prefix admitted without a token.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct AnonymousRule {
    /// This path and everything below it: `/catalog` covers `/catalog/3`, not `/catalogs`.
    #[schemars(regex(pattern = r"^/([^/?#\s]+(/[^/?#\s]+)*)?$"))]
    pub path_prefix: String,
    /// Methods admitted without a token; empty means all.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 10))]
    pub methods: Vec<HttpMethod>,
}

/// What an app or an external dependency speaks.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum AppProtocol {
    /// HTTP/1.1.
    #[default]
    Http,
    /// HTTP/2 with prior knowledge (h2c), or ALPN `h2` over TLS.
    Http2,
    /// gRPC: HTTP/2 as for `http2`; the policies read gRPC's own status and deadline.
    Grpc,
}

impl AppProtocol {
    fn is_default(&self) -> bool {
        *self == AppProtocol::Http
    }

    /// The name resources spell (`http`, `http2`, `grpc`).
    pub fn as_str(self) -> &'static str {
        match self {
            AppProtocol::Http => "http",
            AppProtocol::Http2 => "http2",
            AppProtocol::Grpc => "grpc",
        }
    }

    /// The HTTP version the sidecar speaks to a peer declared with this protocol.
    pub fn wire(&self) -> crate::proxy::WireProtocol {
        match self {
            AppProtocol::Http => crate::proxy::WireProtocol::Http1,
            AppProtocol::Http2 | AppProtocol::Grpc => crate::proxy::WireProtocol::Http2,
        }
    }

    /// The `appProtocol` of the Service port in front of an app speaking this
    /// (`kubernetes.io/h2c` is the registered name for HTTP/2 over cleartext).
    pub fn service_app_protocol(&self) -> &'static str {
        match self {
            AppProtocol::Http => "http",
            AppProtocol::Http2 | AppProtocol::Grpc => "kubernetes.io/h2c",
        }
    }
}

/// An HTTP method, in upper case as on the wire.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "UPPERCASE")]
#[allow(missing_docs, reason = "each variant is the method it names")]
pub enum HttpMethod {
    Get,
    Head,
    Post,
    Put,
    Patch,
    Delete,
    Options,
}

impl HttpMethod {
    /// The method as sent on the wire (`GET`), for the sidecar's config.
    pub fn as_str(self) -> &'static str {
        match self {
            HttpMethod::Get => "GET",
            HttpMethod::Head => "HEAD",
            HttpMethod::Post => "POST",
            HttpMethod::Put => "PUT",
            HttpMethod::Patch => "PATCH",
            HttpMethod::Delete => "DELETE",
            HttpMethod::Options => "OPTIONS",
        }
    }
}

/// A path prefix the edge sends to a dependency instead of the app.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct EdgeRoute {
    /// `/orders` covers `/orders` and `/orders/...`.
    #[schemars(regex(pattern = r"^/([^/?#\s]+(/[^/?#\s]+)*)?$"))]
    pub path_prefix: String,
    /// Name of an entry of `dependencies` (checked by the operator).
    #[schemars(length(min = 1, max = 40))]
    pub dependency: String,
    /// Remove the prefix before forwarding: `/orders/3` arrives as `/3`.
    #[serde(default)]
    pub strip_prefix: bool,
}

/// Cross-origin answers for browsers: preflights and the `Access-Control-*` headers.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
#[schemars(extend("x-kubernetes-validations" = [
    {"rule": "!self.allowCredentials || !self.allowOrigins.exists(o, o == '*')", "message": "allowOrigins may not contain * when allowCredentials is true", "fieldPath": ".allowOrigins"}
]))]
pub struct CorsSpec {
    /// Exact origins (`https://shop.example.com`), or `*` without credentials.
    #[schemars(
        length(min = 1, max = 100),
        inner(length(max = 253), regex(pattern = r"^(\*|https?://[^/\s]+)$"))
    )]
    pub allow_origins: Vec<String>,
    /// Methods a page may use cross-origin.
    #[serde(default = "default_cors_methods")]
    #[schemars(length(min = 1, max = 10))]
    pub allow_methods: Vec<HttpMethod>,
    /// Request headers a page may send; `*` allows any.
    #[serde(default = "default_cors_headers")]
    #[schemars(
        length(max = 50),
        inner(regex(pattern = r"^[!#$%&'*+.^_`|~0-9A-Za-z-]+$"))
    )]
    pub allow_headers: Vec<String>,
    /// Response headers a page may read.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(
        length(max = 50),
        inner(regex(pattern = r"^[!#$%&'*+.^_`|~0-9A-Za-z-]+$"))
    )]
    pub expose_headers: Vec<String>,
    /// How long a browser may cache a preflight answer.
    #[serde(default = "default_cors_max_age")]
    #[schemars(pattern(DURATION_PATTERN))]
    pub max_age: String,
    /// Allow cookies and `Authorization` on cross-origin requests.
    #[serde(default)]
    pub allow_credentials: bool,
}

fn default_cors_methods() -> Vec<HttpMethod> {
    use HttpMethod::*;
    vec![Get, Head, Post, Put, Patch, Delete]
}
fn default_cors_headers() -> Vec<String> {
    vec!["authorization".into(), "content-type".into()]
}
fn default_cors_max_age() -> String {
    "10m".into()
}

/// A token bucket per client, with a bound on the clients remembered.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ClientRateLimitSpec {
    /// Sustained rate admitted per client.
    #[schemars(range(min = 1, max = 1000000))]
    pub requests_per_second: u32,
    /// Largest burst per client; defaults to one second's worth.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 1000000))]
    pub burst: Option<u32>,
    /// What a client is: `user` (the token's user id, the IP when anonymous) or `ip`.
    #[serde(default)]
    pub key: ClientKey,
    /// Clients remembered at once; beyond it idle ones are forgotten first.
    #[serde(default = "default_max_clients")]
    #[schemars(range(min = 1, max = 1000000))]
    pub max_clients: u32,
}

fn default_max_clients() -> u32 {
    100_000
}

/// What a client is, for per-client rate limits.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, JsonSchema, Default)]
#[serde(rename_all = "lowercase")]
pub enum ClientKey {
    /// The token's user id; the client IP for anonymous requests.
    #[default]
    User,
    /// The client IP, authenticated or not.
    Ip,
}

/// How many pods a Microservice runs, from its load. The names are the HorizontalPodAutoscaler's
/// and KEDA's. CPU and memory targets alone: the operator renders an `autoscaling/v2`
/// HorizontalPodAutoscaler. With `queueLag`: a KEDA ScaledObject carrying every target (KEDA
/// makes the one HorizontalPodAutoscaler; two on one Deployment would fight), and without KEDA
/// in the cluster only the CPU and memory targets apply.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
#[schemars(extend("x-kubernetes-validations" = [
    {"rule": "!has(self.minReplicas) || self.minReplicas <= self.maxReplicas", "message": "minReplicas must be at most maxReplicas", "fieldPath": ".minReplicas"},
    {"rule": "has(self.targetCPUUtilizationPercentage) || has(self.targetMemoryUtilizationPercentage) || (has(self.queueLag) && size(self.queueLag) > 0)", "message": "set a target: targetCPUUtilizationPercentage, targetMemoryUtilizationPercentage or queueLag"},
    {"rule": "!has(self.minReplicas) || self.minReplicas > 0 || (has(self.queueLag) && size(self.queueLag) > 0)", "message": "minReplicas 0 needs a queueLag target: CPU and memory cannot wake a Microservice with no pods", "fieldPath": ".minReplicas"}
]))]
pub struct AutoscalingSpec {
    /// Fewest pods. 0 (scale to zero) only with `queueLag`: the first pod starts when lag
    /// passes `activationLag`.
    #[serde(default = "default_min_replicas")]
    #[schemars(range(min = 0, max = 1000))]
    pub min_replicas: i32,
    /// Most pods.
    #[schemars(range(min = 1, max = 1000))]
    pub max_replicas: i32,
    /// Average CPU use across the pods, in percent of their CPU requests, that the autoscaler
    /// keeps (the containers need CPU requests).
    #[serde(
        default,
        rename = "targetCPUUtilizationPercentage",
        skip_serializing_if = "Option::is_none"
    )]
    #[schemars(range(min = 1, max = 1000))]
    pub target_cpu_utilization_percentage: Option<i32>,
    /// Average memory use, in percent of the pods' memory requests.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 1000))]
    pub target_memory_utilization_percentage: Option<i32>,
    /// Targets on the lag of queues this Microservice consumes: events not yet delivered to its
    /// consumer, per pod. Needs KEDA in the cluster.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 20), extend("x-kubernetes-list-type" = "map", "x-kubernetes-list-map-keys" = ["queue"]))]
    pub queue_lag: Vec<QueueLagTarget>,
}

fn default_min_replicas() -> i32 {
    1
}

/// A queue's lag the autoscaler keeps per pod.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct QueueLagTarget {
    /// A Queue this Microservice consumes (`spec.consumes`).
    #[schemars(regex(pattern = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$"), length(max = 63))]
    pub queue: String,
    /// Events waiting per pod that the autoscaler aims for: 100 waiting with a target of 10
    /// means 10 pods.
    #[schemars(range(min = 1, max = 1000000))]
    pub target_lag_per_replica: i64,
    /// Lag above which a Microservice scaled to zero gets its first pod (KEDA's activation
    /// threshold); 0 when left out.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0, max = 1000000))]
    pub activation_lag: Option<i64>,
}

/// What the operator last saw: conditions, replicas and dependencies.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema, Default)]
#[serde(rename_all = "camelCase")]
pub struct MicroserviceStatus {
    /// The `metadata.generation` this status describes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// `Ready`, `Progressing` and `Degraded`, each with a reason and a message naming what is
    /// wrong and where.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(extend("x-kubernetes-list-type" = "map", "x-kubernetes-list-map-keys" = ["type"]))]
    pub conditions: Vec<Condition>,
    /// Pods the Deployment wants.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub replicas: Option<i32>,
    /// Pods whose app and sidecar are both ready.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ready_replicas: Option<i32>,
    /// `ready/desired`, for `kubectl get`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub replica_summary: Option<String>,
    /// `ready/declared` dependencies, for `kubectl get`: a Microservice dependency is ready when
    /// one of its pods is; an external URL counts as ready.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dependency_summary: Option<String>,
    /// Hash of the sidecar config now rolled out.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub config_hash: Option<String>,
    /// What scales the Microservice, when `spec.autoscaling` is set.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub autoscaling: Option<AutoscalingStatus>,
}

/// Which autoscaler drives the replicas, and what it wants now.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema, Default)]
#[serde(rename_all = "camelCase")]
pub struct AutoscalingStatus {
    /// `HorizontalPodAutoscaler` (CPU or memory) or `KEDA` (a ScaledObject, with queue lag).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub scaler: Option<String>,
    /// The object that scales the Deployment: `HorizontalPodAutoscaler/<name>` or
    /// `ScaledObject/<name>`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub object: Option<String>,
    /// Pods the Deployment has now.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub current_replicas: Option<i32>,
    /// Pods the autoscaler last asked for (the Deployment's `spec.replicas`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub desired_replicas: Option<i32>,
}
