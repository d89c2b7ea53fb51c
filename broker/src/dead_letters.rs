//! A Queue's dead letters on each broker kind (docs/messaging.md): list them with their reason,
//! read one, and replay chosen ones back onto the queue after a fix. `weir dlq` runs these:
//!
//! - JetStream: `seq` is the dead-letter stream's sequence; a replay is published on
//!   `Weir-Original-Subject` with `Nats-Msg-Id: <event id>:replay:<seq>` (a message another
//!   producer wrote without an event id: `<dead-letter stream>:replay:<seq>`), then deleted.
//! - Redis: `seq` is the dead-letter stream's entry id; a replay is `XADD`ed to the stream named
//!   by `Weir-Original-Subject`, then the dead letter is `XDEL`eted.
//! - RabbitMQ: `seq` is the dead letter's position in the dead-letter queue (1 = oldest) when
//!   the command runs; a replay is published (confirmed) to the consumer queue named by
//!   `Weir-Original-Subject`, then the dead letter is acknowledged (removed). Listing takes the
//!   dead letters without acknowledging them and hands them back.
//!
//! The headers a dead letter carries are named in [`crate::queue::dead_letter_headers`].

use crate::admin::{BrokerAdmin, Error, codes};
use crate::nats::admin::{NatsAdmin, map_err};
use crate::queue::dead_letter_headers::*;
use crate::queue::dead_letter_stream_name;
use crate::rabbitmq::admin::{AMQP_GET_TIMEOUT, RabbitAdmin};
use crate::redis::admin::RedisAdmin;
use async_nats::HeaderMap;
use async_nats::jetstream::stream::LastRawMessageErrorKind;
use bytes::Bytes;

/// The header deduplicating a replay on JetStream.
pub const NATS_MSG_ID: &str = "Nats-Msg-Id";

/// One message of a dead-letter stream.
#[derive(Debug, Clone, PartialEq)]
pub struct DeadLetter {
    /// Where it is in the dead letters: stream sequence (JetStream), entry id (Redis), position
    /// (RabbitMQ).
    pub seq: String,
    /// Headers in a stable order (name, value).
    pub headers: Vec<(String, String)>,
    pub body: Bytes,
    /// When the broker stored it, should `Weir-Dead-Lettered-At` be missing.
    pub stored_at: String,
}

impl DeadLetter {
    /// A header's value, names compared without case.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
    pub fn event_id(&self) -> Option<&str> {
        self.header("ce-id")
    }
    pub fn reason(&self) -> &str {
        self.header(REASON).unwrap_or("-")
    }
    pub fn time(&self) -> &str {
        self.header(DEAD_LETTERED_AT).unwrap_or(&self.stored_at)
    }
}

fn headers_of(map: &HeaderMap) -> Vec<(String, String)> {
    let mut out: Vec<(String, String)> = map
        .iter()
        .flat_map(|(k, vs)| vs.iter().map(move |v| (k.to_string(), v.to_string())))
        .collect();
    out.sort();
    out
}

/// The broker's timestamp as text (the type depends on async-nats features, so only Display).
fn stored_time(t: &impl std::fmt::Display) -> String {
    t.to_string()
}

/// Reads the dead letter at `seq`; `None` when there is none (deleted or never there).
pub async fn get(
    broker: &BrokerAdmin,
    namespace: &str,
    queue: &str,
    seq: &str,
) -> Result<Option<DeadLetter>, Error> {
    match broker {
        BrokerAdmin::Nats(b) => match seq.parse::<u64>() {
            Ok(n) => nats_get(b, namespace, queue, n).await,
            Err(_) => Ok(None),
        },
        BrokerAdmin::Redis(r) => redis_get(r, namespace, queue, seq).await,
        BrokerAdmin::Rabbitmq(r) => {
            let all = rabbit_list(r, namespace, queue).await?;
            Ok(all.into_iter().find(|d| d.seq == seq))
        }
    }
}

/// Every dead letter of the Queue, oldest first.
pub async fn list(
    broker: &BrokerAdmin,
    namespace: &str,
    queue: &str,
) -> Result<Vec<DeadLetter>, Error> {
    match broker {
        BrokerAdmin::Nats(b) => nats_list(b, namespace, queue).await,
        BrokerAdmin::Redis(r) => redis_list(r, namespace, queue, "-", "+").await,
        BrokerAdmin::Rabbitmq(r) => rabbit_list(r, namespace, queue).await,
    }
}

/// Replays the chosen dead letters (all when `chosen` is `None`); per dead letter, its new
/// position on the queue or the error.
pub async fn replay(
    broker: &BrokerAdmin,
    namespace: &str,
    queue: &str,
    chosen: &[DeadLetter],
) -> Vec<(DeadLetter, Result<String, Error>)> {
    let mut out = Vec::new();
    match broker {
        BrokerAdmin::Nats(b) => {
            for d in chosen {
                let r = nats_replay_one(b, namespace, queue, d)
                    .await
                    .map(|s| s.to_string());
                out.push((d.clone(), r));
            }
        }
        BrokerAdmin::Redis(r) => {
            for d in chosen {
                out.push((d.clone(), redis_replay_one(r, namespace, queue, d).await));
            }
        }
        BrokerAdmin::Rabbitmq(r) => {
            let seqs: Vec<String> = chosen.iter().map(|d| d.seq.clone()).collect();
            match rabbit_replay(r, namespace, queue, &seqs).await {
                Ok(v) => out = v,
                Err(e) => {
                    for d in chosen {
                        out.push((d.clone(), Err(e.clone())));
                    }
                }
            }
        }
    }
    out
}

/// The headers of the event's own envelope, kept by a replay.
fn replayed_header(name: &str) -> bool {
    let lower = name.to_ascii_lowercase();
    lower.starts_with("ce-")
        || lower == "traceparent"
        || lower == "tracestate"
        || lower == "content-type"
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
    let stream = d.header(ORIGINAL_SUBJECT).ok_or_else(|| Error::Invalid {
        field: format!("dead letter {}", d.seq),
        message: format!("has no {ORIGINAL_SUBJECT} header"),
    })?;
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

fn amqp(what: impl Into<String>) -> impl FnOnce(lapin::Error) -> Error {
    let what = what.into();
    move |e| Error::Broker {
        what,
        message: e.to_string(),
    }
}

/// Takes every dead letter without acknowledging it (in queue order); the channel returned
/// holds them until it is closed (they go back) or they are acknowledged.
async fn rabbit_take(
    r: &RabbitAdmin,
    namespace: &str,
    queue: &str,
) -> Result<(lapin::Channel, Vec<(DeadLetter, lapin::message::Delivery)>), Error> {
    let name = dead_letter_stream_name(namespace, queue);
    let ch = r.channel().await?;
    let mut out = Vec::new();
    loop {
        let got = tokio::time::timeout(
            AMQP_GET_TIMEOUT,
            ch.basic_get(
                name.as_str().into(),
                lapin::options::BasicGetOptions::default(),
            ),
        )
        .await
        .map_err(|_| Error::Broker {
            what: format!("queue {name}"),
            message: "no answer in time".into(),
        })?
        .map_err(amqp(format!("queue {name}")))?;
        let Some(m) = got else { break };
        let d = m.delivery;
        let mut headers: Vec<(String, String)> = d
            .properties
            .headers()
            .as_ref()
            .map(|t| {
                t.inner()
                    .iter()
                    .filter_map(|(k, v)| {
                        let v = match v {
                            lapin::types::AMQPValue::LongString(s) => {
                                String::from_utf8_lossy(s.as_bytes()).into_owned()
                            }
                            lapin::types::AMQPValue::ShortString(s) => s.as_str().to_string(),
                            lapin::types::AMQPValue::LongInt(i) => i.to_string(),
                            lapin::types::AMQPValue::LongLongInt(i) => i.to_string(),
                            _ => return None,
                        };
                        Some((k.as_str().to_string(), v))
                    })
                    .collect()
            })
            .unwrap_or_default();
        // Dead-lettered by RabbitMQ itself (the delivery limit reached while sidecars crashed):
        // no Weir-* headers, but the broker says why and from where.
        let first = |name: &str| {
            headers
                .iter()
                .find(|(k, _)| k == name)
                .map(|(_, v)| v.clone())
        };
        let (x_reason, x_queue) = (first("x-first-death-reason"), first("x-first-death-queue"));
        headers.retain(|(k, _)| !k.starts_with("x-"));
        let has =
            |h: &Vec<(String, String)>, n: &str| h.iter().any(|(k, _)| k.eq_ignore_ascii_case(n));
        if let Some(r) = x_reason
            && !has(&headers, REASON)
        {
            headers.push((REASON.to_string(), format!("broker: {r}")));
        }
        if let Some(q) = x_queue
            && !has(&headers, ORIGINAL_SUBJECT)
        {
            headers.push((ORIGINAL_SUBJECT.to_string(), q));
        }
        headers.sort();
        let stored_at = d
            .properties
            .timestamp()
            .and_then(|t| chrono::DateTime::from_timestamp(t as i64, 0))
            .map(|t| t.to_rfc3339_opts(chrono::SecondsFormat::Secs, true))
            .unwrap_or_default();
        let letter = DeadLetter {
            seq: (out.len() + 1).to_string(),
            headers,
            body: Bytes::from(d.data.clone()),
            stored_at,
        };
        out.push((letter, d));
    }
    Ok((ch, out))
}

async fn rabbit_list(
    r: &RabbitAdmin,
    namespace: &str,
    queue: &str,
) -> Result<Vec<DeadLetter>, Error> {
    let (ch, all) = rabbit_take(r, namespace, queue).await?;
    // Closing the channel hands every dead letter back, in order.
    let _ = ch.close(200, "listed".into()).await;
    Ok(all.into_iter().map(|(d, _)| d).collect())
}

/// Publishes each chosen dead letter to its consumer queue (confirmed), then acknowledges it.
async fn rabbit_replay(
    r: &RabbitAdmin,
    namespace: &str,
    queue: &str,
    seqs: &[String],
) -> Result<Vec<(DeadLetter, Result<String, Error>)>, Error> {
    let (ch, all) = rabbit_take(r, namespace, queue).await?;
    let out_ch = r.channel().await?;
    out_ch
        .confirm_select(lapin::options::ConfirmSelectOptions::default())
        .await
        .map_err(amqp("confirm.select"))?;
    let mut out = Vec::new();
    for (d, delivery) in all.into_iter().filter(|(d, _)| seqs.contains(&d.seq)) {
        let r = async {
            let target = d.header(ORIGINAL_SUBJECT).ok_or_else(|| Error::Invalid {
                field: format!("dead letter {}", d.seq),
                message: format!("has no {ORIGINAL_SUBJECT} header"),
            })?;
            let mut t = lapin::types::FieldTable::default();
            for (k, v) in d.headers.iter().filter(|(k, _)| replayed_header(k)) {
                t.insert(
                    k.as_str().into(),
                    lapin::types::AMQPValue::LongString(v.clone().into()),
                );
            }
            let props = lapin::BasicProperties::default()
                .with_headers(t)
                .with_delivery_mode(2)
                .with_content_type("application/json".into())
                .with_message_id(d.event_id().unwrap_or_default().into());
            let what = format!("replay of dead letter {} to {target}", d.seq);
            let confirm = out_ch
                .basic_publish(
                    "".into(),
                    target.into(),
                    lapin::options::BasicPublishOptions {
                        mandatory: true,
                        ..Default::default()
                    },
                    &d.body,
                    props,
                )
                .await
                .map_err(amqp(what.clone()))?
                .await
                .map_err(amqp(what.clone()))?;
            if confirm != lapin::Confirmation::Ack(None) {
                return Err(Error::Broker {
                    what,
                    message: format!("not stored: {confirm:?} (is queue {target} there?)"),
                });
            }
            delivery
                .ack(lapin::options::BasicAckOptions::default())
                .await
                .map_err(amqp(format!("removing dead letter {}", d.seq)))?;
            Ok(format!("on {target}"))
        }
        .await;
        out.push((d, r));
    }
    let _ = ch.close(200, "replayed".into()).await;
    let _ = out_ch.close(200, "replayed".into()).await;
    Ok(out)
}

/// Reads the JetStream dead letter at `seq`.
async fn nats_get(
    broker: &NatsAdmin,
    namespace: &str,
    queue: &str,
    seq: u64,
) -> Result<Option<DeadLetter>, Error> {
    let name = dead_letter_stream_name(namespace, queue);
    let stream = broker
        .jetstream()
        .get_stream_no_info(&name)
        .await
        .map_err(map_err(format!("stream {name}")))?;
    match stream.get_raw_message(seq).await {
        Ok(m) => Ok(Some(DeadLetter {
            seq: m.sequence.to_string(),
            headers: headers_of(&m.headers),
            body: m.payload,
            stored_at: stored_time(&m.time),
        })),
        Err(e) if e.kind() == LastRawMessageErrorKind::NoMessageFound => Ok(None),
        Err(e) => {
            let mapped = map_err(format!("message {seq} of stream {name}"))(e);
            if mapped.code() == Some(codes::NO_MESSAGE_FOUND) {
                Ok(None)
            } else {
                Err(mapped)
            }
        }
    }
}

async fn nats_list(
    broker: &NatsAdmin,
    namespace: &str,
    queue: &str,
) -> Result<Vec<DeadLetter>, Error> {
    let name = dead_letter_stream_name(namespace, queue);
    let mut stream = broker
        .jetstream()
        .get_stream(&name)
        .await
        .map_err(map_err(format!("stream {name}")))?;
    let state = stream
        .info()
        .await
        .map_err(map_err(format!("stream {name}")))?
        .state
        .clone();
    let mut out = Vec::new();
    if state.messages == 0 {
        return Ok(out);
    }
    for seq in state.first_sequence..=state.last_sequence {
        if let Some(d) = nats_get(broker, namespace, queue, seq).await? {
            out.push(d);
        }
    }
    Ok(out)
}

/// Republishes a dead letter on its original subject (original body, `ce-*`, `traceparent`
/// and `content-type` headers, `Nats-Msg-Id: <event id>:replay:<dlq seq>`), waits for the
/// stream's acknowledgement, then deletes the dead letter. Returns the new stream sequence.
/// A dead letter without `ce-id` (a message another producer wrote without a CloudEvents
/// envelope, which the sidecar delivers with an id from the stream) is replayed too, under
/// `<dead-letter stream>:replay:<dlq seq>`: the Nats-Msg-Id only has to make a repeated replay
/// of the same dead letter a duplicate.
async fn nats_replay_one(
    broker: &NatsAdmin,
    namespace: &str,
    queue: &str,
    d: &DeadLetter,
) -> Result<u64, Error> {
    let subject = d.header(ORIGINAL_SUBJECT).ok_or_else(|| Error::Invalid {
        field: format!("dead letter {}", d.seq),
        message: format!("has no {ORIGINAL_SUBJECT} header"),
    })?;
    let name = dead_letter_stream_name(namespace, queue);
    let replayed_as = d.event_id().unwrap_or(&name);
    let mut headers = HeaderMap::new();
    for (k, v) in d.headers.iter().filter(|(k, _)| replayed_header(k)) {
        headers.append(k.as_str(), v.as_str());
    }
    headers.insert(
        NATS_MSG_ID,
        format!("{replayed_as}:replay:{}", d.seq).as_str(),
    );
    let what = format!("replay of dead letter {} on {subject}", d.seq);
    let ack = broker
        .jetstream()
        .publish_with_headers(subject.to_string(), headers, d.body.clone())
        .await
        .map_err(map_err(what.clone()))?
        .await
        .map_err(map_err(what))?;
    let stream = broker
        .jetstream()
        .get_stream_no_info(&name)
        .await
        .map_err(map_err(format!("stream {name}")))?;
    let seq: u64 = d.seq.parse().map_err(|_| Error::Invalid {
        field: format!("dead letter {}", d.seq),
        message: "not a stream sequence".into(),
    })?;
    stream
        .delete_message(seq)
        .await
        .map_err(map_err(format!("deleting dead letter {} of {name}", d.seq)))?;
    Ok(ack.sequence)
}
