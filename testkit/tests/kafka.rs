//! The Kafka test broker is a real Kafka-protocol server: a librdkafka producer (idempotent,
//! `acks=all`, as the sidecar publishes) and a consumer group (as a consuming sidecar reads),
//! configured by `weir_broker::kafka::Bootstrap` from the broker's `kafka://` URL, move messages
//! with their headers and keys through it; a SIGKILL ends it and a restart serves again on the
//! same port, and on the durable storage (`KafkaServer::start_durable`) nothing stored or
//! committed before the SIGKILL is lost.

use std::time::Duration;

use rdkafka::Message;
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::consumer::{CommitMode, Consumer, StreamConsumer};
use rdkafka::message::{Header, Headers, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord};
use weir_broker::credentials::Credentials;
use weir_broker::kafka::{Bootstrap, group_id, topic};
use weir_testkit::KafkaServer;

fn config(k: &KafkaServer) -> rdkafka::ClientConfig {
    Bootstrap::parse(&k.url())
        .expect("the kit's URL is a Kafka URL")
        .client_config(&Credentials::default())
        .expect("no credentials")
}

async fn create_topic(k: &KafkaServer, name: &str, partitions: i32) {
    let admin: AdminClient<DefaultClientContext> = config(k).create().expect("admin client");
    let r = admin
        .create_topics(
            &[NewTopic::new(name, partitions, TopicReplication::Fixed(1))],
            &AdminOptions::new().operation_timeout(Some(Duration::from_secs(5))),
        )
        .await
        .expect("create_topics");
    for t in r {
        t.unwrap_or_else(|(t, e)| panic!("create topic {t}: {e}"));
    }
}

fn producer(k: &KafkaServer) -> FutureProducer {
    config(k)
        .set("enable.idempotence", "true")
        .set("acks", "all")
        .create()
        .expect("producer")
}

fn consumer(k: &KafkaServer, group: &str) -> StreamConsumer {
    config(k)
        .set("group.id", group)
        .set("enable.auto.commit", "false")
        .set("auto.offset.reset", "earliest")
        // A short session: the broker waits about half of it before a lone member joins.
        .set("session.timeout.ms", "6000")
        .set("heartbeat.interval.ms", "300")
        .create()
        .expect("consumer")
}

#[tokio::test]
async fn a_group_reads_what_an_idempotent_producer_wrote_with_headers_and_keys() {
    if KafkaServer::require().is_none() {
        return;
    }
    let k = KafkaServer::start();
    let stream = weir_broker::queue::stream_name("kit", "orders");
    let t = topic(&stream);
    create_topic(&k, &t, 3).await;

    let p = producer(&k);
    for i in 0..20 {
        let payload = format!("event {i}");
        let key = format!("order-{}", i % 4);
        let headers = OwnedHeaders::new().insert(Header {
            key: "ce-id",
            value: Some(&format!("id-{i}")),
        });
        p.send(
            FutureRecord::to(&t)
                .payload(&payload)
                .key(&key)
                .headers(headers),
            Duration::from_secs(5),
        )
        .await
        .unwrap_or_else(|(e, _)| panic!("send {i}: {e}"));
    }

    let c = consumer(&k, &group_id(&stream, "billing"));
    c.subscribe(&[&t]).expect("subscribe");
    let mut seen = std::collections::BTreeMap::new();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while seen.len() < 20 {
        let m = tokio::time::timeout_at(deadline, c.recv())
            .await
            .unwrap_or_else(|_| panic!("only {} of 20 messages within 30 s", seen.len()))
            .expect("recv");
        let id = m
            .headers()
            .and_then(|h| h.iter().find(|h| h.key == "ce-id"))
            .and_then(|h| h.value)
            .map(|v| String::from_utf8_lossy(v).into_owned())
            .expect("the ce-id header came through");
        let body = String::from_utf8_lossy(m.payload().expect("a payload")).into_owned();
        assert_eq!(id, format!("id-{}", body.trim_start_matches("event ")));
        let key = String::from_utf8_lossy(m.key().expect("a key")).into_owned();
        seen.insert(id, (key, m.partition()));
        c.commit_message(&m, CommitMode::Sync).expect("commit");
    }
    // One key, one partition: the order of an order's events is kept.
    let mut partition_of_key = std::collections::BTreeMap::new();
    for (key, partition) in seen.values() {
        let p = partition_of_key.entry(key.clone()).or_insert(*partition);
        assert_eq!(*p, *partition, "key {key} on two partitions");
    }
}

#[tokio::test]
async fn a_killed_broker_restarts_on_its_port_and_serves_again() {
    if KafkaServer::require().is_none() {
        return;
    }
    let mut k = KafkaServer::start();
    if !k.is_local() {
        eprintln!("SKIP: WEIR_KAFKA_BOOTSTRAP names a broker this test may not kill");
        return;
    }
    create_topic(&k, "weir_kit_before", 1).await;
    k.kill9();
    assert!(
        !weir_broker::local::listening(
            k.bootstrap().rsplit(':').next().unwrap().parse().unwrap(),
            Duration::from_millis(200)
        ),
        "SIGKILL ended the broker"
    );
    k.restart();
    // Tansu's memory storage starts empty: the topic is created again, and used.
    create_topic(&k, "weir_kit_after", 1).await;
    producer(&k)
        .send(
            FutureRecord::to("weir_kit_after").payload("x").key("k"),
            Duration::from_secs(5),
        )
        .await
        .unwrap_or_else(|(e, _)| panic!("send after restart: {e}"));
}

/// Sends the numbers of `range` to `topic`, each acknowledged, keyed `key` (else spread by the
/// partitioner).
async fn send_numbers(
    p: &FutureProducer,
    topic: &str,
    range: std::ops::Range<usize>,
    key: Option<&str>,
) {
    for i in range {
        let payload = i.to_string();
        let mut record = FutureRecord::<str, str>::to(topic).payload(&payload);
        if let Some(key) = key {
            record = record.key(key);
        }
        p.send(record, Duration::from_secs(10))
            .await
            .unwrap_or_else(|(e, _)| panic!("send {i}: {e}"));
    }
}

/// Tansu on its `s3://` storage: 200 records acknowledged (`acks=all`) and a group's commit of
/// the first 100 outlive a SIGKILL of the broker; after the restart the group reads on from 100,
/// each record once, and the producer goes on (a new idempotent producer, as a restarted sidecar
/// would have, and the one from before the crash).
#[tokio::test]
async fn a_durable_broker_loses_nothing_acknowledged_to_a_kill9() {
    let Some(mut k) = KafkaServer::start_durable() else {
        return;
    };
    create_topic(&k, "weir_kit_durable", 1).await;
    let p = producer(&k);
    send_numbers(&p, "weir_kit_durable", 0..200, Some("k")).await;
    let group = "weir_kit_durable.billing";
    {
        let c = consumer(&k, group);
        c.subscribe(&["weir_kit_durable"]).unwrap();
        for i in 0..100 {
            let m = tokio::time::timeout(Duration::from_secs(20), c.recv())
                .await
                .expect("a record within 20 s")
                .unwrap();
            assert_eq!(m.payload(), Some(format!("{i}").as_bytes()));
            if i == 99 {
                c.commit_message(&m, CommitMode::Sync).unwrap();
            }
        }
    }
    k.kill9();
    k.restart();
    let c = consumer(&k, group);
    c.subscribe(&["weir_kit_durable"]).unwrap();
    for i in 100..200 {
        let m = tokio::time::timeout(Duration::from_secs(30), c.recv())
            .await
            .unwrap_or_else(|_| panic!("record {i} after the restart within 30 s"))
            .unwrap();
        assert_eq!(
            m.payload(),
            Some(format!("{i}").as_bytes()),
            "in order, from the commit"
        );
    }
    for (name, p) in [
        ("a new producer", producer(&k)),
        ("the producer from before", p),
    ] {
        tokio::time::timeout(
            Duration::from_secs(15),
            p.send(
                FutureRecord::to("weir_kit_durable")
                    .payload("after")
                    .key("k"),
                Duration::from_secs(10),
            ),
        )
        .await
        .expect("acknowledged within 15 s")
        .unwrap_or_else(|(e, _)| panic!("{name}: {e}"));
    }
    send_numbers(&producer(&k), "weir_kit_durable", 200..300, Some("k")).await;
    // The two "after" records, then 200..300, each at an offset of its own.
    let mut got = Vec::new();
    while got.len() < 102 {
        let m = tokio::time::timeout(Duration::from_secs(30), c.recv())
            .await
            .unwrap_or_else(|_| panic!("only {} records after the restart: {got:?}", got.len()))
            .unwrap();
        got.push(String::from_utf8_lossy(m.payload().unwrap_or_default()).into_owned());
    }
    let want: Vec<String> = ["after".to_string(), "after".to_string()]
        .into_iter()
        .chain((200..300).map(|i| i.to_string()))
        .collect();
    assert_eq!(got, want);
}

/// The same across four partitions, records spread by the partitioner (no key), as a sidecar
/// publishes events without a partition key: every acknowledged record is there after the
/// broker's SIGKILL and restart.
#[tokio::test]
async fn a_durable_broker_keeps_every_partition_across_a_kill9() {
    let Some(mut k) = KafkaServer::start_durable() else {
        return;
    };
    create_topic(&k, "weir_kit_spread", 4).await;
    // One producer throughout, as a sidecar's: its idempotent state outlives the broker's crash.
    let p = producer(&k);
    send_numbers(&p, "weir_kit_spread", 0..150, None).await;
    k.kill9();
    k.restart();
    send_numbers(&p, "weir_kit_spread", 150..300, None).await;
    let c = consumer(&k, "weir_kit_spread.reader");
    c.subscribe(&["weir_kit_spread"]).unwrap();
    let mut got = std::collections::BTreeSet::new();
    while got.len() < 300 {
        match tokio::time::timeout(Duration::from_secs(30), c.recv()).await {
            Ok(m) => {
                let m = m.unwrap();
                got.insert(
                    String::from_utf8_lossy(m.payload().unwrap_or_default())
                        .parse::<usize>()
                        .unwrap(),
                );
            }
            Err(_) => {
                let missing: Vec<usize> = (0..300).filter(|i| !got.contains(i)).collect();
                panic!("{} of 300 read; missing {missing:?}", got.len());
            }
        }
    }
}
