//! The three brokers as real processes on free loopback ports (start, `kill -9`, restart on the
//! same port and data directory, persistence on), and what the conformance suite reads from each
//! of them directly: stream lengths, dead letters, consumer backlogs, raw publishes.

use super::*;
use bytes::Bytes;
use futures::StreamExt;
use std::collections::BTreeMap;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    Nats,
    Redis,
    Rabbitmq,
}

impl Kind {
    pub fn name(self) -> &'static str {
        match self {
            Kind::Nats => "nats",
            Kind::Redis => "redis",
            Kind::Rabbitmq => "rabbitmq",
        }
    }

    pub fn scheme(self) -> &'static str {
        match self {
            Kind::Nats => "nats://",
            Kind::Redis => "redis://",
            Kind::Rabbitmq => "amqp://",
        }
    }

    /// Whether the broker itself drops a repeated event id at publish (`duplicate: true`).
    pub fn drops_duplicate_publishes(self) -> bool {
        matches!(self, Kind::Nats | Kind::Redis)
    }

    /// Whether the queue keeps messages after they are acknowledged (a stream), so the suite
    /// can read them back (RabbitMQ's queues do not).
    pub fn keeps_messages(self) -> bool {
        matches!(self, Kind::Nats | Kind::Redis)
    }
}

fn find_bin(env: &str, names: &[&str]) -> Option<PathBuf> {
    if let Ok(p) = std::env::var(env) {
        return Some(PathBuf::from(p));
    }
    let repo = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..");
    for n in names {
        let local = repo.join(".tools/bin").join(n);
        if local.exists() {
            return Some(local);
        }
        let p = PathBuf::from(n);
        if p.is_absolute() && p.exists() {
            return Some(p);
        }
        if let Some(found) = std::env::var_os("PATH").and_then(|paths| {
            std::env::split_paths(&paths)
                .map(|d| d.join(n))
                .find(|p| p.exists())
        }) {
            return Some(found);
        }
    }
    None
}

/// The broker's server binary, or `None` (the test skips) unless `CI` is set (then it fails).
pub fn require(kind: Kind) -> Option<PathBuf> {
    let found = match kind {
        Kind::Nats => nats_server_bin(),
        Kind::Redis => find_bin("REDIS_SERVER", &["redis-server"]),
        Kind::Rabbitmq => find_bin(
            "RABBITMQ_SERVER",
            &["/usr/lib/rabbitmq/bin/rabbitmq-server"],
        ),
    };
    match found {
        Some(p) => Some(p),
        None if std::env::var_os("CI").is_some() => {
            panic!("{} server not found: run scripts/setup.sh", kind.name())
        }
        None => {
            eprintln!(
                "SKIP: {} server not found (run scripts/setup.sh)",
                kind.name()
            );
            None
        }
    }
}

/// A real redis-server on a free loopback port, append-only file fsynced at every write.
pub struct RedisServer {
    bin: PathBuf,
    child: Option<Child>,
    pub port: u16,
    pub dir: tempfile::TempDir,
    password: Option<String>,
    extra: Vec<String>,
}

impl RedisServer {
    pub async fn start(bin: PathBuf) -> RedisServer {
        Self::start_with_password(bin, None).await
    }

    /// With `requirepass` when `password` is given.
    pub async fn start_with_password(bin: PathBuf, password: Option<&str>) -> RedisServer {
        Self::start_with_args(bin, password, &[]).await
    }

    /// With extra command-line arguments (e.g. a TLS port beside the plain one, which the
    /// start-up check uses).
    pub async fn start_with_args(
        bin: PathBuf,
        password: Option<&str>,
        extra: &[String],
    ) -> RedisServer {
        let mut r = RedisServer {
            bin,
            child: None,
            port: free_addr().port(),
            dir: tempfile::tempdir().unwrap(),
            password: password.map(str::to_string),
            extra: extra.to_vec(),
        };
        r.spawn().await;
        r
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    fn authed_url(&self) -> String {
        match &self.password {
            Some(p) => format!("redis://:{p}@127.0.0.1:{}", self.port),
            None => self.url(),
        }
    }

    async fn spawn(&mut self) {
        let mut cmd = Command::new(&self.bin);
        if let Some(p) = &self.password {
            cmd.args(["--requirepass", p]);
        }
        let child = cmd
            .args(["--port", &self.port.to_string(), "--bind", "127.0.0.1"])
            .arg("--dir")
            .arg(self.dir.path())
            .args(["--appendonly", "yes", "--save", "", "--appendfsync"])
            // `always` unless the benchmark asks otherwise (PUBSUB_REDIS_FSYNC=everysec).
            .arg(std::env::var("PUBSUB_REDIS_FSYNC").unwrap_or_else(|_| "always".into()))
            .args(["--daemonize", "no", "--protected-mode", "no"])
            .args(&self.extra)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn redis-server");
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if let Ok(c) = redis::Client::open(self.authed_url())
                && let Ok(mut con) = c.get_multiplexed_async_connection().await
                && redis::cmd("PING")
                    .query_async::<String>(&mut con)
                    .await
                    .is_ok()
            {
                return;
            }
            assert!(Instant::now() < deadline, "redis-server did not start");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    pub fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    pub async fn restart(&mut self) {
        self.kill9();
        self.spawn().await;
    }

    pub async fn con(&self) -> redis::aio::MultiplexedConnection {
        redis::Client::open(self.authed_url())
            .unwrap()
            .get_multiplexed_async_connection()
            .await
            .unwrap()
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        self.kill9();
    }
}

/// A real rabbitmq-server on free loopback ports (AMQP and Erlang distribution), its own epmd,
/// node name, cookie (in a temporary HOME), database and log directories.
pub struct RabbitServer {
    bin: PathBuf,
    child: Option<Child>,
    epmd: Option<Child>,
    pub port: u16,
    dist_port: u16,
    epmd_port: u16,
    pub dir: tempfile::TempDir,
}

impl RabbitServer {
    pub async fn start(bin: PathBuf) -> RabbitServer {
        Self::start_with_conf(bin, "").await
    }

    /// With `extra` appended to rabbitmq.conf (e.g. a TLS listener beside the plain one, which
    /// the start-up check uses).
    pub async fn start_with_conf(bin: PathBuf, extra: &str) -> RabbitServer {
        let dir = tempfile::tempdir().unwrap();
        let home = dir.path().join("home");
        std::fs::create_dir_all(&home).unwrap();
        let cookie = home.join(".erlang.cookie");
        std::fs::write(&cookie, format!("weirtest{}", std::process::id())).unwrap();
        std::fs::set_permissions(&cookie, std::os::unix::fs::PermissionsExt::from_mode(0o400))
            .unwrap();
        let port = free_addr().port();
        std::fs::write(
            dir.path().join("rabbitmq.conf"),
            format!(
                "listeners.tcp.default = 127.0.0.1:{port}\nloopback_users = none\n\
                 log.console = false\nlog.file.level = warning\n{extra}"
            ),
        )
        .unwrap();
        let mut r = RabbitServer {
            bin,
            child: None,
            epmd: None,
            port,
            dist_port: free_addr().port(),
            epmd_port: free_addr().port(),
            dir,
        };
        let epmd =
            Command::new(find_bin("EPMD", &["epmd"]).unwrap_or_else(|| PathBuf::from("epmd")))
                .args(["-port", &r.epmd_port.to_string(), "-address", "127.0.0.1"])
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .expect("spawn epmd");
        r.epmd = Some(epmd);
        r.spawn().await;
        r
    }

    pub fn url(&self) -> String {
        format!("amqp://127.0.0.1:{}/%2f", self.port)
    }

    fn env(&self, c: &mut Command) {
        let d = self.dir.path();
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

    async fn spawn(&mut self) {
        let mut c = Command::new(&self.bin);
        self.env(&mut c);
        std::os::unix::process::CommandExt::process_group(&mut c, 0);
        let child = c
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn rabbitmq-server");
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if let Ok(Ok(conn)) = tokio::time::timeout(
                Duration::from_secs(2),
                lapin::Connection::connect(&self.url(), Default::default()),
            )
            .await
            {
                let _ = conn.close(200, "ok".into()).await;
                return;
            }
            assert!(Instant::now() < deadline, "rabbitmq-server did not start");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// `kill -9` of the server's whole process group (the start script, the Erlang VM and its
    /// helpers).
    pub fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = Command::new("kill")
                .args(["-9", "--", &format!("-{}", c.id())])
                .status();
            let _ = c.wait();
        }
    }

    pub async fn restart(&mut self) {
        self.kill9();
        self.spawn().await;
    }

    pub async fn channel(&self) -> (lapin::Connection, lapin::Channel) {
        let conn = lapin::Connection::connect(&self.url(), Default::default())
            .await
            .unwrap();
        let ch = conn.create_channel().await.unwrap();
        (conn, ch)
    }

    /// `rabbitmqctl list_queues` for `queue`: (ready, unacknowledged).
    pub fn queue_counts(&self, queue: &str) -> Option<(u64, u64)> {
        let mut c = Command::new("/usr/lib/rabbitmq/bin/rabbitmqctl");
        self.env(&mut c);
        let out = c
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

impl Drop for RabbitServer {
    fn drop(&mut self) {
        self.kill9();
        if let Some(mut e) = self.epmd.take() {
            let _ = e.kill();
            let _ = e.wait();
        }
    }
}

/// A dead letter or stream message, whatever the broker: body, headers (names lowercased) and
/// its position (stream sequence or entry id).
#[derive(Clone, Debug)]
pub struct Stored {
    pub payload: Bytes,
    pub headers: BTreeMap<String, String>,
    pub position: String,
}

impl Stored {
    pub fn h(&self, name: &str) -> &str {
        self.headers
            .get(&name.to_ascii_lowercase())
            .map(|s| s.as_str())
            .unwrap_or("")
    }
}

/// One broker of the conformance suite.
pub enum TestBroker {
    Nats(Nats),
    Redis(RedisServer),
    Rabbitmq(RabbitServer),
}

impl TestBroker {
    /// Starts the broker, or `None` when its binary is missing (outside CI).
    pub async fn start(kind: Kind) -> Option<TestBroker> {
        let bin = require(kind)?;
        Some(match kind {
            Kind::Nats => TestBroker::Nats(Nats::start(bin).await),
            Kind::Redis => TestBroker::Redis(RedisServer::start(bin).await),
            Kind::Rabbitmq => TestBroker::Rabbitmq(RabbitServer::start(bin).await),
        })
    }

    pub fn kind(&self) -> Kind {
        match self {
            TestBroker::Nats(_) => Kind::Nats,
            TestBroker::Redis(_) => Kind::Redis,
            TestBroker::Rabbitmq(_) => Kind::Rabbitmq,
        }
    }

    pub fn url(&self) -> String {
        match self {
            TestBroker::Nats(n) => n.url(),
            TestBroker::Redis(r) => r.url(),
            TestBroker::Rabbitmq(r) => r.url(),
        }
    }

    pub fn kill9(&mut self) {
        match self {
            TestBroker::Nats(n) => n.kill9(),
            TestBroker::Redis(r) => r.kill9(),
            TestBroker::Rabbitmq(r) => r.kill9(),
        }
    }

    pub async fn restart(&mut self) {
        match self {
            TestBroker::Nats(n) => n.restart().await,
            TestBroker::Redis(r) => r.restart().await,
            TestBroker::Rabbitmq(r) => r.restart().await,
        }
    }

    pub fn publisher(&self) -> MessagingConfig {
        let mut m = publisher_messaging(&self.url());
        m.broker_kind = self.kind().name().into();
        m
    }

    pub fn consumer(&self, c: ConsumeConfig) -> MessagingConfig {
        let mut m = consumer_messaging(&self.url(), c);
        m.broker_kind = self.kind().name().into();
        m
    }

    /// Declares the queue as the operator would (JetStream: the stream; Redis: nothing, the
    /// stream appears with its first entry or consumer group; RabbitMQ: the exchange, the
    /// dead-letter exchange and queue, and the consumer queue of `billing`).
    pub async fn declare(&self) {
        match self {
            TestBroker::Nats(n) => declare_stream(&n.js().await).await,
            TestBroker::Redis(_) => {}
            TestBroker::Rabbitmq(_) => self.declare_queue(STREAM, "billing").await,
        }
    }

    /// RabbitMQ: declares `consumer`'s queue on the queue whose stream is `stream` (an event no
    /// queue is bound for is refused at publish); nothing elsewhere.
    pub async fn declare_queue(&self, stream: &str, consumer: &str) {
        if let TestBroker::Rabbitmq(r) = self {
            let conn = lapin::Connection::connect(&r.url(), Default::default())
                .await
                .unwrap();
            let mut c = consume_config(consumer);
            c.stream = stream.into();
            c.dead_letter_stream = format!("{stream}_dlq");
            weir_broker::rabbitmq::transport::declare_consumer(&conn, &c, Duration::from_secs(600))
                .await
                .unwrap();
            let _ = conn.close(200, "ok".into()).await;
        }
    }

    /// Messages stored in the stream `name`.
    pub async fn len(&self, name: &str) -> u64 {
        match self {
            TestBroker::Nats(n) => stream_len(&n.js().await, name).await,
            TestBroker::Redis(r) => {
                let mut con = r.con().await;
                redis::cmd("XLEN")
                    .arg(name)
                    .query_async::<u64>(&mut con)
                    .await
                    .unwrap_or(0)
            }
            TestBroker::Rabbitmq(r) => {
                // The queue itself (dead letters), else the consumer queues of the stream.
                let names = [
                    name.to_string(),
                    format!("{name}.billing"),
                    format!("{name}.audit"),
                ];
                let mut n = 0;
                for q in names {
                    let (conn, ch) = r.channel().await;
                    if let Ok(q) = ch
                        .queue_declare(
                            q.as_str().into(),
                            lapin::options::QueueDeclareOptions {
                                passive: true,
                                ..Default::default()
                            },
                            Default::default(),
                        )
                        .await
                    {
                        n += u64::from(q.message_count());
                    }
                    let _ = conn.close(200, "ok".into()).await;
                }
                n
            }
        }
    }

    /// Every message of the stream `name`, oldest first.
    pub async fn messages(&self, name: &str) -> Vec<Stored> {
        match self {
            TestBroker::Nats(n) => stream_messages(&n.js().await, name)
                .await
                .into_iter()
                .map(|m| Stored {
                    payload: m.payload.clone(),
                    headers: m
                        .headers
                        .iter()
                        .map(|(k, v)| {
                            let k: &str = k.as_ref();
                            (k.to_ascii_lowercase(), v[0].as_str().to_string())
                        })
                        .collect(),
                    position: m.sequence.to_string(),
                })
                .collect(),
            TestBroker::Redis(r) => {
                let mut con = r.con().await;
                let v: redis::Value = redis::cmd("XRANGE")
                    .arg(name)
                    .arg("-")
                    .arg("+")
                    .query_async(&mut con)
                    .await
                    .unwrap();
                weir_broker::redis::transport::parse_entries(&v)
                    .into_iter()
                    .map(|e| Stored {
                        payload: e.data,
                        headers: e
                            .headers
                            .into_iter()
                            .map(|(k, v)| (k.to_ascii_lowercase(), v))
                            .collect(),
                        position: e.id,
                    })
                    .collect()
            }
            TestBroker::Rabbitmq(r) => {
                // Gets every message without acknowledging it; closing the channel puts them back.
                let (conn, ch) = r.channel().await;
                let mut out = Vec::new();
                while let Ok(Some(m)) = ch
                    .basic_get(name.into(), lapin::options::BasicGetOptions::default())
                    .await
                {
                    let headers =
                        weir_broker::rabbitmq::transport::headers_of(&m.delivery.properties);
                    out.push(Stored {
                        payload: Bytes::from(m.delivery.data.clone()),
                        headers: headers
                            .into_iter()
                            .map(|(k, v)| (k.to_ascii_lowercase(), v))
                            .collect(),
                        position: m
                            .delivery
                            .properties
                            .message_id()
                            .as_ref()
                            .map(|s| s.as_str().to_string())
                            .unwrap_or_default(),
                    });
                }
                let _ = conn.close(200, "ok".into()).await;
                out
            }
        }
    }

    /// Publishes an event straight to the queue, bypassing any sidecar, with the CloudEvents
    /// headers a publishing sidecar writes; `dedup_id` is what the broker dedupes on where it
    /// does (JetStream's `Nats-Msg-Id`).
    pub async fn raw_publish(&self, id: &str, dedup_id: &str, body: &str) {
        let mut h = ce_headers(id);
        if self.kind() == Kind::Nats {
            h.push(("Nats-Msg-Id", dedup_id.into()));
        }
        let h: Vec<(&str, &str)> = h.iter().map(|(k, v)| (*k, v.as_str())).collect();
        self.raw_publish_headers(&h, body.as_bytes()).await;
    }

    /// Publishes a message with exactly `headers` (none: as a producer that knows nothing of
    /// CloudEvents writes it) straight to the queue, as each broker carries headers: JetStream
    /// headers, Redis fields beside `data`, AMQP headers (and `message_id` = the `ce-id`, if
    /// any, as a sidecar sets it; none otherwise).
    pub async fn raw_publish_headers(&self, headers: &[(&str, &str)], body: &[u8]) {
        match self {
            TestBroker::Nats(n) => {
                raw_publish_headers(&n.js().await, headers, body).await;
            }
            TestBroker::Redis(r) => {
                let mut con = r.con().await;
                let mut cmd = redis::cmd("XADD");
                cmd.arg(STREAM).arg("*");
                for (k, v) in headers {
                    cmd.arg(*k).arg(*v);
                }
                let _: String = cmd
                    .arg("data")
                    .arg(body)
                    .query_async(&mut con)
                    .await
                    .unwrap();
            }
            TestBroker::Rabbitmq(r) => {
                let (conn, ch) = r.channel().await;
                ch.confirm_select(Default::default()).await.unwrap();
                rabbit_publish(&ch, headers, body).await;
                let _ = conn.close(200, "ok".into()).await;
            }
        }
    }

    /// Publishes many `(event id, body)` straight to the queue, waiting for every confirmation.
    pub async fn raw_publish_many(&self, events: Vec<(String, String)>) {
        match self {
            TestBroker::Nats(n) => {
                let js = n.js().await;
                let mut acks = Vec::with_capacity(events.len());
                for (id, body) in events {
                    let mut h = async_nats::HeaderMap::new();
                    for (k, v) in ce_headers(&id) {
                        h.insert(k, v.as_str());
                    }
                    h.insert("Nats-Msg-Id", id.as_str());
                    acks.push(
                        js.publish_with_headers(SUBJECT, h, body.into())
                            .await
                            .unwrap(),
                    );
                }
                for a in acks {
                    a.await.unwrap();
                }
            }
            TestBroker::Redis(r) => {
                let mut con = r.con().await;
                for chunk in events.chunks(500) {
                    let mut p = redis::pipe();
                    for (id, body) in chunk {
                        let c = p.cmd("XADD").arg(STREAM).arg("*");
                        for (k, v) in ce_headers(id) {
                            c.arg(k).arg(v);
                        }
                        c.arg("data").arg(body);
                    }
                    let _: Vec<String> = p.query_async(&mut con).await.unwrap();
                }
            }
            TestBroker::Rabbitmq(r) => {
                let (conn, ch) = r.channel().await;
                ch.confirm_select(Default::default()).await.unwrap();
                for chunk in events.chunks(500) {
                    let mut confirms = Vec::new();
                    for (id, body) in chunk {
                        confirms.push(
                            ch.basic_publish(
                                STREAM.into(),
                                SUBJECT.into(),
                                lapin::options::BasicPublishOptions {
                                    mandatory: true,
                                    ..Default::default()
                                },
                                body.as_bytes(),
                                rabbit_props(
                                    &ce_headers(id)
                                        .iter()
                                        .map(|(k, v)| (*k, v.as_str()))
                                        .collect::<Vec<_>>(),
                                ),
                            )
                            .await
                            .unwrap(),
                        );
                    }
                    for c in confirms {
                        assert_eq!(c.await.unwrap(), lapin::Confirmation::Ack(None));
                    }
                }
                let _ = conn.close(200, "ok".into()).await;
            }
        }
    }

    /// (messages not yet delivered to `consumer`, deliveries not yet settled).
    pub async fn backlog(&self, consumer: &str) -> (u64, u64) {
        match self {
            TestBroker::Nats(n) => {
                let js = n.js().await;
                let stream = js.get_stream(STREAM).await.unwrap();
                let mut c: async_nats::jetstream::consumer::PullConsumer =
                    stream.get_consumer(consumer).await.unwrap();
                let i = c.info().await.unwrap();
                (i.num_pending, i.num_ack_pending as u64)
            }
            TestBroker::Redis(r) => {
                let mut con = r.con().await;
                let groups: redis::Value = redis::cmd("XINFO")
                    .arg("GROUPS")
                    .arg(STREAM)
                    .query_async(&mut con)
                    .await
                    .unwrap_or(redis::Value::Nil);
                let last: String = {
                    let v: redis::Value = redis::cmd("XREVRANGE")
                        .arg(STREAM)
                        .arg("+")
                        .arg("-")
                        .arg("COUNT")
                        .arg(1)
                        .query_async(&mut con)
                        .await
                        .unwrap();
                    weir_broker::redis::transport::parse_entries(&v)
                        .first()
                        .map(|e| e.id.clone())
                        .unwrap_or_else(|| "0-0".into())
                };
                let redis::Value::Array(groups) = groups else {
                    return (0, 0);
                };
                for g in groups {
                    let fields = redis_map(&g);
                    if fields.get("name").map(String::as_str) != Some(consumer) {
                        continue;
                    }
                    let pending: u64 = fields["pending"].parse().unwrap();
                    let delivered = fields["last-delivered-id"].clone();
                    let undelivered = u64::from(delivered != last && last != "0-0");
                    return (undelivered, pending);
                }
                (u64::from(last != "0-0"), 0)
            }
            TestBroker::Rabbitmq(r) => {
                let q = format!("{STREAM}.{consumer}");
                r.queue_counts(&q).unwrap_or((u64::MAX, u64::MAX))
            }
        }
    }

    /// Waits until `consumer` has nothing undelivered or unsettled.
    pub async fn wait_settled(&self, consumer: &str, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        loop {
            let (pending, unacked) = self.backlog(consumer).await;
            if pending == 0 && unacked == 0 {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "consumer not settled: undelivered {pending}, unacknowledged {unacked}"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Whether the processed-event store holds `consumer`'s record of `id`.
    pub async fn processed(&self, consumer: &str, id: &str) -> bool {
        let key = weir_proxy::bridge::cloudevents::processed_key(consumer, id);
        match self {
            TestBroker::Nats(n) => {
                let kv = n
                    .js()
                    .await
                    .get_key_value("weir_processed_shop_orders")
                    .await
                    .unwrap();
                kv.get(key).await.unwrap().is_some()
            }
            TestBroker::Redis(r) => {
                let mut con = r.con().await;
                let n: i64 = redis::cmd("EXISTS")
                    .arg(weir_broker::redis::processed_record(STREAM, &key))
                    .query_async(&mut con)
                    .await
                    .unwrap();
                n == 1
            }
            TestBroker::Rabbitmq(r) => {
                // Reads the processed-event stream from its start until it is quiet.
                let (conn, ch) = r.channel().await;
                ch.basic_qos(1000, Default::default()).await.unwrap();
                let mut args = lapin::types::FieldTable::default();
                args.insert(
                    "x-stream-offset".into(),
                    lapin::types::AMQPValue::LongString("first".into()),
                );
                let mut c = ch
                    .basic_consume(
                        "weir_processed_shop_orders".into(),
                        "probe".into(),
                        Default::default(),
                        args,
                    )
                    .await
                    .unwrap();
                let mut found = false;
                while let Ok(Some(Ok(d))) =
                    tokio::time::timeout(Duration::from_millis(500), c.next()).await
                {
                    found |= d.data == key.as_bytes();
                    let _ = d.ack(Default::default()).await;
                }
                let _ = conn.close(200, "ok".into()).await;
                found
            }
        }
    }
}

/// A flat `[name, value, ...]` reply as a map of strings.
fn redis_map(v: &redis::Value) -> BTreeMap<String, String> {
    let redis::Value::Array(a) = v else {
        return BTreeMap::new();
    };
    let s = |v: &redis::Value| match v {
        redis::Value::BulkString(b) => String::from_utf8_lossy(b).into_owned(),
        redis::Value::SimpleString(s) => s.clone(),
        redis::Value::Int(i) => i.to_string(),
        _ => String::new(),
    };
    a.chunks(2)
        .filter(|kv| kv.len() == 2)
        .map(|kv| (s(&kv[0]), s(&kv[1])))
        .collect()
}

/// AMQP properties carrying `headers`, persistent, `message_id` = the `ce-id` among them (as a
/// sidecar publishes an event), none without one.
fn rabbit_props(headers: &[(&str, &str)]) -> lapin::BasicProperties {
    let mut h = lapin::types::FieldTable::default();
    for (k, v) in headers {
        h.insert(
            (*k).into(),
            lapin::types::AMQPValue::LongString((*v).into()),
        );
    }
    let p = lapin::BasicProperties::default()
        .with_headers(h)
        .with_delivery_mode(2);
    match headers.iter().find(|(k, _)| *k == "ce-id") {
        Some((_, id)) => p.with_message_id((*id).into()),
        None => p,
    }
}

async fn rabbit_publish(ch: &lapin::Channel, headers: &[(&str, &str)], body: &[u8]) {
    let c = ch
        .basic_publish(
            STREAM.into(),
            SUBJECT.into(),
            lapin::options::BasicPublishOptions {
                mandatory: true,
                ..Default::default()
            },
            body,
            rabbit_props(headers),
        )
        .await
        .unwrap()
        .await
        .unwrap();
    assert_eq!(
        c,
        lapin::Confirmation::Ack(None),
        "published to a bound queue"
    );
}
