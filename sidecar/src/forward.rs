//! The innermost services: the pooled clients that forward to the app or to a dependency, and the
//! per-attempt timeout that bounds each call by the request's deadline.
//!
//! Each target is spoken to in one HTTP version, whatever the caller used ([`WireProtocol`]):
//! HTTP/1.1 over a keep-alive pool, or HTTP/2 (h2c with prior knowledge; ALPN `h2` over TLS) over
//! a few multiplexed connections. Bodies and trailers are streamed frame by frame either way, so
//! gRPC's `grpc-status` trailers cross an HTTP/2 hop intact (an HTTP/1.1 hop carries trailers
//! only in chunked bodies, which gRPC never uses).

use crate::balance::{Avoid, Balancer, Health, Outcome, ServedBy};
use crate::body::{BodyError, BoxBody, ClientBodyError, Reason, Req, Resp, reject, reject_closing};
use crate::connected_at::{ConnectedAt, Timed};
use crate::layers::{BoxFuture, always_ready};
use crate::mtls::MtlsConnector;
use crate::pool::{Pool, PoolError};
use http::header::{CONNECTION, HOST, HeaderName, TE};
use http::uri::{Authority, PathAndQuery, Scheme};
use http::{HeaderMap, HeaderValue, Uri};
use http_body_util::BodyExt;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::{TokioExecutor, TokioTimer};
use std::collections::HashMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;
use tower::Service;
use weir_crds::proxy::WireProtocol;

pub type HttpClient = Client<HttpConnector, BoxBody>;

/// Idle pooled connections are closed after this; new connections resolve the name again.
pub const POOL_IDLE_TIMEOUT: Duration = Duration::from_secs(30);

fn connector() -> HttpConnector {
    let mut conn = HttpConnector::new();
    conn.set_nodelay(true);
    conn.set_connect_timeout(Some(Duration::from_secs(10)));
    conn.set_keepalive(Some(Duration::from_secs(60)));
    conn
}

/// [`connector`] for any scheme: the TCP under a TLS layer of the sidecar's own (mutual TLS).
pub(crate) fn tcp_connector() -> HttpConnector {
    let mut c = connector();
    c.enforce_http(false);
    c
}

fn builder() -> hyper_util::client::legacy::Builder {
    let mut b = Client::builder(TokioExecutor::new());
    b.pool_idle_timeout(POOL_IDLE_TIMEOUT)
        .pool_timer(TokioTimer::new())
        .pool_max_idle_per_host(256);
    b
}

pub fn new_client() -> HttpClient {
    builder().build(connector())
}

/// The HTTP/2 client (h2c with prior knowledge). Streams on one connection are bounded by the
/// peer's `SETTINGS_MAX_CONCURRENT_STREAMS`; hyper opens no second connection to the same peer, so
/// a sidecar's calls to one upstream share one connection per target address.
pub fn new_h2_client() -> HttpClient {
    let mut b = builder();
    h2_settings(&mut b);
    b.build(connector())
}

fn h2_settings(b: &mut hyper_util::client::legacy::Builder) {
    b.http2_only(true)
        .timer(TokioTimer::new())
        // A dead peer (no RST, no FIN) is found by PINGs rather than by the next call hanging.
        .http2_keep_alive_interval(Duration::from_secs(30))
        .http2_keep_alive_timeout(Duration::from_secs(10))
        .http2_keep_alive_while_idle(false)
        .http2_adaptive_window(true)
        .http2_max_header_list_size(crate::listen::MAX_HEAD_BYTES as u32);
}

/// The client for `https://` upstreams (rustls, system roots; `SSL_CERT_FILE`/`SSL_CERT_DIR`
/// are honoured). Built on first use so a proxy without TLS upstreams never loads the roots.
pub type HttpsClient = Client<hyper_rustls::HttpsConnector<HttpConnector>, BoxBody>;

static HTTPS: OnceLock<Result<HttpsClient, String>> = OnceLock::new();
static HTTPS_H2: OnceLock<Result<HttpsClient, String>> = OnceLock::new();

/// The `https://` client for `protocol`: ALPN `http/1.1`, or ALPN `h2` only (an upstream
/// declared HTTP/2 that cannot speak it fails the handshake rather than being spoken to in
/// HTTP/1.1, which would strip gRPC's trailers).
pub fn https_client(protocol: WireProtocol) -> Result<&'static HttpsClient, &'static str> {
    let cell = match protocol {
        WireProtocol::Http1 => &HTTPS,
        WireProtocol::Http2 => &HTTPS_H2,
    };
    cell.get_or_init(|| {
        let conn = tcp_connector();
        let tls = hyper_rustls::HttpsConnectorBuilder::new()
            .with_provider_and_native_roots(Arc::new(rustls::crypto::ring::default_provider()))
            .map_err(|e| format!("no usable TLS root certificates: {e}"))?
            .https_only();
        let mut b = builder();
        let tls = match protocol {
            WireProtocol::Http1 => tls.enable_http1().wrap_connector(conn),
            WireProtocol::Http2 => {
                h2_settings(&mut b);
                tls.enable_http2().wrap_connector(conn)
            }
        };
        Ok(b.build(tls))
    })
    .as_ref()
    .map_err(String::as_str)
}

/// Where a listener forwards to.
#[derive(Debug, Clone)]
pub struct Target {
    scheme: Scheme,
    authority: Authority,
    /// Path prefix of the upstream URL without its trailing slash (`""` for none).
    prefix: String,
    /// Host header to send (outbound: the upstream's authority); `None` keeps the caller's.
    host: Option<HeaderValue>,
    /// The HTTP version spoken to it.
    protocol: WireProtocol,
}

impl Target {
    /// The app on loopback: the caller's Host header is kept.
    pub fn app(addr: std::net::SocketAddr, protocol: WireProtocol) -> Target {
        Target {
            scheme: Scheme::HTTP,
            authority: addr
                .to_string()
                .parse()
                .expect("a socket address is an authority"),
            prefix: String::new(),
            host: None,
            protocol,
        }
    }

    /// A dependency's URL, e.g. `http://users.shop.svc.cluster.local:80` or `http://api/v2`.
    pub fn upstream(url: &str, protocol: WireProtocol) -> Result<Target, InvalidUpstream> {
        let uri: Uri = url.parse().map_err(|e| InvalidUpstream::Unparsable {
            url: url.to_string(),
            message: format!("{e}"),
        })?;
        let scheme = uri
            .scheme()
            .cloned()
            .ok_or_else(|| InvalidUpstream::NoScheme(url.to_string()))?;
        let authority = uri
            .authority()
            .cloned()
            .ok_or_else(|| InvalidUpstream::NoHost(url.to_string()))?;
        let host = HeaderValue::from_str(authority.as_str())
            .map_err(|e| InvalidUpstream::Host(e.to_string()))?;
        Ok(Target {
            scheme,
            authority,
            prefix: uri.path().trim_end_matches('/').to_string(),
            host: Some(host),
            protocol,
        })
    }

    /// Cleartext HTTP/1.1: spoken through a [`Pool`] of each address called.
    fn pooled(&self) -> bool {
        self.scheme == Scheme::HTTP && self.protocol == WireProtocol::Http1
    }

    /// The address of a [`Target::pooled`] target named by one.
    fn pooled_addr(&self) -> Option<SocketAddr> {
        if !self.pooled() {
            return None;
        }
        let host = self.authority.host();
        let host = host.trim_start_matches('[').trim_end_matches(']');
        let ip: std::net::IpAddr = host.parse().ok()?;
        Some(SocketAddr::new(ip, self.authority.port_u16().unwrap_or(80)))
    }

    fn uri(&self, pq: Option<&PathAndQuery>) -> Uri {
        let pq = match (self.prefix.is_empty(), pq) {
            (true, Some(pq)) => pq.clone(),
            (true, None) => PathAndQuery::from_static("/"),
            (false, pq) => {
                let rest = pq.map_or("/", |p| p.as_str());
                format!("{}{}", self.prefix, rest)
                    .parse()
                    .unwrap_or_else(|_| PathAndQuery::from_static("/"))
            }
        };
        let mut parts = http::uri::Parts::default();
        parts.scheme = Some(self.scheme.clone());
        parts.authority = Some(self.authority.clone());
        parts.path_and_query = Some(pq);
        Uri::from_parts(parts).expect("scheme, authority and path make a URI")
    }
}

/// An `outbound[].upstream` that is no usable URL; the config naming it is refused (the text
/// follows the field's name in the config error).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum InvalidUpstream {
    #[error("{url}: {message}")]
    Unparsable { url: String, message: String },
    #[error("{0}: no scheme")]
    NoScheme(String),
    #[error("{0}: no host")]
    NoHost(String),
    /// The host is not a valid `Host` header value.
    #[error("{0}")]
    Host(String),
}

/// Whether the request's `TE` header lists `trailers`.
fn accepts_trailers(h: &HeaderMap) -> bool {
    h.get_all(TE).iter().any(|v| {
        v.to_str().is_ok_and(|s| {
            s.split(',')
                .any(|t| t.trim().eq_ignore_ascii_case("trailers"))
        })
    })
}

const HOP_BY_HOP: [HeaderName; 6] = [
    HeaderName::from_static("keep-alive"),
    HeaderName::from_static("proxy-connection"),
    HeaderName::from_static("te"),
    HeaderName::from_static("trailer"),
    HeaderName::from_static("transfer-encoding"),
    HeaderName::from_static("upgrade"),
];

/// Removes the hop-by-hop headers (RFC 9110 §7.6.1), including those named by `Connection`.
pub fn strip_hop_by_hop(h: &mut HeaderMap) {
    // One pass comparing the names a message carries (a handful) rather than a hashed lookup
    // per hop-by-hop name: this runs on every request and every response, most requests carry
    // none of them and most responses only `Connection` (sidecar/benches/profile.sh).
    let (mut connection, mut listed) = (false, false);
    for n in h.keys() {
        if *n == CONNECTION {
            connection = true;
        } else if HOP_BY_HOP.contains(n) {
            listed = true;
        }
    }
    if connection {
        // Every Connection line names headers: `HeaderMap::remove` gives back only the first
        // value, so the names are read from all of them before any is removed.
        let mut named: Vec<HeaderName> = Vec::new();
        for value in h.get_all(CONNECTION) {
            let Ok(s) = value.to_str() else { continue };
            for name in s.split(',') {
                let name = name.trim();
                // What a keep-alive response nearly always says: the header it names, when
                // present, is one of HOP_BY_HOP and goes below.
                if name.eq_ignore_ascii_case("keep-alive") {
                    continue;
                }
                if let Ok(n) = HeaderName::from_bytes(name.as_bytes()) {
                    named.push(n);
                }
            }
        }
        h.remove(CONNECTION);
        for n in named {
            h.remove(n);
        }
    }
    if listed {
        for n in &HOP_BY_HOP {
            h.remove(n);
        }
    }
}

/// The cleartext clients, one per [`WireProtocol`], shared by every stack of a sidecar, and
/// the HTTP/1.1 connection pools of the targets named by address (kept across reloads).
#[derive(Clone, Debug)]
pub struct Clients {
    pub http1: HttpClient,
    pub http2: HttpClient,
    pools: Arc<Mutex<HashMap<SocketAddr, Pool>>>,
}

impl Clients {
    pub fn new() -> Clients {
        Clients {
            http1: new_client(),
            http2: new_h2_client(),
            pools: Arc::default(),
        }
    }

    /// The HTTP/1.1 pool of `addr`, the same for every stack that calls it.
    pub fn pool(&self, addr: SocketAddr) -> Pool {
        self.pools
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .entry(addr)
            .or_insert_with(|| Pool::new(addr))
            .clone()
    }

    pub fn get(&self, protocol: WireProtocol) -> &HttpClient {
        match protocol {
            WireProtocol::Http1 => &self.http1,
            WireProtocol::Http2 => &self.http2,
        }
    }
}

impl Default for Clients {
    fn default() -> Self {
        Clients::new()
    }
}

/// The client of a dependency's sidecar over mutual TLS.
pub type MtlsClient = Client<MtlsConnector, BoxBody>;

fn mtls_client<C>(connector: C, protocol: WireProtocol) -> Client<C, BoxBody>
where
    C: hyper_util::client::legacy::connect::Connect + Clone,
{
    let mut b = builder();
    if protocol == WireProtocol::Http2 {
        h2_settings(&mut b);
    }
    b.build(connector)
}

#[derive(Clone, Debug)]
pub struct Forward {
    client: HttpClient,
    /// Cleartext HTTP/1.1 to an address: the pool of that address (see [`crate::pool`]).
    pool: Option<Pool>,
    /// Set: every call is mutual TLS to the dependency's sidecar (`peerIdentity`).
    mtls: Option<MtlsClient>,
    target: Arc<Target>,
    /// Reason given when the target cannot be reached.
    connect_reason: Reason,
}

impl Forward {
    pub fn new(clients: &Clients, target: Target, connect_reason: Reason) -> Self {
        Forward {
            client: clients.get(target.protocol).clone(),
            pool: target.pooled_addr().map(|a| clients.pool(a)),
            mtls: None,
            target: Arc::new(target),
            connect_reason,
        }
    }

    /// Calls over mutual TLS with `connector` (the dependency's identity in it).
    pub fn with_mtls(mut self, connector: Option<MtlsConnector>) -> Self {
        self.mtls = connector.map(|c| mtls_client(c, self.target.protocol));
        if self.mtls.is_some() {
            self.pool = None;
        }
        self
    }
}

impl Service<Req> for Forward {
    type Response = Resp;
    type Error = Infallible;
    type Future = BoxFuture;
    always_ready!();

    fn call(&mut self, mut req: Req) -> BoxFuture {
        if let Err(refused) = prepare(&self.target, &mut req) {
            return Box::pin(std::future::ready(Ok(reject(refused))));
        }
        let connect_reason = self.connect_reason;
        if let Some(pool) = &self.pool {
            let pool = pool.clone();
            return Box::pin(async move { Ok(send(pool.send(req), connect_reason).await.resp) });
        }
        let fut = if let Some(c) = &self.mtls {
            c.request(req)
        } else if self.target.scheme == Scheme::HTTPS {
            match https_client(self.target.protocol) {
                Ok(c) => c.request(req),
                Err(e) => {
                    tracing::warn!(error = e, "cannot call an https:// upstream");
                    return Box::pin(std::future::ready(Ok(reject(connect_reason))));
                }
            }
        } else {
            self.client.request(req)
        };
        Box::pin(async move { Ok(send(fut, connect_reason).await.resp) })
    }
}

/// Turns a request the app sent to its local listener into one for `target`: the URI, the
/// HTTP version, `Host`/`:authority`, hop-by-hop headers, and a gRPC call's time left. The
/// reason to refuse it instead when the target cannot be spoken to.
fn prepare(target: &Target, req: &mut Req) -> Result<(), Reason> {
    if target.scheme != Scheme::HTTPS && target.scheme != Scheme::HTTP {
        return Err(Reason::UnsupportedScheme);
    }
    // A caller that spoke HTTP/2 named the authority in `:authority`, not in Host: it is
    // kept as Host, which an HTTP/1.1 app reads (and an HTTP/2 app receives alongside).
    if !req.headers().contains_key(HOST)
        && let Some(a) = req.uri().authority()
        && let Ok(v) = HeaderValue::from_str(a.as_str())
    {
        req.headers_mut().insert(HOST, v);
    }
    *req.uri_mut() = target.uri(req.uri().path_and_query());
    let h2 = target.protocol == WireProtocol::Http2;
    *req.version_mut() = if h2 {
        http::Version::HTTP_2
    } else {
        http::Version::HTTP_11
    };
    let h = req.headers_mut();
    // `TE: trailers` is the one hop-by-hop value HTTP/2 keeps (RFC 9113 §8.2.2): gRPC
    // servers expect it to know the client reads trailers.
    let te_trailers = h2 && accepts_trailers(h);
    strip_hop_by_hop(h);
    if te_trailers {
        h.insert(TE, HeaderValue::from_static("trailers"));
    }
    // A gRPC call carries its deadline to the next hop as the time left now (the caller's
    // `grpc-timeout` was read into the deadline and removed).
    if crate::layers::grpc::is_marked(req)
        && let Some(at) = crate::layers::deadline_of(req)
    {
        let left = at.saturating_duration_since(tokio::time::Instant::now());
        req.headers_mut().insert(
            crate::layers::grpc::GRPC_TIMEOUT,
            crate::layers::grpc::encode_timeout(left),
        );
    }
    let h = req.headers_mut();
    match &target.host {
        // HTTP/2 carries the authority in `:authority` (from the URI); a Host header as well
        // would be a second, possibly different, authority.
        Some(_) if h2 => drop(h.remove(HOST)),
        Some(host) => drop(h.insert(HOST, host.clone())),
        None => {}
    }
    Ok(())
}

/// What came back from one forwarded request.
struct Sent {
    resp: Resp,
    /// The connection failed (refused, reset, closed early): the target's fault.
    gateway_failure: bool,
    /// No connection could be made at all.
    connect_failure: bool,
    /// The caller's request body broke: nobody's fault but the caller's.
    client_fault: bool,
}

/// What failed a forwarded request, from either client.
trait SendError: std::error::Error + Send + Sync + 'static {
    /// No connection could be made at all.
    fn is_connect(&self) -> bool;
}

impl SendError for hyper_util::client::legacy::Error {
    fn is_connect(&self) -> bool {
        hyper_util::client::legacy::Error::is_connect(self)
    }
}

impl SendError for PoolError {
    fn is_connect(&self) -> bool {
        PoolError::is_connect(self)
    }
}

async fn send<E: SendError>(
    fut: impl std::future::Future<Output = Result<http::Response<hyper::body::Incoming>, E>>,
    connect_reason: Reason,
) -> Sent {
    match fut.await {
        Ok(resp) => {
            let mut resp = resp.map(|b| b.map_err(BodyError::new).boxed_unsync());
            strip_hop_by_hop(resp.headers_mut());
            Sent {
                resp,
                gateway_failure: false,
                connect_failure: false,
                client_fault: false,
            }
        }
        Err(e) => {
            if let Some(client) = ClientBodyError::in_chain(&e) {
                // The request body the client sent broke (bad chunk, aborted upload): its
                // fault, not the upstream's. The connection is closed: the rest of its bytes
                // cannot be framed.
                tracing::warn!(
                    reason = Reason::ClientBodyError.as_str(),
                    error = %client,
                    "request body from the client failed; not forwarded in full"
                );
                return Sent {
                    resp: reject_closing(Reason::ClientBodyError),
                    gateway_failure: false,
                    connect_failure: false,
                    client_fault: true,
                };
            }
            let reason = if e.is_connect() {
                connect_reason
            } else {
                Reason::UpstreamError
            };
            let detail = std::error::Error::source(&e)
                .map(|s| s.to_string())
                .unwrap_or_default();
            tracing::warn!(reason = reason.as_str(), error = %e, detail, "forwarding failed");
            Sent {
                resp: reject(reason),
                gateway_failure: true,
                connect_failure: e.is_connect(),
                client_fault: false,
            }
        }
    }
}

/// A connector that dials one endpoint whatever the URI names, so the URI (and with it
/// `Host`/`:authority`, TLS's server name and the pool key) keeps the dependency's name while
/// each endpoint gets a client, and a pool, of its own.
#[derive(Clone, Debug)]
struct Pinned {
    inner: HttpConnector,
    to: Uri,
}

impl Service<Uri> for Pinned {
    type Response = <HttpConnector as Service<Uri>>::Response;
    type Error = <HttpConnector as Service<Uri>>::Error;
    type Future = <HttpConnector as Service<Uri>>::Future;

    fn poll_ready(
        &mut self,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, _: Uri) -> Self::Future {
        self.inner.call(self.to.clone())
    }
}

/// One endpoint's client.
#[derive(Clone, Debug)]
enum EndpointClient {
    /// Cleartext HTTP/1.1 (see [`crate::pool`]).
    Pool(Pool),
    Plain(Client<Timed<Pinned>, BoxBody>),
    Tls(Client<Timed<hyper_rustls::HttpsConnector<Pinned>>, BoxBody>),
    Mtls(Client<Timed<MtlsConnector>, BoxBody>),
}

impl EndpointClient {
    fn new(
        addr: SocketAddr,
        target: &Target,
        mtls: Option<&MtlsConnector>,
    ) -> Result<EndpointClient, String> {
        if let Some(c) = mtls {
            return Ok(EndpointClient::Mtls(mtls_client(
                Timed(c.pinned(addr)),
                target.protocol,
            )));
        }
        if target.pooled() {
            return Ok(EndpointClient::Pool(Pool::new(addr)));
        }
        let pinned = Pinned {
            inner: tcp_connector(),
            to: format!("http://{addr}")
                .parse()
                .expect("a socket address is an authority"),
        };
        let mut b = builder();
        let h2 = target.protocol == WireProtocol::Http2;
        if h2 {
            h2_settings(&mut b);
        }
        if target.scheme != Scheme::HTTPS {
            return Ok(EndpointClient::Plain(b.build(Timed(pinned))));
        }
        let tls = hyper_rustls::HttpsConnectorBuilder::new()
            .with_provider_and_native_roots(Arc::new(rustls::crypto::ring::default_provider()))
            .map_err(|e| format!("no usable TLS root certificates: {e}"))?
            .https_only();
        let tls = if h2 {
            tls.enable_http2().wrap_connector(pinned)
        } else {
            tls.enable_http1().wrap_connector(pinned)
        };
        Ok(EndpointClient::Tls(b.build(Timed(tls))))
    }

    /// Sends `req`, as [`send`] tells.
    async fn send(&self, req: Req, connect_reason: Reason) -> Sent {
        match self {
            EndpointClient::Pool(p) => send(p.send(req), connect_reason).await,
            EndpointClient::Plain(c) => send(c.request(req), connect_reason).await,
            EndpointClient::Tls(c) => send(c.request(req), connect_reason).await,
            EndpointClient::Mtls(c) => send(c.request(req), connect_reason).await,
        }
    }
}

/// Forwards each request to one of the dependency's endpoints, chosen per request by the
/// [`Balancer`], and tells it how the request went: a connection refused or reset, a 502, 503
/// or 504, or a gRPC `UNAVAILABLE` in the response headers is a gateway failure of that
/// endpoint (outlier ejection); anything else a success, timed at the response headers (the
/// latency estimate). Until discovery has an answer, and for a URL whose name has a single
/// address, requests go to the target by name as [`Forward`] sends them.
#[derive(Clone, Debug)]
pub struct Balanced {
    balancer: Balancer,
    target: Arc<Target>,
    by_name: Forward,
    /// Only balance when there are at least two endpoints (a URL's own name).
    implicit: bool,
    clients: Arc<Mutex<HashMap<SocketAddr, Arc<EndpointClient>>>>,
    connect_reason: Reason,
    mtls: Option<MtlsConnector>,
}

impl Balanced {
    pub fn new(
        clients: &Clients,
        target: Target,
        connect_reason: Reason,
        balancer: Balancer,
        implicit: bool,
    ) -> Self {
        Balanced {
            balancer,
            by_name: Forward::new(clients, target.clone(), connect_reason),
            target: Arc::new(target),
            implicit,
            clients: Arc::default(),
            connect_reason,
            mtls: None,
        }
    }

    /// Calls every endpoint (and the name, before discovery answers) over mutual TLS.
    pub fn with_mtls(mut self, connector: Option<MtlsConnector>) -> Self {
        self.by_name = self.by_name.with_mtls(connector.clone());
        self.mtls = connector;
        self
    }

    fn client(&self, addr: SocketAddr) -> Result<Arc<EndpointClient>, String> {
        let mut map = self.clients.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(c) = map.get(&addr) {
            return Ok(c.clone());
        }
        // Endpoints that left the set lose their clients (and idle connections) here.
        let current = self.balancer.endpoints();
        map.retain(|a, _| current.iter().any(|e| e.addr == *a));
        let c = Arc::new(EndpointClient::new(addr, &self.target, self.mtls.as_ref())?);
        map.insert(addr, c.clone());
        Ok(c)
    }
}

impl Service<Req> for Balanced {
    type Response = Resp;
    type Error = Infallible;
    type Future = BoxFuture;
    always_ready!();

    fn call(&mut self, mut req: Req) -> BoxFuture {
        // A URL's name is balanced once it has two addresses or more; a declared set from one.
        let at_least = if self.implicit { 2 } else { 1 };
        let avoid = req.extensions().get::<Avoid>().map(|a| a.0);
        let Some(picked) = self.balancer.pick_from(avoid, at_least) else {
            return self.by_name.call(req);
        };
        if let Err(refused) = prepare(&self.target, &mut req) {
            return Box::pin(std::future::ready(Ok(reject(refused))));
        }
        let addr = picked.endpoint.addr;
        let client = match self.client(addr) {
            Ok(c) => c,
            Err(e) => {
                tracing::warn!(error = e, "cannot call an https:// upstream");
                return Box::pin(std::future::ready(Ok(reject(self.connect_reason))));
            }
        };
        let balancer = self.balancer.clone();
        let connect_reason = self.connect_reason;
        let mut picked = picked;
        Box::pin(async move {
            let sent = client.send(req, connect_reason).await;
            let mut resp = sent.resp;
            let status = resp.status().as_u16();
            let outcome = if sent.client_fault {
                Outcome::Cancelled
            } else if sent.connect_failure {
                Outcome::ConnectFailure
            } else if sent.gateway_failure
                || matches!(status, 502..=504)
                || crate::layers::grpc::status_in_headers(&resp) == Some(UNAVAILABLE)
            {
                Outcome::GatewayFailure
            } else {
                Outcome::Success
            };
            // Timed from when its connection was ready, if it waited for one.
            if let Some(at) = resp.extensions().get::<ConnectedAt>() {
                picked.waited_for_connection(at.0);
            }
            let endpoint = picked.endpoint.clone();
            picked.finish(outcome);
            // Only what a retry may follow is marked (a gateway failure, any 5xx): a good
            // answer goes on without an extension to allocate.
            let gateway = matches!(outcome, Outcome::GatewayFailure | Outcome::ConnectFailure);
            if gateway || status >= 500 {
                // The failure that ejected the endpoint (or one from an endpoint already
                // ejected, a failed probe) is the endpoint's, not the dependency's, while
                // others remain.
                let spared = gateway
                    && endpoint.health(tokio::time::Instant::now()) != Health::Active
                    && balancer.others_active(addr);
                resp.extensions_mut().insert(ServedBy { addr, spared });
            }
            Ok(resp)
        })
    }
}

/// gRPC's `UNAVAILABLE`.
const UNAVAILABLE: u16 = 14;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn upstream_urls_keep_their_path_prefix() {
        let t = Target::upstream(
            "http://users.shop.svc.cluster.local:80",
            WireProtocol::Http1,
        )
        .unwrap();
        let pq: PathAndQuery = "/v1/users?id=3".parse().unwrap();
        assert_eq!(
            t.uri(Some(&pq)).to_string(),
            "http://users.shop.svc.cluster.local:80/v1/users?id=3"
        );
        assert_eq!(t.host.as_ref().unwrap(), "users.shop.svc.cluster.local:80");
        let t = Target::upstream("http://api.example.com/v2/", WireProtocol::Http1).unwrap();
        assert_eq!(
            t.uri(Some(&pq)).to_string(),
            "http://api.example.com/v2/v1/users?id=3"
        );
        assert_eq!(t.uri(None).to_string(), "http://api.example.com/v2/");
    }

    #[test]
    fn hop_by_hop_headers_are_removed() {
        let mut h = HeaderMap::new();
        h.insert(
            CONNECTION,
            HeaderValue::from_static("keep-alive, x-private"),
        );
        h.insert("x-private", HeaderValue::from_static("1"));
        h.insert("keep-alive", HeaderValue::from_static("timeout=5"));
        h.insert("transfer-encoding", HeaderValue::from_static("chunked"));
        h.insert("x-kept", HeaderValue::from_static("1"));
        strip_hop_by_hop(&mut h);
        assert_eq!(h.len(), 1);
        assert!(h.contains_key("x-kept"));
    }

    #[test]
    fn hop_by_hop_headers_are_removed_however_they_come() {
        let names = |h: &HeaderMap| {
            let mut v: Vec<String> = h.keys().map(|n| n.to_string()).collect();
            v.sort();
            v
        };
        // (headers given, names left)
        type Case<'a> = (&'a [(&'a str, &'a str)], &'a [&'a str]);
        let cases: &[Case] = &[
            // Nothing hop-by-hop: untouched.
            (&[("host", "a"), ("x-a", "1")], &["host", "x-a"]),
            // What a keep-alive response carries.
            (&[("connection", "keep-alive"), ("x-a", "1")], &["x-a"]),
            // A listed header without Connection.
            (
                &[("upgrade", "h2c"), ("te", "trailers"), ("x-a", "1")],
                &["x-a"],
            ),
            // Connection repeated, naming headers in any case, `close` among them.
            (
                &[
                    ("connection", "close, X-One"),
                    ("connection", "x-two"),
                    ("x-one", "1"),
                    ("x-two", "2"),
                    ("keep-alive", "timeout=5"),
                    ("x-a", "1"),
                ],
                &["x-a"],
            ),
        ];
        for (given, left) in cases {
            let mut h = HeaderMap::new();
            for (n, v) in *given {
                h.append(HeaderName::from_static(n), HeaderValue::from_static(v));
            }
            strip_hop_by_hop(&mut h);
            assert_eq!(names(&h), *left, "{given:?}");
        }
    }
}
