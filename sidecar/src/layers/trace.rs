//! W3C trace context: continues the caller's trace when its `traceparent` is valid, starts one
//! otherwise; the request passed on carries the proxy's span as parent (a child span of the
//! caller's). Puts the [`TraceContext`] in the request extensions for the access log, and hands a
//! finished span to the OTLP exporter when the trace is sampled. A gRPC call's span ends with the
//! call (its status, at the end of a stream) and carries the `rpc.*` attributes.

use super::{BoxFuture, always_ready};
use crate::body::{Req, Resp, rejection};
use crate::layers::grpc;
use crate::otlp::{GrpcSpan, SpanRecord, SpanSink, unix_nanos};
use crate::trace::{TraceContext, propagate};
use std::convert::Infallible;
use std::sync::Arc;
use std::time::SystemTime;
use tower::{Layer, Service};

#[derive(Clone, Debug)]
pub struct TraceLayer {
    settings: Arc<TraceSettings>,
}

#[derive(Debug)]
pub struct TraceSettings {
    pub sampling_ratio: f64,
    pub sink: Option<SpanSink>,
    /// `otlp::SPAN_KIND_SERVER` inbound, `SPAN_KIND_CLIENT` outbound.
    pub kind: u64,
    pub dependency: Option<Arc<str>>,
}

impl TraceLayer {
    pub fn new(settings: TraceSettings) -> Self {
        TraceLayer {
            settings: Arc::new(settings),
        }
    }
}

impl<S> Layer<S> for TraceLayer {
    type Service = Trace<S>;
    fn layer(&self, inner: S) -> Trace<S> {
        Trace {
            inner,
            settings: self.settings.clone(),
        }
    }
}

#[derive(Clone, Debug)]
pub struct Trace<S> {
    inner: S,
    settings: Arc<TraceSettings>,
}

impl<S> Service<Req> for Trace<S>
where
    S: Service<Req, Response = Resp, Error = Infallible>,
    S::Future: Send + 'static,
{
    type Response = Resp;
    type Error = Infallible;
    type Future = BoxFuture;
    always_ready!();

    fn call(&mut self, mut req: Req) -> BoxFuture {
        let (ctx, continued) =
            TraceContext::from_headers(req.headers(), self.settings.sampling_ratio);
        propagate(req.headers_mut(), &ctx, continued);
        req.extensions_mut().insert(ctx);
        let sink = match (&self.settings.sink, ctx.sampled) {
            (Some(sink), true) => sink.clone(),
            _ => return Box::pin(self.inner.call(req)),
        };
        let start = SystemTime::now();
        let method = req.method().clone();
        let path = req.uri().path().to_string();
        let kind = self.settings.kind;
        let dependency = self.settings.dependency.clone();
        let is_grpc = grpc::is_marked(&req);
        let fut = self.inner.call(req);
        Box::pin(async move {
            let resp = fut.await?;
            let span = SpanRecord {
                ctx,
                kind,
                method,
                path,
                dependency,
                start_unix_nanos: unix_nanos(start),
                end_unix_nanos: 0,
                status: resp.status().as_u16(),
                reason: rejection(&resp).map(|r| r.as_str()),
                grpc: None,
            };
            if is_grpc {
                return Ok(grpc::on_outcome(resp, move |code| {
                    sink.record(SpanRecord {
                        end_unix_nanos: unix_nanos(SystemTime::now()),
                        grpc: Some(GrpcSpan::new(&span.path, code)),
                        ..span
                    })
                }));
            }
            sink.record(SpanRecord {
                end_unix_nanos: unix_nanos(SystemTime::now()),
                ..span
            });
            Ok(resp)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::layers::testing::*;
    use crate::trace::{TRACEPARENT, TRACESTATE, parse_traceparent};
    use std::sync::Mutex;
    use tower::ServiceExt;

    fn capture() -> (
        impl Service<Req, Response = Resp, Error = Infallible, Future = BoxFuture> + Clone,
        Arc<Mutex<Vec<http::HeaderMap>>>,
    ) {
        let seen = Arc::new(Mutex::new(Vec::new()));
        let s2 = seen.clone();
        let svc = tower::service_fn(move |req: Req| -> BoxFuture {
            s2.lock().unwrap().push(req.headers().clone());
            Box::pin(async { Ok(ok()) })
        });
        (svc, seen)
    }

    fn layer(ratio: f64) -> TraceLayer {
        TraceLayer::new(TraceSettings {
            sampling_ratio: ratio,
            sink: None,
            kind: 2,
            dependency: None,
        })
    }

    #[tokio::test]
    async fn continues_the_trace_and_passes_a_child_span() {
        let (inner, seen) = capture();
        let svc = layer(0.0).layer(inner);
        let req = http::Request::get("/")
            .header(
                "traceparent",
                "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            )
            .header("tracestate", "vendor=x")
            .body(crate::body::empty())
            .unwrap();
        svc.oneshot(req).await.unwrap();
        let h = &seen.lock().unwrap()[0];
        let p = parse_traceparent(h[TRACEPARENT].as_bytes()).unwrap();
        assert_eq!(
            p.trace_id,
            parse_traceparent(b"00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01")
                .unwrap()
                .trace_id
        );
        assert_ne!(
            p.span_id,
            [0x00, 0xf0, 0x67, 0xaa, 0x0b, 0xa9, 0x02, 0xb7],
            "a new child span id"
        );
        assert!(p.sampled());
        assert_eq!(h[TRACESTATE], "vendor=x");
    }

    #[tokio::test]
    async fn starts_a_trace_when_the_header_is_invalid() {
        let (inner, seen) = capture();
        let svc = layer(0.0).layer(inner);
        let req = http::Request::get("/")
            .header("traceparent", "00-zzzz")
            .header("tracestate", "vendor=x")
            .body(crate::body::empty())
            .unwrap();
        svc.clone().oneshot(req).await.unwrap();
        svc.oneshot(get("/")).await.unwrap();
        let seen = seen.lock().unwrap();
        let a = parse_traceparent(seen[0][TRACEPARENT].as_bytes()).unwrap();
        let b = parse_traceparent(seen[1][TRACEPARENT].as_bytes()).unwrap();
        assert_ne!(a.trace_id, b.trace_id);
        assert!(!a.sampled(), "ratio 0 samples nothing");
        assert!(seen[0].get(TRACESTATE).is_none());
    }

    #[tokio::test]
    async fn sampled_spans_reach_the_sink() {
        let (tx, mut rx) = tokio::sync::mpsc::channel(8);
        let sink = SpanSink::for_tests(tx);
        let (inner, _) = capture();
        let svc = TraceLayer::new(TraceSettings {
            sampling_ratio: 1.0,
            sink: Some(sink),
            kind: 3,
            dependency: Some("users".into()),
        })
        .layer(inner);
        svc.oneshot(get("/a/b")).await.unwrap();
        let span = rx.try_recv().unwrap();
        assert_eq!(span.path, "/a/b");
        assert_eq!(span.status, 200);
        assert_eq!(span.kind, 3);
        assert!(span.end_unix_nanos >= span.start_unix_nanos);
    }
}
