//! The dashboard of `weir up --dashboard`, in a real browser: the shop (examples/shop) under
//! `weir up --dashboard --dashboard-actions`, its page in headless Chromium over WebDriver.
//!
//! - System: `users` made slow, `orders → users` trips its breaker, and the page says "open"
//!   on that call (in words and in red).
//! - Queues: a dead letter on `payments-captured` is shown and replayed from the page, and the
//!   consumer (notifications) gets it.
//! - Sagas: the instances of place-order, one instance's timeline.
//! - Cancel (needs the coordinator's cancel endpoint): a running instance cancelled from its
//!   page ends compensated.
//!
//! Screenshots of each page go to `$CARGO_TARGET_TMPDIR/dashboard/` (and, with
//! `WEIR_DASHBOARD_DOCS=1`, into docs/dashboard/). Needs `cargo build --workspace --bins`,
//! nats-server, and chromium with chromedriver (scripts/setup.sh); without the browser the
//! test fails unless `WEIR_SKIP_BROWSER=1`.

mod dashboard_support;
mod up_support;

use dashboard_support::{Session, driver, publish_to_docs, shots};
use serde_json::{Value, json};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;
use up_support::{Up, request, target};

/// `weir up -f examples/shop --dashboard 127.0.0.1:0` (with `--dashboard-actions` when
/// `actions`), and the page's URL from its output.
fn shop_with_dashboard(actions: bool) -> (Up, String) {
    let t = target();
    for bin in [
        "shop-gateway",
        "shop-orders",
        "shop-catalog",
        "shop-payments",
        "shop-users",
        "shop-notifications",
    ] {
        assert!(
            t.join(bin).is_file(),
            "{bin} not built: run `cargo build --workspace --bins` first"
        );
    }
    let mut args = vec![
        "-f",
        "examples/shop",
        "--any-port",
        "--dashboard",
        "127.0.0.1:0",
    ];
    if actions {
        args.push("--dashboard-actions");
    }
    let up = Up::start(&args, Duration::from_secs(120));
    let url = up.until("the dashboard's URL", Duration::from_secs(10), || {
        up.log().lines().find_map(|l| {
            l.strip_prefix("weir up: dashboard on ")
                .and_then(|r| r.split_whitespace().next())
                .map(str::to_string)
        })
    });
    (up, url)
}

/// The inbound ports of every replica of a Microservice.
fn ports(up: &Up, service: &str) -> Vec<u16> {
    up.state()["services"]
        .as_object()
        .unwrap()
        .values()
        .filter(|s| s["microservice"] == service)
        .map(|s| s["inbound"].as_u64().unwrap() as u16)
        .collect()
}

fn port(up: &Up, service: &str) -> u16 {
    up.state()["services"]
        .as_object()
        .unwrap()
        .values()
        .find(|s| s["microservice"] == service && s["replica"] == 0)
        .and_then(|s| s["inbound"].as_u64())
        .unwrap_or_else(|| panic!("no {service} in the state file")) as u16
}

fn pid(up: &Up, service: &str) -> i32 {
    up.state()["services"]
        .as_object()
        .unwrap()
        .values()
        .find(|s| s["microservice"] == service && s["replica"] == 0)
        .and_then(|s| s["pid"].as_i64())
        .unwrap_or_else(|| panic!("no pid of {service}")) as i32
}

/// Places an order through the gateway, paid with `card`; its id.
fn place(up: &Up, user: &str, card: &str) -> String {
    let body = json!({"userId": user, "items": [{"productId": "p1", "qty": 1}],
                      "cardToken": card, "address": "1 Main St"});
    let gw = port(up, "gateway");
    up.until("an order accepted", Duration::from_secs(30), || {
        let (st, b) = request(gw, "POST", "/orders", &body.to_string());
        (st == 201)
            .then(|| serde_json::from_str::<Value>(&b).ok())
            .flatten()
            .and_then(|v| v["id"].as_str().map(str::to_string))
    })
}

/// Calls `GET /orders/<id>` through the gateway (gateway → orders → users) every 50 ms until
/// dropped.
struct Traffic(Arc<AtomicBool>, Option<std::thread::JoinHandle<()>>);

impl Traffic {
    fn start(gw: u16, order: String) -> Traffic {
        let stop = Arc::new(AtomicBool::new(false));
        let s = stop.clone();
        let h = std::thread::spawn(move || {
            while !s.load(Ordering::Relaxed) {
                request(gw, "GET", &format!("/orders/{order}"), "");
                std::thread::sleep(Duration::from_millis(50));
            }
        });
        Traffic(stop, Some(h))
    }
}

impl Drop for Traffic {
    fn drop(&mut self) {
        self.0.store(true, Ordering::Relaxed);
        if let Some(h) = self.1.take() {
            let _ = h.join();
        }
    }
}

/// A valid `payments.captured` event put straight on the Queue's dead letters, with the headers
/// a consuming sidecar writes when it gives up on one.
async fn dead_letter_on_nats(broker: &str, event_id: &str, order: &str) {
    let nc = async_nats::connect(broker).await.unwrap();
    let js = async_nats::jetstream::new(nc);
    let mut h = async_nats::HeaderMap::new();
    for (k, v) in [
        ("ce-specversion", "1.0"),
        ("ce-id", event_id),
        ("ce-type", "payments.captured"),
        ("ce-source", "weir://default/payments"),
        ("content-type", "application/json"),
        ("Weir-Original-Subject", "weir.default.payments-captured"),
        ("Weir-Original-Seq", "1"),
        ("Weir-Consumer", "notifications"),
        ("Weir-Delivery-Count", "5"),
        ("Weir-Reason", "max-deliveries"),
        (
            "Weir-Last-Error",
            "503 from the app: notifications was down",
        ),
        ("Weir-Dead-Lettered-At", "2026-01-01T00:00:00Z"),
    ] {
        h.insert(k, v);
    }
    let body = json!({"chargeId": "ch-dash", "orderId": order, "amount": 12.5}).to_string();
    js.publish_with_headers("weir.dlq.default.payments-captured", h, body.into())
        .await
        .expect("publish the dead letter")
        .await
        .expect("the dead-letter stream stored it");
}

fn notified(up: &Up, order: &str) -> bool {
    let (_, body) = request(port(up, "notifications"), "GET", "/notifications", "");
    serde_json::from_str::<Value>(&body)
        .ok()
        .and_then(|v| v["notifications"].as_array().cloned())
        .unwrap_or_default()
        .iter()
        .any(|n| n.to_string().contains(order))
}

#[test]
fn the_dashboard_shows_the_shop_live_in_a_browser() {
    let Some(driver) = driver() else { return };
    let (up, url) = shop_with_dashboard(true);
    let b: Session = driver.session();
    let dir = shots();
    let long = Duration::from_secs(60);

    eprintln!("== system: the graph and the calls, live from the sidecars");
    b.goto(&format!("{url}#/system"));
    b.wait_text("the calls table", "#calls", long, |t| t.contains("users"));
    let order = place(&up, "u1", "tok_visa");
    b.wait_text(
        "orders → users closed",
        "#call-orders-users .breaker",
        long,
        |t| t.trim() == "closed",
    );

    eprintln!("== users slow: orders → users trips its breaker, and the page says open");
    for p in ports(&up, "users") {
        request(p, "POST", "/admin/slow", r#"{"ms": 1500}"#);
    }
    let traffic = Traffic::start(port(&up, "gateway"), order.clone());
    let state = b.wait_text(
        "orders → users open",
        "#call-orders-users .breaker",
        long,
        |t| t.trim().starts_with("open"),
    );
    assert_eq!(state.split_whitespace().next(), Some("open"), "{state}");
    let row_class = b.script(
        "return document.querySelector('#call-orders-users').className",
        json!([]),
    );
    assert_eq!(row_class, json!("open"), "the open call's row stands out");
    let colour = b.script(
        "return getComputedStyle(document.querySelector('#call-orders-users .state-open')).backgroundColor",
        json!([]),
    );
    assert_eq!(colour, json!("rgb(179, 38, 30)"), "open is red");
    b.wait_text("the open breakers listed", "#open-list", long, |t| {
        t.contains("orders → users")
    });
    b.wait_text("the call's rates", "#call-orders-users", long, |t| {
        !t.contains('–')
    });
    let shot = b.screenshot(&dir, "system");
    publish_to_docs(&shot, "system.png");
    drop(traffic);
    for p in ports(&up, "users") {
        request(p, "POST", "/admin/slow", r#"{"ms": 0}"#);
    }

    eprintln!("== queues: a dead letter shown and replayed from the page, then delivered");
    let broker = up.state()["brokerUrl"].as_str().unwrap().to_string();
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(dead_letter_on_nats(&broker, "dash-capture-1", "o-dash-1"));
    b.goto(&format!("{url}#/queues"));
    b.wait_text(
        "one dead letter on payments-captured",
        "#queue-payments-captured .dead",
        long,
        |t| t.trim() == "1",
    );
    b.goto(&format!("{url}#/queues/payments-captured"));
    b.wait_text("the dead letter listed", "#dead-letters", long, |t| {
        t.contains("dash-capture-1") && t.contains("max-deliveries")
    });
    b.click("#dead-letters button.show");
    b.wait_text("the dead letter shown", "#shown", long, |t| {
        t.contains("o-dash-1") && t.contains("Weir-Last-Error")
    });
    let shot = b.screenshot(&dir, "queues");
    publish_to_docs(&shot, "queues.png");
    assert!(!notified(&up, "o-dash-1"), "notified before the replay");
    b.click("#dead-letters button.replay");
    b.wait_text(
        "the replay armed",
        "#dead-letters button.replay",
        long,
        |t| t.contains("Confirm"),
    );
    b.click("#dead-letters button.replay");
    b.wait_text("the replay done", "#replayed", long, |t| {
        t.contains("Replayed 1") && t.contains("dash-capture-1")
    });
    up.until(
        "the replayed capture delivered to notifications",
        long,
        || notified(&up, "o-dash-1").then_some(()),
    );
    b.wait_text("no dead letters left", "#letters", long, |t| {
        t.contains("No dead letters")
    });

    eprintln!("== sagas: instances by state, one instance's timeline");
    // A declined card: that instance is compensated.
    place(&up, "u3", "tok_declined");
    b.goto(&format!("{url}#/sagas"));
    b.wait_text("place-order's instances", "#saga-tables", long, |t| {
        t.contains("Completed") && t.contains("Compensated")
    });
    let shot = b.screenshot(&dir, "sagas");
    publish_to_docs(&shot, "sagas.png");
    // Instances by version: every instance here runs the one definition there is.
    let listed = b
        .script(
            "return document.querySelectorAll('table.instances tbody tr').length;",
            json!([]),
        )
        .as_u64()
        .expect("a row count") as usize;
    assert!(listed >= 2, "{listed} instances listed");
    b.wait_text("the counts by version", "#saga-tables", long, |t| {
        t.contains("By version:") && t.contains(&format!("{listed} instance(s), 0 unfinished"))
    });
    let version = b.script(
        "const s = document.querySelector('#saga-version'); if (s.options.length < 2) return null; s.value = s.options[1].value; s.dispatchEvent(new Event('change')); return s.value;",
        json!([]),
    );
    let version = version
        .as_str()
        .expect("a version to filter by")
        .to_string();
    b.wait_text(
        "the instances of that version",
        "table.instances tbody",
        long,
        |t| t.lines().count() == listed && t.lines().all(|l| l.contains(&version)),
    );
    b.script(
        "const s = document.querySelector('#saga-version'); s.value = ''; s.dispatchEvent(new Event('change')); return s.value;",
        json!([]),
    );
    b.type_into("#saga-filter", &first_completed(&b));
    b.wait_text(
        "the instances filtered by id",
        "table.instances tbody",
        long,
        |t| t.lines().count() == 1 && t.contains("Completed"),
    );
    b.click("table.instances tbody tr a");
    b.wait_text("the timeline", "#timeline", long, |t| {
        t.contains("step-succeeded") && t.contains("completed")
    });
    b.wait_text("the state", "#instance-status", long, |t| t == "Completed");
    b.wait_text("the steps", "#steps", long, |t| {
        t.contains("reserve")
            && t.contains("charge")
            && t.contains("ship")
            && t.contains("succeeded")
    });
    let shot = b.screenshot(&dir, "saga-instance");
    publish_to_docs(&shot, "saga-instance.png");
}

/// The id of the first Completed instance the sagas page lists.
fn first_completed(b: &Session) -> String {
    b.script(
        "for (const tr of document.querySelectorAll('table.instances tbody tr')) { if (tr.innerText.includes('Completed')) return tr.dataset.id; } return null;",
        json!([]),
    )
    .as_str()
    .expect("a Completed instance listed")
    .to_string()
}

#[test]
fn the_read_only_dashboard_refuses_actions_and_shows_no_buttons() {
    let Some(driver) = driver() else { return };
    let (up, url) = shop_with_dashboard(false);
    assert!(up.log().contains("(read-only)"), "{}", up.log());
    let b = driver.session();
    b.goto(&format!("{url}#/queues/payments-captured"));
    b.wait_text("the mode", "#mode", Duration::from_secs(30), |t| {
        t == "read-only"
    });
    b.wait_text(
        "the dead letters",
        "#letters",
        Duration::from_secs(30),
        |t| t.contains("No dead letters"),
    );
    let buttons = b.script(
        "return document.querySelectorAll('button.replay, #replay-all').length",
        json!([]),
    );
    assert_eq!(buttons, json!(0));
    let port: u16 = url
        .trim_end_matches('/')
        .rsplit(':')
        .next()
        .unwrap()
        .parse()
        .unwrap();
    let (st, body) = request(
        port,
        "POST",
        "/api/queues/payments-captured/replay",
        r#"{"all": true}"#,
    );
    assert_eq!(st, 403, "{body}");
    assert!(body.contains("--dashboard-actions"), "{body}");
}

/// Sends `sig` to a process `weir up` started for this test.
#[allow(unsafe_code, reason = "kill(2) to an app's pid from the state file")]
fn signal(pid: i32, sig: i32) {
    // SAFETY: kill(2) on a pid of the run under test.
    assert_eq!(unsafe { libc::kill(pid, sig) }, 0, "kill -{sig} {pid}");
}

#[test]
fn a_running_saga_instance_is_cancelled_from_its_page_and_compensated() {
    let Some(driver) = driver() else { return };
    let (up, url) = shop_with_dashboard(true);
    let b = driver.session();
    // payments frozen: the charge step times out and retries, the instance stays Running.
    let payments = pid(&up, "payments");
    signal(payments, libc::SIGSTOP);
    struct Resume(i32);
    impl Drop for Resume {
        fn drop(&mut self) {
            signal(self.0, libc::SIGCONT);
        }
    }
    let resume = Resume(payments);
    let order = place(&up, "u2", "tok_visa");
    b.goto(&format!("{url}#/sagas"));
    b.wait_text(
        "a running instance",
        "#saga-tables",
        Duration::from_secs(60),
        |t| t.contains("Running"),
    );
    b.click("table.instances tbody tr a");
    b.wait_text(
        "the instance running",
        "#instance-status",
        Duration::from_secs(30),
        |t| t == "Running",
    );
    b.click("#cancel");
    b.wait_text("cancel armed", "#cancel", Duration::from_secs(10), |t| {
        t.contains("Confirm")
    });
    b.click("#cancel");
    b.wait_text(
        "cancel accepted",
        "#action-result",
        Duration::from_secs(30),
        |t| t.contains("accepted"),
    );
    drop(resume);
    let end = b.wait_text(
        "the instance cancelled after compensation",
        "#instance-status",
        Duration::from_secs(90),
        |t| t.eq_ignore_ascii_case("cancelled"),
    );
    eprintln!("  instance {end}; order {order}");
    b.wait_text(
        "the compensations in the timeline",
        "#timeline",
        Duration::from_secs(30),
        |t| t.contains("comp-succeeded"),
    );
    let shot = b.screenshot(&shots(), "saga-cancelled");
    publish_to_docs(&shot, "saga-cancelled.png");
}
