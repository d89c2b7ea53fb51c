//! Refuses requests the proxy cannot forward faithfully, before they reach any upstream. Each
//! refusal closes the connection after the answer: the request's body is left unread (or its
//! framing is not understood), so nothing after it on the connection can be trusted as the next
//! request.
//!
//! - `Content-Length` together with `Transfer-Encoding`, or conflicting `Content-Length` values
//!   (request-smuggling vectors): 400 `bad-request`.
//! - `CONNECT`: 405 `method-not-allowed`. The proxy forwards requests; it does not open tunnels,
//!   and a `CONNECT` passed on as a plain request makes hyper treat a 2xx as the start of a
//!   tunnel, so the client would get an empty answer.
//! - A `Transfer-Encoding` other than `chunked` alone (`gzip, chunked`): 501
//!   `unsupported-transfer-coding`. The proxy decodes only `chunked`; passing the rest on would
//!   hand the upstream a body still in a coding it was never told about (RFC 9112 §6.1).
//! - An HTTP/1.1 request without `Host`, any request with more than one `Host`, or a `Host`
//!   that is not `host[:port]`: 400 `bad-host` (RFC 9112 §3.2). Two `Host` headers are read
//!   differently by different servers: which one the app routes on would be the attacker's pick.

use super::{BoxFuture, always_ready};
use crate::body::{Reason, Req, Resp, reject_closing};
use http::header::{ALLOW, CONTENT_LENGTH, HOST, TRANSFER_ENCODING};
use http::{HeaderMap, HeaderValue, Method, Version};
use prometheus_client::metrics::counter::Counter;
use std::convert::Infallible;
use std::sync::Arc;
use tower::{Layer, Service};

/// The reasons this layer answers with, in the order of [`GuardLayer::new`]'s counters.
pub const REASONS: [Reason; 4] = [
    Reason::BadRequest,
    Reason::BadHost,
    Reason::MethodNotAllowed,
    Reason::UnsupportedTransferCoding,
];

/// Methods named in the `Allow` header of a 405 (every method the proxy forwards).
const ALLOWED: &str = "GET, HEAD, POST, PUT, DELETE, PATCH, OPTIONS, TRACE";

#[derive(Clone, Debug)]
pub struct GuardLayer {
    listener: Arc<str>,
    /// Indexed like [`REASONS`].
    refused: Arc<[Counter; 4]>,
}

impl GuardLayer {
    /// `listener` names the listener in log lines; `counter` gives the rejection counter of a
    /// reason.
    pub fn new(listener: &str, counter: impl Fn(Reason) -> Counter) -> Self {
        GuardLayer {
            listener: listener.into(),
            refused: Arc::new(REASONS.map(counter)),
        }
    }
}

impl<S> Layer<S> for GuardLayer {
    type Service = Guard<S>;
    fn layer(&self, inner: S) -> Guard<S> {
        Guard {
            inner,
            cfg: self.clone(),
        }
    }
}

#[derive(Clone, Debug)]
pub struct Guard<S> {
    inner: S,
    cfg: GuardLayer,
}

/// Why a request is refused, if it is: the reason answered and a description for the log.
pub fn check(
    method: &Method,
    version: Version,
    headers: &HeaderMap,
) -> Option<(Reason, &'static str)> {
    if headers.contains_key(CONTENT_LENGTH) && headers.contains_key(TRANSFER_ENCODING) {
        return Some((Reason::BadRequest, "content-length with transfer-encoding"));
    }
    let mut lengths = headers.get_all(CONTENT_LENGTH).iter();
    if let (Some(a), Some(b)) = (lengths.next(), lengths.next())
        && a != b
    {
        return Some((Reason::BadRequest, "conflicting content-length values"));
    }
    if method == Method::CONNECT {
        return Some((Reason::MethodNotAllowed, "CONNECT is not forwarded"));
    }
    if headers.contains_key(TRANSFER_ENCODING) && !chunked_only(headers) {
        return Some((
            Reason::UnsupportedTransferCoding,
            "transfer coding other than chunked",
        ));
    }
    let mut hosts = headers.get_all(HOST).iter();
    match (hosts.next(), hosts.next()) {
        (None, _) if version == Version::HTTP_11 => {
            return Some((Reason::BadHost, "HTTP/1.1 request without Host"));
        }
        (Some(_), Some(_)) => return Some((Reason::BadHost, "more than one Host")),
        (Some(h), None) if !valid_host(h) => return Some((Reason::BadHost, "invalid Host")),
        _ => {}
    }
    None
}

/// `Transfer-Encoding` lists exactly one coding, `chunked` (any case, over any number of lines).
fn chunked_only(headers: &HeaderMap) -> bool {
    let mut codings = headers
        .get_all(TRANSFER_ENCODING)
        .iter()
        .flat_map(|v| v.as_bytes().split(|&b| b == b','))
        .map(<[u8]>::trim_ascii)
        .filter(|c| !c.is_empty());
    matches!(
        (codings.next(), codings.next()),
        (Some(c), None) if c.eq_ignore_ascii_case(b"chunked")
    )
}

/// `uri-host [ ":" port ]` (RFC 9110 §7.2), or empty (a target without an authority).
fn valid_host(v: &HeaderValue) -> bool {
    let Ok(s) = v.to_str() else { return false };
    if s.is_empty() {
        return true;
    }
    if s.contains('@') {
        return false; // userinfo belongs to a URI, never to Host
    }
    let Ok(a) = s.parse::<http::uri::Authority>() else {
        return false;
    };
    // The parser leaves the port unchecked: `port = *DIGIT`.
    match s.strip_prefix(a.host()).map(|rest| rest.strip_prefix(':')) {
        Some(None) => s == a.host(),
        Some(Some(port)) => port.bytes().all(|b| b.is_ascii_digit()),
        None => false,
    }
}

impl<S> Service<Req> for Guard<S>
where
    S: Service<Req, Response = Resp, Error = Infallible>,
    S::Future: Send + 'static,
{
    type Response = Resp;
    type Error = Infallible;
    type Future = BoxFuture;
    always_ready!();

    fn call(&mut self, req: Req) -> BoxFuture {
        let Some((reason, why)) = check(req.method(), req.version(), req.headers()) else {
            return Box::pin(self.inner.call(req));
        };
        tracing::warn!(
            listener = &*self.cfg.listener,
            reason = why,
            method = %req.method(),
            path = req.uri().path(),
            "refused request"
        );
        if let Some(i) = REASONS.iter().position(|r| *r == reason) {
            self.cfg.refused[i].inc();
        }
        let mut resp = reject_closing(reason);
        if reason == Reason::MethodNotAllowed {
            resp.headers_mut()
                .insert(ALLOW, HeaderValue::from_static(ALLOWED));
        }
        Box::pin(std::future::ready(Ok(resp)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::layers::testing::*;
    use http::Request;
    use std::time::Duration;
    use tower::ServiceExt;

    fn layer() -> GuardLayer {
        GuardLayer::new("inbound", |_| Counter::default())
    }

    fn headers(pairs: &[(&str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (n, v) in pairs {
            h.append(
                http::HeaderName::from_bytes(n.as_bytes()).unwrap(),
                HeaderValue::from_str(v).unwrap(),
            );
        }
        h
    }

    #[tokio::test]
    async fn content_length_with_transfer_encoding_is_400_and_closes() {
        let svc = layer().layer(slow(Duration::ZERO));
        let req = Request::post("/")
            .header("host", "x")
            .header("content-length", "5")
            .header("transfer-encoding", "chunked")
            .body(crate::body::empty())
            .unwrap();
        let resp = svc.clone().oneshot(req).await.unwrap();
        assert_eq!(resp.status(), 400);
        assert_eq!(resp.headers()["connection"], "close");
        assert_eq!(resp.headers()["x-weir-reason"], "bad-request");
        let req = Request::post("/")
            .header("host", "x")
            .header("content-length", "5")
            .body(crate::body::full("hello"))
            .unwrap();
        assert_eq!(svc.oneshot(req).await.unwrap().status(), 200);
    }

    #[test]
    fn conflicting_lengths_are_refused() {
        let mut h = headers(&[("host", "x"), ("content-length", "5")]);
        assert_eq!(check(&Method::POST, Version::HTTP_11, &h), None);
        h.append(CONTENT_LENGTH, HeaderValue::from_static("6"));
        assert_eq!(
            check(&Method::POST, Version::HTTP_11, &h).map(|r| r.0),
            Some(Reason::BadRequest)
        );
    }

    #[test]
    fn host_is_required_once_and_well_formed() {
        let refused =
            |v: Version, h: &[(&str, &str)]| check(&Method::GET, v, &headers(h)).map(|r| r.0);
        assert_eq!(refused(Version::HTTP_11, &[]), Some(Reason::BadHost));
        assert_eq!(
            refused(Version::HTTP_10, &[]),
            None,
            "HTTP/1.0 needs no Host"
        );
        assert_eq!(
            refused(Version::HTTP_10, &[("host", "a"), ("host", "b")]),
            Some(Reason::BadHost)
        );
        assert_eq!(
            refused(Version::HTTP_11, &[("host", "a"), ("host", "a")]),
            Some(Reason::BadHost),
            "even the same value twice"
        );
        for ok in [
            "x",
            "users.shop.svc:8080",
            "127.0.0.1:15001",
            "[::1]:80",
            "",
        ] {
            assert_eq!(refused(Version::HTTP_11, &[("host", ok)]), None, "{ok:?}");
        }
        for bad in ["a b", "user@host", "a/b", "host:port"] {
            assert_eq!(
                refused(Version::HTTP_11, &[("host", bad)]),
                Some(Reason::BadHost),
                "{bad:?}"
            );
        }
    }

    #[test]
    fn only_chunked_alone_is_an_accepted_transfer_coding() {
        let coding = |v: &[&str]| {
            let mut h = headers(&[("host", "x")]);
            for x in v {
                h.append(TRANSFER_ENCODING, HeaderValue::from_str(x).unwrap());
            }
            check(&Method::POST, Version::HTTP_11, &h).map(|r| r.0)
        };
        assert_eq!(coding(&["chunked"]), None);
        assert_eq!(coding(&["Chunked "]), None);
        for bad in [
            &["gzip, chunked"][..],
            &["gzip", "chunked"],
            &["chunked, chunked"],
            &["identity"],
            &["chunked;x=1"],
        ] {
            assert_eq!(
                coding(bad),
                Some(Reason::UnsupportedTransferCoding),
                "{bad:?}"
            );
        }
    }

    #[tokio::test]
    async fn connect_is_405_with_allow() {
        let counted = Counter::default();
        let c2 = counted.clone();
        let svc = GuardLayer::new("users", move |r| {
            if r == Reason::MethodNotAllowed {
                c2.clone()
            } else {
                Counter::default()
            }
        })
        .layer(slow(Duration::ZERO));
        let req = Request::connect("users:443")
            .header("host", "users:443")
            .body(crate::body::empty())
            .unwrap();
        let resp = svc.oneshot(req).await.unwrap();
        assert_eq!(resp.status(), 405);
        assert_eq!(resp.headers()["x-weir-reason"], "method-not-allowed");
        assert!(
            !resp.headers()["allow"]
                .to_str()
                .unwrap()
                .contains("CONNECT")
        );
        assert_eq!(counted.get(), 1);
    }
}
