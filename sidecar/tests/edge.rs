//! Edge mode through the real `weir-proxy` binary: JWT validation (one test per kind of bad
//! token, each against a loopback app that counts its calls), key sources, anonymous rules,
//! identity headers and their trusted path, routes, CORS and per-client rate limits.

mod common;
mod edge_support;

use bytes::Bytes;
use common::*;
use edge_support::*;
use http::{Request, Response};
use http_body_util::Full;
use serde_json::{Value, json};
use std::sync::{Arc, Mutex};
use weir_crds::proxy::*;

/// An app that answers 200 with the path and query it was called with.
async fn echo_app() -> Upstream {
    upstream(|req, _| async move { Response::new(Full::new(Bytes::from(req.uri().to_string()))) })
        .await
}

async fn call(p: &Proxy, method: &str, path: &str, headers: &[(&str, &str)]) -> Answer {
    let mut b = Request::builder().method(method).uri(p.inbound_url(path));
    for (k, v) in headers {
        b = b.header(*k, *v);
    }
    send(&client(), b.body(Full::default()).unwrap()).await
}

async fn with_token(p: &Proxy, path: &str, token: &str) -> Answer {
    call(
        p,
        "GET",
        path,
        &[("authorization", &format!("Bearer {token}"))],
    )
    .await
}

/// A bad token: 401 with the reason in `WWW-Authenticate`, counted under `reason`, and the app is
/// never called.
async fn assert_refused(token: String, description: &str, reason: &str) {
    let app = echo_app().await;
    let p = proxy(inline_edge(app.addr)).await;
    let a = with_token(&p, "/orders", &token).await;
    assert_eq!(a.status, 401, "{}", a.body);
    assert_eq!(a.headers["x-weir-reason"], "unauthorized");
    let challenge = a.headers["www-authenticate"].to_str().unwrap();
    assert!(
        challenge.starts_with("Bearer ")
            && challenge.contains(r#"error="invalid_token""#)
            && challenge.contains(&format!(r#"error_description="{description}""#)),
        "{challenge}"
    );
    assert_eq!(app.hits(), 0, "a refused request never reaches the app");
    assert_eq!(
        p.metric(&format!(
            r#"weir_auth_rejections_total{{reason="{reason}"}}"#
        ))
        .await,
        1.0
    );
    assert_eq!(
        p.metric(
            r#"weir_rejections_total{direction="inbound",dependency="",reason="unauthorized"}"#
        )
        .await,
        1.0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_token_is_401() {
    assert_refused("not.a-jwt".into(), "malformed token", "malformed").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn token_signed_by_another_key_is_401() {
    // Same kid, another RSA key: the signature does not verify.
    let t = rsa("b").token(Some("a"), &claims("u1", "buyer"));
    assert_refused(t, "invalid signature", "bad-signature").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tampered_claims_are_401() {
    let t = rsa("a").token(Some("a"), &claims("u1", "buyer"));
    let parts: Vec<&str> = t.split('.').collect();
    let forged = b64(claims("admin", "admin").to_string().as_bytes());
    let t = format!("{}.{forged}.{}", parts[0], parts[2]);
    assert_refused(t, "invalid signature", "bad-signature").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn alg_none_is_401() {
    let t = raw_token(
        &json!({"alg": "none", "kid": "a"}),
        &claims("u1", "admin"),
        |_| vec![],
    );
    assert_refused(t, "unsigned tokens (alg none) are not accepted", "alg-none").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hs256_signed_with_the_rsa_public_key_is_401() {
    // Algorithm confusion: the RSA key's public modulus used as an HMAC secret.
    let jwk = rsa("a").jwk("a");
    let secret = jwk["n"].as_str().unwrap().as_bytes().to_vec();
    let t = Signer::Hmac(secret).token(Some("a"), &claims("u1", "admin"));
    assert_refused(
        t,
        "algorithm not allowed for the signing key",
        "alg-not-allowed",
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn expired_token_is_401() {
    let mut c = claims("u1", "buyer");
    c["exp"] = json!(now() - 61); // beyond the 60 s leeway
    assert_refused(rsa("a").token(Some("a"), &c), "token expired", "expired").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn not_yet_valid_token_is_401() {
    let mut c = claims("u1", "buyer");
    c["nbf"] = json!(now() + 120);
    assert_refused(
        rsa("a").token(Some("a"), &c),
        "token not yet valid",
        "not-yet-valid",
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wrong_issuer_is_401() {
    let mut c = claims("u1", "buyer");
    c["iss"] = json!("https://evil.example.com/");
    assert_refused(
        rsa("a").token(Some("a"), &c),
        "wrong issuer",
        "wrong-issuer",
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wrong_audience_is_401() {
    let mut c = claims("u1", "buyer");
    c["aud"] = json!(["billing-api"]);
    assert_refused(
        rsa("a").token(Some("a"), &c),
        "wrong audience",
        "wrong-audience",
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_key_id_is_401() {
    let t = rsa("a").token(Some("nobody"), &claims("u1", "buyer"));
    assert_refused(t, "unknown key id", "unknown-kid").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversized_token_is_401() {
    let mut c = claims("u1", "buyer");
    c["padding"] = json!("x".repeat(9000));
    assert_refused(
        rsa("a").token(Some("a"), &c),
        "token too large",
        "oversized",
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn missing_token_is_401_without_an_error_code() {
    let app = echo_app().await;
    let p = proxy(inline_edge(app.addr)).await;
    let a = call(&p, "GET", "/orders", &[]).await;
    assert_eq!(a.status, 401);
    assert_eq!(a.headers["www-authenticate"], r#"Bearer realm="gateway""#);
    let basic = call(&p, "GET", "/orders", &[("authorization", "Basic dTpw")]).await;
    assert_eq!(basic.status, 401);
    assert_eq!(app.hits(), 0);
    assert_eq!(
        p.metric(r#"weir_auth_rejections_total{reason="missing-token"}"#)
            .await,
        2.0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn valid_token_sets_identity_and_spoofed_headers_are_removed_at_the_edge() {
    let app = echo_app().await;
    let p = proxy(inline_edge(app.addr)).await;
    let t = rsa("a").token(Some("a"), &claims("u1", "buyer"));
    let a = call(
        &p,
        "GET",
        "/orders?page=2",
        &[
            ("authorization", &format!("Bearer {t}")),
            ("x-user-id", "admin"),
            ("x-user-role", "admin"),
            ("x-user-tenant", "other"),
            ("x-weir-identity", "v1.1.forged"),
        ],
    )
    .await;
    assert_eq!(a.status, 200, "{}", a.body);
    assert_eq!(a.body, "/orders?page=2");
    let seen = app.seen.lock().unwrap()[0].clone();
    assert_eq!(seen["x-user-id"], "u1");
    assert_eq!(seen["x-user-role"], "buyer");
    assert!(!seen.contains_key("x-user-tenant"), "{seen:?}");
    assert!(!seen.contains_key("x-weir-identity"));
    assert!(
        !seen.contains_key("authorization"),
        "the token is not forwarded by default"
    );
    assert_eq!(
        p.metric(r#"weir_identity_headers_removed_total{reason="edge"}"#)
            .await,
        1.0
    );
    // A request with no x-user-* headers removes nothing.
    assert_eq!(with_token(&p, "/orders", &t).await.status, 200);
    assert_eq!(
        p.metric(r#"weir_identity_headers_removed_total{reason="edge"}"#)
            .await,
        1.0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn es256_keys_from_a_jwks_file_and_forwarded_token() {
    let app = echo_app().await;
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("jwks.json");
    let key = ec();
    std::fs::write(&file, jwks(&[key.jwk("e1")])).unwrap();
    let mut cfg = common::base_config(app.addr);
    let mut jwt = jwt_config();
    jwt.jwks_file = Some(file.display().to_string());
    jwt.forward_token = true;
    cfg.edge = Some(edge_config(jwt));
    let p = proxy(cfg).await;
    let t = key.token(Some("e1"), &claims("u2", "ops"));
    assert_eq!(with_token(&p, "/", &t).await.status, 200);
    let seen = app.seen.lock().unwrap()[0].clone();
    assert_eq!(seen["x-user-id"], "u2");
    assert_eq!(seen["authorization"], format!("Bearer {t}").as_str());
    // An ES256 token from another P-256 key with the same kid fails.
    let other = ec().token(Some("e1"), &claims("u2", "ops"));
    assert_eq!(with_token(&p, "/", &other).await.status, 401);
    // The Secret is rotated to a new key: a token naming its kid makes the file be read again.
    let next = ec();
    std::fs::write(&file, jwks(&[next.jwk("e2")])).unwrap();
    let t2 = next.token(Some("e2"), &claims("u2", "ops"));
    assert_eq!(with_token(&p, "/", &t2).await.status, 200);
    assert_eq!(
        with_token(&p, "/", &t).await.status,
        401,
        "e1 was rotated out"
    );
    assert_eq!(app.hits(), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hs256_secret_from_a_file() {
    let app = echo_app().await;
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("secret");
    std::fs::write(&file, HMAC_SECRET).unwrap();
    let mut cfg = common::base_config(app.addr);
    let mut jwt = jwt_config();
    jwt.hmac_secret_file = Some(file.display().to_string());
    cfg.edge = Some(edge_config(jwt));
    let p = proxy(cfg).await;
    let good = Signer::Hmac(HMAC_SECRET.to_vec()).token(None, &claims("u3", "buyer"));
    assert_eq!(with_token(&p, "/", &good).await.status, 200);
    let bad = Signer::Hmac(b"another-secret-another-secret-!!".to_vec())
        .token(None, &claims("u3", "buyer"));
    let a = with_token(&p, "/", &bad).await;
    assert_eq!(a.status, 401);
    assert!(
        a.headers["www-authenticate"]
            .to_str()
            .unwrap()
            .contains("invalid signature")
    );
    // An RS256 token is refused by an HS256 edge: the key decides the algorithm.
    let rs = rsa("a").token(None, &claims("u3", "buyer"));
    assert_eq!(with_token(&p, "/", &rs).await.status, 401);
    assert_eq!(app.hits(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn jwks_uri_is_cached_and_refetched_once_for_an_unknown_kid() {
    let app = echo_app().await;
    let served = Arc::new(Mutex::new(jwks(&[rsa("a").jwk("a")])));
    let s2 = served.clone();
    let idp = upstream(move |_req, _| {
        let doc = s2.lock().unwrap().clone();
        async move { Response::new(Full::new(Bytes::from(doc))) }
    })
    .await;
    let mut cfg = common::base_config(app.addr);
    let mut jwt = jwt_config();
    jwt.jwks_uri = Some(format!("{}/.well-known/jwks.json", idp.url()));
    cfg.edge = Some(edge_config(jwt));
    let p = proxy(cfg).await;
    let ta = rsa("a").token(Some("a"), &claims("u1", "buyer"));
    for _ in 0..3 {
        assert_eq!(with_token(&p, "/", &ta).await.status, 200);
    }
    assert_eq!(idp.hits(), 1, "keys are cached, not fetched per request");
    // The issuer rotates to key b: the first token naming it triggers one refetch.
    *served.lock().unwrap() = jwks(&[rsa("b").jwk("b")]);
    let tb = rsa("b").token(Some("b"), &claims("u1", "buyer"));
    assert_eq!(with_token(&p, "/", &tb).await.status, 200);
    assert_eq!(idp.hits(), 2);
    // Another unknown kid right after: no new fetch (at most one per 30 s), 401.
    let tc = rsa("b").token(Some("c"), &claims("u1", "buyer"));
    let a = with_token(&p, "/", &tc).await;
    assert_eq!(a.status, 401);
    assert!(
        a.headers["www-authenticate"]
            .to_str()
            .unwrap()
            .contains("unknown key id")
    );
    assert_eq!(idp.hits(), 2, "unknown-kid refetches are rate-limited");
    // Key a left the set with the rotation.
    assert_eq!(with_token(&p, "/", &ta).await.status, 401);
    assert_eq!(app.hits(), 4);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn anonymous_rules_are_explicit_and_a_bad_token_is_still_refused() {
    let app = echo_app().await;
    let mut cfg = inline_edge(app.addr);
    cfg.edge.as_mut().unwrap().anonymous = vec![
        AnonymousRuleConfig {
            path_prefix: "/catalog".into(),
            methods: vec!["GET".into(), "HEAD".into()],
        },
        AnonymousRuleConfig {
            path_prefix: "/healthz".into(),
            methods: vec![],
        },
    ];
    let p = proxy(cfg).await;
    assert_eq!(call(&p, "GET", "/catalog", &[]).await.status, 200);
    assert_eq!(call(&p, "GET", "/catalog/items/3", &[]).await.status, 200);
    assert_eq!(call(&p, "POST", "/healthz", &[]).await.status, 200);
    let hits = app.hits();
    assert_eq!(hits, 3);
    // Not covered: another method, a longer name, a path that climbs out of the prefix.
    assert_eq!(call(&p, "POST", "/catalog", &[]).await.status, 401);
    assert_eq!(call(&p, "GET", "/catalogue", &[]).await.status, 401);
    assert_eq!(call(&p, "GET", "/catalog/../orders", &[]).await.status, 400);
    assert_eq!(
        call(&p, "GET", "/catalog/%2e%2e/orders", &[]).await.status,
        400
    );
    // A token on an anonymous route is still validated.
    let mut c = claims("u1", "buyer");
    c["exp"] = json!(now() - 3600);
    let expired = rsa("a").token(Some("a"), &c);
    assert_eq!(with_token(&p, "/catalog", &expired).await.status, 401);
    // An anonymous request carries no identity, whatever the client sent.
    call(&p, "GET", "/catalog", &[("x-user-id", "admin")]).await;
    let last = app.seen.lock().unwrap().last().unwrap().clone();
    assert!(!last.contains_key("x-user-id"));
    assert_eq!(app.hits(), hits + 1);
}

/// The shop's layout: a pure gateway (no app) routes `/orders` and `/catalog` to two internal
/// services, each behind its own non-edge sidecar sharing the namespace identity key.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pure_gateway_routes_by_prefix_and_identity_travels_signed() {
    let dir = tempfile::tempdir().unwrap();
    let key_file = dir.path().join("identity-key");
    std::fs::write(&key_file, IDENTITY_KEY).unwrap();
    let identity = |sign_for: &[&str]| IdentityConfig {
        key_file: key_file.display().to_string(),
        sign_for: sign_for.iter().map(|s| s.to_string()).collect(),
    };

    let orders_app = echo_app().await;
    let catalog_app = echo_app().await;
    let mut orders_cfg = common::base_config(orders_app.addr);
    orders_cfg.identity = Some(identity(&[]));
    let orders = proxy(orders_cfg).await;
    let mut catalog_cfg = common::base_config(catalog_app.addr);
    catalog_cfg.service = "catalog".into();
    catalog_cfg.identity = Some(identity(&[]));
    let catalog = proxy(catalog_cfg).await;

    // The gateway's app address points nowhere: with `app: false` it is never called.
    let mut cfg = inline_edge(free_addr());
    cfg.outbound = vec![
        dependency("orders", format!("http://{}", orders.config.inbound.listen)),
        dependency(
            "catalog",
            format!("http://{}", catalog.config.inbound.listen),
        ),
    ];
    cfg.identity = Some(identity(&["orders", "catalog"]));
    let edge = cfg.edge.as_mut().unwrap();
    edge.app = false;
    edge.routes = vec![
        EdgeRouteConfig {
            path_prefix: "/orders".into(),
            dependency: "orders".into(),
            strip_prefix: true,
        },
        EdgeRouteConfig {
            path_prefix: "/catalog".into(),
            dependency: "catalog".into(),
            strip_prefix: false,
        },
    ];
    edge.anonymous = vec![AnonymousRuleConfig {
        path_prefix: "/catalog".into(),
        methods: vec!["GET".into()],
    }];
    let gw = proxy(cfg).await;

    let t = rsa("a").token(Some("a"), &claims("u1", "buyer"));
    let a = call(
        &gw,
        "GET",
        "/orders/42?full=1",
        &[
            ("authorization", &format!("Bearer {t}")),
            ("x-user-role", "admin"),
        ],
    )
    .await;
    assert_eq!(a.status, 200, "{}", a.body);
    assert_eq!(a.body, "/42?full=1", "prefix stripped");
    let seen = orders_app.seen.lock().unwrap()[0].clone();
    assert_eq!(
        seen["x-user-id"], "u1",
        "identity reached the internal service"
    );
    assert_eq!(
        seen["x-user-role"], "buyer",
        "the spoofed role was replaced"
    );
    assert!(
        !seen.contains_key("x-weir-identity"),
        "the app never sees the signature"
    );
    assert_eq!(call(&gw, "GET", "/orders", &[]).await.status, 401);

    let a = call(&gw, "GET", "/catalog/items", &[]).await;
    assert_eq!(a.status, 200);
    assert_eq!(a.body, "/catalog/items", "prefix kept");

    let a = call(
        &gw,
        "GET",
        "/elsewhere",
        &[("authorization", &format!("Bearer {t}"))],
    )
    .await;
    assert_eq!(a.status, 404);
    assert_eq!(a.headers["x-weir-reason"], "no-route");
    assert_eq!(
        gw.metric(r#"weir_rejections_total{direction="inbound",dependency="",reason="no-route"}"#)
            .await,
        1.0
    );
    assert_eq!(
        gw.metric(
            r#"weir_requests_total{direction="outbound",dependency="orders",status_class="2xx"}"#
        )
        .await,
        1.0,
        "routed calls go through the dependency's outbound stack"
    );

    // An internal service reached directly, around the edge: the spoofed identity is removed.
    let direct = call(
        &orders,
        "GET",
        "/admin",
        &[("x-user-id", "admin"), ("x-user-role", "admin")],
    )
    .await;
    assert_eq!(direct.status, 200);
    let seen = orders_app.seen.lock().unwrap().last().unwrap().clone();
    assert!(
        !seen.contains_key("x-user-id") && !seen.contains_key("x-user-role"),
        "{seen:?}"
    );
    // A forged signature does not help either.
    call(
        &orders,
        "GET",
        "/admin",
        &[
            ("x-user-id", "admin"),
            ("x-weir-identity", &format!("v1.{}.AAAA", now())),
        ],
    )
    .await;
    let seen = orders_app.seen.lock().unwrap().last().unwrap().clone();
    assert!(!seen.contains_key("x-user-id"));
    assert_eq!(
        orders
            .metric(r#"weir_identity_headers_removed_total{reason="unsigned"}"#)
            .await,
        1.0
    );
    assert_eq!(
        orders
            .metric(r#"weir_identity_headers_removed_total{reason="bad-signature"}"#)
            .await,
        1.0
    );
    assert_eq!(orders_app.hits(), 3);
}

/// A sidecar with no identity key trusts no `x-user-*` header at all.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sidecar_without_the_identity_key_removes_every_user_header() {
    let app = echo_app().await;
    let p = proxy(common::base_config(app.addr)).await;
    let a = call(
        &p,
        "GET",
        "/",
        &[
            ("x-user-id", "admin"),
            ("X-User-Role", "root"),
            ("x-request-id", "r1"),
        ],
    )
    .await;
    assert_eq!(a.status, 200);
    let seen = app.seen.lock().unwrap()[0].clone();
    assert!(!seen.contains_key("x-user-id") && !seen.contains_key("x-user-role"));
    assert_eq!(seen["x-request-id"], "r1");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cors_preflight_is_answered_by_the_proxy() {
    let app = echo_app().await;
    let mut cfg = inline_edge(app.addr);
    cfg.edge.as_mut().unwrap().cors = Some(CorsConfig {
        allow_origins: vec!["https://shop.example.com".into()],
        allow_methods: vec!["GET".into(), "POST".into()],
        allow_headers: vec!["authorization".into(), "content-type".into()],
        expose_headers: vec!["x-request-id".into()],
        max_age_secs: 600,
        allow_credentials: true,
    });
    let p = proxy(cfg).await;
    let origin = ("origin", "https://shop.example.com");
    let a = call(
        &p,
        "OPTIONS",
        "/orders",
        &[
            origin,
            ("access-control-request-method", "POST"),
            (
                "access-control-request-headers",
                "Authorization, Content-Type",
            ),
        ],
    )
    .await;
    assert_eq!(a.status, 204);
    let h = &a.headers;
    assert_eq!(h["access-control-allow-origin"], "https://shop.example.com");
    assert_eq!(h["access-control-allow-credentials"], "true");
    assert_eq!(h["access-control-allow-methods"], "GET, POST");
    assert_eq!(
        h["access-control-allow-headers"],
        "authorization, content-type"
    );
    assert_eq!(h["access-control-max-age"], "600");
    // Refused preflights: another origin, method or header.
    for (o, m, hs) in [
        ("https://evil.example.com", "POST", "authorization"),
        ("https://shop.example.com", "DELETE", "authorization"),
        ("https://shop.example.com", "POST", "x-secret"),
    ] {
        let a = call(
            &p,
            "OPTIONS",
            "/orders",
            &[
                ("origin", o),
                ("access-control-request-method", m),
                ("access-control-request-headers", hs),
            ],
        )
        .await;
        assert_eq!(a.status, 403, "{o} {m} {hs}");
        assert!(!a.headers.contains_key("access-control-allow-origin"));
    }
    assert_eq!(app.hits(), 0, "preflights never reach the app");
    // Actual requests: CORS headers on the answer, on a 401 too (so the page can read it).
    let t = rsa("a").token(Some("a"), &claims("u1", "buyer"));
    let ok = call(
        &p,
        "GET",
        "/orders",
        &[origin, ("authorization", &format!("Bearer {t}"))],
    )
    .await;
    assert_eq!(ok.status, 200);
    assert_eq!(
        ok.headers["access-control-allow-origin"],
        "https://shop.example.com"
    );
    assert_eq!(ok.headers["access-control-expose-headers"], "x-request-id");
    assert!(ok.headers.get_all("vary").iter().any(|v| v == "origin"));
    let denied = call(&p, "GET", "/orders", &[origin]).await;
    assert_eq!(denied.status, 401);
    assert_eq!(
        denied.headers["access-control-allow-origin"],
        "https://shop.example.com"
    );
    let other = call(
        &p,
        "GET",
        "/orders",
        &[("origin", "https://evil.example.com")],
    )
    .await;
    assert!(!other.headers.contains_key("access-control-allow-origin"));
    assert_eq!(
        p.metric(
            r#"weir_rejections_total{direction="inbound",dependency="",reason="cors-rejected"}"#
        )
        .await,
        3.0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_client_has_its_own_rate_limit() {
    let app = echo_app().await;
    let mut cfg = inline_edge(app.addr);
    let edge = cfg.edge.as_mut().unwrap();
    edge.rate_limit = Some(ClientRateLimitConfig {
        requests_per_second: 0.5,
        burst: 2,
        key: "user".into(),
        max_clients: 1000,
    });
    edge.anonymous = vec![AnonymousRuleConfig {
        path_prefix: "/public".into(),
        methods: vec![],
    }];
    let p = proxy(cfg).await;
    let u1 = rsa("a").token(Some("a"), &claims("u1", "buyer"));
    let u2 = rsa("a").token(Some("a"), &claims("u2", "buyer"));
    assert_eq!(with_token(&p, "/", &u1).await.status, 200);
    assert_eq!(with_token(&p, "/", &u1).await.status, 200);
    let limited = with_token(&p, "/", &u1).await;
    assert_eq!(limited.status, 429);
    assert_eq!(limited.headers["x-weir-reason"], "client-rate-limited");
    assert_eq!(limited.headers["retry-after"], "2");
    assert_eq!(
        with_token(&p, "/", &u2).await.status,
        200,
        "u2 has its own bucket"
    );
    // Anonymous clients are keyed by IP: the loopback client gets its own bucket too.
    assert_eq!(call(&p, "GET", "/public", &[]).await.status, 200);
    assert_eq!(call(&p, "GET", "/public", &[]).await.status, 200);
    assert_eq!(call(&p, "GET", "/public", &[]).await.status, 429);
    assert_eq!(app.hits(), 5);
    assert_eq!(
        p.metric(r#"weir_rejections_total{direction="inbound",dependency="",reason="client-rate-limited"}"#)
            .await,
        2.0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_invalid_inline_jwks_is_refused_naming_the_field() {
    let mut cfg = inline_edge(free_addr());
    cfg.edge.as_mut().unwrap().jwt.jwks = Some(r#"{"keys": [{"kty": "oct", "k": "AA"}]}"#.into());
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("proxy.json");
    std::fs::write(&path, serde_json::to_string(&cfg).unwrap()).unwrap();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_weir-proxy"))
        .arg("--config")
        .arg(&path)
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("edge.jwt.jwks: no usable key"), "{err}");
    let v: Value = serde_json::from_str(&serde_json::to_string(&cfg).unwrap()).unwrap();
    assert!(v["edge"]["jwt"]["jwks"].is_string());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reload_keeps_the_fetched_keys_and_applies_new_rules() {
    let app = echo_app().await;
    let idp = upstream(|_req, _| async move {
        Response::new(Full::new(Bytes::from(jwks(&[rsa("a").jwk("a")]))))
    })
    .await;
    let mut cfg = common::base_config(app.addr);
    let mut jwt = jwt_config();
    jwt.jwks_uri = Some(format!("{}/jwks", idp.url()));
    cfg.edge = Some(edge_config(jwt));
    let p = proxy(cfg.clone()).await;
    let t = rsa("a").token(Some("a"), &claims("u1", "buyer"));
    assert_eq!(with_token(&p, "/", &t).await.status, 200);
    assert_eq!(call(&p, "GET", "/status", &[]).await.status, 401);
    // New rules, same keys: /status becomes anonymous, the JWKS is not fetched again.
    cfg.edge.as_mut().unwrap().anonymous = vec![AnonymousRuleConfig {
        path_prefix: "/status".into(),
        methods: vec![],
    }];
    p.write_config(&serde_json::to_string(&cfg).unwrap());
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while p
        .metric(r#"weir_config_reloads_total{result="success"}"#)
        .await
        < 1.0
    {
        assert!(std::time::Instant::now() < deadline, "config not reloaded");
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    assert_eq!(call(&p, "GET", "/status", &[]).await.status, 200);
    assert_eq!(with_token(&p, "/", &t).await.status, 200);
    assert_eq!(idp.hits(), 1, "the key cache survived the reload");
}

/// Behind one trusted proxy the client is the last `X-Forwarded-For` address: what the client
/// itself puts further left changes nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn behind_a_trusted_proxy_clients_are_told_apart_by_x_forwarded_for() {
    let app = echo_app().await;
    let mut cfg = inline_edge(app.addr);
    let edge = cfg.edge.as_mut().unwrap();
    edge.xff_num_trusted_hops = 1;
    edge.anonymous = vec![AnonymousRuleConfig {
        path_prefix: "/".into(),
        methods: vec![],
    }];
    edge.rate_limit = Some(ClientRateLimitConfig {
        requests_per_second: 0.1,
        burst: 1,
        key: "ip".into(),
        max_clients: 100,
    });
    let p = proxy(cfg).await;
    let from = |xff: &'static str| [("x-forwarded-for", xff)];
    assert_eq!(call(&p, "GET", "/", &from("203.0.113.7")).await.status, 200);
    assert_eq!(
        call(&p, "GET", "/", &from("198.51.100.1, 203.0.113.7"))
            .await
            .status,
        429
    );
    assert_eq!(call(&p, "GET", "/", &from("203.0.113.8")).await.status, 200);
    assert_eq!(app.hits(), 2);
}

/// A refused request spends its client IP's bucket: past the burst, guessing tokens gets 429
/// instead of 401, while a valid user keeps a bucket of their own.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn guessing_tokens_spends_the_client_ip_bucket() {
    let app = echo_app().await;
    let mut cfg = inline_edge(app.addr);
    cfg.edge.as_mut().unwrap().rate_limit = Some(ClientRateLimitConfig {
        requests_per_second: 0.1,
        burst: 2,
        key: "user".into(),
        max_clients: 100,
    });
    let p = proxy(cfg).await;
    let forged = rsa("b").token(Some("a"), &claims("admin", "admin"));
    assert_eq!(with_token(&p, "/", &forged).await.status, 401);
    assert_eq!(call(&p, "GET", "/", &[]).await.status, 401);
    let a = with_token(&p, "/", &forged).await;
    assert_eq!(a.status, 429);
    assert_eq!(a.headers["retry-after"], "10");
    let valid = rsa("a").token(Some("a"), &claims("u1", "buyer"));
    assert_eq!(with_token(&p, "/", &valid).await.status, 200);
    assert_eq!(app.hits(), 1);
    assert_eq!(
        p.metric(r#"weir_auth_rejections_total{reason="bad-signature"}"#)
            .await,
        1.0
    );
}
