//! Status conditions: built fresh on each reconcile, merged so that `lastTransitionTime` only
//! moves when a condition's status does (otherwise every reconcile would rewrite the status).

use super::applied::hash_of;
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
///
/// Only what that judgement compares is kept: a fingerprint of each condition's type, status,
/// reason and observed generation, under a hash of the key and of the uid. A copy of the
/// conditions (their messages, times) was about 0.7 KiB per object, with thousands of
/// Microservices. A collision of two 64-bit hashes could at worst skip or repeat one Event.
#[derive(Default)]
pub struct LastWritten(Mutex<HashMap<u64, Written>>);

/// The uid's hash and the conditions' fingerprints.
type Written = (u64, Vec<u64>);

/// What [`LastWritten`] keeps of a condition.
fn fingerprint(type_: &str, status: &str, reason: &str, generation: Option<i64>) -> u64 {
    hash_of(&(type_, status, reason, generation))
}

impl LastWritten {
    /// Remembers `conditions` as the object's latest.
    pub fn record(&self, key: &str, uid: Option<&str>, conditions: &[Condition]) {
        let prints = conditions
            .iter()
            .map(|c| fingerprint(&c.type_, &c.status, &c.reason, c.observed_generation))
            .collect();
        self.0
            .lock()
            .expect("conditions lock")
            .insert(hash_of(&key), (hash_of(&uid), prints));
    }

    /// Whether the object's latest conditions have condition `type_` at `status` for `reason`
    /// and `generation`: the ones recorded for this uid, else `status_conditions` (after a
    /// restart, or for an object recreated under the same name).
    pub fn has(
        &self,
        key: &str,
        uid: Option<&str>,
        status_conditions: &[Condition],
        (type_, status, reason, generation): (&str, &str, &str, Option<i64>),
    ) -> bool {
        match self.0.lock().expect("conditions lock").get(&hash_of(&key)) {
            Some((u, prints)) if *u == hash_of(&uid) => {
                prints.contains(&fingerprint(type_, status, reason, generation))
            }
            _ => find(status_conditions, type_).is_some_and(|c| {
                c.status == status && c.reason == reason && c.observed_generation == generation
            }),
        }
    }

    /// Drops a deleted object's entry.
    pub fn forget(&self, key: &str) {
        self.0
            .lock()
            .expect("conditions lock")
            .remove(&hash_of(&key));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_last_written_conditions_are_judged_by_uid_then_by_status() {
        let written = LastWritten::default();
        let degraded =
            |reason: &str, generation| new("Degraded", true, reason, "a message", Some(generation));
        let key = "Microservice/shop/orders";
        let status = vec![degraded("InvalidSpec", 1)];
        // What `orders`' reconcile asks, with the object's `uid`, for a condition.
        let has = |uid, condition| written.has(key, Some(uid), &status, condition);
        // Nothing recorded: the object's status answers.
        assert!(has("u1", ("Degraded", "True", "InvalidSpec", Some(1))));
        assert!(!has("u1", ("Degraded", "False", "InvalidSpec", Some(1))));
        assert!(!has("u1", ("Degraded", "True", "InvalidSpec", Some(2))));
        // Recorded for this uid: the record answers, whatever the (older) status says.
        written.record(key, Some("u1"), &[degraded("DependencyNotFound", 2)]);
        assert!(has(
            "u1",
            ("Degraded", "True", "DependencyNotFound", Some(2))
        ));
        assert!(!has("u1", ("Degraded", "True", "InvalidSpec", Some(1))));
        assert!(!has("u1", ("Ready", "True", "DependencyNotFound", Some(2))));
        // Another object under the same name: its own status answers.
        assert!(has("u2", ("Degraded", "True", "InvalidSpec", Some(1))));
        assert!(!written.has(
            "Microservice/shop/users",
            Some("u1"),
            &[],
            ("Degraded", "True", "DependencyNotFound", Some(2))
        ));
        written.forget(key);
        assert!(!has(
            "u1",
            ("Degraded", "True", "DependencyNotFound", Some(2))
        ));
    }
}
