//! `weir`: the operator (`weir operator`) and the user's command-line tool.

use clap::{Args, Parser, Subcommand};
use std::path::PathBuf;
use std::process::ExitCode;
use weir::manifest::{self, Schemas};
use weir::render::RenderOptions;

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
    /// Print the CustomResourceDefinitions, or write them to a directory.
    Crd {
        /// Write one file per CRD into this directory instead of printing.
        #[arg(long)]
        out_dir: Option<PathBuf>,
    },
}

#[derive(Args)]
struct RenderArgs {
    /// Files or directories of manifests (directories are read recursively: *.yaml, *.yml).
    #[arg(short = 'f', long = "filename", required = true)]
    files: Vec<PathBuf>,
    /// Render the sidecar as a plain second container (clusters older than 1.29).
    #[arg(long)]
    legacy_sidecar: bool,
    #[arg(long, default_value_t = RenderOptions::default().proxy_image)]
    proxy_image: String,
    #[arg(long)]
    proxy_image_pull_policy: Option<String>,
    /// Namespace for objects that name none.
    #[arg(short = 'n', long, default_value = "default")]
    namespace: String,
    #[arg(long, default_value = "cluster.local")]
    cluster_domain: String,
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
        Command::Render(args) => render_cmd(args),
        Command::Crd { out_dir } => crd_cmd(out_dir),
    }
}

fn crd_cmd(out_dir: Option<PathBuf>) -> ExitCode {
    match out_dir {
        None => {
            print!("{}", weir_crds::crd::all_yaml());
            ExitCode::SUCCESS
        }
        Some(dir) => {
            for crd in weir_crds::crd::all() {
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

fn render_cmd(args: RenderArgs) -> ExitCode {
    let files = match manifest::expand_paths(&args.files) {
        Ok(f) => f,
        Err(e) => {
            eprintln!("weir render: {e}");
            return ExitCode::from(2);
        }
    };
    let (loaded, skipped) = match manifest::load(&files, &Schemas::new()) {
        Ok(l) => l,
        Err(errors) => {
            for e in &errors {
                eprintln!("error: {e}");
            }
            eprintln!("weir render: {} error(s); nothing rendered", errors.len());
            return ExitCode::from(2);
        }
    };
    for s in skipped {
        eprintln!("note: {s}; skipped");
    }
    let opts = RenderOptions {
        proxy_image: args.proxy_image,
        proxy_image_pull_policy: args.proxy_image_pull_policy,
        native_sidecar: !args.legacy_sidecar,
        cluster_domain: args.cluster_domain,
        default_namespace: args.namespace,
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
