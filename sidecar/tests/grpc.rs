//! gRPC through the real `weir-proxy` binary, with tonic on both ends (the test kit's
//! `weir.test.Echo`): every call kind through two sidecars, and each policy in gRPC terms:
//! deadlines from `grpc-timeout`, the breaker and the retries judging `grpc-status` rather than
//! the HTTP status, and the proxy's refusals answered as gRPC statuses.

mod common;

use common::*;
use std::time::{Duration, Instant};
use tonic::Code;
use weir_crds::proxy::*;
use weir_testkit::grpc::{Ask, EchoServer, client};
// (`common::client` is the HTTP/1.1 test client; `client` here is the gRPC one.)

/// A config whose one dependency, `echo`, is `upstream` spoken to in HTTP/2.
fn with_grpc_dependency(upstream: String) -> ProxyConfig {
    let mut cfg = base_config(free_addr());
    let mut dep = dependency("echo", upstream);
    dep.protocol = WireProtocol::Http2;
    cfg.outbound = vec![dep];
    cfg
}

/// The echo server behind its own sidecar (B), and a caller's sidecar (A) with B as its
/// dependency `echo`, `tune` applied to A's config.
async fn two_sidecars(
    tune: impl FnOnce(&mut ProxyConfig),
) -> (EchoServer, Proxy, Proxy, ProxyConfig) {
    let echo = EchoServer::start().await;
    let mut cfg_b = base_config(echo.addr);
    cfg_b.service = "echo".into();
    cfg_b.inbound.app_protocol = WireProtocol::Http2;
    let b = proxy(cfg_b.clone()).await;
    let mut cfg_a = with_grpc_dependency(format!("http://{}", cfg_b.inbound.listen));
    tune(&mut cfg_a);
    let a = proxy(cfg_a.clone()).await;
    (echo, a, b, cfg_a)
}

fn failing(code: Code) -> Ask {
    Ask {
        text: "x".into(),
        fail_code: code as u32,
        ..Ask::default()
    }
}

#[tokio::test]
async fn unary_and_every_streaming_kind_pass_through_two_sidecars() {
    let (_echo, _a, _b, cfg) = two_sidecars(|_| {}).await;
    let mut c = client(cfg.outbound[0].listen);

    let r = c.say(Ask::text("hello")).await.expect("unary");
    assert_eq!(r.metadata().get("x-echo").unwrap(), "yes");
    assert_eq!(r.into_inner().text, "hello");

    // A status in the trailers after the messages, and the messages before it.
    let mut stream = c
        .count(Ask {
            text: "n".into(),
            count: 3,
            delay_ms: 20,
            fail_code: Code::DataLoss as u32,
        })
        .await
        .unwrap()
        .into_inner();
    let mut got = Vec::new();
    let end = loop {
        match stream.message().await {
            Ok(Some(a)) => got.push(a.text),
            Ok(None) => break None,
            Err(s) => break Some(s),
        }
    };
    assert_eq!(got, ["n#0", "n#1", "n#2"]);
    let end = end.expect("the status in the trailers");
    assert_eq!(end.code(), Code::DataLoss);
    assert_eq!(end.message(), "asked to fail: n");

    let asks = futures::stream::iter(["a", "b", "c"].map(Ask::text));
    let sum = c.sum(asks).await.expect("client streaming").into_inner();
    assert_eq!(sum.text, "a+b+c");

    // Bidi: each answer comes back before the next message is sent.
    let (tx, rx) = tokio::sync::mpsc::channel::<Ask>(1);
    let outgoing =
        futures::stream::unfold(rx, |mut rx| async move { rx.recv().await.map(|a| (a, rx)) });
    tx.send(Ask::text("m0")).await.unwrap();
    let mut answers = c.chat(outgoing).await.expect("bidi").into_inner();
    for i in 0..4 {
        if i > 0 {
            tx.send(Ask::text(&format!("m{i}"))).await.unwrap();
        }
        let a = tokio::time::timeout(Duration::from_secs(3), answers.message())
            .await
            .unwrap_or_else(|_| panic!("answer {i} was held back"))
            .unwrap()
            .unwrap();
        assert_eq!(a.text, format!("echo m{i}"));
    }
    drop(tx);
    assert!(answers.message().await.unwrap().is_none());
}

#[tokio::test]
async fn the_callers_deadline_travels_and_expires_as_deadline_exceeded() {
    let (echo, _a, _b, cfg) = two_sidecars(|c| c.outbound[0].timeout_ms = 10_000).await;
    let mut c = client(cfg.outbound[0].listen);

    let mut req = tonic::Request::new(Ask::text("quick"));
    req.set_timeout(Duration::from_millis(800));
    c.say(req).await.expect("answered in time");
    // The app saw what was left of the caller's 800 ms after two sidecars, in milliseconds.
    let seen = echo.timeouts()[0]
        .clone()
        .expect("grpc-timeout reached the app");
    let ms: u64 = seen
        .strip_suffix('m')
        .expect("milliseconds")
        .parse()
        .unwrap();
    assert!((400..=800).contains(&ms), "grpc-timeout at the app: {seen}");

    // The expiry, seen by a plain HTTP/2 client: tonic would give up on its own at the same
    // moment, and here the answer must come from the sidecars.
    let h2 = hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
        .http2_only(true)
        .build_http::<http_body_util::Full<bytes::Bytes>>();
    let req = http::Request::post(format!(
        "http://{}/weir.test.Echo/Say",
        cfg.outbound[0].listen
    ))
    .header("content-type", "application/grpc")
    .header("te", "trailers")
    .header("grpc-timeout", "500m")
    .body(http_body_util::Full::new(weir_testkit::grpc::framed(
        &Ask {
            delay_ms: 3_000,
            ..Ask::text("slow")
        },
    )))
    .unwrap();
    let start = Instant::now();
    let resp = h2.request(req).await.unwrap();
    let took = start.elapsed();
    // Trailers-Only: HTTP 200, the status in the headers, a gRPC content type.
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.headers()["content-type"], "application/grpc");
    assert_eq!(resp.headers()["grpc-status"], "4");
    assert_eq!(resp.headers()["grpc-message"], "weir-proxy: timeout");
    assert!(
        took >= Duration::from_millis(450) && took < Duration::from_millis(1500),
        "answered after {took:?}"
    );
    assert_eq!(echo.timeouts().len(), 2, "the slow call reached the app");
}

#[tokio::test]
async fn the_policy_timeout_wins_when_smaller_than_the_callers() {
    let (_echo, _a, _b, cfg) = two_sidecars(|c| c.outbound[0].timeout_ms = 300).await;
    let mut c = client(cfg.outbound[0].listen);
    let mut req = tonic::Request::new(Ask {
        delay_ms: 3_000,
        ..Ask::text("slow")
    });
    req.set_timeout(Duration::from_secs(5));
    let start = Instant::now();
    let s = c.say(req).await.expect_err("past the policy's timeout");
    assert_eq!(s.code(), Code::DeadlineExceeded);
    assert!(
        start.elapsed() < Duration::from_millis(1500),
        "{:?}",
        start.elapsed()
    );
    // A gRPC answer, readable by the client: HTTP 200 with the reason named.
    assert_eq!(s.metadata().get("x-weir-reason").unwrap(), "timeout");
}

#[tokio::test]
async fn the_breaker_opens_on_grpc_failures_answered_with_http_200() {
    let echo = EchoServer::start().await;
    let mut cfg = with_grpc_dependency(format!("http://{}", echo.addr));
    cfg.outbound[0].circuit_breaker = Some(CircuitBreakerConfig {
        error_threshold_percentage: 50,
        volume_threshold: 4,
        rolling_window_ms: 10_000,
        buckets: 10,
        reset_timeout_ms: 60_000,
        failure_on: FailureClassConfig {
            status_5xx: true,
            connect_errors: true,
            timeouts: true,
            grpc_statuses: vec![2, 4, 13, 14, 15],
        },
    });
    let _p = proxy(cfg.clone()).await;
    let mut c = client(cfg.outbound[0].listen);

    // NOT_FOUND is an answer of a healthy server: it never opens the breaker.
    for _ in 0..6 {
        let s = c.say(failing(Code::NotFound)).await.unwrap_err();
        assert_eq!(s.code(), Code::NotFound);
    }
    c.say(Ask::text("ok")).await.expect("still closed");
    assert_eq!(echo.calls(), 7);
    // UNAVAILABLE, on HTTP 200 (Trailers-Only), opens it once failures pass 50% of the
    // window: the 8th (8 of 15), not the 7th (7 of 14).
    for _ in 0..8 {
        let s = c.say(failing(Code::Unavailable)).await.unwrap_err();
        assert_eq!(s.message(), "asked to fail: x");
    }
    // ...and the next calls are refused by the sidecar, as gRPC statuses, without reaching
    // the server.
    for _ in 0..3 {
        let s = c.say(Ask::text("ok")).await.unwrap_err();
        assert_eq!(s.code(), Code::Unavailable);
        assert_eq!(s.message(), "weir-proxy: circuit-open");
        assert_eq!(s.metadata().get("x-weir-reason").unwrap(), "circuit-open");
    }
    assert_eq!(echo.calls(), 15);
}

#[tokio::test]
async fn a_status_in_the_trailers_after_messages_counts_for_the_breaker() {
    let echo = EchoServer::start().await;
    let mut cfg = with_grpc_dependency(format!("http://{}", echo.addr));
    cfg.outbound[0].circuit_breaker = Some(CircuitBreakerConfig {
        error_threshold_percentage: 50,
        volume_threshold: 3,
        rolling_window_ms: 10_000,
        buckets: 10,
        reset_timeout_ms: 60_000,
        failure_on: FailureClassConfig {
            status_5xx: true,
            connect_errors: true,
            timeouts: true,
            grpc_statuses: vec![2, 4, 13, 14, 15],
        },
    });
    let _p = proxy(cfg.clone()).await;
    let mut c = client(cfg.outbound[0].listen);
    for _ in 0..3 {
        let mut s = c
            .count(Ask {
                count: 2,
                fail_code: Code::Internal as u32,
                ..Ask::text("s")
            })
            .await
            .unwrap()
            .into_inner();
        assert!(s.message().await.unwrap().is_some());
        assert!(s.message().await.unwrap().is_some());
        assert_eq!(s.message().await.unwrap_err().code(), Code::Internal);
    }
    let s = c.say(Ask::text("ok")).await.unwrap_err();
    assert_eq!(s.message(), "weir-proxy: circuit-open");
}

#[tokio::test]
async fn only_unavailable_is_retried_and_every_method_may_be() {
    let echo = EchoServer::start().await;
    let mut cfg = with_grpc_dependency(format!("http://{}", echo.addr));
    cfg.outbound[0].retry = Some(RetryConfig {
        attempts: 3,
        backoff_base_ms: 10,
        backoff_max_ms: 50,
        retry_non_idempotent: false,
        budget: RetryBudgetConfig {
            ratio: 0.2,
            min_per_second: 100,
            ttl_ms: 10_000,
        },
        grpc_statuses: vec![14],
    });
    let _p = proxy(cfg.clone()).await;
    let mut c = client(cfg.outbound[0].listen);

    // UNAVAILABLE: sent three times (gRPC calls are POSTs; the status, not the method, says
    // whether a call may be sent again).
    let s = c.say(failing(Code::Unavailable)).await.unwrap_err();
    assert_eq!(s.code(), Code::Unavailable);
    assert_eq!(echo.calls(), 3);
    // INTERNAL, RESOURCE_EXHAUSTED, DEADLINE_EXCEEDED: once each.
    for code in [
        Code::Internal,
        Code::ResourceExhausted,
        Code::DeadlineExceeded,
    ] {
        let s = c.say(failing(code)).await.unwrap_err();
        assert_eq!(s.code(), code);
    }
    assert_eq!(echo.calls(), 6);
    // A server stream that fails after its first messages is not retried: they were passed on.
    let mut s = c
        .count(Ask {
            count: 1,
            fail_code: Code::Unavailable as u32,
            ..Ask::text("s")
        })
        .await
        .unwrap()
        .into_inner();
    assert!(s.message().await.unwrap().is_some());
    assert_eq!(s.message().await.unwrap_err().code(), Code::Unavailable);
    assert_eq!(echo.calls(), 7);
    // A client stream passes through the retry copy intact.
    let asks = futures::stream::iter(["a", "b"].map(|t| Ask {
        fail_code: 0,
        ..Ask::text(t)
    }));
    assert_eq!(c.sum(asks).await.unwrap().into_inner().text, "a+b");
    assert_eq!(echo.calls(), 8);
}

#[tokio::test]
async fn refusals_are_grpc_statuses_naming_the_reason() {
    // Nothing listens on the upstream's port: UNAVAILABLE, upstream-connect.
    let cfg = with_grpc_dependency(format!("http://{}", free_addr()));
    let _p = proxy(cfg.clone()).await;
    let s = client(cfg.outbound[0].listen)
        .say(Ask::text("x"))
        .await
        .unwrap_err();
    assert_eq!(s.code(), Code::Unavailable);
    assert_eq!(s.message(), "weir-proxy: upstream-connect");

    // A full bulkhead: RESOURCE_EXHAUSTED.
    let echo = EchoServer::start().await;
    let mut cfg = with_grpc_dependency(format!("http://{}", echo.addr));
    cfg.outbound[0].bulkhead = Some(BulkheadConfig {
        max_concurrent: 1,
        max_queue: 0,
    });
    let _p = proxy(cfg.clone()).await;
    let mut c = client(cfg.outbound[0].listen);
    let mut slow = c.clone();
    let first = tokio::spawn(async move {
        slow.say(Ask {
            delay_ms: 1_000,
            ..Ask::text("slow")
        })
        .await
    });
    assert!(
        weir_testkit::eventually(Duration::from_secs(3), || echo.calls() == 1).await,
        "the slow call reached the server"
    );
    let s = c.say(Ask::text("second")).await.unwrap_err();
    assert_eq!(s.code(), Code::ResourceExhausted);
    assert_eq!(s.message(), "weir-proxy: bulkhead-full");
    assert!(first.await.unwrap().is_ok());

    // The inbound rate limit: RESOURCE_EXHAUSTED, rate-limited.
    let echo = EchoServer::start().await;
    let mut cfg = base_config(echo.addr);
    cfg.inbound.app_protocol = WireProtocol::Http2;
    cfg.inbound.rate_limit = Some(RateLimitConfig {
        requests_per_second: 0.1,
        burst: 1,
    });
    let _p = proxy(cfg.clone()).await;
    let mut c = client(cfg.inbound.listen);
    c.say(Ask::text("first")).await.expect("within the burst");
    let s = c.say(Ask::text("second")).await.unwrap_err();
    assert_eq!(s.code(), Code::ResourceExhausted);
    assert_eq!(s.message(), "weir-proxy: rate-limited");
    assert_eq!(s.metadata().get("x-weir-reason").unwrap(), "rate-limited");
}

#[tokio::test]
async fn statuses_are_configurable_and_the_fallback_answers_grpc_in_grpc() {
    let echo = EchoServer::start().await;
    let mut cfg = with_grpc_dependency(format!("http://{}", echo.addr));
    // Retried: RESOURCE_EXHAUSTED only. Failures: NOT_FOUND only.
    cfg.outbound[0].retry = Some(RetryConfig {
        attempts: 2,
        backoff_base_ms: 5,
        backoff_max_ms: 10,
        retry_non_idempotent: false,
        budget: RetryBudgetConfig {
            ratio: 0.2,
            min_per_second: 100,
            ttl_ms: 10_000,
        },
        grpc_statuses: vec![Code::ResourceExhausted as u16],
    });
    cfg.outbound[0].circuit_breaker = Some(CircuitBreakerConfig {
        error_threshold_percentage: 50,
        volume_threshold: 3,
        rolling_window_ms: 10_000,
        buckets: 10,
        reset_timeout_ms: 60_000,
        failure_on: FailureClassConfig {
            status_5xx: true,
            connect_errors: true,
            timeouts: true,
            grpc_statuses: vec![Code::NotFound as u16],
        },
    });
    // gRPC callers get an empty, successful answer; HTTP callers the JSON body.
    cfg.outbound[0].fallback = Some(FallbackConfig {
        status: 200,
        body: r#"{"items":[]}"#.into(),
        content_type: "application/json".into(),
        grpc_status: Some(0),
        grpc_message: String::new(),
    });
    let _p = proxy(cfg.clone()).await;
    let mut c = client(cfg.outbound[0].listen);

    assert_eq!(
        c.say(failing(Code::ResourceExhausted))
            .await
            .unwrap_err()
            .code(),
        Code::ResourceExhausted
    );
    assert_eq!(echo.calls(), 2, "RESOURCE_EXHAUSTED was retried once");
    // UNAVAILABLE is neither retried nor (here) a failure.
    for _ in 0..3 {
        assert_eq!(
            c.say(failing(Code::Unavailable)).await.unwrap_err().code(),
            Code::Unavailable
        );
    }
    assert_eq!(echo.calls(), 5);
    // NOT_FOUND is. The breaker saw 5 calls so far (each attempt is one): 5 of 10 is not past
    // 50%, 6 of 11 is.
    for _ in 0..6 {
        assert_eq!(
            c.say(failing(Code::NotFound)).await.unwrap_err().code(),
            Code::NotFound
        );
    }
    assert_eq!(echo.calls(), 11);

    // Open: a server stream ends at once, empty and OK, from the fallback.
    let mut s = c
        .count(Ask {
            count: 3,
            ..Ask::text("n")
        })
        .await
        .expect("the fallback's OK")
        .into_inner();
    assert!(s.message().await.unwrap().is_none());
    assert_eq!(
        echo.calls(),
        11,
        "the open breaker kept the call from the server"
    );
    // An HTTP caller of the same dependency gets the HTTP fallback.
    let r = get(
        &common::client(),
        format!("http://{}/items", cfg.outbound[0].listen),
    )
    .await;
    assert_eq!((r.status, r.body.as_str()), (200, r#"{"items":[]}"#));
    assert_eq!(r.headers["x-weir-fallback"], "circuit-open");
}

#[tokio::test]
async fn a_long_stream_outlives_the_timeout_and_a_stalled_one_ends_idle() {
    // The call's timeout (300 ms) bounds the wait for the answer's headers, not the stream:
    // eight messages 100 ms apart arrive in full. A gap of a second is past the idle time.
    let (_echo, _a, _b, cfg) = two_sidecars(|c| {
        c.outbound[0].timeout_ms = 300;
        c.outbound[0].stream_idle_timeout_ms = 250;
    })
    .await;
    let mut c = client(cfg.outbound[0].listen);
    let mut s = c
        .count(Ask {
            count: 8,
            delay_ms: 100,
            ..Ask::text("long")
        })
        .await
        .unwrap()
        .into_inner();
    let mut n = 0;
    while let Some(a) = s.message().await.expect("a healthy stream is not cut") {
        assert_eq!(a.text, format!("long#{n}"));
        n += 1;
    }
    assert_eq!(n, 8);

    let mut s = c
        .count(Ask {
            count: 2,
            delay_ms: 1_000,
            ..Ask::text("stall")
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(s.message().await.unwrap().unwrap().text, "stall#0");
    let start = Instant::now();
    let status = s.message().await.unwrap_err();
    assert_eq!(status.code(), Code::DeadlineExceeded);
    assert_eq!(status.message(), "weir-proxy: stream-idle-timeout");
    assert!(
        start.elapsed() < Duration::from_millis(900),
        "ended {:?} after the last message",
        start.elapsed()
    );
    let m = get(
        &common::client(),
        format!("http://{}/metrics", cfg.admin.listen),
    )
    .await
    .body;
    assert!(
        m.contains(r#"weir_rejections_total{direction="outbound",dependency="echo",reason="stream-idle-timeout"} 1"#),
        "{m}"
    );
}
