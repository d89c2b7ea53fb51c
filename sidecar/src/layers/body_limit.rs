//! Request body size limit: 413 when `Content-Length` says the body is too large (before anything
//! is forwarded), and for streamed (chunked) bodies, once the bytes seen pass the limit: the
//! forwarding is aborted and the caller gets 413.

use super::{BoxFuture, always_ready};
use crate::body::{BodyError, BoxBody, Reason, Req, Resp, reject};
use bytes::Bytes;
use http_body_util::BodyExt;
use hyper::body::{Body, Frame, SizeHint};
use std::convert::Infallible;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::task::{Context, Poll};
use tower::{Layer, Service};

#[derive(Debug)]
pub struct BodyTooLarge;

impl std::fmt::Display for BodyTooLarge {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("request body exceeds the size limit")
    }
}

impl std::error::Error for BodyTooLarge {}

/// Counts the bytes of a streamed body; fails the stream (and flags it) past `remaining`.
struct Counting {
    inner: BoxBody,
    remaining: u64,
    tripped: Arc<AtomicBool>,
}

impl Body for Counting {
    type Data = Bytes;
    type Error = BodyError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BodyError>>> {
        let this = &mut *self;
        match Pin::new(&mut this.inner).poll_frame(cx) {
            Poll::Ready(Some(Ok(frame))) => {
                if let Some(data) = frame.data_ref() {
                    let n = data.len() as u64;
                    if n > this.remaining {
                        this.tripped.store(true, Ordering::Release);
                        return Poll::Ready(Some(Err(BodyError::new(BodyTooLarge))));
                    }
                    this.remaining -= n;
                }
                Poll::Ready(Some(Ok(frame)))
            }
            other => other,
        }
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// A `Content-Length` header that is not a number.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct InvalidLength;

/// The declared length, `Err` when the header is not a number.
pub fn content_length(headers: &http::HeaderMap) -> Result<Option<u64>, InvalidLength> {
    match headers.get(http::header::CONTENT_LENGTH) {
        None => Ok(None),
        Some(v) => v
            .to_str()
            .ok()
            .and_then(|s| s.trim().parse().ok())
            .map(Some)
            .ok_or(InvalidLength),
    }
}

#[derive(Clone, Debug)]
pub struct BodyLimitLayer {
    max: u64,
}

impl BodyLimitLayer {
    pub fn new(max_bytes: u64) -> Self {
        BodyLimitLayer { max: max_bytes }
    }
}

impl<S> Layer<S> for BodyLimitLayer {
    type Service = BodyLimit<S>;
    fn layer(&self, inner: S) -> BodyLimit<S> {
        BodyLimit {
            inner,
            max: self.max,
        }
    }
}

#[derive(Clone, Debug)]
pub struct BodyLimit<S> {
    inner: S,
    max: u64,
}

impl<S> Service<Req> for BodyLimit<S>
where
    S: Service<Req, Response = Resp, Error = Infallible>,
    S::Future: Send + 'static,
{
    type Response = Resp;
    type Error = Infallible;
    type Future = BoxFuture;
    always_ready!();

    fn call(&mut self, req: Req) -> BoxFuture {
        match content_length(req.headers()) {
            Err(InvalidLength) => {
                return Box::pin(std::future::ready(Ok(reject(Reason::BadRequest))));
            }
            Ok(Some(n)) if n > self.max => {
                let mut resp = reject(Reason::BodyTooLarge);
                // The unread body is not drained: close the connection after answering.
                resp.headers_mut().insert(
                    http::header::CONNECTION,
                    http::HeaderValue::from_static("close"),
                );
                return Box::pin(std::future::ready(Ok(resp)));
            }
            // Declared and within the limit: hyper enforces the declared length.
            Ok(Some(_)) => return Box::pin(self.inner.call(req)),
            Ok(None) => {}
        }
        if req.body().is_end_stream() {
            return Box::pin(self.inner.call(req));
        }
        let tripped = Arc::new(AtomicBool::new(false));
        let max = self.max;
        let t2 = tripped.clone();
        let req = req.map(move |inner| {
            Counting {
                inner,
                remaining: max,
                tripped: t2,
            }
            .boxed_unsync()
        });
        let fut = self.inner.call(req);
        Box::pin(async move {
            let resp = fut.await;
            if tripped.load(Ordering::Acquire) {
                let mut resp = reject(Reason::BodyTooLarge);
                resp.headers_mut().insert(
                    http::header::CONNECTION,
                    http::HeaderValue::from_static("close"),
                );
                return Ok(resp);
            }
            resp
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::layers::testing::*;
    use http::Request;
    use tower::ServiceExt;

    /// An inner service that reads the whole body and answers with its length (500 on error).
    fn reader() -> impl Service<Req, Response = Resp, Error = Infallible, Future = BoxFuture> + Clone
    {
        tower::service_fn(|req: Req| -> BoxFuture {
            Box::pin(async move {
                match read_all(req.into_body()).await {
                    Ok(b) => Ok(http::Response::new(crate::body::full(b.len().to_string()))),
                    Err(_) => Ok(status(500)),
                }
            })
        })
    }

    fn streamed(chunks: Vec<&'static [u8]>) -> BoxBody {
        let s = futures::stream::iter(
            chunks
                .into_iter()
                .map(|c| Ok::<_, BodyError>(Frame::data(Bytes::from_static(c)))),
        );
        http_body_util::StreamBody::new(s).boxed_unsync()
    }

    #[tokio::test]
    async fn declared_length_over_the_limit_is_413_up_front() {
        let svc = BodyLimitLayer::new(10).layer(reader());
        let req = Request::post("/")
            .header("content-length", "11")
            .body(crate::body::full("01234567890"))
            .unwrap();
        let resp = svc.oneshot(req).await.unwrap();
        assert_eq!(resp.status(), 413);
        assert_eq!(resp.headers()["x-weir-reason"], "body-too-large");
    }

    #[tokio::test]
    async fn bodies_within_the_limit_pass() {
        let svc = BodyLimitLayer::new(10).layer(reader());
        let req = Request::post("/")
            .header("content-length", "10")
            .body(crate::body::full("0123456789"))
            .unwrap();
        let resp = svc.clone().oneshot(req).await.unwrap();
        assert_eq!(body_string(resp.into_body()).await, "10");
        let req = Request::post("/")
            .body(streamed(vec![b"01234", b"56789"]))
            .unwrap();
        let resp = svc.oneshot(req).await.unwrap();
        assert_eq!(resp.status(), 200);
        assert_eq!(body_string(resp.into_body()).await, "10");
    }

    #[tokio::test]
    async fn streamed_body_over_the_limit_is_413() {
        let svc = BodyLimitLayer::new(10).layer(reader());
        let req = Request::post("/")
            .body(streamed(vec![b"01234", b"56789", b"x"]))
            .unwrap();
        let resp = svc.oneshot(req).await.unwrap();
        assert_eq!(resp.status(), 413);
    }

    #[tokio::test]
    async fn non_numeric_content_length_is_400() {
        let svc = BodyLimitLayer::new(10).layer(reader());
        let req = Request::post("/")
            .header("content-length", "ten")
            .body(crate::body::empty())
            .unwrap();
        assert_eq!(svc.oneshot(req).await.unwrap().status(), 400);
    }
}
