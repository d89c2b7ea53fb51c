//! Identity headers (`x-user-*`) and the trusted path they may travel.
//!
//! Anything can send `x-user-id: admin`. A sidecar keeps inbound `x-user-*` headers only when
//! they come with an `x-weir-identity` signature made with the namespace's identity key (the
//! `weir-identity` Secret, mounted into every sidecar); otherwise it removes them before the app
//! sees them. The signatures are made by sidecars: the edge after validating a JWT, and every
//! sidecar on calls to the namespace's Microservices that carry `x-user-*` headers (so an app
//! propagates identity by copying the headers it received). The edge itself trusts nothing:
//! it removes every inbound `x-user-*` and sets its own from the token.
//!
//! Signature: `x-weir-identity: v1.<unix seconds>.<base64url HMAC-SHA256>` over
//! `weir-identity/v1\n<seconds>\n` and each `x-user-*` header as `name:value\n`, sorted by name.
//! It is accepted for [`MAX_AGE`] either way (clock skew between nodes), then refused.

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use http::{HeaderMap, HeaderName, HeaderValue};
use std::path::PathBuf;
use std::sync::{Arc, RwLock, Weak};
use std::time::Duration;

pub const IDENTITY_HEADER: HeaderName = HeaderName::from_static("x-weir-identity");
pub const USER_ID: HeaderName = HeaderName::from_static("x-user-id");
pub const USER_ROLE: HeaderName = HeaderName::from_static("x-user-role");
/// How far a signature's time may be from this sidecar's clock.
pub const MAX_AGE: u64 = 60;
/// How often the key file is read again (a Secret created or rotated after the pod started).
pub const RELOAD_EVERY: Duration = Duration::from_secs(10);

/// The namespace's identity key, re-read from its file so a later Secret is picked up.
pub struct IdentityKey {
    path: PathBuf,
    key: RwLock<Option<ring::hmac::Key>>,
}

impl std::fmt::Debug for IdentityKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "IdentityKey({})", self.path.display())
    }
}

impl IdentityKey {
    /// Reads the key now and every [`RELOAD_EVERY`] while the key is in use.
    pub fn start(path: &str) -> Arc<IdentityKey> {
        let k = Arc::new(IdentityKey {
            path: path.into(),
            key: RwLock::new(None),
        });
        k.reload(true);
        let weak: Weak<IdentityKey> = Arc::downgrade(&k);
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(RELOAD_EVERY).await;
                let Some(k) = weak.upgrade() else { return };
                k.reload(false);
            }
        });
        k
    }

    /// A key from bytes, for tests and tools.
    pub fn fixed(secret: &[u8]) -> Arc<IdentityKey> {
        Arc::new(IdentityKey {
            path: PathBuf::new(),
            key: RwLock::new(Some(ring::hmac::Key::new(ring::hmac::HMAC_SHA256, secret))),
        })
    }

    fn reload(&self, first: bool) {
        let key = match std::fs::read(&self.path) {
            Ok(b) => {
                let b = b.strip_suffix(b"\n").unwrap_or(&b).to_vec();
                if b.len() < 16 {
                    tracing::warn!(file = %self.path.display(), "identity key shorter than 16 bytes; not used");
                    None
                } else {
                    Some(ring::hmac::Key::new(ring::hmac::HMAC_SHA256, &b))
                }
            }
            Err(e) => {
                if first {
                    tracing::info!(file = %self.path.display(), error = %e, "no identity key: x-user-* headers are neither trusted nor signed");
                }
                None
            }
        };
        *self.key.write().unwrap_or_else(|e| e.into_inner()) = key;
    }

    fn get(&self) -> Option<ring::hmac::Key> {
        self.key.read().unwrap_or_else(|e| e.into_inner()).clone()
    }
}

pub fn is_user_header(name: &HeaderName) -> bool {
    name.as_str().starts_with("x-user-")
}

/// Removes every `x-user-*` header and any signature; true when there was something to remove.
pub fn strip(h: &mut HeaderMap) -> bool {
    let names: Vec<HeaderName> = h.keys().filter(|n| is_user_header(n)).cloned().collect();
    let had = !names.is_empty();
    for n in names {
        h.remove(n);
    }
    h.remove(IDENTITY_HEADER);
    had
}

fn message(h: &HeaderMap, t: u64) -> Vec<u8> {
    let mut entries: Vec<(&str, &[u8])> = h
        .iter()
        .filter(|(n, _)| is_user_header(n))
        .map(|(n, v)| (n.as_str(), v.as_bytes()))
        .collect();
    entries.sort();
    let mut m = format!("weir-identity/v1\n{t}\n").into_bytes();
    for (n, v) in entries {
        m.extend_from_slice(n.as_bytes());
        m.push(b':');
        m.extend_from_slice(v);
        m.push(b'\n');
    }
    m
}

/// Signs the `x-user-*` headers of `h` at time `now` (replacing any signature there was).
pub fn sign(h: &mut HeaderMap, key: &IdentityKey, now: u64) -> bool {
    h.remove(IDENTITY_HEADER);
    let Some(k) = key.get() else { return false };
    if !h.keys().any(is_user_header) {
        return false;
    }
    let tag = ring::hmac::sign(&k, &message(h, now));
    let v = format!("v1.{now}.{}", URL_SAFE_NO_PAD.encode(tag.as_ref()));
    h.insert(
        IDENTITY_HEADER,
        HeaderValue::from_str(&v).expect("ASCII signature"),
    );
    true
}

/// Why inbound `x-user-*` headers were not trusted.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Untrusted {
    /// The edge trusts no inbound identity.
    Edge,
    Unsigned,
    NoKey,
    BadSignature,
    Stale,
}

impl Untrusted {
    pub const ALL: [Untrusted; 5] = [
        Untrusted::Edge,
        Untrusted::Unsigned,
        Untrusted::NoKey,
        Untrusted::BadSignature,
        Untrusted::Stale,
    ];
    pub const fn as_str(self) -> &'static str {
        match self {
            Untrusted::Edge => "edge",
            Untrusted::Unsigned => "unsigned",
            Untrusted::NoKey => "no-key",
            Untrusted::BadSignature => "bad-signature",
            Untrusted::Stale => "stale",
        }
    }
}

/// Checks the signature over the `x-user-*` headers of `h` at time `now`.
pub fn verify(h: &HeaderMap, key: Option<&IdentityKey>, now: u64) -> Result<(), Untrusted> {
    let mut sigs = h.get_all(IDENTITY_HEADER).iter();
    let (Some(v), None) = (sigs.next(), sigs.next()) else {
        return Err(Untrusted::Unsigned);
    };
    let Some(k) = key.and_then(IdentityKey::get) else {
        return Err(Untrusted::NoKey);
    };
    let v = v.to_str().map_err(|_| Untrusted::BadSignature)?;
    let mut parts = v.split('.');
    let (Some("v1"), Some(t), Some(sig), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err(Untrusted::BadSignature);
    };
    let t: u64 = t.parse().map_err(|_| Untrusted::BadSignature)?;
    let sig = URL_SAFE_NO_PAD
        .decode(sig)
        .map_err(|_| Untrusted::BadSignature)?;
    ring::hmac::verify(&k, &message(h, t), &sig).map_err(|_| Untrusted::BadSignature)?;
    if now.abs_diff(t) > MAX_AGE {
        return Err(Untrusted::Stale);
    }
    Ok(())
}

/// Inbound: what to do with the identity headers of a request arriving at a sidecar. Returns
/// why they were removed, when they were.
pub fn inbound(
    h: &mut HeaderMap,
    edge: bool,
    key: Option<&IdentityKey>,
    now: u64,
) -> Option<Untrusted> {
    if !h.keys().any(is_user_header) {
        h.remove(IDENTITY_HEADER);
        return None;
    }
    let verdict = if edge {
        Err(Untrusted::Edge)
    } else {
        verify(h, key, now)
    };
    match verdict {
        Ok(()) => {
            h.remove(IDENTITY_HEADER);
            None
        }
        Err(why) => {
            strip(h);
            Some(why)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(pairs: &[(&str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (n, v) in pairs {
            h.append(
                HeaderName::from_bytes(n.as_bytes()).unwrap(),
                HeaderValue::from_str(v).unwrap(),
            );
        }
        h
    }

    #[test]
    fn signed_headers_are_kept_anything_else_is_removed() {
        let key = IdentityKey::fixed(b"a namespace identity key");
        let other = IdentityKey::fixed(b"another namespace's key!");
        let mut h = headers(&[
            ("x-user-id", "u1"),
            ("x-user-role", "buyer"),
            ("accept", "*/*"),
        ]);
        assert!(sign(&mut h, &key, 1000));
        let signed = h.clone();

        let mut ok = signed.clone();
        assert_eq!(inbound(&mut ok, false, Some(&key), 1030), None);
        assert_eq!(ok["x-user-id"], "u1");
        assert!(
            !ok.contains_key(IDENTITY_HEADER),
            "the app never sees the signature"
        );

        let cases: [(HeaderMap, Option<&IdentityKey>, u64, Untrusted); 5] = [
            (signed.clone(), Some(&other), 1000, Untrusted::BadSignature),
            (signed.clone(), None, 1000, Untrusted::NoKey),
            (signed.clone(), Some(&key), 1061, Untrusted::Stale),
            (
                {
                    let mut t = signed.clone();
                    t.insert("x-user-role", HeaderValue::from_static("admin"));
                    t
                },
                Some(&key),
                1000,
                Untrusted::BadSignature,
            ),
            (
                {
                    let mut t = signed.clone();
                    t.remove(IDENTITY_HEADER);
                    t
                },
                Some(&key),
                1000,
                Untrusted::Unsigned,
            ),
        ];
        for (mut h, k, now, why) in cases {
            assert_eq!(inbound(&mut h, false, k, now), Some(why));
            assert!(!h.keys().any(is_user_header), "{why:?}");
            assert_eq!(h["accept"], "*/*");
        }
        // An added x-user-* header breaks the signature too.
        let mut extra = signed.clone();
        extra.insert("x-user-tenant", HeaderValue::from_static("t2"));
        assert_eq!(
            inbound(&mut extra, false, Some(&key), 1000),
            Some(Untrusted::BadSignature)
        );
        // The edge trusts no inbound identity, signed or not.
        let mut at_edge = signed;
        assert_eq!(
            inbound(&mut at_edge, true, Some(&key), 1000),
            Some(Untrusted::Edge)
        );
        assert!(!at_edge.contains_key("x-user-id"));
    }
}
