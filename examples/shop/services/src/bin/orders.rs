//! `orders`: orders and their shipments.
//!
//! - `POST /orders {userId, items: [{productId, qty}], cardToken, address}`: prices the items
//!   (catalog), stores the order as `pending` and publishes `orders.created` through the
//!   sidecar, which validates it against the Queue's schema: an invalid order is answered 422
//!   with the sidecar's errors (each naming the field) and ends `rejected`. The event starts the
//!   place-order saga. Repeated with the same `Idempotency-Key`, it answers the same order.
//! - `GET /orders/<id>`: the order with its customer (users; when users is slow or down, the
//!   sidecar's fallback customer `{"name": "Unknown", "stale": true}`). `GET /orders`: all.
//! - `POST /shipments {order, address, reservation}`: the saga's last step; once per key.
//! - `POST /events/order-outcome`: the saga's outcome, pushed by the sidecar: the order ends
//!   `confirmed`, or `failed` with the reason.

use hyper::{Method, StatusCode};
use serde_json::{Value, json};
use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use weir_example_shop::{Env, Req, Resp, Store, Trace, error, json, new_id, serve};

const CREATED_QUEUE: &str = "orders";

#[derive(Default)]
struct Book {
    orders: BTreeMap<String, Value>,
    /// Idempotency-Key of a POST /orders → order id.
    keys: BTreeMap<String, String>,
    /// Idempotency-Key → shipment.
    shipments: BTreeMap<String, Value>,
}

impl Book {
    fn apply(&mut self, r: &Value) {
        match r["type"].as_str() {
            Some("created") => {
                let o = r["order"].clone();
                let id = o["id"].as_str().unwrap_or_default().to_string();
                if let Some(k) = r["key"].as_str() {
                    self.keys.insert(k.to_string(), id.clone());
                }
                self.orders.insert(id, o);
            }
            Some("status") => {
                if let Some(o) = r["id"].as_str().and_then(|id| self.orders.get_mut(id)) {
                    o["status"] = r["status"].clone();
                    o["reason"] = r["reason"].clone();
                    if !r["payment"].is_null() {
                        o["payment"] = r["payment"].clone();
                    }
                }
            }
            Some("shipment") => {
                let s = r["shipment"].clone();
                if let Some(o) = s["order"].as_str().and_then(|id| self.orders.get_mut(id)) {
                    o["shipment"] = s["id"].clone();
                }
                self.shipments
                    .insert(r["key"].as_str().unwrap_or_default().to_string(), s);
            }
            _ => {}
        }
    }
}

struct Orders {
    env: Arc<Env>,
    store: Store,
    book: Mutex<Book>,
}

impl Orders {
    #[allow(
        clippy::result_large_err,
        reason = "the error is the answer, built once and returned straight to the handler"
    )]
    fn record(&self, r: Value) -> Result<(), Resp> {
        self.store
            .append(&r)
            .map_err(|e| error(StatusCode::INTERNAL_SERVER_ERROR, format!("store: {e}")))?;
        self.book.lock().unwrap().apply(&r);
        Ok(())
    }
}

fn main() {
    weir_example_shop::runtime().block_on(async {
        let env = Env::from_env("orders");
        let (store, records) = env.open_store("orders");
        let mut book = Book::default();
        records.iter().for_each(|r| book.apply(r));
        let state = Arc::new(Orders {
            env: env.clone(),
            store,
            book: Mutex::new(book),
        });
        serve(
            env,
            state,
            |s: Arc<Orders>| async move { s.env.readiness(true).await },
            handle,
        )
        .await;
    });
}

async fn handle(s: Arc<Orders>, req: Req) -> Resp {
    match (&req.method, req.segments().as_slice()) {
        (&Method::GET, ["orders"]) => {
            let b = s.book.lock().unwrap();
            json(
                StatusCode::OK,
                json!({"orders": b.orders.values().collect::<Vec<_>>()}),
            )
        }
        (&Method::GET, ["orders", id]) => details(&s, id, &req.trace).await,
        (&Method::POST, ["orders"]) => place(&s, &req).await,
        (&Method::POST, ["shipments"]) => ship(&s, &req),
        (&Method::POST, ["events", "order-outcome"]) => outcome(&s, &req),
        _ => error(
            StatusCode::NOT_FOUND,
            format!("no route {} {}", req.method, req.path),
        ),
    }
}

/// The total of the well-formed items at the catalog's prices; `Err` for an unknown product or
/// an unreachable catalog. Malformed items are left to the schema to name.
async fn price(s: &Orders, items: &Value, trace: &Trace) -> Result<f64, Resp> {
    let mut total = 0.0;
    for (i, it) in items.as_array().into_iter().flatten().enumerate() {
        let (Some(pid), Some(qty)) = (it["productId"].as_str(), it["qty"].as_i64()) else {
            continue;
        };
        let path = format!("/products/{pid}");
        match s
            .env
            .call("catalog", Method::GET, &path, None, trace, &[])
            .await
        {
            Ok((st, p)) if st == StatusCode::OK => {
                total += p["price"].as_f64().unwrap_or(0.0) * qty as f64;
            }
            Ok((st, _)) if st == StatusCode::NOT_FOUND => {
                return Err(error(
                    StatusCode::UNPROCESSABLE_ENTITY,
                    format!("items[{i}].productId: no product {pid:?}"),
                ));
            }
            Ok((st, body)) => {
                return Err(json(
                    StatusCode::SERVICE_UNAVAILABLE,
                    json!({"error": format!("catalog answered {st}"), "detail": body}),
                ));
            }
            Err(e) => {
                return Err(error(
                    StatusCode::SERVICE_UNAVAILABLE,
                    format!("catalog: {e}"),
                ));
            }
        }
    }
    Ok((total * 100.0).round() / 100.0)
}

async fn place(s: &Orders, req: &Req) -> Resp {
    let body = match req.json() {
        Ok(b) => b,
        Err(r) => return r,
    };
    let Value::Object(fields) = &body else {
        return error(StatusCode::BAD_REQUEST, "body: expected a JSON object");
    };
    let key = req.header("idempotency-key").map(str::to_string);
    if let Some(k) = &key {
        let b = s.book.lock().unwrap();
        if let Some(o) = b.keys.get(k).and_then(|id| b.orders.get(id)) {
            return json(StatusCode::OK, o.clone());
        }
    }
    let total = match price(s, &body["items"], &req.trace).await {
        Ok(t) => t,
        Err(r) => return r,
    };
    let id = new_id("o");
    // The event is what the client sent plus the id and the total: the Queue's schema judges it.
    let mut event = fields.clone();
    event.insert("orderId".into(), json!(id));
    event.insert("total".into(), json!(total));
    let event = Value::Object(event);
    let order = json!({"id": id, "status": "pending", "userId": body["userId"], "items": body["items"],
                       "total": total, "address": body["address"]});
    if let Err(r) = s.record(json!({"type": "created", "order": order, "key": key})) {
        return r;
    }
    let refuse = |status: StatusCode, reason: String, detail: Value| {
        let _ =
            s.record(json!({"type": "status", "id": id, "status": "rejected", "reason": reason}));
        s.env.log(
            "warn",
            "order refused",
            Some(&req.trace),
            json!({"order": id, "reason": reason}),
        );
        json(
            status,
            json!({"error": reason, "order": id, "errors": detail["errors"]}),
        )
    };
    match s.env.publish(CREATED_QUEUE, &id, &event, &req.trace).await {
        Ok((st, _)) if st == StatusCode::ACCEPTED => {
            s.env.log(
                "info",
                "order placed",
                Some(&req.trace),
                json!({"order": id, "total": total}),
            );
            json(StatusCode::CREATED, order)
        }
        Ok((st, detail)) if st == StatusCode::UNPROCESSABLE_ENTITY => {
            let fields: Vec<String> = detail["errors"]
                .as_array()
                .into_iter()
                .flatten()
                .map(|e| {
                    format!(
                        "{}: {}",
                        e["path"].as_str().unwrap_or(""),
                        e["message"].as_str().unwrap_or("")
                    )
                })
                .collect();
            refuse(
                StatusCode::UNPROCESSABLE_ENTITY,
                format!("invalid order: {}", fields.join("; ")),
                detail,
            )
        }
        Ok((st, detail)) => refuse(
            StatusCode::SERVICE_UNAVAILABLE,
            format!("order not accepted: publish answered {st}"),
            detail,
        ),
        Err(e) => refuse(
            StatusCode::SERVICE_UNAVAILABLE,
            format!("order not accepted: {e}"),
            Value::Null,
        ),
    }
}

async fn details(s: &Orders, id: &str, trace: &Trace) -> Resp {
    let Some(mut order) = s.book.lock().unwrap().orders.get(id).cloned() else {
        return error(StatusCode::NOT_FOUND, format!("no order {id}"));
    };
    let user = order["userId"].as_str().unwrap_or_default().to_string();
    match s
        .env
        .call(
            "users",
            Method::GET,
            &format!("/users/{user}"),
            None,
            trace,
            &[],
        )
        .await
    {
        Ok((st, customer)) if st.is_success() => order["customer"] = customer,
        Ok((st, body)) => {
            order["customer"] = Value::Null;
            order["customerError"] = json!(format!("users answered {st}: {body}"));
        }
        Err(e) => {
            order["customer"] = Value::Null;
            order["customerError"] = json!(e);
        }
    }
    json(StatusCode::OK, order)
}

fn ship(s: &Orders, req: &Req) -> Resp {
    let body = match req.json() {
        Ok(b) => b,
        Err(r) => return r,
    };
    let key = req
        .header("idempotency-key")
        .map(str::to_string)
        .unwrap_or_else(|| new_id("key"));
    if let Some(sh) = s.book.lock().unwrap().shipments.get(&key) {
        return json(StatusCode::OK, sh.clone());
    }
    let Some(order) = body["order"].as_str() else {
        return error(
            StatusCode::UNPROCESSABLE_ENTITY,
            "order: expected an order id",
        );
    };
    if !s.book.lock().unwrap().orders.contains_key(order) {
        return error(
            StatusCode::UNPROCESSABLE_ENTITY,
            format!("order: no order {order}"),
        );
    }
    let shipment = json!({"id": new_id("sh"), "order": order, "address": body["address"], "reservation": body["reservation"]});
    if let Err(r) = s.record(json!({"type": "shipment", "key": key, "shipment": shipment})) {
        return r;
    }
    s.env.log(
        "info",
        "shipment created",
        Some(&req.trace),
        json!({"order": order, "shipment": shipment["id"]}),
    );
    json(StatusCode::CREATED, shipment)
}

fn outcome(s: &Orders, req: &Req) -> Resp {
    let body = match req.json() {
        Ok(b) => b,
        Err(r) => return r,
    };
    let Some(id) = body["input"]["orderId"].as_str() else {
        // Permanent: the sidecar dead-letters it for a person to look at.
        return error(StatusCode::UNPROCESSABLE_ENTITY, "input.orderId: missing");
    };
    if !s.book.lock().unwrap().orders.contains_key(id) {
        return error(
            StatusCode::UNPROCESSABLE_ENTITY,
            format!("input.orderId: no order {id}"),
        );
    }
    let (status, reason) = match body["outcome"].as_str() {
        Some("Completed") => ("confirmed", Value::Null),
        other => (
            "failed",
            json!(
                body["reason"]
                    .as_str()
                    .map(str::to_string)
                    .unwrap_or_else(|| format!("saga ended {}", other.unwrap_or("?")))
            ),
        ),
    };
    let payment = body["results"]["charge"]["id"].clone();
    if let Err(r) = s.record(
        json!({"type": "status", "id": id, "status": status, "reason": reason, "payment": payment}),
    ) {
        return r;
    }
    s.env.log(
        "info",
        "order outcome",
        Some(&req.trace),
        json!({"order": id, "status": status, "reason": reason, "saga": body["sagaId"]}),
    );
    json(StatusCode::OK, json!({"order": id, "status": status}))
}
