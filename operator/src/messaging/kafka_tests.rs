//! Kafka's admin ([`weir_broker::kafka::admin`]) against a real Kafka-protocol broker (the
//! test kit's Tansu, or `WEIR_KAFKA_BOOTSTRAP`): a Queue's topics declared with their
//! partitions, grown, a shrink and a replication change refused naming the field, the consumer
//! groups of the Queue listed and deleted, figures read, and the Queue deleted.
//!
//! Tansu reports a wrong high watermark, so the message and lag figures are checked in the
//! unit tests of the admin module against recorded numbers; here only what any Kafka answers
//! right: the consumers asked about are all there, and a deleted topic has nothing.

use rdkafka::ClientConfig;
use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer, StreamConsumer};
use rdkafka::producer::{FutureProducer, FutureRecord};
use std::time::Duration;
use weir_broker::admin::{Admin, BrokerAdmin, connect};
use weir_broker::credentials::Credentials;
use weir_broker::topology::Topology;
use weir_crds::broker::BrokerKind;
use weir_testkit::KafkaServer;

fn spec(yaml: &str) -> weir_crds::queue::QueueSpec {
    serde_yaml::from_str(yaml).unwrap()
}

fn config(b: &BrokerAdmin) -> ClientConfig {
    let BrokerAdmin::Kafka(k) = b else {
        panic!("a Kafka connection")
    };
    k.client_config()
}

/// Partition count of each topic, as the broker's metadata says (0: no such topic).
fn partitions(b: &BrokerAdmin, topic: &str) -> usize {
    let c: BaseConsumer = config(b).create().unwrap();
    let m = c
        .fetch_metadata(Some(topic), Duration::from_secs(5))
        .unwrap();
    m.topics()
        .first()
        .filter(|t| t.error().is_none())
        .map_or(0, |t| t.partitions().len())
}

/// Reads `n` events of `topic` as group `group` and commits them, as a consuming sidecar does.
async fn consume_and_commit(b: &BrokerAdmin, topic: &str, group: &str, n: usize) {
    let c: StreamConsumer = config(b)
        .set("group.id", group)
        .set("enable.auto.commit", "false")
        .set("auto.offset.reset", "earliest")
        .set("session.timeout.ms", "6000")
        .set("heartbeat.interval.ms", "300")
        .create()
        .unwrap();
    c.subscribe(&[topic]).unwrap();
    for i in 0..n {
        let m = tokio::time::timeout(Duration::from_secs(30), c.recv())
            .await
            .unwrap_or_else(|_| panic!("event {i} of {n} within 30 s"))
            .unwrap();
        c.commit_message(&m, CommitMode::Sync).unwrap();
    }
}

#[tokio::test]
async fn kafka_topics_partitions_groups_figures_and_delete() {
    if KafkaServer::require().is_none() {
        return;
    }
    let server = KafkaServer::start();
    let b = connect(BrokerKind::Kafka, &server.url(), &Credentials::default())
        .await
        .unwrap();
    assert!(
        b.server_version().await.starts_with("Kafka protocol"),
        "{}",
        b.server_version().await
    );
    let queue = |partitions: i32, replicas: i32| {
        Topology::new(
            "shop",
            "orders",
            &spec(&format!(
                "{{broker: k, partitions: {partitions}, replicas: {replicas}, maxAge: 1h, \
                 maxBytes: 1000000, deadLetter: {{maxAge: 24h}}}}"
            )),
        )
        .unwrap()
    };
    let t = queue(2, 1);
    b.declare_queue(&t).await.unwrap();
    b.declare_queue(&t).await.unwrap(); // idempotent
    assert_eq!(partitions(&b, "weir_shop_orders"), 2);
    assert_eq!(partitions(&b, "weir_shop_orders_dlq"), 1);
    assert_eq!(
        partitions(&b, "weir_processed_shop_orders"),
        1,
        "the processed-event topic, declared with the Queue"
    );

    // Partitions grow in place (CreatePartitions), where the broker can: Tansu cannot, and the
    // failure names the field.
    let grown = queue(4, 1);
    let have = if server.is_local() {
        let e = b.declare_queue(&grown).await.unwrap_err();
        assert!(e.to_string().starts_with("spec.partitions: "), "{e}");
        assert!(e.to_string().contains("from 2 to 4"), "{e}");
        2
    } else {
        b.declare_queue(&grown).await.unwrap();
        4
    };
    assert_eq!(partitions(&b, "weir_shop_orders"), have);

    // They never shrink, and the replication factor stays: both name the field.
    let e = b.declare_queue(&queue(1, 1)).await.unwrap_err();
    assert_eq!(e.reason(), "InvalidSpec");
    assert!(e.to_string().starts_with("spec.partitions: "), "{e}");
    assert!(
        e.to_string().contains(&format!("has {have} partitions")),
        "{e}"
    );
    assert_eq!(partitions(&b, "weir_shop_orders"), have, "left as it was");
    let e = b.declare_queue(&queue(have as i32, 3)).await.unwrap_err();
    assert_eq!(e.reason(), "InvalidSpec");
    assert!(e.to_string().starts_with("spec.replicas: "), "{e}");
    let t = queue(have as i32, 1);

    // A retention change the broker refuses to alter is a refused setting, not a failure
    // (Tansu implements no AlterConfigs; a real Kafka applies it).
    let longer = Topology::new(
        "shop",
        "orders",
        &spec(&format!(
            "{{broker: k, partitions: {have}, maxAge: 2h, maxBytes: 1000000, \
             deadLetter: {{maxAge: 24h}}}}"
        )),
    )
    .unwrap();
    b.declare_queue(&longer).await.unwrap();
    let refused = b.refused_settings(&longer);
    if server.is_local() {
        assert!(
            refused.iter().any(|r| r.starts_with("spec.maxAge (")),
            "{refused:?}"
        );
    } else {
        assert_eq!(refused, Vec::<String>::new());
    }

    // Events, and a consumer group as a consuming sidecar makes it.
    let p: FutureProducer = config(&b).set("acks", "all").create().unwrap();
    for i in 0..6 {
        p.send(
            FutureRecord::to("weir_shop_orders")
                .payload(&format!("{{\"n\":{i}}}"))
                .key(&format!("order-{i}")),
            Duration::from_secs(5),
        )
        .await
        .unwrap_or_else(|(e, _)| panic!("send {i}: {e}"));
    }
    consume_and_commit(&b, "weir_shop_orders", "weir_shop_orders.billing", 2).await;
    // Another Queue's group is not this Queue's.
    consume_and_commit(&b, "weir_shop_orders", "weir_shop_orders_x.billing", 1).await;
    assert_eq!(
        b.managed_consumers(&t, &[]).await.unwrap(),
        ["billing"],
        "the groups named <stream>.<microservice>"
    );
    let f = b
        .figures(&t, &["billing".into(), "mailer".into()])
        .await
        .unwrap();
    assert_eq!(
        f.pending.keys().collect::<Vec<_>>(),
        ["billing", "mailer"],
        "{f:?}"
    );
    assert!(f.dead_letters.is_some(), "dead letters are enabled");

    assert!(b.delete_consumer(&t, "billing").await.unwrap());
    assert!(!b.delete_consumer(&t, "billing").await.unwrap());
    assert_eq!(
        b.managed_consumers(&t, &[]).await.unwrap(),
        Vec::<String>::new()
    );

    b.delete_queue(&t, &[]).await.unwrap();
    assert_eq!(partitions(&b, "weir_shop_orders"), 0, "topic deleted");
    assert_eq!(
        partitions(&b, "weir_shop_orders_dlq"),
        0,
        "dead-letter topic deleted"
    );
    assert_eq!(
        partitions(&b, "weir_processed_shop_orders"),
        0,
        "processed-event topic deleted"
    );
    let f = b.figures(&t, &[]).await.unwrap();
    assert_eq!((f.messages, f.dead_letters), (0, Some(0)));
    b.delete_queue(&t, &[]).await.unwrap(); // nothing left: no error
}

#[tokio::test]
async fn kafka_url_and_credentials_mistakes_are_refused_before_dialing() {
    let e = connect(BrokerKind::Kafka, "kafka://k", &Credentials::default())
        .await
        .err()
        .unwrap();
    assert_eq!(e.reason(), "BrokerUnreachable");
    assert!(e.to_string().contains("is not host:port"), "{e}");
    let with_ca = Credentials {
        ca: Some("PEM".into()),
        ..Credentials::default()
    };
    let e = connect(BrokerKind::Kafka, "kafka://127.0.0.1:9", &with_ca)
        .await
        .err()
        .unwrap();
    assert_eq!(e.reason(), "InvalidCredentials");
    assert!(e.to_string().contains("kafka+ssl://"), "{e}");
}
