//! The `weir.dev/v1alpha1` API and the `weir-proxy` config contract.
//!
//! Shared by the operator (which writes both) and the sidecar (which reads the contract). The
//! sidecar builds this crate without the `k8s` feature and gets only the config contracts
//! ([`proxy`], [`coordinator`], their [`config_error`]), [`duration`] and [`redact`].

// printcolumn(...) repeats `type_ = ...` by design; the lint reads them as duplicates.
#![allow(clippy::duplicated_attributes)]
#![warn(missing_docs)]

pub mod config_error;
pub mod coordinator;
pub mod duration;
pub mod proxy;
pub mod redact;

#[cfg(feature = "k8s")]
pub mod broker;
#[cfg(feature = "k8s")]
pub mod crd;
#[cfg(feature = "k8s")]
pub mod microservice;
#[cfg(feature = "k8s")]
pub mod policy;
#[cfg(feature = "k8s")]
pub mod queue;
#[cfg(feature = "k8s")]
pub mod saga;
#[cfg(feature = "k8s")]
pub mod validate;

#[cfg(feature = "k8s")]
pub use broker::{Broker, BrokerSpec};
#[cfg(feature = "k8s")]
pub use microservice::{Microservice, MicroserviceSpec};
#[cfg(feature = "k8s")]
pub use queue::{Queue, QueueSpec};
#[cfg(feature = "k8s")]
pub use saga::{Saga, SagaSpec};

/// API group of every Weir resource.
pub const GROUP: &str = "weir.dev";
/// API version of every Weir resource.
pub const VERSION: &str = "v1alpha1";

/// Schema for free-form JSON (message schemas, saga bodies): kept as given by the apiserver.
#[cfg(feature = "k8s")]
pub(crate) fn preserve_unknown_fields(_: &mut schemars::SchemaGenerator) -> schemars::Schema {
    schemars::json_schema!({"x-kubernetes-preserve-unknown-fields": true})
}

/// Schema for a free-form JSON object that a CEL rule refers to (`has(self.inline)`): the
/// apiserver compiles CEL against the schema's types, and a field without a `type` is invisible
/// to it ("undefined field"), so the object type is stated.
#[cfg(feature = "k8s")]
pub(crate) fn preserve_unknown_object(_: &mut schemars::SchemaGenerator) -> schemars::Schema {
    schemars::json_schema!({"type": "object", "x-kubernetes-preserve-unknown-fields": true})
}
