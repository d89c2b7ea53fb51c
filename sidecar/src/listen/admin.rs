//! The admin listener: `/metrics`, `/healthz`, `/readyz`, `/brokerz`, `/config`, and the app's
//! own probes relayed as `/app-health/liveness` and `/app-health/readiness` (so the kubelet can
//! probe an app that listens on loopback only).
//!
//! `/readyz` is about the HTTP path only (config loaded, listeners bound, not draining); its body
//! adds a line on the broker. `/brokerz` is the broker connection alone: 200 while connected (or
//! when messaging is off), 503 naming the broker otherwise.

use crate::body::{self, BoxBody, Reason, Resp, reject};
use crate::listen::Shared;
use http::{HeaderValue, Request, Response, StatusCode};
use http_body_util::BodyExt;
use std::time::Duration;

/// How long a relayed app probe may take.
pub const APP_PROBE_TIMEOUT: Duration = Duration::from_secs(5);

fn text(status: StatusCode, content_type: &'static str, body: impl Into<bytes::Bytes>) -> Resp {
    let mut r = Response::new(body::full(body));
    *r.status_mut() = status;
    r.headers_mut().insert(
        http::header::CONTENT_TYPE,
        HeaderValue::from_static(content_type),
    );
    r
}

/// Calls the app's probe path on loopback and answers with its status (body dropped), or asks
/// its gRPC health service ([`super::grpc_health`]).
async fn app_probe(shared: &Shared, which: &str) -> Resp {
    let cfg = shared.snapshot().config.clone();
    let (path, grpc_service) = match which {
        "liveness" => (
            cfg.inbound.liveness_path.as_deref(),
            cfg.inbound.liveness_grpc_service.as_deref(),
        ),
        _ => (
            cfg.inbound.readiness_path.as_deref(),
            cfg.inbound.readiness_grpc_service.as_deref(),
        ),
    };
    if let Some(service) = grpc_service {
        // gRPC is HTTP/2 whatever the app's declared protocol.
        let client = shared.clients().get(weir_crds::proxy::WireProtocol::Http2);
        let app = cfg.inbound.app;
        return super::grpc_health::probe(client, app, service, which, APP_PROBE_TIMEOUT).await;
    }
    let Some(path) = path else {
        return text(
            StatusCode::NOT_FOUND,
            "text/plain",
            format!("no {which} path configured\n"),
        );
    };
    let uri = format!("http://{}{}", cfg.inbound.app, path);
    let Ok(req) = Request::get(uri).body(body::empty()) else {
        return text(
            StatusCode::INTERNAL_SERVER_ERROR,
            "text/plain",
            "invalid probe path\n",
        );
    };
    // In the version the app speaks: an h2c-only app (most gRPC servers) refuses HTTP/1.1.
    let client = shared.clients().get(cfg.inbound.app_protocol);
    match tokio::time::timeout(APP_PROBE_TIMEOUT, client.request(req)).await {
        Ok(Ok(resp)) => {
            let status = resp.status();
            // Read the (small) body so the pooled connection can be reused.
            let _ = tokio::time::timeout(APP_PROBE_TIMEOUT, resp.into_body().collect()).await;
            text(
                status,
                "text/plain",
                format!("app {which}: {}\n", status.as_u16()),
            )
        }
        Ok(Err(e)) => {
            tracing::warn!(probe = which, error = %e, "app probe failed");
            reject(Reason::AppConnect)
        }
        Err(_) => reject(Reason::Timeout),
    }
}

pub async fn handle(shared: &Shared, req: Request<BoxBody>) -> Resp {
    if req
        .uri()
        .path()
        .starts_with(crate::bridge::publish::PATH_PREFIX)
    {
        let peer = req
            .extensions()
            .get::<crate::service::PeerAddr>()
            .map(|p| p.0);
        return shared.bridge.publish(peer, req).await;
    }
    match req.uri().path() {
        "/app-health/liveness" => app_probe(shared, "liveness").await,
        "/app-health/readiness" => app_probe(shared, "readiness").await,
        "/metrics" => text(
            StatusCode::OK,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
            shared.metrics.encode(),
        ),
        "/healthz" => text(StatusCode::OK, "text/plain", "ok\n"),
        "/readyz" => {
            let broker = match shared.bridge.broker_status() {
                Ok(None) => String::new(),
                Ok(Some(url)) => format!("broker: connected to {url}\n"),
                Err(why) => format!(
                    "broker: {why}; publishing answers 503 with Retry-After and consuming is \
                     paused until it is back (GET /brokerz)\n"
                ),
            };
            match shared.readiness() {
                Ok(()) => text(StatusCode::OK, "text/plain", format!("ready\n{broker}")),
                Err(why) => text(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "text/plain",
                    format!("not ready: {why}\n{broker}"),
                ),
            }
        }
        "/brokerz" => match shared.bridge.broker_status() {
            Ok(None) => text(StatusCode::OK, "text/plain", "messaging not configured\n"),
            Ok(Some(url)) => text(
                StatusCode::OK,
                "text/plain",
                format!("connected to {url}\n"),
            ),
            Err(why) => text(
                StatusCode::SERVICE_UNAVAILABLE,
                "text/plain",
                format!("{why}\n"),
            ),
        },
        "/endpoints" => {
            match serde_json::to_vec_pretty(&shared.snapshot().components.endpoints_view()) {
                Ok(json) => text(StatusCode::OK, "application/json", json),
                Err(e) => text(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    "text/plain",
                    e.to_string(),
                ),
            }
        }
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
            "not found: try /metrics, /healthz, /readyz, /brokerz, /config, /endpoints\n",
        ),
    }
}
