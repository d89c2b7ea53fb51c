//! The trust anchor, the issuer, and what the issuer will sign.
//!
//! Two levels, as Linkerd has them: a long-lived **trust anchor** (self-signed; its certificate
//! is the trust bundle every sidecar verifies peers against, its key can stay offline) signs an
//! **issuer** (an intermediate CA the operator holds), which signs short-lived workload
//! certificates. Rotating the issuer touches no sidecar's trust; rotating the anchor goes
//! through a bundle that holds the old and the new anchor while both are in use.
//!
//! The issuer's policy ([`Issuer::sign`]) is the security boundary of the whole scheme: it signs
//! the public key of a CSR whose signature proves possession of the key, for exactly the
//! identity the requester was authenticated as (the CSR must ask for that one URI SAN and
//! nothing else), as a leaf (never a CA), for client and server authentication, for no longer
//! than the issuer itself is valid. What else the CSR asks for is ignored.

use crate::id::WorkloadId;
use rcgen::{
    BasicConstraints, CertificateParams, CertificateSigningRequestParams, DistinguishedName,
    DnType, ExtendedKeyUsagePurpose, IsCa, KeyPair, KeyUsagePurpose, SanType, SerialNumber,
};
use rustls::pki_types::{CertificateDer, CertificateSigningRequestDer, PrivateKeyDer};
use std::time::{Duration, SystemTime};

/// How far back a certificate's validity starts, for clocks a little behind the issuer's.
pub const CLOCK_SKEW: Duration = Duration::from_secs(60);

/// Why the issuer refused to sign, or a CA could not be made or read.
#[derive(Debug, thiserror::Error)]
pub enum SignError {
    /// Not a CSR, a CSR whose signature does not verify (no proof of the key), or one with an
    /// extension the issuer does not know.
    #[error("the certificate signing request is not valid: {0}")]
    BadRequest(String),
    /// The CSR asks for another identity than the one its requester authenticated as.
    #[error(
        "the certificate signing request asks for {requested:?}; its requester may only have {allowed}"
    )]
    WrongIdentity {
        requested: Vec<String>,
        allowed: String,
    },
    /// The issuer's own certificate has expired (or is not valid yet).
    #[error("the issuer's certificate is not valid now (valid {not_before:?} to {not_after:?})")]
    IssuerNotValid {
        not_before: SystemTime,
        not_after: SystemTime,
    },
    /// A certificate or key that does not parse, or rcgen refusing the parameters.
    #[error("{0}")]
    Pki(String),
}

fn pki(e: impl std::fmt::Display) -> SignError {
    SignError::Pki(e.to_string())
}

/// A CA: its key and its certificate.
pub struct Authority {
    key: KeyPair,
    cert: CertificateDer<'static>,
    not_before: SystemTime,
    not_after: SystemTime,
}

impl std::fmt::Debug for Authority {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Authority")
            .field("not_before", &self.not_before)
            .field("not_after", &self.not_after)
            .finish_non_exhaustive()
    }
}

impl Authority {
    /// A new self-signed trust anchor for `trust_domain`, valid from `now` for `validity`.
    pub fn new_anchor(
        trust_domain: &str,
        now: SystemTime,
        validity: Duration,
    ) -> Result<Authority, SignError> {
        let key = KeyPair::generate().map_err(pki)?;
        let params = ca_params(
            &format!("Weir trust anchor for {trust_domain}"),
            1,
            now,
            validity,
        );
        let cert = params.self_signed(&key).map_err(pki)?;
        Ok(Authority {
            key,
            cert: cert.der().clone(),
            not_before: now - CLOCK_SKEW,
            not_after: now + validity,
        })
    }

    /// A new issuer (an intermediate CA that may sign leaves only), signed by `anchor`, valid
    /// from `now` for `validity` but never past the anchor.
    pub fn new_issuer(
        anchor: &Authority,
        trust_domain: &str,
        now: SystemTime,
        validity: Duration,
    ) -> Result<Authority, SignError> {
        let key = KeyPair::generate().map_err(pki)?;
        let validity = validity.min(anchor.not_after.duration_since(now).unwrap_or_default());
        let params = ca_params(&format!("Weir issuer for {trust_domain}"), 0, now, validity);
        let cert = params.signed_by(&key, &anchor.rcgen()?).map_err(pki)?;
        Ok(Authority {
            key,
            cert: cert.der().clone(),
            not_before: now - CLOCK_SKEW,
            not_after: now + validity,
        })
    }

    /// A CA from its certificate and its PKCS#8 key, both PEM (as the chart's Secrets hold
    /// them).
    pub fn from_pem(cert_pem: &str, key_pem: &str) -> Result<Authority, SignError> {
        use rustls::pki_types::pem::PemObject;
        let cert = CertificateDer::from_pem_slice(cert_pem.as_bytes())
            .map_err(|e| SignError::Pki(format!("the CA certificate: {e}")))?;
        let key =
            KeyPair::from_pem(key_pem).map_err(|e| SignError::Pki(format!("the CA key: {e}")))?;
        let (_, parsed) = x509_parser::parse_x509_certificate(&cert)
            .map_err(|e| SignError::Pki(format!("the CA certificate: {e}")))?;
        if !parsed.is_ca() {
            return Err(SignError::Pki(
                "the CA certificate is not a CA (basicConstraints CA:TRUE)".into(),
            ));
        }
        let validity = parsed.validity();
        let (not_before, not_after) = (
            to_system_time(validity.not_before.timestamp()),
            to_system_time(validity.not_after.timestamp()),
        );
        Ok(Authority {
            key,
            cert: cert.into_owned(),
            not_before,
            not_after,
        })
    }

    /// Its certificate, PEM.
    pub fn cert_pem(&self) -> String {
        pem_of("CERTIFICATE", &self.cert)
    }

    /// Its certificate, DER.
    pub fn cert_der(&self) -> &CertificateDer<'static> {
        &self.cert
    }

    /// Its key, PKCS#8 PEM: for the Secret that holds it, nowhere else.
    pub fn key_pem(&self) -> String {
        self.key.serialize_pem()
    }

    /// When it stops being valid.
    pub fn not_after(&self) -> SystemTime {
        self.not_after
    }

    fn rcgen(&self) -> Result<rcgen::Issuer<'static, &KeyPair>, SignError> {
        rcgen::Issuer::from_ca_cert_der(&self.cert, &self.key).map_err(pki)
    }
}

fn ca_params(
    common_name: &str,
    path_len: u8,
    now: SystemTime,
    validity: Duration,
) -> CertificateParams {
    let mut params = CertificateParams::default();
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, common_name);
    dn.push(DnType::OrganizationName, "Weir");
    params.distinguished_name = dn;
    params.is_ca = IsCa::Ca(BasicConstraints::Constrained(path_len));
    params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    params.not_before = (now - CLOCK_SKEW).into();
    params.not_after = (now + validity).into();
    params.serial_number = Some(random_serial());
    params
}

/// A workload certificate as issued: the leaf and the issuer's certificate (the chain a peer
/// needs up to the anchor), PEM, and when the leaf expires.
#[derive(Debug, Clone)]
pub struct Issued {
    pub chain_pem: String,
    pub not_after: SystemTime,
}

/// The CA that signs workload certificates, with its policy.
#[derive(Debug)]
pub struct Issuer {
    ca: Authority,
}

impl Issuer {
    pub fn new(ca: Authority) -> Self {
        Issuer { ca }
    }

    /// The issuing CA.
    pub fn authority(&self) -> &Authority {
        &self.ca
    }

    /// Signs `csr` for `id` (the identity its requester authenticated as), valid from `now`
    /// for `lifetime`, cut at the issuer's own expiry. See the module's doc for the policy.
    pub fn sign(
        &self,
        csr: &[u8],
        id: &WorkloadId,
        now: SystemTime,
        lifetime: Duration,
    ) -> Result<Issued, SignError> {
        if now < self.ca.not_before || now >= self.ca.not_after {
            return Err(SignError::IssuerNotValid {
                not_before: self.ca.not_before,
                not_after: self.ca.not_after,
            });
        }
        let request = CertificateSigningRequestParams::from_der(
            &CertificateSigningRequestDer::from(csr.to_vec()),
        )
        .map_err(|e| SignError::BadRequest(e.to_string()))?;
        let requested: Vec<String> = request
            .params
            .subject_alt_names
            .iter()
            .map(|san| match san {
                SanType::URI(u) => u.as_str().to_string(),
                SanType::DnsName(d) => format!("DNS:{}", d.as_str()),
                SanType::IpAddress(ip) => format!("IP:{ip}"),
                SanType::Rfc822Name(m) => format!("email:{}", m.as_str()),
                SanType::OtherName(_) => "otherName".to_string(),
                _ => "an unknown name".to_string(),
            })
            .collect();
        let uri = id.uri();
        if requested != [uri.clone()] {
            return Err(SignError::WrongIdentity {
                requested,
                allowed: uri,
            });
        }
        let not_after = (now + lifetime).min(self.ca.not_after);
        let mut params = CertificateParams::default();
        params.distinguished_name = DistinguishedName::new();
        params.subject_alt_names = vec![SanType::URI(uri.as_str().try_into().map_err(pki)?)];
        params.is_ca = IsCa::ExplicitNoCa;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        params.use_authority_key_identifier_extension = true;
        params.not_before = (now - CLOCK_SKEW).into();
        params.not_after = not_after.into();
        params.serial_number = Some(random_serial());
        let leaf = params
            .signed_by(&request.public_key, &self.ca.rcgen()?)
            .map_err(pki)?;
        Ok(Issued {
            chain_pem: format!("{}{}", leaf.pem(), self.ca.cert_pem()),
            not_after,
        })
    }
}

impl Issuer {
    /// A serving certificate for the issuer's own endpoint: DNS names, server authentication
    /// only (a workload certificate cannot stand in for it, nor it for one: it has no URI SAN).
    pub fn sign_server(
        &self,
        key: &WorkloadKey,
        dns_names: &[String],
        now: SystemTime,
        lifetime: Duration,
    ) -> Result<Issued, SignError> {
        let mut params = CertificateParams::new(dns_names.to_vec()).map_err(pki)?;
        params.distinguished_name = DistinguishedName::new();
        params.is_ca = IsCa::ExplicitNoCa;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        params.use_authority_key_identifier_extension = true;
        let not_after = (now + lifetime).min(self.ca.not_after);
        params.not_before = (now - CLOCK_SKEW).into();
        params.not_after = not_after.into();
        params.serial_number = Some(random_serial());
        let leaf = params.signed_by(&key.key, &self.ca.rcgen()?).map_err(pki)?;
        Ok(Issued {
            chain_pem: format!("{}{}", leaf.pem(), self.ca.cert_pem()),
            not_after,
        })
    }
}

/// A workload's key pair, made where it is used (the private key never leaves the process),
/// and its CSR.
pub struct WorkloadKey {
    key: KeyPair,
}

impl std::fmt::Debug for WorkloadKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("WorkloadKey(..)")
    }
}

impl WorkloadKey {
    /// A new ECDSA P-256 key pair.
    pub fn generate() -> Result<WorkloadKey, SignError> {
        Ok(WorkloadKey {
            key: KeyPair::generate().map_err(pki)?,
        })
    }

    /// A CSR, DER, asking for `id` as its one URI SAN, signed with this key.
    pub fn csr(&self, id: &WorkloadId) -> Result<Vec<u8>, SignError> {
        self.csr_for_names(&[id.uri()])
    }

    /// A CSR asking for these URI SANs: for tests of the issuer's policy.
    pub fn csr_for_names(&self, uris: &[String]) -> Result<Vec<u8>, SignError> {
        let mut params = CertificateParams::default();
        params.distinguished_name = DistinguishedName::new();
        params.subject_alt_names = uris
            .iter()
            .map(|u| Ok(SanType::URI(u.as_str().try_into().map_err(pki)?)))
            .collect::<Result<_, SignError>>()?;
        let csr = params.serialize_request(&self.key).map_err(pki)?;
        Ok(csr.der().to_vec())
    }

    /// The private key, for rustls.
    pub fn private_key(&self) -> PrivateKeyDer<'static> {
        PrivateKeyDer::Pkcs8(self.key.serialize_der().into())
    }
}

/// PEM of one DER object.
pub(crate) fn pem_of(label: &str, der: &[u8]) -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut b64 = String::with_capacity(der.len() * 4 / 3 + 4);
    for chunk in der.chunks(3) {
        let n = chunk
            .iter()
            .enumerate()
            .fold(0u32, |n, (i, &b)| n | (u32::from(b) << (16 - 8 * i)));
        for i in 0..4 {
            if i <= chunk.len() {
                b64.push(ALPHABET[((n >> (18 - 6 * i)) & 63) as usize] as char);
            } else {
                b64.push('=');
            }
        }
    }
    let mut out = format!("-----BEGIN {label}-----\n");
    for line in b64.as_bytes().chunks(64) {
        out.push_str(std::str::from_utf8(line).unwrap_or_default());
        out.push('\n');
    }
    out.push_str(&format!("-----END {label}-----\n"));
    out
}

fn random_serial() -> SerialNumber {
    use ring::rand::SecureRandom;
    let mut bytes = [0u8; 16];
    // The system's CSPRNG; it does not fail on Linux once the process runs.
    let _ = ring::rand::SystemRandom::new().fill(&mut bytes);
    // Positive, as DER integers for serials must be.
    bytes[0] &= 0x7f;
    SerialNumber::from(bytes.to_vec())
}

fn to_system_time(unix: i64) -> SystemTime {
    if unix >= 0 {
        SystemTime::UNIX_EPOCH + Duration::from_secs(unix.unsigned_abs())
    } else {
        SystemTime::UNIX_EPOCH - Duration::from_secs(unix.unsigned_abs())
    }
}
