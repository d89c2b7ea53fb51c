//! The JetStream admin ([`weir_broker::nats::admin`]) against a real `nats-server -js` on a
//! free loopback port.

use async_nats::jetstream::consumer::{self, AckPolicy};
use async_nats::jetstream::stream;
use futures::TryStreamExt;
use std::time::Duration;
use weir_broker::admin::{Admin, codes};
use weir_broker::credentials::{Auth, Credentials};
use weir_broker::nats::admin::{NatsAdmin, connect};
use weir_broker::topology::Topology;
use weir_crds::queue::QueueSpec;
use weir_testkit::NatsServer;

fn spec(yaml: &str) -> QueueSpec {
    serde_yaml::from_str(yaml).unwrap()
}

async fn broker(server: &NatsServer) -> NatsAdmin {
    connect(&server.url(), &Credentials::default())
        .await
        .unwrap()
}

#[tokio::test]
async fn a_declared_queue_has_its_stream_dead_letters_bucket_and_consumer() {
    let server = NatsServer::start();
    let b = broker(&server).await;
    assert!(!b.server_version().is_empty());
    let s = spec(
        "broker: nats\nmaxAge: 24h\nmaxMessages: 1000\nduplicateWindow: 5m\nconsumer: {maxDeliveries: 4, ackWait: 15s, backoff: [1s, 30s], maxAckPending: 50}",
    );
    let t = Topology::new("shop", "orders", &s).unwrap();
    b.declare_queue(&t).await.unwrap();
    b.declare_consumer(&t, "billing").await.unwrap();
    // Idempotent: the same declaration again changes nothing and fails nothing.
    b.declare_queue(&t).await.unwrap();
    b.declare_consumer(&t, "billing").await.unwrap();

    let js = b.jetstream();
    let mut stream = js.get_stream("weir_shop_orders").await.unwrap();
    let cfg = stream.info().await.unwrap().config.clone();
    assert_eq!(cfg.subjects, ["weir.shop.orders"]);
    assert_eq!(cfg.storage, stream::StorageType::File);
    assert_eq!(cfg.retention, stream::RetentionPolicy::Limits);
    assert_eq!(cfg.max_age, Duration::from_secs(24 * 3600));
    assert_eq!(cfg.max_messages, 1000);
    assert_eq!(cfg.duplicate_window, Duration::from_secs(300));
    assert_eq!(cfg.num_replicas, 1);

    let mut dlq = js.get_stream("weir_shop_orders_dlq").await.unwrap();
    let dcfg = dlq.info().await.unwrap().config.clone();
    assert_eq!(dcfg.subjects, ["weir.dlq.shop.orders"]);
    assert_eq!(dcfg.max_age, Duration::from_secs(336 * 3600));

    let kv = js
        .get_key_value("weir_processed_shop_orders")
        .await
        .unwrap();
    let mut kv_stream = js
        .get_stream("KV_weir_processed_shop_orders")
        .await
        .unwrap();
    assert_eq!(
        kv_stream.info().await.unwrap().config.max_age,
        Duration::from_secs(600)
    );
    drop(kv);

    let info = b
        .consumer_info("weir_shop_orders", "billing")
        .await
        .unwrap();
    assert_eq!(info.config.durable_name.as_deref(), Some("billing"));
    assert_eq!(info.config.ack_policy, AckPolicy::Explicit);
    assert_eq!(info.config.max_deliver, 4);
    assert_eq!(info.config.max_ack_pending, 50);
    assert_eq!(info.config.filter_subject, "weir.shop.orders");
    assert_eq!(
        info.config.backoff,
        [Duration::from_secs(15), Duration::from_secs(30)]
    );
    assert_eq!(b.managed_consumers(&t).await.unwrap(), ["billing"]);
}

#[tokio::test]
async fn changing_max_deliveries_updates_the_consumer_in_place() {
    let server = NatsServer::start();
    let b = broker(&server).await;
    let t = Topology::new("shop", "orders", &spec("broker: nats")).unwrap();
    b.declare_queue(&t).await.unwrap();
    b.declare_consumer(&t, "billing").await.unwrap();
    assert_eq!(
        b.consumer_info("weir_shop_orders", "billing")
            .await
            .unwrap()
            .config
            .max_deliver,
        5
    );
    let t2 = Topology::new(
        "shop",
        "orders",
        &spec("broker: nats\nconsumer: {maxDeliveries: 9, maxAckPending: 7}\nmaxMessages: 10"),
    )
    .unwrap();
    b.declare_queue(&t2).await.unwrap();
    b.declare_consumer(&t2, "billing").await.unwrap();
    let info = b
        .consumer_info("weir_shop_orders", "billing")
        .await
        .unwrap();
    assert_eq!(info.config.max_deliver, 9);
    assert_eq!(info.config.max_ack_pending, 7);
    let mut s = b.jetstream().get_stream("weir_shop_orders").await.unwrap();
    assert_eq!(s.info().await.unwrap().config.max_messages, 10);
}

#[tokio::test]
async fn an_overlapping_subject_is_a_typed_refusal_with_the_reason() {
    let server = NatsServer::start();
    let b = broker(&server).await;
    let a = Topology::new("shop", "a", &spec("broker: nats\nsubjects: [orders.>]")).unwrap();
    b.declare_queue(&a).await.unwrap();
    let c = Topology::new(
        "shop",
        "c",
        &spec("broker: nats\nsubjects: [orders.created]"),
    )
    .unwrap();
    let e = b.declare_queue(&c).await.unwrap_err();
    assert_eq!(e.code(), Some(codes::STREAM_SUBJECT_OVERLAP), "{e}");
    assert_eq!(e.reason(), "SubjectsOverlap");
    let text = e.to_string();
    assert!(text.contains("weir_shop_c"), "{text}");
    assert!(text.contains("overlap"), "{text}");
}

#[tokio::test]
async fn delete_removes_streams_bucket_and_consumers() {
    let server = NatsServer::start();
    let b = broker(&server).await;
    let t = Topology::new("shop", "orders", &spec("broker: nats")).unwrap();
    b.declare_queue(&t).await.unwrap();
    b.declare_consumer(&t, "billing").await.unwrap();
    b.declare_consumer(&t, "audit").await.unwrap();
    assert!(b.delete_consumer(&t, "audit").await.unwrap());
    assert!(
        !b.delete_consumer(&t, "audit").await.unwrap(),
        "already gone"
    );
    assert_eq!(b.managed_consumers(&t).await.unwrap(), ["billing"]);

    b.delete_queue(&t).await.unwrap();
    for s in [
        "weir_shop_orders",
        "weir_shop_orders_dlq",
        "KV_weir_processed_shop_orders",
    ] {
        assert!(!b.stream_exists(s).await.unwrap(), "{s} deleted");
    }
    b.delete_queue(&t).await.unwrap();
}

#[tokio::test]
async fn figures_match_the_broker_after_publishing() {
    let server = NatsServer::start();
    let b = broker(&server).await;
    let t = Topology::new("shop", "orders", &spec("broker: nats")).unwrap();
    b.declare_queue(&t).await.unwrap();
    b.declare_consumer(&t, "billing").await.unwrap();
    let js = b.jetstream();
    for i in 0..7 {
        js.publish("weir.shop.orders", format!("{{\"n\":{i}}}").into())
            .await
            .unwrap()
            .await
            .unwrap();
    }
    js.publish("weir.dlq.shop.orders", "{}".into())
        .await
        .unwrap()
        .await
        .unwrap();
    // Two delivered, one acked: 5 not yet delivered + 1 awaiting its ack.
    let consumer: consumer::PullConsumer = js
        .get_consumer_from_stream("billing", "weir_shop_orders")
        .await
        .unwrap();
    let mut batch = consumer.fetch().max_messages(2).messages().await.unwrap();
    let first = batch.try_next().await.unwrap().unwrap();
    first.double_ack().await.unwrap();
    let _second = batch.try_next().await.unwrap().unwrap();

    let f = b.figures(&t, &["billing".to_string()]).await.unwrap();
    assert_eq!(f.messages, 7);
    assert_eq!(f.pending["billing"], 6);
    assert_eq!(f.dead_letters, Some(1));
}

#[tokio::test]
async fn credentials_are_used_and_a_refused_login_is_a_connect_error() {
    let server = NatsServer::start_with(&["--user", "weir", "--pass", "s3cret"]);
    let ok = connect(
        &server.url(),
        &Auth::UserPassword {
            username: "weir".into(),
            password: "s3cret".into(),
        }
        .into(),
    )
    .await
    .unwrap();
    assert!(!ok.server_version().is_empty());
    let e = connect(&server.url(), &Credentials::default())
        .await
        .err()
        .unwrap();
    assert_eq!(e.reason(), "BrokerUnreachable");
    let down = connect("nats://127.0.0.1:1", &Credentials::default())
        .await
        .err()
        .unwrap();
    assert!(down.to_string().contains("127.0.0.1:1"), "{down}");
}

#[tokio::test]
async fn a_killed_server_restarts_on_its_port_with_its_file_streams() {
    let mut server = NatsServer::start();
    let b = broker(&server).await;
    let t = Topology::new("shop", "orders", &spec("broker: nats")).unwrap();
    b.declare_queue(&t).await.unwrap();
    for i in 0..20 {
        b.jetstream()
            .publish("weir.shop.orders", format!("{i}").into())
            .await
            .unwrap()
            .await
            .unwrap();
    }
    let port = server.port;
    server.kill9();
    server.restart();
    assert_eq!(server.port, port);
    let b = broker(&server).await;
    let f = b.figures(&t, &[]).await.unwrap();
    assert_eq!(f.messages, 20, "file storage survives SIGKILL");
}
