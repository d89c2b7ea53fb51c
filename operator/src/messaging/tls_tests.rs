//! The operator's connections to brokers behind TLS, against real servers whose certificate a
//! private CA signed: with the CA in [`Credentials`] each kind connects; without it (the
//! system's roots do not know the CA) it does not, and says why; a CA that is not PEM is
//! refused naming the key (tested in `weir_broker::credentials`). Skipped when a server or
//! `openssl` is missing.

use std::collections::BTreeMap;
use weir_broker::admin::{Admin, BrokerAdmin, connect};
use weir_broker::credentials::{Auth, CA_KEY, Credentials};
use weir_crds::broker::BrokerKind;
use weir_testkit::brokers::Kind;
use weir_testkit::{NatsServer, Pki, RabbitServer, RedisServer, free_port};

fn with_ca(pki: &Pki) -> Credentials {
    let mut data = BTreeMap::new();
    data.insert(CA_KEY.to_string(), pki.ca_pem().into_bytes());
    let c = Credentials::from_secret_data(&data).expect("a Secret holding only ca.crt");
    assert_eq!(c.auth, Auth::None);
    c
}

/// Connects with and without the CA: the first must reach the broker, the second must fail
/// on the certificate.
async fn connects_only_with_the_ca(kind: BrokerKind, url: &str, pki: &Pki) -> BrokerAdmin {
    let e = connect(kind, url, &Credentials::default())
        .await
        .err()
        .unwrap_or_else(|| panic!("{url}: connected without the CA"));
    let text = e.to_string().to_lowercase();
    assert!(
        text.contains("certificate") || text.contains("tls") || text.contains("issuer"),
        "{url}: the reason names the certificate: {e}"
    );
    connect(kind, url, &with_ca(pki))
        .await
        .unwrap_or_else(|e| panic!("{url} with the CA: {e}"))
}

#[tokio::test]
async fn nats_over_tls_with_the_secrets_ca() {
    if Kind::Nats.binary().is_none() {
        eprintln!("SKIP: nats-server not found");
        return;
    }
    let Some(pki) = Pki::new() else { return };
    let (cert, key) = (pki.path("server.crt"), pki.path("server.key"));
    let server = NatsServer::start_with(&["--tls", "--tlscert", &cert, "--tlskey", &key]);
    let url = format!("tls://127.0.0.1:{}", server.port);
    let b = connects_only_with_the_ca(BrokerKind::Nats, &url, &pki).await;
    assert!(!b.server_version().await.is_empty());
    // nats:// with a CA: TLS is required, and this server offers it.
    connect(BrokerKind::Nats, &server.url(), &with_ca(&pki))
        .await
        .unwrap();
}

#[tokio::test]
async fn redis_over_tls_with_the_secrets_ca() {
    if Kind::Redis.binary().is_none() {
        eprintln!("SKIP: redis-server not found");
        return;
    }
    let Some(pki) = Pki::new() else { return };
    let tls_port = free_port();
    let server = RedisServer::start_with(&[
        "--tls-port".into(),
        tls_port.to_string(),
        "--tls-cert-file".into(),
        pki.path("server.crt"),
        "--tls-key-file".into(),
        pki.path("server.key"),
        "--tls-ca-cert-file".into(),
        pki.path("ca.crt"),
        "--tls-auth-clients".into(),
        "no".into(),
    ]);
    let url = format!("rediss://127.0.0.1:{tls_port}");
    let b = connects_only_with_the_ca(BrokerKind::Redis, &url, &pki).await;
    assert!(b.server_version().await.starts_with('7'));
    let e = connect(BrokerKind::Redis, &server.url(), &with_ca(&pki))
        .await
        .err()
        .expect("a CA with redis:// is refused");
    assert!(e.to_string().contains("rediss://"), "{e}");
}

#[tokio::test]
async fn rabbitmq_over_tls_with_the_secrets_ca() {
    if Kind::Rabbitmq.binary().is_none() {
        eprintln!("SKIP: rabbitmq-server not found");
        return;
    }
    let Some(pki) = Pki::new() else { return };
    let tls_port = free_port();
    let mut server = RabbitServer::start_with_conf(&format!(
        "listeners.ssl.default = 127.0.0.1:{tls_port}\n\
         ssl_options.cacertfile = {}\nssl_options.certfile = {}\nssl_options.keyfile = {}\n\
         ssl_options.verify = verify_none\nssl_options.fail_if_no_peer_cert = false\n",
        pki.path("ca.crt"),
        pki.path("server.crt"),
        pki.path("server.key"),
    ));
    server.wait_listening(tls_port);
    let url = format!("amqps://127.0.0.1:{tls_port}/%2f");
    let b = connects_only_with_the_ca(BrokerKind::Rabbitmq, &url, &pki).await;
    assert_eq!(b.server_version().await, "AMQP 0-9-1");
    let e = connect(BrokerKind::Rabbitmq, &server.url(), &with_ca(&pki))
        .await
        .err()
        .expect("a CA with amqp:// is refused");
    assert!(e.to_string().contains("amqps://"), "{e}");
}
