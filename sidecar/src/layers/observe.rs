//! Metrics and the JSON access log: counts each answer and its latency (to response headers) under
//! the pre-created label set of its status class, and logs one line per request with the trace id.
//! A gRPC call is also counted by service, method and the gRPC status its caller reads, when
//! that status is known (at the end of a stream): [`crate::metrics::GrpcMetrics`].

use super::{BoxFuture, always_ready};
use crate::body::{Reason, Req, Resp, rejection, status_class};
use crate::layers::grpc;
use crate::metrics::{GrpcMetrics, RequestMetrics};
use crate::trace::TraceContext;
use std::convert::Infallible;
use std::sync::Arc;
use std::time::Instant;
use tower::{Layer, Service};

#[derive(Debug)]
pub struct Observer {
    pub direction: &'static str,
    pub dependency: Arc<str>,
    pub metrics: RequestMetrics,
    pub grpc: GrpcMetrics,
    pub access_log: bool,
}

#[derive(Clone, Debug)]
pub struct ObserveLayer {
    observer: Arc<Observer>,
}

impl ObserveLayer {
    pub fn new(observer: Observer) -> Self {
        ObserveLayer {
            observer: Arc::new(observer),
        }
    }
}

impl<S> Layer<S> for ObserveLayer {
    type Service = Observe<S>;
    fn layer(&self, inner: S) -> Observe<S> {
        Observe {
            inner,
            observer: self.observer.clone(),
        }
    }
}

#[derive(Clone, Debug)]
pub struct Observe<S> {
    inner: S,
    observer: Arc<Observer>,
}

impl<S> Service<Req> for Observe<S>
where
    S: Service<Req, Response = Resp, Error = Infallible>,
    S::Future: Send + 'static,
{
    type Response = Resp;
    type Error = Infallible;
    type Future = BoxFuture;
    always_ready!();

    fn call(&mut self, req: Req) -> BoxFuture {
        let start = Instant::now();
        let obs = self.observer.clone();
        // Cheap copies: standard methods and the URI's shared bytes are not re-allocated.
        let log = obs
            .access_log
            .then(|| (req.method().clone(), req.uri().clone()));
        let ctx = req.extensions().get::<TraceContext>().copied();
        let grpc_call = grpc::is_marked(&req).then(|| req.uri().clone());
        let fut = self.inner.call(req);
        Box::pin(async move {
            let resp = fut.await?;
            let elapsed = start.elapsed();
            let class = status_class(resp.status());
            obs.metrics.requests[class].inc();
            let reason = rejection(&resp);
            if reason == Some(Reason::ClientBodyError) {
                obs.metrics.client_body_errors.inc();
            }
            obs.metrics.latency[class].observe(elapsed.as_secs_f64());
            if let Some((method, uri)) = log {
                let tid = ctx.map(|c| c.trace_id_hex());
                let trace_id = tid
                    .as_ref()
                    .and_then(|b| std::str::from_utf8(b).ok())
                    .unwrap_or("");
                let line = crate::logging::AccessLine {
                    direction: obs.direction,
                    dependency: &obs.dependency,
                    method: method.as_str(),
                    path: uri.path(),
                    status: resp.status().as_u16(),
                    duration_us: elapsed.as_micros() as u64,
                    trace_id,
                    reason: reason.map_or("", |r| r.as_str()),
                };
                line.emit();
            }
            if let Some(uri) = grpc_call {
                return Ok(grpc::on_outcome(resp, move |code| {
                    let seconds = start.elapsed().as_secs_f64();
                    obs.grpc.record(uri.path(), code, seconds);
                }));
            }
            Ok(resp)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::layers::testing::*;
    use crate::metrics::Metrics;
    use std::time::Duration;
    use tower::ServiceExt;

    #[tokio::test]
    async fn counts_by_status_class() {
        let m = Metrics::new();
        let layer = ObserveLayer::new(Observer {
            direction: "inbound",
            dependency: "".into(),
            metrics: m.request_metrics("inbound", ""),
            grpc: m.grpc_metrics("inbound", ""),
            access_log: true,
        });
        let fail = tower::service_fn(|_req: Req| async { Ok::<_, Infallible>(status(503)) });
        layer
            .layer(slow(Duration::ZERO))
            .oneshot(get("/"))
            .await
            .unwrap();
        layer
            .layer(slow(Duration::ZERO))
            .oneshot(get("/"))
            .await
            .unwrap();
        layer.layer(fail).oneshot(get("/")).await.unwrap();
        let text = m.encode();
        assert!(
            text.contains(
                r#"weir_requests_total{direction="inbound",dependency="",status_class="2xx"} 2"#
            ),
            "{text}"
        );
        assert!(text.contains(
            r#"weir_requests_total{direction="inbound",dependency="",status_class="5xx"} 1"#
        ));
        assert!(text.contains(r#"weir_request_duration_seconds_count{direction="inbound",dependency="",status_class="2xx"} 2"#));
    }
}
