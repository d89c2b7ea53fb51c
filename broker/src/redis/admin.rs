//! The operator's role on Redis Streams. For a Queue's [`Topology`] (stream name `<s>` =
//! `weir_<ns>_<q>`):
//!
//! - the stream `<s>` needs no declaration: it is trimmed at each reconcile to `maxMessages`
//!   (exactly) and `maxAge` (the sidecars trim approximately, `~`, at each publish too), and the
//!   dead-letter stream `<s>_dlq` to the dead letters' max age;
//! - one consumer group per consuming Microservice, created at the stream's start (`MKSTREAM`);
//!   the groups the operator made are listed in the set `<s>:managed-groups`
//!   ([`managed_groups_key`]), the only ones it deletes;
//! - deleting the Queue removes the streams, the managed-groups set, the processed-event
//!   records `weir_processed_<ns>_<q>:*` and the published-id records `<s>:published:*`.
//!
//! The connection manager reconnects by itself. `maxBytes`, a retention other than `Limits`,
//! `storage: Memory` and `replicas` are not applied ([`Kind::not_applied`] says so).

use crate::admin::{Admin, CONNECT_TIMEOUT, Error, Figures, Kind, note};
use crate::credentials::{CA_KEY, Credentials};
use crate::topology::Topology;
use redis::Value;
use std::collections::BTreeMap;
use weir_crds::broker::BrokerKind;
use weir_crds::queue::{QueueSpec, Retention, Storage};

use super::managed_groups_key;

fn other(what: impl Into<String>, e: impl std::fmt::Display) -> Error {
    Error::broker(what, e)
}

/// Milliseconds since the epoch `age` ago (a stream entry id's first part), at least 0.
fn min_id(age: std::time::Duration) -> i64 {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
        .unwrap_or(0);
    (now - i64::try_from(age.as_millis()).unwrap_or(i64::MAX)).max(0)
}

/// A Redis connection (reconnecting by itself).
#[derive(Clone)]
pub struct RedisAdmin {
    con: redis::aio::ConnectionManager,
}

pub(super) fn text(v: &Value) -> Option<String> {
    match v {
        Value::BulkString(b) => Some(String::from_utf8_lossy(b).into_owned()),
        Value::SimpleString(s) => Some(s.clone()),
        Value::Int(i) => Some(i.to_string()),
        _ => None,
    }
}

/// A flat `[name, value, ...]` reply (or a RESP3 map) as a map of strings.
pub(super) fn flat_map(v: &Value) -> BTreeMap<String, String> {
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

impl RedisAdmin {
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
        creds.require_tls_with_ca(url, "rediss", &format!("key {CA_KEY:?}"), "the URL")?;
        let certs = redis::TlsCertificates {
            client_tls: None,
            root_cert: Some(pem.clone().into_bytes()),
        };
        redis::Client::build_with_tls(info, certs).map_err(|e| other("Redis TLS client", e))
    }

    /// Connects once (no retry loop: callers requeue).
    pub async fn connect(url: &str, creds: &Credentials) -> Result<RedisAdmin, Error> {
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
            .set_connection_timeout(Some(CONNECT_TIMEOUT))
            .set_response_timeout(Some(CONNECT_TIMEOUT))
            .set_number_of_retries(1);
        let con = tokio::time::timeout(
            CONNECT_TIMEOUT * 2,
            redis::aio::ConnectionManager::new_with_config(client, cfg),
        )
        .await
        .map_err(|_| bad("timed out".into()))?
        .map_err(|e| bad(e.to_string()))?;
        Ok(RedisAdmin { con })
    }

    pub(super) async fn q<T: redis::FromRedisValue>(
        &self,
        what: impl Into<String>,
        cmd: &redis::Cmd,
    ) -> Result<T, Error> {
        let mut con = self.con.clone();
        cmd.query_async(&mut con).await.map_err(|e| other(what, e))
    }

    pub fn connection(&self) -> redis::aio::ConnectionManager {
        self.con.clone()
    }

    async fn len(&self, key: &str) -> Result<u64, Error> {
        self.q(format!("XLEN {key}"), redis::cmd("XLEN").arg(key))
            .await
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
}

impl Admin for RedisAdmin {
    async fn server_version(&self) -> String {
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

    fn is_connected(&self) -> bool {
        true // the connection manager reconnects by itself
    }

    /// Redis streams need no declaration; the stream is trimmed to the spec's retention.
    async fn declare_queue(&self, t: &Topology) -> Result<(), Error> {
        let s = t.stream_name();
        // Exact trimming here (the sidecars trim approximately, `~`, at each publish).
        if let Some(max) = t.stream.max_messages
            && max > 0
        {
            self.q::<Value>(
                format!("XTRIM {s}"),
                redis::cmd("XTRIM").arg(s).arg("MAXLEN").arg(max),
            )
            .await?;
        }
        if !t.stream.max_age.is_zero() {
            self.q::<Value>(
                format!("XTRIM {s}"),
                redis::cmd("XTRIM")
                    .arg(s)
                    .arg("MINID")
                    .arg(min_id(t.stream.max_age)),
            )
            .await?;
        }
        if let Some(d) = &t.dead_letter
            && !d.max_age.is_zero()
        {
            self.q::<Value>(
                format!("XTRIM {}", d.name),
                redis::cmd("XTRIM")
                    .arg(&d.name)
                    .arg("MINID")
                    .arg("~")
                    .arg(min_id(d.max_age)),
            )
            .await?;
        }
        Ok(())
    }

    /// Creates the consumer group (from the stream's start) unless it exists.
    async fn declare_consumer(&self, t: &Topology, ms: &str) -> Result<(), Error> {
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

    async fn managed_consumers(
        &self,
        t: &Topology,
        _known: &[String],
    ) -> Result<Vec<String>, Error> {
        let key = managed_groups_key(t.stream_name());
        let mut v: Vec<String> = self
            .q(format!("SMEMBERS {key}"), redis::cmd("SMEMBERS").arg(&key))
            .await?;
        v.sort();
        Ok(v)
    }

    async fn delete_consumer(&self, t: &Topology, ms: &str) -> Result<bool, Error> {
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

    /// `XLEN`s, and per group: pending (delivered, not acknowledged) + lag (not yet delivered).
    async fn figures(&self, t: &Topology, consumers: &[String]) -> Result<Figures, Error> {
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

    /// Deletes the stream (with its groups), the dead-letter stream, the processed-event and
    /// published-id records, and the managed-groups set.
    async fn delete_queue(&self, t: &Topology, _consumers: &[String]) -> Result<(), Error> {
        let s = t.stream_name();
        let mut del = redis::cmd("DEL");
        del.arg(s)
            .arg(t.dead_letter_stream_name())
            .arg(managed_groups_key(s));
        self.q::<Value>(format!("DEL {s}"), &del).await?;
        self.delete_matching(&format!("{}:*", t.processed.bucket))
            .await?;
        self.delete_matching(&format!("{s}:published:*")).await?;
        Ok(())
    }
}

impl Kind for RedisAdmin {
    const KIND: BrokerKind = BrokerKind::Redis;

    async fn connect(url: &str, credentials: &Credentials) -> Result<Self, Error> {
        RedisAdmin::connect(url, credentials).await
    }

    fn not_applied(spec: &QueueSpec) -> Vec<String> {
        let mut out = Vec::new();
        note(
            &mut out,
            spec.max_bytes.is_some(),
            "maxBytes",
            "a Redis stream is trimmed by count (maxMessages) and age (maxAge) only",
        );
        note(
            &mut out,
            spec.retention != Retention::Limits,
            "retention",
            "entries stay until maxMessages or maxAge trims them, whoever consumed them",
        );
        note(
            &mut out,
            spec.storage == Storage::Memory,
            "storage",
            "durability is the Redis server's persistence setting",
        );
        note(
            &mut out,
            spec.replicas > 1,
            "replicas",
            "replication is the Redis server's",
        );
        note(
            &mut out,
            spec.partitions > 1,
            "partitions",
            "a Redis stream is one ordered log; only Kafka partitions a queue",
        );
        out
    }
}
