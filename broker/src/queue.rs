//! The names of a Queue's things on every broker kind (docs/messaging.md, "Layout").

use sha2::{Digest, Sha256};

/// The queue's stream (NATS, Redis) or exchange and queue prefix (RabbitMQ): `weir_<ns>_<q>`.
pub fn stream_name(namespace: &str, queue: &str) -> String {
    format!("weir_{namespace}_{queue}")
}

/// The Queue's `spec.subjects`, or `weir.<ns>.<q>` when it lists none; events are published
/// on the first.
pub fn subjects(namespace: &str, queue: &str, declared: &[String]) -> Vec<String> {
    if declared.is_empty() {
        vec![format!("weir.{namespace}.{queue}")]
    } else {
        declared.to_vec()
    }
}

/// The dead-letter stream (NATS, Redis) or exchange and queue (RabbitMQ): `weir_<ns>_<q>_dlq`.
pub fn dead_letter_stream_name(namespace: &str, queue: &str) -> String {
    format!("weir_{namespace}_{queue}_dlq")
}

/// The subject dead letters are published on (NATS): `weir.dlq.<ns>.<q>`.
pub fn dead_letter_subject(namespace: &str, queue: &str) -> String {
    format!("weir.dlq.{namespace}.{queue}")
}

/// Where processed event ids are remembered (a NATS KV bucket, a Redis key prefix, a RabbitMQ
/// stream queue): `weir_processed_<ns>_<q>`.
pub fn processed_bucket_name(namespace: &str, queue: &str) -> String {
    format!("weir_processed_{namespace}_{queue}")
}

/// [`processed_bucket_name`] from the stream's name, as the sidecar knows it:
/// `weir_<ns>_<q>` → `weir_processed_<ns>_<q>`.
pub fn processed_bucket(stream: &str) -> String {
    match stream.strip_prefix("weir_") {
        Some(rest) => format!("weir_processed_{rest}"),
        None => format!("weir_processed_{stream}"),
    }
}

/// The record of one processed event: `<consumer>.<sha256(event id) hex>` (an event id may hold
/// characters a key may not).
pub fn processed_key(consumer: &str, event_id: &str) -> String {
    format!(
        "{consumer}.{}",
        hex::encode(Sha256::digest(event_id.as_bytes()))
    )
}

/// The rewind marker of consumer `consumer` among the processed-event records
/// ([`crate::rewind::Marker`]): `<consumer>.rewind`, which no record key is (theirs end in 64 hex
/// digits).
pub fn rewind_marker_key(consumer: &str) -> String {
    format!("{consumer}.rewind")
}

/// The headers of a dead letter (docs/messaging.md, "Dead letters"): the sidecar writes them when
/// it dead-letters an event, `weir dlq` reads them (and replays on `ORIGINAL_SUBJECT`).
pub mod dead_letter_headers {
    /// Where the event was read from: subject (NATS), stream (Redis), consumer queue (RabbitMQ).
    pub const ORIGINAL_SUBJECT: &str = "Weir-Original-Subject";
    pub const ORIGINAL_SEQ: &str = "Weir-Original-Seq";
    pub const CONSUMER: &str = "Weir-Consumer";
    pub const DELIVERY_COUNT: &str = "Weir-Delivery-Count";
    pub const REASON: &str = "Weir-Reason";
    pub const LAST_ERROR: &str = "Weir-Last-Error";
    pub const DEAD_LETTERED_AT: &str = "Weir-Dead-Lettered-At";
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn both_ways_to_the_processed_bucket_agree() {
        assert_eq!(
            processed_bucket(&stream_name("shop", "orders")),
            processed_bucket_name("shop", "orders")
        );
        assert_eq!(processed_bucket("orders"), "weir_processed_orders");
    }

    /// (The NATS names are checked where the operator declares them: messaging::tests.)
    #[test]
    fn declared_subjects_win_and_processed_keys_hide_the_event_id() {
        assert_eq!(subjects("shop", "orders", &["a.b".into()]), ["a.b"]);
        let k = processed_key("mailer", "evt 1/2");
        assert!(
            k.starts_with("mailer.") && k.len() == "mailer.".len() + 64,
            "{k}"
        );
    }
}
