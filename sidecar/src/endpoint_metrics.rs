//! `weir_endpoint_*` and `weir_endpoints*`: per dependency and endpoint, bounded.
//!
//! An endpoint's series are made when it joins a dependency's set and removed when it leaves,
//! so a Deployment rolled every hour does not grow `/metrics` for ever. At most
//! [`ENDPOINTS_MAX`] endpoints of one dependency get label sets of their own; further ones
//! share `endpoint="other"`.

use crate::balance::{EndpointMetrics, EndpointObserver};
use crate::metrics::DependencyLabels;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use std::collections::HashSet;
use std::net::SocketAddr;
use std::sync::atomic::AtomicU64;
use std::sync::{Arc, Mutex};

/// Endpoints of one dependency with series of their own.
pub const ENDPOINTS_MAX: usize = 100;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct EndpointLabels {
    pub dependency: String,
    pub endpoint: String,
}

/// The families, registered once per sidecar.
#[derive(Clone, Debug, Default)]
pub struct EndpointFamilies {
    requests: Family<EndpointLabels, Counter>,
    ejections: Family<EndpointLabels, Counter>,
    in_flight: Family<EndpointLabels, Gauge>,
    rtt: Family<EndpointLabels, Gauge<f64, AtomicU64>>,
    ejected: Family<EndpointLabels, Gauge>,
    dependency_ejected: Family<DependencyLabels, Gauge>,
    dependency_endpoints: Family<DependencyLabels, Gauge>,
}

impl EndpointFamilies {
    pub fn register(registry: &mut Registry) -> EndpointFamilies {
        let f = EndpointFamilies::default();
        registry.register(
            "endpoint_requests",
            "Requests sent to each endpoint of a dependency (attempts: a retry counts again)",
            f.requests.clone(),
        );
        registry.register(
            "endpoint_ejections",
            "Times each endpoint was ejected for consecutive gateway failures",
            f.ejections.clone(),
        );
        registry.register(
            "endpoint_in_flight",
            "Requests in flight to each endpoint",
            f.in_flight.clone(),
        );
        registry.register(
            "endpoint_latency_ewma_seconds",
            "Each endpoint's peak-EWMA latency estimate at its last answer",
            f.rtt.clone(),
        );
        registry.register(
            "endpoint_ejected",
            "1 while the endpoint is ejected or on probation",
            f.ejected.clone(),
        );
        registry.register(
            "endpoints_ejected",
            "Endpoints of the dependency ejected or on probation now",
            f.dependency_ejected.clone(),
        );
        registry.register(
            "endpoints",
            "Endpoints the dependency's discovery knows now",
            f.dependency_endpoints.clone(),
        );
        f
    }

    /// The observer of one dependency's balancer.
    pub fn observer(&self, dependency: &str) -> Arc<dyn EndpointObserver> {
        Arc::new(Observer {
            families: self.clone(),
            dependency: dependency.to_string(),
            labelled: Mutex::default(),
        })
    }
}

#[derive(Debug)]
struct Observer {
    families: EndpointFamilies,
    dependency: String,
    labelled: Mutex<HashSet<SocketAddr>>,
}

impl Observer {
    fn labels(&self, endpoint: String) -> EndpointLabels {
        EndpointLabels {
            dependency: self.dependency.clone(),
            endpoint,
        }
    }

    fn dependency(&self) -> DependencyLabels {
        DependencyLabels {
            dependency: self.dependency.clone(),
        }
    }
}

impl EndpointObserver for Observer {
    fn joined(&self, addr: SocketAddr) -> EndpointMetrics {
        let own = {
            let mut l = self.labelled.lock().unwrap_or_else(|e| e.into_inner());
            l.len() < ENDPOINTS_MAX && l.insert(addr)
        };
        let labels = self.labels(if own {
            addr.to_string()
        } else {
            "other".into()
        });
        let f = &self.families;
        f.dependency_endpoints
            .get_or_create(&self.dependency())
            .inc();
        EndpointMetrics {
            requests: f.requests.get_or_create_owned(&labels),
            ejections: f.ejections.get_or_create_owned(&labels),
            in_flight: f.in_flight.get_or_create_owned(&labels),
            rtt: f.rtt.get_or_create_owned(&labels),
            ejected: f.ejected.get_or_create_owned(&labels),
            dependency_ejected: f.dependency_ejected.get_or_create_owned(&self.dependency()),
        }
    }

    fn left(&self, addr: SocketAddr) {
        let f = &self.families;
        f.dependency_endpoints
            .get_or_create(&self.dependency())
            .dec();
        let own = self
            .labelled
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&addr);
        if own {
            let labels = self.labels(addr.to_string());
            f.requests.remove(&labels);
            f.ejections.remove(&labels);
            f.in_flight.remove(&labels);
            f.rtt.remove(&labels);
            f.ejected.remove(&labels);
        }
    }
}
