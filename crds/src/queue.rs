//! `Queue`: a durable queue on a Broker, with its consumers' delivery policy, its dead-letter
//! queue and the JSON Schema its messages must satisfy.

use crate::duration::DURATION_PATTERN;
use crate::preserve_unknown_object;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition;
use kube::CustomResource;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

/// A durable queue on a Broker: what it captures and keeps, how its consumers get messages,
/// where failed messages go, and the JSON Schema every message must satisfy.
#[derive(CustomResource, Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[kube(
    group = "weir.dev",
    version = "v1alpha1",
    kind = "Queue",
    doc = "A durable queue on a Broker: subjects, retention, delivery policy, dead letters and the JSON Schema of its messages. Microservices publish to it and consume from it through their sidecars.",
    namespaced,
    status = "QueueStatus",
    shortname = "wq",
    category = "weir",
    printcolumn(
        name = "Ready",
        type_ = "string",
        json_path = ".status.conditions[?(@.type==\"Ready\")].status"
    ),
    printcolumn(name = "Broker", type_ = "string", json_path = ".spec.broker"),
    printcolumn(name = "Messages", type_ = "integer", json_path = ".status.messages"),
    printcolumn(
        name = "Dead-Letters",
        type_ = "integer",
        json_path = ".status.deadLetters"
    ),
    printcolumn(
        name = "Age",
        type_ = "date",
        json_path = ".metadata.creationTimestamp"
    )
)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct QueueSpec {
    /// Name of a Broker in the same namespace.
    #[schemars(length(min = 1))]
    pub broker: String,
    /// Subjects captured by the queue; defaults to `weir.<namespace>.<queue>`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 100))]
    pub subjects: Vec<String>,
    /// When the broker removes messages: `Limits` (the default: by maxAge, maxMessages and maxBytes),
    /// `WorkQueue` (once one consumer acknowledged) or `Interest` (once every consumer did).
    /// Redis and RabbitMQ apply `Limits` only (condition `SettingsApplied` says so).
    #[serde(default)]
    pub retention: Retention,
    /// `File` survives broker restarts; `Memory` only when asked for.
    #[serde(default)]
    pub storage: Storage,
    /// Copies of each message on a clustered broker (NATS stream replicas, RabbitMQ quorum size,
    /// Kafka replication factor).
    #[serde(default = "one")]
    #[schemars(range(min = 1, max = 5))]
    pub replicas: i32,
    /// Partitions of the Kafka topic (Kafka only): events of one partition key stay in order,
    /// partitions are consumed in parallel. Kafka can add partitions, never remove them.
    #[serde(default = "one")]
    #[schemars(range(min = 1, max = 10000))]
    pub partitions: i32,
    /// Messages older than this are removed; no age limit when left out.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(pattern(DURATION_PATTERN))]
    pub max_age: Option<String>,
    /// Most messages kept; the oldest go first. No count limit when left out.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1))]
    pub max_messages: Option<i64>,
    /// Most bytes kept; the oldest messages go first. No size limit when left out.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1))]
    pub max_bytes: Option<i64>,
    /// Window in which a repeated event id is dropped by the broker.
    #[serde(default = "default_dup_window")]
    #[schemars(pattern(DURATION_PATTERN))]
    pub duplicate_window: String,
    /// How each consuming Microservice receives messages: deliveries, ack wait, backoff, in flight.
    #[serde(default)]
    pub consumer: ConsumerSettings,
    /// Where messages that cannot be delivered go, with the reason, and for how long.
    #[serde(default)]
    pub dead_letter: DeadLetterSettings,
    /// JSON Schema (draft 2020-12) of the messages.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub schema: Option<MessageSchema>,
    /// CloudEvents `type` of the events; defaults to the queue's name.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub event_type: Option<String>,
    /// `Retain` (the default) keeps the stream and its messages when the Queue is deleted;
    /// `Delete` removes them.
    #[serde(default)]
    pub deletion_policy: DeletionPolicy,
}

fn one() -> i32 {
    1
}
fn default_dup_window() -> String {
    "2m".into()
}

/// When the broker removes a Queue's messages.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, JsonSchema, Default)]
pub enum Retention {
    /// By `maxAge`, `maxMessages` and `maxBytes` (the default, and all Redis and RabbitMQ apply).
    #[default]
    Limits,
    /// Once one consumer acknowledged the message.
    WorkQueue,
    /// Once every consumer acknowledged the message.
    Interest,
}

/// Where the broker keeps a Queue's messages.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, JsonSchema, Default)]
pub enum Storage {
    /// On disk: messages survive a broker restart (the default).
    #[default]
    File,
    /// In memory: faster, lost when the broker restarts.
    Memory,
}

/// What deleting a Queue does to its stream on the broker.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, JsonSchema, Default)]
pub enum DeletionPolicy {
    /// Deleting the Queue leaves the stream and its messages on the broker.
    #[default]
    Retain,
    /// Deleting the Queue deletes the stream, its consumers and its dead letters.
    Delete,
}

/// How each consuming Microservice receives a Queue's messages.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
#[schemars(extend("x-kubernetes-validations" = [
    {"rule": "size(self.backoff) <= self.maxDeliveries", "message": "backoff has more entries than maxDeliveries", "fieldPath": ".backoff"}
]))]
pub struct ConsumerSettings {
    /// Deliveries before a message is dead-lettered.
    #[serde(default = "default_max_deliveries")]
    #[schemars(range(min = 1, max = 1000))]
    pub max_deliveries: i32,
    /// Time the consumer has to answer before the message is redelivered.
    #[serde(default = "default_ack_wait")]
    #[schemars(pattern(DURATION_PATTERN))]
    pub ack_wait: String,
    /// Delay before each redelivery; the last entry repeats.
    #[serde(default = "default_backoff")]
    #[schemars(length(max = 100))]
    pub backoff: Vec<DurationString>,
    /// Messages delivered and not yet answered, per consumer, before the broker waits.
    #[serde(default = "default_max_ack_pending")]
    #[schemars(range(min = 1, max = 100000))]
    pub max_ack_pending: i32,
}

impl Default for ConsumerSettings {
    fn default() -> Self {
        Self {
            max_deliveries: default_max_deliveries(),
            ack_wait: default_ack_wait(),
            backoff: default_backoff(),
            max_ack_pending: default_max_ack_pending(),
        }
    }
}

/// A duration string such as `500ms` or `1m30s`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(transparent)]
pub struct DurationString(pub String);

impl JsonSchema for DurationString {
    fn schema_name() -> std::borrow::Cow<'static, str> {
        "Duration".into()
    }
    fn inline_schema() -> bool {
        true
    }
    fn json_schema(_: &mut schemars::SchemaGenerator) -> schemars::Schema {
        schemars::json_schema!({"type": "string", "pattern": DURATION_PATTERN})
    }
}

fn default_max_deliveries() -> i32 {
    5
}
fn default_ack_wait() -> String {
    "30s".into()
}
fn default_backoff() -> Vec<DurationString> {
    ["1s", "5s", "30s"]
        .into_iter()
        .map(|s| DurationString(s.into()))
        .collect()
}
fn default_max_ack_pending() -> i32 {
    1000
}

/// The dead-letter queue: messages that cannot be delivered, each with its reason.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct DeadLetterSettings {
    /// Dead letters are kept unless this is false (then failed messages stay on the queue's stream).
    #[serde(default = "yes")]
    pub enabled: bool,
    /// How long dead letters are kept.
    #[serde(default = "default_dlq_age")]
    #[schemars(pattern(DURATION_PATTERN))]
    pub max_age: String,
}

impl Default for DeadLetterSettings {
    fn default() -> Self {
        Self {
            enabled: true,
            max_age: default_dlq_age(),
        }
    }
}

fn yes() -> bool {
    true
}
fn default_dlq_age() -> String {
    "336h".into()
}

/// The schema inline, or a key of a ConfigMap holding it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
#[schemars(extend("x-kubernetes-validations" = [
    {"rule": "has(self.inline) != has(self.configMapRef)", "message": "set exactly one of inline or configMapRef"}
]))]
pub struct MessageSchema {
    /// The JSON Schema itself.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(schema_with = "preserve_unknown_object")]
    pub inline: Option<serde_json::Value>,
    /// A key of a ConfigMap in the Queue's namespace holding the JSON Schema.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub config_map_ref: Option<ConfigMapKeyRef>,
}

/// One key of a ConfigMap in the Queue's namespace.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ConfigMapKeyRef {
    /// Name of the ConfigMap, in the Queue's namespace.
    pub name: String,
    /// Key in the ConfigMap's data.
    pub key: String,
}

/// What the operator last saw of the queue on its broker.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema, Default)]
#[serde(rename_all = "camelCase")]
pub struct QueueStatus {
    /// The `metadata.generation` this status describes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// `Ready` (the stream and consumers exist on the broker, or why not) and `SettingsApplied`
    /// (settings this broker kind does not apply, named).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(extend("x-kubernetes-list-type" = "map", "x-kubernetes-list-map-keys" = ["type"]))]
    pub conditions: Vec<Condition>,
    /// Messages on the stream.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub messages: Option<i64>,
    /// Messages pending per consumer (Microservice).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub pending: BTreeMap<String, i64>,
    /// Messages in the dead-letter queue.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dead_letters: Option<i64>,
}
