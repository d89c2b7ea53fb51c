//! `POST /v1/publish/<queue>`: validate, wrap as a CloudEvent, publish, wait for the ack.
//!
//! | status | when |
//! |---|---|
//! | 202 | acknowledged by the broker: `{"id", "duplicate", "stream_seq"}` |
//! | 400 | body not JSON, or an invalid `ce-id` / `Idempotency-Key` / `ce-partitionkey` / `Weir-Partition-Key` |
//! | 403 | the caller is not on loopback (only the app in the pod may publish) |
//! | 404 | unknown queue (not in `messaging.publishes`), or messaging not configured |
//! | 405 | not a POST |
//! | 413 | body larger than `inbound.maxBodyBytes` |
//! | 415 | the queue has a JSON Schema and `content-type` is not a JSON media type (`x-weir-reason: unsupported-media-type`) |
//! | 422 | the event fails the queue's schema: `{"errors": [{"path", "message"}]}` |
//! | 503 | broker unavailable, no ack within 5 s, or shutting down: `{"error", "reason"}` and `Retry-After` |
//!
//! Nothing is spooled locally: a 503 means the event was not stored, and the app publishes it
//! again (same `ce-id`, so a retry of an event that did reach the broker is not stored twice on
//! brokers that deduplicate) after `Retry-After` seconds.
//!
//! A partition key (request header `ce-partitionkey`, the CloudEvents partitioning extension, or
//! `Weir-Partition-Key`) travels as the event's `ce-partitionkey` on every broker; Kafka makes it
//! the record's key, so the events of one key keep their order.

use super::Running;
use super::cloudevents::*;
use super::schema::SchemaError;
use crate::body::{self, BoxBody, Resp};
use crate::trace::TraceContext;
use bytes::Bytes;
use http::{HeaderValue, Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Limited};
use serde_json::json;
use std::net::SocketAddr;
use std::sync::Arc;
use weir_broker::transport::{Headers, MAX_RECONNECT_DELAY};

pub const PATH_PREFIX: &str = "/v1/publish/";
/// `x-weir-reason` of a 415.
pub const REASON_UNSUPPORTED_MEDIA_TYPE: &str = "unsupported-media-type";

/// Whether `content_type` names JSON: `application/json` or `application/<anything>+json`
/// (RFC 6839), in any case, with any parameters (`; charset=utf-8`).
pub fn is_json_media_type(content_type: &str) -> bool {
    let essence = content_type
        .split(';')
        .next()
        .unwrap_or_default()
        .trim()
        .to_ascii_lowercase();
    match essence.strip_prefix("application/") {
        Some("json") => true,
        Some(sub) => sub.len() > "+json".len() && sub.ends_with("+json") && !sub.contains('/'),
        None => false,
    }
}

fn json_resp(status: StatusCode, value: serde_json::Value) -> Resp {
    let mut r = Response::new(body::full(value.to_string()));
    *r.status_mut() = status;
    r.headers_mut().insert(
        http::header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    r
}

/// `Retry-After` of every 503: the longest pause between two reconnect attempts, so a publisher
/// that waits this long tries again after the sidecar has tried the broker at least once more.
pub const RETRY_AFTER_SECONDS: u64 = MAX_RECONNECT_DELAY.as_secs();

fn error(status: StatusCode, error: &str, reason: impl Into<String>) -> Resp {
    let mut r = json_resp(status, json!({"error": error, "reason": reason.into()}));
    if status == StatusCode::SERVICE_UNAVAILABLE {
        r.headers_mut().insert(
            http::header::RETRY_AFTER,
            HeaderValue::from(RETRY_AFTER_SECONDS),
        );
    }
    r
}

pub(crate) async fn handle(
    running: Option<Arc<Running>>,
    stopping: bool,
    peer: Option<SocketAddr>,
    req: Request<BoxBody>,
) -> Resp {
    if !peer.is_some_and(|p| p.ip().is_loopback() || p.ip().to_canonical().is_loopback()) {
        return error(
            StatusCode::FORBIDDEN,
            "forbidden",
            "publishing is accepted from the pod's loopback only",
        );
    }
    if req.method() != Method::POST {
        let mut r = error(
            StatusCode::METHOD_NOT_ALLOWED,
            "method not allowed",
            "use POST",
        );
        r.headers_mut()
            .insert(http::header::ALLOW, HeaderValue::from_static("POST"));
        return r;
    }
    if stopping {
        return error(
            StatusCode::SERVICE_UNAVAILABLE,
            "shutting down",
            "the sidecar is shutting down; publish again (same ce-id) shortly",
        );
    }
    let Some(running) = running else {
        return error(
            StatusCode::NOT_FOUND,
            "not found",
            "messaging is not configured for this service",
        );
    };
    let queue = req
        .uri()
        .path()
        .strip_prefix(PATH_PREFIX)
        .unwrap_or_default()
        .to_string();
    let Some(target) = running.publishes.get(&queue) else {
        let mut known: Vec<_> = running.publishes.keys().cloned().collect();
        known.sort();
        return error(
            StatusCode::NOT_FOUND,
            "unknown queue",
            format!(
                "this service does not publish to {queue:?}; it publishes to {}",
                if known.is_empty() {
                    "no queue".to_string()
                } else {
                    known.join(", ")
                }
            ),
        );
    };
    if !target.schema.accepts_any() {
        // The schema says what JSON the event is: a body sent as something else (no
        // content-type, text/plain) may parse as JSON by accident, and would then be stored as
        // application/json with a meaning its sender did not give it.
        let given = req
            .headers()
            .get(http::header::CONTENT_TYPE)
            .map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned());
        if !given.as_deref().is_some_and(is_json_media_type) {
            let mut r = error(
                StatusCode::UNSUPPORTED_MEDIA_TYPE,
                "unsupported media type",
                format!(
                    "queue {queue:?} has a JSON Schema: send the event with content-type \
                     application/json (or application/*+json), not {}",
                    given.map_or("none".to_string(), |g| format!(
                        "{:?}",
                        header_safe(&g, 100)
                    ))
                ),
            );
            r.headers_mut().insert(
                "x-weir-reason",
                HeaderValue::from_static(REASON_UNSUPPORTED_MEDIA_TYPE),
            );
            return r;
        }
    }
    let limit = running.settings.max_body_bytes;
    let (parts, body) = req.into_parts();
    let declared = parts
        .headers
        .get(http::header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    let too_large = || {
        error(
            StatusCode::PAYLOAD_TOO_LARGE,
            "payload too large",
            format!("the event is larger than {limit} bytes"),
        )
    };
    if declared.is_some_and(|n| n > limit) {
        return too_large();
    }
    let bytes: Bytes = match Limited::new(body, limit as usize).collect().await {
        Ok(c) => c.to_bytes(),
        Err(e) if e.is::<http_body_util::LengthLimitError>() => return too_large(),
        Err(e) => {
            return error(
                StatusCode::BAD_REQUEST,
                "bad request",
                format!("cannot read the body: {e}"),
            );
        }
    };
    let value: serde_json::Value = match serde_json::from_slice(&bytes) {
        Ok(v) => v,
        Err(e) => {
            return error(
                StatusCode::BAD_REQUEST,
                "bad request",
                format!("the body is not valid JSON: {e}"),
            );
        }
    };
    if let Err(errors) = target.schema.validate(&value) {
        target.metrics.rejected_by_schema.inc();
        return schema_rejection(&queue, errors);
    }
    let id = match event_id(&parts.headers) {
        Ok(id) => id,
        Err(why) => return error(StatusCode::BAD_REQUEST, "bad request", why.to_string()),
    };
    if !running.conn.connected() {
        return error(
            StatusCode::SERVICE_UNAVAILABLE,
            "broker unavailable",
            format!(
                "not connected to {}",
                weir_crds::redact::url(&running.settings.messaging.broker_url)
            ),
        );
    }
    let partition_key = match partition_key(&parts.headers) {
        Ok(k) => k,
        Err(why) => return error(StatusCode::BAD_REQUEST, "bad request", why.to_string()),
    };
    let (trace, _) = TraceContext::from_headers(&parts.headers, 1.0);
    let traceparent = trace.traceparent();
    let mut headers = cloud_event_headers(
        &id,
        &running.source,
        &target.cfg.event_type,
        traceparent.to_str().unwrap_or_default(),
    );
    if let Some(key) = partition_key {
        headers.push((CE_PARTITIONKEY.into(), key));
    }
    match running.conn.publish(&target.cfg, &id, headers, bytes).await {
        Ok(ack) => {
            target.metrics.published.inc();
            let mut r = json_resp(
                StatusCode::ACCEPTED,
                json!({"id": id, "duplicate": ack.duplicate, "stream_seq": ack.position}),
            );
            if let Ok(v) = HeaderValue::from_str(&id) {
                r.headers_mut().insert(CE_ID, v);
            }
            r
        }
        Err(e) => {
            tracing::warn!(queue = %queue, id = %id, reason = %e, cause = e.label(), "publish failed");
            error(
                StatusCode::SERVICE_UNAVAILABLE,
                "broker unavailable",
                e.to_string(),
            )
        }
    }
}

fn schema_rejection(queue: &str, errors: Vec<SchemaError>) -> Resp {
    json_resp(
        StatusCode::UNPROCESSABLE_ENTITY,
        json!({
            "error": format!("the event does not match the schema of queue {queue:?}"),
            "errors": errors,
        }),
    )
}

/// An event id given in header `0` (`ce-id` or `Idempotency-Key`) that cannot be one: the
/// publish answers 400 (`bad request`) with this text as the reason.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}: must be 1 to {MAX_EVENT_ID_LEN} visible ASCII characters")]
pub struct InvalidEventId(&'static str);

/// `ce-id`, else `Idempotency-Key`, else a new UUID v4.
fn event_id(h: &http::HeaderMap) -> Result<String, InvalidEventId> {
    for name in [CE_ID, IDEMPOTENCY_KEY] {
        if let Some(v) = h.get(name) {
            let s = v.to_str().unwrap_or_default();
            if !valid_event_id(s) {
                return Err(InvalidEventId(name));
            }
            return Ok(s.to_string());
        }
    }
    Ok(uuid::Uuid::new_v4().to_string())
}

/// The event's partition key: `ce-partitionkey`, else `Weir-Partition-Key`, else none. The same
/// rule as an event id (1 to 256 visible ASCII characters), for it travels as a header too.
fn partition_key(h: &http::HeaderMap) -> Result<Option<String>, InvalidEventId> {
    for name in [CE_PARTITIONKEY, WEIR_PARTITION_KEY] {
        if let Some(v) = h.get(name) {
            let s = v.to_str().unwrap_or_default();
            if !valid_event_id(s) {
                return Err(InvalidEventId(name));
            }
            return Ok(Some(s.to_string()));
        }
    }
    Ok(None)
}

/// The CloudEvents binary-mode headers of a new event (every broker).
pub fn cloud_event_headers(id: &str, source: &str, event_type: &str, traceparent: &str) -> Headers {
    vec![
        (CE_SPECVERSION.into(), "1.0".into()),
        (CE_ID.into(), id.into()),
        (CE_SOURCE.into(), source.into()),
        (CE_TYPE.into(), event_type.into()),
        (CE_TIME.into(), now_rfc3339()),
        (TRACEPARENT.into(), traceparent.into()),
        (CONTENT_TYPE.into(), "application/json".into()),
    ]
}

/// The CloudEvents binary-mode headers of a new event, with `Nats-Msg-Id` = event id.
pub fn event_headers(
    id: &str,
    source: &str,
    event_type: &str,
    traceparent: &str,
) -> async_nats::HeaderMap {
    let mut h = async_nats::HeaderMap::new();
    for (k, v) in cloud_event_headers(id, source, event_type, traceparent) {
        h.insert(k.as_str(), v.as_str());
    }
    h.insert(NATS_MSG_ID, id);
    h
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn event_id_sources() {
        let mut h = http::HeaderMap::new();
        let id = event_id(&h).unwrap();
        assert_eq!(uuid::Uuid::parse_str(&id).unwrap().get_version_num(), 4);
        h.insert("idempotency-key", HeaderValue::from_static("k-1"));
        assert_eq!(event_id(&h).unwrap(), "k-1");
        h.insert("ce-id", HeaderValue::from_static("e-1"));
        assert_eq!(event_id(&h).unwrap(), "e-1");
        h.insert("ce-id", HeaderValue::from_static("has space"));
        assert!(event_id(&h).is_err());
    }

    #[test]
    fn partition_key_sources() {
        let mut h = http::HeaderMap::new();
        assert_eq!(partition_key(&h).unwrap(), None);
        h.insert("weir-partition-key", HeaderValue::from_static("order-7"));
        assert_eq!(partition_key(&h).unwrap().as_deref(), Some("order-7"));
        h.insert("ce-partitionkey", HeaderValue::from_static("order-8"));
        assert_eq!(partition_key(&h).unwrap().as_deref(), Some("order-8"));
        h.insert("ce-partitionkey", HeaderValue::from_static(""));
        let e = partition_key(&h).unwrap_err().to_string();
        assert!(e.starts_with("ce-partitionkey: must be"), "{e}");
    }

    #[test]
    fn json_media_types() {
        for ok in [
            "application/json",
            "Application/JSON",
            "application/json; charset=utf-8",
            "application/json;charset=UTF-8",
            "application/vnd.shop.order+json",
            "application/merge-patch+json ; q=1",
        ] {
            assert!(is_json_media_type(ok), "{ok}");
        }
        for refused in [
            "",
            "text/plain",
            "text/json",
            "application/x-www-form-urlencoded",
            "application/+json",
            "application/jsonx",
            "application/json-seq",
            "json",
            "*/*",
        ] {
            assert!(!is_json_media_type(refused), "{refused}");
        }
    }

    #[test]
    fn headers_follow_the_doc() {
        let h = event_headers("e-1", "weir://shop/orders", "order.created", "00-x");
        for (k, v) in [
            ("ce-specversion", "1.0"),
            ("ce-id", "e-1"),
            ("ce-source", "weir://shop/orders"),
            ("ce-type", "order.created"),
            ("content-type", "application/json"),
            ("Nats-Msg-Id", "e-1"),
            ("traceparent", "00-x"),
        ] {
            assert_eq!(h.get(k).map(|v| v.as_str()), Some(v), "{k}");
        }
        assert!(h.get("ce-time").is_some());
    }
}
