//! Keys, tokens and configs for the edge tests: RS256 keys from `tests/fixtures`, ES256 keys made
//! on the spot, HS256 secrets, and an edge config around them.
#![allow(dead_code)]

use base64::Engine;
use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
use ring::rand::SystemRandom;
use ring::signature::{self, EcdsaKeyPair, KeyPair, RsaKeyPair};
use serde_json::{Value, json};
use std::net::SocketAddr;
use weir_crds::proxy::*;

pub const ISSUER: &str = "https://id.example.com/";
pub const AUDIENCE: &str = "shop-api";
pub const HMAC_SECRET: &[u8] = b"a-shared-hs256-secret-of-32-bytes!!";
pub const IDENTITY_KEY: &[u8] = b"the namespace identity key, 32+ bytes";

pub fn b64(v: &[u8]) -> String {
    URL_SAFE_NO_PAD.encode(v)
}

pub enum Signer {
    Rsa(RsaKeyPair),
    Ec(EcdsaKeyPair),
    Hmac(Vec<u8>),
}

fn pem_der(file: &str) -> Vec<u8> {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(file);
    let text = std::fs::read_to_string(&path).unwrap();
    let body: String = text.lines().filter(|l| !l.starts_with("-----")).collect();
    STANDARD.decode(body).unwrap()
}

/// RSA key `a` or `b` from the fixtures.
pub fn rsa(which: &str) -> Signer {
    Signer::Rsa(RsaKeyPair::from_pkcs8(&pem_der(&format!("edge-rsa-{which}.pem"))).unwrap())
}

/// A fresh P-256 key.
pub fn ec() -> Signer {
    let rng = SystemRandom::new();
    let pkcs8 =
        EcdsaKeyPair::generate_pkcs8(&signature::ECDSA_P256_SHA256_FIXED_SIGNING, &rng).unwrap();
    Signer::Ec(
        EcdsaKeyPair::from_pkcs8(
            &signature::ECDSA_P256_SHA256_FIXED_SIGNING,
            pkcs8.as_ref(),
            &rng,
        )
        .unwrap(),
    )
}

impl Signer {
    pub fn alg(&self) -> &'static str {
        match self {
            Signer::Rsa(_) => "RS256",
            Signer::Ec(_) => "ES256",
            Signer::Hmac(_) => "HS256",
        }
    }

    /// The public key as a JWK with `kid`.
    pub fn jwk(&self, kid: &str) -> Value {
        match self {
            Signer::Rsa(k) => {
                let c: signature::RsaPublicKeyComponents<Vec<u8>> = k.public().into();
                json!({"kty": "RSA", "kid": kid, "use": "sig", "alg": "RS256", "n": b64(&c.n), "e": b64(&c.e)})
            }
            Signer::Ec(k) => {
                let p = k.public_key().as_ref();
                json!({"kty": "EC", "kid": kid, "crv": "P-256", "x": b64(&p[1..33]), "y": b64(&p[33..65])})
            }
            Signer::Hmac(_) => panic!("no JWK for an HMAC secret"),
        }
    }

    pub fn sign(&self, input: &[u8]) -> Vec<u8> {
        let rng = SystemRandom::new();
        match self {
            Signer::Rsa(k) => {
                let mut sig = vec![0; k.public().modulus_len()];
                k.sign(&signature::RSA_PKCS1_SHA256, &rng, input, &mut sig)
                    .unwrap();
                sig
            }
            Signer::Ec(k) => k.sign(&rng, input).unwrap().as_ref().to_vec(),
            Signer::Hmac(s) => {
                let k = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, s);
                ring::hmac::sign(&k, input).as_ref().to_vec()
            }
        }
    }

    /// A token with this key's algorithm, `kid` in the header when given.
    pub fn token(&self, kid: Option<&str>, claims: &Value) -> String {
        let mut header = json!({"alg": self.alg(), "typ": "JWT"});
        if let Some(k) = kid {
            header["kid"] = json!(k);
        }
        raw_token(&header, claims, |input| self.sign(input))
    }
}

/// A token with any header, signed by `sign` over the signing input.
pub fn raw_token(header: &Value, claims: &Value, sign: impl Fn(&[u8]) -> Vec<u8>) -> String {
    let input = format!(
        "{}.{}",
        b64(header.to_string().as_bytes()),
        b64(claims.to_string().as_bytes())
    );
    let sig = sign(input.as_bytes());
    format!("{input}.{}", b64(&sig))
}

pub fn now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64
}

/// Claims that pass: right issuer and audience, valid for ten minutes.
pub fn claims(sub: &str, role: &str) -> Value {
    json!({"iss": ISSUER, "aud": AUDIENCE, "sub": sub, "role": role, "iat": now(), "exp": now() + 600})
}

pub fn jwks(keys: &[Value]) -> String {
    json!({ "keys": keys }).to_string()
}

pub fn jwt_config() -> JwtConfig {
    JwtConfig {
        issuer: ISSUER.into(),
        audiences: vec![AUDIENCE.into()],
        jwks: None,
        jwks_file: None,
        jwks_uri: None,
        jwks_refresh_ms: 300_000,
        hmac_secret_file: None,
        leeway_ms: 60_000,
        user_id_claim: "sub".into(),
        role_claim: "role".into(),
        forward_token: false,
        max_token_bytes: 8192,
    }
}

pub fn edge_config(jwt: JwtConfig) -> EdgeConfig {
    EdgeConfig {
        jwt,
        anonymous: vec![],
        routes: vec![],
        cors: None,
        rate_limit: None,
        app: true,
        xff_num_trusted_hops: 0,
    }
}

/// An edge in front of `app` whose tokens are checked against RSA key `a` (kid `a`), inline.
pub fn inline_edge(app: SocketAddr) -> ProxyConfig {
    let mut cfg = crate::common::base_config(app);
    cfg.service = "gateway".into();
    let mut jwt = jwt_config();
    jwt.jwks = Some(jwks(&[rsa("a").jwk("a")]));
    cfg.edge = Some(edge_config(jwt));
    cfg
}
