//! A real `nats-server` with JetStream on a free loopback port, started and killed by a test.
//!
//! Std only, so other crates' tests can include this file as it is
//! (`#[path = "../../operator/src/testing/nats_server.rs"] mod nats_server;`) without depending
//! on the operator. The binary is found on `PATH`, else in `<workspace>/.tools/bin` (installed by
//! `scripts/setup.sh`), or at `$NATS_SERVER`.
#![allow(dead_code)]

use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// A running `nats-server -js`; killed (SIGKILL) on drop. Its store outlives restarts.
pub struct NatsServer {
    child: Option<Child>,
    pub port: u16,
    store: PathBuf,
    _tmp: Option<TempDir>,
    extra: Vec<String>,
}

/// A directory removed on drop (no dependency on the `tempfile` crate).
struct TempDir(PathBuf);

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Path of the `nats-server` binary, or `None` when it is not installed.
pub fn binary() -> Option<PathBuf> {
    if let Some(p) = std::env::var_os("NATS_SERVER") {
        return Some(PathBuf::from(p));
    }
    if let Some(paths) = std::env::var_os("PATH") {
        for dir in std::env::split_paths(&paths) {
            let p = dir.join("nats-server");
            if p.is_file() {
                return Some(p);
            }
        }
    }
    // Walk up from the current directory (tests run in their crate's directory) to a
    // `.tools/bin/nats-server`.
    let mut dir = std::env::current_dir().ok();
    while let Some(d) = dir {
        let p = d.join(".tools/bin/nats-server");
        if p.is_file() {
            return Some(p);
        }
        dir = d.parent().map(Path::to_path_buf);
    }
    None
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free loopback port")
}

impl NatsServer {
    /// Starts a server with JetStream on a fresh store; panics with a hint when the binary is
    /// missing (run `scripts/setup.sh`).
    pub fn start() -> Self {
        Self::start_with(&[])
    }

    /// Like [`start`](Self::start) with extra arguments, e.g. `["--user", "u", "--pass", "p"]`.
    pub fn start_with(extra: &[&str]) -> Self {
        let unique = format!(
            "weir-nats-{}-{}",
            std::process::id(),
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_nanos())
                .unwrap_or(0)
        );
        let store = std::env::temp_dir().join(unique);
        std::fs::create_dir_all(&store).expect("create the JetStream store directory");
        let mut s = Self {
            child: None,
            port: free_port(),
            store: store.clone(),
            _tmp: Some(TempDir(store)),
            extra: extra.iter().map(|s| s.to_string()).collect(),
        };
        s.spawn();
        s
    }

    fn spawn(&mut self) {
        let bin = binary().expect(
            "nats-server not found (PATH, .tools/bin or $NATS_SERVER): run scripts/setup.sh",
        );
        let mut child = Command::new(&bin)
            .args(["-js", "-a", "127.0.0.1", "-p"])
            .arg(self.port.to_string())
            .arg("-sd")
            .arg(&self.store)
            .args(&self.extra)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {}: {e}", bin.display()));
        // The server logs "Server is ready" once JetStream has started (and recovered its store)
        // and the client port listens. The log is drained until the process ends.
        let stderr = child.stderr.take().expect("piped stderr");
        let (ready_tx, ready_rx) = std::sync::mpsc::channel();
        let log = std::sync::Arc::new(std::sync::Mutex::new(Vec::<String>::new()));
        let log2 = log.clone();
        std::thread::spawn(move || {
            use std::io::BufRead;
            for line in std::io::BufReader::new(stderr)
                .lines()
                .map_while(Result::ok)
            {
                if line.contains("Server is ready") {
                    let _ = ready_tx.send(());
                }
                let mut l = log2.lock().unwrap_or_else(|e| e.into_inner());
                if l.len() < 200 {
                    l.push(line);
                }
            }
        });
        self.child = Some(child);
        self.wait_ready(ready_rx, log);
    }

    fn wait_ready(
        &mut self,
        ready: std::sync::mpsc::Receiver<()>,
        log: std::sync::Arc<std::sync::Mutex<Vec<String>>>,
    ) {
        let deadline = Instant::now() + Duration::from_secs(20);
        let addr = self.addr();
        while Instant::now() < deadline {
            if ready.recv_timeout(Duration::from_millis(50)).is_ok()
                && TcpStream::connect_timeout(&addr, Duration::from_millis(500)).is_ok()
            {
                return;
            }
            if let Some(c) = self.child.as_mut()
                && let Ok(Some(status)) = c.try_wait()
            {
                std::thread::sleep(Duration::from_millis(50));
                let log = log.lock().unwrap_or_else(|e| e.into_inner()).join("\n");
                panic!("nats-server exited at start: {status}\n{log}");
            }
        }
        let log = log.lock().unwrap_or_else(|e| e.into_inner()).join("\n");
        panic!("nats-server was not ready on {addr} within 20s\n{log}");
    }

    pub fn addr(&self) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], self.port))
    }

    /// `nats://127.0.0.1:<port>`.
    pub fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.port)
    }

    /// Process id of the running server.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// SIGKILL, as a crash would: nothing is flushed beyond what the store already has.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Starts the server again on the same port and store (after [`kill`](Self::kill)).
    pub fn restart(&mut self) {
        self.kill();
        self.spawn();
    }
}

impl Drop for NatsServer {
    fn drop(&mut self) {
        self.kill();
    }
}
