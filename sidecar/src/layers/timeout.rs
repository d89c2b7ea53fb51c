//! Request timeout: answers 504 (`x-weir-reason: timeout`) when the inner service has not produced
//! response headers in time. Sets a [`Deadline`] that inner waits honour.

use super::{BoxFuture, Deadline, always_ready};
use crate::body::{Reason, Req, Resp, reject};
use std::convert::Infallible;
use std::time::Duration;
use tokio::time::Instant;
use tower::{Layer, Service};

#[derive(Clone, Debug)]
pub struct TimeoutLayer {
    timeout: Duration,
}

impl TimeoutLayer {
    pub fn new(timeout: Duration) -> Self {
        TimeoutLayer { timeout }
    }
}

impl<S> Layer<S> for TimeoutLayer {
    type Service = Timeout<S>;
    fn layer(&self, inner: S) -> Timeout<S> {
        Timeout {
            inner,
            timeout: self.timeout,
        }
    }
}

#[derive(Clone, Debug)]
pub struct Timeout<S> {
    inner: S,
    timeout: Duration,
}

impl<S> Service<Req> for Timeout<S>
where
    S: Service<Req, Response = Resp, Error = Infallible>,
    S::Future: Send + 'static,
{
    type Response = Resp;
    type Error = Infallible;
    type Future = BoxFuture;
    always_ready!();

    fn call(&mut self, mut req: Req) -> BoxFuture {
        let mut deadline = Instant::now() + self.timeout;
        if let Some(Deadline(earlier)) = req.extensions().get::<Deadline>() {
            deadline = deadline.min(*earlier);
        }
        req.extensions_mut().insert(Deadline(deadline));
        let fut = self.inner.call(req);
        Box::pin(async move {
            match tokio::time::timeout_at(deadline, fut).await {
                Ok(resp) => resp,
                Err(_) => Ok(reject(Reason::Timeout)),
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::body::REASON_HEADER;
    use crate::layers::testing::*;
    use tower::ServiceExt;

    #[tokio::test(start_paused = true)]
    async fn slow_inner_gets_504_at_the_deadline() {
        let svc =
            TimeoutLayer::new(Duration::from_millis(100)).layer(slow(Duration::from_secs(10)));
        let start = Instant::now();
        let resp = svc.oneshot(get("/")).await.unwrap();
        assert_eq!(resp.status(), 504);
        assert_eq!(resp.headers()[REASON_HEADER], "timeout");
        assert_eq!(start.elapsed(), Duration::from_millis(100));
    }

    #[tokio::test(start_paused = true)]
    async fn fast_inner_passes() {
        let svc =
            TimeoutLayer::new(Duration::from_millis(100)).layer(slow(Duration::from_millis(99)));
        let resp = svc.oneshot(get("/")).await.unwrap();
        assert_eq!(resp.status(), 200);
    }

    #[tokio::test(start_paused = true)]
    async fn sets_and_tightens_the_deadline() {
        let seen = std::sync::Arc::new(std::sync::Mutex::new(None));
        let s2 = seen.clone();
        let inner = tower::service_fn(move |req: Req| {
            *s2.lock().unwrap() = crate::layers::deadline_of(&req);
            async { Ok::<_, Infallible>(ok()) }
        });
        let now = Instant::now();
        let svc = TimeoutLayer::new(Duration::from_secs(5)).layer(inner);
        let mut req = get("/");
        req.extensions_mut()
            .insert(Deadline(now + Duration::from_secs(1)));
        svc.oneshot(req).await.unwrap();
        assert_eq!(seen.lock().unwrap().unwrap(), now + Duration::from_secs(1));
    }
}
