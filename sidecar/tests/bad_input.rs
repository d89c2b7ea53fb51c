//! Ambiguous framing on the wire: `Content-Length` together with `Transfer-Encoding` is refused
//! with 400 before anything reaches the app or the dependency, in either order, in any case, and
//! as a later request of a keep-alive (or pipelined) connection; plain chunked requests still pass.

mod common;

use common::*;
use http_body_util::BodyExt;
use std::net::SocketAddr;
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

const T: Duration = Duration::from_secs(5);

/// Answers with the number of body bytes received.
async fn counting_upstream() -> Upstream {
    upstream(|req, _| async move {
        let n = req.into_body().collect().await.unwrap().to_bytes().len();
        respond(
            200,
            if n == 0 {
                "empty"
            } else {
                leak(format!("got {n}"))
            },
        )
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
    assert_eq!(r.status, 400, "{}{}", r.head, r.body);
    assert!(r.head.contains("x-weir-reason: bad-request"), "{}", r.head);
    assert!(r.head.contains("connection: close"), "{}", r.head);
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
    let proxy = Proxy::start(cfg).await;
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
    let proxy = Proxy::start(base_config(app.addr)).await;
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
    let proxy = Proxy::start(base_config(app.addr)).await;
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
