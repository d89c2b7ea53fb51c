//! Token-bucket rate limit: `burst` tokens, refilled at `requests_per_second`; an empty bucket
//! answers 429 with `Retry-After` (whole seconds until a token is back, at least 1).

use super::{BoxFuture, always_ready};
use crate::body::{Reason, Req, Resp, reject};
use http::HeaderValue;
use prometheus_client::metrics::counter::Counter;
use std::convert::Infallible;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::time::Instant;
use tower::{Layer, Service};

#[derive(Debug)]
pub struct TokenBucket {
    rate: f64,
    burst: f64,
    state: Mutex<(f64, Instant)>,
    rejected: Counter,
}

impl TokenBucket {
    pub fn new(requests_per_second: f64, burst: u32, rejected: Counter) -> Arc<Self> {
        Arc::new(TokenBucket {
            rate: requests_per_second,
            burst: f64::from(burst),
            state: Mutex::new((f64::from(burst), Instant::now())),
            rejected,
        })
    }

    /// Takes a token, or says how long until one is available.
    pub fn try_take(&self) -> Result<(), Duration> {
        let now = Instant::now();
        let mut st = self.state.lock().unwrap_or_else(|e| e.into_inner());
        let (tokens, last) = *st;
        let tokens = (tokens + now.saturating_duration_since(last).as_secs_f64() * self.rate)
            .min(self.burst);
        if tokens >= 1.0 {
            *st = (tokens - 1.0, now);
            Ok(())
        } else {
            *st = (tokens, now);
            self.rejected.inc();
            Err(Duration::from_secs_f64((1.0 - tokens) / self.rate))
        }
    }
}

#[derive(Clone, Debug)]
pub struct RateLimitLayer {
    bucket: Arc<TokenBucket>,
}

impl RateLimitLayer {
    pub fn new(bucket: Arc<TokenBucket>) -> Self {
        RateLimitLayer { bucket }
    }
}

impl<S> Layer<S> for RateLimitLayer {
    type Service = RateLimit<S>;
    fn layer(&self, inner: S) -> RateLimit<S> {
        RateLimit {
            inner,
            bucket: self.bucket.clone(),
        }
    }
}

#[derive(Clone, Debug)]
pub struct RateLimit<S> {
    inner: S,
    bucket: Arc<TokenBucket>,
}

impl<S> Service<Req> for RateLimit<S>
where
    S: Service<Req, Response = Resp, Error = Infallible>,
    S::Future: Send + 'static,
{
    type Response = Resp;
    type Error = Infallible;
    type Future = BoxFuture;
    always_ready!();

    fn call(&mut self, req: Req) -> BoxFuture {
        match self.bucket.try_take() {
            Ok(()) => Box::pin(self.inner.call(req)),
            Err(wait) => {
                let mut resp = reject(Reason::RateLimited);
                let secs = wait.as_secs_f64().ceil().max(1.0) as u64;
                resp.headers_mut()
                    .insert(http::header::RETRY_AFTER, HeaderValue::from(secs));
                Box::pin(std::future::ready(Ok(resp)))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::layers::testing::*;
    use tower::ServiceExt;

    #[tokio::test(start_paused = true)]
    async fn admits_a_burst_then_429_with_retry_after_then_refills() {
        let c = Counter::default();
        let svc =
            RateLimitLayer::new(TokenBucket::new(0.5, 3, c.clone())).layer(slow(Duration::ZERO));
        for _ in 0..3 {
            assert_eq!(svc.clone().oneshot(get("/")).await.unwrap().status(), 200);
        }
        let resp = svc.clone().oneshot(get("/")).await.unwrap();
        assert_eq!(resp.status(), 429);
        assert_eq!(resp.headers()["retry-after"], "2", "one token every 2 s");
        assert_eq!(resp.headers()["x-weir-reason"], "rate-limited");
        assert_eq!(c.get(), 1);
        tokio::time::advance(Duration::from_millis(1999)).await;
        assert_eq!(svc.clone().oneshot(get("/")).await.unwrap().status(), 429);
        tokio::time::advance(Duration::from_millis(1)).await;
        assert_eq!(svc.clone().oneshot(get("/")).await.unwrap().status(), 200);
        assert_eq!(svc.clone().oneshot(get("/")).await.unwrap().status(), 429);
        assert_eq!(c.get(), 3);
    }

    #[tokio::test(start_paused = true)]
    async fn refill_never_exceeds_burst() {
        let svc = RateLimitLayer::new(TokenBucket::new(100.0, 2, Counter::default()))
            .layer(slow(Duration::ZERO));
        tokio::time::advance(Duration::from_secs(60)).await;
        let codes: Vec<u16> =
            futures::future::join_all((0..4).map(|_| svc.clone().oneshot(get("/"))))
                .await
                .into_iter()
                .map(|r| r.unwrap().status().as_u16())
                .collect();
        assert_eq!(codes, vec![200, 200, 429, 429]);
    }
}
