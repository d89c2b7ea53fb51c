//! What the bridge needs from a broker, as two small traits with one implementation per broker
//! kind (`nats`, `redis`, `rabbitmq`):
//!
//! - `Inbound`: a message in hand: its body and headers, how many times it was delivered, and
//!   how to settle it (ack, nak with an optional delay, terminate) or say "still working";
//! - `Side`: the consumer's surroundings: the processed-event (dedup) store and the dead-letter
//!   destination, both acknowledged by the broker before the call returns.
//!
//! Publishing (with the broker's confirmation) is `Conn::publish` (in the bridge module), an enum over the
//! three connections. The consume loops (pulling, reclaiming) are per broker; everything that
//! decides what happens to a message (`consume::deliver`) is shared.

use bytes::Bytes;
use std::future::Future;
use std::time::Duration;

/// Why a broker operation failed, whatever the kind. The text is what the sidecar says: the
/// `reason` of a publish's 503, the `error` of a log line; [`Error::label`] names the variant.
///
/// | variant | where it shows |
/// |---|---|
/// | `Config` | the bridge does not start (the sidecar exits at start; a reload keeps the running bridge) |
/// | `Connect` | logged once per distinct error; the connection is tried again |
/// | `NotConnected`, `Timeout`, `Unroutable`, `Broker` | a publish answers 503 (`broker unavailable`, `Retry-After`); a delivery is handed back (nak) |
/// | `Unsupported` | never on a path the bridge takes (the kind keeps an identity of every message) |
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Error {
    /// `messaging.brokerUrl` or the credentials cannot be used: refused before any connection
    /// is tried.
    #[error("{0}")]
    Config(String),
    /// No connection could be made: refused, unreachable, TLS, authentication, timed out.
    #[error("cannot connect to {to}: {message}")]
    Connect {
        /// The URL without its password, or `host:port`.
        to: String,
        message: String,
    },
    /// Not connected at the moment.
    #[error("not connected to the broker")]
    NotConnected,
    /// The broker did not answer, acknowledge or confirm in time.
    #[error("{0}")]
    Timeout(String),
    /// The broker stores the event nowhere: no stream takes the subject (NATS), no queue is
    /// bound to the exchange (RabbitMQ).
    #[error("{0}")]
    Unroutable(String),
    /// The broker answered with an error (`code`: the server's own, when it gave one, such as
    /// Redis's `NOGROUP`), or the call failed on the way.
    #[error("{message}")]
    Broker {
        code: Option<String>,
        message: String,
    },
    /// The kind has no such operation.
    #[error("{0}")]
    Unsupported(&'static str),
}

impl Error {
    /// A short name of the variant (kebab-case), for a log field or a metric label.
    pub fn label(&self) -> &'static str {
        match self {
            Error::Config(_) => "config",
            Error::Connect { .. } => "connect",
            Error::NotConnected => "not-connected",
            Error::Timeout(_) => "timeout",
            Error::Unroutable(_) => "unroutable",
            Error::Broker { .. } => "broker",
            Error::Unsupported(_) => "unsupported",
        }
    }

    /// [`Error::Broker`] without a server code.
    pub fn broker(message: impl Into<String>) -> Error {
        Error::Broker {
            code: None,
            message: message.into(),
        }
    }
}

impl From<weir_broker::credentials::CredentialsError> for Error {
    fn from(e: weir_broker::credentials::CredentialsError) -> Error {
        Error::Config(e.0)
    }
}

/// Headers as name/value pairs, in the order they came (names compared ignoring case).
pub type Headers = Vec<(String, String)>;

/// The first value of header `name`, whatever its case.
pub fn header<'a>(h: &'a Headers, name: &str) -> Option<&'a str> {
    h.iter()
        .find(|(k, _)| k.eq_ignore_ascii_case(name))
        .map(|(_, v)| v.as_str())
}

/// Sets `name` (replacing any value of it, whatever its case).
pub fn set_header(h: &mut Headers, name: &str, value: impl Into<String>) {
    h.retain(|(k, _)| !k.eq_ignore_ascii_case(name));
    h.push((name.to_string(), value.into()));
}

/// How a delivery ends.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Settle {
    /// Processed (or dead-lettered by the sidecar, see [`Settle::Term`]).
    Ack,
    /// Deliver again, after the delay when there is one.
    Nak(Option<Duration>),
    /// Never deliver again (the dead letter, if any, is already stored).
    Term,
}

/// The broker's answer to a publish.
#[derive(Debug, Clone, PartialEq)]
pub struct Published {
    /// An earlier publish with the same event id was stored (the broker dropped this one).
    pub duplicate: bool,
    /// Where the event is: JetStream's stream sequence (a number), the Redis stream entry id (a
    /// string), or null for RabbitMQ (a queue has no addressable position).
    pub position: serde_json::Value,
}

/// A message in hand.
pub(crate) trait Inbound: Send + Sync + 'static {
    fn payload(&self) -> &Bytes;
    fn headers(&self) -> &Headers;
    /// 1 for the first delivery.
    fn delivered(&self) -> u64;
    /// The message's position, for `Weir-Original-Seq` (stream sequence, entry id, message id).
    fn position(&self) -> String;
    /// Where it was read from, for `Weir-Original-Subject` (subject, stream key, queue).
    fn origin(&self) -> &str;
    /// The broker's own identity of the message: unique among the queue's messages and the same
    /// at every redelivery, so a plain message (no CloudEvents envelope) takes its event id from
    /// it and is deduplicated like any event, never merged with another. JetStream: stream
    /// sequence and stored time (a re-created stream counts from 1 again); Redis: the entry id.
    /// `None` when the broker keeps no identity of a message (RabbitMQ, until a sidecar gave it
    /// one with [`Inbound::requeue_with_identity`]), never one that other messages share.
    fn identity(&self) -> Option<String>;
    /// Puts a copy of the message carrying `identity` back on the queue (confirmed by the
    /// broker), then acknowledges this delivery: the copy is delivered in its place, with the
    /// same delivery count. Called only when [`Inbound::identity`] is `None`; a crash between the
    /// two steps leaves both, and each reaches the app (at least once, never lost).
    fn requeue_with_identity(
        &self,
        identity: &str,
    ) -> impl Future<Output = Result<(), Error>> + Send;
    fn settle(&self, how: Settle) -> impl Future<Output = Result<(), Error>> + Send;
    /// Tells the broker the delivery is still being worked on (no redelivery yet).
    fn progress(&self) -> impl Future<Output = ()> + Send;
}

/// The processed-event store and the dead-letter destination of one consumer.
pub(crate) trait Side: Send + Sync + 'static {
    type Msg: Inbound;
    /// Whether `key` (see [`super::cloudevents::processed_key`]) is recorded.
    fn is_processed(&self, key: &str) -> impl Future<Output = Result<bool, Error>> + Send;
    /// Records `key` for the dedup window.
    fn record_processed(
        &self,
        key: &str,
        value: &str,
    ) -> impl Future<Output = Result<(), Error>> + Send;
    /// Stores the dead letter (`headers` already carry the `Weir-*` ones) and waits for the
    /// broker's confirmation.
    fn dead_letter(
        &self,
        msg: &Self::Msg,
        headers: Headers,
    ) -> impl Future<Output = Result<(), Error>> + Send;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn headers_ignore_case() {
        let mut h: Headers = vec![("Ce-Id".into(), "e-1".into())];
        assert_eq!(header(&h, "ce-id"), Some("e-1"));
        set_header(&mut h, "CE-ID", "e-2");
        assert_eq!(h.len(), 1);
        assert_eq!(header(&h, "ce-id"), Some("e-2"));
        assert_eq!(header(&h, "nope"), None);
    }
}
