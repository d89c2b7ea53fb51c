//! Helpers for tests of Weir against real dependencies (built for `cargo test` and with the
//! `testing` feature).

pub mod brokers;
pub mod nats_server;
pub mod pki;

pub use brokers::{RabbitServer, RedisServer};
pub use nats_server::NatsServer;
pub use pki::Pki;
