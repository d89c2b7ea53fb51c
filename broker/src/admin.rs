//! The operator's role on a broker: declare a Queue's [`Topology`] (create or update in place,
//! idempotently), inspect it (its managed consumers and its [`Figures`]) and delete it. Used by
//! the Queue and Broker controllers, by `weir dlq` and `weir queue rewind` (to connect) and by
//! `weir up` without a cluster.
//!
//! One trait, [`Admin`], says what the operator does on a broker; [`Kind`] adds what a broker
//! kind brings besides (connecting, the Queue settings it does not apply) and requires the
//! commands' traits ([`DeadLetters`] for `weir dlq`, [`Rewind`] for `weir queue rewind`). Each
//! kind is one module ([`crate::nats::admin`], [`crate::redis::admin`],
//! [`crate::rabbitmq::admin`], [`crate::kafka::admin`]) and one
//! line of the registration below, which makes [`BrokerAdmin`] (a connection of any kind),
//! [`connect`], [`kind_of_url`] and [`not_applied`].
//!
//! Failures are one typed [`Error`]: its [`Error::reason`] is the condition reason the operator
//! reports, its [`Error::metric_label`] the label of the failure metric.

use crate::credentials::{Credentials, CredentialsError};
use crate::dead_letters::{DeadLetter, DeadLetters};
use crate::rewind::{Point, Rewind, Rewound};
use crate::topology::Topology;
use std::collections::BTreeMap;
use std::future::Future;
use weir_crds::broker::BrokerKind;
use weir_crds::queue::QueueSpec;

pub use crate::nats::CONNECT_TIMEOUT;

/// Why the broker side of a Queue or Broker failed.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum Error {
    #[error("cannot connect to {url}: {message}")]
    Connect { url: String, message: String },
    /// The broker answered and said no (an API error with its JetStream error code).
    #[error("the broker refused {what}: {description} (JetStream error code {code})")]
    Refused {
        what: String,
        code: u64,
        description: String,
    },
    /// The spec cannot be turned into broker settings (a field the CRD could not check).
    #[error("{field}: {message}")]
    Invalid { field: String, message: String },
    /// Credentials in the Broker's Secret are not usable.
    #[error("credentials: {0}")]
    Credentials(String),
    /// Anything else on the way: timeouts, a dropped connection.
    #[error("{what}: {message}")]
    Broker { what: String, message: String },
    /// The broker has the object with settings it cannot change (RabbitMQ queue arguments).
    #[error("{what} must be recreated: {message}")]
    Immutable { what: String, message: String },
    /// The object is not on the broker (said by a kind without JetStream's error codes).
    #[error("{what} does not exist")]
    NotFound { what: String },
    /// The broker kind cannot do what was asked (a rewind on RabbitMQ).
    #[error("{what}: {why}")]
    Unsupported { what: String, why: String },
}

/// JetStream error codes the operator names in conditions.
pub mod codes {
    pub const STREAM_SUBJECT_OVERLAP: u64 = 10065;
    pub const STREAM_NOT_FOUND: u64 = crate::nats::STREAM_NOT_FOUND;
    pub const CONSUMER_NOT_FOUND: u64 = 10014;
    pub const STREAM_NAME_IN_USE: u64 = 10058;
    pub const REPLICAS_NOT_SUPPORTED: u64 = 10074;
    pub const INSUFFICIENT_RESOURCES: u64 = 10023;
    /// No message at the sequence asked for.
    pub const NO_MESSAGE_FOUND: u64 = 10037;
}

impl Error {
    /// A condition reason (CamelCase) for this error.
    pub fn reason(&self) -> &'static str {
        match self {
            Error::Connect { .. } => "BrokerUnreachable",
            Error::Refused { code, .. } => match *code {
                codes::STREAM_SUBJECT_OVERLAP => "SubjectsOverlap",
                codes::STREAM_NAME_IN_USE => "StreamNameInUse",
                codes::REPLICAS_NOT_SUPPORTED | codes::INSUFFICIENT_RESOURCES => {
                    "InsufficientResources"
                }
                _ => "BrokerRefused",
            },
            Error::Invalid { .. } => "InvalidSpec",
            Error::Credentials(_) => "InvalidCredentials",
            Error::Broker { .. } => "BrokerError",
            Error::Immutable { .. } => "QueueMustBeRecreated",
            Error::NotFound { .. } => "NotFound",
            Error::Unsupported { .. } => "NotSupportedByBroker",
        }
    }

    /// A short label (snake case) for metrics counting failures by kind.
    pub fn metric_label(&self) -> &'static str {
        match self {
            Error::Connect { .. } => "connect",
            Error::Refused { .. } => "refused",
            Error::Invalid { .. } => "invalid_spec",
            Error::Credentials(_) => "credentials",
            Error::Broker { .. } => "broker",
            Error::Immutable { .. } => "immutable",
            Error::NotFound { .. } => "not_found",
            Error::Unsupported { .. } => "unsupported",
        }
    }

    /// The JetStream error code when the broker refused.
    pub fn code(&self) -> Option<u64> {
        match self {
            Error::Refused { code, .. } => Some(*code),
            _ => None,
        }
    }

    /// [`Error::Broker`]: `what` failed with `e`.
    pub fn broker(what: impl Into<String>, e: impl std::fmt::Display) -> Self {
        Error::Broker {
            what: what.into(),
            message: e.to_string(),
        }
    }

    /// Whether the broker said the stream or consumer is not there.
    pub fn is_not_found(&self) -> bool {
        matches!(self, Error::NotFound { .. })
            || matches!(
                self.code(),
                Some(codes::STREAM_NOT_FOUND | codes::CONSUMER_NOT_FOUND)
            )
    }
}

impl From<CredentialsError> for Error {
    fn from(e: CredentialsError) -> Self {
        Error::Credentials(e.0)
    }
}

impl From<crate::nats::ConnectError> for Error {
    fn from(e: crate::nats::ConnectError) -> Self {
        match e {
            crate::nats::ConnectError::Credentials(c) => c.into(),
            crate::nats::ConnectError::Connect { url, message } => Error::Connect { url, message },
        }
    }
}

impl From<crate::rabbitmq::declare::DeclareError> for Error {
    fn from(e: crate::rabbitmq::declare::DeclareError) -> Self {
        use crate::rabbitmq::declare::DeclareError;
        match e {
            DeclareError::Immutable { what, message } => Error::Immutable { what, message },
            DeclareError::Broker { what, message } => Error::Broker { what, message },
        }
    }
}

/// What a Queue's stream and consumers hold now.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Figures {
    /// Messages on the stream.
    pub messages: u64,
    /// Per consumer: not yet delivered + delivered and not yet acknowledged.
    pub pending: BTreeMap<String, u64>,
    /// Messages on the dead-letter stream (`None` when dead letters are disabled).
    pub dead_letters: Option<u64>,
}

/// What the operator does on a broker, one Queue ([`Topology`]) at a time. Declaring is
/// idempotent; deleting what is not there is no error.
pub trait Admin {
    /// The server's version, e.g. `2.15.1` (or the protocol, when the client cannot tell).
    fn server_version(&self) -> impl Future<Output = String> + Send;

    /// Whether the cached connection can still be used.
    fn is_connected(&self) -> bool;

    /// Creates or updates what the Queue has on the broker besides its consumers.
    fn declare_queue(&self, t: &Topology) -> impl Future<Output = Result<(), Error>> + Send;

    /// Creates or updates the consumer of Microservice `microservice`.
    fn declare_consumer(
        &self,
        t: &Topology,
        microservice: &str,
    ) -> impl Future<Output = Result<(), Error>> + Send;

    /// The consumers the operator manages on this Queue. A kind that cannot list them answers
    /// with those of `known` (the consumers the Queue's status last reported) that still exist.
    fn managed_consumers(
        &self,
        t: &Topology,
        known: &[String],
    ) -> impl Future<Output = Result<Vec<String>, Error>> + Send;

    /// Deletes a consumer; `false` when it was not there.
    fn delete_consumer(
        &self,
        t: &Topology,
        name: &str,
    ) -> impl Future<Output = Result<bool, Error>> + Send;

    /// Messages on the stream, pending per consumer of `consumers`, and dead-letter depth.
    fn figures(
        &self,
        t: &Topology,
        consumers: &[String],
    ) -> impl Future<Output = Result<Figures, Error>> + Send;

    /// Deletes everything of the Queue; `consumers` are those known (for a kind that cannot
    /// list them).
    fn delete_queue(
        &self,
        t: &Topology,
        consumers: &[String],
    ) -> impl Future<Output = Result<(), Error>> + Send;

    /// Settings the broker refused to change at the last [`declare_queue`](Self::declare_queue)
    /// of `t`, each `spec.<field> (<why>)`: the Queue works with the settings it has, and its
    /// `SettingsApplied` condition says which of the spec's did not reach the broker (Kafka
    /// brokers that do not alter topic configs). Kinds that change every setting they apply, or
    /// refuse the declaration, have none.
    fn refused_settings(&self, _t: &Topology) -> Vec<String> {
        Vec::new()
    }
}

/// A broker kind the operator administers: how it connects, and which Queue settings it does
/// not apply (so that the Queue's status says so instead of the setting being ignored in
/// silence).
pub trait Kind: Admin + DeadLetters + Rewind + Clone + Sized {
    const KIND: BrokerKind;

    /// Connects once (no retry loop: the controllers requeue instead).
    fn connect(
        url: &str,
        credentials: &Credentials,
    ) -> impl Future<Output = Result<Self, Error>> + Send;

    /// Each setting of `spec` this kind does not apply: `spec.<field> (<why>)`.
    fn not_applied(spec: &QueueSpec) -> Vec<String>;
}

/// For [`Kind::not_applied`]: adds `spec.<field> (<why>)` to `out` when `on`.
pub fn note(out: &mut Vec<String>, on: bool, field: &str, why: &str) {
    if on {
        out.push(format!("spec.{field} ({why})"));
    }
}

/// The registration: one line per kind, `Variant => its Kind`, the variant named as in
/// [`BrokerKind`].
macro_rules! register {
    ($($kind:ident => $admin:ty),+ $(,)?) => {
        /// The operator's connection to a broker of any kind, for administering Queues on it.
        #[derive(Clone)]
        #[allow(clippy::large_enum_variant)] // a few per operator, cached
        pub enum BrokerAdmin {
            $($kind($admin)),+
        }

        /// The kinds registered, in the order [`kind_of_url`] tries them.
        pub const KINDS: &[BrokerKind] = &[$(BrokerKind::$kind),+];

        /// Connects once to a broker of `kind` (no retry loop: callers requeue).
        pub async fn connect(
            kind: BrokerKind,
            url: &str,
            credentials: &Credentials,
        ) -> Result<BrokerAdmin, Error> {
            match kind {
                $(BrokerKind::$kind => {
                    <$admin as Kind>::connect(url, credentials).await.map(BrokerAdmin::$kind)
                })+
            }
        }

        /// Each setting of `spec` that a broker of `kind` does not apply: the field and why.
        pub fn not_applied(kind: BrokerKind, spec: &QueueSpec) -> Vec<String> {
            match kind {
                $(BrokerKind::$kind => <$admin as Kind>::not_applied(spec),)+
            }
        }

        impl BrokerAdmin {
            pub fn kind(&self) -> BrokerKind {
                match self {
                    $(BrokerAdmin::$kind(_) => <$admin as Kind>::KIND,)+
                }
            }
        }

        impl DeadLetters for BrokerAdmin {
            async fn get(
                &self,
                namespace: &str,
                queue: &str,
                seq: &str,
            ) -> Result<Option<DeadLetter>, Error> {
                match self {
                    $(BrokerAdmin::$kind(b) => DeadLetters::get(b, namespace, queue, seq).await,)+
                }
            }

            async fn list(&self, namespace: &str, queue: &str) -> Result<Vec<DeadLetter>, Error> {
                match self {
                    $(BrokerAdmin::$kind(b) => DeadLetters::list(b, namespace, queue).await,)+
                }
            }

            async fn replay(
                &self,
                namespace: &str,
                queue: &str,
                chosen: &[DeadLetter],
            ) -> Vec<(DeadLetter, Result<String, Error>)> {
                match self {
                    $(BrokerAdmin::$kind(b) => DeadLetters::replay(b, namespace, queue, chosen).await,)+
                }
            }
        }

        impl Rewind for BrokerAdmin {
            async fn rewind(
                &self,
                namespace: &str,
                queue: &str,
                consumer: &str,
                to: Point,
            ) -> Result<Rewound, Error> {
                match self {
                    $(BrokerAdmin::$kind(b) => Rewind::rewind(b, namespace, queue, consumer, to).await,)+
                }
            }
        }

        impl Admin for BrokerAdmin {
            async fn server_version(&self) -> String {
                match self {
                    $(BrokerAdmin::$kind(b) => Admin::server_version(b).await,)+
                }
            }

            fn is_connected(&self) -> bool {
                match self {
                    $(BrokerAdmin::$kind(b) => Admin::is_connected(b),)+
                }
            }

            async fn declare_queue(&self, t: &Topology) -> Result<(), Error> {
                match self {
                    $(BrokerAdmin::$kind(b) => Admin::declare_queue(b, t).await,)+
                }
            }

            async fn declare_consumer(&self, t: &Topology, microservice: &str) -> Result<(), Error> {
                match self {
                    $(BrokerAdmin::$kind(b) => Admin::declare_consumer(b, t, microservice).await,)+
                }
            }

            async fn managed_consumers(
                &self,
                t: &Topology,
                known: &[String],
            ) -> Result<Vec<String>, Error> {
                match self {
                    $(BrokerAdmin::$kind(b) => Admin::managed_consumers(b, t, known).await,)+
                }
            }

            async fn delete_consumer(&self, t: &Topology, name: &str) -> Result<bool, Error> {
                match self {
                    $(BrokerAdmin::$kind(b) => Admin::delete_consumer(b, t, name).await,)+
                }
            }

            async fn figures(&self, t: &Topology, consumers: &[String]) -> Result<Figures, Error> {
                match self {
                    $(BrokerAdmin::$kind(b) => Admin::figures(b, t, consumers).await,)+
                }
            }

            async fn delete_queue(&self, t: &Topology, consumers: &[String]) -> Result<(), Error> {
                match self {
                    $(BrokerAdmin::$kind(b) => Admin::delete_queue(b, t, consumers).await,)+
                }
            }

            fn refused_settings(&self, t: &Topology) -> Vec<String> {
                match self {
                    $(BrokerAdmin::$kind(b) => Admin::refused_settings(b, t),)+
                }
            }
        }
    };
}

register! {
    Nats => crate::nats::admin::NatsAdmin,
    Redis => crate::redis::admin::RedisAdmin,
    Rabbitmq => crate::rabbitmq::admin::RabbitAdmin,
    Kafka => crate::kafka::admin::KafkaAdmin,
}

impl BrokerAdmin {
    /// The JetStream connection, for what only JetStream does (saga logs).
    pub fn nats(&self) -> Option<&crate::nats::admin::NatsAdmin> {
        match self {
            BrokerAdmin::Nats(b) => Some(b),
            _ => None,
        }
    }
}

/// The kind a URL's scheme names (`nats://`, `amqp://`, `redis://`, `kafka://` and their TLS
/// forms).
pub fn kind_of_url(url: &str) -> Option<BrokerKind> {
    let scheme = url.split("://").next()?;
    KINDS
        .iter()
        .copied()
        .find(|k| k.schemes().contains(&scheme))
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
        // Kafka has no count limit.
        let kafka = not_applied(BrokerKind::Kafka, &plain);
        assert!(
            kafka.len() == 1 && kafka[0].starts_with("spec.maxMessages ("),
            "{kafka:?}"
        );
        // Partitions are Kafka's alone.
        let partitioned = spec("{broker: b, partitions: 3}");
        for kind in [BrokerKind::Nats, BrokerKind::Redis, BrokerKind::Rabbitmq] {
            let out = not_applied(kind, &partitioned);
            assert!(
                out.len() == 1 && out[0].starts_with("spec.partitions ("),
                "{kind:?}: {out:?}"
            );
        }
        assert!(not_applied(BrokerKind::Kafka, &partitioned).is_empty());
    }

    #[test]
    fn every_kind_is_registered_and_found_by_its_schemes() {
        for kind in [
            BrokerKind::Nats,
            BrokerKind::Redis,
            BrokerKind::Rabbitmq,
            BrokerKind::Kafka,
        ] {
            assert!(KINDS.contains(&kind), "{kind:?}");
            for scheme in kind.schemes() {
                assert_eq!(
                    kind_of_url(&format!("{scheme}://127.0.0.1")),
                    Some(kind),
                    "{scheme}"
                );
            }
        }
        assert_eq!(kind_of_url("http://127.0.0.1"), None);
    }
}
