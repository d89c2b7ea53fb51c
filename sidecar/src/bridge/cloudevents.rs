//! Names and headers from `docs/messaging.md`: CloudEvents 1.0 binary mode, dead-letter headers,
//! the processed-event KV key, and what a consumed message's headers make of it ([`envelope`]).

use weir_broker::transport::{Headers, header};

pub const CE_SPECVERSION: &str = "ce-specversion";
pub use weir_broker::transport::CE_ID;
pub const CE_SOURCE: &str = "ce-source";
pub const CE_TYPE: &str = "ce-type";
pub const CE_TIME: &str = "ce-time";
pub const TRACEPARENT: &str = "traceparent";
pub const CONTENT_TYPE: &str = "content-type";
/// The CloudEvents partitioning extension: events of one key stay in order (Kafka's record key).
pub use weir_broker::kafka::transport::CE_PARTITIONKEY;
pub use weir_broker::nats::transport::NATS_MSG_ID;
/// Alternative to `ce-partitionkey` on a publish request.
pub const WEIR_PARTITION_KEY: &str = "weir-partition-key";
/// Alternative to `ce-id` on a publish request.
pub const IDEMPOTENCY_KEY: &str = "idempotency-key";

// The dead-letter headers, named once for the sidecar that writes them and `weir dlq` that
// reads them.
pub use weir_broker::queue::dead_letter_headers::{
    CONSUMER as WEIR_CONSUMER, DEAD_LETTERED_AT as WEIR_DEAD_LETTERED_AT,
    DELIVERY_COUNT as WEIR_DELIVERY_COUNT, LAST_ERROR as WEIR_LAST_ERROR,
    ORIGINAL_SEQ as WEIR_ORIGINAL_SEQ, ORIGINAL_SUBJECT as WEIR_ORIGINAL_SUBJECT,
    REASON as WEIR_REASON,
};

/// `Weir-Reason` values.
pub const REASON_MAX_DELIVERIES: &str = "max-deliveries";
pub const REASON_REJECTED: &str = "rejected";
pub const REASON_SCHEMA: &str = "schema";
/// Larger than the consuming app's `inbound.maxBodyBytes`: it would refuse it over HTTP anyway.
pub const REASON_TOO_LARGE: &str = "too-large";
/// `ce-specversion` other than 1.0.
pub const REASON_UNSUPPORTED_SPECVERSION: &str = "unsupported-specversion";
/// `ce-specversion: 1.0` without a usable `ce-id`, `ce-source` or `ce-type`.
pub const REASON_INVALID_CLOUDEVENT: &str = "invalid-cloudevent";

/// The only CloudEvents version the bridge writes and delivers.
pub const SPECVERSION: &str = "1.0";

/// Longest event id accepted.
pub const MAX_EVENT_ID_LEN: usize = 256;

/// `weir://<ns>/<publishing ms>`.
pub fn source(namespace: &str, service: &str) -> String {
    format!("weir://{namespace}/{service}")
}

/// The `ce-source` given to a plain message (one without a CloudEvents envelope) consumed from
/// `queue`: its producer is unknown, so the source names the queue it was read from. A
/// Microservice's name is a DNS label, so this never equals a publisher's `weir://<ns>/<ms>`.
pub fn queue_source(namespace: &str, queue: &str) -> String {
    format!("weir://{namespace}/queues/{queue}")
}

/// The event id of a plain message: the queue's stream name and the broker's own identity of
/// the message (`Inbound::identity`), so it is the same at every redelivery
/// and differs between any two messages of the queue.
pub fn plain_event_id(stream: &str, identity: &str) -> String {
    format!("{stream}:{identity}")
}

/// What a consumed message's headers make of it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Envelope {
    /// A CloudEvents 1.0 event in binary mode, with its own id.
    CloudEvent { id: String },
    /// No `ce-specversion`: written by a producer that does not speak CloudEvents (a legacy
    /// service, a broker UI, a script). Its other `ce-*` headers, if any, are not trusted.
    Plain,
}

/// Why a message that says it is a CloudEvent (it has `ce-specversion`) cannot be delivered as
/// one. Each is dead-lettered with [`EnvelopeError::reason`], never guessed at: the bridge
/// cannot tell what a wrong envelope's producer meant.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum EnvelopeError {
    /// A version other than 1.0 (made header-safe). 0.3's `datacontentencoding: base64` means a
    /// body the app would misread if passed on as 1.0, so nothing is converted.
    UnsupportedSpecversion(String),
    /// A required attribute (`ce-id`, `ce-source`, `ce-type`) absent or empty.
    Missing(&'static str),
    /// A `ce-id` that cannot travel as a header value and a processed-event key: not 1 to
    /// [`MAX_EVENT_ID_LEN`] visible ASCII characters, the rule publishing applies too.
    InvalidId,
}

impl EnvelopeError {
    /// The dead letter's `Weir-Reason`.
    pub fn reason(&self) -> &'static str {
        match self {
            EnvelopeError::UnsupportedSpecversion(_) => REASON_UNSUPPORTED_SPECVERSION,
            EnvelopeError::Missing(_) | EnvelopeError::InvalidId => REASON_INVALID_CLOUDEVENT,
        }
    }
}

impl std::fmt::Display for EnvelopeError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            EnvelopeError::UnsupportedSpecversion(v) => write!(
                f,
                "ce-specversion {v:?} is not supported (only CloudEvents {SPECVERSION})"
            ),
            EnvelopeError::Missing(name) => {
                write!(
                    f,
                    "{name} is missing (required by CloudEvents {SPECVERSION})"
                )
            }
            EnvelopeError::InvalidId => write!(
                f,
                "{CE_ID} is not 1 to {MAX_EVENT_ID_LEN} visible ASCII characters"
            ),
        }
    }
}

impl std::error::Error for EnvelopeError {}

/// Reads the CloudEvents binary-mode envelope of a consumed message. A message is a CloudEvent
/// when it has `ce-specversion` (as the CloudEvents SDKs tell binary mode); it must then be a
/// valid 1.0 one. Without it the message is [`Envelope::Plain`].
pub fn envelope(h: &Headers) -> Result<Envelope, EnvelopeError> {
    let Some(version) = header(h, CE_SPECVERSION) else {
        return Ok(Envelope::Plain);
    };
    if version.trim() != SPECVERSION {
        return Err(EnvelopeError::UnsupportedSpecversion(header_safe(
            version, 64,
        )));
    }
    let present = |name: &'static str| {
        header(h, name)
            .filter(|v| !v.trim().is_empty())
            .ok_or(EnvelopeError::Missing(name))
    };
    let id = present(CE_ID)?;
    present(CE_SOURCE)?;
    present(CE_TYPE)?;
    if !valid_event_id(id) {
        return Err(EnvelopeError::InvalidId);
    }
    Ok(Envelope::CloudEvent { id: id.to_string() })
}

/// RFC 3339 time with millisecond precision, UTC.
pub fn now_rfc3339() -> String {
    chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Millis, true)
}

/// An event id must be usable as a header value: 1 to 256 visible ASCII characters.
pub fn valid_event_id(id: &str) -> bool {
    !id.is_empty() && id.len() <= MAX_EVENT_ID_LEN && id.bytes().all(|b| b.is_ascii_graphic())
}

pub use weir_broker::queue::{processed_bucket, processed_key};

/// A header value safe for NATS and HTTP: printable ASCII, at most `max` bytes.
pub fn header_safe(s: &str, max: usize) -> String {
    let mut out: String = s
        .chars()
        .map(|c| {
            if c.is_ascii_graphic() || c == ' ' {
                c
            } else {
                ' '
            }
        })
        .collect();
    if out.len() > max {
        out.truncate(max);
    }
    out.trim().to_string()
}

#[cfg(test)]
mod tests {
    use super::*;
    use weir_broker::transport::set_header;

    #[test]
    fn names_follow_the_doc() {
        assert_eq!(
            processed_bucket("weir_shop_orders"),
            "weir_processed_shop_orders"
        );
        let k = processed_key("billing", "abc");
        assert_eq!(
            k,
            "billing.ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
        assert!(valid_event_id("order-1"));
        assert!(!valid_event_id("a b"));
        assert!(!valid_event_id(""));
        assert_eq!(header_safe("HTTP 500: boom\r\nx", 100), "HTTP 500: boom  x");
        assert_eq!(source("shop", "orders"), "weir://shop/orders");
        assert!(now_rfc3339().ends_with('Z'));
        assert_eq!(queue_source("shop", "orders"), "weir://shop/queues/orders");
        assert_eq!(
            plain_event_id("weir_shop_orders", "1732590000000-0"),
            "weir_shop_orders:1732590000000-0"
        );
    }

    fn h(pairs: &[(&str, &str)]) -> Headers {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn envelopes() {
        let full = [
            ("ce-specversion", "1.0"),
            ("ce-id", "e-1"),
            ("ce-source", "weir://shop/orders"),
            ("ce-type", "order.created"),
        ];
        assert_eq!(
            envelope(&h(&full)),
            Ok(Envelope::CloudEvent { id: "e-1".into() })
        );
        // Names in any case, as brokers and HTTP keep them.
        let upper: Vec<_> = full
            .iter()
            .map(|(k, v)| (k.to_ascii_uppercase(), v.to_string()))
            .collect();
        assert!(matches!(envelope(&upper), Ok(Envelope::CloudEvent { .. })));
        // No ce-specversion: plain, whatever else is there.
        assert_eq!(envelope(&h(&[])), Ok(Envelope::Plain));
        assert_eq!(envelope(&h(&[("ce-id", "x")])), Ok(Envelope::Plain));
        let with = |k: &str, v: &str| {
            let mut x = h(&full);
            set_header(&mut x, k, v);
            envelope(&x)
        };
        let e = with("ce-specversion", "0.3").unwrap_err();
        assert_eq!(e.reason(), "unsupported-specversion");
        assert!(e.to_string().contains("\"0.3\""), "{e}");
        assert_eq!(
            with("ce-source", " ").unwrap_err(),
            EnvelopeError::Missing("ce-source")
        );
        assert_eq!(with("ce-id", "a b").unwrap_err(), EnvelopeError::InvalidId);
        assert_eq!(
            with("ce-id", "a b").unwrap_err().reason(),
            "invalid-cloudevent"
        );
        let mut no_type = h(&full);
        no_type.retain(|(k, _)| k != "ce-type");
        assert_eq!(
            envelope(&no_type).unwrap_err(),
            EnvelopeError::Missing("ce-type")
        );
    }
}
