//! Requeue backoff on reconcile failures, shared by every controller: per object
//! (`Kind/namespace/name`), each consecutive failure doubles the delay, 5s up to 5m; a success
//! resets it.

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
