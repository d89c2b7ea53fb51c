//! The broker side of Queues in the operator's commands: `weir dlq` ([`dlq`]) and
//! `weir queue rewind` ([`rewind`]), both on the Queue's Broker ([`target`]). A Queue's
//! topology and the operator's role on each broker kind (declare, inspect, delete) are in
//! `weir_broker` ([`weir_broker::topology`], [`weir_broker::admin`]), shared with `weir up`;
//! the tests here run that role against real brokers.

pub mod dlq;
pub mod rewind;
pub mod target;

#[cfg(test)]
mod brokers_tests;
#[cfg(test)]
mod kafka_tests;
#[cfg(test)]
mod tests;
#[cfg(test)]
mod tls_tests;
