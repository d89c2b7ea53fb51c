//! One process of a local run: started in a process group of its own that gets SIGTERM if
//! `weir up` dies, its output prefixed, signalled by group, and checked for the port it
//! listens on. The `unsafe` code of `weir up` is here, each block with its reason.

use anyhow::{Context as _, Result, bail};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::Stdio;
use std::time::{Duration, Instant};
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};

/// A free TCP port on loopback for a local run: see [`weir_broker::local::free_port`].
pub fn free_port() -> Result<u16> {
    use weir_broker::local::PortSpan;
    match weir_broker::local::free_port(PortSpan::LocalRun) {
        Some(p) => Ok(p),
        None => bail!("no free port on 127.0.0.1 in {:?}", PortSpan::LocalRun),
    }
}

/// A command whose process gets SIGTERM when `weir up` dies, however it dies (even SIGKILL),
/// so no app, sidecar or broker outlives it. Each runs in a process group of its own: Ctrl-C
/// at the terminal reaches `weir up` alone, which then stops apps before their sidecars.
#[allow(
    unsafe_code,
    reason = "pre_exec: prctl(2) in the child, between fork and exec"
)]
pub(super) fn command(program: impl AsRef<std::ffi::OsStr>) -> Command {
    let mut c = Command::new(program);
    c.process_group(0);
    // SAFETY: prctl(2) is async-signal-safe; it only sets this child's parent-death signal.
    unsafe {
        c.pre_exec(|| {
            libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGTERM);
            Ok(())
        });
    }
    c
}

/// Finds a sibling binary: next to the running `weir`, then on PATH.
pub fn find_binary(name: &str) -> Option<PathBuf> {
    let exe = std::env::current_exe().ok()?;
    let sibling = exe.parent()?.join(name);
    if sibling.is_file() {
        return Some(sibling);
    }
    std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|p| p.join(name))
            .find(|p| p.is_file())
    })
}

/// The tasks forwarding children's output: `weir up` waits for them before it exits, so a
/// child's last lines (its "stopped") are printed, not lost with the process.
static FORWARDERS: std::sync::Mutex<Vec<tokio::task::JoinHandle<()>>> =
    std::sync::Mutex::new(Vec::new());

/// Writes `[label] line` and its newline with one write, flushed. `eprintln!` writes the pieces
/// of its format one by one to the unbuffered stderr, so when stdout and stderr go to one file a
/// line from another child could land between `[label]` and the rest (a CI run's log had
/// `[place-order-0/saga[users-0] … "stopped"`, and the line starting `[users-0]` was not found).
fn forward_line(to: &mut impl std::io::Write, label: &str, line: &str) {
    let whole = format!("[{label}] {line}\n");
    let _ = to.write_all(whole.as_bytes());
    let _ = to.flush();
}

/// Forwards a child's output line by line, each prefixed with `[label]`.
pub(super) fn prefix_output(child: &mut Child, label: String) {
    let mut tasks = Vec::new();
    if let Some(out) = child.stdout.take() {
        let l = label.clone();
        tasks.push(tokio::spawn(async move {
            let mut lines = BufReader::new(out).lines();
            while let Ok(Some(line)) = lines.next_line().await {
                forward_line(&mut std::io::stdout().lock(), &l, &line);
            }
        }));
    }
    if let Some(err) = child.stderr.take() {
        tasks.push(tokio::spawn(async move {
            let mut lines = BufReader::new(err).lines();
            while let Ok(Some(line)) = lines.next_line().await {
                forward_line(&mut std::io::stderr().lock(), &label, &line);
            }
        }));
    }
    let mut all = FORWARDERS.lock().unwrap_or_else(|e| e.into_inner());
    all.retain(|t| !t.is_finished());
    all.extend(tasks);
}

/// Waits, up to `limit`, until every child's output has been forwarded to its end (the children
/// have exited; their pipes close).
pub(super) async fn flush_output(limit: Duration) {
    let tasks = std::mem::take(&mut *FORWARDERS.lock().unwrap_or_else(|e| e.into_inner()));
    let _ = tokio::time::timeout(limit, futures::future::join_all(tasks)).await;
}

/// `GET http://addr/path` answering 200, with a short timeout.
pub async fn http_ok(addr: SocketAddr, path: &str) -> bool {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let attempt = async {
        let mut s = tokio::net::TcpStream::connect(addr).await.ok()?;
        s.write_all(
            format!("GET {path} HTTP/1.1\r\nhost: {addr}\r\nconnection: close\r\n\r\n").as_bytes(),
        )
        .await
        .ok()?;
        let mut buf = vec![0u8; 16];
        let n = s.read(&mut buf).await.ok()?;
        Some(buf[..n].starts_with(b"HTTP/1.1 200"))
    };
    tokio::time::timeout(Duration::from_secs(2), attempt)
        .await
        .ok()
        .flatten()
        .unwrap_or(false)
}

/// How a process is (re)started: the program, its arguments, env and directory.
#[derive(Debug, Clone)]
pub(crate) struct ProcSpec {
    pub(crate) label: String,
    pub(crate) kind: ProcKind,
    pub(crate) program: std::ffi::OsString,
    pub(crate) args: Vec<std::ffi::OsString>,
    pub(crate) env: Vec<(String, String)>,
    pub(crate) workdir: Option<PathBuf>,
    /// A broker's port: a restarted broker must listen on it again within the timeout, or
    /// the run ends (a broker that cannot come back leaves every sidecar without one).
    pub(crate) listens: Option<(u16, Duration)>,
}

/// Stop order: apps (and saga coordinators) first, then sidecars, then brokers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum ProcKind {
    App,
    Proxy,
    Broker,
}

impl ProcSpec {
    pub(crate) fn spawn(&self) -> Result<Child> {
        let mut c = command(&self.program);
        c.args(&self.args)
            .envs(self.env.iter().cloned())
            // Each process has a group of its own, off the terminal: reading it would stop it.
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true);
        if let Some(d) = &self.workdir {
            c.current_dir(d);
        }
        let mut child = c
            .spawn()
            .with_context(|| format!("start {} ({:?})", self.label, self.program))?;
        prefix_output(&mut child, self.label.clone());
        Ok(child)
    }
}

/// SIGKILL to what is left of an exited process's group: children it started (the Erlang VM
/// of rabbitmq-server's start script, an app's workers) would otherwise keep its ports, and
/// its restart could not listen on them. Each process leads its own group (see [`command`]).
pub(super) fn kill_group(pid: Option<u32>) {
    if let Some(pid) = pid.and_then(|p| i32::try_from(p).ok()) {
        // The group of a child we started; ESRCH when it is empty.
        signal(-pid, libc::SIGKILL);
    }
}

/// Sends `sig` to `pid`, or to the process group `-pid`.
#[allow(
    unsafe_code,
    reason = "kill(2) to a process group, which std cannot signal"
)]
fn signal(pid: i32, sig: libc::c_int) {
    // SAFETY: kill(2) reads no memory of ours; callers pass a pid (or group) they started.
    unsafe {
        libc::kill(pid, sig);
    }
}

/// One supervised process.
pub(super) struct Proc {
    pub(super) spec: ProcSpec,
    pub(super) child: Option<Child>,
    /// The pid of the last start: its process group outlives the child's reaping.
    pub(super) pid: Option<u32>,
    pub(super) started: Instant,
    pub(super) restarts: u32,
    /// When a process that exited is started again.
    pub(super) restart_at: Option<Instant>,
    /// A restarted broker not yet listening on its port: the deadline for it to.
    pub(super) listen_by: Option<Instant>,
}

impl Proc {
    pub(super) fn new(spec: ProcSpec, child: Child) -> Proc {
        Proc {
            pid: child.id(),
            spec,
            child: Some(child),
            started: Instant::now(),
            restarts: 0,
            restart_at: None,
            listen_by: None,
        }
    }
}

/// Restart delay after the `n`th consecutive crash: 500ms doubling to 10s, as a kubelet backs
/// off a crashing container (reset once a process has run for a minute).
pub(super) fn restart_delay(n: u32) -> Duration {
    Duration::from_millis(500u64.saturating_mul(1 << n.min(5))).min(Duration::from_secs(10))
}

pub(super) async fn wait_until<F, Fut>(what: &str, timeout: Duration, mut check: F) -> Result<()>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let start = Instant::now();
    while !check().await {
        if start.elapsed() > timeout {
            bail!("timed out after {timeout:?} waiting for {what}");
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    Ok(())
}

/// Whether a process of the group `pgid` listens on TCP `port`, read from /proc: a connection
/// accepted on the port would not tell, as another program may have taken the port while the
/// broker was down (the broker then exits at once, and must not be taken as back).
pub(super) fn group_listens(pgid: u32, port: u16) -> bool {
    let inodes = listening_sockets(port);
    if inodes.is_empty() {
        return false;
    }
    let Ok(procs) = std::fs::read_dir("/proc") else {
        return false;
    };
    for p in procs.flatten() {
        let Some(pid) = p.file_name().to_str().and_then(|s| s.parse::<u32>().ok()) else {
            continue;
        };
        let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
            continue;
        };
        // `pid (comm) state ppid pgrp ...`; the command name may hold spaces and parentheses.
        let pgrp = stat
            .rsplit_once(')')
            .and_then(|(_, rest)| rest.split_whitespace().nth(2)?.parse::<u32>().ok());
        if pgrp != Some(pgid) {
            continue;
        }
        let Ok(fds) = std::fs::read_dir(format!("/proc/{pid}/fd")) else {
            continue;
        };
        for fd in fds.flatten() {
            if let Ok(link) = std::fs::read_link(fd.path())
                && let Some(inode) = link
                    .to_str()
                    .and_then(|l| l.strip_prefix("socket:["))
                    .and_then(|l| l.strip_suffix(']'))
                && inodes.iter().any(|i| i == inode)
            {
                return true;
            }
        }
    }
    false
}

/// The inodes of the TCP sockets listening on `port` (any address), from /proc/net/tcp{,6}.
pub(super) fn listening_sockets(port: u16) -> Vec<String> {
    const LISTEN: &str = "0A";
    let mut out = Vec::new();
    for table in ["/proc/net/tcp", "/proc/net/tcp6"] {
        let Ok(text) = std::fs::read_to_string(table) else {
            continue;
        };
        // `sl local_address rem_address st tx:rx tr:when retrnsmt uid timeout inode ...`
        for line in text.lines().skip(1) {
            let f: Vec<&str> = line.split_whitespace().collect();
            let local_port = f
                .get(1)
                .and_then(|a| a.rsplit_once(':'))
                .and_then(|(_, p)| u16::from_str_radix(p, 16).ok());
            if f.len() > 9 && f[3] == LISTEN && local_port == Some(port) {
                out.push(f[9].to_string());
            }
        }
    }
    out
}

/// Whether `c` exits by `deadline`, polled: for when waiting on it failed.
async fn exits_by(c: &mut Child, deadline: Instant) -> bool {
    loop {
        match c.try_wait() {
            Ok(Some(_)) => return true,
            // The pid is gone (reaped elsewhere): nothing is left to wait for.
            Err(_) => return true,
            Ok(None) if Instant::now() >= deadline => return false,
            Ok(None) => tokio::time::sleep(Duration::from_millis(20)).await,
        }
    }
}

pub(super) async fn stop_all(children: &mut Vec<(String, Child)>, grace: Duration) {
    for (_, c) in children.iter() {
        if let Some(pid) = c.id() {
            // A child we started and have not reaped.
            if let Ok(pid) = i32::try_from(pid) {
                signal(pid, libc::SIGTERM);
            }
        }
    }
    let deadline = Instant::now() + grace;
    for (name, c) in children.iter_mut() {
        let pid = c.id();
        let left = deadline.saturating_duration_since(Instant::now());
        match tokio::time::timeout(left, c.wait()).await {
            Ok(Ok(_)) => {}
            Ok(Err(e)) => {
                // Not known to exit: poll for it rather than kill a process still finishing
                // its in-flight requests.
                eprintln!("weir up: waiting for {name} failed ({e}); polling for its exit");
                if !exits_by(c, deadline).await {
                    eprintln!("weir up: {name} did not stop within {grace:?}; killing it");
                    let _ = c.kill().await;
                }
            }
            Err(_) => {
                eprintln!("weir up: {name} did not stop within {grace:?}; killing it");
                let _ = c.kill().await;
            }
        }
        kill_group(pid);
    }
    children.clear();
}
