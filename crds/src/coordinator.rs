//! The saga coordinator's config contract: a Saga spec resolved (durations in milliseconds,
//! targets as base URLs, queues as subjects). Written by the operator into the `<saga>-saga`
//! ConfigMap, by tests and by `weir up` into a file; read by `weir saga-coordinator --config
//! <file>`. Like [`crate::proxy`], parsed and validated once, errors naming the field.

pub use crate::config_error::ConfigError;
use serde::{Deserialize, Serialize};
use serde_json::Value;
use std::collections::BTreeMap;
use std::net::SocketAddr;

/// Where the config is mounted in the coordinator container, and its file name.
pub const CONFIG_MOUNT_PATH: &str = "/etc/weir-saga";
/// The ConfigMap key holding the config, and its file name under [`CONFIG_MOUNT_PATH`].
pub const CONFIG_KEY: &str = "saga.json";
/// Port of the coordinator's HTTP listener (triggers, timelines, `/metrics`).
pub const COORDINATOR_PORT: u16 = 8080;

/// The whole of `saga.json`: one Saga, resolved for its coordinator.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct CoordinatorConfig {
    /// The Saga's namespace; with `name` it names the log stream, the leases and the events.
    pub namespace: String,
    /// The Saga's name.
    pub name: String,
    /// `nats://host:4222`.
    pub broker_url: String,
    /// Directory holding the Broker's credentials Secret (one file per key), if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub credentials_file: Option<String>,
    /// Where the coordinator's HTTP listener binds (triggers, timelines, `/metrics`).
    pub listen: SocketAddr,
    /// Lease of one instance: a replica that stops renewing it for this long loses the instance.
    pub lease_ttl_ms: u64,
    /// Base URL of each HTTP target (a dependency's local sidecar port, or the target itself).
    pub targets: BTreeMap<String, String>,
    /// The steps in order; at least one.
    pub steps: Vec<StepConfig>,
    /// Retries of a failing compensation before the instance ends `CompensationFailed`.
    pub compensation_retry: RetryConfig,
    /// How instances start; left out: over HTTP only.
    #[serde(default)]
    pub trigger: TriggerConfig,
    /// Event published when an instance completes; `None`: no event.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub on_completed: Option<OutcomeConfig>,
    /// Event published when an instance fails, after its compensations; `None`: no event.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub on_failed: Option<OutcomeConfig>,
    /// A sidecar's admin URL: outcome events are published through its publish endpoint rather
    /// than on NATS (queues on Redis or RabbitMQ; `weir up --broker`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub publish_url: Option<String>,
    /// Where each target really is when `targets` points at a sidecar's dependency port (a
    /// Microservice's Service URL, an external URL's base). Stored with each definition an
    /// instance runs: an instance started on a definition whose target is no longer in
    /// `targets` calls it there, around the sidecar. Left out: `targets` are direct.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub direct_targets: BTreeMap<String, String>,
    /// How long finished instances are kept on the log (ms) before the coordinator purges
    /// them; left out: 30 days (the log stream's age).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retention_ms: Option<u64>,
}

/// One step, resolved: its calls, its deadline and its retries.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct StepConfig {
    /// Names the step in the log, metrics and templates (`{{steps.<name>.result}}`).
    pub name: String,
    /// What the step does.
    pub action: CallConfig,
    /// Undoes the action; `None`: the step is not compensated.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub compensation: Option<CallConfig>,
    /// Deadline of one attempt.
    pub timeout_ms: u64,
    /// Retries of a failing action before the saga compensates.
    pub retry: RetryConfig,
}

/// Attempts with exponential backoff and full jitter, run by the coordinator.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct RetryConfig {
    /// Total attempts including the first.
    pub attempts: u32,
    /// Longest wait (ms) before the first retry; it doubles at each retry after.
    pub backoff_base_ms: u64,
    /// Cap (ms) on the longest wait before any retry.
    pub backoff_max_ms: u64,
}

impl RetryConfig {
    /// A single attempt: the policy of a step without `retry`.
    pub const ONCE: RetryConfig = RetryConfig {
        attempts: 1,
        backoff_base_ms: 100,
        backoff_max_ms: 2000,
    };

    /// Longest wait before attempt `n` (2 = first retry): `min(max, base * 2^(n-2))`. The
    /// coordinator waits a random time in `[0, this]` (full jitter).
    pub fn backoff_cap_ms(&self, n: u32) -> u64 {
        let exp = n.saturating_sub(2).min(20);
        self.backoff_base_ms
            .saturating_mul(1 << exp)
            .min(self.backoff_max_ms)
    }
}

/// What a step's action or compensation calls.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub enum CallConfig {
    /// An HTTP call to one of the targets; its JSON answer is the step's result.
    Http(HttpCallConfig),
    /// A request/reply on a broker subject; the reply is the step's result.
    Request(RequestConfig),
}

/// An HTTP call to one of the coordinator's targets.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct HttpCallConfig {
    /// Key of [`CoordinatorConfig::targets`].
    pub target: String,
    /// HTTP method; one that does not parse is sent as POST.
    pub method: String,
    /// Appended to the target's base URL; for a URL target it starts with the URL's own path.
    pub path: String,
    /// JSON request body, a template: `{{input.x}}` and
    /// `{{steps.<name>.result.y}}` are replaced by values.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub body: Option<Value>,
}

/// A request/reply on the Saga's broker.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct RequestConfig {
    /// Subject the request is published on; the first reply answers it.
    pub subject: String,
    /// JSON request body, a template: `{{input.x}}` and
    /// `{{steps.<name>.result.y}}` are replaced by values.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub body: Option<Value>,
}

/// How instances start.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct TriggerConfig {
    /// Instances may start with `POST /v1/sagas/<name>` on the coordinator.
    pub http: bool,
    /// One instance per event on this Queue; `None`: no queue trigger.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub queue: Option<QueueTriggerConfig>,
}

impl Default for TriggerConfig {
    fn default() -> Self {
        Self {
            http: true,
            queue: None,
        }
    }
}

/// The Queue whose events each start an instance.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct QueueTriggerConfig {
    /// The Queue resource name.
    pub queue: String,
    /// The Queue's stream on the broker.
    pub stream: String,
    /// The Queue's subjects: the durable consumer's filter.
    pub subjects: Vec<String>,
    /// Durable consumer: `saga-<name>`.
    pub consumer: String,
}

/// A CloudEvent published on a Queue when an instance ends.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct OutcomeConfig {
    /// The Queue resource name (the publish path when the event goes through a sidecar).
    pub queue: String,
    /// Subject the event is published on.
    pub subject: String,
    /// CloudEvents `type`, e.g. `OrderConfirmed`.
    pub event_type: String,
}

impl CoordinatorConfig {
    /// Parses and validates a config file's contents; the error names the offending field.
    pub fn from_json(text: &str) -> Result<Self, ConfigError> {
        let c: Self = crate::config_error::parse_json(text)?;
        c.validate()?;
        Ok(c)
    }

    /// Checks what serde cannot: at least one step, positive deadlines and attempts, and every
    /// HTTP call's target among `targets`.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let err = |field: String, message: &str| ConfigError {
            field,
            message: message.into(),
        };
        if self.steps.is_empty() {
            return Err(err("steps".into(), "needs at least one step"));
        }
        if self.lease_ttl_ms < 100 {
            return Err(err("leaseTtlMs".into(), "must be at least 100"));
        }
        for (i, s) in self.steps.iter().enumerate() {
            if s.timeout_ms == 0 {
                return Err(err(format!("steps[{i}].timeoutMs"), "must be > 0"));
            }
            if s.retry.attempts == 0 {
                return Err(err(format!("steps[{i}].retry.attempts"), "must be >= 1"));
            }
            for (which, c) in std::iter::once(("action", &s.action))
                .chain(s.compensation.iter().map(|c| ("compensation", c)))
            {
                if let CallConfig::Http(h) = c
                    && !self.targets.contains_key(&h.target)
                {
                    return Err(err(
                        format!("steps[{i}].{which}.http.target"),
                        &format!("no target {:?} in targets", h.target),
                    ));
                }
            }
        }
        if self.compensation_retry.attempts == 0 {
            return Err(err("compensationRetry.attempts".into(), "must be >= 1"));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_from_base_up_to_max() {
        let r = RetryConfig {
            attempts: 5,
            backoff_base_ms: 100,
            backoff_max_ms: 350,
        };
        let caps: Vec<u64> = (2..=5).map(|n| r.backoff_cap_ms(n)).collect();
        assert_eq!(caps, [100, 200, 350, 350]);
    }

    #[test]
    fn errors_name_the_field() {
        let text = r#"{"namespace": "shop", "name": "place-order", "brokerUrl": "nats://n:4222",
            "listen": "0.0.0.0:8080", "leaseTtlMs": 5000, "targets": {},
            "steps": [{"name": "charge", "timeoutMs": 1000,
                       "retry": {"attempts": 1, "backoffBaseMs": 100, "backoffMaxMs": 200},
                       "action": {"http": {"target": "payments", "method": "POST", "path": "/"}}}],
            "compensationRetry": {"attempts": 1, "backoffBaseMs": 100, "backoffMaxMs": 200}}"#;
        let e = CoordinatorConfig::from_json(text).unwrap_err();
        assert_eq!(e.field, "steps[0].action.http.target");
        let e = CoordinatorConfig::from_json("{\"namespace\": 1}").unwrap_err();
        assert!(e.field.starts_with("line 1 column"), "{e}");
    }
}
