//! The admin listener: `/metrics`, `/healthz`, `/readyz`, `/config`.

use crate::body::{self, BoxBody, Resp};
use crate::server::Shared;
use http::{HeaderValue, Request, Response, StatusCode};

fn text(status: StatusCode, content_type: &'static str, body: impl Into<bytes::Bytes>) -> Resp {
    let mut r = Response::new(body::full(body));
    *r.status_mut() = status;
    r.headers_mut().insert(
        http::header::CONTENT_TYPE,
        HeaderValue::from_static(content_type),
    );
    r
}

pub fn handle(shared: &Shared, req: &Request<BoxBody>) -> Resp {
    match req.uri().path() {
        "/metrics" => text(
            StatusCode::OK,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
            shared.metrics.encode(),
        ),
        "/healthz" => text(StatusCode::OK, "text/plain", "ok\n"),
        "/readyz" => match shared.readiness() {
            Ok(()) => text(StatusCode::OK, "text/plain", "ready\n"),
            Err(why) => text(
                StatusCode::SERVICE_UNAVAILABLE,
                "text/plain",
                format!("not ready: {why}\n"),
            ),
        },
        "/config" => match serde_json::to_vec_pretty(&*shared.snapshot().config) {
            Ok(json) => text(StatusCode::OK, "application/json", json),
            Err(e) => text(
                StatusCode::INTERNAL_SERVER_ERROR,
                "text/plain",
                e.to_string(),
            ),
        },
        _ => text(
            StatusCode::NOT_FOUND,
            "text/plain",
            "not found: try /metrics, /healthz, /readyz, /config\n",
        ),
    }
}
