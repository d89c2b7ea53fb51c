//! Edge and identity counters: `weir_auth_rejections_total{reason}` and
//! `weir_identity_headers_removed_total{reason}`. Route and rate-limit refusals at the edge are
//! counted with the other policies, in `weir_rejections_total`.

use super::identity::Untrusted;
use super::jwt::AuthError;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::registry::Registry;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReasonLabels {
    pub reason: String,
}

#[derive(Clone, Debug)]
pub struct EdgeMetrics {
    auth_rejections: Family<ReasonLabels, Counter>,
    identity_removed: Family<ReasonLabels, Counter>,
}

impl EdgeMetrics {
    pub fn register(registry: &mut Registry) -> Self {
        let m = EdgeMetrics {
            auth_rejections: Family::default(),
            identity_removed: Family::default(),
        };
        registry.register(
            "auth_rejections",
            "Requests refused by the edge's JWT check, by reason",
            m.auth_rejections.clone(),
        );
        registry.register(
            "identity_headers_removed",
            "Inbound requests whose x-user-* headers were removed, by why they were not trusted",
            m.identity_removed.clone(),
        );
        m
    }

    /// One counter per reason, in the order of [`AuthError::ALL`].
    pub fn auth(&self) -> Vec<Counter> {
        AuthError::ALL
            .iter()
            .map(|e| {
                self.auth_rejections.get_or_create_owned(&ReasonLabels {
                    reason: e.as_str().into(),
                })
            })
            .collect()
    }

    /// One counter per reason, in the order of [`Untrusted::ALL`].
    pub fn identity_removed(&self) -> Vec<Counter> {
        Untrusted::ALL
            .iter()
            .map(|u| {
                self.identity_removed.get_or_create_owned(&ReasonLabels {
                    reason: u.as_str().into(),
                })
            })
            .collect()
    }
}
