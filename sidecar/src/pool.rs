//! Keep-alive HTTP/1.1 connections to one socket address: the hop to the app on loopback, and to
//! a dependency named by an address (or one of its endpoints), in cleartext.
//!
//! hyper-util's pooled client keys its pool by scheme and authority, so every request parsed its
//! URI's authority, hashed it a byte at a time with SipHash, took the pool's lock twice and
//! spawned a task to watch the connection come back: about 7 000 instructions per request, a
//! seventh of the proxy's (callgrind, `sidecar/benches/profile.sh`). A hop whose address is
//! known needs none of that: this pool is a list of idle senders behind a lock, the newest
//! first, checked out in O(1) and given back as soon as the request is handed to the
//! connection (HTTP/1.1 lets a connection take the next request only when the last response
//! has been read, which [`SendRequest::is_ready`] tells).
//!
//! What it keeps of the client it replaces: connect timeout and `TCP_NODELAY`, TCP keep-alive,
//! at most [`MAX_IDLE`] connections kept, those idle for [`POOL_IDLE_TIMEOUT`] closed (when the
//! next one is given back: there is no sweeper task), and a request that a kept connection
//! closed before it was written is sent again on a new one (the app closing an idle keep-alive
//! connection is no failure of the request).
//!
//! A checkout passes over the connections still reading their last response, so with many
//! requests in flight it costs a look at each of them (an atomic load or two, under the lock);
//! the bulkhead benchmark's 256 in flight did not show it.

use crate::body::BoxBody;
use crate::connected_at::ConnectedAt;
use crate::forward::POOL_IDLE_TIMEOUT;
use http::header::HOST;
use http::{HeaderValue, Request, Response, Uri};
use hyper::body::Incoming;
use hyper::client::conn::http1::{self, SendRequest};
use hyper_util::rt::TokioIo;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::net::TcpStream;
use tokio::time::Instant;

/// Idle connections kept per address, as hyper-util's `pool_max_idle_per_host` was set.
pub const MAX_IDLE: usize = 256;
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
const TCP_KEEPALIVE: Duration = Duration::from_secs(60);

/// Why a request got no response.
#[derive(Debug, thiserror::Error)]
pub enum PoolError {
    /// No connection could be made (refused, unreachable, timed out).
    #[error("cannot connect to {addr}: {source}")]
    Connect {
        addr: SocketAddr,
        source: std::io::Error,
    },
    /// The connection failed while the request was sent or the response read.
    #[error("{0}")]
    Request(#[source] hyper::Error),
}

impl PoolError {
    pub fn is_connect(&self) -> bool {
        matches!(self, PoolError::Connect { .. })
    }
}

struct Idle {
    tx: SendRequest<BoxBody>,
    since: Instant,
}

/// The connections to one address; clones share them.
#[derive(Clone)]
pub struct Pool {
    inner: Arc<Inner>,
}

struct Inner {
    addr: SocketAddr,
    /// `host:port` for requests that came without a Host header (HTTP/1.1 needs one).
    host: HeaderValue,
    /// Oldest first: checked out from the back, expired from the front.
    idle: Mutex<Vec<Idle>>,
    max_idle: usize,
}

impl std::fmt::Debug for Pool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Pool")
            .field("addr", &self.inner.addr)
            .finish_non_exhaustive()
    }
}

impl Pool {
    pub fn new(addr: SocketAddr) -> Pool {
        Pool::with_max_idle(addr, MAX_IDLE)
    }

    fn with_max_idle(addr: SocketAddr, max_idle: usize) -> Pool {
        Pool {
            inner: Arc::new(Inner {
                addr,
                host: HeaderValue::from_str(&addr.to_string())
                    .expect("a socket address is a header value"),
                idle: Mutex::new(Vec::new()),
                max_idle,
            }),
        }
    }

    /// Sends `req` (its URI is written in origin form, its Host kept or set to the address).
    pub async fn send(&self, mut req: Request<BoxBody>) -> Result<Response<Incoming>, PoolError> {
        origin_form(req.uri_mut());
        if !req.headers().contains_key(HOST) {
            req.headers_mut().insert(HOST, self.inner.host.clone());
        }
        loop {
            let (mut tx, kept) = match self.checkout() {
                Some(tx) => (tx, true),
                None => (self.connect().await?, false),
            };
            let made = (!kept).then(Instant::now);
            let sent = tx.try_send_request(req);
            // Handed over: the connection takes the next request once this response is read.
            self.checkin(tx);
            match sent.await {
                Ok(mut resp) => {
                    // The balancer times the answer from here (see `crate::connected_at`).
                    if let Some(at) = made {
                        resp.extensions_mut().insert(ConnectedAt(at));
                    }
                    return Ok(resp);
                }
                Err(mut e) => match e.take_message() {
                    // Not written: a kept connection that the peer had closed. Again, on a
                    // new connection if need be.
                    Some(back) if kept => req = back,
                    _ => return Err(PoolError::Request(e.into_error())),
                },
            }
        }
    }

    /// The newest idle connection ready for a request; closed and expired ones are dropped.
    fn checkout(&self) -> Option<SendRequest<BoxBody>> {
        let mut idle = self.inner.idle.lock().unwrap_or_else(|e| e.into_inner());
        let mut busy = Vec::new();
        let mut found = None;
        while let Some(i) = idle.pop() {
            if i.tx.is_closed() {
                continue;
            }
            if i.tx.is_ready() {
                found = Some(i.tx);
                break;
            }
            // Still reading its last response: another request's to take later.
            busy.push(i);
        }
        idle.extend(busy.into_iter().rev());
        found
    }

    fn checkin(&self, tx: SendRequest<BoxBody>) {
        self.checkin_at(tx, Instant::now());
    }

    fn checkin_at(&self, tx: SendRequest<BoxBody>, now: Instant) {
        let mut idle = self.inner.idle.lock().unwrap_or_else(|e| e.into_inner());
        // Expired from the front (the oldest); the list is also capped there.
        let expired = idle
            .iter()
            .take_while(|i| now.saturating_duration_since(i.since) >= POOL_IDLE_TIMEOUT)
            .count();
        idle.drain(..expired);
        if tx.is_closed() {
            return;
        }
        let over = (idle.len() + 1).saturating_sub(self.inner.max_idle);
        idle.drain(..over);
        idle.push(Idle { tx, since: now });
    }

    async fn connect(&self) -> Result<SendRequest<BoxBody>, PoolError> {
        let addr = self.inner.addr;
        let err = |source| PoolError::Connect { addr, source };
        let stream = tokio::time::timeout(CONNECT_TIMEOUT, TcpStream::connect(addr))
            .await
            .map_err(|_| {
                err(std::io::Error::new(
                    std::io::ErrorKind::TimedOut,
                    "connect timed out",
                ))
            })?
            .map_err(err)?;
        stream.set_nodelay(true).map_err(err)?;
        let ka = socket2::TcpKeepalive::new().with_time(TCP_KEEPALIVE);
        socket2::SockRef::from(&stream)
            .set_tcp_keepalive(&ka)
            .map_err(err)?;
        let (tx, conn) = http1::Builder::new()
            .handshake(TokioIo::new(stream))
            .await
            .map_err(PoolError::Request)?;
        tokio::spawn(async move {
            if let Err(e) = conn.await {
                tracing::debug!(error = %e, "upstream connection ended");
            }
        });
        Ok(tx)
    }

    /// Idle connections held now (tests).
    #[cfg(test)]
    fn idle(&self) -> usize {
        self.inner.idle.lock().unwrap().len()
    }
}

/// `/path?query` only: an HTTP/1.1 request to an origin names no scheme or authority.
fn origin_form(uri: &mut Uri) {
    if uri.scheme().is_none() && uri.authority().is_none() {
        return;
    }
    let pq = uri
        .path_and_query()
        .cloned()
        .unwrap_or_else(|| http::uri::PathAndQuery::from_static("/"));
    *uri = Uri::from(pq);
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::{BodyExt, Empty};
    use std::sync::atomic::{AtomicUsize, Ordering};

    fn get(path: &str) -> Request<BoxBody> {
        Request::get(format!("http://ignored.example{path}"))
            .body(
                Empty::new()
                    .map_err(|e: std::convert::Infallible| match e {})
                    .boxed_unsync(),
            )
            .unwrap()
    }

    /// A server that answers `200 <path> <connection number>`, counting connections, and
    /// closes each connection after `per_conn` requests (0: never).
    async fn server(per_conn: usize) -> (SocketAddr, Arc<AtomicUsize>) {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        let conns = Arc::new(AtomicUsize::new(0));
        let c2 = conns.clone();
        tokio::spawn(async move {
            loop {
                let (mut s, _) = l.accept().await.unwrap();
                let n = c2.fetch_add(1, Ordering::SeqCst) + 1;
                tokio::spawn(async move {
                    let mut buf = Vec::new();
                    let mut served = 0;
                    loop {
                        let mut chunk = [0u8; 1024];
                        let Ok(r) = s.read(&mut chunk).await else {
                            return;
                        };
                        if r == 0 {
                            return;
                        }
                        buf.extend_from_slice(&chunk[..r]);
                        while let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                            let head = String::from_utf8_lossy(&buf[..end]).to_string();
                            buf.drain(..end + 4);
                            let line = head.lines().next().unwrap_or_default().to_string();
                            let host = head
                                .lines()
                                .find_map(|l| l.strip_prefix("host: "))
                                .unwrap_or("-")
                                .to_string();
                            let body = format!("{line}|{host}|{n}");
                            let resp = format!(
                                "HTTP/1.1 200 OK\r\ncontent-length: {}\r\n\r\n{body}",
                                body.len()
                            );
                            if s.write_all(resp.as_bytes()).await.is_err() {
                                return;
                            }
                            served += 1;
                            if per_conn > 0 && served == per_conn {
                                return;
                            }
                        }
                    }
                });
            }
        });
        (addr, conns)
    }

    async fn text(r: Response<Incoming>) -> String {
        String::from_utf8(r.into_body().collect().await.unwrap().to_bytes().to_vec()).unwrap()
    }

    #[tokio::test]
    async fn one_connection_serves_requests_in_turn_in_origin_form_with_a_host() {
        let (addr, conns) = server(0).await;
        let pool = Pool::new(addr);
        for i in 0..5 {
            let before = Instant::now();
            let resp = pool.send(get(&format!("/n/{i}?q=1"))).await.unwrap();
            // The answer on the connection just made says when it was ready (the balancer
            // times it from then); those on the kept connection were sent on a ready one.
            let made = resp.extensions().get::<ConnectedAt>().copied();
            if i == 0 {
                assert!(made.is_some_and(|m| m.0 >= before), "{made:?}");
            } else {
                assert_eq!(made, None);
            }
            let body = text(resp).await;
            assert_eq!(body, format!("GET /n/{i}?q=1 HTTP/1.1|{addr}|1"));
        }
        assert_eq!(conns.load(Ordering::SeqCst), 1, "kept alive");
        assert_eq!(pool.idle(), 1);
    }

    #[tokio::test]
    async fn concurrent_requests_get_connections_of_their_own_then_share_them() {
        let (addr, conns) = server(0).await;
        let pool = Pool::new(addr);
        let many = (0..8).map(|i| {
            let p = pool.clone();
            async move { text(p.send(get(&format!("/{i}"))).await.unwrap()).await }
        });
        let bodies = futures::future::join_all(many).await;
        assert_eq!(bodies.len(), 8);
        let opened = conns.load(Ordering::SeqCst);
        assert!((1..=8).contains(&opened), "{opened}");
        // In turn now: no new connection.
        for _ in 0..20 {
            text(pool.send(get("/")).await.unwrap()).await;
        }
        assert_eq!(conns.load(Ordering::SeqCst), opened);
    }

    #[tokio::test]
    async fn a_connection_the_peer_closed_is_replaced_without_failing_the_request() {
        // The server closes every connection after one response: each kept connection is
        // found closed (or closes under the next request before it is written).
        let (addr, conns) = server(1).await;
        let pool = Pool::new(addr);
        for i in 0..10 {
            let body = text(pool.send(get(&format!("/{i}"))).await.unwrap()).await;
            assert!(body.starts_with(&format!("GET /{i} ")), "{body}");
            // Let the close reach the client before the next request.
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        assert_eq!(conns.load(Ordering::SeqCst), 10);
    }

    #[tokio::test]
    async fn nothing_listening_is_a_connect_error() {
        let addr = {
            let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            l.local_addr().unwrap()
        };
        let e = Pool::new(addr).send(get("/")).await.unwrap_err();
        assert!(e.is_connect(), "{e}");
        assert!(e.to_string().contains(&addr.to_string()), "{e}");
    }

    #[tokio::test]
    async fn idle_connections_expire_and_are_capped() {
        let (addr, _) = server(0).await;
        let pool = Pool::with_max_idle(addr, 2);
        // A connection to the server; `served`: its connection task runs (else it is closed).
        let open = |served: bool| async move {
            let stream = TcpStream::connect(addr).await.unwrap();
            let (tx, conn) = http1::handshake::<_, BoxBody>(TokioIo::new(stream))
                .await
                .unwrap();
            if served {
                tokio::spawn(conn);
            }
            tx
        };
        text(pool.send(get("/")).await.unwrap()).await;
        assert_eq!(pool.idle(), 1);
        // Given back past the idle timeout: the one kept before has expired.
        let later = Instant::now() + POOL_IDLE_TIMEOUT + Duration::from_secs(1);
        pool.checkin_at(open(true).await, later);
        assert_eq!(pool.idle(), 1);
        for _ in 0..3 {
            pool.checkin_at(open(true).await, later);
        }
        assert_eq!(pool.idle(), 2, "capped");
        // A closed connection is not kept.
        pool.checkin_at(open(false).await, later);
        assert_eq!(pool.idle(), 2);
    }
}
