//! Redis Streams. For a queue's stream name `<s>` (`weir_<ns>_<q>`): the stream `<s>` with one
//! consumer group per consuming Microservice, the dead-letter stream `<s>_dlq`, and beside them
//! the keys below. With feature `admin`, `admin`: what the operator declares, inspects and
//! deletes there.

#[cfg(feature = "admin")]
pub mod admin;
#[cfg(feature = "admin")]
pub mod dead_letters;

pub mod transport;

use crate::queue::processed_bucket;

/// The key remembering a published event id (its stream entry id), for the duplicate window.
pub fn published_key(stream: &str, id: &str) -> String {
    format!("{stream}:published:{id}")
}

/// The processed-event record of `key` ([`crate::queue::processed_key`]) on queue `stream`.
pub fn processed_record(stream: &str, key: &str) -> String {
    format!("{}:{key}", processed_bucket(stream))
}

/// The set listing the consumer groups the operator created on a stream (and may delete).
pub fn managed_groups_key(stream: &str) -> String {
    format!("{stream}:managed-groups")
}
