//! `weir operator`: the controllers, leader election, and the metrics/health endpoint.

pub mod admin;
pub mod applied;
pub mod autoscaling;
pub mod backoff;
pub mod broker;
pub mod conditions;
pub mod events;
pub mod identity;
pub mod leader;
pub mod mesh;
pub mod mesh_ca;
pub mod metrics;
pub mod microservice;
pub mod queue;
pub mod rbac;
pub mod saga;
pub mod secrets;
pub mod status;
pub mod workload;

use crate::render::RenderOptions;
use clap::Args;
use kube::Client;
use kube::runtime::events::Reporter;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

/// The field manager of every server-side apply the operator makes.
pub const FIELD_MANAGER: &str = "weir-operator";

#[derive(Args, Debug, Clone)]
pub struct OperatorArgs {
    /// Image of the `weir-proxy` sidecar injected into every Microservice pod.
    #[arg(long, env = "WEIR_PROXY_IMAGE", default_value_t = RenderOptions::default().proxy_image)]
    pub proxy_image: String,
    #[arg(long, env = "WEIR_PROXY_IMAGE_PULL_POLICY")]
    pub proxy_image_pull_policy: Option<String>,
    /// Image of saga coordinators (`weir saga-coordinator`): the operator's own.
    #[arg(long, env = "WEIR_COORDINATOR_IMAGE", default_value_t = RenderOptions::default().coordinator_image)]
    pub coordinator_image: String,
    #[arg(long, env = "WEIR_COORDINATOR_IMAGE_PULL_POLICY")]
    pub coordinator_image_pull_policy: Option<String>,
    /// Render the sidecar as a plain second container, for clusters older than 1.29.
    #[arg(long, env = "WEIR_LEGACY_SIDECAR")]
    pub legacy_sidecar: bool,
    /// Take part in leader election on a Lease (needed when running more than one replica).
    #[arg(long)]
    pub leader_elect: bool,
    /// Namespace of the leader-election Lease (default: the pod's namespace).
    #[arg(long, env = "POD_NAMESPACE", default_value = "weir-system")]
    pub lease_namespace: String,
    #[arg(long, default_value = "weir-operator")]
    pub lease_name: String,
    /// Address of `/metrics`, `/healthz` and `/readyz`.
    #[arg(long, default_value = "0.0.0.0:8080")]
    pub metrics_addr: SocketAddr,
    #[arg(long, default_value = "cluster.local")]
    pub cluster_domain: String,
    /// Watch only this namespace (default: all).
    #[arg(long)]
    pub watch_namespace: Option<String>,
    /// Plain-text logs instead of JSON.
    #[arg(long)]
    pub log_text: bool,
    /// The mesh's mutual TLS: keep the CA in Secrets of `--lease-namespace` (made when absent)
    /// and serve the identity endpoint on `--identity-addr`, on every replica.
    #[arg(long, env = "WEIR_MTLS")]
    pub mtls: bool,
    /// The SPIFFE trust domain of workload identities.
    #[arg(long, env = "WEIR_TRUST_DOMAIN", default_value = "cluster.local")]
    pub trust_domain: String,
    /// Address of the identity endpoint (HTTPS), behind the `weir-identity` Service.
    #[arg(long, default_value = "0.0.0.0:8443")]
    pub identity_addr: SocketAddr,
    /// What a sidecar does with plaintext from other pods when its Microservice does not say
    /// (`spec.inbound.mtls`): `strict` refuses it, `permissive` admits it (while callers that
    /// do not speak mutual TLS yet are moved over).
    #[arg(long, env = "WEIR_MTLS_MODE", default_value = "strict", value_parser = parse_mtls_mode)]
    pub mtls_mode: weir_crds::microservice::MtlsMode,
}

fn parse_mtls_mode(s: &str) -> Result<weir_crds::microservice::MtlsMode, String> {
    match s {
        "strict" => Ok(weir_crds::microservice::MtlsMode::Strict),
        "permissive" => Ok(weir_crds::microservice::MtlsMode::Permissive),
        other => Err(format!("{other:?}: strict or permissive")),
    }
}

/// What every reconciler shares.
pub struct Context {
    pub client: Client,
    pub render: RenderOptions,
    pub metrics: Arc<metrics::Metrics>,
    pub reporter: Reporter,
    pub recorder: kube::runtime::events::Recorder,
    pub backoff: backoff::Backoff,
    /// Failure counts of Queues and Brokers (requeue backoff on broker errors).
    pub messaging_backoff: backoff::Backoff,
    /// Broker connections shared by the Queue reconciles.
    pub connections: broker::Connections,
    /// The conditions last written per object, so an Event is published once per change.
    pub last_written: conditions::LastWritten,
    /// The mesh in pods (`--mtls`): the trust bundle and the graph's callers.
    pub mesh: Option<Arc<mesh::PodMesh>>,
    /// Which autoscaling APIs the cluster serves (KEDA, `autoscaling/v2`), asked when needed.
    pub autoscaling: autoscaling::Discovery,
    /// What was last applied of each child, to skip applies that change nothing.
    pub applied: applied::Applied,
}

impl Context {
    pub fn new(client: Client, render: RenderOptions, metrics: Arc<metrics::Metrics>) -> Self {
        let reporter = Reporter {
            controller: FIELD_MANAGER.into(),
            instance: std::env::var("POD_NAME").ok(),
        };
        let recorder = kube::runtime::events::Recorder::new(client.clone(), reporter.clone());
        Self {
            client,
            render,
            metrics,
            reporter,
            recorder,
            backoff: Default::default(),
            messaging_backoff: Default::default(),
            connections: Default::default(),
            last_written: Default::default(),
            mesh: None,
            autoscaling: Default::default(),
            applied: Default::default(),
        }
    }
}

/// Loads (or makes) the mesh's CA, retrying while the API server cannot be reached, and serves
/// the identity endpoint in a task of its own.
async fn start_identity_endpoint(
    client: &Client,
    args: &OperatorArgs,
) -> anyhow::Result<(tokio::task::JoinHandle<()>, String)> {
    let ns = args.lease_namespace.clone();
    let mut wait = std::time::Duration::from_secs(1);
    let loaded = loop {
        match mesh_ca::load_or_create(client, &ns, &args.trust_domain).await {
            Ok(l) => break l,
            Err(e @ mesh_ca::CaError::Invalid { .. }) => return Err(e.into()),
            Err(e) => {
                tracing::warn!(error = %e, retry_s = wait.as_secs(), "the mesh's CA is not available yet");
                tokio::time::sleep(wait).await;
                wait = (wait * 2).min(std::time::Duration::from_secs(30));
            }
        }
    };
    let bundle = loaded.bundle_pem.clone();
    let auth = Arc::new(identity::TokenReviewer::new(
        client.clone(),
        &args.trust_domain,
    ));
    let (client, domain, addr) = (
        client.clone(),
        args.cluster_domain.clone(),
        args.identity_addr,
    );
    let task = tokio::spawn(async move {
        if let Err(e) = mesh_ca::serve(client, ns, domain, loaded, auth, addr).await {
            tracing::error!(error = %e, "the identity endpoint stopped; exiting");
            std::process::exit(1);
        }
    });
    Ok((task, bundle))
}

/// Runs the operator until SIGTERM/SIGINT.
pub fn run(args: OperatorArgs) -> anyhow::Result<()> {
    init_logging(!args.log_text);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    rt.block_on(run_async(args))
}

fn init_logging(json: bool) {
    use tracing_subscriber::{EnvFilter, fmt};
    let filter =
        EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info,kube=warn"));
    if json {
        fmt()
            .json()
            .with_env_filter(filter)
            .with_current_span(false)
            .init();
    } else {
        fmt().with_env_filter(filter).init();
    }
}

async fn run_async(args: OperatorArgs) -> anyhow::Result<()> {
    let client = Client::try_default().await?;
    let metrics = Arc::new(metrics::Metrics::default());
    let ready = Arc::new(AtomicBool::new(false));
    let admin = tokio::spawn(admin::serve(
        args.metrics_addr,
        metrics.clone(),
        ready.clone(),
    ));
    // Every replica issues certificates, leader or not: a sidecar starting while leadership
    // moves must still get one.
    let (identity, bundle) = match args.mtls {
        true => {
            let (task, bundle) = start_identity_endpoint(&client, &args).await?;
            (Some(task), Some(bundle))
        }
        false => (None, None),
    };

    let mut leadership = None;
    if args.leader_elect {
        let identity =
            std::env::var("POD_NAME").unwrap_or_else(|_| format!("weir-{}", std::process::id()));
        let lease = Arc::new(leader::Lease::new(
            client.clone(),
            &args.lease_namespace,
            &args.lease_name,
            &identity,
        ));
        tracing::info!(lease = %args.lease_name, namespace = %args.lease_namespace, %identity, "waiting for leadership");
        ready.store(true, Ordering::SeqCst);
        lease.acquire().await?;
        metrics.leader.set(1);
        tracing::info!(%identity, "leading");
        let holder = lease.clone();
        let renewing = tokio::spawn(async move {
            // Losing the lease means another replica may act: stop at once, the pod restarts.
            let e = holder.hold().await;
            tracing::error!(error = %e, "lost leadership; exiting");
            std::process::exit(1);
        });
        leadership = Some((lease, renewing));
    } else {
        metrics.leader.set(1);
    }

    let render = RenderOptions {
        proxy_image: args.proxy_image.clone(),
        proxy_image_pull_policy: args.proxy_image_pull_policy.clone(),
        coordinator_image: args.coordinator_image.clone(),
        coordinator_image_pull_policy: args.coordinator_image_pull_policy.clone(),
        native_sidecar: !args.legacy_sidecar,
        cluster_domain: args.cluster_domain.clone(),
        default_namespace: "default".into(),
        mesh: args.mtls.then(|| crate::render::MeshOptions {
            trust_domain: args.trust_domain.clone(),
            issuer_url: format!(
                "https://{}.{}.svc:{}",
                mesh_ca::SERVICE,
                args.lease_namespace,
                args.identity_addr.port()
            ),
            default_mode: args.mtls_mode,
        }),
        // Asked of discovery per reconcile of a Microservice that autoscales.
        keda: false,
    };
    let mut ctx = Context::new(client.clone(), render, metrics);
    if let Some(pem) = bundle {
        let pod_mesh = Arc::new(mesh::PodMesh::new(pem));
        tokio::spawn(mesh::follow_bundle(
            client.clone(),
            args.lease_namespace.clone(),
            pod_mesh.clone(),
        ));
        ctx.mesh = Some(pod_mesh);
    }
    let ctx = Arc::new(ctx);
    ready.store(true, Ordering::SeqCst);
    tracing::info!(native_sidecar = !args.legacy_sidecar, proxy_image = %args.proxy_image, "controllers starting");
    let ns = args.watch_namespace.as_deref();
    tokio::join!(
        microservice::run(ctx.clone(), ns),
        queue::run(ctx.clone(), ns),
        saga::run(ctx.clone(), ns),
        broker::run(ctx, ns),
    );
    // The controllers stopped on SIGTERM/SIGINT and finished their reconciles: stop renewing,
    // then hand the Lease over so a standby takes it at once rather than after LEASE_SECONDS.
    if let Some((lease, renewing)) = leadership {
        renewing.abort();
        let _ = renewing.await;
        match tokio::time::timeout(std::time::Duration::from_secs(5), lease.release()).await {
            Ok(Ok(true)) => tracing::info!("released the lease"),
            Ok(Ok(false)) => tracing::info!("the lease is not ours any more; left as it is"),
            Ok(Err(e)) => {
                tracing::warn!(error = %e, "could not release the lease; a standby takes it when it expires")
            }
            Err(_) => {
                tracing::warn!("releasing the lease timed out; a standby takes it when it expires")
            }
        }
    }
    admin.abort();
    if let Some(task) = identity {
        task.abort();
    }
    Ok(())
}

#[cfg(test)]
mod autoscaling_tests;
#[cfg(test)]
mod messaging_tests;
#[cfg(test)]
mod mock_api;
#[cfg(test)]
mod tests;
