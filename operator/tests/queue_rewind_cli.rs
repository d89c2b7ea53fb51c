//! `weir queue rewind` through the real binary against real brokers, with a real `weir-proxy`
//! consuming into a real HTTP app that keeps running through the rewind: on NATS JetStream,
//! Redis Streams and Kafka 100 events are published through the sidecar and processed once each, the
//! consumer is rewound to the 50th event's time, and events 50–100 reach the app once more
//! (past the sidecar's dedup), 1–49 not; a second rewind, to the start, delivers all 100 once
//! more. On JetStream the same again with the durable deleted
//! and created again underneath the sidecar (how servers before 2.14 rewind). On Kafka also with
//! no sidecar running (the command commits for the empty group; the next sidecar delivers
//! again). RabbitMQ refuses with exit 2 and says why.
//!
//! Needs the `weir-proxy` binary beside `weir` (`cargo build --workspace --bins`, or a
//! workspace test run).

use bytes::Bytes;
use chrono::{SecondsFormat, Utc};
use http::{Request, Response};
use http_body_util::Full;
use hyper::body::Incoming;
use std::collections::HashMap;
use std::path::PathBuf;
use std::process::{Command, Output};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use weir_broker::admin::{self, Admin};
use weir_broker::credentials::Credentials;
use weir_broker::nats::rewind::Method;
use weir_broker::rewind::{Point, Rewound};
use weir_broker::topology::Topology;
use weir_crds::broker::BrokerKind;
use weir_crds::proxy::{ConsumeConfig, MessagingConfig, PublishConfig};
use weir_testkit::{KafkaServer, NatsServer, Proxy, RabbitServer, RedisServer};

const NS: &str = "shop";
const QUEUE: &str = "orders";
const CONSUMER: &str = "billing";
const EVENTS: usize = 100;
/// The event the consumer is rewound to.
const FROM: usize = 50;

fn weir(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_weir"))
        .args(args)
        .output()
        .unwrap()
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

/// The sidecar, built beside `weir`.
fn proxy_bin() -> PathBuf {
    let bin = std::path::Path::new(env!("CARGO_BIN_EXE_weir")).with_file_name("weir-proxy");
    assert!(
        bin.is_file(),
        "{} not built: run `cargo build --workspace --bins` first",
        bin.display()
    );
    bin
}

/// An app that counts the deliveries of each event id (`ce-id`) and answers 200.
struct App {
    addr: std::net::SocketAddr,
    calls: Arc<Mutex<HashMap<String, usize>>>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for App {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl App {
    async fn start() -> App {
        let calls = Arc::new(Mutex::new(HashMap::<String, usize>::new()));
        let c = calls.clone();
        let (addr, task) = weir_testkit::serve(move |req: Request<Incoming>| {
            let c = c.clone();
            async move {
                let id = req
                    .headers()
                    .get("ce-id")
                    .and_then(|v| v.to_str().ok())
                    .unwrap_or("")
                    .to_string();
                *c.lock().unwrap().entry(id).or_insert(0) += 1;
                Response::new(Full::new(Bytes::from_static(b"ok")))
            }
        })
        .await;
        App { addr, calls, task }
    }

    fn total(&self) -> usize {
        self.calls.lock().unwrap().values().sum()
    }

    fn count(&self, id: &str) -> usize {
        self.calls.lock().unwrap().get(id).copied().unwrap_or(0)
    }
}

fn topology() -> Topology {
    Topology::new(
        NS,
        QUEUE,
        &serde_yaml::from_str("{broker: bus, consumer: {ackWait: 2s}}").unwrap(),
    )
    .unwrap()
}

/// The sidecar of `billing`: publishes to and consumes `orders`, as the operator renders it.
fn messaging(kind: BrokerKind, url: &str, t: &Topology) -> MessagingConfig {
    MessagingConfig {
        broker_url: url.into(),
        broker_kind: kind.name().into(),
        credentials_file: None,
        publishes: vec![PublishConfig {
            queue: QUEUE.into(),
            stream: t.stream_name().into(),
            subject: t.stream.subjects[0].clone(),
            schema: None,
            event_type: "order.created".into(),
            duplicate_window_ms: None,
            max_messages: None,
            max_age_ms: None,
        }],
        consumes: vec![ConsumeConfig {
            queue: QUEUE.into(),
            stream: t.stream_name().into(),
            consumer: CONSUMER.into(),
            path: "/events/orders".into(),
            max_in_flight: 8,
            max_deliveries: 5,
            ack_wait_ms: 2_000,
            backoff_ms: vec![100],
            dead_letter_stream: t.dead_letter_stream_name(),
            dead_letter_subject: weir_broker::queue::dead_letter_subject(NS, QUEUE),
            schema: None,
            dedup_window_ms: 600_000,
            event_type: Some("order.created".into()),
            limits: Default::default(),
        }],
    }
}

/// Waits until `cond` holds, 20 s at most; panics naming `what`.
async fn wait(what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while !cond() {
        assert!(Instant::now() < deadline, "timed out: {what}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// How the consumer is moved back.
#[derive(Clone, Copy, Debug)]
enum How {
    /// `weir queue rewind` (on JetStream: a reset in place, nats-server ≥ 2.14).
    Command,
    /// JetStream's delete-and-create of older servers, called directly.
    NatsRecreate,
}

/// Publishes 100 events through a consuming sidecar, waits until each reached the app once,
/// rewinds to the 50th event's time, and checks that 50–100 reach it once more and 1–49 not,
/// the sidecar running on throughout.
async fn publish_consume_rewind_see_again(kind: BrokerKind, url: &str, how: How) {
    let t = topology();
    let broker = admin::connect(kind, url, &Credentials::default())
        .await
        .unwrap();
    broker.declare_queue(&t).await.unwrap();
    broker.declare_consumer(&t, CONSUMER).await.unwrap();
    let app = App::start().await;
    let mut config = weir_testkit::proxy::config(NS, CONSUMER, app.addr);
    config.messaging = Some(messaging(kind, url, &t));
    let mut sidecar = Proxy::spawn(proxy_bin(), config, &[], &[]);
    sidecar.wait_connected().await;

    let mut rewind_to = None;
    let mut position_of_from = None;
    for i in 1..=EVENTS {
        if i == FROM {
            // The 50th event's time: after the 49th was stored, before the 50th is.
            tokio::time::sleep(Duration::from_millis(30)).await;
            rewind_to = Some(Utc::now());
            tokio::time::sleep(Duration::from_millis(30)).await;
        }
        let id = format!("ev-{i}");
        let (status, answer) = sidecar
            .publish(QUEUE, &[("ce-id", id.as_str())], &format!("{{\"n\":{i}}}"))
            .await;
        assert_eq!(status, 202, "{id}: {answer}");
        if i == FROM {
            position_of_from = Some(match &answer["stream_seq"] {
                serde_json::Value::String(s) => s.clone(),
                other => other.to_string(),
            });
        }
    }
    wait("every event processed once", || app.total() == EVENTS).await;
    if kind == BrokerKind::Kafka {
        // Tansu under-reports the high watermark, so its lag figure is no guide; the sidecar
        // commits every 200 ms, and a rewind counts from whatever it committed.
        tokio::time::sleep(Duration::from_secs(1)).await;
    } else {
        let consumers = [CONSUMER.to_string()];
        let deadline = Instant::now() + Duration::from_secs(20);
        while broker.figures(&t, &consumers).await.unwrap().pending[CONSUMER] > 0 {
            assert!(Instant::now() < deadline, "acknowledgements outstanding");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
    assert!((1..=EVENTS).all(|i| app.count(&format!("ev-{i}")) == 1));

    let to = rewind_to
        .unwrap()
        .to_rfc3339_opts(SecondsFormat::Micros, true);
    let from = position_of_from.unwrap();
    match how {
        How::Command => {
            let stdout = rewind_command(url, &to).await;
            assert!(
                stdout.contains(&format!("delivering again from position {from}")),
                "{stdout}"
            );
        }
        How::NatsRecreate => {
            let nats = broker.nats().unwrap();
            let point = Point::Time(chrono::DateTime::parse_from_rfc3339(&to).unwrap().into());
            let r = nats
                .rewind_with(NS, QUEUE, CONSUMER, point, Method::Recreate)
                .await
                .unwrap();
            assert_eq!(
                r,
                Rewound::Moved {
                    from: from.clone(),
                    again: Some((EVENTS - FROM + 1) as u64)
                }
            );
        }
    }

    let again = EVENTS - FROM + 1;
    wait("events 50-100 delivered again", || {
        app.total() == EVENTS + again
    })
    .await;
    // Nothing more comes: each of 50–100 once more, none of 1–49.
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(app.total(), EVENTS + again);
    for i in 1..=EVENTS {
        let want = if i >= FROM { 2 } else { 1 };
        assert_eq!(app.count(&format!("ev-{i}")), want, "ev-{i}");
    }
    if let How::Command = how {
        // Once more, from the start: the second marker beats the records the first rewind's
        // deliveries wrote.
        let stdout = rewind_command(url, "start").await;
        assert!(stdout.contains("rewound to the start"), "{stdout}");
        wait("every event delivered once more", || {
            app.total() == 2 * EVENTS + again
        })
        .await;
        tokio::time::sleep(Duration::from_millis(500)).await;
        assert_eq!(app.total(), 2 * EVENTS + again);
        for i in 1..=EVENTS {
            let want = if i >= FROM { 3 } else { 2 };
            assert_eq!(app.count(&format!("ev-{i}")), want, "ev-{i}");
        }
    }
    assert!(
        sidecar.child().try_wait().unwrap().is_none(),
        "the sidecar ran on"
    );
    if kind == BrokerKind::Kafka {
        // The running member moved its partition itself, once per rewind.
        let moved = sidecar
            .log_lines()
            .into_iter()
            .filter(|l| l.to_string().contains("partition moved back"))
            .count();
        assert_eq!(moved, 2, "{:?}", sidecar.log_lines());
    }
}

/// `weir queue rewind orders -n shop --broker-url <url> --consumer billing --to <to>`, which
/// must succeed: its stdout.
async fn rewind_command(url: &str, to: &str) -> String {
    let args = [
        "queue",
        "rewind",
        QUEUE,
        "-n",
        NS,
        "--broker-url",
        url,
        "--consumer",
        CONSUMER,
        "--to",
        to,
    ]
    .map(String::from);
    let out = tokio::task::spawn_blocking(move || {
        weir(&args.iter().map(String::as_str).collect::<Vec<_>>())
    })
    .await
    .unwrap();
    let (stdout, stderr) = (text(&out.stdout), text(&out.stderr));
    assert!(out.status.success(), "{stdout}{stderr}");
    stdout
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nats_rewind_delivers_from_the_point_again_through_a_running_sidecar() {
    let server = NatsServer::start();
    publish_consume_rewind_see_again(BrokerKind::Nats, &server.url(), How::Command).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nats_a_durable_created_again_underneath_the_sidecar_is_consumed_on() {
    let server = NatsServer::start();
    publish_consume_rewind_see_again(BrokerKind::Nats, &server.url(), How::NatsRecreate).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_rewind_delivers_from_the_point_again_through_a_running_sidecar() {
    let server = RedisServer::start();
    publish_consume_rewind_see_again(BrokerKind::Redis, &server.url(), How::Command).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kafka_rewind_delivers_from_the_point_again_through_a_running_sidecar() {
    if KafkaServer::require().is_none() {
        return;
    }
    let server = KafkaServer::start();
    publish_consume_rewind_see_again(BrokerKind::Kafka, &server.url(), How::Command).await;
}

/// With no sidecar of the consumer running, the command moves the empty group's offsets itself;
/// the next sidecar delivers from there, past the dedup. A consumer group that is not there is
/// exit 2, naming it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kafka_a_rewind_with_no_sidecar_running_is_delivered_by_the_next_one() {
    if KafkaServer::require().is_none() {
        return;
    }
    let server = KafkaServer::start();
    let url = server.url();
    let t = topology();
    let broker = admin::connect(BrokerKind::Kafka, &url, &Credentials::default())
        .await
        .unwrap();
    broker.declare_queue(&t).await.unwrap();
    let app = App::start().await;
    let mut config = weir_testkit::proxy::config(NS, CONSUMER, app.addr);
    config.messaging = Some(messaging(BrokerKind::Kafka, &url, &t));
    let mut sidecar = Proxy::spawn(proxy_bin(), config, &[], &[]);
    sidecar.wait_connected().await;
    for i in 1..=10 {
        let id = format!("ev-{i}");
        let (status, answer) = sidecar
            .publish(QUEUE, &[("ce-id", id.as_str())], "{}")
            .await;
        assert_eq!(status, 202, "{id}: {answer}");
    }
    wait("ten events processed", || app.total() == 10).await;
    // A graceful stop commits and leaves the group: nobody is left to move it.
    sidecar.sigterm();
    assert!(sidecar.wait_exit(Duration::from_secs(20)).success());

    let out = tokio::task::spawn_blocking({
        let url = url.clone();
        move || {
            weir(&[
                "queue",
                "rewind",
                QUEUE,
                "-n",
                NS,
                "--broker-url",
                &url,
                "--consumer",
                "nobody",
                "--to",
                "start",
            ])
        }
    })
    .await
    .unwrap();
    let stderr = text(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(
        stderr.contains(
            "consumer group weir_shop_orders.nobody on topic weir_shop_orders does not exist"
        ),
        "{stderr}"
    );

    let stdout = rewind_command(&url, "start").await;
    assert!(
        stdout.contains("delivering again from position 0:0 (10 messages to deliver)"),
        "{stdout}"
    );
    sidecar.respawn();
    sidecar.wait_connected().await;
    wait("the ten delivered again", || app.total() == 20).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(app.total(), 20);
    assert!((1..=10).all(|i| app.count(&format!("ev-{i}")) == 2));
    // The applied records keep a later sidecar from moving the group again.
    sidecar.kill9();
    sidecar.respawn();
    sidecar.wait_connected().await;
    tokio::time::sleep(Duration::from_secs(8)).await;
    assert_eq!(app.total(), 20);
    let moved: Vec<_> = sidecar
        .log_lines()
        .into_iter()
        .filter(|l| l.to_string().contains("partition moved back"))
        .collect();
    assert!(
        moved.is_empty(),
        "a sidecar moved the group again: {moved:?}"
    );
}

#[test]
fn rabbitmq_refuses_a_rewind_saying_why() {
    let server = RabbitServer::start();
    let out = weir(&[
        "queue",
        "rewind",
        QUEUE,
        "-n",
        NS,
        "--broker-url",
        &server.url(),
        "--consumer",
        CONSUMER,
        "--to",
        "10m",
    ]);
    let stderr = text(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(
        stderr.contains("rewinding consumer billing of Queue shop/orders")
            && stderr.contains("RabbitMQ keeps no log"),
        "{stderr}"
    );
    assert!(out.stdout.is_empty());
}

#[test]
fn a_to_that_is_no_point_in_time_exits_2_naming_the_flag() {
    let out = weir(&[
        "queue",
        "rewind",
        QUEUE,
        "--broker-url",
        "nats://127.0.0.1:1",
        "--consumer",
        CONSUMER,
        "--to",
        "last tuesday",
    ]);
    let stderr = text(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(
        stderr.contains("--to \"last tuesday\": expected an RFC 3339 time"),
        "{stderr}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_consumer_that_is_not_there_exits_2_and_nothing_delivered_leaves_it_as_it_was() {
    let server = RedisServer::start();
    let url = server.url();
    let t = topology();
    let broker = admin::connect(BrokerKind::Redis, &url, &Credentials::default())
        .await
        .unwrap();
    broker.declare_queue(&t).await.unwrap();
    broker.declare_consumer(&t, CONSUMER).await.unwrap();
    let run = |consumer: &'static str, to: &'static str| {
        let url = url.clone();
        tokio::task::spawn_blocking(move || {
            weir(&[
                "queue",
                "rewind",
                QUEUE,
                "-n",
                NS,
                "--broker-url",
                &url,
                "--consumer",
                consumer,
                "--to",
                to,
            ])
        })
    };
    let out = run("nobody", "start").await.unwrap();
    let stderr = text(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(
        stderr.contains("consumer group nobody on stream weir_shop_orders does not exist"),
        "{stderr}"
    );
    // Nothing was delivered to billing yet: the group stays where it is.
    let out = run(CONSUMER, "start").await.unwrap();
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(
        text(&out.stdout).contains("was delivered nothing at or after the start: left as it was"),
        "{}",
        text(&out.stdout)
    );
}
