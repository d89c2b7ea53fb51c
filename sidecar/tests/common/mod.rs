//! Helpers for the HTTP integration tests: loopback upstreams, configs, the real `weir-proxy`
//! binary started as these suites run it (a [`Proxy`] of the test kit), a client.
#![allow(dead_code)]

use bytes::Bytes;
use http::{HeaderMap, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use std::future::Future;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use weir_crds::proxy::*;

pub use weir_testkit::{Proxy, free_addr, serve};

pub mod otlp;

/// A loopback HTTP/1.1 server; `handler` gets each request and its 0-based index.
pub struct Upstream {
    pub addr: SocketAddr,
    pub hits: Arc<AtomicUsize>,
    /// Headers of every request received.
    pub seen: Arc<Mutex<Vec<HeaderMap>>>,
    task: tokio::task::JoinHandle<()>,
}

impl Upstream {
    pub fn hits(&self) -> usize {
        self.hits.load(Ordering::SeqCst)
    }
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }
}

impl Drop for Upstream {
    fn drop(&mut self) {
        self.task.abort();
    }
}

pub async fn upstream<F, Fut>(handler: F) -> Upstream
where
    F: Fn(Request<Incoming>, usize) -> Fut + Clone + Send + Sync + 'static,
    Fut: Future<Output = Response<Full<Bytes>>> + Send + 'static,
{
    let hits = Arc::new(AtomicUsize::new(0));
    let seen = Arc::new(Mutex::new(Vec::new()));
    let (h2, s2) = (hits.clone(), seen.clone());
    let (addr, task) = serve(move |req: Request<Incoming>| {
        let n = h2.fetch_add(1, Ordering::SeqCst);
        s2.lock().unwrap().push(req.headers().clone());
        handler(req, n)
    })
    .await;
    Upstream {
        addr,
        hits,
        seen,
        task,
    }
}

pub fn respond(status: u16, body: &'static str) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(Bytes::from_static(body.as_bytes())));
    *r.status_mut() = StatusCode::from_u16(status).unwrap();
    r
}

pub type TestClient = Client<HttpConnector, Full<Bytes>>;

pub fn client() -> TestClient {
    Client::builder(TokioExecutor::new()).build_http()
}

pub struct Answer {
    pub status: u16,
    pub headers: HeaderMap,
    pub body: String,
    pub elapsed: Duration,
}

pub async fn send(c: &TestClient, req: Request<Full<Bytes>>) -> Answer {
    let start = Instant::now();
    let resp = c.request(req).await.expect("request");
    let status = resp.status().as_u16();
    let headers = resp.headers().clone();
    let body = resp.into_body().collect().await.unwrap().to_bytes();
    Answer {
        status,
        headers,
        body: String::from_utf8_lossy(&body).into_owned(),
        elapsed: start.elapsed(),
    }
}

pub async fn get(c: &TestClient, url: String) -> Answer {
    send(c, Request::get(url).body(Full::default()).unwrap()).await
}

/// The proxy of service `orders` of namespace `shop` in front of `app`.
pub fn base_config(app: SocketAddr) -> ProxyConfig {
    weir_testkit::proxy::config("shop", "orders", app)
}

pub fn dependency(name: &str, upstream: String) -> OutboundConfig {
    OutboundConfig {
        name: name.into(),
        listen: free_addr(),
        upstream,
        protocol: Default::default(),
        timeout_ms: 2_000,
        stream_idle_timeout_ms: 300_000,
        retry: None,
        circuit_breaker: None,
        bulkhead: None,
        fallback: None,
        endpoints: None,
        load_balancer: Default::default(),
        outlier_detection: Default::default(),
        peer_identity: None,
    }
}

/// The `weir-proxy` binary these tests run.
pub const WEIR_PROXY: &str = env!("CARGO_BIN_EXE_weir-proxy");

/// Starts [`WEIR_PROXY`] with `config` as these suites run it (config reloaded and traces
/// flushed every 100 ms) and waits until it is ready.
pub async fn proxy(config: ProxyConfig) -> Proxy {
    proxy_env(config, &[], &[]).await
}

/// Like [`proxy`] with extra arguments after the suite's (a later flag wins).
pub async fn proxy_with(config: ProxyConfig, extra: &[&str]) -> Proxy {
    proxy_env(config, extra, &[]).await
}

/// Like [`proxy_with`], with environment variables added.
pub async fn proxy_env(config: ProxyConfig, extra: &[&str], env: &[(&str, &Path)]) -> Proxy {
    let mut args = vec!["--reload-interval-ms", "100", "--otlp-flush-ms", "100"];
    args.extend_from_slice(extra);
    let env: Vec<(&str, &std::ffi::OsStr)> = env.iter().map(|(k, v)| (*k, v.as_os_str())).collect();
    let p = Proxy::spawn(WEIR_PROXY, config, &args, &env);
    p.wait_ready().await;
    p
}

/// Sends raw bytes and reads until the server closes or `timeout`; returns what was read.
pub async fn raw(addr: SocketAddr, bytes: &[u8], timeout: Duration) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    let _ = s.write_all(bytes).await;
    let mut out = Vec::new();
    let _ = tokio::time::timeout(timeout, s.read_to_end(&mut out)).await;
    String::from_utf8_lossy(&out).into_owned()
}
