//! The coordinator's HTTP interface.
//!
//! - `POST /v1/sagas/<name>`: JSON input → `202 {"id": ...}`; `?wait=30s` waits for the end and
//!   answers `200 {"id", "status", "reason"}` (or `202` when it has not ended in time). An
//!   `Idempotency-Key` header makes the start idempotent: the instance id is derived from it.
//! - `GET /v1/sagas/<name>?state=&version=`: the instances (id, status, version, step, times).
//! - `GET /v1/sagas/<name>/<id>`: one instance's timeline.
//! - `POST /v1/sagas/<name>/<id>/cancel`, `.../retry` (`{"by", "reason"}`): `202` logged, `200`
//!   already asked, `409` not in a state that allows it, `404` unknown.
//! - `POST /v1/sagas/<name>/purge?state=&olderThan=&version=`: deletes finished instances.
//! - `GET /v1/stats`: counts (running, compensating, cancelling, completed, compensated,
//!   cancelled, failed) and counts per version.
//! - `/metrics`, `/healthz`, `/readyz`.

use super::coordinator::{Coordinator, StartError};
use super::log::{Request, StateFilter};
use bytes::Bytes;
use http::{Method, Response, StatusCode};
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use serde_json::{Value, json};
use sha2::{Digest, Sha256};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

const MAX_INPUT: usize = 1 << 20;
const MAX_WAIT: Duration = Duration::from_secs(300);

pub async fn serve(listener: tokio::net::TcpListener, c: Arc<Coordinator>) -> std::io::Result<()> {
    loop {
        let (stream, _) = listener.accept().await?;
        let c = c.clone();
        tokio::spawn(async move {
            let svc = service_fn(move |req| {
                let c = c.clone();
                async move { Ok::<_, std::convert::Infallible>(handle(req, c).await) }
            });
            let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                .serve_connection(TokioIo::new(stream), svc)
                .await;
        });
    }
}

fn reply(status: StatusCode, body: Value) -> Response<Full<Bytes>> {
    let mut text = serde_json::to_vec_pretty(&body).expect("JSON serializes");
    text.push(b'\n');
    Response::builder()
        .status(status)
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from(text)))
        .expect("valid response")
}

fn error(status: StatusCode, message: impl std::fmt::Display) -> Response<Full<Bytes>> {
    reply(status, json!({"error": message.to_string()}))
}

async fn handle(req: hyper::Request<Incoming>, c: Arc<Coordinator>) -> Response<Full<Bytes>> {
    let path = req.uri().path().to_string();
    let query = req.uri().query().unwrap_or_default().to_string();
    let parts: Vec<&str> = path.trim_matches('/').split('/').collect();
    match (req.method().clone(), parts.as_slice()) {
        (Method::GET, ["metrics"]) => Response::builder()
            .header(
                "content-type",
                "application/openmetrics-text; version=1.0.0; charset=utf-8",
            )
            .body(Full::new(Bytes::from(c.metrics.encode())))
            .expect("valid response"),
        (Method::GET, ["healthz"]) => reply(StatusCode::OK, json!({"status": "ok"})),
        (Method::GET, ["readyz"]) => {
            if c.caught_up.load(Ordering::SeqCst) && !c.stopping.load(Ordering::SeqCst) {
                reply(StatusCode::OK, json!({"status": "ready"}))
            } else {
                error(StatusCode::SERVICE_UNAVAILABLE, "catching up with the log")
            }
        }
        (Method::GET, ["v1", "stats"]) => reply(
            StatusCode::OK,
            serde_json::to_value(c.stats()).expect("stats serialize"),
        ),
        (_, ["v1", "sagas", name, ..]) if *name != c.cfg.name => error(
            StatusCode::NOT_FOUND,
            format!("this coordinator runs saga {:?}", c.cfg.name),
        ),
        (Method::POST, ["v1", "sagas", _]) => start(req, &query, c).await,
        (Method::POST, ["v1", "sagas", _, "purge"]) => purge(&c, &query).await,
        (Method::POST, ["v1", "sagas", _, id, op @ ("cancel" | "retry")]) => {
            let (id, op) = (id.to_string(), op.to_string());
            request(req, c, &id, &op).await
        }
        (Method::GET, ["v1", "sagas", _]) => {
            let state = match param(&query, "state")
                .map(|s| StateFilter::parse(&s))
                .transpose()
            {
                Ok(s) => s,
                Err(e) => return error(StatusCode::BAD_REQUEST, e),
            };
            let version = param(&query, "version");
            reply(
                StatusCode::OK,
                json!({"instances": c.filtered(state, version.as_deref())}),
            )
        }
        (Method::GET, ["v1", "sagas", _, id]) => timeline(&c, id).await,
        _ => error(StatusCode::NOT_FOUND, format!("no route for {path}")),
    }
}

/// A query parameter, percent-decoded enough for the values used here.
fn param(query: &str, name: &str) -> Option<String> {
    query.split('&').find_map(|kv| {
        let (k, v) = kv.split_once('=')?;
        (k == name).then(|| v.replace("%20", " ").replace('+', " "))
    })
}

/// `POST .../<id>/cancel` and `.../<id>/retry` with an optional `{"by", "reason"}` body.
async fn request(
    req: hyper::Request<Incoming>,
    c: Arc<Coordinator>,
    id: &str,
    op: &str,
) -> Response<Full<Bytes>> {
    if !super::log::valid_instance_id(id) {
        return error(StatusCode::BAD_REQUEST, "bad instance id");
    }
    let body = match Limited::new(req.into_body(), 64 * 1024).collect().await {
        Ok(b) => b.to_bytes(),
        Err(e) => return error(StatusCode::PAYLOAD_TOO_LARGE, e),
    };
    let body: Value = if body.iter().all(u8::is_ascii_whitespace) {
        json!({})
    } else {
        match serde_json::from_slice(&body) {
            Ok(v) => v,
            Err(e) => return error(StatusCode::BAD_REQUEST, format!("body is not JSON: {e}")),
        }
    };
    let by = body["by"]
        .as_str()
        .filter(|s| !s.is_empty())
        .unwrap_or("api");
    let reason = body["reason"].as_str().unwrap_or_default();
    let answer = if op == "cancel" {
        c.cancel(id, by, reason).await
    } else {
        c.retry(id, by, reason).await
    };
    match answer {
        Ok(Request::Accepted(s)) => reply(StatusCode::ACCEPTED, json!({"id": id, "status": s})),
        Ok(Request::Already(s)) => reply(StatusCode::OK, json!({"id": id, "status": s})),
        Ok(Request::Refused(_, why)) => error(StatusCode::CONFLICT, why),
        Ok(Request::NotFound) => error(StatusCode::NOT_FOUND, format!("no instance {id}")),
        Err(e) => error(StatusCode::SERVICE_UNAVAILABLE, e),
    }
}

/// `POST /v1/sagas/<saga>/purge?state=&olderThan=&version=`.
async fn purge(c: &Coordinator, query: &str) -> Response<Full<Bytes>> {
    let state = param(query, "state").unwrap_or_else(|| "finished".into());
    let filter = match StateFilter::parse(&state) {
        Ok(f) => f,
        Err(e) => return error(StatusCode::BAD_REQUEST, e),
    };
    let finished = match filter {
        StateFilter::One(s) => s.finished(),
        StateFilter::Finished => true,
        StateFilter::Unfinished => false,
    };
    if !finished {
        return error(
            StatusCode::CONFLICT,
            format!("state={state}: unfinished instances are never purged (cancel them first)"),
        );
    }
    let age = match param(query, "olderThan")
        .map(|a| weir_crds::duration::parse_long(&a))
        .transpose()
    {
        Ok(a) => a.unwrap_or_default(),
        Err(e) => return error(StatusCode::BAD_REQUEST, format!("olderThan: {e}")),
    };
    let version = param(query, "version");
    match c.purge(filter, age, version.as_deref()).await {
        Ok(ids) => reply(StatusCode::OK, json!({"purged": ids.len(), "ids": ids})),
        Err(e) => error(StatusCode::SERVICE_UNAVAILABLE, e),
    }
}

async fn start(
    req: hyper::Request<Incoming>,
    query: &str,
    c: Arc<Coordinator>,
) -> Response<Full<Bytes>> {
    if !c.cfg.trigger.http {
        return error(
            StatusCode::FORBIDDEN,
            "the HTTP trigger is off for this saga (spec.trigger.http: false)",
        );
    }
    if c.stopping.load(Ordering::SeqCst) {
        return error(StatusCode::SERVICE_UNAVAILABLE, "shutting down");
    }
    let wait = query
        .split('&')
        .find_map(|kv| kv.strip_prefix("wait="))
        .map(weir_crds::duration::parse)
        .transpose();
    let wait = match wait {
        Ok(w) => w.map(|w| w.min(MAX_WAIT)),
        Err(e) => return error(StatusCode::BAD_REQUEST, format!("wait: {e}")),
    };
    // An event pushed by a sidecar (`ce-id`) starts the same instance as the NATS trigger would.
    let id = match (
        req.headers().get("Idempotency-Key"),
        req.headers().get("ce-id").and_then(|v| v.to_str().ok()),
    ) {
        (Some(k), _) => format!("ik-{}", &hex::encode(Sha256::digest(k.as_bytes()))[..32]),
        (None, Some(event)) => super::coordinator::instance_id_for_event(event),
        (None, None) => uuid::Uuid::new_v4().to_string(),
    };
    let body = match Limited::new(req.into_body(), MAX_INPUT).collect().await {
        Ok(b) => b.to_bytes(),
        Err(e) => return error(StatusCode::PAYLOAD_TOO_LARGE, e),
    };
    let input: Value = if body.iter().all(u8::is_ascii_whitespace) {
        json!({})
    } else {
        match serde_json::from_slice(&body) {
            Ok(v) => v,
            Err(e) => return error(StatusCode::BAD_REQUEST, format!("input is not JSON: {e}")),
        }
    };
    let mut finished = c.subscribe();
    let created = match c.start(&id, input).await {
        Ok(created) => created,
        Err(e @ StartError::BadId) => return error(StatusCode::BAD_REQUEST, e),
        // Transient: a pushing sidecar retries a 503 later (a 409 would dead-letter the event).
        Err(e @ StartError::Busy(_)) => return error(StatusCode::SERVICE_UNAVAILABLE, e),
        Err(e) => return error(StatusCode::SERVICE_UNAVAILABLE, e),
    };
    let Some(wait) = wait else {
        return reply(StatusCode::ACCEPTED, json!({"id": id, "created": created}));
    };
    if let Some(s) = c.summary(&id).filter(|s| s.status.finished()) {
        return reply(
            StatusCode::OK,
            json!({"id": id, "status": s.status, "reason": s.reason}),
        );
    }
    let deadline = tokio::time::Instant::now() + wait;
    loop {
        match tokio::time::timeout_at(deadline, finished.recv()).await {
            Err(_) => {
                return reply(
                    StatusCode::ACCEPTED,
                    json!({"id": id, "created": created, "status": "Running"}),
                );
            }
            Ok(Ok(f)) if f.id == id => {
                return reply(
                    StatusCode::OK,
                    json!({"id": id, "status": f.status, "reason": f.reason}),
                );
            }
            Ok(Ok(_)) => {}
            Ok(Err(tokio::sync::broadcast::error::RecvError::Lagged(_))) => {
                if let Some(s) = c.summary(&id).filter(|s| s.status.finished()) {
                    return reply(
                        StatusCode::OK,
                        json!({"id": id, "status": s.status, "reason": s.reason}),
                    );
                }
            }
            Ok(Err(_)) => return error(StatusCode::SERVICE_UNAVAILABLE, "shutting down"),
        }
    }
}

async fn timeline(c: &Coordinator, id: &str) -> Response<Full<Bytes>> {
    if !super::log::valid_instance_id(id) {
        return error(StatusCode::BAD_REQUEST, "bad instance id");
    }
    match c.log.load(id, 0).await {
        Ok(Some(inst)) => reply(
            StatusCode::OK,
            json!({
                "id": inst.id,
                "status": inst.status,
                "version": inst.version,
                "reason": inst.reason,
                "input": inst.input,
                "entries": inst.entries,
            }),
        ),
        Ok(None) => error(StatusCode::NOT_FOUND, format!("no instance {id}")),
        Err(e) => error(StatusCode::SERVICE_UNAVAILABLE, e),
    }
}
