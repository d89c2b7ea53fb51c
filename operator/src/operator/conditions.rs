//! Status conditions: built fresh on each reconcile, merged so that `lastTransitionTime` only
//! moves when a condition's status does (otherwise every reconcile would rewrite the status).

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use k8s_openapi::jiff::Timestamp;
use std::collections::HashMap;
use std::sync::Mutex;

pub fn new(
    type_: &str,
    status: bool,
    reason: &str,
    message: impl Into<String>,
    generation: Option<i64>,
) -> Condition {
    Condition {
        type_: type_.into(),
        status: if status { "True" } else { "False" }.into(),
        reason: reason.into(),
        message: message.into(),
        observed_generation: generation,
        last_transition_time: Time(Timestamp::now()),
    }
}

/// `desired` with the transition times of `current` kept where the status did not change.
pub fn merge(current: &[Condition], desired: Vec<Condition>) -> Vec<Condition> {
    desired
        .into_iter()
        .map(|mut c| {
            if let Some(old) = current.iter().find(|o| o.type_ == c.type_)
                && old.status == c.status
            {
                c.last_transition_time = old.last_transition_time.clone();
            }
            c
        })
        .collect()
}

/// Whether two condition lists say the same thing (ignoring transition times).
pub fn same(a: &[Condition], b: &[Condition]) -> bool {
    a.len() == b.len()
        && a.iter().zip(b).all(|(x, y)| {
            x.type_ == y.type_
                && x.status == y.status
                && x.reason == y.reason
                && x.message == y.message
                && x.observed_generation == y.observed_generation
        })
}

pub fn find<'a>(conditions: &'a [Condition], type_: &str) -> Option<&'a Condition> {
    conditions.iter().find(|c| c.type_ == type_)
}

/// The conditions this process last wrote (or found already written) per object, keyed by
/// `Kind/namespace/name` and guarded by the object's uid. Events are published when a
/// condition changes, and the object a reconcile gets may predate the operator's own last
/// status write (a child's watch event, caused by the reconcile's own apply, often arrives
/// before the status write's): judged by that stale status alone, one cause would be recorded
/// twice.
#[derive(Default)]
pub struct LastWritten(Mutex<HashMap<String, Written>>);

/// The uid of the object written and its conditions.
type Written = (Option<String>, Vec<Condition>);

impl LastWritten {
    /// Remembers `conditions` as the object's latest.
    pub fn record(&self, key: &str, uid: Option<&str>, conditions: &[Condition]) {
        self.0.lock().expect("conditions lock").insert(
            key.to_string(),
            (uid.map(str::to_string), conditions.to_vec()),
        );
    }

    /// The object's latest conditions: the ones recorded for this uid, else `status` (after a
    /// restart, or for an object recreated under the same name).
    pub fn latest(&self, key: &str, uid: Option<&str>, status: &[Condition]) -> Vec<Condition> {
        match self.0.lock().expect("conditions lock").get(key) {
            Some((u, c)) if u.as_deref() == uid => c.clone(),
            _ => status.to_vec(),
        }
    }

    /// Drops a deleted object's entry.
    pub fn forget(&self, key: &str) {
        self.0.lock().expect("conditions lock").remove(key);
    }
}
