//! `weir up` through the real binary, with a real nats-server, real sidecars and the weir-echo
//! app: examples/events end to end (an event through one sidecar to the broker and through the
//! other to the consuming app, a bad one refused with 422, SIGTERM stops everything, exit 0);
//! the broker killed with SIGKILL and restarted on its port; exit codes when a run ends because
//! something failed; replicas of a Microservice and of a Saga. Needs `cargo build --workspace
//! --bins` (scripts/test.sh does it) and nats-server (scripts/setup.sh).

mod up_support;

use serde_json::Value;
use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};
use up_support::*;

#[test]
fn events_example_runs_end_to_end_under_weir_up() {
    let mut up = Up::start(&["-f", "examples/events"], Duration::from_secs(60));
    let s = up.state();
    assert!(
        s["brokerUrl"]
            .as_str()
            .unwrap()
            .starts_with("nats://127.0.0.1:")
    );

    let (st, body) = request(
        up.port("accounts"),
        "POST",
        "/publish/signups",
        r#"{"userId": "u1", "email": "a@example.com"}"#,
    );
    assert_eq!(st, 202, "{body}");
    let (st, body) = request(
        up.port("accounts"),
        "POST",
        "/publish/signups",
        r#"{"userId": "u2"}"#,
    );
    assert_eq!(st, 422, "{body}");
    assert!(body.contains("email"), "{body}");

    let start = Instant::now();
    let received = loop {
        let events = received(up.port("mailer"));
        if !events.is_empty() || start.elapsed() > Duration::from_secs(10) {
            break events;
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    assert_eq!(
        received.len(),
        1,
        "exactly the valid event reaches mailer: {received:?}"
    );
    assert_eq!(received[0]["data"]["userId"], "u1");
    assert_eq!(received[0]["type"], "UserSignedUp");
    assert!(
        start.elapsed() < Duration::from_secs(3),
        "delivered promptly, took {:?}",
        start.elapsed()
    );

    // SIGTERM: apps, then sidecars, then the broker stop; weir up exits 0.
    let st = up.terminate();
    assert!(st.success(), "{st}");
}

/// The broker's pid and port from the state file.
fn broker(up: &Up, label: &str) -> (u64, u16) {
    let b = &up.state()["brokers"][label];
    let pid = b["pid"]
        .as_u64()
        .unwrap_or_else(|| panic!("no pid of {label} in the state file: {b}"));
    (pid, b["port"].as_u64().unwrap() as u16)
}

#[test]
fn a_killed_broker_is_restarted_on_its_port_and_events_flow_again() {
    let mut up = Up::start(&["-f", "examples/events"], Duration::from_secs(60));
    let mailer = up.port("mailer");
    publish_signup(&up, "before", Duration::from_secs(10));
    wait_for("the first event at mailer", Duration::from_secs(10), || {
        (received(mailer).len() == 1).then_some(())
    });

    let (pid, port) = broker(&up, "nats");
    assert!(
        up.state()["brokerUrl"]
            .as_str()
            .unwrap()
            .ends_with(&format!(":{port}")),
        "the port in the state file is the broker URL's"
    );
    kill9(pid);
    let (new_pid, new_port) = wait_for(
        "a new nats-server in the state file",
        Duration::from_secs(20),
        || {
            let (p, port) = broker(&up, "nats");
            (p != pid).then_some((p, port))
        },
    );
    assert_eq!(new_port, port, "restarted on the same port");
    wait_for(
        "the restarted broker listening again",
        Duration::from_secs(20),
        || {
            up.log()
                .contains(&format!("weir up: nats is back on 127.0.0.1:{port}"))
                .then_some(())
        },
    );
    assert!(
        up.log()
            .contains("weir up: nats exited (signal: 9 (SIGKILL)); restarting in 500ms"),
        "{}",
        up.log()
    );

    // The sidecars reconnect: an event published now reaches the consumer, and the one from
    // before the kill was kept in the broker's store (not delivered again as new).
    publish_signup(&up, "after", Duration::from_secs(30));
    let events = up.until(
        "the event published after the restart at mailer",
        Duration::from_secs(30),
        || {
            let e = received(mailer);
            e.iter()
                .any(|e| e["data"]["userId"] == "after")
                .then_some(e)
        },
    );
    let users: Vec<&str> = events
        .iter()
        .filter_map(|e| e["data"]["userId"].as_str())
        .collect();
    assert_eq!(users, ["before", "after"], "{events:?}");
    eprintln!("nats pid {pid} → {new_pid}, port {port}; events {users:?}");

    let st = up.terminate();
    assert!(st.success(), "Ctrl-C/SIGTERM is not a failure: {st}");
}

#[test]
fn a_process_that_exits_under_no_restart_fails_the_run() {
    let mut up = Up::start(
        &["-f", "examples/events", "--no-restart"],
        Duration::from_secs(60),
    );
    let pid = up.state()["services"]["mailer"]["pid"].as_u64().unwrap();
    kill9(pid);
    let st = up.wait_exit(Duration::from_secs(30));
    let log = up.log();
    assert!(!st.success(), "weir up exits non-zero: {st}\n{log}");
    assert!(
        log.contains("mailer exited (signal: 9 (SIGKILL)) and --no-restart is set"),
        "{log}"
    );
}

#[test]
fn a_broker_that_cannot_listen_again_fails_the_run() {
    let mut up = Up::start(&["-f", "examples/events"], Duration::from_secs(60));
    let (pid, port) = broker(&up, "nats");
    kill9(pid);
    // Another program takes the port while the broker is down: its restart cannot listen.
    let squatter = wait_for("the broker's port", Duration::from_secs(5), || {
        std::net::TcpListener::bind(("127.0.0.1", port)).ok()
    });
    let st = up.wait_exit(Duration::from_secs(30));
    let log = up.log();
    drop(squatter);
    assert!(!st.success(), "weir up exits non-zero: {st}\n{log}");
    assert!(
        log.contains(&format!(
            "nats could not be restarted: it exited (exit status: 1) before listening on port {port} again"
        )),
        "{log}"
    );
    assert!(
        !log.contains("nats is back"),
        "a port answered by another program is not the broker back: {log}"
    );
}

/// examples/events with `replicas: 2` on mailer.
fn events_with_replicas(dir: &std::path::Path) -> String {
    let src = root().join("examples/events");
    for f in ["broker.yaml", "signups.yaml", "services.yaml"] {
        let text = std::fs::read_to_string(src.join(f)).unwrap();
        let text = text.replace(
            "  name: mailer\n  annotations:\n    weir.dev/local-command: weir-echo\nspec:\n",
            "  name: mailer\n  annotations:\n    weir.dev/local-command: weir-echo\nspec:\n  replicas: 2\n",
        );
        std::fs::write(dir.join(f), text).unwrap();
    }
    let services = std::fs::read_to_string(dir.join("services.yaml")).unwrap();
    assert!(services.contains("replicas: 2"), "{services}");
    dir.to_string_lossy().into_owned()
}

#[test]
fn each_replica_of_a_microservice_runs_consumes_and_is_restarted() {
    let manifests = tempfile::tempdir().unwrap();
    let dir = events_with_replicas(manifests.path());
    let mut up = Up::start(&["-f", &dir], Duration::from_secs(60));
    let s = up.state();
    let services = s["services"].as_object().unwrap();
    let names: BTreeSet<&str> = services.keys().map(String::as_str).collect();
    assert_eq!(
        names,
        BTreeSet::from(["accounts", "mailer-0", "mailer-1"]),
        "{s}"
    );
    let mut ports = BTreeSet::new();
    for r in ["mailer-0", "mailer-1"] {
        assert_eq!(services[r]["microservice"], "mailer");
        for k in ["app", "inbound", "admin"] {
            assert!(ports.insert(services[r][k].as_u64().unwrap()), "{s}");
        }
    }
    let log = up.log();
    for prefix in [
        "[mailer-0] ",
        "[mailer-1] ",
        "[mailer-0/proxy] ",
        "[mailer-1/proxy] ",
    ] {
        assert!(log.contains(prefix), "no {prefix:?} in the log:\n{log}");
    }

    // Both consume: the queue's events are shared between them, each delivered once.
    let share = |batch: &str, n: usize| -> BTreeMap<String, Vec<String>> {
        for i in 0..n {
            publish_signup(&up, &format!("{batch}{i}"), Duration::from_secs(30));
        }
        wait_for(
            &format!("the {n} events of batch {batch} at mailer"),
            Duration::from_secs(30),
            || {
                let got: BTreeMap<String, Vec<String>> = ["mailer-0", "mailer-1"]
                    .into_iter()
                    .map(|r| {
                        let users = received(up.port(r))
                            .iter()
                            .filter_map(|e| e["data"]["userId"].as_str().map(str::to_string))
                            .filter(|u| u.starts_with(batch))
                            .collect();
                        (r.to_string(), users)
                    })
                    .collect();
                (got.values().map(Vec::len).sum::<usize>() >= n).then_some(got)
            },
        )
    };
    let got = share("a", 40);
    let all: Vec<&String> = got.values().flatten().collect();
    let distinct: BTreeSet<&String> = all.iter().copied().collect();
    assert_eq!((all.len(), distinct.len()), (40, 40), "{got:?}");
    assert!(
        got.values().all(|v| !v.is_empty()),
        "each replica consumes its share: {got:?}"
    );
    eprintln!(
        "shares: mailer-0 {}, mailer-1 {}",
        got["mailer-0"].len(),
        got["mailer-1"].len()
    );

    // Each replica's app and sidecar is restarted on its own when killed.
    let before = up.state();
    for r in ["mailer-0", "mailer-1"] {
        kill9(before["services"][r]["pid"].as_u64().unwrap());
    }
    kill9(before["services"]["mailer-1"]["proxyPid"].as_u64().unwrap());
    wait_for("new pids of both replicas", Duration::from_secs(30), || {
        let now = up.state();
        let changed = |r: &str, k: &str| {
            now["services"][r][k].is_u64() && now["services"][r][k] != before["services"][r][k]
        };
        (changed("mailer-0", "pid")
            && changed("mailer-1", "pid")
            && changed("mailer-1", "proxyPid"))
        .then_some(())
    });
    assert_eq!(
        up.state()["services"]["mailer-0"]["proxyPid"],
        before["services"]["mailer-0"]["proxyPid"],
        "only what was killed restarts"
    );
    for r in ["mailer-0", "mailer-1"] {
        let port = up.port(r);
        wait_for(
            &format!("{r} answering again"),
            Duration::from_secs(30),
            || (request(port, "GET", "/received", "").0 == 200).then_some(()),
        );
    }
    let got = share("b", 40);
    let all: Vec<&String> = got.values().flatten().collect();
    assert_eq!(all.len(), 40, "{got:?}");
    assert!(got.values().all(|v| !v.is_empty()), "{got:?}");

    let st = up.terminate();
    assert!(st.success(), "{st}");
}

const SAGA: &str = r#"
apiVersion: weir.dev/v1alpha1
kind: Broker
metadata: {name: bus}
spec: {url: "nats://unused:4222"}
---
apiVersion: weir.dev/v1alpha1
kind: Queue
metadata: {name: orders}
spec: {broker: bus, eventType: orders.created}
---
apiVersion: weir.dev/v1alpha1
kind: Queue
metadata: {name: outcomes}
spec: {broker: bus}
---
apiVersion: weir.dev/v1alpha1
kind: Microservice
metadata:
  name: shop
  annotations: {weir.dev/local-command: weir-echo}
spec:
  image: weir-echo
  publishes: [{queue: orders}]
  consumes: [{queue: outcomes, path: /events/outcome}]
---
apiVersion: weir.dev/v1alpha1
kind: Microservice
metadata:
  name: warehouse
  annotations: {weir.dev/local-command: weir-echo}
spec: {image: weir-echo}
---
apiVersion: weir.dev/v1alpha1
kind: Saga
metadata: {name: checkout}
spec:
  broker: bus
  replicas: 2
  trigger: {http: true, queue: orders}
  steps:
    - name: pick
      timeout: 5s
      action: {http: {microservice: warehouse, method: GET, path: /sleep/300}}
    - name: pack
      timeout: 5s
      action: {http: {microservice: warehouse, method: GET, path: /sleep/300}}
  onCompleted: {queue: outcomes, type: CheckoutCompleted}
  onFailed: {queue: outcomes, type: CheckoutFailed}
"#;

#[test]
fn two_saga_coordinators_complete_every_instance_once_across_a_kill() {
    let manifests = tempfile::tempdir().unwrap();
    std::fs::write(manifests.path().join("checkout.yaml"), SAGA).unwrap();
    let dir = manifests.path().to_string_lossy().into_owned();
    let mut up = Up::start(&["-f", &dir], Duration::from_secs(60));
    let s = up.state();
    let sagas = s["sagas"].as_object().unwrap();
    assert_eq!(
        sagas.keys().map(String::as_str).collect::<Vec<_>>(),
        ["checkout-0", "checkout-1"],
        "{s}"
    );
    let url = |r: &str| -> u16 {
        sagas[r]["url"]
            .as_str()
            .unwrap()
            .rsplit(':')
            .next()
            .unwrap()
            .parse()
            .unwrap()
    };
    let (c0, c1) = (url("checkout-0"), url("checkout-1"));
    assert_ne!(c0, c1);
    for r in ["[checkout-0/saga] ", "[checkout-1/saga] "] {
        assert!(up.log().contains(r), "no {r:?} in the log");
    }

    // 10 instances started on each coordinator, 10 by events on the trigger queue (shared by
    // both coordinators' consumers); each step takes 300 ms.
    let mut ids = BTreeSet::new();
    for i in 0..20 {
        let port = if i % 2 == 0 { c0 } else { c1 };
        let key = format!("order-{i}");
        let (st, body) = request_with(
            port,
            "POST",
            "/v1/sagas/checkout",
            &format!(r#"{{"order": "{key}"}}"#),
            &[("idempotency-key", &key)],
        );
        assert_eq!(st, 202, "{body}");
        let v: Value = serde_json::from_str(&body).unwrap();
        ids.insert(v["id"].as_str().unwrap().to_string());
    }
    let shop = up.port("shop");
    for i in 0..10 {
        let (st, body) = request(
            shop,
            "POST",
            "/publish/orders",
            &format!(r#"{{"order": "event-{i}"}}"#),
        );
        assert_eq!(st, 202, "{body}");
    }
    // kill -9 one coordinator while instances are in their steps: its instances are resumed
    // (by the other or by its restart) once their leases expire.
    std::thread::sleep(Duration::from_millis(200));
    let pid = sagas["checkout-1"]["pid"].as_u64().unwrap();
    kill9(pid);
    wait_for("checkout-1 restarted", Duration::from_secs(20), || {
        let p = up.state()["sagas"]["checkout-1"]["pid"].as_u64();
        (p.is_some() && p != Some(pid)).then_some(())
    });

    wait_for("30 outcome events at shop", Duration::from_secs(90), || {
        (received(shop).len() >= 30).then_some(())
    });
    // Give a duplicate, if any, the time to arrive.
    std::thread::sleep(Duration::from_secs(2));
    let outcomes = received(shop);
    let mut per_instance: BTreeMap<String, usize> = BTreeMap::new();
    for e in &outcomes {
        assert_eq!(e["type"], "CheckoutCompleted", "{e}");
        assert_eq!(e["data"]["outcome"], "Completed", "{e}");
        *per_instance
            .entry(e["data"]["sagaId"].as_str().unwrap().to_string())
            .or_default() += 1;
    }
    assert_eq!(per_instance.len(), 30, "{per_instance:?}");
    assert!(
        per_instance.values().all(|n| *n == 1),
        "one outcome per instance: {per_instance:?}"
    );
    for id in &ids {
        assert!(per_instance.contains_key(id), "{id} has no outcome");
    }

    // Each instance's log: started once, completed once; both replicas drove instances.
    let mut by = BTreeSet::new();
    for id in per_instance.keys() {
        let (st, body) = request(c0, "GET", &format!("/v1/sagas/checkout/{id}"), "");
        assert_eq!(st, 200, "{body}");
        let v: Value = serde_json::from_str(&body).unwrap();
        assert_eq!(v["status"], "Completed", "{v}");
        let entries = v["entries"].as_array().unwrap();
        let count = |t: &str| entries.iter().filter(|e| e["type"] == t).count();
        assert_eq!((count("started"), count("completed")), (1, 1), "{v}");
        for e in entries {
            by.insert(e["by"].as_str().unwrap_or_default().to_string());
        }
    }
    assert!(
        by.contains("checkout-0") && by.contains("checkout-1"),
        "both coordinators drove instances: {by:?}"
    );
    eprintln!("30 instances completed once each, driven by {by:?}");

    let st = up.terminate();
    assert!(st.success(), "{st}");
}

/// examples/grpc: a gRPC service (tonic) probed with the gRPC health protocol, called by an HTTP
/// app through both sidecars under a dependency policy that speaks gRPC.
#[test]
fn grpc_example_runs_under_weir_up() {
    let target = target();
    for bin in ["weir-grpc-inventory", "weir-grpc-storefront"] {
        assert!(target.join(bin).is_file(), "{bin} not built");
    }
    // `weir up` is ready only once inventory's gRPC health check says SERVING.
    let mut up = Up::start(&["-f", "examples/grpc"], Duration::from_secs(60));
    let admin = up.state()["services"]["inventory"]["admin"]
        .as_u64()
        .unwrap() as u16;
    assert_eq!(
        request(admin, "GET", "/app-health/readiness", ""),
        (200, "app readiness: SERVING\n".into())
    );
    let port = up.port("storefront");
    let get = |path: &str| {
        let (st, body) = request(port, "GET", path, "");
        let v: Value = serde_json::from_str(&body).unwrap_or_else(|_| panic!("{st} {body}"));
        (st, v)
    };
    assert_eq!(
        get("/stock/apple"),
        (200, serde_json::json!({"sku": "apple", "count": 12}))
    );
    // UNAVAILABLE every other call, retried by the storefront's sidecar: never seen.
    for _ in 0..6 {
        assert_eq!(get("/stock/flaky").0, 200);
    }
    // NOT_FOUND is not retried and passes as it is.
    let (st, v) = get("/stock/plum");
    assert_eq!((st, v["error"].as_str()), (404, Some("NotFound")), "{v}");
    // A server stream, through both sidecars.
    assert_eq!(
        get("/watch/pear?updates=3"),
        (200, serde_json::json!({"sku": "pear", "counts": [3, 2, 1]}))
    );
    // Always UNAVAILABLE: retried, then the breaker opens on gRPC statuses (HTTP 200 each) and
    // the fallback answers with its gRPC status.
    let fallback = up.until("the fallback's answer", Duration::from_secs(10), || {
        let (st, v) = get("/stock/down");
        assert_eq!(st, 503, "{v}");
        (v["fallback"] == "circuit-open").then_some(v)
    });
    assert_eq!(fallback["message"], "inventory is resting", "{fallback}");
    assert_eq!(fallback["error"], "Unavailable");
    // The breaker is per dependency: apple now gets the fallback too, until it closes.
    assert_eq!(get("/stock/apple").1["fallback"], "circuit-open");

    let st = up.terminate();
    assert!(st.success(), "{st}");
}

#[test]
fn a_dependants_calls_are_balanced_across_the_replicas_of_a_microservice() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("services.yaml"),
        "apiVersion: weir.dev/v1alpha1\nkind: Microservice\nmetadata:\n  name: front\n  annotations:\n    weir.dev/local-command: weir-echo\nspec:\n  image: ghcr.io/weir-dev/weir-echo:0.1.0\n  dependencies:\n    - name: back\n      microservice: back\n---\napiVersion: weir.dev/v1alpha1\nkind: Microservice\nmetadata:\n  name: back\n  annotations:\n    weir.dev/local-command: weir-echo\nspec:\n  image: ghcr.io/weir-dev/weir-echo:0.1.0\n  replicas: 3\n",
    )
    .unwrap();
    let mut up = Up::start(
        &["-f", &dir.path().to_string_lossy()],
        Duration::from_secs(60),
    );
    let front = up.port("front");
    // Four callers at once, as an app's workers call: requests in flight weigh in the choice
    // (one caller alone is sent mostly to the replica measured fastest until the estimates
    // decay, 10 s by default). They call until every replica has answered 5 calls: on a quiet
    // machine that takes some 20 calls, each replica answering about a third. One slow answer
    // (a loaded machine) keeps a replica out of the choice until its peak-EWMA estimate decays,
    // which is the algorithm doing its work: the bound is a time, not a share of the first calls.
    const EACH: usize = 5;
    let deadline = Instant::now() + Duration::from_secs(40);
    let counts = std::sync::Mutex::new(BTreeMap::<String, usize>::new());
    let enough = |c: &BTreeMap<String, usize>| c.len() >= 3 && c.values().all(|n| *n >= EACH);
    std::thread::scope(|s| {
        for _ in 0..4 {
            s.spawn(|| {
                while Instant::now() < deadline && !enough(&counts.lock().unwrap()) {
                    let (st, body) = request(front, "GET", "/call/back/", "");
                    assert_eq!(st, 200, "{body}");
                    let v: Value = serde_json::from_str(&body).unwrap();
                    let pod = v["upstream"]["pod"].as_str().unwrap_or("?").to_string();
                    *counts.lock().unwrap().entry(pod).or_default() += 1;
                }
            });
        }
    });
    let by_pod = counts.into_inner().unwrap();
    eprintln!(
        "calls by replica: {by_pod:?} ({} calls)",
        by_pod.values().sum::<usize>()
    );
    assert_eq!(
        by_pod.keys().map(String::as_str).collect::<Vec<_>>(),
        ["back-0", "back-1", "back-2"],
        "{by_pod:?}"
    );
    assert!(
        by_pod.values().all(|n| *n >= EACH),
        "each replica takes a share: {by_pod:?}"
    );
    // front's sidecar lists the three as the dependency's endpoints.
    let admin = up.state()["services"]["front"]["admin"].as_u64().unwrap() as u16;
    let (st, body) = request(admin, "GET", "/endpoints", "");
    assert_eq!(st, 200, "{body}");
    let v: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(v["back"].as_array().map(Vec::len), Some(3), "{v}");
    assert!(up.terminate().success());
}

/// front declares back; intruder is no Microservice of the run.
const FRONT_AND_BACK: &str = "apiVersion: weir.dev/v1alpha1\nkind: Microservice\nmetadata:\n  name: front\n  annotations:\n    weir.dev/local-command: weir-echo\nspec:\n  image: ghcr.io/weir-dev/weir-echo:0.1.0\n  dependencies:\n    - name: back\n      microservice: back\n---\napiVersion: weir.dev/v1alpha1\nkind: Microservice\nmetadata:\n  name: back\n  annotations:\n    weir.dev/local-command: weir-echo\nspec:\n  image: ghcr.io/weir-dev/weir-echo:0.1.0\n";

/// `GET /` to `port` over mutual TLS with a certificate for `as_who` made with the run's issuer
/// (from the state file), expecting `server`: status and body.
fn mtls_get_as(up: &Up, port: u16, as_who: &str, server: &str) -> (u16, String) {
    use weir_identity::tls::{CurrentCert, TrustBundle};
    use weir_identity::{Authority, Issuer, WorkloadId, WorkloadKey};
    let m = &up.state()["mtls"];
    let read = |k: &str| std::fs::read_to_string(m[k].as_str().unwrap()).unwrap();
    let issuer = Issuer::new(Authority::from_pem(&read("issuerCert"), &read("issuerKey")).unwrap());
    let bundle = TrustBundle::from_pem(&read("bundle")).unwrap();
    let id = WorkloadId::parse(as_who).unwrap();
    let key = WorkloadKey::generate().unwrap();
    let issued = issuer
        .sign(
            &key.csr(&id).unwrap(),
            &id,
            std::time::SystemTime::now(),
            Duration::from_secs(600),
        )
        .unwrap();
    let cert = CurrentCert::new();
    cert.install(&issued.chain_pem, key.private_key()).unwrap();
    let server = WorkloadId::parse(server).unwrap();
    weir_testkit::mtls::get(([127, 0, 0, 1], port).into(), &bundle, cert, &server, "/")
        .unwrap_or((0, String::new()))
}

#[test]
fn sidecars_under_weir_up_use_mutual_tls_and_refuse_an_undeclared_caller() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("services.yaml"), FRONT_AND_BACK).unwrap();
    let mut up = Up::start(
        &["-f", &dir.path().to_string_lossy()],
        Duration::from_secs(60),
    );
    let (front, back) = (up.port("front"), up.port("back"));
    // front's call reaches back's app over mutual TLS, named by its verified identity.
    let (st, body) = request(front, "GET", "/call/back/", "");
    assert_eq!(st, 200, "{body}");
    let v: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(v["upstream"]["caller"], "default/front", "{v}");
    let admin = |s: &str| up.state()["services"][s]["admin"].as_u64().unwrap() as u16;
    let (_, metrics) = request(admin("back"), "GET", "/metrics", "");
    assert!(
        metrics.contains(r#"weir_inbound_authorizations_total{transport="mtls",caller="default/front",decision="allowed"} 1"#),
        "{metrics}"
    );
    let (_, metrics) = request(admin("front"), "GET", "/metrics", "");
    assert!(
        metrics.contains(r#"weir_tls_handshakes_total{direction="outbound",result="ok"} 1"#),
        "{metrics}"
    );
    // A workload with a valid certificate of this run that back does not declare: refused.
    let (st, body) = mtls_get_as(
        &up,
        back,
        "spiffe://cluster.local/ns/default/ms/intruder",
        "spiffe://cluster.local/ns/default/ms/back",
    );
    assert_eq!((st, body.as_str()), (403, "caller-not-allowed\n"));
    // front, as itself, is let in (the same client, a declared identity).
    let (st, body) = mtls_get_as(
        &up,
        back,
        "spiffe://cluster.local/ns/default/ms/front",
        "spiffe://cluster.local/ns/default/ms/back",
    );
    assert_eq!(st, 200, "{body}");
    // curl to a service's port on this machine (loopback plaintext) keeps working, no caller.
    let (st, body) = request(back, "GET", "/", "");
    assert_eq!(st, 200, "{body}");
    assert_eq!(
        serde_json::from_str::<Value>(&body).unwrap()["caller"],
        Value::Null
    );
    assert!(up.terminate().success());

    // --no-mtls: plaintext between the sidecars, as before.
    let mut up = Up::start(
        &["-f", &dir.path().to_string_lossy(), "--no-mtls"],
        Duration::from_secs(60),
    );
    let (st, body) = request(up.port("front"), "GET", "/call/back/", "");
    assert_eq!(st, 200, "{body}");
    let v: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(v["upstream"]["caller"], Value::Null, "{v}");
    assert_eq!(up.state()["mtls"], Value::Null);
    assert!(up.terminate().success());
}
