//! `weir`: the operator (`weir operator`) and the user's command-line tool.

use clap::{Args, Parser, Subcommand};
use std::path::PathBuf;
use std::process::ExitCode;
use weir::manifest::{self, Schemas};
use weir::render::RenderOptions;

/// mimalloc rather than glibc's malloc, built as weir-proxy's is (mimalloc 2, without
/// transparent huge pages; see `weir_proxy::allocator` for why): the operator's peak memory with
/// thousands of Microservices is in the README's scale table.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Parser)]
#[command(
    name = "weir",
    version,
    about = "Microservices that hold in production: operator and tools"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the controller (in the cluster, or against the current kubeconfig).
    Operator(weir::operator::OperatorArgs),
    /// Print the Kubernetes objects the operator would create for the given manifests.
    Render(RenderArgs),
    /// Run the manifests on this machine, without a cluster: each app beside its own weir-proxy.
    Up(UpArgs),
    /// Check a set of manifests for the mistakes that make microservices a distributed monolith.
    Lint(LintArgs),
    /// Print the system as a Mermaid or DOT graph: calls, events, sagas.
    Graph(GraphArgs),
    /// Open the in-cluster dashboard (chart value dashboard.enabled) through kubectl
    /// port-forward; `weir dashboard serve` is the server the chart runs.
    Dashboard(weir::dashboard::cli::DashboardArgs),
    /// Inspect a Queue's dead letters and replay them onto the queue.
    Dlq(weir::messaging::dlq::DlqArgs),
    /// Work on a Queue's consumers: `rewind` moves one back to a point in time.
    Queue(weir::messaging::rewind::QueueArgs),
    /// Run the coordinator of one Saga (what the operator deploys for each Saga).
    SagaCoordinator(weir_saga::CoordinatorArgs),
    /// List a Saga's instances, or show one instance's timeline, from its log on the broker.
    Saga(weir_saga::cli::SagaArgs),
    /// Print the CustomResourceDefinitions, or write them to a directory.
    Crd {
        /// Write one file per CRD into this directory instead of printing.
        #[arg(long)]
        out_dir: Option<PathBuf>,
        /// Target Kubernetes version (e.g. 1.20): leaves out what it does not know (CEL rules
        /// before 1.25, their fieldPath before 1.28). Default: everything.
        #[arg(long, value_parser = parse_kube_version)]
        kube_version: Option<u32>,
    },
}

#[derive(Args)]
struct UpArgs {
    /// Files or directories of manifests.
    #[arg(short = 'f', long = "filename", required = true)]
    files: Vec<PathBuf>,
    /// Use this running broker instead of starting one (nats://, redis:// or amqp://).
    #[arg(long)]
    broker_url: Option<String>,
    /// The broker to start when there is no --broker-url: nats, redis, rabbitmq or kafka.
    #[arg(long, default_value = "nats", value_parser = weir::up::brokers::parse_kind)]
    broker: weir_crds::broker::BrokerKind,
    /// The weir-proxy binary (default: next to weir, then PATH).
    #[arg(long)]
    proxy_bin: Option<PathBuf>,
    /// Where configs and broker data go (default: a new temporary directory).
    #[arg(long)]
    work_dir: Option<PathBuf>,
    /// Namespace the manifests are taken to be in.
    #[arg(short = 'n', long, default_value = "default")]
    namespace: String,
    /// Write the services' addresses as JSON to this file once everything is ready.
    #[arg(long)]
    state_file: Option<PathBuf>,
    /// Run even when `weir lint` finds errors.
    #[arg(long)]
    skip_lint: bool,
    /// How long to wait for every service to be ready.
    #[arg(long, default_value = "60s", value_parser = parse_duration)]
    ready_timeout: std::time::Duration,
    /// Send every sidecar's spans over OTLP/HTTP to this endpoint (e.g. http://127.0.0.1:4318),
    /// whatever the manifests say.
    #[arg(long, env = "OTEL_EXPORTER_OTLP_ENDPOINT")]
    otlp_endpoint: Option<String>,
    /// Stop everything when a process exits, instead of restarting it.
    #[arg(long)]
    no_restart: bool,
    /// Choose every port free, even where a `weir.dev/local-port` annotation fixes one (to run
    /// a second copy of a system beside the first).
    #[arg(long)]
    any_port: bool,
    /// Local stand-ins for Secrets an edge reads (its JWKS or HS256 key): the key `K` of Secret
    /// `S` is the file `DIR/S/K`.
    #[arg(long)]
    secrets_dir: Option<PathBuf>,
    /// Plaintext between the sidecars. By default each sidecar gets a certificate from a CA of
    /// the run, sidecars call each other over mutual TLS, and each admits only the callers the
    /// manifests declare (as in a cluster with the chart's defaults).
    #[arg(long)]
    no_mtls: bool,
    /// Serve the dashboard on this address (e.g. 127.0.0.1:9900): the system's graph with live
    /// rates, errors, p99 and breaker states from the sidecars, queues and dead letters, saga
    /// instances. Read-only unless --dashboard-actions.
    #[arg(long, value_name = "ADDR")]
    dashboard: Option<std::net::SocketAddr>,
    /// Let the dashboard act: replay dead letters, cancel and retry saga instances.
    #[arg(long, requires = "dashboard")]
    dashboard_actions: bool,
}

fn parse_duration(s: &str) -> Result<std::time::Duration, String> {
    weir_crds::duration::parse(s).map_err(|e| e.to_string())
}

#[derive(Args)]
struct LintArgs {
    /// Files or directories of manifests.
    #[arg(short = 'f', long = "filename", required = true)]
    files: Vec<PathBuf>,
    /// Longest synchronous call chain (in calls) before a warning.
    #[arg(long, default_value_t = 2)]
    max_chain_depth: usize,
    /// Most event types one service may consume before a warning.
    #[arg(long, default_value_t = 5)]
    max_consumed_events: usize,
}

#[derive(Args)]
struct GraphArgs {
    /// Files or directories of manifests.
    #[arg(short = 'f', long = "filename", required = true)]
    files: Vec<PathBuf>,
    #[arg(long, value_enum, default_value = "mermaid")]
    format: GraphFormat,
}

#[derive(Clone, Copy, clap::ValueEnum)]
enum GraphFormat {
    Mermaid,
    Dot,
}

#[derive(Args)]
struct RenderArgs {
    /// Render even when `weir lint` finds errors.
    #[arg(long)]
    skip_lint: bool,
    /// Files or directories of manifests (directories are read recursively: *.yaml, *.yml).
    #[arg(short = 'f', long = "filename", required = true)]
    files: Vec<PathBuf>,
    /// Render the sidecar as a plain second container (clusters older than 1.29).
    #[arg(long)]
    legacy_sidecar: bool,
    /// Render `autoscaling.queueLag` as without KEDA in the cluster: only the CPU and memory
    /// targets, through a HorizontalPodAutoscaler (the operator decides from discovery).
    #[arg(long)]
    no_keda: bool,
    #[arg(long, default_value_t = RenderOptions::default().proxy_image)]
    proxy_image: String,
    #[arg(long)]
    proxy_image_pull_policy: Option<String>,
    /// Image of saga coordinators (`weir saga-coordinator`): the `weir` image.
    #[arg(long, default_value_t = RenderOptions::default().coordinator_image)]
    coordinator_image: String,
    #[arg(long)]
    coordinator_image_pull_policy: Option<String>,
    /// Namespace for objects that name none.
    #[arg(short = 'n', long, default_value = "default")]
    namespace: String,
    #[arg(long, default_value = "cluster.local")]
    cluster_domain: String,
    /// Render the mesh's mutual TLS as the operator does with the chart's `mtls.enabled` (its
    /// default): each Microservice's ServiceAccount, token and trust bundle, and the callers
    /// the files' Microservices and Sagas declare.
    #[arg(long)]
    mtls: bool,
    /// The SPIFFE trust domain (with `--mtls`).
    #[arg(long, default_value = "cluster.local")]
    trust_domain: String,
    /// Where sidecars ask for certificates (with `--mtls`): the chart's weir-identity Service.
    #[arg(long, default_value = "https://weir-identity.weir-system.svc:8443")]
    issuer_url: String,
    /// The inbound mode of a Microservice that does not set one (with `--mtls`).
    #[arg(long, default_value = "strict", value_parser = ["strict", "permissive"])]
    mtls_mode: String,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::Operator(args) => match weir::operator::run(args) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("weir operator: {e:#}");
                ExitCode::FAILURE
            }
        },
        Command::SagaCoordinator(args) => match weir_saga::run(args) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("weir saga-coordinator: {e:#}");
                ExitCode::FAILURE
            }
        },
        Command::Saga(args) => match weir_saga::cli::run(args) {
            Ok(out) => {
                print!("{out}");
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("weir saga: {e:#}");
                ExitCode::FAILURE
            }
        },
        Command::Render(args) => render_cmd(args),
        Command::Lint(args) => lint_cmd(args),
        Command::Up(args) => up_cmd(args),
        Command::Graph(args) => graph_cmd(args),
        Command::Dlq(args) => weir::messaging::dlq::run(args),
        Command::Dashboard(args) => weir::dashboard::cli::run(args),
        Command::Queue(args) => weir::messaging::rewind::run(args),
        Command::Crd {
            out_dir,
            kube_version,
        } => crd_cmd(out_dir, kube_version),
    }
}

/// `1.20` → 20 (the minor version; Weir supports Kubernetes 1.x).
fn parse_kube_version(s: &str) -> Result<u32, String> {
    let s = s.trim_start_matches('v');
    let (major, minor) = s.split_once('.').ok_or("expected MAJOR.MINOR, e.g. 1.20")?;
    if major != "1" {
        return Err(format!("unsupported Kubernetes major version {major}"));
    }
    minor
        .split('.')
        .next()
        .unwrap_or(minor)
        .parse()
        .map_err(|_| format!("bad minor version {minor:?}"))
}

fn crd_cmd(out_dir: Option<PathBuf>, kube_version: Option<u32>) -> ExitCode {
    let crds = match kube_version {
        Some(minor) => weir_crds::crd::all_for_server(minor),
        None => weir_crds::crd::all(),
    };
    match out_dir {
        None => {
            let docs: Vec<String> = crds.iter().map(weir_crds::crd::to_yaml).collect();
            print!("{}", docs.join("---\n"));
            ExitCode::SUCCESS
        }
        Some(dir) => {
            for crd in crds {
                let path = dir.join(weir_crds::crd::file_name(&crd));
                if let Err(e) = std::fs::write(&path, weir_crds::crd::to_yaml(&crd)) {
                    eprintln!("weir crd: cannot write {}: {e}", path.display());
                    return ExitCode::FAILURE;
                }
            }
            ExitCode::SUCCESS
        }
    }
}

/// Reads and validates manifests; on invalid input prints every error and gives exit code 2.
fn load_manifests(command: &str, paths: &[PathBuf]) -> Result<Vec<manifest::Loaded>, ExitCode> {
    let files = manifest::expand_paths(paths).map_err(|e| {
        eprintln!("weir {command}: {e}");
        ExitCode::from(2)
    })?;
    let (loaded, skipped) = manifest::load(&files, &Schemas::new()).map_err(|errors| {
        for e in &errors {
            eprintln!("error: {e}");
        }
        eprintln!("weir {command}: {} error(s) in the input", errors.len());
        ExitCode::from(2)
    })?;
    for s in skipped {
        eprintln!("note: {s}; skipped");
    }
    Ok(loaded)
}

/// Lint errors refuse a command (`up`, `render`) unless it was told to go on.
fn lint_gate(command: &str, loaded: &[manifest::Loaded], skip: bool) -> Result<(), ExitCode> {
    if skip {
        return Ok(());
    }
    let errors: Vec<_> = weir::lint::lint(loaded, &Default::default())
        .into_iter()
        .filter(|f| f.severity == weir::lint::Severity::Error)
        .collect();
    if errors.is_empty() {
        return Ok(());
    }
    for f in &errors {
        eprintln!("{f}");
    }
    eprintln!(
        "weir {command}: {} lint error(s); stopping (--skip-lint goes on anyway)",
        errors.len()
    );
    Err(ExitCode::from(1))
}

fn up_cmd(args: UpArgs) -> ExitCode {
    let loaded = match load_manifests("up", &args.files)
        .and_then(|l| lint_gate("up", &l, args.skip_lint).map(|()| l))
    {
        Ok(l) => l,
        Err(code) => return code,
    };
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("tokio runtime");
    match rt.block_on(weir::up::run(loaded, args.into_options())) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("weir up: {e:#}");
            ExitCode::FAILURE
        }
    }
}

impl UpArgs {
    fn into_options(self) -> weir::up::RunOptions {
        weir::up::RunOptions {
            broker_url: self.broker_url,
            broker: self.broker,
            proxy_bin: self.proxy_bin,
            work_dir: self.work_dir,
            namespace: self.namespace,
            state_file: self.state_file,
            ready_timeout: self.ready_timeout,
            otlp_endpoint: self.otlp_endpoint,
            no_restart: self.no_restart,
            any_port: self.any_port,
            secrets_dir: self.secrets_dir,
            no_mtls: self.no_mtls,
            dashboard: self
                .dashboard
                .map(|addr| weir::dashboard::DashboardOptions {
                    addr,
                    actions: self.dashboard_actions,
                }),
        }
    }
}

fn lint_cmd(args: LintArgs) -> ExitCode {
    let loaded = match load_manifests("lint", &args.files) {
        Ok(l) => l,
        Err(code) => return code,
    };
    let cfg = weir::lint::LintConfig {
        max_chain_depth: args.max_chain_depth,
        max_consumed_events: args.max_consumed_events,
    };
    let findings = weir::lint::lint(&loaded, &cfg);
    for f in &findings {
        println!("{f}");
    }
    let errors = findings
        .iter()
        .filter(|f| f.severity == weir::lint::Severity::Error)
        .count();
    println!(
        "weir lint: {} object(s), {errors} error(s), {} warning(s)",
        loaded.len(),
        findings.len() - errors
    );
    if errors > 0 {
        ExitCode::from(1)
    } else {
        ExitCode::SUCCESS
    }
}

fn graph_cmd(args: GraphArgs) -> ExitCode {
    let loaded = match load_manifests("graph", &args.files) {
        Ok(l) => l,
        Err(code) => return code,
    };
    let format = match args.format {
        GraphFormat::Mermaid => weir::graph::Format::Mermaid,
        GraphFormat::Dot => weir::graph::Format::Dot,
    };
    print!("{}", weir::graph::render(&loaded, format));
    ExitCode::SUCCESS
}

fn render_cmd(args: RenderArgs) -> ExitCode {
    let loaded = match load_manifests("render", &args.files) {
        Ok(l) => l,
        Err(code) => return code,
    };
    if let Err(code) = lint_gate("render", &loaded, args.skip_lint) {
        return code;
    }
    let opts = RenderOptions {
        proxy_image: args.proxy_image,
        proxy_image_pull_policy: args.proxy_image_pull_policy,
        coordinator_image: args.coordinator_image,
        coordinator_image_pull_policy: args.coordinator_image_pull_policy,
        native_sidecar: !args.legacy_sidecar,
        cluster_domain: args.cluster_domain,
        default_namespace: args.namespace,
        mesh: args.mtls.then_some(weir::render::MeshOptions {
            trust_domain: args.trust_domain,
            issuer_url: args.issuer_url,
            default_mode: match args.mtls_mode.as_str() {
                "permissive" => weir_crds::microservice::MtlsMode::Permissive,
                _ => weir_crds::microservice::MtlsMode::Strict,
            },
        }),
        keda: !args.no_keda,
    };
    match weir::render::render_all(&loaded, &opts) {
        Ok(docs) => {
            print!("{docs}");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::from(2)
        }
    }
}
