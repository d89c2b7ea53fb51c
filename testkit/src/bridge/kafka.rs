//! What the conformance suite does on Kafka directly: declares the topics as the operator
//! would (rdkafka's admin client), produces records as another producer would, reads topics
//! back whole and a group's committed offsets.
//!
//! Reading a topic "to its end" does not trust the broker's high watermark (Tansu's can be
//! wrong): [`read_all`] reads every partition from its start until nothing more arrives for a
//! moment.

use super::Stored;
use crate::brokers::KafkaServer;
use bytes::Bytes;
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord, Producer};
use rdkafka::types::RDKafkaErrorCode;
use rdkafka::{ClientConfig, Message, Offset, TopicPartitionList};
use std::collections::BTreeMap;
use std::time::Duration;
use weir_broker::credentials::Credentials;
use weir_broker::kafka::Bootstrap;

/// Partitions of the suite's queue topic: more than one, so that deliveries run side by side.
pub const QUEUE_PARTITIONS: i32 = 4;
/// How long [`read_all`] waits for more before it takes a topic as read.
pub const QUIET: Duration = Duration::from_millis(300);
/// How long [`read_all`] waits for a topic's first record (joining, finding the start).
pub const FIRST: Duration = Duration::from_millis(1500);
/// How long [`read_all`] waits for more while a partition has not reached the end it had when
/// the read began.
const SHORT_OF_THE_END: Duration = Duration::from_secs(5);

/// The librdkafka settings of the server's `kafka://` URL.
pub fn config(k: &KafkaServer) -> ClientConfig {
    let mut c = Bootstrap::parse(&k.url())
        .expect("the kit's URL is a Kafka URL")
        .client_config(&Credentials::default())
        .expect("no credentials");
    c.set("log_level", "3");
    c
}

/// Creates each `(topic, partitions)` that is absent.
pub async fn create_topics(k: &KafkaServer, topics: &[(&str, i32)]) {
    create_topics_with(config(k), topics).await
}

/// [`create_topics`] on the broker at `url` (`kafka+ssl://…` too), trusting the CA in
/// `credentials_dir` (a Broker Secret's directory: `ca.crt`).
pub async fn create_topics_at(
    url: &str,
    credentials_dir: &std::path::Path,
    topics: &[(&str, i32)],
) {
    let creds = Credentials::from_dir(credentials_dir).expect("credentials");
    let c = Bootstrap::parse(url)
        .expect("a Kafka URL")
        .client_config(&creds)
        .expect("credentials");
    create_topics_with(c, topics).await
}

async fn create_topics_with(c: ClientConfig, topics: &[(&str, i32)]) {
    let admin: AdminClient<DefaultClientContext> = c.create().expect("admin client");
    let new: Vec<NewTopic> = topics
        .iter()
        .map(|(t, p)| NewTopic::new(t, *p, TopicReplication::Fixed(1)))
        .collect();
    let r = admin
        .create_topics(
            &new,
            &AdminOptions::new().operation_timeout(Some(Duration::from_secs(5))),
        )
        .await
        .expect("create_topics");
    for t in r {
        match t {
            Ok(_) | Err((_, RDKafkaErrorCode::TopicAlreadyExists)) => {}
            Err((t, e)) => panic!("create topic {t}: {e}"),
        }
    }
}

/// Deletes `topics` and `groups` where they exist (a broker the suite did not start keeps
/// them between tests).
pub async fn delete(k: &KafkaServer, topics: &[&str], groups: &[&str]) {
    let admin: AdminClient<DefaultClientContext> = config(k).create().expect("admin client");
    let opts = AdminOptions::new().operation_timeout(Some(Duration::from_secs(5)));
    let _ = admin.delete_topics(topics, &opts).await;
    let _ = admin.delete_groups(groups, &opts).await;
    tokio::time::sleep(Duration::from_secs(1)).await;
}

/// An idempotent producer with `acks=all`, as a sidecar publishes.
pub fn producer(k: &KafkaServer) -> FutureProducer {
    config(k)
        .set("enable.idempotence", "true")
        .set("acks", "all")
        .set("linger.ms", "1")
        .create()
        .expect("producer")
}

/// Fetches `topic`'s metadata through `p`: its broker connection open (on which an idempotent
/// producer gets its producer id) before the first record, as a ready sidecar's producer is.
pub async fn connect(p: &FutureProducer, topic: &str) {
    let p = p.clone();
    let t = topic.to_string();
    tokio::task::spawn_blocking(move || {
        p.client()
            .fetch_metadata(Some(&t), Duration::from_secs(10))
            .map(drop)
    })
    .await
    .expect("metadata task")
    .unwrap_or_else(|e| panic!("metadata of {topic}: {e}"));
}

/// A record carrying exactly `headers` (no key) to `topic`, acknowledged.
pub async fn produce(p: &FutureProducer, topic: &str, headers: &[(&str, &str)], body: &[u8]) {
    let mut h = OwnedHeaders::new();
    for (k, v) in headers {
        h = h.insert(Header {
            key: k,
            value: Some(v.as_bytes()),
        });
    }
    p.send(
        FutureRecord::<(), [u8]>::to(topic).payload(body).headers(h),
        Duration::from_secs(5),
    )
    .await
    .unwrap_or_else(|(e, _)| panic!("produce to {topic}: {e}"));
}

fn partitions(c: &BaseConsumer, topic: &str) -> Vec<i32> {
    match c.fetch_metadata(Some(topic), Duration::from_secs(5)) {
        Ok(md) => md
            .topics()
            .iter()
            .filter(|t| t.name() == topic && t.error().is_none())
            .flat_map(|t| t.partitions().iter().map(|p| p.id()))
            .collect(),
        Err(_) => Vec::new(),
    }
}

/// Every record of `topic` (none when it does not exist), by partition and offset; `position`
/// is `<partition>:<offset>`, as a sidecar names it.
pub async fn read_all(k: &KafkaServer, topic: &str) -> Vec<Stored> {
    read_all_quiet_for(k, topic, QUIET).await
}

/// How long a reader of `k` waits for the next record before it takes a partition as read:
/// longer on the durable storage, which fetches from its S3 endpoint in long gaps.
pub fn quiet(k: &KafkaServer) -> Duration {
    if k.keeps_log_across_restart() {
        Duration::from_secs(3)
    } else {
        QUIET
    }
}

/// [`read_all`], done once no record came for `quiet` (a slow storage fetches in long gaps).
pub async fn read_all_quiet_for(k: &KafkaServer, topic: &str, quiet: Duration) -> Vec<Stored> {
    read_keyed(k, topic, quiet)
        .await
        .into_iter()
        .map(|(_, s)| s)
        .collect()
}

/// The keys of the records of `topic` (`""` for a record without one).
pub async fn keys(k: &KafkaServer, topic: &str) -> Vec<String> {
    read_keyed(k, topic, QUIET)
        .await
        .into_iter()
        .map(|(k, _)| k)
        .collect()
}

async fn read_keyed(k: &KafkaServer, topic: &str, quiet: Duration) -> Vec<(String, Stored)> {
    // (librdkafka assigns only with a group id; this reader never joins nor commits.)
    let c: BaseConsumer = config(k)
        .set("group.id", "weir-testkit-reader")
        .set("enable.auto.commit", "false")
        .create()
        .expect("consumer");
    let topic = topic.to_string();
    tokio::task::spawn_blocking(move || {
        let parts = partitions(&c, &topic);
        if parts.is_empty() {
            return Vec::new();
        }
        let mut tpl = TopicPartitionList::new();
        for p in &parts {
            tpl.add_partition_offset(&topic, *p, Offset::Beginning)
                .unwrap();
        }
        c.assign(&tpl).expect("assign");
        // Each partition's end as of now. A quiet spell ends the read, as it did, but while a
        // partition has not reached its end the spell must be longer: waiting 300 ms alone
        // missed a record under load (a fetch of one of four partitions came later).
        let ends: Option<BTreeMap<i32, i64>> = parts
            .iter()
            .map(|&p| {
                c.fetch_watermarks(&topic, p, Duration::from_secs(5))
                    .ok()
                    .map(|(_, high)| (p, high))
            })
            .collect();
        let mut next: BTreeMap<i32, i64> = BTreeMap::new();
        let reached = |next: &BTreeMap<i32, i64>| {
            ends.as_ref().is_none_or(|ends| {
                ends.iter()
                    .all(|(p, high)| next.get(p).copied().unwrap_or(0) >= *high)
            })
        };
        let mut out = Vec::new();
        let mut quiet_since = std::time::Instant::now();
        let mut wait = FIRST;
        loop {
            let limit = if reached(&next) {
                wait
            } else {
                wait.max(SHORT_OF_THE_END)
            };
            if quiet_since.elapsed() >= limit {
                break;
            }
            if let Some(Ok(m)) = c.poll(Duration::from_millis(50)) {
                {
                    quiet_since = std::time::Instant::now();
                    wait = quiet;
                    next.insert(m.partition(), m.offset() + 1);
                    let headers: BTreeMap<_, _> = weir_broker::kafka::headers_of(&m)
                        .into_iter()
                        .map(|(k, v)| (k.to_ascii_lowercase(), v))
                        .collect();
                    let key = String::from_utf8_lossy(m.key().unwrap_or_default()).into_owned();
                    out.push((
                        (m.partition(), m.offset()),
                        key,
                        Stored {
                            payload: Bytes::copy_from_slice(m.payload().unwrap_or_default()),
                            headers,
                            position: format!("{}:{}", m.partition(), m.offset()),
                        },
                    ));
                }
            }
        }
        out.sort_by_key(|(at, _, _)| *at);
        out.into_iter().map(|(_, k, s)| (k, s)).collect()
    })
    .await
    .unwrap()
}

/// Records of `topic` not yet committed by `group` (the group's committed offset against the
/// offset after each partition's last record).
pub async fn uncommitted(k: &KafkaServer, topic: &str, group: &str) -> u64 {
    let mut end: BTreeMap<i32, i64> = BTreeMap::new();
    for s in read_all(k, topic).await {
        let (p, o) = s.position.split_once(':').unwrap();
        let (p, o): (i32, i64) = (p.parse().unwrap(), o.parse().unwrap());
        let e = end.entry(p).or_default();
        *e = (*e).max(o + 1);
    }
    if end.is_empty() {
        return 0;
    }
    let c: BaseConsumer = config(k)
        .set("group.id", group)
        .set("enable.auto.commit", "false")
        .create()
        .expect("consumer");
    let topic = topic.to_string();
    tokio::task::spawn_blocking(move || {
        let mut tpl = TopicPartitionList::new();
        for p in end.keys() {
            tpl.add_partition(&topic, *p);
        }
        let committed = c
            .committed_offsets(tpl, Duration::from_secs(5))
            .expect("committed offsets");
        end.iter()
            .map(|(p, e)| {
                let at = committed
                    .find_partition(&topic, *p)
                    .and_then(|e| match e.offset() {
                        Offset::Offset(o) => Some(o),
                        _ => None,
                    })
                    .unwrap_or(0);
                (*e - at).max(0) as u64
            })
            .sum()
    })
    .await
    .unwrap()
}
