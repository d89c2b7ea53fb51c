//! `weir up --broker redis|rabbitmq` through the real binary: examples/events on a local
//! redis-server and rabbitmq-server (Debian's, started by `weir up` on free ports), the same
//! checks as `up_cli.rs` does on nats-server: an event through one sidecar to the broker and
//! through the other to the consuming app, a bad one refused with 422; the broker killed with
//! SIGKILL and restarted on its port, and an event published after that delivered; SIGTERM
//! stops everything (the broker last). A broker URL given with its password (`--broker-url`)
//! is printed masked. Needs `cargo build --workspace --bins` and scripts/setup.sh.

mod up_support;

use std::time::{Duration, Instant};
use up_support::*;
use weir_testkit::{RabbitServer, RedisServer};

#[test]
fn events_example_on_redis() {
    events_example("redis", "redis://127.0.0.1:");
}

#[test]
fn events_example_on_rabbitmq() {
    events_example("rabbitmq", "amqp://127.0.0.1:");
}

fn events_example(broker: &str, scheme: &str) {
    let mut up = Up::start(
        &["-f", "examples/events", "--broker", broker],
        Duration::from_secs(120),
    );
    let s = up.state();
    assert!(s["brokerUrl"].as_str().unwrap().starts_with(scheme));
    let (accounts, mailer) = (up.port("accounts"), up.port("mailer"));

    let (st, body) = request(
        accounts,
        "POST",
        "/publish/signups",
        r#"{"userId": "u1", "email": "a@example.com"}"#,
    );
    assert_eq!(st, 202, "{body}");
    let (st, body) = request(accounts, "POST", "/publish/signups", r#"{"userId": "u2"}"#);
    assert_eq!(st, 422, "{body}");
    assert!(body.contains("email"), "{body}");

    let start = Instant::now();
    let got = loop {
        let events = received(mailer);
        if !events.is_empty() || start.elapsed() > Duration::from_secs(10) {
            break events;
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    assert_eq!(
        got.len(),
        1,
        "exactly the valid event reaches mailer: {got:?}"
    );
    assert_eq!(got[0]["data"]["userId"], "u1");
    assert_eq!(got[0]["type"], "UserSignedUp");
    assert!(
        start.elapsed() < Duration::from_secs(3),
        "delivered promptly, took {:?}",
        start.elapsed()
    );

    // kill -9 of the broker (for RabbitMQ, its start script: weir up takes down the Erlang VM
    // left behind in its process group before starting it again).
    if broker == "rabbitmq" {
        // A RabbitMQ node killed within seconds of declaring a stream (the sidecars' processed-
        // event stream) comes back with that stream inaccessible ("home node ... is down or
        // inaccessible"), whoever restarts it: the kill waits until the node has settled.
        std::thread::sleep(Duration::from_secs(15));
    }
    let b = &s["brokers"][broker];
    let (pid, port) = (b["pid"].as_u64().unwrap(), b["port"].as_u64().unwrap());
    kill9(pid);
    let restarted = up.until(
        &format!("{broker} back on port {port}"),
        Duration::from_secs(120),
        || {
            let b = &up.state()["brokers"][broker];
            let back = up
                .log()
                .contains(&format!("weir up: {broker} is back on 127.0.0.1:{port}"));
            (back && b["pid"].as_u64() != Some(pid)).then(|| b.clone())
        },
    );
    assert_eq!(restarted["port"].as_u64(), Some(port), "the same port");
    publish_signup(&up, "after", Duration::from_secs(60));
    let got = up.until(
        "the event published after the restart at mailer",
        Duration::from_secs(60),
        || {
            let e = received(mailer);
            e.iter()
                .any(|e| e["data"]["userId"] == "after")
                .then_some(e)
        },
    );
    let users: Vec<&str> = got
        .iter()
        .filter_map(|e| e["data"]["userId"].as_str())
        .collect();
    assert_eq!(users, ["u1", "after"], "{got:?}");
    eprintln!("{broker}: pid {pid} → {}, port {port}", restarted["pid"]);

    // SIGTERM: apps, then sidecars, then the broker stop; weir up exits 0.
    let st = up.terminate();
    assert!(st.success(), "{st}");
}

/// Runs examples/events on `url` (a broker that wants the credentials in it) and checks that
/// the output shows it as `shown` and never holds `secret`, while the sidecars, given the URL
/// whole, connect.
fn masked(url: &str, shown: &str, secret: &str) {
    let mut up = Up::start(
        &[
            "-f",
            "examples/events",
            "-n",
            "masked",
            "--any-port",
            "--broker-url",
            url,
        ],
        Duration::from_secs(120),
    );
    publish_signup(&up, "u1", Duration::from_secs(30));
    let mailer = up.port("mailer");
    wait_for("the event at mailer", Duration::from_secs(30), || {
        (received(mailer).len() == 1).then_some(())
    });
    assert_eq!(
        up.state()["brokerUrl"],
        url,
        "the state file keeps it whole"
    );
    let st = up.terminate();
    assert!(st.success(), "{st}");
    let log = up.log();
    assert!(
        log.contains(&format!("weir up: broker {shown}; queues declared")),
        "{log}"
    );
    assert!(
        log.contains(&format!(r#""broker":"{shown}""#)),
        "the sidecars' log masks it too: {log}"
    );
    assert!(!log.contains(secret), "the password is printed: {log}");
}

#[test]
fn a_rabbitmq_url_is_printed_without_its_password() {
    let rabbit = RabbitServer::start();
    let port = rabbit.port;
    masked(
        &format!("amqp://guest:guest@127.0.0.1:{port}/%2f"),
        &format!("amqp://guest:***@127.0.0.1:{port}/%2f"),
        "guest:guest",
    );
}

#[test]
fn a_redis_url_is_printed_without_its_password() {
    let redis = RedisServer::start_with_password("s3cret-pw");
    let port = redis.port;
    masked(
        &format!("redis://:s3cret-pw@127.0.0.1:{port}"),
        &format!("redis://:***@127.0.0.1:{port}"),
        "s3cret-pw",
    );
}

/// `weir up --broker kafka` supervises Tansu as it does the other brokers: started on a free
/// loopback port, the Queue's topics declared with the operator's code (partitions included),
/// restarted on the same port after a `kill -9`, stopped by SIGTERM. (Tansu keeps its log in
/// memory: what comes back is an empty broker.) Its one Microservice neither publishes nor
/// consumes, so no sidecar talks to Kafka.
#[test]
fn kafka_broker_is_started_declared_and_restarted() {
    use rdkafka::consumer::{BaseConsumer, Consumer};
    if weir_testkit::KafkaServer::require().is_none() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("queue.yaml"),
        "apiVersion: weir.dev/v1alpha1\nkind: Queue\nmetadata: {name: orders}\n\
         spec: {broker: bus, partitions: 3}\n---\n\
         apiVersion: weir.dev/v1alpha1\nkind: Microservice\n\
         metadata: {name: echo, annotations: {weir.dev/local-command: weir-echo}}\n\
         spec: {image: weir-echo:1}\n",
    )
    .unwrap();
    let mut up = Up::start(
        &[
            "-f",
            dir.path().to_str().unwrap(),
            "-n",
            "upk",
            "--broker",
            "kafka",
        ],
        Duration::from_secs(60),
    );
    let s = up.state();
    let url = s["brokerUrl"].as_str().unwrap().to_string();
    assert!(url.starts_with("kafka://127.0.0.1:"), "{url}");
    let bootstrap = url.trim_start_matches("kafka://").to_string();
    let c: BaseConsumer = rdkafka::ClientConfig::new()
        .set("bootstrap.servers", &bootstrap)
        .create()
        .unwrap();
    let m = c
        .fetch_metadata(Some("weir_upk_orders"), Duration::from_secs(5))
        .unwrap();
    assert_eq!(
        m.topics().first().map(|t| t.partitions().len()),
        Some(3),
        "the Queue's topic, with its partitions"
    );

    let b = &s["brokers"]["kafka"];
    let (pid, port) = (b["pid"].as_u64().unwrap(), b["port"].as_u64().unwrap());
    assert_eq!(url, format!("kafka://127.0.0.1:{port}"));
    kill9(pid);
    let restarted = up.until(
        &format!("kafka back on port {port}"),
        Duration::from_secs(60),
        || {
            let b = &up.state()["brokers"]["kafka"];
            let back = up
                .log()
                .contains(&format!("weir up: kafka is back on 127.0.0.1:{port}"));
            (back && b["pid"].as_u64() != Some(pid)).then(|| b.clone())
        },
    );
    assert_eq!(restarted["port"].as_u64(), Some(port), "the same port");
    assert!(
        c.fetch_metadata(None, Duration::from_secs(5)).is_ok(),
        "the restarted broker answers on the same address"
    );
    let st = up.terminate();
    assert!(st.success(), "{st}\n{}", up.log());
}
