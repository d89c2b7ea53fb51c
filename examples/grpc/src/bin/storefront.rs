//! `weir-grpc-storefront`: an HTTP app on `127.0.0.1:$PORT` that calls `shop.Inventory` through
//! its sidecar (`$INVENTORY_URL`, e.g. `http://127.0.0.1:15100`) with a tonic client, and answers
//! in JSON:
//!
//! - `GET /healthz`, `GET /readyz`: 200.
//! - `GET /stock/<sku>`: `{"sku": …, "count": …}`; a gRPC error as `{"error": <code>,
//!   "message": …, "reason": <x-weir-reason>, "fallback": <x-weir-fallback>}` (the last two when
//!   the sidecar answered, or its fallback did) with 404 for
//!   NOT_FOUND, 503 for UNAVAILABLE, 504 for DEADLINE_EXCEEDED, else 502.
//! - `GET /watch/<sku>?updates=<n>`: the `Watch` stream collected, `{"sku": …, "counts": […]}`.

use bytes::Bytes;
use http_body_util::Full;
use hyper::{Request, Response, StatusCode, body::Incoming, service::service_fn};
use hyper_util::rt::{TokioExecutor, TokioIo};
use serde_json::{Value, json};
use tonic::transport::Channel;
use weir_example_grpc::{InventoryClient, StockQuery};

fn answer(status: StatusCode, body: Value) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(Bytes::from(body.to_string())));
    *r.status_mut() = status;
    r.headers_mut().insert(
        hyper::header::CONTENT_TYPE,
        hyper::header::HeaderValue::from_static("application/json"),
    );
    r
}

fn failed(s: &tonic::Status) -> Response<Full<Bytes>> {
    let status = match s.code() {
        tonic::Code::NotFound => StatusCode::NOT_FOUND,
        tonic::Code::Unavailable => StatusCode::SERVICE_UNAVAILABLE,
        tonic::Code::DeadlineExceeded => StatusCode::GATEWAY_TIMEOUT,
        _ => StatusCode::BAD_GATEWAY,
    };
    let header = |name: &str| s.metadata().get(name).and_then(|v| v.to_str().ok());
    answer(
        status,
        json!({
            "error": format!("{:?}", s.code()),
            "message": s.message(),
            "reason": header("x-weir-reason"),
            "fallback": header("x-weir-fallback"),
        }),
    )
}

async fn handle(
    inventory: InventoryClient<Channel>,
    req: Request<Incoming>,
) -> Response<Full<Bytes>> {
    let path = req.uri().path().to_string();
    let query = req.uri().query().unwrap_or("");
    let mut inventory = inventory;
    if path == "/healthz" || path == "/readyz" {
        return answer(StatusCode::OK, json!({"ok": true}));
    }
    if let Some(sku) = path.strip_prefix("/stock/") {
        let q = StockQuery {
            sku: sku.to_string(),
            updates: 0,
        };
        return match inventory.check(q).await {
            Ok(r) => {
                let s = r.into_inner();
                answer(StatusCode::OK, json!({"sku": s.sku, "count": s.count}))
            }
            Err(s) => failed(&s),
        };
    }
    if let Some(sku) = path.strip_prefix("/watch/") {
        let updates = query
            .split('&')
            .find_map(|kv| kv.strip_prefix("updates="))
            .and_then(|n| n.parse().ok())
            .unwrap_or(3);
        let q = StockQuery {
            sku: sku.to_string(),
            updates,
        };
        let mut stream = match inventory.watch(q).await {
            Ok(r) => r.into_inner(),
            Err(s) => return failed(&s),
        };
        let mut counts = Vec::new();
        loop {
            match stream.message().await {
                Ok(Some(s)) => counts.push(s.count),
                Ok(None) => break,
                Err(s) => return failed(&s),
            }
        }
        return answer(StatusCode::OK, json!({"sku": sku, "counts": counts}));
    }
    answer(
        StatusCode::NOT_FOUND,
        json!({"error": "no such path", "path": path}),
    )
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let url = std::env::var("INVENTORY_URL").unwrap_or_else(|_| "http://127.0.0.1:15100".into());
    // One HTTP/2 connection to the sidecar's outbound listener, opened on first use.
    let inventory = InventoryClient::new(Channel::from_shared(url)?.connect_lazy());
    let listener = tokio::net::TcpListener::bind(weir_example_grpc::listen_addr()).await?;
    println!(
        "{}",
        json!({"msg": "listening", "service": "storefront", "addr": listener.local_addr()?.to_string()})
    );
    let shutdown = weir_example_grpc::shutdown();
    tokio::pin!(shutdown);
    loop {
        let (stream, _) = tokio::select! {
            r = listener.accept() => r?,
            _ = &mut shutdown => return Ok(()),
        };
        let inventory = inventory.clone();
        tokio::spawn(async move {
            let svc = service_fn(move |req| {
                let inventory = inventory.clone();
                async move { Ok::<_, std::convert::Infallible>(handle(inventory, req).await) }
            });
            let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                .serve_connection(TokioIo::new(stream), svc)
                .await;
        });
    }
}
