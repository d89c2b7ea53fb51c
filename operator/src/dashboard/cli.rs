//! `weir dashboard`: opens the chart's dashboard (`dashboard.enabled=true`) through
//! `kubectl port-forward svc/weir-dashboard`, so reaching it takes what Kubernetes RBAC grants
//! (`pods/portforward` in the release namespace); and `weir dashboard serve`, the server the
//! chart runs in the cluster.

use clap::{Args, Subcommand};
use std::net::SocketAddr;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// `weir dashboard`: open the in-cluster dashboard, or serve it (`serve`, in the cluster).
#[derive(Args, Debug, Clone)]
#[command(args_conflicts_with_subcommands = true)]
pub struct DashboardArgs {
    #[command(subcommand)]
    pub command: Option<DashboardCommand>,
    /// The namespace the chart is installed in (where Service weir-dashboard is).
    #[arg(short = 'n', long, default_value = "weir-system")]
    pub namespace: String,
    /// The local port to forward.
    #[arg(long, default_value_t = 9900)]
    pub port: u16,
    /// Print the URL without opening a browser.
    #[arg(long)]
    pub no_open: bool,
    /// How long to wait for the port-forward to answer.
    #[arg(long, default_value = "30s", value_parser = parse_duration)]
    pub timeout: Duration,
}

#[derive(Subcommand, Debug, Clone)]
pub enum DashboardCommand {
    /// Serve the dashboard from inside the cluster (what the chart's weir-dashboard runs): the
    /// Weir objects from the API server, the sidecars' metrics through the pod proxy or from
    /// Prometheus, queue figures from their status, sagas from their coordinators.
    Serve(ServeArgs),
}

#[derive(Args, Debug, Clone)]
pub struct ServeArgs {
    /// Address to listen on.
    #[arg(long, default_value = "0.0.0.0:9900")]
    pub listen: SocketAddr,
    /// Let the page act: replay dead letters (reading Brokers' credentials Secrets), cancel and
    /// retry saga instances. Without it the action endpoints answer 403.
    #[arg(long)]
    pub actions: bool,
    /// Read the sidecars' series from this Prometheus, over plain HTTP (e.g.
    /// `http://prometheus.monitoring:9090`)
    /// instead of scraping every pod through the API server.
    #[arg(long, value_name = "URL")]
    pub prometheus: Option<String>,
    /// Only this namespace (default: all namespaces).
    #[arg(short = 'n', long)]
    pub namespace: Option<String>,
    /// The cluster's DNS domain (a managed Broker's Service name, for dead letters).
    #[arg(long, default_value = "cluster.local")]
    pub cluster_domain: String,
}

fn parse_duration(s: &str) -> Result<Duration, String> {
    weir_crds::duration::parse(s).map_err(|e| e.to_string())
}

/// Runs `weir dashboard` or `weir dashboard serve`.
pub fn run(args: DashboardArgs) -> ExitCode {
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("weir dashboard: {e}");
            return ExitCode::FAILURE;
        }
    };
    let r = match args.command.clone() {
        Some(DashboardCommand::Serve(s)) => rt.block_on(serve(s)),
        None => rt.block_on(open(args)),
    };
    match r {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("weir dashboard: {e:#}");
            ExitCode::FAILURE
        }
    }
}

async fn serve(args: ServeArgs) -> anyhow::Result<()> {
    use tracing_subscriber::{EnvFilter, fmt};
    let filter =
        EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info,kube=warn"));
    let _ = fmt().json().with_env_filter(filter).try_init();
    if let Some(u) = &args.prometheus
        && !u.starts_with("http://")
    {
        anyhow::bail!("--prometheus {u}: an http:// URL (the dashboard speaks plain HTTP to it)");
    }
    let client = kube::Client::try_default().await?;
    let cluster = Arc::new(super::cluster::Cluster::new(
        client,
        super::cluster::ClusterOptions {
            namespace: args.namespace.clone(),
            prometheus: args.prometheus.clone(),
            cluster_domain: args.cluster_domain,
        },
    ));
    let opts = super::DashboardOptions {
        addr: args.listen,
        actions: args.actions,
    };
    let addr = super::start_cluster(&opts, cluster).await?;
    tracing::info!(
        %addr,
        actions = args.actions,
        namespace = args.namespace.as_deref().unwrap_or("(all)"),
        metrics = args.prometheus.as_deref().unwrap_or("pod proxy"),
        "dashboard serving"
    );
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
    Ok(())
}

/// A program on PATH.
fn on_path(name: &str) -> Option<std::path::PathBuf> {
    std::env::var_os("PATH").and_then(|p| {
        std::env::split_paths(&p)
            .map(|d| d.join(name))
            .find(|f| f.is_file())
    })
}

/// `kubectl port-forward svc/weir-dashboard <port>:80 -n <ns>` as a child until Ctrl-C.
async fn open(args: DashboardArgs) -> anyhow::Result<()> {
    // A port taken already would answer before kubectl does (and kubectl would fail to bind it).
    if let Err(e) = std::net::TcpListener::bind(("127.0.0.1", args.port)) {
        anyhow::bail!("127.0.0.1:{}: {e}; choose another with --port", args.port);
    }
    let mut child = tokio::process::Command::new("kubectl")
        .args([
            "port-forward",
            "svc/weir-dashboard",
            &format!("{}:80", args.port),
            "-n",
            &args.namespace,
        ])
        .stdout(std::process::Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .map_err(|e| anyhow::anyhow!("cannot run kubectl: {e}"))?;
    let addr = SocketAddr::from(([127, 0, 0, 1], args.port));
    let deadline = Instant::now() + args.timeout;
    loop {
        if let Some(status) = child.try_wait()? {
            anyhow::bail!(
                "kubectl port-forward svc/weir-dashboard -n {} exited ({status}); is the chart installed with dashboard.enabled=true, and may you port-forward in {}?",
                args.namespace,
                args.namespace
            );
        }
        if tokio::net::TcpStream::connect(addr).await.is_ok() {
            break;
        }
        if Instant::now() > deadline {
            let _ = child.kill().await;
            anyhow::bail!(
                "port {} did not answer within {:?}",
                args.port,
                args.timeout
            );
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let url = format!("http://127.0.0.1:{}/", args.port);
    println!("weir dashboard: {url} (Ctrl-C stops the port-forward)");
    if !args.no_open
        && let Some(xdg) = on_path("xdg-open")
    {
        let _ = std::process::Command::new(xdg)
            .arg(&url)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn();
    }
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {
            let _ = child.kill().await;
            Ok(())
        }
        status = child.wait() => {
            anyhow::bail!("kubectl port-forward exited ({})", status?)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        args: DashboardArgs,
    }

    #[test]
    fn the_user_command_and_the_server_parse() {
        let c = Cli::try_parse_from(["weir"]).unwrap().args;
        assert!(c.command.is_none());
        assert_eq!(
            (c.namespace.as_str(), c.port, c.no_open),
            ("weir-system", 9900, false)
        );
        let c = Cli::try_parse_from(["weir", "-n", "ops", "--port", "9999", "--no-open"])
            .unwrap()
            .args;
        assert_eq!(
            (c.namespace.as_str(), c.port, c.no_open),
            ("ops", 9999, true)
        );
        let c = Cli::try_parse_from([
            "weir",
            "serve",
            "--listen",
            "0.0.0.0:9900",
            "--actions",
            "--prometheus",
            "http://prometheus:9090",
            "--namespace",
            "apps",
        ])
        .unwrap()
        .args;
        let Some(DashboardCommand::Serve(s)) = c.command else {
            panic!("serve")
        };
        assert_eq!(s.listen, "0.0.0.0:9900".parse().unwrap());
        assert!(s.actions);
        assert_eq!(s.prometheus.as_deref(), Some("http://prometheus:9090"));
        assert_eq!(s.namespace.as_deref(), Some("apps"));
        let d = Cli::try_parse_from(["weir", "serve"]).unwrap().args;
        let Some(DashboardCommand::Serve(s)) = d.command else {
            panic!("serve")
        };
        assert!(!s.actions && s.prometheus.is_none() && s.namespace.is_none());
    }
}
