//! Writing a resource's status, the same way for every kind: only when it says something new,
//! by server-side apply under [`FIELD_MANAGER`].
//!
//! Why "only when new": a status write is itself a watch event of the object, so rewriting an
//! unchanged status would reconcile the object again, forever. Conditions are compared without
//! their transition times ([`conditions::same`]), every other field exactly.

use super::{FIELD_MANAGER, conditions};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition;
use kube::api::{Api, Patch, PatchParams};
use kube::{Client, Resource};
use serde::Serialize;
use serde::de::DeserializeOwned;
use serde_json::json;
use weir_crds::broker::BrokerStatus;
use weir_crds::microservice::MicroserviceStatus;
use weir_crds::queue::QueueStatus;
use weir_crds::saga::SagaStatus;

/// A kind's status: its conditions and the rest.
pub trait Status: Serialize + Clone + PartialEq {
    fn conditions(&self) -> &[Condition];
    fn conditions_mut(&mut self) -> &mut Vec<Condition>;
}

macro_rules! status_with_conditions {
    ($($t:ty),*) => {$(
        impl Status for $t {
            fn conditions(&self) -> &[Condition] {
                &self.conditions
            }
            fn conditions_mut(&mut self) -> &mut Vec<Condition> {
                &mut self.conditions
            }
        }
    )*};
}
status_with_conditions!(BrokerStatus, MicroserviceStatus, QueueStatus, SagaStatus);

/// Whether `new` says what `current` says: the same conditions (transition times aside) and
/// every other field equal.
pub fn unchanged<S: Status>(current: &S, new: &S) -> bool {
    let rest = |s: &S| {
        let mut s = s.clone();
        s.conditions_mut().clear();
        s
    };
    conditions::same(current.conditions(), new.conditions()) && rest(current) == rest(new)
}

/// `status` with the transition times of `current`'s conditions kept where their status did
/// not change ([`conditions::merge`]).
pub fn merged<S: Status>(current: &S, mut status: S) -> S {
    let desired = std::mem::take(status.conditions_mut());
    *status.conditions_mut() = conditions::merge(current.conditions(), desired);
    status
}

/// Applies `status` to `<namespace>/<name>` of kind `K` unless [`unchanged`]. An object deleted
/// while it was reconciled (404) has nothing left to report on: not an error.
pub async fn write<K, S>(
    client: &Client,
    namespace: &str,
    name: &str,
    current: &S,
    status: &S,
) -> Result<(), kube::Error>
where
    K: Resource<DynamicType = (), Scope = k8s_openapi::NamespaceResourceScope>
        + Clone
        + DeserializeOwned
        + std::fmt::Debug,
    S: Status,
{
    if unchanged(current, status) {
        return Ok(());
    }
    let patch = json!({
        "apiVersion": K::api_version(&()),
        "kind": K::kind(&()),
        "status": status,
    });
    let written = Api::<K>::namespaced(client.clone(), namespace)
        .patch_status(
            name,
            &PatchParams::apply(FIELD_MANAGER).force(),
            &Patch::Apply(&patch),
        )
        .await;
    match written {
        Err(kube::Error::Api(e)) if e.code == 404 => Ok(()),
        other => other.map(|_| ()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ready(status: bool, message: &str) -> Condition {
        conditions::new("Ready", status, "R", message, Some(1))
    }

    #[test]
    fn unchanged_ignores_transition_times_but_no_other_field() {
        let a = QueueStatus {
            conditions: vec![ready(true, "ok")],
            messages: Some(3),
            ..Default::default()
        };
        let mut later = a.clone();
        later.conditions[0].last_transition_time.0 =
            a.conditions[0].last_transition_time.0 + std::time::Duration::from_secs(60);
        assert!(unchanged(&a, &later));
        let mut more = a.clone();
        more.messages = Some(4);
        assert!(!unchanged(&a, &more));
        let mut other = a.clone();
        other.conditions = vec![ready(true, "other message")];
        assert!(!unchanged(&a, &other));
    }

    #[test]
    fn merged_keeps_the_transition_time_of_an_unchanged_condition() {
        let old = SagaStatus {
            conditions: vec![ready(true, "ok")],
            ..Default::default()
        };
        let mut fresh = ready(true, "ok");
        fresh.last_transition_time.0 =
            old.conditions[0].last_transition_time.0 + std::time::Duration::from_secs(60);
        let new = merged(
            &old,
            SagaStatus {
                conditions: vec![fresh],
                ..Default::default()
            },
        );
        assert_eq!(
            new.conditions[0].last_transition_time,
            old.conditions[0].last_transition_time
        );
    }
}
