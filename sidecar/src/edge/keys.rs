//! Where the edge's verification keys come from: an inline JWKS, a file (a mounted Secret, re-read
//! on every refresh so a rotated Secret is picked up), or a URL fetched at start and on every
//! refresh, and fetched again, at most once per [`MIN_REFETCH`], when a token names a key id the
//! cached set does not have (the issuer rotated its keys).

use super::jwt::{Key, KeySet};
use crate::body::BoxBody;
use crate::forward::HttpClient;
use http_body_util::BodyExt;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, RwLock, Weak};
use std::time::Duration;
use tokio::time::Instant;
use weir_crds::proxy::JwtConfig;

/// Unknown key ids trigger at most one refetch in this period.
pub const MIN_REFETCH: Duration = Duration::from_secs(30);
/// After a failed load, the next try comes this much later (or at the refresh, if sooner).
pub const RETRY_AFTER_FAILURE: Duration = Duration::from_secs(5);
/// A JWKS response larger than this is refused.
pub const MAX_JWKS_BYTES: usize = 1 << 20;
const FETCH_TIMEOUT: Duration = Duration::from_secs(5);

#[derive(Debug)]
enum Origin {
    Inline,
    JwksFile(PathBuf),
    HmacFile(PathBuf),
    Uri(String),
}

/// The current key set and how to renew it.
pub struct KeySource {
    origin: Origin,
    client: HttpClient,
    keys: RwLock<Option<Arc<KeySet>>>,
    /// Held by every load (at start, on refresh, on demand): a request that needs keys waits for
    /// the load in flight and then looks again, so concurrent needs cost one fetch.
    loading: tokio::sync::Mutex<()>,
    /// When the last on-demand load for an unknown key id started ([`MIN_REFETCH`] apart).
    last_unknown_kid: Mutex<Option<Instant>>,
    /// When the last on-demand load while no keys were loaded at all started
    /// ([`RETRY_AFTER_FAILURE`] apart).
    last_no_keys: Mutex<Option<Instant>>,
}

/// Whether a load may start now, `min` after the last one recorded in `slot`; records it if so.
fn allow(slot: &Mutex<Option<Instant>>, min: Duration) -> bool {
    let mut last = slot.lock().unwrap_or_else(|e| e.into_inner());
    let now = Instant::now();
    if last.is_some_and(|t| now.duration_since(t) < min) {
        return false;
    }
    *last = Some(now);
    true
}

impl std::fmt::Debug for KeySource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "KeySource({:?})", self.origin)
    }
}

impl KeySource {
    /// Loads what can be loaded now and starts the refresh task for files and URLs. An invalid
    /// inline JWKS is an error naming the field; a file or URL that fails is retried.
    pub fn start(cfg: &JwtConfig, client: HttpClient) -> Result<Arc<KeySource>, String> {
        let origin = match (
            &cfg.jwks,
            &cfg.jwks_file,
            &cfg.jwks_uri,
            &cfg.hmac_secret_file,
        ) {
            (Some(_), ..) => Origin::Inline,
            (_, Some(f), ..) => Origin::JwksFile(f.into()),
            (_, _, Some(u), _) => Origin::Uri(u.clone()),
            (_, _, _, Some(f)) => Origin::HmacFile(f.into()),
            _ => return Err("edge.jwt: no key source".into()),
        };
        let src = Arc::new(KeySource {
            origin,
            client,
            keys: RwLock::new(None),
            loading: tokio::sync::Mutex::new(()),
            last_unknown_kid: Mutex::new(None),
            last_no_keys: Mutex::new(None),
        });
        match &src.origin {
            Origin::Inline => {
                let text = cfg.jwks.as_deref().unwrap_or_default();
                let (set, skipped) = KeySet::from_jwks(text.as_bytes())
                    .map_err(|e| format!("edge.jwt.jwks: {e}"))?;
                for s in skipped {
                    tracing::warn!(field = "edge.jwt.jwks", key = %s, "JWKS key skipped");
                }
                src.set(set);
            }
            Origin::JwksFile(_) | Origin::HmacFile(_) => {
                if let Err(e) = src.load_file() {
                    tracing::warn!(error = %e, "signing keys not loaded yet; retrying");
                }
                spawn_refresh(&src, Duration::from_millis(cfg.jwks_refresh_ms), false);
            }
            Origin::Uri(_) => {
                spawn_refresh(&src, Duration::from_millis(cfg.jwks_refresh_ms), true);
            }
        }
        Ok(src)
    }

    pub fn current(&self) -> Option<Arc<KeySet>> {
        self.keys.read().unwrap_or_else(|e| e.into_inner()).clone()
    }

    fn set(&self, set: KeySet) {
        *self.keys.write().unwrap_or_else(|e| e.into_inner()) = Some(Arc::new(set));
    }

    fn load_file(&self) -> Result<(), String> {
        match &self.origin {
            Origin::JwksFile(p) => {
                let bytes = std::fs::read(p).map_err(|e| format!("{}: {e}", p.display()))?;
                let (set, skipped) = KeySet::from_jwks(&bytes)
                    .map_err(|e| format!("edge.jwt.jwksFile {}: {e}", p.display()))?;
                for s in skipped {
                    tracing::warn!(file = %p.display(), key = %s, "JWKS key skipped");
                }
                self.set(set);
            }
            Origin::HmacFile(p) => {
                let bytes = std::fs::read(p).map_err(|e| format!("{}: {e}", p.display()))?;
                // A Secret written with a trailing newline (`echo ... > file`) means the same key.
                let secret = bytes.strip_suffix(b"\n").unwrap_or(&bytes);
                let key = Key::hmac(secret)
                    .map_err(|e| format!("edge.jwt.hmacSecretFile {}: {e}", p.display()))?;
                self.set(KeySet { keys: vec![key] });
            }
            _ => {}
        }
        Ok(())
    }

    async fn fetch(&self) -> Result<(), String> {
        let Origin::Uri(uri) = &self.origin else {
            return self.load_file();
        };
        let req = http::Request::get(uri.as_str())
            .header(http::header::ACCEPT, "application/json")
            .body(crate::body::empty())
            .map_err(|e| format!("edge.jwt.jwksUri {uri}: {e}"))?;
        let resp = if uri.starts_with("https://") {
            let c = crate::forward::https_client(weir_crds::proxy::WireProtocol::Http1)
                .map_err(|e| e.to_string())?;
            tokio::time::timeout(FETCH_TIMEOUT, c.request(req)).await
        } else {
            tokio::time::timeout(FETCH_TIMEOUT, self.client.request(req)).await
        };
        let resp = resp
            .map_err(|_| format!("{uri}: no answer within {FETCH_TIMEOUT:?}"))?
            .map_err(|e| format!("{uri}: {e}"))?;
        if !resp.status().is_success() {
            return Err(format!("{uri}: status {}", resp.status()));
        }
        let body: BoxBody = resp
            .into_body()
            .map_err(crate::body::BodyError::new)
            .boxed_unsync();
        let bytes = tokio::time::timeout(
            FETCH_TIMEOUT,
            http_body_util::Limited::new(body, MAX_JWKS_BYTES).collect(),
        )
        .await
        .map_err(|_| format!("{uri}: body not received within {FETCH_TIMEOUT:?}"))?
        .map_err(|e| format!("{uri}: {e}"))?
        .to_bytes();
        let (set, skipped) = KeySet::from_jwks(&bytes).map_err(|e| format!("{uri}: {e}"))?;
        for s in skipped {
            tracing::warn!(uri = %uri, key = %s, "JWKS key skipped");
        }
        self.set(set);
        Ok(())
    }

    /// Loads the keys again because none are loaded yet, or because a token names a key id
    /// (`kid`) the set does not have (the issuer rotated its keys). Waits for a load in flight
    /// first; then loads only if still needed, at most once per [`MIN_REFETCH`] for unknown key
    /// ids and once per [`RETRY_AFTER_FAILURE`] while nothing is loaded.
    pub async fn load_on_demand(&self, kid: Option<&str>) {
        if matches!(self.origin, Origin::Inline) {
            return;
        }
        let _loading = self.loading.lock().await;
        let allowed = match (self.current(), kid) {
            (None, _) => allow(&self.last_no_keys, RETRY_AFTER_FAILURE),
            (Some(set), Some(k)) if !set.has_kid(k) => allow(&self.last_unknown_kid, MIN_REFETCH),
            _ => false,
        };
        if allowed && let Err(e) = self.fetch().await {
            tracing::warn!(error = %e, "signing keys load failed");
        }
    }

    /// Whether the current set has a key for `kid` (a key without `kid` matches any).
    pub fn knows_kid(&self, kid: &str) -> bool {
        self.current().is_some_and(|s| s.has_kid(kid))
    }
}

/// Reloads the keys every `every` (sooner after a failure) for as long as the source is in use;
/// the first load is at once when `load_now`, else soon if nothing is loaded yet.
fn spawn_refresh(src: &Arc<KeySource>, every: Duration, load_now: bool) {
    let retry = RETRY_AFTER_FAILURE.min(every);
    let mut wait = match (load_now, src.current().is_some()) {
        (true, _) => Duration::ZERO,
        (false, true) => every,
        (false, false) => retry,
    };
    let weak: Weak<KeySource> = Arc::downgrade(src);
    tokio::spawn(async move {
        let mut first = load_now;
        loop {
            tokio::time::sleep(wait).await;
            let Some(src) = weak.upgrade() else { return };
            let _loading = src.loading.lock().await;
            // A request may have loaded the keys first: no second fetch at start.
            if std::mem::take(&mut first) && src.current().is_some() {
                wait = every;
                continue;
            }
            wait = match src.fetch().await {
                Ok(()) => every,
                Err(e) => {
                    tracing::warn!(error = %e, "signing keys not loaded; retrying");
                    retry
                }
            };
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};

    /// A JWKS endpoint on loopback that answers after 100 ms and counts its calls.
    async fn slow_jwks() -> (String, Arc<AtomicUsize>) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}/jwks", listener.local_addr().unwrap());
        let hits = Arc::new(AtomicUsize::new(0));
        let h2 = hits.clone();
        tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    continue;
                };
                let hits = h2.clone();
                tokio::spawn(async move {
                    let svc = hyper::service::service_fn(move |_req| {
                        hits.fetch_add(1, Ordering::SeqCst);
                        async move {
                            tokio::time::sleep(Duration::from_millis(100)).await;
                            let doc = r#"{"keys": [{"kty": "EC", "crv": "P-256", "kid": "e1",
                                "x": "AQEBAQEBAQEBAQEBAQEBAQEBAQEBAQEBAQEBAQEBAQE",
                                "y": "AgICAgICAgICAgICAgICAgICAgICAgICAgICAgICAgI"}]}"#;
                            Ok::<_, std::convert::Infallible>(http::Response::new(
                                http_body_util::Full::new(bytes::Bytes::from_static(
                                    doc.as_bytes(),
                                )),
                            ))
                        }
                    });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(hyper_util::rt::TokioIo::new(stream), svc)
                        .await;
                });
            }
        });
        (url, hits)
    }

    #[tokio::test]
    async fn concurrent_needs_cost_one_fetch_and_unknown_kids_are_rate_limited() {
        let (url, hits) = slow_jwks().await;
        let cfg = JwtConfig {
            issuer: "i".into(),
            audiences: vec!["a".into()],
            jwks: None,
            jwks_file: None,
            jwks_uri: Some(url),
            jwks_refresh_ms: 300_000,
            hmac_secret_file: None,
            leeway_ms: 60_000,
            user_id_claim: "sub".into(),
            role_claim: "role".into(),
            forward_token: false,
            max_token_bytes: 8192,
        };
        let src = KeySource::start(&cfg, crate::forward::new_client()).unwrap();
        // Requests arriving while the start-up fetch is in flight wait for it.
        futures::future::join_all((0..5).map(|_| src.load_on_demand(None))).await;
        assert!(src.knows_kid("e1"));
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert_eq!(hits.load(Ordering::SeqCst), 1);
        // A known kid loads nothing; an unknown one loads once, then not again for 30 s.
        src.load_on_demand(Some("e1")).await;
        assert_eq!(hits.load(Ordering::SeqCst), 1);
        src.load_on_demand(Some("rotated")).await;
        assert_eq!(hits.load(Ordering::SeqCst), 2);
        src.load_on_demand(Some("another")).await;
        assert_eq!(hits.load(Ordering::SeqCst), 2);
    }
}
