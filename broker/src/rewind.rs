//! Replay from a point in time: a consuming Microservice's consumer moved back on a broker that
//! keeps a log, so that every event from that point is delivered to it again
//! (`weir queue rewind`, docs/messaging.md "Replay").
//!
//! The contract, for every kind that implements [`Rewind`]:
//!
//! - The consumer is moved back in place, under the same name, so that the running sidecars go
//!   on consuming without a restart and the next events they read are those at or after the
//!   point ([`Point`]). JetStream: the durable consumer is reset to the stream sequence of the
//!   first message at or after the point (`$JS.API.CONSUMER.RESET`, nats-server 2.14 and
//!   later; before that it is deleted and created again under its name with the same config
//!   and `DeliverPolicy::ByStartSequence`). Redis: `XGROUP SETID` to just before the first entry
//!   at or after the point; entries other consumers hold pending stay pending.
//!   Kafka: the consuming sidecars seek their own partitions when they read the marker (only
//!   a member of a live group may move its offsets), see `kafka::rewind`.
//! - A consumer that was delivered nothing at or after the point is left as it is
//!   ([`Rewound::NothingDelivered`]): moving it would skip what it has not read yet.
//! - Events delivered again keep their `ce-id`, and the sidecar remembers processed event ids
//!   for the dedup window. A rewind is meant to deliver again, so it writes a [`Marker`] beside
//!   the processed-event records, before it moves the consumer and once more after: a record
//!   written before the marker does not count for a message at or after the marker's `from`
//!   position. Records written after the marker (the events delivered again, new events) count
//!   as before, so a redelivery after a crash is still deduplicated. JetStream orders the
//!   record and the marker by their KV revisions; Redis by the marker's `generation`, which
//!   each record carries from the moment it was written (one Lua script, no clock). Kafka by
//!   the order of the processed-event topic (one partition), which each sidecar reads.
//! - A kind whose queues keep no log (RabbitMQ) refuses with [`Error::Unsupported`].
//!
//! Each kind implements [`Rewind`] in its folder (`nats/rewind.rs`, `redis/rewind.rs`,
//! `kafka/rewind.rs`, `rabbitmq/rewind.rs`); `BrokerAdmin` dispatches to them through the registration in
//! `crate::admin`. The marker and the position order are here without feature `admin`: the
//! sidecar reads them.
//!
//! [`Error::Unsupported`]: crate::admin::Error::Unsupported

use chrono::{DateTime, SecondsFormat, Utc};
use std::cmp::Ordering;

/// Where a consumer is moved back to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Point {
    /// The oldest message the queue still holds.
    Start,
    /// The first message stored at or after this time.
    Time(DateTime<Utc>),
}

impl std::fmt::Display for Point {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Point::Start => f.write_str("the start"),
            Point::Time(t) => f.write_str(&t.to_rfc3339_opts(SecondsFormat::AutoSi, true)),
        }
    }
}

/// The rewind marker of one consumer, stored beside its processed-event records under
/// [`crate::queue::rewind_marker_key`] as JSON: `{"generation": 2, "from": "50", "to":
/// "2026-11-26T10:00:00Z"}`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Marker {
    /// Grows with every marker written for the consumer (from 1).
    pub generation: u64,
    /// The position delivery starts again at (stream sequence, entry id).
    pub from: String,
    /// The point asked for, as the user reads it.
    pub to: String,
}

impl Marker {
    pub fn to_json(&self) -> String {
        serde_json::json!({"generation": self.generation, "from": self.from, "to": self.to})
            .to_string()
    }

    /// The marker in `bytes`; `None` when they are not one (then no record is bypassed).
    pub fn parse(bytes: &[u8]) -> Option<Marker> {
        let v: serde_json::Value = serde_json::from_slice(bytes).ok()?;
        Some(Marker {
            generation: v["generation"].as_u64()?,
            from: v["from"].as_str()?.to_string(),
            to: v["to"].as_str().unwrap_or_default().to_string(),
        })
    }

    /// Whether the message at `position` is one this rewind delivers again (at or after
    /// `from`), so that a processed-event record older than the marker does not count for it.
    pub fn covers(&self, position: &str) -> bool {
        matches!(
            position_order(position, &self.from),
            Some(Ordering::Greater | Ordering::Equal)
        )
    }
}

/// Orders two positions of one queue: stream sequences (`50`) or stream entry ids
/// (`1732590000000-3`); `None` when either is neither.
pub fn position_order(a: &str, b: &str) -> Option<Ordering> {
    fn parts(p: &str) -> Option<(u64, u64)> {
        match p.split_once('-') {
            Some((ms, seq)) => Some((ms.parse().ok()?, seq.parse().ok()?)),
            None => Some((p.parse().ok()?, 0)),
        }
    }
    Some(parts(a)?.cmp(&parts(b)?))
}

#[cfg(feature = "admin")]
pub use admin::*;

#[cfg(feature = "admin")]
mod admin {
    use super::Point;
    use crate::admin::{BrokerAdmin, Error};
    use std::future::Future;

    /// What a rewind did.
    #[derive(Debug, Clone, PartialEq, Eq)]
    pub enum Rewound {
        /// Moved back: delivery starts again at `from` (stream sequence, entry id); `again`
        /// messages are to be delivered from there, when the broker tells.
        Moved { from: String, again: Option<u64> },
        /// Nothing at or after the point was delivered to the consumer yet (or the queue holds
        /// nothing there): left as it was, since moving it would skip what it has not read.
        NothingDelivered,
    }

    /// Moving a consumer of a Queue back, on one broker kind (see the module doc).
    pub trait Rewind {
        /// Moves the consumer of Microservice `consumer` on Queue `namespace/queue` back to
        /// `to`, writing the rewind marker beside its processed-event records.
        fn rewind(
            &self,
            namespace: &str,
            queue: &str,
            consumer: &str,
            to: Point,
        ) -> impl Future<Output = Result<Rewound, Error>> + Send;
    }

    /// [`Rewind::rewind`] on a broker of any kind.
    pub async fn rewind(
        broker: &BrokerAdmin,
        namespace: &str,
        queue: &str,
        consumer: &str,
        to: Point,
    ) -> Result<Rewound, Error> {
        Rewind::rewind(broker, namespace, queue, consumer, to).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn positions_order_as_sequences_and_entry_ids() {
        assert_eq!(position_order("50", "9"), Some(Ordering::Greater));
        assert_eq!(position_order("50", "50"), Some(Ordering::Equal));
        assert_eq!(
            position_order("1732590000000-0", "1732590000000-12"),
            Some(Ordering::Less)
        );
        assert_eq!(
            position_order("1732590000001-0", "1732590000000-12"),
            Some(Ordering::Greater)
        );
        assert_eq!(position_order("abc", "1"), None);
    }

    #[test]
    fn a_marker_round_trips_and_covers_what_is_at_or_after_its_start() {
        let m = Marker {
            generation: 3,
            from: "50".into(),
            to: "2026-11-26T10:00:00Z".into(),
        };
        assert_eq!(Marker::parse(m.to_json().as_bytes()), Some(m.clone()));
        assert!(m.covers("50") && m.covers("100"));
        assert!(!m.covers("49"));
        assert!(!m.covers("not a position"));
        assert_eq!(Marker::parse(b"garbage"), None);
        assert_eq!(Marker::parse(br#"{"from": "1"}"#), None, "no generation");
    }
}
