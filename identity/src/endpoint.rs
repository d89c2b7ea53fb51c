//! The issuer's endpoint, and the client a workload asks it with.
//!
//! The protocol is one request: `POST /v1/certificates` over HTTPS, the body a DER CSR
//! (`application/pkcs10`, at most [`MAX_CSR_BYTES`]), `Authorization: Bearer <token>`. The
//! answer is `200` with the chain (leaf, issuer) as PEM, or a status and a one-line reason:
//!
//! | status | when |
//! |---|---|
//! | 400 | the body is not a CSR, or its signature does not verify |
//! | 401 | no token, or a token the authenticator does not accept (wrong audience, expired, its pod gone) |
//! | 403 | the token is valid, but the CSR asks for another identity than its own, or it names no Weir workload |
//! | 404, 405 | another path or method |
//! | 413 | a body over [`MAX_CSR_BYTES`] |
//! | 503 | the issuer cannot sign now (its certificate is not valid), or the authenticator cannot be asked |
//!
//! Who a token belongs to is the [`Authenticate`] implementation's business: the operator's
//! asks the API server (TokenReview) and maps the ServiceAccount to its Microservice; `weir up`
//! hands each process a random token of its own ([`StaticTokens`]). The endpoint never signs
//! without an authenticated identity, and signs nothing but that identity.

use crate::ca::{Issuer, WorkloadKey};
use crate::id::WorkloadId;
use crate::tls::{TlsError, TrustBundle};
use bytes::Bytes;
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use hyper::{Method, Request, Response, StatusCode};
use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock};
use std::time::{Duration, SystemTime};

/// The path of the one request.
pub const PATH: &str = "/v1/certificates";
/// The largest CSR accepted: a P-256 CSR with one URI SAN is about 300 bytes.
pub const MAX_CSR_BYTES: usize = 16 * 1024;
/// How long a TLS handshake with the endpoint may take before the connection is dropped.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// Why a token was not accepted.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AuthError {
    /// 401: not a valid token for this audience.
    #[error("{0}")]
    Unauthenticated(String),
    /// 403: a valid token of something that is not a Weir workload.
    #[error("{0}")]
    Forbidden(String),
    /// 503: the authenticator could not be asked.
    #[error("{0}")]
    Unavailable(String),
}

/// A future of an authentication.
pub type AuthFuture<'a> = Pin<Box<dyn Future<Output = Result<WorkloadId, AuthError>> + Send + 'a>>;

/// Who a bearer token belongs to.
pub trait Authenticate: Send + Sync {
    fn authenticate<'a>(&'a self, token: &'a str) -> AuthFuture<'a>;
}

/// Tokens handed out by whoever runs the endpoint (`weir up`, tests), each for one identity.
#[derive(Debug, Default)]
pub struct StaticTokens {
    tokens: RwLock<HashMap<String, WorkloadId>>,
}

impl StaticTokens {
    /// A new random token for `id` (32 bytes, hex).
    pub fn issue(&self, id: WorkloadId) -> String {
        use ring::rand::SecureRandom;
        let mut bytes = [0u8; 32];
        let _ = ring::rand::SystemRandom::new().fill(&mut bytes);
        let token: String = bytes.iter().map(|b| format!("{b:02x}")).collect();
        self.tokens
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .insert(token.clone(), id);
        token
    }

    /// Forgets a token (its process is gone).
    pub fn revoke(&self, token: &str) {
        self.tokens
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .remove(token);
    }
}

impl Authenticate for StaticTokens {
    fn authenticate<'a>(&'a self, token: &'a str) -> AuthFuture<'a> {
        let found = self
            .tokens
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .get(token)
            .cloned();
        Box::pin(
            async move { found.ok_or_else(|| AuthError::Unauthenticated("unknown token".into())) },
        )
    }
}

/// What the endpoint has done, by outcome: for the operator's metrics.
#[derive(Debug, Default)]
pub struct Counts {
    pub issued: AtomicU64,
    pub bad_request: AtomicU64,
    pub unauthenticated: AtomicU64,
    pub forbidden: AtomicU64,
    pub unavailable: AtomicU64,
}

/// The endpoint: an issuer (replaceable, for the issuer's rotation), an authenticator, and the
/// lifetime of what it issues.
pub struct Endpoint {
    issuer: RwLock<Arc<Issuer>>,
    auth: Arc<dyn Authenticate>,
    lifetime: Duration,
    pub counts: Counts,
}

impl std::fmt::Debug for Endpoint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Endpoint")
            .field("lifetime", &self.lifetime)
            .finish_non_exhaustive()
    }
}

/// A response with a one-line reason.
fn answer(status: StatusCode, body: impl Into<Bytes>, pem: bool) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(body.into()));
    *r.status_mut() = status;
    let ct = if pem {
        "application/pem-certificate-chain"
    } else {
        "text/plain; charset=utf-8"
    };
    r.headers_mut().insert(
        hyper::header::CONTENT_TYPE,
        hyper::header::HeaderValue::from_static(ct),
    );
    r
}

impl Endpoint {
    pub fn new(issuer: Issuer, auth: Arc<dyn Authenticate>, lifetime: Duration) -> Arc<Endpoint> {
        Arc::new(Endpoint {
            issuer: RwLock::new(Arc::new(issuer)),
            auth,
            lifetime,
            counts: Counts::default(),
        })
    }

    /// Replaces the issuer: certificates signed from now on chain to the new one.
    pub fn set_issuer(&self, issuer: Issuer) {
        *self.issuer.write().unwrap_or_else(|e| e.into_inner()) = Arc::new(issuer);
    }

    /// The current issuer.
    pub fn issuer(&self) -> Arc<Issuer> {
        self.issuer
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Answers one request.
    pub async fn handle<B>(&self, req: Request<B>) -> Response<Full<Bytes>>
    where
        B: hyper::body::Body<Data = Bytes> + Send,
        B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    {
        if req.uri().path() != PATH {
            return answer(
                StatusCode::NOT_FOUND,
                format!("no such path; POST {PATH}\n"),
                false,
            );
        }
        if req.method() != Method::POST {
            return answer(
                StatusCode::METHOD_NOT_ALLOWED,
                format!("POST {PATH} with a DER CSR\n"),
                false,
            );
        }
        let token = req
            .headers()
            .get(hyper::header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
            .map(str::trim)
            .filter(|t| !t.is_empty())
            .map(str::to_string);
        let body = match Limited::new(req.into_body(), MAX_CSR_BYTES).collect().await {
            Ok(b) => b.to_bytes(),
            Err(e)
                if e.downcast_ref::<http_body_util::LengthLimitError>()
                    .is_some() =>
            {
                self.counts.bad_request.fetch_add(1, Ordering::Relaxed);
                return answer(
                    StatusCode::PAYLOAD_TOO_LARGE,
                    format!("a CSR is at most {MAX_CSR_BYTES} bytes\n"),
                    false,
                );
            }
            Err(e) => {
                self.counts.bad_request.fetch_add(1, Ordering::Relaxed);
                return answer(
                    StatusCode::BAD_REQUEST,
                    format!("the body could not be read: {e}\n"),
                    false,
                );
            }
        };
        let Some(token) = token else {
            self.counts.unauthenticated.fetch_add(1, Ordering::Relaxed);
            return answer(
                StatusCode::UNAUTHORIZED,
                "no bearer token (Authorization: Bearer <the pod's projected token>)\n",
                false,
            );
        };
        let id = match self.auth.authenticate(&token).await {
            Ok(id) => id,
            Err(e) => {
                let (status, count) = match &e {
                    AuthError::Unauthenticated(_) => {
                        (StatusCode::UNAUTHORIZED, &self.counts.unauthenticated)
                    }
                    AuthError::Forbidden(_) => (StatusCode::FORBIDDEN, &self.counts.forbidden),
                    AuthError::Unavailable(_) => {
                        (StatusCode::SERVICE_UNAVAILABLE, &self.counts.unavailable)
                    }
                };
                count.fetch_add(1, Ordering::Relaxed);
                return answer(status, format!("token refused: {e}\n"), false);
            }
        };
        match self
            .issuer()
            .sign(&body, &id, SystemTime::now(), self.lifetime)
        {
            Ok(issued) => {
                self.counts.issued.fetch_add(1, Ordering::Relaxed);
                answer(StatusCode::OK, issued.chain_pem, true)
            }
            Err(e) => {
                use crate::ca::SignError;
                let (status, count) = match &e {
                    SignError::BadRequest(_) => (StatusCode::BAD_REQUEST, &self.counts.bad_request),
                    SignError::WrongIdentity { .. } => {
                        (StatusCode::FORBIDDEN, &self.counts.forbidden)
                    }
                    SignError::IssuerNotValid { .. } | SignError::Pki(_) => {
                        (StatusCode::SERVICE_UNAVAILABLE, &self.counts.unavailable)
                    }
                };
                count.fetch_add(1, Ordering::Relaxed);
                answer(status, format!("{e}\n"), false)
            }
        }
    }

    /// Serves HTTPS on `listener` until the task is dropped: each connection's handshake
    /// within [`HANDSHAKE_TIMEOUT`], then HTTP/1.1.
    pub async fn serve(
        self: Arc<Self>,
        listener: tokio::net::TcpListener,
        tls: Arc<rustls::ServerConfig>,
    ) {
        let acceptor = tokio_rustls::TlsAcceptor::from(tls);
        loop {
            let Ok((tcp, _)) = listener.accept().await else {
                // Out of file descriptors, most likely: a pause rather than a busy loop.
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            };
            let (acceptor, me) = (acceptor.clone(), self.clone());
            tokio::spawn(async move {
                let Ok(Ok(tls)) =
                    tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await
                else {
                    return;
                };
                let svc = hyper::service::service_fn(move |req: Request<Incoming>| {
                    let me = me.clone();
                    async move { Ok::<_, std::convert::Infallible>(me.handle(req).await) }
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .timer(hyper_util::rt::TokioTimer::new())
                    .header_read_timeout(HANDSHAKE_TIMEOUT)
                    .serve_connection(hyper_util::rt::TokioIo::new(tls), svc)
                    .await;
            });
        }
    }
}

/// The endpoint's own serving certificate, for `dns_names`, signed by the issuer of the moment.
/// It is made again with each new issuer ([`ServingCert::reissue`]), so that once an anchor
/// rotation has dropped the old anchor from the bundle, sidecars still verify the endpoint; and
/// before it expires ([`ServingCert::renew_if_due`]), so that an endpoint that runs for months
/// keeps a valid one. The config of [`ServingCert::config`] presents whichever is current.
pub struct ServingCert {
    current: Arc<crate::tls::CurrentCert>,
    dns_names: Vec<String>,
    lifetime: Duration,
    /// When the current one stops being valid.
    expires: RwLock<SystemTime>,
}

impl ServingCert {
    pub fn new(
        issuer: &Issuer,
        dns_names: &[String],
        lifetime: Duration,
    ) -> Result<ServingCert, ClientError> {
        let s = ServingCert {
            current: crate::tls::CurrentCert::new(),
            dns_names: dns_names.to_vec(),
            lifetime,
            expires: RwLock::new(SystemTime::UNIX_EPOCH),
        };
        s.reissue(issuer)?;
        Ok(s)
    }

    /// A new key and certificate from `issuer`, presented from the next handshake on.
    pub fn reissue(&self, issuer: &Issuer) -> Result<(), ClientError> {
        let key = WorkloadKey::generate().map_err(|e| ClientError::Tls(e.to_string()))?;
        let now = SystemTime::now();
        let issued = issuer
            .sign_server(&key, &self.dns_names, now, self.lifetime)
            .map_err(|e| ClientError::Tls(e.to_string()))?;
        self.current
            .install(&issued.chain_pem, key.private_key())
            .map_err(|e| ClientError::Tls(e.to_string()))?;
        // The issuer may cut the lifetime short (never past itself): renew from the shorter.
        let until = crate::tls::leaf_validity(&issued.chain_pem)
            .map(|(_, to)| to)
            .unwrap_or(now + self.lifetime);
        *self.expires.write().unwrap_or_else(|e| e.into_inner()) = until;
        Ok(())
    }

    /// Reissues when less than a third of the lifetime is left. Returns whether it did.
    pub fn renew_if_due(&self, issuer: &Issuer, now: SystemTime) -> Result<bool, ClientError> {
        let expires = *self.expires.read().unwrap_or_else(|e| e.into_inner());
        if expires.duration_since(now).unwrap_or_default() > self.lifetime / 3 {
            return Ok(false);
        }
        self.reissue(issuer)?;
        Ok(true)
    }

    /// The endpoint's TLS config: TLS 1.3, HTTP/1.1, the current certificate.
    pub fn config(&self) -> Result<rustls::ServerConfig, ClientError> {
        let mut config = rustls::ServerConfig::builder_with_provider(crate::tls::provider())
            .with_protocol_versions(&[&rustls::version::TLS13])
            .map_err(|e| ClientError::Tls(e.to_string()))?
            .with_no_client_auth()
            .with_cert_resolver(self.current.clone());
        config.alpn_protocols = vec![b"http/1.1".to_vec()];
        Ok(config)
    }
}

/// A serving config whose certificate is made once (tests, `weir up`: their issuer does not
/// change while they run).
pub fn serving_config(
    issuer: &Issuer,
    dns_names: &[String],
    lifetime: Duration,
) -> Result<rustls::ServerConfig, ClientError> {
    ServingCert::new(issuer, dns_names, lifetime)?.config()
}

/// Why a workload got no certificate from the endpoint.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("the identity endpoint's address {0:?} is not https://host:port")]
    Url(String),
    #[error("cannot reach the identity endpoint: {0}")]
    Connect(String),
    #[error("TLS with the identity endpoint: {0}")]
    Tls(String),
    #[error("the identity endpoint answered {status}: {reason}")]
    Refused { status: u16, reason: String },
    #[error(transparent)]
    Bundle(#[from] TlsError),
}

/// Asks the endpoint at `url` (`https://host:port`, its certificate verified up to `bundle`
/// for `host`) to sign `csr`, with `token`. Returns the chain, PEM.
pub async fn request_certificate(
    url: &str,
    bundle: &TrustBundle,
    token: &str,
    csr: &[u8],
    timeout: Duration,
) -> Result<String, ClientError> {
    request_certificate_via(url, None, bundle, token, csr, timeout).await
}

/// [`request_certificate`], connecting to `connect_to` instead of resolving the URL's host
/// (which the certificate must still name): for a caller outside the cluster's DNS, such as a
/// test on the node reaching the endpoint's Service by its cluster IP.
pub async fn request_certificate_via(
    url: &str,
    connect_to: Option<std::net::SocketAddr>,
    bundle: &TrustBundle,
    token: &str,
    csr: &[u8],
    timeout: Duration,
) -> Result<String, ClientError> {
    let authority = url
        .strip_prefix("https://")
        .map(|r| r.trim_end_matches('/'))
        .filter(|r| !r.is_empty() && !r.contains('/'))
        .ok_or_else(|| ClientError::Url(url.to_string()))?;
    let host = match authority.rsplit_once(':') {
        Some((h, p)) if p.parse::<u16>().is_ok() => h,
        _ => return Err(ClientError::Url(url.to_string())),
    };
    let host = host
        .trim_start_matches('[')
        .trim_end_matches(']')
        .to_string();
    let server_name = rustls::pki_types::ServerName::try_from(host)
        .map_err(|_| ClientError::Url(url.to_string()))?;
    let verifier = rustls::client::WebPkiServerVerifier::builder_with_provider(
        bundle.roots(),
        crate::tls::provider(),
    )
    .build()
    .map_err(|e| ClientError::Tls(e.to_string()))?;
    let mut config = rustls::ClientConfig::builder_with_provider(crate::tls::provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|e| ClientError::Tls(e.to_string()))?
        .with_webpki_verifier(verifier)
        .with_no_client_auth();
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    let connector = tokio_rustls::TlsConnector::from(Arc::new(config));
    let exchange = async {
        let tcp = match connect_to {
            Some(a) => tokio::net::TcpStream::connect(a).await,
            None => tokio::net::TcpStream::connect(authority).await,
        }
        .map_err(|e| ClientError::Connect(format!("{authority}: {e}")))?;
        let tls = connector
            .connect(server_name, tcp)
            .await
            .map_err(|e| ClientError::Tls(e.to_string()))?;
        let (mut send, conn) =
            hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(tls))
                .await
                .map_err(|e| ClientError::Connect(e.to_string()))?;
        tokio::spawn(conn);
        let req = Request::post(PATH)
            .header(hyper::header::HOST, authority)
            .header(hyper::header::AUTHORIZATION, format!("Bearer {token}"))
            .header(hyper::header::CONTENT_TYPE, "application/pkcs10")
            .body(Full::new(Bytes::copy_from_slice(csr)))
            .map_err(|e| ClientError::Connect(e.to_string()))?;
        let resp = send
            .send_request(req)
            .await
            .map_err(|e| ClientError::Connect(e.to_string()))?;
        let status = resp.status();
        let body = Limited::new(resp.into_body(), 1024 * 1024)
            .collect()
            .await
            .map_err(|e| ClientError::Connect(e.to_string()))?
            .to_bytes();
        let text = String::from_utf8_lossy(&body).trim().to_string();
        if status == StatusCode::OK {
            Ok(text + "\n")
        } else {
            Err(ClientError::Refused {
                status: status.as_u16(),
                reason: text,
            })
        }
    };
    tokio::time::timeout(timeout, exchange).await.map_err(|_| {
        ClientError::Connect(format!("no answer from {authority} within {timeout:?}"))
    })?
}
