//! JWT validation (JWS compact serialization) on `ring`: parsing with hard size bounds, signature
//! checks where the key decides the algorithm (a token's `alg` only has to agree with it, so
//! `none` and HS256-with-an-RSA-key are refused), and the registered claims.

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use ring::signature::{
    ECDSA_P256_SHA256_FIXED, RSA_PKCS1_2048_8192_SHA256, RsaPublicKeyComponents, UnparsedPublicKey,
};
use serde::Deserialize;
use serde_json::{Map, Value};

/// The algorithms Weir accepts, one per kind of key.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Alg {
    Rs256,
    Es256,
    Hs256,
}

impl Alg {
    pub fn from_name(s: &str) -> Option<Alg> {
        match s {
            "RS256" => Some(Alg::Rs256),
            "ES256" => Some(Alg::Es256),
            "HS256" => Some(Alg::Hs256),
            _ => None,
        }
    }

    pub const fn name(self) -> &'static str {
        match self {
            Alg::Rs256 => "RS256",
            Alg::Es256 => "ES256",
            Alg::Hs256 => "HS256",
        }
    }
}

enum Material {
    Rsa {
        n: Vec<u8>,
        e: Vec<u8>,
    },
    /// Uncompressed P-256 point: `0x04 || x || y`.
    Ec(Vec<u8>),
    Hmac(ring::hmac::Key),
}

/// One verification key and the one algorithm it may be used with.
pub struct Key {
    /// A key without `kid` matches any token `kid`.
    pub kid: Option<String>,
    pub alg: Alg,
    material: Material,
}

impl std::fmt::Debug for Key {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Key({:?}, {})", self.kid, self.alg.name())
    }
}

impl Key {
    /// An HS256 key from a shared secret (at least 32 bytes, as RFC 7518 §3.2 requires).
    pub fn hmac(secret: &[u8]) -> Result<Key, String> {
        if secret.len() < 32 {
            return Err(format!(
                "HS256 secret has {} bytes; at least 32 are needed",
                secret.len()
            ));
        }
        Ok(Key {
            kid: None,
            alg: Alg::Hs256,
            material: Material::Hmac(ring::hmac::Key::new(ring::hmac::HMAC_SHA256, secret)),
        })
    }

    fn verify(&self, message: &[u8], signature: &[u8]) -> bool {
        match &self.material {
            Material::Rsa { n, e } => RsaPublicKeyComponents { n, e }
                .verify(&RSA_PKCS1_2048_8192_SHA256, message, signature)
                .is_ok(),
            Material::Ec(point) => UnparsedPublicKey::new(&ECDSA_P256_SHA256_FIXED, point)
                .verify(message, signature)
                .is_ok(),
            Material::Hmac(k) => ring::hmac::verify(k, message, signature).is_ok(),
        }
    }
}

/// The keys tokens are checked against.
#[derive(Debug, Default)]
pub struct KeySet {
    pub keys: Vec<Key>,
}

#[derive(Deserialize)]
struct Jwks {
    keys: Vec<Value>,
}

fn b64_field(jwk: &Map<String, Value>, name: &str) -> Result<Vec<u8>, String> {
    let s = jwk
        .get(name)
        .and_then(Value::as_str)
        .ok_or_else(|| format!("missing {name}"))?;
    URL_SAFE_NO_PAD
        .decode(s.trim_end_matches('='))
        .map_err(|e| format!("{name}: not base64url: {e}"))
}

fn jwk_key(v: &Value) -> Result<Key, String> {
    let jwk = v.as_object().ok_or("not an object")?;
    let text = |f: &str| jwk.get(f).and_then(Value::as_str);
    if let Some(u) = text("use")
        && u != "sig"
    {
        return Err(format!("use {u:?} is not sig"));
    }
    let kid = text("kid").map(str::to_string);
    let (alg, material) = match text("kty") {
        Some("RSA") => {
            let n = b64_field(jwk, "n")?;
            let e = b64_field(jwk, "e")?;
            let bits = n.iter().skip_while(|b| **b == 0).count() * 8;
            if !(2048..=8192).contains(&bits) {
                return Err(format!(
                    "RSA modulus of {bits} bits; 2048 to 8192 are accepted"
                ));
            }
            (Alg::Rs256, Material::Rsa { n, e })
        }
        Some("EC") => {
            if text("crv") != Some("P-256") {
                return Err(format!(
                    "EC curve {:?}; only P-256 is accepted",
                    text("crv")
                ));
            }
            let (x, y) = (b64_field(jwk, "x")?, b64_field(jwk, "y")?);
            if x.len() != 32 || y.len() != 32 {
                return Err("P-256 coordinates must be 32 bytes".into());
            }
            let mut point = Vec::with_capacity(65);
            point.push(4);
            point.extend_from_slice(&x);
            point.extend_from_slice(&y);
            (Alg::Es256, Material::Ec(point))
        }
        other => return Err(format!("kty {other:?} is not supported (RSA or EC)")),
    };
    if let Some(a) = text("alg")
        && a != alg.name()
    {
        return Err(format!("alg {a:?} is not supported for this key"));
    }
    Ok(Key { kid, alg, material })
}

impl KeySet {
    /// Parses a JWKS document. Keys Weir cannot use are skipped (and named in `skipped`); a
    /// document without a single usable key is an error.
    pub fn from_jwks(bytes: &[u8]) -> Result<(KeySet, Vec<String>), String> {
        let doc: Jwks =
            serde_json::from_slice(bytes).map_err(|e| format!("not a JWKS document: {e}"))?;
        let mut keys = Vec::new();
        let mut skipped = Vec::new();
        for (i, v) in doc.keys.iter().enumerate() {
            match jwk_key(v) {
                Ok(k) => keys.push(k),
                Err(e) => skipped.push(format!("keys[{i}]: {e}")),
            }
        }
        if keys.is_empty() {
            return Err(format!(
                "no usable key (RS256 with RSA, ES256 with P-256){}",
                if skipped.is_empty() {
                    String::new()
                } else {
                    format!(": {}", skipped.join("; "))
                }
            ));
        }
        Ok((KeySet { keys }, skipped))
    }

    pub fn has_kid(&self, kid: &str) -> bool {
        self.keys
            .iter()
            .any(|k| k.kid.is_none() || k.kid.as_deref() == Some(kid))
    }
}

/// Why a request was refused; the label of `weir_auth_rejections_total` and the
/// `error_description` of the `WWW-Authenticate` header.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum AuthError {
    Missing,
    Oversized,
    Malformed,
    AlgNone,
    AlgNotAllowed,
    UnknownKid,
    BadSignature,
    Expired,
    NotYetValid,
    WrongIssuer,
    WrongAudience,
    MissingClaim,
    KeysUnavailable,
}

impl AuthError {
    pub const ALL: [AuthError; 13] = [
        AuthError::Missing,
        AuthError::Oversized,
        AuthError::Malformed,
        AuthError::AlgNone,
        AuthError::AlgNotAllowed,
        AuthError::UnknownKid,
        AuthError::BadSignature,
        AuthError::Expired,
        AuthError::NotYetValid,
        AuthError::WrongIssuer,
        AuthError::WrongAudience,
        AuthError::MissingClaim,
        AuthError::KeysUnavailable,
    ];

    pub const fn as_str(self) -> &'static str {
        match self {
            AuthError::Missing => "missing-token",
            AuthError::Oversized => "oversized",
            AuthError::Malformed => "malformed",
            AuthError::AlgNone => "alg-none",
            AuthError::AlgNotAllowed => "alg-not-allowed",
            AuthError::UnknownKid => "unknown-kid",
            AuthError::BadSignature => "bad-signature",
            AuthError::Expired => "expired",
            AuthError::NotYetValid => "not-yet-valid",
            AuthError::WrongIssuer => "wrong-issuer",
            AuthError::WrongAudience => "wrong-audience",
            AuthError::MissingClaim => "missing-claim",
            AuthError::KeysUnavailable => "keys-unavailable",
        }
    }

    pub const fn description(self) -> &'static str {
        match self {
            AuthError::Missing => "missing bearer token",
            AuthError::Oversized => "token too large",
            AuthError::Malformed => "malformed token",
            AuthError::AlgNone => "unsigned tokens (alg none) are not accepted",
            AuthError::AlgNotAllowed => "algorithm not allowed for the signing key",
            AuthError::UnknownKid => "unknown key id",
            AuthError::BadSignature => "invalid signature",
            AuthError::Expired => "token expired",
            AuthError::NotYetValid => "token not yet valid",
            AuthError::WrongIssuer => "wrong issuer",
            AuthError::WrongAudience => "wrong audience",
            AuthError::MissingClaim => "identity claim missing or not a header value",
            AuthError::KeysUnavailable => "signing keys unavailable",
        }
    }
}

#[derive(Deserialize)]
struct RawHeader {
    alg: String,
    #[serde(default)]
    kid: Option<String>,
    #[serde(default)]
    crit: Option<Value>,
}

/// A token split and decoded, its signature not yet checked.
#[derive(Debug)]
pub struct Token<'a> {
    pub alg: String,
    pub kid: Option<String>,
    pub claims: Map<String, Value>,
    signing_input: &'a [u8],
    signature: Vec<u8>,
}

fn decode(part: &str) -> Result<Vec<u8>, AuthError> {
    URL_SAFE_NO_PAD
        .decode(part)
        .map_err(|_| AuthError::Malformed)
}

/// Splits and decodes a compact JWS. Nothing is trusted yet; sizes are bounded by `max_bytes`.
pub fn parse(token: &str, max_bytes: usize) -> Result<Token<'_>, AuthError> {
    if token.len() > max_bytes {
        return Err(AuthError::Oversized);
    }
    let mut parts = token.split('.');
    let (Some(h), Some(p), Some(s), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err(AuthError::Malformed);
    };
    let header: RawHeader =
        serde_json::from_slice(&decode(h)?).map_err(|_| AuthError::Malformed)?;
    if header.alg.eq_ignore_ascii_case("none") {
        return Err(AuthError::AlgNone);
    }
    // Extensions this validator does not understand must be refused (RFC 7515 §4.1.11).
    if header.crit.is_some() {
        return Err(AuthError::Malformed);
    }
    let claims = match serde_json::from_slice(&decode(p)?) {
        Ok(Value::Object(m)) => m,
        _ => return Err(AuthError::Malformed),
    };
    let signature = decode(s)?;
    if signature.is_empty() {
        return Err(AuthError::Malformed);
    }
    Ok(Token {
        alg: header.alg,
        kid: header.kid,
        claims,
        signing_input: &token.as_bytes()[..h.len() + 1 + p.len()],
        signature,
    })
}

impl Token<'_> {
    /// Checks the signature with a key that matches the token's `kid` (if any) and whose own
    /// algorithm is the token's `alg`.
    pub fn verify(&self, keys: &KeySet) -> Result<(), AuthError> {
        let alg = Alg::from_name(&self.alg).ok_or(AuthError::AlgNotAllowed)?;
        let by_kid = keys.keys.iter().filter(|k| match (&self.kid, &k.kid) {
            (Some(t), Some(k)) => t == k,
            _ => true,
        });
        let mut matched_kid = false;
        let mut matched_alg = false;
        for k in by_kid {
            matched_kid = true;
            if k.alg != alg {
                continue;
            }
            matched_alg = true;
            if k.verify(self.signing_input, &self.signature) {
                return Ok(());
            }
        }
        Err(if !matched_kid {
            AuthError::UnknownKid
        } else if !matched_alg {
            AuthError::AlgNotAllowed
        } else {
            AuthError::BadSignature
        })
    }
}

/// The registered claims a token must satisfy, and where the identity comes from.
#[derive(Clone, Debug)]
pub struct Rules {
    pub issuer: String,
    pub audiences: Vec<String>,
    pub leeway_secs: u64,
    pub user_id_claim: String,
    pub role_claim: String,
}

/// Who the request is from, ready to become `x-user-id` / `x-user-role`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Identity {
    pub user_id: String,
    pub role: Option<String>,
}

/// A claim by dotted path (`realm_access.roles`); a name with a dot is tried whole first.
fn claim<'a>(claims: &'a Map<String, Value>, path: &str) -> Option<&'a Value> {
    if let Some(v) = claims.get(path) {
        return Some(v);
    }
    let mut parts = path.split('.');
    let mut v = claims.get(parts.next()?)?;
    for p in parts {
        v = v.as_object()?.get(p)?;
    }
    Some(v)
}

fn header_safe(s: &str) -> bool {
    !s.is_empty() && s.len() <= 1024 && s.bytes().all(|b| (0x20..0x7f).contains(&b))
}

fn numeric(v: Option<&Value>) -> Result<Option<f64>, AuthError> {
    match v {
        None => Ok(None),
        Some(Value::Number(n)) => n.as_f64().map(Some).ok_or(AuthError::Malformed),
        Some(_) => Err(AuthError::Malformed),
    }
}

impl Rules {
    /// Checks `iss`, `aud`, `exp` (required) and `nbf` at `now` (seconds since the epoch), then
    /// extracts the identity.
    pub fn check(&self, claims: &Map<String, Value>, now: u64) -> Result<Identity, AuthError> {
        if claims.get("iss").and_then(Value::as_str) != Some(self.issuer.as_str()) {
            return Err(AuthError::WrongIssuer);
        }
        let aud_ok = match claims.get("aud") {
            Some(Value::String(a)) => self.audiences.iter().any(|x| x == a),
            Some(Value::Array(list)) => list
                .iter()
                .filter_map(Value::as_str)
                .any(|a| self.audiences.iter().any(|x| x == a)),
            _ => false,
        };
        if !aud_ok {
            return Err(AuthError::WrongAudience);
        }
        let now = now as f64;
        let leeway = self.leeway_secs as f64;
        match numeric(claims.get("exp"))? {
            None => return Err(AuthError::Malformed),
            Some(exp) if now >= exp + leeway => return Err(AuthError::Expired),
            Some(_) => {}
        }
        if let Some(nbf) = numeric(claims.get("nbf"))?
            && now + leeway < nbf
        {
            return Err(AuthError::NotYetValid);
        }
        let user_id = match claim(claims, &self.user_id_claim) {
            Some(Value::String(s)) => s.clone(),
            Some(Value::Number(n)) => n.to_string(),
            _ => return Err(AuthError::MissingClaim),
        };
        if !header_safe(&user_id) {
            return Err(AuthError::MissingClaim);
        }
        let role = match claim(claims, &self.role_claim) {
            None | Some(Value::Null) => None,
            Some(Value::String(s)) => Some(s.clone()),
            Some(Value::Array(list)) => {
                let roles: Vec<&str> = list.iter().filter_map(Value::as_str).collect();
                (!roles.is_empty()).then(|| roles.join(","))
            }
            Some(_) => return Err(AuthError::MissingClaim),
        };
        if role.as_deref().is_some_and(|r| !header_safe(r)) {
            return Err(AuthError::MissingClaim);
        }
        Ok(Identity { user_id, role })
    }
}

/// Seconds since the Unix epoch.
pub fn now_secs() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn b64(v: &[u8]) -> String {
        URL_SAFE_NO_PAD.encode(v)
    }

    fn hs256(secret: &[u8], header: &Value, claims: &Value) -> String {
        let input = format!(
            "{}.{}",
            b64(header.to_string().as_bytes()),
            b64(claims.to_string().as_bytes())
        );
        let k = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, secret);
        let sig = ring::hmac::sign(&k, input.as_bytes());
        format!("{input}.{}", b64(sig.as_ref()))
    }

    fn rules() -> Rules {
        Rules {
            issuer: "https://issuer".into(),
            audiences: vec!["shop".into()],
            leeway_secs: 60,
            user_id_claim: "sub".into(),
            role_claim: "role".into(),
        }
    }

    const SECRET: &[u8] = b"0123456789abcdef0123456789abcdef";

    #[test]
    fn hs256_round_trip_and_claims() {
        let keys = KeySet {
            keys: vec![Key::hmac(SECRET).unwrap()],
        };
        let t = hs256(
            SECRET,
            &json!({"alg": "HS256", "typ": "JWT"}),
            &json!({"iss": "https://issuer", "aud": ["x", "shop"], "exp": 2000, "sub": "u1", "role": ["admin", "ops"]}),
        );
        let tok = parse(&t, 8192).unwrap();
        tok.verify(&keys).unwrap();
        let id = rules().check(&tok.claims, 1000).unwrap();
        assert_eq!(id.user_id, "u1");
        assert_eq!(id.role.as_deref(), Some("admin,ops"));
        // Leeway: 59 s after exp is accepted, 60 s is not.
        assert!(rules().check(&tok.claims, 2059).is_ok());
        assert_eq!(rules().check(&tok.claims, 2060), Err(AuthError::Expired));
        // A flipped signature byte fails.
        let mut bad = t.clone().into_bytes();
        let last = bad.len() - 2;
        bad[last] = if bad[last] == b'A' { b'B' } else { b'A' };
        let bad = String::from_utf8(bad).unwrap();
        assert_eq!(
            parse(&bad, 8192).unwrap().verify(&keys),
            Err(AuthError::BadSignature)
        );
    }

    #[test]
    fn the_key_decides_the_algorithm() {
        let keys = KeySet {
            keys: vec![Key::hmac(SECRET).unwrap()],
        };
        let t = hs256(
            SECRET,
            &json!({"alg": "RS256"}),
            &json!({"iss": "https://issuer"}),
        );
        assert_eq!(
            parse(&t, 8192).unwrap().verify(&keys),
            Err(AuthError::AlgNotAllowed)
        );
        let none = format!("{}.{}.", b64(br#"{"alg":"none"}"#), b64(br#"{"sub":"x"}"#));
        assert_eq!(parse(&none, 8192).unwrap_err(), AuthError::AlgNone);
        let none_sig = format!("{none}AAAA");
        assert_eq!(parse(&none_sig, 8192).unwrap_err(), AuthError::AlgNone);
    }

    #[test]
    fn malformed_inputs_are_refused() {
        for t in [
            "",
            "a.b",
            "a.b.c.d",
            "!!!.e30.AAAA",
            "e30.e30.AAAA",
            &format!("{}.W10.AAAA", b64(br#"{"alg":"HS256"}"#)),
            &format!("{}.e30.", b64(br#"{"alg":"HS256"}"#)),
            &format!("{}.e30.AAAA", b64(br#"{"alg":"HS256","crit":["x"]}"#)),
        ] {
            assert_eq!(parse(t, 8192).unwrap_err(), AuthError::Malformed, "{t}");
        }
        assert_eq!(
            parse(&"a".repeat(9000), 8192).unwrap_err(),
            AuthError::Oversized
        );
    }

    #[test]
    fn jwks_keeps_usable_keys_and_names_the_rest() {
        let doc = json!({"keys": [
            {"kty": "oct", "k": "AAAA"},
            {"kty": "EC", "crv": "P-256", "kid": "e1", "x": b64(&[1; 32]), "y": b64(&[2; 32])},
            {"kty": "RSA", "kid": "small", "n": b64(&[0xff; 64]), "e": "AQAB"},
            {"kty": "EC", "crv": "P-384", "x": "AA", "y": "AA"},
        ]});
        let (set, skipped) = KeySet::from_jwks(doc.to_string().as_bytes()).unwrap();
        assert_eq!(set.keys.len(), 1);
        assert_eq!(set.keys[0].alg, Alg::Es256);
        assert_eq!(skipped.len(), 3, "{skipped:?}");
        assert!(KeySet::from_jwks(br#"{"keys": []}"#).is_err());
        assert!(KeySet::from_jwks(b"nope").is_err());
    }

    #[test]
    fn claims_checks() {
        let base = json!({"iss": "https://issuer", "aud": "shop", "exp": 2000, "sub": "u1"});
        let with = |k: &str, v: Value| {
            let mut m = base.as_object().unwrap().clone();
            m.insert(k.into(), v);
            m
        };
        let r = rules();
        assert_eq!(
            r.check(&with("iss", json!("other")), 1000),
            Err(AuthError::WrongIssuer)
        );
        assert_eq!(
            r.check(&with("aud", json!(["a", "b"])), 1000),
            Err(AuthError::WrongAudience)
        );
        assert_eq!(
            r.check(&with("nbf", json!(1100)), 1000),
            Err(AuthError::NotYetValid)
        );
        assert!(r.check(&with("nbf", json!(1050)), 1000).is_ok());
        assert_eq!(
            r.check(&with("exp", json!("soon")), 1000),
            Err(AuthError::Malformed)
        );
        let mut no_exp = base.as_object().unwrap().clone();
        no_exp.remove("exp");
        assert_eq!(r.check(&no_exp, 1000), Err(AuthError::Malformed));
        assert_eq!(
            r.check(&with("sub", json!("a\nb")), 1000),
            Err(AuthError::MissingClaim)
        );
        let nested = Rules {
            role_claim: "realm_access.roles".into(),
            ..rules()
        };
        let id = nested
            .check(&with("realm_access", json!({"roles": ["buyer"]})), 1000)
            .unwrap();
        assert_eq!(id.role.as_deref(), Some("buyer"));
    }
}
