//! `Microservice`: an app container, its sidecar, and the policies on every call it makes.

use crate::duration::DURATION_PATTERN;
use crate::policy::{
    BulkheadPolicy, CircuitBreakerPolicy, FallbackPolicy, RetryPolicy, default_timeout,
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
    namespaced,
    status = "MicroserviceStatus",
    shortname = "ms",
    category = "weir",
    printcolumn(name = "Ready", type_ = "string", json_path = ".status.conditions[?(@.type==\"Ready\")].status"),
    printcolumn(name = "Replicas", type_ = "string", json_path = ".status.replicaSummary", description = "ready/desired"),
    printcolumn(name = "Dependencies", type_ = "string", json_path = ".status.dependencySummary", description = "resolved/declared"),
    printcolumn(name = "Reason", type_ = "string", json_path = ".status.conditions[?(@.type==\"Ready\")].reason", priority = 1),
    printcolumn(name = "Age", type_ = "date", json_path = ".metadata.creationTimestamp"),
    validation = Rule::new("self.metadata.name.size() <= 63 && self.metadata.name.matches('^[a-z]([-a-z0-9]*[a-z0-9])?$')").message("name must be a DNS label (it names the Service): lowercase letters, digits and '-', at most 63")
)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
#[schemars(extend("x-kubernetes-validations" = [
    {"rule": "self.port != 15001 && self.port != 15090 && (self.port < 15100 || self.port > 15199)", "message": "port collides with a weir-proxy port (15001, 15090, 15100-15199)", "fieldPath": ".port"}
]))]
pub struct MicroserviceSpec {
    /// The app's container image.
    #[schemars(length(min = 1))]
    pub image: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(extend("enum" = ["Always", "IfNotPresent", "Never"]))]
    pub image_pull_policy: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub command: Option<Vec<String>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub args: Option<Vec<String>>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub env: Vec<EnvVar>,
    /// Port the app listens on (on loopback is enough: only the sidecar calls it).
    #[serde(default = "default_port")]
    #[schemars(range(min = 1, max = 65535))]
    pub port: i32,
    #[serde(default = "default_replicas")]
    #[schemars(range(min = 0, max = 1000))]
    pub replicas: i32,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resources: Option<ResourceRequirements>,
    #[serde(default)]
    pub probes: Probes,
    /// Calls this service makes. Each becomes `<NAME>_URL=http://127.0.0.1:<port>` in the app.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 100), extend("x-kubernetes-list-type" = "map", "x-kubernetes-list-map-keys" = ["name"]))]
    pub dependencies: Vec<Dependency>,
    #[serde(default)]
    pub inbound: InboundPolicy,
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

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Probes {
    #[serde(default = "ProbeSpec::liveness")]
    pub liveness: ProbeSpec,
    #[serde(default = "ProbeSpec::readiness")]
    pub readiness: ProbeSpec,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ProbeSpec {
    #[schemars(regex(pattern = r"^/"))]
    pub path: String,
    #[serde(default = "default_period")]
    #[schemars(range(min = 1, max = 300))]
    pub period_seconds: i32,
    #[serde(default = "default_failure_threshold")]
    #[schemars(range(min = 1, max = 100))]
    pub failure_threshold: i32,
    #[serde(default)]
    #[schemars(range(min = 0, max = 3600))]
    pub initial_delay_seconds: i32,
}

fn default_period() -> i32 {
    10
}
fn default_failure_threshold() -> i32 {
    3
}

impl ProbeSpec {
    pub fn liveness() -> Self {
        Self::at("/healthz")
    }
    pub fn readiness() -> Self {
        Self::at("/readyz")
    }
    fn at(path: &str) -> Self {
        Self {
            path: path.into(),
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
    {"rule": "!has(self.retry) || !has(self.retry.backoff) || duration(self.retry.backoff.max) >= duration(self.retry.backoff.base)", "message": "retry.backoff.max must be at least retry.backoff.base", "fieldPath": ".retry.backoff.max"}
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
    /// Deadline of one call, retries included.
    #[serde(default = "default_timeout")]
    #[schemars(pattern(DURATION_PATTERN))]
    pub timeout: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retry: Option<RetryPolicy>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub circuit_breaker: Option<CircuitBreakerPolicy>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bulkhead: Option<BulkheadPolicy>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fallback: Option<FallbackPolicy>,
}

/// Limits on traffic arriving at this service.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
#[schemars(extend("x-kubernetes-validations" = [
    {"rule": "!has(self.maxQueue) || self.maxQueue == 0 || has(self.maxConcurrent)", "message": "maxQueue needs maxConcurrent", "fieldPath": ".maxQueue"}
]))]
pub struct InboundPolicy {
    #[serde(default = "default_inbound_timeout")]
    #[schemars(pattern(DURATION_PATTERN))]
    pub timeout: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 100000))]
    pub max_concurrent: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0, max = 100000))]
    pub max_queue: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rate_limit: Option<RateLimitSpec>,
    /// Largest request body accepted, in bytes.
    #[serde(default = "default_max_body")]
    #[schemars(range(min = 1, max = 1073741824))]
    pub max_body_bytes: u64,
}

impl Default for InboundPolicy {
    fn default() -> Self {
        Self {
            timeout: default_inbound_timeout(),
            max_concurrent: None,
            max_queue: None,
            rate_limit: None,
            max_body_bytes: default_max_body(),
        }
    }
}

fn default_inbound_timeout() -> String {
    "30s".into()
}
fn default_max_body() -> u64 {
    1 << 20
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct RateLimitSpec {
    #[schemars(range(min = 1, max = 1000000))]
    pub requests_per_second: u32,
    /// Largest burst; defaults to one second's worth.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 1000000))]
    pub burst: Option<u32>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct TracingSpec {
    /// OTLP/HTTP endpoint, e.g. `http://otel-collector.observability:4318`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(regex(pattern = r"^https?://\S+$"))]
    pub otlp_endpoint: Option<String>,
    #[serde(default = "default_sampling")]
    #[schemars(range(min = 0.0, max = 1.0))]
    pub sampling_ratio: f64,
}

fn default_sampling() -> f64 {
    0.1
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct PublishSpec {
    /// Name of a Queue in the same namespace.
    pub queue: String,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ConsumeSpec {
    /// Name of a Queue in the same namespace.
    pub queue: String,
    /// Path on the app that receives each event as a POST.
    #[schemars(regex(pattern = r"^/"))]
    pub path: String,
    #[serde(default = "default_in_flight")]
    #[schemars(range(min = 1, max = 10000))]
    pub max_in_flight: u32,
}

fn default_in_flight() -> u32 {
    16
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema, Default)]
#[serde(rename_all = "camelCase")]
pub struct MicroserviceStatus {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(extend("x-kubernetes-list-type" = "map", "x-kubernetes-list-map-keys" = ["type"]))]
    pub conditions: Vec<Condition>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub replicas: Option<i32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ready_replicas: Option<i32>,
    /// `ready/desired`, for `kubectl get`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub replica_summary: Option<String>,
    /// `resolved/declared` dependencies, for `kubectl get`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dependency_summary: Option<String>,
    /// Hash of the sidecar config now rolled out.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub config_hash: Option<String>,
}
