//! OTLP/HTTP span export (protobuf, `POST {endpoint}/v1/traces`), in batches, written by hand
//! against the opentelemetry-proto messages to keep the sidecar small.
//!
//! Spans are queued without blocking (a full queue drops and counts the span) and sent when 512
//! are waiting or every `flush_interval`.

use crate::body::{self, BoxBody};
use crate::trace::TraceContext;
use bytes::Bytes;
use http::{Method, Request};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use prometheus_client::metrics::counter::Counter;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};
use tokio::sync::{mpsc, oneshot};

pub const SPAN_KIND_SERVER: u64 = 2;
pub const SPAN_KIND_CLIENT: u64 = 3;
const BATCH: usize = 512;
const QUEUE: usize = 4096;

/// One finished span.
#[derive(Clone, Debug)]
pub struct SpanRecord {
    pub ctx: TraceContext,
    pub kind: u64,
    pub method: Method,
    pub path: String,
    pub dependency: Option<Arc<str>>,
    pub start_unix_nanos: u64,
    pub end_unix_nanos: u64,
    pub status: u16,
    pub reason: Option<&'static str>,
    /// For a gRPC call: its service, method and status.
    pub grpc: Option<GrpcSpan>,
}

/// What a gRPC call's span adds: `rpc.system`, `rpc.service`, `rpc.method`,
/// `rpc.grpc.status_code`, and the span's name `package.Service/Method`.
#[derive(Clone, Debug)]
pub struct GrpcSpan {
    /// `None` when the path is not `/package.Service/Method`.
    pub service_method: Option<(String, String)>,
    pub code: u16,
}

impl GrpcSpan {
    pub fn new(path: &str, code: u16) -> Self {
        GrpcSpan {
            service_method: crate::layers::grpc::service_and_method(path)
                .map(|(s, m)| (s.to_string(), m.to_string())),
            code,
        }
    }

    /// Whether the status makes the span an error, per OpenTelemetry's gRPC conventions: any
    /// status but OK for a client span; for a server span only those that say the server
    /// failed (UNKNOWN, DEADLINE_EXCEEDED, UNIMPLEMENTED, INTERNAL, UNAVAILABLE, DATA_LOSS).
    fn is_error(&self, kind: u64) -> bool {
        if kind == SPAN_KIND_CLIENT {
            self.code != 0
        } else {
            matches!(self.code, 2 | 4 | 12 | 13 | 14 | 15)
        }
    }
}

pub fn unix_nanos(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64)
}

/// Where finished spans go; cheap to clone.
#[derive(Clone, Debug)]
pub struct SpanSink {
    tx: mpsc::Sender<SpanRecord>,
    dropped: Counter,
    flush_tx: mpsc::Sender<oneshot::Sender<()>>,
}

impl SpanSink {
    #[cfg(test)]
    pub(crate) fn for_tests(tx: mpsc::Sender<SpanRecord>) -> Self {
        SpanSink {
            tx,
            dropped: Counter::default(),
            flush_tx: mpsc::channel(1).0,
        }
    }

    /// Exports every span queued so far, waiting at most `timeout` (used at shutdown).
    pub async fn flush(&self, timeout: Duration) -> bool {
        let (ack, done) = oneshot::channel();
        if self.flush_tx.send(ack).await.is_err() {
            return false;
        }
        matches!(tokio::time::timeout(timeout, done).await, Ok(Ok(())))
    }

    pub fn record(&self, span: SpanRecord) {
        if self.tx.try_send(span).is_err() {
            self.dropped.inc();
        }
    }
}

/// Starts the export task; it ends (after a last flush) when every sink clone is dropped.
pub fn start_exporter(
    endpoint: &str,
    service: &str,
    namespace: &str,
    client: Client<HttpConnector, BoxBody>,
    flush_interval: Duration,
    exported: Counter,
    dropped: Counter,
) -> SpanSink {
    let (tx, mut rx) = mpsc::channel::<SpanRecord>(QUEUE);
    let (flush_tx, mut flush_rx) = mpsc::channel::<oneshot::Sender<()>>(4);
    let url = traces_url(endpoint);
    let resource = encode_resource(service, namespace);
    let d2 = dropped.clone();
    tokio::spawn(async move {
        let mut batch = Vec::with_capacity(BATCH);
        loop {
            let deadline = tokio::time::Instant::now() + flush_interval;
            let mut ack = None;
            let closed = loop {
                tokio::select! {
                    s = rx.recv() => match s {
                        Some(s) => {
                            batch.push(s);
                            if batch.len() >= BATCH {
                                break false;
                            }
                        }
                        None => break true,
                    },
                    Some(a) = flush_rx.recv() => {
                        ack = Some(a);
                        break false;
                    }
                    _ = tokio::time::sleep_until(deadline) => break false,
                }
            };
            // On a flush request, take everything queued so far.
            let mut more = ack.is_some();
            while more || !batch.is_empty() {
                while more && batch.len() < BATCH {
                    match rx.try_recv() {
                        Ok(s) => batch.push(s),
                        Err(_) => more = false,
                    }
                }
                if batch.is_empty() {
                    break;
                }
                let n = batch.len() as u64;
                let payload = encode_request(&resource, &batch);
                batch.clear();
                match send(&client, &url, payload).await {
                    Ok(()) => {
                        exported.inc_by(n);
                    }
                    Err(e) => {
                        d2.inc_by(n);
                        tracing::warn!(endpoint = %url, error = %e, spans = n, "OTLP export failed");
                    }
                }
            }
            if let Some(a) = ack {
                let _ = a.send(());
            }
            if closed {
                break;
            }
        }
    });
    SpanSink {
        tx,
        dropped,
        flush_tx,
    }
}

fn traces_url(endpoint: &str) -> String {
    let e = endpoint.trim_end_matches('/');
    if e.ends_with("/v1/traces") {
        e.to_string()
    } else {
        format!("{e}/v1/traces")
    }
}

async fn send(
    client: &Client<HttpConnector, BoxBody>,
    url: &str,
    payload: Vec<u8>,
) -> Result<(), String> {
    let req = Request::post(url)
        .header(http::header::CONTENT_TYPE, "application/x-protobuf")
        .body(body::full(Bytes::from(payload)))
        .map_err(|e| e.to_string())?;
    let resp = tokio::time::timeout(Duration::from_secs(10), client.request(req))
        .await
        .map_err(|_| "timed out".to_string())?
        .map_err(|e| e.to_string())?;
    if resp.status().is_success() {
        Ok(())
    } else {
        Err(format!("collector answered {}", resp.status()))
    }
}

// --- protobuf wire format -------------------------------------------------------------------

fn put_varint(out: &mut Vec<u8>, mut v: u64) {
    while v >= 0x80 {
        out.push((v as u8) | 0x80);
        v >>= 7;
    }
    out.push(v as u8);
}

fn put_tag(out: &mut Vec<u8>, field: u32, wire: u8) {
    put_varint(out, (u64::from(field) << 3) | u64::from(wire));
}

fn put_bytes(out: &mut Vec<u8>, field: u32, b: &[u8]) {
    put_tag(out, field, 2);
    put_varint(out, b.len() as u64);
    out.extend_from_slice(b);
}

fn put_fixed64(out: &mut Vec<u8>, field: u32, v: u64) {
    put_tag(out, field, 1);
    out.extend_from_slice(&v.to_le_bytes());
}

fn put_uint(out: &mut Vec<u8>, field: u32, v: u64) {
    put_tag(out, field, 0);
    put_varint(out, v);
}

/// `KeyValue { key = 1; AnyValue value = 2 }` with `AnyValue { string_value = 1; int_value = 3 }`.
fn put_attr_str(out: &mut Vec<u8>, field: u32, key: &str, value: &str) {
    let mut any = Vec::with_capacity(value.len() + 2);
    put_bytes(&mut any, 1, value.as_bytes());
    let mut kv = Vec::with_capacity(key.len() + any.len() + 4);
    put_bytes(&mut kv, 1, key.as_bytes());
    put_bytes(&mut kv, 2, &any);
    put_bytes(out, field, &kv);
}

fn put_attr_int(out: &mut Vec<u8>, field: u32, key: &str, value: i64) {
    let mut any = Vec::with_capacity(11);
    put_uint(&mut any, 3, value as u64);
    let mut kv = Vec::with_capacity(key.len() + any.len() + 4);
    put_bytes(&mut kv, 1, key.as_bytes());
    put_bytes(&mut kv, 2, &any);
    put_bytes(out, field, &kv);
}

/// `Resource { repeated KeyValue attributes = 1 }`.
fn encode_resource(service: &str, namespace: &str) -> Vec<u8> {
    let mut r = Vec::new();
    put_attr_str(&mut r, 1, "service.name", service);
    put_attr_str(&mut r, 1, "service.namespace", namespace);
    put_attr_str(&mut r, 1, "k8s.namespace.name", namespace);
    r
}

/// `Span` (opentelemetry/proto/trace/v1/trace.proto).
pub fn encode_span(s: &SpanRecord) -> Vec<u8> {
    let mut out = Vec::with_capacity(160 + s.path.len());
    put_bytes(&mut out, 1, &s.ctx.trace_id);
    put_bytes(&mut out, 2, &s.ctx.span_id);
    if let Some(p) = &s.ctx.parent_span_id {
        put_bytes(&mut out, 4, p);
    }
    let name = match (&s.grpc, &s.dependency) {
        (
            Some(GrpcSpan {
                service_method: Some((svc, m)),
                ..
            }),
            _,
        ) => format!("{svc}/{m}"),
        (_, Some(d)) => format!("{} {}", s.method, d),
        (_, None) => s.method.to_string(),
    };
    put_bytes(&mut out, 5, name.as_bytes());
    put_uint(&mut out, 6, s.kind);
    put_fixed64(&mut out, 7, s.start_unix_nanos);
    put_fixed64(&mut out, 8, s.end_unix_nanos);
    put_attr_str(&mut out, 9, "http.request.method", s.method.as_str());
    put_attr_str(&mut out, 9, "url.path", &s.path);
    put_attr_int(
        &mut out,
        9,
        "http.response.status_code",
        i64::from(s.status),
    );
    if let Some(d) = &s.dependency {
        put_attr_str(&mut out, 9, "weir.dependency", d);
    }
    if let Some(r) = s.reason {
        put_attr_str(&mut out, 9, "weir.reason", r);
    }
    if let Some(g) = &s.grpc {
        put_attr_str(&mut out, 9, "rpc.system", "grpc");
        if let Some((svc, m)) = &g.service_method {
            put_attr_str(&mut out, 9, "rpc.service", svc);
            put_attr_str(&mut out, 9, "rpc.method", m);
        }
        put_attr_int(&mut out, 9, "rpc.grpc.status_code", i64::from(g.code));
    }
    // Status { message = 2; code = 3 (1 ok, 2 error) }
    let mut status = Vec::new();
    let failed = match &s.grpc {
        Some(g) => g.is_error(s.kind),
        None => s.status >= 500,
    };
    if failed {
        let grpc_name = s
            .grpc
            .as_ref()
            .map(|g| weir_crds::proxy::grpc_code_name(g.code));
        if let Some(r) = s.reason.or(grpc_name) {
            put_bytes(&mut status, 2, r.as_bytes());
        }
        put_uint(&mut status, 3, 2);
    }
    put_bytes(&mut out, 15, &status);
    out
}

/// `ExportTraceServiceRequest { repeated ResourceSpans resource_spans = 1 }`,
/// `ResourceSpans { Resource resource = 1; repeated ScopeSpans scope_spans = 2 }`,
/// `ScopeSpans { InstrumentationScope scope = 1; repeated Span spans = 2 }`.
pub fn encode_request(resource: &[u8], spans: &[SpanRecord]) -> Vec<u8> {
    let mut scope = Vec::new();
    put_bytes(&mut scope, 1, b"weir-proxy");
    put_bytes(&mut scope, 2, env!("CARGO_PKG_VERSION").as_bytes());
    let mut scope_spans = Vec::new();
    put_bytes(&mut scope_spans, 1, &scope);
    for s in spans {
        put_bytes(&mut scope_spans, 2, &encode_span(s));
    }
    let mut rs = Vec::new();
    put_bytes(&mut rs, 1, resource);
    put_bytes(&mut rs, 2, &scope_spans);
    let mut req = Vec::new();
    put_bytes(&mut req, 1, &rs);
    req
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn varints_match_the_protobuf_encoding() {
        let mut v = Vec::new();
        put_varint(&mut v, 300);
        assert_eq!(v, [0xac, 0x02]);
        let mut v = Vec::new();
        put_tag(&mut v, 15, 2);
        assert_eq!(v, [0x7a]);
    }

    #[test]
    fn traces_url_appends_the_signal_path_once() {
        assert_eq!(traces_url("http://c:4318"), "http://c:4318/v1/traces");
        assert_eq!(traces_url("http://c:4318/"), "http://c:4318/v1/traces");
        assert_eq!(
            traces_url("http://c:4318/v1/traces"),
            "http://c:4318/v1/traces"
        );
    }
}
