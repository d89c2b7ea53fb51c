//! `https://` upstreams: the outbound listener speaks TLS to the dependency, verifying its
//! certificate against the system roots (here a test CA given by `SSL_CERT_FILE`).

mod common;

use common::*;
use hyper_util::rt::TokioIo;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use std::sync::Arc;
use weir_testkit::Pki;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn https_upstream_is_verified_and_called() {
    // A CA and a server certificate for `localhost` signed by it.
    let Some(pki) = Pki::for_names("DNS:localhost") else {
        return;
    };
    let dir = pki.dir();
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(dir.join("server.crt"))
        .unwrap()
        .map(|c| c.unwrap())
        .collect();
    let key = PrivateKeyDer::from_pem_file(dir.join("server.key")).unwrap();
    let server = rustls::ServerConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_no_client_auth()
    .with_single_cert(certs, key)
    .unwrap();
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(server));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let hosts = Arc::new(std::sync::Mutex::new(Vec::new()));
    let h2 = hosts.clone();
    tokio::spawn(async move {
        loop {
            let Ok((tcp, _)) = listener.accept().await else {
                continue;
            };
            let (acceptor, hosts) = (acceptor.clone(), h2.clone());
            tokio::spawn(async move {
                let Ok(tls) = acceptor.accept(tcp).await else {
                    return;
                };
                let svc =
                    hyper::service::service_fn(move |req: http::Request<hyper::body::Incoming>| {
                        hosts
                            .lock()
                            .unwrap()
                            .push(req.headers()["host"].to_str().unwrap().to_string());
                        async { Ok::<_, std::convert::Infallible>(respond(200, "over tls")) }
                    });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(tls), svc)
                    .await;
            });
        }
    });

    let app = upstream(|_, _| async { respond(200, "app") }).await;
    let mut cfg = base_config(app.addr);
    cfg.outbound
        .push(dependency("secure", format!("https://localhost:{port}")));
    // Same server, but the certificate does not name 127.0.0.1: verification must fail.
    cfg.outbound
        .push(dependency("mismatch", format!("https://127.0.0.1:{port}")));
    let ca = dir.join("ca.crt");
    let proxy = proxy_env(cfg, &[], &[("SSL_CERT_FILE", &ca)]).await;
    let c = client();
    let a = get(&c, proxy.outbound_url("secure", "/x")).await;
    assert_eq!(a.status, 200, "{}", a.body);
    assert_eq!(a.body, "over tls");
    assert_eq!(hosts.lock().unwrap()[0], format!("localhost:{port}"));
    let a = get(&c, proxy.outbound_url("mismatch", "/x")).await;
    assert_eq!(a.status, 502);
    assert_eq!(a.headers["x-weir-reason"], "upstream-connect");
    assert_eq!(
        hosts.lock().unwrap().len(),
        1,
        "no request over an unverified connection"
    );
}
