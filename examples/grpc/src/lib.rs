//! Weir's gRPC example: `shop.Inventory` (`proto/inventory.proto`), its messages and its tonic
//! stubs, shared by the two apps:
//!
//! - `weir-grpc-inventory`: the service, in tonic, with the gRPC health protocol (its
//!   Microservice probes it with `probes.*.grpc`).
//! - `weir-grpc-storefront`: an HTTP app that calls the inventory through its sidecar
//!   (`$INVENTORY_URL`), where the dependency's policy applies in gRPC terms: the deadline
//!   travels as `grpc-timeout`, UNAVAILABLE is retried, the breaker counts gRPC statuses, and the
//!   fallback answers with a gRPC status.

#![allow(missing_docs, reason = "generated stubs")]

include!(concat!(env!("OUT_DIR"), "/shop.Inventory.rs"));

pub use inventory_client::InventoryClient;
pub use inventory_server::{Inventory, InventoryServer};

/// What the caller asks about.
#[derive(Clone, PartialEq, prost::Message)]
pub struct StockQuery {
    #[prost(string, tag = "1")]
    pub sku: String,
    /// For `Watch`: how many updates to stream.
    #[prost(uint32, tag = "2")]
    pub updates: u32,
}

/// The stock of one SKU.
#[derive(Clone, PartialEq, prost::Message)]
pub struct Stock {
    #[prost(string, tag = "1")]
    pub sku: String,
    #[prost(uint32, tag = "2")]
    pub count: u32,
}

/// `PORT` (8080) and `BIND` (`127.0.0.1`: only the sidecar calls the app) from the environment.
pub fn listen_addr() -> String {
    let port: u16 = std::env::var("PORT")
        .ok()
        .and_then(|p| p.parse().ok())
        .unwrap_or(8080);
    let bind = std::env::var("BIND").unwrap_or_else(|_| "127.0.0.1".into());
    format!("{bind}:{port}")
}

/// Resolves on SIGTERM or Ctrl-C.
pub async fn shutdown() {
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .expect("signal handler");
    tokio::select! { _ = term.recv() => {}, _ = tokio::signal::ctrl_c() => {} }
}
