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
//! The rewind marker of the consumer and the records saying which partitions moved for it are
//! in the topic too ([`super::rewind`]): a record read before the newest marker does not count
//! for an event at or after the marker's offset of its partition.
//!
//! The operator declares the topic with the Queue; without it (`weir up`, tests) the sidecar
//! creates it when absent, with one partition.

use crate::kafka::quiet::Quiet;
use crate::kafka::rewind::{KafkaMarker, applied_key, parse_applied_key};
use crate::kafka::transport::{SidecarProducer, admin_error, produce_error};
use crate::queue::rewind_marker_key;
use crate::rewind::Marker;
use crate::transport::{API_TIMEOUT, Error};
use rdkafka::ClientConfig;
use rdkafka::Message;
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::producer::FutureRecord;
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

/// A processed event: until when it counts (Unix ms), and the number of rewind markers read
/// when its record was (a record read before the newest marker has a smaller one).
struct Kept {
    until: i64,
    epoch: u64,
}

/// What the follower has read: this consumer's keys, the start markers seen, and the newest
/// rewind marker with the partitions moved for it.
#[derive(Default)]
struct Seen {
    keys: HashMap<String, Kept>,
    markers: HashSet<String>,
    rewind: Option<KafkaMarker>,
    /// Rewind markers read so far.
    epoch: u64,
    /// (generation, partition) of every applied record read or written.
    applied: HashSet<(u64, i32)>,
}

impl Seen {
    /// Takes a record read from the topic, in the topic's order; `true` when it is a rewind
    /// marker newer than the one held (the fetcher then looks for partitions to move).
    fn read(
        &mut self,
        consumer: &str,
        key: &str,
        value: &[u8],
        until: impl FnOnce() -> i64,
    ) -> bool {
        if key.starts_with(MARKER_PREFIX) {
            self.markers.insert(key.to_string());
        } else if key == rewind_marker_key(consumer) {
            let Some(m) = Marker::parse(value).as_ref().and_then(KafkaMarker::of) else {
                tracing::warn!(key, "not a Kafka rewind marker; ignored");
                return false;
            };
            if self
                .rewind
                .as_ref()
                .is_none_or(|old| m.generation > old.generation)
            {
                tracing::info!(generation = m.generation, offsets = ?m.offsets, "rewind marker read");
                self.rewind = Some(m);
                self.epoch += 1;
                return true;
            }
        } else if let Some(applied) = parse_applied_key(consumer, key) {
            self.applied.insert(applied);
        } else if key
            .strip_prefix(consumer)
            .is_some_and(|rest| rest.starts_with('.'))
        {
            let until = until();
            let epoch = self.epoch;
            let k = self
                .keys
                .entry(key.to_string())
                .or_insert(Kept { until, epoch });
            k.until = k.until.max(until);
            k.epoch = epoch;
        }
        false
    }

    /// Whether `key` counts for the event at `position`.
    fn counts(&self, key: &str, position: &str, now: i64) -> bool {
        self.keys.get(key).is_some_and(|k| {
            k.until > now
                && (k.epoch == self.epoch
                    || !self.rewind.as_ref().is_some_and(|m| m.covers(position)))
        })
    }
}

/// One consumer's view of the processed-event topic.
pub struct ProcessedStore {
    topic: String,
    consumer: String,
    ttl: Duration,
    seen: Arc<Mutex<Seen>>,
    producer: SidecarProducer,
    quit: Arc<AtomicBool>,
    /// A new rewind marker was read since [`ProcessedStore::take_rewind_signal`] (an atomic: the
    /// fetcher looks at it after every poll).
    rewind_signal: Arc<AtomicBool>,
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
        quiet: Quiet,
        producer: SidecarProducer,
        topic: &str,
        consumer: &str,
        ttl: Duration,
    ) -> Result<ProcessedStore, Error> {
        ensure_topic(base, topic, 1, &topic_config(ttl)).await?;
        // librdkafka assigns partitions only with a group id; this reader never joins the group
        // (no subscribe) and never commits.
        let follower: BaseConsumer<Quiet> = base
            .clone()
            .set("group.id", format!("{topic}.{consumer}.reader"))
            .set("enable.auto.commit", "false")
            .set("auto.offset.reset", "earliest")
            .create_with_context(quiet)
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
            consumer: consumer.to_string(),
            ttl,
            seen: Arc::default(),
            producer,
            quit: Arc::default(),
            rewind_signal: Arc::default(),
        };
        let (seen, quit, signal, name, ttl_ms) = (
            store.seen.clone(),
            store.quit.clone(),
            store.rewind_signal.clone(),
            consumer.to_string(),
            ttl.as_millis() as i64,
        );
        std::thread::Builder::new()
            .name(format!("weir-processed-{consumer}"))
            .spawn(move || follow(follower, seen, quit, signal, name, ttl_ms))
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

    /// Whether `key` was recorded within the TTL and counts for the event at `position`
    /// (`<partition>:<offset>`): not when the record was read before a rewind marker that
    /// delivers `position` again.
    pub fn contains(&self, key: &str, position: &str) -> bool {
        let s = self.seen.lock().unwrap_or_else(|e| e.into_inner());
        s.counts(key, position, now_ms())
    }

    /// Keeps `key` in memory and writes its record (`acks=all`).
    pub async fn record(&self, key: &str, value: &str) -> Result<(), Error> {
        {
            let mut s = self.seen.lock().unwrap_or_else(|e| e.into_inner());
            let epoch = s.epoch;
            s.keys.insert(
                key.to_string(),
                Kept {
                    until: now_ms() + self.ttl.as_millis() as i64,
                    epoch,
                },
            );
        }
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

impl ProcessedStore {
    /// Whether a new rewind marker was read since the last call (and clears it).
    pub fn take_rewind_signal(&self) -> bool {
        self.rewind_signal.swap(false, Ordering::AcqRel)
    }

    /// The partitions among `assigned` that the newest rewind marker moves and that no applied
    /// record says were moved: (generation, partition, offset) each.
    pub fn rewinds_due(&self, assigned: &[i32]) -> Vec<(u64, i32, i64)> {
        let s = self.seen.lock().unwrap_or_else(|e| e.into_inner());
        let Some(m) = &s.rewind else {
            return Vec::new();
        };
        assigned
            .iter()
            .filter_map(|p| {
                let o = m.offsets.get(p)?;
                (!s.applied.contains(&(m.generation, *p))).then_some((m.generation, *p, *o))
            })
            .collect()
    }

    /// Notes that `partition` was moved for the marker of `generation`, here and in the topic.
    pub async fn mark_applied(&self, generation: u64, partition: i32) -> Result<(), Error> {
        self.seen
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .applied
            .insert((generation, partition));
        let key = applied_key(&self.consumer, generation, partition);
        self.producer
            .send(
                FutureRecord::<str, [u8]>::to(&self.topic)
                    .key(&key)
                    .payload(&[][..]),
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
    c: BaseConsumer<Quiet>,
    seen: Arc<Mutex<Seen>>,
    quit: Arc<AtomicBool>,
    rewind_signal: Arc<AtomicBool>,
    consumer: String,
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
                let until = || m.timestamp().to_millis().unwrap_or_else(now_ms) + ttl_ms;
                let newer_marker = seen.lock().unwrap_or_else(|e| e.into_inner()).read(
                    &consumer,
                    &key,
                    m.payload().unwrap_or_default(),
                    until,
                );
                if newer_marker {
                    rewind_signal.store(true, Ordering::Release);
                }
            }
        }
        if last_purge.elapsed() > Duration::from_secs(60) {
            last_purge = std::time::Instant::now();
            let now = now_ms();
            seen.lock()
                .unwrap_or_else(|e| e.into_inner())
                .keys
                .retain(|_, k| k.until > now);
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

    /// The topic's records in order: two processed events, a rewind marker from offset 49 of
    /// partition 0, one more record of the first event, then the applied record.
    #[test]
    fn a_record_read_before_the_rewind_marker_does_not_count_for_what_it_delivers_again() {
        let mut s = Seen::default();
        let (a, b) = (
            crate::queue::processed_key("billing", "ev-10"),
            crate::queue::processed_key("billing", "ev-60"),
        );
        let far = || i64::MAX / 2;
        s.read("billing", &a, b"0:10", far);
        s.read("billing", &b, b"0:60", far);
        let theirs = crate::queue::processed_key("shipping", "x");
        s.read("billing", &theirs, b"0:1", far);
        assert!(s.counts(&a, "0:10", 0) && s.counts(&b, "0:60", 0));
        let marker = Marker {
            generation: 5,
            from: "0:49".into(),
            to: "start".into(),
        };
        let newer = s.read(
            "billing",
            "billing.rewind",
            marker.to_json().as_bytes(),
            far,
        );
        assert!(newer && s.rewind.is_some());
        assert!(s.counts(&a, "0:10", 0), "before the point: still processed");
        assert!(!s.counts(&b, "0:60", 0), "delivered again past the dedup");
        assert!(
            s.counts(&b, "1:60", 0),
            "a partition the rewind did not move"
        );
        // The event processed again: its new record counts once more.
        s.read("billing", &b, b"0:60", far);
        assert!(s.counts(&b, "0:60", 0));
        // An older marker read later changes nothing.
        let old = Marker {
            generation: 4,
            ..marker.clone()
        };
        let newer = s.read("billing", "billing.rewind", old.to_json().as_bytes(), far);
        assert!(!newer && s.counts(&b, "0:60", 0));
        // Applied records: of this consumer only; expired keys never count.
        s.read(
            "billing",
            &crate::kafka::rewind::applied_key("billing", 5, 0),
            b"",
            far,
        );
        s.read(
            "billing",
            &crate::kafka::rewind::applied_key("shipping", 5, 1),
            b"",
            far,
        );
        assert_eq!(s.applied, HashSet::from([(5, 0)]));
        s.read("billing", "billing.x", b"", || 100);
        assert!(!s.counts("billing.x", "0:1", 100));
        assert!(
            !s.keys.contains_key(&theirs),
            "another Microservice's record"
        );
    }
}
