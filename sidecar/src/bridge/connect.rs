//! The broker connection: NATS with reconnect forever (capped exponential backoff).
//!
//! `credentialsFile` names the Broker's credentials Secret as mounted (one file per key), in
//! one of two documented forms (docs/messaging.md, "Broker credentials"):
//! - a directory (what the operator renders: `/etc/weir/broker`) holding `creds` (a NATS
//!   `.creds` file: user JWT and NKey seed), or `token`, or `username` and `password`; the first
//!   present wins in that order;
//! - a NATS `.creds` file itself.

use async_nats::{Client, ConnectOptions, Event};
use std::path::Path;
use std::time::Duration;

/// Longest pause between two reconnect attempts.
pub const MAX_RECONNECT_DELAY: Duration = Duration::from_secs(2);

/// The delay before reconnect attempt `attempts` (1-based): 50 ms doubling up to 2 s.
pub fn reconnect_delay(attempts: usize) -> Duration {
    let exp = attempts.saturating_sub(1).min(10) as u32;
    Duration::from_millis(50u64 << exp).min(MAX_RECONNECT_DELAY)
}

fn read_trimmed(p: &Path) -> Option<String> {
    std::fs::read_to_string(p)
        .ok()
        .map(|s| s.trim().to_string())
        .filter(|s| !s.is_empty())
}

/// Applies the credentials found at `path` (see the module doc).
pub fn with_credentials(opts: ConnectOptions, path: &str) -> Result<ConnectOptions, String> {
    let p = Path::new(path);
    let creds = |text: &str, from: &Path| {
        opts.clone()
            .credentials(text)
            .map_err(|e| format!("invalid NATS credentials file {}: {e}", from.display()))
    };
    if !p.is_dir() {
        let text = std::fs::read_to_string(p)
            .map_err(|e| format!("cannot read credentials file {path}: {e}"))?;
        if text.contains("BEGIN NATS USER JWT") {
            return creds(&text, p);
        }
        return Err(format!(
            "credentials file {path} is not a NATS .creds file (a Secret directory holding \
             `creds`, `token`, or `username` and `password` is the other accepted form)"
        ));
    }
    let f = p.join("creds");
    if let Some(text) = read_trimmed(&f) {
        return creds(&text, &f);
    }
    if let Some(token) = read_trimmed(&p.join("token")) {
        return Ok(opts.token(token));
    }
    match (
        read_trimmed(&p.join("username")),
        read_trimmed(&p.join("password")),
    ) {
        (Some(u), Some(pw)) => Ok(opts.user_and_password(u, pw)),
        _ => Err(format!(
            "credentials directory {path} holds none of `creds`, `token`, or `username` and \
             `password`"
        )),
    }
}

/// `on_state` is told `true` on every (re)connection and `false` on every disconnection.
pub async fn connect(
    url: &str,
    credentials: Option<&str>,
    name: &str,
    on_state: impl Fn(bool) + Send + Sync + 'static,
) -> Result<Client, String> {
    let on_state = std::sync::Arc::new(on_state);
    let mut opts = ConnectOptions::new()
        .name(name)
        .retry_on_initial_connect()
        .max_reconnects(None)
        .connection_timeout(Duration::from_secs(2))
        .reconnect_delay_callback(reconnect_delay)
        .event_callback(move |ev| {
            let on_state = on_state.clone();
            async move {
                match ev {
                    Event::Connected => {
                        on_state(true);
                        tracing::info!("broker connected");
                    }
                    Event::Disconnected => {
                        on_state(false);
                        tracing::warn!("broker disconnected; reconnecting");
                    }
                    other => tracing::debug!(event = %other, "broker event"),
                }
            }
        });
    if let Some(c) = credentials {
        opts = with_credentials(opts, c)?;
    }
    opts.connect(url)
        .await
        .map_err(|e| format!("cannot connect to {url}: {e}"))
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
}
