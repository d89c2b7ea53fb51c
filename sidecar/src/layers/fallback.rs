//! Fallback: when the breaker is open or the bulkhead is full, serves the configured response
//! instead of the 503 (marked `x-weir-fallback: circuit-open|bulkhead-full`). A gRPC call gets
//! the configured `grpcStatus` as a Trailers-Only answer; without one, the refusal itself as a
//! status (the gRPC layer turns it into `UNAVAILABLE` or `RESOURCE_EXHAUSTED`).

use super::{BoxFuture, always_ready};
use crate::body::{self, FALLBACK_HEADER, Reason, Rejected, Req, Resp, rejection};
use bytes::Bytes;
use http::{HeaderValue, Response, StatusCode};
use std::convert::Infallible;
use std::sync::Arc;
use tower::{Layer, Service};

#[derive(Debug)]
pub struct FallbackResponse {
    pub status: StatusCode,
    pub body: Bytes,
    pub content_type: HeaderValue,
    /// For gRPC calls: the status and message answered instead.
    pub grpc: Option<(u16, String)>,
}

impl FallbackResponse {
    pub fn from_config(c: &weir_crds::proxy::FallbackConfig) -> Self {
        FallbackResponse {
            status: StatusCode::from_u16(c.status).unwrap_or(StatusCode::SERVICE_UNAVAILABLE),
            body: Bytes::from(c.body.clone()),
            content_type: HeaderValue::from_str(&c.content_type)
                .unwrap_or_else(|_| HeaderValue::from_static("text/plain")),
            grpc: c.grpc_status.map(|code| (code, c.grpc_message.clone())),
        }
    }

    fn response(&self, reason: Reason, grpc: bool) -> Resp {
        let mut resp = match &self.grpc {
            Some((code, message)) if grpc => super::grpc::status_response(*code, message),
            _ => {
                let mut r = Response::new(body::full(self.body.clone()));
                *r.status_mut() = self.status;
                r.headers_mut()
                    .insert(http::header::CONTENT_TYPE, self.content_type.clone());
                r
            }
        };
        resp.headers_mut()
            .insert(FALLBACK_HEADER, reason.header_value());
        resp.extensions_mut().insert(Rejected(reason));
        resp
    }
}

#[derive(Clone, Debug)]
pub struct FallbackLayer {
    fallback: Arc<FallbackResponse>,
}

impl FallbackLayer {
    pub fn new(fallback: FallbackResponse) -> Self {
        FallbackLayer {
            fallback: Arc::new(fallback),
        }
    }
}

impl<S> Layer<S> for FallbackLayer {
    type Service = Fallback<S>;
    fn layer(&self, inner: S) -> Fallback<S> {
        Fallback {
            inner,
            fallback: self.fallback.clone(),
        }
    }
}

#[derive(Clone, Debug)]
pub struct Fallback<S> {
    inner: S,
    fallback: Arc<FallbackResponse>,
}

impl<S> Service<Req> for Fallback<S>
where
    S: Service<Req, Response = Resp, Error = Infallible>,
    S::Future: Send + 'static,
{
    type Response = Resp;
    type Error = Infallible;
    type Future = BoxFuture;
    always_ready!();

    fn call(&mut self, req: Req) -> BoxFuture {
        let fb = self.fallback.clone();
        let grpc = super::grpc::is_marked(&req);
        let fut = self.inner.call(req);
        Box::pin(async move {
            let resp = fut.await?;
            Ok(match rejection(&resp) {
                Some(r @ (Reason::CircuitOpen | Reason::BulkheadFull)) => fb.response(r, grpc),
                _ => resp,
            })
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::body::reject;
    use crate::layers::testing::*;
    use tower::ServiceExt;

    #[tokio::test]
    async fn replaces_open_and_full_rejections_only() {
        let layer = FallbackLayer::new(FallbackResponse {
            status: StatusCode::OK,
            body: Bytes::from_static(b"{\"users\":[]}"),
            content_type: HeaderValue::from_static("application/json"),
            grpc: None,
        });
        for (reason, replaced) in [
            (Reason::CircuitOpen, true),
            (Reason::BulkheadFull, true),
            (Reason::Timeout, false),
            (Reason::UpstreamConnect, false),
        ] {
            let svc = layer.layer(tower::service_fn(move |_r: Req| async move {
                Ok::<_, Infallible>(reject(reason))
            }));
            let resp = svc.oneshot(get("/")).await.unwrap();
            if replaced {
                assert_eq!(resp.status(), 200);
                assert_eq!(resp.headers()["content-type"], "application/json");
                assert_eq!(resp.headers()["x-weir-fallback"], reason.as_str());
                assert_eq!(body_string(resp.into_body()).await, "{\"users\":[]}");
            } else {
                assert_eq!(resp.status(), reason.status());
            }
        }
    }
}
