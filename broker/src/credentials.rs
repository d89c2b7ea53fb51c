//! What a Broker's credentials Secret holds, read the same way wherever Weir connects: by the
//! operator (from the Secret's data), by the saga coordinator and `weir` commands (from the
//! Secret mounted as a directory). Keys: `creds` (a NATS `.creds` file), else `token`, else
//! `username` and `password`; and `ca.crt`, the trust root of a TLS connection to a broker a
//! private CA signed. A Secret holding only `ca.crt` is TLS without credentials.

use std::collections::BTreeMap;

/// Credentials that cannot be used, and why (the message names the key or the file).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct CredentialsError(pub String);

impl CredentialsError {
    /// The condition reason the operator reports for it.
    pub fn reason(&self) -> &'static str {
        "InvalidCredentials"
    }
}

/// How a client proves who it is to a broker, as a Broker's Secret holds it.
#[derive(Clone, PartialEq, Default)]
pub enum Auth {
    #[default]
    None,
    UserPassword {
        username: String,
        password: String,
    },
    Token(String),
    /// The contents of a NATS `.creds` file (JWT and NKey seed).
    Creds(String),
}

impl std::fmt::Debug for Auth {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never print secrets.
        f.write_str(match self {
            Auth::None => "Auth::None",
            Auth::UserPassword { .. } => "Auth::UserPassword(..)",
            Auth::Token(_) => "Auth::Token(..)",
            Auth::Creds(_) => "Auth::Creds(..)",
        })
    }
}

/// The key of a Broker's Secret holding the CA (PEM) that signed the broker's certificate.
pub const CA_KEY: &str = "ca.crt";

/// What a Broker's credentials Secret holds: the credential, and the CA to trust for TLS.
#[derive(Clone, PartialEq, Default, Debug)]
pub struct Credentials {
    pub auth: Auth,
    /// `ca.crt` (PEM, checked): the trust root of a TLS connection to a broker whose
    /// certificate a private CA signed. `None`: the system's roots.
    pub ca: Option<String>,
}

impl From<Auth> for Credentials {
    fn from(auth: Auth) -> Self {
        Credentials { auth, ca: None }
    }
}

/// The certificates of a PEM text; an error naming `from` when it holds none or a broken one,
/// so that a wrong `ca.crt` is reported as such and not as a failed TLS handshake.
pub fn parse_ca(
    pem: &str,
    from: &str,
) -> Result<Vec<rustls::pki_types::CertificateDer<'static>>, CredentialsError> {
    use rustls::pki_types::{CertificateDer, pem::PemObject};
    let bad = |why: String| CredentialsError(format!("{from} is not a PEM certificate: {why}"));
    let certs = CertificateDer::pem_slice_iter(pem.as_bytes())
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| bad(e.to_string()))?;
    if certs.is_empty() {
        return Err(bad("no `-----BEGIN CERTIFICATE-----` block".into()));
    }
    Ok(certs)
}

impl Credentials {
    /// From a Secret's data: key `creds` (a NATS creds file), else `token`, else
    /// `username` and `password`; and `ca.crt`. A Secret holding only `ca.crt` is TLS without
    /// credentials.
    pub fn from_secret_data(data: &BTreeMap<String, Vec<u8>>) -> Result<Self, CredentialsError> {
        let text = |k: &str| -> Result<Option<String>, CredentialsError> {
            data.get(k)
                .map(|v| {
                    String::from_utf8(v.clone())
                        .map(|s| s.trim_end_matches(['\n', '\r']).to_string())
                        .map_err(|_| CredentialsError(format!("key {k:?} is not UTF-8")))
                })
                .transpose()
        };
        let ca = text(CA_KEY)?;
        if let Some(pem) = &ca {
            parse_ca(pem, &format!("key {CA_KEY:?}"))?;
        }
        let auth = if let Some(c) = text("creds")? {
            Auth::Creds(c)
        } else if let Some(t) = text("token")? {
            Auth::Token(t)
        } else {
            match (text("username")?, text("password")?) {
                (Some(username), Some(password)) => Auth::UserPassword { username, password },
                (Some(_), None) => {
                    return Err(CredentialsError(
                        "key \"username\" without \"password\"".into(),
                    ));
                }
                _ if ca.is_some() => Auth::None,
                _ => {
                    return Err(CredentialsError(
                        "the Secret has none of the keys creds, token, or username and password \
                         (nor ca.crt)"
                            .into(),
                    ));
                }
            }
        };
        Ok(Credentials { auth, ca })
    }

    /// Reads a directory holding a mounted credentials Secret (one file per key), as the
    /// sidecar sees it at `credentialsFile`.
    pub fn from_dir(dir: &std::path::Path) -> Result<Self, CredentialsError> {
        let mut data = BTreeMap::new();
        for k in ["creds", "token", "username", "password", CA_KEY] {
            if let Ok(v) = std::fs::read(dir.join(k)) {
                data.insert(k.to_string(), v);
            }
        }
        Self::from_secret_data(&data)
            .map_err(|CredentialsError(m)| CredentialsError(format!("{}: {m}", dir.display())))
    }

    /// A rustls client config trusting only `ca.crt` (for NATS, whose client takes a config).
    pub fn tls_config(&self) -> Result<Option<rustls::ClientConfig>, CredentialsError> {
        let Some(pem) = &self.ca else {
            return Ok(None);
        };
        let mut roots = rustls::RootCertStore::empty();
        for cert in parse_ca(pem, &format!("key {CA_KEY:?}"))? {
            roots
                .add(cert)
                .map_err(|e| CredentialsError(format!("key {CA_KEY:?}: {e}")))?;
        }
        Ok(Some(
            rustls::ClientConfig::builder()
                .with_root_certificates(roots)
                .with_no_client_auth(),
        ))
    }
}
