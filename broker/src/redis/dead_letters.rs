//! A Queue's dead letters on Redis ([`crate::dead_letters`]): `seq` is the dead-letter
//! stream's entry id; a replay is `XADD`ed to the stream named by `Weir-Original-Subject`, then
//! the dead letter is `XDEL`eted.

use super::admin::RedisAdmin;
use crate::admin::Error;
use crate::dead_letters::{DeadLetter, DeadLetters, replayed_header};
use crate::queue::dead_letter_stream_name;
use bytes::Bytes;

impl DeadLetters for RedisAdmin {
    async fn get(
        &self,
        namespace: &str,
        queue: &str,
        seq: &str,
    ) -> Result<Option<DeadLetter>, Error> {
        redis_get(self, namespace, queue, seq).await
    }

    async fn list(&self, namespace: &str, queue: &str) -> Result<Vec<DeadLetter>, Error> {
        redis_list(self, namespace, queue, "-", "+").await
    }

    async fn replay(
        &self,
        namespace: &str,
        queue: &str,
        chosen: &[DeadLetter],
    ) -> Vec<(DeadLetter, Result<String, Error>)> {
        let mut out = Vec::new();
        for d in chosen {
            out.push((d.clone(), redis_replay_one(self, namespace, queue, d).await));
        }
        out
    }
}

async fn redis_list(
    r: &RedisAdmin,
    namespace: &str,
    queue: &str,
    from: &str,
    to: &str,
) -> Result<Vec<DeadLetter>, Error> {
    let name = dead_letter_stream_name(namespace, queue);
    let mut con = r.connection();
    let v: redis::Value = redis::cmd("XRANGE")
        .arg(&name)
        .arg(from)
        .arg(to)
        .query_async(&mut con)
        .await
        .map_err(|e| Error::Broker {
            what: format!("stream {name}"),
            message: e.to_string(),
        })?;
    let text = |v: &redis::Value| match v {
        redis::Value::BulkString(b) => Some(String::from_utf8_lossy(b).into_owned()),
        redis::Value::SimpleString(s) => Some(s.clone()),
        _ => None,
    };
    let mut out = Vec::new();
    let redis::Value::Array(entries) = v else {
        return Ok(out);
    };
    for e in entries {
        let redis::Value::Array(e) = e else { continue };
        let (Some(id), Some(redis::Value::Array(fields))) = (e.first().and_then(text), e.get(1))
        else {
            continue;
        };
        let mut headers = Vec::new();
        let mut body = Bytes::new();
        for kv in fields.chunks(2) {
            let (Some(k), Some(v)) = (kv.first().and_then(text), kv.get(1)) else {
                continue;
            };
            if k == "data" {
                if let redis::Value::BulkString(b) = v {
                    body = Bytes::copy_from_slice(b);
                }
            } else if let Some(v) = text(v) {
                headers.push((k, v));
            }
        }
        headers.sort();
        let ms: i64 = id
            .split('-')
            .next()
            .and_then(|m| m.parse().ok())
            .unwrap_or(0);
        let stored_at = chrono::DateTime::from_timestamp_millis(ms)
            .map(|t| t.to_rfc3339_opts(chrono::SecondsFormat::Millis, true))
            .unwrap_or_default();
        out.push(DeadLetter {
            seq: id,
            headers,
            body,
            stored_at,
        });
    }
    Ok(out)
}

async fn redis_get(
    r: &RedisAdmin,
    namespace: &str,
    queue: &str,
    seq: &str,
) -> Result<Option<DeadLetter>, Error> {
    if !seq.contains('-') {
        return Ok(None);
    }
    Ok(redis_list(r, namespace, queue, seq, seq)
        .await?
        .into_iter()
        .next())
}

/// `XADD`s the event (its own headers and body) to its original stream, then `XDEL`s the dead
/// letter. Returns the new entry id.
async fn redis_replay_one(
    r: &RedisAdmin,
    namespace: &str,
    queue: &str,
    d: &DeadLetter,
) -> Result<String, Error> {
    let stream = d.original_subject()?;
    let mut cmd = redis::cmd("XADD");
    cmd.arg(stream).arg("*");
    for (k, v) in d.headers.iter().filter(|(k, _)| replayed_header(k)) {
        cmd.arg(k).arg(v);
    }
    cmd.arg("data").arg(d.body.as_ref());
    let mut con = r.connection();
    let id: String = cmd.query_async(&mut con).await.map_err(|e| Error::Broker {
        what: format!("replay of dead letter {} on {stream}", d.seq),
        message: e.to_string(),
    })?;
    let name = dead_letter_stream_name(namespace, queue);
    let _: i64 = redis::cmd("XDEL")
        .arg(&name)
        .arg(&d.seq)
        .query_async(&mut con)
        .await
        .map_err(|e| Error::Broker {
            what: format!("deleting dead letter {} of {name}", d.seq),
            message: e.to_string(),
        })?;
    Ok(id)
}
