//! Leader election on a `coordination.k8s.io/v1` Lease, so two replicas never both act.
//!
//! A replica takes the Lease when it is free or expired, with optimistic concurrency on its
//! resourceVersion, then renews it; if a renewal fails for longer than the lease lasts, the
//! replica stops (another may have taken over).

use k8s_openapi::api::coordination::v1::{Lease as K8sLease, LeaseSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta};
use k8s_openapi::jiff::{SignedDuration, Timestamp};
use kube::Client;
use kube::api::{Api, PostParams};
use std::time::Duration;

pub const LEASE_SECONDS: i32 = 15;
const RENEW_EVERY: Duration = Duration::from_secs(5);
const RETRY_EVERY: Duration = Duration::from_secs(2);

pub struct Lease {
    api: Api<K8sLease>,
    name: String,
    identity: String,
}

impl Lease {
    pub fn new(client: Client, namespace: &str, name: &str, identity: &str) -> Self {
        Self {
            api: Api::namespaced(client, namespace),
            name: name.into(),
            identity: identity.into(),
        }
    }

    /// Waits until this replica holds the lease.
    pub async fn acquire(&self) -> kube::Result<()> {
        loop {
            match self.try_acquire().await {
                Ok(true) => return Ok(()),
                Ok(false) => {}
                Err(e) => tracing::warn!(error = %e, "leader election attempt failed"),
            }
            tokio::time::sleep(RETRY_EVERY).await;
        }
    }

    /// Renews the lease for as long as it can; returns why it stopped holding it.
    pub async fn hold(&self) -> String {
        let mut last_ok = Timestamp::now();
        loop {
            tokio::time::sleep(RENEW_EVERY).await;
            match self.try_acquire().await {
                Ok(true) => last_ok = Timestamp::now(),
                Ok(false) => return "another replica holds the lease".into(),
                Err(e) => {
                    tracing::warn!(error = %e, "lease renewal failed");
                    if Timestamp::now().duration_since(last_ok)
                        > SignedDuration::from_secs(i64::from(LEASE_SECONDS))
                    {
                        return format!("could not renew the lease for {LEASE_SECONDS}s: {e}");
                    }
                }
            }
        }
    }

    /// Takes or renews the lease; `Ok(false)` when someone else validly holds it.
    pub async fn try_acquire(&self) -> kube::Result<bool> {
        let now = MicroTime(Timestamp::now());
        match self.api.get_opt(&self.name).await? {
            None => {
                let lease = K8sLease {
                    metadata: ObjectMeta {
                        name: Some(self.name.clone()),
                        ..Default::default()
                    },
                    spec: Some(LeaseSpec {
                        holder_identity: Some(self.identity.clone()),
                        lease_duration_seconds: Some(LEASE_SECONDS),
                        acquire_time: Some(now.clone()),
                        renew_time: Some(now),
                        lease_transitions: Some(0),
                        ..Default::default()
                    }),
                };
                match self.api.create(&PostParams::default(), &lease).await {
                    Ok(_) => Ok(true),
                    Err(kube::Error::Api(s)) if s.code == 409 => Ok(false),
                    Err(e) => Err(e),
                }
            }
            Some(mut lease) => {
                let spec = lease.spec.get_or_insert_with(Default::default);
                let mine = spec.holder_identity.as_deref() == Some(self.identity.as_str());
                let expired = match (&spec.renew_time, spec.lease_duration_seconds) {
                    (Some(t), Some(d)) => {
                        t.0.saturating_add(SignedDuration::from_secs(i64::from(d)))
                            .map(|end| end < now.0)
                            .unwrap_or(true)
                    }
                    _ => true,
                };
                if !mine && !expired && spec.holder_identity.is_some() {
                    return Ok(false);
                }
                if !mine {
                    spec.acquire_time = Some(now.clone());
                    spec.lease_transitions = Some(spec.lease_transitions.unwrap_or(0) + 1);
                }
                spec.holder_identity = Some(self.identity.clone());
                spec.lease_duration_seconds = Some(LEASE_SECONDS);
                spec.renew_time = Some(now);
                // replace carries the resourceVersion we read: a concurrent writer makes it 409.
                match self
                    .api
                    .replace(&self.name, &PostParams::default(), &lease)
                    .await
                {
                    Ok(_) => Ok(true),
                    Err(kube::Error::Api(s)) if s.code == 409 => Ok(false),
                    Err(e) => Err(e),
                }
            }
        }
    }
}
