//! A workload's name as its certificate carries it: a SPIFFE ID in the certificate's one URI
//! SAN, `spiffe://<trust-domain>/ns/<namespace>/<kind>/<name>`, where `kind` is `ms` for a
//! Microservice's pods and `saga` for a Saga's coordinator.
//!
//! The ID is the unit of authorization: a sidecar admits a caller by it, and the issuer signs a
//! certificate for exactly the ID its requester authenticated as. Parsing is strict (one form,
//! DNS-label namespace and name, no query or fragment) so that two spellings can never name
//! the same workload.

use std::fmt;

/// What kind of workload an identity names.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum WorkloadKind {
    /// The pods of a Microservice (path segment `ms`).
    Microservice,
    /// A Saga's coordinator (path segment `saga`).
    Saga,
}

impl WorkloadKind {
    fn segment(self) -> &'static str {
        match self {
            WorkloadKind::Microservice => "ms",
            WorkloadKind::Saga => "saga",
        }
    }
}

/// One workload's identity.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct WorkloadId {
    pub trust_domain: String,
    pub namespace: String,
    pub kind: WorkloadKind,
    pub name: String,
}

/// Why a string is not a workload identity.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{uri:?} is not a Weir workload identity: {reason}")]
pub struct IdError {
    pub uri: String,
    pub reason: &'static str,
}

impl WorkloadId {
    /// A Microservice's identity.
    pub fn microservice(trust_domain: &str, namespace: &str, name: &str) -> Self {
        WorkloadId {
            trust_domain: trust_domain.into(),
            namespace: namespace.into(),
            kind: WorkloadKind::Microservice,
            name: name.into(),
        }
    }

    /// A Saga coordinator's identity.
    pub fn saga(trust_domain: &str, namespace: &str, name: &str) -> Self {
        WorkloadId {
            kind: WorkloadKind::Saga,
            ..WorkloadId::microservice(trust_domain, namespace, name)
        }
    }

    /// The SPIFFE URI.
    pub fn uri(&self) -> String {
        self.to_string()
    }

    /// `<namespace>/<name>`: how the sidecar names a caller to its app (`x-weir-caller`) and in
    /// metrics.
    pub fn short(&self) -> String {
        match self.kind {
            WorkloadKind::Microservice => format!("{}/{}", self.namespace, self.name),
            WorkloadKind::Saga => format!("{}/saga/{}", self.namespace, self.name),
        }
    }

    /// Parses `spiffe://<trust-domain>/ns/<namespace>/<ms|saga>/<name>`, and checks that the
    /// result prints back to the same text.
    pub fn parse(uri: &str) -> Result<Self, IdError> {
        let err = |reason| IdError {
            uri: uri.to_string(),
            reason,
        };
        let rest = uri
            .strip_prefix("spiffe://")
            .ok_or_else(|| err("it does not start with spiffe://"))?;
        let mut parts = rest.split('/');
        let trust_domain = parts.next().unwrap_or_default();
        if !is_trust_domain(trust_domain) {
            return Err(err(
                "its trust domain is not lowercase letters, digits, '-' and '.'",
            ));
        }
        let (Some("ns"), Some(namespace), Some(kind), Some(name), None) = (
            parts.next(),
            parts.next(),
            parts.next(),
            parts.next(),
            parts.next(),
        ) else {
            return Err(err("its path is not /ns/<namespace>/<ms|saga>/<name>"));
        };
        let kind = match kind {
            "ms" => WorkloadKind::Microservice,
            "saga" => WorkloadKind::Saga,
            _ => return Err(err("its kind is neither ms nor saga")),
        };
        // Names are DNS labels: a Microservice's or Saga's name names its Service.
        if !is_dns_label(namespace) || !is_dns_label(name) {
            return Err(err("its namespace or name is not a DNS label"));
        }
        Ok(WorkloadId {
            trust_domain: trust_domain.into(),
            namespace: namespace.into(),
            kind,
            name: name.into(),
        })
    }
}

impl fmt::Display for WorkloadId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "spiffe://{}/ns/{}/{}/{}",
            self.trust_domain,
            self.namespace,
            self.kind.segment(),
            self.name
        )
    }
}

/// A SPIFFE trust domain: lowercase letters, digits, `-`, `.` and `_`, not empty, at most 255.
pub fn is_trust_domain(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 255
        && s.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"-._".contains(&b))
}

fn is_dns_label(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 63
        && s.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !s.starts_with('-')
        && !s.ends_with('-')
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_identity_prints_and_parses_back() {
        let id = WorkloadId::microservice("cluster.local", "shop", "orders");
        assert_eq!(id.uri(), "spiffe://cluster.local/ns/shop/ms/orders");
        assert_eq!(WorkloadId::parse(&id.uri()), Ok(id.clone()));
        assert_eq!(id.short(), "shop/orders");
        let saga = WorkloadId::saga("cluster.local", "shop", "place-order");
        assert_eq!(
            saga.uri(),
            "spiffe://cluster.local/ns/shop/saga/place-order"
        );
        assert_eq!(WorkloadId::parse(&saga.uri()), Ok(saga));
    }

    #[test]
    fn other_spellings_are_refused() {
        for bad in [
            "https://cluster.local/ns/shop/ms/orders",
            "spiffe://Cluster.local/ns/shop/ms/orders",
            "spiffe:///ns/shop/ms/orders",
            "spiffe://cluster.local/ns/shop/ms/orders/",
            "spiffe://cluster.local/ns/shop/ms/orders/x",
            "spiffe://cluster.local/ns/shop/sa/orders",
            "spiffe://cluster.local/namespace/shop/ms/orders",
            "spiffe://cluster.local/ns//ms/orders",
            "spiffe://cluster.local/ns/Shop/ms/orders",
            "spiffe://cluster.local/ns/shop/ms/orders?x=1",
            "spiffe://cluster.local/ns/shop/ms/-orders",
            "spiffe://cluster.local/ns/shop/ms",
        ] {
            assert!(WorkloadId::parse(bad).is_err(), "{bad} was accepted");
        }
    }
}
