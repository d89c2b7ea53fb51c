//! `weir render` of publishing/consuming Microservices and `weir dlq` through the real binary;
//! `weir dlq` against a real `nats-server` holding dead letters put there by hand as
//! docs/messaging.md describes them.

use async_nats::HeaderMap;
use serde_json::Value;
use std::path::Path;
use std::process::{Command, Output};
use weir_broker::admin::Admin;
use weir_broker::credentials::{Auth, Credentials};
use weir_broker::nats::admin as nats_admin;
use weir_broker::topology::Topology;
use weir_testkit::{NatsServer, RabbitServer, RedisServer};

fn weir(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_weir"))
        .args(args)
        .output()
        .unwrap()
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

const BROKER: &str = "apiVersion: weir.dev/v1alpha1\nkind: Broker\nmetadata: {name: nats, namespace: shop}\nspec: {url: 'nats://nats.infra:4222', credentialsSecret: {name: nats-creds}}\n";
const QUEUE: &str = "apiVersion: weir.dev/v1alpha1\nkind: Queue\nmetadata: {name: orders, namespace: shop}\nspec:\n  broker: nats\n  eventType: order.created\n  schema: {inline: {type: object, required: [id]}}\n";
const BILLING: &str = "apiVersion: weir.dev/v1alpha1\nkind: Microservice\nmetadata: {name: billing, namespace: shop}\nspec:\n  image: billing:1\n  consumes: [{queue: orders, path: /events/order}]\n";

fn write(dir: &Path, name: &str, docs: &[&str]) -> String {
    let p = dir.join(name);
    std::fs::write(&p, docs.join("---\n")).unwrap();
    p.display().to_string()
}

#[test]
fn render_exits_2_naming_a_consumed_queue_missing_from_the_input() {
    let dir = tempfile::tempdir().unwrap();
    let f = write(dir.path(), "billing.yaml", &[BROKER, BILLING]);
    let out = weir(&["render", "-f", &f]);
    let stderr = text(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(
        stderr.contains("Microservice/billing: spec.consumes[0].queue"),
        "{stderr}"
    );
    assert!(out.stdout.is_empty());
}

#[test]
fn render_writes_the_bridge_config_and_mounts_the_broker_credentials() {
    let dir = tempfile::tempdir().unwrap();
    let f = write(dir.path(), "all.yaml", &[BROKER, QUEUE, BILLING]);
    let out = weir(&["render", "-f", &f]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let docs: Vec<serde_yaml::Value> = text(&out.stdout)
        .split("\n---\n")
        .map(|d| serde_yaml::from_str(d).unwrap())
        .collect();
    let cm = docs.iter().find(|d| d["kind"] == "ConfigMap").unwrap();
    let cfg: Value = serde_json::from_str(cm["data"]["proxy.json"].as_str().unwrap()).unwrap();
    let m = &cfg["messaging"];
    assert_eq!(m["brokerUrl"], "nats://nats.infra:4222");
    assert_eq!(m["credentialsFile"], "/etc/weir/broker");
    let c = &m["consumes"][0];
    assert_eq!(c["stream"], "weir_shop_orders");
    assert_eq!(c["consumer"], "billing");
    assert_eq!(c["deadLetterSubject"], "weir.dlq.shop.orders");
    assert_eq!(c["schema"]["required"][0], "id");
    let dep = docs.iter().find(|d| d["kind"] == "Deployment").unwrap();
    let pod = &dep["spec"]["template"]["spec"];
    let vols = serde_yaml::to_string(&pod["volumes"]).unwrap();
    assert!(vols.contains("secretName: nats-creds"), "{vols}");
    let mounts = serde_yaml::to_string(&pod["initContainers"][0]["volumeMounts"]).unwrap();
    assert!(mounts.contains("mountPath: /etc/weir/broker"), "{mounts}");
}

/// Puts a dead letter on the DLQ stream the way the sidecar does (docs/messaging.md).
async fn dead_letter(js: &async_nats::jetstream::Context, id: &str, seq: u64, reason: &str) {
    let mut h = HeaderMap::new();
    for (k, v) in [
        ("ce-specversion", "1.0"),
        ("ce-id", id),
        ("ce-source", "weir://shop/web"),
        ("ce-type", "order.created"),
        ("ce-time", "2026-11-26T01:00:00Z"),
        ("content-type", "application/json"),
        (
            "traceparent",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
        ),
        ("Weir-Original-Subject", "weir.shop.orders"),
        ("Weir-Original-Seq", &seq.to_string()),
        ("Weir-Consumer", "billing"),
        ("Weir-Delivery-Count", "5"),
        ("Weir-Reason", reason),
        ("Weir-Last-Error", "HTTP 500 from POST /events/order"),
        ("Weir-Dead-Lettered-At", "2026-11-26T01:02:03Z"),
    ] {
        h.insert(k, v);
    }
    js.publish_with_headers(
        "weir.dlq.shop.orders",
        h,
        format!("{{\"id\":\"{id}\"}}").into(),
    )
    .await
    .unwrap()
    .await
    .unwrap();
}

#[tokio::test]
async fn dlq_list_show_and_replay_through_the_binary() {
    let server = NatsServer::start();
    let url = server.url();
    let b = nats_admin::connect(&url, &Credentials::default())
        .await
        .unwrap();
    let t = Topology::new(
        "shop",
        "orders",
        &serde_yaml::from_str("broker: nats").unwrap(),
    )
    .unwrap();
    b.declare_queue(&t).await.unwrap();
    let js = b.jetstream().clone();
    dead_letter(&js, "ev-1", 11, "max-deliveries").await;
    dead_letter(&js, "ev-2", 12, "rejected").await;
    dead_letter(&js, "ev-3", 13, "schema").await;

    // The binary blocks this test's thread while it runs: fine, the broker is another process.
    let dlq = |args: &[&str]| {
        let mut all = vec!["dlq"];
        all.extend_from_slice(args);
        all.extend_from_slice(&["-n", "shop", "--broker-url", &url]);
        weir(&all)
    };

    // list: a table with reason, deliveries and time; --json for machines.
    let out = dlq(&["list", "orders"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let table = text(&out.stdout);
    let lines: Vec<&str> = table.lines().collect();
    assert_eq!(lines.len(), 4, "{table}");
    assert!(lines[0].starts_with("SEQ"), "{table}");
    assert!(
        lines[1].contains("ev-1")
            && lines[1].contains("max-deliveries")
            && lines[1].contains("2026-11-26T01:02:03Z"),
        "{table}"
    );
    assert!(
        lines[2].contains("rejected") && lines[3].contains("schema"),
        "{table}"
    );
    let out = dlq(&["list", "orders", "--json"]);
    let rows: Vec<Value> = text(&out.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(rows[0]["seq"], 1);
    assert_eq!(rows[0]["eventId"], "ev-1");
    assert_eq!(rows[0]["deliveryCount"], 5);
    assert_eq!(rows[0]["consumer"], "billing");
    assert_eq!(rows[0]["originalSeq"], 11);

    // show: headers and body.
    let out = dlq(&["show", "orders", "--seq", "2"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let shown = text(&out.stdout);
    assert!(shown.contains("Weir-Reason: rejected"), "{shown}");
    assert!(shown.contains("Weir-Last-Error: HTTP 500"), "{shown}");
    assert!(shown.contains("\"id\": \"ev-2\""), "{shown}");
    let out = dlq(&["show", "orders", "--seq", "99"]);
    assert_eq!(out.status.code(), Some(2));

    // replay one: republished on the original subject with the replay message id, then gone
    // from the dead letters.
    let out = dlq(&["replay", "orders", "--seq", "2"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(text(&out.stdout).contains("1 replayed, 0 failed"));
    let stream = js.get_stream("weir_shop_orders").await.unwrap();
    let m = stream.get_raw_message(1).await.unwrap();
    assert_eq!(m.subject.as_str(), "weir.shop.orders");
    assert_eq!(
        m.headers.get("Nats-Msg-Id").unwrap().as_str(),
        "ev-2:replay:2"
    );
    assert_eq!(m.headers.get("ce-id").unwrap().as_str(), "ev-2");
    assert_eq!(m.headers.get("ce-type").unwrap().as_str(), "order.created");
    assert!(m.headers.get("traceparent").is_some());
    assert!(
        m.headers.get("Weir-Reason").is_none(),
        "only the event's own headers"
    );
    assert_eq!(&m.payload[..], br#"{"id":"ev-2"}"#);
    let f = b.figures(&t, &[]).await.unwrap();
    assert_eq!((f.messages, f.dead_letters), (1, Some(2)));

    // replay all: the rest, and the dead-letter stream is empty.
    let out = dlq(&["replay", "orders", "--all"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(text(&out.stdout).contains("2 replayed, 0 failed"));
    let f = b.figures(&t, &[]).await.unwrap();
    assert_eq!((f.messages, f.dead_letters), (3, Some(0)));
    let out = dlq(&["list", "orders"]);
    assert_eq!(text(&out.stdout).lines().count(), 1, "only the header");
}

/// A dead letter of a message another producer wrote without a CloudEvents envelope has no
/// `ce-id`: it is listed and replayed like any other.
#[tokio::test]
async fn dlq_replays_a_dead_letter_without_an_event_id() {
    let server = NatsServer::start();
    let url = server.url();
    let b = nats_admin::connect(&url, &Credentials::default())
        .await
        .unwrap();
    let t = Topology::new(
        "shop",
        "orders",
        &serde_yaml::from_str("broker: nats").unwrap(),
    )
    .unwrap();
    b.declare_queue(&t).await.unwrap();
    let js = b.jetstream().clone();
    let mut h = HeaderMap::new();
    for (k, v) in [
        ("Weir-Original-Subject", "weir.shop.orders"),
        ("Weir-Original-Seq", "7"),
        ("Weir-Consumer", "billing"),
        ("Weir-Delivery-Count", "1"),
        ("Weir-Reason", "rejected"),
        ("Weir-Last-Error", "HTTP 400"),
        ("Weir-Dead-Lettered-At", "2026-11-26T01:02:03Z"),
    ] {
        h.insert(k, v);
    }
    js.publish_with_headers("weir.dlq.shop.orders", h, r#"{"legacy":1}"#.into())
        .await
        .unwrap()
        .await
        .unwrap();
    let dlq = |args: &[&str]| {
        let mut all = vec!["dlq"];
        all.extend_from_slice(args);
        all.extend_from_slice(&["-n", "shop", "--broker-url", &url]);
        weir(&all)
    };
    let table = text(&dlq(&["list", "orders"]).stdout);
    assert!(
        table.lines().nth(1).unwrap().contains("rejected"),
        "{table}"
    );
    let out = dlq(&["replay", "orders", "--all"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(
        text(&out.stdout).contains("1 replayed, 0 failed"),
        "{}",
        text(&out.stdout)
    );
    let stream = js.get_stream("weir_shop_orders").await.unwrap();
    let m = stream.get_raw_message(1).await.unwrap();
    assert_eq!(m.subject.as_str(), "weir.shop.orders");
    assert_eq!(
        m.headers.get("Nats-Msg-Id").unwrap().as_str(),
        "weir_shop_orders_dlq:replay:1"
    );
    assert!(
        m.headers.get("ce-id").is_none(),
        "still without an envelope"
    );
    assert_eq!(&m.payload[..], br#"{"legacy":1}"#);
    let f = b.figures(&t, &[]).await.unwrap();
    assert_eq!((f.messages, f.dead_letters), (1, Some(0)));
}

#[test]
fn dlq_without_a_reachable_broker_fails_plainly() {
    let out = weir(&[
        "dlq",
        "list",
        "orders",
        "--broker-url",
        "nats://127.0.0.1:1",
    ]);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        text(&out.stderr).contains("cannot connect"),
        "{}",
        text(&out.stderr)
    );
}

/// A minimal Kubernetes API for `weir dlq` without `--broker-url`: answers GETs from `objects`
/// (path → JSON) and 404 otherwise, one connection per request.
fn fake_apiserver(objects: Vec<(String, Value)>) -> std::net::SocketAddr {
    use std::io::{BufRead, BufReader, Write};
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(mut stream) = stream else { continue };
            let mut reader = BufReader::new(stream.try_clone().unwrap());
            let mut request_line = String::new();
            if reader.read_line(&mut request_line).is_err() {
                continue;
            }
            // Skip the headers.
            loop {
                let mut h = String::new();
                if reader.read_line(&mut h).is_err() || h == "\r\n" || h.is_empty() {
                    break;
                }
            }
            let path = request_line
                .split_whitespace()
                .nth(1)
                .unwrap_or("")
                .split('?')
                .next()
                .unwrap_or("")
                .to_string();
            let (status, body) = match objects.iter().find(|(p, _)| *p == path) {
                Some((_, v)) => ("200 OK", v.to_string()),
                None => (
                    "404 Not Found",
                    serde_json::json!({"kind": "Status", "apiVersion": "v1", "status": "Failure", "reason": "NotFound", "code": 404, "message": format!("{path} not found")}).to_string(),
                ),
            };
            let _ = write!(
                stream,
                "HTTP/1.1 {status}\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
                body.len()
            );
        }
    });
    addr
}

#[tokio::test]
async fn dlq_finds_the_broker_and_its_credentials_through_the_cluster() {
    let server = NatsServer::start_with(&["--user", "weir", "--pass", "s3cret"]);
    let b = nats_admin::connect(
        &server.url(),
        &Auth::UserPassword {
            username: "weir".into(),
            password: "s3cret".into(),
        }
        .into(),
    )
    .await
    .unwrap();
    let t = Topology::new(
        "shop",
        "orders",
        &serde_yaml::from_str("broker: nats").unwrap(),
    )
    .unwrap();
    b.declare_queue(&t).await.unwrap();
    dead_letter(b.jetstream(), "ev-9", 1, "schema").await;

    let q: Value = serde_yaml::from_str(QUEUE).unwrap();
    let mut broker: Value = serde_yaml::from_str(BROKER).unwrap();
    broker["spec"]["url"] = Value::String(server.url());
    let secret = serde_json::json!({
        "apiVersion": "v1", "kind": "Secret",
        "metadata": {"name": "nats-creds", "namespace": "shop"},
        "data": {"username": "d2Vpcg==", "password": "czNjcmV0"},
    });
    let api = fake_apiserver(vec![
        (
            "/apis/weir.dev/v1alpha1/namespaces/shop/queues/orders".into(),
            q,
        ),
        (
            "/apis/weir.dev/v1alpha1/namespaces/shop/brokers/nats".into(),
            broker,
        ),
        ("/api/v1/namespaces/shop/secrets/nats-creds".into(), secret),
    ]);
    let dir = tempfile::tempdir().unwrap();
    let kubeconfig = dir.path().join("kubeconfig");
    std::fs::write(
        &kubeconfig,
        format!(
            "apiVersion: v1\nkind: Config\nclusters:\n- name: fake\n  cluster: {{server: 'http://{api}'}}\nusers:\n- name: me\n  user: {{}}\ncontexts:\n- name: fake\n  context: {{cluster: fake, user: me}}\ncurrent-context: fake\n"
        ),
    )
    .unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_weir"))
        .args(["dlq", "list", "orders", "-n", "shop", "--json"])
        .env("KUBECONFIG", &kubeconfig)
        .env_remove("WEIR_BROKER_URL")
        .env_remove("KUBERNETES_SERVICE_HOST")
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", text(&out.stderr));
    let row: Value = serde_json::from_str(text(&out.stdout).lines().next().unwrap()).unwrap();
    assert_eq!(row["eventId"], "ev-9");
    assert_eq!(row["reason"], "schema");

    // A Queue that is not there: the error names it.
    let out = Command::new(env!("CARGO_BIN_EXE_weir"))
        .args(["dlq", "list", "nope", "-n", "shop"])
        .env("KUBECONFIG", &kubeconfig)
        .env_remove("WEIR_BROKER_URL")
        .env_remove("KUBERNETES_SERVICE_HOST")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(
        text(&out.stderr).contains("Queue shop/nope"),
        "{}",
        text(&out.stderr)
    );
}

/// The dead-letter headers the sidecar writes, for the Redis and RabbitMQ tests.
fn letter_headers(id: &str, origin: &str, reason: &str) -> Vec<(String, String)> {
    [
        ("ce-specversion", "1.0"),
        ("ce-id", id),
        ("ce-type", "order.created"),
        ("content-type", "application/json"),
        ("weir-original-subject", origin),
        ("weir-consumer", "billing"),
        ("weir-delivery-count", "3"),
        ("weir-reason", reason),
        ("weir-last-error", "HTTP 503"),
        ("weir-dead-lettered-at", "2026-11-26T01:02:03Z"),
    ]
    .iter()
    .map(|(k, v)| (k.to_string(), v.to_string()))
    .collect()
}

#[tokio::test]
async fn dlq_list_show_and_replay_on_redis() {
    let server = RedisServer::start();
    let url = server.url();
    let client = redis::Client::open(url.as_str()).unwrap();
    let mut con = client.get_multiplexed_async_connection().await.unwrap();
    let mut ids = Vec::new();
    for (id, reason) in [("ev-1", "max-deliveries"), ("ev-2", "rejected")] {
        let mut cmd = redis::cmd("XADD");
        cmd.arg("weir_shop_orders_dlq").arg("*");
        for (k, v) in letter_headers(id, "weir_shop_orders", reason) {
            cmd.arg(k).arg(v);
        }
        cmd.arg("data").arg(format!("{{\"id\":\"{id}\"}}"));
        ids.push(cmd.query_async::<String>(&mut con).await.unwrap());
    }
    let dlq = |args: &[&str]| {
        let mut a = vec!["dlq"];
        a.extend_from_slice(args);
        a.extend_from_slice(&["-n", "shop", "--broker-url", url.as_str()]);
        weir(&a)
    };
    let out = dlq(&["list", "orders", "--json"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let rows: Vec<Value> = text(&out.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(rows.len(), 2);
    assert_eq!(rows[0]["seq"], ids[0].as_str(), "the entry id");
    assert_eq!(rows[0]["reason"], "max-deliveries");
    assert_eq!(rows[1]["eventId"], "ev-2");
    let out = dlq(&["show", "orders", "--seq", &ids[1]]);
    assert!(
        text(&out.stdout).contains("weir-reason: rejected"),
        "{}",
        text(&out.stdout)
    );
    assert!(text(&out.stdout).contains("\"id\": \"ev-2\""));
    assert_eq!(
        dlq(&["show", "orders", "--seq", "1-99"]).status.code(),
        Some(2)
    );

    let out = dlq(&["replay", "orders", "--seq", &ids[1]]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(text(&out.stdout).contains("1 replayed, 0 failed"));
    let v: redis::Value = redis::cmd("XRANGE")
        .arg("weir_shop_orders")
        .arg("-")
        .arg("+")
        .query_async(&mut con)
        .await
        .unwrap();
    let shown = format!("{v:?}");
    assert!(
        shown.contains("ev-2") && !shown.contains("weir-reason"),
        "{shown}"
    );
    let out = dlq(&["replay", "orders", "--all"]);
    assert!(text(&out.stdout).contains("1 replayed, 0 failed"));
    let left: u64 = redis::cmd("XLEN")
        .arg("weir_shop_orders_dlq")
        .query_async(&mut con)
        .await
        .unwrap();
    let back: u64 = redis::cmd("XLEN")
        .arg("weir_shop_orders")
        .query_async(&mut con)
        .await
        .unwrap();
    assert_eq!((left, back), (0, 2));
}

#[tokio::test]
async fn dlq_list_show_and_replay_on_rabbitmq() {
    use lapin::options::*;
    let server = RabbitServer::start();
    let url = server.url();
    let b = weir_broker::admin::connect(
        weir_crds::broker::BrokerKind::Rabbitmq,
        &url,
        &Credentials::default(),
    )
    .await
    .unwrap();
    let t = Topology::new(
        "shop",
        "orders",
        &serde_yaml::from_str("broker: mq").unwrap(),
    )
    .unwrap();
    b.declare_queue(&t).await.unwrap();
    b.declare_consumer(&t, "billing").await.unwrap();
    let weir_broker::admin::BrokerAdmin::Rabbitmq(r) = &b else {
        panic!()
    };
    let ch = r.channel().await.unwrap();
    ch.confirm_select(ConfirmSelectOptions::default())
        .await
        .unwrap();
    for (id, reason) in [("ev-1", "max-deliveries"), ("ev-2", "rejected")] {
        let mut h = lapin::types::FieldTable::default();
        for (k, v) in letter_headers(id, "weir_shop_orders.billing", reason) {
            h.insert(k.into(), lapin::types::AMQPValue::LongString(v.into()));
        }
        let c = ch
            .basic_publish(
                "weir_shop_orders_dlq".into(),
                "".into(),
                BasicPublishOptions::default(),
                format!("{{\"id\":\"{id}\"}}").as_bytes(),
                lapin::BasicProperties::default().with_headers(h),
            )
            .await
            .unwrap()
            .await
            .unwrap();
        assert_eq!(c, lapin::Confirmation::Ack(None));
    }
    let dlq = |args: &[&str]| {
        let mut a = vec!["dlq"];
        a.extend_from_slice(args);
        a.extend_from_slice(&["-n", "shop", "--broker-url", url.as_str()]);
        weir(&a)
    };
    let out = dlq(&["list", "orders"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let table = text(&out.stdout);
    assert_eq!(table.lines().count(), 3, "{table}");
    assert!(
        table.lines().nth(1).unwrap().starts_with("1 ") && table.contains("ev-1"),
        "{table}"
    );
    // Listing hands the dead letters back: the same again.
    let again = text(&dlq(&["list", "orders"]).stdout);
    assert_eq!(again, table);
    let out = dlq(&["show", "orders", "--seq", "2"]);
    assert!(
        text(&out.stdout).contains("weir-reason: rejected"),
        "{}",
        text(&out.stdout)
    );

    let out = dlq(&["replay", "orders", "--seq", "2"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(
        text(&out.stdout).contains("1 replayed, 0 failed"),
        "{}",
        text(&out.stdout)
    );
    let f = b.figures(&t, &["billing".into()]).await.unwrap();
    assert_eq!((f.pending["billing"], f.dead_letters), (1, Some(1)));
    let m = ch
        .basic_get(
            "weir_shop_orders.billing".into(),
            BasicGetOptions::default(),
        )
        .await
        .unwrap()
        .unwrap();
    assert_eq!(&m.delivery.data[..], br#"{"id":"ev-2"}"#);
    assert_eq!(
        m.delivery
            .properties
            .message_id()
            .as_ref()
            .unwrap()
            .as_str(),
        "ev-2"
    );
    let out = dlq(&["replay", "orders", "--all"]);
    assert!(text(&out.stdout).contains("1 replayed, 0 failed"));
    let f = b.figures(&t, &["billing".into()]).await.unwrap();
    assert_eq!(f.dead_letters, Some(0));

    // A message returned past its queue's x-delivery-limit (sidecars crashing on it) is
    // dead-lettered by RabbitMQ itself: weir dlq names the broker's reason and the queue.
    let p = Topology::new(
        "shop",
        "payments",
        &serde_yaml::from_str("broker: mq\nconsumer: {maxDeliveries: 1}").unwrap(),
    )
    .unwrap();
    b.declare_queue(&p).await.unwrap();
    b.declare_consumer(&p, "billing").await.unwrap();
    let c = ch
        .basic_publish(
            "weir_shop_payments".into(),
            "weir.shop.payments".into(),
            BasicPublishOptions::default(),
            br#"{"id":"p-1"}"#,
            lapin::BasicProperties::default().with_message_id("p-1".into()),
        )
        .await
        .unwrap()
        .await
        .unwrap();
    assert_eq!(c, lapin::Confirmation::Ack(None));
    for _ in 0..3 {
        if let Some(m) = ch
            .basic_get(
                "weir_shop_payments.billing".into(),
                BasicGetOptions::default(),
            )
            .await
            .unwrap()
        {
            m.delivery
                .nack(BasicNackOptions {
                    requeue: true,
                    ..Default::default()
                })
                .await
                .unwrap();
        }
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    }
    let out = dlq(&["list", "payments", "--json"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let rows: Vec<Value> = text(&out.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(rows.len(), 1, "{rows:?}");
    assert_eq!(rows[0]["reason"], "broker: delivery_limit");
    assert_eq!(rows[0]["originalSubject"], "weir_shop_payments.billing");
}

/// `weir dlq` on Kafka: dead letters written to the dead-letter topic as the sidecar writes
/// them (the headers of `letter_headers`, the event's key), listed as `partition/offset`,
/// shown, replayed onto the topic with the event's own headers and key; a replayed one is
/// listed no more.
#[tokio::test]
async fn dlq_list_show_and_replay_on_kafka() {
    use rdkafka::Message;
    use rdkafka::consumer::{Consumer, StreamConsumer};
    use rdkafka::message::{Header, OwnedHeaders};
    use rdkafka::producer::{FutureProducer, FutureRecord};
    use std::time::Duration;
    use weir_testkit::KafkaServer;

    if KafkaServer::require().is_none() {
        return;
    }
    let server = KafkaServer::start();
    let url = server.url();
    let b = weir_broker::admin::connect(
        weir_crds::broker::BrokerKind::Kafka,
        &url,
        &Credentials::default(),
    )
    .await
    .unwrap();
    let spec = serde_yaml::from_str("broker: k").unwrap();
    b.declare_queue(&Topology::new("shop", "orders", &spec).unwrap())
        .await
        .unwrap();
    let weir_broker::admin::BrokerAdmin::Kafka(k) = &b else {
        panic!("a Kafka connection")
    };
    let p: FutureProducer = k.client_config().set("acks", "all").create().unwrap();
    for (id, reason) in [("ev-1", "max-deliveries"), ("ev-2", "rejected")] {
        let mut headers = OwnedHeaders::new();
        for (k, v) in letter_headers(id, "weir_shop_orders", reason) {
            headers = headers.insert(Header {
                key: &k,
                value: Some(v.as_bytes()),
            });
        }
        p.send(
            FutureRecord::to("weir_shop_orders_dlq")
                .payload(&format!("{{\"id\":\"{id}\"}}"))
                .key(&format!("key-{id}"))
                .headers(headers),
            Duration::from_secs(5),
        )
        .await
        .unwrap_or_else(|(e, _)| panic!("dead letter {id}: {e}"));
    }
    let dlq = |args: &[&str]| {
        let mut a = vec!["dlq"];
        a.extend_from_slice(args);
        a.extend_from_slice(&["-n", "shop", "--broker-url", url.as_str()]);
        weir(&a)
    };
    let out = dlq(&["list", "orders", "--json"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let rows: Vec<Value> = text(&out.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(rows.len(), 2, "{rows:?}");
    assert_eq!(rows[0]["seq"], "0/0", "partition/offset");
    assert_eq!(rows[0]["reason"], "max-deliveries");
    assert_eq!(rows[1]["eventId"], "ev-2");
    let out = dlq(&["show", "orders", "--seq", "0/1"]);
    assert!(
        text(&out.stdout).contains("weir-reason: rejected"),
        "{}",
        text(&out.stdout)
    );
    assert!(text(&out.stdout).contains("\"id\": \"ev-2\""));
    assert_eq!(
        dlq(&["show", "orders", "--seq", "0/99"]).status.code(),
        Some(2)
    );

    let out = dlq(&["replay", "orders", "--seq", "0/1"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(
        text(&out.stdout).contains("1 replayed, 0 failed"),
        "{}",
        text(&out.stdout)
    );
    let c: StreamConsumer = k
        .client_config()
        .set("group.id", "weir_shop_orders.check")
        .set("auto.offset.reset", "earliest")
        .set("session.timeout.ms", "6000")
        .set("heartbeat.interval.ms", "300")
        .create()
        .unwrap();
    c.subscribe(&["weir_shop_orders"]).unwrap();
    let m = tokio::time::timeout(Duration::from_secs(30), c.recv())
        .await
        .expect("the replayed event on the topic within 30 s")
        .unwrap();
    let headers = weir_broker::kafka::headers_of(&m);
    assert!(
        headers.contains(&("ce-id".into(), "ev-2".into())),
        "{headers:?}"
    );
    assert!(
        !headers.iter().any(|(k, _)| k.starts_with("weir-")),
        "no dead-letter header replayed: {headers:?}"
    );
    assert_eq!(m.key(), Some(&b"key-ev-2"[..]), "the event's key kept");
    assert_eq!(m.payload(), Some(&br#"{"id":"ev-2"}"#[..]));

    // Replayed once: listed no more, and not replayed again by --all.
    let out = dlq(&["list", "orders", "--json"]);
    assert_eq!(
        text(&out.stdout).lines().count(),
        1,
        "{}",
        text(&out.stdout)
    );
    let out = dlq(&["replay", "orders", "--all"]);
    assert!(
        text(&out.stdout).contains("1 replayed, 0 failed"),
        "{}",
        text(&out.stdout)
    );
    let out = dlq(&["list", "orders", "--json"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert_eq!(
        text(&out.stdout).lines().count(),
        0,
        "{}",
        text(&out.stdout)
    );
}
