//! Mutual TLS by workload identity, with real rustls on loopback: the handshakes that must
//! succeed, and each certificate that must be refused (expired, not yet valid, from another
//! anchor, for another identity, none at all), at the end that must refuse it. Then the
//! issuer's policy, and an anchor's rotation through a bundle of two.

use std::sync::Arc;
use std::time::{Duration, SystemTime};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use weir_identity::tls::{self, CurrentCert, TrustBundle};
use weir_identity::{Authority, Issuer, SignError, WorkloadId, WorkloadKey};

const DAY: Duration = Duration::from_secs(86_400);
const TD: &str = "cluster.local";

fn ms(name: &str) -> WorkloadId {
    WorkloadId::microservice(TD, "shop", name)
}

/// An anchor and an issuer under it.
struct Pki {
    anchor: Authority,
    issuer: Issuer,
}

impl Pki {
    /// Made a day ago, so that certificates can be issued in the past (to have expired).
    fn new() -> Pki {
        let now = SystemTime::now() - DAY;
        let anchor = Authority::new_anchor(TD, now, 365 * DAY).unwrap();
        let issuer = Issuer::new(Authority::new_issuer(&anchor, TD, now, 30 * DAY).unwrap());
        Pki { anchor, issuer }
    }

    fn bundle(&self) -> TrustBundle {
        TrustBundle::from_pem(&self.anchor.cert_pem()).unwrap()
    }

    /// A workload's certificate, issued at `at` for `lifetime`, installed.
    fn cert_at(&self, id: &WorkloadId, at: SystemTime, lifetime: Duration) -> Arc<CurrentCert> {
        let key = WorkloadKey::generate().unwrap();
        let issued = self
            .issuer
            .sign(&key.csr(id).unwrap(), id, at, lifetime)
            .unwrap();
        let cert = CurrentCert::new();
        cert.install(&issued.chain_pem, key.private_key()).unwrap();
        cert
    }

    fn cert(&self, id: &WorkloadId) -> Arc<CurrentCert> {
        self.cert_at(id, SystemTime::now(), DAY)
    }
}

/// What each end saw of one connection: the client's handshake result, the server's, and the
/// caller identity the server read from the verified chain.
struct Outcome {
    client: Result<(), String>,
    server: Result<WorkloadId, String>,
}

/// One connection on loopback: the client says "ping", the server answers "pong".
async fn connect(
    server_bundle: &TrustBundle,
    server_cert: Arc<CurrentCert>,
    client_bundle: &TrustBundle,
    client_cert: Arc<CurrentCert>,
    expected: WorkloadId,
) -> Outcome {
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(
        tls::server_config(server_bundle, server_cert).unwrap(),
    ));
    let connector = tokio_rustls::TlsConnector::from(Arc::new(
        tls::client_config(client_bundle, client_cert, expected.clone()).unwrap(),
    ));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let server = tokio::spawn(async move {
        let (tcp, _) = listener.accept().await.unwrap();
        let mut s = acceptor.accept(tcp).await.map_err(|e| e.to_string())?;
        let caller = tls::peer_identity(s.get_ref().1.peer_certificates().unwrap_or_default())
            .map_err(|e| e.to_string())?;
        let mut buf = [0u8; 4];
        s.read_exact(&mut buf).await.map_err(|e| e.to_string())?;
        s.write_all(b"pong").await.map_err(|e| e.to_string())?;
        s.shutdown().await.ok();
        Ok::<_, String>(caller)
    });
    let client = async {
        let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
        let mut c = connector
            .connect(tls::server_name(&expected), tcp)
            .await
            .map_err(|e| e.to_string())?;
        assert_eq!(
            c.get_ref().1.alpn_protocol(),
            Some(&b"h2"[..]),
            "ALPN agreed on h2"
        );
        c.write_all(b"ping").await.map_err(|e| e.to_string())?;
        let mut buf = [0u8; 4];
        c.read_exact(&mut buf).await.map_err(|e| e.to_string())?;
        assert_eq!(&buf, b"pong");
        Ok::<_, String>(())
    }
    .await;
    let server = match tokio::time::timeout(Duration::from_secs(5), server).await {
        Ok(joined) => joined.unwrap(),
        Err(_) => Err("the server's side did not finish".into()),
    };
    Outcome { client, server }
}

#[tokio::test]
async fn two_workloads_authenticate_each_other_and_the_server_learns_the_caller() {
    let pki = Pki::new();
    let (orders, users) = (ms("orders"), ms("users"));
    let out = connect(
        &pki.bundle(),
        pki.cert(&users),
        &pki.bundle(),
        pki.cert(&orders),
        users.clone(),
    )
    .await;
    assert_eq!(out.client, Ok(()));
    assert_eq!(out.server, Ok(orders));
}

#[tokio::test]
async fn a_server_that_is_not_the_dependency_called_is_refused_by_the_client() {
    let pki = Pki::new();
    // The caller meant to reach users; the server it got is payments.
    let out = connect(
        &pki.bundle(),
        pki.cert(&ms("payments")),
        &pki.bundle(),
        pki.cert(&ms("orders")),
        ms("users"),
    )
    .await;
    let err = out.client.unwrap_err();
    assert!(
        err.contains("spiffe://cluster.local/ns/shop/ms/payments")
            && err.contains("not spiffe://cluster.local/ns/shop/ms/users"),
        "{err}"
    );
    assert!(out.server.is_err());
}

#[tokio::test]
async fn certificates_from_another_anchor_are_refused_at_both_ends() {
    let (pki, other) = (Pki::new(), Pki::new());
    // A client whose certificate another anchor issued: the server refuses it.
    let out = connect(
        &pki.bundle(),
        pki.cert(&ms("users")),
        &pki.bundle(),
        other.cert(&ms("orders")),
        ms("users"),
    )
    .await;
    // Another anchor's issuer has the same name as ours: its signature is what fails.
    let err = out.server.unwrap_err();
    assert!(
        err.contains("invalid peer certificate: BadSignature"),
        "server: {err}"
    );
    // A server whose certificate another anchor issued: the client refuses it.
    let out = connect(
        &pki.bundle(),
        other.cert(&ms("users")),
        &pki.bundle(),
        pki.cert(&ms("orders")),
        ms("users"),
    )
    .await;
    let err = out.client.unwrap_err();
    assert!(
        err.contains("invalid peer certificate: BadSignature"),
        "client: {err}"
    );
}

#[tokio::test]
async fn expired_and_not_yet_valid_certificates_are_refused() {
    let pki = Pki::new();
    let now = SystemTime::now();
    // Issued two hours ago for one hour: expired an hour ago.
    let expired = pki.cert_at(
        &ms("orders"),
        now - 2 * 3600 * Duration::from_secs(1),
        Duration::from_secs(3600),
    );
    let out = connect(
        &pki.bundle(),
        pki.cert(&ms("users")),
        &pki.bundle(),
        expired,
        ms("users"),
    )
    .await;
    let err = out.server.unwrap_err();
    assert!(err.contains("certificate expired"), "server: {err}");
    // Issued for a start an hour from now (beyond the minute of clock skew allowed).
    let early = pki.cert_at(&ms("users"), now + Duration::from_secs(3600), DAY);
    let out = connect(
        &pki.bundle(),
        early,
        &pki.bundle(),
        pki.cert(&ms("orders")),
        ms("users"),
    )
    .await;
    let err = out.client.unwrap_err();
    assert!(err.contains("not valid yet"), "client: {err}");
}

#[tokio::test]
async fn a_client_without_a_certificate_is_refused() {
    let pki = Pki::new();
    let out = connect(
        &pki.bundle(),
        pki.cert(&ms("users")),
        &pki.bundle(),
        CurrentCert::new(),
        ms("users"),
    )
    .await;
    let err = out.server.unwrap_err();
    assert!(err.contains("peer sent no certificates"), "server: {err}");
}

#[tokio::test]
async fn a_renewed_certificate_serves_new_handshakes() {
    let pki = Pki::new();
    let users = pki.cert(&ms("users"));
    let before = users.clone();
    // Renewal: a new key and certificate installed in the same holder.
    let key = WorkloadKey::generate().unwrap();
    let issued = pki
        .issuer
        .sign(
            &key.csr(&ms("users")).unwrap(),
            &ms("users"),
            SystemTime::now(),
            DAY,
        )
        .unwrap();
    users.install(&issued.chain_pem, key.private_key()).unwrap();
    assert!(Arc::ptr_eq(&before, &users));
    let out = connect(
        &pki.bundle(),
        users,
        &pki.bundle(),
        pki.cert(&ms("orders")),
        ms("users"),
    )
    .await;
    assert_eq!(out.client, Ok(()));
    assert_eq!(out.server, Ok(ms("orders")));
}

#[tokio::test]
async fn an_anchor_is_rotated_through_a_bundle_of_two() {
    let (old, new) = (Pki::new(), Pki::new());
    let both = TrustBundle::from_pem(&format!(
        "{}{}",
        old.anchor.cert_pem(),
        new.anchor.cert_pem()
    ))
    .unwrap();
    assert_eq!(both.len(), 2);
    // During the overlap: a workload still on the old anchor's issuer and one already on the
    // new one talk, in both directions.
    for (server, client) in [(&old, &new), (&new, &old)] {
        let out = connect(
            &both,
            server.cert(&ms("users")),
            &both,
            client.cert(&ms("orders")),
            ms("users"),
        )
        .await;
        assert_eq!(out.client, Ok(()));
        assert_eq!(out.server, Ok(ms("orders")));
    }
    // After: the bundle holds the new anchor alone, and the old one's certificates are refused.
    let out = connect(
        &new.bundle(),
        new.cert(&ms("users")),
        &new.bundle(),
        old.cert(&ms("orders")),
        ms("users"),
    )
    .await;
    let err = out.server.unwrap_err();
    assert!(err.contains("invalid peer certificate"), "{err}");
}

#[test]
fn the_issuer_signs_only_the_identity_its_requester_authenticated_as() {
    let pki = Pki::new();
    let now = SystemTime::now();
    let key = WorkloadKey::generate().unwrap();
    // A CSR for payments from a requester authenticated as orders.
    let csr = key.csr(&ms("payments")).unwrap();
    let err = pki.issuer.sign(&csr, &ms("orders"), now, DAY).unwrap_err();
    assert!(
        matches!(&err, SignError::WrongIdentity { requested, allowed }
            if requested == &["spiffe://cluster.local/ns/shop/ms/payments".to_string()]
                && allowed == "spiffe://cluster.local/ns/shop/ms/orders"),
        "{err}"
    );
    // Its own identity and another one besides.
    let csr = key
        .csr_for_names(&[ms("orders").uri(), ms("payments").uri()])
        .unwrap();
    assert!(matches!(
        pki.issuer.sign(&csr, &ms("orders"), now, DAY),
        Err(SignError::WrongIdentity { .. })
    ));
    // No identity at all.
    let csr = key.csr_for_names(&[]).unwrap();
    assert!(matches!(
        pki.issuer.sign(&csr, &ms("orders"), now, DAY),
        Err(SignError::WrongIdentity { .. })
    ));
    // A CSR whose signature does not verify: no proof of the key.
    let mut csr = key.csr(&ms("orders")).unwrap();
    let last = csr.len() - 1;
    csr[last] ^= 0x01;
    assert!(matches!(
        pki.issuer.sign(&csr, &ms("orders"), now, DAY),
        Err(SignError::BadRequest(_))
    ));
    // Not a CSR.
    assert!(matches!(
        pki.issuer
            .sign(b"\x30\x03\x02\x01\x00", &ms("orders"), now, DAY),
        Err(SignError::BadRequest(_))
    ));
    assert!(matches!(
        pki.issuer.sign(b"", &ms("orders"), now, DAY),
        Err(SignError::BadRequest(_))
    ));
}

#[test]
fn an_issued_certificate_is_a_short_lived_leaf_within_the_issuers_validity() {
    let now = SystemTime::now();
    let anchor = Authority::new_anchor(TD, now, 365 * DAY).unwrap();
    // An issuer with two hours left.
    let issuer =
        Issuer::new(Authority::new_issuer(&anchor, TD, now, Duration::from_secs(7200)).unwrap());
    let key = WorkloadKey::generate().unwrap();
    let issued = issuer
        .sign(&key.csr(&ms("orders")).unwrap(), &ms("orders"), now, DAY)
        .unwrap();
    // Cut at the issuer's expiry, not the day asked for.
    assert_eq!(issued.not_after, issuer.authority().not_after());
    use rustls::pki_types::{CertificateDer, pem::PemObject};
    let chain: Vec<CertificateDer<'_>> =
        CertificateDer::pem_slice_iter(issued.chain_pem.as_bytes())
            .collect::<Result<_, _>>()
            .unwrap();
    assert_eq!(chain.len(), 2, "the leaf and the issuer");
    let (_, leaf) = x509_parser::parse_x509_certificate(&chain[0]).unwrap();
    assert!(!leaf.is_ca(), "a leaf");
    let eku = leaf.extended_key_usage().unwrap().unwrap().value;
    assert!(eku.server_auth && eku.client_auth);
    assert_eq!(tls::peer_identity(&chain).unwrap(), ms("orders"));
    // An issuer past its validity signs nothing.
    let later = now + Duration::from_secs(7200 + 60);
    assert!(matches!(
        issuer.sign(&key.csr(&ms("orders")).unwrap(), &ms("orders"), later, DAY),
        Err(SignError::IssuerNotValid { .. })
    ));
}

#[test]
fn a_ca_reads_back_from_its_pem_and_keeps_issuing() {
    let pki = Pki::new();
    let again = Issuer::new(
        Authority::from_pem(
            &pki.issuer.authority().cert_pem(),
            &pki.issuer.authority().key_pem(),
        )
        .unwrap(),
    );
    let key = WorkloadKey::generate().unwrap();
    let issued = again
        .sign(
            &key.csr(&ms("orders")).unwrap(),
            &ms("orders"),
            SystemTime::now(),
            DAY,
        )
        .unwrap();
    assert!(issued.chain_pem.contains("BEGIN CERTIFICATE"));
    // A leaf is not a CA: it cannot be loaded as an issuer.
    let leaf_pem = issued
        .chain_pem
        .split_inclusive("-----END CERTIFICATE-----\n")
        .next()
        .unwrap();
    let err = Authority::from_pem(leaf_pem, &pki.issuer.authority().key_pem()).unwrap_err();
    assert!(err.to_string().contains("not a CA"), "{err}");
    assert!(matches!(
        TrustBundle::from_pem(""),
        Err(tls::TlsError::EmptyBundle)
    ));
}
