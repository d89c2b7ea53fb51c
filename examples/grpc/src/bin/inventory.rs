//! `weir-grpc-inventory`: `shop.Inventory` in tonic, on `127.0.0.1:$PORT` (h2c), with the gRPC
//! health protocol (`grpc.health.v1.Health`: the whole server and `shop.Inventory` serving).
//!
//! Stock: `apple` 12, `pear` 3, `flaky` 7; any other SKU is NOT_FOUND. `flaky` fails every other
//! call with UNAVAILABLE (the storefront's retries hide it), `down` always does (its breaker
//! opens and the fallback answers).

use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;
use tonic::{Request, Response, Status};
use weir_example_grpc::{Inventory, InventoryServer, Stock, StockQuery};

#[derive(Default)]
struct Shelf {
    calls: AtomicU64,
}

impl Shelf {
    fn stock(&self, sku: &str) -> Result<Stock, Status> {
        let n = self.calls.fetch_add(1, Ordering::Relaxed);
        let count = match sku {
            "apple" => 12,
            "pear" => 3,
            "flaky" if n.is_multiple_of(2) => return Err(Status::unavailable("flaky is flaking")),
            "flaky" => 7,
            "down" => return Err(Status::unavailable("the shelf is down")),
            _ => return Err(Status::not_found(format!("no SKU {sku:?}"))),
        };
        Ok(Stock {
            sku: sku.to_string(),
            count,
        })
    }
}

type StockStream = Pin<Box<dyn futures::Stream<Item = Result<Stock, Status>> + Send>>;

#[tonic::async_trait]
impl Inventory for Shelf {
    async fn check(&self, req: Request<StockQuery>) -> Result<Response<Stock>, Status> {
        self.stock(&req.get_ref().sku).map(Response::new)
    }

    type WatchStream = StockStream;

    async fn watch(&self, req: Request<StockQuery>) -> Result<Response<StockStream>, Status> {
        let q = req.into_inner();
        let first = self.stock(&q.sku)?;
        let updates = q.updates.max(1);
        let stream = futures::stream::unfold(0u32, move |i| {
            let mut s = first.clone();
            async move {
                if i == updates {
                    return None;
                }
                if i > 0 {
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
                s.count = s.count.saturating_sub(i);
                Some((Ok(s), i + 1))
            }
        });
        Ok(Response::new(Box::pin(stream)))
    }
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let addr = weir_example_grpc::listen_addr();
    let listener = tokio::net::TcpListener::bind(&addr).await?;
    let (health, health_service) = tonic_health::server::health_reporter();
    health.set_serving::<InventoryServer<Shelf>>().await;
    println!(
        "{}",
        serde_json::json!({"msg": "listening", "service": "inventory", "addr": listener.local_addr()?.to_string()})
    );
    tonic::transport::Server::builder()
        .add_service(health_service)
        .add_service(InventoryServer::new(Shelf::default()))
        .serve_with_incoming_shutdown(tokio_stream_of(listener), weir_example_grpc::shutdown())
        .await?;
    Ok(())
}

/// The listener's connections as the stream tonic serves.
fn tokio_stream_of(
    listener: tokio::net::TcpListener,
) -> impl futures::Stream<Item = std::io::Result<tokio::net::TcpStream>> {
    futures::stream::unfold(listener, |l| async move {
        let conn = l.accept().await.map(|(s, _)| s);
        Some((conn, l))
    })
}
