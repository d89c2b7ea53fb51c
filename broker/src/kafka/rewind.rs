//! Rewind on Kafka ([`crate::rewind`]): a consumer group's partitions moved back by the
//! consuming sidecars themselves.
//!
//! Kafka lets only a member of a live group move the group's offsets: an offset commit from
//! outside is refused while sidecars are joined. So `weir queue rewind` works through the
//! processed-event topic every consuming sidecar follows ([`super::processed`]):
//!
//! 1. The point becomes an offset per partition: the first record at or after the time
//!    (`ListOffsets` by timestamp), or the first offset kept for [`crate::rewind::Point::Start`]. Only the
//!    partitions where the group has committed past that offset move; none: the group is left
//!    as it was (`Rewound::NothingDelivered`).
//! 2. The rewind marker ([`Marker`], key [`crate::queue::rewind_marker_key`]) is written to the
//!    processed-event topic; its `from` names the offset of each partition that moves
//!    (`0:49,2:310`, [`format_offsets`]).
//! 3. Each sidecar reads the marker in its turn (after every record written before it, the
//!    topic having one partition). From then on a processed-event record read before the marker
//!    does not count for a record at or after the marker's offset of its partition; records read
//!    after it count as before, so a redelivery after a crash is still deduplicated. Then the
//!    sidecar seeks each partition it owns to the marker's offset, commits that offset, and
//!    writes an applied record ([`applied_key`]) per partition. A partition owned by nobody at
//!    that moment (a rebalance) is moved by whichever sidecar is assigned it next and finds no
//!    applied record for it, so it moves once.
//! 4. The command waits for an applied record of every partition that moves. When the group has
//!    no members (no sidecar running), nobody would: the command commits the offsets itself (an
//!    empty group takes commits from outside) and writes the applied records.

use crate::rewind::Marker;
use std::collections::BTreeMap;

/// The offsets a rewind moves partitions back to, as a marker's `from` holds them:
/// `<partition>:<offset>` pairs joined by `,` in partition order (`0:49,2:310`), so that on a
/// one-partition topic it reads as the position a publish answered.
pub fn format_offsets(offsets: &BTreeMap<i32, i64>) -> String {
    offsets
        .iter()
        .map(|(p, o)| format!("{p}:{o}"))
        .collect::<Vec<_>>()
        .join(",")
}

/// [`format_offsets`] read back; `None` when `from` is not in that form.
pub fn parse_offsets(from: &str) -> Option<BTreeMap<i32, i64>> {
    from.split(',')
        .map(|pair| {
            let (p, o) = pair.split_once(':')?;
            Some((p.trim().parse().ok()?, o.trim().parse().ok()?))
        })
        .collect()
}

/// A rewind marker as a Kafka sidecar keeps it: its generation and its offset per partition.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KafkaMarker {
    pub generation: u64,
    pub offsets: BTreeMap<i32, i64>,
}

impl KafkaMarker {
    /// The marker's offsets; `None` when its `from` is not a Kafka one.
    pub fn of(marker: &Marker) -> Option<KafkaMarker> {
        Some(KafkaMarker {
            generation: marker.generation,
            offsets: parse_offsets(&marker.from)?,
        })
    }

    /// Whether the record at `position` (`<partition>:<offset>`) is delivered again by this
    /// rewind: at or after the marker's offset of its partition.
    pub fn covers(&self, position: &str) -> bool {
        let Some((p, o)) = position.split_once(':') else {
            return false;
        };
        match (p.parse::<i32>(), o.parse::<i64>()) {
            (Ok(p), Ok(o)) => self.offsets.get(&p).is_some_and(|from| o >= *from),
            _ => false,
        }
    }
}

/// The key of the record saying that partition `partition` of consumer `consumer`'s group was
/// moved for the marker of `generation`: `<consumer>.rewound.<generation>.<partition>` (never a
/// processed-event key: those end in 64 hex digits).
pub fn applied_key(consumer: &str, generation: u64, partition: i32) -> String {
    format!("{consumer}.rewound.{generation}.{partition}")
}

/// [`applied_key`] read back: generation and partition.
pub fn parse_applied_key(consumer: &str, key: &str) -> Option<(u64, i32)> {
    let rest = key.strip_prefix(consumer)?.strip_prefix(".rewound.")?;
    let (g, p) = rest.split_once('.')?;
    Some((g.parse().ok()?, p.parse().ok()?))
}

#[cfg(feature = "admin")]
pub use admin::WAIT_FOR_SIDECARS;

#[cfg(feature = "admin")]
mod admin {
    use super::{KafkaMarker, applied_key, format_offsets, parse_applied_key};
    use crate::admin::Error;
    use crate::kafka::admin::{KafkaAdmin, REQUEST_TIMEOUT};
    use crate::kafka::{group_id, topic};
    use crate::queue::{processed_bucket_name, rewind_marker_key, stream_name};
    use crate::rewind::{Marker, Point, Rewind, Rewound};
    use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer};
    use rdkafka::producer::FutureRecord;
    use rdkafka::util::Timeout;
    use rdkafka::{Message, Offset, TopicPartitionList};
    use std::collections::{BTreeMap, BTreeSet};
    use std::time::{Duration, Instant};

    /// How long `weir queue rewind` waits for the running sidecars to move their partitions.
    pub const WAIT_FOR_SIDECARS: Duration = Duration::from_secs(30);

    impl Rewind for KafkaAdmin {
        async fn rewind(
            &self,
            namespace: &str,
            queue: &str,
            consumer: &str,
            to: Point,
        ) -> Result<Rewound, Error> {
            let stream = stream_name(namespace, queue);
            let t = topic(&stream);
            let group = group_id(&stream, consumer);
            let marks = self.watermarks(&t).await?;
            if marks.is_empty() {
                return Err(Error::NotFound {
                    what: format!("topic {t} of Queue {namespace}/{queue}"),
                });
            }
            let parts: Vec<i32> = marks.iter().map(|(p, _, _)| *p).collect();
            let committed = self.committed(&group, &t, parts.clone()).await?;
            let members = self.group_members(&group).await?;
            if members.is_none() && committed.values().all(Option::is_none) {
                return Err(Error::NotFound {
                    what: format!("consumer group {group} on topic {t}"),
                });
            }
            let targets: BTreeMap<i32, Option<i64>> = match to {
                Point::Start => marks.iter().map(|(p, low, _)| (*p, Some(*low))).collect(),
                Point::Time(at) => self.offsets_at(&t, &parts, at.timestamp_millis()).await?,
            };
            let mut moves = BTreeMap::new();
            let mut again = 0u64;
            for (p, target) in &targets {
                if let (Some(o), Some(Some(c))) = (target, committed.get(p))
                    && o < c
                {
                    moves.insert(*p, *o);
                    again += (c - o) as u64;
                }
            }
            if moves.is_empty() {
                return Ok(Rewound::NothingDelivered);
            }
            let marker = Marker {
                generation: chrono::Utc::now().timestamp_millis() as u64,
                from: format_offsets(&moves),
                to: to.to_string(),
            };
            let store = processed_bucket_name(namespace, queue);
            let has_store = self.existing(&store).await?.is_some();
            let written = if has_store {
                Some(
                    self.put(&store, &rewind_marker_key(consumer), &marker.to_json())
                        .await?,
                )
            } else {
                None
            };
            if members.unwrap_or(0) == 0 {
                // No sidecar to do it: an empty group takes the commit from outside.
                self.commit(&group, &t, &moves).await?;
                if has_store {
                    for p in moves.keys() {
                        self.put(&store, &applied_key(consumer, marker.generation, *p), "")
                            .await?;
                    }
                }
            } else {
                let Some((partition, offset)) = written else {
                    return Err(Error::Broker {
                        what: format!("rewinding consumer {consumer} of Queue {namespace}/{queue}"),
                        message: format!(
                            "the group has members but no processed-event topic {store}: the \
                             consuming sidecars cannot be told"
                        ),
                    });
                };
                let want = KafkaMarker {
                    generation: marker.generation,
                    offsets: moves.clone(),
                };
                self.wait_applied(&store, partition, offset, consumer, &want)
                    .await
                    .map_err(|missing| Error::Broker {
                        what: format!("rewinding consumer {consumer} of Queue {namespace}/{queue}"),
                        message: format!(
                            "the rewind marker is written, but the running sidecars did not move \
                             partition(s) {missing:?} within {} s; a sidecar moves a partition \
                             when it next is assigned it, or run the command again",
                            WAIT_FOR_SIDECARS.as_secs()
                        ),
                    })?;
            }
            Ok(Rewound::Moved {
                from: marker.from,
                again: Some(again),
            })
        }
    }

    impl KafkaAdmin {
        /// A consumer of this cluster that never subscribes (offsets, commits, reading).
        fn plain_consumer(&self, group: &str) -> Result<BaseConsumer, Error> {
            let mut c = self.client_config();
            c.set("group.id", group)
                .set("enable.auto.commit", "false")
                .set("auto.offset.reset", "earliest");
            c.create()
                .map_err(|e| Error::broker("creating a Kafka consumer", e))
        }

        /// The number of members of `group`; `None` when the broker does not know the group.
        async fn group_members(&self, group: &str) -> Result<Option<usize>, Error> {
            let c = self.plain_consumer(group)?;
            let g = group.to_string();
            let what = format!("describing consumer group {group}");
            tokio::task::spawn_blocking(move || {
                let list = c.fetch_group_list(Some(&g), REQUEST_TIMEOUT)?;
                Ok::<_, rdkafka::error::KafkaError>(
                    list.groups()
                        .iter()
                        .find(|x| x.name() == g && x.state() != "Dead")
                        .map(|x| x.members().len()),
                )
            })
            .await
            .map_err(|e| Error::broker(&what, e))?
            .map_err(|e| Error::broker(&what, e))
        }

        /// The offset of the first record at or after `at_ms` in each partition (`None`: no
        /// record there is that late).
        async fn offsets_at(
            &self,
            t: &str,
            parts: &[i32],
            at_ms: i64,
        ) -> Result<BTreeMap<i32, Option<i64>>, Error> {
            let c = self.plain_consumer(&format!("{t}.weir-rewind"))?;
            let mut tpl = TopicPartitionList::new();
            for p in parts {
                tpl.add_partition_offset(t, *p, Offset::Offset(at_ms))
                    .map_err(|e| Error::broker("offsets by time", e))?;
            }
            let what = format!("offsets by time of topic {t}");
            tokio::task::spawn_blocking(move || {
                let got = c.offsets_for_times(tpl, REQUEST_TIMEOUT)?;
                Ok::<_, rdkafka::error::KafkaError>(
                    got.elements()
                        .iter()
                        .map(|e| {
                            let at = match e.offset() {
                                Offset::Offset(o) if o >= 0 => Some(o),
                                _ => None,
                            };
                            (e.partition(), at)
                        })
                        .collect(),
                )
            })
            .await
            .map_err(|e| Error::broker(&what, e))?
            .map_err(|e| Error::broker(&what, e))
        }

        /// Commits `offsets` for `group` from outside (the group must be empty).
        async fn commit(
            &self,
            group: &str,
            t: &str,
            offsets: &BTreeMap<i32, i64>,
        ) -> Result<(), Error> {
            let c = self.plain_consumer(group)?;
            let mut tpl = TopicPartitionList::new();
            for (p, o) in offsets {
                tpl.add_partition_offset(t, *p, Offset::Offset(*o))
                    .map_err(|e| Error::broker("committing offsets", e))?;
            }
            let what = format!("committing offsets of consumer group {group}");
            tokio::task::spawn_blocking(move || c.commit(&tpl, CommitMode::Sync))
                .await
                .map_err(|e| Error::broker(&what, e))?
                .map_err(|e| Error::broker(&what, e))
        }

        /// Writes one record (`acks=all`) to `t`; its partition and offset.
        async fn put(&self, t: &str, key: &str, value: &str) -> Result<(i32, i64), Error> {
            self.producer()
                .send(
                    FutureRecord::to(t).key(key).payload(value),
                    Timeout::After(REQUEST_TIMEOUT),
                )
                .await
                .map(|d| (d.partition, d.offset))
                .map_err(|(e, _)| Error::broker(format!("writing {key} to topic {t}"), e))
        }

        /// Reads the processed-event topic from the marker on until an applied record of every
        /// partition of `want` is there; the partitions still missing when
        /// [`WAIT_FOR_SIDECARS`] is over.
        async fn wait_applied(
            &self,
            store: &str,
            partition: i32,
            from: i64,
            consumer: &str,
            want: &KafkaMarker,
        ) -> Result<(), Vec<i32>> {
            let Ok(c) = self.plain_consumer(&format!("{store}.weir-rewind")) else {
                return Err(want.offsets.keys().copied().collect());
            };
            let (store, consumer, generation) =
                (store.to_string(), consumer.to_string(), want.generation);
            let mut missing: BTreeSet<i32> = want.offsets.keys().copied().collect();
            tokio::task::spawn_blocking(move || {
                let mut tpl = TopicPartitionList::new();
                let _ = tpl.add_partition_offset(&store, partition, Offset::Offset(from));
                if c.assign(&tpl).is_err() {
                    return Err(missing.into_iter().collect());
                }
                let deadline = Instant::now() + WAIT_FOR_SIDECARS;
                while !missing.is_empty() && Instant::now() < deadline {
                    if let Some(Ok(m)) = c.poll(Duration::from_millis(100)) {
                        let key = m.key().map(String::from_utf8_lossy).unwrap_or_default();
                        if let Some((g, p)) = parse_applied_key(&consumer, &key)
                            && g == generation
                        {
                            missing.remove(&p);
                        }
                    }
                }
                if missing.is_empty() {
                    Ok(())
                } else {
                    Err(missing.into_iter().collect())
                }
            })
            .await
            .unwrap_or_else(|_| Err(Vec::new()))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn offsets_round_trip_and_a_one_partition_marker_reads_as_a_position() {
        let m: BTreeMap<i32, i64> = [(2, 310), (0, 49)].into();
        assert_eq!(format_offsets(&m), "0:49,2:310");
        assert_eq!(parse_offsets("0:49,2:310"), Some(m));
        assert_eq!(format_offsets(&[(0, 49)].into()), "0:49");
        assert_eq!(
            parse_offsets("49"),
            None,
            "a stream sequence is no Kafka offset"
        );
        assert_eq!(parse_offsets("0:x"), None);
    }

    #[test]
    fn a_marker_covers_its_partitions_from_their_offsets_only() {
        let m = KafkaMarker::of(&Marker {
            generation: 7,
            from: "0:49,2:310".into(),
            to: "start".into(),
        })
        .unwrap();
        assert!(m.covers("0:49") && m.covers("0:100") && m.covers("2:310"));
        assert!(!m.covers("0:48"), "before the point");
        assert!(!m.covers("1:1000"), "a partition that did not move");
        assert!(!m.covers("2:309") && !m.covers("garbage") && !m.covers("0:"));
    }

    #[test]
    fn applied_keys_are_read_back_for_their_consumer_only() {
        let k = applied_key("billing", 17, 3);
        assert_eq!(k, "billing.rewound.17.3");
        assert_eq!(parse_applied_key("billing", &k), Some((17, 3)));
        assert_eq!(parse_applied_key("bill", &k), None);
        assert_eq!(parse_applied_key("billing", "billing.rewind"), None);
        assert!(!crate::queue::processed_key("billing", "e").contains(".rewound."));
    }
}
