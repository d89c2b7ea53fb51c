//! The real binary's lifecycle: config validation at start, reload on change, SIGTERM drain, and
//! OTLP span export to a receiver that decodes the protobuf.

mod common;

use bytes::Bytes;
use common::otlp::{self, Span, decode_export};
use common::*;
use http::Request;
use http_body_util::{BodyExt, Full};
use std::process::Command;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

#[test]
fn invalid_config_exits_2_naming_the_field() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("proxy.json");
    let mut cfg = base_config(free_addr());
    let mut dep = dependency("users", "http://users:80".into());
    dep.timeout_ms = 0;
    cfg.outbound.push(dep);
    std::fs::write(&path, serde_json::to_string(&cfg).unwrap()).unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_weir-proxy"))
        .arg("--config")
        .arg(&path)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("outbound[0].timeoutMs"), "{stderr}");

    std::fs::write(&path, "{not json").unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_weir-proxy"))
        .env("WEIR_PROXY_CONFIG", &path)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2), "the env var names the file");
    assert!(String::from_utf8_lossy(&out.stderr).contains("line 1 column"));

    let out = Command::new(env!("CARGO_BIN_EXE_weir-proxy"))
        .arg("--config")
        .arg(dir.path().join("missing.json"))
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let out = Command::new(env!("CARGO_BIN_EXE_weir-proxy"))
        .arg("--bogus")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn listener_already_in_use_exits_1() {
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let mut cfg = base_config(free_addr());
    cfg.inbound.listen = taken.local_addr().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("proxy.json");
    std::fs::write(&path, serde_json::to_string(&cfg).unwrap()).unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_weir-proxy"))
        .arg("--config")
        .arg(&path)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reload_applies_valid_changes_refuses_invalid_ones_and_keeps_connections() {
    let app = upstream(|_, _| async { respond(200, "app") }).await;
    let users = upstream(|_, _| async { respond(200, "users") }).await;
    let proxy = proxy(base_config(app.addr)).await;

    // A keep-alive connection opened before the reload.
    let stream = tokio::net::TcpStream::connect(proxy.config.inbound.listen)
        .await
        .unwrap();
    let (mut sender, conn) =
        hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream))
            .await
            .unwrap();
    tokio::spawn(conn);
    async fn call(s: &mut hyper::client::conn::http1::SendRequest<Full<Bytes>>) -> u16 {
        s.ready().await.expect("the connection is still open");
        let req = Request::get("/")
            .header("host", "x")
            .body(Full::default())
            .unwrap();
        let resp = s.send_request(req).await.unwrap();
        let status = resp.status().as_u16();
        resp.into_body().collect().await.unwrap();
        status
    }
    assert_eq!(call(&mut sender).await, 200);

    // Valid change: a new dependency and a tighter inbound policy.
    let mut cfg = proxy.config.clone();
    cfg.outbound.push(dependency("users", users.url()));
    cfg.inbound.rate_limit = Some(weir_crds::proxy::RateLimitConfig {
        requests_per_second: 0.001,
        burst: 1,
    });
    proxy.write_config(&serde_json::to_string(&cfg).unwrap());
    proxy.wait_log(|v| v["message"] == "config reloaded").await;
    let c = client();
    let o = cfg.outbound[0].listen;
    assert_eq!(
        get(&c, format!("http://{o}/")).await.body,
        "users",
        "the new listener serves"
    );
    let shown: weir_crds::proxy::ProxyConfig =
        serde_json::from_str(&get(&c, proxy.admin_url("/config")).await.body).unwrap();
    assert_eq!(shown, cfg);
    assert_eq!(
        call(&mut sender).await,
        200,
        "the old connection is still open and uses the new policy"
    );
    assert_eq!(call(&mut sender).await, 429, "burst of 1 spent");

    // Invalid change: refused, logged, the previous config stays.
    let mut bad = serde_json::to_value(&cfg).unwrap();
    bad["outbound"][0]["retry"] = serde_json::json!({"attempts": 0, "backoffBaseMs": 1, "backoffMaxMs": 2, "budget": {"ratio": 0.2, "minPerSecond": 1, "ttlMs": 1000}});
    proxy.write_config(&bad.to_string());
    let line = proxy
        .wait_log(|v| v["message"] == "invalid config refused; keeping the previous one")
        .await;
    assert_eq!(line["field"], "outbound[0].retry.attempts");
    let shown: weir_crds::proxy::ProxyConfig =
        serde_json::from_str(&get(&c, proxy.admin_url("/config")).await.body).unwrap();
    assert_eq!(shown, cfg);
    assert_eq!(get(&c, format!("http://{o}/")).await.status, 200);
    assert_eq!(
        proxy
            .metric(r#"weir_config_reloads_total{result="failure"}"#)
            .await,
        1.0
    );
    assert_eq!(
        proxy
            .metric(r#"weir_config_reloads_total{result="success"}"#)
            .await,
        1.0
    );

    // Removing the dependency stops its listener.
    let mut fewer = cfg.clone();
    fewer.outbound.clear();
    proxy.write_config(&serde_json::to_string(&fewer).unwrap());
    let deadline = Instant::now() + Duration::from_secs(5);
    while tokio::net::TcpStream::connect(o).await.is_ok() {
        assert!(Instant::now() < deadline, "listener still accepting");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_finishes_in_flight_requests_then_exits_0() {
    let app = upstream(|_, _| async {
        tokio::time::sleep(Duration::from_millis(800)).await;
        respond(200, "finished")
    })
    .await;
    let mut cfg = base_config(app.addr);
    cfg.shutdown_grace_ms = 5_000;
    let mut proxy = proxy(cfg).await;
    let c = client();
    let inflight = tokio::spawn({
        let (c, u) = (c.clone(), proxy.inbound_url("/"));
        async move { get(&c, u).await }
    });
    tokio::time::sleep(Duration::from_millis(200)).await;
    proxy.sigterm();
    tokio::time::sleep(Duration::from_millis(100)).await;
    // No longer accepting.
    let refused = tokio::net::TcpStream::connect(proxy.config.inbound.listen).await;
    assert!(
        refused.is_err(),
        "new connections are refused while draining"
    );
    let a = inflight.await.unwrap();
    assert_eq!(a.status, 200);
    assert_eq!(a.body, "finished");
    let status = tokio::task::spawn_blocking(move || proxy.wait_exit(Duration::from_secs(5)))
        .await
        .unwrap();
    assert_eq!(status.code(), Some(0));
}

/// Issue #15, 7: the admin listener stopped at SIGTERM with the others, so `/readyz` could not
/// say 503 (the kubelet saw connection refused) and `/metrics` went dark for the whole drain.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admin_listener_answers_until_the_drain_ends() {
    let app = upstream(|req, _| async move {
        if req.uri().path() == "/slow" {
            tokio::time::sleep(Duration::from_millis(1500)).await;
        }
        respond(200, "finished")
    })
    .await;
    let mut cfg = base_config(app.addr);
    cfg.inbound.readiness_path = Some("/ready".into());
    cfg.shutdown_grace_ms = 5_000;
    let mut proxy = proxy(cfg).await;
    let c = client();
    let inflight = tokio::spawn({
        let (c, u) = (c.clone(), proxy.inbound_url("/slow"));
        async move { get(&c, u).await }
    });
    tokio::time::sleep(Duration::from_millis(200)).await;
    proxy.sigterm();
    proxy.wait_log(|v| v["message"] == "draining").await;
    assert!(
        tokio::net::TcpStream::connect(proxy.config.inbound.listen)
            .await
            .is_err(),
        "the inbound listener no longer accepts"
    );
    // While the request is in flight, on new connections each time.
    let fresh = client();
    let readyz = get(&fresh, proxy.admin_url("/readyz")).await;
    assert_eq!(readyz.status, 503);
    assert_eq!(readyz.body, "not ready: draining\n");
    assert_eq!(
        get(&client(), proxy.admin_url("/healthz")).await.status,
        200
    );
    let metrics = get(&client(), proxy.admin_url("/metrics")).await;
    assert_eq!(metrics.status, 200);
    assert!(metrics.body.contains("weir_requests_total"));
    let probe = get(&client(), proxy.admin_url("/app-health/readiness")).await;
    assert_eq!(
        (probe.status, probe.body.as_str()),
        (200, "app readiness: 200\n")
    );
    assert!(!inflight.is_finished(), "all of that during the drain");

    let a = inflight.await.unwrap();
    assert_eq!((a.status, a.body.as_str()), (200, "finished"));
    let status = tokio::task::spawn_blocking(move || {
        let status = proxy.wait_exit(Duration::from_secs(5));
        (status, proxy)
    })
    .await
    .unwrap();
    assert_eq!(status.0.code(), Some(0));
    assert!(
        tokio::net::TcpStream::connect(status.1.config.admin.listen)
            .await
            .is_err(),
        "the admin listener closes with the process"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_gives_up_after_the_grace_period() {
    let app = upstream(|_, _| async {
        tokio::time::sleep(Duration::from_secs(30)).await;
        respond(200, "never")
    })
    .await;
    let mut cfg = base_config(app.addr);
    cfg.inbound.timeout_ms = 60_000;
    cfg.shutdown_grace_ms = 300;
    let mut proxy = proxy(cfg).await;
    let c = client();
    let u = proxy.inbound_url("/");
    let _hanging = tokio::spawn(async move {
        c.request(Request::get(u).body(Full::default()).unwrap())
            .await
    });
    tokio::time::sleep(Duration::from_millis(200)).await;
    let start = Instant::now();
    proxy.sigterm();
    let status = tokio::task::spawn_blocking(move || proxy.wait_exit(Duration::from_secs(5)))
        .await
        .unwrap();
    assert_eq!(status.code(), Some(0));
    let took = start.elapsed();
    assert!(
        took >= Duration::from_millis(250) && took < Duration::from_secs(3),
        "{took:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn spans_are_exported_over_otlp_http_in_batches() {
    let collector = otlp::Collector::start().await;
    let received = collector.received.clone();
    let users = upstream(|_, _| async { respond(503, "down") }).await;
    let app = upstream(|_, _| async { respond(200, "app") }).await;
    let mut cfg = base_config(app.addr);
    cfg.tracing.otlp_endpoint = Some(collector.server.url());
    cfg.tracing.sampling_ratio = 1.0;
    cfg.outbound.push(dependency("users", users.url()));
    let proxy = proxy(cfg).await;
    let c = client();
    for _ in 0..5 {
        assert_eq!(get(&c, proxy.inbound_url("/orders/1")).await.status, 200);
    }
    let tp = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01";
    let a = send(
        &c,
        Request::get(proxy.outbound_url("users", "/u"))
            .header("traceparent", tp)
            .body(Full::default())
            .unwrap(),
    )
    .await;
    assert_eq!(a.status, 503);

    let spans = collector.wait_for(6).await;
    {
        let r = received.lock().unwrap();
        assert!(
            r.iter()
                .all(|(p, ct, _)| p == "/v1/traces" && ct == "application/x-protobuf")
        );
        assert!(
            r.len() < 6,
            "batched: {} requests for {} spans",
            r.len(),
            spans.len()
        );
    }
    let server: Vec<&Span> = spans.iter().filter(|s| s.kind == 2).collect();
    assert_eq!(server.len(), 5);
    assert!(
        server
            .iter()
            .all(|s| s.service == "orders" && s.name == "GET" && s.parent.is_empty())
    );
    assert!(
        server[0]
            .attrs
            .contains(&("url.path".into(), "/orders/1".into()))
    );
    assert!(
        server[0]
            .attrs
            .contains(&("http.response.status_code".into(), "200".into()))
    );
    let client_span = spans.iter().find(|s| s.kind == 3).unwrap();
    assert_eq!(
        client_span.trace_id, "0af7651916cd43dd8448eb211c80319c",
        "continued trace"
    );
    assert_eq!(
        client_span.parent, "b7ad6b7169203331",
        "child of the caller's span"
    );
    assert_eq!(client_span.name, "GET users");
    assert!(
        client_span
            .attrs
            .contains(&("http.response.status_code".into(), "503".into()))
    );
    assert!(proxy.metric("weir_spans_exported_total").await >= 6.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sampling_ratio_zero_exports_only_sampled_parents() {
    let received = Arc::new(Mutex::new(0usize));
    let r2 = received.clone();
    let collector = upstream(move |req, _| {
        let r2 = r2.clone();
        async move {
            let body = req.into_body().collect().await.unwrap().to_bytes();
            *r2.lock().unwrap() += decode_export(&body).len();
            respond(200, "")
        }
    })
    .await;
    let app = upstream(|_, _| async { respond(200, "app") }).await;
    let mut cfg = base_config(app.addr);
    cfg.tracing.otlp_endpoint = Some(collector.url());
    cfg.tracing.sampling_ratio = 0.0;
    let proxy = proxy(cfg).await;
    let c = client();
    for _ in 0..10 {
        get(&c, proxy.inbound_url("/")).await;
    }
    // A caller that sampled its trace is respected.
    let tp = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01";
    send(
        &c,
        Request::get(proxy.inbound_url("/"))
            .header("traceparent", tp)
            .body(Full::default())
            .unwrap(),
    )
    .await;
    tokio::time::sleep(Duration::from_millis(600)).await;
    assert_eq!(*received.lock().unwrap(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn queued_spans_are_flushed_at_sigterm() {
    let received = Arc::new(Mutex::new(Vec::new()));
    let r2 = received.clone();
    let collector = upstream(move |req, _| {
        let r2 = r2.clone();
        async move {
            let body = req.into_body().collect().await.unwrap().to_bytes();
            r2.lock().unwrap().extend(decode_export(&body));
            respond(200, "")
        }
    })
    .await;
    let app = upstream(|_, _| async { respond(200, "app") }).await;
    let mut cfg = base_config(app.addr);
    cfg.tracing.otlp_endpoint = Some(collector.url());
    cfg.tracing.sampling_ratio = 1.0;
    // Spans would wait a minute for the next batch.
    let mut proxy = proxy_with(cfg, &["--otlp-flush-ms", "60000"]).await;
    for _ in 0..3 {
        get(&client(), proxy.inbound_url("/")).await;
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(received.lock().unwrap().is_empty(), "not yet exported");
    proxy.sigterm();
    let status = tokio::task::spawn_blocking(move || proxy.wait_exit(Duration::from_secs(5)))
        .await
        .unwrap();
    assert_eq!(status.code(), Some(0));
    assert_eq!(received.lock().unwrap().len(), 3, "exported before exit");
}
