//! Helpers for the bridge tests: a real nats-server (start, kill -9, restart on the same port and
//! store), a counting HTTP app, the real `weir-proxy` binary with a messaging config.
#![allow(dead_code)]

mod brokers;
#[allow(unused_imports)]
pub use brokers::*;

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use std::collections::HashMap;
use std::io::BufRead;
use std::net::{SocketAddr, TcpListener as StdListener};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use weir_crds::proxy::*;

pub fn free_addr() -> SocketAddr {
    StdListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
}

/// Polls `cond` every 20 ms until it holds or `timeout` passes; returns whether it held.
pub async fn eventually(timeout: Duration, mut cond: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + timeout;
    loop {
        if cond() {
            return true;
        }
        if Instant::now() > deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Finds `nats-server`: `$NATS_SERVER`, `<repo>/.tools/bin`, then `PATH`.
pub fn nats_server_bin() -> Option<PathBuf> {
    if let Ok(p) = std::env::var("NATS_SERVER") {
        return Some(PathBuf::from(p));
    }
    let repo = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..");
    let local = repo.join(".tools/bin/nats-server");
    if local.exists() {
        return Some(local);
    }
    std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|d| d.join("nats-server"))
            .find(|p| p.exists())
    })
}

/// Skips the test plainly (returns `None`) when nats-server is missing, unless `CI` is set.
pub fn require_nats() -> Option<PathBuf> {
    match nats_server_bin() {
        Some(p) => Some(p),
        None if std::env::var_os("CI").is_some() => {
            panic!("nats-server not found: run scripts/setup.sh")
        }
        None => {
            eprintln!("SKIP: nats-server not found (run scripts/setup.sh)");
            None
        }
    }
}

/// A real nats-server with JetStream and file storage on a free loopback port.
pub struct Nats {
    bin: PathBuf,
    extra: Vec<String>,
    child: Option<Child>,
    pub port: u16,
    pub store: tempfile::TempDir,
}

impl Nats {
    pub async fn start(bin: PathBuf) -> Nats {
        Self::start_with(bin, &[]).await
    }

    /// With extra command-line arguments, e.g. `["--auth", "token"]`.
    pub async fn start_with(bin: PathBuf, extra: &[&str]) -> Nats {
        let port = free_addr().port();
        let mut n = Nats {
            bin,
            extra: extra.iter().map(|s| s.to_string()).collect(),
            child: None,
            port,
            store: tempfile::tempdir().unwrap(),
        };
        n.spawn().await;
        n
    }

    pub fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.port)
    }

    async fn spawn(&mut self) {
        let child = Command::new(&self.bin)
            .args(["-js", "-sd"])
            .arg(self.store.path())
            .args(["-a", "127.0.0.1", "-p", &self.port.to_string()])
            .args(&self.extra)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn nats-server");
        self.child = Some(child);
        let addr: SocketAddr = format!("127.0.0.1:{}", self.port).parse().unwrap();
        let deadline = Instant::now() + Duration::from_secs(10);
        while tokio::net::TcpStream::connect(addr).await.is_err() {
            assert!(Instant::now() < deadline, "nats-server did not start");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// `kill -9`: no shutdown, no flush.
    pub fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill(); // SIGKILL
            let _ = c.wait();
        }
    }

    /// Starts again on the same port and store directory.
    pub async fn restart(&mut self) {
        self.kill9();
        self.spawn().await;
    }

    pub async fn client(&self) -> async_nats::Client {
        async_nats::connect(self.url()).await.expect("connect")
    }

    pub async fn js(&self) -> async_nats::jetstream::Context {
        async_nats::jetstream::new(self.client().await)
    }
}

impl Drop for Nats {
    fn drop(&mut self) {
        self.kill9();
    }
}

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
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
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
        let task = tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    continue;
                };
                let (calls, behavior, per_id, total) =
                    (c2.clone(), b2.clone(), p2.clone(), t2.clone());
                tokio::spawn(async move {
                    let svc = hyper::service::service_fn(move |req: Request<Incoming>| {
                        let (calls, behavior, per_id, total) = (
                            calls.clone(),
                            behavior.clone(),
                            per_id.clone(),
                            total.clone(),
                        );
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
                            let mut r = Response::new(Full::new(Bytes::from(format!(
                                "answer {status} for {id}"
                            ))));
                            *r.status_mut() = StatusCode::from_u16(status).unwrap();
                            Ok::<_, std::convert::Infallible>(r)
                        }
                    });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), svc)
                        .await;
                });
            }
        });
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

pub fn base_config(service: &str, app: SocketAddr, messaging: MessagingConfig) -> ProxyConfig {
    ProxyConfig {
        service: service.into(),
        namespace: NS.into(),
        inbound: InboundConfig {
            listen: free_addr(),
            app,
            timeout_ms: 2_000,
            max_concurrent: None,
            max_queue: 0,
            rate_limit: None,
            max_body_bytes: 64 * 1024,
            liveness_path: None,
            readiness_path: None,
            underscore_headers: UnderscoreHeaders::default(),
        },
        admin: AdminConfig {
            listen: free_addr(),
        },
        outbound: vec![],
        tracing: TracingConfig::default(),
        shutdown_grace_ms: 5_000,
        messaging: Some(messaging),
        edge: None,
        identity: None,
    }
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

/// The real `weir-proxy` binary; `kill9` and `restart` keep the config and ports.
pub struct Sidecar {
    child: Option<Child>,
    pub config: ProxyConfig,
    pub config_path: PathBuf,
    pub logs: Arc<Mutex<Vec<String>>>,
    _dir: tempfile::TempDir,
}

impl Sidecar {
    pub async fn start(config: ProxyConfig) -> Sidecar {
        let dir = tempfile::tempdir().unwrap();
        let config_path = dir.path().join("proxy.json");
        std::fs::write(&config_path, serde_json::to_string_pretty(&config).unwrap()).unwrap();
        let mut s = Sidecar {
            child: None,
            config,
            config_path,
            logs: Arc::new(Mutex::new(Vec::new())),
            _dir: dir,
        };
        s.spawn();
        s.wait_ready().await;
        s
    }

    /// Like [`Sidecar::start`], waiting for `/readyz` only: for a broker that is down.
    pub async fn start_unconnected(config: ProxyConfig) -> Sidecar {
        let dir = tempfile::tempdir().unwrap();
        let config_path = dir.path().join("proxy.json");
        std::fs::write(&config_path, serde_json::to_string_pretty(&config).unwrap()).unwrap();
        let mut s = Sidecar {
            child: None,
            config,
            config_path,
            logs: Arc::new(Mutex::new(Vec::new())),
            _dir: dir,
        };
        s.spawn();
        assert!(
            eventually_async(Duration::from_secs(20), || async {
                matches!(http_get(&s.admin_url("/readyz")).await, Ok((200, _)))
            })
            .await,
            "sidecar not ready; logs: {:#?}",
            s.logs.lock().unwrap()
        );
        s
    }

    /// A GET through the sidecar's inbound listener to the app: (status, body).
    pub async fn call_inbound(&self, path: &str) -> Result<(u16, String), String> {
        http_get(&format!("http://{}{path}", self.config.inbound.listen)).await
    }

    fn spawn(&mut self) {
        let mut child = Command::new(env!("CARGO_BIN_EXE_weir-proxy"))
            .arg("--config")
            .arg(&self.config_path)
            .arg("--no-access-log")
            .args(["--reload-interval-ms", "200"])
            .env("WEIR_LOG", "info")
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("spawn weir-proxy");
        let stdout = child.stdout.take().unwrap();
        let logs = self.logs.clone();
        std::thread::spawn(move || {
            for line in std::io::BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                logs.lock().unwrap().push(line);
            }
        });
        self.child = Some(child);
    }

    /// Waits until the sidecar is ready (`/readyz`) and connected to its broker (`/brokerz`):
    /// readiness alone no longer waits for the broker.
    pub async fn wait_ready(&self) {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let (Ok((200, _)), Ok((200, _))) = (
                http_get(&self.admin_url("/readyz")).await,
                http_get(&self.admin_url("/brokerz")).await,
            ) {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "sidecar not ready or not connected; logs: {:#?}",
                self.logs.lock().unwrap()
            );
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
    }

    pub fn admin_url(&self, path: &str) -> String {
        format!("http://{}{path}", self.config.admin.listen)
    }

    pub fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    pub async fn restart(&mut self) {
        self.kill9();
        self.spawn();
        self.wait_ready().await;
    }

    pub fn sigterm(&self) {
        let pid = self.child.as_ref().unwrap().id();
        let ok = Command::new("kill")
            .arg("-TERM")
            .arg(pid.to_string())
            .status()
            .unwrap();
        assert!(ok.success());
    }

    pub fn wait_exit(&mut self, timeout: Duration) -> std::process::ExitStatus {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(s) = self.child.as_mut().unwrap().try_wait().unwrap() {
                return s;
            }
            assert!(Instant::now() < deadline, "sidecar did not exit");
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// Publishes through the sidecar as JSON: (status, parsed JSON body).
    pub async fn publish(
        &self,
        queue: &str,
        headers: &[(&str, &str)],
        body: &str,
    ) -> (u16, serde_json::Value) {
        self.publish_as(queue, Some("application/json"), headers, body)
            .await
            .0
    }

    /// Publishes through the sidecar with that `content-type` (none when `None`): (status,
    /// parsed JSON body), and the answer's headers.
    pub async fn publish_as(
        &self,
        queue: &str,
        content_type: Option<&str>,
        headers: &[(&str, &str)],
        body: &str,
    ) -> ((u16, serde_json::Value), http::HeaderMap) {
        let mut req = Request::post(self.admin_url(&format!("/v1/publish/{queue}")));
        if let Some(ct) = content_type {
            req = req.header("content-type", ct);
        }
        for (k, v) in headers {
            req = req.header(*k, *v);
        }
        let (status, answer, text) =
            http_send_full(req.body(Full::new(Bytes::from(body.to_string()))).unwrap())
                .await
                .expect("publish request");
        (
            (
                status,
                serde_json::from_str(&text).unwrap_or(serde_json::Value::String(text)),
            ),
            answer,
        )
    }

    /// The value of one sample line of `/metrics`, e.g. `weir_messaging_acked_total{queue="orders"}`.
    pub async fn metric(&self, series: &str) -> f64 {
        let (_, text) = http_get(&self.admin_url("/metrics")).await.unwrap();
        text.lines()
            .find_map(|l| l.strip_prefix(series).and_then(|r| r.strip_prefix(' ')))
            .map(|v| v.trim().parse().unwrap())
            .unwrap_or(0.0)
    }
}

impl Drop for Sidecar {
    fn drop(&mut self) {
        self.kill9();
    }
}

type Client = hyper_util::client::legacy::Client<
    hyper_util::client::legacy::connect::HttpConnector,
    Full<Bytes>,
>;

fn client() -> Client {
    hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new()).build_http()
}

pub async fn http_send(req: Request<Full<Bytes>>) -> Result<(u16, String), String> {
    http_send_full(req)
        .await
        .map(|(status, _, body)| (status, body))
}

/// Like [`http_send`], with the answer's headers.
pub async fn http_send_full(
    req: Request<Full<Bytes>>,
) -> Result<(u16, http::HeaderMap, String), String> {
    let fut = async {
        let resp = client().request(req).await.map_err(|e| e.to_string())?;
        let status = resp.status().as_u16();
        let headers = resp.headers().clone();
        let body = resp
            .into_body()
            .collect()
            .await
            .map_err(|e| e.to_string())?
            .to_bytes();
        Ok((status, headers, String::from_utf8_lossy(&body).into_owned()))
    };
    tokio::time::timeout(Duration::from_secs(10), fut)
        .await
        .map_err(|_| "timeout".to_string())?
}

pub async fn http_get(url: &str) -> Result<(u16, String), String> {
    http_send(Request::get(url).body(Full::default()).unwrap()).await
}

/// Like [`eventually`] with an async condition.
pub async fn eventually_async<F, Fut>(timeout: Duration, mut cond: F) -> bool
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = Instant::now() + timeout;
    loop {
        if cond().await {
            return true;
        }
        if Instant::now() > deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// A `weir-proxy` that is not expected to connect to its broker, its stdout collected. Its HTTP
/// path is ready all the same: [`Unready::says`] and [`Unready::brokerz_says`] check both.
pub struct Unready {
    pub child: Child,
    /// `http://<admin listener>`.
    admin: String,
    pub logs: Arc<Mutex<Vec<String>>>,
    _dir: tempfile::TempDir,
}

impl Unready {
    pub fn start(config: ProxyConfig) -> Unready {
        let dir = tempfile::tempdir().unwrap();
        let path: PathBuf = dir.path().join("proxy.json");
        std::fs::write(&path, serde_json::to_string(&config).unwrap()).unwrap();
        let mut child = Command::new(env!("CARGO_BIN_EXE_weir-proxy"))
            .arg("--config")
            .arg(&path)
            .env("WEIR_LOG", "info")
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let out = child.stdout.take().unwrap();
        let logs: Arc<Mutex<Vec<String>>> = Arc::default();
        let l2 = logs.clone();
        std::thread::spawn(move || {
            for line in std::io::BufReader::new(out).lines().map_while(Result::ok) {
                l2.lock().unwrap().push(line);
            }
        });
        Unready {
            child,
            admin: format!("http://{}", config.admin.listen),
            logs,
            _dir: dir,
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

impl Drop for Unready {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// One test per broker (modules `nats`, `redis`, `rabbitmq`) for each scenario function
/// `async fn name(kind: Kind)` named.
#[allow(unused_macros)]
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
    };
}
