//! The dashboard's HTTP server: the page (embedded), the JSON API and the event stream.
//!
//! - `GET /`, `/app.js`, `/app.css`: the page.
//! - `GET /healthz`: `ok` (the chart's probes).
//! - `GET /api/snapshot`: the latest snapshot (services, calls, queues, sagas, findings).
//! - `GET /api/events`: Server-Sent Events, one snapshot per tick.
//! - `GET /api/queues/<queue>/dead-letters`: the Queue's dead letters (as `weir dlq list --json`).
//! - `GET /api/queues/<queue>/dead-letters/<seq>`: one dead letter (as `weir dlq show`).
//! - `POST /api/queues/<queue>/replay` `{"seq": [...]}` or `{"all": true}`: replays them.
//! - `GET /api/sagas/<saga>/<id>`: one instance's timeline, from its coordinator.
//! - `POST /api/sagas/<saga>/<id>/cancel` `{"reason"}`, `POST …/retry`: passed to the
//!   coordinator.
//!
//! The POST endpoints act only with `--dashboard-actions` (`weir dashboard serve --actions`);
//! otherwise they answer 403 and say why. They take JSON only (`content-type: application/json`),
//! which a cross-site form cannot send. A request whose `Host` is another site's name is refused
//! (403): the guard against DNS rebinding ([`host_allowed`]).

use super::assets;
use super::cluster::Cluster;
use super::collect::{HttpClient, Targets};
use super::model::System;
use bytes::Bytes;
use futures::StreamExt;
use http::{Method, Response, StatusCode, header};
use http_body_util::combinators::UnsyncBoxBody;
use http_body_util::{BodyExt, Full, Limited, StreamBody};
use hyper::body::{Frame, Incoming};
use serde_json::{Value, json};
use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::{Mutex, watch};
use weir_broker::admin::{self, Admin, BrokerAdmin};
use weir_broker::credentials::Credentials;
use weir_broker::dead_letters;

pub type Body = UnsyncBoxBody<Bytes, Infallible>;

/// The system the handlers answer about: fixed for `weir up`, listed again and again in a
/// cluster.
#[derive(Debug, Clone, Default)]
pub struct View {
    pub system: System,
    pub targets: Targets,
}

/// What the handlers share.
pub struct State {
    pub view: watch::Receiver<Arc<View>>,
    pub actions: bool,
    pub snapshot: watch::Receiver<Arc<String>>,
    pub client: HttpClient,
    broker: Mutex<Option<BrokerAdmin>>,
    /// In a cluster: the API server, through which coordinators and brokers are reached.
    pub cluster: Option<Arc<Cluster>>,
}

pub const READ_ONLY: &str = "the dashboard is read-only: start weir up with --dashboard-actions to replay dead letters and cancel or retry saga instances";

/// The answer of an action of the in-cluster dashboard without `--actions`.
pub const READ_ONLY_CLUSTER: &str = "the dashboard is read-only: install the chart with dashboard.actions=true (weir dashboard serve --actions) to replay dead letters and cancel or retry saga instances";

/// Why the in-cluster dashboard lists no dead letters without `--actions`.
pub const DEAD_LETTERS_NEED_ACTIONS: &str = "listing dead letters in a cluster needs the dashboard's actions mode (chart value dashboard.actions=true): it reads the Broker's credentials Secret, which a read-only dashboard may not; the count above is the Queue's status";

impl State {
    pub fn new(
        system: System,
        targets: Targets,
        actions: bool,
        snapshot: watch::Receiver<Arc<String>>,
    ) -> Self {
        // The sender goes: the receiver keeps the one value.
        let (_, view) = watch::channel(Arc::new(View { system, targets }));
        State {
            view,
            actions,
            snapshot,
            client: super::collect::client(),
            broker: Mutex::new(None),
            cluster: None,
        }
    }

    /// The state of the in-cluster dashboard: the view follows the collector's listings.
    pub fn in_cluster(
        cluster: Arc<Cluster>,
        view: watch::Receiver<Arc<View>>,
        actions: bool,
        snapshot: watch::Receiver<Arc<String>>,
    ) -> Self {
        State {
            view,
            actions,
            snapshot,
            client: super::collect::client(),
            broker: Mutex::new(None),
            cluster: Some(cluster),
        }
    }

    pub fn view(&self) -> Arc<View> {
        self.view.borrow().clone()
    }

    fn read_only(&self) -> &'static str {
        if self.cluster.is_some() {
            READ_ONLY_CLUSTER
        } else {
            READ_ONLY
        }
    }

    /// The broker of a Queue, with the namespace and name it has there; or the answer saying
    /// why not.
    #[allow(
        clippy::result_large_err,
        reason = "the Err is the answer itself, returned at once"
    )]
    async fn dead_letters_of(
        &self,
        q: &super::model::Queue,
    ) -> Result<(BrokerAdmin, String, String), Response<Body>> {
        let view = self.view();
        match &self.cluster {
            Some(k) => {
                if !self.actions {
                    return Err(error(StatusCode::FORBIDDEN, DEAD_LETTERS_NEED_ACTIONS));
                }
                let Some((ns, name)) = view.targets.queue_refs.get(&q.name) else {
                    return Err(error(StatusCode::NOT_FOUND, format!("no Queue {}", q.name)));
                };
                match k.broker_of_queue(ns, name).await {
                    Ok(b) => Ok((b, ns.clone(), name.clone())),
                    Err(e) => Err(error(StatusCode::SERVICE_UNAVAILABLE, e)),
                }
            }
            None => match self.broker().await {
                Ok(b) => Ok((b, view.system.namespace.clone(), q.name.clone())),
                Err(e) => Err(error(StatusCode::SERVICE_UNAVAILABLE, e)),
            },
        }
    }

    async fn broker(&self) -> Result<BrokerAdmin, String> {
        let mut b = self.broker.lock().await;
        if let Some(b) = &*b
            && b.is_connected()
        {
            return Ok(b.clone());
        }
        let url = self
            .view()
            .targets
            .broker_url
            .clone()
            .ok_or("this run has no broker")?;
        let kind = admin::kind_of_url(&url).ok_or("not a broker URL")?;
        let c = admin::connect(kind, &url, &Credentials::default())
            .await
            .map_err(|e| e.to_string())?;
        *b = Some(c.clone());
        Ok(c)
    }
}

fn full(status: StatusCode, content_type: &str, body: impl Into<Bytes>) -> Response<Body> {
    Response::builder()
        .status(status)
        .header(header::CONTENT_TYPE, content_type)
        .header(header::CACHE_CONTROL, "no-store")
        .header("x-content-type-options", "nosniff")
        .body(Full::new(body.into()).boxed_unsync())
        .expect("response")
}

fn reply(status: StatusCode, v: &Value) -> Response<Body> {
    full(status, "application/json", v.to_string())
}

fn error(status: StatusCode, message: impl std::fmt::Display) -> Response<Body> {
    reply(status, &json!({"error": message.to_string()}))
}

/// Accepts connections until the listener fails.
pub async fn serve(listener: tokio::net::TcpListener, state: Arc<State>) {
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            tokio::time::sleep(Duration::from_millis(100)).await;
            continue;
        };
        let state = state.clone();
        tokio::spawn(async move {
            let svc = hyper::service::service_fn(move |req| {
                let state = state.clone();
                async move { Ok::<_, Infallible>(handle(req, state).await) }
            });
            let _ =
                hyper_util::server::conn::auto::Builder::new(hyper_util::rt::TokioExecutor::new())
                    .serve_connection(hyper_util::rt::TokioIo::new(stream), svc)
                    .await;
        });
    }
}

/// An instance id, a queue name or a dead letter's position: one path segment of a safe set.
fn plain(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 128
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
}

/// Whether a request's `Host` may name this dashboard. A web page can make a name of its own
/// resolve to 127.0.0.1 (DNS rebinding) and then read and act on the dashboard as the same
/// origin; its requests carry that name. So only what reaches the dashboard directly is
/// served: an IP address, `localhost`, a single-label name, a cluster Service name (`*.svc`,
/// `*.svc.cluster.local`). A request without `Host` (HTTP/1.0) is served.
pub fn host_allowed(host: Option<&str>) -> bool {
    let Some(host) = host else { return true };
    let name = if let Some(rest) = host.strip_prefix('[') {
        // [v6]:port
        return rest
            .split_once(']')
            .is_some_and(|(ip, _)| ip.parse::<std::net::Ipv6Addr>().is_ok());
    } else {
        host.rsplit_once(':')
            .filter(|(_, port)| port.bytes().all(|b| b.is_ascii_digit()))
            .map_or(host, |(name, _)| name)
    };
    let name = name.trim_end_matches('.').to_ascii_lowercase();
    name.parse::<std::net::Ipv4Addr>().is_ok()
        || name == "localhost"
        || name.ends_with(".localhost")
        || (!name.is_empty() && !name.contains('.'))
        || name.ends_with(".svc")
        || name.ends_with(".svc.cluster.local")
}

pub async fn handle(req: http::Request<Incoming>, state: Arc<State>) -> Response<Body> {
    let host = req
        .headers()
        .get(header::HOST)
        .map(|h| h.to_str().unwrap_or("").to_string())
        .or_else(|| req.uri().authority().map(|a| a.to_string()));
    if !host_allowed(host.as_deref()) {
        return error(
            StatusCode::FORBIDDEN,
            format!(
                "Host {:?} is not an address of this dashboard: open it at localhost or an IP address (names that are not are refused, against DNS rebinding)",
                host.unwrap_or_default()
            ),
        );
    }
    let path = req.uri().path().to_string();
    let segs: Vec<&str> = path.trim_matches('/').split('/').collect();
    let method = req.method().clone();
    // Read-only: every action is refused, whatever it names.
    if method == Method::POST && segs.first() == Some(&"api") && !state.actions {
        return error(StatusCode::FORBIDDEN, state.read_only());
    }
    match (&method, segs.as_slice()) {
        (&Method::GET, [""] | ["index.html"]) => {
            full(StatusCode::OK, "text/html; charset=utf-8", assets::INDEX)
        }
        (&Method::GET, ["app.js"]) => full(
            StatusCode::OK,
            "text/javascript; charset=utf-8",
            assets::APP_JS,
        ),
        (&Method::GET, ["app.css"]) => {
            full(StatusCode::OK, "text/css; charset=utf-8", assets::APP_CSS)
        }
        (&Method::GET, ["healthz"]) => full(StatusCode::OK, "text/plain", "ok\n"),
        (&Method::GET, ["api", "snapshot"]) => {
            let s = state.snapshot.borrow().clone();
            full(StatusCode::OK, "application/json", s.as_bytes().to_vec())
        }
        (&Method::GET, ["api", "events"]) => events(&state),
        (&Method::GET, ["api", "queues", q, "dead-letters"]) => match queue(&state, q) {
            Err(r) => r,
            Ok(q) => dead_letter_list(&state, &q).await,
        },
        (&Method::GET, ["api", "queues", q, "dead-letters", seq]) => match queue(&state, q) {
            Err(r) => r,
            Ok(_) if !plain(seq) => error(StatusCode::BAD_REQUEST, "bad sequence"),
            Ok(q) => dead_letter_show(&state, &q, seq).await,
        },
        (&Method::POST, ["api", "queues", q, "replay"]) => {
            let q = match queue(&state, q) {
                Err(r) => return r,
                Ok(q) => q,
            };
            match action_body(&state, req).await {
                Err(r) => r,
                Ok(body) => replay(&state, &q, &body).await,
            }
        }
        (&Method::GET, ["api", "sagas", saga, id]) => match saga_of(&state, saga, id) {
            Err(r) => r,
            Ok(saga) => to_coordinator(&state, Method::GET, &saga, id, "", None).await,
        },
        (&Method::POST, ["api", "sagas", saga, id, verb @ ("cancel" | "retry")]) => {
            let saga = match saga_of(&state, saga, id) {
                Err(r) => return r,
                Ok(s) => s,
            };
            let body = match action_body(&state, req).await {
                Err(r) => return r,
                Ok(b) => b,
            };
            let sent = json!({
                "by": "weir-dashboard",
                "reason": body["reason"].as_str().unwrap_or("from the dashboard"),
            });
            to_coordinator(
                &state,
                Method::POST,
                &saga,
                id,
                &format!("/{verb}"),
                Some(Bytes::from(sent.to_string())),
            )
            .await
        }
        (_, ["api", ..]) => error(StatusCode::NOT_FOUND, format!("no route {method} {path}")),
        _ => error(StatusCode::NOT_FOUND, format!("no page {path}")),
    }
}

/// A Queue of the system, else the 404.
#[allow(
    clippy::result_large_err,
    reason = "the Err is the answer itself, returned at once"
)]
fn queue(state: &State, name: &str) -> Result<super::model::Queue, Response<Body>> {
    state
        .view()
        .system
        .queues
        .iter()
        .find(|q| q.name == name)
        .cloned()
        .ok_or_else(|| error(StatusCode::NOT_FOUND, format!("no Queue {name}")))
}

#[allow(
    clippy::result_large_err,
    reason = "the Err is the answer itself, returned at once"
)]
fn saga_of(state: &State, saga: &str, id: &str) -> Result<String, Response<Body>> {
    if !state.view().system.sagas.iter().any(|s| s.name == saga) {
        return Err(error(StatusCode::NOT_FOUND, format!("no Saga {saga}")));
    }
    if !plain(id) || id.contains('.') {
        return Err(error(StatusCode::BAD_REQUEST, "bad instance id"));
    }
    Ok(saga.to_string())
}

/// The JSON body of an action, or the answer refusing it: 403 read-only, 415 not JSON, 400.
#[allow(
    clippy::result_large_err,
    reason = "the Err is the answer itself, returned at once"
)]
async fn action_body(state: &State, req: http::Request<Incoming>) -> Result<Value, Response<Body>> {
    if !state.actions {
        return Err(error(StatusCode::FORBIDDEN, state.read_only()));
    }
    let json_type = req
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("application/json"));
    if !json_type {
        return Err(error(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "actions take a JSON body (content-type: application/json)",
        ));
    }
    let bytes = match Limited::new(req.into_body(), 64 * 1024).collect().await {
        Ok(b) => b.to_bytes(),
        Err(e) => return Err(error(StatusCode::BAD_REQUEST, e)),
    };
    if bytes.is_empty() {
        return Ok(json!({}));
    }
    serde_json::from_slice(&bytes).map_err(|e| error(StatusCode::BAD_REQUEST, e))
}

fn events(state: &State) -> Response<Body> {
    let rx = state.snapshot.clone();
    let stream = futures::stream::unfold((rx, true), |(mut rx, first)| async move {
        if !first && rx.changed().await.is_err() {
            return None;
        }
        let s = rx.borrow_and_update().clone();
        let frame = Frame::data(Bytes::from(format!("data: {s}\n\n")));
        Some((Ok::<_, Infallible>(frame), (rx, false)))
    });
    Response::builder()
        .status(StatusCode::OK)
        .header(header::CONTENT_TYPE, "text/event-stream")
        .header(header::CACHE_CONTROL, "no-store")
        .body(BodyExt::boxed_unsync(StreamBody::new(stream.boxed())))
        .expect("response")
}

async fn dead_letter_list(state: &State, q: &super::model::Queue) -> Response<Body> {
    let (broker, ns, name) = match state.dead_letters_of(q).await {
        Ok(x) => x,
        Err(r) => return r,
    };
    match dead_letters::list(&broker, &ns, &name).await {
        Ok(letters) => {
            // The lines of `weir dlq list --json`, one object each.
            let text = crate::messaging::dlq::format_list(&letters, true);
            let items: Vec<Value> = text
                .lines()
                .filter_map(|l| serde_json::from_str(l).ok())
                .collect();
            reply(
                StatusCode::OK,
                &json!({"queue": q.name, "deadLetters": items}),
            )
        }
        Err(e) => error(StatusCode::SERVICE_UNAVAILABLE, e),
    }
}

async fn dead_letter_show(state: &State, q: &super::model::Queue, seq: &str) -> Response<Body> {
    let (broker, ns, name) = match state.dead_letters_of(q).await {
        Ok(x) => x,
        Err(r) => return r,
    };
    match dead_letters::get(&broker, &ns, &name, seq).await {
        Ok(Some(d)) => reply(
            StatusCode::OK,
            &json!({
                "seq": d.seq,
                "reason": d.reason(),
                "headers": d.headers,
                "body": String::from_utf8_lossy(&d.body),
                "text": crate::messaging::dlq::format_show(&d),
            }),
        ),
        Ok(None) => error(
            StatusCode::NOT_FOUND,
            format!("no dead letter {seq} on Queue {}", q.name),
        ),
        Err(e) => error(StatusCode::SERVICE_UNAVAILABLE, e),
    }
}

async fn replay(state: &State, q: &super::model::Queue, body: &Value) -> Response<Body> {
    let (broker, ns, name) = match state.dead_letters_of(q).await {
        Ok(x) => x,
        Err(r) => return r,
    };
    let ns = ns.as_str();
    let q = &super::model::Queue { name, ..q.clone() };
    let chosen = if body["all"] == json!(true) {
        match dead_letters::list(&broker, ns, &q.name).await {
            Ok(l) => l,
            Err(e) => return error(StatusCode::SERVICE_UNAVAILABLE, e),
        }
    } else {
        let seqs: Vec<String> = match &body["seq"] {
            Value::Array(a) => a
                .iter()
                .filter_map(|v| match v {
                    Value::String(s) => Some(s.clone()),
                    Value::Number(n) => Some(n.to_string()),
                    _ => None,
                })
                .collect(),
            Value::String(s) => vec![s.clone()],
            Value::Number(n) => vec![n.to_string()],
            _ => Vec::new(),
        };
        if seqs.is_empty() {
            return error(
                StatusCode::BAD_REQUEST,
                "say which dead letters: {\"seq\": [...]} or {\"all\": true}",
            );
        }
        let mut v = Vec::new();
        for s in seqs {
            if !plain(&s) {
                return error(StatusCode::BAD_REQUEST, "bad sequence");
            }
            match dead_letters::get(&broker, ns, &q.name, &s).await {
                Ok(Some(d)) => v.push(d),
                Ok(None) => {
                    return error(
                        StatusCode::NOT_FOUND,
                        format!("no dead letter {s} on Queue {}", q.name),
                    );
                }
                Err(e) => return error(StatusCode::SERVICE_UNAVAILABLE, e),
            }
        }
        v
    };
    let mut replayed = Vec::new();
    let mut failed = Vec::new();
    for (d, r) in dead_letters::replay(&broker, ns, &q.name, &chosen).await {
        match r {
            Ok(new_seq) => {
                replayed.push(json!({"seq": d.seq, "eventId": d.event_id(), "newSeq": new_seq}))
            }
            Err(e) => failed.push(json!({"seq": d.seq, "error": e.to_string()})),
        }
    }
    let status = if failed.is_empty() {
        StatusCode::OK
    } else {
        StatusCode::BAD_GATEWAY
    };
    reply(status, &json!({"replayed": replayed, "failed": failed}))
}

/// Passes a request to the Saga's coordinators, the first that answers; their status and body
/// come back as they are.
async fn to_coordinator(
    state: &State,
    method: Method,
    saga: &str,
    id: &str,
    suffix: &str,
    body: Option<Bytes>,
) -> Response<Body> {
    let mut last = "no coordinator".to_string();
    let view = state.view();
    for c in view.targets.coordinators.iter().filter(|c| c.saga == saga) {
        match c
            .call(
                &state.client,
                state.cluster.as_deref(),
                method.clone(),
                &format!("/{id}{suffix}"),
                body.clone(),
                Duration::from_secs(10),
            )
            .await
        {
            Ok((st, body)) => {
                let status = StatusCode::from_u16(st).unwrap_or(StatusCode::BAD_GATEWAY);
                // A coordinator without the endpoint answers 404 with its own words.
                return full(status, "application/json", body);
            }
            Err(e) => last = e,
        }
    }
    error(StatusCode::BAD_GATEWAY, last)
}
