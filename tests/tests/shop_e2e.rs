//! The shop (examples/shop) under `weir up`, driven from outside like a user would: no cluster,
//! a real broker (nats-server, redis-server, rabbitmq-server, or Tansu for Kafka), real
//! sidecars, the six services and the place-order saga coordinator.
//!
//! One run, in phases that build on each other: an order placed through the gateway completes
//! (saga, one capture, notifications); a trace crosses gateway → orders → users (OTLP receiver
//! and log lines); invalid input is refused or dead-lettered (an event injected on NATS or
//! Kafka); a declined payment is compensated; a slow users service trips the breaker and the
//! fallback answers; `kill -9` of payments while orders flow still charges each order exactly
//! once.
//!
//! Needs `cargo build --workspace --bins` (scripts/test.sh does it) and the brokers
//! (scripts/setup.sh installs them; Tansu and nats-server in .tools/bin). The Kafka run skips,
//! saying so, when Tansu is missing (outside CI).

use serde_json::{Value, json};
use std::collections::{BTreeMap, BTreeSet};
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// One HTTP/1.1 request on a fresh connection: (status, JSON body or string, time taken).
fn http(
    port: u16,
    method: &str,
    path: &str,
    body: Option<&Value>,
    headers: &[(&str, &str)],
) -> (u16, Value, Duration) {
    let started = Instant::now();
    let mut s = TcpStream::connect(("127.0.0.1", port)).expect("connect");
    s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    let payload = body.map(|b| b.to_string()).unwrap_or_default();
    let mut head = format!(
        "{method} {path} HTTP/1.1\r\nhost: 127.0.0.1\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n",
        payload.len()
    );
    for (k, v) in headers {
        head.push_str(&format!("{k}: {v}\r\n"));
    }
    head.push_str("\r\n");
    s.write_all(head.as_bytes()).unwrap();
    s.write_all(payload.as_bytes()).unwrap();
    let mut out = Vec::new();
    let _ = s.read_to_end(&mut out);
    let text = String::from_utf8_lossy(&out).to_string();
    let status = text
        .split(' ')
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    let raw = text
        .split_once("\r\n\r\n")
        .map(|x| x.1.to_string())
        .unwrap_or_default();
    let body = serde_json::from_str(&raw).unwrap_or(Value::String(raw));
    (status, body, started.elapsed())
}

fn wait_until<T>(what: &str, timeout: Duration, mut f: impl FnMut() -> Option<T>) -> T {
    let start = Instant::now();
    loop {
        if let Some(v) = f() {
            eprintln!("  ok: {what} ({:.1}s)", start.elapsed().as_secs_f64());
            return v;
        }
        assert!(
            start.elapsed() < timeout,
            "timed out after {timeout:?} waiting for {what}"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// `weir up -f examples/shop`, stopped (SIGTERM) when dropped.
struct Shop {
    child: Child,
    state_file: PathBuf,
    log_file: PathBuf,
    _dir: tempfile::TempDir,
}

impl Shop {
    fn start(otlp: &str, broker: &str) -> Shop {
        let target = root().join("target/debug");
        for bin in [
            "weir",
            "weir-proxy",
            "shop-gateway",
            "shop-orders",
            "shop-payments",
        ] {
            assert!(
                target.join(bin).is_file(),
                "{bin} not built: run `cargo build --workspace --bins` first"
            );
        }
        let dir = tempfile::tempdir().unwrap();
        let state_file = dir.path().join("state.json");
        let log_file = dir.path().join("up.log");
        let path = format!(
            "{}:{}:{}",
            target.display(),
            root().join(".tools/bin").display(),
            std::env::var("PATH").unwrap_or_default()
        );
        let log = std::fs::File::create(&log_file).unwrap();
        let child = Command::new(target.join("weir"))
            .args([
                "up",
                "-f",
                "examples/shop",
                "--any-port",
                "--otlp-endpoint",
                otlp,
                "--broker",
                broker,
            ])
            .arg("--state-file")
            .arg(&state_file)
            .arg("--work-dir")
            .arg(dir.path().join("work"))
            .current_dir(root())
            .env("PATH", path)
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .unwrap();
        let mut shop = Shop {
            child,
            state_file,
            log_file,
            _dir: dir,
        };
        let start = Instant::now();
        while !shop.state_file.exists() {
            if let Ok(Some(st)) = shop.child.try_wait() {
                panic!("weir up exited early: {st}\n{}", shop.log());
            }
            assert!(
                start.elapsed() < Duration::from_secs(120),
                "weir up not ready after 120s\n{}",
                shop.log()
            );
            std::thread::sleep(Duration::from_millis(200));
        }
        shop
    }

    fn state(&self) -> Value {
        serde_json::from_str(&std::fs::read_to_string(&self.state_file).unwrap()).unwrap()
    }

    /// A Microservice's entry in the state file: its replica 0's (`gateway-0` when it has
    /// `replicas: 2`), the one its dependants call.
    fn service(&self, service: &str) -> Value {
        let state = self.state();
        state["services"]
            .as_object()
            .and_then(|all| {
                all.values()
                    .find(|s| s["microservice"] == service && s["replica"] == 0)
            })
            .cloned()
            .unwrap_or_else(|| panic!("no service {service} in the state file: {state}"))
    }

    /// The names of a Microservice's replicas (their log prefixes): `users`, or `users-0` and
    /// `users-1` with `replicas: 2`; replica 0 first.
    fn replicas(&self, service: &str) -> Vec<String> {
        let state = self.state();
        let mut names: Vec<(u64, String)> = state["services"]
            .as_object()
            .unwrap()
            .iter()
            .filter(|(_, s)| s["microservice"] == service)
            .map(|(name, s)| (s["replica"].as_u64().unwrap(), name.clone()))
            .collect();
        names.sort();
        names.into_iter().map(|(_, n)| n).collect()
    }

    /// The inbound ports of every replica of a Microservice.
    fn ports(&self, service: &str) -> Vec<u16> {
        let state = self.state();
        state["services"]
            .as_object()
            .unwrap()
            .values()
            .filter(|s| s["microservice"] == service)
            .map(|s| s["inbound"].as_u64().unwrap() as u16)
            .collect()
    }

    fn port(&self, service: &str) -> u16 {
        self.service(service)["inbound"].as_u64().unwrap() as u16
    }

    fn admin(&self, service: &str) -> u16 {
        self.service(service)["admin"].as_u64().unwrap() as u16
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.log_file).unwrap_or_default()
    }

    fn order(&self, id: &str) -> Value {
        let (st, o, _) = http(
            self.port("gateway"),
            "GET",
            &format!("/orders/{id}"),
            None,
            &[],
        );
        assert_eq!(st, 200, "GET /orders/{id}: {o}");
        o
    }

    fn place(&self, user: &str, product: &str, qty: u32, card: &str) -> String {
        let (st, o, _) = http(
            self.port("gateway"),
            "POST",
            "/orders",
            Some(
                &json!({"userId": user, "items": [{"productId": product, "qty": qty}],
                         "cardToken": card, "address": "1 Main St"}),
            ),
            &[],
        );
        assert_eq!(st, 201, "POST /orders: {o}");
        o["id"].as_str().unwrap().to_string()
    }

    /// Waits for the order's terminal status (`confirmed` or `failed`).
    fn settled(&self, id: &str) -> Value {
        wait_until(
            &format!("order {id} settled"),
            Duration::from_secs(60),
            || {
                let o = self.order(id);
                matches!(o["status"].as_str(), Some("confirmed" | "failed")).then_some(o)
            },
        )
    }

    fn charges_of(&self, order: &str) -> Vec<Value> {
        let (_, c, _) = http(self.port("payments"), "GET", "/charges", None, &[]);
        c["charges"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|c| c["order"] == json!(order))
            .cloned()
            .collect()
    }

    fn notifications(&self) -> Vec<Value> {
        let (_, n, _) = http(
            self.port("notifications"),
            "GET",
            "/notifications",
            None,
            &[],
        );
        n["notifications"].as_array().cloned().unwrap_or_default()
    }
}

impl Drop for Shop {
    fn drop(&mut self) {
        signal(self.child.id(), 15);
        let start = Instant::now();
        while start.elapsed() < Duration::from_secs(30) {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Sends `sig` to `pid` with kill(2): std sends only SIGKILL, and only to a child it holds.
#[allow(
    unsafe_code,
    reason = "kill(2) is a foreign function, declared and called here alone"
)]
fn signal(pid: impl TryInto<i32>, sig: i32) -> i32 {
    unsafe extern "C" {
        #[link_name = "kill"]
        fn libc_kill(pid: i32, sig: i32) -> i32;
    }
    let Ok(pid) = pid.try_into() else { return -1 };
    // SAFETY: kill(2) reads no memory of ours; callers pass a process this test started.
    unsafe { libc_kill(pid, sig) }
}

// --- an OTLP/HTTP receiver that decodes the protobuf --------------------------------------

/// Spans received: (service.name, trace id in hex).
type Spans = Arc<Mutex<Vec<(String, String)>>>;

fn varint(b: &mut &[u8]) -> u64 {
    let mut v = 0u64;
    for shift in (0..64).step_by(7) {
        let byte = b[0];
        *b = &b[1..];
        v |= u64::from(byte & 0x7f) << shift;
        if byte < 0x80 {
            break;
        }
    }
    v
}

/// The length-delimited fields of one protobuf message level, by field number.
fn fields(mut b: &[u8]) -> Vec<(u32, Vec<u8>)> {
    let mut out = Vec::new();
    while !b.is_empty() {
        let key = varint(&mut b);
        let (field, wire) = ((key >> 3) as u32, key & 7);
        match wire {
            0 => {
                varint(&mut b);
            }
            1 => b = &b[8..],
            5 => b = &b[4..],
            2 => {
                let n = varint(&mut b) as usize;
                out.push((field, b[..n].to_vec()));
                b = &b[n..];
            }
            w => panic!("unexpected wire type {w}"),
        }
    }
    out
}

fn get(fs: &[(u32, Vec<u8>)], n: u32) -> Vec<&Vec<u8>> {
    fs.iter().filter(|(f, _)| *f == n).map(|(_, v)| v).collect()
}

/// ExportTraceServiceRequest → (service.name, trace id) per span.
fn decode_spans(body: &[u8]) -> Vec<(String, String)> {
    let mut out = Vec::new();
    for rs in get(&fields(body), 1) {
        let rs = fields(rs);
        let mut service = String::new();
        for res in get(&rs, 1) {
            for kv in get(&fields(res), 1) {
                let kv = fields(kv);
                let key = get(&kv, 1)
                    .first()
                    .map(|k| String::from_utf8_lossy(k).to_string());
                if key.as_deref() == Some("service.name")
                    && let Some(any) = get(&kv, 2).first()
                    && let Some(s) = get(&fields(any), 1).first()
                {
                    service = String::from_utf8_lossy(s).to_string();
                }
            }
        }
        for ss in get(&rs, 2) {
            for span in get(&fields(ss), 2) {
                if let Some(tid) = get(&fields(span), 1).first() {
                    let hex: String = tid.iter().map(|b| format!("{b:02x}")).collect();
                    out.push((service.clone(), hex));
                }
            }
        }
    }
    out
}

/// Serves `POST /v1/traces` on a free port; returns its base URL and what it received.
fn otlp_receiver() -> (String, Spans) {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let spans: Spans = Arc::default();
    let sink = spans.clone();
    std::thread::spawn(move || {
        for conn in listener.incoming().flatten() {
            let sink = sink.clone();
            std::thread::spawn(move || {
                let mut r = BufReader::new(conn.try_clone().unwrap());
                let mut w = conn;
                loop {
                    let mut len = 0usize;
                    let mut line = String::new();
                    if r.read_line(&mut line).unwrap_or(0) == 0 {
                        return;
                    }
                    loop {
                        line.clear();
                        if r.read_line(&mut line).unwrap_or(0) == 0 {
                            return;
                        }
                        let l = line.trim_end();
                        if l.is_empty() {
                            break;
                        }
                        if let Some((k, v)) = l.split_once(':')
                            && k.eq_ignore_ascii_case("content-length")
                        {
                            len = v.trim().parse().unwrap_or(0);
                        }
                    }
                    let mut body = vec![0u8; len];
                    if r.read_exact(&mut body).is_err() {
                        return;
                    }
                    sink.lock().unwrap().extend(decode_spans(&body));
                    let _ = w.write_all(
                        b"HTTP/1.1 200 OK\r\ncontent-type: application/x-protobuf\r\ncontent-length: 0\r\n\r\n",
                    );
                }
            });
        }
    });
    (url, spans)
}

fn metric(port: u16, name_and_labels: &str) -> Option<f64> {
    let (_, body, _) = http(port, "GET", "/metrics", None, &[]);
    body.as_str()?
        .lines()
        .find(|l| l.starts_with(name_and_labels))
        .and_then(|l| l.rsplit(' ').next()?.parse().ok())
}

/// One shop at a time: the suite checks latencies (a fallback answered fast), so the three
/// runs do not share the two cores.
static ONE_AT_A_TIME: Mutex<()> = Mutex::new(());

#[test]
fn the_shop_runs_end_to_end_on_nats() {
    shop_end_to_end("nats");
}

#[test]
fn the_shop_runs_end_to_end_on_redis() {
    shop_end_to_end("redis");
}

#[test]
fn the_shop_runs_end_to_end_on_rabbitmq() {
    shop_end_to_end("rabbitmq");
}

#[test]
fn the_shop_runs_end_to_end_on_kafka() {
    if tansu().is_none() {
        let why = "tansu not found (on PATH, $TANSU or .tools/bin): run scripts/setup.sh";
        assert!(std::env::var_os("CI").is_none(), "{why}");
        eprintln!("SKIP: the shop on kafka: {why}");
        return;
    }
    shop_end_to_end("kafka");
}

/// Tansu, the Kafka-protocol broker `weir up --broker kafka` starts, where `weir up` looks for
/// it: `$TANSU`, `PATH` (as the run gets it), `.tools/bin`.
fn tansu() -> Option<PathBuf> {
    let on_path: Vec<PathBuf> = std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).map(|d| d.join("tansu")).collect())
        .unwrap_or_default();
    std::env::var_os("TANSU")
        .map(PathBuf::from)
        .into_iter()
        .chain(on_path)
        .chain([root().join(".tools/bin/tansu")])
        .find(|p| p.is_file())
}

fn shop_end_to_end(broker: &str) {
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    eprintln!("=== the shop on {broker}");
    let (otlp_url, spans) = otlp_receiver();
    let shop = Shop::start(&otlp_url, broker);
    // The queues are on the broker asked for, which weir up started and supervises.
    let state = shop.state();
    let scheme = match broker {
        "rabbitmq" => "amqp",
        other => other,
    };
    let url = state["brokerUrl"].as_str().unwrap_or_default();
    assert!(url.starts_with(&format!("{scheme}://")), "brokerUrl {url}");
    assert!(
        state["brokers"][broker]["pid"].is_u64(),
        "{}",
        state["brokers"]
    );
    let gw = shop.port("gateway");

    eprintln!("== catalog through the gateway");
    let (st, products, _) = http(gw, "GET", "/products", None, &[]);
    assert_eq!(st, 200, "{products}");
    let stock = |p: &str| -> i64 {
        let (_, b, _) = http(
            shop.port("catalog"),
            "GET",
            &format!("/products/{p}"),
            None,
            &[],
        );
        b["stock"].as_i64().unwrap()
    };

    eprintln!("== an order: saga completes, one capture, notifications");
    let before = stock("p1");
    // Idle first: the consumers' pull requests have been waiting a while when the events come.
    std::thread::sleep(Duration::from_millis(2500));
    let placed_at = Instant::now();
    let id = shop.place("u1", "p1", 2, "tok_visa");
    let o = shop.settled(&id);
    assert_eq!(o["status"], "confirmed", "{o}");
    assert_eq!(o["total"], 49.0, "{o}");
    assert!(o["shipment"].is_string(), "{o}");
    assert_eq!(stock("p1"), before - 2);
    let charges = shop.charges_of(&id);
    assert_eq!(charges.len(), 1, "one capture for {id}: {charges:?}");
    assert_eq!(charges[0]["amount"], 49.0);
    let kinds = wait_until("both notifications", Duration::from_secs(30), || {
        let kinds: BTreeSet<String> = shop
            .notifications()
            .iter()
            .filter(|n| n["orderId"] == json!(id))
            .map(|n| n["kind"].as_str().unwrap().to_string())
            .collect();
        (kinds.len() == 2).then_some(kinds)
    });
    assert!(kinds.contains("order-outcome") && kinds.contains("payment-captured"));
    // Pushed as they arrive: a stalled pull would show as a redelivery after the queues' 10s
    // ack wait.
    assert!(
        placed_at.elapsed() < Duration::from_secs(5),
        "events took {:?} to reach notifications",
        placed_at.elapsed()
    );

    eprintln!("== one trace id across gateway → orders → users: spans and log lines");
    let trace_id = format!("{:032x}", 0x5eed_0000_u128 + u128::from(std::process::id()));
    let tp = format!("00-{trace_id}-00f067aa0ba902b7-01");
    let (st, o, _) = http(
        gw,
        "GET",
        &format!("/orders/{id}"),
        None,
        &[("traceparent", &tp)],
    );
    assert_eq!(st, 200);
    assert_eq!(o["customer"]["name"], "Ada Lovelace", "{o}");
    let services = wait_until(
        "spans of gateway, orders and users with the trace id",
        Duration::from_secs(30),
        || {
            let got: BTreeSet<String> = spans
                .lock()
                .unwrap()
                .iter()
                .filter(|(_, t)| *t == trace_id)
                .map(|(s, _)| s.clone())
                .collect();
            ["gateway", "orders", "users"]
                .iter()
                .all(|s| got.contains(*s))
                .then_some(got)
        },
    );
    eprintln!("  services with spans of the trace: {services:?}");
    let log = shop.log();
    for svc in ["gateway", "orders", "users"] {
        // Whichever replica the call was balanced to.
        let replicas = shop.replicas(svc);
        assert!(
            log.lines().any(
                |l| replicas.iter().any(|r| l.starts_with(&format!("[{r}] ")))
                    && l.contains(&trace_id)
            ),
            "no log line of {replicas:?} with trace id {trace_id}"
        );
    }

    eprintln!("== a malformed order is refused at the gateway, naming the field");
    let (st, body, _) = http(
        gw,
        "POST",
        "/orders",
        Some(
            &json!({"userId": "u1", "items": [{"productId": "p1", "qty": "two"}],
                     "cardToken": "tok_visa", "address": "1 Main St"}),
        ),
        &[],
    );
    assert_eq!(st, 422, "{body}");
    assert!(body.to_string().contains("/items/0/qty"), "{body}");

    eprintln!("== a malformed event injected on the broker is dead-lettered; weir dlq shows it");
    if broker == "nats" || broker == "kafka" {
        malformed_event_is_dead_lettered(&shop, broker);
    } else {
        // The bridge's conformance suite (sidecar/tests/bridge.rs) injects on every broker.
        eprintln!("  (injected on NATS and Kafka only)");
    }

    eprintln!("== payments failing: the saga compensates, stock released, order failed");
    let pay = shop.port("payments");
    let (st, _, _) = http(pay, "POST", "/admin/fail", Some(&json!({"on": true})), &[]);
    assert_eq!(st, 200);
    let before = stock("p2");
    let failed = shop.place("u2", "p2", 1, "tok_visa");
    let o = shop.settled(&failed);
    assert_eq!(o["status"], "failed", "{o}");
    assert!(
        o["reason"].as_str().unwrap_or("").contains("402"),
        "reason names the declined charge: {o}"
    );
    assert_eq!(stock("p2"), before, "stock released");
    let (_, res, _) = http(shop.port("catalog"), "GET", "/reservations", None, &[]);
    let r: Vec<&Value> = res["reservations"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|r| r["order"] == json!(failed))
        .collect();
    assert_eq!(r.len(), 1, "{res}");
    assert_eq!(r[0]["released"], true);
    assert!(shop.charges_of(&failed).is_empty());
    http(pay, "POST", "/admin/fail", Some(&json!({"on": false})), &[]);

    eprintln!("== users slow: the breaker opens, the fallback customer answers fast; then closes");
    // Every replica: orders balances its calls over them.
    let users = shop.ports("users");
    for &u in &users {
        http(u, "POST", "/admin/slow", Some(&json!({"ms": 1500})), &[]);
    }
    let orders_admin = shop.admin("orders");
    let fast_fallback = wait_until(
        "the fallback customer, fast",
        Duration::from_secs(30),
        || {
            let (_, o, took) = http(gw, "GET", &format!("/orders/{id}"), None, &[]);
            (o["customer"] == json!({"name": "Unknown", "stale": true})
                && took < Duration::from_millis(250))
            .then_some(took)
        },
    );
    eprintln!("  fallback answered in {fast_fallback:?}");
    assert_eq!(
        metric(
            orders_admin,
            "weir_circuit_breaker_state{dependency=\"users\"}"
        ),
        Some(1.0),
        "breaker open"
    );
    for &u in &users {
        http(u, "POST", "/admin/slow", Some(&json!({"ms": 0})), &[]);
    }
    wait_until("the real customer again", Duration::from_secs(30), || {
        let (_, o, _) = http(gw, "GET", &format!("/orders/{id}"), None, &[]);
        (o["customer"]["name"] == "Ada Lovelace").then_some(())
    });
    assert_eq!(
        metric(
            orders_admin,
            "weir_circuit_breaker_state{dependency=\"users\"}"
        ),
        Some(0.0),
        "breaker closed"
    );

    eprintln!("== kill -9 payments while orders flow: each order charged exactly once");
    let n = 24;
    let placed: Arc<Mutex<Vec<String>>> = Arc::default();
    let feeder = {
        let placed = placed.clone();
        std::thread::spawn(move || {
            for i in 0..n {
                let (st, o, _) = http(
                    gw,
                    "POST",
                    "/orders",
                    Some(
                        &json!({"userId": "u3", "items": [{"productId": "p3", "qty": 1}],
                                 "cardToken": "tok_visa", "address": format!("{i} Elm St")}),
                    ),
                    &[],
                );
                assert_eq!(st, 201, "{o}");
                placed
                    .lock()
                    .unwrap()
                    .push(o["id"].as_str().unwrap().to_string());
                std::thread::sleep(Duration::from_millis(100));
            }
        })
    };
    wait_until("a few orders in flight", Duration::from_secs(30), || {
        (placed.lock().unwrap().len() >= 6).then_some(())
    });
    let pid = shop.state()["services"]["payments"]["pid"]
        .as_u64()
        .unwrap();
    // A process weir up started for this test.
    assert_eq!(signal(pid, 9), 0);
    eprintln!("  killed payments (pid {pid})");
    wait_until(
        "payments restarted by weir up",
        Duration::from_secs(30),
        || {
            let now = shop.state()["services"]["payments"]["pid"].as_u64();
            (now.is_some() && now != Some(pid)).then_some(())
        },
    );
    feeder.join().unwrap();
    let ids = placed.lock().unwrap().clone();
    assert_eq!(ids.len(), n);
    let mut per_order = BTreeMap::new();
    for id in &ids {
        let o = shop.settled(id);
        assert_eq!(o["status"], "confirmed", "{o}");
        per_order.insert(id.clone(), shop.charges_of(id).len());
    }
    assert!(
        per_order.values().all(|&c| c == 1),
        "charges per order: {per_order:?}"
    );
    let log = shop.log();
    assert!(
        log.contains("payments exited"),
        "weir up reported the crash"
    );
    // The kill did land on charges in flight: some were answered 5xx while payments was down
    // (and retried by the saga with the same Idempotency-Key).
    let refused = log
        .lines()
        .filter(|l| {
            l.starts_with("[payments/proxy]")
                && l.contains("\"path\":\"/charges\"")
                && l.contains("\"status\":50")
        })
        .count();
    eprintln!("  charge attempts refused while payments was down: {refused}");
    assert!(refused > 0, "no charge attempt met the crash");
    eprintln!("  {n} orders, each charged once, across a kill -9 of payments");

    eprintln!("== Ctrl-C: apps and the coordinator stop first, then their sidecars, then nats");
    let mut shop = shop;
    assert_eq!(signal(shop.child.id(), 2), 0);
    // weir up gives each of its three groups (apps, sidecars, the rest) up to the grace
    // period (30 s here) before SIGKILL: wait for all three, and say who was slow.
    let start = Instant::now();
    let st = loop {
        if let Some(st) = shop.child.try_wait().unwrap() {
            break st;
        }
        if start.elapsed() > Duration::from_secs(100) {
            let log = shop.log();
            let tail: Vec<&str> = log.lines().rev().take(60).collect();
            panic!(
                "weir up did not exit within 100 s of Ctrl-C; the end of its log:\n{}",
                tail.into_iter().rev().collect::<Vec<_>>().join("\n")
            );
        }
        std::thread::sleep(Duration::from_millis(200));
    };
    eprintln!(
        "  ok: weir up exited ({:.1}s)",
        start.elapsed().as_secs_f64()
    );
    assert!(st.success(), "weir up exited with {st}");
    let log = shop.log();
    for slow in log.lines().filter(|l| l.contains("did not stop within")) {
        eprintln!("  NOTE (stopped with SIGKILL): {slow}");
    }
    let line_of = |prefix: &str, needle: &str| {
        log.lines()
            .position(|l| l.starts_with(prefix) && l.contains(needle))
            .unwrap_or_else(|| {
                // Say what that process did print last, and what weir up said of it.
                let name = prefix.trim().trim_start_matches('[').trim_end_matches(']');
                let of_it: Vec<&str> = log
                    .lines()
                    .filter(|l| {
                        l.starts_with(prefix) || (l.starts_with("weir up: ") && l.contains(name))
                    })
                    .collect();
                let tail = &of_it[of_it.len().saturating_sub(20)..];
                // And the whole shutdown as weir up logged it, every process: whether the app
                // was signalled, restarted or killed shows there (this has been seen missing
                // a few times in CI, with no more to go on than the app's own lines).
                let all: Vec<&str> = log.lines().collect();
                let end = &all[all.len().saturating_sub(80)..];
                panic!(
                    "no line {prefix}…{needle}; its last lines:\n{}\n--- the last 80 lines of weir up's log:\n{}",
                    tail.join("\n"),
                    end.join("\n")
                )
            })
    };
    let nats_down = line_of("[nats] ", "Server Exiting");
    for svc in [
        "gateway",
        "orders",
        "catalog",
        "payments",
        "users",
        "notifications",
    ]
    .iter()
    .flat_map(|svc| shop.replicas(svc))
    {
        let app = line_of(&format!("[{svc}] "), "\"msg\":\"stopped\"");
        let proxy = line_of(&format!("[{svc}/proxy] "), "shutting down");
        assert!(app < proxy, "{svc}: its sidecar stopped before it");
        assert!(
            proxy < nats_down,
            "{svc}: the broker stopped before its sidecar"
        );
    }
}

/// Injects an event that fails the Queue's schema straight onto the stream: the consuming
/// sidecar dead-letters it without calling the app, and `weir dlq list` shows it.
fn malformed_event_is_dead_lettered(shop: &Shop, kind: &str) {
    let broker = shop.state()["brokerUrl"].as_str().unwrap().to_string();
    let seen_before = shop.notifications().len();
    let rt = tokio::runtime::Runtime::new().unwrap();
    if kind == "kafka" {
        rt.block_on(inject_on_kafka(&broker));
    } else {
        rt.block_on(inject_on_nats(&broker));
    }
    let weir = root().join("target/debug/weir");
    let listing = wait_until(
        "the dead letter listed by weir dlq",
        Duration::from_secs(30),
        || {
            let out = Command::new(&weir)
                .args(["dlq", "list", "payments-captured", "--broker-url", &broker])
                .output()
                .unwrap();
            let text = String::from_utf8_lossy(&out.stdout).to_string();
            text.contains("bad-capture-1").then_some(text)
        },
    );
    eprintln!("{listing}");
    assert_eq!(
        shop.notifications().len(),
        seen_before,
        "the app was called"
    );
}

/// The malformed capture, as another JetStream producer would publish it.
async fn inject_on_nats(broker: &str) {
    let nc = async_nats::connect(broker).await.unwrap();
    let js = async_nats::jetstream::new(nc);
    let mut h = async_nats::HeaderMap::new();
    h.insert("ce-id", "bad-capture-1");
    h.insert("ce-type", "payments.captured");
    h.insert("Nats-Msg-Id", "bad-capture-1");
    js.publish_with_headers(
        "weir.default.payments-captured",
        h,
        br#"{"chargeId": "ch-x", "amount": "lots"}"#.as_slice().into(),
    )
    .await
    .unwrap()
    .await
    .unwrap();
}

/// The malformed capture, as another Kafka producer would produce it (a CloudEvent in binary
/// mode: its attributes are the record's `ce-*` headers), acknowledged by the broker.
async fn inject_on_kafka(broker: &str) {
    use rdkafka::message::{Header, OwnedHeaders};
    use rdkafka::producer::{FutureProducer, FutureRecord};
    let p: FutureProducer = rdkafka::ClientConfig::new()
        .set("bootstrap.servers", broker.trim_start_matches("kafka://"))
        .set("enable.idempotence", "true")
        .set("acks", "all")
        .create()
        .unwrap();
    let mut h = OwnedHeaders::new();
    for (k, v) in [
        ("ce-specversion", "1.0"),
        ("ce-id", "bad-capture-1"),
        ("ce-type", "payments.captured"),
        ("ce-source", "weir://default/elsewhere"),
        ("content-type", "application/json"),
    ] {
        h = h.insert(Header {
            key: k,
            value: Some(v.as_bytes()),
        });
    }
    p.send(
        FutureRecord::<(), [u8]>::to("weir_default_payments-captured")
            .payload(br#"{"chargeId": "ch-x", "amount": "lots"}"#.as_slice())
            .headers(h),
        Duration::from_secs(10),
    )
    .await
    .unwrap_or_else(|(e, _)| panic!("produce the malformed capture: {e}"));
}
