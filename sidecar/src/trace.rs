//! W3C Trace Context (`traceparent` / `tracestate`): parsing, formatting and id generation.

use http::{HeaderMap, HeaderName, HeaderValue};
use std::cell::Cell;

pub const TRACEPARENT: HeaderName = HeaderName::from_static("traceparent");
pub const TRACESTATE: HeaderName = HeaderName::from_static("tracestate");

/// A parsed, valid `traceparent` header.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TraceParent {
    pub version: u8,
    pub trace_id: [u8; 16],
    pub span_id: [u8; 8],
    pub flags: u8,
}

impl TraceParent {
    pub fn sampled(&self) -> bool {
        self.flags & 1 == 1
    }
}

fn hex_val(c: u8) -> Option<u8> {
    match c {
        b'0'..=b'9' => Some(c - b'0'),
        b'a'..=b'f' => Some(c - b'a' + 10),
        _ => None, // the spec allows lowercase only
    }
}

fn parse_hex<const N: usize>(s: &[u8]) -> Option<[u8; N]> {
    if s.len() != N * 2 {
        return None;
    }
    let mut out = [0u8; N];
    for (i, pair) in s.chunks_exact(2).enumerate() {
        out[i] = hex_val(pair[0])? << 4 | hex_val(pair[1])?;
    }
    Some(out)
}

/// Parses a `traceparent` value per W3C Trace Context level 1: `version-traceid-spanid-flags`.
/// Returns `None` for anything invalid (then a new trace is started).
pub fn parse_traceparent(s: &[u8]) -> Option<TraceParent> {
    if s.len() < 55 {
        return None;
    }
    let version = parse_hex::<1>(&s[0..2])?[0];
    if version == 0xff {
        return None;
    }
    if version == 0 && s.len() != 55 {
        return None;
    }
    // Future versions may append fields after a '-'.
    if s.len() > 55 && s[55] != b'-' {
        return None;
    }
    if s[2] != b'-' || s[35] != b'-' || s[52] != b'-' {
        return None;
    }
    let trace_id = parse_hex::<16>(&s[3..35])?;
    let span_id = parse_hex::<8>(&s[36..52])?;
    let flags = parse_hex::<1>(&s[53..55])?[0];
    if trace_id == [0; 16] || span_id == [0; 8] {
        return None;
    }
    Some(TraceParent {
        version,
        trace_id,
        span_id,
        flags,
    })
}

const HEX: &[u8; 16] = b"0123456789abcdef";

pub fn write_hex(bytes: &[u8], out: &mut [u8]) {
    for (i, b) in bytes.iter().enumerate() {
        out[2 * i] = HEX[(b >> 4) as usize];
        out[2 * i + 1] = HEX[(b & 0xf) as usize];
    }
}

/// Formats a version-00 `traceparent`.
pub fn format_traceparent(trace_id: &[u8; 16], span_id: &[u8; 8], flags: u8) -> [u8; 55] {
    let mut out = [b'-'; 55];
    out[0] = b'0';
    out[1] = b'0';
    write_hex(trace_id, &mut out[3..35]);
    write_hex(span_id, &mut out[36..52]);
    write_hex(&[flags], &mut out[53..55]);
    out
}

thread_local! {
    static RNG: Cell<u64> = Cell::new(seed());
}

fn seed() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    // RandomState is keyed from the OS's randomness once per thread.
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u64(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos() as u64),
    );
    h.finish() | 1
}

/// A fast, non-cryptographic random number (xorshift64*), per thread.
pub fn random_u64() -> u64 {
    RNG.with(|c| {
        let mut x = c.get();
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        c.set(x);
        x.wrapping_mul(0x2545_F491_4F6C_DD1D)
    })
}

/// Uniform in [0, 1).
pub fn random_f64() -> f64 {
    (random_u64() >> 11) as f64 * (1.0 / (1u64 << 53) as f64)
}

pub fn new_span_id() -> [u8; 8] {
    loop {
        let v = random_u64();
        if v != 0 {
            return v.to_be_bytes();
        }
    }
}

pub fn new_trace_id() -> [u8; 16] {
    let mut out = [0u8; 16];
    out[..8].copy_from_slice(&new_span_id());
    out[8..].copy_from_slice(&random_u64().to_be_bytes());
    out
}

/// The trace context of one request as it passes the proxy: the proxy's own span is `span_id`,
/// a child of `parent_span_id` (the caller's span) when the trace was continued.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TraceContext {
    pub trace_id: [u8; 16],
    pub span_id: [u8; 8],
    pub parent_span_id: Option<[u8; 8]>,
    pub sampled: bool,
}

impl TraceContext {
    /// Continues the caller's trace when its `traceparent` is valid (keeping its sampling
    /// decision), otherwise starts a new trace sampled with probability `sampling_ratio`. More
    /// than one `traceparent` counts as invalid: which one is the caller's cannot be told, and
    /// continuing either would let a client graft its request onto a trace of its choosing (the
    /// W3C Trace Context test suite expects a new trace id here).
    pub fn from_headers(headers: &HeaderMap, sampling_ratio: f64) -> (Self, bool) {
        let mut all = headers.get_all(TRACEPARENT).iter();
        let parent = match (all.next(), all.next()) {
            (Some(v), None) => parse_traceparent(v.as_bytes()),
            _ => None,
        };
        match parent {
            Some(p) => (
                TraceContext {
                    trace_id: p.trace_id,
                    span_id: new_span_id(),
                    parent_span_id: Some(p.span_id),
                    sampled: p.sampled(),
                },
                true,
            ),
            None => (
                TraceContext {
                    trace_id: new_trace_id(),
                    span_id: new_span_id(),
                    parent_span_id: None,
                    sampled: sampling_ratio > 0.0 && random_f64() < sampling_ratio,
                },
                false,
            ),
        }
    }

    /// The `traceparent` passed on: the proxy's span is the parent of the next hop.
    pub fn traceparent(&self) -> HeaderValue {
        let bytes = format_traceparent(&self.trace_id, &self.span_id, u8::from(self.sampled));
        HeaderValue::from_bytes(&bytes).expect("hex and dashes are valid header bytes")
    }

    pub fn trace_id_hex(&self) -> [u8; 32] {
        let mut out = [0u8; 32];
        write_hex(&self.trace_id, &mut out);
        out
    }
}

/// Sets the outgoing trace headers on a request; drops `tracestate` when the trace was not
/// continued (W3C: a `tracestate` without a valid `traceparent` is discarded).
pub fn propagate(headers: &mut HeaderMap, ctx: &TraceContext, continued: bool) {
    headers.insert(TRACEPARENT, ctx.traceparent());
    if !continued {
        headers.remove(TRACESTATE);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const VALID: &str = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";

    #[test]
    fn parses_the_spec_example() {
        let p = parse_traceparent(VALID.as_bytes()).unwrap();
        assert_eq!(p.trace_id[0], 0x4b);
        assert_eq!(p.span_id[7], 0xb7);
        assert!(p.sampled());
        let back = format_traceparent(&p.trace_id, &p.span_id, p.flags);
        assert_eq!(&back[..], VALID.as_bytes());
    }

    #[test]
    fn rejects_invalid_values() {
        for bad in [
            "",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7",
            "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",
            "00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01",
            "ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-extra",
            "00_4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "0g-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e473x-00f067aa0ba902b7-01",
        ] {
            assert_eq!(parse_traceparent(bad.as_bytes()), None, "{bad:?}");
        }
    }

    #[test]
    fn future_versions_may_append_fields() {
        let v = "01-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-whatever";
        assert!(parse_traceparent(v.as_bytes()).is_some());
        let v = "01-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01x";
        assert!(parse_traceparent(v.as_bytes()).is_none());
    }

    #[test]
    fn continues_a_valid_trace_with_a_new_child_span() {
        let mut h = HeaderMap::new();
        h.insert(TRACEPARENT, HeaderValue::from_static(VALID));
        let (ctx, continued) = TraceContext::from_headers(&h, 0.0);
        assert!(continued);
        assert!(ctx.sampled, "the caller's sampled flag is kept");
        assert_eq!(&ctx.trace_id_hex(), b"4bf92f3577b34da6a3ce929d0e0e4736");
        assert_eq!(
            ctx.parent_span_id,
            Some([0x00, 0xf0, 0x67, 0xaa, 0x0b, 0xa9, 0x02, 0xb7])
        );
        assert_ne!(ctx.span_id, ctx.parent_span_id.unwrap());
        let out = ctx.traceparent();
        let p = parse_traceparent(out.as_bytes()).unwrap();
        assert_eq!(p.trace_id, ctx.trace_id);
        assert_eq!(p.span_id, ctx.span_id);
    }

    #[test]
    fn starts_a_trace_when_absent_or_invalid_and_samples_by_ratio() {
        let mut h = HeaderMap::new();
        h.insert(TRACEPARENT, HeaderValue::from_static("garbage"));
        h.insert(TRACESTATE, HeaderValue::from_static("a=b"));
        let (ctx, continued) = TraceContext::from_headers(&h, 1.0);
        assert!(!continued);
        assert!(ctx.sampled);
        assert_eq!(ctx.parent_span_id, None);
        propagate(&mut h, &ctx, continued);
        assert!(h.get(TRACESTATE).is_none());
        let (ctx, _) = TraceContext::from_headers(&HeaderMap::new(), 0.0);
        assert!(!ctx.sampled);
        let n = (0..10_000)
            .filter(|_| {
                TraceContext::from_headers(&HeaderMap::new(), 0.25)
                    .0
                    .sampled
            })
            .count();
        assert!(
            (2000..3000).contains(&n),
            "sampled {n} of 10000 at ratio 0.25"
        );
    }

    #[test]
    fn two_traceparents_start_a_new_trace() {
        let mut h = HeaderMap::new();
        h.append(TRACEPARENT, HeaderValue::from_static(VALID));
        h.append(
            TRACEPARENT,
            HeaderValue::from_static("00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"),
        );
        h.insert(TRACESTATE, HeaderValue::from_static("a=b"));
        let (ctx, continued) = TraceContext::from_headers(&h, 0.0);
        assert!(!continued);
        assert_eq!(ctx.parent_span_id, None);
        assert!(!ctx.sampled, "a new trace, sampled by the ratio");
        propagate(&mut h, &ctx, continued);
        assert_eq!(h.get_all(TRACEPARENT).iter().count(), 1);
        assert!(h.get(TRACESTATE).is_none());
    }

    #[test]
    fn ids_are_distinct() {
        let a: std::collections::HashSet<_> = (0..1000).map(|_| new_trace_id()).collect();
        assert_eq!(a.len(), 1000);
    }
}
