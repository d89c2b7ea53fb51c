//! Resilience policies, shared by Microservice dependencies and Saga steps.
//!
//! The defaults are written down in `docs/api.md`: timeout 3s; breaker at 50 % errors over a
//! 10s window split into 10 buckets, 20 calls minimum before it may open (a handful of calls
//! says nothing about an upstream), 10s open before one trial call; retry budget 20 % of recent
//! requests plus 10/s over 10s; per endpoint, peak-EWMA balancing with a 10s decay and 10s slow
//! start, and ejection after 5 gateway failures in a row for 30s (doubling up to 5m), at most
//! half of the endpoints at once.

use crate::duration::DURATION_PATTERN;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// Default deadline of a dependency call and of a saga step's attempt.
pub(crate) fn default_timeout() -> String {
    "3s".into()
}

/// Retries with exponential backoff and full jitter, bounded by a budget.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct RetryPolicy {
    /// Total attempts including the first call (3 = one call and up to two retries).
    #[serde(default = "default_attempts")]
    #[schemars(range(min = 1, max = 10))]
    pub attempts: u32,
    /// Wait before each retry: exponential from `base`, capped at `max`, with full jitter.
    #[serde(default)]
    pub backoff: BackoffPolicy,
    /// Caps retries at a share of recent requests, so retries never multiply load during an outage.
    #[serde(default)]
    pub budget: RetryBudget,
    /// Also retry non-idempotent methods (POST, PATCH). Only for upstreams that dedupe
    /// (e.g. by `Idempotency-Key`).
    #[serde(default)]
    pub retry_non_idempotent: bool,
}

/// How a dependency's gRPC calls are judged: by their `grpc-status`, not their HTTP status (200
/// for nearly every gRPC error).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct GrpcPolicy {
    /// Statuses retried (under `retry`, for any method), when they come before any message.
    /// Left out: `[UNAVAILABLE]`, the one status that says the call was not processed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 17))]
    pub retry_on: Option<Vec<GrpcCode>>,
    /// Statuses the circuit breaker counts as failures. Left out: `UNKNOWN`,
    /// `DEADLINE_EXCEEDED`, `INTERNAL`, `UNAVAILABLE`, `DATA_LOSS` (the server or the way to it
    /// is unwell; `NOT_FOUND` or `INVALID_ARGUMENT` are a healthy server's answers).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 17))]
    pub failure_on: Option<Vec<GrpcCode>>,
}

/// A gRPC status code, by its name in the gRPC specification.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
#[allow(missing_docs, reason = "each variant is the status it names")]
pub enum GrpcCode {
    Ok,
    Cancelled,
    Unknown,
    InvalidArgument,
    DeadlineExceeded,
    NotFound,
    AlreadyExists,
    PermissionDenied,
    ResourceExhausted,
    FailedPrecondition,
    Aborted,
    OutOfRange,
    Unimplemented,
    Internal,
    Unavailable,
    DataLoss,
    Unauthenticated,
}

impl GrpcCode {
    /// The number on the wire (`grpc-status`).
    pub fn code(self) -> u16 {
        self as u16
    }

    /// The specification's name of status `code`: [`crate::proxy::grpc_code_name`].
    pub fn name_of(code: u16) -> &'static str {
        crate::proxy::grpc_code_name(code)
    }
}

fn default_attempts() -> u32 {
    3
}

/// Exponential backoff with full jitter between retries.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct BackoffPolicy {
    /// First retry waits a random time up to `base`; each next one doubles, capped at `max`.
    #[serde(default = "default_backoff_base")]
    #[schemars(pattern(DURATION_PATTERN))]
    pub base: String,
    /// Longest wait before a retry.
    #[serde(default = "default_backoff_max")]
    #[schemars(pattern(DURATION_PATTERN))]
    pub max: String,
}

impl Default for BackoffPolicy {
    fn default() -> Self {
        Self {
            base: default_backoff_base(),
            max: default_backoff_max(),
        }
    }
}

fn default_backoff_base() -> String {
    "100ms".into()
}
fn default_backoff_max() -> String {
    "2s".into()
}

/// Retries may add at most `percent` of the recent request rate, plus `minPerSecond`, so retries
/// never multiply load during an outage.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct RetryBudget {
    /// Percentage of recent requests that may be retried.
    #[serde(default = "default_budget_percent")]
    #[schemars(range(min = 0, max = 100))]
    pub percent: u32,
    /// Retries allowed each second whatever the request rate (so a quiet service can retry).
    #[serde(default = "default_budget_min")]
    #[schemars(range(min = 0, max = 10000))]
    pub min_per_second: u32,
    /// How far back "recent" reaches.
    #[serde(default = "default_budget_ttl")]
    #[schemars(pattern(DURATION_PATTERN))]
    pub ttl: String,
}

impl Default for RetryBudget {
    fn default() -> Self {
        Self {
            percent: default_budget_percent(),
            min_per_second: default_budget_min(),
            ttl: default_budget_ttl(),
        }
    }
}

fn default_budget_percent() -> u32 {
    20
}
fn default_budget_min() -> u32 {
    10
}
fn default_budget_ttl() -> String {
    "10s".into()
}

/// Opens when, with at least `volumeThreshold` calls in the rolling window, the failure
/// percentage exceeds `errorThresholdPercentage`; after `resetTimeout` one trial call decides.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct CircuitBreakerPolicy {
    /// Failure percentage in the rolling window above which the breaker opens.
    #[serde(default = "default_error_threshold")]
    #[schemars(range(min = 1, max = 100))]
    pub error_threshold_percentage: u32,
    /// Calls in the rolling window before the breaker may open (a handful says nothing).
    #[serde(default = "default_volume_threshold")]
    #[schemars(range(min = 1, max = 100000))]
    pub volume_threshold: u32,
    /// How far back the breaker counts calls and failures.
    #[serde(default = "default_rolling_window")]
    #[schemars(pattern(DURATION_PATTERN))]
    pub rolling_window: String,
    /// Slices of the rolling window; the oldest slice is dropped as time moves on.
    #[serde(default = "default_buckets")]
    #[schemars(range(min = 1, max = 100))]
    pub buckets: u32,
    /// How long the breaker stays open before one trial call decides.
    #[serde(default = "default_reset_timeout")]
    #[schemars(pattern(DURATION_PATTERN))]
    pub reset_timeout: String,
    /// What counts as a failure; all three by default.
    #[serde(default)]
    pub failure_on: FailureOn,
}

impl Default for CircuitBreakerPolicy {
    fn default() -> Self {
        Self {
            error_threshold_percentage: default_error_threshold(),
            volume_threshold: default_volume_threshold(),
            rolling_window: default_rolling_window(),
            buckets: default_buckets(),
            reset_timeout: default_reset_timeout(),
            failure_on: FailureOn::default(),
        }
    }
}

fn default_error_threshold() -> u32 {
    50
}
fn default_volume_threshold() -> u32 {
    20
}
fn default_rolling_window() -> String {
    "10s".into()
}
fn default_buckets() -> u32 {
    10
}
fn default_reset_timeout() -> String {
    "10s".into()
}

/// What the breaker counts as a failed call.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct FailureOn {
    /// A 5xx answer counts as a failure.
    #[serde(default = "yes")]
    pub status5xx: bool,
    /// A refused, reset or failed connection counts as a failure.
    #[serde(default = "yes")]
    pub connect_errors: bool,
    /// A call that times out counts as a failure.
    #[serde(default = "yes")]
    pub timeouts: bool,
}

impl Default for FailureOn {
    fn default() -> Self {
        Self {
            status5xx: true,
            connect_errors: true,
            timeouts: true,
        }
    }
}

fn yes() -> bool {
    true
}

/// At most `maxConcurrent` calls in flight and `maxQueue` waiting; beyond that, fail fast.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct BulkheadPolicy {
    /// Calls in flight at most.
    #[schemars(range(min = 1, max = 100000))]
    pub max_concurrent: u32,
    /// Calls waiting for a slot at most; beyond it, fail fast (the fallback, or 503).
    #[serde(default)]
    #[schemars(range(min = 0, max = 100000))]
    pub max_queue: u32,
}

/// How each call picks one of the dependency's endpoints: the ready pods of a Microservice
/// (through its headless `<name>-weir-endpoints` Service), or the addresses a URL's host
/// resolves to. Per call rather than per connection, so one long-lived HTTP/2 connection does
/// not pin every call to one pod. Applied with its defaults when left out.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct LoadBalancerPolicy {
    /// `peakEwma` (the default): of two endpoints picked at random, the one with the lower
    /// latency estimate times calls in flight, so a slow or overloaded pod gets fewer calls
    /// (Linkerd's balancer). `roundRobin`: each endpoint in turn, blind to latency, for
    /// upstreams whose cost per call is even and known.
    #[serde(default)]
    pub algorithm: LoadBalancerAlgorithm,
    /// How fast the latency estimate forgets a slow answer: a spike counts at once, then fades
    /// over about this long. Shorter follows changes faster and is noisier. Greater than 0.
    #[serde(default = "default_decay")]
    #[schemars(pattern(DURATION_PATTERN))]
    pub decay: String,
    /// How long a new endpoint takes to reach its full share of calls, so a pod that just
    /// started (cold caches, JIT) is not handed a full share at once. `0s` turns it off.
    #[serde(default = "default_slow_start")]
    #[schemars(pattern(DURATION_PATTERN))]
    pub slow_start: String,
}

impl Default for LoadBalancerPolicy {
    fn default() -> Self {
        Self {
            algorithm: LoadBalancerAlgorithm::default(),
            decay: default_decay(),
            slow_start: default_slow_start(),
        }
    }
}

/// How one of several endpoints is chosen for a call.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub enum LoadBalancerAlgorithm {
    /// Power of two choices over peak-EWMA latency weighted by calls in flight.
    #[default]
    PeakEwma,
    /// Each endpoint in turn.
    RoundRobin,
}

fn default_decay() -> String {
    "10s".into()
}
fn default_slow_start() -> String {
    "10s".into()
}

/// Takes an endpoint out of the balancer's choice after `consecutiveFailures` gateway failures
/// in a row (a refused or reset connection, 502, 503, 504, gRPC `UNAVAILABLE`), for
/// `baseEjectionTime`, doubled at each next ejection up to `maxEjectionTime`; then it is chosen
/// again. A single failing pod then costs a few calls instead of its share of every call,
/// while the circuit breaker still judges the dependency as a whole. Applied with its defaults
/// when left out.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct OutlierDetectionPolicy {
    /// Gateway failures in a row that eject an endpoint. An application error (a 500, a gRPC
    /// `INTERNAL`) says the pod answered: it never counts.
    #[serde(default = "default_consecutive_failures")]
    #[schemars(range(min = 1, max = 1000))]
    pub consecutive_failures: u32,
    /// The first ejection's length; each next one doubles it. Greater than 0.
    #[serde(default = "default_base_ejection_time")]
    #[schemars(pattern(DURATION_PATTERN))]
    pub base_ejection_time: String,
    /// The longest ejection, so a pod that recovers is tried again within this long. At least
    /// `baseEjectionTime`.
    #[serde(default = "default_max_ejection_time")]
    #[schemars(pattern(DURATION_PATTERN))]
    pub max_ejection_time: String,
    /// The largest share of endpoints ejected at once, in percent, so a fault of the caller
    /// (or of every pod at once) cannot eject them all; at least one endpoint always stays.
    /// `0` never ejects.
    #[serde(default = "default_max_ejection_percent")]
    #[schemars(range(min = 0, max = 100))]
    pub max_ejection_percent: u32,
}

impl Default for OutlierDetectionPolicy {
    fn default() -> Self {
        Self {
            consecutive_failures: default_consecutive_failures(),
            base_ejection_time: default_base_ejection_time(),
            max_ejection_time: default_max_ejection_time(),
            max_ejection_percent: default_max_ejection_percent(),
        }
    }
}

fn default_consecutive_failures() -> u32 {
    5
}
fn default_base_ejection_time() -> String {
    "30s".into()
}
fn default_max_ejection_time() -> String {
    "5m".into()
}
fn default_max_ejection_percent() -> u32 {
    50
}

/// Served when the breaker is open or the bulkhead is full.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct FallbackPolicy {
    /// Status code of the fallback answer.
    #[serde(default = "default_fallback_status")]
    #[schemars(range(min = 200, max = 599))]
    pub status: u16,
    // Not a schema default: Kubernetes 1.20 refuses an empty-string default in a CRD.
    /// Body of the fallback answer.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub body: String,
    /// `Content-Type` of the fallback answer.
    #[serde(default = "default_content_type")]
    pub content_type: String,
    /// For gRPC calls: answer with this status instead (Trailers-Only, no message; `OK` ends
    /// a server stream empty, and is an error to a unary caller, who expects a message). Left
    /// out, gRPC calls get the refusal itself as a status (`UNAVAILABLE`, `RESOURCE_EXHAUSTED`):
    /// an HTTP body is nothing a gRPC client can read.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub grpc_status: Option<GrpcCode>,
    /// The `grpc-message` sent with `grpcStatus`.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    #[schemars(length(max = 1024))]
    pub grpc_message: String,
}

fn default_fallback_status() -> u16 {
    200
}
fn default_content_type() -> String {
    "application/json".into()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grpc_code_names_are_what_the_resources_spell() {
        for (n, name) in crate::proxy::GRPC_CODE_NAMES.iter().enumerate() {
            let code: GrpcCode = serde_json::from_value(serde_json::json!(name)).unwrap();
            assert_eq!(usize::from(code.code()), n, "{name}");
            assert_eq!(GrpcCode::name_of(code.code()), *name);
        }
        assert_eq!(GrpcCode::name_of(17), "UNKNOWN");
    }
}
