//! The checks the fuzz targets run (`sidecar/fuzz`), also replayed over the committed seed
//! corpus by `tests/fuzz_corpus.rs` so they run under plain `cargo test`.

use crate::trace::{format_traceparent, parse_traceparent};
use weir_crds::proxy::ProxyConfig;

/// Config parsing never panics; an accepted config survives a serialize/parse round trip and
/// builds into service stacks.
pub fn check_config(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    match ProxyConfig::from_json(text) {
        Ok(cfg) => {
            let again = serde_json::to_string(&cfg).expect("an accepted config serializes");
            let back = ProxyConfig::from_json(&again).expect("a serialized config parses again");
            assert_eq!(back, cfg, "round trip");
        }
        Err(e) => assert!(!e.field.is_empty(), "errors name a field"),
    }
}

/// `traceparent` parsing never panics; what it accepts formats back to the same ids.
pub fn check_traceparent(data: &[u8]) {
    if let Some(p) = parse_traceparent(data) {
        assert_ne!(p.trace_id, [0; 16]);
        assert_ne!(p.span_id, [0; 8]);
        assert_ne!(p.version, 0xff);
        let out = format_traceparent(&p.trace_id, &p.span_id, p.flags);
        let again = parse_traceparent(&out).expect("formatted traceparent parses");
        assert_eq!(
            (again.trace_id, again.span_id, again.flags),
            (p.trace_id, p.span_id, p.flags)
        );
        if p.version == 0 {
            assert_eq!(&out[..], data, "version 00 is canonical");
        }
    }
}

/// The HS256 secret the `jwt` fuzz target checks signatures with (the seed corpus's valid tokens
/// are signed with it).
pub const JWT_FUZZ_SECRET: &[u8] = b"weir-fuzz-hs256-secret-32-bytes!";
/// The clock of the `jwt` fuzz target: claims are checked as of this time.
pub const JWT_FUZZ_NOW: u64 = 1_800_000_000;

/// Token parsing, signature and claim checks never panic on any input; `alg: none` never parses,
/// a token over the size bound is refused as oversized before anything else. Returns whether the
/// token is accepted (issuer `https://fuzz.weir.dev/`, audience `fuzz`).
pub fn check_jwt(data: &[u8]) -> bool {
    use crate::edge::jwt::{self, AuthError, Key, KeySet, Rules};
    const MAX: usize = 8192;
    let Ok(text) = std::str::from_utf8(data) else {
        return false;
    };
    let tok = match jwt::parse(text, MAX) {
        Ok(t) => t,
        Err(e) => {
            assert_eq!(e == AuthError::Oversized, text.len() > MAX, "size bound");
            return false;
        }
    };
    assert!(text.len() <= MAX);
    assert!(!tok.alg.eq_ignore_ascii_case("none"), "alg none parsed");
    let keys = KeySet {
        keys: vec![Key::hmac(JWT_FUZZ_SECRET).expect("a 32-byte secret")],
    };
    if tok.verify(&keys).is_err() {
        return false;
    }
    assert_eq!(tok.alg, "HS256", "only the key's own algorithm verifies");
    let rules = Rules {
        issuer: "https://fuzz.weir.dev/".into(),
        audiences: vec!["fuzz".into()],
        leeway_secs: 60,
        user_id_claim: "sub".into(),
        role_claim: "role".into(),
    };
    match rules.check(&tok.claims, JWT_FUZZ_NOW) {
        Ok(id) => {
            assert!(http::HeaderValue::from_str(&id.user_id).is_ok());
            if let Some(r) = id.role {
                assert!(http::HeaderValue::from_str(&r).is_ok());
            }
            true
        }
        Err(_) => false,
    }
}

/// JWKS parsing (a fetched document is untrusted input too) never panics; an accepted document
/// has at least one key.
pub fn check_jwks(data: &[u8]) {
    if let Ok((set, _)) = crate::edge::jwt::KeySet::from_jwks(data) {
        assert!(!set.keys.is_empty());
    }
}
