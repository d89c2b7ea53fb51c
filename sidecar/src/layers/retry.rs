//! Retries with exponential backoff and full jitter, bounded by a retry budget.
//!
//! - Only idempotent methods (GET, HEAD, OPTIONS, TRACE, PUT, DELETE) are retried, unless
//!   `retryNonIdempotent` is set.
//! - A response is retried when it is a 5xx from the upstream, or the proxy could not reach the
//!   upstream (`upstream-connect`, `upstream-error`). A breaker rejection is never retried.
//! - gRPC calls (any method) are retried only on a Trailers-Only `UNAVAILABLE`, never once a
//!   message of the answer has been passed on.
//! - Request bodies up to 64 KiB (declared by `Content-Length`) are buffered so they can be sent
//!   again; larger or streamed bodies are sent once. A gRPC body (streamed, no length) is sent
//!   as it comes while a copy of up to 64 KiB is kept: a call is sent again only if its body
//!   ended within that (a unary call; a client stream that outgrew it is not retried).
//! - The n-th retry waits a random time in `[0, min(backoffMaxMs, backoffBaseMs * 2^(n-1))]`,
//!   and never past the request's deadline.
//! - Budget: every request deposits `ratio`, every retry withdraws one; a retry is allowed only
//!   if, with it, every sliding window of `ttl` holds at most
//!   `ratio * requests + minPerSecond * ttl_seconds` retries ([`RetryBudget`]). A refused retry
//!   returns the failed response with `x-weir-reason: retry-budget` added (unless the proxy
//!   already named a reason). A request whose body broke on the client's side deposits nothing.

use crate::body::{
    self, ClientBodyError, REASON_HEADER, Reason, Req, Resp, reject, reject_closing, rejection,
};
use crate::layers::body_limit::content_length;
use crate::layers::{BoxFuture, always_ready, deadline_of, grpc};
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
/// The budget's window is kept in this many slots of `ttl / SLOTS` each (plus the current one).
const SLOTS: usize = 100;
/// One retry, in the budget's fixed-point unit (a deposit of `ratio` is `ratio * UNIT`, rounded
/// down, so rounding never adds to the budget).
const UNIT: i128 = 1_000_000;

/// The highest balance held during one slot of time.
#[derive(Clone, Copy, Debug)]
struct Slot {
    /// `u64::MAX` for a slot never used.
    epoch: u64,
    peak: i128,
}

#[derive(Debug)]
struct Ledger {
    /// `ratio * deposits - retries` since the budget was made, in [`UNIT`]s.
    balance: i128,
    slots: [Slot; SLOTS + 1],
}

/// The retry budget: over every window of `ttl` (sliding, not aligned to anything), retries
/// are at most `ratio * requests + minPerSecond * ttl` of the same window.
///
/// Why it holds: let `B(t)` be the balance, `ratio * deposits - withdrawals` up to time `t`.
/// For a window `(s, t]`, `withdrawals - ratio * deposits = B(s) - B(t)`, so the bound holds for
/// every window ending at `t` when `B(t) + reserve >= max B(s)` over `s` in `[t - ttl, t)`. A
/// withdrawal is allowed only when that holds afterwards, and a window's count can only grow
/// at its withdrawals (deposits coming later only help), so checking at each withdrawal bounds
/// every window. The maximum over the last `ttl` is kept per slot of `ttl / SLOTS`: the peak
/// balance held during the slot, starting with the balance carried into it. The oldest slot may
/// reach back up to one slot before `t - ttl`, which only makes the check stricter: the budget
/// never exceeds its bound, and at worst refuses a retry the exact window would have allowed.
///
/// Why not sums over whole buckets: retries spent in a bucket are forgotten as soon as the
/// bucket falls out, up to a bucket's width before `ttl` has passed, so a dependency that stays
/// down gets a second burst of retries inside one window.
#[derive(Debug)]
pub struct RetryBudget {
    per_request: i128,
    reserve: i128,
    slot_nanos: u128,
    origin: Instant,
    ledger: Mutex<Ledger>,
}

impl RetryBudget {
    pub fn new(cfg: &RetryBudgetConfig) -> Arc<Self> {
        let ttl = Duration::from_millis(cfg.ttl_ms.max(1));
        let unit = UNIT as f64;
        Arc::new(RetryBudget {
            // Float to integer casts saturate; validation keeps the ratio in [0, 1].
            per_request: (cfg.ratio.clamp(0.0, 1.0) * unit).floor() as i128,
            reserve: (f64::from(cfg.min_per_second) * ttl.as_secs_f64() * unit).floor() as i128,
            slot_nanos: (ttl.as_nanos() / SLOTS as u128).max(1),
            origin: Instant::now(),
            ledger: Mutex::new(Ledger {
                balance: 0,
                slots: [Slot {
                    epoch: u64::MAX,
                    peak: 0,
                }; SLOTS + 1],
            }),
        })
    }

    /// The slot of the current time, opened with the balance carried into it if new.
    fn current(&self, l: &mut Ledger) -> (u64, usize) {
        let epoch = (Instant::now()
            .saturating_duration_since(self.origin)
            .as_nanos()
            / self.slot_nanos) as u64;
        let i = (epoch % (SLOTS as u64 + 1)) as usize;
        if l.slots[i].epoch != epoch {
            l.slots[i] = Slot {
                epoch,
                peak: l.balance,
            };
        }
        (epoch, i)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Ledger> {
        self.ledger.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Records one original request.
    pub fn deposit(&self) {
        let mut l = self.lock();
        let (_, i) = self.current(&mut l);
        l.balance += self.per_request;
        l.slots[i].peak = l.slots[i].peak.max(l.balance);
    }

    /// Takes a retry from the budget, if there is one left.
    pub fn try_withdraw(&self) -> bool {
        let mut l = self.lock();
        let (epoch, _) = self.current(&mut l);
        let peak = l
            .slots
            .iter()
            .filter(|s| s.epoch <= epoch && epoch - s.epoch <= SLOTS as u64)
            .map(|s| s.peak)
            .max()
            .unwrap_or(l.balance);
        if l.balance - UNIT + self.reserve >= peak {
            l.balance -= UNIT;
            true
        } else {
            false
        }
    }
}

/// A request's deposit into the budget, made when its first attempt is answered (or when the
/// request is abandoned: a timeout, the caller gone) — unless the request's own body broke on
/// the client's side: a broken upload says nothing about the dependency, so it must not earn
/// retries for other requests either.
struct Deposit(Option<Arc<RetryBudget>>);

impl Deposit {
    fn settle(mut self, resp: &Resp) {
        if let Some(b) = self.0.take()
            && rejection(resp) != Some(Reason::ClientBodyError)
        {
            b.deposit();
        }
    }

    fn cancel(mut self) {
        self.0 = None;
    }
}

impl Drop for Deposit {
    fn drop(&mut self) {
        if let Some(b) = self.0.take() {
            b.deposit();
        }
    }
}

#[derive(Debug)]
pub struct RetryPolicy {
    pub attempts: u32,
    pub base: Duration,
    pub max: Duration,
    pub retry_non_idempotent: bool,
    /// gRPC statuses retried.
    pub grpc_statuses: Vec<u16>,
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
            grpc_statuses: cfg.grpc_statuses.clone(),
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

fn is_retryable(resp: &Resp, grpc: Option<&[u16]>) -> bool {
    match rejection(resp) {
        Some(Reason::UpstreamConnect | Reason::UpstreamError) => true,
        Some(_) => false,
        // A gRPC answer is retried on its status, when it came before any message
        // (Trailers-Only); once a message has come, the caller has it. An HTTP status from a
        // hop that does not speak gRPC counts as gRPC maps it (429, 502, 503, 504: UNAVAILABLE).
        None if grpc.is_some() => match grpc::status_in_headers(resp) {
            Some(code) => grpc.is_some_and(|codes| codes.contains(&code)),
            None => matches!(resp.status().as_u16(), 429 | 502 | 503 | 504),
        },
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

fn rebuild(parts: &http::request::Parts, body: body::BoxBody) -> Req {
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
        let deposit = Deposit(Some(policy.budget.clone()));
        let grpc = grpc::is_marked(&req);
        // A gRPC call may be retried whatever its method (POST, always): the status says
        // whether it was processed (`UNAVAILABLE`: not).
        let method_ok = grpc || policy.retry_non_idempotent || is_idempotent(req.method());
        let length = content_length(req.headers());
        let replayable = match length {
            Ok(Some(n)) => n <= MAX_RETRY_BODY,
            Ok(None) => req.body().is_end_stream(),
            Err(_) => false,
        };
        // A gRPC body of unknown length is sent as it comes and copied on the way: held back,
        // a stream whose client waits for an answer before ending would never start.
        let teed = grpc && !replayable && matches!(length, Ok(None));
        if policy.attempts <= 1 || !method_ok || !(replayable || teed) {
            let fut = self.inner.call(req);
            return Box::pin(async move {
                let resp = fut.await?;
                deposit.settle(&resp);
                Ok(resp)
            });
        }
        let mut inner = self.inner.clone();
        Box::pin(async move {
            let deadline = deadline_of(&req);
            let (mut parts, body) = req.into_parts();
            let mut deposit = Some(deposit);
            let mut attempt = 1;
            let bytes = if teed {
                let (tee, copy) = tee::Tee::split(body, MAX_RETRY_BODY);
                let mut resp = inner.call(rebuild(&parts, tee)).await?;
                if let Some(d) = deposit.take() {
                    d.settle(&resp);
                }
                if attempt >= policy.attempts
                    || !is_retryable(&resp, grpc.then_some(policy.grpc_statuses.as_slice()))
                {
                    return Ok(resp);
                }
                let Some(backoff) = backoff_within(&policy, attempt, deadline) else {
                    return Ok(resp);
                };
                // The whole request must be in hand to be sent again; it usually is (a unary
                // call is sent before it is answered). Waited for no longer than the backoff.
                let until = Instant::now() + backoff.max(tee::MIN_WAIT);
                let until = deadline.map_or(until, |d| until.min(d));
                let Some(bytes) = copy.complete(until).await else {
                    return Ok(resp);
                };
                if !withdraw(&policy, &mut resp) {
                    return Ok(resp);
                }
                avoid_next(&mut parts, &resp);
                drop(resp);
                tokio::time::sleep_until(until.max(Instant::now())).await;
                attempt += 1;
                bytes
            } else {
                match body.collect().await {
                    Ok(c) => c.to_bytes(),
                    Err(e) => {
                        if let Some(d) = deposit.take() {
                            d.cancel();
                        }
                        tracing::warn!(error = %e, "request body failed while buffering for retries");
                        return Ok(if ClientBodyError::in_chain(&e).is_some() {
                            reject_closing(Reason::ClientBodyError)
                        } else {
                            reject(Reason::BadRequest)
                        });
                    }
                }
            };
            loop {
                let mut resp = inner.call(rebuild(&parts, replay(&bytes))).await?;
                if let Some(d) = deposit.take() {
                    d.settle(&resp);
                }
                if attempt >= policy.attempts
                    || !is_retryable(&resp, grpc.then_some(policy.grpc_statuses.as_slice()))
                {
                    return Ok(resp);
                }
                let Some(backoff) = backoff_within(&policy, attempt, deadline) else {
                    return Ok(resp);
                };
                if !withdraw(&policy, &mut resp) {
                    return Ok(resp);
                }
                avoid_next(&mut parts, &resp);
                drop(resp);
                tokio::time::sleep(backoff).await;
                attempt += 1;
            }
        })
    }
}

/// The next attempt goes elsewhere than the endpoint that failed this one, when the
/// dependency has another.
fn avoid_next(parts: &mut http::request::Parts, failed: &Resp) {
    if let Some(s) = failed.extensions().get::<crate::balance::ServedBy>() {
        parts.extensions.insert(crate::balance::Avoid(s.addr));
    }
}

/// The wait before retry `attempt + 1`, unless it would end past the deadline.
fn backoff_within(
    policy: &RetryPolicy,
    attempt: u32,
    deadline: Option<Instant>,
) -> Option<Duration> {
    let backoff = policy.backoff(attempt);
    if deadline.is_some_and(|d| Instant::now() + backoff >= d) {
        return None;
    }
    Some(backoff)
}

/// Takes a retry from the budget; when it is spent, says so on the failed answer.
fn withdraw(policy: &RetryPolicy, resp: &mut Resp) -> bool {
    if !policy.budget.try_withdraw() {
        policy.metrics.refused_by_budget.inc();
        if !resp.headers().contains_key(REASON_HEADER) {
            resp.headers_mut()
                .insert(REASON_HEADER, Reason::RetryBudget.header_value());
        }
        return false;
    }
    policy.metrics.attempted.inc();
    true
}

fn replay(bytes: &Bytes) -> body::BoxBody {
    if bytes.is_empty() {
        body::empty()
    } else {
        body::full(bytes.clone())
    }
}

mod tee {
    //! A request body passed on as it arrives while a copy of it is kept, up to a limit, so the
    //! request can be sent again once it has ended.

    use crate::body::{BodyError, BoxBody};
    use bytes::{Bytes, BytesMut};
    use http_body_util::BodyExt;
    use hyper::body::{Body, Frame};
    use std::pin::Pin;
    use std::sync::{Arc, Mutex};
    use std::task::{Context, Poll};
    use std::time::Duration;
    use tokio::sync::Notify;
    use tokio::time::Instant;

    /// Waited at least this long for the rest of a copy (a backoff may be zero).
    pub const MIN_WAIT: Duration = Duration::from_millis(20);

    #[derive(Default)]
    struct State {
        chunks: Vec<Bytes>,
        size: u64,
        /// The body ended, every byte copied.
        done: bool,
        /// Over the limit, trailers, or an error: the copy cannot be replayed.
        spoiled: bool,
        /// What the forwarding left unread when it dropped the body (an upstream that answered
        /// before reading it all): read here to complete the copy.
        rest: Option<BoxBody>,
    }

    struct Shared {
        state: Mutex<State>,
        changed: Notify,
        limit: u64,
    }

    impl Shared {
        fn lock(&self) -> std::sync::MutexGuard<'_, State> {
            self.state.lock().unwrap_or_else(|e| e.into_inner())
        }

        fn on_frame(&self, frame: &Poll<Option<Result<Frame<Bytes>, BodyError>>>) {
            let mut s = self.lock();
            match frame {
                Poll::Ready(Some(Ok(f))) => match f.data_ref() {
                    Some(d) if !s.spoiled => {
                        s.size += d.len() as u64;
                        if s.size > self.limit {
                            s.spoiled = true;
                            s.chunks = Vec::new();
                        } else {
                            s.chunks.push(d.clone());
                        }
                    }
                    Some(_) => {}
                    None => s.spoiled = true,
                },
                Poll::Ready(Some(Err(_))) => s.spoiled = true,
                Poll::Ready(None) => s.done = true,
                Poll::Pending => return,
            }
            drop(s);
            self.changed.notify_one();
        }
    }

    pub struct Tee {
        inner: Option<BoxBody>,
        shared: Arc<Shared>,
    }

    /// The copy's side.
    pub struct Kept(Arc<Shared>);

    impl Tee {
        pub fn split(inner: BoxBody, limit: u64) -> (BoxBody, Kept) {
            let shared = Arc::new(Shared {
                state: Mutex::new(State::default()),
                changed: Notify::new(),
                limit,
            });
            let tee = Tee {
                inner: Some(inner),
                shared: shared.clone(),
            };
            (tee.boxed_unsync(), Kept(shared))
        }
    }

    impl Body for Tee {
        type Data = Bytes;
        type Error = BodyError;

        fn poll_frame(
            mut self: Pin<&mut Self>,
            cx: &mut Context<'_>,
        ) -> Poll<Option<Result<Frame<Bytes>, BodyError>>> {
            let Some(inner) = self.inner.as_mut() else {
                return Poll::Ready(None);
            };
            let polled = Pin::new(inner).poll_frame(cx);
            self.shared.on_frame(&polled);
            polled
        }

        fn is_end_stream(&self) -> bool {
            self.inner.as_ref().is_none_or(|b| b.is_end_stream())
        }
    }

    impl Drop for Tee {
        fn drop(&mut self) {
            let mut s = self.shared.lock();
            if !s.done && !s.spoiled {
                s.rest = self.inner.take();
            }
            drop(s);
            self.shared.changed.notify_one();
        }
    }

    impl Kept {
        /// The whole body, once it has ended within the limit, by `until`; `None` otherwise.
        pub async fn complete(self, until: Instant) -> Option<Bytes> {
            loop {
                let rest = {
                    let mut s = self.0.lock();
                    if s.spoiled {
                        return None;
                    }
                    if s.done {
                        let mut all = BytesMut::with_capacity(s.size as usize);
                        for c in &s.chunks {
                            all.extend_from_slice(c);
                        }
                        return Some(all.freeze());
                    }
                    s.rest.take()
                };
                match rest {
                    // Read what the forwarding left, through a Tee of the same copy.
                    Some(rest) => {
                        let mut tee = Tee {
                            inner: Some(rest),
                            shared: self.0.clone(),
                        };
                        loop {
                            let next = std::future::poll_fn(|cx| Pin::new(&mut tee).poll_frame(cx));
                            match tokio::time::timeout_at(until, next).await {
                                Ok(Some(Ok(_))) => {
                                    if self.0.lock().spoiled {
                                        return None;
                                    }
                                }
                                Ok(None) => break,
                                Ok(Some(Err(_))) | Err(_) => return None,
                            }
                        }
                    }
                    None => {
                        if tokio::time::timeout_at(until, self.0.changed.notified())
                            .await
                            .is_err()
                        {
                            return None;
                        }
                    }
                }
            }
        }
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
            grpc_statuses: vec![14],
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
        tokio::time::advance(Duration::from_millis(9_900)).await;
        assert!(
            !b.try_withdraw(),
            "the retries spent are still in the window"
        );
        // The window is kept in slots of ttl / 100: one slot past ttl, all of it has expired.
        tokio::time::advance(Duration::from_millis(200)).await;
        assert!(
            b.try_withdraw(),
            "everything expired after ttl: floor available again"
        );
    }

    /// The outage of issue #15: 200 requests/s, each wanting two retries, against a dependency
    /// that stays down, starting half a second into the budget's life. Every sliding window of
    /// `ttl` (not only those aligned with the budget's slots) must hold at most
    /// `ratio * requests + minPerSecond * ttl` retries of the same window.
    #[tokio::test(start_paused = true)]
    async fn budget_holds_over_every_sliding_window() {
        let ttl = Duration::from_secs(10);
        let (ratio, floor) = (0.2, 10);
        let b = budget(ratio, floor, ttl.as_millis() as u64);
        tokio::time::advance(Duration::from_millis(500)).await;
        let start = Instant::now();
        let (mut deposits, mut withdrawals) = (Vec::new(), Vec::new());
        while start.elapsed() < Duration::from_secs(25) {
            b.deposit();
            deposits.push(start.elapsed());
            for _ in 0..2 {
                if !b.try_withdraw() {
                    break;
                }
                withdrawals.push(start.elapsed());
            }
            tokio::time::advance(Duration::from_millis(5)).await;
        }
        let reserve = f64::from(floor) * ttl.as_secs_f64();
        let in_window = |v: &[Duration], end: Duration| {
            v.iter()
                .filter(|t| **t <= end && end.saturating_sub(**t) < ttl)
                .count()
        };
        // A window's count only grows at its withdrawals: checking the windows that end at
        // each withdrawal checks them all.
        let mut worst = (f64::NEG_INFINITY, Duration::ZERO, 0, 0);
        for &end in &withdrawals {
            let (w, d) = (in_window(&withdrawals, end), in_window(&deposits, end));
            let excess = w as f64 - (ratio * d as f64 + reserve);
            if excess > worst.0 {
                worst = (excess, end, w, d);
            }
        }
        let (excess, end, w, d) = worst;
        println!(
            "{} requests, {} retries in 25 s; closest window: {w} retries against {d} requests, \
             ending at {end:?} (excess {excess:.1})",
            deposits.len(),
            withdrawals.len()
        );
        assert!(
            excess <= 0.0,
            "{w} retries against {d} requests in the 10 s window ending at {end:?}: \
             the bound is {}",
            ratio * d as f64 + reserve
        );
        // The budget is not starved either: at least 95 % of the bound over the run's first
        // window (the check is exact up to one slot of ttl / 100).
        let first = in_window(&withdrawals, ttl - Duration::from_millis(5));
        let bound = ratio * in_window(&deposits, ttl - Duration::from_millis(5)) as f64 + reserve;
        println!("first window: {first} retries, bound {bound}");
        assert!(
            first as f64 >= 0.95 * bound,
            "{first} retries, bound {bound}"
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
        // No wait is begun that would end past the deadline; tokio's timer wakes a sleep at
        // the next whole millisecond, so the last attempt may start up to 1 ms after the
        // instant the wait was computed to end (before the deadline).
        assert!(
            start.elapsed() <= Duration::from_millis(501),
            "{:?}",
            start.elapsed()
        );
        assert!(calls.load(Ordering::SeqCst) < 10);
    }
}
