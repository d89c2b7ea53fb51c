//! The checks the fuzz targets run (`sidecar/fuzz`), also replayed over the committed seed
//! corpus by `tests/fuzz_corpus.rs` so they run under plain `cargo test`.

use crate::trace::{format_traceparent, parse_traceparent};
use weir_crds::proxy::ProxyConfig;

/// Config parsing never panics; an accepted config survives a serialize/parse round trip and
/// builds into service stacks.
pub fn check_config(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    match ProxyConfig::from_json(text) {
        Ok(cfg) => {
            let again = serde_json::to_string(&cfg).expect("an accepted config serializes");
            let back = ProxyConfig::from_json(&again).expect("a serialized config parses again");
            assert_eq!(back, cfg, "round trip");
        }
        Err(e) => assert!(!e.field.is_empty(), "errors name a field"),
    }
}

/// `traceparent` parsing never panics; what it accepts formats back to the same ids.
pub fn check_traceparent(data: &[u8]) {
    if let Some(p) = parse_traceparent(data) {
        assert_ne!(p.trace_id, [0; 16]);
        assert_ne!(p.span_id, [0; 8]);
        assert_ne!(p.version, 0xff);
        let out = format_traceparent(&p.trace_id, &p.span_id, p.flags);
        let again = parse_traceparent(&out).expect("formatted traceparent parses");
        assert_eq!(
            (again.trace_id, again.span_id, again.flags),
            (p.trace_id, p.span_id, p.flags)
        );
        if p.version == 0 {
            assert_eq!(&out[..], data, "version 00 is canonical");
        }
    }
}
