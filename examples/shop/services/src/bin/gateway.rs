//! `gateway`: the shop's front door. It owns no data: it routes to orders and catalog through
//! its sidecar (`ORDERS_URL`, `CATALOG_URL`) and passes answers back unchanged.
//!
//! - `GET /products` → catalog; `POST /orders`, `GET /orders`, `GET /orders/<id>` → orders.

use hyper::{Method, StatusCode};
use serde_json::{Value, json};
use std::sync::Arc;
use weir_example_shop::{Env, Req, Resp, error, json, serve};

struct Gateway {
    env: Arc<Env>,
}

fn main() {
    weir_example_shop::runtime().block_on(async {
        let env = Env::from_env("gateway");
        let state = Arc::new(Gateway { env: env.clone() });
        serve(
            env,
            state,
            |s: Arc<Gateway>| async move { s.env.readiness(false).await },
            handle,
        )
        .await;
    });
}

async fn handle(s: Arc<Gateway>, req: Req) -> Resp {
    let dep = match (&req.method, req.segments().as_slice()) {
        (&Method::GET, ["products", ..]) => "catalog",
        (&Method::GET | &Method::POST, ["orders", ..]) => "orders",
        _ => {
            return error(
                StatusCode::NOT_FOUND,
                format!("no route {} {}", req.method, req.path),
            );
        }
    };
    let body = if req.body.is_empty() {
        None
    } else {
        match req.json() {
            Ok(b) => Some(b),
            Err(r) => return r,
        }
    };
    let path = if req.query.is_empty() {
        req.path.clone()
    } else {
        format!("{}?{}", req.path, req.query)
    };
    let key = req.header("idempotency-key").map(str::to_string);
    let headers: Vec<(&str, &str)> = key
        .iter()
        .map(|k| ("idempotency-key", k.as_str()))
        .collect();
    match s
        .env
        .call(
            dep,
            req.method.clone(),
            &path,
            body.as_ref(),
            &req.trace,
            &headers,
        )
        .await
    {
        Ok((status, body)) => json(status, body),
        Err(e) => json(
            StatusCode::BAD_GATEWAY,
            json!({"error": format!("{dep}: {e}"), "dependency": dep, "detail": Value::Null}),
        ),
    }
}
