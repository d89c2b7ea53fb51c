//! A durable consumer moved back on JetStream ([`crate::rewind`]).
//!
//! The point becomes a stream sequence: the stream's first one for [`Point::Start`]; for a time,
//! the first message at or after it among the consumer's own subjects, read through a short-lived
//! ephemeral consumer with `DeliverPolicy::ByStartTime` and the durable's filter (JetStream has
//! no look-up of a sequence by time). Then the durable is moved there in place:
//!
//! - [`Method::Reset`] on nats-server 2.14 and later: `$JS.API.CONSUMER.RESET` sets its ack
//!   floor just below the sequence and clears what it had pending. The consumer stays, so pull
//!   requests of running sidecars are served on without a pause.
//! - [`Method::Recreate`] before 2.14 (JetStream does not let a deliver policy be updated): the
//!   durable is deleted and created again at once under its name, with its config and
//!   `DeliverPolicy::ByStartSequence`. A sidecar's pull in that gap fails and is retried; should
//!   a sidecar create the consumer itself in the gap (it does after three failed pulls), the
//!   rewind deletes and creates it again.
//!
//! The rewind marker goes into the processed-event KV bucket, whose revisions order it against
//! the records: written before the consumer moves and once more after it.

use super::admin::{NatsAdmin, map_err};
use crate::admin::Error;
use crate::queue::{processed_bucket_name, rewind_marker_key, stream_name};
use crate::rewind::{Marker, Point, Rewind, Rewound};
use async_nats::jetstream::consumer::{self, AckPolicy, DeliverPolicy, pull};
use async_nats::jetstream::context::KeyValueErrorKind;
use async_nats::jetstream::kv;
use futures::StreamExt;
use std::time::Duration;

/// How long the look-up of the first message at a time waits for it.
const PROBE_WAIT: Duration = Duration::from_secs(2);
/// Delete-and-create rounds of [`Method::Recreate`] before giving up.
const RECREATE_ATTEMPTS: usize = 5;

/// How the durable consumer is moved back.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Method {
    /// `$JS.API.CONSUMER.RESET` (nats-server 2.14 and later): the consumer stays in place.
    Reset,
    /// Deleted and created again under its name with its config, from the sequence.
    Recreate,
}

impl Method {
    /// The method a server of `version` (`2.15.1`, `v2.10.22`) supports.
    pub fn for_server(version: &str) -> Method {
        let mut parts = version.trim_start_matches('v').split('.').map(|p| {
            p.split(|c: char| !c.is_ascii_digit())
                .next()
                .and_then(|d| d.parse::<u64>().ok())
                .unwrap_or(0)
        });
        let (major, minor) = (parts.next().unwrap_or(0), parts.next().unwrap_or(0));
        if (major, minor) >= (2, 14) {
            Method::Reset
        } else {
            Method::Recreate
        }
    }
}

impl Rewind for NatsAdmin {
    async fn rewind(
        &self,
        namespace: &str,
        queue: &str,
        consumer: &str,
        to: Point,
    ) -> Result<Rewound, Error> {
        let method = Method::for_server(&self.server_version());
        self.rewind_with(namespace, queue, consumer, to, method)
            .await
    }
}

impl NatsAdmin {
    /// [`Rewind::rewind`] with the method chosen by the caller (the tests run both on one
    /// server).
    pub async fn rewind_with(
        &self,
        namespace: &str,
        queue: &str,
        consumer: &str,
        to: Point,
        method: Method,
    ) -> Result<Rewound, Error> {
        let stream = stream_name(namespace, queue);
        let info = self.consumer_info(&stream, consumer).await?;
        let from = match to {
            Point::Start => self.first_sequence(&stream).await?,
            Point::Time(t) => self.first_at(&stream, &info.config, t).await?,
        };
        let Some(from) = from.filter(|f| *f <= info.delivered.stream_sequence) else {
            return Ok(Rewound::NothingDelivered);
        };
        let bucket = self.processed_bucket(namespace, queue).await?;
        let marker = |generation| Marker {
            generation,
            from: from.to_string(),
            to: to.to_string(),
        };
        let generation = match &bucket {
            Some(kv) => mark(kv, consumer, &marker).await?,
            None => 0,
        };
        let again = match method {
            Method::Reset => self.reset(&stream, consumer, from).await?,
            Method::Recreate => self.recreate(&stream, info.config, from).await?,
        };
        if let Some(kv) = &bucket {
            // Records written while it moved count as older than the rewind too.
            put_marker(kv, consumer, &marker(generation)).await?;
        }
        Ok(Rewound::Moved {
            from: from.to_string(),
            again: Some(again),
        })
    }

    /// The stream's first sequence; `None` when it holds nothing.
    async fn first_sequence(&self, stream: &str) -> Result<Option<u64>, Error> {
        let what = format!("stream {stream}");
        let mut s = self
            .jetstream()
            .get_stream(stream)
            .await
            .map_err(map_err(what.clone()))?;
        let state = &s.info().await.map_err(map_err(what))?.state;
        Ok((state.messages > 0).then_some(state.first_sequence))
    }

    /// The sequence of the first message at or after `t` among the subjects of the consumer
    /// configured as `durable`; `None` when there is none.
    async fn first_at(
        &self,
        stream: &str,
        durable: &consumer::Config,
        t: chrono::DateTime<chrono::Utc>,
    ) -> Result<Option<u64>, Error> {
        let what = format!("the first message at {t} on stream {stream}");
        let nanos = t.timestamp_nanos_opt().ok_or_else(|| Error::Invalid {
            field: "rewind point".into(),
            message: format!("{t} is outside what JetStream can store"),
        })?;
        let start_time = async_nats::datetime::from_nanos(i128::from(nanos))
            .map_err(|e| Error::broker(what.clone(), e))?;
        let s = self
            .jetstream()
            .get_stream_no_info(stream)
            .await
            .map_err(map_err(format!("stream {stream}")))?;
        let probe = s
            .create_consumer(pull::Config {
                deliver_policy: DeliverPolicy::ByStartTime { start_time },
                ack_policy: AckPolicy::None,
                filter_subject: durable.filter_subject.clone(),
                filter_subjects: durable.filter_subjects.clone(),
                inactive_threshold: Duration::from_secs(30),
                description: Some("Weir: looking up a rewind's start".into()),
                ..Default::default()
            })
            .await
            .map_err(map_err(what.clone()))?;
        let name = probe.cached_info().name.clone();
        let first = if probe.cached_info().num_pending == 0 {
            Ok(None)
        } else {
            first_of(&probe, &what).await
        };
        // Best effort: the server drops it after its inactive threshold anyway.
        let _ = s.delete_consumer(&name).await;
        first
    }

    /// Resets the durable's ack floor below `from`; how many messages it has to deliver.
    async fn reset(&self, stream: &str, consumer: &str, from: u64) -> Result<u64, Error> {
        let what = format!("consumer {consumer} on stream {stream}");
        let s = self
            .jetstream()
            .get_stream_no_info(stream)
            .await
            .map_err(map_err(format!("stream {stream}")))?;
        let r = s
            .reset_consumer(consumer, Some(from))
            .await
            .map_err(map_err(format!("resetting {what}")))?;
        Ok(r.info.num_pending)
    }

    /// Deletes the durable and creates it again with `config` delivering from `from`; how many
    /// messages it has to deliver.
    async fn recreate(
        &self,
        stream: &str,
        mut config: consumer::Config,
        from: u64,
    ) -> Result<u64, Error> {
        let name = config.durable_name.clone().unwrap_or_default();
        let what = format!("consumer {name} on stream {stream}");
        config.deliver_policy = DeliverPolicy::ByStartSequence {
            start_sequence: from,
        };
        let s = self
            .jetstream()
            .get_stream_no_info(stream)
            .await
            .map_err(map_err(format!("stream {stream}")))?;
        let mut last = None;
        for _ in 0..RECREATE_ATTEMPTS {
            match s
                .delete_consumer(&name)
                .await
                .map_err(map_err(format!("deleting {what}")))
            {
                Ok(_) => {}
                Err(e) if e.is_not_found() => {}
                Err(e) => return Err(e),
            }
            match s.create_consumer(config.clone()).await {
                Ok(c) => return Ok(c.cached_info().num_pending),
                // A sidecar created it in the gap (with its own start): once more.
                Err(e) => last = Some(map_err(format!("creating {what} again"))(e)),
            }
        }
        Err(last.unwrap_or_else(|| Error::broker(what, "not created")))
    }

    /// The processed-event bucket; `None` when there is none (then no record is there to
    /// bypass).
    async fn processed_bucket(
        &self,
        namespace: &str,
        queue: &str,
    ) -> Result<Option<kv::Store>, Error> {
        let bucket = processed_bucket_name(namespace, queue);
        match self.jetstream().get_key_value(&bucket).await {
            Ok(kv) => Ok(Some(kv)),
            Err(e) if e.kind() == KeyValueErrorKind::GetBucket => Ok(None),
            Err(e) => Err(Error::broker(format!("KV bucket {bucket}"), e)),
        }
    }
}

/// The stream sequence of the first message the probe delivers.
async fn first_of(
    probe: &consumer::Consumer<pull::Config>,
    what: &str,
) -> Result<Option<u64>, Error> {
    let mut messages = probe
        .fetch()
        .max_messages(1)
        .expires(PROBE_WAIT)
        .messages()
        .await
        .map_err(|e| Error::broker(what, e))?;
    match messages.next().await {
        Some(Ok(m)) => m
            .info()
            .map(|i| Some(i.stream_sequence))
            .map_err(|e| Error::broker(what, e)),
        Some(Err(e)) => Err(Error::broker(what, e)),
        None => Ok(None),
    }
}

/// Writes the consumer's next marker (one generation more than the last); its generation.
async fn mark(
    kv: &kv::Store,
    consumer: &str,
    marker: &impl Fn(u64) -> Marker,
) -> Result<u64, Error> {
    let key = rewind_marker_key(consumer);
    let last = kv
        .get(key.clone())
        .await
        .map_err(|e| Error::broker(format!("rewind marker {key}"), e))?
        .and_then(|v| Marker::parse(&v))
        .map_or(0, |m| m.generation);
    put_marker(kv, consumer, &marker(last + 1)).await?;
    Ok(last + 1)
}

async fn put_marker(kv: &kv::Store, consumer: &str, marker: &Marker) -> Result<(), Error> {
    let key = rewind_marker_key(consumer);
    kv.put(key.clone(), marker.to_json().into())
        .await
        .map(|_| ())
        .map_err(|e| Error::broker(format!("rewind marker {key}"), e))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn servers_from_2_14_reset_in_place_older_ones_recreate() {
        assert_eq!(Method::for_server("2.15.1"), Method::Reset);
        assert_eq!(Method::for_server("2.14.0-RC.1"), Method::Reset);
        assert_eq!(Method::for_server("v3.0.0"), Method::Reset);
        assert_eq!(Method::for_server("2.10.22"), Method::Recreate);
        assert_eq!(Method::for_server("2.9"), Method::Recreate);
        assert_eq!(Method::for_server("garbage"), Method::Recreate);
    }
}
