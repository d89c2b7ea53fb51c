//! Rewind on Kafka ([`crate::rewind`]) is not built yet, and refused, saying so.
//!
//! What it needs, and why it is not a one-call reset: Kafka lets only a member of a live group
//! move the group's offsets (an offset commit from outside is refused while sidecars are
//! joined), so a rewind without restarting the sidecars has to reach them — a rewind marker the
//! consuming sidecars read and act on by seeking each partition to the offset of the time
//! (`offsets_for_times`), which also tells their dedup store that the redelivered events are
//! meant. Until then the command refuses rather than move an empty group only.

use super::admin::KafkaAdmin;
use crate::admin::Error;
use crate::rewind::{Point, Rewind, Rewound};

impl Rewind for KafkaAdmin {
    async fn rewind(
        &self,
        namespace: &str,
        queue: &str,
        consumer: &str,
        _to: Point,
    ) -> Result<Rewound, Error> {
        Err(Error::Unsupported {
            what: format!("rewinding consumer {consumer} of Queue {namespace}/{queue}"),
            why: "weir queue rewind is not built for Kafka yet (only a member of a live consumer \
                  group may move its offsets, so the consuming sidecars must do it); on NATS and \
                  Redis it works today"
                .into(),
        })
    }
}
