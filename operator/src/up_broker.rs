//! `weir up --broker nats|redis|rabbitmq`: the local broker, started like nats-server always
//! was: on a free loopback port, its data under the work directory, in a process group of its
//! own that gets SIGTERM should `weir up` die.
//!
//! - `redis`: Debian's `redis-server`, append-only file with `fsync always`.
//! - `rabbitmq`: Debian's `rabbitmq-server` start script run as the current user, with its own
//!   epmd, node name, Erlang cookie (a HOME under the work directory), database and logs; it
//!   takes a few seconds to boot.
//!
//! Sagas keep their log on JetStream whatever the broker: with `redis` or `rabbitmq`, a
//! nats-server is started beside it for the saga coordinators (see docs/messaging.md).

use anyhow::{Context, Result, anyhow};
use std::net::{Ipv4Addr, SocketAddr};
use std::os::unix::process::CommandExt as _;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};
use tokio::process::{Child, Command};
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

/// A local broker: its processes (label, child) and the URL to give the sidecars.
pub struct Started {
    pub children: Vec<(String, Child)>,
    pub url: String,
}

fn command(program: impl AsRef<std::ffi::OsStr>) -> Command {
    let mut c = std::process::Command::new(program);
    c.process_group(0);
    // SAFETY: prctl(2) is async-signal-safe; it only sets this child's parent-death signal.
    unsafe {
        c.pre_exec(|| {
            libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGTERM);
            Ok(())
        });
    }
    let mut c = Command::from(c);
    c.stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    c
}

fn free_port() -> Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
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

async fn wait_port(what: &str, port: u16, timeout: Duration, child: &mut Child) -> Result<()> {
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

/// Starts the broker of `kind` under `work_dir`.
pub async fn start(kind: BrokerKind, work_dir: &Path) -> Result<Started> {
    match kind {
        BrokerKind::Nats => {
            let (child, url) = crate::up::start_nats(work_dir).await?;
            Ok(Started {
                children: vec![("nats".into(), child)],
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
    let mut child = command(&bin)
        .args(["--port", &port.to_string(), "--bind", "127.0.0.1"])
        .arg("--dir")
        .arg(&dir)
        .args([
            "--appendonly",
            "yes",
            "--appendfsync",
            "always",
            "--save",
            "",
        ])
        .args(["--daemonize", "no", "--protected-mode", "no"])
        .spawn()
        .with_context(|| format!("start {}", bin.display()))?;
    wait_port("redis-server", port, Duration::from_secs(20), &mut child).await?;
    Ok(Started {
        children: vec![("redis".into(), child)],
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
    let epmd = command(&epmd_bin)
        .args(["-port", &epmd_port.to_string(), "-address", "127.0.0.1"])
        .spawn()
        .with_context(|| format!("start {}", epmd_bin.display()))?;
    let mut child = command(&bin)
        .env("HOME", &home)
        .env("RABBITMQ_NODENAME", format!("weirup{port}@localhost"))
        .env("RABBITMQ_NODE_IP_ADDRESS", "127.0.0.1")
        .env("RABBITMQ_NODE_PORT", port.to_string())
        .env("RABBITMQ_DIST_PORT", dist_port.to_string())
        .env("ERL_EPMD_PORT", epmd_port.to_string())
        .env("ERL_EPMD_ADDRESS", "127.0.0.1")
        .env("RABBITMQ_MNESIA_BASE", dir.join("mnesia"))
        .env("RABBITMQ_LOG_BASE", dir.join("log"))
        .env("RABBITMQ_CONFIG_FILE", dir.join("rabbitmq"))
        .env("RABBITMQ_ENABLED_PLUGINS_FILE", dir.join("plugins"))
        .env("RABBITMQ_PID_FILE", dir.join("pid"))
        .spawn()
        .with_context(|| format!("start {}", bin.display()))?;
    // The AMQP listener opens once the broker has booted (5–10 s).
    wait_port("rabbitmq-server", port, Duration::from_secs(90), &mut child).await?;
    Ok(Started {
        children: vec![("rabbitmq".into(), child), ("epmd".into(), epmd)],
        url: format!("amqp://127.0.0.1:{port}/%2f"),
    })
}
