//! The running proxy: listeners (inbound, admin, one per dependency), config reload, readiness and
//! graceful shutdown.

pub mod admin;
pub mod detect;
pub mod framing;
pub mod grpc_health;

use crate::body::{BodyError, ClientBodyError, Reason, Resp, reject, reject_closing};
use crate::forward::Clients;
use crate::metrics::Metrics;
use crate::stack::{self, Env, Snapshot};
use framing::{Tap, Tapped};
use http_body_util::BodyExt;
use hyper::body::Incoming;
use hyper::server::conn::{http1, http2};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use std::collections::HashMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;
use tokio::net::TcpListener;
use tokio::sync::{mpsc, oneshot, watch};
use tower::ServiceExt;
use weir_crds::proxy::ProxyConfig;

/// Largest request head (request line and headers) accepted; beyond it hyper answers 431.
pub const MAX_HEAD_BYTES: usize = 64 * 1024;
/// A client must send its request head within this time, or the connection is closed. Hyper
/// also applies it to idle keep-alive connections, so it doubles as the idle timeout: longer than
/// the idle timeout of common client pools (Go's 90 s), so the client closes first.
pub const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(120);

#[derive(Clone, Debug)]
pub struct Options {
    pub config_path: PathBuf,
    pub reload_interval: Duration,
    pub access_log: bool,
    pub otlp_flush_interval: Duration,
}

#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum Role {
    Inbound,
    Admin,
    Outbound(Arc<str>),
}

impl Role {
    fn name(&self) -> &str {
        match self {
            Role::Inbound => "inbound",
            Role::Admin => "admin",
            Role::Outbound(n) => n,
        }
    }
}

struct ListenerHandle {
    _stop: oneshot::Sender<()>,
}

pub struct Shared {
    snapshot: RwLock<Arc<Snapshot>>,
    pub metrics: Arc<Metrics>,
    env: Env,
    listeners: Mutex<HashMap<(Role, SocketAddr), ListenerHandle>>,
    /// Listeners of the current config that could not be bound.
    unbound: Mutex<Vec<String>>,
    draining: AtomicBool,
    drain_rx: watch::Receiver<bool>,
    /// Held by every connection; shutdown waits for all clones to drop.
    conn_tracker: Mutex<Option<mpsc::Sender<()>>>,
    /// The pub/sub bridge (idle while the config has no `messaging`).
    pub bridge: Arc<crate::bridge::Bridge>,
}

impl Shared {
    pub fn clients(&self) -> &Clients {
        &self.env.clients
    }

    pub fn snapshot(&self) -> Arc<Snapshot> {
        self.snapshot
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Ready: config loaded, every listener bound, not draining. `Err` lists what is missing.
    /// The broker connection is not part of it: readiness says whether the pod can serve HTTP,
    /// and a broker outage must not take every publishing or consuming pod out of its Service
    /// (`/brokerz` and `weir_messaging_broker_connected` report the broker instead).
    pub fn readiness(&self) -> Result<(), String> {
        if self.draining.load(Ordering::Acquire) {
            return Err("draining".into());
        }
        {
            let unbound = self.unbound.lock().unwrap_or_else(|e| e.into_inner());
            if !unbound.is_empty() {
                return Err(format!("listeners not bound: {}", unbound.join(", ")));
            }
        }
        match self.snapshot().components.workload_cert() {
            Some(cert) => cert.readiness(),
            None => Ok(()),
        }
    }

    fn desired(cfg: &ProxyConfig) -> Vec<(Role, SocketAddr)> {
        let mut v = vec![
            (Role::Inbound, cfg.inbound.listen),
            (Role::Admin, cfg.admin.listen),
        ];
        v.extend(
            cfg.outbound
                .iter()
                .map(|o| (Role::Outbound(o.name.as_str().into()), o.listen)),
        );
        v
    }

    /// Binds the listeners the config wants and stops those it no longer wants. Connections
    /// already accepted keep running.
    async fn reconcile(self: &Arc<Self>, cfg: &ProxyConfig) -> Vec<String> {
        let desired = Self::desired(cfg);
        let mut failures = Vec::new();
        {
            let mut ls = self.listeners.lock().unwrap_or_else(|e| e.into_inner());
            ls.retain(|k, _| {
                let keep = desired.contains(k);
                if !keep {
                    tracing::info!(listener = k.0.name(), addr = %k.1, "listener stopped");
                }
                keep
            });
        }
        for key in desired {
            if self
                .listeners
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .contains_key(&key)
            {
                continue;
            }
            match bind(key.1).await {
                Ok(listener) => {
                    let (tx, rx) = oneshot::channel();
                    tracing::info!(listener = key.0.name(), addr = %key.1, "listening");
                    tokio::spawn(accept_loop(self.clone(), key.0.clone(), listener, rx));
                    self.listeners
                        .lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .insert(key, ListenerHandle { _stop: tx });
                }
                Err(e) => {
                    tracing::error!(listener = key.0.name(), addr = %key.1, error = %e, "cannot bind listener");
                    failures.push(format!("{} {}: {e}", key.0.name(), key.1));
                }
            }
        }
        *self.unbound.lock().unwrap_or_else(|e| e.into_inner()) = failures.clone();
        failures
    }

    /// Applies a new, validated config.
    async fn apply(self: &Arc<Self>, cfg: ProxyConfig) -> Result<(), String> {
        let prev = self.snapshot();
        let snap = stack::build(Arc::new(cfg), Some(&prev.components), &self.env)?;
        let cfg = snap.config.clone();
        *self.snapshot.write().unwrap_or_else(|e| e.into_inner()) = Arc::new(snap);
        let mut failures = self.reconcile(&cfg).await;
        if let Err(e) = self.bridge.apply(&cfg).await {
            failures.push(e.to_string());
        }
        if failures.is_empty() {
            Ok(())
        } else {
            Err(failures.join("; "))
        }
    }
}

async fn bind(addr: SocketAddr) -> std::io::Result<TcpListener> {
    let sock = if addr.is_ipv4() {
        tokio::net::TcpSocket::new_v4()?
    } else {
        tokio::net::TcpSocket::new_v6()?
    };
    sock.set_reuseaddr(true)?;
    sock.bind(addr)?;
    sock.listen(1024)
}

/// Resolves once shutdown has begun.
async fn drained(rx: &mut watch::Receiver<bool>) {
    if rx.wait_for(|d| *d).await.is_err() {
        std::future::pending::<()>().await;
    }
}

/// Accepts connections until stopped (the listener left the config) or, for every listener but
/// the admin one, until the drain begins. The admin listener stays up through the drain, so
/// `/readyz` can say 503 (and `/metrics`, `/app-health/*` keep answering) while in-flight requests
/// finish; it closes when the process exits. Its connections are not waited for by the drain:
/// a kept-alive scrape or probe connection must not hold the pod's shutdown open.
async fn accept_loop(
    shared: Arc<Shared>,
    role: Role,
    listener: TcpListener,
    mut stop: oneshot::Receiver<()>,
) {
    let mut drain = shared.drain_rx.clone();
    let admin = role == Role::Admin;
    loop {
        tokio::select! {
            biased;
            _ = &mut stop => break,
            _ = drained(&mut drain), if !admin => break,
            r = listener.accept() => match r {
                Ok((stream, _peer)) => {
                    let _ = stream.set_nodelay(true);
                    let tracker = if admin {
                        None
                    } else {
                        let t = shared.conn_tracker.lock().unwrap_or_else(|e| e.into_inner()).clone();
                        let Some(t) = t else { break };
                        Some(t)
                    };
                    tokio::spawn(serve_connection(shared.clone(), role.clone(), stream, tracker));
                }
                Err(e) => {
                    // Out of file descriptors and the like: back off instead of spinning.
                    tracing::warn!(listener = role.name(), error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            }
        }
    }
}

/// Most concurrent streams a client may open on one HTTP/2 connection (its
/// `SETTINGS_MAX_CONCURRENT_STREAMS`); more are refused with `REFUSED_STREAM`, which clients
/// retry. gRPC clients open one connection and multiplex everything on it.
pub const H2_MAX_CONCURRENT_STREAMS: u32 = 256;
/// Streams a client may reset before the server accepted them, at once, before the connection is
/// closed with `GOAWAY ENHANCE_YOUR_CALM` (the rapid-reset attack, CVE-2023-44487).
pub const H2_MAX_PENDING_RESETS: usize = 20;
/// An HTTP/2 connection is PINGed after this long without a frame, and closed when the PING is
/// not answered within [`H2_KEEPALIVE_TIMEOUT`]: a vanished client does not hold its streams.
pub const H2_KEEPALIVE_INTERVAL: Duration = Duration::from_secs(60);
pub const H2_KEEPALIVE_TIMEOUT: Duration = Duration::from_secs(20);

/// A served connection of either version: polled to completion, or asked to finish.
trait Served: std::future::Future<Output = Result<(), hyper::Error>> {
    fn graceful_shutdown(self: std::pin::Pin<&mut Self>);
}

impl<I, S> Served for http1::Connection<I, S>
where
    I: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
    S: hyper::service::HttpService<Incoming, ResBody = crate::body::BoxBody>,
{
    fn graceful_shutdown(self: std::pin::Pin<&mut Self>) {
        http1::Connection::graceful_shutdown(self)
    }
}

impl<I, S> Served for http2::Connection<I, S, TokioExecutor>
where
    I: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
    S: hyper::service::HttpService<Incoming, ResBody = crate::body::BoxBody>,
    S::Future: Send + 'static,
    S::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    fn graceful_shutdown(self: std::pin::Pin<&mut Self>) {
        http2::Connection::graceful_shutdown(self)
    }
}

async fn serve_connection(
    shared: Arc<Shared>,
    role: Role,
    stream: tokio::net::TcpStream,
    _tracker: Option<mpsc::Sender<()>>,
) {
    let peer = stream.peer_addr().ok().map(crate::service::PeerAddr);
    // Inbound, with a workload certificate: a connection that opens with a TLS handshake
    // record is mutual TLS from another sidecar; its verified identity goes with each request.
    if role == Role::Inbound
        && let Some(tls) = shared
            .snapshot()
            .components
            .workload_cert()
            .and_then(|m| m.server_config())
    {
        // Boxed: a TLS session's state is several KiB, which every connection's task would
        // otherwise carry, plaintext ones and listeners without a certificate included.
        Box::pin(serve_maybe_tls(shared, role, stream, peer, tls)).await;
        return;
    }
    serve_io(shared, role, stream, peer, None).await;
}

/// A connection to a listener with a workload certificate: mutual TLS when it opens with a TLS
/// handshake record, else plaintext.
async fn serve_maybe_tls(
    shared: Arc<Shared>,
    role: Role,
    stream: tokio::net::TcpStream,
    peer: Option<crate::service::PeerAddr>,
    tls: Arc<rustls::ServerConfig>,
) {
    // As for the first bytes of a plaintext connection: the head timeout, and the drain
    // (a connection that sends nothing must not hold the shutdown).
    let mut drain = shared.drain_rx.clone();
    let mut first = [0u8; 1];
    let peeked = tokio::select! {
        r = tokio::time::timeout(HEADER_READ_TIMEOUT, stream.peek(&mut first)) => r,
        _ = drained(&mut drain) => return,
    };
    if matches!(peeked, Ok(Ok(1))) && first[0] == crate::mtls::TLS_HANDSHAKE {
        let accepted = tokio::select! {
            r = tokio::time::timeout(
                crate::mtls::HANDSHAKE_TIMEOUT,
                tokio_rustls::TlsAcceptor::from(tls).accept(stream),
            ) => r,
            _ = drained(&mut drain) => return,
        };
        let tls = match accepted {
            Ok(Ok(tls)) => tls,
            Ok(Err(e)) => {
                shared.metrics.mtls.handshake("inbound", "refused");
                tracing::warn!(peer = ?peer.map(|p| p.0), error = %e, "mutual TLS handshake refused");
                return;
            }
            Err(_) => {
                shared.metrics.mtls.handshake("inbound", "timeout");
                tracing::warn!(peer = ?peer.map(|p| p.0), "mutual TLS handshake not done in time; connection closed");
                return;
            }
        };
        let caller = tls
            .get_ref()
            .1
            .peer_certificates()
            .map(weir_identity::tls::peer_identity);
        let caller = match caller {
            Some(Ok(id)) => crate::mtls::Caller(id.short().into()),
            Some(Err(e)) => {
                shared.metrics.mtls.handshake("inbound", "no-identity");
                tracing::warn!(peer = ?peer.map(|p| p.0), error = %e, "a verified peer certificate names no workload; connection closed");
                return;
            }
            None => {
                shared.metrics.mtls.handshake("inbound", "no-identity");
                return;
            }
        };
        shared.metrics.mtls.handshake("inbound", "ok");
        serve_io(shared, role, tls, peer, Some(caller)).await;
        return;
    }
    serve_io(shared, role, stream, peer, None).await;
}

/// Serves one connection's requests, of the version its first bytes say, each marked with its
/// peer address and, over mutual TLS, its caller.
async fn serve_io<I>(
    shared: Arc<Shared>,
    role: Role,
    mut stream: I,
    peer: Option<crate::service::PeerAddr>,
    caller: Option<crate::mtls::Caller>,
) where
    I: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let mut drain = shared.drain_rx.clone();
    // The version, from the first bytes; a client that sends none within the head timeout is
    // closed, as one that sends half a head would be.
    let sniffed = tokio::select! {
        r = tokio::time::timeout(HEADER_READ_TIMEOUT, detect::sniff(&mut stream)) => r,
        _ = drained(&mut drain), if role != Role::Admin => return,
    };
    let (version, prefix) = match sniffed {
        Ok(Ok(v)) => v,
        Ok(Err(e)) => {
            tracing::debug!(listener = role.name(), error = %e, "connection closed before its first byte");
            return;
        }
        Err(_) => {
            tracing::debug!(
                listener = role.name(),
                "no byte received in time; connection closed"
            );
            return;
        }
    };
    shared.metrics.connection(role.name(), version.as_str());
    let stream = detect::Rewind::new(prefix, stream);
    let s2 = shared.clone();
    let r2 = role.clone();
    match version {
        detect::Version::Http1 => {
            let tap = Tap::default();
            let stream = Tapped::new(stream, tap.clone());
            let caller = caller.clone();
            let cache = Arc::new(StackCache::default());
            let svc = hyper::service::service_fn(move |mut req: hyper::Request<Incoming>| {
                if let Some(p) = peer {
                    req.extensions_mut().insert(p);
                }
                if let Some(c) = &caller {
                    req.extensions_mut().insert(c.clone());
                }
                let refused = tap.dispatched(&req).err();
                dispatch(s2.clone(), r2.clone(), cache.clone(), req, refused)
            });
            let conn = http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(HEADER_READ_TIMEOUT)
                .max_header_size(MAX_HEAD_BYTES)
                .max_headers(128)
                .keep_alive(true)
                .serve_connection(TokioIo::new(stream), svc);
            drive(conn, &shared, &role, drain).await;
        }
        detect::Version::Http2 => {
            // No request smuggling to look for: HTTP/2 frames every body itself, and the h2
            // codec refuses `Transfer-Encoding` and other connection-specific headers.
            let cache = Arc::new(StackCache::default());
            let svc = hyper::service::service_fn(move |mut req: hyper::Request<Incoming>| {
                if let Some(p) = peer {
                    req.extensions_mut().insert(p);
                }
                if let Some(c) = &caller {
                    req.extensions_mut().insert(c.clone());
                }
                dispatch(s2.clone(), r2.clone(), cache.clone(), req, None)
            });
            let conn = http2::Builder::new(TokioExecutor::new())
                .timer(TokioTimer::new())
                .max_concurrent_streams(H2_MAX_CONCURRENT_STREAMS)
                .max_header_list_size(MAX_HEAD_BYTES as u32)
                .max_pending_accept_reset_streams(H2_MAX_PENDING_RESETS)
                .keep_alive_interval(H2_KEEPALIVE_INTERVAL)
                .keep_alive_timeout(H2_KEEPALIVE_TIMEOUT)
                .serve_connection(TokioIo::new(stream), svc);
            drive(conn, &shared, &role, drain).await;
        }
    }
}

/// Serves `conn` to its end; when the drain begins, asks it to finish (HTTP/1.1: after the
/// request in flight, with `Connection: close`; HTTP/2: `GOAWAY`, streams in flight finish).
async fn drive<C: Served>(conn: C, shared: &Shared, role: &Role, mut drain: watch::Receiver<bool>) {
    tokio::pin!(conn);
    // Admin connections are left alone by the drain (see `accept_loop`).
    let mut draining = *drain.borrow() || *role == Role::Admin;
    if draining && *role != Role::Admin {
        conn.as_mut().graceful_shutdown();
    }
    loop {
        tokio::select! {
            r = conn.as_mut() => {
                if let Err(e) = r {
                    log_conn_error(shared, role, &e);
                }
                break;
            }
            _ = drained(&mut drain), if !draining => {
                draining = true;
                conn.as_mut().graceful_shutdown();
            }
        }
    }
}

/// The HTTP/2 error that ended a connection, when the proxy ended it for the client's
/// misbehaviour (a `GOAWAY` it sent: `ENHANCE_YOUR_CALM` for floods and rapid resets,
/// `PROTOCOL_ERROR`, `FLOW_CONTROL_ERROR`, `FRAME_SIZE_ERROR`, `COMPRESSION_ERROR`, …).
fn h2_goaway_sent(e: &hyper::Error) -> Option<h2::Reason> {
    let mut cur: Option<&(dyn std::error::Error + 'static)> = Some(e);
    while let Some(err) = cur {
        if let Some(h) = err.downcast_ref::<h2::Error>() {
            return (h.is_go_away() && !h.is_remote())
                .then(|| h.reason())
                .flatten();
        }
        cur = err.source();
    }
    None
}

fn log_conn_error(shared: &Shared, role: &Role, e: &hyper::Error) {
    if let Some(reason) = h2_goaway_sent(e) {
        shared.metrics.h2_goaway(role.name(), reason);
        tracing::warn!(listener = role.name(), reason = %reason, error = %e, "HTTP/2 connection closed for the client's misbehaviour");
        return;
    }
    let reason = if e.is_parse_too_large() {
        "request head too large"
    } else if e.is_parse() {
        "malformed request"
    } else if e.is_timeout() {
        "request head not received in time"
    } else if e.is_incomplete_message() {
        "connection closed before the message completed"
    } else {
        "connection error"
    };
    if e.is_parse() || e.is_parse_too_large() {
        tracing::warn!(listener = role.name(), reason, error = %e, "connection closed");
    } else {
        tracing::debug!(listener = role.name(), reason, error = %e, "connection closed");
    }
}

/// A connection's own copy of its listener's stack, kept from one request to the next. A tower
/// service is called through `&mut self`, so every request needs a stack of its own, and
/// cloning the whole boxed stack for each one cost about 5 % of the proxy's instructions per
/// request (callgrind, `sidecar/benches/profile.sh`). HTTP/1.1 serves a connection's requests
/// one at a time, so one copy serves them all; an HTTP/2 stream that finds the copy in use
/// clones its own. The copy is used only while the snapshot it came from is the current one:
/// after a reload the next request takes the new stack (the old snapshot is not kept alive by
/// the copy: it holds the snapshot weakly).
#[derive(Default)]
struct StackCache(Mutex<Option<(std::sync::Weak<Snapshot>, crate::service::Stack)>>);

impl StackCache {
    /// The kept copy when it came from `snap`, else `pick`'s clone from `snap`.
    fn take(
        &self,
        snap: &Arc<Snapshot>,
        pick: impl FnOnce(&Snapshot) -> Option<&crate::service::Stack>,
    ) -> Option<crate::service::Stack> {
        let kept = self.0.lock().unwrap_or_else(|e| e.into_inner()).take();
        match kept {
            Some((from, stack)) if std::sync::Weak::ptr_eq(&from, &Arc::downgrade(snap)) => {
                Some(stack)
            }
            _ => pick(snap).cloned(),
        }
    }

    fn put(&self, snap: &Arc<Snapshot>, stack: crate::service::Stack) {
        *self.0.lock().unwrap_or_else(|e| e.into_inner()) = Some((Arc::downgrade(snap), stack));
    }
}

/// Calls `stack` with `req`, then keeps it in `cache` for the connection's next request.
async fn call_kept(
    cache: &StackCache,
    snap: &Arc<Snapshot>,
    mut stack: crate::service::Stack,
    req: crate::body::Req,
) -> Result<Resp, Infallible> {
    let resp = tower::Service::call(stack.ready().await?, req).await;
    cache.put(snap, stack);
    resp
}

async fn dispatch(
    shared: Arc<Shared>,
    role: Role,
    cache: Arc<StackCache>,
    req: hyper::Request<Incoming>,
    refused: Option<&'static str>,
) -> Result<Resp, Infallible> {
    if let Some(reason) = refused {
        // Ambiguous framing: answered here, before any stack, and the connection is closed.
        tracing::warn!(listener = role.name(), reason, method = %req.method(), path = req.uri().path(), "refused request");
        return Ok(reject_closing(Reason::BadRequest));
    }
    // Every error of this body is the downstream client's (see `ClientBodyError`).
    let req = req.map(|b| {
        b.map_err(|e| BodyError::new(ClientBodyError(e)))
            .boxed_unsync()
    });
    match role {
        // Boxed: the admin endpoints' future is several KiB, and hyper keeps the future of a
        // connection's request in a box of its own made when the connection opens; inline, every
        // proxied request's future would be that size too (memory per connection, and a copy of
        // it per request).
        Role::Admin => Ok(Box::pin(admin::handle(&shared, req)).await),
        Role::Inbound => {
            let mut req = req;
            crate::mtls::mark_caller(&mut req);
            let snap = shared.snapshot();
            let svc = cache
                .take(&snap, |s| Some(&s.inbound))
                .unwrap_or_else(|| snap.inbound.clone());
            call_kept(&cache, &snap, svc, req).await
        }
        Role::Outbound(name) => {
            let snap = shared.snapshot();
            match cache.take(&snap, |s| s.outbound.get(&name)) {
                Some(svc) => call_kept(&cache, &snap, svc, req).await,
                None => Ok(reject(Reason::UnknownDependency)),
            }
        }
    }
}

/// A running proxy.
pub struct Proxy {
    pub shared: Arc<Shared>,
    drain_tx: watch::Sender<bool>,
    conn_rx: mpsc::Receiver<()>,
    reload_task: tokio::task::JoinHandle<()>,
}

impl Proxy {
    /// Builds the stacks and binds every listener; `Err` when a listener cannot be bound.
    pub async fn start(config: ProxyConfig, raw: Vec<u8>, opts: Options) -> Result<Proxy, String> {
        let metrics = Metrics::new();
        let env = Env {
            metrics: metrics.clone(),
            clients: Clients::new(),
            access_log: opts.access_log,
            otlp_flush_interval: opts.otlp_flush_interval,
            resolver: crate::discovery::system_resolver(),
        };
        let snap = stack::build(Arc::new(config), None, &env)?;
        let cfg = snap.config.clone();
        let bridge = crate::bridge::Bridge::new(metrics.bridge.clone(), env.clients.http1.clone());
        let (drain_tx, drain_rx) = watch::channel(false);
        let (conn_tx, conn_rx) = mpsc::channel(1);
        let shared = Arc::new(Shared {
            snapshot: RwLock::new(Arc::new(snap)),
            metrics,
            env,
            listeners: Mutex::new(HashMap::new()),
            unbound: Mutex::new(Vec::new()),
            draining: AtomicBool::new(false),
            drain_rx,
            conn_tracker: Mutex::new(Some(conn_tx)),
            bridge,
        });
        let failures = shared.reconcile(&cfg).await;
        if !failures.is_empty() {
            return Err(failures.join("; "));
        }
        shared.bridge.apply(&cfg).await.map_err(|e| e.to_string())?;
        let reload_task = tokio::spawn(watch_config(shared.clone(), opts, raw));
        Ok(Proxy {
            shared,
            drain_tx,
            conn_rx,
            reload_task,
        })
    }

    /// Stops accepting (except on the admin listener), lets in-flight requests finish within
    /// `shutdownGraceMs`, then returns. Returns `false` when the grace period ran out with
    /// connections still open.
    pub async fn shutdown(mut self) -> bool {
        let grace = Duration::from_millis(self.shared.snapshot().config.shutdown_grace_ms);
        self.reload_task.abort();
        self.shared.draining.store(true, Ordering::Release);
        let _ = self.drain_tx.send(true);
        // Every listener stops accepting but the admin one (`/readyz` answers 503 meanwhile).
        self.shared
            .listeners
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .retain(|(role, _), _| *role == Role::Admin);
        self.shared
            .conn_tracker
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take();
        tracing::info!(grace_ms = grace.as_millis() as u64, "draining");
        // The bridge stops pulling and finishes its deliveries alongside the connections.
        let bridge = self.shared.bridge.clone();
        let bridge_stopped = tokio::spawn(async move { bridge.shutdown(grace).await });
        let clean = tokio::time::timeout(grace, self.conn_rx.recv())
            .await
            .is_ok();
        let _ = bridge_stopped.await;
        if clean {
            tracing::info!("all connections closed");
        } else {
            tracing::warn!("grace period over with requests still in flight");
        }
        if let Some(sink) = self.shared.snapshot().components.span_sink() {
            sink.flush(Duration::from_secs(2)).await;
        }
        clean
    }
}

async fn watch_config(shared: Arc<Shared>, opts: Options, mut last: Vec<u8>) {
    loop {
        tokio::time::sleep(opts.reload_interval).await;
        let bytes = match tokio::fs::read(&opts.config_path).await {
            Ok(b) => b,
            Err(e) => {
                // A ConfigMap update swaps a symlink: a missing file can be transient.
                tracing::debug!(path = %opts.config_path.display(), error = %e, "config file unreadable");
                continue;
            }
        };
        if bytes == last {
            continue;
        }
        last = bytes;
        let text = String::from_utf8_lossy(&last);
        match ProxyConfig::from_json(&text) {
            Ok(cfg) if cfg == *shared.snapshot().config => {}
            Ok(cfg) => match shared.apply(cfg).await {
                Ok(()) => {
                    shared.metrics.config_reload(true);
                    tracing::info!(path = %opts.config_path.display(), "config reloaded");
                }
                Err(e) => {
                    shared.metrics.config_reload(false);
                    tracing::error!(path = %opts.config_path.display(), error = %e, "config reloaded with errors");
                }
            },
            Err(e) => {
                shared.metrics.config_reload(false);
                tracing::error!(
                    path = %opts.config_path.display(),
                    field = %e.field,
                    error = %e.message,
                    "invalid config refused; keeping the previous one"
                );
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The size of the future `f` would return, without calling it.
    fn future_size<F: std::future::Future>(_f: &dyn Fn() -> F) -> usize {
        std::mem::size_of::<F>()
    }

    /// Every open connection carries its task's future and, in a box hyper makes when the
    /// connection opens, room for one request's future; each request's future is also copied
    /// into that box. Both stay small only while the large, rare parts are boxed apart: the
    /// admin endpoints' future in `dispatch` (4.5 KiB of request future before it was, in this
    /// test's build) and the TLS handshake and session in `serve_maybe_tls` (11 KiB of
    /// connection future). In the dev build: 1.2 KiB and 3.9 KiB.
    #[test]
    #[allow(unreachable_code)]
    fn connection_and_request_futures_stay_small() {
        let request = future_size(&|| {
            dispatch(
                unreachable!(),
                Role::Inbound,
                unreachable!(),
                unreachable!(),
                None,
            )
        });
        let connection =
            future_size(&|| serve_connection(unreachable!(), Role::Inbound, unreachable!(), None));
        assert!(
            request <= 2 * 1024,
            "a request's future is {request} bytes: box what only some requests need (the admin endpoints, …)"
        );
        assert!(
            connection <= 6 * 1024,
            "a connection's future is {connection} bytes: box what only some connections need (TLS, …)"
        );
    }
}
