//! The workload's certificate (`mtls` in the config): made, asked for, renewed.
//!
//! The sidecar makes its own key pair (the private key never leaves this process), sends a CSR
//! for its identity to the issuer's endpoint with the pod's token (read anew each time: the
//! kubelet rotates it), checks that what came back is its own identity and chains to the trust
//! bundle, and installs it in [`CurrentCert`], which every TLS handshake reads: a renewal
//! changes what new connections present and touches no open one. It renews once
//! `renewAtPercent` of the lifetime it got has passed (counted from when it got it: the
//! certificate's `notBefore` is set back for clock skew), and on failure retries after 1 s,
//! doubling to 30 s, with the current certificate still in use until it expires.
//!
//! Readiness follows it: no valid certificate, not ready, with the last reason.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::registry::Registry;
use std::sync::{Arc, RwLock};
use std::time::{Duration, SystemTime};
use tokio::task::JoinHandle;
use weir_crds::proxy::MtlsConfig;
use weir_identity::tls::{CurrentCert, TrustBundle};
use weir_identity::{WorkloadId, WorkloadKey};

/// The first byte of a TLS connection (a handshake record): how the inbound listener tells
/// mutual TLS from plaintext.
pub const TLS_HANDSHAKE: u8 = 0x16;

/// How long an inbound mutual-TLS handshake may take once its first byte came: a handshake
/// that stalls holds a connection (and a task) for no one.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// The header that tells the app who called, `<namespace>/<name>`: set only from a verified
/// mutual-TLS chain, removed from every other request, so the app may trust it.
pub const CALLER_HEADER: &str = "x-weir-caller";

/// A request extension: the caller's identity, `<namespace>/<name>`, from the verified chain of
/// its connection.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Caller(pub Arc<str>);

/// Removes any `x-weir-caller` a request came with, and sets it from its connection's verified
/// identity, if it has one.
pub fn mark_caller<B>(req: &mut http::Request<B>) {
    // A scan of the request's few names is cheaper than the hashed removal it saves.
    if req.headers().keys().any(|n| *n == CALLER_HEADER) {
        req.headers_mut().remove(CALLER_HEADER);
    }
    let value = req
        .extensions()
        .get::<Caller>()
        .and_then(|c| http::HeaderValue::from_str(&c.0).ok());
    if let Some(v) = value {
        req.headers_mut().insert(CALLER_HEADER, v);
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct AuthorizationLabels {
    /// `mtls` or `plaintext`.
    pub transport: &'static str,
    /// The verified caller, `<namespace>/<name>`; empty for plaintext.
    pub caller: String,
    /// `allowed`, `denied`, `audit-denied`, `open` (mTLS); `loopback`, `admitted`, `refused`
    /// (plaintext).
    pub decision: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct HandshakeLabels {
    /// `inbound` or `outbound`.
    pub direction: &'static str,
    /// `ok`, or why not: `refused` (the peer's chain or identity), `timeout`, `no-identity`,
    /// `no-certificate` (outbound, before this workload has one), `error` (the connection).
    pub result: &'static str,
}

/// Counters of mutual TLS and of inbound authorization.
#[derive(Clone, Debug)]
pub struct MtlsMetrics {
    authorizations: Family<AuthorizationLabels, Counter>,
    handshakes: Family<HandshakeLabels, Counter>,
}

impl MtlsMetrics {
    pub fn register(registry: &mut Registry) -> MtlsMetrics {
        let authorizations = Family::<AuthorizationLabels, Counter>::default();
        registry.register(
            "inbound_authorizations",
            "Inbound requests by transport (mtls, plaintext), verified caller and decision (allowed, denied, audit-denied, open; loopback, admitted, refused)",
            authorizations.clone(),
        );
        let handshakes = Family::<HandshakeLabels, Counter>::default();
        registry.register(
            "tls_handshakes",
            "Mutual-TLS handshakes between sidecars, by direction and result",
            handshakes.clone(),
        );
        MtlsMetrics {
            authorizations,
            handshakes,
        }
    }

    /// The counter of one transport, caller and decision.
    pub fn authorization(
        &self,
        transport: &'static str,
        caller: &str,
        decision: &'static str,
    ) -> Counter {
        self.authorizations
            .get_or_create_owned(&AuthorizationLabels {
                transport,
                caller: caller.to_string(),
                decision,
            })
    }

    /// Counts one handshake's result.
    pub fn handshake(&self, direction: &'static str, result: &'static str) {
        self.handshakes
            .get_or_create(&HandshakeLabels { direction, result })
            .inc();
    }
}

/// How long one request to the issuer may take.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);
/// The first retry's delay after a failure; it doubles up to [`MAX_RETRY`].
const FIRST_RETRY: Duration = Duration::from_secs(1);
const MAX_RETRY: Duration = Duration::from_secs(30);

#[derive(Debug, Default)]
struct State {
    /// The installed certificate's expiry.
    not_after: Option<SystemTime>,
    /// Why the last attempt failed (cleared by a success).
    last_error: Option<String>,
    /// Certificates installed so far.
    installed: u64,
    /// The bundle of the last successful round: what outbound handshakes verify peers with.
    bundle: Option<TrustBundle>,
}

/// The workload's certificate and the task that keeps it valid; the task stops on drop.
#[derive(Debug)]
pub struct CertManager {
    pub cert: Arc<CurrentCert>,
    state: Arc<RwLock<State>>,
    /// The inbound listener's TLS config: the current certificate, the bundle of the last
    /// round (rebuilt at each).
    server: Arc<RwLock<Option<Arc<rustls::ServerConfig>>>>,
    /// Outbound TLS configs by expected peer and protocol, with the `installed` count they
    /// were built at (a new round's bundle builds them anew; the session cache lives in them,
    /// so reused configs resume sessions).
    clients: std::sync::Mutex<ClientConfigs>,
    task: JoinHandle<()>,
}

type ClientConfigs =
    std::collections::HashMap<(WorkloadId, bool), (u64, Arc<rustls::ClientConfig>)>;

impl Drop for CertManager {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl CertManager {
    /// Starts asking for the certificate at once.
    pub fn start(cfg: &MtlsConfig) -> Arc<CertManager> {
        let cert = CurrentCert::new();
        let state = Arc::new(RwLock::new(State::default()));
        let server = Arc::new(RwLock::new(None));
        let task = tokio::spawn(keep_valid(
            cfg.clone(),
            cert.clone(),
            state.clone(),
            server.clone(),
        ));
        Arc::new(CertManager {
            cert,
            state,
            server,
            clients: Default::default(),
            task,
        })
    }

    /// The inbound TLS config, once a certificate is installed.
    pub fn server_config(&self) -> Option<Arc<rustls::ServerConfig>> {
        if !self.cert.is_installed() {
            return None;
        }
        self.server
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Ready when a certificate is installed and not expired; else why not.
    pub fn readiness(&self) -> Result<(), String> {
        let st = self.state.read().unwrap_or_else(|e| e.into_inner());
        match (st.not_after, &st.last_error) {
            (Some(t), _) if t > SystemTime::now() => Ok(()),
            (Some(_), Some(e)) => Err(format!("the workload certificate expired; renewing: {e}")),
            (Some(_), None) => Err("the workload certificate expired".into()),
            (None, Some(e)) => Err(format!("no workload certificate yet: {e}")),
            (None, None) => Err("no workload certificate yet".into()),
        }
    }

    /// The outbound TLS config towards `expected` (ALPN `h2` only, or `http/1.1` only), once a
    /// certificate is installed; else why not.
    pub fn client_config(
        &self,
        expected: &WorkloadId,
        h2: bool,
    ) -> Result<Arc<rustls::ClientConfig>, String> {
        let current = {
            let st = self.state.read().unwrap_or_else(|e| e.into_inner());
            st.bundle
                .clone()
                .filter(|_| self.cert.is_installed())
                .map(|b| (st.installed, b))
        };
        let Some((installed, bundle)) = current else {
            return Err(self
                .readiness()
                .err()
                .unwrap_or_else(|| "no workload certificate yet".into()));
        };
        let key = (expected.clone(), h2);
        let mut clients = self.clients.lock().unwrap_or_else(|e| e.into_inner());
        if let Some((at, c)) = clients.get(&key)
            && *at == installed
        {
            return Ok(c.clone());
        }
        let mut config =
            weir_identity::tls::client_config(&bundle, self.cert.clone(), expected.clone())
                .map_err(|e| e.to_string())?;
        config.alpn_protocols = vec![if h2 {
            b"h2".to_vec()
        } else {
            b"http/1.1".to_vec()
        }];
        let config = Arc::new(config);
        clients.insert(key, (installed, config.clone()));
        Ok(config)
    }

    /// Certificates installed since the start (renewals included).
    pub fn installed(&self) -> u64 {
        self.state
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .installed
    }
}

async fn keep_valid(
    cfg: MtlsConfig,
    cert: Arc<CurrentCert>,
    state: Arc<RwLock<State>>,
    server: Arc<RwLock<Option<Arc<rustls::ServerConfig>>>>,
) {
    let mut retry = FIRST_RETRY;
    loop {
        let wait = match obtain(&cfg, &cert).await {
            Ok((not_after, bundle)) => {
                match weir_identity::tls::server_config(&bundle, cert.clone()) {
                    Ok(c) => {
                        *server.write().unwrap_or_else(|e| e.into_inner()) = Some(Arc::new(c));
                    }
                    Err(e) => tracing::warn!(error = %e, "no inbound TLS config"),
                }
                let got = SystemTime::now();
                let lifetime = not_after.duration_since(got).unwrap_or_default();
                let renew_in = lifetime.mul_f64(f64::from(cfg.renew_at_percent) / 100.0);
                tracing::info!(
                    identity = %cfg.identity,
                    valid_s = lifetime.as_secs(),
                    renew_in_s = renew_in.as_secs(),
                    "workload certificate installed"
                );
                let mut st = state.write().unwrap_or_else(|e| e.into_inner());
                st.not_after = Some(not_after);
                st.last_error = None;
                st.installed += 1;
                st.bundle = Some(bundle);
                retry = FIRST_RETRY;
                renew_in.max(Duration::from_millis(100))
            }
            Err(e) => {
                tracing::warn!(identity = %cfg.identity, error = %e, retry_s = retry.as_secs(), "no workload certificate");
                state.write().unwrap_or_else(|e| e.into_inner()).last_error = Some(e);
                let wait = retry;
                retry = (retry * 2).min(MAX_RETRY);
                wait
            }
        };
        tokio::time::sleep(wait).await;
    }
}

/// One round: key, CSR, request, checks, install. Returns the new certificate's expiry and the
/// bundle it was checked with.
async fn obtain(cfg: &MtlsConfig, cert: &CurrentCert) -> Result<(SystemTime, TrustBundle), String> {
    let id = WorkloadId::parse(&cfg.identity).map_err(|e| e.to_string())?;
    let bundle_pem = tokio::fs::read_to_string(&cfg.trust_bundle_file)
        .await
        .map_err(|e| format!("the trust bundle {}: {e}", cfg.trust_bundle_file))?;
    let bundle = TrustBundle::from_pem(&bundle_pem).map_err(|e| e.to_string())?;
    let token = tokio::fs::read_to_string(&cfg.token_file)
        .await
        .map_err(|e| format!("the token {}: {e}", cfg.token_file))?;
    let key = WorkloadKey::generate().map_err(|e| e.to_string())?;
    let csr = key.csr(&id).map_err(|e| e.to_string())?;
    let chain = weir_identity::endpoint::request_certificate(
        &cfg.issuer_url,
        &bundle,
        token.trim(),
        &csr,
        REQUEST_TIMEOUT,
    )
    .await
    .map_err(|e| e.to_string())?;
    // What came back must be this workload's, chain to the bundle, and be valid now.
    check_chain(&chain, &bundle, &id)?;
    let (_, not_after) = weir_identity::tls::leaf_validity(&chain).map_err(|e| e.to_string())?;
    cert.install(&chain, key.private_key())
        .map_err(|e| e.to_string())?;
    Ok((not_after, bundle))
}

/// The issued chain names `id` and verifies up to `bundle` as a client certificate would.
fn check_chain(chain_pem: &str, bundle: &TrustBundle, id: &WorkloadId) -> Result<(), String> {
    use rustls::pki_types::{CertificateDer, UnixTime, pem::PemObject};
    let chain: Vec<CertificateDer<'_>> = CertificateDer::pem_slice_iter(chain_pem.as_bytes())
        .collect::<Result<_, _>>()
        .map_err(|e| format!("the issued chain: {e}"))?;
    let got = weir_identity::tls::peer_identity(&chain).map_err(|e| e.to_string())?;
    if &got != id {
        return Err(format!(
            "the issuer returned a certificate for {got}, not {id}"
        ));
    }
    let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
        bundle.roots(),
        weir_identity::tls::provider(),
    )
    .build()
    .map_err(|e| e.to_string())?;
    verifier
        .verify_client_cert(&chain[0], &chain[1..], UnixTime::now())
        .map_err(|e| {
            format!("the issued certificate does not verify with the trust bundle: {e}")
        })?;
    Ok(())
}

/// Dials a dependency's sidecar and opens mutual TLS: this workload's certificate presented,
/// the peer's chain verified to the bundle and required to name `expected` (the dependency
/// meant), ALPN the one protocol spoken. Pinned to one endpoint, or to the URI's host (each
/// of its addresses in turn). A failure is a connect error: the endpoint's, for ejection.
#[derive(Clone, Debug)]
pub struct MtlsConnector {
    certs: Arc<CertManager>,
    expected: Arc<WorkloadId>,
    h2: bool,
    /// The TCP connector every client of the sidecar uses (its connect timeout, keepalive,
    /// no delay, name resolution).
    tcp: hyper_util::client::legacy::connect::HttpConnector,
    /// Dialed instead of the URI, for one endpoint.
    to: Option<http::Uri>,
    metrics: MtlsMetrics,
}

/// How long the handshake may take once connected (the connect has its own 10 s).
const HANDSHAKE_OUT_TIMEOUT: Duration = Duration::from_secs(10);

impl MtlsConnector {
    pub fn new(
        certs: Arc<CertManager>,
        expected: WorkloadId,
        h2: bool,
        metrics: MtlsMetrics,
    ) -> MtlsConnector {
        MtlsConnector {
            certs,
            expected: Arc::new(expected),
            h2,
            tcp: crate::forward::tcp_connector(),
            to: None,
            metrics,
        }
    }

    /// The same, dialing `addr` whatever the URI names.
    pub fn pinned(&self, addr: std::net::SocketAddr) -> MtlsConnector {
        MtlsConnector {
            to: Some(
                format!("http://{addr}")
                    .parse()
                    .expect("a socket address is an authority"),
            ),
            ..self.clone()
        }
    }

    async fn connect(self, uri: http::Uri) -> Result<MtlsStream, ConnectError> {
        let config = self
            .certs
            .client_config(&self.expected, self.h2)
            .map_err(|e| {
                self.metrics.handshake("outbound", "no-certificate");
                ConnectError(e)
            })?;
        let target = self.to.clone().unwrap_or(uri);
        let tcp = tower::ServiceExt::oneshot(self.tcp.clone(), target.clone())
            .await
            .map_err(|e| {
                let cause = std::error::Error::source(&e)
                    .map(|c| format!(": {c}"))
                    .unwrap_or_default();
                ConnectError(format!("connecting to {target}: {e}{cause}"))
            })?
            .into_inner();
        let handshake = tokio_rustls::TlsConnector::from(config)
            .connect(weir_identity::tls::server_name(&self.expected), tcp);
        match tokio::time::timeout(HANDSHAKE_OUT_TIMEOUT, handshake).await {
            Ok(Ok(tls)) => {
                self.metrics.handshake("outbound", "ok");
                Ok(MtlsStream(hyper_util::rt::TokioIo::new(tls)))
            }
            Ok(Err(e)) => {
                self.metrics.handshake("outbound", "refused");
                tracing::warn!(expected = %self.expected, error = %e, "mutual TLS to a dependency refused");
                Err(ConnectError(format!(
                    "mutual TLS with {}: {e}",
                    self.expected
                )))
            }
            Err(_) => {
                self.metrics.handshake("outbound", "timeout");
                Err(ConnectError(format!(
                    "mutual TLS with {}: no handshake within {HANDSHAKE_OUT_TIMEOUT:?}",
                    self.expected
                )))
            }
        }
    }
}

/// Why a mutual-TLS connection was not made.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct ConnectError(String);

impl tower::Service<http::Uri> for MtlsConnector {
    type Response = MtlsStream;
    type Error = ConnectError;
    type Future = std::pin::Pin<
        Box<dyn std::future::Future<Output = Result<MtlsStream, ConnectError>> + Send>,
    >;

    fn poll_ready(
        &mut self,
        _: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Result<(), ConnectError>> {
        std::task::Poll::Ready(Ok(()))
    }

    fn call(&mut self, uri: http::Uri) -> Self::Future {
        Box::pin(self.clone().connect(uri))
    }
}

/// A mutual-TLS connection to a dependency's sidecar, as the HTTP client uses it.
#[derive(Debug)]
pub struct MtlsStream(
    hyper_util::rt::TokioIo<tokio_rustls::client::TlsStream<tokio::net::TcpStream>>,
);

impl hyper_util::client::legacy::connect::Connection for MtlsStream {
    fn connected(&self) -> hyper_util::client::legacy::connect::Connected {
        let c = hyper_util::client::legacy::connect::Connected::new();
        if self.0.inner().get_ref().1.alpn_protocol() == Some(b"h2") {
            c.negotiated_h2()
        } else {
            c
        }
    }
}

impl hyper::rt::Read for MtlsStream {
    fn poll_read(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: hyper::rt::ReadBufCursor<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.0).poll_read(cx, buf)
    }
}

impl hyper::rt::Write for MtlsStream {
    fn poll_write(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        std::pin::Pin::new(&mut self.0).poll_write(cx, buf)
    }

    fn poll_flush(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.0).poll_flush(cx)
    }

    fn poll_shutdown(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.0).poll_shutdown(cx)
    }

    fn is_write_vectored(&self) -> bool {
        self.0.is_write_vectored()
    }

    fn poll_write_vectored(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> std::task::Poll<std::io::Result<usize>> {
        std::pin::Pin::new(&mut self.0).poll_write_vectored(cx, bufs)
    }
}
