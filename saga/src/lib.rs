//! The saga coordinator: `weir saga-coordinator` drives each instance of one Saga through its
//! steps, with compensations in reverse order on failure, its state an append-only log on
//! JetStream. `weir saga list/show` read that log ([`cli`]). Its config is the contract in
//! `weir_crds::coordinator`, rendered by the operator; it connects to NATS the way every Weir
//! component does (`weir_broker::nats`). The `weir` binary is its command line; the operator's
//! image is its image.

pub mod call;
pub mod cli;
/// The coordinator's config contract, defined beside the sidecar's in `weir-crds`.
pub use weir_crds::coordinator as config;
pub mod coordinator;
pub mod log;
pub mod metrics;
pub mod server;
pub mod template;

use config::CoordinatorConfig;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;
use weir_broker::credentials::Credentials;

/// `weir saga-coordinator --saga <ns>/<name> --config <file>`.
#[derive(clap::Args, Debug, Clone)]
pub struct CoordinatorArgs {
    /// The Saga this coordinator runs, `<namespace>/<name>` (checked against the config).
    #[arg(long)]
    pub saga: String,
    /// The resolved config (`saga.json`).
    #[arg(long)]
    pub config: std::path::PathBuf,
    /// Overrides the config's listen address.
    #[arg(long)]
    pub listen: Option<std::net::SocketAddr>,
    /// Overrides the base URL of one target, `NAME=URL` (repeatable): e.g. to call a step's
    /// service directly instead of through a sidecar.
    #[arg(long = "target", value_parser = parse_target)]
    pub targets: Vec<(String, String)>,
    /// Plain-text logs instead of JSON.
    #[arg(long)]
    pub log_text: bool,
}

pub fn run(args: CoordinatorArgs) -> anyhow::Result<()> {
    use tracing_subscriber::{EnvFilter, fmt};
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    if args.log_text {
        fmt()
            .with_env_filter(filter)
            .with_writer(std::io::stderr)
            .init();
    } else {
        fmt()
            .json()
            .with_env_filter(filter)
            .with_writer(std::io::stderr)
            .init();
    }
    let text = std::fs::read_to_string(&args.config)
        .map_err(|e| anyhow::anyhow!("{}: {e}", args.config.display()))?;
    let mut cfg = CoordinatorConfig::from_json(&text)
        .map_err(|e| anyhow::anyhow!("{}: {e}", args.config.display()))?;
    let want = format!("{}/{}", cfg.namespace, cfg.name);
    if args.saga != want {
        anyhow::bail!("--saga {} but the config is for {want}", args.saga);
    }
    if let Some(l) = args.listen {
        cfg.listen = l;
    }
    for (name, url) in args.targets {
        if !cfg.targets.contains_key(&name) {
            anyhow::bail!("--target {name}=...: the config has no target {name:?}");
        }
        cfg.targets.insert(name, url);
    }
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    rt.block_on(run_async(cfg))
}

fn parse_target(s: &str) -> Result<(String, String), String> {
    let (name, url) = s.split_once('=').ok_or("expected NAME=URL")?;
    if !(url.starts_with("http://") || url.starts_with("https://")) {
        return Err(format!("{url:?} is not an http:// or https:// URL"));
    }
    Ok((name.to_string(), url.to_string()))
}

async fn run_async(cfg: CoordinatorConfig) -> anyhow::Result<()> {
    let creds = match &cfg.credentials_file {
        Some(dir) => Credentials::from_dir(std::path::Path::new(dir))?,
        None => Credentials::default(),
    };
    let client =
        weir_broker::nats::connect(&cfg.broker_url, &creds, "weir-saga-coordinator").await?;
    let replica = std::env::var("POD_NAME").unwrap_or_else(|_| {
        format!(
            "coordinator-{}-{:08x}",
            std::process::id(),
            rand::random::<u32>()
        )
    });
    let listener = tokio::net::TcpListener::bind(cfg.listen).await?;
    let addr = listener.local_addr()?;
    let c = coordinator::Coordinator::new(cfg, client, replica.clone()).await?;
    c.spawn_background();
    tokio::spawn(c.clone().consume_trigger());
    let server = tokio::spawn(server::serve(listener, c.clone()));
    tracing::info!(saga = %c.cfg.name, namespace = %c.cfg.namespace, %replica, %addr, "saga coordinator listening");
    // Tests read this line to learn the port.
    println!("listening on {addr}");
    shutdown_signal().await;
    c.stopping.store(true, Ordering::SeqCst);
    // Let the instances in hand finish their current step; the rest resume elsewhere.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while c.driving() > 0 && tokio::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    server.abort();
    tracing::info!(left = c.driving(), "saga coordinator stopped");
    let _ = Arc::strong_count(&c);
    Ok(())
}

async fn shutdown_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
            .expect("SIGTERM handler");
        tokio::select! {
            _ = ctrl_c => {}
            _ = term.recv() => {}
        }
    }
    #[cfg(not(unix))]
    let _ = ctrl_c.await;
}
