//! Real brokers for tests: `nats-server`, `redis-server`, `rabbitmq-server` and `tansu` (Kafka)
//! processes on free loopback ports, started and killed by a test.
//!
//! Each runs the command line of [`weir_broker::local`] (the one `weir up` runs), with its data
//! in a temporary directory of its own that outlives restarts and is removed on drop.
//! [`kill9`](NatsServer::kill9) is a crash (SIGKILL to the server's process group: nothing is
//! flushed beyond what the server already wrote); [`restart`](NatsServer::restart) starts it again
//! on the same port and data, as a recovery would. Starting waits until the server serves:
//! nats-server has logged "Server is ready" (JetStream recovered) and listens, redis-server
//! answers `PING` with something else than `-LOADING`, rabbitmq-server listens (it opens its AMQP
//! listener once booted). Dropping a server kills it.
//!
//! The binaries come from Debian's `redis-server` and `rabbitmq-server` packages and
//! `.tools/bin/nats-server` (`scripts/setup.sh`), or `$NATS_SERVER`, `$REDIS_SERVER`,
//! `$RABBITMQ_SERVER`. A test that can do without a broker asks [`require`] first and skips
//! when it is missing; the start functions panic with a hint instead.

use std::ffi::OsStr;
use std::io::{BufRead, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex, mpsc};
use std::time::{Duration, Instant};
use weir_broker::local;

use crate::net::free_port;

/// A broker kind, and what a test needs to know of it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    Nats,
    Redis,
    Rabbitmq,
    /// A Kafka-protocol broker: [`KafkaServer`] (tansu, or `WEIR_KAFKA_BOOTSTRAP`).
    Kafka,
}

impl Kind {
    /// `nats`, `redis`, `rabbitmq` or `kafka`, as a Broker's `kind`.
    pub fn name(self) -> &'static str {
        match self {
            Kind::Nats => "nats",
            Kind::Redis => "redis",
            Kind::Rabbitmq => "rabbitmq",
            Kind::Kafka => "kafka",
        }
    }

    /// The scheme of its plain URLs.
    pub fn scheme(self) -> &'static str {
        match self {
            Kind::Nats => "nats://",
            Kind::Redis => "redis://",
            Kind::Rabbitmq => "amqp://",
            Kind::Kafka => "kafka://",
        }
    }

    /// Whether the broker itself drops a repeated event id at publish (`duplicate: true`);
    /// RabbitMQ and Kafka store it again, and the consumer's processed-event check drops it.
    pub fn drops_duplicate_publishes(self) -> bool {
        matches!(self, Kind::Nats | Kind::Redis)
    }

    /// Whether the queue keeps messages after they are acknowledged (a stream), so a test can
    /// read them back (RabbitMQ's queues do not; a Kafka topic does).
    pub fn keeps_messages(self) -> bool {
        matches!(self, Kind::Nats | Kind::Redis | Kind::Kafka)
    }

    /// The server binary, or `None` when it is not installed.
    pub fn binary(self) -> Option<PathBuf> {
        match self {
            Kind::Nats => local::nats_server(),
            Kind::Redis => local::redis_server(),
            Kind::Rabbitmq => local::rabbitmq_server(),
            Kind::Kafka => local::tansu(),
        }
    }

    fn missing(self) -> String {
        format!(
            "{} server not found (or set ${}): run scripts/setup.sh",
            self.name(),
            match self {
                Kind::Nats => "NATS_SERVER",
                Kind::Redis => "REDIS_SERVER",
                Kind::Rabbitmq => "RABBITMQ_SERVER",
                Kind::Kafka => "TANSU, or WEIR_KAFKA_BOOTSTRAP",
            }
        )
    }
}

/// The broker's server binary; `None` (the test skips, saying so) when it is missing, unless
/// `CI` is set: there it fails.
pub fn require(kind: Kind) -> Option<PathBuf> {
    if kind == Kind::Kafka && std::env::var_os("WEIR_KAFKA_BOOTSTRAP").is_some() {
        // A Kafka the user runs: no binary needed.
        return Some(PathBuf::new());
    }
    match kind.binary() {
        Some(p) => Some(p),
        None if std::env::var_os("CI").is_some() => panic!("{}", kind.missing()),
        None => {
            eprintln!("SKIP: {}", kind.missing());
            None
        }
    }
}

/// A server process in a process group of its own (so that SIGKILL reaches what it started,
/// e.g. RabbitMQ's Erlang VM); its stdout and stderr dropped, or stderr handed to the caller.
struct Process {
    what: &'static str,
    child: Option<Child>,
}

impl Process {
    fn new(what: &'static str) -> Process {
        Process { what, child: None }
    }

    fn spawn(&mut self, mut command: Command, stderr: Stdio) -> &mut Child {
        std::os::unix::process::CommandExt::process_group(&mut command, 0);
        let child = command
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(stderr)
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {}: {e}", self.what));
        self.child.insert(child)
    }

    /// Polls `ready` until it holds; panics, with `log`, when the server exits or `timeout`
    /// passes first.
    fn wait(
        &mut self,
        timeout: Duration,
        mut ready: impl FnMut() -> bool,
        log: impl Fn() -> String,
    ) {
        let deadline = Instant::now() + timeout;
        while Instant::now() < deadline {
            if ready() {
                return;
            }
            if let Some(c) = self.child.as_mut()
                && let Ok(Some(status)) = c.try_wait()
            {
                std::thread::sleep(Duration::from_millis(50));
                panic!("{} exited at start: {status}\n{}", self.what, log());
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        panic!("{} was not ready within {timeout:?}\n{}", self.what, log());
    }

    fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// SIGKILL to the process group, then reaps the server.
    fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = Command::new("kill")
                .args(["-9", "--", &format!("-{}", c.id())])
                .stderr(Stdio::null())
                .status();
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        self.kill9();
    }
}

fn temp_dir(prefix: &str) -> tempfile::TempDir {
    tempfile::Builder::new()
        .prefix(prefix)
        .tempdir()
        .expect("create a temporary directory")
}

fn loopback(port: u16) -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], port))
}

/// A running `nats-server -js` with its store in a directory of its own.
pub struct NatsServer {
    process: Process,
    bin: PathBuf,
    pub port: u16,
    store: tempfile::TempDir,
    extra: Vec<String>,
}

impl NatsServer {
    /// Starts a server with JetStream on a fresh store; panics with a hint when the binary is
    /// missing.
    pub fn start() -> Self {
        Self::start_with(&[])
    }

    /// Like [`start`](Self::start) with extra arguments, e.g. `["--user", "u", "--pass", "p"]`
    /// or a TLS certificate (`["--tls", "--tlscert", …, "--tlskey", …]`).
    pub fn start_with(extra: &[&str]) -> Self {
        let mut s = Self {
            process: Process::new("nats-server"),
            bin: Kind::Nats
                .binary()
                .unwrap_or_else(|| panic!("{}", Kind::Nats.missing())),
            port: free_port(),
            store: temp_dir("weir-nats-"),
            extra: extra.iter().map(|s| s.to_string()).collect(),
        };
        s.spawn();
        s
    }

    fn spawn(&mut self) {
        let mut command = local::nats_command(&self.bin, self.port, self.store.path());
        command.args(&self.extra);
        let child = self.process.spawn(command, Stdio::piped());
        // The server logs "Server is ready" once JetStream has started (and recovered its store)
        // and the client port listens. The log is drained until the process ends.
        let stderr = child.stderr.take().expect("piped stderr");
        let (ready_tx, ready_rx) = mpsc::channel();
        let log = Arc::new(Mutex::new(Vec::<String>::new()));
        let log2 = log.clone();
        std::thread::spawn(move || {
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
        let port = self.port;
        let mut announced = false;
        self.process.wait(
            Duration::from_secs(20),
            || {
                announced |= ready_rx.try_recv().is_ok();
                announced && local::listening(port, Duration::from_millis(500))
            },
            || log.lock().unwrap_or_else(|e| e.into_inner()).join("\n"),
        );
    }

    pub fn addr(&self) -> SocketAddr {
        loopback(self.port)
    }

    /// `nats://127.0.0.1:<port>`.
    pub fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.port)
    }

    /// Process id of the running server.
    pub fn pid(&self) -> Option<u32> {
        self.process.pid()
    }

    /// SIGKILL, as a crash would: nothing is flushed beyond what the store already has.
    pub fn kill9(&mut self) {
        self.process.kill9();
    }

    /// Starts the server again on the same port and store (killing it first if it runs).
    pub fn restart(&mut self) {
        self.kill9();
        self.spawn();
    }

    /// A client of the server.
    pub async fn client(&self) -> async_nats::Client {
        async_nats::connect(self.url()).await.expect("connect")
    }

    /// A JetStream context on [`client`](Self::client).
    pub async fn js(&self) -> async_nats::jetstream::Context {
        async_nats::jetstream::new(self.client().await)
    }
}

/// A running `redis-server`, its append-only file fsynced at every write.
pub struct RedisServer {
    process: Process,
    bin: PathBuf,
    pub port: u16,
    dir: tempfile::TempDir,
    password: Option<String>,
    extra: Vec<String>,
}

impl RedisServer {
    /// Starts a server; panics with a hint when the binary is missing.
    pub fn start() -> Self {
        Self::start_with::<&str>(&[])
    }

    /// With extra arguments, after the shared ones (which they override): a TLS port beside the
    /// plain one, `--appendfsync everysec`, `--requirepass` …
    pub fn start_with<S: AsRef<OsStr>>(extra: &[S]) -> Self {
        let extra = extra
            .iter()
            .map(|s| s.as_ref().to_string_lossy().into_owned())
            .collect::<Vec<_>>();
        let password = extra
            .iter()
            .position(|a| a == "--requirepass")
            .and_then(|i| extra.get(i + 1).cloned());
        let mut s = Self {
            process: Process::new("redis-server"),
            bin: Kind::Redis
                .binary()
                .unwrap_or_else(|| panic!("{}", Kind::Redis.missing())),
            port: free_port(),
            dir: temp_dir("weir-redis-"),
            password,
            extra,
        };
        s.spawn();
        s
    }

    /// With `requirepass`: [`con`](Self::con) authenticates.
    pub fn start_with_password(password: &str) -> Self {
        Self::start_with(&["--requirepass", password])
    }

    fn spawn(&mut self) {
        let mut command = local::redis_command(&self.bin, self.port, self.dir.path());
        command.args(&self.extra);
        self.process.spawn(command, Stdio::null());
        let port = self.port;
        self.process
            .wait(Duration::from_secs(20), || redis_serves(port), String::new);
    }

    /// The data directory (its AOF).
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// `redis://127.0.0.1:<port>`, without the password.
    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    /// Like [`url`](Self::url), with the password if there is one.
    pub fn authed_url(&self) -> String {
        match &self.password {
            Some(p) => format!("redis://:{p}@127.0.0.1:{}", self.port),
            None => self.url(),
        }
    }

    /// SIGKILL, as a crash would.
    pub fn kill9(&mut self) {
        self.process.kill9();
    }

    /// Starts the server again on the same port and data directory (its AOF replayed).
    pub fn restart(&mut self) {
        self.kill9();
        self.spawn();
    }

    /// A connection, authenticated when the server has a password.
    pub async fn con(&self) -> redis::aio::MultiplexedConnection {
        redis::Client::open(self.authed_url())
            .expect("a Redis URL")
            .get_multiplexed_async_connection()
            .await
            .expect("connect to redis-server")
    }
}

/// Whether redis-server answers `PING` on `port` with anything but `-LOADING` (a server that
/// wants a password answers `-NOAUTH`, and serves).
fn redis_serves(port: u16) -> bool {
    let Ok(mut s) = TcpStream::connect_timeout(&loopback(port), Duration::from_millis(200)) else {
        return false;
    };
    let _ = s.set_read_timeout(Some(Duration::from_secs(1)));
    let mut answer = [0u8; 16];
    s.write_all(b"PING\r\n").is_ok()
        && matches!(s.read(&mut answer), Ok(n) if n > 0 && !answer[..n].starts_with(b"-LOADING"))
}

/// A running `rabbitmq-server` node ([`local::RabbitmqNode`]): its own epmd, node name, cookie,
/// database and logs under a temporary directory, on free loopback ports.
pub struct RabbitServer {
    process: Process,
    /// The node's epmd, killed after the node (fields drop in order).
    _epmd: Process,
    bin: PathBuf,
    node: local::RabbitmqNode,
    pub port: u16,
    _dir: tempfile::TempDir,
}

impl RabbitServer {
    /// Starts a broker (about 5–10 s); panics with a hint when it is not installed.
    pub fn start() -> Self {
        Self::start_with_conf("")
    }

    /// With `extra` appended to rabbitmq.conf (e.g. a TLS listener beside the plain one).
    pub fn start_with_conf(extra: &str) -> Self {
        let dir = temp_dir("weir-rabbitmq-");
        let node = local::RabbitmqNode {
            name: "weir".into(),
            port: free_port(),
            dist_port: free_port(),
            epmd_port: free_port(),
            dir: dir.path().to_path_buf(),
            log: local::RabbitmqLog::File,
            extra_conf: extra.into(),
        };
        node.prepare()
            .expect("write RabbitMQ's HOME and rabbitmq.conf");
        let mut epmd = Process::new("epmd");
        epmd.spawn(node.epmd_command(), Stdio::null());
        let mut s = Self {
            process: Process::new("rabbitmq-server"),
            _epmd: epmd,
            bin: Kind::Rabbitmq
                .binary()
                .unwrap_or_else(|| panic!("{}", Kind::Rabbitmq.missing())),
            port: node.port,
            node,
            _dir: dir,
        };
        s.spawn();
        s
    }

    fn spawn(&mut self) {
        self.process
            .spawn(self.node.command(&self.bin), Stdio::null());
        // The AMQP listener opens once the broker has booted.
        let port = self.port;
        self.process.wait(
            Duration::from_secs(90),
            || local::listening(port, Duration::from_millis(200)),
            String::new,
        );
    }

    /// Waits (up to 60 s) until another listener of the node, given in `start_with_conf`'s
    /// configuration, accepts connections: the broker opens its listeners one after the other,
    /// and the AMQP one that `start_with_conf` waits for may come first (a TLS listener was
    /// seen refusing connections just after it on a loaded CI machine).
    pub fn wait_listening(&mut self, port: u16) {
        self.process.wait(
            Duration::from_secs(60),
            || local::listening(port, Duration::from_millis(200)),
            || format!("nothing listens on 127.0.0.1:{port}"),
        );
    }

    /// The node's directory (HOME, database, logs).
    pub fn dir(&self) -> &Path {
        &self.node.dir
    }

    /// `amqp://127.0.0.1:<port>/%2f`.
    pub fn url(&self) -> String {
        format!("amqp://127.0.0.1:{}/%2f", self.port)
    }

    /// SIGKILL of the whole process group (start script, Erlang VM, helpers).
    pub fn kill9(&mut self) {
        self.process.kill9();
    }

    /// Starts the node again with the same name, ports and database.
    pub fn restart(&mut self) {
        self.kill9();
        self.spawn();
    }

    /// A connection and a channel on it.
    pub async fn channel(&self) -> (lapin::Connection, lapin::Channel) {
        let conn = lapin::Connection::connect(&self.url(), Default::default())
            .await
            .expect("connect to rabbitmq-server");
        let ch = conn.create_channel().await.expect("open a channel");
        (conn, ch)
    }

    /// `rabbitmqctl list_queues` for `queue`: (ready, unacknowledged); `None` when the queue is
    /// not listed or rabbitmqctl cannot run.
    pub fn queue_counts(&self, queue: &str) -> Option<(u64, u64)> {
        let out = Command::new(local::rabbitmqctl()?)
            .envs(self.node.env())
            .args([
                "-q",
                "list_queues",
                "name",
                "messages_ready",
                "messages_unacknowledged",
            ])
            .output()
            .ok()?;
        String::from_utf8_lossy(&out.stdout).lines().find_map(|l| {
            let f: Vec<_> = l.split_whitespace().collect();
            if f.len() == 3 && f[0] == queue {
                Some((f[1].parse().ok()?, f[2].parse().ok()?))
            } else {
                None
            }
        })
    }
}

/// A Kafka-protocol broker for a test: `tansu` ([`local::kafka_command`]) on a free loopback
/// port, or, when `WEIR_KAFKA_BOOTSTRAP` is set (`host:port[,host:port…]`), a Kafka the user
/// runs (Apache Kafka, Redpanda …), which the test neither starts nor kills.
///
/// [`start`](Self::start) keeps the log in memory: [`restart`](Self::restart) brings the broker
/// back on the same port *empty*, as a broker that lost its disk would.
/// [`start_durable`](Self::start_durable) keeps it in Tansu's `s3://` storage on an S3 endpoint
/// of its own (`moto_server`), which outlives the broker: a SIGKILL and a restart lose nothing,
/// the producer's and groups' state included. A test that needs the log to survive a broker
/// crash asks [`keeps_log_across_restart`](Self::keeps_log_across_restart).
pub struct KafkaServer {
    process: Process,
    bin: Option<PathBuf>,
    bootstrap: String,
    port: Option<u16>,
    /// The S3 endpoint of the durable storage, and its port.
    s3: Option<(Process, u16)>,
    /// Clients must authenticate (SASL): [`Self::start_requiring_sasl`].
    authentication: bool,
    /// The port named in the broker's metadata, when not its own ([`Self::start_advertising`]).
    advertised: Option<u16>,
}

impl KafkaServer {
    /// Starts tansu (or takes `WEIR_KAFKA_BOOTSTRAP`); panics with a hint when neither exists.
    pub fn start() -> Self {
        if let Some(b) = std::env::var_os("WEIR_KAFKA_BOOTSTRAP") {
            return Self {
                process: Process::new("kafka"),
                bin: None,
                bootstrap: b.to_string_lossy().into_owned(),
                port: None,
                advertised: None,
                s3: None,
                authentication: false,
            };
        }
        let bin = local::tansu().unwrap_or_else(|| {
            panic!("tansu not found (or set $TANSU, or WEIR_KAFKA_BOOTSTRAP): run scripts/setup.sh")
        });
        Self::tansu(bin, None, None)
    }

    /// `bin` started on a free port, advertising `advertised` (else its own port), its log on
    /// the S3 endpoint `s3` (else in memory).
    fn tansu(bin: PathBuf, advertised: Option<u16>, s3: Option<(Process, u16)>) -> Self {
        let port = free_port();
        let mut s = Self {
            process: Process::new("tansu"),
            bin: Some(bin),
            bootstrap: format!("127.0.0.1:{port}"),
            port: Some(port),
            advertised,
            s3,
            authentication: false,
        };
        s.spawn();
        s
    }

    /// A durable tansu ([`Self::start_durable`]) with `topics` (name, partitions), created with
    /// `tansu topic create`, then restarted on the same storage requiring SASL authentication
    /// (`--authentication`). Tansu's `user create` answers success but the broker then knows no
    /// such user ("unknown-user"), so this serves the refusal path only. `None` as
    /// [`Self::start_durable`].
    pub fn start_requiring_sasl(topics: &[(&str, i32)]) -> Option<Self> {
        let mut s = Self::start_durable()?;
        let (Some(bin), Some(port)) = (s.bin.clone(), s.port) else {
            return None;
        };
        let broker = format!("tcp://127.0.0.1:{port}");
        for (name, partitions) in topics {
            let p = partitions.to_string();
            let out = Command::new(&bin)
                .args([
                    "topic",
                    "create",
                    "--broker",
                    &broker,
                    "--partitions",
                    &p,
                    name,
                ])
                .output()
                .expect("run tansu topic create");
            assert!(
                out.status.success(),
                "tansu topic create {name}: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        s.authentication = true;
        s.restart();
        Some(s)
    }

    /// Tansu with its log on an S3 endpoint of its own (see the type's docs); `None`, saying
    /// why, when tansu or `moto_server` is missing (under `CI` a missing one fails), or when
    /// `WEIR_KAFKA_BOOTSTRAP` names a broker the test may not kill.
    pub fn start_durable() -> Option<Self> {
        if std::env::var_os("WEIR_KAFKA_BOOTSTRAP").is_some() {
            eprintln!("SKIP: WEIR_KAFKA_BOOTSTRAP names a broker the test may not kill");
            return None;
        }
        let (Some(bin), Some(moto)) = (local::tansu(), local::moto_server()) else {
            let why = "a durable tansu needs tansu and moto_server (or set $TANSU and \
                       $MOTO_SERVER): run scripts/setup.sh";
            if std::env::var_os("CI").is_some() {
                panic!("{why}");
            }
            eprintln!("SKIP: {why}");
            return None;
        };
        let s3_port = free_port();
        let mut s3 = Process::new("moto_server");
        s3.spawn(
            {
                let mut c = Command::new(moto);
                c.args(["-H", "127.0.0.1", "-p", &s3_port.to_string()]);
                c
            },
            Stdio::null(),
        );
        s3.wait(
            Duration::from_secs(30),
            || local::listening(s3_port, Duration::from_millis(200)),
            String::new,
        );
        create_bucket(s3_port, "tansu");
        Some(Self::tansu(bin, None, Some((s3, s3_port))))
    }

    /// Starts tansu on a free port, telling clients to connect to `127.0.0.1:advertised` (where
    /// a [`crate::TlsFront`] forwards to [`Self::port`]); `None` when tansu is not installed.
    pub fn start_advertising(advertised: u16) -> Option<Self> {
        Some(Self::tansu(local::tansu()?, Some(advertised), None))
    }

    /// The port tansu listens on (`None` for `WEIR_KAFKA_BOOTSTRAP`).
    pub fn port(&self) -> Option<u16> {
        self.port
    }

    /// The binary a test needs, or `None` (the test skips, saying so; under `CI` it fails).
    pub fn require() -> Option<()> {
        if std::env::var_os("WEIR_KAFKA_BOOTSTRAP").is_some() || local::tansu().is_some() {
            return Some(());
        }
        let why = "tansu not found (or set $TANSU, or WEIR_KAFKA_BOOTSTRAP): run scripts/setup.sh";
        if std::env::var_os("CI").is_some() {
            panic!("{why}");
        }
        eprintln!("SKIP: {why}");
        None
    }

    fn spawn(&mut self) {
        let (Some(bin), Some(port)) = (self.bin.clone(), self.port) else {
            return;
        };
        let advertised = self.advertised.unwrap_or(port);
        let mut command = match &self.s3 {
            None => local::kafka_command_advertising(&bin, port, advertised),
            Some((_, s3_port)) => {
                let mut c = local::kafka_command_stored(&bin, port, advertised, "s3://tansu/");
                c.envs(local::s3_env(*s3_port));
                c
            }
        };
        if self.authentication {
            command.arg("--authentication");
        }
        self.process.spawn(command, Stdio::null());
        self.process.wait(
            Duration::from_secs(20),
            || local::listening(port, Duration::from_millis(200)),
            String::new,
        );
    }

    /// `host:port` list for a Kafka client's `bootstrap.servers`.
    pub fn bootstrap(&self) -> &str {
        &self.bootstrap
    }

    /// `kafka://<bootstrap>`, as a Broker's `url`.
    pub fn url(&self) -> String {
        format!("kafka://{}", self.bootstrap)
    }

    /// Whether this is a broker the test started (and may kill).
    pub fn is_local(&self) -> bool {
        self.bin.is_some()
    }

    /// Whether the log survives [`restart`](Self::restart): on [`start_durable`](Self::start_durable)'s
    /// storage, not on the memory storage of [`start`](Self::start).
    pub fn keeps_log_across_restart(&self) -> bool {
        self.s3.is_some()
    }

    /// SIGKILL, as a crash would (no-op on an external broker).
    pub fn kill9(&mut self) {
        self.process.kill9();
    }

    /// Starts the broker again on the same port (empty: see the type's docs).
    pub fn restart(&mut self) {
        self.kill9();
        self.spawn();
    }
}

/// Creates `bucket` on the S3 endpoint at `127.0.0.1:port` (moto takes an unsigned request).
fn create_bucket(port: u16, bucket: &str) {
    let mut c = TcpStream::connect(loopback(port)).expect("connect to the S3 endpoint");
    write!(
        c,
        "PUT /{bucket} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
    )
    .expect("create the bucket");
    let mut answer = String::new();
    let _ = c.read_to_string(&mut answer);
    assert!(
        answer.starts_with("HTTP/1.1 200"),
        "the S3 endpoint did not create bucket {bucket}: {answer}"
    );
}
