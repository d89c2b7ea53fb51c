//! Each attempt of an outbound call (inside retries, under the breaker) ends by the request's
//! deadline, so the breaker sees a timed-out attempt as a timeout.

use crate::body::{Reason, Req, Resp, reject};
use crate::layers::{BoxFuture, always_ready, deadline_of};
use std::convert::Infallible;
use tower::{Layer, Service};

/// Bounds each attempt by the request's deadline, so the breaker sees a timed-out attempt as a
/// timeout (`504 timeout`).
#[derive(Clone, Debug, Default)]
pub struct AttemptTimeoutLayer;

impl<S> Layer<S> for AttemptTimeoutLayer {
    type Service = AttemptTimeout<S>;
    fn layer(&self, inner: S) -> AttemptTimeout<S> {
        AttemptTimeout { inner }
    }
}

#[derive(Clone, Debug)]
pub struct AttemptTimeout<S> {
    inner: S,
}

impl<S> Service<Req> for AttemptTimeout<S>
where
    S: Service<Req, Response = Resp, Error = Infallible>,
    S::Future: Send + 'static,
{
    type Response = Resp;
    type Error = Infallible;
    type Future = BoxFuture;
    always_ready!();

    fn call(&mut self, req: Req) -> BoxFuture {
        match deadline_of(&req) {
            None => Box::pin(self.inner.call(req)),
            Some(d) => {
                let fut = self.inner.call(req);
                Box::pin(async move {
                    tokio::time::timeout_at(d, fut)
                        .await
                        .unwrap_or_else(|_| Ok(reject(Reason::Timeout)))
                })
            }
        }
    }
}
