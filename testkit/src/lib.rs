//! What Weir's test suites share, so that each helper exists once.
//!
//! A dev-only crate: every suite (the operator's unit and integration tests, the sidecar's
//! integration tests and benchmark) takes it as a dev-dependency; nothing shipped depends on it.
//!
//! - [`net`]: free loopback ports and addresses; waiting for a condition.
//! - [`brokers`]: real `nats-server`, `redis-server` and `rabbitmq-server` processes on free
//!   ports, each with its own data directory, killed with SIGKILL and restarted on the same port
//!   and data as a crash and a recovery would. They run the command lines of
//!   [`weir_broker::local`], the ones `weir up` runs.
//! - [`pki`]: a private CA and a server certificate for brokers behind TLS.
//! - [`mtls`]: a request over the mesh's mutual TLS with a workload certificate, as a peer
//!   sidecar makes it.
//! - [`proxy`]: a running `weir-proxy` (its binary given by the caller, e.g.
//!   `env!("CARGO_BIN_EXE_weir-proxy")` in the sidecar's own tests), and the small HTTP client
//!   the suites talk to it with.
//! - [`serve`](mod@serve): loopback HTTP/1.1 servers (the apps and upstreams behind a proxy).
//! - [`tls_front`]: a TLS listener forwarding to a plain TCP server, for a broker that serves
//!   no TLS itself (the test kit's Kafka).
//! - `bridge` (feature `bridge`): the sidecar's broker conformance helpers: one scenario run on
//!   each broker kind, a counting app, the sidecar configs, and what the suite reads from each
//!   broker directly.
//!
//! Helpers panic on what a test cannot go on without (a port, a directory, a server that does
//! not start); a missing broker binary is the exception where a test may skip (see
//! [`brokers::require`]).

pub mod brokers;
#[cfg(feature = "grpc")]
pub mod grpc;
pub mod mtls;
pub mod net;
pub mod pki;
pub mod proxy;
pub mod serve;
pub mod tls_front;

#[cfg(feature = "bridge")]
pub mod bridge;

pub use brokers::{KafkaServer, NatsServer, RabbitServer, RedisServer};
pub use net::{eventually, eventually_async, free_addr, free_port};
pub use pki::Pki;
pub use proxy::Proxy;
pub use serve::{serve, serve_at, serve_h2};
pub use tls_front::TlsFront;
