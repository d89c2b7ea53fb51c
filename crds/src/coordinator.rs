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
pub const CONFIG_KEY: &str = "saga.json";
/// Port of the coordinator's HTTP listener (triggers, timelines, `/metrics`).
pub const COORDINATOR_PORT: u16 = 8080;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct CoordinatorConfig {
    pub namespace: String,
    pub name: String,
    /// `nats://host:4222`.
    pub broker_url: String,
    /// Directory holding the Broker's credentials Secret (one file per key), if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub credentials_file: Option<String>,
    pub listen: SocketAddr,
    /// Lease of one instance: a replica that stops renewing it for this long loses the instance.
    pub lease_ttl_ms: u64,
    /// Base URL of each HTTP target (a dependency's local sidecar port, or the target itself).
    pub targets: BTreeMap<String, String>,
    pub steps: Vec<StepConfig>,
    pub compensation_retry: RetryConfig,
    #[serde(default)]
    pub trigger: TriggerConfig,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub on_completed: Option<OutcomeConfig>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub on_failed: Option<OutcomeConfig>,
    /// A sidecar's admin URL: outcome events are published through its publish endpoint rather
    /// than on NATS (queues on Redis or RabbitMQ; `weir up --broker`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub publish_url: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct StepConfig {
    pub name: String,
    pub action: CallConfig,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub compensation: Option<CallConfig>,
    /// Deadline of one attempt.
    pub timeout_ms: u64,
    pub retry: RetryConfig,
}

/// Attempts with exponential backoff and full jitter, run by the coordinator.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct RetryConfig {
    /// Total attempts including the first.
    pub attempts: u32,
    pub backoff_base_ms: u64,
    pub backoff_max_ms: u64,
}

impl RetryConfig {
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

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub enum CallConfig {
    Http(HttpCallConfig),
    Request(RequestConfig),
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct HttpCallConfig {
    /// Key of [`CoordinatorConfig::targets`].
    pub target: String,
    pub method: String,
    pub path: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub body: Option<Value>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct RequestConfig {
    pub subject: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub body: Option<Value>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct TriggerConfig {
    pub http: bool,
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

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct QueueTriggerConfig {
    pub queue: String,
    pub stream: String,
    pub subjects: Vec<String>,
    /// Durable consumer: `saga-<name>`.
    pub consumer: String,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct OutcomeConfig {
    pub queue: String,
    pub subject: String,
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
