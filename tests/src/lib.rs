//! Shared helpers of the end-to-end suites in `tests/tests/` (see tests/README.md).

pub mod typos;

use anyhow::{Result, bail};
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant};

/// Whether the suites run (`WEIR_E2E=1`); says plainly that they skip otherwise.
pub fn enabled(suite: &str) -> bool {
    if std::env::var("WEIR_E2E").as_deref() == Ok("1") {
        return true;
    }
    eprintln!(
        "SKIPPED {suite}: it needs a cluster: set WEIR_E2E=1 and KUBECONFIG (see tests/README.md)"
    );
    false
}

pub fn env_or(name: &str, default: &str) -> String {
    std::env::var(name).unwrap_or_else(|_| default.to_string())
}

/// Polls `f` until it returns `Some`, or fails after `timeout` naming what it waited for.
pub async fn wait_for<T, F, Fut>(what: &str, timeout: Duration, mut f: F) -> Result<T>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<Option<T>>>,
{
    let start = Instant::now();
    let mut last_err = None;
    loop {
        match f().await {
            Ok(Some(v)) => {
                eprintln!("  ok: {what} ({:.1}s)", start.elapsed().as_secs_f64());
                return Ok(v);
            }
            Ok(None) => {}
            Err(e) => last_err = Some(e),
        }
        if start.elapsed() > timeout {
            bail!("timed out after {timeout:?} waiting for {what} (last error: {last_err:?})");
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

/// `GET path` over plain HTTP/1.1: (status, body). For test traffic to this cluster's pods and
/// Services only.
pub fn http_get(addr: SocketAddr, path: &str) -> Result<(u16, String)> {
    http_request(addr, "GET", path, None)
}

/// `POST path` with a JSON body; as [`http_get`].
pub fn http_post(addr: SocketAddr, path: &str, json: &str) -> Result<(u16, String)> {
    http_request(addr, "POST", path, Some(json))
}

fn http_request(
    addr: SocketAddr,
    method: &str,
    path: &str,
    json: Option<&str>,
) -> Result<(u16, String)> {
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(3))?;
    s.set_read_timeout(Some(Duration::from_secs(10)))?;
    let body = json.unwrap_or_default();
    let head = if json.is_some() {
        format!(
            "content-type: application/json\r\ncontent-length: {}\r\n",
            body.len()
        )
    } else {
        String::new()
    };
    write!(
        s,
        "{method} {path} HTTP/1.1\r\nhost: {addr}\r\n{head}connection: close\r\n\r\n{body}"
    )?;
    let mut raw = Vec::new();
    s.read_to_end(&mut raw)?;
    let text = String::from_utf8_lossy(&raw).to_string();
    let status = text
        .split(' ')
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    let body = text
        .split_once("\r\n\r\n")
        .map(|x| x.1.to_string())
        .unwrap_or_default();
    Ok((status, body))
}

/// The value of a Prometheus sample (`name{labels} value`) in a metrics text, if present.
pub fn metric(text: &str, sample: &str) -> Option<f64> {
    text.lines().find_map(|l| {
        l.strip_prefix(sample)
            .and_then(|rest| rest.trim().parse().ok())
    })
}
