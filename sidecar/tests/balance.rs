//! Per-endpoint balancing and outlier ejection through the real `weir-proxy`: one dependency
//! whose endpoints are real HTTP servers on distinct loopback addresses (127.0.0.2, .3, …,
//! one port), listed in the sidecar's config as discovery's answer (`endpoints.addresses`;
//! a reload is a new answer). DNS discovery itself: `endpoints.dns` through the system resolver.

mod common;

use common::*;
use http::Request;
use http_body_util::Full;
use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::Duration;
use weir_crds::proxy::{BalanceAlgorithm, EndpointsConfig, OutboundConfig, ProxyConfig};

/// One endpoint: a real server on `127.0.0.<i>:<port>` that counts its requests, waits
/// `delay_ms` and answers `status`, both changeable while it runs.
struct Endpoint {
    addr: SocketAddr,
    hits: Arc<AtomicUsize>,
    delay_ms: Arc<AtomicU64>,
    status: Arc<AtomicUsize>,
    _task: tokio::task::JoinHandle<()>,
}

impl Endpoint {
    fn hits(&self) -> usize {
        self.hits.load(Ordering::SeqCst)
    }
    fn set_status(&self, s: u16) {
        self.status.store(usize::from(s), Ordering::SeqCst);
    }
    fn set_delay(&self, d: Duration) {
        self.delay_ms.store(d.as_millis() as u64, Ordering::SeqCst);
    }
}

impl Drop for Endpoint {
    fn drop(&mut self) {
        self._task.abort();
    }
}

/// Endpoints on 127.0.0.2 … 127.0.0.(n+1), all on one port (as pods of one Service are).
async fn endpoints(n: u8) -> Vec<Endpoint> {
    'port: loop {
        let port = free_port();
        let mut out = Vec::new();
        for i in 0..n {
            let bind = SocketAddr::from(([127, 0, 0, 2 + i], port));
            if std::net::TcpListener::bind(bind).is_err() {
                continue 'port;
            }
            let hits = Arc::new(AtomicUsize::new(0));
            let delay_ms = Arc::new(AtomicU64::new(0));
            let status = Arc::new(AtomicUsize::new(200));
            let (h, d, s) = (hits.clone(), delay_ms.clone(), status.clone());
            let (addr, task) = weir_testkit::serve_at(bind, move |_req| {
                let (h, d, s) = (h.clone(), d.clone(), s.clone());
                async move {
                    h.fetch_add(1, Ordering::SeqCst);
                    let delay = d.load(Ordering::SeqCst);
                    if delay > 0 {
                        tokio::time::sleep(Duration::from_millis(delay)).await;
                    }
                    let status = s.load(Ordering::SeqCst) as u16;
                    let mut r = respond(200, "");
                    *r.status_mut() = http::StatusCode::from_u16(status).unwrap();
                    r
                }
            })
            .await;
            out.push(Endpoint {
                addr,
                hits,
                delay_ms,
                status,
                _task: task,
            });
        }
        return out;
    }
}

fn free_port() -> u16 {
    weir_testkit::free_port()
}

/// A caller's sidecar with one dependency, `backend`, over `eps`; `upstream` by name leads
/// nowhere, so every answer shows the balancer at work.
fn config(eps: &[Endpoint], tune: impl FnOnce(&mut OutboundConfig)) -> ProxyConfig {
    let mut cfg = base_config(free_addr());
    let mut d = dependency("backend", "http://127.0.0.1:1".into());
    d.endpoints = Some(EndpointsConfig {
        dns: None,
        addresses: eps.iter().map(|e| e.addr).collect(),
        refresh_ms: 5_000,
    });
    d.load_balancer.slow_start_ms = 0;
    tune(&mut d);
    cfg.outbound.push(d);
    cfg
}

/// One retry after 1 ms, never held back by the budget: each failed call is tried again once.
fn one_quick_retry() -> weir_crds::proxy::RetryConfig {
    weir_crds::proxy::RetryConfig {
        attempts: 2,
        backoff_base_ms: 1,
        backoff_max_ms: 1,
        retry_non_idempotent: false,
        budget: weir_crds::proxy::RetryBudgetConfig {
            ratio: 1.0,
            min_per_second: 1000,
            ttl_ms: 10_000,
        },
        grpc_statuses: vec![14],
    }
}

/// Sends `n` GETs, `concurrency` at a time; the statuses seen, by count.
async fn load(p: &Proxy, n: usize, concurrency: usize) -> BTreeMap<u16, usize> {
    let c = client();
    let url = p.outbound_url("backend", "/work");
    let next = Arc::new(AtomicUsize::new(0));
    let mut tasks = Vec::new();
    for _ in 0..concurrency {
        let (c, url, next) = (c.clone(), url.clone(), next.clone());
        tasks.push(tokio::spawn(async move {
            let mut seen = BTreeMap::new();
            while next.fetch_add(1, Ordering::SeqCst) < n {
                let a = send(&c, Request::get(&url).body(Full::default()).unwrap()).await;
                *seen.entry(a.status).or_insert(0) += 1;
            }
            seen
        }));
    }
    let mut all = BTreeMap::new();
    for t in tasks {
        for (s, k) in t.await.unwrap() {
            *all.entry(s).or_insert(0) += k;
        }
    }
    all
}

async fn endpoints_view(p: &Proxy) -> serde_json::Value {
    let (status, body) = weir_testkit::proxy::http_get(&p.admin_url("/endpoints"))
        .await
        .unwrap();
    assert_eq!(status, 200, "{body}");
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    v["backend"].clone()
}

fn health_of(view: &serde_json::Value, addr: SocketAddr) -> String {
    view.as_array()
        .unwrap()
        .iter()
        .find(|e| e["address"] == addr.to_string())
        .map(|e| e["health"].as_str().unwrap().to_string())
        .unwrap_or_else(|| "absent".into())
}

#[tokio::test]
async fn traffic_spreads_and_an_endpoint_ten_times_slower_gets_a_small_share() {
    let eps = endpoints(3).await;
    for e in &eps {
        e.set_delay(Duration::from_millis(5));
    }
    let p = proxy(config(&eps, |_| {})).await;
    let seen = load(&p, 600, 8).await;
    assert_eq!(seen, BTreeMap::from([(200, 600)]));
    let even: Vec<usize> = eps.iter().map(Endpoint::hits).collect();
    for h in &even {
        assert!(
            *h > 120,
            "each of three endpoints gets a fair share: {even:?}"
        );
    }
    // One endpoint 10× slower: the estimate steers around it.
    eps[2].set_delay(Duration::from_millis(50));
    let before: Vec<usize> = eps.iter().map(Endpoint::hits).collect();
    let seen = load(&p, 600, 8).await;
    assert_eq!(seen, BTreeMap::from([(200, 600)]));
    let got: Vec<usize> = eps.iter().zip(&before).map(|(e, b)| e.hits() - b).collect();
    let share = got[2] as f64 / 600.0;
    eprintln!("slow endpoint's share: {:.1} % ({got:?})", share * 100.0);
    assert!(share < 0.10, "slow endpoint share {share}: {got:?}");
    // The admin listener and the metrics say the same.
    let view = endpoints_view(&p).await;
    assert_eq!(view.as_array().unwrap().len(), 3, "{view}");
    let slow = view
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["address"] == eps[2].addr.to_string())
        .unwrap();
    assert!(slow["latencyEwmaMs"].as_f64().unwrap() > 20.0, "{view}");
    let m = p.metrics().await;
    let series = format!(
        "weir_endpoint_requests_total{{dependency=\"backend\",endpoint=\"{}\"}} {}",
        eps[2].addr,
        eps[2].hits()
    );
    assert!(m.contains(&series), "{series} in\n{m}");
    assert!(
        m.contains("weir_endpoints{dependency=\"backend\"} 3"),
        "{m}"
    );
}

#[tokio::test]
async fn a_failing_endpoint_is_ejected_probed_with_one_request_and_returns() {
    let eps = endpoints(3).await;
    let p = proxy(config(&eps, |d| {
        d.outlier_detection.consecutive_failures = 3;
        d.outlier_detection.base_ejection_ms = 1_000;
        d.outlier_detection.max_ejection_ms = 10_000;
        // A probe on a new connection measures the connect too; a short decay lets the
        // estimate come down to its peers' within the test.
        d.load_balancer.decay_ms = 300;
    }))
    .await;
    eps[1].set_status(503);
    // Sequential calls until it has failed three (a slow answer keeps an endpoint out of the
    // choice until its estimate decays): exactly the configured failures reach it, then it is
    // ejected.
    let mut failed = 0;
    let start = std::time::Instant::now();
    while eps[1].hits() < 3 && start.elapsed() < Duration::from_secs(10) {
        failed += load(&p, 10, 1).await.get(&503).copied().unwrap_or(0);
    }
    failed += load(&p, 100, 1).await.get(&503).copied().unwrap_or(0);
    assert_eq!(eps[1].hits(), 3);
    assert_eq!(failed, 3);
    assert_eq!(health_of(&endpoints_view(&p).await, eps[1].addr), "ejected");
    assert_eq!(
        p.metric(&format!(
            "weir_endpoint_ejections_total{{dependency=\"backend\",endpoint=\"{}\"}}",
            eps[1].addr
        ))
        .await,
        1.0
    );
    assert_eq!(
        p.metric("weir_endpoints_ejected{dependency=\"backend\"}")
            .await,
        1.0
    );
    // While ejected: nothing reaches it.
    load(&p, 100, 4).await;
    assert_eq!(eps[1].hits(), 3);
    // After the ejection time, still failing: one request probes it, and it is ejected again
    // (for twice as long).
    tokio::time::sleep(Duration::from_millis(1_100)).await;
    load(&p, 100, 4).await;
    assert_eq!(eps[1].hits(), 4, "exactly one probe");
    let view = endpoints_view(&p).await;
    let e1 = view
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["address"] == eps[1].addr.to_string())
        .unwrap()
        .clone();
    assert_eq!(e1["health"], "ejected", "{view}");
    assert!(
        e1["ejectedForMs"].as_u64().unwrap() > 1_000,
        "doubled: {e1}"
    );
    // Healthy again: after the longer ejection one probe succeeds and it is back in rotation.
    eps[1].set_status(200);
    tokio::time::sleep(Duration::from_millis(2_100)).await;
    let before = eps[1].hits();
    assert_eq!(load(&p, 1, 1).await, BTreeMap::from([(200, 1)]));
    assert_eq!(eps[1].hits() - before, 1, "the probe");
    tokio::time::sleep(Duration::from_millis(1_000)).await;
    let seen = load(&p, 150, 4).await;
    assert_eq!(seen, BTreeMap::from([(200, 150)]));
    assert!(
        eps[1].hits() - before > 15,
        "back: {}",
        eps[1].hits() - before
    );
    assert_eq!(health_of(&endpoints_view(&p).await, eps[1].addr), "active");
    assert_eq!(
        p.metric("weir_endpoints_ejected{dependency=\"backend\"}")
            .await,
        0.0
    );
}

#[tokio::test]
async fn retries_land_on_another_endpoint() {
    let eps = endpoints(2).await;
    let p = proxy(config(&eps, |d| {
        // Never ejected here: each call meets the failing endpoint afresh.
        d.outlier_detection.max_ejected_percent = 0;
        // Each endpoint in turn, so that every other first try meets the failing one. Under
        // peak-EWMA one slow answer from it (a busy test machine) would keep it out of the
        // choice between two endpoints for seconds, and the retries would not be exercised.
        d.load_balancer.algorithm = BalanceAlgorithm::RoundRobin;
        d.retry = Some(one_quick_retry());
    }))
    .await;
    eps[0].set_status(503);
    let seen = load(&p, 200, 4).await;
    // Every call that met the failing endpoint was retried on the other one.
    assert_eq!(seen, BTreeMap::from([(200, 200)]), "{seen:?}");
    assert!(
        eps[0].hits() > 20,
        "the failing endpoint was tried: {}",
        eps[0].hits()
    );
    assert_eq!(eps[1].hits(), 200);
    // A 500 (the app's own error, no ejection) is retried elsewhere too.
    eps[0].set_status(500);
    let before = (eps[0].hits(), eps[1].hits());
    let seen = load(&p, 200, 4).await;
    assert_eq!(seen, BTreeMap::from([(200, 200)]), "{seen:?}");
    assert!(
        eps[0].hits() - before.0 > 20,
        "tried: {}",
        eps[0].hits() - before.0
    );
    assert_eq!(eps[1].hits() - before.1, 200);
}

#[tokio::test]
async fn the_ejection_cap_holds_when_most_endpoints_fail() {
    let eps = endpoints(4).await;
    let p = proxy(config(&eps, |d| {
        d.outlier_detection.consecutive_failures = 2;
        d.outlier_detection.base_ejection_ms = 60_000;
        d.outlier_detection.max_ejected_percent = 50;
    }))
    .await;
    for e in &eps[..3] {
        e.set_status(503);
    }
    load(&p, 200, 2).await;
    let view = endpoints_view(&p).await;
    let ejected: Vec<&serde_json::Value> = view
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["health"] == "ejected")
        .collect();
    assert_eq!(ejected.len(), 2, "half of four, no more: {view}");
    assert_eq!(health_of(&view, eps[3].addr), "active");
    assert_eq!(
        p.metric("weir_endpoints_ejected{dependency=\"backend\"}")
            .await,
        2.0
    );
}

#[tokio::test]
async fn an_endpoint_that_leaves_the_set_gets_no_new_requests_and_a_new_one_gets_some() {
    let eps = endpoints(3).await;
    let mut cfg = config(&eps[..2], |_| {});
    let p = proxy(cfg.clone()).await;
    load(&p, 100, 4).await;
    assert!(eps[0].hits() > 0 && eps[1].hits() > 0);
    assert_eq!(eps[2].hits(), 0);
    // A new answer: .2 leaves, .4 joins.
    cfg.outbound[0].endpoints.as_mut().unwrap().addresses = vec![eps[1].addr, eps[2].addr];
    p.write_config(&serde_json::to_string(&cfg).unwrap());
    assert!(
        weir_testkit::eventually_async(Duration::from_secs(5), || async {
            let v = endpoints_view(&p).await;
            health_of(&v, eps[2].addr) == "active" && health_of(&v, eps[0].addr) == "absent"
        })
        .await
    );
    let gone = eps[0].hits();
    load(&p, 100, 4).await;
    assert_eq!(
        eps[0].hits(),
        gone,
        "no new request to the endpoint that left"
    );
    assert!(
        eps[2].hits() > 20,
        "the new endpoint takes its share: {}",
        eps[2].hits()
    );
    // Its series went with it.
    let m = p.metrics().await;
    assert!(!m.contains(&format!("endpoint=\"{}\"", eps[0].addr)), "{m}");
}

#[tokio::test]
async fn an_ejected_endpoint_does_not_open_the_dependencys_breaker_but_a_dependency_down_does() {
    let eps = endpoints(3).await;
    let breaker = weir_crds::proxy::CircuitBreakerConfig {
        error_threshold_percentage: 10,
        volume_threshold: 5,
        rolling_window_ms: 10_000,
        buckets: 10,
        reset_timeout_ms: 30_000,
        failure_on: weir_crds::proxy::FailureClassConfig {
            status_5xx: true,
            connect_errors: true,
            timeouts: true,
            grpc_statuses: vec![14],
        },
    };
    let p = proxy(config(&eps, |d| {
        d.outlier_detection.consecutive_failures = 1;
        d.outlier_detection.base_ejection_ms = 60_000;
        d.circuit_breaker = Some(breaker);
    }))
    .await;
    eps[0].set_status(503);
    let seen = load(&p, 100, 1).await;
    // The bad endpoint failed one call, which ejected it: the breaker, at 10 % over at least
    // five calls, would open on a failure it counted; it counted none.
    assert_eq!(eps[0].hits(), 1, "{seen:?}");
    assert_eq!(seen.get(&503), Some(&1), "{seen:?}");
    assert_eq!(
        p.metric("weir_circuit_breaker_state{dependency=\"backend\"}")
            .await,
        0.0
    );
    // Every endpoint failing (the cap keeps two in the choice): the dependency is down and the
    // breaker opens.
    for e in &eps {
        e.set_status(503);
    }
    let seen = load(&p, 50, 1).await;
    assert_eq!(
        p.metric("weir_circuit_breaker_state{dependency=\"backend\"}")
            .await,
        1.0,
        "{seen:?}"
    );
}

#[tokio::test]
async fn dns_endpoints_are_resolved_and_called_by_address_under_the_dependencys_name() {
    // `localhost` through the system resolver: 127.0.0.1 (one family is used). The upstream's
    // name leads nowhere, so an answer means the resolved endpoint was called.
    let seen_host = Arc::new(std::sync::Mutex::new(Vec::<String>::new()));
    let s2 = seen_host.clone();
    let (addr, _task) = weir_testkit::serve(move |req: Request<hyper::body::Incoming>| {
        let host = req
            .headers()
            .get("host")
            .and_then(|h| h.to_str().ok())
            .unwrap_or("")
            .to_string();
        s2.lock().unwrap().push(host);
        async { respond(200, "ok") }
    })
    .await;
    let mut cfg = base_config(free_addr());
    let mut d = dependency("backend", "http://backend.weir.invalid:8080".into());
    d.endpoints = Some(EndpointsConfig {
        dns: Some(format!("localhost:{}", addr.port())),
        addresses: vec![],
        refresh_ms: 200,
    });
    cfg.outbound.push(d);
    let p = proxy(cfg).await;
    assert!(
        weir_testkit::eventually_async(Duration::from_secs(5), || async {
            endpoints_view(&p)
                .await
                .as_array()
                .is_some_and(|a| a.len() == 1)
        })
        .await
    );
    let c = client();
    let a = get(&c, p.outbound_url("backend", "/x")).await;
    assert_eq!((a.status, a.body.as_str()), (200, "ok"));
    assert_eq!(
        seen_host.lock().unwrap().as_slice(),
        ["backend.weir.invalid:8080"],
        "the Host header keeps the dependency's name"
    );
    assert_eq!(
        endpoints_view(&p).await[0]["address"],
        format!("127.0.0.1:{}", addr.port())
    );
}

#[tokio::test]
async fn an_endpoint_that_refuses_connections_is_ejected_at_the_first_refusal() {
    // A pod deleted before discovery says so: its address refuses connections.
    let mut eps = endpoints(3).await;
    let gone = eps.remove(2);
    let gone_addr = gone.addr;
    drop(gone);
    tokio::time::sleep(Duration::from_millis(100)).await;
    let mut cfg = config(&eps, |d| {
        d.retry = Some(one_quick_retry());
    });
    cfg.outbound[0]
        .endpoints
        .as_mut()
        .unwrap()
        .addresses
        .push(gone_addr);
    let p = proxy(cfg).await;
    let seen = load(&p, 100, 1).await;
    // The refusal was retried on another endpoint; no caller saw it.
    assert_eq!(seen, BTreeMap::from([(200, 100)]));
    let view = endpoints_view(&p).await;
    assert_eq!(health_of(&view, gone_addr), "ejected", "{view}");
    let refused = view
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["address"] == gone_addr.to_string())
        .unwrap()["consecutiveFailures"]
        .as_u64();
    assert_eq!(refused, Some(0), "ejected at its first refusal: {view}");
    assert_eq!(
        p.metric(&format!(
            "weir_endpoint_requests_total{{dependency=\"backend\",endpoint=\"{gone_addr}\"}}"
        ))
        .await,
        1.0,
        "one attempt reached it"
    );
}
