//! The sidecar's role on Kafka: a topic per queue ([`super::topic`]), a consumer group per
//! consuming Microservice ([`super::group_id`]), every sidecar of it one member.
//!
//! - Publish: an idempotent producer with `acks=all`; the 202 comes after the broker's
//!   acknowledgement (position `<partition>:<offset>`). The event's CloudEvents headers are the
//!   record's headers; its `ce-partitionkey` (the CloudEvents partitioning extension, set from
//!   the publish request's `ce-partitionkey` or `Weir-Partition-Key`) is the record's key, so
//!   the events of one key land on one partition, in the order they were acknowledged. Without
//!   a key the partitioner spreads events and no order between them is kept. Kafka has no
//!   duplicate window at publish: a repeated event id is stored again (`duplicate` is always
//!   false) and the consumer's processed-event check drops it. A topic the broker does not know
//!   is `Unroutable` (503): the sidecar never creates the queue's topic (its partitions are the
//!   Queue's, declared by the operator).
//! - Consume: a member of the group, offsets committed only for records whose delivery ended
//!   (acked after the app's 2xx, or dead-lettered): `enable.auto.offset.store=false`, the offset
//!   stored when a delivery ends, committed every [`COMMIT_INTERVAL`] and at shutdown. One lane
//!   per assigned partition delivers its records one at a time, in offset order; at most
//!   `maxInFlight` lanes deliver at once. A nak holds the lane (the record and the records
//!   behind it in that partition wait) for the nak's delay and delivers the record again, while
//!   the other partitions go on. The delivery count is the lane's (Kafka keeps none): a record a
//!   crash or a rebalance hands to another member starts again at 1. A lane that has
//!   [`LANE_BUFFER`] records waiting pauses its partition's fetching until half have gone.
//! - Dead letters: produced (`acks=all`) to the dead-letter topic with the record's key, body
//!   and headers plus the `Weir-*` ones; the offset is stored after the broker's
//!   acknowledgement. Processed events: [`super::processed`].
//!
//! - Rewind ([`super::rewind`]): when the processed-event store reads a new rewind marker, or
//!   partitions are assigned, the fetcher moves each partition it owns that the newest marker
//!   moves and no applied record says was moved: its lane is stopped (a delivery in hand ends,
//!   its offset not stored), the partition is sought to the marker's offset, that offset is
//!   committed, and the applied record written. Records fetched before the seek are dropped.
//!
//! Until the queue's topic exists, consuming waits and tries again (the operator declares it);
//! a group joins at the topic's start (`auto.offset.reset=earliest`).

use super::processed::{ProcessedStore, partitions_of};
use super::quiet::Quiet;
use super::{Bootstrap, group_id, topic};
use crate::credentials::Credentials;
use crate::queue::processed_bucket;
use crate::transport::{
    Error, Handler, Headers, Inbound, MIN_DEDUP_TTL, Outgoing, PUBLISH_TIMEOUT, Published,
    RETRY_LATER, Settle, Side, Slots, header, setup_failed, stopped,
};
use bytes::Bytes;
use rdkafka::ClientConfig;
use rdkafka::Message;
use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer, ConsumerContext, Rebalance};
use rdkafka::error::KafkaError;
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord, Producer};
use rdkafka::types::RDKafkaErrorCode;
use rdkafka::util::Timeout;
use rdkafka::{ClientContext, Offset, TopicPartitionList};
use std::collections::HashMap;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::{mpsc, watch};
use weir_crds::proxy::ConsumeConfig;

/// The CloudEvents partitioning extension: the event's partition key (the record's key).
pub const CE_PARTITIONKEY: &str = "ce-partitionkey";
/// How often stored offsets are committed (and at shutdown).
pub const COMMIT_INTERVAL: Duration = Duration::from_millis(200);
/// Records fetched and waiting in one partition's lane before its fetching is paused.
pub const LANE_BUFFER: usize = 256;
/// Session timeout of a member: a crashed sidecar's partitions go to the others after it. Short,
/// so a lone member joins quickly too (a coordinator waits about half of it).
pub const SESSION_TIMEOUT: Duration = Duration::from_secs(6);

/// A produce that failed, as the bridge reports it.
pub(crate) fn produce_error(topic: &str, e: KafkaError) -> Error {
    match e.rdkafka_error_code() {
        Some(
            RDKafkaErrorCode::UnknownTopicOrPartition
            | RDKafkaErrorCode::UnknownTopic
            | RDKafkaErrorCode::UnknownPartition,
        ) => Error::Unroutable(format!(
            "no topic {topic} on the broker (the operator declares it with the Queue)"
        )),
        Some(RDKafkaErrorCode::MessageTimedOut) => Error::Timeout(format!(
            "the broker did not acknowledge within {} ms",
            PUBLISH_TIMEOUT.as_millis()
        )),
        code => Error::Broker {
            code: code.map(|c| format!("{c:?}")),
            message: format!("produce to {topic} failed: {e}"),
        },
    }
}

/// An admin call that failed.
pub(crate) fn admin_error(topic: &str, e: KafkaError) -> Error {
    Error::Broker {
        code: e.rdkafka_error_code().map(|c| format!("{c:?}")),
        message: format!("topic {topic}: {e}"),
    }
}

/// The librdkafka settings of `url` with the credentials at `credentials` (a Secret directory:
/// `username` and `password` for SASL, `ca.crt` for `kafka+ssl://`).
pub fn base_config(url: &str, credentials: Option<&str>) -> Result<ClientConfig, Error> {
    let b =
        Bootstrap::parse(url).map_err(|e| Error::Config(format!("messaging.brokerUrl: {e}")))?;
    let creds = match credentials {
        Some(dir) => Credentials::from_dir(Path::new(dir))?,
        None => Credentials::default(),
    };
    let mut c = b.client_config(&creds)?;
    // librdkafka's own log lines would repeat what the sidecar says once per distinct error.
    c.set("log_level", "3");
    Ok(c)
}

/// The sidecar's producer: librdkafka's reports quieted ([`Quiet`]), made again when librdkafka
/// says it failed fatally. An idempotent producer that the broker fences (`ProducerFenced`: a
/// Kafka-protocol broker restarting was seen to do it) fails every send after that until a new
/// instance is made; a CI run saw a consuming sidecar unable to record any processed event
/// again, each delivery retrying its record for the whole ack wait.
#[derive(Clone)]
pub struct SidecarProducer {
    config: ClientConfig,
    quiet: Quiet,
    current: Arc<std::sync::RwLock<FutureProducer<Quiet>>>,
}

impl SidecarProducer {
    fn new(config: ClientConfig, quiet: Quiet) -> Result<SidecarProducer, Error> {
        let p = Self::make(&config, &quiet)?;
        Ok(SidecarProducer {
            config,
            quiet,
            current: Arc::new(std::sync::RwLock::new(p)),
        })
    }

    fn make(config: &ClientConfig, quiet: &Quiet) -> Result<FutureProducer<Quiet>, Error> {
        config
            .create_with_context(quiet.clone())
            .map_err(|e| Error::Config(format!("cannot create a Kafka producer: {e}")))
    }

    /// The producer instance in use.
    pub fn current(&self) -> FutureProducer<Quiet> {
        self.current
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Produces `record`; when the send failed because the instance is in a fatal state, the
    /// instance is replaced for the next send (this one's error is returned: the caller's retry
    /// goes through the new one).
    pub async fn send<K, P>(
        &self,
        record: FutureRecord<'_, K, P>,
        timeout: Timeout,
    ) -> rdkafka::producer::future_producer::OwnedDeliveryResult
    where
        K: rdkafka::message::ToBytes + ?Sized,
        P: rdkafka::message::ToBytes + ?Sized,
    {
        let p = self.current();
        let r = p.send(record, timeout).await;
        if let Err((e, _)) = &r
            && let Some((code, why)) = needs_new_instance(e, || p.client().fatal_error())
        {
            self.renew(&p, code, &why);
        }
        r
    }

    fn renew(&self, failed: &FutureProducer<Quiet>, code: RDKafkaErrorCode, why: &str) {
        let mut cur = self.current.write().unwrap_or_else(|e| e.into_inner());
        // Another send may have replaced it already.
        if cur.client().native_ptr() != failed.client().native_ptr() {
            return;
        }
        match Self::make(&self.config, &self.quiet) {
            Ok(p) => {
                tracing::warn!(code = ?code, error = why, "the Kafka producer failed fatally: a new one is made");
                *cur = p;
            }
            Err(e) => {
                tracing::error!(code = ?code, error = why, new = %e, "the Kafka producer failed fatally and cannot be made again")
            }
        }
    }
}

/// Why a producer whose send failed with `e` must be replaced, if it must: librdkafka says it
/// failed fatally (`fatal`), or the broker fenced its producer id (`ProducerFenced`,
/// `InvalidProducerEpoch`). A fenced idempotent producer is not always put in the fatal state:
/// a CI run saw one answer every send with `ProducerFenced` after a Kafka-protocol broker was
/// killed and restarted, without librdkafka ever reporting a fatal error, so the processed
/// records of a consuming sidecar failed until the test gave up.
fn needs_new_instance(
    e: &KafkaError,
    fatal: impl FnOnce() -> Option<(RDKafkaErrorCode, String)>,
) -> Option<(RDKafkaErrorCode, String)> {
    if let Some(f) = fatal() {
        return Some(f);
    }
    match e.rdkafka_error_code() {
        Some(
            code @ (RDKafkaErrorCode::ProducerFenced | RDKafkaErrorCode::InvalidProducerEpoch),
        ) => Some((code, e.to_string())),
        _ => None,
    }
}

/// The sidecar's Kafka clients: an idempotent producer (reconnecting on its own), and a
/// health check that keeps `connected` current by asking the cluster's metadata.
pub struct KafkaConn {
    base: ClientConfig,
    quiet: Quiet,
    producer: SidecarProducer,
    connected: Arc<AtomicBool>,
    health: tokio::task::JoinHandle<()>,
}

impl KafkaConn {
    pub fn open(
        url: &str,
        credentials: Option<&str>,
        name: &str,
        on_state: impl Fn(bool) + Send + Sync + 'static,
    ) -> Result<KafkaConn, Error> {
        let base = base_config(url, credentials)?;
        let quiet = Quiet::default();
        let mut config = base.clone();
        config
            .set("client.id", name)
            .set("enable.idempotence", "true")
            .set("acks", "all")
            .set("linger.ms", "1")
            .set(
                "message.timeout.ms",
                PUBLISH_TIMEOUT.as_millis().to_string(),
            )
            // A topic is the operator's to declare: never created by a publish, and known to be
            // missing within a second.
            .set("allow.auto.create.topics", "false")
            .set("topic.metadata.propagation.max.ms", "1000");
        let producer = SidecarProducer::new(config, quiet.clone())?;
        let connected = Arc::new(AtomicBool::new(false));
        let (p, flag, q) = (producer.clone(), connected.clone(), quiet.clone());
        let health = tokio::spawn(async move {
            let mut last_error: Option<String> = None;
            loop {
                let p2 = p.current();
                let r = tokio::task::spawn_blocking(move || {
                    p2.client()
                        .fetch_metadata(None, Duration::from_secs(1))
                        .map(|_| ())
                })
                .await;
                // librdkafka's own report says why (a refused certificate, a refused
                // connection) where the metadata request only says that it failed.
                let error = match r {
                    Ok(Ok(())) => None,
                    Ok(Err(e)) => Some(match q.last_error() {
                        Some(why) => format!("{e} ({why})"),
                        None => e.to_string(),
                    }),
                    Err(e) => Some(e.to_string()),
                };
                if error.is_none() {
                    q.connected();
                }
                // Told once per failure (figures such as "1/1 brokers" aside).
                let shape = error.as_deref().map(super::quiet::shape);
                if let Some(e) = error.as_ref().filter(|_| last_error != shape) {
                    tracing::warn!(error = %e, "broker not usable");
                }
                let ok = error.is_none();
                last_error = shape;
                if flag.swap(ok, Ordering::AcqRel) != ok {
                    on_state(ok);
                    if ok {
                        tracing::info!("broker connected");
                    } else {
                        tracing::warn!("broker disconnected; reconnecting");
                    }
                }
                tokio::time::sleep(Duration::from_millis(250)).await;
            }
        });
        Ok(KafkaConn {
            base,
            quiet,
            producer,
            connected,
            health,
        })
    }

    pub fn connected(&self) -> bool {
        self.connected.load(Ordering::Acquire)
    }

    /// Stops the health check and sends what the producer still holds (up to 2 s).
    pub async fn close(&self) {
        self.health.abort();
        let p = self.producer.current();
        let _ = tokio::task::spawn_blocking(move || p.flush(Duration::from_secs(2))).await;
    }

    /// Produces the event and waits for the broker's acknowledgement.
    pub async fn publish(&self, event: Outgoing<'_>) -> Result<Published, Error> {
        let t = topic(&event.target.stream);
        let mut headers = OwnedHeaders::new_with_capacity(event.headers.len());
        for (k, v) in event.headers {
            headers = headers.insert(Header {
                key: k,
                value: Some(v.as_bytes()),
            });
        }
        let mut record = FutureRecord::to(&t)
            .payload(event.payload.as_ref())
            .headers(headers);
        if let Some(key) = header(event.headers, CE_PARTITIONKEY) {
            record = record.key(key);
        }
        let send = self.producer.send(record, Timeout::After(PUBLISH_TIMEOUT));
        match tokio::time::timeout(PUBLISH_TIMEOUT + Duration::from_secs(1), send).await {
            Err(_) => Err(Error::Timeout(format!(
                "the broker did not acknowledge within {} ms",
                PUBLISH_TIMEOUT.as_millis()
            ))),
            Ok(Err((e, _))) => Err(produce_error(&t, e)),
            // librdkafka reports a batch the broker called a duplicate of one it already holds
            // (`DUPLICATE_SEQUENCE_NUMBER`) as delivered, without an offset. A broker that lost
            // its producer state may say so of a record it never stored (the test kit's Tansu
            // did, after a crash): no 202 without a position, the client publishes again (a
            // second copy, if there is one, is dropped by the consumers' dedup on `ce-id`).
            Ok(Ok(d)) if d.offset < 0 => Err(Error::Broker {
                code: Some("NoOffset".into()),
                message: format!(
                    "the broker acknowledged the event on {t} partition {} without an offset \
                     (as a duplicate of a record it may not hold): publish again",
                    d.partition
                ),
            }),
            Ok(Ok(d)) => Ok(Published {
                duplicate: false,
                position: serde_json::Value::String(format!("{}:{}", d.partition, d.offset)),
            }),
        }
    }
}

/// A record as the sidecar keeps it while delivering it (possibly several times).
#[derive(Debug)]
pub struct Record {
    pub partition: i32,
    pub offset: i64,
    /// CreateTime or LogAppendTime, Unix ms.
    pub timestamp: Option<i64>,
    pub key: Option<Vec<u8>>,
    pub payload: Bytes,
    pub headers: Headers,
}

impl Record {
    /// Copies what a delivery needs out of a fetched message.
    pub fn of<M: Message>(m: &M) -> Record {
        let headers = super::headers_of(m);
        Record {
            partition: m.partition(),
            offset: m.offset(),
            timestamp: m.timestamp().to_millis(),
            key: m.key().map(<[u8]>::to_vec),
            payload: Bytes::copy_from_slice(m.payload().unwrap_or_default()),
            headers,
        }
    }

    /// `<partition>:<offset>`: `Weir-Original-Seq`, and the 202's `stream_seq`.
    pub fn position(&self) -> String {
        format!("{}:{}", self.partition, self.offset)
    }
}

/// What fetching and the lanes share: the lanes by partition, and whether the assignment
/// changed since the fetcher last looked (it then looks for rewinds due).
#[derive(Default)]
struct Lanes {
    by_partition: Mutex<HashMap<i32, Lane>>,
    assignment_changed: AtomicBool,
}

impl Lanes {
    /// Stops the lane of `partition`, if any: it delivers nothing more, and a delivery it has
    /// in hand stores no offset when it ends.
    fn stop(&self, partition: i32) {
        let lane = self
            .by_partition
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&partition);
        if let Some(lane) = lane {
            let _settling = lane
                .state
                .settling
                .lock()
                .unwrap_or_else(|e| e.into_inner());
            lane.state.revoked.store(true, Ordering::Release);
        }
    }
}

struct Lane {
    tx: mpsc::UnboundedSender<Arc<Record>>,
    state: Arc<LaneState>,
}

/// A lane's waiting records and whether its partition's fetching is paused; `revoked` once the
/// partition went to another member or was moved back (the lane stops before its next
/// delivery). `settling` is held while a delivery stores its offset and while the lane is
/// revoked, so no offset is stored once a rewind moved the partition.
#[derive(Default)]
struct LaneState {
    waiting: Mutex<(usize, bool)>,
    revoked: AtomicBool,
    settling: Mutex<()>,
}

/// The consumer's context: partitions revoked in a rebalance stop their lanes; librdkafka's
/// reports go through the connection's [`Quiet`].
struct GroupContext {
    lanes: Arc<Lanes>,
    topic: String,
    quiet: Quiet,
}

impl ClientContext for GroupContext {
    fn log(&self, level: rdkafka::config::RDKafkaLogLevel, fac: &str, message: &str) {
        self.quiet.log(level, fac, message)
    }
    fn error(&self, error: KafkaError, reason: &str) {
        self.quiet.error(error, reason)
    }
}

impl ConsumerContext for GroupContext {
    fn pre_rebalance(&self, _c: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        if let Rebalance::Revoke(tpl) = rebalance {
            for e in tpl.elements_for_topic(&self.topic) {
                self.lanes.stop(e.partition());
            }
            self.lanes.assignment_changed.store(true, Ordering::Release);
            tracing::info!(topic = %self.topic, partitions = tpl.count(), "partitions revoked");
        }
    }

    fn post_rebalance(&self, c: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        match rebalance {
            Rebalance::Assign(tpl) => {
                // A partition paused by an earlier lane of this member fetches again.
                let _ = c.resume(tpl);
                self.lanes.assignment_changed.store(true, Ordering::Release);
                tracing::info!(topic = %self.topic, partitions = tpl.count(), "partitions assigned");
            }
            Rebalance::Error(e) => {
                tracing::warn!(topic = %self.topic, error = %e, "rebalance failed")
            }
            Rebalance::Revoke(_) => {}
        }
    }
}

type GroupConsumer = BaseConsumer<GroupContext>;

fn one_partition(topic: &str, partition: i32) -> TopicPartitionList {
    let mut tpl = TopicPartitionList::new();
    tpl.add_partition(topic, partition);
    tpl
}

/// What one consumer shares with its messages.
pub struct Shared {
    consumer: Arc<GroupConsumer>,
    topic: String,
    producer: SidecarProducer,
    dead_letter_topic: String,
    processed: ProcessedStore,
}

pub struct KafkaMsg {
    record: Arc<Record>,
    lane: Arc<LaneState>,
    delivered: u64,
    shared: Arc<Shared>,
    /// How the delivery ended, read by the lane once the handler returns.
    outcome: Arc<Mutex<Option<Settle>>>,
}

impl Inbound for KafkaMsg {
    fn payload(&self) -> &Bytes {
        &self.record.payload
    }
    fn headers(&self) -> &Headers {
        &self.record.headers
    }
    fn delivered(&self) -> u64 {
        self.delivered
    }
    fn position(&self) -> String {
        self.record.position()
    }
    fn origin(&self) -> &str {
        &self.shared.topic
    }
    fn identity(&self) -> Option<String> {
        // Partition and offset, and the record's time: a topic deleted and declared again
        // counts offsets from 0 while processed-event records of the old one may remain.
        Some(format!(
            "{}:{}",
            self.record.position(),
            self.record.timestamp.unwrap_or_default()
        ))
    }
    async fn requeue_with_identity(&self, _identity: &str) -> Result<(), Error> {
        Err(Error::Unsupported(
            "a Kafka record always has an identity (partition and offset)",
        ))
    }
    async fn settle(&self, how: Settle) -> Result<(), Error> {
        *self.outcome.lock().unwrap_or_else(|e| e.into_inner()) = Some(how);
        match how {
            // The offset after this record is committed with the next commit; none once the
            // lane was revoked (the partition is another member's, or was moved back).
            Settle::Ack | Settle::Term => {
                let _settling = self.lane.settling.lock().unwrap_or_else(|e| e.into_inner());
                if self.lane.revoked.load(Ordering::Acquire) {
                    return Ok(());
                }
                self.shared
                    .consumer
                    .store_offset(
                        &self.shared.topic,
                        self.record.partition,
                        self.record.offset,
                    )
                    .map_err(|e| Error::broker(format!("cannot store the offset: {e}")))
            }
            // The lane delivers the record again after the delay.
            Settle::Nak(_) => Ok(()),
        }
    }
    async fn progress(&self) {
        // A member keeps its partitions while it polls; no per-record deadline to extend.
    }
}

pub struct KafkaSide {
    shared: Arc<Shared>,
}

impl Side for KafkaSide {
    type Msg = KafkaMsg;
    async fn is_processed(&self, key: &str, position: &str) -> Result<bool, Error> {
        Ok(self.shared.processed.contains(key, position))
    }
    async fn record_processed(&self, key: &str, value: &str) -> Result<(), Error> {
        self.shared.processed.record(key, value).await
    }
    async fn dead_letter(&self, msg: &KafkaMsg, headers: Headers) -> Result<(), Error> {
        let s = &self.shared;
        let mut h = OwnedHeaders::new_with_capacity(headers.len());
        for (k, v) in &headers {
            h = h.insert(Header {
                key: k,
                value: Some(v.as_bytes()),
            });
        }
        let mut record = FutureRecord::to(&s.dead_letter_topic)
            .payload(msg.record.payload.as_ref())
            .headers(h);
        if let Some(k) = &msg.record.key {
            record = record.key(k.as_slice());
        }
        s.producer
            .send(record, Timeout::After(PUBLISH_TIMEOUT))
            .await
            .map(|_| ())
            .map_err(|(e, _)| produce_error(&s.dead_letter_topic, e))
    }
}

/// Runs until `stop`, as a member of the Microservice's group: the lanes hand records to
/// `handler`, at most `maxInFlight` at a time.
pub(crate) async fn run<H: Handler>(
    conn: Arc<KafkaConn>,
    c: ConsumeConfig,
    instance: String,
    mut stop: watch::Receiver<bool>,
    handler: Arc<H>,
) {
    let queue = c.queue.as_str();
    let t = topic(&c.stream);
    let group = group_id(&c.stream, &c.consumer);
    let mut delay = Duration::from_millis(100);
    let lanes = Arc::new(Lanes::default());
    // Set up: the topic exists, the processed-event store is read, the consumer subscribed.
    let (consumer, processed) = loop {
        if *stop.borrow() {
            return;
        }
        match setup(&conn, &c, &t, &group, &instance, lanes.clone()).await {
            Ok(s) => break s,
            Err(e) => {
                if setup_failed(queue, &e, &mut stop, &mut delay, Duration::from_secs(2)).await {
                    return;
                }
            }
        }
    };
    tracing::info!(queue, group = %group, topic = %t, "consuming");
    let shared = Arc::new(Shared {
        consumer: consumer.clone(),
        topic: t.clone(),
        producer: conn.producer.clone(),
        dead_letter_topic: c.dead_letter_stream.clone(),
        processed,
    });
    let side = Arc::new(KafkaSide {
        shared: shared.clone(),
    });
    let slots = Arc::new(Slots::new(c.max_in_flight as usize));
    let quit = Arc::new(AtomicBool::new(false));
    let fetcher = {
        let (fetching, lanes, quit) = (shared.clone(), lanes.clone(), quit.clone());
        let rt = tokio::runtime::Handle::current();
        let spawn_lane = {
            let (shared, side, slots, handler, stop) = (
                shared.clone(),
                side.clone(),
                slots.clone(),
                handler.clone(),
                stop.clone(),
            );
            let rt = tokio::runtime::Handle::current();
            move |rx, state| {
                rt.spawn(lane(
                    shared.clone(),
                    side.clone(),
                    slots.clone(),
                    handler.clone(),
                    stop.clone(),
                    rx,
                    state,
                ));
            }
        };
        std::thread::Builder::new()
            .name(format!("weir-kafka-{}", c.consumer))
            .spawn(move || fetch(fetching, lanes, quit, rt, spawn_lane))
    };
    let fetcher = match fetcher {
        Ok(f) => f,
        Err(e) => {
            tracing::error!(queue, error = %e, "cannot start the Kafka fetcher");
            return;
        }
    };
    stopped(&mut stop).await;
    quit.store(true, Ordering::Release);
    slots.drain(queue, &c.consumer).await;
    // Every delivery has ended: commit what they stored, then leave the group.
    let _ = tokio::task::spawn_blocking(move || {
        let _ = fetcher.join();
        lanes
            .by_partition
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clear();
        if let Err(e) = consumer.commit_consumer_state(CommitMode::Sync) {
            tracing::debug!(error = %e, "final commit");
        }
        drop(shared);
        drop(consumer);
    })
    .await;
}

/// Waits for the topic, reads the processed-event store and subscribes.
async fn setup(
    conn: &KafkaConn,
    c: &ConsumeConfig,
    t: &str,
    group: &str,
    instance: &str,
    lanes: Arc<Lanes>,
) -> Result<(Arc<GroupConsumer>, ProcessedStore), Error> {
    let consumer: GroupConsumer = conn
        .base
        .clone()
        .set("group.id", group)
        .set("client.id", format!("weir-proxy {instance}"))
        .set("enable.auto.commit", "true")
        .set(
            "auto.commit.interval.ms",
            COMMIT_INTERVAL.as_millis().to_string(),
        )
        .set("enable.auto.offset.store", "false")
        .set("auto.offset.reset", "earliest")
        .set(
            "session.timeout.ms",
            SESSION_TIMEOUT.as_millis().to_string(),
        )
        .set("heartbeat.interval.ms", "300")
        .set("topic.metadata.refresh.interval.ms", "5000")
        .create_with_context(GroupContext {
            lanes,
            topic: t.to_string(),
            quiet: conn.quiet.clone(),
        })
        .map_err(|e| Error::Config(format!("cannot create a Kafka consumer: {e}")))?;
    let consumer = Arc::new(consumer);
    let (c2, t2) = (consumer.clone(), t.to_string());
    tokio::task::spawn_blocking(move || partitions_of(c2.as_ref(), &t2).map(|_| ()))
        .await
        .map_err(|e| Error::broker(e.to_string()))??;
    let ttl = Duration::from_millis(c.dedup_window_ms).max(MIN_DEDUP_TTL);
    let processed = ProcessedStore::open(
        &conn.base,
        conn.quiet.clone(),
        conn.producer.clone(),
        &processed_bucket(&c.stream),
        &c.consumer,
        ttl,
    )
    .await?;
    consumer
        .subscribe(&[t])
        .map_err(|e| Error::broker(format!("cannot subscribe to {t}: {e}")))?;
    Ok((consumer, processed))
}

/// The fetching thread: polls the consumer (which also runs rebalances), moves partitions back
/// for a rewind, hands each record to its partition's lane, pauses a partition whose lane has
/// [`LANE_BUFFER`] records waiting.
fn fetch(
    shared: Arc<Shared>,
    lanes: Arc<Lanes>,
    quit: Arc<AtomicBool>,
    rt: tokio::runtime::Handle,
    spawn_lane: impl Fn(mpsc::UnboundedReceiver<Arc<Record>>, Arc<LaneState>),
) {
    let (consumer, topic) = (&shared.consumer, &shared.topic);
    let mut last_error = String::new();
    // Partitions to move back: generation and offset of the marker.
    let mut rewinding: HashMap<i32, (u64, i64)> = HashMap::new();
    while !quit.load(Ordering::Acquire) {
        let polled = consumer.poll(Duration::from_millis(100));
        if lanes.assignment_changed.swap(false, Ordering::AcqRel)
            | shared.processed.take_rewind_signal()
        {
            let assigned: Vec<i32> = consumer
                .assignment()
                .map(|tpl| {
                    tpl.elements_for_topic(topic)
                        .iter()
                        .map(|e| e.partition())
                        .collect()
                })
                .unwrap_or_default();
            rewinding.retain(|p, _| assigned.contains(p));
            for (generation, p, offset) in shared.processed.rewinds_due(&assigned) {
                if rewinding.insert(p, (generation, offset)).is_none() {
                    lanes.stop(p);
                }
            }
        }
        let moved = if rewinding.is_empty() {
            Vec::new()
        } else {
            move_back(&shared, &mut rewinding, &rt)
        };
        let m = match polled {
            None => continue,
            Some(Err(e)) => {
                let e = e.to_string();
                if e != last_error {
                    tracing::warn!(topic = %topic, error = %e, "fetch failed; retrying");
                    last_error = e;
                }
                continue;
            }
            Some(Ok(m)) => m,
        };
        if rewinding.contains_key(&m.partition()) || moved.contains(&m.partition()) {
            // Fetched before the seek: read again from the marker's offset.
            continue;
        }
        let record = Arc::new(Record::of(&m));
        let partition = record.partition;
        let mut by_partition = lanes.by_partition.lock().unwrap_or_else(|e| e.into_inner());
        let lane = by_partition.entry(partition).or_insert_with(|| {
            let (tx, rx) = mpsc::unbounded_channel();
            let state = Arc::new(LaneState::default());
            spawn_lane(rx, state.clone());
            Lane { tx, state }
        });
        let mut waiting = lane.state.waiting.lock().unwrap_or_else(|e| e.into_inner());
        waiting.0 += 1;
        if waiting.0 >= LANE_BUFFER && !waiting.1 {
            waiting.1 = consumer.pause(&one_partition(topic, partition)).is_ok();
        }
        drop(waiting);
        let _ = lane.tx.send(record);
    }
}

/// Seeks each partition of `rewinding` to its offset and commits it; those moved leave
/// `rewinding`, get their applied record and are returned. One that cannot be sought yet (just
/// assigned, not fetching) stays for the next round.
fn move_back(
    shared: &Arc<Shared>,
    rewinding: &mut HashMap<i32, (u64, i64)>,
    rt: &tokio::runtime::Handle,
) -> Vec<i32> {
    let (consumer, topic) = (&shared.consumer, &shared.topic);
    let mut moved = Vec::new();
    rewinding.retain(|&p, &mut (generation, offset)| {
        let to = Offset::Offset(offset);
        let r = consumer
            .seek(topic, p, to, Duration::from_millis(500))
            .and_then(|()| {
                let mut tpl = TopicPartitionList::new();
                tpl.add_partition_offset(topic, p, to)?;
                consumer.store_offsets(&tpl)?;
                consumer.commit(&tpl, CommitMode::Sync)
            });
        match r {
            Ok(()) => {
                let _ = consumer.resume(&one_partition(topic, p));
                tracing::info!(topic = %topic, partition = p, offset, generation, "partition moved back (rewind)");
                let shared = shared.clone();
                rt.spawn(async move {
                    if let Err(e) = shared.processed.mark_applied(generation, p).await {
                        tracing::warn!(partition = p, error = %e, "cannot record the rewind as applied");
                    }
                });
                moved.push(p);
                false
            }
            Err(e) => {
                tracing::debug!(partition = p, error = %e, "cannot move the partition back yet");
                true
            }
        }
    });
    moved
}

/// One partition's lane: its records one at a time, in offset order; a nak waits its delay and
/// delivers the same record again.
async fn lane<H: Handler>(
    shared: Arc<Shared>,
    side: Arc<KafkaSide>,
    slots: Arc<Slots>,
    handler: Arc<H>,
    mut stop: watch::Receiver<bool>,
    mut rx: mpsc::UnboundedReceiver<Arc<Record>>,
    state: Arc<LaneState>,
) {
    'records: loop {
        let record = tokio::select! {
            r = rx.recv() => match r { Some(r) => r, None => break },
            _ = stopped(&mut stop) => break,
        };
        {
            let mut waiting = state.waiting.lock().unwrap_or_else(|e| e.into_inner());
            waiting.0 = waiting.0.saturating_sub(1);
            if waiting.1 && waiting.0 <= LANE_BUFFER / 2 {
                let tpl = one_partition(&shared.topic, record.partition);
                waiting.1 = shared.consumer.resume(&tpl).is_err();
            }
        }
        let mut delivered = 1;
        loop {
            if state.revoked.load(Ordering::Acquire) {
                break 'records;
            }
            let Some(permit) = slots.one(&mut stop).await else {
                break 'records;
            };
            let outcome = Arc::new(Mutex::new(None));
            let msg = KafkaMsg {
                record: record.clone(),
                lane: state.clone(),
                delivered,
                shared: shared.clone(),
                outcome: outcome.clone(),
            };
            handler.deliver(side.as_ref(), msg).await;
            drop(permit);
            let how = outcome.lock().unwrap_or_else(|e| e.into_inner()).take();
            let wait = match how {
                Some(Settle::Ack | Settle::Term) => continue 'records,
                Some(Settle::Nak(d)) => d.unwrap_or_default(),
                None => RETRY_LATER,
            };
            if *stop.borrow() {
                // Handed back at shutdown: the next owner delivers it (its offset not stored).
                break 'records;
            }
            delivered += 1;
            tokio::select! {
                _ = stopped(&mut stop) => break 'records,
                _ = tokio::time::sleep(wait) => {}
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A producer that librdkafka has declared fatally failed (here through its test hook, as a
    /// broker fencing it does) is made again: the send that meets the fatal state fails, the
    /// next one is delivered by a new instance. Against a real Tansu; skipped without it.
    #[tokio::test]
    #[allow(unsafe_code)]
    async fn a_producer_that_failed_fatally_is_made_again() {
        let Some(bin) = crate::local::tansu() else {
            eprintln!("SKIP: tansu not found");
            return;
        };
        let port = crate::local::free_port(crate::local::PortSpan::Tests).expect("a free port");
        struct Killed(std::process::Child);
        impl Drop for Killed {
            fn drop(&mut self) {
                let _ = self.0.kill();
                let _ = self.0.wait();
            }
        }
        let _broker = Killed(
            crate::local::kafka_command(&bin, port)
                .stdout(std::process::Stdio::null())
                .stderr(std::process::Stdio::null())
                .spawn()
                .expect("start tansu"),
        );
        let deadline = std::time::Instant::now() + Duration::from_secs(20);
        while !crate::local::listening(port, Duration::from_millis(200)) {
            assert!(std::time::Instant::now() < deadline, "tansu did not listen");
            std::thread::sleep(Duration::from_millis(100));
        }
        let conn =
            KafkaConn::open(&format!("kafka://127.0.0.1:{port}"), None, "fatal", |_| {}).unwrap();
        let topic = "weir_fatal_test";
        super::super::processed::ensure_topic(&conn.base, topic, 1, &[])
            .await
            .unwrap();
        let send = |p: SidecarProducer| async move {
            p.send(
                FutureRecord::<str, [u8]>::to(topic).payload(&b"x"[..]),
                Timeout::After(Duration::from_secs(10)),
            )
            .await
        };
        send(conn.producer.clone()).await.expect("delivered before");
        let first = conn.producer.current().client().native_ptr();
        // SAFETY: the handle is live (held by `conn.producer`); librdkafka's test hook only
        // raises the fatal error on it.
        unsafe {
            rdkafka::bindings::rd_kafka_test_fatal_error(
                first,
                rdkafka::bindings::rd_kafka_resp_err_t::RD_KAFKA_RESP_ERR_PRODUCER_FENCED,
                c"fenced by the test".as_ptr(),
            );
        }
        let (e, _) = send(conn.producer.clone())
            .await
            .expect_err("a fatally failed producer sends nothing");
        assert!(e.to_string().to_lowercase().contains("fatal"), "{e}");
        assert_ne!(
            conn.producer.current().client().native_ptr(),
            first,
            "a new instance"
        );
        send(conn.producer.clone())
            .await
            .expect("delivered by the new instance");
        conn.close().await;
    }

    #[test]
    fn a_fenced_or_fatally_failed_producer_is_replaced_other_failures_keep_it() {
        let fenced = KafkaError::MessageProduction(RDKafkaErrorCode::ProducerFenced);
        assert_eq!(
            needs_new_instance(&fenced, || None).map(|(c, _)| c),
            Some(RDKafkaErrorCode::ProducerFenced)
        );
        let epoch = KafkaError::MessageProduction(RDKafkaErrorCode::InvalidProducerEpoch);
        assert!(needs_new_instance(&epoch, || None).is_some());
        let late = KafkaError::MessageProduction(RDKafkaErrorCode::MessageTimedOut);
        assert!(needs_new_instance(&late, || None).is_none());
        let fatal = needs_new_instance(&late, || {
            Some((RDKafkaErrorCode::Fatal, "fatal".to_string()))
        });
        assert_eq!(fatal.map(|(c, _)| c), Some(RDKafkaErrorCode::Fatal));
    }

    #[test]
    fn urls_and_secrets_become_settings() {
        let c = base_config("kafka://127.0.0.1:9092", None).unwrap();
        assert_eq!(c.get("bootstrap.servers"), Some("127.0.0.1:9092"));
        let e = base_config("nats://a:4222", None).unwrap_err().to_string();
        assert!(
            e.starts_with("messaging.brokerUrl: ") && e.contains("not a Kafka URL"),
            "{e}"
        );
    }

    #[test]
    fn missing_topics_are_unroutable_and_timeouts_are_timeouts() {
        let missing = KafkaError::MessageProduction(RDKafkaErrorCode::UnknownTopicOrPartition);
        assert!(
            matches!(produce_error("t", missing), Error::Unroutable(m) if m.contains("no topic t"))
        );
        let late = KafkaError::MessageProduction(RDKafkaErrorCode::MessageTimedOut);
        assert!(matches!(produce_error("t", late), Error::Timeout(_)));
        let other = KafkaError::MessageProduction(RDKafkaErrorCode::MessageSizeTooLarge);
        assert!(
            matches!(produce_error("t", other), Error::Broker { code: Some(c), .. } if c == "MessageSizeTooLarge")
        );
    }
}
