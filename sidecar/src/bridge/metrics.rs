//! The bridge's Prometheus counters, per queue (the Queue resource's name).

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct QueueLabels {
    pub queue: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct DeadLetterLabels {
    pub queue: String,
    pub reason: String,
}

/// The families; register them once with [`BridgeMetrics::register`].
#[derive(Clone, Debug, Default)]
pub struct BridgeMetrics {
    published: Family<QueueLabels, Counter>,
    rejected_by_schema: Family<QueueLabels, Counter>,
    delivered: Family<QueueLabels, Counter>,
    acked: Family<QueueLabels, Counter>,
    naked: Family<QueueLabels, Counter>,
    dead_lettered: Family<DeadLetterLabels, Counter>,
    deduplicated: Family<QueueLabels, Counter>,
    plain_messages: Family<QueueLabels, Counter>,
    /// 1 while the broker connection is up.
    pub broker_connected: Gauge,
}

/// Pre-created handles for one queue: the hot path only increments.
#[derive(Clone, Debug)]
pub struct QueueMetrics {
    pub published: Counter,
    pub rejected_by_schema: Counter,
    pub delivered: Counter,
    pub acked: Counter,
    pub naked: Counter,
    pub deduplicated: Counter,
    pub plain_messages: Counter,
    families: BridgeMetrics,
    queue: String,
}

impl QueueMetrics {
    pub fn dead_lettered(&self, reason: &str) -> Counter {
        self.families
            .dead_lettered
            .get_or_create_owned(&DeadLetterLabels {
                queue: self.queue.clone(),
                reason: reason.to_string(),
            })
    }
}

impl BridgeMetrics {
    /// Creates the families and registers them under `messaging_` in `registry` (so, in the
    /// sidecar's registry: `weir_messaging_published_total{queue="orders"}` and so on).
    pub fn register(registry: &mut Registry) -> Self {
        let m = BridgeMetrics::default();
        let r = registry.sub_registry_with_prefix("messaging");
        r.register(
            "published",
            "Events published and acknowledged by the broker, per queue",
            m.published.clone(),
        );
        r.register(
            "rejected_by_schema",
            "Publish requests refused because the event failed the queue's schema",
            m.rejected_by_schema.clone(),
        );
        r.register(
            "delivered",
            "Messages passed to the app, per queue",
            m.delivered.clone(),
        );
        r.register(
            "acked",
            "Messages acknowledged after the app answered 2xx",
            m.acked.clone(),
        );
        r.register(
            "naked",
            "Messages handed back to the broker for redelivery later",
            m.naked.clone(),
        );
        r.register(
            "dead_lettered",
            "Messages moved to the dead-letter stream, by reason (max-deliveries, rejected, schema, \
             too-large, unsupported-specversion, invalid-cloudevent)",
            m.dead_lettered.clone(),
        );
        r.register(
            "deduplicated",
            "Redelivered messages already processed: acked without calling the app",
            m.deduplicated.clone(),
        );
        r.register(
            "plain_messages",
            "Deliveries of messages without a CloudEvents envelope (written by another producer), \
             given an event id from the broker",
            m.plain_messages.clone(),
        );
        r.register(
            "broker_connected",
            "1 while the sidecar is connected to its broker",
            m.broker_connected.clone(),
        );
        m
    }

    pub fn queue(&self, queue: &str) -> QueueMetrics {
        let l = QueueLabels {
            queue: queue.to_string(),
        };
        QueueMetrics {
            published: self.published.get_or_create_owned(&l),
            rejected_by_schema: self.rejected_by_schema.get_or_create_owned(&l),
            delivered: self.delivered.get_or_create_owned(&l),
            acked: self.acked.get_or_create_owned(&l),
            naked: self.naked.get_or_create_owned(&l),
            deduplicated: self.deduplicated.get_or_create_owned(&l),
            plain_messages: self.plain_messages.get_or_create_owned(&l),
            families: self.clone(),
            queue: queue.to_string(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counters_show_per_queue() {
        let mut reg = Registry::with_prefix("weir");
        let m = BridgeMetrics::register(&mut reg);
        let q = m.queue("orders");
        q.published.inc();
        q.dead_lettered("schema").inc();
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &reg).unwrap();
        assert!(
            out.contains(r#"weir_messaging_published_total{queue="orders"} 1"#),
            "{out}"
        );
        assert!(
            out.contains(r#"weir_messaging_dead_lettered_total{queue="orders",reason="schema"} 1"#),
            "{out}"
        );
    }
}
