//! The operator's role on NATS JetStream. For a Queue's [`Topology`] it declares:
//!
//! - the stream `weir_<ns>_<q>` on the Queue's subjects, with its retention, storage, replicas,
//!   limits and duplicate window;
//! - the dead-letter stream `weir_<ns>_<q>_dlq` on `weir.dlq.<ns>.<q>` (limits retention, its
//!   own max age), when dead letters are enabled;
//! - the KV bucket `weir_processed_<ns>_<q>` remembering processed event ids (history 1, kept
//!   for the duplicate window, at least [`MIN_PROCESSED_TTL`]);
//! - one durable pull consumer per consuming Microservice, marked with [`MANAGED_BY_KEY`] so
//!   that the operator deletes only the consumers it made.
//!
//! Everything is created or updated in place (`create_or_update_*`): JetStream changes a
//! stream's or consumer's settings without losing messages. A refusal keeps the JetStream error
//! code ([`Error::Refused`]), which names the condition reason.
//!
//! [`MIN_PROCESSED_TTL`]: crate::topology::MIN_PROCESSED_TTL

use crate::admin::{Admin, Error, Figures, Kind};
use crate::credentials::Credentials;
use crate::topology::Topology;
use async_nats::jetstream::{self, consumer, kv, stream};
use futures::TryStreamExt;
use std::collections::{BTreeMap, HashMap};
use std::time::Duration;
use weir_crds::broker::BrokerKind;
use weir_crds::queue::{QueueSpec, Retention, Storage};

/// Consumer metadata key marking the durable consumers the operator manages (and may delete).
pub const MANAGED_BY_KEY: &str = "weir.dev/managed-by";
pub const MANAGED_BY_VALUE: &str = "weir-operator";

fn storage(t: &Topology) -> stream::StorageType {
    match t.stream.storage {
        Storage::File => stream::StorageType::File,
        Storage::Memory => stream::StorageType::Memory,
    }
}

/// The Queue's stream.
pub fn stream_config(t: &Topology) -> stream::Config {
    let s = &t.stream;
    stream::Config {
        name: s.name.clone(),
        description: Some(format!("Weir Queue {}/{}", t.namespace, t.queue)),
        subjects: s.subjects.clone(),
        retention: match s.retention {
            Retention::Limits => stream::RetentionPolicy::Limits,
            Retention::WorkQueue => stream::RetentionPolicy::WorkQueue,
            Retention::Interest => stream::RetentionPolicy::Interest,
        },
        storage: storage(t),
        num_replicas: s.replicas,
        max_age: s.max_age,
        max_messages: s.max_messages.unwrap_or(-1),
        max_bytes: s.max_bytes.unwrap_or(-1),
        duplicate_window: s.duplicate_window,
        ..Default::default()
    }
}

/// The dead-letter stream, when dead letters are enabled.
pub fn dead_letter_config(t: &Topology) -> Option<stream::Config> {
    let d = t.dead_letter.as_ref()?;
    Some(stream::Config {
        name: d.name.clone(),
        description: Some(format!(
            "Weir dead letters of Queue {}/{}",
            t.namespace, t.queue
        )),
        subjects: vec![d.subject.clone()],
        retention: stream::RetentionPolicy::Limits,
        storage: storage(t),
        num_replicas: t.stream.replicas,
        max_age: d.max_age,
        max_messages: -1,
        max_bytes: -1,
        ..Default::default()
    })
}

/// The processed-event bucket.
pub fn bucket_config(t: &Topology) -> kv::Config {
    kv::Config {
        bucket: t.processed.bucket.clone(),
        description: format!(
            "Weir processed event ids of Queue {}/{}",
            t.namespace, t.queue
        ),
        history: 1,
        max_age: t.processed.max_age,
        storage: storage(t),
        num_replicas: t.stream.replicas,
        ..Default::default()
    }
}

/// The durable pull consumer of Microservice `microservice`.
///
/// The broker's `BackOff` replaces the ack wait of each redelivery, so its entries are the
/// spec's backoff raised to at least `ackWait` (a slow handler is not redelivered early), and
/// only the first `maxDeliveries - 1` count (the broker refuses more). The sidecar applies the
/// spec's backoff itself when it naks.
pub fn consumer_config(t: &Topology, microservice: &str) -> consumer::pull::Config {
    let c = &t.consumer;
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
            t.namespace, t.queue
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

/// [`Error::Refused`] from a JetStream API error.
fn refused(what: impl Into<String>, e: &jetstream::Error) -> Error {
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
pub fn map_err<E: std::error::Error + 'static>(what: impl Into<String>) -> impl FnOnce(E) -> Error {
    let what = what.into();
    move |e| match api_error(&e) {
        Some(j) => refused(what, &j),
        None => Error::broker(what, e),
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
    let client = crate::nats::connect(url, credentials, "weir-operator").await?;
    let js = jetstream::new(client.clone());
    Ok(NatsAdmin { client, js })
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

    /// Durable consumers on the Queue's stream that the operator manages (JetStream lists
    /// them: nothing need be known).
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
        names.push(t.dead_letter_stream_name());
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
        crate::nats::stream_exists(&self.js, name)
            .await
            .map_err(map_err(format!("stream {name}")))
    }
}

impl Admin for NatsAdmin {
    async fn server_version(&self) -> String {
        NatsAdmin::server_version(self)
    }

    fn is_connected(&self) -> bool {
        self.client.connection_state() == async_nats::connection::State::Connected
    }

    /// Creates or updates the stream, the dead-letter stream and the processed-event bucket.
    async fn declare_queue(&self, t: &Topology) -> Result<(), Error> {
        let s = stream_config(t);
        self.js
            .create_or_update_stream(s.clone())
            .await
            .map_err(map_err(format!("stream {}", s.name)))?;
        if let Some(d) = dead_letter_config(t) {
            self.js
                .create_or_update_stream(d.clone())
                .await
                .map_err(map_err(format!("dead-letter stream {}", d.name)))?;
        }
        let b = bucket_config(t);
        self.js
            .create_or_update_key_value(b.clone())
            .await
            .map_err(map_err(format!("KV bucket {}", b.bucket)))?;
        Ok(())
    }

    /// Creates or updates the durable consumer of `microservice` on the Queue's stream.
    async fn declare_consumer(&self, t: &Topology, microservice: &str) -> Result<(), Error> {
        self.js
            .create_consumer_on_stream(consumer_config(t, microservice), t.stream_name())
            .await
            .map_err(map_err(format!(
                "consumer {microservice} on stream {}",
                t.stream_name()
            )))?;
        Ok(())
    }

    async fn managed_consumers(
        &self,
        t: &Topology,
        _known: &[String],
    ) -> Result<Vec<String>, Error> {
        NatsAdmin::managed_consumers(self, t).await
    }

    async fn delete_consumer(&self, t: &Topology, name: &str) -> Result<bool, Error> {
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

    async fn figures(&self, t: &Topology, consumers: &[String]) -> Result<Figures, Error> {
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

    async fn delete_queue(&self, t: &Topology, _consumers: &[String]) -> Result<(), Error> {
        NatsAdmin::delete_queue(self, t).await
    }
}

impl Kind for NatsAdmin {
    const KIND: BrokerKind = BrokerKind::Nats;

    async fn connect(url: &str, credentials: &Credentials) -> Result<Self, Error> {
        connect(url, credentials).await
    }

    /// JetStream applies every setting.
    fn not_applied(spec: &QueueSpec) -> Vec<String> {
        let mut out = Vec::new();
        crate::admin::note(
            &mut out,
            spec.partitions > 1,
            "partitions",
            "a JetStream stream is one ordered log; only Kafka partitions a queue",
        );
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(yaml: &str) -> QueueSpec {
        serde_yaml::from_str(yaml).unwrap()
    }

    #[test]
    fn consumer_backoff_never_undercuts_ack_wait_and_fits_max_deliveries() {
        let t = Topology::new(
            "shop",
            "orders",
            &spec(
                "broker: nats\nconsumer: {maxDeliveries: 3, ackWait: 10s, backoff: [1s, 20s, 60s]}",
            ),
        )
        .unwrap();
        let c = consumer_config(&t, "billing");
        assert_eq!(
            c.backoff,
            [Duration::from_secs(10), Duration::from_secs(20)]
        );
        assert_eq!(
            t.consumer.backoff.len(),
            3,
            "the sidecar gets the spec's list"
        );
    }

    #[test]
    fn the_jetstream_configs_carry_the_spec() {
        let t = Topology::new(
            "shop",
            "orders",
            &spec(
                "broker: nats\nmaxAge: 24h\nmaxMessages: 1000\nduplicateWindow: 5m\nstorage: Memory\nreplicas: 3",
            ),
        )
        .unwrap();
        let s = stream_config(&t);
        assert_eq!(s.name, "weir_shop_orders");
        assert_eq!(s.subjects, ["weir.shop.orders"]);
        assert_eq!(s.storage, stream::StorageType::Memory);
        assert_eq!(s.num_replicas, 3);
        assert_eq!(s.max_age, Duration::from_secs(24 * 3600));
        assert_eq!((s.max_messages, s.max_bytes), (1000, -1));
        assert_eq!(s.duplicate_window, Duration::from_secs(300));
        let d = dead_letter_config(&t).unwrap();
        assert_eq!(d.subjects, ["weir.dlq.shop.orders"]);
        assert_eq!(d.max_age, Duration::from_secs(336 * 3600));
        let b = bucket_config(&t);
        assert_eq!(
            (b.bucket.as_str(), b.max_age),
            ("weir_processed_shop_orders", Duration::from_secs(600))
        );
        let off = Topology::new(
            "shop",
            "orders",
            &spec("broker: nats\ndeadLetter: {enabled: false}"),
        )
        .unwrap();
        assert!(dead_letter_config(&off).is_none());
    }
}
