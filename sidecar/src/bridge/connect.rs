//! The broker connection: NATS with reconnect forever (capped exponential backoff).
//!
//! `credentialsFile` names the Broker's credentials Secret as mounted (one file per key), in
//! one of two documented forms (docs/messaging.md, "Broker credentials"):
//! - a directory (what the operator renders: `/etc/weir/broker`) holding `creds` (a NATS
//!   `.creds` file: user JWT and NKey seed), or `token`, or `username` and `password`; the first
//!   present wins in that order;
//! - a NATS `.creds` file itself.
//!
//! The directory may also hold `ca.crt` (PEM), the trust root of a TLS connection to a broker
//! signed by a private CA, for every broker kind ([`ca_file`]); without it the system's roots
//! apply. A directory holding only `ca.crt` means TLS without credentials.

use super::backend::Error;
use async_nats::{Client, ConnectOptions, Event};
use std::path::{Path, PathBuf};
use std::time::Duration;

/// Longest pause between two reconnect attempts.
pub const MAX_RECONNECT_DELAY: Duration = Duration::from_secs(2);

/// The delay before reconnect attempt `attempts` (1-based): 50 ms doubling up to 2 s.
pub fn reconnect_delay(attempts: usize) -> Duration {
    let exp = attempts.saturating_sub(1).min(10) as u32;
    Duration::from_millis(50u64 << exp).min(MAX_RECONNECT_DELAY)
}

pub use weir_broker::credentials::CA_KEY;
use weir_broker::credentials::{Auth, Credentials, parse_ca};

/// `ca.crt` of the credentials at `credentials` when it is a directory holding one, checked
/// to be PEM: its path and text. A NATS `.creds` file (the other form) has no CA beside it.
pub fn ca_file(credentials: Option<&str>) -> Result<Option<(PathBuf, String)>, Error> {
    let Some(dir) = credentials.map(Path::new).filter(|p| p.is_dir()) else {
        return Ok(None);
    };
    let f = dir.join(CA_KEY);
    if !f.exists() {
        return Ok(None);
    }
    let text = std::fs::read_to_string(&f)
        .map_err(|e| Error::Config(format!("cannot read {}: {e}", f.display())))?;
    parse_ca(&text, &f.display().to_string())?;
    Ok(Some((f, text)))
}

/// Trusts only `ca.crt` when the credentials hold one, and then requires TLS: a broker that
/// offers none would otherwise be talked to in plain text although a CA was given.
pub fn with_ca(opts: ConnectOptions, credentials: Option<&str>) -> Result<ConnectOptions, Error> {
    Ok(match ca_file(credentials)? {
        Some((path, _)) => opts.add_root_certificates(path).require_tls(true),
        None => opts,
    })
}

/// Applies the credentials found at `path` (see the module doc).
pub fn with_credentials(opts: ConnectOptions, path: &str) -> Result<ConnectOptions, Error> {
    let p = Path::new(path);
    let creds = |text: &str, from: &Path| {
        opts.clone()
            .credentials(text)
            .map_err(|e| {
                Error::Config(format!(
                    "invalid NATS credentials file {}: {e}",
                    from.display()
                ))
            })
    };
    if !p.is_dir() {
        let text = std::fs::read_to_string(p)
            .map_err(|e| Error::Config(format!("cannot read credentials file {path}: {e}")))?;
        if text.contains("BEGIN NATS USER JWT") {
            return creds(&text, p);
        }
        return Err(Error::Config(format!(
            "credentials file {path} is not a NATS .creds file (a Secret directory holding \
             `creds`, `token`, or `username` and `password` is the other accepted form)"
        )));
    }
    // A mounted Secret, read as everywhere else (`weir_broker::credentials`).
    match Credentials::from_dir(p)?.auth {
        Auth::Creds(text) => creds(&text, &p.join("creds")),
        Auth::Token(token) => Ok(opts.token(token)),
        Auth::UserPassword { username, password } => Ok(opts.user_and_password(username, password)),
        Auth::None => Ok(opts),
        Auth::Password(_) => Err(Error::Config(format!(
            "credentials directory {path} holds `password` without `username`: a password alone \
             is no NATS credential"
        ))),
    }
}

/// `on_state` is told `true` on every (re)connection and `false` on every disconnection.
pub async fn connect(
    url: &str,
    credentials: Option<&str>,
    name: &str,
    on_state: impl Fn(bool) + Send + Sync + 'static,
) -> Result<Client, Error> {
    let on_state = std::sync::Arc::new(on_state);
    let last_error = std::sync::Arc::new(std::sync::Mutex::new(None::<String>));
    let mut opts = ConnectOptions::new()
        .name(name)
        .retry_on_initial_connect()
        .max_reconnects(None)
        .connection_timeout(Duration::from_secs(2))
        .reconnect_delay_callback(reconnect_delay)
        .event_callback(move |ev| {
            let (on_state, last_error) = (on_state.clone(), last_error.clone());
            async move {
                match ev {
                    Event::Connected => {
                        *last_error.lock().unwrap_or_else(|p| p.into_inner()) = None;
                        on_state(true);
                        tracing::info!("broker connected");
                    }
                    Event::Disconnected => {
                        on_state(false);
                        tracing::warn!("broker disconnected; reconnecting");
                    }
                    // A connection refused (TLS, authorization) comes as a client error: said
                    // once per distinct error, not at every retry.
                    Event::ClientError(e) => {
                        let e = e.to_string();
                        let mut last = last_error.lock().unwrap_or_else(|p| p.into_inner());
                        if last.as_ref() != Some(&e) {
                            tracing::warn!(error = %e, "cannot connect to the broker");
                            *last = Some(e);
                        }
                    }
                    other => tracing::debug!(event = %other, "broker event"),
                }
            }
        });
    if let Some(c) = credentials {
        opts = with_credentials(opts, c)?;
    }
    opts = with_ca(opts, credentials)?;
    opts.connect(url).await.map_err(|e| Error::Connect {
        to: weir_crds::redact::url(url),
        message: e.to_string(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_is_capped() {
        assert_eq!(reconnect_delay(1), Duration::from_millis(50));
        assert_eq!(reconnect_delay(2), Duration::from_millis(100));
        assert_eq!(reconnect_delay(100), MAX_RECONNECT_DELAY);
    }

    #[test]
    fn credentials_forms() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().to_str().unwrap();
        assert!(
            with_credentials(ConnectOptions::new(), path).is_err(),
            "empty"
        );
        std::fs::write(dir.path().join("username"), "u").unwrap();
        assert!(
            with_credentials(ConnectOptions::new(), path).is_err(),
            "no password"
        );
        std::fs::write(dir.path().join("password"), "p").unwrap();
        assert!(with_credentials(ConnectOptions::new(), path).is_ok());
        std::fs::write(dir.path().join("token"), "s3cret\n").unwrap();
        assert!(with_credentials(ConnectOptions::new(), path).is_ok());
        std::fs::write(dir.path().join("creds"), "garbage").unwrap();
        assert!(
            with_credentials(ConnectOptions::new(), path).is_err(),
            "creds wins and is parsed"
        );
        let f = dir.path().join("token");
        assert!(with_credentials(ConnectOptions::new(), f.to_str().unwrap()).is_err());
        assert!(with_credentials(ConnectOptions::new(), "/nonexistent/creds").is_err());
    }

    #[test]
    fn a_ca_alone_is_tls_without_credentials_and_a_bad_one_names_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().to_str().unwrap();
        assert_eq!(
            ca_file(Some(path)).unwrap(),
            None,
            "no ca.crt: system roots"
        );
        std::fs::write(dir.path().join(CA_KEY), "not a certificate").unwrap();
        // The Secret is read once, ca.crt included: a bad one is refused naming the file,
        // whether the credentials or the CA are looked at first.
        let e = with_credentials(ConnectOptions::new(), path)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains(&format!("{path}/ca.crt")) && e.contains("not a PEM"),
            "{e}"
        );
        let e = ca_file(Some(path)).unwrap_err().to_string();
        assert!(
            e.contains(&format!("{path}/ca.crt")) && e.contains("not a PEM"),
            "{e}"
        );
        assert!(with_ca(ConnectOptions::new(), Some(path)).is_err());
    }
}
