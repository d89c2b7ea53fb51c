//! A Queue's dead letters on Kafka ([`crate::dead_letters`]), on its dead-letter topic
//! `<s>_dlq`: `seq` is the record's `partition/offset` there. A dead letter carries the headers
//! of [`crate::queue::dead_letter_headers`] (`Weir-Original-Subject` is the topic it was read
//! from, `Weir-Original-Seq` its `partition/offset` on it) and the event's key.
//!
//! A replay produces the event (its body, key and own headers: `ce-*`, trace context, content
//! type) to the topic named by `Weir-Original-Subject`, with the idempotent producer
//! (`acks=all`). Kafka cannot delete one record, so the dead letter is then marked replayed: a
//! record on the dead-letter topic with the header [`REPLAYED`] naming its `seq` and no body.
//! Listing leaves out the markers and the dead letters they name; retention removes both in
//! time.

use super::admin::KafkaAdmin;
use super::dead_letter_topic;
use crate::admin::Error;
use crate::dead_letters::{DeadLetter, DeadLetters, replayed_header};
use crate::queue::stream_name;
use bytes::Bytes;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::{Header, Message, OwnedHeaders};
use rdkafka::producer::FutureRecord;
use rdkafka::{Offset, TopicPartitionList};
use std::collections::BTreeSet;
use std::time::{Duration, Instant};

/// The header of a replay marker: the `seq` of the dead letter it replayed.
pub const REPLAYED: &str = "Weir-Replayed";

/// Longest a listing waits for the end of the dead-letter topic.
const READ_TIMEOUT: Duration = Duration::from_secs(15);
/// How long a partition may stay silent before it is taken as read to its end (for a broker
/// whose end-of-partition signal does not come).
const IDLE: Duration = Duration::from_millis(1500);

/// A dead letter as read, with the key its replay is produced with.
struct Record {
    letter: DeadLetter,
    key: Option<Vec<u8>>,
}

/// `partition/offset`.
fn seq_of(partition: i32, offset: i64) -> String {
    format!("{partition}/{offset}")
}

/// Drops the replay markers and the dead letters they name.
fn without_replayed(records: Vec<(Record, Option<String>)>) -> Vec<Record> {
    let replayed: BTreeSet<String> = records.iter().filter_map(|(_, m)| m.clone()).collect();
    records
        .into_iter()
        .filter(|(r, marker)| marker.is_none() && !replayed.contains(&r.letter.seq))
        .map(|(r, _)| r)
        .collect()
}

impl KafkaAdmin {
    /// Every record of the dead-letter topic, oldest first per partition, with the `seq` each
    /// replay marker names.
    async fn read_dead_letters(
        &self,
        namespace: &str,
        queue: &str,
    ) -> Result<Vec<(Record, Option<String>)>, Error> {
        let topic = dead_letter_topic(&stream_name(namespace, queue));
        let marks = self.watermarks(&topic).await?;
        let what = format!("reading dead-letter topic {topic}");
        let mut config = self.client_config();
        config
            .set("group.id", format!("{topic}.weir-dlq"))
            .set("enable.auto.commit", "false")
            .set("enable.partition.eof", "true")
            .set("auto.offset.reset", "earliest");
        tokio::task::spawn_blocking(move || {
            let c: BaseConsumer = config.create()?;
            let mut tpl = TopicPartitionList::new();
            for (p, _, _) in &marks {
                tpl.add_partition_offset(&topic, *p, Offset::Beginning)?;
            }
            c.assign(&tpl)?;
            let mut open: BTreeSet<i32> = marks.iter().map(|(p, _, _)| *p).collect();
            let mut out = Vec::new();
            let deadline = Instant::now() + READ_TIMEOUT;
            let mut last = Instant::now();
            while !open.is_empty() && Instant::now() < deadline && last.elapsed() < IDLE {
                let Some(m) = c.poll(Duration::from_millis(100)) else {
                    continue;
                };
                match m {
                    Err(rdkafka::error::KafkaError::PartitionEOF(p)) => {
                        open.remove(&p);
                    }
                    Err(e) => return Err(e),
                    Ok(m) => {
                        last = Instant::now();
                        let mut headers = Vec::new();
                        let mut marker = None;
                        for (k, v) in super::headers_of(&m) {
                            if k.eq_ignore_ascii_case(REPLAYED) {
                                marker = Some(v);
                            } else {
                                headers.push((k, v));
                            }
                        }
                        headers.sort();
                        let stored_at = m
                            .timestamp()
                            .to_millis()
                            .and_then(chrono::DateTime::from_timestamp_millis)
                            .map(|t| t.to_rfc3339_opts(chrono::SecondsFormat::Millis, true))
                            .unwrap_or_default();
                        let letter = DeadLetter {
                            seq: seq_of(m.partition(), m.offset()),
                            headers,
                            body: Bytes::copy_from_slice(m.payload().unwrap_or_default()),
                            stored_at,
                        };
                        let key = m.key().map(<[u8]>::to_vec);
                        out.push((Record { letter, key }, marker));
                    }
                }
            }
            Ok(out)
        })
        .await
        .map_err(|e| Error::broker(&what, e))?
        .map_err(|e| Error::broker(&what, e))
    }

    async fn dead_letters(&self, namespace: &str, queue: &str) -> Result<Vec<Record>, Error> {
        Ok(without_replayed(
            self.read_dead_letters(namespace, queue).await?,
        ))
    }

    /// Produces `r`'s event to its original topic, then marks it replayed; its new
    /// `partition/offset`.
    async fn replay_one(&self, namespace: &str, queue: &str, r: &Record) -> Result<String, Error> {
        let d = &r.letter;
        let topic = d.original_subject()?.to_string();
        let what = format!("replay of dead letter {} on topic {topic}", d.seq);
        let mut headers = OwnedHeaders::new();
        for (k, v) in d.headers.iter().filter(|(k, _)| replayed_header(k)) {
            headers = headers.insert(Header {
                key: k,
                value: Some(v.as_bytes()),
            });
        }
        let mut record = FutureRecord::to(&topic)
            .payload(d.body.as_ref())
            .headers(headers);
        if let Some(k) = &r.key {
            record = record.key(k);
        }
        let delivered = self
            .producer()
            .send(record, Duration::from_secs(10))
            .await
            .map_err(|(e, _)| Error::broker(&what, e))?;
        let dlq = dead_letter_topic(&stream_name(namespace, queue));
        let marker = OwnedHeaders::new().insert(Header {
            key: super::dead_letters::REPLAYED,
            value: Some(d.seq.as_bytes()),
        });
        self.producer()
            .send(
                FutureRecord::<(), [u8]>::to(&dlq).headers(marker),
                Duration::from_secs(10),
            )
            .await
            .map_err(|(e, _)| {
                Error::broker(
                    format!("marking dead letter {} of {dlq} replayed", d.seq),
                    e,
                )
            })?;
        Ok(seq_of(delivered.partition, delivered.offset))
    }
}

impl DeadLetters for KafkaAdmin {
    async fn get(
        &self,
        namespace: &str,
        queue: &str,
        seq: &str,
    ) -> Result<Option<DeadLetter>, Error> {
        Ok(self
            .dead_letters(namespace, queue)
            .await?
            .into_iter()
            .map(|r| r.letter)
            .find(|d| d.seq == seq))
    }

    async fn list(&self, namespace: &str, queue: &str) -> Result<Vec<DeadLetter>, Error> {
        Ok(self
            .dead_letters(namespace, queue)
            .await?
            .into_iter()
            .map(|r| r.letter)
            .collect())
    }

    async fn replay(
        &self,
        namespace: &str,
        queue: &str,
        chosen: &[DeadLetter],
    ) -> Vec<(DeadLetter, Result<String, Error>)> {
        let records = match self.dead_letters(namespace, queue).await {
            Ok(r) => r,
            Err(e) => return chosen.iter().map(|d| (d.clone(), Err(e.clone()))).collect(),
        };
        let mut out = Vec::new();
        for d in chosen {
            let result = match records.iter().find(|r| r.letter.seq == d.seq) {
                Some(r) => self.replay_one(namespace, queue, r).await,
                None => Err(Error::Invalid {
                    field: format!("dead letter {}", d.seq),
                    message: "is not on the dead-letter topic (replayed already?)".into(),
                }),
            };
            out.push((d.clone(), result));
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(seq: &str) -> Record {
        Record {
            letter: DeadLetter {
                seq: seq.into(),
                headers: Vec::new(),
                body: Bytes::new(),
                stored_at: String::new(),
            },
            key: None,
        }
    }

    #[test]
    fn a_marker_hides_itself_and_the_dead_letter_it_names() {
        let read = vec![
            (record("0/0"), None),
            (record("0/1"), None),
            (record("0/2"), Some("0/0".to_string())),
        ];
        let left: Vec<String> = without_replayed(read)
            .into_iter()
            .map(|r| r.letter.seq)
            .collect();
        assert_eq!(left, ["0/1"]);
    }
}
