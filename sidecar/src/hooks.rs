//! Pod lifecycle hooks for clusters without native sidecars (Kubernetes < 1.29), where the
//! proxy is a plain container:
//!
//! - `weir-proxy await`: the proxy container's `postStart` hook. The kubelet starts containers
//!   in order and waits for each postStart hook, so blocking here until the proxy is ready keeps
//!   the app from starting (and calling its dependencies) before its proxy can take the calls.
//! - `weir-proxy drain`: the proxy container's `preStop` hook. The kubelet signals every
//!   container at once; blocking here until the app has stopped accepting connections keeps the
//!   proxy serving the app's in-flight calls while the app drains.
//!
//! Both read the same config file as the proxy, to find its admin and app addresses.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::Path;
use std::process::ExitCode;
use std::time::{Duration, Instant};

/// Which hook, from the first argument.
pub fn hook_of(arg: Option<&str>) -> Option<Hook> {
    match arg {
        Some("await") => Some(Hook::Await),
        Some("drain") => Some(Hook::Drain),
        _ => None,
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Hook {
    Await,
    Drain,
}

/// Runs a hook with its arguments (`--config PATH`, `--timeout 60s`).
pub fn run(hook: Hook, args: &[String]) -> ExitCode {
    let mut config = crate::config::default_config_path();
    let mut timeout = None;
    let mut it = args.iter();
    while let Some(a) = it.next() {
        match (a.as_str(), it.next()) {
            ("--config", Some(v)) => config = v.into(),
            ("--timeout", Some(v)) => match weir_crds::duration::parse(v) {
                Ok(d) => timeout = Some(d),
                Err(e) => {
                    eprintln!("weir-proxy: --timeout: {e}");
                    return ExitCode::from(2);
                }
            },
            _ => {
                eprintln!("weir-proxy {hook:?}: usage: --config PATH [--timeout DURATION]");
                return ExitCode::from(2);
            }
        }
    }
    let cfg = match crate::config::load(Path::new(&config)) {
        Ok((c, _)) => c,
        Err(e) => {
            eprintln!(
                "weir-proxy: invalid config {}: {}: {}",
                config.display(),
                e.field,
                e.message
            );
            return ExitCode::from(2);
        }
    };
    let admin = loopback(cfg.admin.listen);
    match hook {
        Hook::Await => {
            let limit = timeout.unwrap_or(Duration::from_secs(120));
            if wait(limit, || get_status(admin, "/readyz") == Some(200)) {
                ExitCode::SUCCESS
            } else {
                eprintln!("weir-proxy await: not ready after {limit:?}");
                ExitCode::FAILURE
            }
        }
        Hook::Drain => {
            let limit = timeout.unwrap_or(Duration::from_millis(cfg.shutdown_grace_ms));
            // Done when the app refuses connections (it stopped listening), or at the limit:
            // the kubelet's grace period ends the pod either way.
            wait(limit, || {
                TcpStream::connect_timeout(&cfg.inbound.app, Duration::from_millis(500)).is_err()
            });
            ExitCode::SUCCESS
        }
    }
}

/// The admin listener as reached from inside the pod (`0.0.0.0` means any, so loopback).
fn loopback(addr: SocketAddr) -> SocketAddr {
    if addr.ip().is_unspecified() {
        SocketAddr::from(([127, 0, 0, 1], addr.port()))
    } else {
        addr
    }
}

fn wait(limit: Duration, mut done: impl FnMut() -> bool) -> bool {
    let start = Instant::now();
    loop {
        if done() {
            return true;
        }
        if start.elapsed() >= limit {
            return false;
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// Status code of `GET path`, or `None` when the proxy does not answer.
fn get_status(addr: SocketAddr, path: &str) -> Option<u16> {
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(1)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(2))).ok()?;
    // One write: `write!` would send the pieces of the format one by one, and a peer that
    // answers on the first piece and closes resets the connection under the answer.
    let request = format!("GET {path} HTTP/1.1\r\nhost: weir-proxy\r\nconnection: close\r\n\r\n");
    s.write_all(request.as_bytes()).ok()?;
    let mut buf = [0u8; 32];
    let n = s.read(&mut buf).ok()?;
    let line = std::str::from_utf8(&buf[..n]).ok()?;
    line.split(' ').nth(1)?.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hooks_are_recognised_by_name() {
        assert_eq!(hook_of(Some("await")), Some(Hook::Await));
        assert_eq!(hook_of(Some("drain")), Some(Hook::Drain));
        assert_eq!(hook_of(Some("--config")), None);
        assert_eq!(hook_of(None), None);
    }

    #[test]
    fn unspecified_admin_address_is_reached_on_loopback() {
        assert_eq!(
            loopback("0.0.0.0:15090".parse().unwrap()),
            "127.0.0.1:15090".parse().unwrap()
        );
        assert_eq!(
            loopback("127.0.0.2:1".parse().unwrap()),
            "127.0.0.2:1".parse().unwrap()
        );
    }

    #[test]
    fn status_of_a_real_listener() {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap();
        std::thread::spawn(move || {
            let (mut c, _) = l.accept().unwrap();
            // The whole request, as a server reads it, before the answer.
            let mut got = Vec::new();
            let mut buf = [0u8; 256];
            while !got.windows(4).any(|w| w == b"\r\n\r\n") {
                match c.read(&mut buf) {
                    Ok(0) | Err(_) => break,
                    Ok(n) => got.extend_from_slice(&buf[..n]),
                }
            }
            c.write_all(b"HTTP/1.1 503 Service Unavailable\r\ncontent-length: 0\r\n\r\n")
                .unwrap();
        });
        assert_eq!(get_status(addr, "/readyz"), Some(503));
        assert_eq!(get_status("127.0.0.1:1".parse().unwrap(), "/readyz"), None);
    }
}
