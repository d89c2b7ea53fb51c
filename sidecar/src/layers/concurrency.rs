//! Concurrency limit with a bounded queue: at most `max_concurrent` requests inside, at most
//! `max_queue` waiting for a slot (FIFO); beyond that the request is refused at once (fail fast).
//! Used for the inbound limit (`concurrency-limit`) and for outbound bulkheads (`bulkhead-full`).
//! A queued request that reaches its [`Deadline`](super::Deadline) gets 504.

use super::{BoxFuture, always_ready, deadline_of};
use crate::body::{BodyError, BoxBody, Reason, Req, Resp, reject};
use bytes::Bytes;
use http_body_util::BodyExt;
use hyper::body::{Body, Frame, SizeHint};
use prometheus_client::metrics::counter::Counter;
use std::convert::Infallible;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::task::{Context, Poll};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tower::{Layer, Service};

#[derive(Debug)]
pub struct Limiter {
    sem: Arc<Semaphore>,
    max_concurrent: usize,
    queued: AtomicUsize,
    max_queue: usize,
    reason: Reason,
    rejected: Counter,
}

struct QueueSlot<'a>(&'a AtomicUsize);
impl Drop for QueueSlot<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

impl Limiter {
    pub fn new(
        max_concurrent: u32,
        max_queue: u32,
        reason: Reason,
        rejected: Counter,
    ) -> Arc<Self> {
        Arc::new(Limiter {
            sem: Arc::new(Semaphore::new(max_concurrent as usize)),
            max_concurrent: max_concurrent as usize,
            queued: AtomicUsize::new(0),
            max_queue: max_queue as usize,
            reason,
            rejected,
        })
    }

    /// Requests currently holding a slot.
    pub fn in_flight(&self) -> usize {
        self.max_concurrent - self.sem.available_permits()
    }

    pub fn queued(&self) -> usize {
        self.queued.load(Ordering::Acquire)
    }

    /// Takes a slot, waiting in the queue if there is room in it (until `deadline`).
    pub async fn acquire(
        &self,
        deadline: Option<tokio::time::Instant>,
    ) -> Result<OwnedSemaphorePermit, Reason> {
        if let Ok(p) = self.sem.clone().try_acquire_owned() {
            return Ok(p);
        }
        if self.queued.fetch_add(1, Ordering::AcqRel) >= self.max_queue {
            self.queued.fetch_sub(1, Ordering::AcqRel);
            self.rejected.inc();
            return Err(self.reason);
        }
        let _slot = QueueSlot(&self.queued);
        let wait = self.sem.clone().acquire_owned();
        let permit = match deadline {
            Some(d) => tokio::time::timeout_at(d, wait)
                .await
                .map_err(|_| Reason::Timeout)?,
            None => wait.await,
        };
        permit.map_err(|_| self.reason) // the semaphore is never closed
    }
}

/// A response body that keeps its request's slot until the body has been sent (or dropped):
/// a streaming response still counts as a call in flight.
struct Held {
    inner: BoxBody,
    permit: Option<OwnedSemaphorePermit>,
}

impl Body for Held {
    type Data = Bytes;
    type Error = BodyError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BodyError>>> {
        let this = &mut *self;
        let polled = Pin::new(&mut this.inner).poll_frame(cx);
        if let Poll::Ready(None | Some(Err(_))) = polled {
            this.permit.take();
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

fn hold_until_body_ends(resp: Resp, permit: OwnedSemaphorePermit) -> Resp {
    if resp.body().is_end_stream() {
        return resp; // nothing to stream: the slot is freed now
    }
    resp.map(|inner| {
        Held {
            inner,
            permit: Some(permit),
        }
        .boxed_unsync()
    })
}

#[derive(Clone, Debug)]
pub struct ConcurrencyLimitLayer {
    limiter: Arc<Limiter>,
}

impl ConcurrencyLimitLayer {
    pub fn new(limiter: Arc<Limiter>) -> Self {
        ConcurrencyLimitLayer { limiter }
    }
}

impl<S> Layer<S> for ConcurrencyLimitLayer {
    type Service = ConcurrencyLimit<S>;
    fn layer(&self, inner: S) -> ConcurrencyLimit<S> {
        ConcurrencyLimit {
            inner,
            limiter: self.limiter.clone(),
        }
    }
}

#[derive(Clone, Debug)]
pub struct ConcurrencyLimit<S> {
    inner: S,
    limiter: Arc<Limiter>,
}

impl<S> Service<Req> for ConcurrencyLimit<S>
where
    S: Service<Req, Response = Resp, Error = Infallible> + Clone + Send + 'static,
    S::Future: Send + 'static,
{
    type Response = Resp;
    type Error = Infallible;
    type Future = BoxFuture;
    always_ready!();

    fn call(&mut self, req: Req) -> BoxFuture {
        let limiter = self.limiter.clone();
        // Fast path: a free slot, no queueing.
        if let Ok(permit) = limiter.sem.clone().try_acquire_owned() {
            let fut = self.inner.call(req);
            return Box::pin(async move { Ok(hold_until_body_ends(fut.await?, permit)) });
        }
        let mut inner = self.inner.clone();
        Box::pin(async move {
            let permit = match limiter.acquire(deadline_of(&req)).await {
                Ok(p) => p,
                Err(reason) => return Ok(reject(reason)),
            };
            Ok(hold_until_body_ends(inner.call(req).await?, permit))
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::body::REASON_HEADER;
    use crate::layers::testing::*;
    use std::time::Duration;
    use tokio::time::Instant;
    use tower::ServiceExt;

    fn limited(
        max: u32,
        queue: u32,
        delay: Duration,
    ) -> (
        ConcurrencyLimit<
            impl Service<Req, Response = Resp, Error = Infallible, Future = BoxFuture>
            + Clone
            + Send
            + 'static,
        >,
        Counter,
    ) {
        let c = Counter::default();
        let l = Limiter::new(max, queue, Reason::BulkheadFull, c.clone());
        (ConcurrencyLimitLayer::new(l).layer(slow(delay)), c)
    }

    #[tokio::test(start_paused = true)]
    async fn rejects_the_call_beyond_slots_and_queue_at_once() {
        let (svc, rejected) = limited(2, 1, Duration::from_secs(1));
        let start = Instant::now();
        let admitted: Vec<_> = (0..3)
            .map(|_| tokio::spawn(svc.clone().oneshot(get("/"))))
            .collect();
        tokio::task::yield_now().await;
        assert_eq!(svc.limiter.in_flight(), 2);
        assert_eq!(svc.limiter.queued(), 1);
        let resp = svc.clone().oneshot(get("/")).await.unwrap();
        assert_eq!(resp.status(), 503);
        assert_eq!(resp.headers()[REASON_HEADER], "bulkhead-full");
        assert_eq!(start.elapsed(), Duration::ZERO, "rejection is immediate");
        assert_eq!(rejected.get(), 1);
        let mut done = Vec::new();
        for h in admitted {
            let r = h.await.unwrap().unwrap();
            assert_eq!(r.status(), 200);
            done.push(start.elapsed());
        }
        // Two ran at once, the queued one ran after a slot freed.
        assert_eq!(
            done,
            vec![
                Duration::from_secs(1),
                Duration::from_secs(1),
                Duration::from_secs(2)
            ]
        );
        assert_eq!(svc.limiter.in_flight(), 0);
        assert_eq!(svc.limiter.queued(), 0);
    }

    #[tokio::test(start_paused = true)]
    async fn queued_call_times_out_at_its_deadline() {
        let (svc, _) = limited(1, 5, Duration::from_secs(10));
        let _busy = tokio::spawn(svc.clone().oneshot(get("/")));
        tokio::task::yield_now().await;
        let mut req = get("/");
        req.extensions_mut().insert(crate::layers::Deadline(
            Instant::now() + Duration::from_millis(50),
        ));
        let resp = svc.clone().oneshot(req).await.unwrap();
        assert_eq!(resp.status(), 504);
        assert_eq!(svc.limiter.queued(), 0, "the queue slot is released");
    }

    #[tokio::test(start_paused = true)]
    async fn the_slot_is_held_until_the_response_body_is_done() {
        let (svc, _) = limited(1, 0, Duration::ZERO);
        let resp = svc.clone().oneshot(get("/")).await.unwrap();
        assert_eq!(svc.limiter.in_flight(), 1, "body not read yet");
        assert_eq!(svc.clone().oneshot(get("/")).await.unwrap().status(), 503);
        assert_eq!(body_string(resp.into_body()).await, "ok");
        assert_eq!(
            svc.limiter.in_flight(),
            0,
            "released at the end of the body"
        );
        let resp = svc.clone().oneshot(get("/")).await.unwrap();
        drop(resp);
        assert_eq!(
            svc.limiter.in_flight(),
            0,
            "released when the body is dropped"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn zero_queue_fails_fast() {
        let (svc, rejected) = limited(1, 0, Duration::from_secs(1));
        let h = tokio::spawn(svc.clone().oneshot(get("/")));
        tokio::task::yield_now().await;
        assert_eq!(svc.clone().oneshot(get("/")).await.unwrap().status(), 503);
        assert_eq!(h.await.unwrap().unwrap().status(), 200);
        assert_eq!(svc.clone().oneshot(get("/")).await.unwrap().status(), 200);
        assert_eq!(rejected.get(), 1);
    }
}
