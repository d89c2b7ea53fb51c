//! Where Weir's messaging lives on each broker kind.
//!
//! The operator declares, inspects and deletes what is named here; the sidecar publishes,
//! consumes, dead-letters and remembers processed events on it; `weir dlq` and the saga
//! coordinator read it. All of them take the names and arguments from this one crate: when two
//! copies drift the failure shows only at run time (a consumer reading a queue nobody declared,
//! or RabbitMQ refusing a redeclare with other arguments).
//!
//! - [`queue`]: the names every kind shares. A Queue `<q>` of namespace `<ns>` is the stream
//!   `weir_<ns>_<q>` on NATS and on Redis, and the exchange and queue prefix `weir_<ns>_<q>` on
//!   RabbitMQ.
//! - [`rabbitmq`]: consumer and retry queues and the arguments each is declared with.
//! - [`redis`]: the keys beside a queue's stream.
//! - [`credentials`]: what a Broker's credentials Secret holds, read one way everywhere.
//! - [`nats`]: connecting to NATS once (operator, saga coordinator, commands).
//! - [`transport`]: the sidecar's role (publish, consume, ack, dead-letter), one `transport`
//!   module per kind.
//!
//! What Weir guarantees on top of this layout is in docs/messaging.md.

pub mod credentials;
pub mod local;
pub mod nats;
pub mod queue;
pub mod rabbitmq;
pub mod redis;
pub mod transport;
