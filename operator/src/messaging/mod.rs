//! A Queue's topology on NATS JetStream ([`brokers`] adds Redis and RabbitMQ): the stream, the
//! dead-letter stream, the processed-event KV bucket and one durable pull consumer per consuming
//! Microservice, named by [`weir_broker`] (the names the sidecar uses too).
//!
//! [`Topology`] is computed from a Queue's spec without I/O; [`NatsAdmin`] declares it (create or
//! update in place, idempotently), reads its figures and deletes it. Used by the Queue and Broker
//! controllers, by `weir dlq`, and usable by `weir up` without a cluster.

pub mod brokers;
pub mod dlq;
pub mod not_applied;

use async_nats::jetstream::{self, consumer, kv, stream};
use futures::TryStreamExt;
use std::collections::{BTreeMap, HashMap};
use std::time::Duration;
use weir_crds::duration;
use weir_crds::queue::{QueueSpec, Retention, Storage};

/// Consumer metadata key marking the durable consumers the operator manages (and may delete).
pub const MANAGED_BY_KEY: &str = "weir.dev/managed-by";
pub const MANAGED_BY_VALUE: &str = "weir-operator";
/// Shortest memory of processed event ids, whatever the duplicate window.
pub const MIN_PROCESSED_TTL: Duration = Duration::from_secs(600);
pub use weir_broker::nats::CONNECT_TIMEOUT;

pub use weir_broker::queue::{
    dead_letter_stream_name, dead_letter_subject, processed_bucket_name, stream_name,
};

/// The Queue's subjects ([`weir_broker::queue::subjects`]); events are published on the first.
pub fn subjects(namespace: &str, queue: &str, spec: &QueueSpec) -> Vec<String> {
    weir_broker::queue::subjects(namespace, queue, &spec.subjects)
}

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
}

/// JetStream error codes the operator names in conditions.
pub mod codes {
    pub const STREAM_SUBJECT_OVERLAP: u64 = 10065;
    pub const STREAM_NOT_FOUND: u64 = 10059;
    pub const CONSUMER_NOT_FOUND: u64 = 10014;
    pub const STREAM_NAME_IN_USE: u64 = 10058;
    pub const REPLICAS_NOT_SUPPORTED: u64 = 10074;
    pub const INSUFFICIENT_RESOURCES: u64 = 10023;
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
        }
    }

    /// The JetStream error code when the broker refused.
    pub fn code(&self) -> Option<u64> {
        match self {
            Error::Refused { code, .. } => Some(*code),
            _ => None,
        }
    }

    fn refused(what: impl Into<String>, e: &jetstream::Error) -> Self {
        // The description is private; it is in the serialized form.
        let description = serde_json::to_value(e)
            .ok()
            .and_then(|v| v["description"].as_str().map(str::to_string))
            .unwrap_or_else(|| e.to_string());
        Error::Refused {
            what: what.into(),
            code: e.error_code().0,
            description,
        }
    }

    fn other(what: impl Into<String>, e: impl std::fmt::Display) -> Self {
        Error::Broker {
            what: what.into(),
            message: e.to_string(),
        }
    }

    fn is_not_found(&self) -> bool {
        matches!(
            self.code(),
            Some(codes::STREAM_NOT_FOUND | codes::CONSUMER_NOT_FOUND)
        )
    }
}

/// The JetStream API error at the bottom of an async-nats error, if there is one.
fn api_error(e: &(dyn std::error::Error + 'static)) -> Option<jetstream::Error> {
    use jetstream::context::{
        CreateStreamError, CreateStreamErrorKind, GetStreamError, GetStreamErrorKind,
    };
    use jetstream::stream::{ConsumerError, ConsumerErrorKind};
    let mut cur: Option<&(dyn std::error::Error + 'static)> = Some(e);
    while let Some(err) = cur {
        if let Some(j) = err.downcast_ref::<jetstream::Error>() {
            return Some(j.clone());
        }
        if let Some(c) = err.downcast_ref::<CreateStreamError>()
            && let CreateStreamErrorKind::JetStream(j) = c.kind()
        {
            return Some(j);
        }
        if let Some(c) = err.downcast_ref::<GetStreamError>()
            && let GetStreamErrorKind::JetStream(j) = c.kind()
        {
            return Some(j);
        }
        if let Some(c) = err.downcast_ref::<ConsumerError>()
            && let ConsumerErrorKind::JetStream(j) = c.kind()
        {
            return Some(j);
        }
        cur = err.source();
    }
    None
}

/// Maps an async-nats error to [`Error::Refused`] when the broker refused, else [`Error::Broker`].
fn map_err<E: std::error::Error + 'static>(what: impl Into<String>) -> impl FnOnce(E) -> Error {
    let what = what.into();
    move |e| match api_error(&e) {
        Some(j) => Error::refused(what, &j),
        None => Error::other(what, e),
    }
}

pub use weir_broker::credentials::{Auth, CA_KEY, Credentials, CredentialsError, parse_ca};

impl From<CredentialsError> for Error {
    fn from(e: CredentialsError) -> Self {
        Error::Credentials(e.0)
    }
}

impl From<weir_broker::nats::ConnectError> for Error {
    fn from(e: weir_broker::nats::ConnectError) -> Self {
        match e {
            weir_broker::nats::ConnectError::Credentials(c) => c.into(),
            weir_broker::nats::ConnectError::Connect { url, message } => {
                Error::Connect { url, message }
            }
        }
    }
}

/// The operator's connection to a NATS server with JetStream: declares, inspects and deletes a
/// Queue's streams, bucket and consumers.
#[derive(Clone)]
pub struct NatsAdmin {
    client: async_nats::Client,
    js: jetstream::Context,
}

/// Connects once (no retry loop: the controllers requeue instead).
pub async fn connect(url: &str, credentials: &Credentials) -> Result<NatsAdmin, Error> {
    let client = weir_broker::nats::connect(url, credentials, "weir-operator").await?;
    let js = jetstream::new(client.clone());
    Ok(NatsAdmin { client, js })
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

/// Everything declared on the broker for one Queue, computed from its spec.
#[derive(Debug, Clone)]
pub struct Topology {
    pub namespace: String,
    pub queue: String,
    pub stream: stream::Config,
    pub dead_letter: Option<stream::Config>,
    pub processed: kv::Config,
    pub consumer: ConsumerSettings,
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
        let storage = match spec.storage {
            Storage::File => stream::StorageType::File,
            Storage::Memory => stream::StorageType::Memory,
        };
        let replicas = usize::try_from(spec.replicas.max(1)).unwrap_or(1);
        let stream = stream::Config {
            name: stream_name(namespace, queue),
            description: Some(format!("Weir Queue {namespace}/{queue}")),
            subjects: subjects.clone(),
            retention: match spec.retention {
                Retention::Limits => stream::RetentionPolicy::Limits,
                Retention::WorkQueue => stream::RetentionPolicy::WorkQueue,
                Retention::Interest => stream::RetentionPolicy::Interest,
            },
            storage,
            num_replicas: replicas,
            max_age,
            max_messages: spec.max_messages.unwrap_or(-1),
            max_bytes: spec.max_bytes.unwrap_or(-1),
            duplicate_window,
            ..Default::default()
        };
        let dead_letter = if spec.dead_letter.enabled {
            Some(stream::Config {
                name: dead_letter_stream_name(namespace, queue),
                description: Some(format!("Weir dead letters of Queue {namespace}/{queue}")),
                subjects: vec![dead_letter_subject(namespace, queue)],
                retention: stream::RetentionPolicy::Limits,
                storage,
                num_replicas: replicas,
                max_age: parse_duration("spec.deadLetter.maxAge", &spec.dead_letter.max_age)?,
                max_messages: -1,
                max_bytes: -1,
                ..Default::default()
            })
        } else {
            None
        };
        let processed = kv::Config {
            bucket: processed_bucket_name(namespace, queue),
            description: format!("Weir processed event ids of Queue {namespace}/{queue}"),
            history: 1,
            max_age: duplicate_window.max(MIN_PROCESSED_TTL),
            storage,
            num_replicas: replicas,
            ..Default::default()
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

    /// The limits of each RabbitMQ consumer queue (the sidecar gets the same in its config).
    pub fn rabbitmq_limits(&self) -> weir_crds::proxy::QueueLimits {
        let s = &self.stream;
        let positive = |v: i64| u64::try_from(v).ok().filter(|v| *v > 0);
        weir_crds::proxy::QueueLimits {
            max_messages: positive(s.max_messages),
            max_bytes: positive(s.max_bytes),
            max_age_ms: (!s.max_age.is_zero()).then_some(s.max_age.as_millis() as u64),
            replicas: (s.num_replicas > 1).then_some(s.num_replicas as u32),
        }
    }

    /// The subject events are published on.
    pub fn subject(&self) -> &str {
        &self.stream.subjects[0]
    }

    /// The durable pull consumer of Microservice `microservice`.
    ///
    /// The broker's `BackOff` replaces the ack wait of each redelivery, so its entries are the
    /// spec's backoff raised to at least `ackWait` (a slow handler is not redelivered early), and
    /// only the first `maxDeliveries - 1` count (the broker refuses more). The sidecar applies
    /// the spec's backoff itself when it naks.
    pub fn consumer_config(&self, microservice: &str) -> consumer::pull::Config {
        let c = &self.consumer;
        let redeliveries = usize::try_from(c.max_deliver - 1).unwrap_or(0);
        let backoff: Vec<Duration> = c
            .backoff
            .iter()
            .take(redeliveries)
            .map(|b| (*b).max(c.ack_wait))
            .collect();
        let (filter_subject, filter_subjects) = match c.filter_subjects.as_slice() {
            [one] => (one.clone(), Vec::new()),
            many => (String::new(), many.to_vec()),
        };
        consumer::pull::Config {
            durable_name: Some(microservice.to_string()),
            description: Some(format!(
                "Weir: Microservice {}/{microservice} consumes Queue {}",
                self.namespace, self.queue
            )),
            deliver_policy: consumer::DeliverPolicy::All,
            ack_policy: consumer::AckPolicy::Explicit,
            ack_wait: c.ack_wait,
            max_deliver: c.max_deliver,
            backoff,
            max_ack_pending: c.max_ack_pending,
            filter_subject,
            filter_subjects,
            metadata: HashMap::from([(MANAGED_BY_KEY.to_string(), MANAGED_BY_VALUE.to_string())]),
            ..Default::default()
        }
    }
}

impl NatsAdmin {
    /// The server's version, e.g. `2.15.1`.
    pub fn server_version(&self) -> String {
        self.client.server_info().version
    }

    pub fn client(&self) -> &async_nats::Client {
        &self.client
    }

    pub fn jetstream(&self) -> &jetstream::Context {
        &self.js
    }

    /// Creates or updates the stream, the dead-letter stream and the processed-event bucket.
    pub async fn declare_queue(&self, t: &Topology) -> Result<(), Error> {
        self.js
            .create_or_update_stream(t.stream.clone())
            .await
            .map_err(map_err(format!("stream {}", t.stream.name)))?;
        if let Some(d) = &t.dead_letter {
            self.js
                .create_or_update_stream(d.clone())
                .await
                .map_err(map_err(format!("dead-letter stream {}", d.name)))?;
        }
        self.js
            .create_or_update_key_value(t.processed.clone())
            .await
            .map_err(map_err(format!("KV bucket {}", t.processed.bucket)))?;
        Ok(())
    }

    /// Creates or updates the durable consumer of `microservice` on the Queue's stream.
    pub async fn declare_consumer(&self, t: &Topology, microservice: &str) -> Result<(), Error> {
        self.js
            .create_consumer_on_stream(t.consumer_config(microservice), t.stream_name())
            .await
            .map_err(map_err(format!(
                "consumer {microservice} on stream {}",
                t.stream_name()
            )))?;
        Ok(())
    }

    /// The consumer's current settings on the broker.
    pub async fn consumer_info(&self, stream: &str, name: &str) -> Result<consumer::Info, Error> {
        let what = format!("consumer {name} on stream {stream}");
        let c: consumer::PullConsumer = self
            .js
            .get_consumer_from_stream(name, stream)
            .await
            .map_err(map_err(what))?;
        Ok(c.cached_info().clone())
    }

    /// Durable consumers on the Queue's stream that the operator manages.
    pub async fn managed_consumers(&self, t: &Topology) -> Result<Vec<String>, Error> {
        let what = format!("consumers of stream {}", t.stream_name());
        let s = self
            .js
            .get_stream_no_info(t.stream_name())
            .await
            .map_err(map_err(what.clone()))?;
        let infos: Vec<consumer::Info> =
            s.consumers().try_collect().await.map_err(map_err(what))?;
        let mut names: Vec<String> = infos
            .into_iter()
            .filter(|i| {
                i.config.durable_name.is_some()
                    && i.config.metadata.get(MANAGED_BY_KEY).map(String::as_str)
                        == Some(MANAGED_BY_VALUE)
            })
            .map(|i| i.name)
            .collect();
        names.sort();
        Ok(names)
    }

    /// Deletes a consumer; `false` when it was not there.
    pub async fn delete_consumer(&self, t: &Topology, name: &str) -> Result<bool, Error> {
        match self
            .js
            .delete_consumer_from_stream(name, t.stream_name())
            .await
            .map_err(map_err(format!(
                "consumer {name} on stream {}",
                t.stream_name()
            ))) {
            Ok(_) => Ok(true),
            Err(e) if e.is_not_found() => Ok(false),
            Err(e) => Err(e),
        }
    }

    /// Messages on the stream, pending per consumer, and dead-letter depth.
    pub async fn figures(&self, t: &Topology, consumers: &[String]) -> Result<Figures, Error> {
        let messages = self.stream_messages(t.stream_name()).await?;
        let mut pending = BTreeMap::new();
        for name in consumers {
            let info = self.consumer_info(t.stream_name(), name).await?;
            pending.insert(name.clone(), info.num_pending + info.num_ack_pending as u64);
        }
        let dead_letters = match &t.dead_letter {
            Some(d) => Some(self.stream_messages(&d.name).await?),
            None => None,
        };
        Ok(Figures {
            messages,
            pending,
            dead_letters,
        })
    }

    async fn stream_messages(&self, name: &str) -> Result<u64, Error> {
        let what = format!("stream {name}");
        let mut s = self
            .js
            .get_stream(name)
            .await
            .map_err(map_err(what.clone()))?;
        Ok(s.info().await.map_err(map_err(what))?.state.messages)
    }

    /// Deletes the stream (with its consumers), the dead-letter stream and the bucket; what is
    /// already gone is skipped.
    pub async fn delete_queue(&self, t: &Topology) -> Result<(), Error> {
        let mut names = vec![t.stream.name.clone()];
        names.extend(t.dead_letter.as_ref().map(|d| d.name.clone()));
        // The bucket's stream; also deleted when dead letters were disabled later.
        names.push(dead_letter_stream_name(&t.namespace, &t.queue));
        names.push(format!("KV_{}", t.processed.bucket));
        names.dedup();
        let mut seen = std::collections::BTreeSet::new();
        for name in names {
            if !seen.insert(name.clone()) {
                continue;
            }
            match self
                .js
                .delete_stream(&name)
                .await
                .map_err(map_err(format!("stream {name}")))
            {
                Ok(_) => {}
                Err(e) if e.is_not_found() => {}
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }

    /// Whether a stream exists.
    pub async fn stream_exists(&self, name: &str) -> Result<bool, Error> {
        weir_broker::nats::stream_exists(&self.js, name)
            .await
            .map_err(map_err(format!("stream {name}")))
    }
}

#[cfg(test)]
mod tests;
#[cfg(test)]
mod tls_tests;
