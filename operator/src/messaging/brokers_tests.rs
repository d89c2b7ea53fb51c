//! Each kind's admin ([`weir_broker::admin`]) against a real `redis-server` and
//! `rabbitmq-server` on free loopback ports: declared, redeclared, figures, deleted.

use lapin::options::{BasicPublishOptions, ConfirmSelectOptions};
use weir_broker::admin::{Admin, BrokerAdmin, connect};
use weir_broker::credentials::Credentials;
use weir_broker::topology::Topology;
use weir_crds::broker::BrokerKind;
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
