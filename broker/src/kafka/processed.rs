//! The processed-event store of Kafka consumers: the topic `weir_processed_<ns>_<q>`
//! (`cleanup.policy=compact,delete`, `retention.ms` = the dedup TTL), one record per processed
//! event, keyed by [`crate::queue::processed_key`] (`<consumer>.<sha256(event id)>`).
//!
//! Each consuming sidecar follows the whole topic from its start into memory (keeping only its
//! own Microservice's keys, each until its record's timestamp + TTL) and keeps following it.
//! Before the sidecar takes its first delivery it writes a marker to every partition of the
//! topic and waits to read each back, so it knows every record older than its start (no
//! high-watermark is trusted: some Kafka-protocol brokers report a wrong one). A record is kept
//! in memory at once and written with the producer's `acks=all` before the delivery is
//! acknowledged. Records of another replica of the same Microservice arrive within the topic's
//! delivery latency (milliseconds), the same window as on the other brokers.
//!
//! The operator declares the topic with the Queue; without it (`weir up`, tests) the sidecar
//! creates it when absent, with one partition.

use crate::kafka::transport::{admin_error, produce_error};
use crate::transport::{API_TIMEOUT, Error};
use rdkafka::ClientConfig;
use rdkafka::Message;
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::types::RDKafkaErrorCode;
use rdkafka::util::Timeout;
use rdkafka::{Offset, TopicPartitionList};
use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// Longest wait for the markers written at start to be read back.
pub const CATCH_UP_TIMEOUT: Duration = Duration::from_secs(30);
/// Key prefix of the markers a sidecar writes at start (never a processed key: those start
/// with a Microservice's name and a `.`, and a name is a DNS label).
pub const MARKER_PREFIX: &str = "weir-marker:";

/// The topic settings of the processed-event topic for a dedup TTL.
pub fn topic_config(ttl: Duration) -> Vec<(&'static str, String)> {
    vec![
        ("cleanup.policy", "compact,delete".into()),
        ("retention.ms", ttl.as_millis().to_string()),
    ]
}

/// Creates `topic` with `partitions` and `config` unless it exists.
pub async fn ensure_topic(
    base: &ClientConfig,
    topic: &str,
    partitions: i32,
    config: &[(&'static str, String)],
) -> Result<(), Error> {
    let admin: AdminClient<DefaultClientContext> = base
        .create()
        .map_err(|e| Error::Config(format!("cannot create a Kafka admin client: {e}")))?;
    let mut t = NewTopic::new(topic, partitions, TopicReplication::Fixed(-1));
    for (k, v) in config {
        t = t.set(k, v);
    }
    let r = admin
        .create_topics(
            &[t],
            &AdminOptions::new().operation_timeout(Some(API_TIMEOUT)),
        )
        .await
        .map_err(|e| admin_error(topic, e))?;
    for t in r {
        match t {
            Ok(_) => tracing::info!(topic, "topic created (was absent)"),
            Err((_, RDKafkaErrorCode::TopicAlreadyExists)) => {}
            Err((t, code)) => {
                return Err(Error::Broker {
                    code: Some(format!("{code:?}")),
                    message: format!("cannot create topic {t}: {code}"),
                });
            }
        }
    }
    Ok(())
}

/// The partitions of `topic`; an error when the broker does not know it.
pub fn partitions_of<C: Consumer<X>, X: rdkafka::consumer::ConsumerContext>(
    client: &C,
    topic: &str,
) -> Result<Vec<i32>, Error> {
    let md = client
        .fetch_metadata(Some(topic), API_TIMEOUT)
        .map_err(|e| Error::broker(format!("metadata of topic {topic}: {e}")))?;
    let t = md
        .topics()
        .iter()
        .find(|t| t.name() == topic)
        .ok_or_else(|| Error::Unroutable(format!("no topic {topic} on the broker")))?;
    if let Some(e) = t.error() {
        return Err(Error::Unroutable(format!(
            "topic {topic}: {}",
            RDKafkaErrorCode::from(e)
        )));
    }
    let parts: Vec<i32> = t.partitions().iter().map(|p| p.id()).collect();
    if parts.is_empty() {
        return Err(Error::Unroutable(format!(
            "topic {topic} has no partitions"
        )));
    }
    Ok(parts)
}

/// What the follower has read: this consumer's keys with their expiry (Unix ms), and the
/// markers seen.
#[derive(Default)]
struct Seen {
    keys: HashMap<String, i64>,
    markers: HashSet<String>,
}

/// One consumer's view of the processed-event topic.
pub struct ProcessedStore {
    topic: String,
    ttl: Duration,
    seen: Arc<Mutex<Seen>>,
    producer: FutureProducer,
    quit: Arc<AtomicBool>,
}

impl Drop for ProcessedStore {
    fn drop(&mut self) {
        self.quit.store(true, Ordering::Release);
    }
}

fn now_ms() -> i64 {
    chrono::Utc::now().timestamp_millis()
}

impl ProcessedStore {
    /// Creates the topic when absent, follows it from its start and returns once every record
    /// older than this call is known.
    pub async fn open(
        base: &ClientConfig,
        producer: FutureProducer,
        topic: &str,
        consumer: &str,
        ttl: Duration,
    ) -> Result<ProcessedStore, Error> {
        ensure_topic(base, topic, 1, &topic_config(ttl)).await?;
        // librdkafka assigns partitions only with a group id; this reader never joins the group
        // (no subscribe) and never commits.
        let follower: BaseConsumer = base
            .clone()
            .set("group.id", format!("{topic}.{consumer}.reader"))
            .set("enable.auto.commit", "false")
            .set("auto.offset.reset", "earliest")
            .create()
            .map_err(|e| Error::Config(format!("cannot create a Kafka consumer: {e}")))?;
        let t = topic.to_string();
        let (follower, parts) = tokio::task::spawn_blocking(move || {
            let parts = partitions_of(&follower, &t)?;
            let mut tpl = TopicPartitionList::new();
            for p in &parts {
                tpl.add_partition_offset(&t, *p, Offset::Beginning)
                    .map_err(|e| Error::broker(e.to_string()))?;
            }
            follower
                .assign(&tpl)
                .map_err(|e| Error::broker(format!("cannot read topic {t}: {e}")))?;
            Ok::<_, Error>((follower, parts))
        })
        .await
        .map_err(|e| Error::broker(e.to_string()))??;
        let store = ProcessedStore {
            topic: topic.to_string(),
            ttl,
            seen: Arc::default(),
            producer,
            quit: Arc::default(),
        };
        let (seen, quit, prefix, ttl_ms) = (
            store.seen.clone(),
            store.quit.clone(),
            format!("{consumer}."),
            ttl.as_millis() as i64,
        );
        std::thread::Builder::new()
            .name(format!("weir-processed-{consumer}"))
            .spawn(move || follow(follower, seen, quit, prefix, ttl_ms))
            .map_err(|e| Error::broker(format!("cannot start the processed-event reader: {e}")))?;
        // Markers, one per partition, read back: everything before them is known.
        let marker = format!("{MARKER_PREFIX}{}", uuid::Uuid::new_v4());
        for p in &parts {
            let key = format!("{marker}:{p}");
            store
                .producer
                .send(
                    FutureRecord::<str, [u8]>::to(topic)
                        .partition(*p)
                        .key(&key)
                        .payload(&[][..]),
                    Timeout::After(API_TIMEOUT),
                )
                .await
                .map_err(|(e, _)| produce_error(topic, e))?;
        }
        let deadline = tokio::time::Instant::now() + CATCH_UP_TIMEOUT;
        loop {
            let caught_up = {
                let s = store.seen.lock().unwrap_or_else(|e| e.into_inner());
                parts
                    .iter()
                    .all(|p| s.markers.contains(&format!("{marker}:{p}")))
            };
            if caught_up {
                break;
            }
            if tokio::time::Instant::now() > deadline {
                return Err(Error::Timeout(format!(
                    "the processed-event topic {topic} was not read back in {} s",
                    CATCH_UP_TIMEOUT.as_secs()
                )));
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        store
            .seen
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .markers
            .clear();
        Ok(store)
    }

    /// Whether `key` was recorded within the TTL.
    pub fn contains(&self, key: &str) -> bool {
        let s = self.seen.lock().unwrap_or_else(|e| e.into_inner());
        s.keys.get(key).is_some_and(|&until| until > now_ms())
    }

    /// Keeps `key` in memory and writes its record (`acks=all`).
    pub async fn record(&self, key: &str, value: &str) -> Result<(), Error> {
        self.seen
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .keys
            .insert(key.to_string(), now_ms() + self.ttl.as_millis() as i64);
        self.producer
            .send(
                FutureRecord::to(&self.topic).key(key).payload(value),
                Timeout::After(API_TIMEOUT),
            )
            .await
            .map(|_| ())
            .map_err(|(e, _)| produce_error(&self.topic, e))
    }
}

/// Reads the topic until `quit`: this consumer's keys, until their record's time + TTL, and
/// markers; forgets expired keys every minute.
fn follow(
    c: BaseConsumer,
    seen: Arc<Mutex<Seen>>,
    quit: Arc<AtomicBool>,
    prefix: String,
    ttl_ms: i64,
) {
    let mut last_purge = std::time::Instant::now();
    let mut last_error = String::new();
    while !quit.load(Ordering::Acquire) {
        match c.poll(Duration::from_millis(100)) {
            None => {}
            Some(Err(e)) => {
                let e = e.to_string();
                if e != last_error {
                    tracing::warn!(error = %e, "reading the processed-event topic");
                    last_error = e;
                }
            }
            Some(Ok(m)) => {
                let Some(key) = m.key().map(String::from_utf8_lossy) else {
                    continue;
                };
                let mut s = seen.lock().unwrap_or_else(|e| e.into_inner());
                if key.starts_with(MARKER_PREFIX) {
                    s.markers.insert(key.into_owned());
                } else if key.starts_with(&prefix) {
                    let at = m.timestamp().to_millis().unwrap_or_else(now_ms);
                    let until = at + ttl_ms;
                    let e = s.keys.entry(key.into_owned()).or_insert(until);
                    *e = (*e).max(until);
                }
            }
        }
        if last_purge.elapsed() > Duration::from_secs(60) {
            last_purge = std::time::Instant::now();
            let now = now_ms();
            seen.lock()
                .unwrap_or_else(|e| e.into_inner())
                .keys
                .retain(|_, until| *until > now);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_topic_is_compacted_and_kept_for_the_ttl() {
        let c = topic_config(Duration::from_secs(600));
        assert!(c.contains(&("cleanup.policy", "compact,delete".into())));
        assert!(c.contains(&("retention.ms", "600000".into())));
        assert!(!crate::queue::processed_key("billing", "e").starts_with(MARKER_PREFIX));
    }
}
