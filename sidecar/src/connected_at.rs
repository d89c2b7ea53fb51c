//! When the connection an answer came on was ready, so a balanced endpoint's latency is timed
//! from then.
//!
//! The balancer's estimate ([`crate::balance`]) is peak-EWMA: a slower answer is taken at once.
//! A request that had to wait for a new connection (a burst needing one more, a reconnect, the
//! mutual-TLS handshake of each) would otherwise carry the connection's setup into the
//! endpoint's latency: the endpoint chosen for the new connection would look several times
//! slower than its peers and be kept out of the choice until the peak decays (seconds), which
//! turns every connection it is given into a penalty. So a response on a connection made after
//! its request started carries [`ConnectedAt`] in its extensions, and the balancer times the
//! answer from the later of the two.
//!
//! [`Timed`] wraps the connectors of the hyper clients (its streams tell hyper the instant as
//! the connection's extra, which hyper copies into each response); the HTTP/1.1 pool
//! ([`crate::pool`]) sets it on the responses of the connections it makes.

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};
use tokio::time::Instant;

/// When the connection a response came on was ready for requests.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ConnectedAt(pub Instant);

/// A connector whose connections say when they were made.
#[derive(Clone, Debug)]
pub struct Timed<C>(pub C);

impl<C> tower::Service<http::Uri> for Timed<C>
where
    C: tower::Service<http::Uri> + Send,
    C::Future: Send + 'static,
{
    type Response = TimedStream<C::Response>;
    type Error = C::Error;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, C::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), C::Error>> {
        self.0.poll_ready(cx)
    }

    fn call(&mut self, uri: http::Uri) -> Self::Future {
        let connecting = self.0.call(uri);
        Box::pin(async move {
            let inner = connecting.await?;
            Ok(TimedStream {
                inner,
                at: ConnectedAt(Instant::now()),
            })
        })
    }
}

/// A connection and the instant it was ready.
#[derive(Debug)]
pub struct TimedStream<S> {
    inner: S,
    at: ConnectedAt,
}

impl<S: hyper_util::client::legacy::connect::Connection>
    hyper_util::client::legacy::connect::Connection for TimedStream<S>
{
    fn connected(&self) -> hyper_util::client::legacy::connect::Connected {
        self.inner.connected().extra(self.at)
    }
}

impl<S: hyper::rt::Read + Unpin> hyper::rt::Read for TimedStream<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: hyper::rt::ReadBufCursor<'_>,
    ) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl<S: hyper::rt::Write + Unpin> hyper::rt::Write for TimedStream<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::{BodyExt, Empty};
    use hyper_util::client::legacy::Client;
    use hyper_util::rt::TokioExecutor;

    /// A response on a connection the client made carries the instant it was made, after the
    /// connect began and before the response; a second request on the same connection carries
    /// the same instant (it was ready before that request started).
    #[tokio::test]
    async fn responses_carry_the_instant_their_connection_was_made() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            loop {
                let (s, _) = listener.accept().await.unwrap();
                tokio::spawn(hyper::server::conn::http1::Builder::new().serve_connection(
                    hyper_util::rt::TokioIo::new(s),
                    hyper::service::service_fn(|_| async {
                        Ok::<_, std::convert::Infallible>(hyper::Response::new(
                            Empty::<bytes::Bytes>::new(),
                        ))
                    }),
                ));
            }
        });
        let client = Client::builder(TokioExecutor::new())
            .build::<_, Empty<bytes::Bytes>>(Timed(crate::forward::tcp_connector()));
        let uri: http::Uri = format!("http://{addr}/").parse().unwrap();
        let before = Instant::now();
        let r = client.get(uri.clone()).await.unwrap();
        let first = *r.extensions().get::<ConnectedAt>().unwrap();
        r.into_body().collect().await.unwrap();
        assert!(first.0 >= before && first.0 <= Instant::now(), "{first:?}");
        let r = client.get(uri).await.unwrap();
        assert_eq!(r.extensions().get::<ConnectedAt>(), Some(&first));
    }
}
