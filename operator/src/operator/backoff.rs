//! Requeue backoff on reconcile failures, shared by every controller: per object
//! (`Kind/namespace/name`), each consecutive failure doubles the delay, 5s up to 5m; a success
//! resets it.

use super::metrics::Metrics;
use kube::{Resource, ResourceExt};
use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Duration;

#[derive(Default)]
pub struct Backoff(Mutex<HashMap<String, u32>>);

impl Backoff {
    pub fn next_delay(&self, key: &str) -> Duration {
        let mut map = self.0.lock().expect("backoff lock");
        let n = map.entry(key.to_string()).or_insert(0);
        *n = n.saturating_add(1);
        Duration::from_secs(5u64.saturating_mul(1 << (*n - 1).min(6))).min(Duration::from_secs(300))
    }

    pub fn reset(&self, key: &str) {
        self.0.lock().expect("backoff lock").remove(key);
    }
}

/// The backoff key of an object: `Kind/namespace/name`.
pub fn key(kind: &str, namespace: Option<&str>, name: &str) -> String {
    format!("{kind}/{}/{name}", namespace.unwrap_or_default())
}

/// The backoff key of `obj` ([`key`]).
pub fn key_of<K: Resource<DynamicType = ()>>(obj: &K) -> String {
    key(&K::kind(&()), obj.namespace().as_deref(), &obj.name_any())
}

/// What every controller does with a failed reconcile of `obj`: logs it, counts it by the
/// error's metric `label`, and gives the delay of the object's next try.
pub fn after_failure<K: Resource<DynamicType = ()>>(
    backoff: &Backoff,
    metrics: &Metrics,
    obj: &K,
    error: &dyn std::fmt::Display,
    label: &str,
) -> Duration {
    let delay = backoff.next_delay(&key_of(obj));
    tracing::warn!(
        kind = %K::kind(&()),
        name = %obj.name_any(),
        namespace = ?obj.namespace(),
        %error,
        retry_in = ?delay,
        "reconcile failed"
    );
    metrics.failed(&K::kind(&()), label);
    delay
}

/// Logs what a controller's stream yields when it is an error (already handled by the error
/// policy; kept at debug level so the failure is not logged twice at warn).
pub async fn log_outcome<T, E: std::fmt::Display>(res: Result<T, E>) {
    if let Err(e) = res {
        tracing::debug!(error = %e, "reconcile failed");
    }
}
