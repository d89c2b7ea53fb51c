//! The processes of one run: sidecars, then apps, started and waited for in that order;
//! restarted with a growing delay when they exit (a broker must listen on its port again);
//! stopped apps first, then sidecars, then brokers, as in a pod.

use super::brokers::BrokerProcess;
use super::plan::LocalService;
use super::process::{
    Proc, ProcKind, ProcSpec, free_port, group_listens, http_ok, kill_group, restart_delay,
    stop_all, wait_until,
};
use super::sagas::coordinator_configs;
use crate::manifest::Loaded;
use anyhow::Result;
use std::collections::BTreeMap;
use std::net::{Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};
use tokio::process::Child;

/// Why a `weir up` run failed: it stops everything and exits non-zero. Ctrl-C and SIGTERM are
/// not failures (exit 0).
#[derive(Debug, thiserror::Error)]
pub enum UpError {
    /// With `--no-restart`, a process exited.
    #[error("{label} exited ({status}) and --no-restart is set")]
    Exited {
        label: String,
        status: std::process::ExitStatus,
    },
    /// A broker exited and could not be started again: its program cannot be run, or it exited
    /// or did not listen on its port again in time (another program took the port, its data
    /// directory is unusable, ...).
    #[error("{label} could not be restarted: {reason}")]
    BrokerNotRestarted { label: String, reason: String },
    /// The state file could not be written (the tools reading it would act on stale pids).
    #[error("state file {}: {message}", path.display())]
    StateFile { path: PathBuf, message: String },
}

/// A saga coordinator replica run by `weir up`.
#[derive(Debug, Clone, serde::Serialize)]
pub struct LocalSaga {
    /// The Saga's name.
    pub name: String,
    /// The replica's name: the Saga's with one replica, else `<saga>-<index>`.
    pub replica: String,
    /// Where its HTTP API listens (`POST /v1/sagas/<name>`, `GET /v1/stats`).
    pub url: String,
    /// The label of its process (its log prefix), to find its pid.
    #[serde(skip)]
    pub(super) label: String,
}

/// The processes of one `weir up` run.
pub struct Running {
    pub services: Vec<LocalService>,
    pub sagas: Vec<LocalSaga>,
    procs: Vec<Proc>,
}

pub struct UpOptions {
    pub work_dir: PathBuf,
    pub proxy_bin: PathBuf,
    pub ready_timeout: Duration,
}

/// `PATH` for apps: weir's own directory first (so sibling binaries such as the examples' apps
/// are found), then the inherited one.
fn app_path() -> Result<std::ffi::OsString> {
    let self_dir = std::env::current_exe()?
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_default();
    Ok(std::env::join_paths(std::iter::once(self_dir).chain(
        std::env::split_paths(&std::env::var_os("PATH").unwrap_or_default()),
    ))?)
}

/// Starts every sidecar, then every app, and waits until all are ready.
pub async fn start(services: Vec<LocalService>, opts: &UpOptions) -> Result<Running> {
    std::fs::create_dir_all(&opts.work_dir)?;
    let mut running = Running {
        services: services.clone(),
        sagas: Vec::new(),
        procs: Vec::new(),
    };
    let path = app_path()?.to_string_lossy().into_owned();
    for s in &services {
        let cfg_path = opts.work_dir.join(format!("{}.proxy.json", s.name));
        std::fs::write(&cfg_path, serde_json::to_string_pretty(&s.config)?)?;
        running.launch(ProcSpec {
            label: format!("{}/proxy", s.name),
            kind: ProcKind::Proxy,
            program: opts.proxy_bin.clone().into(),
            args: vec!["--config".into(), cfg_path.into()],
            env: Vec::new(),
            workdir: None,
            listens: None,
        })?;
    }
    for s in &services {
        let admin = SocketAddr::from((Ipv4Addr::LOCALHOST, s.ports.admin));
        wait_until(
            &format!("{}'s weir-proxy ready", s.name),
            opts.ready_timeout,
            || http_ok(admin, "/readyz"),
        )
        .await?;
        let Some(command) = &s.command else {
            continue;
        };
        // The replica's own directory: kept across restarts of the process, like a pod's
        // emptyDir (each replica has its own, as each pod has).
        let state_dir = opts.work_dir.join("state").join(&s.name);
        std::fs::create_dir_all(&state_dir)?;
        let mut env = s.env.clone();
        env.push(("PATH".into(), path.clone()));
        env.push(("SERVICE_NAME".into(), s.microservice.clone()));
        // As a pod's hostname is its name: which replica answered shows in what apps report.
        env.push(("HOSTNAME".into(), s.name.clone()));
        env.push((
            "WEIR_STATE_DIR".into(),
            state_dir.to_string_lossy().into_owned(),
        ));
        running.launch(ProcSpec {
            label: s.name.clone(),
            kind: ProcKind::App,
            program: "sh".into(),
            // `exec`: the app itself is the process weir up watches and signals.
            args: vec!["-c".into(), format!("exec {command}").into()],
            env,
            workdir: Some(s.workdir.clone()),
            listens: None,
        })?;
    }
    for s in services.iter().filter(|s| s.command.is_some()) {
        let admin = SocketAddr::from((Ipv4Addr::LOCALHOST, s.ports.admin));
        wait_until(
            &format!("{} ready (through its sidecar)", s.name),
            opts.ready_timeout,
            || http_ok(admin, "/app-health/readiness"),
        )
        .await?;
    }
    // Ready means events flow too: each sidecar connected to its broker (`/brokerz` is 200 once
    // connected, or when the service has no messaging). A broker that stays unreachable (an
    // external one) is said, not fatal: the HTTP paths work without it.
    for s in &services {
        let admin = SocketAddr::from((Ipv4Addr::LOCALHOST, s.ports.admin));
        let what = format!("{}'s weir-proxy connected to its broker", s.name);
        if let Err(e) = wait_until(&what, opts.ready_timeout, || http_ok(admin, "/brokerz")).await {
            eprintln!("weir up: warning: {e}; publishing and consuming fail until it connects");
        }
    }
    Ok(running)
}

impl Running {
    fn launch(&mut self, spec: ProcSpec) -> Result<()> {
        let child = spec.spawn()?;
        self.procs.push(Proc::new(spec, child));
        Ok(())
    }

    /// Supervises a broker started before the rest: restarted like any process when it exits,
    /// the same way (same port, same data), stopped after the sidecars.
    pub fn adopt(&mut self, broker: BrokerProcess) {
        self.procs.push(Proc::new(broker.spec, broker.child));
    }

    /// Starts the coordinators of each Saga of `loaded` (`weir saga-coordinator`, this binary;
    /// `spec.replicas` of them, sharing the instances through the log's leases), calling each
    /// step's Microservice at its sidecar, and waits until each is ready.
    pub async fn start_sagas(
        &mut self,
        loaded: &[Loaded],
        namespace: &str,
        broker_url: &str,
        opts: &UpOptions,
    ) -> Result<()> {
        let weir = std::env::current_exe()?;
        for saga in coordinator_configs(loaded, namespace, broker_url, &self.services)? {
            for index in 0..saga.replicas {
                let replica = match saga.replicas {
                    1 => saga.name.clone(),
                    _ => format!("{}-{index}", saga.name),
                };
                let mut config = saga.config.clone();
                config.listen = SocketAddr::from((Ipv4Addr::LOCALHOST, free_port()?));
                let cfg_path = opts.work_dir.join(format!("{replica}.saga.json"));
                std::fs::write(&cfg_path, serde_json::to_string_pretty(&config)?)?;
                let label = format!("{replica}/saga");
                self.launch(ProcSpec {
                    label: label.clone(),
                    kind: ProcKind::App,
                    program: weir.clone().into(),
                    args: vec![
                        "saga-coordinator".into(),
                        "--saga".into(),
                        format!("{}/{}", config.namespace, saga.name).into(),
                        "--config".into(),
                        cfg_path.into(),
                    ],
                    // The replica's name in the log entries it writes (`by`), as a pod's.
                    env: vec![("POD_NAME".into(), replica.clone())],
                    workdir: None,
                    listens: None,
                })?;
                let addr = config.listen;
                wait_until(
                    &format!("saga coordinator {replica} ready"),
                    opts.ready_timeout,
                    || http_ok(addr, "/readyz"),
                )
                .await?;
                self.sagas.push(LocalSaga {
                    name: saga.name.clone(),
                    replica,
                    url: format!("http://{addr}"),
                    label,
                });
            }
        }
        Ok(())
    }

    /// A table of services and where to reach them.
    pub fn table(&self) -> String {
        let mut t = format!(
            "{:<16} {:<26} {:<26} {}\n",
            "SERVICE", "URL (through its sidecar)", "SIDECAR ADMIN", "APP"
        );
        for s in &self.services {
            let url = format!("http://127.0.0.1:{}", s.ports.inbound);
            let admin = format!("http://127.0.0.1:{}", s.ports.admin);
            t.push_str(&format!(
                "{:<16} {url:<26} {admin:<26} 127.0.0.1:{}\n",
                s.name, s.ports.app
            ));
        }
        for s in &self.sagas {
            t.push_str(&format!(
                "{:<16} {:<26} {:<26} saga coordinator\n",
                format!("{}/saga", s.replica),
                s.url,
                "-"
            ));
        }
        t
    }

    /// The pid of each running process, by label (`orders`, `orders/proxy`, `place-order/saga`,
    /// `nats`).
    pub fn pids(&self) -> BTreeMap<String, u32> {
        self.procs
            .iter()
            .filter_map(|p| Some((p.spec.label.clone(), p.child.as_ref()?.id()?)))
            .collect()
    }

    /// Each broker process: label, pid (while it runs) and port.
    pub(super) fn brokers(&self) -> BTreeMap<String, serde_json::Value> {
        self.procs
            .iter()
            .filter(|p| p.spec.kind == ProcKind::Broker)
            .map(|p| {
                (
                    p.spec.label.clone(),
                    serde_json::json!({
                        "pid": p.child.as_ref().and_then(Child::id),
                        "port": p.spec.listens.map(|(port, _)| port),
                    }),
                )
            })
            .collect()
    }

    /// Stops apps first (SIGTERM, then SIGKILL after the grace period), then sidecars, then the
    /// brokers: each sidecar outlives its app's in-flight calls, as in a pod.
    pub async fn shutdown(mut self, grace: Duration) {
        for kind in [ProcKind::App, ProcKind::Proxy, ProcKind::Broker] {
            let mut group: Vec<(String, Child)> = self
                .procs
                .iter_mut()
                .filter(|p| p.spec.kind == kind)
                .filter_map(|p| Some((p.spec.label.clone(), p.child.take()?)))
                .collect();
            stop_all(&mut group, grace).await;
        }
        super::process::flush_output(Duration::from_secs(2)).await;
    }

    /// Whether any process exited on its own (name and status).
    pub fn exited(&mut self) -> Option<(String, std::process::ExitStatus)> {
        for p in &mut self.procs {
            if let Some(c) = &mut p.child
                && let Ok(Some(st)) = c.try_wait()
            {
                p.child = None;
                kill_group(p.pid);
                return Some((p.spec.label.clone(), st));
            }
        }
        None
    }

    /// Restarts processes that exited, with a growing delay for one that keeps crashing, and
    /// watches restarted brokers come back on their ports. Returns whether any process was
    /// started again (pids changed); an error when a broker cannot be.
    pub fn supervise(&mut self) -> Result<bool, UpError> {
        let mut restarted = false;
        for p in &mut self.procs {
            let label = p.spec.label.clone();
            if let Some(c) = &mut p.child
                && let Ok(Some(st)) = c.try_wait()
            {
                p.child = None;
                kill_group(p.pid);
                if let (Some(_), Some((port, _))) = (p.listen_by, p.spec.listens) {
                    return Err(UpError::BrokerNotRestarted {
                        label,
                        reason: format!("it exited ({st}) before listening on port {port} again"),
                    });
                }
                if p.started.elapsed() > Duration::from_secs(60) {
                    p.restarts = 0;
                }
                let delay = restart_delay(p.restarts);
                println!(
                    "weir up: {label} exited ({st}); restarting in {delay:?} (restart {})",
                    p.restarts + 1
                );
                p.restart_at = Some(Instant::now() + delay);
            }
            if p.child.is_none()
                && let Some(at) = p.restart_at
                && Instant::now() >= at
            {
                match p.spec.spawn() {
                    Ok(child) => {
                        p.pid = child.id();
                        p.child = Some(child);
                        p.started = Instant::now();
                        p.restarts += 1;
                        p.restart_at = None;
                        p.listen_by = p.spec.listens.map(|(_, within)| Instant::now() + within);
                        restarted = true;
                    }
                    Err(e) if p.spec.kind == ProcKind::Broker => {
                        return Err(UpError::BrokerNotRestarted {
                            label,
                            reason: format!("{e:#}"),
                        });
                    }
                    Err(e) => {
                        eprintln!("weir up: {e:#}");
                        p.restarts += 1;
                        p.restart_at = Some(Instant::now() + restart_delay(p.restarts));
                    }
                }
            }
            if let (Some(by), Some((port, within))) = (p.listen_by, p.spec.listens)
                && p.child.is_some()
            {
                if p.pid.is_some_and(|pid| group_listens(pid, port)) {
                    println!("weir up: {label} is back on 127.0.0.1:{port}");
                    p.listen_by = None;
                } else if Instant::now() > by {
                    return Err(UpError::BrokerNotRestarted {
                        label,
                        reason: format!("it did not listen on port {port} within {within:?}"),
                    });
                }
            }
        }
        Ok(restarted)
    }
}
