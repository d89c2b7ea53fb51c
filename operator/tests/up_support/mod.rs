//! Helpers of the `weir up` suites: the real `weir` binary run on a directory of manifests, its
//! state file and its output, and plain HTTP/1.1 calls to the services it runs. Needs
//! `cargo build --workspace --bins` (the sidecar and the example apps) and scripts/setup.sh
//! (the brokers).
#![allow(dead_code)]

use serde_json::Value;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

pub fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// `target/debug`, after checking that the binaries `weir up` runs are built.
pub fn target() -> PathBuf {
    let target = root().join("target/debug");
    for bin in ["weir-proxy", "weir-echo"] {
        assert!(
            target.join(bin).is_file(),
            "{bin} not built: run `cargo build --workspace --bins` first"
        );
    }
    target
}

/// `PATH` for `weir up`: the built binaries, then .tools/bin (nats-server), then the inherited.
pub fn path() -> String {
    format!(
        "{}:{}:{}",
        target().display(),
        root().join(".tools/bin").display(),
        std::env::var("PATH").unwrap_or_default()
    )
}

/// One request on a fresh connection: status and body.
pub fn request(port: u16, method: &str, path: &str, body: &str) -> (u16, String) {
    request_with(port, method, path, body, &[])
}

/// [`request`] with extra headers.
pub fn request_with(
    port: u16,
    method: &str,
    path: &str,
    body: &str,
    headers: &[(&str, &str)],
) -> (u16, String) {
    let Ok(mut s) = TcpStream::connect(("127.0.0.1", port)) else {
        return (0, String::new());
    };
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let mut head = format!(
        "{method} {path} HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n",
        body.len()
    );
    for (k, v) in headers {
        head.push_str(&format!("{k}: {v}\r\n"));
    }
    let _ = write!(s, "{head}\r\n{body}");
    let mut out = String::new();
    let _ = s.read_to_string(&mut out);
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

/// Polls `f` every 200 ms until it gives a value; panics after `timeout` naming `what`.
pub fn wait_for<T>(what: &str, timeout: Duration, mut f: impl FnMut() -> Option<T>) -> T {
    let start = Instant::now();
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(
            start.elapsed() < timeout,
            "timed out after {timeout:?} waiting for {what}"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// SIGKILL to one process.
#[allow(
    unsafe_code,
    reason = "kill(2) to a pid from a state file, not a Child of ours"
)]
pub fn kill9(pid: u64) {
    // SAFETY: kill(2) with a pid read from the state file of the run under test.
    assert_eq!(
        unsafe { libc::kill(pid as i32, libc::SIGKILL) },
        0,
        "kill -9 {pid}"
    );
}

/// A `weir up` run: its output (stdout and stderr) goes to a log file; SIGKILLed when dropped.
pub struct Up {
    child: Child,
    pub state_file: PathBuf,
    log_file: PathBuf,
    pub dir: tempfile::TempDir,
}

impl Up {
    /// `weir up ARGS --state-file … --work-dir …` in the repository's root, ready once the
    /// state file is written (within `timeout`).
    pub fn start(args: &[&str], timeout: Duration) -> Up {
        let dir = tempfile::tempdir().unwrap();
        let state_file = dir.path().join("state.json");
        let log_file = dir.path().join("up.log");
        let log = std::fs::File::create(&log_file).unwrap();
        let child = Command::new(env!("CARGO_BIN_EXE_weir"))
            .arg("up")
            .args(args)
            .arg("--state-file")
            .arg(&state_file)
            .arg("--work-dir")
            .arg(dir.path().join("work"))
            .current_dir(root())
            .env("PATH", path())
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .unwrap();
        let mut up = Up {
            child,
            state_file,
            log_file,
            dir,
        };
        let start = Instant::now();
        while !up.state_file.exists() {
            if let Ok(Some(st)) = up.child.try_wait() {
                panic!("weir up exited early: {st}\n{}", up.log());
            }
            assert!(
                start.elapsed() < timeout,
                "weir up not ready after {timeout:?}\n{}",
                up.log()
            );
            std::thread::sleep(Duration::from_millis(200));
        }
        up
    }

    pub fn state(&self) -> Value {
        serde_json::from_str(&std::fs::read_to_string(&self.state_file).unwrap()).unwrap()
    }

    /// The inbound port (the URL through its sidecar) of a service or replica (`mailer-1`).
    pub fn port(&self, service: &str) -> u16 {
        self.state()["services"][service]["inbound"]
            .as_u64()
            .unwrap_or_else(|| panic!("no service {service} in the state file")) as u16
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log_file).unwrap_or_default()
    }

    /// [`wait_for`], showing the end of the run's log when it times out.
    pub fn until<T>(&self, what: &str, timeout: Duration, mut f: impl FnMut() -> Option<T>) -> T {
        let start = Instant::now();
        loop {
            if let Some(v) = f() {
                return v;
            }
            if start.elapsed() > timeout {
                let log = self.log();
                let lines: Vec<&str> = log.lines().collect();
                panic!(
                    "timed out after {timeout:?} waiting for {what}; the log ends with:\n{}",
                    lines[lines.len().saturating_sub(80)..].join("\n")
                );
            }
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Waits for `weir up` to exit by itself.
    pub fn wait_exit(&mut self, timeout: Duration) -> ExitStatus {
        let start = Instant::now();
        loop {
            if let Some(st) = self.child.try_wait().unwrap() {
                return st;
            }
            assert!(
                start.elapsed() < timeout,
                "weir up did not exit within {timeout:?}\n{}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// SIGTERM, then waits for it to stop everything and exit.
    #[allow(
        unsafe_code,
        reason = "kill(2) for SIGTERM: Child::kill sends only SIGKILL"
    )]
    pub fn terminate(&mut self) -> ExitStatus {
        // SAFETY: kill(2) on the child this test started.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        self.wait_exit(Duration::from_secs(60))
    }
}

impl Drop for Up {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The events a weir-echo app received (`GET /received` through its sidecar).
pub fn received(port: u16) -> Vec<Value> {
    let (_, body) = request(port, "GET", "/received", "");
    serde_json::from_str::<Value>(&body)
        .ok()
        .and_then(|v| v["events"].as_array().cloned())
        .unwrap_or_default()
}

/// Publishes a signup through `accounts` (examples/events), retrying while its sidecar has no
/// broker connection (503), until it is accepted.
pub fn publish_signup(up: &Up, user: &str, timeout: Duration) {
    let accounts = up.port("accounts");
    let body = format!(r#"{{"userId": "{user}", "email": "{user}@example.com"}}"#);
    up.until(&format!("the signup of {user} accepted"), timeout, || {
        let (st, _) = request(accounts, "POST", "/publish/signups", &body);
        (st == 202).then_some(())
    });
}
