//! Fallback: when the breaker is open or the bulkhead is full, serves the configured response
//! instead of the 503 (marked `x-weir-fallback: circuit-open|bulkhead-full`).

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
}

impl FallbackResponse {
    pub fn from_config(c: &weir_crds::proxy::FallbackConfig) -> Self {
        FallbackResponse {
            status: StatusCode::from_u16(c.status).unwrap_or(StatusCode::SERVICE_UNAVAILABLE),
            body: Bytes::from(c.body.clone()),
            content_type: HeaderValue::from_str(&c.content_type)
                .unwrap_or_else(|_| HeaderValue::from_static("text/plain")),
        }
    }

    fn response(&self, reason: Reason) -> Resp {
        let mut resp = Response::new(body::full(self.body.clone()));
        *resp.status_mut() = self.status;
        resp.headers_mut()
            .insert(http::header::CONTENT_TYPE, self.content_type.clone());
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
        let fut = self.inner.call(req);
        Box::pin(async move {
            let resp = fut.await?;
            Ok(match rejection(&resp) {
                Some(r @ (Reason::CircuitOpen | Reason::BulkheadFull)) => fb.response(r),
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
