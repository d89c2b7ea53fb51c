//! A scripted Kubernetes API for controller tests: kube's `tower-test` mock answering the
//! requests a reconcile must make, in order, and failing on anything else.

use super::Context;
use super::metrics::Metrics;
use crate::render::RenderOptions;
use http::{Method, Request, Response, StatusCode};
use kube::Client;
use kube::client::Body;
use serde_json::{Value, json};
use std::sync::Arc;
use std::time::Duration;
use weir_crds::Microservice;

pub(super) type Handle = tower_test::mock::Handle<Request<Body>, Response<Body>>;

/// Builds the answer (status, body) to a request from the request's body.
pub(super) type Responder = Box<dyn Fn(&Value) -> (StatusCode, Value) + Send>;

/// One expected request: method, path (query ignored; a trailing `/*` matches any name), and
/// the answer (status, body) built from the request body.
pub(super) struct Expect {
    method: Method,
    path: String,
    respond: Responder,
}

pub(super) fn expect(
    method: Method,
    path: &str,
    respond: impl Fn(&Value) -> (StatusCode, Value) + Send + 'static,
) -> Expect {
    Expect {
        method,
        path: path.into(),
        respond: Box::new(respond),
    }
}

/// Answers the scripted requests, records their bodies, then checks nothing else is asked.
pub(super) async fn serve(mut handle: Handle, script: Vec<Expect>) -> Vec<(String, Value)> {
    let mut seen = Vec::new();
    for e in script {
        let (req, send) = tokio::time::timeout(Duration::from_secs(10), handle.next_request())
            .await
            .unwrap_or_else(|_| panic!("timed out waiting for {} {}", e.method, e.path))
            .expect("client dropped before the expected request");
        let path = req.uri().path().to_string();
        let query = req.uri().query().unwrap_or_default().to_string();
        // A path ending in `/*` stands for any name under it (an Event series' generated name).
        let matched = match e.path.strip_suffix('*') {
            Some(prefix) if prefix.ends_with('/') => path.starts_with(prefix),
            _ => path == e.path,
        };
        assert!(
            req.method() == e.method && matched,
            "unexpected request {} {path} (query {query}), expected {} {}",
            req.method(),
            e.method,
            e.path
        );
        // Every server-side apply (not merge patches: finalizers, Event series) carries the
        // fixed field manager and forces ownership.
        let is_apply = req
            .headers()
            .get(http::header::CONTENT_TYPE)
            .is_some_and(|c| c.as_bytes() == b"application/apply-patch+yaml");
        if is_apply {
            assert!(
                query.contains("fieldManager=weir-operator"),
                "server-side apply with the fixed field manager: {query}"
            );
            assert!(
                query.contains("force=true"),
                "apply forces ownership to repair drift: {query}"
            );
        }
        let bytes = http_body_util::BodyExt::collect(req.into_body())
            .await
            .unwrap()
            .to_bytes();
        let body: Value = if bytes.is_empty() {
            Value::Null
        } else {
            serde_json::from_slice(&bytes).unwrap()
        };
        let (status, answer) = (e.respond)(&body);
        send.send_response(
            Response::builder()
                .status(status)
                .body(Body::from(serde_json::to_vec(&answer).unwrap()))
                .unwrap(),
        );
        seen.push((path, body));
    }
    if let Ok(Some((req, _))) =
        tokio::time::timeout(Duration::from_millis(200), handle.next_request()).await
    {
        panic!("unexpected extra request: {} {}", req.method(), req.uri());
    }
    seen
}

pub(super) fn context() -> (Arc<Context>, Handle) {
    let (svc, handle) = tower_test::mock::pair::<Request<Body>, Response<Body>>();
    let client = Client::new(svc, "default");
    let render = RenderOptions {
        proxy_image: "weir-proxy:test".into(),
        ..Default::default()
    };
    (
        Arc::new(Context::new(client, render, Arc::new(Metrics::default()))),
        handle,
    )
}

/// Microservice `demo/orders` (generation 2) with `spec` and `status`.
pub(super) fn microservice(spec: Value, status: Option<Value>) -> Microservice {
    let mut v = json!({
        "apiVersion": "weir.dev/v1alpha1",
        "kind": "Microservice",
        "metadata": {"name": "orders", "namespace": "demo", "uid": "uid-orders", "generation": 2},
        "spec": spec,
    });
    if let Some(s) = status {
        v["status"] = s;
    }
    serde_json::from_value(v).unwrap()
}

/// The API server answers an apply with the object applied.
pub(super) fn echo(body: &Value) -> (StatusCode, Value) {
    (StatusCode::OK, body.clone())
}

/// The API server's 404.
pub(super) fn not_found(_: &Value) -> (StatusCode, Value) {
    (
        StatusCode::NOT_FOUND,
        json!({"kind": "Status", "apiVersion": "v1", "status": "Failure", "reason": "NotFound", "code": 404, "message": "not found"}),
    )
}
