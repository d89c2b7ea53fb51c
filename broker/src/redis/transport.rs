//! The sidecar's role on Redis Streams: a stream per queue, a consumer group per consuming Microservice, one consumer
//! per sidecar (`<hostname>-<admin port>`, stable across restarts of the same sidecar).
//!
//! - Publish: one Lua script drops a repeated event id (`SET NX` of `<stream>:published:<id>`
//!   for the duplicate window), `XADD`s the event (a field per header, the body in `data`),
//!   trims the stream (`MAXLEN ~` from `maxMessages`, `MINID ~` from `maxAge`) and answers the
//!   entry id. With `appendfsync always` the entry is on disk before the 202.
//! - Consume: `XREADGROUP >` for new entries (delivery 1), `XAUTOCLAIM` of entries another
//!   consumer left pending longer than the ack wait (a dead sidecar), the delivery count of a
//!   claimed entry from `XPENDING`. Ack and term are `XACK`. A nak with a delay keeps the entry
//!   pending: a timer touches it (`XCLAIM … JUSTID`, which resets its idle time without counting
//!   a delivery) every half ack wait so no one reclaims it, then claims it again (`XCLAIM`, which
//!   counts one). "Still working" is the same touch.
//! - Dead letters: `XADD` to the dead-letter stream; processed events: `SET <key> PX <ttl>` with
//!   the generation of the group's rewind marker beside the position, and a look-up reads the
//!   marker with the record (one Lua script each; [`crate::rewind`]).

use super::{CHECK_SCRIPT, RECORD_SCRIPT, published_key, record_counts, rewind_marker_record};
use crate::credentials::{CA_KEY, Credentials};
use crate::queue::processed_bucket;
use crate::transport::{
    API_TIMEOUT, Error, Handler, Headers, Inbound, MIN_DEDUP_TTL, Outgoing, PUBLISH_TIMEOUT,
    Published, Settle, Side, Slots, pause, setup_failed, stopped,
};
use bytes::Bytes;
use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use redis::{IntoConnectionInfo, Value};
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;
use tokio::sync::{mpsc, watch};
use weir_crds::proxy::ConsumeConfig;

/// The stream entry field holding the event's body; every other field is a header.
pub const DATA_FIELD: &str = "data";
/// How long one `XREADGROUP` waits for new entries (a retry that falls due waits at most this).
pub const READ_BLOCK: Duration = Duration::from_millis(200);
/// Most entries left pending by this consumer's earlier life that are claimed at start (the
/// rest are reclaimed after the ack wait).
pub const OWN_PENDING_MAX: usize = 10_000;
/// Duplicate window of a publish whose config names none.
pub const DEFAULT_DUPLICATE_WINDOW: Duration = Duration::from_secs(120);

const PUBLISH_SCRIPT: &str = r#"
local prev = redis.call('GET', KEYS[2])
if prev then return {1, prev} end
local args = {'XADD', KEYS[1]}
if ARGV[2] ~= '0' then
  table.insert(args, 'MAXLEN'); table.insert(args, '~'); table.insert(args, ARGV[2])
end
table.insert(args, '*')
for i = 4, #ARGV do table.insert(args, ARGV[i]) end
local id = redis.call(unpack(args))
if ARGV[3] ~= '' then redis.call('XTRIM', KEYS[1], 'MINID', '~', ARGV[3]) end
redis.call('SET', KEYS[2], id, 'PX', ARGV[1])
return {0, id}
"#;

/// Why a Redis call failed. The server's error code is kept, so the consumer tells a consumer
/// group that vanished under it (`NOGROUP`: it creates the group again) from a dropped
/// connection by the code, not by reading the message.
#[derive(Debug, thiserror::Error)]
pub enum CallError {
    #[error("the broker did not answer in time")]
    Timeout,
    #[error("{0}")]
    Redis(#[from] redis::RedisError),
}

impl CallError {
    /// The server's error code (`NOGROUP`, `BUSYGROUP`, ...), when it answered with one.
    pub fn code(&self) -> Option<&str> {
        match self {
            CallError::Redis(e) => e.code(),
            CallError::Timeout => None,
        }
    }
}

impl From<CallError> for Error {
    fn from(e: CallError) -> Error {
        match e {
            CallError::Timeout => Error::Timeout(e.to_string()),
            CallError::Redis(e) => Error::Broker {
                code: e.code().map(str::to_string),
                message: e.to_string(),
            },
        }
    }
}

/// Opens a client for `url` with the credentials at `credentials` (a Secret directory holding
/// `username` and `password`, or `password` alone, or `token`, used as the password; or only
/// `ca.crt`). A `ca.crt` there is the only root trusted for `rediss://`.
pub fn client(url: &str, credentials: Option<&str>) -> Result<redis::Client, Error> {
    let mut info = url.into_connection_info().map_err(|e| {
        Error::Config(format!(
            "messaging.brokerUrl: {:?} is not a Redis URL: {e}",
            weir_crds::redact::url(url)
        ))
    })?;
    let unusable = |e: redis::RedisError| {
        Error::Config(format!("cannot use {}: {e}", weir_crds::redact::url(url)))
    };
    // The Secret directory is read once: the credential and `ca.crt` (checked) together.
    let Some(dir) = credentials else {
        return redis::Client::open(info).map_err(unusable);
    };
    let creds = Credentials::from_dir(Path::new(dir))?;
    if let Some((user, pass)) = creds
        .redis_auth()
        .map_err(|e| Error::Config(format!("credentials directory {dir}: {e}")))?
    {
        let mut r = info.redis_settings().clone().set_password(pass);
        if let Some(u) = user {
            r = r.set_username(u);
        }
        info = info.set_redis_settings(r);
    }
    creds
        .require_tls_with_ca(
            url,
            "rediss",
            &Path::new(dir).join(CA_KEY).display().to_string(),
            &format!("messaging.brokerUrl {:?}", weir_crds::redact::url(url)),
        )
        .map_err(|e| Error::Config(e.0))?;
    match creds.ca {
        None => redis::Client::open(info),
        Some(pem) => {
            let certs = redis::TlsCertificates {
                client_tls: None,
                root_cert: Some(pem.into_bytes()),
            };
            redis::Client::build_with_tls(info, certs)
        }
    }
    .map_err(unusable)
}

fn manager(client: &redis::Client, response_timeout: Duration) -> Result<ConnectionManager, Error> {
    let cfg = ConnectionManagerConfig::new()
        .set_connection_timeout(Some(Duration::from_secs(2)))
        .set_response_timeout(Some(response_timeout))
        .set_number_of_retries(1)
        .set_min_delay(Duration::from_millis(50))
        .set_max_delay(Duration::from_secs(2));
    ConnectionManager::new_lazy_with_config(client.clone(), cfg)
        .map_err(|e| Error::broker(e.to_string()))
}

/// The sidecar's Redis connection (reconnecting on its own), with a health check that keeps
/// `connected` current.
pub struct RedisConn {
    client: redis::Client,
    con: ConnectionManager,
    connected: Arc<AtomicBool>,
    health: tokio::task::JoinHandle<()>,
    script: redis::Script,
}

impl RedisConn {
    pub fn open(
        url: &str,
        credentials: Option<&str>,
        on_state: impl Fn(bool) + Send + Sync + 'static,
    ) -> Result<RedisConn, Error> {
        let client = client(url, credentials)?;
        let con = manager(&client, API_TIMEOUT)?;
        let connected = Arc::new(AtomicBool::new(false));
        let (c2, flag) = (con.clone(), connected.clone());
        let health = tokio::spawn(async move {
            let mut con = c2;
            let mut last_error: Option<String> = None;
            loop {
                let ping = tokio::time::timeout(
                    Duration::from_secs(1),
                    redis::cmd("PING").query_async::<String>(&mut con),
                )
                .await;
                let error = match ping {
                    Ok(Ok(_)) => None,
                    Ok(Err(e)) => Some(e.to_string()),
                    Err(_) => Some("no answer to PING within 1 s".to_string()),
                };
                // Said once per distinct error (a refused TLS certificate, a wrong password).
                if let Some(e) = error.as_ref().filter(|e| last_error.as_ref() != Some(*e)) {
                    tracing::warn!(error = %e, "broker not usable");
                }
                let ok = error.is_none();
                last_error = error;
                if flag.swap(ok, Ordering::AcqRel) != ok {
                    on_state(ok);
                    if ok {
                        tracing::info!("broker connected");
                    } else {
                        tracing::warn!("broker disconnected; reconnecting");
                    }
                }
                tokio::time::sleep(Duration::from_millis(250)).await;
            }
        });
        Ok(RedisConn {
            client,
            con,
            connected,
            health,
            script: redis::Script::new(PUBLISH_SCRIPT),
        })
    }

    pub fn connected(&self) -> bool {
        self.connected.load(Ordering::Acquire)
    }

    pub fn close(&self) {
        self.health.abort();
    }

    /// `XADD`s the event unless its id was published within the duplicate window.
    pub async fn publish(&self, event: Outgoing<'_>) -> Result<Published, Error> {
        let target = event.target;
        let window = target
            .duplicate_window_ms
            .map(Duration::from_millis)
            .unwrap_or(DEFAULT_DUPLICATE_WINDOW)
            .max(Duration::from_millis(1));
        let min_id = target
            .max_age_ms
            .map(|age| {
                let now = chrono::Utc::now().timestamp_millis().max(0) as u64;
                now.saturating_sub(age).to_string()
            })
            .unwrap_or_default();
        let mut inv = self.script.prepare_invoke();
        inv.key(&target.stream)
            .key(published_key(&target.stream, event.id))
            .arg(window.as_millis() as u64)
            .arg(target.max_messages.unwrap_or(0))
            .arg(min_id);
        for (k, v) in event.headers {
            inv.arg(k.to_ascii_lowercase()).arg(v);
        }
        inv.arg(DATA_FIELD).arg(event.payload.as_ref());
        let mut con = self.con.clone();
        let r = tokio::time::timeout(PUBLISH_TIMEOUT, inv.invoke_async::<Value>(&mut con)).await;
        let v = match r {
            Err(_) => {
                return Err(Error::Timeout(format!(
                    "the broker did not acknowledge within {} ms",
                    PUBLISH_TIMEOUT.as_millis()
                )));
            }
            Ok(Err(e)) => {
                return Err(Error::Broker {
                    code: e.code().map(str::to_string),
                    message: format!("publish to {} failed: {e}", target.stream),
                });
            }
            Ok(Ok(v)) => v,
        };
        let a = arr(&v);
        match (a.first().and_then(int), a.get(1).and_then(text)) {
            (Some(dup), Some(entry)) => Ok(Published {
                duplicate: dup == 1,
                position: serde_json::Value::String(entry),
            }),
            _ => Err(Error::broker(format!(
                "unexpected answer to the publish: {v:?}"
            ))),
        }
    }
}

fn arr(v: &Value) -> &[Value] {
    match v {
        Value::Array(a) | Value::Set(a) => a,
        _ => &[],
    }
}

fn text(v: &Value) -> Option<String> {
    match v {
        Value::BulkString(b) => Some(String::from_utf8_lossy(b).into_owned()),
        Value::SimpleString(s) => Some(s.clone()),
        Value::Int(i) => Some(i.to_string()),
        Value::Okay => Some("OK".into()),
        _ => None,
    }
}

fn int(v: &Value) -> Option<i64> {
    match v {
        Value::Int(i) => Some(*i),
        Value::BulkString(b) => std::str::from_utf8(b).ok()?.parse().ok(),
        _ => None,
    }
}

/// A stream entry: its id, headers and body.
#[derive(Debug, Clone)]
pub struct Entry {
    pub id: String,
    pub headers: Headers,
    pub data: Bytes,
}

/// Parses `[id, [field, value, ...]]`; `None` for a deleted entry (nil fields).
pub fn parse_entry(v: &Value) -> Option<Entry> {
    let a = arr(v);
    let id = text(a.first()?)?;
    let fields = arr(a.get(1)?);
    if fields.is_empty() {
        return None;
    }
    let mut headers = Headers::new();
    let mut data = Bytes::new();
    for kv in fields.chunks(2) {
        let (Some(k), Some(v)) = (kv.first().and_then(text), kv.get(1)) else {
            continue;
        };
        if k == DATA_FIELD {
            if let Value::BulkString(b) = v {
                data = Bytes::copy_from_slice(b);
            }
        } else if let Some(v) = text(v) {
            headers.push((k, v));
        }
    }
    Some(Entry { id, headers, data })
}

/// Every entry of a reply that is a list of entries.
pub fn parse_entries(v: &Value) -> Vec<Entry> {
    arr(v).iter().filter_map(parse_entry).collect()
}

/// What one consumer shares with its messages.
pub struct Shared {
    con: ConnectionManager,
    stream: String,
    group: String,
    me: String,
    ack_wait: Duration,
    retry_tx: mpsc::UnboundedSender<String>,
    stop: watch::Receiver<bool>,
    dead_letter_stream: String,
    processed_prefix: String,
    processed_ttl: Duration,
    /// The group's rewind marker ([`crate::rewind`]).
    marker_key: String,
    record_script: redis::Script,
    check_script: redis::Script,
}

impl Shared {
    async fn query<T: redis::FromRedisValue>(&self, cmd: &redis::Cmd) -> Result<T, CallError> {
        let mut con = self.con.clone();
        match tokio::time::timeout(API_TIMEOUT, cmd.query_async::<T>(&mut con)).await {
            Ok(r) => Ok(r?),
            Err(_) => Err(CallError::Timeout),
        }
    }

    async fn invoke<T: redis::FromRedisValue>(
        &self,
        inv: &redis::ScriptInvocation<'_>,
    ) -> Result<T, CallError> {
        let mut con = self.con.clone();
        match tokio::time::timeout(API_TIMEOUT, inv.invoke_async::<T>(&mut con)).await {
            Ok(r) => Ok(r?),
            Err(_) => Err(CallError::Timeout),
        }
    }

    /// Resets the entry's idle time without counting a delivery.
    async fn touch(&self, id: &str) -> Result<(), CallError> {
        self.query::<Value>(
            redis::cmd("XCLAIM")
                .arg(&self.stream)
                .arg(&self.group)
                .arg(&self.me)
                .arg(0)
                .arg(id)
                .arg("JUSTID"),
        )
        .await
        .map(|_| ())
    }

    /// How many times `id` was delivered (from `XPENDING`); 1 when unknown.
    async fn delivery_count(&self, id: &str) -> u64 {
        match self
            .query::<Value>(
                redis::cmd("XPENDING")
                    .arg(&self.stream)
                    .arg(&self.group)
                    .arg(id)
                    .arg(id)
                    .arg(1),
            )
            .await
        {
            Ok(v) => arr(&v)
                .first()
                .and_then(|e| arr(e).get(3).and_then(int))
                .map_or(1, |n| n.max(1) as u64),
            Err(_) => 1,
        }
    }
}

pub struct RedisMsg {
    entry: Entry,
    delivered: u64,
    shared: Arc<Shared>,
}

impl Inbound for RedisMsg {
    fn payload(&self) -> &Bytes {
        &self.entry.data
    }
    fn headers(&self) -> &Headers {
        &self.entry.headers
    }
    fn delivered(&self) -> u64 {
        self.delivered
    }
    fn position(&self) -> String {
        self.entry.id.clone()
    }
    fn origin(&self) -> &str {
        &self.shared.stream
    }
    fn identity(&self) -> Option<String> {
        // `<ms>-<n>`: they only grow, and a stream deleted and written again starts at the
        // current time, so an id is not repeated while a processed-event record may hold it.
        Some(self.entry.id.clone())
    }
    async fn requeue_with_identity(&self, _identity: &str) -> Result<(), Error> {
        Err(Error::Unsupported(
            "a Redis stream entry always has an identity (its entry id)",
        ))
    }
    async fn settle(&self, how: Settle) -> Result<(), Error> {
        let s = &self.shared;
        match how {
            Settle::Ack | Settle::Term => s
                .query::<i64>(
                    redis::cmd("XACK")
                        .arg(&s.stream)
                        .arg(&s.group)
                        .arg(&self.entry.id),
                )
                .await
                .map(|_| ())
                .map_err(Error::from),
            Settle::Nak(delay) => {
                let (s, id) = (self.shared.clone(), self.entry.id.clone());
                let delay = delay.unwrap_or_default();
                tokio::spawn(async move {
                    let mut stop = s.stop.clone();
                    let until = tokio::time::Instant::now() + delay;
                    let every = (s.ack_wait / 2).max(Duration::from_millis(50));
                    loop {
                        let now = tokio::time::Instant::now();
                        if now >= until {
                            break;
                        }
                        let step = (until - now).min(every);
                        tokio::select! {
                            _ = stopped(&mut stop) => return,
                            _ = tokio::time::sleep(step) => {}
                        }
                        if tokio::time::Instant::now() < until {
                            let _ = s.touch(&id).await;
                        }
                    }
                    let _ = s.retry_tx.send(id);
                });
                Ok(())
            }
        }
    }
    async fn progress(&self) {
        let _ = self.shared.touch(&self.entry.id).await;
    }
}

pub struct RedisSide {
    shared: Arc<Shared>,
}

impl Side for RedisSide {
    type Msg = RedisMsg;
    /// The record and the group's rewind marker in one call ([`CHECK_SCRIPT`]).
    async fn is_processed(&self, key: &str, position: &str) -> Result<bool, Error> {
        let s = &self.shared;
        let mut inv = s.check_script.prepare_invoke();
        inv.key(format!("{}:{key}", s.processed_prefix))
            .key(&s.marker_key);
        let found: Vec<String> = s.invoke(&inv).await?;
        Ok(match found.as_slice() {
            [] => false,
            [record, rest @ ..] => {
                record_counts(record, rest.first().map(String::as_str), position)
            }
        })
    }
    /// `<value> <generation of the rewind marker>` ([`RECORD_SCRIPT`]).
    async fn record_processed(&self, key: &str, value: &str) -> Result<(), Error> {
        let s = &self.shared;
        let mut inv = s.record_script.prepare_invoke();
        inv.key(format!("{}:{key}", s.processed_prefix))
            .key(&s.marker_key)
            .arg(value)
            .arg(s.processed_ttl.as_millis() as u64);
        s.invoke::<Value>(&inv)
            .await
            .map(|_| ())
            .map_err(Error::from)
    }
    async fn dead_letter(&self, msg: &RedisMsg, headers: Headers) -> Result<(), Error> {
        let s = &self.shared;
        let mut cmd = redis::cmd("XADD");
        cmd.arg(&s.dead_letter_stream).arg("*");
        for (k, v) in &headers {
            cmd.arg(k.to_ascii_lowercase()).arg(v);
        }
        cmd.arg(DATA_FIELD).arg(msg.entry.data.as_ref());
        s.query::<String>(&cmd)
            .await
            .map(|_| ())
            .map_err(Error::from)
    }
}

/// Creates the consumer group (reading from the stream's start) unless it exists.
pub async fn ensure_group(
    con: &mut ConnectionManager,
    stream: &str,
    group: &str,
) -> Result<(), Error> {
    let r = redis::cmd("XGROUP")
        .arg("CREATE")
        .arg(stream)
        .arg(group)
        .arg("0")
        .arg("MKSTREAM")
        .query_async::<Value>(con)
        .await;
    match r {
        Ok(_) => {
            tracing::info!(stream, group, "consumer group created (was absent)");
            Ok(())
        }
        Err(e) if e.code() == Some("BUSYGROUP") => Ok(()),
        Err(e) => Err(Error::Broker {
            code: e.code().map(str::to_string),
            message: format!("consumer group {group} on {stream}: {e}"),
        }),
    }
}

/// Runs until `stop`, as consumer `me` of the group: at most `maxInFlight` entries handed to
/// `handler` at a time.
pub(crate) async fn run<H: Handler>(
    conn: Arc<RedisConn>,
    c: ConsumeConfig,
    me: String,
    mut stop: watch::Receiver<bool>,
    handler: Arc<H>,
) {
    let queue = c.queue.as_str();
    let slots = Slots::new(c.max_in_flight as usize);
    let (retry_tx, mut retry_rx) = mpsc::unbounded_channel::<String>();
    let ack_wait = Duration::from_millis(c.ack_wait_ms.max(100));
    let shared = Arc::new(Shared {
        con: conn.con.clone(),
        stream: c.stream.clone(),
        group: c.consumer.clone(),
        me: me.clone(),
        ack_wait,
        retry_tx,
        stop: stop.clone(),
        dead_letter_stream: c.dead_letter_stream.clone(),
        processed_prefix: processed_bucket(&c.stream),
        processed_ttl: Duration::from_millis(c.dedup_window_ms).max(MIN_DEDUP_TTL),
        marker_key: rewind_marker_record(&c.stream, &c.consumer),
        record_script: redis::Script::new(RECORD_SCRIPT),
        check_script: redis::Script::new(CHECK_SCRIPT),
    });
    let side = Arc::new(RedisSide {
        shared: shared.clone(),
    });
    // Blocking reads get a connection of their own (they would hold up everything else).
    let reader = match manager(&conn.client, READ_BLOCK + API_TIMEOUT) {
        Ok(r) => r,
        Err(e) => {
            tracing::error!(queue, error = %e, "cannot open the reading connection");
            return;
        }
    };
    let mut delay = Duration::from_millis(100);
    let mut ready = false;
    let mut last_reclaim = tokio::time::Instant::now() - ack_wait;
    // Entries this consumer left pending in an earlier life are claimed at once.
    let mut own: Option<std::collections::VecDeque<String>> = None;
    loop {
        if *stop.borrow() {
            break;
        }
        if !ready {
            let mut con = conn.con.clone();
            match ensure_group(&mut con, &c.stream, &c.consumer).await {
                Ok(()) => {
                    tracing::info!(queue, group = %c.consumer, consumer = %me, "consuming");
                    ready = true;
                    delay = Duration::from_millis(100);
                }
                Err(e) => {
                    if setup_failed(queue, &e, &mut stop, &mut delay, Duration::from_secs(2)).await
                    {
                        break;
                    }
                    continue;
                }
            }
        }
        let Some(mut permits) = slots.free(&mut stop).await else {
            break;
        };
        let got = fetch(
            &shared,
            &reader,
            &mut retry_rx,
            permits.len(),
            &mut last_reclaim,
            &mut own,
        )
        .await;
        let entries = match got {
            Ok(e) => {
                delay = Duration::from_millis(100);
                e
            }
            Err(e) => {
                tracing::warn!(queue, error = %e, "read failed");
                drop(permits);
                if e.code() == Some("NOGROUP") {
                    ready = false;
                }
                if pause(&mut stop, &mut delay, Duration::from_secs(2)).await {
                    break;
                }
                continue;
            }
        };
        for (entry, delivered) in entries {
            let Some(permit) = permits.pop() else { break };
            let (handler, side, shared) = (handler.clone(), side.clone(), shared.clone());
            tokio::spawn(async move {
                let msg = RedisMsg {
                    entry,
                    delivered,
                    shared,
                };
                handler.deliver(side.as_ref(), msg).await;
                drop(permit);
            });
        }
        drop(permits);
    }
    slots.drain(queue, &c.consumer).await;
}

/// Up to `n` entries with their delivery counts: retries that fell due, entries left pending
/// past the ack wait (every half ack wait), then new ones.
async fn fetch(
    s: &Shared,
    reader: &ConnectionManager,
    retry_rx: &mut mpsc::UnboundedReceiver<String>,
    n: usize,
    last_reclaim: &mut tokio::time::Instant,
    own: &mut Option<std::collections::VecDeque<String>>,
) -> Result<Vec<(Entry, u64)>, CallError> {
    let own = match own {
        Some(o) => o,
        None => {
            let v: Value = s
                .query(
                    redis::cmd("XPENDING")
                        .arg(&s.stream)
                        .arg(&s.group)
                        .arg("-")
                        .arg("+")
                        .arg(OWN_PENDING_MAX)
                        .arg(&s.me),
                )
                .await?;
            own.insert(
                arr(&v)
                    .iter()
                    .filter_map(|e| arr(e).first().and_then(text))
                    .collect(),
            )
        }
    };
    let mut ids = Vec::new();
    while ids.len() < n
        && let Some(id) = own.pop_front()
    {
        ids.push(id);
    }
    while ids.len() < n {
        match retry_rx.try_recv() {
            Ok(id) => ids.push(id),
            Err(_) => break,
        }
    }
    let mut out = Vec::new();
    if !ids.is_empty() {
        let mut cmd = redis::cmd("XCLAIM");
        cmd.arg(&s.stream).arg(&s.group).arg(&s.me).arg(0);
        for id in &ids {
            cmd.arg(id);
        }
        let v: Value = s.query(&cmd).await?;
        out.extend(parse_entries(&v));
    }
    if out.len() < n && last_reclaim.elapsed() >= s.ack_wait / 2 {
        *last_reclaim = tokio::time::Instant::now();
        let v: Value = s
            .query(
                redis::cmd("XAUTOCLAIM")
                    .arg(&s.stream)
                    .arg(&s.group)
                    .arg(&s.me)
                    .arg(s.ack_wait.as_millis() as u64)
                    .arg("0-0")
                    .arg("COUNT")
                    .arg(n - out.len()),
            )
            .await?;
        let claimed = parse_entries(arr(&v).get(1).unwrap_or(&Value::Nil));
        if !claimed.is_empty() {
            tracing::info!(
                stream = %s.stream,
                group = %s.group,
                count = claimed.len(),
                "reclaimed entries left pending past the ack wait"
            );
        }
        out.extend(claimed);
    }
    let mut with_counts = Vec::with_capacity(out.len());
    for e in out {
        let d = s.delivery_count(&e.id).await;
        with_counts.push((e, d));
    }
    if with_counts.len() < n {
        let mut con = reader.clone();
        let v: Value = redis::cmd("XREADGROUP")
            .arg("GROUP")
            .arg(&s.group)
            .arg(&s.me)
            .arg("COUNT")
            .arg(n - with_counts.len())
            .arg("BLOCK")
            .arg(READ_BLOCK.as_millis() as u64)
            .arg("STREAMS")
            .arg(&s.stream)
            .arg(">")
            .query_async(&mut con)
            .await?;
        for stream in arr(&v) {
            for e in parse_entries(arr(stream).get(1).unwrap_or(&Value::Nil)) {
                with_counts.push((e, 1));
            }
        }
    }
    Ok(with_counts)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::redis::processed_record;

    #[test]
    fn entries_parse() {
        let b = |s: &str| Value::BulkString(s.as_bytes().to_vec());
        let v = Value::Array(vec![
            Value::Array(vec![
                b("1-0"),
                Value::Array(vec![b("ce-id"), b("e-1"), b("data"), b("{}")]),
            ]),
            Value::Array(vec![b("2-0"), Value::Nil]),
        ]);
        let e = parse_entries(&v);
        assert_eq!(e.len(), 1, "a deleted entry is skipped");
        assert_eq!(e[0].id, "1-0");
        assert_eq!(e[0].headers, vec![("ce-id".to_string(), "e-1".to_string())]);
        assert_eq!(&e[0].data[..], b"{}");
        assert_eq!(
            processed_record("weir_shop_orders", "billing.ab"),
            "weir_processed_shop_orders:billing.ab"
        );
        assert_eq!(
            published_key("weir_shop_orders", "e-1"),
            "weir_shop_orders:published:e-1"
        );
    }
}
