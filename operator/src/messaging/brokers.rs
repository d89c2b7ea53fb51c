//! A Queue's topology on each Broker kind, behind one type ([`BrokerAdmin`]) the Queue and Broker
//! controllers, `weir dlq` and `weir up` use. JetStream is [`super::NatsAdmin`]; this module adds
//! Redis Streams and RabbitMQ with the names of docs/messaging.md:
//!
//! - **Redis**: the stream `weir_<ns>_<q>` (trimmed at each reconcile to `maxMessages`/`maxAge`;
//!   the sidecars trim at each publish too), a consumer group per consuming Microservice
//!   (created at the stream's start; the groups the operator made are listed in the set
//!   `weir_<ns>_<q>:managed-groups`), the dead-letter stream `weir_<ns>_<q>_dlq`.
//! - **RabbitMQ**: the topic exchange `weir_<ns>_<q>`, the dead-letter fanout exchange and
//!   quorum queue `weir_<ns>_<q>_dlq`, the processed-event stream queue
//!   `weir_processed_<ns>_<q>`, and per consuming Microservice the quorum queue
//!   `weir_<ns>_<q>.<ms>` bound with `#`. A queue's arguments cannot change once it exists
//!   (RabbitMQ refuses the redeclaration): the operator then reports [`Error::Immutable`] naming
//!   the argument, and the queue must be deleted to be recreated.

use super::{Credentials, Error, Figures, NatsAdmin, Topology};
use lapin::options::*;
use lapin::types::FieldTable;
use redis::Value;
use std::collections::BTreeMap;
use std::time::Duration;
use weir_broker::rabbitmq;
use weir_crds::broker::BrokerKind;

/// The operator's connection to a broker of any kind, for administering Queues on it.
#[derive(Clone)]
#[allow(clippy::large_enum_variant)] // a few per operator, cached
pub enum BrokerAdmin {
    Nats(NatsAdmin),
    Redis(RedisBroker),
    Rabbitmq(RabbitBroker),
}

/// Connects once to a broker of `kind` (no retry loop: callers requeue).
pub async fn connect(
    kind: BrokerKind,
    url: &str,
    creds: &Credentials,
) -> Result<BrokerAdmin, Error> {
    match kind {
        BrokerKind::Nats => super::connect(url, creds).await.map(BrokerAdmin::Nats),
        BrokerKind::Redis => RedisBroker::connect(url, creds)
            .await
            .map(BrokerAdmin::Redis),
        BrokerKind::Rabbitmq => RabbitBroker::connect(url, creds)
            .await
            .map(BrokerAdmin::Rabbitmq),
    }
}

/// The kind a URL's scheme names (`nats://`, `amqp://`, `redis://` and their TLS forms).
pub fn kind_of_url(url: &str) -> Option<BrokerKind> {
    let scheme = url.split("://").next()?;
    [BrokerKind::Nats, BrokerKind::Rabbitmq, BrokerKind::Redis]
        .into_iter()
        .find(|k| k.schemes().contains(&scheme))
}

fn other(what: impl Into<String>, e: impl std::fmt::Display) -> Error {
    Error::Broker {
        what: what.into(),
        message: e.to_string(),
    }
}

impl BrokerAdmin {
    pub fn kind(&self) -> BrokerKind {
        match self {
            BrokerAdmin::Nats(_) => BrokerKind::Nats,
            BrokerAdmin::Redis(_) => BrokerKind::Redis,
            BrokerAdmin::Rabbitmq(_) => BrokerKind::Rabbitmq,
        }
    }

    /// The JetStream connection, for what only JetStream does (saga logs).
    pub fn nats(&self) -> Option<&NatsAdmin> {
        match self {
            BrokerAdmin::Nats(b) => Some(b),
            _ => None,
        }
    }

    /// Whether the cached connection can still be used.
    pub fn is_connected(&self) -> bool {
        match self {
            BrokerAdmin::Nats(b) => {
                b.client().connection_state() == async_nats::connection::State::Connected
            }
            BrokerAdmin::Redis(_) => true, // the connection manager reconnects by itself
            BrokerAdmin::Rabbitmq(r) => r.conn.status().connected(),
        }
    }

    pub async fn server_version(&self) -> String {
        match self {
            BrokerAdmin::Nats(b) => b.server_version(),
            BrokerAdmin::Redis(r) => r.server_version().await,
            BrokerAdmin::Rabbitmq(r) => r.server_version(),
        }
    }

    pub async fn declare_queue(&self, t: &Topology) -> Result<(), Error> {
        match self {
            BrokerAdmin::Nats(b) => b.declare_queue(t).await,
            BrokerAdmin::Redis(r) => r.declare_queue(t).await,
            BrokerAdmin::Rabbitmq(r) => r.declare_queue(t).await,
        }
    }

    pub async fn declare_consumer(&self, t: &Topology, microservice: &str) -> Result<(), Error> {
        match self {
            BrokerAdmin::Nats(b) => b.declare_consumer(t, microservice).await,
            BrokerAdmin::Redis(r) => r.declare_consumer(t, microservice).await,
            BrokerAdmin::Rabbitmq(r) => r.declare_consumer(t, microservice).await,
        }
    }

    /// The consumers the operator manages on this Queue. RabbitMQ cannot list the queues bound
    /// to an exchange: there, `known` (the consumers the Queue's status last reported) that
    /// still exist.
    pub async fn managed_consumers(
        &self,
        t: &Topology,
        known: &[String],
    ) -> Result<Vec<String>, Error> {
        match self {
            BrokerAdmin::Nats(b) => b.managed_consumers(t).await,
            BrokerAdmin::Redis(r) => r.managed_consumers(t).await,
            BrokerAdmin::Rabbitmq(r) => {
                let mut out = Vec::new();
                for k in known {
                    if r.queue_depth(&r_queue(t, k)).await?.is_some() {
                        out.push(k.clone());
                    }
                }
                Ok(out)
            }
        }
    }

    pub async fn delete_consumer(&self, t: &Topology, name: &str) -> Result<bool, Error> {
        match self {
            BrokerAdmin::Nats(b) => b.delete_consumer(t, name).await,
            BrokerAdmin::Redis(r) => r.delete_consumer(t, name).await,
            BrokerAdmin::Rabbitmq(r) => r.delete_consumer(t, name).await,
        }
    }

    pub async fn figures(&self, t: &Topology, consumers: &[String]) -> Result<Figures, Error> {
        match self {
            BrokerAdmin::Nats(b) => b.figures(t, consumers).await,
            BrokerAdmin::Redis(r) => r.figures(t, consumers).await,
            BrokerAdmin::Rabbitmq(r) => r.figures(t, consumers).await,
        }
    }

    /// Deletes everything of the Queue; `consumers` are those known (RabbitMQ cannot list them).
    pub async fn delete_queue(&self, t: &Topology, consumers: &[String]) -> Result<(), Error> {
        match self {
            BrokerAdmin::Nats(b) => b.delete_queue(t).await,
            BrokerAdmin::Redis(r) => r.delete_queue(t).await,
            BrokerAdmin::Rabbitmq(r) => r.delete_queue(t, consumers).await,
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Redis

/// A Redis connection (reconnecting by itself).
#[derive(Clone)]
pub struct RedisBroker {
    con: redis::aio::ConnectionManager,
}

pub use weir_broker::redis::managed_groups_key;

fn text(v: &Value) -> Option<String> {
    match v {
        Value::BulkString(b) => Some(String::from_utf8_lossy(b).into_owned()),
        Value::SimpleString(s) => Some(s.clone()),
        Value::Int(i) => Some(i.to_string()),
        _ => None,
    }
}

/// A flat `[name, value, ...]` reply (or a RESP3 map) as a map of strings.
fn flat_map(v: &Value) -> BTreeMap<String, String> {
    match v {
        Value::Array(a) => a
            .chunks(2)
            .filter(|kv| kv.len() == 2)
            .filter_map(|kv| Some((text(&kv[0])?, text(&kv[1]).unwrap_or_default())))
            .collect(),
        Value::Map(m) => m
            .iter()
            .filter_map(|(k, v)| Some((text(k)?, text(v).unwrap_or_default())))
            .collect(),
        _ => BTreeMap::new(),
    }
}

impl RedisBroker {
    /// The client for `info`: over TLS trusting only the credentials' `ca.crt` when there is
    /// one (and then the URL must be `rediss://`), else as the URL says.
    fn client(
        url: &str,
        info: redis::ConnectionInfo,
        creds: &Credentials,
    ) -> Result<redis::Client, Error> {
        let Some(pem) = &creds.ca else {
            return redis::Client::open(info).map_err(|e| other("Redis client", e));
        };
        if !url.starts_with("rediss://") {
            return Err(Error::Credentials(format!(
                "key \"{}\" is given but the URL is not TLS (use rediss://)",
                super::CA_KEY
            )));
        }
        let certs = redis::TlsCertificates {
            client_tls: None,
            root_cert: Some(pem.clone().into_bytes()),
        };
        redis::Client::build_with_tls(info, certs).map_err(|e| other("Redis TLS client", e))
    }

    pub async fn connect(url: &str, creds: &Credentials) -> Result<RedisBroker, Error> {
        use redis::IntoConnectionInfo;
        let bad = |m: String| Error::Connect {
            url: weir_crds::redact::url(url),
            message: m,
        };
        let mut info = url
            .into_connection_info()
            .map_err(|e| bad(format!("not a Redis URL: {e}")))?;
        let (user, pass) = match creds.redis_auth()? {
            Some((user, pass)) => (user, Some(pass)),
            None => (None, None),
        };
        if let Some(p) = pass {
            let mut r = info.redis_settings().clone().set_password(p);
            if let Some(u) = user {
                r = r.set_username(u);
            }
            info = info.set_redis_settings(r);
        }
        let client = Self::client(url, info, creds).map_err(|e| bad(e.to_string()))?;
        let cfg = redis::aio::ConnectionManagerConfig::new()
            .set_connection_timeout(Some(super::CONNECT_TIMEOUT))
            .set_response_timeout(Some(super::CONNECT_TIMEOUT))
            .set_number_of_retries(1);
        let con = tokio::time::timeout(
            super::CONNECT_TIMEOUT * 2,
            redis::aio::ConnectionManager::new_with_config(client, cfg),
        )
        .await
        .map_err(|_| bad("timed out".into()))?
        .map_err(|e| bad(e.to_string()))?;
        Ok(RedisBroker { con })
    }

    async fn q<T: redis::FromRedisValue>(
        &self,
        what: impl Into<String>,
        cmd: &redis::Cmd,
    ) -> Result<T, Error> {
        let mut con = self.con.clone();
        cmd.query_async(&mut con).await.map_err(|e| other(what, e))
    }

    pub async fn server_version(&self) -> String {
        let info: String = self
            .q("INFO server", redis::cmd("INFO").arg("server"))
            .await
            .unwrap_or_default();
        info.lines()
            .find_map(|l| l.strip_prefix("redis_version:"))
            .unwrap_or("unknown")
            .trim()
            .to_string()
    }

    /// Redis streams need no declaration; the stream is trimmed to the spec's retention.
    pub async fn declare_queue(&self, t: &Topology) -> Result<(), Error> {
        let s = t.stream_name();
        // Exact trimming here (the sidecars trim approximately, `~`, at each publish).
        if t.stream.max_messages > 0 {
            self.q::<Value>(
                format!("XTRIM {s}"),
                redis::cmd("XTRIM")
                    .arg(s)
                    .arg("MAXLEN")
                    .arg(t.stream.max_messages),
            )
            .await?;
        }
        if !t.stream.max_age.is_zero() {
            let min = chrono::Utc::now().timestamp_millis()
                - i64::try_from(t.stream.max_age.as_millis()).unwrap_or(i64::MAX);
            self.q::<Value>(
                format!("XTRIM {s}"),
                redis::cmd("XTRIM").arg(s).arg("MINID").arg(min.max(0)),
            )
            .await?;
        }
        if let Some(d) = &t.dead_letter
            && !d.max_age.is_zero()
        {
            let min = chrono::Utc::now().timestamp_millis()
                - i64::try_from(d.max_age.as_millis()).unwrap_or(i64::MAX);
            self.q::<Value>(
                format!("XTRIM {}", d.name),
                redis::cmd("XTRIM")
                    .arg(&d.name)
                    .arg("MINID")
                    .arg("~")
                    .arg(min.max(0)),
            )
            .await?;
        }
        Ok(())
    }

    /// Creates the consumer group (from the stream's start) unless it exists.
    pub async fn declare_consumer(&self, t: &Topology, ms: &str) -> Result<(), Error> {
        let s = t.stream_name();
        let mut con = self.con.clone();
        let r = redis::cmd("XGROUP")
            .arg("CREATE")
            .arg(s)
            .arg(ms)
            .arg("0")
            .arg("MKSTREAM")
            .query_async::<Value>(&mut con)
            .await;
        match r {
            Ok(_) => {}
            Err(e) if e.code() == Some("BUSYGROUP") => {}
            Err(e) => return Err(other(format!("consumer group {ms} on stream {s}"), e)),
        }
        self.q::<Value>(
            format!("SADD {}", managed_groups_key(s)),
            redis::cmd("SADD").arg(managed_groups_key(s)).arg(ms),
        )
        .await?;
        Ok(())
    }

    pub async fn managed_consumers(&self, t: &Topology) -> Result<Vec<String>, Error> {
        let key = managed_groups_key(t.stream_name());
        let mut v: Vec<String> = self
            .q(format!("SMEMBERS {key}"), redis::cmd("SMEMBERS").arg(&key))
            .await?;
        v.sort();
        Ok(v)
    }

    pub async fn delete_consumer(&self, t: &Topology, ms: &str) -> Result<bool, Error> {
        let s = t.stream_name();
        let mut con = self.con.clone();
        let r = redis::cmd("XGROUP")
            .arg("DESTROY")
            .arg(s)
            .arg(ms)
            .query_async::<i64>(&mut con)
            .await;
        self.q::<Value>(
            "SREM",
            redis::cmd("SREM").arg(managed_groups_key(s)).arg(ms),
        )
        .await?;
        match r {
            Ok(n) => Ok(n > 0),
            Err(e) if e.to_string().contains("no such key") => Ok(false),
            Err(e) => Err(other(format!("consumer group {ms} on stream {s}"), e)),
        }
    }

    async fn len(&self, key: &str) -> Result<u64, Error> {
        self.q(format!("XLEN {key}"), redis::cmd("XLEN").arg(key))
            .await
    }

    /// `XLEN`s, and per group: pending (delivered, not acknowledged) + lag (not yet delivered).
    pub async fn figures(&self, t: &Topology, consumers: &[String]) -> Result<Figures, Error> {
        let s = t.stream_name();
        let messages = self.len(s).await?;
        let mut pending = BTreeMap::new();
        let mut con = self.con.clone();
        let groups = redis::cmd("XINFO")
            .arg("GROUPS")
            .arg(s)
            .query_async::<Value>(&mut con)
            .await
            .unwrap_or(Value::Nil);
        let groups: Vec<BTreeMap<String, String>> = match &groups {
            Value::Array(a) => a.iter().map(flat_map).collect(),
            _ => Vec::new(),
        };
        for c in consumers {
            let Some(g) = groups.iter().find(|g| g.get("name") == Some(c)) else {
                pending.insert(c.clone(), 0);
                continue;
            };
            let p: u64 = g.get("pending").and_then(|v| v.parse().ok()).unwrap_or(0);
            // Redis cannot always tell the lag (after trimming or deletions): count then.
            let lag = match g.get("lag").and_then(|v| v.parse::<u64>().ok()) {
                Some(l) => l,
                None => {
                    let from = g
                        .get("last-delivered-id")
                        .cloned()
                        .unwrap_or_else(|| "0-0".into());
                    let v: Value = self
                        .q(
                            format!("XRANGE {s}"),
                            redis::cmd("XRANGE")
                                .arg(s)
                                .arg(format!("({from}"))
                                .arg("+")
                                .arg("COUNT")
                                .arg(100_000),
                        )
                        .await?;
                    match v {
                        Value::Array(a) => a.len() as u64,
                        _ => 0,
                    }
                }
            };
            pending.insert(c.clone(), p + lag);
        }
        let dead_letters = match &t.dead_letter {
            Some(d) => Some(self.len(&d.name).await?),
            None => None,
        };
        Ok(Figures {
            messages,
            pending,
            dead_letters,
        })
    }

    async fn delete_matching(&self, pattern: &str) -> Result<(), Error> {
        let mut cursor = "0".to_string();
        loop {
            let v: Value = self
                .q(
                    format!("SCAN {pattern}"),
                    redis::cmd("SCAN")
                        .arg(&cursor)
                        .arg("MATCH")
                        .arg(pattern)
                        .arg("COUNT")
                        .arg(1000),
                )
                .await?;
            let Value::Array(a) = v else { break };
            cursor = a.first().and_then(text).unwrap_or_else(|| "0".into());
            if let Some(Value::Array(keys)) = a.get(1)
                && !keys.is_empty()
            {
                let mut del = redis::cmd("DEL");
                for k in keys {
                    del.arg(text(k).unwrap_or_default());
                }
                self.q::<Value>("DEL", &del).await?;
            }
            if cursor == "0" {
                break;
            }
        }
        Ok(())
    }

    /// Deletes the stream (with its groups), the dead-letter stream, the processed-event and
    /// published-id records, and the managed-groups set.
    pub async fn delete_queue(&self, t: &Topology) -> Result<(), Error> {
        let s = t.stream_name();
        let mut del = redis::cmd("DEL");
        del.arg(s)
            .arg(super::dead_letter_stream_name(&t.namespace, &t.queue))
            .arg(managed_groups_key(s));
        self.q::<Value>(format!("DEL {s}"), &del).await?;
        self.delete_matching(&format!("{}:*", t.processed.bucket))
            .await?;
        self.delete_matching(&format!("{s}:published:*")).await?;
        Ok(())
    }

    pub fn connection(&self) -> redis::aio::ConnectionManager {
        self.con.clone()
    }
}

// ---------------------------------------------------------------------------------------------
// RabbitMQ

/// An AMQP connection.
#[derive(Clone)]
pub struct RabbitBroker {
    pub conn: std::sync::Arc<lapin::Connection>,
}

/// The consumer queue of Microservice `ms` ([`rabbitmq::consumer_queue`]).
pub fn r_queue(t: &Topology, ms: &str) -> String {
    rabbitmq::consumer_queue(t.stream_name(), ms)
}

/// The arguments of a consumer queue, as the sidecar declares it too.
pub fn r_consumer_args(t: &Topology) -> FieldTable {
    rabbitmq::consumer_queue_args(
        t.consumer.max_deliver,
        t.dead_letter.as_ref().map(|d| d.name.as_str()),
        &t.rabbitmq_limits(),
    )
}

fn amqp_err(what: &str, e: &lapin::Error) -> Error {
    let text = e.to_string();
    if text.contains("PRECONDITION_FAILED") || text.contains("406") {
        Error::Immutable {
            what: what.to_string(),
            message: text,
        }
    } else {
        other(what, text)
    }
}

impl RabbitBroker {
    /// The TLS settings of `u`: the credentials' `ca.crt` trusted besides the system's roots
    /// (and then the URL must be `amqps://`).
    fn tls(
        u: &lapin::uri::AMQPUri,
        creds: &Credentials,
    ) -> Result<lapin::tcp::OwnedTLSConfig, Error> {
        if creds.ca.is_some() && u.scheme != lapin::uri::AMQPScheme::AMQPS {
            return Err(Error::Credentials(format!(
                "key \"{}\" is given but the URL is not TLS (use amqps://)",
                super::CA_KEY
            )));
        }
        Ok(lapin::tcp::OwnedTLSConfig {
            identity: None,
            cert_chain: creds.ca.clone(),
        })
    }

    pub async fn connect(url: &str, creds: &Credentials) -> Result<RabbitBroker, Error> {
        let bad = |m: String| Error::Connect {
            url: weir_crds::redact::url(url),
            message: m,
        };
        let mut u: lapin::uri::AMQPUri = url
            .parse()
            .map_err(|e| bad(format!("not an AMQP URL: {e}")))?;
        if let Some((username, password)) = creds.amqp_auth()? {
            u.authority.userinfo.username = username;
            u.authority.userinfo.password = password;
        }
        let tls = Self::tls(&u, creds)?;
        let props = lapin::ConnectionProperties::default()
            .with_connection_name("weir-operator".to_string().into());
        let runtime = lapin::runtime::default_runtime().map_err(|e| bad(e.to_string()))?;
        let conn = tokio::time::timeout(
            super::CONNECT_TIMEOUT,
            lapin::Connection::connect_uri_with_config(u, props, tls, runtime),
        )
        .await
        .map_err(|_| bad("timed out".into()))?
        .map_err(|e| bad(e.to_string()))?;
        Ok(RabbitBroker {
            conn: std::sync::Arc::new(conn),
        })
    }

    /// The AMQP client does not expose the server's properties: the protocol is reported.
    pub fn server_version(&self) -> String {
        "AMQP 0-9-1".into()
    }

    pub async fn channel(&self) -> Result<lapin::Channel, Error> {
        self.conn
            .create_channel()
            .await
            .map_err(|e| other("AMQP channel", e))
    }

    /// Ready messages in `queue`; `None` when it does not exist.
    pub async fn queue_depth(&self, queue: &str) -> Result<Option<u64>, Error> {
        let ch = self.channel().await?;
        let r = ch
            .queue_declare(
                queue.into(),
                QueueDeclareOptions {
                    passive: true,
                    ..Default::default()
                },
                FieldTable::default(),
            )
            .await;
        match r {
            Ok(q) => {
                let _ = ch.close(200, "ok".into()).await;
                Ok(Some(u64::from(q.message_count())))
            }
            Err(e) if e.to_string().contains("NOT_FOUND") || e.to_string().contains("404") => {
                Ok(None)
            }
            Err(e) => Err(other(format!("queue {queue}"), e)),
        }
    }

    async fn declare(&self, name: &str, args: FieldTable) -> Result<(), Error> {
        let ch = self.channel().await?;
        ch.queue_declare(name.into(), QueueDeclareOptions::durable(), args)
            .await
            .map_err(|e| amqp_err(&format!("queue {name}"), &e))?;
        let _ = ch.close(200, "ok".into()).await;
        Ok(())
    }

    async fn exchange(&self, name: &str, kind: lapin::ExchangeKind) -> Result<(), Error> {
        let ch = self.channel().await?;
        ch.exchange_declare(
            name.into(),
            kind,
            ExchangeDeclareOptions {
                durable: true,
                ..Default::default()
            },
            FieldTable::default(),
        )
        .await
        .map_err(|e| amqp_err(&format!("exchange {name}"), &e))?;
        let _ = ch.close(200, "ok".into()).await;
        Ok(())
    }

    async fn bind(&self, queue: &str, exchange: &str, key: &str) -> Result<(), Error> {
        let ch = self.channel().await?;
        ch.queue_bind(
            queue.into(),
            exchange.into(),
            key.into(),
            QueueBindOptions::default(),
            FieldTable::default(),
        )
        .await
        .map_err(|e| other(format!("binding {queue} to {exchange}"), e))?;
        let _ = ch.close(200, "ok".into()).await;
        Ok(())
    }

    /// The exchange, the dead-letter exchange and queue, the processed-event stream.
    pub async fn declare_queue(&self, t: &Topology) -> Result<(), Error> {
        self.exchange(t.stream_name(), lapin::ExchangeKind::Topic)
            .await?;
        if let Some(d) = &t.dead_letter {
            self.exchange(&d.name, lapin::ExchangeKind::Fanout).await?;
            self.declare(&d.name, rabbitmq::quorum_args()).await?;
            self.bind(&d.name, &d.name, "").await?;
        }
        self.declare(
            &t.processed.bucket,
            rabbitmq::processed_stream_args(t.processed.max_age),
        )
        .await
    }

    /// The consumer queue with its arguments, bound with `#`. An existing queue with other
    /// arguments is refused by RabbitMQ: [`Error::Immutable`].
    pub async fn declare_consumer(&self, t: &Topology, ms: &str) -> Result<(), Error> {
        let q = r_queue(t, ms);
        self.declare(&q, r_consumer_args(t))
            .await
            .map_err(|e| match e {
                Error::Immutable { what, message } => Error::Immutable {
                    what,
                    message: format!(
                        "{message}; RabbitMQ cannot change the arguments of an existing queue \
                     (x-delivery-limit = spec.consumer.maxDeliveries {}, dead-lettering from \
                     spec.deadLetter.enabled, x-max-length = spec.maxMessages, \
                     x-max-length-bytes = spec.maxBytes, x-message-ttl = spec.maxAge, \
                     x-quorum-initial-group-size = spec.replicas): delete queue {q} (its \
                     messages go with it) and the operator declares it again",
                        t.consumer.max_deliver
                    ),
                },
                e => e,
            })?;
        self.bind(&q, t.stream_name(), "#").await
    }

    pub async fn delete_consumer(&self, t: &Topology, ms: &str) -> Result<bool, Error> {
        let q = r_queue(t, ms);
        let existed = self.queue_depth(&q).await?.is_some();
        let mut names = vec![q.clone()];
        for b in &t.consumer.backoff {
            names.push(rabbitmq::retry_queue(&q, b.as_millis().max(1) as u64));
        }
        for n in names {
            if self.queue_depth(&n).await?.is_some() {
                let ch = self.channel().await?;
                ch.queue_delete(n.as_str().into(), QueueDeleteOptions::default())
                    .await
                    .map_err(|e| other(format!("deleting queue {n}"), e))?;
                let _ = ch.close(200, "ok".into()).await;
            }
        }
        Ok(existed)
    }

    /// Messages = ready messages over the consumer queues; pending per consumer = its queue's
    /// ready messages (AMQP does not report unacknowledged ones); dead letters = the dead-letter
    /// queue's messages.
    pub async fn figures(&self, t: &Topology, consumers: &[String]) -> Result<Figures, Error> {
        let mut pending = BTreeMap::new();
        let mut messages = 0;
        for c in consumers {
            let n = self.queue_depth(&r_queue(t, c)).await?.unwrap_or(0);
            messages += n;
            pending.insert(c.clone(), n);
        }
        let dead_letters = match &t.dead_letter {
            Some(d) => Some(self.queue_depth(&d.name).await?.unwrap_or(0)),
            None => None,
        };
        Ok(Figures {
            messages,
            pending,
            dead_letters,
        })
    }

    /// Deletes the consumer queues (with their retry queues), the dead-letter queue and
    /// exchange, the processed-event stream and the exchange.
    pub async fn delete_queue(&self, t: &Topology, consumers: &[String]) -> Result<(), Error> {
        for c in consumers {
            self.delete_consumer(t, c).await?;
        }
        let dlq = super::dead_letter_stream_name(&t.namespace, &t.queue);
        for q in [dlq.as_str(), t.processed.bucket.as_str()] {
            if self.queue_depth(q).await?.is_some() {
                let ch = self.channel().await?;
                ch.queue_delete(q.into(), QueueDeleteOptions::default())
                    .await
                    .map_err(|e| other(format!("deleting queue {q}"), e))?;
                let _ = ch.close(200, "ok".into()).await;
            }
        }
        for x in [dlq.as_str(), t.stream_name()] {
            let ch = self.channel().await?;
            ch.exchange_delete(x.into(), ExchangeDeleteOptions::default())
                .await
                .map_err(|e| other(format!("deleting exchange {x}"), e))?;
            let _ = ch.close(200, "ok".into()).await;
        }
        Ok(())
    }
}

/// How long `weir dlq` waits for RabbitMQ to hand over the next dead letter.
pub const AMQP_GET_TIMEOUT: Duration = Duration::from_secs(5);

#[cfg(test)]
mod tests {
    use super::*;
    use weir_testkit::{RabbitServer, RedisServer};

    fn spec(yaml: &str) -> weir_crds::queue::QueueSpec {
        serde_yaml::from_str(yaml).unwrap()
    }

    #[tokio::test]
    async fn redis_declare_update_figures_and_delete() {
        let server = RedisServer::start();
        let b = connect(BrokerKind::Redis, &server.url(), &Credentials::default())
            .await
            .unwrap();
        assert!(
            b.server_version().await.starts_with('7'),
            "{}",
            b.server_version().await
        );
        let t = Topology::new(
            "shop",
            "orders",
            &spec("broker: r\nmaxMessages: 3\nconsumer: {maxDeliveries: 4}"),
        )
        .unwrap();
        b.declare_queue(&t).await.unwrap();
        b.declare_consumer(&t, "billing").await.unwrap();
        b.declare_consumer(&t, "billing").await.unwrap(); // idempotent
        let BrokerAdmin::Redis(r) = &b else { panic!() };
        let mut con = r.connection();
        for i in 0..5 {
            let _: String = redis::cmd("XADD")
                .arg("weir_shop_orders")
                .arg("*")
                .arg("ce-id")
                .arg(format!("e-{i}"))
                .arg("data")
                .arg("{}")
                .query_async(&mut con)
                .await
                .unwrap();
        }
        let _: String = redis::cmd("XADD")
            .arg("weir_shop_orders_dlq")
            .arg("*")
            .arg("data")
            .arg("{}")
            .query_async(&mut con)
            .await
            .unwrap();
        // Re-declaring applies the retention: trimmed to maxMessages.
        b.declare_queue(&t).await.unwrap();
        let f = b.figures(&t, &["billing".into()]).await.unwrap();
        assert_eq!(f.messages, 3);
        assert_eq!(f.pending["billing"], 3, "three entries not yet delivered");
        assert_eq!(f.dead_letters, Some(1));
        // A group no Microservice wants any more is destroyed.
        b.declare_consumer(&t, "gone").await.unwrap();
        assert_eq!(
            b.managed_consumers(&t, &[]).await.unwrap(),
            ["billing", "gone"]
        );
        assert!(b.delete_consumer(&t, "gone").await.unwrap());
        assert!(!b.delete_consumer(&t, "gone").await.unwrap());
        assert_eq!(b.managed_consumers(&t, &[]).await.unwrap(), ["billing"]);
        let _: () = redis::cmd("SET")
            .arg("weir_processed_shop_orders:billing.abc")
            .arg("1")
            .query_async(&mut con)
            .await
            .unwrap();
        b.delete_queue(&t, &[]).await.unwrap();
        let left: i64 = redis::cmd("EXISTS")
            .arg("weir_shop_orders")
            .arg("weir_shop_orders_dlq")
            .arg("weir_processed_shop_orders:billing.abc")
            .arg("weir_shop_orders:managed-groups")
            .query_async(&mut con)
            .await
            .unwrap();
        assert_eq!(left, 0, "everything of the Queue deleted");
    }

    #[tokio::test]
    async fn rabbitmq_declare_refuses_changed_arguments_figures_and_delete() {
        let server = RabbitServer::start();
        let b = connect(BrokerKind::Rabbitmq, &server.url(), &Credentials::default())
            .await
            .unwrap();
        let t = Topology::new(
            "shop",
            "orders",
            &spec("broker: r\nconsumer: {maxDeliveries: 4, backoff: [1s]}"),
        )
        .unwrap();
        b.declare_queue(&t).await.unwrap();
        b.declare_consumer(&t, "billing").await.unwrap();
        b.declare_queue(&t).await.unwrap();
        b.declare_consumer(&t, "billing").await.unwrap(); // idempotent
        let BrokerAdmin::Rabbitmq(r) = &b else {
            panic!()
        };
        let ch = r.channel().await.unwrap();
        ch.confirm_select(ConfirmSelectOptions::default())
            .await
            .unwrap();
        let confirm = ch
            .basic_publish(
                "weir_shop_orders".into(),
                "weir.shop.orders".into(),
                BasicPublishOptions {
                    mandatory: true,
                    ..Default::default()
                },
                b"{}",
                lapin::BasicProperties::default(),
            )
            .await
            .unwrap()
            .await
            .unwrap();
        assert_eq!(
            confirm,
            lapin::Confirmation::Ack(None),
            "routed to billing's queue"
        );
        let f = b.figures(&t, &["billing".into()]).await.unwrap();
        assert_eq!(f.pending["billing"], 1);
        assert_eq!(f.messages, 1);
        assert_eq!(f.dead_letters, Some(0));

        // maxDeliveries changed: RabbitMQ cannot change x-delivery-limit in place.
        let changed = Topology::new(
            "shop",
            "orders",
            &spec("broker: r\nconsumer: {maxDeliveries: 6}"),
        )
        .unwrap();
        let e = b.declare_consumer(&changed, "billing").await.unwrap_err();
        assert_eq!(e.reason(), "QueueMustBeRecreated");
        let text = e.to_string();
        assert!(text.contains("weir_shop_orders.billing"), "{text}");
        assert!(text.contains("x-delivery-limit"), "{text}");

        assert_eq!(
            b.managed_consumers(&t, &["billing".into(), "gone".into()])
                .await
                .unwrap(),
            ["billing"]
        );
        b.delete_queue(&t, &["billing".into()]).await.unwrap();
        for q in [
            "weir_shop_orders.billing",
            "weir_shop_orders_dlq",
            "weir_processed_shop_orders",
        ] {
            assert_eq!(r.queue_depth(q).await.unwrap(), None, "{q} deleted");
        }
    }
}
