//! The sidecar's role on NATS JetStream: a connection that reconnects for ever, publishing
//! with `Nats-Msg-Id` = event id (JetStream drops a repeat within the stream's duplicate window)
//! and the stream's ack, the durable pull consumer of each consumed queue, the processed-event
//! KV bucket and the dead-letter stream (names in docs/messaging.md). A stream, consumer or
//! bucket found absent is created (`weir up` and tests run without the operator); one that
//! exists is never changed.
//!
//! `credentials` names the Broker's credentials Secret as mounted (one file per key), in
//! one of two documented forms (docs/messaging.md, "Broker credentials"):
//! - a directory (what the operator renders: `/etc/weir/broker`) holding `creds` (a NATS
//!   `.creds` file: user JWT and NKey seed), or `token`, or `username` and `password`; the first
//!   present wins in that order;
//! - a NATS `.creds` file itself.
//!
//! The directory may also hold `ca.crt` (PEM), the trust root of a TLS connection to a broker
//! signed by a private CA ([`ca_file`]); without it the system's roots apply. A directory
//! holding only `ca.crt` means TLS without credentials.

use crate::credentials::{Auth, CA_KEY, Credentials, parse_ca};
use crate::queue::{processed_bucket, rewind_marker_key};
use crate::rewind::Marker;
use crate::transport::{
    API_TIMEOUT, Error, Handler, Headers, Inbound, MIN_DEDUP_TTL, Outgoing, PUBLISH_TIMEOUT,
    Published, Settle, Side, Slots, State, pause, reconnect_delay, setup_failed, stopped,
};
use async_nats::connection::State as ConnState;
use async_nats::jetstream::{
    self, AckKind,
    consumer::pull,
    context::{GetStreamErrorKind, KeyValueErrorKind, PublishErrorKind},
    kv,
    stream::StorageType,
};
use async_nats::{Client, ConnectOptions, Event};
use bytes::Bytes;
use futures::StreamExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::watch;
use weir_crds::proxy::{ConsumeConfig, PublishConfig};

/// The header JetStream deduplicates publishes by: the event id.
pub const NATS_MSG_ID: &str = "Nats-Msg-Id";
/// How long one pull request waits for messages.
pub const PULL_EXPIRES: Duration = Duration::from_secs(5);

/// The sidecar's NATS connection: the client, its JetStream context, and the task creating the
/// published queues' streams when they are absent.
pub struct NatsConn {
    client: Client,
    js: jetstream::Context,
    ensure: tokio::task::JoinHandle<()>,
    stop_ensure: watch::Sender<bool>,
}

impl NatsConn {
    /// Connects (see [`connect`]) and starts creating the streams of `publishes` that are
    /// absent.
    pub async fn open(
        url: &str,
        credentials: Option<&str>,
        name: &str,
        publishes: &[PublishConfig],
        on_state: impl Fn(bool) + Send + Sync + 'static,
    ) -> Result<NatsConn, Error> {
        let client = connect(url, credentials, name, on_state).await?;
        let mut js = jetstream::new(client.clone());
        js.set_timeout(API_TIMEOUT);
        let (stop_ensure, stop) = watch::channel(false);
        let ensure = tokio::spawn(ensure_streams(js.clone(), publishes.to_vec(), stop));
        Ok(NatsConn {
            client,
            js,
            ensure,
            stop_ensure,
        })
    }

    pub fn state(&self) -> State {
        match self.client.connection_state() {
            ConnState::Connected => State::Connected,
            ConnState::Pending => State::Connecting,
            _ => State::Disconnected,
        }
    }

    /// Publishes with `Nats-Msg-Id` = `id` and waits for the stream's ack.
    pub async fn publish(&self, e: Outgoing<'_>) -> Result<Published, Error> {
        let mut h = async_nats::HeaderMap::new();
        for (k, v) in e.headers {
            h.insert(k.as_str(), v.as_str());
        }
        h.insert(NATS_MSG_ID, e.id);
        publish_with_ack(&self.js, &e.target.subject, h, e.payload)
            .await
            .map(|ack| Published {
                duplicate: ack.duplicate,
                position: ack.sequence.into(),
            })
    }

    /// Acks and naks are buffered: flushes them so they reach the broker before the process
    /// exits, then drains the connection.
    pub async fn close(&self) {
        let _ = self.stop_ensure.send(true);
        self.ensure.abort();
        let _ = tokio::time::timeout(Duration::from_secs(2), self.client.flush()).await;
        let _ = tokio::time::timeout(Duration::from_secs(2), self.client.drain()).await;
    }
}

/// `ca.crt` of the credentials at `credentials` when it is a directory holding one, checked
/// to be PEM: its path and text. A NATS `.creds` file (the other form) has no CA beside it.
pub fn ca_file(credentials: Option<&str>) -> Result<Option<(PathBuf, String)>, Error> {
    let Some(dir) = credentials.map(Path::new).filter(|p| p.is_dir()) else {
        return Ok(None);
    };
    let f = dir.join(CA_KEY);
    if !f.exists() {
        return Ok(None);
    }
    let text = std::fs::read_to_string(&f)
        .map_err(|e| Error::Config(format!("cannot read {}: {e}", f.display())))?;
    parse_ca(&text, &f.display().to_string())?;
    Ok(Some((f, text)))
}

/// Trusts only `ca.crt` when the credentials hold one, and then requires TLS: a broker that
/// offers none would otherwise be talked to in plain text although a CA was given.
pub fn with_ca(opts: ConnectOptions, credentials: Option<&str>) -> Result<ConnectOptions, Error> {
    Ok(match ca_file(credentials)? {
        Some((path, _)) => opts.add_root_certificates(path).require_tls(true),
        None => opts,
    })
}

/// Applies the credentials found at `path` (see the module doc).
pub fn with_credentials(opts: ConnectOptions, path: &str) -> Result<ConnectOptions, Error> {
    let p = Path::new(path);
    let creds = |text: &str, from: &Path| {
        opts.clone().credentials(text).map_err(|e| {
            Error::Config(format!(
                "invalid NATS credentials file {}: {e}",
                from.display()
            ))
        })
    };
    if !p.is_dir() {
        let text = std::fs::read_to_string(p)
            .map_err(|e| Error::Config(format!("cannot read credentials file {path}: {e}")))?;
        if text.contains("BEGIN NATS USER JWT") {
            return creds(&text, p);
        }
        return Err(Error::Config(format!(
            "credentials file {path} is not a NATS .creds file (a Secret directory holding \
             `creds`, `token`, or `username` and `password` is the other accepted form)"
        )));
    }
    // A mounted Secret, read as everywhere else (`weir_broker::credentials`).
    match Credentials::from_dir(p)?.auth {
        Auth::Creds(text) => creds(&text, &p.join("creds")),
        Auth::Token(token) => Ok(opts.token(token)),
        Auth::UserPassword { username, password } => Ok(opts.user_and_password(username, password)),
        Auth::None => Ok(opts),
        Auth::Password(_) => Err(Error::Config(format!(
            "credentials directory {path} holds `password` without `username`: a password alone \
             is no NATS credential"
        ))),
    }
}

/// Connects to `url`, retrying and then reconnecting for ever (50 ms doubling up to 2 s).
/// `on_state` is told `true` on every (re)connection and `false` on every disconnection.
pub async fn connect(
    url: &str,
    credentials: Option<&str>,
    name: &str,
    on_state: impl Fn(bool) + Send + Sync + 'static,
) -> Result<Client, Error> {
    let on_state = std::sync::Arc::new(on_state);
    let last_error = std::sync::Arc::new(std::sync::Mutex::new(None::<String>));
    let mut opts = ConnectOptions::new()
        .name(name)
        .retry_on_initial_connect()
        .max_reconnects(None)
        .connection_timeout(Duration::from_secs(2))
        .reconnect_delay_callback(reconnect_delay)
        .event_callback(move |ev| {
            let (on_state, last_error) = (on_state.clone(), last_error.clone());
            async move {
                match ev {
                    Event::Connected => {
                        *last_error.lock().unwrap_or_else(|p| p.into_inner()) = None;
                        on_state(true);
                        tracing::info!("broker connected");
                    }
                    Event::Disconnected => {
                        on_state(false);
                        tracing::warn!("broker disconnected; reconnecting");
                    }
                    // A connection refused (TLS, authorization) comes as a client error: said
                    // once per distinct error, not at every retry.
                    Event::ClientError(e) => {
                        let e = e.to_string();
                        let mut last = last_error.lock().unwrap_or_else(|p| p.into_inner());
                        if last.as_ref() != Some(&e) {
                            tracing::warn!(error = %e, "cannot connect to the broker");
                            *last = Some(e);
                        }
                    }
                    other => tracing::debug!(event = %other, "broker event"),
                }
            }
        });
    if let Some(c) = credentials {
        opts = with_credentials(opts, c)?;
    }
    opts = with_ca(opts, credentials)?;
    opts.connect(url).await.map_err(|e| Error::Connect {
        to: weir_crds::redact::url(url),
        message: e.to_string(),
    })
}

/// Publishes and waits for the JetStream ack, bounded by [`PUBLISH_TIMEOUT`].
pub async fn publish_with_ack(
    js: &jetstream::Context,
    subject: &str,
    headers: async_nats::HeaderMap,
    payload: Bytes,
) -> Result<jetstream::publish::PublishAck, Error> {
    let fut = async {
        let ack = js
            .publish_with_headers(subject.to_string(), headers, payload)
            .await
            .map_err(|e| Error::broker(format!("publish failed: {e}")))?;
        ack.await.map_err(|e| match e.kind() {
            PublishErrorKind::StreamNotFound => Error::Unroutable(format!(
                "no stream accepts subject {subject:?} (is the queue declared?)"
            )),
            PublishErrorKind::TimedOut => {
                Error::Timeout("the broker did not acknowledge in time".into())
            }
            _ => Error::broker(format!("publish failed: {e}")),
        })
    };
    match tokio::time::timeout(PUBLISH_TIMEOUT, fut).await {
        Ok(r) => r,
        Err(_) => Err(Error::Timeout(format!(
            "the broker did not acknowledge within {} ms",
            PUBLISH_TIMEOUT.as_millis()
        ))),
    }
}

/// Creates the stream of each published queue when it is absent (`weir up` and tests run
/// without the operator); an existing stream is never changed. Retries until it succeeds.
async fn ensure_streams(
    js: jetstream::Context,
    publishes: Vec<PublishConfig>,
    mut stop: watch::Receiver<bool>,
) {
    for p in publishes {
        let mut delay = Duration::from_millis(100);
        loop {
            match ensure_stream(&js, &p.stream, &p.subject).await {
                Ok(()) => break,
                Err(e) => {
                    tracing::debug!(stream = %p.stream, error = %e, "cannot ensure stream yet");
                }
            }
            tokio::select! {
                _ = stop.wait_for(|s| *s) => return,
                _ = tokio::time::sleep(delay) => {}
            }
            delay = (delay * 2).min(Duration::from_secs(5));
        }
    }
}

/// Creates `stream` on `subject` (file storage, defaults otherwise) unless it exists.
pub async fn ensure_stream(
    js: &jetstream::Context,
    stream: &str,
    subject: &str,
) -> Result<(), Error> {
    match js.get_stream(stream).await {
        Ok(_) => Ok(()),
        Err(e)
            if matches!(e.kind(), GetStreamErrorKind::JetStream(je)
                if je.error_code() == jetstream::ErrorCode::STREAM_NOT_FOUND) =>
        {
            js.create_stream(jetstream::stream::Config {
                name: stream.to_string(),
                subjects: vec![subject.to_string()],
                storage: jetstream::stream::StorageType::File,
                ..Default::default()
            })
            .await
            .map(|_| tracing::info!(stream, subject, "stream created (was absent)"))
            .map_err(|e| Error::broker(format!("cannot create stream {stream}: {e}")))
        }
        Err(e) => Err(Error::broker(format!(
            "cannot look up stream {stream}: {e}"
        ))),
    }
}

struct Ready {
    consumer: jetstream::consumer::Consumer<pull::Config>,
    side: NatsSide,
}

/// The processed-event bucket, the consumer's rewind marker in it, and the dead-letter subject
/// of one consumer.
pub struct NatsSide {
    js: jetstream::Context,
    kv: kv::Store,
    marker_key: String,
    dead_letter_subject: String,
}

/// A JetStream message with its headers read once.
pub struct NatsMsg {
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
    async fn is_processed(&self, key: &str, position: &str) -> Result<bool, Error> {
        let entry = |key: &str| {
            let key = key.to_string();
            async move {
                self.kv
                    .entry(key)
                    .await
                    .map(|e| e.filter(|e| e.operation == kv::Operation::Put))
                    .map_err(|e| Error::broker(e.to_string()))
            }
        };
        let Some(record) = entry(key).await? else {
            return Ok(false);
        };
        // Only when a record is found (a duplicate, or an event delivered again by a rewind):
        // does the consumer's rewind marker, newer than the record, cover the message?
        let rewound = entry(&self.marker_key).await?.is_some_and(|m| {
            m.revision > record.revision
                && Marker::parse(&m.value).is_some_and(|m| m.covers(position))
        });
        Ok(!rewound)
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
                marker_key: rewind_marker_key(&c.consumer),
                dead_letter_subject: c.dead_letter_subject.clone(),
            },
        })
    }
}

/// Runs until `stop`: pulls at most `maxInFlight` messages at a time and hands each to
/// `handler`.
pub(crate) async fn run<H: Handler>(
    conn: Arc<NatsConn>,
    cfg: ConsumeConfig,
    mut stop: watch::Receiver<bool>,
    handler: Arc<H>,
) {
    let js = &conn.js;
    let queue = cfg.queue.as_str();
    let slots = Slots::new(cfg.max_in_flight as usize);
    let mut delay = Duration::from_millis(100);
    'setup: loop {
        if *stop.borrow() {
            break;
        }
        let ready = match setup(js, &cfg).await {
            Ok(r) => {
                tracing::info!(queue, consumer = %cfg.consumer, "consuming");
                delay = Duration::from_millis(100);
                Arc::new(r)
            }
            Err(e) => {
                if setup_failed(queue, &e, &mut stop, &mut delay, Duration::from_secs(5)).await {
                    break;
                }
                continue;
            }
        };
        let mut failures = 0u32;
        loop {
            let Some(mut permits) = slots.free(&mut stop).await else {
                break 'setup;
            };
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
                    tracing::warn!(queue, error = %e, "pull failed");
                    drop(permits);
                    if pause(&mut stop, &mut delay, Duration::from_secs(2)).await {
                        break 'setup;
                    }
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
                            let (handler, ready) = (handler.clone(), ready.clone());
                            tokio::spawn(async move {
                                handler.deliver(&ready.side, NatsMsg::new(msg)).await;
                                drop(permit);
                            });
                            if permits.is_empty() {
                                break;
                            }
                        }
                        Some(Err(e)) => {
                            failures += 1;
                            tracing::debug!(queue, error = %e, "pull interrupted");
                            break;
                        }
                        None => break,
                    }
                }
            }
            drop(permits);
            if failures >= 3 {
                if pause(&mut stop, &mut delay, Duration::from_secs(2)).await {
                    break 'setup;
                }
                continue 'setup;
            }
        }
    }
    slots.drain(queue, &cfg.consumer).await;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn credentials_forms() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().to_str().unwrap();
        assert!(
            with_credentials(ConnectOptions::new(), path).is_err(),
            "empty"
        );
        std::fs::write(dir.path().join("username"), "u").unwrap();
        assert!(
            with_credentials(ConnectOptions::new(), path).is_err(),
            "no password"
        );
        std::fs::write(dir.path().join("password"), "p").unwrap();
        assert!(with_credentials(ConnectOptions::new(), path).is_ok());
        std::fs::write(dir.path().join("token"), "s3cret\n").unwrap();
        assert!(with_credentials(ConnectOptions::new(), path).is_ok());
        std::fs::write(dir.path().join("creds"), "garbage").unwrap();
        assert!(
            with_credentials(ConnectOptions::new(), path).is_err(),
            "creds wins and is parsed"
        );
        let f = dir.path().join("token");
        assert!(with_credentials(ConnectOptions::new(), f.to_str().unwrap()).is_err());
        assert!(with_credentials(ConnectOptions::new(), "/nonexistent/creds").is_err());
    }

    #[test]
    fn a_ca_alone_is_tls_without_credentials_and_a_bad_one_names_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().to_str().unwrap();
        assert_eq!(
            ca_file(Some(path)).unwrap(),
            None,
            "no ca.crt: system roots"
        );
        std::fs::write(dir.path().join(CA_KEY), "not a certificate").unwrap();
        // The Secret is read once, ca.crt included: a bad one is refused naming the file,
        // whether the credentials or the CA are looked at first.
        let e = with_credentials(ConnectOptions::new(), path)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains(&format!("{path}/ca.crt")) && e.contains("not a PEM"),
            "{e}"
        );
        let e = ca_file(Some(path)).unwrap_err().to_string();
        assert!(
            e.contains(&format!("{path}/ca.crt")) && e.contains("not a PEM"),
            "{e}"
        );
        assert!(with_ca(ConnectOptions::new(), Some(path)).is_err());
    }
}
