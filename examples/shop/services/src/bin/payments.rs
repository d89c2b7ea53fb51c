//! `payments`: charges and refunds, each captured exactly once per `Idempotency-Key`.
//!
//! - `POST /charges {order, amount, card}` (the place-order saga's second step): records the
//!   charge on disk, publishes `payments.captured` through the sidecar (event id = charge id, so
//!   a repeat is a broker-side duplicate), then answers 201. The same key again answers the same
//!   charge and captures nothing more; a crash anywhere in between is repaired by the repeat.
//!   Card `tok_declined` is declined: 402.
//! - `POST /refunds {order, charge}` (its compensation): refunds once; `charge` may be null.
//! - `GET /charges`: every charge, with `refunded`.
//!
//! Test switch: `POST /admin/fail {"on": true}` declines every charge (402) until turned off.

use hyper::{Method, StatusCode};
use serde_json::{Value, json};
use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use weir_example_shop::{Env, Req, Resp, Store, error, json, new_id, serve};

const CAPTURED_QUEUE: &str = "payments-captured";

#[derive(Default)]
struct Ledger {
    /// charge id → `{id, key, order, amount, refunded}`.
    charges: BTreeMap<String, Value>,
    /// refund key → refund record.
    refunds: BTreeMap<String, Value>,
}

impl Ledger {
    fn apply(&mut self, r: &Value) {
        match r["type"].as_str() {
            Some("charge") => {
                let mut c = r["charge"].clone();
                c["refunded"] = json!(false);
                self.charges
                    .insert(c["id"].as_str().unwrap_or_default().to_string(), c);
            }
            Some("refund") => {
                if let Some(c) = r["charge"].as_str().and_then(|id| self.charges.get_mut(id)) {
                    c["refunded"] = json!(true);
                }
                self.refunds
                    .insert(r["key"].as_str().unwrap_or_default().to_string(), r.clone());
            }
            _ => {}
        }
    }
}

struct Payments {
    env: Arc<Env>,
    store: Store,
    ledger: Mutex<Ledger>,
    decline_all: AtomicBool,
}

fn main() {
    weir_example_shop::runtime().block_on(async {
        let env = Env::from_env("payments");
        let (store, records) = env.open_store("payments");
        let mut ledger = Ledger::default();
        records.iter().for_each(|r| ledger.apply(r));
        env.log(
            "info",
            "ledger loaded",
            None,
            json!({"charges": ledger.charges.len()}),
        );
        let state = Arc::new(Payments {
            env: env.clone(),
            store,
            ledger: Mutex::new(ledger),
            decline_all: AtomicBool::new(false),
        });
        serve(
            env,
            state,
            |s: Arc<Payments>| async move { s.env.readiness(true).await },
            handle,
        )
        .await;
    });
}

async fn handle(s: Arc<Payments>, req: Req) -> Resp {
    match (&req.method, req.segments().as_slice()) {
        (&Method::GET, ["charges"]) => {
            let l = s.ledger.lock().unwrap();
            json(
                StatusCode::OK,
                json!({"charges": l.charges.values().collect::<Vec<_>>()}),
            )
        }
        (&Method::POST, ["charges"]) => charge(&s, &req).await,
        (&Method::POST, ["refunds"]) => refund(&s, &req),
        (&Method::POST, ["admin", "fail"]) => {
            let on = req
                .json()
                .map(|b| b["on"].as_bool().unwrap_or(false))
                .unwrap_or(false);
            s.decline_all.store(on, Ordering::Relaxed);
            s.env.log(
                "warn",
                "test switch: decline every charge",
                Some(&req.trace),
                json!({"on": on}),
            );
            json(StatusCode::OK, json!({"declineAll": on}))
        }
        _ => error(
            StatusCode::NOT_FOUND,
            format!("no route {} {}", req.method, req.path),
        ),
    }
}

async fn charge(s: &Payments, req: &Req) -> Resp {
    let body = match req.json() {
        Ok(b) => b,
        Err(r) => return r,
    };
    let key = req
        .header("idempotency-key")
        .map(str::to_string)
        .unwrap_or_else(|| new_id("key"));
    let order = body["order"].as_str().unwrap_or_default().to_string();
    let Some(amount) = body["amount"].as_f64() else {
        return error(
            StatusCode::UNPROCESSABLE_ENTITY,
            "amount: expected a number",
        );
    };
    let existing = {
        let l = s.ledger.lock().unwrap();
        l.charges.values().find(|c| c["key"] == json!(key)).cloned()
    };
    let (charge, status) = match existing {
        Some(c) => (c, StatusCode::OK),
        None => {
            if s.decline_all.load(Ordering::Relaxed) || body["card"] == json!("tok_declined") {
                s.env.log(
                    "warn",
                    "card declined",
                    Some(&req.trace),
                    json!({"order": order}),
                );
                return json(
                    StatusCode::PAYMENT_REQUIRED,
                    json!({"error": "card declined", "order": order}),
                );
            }
            let c = json!({"id": new_id("ch"), "key": key, "order": order, "amount": amount});
            let record = json!({"type": "charge", "charge": c});
            // On disk before anything else: a crash after this line and a retry with the same
            // key find the charge instead of capturing again.
            if let Err(e) = s.store.append(&record) {
                return error(StatusCode::INTERNAL_SERVER_ERROR, format!("store: {e}"));
            }
            s.ledger.lock().unwrap().apply(&record);
            s.env.log(
                "info",
                "payment captured",
                Some(&req.trace),
                json!({"order": order, "charge": c["id"], "amount": amount}),
            );
            (c, StatusCode::CREATED)
        }
    };
    let id = charge["id"].as_str().unwrap_or_default().to_string();
    let event = json!({"chargeId": id, "orderId": charge["order"], "amount": charge["amount"]});
    match s.env.publish(CAPTURED_QUEUE, &id, &event, &req.trace).await {
        Ok((st, _)) if st == StatusCode::ACCEPTED => json(
            status,
            json!({"id": id, "order": charge["order"], "amount": charge["amount"]}),
        ),
        // Not published: the caller retries with the same key, which publishes again.
        Ok((st, body)) => json(
            StatusCode::SERVICE_UNAVAILABLE,
            json!({"error": format!("captured but not announced yet: publish answered {st}"), "detail": body}),
        ),
        Err(e) => json(
            StatusCode::SERVICE_UNAVAILABLE,
            json!({"error": format!("captured but not announced yet: {e}")}),
        ),
    }
}

fn refund(s: &Payments, req: &Req) -> Resp {
    let body = match req.json() {
        Ok(b) => b,
        Err(r) => return r,
    };
    let key = req
        .header("idempotency-key")
        .map(str::to_string)
        .unwrap_or_else(|| new_id("key"));
    let mut l = s.ledger.lock().unwrap();
    if let Some(r) = l.refunds.get(&key) {
        return json(StatusCode::OK, json!({"id": r["id"], "repeated": true}));
    }
    let charge = match body["charge"].as_str() {
        Some(id) => l.charges.get(id).cloned(),
        None => l
            .charges
            .values()
            .find(|c| c["order"] == body["order"] && c["refunded"] == json!(false))
            .cloned(),
    };
    let Some(charge) = charge else {
        return json(
            StatusCode::OK,
            json!({"refunded": false, "reason": "no charge"}),
        );
    };
    let record = json!({"type": "refund", "id": new_id("rf"), "key": key, "charge": charge["id"], "order": charge["order"]});
    if let Err(e) = s.store.append(&record) {
        return error(StatusCode::INTERNAL_SERVER_ERROR, format!("store: {e}"));
    }
    l.apply(&record);
    s.env.log(
        "info",
        "payment refunded",
        Some(&req.trace),
        json!({"order": charge["order"], "charge": charge["id"]}),
    );
    json(
        StatusCode::OK,
        json!({"id": record["id"], "refunded": true}),
    )
}
