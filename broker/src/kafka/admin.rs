//! The operator's role on Kafka. For a Queue's [`Topology`] (stream name `<s>` =
//! `weir_<ns>_<q>`):
//!
//! - the topic `<s>` with `spec.partitions` partitions, replication factor `spec.replicas` and
//!   the configs [`topic_configs`] gives: `cleanup.policy=delete`, `retention.ms` from `maxAge`,
//!   `retention.bytes` from `maxBytes` (Kafka counts it per partition: the Queue's limit is
//!   split evenly);
//! - the dead-letter topic `<s>_dlq` (one partition, same replication factor, `retention.ms`
//!   from `deadLetter.maxAge`) when dead letters are enabled;
//! - the processed-event topic `weir_processed_<ns>_<q>` (one partition, compacted, kept for
//!   the duplicate window and at least 10 minutes: [`super::processed`]), which also carries
//!   rewind markers ([`super::rewind`]);
//! - one consumer group `<s>.<microservice>` per consuming Microservice. Groups come into being
//!   when the consuming sidecar joins (from the earliest offset kept), so declaring a consumer
//!   creates nothing; the groups of the Queue are those whose id starts with `<s>.`, and
//!   deleting one is `DeleteGroups`.
//!
//! Redeclaring grows partitions (`CreatePartitions`; a broker without it, such as Tansu, makes
//! that an error naming `spec.partitions`) but never shrinks them, and never changes the
//! replication factor (a partition reassignment, Kafka's operators' job): both are an
//! [`Error::Invalid`] naming `spec.partitions` or `spec.replicas`. A config the broker refuses to
//! alter (Tansu does not implement `AlterConfigs`) leaves the topic as it is and is reported by
//! [`Admin::refused_settings`], so the Queue's `SettingsApplied` condition says so while it
//! keeps working.
//!
//! Figures: messages are the sum over partitions of high − low watermark; a group's pending
//! count is, per partition, high watermark − committed offset (everything kept when the group
//! committed nothing there): [`partition_lag`].

use super::{Bootstrap, dead_letter_topic, group_id, topic};
use crate::admin::{Admin, CONNECT_TIMEOUT, Error, Figures, Kind, note};
use crate::credentials::Credentials;
use crate::topology::Topology;
use rdkafka::ClientConfig;
use rdkafka::Offset;
use rdkafka::TopicPartitionList;
use rdkafka::admin::{
    AdminClient, AdminOptions, AlterConfig, NewPartitions, NewTopic, ResourceSpecifier,
    TopicReplication,
};
use rdkafka::client::DefaultClientContext;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::producer::FutureProducer;
use rdkafka::types::RDKafkaErrorCode;
use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use weir_crds::broker::BrokerKind;
use weir_crds::queue::{QueueSpec, Retention, Storage};

/// How long one admin request may take before it is a [`Error::Broker`].
pub(crate) const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);

/// A connection to a Kafka cluster: an admin client (whose metadata, watermark and group list
/// calls block, so they run on the blocking pool), a producer for replays, and the client
/// configuration to open a group's consumer with (committed offsets) or read dead letters.
#[derive(Clone)]
pub struct KafkaAdmin {
    admin: Arc<AdminClient<DefaultClientContext>>,
    producer: FutureProducer,
    config: ClientConfig,
    /// Per topic: the settings the broker refused at its last declaration.
    refused: Arc<Mutex<BTreeMap<String, Vec<String>>>>,
}

fn broker(what: impl Into<String>, e: impl std::fmt::Display) -> Error {
    Error::broker(what, e)
}

/// The configs of a Queue's topic (`dead_letter`: of its dead-letter topic), each with the spec
/// field it comes from, in Kafka's names. `-1` is Kafka's "no limit".
pub fn topic_configs(t: &Topology, dead_letter: bool) -> Vec<(&'static str, String, &'static str)> {
    let ms = |d: Duration| {
        if d.is_zero() {
            "-1".to_string()
        } else {
            d.as_millis().to_string()
        }
    };
    if dead_letter {
        let age = t
            .dead_letter
            .as_ref()
            .map(|d| d.max_age)
            .unwrap_or_default();
        return vec![
            ("cleanup.policy", "delete".into(), "spec.retention"),
            ("retention.ms", ms(age), "spec.deadLetter.maxAge"),
        ];
    }
    let s = &t.stream;
    // Kafka's retention.bytes holds per partition: the Queue's limit is shared among them.
    let bytes = s
        .max_bytes
        .filter(|b| *b > 0)
        .map(|b| (b / s.partitions.max(1) as i64).max(1).to_string())
        .unwrap_or_else(|| "-1".into());
    vec![
        ("cleanup.policy", "delete".into(), "spec.retention"),
        ("retention.ms", ms(s.max_age), "spec.maxAge"),
        ("retention.bytes", bytes, "spec.maxBytes"),
    ]
}

/// Pending messages of one partition for a group: from its committed offset (or, when it
/// committed nothing there, from the first offset kept, `low`: a new group starts at the
/// earliest) to the high watermark. Offsets below `low` were removed by retention and are not
/// pending; a committed offset past `high` (a broker that under-reports it) counts none.
pub fn partition_lag(low: i64, high: i64, committed: Option<i64>) -> u64 {
    let from = committed.unwrap_or(low).max(low);
    u64::try_from(high - from).unwrap_or(0)
}

/// Messages on a topic: the sum over its partitions of high − low watermark.
pub fn messages_of(watermarks: &[(i64, i64)]) -> u64 {
    watermarks
        .iter()
        .map(|(low, high)| u64::try_from(high - low).unwrap_or(0))
        .sum()
}

/// What a topic has now.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Existing {
    partitions: usize,
    replication_factor: usize,
}

impl KafkaAdmin {
    /// Connects once: reads the URL ([`Bootstrap`]) and the Secret, and fetches the cluster's
    /// metadata, so an unreachable cluster is a [`Error::Connect`] now rather than later.
    pub async fn connect(url: &str, creds: &Credentials) -> Result<KafkaAdmin, Error> {
        let shown = weir_crds::redact::url(url);
        let bad = |message: String| Error::Connect {
            url: shown.clone(),
            message,
        };
        let bootstrap = Bootstrap::parse(url).map_err(|e| bad(e.to_string()))?;
        let mut config = bootstrap.client_config(creds)?;
        config
            .set(
                "socket.connection.setup.timeout.ms",
                CONNECT_TIMEOUT.as_millis().to_string(),
            )
            // The admin client is a producer to librdkafka, and a producer's metadata request
            // asks the broker to create a topic it does not have, with the broker's default
            // partitions: looking a Queue's topic up must not make it.
            .set("allow.auto.create.topics", "false");
        let admin: AdminClient<DefaultClientContext> =
            config.create().map_err(|e| bad(e.to_string()))?;
        let producer: FutureProducer = config
            .clone()
            .set("enable.idempotence", "true")
            .set("acks", "all")
            .create()
            .map_err(|e| bad(e.to_string()))?;
        let k = KafkaAdmin {
            admin: Arc::new(admin),
            producer,
            config,
            refused: Arc::default(),
        };
        k.blocking("cluster metadata", |a| {
            a.inner()
                .fetch_metadata(None, CONNECT_TIMEOUT)
                .map(|m| m.brokers().len())
        })
        .await
        .map_err(|e| bad(e.to_string()))?;
        Ok(k)
    }

    /// The client settings of this cluster, for a consumer or producer of the caller's.
    pub fn client_config(&self) -> ClientConfig {
        self.config.clone()
    }

    pub(crate) fn producer(&self) -> &FutureProducer {
        &self.producer
    }

    /// Runs a blocking librdkafka call on the admin client off the async threads.
    async fn blocking<T: Send + 'static>(
        &self,
        what: &str,
        f: impl FnOnce(&AdminClient<DefaultClientContext>) -> rdkafka::error::KafkaResult<T>
        + Send
        + 'static,
    ) -> Result<T, Error> {
        let admin = self.admin.clone();
        tokio::task::spawn_blocking(move || f(&admin))
            .await
            .map_err(|e| broker(what, e))?
            .map_err(|e| broker(what, e))
    }

    fn options() -> AdminOptions {
        AdminOptions::new()
            .request_timeout(Some(REQUEST_TIMEOUT))
            .operation_timeout(Some(REQUEST_TIMEOUT))
    }

    /// The topic's partition count and replication factor; `None` when there is no such topic.
    pub(crate) async fn existing(&self, name: &str) -> Result<Option<Existing>, Error> {
        let owned = name.to_string();
        let found = self
            .blocking(&format!("metadata of topic {name}"), move |a| {
                let m = a.inner().fetch_metadata(Some(&owned), REQUEST_TIMEOUT)?;
                Ok(m.topics().first().and_then(|t| {
                    let missing = t.error().is_some() || t.partitions().is_empty();
                    (!missing).then(|| Existing {
                        partitions: t.partitions().len(),
                        replication_factor: t
                            .partitions()
                            .iter()
                            .map(|p| p.replicas().len())
                            .max()
                            .unwrap_or(0),
                    })
                }))
            })
            .await?;
        Ok(found)
    }

    /// Low and high watermark of each partition of `name` (none when there is no topic).
    pub(crate) async fn watermarks(&self, name: &str) -> Result<Vec<(i32, i64, i64)>, Error> {
        let Some(e) = self.existing(name).await? else {
            return Ok(Vec::new());
        };
        let owned = name.to_string();
        self.blocking(&format!("watermarks of topic {name}"), move |a| {
            (0..e.partitions as i32)
                .map(|p| {
                    let (low, high) = a.inner().fetch_watermarks(&owned, p, REQUEST_TIMEOUT)?;
                    Ok((p, low, high))
                })
                .collect()
        })
        .await
    }

    /// Creates `name`, or brings an existing one to `partitions` and `configs`; returns the
    /// settings the broker refused to change.
    async fn declare_topic(
        &self,
        name: &str,
        partitions: usize,
        replicas: usize,
        configs: &[(&'static str, String, &'static str)],
    ) -> Result<Vec<String>, Error> {
        let existing = match self.existing(name).await? {
            Some(e) => e,
            None => {
                let mut new = NewTopic::new(
                    name,
                    i32::try_from(partitions).unwrap_or(i32::MAX),
                    TopicReplication::Fixed(i32::try_from(replicas).unwrap_or(1)),
                );
                for (k, v, _) in configs {
                    new = new.set(k, v);
                }
                let r = self
                    .admin
                    .create_topics([&new], &Self::options())
                    .await
                    .map_err(|e| broker(format!("creating topic {name}"), e))?;
                match r.into_iter().next() {
                    Some(Ok(_)) => return Ok(Vec::new()),
                    // Created meanwhile (another reconcile): checked as an existing one below.
                    Some(Err((_, RDKafkaErrorCode::TopicAlreadyExists))) => {}
                    Some(Err((_, code))) => {
                        return Err(refused(format!("creating topic {name}"), code));
                    }
                    None => return Ok(Vec::new()),
                }
                self.existing(name).await?.ok_or_else(|| {
                    broker(
                        format!("topic {name}"),
                        "said to exist but not in the metadata",
                    )
                })?
            }
        };
        if partitions < existing.partitions {
            return Err(Error::Invalid {
                field: "spec.partitions".into(),
                message: format!(
                    "topic {name} has {} partitions and Kafka cannot remove partitions: keep \
                     {} or more (or delete the Queue with deletionPolicy Delete and create it \
                     again)",
                    existing.partitions, existing.partitions
                ),
            });
        }
        if existing.replication_factor != 0 && replicas != existing.replication_factor {
            return Err(Error::Invalid {
                field: "spec.replicas".into(),
                message: format!(
                    "topic {name} has replication factor {}; changing it is a partition \
                     reassignment (kafka-reassign-partitions), which Weir does not do",
                    existing.replication_factor
                ),
            });
        }
        if partitions > existing.partitions {
            let grow = NewPartitions::new(name, partitions);
            let r = self
                .admin
                .create_partitions([&grow], &Self::options())
                .await;
            let grow_failed = |message: String| Error::Broker {
                what: format!(
                    "spec.partitions: growing topic {name} from {} to {partitions} partitions",
                    existing.partitions
                ),
                message,
            };
            match r {
                Ok(r) => {
                    if let Some(Err((_, code))) = r.into_iter().next() {
                        return Err(grow_failed(format!("{code} ({code:?})")));
                    }
                }
                // A broker without CreatePartitions (Tansu) fails the whole request.
                Err(e) => return Err(grow_failed(e.to_string())),
            }
        }
        Ok(self.align_configs(name, configs).await)
    }

    /// Alters the configs of `name` that differ from `configs`; the ones the broker would not
    /// read or change, as `spec.<field> (<why>)`.
    async fn align_configs(
        &self,
        name: &str,
        configs: &[(&'static str, String, &'static str)],
    ) -> Vec<String> {
        let spec = [ResourceSpecifier::Topic(name)];
        let current = match self.admin.describe_configs(&spec, &Self::options()).await {
            Ok(r) => match r.into_iter().next() {
                Some(Ok(c)) => Ok(c
                    .entries
                    .into_iter()
                    .filter_map(|e| Some((e.name, e.value?)))
                    .collect::<BTreeMap<_, _>>()),
                Some(Err(code)) => Err(code.to_string()),
                None => Err("no answer".to_string()),
            },
            Err(e) => Err(e.to_string()),
        };
        let differ: Vec<_> = match &current {
            Ok(now) => configs
                .iter()
                .filter(|(k, v, _)| now.get(*k) != Some(v))
                .collect(),
            // Unreadable: set them all (idempotent when they already hold).
            Err(_) => configs.iter().collect(),
        };
        if differ.is_empty() {
            return Vec::new();
        }
        // AlterConfigs replaces the topic's whole config: every one of Weir's is given.
        let mut alter = AlterConfig::new(ResourceSpecifier::Topic(name));
        for (k, v, _) in configs {
            alter = alter.set(k, v);
        }
        let why = match self.admin.alter_configs([&alter], &Self::options()).await {
            Ok(r) => match r.into_iter().next() {
                Some(Err((_, code))) => code.to_string(),
                _ => return Vec::new(),
            },
            Err(e) => e.to_string(),
        };
        differ
            .into_iter()
            .map(|(k, v, field)| {
                format!("{field} (the broker refused to set {k}={v} on topic {name}: {why})")
            })
            .collect()
    }

    /// The committed offsets of `group` on `partitions` of `topic` (`None`: nothing committed).
    pub(crate) async fn committed(
        &self,
        group: &str,
        topic: &str,
        partitions: Vec<i32>,
    ) -> Result<BTreeMap<i32, Option<i64>>, Error> {
        let mut config = self.config.clone();
        config.set("group.id", group);
        let topic = topic.to_string();
        let what = format!("committed offsets of group {group}");
        tokio::task::spawn_blocking(move || {
            let c: BaseConsumer = config.create()?;
            let mut tpl = TopicPartitionList::new();
            for p in &partitions {
                tpl.add_partition(&topic, *p);
            }
            let got = c.committed_offsets(tpl, REQUEST_TIMEOUT)?;
            Ok::<_, rdkafka::error::KafkaError>(
                got.elements()
                    .iter()
                    .map(|e| {
                        let at = match e.offset() {
                            Offset::Offset(o) => Some(o),
                            _ => None,
                        };
                        (e.partition(), at)
                    })
                    .collect(),
            )
        })
        .await
        .map_err(|e| broker(&what, e))?
        .map_err(|e| broker(&what, e))
    }

    /// The ids of the consumer groups whose id starts with `prefix`.
    async fn groups_with_prefix(&self, prefix: &str) -> Result<Vec<String>, Error> {
        let prefix = prefix.to_string();
        self.blocking("listing consumer groups", move |a| {
            let list = a.inner().fetch_group_list(None, REQUEST_TIMEOUT)?;
            let mut ids: Vec<String> = list
                .groups()
                .iter()
                .map(|g| g.name().to_string())
                .filter(|n| n.starts_with(&prefix))
                .collect();
            ids.sort();
            ids.dedup();
            Ok(ids)
        })
        .await
    }

    /// Deletes `groups`; those the broker did not have are left out of the answer.
    async fn delete_groups(&self, groups: &[String]) -> Result<Vec<String>, Error> {
        if groups.is_empty() {
            return Ok(Vec::new());
        }
        let names: Vec<&str> = groups.iter().map(String::as_str).collect();
        let r = self
            .admin
            .delete_groups(&names, &Self::options())
            .await
            .map_err(|e| broker("deleting consumer groups", e))?;
        let mut deleted = Vec::new();
        for g in r {
            match g {
                Ok(name) => deleted.push(name),
                Err((_, RDKafkaErrorCode::GroupIdNotFound)) => {}
                Err((name, code)) => {
                    return Err(refused(format!("deleting consumer group {name}"), code));
                }
            }
        }
        Ok(deleted)
    }
}

/// The broker said no to `what`, with its error code's name.
fn refused(what: String, code: RDKafkaErrorCode) -> Error {
    Error::Broker {
        what,
        message: format!("{code} ({code:?})"),
    }
}

/// The prefix of the Queue's consumer groups: `<s>.`.
fn group_prefix(t: &Topology) -> String {
    group_id(t.stream_name(), "")
}

impl Admin for KafkaAdmin {
    /// Kafka clients are not told the brokers' version: the protocol and cluster size.
    async fn server_version(&self) -> String {
        self.blocking("cluster metadata", |a| {
            a.inner()
                .fetch_metadata(None, REQUEST_TIMEOUT)
                .map(|m| m.brokers().len())
        })
        .await
        .map(|n| {
            format!(
                "Kafka protocol ({n} broker{})",
                if n == 1 { "" } else { "s" }
            )
        })
        .unwrap_or_else(|_| "Kafka protocol".into())
    }

    fn is_connected(&self) -> bool {
        true // librdkafka reconnects by itself
    }

    /// Creates or brings to the spec the topic and, when enabled, the dead-letter topic.
    async fn declare_queue(&self, t: &Topology) -> Result<(), Error> {
        let s = &t.stream;
        let name = topic(t.stream_name());
        let mut refused = self
            .declare_topic(&name, s.partitions, s.replicas, &topic_configs(t, false))
            .await?;
        if t.dead_letter.is_some() {
            let dlq = dead_letter_topic(t.stream_name());
            refused.extend(
                self.declare_topic(&dlq, 1, s.replicas, &topic_configs(t, true))
                    .await?,
            );
        }
        let processed: Vec<_> = super::processed::topic_config(t.processed.max_age)
            .into_iter()
            .map(|(k, v)| (k, v, "spec.duplicateWindow"))
            .collect();
        refused.extend(
            self.declare_topic(&t.processed.bucket, 1, s.replicas, &processed)
                .await?,
        );
        self.refused
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(name, refused);
        Ok(())
    }

    /// Nothing to create: the group comes into being when the consuming sidecar joins it.
    async fn declare_consumer(&self, _t: &Topology, _microservice: &str) -> Result<(), Error> {
        Ok(())
    }

    /// The Microservices of the Queue's consumer groups (`<s>.<microservice>`).
    async fn managed_consumers(
        &self,
        t: &Topology,
        _known: &[String],
    ) -> Result<Vec<String>, Error> {
        let prefix = group_prefix(t);
        Ok(self
            .groups_with_prefix(&prefix)
            .await?
            .into_iter()
            .filter_map(|g| g.strip_prefix(&prefix).map(str::to_string))
            .collect())
    }

    /// `false` when the broker has no such group (asked first: some brokers answer a delete of
    /// an unknown group with success).
    async fn delete_consumer(&self, t: &Topology, name: &str) -> Result<bool, Error> {
        let group = group_id(t.stream_name(), name);
        if !self.groups_with_prefix(&group).await?.contains(&group) {
            return Ok(false);
        }
        let deleted = self.delete_groups(&[group]).await?;
        Ok(!deleted.is_empty())
    }

    async fn figures(&self, t: &Topology, consumers: &[String]) -> Result<Figures, Error> {
        let name = topic(t.stream_name());
        let marks = self.watermarks(&name).await?;
        let messages = messages_of(&marks.iter().map(|(_, l, h)| (*l, *h)).collect::<Vec<_>>());
        let mut pending = BTreeMap::new();
        for c in consumers {
            let group = group_id(t.stream_name(), c);
            let committed = self
                .committed(&group, &name, marks.iter().map(|(p, _, _)| *p).collect())
                .await?;
            let lag = marks
                .iter()
                .map(|(p, low, high)| {
                    partition_lag(*low, *high, committed.get(p).copied().flatten())
                })
                .sum();
            pending.insert(c.clone(), lag);
        }
        let dead_letters = match &t.dead_letter {
            Some(_) => {
                let marks = self.watermarks(&dead_letter_topic(t.stream_name())).await?;
                Some(messages_of(
                    &marks.iter().map(|(_, l, h)| (*l, *h)).collect::<Vec<_>>(),
                ))
            }
            None => None,
        };
        Ok(Figures {
            messages,
            pending,
            dead_letters,
        })
    }

    /// Deletes the topic, the dead-letter topic, the processed-event topic and the Queue's
    /// consumer groups.
    async fn delete_queue(&self, t: &Topology, _consumers: &[String]) -> Result<(), Error> {
        let groups = self.groups_with_prefix(&group_prefix(t)).await?;
        self.delete_groups(&groups).await?;
        let names = [
            topic(t.stream_name()),
            dead_letter_topic(t.stream_name()),
            t.processed.bucket.clone(),
        ];
        let refs: Vec<&str> = names.iter().map(String::as_str).collect();
        let r = self
            .admin
            .delete_topics(&refs, &Self::options())
            .await
            .map_err(|e| broker(format!("deleting topics {}", refs.join(", ")), e))?;
        for res in r {
            match res {
                Ok(_) | Err((_, RDKafkaErrorCode::UnknownTopicOrPartition)) => {}
                Err((name, code)) => return Err(refused(format!("deleting topic {name}"), code)),
            }
        }
        self.refused
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&names[0]);
        Ok(())
    }

    fn refused_settings(&self, t: &Topology) -> Vec<String> {
        self.refused
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(&topic(t.stream_name()))
            .cloned()
            .unwrap_or_default()
    }
}

impl Kind for KafkaAdmin {
    const KIND: BrokerKind = BrokerKind::Kafka;

    async fn connect(url: &str, credentials: &Credentials) -> Result<Self, Error> {
        KafkaAdmin::connect(url, credentials).await
    }

    fn not_applied(spec: &QueueSpec) -> Vec<String> {
        let mut out = Vec::new();
        note(
            &mut out,
            spec.max_messages.is_some(),
            "maxMessages",
            "a Kafka topic is limited by age (maxAge) and size (maxBytes) only",
        );
        note(
            &mut out,
            spec.retention != Retention::Limits,
            "retention",
            "a Kafka topic keeps events until maxAge or maxBytes removes them, whoever consumed them",
        );
        note(
            &mut out,
            spec.storage == Storage::Memory,
            "storage",
            "Kafka always writes its log to disk",
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

    /// Watermarks and committed offsets as a broker answered them: three partitions, retention
    /// having removed the first 40 events of partition 0.
    #[test]
    fn lag_counts_from_the_committed_offset_or_the_first_kept() {
        let marks = [(40, 100), (0, 10), (0, 0)];
        assert_eq!(messages_of(&marks), 60 + 10);
        // Committed 90 on p0, nothing on p1 (everything kept is pending), nothing on empty p2.
        let committed = [Some(90), None, None];
        let lag: u64 = marks
            .iter()
            .zip(committed)
            .map(|((l, h), c)| partition_lag(*l, *h, c))
            .sum();
        assert_eq!(lag, 10 + 10);
        // A committed offset below the first kept (retention moved on): only what is kept.
        assert_eq!(partition_lag(40, 100, Some(5)), 60);
        // A high watermark under the committed offset (a broker that under-reports it): none,
        // never an underflow.
        assert_eq!(partition_lag(0, 3, Some(7)), 0);
        assert_eq!(messages_of(&[(5, 2)]), 0);
    }

    #[test]
    fn configs_come_from_the_spec_with_bytes_per_partition() {
        let t = Topology::new(
            "shop",
            "orders",
            &spec(
                "{broker: k, maxAge: 1h, maxBytes: 3000, partitions: 3, deadLetter: {maxAge: 2h}}",
            ),
        )
        .unwrap();
        let c: BTreeMap<_, _> = topic_configs(&t, false)
            .into_iter()
            .map(|(k, v, f)| (k, (v, f)))
            .collect();
        assert_eq!(c["cleanup.policy"].0, "delete");
        assert_eq!(c["retention.ms"], ("3600000".into(), "spec.maxAge"));
        assert_eq!(c["retention.bytes"], ("1000".into(), "spec.maxBytes"));
        let d: BTreeMap<_, _> = topic_configs(&t, true)
            .into_iter()
            .map(|(k, v, _)| (k, v))
            .collect();
        assert_eq!(d["retention.ms"], "7200000");
        assert!(!d.contains_key("retention.bytes"));
        let unlimited = Topology::new("shop", "orders", &spec("broker: k")).unwrap();
        let c: BTreeMap<_, _> = topic_configs(&unlimited, false)
            .into_iter()
            .map(|(k, v, _)| (k, v))
            .collect();
        assert_eq!(c["retention.ms"], "-1");
        assert_eq!(c["retention.bytes"], "-1");
    }

    #[test]
    fn names_what_kafka_leaves_out() {
        let all = spec(
            "{broker: b, maxBytes: 1000, maxMessages: 10, maxAge: 1h, retention: WorkQueue, \
             storage: Memory, replicas: 3, partitions: 4}",
        );
        let out = KafkaAdmin::not_applied(&all);
        assert_eq!(out.len(), 3, "{out:?}");
        assert!(out[0].starts_with("spec.maxMessages ("), "{out:?}");
        assert!(KafkaAdmin::not_applied(&spec("{broker: b, maxAge: 1h, maxBytes: 5}")).is_empty());
    }
}
