//! `notifications`: tells customers what happened to their orders.
//!
//! Events pushed by the sidecar: `POST /events/order-outcome` (the place-order saga's outcome)
//! and `POST /events/payment-captured`. Each event id is recorded, so a redelivery is
//! acknowledged without a second notification. `GET /notifications` lists them.

use hyper::{Method, StatusCode};
use serde_json::{Value, json};
use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use weir_example_shop::{Env, Req, Resp, Store, error, json, serve};

struct Notifications {
    env: Arc<Env>,
    store: Store,
    /// event id → notification.
    sent: Mutex<BTreeMap<String, Value>>,
}

fn main() {
    weir_example_shop::runtime().block_on(async {
        let env = Env::from_env("notifications");
        let (store, records) = env.open_store("notifications");
        let sent = records
            .into_iter()
            .filter_map(|r| Some((r["eventId"].as_str()?.to_string(), r)))
            .collect();
        let state = Arc::new(Notifications {
            env: env.clone(),
            store,
            sent: Mutex::new(sent),
        });
        serve(
            env,
            state,
            |s: Arc<Notifications>| async move { s.env.readiness(true).await },
            handle,
        )
        .await;
    });
}

async fn handle(s: Arc<Notifications>, req: Req) -> Resp {
    match (&req.method, req.segments().as_slice()) {
        (&Method::GET, ["notifications"]) => {
            let sent = s.sent.lock().unwrap();
            let mut list: Vec<&Value> = sent.values().collect();
            list.sort_by_key(|n| n["seq"].as_u64());
            json(StatusCode::OK, json!({"notifications": list}))
        }
        (&Method::POST, ["events", kind]) => notify(&s, kind, &req),
        _ => error(
            StatusCode::NOT_FOUND,
            format!("no route {} {}", req.method, req.path),
        ),
    }
}

fn notify(s: &Notifications, kind: &str, req: &Req) -> Resp {
    let Some(event_id) = req.header("ce-id").map(str::to_string) else {
        return error(
            StatusCode::BAD_REQUEST,
            "ce-id: missing (events come through the sidecar)",
        );
    };
    let body = match req.json() {
        Ok(b) => b,
        Err(r) => return r,
    };
    let (order, text) = match kind {
        "order-outcome" => {
            let order = body["input"]["orderId"].clone();
            let text = match body["outcome"].as_str() {
                Some("Completed") => format!(
                    "Your order {} is confirmed and on its way.",
                    order.as_str().unwrap_or("?")
                ),
                _ => format!(
                    "Your order {} could not be completed: {}",
                    order.as_str().unwrap_or("?"),
                    body["reason"].as_str().unwrap_or("unknown reason")
                ),
            };
            (order, text)
        }
        "payment-captured" => (
            body["orderId"].clone(),
            format!(
                "We charged {} for order {}.",
                body["amount"],
                body["orderId"].as_str().unwrap_or("?")
            ),
        ),
        other => return error(StatusCode::NOT_FOUND, format!("no event kind {other}")),
    };
    let mut sent = s.sent.lock().unwrap();
    if sent.contains_key(&event_id) {
        return json(StatusCode::OK, json!({"duplicate": true}));
    }
    let record = json!({"eventId": event_id, "seq": sent.len() + 1, "kind": kind,
                        "type": req.header("ce-type"), "orderId": order, "text": text});
    if let Err(e) = s.store.append(&record) {
        return error(StatusCode::INTERNAL_SERVER_ERROR, format!("store: {e}"));
    }
    s.env.log(
        "info",
        "notification sent",
        Some(&req.trace),
        json!({"kind": kind, "order": order, "eventId": event_id}),
    );
    sent.insert(event_id, record);
    json(StatusCode::OK, json!({"sent": true}))
}
