//! `weir-proxy`: the Weir sidecar. See `sidecar/README.md`.

pub mod allocator;
pub mod balance;
pub mod body;
pub mod bridge;
pub mod config;
pub mod connected_at;
pub mod discovery;
pub mod edge;
pub mod endpoint_metrics;
pub mod forward;
pub mod fuzzing;
pub mod hooks;
pub mod layers;
pub mod listen;
pub mod logging;
pub mod metrics;
pub mod mtls;
pub mod otlp;
pub mod pool;
pub mod service;
pub mod stack;
pub mod trace;
