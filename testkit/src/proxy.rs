//! A running `weir-proxy`, and the small HTTP client the suites talk to it with.
//!
//! [`Proxy`] is the real binary (its path given by the caller: `env!("CARGO_BIN_EXE_weir-proxy")`
//! exists only in the sidecar's own tests and benchmarks) run with a config file in a temporary
//! directory, its stdout (the JSON log) collected line by line, its stderr passed through. It can
//! be killed with SIGKILL and started again with the same command, config and ports, stopped
//! with SIGTERM and waited for; it reads its admin endpoints (`/readyz`, `/brokerz`, `/metrics`)
//! and publishes through `/v1/publish/<queue>`. A suite keeps its own command line (flags, env)
//! in a small constructor of its own.

use crate::net::free_addr;
use bytes::Bytes;
use http::Request;
use http_body_util::{BodyExt, Full};
use std::ffi::{OsStr, OsString};
use std::io::BufRead;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use weir_crds::proxy::{AdminConfig, InboundConfig, ProxyConfig, TracingConfig, UnderscoreHeaders};

/// The config of a proxy for `service` of `namespace` in front of the app at `app`: inbound and
/// admin listeners on free loopback ports, a 5 s inbound timeout, bodies up to 1 MiB, no
/// dependencies, messaging, edge or identity. A test changes what it is about.
pub fn config(namespace: &str, service: &str, app: SocketAddr) -> ProxyConfig {
    ProxyConfig {
        service: service.into(),
        namespace: namespace.into(),
        inbound: InboundConfig {
            listen: free_addr(),
            app,
            timeout_ms: 5_000,
            stream_idle_timeout_ms: 300_000,
            max_concurrent: None,
            max_queue: 0,
            rate_limit: None,
            max_body_bytes: 1 << 20,
            liveness_path: None,
            readiness_path: None,
            liveness_grpc_service: None,
            readiness_grpc_service: None,
            underscore_headers: UnderscoreHeaders::default(),
            app_protocol: Default::default(),
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
        mtls: None,
    }
}

/// A `weir-proxy` process; SIGKILLed on drop.
pub struct Proxy {
    child: Option<Child>,
    bin: PathBuf,
    args: Vec<OsString>,
    env: Vec<(OsString, OsString)>,
    pub config: ProxyConfig,
    /// The config file: rewrite it ([`write_config`](Self::write_config)) to reload.
    pub config_path: PathBuf,
    /// Every stdout line so far.
    pub logs: Arc<Mutex<Vec<String>>>,
    _dir: tempfile::TempDir,
}

impl Proxy {
    /// Writes `config` and runs `bin --config <file> args…` with `env` added; does not wait (see
    /// [`wait_ready`](Self::wait_ready), [`wait_connected`](Self::wait_connected)).
    pub fn spawn(
        bin: impl AsRef<Path>,
        config: ProxyConfig,
        args: &[&str],
        env: &[(&str, &OsStr)],
    ) -> Proxy {
        let dir = tempfile::tempdir().expect("create the config directory");
        let config_path = dir.path().join("proxy.json");
        std::fs::write(
            &config_path,
            serde_json::to_string_pretty(&config).expect("a config as JSON"),
        )
        .expect("write the config");
        let mut p = Proxy {
            child: None,
            bin: bin.as_ref().to_path_buf(),
            args: args.iter().map(Into::into).collect(),
            env: env.iter().map(|(k, v)| (k.into(), v.into())).collect(),
            config,
            config_path,
            logs: Arc::default(),
            _dir: dir,
        };
        p.respawn();
        p
    }

    /// Runs the command again (after [`kill9`](Self::kill9)); its log goes on in `logs`.
    pub fn respawn(&mut self) {
        let mut child = Command::new(&self.bin)
            .arg("--config")
            .arg(&self.config_path)
            .args(&self.args)
            .envs(self.env.iter().map(|(k, v)| (k, v)))
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap_or_else(|e| panic!("spawn {}: {e}", self.bin.display()));
        let stdout = child.stdout.take().expect("piped stdout");
        let logs = self.logs.clone();
        std::thread::spawn(move || {
            for line in std::io::BufReader::new(stdout)
                .lines()
                .map_while(Result::ok)
            {
                logs.lock().unwrap().push(line);
            }
        });
        self.child = Some(child);
    }

    /// Waits (20 s at most) until `/readyz` answers 200.
    pub async fn wait_ready(&self) {
        self.wait_for(&["/readyz"], "proxy not ready").await
    }

    /// Waits (20 s at most) until the proxy is ready (`/readyz`) and connected to its broker
    /// (`/brokerz`): readiness alone does not wait for the broker.
    pub async fn wait_connected(&self) {
        self.wait_for(
            &["/readyz", "/brokerz"],
            "sidecar not ready or not connected",
        )
        .await
    }

    async fn wait_for(&self, paths: &[&str], what: &str) {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let mut all = true;
            for p in paths {
                let url = self.admin_url(p);
                let answer = tokio::time::timeout(Duration::from_secs(1), http_get(&url)).await;
                all &= matches!(answer, Ok(Ok((200, _))));
            }
            if all {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "{what}; logs: {:#?}",
                self.logs.lock().unwrap()
            );
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
    }

    /// `kill -9`: no shutdown, no drain.
    pub fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// SIGKILL, then the same command again; waits until connected when the config has
    /// messaging, else until ready.
    pub async fn restart(&mut self) {
        self.kill9();
        self.respawn();
        if self.config.messaging.is_some() {
            self.wait_connected().await;
        } else {
            self.wait_ready().await;
        }
    }

    /// The running process, to check how (or whether) it exited.
    pub fn child(&mut self) -> &mut Child {
        self.child.as_mut().expect("a running proxy")
    }

    /// SIGTERM: a graceful shutdown.
    pub fn sigterm(&self) {
        let pid = self.child.as_ref().expect("a running proxy").id();
        let ok = Command::new("kill")
            .arg("-TERM")
            .arg(pid.to_string())
            .status()
            .expect("run kill");
        assert!(ok.success());
    }

    /// Waits until the process exits; panics after `timeout`.
    pub fn wait_exit(&mut self, timeout: Duration) -> ExitStatus {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(s) = self.child().try_wait().expect("wait for the proxy") {
                return s;
            }
            assert!(Instant::now() < deadline, "proxy did not exit");
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// `http://<inbound listener><path>`.
    pub fn inbound_url(&self, path: &str) -> String {
        format!("http://{}{path}", self.config.inbound.listen)
    }

    /// `http://<admin listener><path>`.
    pub fn admin_url(&self, path: &str) -> String {
        format!("http://{}{path}", self.config.admin.listen)
    }

    /// `http://<listener of dependency name><path>`.
    pub fn outbound_url(&self, name: &str, path: &str) -> String {
        let o = self
            .config
            .outbound
            .iter()
            .find(|o| o.name == name)
            .unwrap_or_else(|| panic!("no dependency {name}"));
        format!("http://{}{path}", o.listen)
    }

    /// A GET through the inbound listener to the app: (status, body).
    pub async fn call_inbound(&self, path: &str) -> Result<(u16, String), String> {
        http_get(&self.inbound_url(path)).await
    }

    /// The text of `/metrics`.
    pub async fn metrics(&self) -> String {
        http_get(&self.admin_url("/metrics"))
            .await
            .expect("GET /metrics")
            .1
    }

    /// The value of one sample line of `/metrics`, e.g.
    /// `weir_retries_total{dependency="users"}`; 0 when there is none.
    pub async fn metric(&self, series: &str) -> f64 {
        let text = self.metrics().await;
        text.lines()
            .find_map(|l| l.strip_prefix(series).and_then(|r| r.strip_prefix(' ')))
            .map(|v| v.trim().parse().expect("a sample value"))
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

    /// The log lines that are JSON.
    pub fn log_lines(&self) -> Vec<serde_json::Value> {
        self.logs
            .lock()
            .unwrap()
            .iter()
            .filter_map(|l| serde_json::from_str(l).ok())
            .collect()
    }

    /// Waits (10 s at most) for a JSON log line `pred` holds for.
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

    /// Replaces the config file as a ConfigMap update does: written aside, then renamed over.
    pub fn write_config(&self, text: &str) {
        let tmp = self.config_path.with_extension("tmp");
        std::fs::write(&tmp, text).expect("write the config");
        std::fs::rename(&tmp, &self.config_path).expect("replace the config");
    }

    /// Publishes through the proxy as JSON: (status, parsed JSON body).
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

    /// Publishes through the proxy with that `content-type` (none when `None`): (status,
    /// parsed JSON body, or the text as a JSON string), and the answer's headers.
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
        let (status, answer, text) = http_send_full(
            req.body(Full::new(Bytes::from(body.to_string())))
                .expect("a request"),
        )
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
}

impl Drop for Proxy {
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

/// Sends `req` over plain HTTP/1.1: (status, body as text); an error as text, or `timeout`
/// after 10 s.
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

/// A GET of `url`: (status, body).
pub async fn http_get(url: &str) -> Result<(u16, String), String> {
    http_send(Request::get(url).body(Full::default()).expect("a request")).await
}
