//! gRPC through the real `weir-proxy` binary, with tonic on both ends (the test kit's
//! `weir.test.Echo`): every call kind through two sidecars, and each policy in gRPC terms:
//! deadlines from `grpc-timeout`, the breaker and the retries judging `grpc-status` rather than
//! the HTTP status, and the proxy's refusals answered as gRPC statuses; calls counted and traced
//! by service, method and status; the app probed with the gRPC health protocol; an edge routing
//! gRPC by service and answering a missing token UNAUTHENTICATED.

mod common;
mod edge_support;

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
    // A client stream answered UNAVAILABLE is sent again from the copy while it fits the retry
    // copy (64 KiB), and not at all once it does not: the messages already sent are gone.
    let small = futures::stream::iter([Ask::text("a"), failing(Code::Unavailable)]);
    assert_eq!(c.sum(small).await.unwrap_err().code(), Code::Unavailable);
    assert_eq!(echo.calls(), 11, "a small client stream is retried");
    // (The failing message is short: its text becomes the grpc-message header.)
    let big = futures::stream::iter(
        (0..3)
            .map(|i| Ask::text(&format!("{i}").repeat(40_000)))
            .chain([failing(Code::Unavailable)]),
    );
    let e = c.sum(big).await.unwrap_err();
    assert_eq!(e.code(), Code::Unavailable, "{e:?}");
    assert_eq!(
        echo.calls(),
        12,
        "a client stream beyond the copy is sent once"
    );
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

#[tokio::test]
async fn grpc_calls_are_counted_and_traced_by_service_method_and_status() {
    let collector = common::otlp::Collector::start().await;
    let otlp = collector.server.url();
    let (_echo, a, b, cfg) = two_sidecars(|c| {
        c.tracing.otlp_endpoint = Some(otlp);
        c.tracing.sampling_ratio = 1.0;
    })
    .await;
    let mut c = client(cfg.outbound[0].listen);
    c.say(Ask::text("one")).await.unwrap();
    c.say(Ask::text("two")).await.unwrap();
    let e = c.say(failing(Code::Unavailable)).await.unwrap_err();
    assert_eq!(e.code(), Code::Unavailable);
    // A stream whose status comes in the trailers, after its messages.
    let mut s = c
        .count(Ask {
            count: 2,
            fail_code: Code::DataLoss as u32,
            ..Ask::text("n")
        })
        .await
        .unwrap()
        .into_inner();
    while let Ok(Some(_)) = s.message().await {}
    // A stream the caller walks away from after one message.
    let mut s = c
        .count(Ask {
            count: 1000,
            delay_ms: 50,
            ..Ask::text("long")
        })
        .await
        .unwrap()
        .into_inner();
    s.message().await.unwrap().unwrap();
    drop(s);
    // A method the server does not have: UNIMPLEMENTED, counted as `other`.
    let h2 = hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
        .http2_only(true)
        .build_http::<http_body_util::Full<bytes::Bytes>>();
    let req = http::Request::post(format!(
        "http://{}/weir.test.Echo/Nope",
        cfg.outbound[0].listen
    ))
    .header("content-type", "application/grpc")
    .header("te", "trailers")
    .body(http_body_util::Full::new(weir_testkit::grpc::framed(
        &Ask::text("?"),
    )))
    .unwrap();
    let resp = h2.request(req).await.unwrap();
    assert_eq!(resp.headers()["grpc-status"], "12");

    let series = |dir: &str, dep: &str, svc: &str, m: &str, st: &str| {
        format!(
            r#"weir_grpc_requests_total{{direction="{dir}",dependency="{dep}",grpc_service="{svc}",grpc_method="{m}",grpc_status="{st}"}}"#
        )
    };
    let echo = "weir.test.Echo";
    for (proxy, dir, dep) in [(&a, "outbound", "echo"), (&b, "inbound", "")] {
        proxy
            .wait_metric(&series(dir, dep, echo, "Say", "OK"), 2.0)
            .await;
        proxy
            .wait_metric(&series(dir, dep, echo, "Say", "UNAVAILABLE"), 1.0)
            .await;
        proxy
            .wait_metric(&series(dir, dep, echo, "Count", "DATA_LOSS"), 1.0)
            .await;
        proxy
            .wait_metric(&series(dir, dep, "other", "other", "UNIMPLEMENTED"), 1.0)
            .await;
    }
    // The caller's going away ends the call on the caller's side as CANCELLED.
    a.wait_metric(&series("outbound", "echo", echo, "Count", "CANCELLED"), 1.0)
        .await;
    let text = a.metrics().await;
    assert!(
        text.contains(&format!(
            r#"weir_grpc_request_duration_seconds_count{{direction="outbound",dependency="echo",grpc_service="{echo}",grpc_method="Say"}} 3"#
        )),
        "{text}"
    );

    // Client spans: named service/method, with the rpc.* attributes; an error unless OK.
    let spans = collector.wait_for(6).await;
    let client_spans: Vec<_> = spans.iter().filter(|s| s.kind == 3).collect();
    let say: Vec<_> = client_spans
        .iter()
        .filter(|s| s.name == "weir.test.Echo/Say")
        .collect();
    assert_eq!(say.len(), 3, "{spans:#?}");
    for s in &say {
        assert_eq!(s.attr("rpc.system"), Some("grpc"));
        assert_eq!(s.attr("rpc.service"), Some(echo));
        assert_eq!(s.attr("rpc.method"), Some("Say"));
    }
    let by_status = |code: &str| {
        say.iter()
            .filter(|s| s.attr("rpc.grpc.status_code") == Some(code))
            .count()
    };
    assert_eq!((by_status("0"), by_status("14")), (2, 1), "{say:#?}");
    let failed = say
        .iter()
        .find(|s| s.attr("rpc.grpc.status_code") == Some("14"))
        .unwrap();
    assert_eq!(
        (failed.status_code, failed.status_message.as_str()),
        (2, "UNAVAILABLE")
    );
    let ok = say
        .iter()
        .find(|s| s.attr("rpc.grpc.status_code") == Some("0"))
        .unwrap();
    assert_eq!(ok.status_code, 0, "an OK call is no error");
    let count = client_spans
        .iter()
        .find(|s| s.name == "weir.test.Echo/Count" && s.attr("rpc.grpc.status_code") == Some("15"))
        .expect("the stream's span carries the status of its trailers");
    assert_eq!(count.status_code, 2);
}

#[tokio::test]
async fn a_grpc_app_is_probed_with_the_grpc_health_protocol() {
    let echo = EchoServer::start().await;
    let mut cfg = base_config(echo.addr);
    cfg.inbound.app_protocol = WireProtocol::Http2;
    cfg.inbound.readiness_grpc_service = Some(String::new());
    cfg.inbound.liveness_grpc_service = Some("weir.test.Echo".into());
    let p = proxy(cfg.clone()).await;
    let probe = |which: &'static str| {
        let url = p.admin_url(&format!("/app-health/{which}"));
        async move { weir_testkit::proxy::http_get(&url).await.unwrap() }
    };
    assert_eq!(
        probe("readiness").await,
        (200, "app readiness: SERVING\n".into())
    );
    assert_eq!(
        probe("liveness").await,
        (200, "app liveness: SERVING\n".into())
    );

    echo.set_serving("", false).await;
    assert_eq!(
        probe("readiness").await,
        (503, "app readiness: NOT_SERVING\n".into())
    );
    assert_eq!(
        probe("liveness").await.0,
        200,
        "the service asked about still serves"
    );
    echo.set_serving("", true).await;
    assert_eq!(probe("readiness").await.0, 200);

    // A service the app does not know: its health service says NOT_FOUND.
    cfg.inbound.liveness_grpc_service = Some("shop.Nope".into());
    p.write_config(&serde_json::to_string(&cfg).unwrap());
    assert!(
        weir_testkit::eventually_async(Duration::from_secs(5), || async {
            probe("liveness").await
                == (
                    503,
                    "app liveness: the app knows no service \"shop.Nope\" (NOT_FOUND)\n".into(),
                )
        })
        .await,
        "{:?}",
        probe("liveness").await
    );
    // No app listening: the probe fails naming why, never hangs.
    cfg.inbound.app = free_addr();
    p.write_config(&serde_json::to_string(&cfg).unwrap());
    assert!(
        weir_testkit::eventually_async(Duration::from_secs(5), || async {
            probe("readiness").await.0 == 502
        })
        .await,
        "{:?}",
        probe("readiness").await
    );
}

/// An edge in front of a gRPC service: routed by the `/package.Service/` prefix like any route,
/// the JWT read from the `authorization` metadata, a missing or bad token UNAUTHENTICATED.
#[tokio::test]
async fn the_edge_routes_grpc_by_service_and_checks_its_token() {
    use edge_support::*;
    let dir = tempfile::tempdir().unwrap();
    let key_file = dir.path().join("identity-key");
    std::fs::write(&key_file, IDENTITY_KEY).unwrap();
    let identity = |sign_for: &[&str]| IdentityConfig {
        key_file: key_file.display().to_string(),
        sign_for: sign_for.iter().map(|s| s.to_string()).collect(),
    };
    let echo = EchoServer::start().await;
    let mut cfg_b = base_config(echo.addr);
    cfg_b.service = "echo".into();
    cfg_b.inbound.app_protocol = WireProtocol::Http2;
    cfg_b.identity = Some(identity(&[]));
    let b = proxy(cfg_b.clone()).await;

    let mut cfg = inline_edge(free_addr());
    let mut dep = dependency("echo", format!("http://{}", b.config.inbound.listen));
    dep.protocol = WireProtocol::Http2;
    cfg.outbound = vec![dep];
    cfg.identity = Some(identity(&["echo"]));
    let edge = cfg.edge.as_mut().unwrap();
    edge.app = false;
    edge.routes = vec![EdgeRouteConfig {
        path_prefix: "/weir.test.Echo".into(),
        dependency: "echo".into(),
        strip_prefix: false,
    }];
    let gw = proxy(cfg.clone()).await;
    let mut c = client(cfg.inbound.listen);

    // No token, a bad one: UNAUTHENTICATED, the app never called.
    let e = c.say(Ask::text("hi")).await.unwrap_err();
    assert_eq!(e.code(), Code::Unauthenticated, "{e:?}");
    assert_eq!(e.message(), "weir-proxy: unauthorized");
    assert_eq!(e.metadata().get("x-weir-reason").unwrap(), "unauthorized");
    let with = |token: &str, ask: Ask| {
        let mut r = tonic::Request::new(ask);
        r.metadata_mut()
            .insert("authorization", format!("Bearer {token}").parse().unwrap());
        r
    };
    let bad = rsa("b").token(Some("a"), &claims("u1", "buyer"));
    let e = c.say(with(&bad, Ask::text("hi"))).await.unwrap_err();
    assert_eq!(e.code(), Code::Unauthenticated);
    assert_eq!(echo.calls(), 0);

    // A valid token: routed by the service's prefix, unary and streaming.
    let t = rsa("a").token(Some("a"), &claims("u1", "buyer"));
    let r = c.say(with(&t, Ask::text("hi"))).await.expect("routed");
    assert_eq!(r.into_inner().text, "hi");
    let mut s = c
        .count(with(
            &t,
            Ask {
                count: 3,
                ..Ask::text("n")
            },
        ))
        .await
        .unwrap()
        .into_inner();
    let mut got = Vec::new();
    while let Some(a) = s.message().await.unwrap() {
        got.push(a.text);
    }
    assert_eq!(got, ["n#0", "n#1", "n#2"]);
    assert_eq!(echo.calls(), 2);

    // A service no route names: UNIMPLEMENTED, as a gRPC server answers an unknown method.
    let h2 = hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
        .http2_only(true)
        .build_http::<http_body_util::Full<bytes::Bytes>>();
    let req = http::Request::post(format!("http://{}/shop.Other/Call", cfg.inbound.listen))
        .header("content-type", "application/grpc")
        .header("te", "trailers")
        .header("authorization", format!("Bearer {t}"))
        .body(http_body_util::Full::new(weir_testkit::grpc::framed(
            &Ask::text("?"),
        )))
        .unwrap();
    let resp = h2.request(req).await.unwrap();
    assert_eq!(
        (resp.status().as_u16(), &resp.headers()["grpc-status"]),
        (200, &http::HeaderValue::from(12u16)),
        "{:?}",
        resp.headers()
    );
    drop(gw);
}
