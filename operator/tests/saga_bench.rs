//! Saga benchmark (ignored by `cargo test`; run by `operator/benches/saga.sh`): throughput of a
//! 3-step saga against trivial step services, and the time from a coordinator's `kill -9` to
//! the resumption of its instances. Prints a Markdown table.

mod saga_support;

use saga_support::*;
use serde_json::json;
use std::sync::Arc;
use std::time::{Duration, Instant};
use weir_testkit::NatsServer;

fn env(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

async fn wait_all_finished(nats: &str, saga: &str, n: usize, limit: Duration) {
    let deadline = Instant::now() + limit;
    loop {
        let all = instances(nats, saga).await;
        if all.len() >= n && all.values().all(|i| i.status.finished()) {
            return;
        }
        assert!(Instant::now() < deadline, "not finished in {limit:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

async fn wait_stats_completed(url: &str, n: i64, limit: Duration) {
    let deadline = Instant::now() + limit;
    loop {
        if let Some((_, s)) = request("GET", &format!("{url}/v1/stats"), None, &[]).await
            && s["completed"].as_i64().unwrap_or(0) + s["compensated"].as_i64().unwrap_or(0) >= n
        {
            return;
        }
        assert!(Instant::now() < deadline, "not finished in {limit:?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "benchmark: run operator/benches/saga.sh"]
async fn saga_benchmark() {
    let n = env("SAGA_BENCH_INSTANCES", 1000);
    let clients = env("SAGA_BENCH_CLIENTS", 32);
    let mut rows = Vec::new();

    // Throughput: N instances started over HTTP by `clients` concurrent callers.
    {
        let nats = NatsServer::start();
        let svc = StepService::start().await;
        let cfg = config(&nats.url(), &svc.url(), "bench");
        let coord = Coordinator::spawn(&cfg, None);
        let url = Arc::new(coord.url());
        // Warm up (connections, streams).
        request(
            "POST",
            &format!("{url}/v1/sagas/bench?wait=10s"),
            Some(json!({"order": "w"})),
            &[],
        )
        .await;
        let started = Instant::now();
        let next = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let mut tasks = Vec::new();
        for _ in 0..clients {
            let (url, next) = (url.clone(), next.clone());
            tasks.push(tokio::spawn(async move {
                loop {
                    let i = next.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                    if i >= n {
                        return;
                    }
                    let r = request(
                        "POST",
                        &format!("{url}/v1/sagas/bench"),
                        Some(json!({"order": i, "qty": 1})),
                        &[],
                    )
                    .await;
                    assert_eq!(r.map(|r| r.0), Some(202));
                }
            }));
        }
        for t in tasks {
            t.await.unwrap();
        }
        let accepted = started.elapsed();
        wait_stats_completed(&url, n as i64 + 1, Duration::from_secs(300)).await;
        let done = started.elapsed();
        rows.push((
            format!("throughput: {n} instances of a 3-step saga, {clients} concurrent HTTP clients, 1 replica"),
            format!("{:.0} instances/s ({n} accepted in {:.2}s, all completed in {:.2}s)", n as f64 / done.as_secs_f64(), accepted.as_secs_f64(), done.as_secs_f64()),
        ));

        // Latency of one instance, alone, with ?wait.
        let mut lat = Vec::new();
        for i in 0..50 {
            let t = Instant::now();
            let r = request(
                "POST",
                &format!("{url}/v1/sagas/bench?wait=10s"),
                Some(json!({"order": format!("l{i}")})),
                &[],
            )
            .await
            .unwrap();
            assert_eq!(r.1["status"], "Completed");
            lat.push(t.elapsed());
        }
        lat.sort();
        rows.push((
            "latency: one instance alone, `POST ?wait=` until Completed (50 runs)".into(),
            format!(
                "p50 {:.1}ms, p90 {:.1}ms, max {:.1}ms",
                ms(lat[25]),
                ms(lat[45]),
                ms(lat[49])
            ),
        ));
    }

    // Kill to resumption: instances in flight on A, A killed with SIGKILL, B takes over.
    for ttl in [1000u64, 3000] {
        let nats = NatsServer::start();
        let svc = StepService::start().await;
        svc.state.lock().unwrap().delay = (200, 200);
        let mut cfg = config(&nats.url(), &svc.url(), "bench");
        cfg.lease_ttl_ms = ttl;
        let mut a = Coordinator::spawn(&cfg, None);
        let b = Coordinator::spawn(&cfg, None);
        for i in 0..50 {
            request(
                "POST",
                &format!("{}/v1/sagas/bench", a.url()),
                Some(json!({"order": i})),
                &[],
            )
            .await
            .unwrap();
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
        a.kill();
        let killed = chrono::Utc::now();
        let killed_at = Instant::now();
        let before = instances(&nats.url(), "bench").await;
        let in_flight: Vec<String> = before
            .values()
            .filter(|i| !i.status.finished())
            .map(|i| i.id.clone())
            .collect();
        wait_all_finished(&nats.url(), "bench", 50, Duration::from_secs(60)).await;
        let all_done = killed_at.elapsed();
        let after = instances(&nats.url(), "bench").await;
        // First entry written by B for an instance A had in flight.
        let resumed: Vec<f64> = in_flight
            .iter()
            .filter_map(|id| {
                let inst = &after[id];
                let a_id = &inst.entries[0].by;
                inst.entries
                    .iter()
                    .find(|e| &e.by != a_id && e.at > killed)
                    .map(|e| (e.at - killed).num_milliseconds() as f64)
            })
            .collect();
        let first = resumed.iter().cloned().fold(f64::INFINITY, f64::min);
        let last = resumed.iter().cloned().fold(0.0, f64::max);
        rows.push((
            format!("kill -9 → resumption, lease TTL {ttl}ms ({} instances in flight, 2 replicas)", in_flight.len()),
            format!("first resumed after {first:.0}ms, all resumed by {last:.0}ms, all finished {:.0}ms after the kill", ms(all_done)),
        ));
        drop(b);
    }

    println!("\n| measurement | result |\n|---|---|");
    for (k, v) in rows {
        println!("| {k} | {v} |");
    }
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}
