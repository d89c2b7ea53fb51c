//! The issuer's endpoint over real HTTPS on loopback, asked by the workload's client: a
//! certificate for the token's own identity, and each refusal with its status and reason.

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use std::sync::Arc;
use std::time::{Duration, SystemTime};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use weir_identity::endpoint::{
    self, AuthError, AuthFuture, Authenticate, ClientError, Endpoint, StaticTokens,
};
use weir_identity::tls::{self, TrustBundle};
use weir_identity::{Authority, Issuer, WorkloadId, WorkloadKey};

const DAY: Duration = Duration::from_secs(86_400);
const TD: &str = "cluster.local";

fn ms(name: &str) -> WorkloadId {
    WorkloadId::microservice(TD, "shop", name)
}

struct Running {
    url: String,
    bundle: TrustBundle,
    tokens: Arc<StaticTokens>,
    endpoint: Arc<Endpoint>,
    addr: std::net::SocketAddr,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Running {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// An endpoint on loopback whose issuer was made `age` ago and is valid for `validity`.
async fn start_with(
    age: Duration,
    validity: Duration,
    auth: Option<Arc<dyn Authenticate>>,
) -> Running {
    let made = SystemTime::now() - age;
    let anchor = Authority::new_anchor(TD, made, 365 * DAY).unwrap();
    let bundle = TrustBundle::from_pem(&anchor.cert_pem()).unwrap();
    let issuer = Issuer::new(Authority::new_issuer(&anchor, TD, made, validity).unwrap());
    // The serving certificate comes from a valid issuer of the same anchor.
    let serving = Issuer::new(Authority::new_issuer(&anchor, TD, SystemTime::now(), DAY).unwrap());
    let tls = endpoint::serving_config(&serving, &["localhost".to_string()], DAY).unwrap();
    let tokens = Arc::new(StaticTokens::default());
    let auth: Arc<dyn Authenticate> = auth.unwrap_or_else(|| tokens.clone());
    let endpoint = Endpoint::new(issuer, auth, DAY);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let task = tokio::spawn(endpoint.clone().serve(listener, Arc::new(tls)));
    Running {
        url: format!("https://localhost:{}", addr.port()),
        bundle,
        tokens,
        endpoint,
        addr,
        task,
    }
}

async fn start() -> Running {
    start_with(Duration::ZERO, 30 * DAY, None).await
}

async fn ask(r: &Running, token: &str, csr: &[u8]) -> Result<String, ClientError> {
    endpoint::request_certificate(&r.url, &r.bundle, token, csr, Duration::from_secs(5)).await
}

fn refused(res: Result<String, ClientError>) -> (u16, String) {
    match res {
        Err(ClientError::Refused { status, reason }) => (status, reason),
        other => panic!("expected a refusal, got {other:?}"),
    }
}

#[tokio::test]
async fn a_workload_gets_a_certificate_for_its_own_identity() {
    let r = start().await;
    let token = r.tokens.issue(ms("orders"));
    let key = WorkloadKey::generate().unwrap();
    let chain = ask(&r, &token, &key.csr(&ms("orders")).unwrap())
        .await
        .unwrap();
    use rustls::pki_types::{CertificateDer, pem::PemObject};
    let certs: Vec<CertificateDer<'_>> = CertificateDer::pem_slice_iter(chain.as_bytes())
        .collect::<Result<_, _>>()
        .unwrap();
    assert_eq!(certs.len(), 2);
    assert_eq!(tls::peer_identity(&certs).unwrap(), ms("orders"));
    // It works as the workload's certificate.
    let current = tls::CurrentCert::new();
    current.install(&chain, key.private_key()).unwrap();
    assert!(current.is_installed());
    assert_eq!(
        r.endpoint
            .counts
            .issued
            .load(std::sync::atomic::Ordering::Relaxed),
        1
    );
}

#[tokio::test]
async fn tokens_that_do_not_authenticate_are_401_and_another_identity_is_403() {
    let r = start().await;
    let csr = WorkloadKey::generate().unwrap().csr(&ms("orders")).unwrap();
    let (status, reason) = refused(ask(&r, "", &csr).await);
    assert_eq!(status, 401, "{reason}");
    assert!(reason.contains("no bearer token"), "{reason}");
    let (status, reason) = refused(ask(&r, "not-a-token", &csr).await);
    assert_eq!(status, 401, "{reason}");
    assert!(reason.contains("unknown token"), "{reason}");
    // A token of orders' pod used to ask for payments' certificate.
    let token = r.tokens.issue(ms("orders"));
    let csr = WorkloadKey::generate()
        .unwrap()
        .csr(&ms("payments"))
        .unwrap();
    let (status, reason) = refused(ask(&r, &token, &csr).await);
    assert_eq!(status, 403, "{reason}");
    assert!(
        reason.contains("ms/payments")
            && reason.contains("may only have spiffe://cluster.local/ns/shop/ms/orders"),
        "{reason}"
    );
    // A revoked token (its process gone) no longer works.
    r.tokens.revoke(&token);
    let csr = WorkloadKey::generate().unwrap().csr(&ms("orders")).unwrap();
    assert_eq!(refused(ask(&r, &token, &csr).await).0, 401);
}

#[tokio::test]
async fn malformed_and_oversized_requests_get_a_4xx_and_a_reason() {
    let r = start().await;
    let token = r.tokens.issue(ms("orders"));
    let (status, reason) = refused(ask(&r, &token, b"not a CSR").await);
    assert_eq!(status, 400, "{reason}");
    assert!(reason.contains("not valid"), "{reason}");
    let (status, reason) = refused(ask(&r, &token, &vec![0x30; 64 * 1024]).await);
    assert_eq!(status, 413, "{reason}");
    // Another method and another path, sent raw.
    for (req, want) in [
        ("GET /v1/certificates HTTP/1.1\r\nHost: x\r\n\r\n", "405"),
        (
            "POST /v1/other HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n\r\n",
            "404",
        ),
    ] {
        let status = raw(&r, req).await;
        assert!(status.starts_with(&format!("HTTP/1.1 {want}")), "{status}");
    }
}

/// One raw HTTP/1.1 request over TLS; the status line.
async fn raw(r: &Running, req: &str) -> String {
    let verifier = rustls::client::WebPkiServerVerifier::builder_with_provider(
        r.bundle.roots(),
        tls::provider(),
    )
    .build()
    .unwrap();
    let config = rustls::ClientConfig::builder_with_provider(tls::provider())
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_webpki_verifier(verifier)
        .with_no_client_auth();
    let connector = tokio_rustls::TlsConnector::from(Arc::new(config));
    let tcp = tokio::net::TcpStream::connect(r.addr).await.unwrap();
    let mut s = connector
        .connect("localhost".try_into().unwrap(), tcp)
        .await
        .unwrap();
    s.write_all(req.as_bytes()).await.unwrap();
    let mut buf = vec![0u8; 1024];
    let n = s.read(&mut buf).await.unwrap();
    String::from_utf8_lossy(&buf[..n])
        .lines()
        .next()
        .unwrap_or("")
        .to_string()
}

#[tokio::test]
async fn an_issuer_past_its_validity_answers_503_and_signs_nothing() {
    // Made two days ago for one day.
    let r = start_with(2 * DAY, DAY, None).await;
    let token = r.tokens.issue(ms("orders"));
    let csr = WorkloadKey::generate().unwrap().csr(&ms("orders")).unwrap();
    let (status, reason) = refused(ask(&r, &token, &csr).await);
    assert_eq!(status, 503, "{reason}");
    assert!(reason.contains("not valid now"), "{reason}");
}

struct Down;
impl Authenticate for Down {
    fn authenticate<'a>(&'a self, _token: &'a str) -> AuthFuture<'a> {
        Box::pin(async {
            Err(AuthError::Unavailable(
                "the API server did not answer".into(),
            ))
        })
    }
}

#[tokio::test]
async fn an_authenticator_that_cannot_be_asked_is_503() {
    let r = start_with(Duration::ZERO, DAY, Some(Arc::new(Down))).await;
    let csr = WorkloadKey::generate().unwrap().csr(&ms("orders")).unwrap();
    let (status, reason) = refused(ask(&r, "some-token", &csr).await);
    assert_eq!(status, 503, "{reason}");
    assert!(reason.contains("did not answer"), "{reason}");
}

#[tokio::test]
async fn a_client_refuses_an_endpoint_that_its_bundle_does_not_vouch_for() {
    let r = start().await;
    let other = Authority::new_anchor(TD, SystemTime::now(), DAY).unwrap();
    let csr = WorkloadKey::generate().unwrap().csr(&ms("orders")).unwrap();
    let res = endpoint::request_certificate(
        &r.url,
        &TrustBundle::from_pem(&other.cert_pem()).unwrap(),
        "t",
        &csr,
        Duration::from_secs(5),
    )
    .await;
    assert!(matches!(res, Err(ClientError::Tls(_))), "{res:?}");
    for bad in [
        "http://localhost:1",
        "https://localhost",
        "https://localhost:1/v1",
        "localhost:1",
    ] {
        let res =
            endpoint::request_certificate(bad, &r.bundle, "t", &csr, Duration::from_secs(1)).await;
        assert!(matches!(res, Err(ClientError::Url(_))), "{bad}: {res:?}");
    }
}

#[tokio::test]
async fn a_stalled_handshake_holds_up_no_one_and_is_dropped() {
    let r = start().await;
    // A connection that never sends its ClientHello.
    let mut stalled = tokio::net::TcpStream::connect(r.addr).await.unwrap();
    let token = r.tokens.issue(ms("orders"));
    let csr = WorkloadKey::generate().unwrap().csr(&ms("orders")).unwrap();
    assert!(
        ask(&r, &token, &csr).await.is_ok(),
        "served while one handshake stalls"
    );
    let mut buf = [0u8; 1];
    let closed = tokio::time::timeout(
        endpoint::HANDSHAKE_TIMEOUT + Duration::from_secs(2),
        stalled.read(&mut buf),
    )
    .await;
    assert!(matches!(closed, Ok(Ok(0)) | Ok(Err(_))), "{closed:?}");
}

#[tokio::test]
async fn the_handler_answers_without_a_server_too() {
    // The same answers through `handle` directly: what the operator's server wraps.
    let r = start().await;
    let req = hyper::Request::post(endpoint::PATH)
        .body(Full::new(Bytes::from_static(b"x")))
        .unwrap();
    let resp = r.endpoint.handle(req).await;
    assert_eq!(resp.status(), 401);
    let body = resp.into_body().collect().await.unwrap().to_bytes();
    assert!(String::from_utf8_lossy(&body).contains("no bearer token"));
}

/// An anchor rotation end to end, as docs/security.md states its steps, through the endpoint and
/// the workload's client over real TLS: (1) both anchors in the bundle; (2) the issuer switched
/// to one of the new anchor, the endpoint's own certificate with it; (3) the old anchor gone
/// from the bundle. At every step a workload gets a certificate that verifies to the bundle of
/// that step, and after (3) it still reaches the endpoint (whose first certificate, from the old
/// issuer, it would refuse).
#[tokio::test]
async fn an_anchor_rotation_keeps_workloads_and_the_endpoint_verifiable_at_every_step() {
    use rustls::pki_types::{CertificateDer, UnixTime, pem::PemObject};
    let now = SystemTime::now();
    let old = Authority::new_anchor(TD, now, 365 * DAY).unwrap();
    let new = Authority::new_anchor(TD, now, 365 * DAY).unwrap();
    let issuer_of =
        |a: &Authority| Issuer::new(Authority::new_issuer(a, TD, now, 30 * DAY).unwrap());
    let serving =
        endpoint::ServingCert::new(&issuer_of(&old), &["localhost".to_string()], 30 * DAY).unwrap();
    let tokens = Arc::new(StaticTokens::default());
    let ep = Endpoint::new(issuer_of(&old), tokens.clone(), DAY);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!(
        "https://localhost:{}",
        listener.local_addr().unwrap().port()
    );
    let task = tokio::spawn(
        ep.clone()
            .serve(listener, Arc::new(serving.config().unwrap())),
    );
    let token = tokens.issue(ms("orders"));
    let bundle = |anchors: &[&Authority]| {
        let pem: String = anchors.iter().map(|a| a.cert_pem()).collect();
        TrustBundle::from_pem(&pem).unwrap()
    };
    // A certificate asked with `b`, and whether its chain verifies to `b`.
    let renew = |b: TrustBundle| {
        let (url, token) = (url.clone(), token.clone());
        async move {
            let key = WorkloadKey::generate().unwrap();
            let chain = endpoint::request_certificate(
                &url,
                &b,
                &token,
                &key.csr(&ms("orders")).unwrap(),
                Duration::from_secs(5),
            )
            .await?;
            let certs: Vec<CertificateDer<'_>> = CertificateDer::pem_slice_iter(chain.as_bytes())
                .collect::<Result<_, _>>()
                .unwrap();
            let verified = rustls::server::WebPkiClientVerifier::builder_with_provider(
                b.roots(),
                tls::provider(),
            )
            .build()
            .unwrap()
            .verify_client_cert(&certs[0], &certs[1..], UnixTime::now())
            .is_ok();
            Ok::<_, ClientError>(verified)
        }
    };
    assert!(renew(bundle(&[&old])).await.unwrap(), "before");
    // (1) Both anchors in the bundle: the old issuer's certificates verify.
    assert!(renew(bundle(&[&old, &new])).await.unwrap(), "step 1");
    // Without the next step, a bundle of the new anchor alone refuses the endpoint.
    assert!(matches!(
        renew(bundle(&[&new])).await,
        Err(ClientError::Tls(_))
    ));
    // (2) The issuer switched, the endpoint's certificate with it (what mesh_ca::serve does).
    ep.set_issuer(issuer_of(&new));
    serving.reissue(&ep.issuer()).unwrap();
    assert!(renew(bundle(&[&old, &new])).await.unwrap(), "step 2");
    // (3) The old anchor gone: the endpoint and the new certificates verify to the new one.
    assert!(renew(bundle(&[&new])).await.unwrap(), "step 3");
    assert!(matches!(
        renew(bundle(&[&old])).await,
        Err(ClientError::Tls(_))
    ));
    task.abort();
}

#[test]
fn the_endpoints_certificate_is_renewed_with_a_third_of_its_life_left() {
    let now = SystemTime::now();
    let anchor = Authority::new_anchor(TD, now, 365 * DAY).unwrap();
    let issuer = Issuer::new(Authority::new_issuer(&anchor, TD, now, 90 * DAY).unwrap());
    let serving =
        endpoint::ServingCert::new(&issuer, &["localhost".to_string()], 30 * DAY).unwrap();
    assert!(!serving.renew_if_due(&issuer, now + 19 * DAY).unwrap());
    assert!(serving.renew_if_due(&issuer, now + 21 * DAY).unwrap());
    // Renewed (from the clock's now): a full lifetime again, nothing due tomorrow.
    assert!(!serving.renew_if_due(&issuer, now + DAY).unwrap());
}
