//! The workload certificate of a real weir-proxy, from a real issuer endpoint on loopback: not
//! ready without one (with the reason), ready once the token is good, renewed at the configured
//! share of its lifetime, kept while the issuer is down until it expires.

mod common;

use std::ffi::OsStr;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant, SystemTime};
use weir_crds::proxy::MtlsConfig;
use weir_identity::endpoint::{self, Endpoint, StaticTokens};
use weir_identity::{Authority, Issuer, WorkloadId};
use weir_testkit::proxy::{Proxy, http_get};

const DAY: Duration = Duration::from_secs(86_400);

struct IssuerOnLoopback {
    url: String,
    bundle_pem: String,
    tokens: Arc<StaticTokens>,
    endpoint: Arc<Endpoint>,
    task: tokio::task::JoinHandle<()>,
}

/// An issuer whose certificates live `lifetime`.
async fn issuer(lifetime: Duration) -> IssuerOnLoopback {
    let now = SystemTime::now();
    let anchor = Authority::new_anchor("cluster.local", now, DAY).unwrap();
    let issuer = Issuer::new(Authority::new_issuer(&anchor, "cluster.local", now, DAY).unwrap());
    let tls = endpoint::serving_config(&issuer, &["localhost".to_string()], DAY).unwrap();
    let tokens = Arc::new(StaticTokens::default());
    let endpoint = Endpoint::new(issuer, tokens.clone(), lifetime);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let task = tokio::spawn(endpoint.clone().serve(listener, Arc::new(tls)));
    IssuerOnLoopback {
        url: format!("https://localhost:{port}"),
        bundle_pem: anchor.cert_pem(),
        tokens,
        endpoint,
        task,
    }
}

/// The `mtls` block of a sidecar for `id`: the issuer's bundle and `token` written to files in
/// `dir` (the token file can be rewritten), renewal at 70 %.
fn mtls_block(
    iss: &IssuerOnLoopback,
    dir: &std::path::Path,
    id: &WorkloadId,
    token: &str,
) -> MtlsConfig {
    let (bundle, token_file) = (dir.join("bundle.pem"), dir.join("token"));
    std::fs::write(&bundle, &iss.bundle_pem).unwrap();
    std::fs::write(&token_file, token).unwrap();
    MtlsConfig {
        identity: id.uri(),
        trust_bundle_file: bundle.display().to_string(),
        issuer_url: iss.url.clone(),
        token_file: token_file.display().to_string(),
        renew_at_percent: 70,
        inbound: Default::default(),
        authorization: Default::default(),
    }
}

async fn readyz(p: &Proxy) -> (u16, String) {
    http_get(&p.admin_url("/readyz"))
        .await
        .unwrap_or((0, String::new()))
}

/// Certificates the sidecar has installed, by its log.
fn installed(p: &Proxy) -> usize {
    p.log_lines()
        .iter()
        .filter(|l| l.to_string().contains("workload certificate installed"))
        .count()
}

async fn until(what: &str, limit: Duration, mut f: impl AsyncFnMut() -> bool) {
    let start = Instant::now();
    while start.elapsed() < limit {
        if f().await {
            return;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("{what}: not within {limit:?}");
}

#[tokio::test]
async fn the_sidecar_gets_renews_and_keeps_its_workload_certificate() {
    let iss = issuer(Duration::from_secs(6)).await;
    let dir = tempfile::tempdir().unwrap();
    let token = dir.path().join("token");
    let mut cfg = weir_testkit::proxy::config("shop", "orders", "127.0.0.1:9".parse().unwrap());
    let id = WorkloadId::microservice("cluster.local", "shop", "orders");
    cfg.mtls = Some(MtlsConfig {
        renew_at_percent: 50,
        ..mtls_block(&iss, dir.path(), &id, "not-a-token")
    });
    let p = Proxy::spawn(
        env!("CARGO_BIN_EXE_weir-proxy"),
        cfg,
        &[],
        &[("RUST_LOG", OsStr::new("info"))],
    );
    // A token the issuer does not know: not ready, and /readyz says why.
    until(
        "not ready, naming the refusal",
        Duration::from_secs(10),
        async || {
            let (status, body) = readyz(&p).await;
            status == 503 && body.contains("no workload certificate yet") && body.contains("401")
        },
    )
    .await;
    // The pod's token becomes good (the file is read anew at the next attempt): ready.
    std::fs::write(&token, iss.tokens.issue(id.clone())).unwrap();
    until(
        "ready with a certificate",
        Duration::from_secs(15),
        async || readyz(&p).await.0 == 200,
    )
    .await;
    // Renewed at half of its 6 s: a second and a third certificate within about 7 s.
    let issued = || iss.endpoint.counts.issued.load(Ordering::Relaxed);
    let first = issued();
    until("renewed twice", Duration::from_secs(10), async || {
        issued() >= first + 2
    })
    .await;
    // Each installation is logged (the log is read as the sidecar writes it: waited for).
    until(
        "three installations logged",
        Duration::from_secs(10),
        async || installed(&p) >= 3,
    )
    .await;
    // The issuer goes away: the certificate in hand keeps the sidecar ready until it expires
    // (at most 6 s), then not ready, saying so.
    iss.task.abort();
    assert_eq!(readyz(&p).await.0, 200);
    until(
        "not ready once expired",
        Duration::from_secs(12),
        async || {
            let (status, body) = readyz(&p).await;
            status == 503 && body.contains("expired")
        },
    )
    .await;
}

#[tokio::test]
async fn an_invalid_mtls_block_is_refused_naming_the_field() {
    let mut cfg = weir_testkit::proxy::config("shop", "orders", "127.0.0.1:9".parse().unwrap());
    let good = MtlsConfig {
        identity: "spiffe://cluster.local/ns/shop/ms/orders".into(),
        trust_bundle_file: "/b".into(),
        issuer_url: "https://weir-identity.weir-system.svc:8443".into(),
        token_file: "/t".into(),
        renew_at_percent: 70,
        inbound: Default::default(),
        authorization: Default::default(),
    };
    for (field, bad) in [
        (
            "mtls.identity",
            MtlsConfig {
                identity: "orders".into(),
                ..good.clone()
            },
        ),
        (
            "mtls.issuerUrl",
            MtlsConfig {
                issuer_url: "http://x:1".into(),
                ..good.clone()
            },
        ),
        (
            "mtls.tokenFile",
            MtlsConfig {
                token_file: String::new(),
                ..good.clone()
            },
        ),
        (
            "mtls.renewAtPercent",
            MtlsConfig {
                renew_at_percent: 95,
                ..good.clone()
            },
        ),
    ] {
        cfg.mtls = Some(bad);
        let err = cfg.validate().unwrap_err();
        assert_eq!(err.field, field, "{err}");
    }
    for (i, entry) in [
        "shop",
        "shop/",
        "/orders",
        "Shop/orders",
        "shop/saga/",
        "shop/x/y",
        "*/orders",
        "shop/**",
    ]
    .into_iter()
    .enumerate()
    {
        let mut m = good.clone();
        m.authorization.allow = vec!["shop/users".into(), entry.into()];
        cfg.mtls = Some(m);
        let err = cfg.validate().unwrap_err();
        assert_eq!(
            err.field, "mtls.authorization.allow[1]",
            "entry {i} {entry:?}: {err}"
        );
        assert!(err.message.contains(entry), "{err}");
    }
    let mut m = good.clone();
    m.authorization.allow = vec![
        "shop/users".into(),
        "shop/saga/checkout".into(),
        "ops/*".into(),
    ];
    cfg.mtls = Some(m);
    cfg.validate().unwrap();

    // A dependency called over mutual TLS needs the sidecar's own certificate.
    let mut with_dep =
        weir_testkit::proxy::config("shop", "orders", "127.0.0.1:9".parse().unwrap());
    with_dep.outbound.push(common::dependency(
        "users",
        "http://users.shop.svc:80".into(),
    ));
    with_dep.outbound[0].peer_identity = Some("spiffe://cluster.local/ns/shop/ms/users".into());
    let err = with_dep.validate().unwrap_err();
    assert_eq!(err.field, "outbound[0].peerIdentity", "{err}");
    with_dep.mtls = Some(good.clone());
    with_dep.validate().unwrap();
    with_dep.outbound[0].peer_identity = Some("users".into());
    assert_eq!(
        with_dep.validate().unwrap_err().field,
        "outbound[0].peerIdentity"
    );

    cfg.mtls = Some(good);
    cfg.validate().unwrap();
}

/// A TLS client of the inbound listener holding a certificate for `as_who`, expecting the
/// server to be `server`: one HTTP/1.1 GET (ALPN http/1.1 only) or h2 (ALPN h2); the status and
/// the body.
async fn mtls_get(
    iss: &IssuerOnLoopback,
    inbound: std::net::SocketAddr,
    as_who: &WorkloadId,
    server: &WorkloadId,
    h2: bool,
) -> Result<(u16, String), String> {
    let req = http::Request::get("/who")
        .header("host", "orders")
        .header("x-weir-caller", "shop/forged")
        .body(http_body_util::Empty::<bytes::Bytes>::new())
        .unwrap();
    mtls_send(iss, inbound, as_who, server, h2, req)
        .await
        .map(|(status, _, body)| (status, body))
}

/// A certificate for `as_who` from `iss`, as a sidecar would hold it.
async fn workload_cert(
    iss: &IssuerOnLoopback,
    as_who: &WorkloadId,
) -> Arc<weir_identity::tls::CurrentCert> {
    use weir_identity::tls::{CurrentCert, TrustBundle};
    let key = weir_identity::WorkloadKey::generate().unwrap();
    let token = iss.tokens.issue(as_who.clone());
    let bundle = TrustBundle::from_pem(&iss.bundle_pem).unwrap();
    let chain = endpoint::request_certificate(
        &iss.url,
        &bundle,
        &token,
        &key.csr(as_who).unwrap(),
        Duration::from_secs(5),
    )
    .await
    .unwrap();
    let cert = CurrentCert::new();
    cert.install(&chain, key.private_key()).unwrap();
    cert
}

/// `req` over a new mutual-TLS connection as `as_who` to `server` at `inbound`: the status,
/// the headers and the body with the trailers' `grpc-status`, if any, after a `|`.
async fn mtls_send(
    iss: &IssuerOnLoopback,
    inbound: std::net::SocketAddr,
    as_who: &WorkloadId,
    server: &WorkloadId,
    h2: bool,
    req: http::Request<http_body_util::Empty<bytes::Bytes>>,
) -> Result<(u16, http::HeaderMap, String), String> {
    use http_body_util::BodyExt;
    use weir_identity::tls::{self, TrustBundle};
    let cert = workload_cert(iss, as_who).await;
    let bundle = TrustBundle::from_pem(&iss.bundle_pem).unwrap();
    let mut config = tls::client_config(&bundle, cert, server.clone()).unwrap();
    config.alpn_protocols = vec![if h2 {
        b"h2".to_vec()
    } else {
        b"http/1.1".to_vec()
    }];
    let tcp = tokio::net::TcpStream::connect(inbound).await.unwrap();
    let stream = tokio_rustls::TlsConnector::from(Arc::new(config))
        .connect(tls::server_name(server), tcp)
        .await
        .map_err(|e| e.to_string())?;
    let io = hyper_util::rt::TokioIo::new(stream);
    let resp = if h2 {
        let (mut send, conn) =
            hyper::client::conn::http2::handshake(hyper_util::rt::TokioExecutor::new(), io)
                .await
                .map_err(|e| e.to_string())?;
        tokio::spawn(conn);
        send.send_request(req).await.map_err(|e| e.to_string())?
    } else {
        let (mut send, conn) = hyper::client::conn::http1::handshake(io)
            .await
            .map_err(|e| e.to_string())?;
        tokio::spawn(conn);
        send.send_request(req).await.map_err(|e| e.to_string())?
    };
    let status = resp.status().as_u16();
    let headers = resp.headers().clone();
    let collected = resp
        .into_body()
        .collect()
        .await
        .map_err(|e| e.to_string())?;
    let grpc = collected
        .trailers()
        .and_then(|t| t.get("grpc-status"))
        .or_else(|| headers.get("grpc-status"))
        .and_then(|v| v.to_str().ok())
        .map(str::to_string);
    let mut body = String::from_utf8_lossy(&collected.to_bytes()).into_owned();
    if let Some(g) = grpc {
        body = format!("{body}|{g}");
    }
    Ok((status, headers, body))
}

#[tokio::test]
async fn a_caller_over_mutual_tls_is_named_to_the_app_and_a_forged_name_is_removed() {
    let iss = issuer(DAY).await;
    let (app, _app) = caller_echo().await;
    let dir = tempfile::tempdir().unwrap();
    let orders = WorkloadId::microservice("cluster.local", "shop", "orders");
    let mut cfg = weir_testkit::proxy::config("shop", "orders", app);
    let mut block = mtls_block(&iss, dir.path(), &orders, &iss.tokens.issue(orders.clone()));
    block.authorization.allow = vec!["shop/payments".into()];
    cfg.mtls = Some(block);
    let inbound = cfg.inbound.listen;
    let p = Proxy::spawn(env!("CARGO_BIN_EXE_weir-proxy"), cfg, &[], &[]);
    p.wait_ready().await;
    let payments = WorkloadId::microservice("cluster.local", "shop", "payments");
    // Over mutual TLS, HTTP/1.1 and HTTP/2: the app is told the verified caller, whatever the
    // request itself claimed.
    for h2 in [false, true] {
        let (status, body) = mtls_get(&iss, inbound, &payments, &orders, h2)
            .await
            .unwrap();
        assert_eq!((status, body.as_str()), (200, "shop/payments"), "h2: {h2}");
    }
    // Plaintext, claiming to be someone: the claim is removed.
    let (status, body) = weir_testkit::proxy::http_send(
        http::Request::get(format!("http://{inbound}/who"))
            .header("x-weir-caller", "shop/forged")
            .body(http_body_util::Full::new(bytes::Bytes::new()))
            .unwrap(),
    )
    .await
    .unwrap();
    assert_eq!((status, body.as_str()), (200, "-"));
    // A client that expected another server refuses this one: it is orders, not users.
    let users = WorkloadId::microservice("cluster.local", "shop", "users");
    let err = mtls_get(&iss, inbound, &payments, &users, false)
        .await
        .unwrap_err();
    assert!(
        err.contains("not spiffe://cluster.local/ns/shop/ms/users"),
        "{err}"
    );
    // A client with a certificate from another anchor is refused by the sidecar.
    let other = issuer(DAY).await;
    let err = mtls_get(&other, inbound, &payments, &orders, false).await;
    assert!(err.is_err(), "{err:?}");
    // The refusal is logged (the log is read as the sidecar writes it: waited for).
    p.wait_log(|l| l.to_string().contains("mutual TLS handshake refused"))
        .await;
    // Counted: the other anchor's client, and the client that refused the sidecar (the
    // sidecar's handshake ends with that client's alert).
    let (_, m) = http_get(&p.admin_url("/metrics")).await.unwrap();
    assert!(
        m.contains(r#"weir_tls_handshakes_total{direction="inbound",result="refused"} 2"#),
        "{m}"
    );
}

#[tokio::test]
async fn a_connection_that_sends_nothing_does_not_hold_the_shutdown() {
    let iss = issuer(DAY).await;
    let dir = tempfile::tempdir().unwrap();
    let orders = WorkloadId::microservice("cluster.local", "shop", "orders");
    let mut cfg = weir_testkit::proxy::config("shop", "orders", "127.0.0.1:9".parse().unwrap());
    cfg.mtls = Some(mtls_block(
        &iss,
        dir.path(),
        &orders,
        &iss.tokens.issue(orders.clone()),
    ));
    let inbound = cfg.inbound.listen;
    let mut p = Proxy::spawn(env!("CARGO_BIN_EXE_weir-proxy"), cfg, &[], &[]);
    p.wait_ready().await;
    // Connected, nothing sent: the sidecar waits to see whether it is TLS.
    let _idle = tokio::net::TcpStream::connect(inbound).await.unwrap();
    tokio::time::sleep(Duration::from_millis(200)).await;
    let start = Instant::now();
    p.sigterm();
    let status = p.wait_exit(Duration::from_secs(30));
    assert!(status.success(), "{status}");
    assert!(
        start.elapsed() < Duration::from_secs(3),
        "the shutdown waited {:?} for a connection that sent nothing",
        start.elapsed()
    );
}

/// This machine's address on its default route (no packet is sent), to call a listener from
/// outside loopback; `None` on a machine without one.
fn routable_ip() -> Option<std::net::IpAddr> {
    let s = std::net::UdpSocket::bind("0.0.0.0:0").ok()?;
    s.connect("192.0.2.1:9").ok()?;
    let ip = s.local_addr().ok()?.ip();
    (!ip.is_loopback() && !ip.is_unspecified()).then_some(ip)
}

/// An app that answers with the `x-weir-caller` it was given (`-` for none).
async fn caller_echo() -> (std::net::SocketAddr, impl Drop) {
    struct Abort(tokio::task::JoinHandle<()>);
    impl Drop for Abort {
        fn drop(&mut self) {
            self.0.abort();
        }
    }
    let (app, task) =
        weir_testkit::serve::serve(|req: http::Request<hyper::body::Incoming>| async move {
            let caller = req
                .headers()
                .get("x-weir-caller")
                .and_then(|v| v.to_str().ok())
                .unwrap_or("-")
                .to_string();
            http::Response::new(http_body_util::Full::new(bytes::Bytes::from(caller)))
        })
        .await;
    (app, Abort(task))
}

#[tokio::test]
async fn only_the_allowed_callers_reach_the_app_and_the_set_reloads_without_a_restart() {
    let iss = issuer(DAY).await;
    let (app, _app) = caller_echo().await;
    let dir = tempfile::tempdir().unwrap();
    let id = |name: &str| WorkloadId::microservice("cluster.local", "shop", name);
    let users = id("users");
    let mut cfg = weir_testkit::proxy::config("shop", "users", app);
    let mut block = mtls_block(&iss, dir.path(), &users, &iss.tokens.issue(users.clone()));
    block.authorization.allow = vec![
        "shop/orders".into(),
        "shop/saga/checkout".into(),
        "ops/*".into(),
    ];
    cfg.mtls = Some(block);
    // On every address, so that a plaintext caller from outside loopback can be tried.
    let port = cfg.inbound.listen.port();
    cfg.inbound.listen = format!("0.0.0.0:{port}").parse().unwrap();
    let inbound: std::net::SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    let mut p = Proxy::spawn(
        env!("CARGO_BIN_EXE_weir-proxy"),
        cfg.clone(),
        &["--reload-interval-ms", "100"],
        &[],
    );
    p.wait_ready().await;

    // The declared callers, over HTTP/1.1 and HTTP/2.
    let checkout = WorkloadId::saga("cluster.local", "shop", "checkout");
    let prober = WorkloadId::microservice("cluster.local", "ops", "prober");
    for h2 in [false, true] {
        for (who, name) in [
            (&id("orders"), "shop/orders"),
            (&checkout, "shop/saga/checkout"),
            (&prober, "ops/prober"),
        ] {
            let got = mtls_get(&iss, inbound, who, &users, h2).await.unwrap();
            assert_eq!(got, (200, name.to_string()), "{name}, h2: {h2}");
        }
    }
    // Anyone else with a valid certificate: 403 caller-not-allowed, never the app.
    let payments = id("payments");
    let saga_orders = WorkloadId::saga("cluster.local", "shop", "orders");
    for who in [
        &payments,
        &saga_orders,
        &WorkloadId::microservice("cluster.local", "other", "orders"),
    ] {
        for h2 in [false, true] {
            let req = http::Request::get("/who")
                .header("host", "users")
                .body(http_body_util::Empty::<bytes::Bytes>::new())
                .unwrap();
            let (status, headers, body) = mtls_send(&iss, inbound, who, &users, h2, req)
                .await
                .unwrap();
            assert_eq!(
                (status, body.as_str()),
                (403, "caller-not-allowed\n"),
                "{who} h2: {h2}"
            );
            assert_eq!(headers["x-weir-reason"], "caller-not-allowed");
        }
    }
    // A gRPC caller is told in gRPC terms: PERMISSION_DENIED.
    let grpc = http::Request::post("/shop.Users/Get")
        .header("host", "users")
        .header("content-type", "application/grpc")
        .header("te", "trailers")
        .body(http_body_util::Empty::<bytes::Bytes>::new())
        .unwrap();
    let (status, headers, body) = mtls_send(&iss, inbound, &payments, &users, true, grpc)
        .await
        .unwrap();
    assert_eq!(status, 200, "{headers:?}");
    assert!(
        body.ends_with("|7"),
        "grpc-status PERMISSION_DENIED: {body:?} {headers:?}"
    );

    // Plaintext: from loopback (the pod's own containers) admitted, without a caller.
    let (status, body) = http_get(&format!("http://{inbound}/who")).await.unwrap();
    assert_eq!((status, body.as_str()), (200, "-"));
    // From outside the pod: refused (strict).
    match routable_ip() {
        Some(ip) => {
            let (status, body) = http_get(&format!(
                "http://{}/who",
                std::net::SocketAddr::new(ip, port)
            ))
            .await
            .unwrap();
            assert_eq!(
                (status, body.as_str()),
                (403, "mtls-required\n"),
                "from {ip}"
            );
        }
        None => eprintln!(
            "SKIPPED the plaintext call from outside loopback: this machine has no routable address"
        ),
    }

    // Counted by caller and decision, and logged.
    let (_, metrics) = http_get(&p.admin_url("/metrics")).await.unwrap();
    for line in [
        r#"weir_inbound_authorizations_total{transport="mtls",caller="shop/payments",decision="denied"} 3"#,
        r#"weir_inbound_authorizations_total{transport="mtls",caller="shop/orders",decision="allowed"} 2"#,
        r#"weir_inbound_authorizations_total{transport="mtls",caller="shop/saga/orders",decision="denied"} 2"#,
        r#"weir_inbound_authorizations_total{transport="plaintext",caller="",decision="loopback"} 1"#,
    ] {
        assert!(metrics.contains(line), "{line} in\n{metrics}");
    }
    if routable_ip().is_some() {
        assert!(metrics.contains(r#"weir_inbound_authorizations_total{transport="plaintext",caller="",decision="refused"} 1"#), "{metrics}");
    }
    p.wait_log(|l| {
        let t = l.to_string();
        t.contains("caller not allowed: refused") && t.contains("shop/payments")
    })
    .await;

    // The graph changed: payments now declares users. The new set is in force without a restart.
    let pid = p.child().id();
    cfg.mtls
        .as_mut()
        .unwrap()
        .authorization
        .allow
        .push("shop/payments".into());
    p.write_config(&serde_json::to_string(&cfg).unwrap());
    until(
        "payments admitted after the reload",
        Duration::from_secs(10),
        async || {
            mtls_get(&iss, inbound, &payments, &users, false).await
                == Ok((200, "shop/payments".into()))
        },
    )
    .await;
    assert_eq!(p.child().id(), pid, "the same process");
    // Audit: admitted, counted as it would have been refused.
    cfg.mtls.as_mut().unwrap().authorization.mode = weir_crds::proxy::AuthorizationMode::Audit;
    p.write_config(&serde_json::to_string(&cfg).unwrap());
    let stranger = WorkloadId::microservice("cluster.local", "shop", "stranger");
    until(
        "audit admits the stranger",
        Duration::from_secs(10),
        async || {
            mtls_get(&iss, inbound, &stranger, &users, false).await
                == Ok((200, "shop/stranger".into()))
        },
    )
    .await;
    let (_, metrics) = http_get(&p.admin_url("/metrics")).await.unwrap();
    assert!(metrics.contains(r#"weir_inbound_authorizations_total{transport="mtls",caller="shop/stranger",decision="audit-denied"}"#), "{metrics}");
    // Neither reload made a new key or asked the issuer again.
    assert_eq!(installed(&p), 1, "{:?}", p.log_lines());
}

/// `users`'s sidecar (mTLS, admitting `shop/orders`) in front of the caller-echo app, and the
/// sidecar of `caller` calling it as dependency `users` over mutual TLS, expecting
/// `expect_peer`: by its address, or (`endpoints`) through the balancer.
struct Hop {
    users: Proxy,
    caller: Proxy,
    _dirs: (tempfile::TempDir, tempfile::TempDir),
    _relay: Option<tokio::task::JoinHandle<()>>,
}

impl Drop for Hop {
    fn drop(&mut self) {
        if let Some(r) = &self._relay {
            r.abort();
        }
    }
}

/// How the caller reaches `users`.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Route {
    /// By its address, as `upstream` names it.
    ByAddress,
    /// Through the balancer, `users`'s inbound listener its one endpoint.
    Balanced,
    /// Through the balancer, its one endpoint a relay that waits this long before it connects
    /// each connection on to `users` (a slow network to set a connection up).
    BalancedThroughSlowSetup(Duration),
}

/// Relays each connection to `to` once `delay` has passed since it came.
async fn slow_setup_relay(
    to: std::net::SocketAddr,
    delay: Duration,
) -> (std::net::SocketAddr, tokio::task::JoinHandle<()>) {
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    let task = tokio::spawn(async move {
        while let Ok((mut inbound, _)) = l.accept().await {
            tokio::spawn(async move {
                tokio::time::sleep(delay).await;
                if let Ok(mut out) = tokio::net::TcpStream::connect(to).await {
                    let _ = tokio::io::copy_bidirectional(&mut inbound, &mut out).await;
                }
            });
        }
    });
    (addr, task)
}

async fn hop(
    iss: &IssuerOnLoopback,
    app: std::net::SocketAddr,
    caller: &str,
    expect_peer: &str,
    protocol: weir_crds::proxy::WireProtocol,
    route: Route,
    renew_at_percent: u8,
) -> Hop {
    let id = |name: &str| WorkloadId::microservice("cluster.local", "shop", name);
    let (ud, cd) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let mut ucfg = weir_testkit::proxy::config("shop", "users", app);
    let mut block = mtls_block(iss, ud.path(), &id("users"), &iss.tokens.issue(id("users")));
    block.authorization.allow = vec!["shop/orders".into()];
    block.renew_at_percent = renew_at_percent;
    ucfg.mtls = Some(block);
    let inbound = ucfg.inbound.listen;
    let users = Proxy::spawn(env!("CARGO_BIN_EXE_weir-proxy"), ucfg, &[], &[]);
    let mut ccfg = weir_testkit::proxy::config("shop", caller, "127.0.0.1:9".parse().unwrap());
    let mut block = mtls_block(iss, cd.path(), &id(caller), &iss.tokens.issue(id(caller)));
    block.renew_at_percent = renew_at_percent;
    ccfg.mtls = Some(block);
    let mut dep = common::dependency("users", format!("http://{inbound}"));
    dep.protocol = protocol;
    dep.peer_identity = Some(id(expect_peer).uri());
    let mut relay = None;
    let endpoint = match route {
        Route::ByAddress => None,
        Route::Balanced => Some(inbound),
        Route::BalancedThroughSlowSetup(delay) => {
            let (addr, task) = slow_setup_relay(inbound, delay).await;
            relay = Some(task);
            Some(addr)
        }
    };
    dep.endpoints = endpoint.map(|e| weir_crds::proxy::EndpointsConfig {
        dns: None,
        addresses: vec![e],
        refresh_ms: 5_000,
    });
    ccfg.outbound.push(dep);
    let caller = Proxy::spawn(env!("CARGO_BIN_EXE_weir-proxy"), ccfg, &[], &[]);
    users.wait_ready().await;
    caller.wait_ready().await;
    Hop {
        users,
        caller,
        _dirs: (ud, cd),
        _relay: relay,
    }
}

#[tokio::test]
async fn sidecars_call_each_other_over_mutual_tls_and_check_whom_they_reach() {
    use weir_crds::proxy::WireProtocol;
    let iss = issuer(DAY).await;
    let (app, _app) = caller_echo().await;
    for protocol in [WireProtocol::Http2, WireProtocol::Http1] {
        for route in [Route::ByAddress, Route::Balanced] {
            let what = format!("{protocol:?}, {route:?}");
            let h = hop(&iss, app, "orders", "users", protocol, route, 70).await;
            // The app behind users is told its caller from the verified chain.
            for _ in 0..3 {
                let got = http_get(&h.caller.outbound_url("users", "/who"))
                    .await
                    .unwrap();
                assert_eq!(got, (200, "shop/orders".to_string()), "{what}");
            }
            let (_, m) = http_get(&h.caller.admin_url("/metrics")).await.unwrap();
            assert!(
                m.contains(r#"weir_tls_handshakes_total{direction="outbound",result="ok"}"#),
                "{what}: {m}"
            );
            let (_, m) = http_get(&h.users.admin_url("/metrics")).await.unwrap();
            assert!(
                m.contains(r#"weir_inbound_authorizations_total{transport="mtls",caller="shop/orders",decision="allowed"} 3"#),
                "{what}: {m}"
            );
            // Reused connections: one handshake for the three calls over HTTP/2.
            if protocol == WireProtocol::Http2 {
                assert!(
                    m.contains(r#"weir_tls_handshakes_total{direction="inbound",result="ok"} 1"#),
                    "{what}: {m}"
                );
            }
        }
    }

    // A caller that meant another service: the sidecar it reached is users, not payments, so
    // it refuses the connection; the app is told 502 and never reaches users' app.
    let h = hop(
        &iss,
        app,
        "orders",
        "payments",
        WireProtocol::Http2,
        Route::ByAddress,
        70,
    )
    .await;
    let (status, body) = http_get(&h.caller.outbound_url("users", "/who"))
        .await
        .unwrap();
    assert_eq!((status, body.as_str()), (502, "upstream-connect\n"));
    h.caller
        .wait_log(|l| l.to_string().contains("mutual TLS to a dependency refused"))
        .await;
    let (_, m) = http_get(&h.caller.admin_url("/metrics")).await.unwrap();
    assert!(
        m.contains(r#"weir_tls_handshakes_total{direction="outbound",result="refused"}"#),
        "{m}"
    );

    // A caller users does not admit (payments, over mTLS as itself): 403 from users' sidecar,
    // passed back to the app as it came.
    let h = hop(
        &iss,
        app,
        "payments",
        "users",
        WireProtocol::Http2,
        Route::Balanced,
        70,
    )
    .await;
    let (status, body) = http_get(&h.caller.outbound_url("users", "/who"))
        .await
        .unwrap();
    assert_eq!((status, body.as_str()), (403, "caller-not-allowed\n"));
}

#[tokio::test]
async fn certificates_renew_under_load_without_a_failed_request() {
    use weir_crds::proxy::WireProtocol;
    // Certificates of 4 s renewed at 50 %: each sidecar renews about every 2 s.
    let iss = issuer(Duration::from_secs(4)).await;
    let (app, _app) = caller_echo().await;
    for protocol in [WireProtocol::Http2, WireProtocol::Http1] {
        let h = hop(&iss, app, "orders", "users", protocol, Route::Balanced, 50).await;
        let url = h.caller.outbound_url("users", "/who");
        let start = Instant::now();
        let (mut ok, mut failed) = (0u32, Vec::new());
        // Four callers at once for 7 s: past three renewals of each side, and past the first
        // certificates' expiry (connections opened then must use the new ones).
        let mut tasks = Vec::new();
        for _ in 0..4 {
            let url = url.clone();
            tasks.push(tokio::spawn(async move {
                let mut out = Vec::new();
                while start.elapsed() < Duration::from_secs(7) {
                    out.push(http_get(&url).await);
                }
                out
            }));
        }
        for t in tasks {
            for r in t.await.unwrap() {
                match r {
                    Ok((200, b)) if b == "shop/orders" => ok += 1,
                    other => failed.push(other),
                }
            }
        }
        assert!(
            failed.is_empty(),
            "{protocol:?}: {} of {} failed: {:?}",
            failed.len(),
            ok as usize + failed.len(),
            &failed[..failed.len().min(5)]
        );
        assert!(ok > 100, "{protocol:?}: only {ok} calls");
        for p in [&h.caller, &h.users] {
            let installed = installed(p);
            assert!(
                installed >= 3,
                "{protocol:?}: {installed} certificates installed"
            );
        }
        eprintln!("{protocol:?}: {ok} calls, none failed, across the renewals");
    }
}

/// A request that waits for a new connection is timed, for the balancer's latency estimate, from
/// when the connection was ready: the setup of a mutual-TLS connection (here 300 ms of a slow
/// network before the handshake) is not the endpoint's latency. Over HTTP/2 the calls that come
/// while the one connection is made all wait for it. Counted as latency, the setup would be the
/// estimate's peak and keep the endpoint out of the choice for seconds each time it is given a
/// connection.
#[tokio::test]
async fn a_new_connections_setup_is_not_taken_for_the_endpoints_latency() {
    use weir_crds::proxy::WireProtocol;
    const SETUP: Duration = Duration::from_millis(300);
    let iss = issuer(DAY).await;
    let (app, _app) = caller_echo().await;
    let route = Route::BalancedThroughSlowSetup(SETUP);
    let h = hop(&iss, app, "orders", "users", WireProtocol::Http2, route, 70).await;
    let url = h.caller.outbound_url("users", "/who");
    // Four calls at once, before any connection: each waits for the one being made.
    let calls: Vec<_> = (0..4)
        .map(|_| {
            let url = url.clone();
            tokio::spawn(async move {
                let start = Instant::now();
                let r = http_get(&url).await.unwrap();
                (r.0, start.elapsed())
            })
        })
        .collect();
    let mut fastest = Duration::MAX;
    for c in calls {
        let (status, took) = c.await.unwrap();
        assert_eq!(status, 200);
        fastest = fastest.min(took);
    }
    let (_, m) = http_get(&h.caller.admin_url("/metrics")).await.unwrap();
    let (_, view) = http_get(&h.caller.admin_url("/endpoints")).await.unwrap();
    let view: serde_json::Value = serde_json::from_str(&view).unwrap();
    let estimate = view["users"][0]["latencyEwmaMs"]
        .as_f64()
        .unwrap_or_else(|| panic!("no estimate for users: {view}"));
    eprintln!("the fastest of the calls took {fastest:?}, the estimate is {estimate:.1} ms");
    // Every call waited for the connection...
    assert!(
        fastest >= SETUP,
        "a call did not wait for the connection: {fastest:?}"
    );
    assert!(
        m.contains(r#"weir_tls_handshakes_total{direction="outbound",result="ok"} 1"#),
        "one connection: {m}"
    );
    // ...and the estimate is the answers' latency, not the connection's setup.
    assert!(
        estimate < SETUP.as_secs_f64() * 1000.0 / 3.0,
        "the estimate took the connection's setup for latency: {view}"
    );
}

#[tokio::test]
async fn a_handshake_that_stalls_is_closed_logged_and_counted() {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    let iss = issuer(DAY).await;
    let dir = tempfile::tempdir().unwrap();
    let users = WorkloadId::microservice("cluster.local", "shop", "users");
    let mut cfg = weir_testkit::proxy::config("shop", "users", "127.0.0.1:9".parse().unwrap());
    cfg.mtls = Some(mtls_block(
        &iss,
        dir.path(),
        &users,
        &iss.tokens.issue(users.clone()),
    ));
    let inbound = cfg.inbound.listen;
    let p = Proxy::spawn(env!("CARGO_BIN_EXE_weir-proxy"), cfg, &[], &[]);
    p.wait_ready().await;
    // The first bytes of a TLS record header, then nothing.
    let mut s = tokio::net::TcpStream::connect(inbound).await.unwrap();
    s.write_all(&[0x16, 0x03, 0x01]).await.unwrap();
    let start = Instant::now();
    let mut buf = [0u8; 64];
    let read = tokio::time::timeout(Duration::from_secs(20), s.read(&mut buf)).await;
    let waited = start.elapsed();
    assert!(
        matches!(read, Ok(Ok(0)) | Ok(Err(_))),
        "closed, not {read:?}"
    );
    assert!(
        waited >= Duration::from_secs(9) && waited < Duration::from_secs(13),
        "closed after {waited:?}, not the 10 s handshake timeout"
    );
    p.wait_log(|l| {
        l.to_string()
            .contains("mutual TLS handshake not done in time")
    })
    .await;
    let (_, m) = http_get(&p.admin_url("/metrics")).await.unwrap();
    assert!(
        m.contains(r#"weir_tls_handshakes_total{direction="inbound",result="timeout"} 1"#),
        "{m}"
    );
}
