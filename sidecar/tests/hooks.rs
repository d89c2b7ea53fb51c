//! `weir-proxy await` and `weir-proxy drain`, the lifecycle hooks of the proxy container on
//! clusters without native sidecars, through the real binary.

use std::net::TcpListener;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};
use weir_testkit::free_port;

fn config(dir: &std::path::Path, app: u16, admin: u16) -> std::path::PathBuf {
    let cfg = serde_json::json!({
        "service": "hooks", "namespace": "test",
        "inbound": {"listen": format!("127.0.0.1:{}", free_port()), "app": format!("127.0.0.1:{app}"), "timeoutMs": 1000, "maxBodyBytes": 1024},
        "admin": {"listen": format!("0.0.0.0:{admin}")},
        "shutdownGraceMs": 20000
    });
    let path = dir.join("proxy.json");
    std::fs::write(&path, cfg.to_string()).unwrap();
    path
}

#[test]
fn await_blocks_until_the_proxy_is_ready() {
    let dir = tempfile::tempdir().unwrap();
    let (app, admin) = (free_port(), free_port());
    let path = config(dir.path(), app, admin);
    let bin = env!("CARGO_BIN_EXE_weir-proxy");

    // No proxy yet: await gives up at its timeout, failing the hook.
    let start = Instant::now();
    let st = Command::new(bin)
        .args([
            "await",
            "--config",
            path.to_str().unwrap(),
            "--timeout",
            "1s",
        ])
        .status()
        .unwrap();
    assert!(!st.success());
    assert!(start.elapsed() >= Duration::from_secs(1));

    // Proxy starting: await returns once /readyz answers 200.
    let mut proxy = Command::new(bin)
        .args(["--config", path.to_str().unwrap()])
        .stdout(Stdio::null())
        .spawn()
        .unwrap();
    let st = Command::new(bin)
        .args([
            "await",
            "--config",
            path.to_str().unwrap(),
            "--timeout",
            "30s",
        ])
        .status()
        .unwrap();
    let _ = proxy.kill();
    let _ = proxy.wait();
    assert!(st.success());
}

#[test]
fn drain_returns_once_the_app_stops_listening() {
    let dir = tempfile::tempdir().unwrap();
    let app = TcpListener::bind("127.0.0.1:0").unwrap();
    let path = config(dir.path(), app.local_addr().unwrap().port(), free_port());
    let mut drain = Command::new(env!("CARGO_BIN_EXE_weir-proxy"))
        .args(["drain", "--config", path.to_str().unwrap()])
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_millis(800));
    assert!(
        drain.try_wait().unwrap().is_none(),
        "drain must wait while the app still listens"
    );
    drop(app);
    let start = Instant::now();
    let st = loop {
        if let Some(st) = drain.try_wait().unwrap() {
            break st;
        }
        assert!(
            start.elapsed() < Duration::from_secs(5),
            "drain did not notice the app stopped"
        );
        std::thread::sleep(Duration::from_millis(50));
    };
    assert!(st.success());
}
