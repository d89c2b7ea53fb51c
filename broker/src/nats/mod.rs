//! Connecting to NATS once, as the operator, the saga coordinator and `weir` commands do:
//! credentials and TLS from [`Credentials`], a bounded wait, no retry loop (a controller
//! requeues, a command reports). The sidecar keeps a connection of its own that reconnects.
//! With feature `admin`, `admin` is the operator's role on JetStream.

#[cfg(feature = "admin")]
pub mod admin;
#[cfg(feature = "admin")]
pub mod dead_letters;
#[cfg(feature = "admin")]
pub mod rewind;

pub mod transport;

use crate::credentials::{Auth, Credentials, CredentialsError};
use std::time::Duration;

/// How long one connection attempt may take.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// Why a connection could not be made.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum ConnectError {
    /// The credentials are not usable (before any connection is tried).
    #[error("credentials: {0}")]
    Credentials(#[from] CredentialsError),
    /// The server could not be reached, refused the credentials, or did not answer in time.
    #[error("{url}: {message}")]
    Connect {
        /// The URL without its password.
        url: String,
        message: String,
    },
}

/// Connects to `url` as client `name`. A CA in the credentials means TLS is required: a server
/// offering none is refused, not talked to in plain text.
pub async fn connect(
    url: &str,
    credentials: &Credentials,
    name: &str,
) -> Result<async_nats::Client, ConnectError> {
    let mut opts = async_nats::ConnectOptions::new()
        .connection_timeout(CONNECT_TIMEOUT)
        .name(name);
    opts = match &credentials.auth {
        Auth::None => opts,
        Auth::UserPassword { username, password } => {
            opts.user_and_password(username.clone(), password.clone())
        }
        Auth::Token(t) => opts.token(t.clone()),
        Auth::Creds(c) => opts
            .credentials(c)
            .map_err(|e| CredentialsError(format!("not a NATS creds file: {e}")))?,
        Auth::Password(_) => {
            return Err(CredentialsError(
                "a password alone is no NATS credential (use username and password, token, or \
                 creds)"
                    .into(),
            )
            .into());
        }
    };
    if let Some(tls) = credentials.tls_config()? {
        opts = opts.tls_client_config(tls).require_tls(true);
    }
    let failed = |message: String| ConnectError::Connect {
        url: weir_crds::redact::url(url),
        message,
    };
    tokio::time::timeout(CONNECT_TIMEOUT * 2, opts.connect(url))
        .await
        .map_err(|_| failed("timed out".into()))?
        .map_err(|e| failed(e.to_string()))
}

/// JetStream's error code for a stream that does not exist.
pub const STREAM_NOT_FOUND: u64 = 10059;

/// Whether stream `name` exists (a missing one is `false`, not an error). It asks the server
/// (`get_stream`): `get_stream_no_info` makes no request and would say yes to anything.
pub async fn stream_exists(
    js: &async_nats::jetstream::Context,
    name: &str,
) -> Result<bool, async_nats::jetstream::context::GetStreamError> {
    use async_nats::jetstream::context::GetStreamErrorKind;
    match js.get_stream(name).await {
        Ok(_) => Ok(true),
        Err(e) => match e.kind() {
            GetStreamErrorKind::JetStream(j) if j.error_code().0 == STREAM_NOT_FOUND => Ok(false),
            _ => Err(e),
        },
    }
}
