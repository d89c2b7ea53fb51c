//! RabbitMQ (AMQP 0-9-1, no plugins). For a queue's stream name `<s>` (`weir_<ns>_<q>`):
//!
//! | thing | RabbitMQ |
//! |---|---|
//! | where events are published | durable topic exchange `<s>`, routing key = the subject |
//! | consumer `<ms>` | durable quorum queue `<s>.<ms>` bound with `#`: `x-delivery-limit` = maxDeliveries, `x-dead-letter-exchange` = `<s>_dlq`, `x-dead-letter-strategy: at-least-once`, `x-overflow: reject-publish`, and the Queue's limits |
//! | delayed retry after `<n>` ms | quorum queue `<s>.<ms>.retry.<n>`: `x-message-ttl` = n, dead-lettered (at least once) to the default exchange with routing key `<s>.<ms>` |
//! | dead letters | fanout exchange `<s>_dlq` → quorum queue `<s>_dlq` |
//! | processed events | stream queue `weir_processed_<ns>_<q>` (`x-max-age`), one message per record |
//!
//! The operator declares the exchange, the consumer queues and the dead-letter queue; a sidecar
//! declares the same consumer queue when it finds none, and its retry queues as it needs them.
//! Both use [`consumer_queue_args`] and [`declare`]: a queue redeclared with other arguments
//! is refused. With feature `admin`, `admin` is the operator's role here.

#[cfg(feature = "admin")]
pub mod admin;
#[cfg(feature = "admin")]
pub mod dead_letters;
pub mod declare;
#[cfg(feature = "admin")]
pub mod rewind;

pub mod transport;

use lapin::types::{AMQPValue, FieldTable};
use std::time::Duration;
use weir_crds::proxy::QueueLimits;

/// The header counting deliveries made before a delayed retry's copy was published.
pub const WEIR_DELIVERIES: &str = "Weir-Deliveries";
/// The identity a sidecar gave a plain message (one without a CloudEvents envelope): RabbitMQ
/// keeps none of its own, and the producer's `message_id`, when set at all, is not known to
/// differ between messages.
pub const WEIR_MESSAGE_ID: &str = "Weir-Message-Id";

/// The consumer queue of Microservice `consumer` on the queue whose stream name is `stream`.
pub fn consumer_queue(stream: &str, consumer: &str) -> String {
    format!("{stream}.{consumer}")
}

/// The retry queue delaying redeliveries to `queue` by `ms`.
pub fn retry_queue(queue: &str, ms: u64) -> String {
    format!("{queue}.retry.{ms}")
}

fn long(s: impl Into<String>) -> AMQPValue {
    AMQPValue::LongString(s.into().into())
}

/// The arguments of a consumer queue: quorum, delivery limit, at-least-once dead-lettering to
/// `dead_letter_exchange` (none when dead letters are disabled), and the Queue's limits.
pub fn consumer_queue_args(
    max_deliveries: i64,
    dead_letter_exchange: Option<&str>,
    limits: &QueueLimits,
) -> FieldTable {
    let mut t = FieldTable::default();
    t.insert("x-queue-type".into(), long("quorum"));
    t.insert(
        "x-delivery-limit".into(),
        AMQPValue::LongInt(i32::try_from(max_deliveries).unwrap_or(i32::MAX)),
    );
    if let Some(dlx) = dead_letter_exchange {
        t.insert("x-dead-letter-exchange".into(), long(dlx));
        t.insert("x-dead-letter-strategy".into(), long("at-least-once"));
        t.insert("x-overflow".into(), long("reject-publish"));
    }
    for (k, v) in limits.amqp_arguments() {
        t.insert(k.into(), AMQPValue::LongLongInt(v));
    }
    t
}

/// The arguments of a retry queue: messages wait `ms`, then go back to `queue`.
pub fn retry_queue_args(queue: &str, ms: u64) -> FieldTable {
    let mut t = FieldTable::default();
    t.insert("x-queue-type".into(), long("quorum"));
    t.insert(
        "x-message-ttl".into(),
        AMQPValue::LongLongInt(ms.min(i64::MAX as u64) as i64),
    );
    t.insert("x-dead-letter-exchange".into(), long(""));
    t.insert("x-dead-letter-routing-key".into(), long(queue));
    t.insert("x-dead-letter-strategy".into(), long("at-least-once"));
    t.insert("x-overflow".into(), long("reject-publish"));
    t
}

/// The arguments of the dead-letter queue.
pub fn quorum_args() -> FieldTable {
    let mut t = FieldTable::default();
    t.insert("x-queue-type".into(), long("quorum"));
    t
}

/// The arguments of the processed-event stream: records older than `ttl` go.
pub fn processed_stream_args(ttl: Duration) -> FieldTable {
    let mut t = FieldTable::default();
    t.insert("x-queue-type".into(), long("stream"));
    t.insert(
        "x-max-age".into(),
        long(format!("{}s", ttl.as_secs().max(1))),
    );
    t.insert(
        "x-stream-max-segment-size-bytes".into(),
        AMQPValue::LongInt(4 << 20),
    );
    t
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn consumer_queue_arguments() {
        let limits = QueueLimits {
            max_messages: Some(10),
            ..Default::default()
        };
        let a = consumer_queue_args(5, Some("weir_shop_orders_dlq"), &limits);
        let a = a.inner();
        assert_eq!(a.get("x-delivery-limit"), Some(&AMQPValue::LongInt(5)));
        assert_eq!(
            a.get("x-dead-letter-exchange"),
            Some(&long("weir_shop_orders_dlq"))
        );
        assert_eq!(a.get("x-max-length"), Some(&AMQPValue::LongLongInt(10)));
        let none = consumer_queue_args(i64::MAX, None, &QueueLimits::default());
        let none = none.inner();
        assert_eq!(
            none.get("x-delivery-limit"),
            Some(&AMQPValue::LongInt(i32::MAX))
        );
        assert!(none.get("x-dead-letter-exchange").is_none());
        assert_eq!(
            retry_queue(&consumer_queue("weir_shop_orders", "mailer"), 500),
            "weir_shop_orders.mailer.retry.500"
        );
    }
}
