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

use crate::up::{BrokerProcess, ProcKind, ProcSpec, free_port};
use anyhow::{Result, anyhow};
use std::ffi::OsString;
use std::net::{Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};
use tokio::process::Child;
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
            let (process, url) = crate::up::start_nats(work_dir).await?;
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
