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
    /// A password without a user name (Redis' default user).
    Password(String),
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
            Auth::Password(_) => "Auth::Password(..)",
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

/// The keys of a credentials Secret, in the order they are looked at.
pub const KEYS: [&str; 5] = ["creds", "token", "username", "password", CA_KEY];

impl Credentials {
    /// From a Secret's data: key `creds` (a NATS creds file), else `token`, else `username`
    /// and `password` (or `password` alone); and `ca.crt`. A Secret holding only `ca.crt` is
    /// TLS without credentials. Errors name the key.
    pub fn from_secret_data(data: &BTreeMap<String, Vec<u8>>) -> Result<Self, CredentialsError> {
        Self::read(
            |k| data.get(k).cloned(),
            |k| format!("key {k:?}"),
            "the Secret has none of the keys creds, token, or username and password (nor ca.crt)",
        )
    }

    /// Reads a directory holding a mounted credentials Secret (one file per key), as the
    /// sidecar and the saga coordinator see it at `credentialsFile`. Errors name the file.
    pub fn from_dir(dir: &std::path::Path) -> Result<Self, CredentialsError> {
        Self::read(
            |k| std::fs::read(dir.join(k)).ok(),
            |k| dir.join(k).display().to_string(),
            &format!(
                "credentials directory {} holds none of `creds`, `token`, or `username` and \
                 `password` (nor `ca.crt`)",
                dir.display()
            ),
        )
    }

    /// The one reading of a Secret, whatever holds it: `get` gives a key's bytes, `name` names
    /// a key in errors. Values lose their trailing newline (`echo` adds one); a blank value
    /// counts as absent.
    fn read(
        get: impl Fn(&str) -> Option<Vec<u8>>,
        name: impl Fn(&str) -> String,
        none: &str,
    ) -> Result<Self, CredentialsError> {
        let text = |k: &str| -> Result<Option<String>, CredentialsError> {
            get(k)
                .map(|v| {
                    String::from_utf8(v)
                        .map(|s| s.trim_end_matches(['\n', '\r']).to_string())
                        .map_err(|_| CredentialsError(format!("{} is not UTF-8", name(k))))
                })
                .transpose()
                .map(|v| v.filter(|s| !s.trim().is_empty()))
        };
        let ca = text(CA_KEY)?;
        if let Some(pem) = &ca {
            parse_ca(pem, &name(CA_KEY))?;
        }
        let auth = if let Some(c) = text("creds")? {
            Auth::Creds(c)
        } else if let Some(t) = text("token")? {
            Auth::Token(t)
        } else {
            match (text("username")?, text("password")?) {
                (Some(username), Some(password)) => Auth::UserPassword { username, password },
                (Some(_), None) => {
                    return Err(CredentialsError(format!(
                        "{} without {}",
                        name("username"),
                        name("password")
                    )));
                }
                (None, Some(password)) => Auth::Password(password),
                (None, None) if ca.is_some() => Auth::None,
                (None, None) => return Err(CredentialsError(none.into())),
            }
        };
        Ok(Credentials { auth, ca })
    }

    /// What Redis takes: a password (`password`, or `token` used as one) and perhaps a user.
    pub fn redis_auth(&self) -> Result<Option<(Option<String>, String)>, CredentialsError> {
        match &self.auth {
            Auth::None => Ok(None),
            Auth::UserPassword { username, password } => {
                Ok(Some((Some(username.clone()), password.clone())))
            }
            Auth::Token(p) | Auth::Password(p) => Ok(Some((None, p.clone()))),
            Auth::Creds(_) => Err(CredentialsError(
                "a NATS creds file is no Redis credential (use username and password, or token)"
                    .into(),
            )),
        }
    }

    /// What RabbitMQ takes: a user and a password.
    pub fn amqp_auth(&self) -> Result<Option<(String, String)>, CredentialsError> {
        match &self.auth {
            Auth::None => Ok(None),
            Auth::UserPassword { username, password } => {
                Ok(Some((username.clone(), password.clone())))
            }
            _ => Err(CredentialsError(
                "RabbitMQ takes username and password".into(),
            )),
        }
    }

    /// Refuses a `ca.crt` beside a URL that is not TLS: a CA means TLS is required, and a
    /// client would otherwise talk in plain text although one was given. `tls_scheme` is the
    /// scheme the URL should have (`rediss`, `amqps`; compared without case, as the clients
    /// read it); `ca` names the CA in the message (`key "ca.crt"`, a file's path), `url_name`
    /// the URL (`the URL`, `messaging.brokerUrl "…"`): `<ca> is given but <url_name> is not
    /// TLS (use <tls_scheme>://)`.
    pub fn require_tls_with_ca(
        &self,
        url: &str,
        tls_scheme: &str,
        ca: &str,
        url_name: &str,
    ) -> Result<(), CredentialsError> {
        let tls = url
            .split_once("://")
            .is_some_and(|(scheme, _)| scheme.eq_ignore_ascii_case(tls_scheme));
        if self.ca.is_none() || tls {
            return Ok(());
        }
        Err(CredentialsError(format!(
            "{ca} is given but {url_name} is not TLS (use {tls_scheme}://)"
        )))
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

#[cfg(test)]
mod tests {
    use super::*;

    fn data(kv: &[(&str, &str)]) -> BTreeMap<String, Vec<u8>> {
        kv.iter()
            .map(|(k, v)| (k.to_string(), v.as_bytes().to_vec()))
            .collect()
    }

    #[test]
    fn one_reading_for_a_secret_and_a_mounted_directory() {
        let dir = std::env::temp_dir().join(format!("weir-creds-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("username"), "u\n").unwrap();
        std::fs::write(dir.join("password"), "p\n").unwrap();
        let from_dir = Credentials::from_dir(&dir).unwrap();
        let from_data =
            Credentials::from_secret_data(&data(&[("username", "u\n"), ("password", "p\n")]))
                .unwrap();
        assert_eq!(from_dir, from_data);
        std::fs::remove_file(dir.join("password")).unwrap();
        let e = Credentials::from_dir(&dir).unwrap_err();
        assert!(
            e.0.contains("/username without ") && e.0.ends_with("/password"),
            "{e}"
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn credentials_from_a_secret() {
        assert_eq!(
            Credentials::from_secret_data(&data(&[("username", "u"), ("password", "p\n")]))
                .unwrap(),
            Auth::UserPassword {
                username: "u".into(),
                password: "p".into()
            }
            .into()
        );
        assert_eq!(
            Credentials::from_secret_data(&data(&[("token", "t")])).unwrap(),
            Auth::Token("t".into()).into()
        );
        assert!(matches!(
            Credentials::from_secret_data(&data(&[("creds", "x"), ("token", "t")]))
                .unwrap()
                .auth,
            Auth::Creds(_)
        ));
        let e = Credentials::from_secret_data(&data(&[("user", "u")])).unwrap_err();
        assert_eq!(e.reason(), "InvalidCredentials");
        assert!(
            !format!("{:?}", Credentials::from(Auth::Token("secret".into()))).contains("secret")
        );
    }

    #[test]
    fn a_ca_that_is_not_pem_is_refused_naming_the_key() {
        let mut data = BTreeMap::new();
        data.insert(CA_KEY.to_string(), b"not a certificate".to_vec());
        let e = Credentials::from_secret_data(&data).unwrap_err();
        assert_eq!(e.reason(), "InvalidCredentials");
        assert!(
            e.to_string()
                .contains("\"ca.crt\" is not a PEM certificate"),
            "{e}"
        );
        data.insert("token".into(), b"t".to_vec());
        assert!(
            Credentials::from_secret_data(&data).is_err(),
            "with a token too"
        );
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join(CA_KEY), "garbage").unwrap();
        let e = Credentials::from_dir(dir.path()).unwrap_err().to_string();
        assert!(
            e.contains(&dir.path().display().to_string()) && e.contains("ca.crt"),
            "{e}"
        );
        assert!(
            Credentials::from_secret_data(&BTreeMap::new()).is_err(),
            "an empty Secret is still an error"
        );
    }

    #[test]
    fn a_ca_requires_a_tls_url() {
        let none = Credentials::default();
        assert!(
            none.require_tls_with_ca("redis://h", "rediss", "ca", "the URL")
                .is_ok()
        );
        let ca = Credentials {
            ca: Some("pem".into()),
            ..Default::default()
        };
        assert!(
            ca.require_tls_with_ca("rediss://h", "rediss", "ca", "the URL")
                .is_ok()
        );
        assert!(
            ca.require_tls_with_ca("AMQPS://h", "amqps", "ca", "the URL")
                .is_ok()
        );
        let e = ca
            .require_tls_with_ca("amqp://h", "amqps", &format!("key {CA_KEY:?}"), "the URL")
            .unwrap_err();
        assert_eq!(
            e.to_string(),
            "key \"ca.crt\" is given but the URL is not TLS (use amqps://)"
        );
    }

    #[test]
    fn a_password_alone_is_redis_default_user_and_nothing_else() {
        let c = Credentials::from_secret_data(&data(&[("password", "p")])).unwrap();
        assert_eq!(c.redis_auth().unwrap(), Some((None, "p".into())));
        assert!(c.amqp_auth().is_err());
        let t = Credentials::from_secret_data(&data(&[("token", "t")])).unwrap();
        assert_eq!(t.redis_auth().unwrap(), Some((None, "t".into())));
        let blank = Credentials::from_secret_data(&data(&[("token", "\n"), ("password", "p")]));
        assert_eq!(
            blank.unwrap().auth,
            Auth::Password("p".into()),
            "a blank value is absent"
        );
    }
}
