//! Real `redis-server` and `rabbitmq-server` processes on free loopback ports, started and
//! killed by a test, each with its own data directory (persistence on: Redis appends every
//! write to its AOF with `fsync always`; RabbitMQ keeps its database in its directory). Std only,
//! like [`super::nats_server`]. The binaries come from Debian's `redis-server` and
//! `rabbitmq-server` packages (`scripts/setup.sh`), or `$REDIS_SERVER` / `$RABBITMQ_SERVER`.
#![allow(dead_code)]

use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free loopback port")
}

fn temp_dir(prefix: &str) -> PathBuf {
    let unique = format!(
        "{prefix}-{}-{}",
        std::process::id(),
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(0)
    );
    let d = std::env::temp_dir().join(unique);
    std::fs::create_dir_all(&d).expect("create a temporary directory");
    d
}

fn find(env: &str, candidates: &[&str]) -> Option<PathBuf> {
    if let Some(p) = std::env::var_os(env) {
        return Some(PathBuf::from(p));
    }
    for c in candidates {
        let p = Path::new(c);
        if p.is_absolute() {
            if p.is_file() {
                return Some(p.to_path_buf());
            }
            continue;
        }
        if let Some(paths) = std::env::var_os("PATH") {
            for dir in std::env::split_paths(&paths) {
                let p = dir.join(c);
                if p.is_file() {
                    return Some(p);
                }
            }
        }
    }
    None
}

/// `redis-server`, or `None` when it is not installed.
pub fn redis_binary() -> Option<PathBuf> {
    find("REDIS_SERVER", &["redis-server", "/usr/bin/redis-server"])
}

/// RabbitMQ's start script (not Debian's wrapper, which switches to the `rabbitmq` user).
pub fn rabbitmq_binary() -> Option<PathBuf> {
    find(
        "RABBITMQ_SERVER",
        &["/usr/lib/rabbitmq/bin/rabbitmq-server"],
    )
}

fn wait_port(port: u16, timeout: Duration, child: &mut Child, what: &str) {
    let addr = SocketAddr::from(([127, 0, 0, 1], port));
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        if TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_ok() {
            return;
        }
        if let Ok(Some(status)) = child.try_wait() {
            panic!("{what} exited at start: {status}");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    panic!("{what} did not listen on {addr} within {timeout:?}");
}

/// A running `redis-server`; killed (SIGKILL) on drop. Its directory outlives restarts.
pub struct RedisServer {
    child: Option<Child>,
    pub port: u16,
    pub dir: PathBuf,
    bin: PathBuf,
    owns_dir: bool,
    extra: Vec<String>,
}

impl RedisServer {
    /// Starts a server with an append-only file fsynced at every write; panics with a hint
    /// when the binary is missing.
    pub fn start() -> Self {
        Self::start_with(&[])
    }

    /// With extra arguments (e.g. a TLS port beside the plain one).
    pub fn start_with(extra: &[String]) -> Self {
        let bin = redis_binary().expect("redis-server not found: run scripts/setup.sh");
        let mut s = Self {
            child: None,
            port: free_port(),
            dir: temp_dir("weir-redis"),
            bin,
            owns_dir: true,
            extra: extra.to_vec(),
        };
        s.spawn();
        s
    }

    /// Starts `bin` on `port` with its data in `dir` (what `weir up` runs).
    pub fn start_in(bin: PathBuf, port: u16, dir: PathBuf) -> Self {
        let mut s = Self {
            child: None,
            port,
            dir,
            bin,
            owns_dir: false,
            extra: vec![],
        };
        s.spawn();
        s
    }

    /// The command line, for `weir up` to run under its own supervision.
    pub fn command(bin: &Path, port: u16, dir: &Path) -> Command {
        let mut c = Command::new(bin);
        c.args(["--port", &port.to_string(), "--bind", "127.0.0.1"])
            .arg("--dir")
            .arg(dir)
            .args([
                "--appendonly",
                "yes",
                "--appendfsync",
                "always",
                "--save",
                "",
            ])
            .args(["--daemonize", "no", "--protected-mode", "no"]);
        c
    }

    fn spawn(&mut self) {
        let mut child = Self::command(&self.bin, self.port, &self.dir)
            .args(&self.extra)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {}: {e}", self.bin.display()));
        wait_port(
            self.port,
            Duration::from_secs(20),
            &mut child,
            "redis-server",
        );
        self.child = Some(child);
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    pub fn restart(&mut self) {
        self.kill();
        self.spawn();
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        self.kill();
        if self.owns_dir {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }
}

/// A running `rabbitmq-server` with its own epmd, node name, cookie (in a HOME of its own),
/// database and log directories, on free loopback ports; its process group is killed on drop.
pub struct RabbitServer {
    child: Option<Child>,
    epmd: Option<Child>,
    pub port: u16,
    dist_port: u16,
    epmd_port: u16,
    pub dir: PathBuf,
    bin: PathBuf,
    owns_dir: bool,
}

impl RabbitServer {
    /// Starts a broker (about 5–10 s); panics with a hint when it is not installed.
    pub fn start() -> Self {
        Self::start_with_conf("")
    }

    /// With `extra` appended to rabbitmq.conf (e.g. a TLS listener beside the plain one).
    pub fn start_with_conf(extra: &str) -> Self {
        let bin = rabbitmq_binary().expect("rabbitmq-server not found: run scripts/setup.sh");
        let mut s = Self::start_in_with_conf(bin, free_port(), temp_dir("weir-rabbitmq"), extra);
        s.owns_dir = true;
        s
    }

    /// Starts `bin` on `port` with everything under `dir` (what `weir up` runs).
    pub fn start_in(bin: PathBuf, port: u16, dir: PathBuf) -> Self {
        Self::start_in_with_conf(bin, port, dir, "")
    }

    fn start_in_with_conf(bin: PathBuf, port: u16, dir: PathBuf, extra: &str) -> Self {
        let home = dir.join("home");
        std::fs::create_dir_all(&home).expect("create RabbitMQ's HOME");
        let cookie = home.join(".erlang.cookie");
        if !cookie.exists() {
            std::fs::write(&cookie, format!("weir{}{port}", std::process::id()))
                .expect("write the Erlang cookie");
            let _ = std::fs::set_permissions(
                &cookie,
                std::os::unix::fs::PermissionsExt::from_mode(0o400),
            );
        }
        std::fs::write(
            dir.join("rabbitmq.conf"),
            format!(
                "listeners.tcp.default = 127.0.0.1:{port}\nloopback_users = none\n\
                 log.console = false\nlog.file.level = warning\n{extra}"
            ),
        )
        .expect("write rabbitmq.conf");
        let epmd_port = free_port();
        let epmd = Command::new(find("EPMD", &["epmd"]).unwrap_or_else(|| "epmd".into()))
            .args(["-port", &epmd_port.to_string(), "-address", "127.0.0.1"])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start epmd");
        let mut s = Self {
            child: None,
            epmd: Some(epmd),
            port,
            dist_port: free_port(),
            epmd_port,
            dir,
            bin,
            owns_dir: false,
        };
        s.spawn();
        s
    }

    /// The environment that makes `rabbitmq-server` and `rabbitmqctl` address this node.
    pub fn env(&self, c: &mut Command) {
        let d = &self.dir;
        c.env("HOME", d.join("home"))
            .env("RABBITMQ_NODENAME", format!("weir{}@localhost", self.port))
            .env("RABBITMQ_NODE_IP_ADDRESS", "127.0.0.1")
            .env("RABBITMQ_NODE_PORT", self.port.to_string())
            .env("RABBITMQ_DIST_PORT", self.dist_port.to_string())
            .env("ERL_EPMD_PORT", self.epmd_port.to_string())
            .env("ERL_EPMD_ADDRESS", "127.0.0.1")
            .env("RABBITMQ_MNESIA_BASE", d.join("mnesia"))
            .env("RABBITMQ_LOG_BASE", d.join("log"))
            .env("RABBITMQ_CONFIG_FILE", d.join("rabbitmq"))
            .env("RABBITMQ_ENABLED_PLUGINS_FILE", d.join("plugins"))
            .env("RABBITMQ_PID_FILE", d.join("pid"));
    }

    fn spawn(&mut self) {
        let mut c = Command::new(&self.bin);
        self.env(&mut c);
        std::os::unix::process::CommandExt::process_group(&mut c, 0);
        let mut child = c
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {}: {e}", self.bin.display()));
        // The AMQP listener opens once the broker has booted.
        wait_port(
            self.port,
            Duration::from_secs(90),
            &mut child,
            "rabbitmq-server",
        );
        self.child = Some(child);
    }

    /// `amqp://127.0.0.1:<port>/%2f`.
    pub fn url(&self) -> String {
        format!("amqp://127.0.0.1:{}/%2f", self.port)
    }

    /// SIGKILL of the whole process group (start script, Erlang VM, helpers).
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = Command::new("kill")
                .args(["-9", "--", &format!("-{}", c.id())])
                .status();
            let _ = c.wait();
        }
    }

    pub fn restart(&mut self) {
        self.kill();
        self.spawn();
    }
}

impl Drop for RabbitServer {
    fn drop(&mut self) {
        self.kill();
        if let Some(mut e) = self.epmd.take() {
            let _ = e.kill();
            let _ = e.wait();
        }
        if self.owns_dir {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }
}
