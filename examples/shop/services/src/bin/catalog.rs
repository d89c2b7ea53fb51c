//! `catalog`: products and inventory.
//!
//! - `GET /products`, `GET /products/<id>`: name, price, stock.
//! - `POST /reservations {order, items: [{productId, qty}]}` (the place-order saga's first
//!   step): takes the stock, or 409 when there is not enough (a refusal: nothing to undo).
//!   Repeated with the same `Idempotency-Key` it answers the same reservation.
//! - `DELETE /reservations {order, reservation}` (its compensation): gives the stock back, once.
//!   `reservation` may be null (the step's outcome was unknown): the order's reservation is
//!   released if there is one.
//! - `GET /reservations`: every reservation and whether it was released.

use hyper::{Method, StatusCode};
use serde_json::{Value, json};
use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use weir_example_shop::{Env, Req, Resp, Store, error, json, new_id, serve};

#[derive(Default)]
struct Inventory {
    /// id → product (with its `stock`).
    products: BTreeMap<String, Value>,
    /// id → reservation `{id, order, key, items, released}`.
    reservations: BTreeMap<String, Value>,
}

impl Inventory {
    fn apply(&mut self, r: &Value) {
        match r["type"].as_str() {
            Some("product") => {
                let id = r["product"]["id"].as_str().unwrap_or_default().to_string();
                self.products.insert(id, r["product"].clone());
            }
            Some("reserved") => {
                for it in r["items"].as_array().into_iter().flatten() {
                    self.add_stock(it, -1);
                }
                let id = r["id"].as_str().unwrap_or_default().to_string();
                let mut res = r.clone();
                res["released"] = json!(false);
                self.reservations.insert(id, res);
            }
            Some("released") => {
                let id = r["id"].as_str().unwrap_or_default();
                if let Some(res) = self.reservations.get_mut(id) {
                    res["released"] = json!(true);
                    let items = res["items"].as_array().cloned().unwrap_or_default();
                    for it in &items {
                        self.add_stock(it, 1);
                    }
                }
            }
            _ => {}
        }
    }

    fn add_stock(&mut self, item: &Value, sign: i64) {
        let qty = item["qty"].as_i64().unwrap_or(0);
        if let Some(p) = item["productId"]
            .as_str()
            .and_then(|id| self.products.get_mut(id))
        {
            p["stock"] = json!(p["stock"].as_i64().unwrap_or(0) + sign * qty);
        }
    }
}

struct Catalog {
    env: Arc<Env>,
    store: Store,
    inv: Mutex<Inventory>,
}

fn seed() -> Vec<Value> {
    [
        ("p1", "Espresso beans, 1 kg", 24.5, 100),
        ("p2", "Hand grinder", 89.0, 20),
        ("p3", "Stoneware mug", 12.0, 50),
    ]
    .into_iter()
    .map(|(id, name, price, stock)| {
        json!({"type": "product", "product": {"id": id, "name": name, "price": price, "stock": stock}})
    })
    .collect()
}

fn main() {
    weir_example_shop::runtime().block_on(async {
        let env = Env::from_env("catalog");
        let (store, mut records) = env.open_store("catalog");
        if records.is_empty() {
            for p in seed() {
                store.append(&p).expect("seed catalog");
                records.push(p);
            }
        }
        let mut inv = Inventory::default();
        records.iter().for_each(|r| inv.apply(r));
        let state = Arc::new(Catalog {
            env: env.clone(),
            store,
            inv: Mutex::new(inv),
        });
        serve(
            env,
            state,
            |s: Arc<Catalog>| async move { s.env.readiness(false).await },
            handle,
        )
        .await;
    });
}

async fn handle(s: Arc<Catalog>, req: Req) -> Resp {
    match (&req.method, req.segments().as_slice()) {
        (&Method::GET, ["products"]) => {
            let inv = s.inv.lock().unwrap();
            json(
                StatusCode::OK,
                json!({"products": inv.products.values().collect::<Vec<_>>()}),
            )
        }
        (&Method::GET, ["products", id]) => match s.inv.lock().unwrap().products.get(*id) {
            Some(p) => json(StatusCode::OK, p.clone()),
            None => error(StatusCode::NOT_FOUND, format!("no product {id}")),
        },
        (&Method::GET, ["reservations"]) => {
            let inv = s.inv.lock().unwrap();
            json(
                StatusCode::OK,
                json!({"reservations": inv.reservations.values().collect::<Vec<_>>()}),
            )
        }
        (&Method::POST, ["reservations"]) => reserve(&s, &req),
        (&Method::DELETE, ["reservations"]) => release(&s, &req),
        _ => error(
            StatusCode::NOT_FOUND,
            format!("no route {} {}", req.method, req.path),
        ),
    }
}

fn reserve(s: &Catalog, req: &Req) -> Resp {
    let body = match req.json() {
        Ok(b) => b,
        Err(r) => return r,
    };
    let key = req.header("idempotency-key").map(str::to_string);
    let order = body["order"].as_str().unwrap_or_default().to_string();
    let Some(items) = body["items"].as_array() else {
        return error(StatusCode::UNPROCESSABLE_ENTITY, "items: expected an array");
    };
    let mut inv = s.inv.lock().unwrap();
    if let Some(k) = &key
        && let Some(r) = inv.reservations.values().find(|r| r["key"] == json!(k))
    {
        return json(
            StatusCode::OK,
            json!({"id": r["id"], "order": r["order"], "repeated": true}),
        );
    }
    for (i, it) in items.iter().enumerate() {
        let (Some(pid), Some(qty)) = (it["productId"].as_str(), it["qty"].as_i64()) else {
            return error(
                StatusCode::UNPROCESSABLE_ENTITY,
                format!("items[{i}]: expected {{productId, qty}}"),
            );
        };
        let Some(p) = inv.products.get(pid) else {
            return error(
                StatusCode::UNPROCESSABLE_ENTITY,
                format!("items[{i}].productId: no product {pid}"),
            );
        };
        let stock = p["stock"].as_i64().unwrap_or(0);
        if qty > stock {
            return json(
                StatusCode::CONFLICT,
                json!({"error": format!("insufficient stock of {pid}: {qty} wanted, {stock} left"), "productId": pid}),
            );
        }
    }
    let id = new_id("r");
    let record = json!({"type": "reserved", "id": id, "order": order, "key": key, "items": items});
    if let Err(e) = s.store.append(&record) {
        return error(StatusCode::INTERNAL_SERVER_ERROR, format!("store: {e}"));
    }
    inv.apply(&record);
    s.env.log(
        "info",
        "stock reserved",
        Some(&req.trace),
        json!({"order": order, "reservation": id}),
    );
    json(StatusCode::CREATED, json!({"id": id, "order": order}))
}

fn release(s: &Catalog, req: &Req) -> Resp {
    let body = match req.json() {
        Ok(b) => b,
        Err(r) => return r,
    };
    let mut inv = s.inv.lock().unwrap();
    let found = match body["reservation"].as_str() {
        Some(id) => inv.reservations.get(id).cloned(),
        None => inv
            .reservations
            .values()
            .find(|r| r["order"] == body["order"] && r["released"] == json!(false))
            .cloned(),
    };
    let Some(res) = found else {
        // Nothing was reserved: nothing to give back.
        return json(
            StatusCode::OK,
            json!({"released": false, "reason": "no reservation"}),
        );
    };
    if res["released"] == json!(true) {
        return json(
            StatusCode::OK,
            json!({"released": true, "repeated": true, "id": res["id"]}),
        );
    }
    let record = json!({"type": "released", "id": res["id"]});
    if let Err(e) = s.store.append(&record) {
        return error(StatusCode::INTERNAL_SERVER_ERROR, format!("store: {e}"));
    }
    inv.apply(&record);
    s.env.log(
        "info",
        "stock released",
        Some(&req.trace),
        json!({"order": res["order"], "reservation": res["id"]}),
    );
    json(StatusCode::OK, json!({"released": true, "id": res["id"]}))
}
