//! librdkafka's own log and error callbacks, quieted for the sidecar.
//!
//! A broker that cannot be reached (down, a refused certificate) makes librdkafka report the same
//! failure on every reconnect attempt, about ten times a second and from every client (producer,
//! group member, processed-event reader): dozens of identical log lines a second. [`Quiet`] logs
//! each distinct failure once (lines that differ only in their figures, such as "after 3ms",
//! count as one) until the broker is usable again ([`Quiet::connected`]), and keeps the last one
//! so that the health check can say why the broker is not usable.

use rdkafka::ClientContext;
use rdkafka::config::RDKafkaLogLevel;
use rdkafka::error::KafkaError;
use std::collections::HashSet;
use std::sync::{Arc, Mutex};

/// Distinct failures remembered before the memory starts over.
const REMEMBERED: usize = 64;

/// A client context shared by one sidecar's Kafka clients (cheap to clone).
#[derive(Clone, Default)]
pub struct Quiet {
    inner: Arc<Mutex<Seen>>,
}

#[derive(Default)]
struct Seen {
    logged: HashSet<String>,
    last: Option<String>,
}

/// `text` without its figures: what tells one failure from another.
pub(crate) fn shape(text: &str) -> String {
    text.chars().filter(|c| !c.is_ascii_digit()).collect()
}

impl Quiet {
    /// Whether `text` is the first of its shape since the broker was last usable (and notes it
    /// as the last failure).
    fn first(&self, text: &str) -> bool {
        let mut s = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        // "All broker connections are down" sums up; the failure before it says why.
        if !text.contains("AllBrokersDown") || s.last.is_none() {
            s.last = Some(text.to_string());
        }
        if s.logged.len() >= REMEMBERED {
            s.logged.clear();
        }
        s.logged.insert(shape(text))
    }

    /// The last failure librdkafka reported, if any since the broker was last usable.
    pub fn last_error(&self) -> Option<String> {
        self.inner
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .last
            .clone()
    }

    /// The broker is usable: failures are logged again when they come back.
    pub fn connected(&self) {
        let mut s = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        s.logged.clear();
        s.last = None;
    }

    /// [`ClientContext::log`] of a context that embeds this one.
    pub fn log(&self, level: RDKafkaLogLevel, fac: &str, message: &str) {
        match level {
            RDKafkaLogLevel::Emerg
            | RDKafkaLogLevel::Alert
            | RDKafkaLogLevel::Critical
            | RDKafkaLogLevel::Error
            | RDKafkaLogLevel::Warning => {
                if self.first(message) {
                    tracing::warn!(target: "librdkafka", facility = fac, "{message}");
                } else {
                    tracing::debug!(target: "librdkafka", facility = fac, "{message}");
                }
            }
            _ => tracing::debug!(target: "librdkafka", facility = fac, "{message}"),
        }
    }

    /// [`ClientContext::error`] of a context that embeds this one.
    pub fn error(&self, error: KafkaError, reason: &str) {
        let text = format!("{error}: {reason}");
        if self.first(&text) {
            tracing::warn!(target: "librdkafka", "{text}");
        } else {
            tracing::debug!(target: "librdkafka", "{text}");
        }
    }
}

impl ClientContext for Quiet {
    fn log(&self, level: RDKafkaLogLevel, fac: &str, message: &str) {
        Quiet::log(self, level, fac, message)
    }
    fn error(&self, error: KafkaError, reason: &str) {
        Quiet::error(self, error, reason)
    }
}

/// A consumer with no rebalance hooks of its own (the processed-event reader).
impl rdkafka::consumer::ConsumerContext for Quiet {}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_failure_is_told_once_until_the_broker_is_usable_again() {
        let q = Quiet::default();
        let a = "ssl://127.0.0.1:9093/bootstrap: SSL handshake failed (after 3ms)";
        assert!(q.first(a));
        assert!(
            !q.first(&a.replace("3ms", "2ms")),
            "same failure, other figures"
        );
        assert!(q.first("AllBrokersDown: 1/1 brokers are down"));
        assert!(!q.first("AllBrokersDown: 0/1 brokers are down"));
        assert_eq!(
            q.last_error(),
            Some(a.replace("3ms", "2ms")),
            "the latest cause, not the summary"
        );
        q.connected();
        assert_eq!(q.last_error(), None);
        assert!(q.first(a), "told again after the broker was usable");
    }
}
