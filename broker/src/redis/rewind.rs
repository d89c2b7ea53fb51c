//! A consumer group moved back on Redis Streams ([`crate::rewind`]).
//!
//! Entry ids are `<milliseconds>-<n>`, so the first entry at or after a time is
//! `XRANGE <stream> <ms> + COUNT 1` (for [`Point::Start`]: `- +`). `XGROUP SETID` then sets the
//! group's last-delivered id just below it, and the sidecars' next `XREADGROUP >` reads from
//! there: the group stays, nothing restarts.
//!
//! Pending entries (the group's PEL) are left as they are. An entry at or after the point that
//! a sidecar still holds is read again by `>` as a new delivery (Redis moves it to the reader
//! with a delivery count of 1); one before the point stays pending and is reclaimed after the
//! ack wait as usual.
//!
//! The rewind marker is a key beside the processed-event records
//! ([`super::rewind_marker_record`]), written by [`super::MARK_SCRIPT`] before the group moves
//! and once more after it; each write raises its generation.

use super::admin::{RedisAdmin, flat_map, text};
use super::{MARK_SCRIPT, rewind_marker_record};
use crate::admin::Error;
use crate::queue::stream_name;
use crate::rewind::{Point, Rewind, Rewound, position_order};
use redis::Value;
use std::cmp::Ordering;

impl Rewind for RedisAdmin {
    async fn rewind(
        &self,
        namespace: &str,
        queue: &str,
        consumer: &str,
        to: Point,
    ) -> Result<Rewound, Error> {
        let stream = stream_name(namespace, queue);
        let group = self.group(&stream, consumer).await?;
        let last = group.get("last-delivered-id").cloned().unwrap_or_default();
        let start = match to {
            Point::Start => "-".to_string(),
            Point::Time(t) => t.timestamp_millis().max(0).to_string(),
        };
        let first: Value = self
            .q(
                format!("XRANGE {stream}"),
                redis::cmd("XRANGE")
                    .arg(&stream)
                    .arg(&start)
                    .arg("+")
                    .arg("COUNT")
                    .arg(1),
            )
            .await?;
        let from = match &first {
            Value::Array(entries) => entries.first().and_then(|e| match e {
                Value::Array(e) => e.first().and_then(text),
                _ => None,
            }),
            _ => None,
        };
        let Some(from) = from.filter(|f| {
            matches!(
                position_order(f, &last),
                Some(Ordering::Less | Ordering::Equal)
            )
        }) else {
            return Ok(Rewound::NothingDelivered);
        };
        let marker = rewind_marker_record(&stream, consumer);
        self.mark(&marker, &from, to).await?;
        self.q::<Value>(
            format!("XGROUP SETID {stream} {consumer}"),
            redis::cmd("XGROUP")
                .arg("SETID")
                .arg(&stream)
                .arg(consumer)
                .arg(just_before(&from)),
        )
        .await?;
        // Records written while it moved count as older than the rewind too.
        self.mark(&marker, &from, to).await?;
        let again = self
            .group(&stream, consumer)
            .await?
            .get("lag")
            .and_then(|l| l.parse().ok());
        Ok(Rewound::Moved { from, again })
    }
}

impl RedisAdmin {
    /// `XINFO GROUPS` of `stream`: the fields of group `name`.
    async fn group(
        &self,
        stream: &str,
        name: &str,
    ) -> Result<std::collections::BTreeMap<String, String>, Error> {
        let mut con = self.connection();
        let groups: Value = match redis::cmd("XINFO")
            .arg("GROUPS")
            .arg(stream)
            .query_async(&mut con)
            .await
        {
            Ok(v) => v,
            // `ERR no such key`
            Err(e) if e.to_string().contains("no such key") => {
                return Err(Error::NotFound {
                    what: format!("stream {stream}"),
                });
            }
            Err(e) => return Err(Error::broker(format!("XINFO GROUPS {stream}"), e)),
        };
        let all = match &groups {
            Value::Array(a) => a.iter().map(flat_map).collect(),
            _ => Vec::new(),
        };
        all.into_iter()
            .find(|g| g.get("name").map(String::as_str) == Some(name))
            .ok_or_else(|| Error::NotFound {
                what: format!("consumer group {name} on stream {stream}"),
            })
    }

    async fn mark(&self, key: &str, from: &str, to: Point) -> Result<u64, Error> {
        let mut con = self.connection();
        redis::Script::new(MARK_SCRIPT)
            .key(key)
            .arg(from)
            .arg(to.to_string())
            .invoke_async(&mut con)
            .await
            .map_err(|e| Error::broker(format!("rewind marker {key}"), e))
    }
}

/// The entry id just below `id` (`<ms>-<n>`), so that `>` reads `id` next.
fn just_before(id: &str) -> String {
    let (ms, n) = id.split_once('-').unwrap_or((id, "0"));
    let (ms, n): (u64, u64) = (ms.parse().unwrap_or(0), n.parse().unwrap_or(0));
    match (ms, n) {
        (_, n) if n > 0 => format!("{ms}-{}", n - 1),
        (0, _) => "0-0".to_string(),
        (ms, _) => format!("{}-{}", ms - 1, u64::MAX),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn just_before_an_id_is_the_greatest_id_below_it() {
        assert_eq!(just_before("1732590000000-3"), "1732590000000-2");
        assert_eq!(
            just_before("1732590000000-0"),
            "1732589999999-18446744073709551615"
        );
        assert_eq!(just_before("0-0"), "0-0");
        assert_eq!(just_before("0-1"), "0-0");
    }
}
