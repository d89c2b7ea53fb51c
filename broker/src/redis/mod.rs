//! Redis Streams. For a queue's stream name `<s>` (`weir_<ns>_<q>`): the stream `<s>` with one
//! consumer group per consuming Microservice, the dead-letter stream `<s>_dlq`, and beside them
//! the keys below. With feature `admin`, `admin`: what the operator declares, inspects and
//! deletes there.

#[cfg(feature = "admin")]
pub mod admin;
#[cfg(feature = "admin")]
pub mod dead_letters;
#[cfg(feature = "admin")]
pub mod rewind;

pub mod transport;

use crate::queue::{processed_bucket, rewind_marker_key};
use crate::rewind::Marker;

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

/// The rewind marker of consumer group `consumer` on queue `stream`, among its processed-event
/// records ([`crate::rewind`]).
pub fn rewind_marker_record(stream: &str, consumer: &str) -> String {
    processed_record(stream, &rewind_marker_key(consumer))
}

/// Lua: the generation of the marker at `KEYS[n]` (0 when there is none or it is no marker) as
/// local `g`.
macro_rules! marker_generation_lua {
    ($key:literal) => {
        concat!(
            "local g = 0\n",
            "local m = redis.call('GET', ",
            $key,
            ")\n",
            "if m then\n",
            "  local ok, v = pcall(cjson.decode, m)\n",
            "  if ok and type(v) == 'table' and tonumber(v['generation']) then g = tonumber(v['generation']) end\n",
            "end\n"
        )
    };
}

/// Writes the next rewind marker at `KEYS[1]` (one generation more than the last), `from` =
/// `ARGV[1]`, `to` = `ARGV[2]`; answers its generation. Run by `weir queue rewind`.
pub const MARK_SCRIPT: &str = concat!(
    marker_generation_lua!("KEYS[1]"),
    "g = g + 1\n",
    "redis.call('SET', KEYS[1], cjson.encode({generation = g, from = ARGV[1], to = ARGV[2]}))\n",
    "return g\n"
);

/// Records a processed event at `KEYS[1]` for `ARGV[2]` ms as `<position ARGV[1]> <generation>`,
/// the generation of the consumer's rewind marker at `KEYS[2]` when it is written: atomically,
/// so a record is older than a marker exactly when its generation is lower.
pub const RECORD_SCRIPT: &str = concat!(
    marker_generation_lua!("KEYS[2]"),
    "redis.call('SET', KEYS[1], ARGV[1] .. ' ' .. string.format('%d', g), 'PX', ARGV[2])\n",
    "return 1\n"
);

/// The processed-event record at `KEYS[1]` and the rewind marker at `KEYS[2]`: `{}` without a
/// record, `{record}` without a marker, else `{record, marker}`.
pub const CHECK_SCRIPT: &str = r#"
local r = redis.call('GET', KEYS[1])
if not r then return {} end
local m = redis.call('GET', KEYS[2])
if not m then return {r} end
return {r, m}
"#;

/// Whether a processed-event record (`<position> <generation>`; a record of an older sidecar
/// holds the position only, generation 0) counts for the message at `position`, given the
/// consumer's rewind marker: not when the marker is newer than the record and covers the
/// message.
pub fn record_counts(record: &str, marker: Option<&str>, position: &str) -> bool {
    let Some(marker) = marker.and_then(|m| Marker::parse(m.as_bytes())) else {
        return true;
    };
    let generation: u64 = record
        .split_whitespace()
        .nth(1)
        .and_then(|g| g.parse().ok())
        .unwrap_or(0);
    !(generation < marker.generation && marker.covers(position))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_record_older_than_the_marker_does_not_count_for_what_the_rewind_covers() {
        let marker = Marker {
            generation: 2,
            from: "1000-3".into(),
            to: "start".into(),
        }
        .to_json();
        let m = Some(marker.as_str());
        assert!(!record_counts("1000-5 1", m, "1000-5"), "older, covered");
        assert!(
            !record_counts("1000-5", m, "1000-5"),
            "a record without generation is 0"
        );
        assert!(
            record_counts("1000-5 2", m, "1000-5"),
            "written after the rewind"
        );
        assert!(
            record_counts("999-9 1", m, "999-9"),
            "before the rewind's start"
        );
        assert!(record_counts("1000-5 1", None, "1000-5"), "no rewind");
        assert!(
            record_counts("1000-5 1", Some("junk"), "1000-5"),
            "no marker"
        );
        assert_eq!(
            rewind_marker_record("weir_shop_orders", "billing"),
            "weir_processed_shop_orders:billing.rewind"
        );
    }
}
