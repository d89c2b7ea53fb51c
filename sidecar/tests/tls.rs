//! `https://` upstreams: the outbound listener speaks TLS to the dependency, verifying its
//! certificate against the system roots (here a test CA given by `SSL_CERT_FILE`).

mod common;

use common::*;
use hyper_util::rt::TokioIo;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use std::path::Path;
use std::process::Command;
use std::sync::Arc;

fn openssl(dir: &Path, args: &[&str]) {
    let out = Command::new("openssl")
        .current_dir(dir)
        .args(args)
        .output()
        .expect("openssl");
    assert!(
        out.status.success(),
        "openssl {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A CA and a server certificate for `localhost` signed by it.
fn certificates(dir: &Path) {
    let ec = [
        "-newkey",
        "ec",
        "-pkeyopt",
        "ec_paramgen_curve:prime256v1",
        "-nodes",
    ];
    let mut ca = vec!["req", "-x509"];
    ca.extend(ec);
    ca.extend([
        "-keyout",
        "ca.key",
        "-out",
        "ca.pem",
        "-days",
        "2",
        "-subj",
        "/CN=weir-test-ca",
        "-addext",
        "basicConstraints=critical,CA:TRUE",
        "-addext",
        "keyUsage=critical,keyCertSign,cRLSign",
    ]);
    openssl(dir, &ca);
    let mut csr = vec!["req", "-new"];
    csr.extend(ec);
    csr.extend([
        "-keyout",
        "srv.key",
        "-out",
        "srv.csr",
        "-subj",
        "/CN=localhost",
    ]);
    openssl(dir, &csr);
    std::fs::write(
        dir.join("ext.cnf"),
        "subjectAltName=DNS:localhost\nextendedKeyUsage=serverAuth\nbasicConstraints=CA:FALSE\n",
    )
    .unwrap();
    openssl(
        dir,
        &[
            "x509",
            "-req",
            "-in",
            "srv.csr",
            "-CA",
            "ca.pem",
            "-CAkey",
            "ca.key",
            "-CAcreateserial",
            "-out",
            "srv.pem",
            "-days",
            "2",
            "-extfile",
            "ext.cnf",
        ],
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn https_upstream_is_verified_and_called() {
    if Command::new("openssl").arg("version").output().is_err() {
        eprintln!("skipped: no openssl binary to make test certificates");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    certificates(dir.path());
    let certs: Vec<CertificateDer<'static>> =
        CertificateDer::pem_file_iter(dir.path().join("srv.pem"))
            .unwrap()
            .map(|c| c.unwrap())
            .collect();
    let key = PrivateKeyDer::from_pem_file(dir.path().join("srv.key")).unwrap();
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
    let ca = dir.path().join("ca.pem");
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
