//! Weir's queues on each broker kind: where they live, how to connect, and the roles of the
//! operator and the sidecar on them.
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
//! - [`credentials`]: what a Broker's credentials Secret holds, read one way everywhere, and
//!   the rule that a `ca.crt` requires a TLS URL.
//! - One module per broker kind, holding its layout, its `transport` module (the sidecar's role
//!   on that kind) and, with feature `admin`, its `admin` module (the operator's role):
//!   - [`nats`]: connecting to NATS once (operator, saga coordinator, commands);
//!   - [`redis`]: the keys beside a queue's stream;
//!   - [`rabbitmq`]: consumer and retry queues, the arguments each is declared with, and
//!     [`rabbitmq::declare`] (declaring queues, exchanges and bindings, for both roles);
//!   - [`kafka`]: topics and consumer groups, and how a `kafka://` URL and a Secret become a
//!     librdkafka client configuration; the sidecar's role in [`kafka::transport`] and its
//!     processed-event topic in [`kafka::processed`]; with feature `admin`, the operator's
//!     role (topics, partitions, groups, figures) and its dead letters.
//! - [`transport`]: the sidecar's role as traits (publish, consume, ack, dead-letter) and the
//!   registration of the kinds it can connect to (`Kind`, `Connection`).
//! - [`local`]: how each broker runs on this machine (binary finders, command lines), shared by
//!   `weir up` and the test kit.
//!
//! With feature `admin` (the operator):
//!
//! - `topology`: what is declared for one Queue, computed from its spec without I/O and
//!   without any broker's types.
//! - `admin`: the operator's role as one trait (`Admin`: declare, inspect, delete), the typed
//!   error with its condition reason and metric label, and the registration of the kinds
//!   (`BrokerAdmin`, `connect`, `kind_of_url`, `not_applied`). A new broker kind is one module
//!   here, one line of that registration and one variant of `transport::Connection`.
//! - `dead_letters`: a Queue's dead letters on each kind, listed, read and replayed
//!   (`weir dlq`).
//! - `rewind`: a consumer moved back to a point in time on a kind that keeps a log
//!   (`weir queue rewind`), and the marker by which the sidecar delivers those events again
//!   despite its dedup (that part without feature `admin`).
//!
//! What Weir guarantees on top of this layout is in docs/messaging.md.

#[cfg(feature = "admin")]
pub mod admin;
pub mod credentials;
#[cfg(feature = "admin")]
pub mod dead_letters;
pub mod kafka;
pub mod local;
pub mod nats;
pub mod queue;
pub mod rabbitmq;
pub mod redis;
pub mod rewind;
#[cfg(feature = "admin")]
pub mod topology;
pub mod transport;
