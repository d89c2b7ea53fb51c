//! Helpers of the saga tests: a recording HTTP step service, the coordinator binary, a config.
#![allow(dead_code)]

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use serde_json::{Value, json};
use std::collections::{BTreeMap, HashMap};
use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use weir_crds::coordinator::*;

/// One call a step service received.
#[derive(Debug, Clone)]
pub struct Call {
    pub path: String,
    pub key: String,
    pub saga_id: String,
    pub body: Value,
    pub at: Instant,
    pub seq: usize,
}

#[derive(Debug, Clone)]
pub enum Mode {
    Ok,
    Status(u16),
    Hang,
    /// 409 when the body's `fail` is true.
    FailIfFlag,
    /// 200 after this many ms.
    Slow(u64),
}

#[derive(Default)]
pub struct State {
    pub calls: Vec<Call>,
    pub modes: HashMap<String, Mode>,
    /// Random delay range of every answer, in ms.
    pub delay: (u64, u64),
}

/// A step service on a loopback port that records every call with its `Idempotency-Key`.
#[derive(Clone)]
pub struct StepService {
    pub addr: SocketAddr,
    pub state: Arc<Mutex<State>>,
}

impl StepService {
    pub async fn start() -> Self {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let state = Arc::new(Mutex::new(State::default()));
        let st = state.clone();
        tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    return;
                };
                let st = st.clone();
                tokio::spawn(async move {
                    let svc = service_fn(move |req: hyper::Request<hyper::body::Incoming>| {
                        let st = st.clone();
                        async move {
                            let path = req.uri().path().to_string();
                            let h = |k: &str| {
                                req.headers()
                                    .get(k)
                                    .and_then(|v| v.to_str().ok())
                                    .unwrap_or_default()
                                    .to_string()
                            };
                            let (key, saga_id) = (h("idempotency-key"), h("weir-saga-id"));
                            let bytes = req.into_body().collect().await.unwrap().to_bytes();
                            let body: Value = serde_json::from_slice(&bytes).unwrap_or(Value::Null);
                            let (mode, delay) = {
                                let mut s = st.lock().unwrap();
                                let seq = s.calls.len();
                                s.calls.push(Call {
                                    path: path.clone(),
                                    key,
                                    saga_id: saga_id.clone(),
                                    body: body.clone(),
                                    at: Instant::now(),
                                    seq,
                                });
                                let (lo, hi) = s.delay;
                                let d = if hi > lo {
                                    rand::random_range(lo..=hi)
                                } else {
                                    lo
                                };
                                (s.modes.get(&path).cloned().unwrap_or(Mode::Ok), d)
                            };
                            if delay > 0 {
                                tokio::time::sleep(Duration::from_millis(delay)).await;
                            }
                            let (status, out) = match mode {
                                Mode::Ok => {
                                    (200, json!({"ok": true, "ref": format!("{path}:{saga_id}")}))
                                }
                                Mode::Status(s) => (s, json!({"error": "refused by the test"})),
                                Mode::Hang => {
                                    tokio::time::sleep(Duration::from_secs(3600)).await;
                                    (200, json!({}))
                                }
                                Mode::FailIfFlag if body["input"]["fail"] == true => {
                                    (409, json!({"error": "out of stock"}))
                                }
                                Mode::FailIfFlag => {
                                    (200, json!({"ok": true, "ref": format!("{path}:{saga_id}")}))
                                }
                                Mode::Slow(ms) => {
                                    tokio::time::sleep(Duration::from_millis(ms)).await;
                                    (200, json!({"ok": true, "ref": format!("{path}:{saga_id}")}))
                                }
                            };
                            Ok::<_, std::convert::Infallible>(
                                hyper::Response::builder()
                                    .status(status)
                                    .header("content-type", "application/json")
                                    .body(Full::new(Bytes::from(out.to_string())))
                                    .unwrap(),
                            )
                        }
                    });
                    let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                        .serve_connection(TokioIo::new(stream), svc)
                        .await;
                });
            }
        });
        Self { addr, state }
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    pub fn set(&self, path: &str, mode: Mode) {
        self.state.lock().unwrap().modes.insert(path.into(), mode);
    }

    pub fn calls(&self) -> Vec<Call> {
        self.state.lock().unwrap().calls.clone()
    }

    pub fn calls_of(&self, saga_id: &str) -> Vec<Call> {
        self.calls()
            .into_iter()
            .filter(|c| c.saga_id == saga_id)
            .collect()
    }
}

fn http(target: &str, method: &str, path: &str, body: Option<Value>) -> CallConfig {
    CallConfig::Http(HttpCallConfig {
        target: target.into(),
        method: method.into(),
        path: path.into(),
        body,
    })
}

/// The 3-step saga of the tests: reserve → charge → ship, each compensated.
pub fn config(nats: &str, svc: &str, name: &str) -> CoordinatorConfig {
    let step = |n: &str, target: &str, body: Value| StepConfig {
        name: n.into(),
        action: http(target, "POST", &format!("/{n}"), Some(body)),
        compensation: Some(http(
            target,
            "POST",
            &format!("/{n}/undo"),
            Some(json!({"order": "{{input.order}}"})),
        )),
        timeout_ms: 2000,
        retry: RetryConfig {
            attempts: 1,
            backoff_base_ms: 10,
            backoff_max_ms: 50,
        },
    };
    CoordinatorConfig {
        namespace: "shop".into(),
        name: name.into(),
        broker_url: nats.into(),
        credentials_file: None,
        listen: "127.0.0.1:0".parse().unwrap(),
        lease_ttl_ms: 1000,
        targets: BTreeMap::from([
            ("inventory".to_string(), svc.to_string()),
            ("payments".to_string(), svc.to_string()),
            ("shipping".to_string(), svc.to_string()),
        ]),
        steps: vec![
            step(
                "reserve",
                "inventory",
                json!({"order": "{{input.order}}", "qty": "{{input.qty}}"}),
            ),
            step(
                "charge",
                "payments",
                json!({"order": "{{input.order}}", "reservation": "{{steps.reserve.result.ref}}"}),
            ),
            step(
                "ship",
                "shipping",
                json!({"order": "{{input.order}}", "input": "{{input}}"}),
            ),
        ],
        compensation_retry: RetryConfig {
            attempts: 3,
            backoff_base_ms: 10,
            backoff_max_ms: 50,
        },
        trigger: TriggerConfig::default(),
        on_completed: None,
        on_failed: None,
        publish_url: None,
        direct_targets: Default::default(),
        retention_ms: None,
    }
}

/// A running `weir saga-coordinator`; SIGKILLed on drop.
pub struct Coordinator {
    pub child: Child,
    pub addr: SocketAddr,
    pub dir: tempfile::TempDir,
}

impl Coordinator {
    pub fn spawn(cfg: &CoordinatorConfig, crash: Option<&str>) -> Self {
        Self::spawn_with(cfg, crash, None)
    }

    /// With crash points, each crash named in `crash_log`.
    pub fn spawn_with(
        cfg: &CoordinatorConfig,
        crash: Option<&str>,
        crash_log: Option<&std::path::Path>,
    ) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("saga.json");
        std::fs::write(&path, serde_json::to_string_pretty(cfg).unwrap()).unwrap();
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_weir"));
        cmd.args(["saga-coordinator", "--saga"])
            .arg(format!("{}/{}", cfg.namespace, cfg.name))
            .arg("--config")
            .arg(&path)
            .arg("--log-text")
            .env(
                "RUST_LOG",
                std::env::var("SAGA_TEST_LOG").unwrap_or_else(|_| "warn".into()),
            )
            .stdout(Stdio::piped())
            .stderr(if std::env::var_os("SAGA_TEST_LOG").is_some() {
                Stdio::inherit()
            } else {
                Stdio::null()
            });
        if let Some(c) = crash {
            cmd.env("WEIR_SAGA_TEST_CRASH", c);
        }
        if let Some(l) = crash_log {
            cmd.env("WEIR_SAGA_TEST_CRASH_LOG", l);
        }
        let mut child = cmd.spawn().unwrap();
        let stdout = child.stdout.take().unwrap();
        let mut line = String::new();
        BufReader::new(stdout).read_line(&mut line).unwrap();
        let addr = line
            .trim()
            .strip_prefix("listening on ")
            .unwrap_or_else(|| panic!("coordinator did not start: {line:?}"))
            .parse()
            .unwrap();
        Self { child, addr, dir }
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// `kill -9`.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    pub fn exited(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(Some(_)))
    }
}

impl Drop for Coordinator {
    fn drop(&mut self) {
        self.kill();
    }
}

/// A JSON request; `None` when the connection failed.
pub async fn request(
    method: &str,
    url: &str,
    body: Option<Value>,
    headers: &[(&str, &str)],
) -> Option<(u16, Value)> {
    let client = hyper_util::client::legacy::Client::builder(TokioExecutor::new())
        .build_http::<Full<Bytes>>();
    let mut req = hyper::Request::builder().method(method).uri(url);
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    let req = req
        .body(Full::new(Bytes::from(
            body.map(|b| b.to_string()).unwrap_or_default(),
        )))
        .unwrap();
    let resp = tokio::time::timeout(Duration::from_secs(60), client.request(req))
        .await
        .ok()?
        .ok()?;
    let status = resp.status().as_u16();
    let bytes = resp.into_body().collect().await.ok()?.to_bytes();
    Some((
        status,
        serde_json::from_slice(&bytes).unwrap_or(Value::Null),
    ))
}

/// Every instance on the log, folded.
pub async fn instances(nats: &str, saga: &str) -> BTreeMap<String, weir_saga::log::Instance> {
    let client = async_nats::connect(nats).await.unwrap();
    let js = async_nats::jetstream::new(client);
    let log = weir_saga::log::Log::existing(js, "shop", saga);
    log.load_all(3).await.unwrap()
}

/// Waits until instance `id` has ended (60 s at most) and returns it.
pub async fn wait_end(nats: &str, saga: &str, id: &str) -> weir_saga::log::Instance {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        if let Some(i) = instances(nats, saga).await.remove(id)
            && i.status.finished()
        {
            return i;
        }
        assert!(Instant::now() < deadline, "{id} did not end in 60 s");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Waits until `pred` holds (30 s at most).
pub async fn wait_until(what: &str, mut pred: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while !pred() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// `weir saga <args>`: (exit success, stdout, stderr).
pub fn weir_saga(args: &[&str]) -> (bool, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_weir"))
        .arg("saga")
        .args(args)
        .output()
        .unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}
