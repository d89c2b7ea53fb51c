//! The sidecar's broker conformance helpers (feature `bridge`): one scenario run on each broker
//! kind ([`per_broker!`](crate::per_broker)), a real broker of each kind ([`TestBroker`]), a
//! small HTTP app that counts deliveries per event id ([`App`]), the sidecar configs of the
//! suite (queue `orders` of namespace `shop`), the real `weir-proxy` as a publishing or consuming
//! sidecar ([`sidecar`]) or as one that cannot connect ([`Unready`]), and what the suite reads
//! from JetStream directly. Used by weir-proxy's `bridge` and `broker_tls` tests and its
//! `pubsub` benchmark, which give the binary (`env!("CARGO_BIN_EXE_weir-proxy")`).

mod brokers;
pub mod kafka;
pub use brokers::*;

pub use crate::brokers::{KafkaServer, Kind, NatsServer, RabbitServer, RedisServer, require};
pub use crate::net::{eventually, eventually_async, free_addr};
pub use crate::proxy::{Proxy, http_get, http_send, http_send_full};

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use std::collections::HashMap;
use std::ffi::OsStr;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use weir_crds::proxy::*;

/// How the app answers a delivery: status for the `n`-th call (0-based) of an event id.
pub type Behavior = Arc<dyn Fn(&str, usize) -> u16 + Send + Sync>;

#[derive(Clone, Debug)]
pub struct Call {
    pub id: String,
    pub at: Instant,
    pub headers: http::HeaderMap,
    pub body: Bytes,
}

/// A small HTTP app on loopback that counts calls per `ce-id`.
pub struct App {
    pub addr: SocketAddr,
    /// Every call with its headers and body (empty for a [`App::light`] app).
    pub calls: Arc<Mutex<Vec<Call>>>,
    /// Calls per event id, and in total.
    per_id: Arc<Mutex<HashMap<String, usize>>>,
    total: Arc<std::sync::atomic::AtomicUsize>,
    pub behavior: Arc<Mutex<Behavior>>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for App {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl App {
    /// An app that answers `status(id, n)` after `delay`.
    pub async fn start(delay: Duration, behavior: Behavior) -> App {
        Self::start_inner(delay, behavior, true).await
    }

    /// A trivial 200 app that only counts (for the benchmark).
    pub async fn light() -> App {
        Self::start_inner(Duration::ZERO, Arc::new(|_, _| 200), false).await
    }

    async fn start_inner(delay: Duration, behavior: Behavior, details: bool) -> App {
        let calls = Arc::new(Mutex::new(Vec::<Call>::new()));
        let per_id = Arc::new(Mutex::new(HashMap::<String, usize>::new()));
        let total = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let behavior = Arc::new(Mutex::new(behavior));
        let (c2, b2, p2, t2) = (
            calls.clone(),
            behavior.clone(),
            per_id.clone(),
            total.clone(),
        );
        let (addr, task) = crate::serve(move |req: Request<Incoming>| {
            let (calls, behavior, per_id, total) = (c2.clone(), b2.clone(), p2.clone(), t2.clone());
            async move {
                let headers = req.headers().clone();
                let body = req.into_body().collect().await.unwrap().to_bytes();
                let id = headers
                    .get("ce-id")
                    .and_then(|v| v.to_str().ok())
                    .unwrap_or("")
                    .to_string();
                let n = {
                    let mut p = per_id.lock().unwrap();
                    let e = p.entry(id.clone()).or_insert(0);
                    *e += 1;
                    *e - 1
                };
                if details {
                    calls.lock().unwrap().push(Call {
                        id: id.clone(),
                        at: Instant::now(),
                        headers,
                        body,
                    });
                }
                total.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                if !delay.is_zero() {
                    tokio::time::sleep(delay).await;
                }
                let f = behavior.lock().unwrap().clone();
                let status = f(&id, n);
                let mut r =
                    Response::new(Full::new(Bytes::from(format!("answer {status} for {id}"))));
                *r.status_mut() = StatusCode::from_u16(status).unwrap();
                r
            }
        })
        .await;
        App {
            addr,
            calls,
            per_id,
            total,
            behavior,
            task,
        }
    }

    pub async fn ok() -> App {
        App::start(Duration::ZERO, Arc::new(|_, _| 200)).await
    }

    pub fn set_behavior(&self, b: Behavior) {
        *self.behavior.lock().unwrap() = b;
    }

    pub fn total(&self) -> usize {
        self.total.load(std::sync::atomic::Ordering::SeqCst)
    }

    pub fn counts(&self) -> HashMap<String, usize> {
        self.per_id.lock().unwrap().clone()
    }

    pub fn calls_for(&self, id: &str) -> Vec<Call> {
        self.calls
            .lock()
            .unwrap()
            .iter()
            .filter(|c| c.id == id)
            .cloned()
            .collect()
    }
}

pub const NS: &str = "shop";
pub const QUEUE: &str = "orders";
pub const STREAM: &str = "weir_shop_orders";
pub const SUBJECT: &str = "weir.shop.orders";
pub const DLQ_STREAM: &str = "weir_shop_orders_dlq";
pub const DLQ_SUBJECT: &str = "weir.dlq.shop.orders";

pub fn order_schema() -> serde_json::Value {
    serde_json::json!({
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "type": "object",
        "required": ["orderId", "amount"],
        "properties": {
            "orderId": {"type": "string", "minLength": 1},
            "amount": {"type": "number", "minimum": 0}
        }
    })
}

/// The sidecar of `service` of namespace `shop` in front of `app` with `messaging`: a 2 s
/// inbound timeout, bodies up to 64 KiB.
pub fn base_config(service: &str, app: SocketAddr, messaging: MessagingConfig) -> ProxyConfig {
    let mut c = crate::proxy::config(NS, service, app);
    c.inbound.timeout_ms = 2_000;
    c.inbound.max_body_bytes = 64 * 1024;
    c.messaging = Some(messaging);
    c
}

pub fn publisher_messaging(url: &str) -> MessagingConfig {
    MessagingConfig {
        broker_url: url.into(),
        broker_kind: "nats".into(),
        credentials_file: None,
        publishes: vec![PublishConfig {
            queue: QUEUE.into(),
            stream: STREAM.into(),
            subject: SUBJECT.into(),
            schema: Some(order_schema()),
            event_type: "order.created".into(),
            duplicate_window_ms: None,
            max_messages: None,
            max_age_ms: None,
        }],
        consumes: vec![],
    }
}

pub fn consume_config(consumer: &str) -> ConsumeConfig {
    ConsumeConfig {
        queue: QUEUE.into(),
        stream: STREAM.into(),
        consumer: consumer.into(),
        path: "/events/orders".into(),
        max_in_flight: 8,
        max_deliveries: 5,
        ack_wait_ms: 2_000,
        backoff_ms: vec![100, 200],
        dead_letter_stream: DLQ_STREAM.into(),
        dead_letter_subject: DLQ_SUBJECT.into(),
        schema: Some(order_schema()),
        dedup_window_ms: 120_000,
        // As the operator renders it: the Queue's eventType (not its name, `orders`).
        event_type: Some("order.created".into()),
        limits: Default::default(),
    }
}

pub fn consumer_messaging(url: &str, c: ConsumeConfig) -> MessagingConfig {
    MessagingConfig {
        broker_url: url.into(),
        broker_kind: "nats".into(),
        credentials_file: None,
        publishes: vec![],
        consumes: vec![c],
    }
}

/// Declares the queue's stream the way the operator does (file storage, 2 min duplicate window).
pub async fn declare_stream(js: &async_nats::jetstream::Context) {
    js.get_or_create_stream(async_nats::jetstream::stream::Config {
        name: STREAM.into(),
        subjects: vec![SUBJECT.into()],
        storage: async_nats::jetstream::stream::StorageType::File,
        duplicate_window: Duration::from_secs(120),
        ..Default::default()
    })
    .await
    .expect("create stream");
}

pub async fn stream_len(js: &async_nats::jetstream::Context, name: &str) -> u64 {
    match js.get_stream(name).await {
        Ok(mut s) => s.info().await.map(|i| i.state.messages).unwrap_or(0),
        Err(_) => 0,
    }
}

/// Reads every message of `stream` (direct get by sequence).
pub async fn stream_messages(
    js: &async_nats::jetstream::Context,
    name: &str,
) -> Vec<async_nats::jetstream::message::StreamMessage> {
    let mut out = Vec::new();
    let Ok(mut s) = js.get_stream(name).await else {
        return out;
    };
    let info = s.info().await.unwrap().clone();
    for seq in info.state.first_sequence..=info.state.last_sequence {
        if let Ok(m) = s.get_raw_message(seq).await {
            out.push(m);
        }
    }
    out
}

pub fn header<'a>(m: &'a async_nats::jetstream::message::StreamMessage, name: &str) -> &'a str {
    m.headers.get(name).map(|v| v.as_str()).unwrap_or("")
}

/// The CloudEvents headers of event `id`, as a publishing sidecar writes them.
pub fn ce_headers(id: &str) -> Vec<(&'static str, String)> {
    vec![
        ("ce-specversion", "1.0".into()),
        ("ce-id", id.into()),
        ("ce-source", "weir://shop/test".into()),
        ("ce-type", "order.created".into()),
        ("ce-time", "2026-01-01T00:00:00.000Z".into()),
        ("content-type", "application/json".into()),
    ]
}

/// Publishes a message with exactly `headers` straight to the stream.
pub async fn raw_publish_headers(
    js: &async_nats::jetstream::Context,
    headers: &[(&str, &str)],
    body: &[u8],
) -> async_nats::jetstream::publish::PublishAck {
    let mut h = async_nats::HeaderMap::new();
    for (k, v) in headers {
        h.insert(*k, *v);
    }
    js.publish_with_headers(SUBJECT, h, Bytes::copy_from_slice(body))
        .await
        .unwrap()
        .await
        .unwrap()
}

/// Publishes an event straight to the stream (as a publisher sidecar would, or bypassing it).
pub async fn raw_publish(
    js: &async_nats::jetstream::Context,
    id: &str,
    msg_id: &str,
    body: &str,
) -> async_nats::jetstream::publish::PublishAck {
    let mut h = ce_headers(id);
    h.push(("Nats-Msg-Id", msg_id.into()));
    let h: Vec<(&str, &str)> = h.iter().map(|(k, v)| (*k, v.as_str())).collect();
    raw_publish_headers(js, &h, body.as_bytes()).await
}

/// A sidecar of the suite: the real `weir-proxy` with a messaging config; `kill9` and `restart`
/// keep the config and ports.
pub type Sidecar = Proxy;

/// The sidecar's command line in this suite: no access log, config reloaded every 200 ms, info
/// logs (which the tests read).
fn spawn_sidecar(bin: &Path, config: ProxyConfig) -> Sidecar {
    Proxy::spawn(
        bin,
        config,
        &["--no-access-log", "--reload-interval-ms", "200"],
        &[("WEIR_LOG", OsStr::new("info"))],
    )
}

/// Starts `bin` as a sidecar with `config` and waits until it is ready and connected to its
/// broker.
pub async fn sidecar(bin: impl AsRef<Path>, config: ProxyConfig) -> Sidecar {
    let s = spawn_sidecar(bin.as_ref(), config);
    s.wait_connected().await;
    s
}

/// Like [`sidecar`], waiting for `/readyz` only: for a broker that is down.
pub async fn sidecar_unconnected(bin: impl AsRef<Path>, config: ProxyConfig) -> Sidecar {
    let s = spawn_sidecar(bin.as_ref(), config);
    s.wait_ready().await;
    s
}

/// A `weir-proxy` that is not expected to connect to its broker, its stdout collected. Its HTTP
/// path is ready all the same: [`Unready::says`] and [`Unready::brokerz_says`] check both.
pub struct Unready {
    pub proxy: Proxy,
    /// `http://<admin listener>`.
    admin: String,
    pub logs: Arc<Mutex<Vec<String>>>,
}

impl Unready {
    /// Starts `bin` with `config` (info logs), without waiting.
    pub fn start(bin: impl AsRef<Path>, config: ProxyConfig) -> Unready {
        let admin = format!("http://{}", config.admin.listen);
        let proxy = Proxy::spawn(bin, config, &[], &[("WEIR_LOG", OsStr::new("info"))]);
        Unready {
            admin,
            logs: proxy.logs.clone(),
            proxy,
        }
    }

    fn brokerz(&self) -> String {
        format!("{}/brokerz", self.admin)
    }

    /// Checks that `/readyz` answers 200 (a broker that cannot be reached leaves the HTTP path
    /// ready) while `/brokerz` answers 503.
    async fn ready_but_not_connected(&self) -> bool {
        matches!(
            http_get(&format!("{}/readyz", self.admin)).await,
            Ok((200, _))
        ) && matches!(http_get(&self.brokerz()).await, Ok((503, _)))
    }

    /// Waits until `/brokerz` answers 503 (and `/readyz` 200) and a log line contains every one
    /// of `words` (lowercase); then checks it stays so.
    pub async fn says(&self, words: &[&str]) {
        let found = eventually_async(Duration::from_secs(15), || async {
            self.ready_but_not_connected().await
                && self.logs.lock().unwrap().iter().any(|l| {
                    let l = l.to_lowercase();
                    words.iter().all(|w| l.contains(w))
                })
        })
        .await;
        assert!(
            found,
            "no /brokerz 503 with /readyz 200 and log with {words:?}: {:#?}",
            self.logs.lock().unwrap()
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
        assert!(self.ready_but_not_connected().await, "and stays so");
    }

    /// Waits until `/brokerz` answers 503 with a body containing `text` (and `/readyz` 200);
    /// then checks it stays so.
    pub async fn brokerz_says(&self, text: &str) {
        assert!(
            eventually_async(Duration::from_secs(10), || async {
                matches!(http_get(&self.brokerz()).await, Ok((503, t)) if t.contains(text))
                    && self.ready_but_not_connected().await
            })
            .await,
            "no /brokerz 503 naming {text:?} (with /readyz 200) from {}",
            self.admin
        );
        tokio::time::sleep(Duration::from_secs(1)).await;
        assert!(self.ready_but_not_connected().await, "and stays so");
    }
}

/// One test per broker (modules `nats`, `redis`, `rabbitmq`, `kafka`) for each scenario function
/// `async fn name(kind: Kind)` named.
#[macro_export]
macro_rules! per_broker {
    ($($name:ident),* $(,)?) => {
        mod nats {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $name() {
                    super::$name(super::Kind::Nats).await
                }
            )*
        }
        mod redis {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $name() {
                    super::$name(super::Kind::Redis).await
                }
            )*
        }
        mod rabbitmq {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $name() {
                    super::$name(super::Kind::Rabbitmq).await
                }
            )*
        }
        mod kafka {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $name() {
                    super::$name(super::Kind::Kafka).await
                }
            )*
        }
    };
}
