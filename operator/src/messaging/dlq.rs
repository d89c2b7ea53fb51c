//! Dead letters of a Queue (docs/messaging.md): list them with their reason, show one, and
//! replay chosen ones (or all) back onto the queue after a fix. `weir dlq` runs these, on each
//! broker kind:
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

use async_nats::HeaderMap;
use async_nats::jetstream::stream::LastRawMessageErrorKind;
use bytes::Bytes;
use clap::{Args, Subcommand};
use std::process::ExitCode;
use weir_broker::admin::{self, BrokerAdmin, Error};
use weir_broker::credentials::Credentials;
use weir_broker::nats::admin::{NatsAdmin, map_err};
use weir_broker::queue::dead_letter_stream_name;
use weir_broker::rabbitmq::admin::{AMQP_GET_TIMEOUT, RabbitAdmin};
use weir_broker::redis::admin::RedisAdmin;

pub const H_ORIGINAL_SUBJECT: &str = "Weir-Original-Subject";
pub const H_ORIGINAL_SEQ: &str = "Weir-Original-Seq";
pub const H_CONSUMER: &str = "Weir-Consumer";
pub const H_DELIVERY_COUNT: &str = "Weir-Delivery-Count";
pub const H_REASON: &str = "Weir-Reason";
pub const H_LAST_ERROR: &str = "Weir-Last-Error";
pub const H_DEAD_LETTERED_AT: &str = "Weir-Dead-Lettered-At";
pub const H_MSG_ID: &str = "Nats-Msg-Id";

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
        self.header(H_REASON).unwrap_or("-")
    }
    pub fn time(&self) -> &str {
        self.header(H_DEAD_LETTERED_AT).unwrap_or(&self.stored_at)
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
    let stream = d.header(H_ORIGINAL_SUBJECT).ok_or_else(|| Error::Invalid {
        field: format!("dead letter {}", d.seq),
        message: format!("has no {H_ORIGINAL_SUBJECT} header"),
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
            && !has(&headers, H_REASON)
        {
            headers.push((H_REASON.to_string(), format!("broker: {r}")));
        }
        if let Some(q) = x_queue
            && !has(&headers, H_ORIGINAL_SUBJECT)
        {
            headers.push((H_ORIGINAL_SUBJECT.to_string(), q));
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
            let target = d.header(H_ORIGINAL_SUBJECT).ok_or_else(|| Error::Invalid {
                field: format!("dead letter {}", d.seq),
                message: format!("has no {H_ORIGINAL_SUBJECT} header"),
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
            if mapped.code() == Some(admin::codes::NO_MESSAGE_FOUND) {
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
    let subject = d.header(H_ORIGINAL_SUBJECT).ok_or_else(|| Error::Invalid {
        field: format!("dead letter {}", d.seq),
        message: format!("has no {H_ORIGINAL_SUBJECT} header"),
    })?;
    let name = dead_letter_stream_name(namespace, queue);
    let replayed_as = d.event_id().unwrap_or(&name);
    let mut headers = HeaderMap::new();
    for (k, v) in d.headers.iter().filter(|(k, _)| replayed_header(k)) {
        headers.append(k.as_str(), v.as_str());
    }
    headers.insert(H_MSG_ID, format!("{replayed_as}:replay:{}", d.seq).as_str());
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

/// `weir dlq`: inspect and replay a Queue's dead letters.
#[derive(Args, Debug, Clone)]
pub struct DlqArgs {
    #[command(subcommand)]
    pub command: DlqCommand,
}

#[derive(Subcommand, Debug, Clone)]
pub enum DlqCommand {
    /// List dead letters: sequence, event id, reason, delivery count, time, consumer, last error.
    List {
        #[command(flatten)]
        target: Target,
        /// One JSON object per line instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Show one dead letter: its headers and body.
    Show {
        #[command(flatten)]
        target: Target,
        /// The dead letter's SEQ from `list` (stream sequence, Redis entry id, or RabbitMQ
        /// position).
        #[arg(long)]
        seq: String,
    },
    /// Publish dead letters back onto the queue, then delete them from the dead-letter stream.
    Replay {
        #[command(flatten)]
        target: Target,
        /// Sequences to replay (repeat the flag for several).
        #[arg(long, required_unless_present = "all", conflicts_with = "all")]
        seq: Vec<String>,
        /// Replay every dead letter.
        #[arg(long)]
        all: bool,
    },
}

#[derive(Args, Debug, Clone)]
pub struct Target {
    /// The Queue's name.
    pub queue: String,
    #[arg(short = 'n', long, default_value = "default")]
    pub namespace: String,
    /// Broker URL (nats://, redis:// or amqp://, the kind follows the scheme); by default the
    /// Queue's Broker, read from the cluster with the current kubeconfig (with its credentials
    /// Secret).
    #[arg(long, env = "WEIR_BROKER_URL")]
    pub broker_url: Option<String>,
}

/// Runs `weir dlq`: exit 0 on success, 1 when the broker or the cluster fails, 2 on bad input.
pub fn run(args: DlqArgs) -> ExitCode {
    let rt = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("weir dlq: {e}");
            return ExitCode::FAILURE;
        }
    };
    rt.block_on(run_async(args))
}

async fn connect_target(t: &Target) -> Result<BrokerAdmin, String> {
    let (kind, url, creds) = match &t.broker_url {
        Some(u) => (
            admin::kind_of_url(u).ok_or_else(|| {
                format!("--broker-url {u:?}: not a nats://, redis:// or amqp:// URL")
            })?,
            u.clone(),
            Credentials::default(),
        ),
        None => broker_from_cluster(&t.namespace, &t.queue)
            .await
            .map_err(|e| format!("{e:#}"))?,
    };
    admin::connect(kind, &url, &creds)
        .await
        .map_err(|e| e.to_string())
}

/// The kind, URL and credentials of the Queue's Broker, from the cluster.
async fn broker_from_cluster(
    namespace: &str,
    queue: &str,
) -> anyhow::Result<(weir_crds::broker::BrokerKind, String, Credentials)> {
    use anyhow::Context as _;
    use k8s_openapi::api::core::v1::Secret;
    use kube::Api;
    let client = kube::Client::try_default()
        .await
        .context("no cluster (pass --broker-url to reach the broker directly)")?;
    let q = Api::<weir_crds::Queue>::namespaced(client.clone(), namespace)
        .get(queue)
        .await
        .with_context(|| format!("Queue {namespace}/{queue}"))?;
    let b = Api::<weir_crds::Broker>::namespaced(client.clone(), namespace)
        .get(&q.spec.broker)
        .await
        .with_context(|| format!("Broker {namespace}/{}", q.spec.broker))?;
    let url = b
        .spec
        .effective_url()
        .with_context(|| format!("Broker {namespace}/{} has no spec.url", q.spec.broker))?;
    let creds = match &b.spec.credentials_secret {
        None => Credentials::default(),
        Some(s) => {
            let secret = Api::<Secret>::namespaced(client, namespace)
                .get(&s.name)
                .await
                .with_context(|| format!("Secret {namespace}/{}", s.name))?;
            let data = secret
                .data
                .unwrap_or_default()
                .into_iter()
                .map(|(k, v)| (k, v.0))
                .collect();
            Credentials::from_secret_data(&data)?
        }
    };
    Ok((b.spec.kind, url, creds))
}

async fn run_async(args: DlqArgs) -> ExitCode {
    let target = match &args.command {
        DlqCommand::List { target, .. }
        | DlqCommand::Show { target, .. }
        | DlqCommand::Replay { target, .. } => target.clone(),
    };
    let broker = match connect_target(&target).await {
        Ok(b) => b,
        Err(e) => {
            eprintln!("weir dlq: {e}");
            return ExitCode::FAILURE;
        }
    };
    let (ns, q) = (target.namespace.as_str(), target.queue.as_str());
    let fail = |e: Error| {
        eprintln!("weir dlq: {e}");
        ExitCode::FAILURE
    };
    match args.command {
        DlqCommand::List { json, .. } => {
            let letters = match list(&broker, ns, q).await {
                Ok(l) => l,
                Err(e) => return fail(e),
            };
            print!("{}", format_list(&letters, json));
            ExitCode::SUCCESS
        }
        DlqCommand::Show { seq, .. } => match get(&broker, ns, q, &seq).await {
            Ok(Some(d)) => {
                print!("{}", format_show(&d));
                ExitCode::SUCCESS
            }
            Ok(None) => {
                eprintln!(
                    "weir dlq: no dead letter {seq} in {}",
                    dead_letter_stream_name(ns, q)
                );
                ExitCode::from(2)
            }
            Err(e) => fail(e),
        },
        DlqCommand::Replay { seq, all, .. } => {
            let chosen = if all {
                match list(&broker, ns, q).await {
                    Ok(l) => l,
                    Err(e) => return fail(e),
                }
            } else {
                let mut v = Vec::new();
                for s in seq {
                    match get(&broker, ns, q, &s).await {
                        Ok(Some(d)) => v.push(d),
                        Ok(None) => {
                            eprintln!(
                                "weir dlq: no dead letter {s} in {}",
                                dead_letter_stream_name(ns, q)
                            );
                            return ExitCode::from(2);
                        }
                        Err(e) => return fail(e),
                    }
                }
                v
            };
            let mut failed = 0;
            for (d, r) in replay(&broker, ns, q, &chosen).await {
                match r {
                    Ok(new_seq) => println!(
                        "replayed dead letter {} (event {}) as message {new_seq}",
                        d.seq,
                        d.event_id().unwrap_or("-")
                    ),
                    Err(e) => {
                        failed += 1;
                        eprintln!("weir dlq: {e}");
                    }
                }
            }
            println!("{} replayed, {failed} failed", chosen.len() - failed);
            if failed == 0 {
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            }
        }
    }
}

/// The `list` output: a table, or JSON lines.
pub fn format_list(letters: &[DeadLetter], json: bool) -> String {
    let mut out = String::new();
    if json {
        for d in letters {
            let v = serde_json::json!({
                "seq": d.seq.parse::<u64>().map(serde_json::Value::from)
                    .unwrap_or_else(|_| serde_json::Value::from(d.seq.clone())),
                "eventId": d.event_id(),
                "reason": d.header(H_REASON),
                "deliveryCount": d.header(H_DELIVERY_COUNT).and_then(|c| c.parse::<u64>().ok()),
                "deadLetteredAt": d.time(),
                "consumer": d.header(H_CONSUMER),
                "lastError": d.header(H_LAST_ERROR),
                "originalSubject": d.header(H_ORIGINAL_SUBJECT),
                "originalSeq": d.header(H_ORIGINAL_SEQ).map(|c| c
                    .parse::<u64>()
                    .map(serde_json::Value::from)
                    .unwrap_or_else(|_| serde_json::Value::from(c))),
            });
            out.push_str(&v.to_string());
            out.push('\n');
        }
        return out;
    }
    let rows: Vec<[String; 7]> = letters
        .iter()
        .map(|d| {
            [
                d.seq.to_string(),
                d.event_id().unwrap_or("-").to_string(),
                d.reason().to_string(),
                d.header(H_DELIVERY_COUNT).unwrap_or("-").to_string(),
                d.time().to_string(),
                d.header(H_CONSUMER).unwrap_or("-").to_string(),
                d.header(H_LAST_ERROR).unwrap_or("-").replace('\n', " "),
            ]
        })
        .collect();
    let head = [
        "SEQ",
        "EVENT-ID",
        "REASON",
        "DELIVERIES",
        "DEAD-LETTERED-AT",
        "CONSUMER",
        "LAST-ERROR",
    ];
    let mut width = head.map(str::len);
    for r in &rows {
        for (w, c) in width.iter_mut().zip(r) {
            *w = (*w).max(c.chars().count());
        }
    }
    let line = |cells: Vec<&str>| {
        let mut l = String::new();
        for (i, c) in cells.iter().enumerate() {
            if i + 1 == cells.len() {
                l.push_str(c);
            } else {
                l.push_str(&format!("{c:<w$}  ", w = width[i]));
            }
        }
        l.push('\n');
        l
    };
    out.push_str(&line(head.to_vec()));
    for r in &rows {
        out.push_str(&line(r.iter().map(String::as_str).collect()));
    }
    out
}

/// The `show` output: sequence, headers, then the body (pretty when it is JSON).
pub fn format_show(d: &DeadLetter) -> String {
    let mut out = format!("seq: {}\nstored: {}\nheaders:\n", d.seq, d.stored_at);
    for (k, v) in &d.headers {
        out.push_str(&format!("  {k}: {v}\n"));
    }
    out.push_str("body:\n");
    match serde_json::from_slice::<serde_json::Value>(&d.body) {
        Ok(v) => out.push_str(&serde_json::to_string_pretty(&v).unwrap_or_default()),
        Err(_) => out.push_str(&String::from_utf8_lossy(&d.body)),
    }
    out.push('\n');
    out
}
