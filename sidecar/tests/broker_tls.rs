//! `weir-proxy` to brokers behind TLS whose certificate a private CA signed (`ca.crt` in the
//! Broker's credentials Secret, mounted as the sidecar's credentials directory), on each broker
//! kind: real nats-server (`--tls`), redis-server (`--tls-port`), rabbitmq-server (an SSL
//! listener) and tansu behind a TLS front (it serves no TLS itself), two real sidecars and a counting app. With `ca.crt` events go through and reach
//! the app; without it the sidecar stays unconnected (`/brokerz` 503, `/readyz` 200) and its log
//! says why; a `ca.crt` that is not PEM is reported naming the file. Skipped when a server or
//! `openssl` is missing.

use std::time::Duration;
use weir_crds::proxy::MessagingConfig;
use weir_testkit::Pki;
use weir_testkit::bridge::*;
use weir_testkit::per_broker;

/// The binary under test.
const PROXY: &str = env!("CARGO_BIN_EXE_weir-proxy");

/// A broker listening with TLS; `url` is its TLS URL.
struct TlsBroker {
    kind: Kind,
    url: String,
    _server: Box<dyn std::any::Any>,
}

async fn start_tls(kind: Kind, pki: &Pki) -> Option<TlsBroker> {
    require(kind)?;
    let (cert, key, ca) = (
        pki.path("server.crt"),
        pki.path("server.key"),
        pki.path("ca.crt"),
    );
    let tls_port = free_addr().port();
    Some(match kind {
        Kind::Kafka => {
            // Tansu serves no usable TLS listener: a TLS front on `tls_port`, which the broker
            // advertises, forwards to it.
            let Some(k) = KafkaServer::start_advertising(tls_port) else {
                eprintln!("SKIP: kafka over TLS needs the test kit's tansu");
                return None;
            };
            let upstream = format!("127.0.0.1:{}", k.port().expect("a local tansu"));
            let front = weir_testkit::TlsFront::start(
                tls_port,
                cert.as_ref(),
                key.as_ref(),
                upstream.parse().unwrap(),
            )
            .await;
            TlsBroker {
                kind,
                url: format!("kafka+ssl://127.0.0.1:{tls_port}"),
                _server: Box::new((k, front)),
            }
        }
        Kind::Nats => {
            let n = NatsServer::start_with(&["--tls", "--tlscert", &cert, "--tlskey", &key]);
            TlsBroker {
                kind,
                url: format!("tls://127.0.0.1:{}", n.port),
                _server: Box::new(n),
            }
        }
        Kind::Redis => {
            let args = format!(
                "--tls-port {tls_port} --tls-cert-file {cert} --tls-key-file {key} \
                 --tls-ca-cert-file {ca} --tls-auth-clients no"
            );
            let args: Vec<String> = args.split_whitespace().map(str::to_string).collect();
            TlsBroker {
                kind,
                url: format!("rediss://127.0.0.1:{tls_port}"),
                _server: Box::new(RedisServer::start_with(&args)),
            }
        }
        Kind::Rabbitmq => {
            let conf = format!(
                "listeners.ssl.default = 127.0.0.1:{tls_port}\nssl_options.cacertfile = {ca}\n\
                 ssl_options.certfile = {cert}\nssl_options.keyfile = {key}\n\
                 ssl_options.verify = verify_none\nssl_options.fail_if_no_peer_cert = false\n"
            );
            let mut server = RabbitServer::start_with_conf(&conf);
            server.wait_listening(tls_port);
            TlsBroker {
                kind,
                url: format!("amqps://127.0.0.1:{tls_port}/%2f"),
                _server: Box::new(server),
            }
        }
    })
}

fn messaging(
    b: &TlsBroker,
    m: MessagingConfig,
    secret: Option<&tempfile::TempDir>,
) -> MessagingConfig {
    MessagingConfig {
        broker_kind: b.kind.name().into(),
        credentials_file: secret.map(|d| d.path().to_str().unwrap().to_string()),
        ..m
    }
}

/// Publishes `n` events through `s`, each retried until the broker takes it (the consuming
/// sidecar declares its queue or group concurrently).
async fn publish_all(s: &Sidecar, n: usize) {
    for i in 0..n {
        let id = format!("tls-{i}");
        let body = format!(r#"{{"orderId":"{id}","amount":1}}"#);
        let ok = eventually_async(Duration::from_secs(15), || async {
            s.publish(QUEUE, &[("ce-id", id.as_str())], &body).await.0 == 202
        })
        .await;
        assert!(
            ok,
            "event {id} not taken over TLS; logs {:#?}",
            s.logs.lock().unwrap()
        );
    }
}

async fn publish_and_consume_over_tls_with_the_secrets_ca(kind: Kind) {
    let Some(pki) = Pki::new() else { return };
    let Some(broker) = start_tls(kind, &pki).await else {
        return;
    };
    let secret = pki.secret_with_ca();
    if kind == Kind::Kafka {
        // The operator's part: the Queue's topics (a Kafka sidecar never creates them).
        weir_testkit::bridge::kafka::create_topics_at(
            &broker.url,
            secret.path(),
            &[
                (STREAM, weir_testkit::bridge::kafka::QUEUE_PARTITIONS),
                (DLQ_STREAM, 1),
            ],
        )
        .await;
    }
    let app = App::ok().await;
    let publisher = sidecar(
        PROXY,
        base_config(
            "orders",
            app.addr,
            messaging(&broker, publisher_messaging(&broker.url), Some(&secret)),
        ),
    )
    .await;
    let consumer = sidecar(
        PROXY,
        base_config(
            "billing",
            app.addr,
            messaging(
                &broker,
                consumer_messaging(&broker.url, consume_config("billing")),
                Some(&secret),
            ),
        ),
    )
    .await;
    publish_all(&publisher, 20).await;
    let delivered = eventually(Duration::from_secs(20), || app.total() >= 20).await;
    assert!(
        delivered,
        "{} of 20 reached the app; consumer logs {:#?}",
        app.total(),
        consumer.logs.lock().unwrap()
    );
    assert!(
        app.counts().values().all(|c| *c == 1),
        "each once: {:?}",
        app.counts()
    );
}

async fn without_the_ca_the_sidecar_does_not_connect_and_says_why(kind: Kind) {
    let Some(pki) = Pki::new() else { return };
    let Some(broker) = start_tls(kind, &pki).await else {
        return;
    };
    let app = App::ok().await;
    let m = messaging(&broker, publisher_messaging(&broker.url), None);
    let s = Unready::start(PROXY, base_config("orders", app.addr, m));
    // rustls says "invalid peer certificate: UnknownIssuer"; async-nats reports only the kind
    // of a failed connection attempt ("IO error" for a refused certificate).
    let why: &[&str] = match kind {
        Kind::Nats => &["cannot connect to the broker", "error"],
        // librdkafka (OpenSSL): "certificate verify failed", told once, not per reconnect.
        Kind::Kafka => &["broker not usable", "certificate verify failed"],
        _ => &["certificate", "unknownissuer"],
    };
    s.says(why).await;
    if kind == Kind::Kafka {
        // librdkafka retries about ten times a second, each attempt reporting the failure
        // again: told once per failure, not per attempt.
        tokio::time::sleep(Duration::from_secs(2)).await;
        let lines = s.logs.lock().unwrap().clone();
        let told = lines.iter().filter(|l| l.contains("librdkafka")).count();
        assert!(told <= 8, "{told} librdkafka lines: {lines:#?}");
    }
}

/// A `ca.crt` that is not PEM: the sidecar does not start, and says which file is wrong.
async fn a_ca_that_is_not_pem_stops_the_sidecar_naming_the_file(kind: Kind) {
    let Some(pki) = Pki::new() else { return };
    let Some(broker) = start_tls(kind, &pki).await else {
        return;
    };
    let app = App::ok().await;
    let secret = tempfile::tempdir().unwrap();
    std::fs::write(secret.path().join("ca.crt"), "not a certificate").unwrap();
    let m = messaging(&broker, publisher_messaging(&broker.url), Some(&secret));
    let mut s = Unready::start(PROXY, base_config("orders", app.addr, m));
    let exited = eventually(
        Duration::from_secs(10),
        || matches!(s.proxy.child().try_wait(), Ok(Some(st)) if !st.success()),
    )
    .await;
    assert!(exited, "exits with an error");
    let file = secret.path().join("ca.crt").to_str().unwrap().to_string();
    let said = format!("{file} is not a PEM certificate");
    let named = eventually(Duration::from_secs(5), || {
        s.logs.lock().unwrap().iter().any(|l| l.contains(&said))
    })
    .await;
    assert!(named, "{said}: {:#?}", s.logs.lock().unwrap());
}

per_broker!(
    publish_and_consume_over_tls_with_the_secrets_ca,
    without_the_ca_the_sidecar_does_not_connect_and_says_why,
    a_ca_that_is_not_pem_stops_the_sidecar_naming_the_file,
);
