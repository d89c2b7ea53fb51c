//! Workload identity for Weir: who a sidecar is, proven by a certificate, and checked at both
//! ends of every sidecar-to-sidecar connection.
//!
//! - [`id`]: the identity itself, a SPIFFE ID naming a Microservice (or a Saga's coordinator)
//!   in a namespace of a trust domain.
//! - [`ca`]: the trust anchor and the issuer (an intermediate CA), the key pair and CSR a
//!   workload makes for itself, and the issuer's policy: a certificate for exactly the identity
//!   its requester authenticated as, short-lived, never a CA.
//! - [`endpoint`]: the issuer's HTTPS endpoint (a CSR and a bearer token in, a chain out) and
//!   the client a workload asks it with.
//! - [`tls`]: rustls configurations for mutual TLS by identity, with the workload's certificate
//!   replaceable under open connections.
//!
//! The operator issues (it authenticates a requester by its ServiceAccount token and maps it to
//! the Microservice); the sidecar makes its key, asks, and uses the result. Both link this
//! crate, so the identity's spelling and the issuer's policy are defined once.

pub mod ca;
pub mod endpoint;
pub mod id;
pub mod tls;

pub use ca::{Authority, Issued, Issuer, SignError, WorkloadKey};
pub use id::{WorkloadId, WorkloadKind};
