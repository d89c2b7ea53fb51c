//! What every shop service shares: an HTTP server with `/healthz`, `/readyz`, JSON access logs
//! carrying the trace id, and graceful shutdown; calls to dependencies through `<DEP>_URL`;
//! publishing through the sidecar; and an append-only log on disk as the service's own store.
//!
//! Nothing here talks to a broker or knows where another service runs: that is Weir's job.

use bytes::Bytes;
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use hyper::{HeaderMap, Method, Request, Response, StatusCode};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::{TokioExecutor, TokioIo};
use serde_json::{Value, json};
use std::future::Future;
use std::io::{BufRead, Write};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

pub type Resp = Response<Full<Bytes>>;

/// Largest request body a service reads (the sidecar limits it too).
const MAX_BODY: usize = 1 << 20;
/// Deadline of a call to a dependency or to the sidecar (the sidecar has its own, shorter).
const CALL_TIMEOUT: Duration = Duration::from_secs(15);
/// How long in-flight requests may take to finish after SIGTERM.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(10);

/// A JSON response.
pub fn json(status: StatusCode, body: Value) -> Resp {
    Response::builder()
        .status(status)
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from(body.to_string())))
        .expect("valid response")
}

/// `{"error": ...}` with a status.
pub fn error(status: StatusCode, message: impl std::fmt::Display) -> Resp {
    json(status, json!({"error": message.to_string()}))
}

/// The W3C trace context of a request: passed on unchanged to every call the request makes, so
/// the sidecars tie the whole path into one trace.
#[derive(Debug, Clone, Default)]
pub struct Trace {
    pub traceparent: Option<String>,
}

impl Trace {
    /// The trace id (32 hex digits) of a valid `traceparent`.
    pub fn id(&self) -> Option<&str> {
        let tp = self.traceparent.as_deref()?;
        let mut parts = tp.split('-');
        let (_, id) = (parts.next()?, parts.next()?);
        (id.len() == 32 && id.bytes().all(|b| b.is_ascii_hexdigit())).then_some(id)
    }
}

/// One request, read whole.
#[derive(Debug)]
pub struct Req {
    pub method: Method,
    pub path: String,
    pub query: String,
    pub headers: HeaderMap,
    pub body: Bytes,
    pub trace: Trace,
}

impl Req {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }

    /// The body as JSON, or a 400 naming what is wrong.
    #[allow(
        clippy::result_large_err,
        reason = "the error is the answer, built once and returned straight to the handler"
    )]
    pub fn json(&self) -> Result<Value, Resp> {
        serde_json::from_slice(&self.body).map_err(|e| {
            error(
                StatusCode::BAD_REQUEST,
                format!("body is not valid JSON: {e}"),
            )
        })
    }

    /// `/a/b/c` → `["a", "b", "c"]`.
    pub fn segments(&self) -> Vec<&str> {
        self.path.split('/').filter(|s| !s.is_empty()).collect()
    }
}

/// Writes one JSON log line to stdout: time, level, service, message, trace id, and fields.
pub fn log(service: &str, level: &str, msg: &str, trace: Option<&Trace>, fields: Value) {
    let ts = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default()
        .as_millis();
    let mut line = json!({"ts": ts, "level": level, "service": service, "msg": msg});
    if let Some(id) = trace.and_then(Trace::id) {
        line["traceId"] = json!(id);
    }
    if let (Some(out), Value::Object(f)) = (line.as_object_mut(), fields) {
        out.extend(f);
    }
    let mut stdout = std::io::stdout().lock();
    let _ = writeln!(stdout, "{line}");
    let _ = stdout.flush();
}

/// A random id with a prefix: `o-3f9c...`.
pub fn new_id(prefix: &str) -> String {
    format!("{prefix}-{:016x}", rand::random::<u64>())
}

/// What a service knows of its surroundings, from the environment Weir gives it.
pub struct Env {
    pub name: String,
    pub data_dir: PathBuf,
    /// `$WEIR_SIDECAR_URL`: the sidecar's admin listener (publish endpoint, readiness).
    pub sidecar: Option<String>,
    client: Client<HttpConnector, Full<Bytes>>,
}

impl Env {
    /// Reads `SERVICE_NAME`, `DATA_DIR` (else `WEIR_STATE_DIR`, else `./data/<name>`) and
    /// `WEIR_SIDECAR_URL`.
    pub fn from_env(default_name: &str) -> Arc<Env> {
        let name = std::env::var("SERVICE_NAME").unwrap_or_else(|_| default_name.to_string());
        let data_dir = std::env::var_os("DATA_DIR")
            .or_else(|| std::env::var_os("WEIR_STATE_DIR"))
            .map(PathBuf::from)
            .unwrap_or_else(|| PathBuf::from("data").join(&name));
        let mut http = HttpConnector::new();
        http.set_nodelay(true);
        Arc::new(Env {
            name,
            data_dir,
            sidecar: std::env::var("WEIR_SIDECAR_URL").ok(),
            client: Client::builder(TokioExecutor::new()).build(http),
        })
    }

    /// Opens the service's store `<data dir>/<name>.jsonl` with its records so far; a service
    /// that cannot open its store logs why and exits 1 (it must not run without its data).
    pub fn open_store(&self, name: &str) -> (Store, Vec<Value>) {
        Store::open(&self.data_dir, name).unwrap_or_else(|e| {
            self.log(
                "error",
                "cannot open store",
                None,
                json!({"error": e.to_string()}),
            );
            std::process::exit(1)
        })
    }

    pub fn log(&self, level: &str, msg: &str, trace: Option<&Trace>, fields: Value) {
        log(&self.name, level, msg, trace, fields);
    }

    /// Calls a dependency: `dep` names the env var `<DEP>_URL` Weir sets. Returns the status and
    /// the body as JSON (`null` when empty, a string when not JSON).
    pub async fn call(
        &self,
        dep: &str,
        method: Method,
        path: &str,
        body: Option<&Value>,
        trace: &Trace,
        headers: &[(&str, &str)],
    ) -> Result<(StatusCode, Value), String> {
        let var = format!("{}_URL", dep.to_ascii_uppercase().replace('-', "_"));
        let base = std::env::var(&var).map_err(|_| format!("{var} is not set"))?;
        self.request(
            method,
            &format!("{}{path}", base.trim_end_matches('/')),
            body,
            trace,
            headers,
        )
        .await
    }

    /// Publishes an event through the sidecar: 202 when the broker has it. `id` becomes the
    /// CloudEvent id, so a repeated publish of the same event is dropped as a duplicate.
    pub async fn publish(
        &self,
        queue: &str,
        id: &str,
        event: &Value,
        trace: &Trace,
    ) -> Result<(StatusCode, Value), String> {
        let base = self
            .sidecar
            .as_deref()
            .ok_or("WEIR_SIDECAR_URL is not set: publishing needs the sidecar")?;
        self.request(
            Method::POST,
            &format!("{}/v1/publish/{queue}", base.trim_end_matches('/')),
            Some(event),
            trace,
            &[("ce-id", id)],
        )
        .await
    }

    async fn request(
        &self,
        method: Method,
        url: &str,
        body: Option<&Value>,
        trace: &Trace,
        headers: &[(&str, &str)],
    ) -> Result<(StatusCode, Value), String> {
        let mut b = Request::builder().method(method.clone()).uri(url);
        if let Some(tp) = &trace.traceparent {
            b = b.header("traceparent", tp);
        }
        for (k, v) in headers {
            b = b.header(*k, *v);
        }
        let payload = match body {
            Some(v) => {
                b = b.header("content-type", "application/json");
                Bytes::from(v.to_string())
            }
            None => Bytes::new(),
        };
        let req = b.body(Full::new(payload)).map_err(|e| e.to_string())?;
        let started = Instant::now();
        let resp = tokio::time::timeout(CALL_TIMEOUT, self.client.request(req))
            .await
            .map_err(|_| format!("{method} {url}: no answer within {CALL_TIMEOUT:?}"))?
            .map_err(|e| format!("{method} {url}: {e}"))?;
        let status = resp.status();
        let bytes = resp
            .into_body()
            .collect()
            .await
            .map_err(|e| format!("{method} {url}: {e}"))?
            .to_bytes();
        let value = if bytes.is_empty() {
            Value::Null
        } else {
            serde_json::from_slice(&bytes)
                .unwrap_or_else(|_| Value::String(String::from_utf8_lossy(&bytes).into_owned()))
        };
        self.log(
            "info",
            "call",
            Some(trace),
            json!({"method": method.as_str(), "url": url, "status": status.as_u16(),
                   "ms": started.elapsed().as_millis() as u64}),
        );
        Ok((status, value))
    }

    /// Readiness: the store's directory is writable and, for a service that publishes or
    /// consumes, the sidecar says it is ready (which includes its broker connection).
    pub async fn readiness(&self, needs_broker: bool) -> Result<(), String> {
        let probe = self.data_dir.join(".ready-probe");
        std::fs::write(&probe, b"ok").map_err(|e| format!("store {}: {e}", probe.display()))?;
        let _ = std::fs::remove_file(&probe);
        if needs_broker {
            let base = self
                .sidecar
                .as_deref()
                .ok_or("WEIR_SIDECAR_URL is not set")?;
            let (status, body) = self
                .request(
                    Method::GET,
                    &format!("{}/readyz", base.trim_end_matches('/')),
                    None,
                    &Trace::default(),
                    &[],
                )
                .await?;
            if status != StatusCode::OK {
                return Err(format!("sidecar not ready: {body}"));
            }
        }
        Ok(())
    }
}

/// A service's own store: an append-only file of JSON records, each flushed to disk before the
/// write returns, replayed at start. A torn last line (a crash mid-write) is ignored.
pub struct Store {
    file: Mutex<std::fs::File>,
}

impl Store {
    /// Opens (or creates) `<dir>/<name>.jsonl`; returns the store and its records so far.
    pub fn open(dir: &Path, name: &str) -> std::io::Result<(Store, Vec<Value>)> {
        std::fs::create_dir_all(dir)?;
        let path = dir.join(format!("{name}.jsonl"));
        let mut records = Vec::new();
        let mut good_len = 0u64;
        if let Ok(f) = std::fs::File::open(&path) {
            let mut reader = std::io::BufReader::new(f);
            let mut line = String::new();
            loop {
                line.clear();
                let n = reader.read_line(&mut line)?;
                if n == 0 || !line.ends_with('\n') {
                    break;
                }
                match serde_json::from_str(line.trim_end()) {
                    Ok(v) => records.push(v),
                    Err(_) => break,
                }
                good_len += n as u64;
            }
        }
        let file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&path)?;
        // Drop a torn tail so the next record starts on a line of its own.
        if file.metadata()?.len() != good_len {
            file.set_len(good_len)?;
        }
        Ok((
            Store {
                file: Mutex::new(file),
            },
            records,
        ))
    }

    /// Appends one record and waits until it is on disk.
    pub fn append(&self, record: &Value) -> std::io::Result<()> {
        let mut f = self.file.lock().unwrap_or_else(|e| e.into_inner());
        let mut line = record.to_string();
        line.push('\n');
        f.write_all(line.as_bytes())?;
        f.sync_data()
    }
}

/// Serves `handler` on `127.0.0.1:$PORT` (8080; `BIND` to change the address) until SIGTERM or
/// Ctrl-C, then lets in-flight requests finish. `/healthz` answers here; `/readyz` calls
/// `ready`. Every other request is logged as one JSON line with its trace id.
pub async fn serve<S, H, Fut, R, RFut>(env: Arc<Env>, state: Arc<S>, ready: R, handler: H)
where
    S: Send + Sync + 'static,
    H: Fn(Arc<S>, Req) -> Fut + Clone + Send + Sync + 'static,
    Fut: Future<Output = Resp> + Send + 'static,
    R: Fn(Arc<S>) -> RFut + Clone + Send + Sync + 'static,
    RFut: Future<Output = Result<(), String>> + Send + 'static,
{
    let port: u16 = std::env::var("PORT")
        .ok()
        .and_then(|p| p.parse().ok())
        .unwrap_or(8080);
    let bind = std::env::var("BIND").unwrap_or_else(|_| "127.0.0.1".into());
    let listener = match tokio::net::TcpListener::bind((bind.as_str(), port)).await {
        Ok(l) => l,
        Err(e) => {
            env.log(
                "error",
                "cannot listen",
                None,
                json!({"port": port, "error": e.to_string()}),
            );
            std::process::exit(1);
        }
    };
    env.log(
        "info",
        "listening",
        None,
        json!({"addr": format!("{bind}:{port}")}),
    );
    let graceful = hyper_util::server::graceful::GracefulShutdown::new();
    let shutdown = async {
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
            .expect("signal handler");
        tokio::select! { _ = term.recv() => {}, _ = tokio::signal::ctrl_c() => {} }
    };
    tokio::pin!(shutdown);
    loop {
        let stream = tokio::select! {
            r = listener.accept() => match r {
                Ok((s, _)) => s,
                Err(e) => {
                    env.log("warn", "accept failed", None, json!({"error": e.to_string()}));
                    continue;
                }
            },
            _ = &mut shutdown => break,
        };
        let _ = stream.set_nodelay(true);
        let (env, state, ready, handler) =
            (env.clone(), state.clone(), ready.clone(), handler.clone());
        let svc = hyper::service::service_fn(move |req: Request<Incoming>| {
            let (env, state, ready, handler) =
                (env.clone(), state.clone(), ready.clone(), handler.clone());
            async move {
                Ok::<_, std::convert::Infallible>(dispatch(env, state, ready, handler, req).await)
            }
        });
        let conn =
            hyper::server::conn::http1::Builder::new().serve_connection(TokioIo::new(stream), svc);
        let conn = graceful.watch(conn);
        tokio::spawn(async move {
            let _ = conn.await;
        });
    }
    env.log(
        "info",
        "shutting down: finishing in-flight requests",
        None,
        json!({}),
    );
    if tokio::time::timeout(SHUTDOWN_GRACE, graceful.shutdown())
        .await
        .is_err()
    {
        env.log(
            "warn",
            "requests still in flight after the grace period",
            None,
            json!({}),
        );
    }
    env.log("info", "stopped", None, json!({}));
}

async fn dispatch<S, H, Fut, R, RFut>(
    env: Arc<Env>,
    state: Arc<S>,
    ready: R,
    handler: H,
    req: Request<Incoming>,
) -> Resp
where
    H: Fn(Arc<S>, Req) -> Fut,
    Fut: Future<Output = Resp>,
    R: Fn(Arc<S>) -> RFut,
    RFut: Future<Output = Result<(), String>>,
{
    let started = Instant::now();
    let (parts, body) = req.into_parts();
    let path = parts.uri.path().to_string();
    match path.as_str() {
        "/healthz" => return json(StatusCode::OK, json!({"status": "ok"})),
        "/readyz" => {
            return match ready(state).await {
                Ok(()) => json(StatusCode::OK, json!({"status": "ready"})),
                Err(why) => {
                    env.log("warn", "not ready", None, json!({"reason": why}));
                    json(
                        StatusCode::SERVICE_UNAVAILABLE,
                        json!({"status": "not ready", "reason": why}),
                    )
                }
            };
        }
        _ => {}
    }
    let trace = Trace {
        traceparent: parts
            .headers
            .get("traceparent")
            .and_then(|v| v.to_str().ok())
            .map(str::to_string),
    };
    let body = match Limited::new(body, MAX_BODY).collect().await {
        Ok(b) => b.to_bytes(),
        Err(e) => return error(StatusCode::PAYLOAD_TOO_LARGE, format!("request body: {e}")),
    };
    let req = Req {
        method: parts.method.clone(),
        path: path.clone(),
        query: parts.uri.query().unwrap_or_default().to_string(),
        headers: parts.headers,
        body,
        trace: trace.clone(),
    };
    let resp = handler(state, req).await;
    env.log(
        "info",
        "request",
        Some(&trace),
        json!({"method": parts.method.as_str(), "path": path, "status": resp.status().as_u16(),
               "ms": started.elapsed().as_millis() as u64}),
    );
    resp
}

/// The runtime every shop service runs on.
pub fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("tokio runtime")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn trace_id_only_from_a_well_formed_traceparent() {
        let t = |s: &str| Trace {
            traceparent: Some(s.into()),
        };
        assert_eq!(
            t("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01").id(),
            Some("4bf92f3577b34da6a3ce929d0e0e4736")
        );
        assert_eq!(t("00-xyz-00f067aa0ba902b7-01").id(), None);
        assert_eq!(Trace::default().id(), None);
    }

    #[test]
    fn store_replays_records_and_drops_a_torn_tail() {
        let dir = std::env::temp_dir().join(new_id("shop-store-test"));
        {
            let (s, recs) = Store::open(&dir, "x").unwrap();
            assert!(recs.is_empty());
            s.append(&json!({"n": 1})).unwrap();
            s.append(&json!({"n": 2})).unwrap();
        }
        // A crash mid-write leaves half a line.
        let path = dir.join("x.jsonl");
        let mut f = std::fs::OpenOptions::new()
            .append(true)
            .open(&path)
            .unwrap();
        f.write_all(b"{\"n\": 3").unwrap();
        drop(f);
        let (s, recs) = Store::open(&dir, "x").unwrap();
        assert_eq!(recs, vec![json!({"n": 1}), json!({"n": 2})]);
        s.append(&json!({"n": 4})).unwrap();
        let (_, recs) = Store::open(&dir, "x").unwrap();
        assert_eq!(
            recs,
            vec![json!({"n": 1}), json!({"n": 2}), json!({"n": 4})]
        );
        std::fs::remove_dir_all(dir).unwrap();
    }
}
