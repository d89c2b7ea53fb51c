//! `weir-proxy`: the Weir sidecar. See `sidecar/README.md`.

pub mod admin;
pub mod body;
pub mod breaker;
pub mod bridge;
pub mod config;
pub mod edge;
pub mod forward;
pub mod framing;
pub mod fuzzing;
pub mod hooks;
pub mod layers;
pub mod logging;
pub mod metrics;
pub mod otlp;
pub mod retry;
pub mod server;
pub mod stack;
pub mod trace;
