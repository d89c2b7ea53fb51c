//! Hostile input on the wire, sent as raw bytes to the real binary:
//!
//! - ambiguous framing: `Content-Length` together with `Transfer-Encoding` is refused with 400
//!   before anything reaches the app or the dependency, in either order, in any case, and as a
//!   later request of a keep-alive (or pipelined) connection; plain chunked requests still pass;
//! - broken request bodies (bad chunk size, chunk data longer than its size, an upload cut short)
//!   are the client's fault: 400 `client-body-error`, and the dependency's breaker never hears
//!   of them;
//! - header names with `_`, look-alikes of the identity headers among them, never reach the app;
//! - `Host` missing from an HTTP/1.1 request, or given twice: 400 `bad-host`;
//! - `CONNECT` (405) and transfer codings the proxy does not apply (501) are refused;
//! - two `traceparent` headers start a new trace.

mod common;

use common::*;
use http_body_util::BodyExt;
use std::net::SocketAddr;
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use weir_crds::proxy::{
    CircuitBreakerConfig, FailureClassConfig, IdentityConfig, RetryBudgetConfig, RetryConfig,
    UnderscoreHeaders,
};

const T: Duration = Duration::from_secs(5);

/// Answers with the number of body bytes received ("broken" when the body could not be read).
async fn counting_upstream() -> Upstream {
    upstream(|req, _| async move {
        match req.into_body().collect().await.map(|b| b.to_bytes().len()) {
            Ok(0) => respond(200, "empty"),
            Ok(n) => respond(200, leak(format!("got {n}"))),
            Err(_) => respond(400, "broken"),
        }
    })
    .await
}

fn leak(s: String) -> &'static str {
    Box::leak(s.into_boxed_str())
}

/// One response read off a kept-alive connection (the proxy's answers carry `content-length`).
struct Resp {
    status: u16,
    head: String,
    body: String,
}

/// A client connection; bytes read past one response are kept for the next.
struct Conn {
    s: TcpStream,
    buf: Vec<u8>,
}

async fn connect(addr: SocketAddr) -> Conn {
    Conn {
        s: TcpStream::connect(addr).await.unwrap(),
        buf: Vec::new(),
    }
}

impl Conn {
    async fn send(&mut self, bytes: &[u8]) {
        self.s.write_all(bytes).await.unwrap();
    }

    async fn fill(&mut self, what: &str) {
        let mut chunk = [0u8; 4096];
        let n = tokio::time::timeout(T, self.s.read(&mut chunk))
            .await
            .unwrap_or_else(|_| panic!("{what} in time"))
            .unwrap();
        assert!(
            n > 0,
            "closed before the {what}: {:?}",
            String::from_utf8_lossy(&self.buf)
        );
        self.buf.extend_from_slice(&chunk[..n]);
    }

    async fn response(&mut self) -> Resp {
        let head_end = loop {
            if let Some(i) = self.buf.windows(4).position(|w| w == b"\r\n\r\n") {
                break i + 4;
            }
            self.fill("response head").await;
        };
        let head = String::from_utf8_lossy(&self.buf[..head_end]).to_ascii_lowercase();
        let len: usize = head
            .lines()
            .find_map(|l| l.strip_prefix("content-length:"))
            .map(|v| v.trim().parse().unwrap())
            .expect("content-length in the answer");
        while self.buf.len() < head_end + len {
            self.fill("response body").await;
        }
        let rest = self.buf.split_off(head_end + len);
        let body = String::from_utf8_lossy(&self.buf[head_end..]).into_owned();
        self.buf = rest;
        Resp {
            status: head[9..12].parse().unwrap(),
            body,
            head,
        }
    }

    /// Half-closes: the client sends nothing more but can still read the answer.
    async fn stop_sending(&mut self) {
        self.s.shutdown().await.unwrap();
    }

    /// After a refusal the proxy closes the connection (EOF well before the timeout).
    async fn assert_closed(&mut self) {
        let start = Instant::now();
        let r = tokio::time::timeout(T, self.s.read_to_end(&mut self.buf)).await;
        assert!(
            r.is_ok() && start.elapsed() < T,
            "connection left open after the refusal"
        );
        assert!(
            self.buf.is_empty(),
            "nothing after the refusal: {:?}",
            String::from_utf8_lossy(&self.buf)
        );
    }
}

fn assert_refused(r: &Resp) {
    assert_refused_with(r, 400, "bad-request");
}

/// The proxy's own refusal: this status and reason, and the connection closed after it.
fn assert_refused_with(r: &Resp, status: u16, reason: &str) {
    assert_eq!(r.status, status, "{}{}", r.head, r.body);
    assert!(
        r.head.contains(&format!("x-weir-reason: {reason}\r\n")),
        "{}",
        r.head
    );
    assert_eq!(r.body, format!("{reason}\n"));
    assert!(r.head.contains("connection: close"), "{}", r.head);
}

/// Sends `req` on a new connection, expects the proxy's refusal and the connection closed.
async fn refused(addr: SocketAddr, req: &str, status: u16, reason: &str) {
    let mut c = connect(addr).await;
    c.send(req.as_bytes()).await;
    assert_refused_with(&c.response().await, status, reason);
    c.assert_closed().await;
}

const BOTH: [&str; 4] = [
    // Content-Length first, then Transfer-Encoding.
    "POST /a HTTP/1.1\r\nhost: x\r\ncontent-length: 5\r\ntransfer-encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n",
    // Transfer-Encoding first (hyper never even parses the Content-Length then).
    "POST /a HTTP/1.1\r\nhost: x\r\ntransfer-encoding: chunked\r\ncontent-length: 5\r\n\r\n5\r\nhello\r\n0\r\n\r\n",
    // Mixed case names.
    "POST /a?q=1 HTTP/1.1\r\nHost: x\r\nCONTENT-LENGTH: 5\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n",
    "PUT /a HTTP/1.1\r\nHost: x\r\nTransfer-encoding: chunked\r\nContent-Length: 40\r\n\r\n0\r\n\r\nGET /smuggled HTTP/1.1\r\nhost: x\r\n\r\n",
];

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn content_length_with_transfer_encoding_is_refused_in_any_order_and_case() {
    let app = counting_upstream().await;
    let users = counting_upstream().await;
    let mut cfg = base_config(app.addr);
    cfg.outbound.push(dependency("users", users.url()));
    let proxy = proxy(cfg).await;
    let inbound = proxy.config.inbound.listen;
    let outbound = proxy.config.outbound[0].listen;
    for addr in [inbound, outbound] {
        for req in BOTH {
            let mut c = connect(addr).await;
            c.send(req.as_bytes()).await;
            assert_refused(&c.response().await);
            c.assert_closed().await;
        }
    }
    assert_eq!(app.hits(), 0, "nothing reached the app");
    assert_eq!(users.hits(), 0, "nothing reached the dependency");
    let line = proxy
        .wait_log(|v| v["message"] == "refused request" && v["listener"] == "users")
        .await;
    assert_eq!(
        line["reason"],
        "Content-Length together with Transfer-Encoding"
    );
    assert!(
        proxy
            .log_lines()
            .iter()
            .any(|v| v["message"] == "refused request" && v["listener"] == "inbound")
    );
    // The proxy keeps serving.
    assert_eq!(get(&client(), proxy.inbound_url("/")).await.status, 200);
    assert_eq!(app.hits(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chunked_requests_still_pass_on_a_kept_alive_connection() {
    let app = counting_upstream().await;
    let proxy = proxy(base_config(app.addr)).await;
    let mut c = connect(proxy.config.inbound.listen).await;
    // Lower and mixed case, a chunk extension, a trailer, and a body larger than the proxy's
    // window for request heads (so the next head is found after it).
    let big = "z".repeat(40 * 1024);
    let reqs = [
        "POST /c HTTP/1.1\r\nhost: x\r\ntransfer-encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n"
            .to_string(),
        format!(
            "POST /c HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\nx-a: content-length: 3\r\n\r\n{:x};ext=1\r\n{big}\r\n0\r\nx-trailer: 1\r\n\r\n",
            big.len()
        ),
        "POST /c HTTP/1.1\r\nhost: x\r\ncontent-length: 3\r\n\r\nabc".to_string(),
        "PATCH /c HTTP/1.1\r\nhost: x\r\nTRANSFER-ENCODING: chunked\r\n\r\n2\r\nhi\r\n0\r\n\r\n"
            .to_string(),
    ];
    let want = ["got 5", &format!("got {}", big.len()), "got 3", "got 2"];
    for (req, want) in reqs.iter().zip(want) {
        c.send(req.as_bytes()).await;
        let r = c.response().await;
        assert_eq!(r.status, 200, "{}{}", r.head, r.body);
        assert_eq!(r.body, want);
    }
    assert_eq!(app.hits(), 4);
    // The same requests pipelined in one write.
    let mut c = connect(proxy.config.inbound.listen).await;
    c.send(reqs.concat().as_bytes()).await;
    for want in ["got 5", &format!("got {}", big.len()), "got 3", "got 2"] {
        let r = c.response().await;
        assert_eq!(r.status, 200, "{}{}", r.head, r.body);
        assert_eq!(r.body, want);
    }
    assert_eq!(app.hits(), 8);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_later_request_on_the_connection_with_both_headers_is_refused() {
    let app = counting_upstream().await;
    let proxy = proxy(base_config(app.addr)).await;
    let addr = proxy.config.inbound.listen;
    let smuggle = BOTH[1];

    // Keep-alive: a normal request, its answer, then the ambiguous one.
    for first in [
        "GET / HTTP/1.1\r\nhost: x\r\n\r\n".to_string(),
        "POST / HTTP/1.1\r\nhost: x\r\ntransfer-encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n"
            .to_string(),
        // A body larger than the window: skipped by its length, never copied.
        format!(
            "POST /a HTTP/1.1\r\nhost: x\r\ncontent-length: {}\r\n\r\n{}",
            64 * 1024,
            "q".repeat(64 * 1024)
        ),
    ] {
        let before = app.hits();
        let mut c = connect(addr).await;
        c.send(first.as_bytes()).await;
        assert_eq!(c.response().await.status, 200);
        c.send(smuggle.as_bytes()).await;
        assert_refused(&c.response().await);
        c.assert_closed().await;
        assert_eq!(
            app.hits(),
            before + 1,
            "only the first request reached the app"
        );

        // Pipelined: both in one write.
        let before = app.hits();
        let mut c = connect(addr).await;
        c.send(format!("{first}{smuggle}").as_bytes()).await;
        assert_eq!(c.response().await.status, 200);
        assert_refused(&c.response().await);
        c.assert_closed().await;
        assert_eq!(
            app.hits(),
            before + 1,
            "only the first request reached the app"
        );
    }
}

// --- Broken request bodies ---------------------------------------------------------------------

/// A chunk size that is not hex.
const BAD_CHUNK_SIZE: &str =
    "POST /up HTTP/1.1\r\nhost: x\r\ntransfer-encoding: chunked\r\n\r\nzz\r\nhello\r\n0\r\n\r\n";
/// Chunk data longer than its size.
const CHUNK_TOO_LONG: &str = "PUT /up HTTP/1.1\r\nhost: x\r\ntransfer-encoding: chunked\r\n\r\n5\r\nhello, and more than five\r\n0\r\n\r\n";
/// `Content-Length: 100`, 5 bytes, then the client stops sending (PUT: buffered for retries).
const CUT_SHORT_PUT: &str = "PUT /up HTTP/1.1\r\nhost: x\r\ncontent-length: 100\r\n\r\nhello";
/// The same as a POST (streamed to the upstream), the connection then closed outright.
const CUT_SHORT_POST: &str = "POST /up HTTP/1.1\r\nhost: x\r\ncontent-length: 100\r\n\r\nhello";

/// Sends each broken upload in turn and checks the answer is the client's fault: 400
/// `client-body-error`, the connection closed.
async fn broken_uploads(addr: SocketAddr) {
    for req in [BAD_CHUNK_SIZE, CHUNK_TOO_LONG] {
        refused(addr, req, 400, "client-body-error").await;
    }
    let mut c = connect(addr).await;
    c.send(CUT_SHORT_PUT.as_bytes()).await;
    c.stop_sending().await;
    assert_refused_with(&c.response().await, 400, "client-body-error");
    c.assert_closed().await;
}

/// Issue #15, 1: 25 broken uploads from the app opened the breaker of a healthy dependency
/// (each was answered 502 `upstream-error` and counted as its failure).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn broken_request_bodies_are_the_clients_fault_not_the_dependencys() {
    let app = counting_upstream().await;
    let users = counting_upstream().await;
    let mut cfg = base_config(app.addr);
    let mut dep = dependency("users", users.url());
    dep.circuit_breaker = Some(CircuitBreakerConfig {
        error_threshold_percentage: 50,
        volume_threshold: 10,
        rolling_window_ms: 10_000,
        buckets: 10,
        reset_timeout_ms: 30_000,
        failure_on: FailureClassConfig {
            status_5xx: true,
            connect_errors: true,
            timeouts: true,
            grpc_statuses: vec![2, 4, 13, 14, 15],
        },
    });
    dep.retry = Some(RetryConfig {
        attempts: 3,
        backoff_base_ms: 0,
        backoff_max_ms: 0,
        retry_non_idempotent: false,
        budget: RetryBudgetConfig {
            ratio: 0.2,
            min_per_second: 10,
            ttl_ms: 10_000,
        },
        grpc_statuses: vec![14],
    });
    cfg.outbound.push(dep);
    let proxy = proxy(cfg).await;
    let outbound = proxy.config.outbound[0].listen;

    // 30 broken uploads that can be answered, and 5 whose client is gone before the answer.
    for _ in 0..10 {
        broken_uploads(outbound).await;
    }
    for _ in 0..5 {
        let mut c = connect(outbound).await;
        c.send(CUT_SHORT_POST.as_bytes()).await;
        drop(c);
    }
    let series = |status_class: &str| {
        format!(
            r#"weir_requests_total{{direction="outbound",dependency="users",status_class="{status_class}"}}"#
        )
    };
    proxy
        .wait_metric(
            r#"weir_rejections_total{direction="outbound",dependency="users",reason="client-body-error"}"#,
            35.0,
        )
        .await;
    assert_eq!(proxy.metric(&series("4xx")).await, 35.0);
    assert_eq!(proxy.metric(&series("5xx")).await, 0.0, "none is a 502");
    assert_eq!(
        proxy
            .metric(r#"weir_circuit_breaker_state{dependency="users"}"#)
            .await,
        0.0,
        "the breaker is still closed"
    );
    assert_eq!(
        proxy
            .metric(r#"weir_circuit_breaker_transitions_total{dependency="users",to="open"}"#)
            .await,
        0.0
    );
    assert_eq!(
        proxy
            .metric(r#"weir_retries_total{dependency="users"}"#)
            .await,
        0.0,
        "a broken upload is not retried"
    );
    let line = proxy
        .wait_log(|v| v["target"] == "weir::access" && v["reason"] == "client-body-error")
        .await;
    assert_eq!(line["status"], 400);
    assert_eq!(line["direction"], "outbound");
    proxy
        .wait_log(|v| {
            v["message"] == "request body from the client failed; not forwarded in full"
                && v["reason"] == "client-body-error"
        })
        .await;
    assert!(
        !proxy
            .log_lines()
            .iter()
            .any(|v| v["message"] == "forwarding failed"),
        "nothing was blamed on the dependency"
    );

    // The dependency is still called: bodies intact, by length and chunked.
    let c = client();
    for _ in 0..5 {
        let put = http::Request::put(proxy.outbound_url("users", "/up"))
            .body(http_body_util::Full::new(bytes::Bytes::from_static(
                b"hello",
            )))
            .unwrap();
        let a = send(&c, put).await;
        assert_eq!((a.status, a.body.as_str()), (200, "got 5"));
    }
    let mut conn = connect(outbound).await;
    conn.send(b"POST /up HTTP/1.1\r\nhost: x\r\ntransfer-encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n")
        .await;
    let r = conn.response().await;
    assert_eq!((r.status, r.body.as_str()), (200, "got 5"));

    // The app's own inbound listener blames the client the same way.
    broken_uploads(proxy.config.inbound.listen).await;
    proxy
        .wait_metric(
            r#"weir_rejections_total{direction="inbound",dependency="",reason="client-body-error"}"#,
            3.0,
        )
        .await;
    assert_eq!(
        get(&c, proxy.inbound_url("/")).await.body,
        "empty",
        "the app still serves"
    );
}

// --- Header names with `_` ---------------------------------------------------------------------

/// What the app saw, as `name: value` lines of the names with `_` and of `x-user-*`.
fn user_and_underscore_headers(app: &Upstream) -> Vec<String> {
    let seen = app.seen.lock().unwrap();
    let h = seen.last().expect("the app was called");
    let mut v: Vec<String> = h
        .iter()
        .filter(|(n, _)| n.as_str().contains('_') || n.as_str().starts_with("x-user-"))
        .map(|(n, v)| format!("{n}: {}", v.to_str().unwrap()))
        .collect();
    v.sort();
    v
}

const LOOK_ALIKES: &str =
    "x_user_id: admin\r\nX_User_Role: admin\r\nx_weir_identity: forged\r\nx-request_tag: 7\r\n";

/// Issue #15, 2: `x_user_id: admin` and `X_User_Role: admin` reached the app beside a valid
/// signed identity; CGI-style frameworks read them as `HTTP_X_USER_ID` / `HTTP_X_USER_ROLE`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn header_names_with_underscores_never_pass_for_identity() {
    let dir = tempfile::tempdir().unwrap();
    let key_file = dir.path().join("identity-key");
    std::fs::write(&key_file, b"the namespace identity key, 32+ bytes").unwrap();
    let identity = |sign_for: &[&str]| IdentityConfig {
        key_file: key_file.display().to_string(),
        sign_for: sign_for.iter().map(|s| s.to_string()).collect(),
    };
    // orders, with the default (`drop`), called by a caller's sidecar that signs the identity.
    let orders_app = counting_upstream().await;
    let mut orders_cfg = base_config(orders_app.addr);
    orders_cfg.identity = Some(identity(&[]));
    let orders = proxy(orders_cfg).await;
    let caller_app = counting_upstream().await;
    let mut caller_cfg = base_config(caller_app.addr);
    caller_cfg.service = "caller".into();
    caller_cfg.identity = Some(identity(&["orders"]));
    caller_cfg.outbound.push(dependency(
        "orders",
        format!("http://{}", orders.config.inbound.listen),
    ));
    let caller = proxy(caller_cfg).await;

    let mut c = connect(caller.config.outbound[0].listen).await;
    c.send(
        format!("GET /me HTTP/1.1\r\nhost: orders\r\nx-user-id: u1\r\n{LOOK_ALIKES}\r\n")
            .as_bytes(),
    )
    .await;
    let r = c.response().await;
    assert_eq!(r.status, 200, "{}{}", r.head, r.body);
    assert_eq!(
        user_and_underscore_headers(&orders_app),
        ["x-user-id: u1"],
        "the signed identity only"
    );
    let removed = |kind: &str| format!(r#"weir_underscore_headers_removed_total{{kind="{kind}"}}"#);
    assert_eq!(orders.metric(&removed("look-alike")).await, 1.0);
    assert_eq!(orders.metric(&removed("other")).await, 1.0);
    assert_eq!(
        orders
            .metric(r#"weir_identity_headers_removed_total{reason="unsigned"}"#)
            .await,
        0.0,
        "the signed identity itself was trusted"
    );

    // `reject`: refused before the app.
    let app = counting_upstream().await;
    let mut cfg = base_config(app.addr);
    cfg.inbound.underscore_headers = UnderscoreHeaders::Reject;
    let strict = proxy(cfg).await;
    refused(
        strict.config.inbound.listen,
        "GET / HTTP/1.1\r\nhost: x\r\nx-request_tag: 7\r\n\r\n",
        400,
        "underscore-header",
    )
    .await;
    assert_eq!(app.hits(), 0);
    assert_eq!(
        strict
            .metric(r#"weir_rejections_total{direction="inbound",dependency="",reason="underscore-header"}"#)
            .await,
        1.0
    );

    // `allow`: other names with `_` pass, look-alikes of reserved names still do not.
    let mut cfg = base_config(app.addr);
    cfg.inbound.underscore_headers = UnderscoreHeaders::Allow;
    let lenient = proxy(cfg).await;
    let mut c = connect(lenient.config.inbound.listen).await;
    c.send(format!("GET / HTTP/1.1\r\nhost: x\r\n{LOOK_ALIKES}\r\n").as_bytes())
        .await;
    assert_eq!(c.response().await.status, 200);
    assert_eq!(user_and_underscore_headers(&app), ["x-request_tag: 7"]);
}

// --- Host --------------------------------------------------------------------------------------

/// Issue #15, 4: an HTTP/1.1 request without `Host` was forwarded, one with two reached the app
/// with both (RFC 9112 §3.2 asks for 400).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http11_requests_without_host_or_with_two_are_refused() {
    let app = counting_upstream().await;
    let users = counting_upstream().await;
    let mut cfg = base_config(app.addr);
    cfg.outbound.push(dependency("users", users.url()));
    let proxy = proxy(cfg).await;
    let listeners = [
        (proxy.config.inbound.listen, "inbound", ""),
        (proxy.config.outbound[0].listen, "outbound", "users"),
    ];
    for (addr, _, _) in listeners {
        for req in [
            "GET / HTTP/1.1\r\n\r\n",
            "GET / HTTP/1.1\r\nhost: a\r\nhost: b\r\n\r\n",
            "GET / HTTP/1.1\r\nHost: a\r\nHOST: a\r\n\r\n",
            "GET http://a/ HTTP/1.1\r\n\r\n",
            "GET / HTTP/1.1\r\nhost: user@a\r\n\r\n",
            "GET / HTTP/1.0\r\nhost: a\r\nhost: b\r\n\r\n",
        ] {
            refused(addr, req, 400, "bad-host").await;
        }
    }
    assert_eq!(app.hits(), 0, "nothing reached the app");
    assert_eq!(users.hits(), 0, "nothing reached the dependency");
    for (_, direction, dependency) in listeners {
        assert_eq!(
            proxy
                .metric(&format!(
                    r#"weir_rejections_total{{direction="{direction}",dependency="{dependency}",reason="bad-host"}}"#
                ))
                .await,
            6.0
        );
    }
    let line = proxy
        .wait_log(|v| v["message"] == "refused request" && v["reason"] == "more than one Host")
        .await;
    assert_eq!(line["listener"], "inbound");
    // HTTP/1.0 needs no Host; one Host is fine.
    for (addr, _, _) in listeners {
        for req in [
            "GET / HTTP/1.0\r\n\r\n",
            "GET / HTTP/1.1\r\nhost: a\r\n\r\n",
        ] {
            let mut c = connect(addr).await;
            c.send(req.as_bytes()).await;
            assert_eq!(c.response().await.status, 200, "{req:?}");
        }
    }
    assert_eq!((app.hits(), users.hits()), (2, 2));
}

// --- Methods and transfer codings --------------------------------------------------------------

/// Issue #15, 5: `CONNECT` was forwarded as a plain request (the client got an empty answer, the
/// access log said 200), and `Transfer-Encoding: gzip, chunked` reached the app as `chunked`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connect_and_transfer_codings_the_proxy_does_not_apply_are_refused() {
    let app = counting_upstream().await;
    let users = counting_upstream().await;
    let mut cfg = base_config(app.addr);
    cfg.outbound.push(dependency("users", users.url()));
    let proxy = proxy(cfg).await;
    for addr in [proxy.config.inbound.listen, proxy.config.outbound[0].listen] {
        let mut c = connect(addr).await;
        c.send(b"CONNECT users:443 HTTP/1.1\r\nhost: users:443\r\n\r\n")
            .await;
        let r = c.response().await;
        assert_refused_with(&r, 405, "method-not-allowed");
        assert!(
            r.head
                .contains("allow: get, head, post, put, delete, patch, options, trace\r\n"),
            "{}",
            r.head
        );
        c.assert_closed().await;
        for req in [
            "POST /u HTTP/1.1\r\nhost: x\r\ntransfer-encoding: gzip, chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n",
            "POST /u HTTP/1.1\r\nhost: x\r\ntransfer-encoding: gzip\r\ntransfer-encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n",
            "POST /u HTTP/1.1\r\nhost: x\r\ntransfer-encoding: chunked, chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n",
        ] {
            refused(addr, req, 501, "unsupported-transfer-coding").await;
        }
    }
    assert_eq!(app.hits(), 0, "nothing reached the app");
    assert_eq!(users.hits(), 0, "nothing reached the dependency");
    let line = proxy
        .wait_log(|v| v["target"] == "weir::access" && v["method"] == "CONNECT")
        .await;
    assert_eq!(line["status"], 405);
    assert_eq!(line["reason"], "method-not-allowed");
    assert_eq!(
        proxy
            .metric(r#"weir_rejections_total{direction="outbound",dependency="users",reason="unsupported-transfer-coding"}"#)
            .await,
        3.0
    );
    // Plain chunked still passes.
    let mut c = connect(proxy.config.inbound.listen).await;
    c.send(
        b"POST /u HTTP/1.1\r\nhost: x\r\nTransfer-Encoding: Chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n",
    )
    .await;
    let r = c.response().await;
    assert_eq!((r.status, r.body.as_str()), (200, "got 5"));
}

// --- Trace context -----------------------------------------------------------------------------

/// Issue #15, 6: of two `traceparent` headers the first was continued.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_traceparent_headers_start_a_new_trace() {
    const FIRST: &str = "4bf92f3577b34da6a3ce929d0e0e4736";
    const SECOND: &str = "0af7651916cd43dd8448eb211c80319c";
    let app = counting_upstream().await;
    let users = counting_upstream().await;
    let mut cfg = base_config(app.addr);
    cfg.outbound.push(dependency("users", users.url()));
    let proxy = proxy(cfg).await;
    let req = format!(
        "GET /t HTTP/1.1\r\nhost: x\r\ntraceparent: 00-{FIRST}-00f067aa0ba902b7-01\r\ntracestate: a=b\r\ntraceparent: 00-{SECOND}-b7ad6b7169203331-01\r\n\r\n"
    );
    for (addr, upstream, direction) in [
        (proxy.config.inbound.listen, &app, "inbound"),
        (proxy.config.outbound[0].listen, &users, "outbound"),
    ] {
        let mut c = connect(addr).await;
        c.send(req.as_bytes()).await;
        assert_eq!(c.response().await.status, 200);
        let seen = upstream.seen.lock().unwrap().last().unwrap().clone();
        let parents: Vec<&str> = seen
            .get_all("traceparent")
            .iter()
            .map(|v| v.to_str().unwrap())
            .collect();
        assert_eq!(parents.len(), 1, "{parents:?}");
        let trace = parents[0].split('-').nth(1).unwrap().to_string();
        assert!(
            trace != FIRST && trace != SECOND,
            "{direction}: a new trace"
        );
        assert!(
            !seen.contains_key("tracestate"),
            "{direction}: tracestate dropped"
        );
        let line = proxy
            .wait_log(|v| v["target"] == "weir::access" && v["direction"] == direction)
            .await;
        assert_eq!(line["trace_id"], trace.as_str());
    }
}
