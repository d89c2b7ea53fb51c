//! `users`: customer profiles. `GET /users/<id>`, `GET /users`.
//!
//! Test switch: `POST /admin/slow {"ms": N}` delays every profile read by N ms (0 to stop), to
//! show the caller's timeout and circuit breaker at work.

use hyper::{Method, StatusCode};
use serde_json::{Value, json};
use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;
use weir_example_shop::{Env, Req, Resp, error, json, serve};

struct Users {
    env: Arc<Env>,
    profiles: BTreeMap<String, Value>,
    slow_ms: AtomicU64,
}

fn seed() -> Vec<Value> {
    vec![
        json!({"id": "u1", "name": "Ada Lovelace", "email": "ada@example.com"}),
        json!({"id": "u2", "name": "Grace Hopper", "email": "grace@example.com"}),
        json!({"id": "u3", "name": "Alan Turing", "email": "alan@example.com"}),
    ]
}

fn main() {
    weir_example_shop::runtime().block_on(async {
        let env = Env::from_env("users");
        let (store, mut records) = env.open_store("users");
        if records.is_empty() {
            for u in seed() {
                store.append(&u).expect("seed users");
                records.push(u);
            }
        }
        let profiles = records
            .into_iter()
            .filter_map(|u| Some((u["id"].as_str()?.to_string(), u)))
            .collect();
        let state = Arc::new(Users {
            env: env.clone(),
            profiles,
            slow_ms: AtomicU64::new(0),
        });
        serve(
            env,
            state,
            |s: Arc<Users>| async move { s.env.readiness(false).await },
            handle,
        )
        .await;
    });
}

async fn handle(s: Arc<Users>, req: Req) -> Resp {
    match (&req.method, req.segments().as_slice()) {
        (&Method::GET, ["users"]) => json(
            StatusCode::OK,
            json!({"users": s.profiles.values().collect::<Vec<_>>()}),
        ),
        (&Method::GET, ["users", id]) => {
            let ms = s.slow_ms.load(Ordering::Relaxed);
            if ms > 0 {
                tokio::time::sleep(Duration::from_millis(ms)).await;
            }
            match s.profiles.get(*id) {
                Some(u) => json(StatusCode::OK, u.clone()),
                None => error(StatusCode::NOT_FOUND, format!("no user {id}")),
            }
        }
        (&Method::POST, ["admin", "slow"]) => {
            let body = match req.json() {
                Ok(b) => b,
                Err(r) => return r,
            };
            let ms = body["ms"].as_u64().unwrap_or(0);
            s.slow_ms.store(ms, Ordering::Relaxed);
            s.env.log(
                "warn",
                "test switch: slow reads",
                Some(&req.trace),
                json!({"ms": ms}),
            );
            json(StatusCode::OK, json!({"slowMs": ms}))
        }
        _ => error(
            StatusCode::NOT_FOUND,
            format!("no route {} {}", req.method, req.path),
        ),
    }
}
