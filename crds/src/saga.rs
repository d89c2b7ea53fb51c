//! `Saga`: ordered steps, each an action and its compensation, run by a crash-safe coordinator.

use crate::duration::{DURATION_PATTERN, LONG_DURATION_PATTERN};
use crate::policy::{RetryPolicy, default_timeout};
use crate::preserve_unknown_fields;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition;
use kube::CustomResource;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// A business transaction across services: steps run in order, and on a failure the completed
/// ones are undone in reverse. A coordinator Deployment runs it; each instance's log is on the
/// broker, so a coordinator crash resumes where it stopped.
#[derive(CustomResource, Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[kube(
    group = "weir.dev",
    version = "v1alpha1",
    kind = "Saga",
    doc = "Ordered steps, each an action with an optional compensation, run by a crash-safe coordinator whose state lives on the broker. Status counts instances by outcome.",
    namespaced,
    status = "SagaStatus",
    shortname = "sg",
    category = "weir",
    printcolumn(
        name = "Ready",
        type_ = "string",
        json_path = ".status.conditions[?(@.type==\"Ready\")].status"
    ),
    printcolumn(name = "Steps", type_ = "integer", json_path = ".status.steps"),
    printcolumn(name = "Running", type_ = "integer", json_path = ".status.running"),
    printcolumn(name = "Completed", type_ = "integer", json_path = ".status.completed"),
    printcolumn(
        name = "Compensated",
        type_ = "integer",
        json_path = ".status.compensated"
    ),
    printcolumn(name = "Failed", type_ = "integer", json_path = ".status.failed"),
    printcolumn(
        name = "Age",
        type_ = "date",
        json_path = ".metadata.creationTimestamp"
    )
)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct SagaSpec {
    /// Broker holding the instances' logs (JetStream).
    #[schemars(length(min = 1))]
    pub broker: String,
    /// Coordinator replicas; each instance is driven by one replica at a time.
    #[serde(default = "one")]
    #[schemars(range(min = 0, max = 10))]
    pub replicas: i32,
    /// How instances start: over HTTP on the coordinator, and/or one per event on a Queue.
    #[serde(default)]
    pub trigger: SagaTrigger,
    /// The steps in order; on a failure the completed ones are compensated in reverse order.
    #[schemars(length(min = 1, max = 50))]
    #[schemars(extend("x-kubernetes-list-type" = "map", "x-kubernetes-list-map-keys" = ["name"]))]
    pub steps: Vec<SagaStep>,
    /// Retries of a failing compensation before the instance ends `CompensationFailed`.
    #[serde(default = "default_comp_retry")]
    pub compensation_retry: RetryPolicy,
    /// An event published when an instance completes; none when left out.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub on_completed: Option<OutcomeEvent>,
    /// An event published when an instance fails (after its compensations); none when left out.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub on_failed: Option<OutcomeEvent>,
    /// How long finished instances are kept on the broker before the coordinator purges them
    /// (`7d`, `12h`); 30 days when left out.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(pattern(LONG_DURATION_PATTERN))]
    pub retention: Option<String>,
}

fn one() -> i32 {
    1
}

fn default_comp_retry() -> RetryPolicy {
    RetryPolicy {
        attempts: 5,
        backoff: Default::default(),
        budget: Default::default(),
        retry_non_idempotent: true,
    }
}

/// How instances of the saga start.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct SagaTrigger {
    /// Start instances with `POST /v1/sagas/<name>` on the coordinator.
    #[serde(default = "yes")]
    pub http: bool,
    /// Start an instance for each event on this Queue.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub queue: Option<String>,
}

impl Default for SagaTrigger {
    fn default() -> Self {
        Self {
            http: true,
            queue: None,
        }
    }
}

fn yes() -> bool {
    true
}

/// One step: an action, its compensation, its deadline and its retries.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct SagaStep {
    /// Names the step in logs, metrics and templates (`{{steps.<name>.result}}`).
    #[schemars(regex(pattern = r"^[a-z]([-a-z0-9]{0,38}[a-z0-9])?$"))]
    pub name: String,
    /// What the step does.
    pub action: SagaAction,
    /// Undoes the action; steps without one are not compensated.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub compensation: Option<SagaAction>,
    /// Deadline of one attempt of the action.
    #[serde(default = "default_timeout")]
    #[schemars(pattern(DURATION_PATTERN))]
    pub timeout: String,
    /// Retries of a failing action before the saga compensates; one attempt when left out.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retry: Option<RetryPolicy>,
}

/// An HTTP call to a dependency, or a request/reply on a broker subject.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
#[schemars(extend("x-kubernetes-validations" = [
    {"rule": "has(self.http) != has(self.request)", "message": "set exactly one of http or request"}
]))]
pub struct SagaAction {
    /// An HTTP call to a Microservice of the namespace or to a URL.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub http: Option<HttpCall>,
    /// A request on a broker subject; the reply is the step's result.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub request: Option<BrokerRequest>,
}

/// An HTTP call; its JSON answer is the step's result.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
#[schemars(extend("x-kubernetes-validations" = [
    {"rule": "has(self.microservice) != has(self.url)", "message": "set exactly one of microservice or url"}
]))]
pub struct HttpCall {
    /// Name of a Microservice in the same namespace (called through its Service).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub microservice: Option<String>,
    /// An external base URL (`http://` or `https://`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(regex(pattern = r"^https?://\S+$"))]
    pub url: Option<String>,
    /// HTTP method of the call.
    #[serde(default = "default_method")]
    #[schemars(extend("enum" = ["GET", "POST", "PUT", "PATCH", "DELETE"]))]
    pub method: String,
    /// Path of the call, appended to the Microservice's or the URL's base.
    #[schemars(regex(pattern = r"^/"))]
    pub path: String,
    /// Request body; `{{input.x}}` and `{{steps.<name>.result.y}}` are replaced by values.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(schema_with = "preserve_unknown_fields")]
    pub body: Option<serde_json::Value>,
}

fn default_method() -> String {
    "POST".into()
}

/// A request/reply on the saga's broker.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct BrokerRequest {
    /// Subject the request is published on; the first reply answers it.
    pub subject: String,
    /// Request body; `{{input.x}}` and `{{steps.<name>.result.y}}` are replaced by values.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(schema_with = "preserve_unknown_fields")]
    pub body: Option<serde_json::Value>,
}

/// A CloudEvent published on a Queue when an instance ends.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct OutcomeEvent {
    /// Queue the outcome event is published to.
    pub queue: String,
    /// CloudEvents `type`, e.g. `OrderConfirmed`.
    #[serde(rename = "type")]
    pub event_type: String,
}

/// The coordinator's counts of instances, and the conditions.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema, Default)]
#[serde(rename_all = "camelCase")]
pub struct SagaStatus {
    /// The `metadata.generation` this status describes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// `Ready` (the coordinator runs and reaches its broker, or why not) and `Degraded`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(extend("x-kubernetes-list-type" = "map", "x-kubernetes-list-map-keys" = ["type"]))]
    pub conditions: Vec<Condition>,
    /// Steps in the spec.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub steps: Option<i32>,
    /// Instances in progress.
    #[serde(default)]
    pub running: i64,
    /// Instances that completed.
    #[serde(default)]
    pub completed: i64,
    /// Instances that failed and were compensated.
    #[serde(default)]
    pub compensated: i64,
    /// Instances that failed and could not be fully compensated.
    #[serde(default)]
    pub failed: i64,
    /// The most recent failure: instance, step and reason.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_failure: Option<String>,
    /// Instances cancelled on request (their steps compensated).
    #[serde(default)]
    pub cancelled: i64,
    /// The versions (definitions) instances run: the current one (new instances start on it)
    /// and every older one that still has instances in progress.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(extend("x-kubernetes-list-type" = "map", "x-kubernetes-list-map-keys" = ["version"]))]
    pub versions: Vec<SagaVersionStatus>,
}

/// How many instances run one version of the saga's steps.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema, Default)]
#[serde(rename_all = "camelCase")]
pub struct SagaVersionStatus {
    /// Content hash of the steps and compensation policy (12 hex digits); `unversioned` for
    /// instances started before versions existed.
    pub version: String,
    /// Instances of this version in progress.
    pub running: i64,
    /// Whether new instances start on this version.
    #[serde(default)]
    pub current: bool,
}
