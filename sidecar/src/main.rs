use std::process::ExitCode;

/// mimalloc rather than glibc's malloc: a proxied request makes a few dozen small allocations
/// (request and response heads, futures, header maps), which glibc served with about a fifth of
/// the proxy's instructions (callgrind, `sidecar/benches/profile.sh`). How it is called: see
/// [`weir_proxy::allocator`].
#[global_allocator]
static ALLOCATOR: weir_proxy::allocator::Allocator = weir_proxy::allocator::Allocator;
use weir_proxy::config::{self, CliAction};
use weir_proxy::listen::{Options, Proxy};

fn init_logging() -> weir_proxy::logging::NonBlocking {
    let level = match std::env::var("WEIR_LOG")
        .unwrap_or_default()
        .to_ascii_lowercase()
        .as_str()
    {
        "error" => tracing::Level::ERROR,
        "warn" => tracing::Level::WARN,
        "debug" => tracing::Level::DEBUG,
        "trace" => tracing::Level::TRACE,
        _ => tracing::Level::INFO,
    };
    let out = weir_proxy::logging::NonBlocking::new(std::io::stdout(), 16 * 1024);
    weir_proxy::logging::install_access_log(out.clone());
    tracing_subscriber::fmt()
        .json()
        .flatten_event(true)
        .with_current_span(false)
        .with_span_list(false)
        .with_max_level(level)
        .with_writer(out.clone())
        .init();
    out
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    // Pod lifecycle hooks (postStart / preStop) when the proxy is not a native sidecar.
    if let Some(hook) = weir_proxy::hooks::hook_of(args.first().map(String::as_str)) {
        return weir_proxy::hooks::run(hook, &args[1..]);
    }
    let cli = match config::parse_args(&args, |k| std::env::var(k).ok()) {
        Ok(CliAction::Run(cli)) => cli,
        Ok(CliAction::Help) => {
            println!("{}", config::USAGE);
            return ExitCode::SUCCESS;
        }
        Ok(CliAction::Version) => {
            println!("weir-proxy {}", env!("CARGO_PKG_VERSION"));
            return ExitCode::SUCCESS;
        }
        Err(e) => {
            eprintln!("weir-proxy: {e}\n{}", config::USAGE);
            return ExitCode::from(2);
        }
    };
    let log = init_logging();
    let code = run(cli);
    if log.dropped() > 0 {
        tracing::warn!(
            dropped = log.dropped(),
            "log lines dropped: stdout was not read fast enough"
        );
    }
    log.flush();
    code
}

fn run(cli: config::Cli) -> ExitCode {
    let (cfg, raw) = match config::load(&cli.config_path) {
        Ok(c) => c,
        Err(e) => {
            tracing::error!(path = %cli.config_path.display(), field = %e.field, error = %e.message, "invalid config");
            eprintln!(
                "weir-proxy: invalid config {}: {}: {}",
                cli.config_path.display(),
                e.field,
                e.message
            );
            return ExitCode::from(2);
        }
    };
    let runtime = if cli.workers <= 1 {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
    } else {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(cli.workers)
            .enable_all()
            .build()
    };
    let runtime = match runtime {
        Ok(r) => r,
        Err(e) => {
            eprintln!("weir-proxy: cannot start the runtime: {e}");
            return ExitCode::from(1);
        }
    };
    let opts = Options {
        config_path: cli.config_path.clone(),
        reload_interval: cli.reload_interval,
        access_log: cli.access_log,
        otlp_flush_interval: cli.otlp_flush_interval,
    };
    runtime.block_on(async move {
        tracing::info!(service = %cfg.service, namespace = %cfg.namespace, path = %opts.config_path.display(), "starting");
        let proxy = match Proxy::start(cfg, raw, opts).await {
            Ok(p) => p,
            Err(e) => {
                tracing::error!(error = %e, "cannot start");
                eprintln!("weir-proxy: {e}");
                return ExitCode::from(1);
            }
        };
        wait_for_signal().await;
        proxy.shutdown().await;
        tracing::info!("stopped");
        ExitCode::SUCCESS
    })
}

async fn wait_for_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate()).expect("SIGTERM handler");
    let mut int = signal(SignalKind::interrupt()).expect("SIGINT handler");
    tokio::select! {
        _ = term.recv() => tracing::info!(signal = "SIGTERM", "shutting down"),
        _ = int.recv() => tracing::info!(signal = "SIGINT", "shutting down"),
    }
}
