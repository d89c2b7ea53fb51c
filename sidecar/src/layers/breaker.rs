//! Circuit breaker: a rolling window of calls and failures, open, half-open with one trial call.
//!
//! A rolling window of `rollingWindowMs` split into `buckets` buckets counts calls and failures.
//! Closed: calls pass; after each result, if the window holds at least `volumeThreshold` calls and
//! `failures * 100 > errorThresholdPercentage * calls` (strictly), it opens. Open: calls are
//! rejected at once (503 `circuit-open`). After `resetTimeoutMs` the next call is let through as
//! the single trial (half-open); every other call is rejected while it runs. The trial's success
//! closes the breaker (window cleared), its failure re-opens it for another `resetTimeoutMs`. A
//! trial abandoned without a result (caller gone) frees the trial slot for the next call.
//! What counts as a failure (5xx, connect errors, timeouts) comes from the config; a request whose
//! body broke on the client's side (`client-body-error`) is not counted at all. Every transition
//! is logged and counted.

use crate::body::{Reason, Req, Resp, reject, rejection};
use crate::layers::{BoxFuture, always_ready, grpc};
use crate::metrics::BreakerMetrics;
use prometheus_client::metrics::counter::Counter;
use std::convert::Infallible;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::time::Instant;
use tower::{Layer, Service};
use weir_crds::proxy::{CircuitBreakerConfig, FailureClassConfig};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum State {
    Closed,
    Open,
    HalfOpen,
}

impl State {
    pub const fn as_str(self) -> &'static str {
        match self {
            State::Closed => "closed",
            State::Open => "open",
            State::HalfOpen => "half_open",
        }
    }
    const fn index(self) -> usize {
        match self {
            State::Closed => 0,
            State::Open => 1,
            State::HalfOpen => 2,
        }
    }
}

#[derive(Clone, Copy, Debug)]
enum St {
    Closed,
    Open { until: Instant },
    HalfOpen { trial_in_flight: bool },
}

impl St {
    fn public(self) -> State {
        match self {
            St::Closed => State::Closed,
            St::Open { .. } => State::Open,
            St::HalfOpen { .. } => State::HalfOpen,
        }
    }
}

#[derive(Clone, Copy, Debug, Default)]
struct Bucket {
    epoch: u64,
    calls: u32,
    failures: u32,
}

#[derive(Debug)]
struct Inner {
    state: St,
    buckets: Vec<Bucket>,
}

#[derive(Debug)]
pub struct Breaker {
    dependency: Arc<str>,
    threshold: u64,
    volume: u64,
    bucket_nanos: u128,
    reset: Duration,
    failure_on: FailureClassConfig,
    origin: Instant,
    metrics: BreakerMetrics,
    rejected: Counter,
    inner: Mutex<Inner>,
}

/// A call admitted by the breaker; report its outcome with [`Permit::record`].
#[derive(Debug)]
pub struct Permit {
    breaker: Arc<Breaker>,
    trial: bool,
    done: bool,
}

impl Permit {
    pub fn record(mut self, failure: bool) {
        self.done = true;
        self.breaker.on_result(self.trial, failure);
    }
}

impl Drop for Permit {
    fn drop(&mut self) {
        if self.trial && !self.done {
            self.breaker.release_trial();
        }
    }
}

impl Breaker {
    pub fn new(
        dependency: &str,
        cfg: &CircuitBreakerConfig,
        metrics: BreakerMetrics,
        rejected: Counter,
    ) -> Arc<Self> {
        metrics.state.set(0);
        Arc::new(Breaker {
            dependency: dependency.into(),
            threshold: u64::from(cfg.error_threshold_percentage),
            volume: u64::from(cfg.volume_threshold),
            bucket_nanos: (u128::from(cfg.rolling_window_ms) * 1_000_000
                / u128::from(cfg.buckets.max(1)))
            .max(1),
            reset: Duration::from_millis(cfg.reset_timeout_ms),
            failure_on: cfg.failure_on.clone(),
            origin: Instant::now(),
            metrics,
            rejected,
            inner: Mutex::new(Inner {
                state: St::Closed,
                buckets: vec![Bucket::default(); cfg.buckets.max(1) as usize],
            }),
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub fn state(&self) -> State {
        self.lock().state.public()
    }

    /// Calls and failures currently in the rolling window.
    pub fn window(&self) -> (u64, u64) {
        let now = self.epoch(Instant::now());
        self.totals(&self.lock(), now)
    }

    fn epoch(&self, now: Instant) -> u64 {
        (now.saturating_duration_since(self.origin).as_nanos() / self.bucket_nanos) as u64
    }

    fn totals(&self, inner: &Inner, epoch: u64) -> (u64, u64) {
        let n = inner.buckets.len() as u64;
        inner
            .buckets
            .iter()
            .filter(|b| b.epoch <= epoch && epoch - b.epoch < n)
            .fold((0, 0), |(c, f), b| {
                (c + u64::from(b.calls), f + u64::from(b.failures))
            })
    }

    fn transition(&self, inner: &mut Inner, to: St) {
        let from = inner.state.public();
        inner.state = to;
        let to = to.public();
        if matches!(to, State::Closed | State::Open) {
            inner
                .buckets
                .iter_mut()
                .for_each(|b| *b = Bucket::default());
        }
        self.metrics.state.set(to.index() as i64);
        self.metrics.transitions[to.index()].inc();
        tracing::warn!(
            dependency = &*self.dependency,
            from = from.as_str(),
            to = to.as_str(),
            "circuit breaker transition"
        );
    }

    /// Admits a call or refuses it (open, or half-open with the trial in flight).
    pub fn try_acquire(self: &Arc<Self>) -> Option<Permit> {
        let mut inner = self.lock();
        let trial = match inner.state {
            St::Closed => false,
            St::Open { until } => {
                if Instant::now() < until {
                    return None;
                }
                self.transition(
                    &mut inner,
                    St::HalfOpen {
                        trial_in_flight: true,
                    },
                );
                true
            }
            St::HalfOpen {
                trial_in_flight: true,
            } => return None,
            St::HalfOpen {
                trial_in_flight: false,
            } => {
                inner.state = St::HalfOpen {
                    trial_in_flight: true,
                };
                true
            }
        };
        Some(Permit {
            breaker: self.clone(),
            trial,
            done: false,
        })
    }

    fn release_trial(&self) {
        let mut inner = self.lock();
        if let St::HalfOpen {
            trial_in_flight: true,
        } = inner.state
        {
            inner.state = St::HalfOpen {
                trial_in_flight: false,
            };
        }
    }

    fn on_result(&self, trial: bool, failure: bool) {
        let now = Instant::now();
        let mut inner = self.lock();
        if trial {
            if let St::HalfOpen { .. } = inner.state {
                let to = if failure {
                    St::Open {
                        until: now + self.reset,
                    }
                } else {
                    St::Closed
                };
                self.transition(&mut inner, to);
            }
            return;
        }
        // A result of a call admitted while closed; ignored if the breaker has moved on since.
        if !matches!(inner.state, St::Closed) {
            return;
        }
        let epoch = self.epoch(now);
        let n = inner.buckets.len();
        let b = &mut inner.buckets[(epoch % n as u64) as usize];
        if b.epoch != epoch {
            *b = Bucket {
                epoch,
                calls: 0,
                failures: 0,
            };
        }
        b.calls += 1;
        b.failures += u32::from(failure);
        let (calls, failures) = self.totals(&inner, epoch);
        if calls >= self.volume && failures * 100 > self.threshold * calls {
            self.transition(
                &mut inner,
                St::Open {
                    until: now + self.reset,
                },
            );
        }
    }

    /// Whether a gRPC status counts as a failure (`failureOn.grpcStatuses`).
    pub fn is_grpc_failure(&self, code: u16) -> bool {
        self.failure_on.grpc_statuses.contains(&code)
    }

    /// Whether a response counts as a failure under `failureOn`.
    pub fn is_failure(&self, resp: &Resp) -> bool {
        match rejection(resp) {
            Some(Reason::Timeout) => self.failure_on.timeouts,
            Some(Reason::UpstreamConnect | Reason::UpstreamError) => self.failure_on.connect_errors,
            Some(_) => false,
            None => self.failure_on.status_5xx && resp.status().is_server_error(),
        }
    }
}

#[derive(Clone, Debug)]
pub struct BreakerLayer {
    breaker: Arc<Breaker>,
}

impl BreakerLayer {
    pub fn new(breaker: Arc<Breaker>) -> Self {
        BreakerLayer { breaker }
    }
}

impl<S> Layer<S> for BreakerLayer {
    type Service = CircuitBreaker<S>;
    fn layer(&self, inner: S) -> CircuitBreaker<S> {
        CircuitBreaker {
            inner,
            breaker: self.breaker.clone(),
        }
    }
}

#[derive(Clone, Debug)]
pub struct CircuitBreaker<S> {
    inner: S,
    breaker: Arc<Breaker>,
}

impl<S> Service<Req> for CircuitBreaker<S>
where
    S: Service<Req, Response = Resp, Error = Infallible>,
    S::Future: Send + 'static,
{
    type Response = Resp;
    type Error = Infallible;
    type Future = BoxFuture;
    always_ready!();

    fn call(&mut self, req: Req) -> BoxFuture {
        let Some(permit) = self.breaker.try_acquire() else {
            self.breaker.rejected.inc();
            return Box::pin(std::future::ready(Ok(reject(Reason::CircuitOpen))));
        };
        let breaker = self.breaker.clone();
        let is_grpc = grpc::is_marked(&req);
        let fut = self.inner.call(req);
        Box::pin(async move {
            let resp = fut.await?;
            // A request whose body broke on the client's side tells nothing about the
            // dependency: not a call of the window at all (dropping the permit frees a trial).
            if rejection(&resp) == Some(Reason::ClientBodyError) {
                return Ok(resp);
            }
            // An endpoint's failure that got it ejected while others still take requests is
            // the balancer's to handle: not a call of the dependency's window either.
            if resp
                .extensions()
                .get::<crate::balance::ServedBy>()
                .is_some_and(|s| s.spared)
            {
                return Ok(resp);
            }
            if is_grpc && rejection(&resp).is_none() {
                // A gRPC call is judged by its status: in the headers of a Trailers-Only
                // answer, else in the trailers once the stream ends (the permit goes with it).
                if let Some(code) = grpc::status_in_headers(&resp) {
                    permit.record(breaker.is_grpc_failure(code));
                    return Ok(resp);
                }
                if resp.status() == http::StatusCode::OK {
                    let (parts, body) = resp.into_parts();
                    let failure_on_broken = breaker.failure_on.connect_errors;
                    let body = grpc::OnStatus::wrap(body, move |ended| {
                        let failure = match ended {
                            grpc::Ended::Status(code) => breaker.is_grpc_failure(code),
                            grpc::Ended::Broken => failure_on_broken,
                            // The caller went away: nothing learnt about the dependency (the
                            // permit is dropped unrecorded, freeing a trial).
                            grpc::Ended::Dropped => return,
                        };
                        permit.record(failure);
                    });
                    return Ok(Resp::from_parts(parts, body));
                }
            }
            permit.record(breaker.is_failure(&resp));
            Ok(resp)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::layers::testing::*;
    use crate::metrics::Metrics;
    use std::sync::atomic::{AtomicU16, Ordering};
    use tower::ServiceExt;

    fn cfg(threshold: u32, volume: u32) -> CircuitBreakerConfig {
        CircuitBreakerConfig {
            error_threshold_percentage: threshold,
            volume_threshold: volume,
            rolling_window_ms: 10_000,
            buckets: 10,
            reset_timeout_ms: 5_000,
            failure_on: FailureClassConfig {
                status_5xx: true,
                connect_errors: true,
                timeouts: true,
                grpc_statuses: vec![2, 4, 13, 14, 15],
            },
        }
    }

    fn breaker(threshold: u32, volume: u32) -> (Arc<Breaker>, Arc<Metrics>) {
        let m = Metrics::new();
        let b = Breaker::new(
            "users",
            &cfg(threshold, volume),
            m.breaker_metrics("users"),
            Counter::default(),
        );
        (b, m)
    }

    fn call(b: &Arc<Breaker>, failure: bool) -> bool {
        match b.try_acquire() {
            Some(p) => {
                p.record(failure);
                true
            }
            None => false,
        }
    }

    #[tokio::test(start_paused = true)]
    async fn opens_only_above_the_threshold_with_enough_volume() {
        let (b, _) = breaker(50, 4);
        // 3 failures: 100% but below the volume threshold.
        for _ in 0..3 {
            assert!(call(&b, true));
        }
        assert_eq!(b.state(), State::Closed);
        // 4th call a success: 3/4 = 75% > 50% with 4 calls -> open.
        assert!(call(&b, false));
        assert_eq!(b.state(), State::Open);

        // Exactly at the threshold does not open (strictly greater).
        let (b, _) = breaker(50, 4);
        for f in [true, false, true, false] {
            call(&b, f);
        }
        assert_eq!(b.state(), State::Closed, "50% is not > 50%");
        call(&b, true);
        assert_eq!(b.state(), State::Open, "3/5 = 60% > 50%");
    }

    #[tokio::test(start_paused = true)]
    async fn old_buckets_roll_out_of_the_window() {
        let (b, _) = breaker(50, 4);
        for _ in 0..3 {
            call(&b, true);
        }
        assert_eq!(b.window(), (3, 3));
        tokio::time::advance(Duration::from_millis(10_000)).await;
        assert_eq!(b.window(), (0, 0), "the window has fully rolled");
        for _ in 0..3 {
            call(&b, false);
        }
        call(&b, true);
        assert_eq!(b.state(), State::Closed, "1/4 failures in the window");
    }

    #[tokio::test(start_paused = true)]
    async fn full_cycle_with_exactly_one_trial() {
        let (b, m) = breaker(50, 2);
        call(&b, true);
        call(&b, true);
        assert_eq!(b.state(), State::Open);
        assert!(!call(&b, false), "open rejects at once");
        tokio::time::advance(Duration::from_millis(4_999)).await;
        assert!(b.try_acquire().is_none(), "still open before resetTimeout");
        tokio::time::advance(Duration::from_millis(1)).await;
        let trial = b.try_acquire().expect("one trial after resetTimeout");
        assert_eq!(b.state(), State::HalfOpen);
        assert!(
            b.try_acquire().is_none(),
            "others are rejected while the trial runs"
        );
        trial.record(true);
        assert_eq!(b.state(), State::Open, "failed trial re-opens");
        assert!(b.try_acquire().is_none());
        tokio::time::advance(Duration::from_millis(5_000)).await;
        let trial = b.try_acquire().unwrap();
        assert!(b.try_acquire().is_none());
        trial.record(false);
        assert_eq!(b.state(), State::Closed, "successful trial closes");
        assert_eq!(b.window(), (0, 0), "closing clears the window");
        assert!(call(&b, true), "closed admits again");
        assert_eq!(
            b.state(),
            State::Closed,
            "a single failure after closing (1 < volume 2) keeps it closed"
        );
        let text = m.encode();
        assert!(
            text.contains(
                r#"weir_circuit_breaker_transitions_total{dependency="users",to="open"} 2"#
            ),
            "{text}"
        );
        assert!(text.contains(
            r#"weir_circuit_breaker_transitions_total{dependency="users",to="half_open"} 2"#
        ));
        assert!(text.contains(
            r#"weir_circuit_breaker_transitions_total{dependency="users",to="closed"} 1"#
        ));
        assert!(text.contains(r#"weir_circuit_breaker_state{dependency="users"} 0"#));
    }

    #[tokio::test(start_paused = true)]
    async fn abandoned_trial_frees_the_slot() {
        let (b, _) = breaker(50, 1);
        call(&b, true);
        tokio::time::advance(Duration::from_secs(5)).await;
        drop(b.try_acquire().unwrap());
        assert_eq!(b.state(), State::HalfOpen);
        assert!(b.try_acquire().is_some(), "the next call becomes the trial");
    }

    #[tokio::test(start_paused = true)]
    async fn layer_classifies_failures_by_config() {
        let m = Metrics::new();
        let mut c = cfg(40, 1);
        c.failure_on.status_5xx = false;
        let rejected = Counter::default();
        let b = Breaker::new("users", &c, m.breaker_metrics("users"), rejected.clone());
        let code = Arc::new(AtomicU16::new(500));
        let c2 = code.clone();
        let inner = tower::service_fn(move |_r: Req| {
            let s = c2.load(Ordering::SeqCst);
            async move {
                Ok::<_, Infallible>(if s == 0 {
                    reject(Reason::UpstreamConnect)
                } else {
                    status(s)
                })
            }
        });
        let svc = BreakerLayer::new(b.clone()).layer(inner);
        assert_eq!(svc.clone().oneshot(get("/")).await.unwrap().status(), 500);
        assert_eq!(
            b.state(),
            State::Closed,
            "5xx not a failure when statusFive is off"
        );
        code.store(0, Ordering::SeqCst);
        assert_eq!(svc.clone().oneshot(get("/")).await.unwrap().status(), 502);
        assert_eq!(
            b.state(),
            State::Open,
            "connect error is a failure: 1 of 2 > 40%"
        );
        let resp = svc.clone().oneshot(get("/")).await.unwrap();
        assert_eq!(resp.status(), 503);
        assert_eq!(resp.headers()["x-weir-reason"], "circuit-open");
        assert_eq!(rejected.get(), 1);
    }
}
