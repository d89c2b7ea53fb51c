//! Stream idle timeout: once the response headers are out (the request timeout's part is
//! done), a request whose bodies carry nothing, either way, for `streamIdleTimeout` is ended. A
//! long stream that keeps moving is never cut; a stalled one does not hold a connection, a
//! bulkhead slot or an app worker forever.
//!
//! The request body and the response body share one clock of last activity: any frame either
//! way resets it (a client stream uploading while the server is silent is not idle). When it
//! runs out, a gRPC call ends with trailers `grpc-status: 4` (`DEADLINE_EXCEEDED`) and
//! `grpc-message: weir-proxy: stream-idle-timeout`, which a gRPC client reads as the call's
//! status; any other response body fails, which resets an HTTP/2 stream and closes an HTTP/1.1
//! connection (the only way to say "incomplete" there).

use super::{BoxFuture, always_ready, grpc};
use crate::body::{BodyError, BoxBody, Reason, Req, Resp};
use bytes::Bytes;
use http::{HeaderMap, HeaderValue};
use http_body_util::BodyExt;
use hyper::body::{Body, Frame, SizeHint};
use prometheus_client::metrics::counter::Counter;
use std::convert::Infallible;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;
use tokio::time::{Instant, Sleep};
use tower::{Layer, Service};

/// The shared clock: milliseconds since `start` of the last frame either way.
struct Activity {
    start: Instant,
    last_ms: AtomicU64,
}

impl Activity {
    fn touch(&self) {
        let ms = self.start.elapsed().as_millis() as u64;
        self.last_ms.fetch_max(ms, Ordering::Relaxed);
    }

    fn last(&self) -> Instant {
        self.start + Duration::from_millis(self.last_ms.load(Ordering::Relaxed))
    }
}

/// The request body: touches the clock on every frame.
struct Touching {
    inner: BoxBody,
    activity: Arc<Activity>,
}

impl Body for Touching {
    type Data = Bytes;
    type Error = BodyError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BodyError>>> {
        let polled = Pin::new(&mut self.inner).poll_frame(cx);
        if let Poll::Ready(Some(Ok(_))) = &polled {
            self.activity.touch();
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

/// The error a non-gRPC response body ends with when idle.
#[derive(Debug, thiserror::Error)]
#[error("no frame either way for {0:?} (stream-idle-timeout)")]
pub struct StreamIdle(Duration);

/// The response body: touches the clock, and ends the stream once it has stood still.
struct Watched {
    inner: Option<BoxBody>,
    activity: Arc<Activity>,
    idle: Duration,
    sleep: Pin<Box<Sleep>>,
    grpc: bool,
    ended: Counter,
}

impl Body for Watched {
    type Data = Bytes;
    type Error = BodyError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BodyError>>> {
        let this = &mut *self;
        let Some(inner) = this.inner.as_mut() else {
            return Poll::Ready(None);
        };
        let polled = Pin::new(inner).poll_frame(cx);
        if !polled.is_pending() {
            this.activity.touch();
            return polled;
        }
        loop {
            let due = this.activity.last() + this.idle;
            if this.sleep.deadline() != due {
                this.sleep.as_mut().reset(due);
            }
            if this.sleep.as_mut().poll(cx).is_pending() {
                return Poll::Pending;
            }
            if this.activity.last() + this.idle > Instant::now() {
                continue; // a frame came the other way meanwhile
            }
            this.ended.inc();
            // Dropping the upstream body resets the upstream stream (or closes its connection).
            this.inner = None;
            tracing::warn!(
                idle_ms = this.idle.as_millis() as u64,
                grpc = this.grpc,
                "stream ended: idle"
            );
            return Poll::Ready(Some(if this.grpc {
                let mut t = HeaderMap::new();
                t.insert(
                    grpc::GRPC_STATUS,
                    HeaderValue::from(grpc::code::DEADLINE_EXCEEDED),
                );
                t.insert(
                    grpc::GRPC_MESSAGE,
                    HeaderValue::from_static("weir-proxy: stream-idle-timeout"),
                );
                t.insert(
                    crate::body::REASON_HEADER,
                    Reason::StreamIdleTimeout.header_value(),
                );
                Ok(Frame::trailers(t))
            } else {
                Err(BodyError::new(StreamIdle(this.idle)))
            }));
        }
    }

    fn is_end_stream(&self) -> bool {
        self.inner.as_ref().is_none_or(|b| b.is_end_stream())
    }

    fn size_hint(&self) -> SizeHint {
        self.inner
            .as_ref()
            .map_or_else(|| SizeHint::with_exact(0), |b| b.size_hint())
    }
}

#[derive(Clone, Debug)]
pub struct StreamIdleLayer {
    idle: Duration,
    ended: Counter,
}

impl StreamIdleLayer {
    /// `ended` counts the streams ended for idleness.
    pub fn new(idle: Duration, ended: Counter) -> Self {
        StreamIdleLayer { idle, ended }
    }
}

impl<S> Layer<S> for StreamIdleLayer {
    type Service = StreamIdleTimeout<S>;
    fn layer(&self, inner: S) -> StreamIdleTimeout<S> {
        StreamIdleTimeout {
            inner,
            idle: self.idle,
            ended: self.ended.clone(),
        }
    }
}

#[derive(Clone, Debug)]
pub struct StreamIdleTimeout<S> {
    inner: S,
    idle: Duration,
    ended: Counter,
}

impl<S> Service<Req> for StreamIdleTimeout<S>
where
    S: Service<Req, Response = Resp, Error = Infallible>,
    S::Future: Send + 'static,
{
    type Response = Resp;
    type Error = Infallible;
    type Future = BoxFuture;
    always_ready!();

    fn call(&mut self, req: Req) -> BoxFuture {
        let activity = Arc::new(Activity {
            start: Instant::now(),
            last_ms: AtomicU64::new(0),
        });
        let grpc = grpc::is_marked(&req);
        let req = req.map(|b| {
            Touching {
                inner: b,
                activity: activity.clone(),
            }
            .boxed_unsync()
        });
        let idle = self.idle;
        let ended = self.ended.clone();
        let fut = self.inner.call(req);
        Box::pin(async move {
            let resp = fut.await?;
            // The clock starts again at the headers: the wait for them was the timeout's.
            activity.touch();
            if resp.body().is_end_stream() {
                return Ok(resp);
            }
            let due = activity.last() + idle;
            Ok(resp.map(|b| {
                Watched {
                    inner: Some(b),
                    activity,
                    idle,
                    sleep: Box::pin(tokio::time::sleep_until(due)),
                    grpc,
                    ended,
                }
                .boxed_unsync()
            }))
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::body;
    use http::Response;
    use tokio::sync::mpsc;
    use tower::ServiceExt;

    /// A service answering with a body fed from the returned channel.
    fn fed() -> (
        mpsc::Sender<Bytes>,
        impl Service<Req, Response = Resp, Error = Infallible, Future = BoxFuture> + Clone,
    ) {
        let (tx, rx) = mpsc::channel::<Bytes>(8);
        let rx = Arc::new(std::sync::Mutex::new(Some(rx)));
        let svc = tower::service_fn(move |_req: Req| {
            let rx = rx.lock().unwrap().take().expect("one call");
            let stream = futures::stream::unfold(rx, |mut rx| async move {
                rx.recv().await.map(|b| (Ok(Frame::data(b)), rx))
            });
            let body = http_body_util::StreamBody::new(stream).boxed_unsync();
            let fut: BoxFuture = Box::pin(async move { Ok(Response::new(body)) });
            fut
        });
        (tx, svc)
    }

    fn grpc_req() -> Req {
        let mut r = http::Request::post("/pkg.S/M")
            .header("content-type", "application/grpc")
            .body(body::empty())
            .unwrap();
        r.extensions_mut().insert(grpc::Grpc);
        r
    }

    #[tokio::test(start_paused = true)]
    async fn a_moving_stream_outlives_the_idle_time_and_a_stalled_one_ends() {
        let (tx, svc) = fed();
        let counter = Counter::default();
        let svc = StreamIdleLayer::new(Duration::from_millis(100), counter.clone()).layer(svc);
        let resp = svc.oneshot(grpc_req()).await.unwrap();
        let mut body = resp.into_body();
        // Ten frames 80 ms apart: 800 ms in all, never 100 ms idle.
        for i in 0..10u8 {
            tokio::time::sleep(Duration::from_millis(80)).await;
            tx.send(Bytes::from(vec![i])).await.unwrap();
            let f = body.frame().await.unwrap().unwrap();
            assert_eq!(f.into_data().unwrap(), vec![i]);
        }
        let start = Instant::now();
        let f = body.frame().await.unwrap().unwrap();
        assert_eq!(start.elapsed(), Duration::from_millis(100));
        let t = f.into_trailers().unwrap();
        assert_eq!(t["grpc-status"], "4");
        assert_eq!(t["grpc-message"], "weir-proxy: stream-idle-timeout");
        assert!(body.frame().await.is_none());
        assert_eq!(counter.get(), 1);
        drop(tx);
    }

    #[tokio::test(start_paused = true)]
    async fn a_plain_http_body_fails_when_idle() {
        let (_tx, svc) = fed();
        let svc = StreamIdleLayer::new(Duration::from_millis(50), Counter::default()).layer(svc);
        let resp = svc.oneshot(crate::layers::testing::get("/")).await.unwrap();
        let err = resp.into_body().collect().await.unwrap_err();
        assert!(err.to_string().contains("stream-idle-timeout"), "{err}");
    }
}
