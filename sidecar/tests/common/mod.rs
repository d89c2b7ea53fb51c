//! Helpers for the integration tests: loopback upstreams, the real `weir-proxy` binary, a client.
#![allow(dead_code)]

use bytes::Bytes;
use http::{HeaderMap, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::{TokioExecutor, TokioIo};
use std::future::Future;
use std::io::BufRead;
use std::net::{SocketAddr, TcpListener as StdListener};
use std::path::PathBuf;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use weir_crds::proxy::*;

pub fn free_addr() -> SocketAddr {
    let l = StdListener::bind("127.0.0.1:0").unwrap();
    l.local_addr().unwrap()
}

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
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let hits = Arc::new(AtomicUsize::new(0));
    let seen = Arc::new(Mutex::new(Vec::new()));
    let (h2, s2) = (hits.clone(), seen.clone());
    let task = tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                continue;
            };
            let (handler, hits, seen) = (handler.clone(), h2.clone(), s2.clone());
            tokio::spawn(async move {
                let svc = hyper::service::service_fn(move |req: Request<Incoming>| {
                    let n = hits.fetch_add(1, Ordering::SeqCst);
                    seen.lock().unwrap().push(req.headers().clone());
                    let fut = handler(req, n);
                    async move { Ok::<_, std::convert::Infallible>(fut.await) }
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), svc)
                    .await;
            });
        }
    });
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

pub fn base_config(app: SocketAddr) -> ProxyConfig {
    ProxyConfig {
        service: "orders".into(),
        namespace: "shop".into(),
        inbound: InboundConfig {
            listen: free_addr(),
            app,
            timeout_ms: 5_000,
            max_concurrent: None,
            max_queue: 0,
            rate_limit: None,
            max_body_bytes: 1 << 20,
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
        messaging: None,
        edge: None,
        identity: None,
    }
}

pub fn dependency(name: &str, upstream: String) -> OutboundConfig {
    OutboundConfig {
        name: name.into(),
        listen: free_addr(),
        upstream,
        timeout_ms: 2_000,
        retry: None,
        circuit_breaker: None,
        bulkhead: None,
        fallback: None,
    }
}

/// The real `weir-proxy` binary running with a config file.
pub struct Proxy {
    child: Child,
    pub config: ProxyConfig,
    pub config_path: PathBuf,
    pub logs: Arc<Mutex<Vec<String>>>,
    _dir: tempfile::TempDir,
}

impl Proxy {
    pub async fn start(config: ProxyConfig) -> Proxy {
        Self::start_with(config, &[]).await
    }

    pub async fn start_with(config: ProxyConfig, extra: &[&str]) -> Proxy {
        Self::start_env(config, extra, &[]).await
    }

    pub async fn start_env(
        config: ProxyConfig,
        extra: &[&str],
        env: &[(&str, &std::path::Path)],
    ) -> Proxy {
        let dir = tempfile::tempdir().unwrap();
        let config_path = dir.path().join("proxy.json");
        std::fs::write(&config_path, serde_json::to_string_pretty(&config).unwrap()).unwrap();
        let mut child = Command::new(env!("CARGO_BIN_EXE_weir-proxy"))
            .arg("--config")
            .arg(&config_path)
            .args(["--reload-interval-ms", "100", "--otlp-flush-ms", "100"])
            .args(extra)
            .envs(env.iter().map(|(k, v)| (*k, *v)))
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("spawn weir-proxy");
        let logs = Arc::new(Mutex::new(Vec::new()));
        let stdout = child.stdout.take().unwrap();
        let l2 = logs.clone();
        std::thread::spawn(move || {
            for line in std::io::BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                l2.lock().unwrap().push(line);
            }
        });
        let p = Proxy {
            child,
            config,
            config_path,
            logs,
            _dir: dir,
        };
        p.wait_ready().await;
        p
    }

    pub async fn wait_ready(&self) {
        let c = client();
        let deadline = Instant::now() + Duration::from_secs(15);
        loop {
            let req = Request::get(self.admin_url("/readyz"))
                .body(Full::default())
                .unwrap();
            if let Ok(Ok(r)) = tokio::time::timeout(Duration::from_secs(1), c.request(req)).await
                && r.status() == 200
            {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "proxy not ready; logs: {:#?}",
                self.logs.lock().unwrap()
            );
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
    }

    pub fn inbound_url(&self, path: &str) -> String {
        format!("http://{}{path}", self.config.inbound.listen)
    }
    pub fn admin_url(&self, path: &str) -> String {
        format!("http://{}{path}", self.config.admin.listen)
    }
    pub fn outbound_url(&self, name: &str, path: &str) -> String {
        let o = self
            .config
            .outbound
            .iter()
            .find(|o| o.name == name)
            .unwrap();
        format!("http://{}{path}", o.listen)
    }

    pub async fn metrics(&self) -> String {
        get(&client(), self.admin_url("/metrics")).await.body
    }

    /// The value of one sample line, e.g. `weir_retries_total{dependency="users"}`.
    pub async fn metric(&self, series: &str) -> f64 {
        let text = self.metrics().await;
        text.lines()
            .find_map(|l| {
                l.strip_prefix(series)
                    .and_then(|rest| rest.strip_prefix(' '))
            })
            .map(|v| v.trim().parse().unwrap())
            .unwrap_or(0.0)
    }

    /// Waits until a sample line has `value`: a request's counters are updated once its answer
    /// is made, which may be after the client stopped listening.
    pub async fn wait_metric(&self, series: &str, value: f64) {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let v = self.metric(series).await;
            if v == value {
                return;
            }
            assert!(Instant::now() < deadline, "{series} is {v}, not {value}");
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
    }

    pub fn log_lines(&self) -> Vec<serde_json::Value> {
        self.logs
            .lock()
            .unwrap()
            .iter()
            .filter_map(|l| serde_json::from_str(l).ok())
            .collect()
    }

    pub async fn wait_log(&self, pred: impl Fn(&serde_json::Value) -> bool) -> serde_json::Value {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if let Some(v) = self.log_lines().into_iter().find(|v| pred(v)) {
                return v;
            }
            assert!(
                Instant::now() < deadline,
                "log line not found; logs: {:#?}",
                self.logs.lock().unwrap()
            );
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
    }

    pub fn write_config(&self, text: &str) {
        // Like a ConfigMap update: write aside, then rename over the file.
        let tmp = self.config_path.with_extension("tmp");
        std::fs::write(&tmp, text).unwrap();
        std::fs::rename(&tmp, &self.config_path).unwrap();
    }

    pub fn sigterm(&self) {
        let ok = Command::new("kill")
            .arg("-TERM")
            .arg(self.child.id().to_string())
            .status()
            .unwrap();
        assert!(ok.success());
    }

    pub fn wait_exit(&mut self, timeout: Duration) -> ExitStatus {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(s) = self.child.try_wait().unwrap() {
                return s;
            }
            assert!(Instant::now() < deadline, "proxy did not exit");
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
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
