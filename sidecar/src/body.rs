//! Body and response types shared by every layer, and the locally generated rejections.

use bytes::Bytes;
use http::{HeaderName, HeaderValue, Request, Response, StatusCode};
use http_body_util::{BodyExt, Empty, Full};

pub type BoxError = Box<dyn std::error::Error + Send + Sync + 'static>;

/// The error of [`BoxBody`]: a concrete type (rather than a boxed trait object directly) keeps
/// `Send` bounds on layer futures provable by the compiler.
#[derive(Debug)]
pub struct BodyError(pub BoxError);

impl BodyError {
    pub fn new(e: impl Into<BoxError>) -> Self {
        BodyError(e.into())
    }
}

impl std::fmt::Display for BodyError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.0.fmt(f)
    }
}

impl std::error::Error for BodyError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        Some(&*self.0)
    }
}

/// Reading the request body from the downstream client failed: a malformed chunk, a body shorter
/// than its `Content-Length` (the client closed or reset mid-upload), a read error on the
/// client's connection. Every body error of a request the proxy received is wrapped in this
/// type, so a forwarding failure it causes can be told apart from the upstream's own failures
/// and blamed on the client: 400 `client-body-error`, never counted by the breaker or the retry
/// budget (a broken upload is not evidence that the dependency is unhealthy).
#[derive(Debug)]
pub struct ClientBodyError(pub hyper::Error);

impl std::fmt::Display for ClientBodyError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "reading the request body from the client failed: {}",
            self.0
        )
    }
}

impl std::error::Error for ClientBodyError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        Some(&self.0)
    }
}

impl ClientBodyError {
    /// The [`ClientBodyError`] that is `e` or in its chain of sources, if any. Forwarding
    /// errors arrive wrapped by the HTTP client (its error, hyper's, then the body's), so the
    /// whole chain is searched.
    pub fn in_chain<'a>(e: &'a (dyn std::error::Error + 'static)) -> Option<&'a ClientBodyError> {
        let mut cur = Some(e);
        while let Some(err) = cur {
            if let Some(c) = err.downcast_ref::<ClientBodyError>() {
                return Some(c);
            }
            cur = err.source();
        }
        None
    }
}

/// The one body type inside the proxy (requests and responses).
pub type BoxBody = http_body_util::combinators::UnsyncBoxBody<Bytes, BodyError>;
pub type Req = Request<BoxBody>;
pub type Resp = Response<BoxBody>;

/// Set on every response the proxy generates itself (and on upstream responses it annotates):
/// names why the proxy answered instead of (or on top of) the app or the upstream.
pub const REASON_HEADER: HeaderName = HeaderName::from_static("x-weir-reason");
/// Set on a configured fallback response: `circuit-open` or `bulkhead-full`.
pub const FALLBACK_HEADER: HeaderName = HeaderName::from_static("x-weir-fallback");

/// Why the proxy answered on its own. Carried as a response extension and in [`REASON_HEADER`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Reason {
    /// The request (or the dependency's deadline) ran out: 504.
    Timeout,
    /// Inbound concurrency limit and its queue are full: 503.
    ConcurrencyLimit,
    /// Inbound token bucket is empty: 429 with `Retry-After`.
    RateLimited,
    /// Request body larger than `maxBodyBytes`: 413.
    BodyTooLarge,
    /// Request the proxy refuses to forward (e.g. `Content-Length` with `Transfer-Encoding`): 400.
    BadRequest,
    /// The app (inbound) refused the connection or reset it: 502.
    AppConnect,
    /// The dependency could not be reached (connect error, DNS failure): 502.
    UpstreamConnect,
    /// The dependency's connection failed after connecting (reset, malformed response): 502.
    UpstreamError,
    /// Circuit breaker open (or half-open with its trial in flight): 503.
    CircuitOpen,
    /// Bulkhead and its queue full: 503.
    BulkheadFull,
    /// Set on a failed response that was not retried because the retry budget is spent.
    RetryBudget,
    /// The listener's dependency is no longer in the config: 503.
    UnknownDependency,
    /// The upstream URL's scheme is not supported (`https://` needs TLS): 502.
    UnsupportedScheme,
    /// Edge: no valid bearer token where one is needed: 401 with `WWW-Authenticate`.
    Unauthorized,
    /// Edge without an app: no route matches the path: 404.
    NoRoute,
    /// Edge: this client's own token bucket is empty: 429 with `Retry-After`.
    ClientRateLimited,
    /// Edge: a CORS preflight from an origin, method or header not allowed: 403.
    CorsRejected,
    /// The client's request body broke while it was read (malformed chunked framing, closed or
    /// reset before `Content-Length` bytes): 400. The client's fault, not the upstream's.
    ClientBodyError,
    /// An HTTP/1.1 request without `Host`, with more than one, or with an invalid value
    /// (RFC 9112 §3.2): 400.
    BadHost,
    /// `CONNECT`: the proxy forwards requests, it does not open tunnels: 405.
    MethodNotAllowed,
    /// A `Transfer-Encoding` other than `chunked` alone: a coding the proxy does not apply, so
    /// it cannot frame the body it would pass on (RFC 9112 §6.1): 501.
    UnsupportedTransferCoding,
    /// A header name with `_` while `inbound.underscoreHeaders` is `reject`: 400.
    UnderscoreHeader,
    /// Nothing crossed either body for `streamIdleTimeout`: the stream is ended (gRPC:
    /// `DEADLINE_EXCEEDED` in the trailers; else reset). Never a response of its own, as
    /// the headers have been sent by then; counted in `weir_rejections_total`.
    StreamIdleTimeout,
    /// A mutual-TLS caller the inbound authorization does not admit (`mtls.authorization`):
    /// 403 (gRPC `PERMISSION_DENIED`).
    CallerNotAllowed,
    /// Plaintext from outside the pod while `mtls.inbound` is `strict`: 403 (gRPC
    /// `UNAUTHENTICATED`).
    MtlsRequired,
}

impl Reason {
    pub const fn as_str(self) -> &'static str {
        match self {
            Reason::Timeout => "timeout",
            Reason::ConcurrencyLimit => "concurrency-limit",
            Reason::RateLimited => "rate-limited",
            Reason::BodyTooLarge => "body-too-large",
            Reason::BadRequest => "bad-request",
            Reason::AppConnect => "app-connect",
            Reason::UpstreamConnect => "upstream-connect",
            Reason::UpstreamError => "upstream-error",
            Reason::CircuitOpen => "circuit-open",
            Reason::BulkheadFull => "bulkhead-full",
            Reason::RetryBudget => "retry-budget",
            Reason::UnknownDependency => "unknown-dependency",
            Reason::UnsupportedScheme => "unsupported-scheme",
            Reason::Unauthorized => "unauthorized",
            Reason::NoRoute => "no-route",
            Reason::ClientRateLimited => "client-rate-limited",
            Reason::CorsRejected => "cors-rejected",
            Reason::ClientBodyError => "client-body-error",
            Reason::BadHost => "bad-host",
            Reason::MethodNotAllowed => "method-not-allowed",
            Reason::UnsupportedTransferCoding => "unsupported-transfer-coding",
            Reason::UnderscoreHeader => "underscore-header",
            Reason::StreamIdleTimeout => "stream-idle-timeout",
            Reason::CallerNotAllowed => "caller-not-allowed",
            Reason::MtlsRequired => "mtls-required",
        }
    }

    pub const fn status(self) -> StatusCode {
        match self {
            Reason::Timeout => StatusCode::GATEWAY_TIMEOUT,
            Reason::ConcurrencyLimit
            | Reason::CircuitOpen
            | Reason::BulkheadFull
            | Reason::UnknownDependency
            | Reason::RetryBudget => StatusCode::SERVICE_UNAVAILABLE,
            Reason::RateLimited | Reason::ClientRateLimited => StatusCode::TOO_MANY_REQUESTS,
            Reason::Unauthorized => StatusCode::UNAUTHORIZED,
            Reason::NoRoute => StatusCode::NOT_FOUND,
            Reason::CorsRejected | Reason::CallerNotAllowed | Reason::MtlsRequired => {
                StatusCode::FORBIDDEN
            }
            Reason::BodyTooLarge => StatusCode::PAYLOAD_TOO_LARGE,
            Reason::BadRequest
            | Reason::ClientBodyError
            | Reason::BadHost
            | Reason::UnderscoreHeader => StatusCode::BAD_REQUEST,
            Reason::MethodNotAllowed => StatusCode::METHOD_NOT_ALLOWED,
            Reason::StreamIdleTimeout => StatusCode::REQUEST_TIMEOUT,
            Reason::UnsupportedTransferCoding => StatusCode::NOT_IMPLEMENTED,
            Reason::AppConnect
            | Reason::UpstreamConnect
            | Reason::UpstreamError
            | Reason::UnsupportedScheme => StatusCode::BAD_GATEWAY,
        }
    }

    pub const fn header_value(self) -> HeaderValue {
        HeaderValue::from_static(self.as_str())
    }
}

/// Response extension: this response was produced by the proxy for this reason.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Rejected(pub Reason);

pub fn empty() -> BoxBody {
    Empty::<Bytes>::new()
        .map_err(|never| match never {})
        .boxed_unsync()
}

pub fn full(bytes: impl Into<Bytes>) -> BoxBody {
    Full::new(bytes.into())
        .map_err(|never| match never {})
        .boxed_unsync()
}

/// The proxy's own answer: status from the reason, `x-weir-reason`, a one-line body.
pub fn reject(reason: Reason) -> Resp {
    let mut resp = Response::new(full(Bytes::from_static(reason_body(reason))));
    *resp.status_mut() = reason.status();
    let h = resp.headers_mut();
    h.insert(REASON_HEADER, reason.header_value());
    h.insert(
        http::header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain"),
    );
    resp.extensions_mut().insert(Rejected(reason));
    resp
}

/// [`reject`] with `connection: close`: for refusals after which the rest of the connection cannot
/// be trusted (an unread or broken body, framing the proxy does not understand).
pub fn reject_closing(reason: Reason) -> Resp {
    let mut resp = reject(reason);
    resp.headers_mut()
        .insert(http::header::CONNECTION, HeaderValue::from_static("close"));
    resp
}

fn reason_body(reason: Reason) -> &'static [u8] {
    match reason {
        Reason::Timeout => b"timeout\n",
        Reason::ConcurrencyLimit => b"concurrency-limit\n",
        Reason::RateLimited => b"rate-limited\n",
        Reason::BodyTooLarge => b"body-too-large\n",
        Reason::BadRequest => b"bad-request\n",
        Reason::AppConnect => b"app-connect\n",
        Reason::UpstreamConnect => b"upstream-connect\n",
        Reason::UpstreamError => b"upstream-error\n",
        Reason::CircuitOpen => b"circuit-open\n",
        Reason::BulkheadFull => b"bulkhead-full\n",
        Reason::RetryBudget => b"retry-budget\n",
        Reason::UnknownDependency => b"unknown-dependency\n",
        Reason::UnsupportedScheme => b"unsupported-scheme\n",
        Reason::Unauthorized => b"unauthorized\n",
        Reason::NoRoute => b"no-route\n",
        Reason::ClientRateLimited => b"client-rate-limited\n",
        Reason::CorsRejected => b"cors-rejected\n",
        Reason::ClientBodyError => b"client-body-error\n",
        Reason::BadHost => b"bad-host\n",
        Reason::MethodNotAllowed => b"method-not-allowed\n",
        Reason::UnsupportedTransferCoding => b"unsupported-transfer-coding\n",
        Reason::UnderscoreHeader => b"underscore-header\n",
        Reason::StreamIdleTimeout => b"stream-idle-timeout\n",
        Reason::CallerNotAllowed => b"caller-not-allowed\n",
        Reason::MtlsRequired => b"mtls-required\n",
    }
}

/// The reason the proxy attached to a response, if any.
pub fn rejection(resp: &Resp) -> Option<Reason> {
    resp.extensions().get::<Rejected>().map(|r| r.0)
}

/// Index of the status class (1xx..5xx → 0..4) for pre-created metric label sets.
pub fn status_class(status: StatusCode) -> usize {
    (status.as_u16() / 100).clamp(1, 5) as usize - 1
}

pub const STATUS_CLASSES: [&str; 5] = ["1xx", "2xx", "3xx", "4xx", "5xx"];
