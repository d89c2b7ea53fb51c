//! Sagas end to end: the real `weir saga-coordinator` binary, a real nats-server, and HTTP step
//! services on loopback that record every call with its `Idempotency-Key`.

mod saga_support;

use saga_support::*;
use serde_json::{Value, json};
use std::collections::BTreeMap;
use std::time::{Duration, Instant};
use weir_crds::coordinator::{OutcomeConfig, RetryConfig};
use weir_saga::log::{Event, Status};
use weir_testkit::NatsServer;

async fn outcome_stream(nats: &str, name: &str, subject: &str) -> async_nats::jetstream::Context {
    let js = async_nats::jetstream::new(async_nats::connect(nats).await.unwrap());
    js.get_or_create_stream(async_nats::jetstream::stream::Config {
        name: name.into(),
        subjects: vec![subject.into()],
        ..Default::default()
    })
    .await
    .unwrap();
    js
}

async fn read_all(
    js: &async_nats::jetstream::Context,
    stream: &str,
) -> Vec<async_nats::jetstream::message::StreamMessage> {
    let s = js.get_stream(stream).await.unwrap();
    let mut out = Vec::new();
    let mut seq = 1;
    while let Ok(m) = s.get_raw_message(seq).await {
        out.push(m);
        seq += 1;
    }
    out
}

fn paths(calls: &[Call]) -> Vec<String> {
    calls.iter().map(|c| c.path.clone()).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn all_steps_succeed_and_the_outcome_event_is_published() {
    let nats = NatsServer::start();
    let svc = StepService::start().await;
    let js = outcome_stream(
        &nats.url(),
        "weir_shop_orders-done",
        "weir.shop.orders-done",
    )
    .await;
    let mut cfg = config(&nats.url(), &svc.url(), "place-order");
    cfg.on_completed = Some(OutcomeConfig {
        queue: "orders-done".into(),
        subject: "weir.shop.orders-done".into(),
        event_type: "OrderConfirmed".into(),
    });
    let coord = Coordinator::spawn(&cfg, None);

    let (status, body) = request(
        "POST",
        &format!("{}/v1/sagas/place-order?wait=10s", coord.url()),
        Some(json!({"order": "o-1", "qty": 2})),
        &[],
    )
    .await
    .unwrap();
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["status"], "Completed");
    let id = body["id"].as_str().unwrap().to_string();

    let calls = svc.calls_of(&id);
    assert_eq!(paths(&calls), ["/reserve", "/charge", "/ship"]);
    for c in &calls {
        let step = c.path.trim_start_matches('/');
        assert_eq!(c.key, format!("place-order/{id}/{step}"));
    }
    // Templates: the input's values keep their types, results of earlier steps are there.
    assert_eq!(calls[0].body, json!({"order": "o-1", "qty": 2}));
    assert_eq!(calls[1].body["reservation"], format!("/reserve:{id}"));

    let events = read_all(&js, "weir_shop_orders-done").await;
    assert_eq!(events.len(), 1);
    let h = &events[0].headers;
    assert_eq!(h.get("ce-type").unwrap().as_str(), "OrderConfirmed");
    assert_eq!(
        h.get("Nats-Msg-Id").unwrap().as_str(),
        format!("{id}:completed")
    );
    let ev: Value = serde_json::from_slice(&events[0].payload).unwrap();
    assert_eq!(ev["outcome"], "Completed");
    assert_eq!(ev["input"]["order"], "o-1");

    // The timeline over HTTP and on the command line.
    let (status, tl) = request(
        "GET",
        &format!("{}/v1/sagas/place-order/{id}", coord.url()),
        None,
        &[],
    )
    .await
    .unwrap();
    assert_eq!(status, 200);
    let kinds: Vec<&str> = tl["entries"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["type"].as_str().unwrap())
        .collect();
    assert_eq!(
        kinds,
        [
            "started",
            "step-started",
            "step-succeeded",
            "step-started",
            "step-succeeded",
            "step-started",
            "step-succeeded",
            "completed"
        ]
    );
    let (_, stats) = request("GET", &format!("{}/v1/stats", coord.url()), None, &[])
        .await
        .unwrap();
    assert_eq!(stats["completed"], 1);
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_weir"))
        .args([
            "saga",
            "show",
            "place-order",
            &id,
            "-n",
            "shop",
            "--broker-url",
            &nats.url(),
        ])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(text.contains("step 2 charge: succeeded"), "{text}");
    assert!(text.contains("Completed"), "{text}");
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_weir"))
        .args([
            "saga",
            "list",
            "place-order",
            "-n",
            "shop",
            "--broker-url",
            &nats.url(),
        ])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains(&id) && text.contains("1 instance(s)"),
        "{text}"
    );
    let (_, metrics) = request("GET", &format!("{}/metrics", coord.url()), None, &[])
        .await
        .unwrap_or((0, Value::Null));
    let _ = metrics; // /metrics is text; checked in the failure test
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_step_compensates_the_earlier_ones_in_reverse_order() {
    let nats = NatsServer::start();
    let svc = StepService::start().await;
    svc.set("/ship", Mode::Status(409));
    let js = outcome_stream(
        &nats.url(),
        "weir_shop_orders-failed",
        "weir.shop.orders-failed",
    )
    .await;
    let mut cfg = config(&nats.url(), &svc.url(), "place-order");
    cfg.on_failed = Some(OutcomeConfig {
        queue: "orders-failed".into(),
        subject: "weir.shop.orders-failed".into(),
        event_type: "OrderFailed".into(),
    });
    let coord = Coordinator::spawn(&cfg, None);
    let (status, body) = request(
        "POST",
        &format!("{}/v1/sagas/place-order?wait=10s", coord.url()),
        Some(json!({"order": "o-2", "qty": 1})),
        &[],
    )
    .await
    .unwrap();
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["status"], "Compensated");
    let id = body["id"].as_str().unwrap();
    let calls = svc.calls_of(id);
    assert_eq!(
        paths(&calls),
        [
            "/reserve",
            "/charge",
            "/ship",
            "/charge/undo",
            "/reserve/undo"
        ],
        "step 3 refused: compensations 2 then 1, none for step 3"
    );
    assert_eq!(calls[3].key, format!("place-order/{id}/charge/compensate"));
    assert_eq!(calls[4].key, format!("place-order/{id}/reserve/compensate"));

    let events = read_all(&js, "weir_shop_orders-failed").await;
    assert_eq!(events.len(), 1);
    let ev: Value = serde_json::from_slice(&events[0].payload).unwrap();
    assert_eq!(ev["outcome"], "Compensated");
    assert_eq!(
        events[0].headers.get("ce-type").unwrap().as_str(),
        "OrderFailed"
    );
    let reason = ev["reason"].as_str().unwrap();
    assert!(
        reason.contains("step 3 (ship) failed: HTTP 409"),
        "{reason}"
    );
    assert_eq!(ev["input"]["order"], "o-2");

    let metrics = reqwest_text(&format!("{}/metrics", coord.url())).await;
    assert!(
        metrics.contains("weir_saga_instances_compensated_total{saga=\"place-order\"} 1"),
        "{metrics}"
    );
    assert!(
        metrics.contains("weir_saga_step_duration_seconds"),
        "{metrics}"
    );
}

async fn reqwest_text(url: &str) -> String {
    use http_body_util::BodyExt;
    let client = hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
        .build_http::<http_body_util::Full<bytes::Bytes>>();
    let resp = client.get(url.parse().unwrap()).await.unwrap();
    String::from_utf8(
        resp.into_body()
            .collect()
            .await
            .unwrap()
            .to_bytes()
            .to_vec(),
    )
    .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_step_that_times_out_is_retried_then_compensated() {
    let nats = NatsServer::start();
    let svc = StepService::start().await;
    svc.set("/charge", Mode::Hang);
    let mut cfg = config(&nats.url(), &svc.url(), "place-order");
    cfg.steps[1].timeout_ms = 200;
    cfg.steps[1].retry = RetryConfig {
        attempts: 3,
        backoff_base_ms: 20,
        backoff_max_ms: 50,
    };
    let coord = Coordinator::spawn(&cfg, None);
    let (status, body) = request(
        "POST",
        &format!("{}/v1/sagas/place-order?wait=10s", coord.url()),
        Some(json!({"order": "o-3", "qty": 1})),
        &[],
    )
    .await
    .unwrap();
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["status"], "Compensated");
    let id = body["id"].as_str().unwrap();
    let calls = svc.calls_of(id);
    assert_eq!(
        paths(&calls),
        [
            "/reserve",
            "/charge",
            "/charge",
            "/charge",
            "/charge/undo",
            "/reserve/undo"
        ],
        "three attempts, then the timed-out step (it may have happened) and step 1 are compensated"
    );
    assert!(
        calls[1..4]
            .iter()
            .all(|c| c.key == format!("place-order/{id}/charge"))
    );
    assert!(
        body["reason"].as_str().unwrap().contains("timed out"),
        "{body}"
    );
}

/// A step's `retry.attempts` bounds its failed attempts whatever happens to the coordinator:
/// each attempt and each failure is logged, and a restarted coordinator counts the failures its
/// predecessors logged. An attempt cut short by the coordinator's death has no outcome and is
/// made again on resumption, so the step's calls are at most `retry.attempts` plus one per
/// death. Here the coordinator is killed (-9) during the second call it makes, three times.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn step_attempts_are_bounded_across_coordinator_restarts() {
    let nats = NatsServer::start();
    let svc = StepService::start().await;
    svc.set("/charge", Mode::Hang);
    let mut cfg = config(&nats.url(), &svc.url(), "place-order");
    cfg.steps[1].timeout_ms = 300;
    cfg.steps[1].retry = RetryConfig {
        attempts: 2,
        backoff_base_ms: 20,
        backoff_max_ms: 50,
    };
    let mut coord = Coordinator::spawn(&cfg, None);
    let (status, body) = request(
        "POST",
        &format!("{}/v1/sagas/place-order", coord.url()),
        Some(json!({"order": "o-9", "qty": 1})),
        &[("Idempotency-Key", "o-9")],
    )
    .await
    .unwrap();
    assert!(status == 202 || status == 200, "{status} {body}");
    let id = body["id"].as_str().unwrap().to_string();
    let charges = || {
        svc.calls_of(&id)
            .iter()
            .filter(|c| c.path == "/charge")
            .count()
    };
    let started = Instant::now();
    let (mut kills, mut at_spawn) = (0, 0);
    let inst = loop {
        if let Some(inst) = instances(&nats.url(), "place-order").await.remove(&id)
            && inst.status.finished()
        {
            break inst;
        }
        // Killed while its second call hangs: one failed attempt logged, one cut short.
        if kills < 3 && charges() >= at_spawn + 2 {
            coord.kill();
            kills += 1;
            at_spawn = charges();
            coord = Coordinator::spawn(&cfg, None);
        }
        assert!(
            started.elapsed() < Duration::from_secs(60),
            "no end in 60 s: {:?}",
            paths(&svc.calls_of(&id))
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    let calls = paths(&svc.calls_of(&id));
    eprintln!("{kills} kills; calls {calls:?}; reason {:?}", inst.reason);
    assert!(kills >= 1, "the coordinator must be killed mid-attempt");
    assert_eq!(inst.status, Status::Compensated);
    assert!(
        charges() <= 2 + kills,
        "at most retry.attempts (2) + one per kill ({kills}) calls: {calls:?}"
    );
    let failed = inst
        .entries
        .iter()
        .filter(|e| matches!(&e.event, Event::StepAttemptFailed { step: 2, .. }))
        .count();
    assert_eq!(failed, 1, "one failed attempt logged before the last one");
    assert!(
        calls.ends_with(&["/charge/undo".to_string(), "/reserve/undo".to_string()]),
        "the step may have happened, so it is compensated, then step 1: {calls:?}"
    );
    let reason = inst.reason.clone().unwrap_or_default();
    assert!(
        reason.contains("attempt 2 of 2; failed attempts are counted across coordinator restarts"),
        "{reason}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_compensation_that_keeps_failing_ends_compensation_failed_and_is_dead_lettered() {
    let nats = NatsServer::start();
    let svc = StepService::start().await;
    svc.set("/ship", Mode::Status(422));
    svc.set("/charge/undo", Mode::Status(500));
    let cfg = config(&nats.url(), &svc.url(), "place-order");
    let coord = Coordinator::spawn(&cfg, None);
    let (status, body) = request(
        "POST",
        &format!("{}/v1/sagas/place-order?wait=10s", coord.url()),
        Some(json!({"order": "o-4"})),
        &[],
    )
    .await
    .unwrap();
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["status"], "CompensationFailed");
    let id = body["id"].as_str().unwrap();
    let calls = svc.calls_of(id);
    assert_eq!(
        paths(&calls),
        [
            "/reserve",
            "/charge",
            "/ship",
            "/charge/undo",
            "/charge/undo",
            "/charge/undo",
            "/reserve/undo"
        ],
        "retried compensationRetry.attempts times; the other compensations still run"
    );
    let js = async_nats::jetstream::new(async_nats::connect(nats.url()).await.unwrap());
    let dl = read_all(&js, "weir_saga_shop_place-order_dlq").await;
    assert_eq!(dl.len(), 1);
    let v: Value = serde_json::from_slice(&dl[0].payload).unwrap();
    assert_eq!(v["sagaId"], id);
    assert!(v["log"].as_array().unwrap().len() >= 10);
    let (_, stats) = request("GET", &format!("{}/v1/stats", coord.url()), None, &[])
        .await
        .unwrap();
    assert_eq!(stats["failed"], 1, "{stats}");
    assert!(
        stats["lastFailure"]
            .as_str()
            .unwrap()
            .contains("compensation of step 2"),
        "{stats}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn starts_are_idempotent_by_key_and_by_trigger_event() {
    let nats = NatsServer::start();
    let svc = StepService::start().await;
    let js = outcome_stream(&nats.url(), "weir_shop_orders", "weir.shop.orders").await;
    let mut cfg = config(&nats.url(), &svc.url(), "place-order");
    cfg.trigger.queue = Some(weir_crds::coordinator::QueueTriggerConfig {
        queue: "orders".into(),
        stream: "weir_shop_orders".into(),
        subjects: vec!["weir.shop.orders".into()],
        consumer: "saga-place-order".into(),
    });
    let coord = Coordinator::spawn(&cfg, None);
    let url = format!("{}/v1/sagas/place-order?wait=10s", coord.url());
    let (_, a) = request(
        "POST",
        &url,
        Some(json!({"order": "k"})),
        &[("Idempotency-Key", "k-1")],
    )
    .await
    .unwrap();
    let (_, b) = request(
        "POST",
        &url,
        Some(json!({"order": "k"})),
        &[("Idempotency-Key", "k-1")],
    )
    .await
    .unwrap();
    assert_eq!(a["id"], b["id"]);
    assert_eq!(b["status"], "Completed");
    // The same event twice (a redelivery, or a publisher retry past the duplicate window).
    for _ in 0..2 {
        let mut h = async_nats::HeaderMap::new();
        h.insert("ce-id", "evt-42");
        js.publish_with_headers(
            "weir.shop.orders",
            h,
            json!({"order": "e"}).to_string().into(),
        )
        .await
        .unwrap()
        .await
        .unwrap();
    }
    let id = weir_saga::coordinator::instance_id_for_event("evt-42");
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let all = instances(&nats.url(), "place-order").await;
        if all.get(&id).is_some_and(|i| i.status == Status::Completed) {
            assert_eq!(all.len(), 2, "one instance per key, one per event");
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the trigger event started no instance"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(svc.calls_of(&id).len(), 3);
}

/// Checks every invariant the log and the services must hold once all instances have ended.
fn check_invariants(
    all: &BTreeMap<String, weir_saga::log::Instance>,
    svc: &StepService,
    saga: &str,
    fails: &BTreeMap<String, bool>,
) -> BTreeMap<&'static str, usize> {
    let names = ["reserve", "charge", "ship"];
    let mut counts = BTreeMap::new();
    let calls = svc.calls();
    for (id, inst) in all {
        let mine: Vec<&Call> = calls.iter().filter(|c| &c.saga_id == id).collect();
        // Same key for every call of one step (and of one compensation), whoever made it.
        for c in &mine {
            let step = c.path.trim_start_matches('/').trim_end_matches("/undo");
            let want = if c.path.ends_with("/undo") {
                format!("{saga}/{id}/{step}/compensate")
            } else {
                format!("{saga}/{id}/{step}")
            };
            assert_eq!(c.key, want, "{id}: call to {} with another key", c.path);
        }
        // A compensation only for a step whose action started.
        let mut started = [false; 3];
        for e in &inst.entries {
            match &e.event {
                Event::StepStarted { step, .. } => started[step - 1] = true,
                Event::CompStarted { step, .. } => {
                    assert!(
                        started[step - 1],
                        "{id}: compensation of step {step} that never started"
                    )
                }
                _ => {}
            }
        }
        let undo = |s: &str| {
            mine.iter()
                .filter(|c| c.path == format!("/{s}/undo"))
                .count()
        };
        let did = |s: &str| mine.iter().filter(|c| c.path == format!("/{s}")).count();
        for (i, s) in names.iter().enumerate() {
            if undo(s) > 0 {
                assert!(
                    started[i],
                    "{id}: service saw a compensation of {s}, never started"
                );
            }
        }
        let fail = fails.get(id).copied().unwrap_or(false);
        match inst.status {
            Status::Completed => {
                assert!(!fail, "{id}: completed although step 3 refuses it");
                for s in names {
                    assert!(did(s) >= 1, "{id}: completed without calling {s}");
                    assert_eq!(undo(s), 0, "{id}: completed but {s} was compensated");
                }
                *counts.entry("completed").or_default() += 1;
            }
            Status::Compensated => {
                assert!(
                    fail,
                    "{id}: compensated although nothing refused it: {:?}",
                    inst.reason
                );
                assert_eq!(undo("ship"), 0, "{id}: the refused step was compensated");
                assert!(
                    undo("charge") >= 1 && undo("reserve") >= 1,
                    "{id}: not fully compensated"
                );
                // Reverse order: step 1's compensation comes after step 2's.
                let first_reserve_undo = mine
                    .iter()
                    .filter(|c| c.path == "/reserve/undo")
                    .map(|c| c.seq)
                    .min()
                    .unwrap();
                let first_charge_undo = mine
                    .iter()
                    .filter(|c| c.path == "/charge/undo")
                    .map(|c| c.seq)
                    .min()
                    .unwrap();
                assert!(
                    first_charge_undo < first_reserve_undo,
                    "{id}: compensations out of order"
                );
                *counts.entry("compensated").or_default() += 1;
            }
            Status::Cancelled => {
                assert!(
                    inst.entries
                        .iter()
                        .any(|e| matches!(e.event, Event::CancelRequested { .. })),
                    "{id}: cancelled without a request"
                );
                // Every step that succeeded is compensated; one the service refused is not.
                for (i, s) in names.iter().enumerate() {
                    let succeeded = inst.entries.iter().any(
                        |e| matches!(&e.event, Event::StepSucceeded { step, .. } if *step == i + 1),
                    );
                    if succeeded {
                        assert!(undo(s) >= 1, "{id}: {s} succeeded but was not compensated");
                    }
                    let refused = inst.entries.iter().any(|e| {
                        matches!(&e.event, Event::StepFailed { step, uncertain: false, .. } if *step == i + 1)
                    });
                    if refused {
                        assert_eq!(undo(s), 0, "{id}: the refused {s} was compensated");
                    }
                }
                let first = |p: &str| mine.iter().filter(|c| c.path == p).map(|c| c.seq).min();
                if let (Some(c), Some(r)) = (first("/charge/undo"), first("/reserve/undo")) {
                    assert!(c < r, "{id}: compensations out of order");
                }
                // No step started after the request was logged.
                let at = inst
                    .entries
                    .iter()
                    .position(|e| matches!(e.event, Event::CancelRequested { .. }))
                    .unwrap();
                assert!(
                    !inst.entries[at..]
                        .iter()
                        .any(|e| matches!(e.event, Event::StepStarted { .. })),
                    "{id}: a step started after the cancel"
                );
                *counts.entry("cancelled").or_default() += 1;
            }
            other => panic!("{id}: ended {other:?}: {:?}", inst.reason),
        }
        for s in names {
            if did(s) > 1 {
                *counts.entry("step executed twice (same key)").or_default() += 1;
            }
            if undo(s) > 1 {
                *counts
                    .entry("compensation executed twice (same key)")
                    .or_default() += 1;
            }
        }
    }
    counts
}

/// Submits `ids` (with `Idempotency-Key`s) to whichever coordinator answers, retrying while none does.
async fn submit(urls: &[String], n: usize, fail_every: usize) -> BTreeMap<String, bool> {
    let mut out = BTreeMap::new();
    for i in 0..n {
        let fail = fail_every > 0 && i % fail_every == 0;
        let key = format!("order-{i}");
        let mut attempt = 0;
        loop {
            let url = &urls[(i + attempt) % urls.len()];
            let r = request(
                "POST",
                &format!("{url}/v1/sagas/crash"),
                Some(json!({"order": key, "qty": 1, "fail": fail})),
                &[("Idempotency-Key", &key)],
            )
            .await;
            if let Some((s, b)) = r
                && (s == 202 || s == 200)
            {
                out.insert(b["id"].as_str().unwrap().to_string(), fail);
                break;
            }
            attempt += 1;
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_instance_ends_consistent_whatever_kills_the_coordinator() {
    let n: usize = std::env::var("WEIR_SAGA_SOAK")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(300);
    crash_run(n, 0, (0, 20)).await;
}

/// The same with one instance in `cancel_every` cancelled (on the log, as `weir saga cancel`
/// does) while it runs: a cancelled instance must end with every step that succeeded
/// compensated, in reverse order, none started after the request, whatever kills the
/// coordinator; one whose cancel came too late ends as it would have.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancels_end_consistent_whatever_kills_the_coordinator() {
    crash_run(150, 3, (30, 90)).await;
}

async fn crash_run(n: usize, cancel_every: usize, delay: (u64, u64)) {
    let nats = NatsServer::start();
    let svc = StepService::start().await;
    svc.state.lock().unwrap().delay = delay;
    svc.set("/ship", Mode::FailIfFlag);
    let mut cfg = config(&nats.url(), &svc.url(), "crash");
    cfg.lease_ttl_ms = 600;
    // Crash points inside the coordinator (exit at once, like kill -9), plus kill -9 from here
    // at random times.
    let crash = "before-step=0.006,after-step-call=0.008,before-compensation=0.02,after-compensation-call=0.02,before-end=0.006";
    let crash_dir = tempfile::tempdir().unwrap();
    let crash_log = crash_dir.path().join("crashes");
    let started = Instant::now();
    let coord = std::sync::Arc::new(std::sync::Mutex::new(Coordinator::spawn_with(
        &cfg,
        Some(crash),
        Some(&crash_log),
    )));
    let url = std::sync::Arc::new(std::sync::Mutex::new(coord.lock().unwrap().url()));
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let (mut restarts, mut kills) = (0, 0);
    // The supervisor: restarts the coordinator whenever it died, kills it now and then.
    let sup = {
        let (coord, url, stop, cfg) = (coord.clone(), url.clone(), stop.clone(), cfg.clone());
        let crash_log = crash_log.clone();
        tokio::task::spawn_blocking(move || {
            let mut next_kill =
                Instant::now() + Duration::from_millis(rand::random_range(300..1500));
            while !stop.load(std::sync::atomic::Ordering::SeqCst) {
                std::thread::sleep(Duration::from_millis(20));
                let mut c = coord.lock().unwrap();
                if Instant::now() >= next_kill {
                    c.kill();
                    kills += 1;
                    next_kill =
                        Instant::now() + Duration::from_millis(rand::random_range(300..1500));
                }
                if c.exited() {
                    *c = Coordinator::spawn_with(&cfg, Some(crash), Some(&crash_log));
                    *url.lock().unwrap() = c.url();
                    restarts += 1;
                }
            }
            (restarts, kills)
        })
    };
    let mut fails = BTreeMap::new();
    let log = weir_saga::log::Log::existing(
        async_nats::jetstream::new(async_nats::connect(nats.url()).await.unwrap()),
        "shop",
        "crash",
    );
    let mut cancels = Vec::new();
    for chunk in 0..n.div_ceil(50) {
        let u = url.lock().unwrap().clone();
        let m = 50.min(n - chunk * 50);
        // Keys must be unique across chunks.
        let part = submit_offset(&u, &url, chunk * 50, m, 3).await;
        if cancel_every > 0 {
            for (k, id) in part.keys().enumerate() {
                if k % cancel_every == 1 {
                    let (log, id) = (log.clone(), id.clone());
                    cancels.push(tokio::spawn(async move {
                        tokio::time::sleep(Duration::from_millis(rand::random_range(0..60))).await;
                        log.request_cancel(&id, "test", "tester", "crash run")
                            .await
                            .unwrap()
                    }));
                }
            }
        }
        fails.extend(part);
    }
    let mut accepted = 0;
    for c in cancels {
        if matches!(c.await.unwrap(), weir_saga::log::Request::Accepted(_)) {
            accepted += 1;
        }
    }
    let deadline = Instant::now() + Duration::from_secs(90) + Duration::from_millis(50 * n as u64);
    let all = loop {
        let all = instances(&nats.url(), "crash").await;
        if all.len() == n && all.values().all(|i| i.status.finished()) {
            break all;
        }
        assert!(
            Instant::now() < deadline,
            "{} of {n} instances unfinished",
            all.values().filter(|i| !i.status.finished()).count() + n - all.len()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    stop.store(true, std::sync::atomic::Ordering::SeqCst);
    let (restarts, kills) = sup.await.unwrap();
    let counts = check_invariants(&all, &svc, "crash", &fails);
    let mut points: BTreeMap<String, usize> = BTreeMap::new();
    for p in std::fs::read_to_string(&crash_log)
        .unwrap_or_default()
        .lines()
    {
        *points.entry(p.to_string()).or_default() += 1;
    }
    eprintln!("crash points hit: {points:?}");
    assert!(points.len() >= 3, "too few crash points hit: {points:?}");
    eprintln!(
        "{n} instances in {:?}: {kills} kill -9, {restarts} restarts (kills + crash points); {counts:?}",
        started.elapsed()
    );
    assert!(
        restarts >= 5,
        "the test must actually crash the coordinator ({restarts} restarts)"
    );
    assert_eq!(
        counts.get("completed").copied().unwrap_or(0)
            + counts.get("compensated").copied().unwrap_or(0)
            + counts.get("cancelled").copied().unwrap_or(0),
        n
    );
    if cancel_every > 0 {
        // A cancel logged after the last step succeeded is too late: that instance completes.
        let late = all
            .values()
            .filter(|i| {
                i.status == Status::Completed
                    && i.entries
                        .iter()
                        .any(|e| matches!(e.event, Event::CancelRequested { .. }))
            })
            .count();
        eprintln!("{accepted} cancels logged, {late} too late");
        assert_eq!(
            counts.get("cancelled").copied().unwrap_or(0) + late,
            accepted,
            "every cancel logged in time ends cancelled"
        );
        assert!(accepted > 0, "no cancel reached a running instance");
    }
}

async fn submit_offset(
    _first: &str,
    url: &std::sync::Arc<std::sync::Mutex<String>>,
    offset: usize,
    m: usize,
    fail_every: usize,
) -> BTreeMap<String, bool> {
    let mut out = BTreeMap::new();
    for i in offset..offset + m {
        let fail = i % fail_every == 0;
        let key = format!("order-{i}");
        loop {
            let u = url.lock().unwrap().clone();
            let r = request(
                "POST",
                &format!("{u}/v1/sagas/crash"),
                Some(json!({"order": key, "qty": 1, "fail": fail})),
                &[("Idempotency-Key", &key)],
            )
            .await;
            if let Some((s, b)) = r
                && (s == 202 || s == 200)
            {
                out.insert(b["id"].as_str().unwrap().to_string(), fail);
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn when_one_replica_dies_the_other_finishes_its_instances() {
    let nats = NatsServer::start();
    let svc = StepService::start().await;
    svc.state.lock().unwrap().delay = (100, 200);
    let cfg = config(&nats.url(), &svc.url(), "crash");
    let mut a = Coordinator::spawn(&cfg, None);
    let b = Coordinator::spawn(&cfg, None);
    let fails = submit(&[a.url()], 40, 0).await;
    tokio::time::sleep(Duration::from_millis(150)).await;
    a.kill();
    // Read after the kill: what is unfinished now was A's to finish (B waits for the leases to
    // expire before it takes any).
    let before = instances(&nats.url(), "crash").await;
    let unfinished_on_a: Vec<String> = before
        .values()
        .filter(|i| !i.status.finished())
        .map(|i| i.id.clone())
        .collect();
    assert!(!unfinished_on_a.is_empty(), "kill A mid-run");
    let killed = Instant::now();
    let deadline = Instant::now() + Duration::from_secs(30);
    let all = loop {
        let all = instances(&nats.url(), "crash").await;
        if all.len() == 40 && all.values().all(|i| i.status.finished()) {
            break all;
        }
        assert!(Instant::now() < deadline, "B did not finish A's instances");
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    eprintln!(
        "B finished {} of A's instances {:?} after the kill",
        unfinished_on_a.len(),
        killed.elapsed()
    );
    let (_, stats) = request("GET", &format!("{}/v1/stats", b.url()), None, &[])
        .await
        .unwrap();
    assert_eq!(stats["completed"], 40, "{stats}");
    for id in &unfinished_on_a {
        let last = all[id].entries.last().unwrap();
        assert_eq!(last.event, Event::Completed);
        assert_ne!(
            last.by, all[id].entries[0].by,
            "{id}: finished by the other replica"
        );
    }
    check_invariants(&all, &svc, "crash", &fails);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn broker_request_steps_carry_the_same_headers_and_their_reply_is_the_result() {
    use futures::StreamExt;
    use weir_crds::coordinator::{CallConfig, RequestConfig};
    let nats = NatsServer::start();
    let svc = StepService::start().await;
    let mut cfg = config(&nats.url(), &svc.url(), "place-order");
    cfg.steps[1].action = CallConfig::Request(RequestConfig {
        subject: "payments.charge".into(),
        body: Some(json!({"order": "{{input.order}}"})),
    });
    cfg.steps[1].compensation = Some(CallConfig::Request(RequestConfig {
        subject: "payments.refund".into(),
        body: Some(json!({"charge": "{{steps.charge.result.charge}}"})),
    }));
    svc.set("/ship", Mode::Status(409));
    let client = async_nats::connect(nats.url()).await.unwrap();
    let seen = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    for subject in ["payments.charge", "payments.refund"] {
        let mut sub = client.subscribe(subject).await.unwrap();
        let (client, seen) = (client.clone(), seen.clone());
        tokio::spawn(async move {
            while let Some(m) = sub.next().await {
                let h = m.headers.clone().unwrap();
                let body: Value = serde_json::from_slice(&m.payload).unwrap();
                seen.lock().unwrap().push((
                    m.subject.to_string(),
                    h.get("Idempotency-Key").unwrap().to_string(),
                    h.get("Weir-Saga-Id").unwrap().to_string(),
                    body,
                ));
                let reply = json!({"charge": "ch-1"}).to_string();
                client
                    .publish(m.reply.unwrap(), reply.into())
                    .await
                    .unwrap();
            }
        });
    }
    client.flush().await.unwrap();
    let coord = Coordinator::spawn(&cfg, None);
    let (_, body) = request(
        "POST",
        &format!("{}/v1/sagas/place-order?wait=10s", coord.url()),
        Some(json!({"order": "o-9"})),
        &[],
    )
    .await
    .unwrap();
    assert_eq!(body["status"], "Compensated", "{body}");
    let id = body["id"].as_str().unwrap();
    let seen = seen.lock().unwrap().clone();
    assert_eq!(
        seen,
        [
            (
                "payments.charge".to_string(),
                format!("place-order/{id}/charge"),
                id.to_string(),
                json!({"order": "o-9"})
            ),
            (
                "payments.refund".to_string(),
                format!("place-order/{id}/charge/compensate"),
                id.to_string(),
                json!({"charge": "ch-1"})
            ),
        ]
    );
}

// ---- Operations: cancel, retry, versions, purge (issue #20) ----

fn kinds(inst: &weir_saga::log::Instance) -> Vec<&'static str> {
    inst.entries.iter().map(|e| e.event.kind()).collect()
}

async fn post(url: &str, body: Value) -> (u16, Value) {
    request("POST", url, Some(body), &[]).await.unwrap()
}

/// Starts an instance (no wait) and returns its id.
async fn start_instance(coord: &str, saga: &str, input: Value) -> String {
    let (status, body) = request(
        "POST",
        &format!("{coord}/v1/sagas/{saga}"),
        Some(input),
        &[],
    )
    .await
    .unwrap();
    assert_eq!(status, 202, "{body}");
    body["id"].as_str().unwrap().to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cancelled_instance_compensates_its_steps_in_reverse_and_says_who_cancelled() {
    let nats = NatsServer::start();
    let svc = StepService::start().await;
    svc.set("/charge", Mode::Slow(1500));
    let js = outcome_stream(
        &nats.url(),
        "weir_shop_orders-failed",
        "weir.shop.orders-failed",
    )
    .await;
    let mut cfg = config(&nats.url(), &svc.url(), "place-order");
    cfg.on_failed = Some(OutcomeConfig {
        queue: "orders-failed".into(),
        subject: "weir.shop.orders-failed".into(),
        event_type: "OrderFailed".into(),
    });
    let coord = Coordinator::spawn(&cfg, None);
    let base = format!("{}/v1/sagas/place-order", coord.url());
    let id = start_instance(&coord.url(), "place-order", json!({"order": "c-1"})).await;
    wait_until("the slow step in flight", || {
        svc.calls_of(&id).iter().any(|c| c.path == "/charge")
    })
    .await;

    // The step in flight finishes first; then its compensation and step 1's, in reverse.
    let (status, body) = post(
        &format!("{base}/{id}/cancel"),
        json!({"by": "alice", "reason": "customer called"}),
    )
    .await;
    assert_eq!(status, 202, "{body}");
    assert_eq!(body["status"], "Cancelling");
    assert_eq!(body["id"], id.as_str());
    let (status, body) = post(&format!("{base}/{id}/cancel"), json!({})).await;
    assert_eq!(status, 200, "a second cancel is idempotent: {body}");
    assert_eq!(body["status"], "Cancelling");

    let inst = wait_end(&nats.url(), "place-order", &id).await;
    assert_eq!(inst.status, Status::Cancelled, "{:?}", inst.reason);
    assert_eq!(
        paths(&svc.calls_of(&id)),
        ["/reserve", "/charge", "/charge/undo", "/reserve/undo"],
        "no step after the cancel; the completed ones compensated in reverse"
    );
    let cancel = inst
        .entries
        .iter()
        .find_map(|e| match &e.event {
            Event::CancelRequested {
                requested_by,
                reason,
            } => Some((requested_by.clone(), reason.clone())),
            _ => None,
        })
        .expect("a cancel-requested entry");
    assert_eq!(cancel, ("alice".to_string(), "customer called".to_string()));
    assert_eq!(
        inst.entries
            .iter()
            .filter(|e| matches!(e.event, Event::CancelRequested { .. }))
            .count(),
        1,
        "the second cancel logged nothing"
    );
    assert_eq!(kinds(&inst).last(), Some(&"cancelled"));
    for c in svc
        .calls_of(&id)
        .iter()
        .filter(|c| c.path.ends_with("/undo"))
    {
        let step = c.path.trim_start_matches('/').trim_end_matches("/undo");
        assert_eq!(c.key, format!("place-order/{id}/{step}/compensate"));
    }

    let events = read_all(&js, "weir_shop_orders-failed").await;
    assert_eq!(events.len(), 1);
    assert_eq!(
        events[0].headers.get("ce-id").unwrap().as_str(),
        format!("{id}:cancelled")
    );
    let ev: Value = serde_json::from_slice(&events[0].payload).unwrap();
    assert_eq!(ev["outcome"], "Cancelled");
    assert!(
        ev["reason"]
            .as_str()
            .unwrap()
            .contains("cancelled by alice: customer called"),
        "{ev}"
    );

    // Cancelled again: 200; a completed instance: 409 naming its state; unknown: 404.
    let (status, body) = post(&format!("{base}/{id}/cancel"), json!({})).await;
    assert_eq!((status, body["status"].as_str()), (200, Some("Cancelled")));
    svc.set("/charge", Mode::Ok);
    let (_, done) = request("POST", &format!("{base}?wait=10s"), Some(json!({})), &[])
        .await
        .unwrap();
    assert_eq!(done["status"], "Completed");
    let done = done["id"].as_str().unwrap();
    let (status, body) = post(&format!("{base}/{done}/cancel"), json!({})).await;
    assert_eq!(status, 409, "{body}");
    let msg = body["error"].as_str().unwrap();
    assert!(msg.contains(done) && msg.contains("Completed"), "{msg}");
    let (status, _) = post(&format!("{base}/nope/cancel"), json!({})).await;
    assert_eq!(status, 404);

    let (_, stats) = request("GET", &format!("{}/v1/stats", coord.url()), None, &[])
        .await
        .unwrap();
    assert_eq!(stats["cancelled"], 1, "{stats}");
    assert_eq!(stats["completed"], 1, "{stats}");
    let (_, list) = request("GET", &format!("{base}?state=cancelled"), None, &[])
        .await
        .unwrap();
    let list = list["instances"].as_array().unwrap();
    assert_eq!(list.len(), 1);
    assert_eq!(list[0]["id"], id.as_str());
    assert!(list[0]["version"].is_string(), "{list:?}");
    let metrics = reqwest_text(&format!("{}/metrics", coord.url())).await;
    assert!(
        metrics.contains("weir_saga_instances_cancelled_total{saga=\"place-order\"} 1"),
        "{metrics}"
    );
}

/// A coordinator that dies in the middle of a cancel's compensations: the restarted one
/// finishes them (the cancel is on the log).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cancel_survives_a_coordinator_crash_during_its_compensations() {
    let nats = NatsServer::start();
    let svc = StepService::start().await;
    svc.set("/charge", Mode::Slow(1000));
    let cfg = config(&nats.url(), &svc.url(), "place-order");
    // Crashes right after its first compensation call, before logging it.
    let mut coord = Coordinator::spawn(&cfg, Some("after-compensation-call=1"));
    let id = start_instance(&coord.url(), "place-order", json!({"order": "c-2"})).await;
    wait_until("the slow step in flight", || {
        svc.calls_of(&id).iter().any(|c| c.path == "/charge")
    })
    .await;
    let (status, body) = post(
        &format!("{}/v1/sagas/place-order/{id}/cancel", coord.url()),
        json!({"by": "bob"}),
    )
    .await;
    assert_eq!(status, 202, "{body}");
    let deadline = Instant::now() + Duration::from_secs(20);
    while !coord.exited() {
        assert!(Instant::now() < deadline, "the crash point was not hit");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let mid = instances(&nats.url(), "place-order")
        .await
        .remove(&id)
        .unwrap();
    assert_eq!(mid.status, Status::Cancelling);
    assert_eq!(paths(&svc.calls_of(&id)).last().unwrap(), "/charge/undo");

    coord = Coordinator::spawn(&cfg, None);
    let inst = wait_end(&nats.url(), "place-order", &id).await;
    assert_eq!(inst.status, Status::Cancelled, "{:?}", inst.reason);
    let calls = svc.calls_of(&id);
    assert_eq!(
        paths(&calls),
        [
            "/reserve",
            "/charge",
            "/charge/undo",
            "/charge/undo",
            "/reserve/undo"
        ],
        "the cut-short compensation made again, then step 1's"
    );
    assert_eq!(calls[2].key, calls[3].key, "same idempotency key");
    assert!(inst.reason.unwrap().contains("cancelled by bob"));
    drop(coord);
}

/// A CompensationFailed instance retried once the step service is fixed: the failed
/// compensation runs again with the same key (here with a crash in the middle of the retry),
/// the instance ends Compensated and its dead letter is deleted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_retry_reruns_the_failed_compensations_and_resolves_the_dead_letter() {
    let nats = NatsServer::start();
    let svc = StepService::start().await;
    svc.set("/ship", Mode::Status(422));
    svc.set("/charge/undo", Mode::Status(500));
    let cfg = config(&nats.url(), &svc.url(), "place-order");
    let mut coord = Coordinator::spawn(&cfg, None);
    let base = format!("{}/v1/sagas/place-order", coord.url());
    let mut ids = Vec::new();
    for order in ["r-1", "r-2"] {
        let (_, body) = request(
            "POST",
            &format!("{base}?wait=10s"),
            Some(json!({"order": order})),
            &[],
        )
        .await
        .unwrap();
        assert_eq!(body["status"], "CompensationFailed", "{body}");
        ids.push(body["id"].as_str().unwrap().to_string());
    }
    let js = async_nats::jetstream::new(async_nats::connect(nats.url()).await.unwrap());
    let dlq = "weir_saga_shop_place-order_dlq";
    let dead = |js: async_nats::jetstream::Context| async move {
        let mut s = js.get_stream(dlq).await.unwrap();
        s.info().await.unwrap().state.messages
    };
    assert_eq!(dead(js.clone()).await, 2);
    // Not CompensationFailed: 409; unknown: 404.
    let (status, body) = post(&format!("{base}/nope/retry"), json!({})).await;
    assert_eq!(status, 404, "{body}");

    // The first instance: the coordinator crashes right after the retried compensation call.
    svc.set("/charge/undo", Mode::Ok);
    coord.kill();
    coord = Coordinator::spawn(&cfg, Some("after-compensation-call=1"));
    let base = format!("{}/v1/sagas/place-order", coord.url());
    let (status, body) = post(
        &format!("{base}/{}/retry", ids[0]),
        json!({"by": "ops", "reason": "payments fixed"}),
    )
    .await;
    assert_eq!(status, 202, "{body}");
    let deadline = Instant::now() + Duration::from_secs(20);
    while !coord.exited() {
        assert!(Instant::now() < deadline, "the crash point was not hit");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    coord = Coordinator::spawn(&cfg, None);
    let base = format!("{}/v1/sagas/place-order", coord.url());
    let inst = wait_end(&nats.url(), "place-order", &ids[0]).await;
    assert_eq!(inst.status, Status::Compensated, "{:?}", inst.reason);
    let calls = svc.calls_of(&ids[0]);
    let undo: Vec<&Call> = calls.iter().filter(|c| c.path == "/charge/undo").collect();
    assert_eq!(
        undo.len(),
        3 + 2,
        "3 failed, the retried call cut short by the crash, and again: {:?}",
        paths(&calls)
    );
    assert!(
        undo.iter()
            .all(|c| c.key == format!("place-order/{}/charge/compensate", ids[0]))
    );
    assert_eq!(
        calls.iter().filter(|c| c.path == "/reserve/undo").count(),
        1,
        "a compensation that succeeded is not run again"
    );
    let retry = inst
        .entries
        .iter()
        .find_map(|e| match &e.event {
            Event::RetryRequested {
                requested_by,
                reason,
            } => Some((requested_by.clone(), reason.clone())),
            _ => None,
        })
        .unwrap();
    assert_eq!(retry, ("ops".to_string(), "payments fixed".to_string()));
    assert_eq!(
        dead(js.clone()).await,
        1,
        "the first instance's dead letter is deleted"
    );
    let left = read_all(&js, dlq).await;
    let left: Vec<Value> = left
        .iter()
        .map(|m| serde_json::from_slice(&m.payload).unwrap())
        .collect();
    assert!(
        left.iter().all(|v| v["sagaId"] == ids[1].as_str()),
        "{left:?}"
    );

    // Retry again: 409 (it is Compensated now).
    let (status, body) = post(&format!("{base}/{}/retry", ids[0]), json!({})).await;
    assert_eq!(status, 409, "{body}");
    assert!(
        body["error"].as_str().unwrap().contains("Compensated"),
        "{body}"
    );

    // The second one with the command line's batch form, twice (idempotent).
    let (ok, out, err) = weir_saga(&[
        "retry",
        "place-order",
        "--all",
        "-n",
        "shop",
        "--broker-url",
        &nats.url(),
        "--reason",
        "batch",
    ]);
    assert!(ok, "{out}{err}");
    assert!(
        out.contains(&ids[1]) && out.contains("retry requested"),
        "{out}"
    );
    let inst = wait_end(&nats.url(), "place-order", &ids[1]).await;
    assert_eq!(inst.status, Status::Compensated);
    let (ok, out, err) = weir_saga(&[
        "retry",
        "place-order",
        "--all",
        "-n",
        "shop",
        "--broker-url",
        &nats.url(),
    ]);
    assert!(ok, "{out}{err}");
    assert!(out.contains("no instance"), "{out}");
    // One id that cannot be retried: a clear error, non-zero exit.
    let (ok, _, err) = weir_saga(&[
        "retry",
        "place-order",
        &ids[1],
        "-n",
        "shop",
        "--broker-url",
        &nats.url(),
    ]);
    assert!(!ok);
    assert!(
        err.contains(&ids[1]) && err.contains("Compensated"),
        "{err}"
    );
    let deadline = Instant::now() + Duration::from_secs(10);
    while dead(js.clone()).await != 0 {
        assert!(
            Instant::now() < deadline,
            "dead letter of the second not deleted"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let (_, stats) = request("GET", &format!("{}/v1/stats", coord.url()), None, &[])
        .await
        .unwrap();
    assert_eq!(
        (stats["failed"].as_i64(), stats["compensated"].as_i64()),
        (Some(0), Some(2)),
        "{stats}"
    );
}

/// Instances run the definition they started with: removing a step and renaming a target in
/// the coordinator's config changes nothing for them, only for new instances.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn running_instances_keep_the_definition_they_started_with() {
    let nats = NatsServer::start();
    let svc = StepService::start().await;
    let billing = StepService::start().await;
    svc.set("/charge", Mode::Slow(1500));
    let v1_cfg = config(&nats.url(), &svc.url(), "place-order");
    let v1 = weir_saga::coordinator::Definition::of(&v1_cfg).version();
    let mut coord = Coordinator::spawn(&v1_cfg, None);
    let mut old = Vec::new();
    for i in 0..3 {
        old.push(
            start_instance(
                &coord.url(),
                "place-order",
                json!({"order": format!("v-{i}")}),
            )
            .await,
        );
    }
    wait_until("every old instance in its slow step", || {
        old.iter()
            .all(|id| svc.calls_of(id).iter().any(|c| c.path == "/charge"))
    })
    .await;
    coord.kill();

    // v2: no `ship` step, and `charge` calls target `billing` (target `payments` and
    // `shipping` are gone from the config).
    let mut v2_cfg = v1_cfg.clone();
    v2_cfg.steps.truncate(2);
    if let weir_crds::coordinator::CallConfig::Http(h) = &mut v2_cfg.steps[1].action {
        h.target = "billing".into();
    }
    v2_cfg.steps[1].compensation = None;
    v2_cfg.targets = BTreeMap::from([
        ("inventory".to_string(), svc.url()),
        ("billing".to_string(), billing.url()),
    ]);
    let v2 = weir_saga::coordinator::Definition::of(&v2_cfg).version();
    assert_ne!(v1, v2);
    coord = Coordinator::spawn(&v2_cfg, None);
    let new = start_instance(&coord.url(), "place-order", json!({"order": "v-new"})).await;
    let inst = wait_end(&nats.url(), "place-order", &new).await;
    assert_eq!(inst.status, Status::Completed);
    assert_eq!(inst.version.as_deref(), Some(v2.as_str()));
    assert_eq!(paths(&svc.calls_of(&new)), ["/reserve"]);
    assert_eq!(paths(&billing.calls_of(&new)), ["/charge"]);

    for id in &old {
        let inst = wait_end(&nats.url(), "place-order", id).await;
        assert_eq!(inst.status, Status::Completed, "{id}: {:?}", inst.reason);
        assert_eq!(inst.version.as_deref(), Some(v1.as_str()));
        let p = paths(&svc.calls_of(id));
        // The charge cut short by the kill is made again (same key), at its old target.
        assert!(
            p == ["/reserve", "/charge", "/charge", "/ship"]
                || p == ["/reserve", "/charge", "/ship"],
            "{id}: {p:?}"
        );
        assert!(
            billing.calls_of(id).is_empty(),
            "{id}: called the renamed target"
        );
    }
    let (_, stats) = request("GET", &format!("{}/v1/stats", coord.url()), None, &[])
        .await
        .unwrap();
    assert_eq!(stats["currentVersion"], v2.as_str(), "{stats}");
    assert_eq!(stats["versions"][&v1]["completed"], 3, "{stats}");
    assert_eq!(stats["versions"][&v2]["completed"], 1, "{stats}");
    let (_, list) = request(
        "GET",
        &format!("{}/v1/sagas/place-order?version={v1}", coord.url()),
        None,
        &[],
    )
    .await
    .unwrap();
    assert_eq!(list["instances"].as_array().unwrap().len(), 3, "{list}");
    let (ok, out, err) = weir_saga(&[
        "list",
        "place-order",
        "-n",
        "shop",
        "--broker-url",
        &nats.url(),
        "--version",
        &v2,
    ]);
    assert!(ok, "{err}");
    assert!(out.contains(&new) && out.contains("1 instance(s)"), "{out}");
}

/// While old instances still run, `/v1/stats` counts them under their version.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stats_count_running_instances_per_version() {
    let nats = NatsServer::start();
    let svc = StepService::start().await;
    svc.set("/charge", Mode::Slow(3000));
    let cfg = config(&nats.url(), &svc.url(), "place-order");
    let v1 = weir_saga::coordinator::Definition::of(&cfg).version();
    let coord = Coordinator::spawn(&cfg, None);
    let a = start_instance(&coord.url(), "place-order", json!({})).await;
    let _b = start_instance(&coord.url(), "place-order", json!({})).await;
    wait_until("in flight", || !svc.calls_of(&a).is_empty()).await;
    let (_, stats) = request("GET", &format!("{}/v1/stats", coord.url()), None, &[])
        .await
        .unwrap();
    assert_eq!(stats["versions"][&v1]["running"], 2, "{stats}");
    assert_eq!(stats["running"], 2, "{stats}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn finished_instances_are_purged_by_state_and_age_and_after_the_retention() {
    let nats = NatsServer::start();
    let svc = StepService::start().await;
    svc.set("/ship", Mode::FailIfFlag);
    let cfg = config(&nats.url(), &svc.url(), "place-order");
    let coord = Coordinator::spawn(&cfg, None);
    let base = format!("{}/v1/sagas/place-order", coord.url());
    let mut ids = BTreeMap::new();
    for (order, fail) in [("p-1", false), ("p-2", false), ("p-3", true)] {
        let (_, body) = request(
            "POST",
            &format!("{base}?wait=10s"),
            Some(json!({"order": order, "fail": fail})),
            &[],
        )
        .await
        .unwrap();
        ids.insert(order, body["id"].as_str().unwrap().to_string());
    }
    let (status, body) = post(&format!("{base}/purge?state=running"), json!({})).await;
    assert_eq!(status, 409, "{body}");
    let (status, body) = post(&format!("{base}/purge?state=compensated"), json!({})).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["purged"], 1);
    assert_eq!(body["ids"], json!([ids["p-3"]]));
    let (_, body) = post(
        &format!("{base}/purge?state=completed&olderThan=1h"),
        json!({}),
    )
    .await;
    assert_eq!(body["purged"], 0, "too recent");
    tokio::time::sleep(Duration::from_millis(1200)).await;
    let (_, body) = post(
        &format!("{base}/purge?state=completed&olderThan=1s"),
        json!({}),
    )
    .await;
    assert_eq!(body["purged"], 2, "{body}");
    assert!(instances(&nats.url(), "place-order").await.is_empty());
    let (_, list) = request("GET", &base, None, &[]).await.unwrap();
    assert_eq!(list["instances"], json!([]), "the view forgets them too");
    let (_, stats) = request("GET", &format!("{}/v1/stats", coord.url()), None, &[])
        .await
        .unwrap();
    assert_eq!(stats["completed"], 0, "{stats}");

    // The command line's purge.
    let (_, body) = request("POST", &format!("{base}?wait=10s"), Some(json!({})), &[])
        .await
        .unwrap();
    let id = body["id"].as_str().unwrap().to_string();
    let (ok, out, err) = weir_saga(&[
        "purge",
        "place-order",
        "-n",
        "shop",
        "--broker-url",
        &nats.url(),
        "--state",
        "completed",
        "--older-than",
        "7d",
    ]);
    assert!(ok && out.contains("0 instance(s) purged"), "{out}{err}");
    let (ok, out, err) = weir_saga(&[
        "purge",
        "place-order",
        "-n",
        "shop",
        "--broker-url",
        &nats.url(),
        "--state",
        "finished",
    ]);
    assert!(
        ok && out.contains(&id) && out.contains("1 instance(s) purged"),
        "{out}{err}"
    );
    let (ok, _, err) = weir_saga(&[
        "purge",
        "place-order",
        "-n",
        "shop",
        "--broker-url",
        &nats.url(),
        "--state",
        "running",
    ]);
    assert!(!ok && err.contains("never purged"), "{err}");
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let (_, list) = request("GET", &base, None, &[]).await.unwrap();
        if list["instances"] == json!([]) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the purge notice did not reach the view: {list}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    drop(coord);

    // Retention: finished instances go by themselves.
    let mut cfg = cfg.clone();
    cfg.retention_ms = Some(1000);
    let coord = Coordinator::spawn(&cfg, None);
    let (_, body) = request(
        "POST",
        &format!("{}/v1/sagas/place-order?wait=10s", coord.url()),
        Some(json!({})),
        &[],
    )
    .await
    .unwrap();
    let id = body["id"].as_str().unwrap().to_string();
    assert!(
        instances(&nats.url(), "place-order")
            .await
            .contains_key(&id)
    );
    let deadline = Instant::now() + Duration::from_secs(10);
    while instances(&nats.url(), "place-order")
        .await
        .contains_key(&id)
    {
        assert!(Instant::now() < deadline, "not purged after the retention");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_command_line_cancels_every_running_instance_once() {
    let nats = NatsServer::start();
    let svc = StepService::start().await;
    svc.set("/charge", Mode::Slow(1500));
    let cfg = config(&nats.url(), &svc.url(), "place-order");
    let coord = Coordinator::spawn(&cfg, None);
    let mut ids = Vec::new();
    for i in 0..3 {
        ids.push(
            start_instance(
                &coord.url(),
                "place-order",
                json!({"order": format!("b-{i}")}),
            )
            .await,
        );
    }
    wait_until("all in flight", || {
        ids.iter()
            .all(|id| svc.calls_of(id).iter().any(|c| c.path == "/charge"))
    })
    .await;
    let args = [
        "cancel",
        "place-order",
        "--all",
        "--state",
        "running",
        "-n",
        "shop",
        "--broker-url",
        &nats.url(),
        "--reason",
        "maintenance",
        "--by",
        "carol",
    ];
    let (ok, out, err) = weir_saga(&args);
    assert!(ok, "{out}{err}");
    for id in &ids {
        assert!(out.contains(&format!("{id}: cancel requested")), "{out}");
    }
    // Again: none is running any more (they are cancelling or cancelled): nothing to do.
    let (ok, out, err) = weir_saga(&args);
    assert!(ok, "{out}{err}");
    for id in &ids {
        let inst = wait_end(&nats.url(), "place-order", id).await;
        assert_eq!(inst.status, Status::Cancelled, "{id}: {:?}", inst.reason);
        assert_eq!(
            paths(&svc.calls_of(id)),
            ["/reserve", "/charge", "/charge/undo", "/reserve/undo"]
        );
        assert!(
            inst.reason
                .clone()
                .unwrap()
                .contains("cancelled by carol: maintenance")
        );
    }
    // One id: already cancelled is fine; a finished one is refused, naming it and its state.
    let one = |id: &str| {
        weir_saga(&[
            "cancel",
            "place-order",
            id,
            "-n",
            "shop",
            "--broker-url",
            &nats.url(),
        ])
    };
    let (ok, out, _) = one(&ids[0]);
    assert!(ok && out.contains("already Cancelled"), "{out}");
    svc.set("/charge", Mode::Ok);
    let (_, body) = request(
        "POST",
        &format!("{}/v1/sagas/place-order?wait=10s", coord.url()),
        Some(json!({})),
        &[],
    )
    .await
    .unwrap();
    let done = body["id"].as_str().unwrap();
    let (ok, _, err) = one(done);
    assert!(!ok, "cancelling a completed instance must fail");
    assert!(err.contains(done) && err.contains("Completed"), "{err}");
    let (ok, _, err) = one("nope");
    assert!(!ok && err.contains("no instance nope"), "{err}");
    let (ok, out, _) = weir_saga(&[
        "list",
        "place-order",
        "-n",
        "shop",
        "--broker-url",
        &nats.url(),
        "--state",
        "cancelled",
    ]);
    assert!(ok && out.contains("3 instance(s)"), "{out}");
}

/// A cancel sent to a replica that does not drive the instance: the driver meets the request on
/// the log at its next append and compensates; nobody waits for a lease to expire.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cancel_sent_to_another_replica_reaches_the_driver() {
    let nats = NatsServer::start();
    let svc = StepService::start().await;
    svc.set("/charge", Mode::Slow(1000));
    let mut cfg = config(&nats.url(), &svc.url(), "place-order");
    cfg.lease_ttl_ms = 10_000;
    let a = Coordinator::spawn(&cfg, None);
    let b = Coordinator::spawn(&cfg, None);
    let id = start_instance(&a.url(), "place-order", json!({"order": "x-1"})).await;
    wait_until("the slow step in flight", || {
        svc.calls_of(&id).iter().any(|c| c.path == "/charge")
    })
    .await;
    let asked = Instant::now();
    let (status, body) = post(
        &format!("{}/v1/sagas/place-order/{id}/cancel", b.url()),
        json!({"by": "dave"}),
    )
    .await;
    assert_eq!(status, 202, "{body}");
    let inst = wait_end(&nats.url(), "place-order", &id).await;
    assert!(
        asked.elapsed() < Duration::from_secs(5),
        "ended {:?} after the cancel: it waited for the lease",
        asked.elapsed()
    );
    assert_eq!(inst.status, Status::Cancelled);
    assert_eq!(
        paths(&svc.calls_of(&id)),
        ["/reserve", "/charge", "/charge/undo", "/reserve/undo"]
    );
    let writers: std::collections::BTreeSet<&str> = inst
        .entries
        .iter()
        .filter(|e| !e.event.is_request())
        .map(|e| e.by.as_str())
        .collect();
    assert_eq!(
        writers.len(),
        1,
        "one driver from start to end: {writers:?}"
    );
}
