//! Refuses requests whose framing is ambiguous before they reach any upstream: `Content-Length`
//! together with `Transfer-Encoding` (a request-smuggling vector) gets 400 and the connection is
//! closed after the answer.

use super::{BoxFuture, always_ready};
use crate::body::{Reason, Req, Resp, reject};
use http::HeaderValue;
use http::header::{CONNECTION, CONTENT_LENGTH, TRANSFER_ENCODING};
use std::convert::Infallible;
use tower::{Layer, Service};

#[derive(Clone, Debug, Default)]
pub struct GuardLayer;

impl<S> Layer<S> for GuardLayer {
    type Service = Guard<S>;
    fn layer(&self, inner: S) -> Guard<S> {
        Guard { inner }
    }
}

#[derive(Clone, Debug)]
pub struct Guard<S> {
    inner: S,
}

/// Why a request is refused, if it is.
pub fn check(headers: &http::HeaderMap) -> Option<&'static str> {
    if headers.contains_key(CONTENT_LENGTH) && headers.contains_key(TRANSFER_ENCODING) {
        return Some("content-length with transfer-encoding");
    }
    let mut lengths = headers.get_all(CONTENT_LENGTH).iter();
    if let (Some(a), Some(b)) = (lengths.next(), lengths.next())
        && a != b
    {
        return Some("conflicting content-length values");
    }
    None
}

impl<S> Service<Req> for Guard<S>
where
    S: Service<Req, Response = Resp, Error = Infallible>,
    S::Future: Send + 'static,
{
    type Response = Resp;
    type Error = Infallible;
    type Future = BoxFuture;
    always_ready!();

    fn call(&mut self, req: Req) -> BoxFuture {
        match check(req.headers()) {
            None => Box::pin(self.inner.call(req)),
            Some(why) => {
                tracing::warn!(reason = why, method = %req.method(), path = req.uri().path(), "refused request");
                let mut resp = reject(Reason::BadRequest);
                resp.headers_mut()
                    .insert(CONNECTION, HeaderValue::from_static("close"));
                Box::pin(std::future::ready(Ok(resp)))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::layers::testing::*;
    use http::Request;
    use std::time::Duration;
    use tower::ServiceExt;

    #[tokio::test]
    async fn content_length_with_transfer_encoding_is_400_and_closes() {
        let svc = GuardLayer.layer(slow(Duration::ZERO));
        let req = Request::post("/")
            .header("content-length", "5")
            .header("transfer-encoding", "chunked")
            .body(crate::body::empty())
            .unwrap();
        let resp = svc.clone().oneshot(req).await.unwrap();
        assert_eq!(resp.status(), 400);
        assert_eq!(resp.headers()["connection"], "close");
        assert_eq!(resp.headers()["x-weir-reason"], "bad-request");
        let req = Request::post("/")
            .header("content-length", "5")
            .body(crate::body::full("hello"))
            .unwrap();
        assert_eq!(svc.oneshot(req).await.unwrap().status(), 200);
    }

    #[test]
    fn conflicting_lengths_are_refused() {
        let mut h = http::HeaderMap::new();
        h.append(CONTENT_LENGTH, HeaderValue::from_static("5"));
        assert_eq!(check(&h), None);
        h.append(CONTENT_LENGTH, HeaderValue::from_static("6"));
        assert!(check(&h).is_some());
    }
}
