//! Small tower layers, one concern each. Every service here is always ready (`poll_ready` returns
//! `Ready` at once) and never fails: policies answer with an HTTP response instead of an error, so
//! layers compose without error plumbing.

pub mod attempt_timeout;
pub mod authorize;
pub mod body_limit;
pub mod breaker;
pub mod concurrency;
pub mod fallback;
pub mod grpc;
pub mod guard;
pub mod header_names;
pub mod identity;
pub mod observe;
pub mod rate_limit;
pub mod retry;
pub mod stream_idle;
pub mod timeout;
pub mod trace;

use crate::body::Resp;
use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;

pub type BoxFuture = Pin<Box<dyn Future<Output = Result<Resp, Infallible>> + Send>>;

/// The point in time by which the request must be answered; set by the timeout layer, honoured
/// by everything that waits inside it (queues, retry backoff, attempts).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Deadline(pub tokio::time::Instant);

pub fn deadline_of<B>(req: &http::Request<B>) -> Option<tokio::time::Instant> {
    req.extensions().get::<Deadline>().map(|d| d.0)
}

/// Implements the always-ready `poll_ready` for a layer's service.
macro_rules! always_ready {
    () => {
        fn poll_ready(
            &mut self,
            _: &mut std::task::Context<'_>,
        ) -> std::task::Poll<Result<(), std::convert::Infallible>> {
            std::task::Poll::Ready(Ok(()))
        }
    };
}
pub(crate) use always_ready;

#[cfg(test)]
pub(crate) mod testing {
    //! Helpers for layer tests: inner services and requests.
    use crate::body::{self, BoxBody, Req, Resp};
    use bytes::Bytes;
    use http::{Request, Response, StatusCode};
    use http_body_util::BodyExt;
    use std::convert::Infallible;
    use std::time::Duration;

    pub fn get(uri: &str) -> Req {
        Request::get(uri).body(body::empty()).unwrap()
    }

    pub fn ok() -> Resp {
        Response::new(body::full("ok"))
    }

    pub fn status(s: u16) -> Resp {
        let mut r = Response::new(body::empty());
        *r.status_mut() = StatusCode::from_u16(s).unwrap();
        r
    }

    /// An inner service answering 200 after `delay`.
    pub fn slow(
        delay: Duration,
    ) -> impl tower::Service<Req, Response = Resp, Error = Infallible, Future = super::BoxFuture>
    + Clone
    + Send
    + 'static {
        tower::service_fn(move |_req: Req| -> super::BoxFuture {
            Box::pin(async move {
                tokio::time::sleep(delay).await;
                Ok(ok())
            })
        })
    }

    pub async fn body_string(b: BoxBody) -> String {
        String::from_utf8(b.collect().await.unwrap().to_bytes().to_vec()).unwrap()
    }

    pub async fn read_all(b: BoxBody) -> Result<Bytes, crate::body::BoxError> {
        Ok(b.collect().await?.to_bytes())
    }
}
