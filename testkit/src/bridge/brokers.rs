//! One broker of the conformance suite ([`TestBroker`]: a server of [`crate::brokers`] of each
//! kind), and what the suite reads from each of them directly: stream lengths, dead letters,
//! consumer backlogs, raw publishes, processed-event records. It reads them with weir-proxy's own
//! parsers, so that what is checked is what the sidecar wrote.

use super::*;
use bytes::Bytes;
use futures::StreamExt;
use std::collections::BTreeMap;
use std::time::Instant;

/// A dead letter or stream message, whatever the broker: body, headers (names lowercased) and
/// its position (stream sequence or entry id).
#[derive(Clone, Debug)]
pub struct Stored {
    pub payload: Bytes,
    pub headers: BTreeMap<String, String>,
    pub position: String,
}

impl Stored {
    pub fn h(&self, name: &str) -> &str {
        self.headers
            .get(&name.to_ascii_lowercase())
            .map(|s| s.as_str())
            .unwrap_or("")
    }
}

/// One broker of the conformance suite.
pub enum TestBroker {
    Nats(NatsServer),
    Redis(RedisServer),
    Rabbitmq(RabbitServer),
    Kafka(KafkaServer),
}

impl TestBroker {
    /// Starts the broker, or `None` when its binary is missing (outside CI).
    /// Redis appends with `fsync always` unless the benchmark asks otherwise
    /// (`PUBSUB_REDIS_FSYNC=everysec`).
    pub async fn start(kind: Kind) -> Option<TestBroker> {
        require(kind)?;
        Some(match kind {
            Kind::Nats => TestBroker::Nats(NatsServer::start()),
            Kind::Redis => TestBroker::Redis(match std::env::var("PUBSUB_REDIS_FSYNC") {
                Ok(fsync) => RedisServer::start_with(&["--appendfsync", &fsync]),
                Err(_) => RedisServer::start(),
            }),
            Kind::Rabbitmq => TestBroker::Rabbitmq(RabbitServer::start()),
            Kind::Kafka => TestBroker::Kafka(KafkaServer::start()),
        })
    }

    /// [`start`](Self::start), but a broker whose log survives its SIGKILL: on Kafka, tansu on
    /// its durable storage ([`KafkaServer::start_durable`]); the others keep their log anyway.
    pub async fn start_durable(kind: Kind) -> Option<TestBroker> {
        match kind {
            Kind::Kafka => {
                require(kind)?;
                KafkaServer::start_durable().map(TestBroker::Kafka)
            }
            _ => TestBroker::start(kind).await,
        }
    }

    pub fn kind(&self) -> Kind {
        match self {
            TestBroker::Nats(_) => Kind::Nats,
            TestBroker::Redis(_) => Kind::Redis,
            TestBroker::Rabbitmq(_) => Kind::Rabbitmq,
            TestBroker::Kafka(_) => Kind::Kafka,
        }
    }

    pub fn url(&self) -> String {
        match self {
            TestBroker::Nats(n) => n.url(),
            TestBroker::Redis(r) => r.url(),
            TestBroker::Rabbitmq(r) => r.url(),
            TestBroker::Kafka(k) => k.url(),
        }
    }

    pub fn kill9(&mut self) {
        match self {
            TestBroker::Nats(n) => n.kill9(),
            TestBroker::Redis(r) => r.kill9(),
            TestBroker::Rabbitmq(r) => r.kill9(),
            TestBroker::Kafka(k) => k.kill9(),
        }
    }

    pub async fn restart(&mut self) {
        match self {
            TestBroker::Nats(n) => n.restart(),
            TestBroker::Redis(r) => r.restart(),
            TestBroker::Rabbitmq(r) => r.restart(),
            TestBroker::Kafka(k) => {
                k.restart();
                if !k.keeps_log_across_restart() {
                    // It came back empty (memory storage), as a broker that lost its disk: the
                    // operator declares the Queue's topics again.
                    self.declare().await;
                }
            }
        }
    }

    /// Whether the broker's log survives [`kill9`](Self::kill9) and [`restart`](Self::restart)
    /// (not on the memory storage of the test kit's Tansu: see [`Self::start_durable`]), and the test may kill it at all
    /// (not a Kafka named by `WEIR_KAFKA_BOOTSTRAP`): `Err` says why not.
    pub fn survives_a_kill(&self) -> Result<(), &'static str> {
        match self {
            TestBroker::Kafka(k) if !k.is_local() => {
                Err("WEIR_KAFKA_BOOTSTRAP names a broker the suite may not kill")
            }
            TestBroker::Kafka(k) if !k.keeps_log_across_restart() => Err(
                "the test kit's Tansu keeps its log in memory: a kill -9 loses every stored event",
            ),
            _ => Ok(()),
        }
    }

    pub fn publisher(&self) -> MessagingConfig {
        let mut m = publisher_messaging(&self.url());
        m.broker_kind = self.kind().name().into();
        m
    }

    pub fn consumer(&self, c: ConsumeConfig) -> MessagingConfig {
        let mut m = consumer_messaging(&self.url(), c);
        m.broker_kind = self.kind().name().into();
        m
    }

    /// Declares the queue as the operator would (JetStream: the stream; Redis: nothing, the
    /// stream appears with its first entry or consumer group; RabbitMQ: the exchange, the
    /// dead-letter exchange and queue, and the consumer queue of `billing`; Kafka: the topic,
    /// with [`kafka::QUEUE_PARTITIONS`], and the dead-letter topic, after deleting what an
    /// earlier test left on a broker the suite did not start).
    pub async fn declare(&self) {
        match self {
            TestBroker::Nats(n) => declare_stream(&n.js().await).await,
            TestBroker::Redis(_) => {}
            TestBroker::Rabbitmq(_) => self.declare_queue(STREAM, "billing").await,
            TestBroker::Kafka(k) => {
                if !k.is_local() {
                    let processed = weir_broker::queue::processed_bucket(STREAM);
                    let groups =
                        ["billing", "audit"].map(|c| weir_broker::kafka::group_id(STREAM, c));
                    kafka::delete(
                        k,
                        &[STREAM, DLQ_STREAM, &processed, "weir_shop_payments"],
                        &[&groups[0], &groups[1]],
                    )
                    .await;
                }
                kafka::create_topics(k, &[(STREAM, kafka::QUEUE_PARTITIONS), (DLQ_STREAM, 1)])
                    .await;
            }
        }
    }

    /// RabbitMQ: declares `consumer`'s queue on the queue whose stream is `stream` (an event no
    /// queue is bound for is refused at publish); Kafka: the topic `stream` and its dead-letter
    /// topic; nothing elsewhere.
    pub async fn declare_queue(&self, stream: &str, consumer: &str) {
        if let TestBroker::Kafka(k) = self {
            let dlq = weir_broker::kafka::dead_letter_topic(stream);
            kafka::create_topics(k, &[(stream, 1), (&dlq, 1)]).await;
        }
        if let TestBroker::Rabbitmq(r) = self {
            let conn = lapin::Connection::connect(&r.url(), Default::default())
                .await
                .unwrap();
            let mut c = consume_config(consumer);
            c.stream = stream.into();
            c.dead_letter_stream = format!("{stream}_dlq");
            weir_broker::rabbitmq::transport::declare_consumer(&conn, &c, Duration::from_secs(600))
                .await
                .unwrap();
            let _ = conn.close(200, "ok".into()).await;
        }
    }

    /// Messages stored in the stream `name`.
    pub async fn len(&self, name: &str) -> u64 {
        match self {
            TestBroker::Nats(n) => stream_len(&n.js().await, name).await,
            TestBroker::Redis(r) => {
                let mut con = r.con().await;
                redis::cmd("XLEN")
                    .arg(name)
                    .query_async::<u64>(&mut con)
                    .await
                    .unwrap_or(0)
            }
            TestBroker::Rabbitmq(r) => {
                // The queue itself (dead letters), else the consumer queues of the stream.
                let names = [
                    name.to_string(),
                    format!("{name}.billing"),
                    format!("{name}.audit"),
                ];
                let mut n = 0;
                for q in names {
                    let (conn, ch) = r.channel().await;
                    if let Ok(q) = ch
                        .queue_declare(
                            q.as_str().into(),
                            lapin::options::QueueDeclareOptions {
                                passive: true,
                                ..Default::default()
                            },
                            Default::default(),
                        )
                        .await
                    {
                        n += u64::from(q.message_count());
                    }
                    let _ = conn.close(200, "ok".into()).await;
                }
                n
            }
            TestBroker::Kafka(k) => kafka::read_all_quiet_for(k, name, kafka::quiet(k))
                .await
                .len() as u64,
        }
    }

    /// Every message of the stream `name`, oldest first.
    pub async fn messages(&self, name: &str) -> Vec<Stored> {
        match self {
            TestBroker::Nats(n) => stream_messages(&n.js().await, name)
                .await
                .into_iter()
                .map(|m| Stored {
                    payload: m.payload.clone(),
                    headers: m
                        .headers
                        .iter()
                        .map(|(k, v)| {
                            let k: &str = k.as_ref();
                            (k.to_ascii_lowercase(), v[0].as_str().to_string())
                        })
                        .collect(),
                    position: m.sequence.to_string(),
                })
                .collect(),
            TestBroker::Redis(r) => {
                let mut con = r.con().await;
                let v: redis::Value = redis::cmd("XRANGE")
                    .arg(name)
                    .arg("-")
                    .arg("+")
                    .query_async(&mut con)
                    .await
                    .unwrap();
                weir_broker::redis::transport::parse_entries(&v)
                    .into_iter()
                    .map(|e| Stored {
                        payload: e.data,
                        headers: e
                            .headers
                            .into_iter()
                            .map(|(k, v)| (k.to_ascii_lowercase(), v))
                            .collect(),
                        position: e.id,
                    })
                    .collect()
            }
            TestBroker::Rabbitmq(r) => {
                // Gets every message without acknowledging it; closing the channel puts them back.
                let (conn, ch) = r.channel().await;
                let mut out = Vec::new();
                while let Ok(Some(m)) = ch
                    .basic_get(name.into(), lapin::options::BasicGetOptions::default())
                    .await
                {
                    let headers =
                        weir_broker::rabbitmq::transport::headers_of(&m.delivery.properties);
                    out.push(Stored {
                        payload: Bytes::from(m.delivery.data.clone()),
                        headers: headers
                            .into_iter()
                            .map(|(k, v)| (k.to_ascii_lowercase(), v))
                            .collect(),
                        position: m
                            .delivery
                            .properties
                            .message_id()
                            .as_ref()
                            .map(|s| s.as_str().to_string())
                            .unwrap_or_default(),
                    });
                }
                let _ = conn.close(200, "ok".into()).await;
                out
            }
            TestBroker::Kafka(k) => kafka::read_all_quiet_for(k, name, kafka::quiet(k)).await,
        }
    }

    /// Publishes an event straight to the queue, bypassing any sidecar, with the CloudEvents
    /// headers a publishing sidecar writes; `dedup_id` is what the broker dedupes on where it
    /// does (JetStream's `Nats-Msg-Id`).
    pub async fn raw_publish(&self, id: &str, dedup_id: &str, body: &str) {
        let mut h = ce_headers(id);
        if self.kind() == Kind::Nats {
            h.push(("Nats-Msg-Id", dedup_id.into()));
        }
        let h: Vec<(&str, &str)> = h.iter().map(|(k, v)| (*k, v.as_str())).collect();
        self.raw_publish_headers(&h, body.as_bytes()).await;
    }

    /// Publishes a message with exactly `headers` (none: as a producer that knows nothing of
    /// CloudEvents writes it) straight to the queue, as each broker carries headers: JetStream
    /// headers, Redis fields beside `data`, AMQP headers (and `message_id` = the `ce-id`, if
    /// any, as a sidecar sets it; none otherwise).
    pub async fn raw_publish_headers(&self, headers: &[(&str, &str)], body: &[u8]) {
        match self {
            TestBroker::Nats(n) => {
                raw_publish_headers(&n.js().await, headers, body).await;
            }
            TestBroker::Redis(r) => {
                let mut con = r.con().await;
                let mut cmd = redis::cmd("XADD");
                cmd.arg(STREAM).arg("*");
                for (k, v) in headers {
                    cmd.arg(*k).arg(*v);
                }
                let _: String = cmd
                    .arg("data")
                    .arg(body)
                    .query_async(&mut con)
                    .await
                    .unwrap();
            }
            TestBroker::Rabbitmq(r) => {
                let (conn, ch) = r.channel().await;
                ch.confirm_select(Default::default()).await.unwrap();
                rabbit_publish(&ch, headers, body).await;
                let _ = conn.close(200, "ok".into()).await;
            }
            TestBroker::Kafka(k) => {
                kafka::produce(&kafka::producer(k), STREAM, headers, body).await;
            }
        }
    }

    /// Publishes many `(event id, body)` straight to the queue, waiting for every confirmation.
    pub async fn raw_publish_many(&self, events: Vec<(String, String)>) {
        match self {
            TestBroker::Nats(n) => {
                let js = n.js().await;
                let mut acks = Vec::with_capacity(events.len());
                for (id, body) in events {
                    let mut h = async_nats::HeaderMap::new();
                    for (k, v) in ce_headers(&id) {
                        h.insert(k, v.as_str());
                    }
                    h.insert("Nats-Msg-Id", id.as_str());
                    acks.push(
                        js.publish_with_headers(SUBJECT, h, body.into())
                            .await
                            .unwrap(),
                    );
                }
                for a in acks {
                    a.await.unwrap();
                }
            }
            TestBroker::Redis(r) => {
                let mut con = r.con().await;
                for chunk in events.chunks(500) {
                    let mut p = redis::pipe();
                    for (id, body) in chunk {
                        let c = p.cmd("XADD").arg(STREAM).arg("*");
                        for (k, v) in ce_headers(id) {
                            c.arg(k).arg(v);
                        }
                        c.arg("data").arg(body);
                    }
                    let _: Vec<String> = p.query_async(&mut con).await.unwrap();
                }
            }
            TestBroker::Rabbitmq(r) => {
                let (conn, ch) = r.channel().await;
                ch.confirm_select(Default::default()).await.unwrap();
                for chunk in events.chunks(500) {
                    let mut confirms = Vec::new();
                    for (id, body) in chunk {
                        confirms.push(
                            ch.basic_publish(
                                STREAM.into(),
                                SUBJECT.into(),
                                lapin::options::BasicPublishOptions {
                                    mandatory: true,
                                    ..Default::default()
                                },
                                body.as_bytes(),
                                rabbit_props(
                                    &ce_headers(id)
                                        .iter()
                                        .map(|(k, v)| (*k, v.as_str()))
                                        .collect::<Vec<_>>(),
                                ),
                            )
                            .await
                            .unwrap(),
                        );
                    }
                    for c in confirms {
                        assert_eq!(c.await.unwrap(), lapin::Confirmation::Ack(None));
                    }
                }
                let _ = conn.close(200, "ok".into()).await;
            }
            TestBroker::Kafka(k) => {
                let p = kafka::producer(k);
                for chunk in events.chunks(500) {
                    let sends = chunk.iter().map(|(id, body)| {
                        let h = ce_headers(id);
                        let p = &p;
                        async move {
                            let h: Vec<(&str, &str)> =
                                h.iter().map(|(k, v)| (*k, v.as_str())).collect();
                            kafka::produce(p, STREAM, &h, body.as_bytes()).await
                        }
                    });
                    futures::future::join_all(sends).await;
                }
            }
        }
    }

    /// (messages not yet delivered to `consumer`, deliveries not yet settled).
    pub async fn backlog(&self, consumer: &str) -> (u64, u64) {
        match self {
            TestBroker::Nats(n) => {
                let js = n.js().await;
                let stream = js.get_stream(STREAM).await.unwrap();
                let mut c: async_nats::jetstream::consumer::PullConsumer =
                    stream.get_consumer(consumer).await.unwrap();
                let i = c.info().await.unwrap();
                (i.num_pending, i.num_ack_pending as u64)
            }
            TestBroker::Redis(r) => {
                let mut con = r.con().await;
                let groups: redis::Value = redis::cmd("XINFO")
                    .arg("GROUPS")
                    .arg(STREAM)
                    .query_async(&mut con)
                    .await
                    .unwrap_or(redis::Value::Nil);
                let last: String = {
                    let v: redis::Value = redis::cmd("XREVRANGE")
                        .arg(STREAM)
                        .arg("+")
                        .arg("-")
                        .arg("COUNT")
                        .arg(1)
                        .query_async(&mut con)
                        .await
                        .unwrap();
                    weir_broker::redis::transport::parse_entries(&v)
                        .first()
                        .map(|e| e.id.clone())
                        .unwrap_or_else(|| "0-0".into())
                };
                let redis::Value::Array(groups) = groups else {
                    return (0, 0);
                };
                for g in groups {
                    let fields = redis_map(&g);
                    if fields.get("name").map(String::as_str) != Some(consumer) {
                        continue;
                    }
                    let pending: u64 = fields["pending"].parse().unwrap();
                    let delivered = fields["last-delivered-id"].clone();
                    let undelivered = u64::from(delivered != last && last != "0-0");
                    return (undelivered, pending);
                }
                (u64::from(last != "0-0"), 0)
            }
            TestBroker::Rabbitmq(r) => {
                let q = format!("{STREAM}.{consumer}");
                r.queue_counts(&q).unwrap_or((u64::MAX, u64::MAX))
            }
            // A group's offsets tell delivered-and-unsettled from undelivered apart only for the
            // member that holds the records: both are "not committed".
            TestBroker::Kafka(k) => {
                let group = weir_broker::kafka::group_id(STREAM, consumer);
                (kafka::uncommitted(k, STREAM, &group).await, 0)
            }
        }
    }

    /// Waits until `consumer` has nothing undelivered or unsettled.
    pub async fn wait_settled(&self, consumer: &str, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        loop {
            let (pending, unacked) = self.backlog(consumer).await;
            if pending == 0 && unacked == 0 {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "consumer not settled: undelivered {pending}, unacknowledged {unacked}"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Whether the processed-event store holds `consumer`'s record of `id`.
    pub async fn processed(&self, consumer: &str, id: &str) -> bool {
        let key = weir_proxy::bridge::cloudevents::processed_key(consumer, id);
        match self {
            TestBroker::Nats(n) => {
                let kv = n
                    .js()
                    .await
                    .get_key_value("weir_processed_shop_orders")
                    .await
                    .unwrap();
                kv.get(key).await.unwrap().is_some()
            }
            TestBroker::Redis(r) => {
                let mut con = r.con().await;
                let n: i64 = redis::cmd("EXISTS")
                    .arg(weir_broker::redis::processed_record(STREAM, &key))
                    .query_async(&mut con)
                    .await
                    .unwrap();
                n == 1
            }
            TestBroker::Rabbitmq(r) => {
                // Reads the processed-event stream from its start until it is quiet.
                let (conn, ch) = r.channel().await;
                ch.basic_qos(1000, Default::default()).await.unwrap();
                let mut args = lapin::types::FieldTable::default();
                args.insert(
                    "x-stream-offset".into(),
                    lapin::types::AMQPValue::LongString("first".into()),
                );
                let mut c = ch
                    .basic_consume(
                        "weir_processed_shop_orders".into(),
                        "probe".into(),
                        Default::default(),
                        args,
                    )
                    .await
                    .unwrap();
                let mut found = false;
                while let Ok(Some(Ok(d))) =
                    tokio::time::timeout(Duration::from_millis(500), c.next()).await
                {
                    found |= d.data == key.as_bytes();
                    let _ = d.ack(Default::default()).await;
                }
                let _ = conn.close(200, "ok".into()).await;
                found
            }
            TestBroker::Kafka(k) => {
                let topic = weir_broker::queue::processed_bucket(STREAM);
                kafka::keys(k, &topic).await.contains(&key)
            }
        }
    }
}

/// A flat `[name, value, ...]` reply as a map of strings.
fn redis_map(v: &redis::Value) -> BTreeMap<String, String> {
    let redis::Value::Array(a) = v else {
        return BTreeMap::new();
    };
    let s = |v: &redis::Value| match v {
        redis::Value::BulkString(b) => String::from_utf8_lossy(b).into_owned(),
        redis::Value::SimpleString(s) => s.clone(),
        redis::Value::Int(i) => i.to_string(),
        _ => String::new(),
    };
    a.chunks(2)
        .filter(|kv| kv.len() == 2)
        .map(|kv| (s(&kv[0]), s(&kv[1])))
        .collect()
}

/// AMQP properties carrying `headers`, persistent, `message_id` = the `ce-id` among them (as a
/// sidecar publishes an event), none without one.
fn rabbit_props(headers: &[(&str, &str)]) -> lapin::BasicProperties {
    let mut h = lapin::types::FieldTable::default();
    for (k, v) in headers {
        h.insert(
            (*k).into(),
            lapin::types::AMQPValue::LongString((*v).into()),
        );
    }
    let p = lapin::BasicProperties::default()
        .with_headers(h)
        .with_delivery_mode(2);
    match headers.iter().find(|(k, _)| *k == "ce-id") {
        Some((_, id)) => p.with_message_id((*id).into()),
        None => p,
    }
}

/// Publishes to the queue's exchange as a sidecar does (persistent, `message_id` the `ce-id`) and
/// waits for the
/// broker's confirmation, which must be an ack (the event reached a bound queue).
pub async fn rabbit_publish(ch: &lapin::Channel, headers: &[(&str, &str)], body: &[u8]) {
    let c = ch
        .basic_publish(
            STREAM.into(),
            SUBJECT.into(),
            lapin::options::BasicPublishOptions {
                mandatory: true,
                ..Default::default()
            },
            body,
            rabbit_props(headers),
        )
        .await
        .unwrap()
        .await
        .unwrap();
    assert_eq!(
        c,
        lapin::Confirmation::Ack(None),
        "published to a bound queue"
    );
}
