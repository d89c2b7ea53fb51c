//! `weir up --broker redis|rabbitmq` through the real binary: examples/events on a local
//! redis-server and rabbitmq-server (Debian's, started by `weir up` on free ports), the same
//! checks as `up_cli.rs` does on nats-server: an event through one sidecar to the broker and
//! through the other to the consuming app, a bad one refused with 422, SIGTERM stops everything
//! (the broker last). Needs `cargo build --workspace --bins` and scripts/setup.sh.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn request(port: u16, method: &str, path: &str, body: &str) -> (u16, String) {
    let mut s = TcpStream::connect(("127.0.0.1", port)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    write!(s, "{method} {path} HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}", body.len()).unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).unwrap();
    let status = out
        .split(' ')
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    (
        status,
        out.split_once("\r\n\r\n")
            .map(|x| x.1.to_string())
            .unwrap_or_default(),
    )
}

#[test]
fn events_example_on_redis() {
    events_example("redis", "redis://127.0.0.1:");
}

#[test]
fn events_example_on_rabbitmq() {
    events_example("rabbitmq", "amqp://127.0.0.1:");
}

fn events_example(broker: &str, scheme: &str) {
    let target = root().join("target/debug");
    for bin in ["weir-proxy", "weir-echo"] {
        assert!(
            target.join(bin).is_file(),
            "{bin} not built: run `cargo build --workspace --bins` first"
        );
    }
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state.json");
    let path = format!(
        "{}:{}:{}",
        target.display(),
        root().join(".tools/bin").display(),
        std::env::var("PATH").unwrap_or_default()
    );
    let mut up = Command::new(env!("CARGO_BIN_EXE_weir"))
        .args([
            "up",
            "-f",
            "examples/events",
            "--broker",
            broker,
            "--state-file",
        ])
        .arg(&state)
        .arg("--work-dir")
        .arg(dir.path().join("work"))
        .current_dir(root())
        .env("PATH", path)
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap();
    let start = Instant::now();
    while !state.exists() {
        if let Ok(Some(st)) = up.try_wait() {
            panic!("weir up exited early: {st}");
        }
        assert!(
            start.elapsed() < Duration::from_secs(120),
            "weir up not ready after 120s"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    let s: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&state).unwrap()).unwrap();
    let port = |svc: &str| s["services"][svc]["inbound"].as_u64().unwrap() as u16;
    assert!(s["brokerUrl"].as_str().unwrap().starts_with(scheme));

    let (st, body) = request(
        port("accounts"),
        "POST",
        "/publish/signups",
        r#"{"userId": "u1", "email": "a@example.com"}"#,
    );
    assert_eq!(st, 202, "{body}");
    let (st, body) = request(
        port("accounts"),
        "POST",
        "/publish/signups",
        r#"{"userId": "u2"}"#,
    );
    assert_eq!(st, 422, "{body}");
    assert!(body.contains("email"), "{body}");

    let start = Instant::now();
    let received = loop {
        let (_, body) = request(port("mailer"), "GET", "/received", "");
        let v: serde_json::Value = serde_json::from_str(&body).unwrap();
        let events = v["events"].as_array().cloned().unwrap_or_default();
        if !events.is_empty() || start.elapsed() > Duration::from_secs(10) {
            break events;
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    assert_eq!(
        received.len(),
        1,
        "exactly the valid event reaches mailer: {received:?}"
    );
    assert_eq!(received[0]["data"]["userId"], "u1");
    assert_eq!(received[0]["type"], "UserSignedUp");
    assert!(
        start.elapsed() < Duration::from_secs(3),
        "delivered promptly, took {:?}",
        start.elapsed()
    );

    // SIGTERM: apps, then sidecars, then the broker stop; weir up exits 0.
    unsafe { libc::kill(up.id() as i32, libc::SIGTERM) };
    let start = Instant::now();
    let st = loop {
        if let Some(st) = up.try_wait().unwrap() {
            break st;
        }
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "weir up did not stop"
        );
        std::thread::sleep(Duration::from_millis(100));
    };
    assert!(st.success(), "{st}");
}
