//! gRPC in the proxy's own terms, for requests with `content-type: application/grpc*`.
//!
//! - **Deadline**: the caller's `grpc-timeout` tightens the request's [`Deadline`] (the policy's
//!   timeout still applies: the smaller wins), and the request is marked [`Grpc`] so the
//!   forwarding sends the time *remaining* as `grpc-timeout` to the next hop. A malformed
//!   `grpc-timeout` is refused with `INTERNAL`, as gRPC servers do.
//! - **Answers**: everything the proxy answers on its own (timeout, breaker open, bulkhead or
//!   queue full, rate limited, unreachable upstream, unauthenticated, …) is turned into a gRPC
//!   *Trailers-Only* response a gRPC client can read: HTTP 200, `content-type: application/grpc`,
//!   `grpc-status` (see [`code_for`]) and `grpc-message` naming the reason, with `x-weir-reason`
//!   kept. A 504 with a text body would reach a gRPC client as an `UNAVAILABLE` "bad HTTP
//!   status" with the reason lost.
//! - **Outcome**: [`status_in_headers`] and [`OnStatus`] read `grpc-status` where gRPC puts it
//!   (the headers of a Trailers-Only answer, else the trailers after the messages), so the
//!   breaker and the retries judge a call by its gRPC status, not by the HTTP status (200 for
//!   nearly every gRPC error).

use super::{BoxFuture, Deadline, always_ready};
use crate::body::{self, REASON_HEADER, Reason, Rejected, Req, Resp, rejection};
use http::header::CONTENT_TYPE;
use http::{HeaderMap, HeaderName, HeaderValue, Request, Response, StatusCode};
use std::convert::Infallible;
use std::time::Duration;
use tokio::time::Instant;
use tower::{Layer, Service};

pub const GRPC_STATUS: HeaderName = HeaderName::from_static("grpc-status");
pub const GRPC_MESSAGE: HeaderName = HeaderName::from_static("grpc-message");
pub const GRPC_TIMEOUT: HeaderName = HeaderName::from_static("grpc-timeout");

/// gRPC status codes (grpc/doc/statuscodes.md).
pub mod code {
    pub const OK: u16 = 0;
    pub const CANCELLED: u16 = 1;
    pub const UNKNOWN: u16 = 2;
    pub const DEADLINE_EXCEEDED: u16 = 4;
    pub const PERMISSION_DENIED: u16 = 7;
    pub const RESOURCE_EXHAUSTED: u16 = 8;
    pub const UNIMPLEMENTED: u16 = 12;
    pub const INTERNAL: u16 = 13;
    pub const UNAVAILABLE: u16 = 14;
    pub const UNAUTHENTICATED: u16 = 16;
}

/// Request extension: this is a gRPC call.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Grpc;

/// Whether the request is a gRPC call (`application/grpc`, `application/grpc+proto`, …).
pub fn is_grpc_request<B>(req: &Request<B>) -> bool {
    req.headers()
        .get(CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|ct| {
            ct.strip_prefix("application/grpc").is_some_and(|rest| {
                rest.is_empty() || rest.starts_with('+') || rest.starts_with(';')
            })
        })
}

pub fn is_marked<B>(req: &Request<B>) -> bool {
    req.extensions().get::<Grpc>().is_some()
}

/// The `grpc-status` of a header or trailer map, if present and a number.
pub fn status_of(h: &HeaderMap) -> Option<u16> {
    h.get(GRPC_STATUS)?.to_str().ok()?.trim().parse().ok()
}

/// The gRPC status of a response whose headers carry it (Trailers-Only: an error answered
/// before any message, the common way to fail a call).
pub fn status_in_headers(resp: &Resp) -> Option<u16> {
    status_of(resp.headers())
}

/// Parses `grpc-timeout`: 1 to 8 digits and a unit (`H`, `M`, `S`, `m`, `u`, `n`).
pub fn parse_timeout(v: &HeaderValue) -> Option<Duration> {
    let s = v.to_str().ok()?;
    if s.len() < 2 || s.len() > 9 {
        return None;
    }
    let (digits, unit) = s.split_at(s.len() - 1);
    if !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let n: u64 = digits.parse().ok()?;
    Some(match unit {
        "H" => Duration::from_secs(n.checked_mul(3600)?),
        "M" => Duration::from_secs(n.checked_mul(60)?),
        "S" => Duration::from_secs(n),
        "m" => Duration::from_millis(n),
        "u" => Duration::from_micros(n),
        "n" => Duration::from_nanos(n),
        _ => return None,
    })
}

/// Encodes a remaining time as `grpc-timeout`, rounded up to the millisecond (never `0m`,
/// which would expire the call before the next hop begins it), in the coarsest unit that
/// keeps 8 digits.
pub fn encode_timeout(d: Duration) -> HeaderValue {
    let ms = d.as_nanos().div_ceil(1_000_000).max(1);
    let v = if ms < 100_000_000 {
        format!("{ms}m")
    } else {
        format!("{}S", ms.div_ceil(1000).min(99_999_999))
    };
    HeaderValue::from_str(&v).expect("digits and a unit")
}

/// The gRPC status a proxy refusal becomes.
pub fn code_for(reason: Reason) -> u16 {
    match reason {
        Reason::Timeout | Reason::StreamIdleTimeout => code::DEADLINE_EXCEEDED,
        Reason::RateLimited
        | Reason::ClientRateLimited
        | Reason::BulkheadFull
        | Reason::BodyTooLarge => code::RESOURCE_EXHAUSTED,
        Reason::ConcurrencyLimit
        | Reason::CircuitOpen
        | Reason::RetryBudget
        | Reason::UnknownDependency
        | Reason::AppConnect
        | Reason::UpstreamConnect
        | Reason::UpstreamError
        | Reason::UnsupportedScheme => code::UNAVAILABLE,
        Reason::Unauthorized | Reason::MtlsRequired => code::UNAUTHENTICATED,
        Reason::CorsRejected | Reason::CallerNotAllowed => code::PERMISSION_DENIED,
        Reason::NoRoute | Reason::MethodNotAllowed => code::UNIMPLEMENTED,
        Reason::BadRequest
        | Reason::ClientBodyError
        | Reason::BadHost
        | Reason::UnderscoreHeader
        | Reason::UnsupportedTransferCoding => code::INTERNAL,
    }
}

/// A Trailers-Only gRPC answer: HTTP 200, the status and message in the headers, no body.
pub fn status_response(code: u16, message: &str) -> Resp {
    let mut resp = Response::new(body::empty());
    let h = resp.headers_mut();
    h.insert(CONTENT_TYPE, HeaderValue::from_static("application/grpc"));
    h.insert(GRPC_STATUS, HeaderValue::from(code));
    // `grpc-message` is percent-encoded; the proxy's messages are plain ASCII words.
    if let Ok(v) = HeaderValue::from_str(message) {
        h.insert(GRPC_MESSAGE, v);
    }
    resp
}

/// The proxy's refusal `resp` (for `reason`) as a gRPC status, its `x-weir-reason`, extra
/// headers (`retry-after`, `www-authenticate`) and the [`Rejected`] mark kept.
fn as_grpc(resp: Resp, reason: Reason) -> Resp {
    let (parts, _) = resp.into_parts();
    let mut out = status_response(
        code_for(reason),
        &format!("weir-proxy: {}", reason.as_str()),
    );
    for (name, value) in &parts.headers {
        if name != CONTENT_TYPE && name != http::header::CONTENT_LENGTH {
            out.headers_mut().append(name.clone(), value.clone());
        }
    }
    out.headers_mut()
        .insert(REASON_HEADER, reason.header_value());
    out.extensions_mut().insert(Rejected(reason));
    *out.status_mut() = StatusCode::OK;
    out
}

/// How a gRPC response body ended, for [`OnStatus`]'s callback.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Ended {
    /// Trailers with this `grpc-status`.
    Status(u16),
    /// The body ended without a `grpc-status` (a protocol error: gRPC clients see `INTERNAL`),
    /// or broke (the connection failed mid-stream).
    Broken,
    /// The body was dropped before its end: the caller went away (or reset the stream).
    Dropped,
}

/// A response body that reports, once, how the call ended: the `grpc-status` of its trailers,
/// or [`Ended::Dropped`] when it is dropped first.
pub struct OnStatus {
    inner: body::BoxBody,
    report: Option<Box<dyn FnOnce(Ended) + Send>>,
}

impl OnStatus {
    pub fn wrap(
        inner: body::BoxBody,
        report: impl FnOnce(Ended) + Send + 'static,
    ) -> body::BoxBody {
        use http_body_util::BodyExt;
        OnStatus {
            inner,
            report: Some(Box::new(report)),
        }
        .boxed_unsync()
    }

    fn report(&mut self, how: Ended) {
        if let Some(f) = self.report.take() {
            f(how);
        }
    }
}

impl hyper::body::Body for OnStatus {
    type Data = bytes::Bytes;
    type Error = body::BodyError;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<hyper::body::Frame<bytes::Bytes>, Self::Error>>> {
        use std::task::Poll;
        let polled = std::pin::Pin::new(&mut self.inner).poll_frame(cx);
        match &polled {
            Poll::Ready(Some(Ok(frame))) => {
                if let Some(t) = frame.trailers_ref() {
                    let how = status_of(t).map_or(Ended::Broken, Ended::Status);
                    self.report(how);
                }
            }
            Poll::Ready(Some(Err(_))) | Poll::Ready(None) => self.report(Ended::Broken),
            Poll::Pending => {}
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> hyper::body::SizeHint {
        self.inner.size_hint()
    }
}

impl Drop for OnStatus {
    fn drop(&mut self) {
        self.report(Ended::Dropped);
    }
}

/// The gRPC status a caller reads off an HTTP status that is not 200 (a non-gRPC hop answered):
/// grpc/doc/http-grpc-status-mapping.md.
pub fn code_of_http(status: StatusCode) -> u16 {
    match status.as_u16() {
        400 => code::INTERNAL,
        401 => code::UNAUTHENTICATED,
        403 => code::PERMISSION_DENIED,
        404 => code::UNIMPLEMENTED,
        429 | 502 | 503 | 504 => code::UNAVAILABLE,
        _ => code::UNKNOWN,
    }
}

/// Calls `report` once with the gRPC status the caller of a gRPC call will read from `resp`: a
/// proxy refusal's status ([`code_for`]: the [`GrpcLayer`] outside turns it into one), the status
/// of a Trailers-Only answer, the HTTP status's mapping when it is not 200, else the status in
/// the trailers once the body ends (`INTERNAL` when it ends without one, `CANCELLED` when the
/// caller drops it first). For metrics and spans, which see the answer before the [`GrpcLayer`]
/// does.
pub fn on_outcome(resp: Resp, report: impl FnOnce(u16) + Send + 'static) -> Resp {
    if let Some(c) = status_in_headers(&resp) {
        report(c);
        return resp;
    }
    if let Some(reason) = rejection(&resp) {
        report(code_for(reason));
        return resp;
    }
    if resp.status() != StatusCode::OK {
        report(code_of_http(resp.status()));
        return resp;
    }
    let (parts, body) = resp.into_parts();
    let body = OnStatus::wrap(body, move |ended| {
        report(match ended {
            Ended::Status(c) => c,
            Ended::Broken => code::INTERNAL,
            Ended::Dropped => code::CANCELLED,
        })
    });
    Resp::from_parts(parts, body)
}

/// `/package.Service/Method` as `("package.Service", "Method")`; `None` for any other path.
pub fn service_and_method(path: &str) -> Option<(&str, &str)> {
    let (service, method) = path.strip_prefix('/')?.split_once('/')?;
    let name = |s: &str| {
        !s.is_empty()
            && s.len() <= 128
            && s.bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'.')
    };
    (name(service) && name(method)).then_some((service, method))
}

#[derive(Clone, Debug, Default)]
pub struct GrpcLayer;

impl<S> Layer<S> for GrpcLayer {
    type Service = GrpcAware<S>;
    fn layer(&self, inner: S) -> GrpcAware<S> {
        GrpcAware { inner }
    }
}

#[derive(Clone, Debug)]
pub struct GrpcAware<S> {
    inner: S,
}

impl<S> Service<Req> for GrpcAware<S>
where
    S: Service<Req, Response = Resp, Error = Infallible>,
    S::Future: Send + 'static,
{
    type Response = Resp;
    type Error = Infallible;
    type Future = BoxFuture;
    always_ready!();

    fn call(&mut self, mut req: Req) -> BoxFuture {
        if !is_grpc_request(&req) {
            return Box::pin(self.inner.call(req));
        }
        if let Some(v) = req.headers_mut().remove(GRPC_TIMEOUT) {
            let Some(t) = parse_timeout(&v) else {
                let mut resp =
                    status_response(code::INTERNAL, "weir-proxy: malformed grpc-timeout");
                resp.headers_mut()
                    .insert(REASON_HEADER, Reason::BadRequest.header_value());
                resp.extensions_mut().insert(Rejected(Reason::BadRequest));
                return Box::pin(std::future::ready(Ok(resp)));
            };
            let at = Instant::now() + t;
            let at = match req.extensions().get::<Deadline>() {
                Some(Deadline(earlier)) => at.min(*earlier),
                None => at,
            };
            req.extensions_mut().insert(Deadline(at));
        }
        req.extensions_mut().insert(Grpc);
        let fut = self.inner.call(req);
        Box::pin(async move {
            let resp = fut.await?;
            // Only the proxy's own answers: an upstream's gRPC status passes as it is.
            match rejection(&resp) {
                Some(reason) if status_in_headers(&resp).is_none() => Ok(as_grpc(resp, reason)),
                _ => Ok(resp),
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::layers::testing::*;
    use crate::layers::timeout::TimeoutLayer;
    use tower::ServiceExt;

    fn grpc(timeout: Option<&str>) -> Req {
        let mut b = Request::post("/pkg.Svc/Call").header(CONTENT_TYPE, "application/grpc+proto");
        if let Some(t) = timeout {
            b = b.header(GRPC_TIMEOUT, t);
        }
        b.body(body::empty()).unwrap()
    }

    #[test]
    fn grpc_timeouts_parse_and_encode() {
        let p = |s: &str| parse_timeout(&HeaderValue::from_str(s).unwrap());
        assert_eq!(p("1H"), Some(Duration::from_secs(3600)));
        assert_eq!(p("2M"), Some(Duration::from_secs(120)));
        assert_eq!(p("3S"), Some(Duration::from_secs(3)));
        assert_eq!(p("250m"), Some(Duration::from_millis(250)));
        assert_eq!(p("7u"), Some(Duration::from_micros(7)));
        assert_eq!(p("99999999n"), Some(Duration::from_nanos(99_999_999)));
        for bad in ["", "S", "10", "123456789S", "-1S", "1.5S", "10s", "1 S"] {
            assert_eq!(p(bad), None, "{bad:?}");
        }
        assert_eq!(encode_timeout(Duration::from_micros(1)), "1m");
        assert_eq!(encode_timeout(Duration::from_micros(1500)), "2m");
        assert_eq!(encode_timeout(Duration::from_secs(3)), "3000m");
        assert_eq!(encode_timeout(Duration::from_secs(200_000)), "200000S");
    }

    #[test]
    fn grpc_content_types() {
        let r = |ct: &str| {
            Request::post("/")
                .header(CONTENT_TYPE, ct)
                .body(())
                .unwrap()
        };
        assert!(is_grpc_request(&r("application/grpc")));
        assert!(is_grpc_request(&r("application/grpc+json")));
        assert!(!is_grpc_request(&r("application/grpc-web")));
        assert!(!is_grpc_request(&r("application/json")));
    }

    #[tokio::test(start_paused = true)]
    async fn the_callers_grpc_timeout_wins_when_smaller_and_expiry_is_deadline_exceeded() {
        let svc = GrpcLayer
            .layer(TimeoutLayer::new(Duration::from_secs(10)).layer(slow(Duration::from_secs(60))));
        let start = Instant::now();
        let resp = svc.oneshot(grpc(Some("300m"))).await.unwrap();
        assert_eq!(start.elapsed(), Duration::from_millis(300));
        assert_eq!(resp.status(), 200);
        assert_eq!(resp.headers()[GRPC_STATUS], "4");
        assert_eq!(resp.headers()[GRPC_MESSAGE], "weir-proxy: timeout");
        assert_eq!(resp.headers()[REASON_HEADER], "timeout");
        assert_eq!(resp.headers()[CONTENT_TYPE], "application/grpc");
    }

    #[tokio::test(start_paused = true)]
    async fn the_policy_wins_when_smaller() {
        let svc = GrpcLayer.layer(
            TimeoutLayer::new(Duration::from_millis(100)).layer(slow(Duration::from_secs(60))),
        );
        let start = Instant::now();
        let resp = svc.oneshot(grpc(Some("5S"))).await.unwrap();
        assert_eq!(start.elapsed(), Duration::from_millis(100));
        assert_eq!(resp.headers()[GRPC_STATUS], "4");
    }

    #[tokio::test]
    async fn a_malformed_grpc_timeout_is_refused_and_non_grpc_requests_pass_untouched() {
        let svc = GrpcLayer.layer(slow(Duration::ZERO));
        let resp = svc.clone().oneshot(grpc(Some("soon"))).await.unwrap();
        assert_eq!(
            (resp.status().as_u16(), &resp.headers()[GRPC_STATUS]),
            (200, &HeaderValue::from(13u16))
        );
        let rejecting = GrpcLayer.layer(tower::service_fn(|_req: Req| async {
            Ok::<_, Infallible>(body::reject(Reason::RateLimited))
        }));
        let plain = rejecting.clone().oneshot(get("/")).await.unwrap();
        assert_eq!(plain.status(), 429);
        let g = rejecting.oneshot(grpc(None)).await.unwrap();
        assert_eq!(g.status(), 200);
        assert_eq!(g.headers()[GRPC_STATUS], "8");
        assert_eq!(g.headers()[REASON_HEADER], "rate-limited");
    }
}
