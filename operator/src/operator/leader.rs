//! Leader election on a `coordination.k8s.io/v1` Lease, so two replicas never both act.
//!
//! A replica takes the Lease when it is free or expired, with optimistic concurrency on its
//! resourceVersion, then renews it; if a renewal fails for longer than the lease lasts, the
//! replica stops (another may have taken over).
//!
//! Failover: a leader that stops gracefully (SIGTERM: a pod delete, a rollout, a drain) gives
//! the Lease up with [`Lease::release`] once its controllers have stopped, so a standby, which
//! re-reads the Lease every [`RETRY_EVERY`], takes it within about half a second instead of
//! waiting out [`LEASE_SECONDS`]. A leader that dies without running its shutdown (kill -9, OOM,
//! a lost node) cannot release: the standby takes over once the last renewal is
//! [`LEASE_SECONDS`] old, that is 10 to 15 s after the crash (renewals are [`RENEW_EVERY`]
//! apart), plus at most one [`RETRY_EVERY`].

use k8s_openapi::api::coordination::v1::{Lease as K8sLease, LeaseSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta};
use k8s_openapi::jiff::{SignedDuration, Timestamp};
use kube::Client;
use kube::api::{Api, PostParams};
use std::time::Duration;

pub const LEASE_SECONDS: i32 = 15;
pub const RENEW_EVERY: Duration = Duration::from_secs(5);
/// How often a standby re-reads the Lease. Short, so that a released Lease is taken within a
/// fraction of a second (the target is a graceful failover under 2 s); the price is one GET of
/// one small object every half second per standby.
pub const RETRY_EVERY: Duration = Duration::from_millis(500);
/// The duration a released Lease is left with: already expired for any reader whose clock is
/// not more than a second behind ours, so the standby's expiry check passes at once too.
const RELEASED_LEASE_SECONDS: i32 = 1;

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
                // A released Lease has no holder (or an empty one, as other clients write it).
                let held = spec
                    .holder_identity
                    .as_deref()
                    .is_some_and(|h| !h.is_empty());
                if !mine && !expired && held {
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

    /// Gives the Lease up if this replica still holds it: clears `holderIdentity` and shortens
    /// the duration, so a standby takes it at its next look instead of waiting out the lease.
    /// `Ok(true)` when released; `Ok(false)` when another replica holds it (or it is gone), which
    /// is left untouched. The write carries the resourceVersion read, so it cannot clear a
    /// holder that took over in between; on such a conflict the Lease is read again.
    pub async fn release(&self) -> kube::Result<bool> {
        for _ in 0..3 {
            let Some(mut lease) = self.api.get_opt(&self.name).await? else {
                return Ok(false);
            };
            let spec = lease.spec.get_or_insert_with(Default::default);
            if spec.holder_identity.as_deref() != Some(self.identity.as_str()) {
                return Ok(false);
            }
            spec.holder_identity = None;
            spec.lease_duration_seconds = Some(RELEASED_LEASE_SECONDS);
            spec.renew_time = Some(MicroTime(Timestamp::now()));
            match self
                .api
                .replace(&self.name, &PostParams::default(), &lease)
                .await
            {
                Ok(_) => return Ok(true),
                // A renewal of ours still in flight when the holder task stopped: read again.
                Err(kube::Error::Api(s)) if s.code == 409 => continue,
                Err(e) => return Err(e),
            }
        }
        Ok(false)
    }
}

#[cfg(test)]
mod tests {
    use super::super::mock_api::{expect, serve};
    use super::*;
    use http::{Method, Request, Response, StatusCode};
    use kube::client::Body;
    use serde_json::{Value, json};

    const PATH: &str = "/apis/coordination.k8s.io/v1/namespaces/weir-system/leases/weir-operator";

    fn lease_of(client: Client, identity: &str) -> Lease {
        Lease::new(client, "weir-system", "weir-operator", identity)
    }

    fn mock() -> (Client, super::super::mock_api::Handle) {
        let (svc, handle) = tower_test::mock::pair::<Request<Body>, Response<Body>>();
        (Client::new(svc, "default"), handle)
    }

    /// The Lease as stored: held by `holder`, renewed just now for `duration` seconds.
    fn stored(holder: Option<&str>, duration: i32) -> Value {
        let now = Timestamp::now().to_string();
        let mut spec = json!({
            "leaseDurationSeconds": duration,
            "acquireTime": now,
            "renewTime": now,
            "leaseTransitions": 3,
        });
        if let Some(h) = holder {
            spec["holderIdentity"] = json!(h);
        }
        json!({
            "apiVersion": "coordination.k8s.io/v1",
            "kind": "Lease",
            "metadata": {"name": "weir-operator", "namespace": "weir-system", "resourceVersion": "42"},
            "spec": spec,
        })
    }

    /// Issue #22, 5: the leader gives the Lease up on shutdown (no holder, a 1 s duration, the
    /// resourceVersion it read so a concurrent take-over is not overwritten), and the standby's
    /// next attempt takes it at once although the old holder renewed it a moment ago.
    #[tokio::test]
    async fn release_clears_the_holder_and_the_standby_takes_the_lease_at_once() {
        let (client, handle) = mock();
        let api = tokio::spawn(serve(
            handle,
            vec![
                expect(Method::GET, PATH, |_| {
                    (StatusCode::OK, stored(Some("pod-a"), LEASE_SECONDS))
                }),
                expect(Method::PUT, PATH, |b| (StatusCode::OK, b.clone())),
            ],
        ));
        assert!(lease_of(client, "pod-a").release().await.unwrap());
        let seen = api.await.unwrap();
        let put = &seen[1].1;
        assert_eq!(put["metadata"]["resourceVersion"], "42", "{put}");
        assert!(put["spec"].get("holderIdentity").is_none(), "{put}");
        assert_eq!(put["spec"]["leaseDurationSeconds"], RELEASED_LEASE_SECONDS);
        let released = put.clone();

        let (client, handle) = mock();
        let api = tokio::spawn(serve(
            handle,
            vec![
                expect(Method::GET, PATH, move |_| {
                    (StatusCode::OK, released.clone())
                }),
                expect(Method::PUT, PATH, |b| (StatusCode::OK, b.clone())),
            ],
        ));
        assert!(lease_of(client, "pod-b").try_acquire().await.unwrap());
        let seen = api.await.unwrap();
        let put = &seen[1].1;
        assert_eq!(put["spec"]["holderIdentity"], "pod-b", "{put}");
        assert_eq!(put["spec"]["leaseDurationSeconds"], LEASE_SECONDS);
        assert_eq!(put["spec"]["leaseTransitions"], 4);
    }

    /// Releasing a Lease another replica holds (it took over already) or that does not exist
    /// writes nothing: the mock fails on any request beyond the GET.
    #[tokio::test]
    async fn release_leaves_a_lease_held_by_another_replica_alone() {
        let (client, handle) = mock();
        let api = tokio::spawn(serve(
            handle,
            vec![expect(Method::GET, PATH, |_| {
                (StatusCode::OK, stored(Some("pod-b"), LEASE_SECONDS))
            })],
        ));
        assert!(!lease_of(client, "pod-a").release().await.unwrap());
        api.await.unwrap();

        let (client, handle) = mock();
        let api = tokio::spawn(serve(
            handle,
            vec![expect(Method::GET, PATH, |_| {
                (
                    StatusCode::NOT_FOUND,
                    json!({"kind": "Status", "apiVersion": "v1", "status": "Failure", "reason": "NotFound", "code": 404}),
                )
            })],
        ));
        assert!(!lease_of(client, "pod-a").release().await.unwrap());
        api.await.unwrap();
    }

    /// A renewal of ours that lands between the read and the write (409) does not leave the
    /// Lease held: the release reads it again and clears it.
    #[tokio::test]
    async fn release_retries_after_a_conflict_with_its_own_renewal() {
        let (client, handle) = mock();
        let conflict = |_: &Value| {
            (
                StatusCode::CONFLICT,
                json!({"kind": "Status", "apiVersion": "v1", "status": "Failure", "reason": "Conflict", "code": 409}),
            )
        };
        let api = tokio::spawn(serve(
            handle,
            vec![
                expect(Method::GET, PATH, |_| {
                    (StatusCode::OK, stored(Some("pod-a"), LEASE_SECONDS))
                }),
                expect(Method::PUT, PATH, conflict),
                expect(Method::GET, PATH, |_| {
                    (StatusCode::OK, stored(Some("pod-a"), LEASE_SECONDS))
                }),
                expect(Method::PUT, PATH, |b| (StatusCode::OK, b.clone())),
            ],
        ));
        assert!(lease_of(client, "pod-a").release().await.unwrap());
        let seen = api.await.unwrap();
        assert!(seen[3].1["spec"].get("holderIdentity").is_none());
    }

    /// Without the release, the standby does not take a Lease renewed a moment ago.
    #[tokio::test]
    async fn a_held_lease_is_not_taken() {
        let (client, handle) = mock();
        let api = tokio::spawn(serve(
            handle,
            vec![expect(Method::GET, PATH, |_| {
                (StatusCode::OK, stored(Some("pod-a"), LEASE_SECONDS))
            })],
        ));
        assert!(!lease_of(client, "pod-b").try_acquire().await.unwrap());
        api.await.unwrap();
    }
}
