//! No rewind on RabbitMQ ([`crate::rewind`]): a consumer's quorum queue keeps no log (a message
//! leaves it once acknowledged), so there is nothing to deliver again. The refusal says so and
//! names the kinds that can.

use super::admin::RabbitAdmin;
use crate::admin::Error;
use crate::rewind::{Point, Rewind, Rewound};

impl Rewind for RabbitAdmin {
    async fn rewind(
        &self,
        namespace: &str,
        queue: &str,
        consumer: &str,
        _to: Point,
    ) -> Result<Rewound, Error> {
        Err(Error::Unsupported {
            what: format!("rewinding consumer {consumer} of Queue {namespace}/{queue}"),
            why: "RabbitMQ keeps no log of a queue (a message leaves the consumer's queue once \
                  acknowledged), so there is nothing to deliver again; replay from a point in \
                  time needs a Broker of kind nats or redis"
                .into(),
        })
    }
}
