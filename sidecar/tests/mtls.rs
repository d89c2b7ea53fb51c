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
    let (bundle, token) = (dir.path().join("bundle.pem"), dir.path().join("token"));
    std::fs::write(&bundle, &iss.bundle_pem).unwrap();
    std::fs::write(&token, "not-a-token").unwrap();
    let mut cfg = weir_testkit::proxy::config("shop", "orders", "127.0.0.1:9".parse().unwrap());
    let id = WorkloadId::microservice("cluster.local", "shop", "orders");
    cfg.mtls = Some(MtlsConfig {
        identity: id.uri(),
        trust_bundle_file: bundle.display().to_string(),
        issuer_url: iss.url.clone(),
        token_file: token.display().to_string(),
        renew_at_percent: 50,
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
    assert!(
        p.log_lines()
            .iter()
            .filter(
                |l| l["fields"]["message"] == "workload certificate installed"
                    || l["message"] == "workload certificate installed"
            )
            .count()
            >= 3,
        "{:?}",
        p.log_lines()
    );
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
