//! Names and headers from `docs/messaging.md`: CloudEvents 1.0 binary mode, dead-letter headers,
//! the processed-event KV key.

use sha2::{Digest, Sha256};

pub const CE_SPECVERSION: &str = "ce-specversion";
pub const CE_ID: &str = "ce-id";
pub const CE_SOURCE: &str = "ce-source";
pub const CE_TYPE: &str = "ce-type";
pub const CE_TIME: &str = "ce-time";
pub const TRACEPARENT: &str = "traceparent";
pub const CONTENT_TYPE: &str = "content-type";
pub const NATS_MSG_ID: &str = "Nats-Msg-Id";
/// Alternative to `ce-id` on a publish request.
pub const IDEMPOTENCY_KEY: &str = "idempotency-key";

pub const WEIR_ORIGINAL_SUBJECT: &str = "Weir-Original-Subject";
pub const WEIR_ORIGINAL_SEQ: &str = "Weir-Original-Seq";
pub const WEIR_CONSUMER: &str = "Weir-Consumer";
pub const WEIR_DELIVERY_COUNT: &str = "Weir-Delivery-Count";
pub const WEIR_REASON: &str = "Weir-Reason";
pub const WEIR_LAST_ERROR: &str = "Weir-Last-Error";
pub const WEIR_DEAD_LETTERED_AT: &str = "Weir-Dead-Lettered-At";

/// `Weir-Reason` values.
pub const REASON_MAX_DELIVERIES: &str = "max-deliveries";
pub const REASON_REJECTED: &str = "rejected";
pub const REASON_SCHEMA: &str = "schema";
/// Larger than the consuming app's `inbound.maxBodyBytes`: it would refuse it over HTTP anyway.
pub const REASON_TOO_LARGE: &str = "too-large";

/// Longest event id accepted.
pub const MAX_EVENT_ID_LEN: usize = 256;

/// `weir://<ns>/<publishing ms>`.
pub fn source(namespace: &str, service: &str) -> String {
    format!("weir://{namespace}/{service}")
}

/// RFC 3339 time with millisecond precision, UTC.
pub fn now_rfc3339() -> String {
    chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Millis, true)
}

/// An event id must be usable as a header value: 1 to 256 visible ASCII characters.
pub fn valid_event_id(id: &str) -> bool {
    !id.is_empty() && id.len() <= MAX_EVENT_ID_LEN && id.bytes().all(|b| b.is_ascii_graphic())
}

/// The processed-event KV key: `<consumer>.<sha256(event id) hex>`.
pub fn processed_key(consumer: &str, event_id: &str) -> String {
    format!(
        "{consumer}.{}",
        hex::encode(Sha256::digest(event_id.as_bytes()))
    )
}

/// The processed-event bucket of a queue's stream: `weir_<ns>_<q>` → `weir_processed_<ns>_<q>`.
pub fn processed_bucket(stream: &str) -> String {
    match stream.strip_prefix("weir_") {
        Some(rest) => format!("weir_processed_{rest}"),
        None => format!("weir_processed_{stream}"),
    }
}

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
    }
}
