//! Retries with exponential backoff and full jitter, bounded by a retry budget (Linkerd's model).
//!
//! - Only idempotent methods (GET, HEAD, OPTIONS, TRACE, PUT, DELETE) are retried, unless
//!   `retryNonIdempotent` is set.
//! - A response is retried when it is a 5xx from the upstream, or the proxy could not reach the
//!   upstream (`upstream-connect`, `upstream-error`). A breaker rejection is never retried.
//! - Request bodies up to 64 KiB (declared by `Content-Length`) are buffered so they can be sent
//!   again; larger or streamed bodies are sent once.
//! - The n-th retry waits a random time in `[0, min(backoffMaxMs, backoffBaseMs * 2^(n-1))]`,
//!   and never past the request's deadline.
//! - Budget: every request deposits one token, every retry withdraws one; a retry is allowed while
//!   `ratio * requests(last ttl) + minPerSecond * ttl_seconds - retries(last ttl) >= 1`. A refused
//!   retry returns the failed response with `x-weir-reason: retry-budget` added (unless the proxy
//!   already named a reason).

use crate::body::{self, REASON_HEADER, Reason, Req, Resp, reject, rejection};
use crate::layers::body_limit::content_length;
use crate::layers::{BoxFuture, always_ready, deadline_of};
use crate::metrics::RetryMetrics;
use bytes::Bytes;
use http::{Method, Request};
use http_body_util::BodyExt;
use hyper::body::Body;
use std::convert::Infallible;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::time::Instant;
use tower::{Layer, Service};
use weir_crds::proxy::{RetryBudgetConfig, RetryConfig};

/// Bodies up to this size are buffered for retries.
pub const MAX_RETRY_BODY: u64 = 64 * 1024;
const SLOTS: usize = 10;

#[derive(Clone, Copy, Debug, Default)]
struct Slot {
    epoch: u64,
    deposits: u64,
    withdrawals: u64,
}

#[derive(Debug)]
pub struct RetryBudget {
    ratio: f64,
    reserve: f64,
    slot_nanos: u128,
    origin: Instant,
    slots: Mutex<[Slot; SLOTS]>,
}

impl RetryBudget {
    pub fn new(cfg: &RetryBudgetConfig) -> Arc<Self> {
        let ttl = Duration::from_millis(cfg.ttl_ms.max(1));
        Arc::new(RetryBudget {
            ratio: cfg.ratio,
            reserve: f64::from(cfg.min_per_second) * ttl.as_secs_f64(),
            slot_nanos: (ttl.as_nanos() / SLOTS as u128).max(1),
            origin: Instant::now(),
            slots: Mutex::new([Slot::default(); SLOTS]),
        })
    }

    fn slot<'a>(&self, slots: &'a mut [Slot; SLOTS]) -> &'a mut Slot {
        let epoch = (Instant::now()
            .saturating_duration_since(self.origin)
            .as_nanos()
            / self.slot_nanos) as u64;
        let s = &mut slots[(epoch % SLOTS as u64) as usize];
        if s.epoch != epoch {
            *s = Slot {
                epoch,
                deposits: 0,
                withdrawals: 0,
            };
        }
        s
    }

    /// Records one original request.
    pub fn deposit(&self) {
        let mut slots = self.slots.lock().unwrap_or_else(|e| e.into_inner());
        self.slot(&mut slots).deposits += 1;
    }

    /// Takes a retry from the budget, if there is one left.
    pub fn try_withdraw(&self) -> bool {
        let mut slots = self.slots.lock().unwrap_or_else(|e| e.into_inner());
        let epoch = self.slot(&mut slots).epoch;
        let (d, w) = slots
            .iter()
            .filter(|s| s.epoch <= epoch && epoch - s.epoch < SLOTS as u64)
            .fold((0u64, 0u64), |(d, w), s| {
                (d + s.deposits, w + s.withdrawals)
            });
        if self.ratio * d as f64 + self.reserve - w as f64 >= 1.0 {
            self.slot(&mut slots).withdrawals += 1;
            true
        } else {
            false
        }
    }
}

#[derive(Debug)]
pub struct RetryPolicy {
    pub attempts: u32,
    pub base: Duration,
    pub max: Duration,
    pub retry_non_idempotent: bool,
    pub budget: Arc<RetryBudget>,
    pub metrics: RetryMetrics,
}

impl RetryPolicy {
    pub fn new(cfg: &RetryConfig, budget: Arc<RetryBudget>, metrics: RetryMetrics) -> Self {
        RetryPolicy {
            attempts: cfg.attempts,
            base: Duration::from_millis(cfg.backoff_base_ms),
            max: Duration::from_millis(cfg.backoff_max_ms),
            retry_non_idempotent: cfg.retry_non_idempotent,
            budget,
            metrics,
        }
    }

    /// Full jitter: uniform in `[0, min(max, base * 2^(retry-1))]`.
    pub fn backoff(&self, retry: u32) -> Duration {
        let cap = self
            .base
            .saturating_mul(
                1u32.checked_shl(retry.saturating_sub(1))
                    .unwrap_or(u32::MAX),
            )
            .min(self.max);
        cap.mul_f64(crate::trace::random_f64())
    }
}

pub fn is_idempotent(m: &Method) -> bool {
    matches!(
        *m,
        Method::GET | Method::HEAD | Method::OPTIONS | Method::TRACE | Method::PUT | Method::DELETE
    )
}

fn is_retryable(resp: &Resp) -> bool {
    match rejection(resp) {
        Some(Reason::UpstreamConnect | Reason::UpstreamError) => true,
        Some(_) => false,
        None => resp.status().is_server_error(),
    }
}

#[derive(Clone, Debug)]
pub struct RetryLayer {
    policy: Arc<RetryPolicy>,
}

impl RetryLayer {
    pub fn new(policy: RetryPolicy) -> Self {
        RetryLayer {
            policy: Arc::new(policy),
        }
    }
}

impl<S> Layer<S> for RetryLayer {
    type Service = Retry<S>;
    fn layer(&self, inner: S) -> Retry<S> {
        Retry {
            inner,
            policy: self.policy.clone(),
        }
    }
}

#[derive(Clone, Debug)]
pub struct Retry<S> {
    inner: S,
    policy: Arc<RetryPolicy>,
}

fn rebuild(parts: &http::request::Parts, bytes: &Bytes) -> Req {
    let body = if bytes.is_empty() {
        body::empty()
    } else {
        body::full(bytes.clone())
    };
    let mut req = Request::new(body);
    *req.method_mut() = parts.method.clone();
    *req.uri_mut() = parts.uri.clone();
    *req.version_mut() = parts.version;
    *req.headers_mut() = parts.headers.clone();
    *req.extensions_mut() = parts.extensions.clone();
    req
}

impl<S> Service<Req> for Retry<S>
where
    S: Service<Req, Response = Resp, Error = Infallible> + Clone + Send + 'static,
    S::Future: Send + 'static,
{
    type Response = Resp;
    type Error = Infallible;
    type Future = BoxFuture;
    always_ready!();

    fn call(&mut self, req: Req) -> BoxFuture {
        let policy = self.policy.clone();
        policy.budget.deposit();
        let method_ok = policy.retry_non_idempotent || is_idempotent(req.method());
        let replayable = match content_length(req.headers()) {
            Ok(Some(n)) => n <= MAX_RETRY_BODY,
            Ok(None) => req.body().is_end_stream(),
            Err(_) => false,
        };
        if policy.attempts <= 1 || !method_ok || !replayable {
            return Box::pin(self.inner.call(req));
        }
        let mut inner = self.inner.clone();
        Box::pin(async move {
            let deadline = deadline_of(&req);
            let (parts, body) = req.into_parts();
            let bytes = match body.collect().await {
                Ok(c) => c.to_bytes(),
                Err(e) => {
                    tracing::debug!(error = %e, "request body failed while buffering for retries");
                    return Ok(reject(Reason::BadRequest));
                }
            };
            let mut attempt = 1;
            loop {
                let mut resp = inner.call(rebuild(&parts, &bytes)).await?;
                if attempt >= policy.attempts || !is_retryable(&resp) {
                    return Ok(resp);
                }
                let backoff = policy.backoff(attempt);
                if deadline.is_some_and(|d| Instant::now() + backoff >= d) {
                    return Ok(resp);
                }
                if !policy.budget.try_withdraw() {
                    policy.metrics.refused_by_budget.inc();
                    if !resp.headers().contains_key(REASON_HEADER) {
                        resp.headers_mut()
                            .insert(REASON_HEADER, Reason::RetryBudget.header_value());
                    }
                    return Ok(resp);
                }
                drop(resp);
                policy.metrics.attempted.inc();
                tokio::time::sleep(backoff).await;
                attempt += 1;
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::layers::testing::*;
    use std::sync::atomic::{AtomicU32, Ordering};
    use tower::ServiceExt;

    fn budget(ratio: f64, min_per_second: u32, ttl_ms: u64) -> Arc<RetryBudget> {
        RetryBudget::new(&RetryBudgetConfig {
            ratio,
            min_per_second,
            ttl_ms,
        })
    }

    fn policy(attempts: u32, b: Arc<RetryBudget>) -> (RetryPolicy, RetryMetrics) {
        let m = RetryMetrics::default();
        let p = RetryPolicy {
            attempts,
            base: Duration::from_millis(10),
            max: Duration::from_millis(100),
            retry_non_idempotent: false,
            budget: b,
            metrics: m.clone(),
        };
        (p, m)
    }

    /// Fails `failures` times with `code` then answers 200; counts calls and checks bodies.
    fn flapping(
        failures: u32,
        code: u16,
    ) -> (
        impl Service<Req, Response = Resp, Error = Infallible, Future = BoxFuture>
        + Clone
        + Send
        + 'static,
        Arc<AtomicU32>,
    ) {
        let calls = Arc::new(AtomicU32::new(0));
        let c2 = calls.clone();
        let svc = tower::service_fn(move |req: Req| -> BoxFuture {
            let n = c2.fetch_add(1, Ordering::SeqCst);
            Box::pin(async move {
                let body = read_all(req.into_body()).await.unwrap();
                if n < failures {
                    return Ok(if code == 0 {
                        reject(Reason::UpstreamConnect)
                    } else {
                        status(code)
                    });
                }
                Ok(http::Response::new(body::full(body)))
            })
        });
        (svc, calls)
    }

    #[tokio::test(start_paused = true)]
    async fn budget_allows_ratio_plus_floor() {
        let b = budget(0.2, 1, 10_000); // floor: 1/s * 10 s = 10 retries
        for _ in 0..10 {
            assert!(b.try_withdraw());
        }
        assert!(!b.try_withdraw(), "floor spent");
        for _ in 0..10 {
            b.deposit();
        }
        assert!(b.try_withdraw(), "10 requests * 0.2 = 2 more");
        assert!(b.try_withdraw());
        assert!(!b.try_withdraw());
        tokio::time::advance(Duration::from_secs(10)).await;
        assert!(
            b.try_withdraw(),
            "everything expired after ttl: floor available again"
        );
    }

    #[test]
    fn backoff_is_full_jitter_capped() {
        let (p, _) = policy(5, budget(0.2, 10, 10_000));
        for retry in 1..8 {
            let cap = Duration::from_millis((10u64 << (retry - 1)).min(100));
            for _ in 0..200 {
                assert!(p.backoff(retry) <= cap);
            }
        }
        let distinct: std::collections::HashSet<_> = (0..50).map(|_| p.backoff(3)).collect();
        assert!(distinct.len() > 10, "jittered");
    }

    #[tokio::test(start_paused = true)]
    async fn retries_5xx_and_connect_errors_with_the_body() {
        for code in [503, 0] {
            let (p, m) = policy(3, budget(0.2, 10, 10_000));
            let (inner, calls) = flapping(2, code);
            let svc = RetryLayer::new(p).layer(inner);
            let req = Request::put("/")
                .header("content-length", "5")
                .body(body::full("hello"))
                .unwrap();
            let resp = svc.oneshot(req).await.unwrap();
            assert_eq!(resp.status(), 200);
            assert_eq!(
                body_string(resp.into_body()).await,
                "hello",
                "the body is replayed"
            );
            assert_eq!(calls.load(Ordering::SeqCst), 3);
            assert_eq!(m.attempted.get(), 2);
        }
    }

    #[tokio::test(start_paused = true)]
    async fn gives_up_after_attempts() {
        let (p, _) = policy(3, budget(0.2, 10, 10_000));
        let (inner, calls) = flapping(10, 500);
        let resp = RetryLayer::new(p)
            .layer(inner)
            .oneshot(get("/"))
            .await
            .unwrap();
        assert_eq!(resp.status(), 500);
        assert_eq!(calls.load(Ordering::SeqCst), 3);
    }

    #[tokio::test(start_paused = true)]
    async fn post_is_not_retried_unless_allowed() {
        let (p, _) = policy(3, budget(0.2, 10, 10_000));
        let (inner, calls) = flapping(1, 503);
        let req = Request::post("/").body(body::empty()).unwrap();
        let resp = RetryLayer::new(p).layer(inner).oneshot(req).await.unwrap();
        assert_eq!(resp.status(), 503);
        assert_eq!(calls.load(Ordering::SeqCst), 1);

        let (mut p, _) = policy(3, budget(0.2, 10, 10_000));
        p.retry_non_idempotent = true;
        let (inner, calls) = flapping(1, 503);
        let req = Request::post("/").body(body::empty()).unwrap();
        assert_eq!(
            RetryLayer::new(p)
                .layer(inner)
                .oneshot(req)
                .await
                .unwrap()
                .status(),
            200
        );
        assert_eq!(calls.load(Ordering::SeqCst), 2);
    }

    #[tokio::test(start_paused = true)]
    async fn large_bodies_are_not_retried() {
        let (p, _) = policy(3, budget(0.2, 10, 10_000));
        let (inner, calls) = flapping(1, 503);
        let big = vec![b'x'; MAX_RETRY_BODY as usize + 1];
        let req = Request::put("/")
            .header("content-length", big.len())
            .body(body::full(big))
            .unwrap();
        assert_eq!(
            RetryLayer::new(p)
                .layer(inner)
                .oneshot(req)
                .await
                .unwrap()
                .status(),
            503
        );
        assert_eq!(calls.load(Ordering::SeqCst), 1);
    }

    #[tokio::test(start_paused = true)]
    async fn budget_refuses_retries_under_total_outage() {
        // Floor 1/s over 10 s = 10 retries, plus 20% of requests.
        let (p, m) = policy(3, budget(0.2, 1, 10_000));
        let (inner, calls) = flapping(u32::MAX, 503);
        let svc = RetryLayer::new(p).layer(inner);
        let mut refused_marked = 0;
        for _ in 0..100 {
            let resp = svc.clone().oneshot(get("/")).await.unwrap();
            assert_eq!(resp.status(), 503);
            if resp
                .headers()
                .get(REASON_HEADER)
                .is_some_and(|v| v == "retry-budget")
            {
                refused_marked += 1;
            }
        }
        let retries = m.attempted.get();
        // 100 requests: at most 0.2 * 100 + 10 = 30 retries, far below 200 without a budget.
        assert!((25..=30).contains(&retries), "retries {retries}");
        assert_eq!(calls.load(Ordering::SeqCst) as u64, 100 + retries);
        assert!(m.refused_by_budget.get() >= 70);
        assert_eq!(refused_marked, m.refused_by_budget.get());
    }

    #[tokio::test(start_paused = true)]
    async fn stops_at_the_deadline() {
        let (mut p, _) = policy(10, budget(0.2, 100, 10_000));
        p.base = Duration::from_secs(1);
        p.max = Duration::from_secs(1);
        let (inner, calls) = flapping(u32::MAX, 503);
        let mut req = get("/");
        req.extensions_mut().insert(crate::layers::Deadline(
            Instant::now() + Duration::from_millis(500),
        ));
        let start = Instant::now();
        let resp = RetryLayer::new(p).layer(inner).oneshot(req).await.unwrap();
        assert_eq!(resp.status(), 503);
        assert!(start.elapsed() < Duration::from_millis(500));
        assert!(calls.load(Ordering::SeqCst) < 10);
    }
}
