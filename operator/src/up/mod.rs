//! `weir up`: the manifests of a system run on one machine, without a cluster. Each
//! Microservice's app runs as a local process (the command in its `weir.dev/local-command`
//! annotation) beside its own `weir-proxy`, wired exactly as in a pod: the same config contract
//! built by the same code, the same env vars, ports chosen free on loopback.
//!
//! By concern, in the order a run goes through them:
//! - [`plan`](mod@plan): what runs where (ports, sidecar configs, app commands and env); pure but for
//!   port picks, and what the tests check.
//! - [`brokers`]: the local broker (`--broker nats|redis|rabbitmq|kafka`) and its queues.
//! - `sagas`: a coordinator per Saga, beside its own sidecar when the broker is not NATS.
//! - [`supervise`]: the running processes: started in order, restarted when they exit,
//!   stopped apps first.
//! - `process`: one process: its command line, process group, signals and ports (the only
//!   `unsafe` code of `weir up`).
//! - this module: the run loop, from the manifests to Ctrl-C, and the state file; with
//!   `--dashboard`, the page of [`crate::dashboard`] over the running processes.

pub mod brokers;
pub mod mtls;
pub mod plan;
mod process;
mod sagas;
pub mod supervise;

pub use plan::{
    LOCAL_COMMAND, LOCAL_PORT, LOCAL_USAGE, LOCAL_WORKDIR, LocalPlacement, LocalPorts,
    LocalService, PlanOptions, local_messaging, needs_broker, plan, plan_with,
};
pub use process::{find_binary, free_port, http_ok};
pub use supervise::{LocalSaga, Running, UpError, UpOptions, start};

use crate::manifest::{Loaded, Object};
use anyhow::{Result, bail};
use brokers::{declare_queues, start_nats};
use sagas::{COORDINATOR_SUFFIX, coordinator_services, replica_name, write_coordinator_configs};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// Settings of one `weir up` run.
pub struct RunOptions {
    pub broker_url: Option<String>,
    /// The broker to start when `broker_url` is not given (`--broker`).
    pub broker: weir_crds::broker::BrokerKind,
    pub proxy_bin: Option<PathBuf>,
    pub work_dir: Option<PathBuf>,
    pub namespace: String,
    pub state_file: Option<PathBuf>,
    pub ready_timeout: Duration,
    /// Sends every sidecar's spans (OTLP/HTTP) here, overriding the manifests.
    pub otlp_endpoint: Option<String>,
    /// Exit when a process exits instead of restarting it.
    pub no_restart: bool,
    /// Choose every port free, ignoring `weir.dev/local-port`.
    pub any_port: bool,
    /// Local stand-ins for Secrets: `<dir>/<secret name>/<key>`.
    pub secrets_dir: Option<PathBuf>,
    /// Plaintext between the sidecars: no CA of the run, no authorization by the graph.
    pub no_mtls: bool,
    /// Serve the dashboard (`--dashboard ADDR`, `--dashboard-actions`).
    pub dashboard: Option<crate::dashboard::DashboardOptions>,
}

/// Writes the state file: ports and pids by replica, saga coordinator URLs, the broker's URL
/// (as given to the sidecars, credentials included: tools connect with it) and each broker
/// process's pid and port. Whole, then renamed, so a reader never sees half a file.
fn write_state(
    f: &Path,
    running: &Running,
    broker_url: Option<&str>,
    ca: Option<&mtls::LocalCa>,
) -> Result<(), UpError> {
    let failed = |e: &dyn std::fmt::Display| UpError::StateFile {
        path: f.to_path_buf(),
        message: e.to_string(),
    };
    let pids = running.pids();
    let services: BTreeMap<&str, serde_json::Value> = running
        .services
        .iter()
        .map(|s| {
            let mut v = serde_json::to_value(&s.ports).unwrap_or_default();
            v["microservice"] = serde_json::json!(s.microservice);
            v["replica"] = serde_json::json!(s.replica);
            v["pid"] = serde_json::json!(pids.get(&s.name));
            v["proxyPid"] = serde_json::json!(pids.get(&format!("{}/proxy", s.name)));
            (s.name.as_str(), v)
        })
        .collect();
    let sagas: BTreeMap<&str, serde_json::Value> = running
        .sagas
        .iter()
        .map(|s| {
            (
                s.replica.as_str(),
                serde_json::json!({"saga": s.name, "url": s.url, "pid": pids.get(&s.label)}),
            )
        })
        .collect();
    let json = serde_json::json!({
        "services": services,
        "sagas": sagas,
        "brokerUrl": broker_url,
        "brokers": running.brokers(),
        "mtls": ca.map(mtls::LocalCa::state),
    });
    let tmp = f.with_extension("tmp");
    let text = serde_json::to_string_pretty(&json).map_err(|e| failed(&e))?;
    std::fs::write(&tmp, text).map_err(|e| failed(&e))?;
    std::fs::rename(&tmp, f).map_err(|e| failed(&e))?;
    Ok(())
}

/// How a run ended: a signal (exit 0) or a failure (exit 1).
enum Stop {
    Signal(&'static str),
    Failed(UpError),
}

/// Runs until Ctrl-C or SIGTERM, restarting processes that exit (brokers too), then stops
/// everything. Returns an error, after stopping everything, when the run ended because
/// something failed: with `no_restart` a process exited, or a broker could not be restarted.
pub async fn run(loaded: Vec<Loaded>, opts: RunOptions) -> Result<()> {
    let (work_dir, _temp) = match &opts.work_dir {
        Some(d) => (d.clone(), None),
        None => {
            let t = tempfile_dir()?;
            (t.clone(), Some(TempDir(t)))
        }
    };
    // The broker first: the sidecars connect to it as they start.
    let mut broker_process = None;
    let broker_url = match (&opts.broker_url, needs_broker(&loaded)) {
        (Some(url), _) => Some(url.clone()),
        (None, false) => None,
        (None, true) => {
            let started = brokers::start(opts.broker, &work_dir).await?;
            broker_process = Some(started.processes);
            Some(started.url)
        }
    };
    // Queues on Redis or RabbitMQ: each saga coordinator runs as a service with its own
    // sidecar, which pushes trigger events to its HTTP trigger and publishes its outcomes; its
    // log stays on a nats-server of its own (JetStream).
    let mut loaded = loaded;
    let mut saga_log_nats = None;
    let sidecar_sagas = match &broker_url {
        Some(url)
            if weir_broker::admin::kind_of_url(url)
                != Some(weir_crds::broker::BrokerKind::Nats)
                && loaded.iter().any(|l| matches!(l.object, Object::Saga(_))) =>
        {
            let (process, nats_url) = start_nats(&work_dir).await?;
            println!("weir up: saga logs on {nats_url} (they need JetStream)");
            saga_log_nats = Some((process, nats_url));
            let synthetic = coordinator_services(&loaded, &opts.namespace)?;
            let names = synthetic
                .iter()
                .filter_map(|l| match &l.object {
                    Object::Microservice(m) => m.metadata.name.clone(),
                    _ => None,
                })
                .collect::<Vec<_>>();
            loaded.extend(synthetic);
            names
        }
        _ => Vec::new(),
    };
    // The namespace's identity key, as the operator would keep in a Secret: sidecars sign the
    // `x-user-*` headers the edge sets, and trust no others.
    std::fs::create_dir_all(&work_dir)?;
    let identity_key = work_dir.join("identity.key");
    let key: [u8; 32] = rand::random();
    std::fs::write(&identity_key, hex::encode(key))?;
    // The run's CA: each Microservice's sidecars get a token for its identity, and a
    // certificate for it from the endpoint.
    let ca = match opts.no_mtls {
        true => None,
        false => Some(mtls::LocalCa::start(&work_dir).await?),
    };
    if let Some(ca) = &ca {
        for l in &loaded {
            if let Object::Microservice(m) = &l.object {
                ca.enroll(
                    &opts.namespace,
                    m.metadata.name.as_deref().unwrap_or_default(),
                )?;
            }
        }
    }
    let (bundle, tokens) = match &ca {
        Some(ca) => (ca.bundle_file(), ca.dir.join("tokens")),
        None => Default::default(),
    };
    let mut services = plan_with(
        &loaded,
        &opts.namespace,
        broker_url.as_deref(),
        &PlanOptions {
            any_port: opts.any_port,
            identity_key: Some(&identity_key),
            secrets_dir: opts.secrets_dir.as_deref(),
            mesh: ca.as_ref().map(|ca| plan::PlanMesh {
                issuer_url: &ca.issuer_url,
                trust_bundle_file: &bundle,
                tokens_dir: &tokens,
            }),
        },
    )?;
    if let (Some((_, nats_url)), Some(url)) = (&saga_log_nats, &broker_url) {
        write_coordinator_configs(
            &loaded,
            &opts.namespace,
            url,
            nats_url,
            &work_dir,
            &mut services,
        )?;
    }
    if let Some(ep) = &opts.otlp_endpoint {
        for s in &mut services {
            s.config.tracing.otlp_endpoint = Some(ep.clone());
        }
    }
    if let Some(url) = &broker_url {
        declare_queues(&loaded, &opts.namespace, url).await?;
        // Printed without its password: the sidecars get the URL whole, in their configs.
        println!(
            "weir up: broker {}; queues declared",
            weir_crds::redact::url(url)
        );
    }
    let proxy_bin = match opts.proxy_bin.clone().or_else(|| find_binary("weir-proxy")) {
        Some(p) => p,
        None => bail!(
            "weir-proxy not found next to weir or on PATH: build it (`cargo build -p weir-proxy`) or pass --proxy-bin"
        ),
    };
    let up = UpOptions {
        work_dir: work_dir.clone(),
        proxy_bin,
        ready_timeout: opts.ready_timeout,
    };
    let mut running = start(services, &up).await?;
    for broker in broker_process.into_iter().flatten() {
        running.adopt(broker);
    }
    if let Some((process, _)) = saga_log_nats {
        running.adopt(process);
        for name in &sidecar_sagas {
            let saga = name.trim_end_matches(COORDINATOR_SUFFIX).to_string();
            let replicas: Vec<LocalSaga> = running
                .services
                .iter()
                .filter(|s| &s.microservice == name)
                .map(|s| LocalSaga {
                    name: saga.clone(),
                    replica: replica_name(&saga, s),
                    url: format!("http://127.0.0.1:{}", s.ports.app),
                    label: s.name.clone(),
                })
                .collect();
            running.sagas.extend(replicas);
        }
    } else if let Some(url) = &broker_url {
        running
            .start_sagas(&loaded, &opts.namespace, url, &up)
            .await?;
    }
    println!(
        "\nweir up: {} service(s) ready\n{}",
        running.services.len(),
        running.table()
    );
    for (name, usage) in usage_notes(&loaded, &running) {
        println!("{name}:\n{usage}");
    }
    if let Some(d) = &opts.dashboard {
        let addr =
            start_dashboard(d, &loaded, &opts.namespace, &running, broker_url.as_deref()).await?;
        println!(
            "weir up: dashboard on http://{addr}/ ({})",
            match d.actions {
                true => "actions enabled: dead-letter replay, saga cancel and retry",
                false => "read-only",
            }
        );
        if !addr.ip().is_loopback() {
            println!(
                "weir up: the dashboard has no login, and {} is reachable from other machines",
                addr.ip()
            );
        }
    }
    if let Some(f) = &opts.state_file {
        write_state(f, &running, broker_url.as_deref(), ca.as_ref())?;
    }
    println!("Ctrl-C stops everything.");
    // Both streams are made once, outside the loop: a fresh `ctrl_c()` each turn would miss a
    // Ctrl-C that arrives while the loop body runs (supervising, writing the state file).
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate())?;
    let mut interrupt = signal(SignalKind::interrupt())?;
    let stop = loop {
        tokio::select! {
            _ = interrupt.recv() => break Stop::Signal("interrupted"),
            _ = term.recv() => break Stop::Signal("terminated"),
            _ = tokio::time::sleep(Duration::from_millis(200)) => {
                if opts.no_restart {
                    if let Some((label, status)) = running.exited() {
                        break Stop::Failed(UpError::Exited { label, status });
                    }
                    continue;
                }
                match running.supervise() {
                    Err(e) => break Stop::Failed(e),
                    Ok(true) => {
                        if let Some(f) = &opts.state_file
                            && let Err(e) =
                                write_state(f, &running, broker_url.as_deref(), ca.as_ref())
                        {
                            break Stop::Failed(e);
                        }
                    }
                    Ok(false) => {}
                }
            }
        }
    };
    match &stop {
        Stop::Signal(why) => println!("weir up: {why}; stopping"),
        Stop::Failed(e) => println!("weir up: {e}; stopping"),
    }
    let grace = running
        .services
        .iter()
        .map(|s| Duration::from_millis(s.config.shutdown_grace_ms))
        .max()
        .unwrap_or(Duration::from_secs(10))
        .min(Duration::from_secs(30));
    running.shutdown(grace).await;
    match stop {
        Stop::Signal(_) => Ok(()),
        Stop::Failed(e) => Err(e.into()),
    }
}

/// Starts the dashboard over the running system: every replica's sidecar, every coordinator
/// replica, the broker.
async fn start_dashboard(
    d: &crate::dashboard::DashboardOptions,
    loaded: &[Loaded],
    namespace: &str,
    running: &Running,
    broker_url: Option<&str>,
) -> Result<std::net::SocketAddr> {
    use crate::dashboard::{self, Coordinator, Sidecar, Targets};
    let targets = Targets {
        sidecars: running
            .services
            .iter()
            .map(|s| Sidecar {
                replica: s.name.clone(),
                microservice: s.microservice.clone(),
                admin_port: s.ports.admin,
                pod: None,
            })
            .collect(),
        coordinators: running
            .sagas
            .iter()
            .map(|s| Coordinator {
                saga: s.name.clone(),
                url: s.url.clone(),
                pod: None,
            })
            .collect(),
        broker_url: broker_url.map(str::to_string),
        ..Default::default()
    };
    let system = dashboard::model::build(loaded, namespace);
    dashboard::start(d, system, targets)
        .await
        .map_err(|e| anyhow::anyhow!("dashboard on {}: {e}", d.addr))
}

/// The `weir.dev/local-usage` note of each Microservice, `{url}` replaced by its local URL.
fn usage_notes(loaded: &[Loaded], running: &Running) -> Vec<(String, String)> {
    loaded
        .iter()
        .filter_map(|l| match &l.object {
            Object::Microservice(m) => {
                let name = m.metadata.name.clone()?;
                let note = m.metadata.annotations.as_ref()?.get(LOCAL_USAGE)?.clone();
                // The service's URL: its replica 0's, the one dependants call.
                let s = running
                    .services
                    .iter()
                    .find(|s| s.microservice == name && s.replica == 0)?;
                let url = format!("http://127.0.0.1:{}", s.ports.inbound);
                Some((name, note.replace("{url}", &url)))
            }
            _ => None,
        })
        .collect()
}

/// A directory removed when dropped.
struct TempDir(PathBuf);

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn tempfile_dir() -> Result<PathBuf> {
    let d = std::env::temp_dir().join(format!("weir-up-{}", std::process::id()));
    std::fs::create_dir_all(&d)?;
    Ok(d)
}
