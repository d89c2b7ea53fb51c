//! JetStream: the durable pull consumer of each consumed queue, the processed-event KV bucket
//! and the dead-letter stream (names in docs/messaging.md).

use super::backend::{Error, Headers, Inbound, Settle, Side};
use super::cloudevents::*;
use super::consume::{Consumer, MIN_DEDUP_TTL, PULL_EXPIRES, deliver, stopped};
use super::publish::{ensure_stream, publish_with_ack};
use async_nats::jetstream::{
    self, AckKind, consumer::pull, context::KeyValueErrorKind, kv, stream::StorageType,
};
use bytes::Bytes;
use futures::StreamExt;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::Semaphore;
use weir_crds::proxy::ConsumeConfig;

struct Ready {
    consumer: jetstream::consumer::Consumer<pull::Config>,
    side: NatsSide,
}

/// The processed-event bucket and the dead-letter subject of one consumer.
pub(crate) struct NatsSide {
    js: jetstream::Context,
    kv: kv::Store,
    dead_letter_subject: String,
}

/// A JetStream message with its headers read once.
pub(crate) struct NatsMsg {
    msg: jetstream::Message,
    headers: Headers,
    delivered: u64,
    seq: u64,
    /// Stream sequence and stored time (Unix nanoseconds); `None` when the message carries no
    /// JetStream metadata, rather than an identity every such message would share.
    identity: Option<String>,
}

impl NatsMsg {
    fn new(msg: jetstream::Message) -> NatsMsg {
        let (delivered, seq, identity) = match msg.info() {
            // The sequence alone repeats when the stream is deleted and declared again, while
            // the processed-event records of the old one live on: the stored time tells them
            // apart.
            Ok(i) => (
                i.delivered.max(1) as u64,
                i.stream_sequence,
                Some(format!(
                    "{}:{}",
                    i.stream_sequence,
                    i.published.unix_timestamp_nanos()
                )),
            ),
            Err(_) => (1, 0, None),
        };
        let headers = msg
            .headers
            .as_ref()
            .map(|h| {
                h.iter()
                    .flat_map(|(k, vs)| {
                        let k: &str = k.as_ref();
                        vs.iter()
                            .map(move |v| (k.to_string(), v.as_str().to_string()))
                    })
                    .collect()
            })
            .unwrap_or_default();
        NatsMsg {
            msg,
            headers,
            delivered,
            seq,
            identity,
        }
    }
}

impl Inbound for NatsMsg {
    fn payload(&self) -> &Bytes {
        &self.msg.payload
    }
    fn headers(&self) -> &Headers {
        &self.headers
    }
    fn delivered(&self) -> u64 {
        self.delivered
    }
    fn position(&self) -> String {
        self.seq.to_string()
    }
    fn origin(&self) -> &str {
        self.msg.subject.as_str()
    }
    fn identity(&self) -> Option<String> {
        self.identity.clone()
    }
    async fn requeue_with_identity(&self, _identity: &str) -> Result<(), Error> {
        Err(Error::Unsupported(
            "a JetStream message without its metadata (stream sequence) cannot be given one",
        ))
    }
    async fn settle(&self, how: Settle) -> Result<(), Error> {
        let kind = match how {
            Settle::Ack => AckKind::Ack,
            Settle::Nak(d) => AckKind::Nak(d),
            Settle::Term => AckKind::Term,
        };
        self.msg
            .ack_with(kind)
            .await
            .map_err(|e| Error::broker(e.to_string()))
    }
    async fn progress(&self) {
        let _ = self.msg.ack_with(AckKind::Progress).await;
    }
}

impl Side for NatsSide {
    type Msg = NatsMsg;
    async fn is_processed(&self, key: &str) -> Result<bool, Error> {
        self.kv
            .get(key.to_string())
            .await
            .map(|v| v.is_some())
            .map_err(|e| Error::broker(e.to_string()))
    }
    async fn record_processed(&self, key: &str, value: &str) -> Result<(), Error> {
        self.kv
            .put(key.to_string(), Bytes::from(value.to_string()))
            .await
            .map(|_| ())
            .map_err(|e| Error::broker(e.to_string()))
    }
    async fn dead_letter(&self, msg: &NatsMsg, headers: Headers) -> Result<(), Error> {
        let mut h = async_nats::HeaderMap::new();
        for (k, v) in &headers {
            h.append(k.as_str(), v.as_str());
        }
        publish_with_ack(
            &self.js,
            &self.dead_letter_subject,
            h,
            msg.msg.payload.clone(),
        )
        .await
        .map(|_| ())
    }
}

/// Looks up (or creates) the durable consumer, the KV bucket and the dead-letter stream.
async fn setup(js: &jetstream::Context, c: &ConsumeConfig) -> Result<Ready, Error> {
    {
        let stream = js
            .get_stream(&c.stream)
            .await
            .map_err(|e| Error::broker(format!("stream {}: {e}", c.stream)))?;
        let consumer = stream
            .get_or_create_consumer(
                &c.consumer,
                pull::Config {
                    durable_name: Some(c.consumer.clone()),
                    ack_policy: jetstream::consumer::AckPolicy::Explicit,
                    ack_wait: Duration::from_millis(c.ack_wait_ms),
                    // The sidecar counts deliveries and dead-letters at maxDeliveries; a server
                    // limit would strand a message whose last delivery was cut short by a crash.
                    max_deliver: -1,
                    ..Default::default()
                },
            )
            .await
            .map_err(|e| Error::broker(format!("consumer {}: {e}", c.consumer)))?;
        let bucket = processed_bucket(&c.stream);
        let kv = match js.get_key_value(&bucket).await {
            Ok(kv) => kv,
            Err(e) if e.kind() == KeyValueErrorKind::GetBucket => {
                let ttl = Duration::from_millis(c.dedup_window_ms).max(MIN_DEDUP_TTL);
                match js
                    .create_key_value(kv::Config {
                        bucket: bucket.clone(),
                        description: format!("event ids processed from {}", c.stream),
                        history: 1,
                        max_age: ttl,
                        storage: StorageType::File,
                        ..Default::default()
                    })
                    .await
                {
                    Ok(kv) => {
                        tracing::info!(bucket = %bucket, ttl_ms = ttl.as_millis() as u64, "processed-event bucket created (was absent)");
                        kv
                    }
                    // Another sidecar may have created it meanwhile.
                    Err(_) => js
                        .get_key_value(&bucket)
                        .await
                        .map_err(|e| Error::broker(format!("KV bucket {bucket}: {e}")))?,
                }
            }
            Err(e) => return Err(Error::broker(format!("KV bucket {bucket}: {e}"))),
        };
        if !c.dead_letter_subject.is_empty() {
            ensure_stream(js, &c.dead_letter_stream, &c.dead_letter_subject).await?;
        }
        Ok(Ready {
            consumer,
            side: NatsSide {
                js: js.clone(),
                kv,
                dead_letter_subject: c.dead_letter_subject.clone(),
            },
        })
    }
}

/// Runs until `stop`: pulls at most `maxInFlight` messages at a time and delivers each.
pub(crate) async fn run(ctx: Arc<Consumer>, js: jetstream::Context) {
    let mut stop = ctx.stop.clone();
    let max = ctx.cfg.max_in_flight as usize;
    let sem = Arc::new(Semaphore::new(max));
    let mut delay = Duration::from_millis(100);
    'setup: loop {
        if *stop.borrow() {
            break;
        }
        let ready = match setup(&js, &ctx.cfg).await {
            Ok(r) => {
                tracing::info!(queue = ctx.queue(), consumer = %ctx.cfg.consumer, "consuming");
                delay = Duration::from_millis(100);
                Arc::new(r)
            }
            Err(e) => {
                tracing::warn!(queue = ctx.queue(), error = %e, "cannot consume yet; retrying");
                tokio::select! {
                    _ = stopped(&mut stop) => break,
                    _ = tokio::time::sleep(delay) => {}
                }
                delay = (delay * 2).min(Duration::from_secs(5));
                continue;
            }
        };
        let mut failures = 0u32;
        loop {
            let first = tokio::select! {
                _ = stopped(&mut stop) => break 'setup,
                p = sem.clone().acquire_owned() => p.expect("semaphore never closed"),
            };
            let mut permits = vec![first];
            while permits.len() < max {
                match sem.clone().try_acquire_owned() {
                    Ok(p) => permits.push(p),
                    Err(_) => break,
                }
            }
            let batch = ready
                .consumer
                .batch()
                .max_messages(permits.len())
                .expires(PULL_EXPIRES)
                // No idle heartbeat: async-nats 0.51's batch stream returns Pending on a
                // heartbeat without asking to be woken again, so a message arriving after the
                // first heartbeat sat unseen until the pull expired, then waited out the ack
                // wait. A dead connection is noticed by the client's pings and our deadline.
                .messages()
                .await;
            let mut batch = match batch {
                Ok(b) => b,
                Err(e) => {
                    failures += 1;
                    tracing::warn!(queue = ctx.queue(), error = %e, "pull failed");
                    drop(permits);
                    tokio::select! {
                        _ = stopped(&mut stop) => break 'setup,
                        _ = tokio::time::sleep(delay) => {}
                    }
                    delay = (delay * 2).min(Duration::from_secs(2));
                    if failures >= 3 {
                        continue 'setup;
                    }
                    continue;
                }
            };
            let deadline = tokio::time::sleep(PULL_EXPIRES + Duration::from_secs(3));
            tokio::pin!(deadline);
            loop {
                tokio::select! {
                    _ = stopped(&mut stop) => break,
                    _ = &mut deadline => break,
                    m = batch.next() => match m {
                        Some(Ok(msg)) => {
                            failures = 0;
                            delay = Duration::from_millis(100);
                            let permit = permits.pop();
                            let (ctx, ready) = (ctx.clone(), ready.clone());
                            tokio::spawn(async move {
                                deliver(&ctx, &ready.side, NatsMsg::new(msg)).await;
                                drop(permit);
                            });
                            if permits.is_empty() {
                                break;
                            }
                        }
                        Some(Err(e)) => {
                            failures += 1;
                            tracing::debug!(queue = ctx.queue(), error = %e, "pull interrupted");
                            break;
                        }
                        None => break,
                    }
                }
            }
            drop(permits);
            if failures >= 3 {
                tokio::select! {
                    _ = stopped(&mut stop) => break 'setup,
                    _ = tokio::time::sleep(delay) => {}
                }
                delay = (delay * 2).min(Duration::from_secs(2));
                continue 'setup;
            }
        }
    }
    // Drain: wait for the deliveries in flight (the abort signal makes them nak and return).
    let _ = sem.acquire_many(max as u32).await;
    tracing::info!(queue = ctx.queue(), consumer = %ctx.cfg.consumer, "consumer stopped");
}
