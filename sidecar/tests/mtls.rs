//! The workload certificate of a real weir-proxy, from a real issuer endpoint on loopback: not
//! ready without one (with the reason), ready once the token is good, renewed at the configured
//! share of its lifetime, kept while the issuer is down until it expires.

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
    }
}

async fn readyz(p: &Proxy) -> (u16, String) {
    http_get(&p.admin_url("/readyz"))
        .await
        .unwrap_or((0, String::new()))
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
        async || {
            p.log_lines()
                .iter()
                .filter(|l| l.to_string().contains("workload certificate installed"))
                .count()
                >= 3
        },
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
    use http_body_util::{BodyExt, Empty};
    use weir_identity::tls::{self, CurrentCert, TrustBundle};
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
    let req = http::Request::get("/who")
        .header("host", "orders")
        .header("x-weir-caller", "shop/forged")
        .body(Empty::<bytes::Bytes>::new())
        .unwrap();
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
    let body = resp
        .into_body()
        .collect()
        .await
        .map_err(|e| e.to_string())?
        .to_bytes();
    Ok((status, String::from_utf8_lossy(&body).into_owned()))
}

#[tokio::test]
async fn a_caller_over_mutual_tls_is_named_to_the_app_and_a_forged_name_is_removed() {
    let iss = issuer(DAY).await;
    // The app answers with the x-weir-caller it was given ("-" for none).
    let (app, _app_task) =
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
    let dir = tempfile::tempdir().unwrap();
    let orders = WorkloadId::microservice("cluster.local", "shop", "orders");
    let mut cfg = weir_testkit::proxy::config("shop", "orders", app);
    cfg.mtls = Some(mtls_block(
        &iss,
        dir.path(),
        &orders,
        &iss.tokens.issue(orders.clone()),
    ));
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
