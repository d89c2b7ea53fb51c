//! A Queue's dead letters on each broker kind (docs/messaging.md): list them with their reason,
//! read one, and replay chosen ones back onto the queue after a fix. `weir dlq` runs these:
//!
//! - JetStream: `seq` is the dead-letter stream's sequence; a replay is published on
//!   `Weir-Original-Subject` with `Nats-Msg-Id: <event id>:replay:<seq>` (a message another
//!   producer wrote without an event id: `<dead-letter stream>:replay:<seq>`), then deleted.
//! - Redis: `seq` is the dead-letter stream's entry id; a replay is `XADD`ed to the stream named
//!   by `Weir-Original-Subject`, then the dead letter is `XDEL`eted.
//! - RabbitMQ: `seq` is the dead letter's position in the dead-letter queue (1 = oldest) when
//!   the command runs; a replay is published (confirmed) to the consumer queue named by
//!   `Weir-Original-Subject`, then the dead letter is acknowledged (removed). Listing takes the
//!   dead letters without acknowledging them and hands them back.
//!
//! The headers a dead letter carries are named in [`crate::queue::dead_letter_headers`].
//!
//! Each kind implements [`DeadLetters`] in its folder (`nats/dead_letters.rs`,
//! `redis/dead_letters.rs`, `rabbitmq/dead_letters.rs`); [`BrokerAdmin`] dispatches to them
//! through the registration in [`crate::admin`].

use crate::admin::{BrokerAdmin, Error};
use crate::queue::dead_letter_headers::*;
use bytes::Bytes;
use std::future::Future;

/// The header deduplicating a replay on JetStream.
pub const NATS_MSG_ID: &str = "Nats-Msg-Id";

/// One message of a dead-letter stream.
#[derive(Debug, Clone, PartialEq)]
pub struct DeadLetter {
    /// Where it is in the dead letters: stream sequence (JetStream), entry id (Redis), position
    /// (RabbitMQ).
    pub seq: String,
    /// Headers in a stable order (name, value).
    pub headers: Vec<(String, String)>,
    pub body: Bytes,
    /// When the broker stored it, should `Weir-Dead-Lettered-At` be missing.
    pub stored_at: String,
}

impl DeadLetter {
    /// A header's value, names compared without case.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
    pub fn event_id(&self) -> Option<&str> {
        self.header("ce-id")
    }
    pub fn reason(&self) -> &str {
        self.header(REASON).unwrap_or("-")
    }
    /// Where a replay goes (`Weir-Original-Subject`): the subject, stream or consumer queue the
    /// message was read from.
    pub fn original_subject(&self) -> Result<&str, Error> {
        self.header(ORIGINAL_SUBJECT).ok_or_else(|| Error::Invalid {
            field: format!("dead letter {}", self.seq),
            message: format!("has no {ORIGINAL_SUBJECT} header"),
        })
    }
    pub fn time(&self) -> &str {
        self.header(DEAD_LETTERED_AT).unwrap_or(&self.stored_at)
    }
}

/// A Queue's dead letters on one broker kind.
pub trait DeadLetters {
    /// The dead letter at `seq`; `None` when there is none (deleted or never there).
    fn get(
        &self,
        namespace: &str,
        queue: &str,
        seq: &str,
    ) -> impl Future<Output = Result<Option<DeadLetter>, Error>> + Send;

    /// Every dead letter of the Queue, oldest first.
    fn list(
        &self,
        namespace: &str,
        queue: &str,
    ) -> impl Future<Output = Result<Vec<DeadLetter>, Error>> + Send;

    /// Replays `chosen`; per dead letter, its new position on the queue or the error.
    fn replay(
        &self,
        namespace: &str,
        queue: &str,
        chosen: &[DeadLetter],
    ) -> impl Future<Output = Vec<(DeadLetter, Result<String, Error>)>> + Send;
}

/// Reads the dead letter at `seq`; `None` when there is none (deleted or never there).
pub async fn get(
    broker: &BrokerAdmin,
    namespace: &str,
    queue: &str,
    seq: &str,
) -> Result<Option<DeadLetter>, Error> {
    DeadLetters::get(broker, namespace, queue, seq).await
}

/// Every dead letter of the Queue, oldest first.
pub async fn list(
    broker: &BrokerAdmin,
    namespace: &str,
    queue: &str,
) -> Result<Vec<DeadLetter>, Error> {
    DeadLetters::list(broker, namespace, queue).await
}

/// Replays the chosen dead letters; per dead letter, its new position on the queue or the
/// error.
pub async fn replay(
    broker: &BrokerAdmin,
    namespace: &str,
    queue: &str,
    chosen: &[DeadLetter],
) -> Vec<(DeadLetter, Result<String, Error>)> {
    DeadLetters::replay(broker, namespace, queue, chosen).await
}

/// The headers of the event's own envelope, kept by a replay.
pub(crate) fn replayed_header(name: &str) -> bool {
    let lower = name.to_ascii_lowercase();
    lower.starts_with("ce-")
        || lower == "traceparent"
        || lower == "tracestate"
        || lower == "content-type"
}
