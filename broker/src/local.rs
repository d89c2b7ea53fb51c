//! Running a broker on this machine: the command lines `weir up` and the test kit share.
//!
//! `weir up --broker nats|redis|rabbitmq|kafka` supervises these processes for a local run; the test
//! kit (`weir-testkit`) starts the same ones for the suites that need a real broker. Both take
//! from here where each binary is found and how it is run, so that what the tests exercise is
//! what a developer gets:
//!
//! - a server on a given loopback port with its data in a given directory, so that a restart
//!   with the same command finds its streams, queues and messages again: [`nats_command`]
//!   (JetStream, file store), [`redis_command`] (append-only file with `fsync always`),
//!   [`RabbitmqNode`] (Debian's start script run as the current user, with its own epmd, node
//!   name, Erlang cookie in a HOME of its own, database and logs); and [`kafka_command`], the
//!   Kafka-protocol broker Tansu, whose build here keeps its log in memory only (a restart starts
//!   empty: say so where a test or `weir up` restarts it);
//! - the binaries: [`nats_server`], [`redis_server`], [`rabbitmq_server`], [`rabbitmqctl`],
//!   [`epmd`], [`tansu`] (see [`find`] for the order they are looked for in).
//!
//! Ports: [`free_port`] hands out loopback ports below the kernel's ephemeral range, each once
//! per process, from a span of their own for `weir up` and for the test kit
//! ([`PortSpan`]).
//!
//! The caller spawns the command its own way (`weir up` in a process group that dies with it,
//! its output prefixed; the tests with their output dropped) and waits for [`listening`].
//! Std only: nothing here needs a runtime.

use std::ffi::OsString;
use std::net::{Ipv4Addr, SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

/// Where [`free_port`] takes ports from. Both spans lie below the kernel's ephemeral range
/// (32768 and up on Linux), so an outgoing connection made meanwhile (a sidecar dialling a
/// broker, a client retrying hundreds of times) cannot take a port that was handed out but is
/// not bound yet; and apart from each other, so a test and the `weir up` it starts do not race
/// for one port.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PortSpan {
    /// 20000–31999: the brokers, sidecars and apps of a `weir up` run.
    LocalRun,
    /// 12000–19999: what the test kit starts (brokers, proxies, peers).
    Tests,
}

impl PortSpan {
    fn range(self) -> (u16, u16) {
        match self {
            PortSpan::LocalRun => (20000, 12000),
            PortSpan::Tests => (12000, 8000),
        }
    }
}

/// A free TCP port on `127.0.0.1` from `span`, never handed out before by this process: a port
/// the kernel offers twice (a listener bound to port 0 and closed, then the same again) would
/// give two listeners of one test the same address. A restarted broker binds the same port
/// again, which a port from the ephemeral range would not guarantee. Concurrent processes start
/// at different points of the span (seeded by their pid); a port in use is skipped. `None` when
/// the whole span is taken.
pub fn free_port(span: PortSpan) -> Option<u16> {
    use std::net::TcpListener;
    use std::sync::Mutex;
    // Per span: the next port to try (0 = not seeded yet) and the ports handed out.
    static STATE: Mutex<[(u16, Vec<u16>); 2]> = Mutex::new([(0, Vec::new()), (0, Vec::new())]);
    let (low, len) = span.range();
    let mut state = STATE.lock().unwrap_or_else(|e| e.into_inner());
    let (next, given) = &mut state[span as usize];
    if *next == 0 {
        *next = low + (std::process::id() as u16).wrapping_mul(7919) % len;
    }
    for _ in 0..len {
        let p = *next;
        *next = low + (p - low + 1) % len;
        if !given.contains(&p) && TcpListener::bind((Ipv4Addr::LOCALHOST, p)).is_ok() {
            given.push(p);
            return Some(p);
        }
    }
    None
}

/// Finds a binary: `$env` when it is set; else the first of `names` that exists (an absolute
/// path as it is, a bare name on `PATH`); else a bare name in a `.tools/bin` directory of the
/// current directory or one of its parents (where `scripts/setup.sh` installs what Debian does
/// not package). `None` when none is found.
pub fn find(env: &str, names: &[&str]) -> Option<PathBuf> {
    if let Some(p) = std::env::var_os(env) {
        return Some(PathBuf::from(p));
    }
    for n in names {
        let p = Path::new(n);
        if p.is_absolute() {
            if p.is_file() {
                return Some(p.to_path_buf());
            }
            continue;
        }
        if let Some(found) = std::env::var_os("PATH").and_then(|paths| {
            std::env::split_paths(&paths)
                .map(|d| d.join(n))
                .find(|p| p.is_file())
        }) {
            return Some(found);
        }
    }
    let mut dir = std::env::current_dir().ok();
    while let Some(d) = dir {
        if let Some(found) = names
            .iter()
            .filter(|n| !Path::new(n).is_absolute())
            .map(|n| d.join(".tools/bin").join(n))
            .find(|p| p.is_file())
        {
            return Some(found);
        }
        dir = d.parent().map(Path::to_path_buf);
    }
    None
}

/// `nats-server` (`$NATS_SERVER`, `PATH`, `.tools/bin`).
pub fn nats_server() -> Option<PathBuf> {
    find("NATS_SERVER", &["nats-server"])
}

/// `redis-server` (`$REDIS_SERVER`, `PATH`, Debian's `/usr/bin/redis-server`).
pub fn redis_server() -> Option<PathBuf> {
    find("REDIS_SERVER", &["redis-server", "/usr/bin/redis-server"])
}

/// RabbitMQ's own start script (`$RABBITMQ_SERVER`, else Debian's
/// `/usr/lib/rabbitmq/bin/rabbitmq-server`): not Debian's wrapper on `PATH`, which switches to
/// the `rabbitmq` user.
pub fn rabbitmq_server() -> Option<PathBuf> {
    find(
        "RABBITMQ_SERVER",
        &["/usr/lib/rabbitmq/bin/rabbitmq-server"],
    )
}

/// RabbitMQ's own `rabbitmqctl` script (`$RABBITMQCTL`, else Debian's), run with
/// [`RabbitmqNode::env`] to address a node started here.
pub fn rabbitmqctl() -> Option<PathBuf> {
    find("RABBITMQCTL", &["/usr/lib/rabbitmq/bin/rabbitmqctl"])
}

/// Erlang's port mapper (`$EPMD`, `PATH`), or plain `epmd` for the shell to find.
pub fn epmd() -> PathBuf {
    find("EPMD", &["epmd"]).unwrap_or_else(|| "epmd".into())
}

/// `tansu` (`$TANSU`, `PATH`, `.tools/bin`): the Kafka-protocol broker `scripts/setup.sh`
/// installs.
pub fn tansu() -> Option<PathBuf> {
    find("TANSU", &["tansu"])
}

/// Whether `127.0.0.1:port` accepts a connection within `timeout`.
pub fn listening(port: u16, timeout: Duration) -> bool {
    TcpStream::connect_timeout(&SocketAddr::from((Ipv4Addr::LOCALHOST, port)), timeout).is_ok()
}

/// `nats-server` with JetStream on `127.0.0.1:port`, its store in `store`.
pub fn nats_command(bin: &Path, port: u16, store: &Path) -> Command {
    let mut c = Command::new(bin);
    c.args(["-js", "-a", "127.0.0.1", "-p", &port.to_string(), "-sd"])
        .arg(store);
    c
}

/// `tansu broker` on `127.0.0.1:port`, advertising that address to clients (so a Kafka client
/// bootstrapping there reconnects to the same place), its log in memory (`memory://`): the
/// storage engines of this build are memory and S3, and a restart starts empty. Ready when the
/// port accepts connections (well under a second).
pub fn kafka_command(bin: &Path, port: u16) -> Command {
    kafka_command_advertising(bin, port, port)
}

/// [`kafka_command`] telling clients (in its metadata) to connect to `127.0.0.1:advertised`:
/// a TLS front on that port, for one.
pub fn kafka_command_advertising(bin: &Path, port: u16, advertised: u16) -> Command {
    kafka_command_stored(bin, port, advertised, "memory://tansu/")
}

/// `moto_server` (an S3 endpoint) on `127.0.0.1:port`: what keeps Tansu's log across a crash of
/// the broker in the test kit (Tansu's `s3://` storage).
pub fn moto_server() -> Option<PathBuf> {
    find("MOTO_SERVER", &["moto_server"])
}

/// The settings Tansu's `s3://` storage reads for an S3 endpoint at `127.0.0.1:port`.
pub fn s3_env(port: u16) -> [(&'static str, String); 5] {
    [
        ("AWS_ENDPOINT", format!("http://127.0.0.1:{port}")),
        ("AWS_ALLOW_HTTP", "true".into()),
        ("AWS_ACCESS_KEY_ID", "weir".into()),
        ("AWS_SECRET_ACCESS_KEY", "weir-test-kit".into()),
        ("AWS_DEFAULT_REGION", "us-east-1".into()),
    ]
}

/// [`kafka_command_advertising`] with `storage` (`memory://tansu/`, `s3://<bucket>/`).
pub fn kafka_command_stored(bin: &Path, port: u16, advertised: u16, storage: &str) -> Command {
    let url = format!("tcp://127.0.0.1:{port}");
    let advertised = format!("tcp://127.0.0.1:{advertised}");
    let mut c = Command::new(bin);
    c.arg("broker")
        .args([
            "--listener-url",
            &url,
            "--advertised-listener-url",
            &advertised,
        ])
        .args(["--storage-engine", storage]);
    c
}

/// `redis-server` on `127.0.0.1:port` in the foreground, its data in `dir`: every write
/// appended to the AOF and fsynced before the answer (`--appendfsync always`), no RDB
/// snapshots, protected mode off (loopback only). Arguments added after these override them
/// (redis-server reads its command line as configuration lines, the last one winning).
pub fn redis_command(bin: &Path, port: u16, dir: &Path) -> Command {
    let mut c = Command::new(bin);
    c.args(["--port", &port.to_string(), "--bind", "127.0.0.1", "--dir"])
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

/// Where RabbitMQ's logs go.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RabbitmqLog {
    /// Warnings and worse on the console (`weir up` prefixes and shows them); no log file.
    Console,
    /// Warnings and worse in the node's log directory; nothing on the console.
    File,
}

/// A RabbitMQ node run from its start script as the current user, everything of it under
/// `dir`: a HOME with its Erlang cookie, `rabbitmq.conf`, the database and the logs. It has
/// its own epmd on `epmd_port`, Erlang distribution on `dist_port` and AMQP on `port`, all on
/// loopback, and the node name `<name><port>@localhost`: two nodes on a machine (or a node and
/// the Debian service) do not meet. The same node (same ports and `dir`) started again finds its
/// durable queues and messages.
#[derive(Debug, Clone)]
pub struct RabbitmqNode {
    /// The node name's prefix, also the Erlang cookie's.
    pub name: String,
    pub port: u16,
    pub dist_port: u16,
    pub epmd_port: u16,
    pub dir: PathBuf,
    pub log: RabbitmqLog,
    /// Appended to `rabbitmq.conf` (e.g. a TLS listener beside the plain one).
    pub extra_conf: String,
}

impl RabbitmqNode {
    /// Writes the node's HOME with its Erlang cookie (kept when it exists: a restarted node
    /// keeps its cookie) and its `rabbitmq.conf`.
    pub fn prepare(&self) -> std::io::Result<()> {
        let home = self.dir.join("home");
        std::fs::create_dir_all(&home)?;
        let cookie = home.join(".erlang.cookie");
        if !cookie.exists() {
            std::fs::write(
                &cookie,
                format!("{}{}{}", self.name, std::process::id(), self.port),
            )?;
            std::fs::set_permissions(&cookie, std::os::unix::fs::PermissionsExt::from_mode(0o400))?;
        }
        let log = match self.log {
            RabbitmqLog::Console => {
                "log.console = true\nlog.console.level = warning\nlog.file = false\n"
            }
            RabbitmqLog::File => "log.console = false\nlog.file.level = warning\n",
        };
        std::fs::write(
            self.dir.join("rabbitmq.conf"),
            format!(
                "listeners.tcp.default = 127.0.0.1:{}\nloopback_users = none\n{log}{}",
                self.port, self.extra_conf
            ),
        )
    }

    /// The environment that makes `rabbitmq-server` and `rabbitmqctl` address this node.
    pub fn env(&self) -> Vec<(&'static str, OsString)> {
        let d = &self.dir;
        vec![
            ("HOME", d.join("home").into()),
            (
                "RABBITMQ_NODENAME",
                format!("{}{}@localhost", self.name, self.port).into(),
            ),
            ("RABBITMQ_NODE_IP_ADDRESS", "127.0.0.1".into()),
            ("RABBITMQ_NODE_PORT", self.port.to_string().into()),
            ("RABBITMQ_DIST_PORT", self.dist_port.to_string().into()),
            ("ERL_EPMD_PORT", self.epmd_port.to_string().into()),
            ("ERL_EPMD_ADDRESS", "127.0.0.1".into()),
            ("RABBITMQ_MNESIA_BASE", d.join("mnesia").into()),
            ("RABBITMQ_LOG_BASE", d.join("log").into()),
            ("RABBITMQ_CONFIG_FILE", d.join("rabbitmq").into()),
            ("RABBITMQ_ENABLED_PLUGINS_FILE", d.join("plugins").into()),
            ("RABBITMQ_PID_FILE", d.join("pid").into()),
        ]
    }

    /// The start script `bin` with [`env`](Self::env); it listens on `port` once the node has
    /// booted (5–10 s). Run it in a process group of its own: the Erlang VM it starts is to be
    /// killed with it.
    pub fn command(&self, bin: &Path) -> Command {
        let mut c = Command::new(bin);
        c.envs(self.env());
        c
    }

    /// The node's epmd ([`epmd`]) on `127.0.0.1:epmd_port`; to start before the node.
    pub fn epmd_command(&self) -> Command {
        let mut c = Command::new(epmd());
        c.args([
            "-port",
            &self.epmd_port.to_string(),
            "-address",
            "127.0.0.1",
        ]);
        c
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(c: &Command) -> Vec<String> {
        c.get_args()
            .map(|a| a.to_string_lossy().into_owned())
            .collect()
    }

    #[test]
    fn nats_and_redis_listen_on_loopback_with_their_data_in_the_directory() {
        let nats = nats_command(Path::new("/bin/nats-server"), 4999, Path::new("/d/nats"));
        assert_eq!(
            args(&nats),
            ["-js", "-a", "127.0.0.1", "-p", "4999", "-sd", "/d/nats"]
        );
        let redis = args(&redis_command(
            Path::new("/bin/redis-server"),
            6999,
            Path::new("/d/redis"),
        ));
        for pair in [
            ["--port", "6999"],
            ["--bind", "127.0.0.1"],
            ["--dir", "/d/redis"],
            ["--appendfsync", "always"],
        ] {
            assert!(redis.windows(2).any(|w| w == pair), "{pair:?} in {redis:?}");
        }
    }

    #[test]
    fn a_rabbitmq_node_keeps_its_cookie_and_addresses_itself_by_its_ports() {
        let dir = std::env::temp_dir().join(format!("weir-local-{}", std::process::id()));
        let node = RabbitmqNode {
            name: "weirtest".into(),
            port: 5999,
            dist_port: 25999,
            epmd_port: 4399,
            dir: dir.clone(),
            log: RabbitmqLog::File,
            extra_conf: "# extra\n".into(),
        };
        node.prepare().unwrap();
        let cookie = std::fs::read_to_string(dir.join("home/.erlang.cookie")).unwrap();
        node.prepare().unwrap();
        assert_eq!(
            std::fs::read_to_string(dir.join("home/.erlang.cookie")).unwrap(),
            cookie,
            "a restarted node keeps its cookie"
        );
        let conf = std::fs::read_to_string(dir.join("rabbitmq.conf")).unwrap();
        assert!(
            conf.starts_with("listeners.tcp.default = 127.0.0.1:5999\n"),
            "{conf}"
        );
        assert!(conf.ends_with("# extra\n"), "{conf}");
        let env = node.env();
        let get = |k: &str| {
            env.iter()
                .find(|(n, _)| *n == k)
                .map(|(_, v)| v.to_string_lossy().into_owned())
        };
        assert_eq!(
            get("RABBITMQ_NODENAME").as_deref(),
            Some("weirtest5999@localhost")
        );
        assert_eq!(get("ERL_EPMD_PORT").as_deref(), Some("4399"));
        assert_eq!(get("RABBITMQ_DIST_PORT").as_deref(), Some("25999"));
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn a_binary_found_nowhere_is_none() {
        assert_eq!(
            find("WEIR_LOCAL_TEST_UNSET", &["/nonexistent/binary"]),
            None
        );
    }

    #[test]
    fn ports_are_never_handed_out_twice_and_stay_in_their_span() {
        // No port comes back twice, even when each is closed at once (what port 0 does not
        // promise), and each is free when handed out.
        let mut seen = std::collections::HashSet::new();
        for span in [PortSpan::Tests, PortSpan::LocalRun] {
            let (low, len) = span.range();
            for _ in 0..300 {
                let p = free_port(span).expect("a port");
                assert!(p >= low && p < low + len, "{p} outside {span:?}");
                assert!(seen.insert(p), "{p} handed out twice");
                assert!(
                    std::net::TcpListener::bind(("127.0.0.1", p)).is_ok(),
                    "{p} not free"
                );
            }
        }
    }
}
