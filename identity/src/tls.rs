//! rustls configurations that authenticate both ends of a sidecar-to-sidecar connection by
//! workload identity.
//!
//! - Both ends present their current workload certificate ([`CurrentCert`]: replaced on
//!   renewal, read at each handshake, so a renewal never touches a connection that is open).
//! - Both verify the other's chain up to the trust bundle ([`TrustBundle`]: one or more
//!   anchors, two during an anchor's rotation), its validity now, and its extended key usage.
//! - The client also checks that the server is the identity it meant to call
//!   ([`client_config`]'s `expected`), in place of a DNS name: a certificate names a workload by
//!   its URI SAN, not by a host.
//! - The server learns the caller's identity from the verified chain ([`peer_identity`]) and
//!   decides whether to admit it (authorization is the caller's business, not this module's).
//! - TLS 1.3 only, ALPN `h2` and `http/1.1`.

use crate::id::{IdError, WorkloadId};
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::CryptoProvider;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::server::WebPkiClientVerifier;
use rustls::sign::CertifiedKey;
use rustls::{
    CertificateError, ClientConfig, DigitallySignedStruct, RootCertStore, ServerConfig,
    SignatureScheme,
};
use std::sync::{Arc, RwLock};

/// The ALPN protocols both ends offer, most preferred first.
pub const ALPN: [&[u8]; 2] = [b"h2", b"http/1.1"];

/// Why a bundle, a certificate or a key could not be used.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("the trust bundle has no certificate")]
    EmptyBundle,
    #[error("the trust bundle: {0}")]
    Bundle(String),
    #[error("the workload certificate or key: {0}")]
    Cert(String),
    #[error(transparent)]
    Rustls(#[from] rustls::Error),
}

/// The provider every config here uses: ring, as the rest of Weir.
pub fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// The anchors a peer's chain must end at.
#[derive(Clone, Debug)]
pub struct TrustBundle {
    roots: Arc<RootCertStore>,
}

impl TrustBundle {
    /// Every certificate in `pem` (one or more `CERTIFICATE` blocks) is an anchor.
    pub fn from_pem(pem: &str) -> Result<TrustBundle, TlsError> {
        use rustls::pki_types::pem::PemObject;
        let mut roots = RootCertStore::empty();
        for cert in CertificateDer::pem_slice_iter(pem.as_bytes()) {
            let cert = cert.map_err(|e| TlsError::Bundle(e.to_string()))?;
            roots
                .add(cert)
                .map_err(|e| TlsError::Bundle(e.to_string()))?;
        }
        if roots.is_empty() {
            return Err(TlsError::EmptyBundle);
        }
        Ok(TrustBundle {
            roots: Arc::new(roots),
        })
    }

    /// The anchors, for a verifier.
    pub fn roots(&self) -> Arc<RootCertStore> {
        self.roots.clone()
    }

    /// How many anchors it holds.
    pub fn len(&self) -> usize {
        self.roots.len()
    }

    pub fn is_empty(&self) -> bool {
        self.roots.is_empty()
    }
}

/// The workload's current certificate and key, shared by every config of the process and
/// replaced as a whole on renewal.
#[derive(Debug, Default)]
pub struct CurrentCert {
    current: RwLock<Option<Arc<CertifiedKey>>>,
}

impl CurrentCert {
    pub fn new() -> Arc<CurrentCert> {
        Arc::new(CurrentCert::default())
    }

    /// Installs a chain (leaf first, PEM) and its key: the next handshake uses them.
    pub fn install(&self, chain_pem: &str, key: PrivateKeyDer<'static>) -> Result<(), TlsError> {
        use rustls::pki_types::pem::PemObject;
        let chain = CertificateDer::pem_slice_iter(chain_pem.as_bytes())
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| TlsError::Cert(e.to_string()))?;
        if chain.is_empty() {
            return Err(TlsError::Cert("the chain has no certificate".into()));
        }
        let certified = CertifiedKey::from_der(chain, key, &provider())?;
        *self.current.write().unwrap_or_else(|e| e.into_inner()) = Some(Arc::new(certified));
        Ok(())
    }

    /// Whether a certificate is installed.
    pub fn is_installed(&self) -> bool {
        self.get().is_some()
    }

    fn get(&self) -> Option<Arc<CertifiedKey>> {
        self.current
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }
}

impl rustls::server::ResolvesServerCert for CurrentCert {
    fn resolve(&self, _hello: rustls::server::ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        self.get()
    }
}

impl rustls::client::ResolvesClientCert for CurrentCert {
    fn resolve(&self, _hints: &[&[u8]], _schemes: &[SignatureScheme]) -> Option<Arc<CertifiedKey>> {
        self.get()
    }

    fn has_certs(&self) -> bool {
        self.is_installed()
    }
}

/// The inbound side: TLS 1.3, a client certificate required and verified up to `bundle`.
pub fn server_config(
    bundle: &TrustBundle,
    cert: Arc<CurrentCert>,
) -> Result<ServerConfig, TlsError> {
    let provider = provider();
    let verifier =
        WebPkiClientVerifier::builder_with_provider(bundle.roots.clone(), provider.clone())
            .build()
            .map_err(|e| TlsError::Bundle(e.to_string()))?;
    let mut config = ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_client_cert_verifier(verifier)
        .with_cert_resolver(cert);
    config.alpn_protocols = ALPN.iter().map(|p| p.to_vec()).collect();
    Ok(config)
}

/// The outbound side towards one dependency: TLS 1.3, this workload's certificate presented,
/// the server's verified up to `bundle` and required to be `expected`.
pub fn client_config(
    bundle: &TrustBundle,
    cert: Arc<CurrentCert>,
    expected: WorkloadId,
) -> Result<ClientConfig, TlsError> {
    let provider = provider();
    let verifier = Arc::new(ExpectedPeer {
        roots: bundle.roots.clone(),
        expected,
        provider: provider.clone(),
    });
    let mut config = ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .dangerous()
        .with_custom_certificate_verifier(verifier)
        .with_client_cert_resolver(cert);
    config.alpn_protocols = ALPN.iter().map(|p| p.to_vec()).collect();
    Ok(config)
}

/// The server name a client config sends: identities are checked by URI SAN, so this only
/// fills the handshake's SNI field.
pub fn server_name(id: &WorkloadId) -> ServerName<'static> {
    let host = format!("{}.{}.{}", id.name, id.namespace, id.trust_domain);
    ServerName::try_from(host)
        .unwrap_or_else(|_| ServerName::try_from("weir.invalid").expect("a valid DNS name"))
}

/// The identity in a verified peer chain's leaf: its one URI SAN.
pub fn peer_identity(chain: &[CertificateDer<'_>]) -> Result<WorkloadId, PeerError> {
    let leaf = chain.first().ok_or(PeerError::NoCertificate)?;
    let (_, cert) = x509_parser::parse_x509_certificate(leaf)
        .map_err(|e| PeerError::Unreadable(e.to_string()))?;
    let uris: Vec<&str> = cert
        .subject_alternative_name()
        .map_err(|e| PeerError::Unreadable(e.to_string()))?
        .map(|ext| {
            ext.value
                .general_names
                .iter()
                .filter_map(|n| match n {
                    x509_parser::extensions::GeneralName::URI(u) => Some(*u),
                    _ => None,
                })
                .collect()
        })
        .unwrap_or_default();
    match uris.as_slice() {
        [uri] => Ok(WorkloadId::parse(uri)?),
        _ => Err(PeerError::NotOneIdentity(
            uris.iter().map(|u| u.to_string()).collect(),
        )),
    }
}

/// The validity of a chain's leaf (PEM): not before, not after.
pub fn leaf_validity(
    chain_pem: &str,
) -> Result<(std::time::SystemTime, std::time::SystemTime), PeerError> {
    use rustls::pki_types::pem::PemObject;
    let leaf = CertificateDer::pem_slice_iter(chain_pem.as_bytes())
        .next()
        .ok_or(PeerError::NoCertificate)?
        .map_err(|e| PeerError::Unreadable(e.to_string()))?;
    let (_, cert) = x509_parser::parse_x509_certificate(&leaf)
        .map_err(|e| PeerError::Unreadable(e.to_string()))?;
    let at = |t: i64| {
        std::time::SystemTime::UNIX_EPOCH + std::time::Duration::from_secs(t.max(0).unsigned_abs())
    };
    let v = cert.validity();
    Ok((at(v.not_before.timestamp()), at(v.not_after.timestamp())))
}

/// Why a peer's certificate names no workload.
#[derive(Debug, thiserror::Error)]
pub enum PeerError {
    #[error("the peer sent no certificate")]
    NoCertificate,
    #[error("the peer's certificate does not parse: {0}")]
    Unreadable(String),
    #[error("the peer's certificate names {0:?}, not one workload identity")]
    NotOneIdentity(Vec<String>),
    #[error(transparent)]
    Id(#[from] IdError),
}

/// Verifies a server's chain up to the bundle (validity, key usage, signatures: webpki), then
/// that its identity is the expected one.
#[derive(Debug)]
struct ExpectedPeer {
    roots: Arc<RootCertStore>,
    expected: WorkloadId,
    provider: Arc<CryptoProvider>,
}

/// A certificate error that carries its reason into the handshake's error.
fn refused(reason: String) -> rustls::Error {
    #[derive(Debug)]
    struct Reason(String);
    impl std::fmt::Display for Reason {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.write_str(&self.0)
        }
    }
    impl std::error::Error for Reason {}
    rustls::Error::InvalidCertificate(CertificateError::Other(rustls::OtherError(Arc::new(
        Reason(reason),
    ))))
}

impl ServerCertVerifier for ExpectedPeer {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let parsed = rustls::server::ParsedCertificate::try_from(end_entity)?;
        rustls::client::verify_server_cert_signed_by_trust_anchor(
            &parsed,
            &self.roots,
            intermediates,
            now,
            self.provider.signature_verification_algorithms.all,
        )?;
        let id =
            peer_identity(std::slice::from_ref(end_entity)).map_err(|e| refused(e.to_string()))?;
        if id != self.expected {
            return Err(refused(format!(
                "the server is {id}, not {} (the dependency called)",
                self.expected
            )));
        }
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}
