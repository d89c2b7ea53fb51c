//! What is declared on a broker for one Queue, computed from its spec without I/O and without
//! any broker's types: the stream (or exchange) with its subjects, retention, storage, replicas
//! and limits, the dead-letter stream, the processed-event record and the settings every
//! consumer of the Queue shares. Each kind's [`crate::admin`] module turns it into its own
//! declarations (JetStream configs, Redis trims, RabbitMQ queue arguments).
//!
//! A spec the CRD could not check (a duration that does not parse) is an
//! [`Error::Invalid`] naming the field as the Queue spells it: `spec.consumer.backoff[1]: …`.

use crate::admin::Error;
use crate::queue::{dead_letter_stream_name, dead_letter_subject, processed_bucket_name};
use std::time::Duration;
use weir_crds::duration;
use weir_crds::proxy::QueueLimits;
use weir_crds::queue::{QueueSpec, Retention, Storage};

/// Shortest memory of processed event ids, whatever the duplicate window.
pub const MIN_PROCESSED_TTL: Duration = Duration::from_secs(600);

/// The Queue's subjects ([`crate::queue::subjects`]); events are published on the first.
pub fn subjects(namespace: &str, queue: &str, spec: &QueueSpec) -> Vec<String> {
    crate::queue::subjects(namespace, queue, &spec.subjects)
}

/// Everything declared on the broker for one Queue, computed from its spec.
#[derive(Debug, Clone, PartialEq)]
pub struct Topology {
    pub namespace: String,
    pub queue: String,
    pub stream: Stream,
    /// `None` when dead letters are disabled.
    pub dead_letter: Option<DeadLetters>,
    pub processed: Processed,
    pub consumer: ConsumerSettings,
}

/// The Queue's stream (NATS, Redis) or exchange (RabbitMQ) and its limits.
#[derive(Debug, Clone, PartialEq)]
pub struct Stream {
    /// `weir_<ns>_<q>`.
    pub name: String,
    /// Never empty: events are published on the first.
    pub subjects: Vec<String>,
    pub retention: Retention,
    pub storage: Storage,
    /// At least 1.
    pub replicas: usize,
    /// Kafka topic partitions, at least 1 (the other kinds have one log per queue).
    pub partitions: usize,
    /// Zero: no limit.
    pub max_age: Duration,
    /// As the spec gives them (`None`: no limit).
    pub max_messages: Option<i64>,
    pub max_bytes: Option<i64>,
    pub duplicate_window: Duration,
}

/// The dead-letter stream (NATS, Redis) or exchange and queue (RabbitMQ); stored and replicated
/// as the Queue's stream.
#[derive(Debug, Clone, PartialEq)]
pub struct DeadLetters {
    /// `weir_<ns>_<q>_dlq`.
    pub name: String,
    /// `weir.dlq.<ns>.<q>` (NATS).
    pub subject: String,
    /// Zero: no limit.
    pub max_age: Duration,
}

/// Where processed event ids are remembered, and for how long.
#[derive(Debug, Clone, PartialEq)]
pub struct Processed {
    /// `weir_processed_<ns>_<q>`: a KV bucket (NATS), a key prefix (Redis), a stream queue
    /// (RabbitMQ).
    pub bucket: String,
    /// The duplicate window, at least [`MIN_PROCESSED_TTL`].
    pub max_age: Duration,
}

/// The consumer settings shared by every consumer of a Queue.
#[derive(Debug, Clone, PartialEq)]
pub struct ConsumerSettings {
    pub ack_wait: Duration,
    pub max_deliver: i64,
    /// As the spec gives it (the sidecar's nak delays).
    pub backoff: Vec<Duration>,
    pub max_ack_pending: i64,
    pub filter_subjects: Vec<String>,
}

fn parse_duration(field: &str, value: &str) -> Result<Duration, Error> {
    duration::parse(value).map_err(|e| Error::Invalid {
        field: field.into(),
        message: e.to_string(),
    })
}

impl Topology {
    /// The topology of Queue `<namespace>/<queue>`. Errors name the spec field.
    pub fn new(namespace: &str, queue: &str, spec: &QueueSpec) -> Result<Self, Error> {
        let subjects = subjects(namespace, queue, spec);
        let duplicate_window = parse_duration("spec.duplicateWindow", &spec.duplicate_window)?;
        let max_age = spec
            .max_age
            .as_deref()
            .map(|a| parse_duration("spec.maxAge", a))
            .transpose()?
            .unwrap_or_default();
        let stream = Stream {
            name: crate::queue::stream_name(namespace, queue),
            subjects: subjects.clone(),
            retention: spec.retention,
            storage: spec.storage,
            replicas: usize::try_from(spec.replicas.max(1)).unwrap_or(1),
            partitions: usize::try_from(spec.partitions.max(1)).unwrap_or(1),
            max_age,
            max_messages: spec.max_messages,
            max_bytes: spec.max_bytes,
            duplicate_window,
        };
        let dead_letter = if spec.dead_letter.enabled {
            Some(DeadLetters {
                name: dead_letter_stream_name(namespace, queue),
                subject: dead_letter_subject(namespace, queue),
                max_age: parse_duration("spec.deadLetter.maxAge", &spec.dead_letter.max_age)?,
            })
        } else {
            None
        };
        let processed = Processed {
            bucket: processed_bucket_name(namespace, queue),
            max_age: duplicate_window.max(MIN_PROCESSED_TTL),
        };
        let c = &spec.consumer;
        let consumer = ConsumerSettings {
            ack_wait: parse_duration("spec.consumer.ackWait", &c.ack_wait)?,
            max_deliver: i64::from(c.max_deliveries.max(1)),
            backoff: c
                .backoff
                .iter()
                .enumerate()
                .map(|(i, b)| parse_duration(&format!("spec.consumer.backoff[{i}]"), &b.0))
                .collect::<Result<_, _>>()?,
            max_ack_pending: i64::from(c.max_ack_pending.max(1)),
            filter_subjects: subjects,
        };
        Ok(Self {
            namespace: namespace.into(),
            queue: queue.into(),
            stream,
            dead_letter,
            processed,
            consumer,
        })
    }

    pub fn stream_name(&self) -> &str {
        &self.stream.name
    }

    /// The dead-letter stream's name whether dead letters are enabled or not (what a delete
    /// removes: they may have been enabled before).
    pub fn dead_letter_stream_name(&self) -> String {
        dead_letter_stream_name(&self.namespace, &self.queue)
    }

    /// The limits of each RabbitMQ consumer queue (the sidecar gets the same in its config).
    pub fn rabbitmq_limits(&self) -> QueueLimits {
        let s = &self.stream;
        let positive = |v: Option<i64>| v.and_then(|v| u64::try_from(v).ok()).filter(|v| *v > 0);
        QueueLimits {
            max_messages: positive(s.max_messages),
            max_bytes: positive(s.max_bytes),
            max_age_ms: (!s.max_age.is_zero()).then_some(s.max_age.as_millis() as u64),
            replicas: (s.replicas > 1).then_some(s.replicas as u32),
        }
    }

    /// The subject events are published on.
    pub fn subject(&self) -> &str {
        &self.stream.subjects[0]
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::queue::stream_name;

    fn spec(yaml: &str) -> QueueSpec {
        serde_yaml::from_str(yaml).unwrap()
    }

    #[test]
    fn names_follow_docs_messaging_md() {
        let s = spec("broker: nats");
        assert_eq!(stream_name("shop", "orders"), "weir_shop_orders");
        assert_eq!(subjects("shop", "orders", &s), ["weir.shop.orders"]);
        assert_eq!(
            dead_letter_stream_name("shop", "orders"),
            "weir_shop_orders_dlq"
        );
        assert_eq!(
            dead_letter_subject("shop", "orders"),
            "weir.dlq.shop.orders"
        );
        assert_eq!(
            processed_bucket_name("shop", "orders"),
            "weir_processed_shop_orders"
        );
        let t = Topology::new("shop", "orders", &s).unwrap();
        assert_eq!(t.processed.max_age, MIN_PROCESSED_TTL, "at least 10m");
        let long =
            Topology::new("shop", "orders", &spec("broker: nats\nduplicateWindow: 1h")).unwrap();
        assert_eq!(long.processed.max_age, Duration::from_secs(3600));
    }

    #[test]
    fn a_duration_that_does_not_parse_names_its_field() {
        let e = Topology::new(
            "shop",
            "orders",
            &spec("broker: nats\nconsumer: {backoff: [1s, soon]}"),
        )
        .unwrap_err();
        assert_eq!(e.reason(), "InvalidSpec");
        assert!(
            e.to_string().starts_with("spec.consumer.backoff[1]: "),
            "{e}"
        );
    }

    #[test]
    fn rabbitmq_limits_are_the_positive_ones() {
        let t = Topology::new(
            "shop",
            "orders",
            &spec("broker: r\nmaxMessages: 10\nmaxAge: 1m\nreplicas: 3"),
        )
        .unwrap();
        assert_eq!(
            t.rabbitmq_limits(),
            QueueLimits {
                max_messages: Some(10),
                max_bytes: None,
                max_age_ms: Some(60_000),
                replicas: Some(3),
            }
        );
        let plain = Topology::new("shop", "orders", &spec("broker: r")).unwrap();
        assert_eq!(plain.rabbitmq_limits(), QueueLimits::default());
    }
}
