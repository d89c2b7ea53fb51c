//! The dashboard of `weir up --dashboard ADDR`: one page over the running system, read-only
//! unless `--dashboard-actions`.
//!
//! - [`model`]: the system as the manifests declare it (the objects `weir graph` draws) with
//!   `weir lint`'s findings.
//! - [`prom`]: the sidecars' Prometheus text read into samples; quantiles from buckets.
//! - [`collect`]: each tick, every sidecar scraped, the broker's queue figures and the saga
//!   coordinators' instances, into one JSON snapshot.
//! - [`server`]: the page, the JSON API, the event stream and the actions.
//! - [`cluster`]: the same page in a cluster (`weir dashboard serve`): the objects from the
//!   API server, metrics through the pod proxy or from Prometheus, queues from their status.
//! - [`cli`]: `weir dashboard` (a port-forward to the chart's dashboard) and
//!   `weir dashboard serve`.
//! - `assets`: the page itself, embedded.

mod assets;
pub mod cli;
pub mod cluster;
pub mod collect;
pub mod model;
pub mod prom;
pub mod server;
#[cfg(test)]
mod tests;

pub use collect::{Coordinator, Sidecar, Targets};

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

/// How often the collector scrapes and the page is sent a snapshot.
pub const TICK: Duration = Duration::from_millis(1500);

/// `--dashboard ADDR` and `--dashboard-actions`.
#[derive(Debug, Clone)]
pub struct DashboardOptions {
    pub addr: SocketAddr,
    pub actions: bool,
}

/// Binds `opts.addr`, then serves the page and collects every [`TICK`] in the background.
/// Returns the address bound (the port chosen when `opts.addr` has port 0).
pub async fn start(
    opts: &DashboardOptions,
    system: model::System,
    targets: Targets,
) -> std::io::Result<SocketAddr> {
    let listener = tokio::net::TcpListener::bind(opts.addr).await?;
    let addr = listener.local_addr()?;
    let (tx, rx) = tokio::sync::watch::channel(Arc::new(String::from("{}")));
    let mut collector = collect::Collector::new(system.clone(), targets.clone());
    let actions = opts.actions;
    tokio::spawn(async move {
        loop {
            let snapshot = collector.tick(actions).await;
            if tx.send(Arc::new(snapshot.to_string())).is_err() {
                return;
            }
            tokio::time::sleep(TICK).await;
        }
    });
    let state = Arc::new(server::State::new(system, targets, opts.actions, rx));
    tokio::spawn(server::serve(listener, state));
    Ok(addr)
}

/// The in-cluster dashboard: binds `opts.addr`, then lists, reads and serves every [`TICK`]
/// (listing the objects and pods again every [`collect::RELIST`]).
pub async fn start_cluster(
    opts: &DashboardOptions,
    cluster: Arc<cluster::Cluster>,
) -> std::io::Result<SocketAddr> {
    let listener = tokio::net::TcpListener::bind(opts.addr).await?;
    let addr = listener.local_addr()?;
    let (tx, rx) = tokio::sync::watch::channel(Arc::new(String::from("{}")));
    let (view_tx, view_rx) = tokio::sync::watch::channel(Arc::new(server::View::default()));
    let mut collector = collect::Collector::in_cluster(cluster.clone());
    let actions = opts.actions;
    tokio::spawn(async move {
        loop {
            let snapshot = collector.tick(actions).await;
            view_tx.send_if_modified(|v| {
                let changed = v.system != collector.system
                    || v.targets.sidecars.len() != collector.targets.sidecars.len()
                    || v.targets.coordinators != collector.targets.coordinators
                    || v.targets.queue_refs != collector.targets.queue_refs;
                if changed {
                    *v = Arc::new(server::View {
                        system: collector.system.clone(),
                        targets: collector.targets.clone(),
                    });
                }
                changed
            });
            if tx.send(Arc::new(snapshot.to_string())).is_err() {
                return;
            }
            tokio::time::sleep(TICK).await;
        }
    });
    let state = Arc::new(server::State::in_cluster(
        cluster,
        view_rx,
        opts.actions,
        rx,
    ));
    tokio::spawn(server::serve(listener, state));
    Ok(addr)
}
