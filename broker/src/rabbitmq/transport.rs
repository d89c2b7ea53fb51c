//! The sidecar's role on RabbitMQ (AMQP 0-9-1, no plugins), on the layout of [`super`] (exchanges,
//! consumer, retry and dead-letter queues, the processed-event stream, and their arguments).
//!
//! Publish: `mandatory`, persistent, `message_id` = event id, CloudEvents headers; the 202 comes
//! after the publisher confirm. An event no queue is bound for (no consumer declared yet) comes
//! back (`basic.return`) and the publish answers 503: it was not stored.
//!
//! Consume: prefetch = maxInFlight. Ack and term are `basic.ack`. A nak with a delay publishes
//! a copy (confirmed) to the retry queue of that delay and then acks the original; the copy's
//! `Weir-Deliveries` header carries the deliveries so far. The delivery count is
//! `Weir-Deliveries` + the quorum queue's `x-delivery-count` (deliveries returned by a crash or
//! a requeue) + 1. A nak without delay is `basic.nack` with requeue.
//!
//! A plain message (no CloudEvents envelope: another producer wrote it) needs an identity that
//! lasts across redeliveries, and RabbitMQ keeps none: on its first delivery the sidecar
//! publishes a copy (confirmed) carrying a new UUID in `Weir-Message-Id` (and as `message_id`)
//! to the consumer queue, and acks the original; the copy is delivered in its place.
//!
//! Processed events: each sidecar reads the queue's processed-event stream from `now - ttl` into
//! memory (and keeps following it); it starts consuming only after it has read back a marker it
//! published itself, so it knows every record older than its start. A record is published
//! (confirmed) to the stream and kept in memory at once.

use crate::queue::processed_bucket;
use crate::transport::{
    API_TIMEOUT, CE_ID, Error, Handler, Headers, Inbound, MAX_RECONNECT_DELAY, MIN_DEDUP_TTL,
    Outgoing, PUBLISH_TIMEOUT, Published, RETRY_LATER, Settle, Side, Slots, header, pause,
    setup_failed, stopped,
};
use bytes::Bytes;
use futures::StreamExt;
use lapin::options::*;
use lapin::tcp::OwnedTLSConfig;
use lapin::types::{AMQPValue, FieldTable, ShortString};
use lapin::uri::AMQPUri;
use lapin::{BasicProperties, Channel, Confirmation, Connection, ConnectionProperties};
use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::watch;
use weir_crds::proxy::{ConsumeConfig, PublishConfig, QueueLimits};

fn long(s: impl Into<String>) -> AMQPValue {
    AMQPValue::LongString(s.into().into())
}

use super::{
    WEIR_DELIVERIES, WEIR_MESSAGE_ID, consumer_queue, declare, processed_stream_args, quorum_args,
    retry_queue, retry_queue_args,
};

/// The arguments of a consumer queue ([`super::consumer_queue_args`]); an
/// empty `dead_letter_exchange` when dead letters are disabled.
pub fn consumer_queue_args(
    max_deliveries: u32,
    dead_letter_exchange: &str,
    limits: &QueueLimits,
) -> FieldTable {
    super::consumer_queue_args(
        i64::from(max_deliveries),
        Some(dead_letter_exchange).filter(|d| !d.is_empty()),
        limits,
    )
}

/// Where and how the sidecar connects: the URL with the credentials in it, and the TLS roots.
#[derive(Clone)]
pub struct Endpoint {
    pub uri: AMQPUri,
    /// `cert_chain`: the `ca.crt` of the credentials, trusted for `amqps://` besides the
    /// system's roots.
    pub tls: OwnedTLSConfig,
}

/// The endpoint of `url` with the credentials of `credentials` (a Secret directory holding
/// `username` and `password`, or only `ca.crt`), read once: the user in the URL, `ca.crt`
/// trusted for `amqps://`.
pub fn endpoint(url: &str, credentials: Option<&str>) -> Result<Endpoint, Error> {
    let mut uri: AMQPUri = url.parse().map_err(|e| {
        Error::Config(format!(
            "messaging.brokerUrl: {:?} is not an AMQP URL: {e}",
            weir_crds::redact::url(url)
        ))
    })?;
    let mut tls = OwnedTLSConfig::default();
    let Some(dir) = credentials else {
        return Ok(Endpoint { uri, tls });
    };
    let creds = crate::credentials::Credentials::from_dir(std::path::Path::new(dir))?;
    if let Some((user, pass)) = creds
        .amqp_auth()
        .map_err(|e| Error::Config(format!("credentials directory {dir}: {e}")))?
    {
        uri.authority.userinfo.username = user;
        uri.authority.userinfo.password = pass;
    }
    creds
        .require_tls_with_ca(
            url,
            "amqps",
            &std::path::Path::new(dir)
                .join(crate::credentials::CA_KEY)
                .display()
                .to_string(),
            &format!("messaging.brokerUrl {:?}", weir_crds::redact::url(url)),
        )
        .map_err(|e| Error::Config(e.0))?;
    if let Some(pem) = creds.ca {
        tls.cert_chain = Some(pem);
    }
    Ok(Endpoint { uri, tls })
}

/// Connects once (bounded by [`API_TIMEOUT`]).
pub async fn connect(e: &Endpoint, name: &str) -> Result<Connection, Error> {
    let u = &e.uri;
    let props = ConnectionProperties::default().with_connection_name(name.to_string().into());
    let runtime = lapin::runtime::default_runtime().map_err(|e| Error::broker(e.to_string()))?;
    let open = Connection::connect_uri_with_config(u.clone(), props, e.tls.clone(), runtime);
    let failed = |message: String| Error::Connect {
        to: format!("{}:{}", u.authority.host, u.authority.port),
        message,
    };
    match tokio::time::timeout(API_TIMEOUT, open).await {
        Ok(Ok(c)) => Ok(c),
        Ok(Err(e)) => Err(failed(e.to_string())),
        Err(_) => Err(failed("timed out".into())),
    }
}

async fn timed<T>(
    what: &str,
    f: impl std::future::Future<Output = lapin::Result<T>>,
) -> Result<T, Error> {
    match tokio::time::timeout(API_TIMEOUT, f).await {
        Ok(Ok(v)) => Ok(v),
        Ok(Err(e)) => Err(Error::broker(format!("{what}: {e}"))),
        Err(_) => Err(Error::Timeout(format!(
            "{what}: no answer within {} ms",
            API_TIMEOUT.as_millis()
        ))),
    }
}

/// Declares the queue unless it exists (an existing queue is used as it is: RabbitMQ refuses a
/// redeclaration with other arguments). The check runs on a channel of its own, which the
/// broker closes when the queue is absent.
pub async fn ensure_queue(conn: &Connection, name: &str, args: FieldTable) -> Result<(), Error> {
    let probe = timed("channel", conn.create_channel()).await?;
    let passive = QueueDeclareOptions {
        passive: true,
        durable: true,
        ..Default::default()
    };
    if probe
        .queue_declare(name.into(), passive, FieldTable::default())
        .await
        .is_ok()
    {
        let _ = probe.close(200, "ok".into()).await;
        return Ok(());
    }
    let ch = timed("channel", conn.create_channel()).await?;
    declared(
        &format!("queue {name}"),
        declare::declare_queue(&ch, name, args),
    )
    .await?;
    tracing::info!(queue = name, "queue declared (was absent)");
    let _ = ch.close(200, "ok".into()).await;
    Ok(())
}

pub async fn ensure_exchange(
    ch: &Channel,
    name: &str,
    kind: lapin::ExchangeKind,
) -> Result<(), Error> {
    declared(
        &format!("exchange {name}"),
        declare::declare_exchange(ch, name, kind),
    )
    .await
}

/// A [`declare`] call bounded by [`API_TIMEOUT`], its error as the bridge's.
async fn declared(
    what: &str,
    f: impl std::future::Future<Output = Result<(), declare::DeclareError>>,
) -> Result<(), Error> {
    match tokio::time::timeout(API_TIMEOUT, f).await {
        Ok(Ok(())) => Ok(()),
        Ok(Err(e)) => Err(Error::broker(format!("declare {e}"))),
        Err(_) => Err(Error::Timeout(format!(
            "declare {what}: no answer within {} ms",
            API_TIMEOUT.as_millis()
        ))),
    }
}

/// Declares what one consumer needs, leaving alone what exists: the queue's exchange, the
/// dead-letter exchange and queue, the consumer queue bound with `#`, the processed stream.
pub async fn declare_consumer(
    conn: &Connection,
    c: &ConsumeConfig,
    processed_ttl: Duration,
) -> Result<(), Error> {
    let ch = timed("channel", conn.create_channel()).await?;
    ensure_exchange(&ch, &c.stream, lapin::ExchangeKind::Topic).await?;
    if !c.dead_letter_stream.is_empty() {
        ensure_exchange(&ch, &c.dead_letter_stream, lapin::ExchangeKind::Fanout).await?;
        ensure_queue(conn, &c.dead_letter_stream, quorum_args()).await?;
        let dl = c.dead_letter_stream.as_str();
        declared(
            "the dead-letter binding",
            declare::bind_queue(&ch, dl, dl, ""),
        )
        .await?;
    }
    let q = consumer_queue(&c.stream, &c.consumer);
    ensure_queue(
        conn,
        &q,
        consumer_queue_args(c.max_deliveries, &c.dead_letter_stream, &c.limits),
    )
    .await?;
    declared(
        &format!("binding of {q}"),
        declare::bind_queue(&ch, &q, &c.stream, "#"),
    )
    .await?;
    ensure_queue(
        conn,
        &processed_bucket(&c.stream),
        processed_stream_args(processed_ttl),
    )
    .await?;
    let _ = ch.close(200, "ok".into()).await;
    Ok(())
}

/// Publishes and waits for the confirm; a returned (unroutable) or nacked message is an error.
pub async fn publish_confirmed(
    ch: &Channel,
    exchange: &str,
    routing_key: &str,
    payload: &[u8],
    props: BasicProperties,
) -> Result<(), Error> {
    let fut = async {
        let confirm = ch
            .basic_publish(
                exchange.into(),
                routing_key.into(),
                BasicPublishOptions {
                    mandatory: true,
                    ..Default::default()
                },
                payload,
                props,
            )
            .await
            .map_err(|e| Error::broker(format!("publish failed: {e}")))?;
        match confirm
            .await
            .map_err(|e| Error::broker(format!("publish failed: {e}")))?
        {
            Confirmation::Ack(None) | Confirmation::NotRequested => Ok(()),
            Confirmation::Ack(Some(_)) => Err(Error::Unroutable(format!(
                "no queue is bound to exchange {exchange:?} (no consumer of this queue is \
                 declared yet): the event was not stored"
            ))),
            Confirmation::Nack(_) => Err(Error::broker(format!(
                "the broker refused the event on exchange {exchange:?} (a queue is full)"
            ))),
        }
    };
    match tokio::time::timeout(PUBLISH_TIMEOUT, fut).await {
        Ok(r) => r,
        Err(_) => Err(Error::Timeout(format!(
            "the broker did not confirm within {} ms",
            PUBLISH_TIMEOUT.as_millis()
        ))),
    }
}

fn props_with(headers: &Headers, message_id: &str) -> BasicProperties {
    let mut t = FieldTable::default();
    for (k, v) in headers {
        t.insert(k.as_str().into(), long(v.clone()));
    }
    BasicProperties::default()
        .with_headers(t)
        .with_delivery_mode(2)
        .with_content_type("application/json".into())
        .with_message_id(message_id.into())
        .with_timestamp(chrono::Utc::now().timestamp().max(0) as u64)
}

fn value_text(v: &AMQPValue) -> Option<String> {
    Some(match v {
        AMQPValue::LongString(s) => String::from_utf8_lossy(s.as_bytes()).into_owned(),
        AMQPValue::ShortString(s) => s.as_str().to_string(),
        AMQPValue::LongInt(i) => i.to_string(),
        AMQPValue::LongLongInt(i) => i.to_string(),
        AMQPValue::LongUInt(i) => i.to_string(),
        AMQPValue::ShortInt(i) => i.to_string(),
        AMQPValue::ShortUInt(i) => i.to_string(),
        AMQPValue::ShortShortInt(i) => i.to_string(),
        AMQPValue::ShortShortUInt(i) => i.to_string(),
        AMQPValue::Boolean(b) => b.to_string(),
        _ => return None,
    })
}

/// The message's headers as text (nested tables such as `x-death` are left out).
pub fn headers_of(p: &BasicProperties) -> Headers {
    p.headers()
        .as_ref()
        .map(|t| {
            t.inner()
                .iter()
                .filter_map(|(k, v)| Some((k.as_str().to_string(), value_text(v)?)))
                .collect()
        })
        .unwrap_or_default()
}

/// The sidecar's publishing connection: one confirm-mode channel, re-opened by a supervisor.
pub struct RabbitConn {
    channel: Arc<Mutex<Option<Channel>>>,
    connected: Arc<AtomicBool>,
    supervisor: tokio::task::JoinHandle<()>,
    pub endpoint: Endpoint,
    pub name: String,
}

impl RabbitConn {
    pub fn open(
        url: &str,
        credentials: Option<&str>,
        name: &str,
        publishes: Vec<PublishConfig>,
        on_state: impl Fn(bool) + Send + Sync + 'static,
    ) -> Result<RabbitConn, Error> {
        let u = endpoint(url, credentials)?;
        let channel: Arc<Mutex<Option<Channel>>> = Arc::default();
        let connected = Arc::new(AtomicBool::new(false));
        let (u2, ch2, flag, name2) = (
            u.clone(),
            channel.clone(),
            connected.clone(),
            name.to_string(),
        );
        let supervisor = tokio::spawn(async move {
            let mut conn: Option<Connection> = None;
            let mut delay = Duration::from_millis(50);
            let mut last_error: Option<Error> = None;
            loop {
                let up = conn.as_ref().is_some_and(|c| c.status().connected())
                    && ch2
                        .lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .as_ref()
                        .is_some_and(|c| c.status().connected());
                if !up {
                    *ch2.lock().unwrap_or_else(|e| e.into_inner()) = None;
                    if flag.swap(false, Ordering::AcqRel) {
                        on_state(false);
                        tracing::warn!("broker disconnected; reconnecting");
                    }
                    match open_publisher(&u2, &name2, &publishes).await {
                        Ok((c, ch)) => {
                            conn = Some(c);
                            *ch2.lock().unwrap_or_else(|e| e.into_inner()) = Some(ch);
                            flag.store(true, Ordering::Release);
                            on_state(true);
                            tracing::info!("broker connected");
                            delay = Duration::from_millis(50);
                            last_error = None;
                        }
                        Err(e) => {
                            // Said once per distinct error (a refused TLS certificate, a wrong
                            // password), not at every retry.
                            if last_error.as_ref() != Some(&e) {
                                tracing::warn!(error = %e, "cannot connect to the broker");
                                last_error = Some(e);
                            }
                            tokio::time::sleep(delay).await;
                            delay = (delay * 2).min(MAX_RECONNECT_DELAY);
                            continue;
                        }
                    }
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        });
        Ok(RabbitConn {
            channel,
            connected,
            supervisor,
            endpoint: u,
            name: name.to_string(),
        })
    }

    pub fn connected(&self) -> bool {
        self.connected.load(Ordering::Acquire)
    }

    pub fn close(&self) {
        self.supervisor.abort();
        if let Some(ch) = self
            .channel
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take()
        {
            tokio::spawn(async move {
                let _ = ch.close(200, "bye".into()).await;
            });
        }
    }

    pub async fn publish(&self, e: Outgoing<'_>) -> Result<Published, Error> {
        let ch = self
            .channel
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
            .ok_or(Error::NotConnected)?;
        publish_confirmed(
            &ch,
            &e.target.stream,
            &e.target.subject,
            &e.payload,
            props_with(e.headers, e.id),
        )
        .await?;
        Ok(Published {
            duplicate: false,
            position: serde_json::Value::Null,
        })
    }
}

async fn open_publisher(
    u: &Endpoint,
    name: &str,
    publishes: &[PublishConfig],
) -> Result<(Connection, Channel), Error> {
    let conn = connect(u, name).await?;
    let ch = timed("channel", conn.create_channel()).await?;
    timed(
        "confirm.select",
        ch.confirm_select(ConfirmSelectOptions::default()),
    )
    .await?;
    for p in publishes {
        ensure_exchange(&ch, &p.stream, lapin::ExchangeKind::Topic).await?;
    }
    Ok((conn, ch))
}

/// Records read from (and written to) the processed-event stream: key → expiry (Unix ms).
#[derive(Default)]
struct Processed {
    keys: HashMap<String, i64>,
    markers: std::collections::HashSet<String>,
}

pub struct Shared {
    /// Confirm-mode channel for retries, dead letters and processed records.
    out: Channel,
    queue: String,
    dead_letter_exchange: String,
    processed_stream: String,
    processed_ttl: Duration,
    processed: Arc<Mutex<Processed>>,
    declared_retry: Mutex<std::collections::HashSet<u64>>,
    conn: Connection,
}

pub struct RabbitMsg {
    delivery: lapin::message::Delivery,
    headers: Headers,
    payload: Bytes,
    delivered: u64,
    shared: Arc<Shared>,
}

impl RabbitMsg {
    fn new(mut delivery: lapin::message::Delivery, shared: Arc<Shared>) -> RabbitMsg {
        let headers = headers_of(&delivery.properties);
        let n = |k: &str| {
            header(&headers, k)
                .and_then(|v| v.parse::<u64>().ok())
                .unwrap_or(0)
        };
        let delivered = n(WEIR_DELIVERIES) + n("x-delivery-count") + 1;
        let payload = Bytes::from(std::mem::take(&mut delivery.data));
        RabbitMsg {
            delivery,
            headers,
            payload,
            delivered,
            shared,
        }
    }
}

impl Inbound for RabbitMsg {
    fn payload(&self) -> &Bytes {
        &self.payload
    }
    fn headers(&self) -> &Headers {
        &self.headers
    }
    fn delivered(&self) -> u64 {
        self.delivered
    }
    fn position(&self) -> String {
        self.delivery
            .properties
            .message_id()
            .as_ref()
            .map(|m| m.as_str().to_string())
            .or_else(|| header(&self.headers, CE_ID).map(str::to_string))
            .unwrap_or_default()
    }
    fn origin(&self) -> &str {
        &self.shared.queue
    }
    fn identity(&self) -> Option<String> {
        header(&self.headers, WEIR_MESSAGE_ID).map(str::to_string)
    }
    async fn requeue_with_identity(&self, identity: &str) -> Result<(), Error> {
        let s = &self.shared;
        // The deliveries so far count on: the copy is not a new message to the app.
        let mut h = self.copy_headers(self.delivered.saturating_sub(1));
        h.push((WEIR_MESSAGE_ID.into(), identity.to_string()));
        publish_confirmed(
            &s.out,
            "",
            &s.queue,
            &self.payload,
            props_with(&h, identity),
        )
        .await?;
        self.delivery
            .acker
            .ack(BasicAckOptions::default())
            .await
            .map(|_| ())
            .map_err(|e| {
                Error::broker(format!(
                    "the copy is stored but the original was not acknowledged: {e}"
                ))
            })
    }
    async fn settle(&self, how: Settle) -> Result<(), Error> {
        let acker = &self.delivery.acker;
        match how {
            Settle::Ack | Settle::Term => acker
                .ack(BasicAckOptions::default())
                .await
                .map(|_| ())
                .map_err(|e| Error::broker(e.to_string())),
            Settle::Nak(None) => acker
                .nack(BasicNackOptions {
                    requeue: true,
                    ..Default::default()
                })
                .await
                .map(|_| ())
                .map_err(|e| Error::broker(e.to_string())),
            Settle::Nak(Some(d)) => match self.retry_later(d).await {
                Ok(()) => acker
                    .ack(BasicAckOptions::default())
                    .await
                    .map(|_| ())
                    .map_err(|e| Error::broker(e.to_string())),
                Err(e) => {
                    tracing::warn!(queue = %self.shared.queue, error = %e, "cannot park the retry; handing the message back");
                    tokio::time::sleep(RETRY_LATER).await;
                    acker
                        .nack(BasicNackOptions {
                            requeue: true,
                            ..Default::default()
                        })
                        .await
                        .map(|_| ())
                        .map_err(|e| Error::broker(e.to_string()))
                }
            },
        }
    }
    async fn progress(&self) {
        // RabbitMQ redelivers only when the consumer's connection is gone: nothing to extend.
    }
}

impl RabbitMsg {
    /// Publishes a copy to the retry queue of `d` (declared when first used), confirmed.
    async fn retry_later(&self, d: Duration) -> Result<(), Error> {
        let s = &self.shared;
        let ms = d.as_millis().max(1) as u64;
        let rq = retry_queue(&s.queue, ms);
        let known = s
            .declared_retry
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .contains(&ms);
        if !known {
            ensure_queue(&s.conn, &rq, retry_queue_args(&s.queue, ms)).await?;
            s.declared_retry
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .insert(ms);
        }
        let h = self.copy_headers(self.delivered);
        let id = self.position();
        publish_confirmed(&s.out, "", &rq, &self.payload, props_with(&h, &id)).await
    }

    /// The headers of a copy of this message put back on a queue: the broker's own (`x-*`)
    /// left out, `Weir-Deliveries` = `deliveries` made so far.
    fn copy_headers(&self, deliveries: u64) -> Headers {
        let mut h: Headers = self
            .headers
            .iter()
            .filter(|(k, _)| !k.starts_with("x-") && !k.eq_ignore_ascii_case(WEIR_DELIVERIES))
            .cloned()
            .collect();
        h.push((WEIR_DELIVERIES.into(), deliveries.to_string()));
        h
    }
}

pub struct RabbitSide {
    shared: Arc<Shared>,
}

fn now_ms() -> i64 {
    chrono::Utc::now().timestamp_millis()
}

impl Side for RabbitSide {
    type Msg = RabbitMsg;
    async fn is_processed(&self, key: &str, _position: &str) -> Result<bool, Error> {
        let p = self
            .shared
            .processed
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        Ok(p.keys.get(key).is_some_and(|&exp| exp > now_ms()))
    }
    async fn record_processed(&self, key: &str, _value: &str) -> Result<(), Error> {
        let s = &self.shared;
        s.processed
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .keys
            .insert(
                key.to_string(),
                now_ms() + s.processed_ttl.as_millis() as i64,
            );
        publish_confirmed(
            &s.out,
            "",
            &s.processed_stream,
            key.as_bytes(),
            BasicProperties::default()
                .with_delivery_mode(2)
                .with_timestamp(chrono::Utc::now().timestamp().max(0) as u64),
        )
        .await
    }
    async fn dead_letter(&self, msg: &RabbitMsg, headers: Headers) -> Result<(), Error> {
        let s = &self.shared;
        publish_confirmed(
            &s.out,
            &s.dead_letter_exchange,
            "",
            &msg.payload,
            props_with(&headers, &msg.position()),
        )
        .await
    }
}

/// Follows the processed-event stream from `now - ttl` into `processed` until `stop`.
async fn follow_processed(
    ch: Channel,
    stream: String,
    ttl: Duration,
    processed: Arc<Mutex<Processed>>,
    tag: String,
    owner: String,
) -> Result<(), Error> {
    // Only this consumer's records (`<consumer>.<sha256>`): other Microservices' are theirs.
    let prefix = format!("{owner}.");
    timed("basic.qos", ch.basic_qos(1000, BasicQosOptions::default())).await?;
    let mut args = FieldTable::default();
    args.insert(
        "x-stream-offset".into(),
        long(format!("{}s", ttl.as_secs().max(1))),
    );
    let mut consumer = timed(
        &format!("follow {stream}"),
        ch.basic_consume(
            stream.as_str().into(),
            ShortString::from(tag),
            BasicConsumeOptions::default(),
            args,
        ),
    )
    .await?;
    tokio::spawn(async move {
        let ttl_ms = ttl.as_millis() as i64;
        while let Some(Ok(d)) = consumer.next().await {
            let at_ms = d
                .properties
                .timestamp()
                .map(|t| t as i64 * 1000)
                .unwrap_or_else(now_ms);
            let key = String::from_utf8_lossy(&d.data).into_owned();
            {
                let mut p = processed.lock().unwrap_or_else(|e| e.into_inner());
                if let Some(m) = key.strip_prefix("marker:") {
                    p.markers.insert(m.to_string());
                } else if key.starts_with(&prefix) && at_ms + ttl_ms > now_ms() {
                    let e = p.keys.entry(key).or_insert(0);
                    *e = (*e).max(at_ms + ttl_ms);
                }
                if p.keys.len() > 100_000 && p.keys.len().is_power_of_two() {
                    let now = now_ms();
                    p.keys.retain(|_, exp| *exp > now);
                }
            }
            let _ = d.ack(BasicAckOptions::default()).await;
        }
    });
    Ok(())
}

/// Runs until `stop`: prefetch = maxInFlight, one task per delivery.
pub(crate) async fn run<H: Handler>(
    u: Endpoint,
    name: String,
    c: ConsumeConfig,
    mut stop: watch::Receiver<bool>,
    handler: Arc<H>,
) {
    let queue = c.queue.as_str();
    let slots = Slots::new(c.max_in_flight as usize);
    let ttl = Duration::from_millis(c.dedup_window_ms).max(MIN_DEDUP_TTL);
    let processed: Arc<Mutex<Processed>> = Arc::default();
    let mut delay = Duration::from_millis(100);
    'connect: loop {
        if *stop.borrow() {
            break;
        }
        let setup = async {
            let conn = connect(&u, &name).await?;
            declare_consumer(&conn, &c, ttl).await?;
            let out = timed("channel", conn.create_channel()).await?;
            timed(
                "confirm.select",
                out.confirm_select(ConfirmSelectOptions::default()),
            )
            .await?;
            let follow = timed("channel", conn.create_channel()).await?;
            let stream = processed_bucket(&c.stream);
            follow_processed(
                follow,
                stream.clone(),
                ttl,
                processed.clone(),
                format!("{name}-processed"),
                c.consumer.clone(),
            )
            .await?;
            // Read up to a marker of our own: every record older than now is then known.
            let marker = uuid::Uuid::new_v4().to_string();
            publish_confirmed(
                &out,
                "",
                &stream,
                format!("marker:{marker}").as_bytes(),
                BasicProperties::default().with_delivery_mode(2),
            )
            .await?;
            let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
            loop {
                if processed
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .markers
                    .remove(&marker)
                {
                    break;
                }
                if tokio::time::Instant::now() > deadline {
                    return Err(Error::Timeout(format!(
                        "the processed-event stream {stream} was not read back in 30 s"
                    )));
                }
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            let ch = timed("channel", conn.create_channel()).await?;
            timed(
                "basic.qos",
                ch.basic_qos(
                    c.max_in_flight.min(u16::MAX as u32) as u16,
                    BasicQosOptions::default(),
                ),
            )
            .await?;
            let q = consumer_queue(&c.stream, &c.consumer);
            let consumer = timed(
                &format!("consume {q}"),
                ch.basic_consume(
                    q.as_str().into(),
                    ShortString::from(name.clone()),
                    BasicConsumeOptions::default(),
                    FieldTable::default(),
                ),
            )
            .await?;
            let shared = Arc::new(Shared {
                out,
                queue: q,
                dead_letter_exchange: c.dead_letter_stream.clone(),
                processed_stream: stream,
                processed_ttl: ttl,
                processed: processed.clone(),
                declared_retry: Default::default(),
                conn,
            });
            Ok::<_, Error>((shared, ch, consumer))
        };
        let (shared, ch, mut consumer) = match setup.await {
            Ok(v) => {
                tracing::info!(queue, consumer = %c.consumer, "consuming");
                delay = Duration::from_millis(100);
                v
            }
            Err(e) => {
                if setup_failed(queue, &e, &mut stop, &mut delay, Duration::from_secs(2)).await {
                    break;
                }
                continue;
            }
        };
        let side = Arc::new(RabbitSide {
            shared: shared.clone(),
        });
        let cancel = || ch.basic_cancel(name.as_str().into(), BasicCancelOptions::default());
        loop {
            let Some(permit) = slots.one(&mut stop).await else {
                let _ = cancel().await;
                break 'connect;
            };
            let next = tokio::select! {
                _ = stopped(&mut stop) => {
                    let _ = cancel().await;
                    break 'connect;
                }
                n = consumer.next() => n,
            };
            match next {
                Some(Ok(d)) => {
                    let (handler, side, shared) = (handler.clone(), side.clone(), shared.clone());
                    tokio::spawn(async move {
                        handler
                            .deliver(side.as_ref(), RabbitMsg::new(d, shared))
                            .await;
                        drop(permit);
                    });
                }
                Some(Err(e)) => {
                    tracing::warn!(queue, error = %e, "consumer interrupted; reconnecting");
                    break;
                }
                None => {
                    tracing::warn!(queue, "consumer cancelled; reconnecting");
                    break;
                }
            }
        }
        let _ = shared.conn.close(200, "reconnecting".into()).await;
        if pause(&mut stop, &mut delay, Duration::from_secs(2)).await {
            break;
        }
    }
    slots.drain(queue, &c.consumer).await;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_and_arguments() {
        assert_eq!(
            consumer_queue("weir_shop_orders", "billing"),
            "weir_shop_orders.billing"
        );
        assert_eq!(
            retry_queue("weir_shop_orders.billing", 500),
            "weir_shop_orders.billing.retry.500"
        );
        let limits = QueueLimits {
            max_messages: Some(1000),
            max_age_ms: Some(60_000),
            ..Default::default()
        };
        let a = consumer_queue_args(5, "weir_shop_orders_dlq", &limits);
        let get = |k: &str| a.inner().get(k).cloned();
        assert_eq!(get("x-delivery-limit"), Some(AMQPValue::LongInt(5)));
        assert_eq!(get("x-dead-letter-strategy"), Some(long("at-least-once")));
        assert_eq!(get("x-overflow"), Some(long("reject-publish")));
        assert_eq!(get("x-max-length"), Some(AMQPValue::LongLongInt(1000)));
        assert_eq!(get("x-message-ttl"), Some(AMQPValue::LongLongInt(60_000)));
        assert!(
            get("x-max-length-bytes").is_none() && get("x-quorum-initial-group-size").is_none()
        );
        let none = consumer_queue_args(5, "", &QueueLimits::default());
        assert!(none.inner().get("x-dead-letter-exchange").is_none());
        let u = endpoint("amqp://127.0.0.1:5672/%2f", None).unwrap().uri;
        assert_eq!(u.vhost, "/");
    }
}
