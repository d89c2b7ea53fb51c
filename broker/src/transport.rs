//! The sidecar's role on a broker: publishing with the broker's confirmation, and consuming
//! (fetching, settling, remembering processed events, dead-lettering), behind one small set of
//! types whatever the kind. The sidecar's bridge decides what happens to a message; this module
//! and one `transport` module per kind ([`crate::nats::transport`],
//! [`crate::redis::transport`], [`crate::rabbitmq::transport`], [`crate::kafka::transport`])
//! carry it out.
//!
//! - [`Connection`]: the one place the kinds are registered. [`Connection::open`] connects
//!   (URL, credentials, TLS; reconnecting on its own), [`Connection::publish`] returns once the
//!   broker confirmed, [`Connection::consume`] runs one consumer's loop until stopped,
//!   [`Connection::close`] flushes and closes.
//! - [`Inbound`]: a message in hand: its body and headers, how many times it was delivered, how
//!   to settle it (ack, nak with an optional delay, terminate) or say "still working".
//! - [`Side`]: a consumer's surroundings: the processed-event (dedup) store and the dead-letter
//!   destination, both acknowledged by the broker before a call returns.
//! - [`Handler`]: what the consume loops hand each message to (the sidecar's delivery logic).
//! - [`Error`]: why a broker operation failed, one type for every kind.
//!
//! Adding a kind: a `transport` module under the kind's folder (connection, publish, consume
//! loop, `Inbound` and `Side`), a [`Kind`] and a [`Connection`] variant here.

use crate::credentials::CredentialsError;
use bytes::Bytes;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::{OwnedSemaphorePermit, Semaphore, watch};
use weir_crds::proxy::{ConsumeConfig, PublishConfig};

use crate::kafka::transport::KafkaConn;
use crate::nats::transport::NatsConn;
use crate::rabbitmq::transport::RabbitConn;
use crate::redis::transport::RedisConn;

/// How long a publish waits for the broker's acknowledgement.
pub const PUBLISH_TIMEOUT: Duration = Duration::from_secs(5);
/// Timeout of other broker calls (look-ups, declarations, settling, processed records).
pub const API_TIMEOUT: Duration = Duration::from_secs(5);
/// Longest pause between two reconnect attempts.
pub const MAX_RECONNECT_DELAY: Duration = Duration::from_secs(2);
/// Shortest lifetime of a processed-event record (docs/messaging.md: max(window, 10m)).
pub const MIN_DEDUP_TTL: Duration = Duration::from_secs(600);
/// How long to wait before handing a message back when the broker could not take what had to
/// be stored first (a dead letter, a retry's copy) or a look-up failed.
pub const RETRY_LATER: Duration = Duration::from_secs(1);
/// The CloudEvents event id header; RabbitMQ reads it as the position of a message that has no
/// `message_id`.
pub const CE_ID: &str = "ce-id";

/// The delay before reconnect attempt `attempts` (1-based): 50 ms doubling up to
/// [`MAX_RECONNECT_DELAY`].
pub fn reconnect_delay(attempts: usize) -> Duration {
    let exp = attempts.saturating_sub(1).min(10) as u32;
    Duration::from_millis(50u64 << exp).min(MAX_RECONNECT_DELAY)
}

/// Resolves once `rx` says stop (never when its sender is gone).
pub async fn stopped(rx: &mut watch::Receiver<bool>) {
    if rx.wait_for(|s| *s).await.is_err() {
        std::future::pending::<()>().await;
    }
}

/// Waits `delay` before a consume loop tries again, then doubles it up to `max`; `true` when
/// `stop` said stop first (the loop ends).
pub(crate) async fn pause(
    stop: &mut watch::Receiver<bool>,
    delay: &mut Duration,
    max: Duration,
) -> bool {
    tokio::select! {
        _ = stopped(stop) => return true,
        _ = tokio::time::sleep(*delay) => {}
    }
    *delay = (*delay * 2).min(max);
    false
}

/// Says a consume loop could not set up (declare, look up, connect) and pauses as [`pause`]
/// does; `true` when the loop ends.
pub(crate) async fn setup_failed(
    queue: &str,
    error: &Error,
    stop: &mut watch::Receiver<bool>,
    delay: &mut Duration,
    max: Duration,
) -> bool {
    tracing::warn!(queue, error = %error, "cannot consume yet; retrying");
    pause(stop, delay, max).await
}

/// A consume loop's deliveries in flight: at most `maxInFlight`, each holding a slot until its
/// [`Handler::deliver`] returns.
pub(crate) struct Slots {
    sem: Arc<Semaphore>,
    max: usize,
}

impl Slots {
    pub(crate) fn new(max: usize) -> Slots {
        Slots {
            sem: Arc::new(Semaphore::new(max)),
            max,
        }
    }

    /// Waits for a free slot; `None` when `stop` said stop first.
    pub(crate) async fn one(
        &self,
        stop: &mut watch::Receiver<bool>,
    ) -> Option<OwnedSemaphorePermit> {
        tokio::select! {
            _ = stopped(stop) => None,
            p = self.sem.clone().acquire_owned() => Some(p.expect("semaphore never closed")),
        }
    }

    /// Waits for a free slot, then takes every other free one: as many messages may be
    /// fetched. `None` when `stop` said stop first.
    pub(crate) async fn free(
        &self,
        stop: &mut watch::Receiver<bool>,
    ) -> Option<Vec<OwnedSemaphorePermit>> {
        let mut permits = vec![self.one(stop).await?];
        while permits.len() < self.max {
            match self.sem.clone().try_acquire_owned() {
                Ok(p) => permits.push(p),
                Err(_) => break,
            }
        }
        Some(permits)
    }

    /// Returns once every delivery in flight has returned (the abort signal of the sidecar
    /// makes them nak and return), and says the consumer stopped.
    pub(crate) async fn drain(&self, queue: &str, consumer: &str) {
        let _ = self.sem.acquire_many(self.max as u32).await;
        tracing::info!(queue, consumer, "consumer stopped");
    }
}

/// Why a broker operation failed, whatever the kind. The text is what the sidecar says: the
/// `reason` of a publish's 503, the `error` of a log line; [`Error::label`] names the variant.
///
/// | variant | where it shows |
/// |---|---|
/// | `Config` | the bridge does not start (the sidecar exits at start; a reload keeps the running bridge) |
/// | `Connect` | logged once per distinct error; the connection is tried again |
/// | `NotConnected`, `Timeout`, `Unroutable`, `Broker` | a publish answers 503 (`broker unavailable`, `Retry-After`); a delivery is handed back (nak) |
/// | `Unsupported` | never on a path the bridge takes (a kind that keeps an identity of every message is never asked to give one) |
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

impl From<CredentialsError> for Error {
    fn from(e: CredentialsError) -> Error {
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
pub trait Inbound: Send + Sync + 'static {
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
pub trait Side: Send + Sync + 'static {
    type Msg: Inbound;
    /// Whether `key` ([`crate::queue::processed_key`]) is recorded for the message at
    /// `position` ([`Inbound::position`]). A record older than the consumer's rewind marker does
    /// not count for a message the rewind delivers again ([`crate::rewind`]); a kind without
    /// rewind ignores `position`.
    fn is_processed(
        &self,
        key: &str,
        position: &str,
    ) -> impl Future<Output = Result<bool, Error>> + Send;
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

/// What a consume loop hands each message to, with the consumer's [`Side`]; the loop settles
/// nothing itself. A call runs in a task of its own, at most `maxInFlight` at a time; the loop
/// stops fetching when told to stop and returns once every call in flight has returned.
pub trait Handler: Send + Sync + 'static {
    /// Decides the message's fate and settles it.
    fn deliver<S: Side>(&self, side: &S, msg: S::Msg) -> impl Future<Output = ()> + Send;
}

/// The broker kinds, by their `messaging.brokerKind` name.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Nats,
    Redis,
    Rabbitmq,
    Kafka,
}

impl Kind {
    /// Every kind, in the order they are listed to a user.
    pub const ALL: [Kind; 4] = [Kind::Nats, Kind::Redis, Kind::Rabbitmq, Kind::Kafka];

    /// The kind named `name` (`messaging.brokerKind`).
    pub fn from_name(name: &str) -> Option<Kind> {
        Kind::ALL.into_iter().find(|k| k.name() == name)
    }

    pub fn name(self) -> &'static str {
        match self {
            Kind::Nats => "nats",
            Kind::Redis => "redis",
            Kind::Rabbitmq => "rabbitmq",
            Kind::Kafka => "kafka",
        }
    }

    /// The names as a user reads them: `nats, redis, rabbitmq or kafka`.
    pub fn names() -> String {
        let names: Vec<_> = Kind::ALL.iter().map(|k| k.name()).collect();
        match names.split_last() {
            Some((last, [])) => last.to_string(),
            Some((last, rest)) => format!("{} or {last}", rest.join(", ")),
            None => String::new(),
        }
    }
}

/// An event to publish, as each kind's `publish` takes it.
pub struct Outgoing<'a> {
    /// The queue published to (its stream and subject, its limits).
    pub target: &'a PublishConfig,
    /// The event id: a kind that deduplicates publishes does it by this.
    pub id: &'a str,
    /// The event's headers (CloudEvents binary mode).
    pub headers: &'a Headers,
    pub payload: Bytes,
}

/// What a connection says of itself.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum State {
    Connected,
    /// Never connected yet (NATS tells this apart).
    Connecting,
    /// Connected before, lost since (NATS tells this apart).
    Disconnected,
    /// Not connected (a kind that does not tell the two apart).
    NotConnected,
}

/// One sidecar's connection to its broker, whatever the kind.
pub enum Connection {
    Nats(Arc<NatsConn>),
    Redis(Arc<RedisConn>),
    Rabbitmq(Arc<RabbitConn>),
    Kafka(Arc<KafkaConn>),
}

impl Connection {
    /// Connects to `url` as client `name` with the credentials at `credentials` (a mounted
    /// Secret directory, or a NATS `.creds` file), reconnecting for ever. `on_state` is told
    /// `true` at every (re)connection and `false` at every loss. Each queue of `publishes` gets
    /// what publishing to it needs when it is absent (a stream, an exchange). `Err` only for what
    /// no retry mends (the URL, the credentials).
    pub async fn open(
        kind: Kind,
        url: &str,
        credentials: Option<&str>,
        name: &str,
        publishes: &[PublishConfig],
        on_state: impl Fn(bool) + Send + Sync + 'static,
    ) -> Result<Connection, Error> {
        Ok(match kind {
            Kind::Nats => Connection::Nats(Arc::new(
                NatsConn::open(url, credentials, name, publishes, on_state).await?,
            )),
            Kind::Redis => {
                Connection::Redis(Arc::new(RedisConn::open(url, credentials, on_state)?))
            }
            Kind::Rabbitmq => Connection::Rabbitmq(Arc::new(RabbitConn::open(
                url,
                credentials,
                name,
                publishes.to_vec(),
                on_state,
            )?)),
            Kind::Kafka => {
                Connection::Kafka(Arc::new(KafkaConn::open(url, credentials, name, on_state)?))
            }
        })
    }

    pub fn state(&self) -> State {
        match self {
            Connection::Nats(n) => n.state(),
            Connection::Redis(r) if r.connected() => State::Connected,
            Connection::Rabbitmq(r) if r.connected() => State::Connected,
            Connection::Kafka(k) if k.connected() => State::Connected,
            _ => State::NotConnected,
        }
    }

    pub fn connected(&self) -> bool {
        self.state() == State::Connected
    }

    /// Publishes event `id` to `target` and waits for the broker's confirmation (bounded by
    /// [`PUBLISH_TIMEOUT`]). `headers` are the event's (CloudEvents binary mode).
    pub async fn publish(
        &self,
        target: &PublishConfig,
        id: &str,
        headers: Headers,
        payload: Bytes,
    ) -> Result<Published, Error> {
        let event = Outgoing {
            target,
            id,
            headers: &headers,
            payload,
        };
        match self {
            Connection::Nats(n) => n.publish(event).await,
            Connection::Redis(r) => r.publish(event).await,
            Connection::Rabbitmq(r) => r.publish(event).await,
            Connection::Kafka(k) => k.publish(event).await,
        }
    }

    /// One consumer's loop, to be spawned: it declares what it needs when absent, fetches at
    /// most `maxInFlight` messages at a time and hands each to `handler`, reconnecting and
    /// setting up again after a failure, until `stop`. `instance` names this sidecar among the
    /// consumers of the queue (`<hostname>-<admin port>`).
    pub fn consume<H: Handler>(
        &self,
        cfg: ConsumeConfig,
        instance: &str,
        stop: watch::Receiver<bool>,
        handler: Arc<H>,
    ) -> impl Future<Output = ()> + Send + 'static {
        let run: std::pin::Pin<Box<dyn Future<Output = ()> + Send>> = match self {
            Connection::Nats(n) => {
                Box::pin(crate::nats::transport::run(n.clone(), cfg, stop, handler))
            }
            Connection::Redis(r) => Box::pin(crate::redis::transport::run(
                r.clone(),
                cfg,
                instance.to_string(),
                stop,
                handler,
            )),
            Connection::Rabbitmq(r) => Box::pin(crate::rabbitmq::transport::run(
                r.endpoint.clone(),
                format!("{} {instance}", r.name),
                cfg,
                stop,
                handler,
            )),
            Connection::Kafka(k) => Box::pin(crate::kafka::transport::run(
                k.clone(),
                cfg,
                instance.to_string(),
                stop,
                handler,
            )),
        };
        run
    }

    /// Flushes what is buffered (NATS acknowledgements) and closes the connection.
    pub async fn close(&self) {
        match self {
            Connection::Nats(n) => n.close().await,
            Connection::Redis(r) => r.close(),
            Connection::Rabbitmq(r) => r.close(),
            Connection::Kafka(k) => k.close().await,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_is_capped() {
        assert_eq!(reconnect_delay(1), Duration::from_millis(50));
        assert_eq!(reconnect_delay(2), Duration::from_millis(100));
        assert_eq!(reconnect_delay(100), MAX_RECONNECT_DELAY);
    }

    #[test]
    fn kinds_by_name() {
        assert_eq!(Kind::names(), "nats, redis, rabbitmq or kafka");
        for k in Kind::ALL {
            assert_eq!(Kind::from_name(k.name()), Some(k));
        }
        assert_eq!(Kind::from_name("kafka"), Some(Kind::Kafka));
        assert_eq!(Kind::from_name("pulsar"), None);
    }

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
