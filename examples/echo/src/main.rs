//! `weir-echo`: the app in Weir's examples and end-to-end tests.
//!
//! - `GET /healthz`, `GET /readyz`: 200.
//! - `GET /`: who answered (`SERVICE_NAME`, `HOSTNAME`), the trace context it received, the
//!   identity headers its sidecar let through (`x-user-id`, `x-user-role`) and the caller its
//!   sidecar verified over mutual TLS (`x-weir-caller`, `caller`).
//! - `GET /call/<dep>/<path>`: calls `$<DEP>_URL/<path>` (the sidecar's local port) and returns
//!   the upstream's status and body: how an app uses its dependencies under Weir.
//! - `GET /status/<code>`: answers with that status (to exercise breakers and retries).
//! - `GET /sleep/<ms>`: answers after that many milliseconds (to exercise timeouts).
//! - `POST /publish/<queue>`: publishes the body through the sidecar (`$WEIR_SIDECAR_URL/v1/publish/<queue>`).
//! - `POST /events/<anything>`: receives an event pushed by the sidecar (500 while `FAIL_EVENTS=1`);
//!   `GET /received` lists the events received, with their `ce-id`.
//! - `POST /fail`: from then on every request but the probes and `POST /recover` is answered
//!   503 (one replica gone bad while its probes pass: what outlier ejection is for);
//!   `POST /recover` ends it.
//! - `GET /requests`: how many requests it has answered (the probes and this one aside).
//! - `DELAY_MS`: every answer but the probes' and `/requests` waits that long first (one slow
//!   replica among fast ones, in the balancing benchmark).
//!
//! Listens on `127.0.0.1:$PORT` (8080): only the sidecar calls it. `BIND=0.0.0.0` to expose it.

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::{Request, Response, StatusCode, body::Incoming, service::service_fn};
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioIo};
use serde_json::json;
use std::sync::Arc;
use std::time::Duration;

/// `DELAY_MS`, read once.
static DELAY: std::sync::LazyLock<Duration> = std::sync::LazyLock::new(|| {
    Duration::from_millis(
        std::env::var("DELAY_MS")
            .ok()
            .and_then(|d| d.parse().ok())
            .unwrap_or(0),
    )
});

/// Requests answered, probes and `/requests` aside.
static ANSWERED: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

/// Set by `POST /fail`, cleared by `POST /recover`.
static FAILING: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

type HttpClient = Client<hyper_util::client::legacy::connect::HttpConnector, Full<Bytes>>;

/// Events received: (ce-id, ce-type, body).
type Received = Arc<std::sync::Mutex<Vec<serde_json::Value>>>;

#[tokio::main(flavor = "current_thread")]
async fn main() -> std::io::Result<()> {
    let port: u16 = std::env::var("PORT")
        .ok()
        .and_then(|p| p.parse().ok())
        .unwrap_or(8080);
    let bind = std::env::var("BIND").unwrap_or_else(|_| "127.0.0.1".into());
    let listener = tokio::net::TcpListener::bind((bind.as_str(), port)).await?;
    let client: Arc<HttpClient> = Arc::new(Client::builder(TokioExecutor::new()).build_http());
    let name = Arc::new(std::env::var("SERVICE_NAME").unwrap_or_else(|_| "echo".into()));
    let received: Received = Arc::default();
    println!(
        "{}",
        json!({"msg": "listening", "service": *name, "addr": listener.local_addr()?.to_string()})
    );
    let shutdown = async {
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
            .expect("signal handler");
        tokio::select! { _ = term.recv() => {}, _ = tokio::signal::ctrl_c() => {} }
    };
    tokio::pin!(shutdown);
    loop {
        let (stream, _) = tokio::select! {
            r = listener.accept() => r?,
            _ = &mut shutdown => break,
        };
        let client = client.clone();
        let name = name.clone();
        let received = received.clone();
        tokio::spawn(async move {
            let svc =
                service_fn(move |req| handle(req, client.clone(), name.clone(), received.clone()));
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(stream), svc)
                .await;
        });
    }
    println!("{}", json!({"msg": "stopped", "service": *name}));
    Ok(())
}

fn reply(status: StatusCode, body: serde_json::Value) -> Response<Full<Bytes>> {
    Response::builder()
        .status(status)
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from(body.to_string())))
        .expect("valid response")
}

async fn handle(
    req: Request<Incoming>,
    client: Arc<HttpClient>,
    name: Arc<String>,
    received: Received,
) -> Result<Response<Full<Bytes>>, std::convert::Infallible> {
    let path = req.uri().path().to_string();
    if path == "/requests" {
        let n = ANSWERED.load(std::sync::atomic::Ordering::SeqCst);
        return Ok(reply(
            StatusCode::OK,
            json!({"service": *name, "requests": n}),
        ));
    }
    if path != "/healthz" && path != "/readyz" {
        ANSWERED.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        let delay = *DELAY;
        if !delay.is_zero() {
            tokio::time::sleep(delay).await;
        }
    }
    let post_to = |p: &str| req.method() == hyper::Method::POST && path == p;
    if post_to("/fail") || post_to("/recover") {
        FAILING.store(path == "/fail", std::sync::atomic::Ordering::SeqCst);
        return Ok(reply(
            StatusCode::OK,
            json!({"service": *name, "failing": path == "/fail"}),
        ));
    }
    if FAILING.load(std::sync::atomic::Ordering::SeqCst) && path != "/healthz" && path != "/readyz"
    {
        return Ok(reply(
            StatusCode::SERVICE_UNAVAILABLE,
            json!({"service": *name, "pod": std::env::var("HOSTNAME").ok(), "error": "failing (POST /fail)"}),
        ));
    }
    if req.method() == hyper::Method::POST {
        return Ok(post(req, &path, &client, &name, &received).await);
    }
    if path == "/received" {
        let list = received.lock().expect("lock").clone();
        return Ok(reply(
            StatusCode::OK,
            json!({"service": *name, "events": list}),
        ));
    }
    let header = |h: &str| {
        req.headers()
            .get(h)
            .and_then(|v| v.to_str().ok())
            .map(str::to_string)
    };
    let traceparent = header("traceparent");
    Ok(match path.as_str() {
        "/healthz" | "/readyz" => reply(StatusCode::OK, json!({"ok": true})),
        "/" => reply(
            StatusCode::OK,
            json!({"service": *name, "pod": std::env::var("HOSTNAME").ok(), "traceparent": traceparent, "user": header("x-user-id"), "role": header("x-user-role"), "caller": header("x-weir-caller")}),
        ),
        p if p.starts_with("/status/") => {
            let code = p["/status/".len()..]
                .parse()
                .ok()
                .and_then(|c| StatusCode::from_u16(c).ok())
                .unwrap_or(StatusCode::BAD_REQUEST);
            reply(code, json!({"service": *name, "status": code.as_u16()}))
        }
        p if p.starts_with("/sleep/") => {
            let ms: u64 = p["/sleep/".len()..].parse().unwrap_or(0).min(60_000);
            tokio::time::sleep(Duration::from_millis(ms)).await;
            reply(StatusCode::OK, json!({"service": *name, "slept_ms": ms}))
        }
        p if p.starts_with("/call/") => {
            let rest = &p["/call/".len()..];
            let (dep, tail) = rest.split_once('/').unwrap_or((rest, ""));
            let var = format!("{}_URL", dep.to_ascii_uppercase().replace('-', "_"));
            match std::env::var(&var) {
                Err(_) => reply(
                    StatusCode::NOT_FOUND,
                    json!({"error": format!("no dependency {dep}: {var} is not set")}),
                ),
                Ok(base) => {
                    let uri = format!("{}/{}", base.trim_end_matches('/'), tail);
                    let mut up = Request::get(&uri);
                    if let Some(tp) = &traceparent {
                        up = up.header("traceparent", tp);
                    }
                    match client
                        .request(up.body(Full::default()).expect("valid request"))
                        .await
                    {
                        Ok(resp) => {
                            let status = resp.status();
                            let reason = resp
                                .headers()
                                .get("x-weir-reason")
                                .and_then(|v| v.to_str().ok())
                                .map(str::to_string);
                            let body = resp
                                .into_body()
                                .collect()
                                .await
                                .map(|b| b.to_bytes())
                                .unwrap_or_default();
                            let upstream: serde_json::Value = serde_json::from_slice(&body)
                                .unwrap_or_else(|_| json!(String::from_utf8_lossy(&body)));
                            reply(
                                status,
                                json!({"service": *name, "via": uri, "status": status.as_u16(), "weir_reason": reason, "upstream": upstream}),
                            )
                        }
                        Err(e) => reply(
                            StatusCode::BAD_GATEWAY,
                            json!({"service": *name, "via": uri, "error": e.to_string()}),
                        ),
                    }
                }
            }
        }
        _ => reply(
            StatusCode::NOT_FOUND,
            json!({"error": "not found", "path": path}),
        ),
    })
}

async fn post(
    req: Request<Incoming>,
    path: &str,
    client: &HttpClient,
    name: &str,
    received: &Received,
) -> Response<Full<Bytes>> {
    let header = |h: &str| {
        req.headers()
            .get(h)
            .and_then(|v| v.to_str().ok())
            .map(str::to_string)
    };
    let (ce_id, ce_type, traceparent) = (header("ce-id"), header("ce-type"), header("traceparent"));
    let body = match req.into_body().collect().await {
        Ok(b) => b.to_bytes(),
        Err(e) => return reply(StatusCode::BAD_REQUEST, json!({"error": e.to_string()})),
    };
    if let Some(queue) = path.strip_prefix("/publish/") {
        let Ok(base) = std::env::var("WEIR_SIDECAR_URL") else {
            return reply(
                StatusCode::INTERNAL_SERVER_ERROR,
                json!({"error": "WEIR_SIDECAR_URL is not set"}),
            );
        };
        let mut up = Request::post(format!("{}/v1/publish/{queue}", base.trim_end_matches('/')))
            .header("content-type", "application/json");
        if let Some(id) = &ce_id {
            up = up.header("ce-id", id);
        }
        if let Some(tp) = &traceparent {
            up = up.header("traceparent", tp);
        }
        return match client
            .request(up.body(Full::new(body)).expect("valid request"))
            .await
        {
            Ok(resp) => {
                let status = resp.status();
                let body = resp
                    .into_body()
                    .collect()
                    .await
                    .map(|b| b.to_bytes())
                    .unwrap_or_default();
                let answer: serde_json::Value = serde_json::from_slice(&body)
                    .unwrap_or_else(|_| json!(String::from_utf8_lossy(&body)));
                reply(status, json!({"service": name, "sidecar": answer}))
            }
            Err(e) => reply(StatusCode::BAD_GATEWAY, json!({"error": e.to_string()})),
        };
    }
    if path.starts_with("/events/") {
        if std::env::var("FAIL_EVENTS").as_deref() == Ok("1") {
            return reply(
                StatusCode::INTERNAL_SERVER_ERROR,
                json!({"error": "FAIL_EVENTS=1"}),
            );
        }
        let event: serde_json::Value =
            serde_json::from_slice(&body).unwrap_or_else(|_| json!(String::from_utf8_lossy(&body)));
        received
            .lock()
            .expect("lock")
            .push(json!({"id": ce_id, "type": ce_type, "traceparent": traceparent, "data": event}));
        return reply(StatusCode::OK, json!({"ok": true}));
    }
    reply(
        StatusCode::NOT_FOUND,
        json!({"error": "not found", "path": path}),
    )
}
