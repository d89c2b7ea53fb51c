//! The Queue settings a Broker kind does not apply, so the Queue's status can say so instead of
//! the setting being ignored in silence (JetStream applies them all).

use weir_crds::broker::BrokerKind;
use weir_crds::queue::{QueueSpec, Retention, Storage};

/// Each setting of `spec` that a broker of `kind` does not apply: the field and why.
pub fn not_applied(kind: BrokerKind, spec: &QueueSpec) -> Vec<String> {
    let mut out = Vec::new();
    let mut note = |on: bool, field: &str, why: &str| {
        if on {
            out.push(format!("spec.{field} ({why})"));
        }
    };
    match kind {
        BrokerKind::Nats => {}
        BrokerKind::Redis => {
            note(
                spec.max_bytes.is_some(),
                "maxBytes",
                "a Redis stream is trimmed by count (maxMessages) and age (maxAge) only",
            );
            note(
                spec.retention != Retention::Limits,
                "retention",
                "entries stay until maxMessages or maxAge trims them, whoever consumed them",
            );
            note(
                spec.storage == Storage::Memory,
                "storage",
                "durability is the Redis server's persistence setting",
            );
            note(
                spec.replicas > 1,
                "replicas",
                "replication is the Redis server's",
            );
        }
        BrokerKind::Rabbitmq => {
            note(
                spec.retention != Retention::Limits,
                "retention",
                "each consuming Microservice has its own queue, and a message leaves it when \
                 acknowledged",
            );
            note(
                spec.storage == Storage::Memory,
                "storage",
                "quorum queues always keep messages on disk",
            );
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(yaml: &str) -> QueueSpec {
        serde_yaml::from_str(yaml).unwrap()
    }

    #[test]
    fn each_kind_names_what_it_leaves_out() {
        let all = spec(
            "{broker: b, maxBytes: 1000, maxMessages: 10, maxAge: 1h, retention: WorkQueue, \
             storage: Memory, replicas: 3}",
        );
        assert!(not_applied(BrokerKind::Nats, &all).is_empty());
        let redis = not_applied(BrokerKind::Redis, &all);
        assert_eq!(redis.len(), 4, "{redis:?}");
        assert!(redis[0].starts_with("spec.maxBytes (a Redis stream"));
        let rabbit = not_applied(BrokerKind::Rabbitmq, &all);
        assert_eq!(rabbit.len(), 2, "{rabbit:?}");
        assert!(rabbit.iter().any(|n| n.starts_with("spec.storage")));
        // The defaults are applied everywhere.
        let plain = spec("{broker: b, maxMessages: 10, maxAge: 1h}");
        for kind in [BrokerKind::Nats, BrokerKind::Redis, BrokerKind::Rabbitmq] {
            assert!(not_applied(kind, &plain).is_empty(), "{kind:?}");
        }
    }
}
