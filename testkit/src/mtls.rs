//! A workload's side of the mesh's mutual TLS, for suites that check whom a sidecar admits: one
//! HTTP/1.1 request presenting a workload certificate, the server required to be the workload
//! meant (its chain verified to the trust bundle), as a peer sidecar would call.

use std::io::{Read as _, Write as _};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;
use weir_identity::WorkloadId;
use weir_identity::tls::{self, CurrentCert, TrustBundle};

/// `GET path` on `addr` over TLS 1.3, presenting `cert` and requiring `server`'s identity:
/// the status and body, or why no answer came (the handshake refused, the connection reset).
pub fn get(
    addr: SocketAddr,
    bundle: &TrustBundle,
    cert: Arc<CurrentCert>,
    server: &WorkloadId,
    path: &str,
) -> std::io::Result<(u16, String)> {
    let mut config =
        tls::client_config(bundle, cert, server.clone()).map_err(std::io::Error::other)?;
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    let conn = rustls::ClientConnection::new(Arc::new(config), tls::server_name(server))
        .map_err(std::io::Error::other)?;
    let tcp = std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(10))?;
    tcp.set_read_timeout(Some(Duration::from_secs(10)))?;
    let mut stream = rustls::StreamOwned::new(conn, tcp);
    stream.write_all(
        format!(
            "GET {path} HTTP/1.1\r\nhost: {}\r\nconnection: close\r\n\r\n",
            server.name
        )
        .as_bytes(),
    )?;
    let mut out = Vec::new();
    match stream.read_to_end(&mut out) {
        Ok(_) => {}
        // A peer that closes without close_notify after a whole answer.
        Err(e) if !out.is_empty() && e.kind() == std::io::ErrorKind::UnexpectedEof => {}
        Err(e) => return Err(e),
    }
    let text = String::from_utf8_lossy(&out).into_owned();
    let status = text
        .get(9..12)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| std::io::Error::other(format!("not an HTTP answer: {text:?}")))?;
    let body = text
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or_default();
    Ok((status, body))
}
