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
        /// Target Kubernetes version (e.g. 1.20): leaves out what it does not know (CEL rules
        /// before 1.25, their fieldPath before 1.28). Default: everything.
        #[arg(long, value_parser = parse_kube_version)]
        kube_version: Option<u32>,
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
