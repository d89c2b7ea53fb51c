//! Pub/sub benchmark against each broker (a real nats-server, redis-server, rabbitmq-server and
//! Tansu, a Kafka-protocol broker keeping its log in memory), in one run per broker: the raw
//! client's publish-with-confirmation (async-nats publish + ack, redis `XADD`, lapin publish +
//! publisher confirm, rdkafka's idempotent producer with `acks=all`) vs
//! `POST /v1/publish/<queue>` through `weir-proxy` (schema validation on), then end-to-end
//! consume throughput through the sidecar into a trivial app. Prints a Markdown table. Run with
//! `sidecar/benches/pubsub.sh` (or `cargo bench -p weir-proxy --bench pubsub`); `PUBSUB_N`,
//! `PUBSUB_CONCURRENCY` and `PUBSUB_BROKERS` (default `nats,redis,rabbitmq,kafka`) adjust it;
//! `PUBSUB_REDIS_FSYNC=everysec` runs Redis with `appendfsync everysec` instead of `always`.

use bytes::Bytes;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};
use weir_testkit::bridge::*;

fn env_usize(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

struct Row {
    broker: &'static str,
    path: &'static str,
    messages: usize,
    concurrency: usize,
    elapsed: Duration,
    latencies: Vec<Duration>,
}

impl Row {
    fn rate(&self) -> f64 {
        self.messages as f64 / self.elapsed.as_secs_f64()
    }
    fn pct(&self, p: f64) -> String {
        if self.latencies.is_empty() {
            return "–".into();
        }
        let mut l = self.latencies.clone();
        l.sort();
        let i = ((l.len() as f64 * p).ceil() as usize).clamp(1, l.len()) - 1;
        format!("{:.2}", l[i].as_secs_f64() * 1000.0)
    }
}

fn body(i: usize) -> String {
    format!(
        r#"{{"orderId":"o-{i}","amount":{i},"currency":"EUR","lines":[{{"sku":"A-1","qty":2}}]}}"#
    )
}

/// `concurrency` workers share a counter of `n` jobs; each job's latency is recorded.
async fn run_load<F, Fut>(n: usize, concurrency: usize, job: F) -> (Duration, Vec<Duration>)
where
    F: Fn(usize) -> Fut + Clone + Send + Sync + 'static,
    Fut: std::future::Future<Output = ()> + Send,
{
    let next = Arc::new(AtomicUsize::new(0));
    let start = Instant::now();
    let mut workers = Vec::new();
    for _ in 0..concurrency {
        let (next, job) = (next.clone(), job.clone());
        workers.push(tokio::spawn(async move {
            let mut lat = Vec::new();
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                if i >= n {
                    break;
                }
                let t = Instant::now();
                job(i).await;
                lat.push(t.elapsed());
            }
            lat
        }));
    }
    let mut all = Vec::with_capacity(n);
    for w in workers {
        all.extend(w.await.unwrap());
    }
    (start.elapsed(), all)
}

/// `concurrency` connections, each sending `POST /v1/publish/orders` and reading the 202 in turn.
async fn http_load(
    addr: std::net::SocketAddr,
    n: usize,
    concurrency: usize,
) -> (Duration, Vec<Duration>) {
    use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
    let next = Arc::new(AtomicUsize::new(0));
    let start = Instant::now();
    let mut workers = Vec::new();
    for _ in 0..concurrency {
        let next = next.clone();
        workers.push(tokio::spawn(async move {
            let stream = tokio::net::TcpStream::connect(addr).await.unwrap();
            stream.set_nodelay(true).unwrap();
            let (r, mut w) = stream.into_split();
            let mut r = BufReader::new(r);
            let mut lat = Vec::new();
            let mut line = String::new();
            let mut req = Vec::with_capacity(512);
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                if i >= n {
                    break;
                }
                let b = body(i);
                req.clear();
                req.extend_from_slice(
                    format!(
                        "POST /v1/publish/orders HTTP/1.1\r\nhost: bench\r\n\
                         content-type: application/json\r\nce-id: sidecar-{i}\r\n\
                         content-length: {}\r\n\r\n{b}",
                        b.len()
                    )
                    .as_bytes(),
                );
                let t = Instant::now();
                w.write_all(&req).await.unwrap();
                line.clear();
                r.read_line(&mut line).await.unwrap();
                assert!(line.starts_with("HTTP/1.1 202"), "{line}");
                let mut len = 0usize;
                loop {
                    line.clear();
                    r.read_line(&mut line).await.unwrap();
                    let l = line.trim_end();
                    if l.is_empty() {
                        break;
                    }
                    if let Some((k, v)) = l.split_once(':')
                        && k.eq_ignore_ascii_case("content-length")
                    {
                        len = v.trim().parse().unwrap();
                    }
                }
                let mut answer = vec![0u8; len];
                r.read_exact(&mut answer).await.unwrap();
                lat.push(t.elapsed());
            }
            lat
        }));
    }
    let mut all = Vec::with_capacity(n);
    for w in workers {
        all.extend(w.await.unwrap());
    }
    (start.elapsed(), all)
}

fn main() {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(bench());
}

async fn bench() {
    let brokers =
        std::env::var("PUBSUB_BROKERS").unwrap_or_else(|_| "nats,redis,rabbitmq,kafka".into());
    let mut rows = Vec::new();
    let mut ratios = Vec::new();
    for name in brokers.split(',').map(str::trim) {
        let kind = match name {
            "nats" => Kind::Nats,
            "redis" => Kind::Redis,
            "rabbitmq" => Kind::Rabbitmq,
            "kafka" => Kind::Kafka,
            other => panic!("PUBSUB_BROKERS: unknown broker {other:?}"),
        };
        let Some(broker) = TestBroker::start(kind).await else {
            continue;
        };
        let r = bench_one(&broker).await;
        ratios.push((kind.name(), r[1].rate() / r[0].rate() * 100.0));
        rows.extend(r);
    }
    println!();
    println!("| broker | path | messages | concurrency | msgs/s | p50 ms | p99 ms |");
    println!("|---|---|---:|---:|---:|---:|---:|");
    for r in &rows {
        println!(
            "| {} | {} | {} | {} | {:.0} | {} | {} |",
            r.broker,
            r.path,
            r.messages,
            r.concurrency,
            r.rate(),
            r.pct(0.50),
            r.pct(0.99)
        );
    }
    println!();
    for (b, pct) in ratios {
        println!("{b}: sidecar publish throughput = {pct:.0} % of the raw client's");
    }
}

/// The event's CloudEvents headers, as the sidecar sets them.
fn headers(id: &str) -> Vec<(String, String)> {
    weir_proxy::bridge::publish::cloud_event_headers(
        id,
        "weir://shop/bench",
        "order.created",
        "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
    )
}

/// The raw client's publish-and-confirm on `broker`, `n` times at `concurrency`.
async fn raw_publish_load(broker: &TestBroker, n: usize, concurrency: usize) -> Row {
    let (path, (elapsed, latencies)) = match broker {
        TestBroker::Nats(nats) => {
            let js = nats.js().await;
            let r = run_load(n, concurrency, move |i| {
                let js = js.clone();
                async move {
                    let id = format!("raw-{i}");
                    let h = weir_proxy::bridge::publish::event_headers(
                        &id,
                        "weir://shop/bench",
                        "order.created",
                        "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
                    );
                    js.publish_with_headers(SUBJECT, h, Bytes::from(body(i)))
                        .await
                        .unwrap()
                        .await
                        .unwrap();
                }
            })
            .await;
            ("raw async-nats publish + ack", r)
        }
        TestBroker::Redis(server) => {
            let con = server.con().await;
            let r = run_load(n, concurrency, move |i| {
                let mut con = con.clone();
                async move {
                    let mut cmd = redis::cmd("XADD");
                    cmd.arg(STREAM).arg("*");
                    for (k, v) in headers(&format!("raw-{i}")) {
                        cmd.arg(k).arg(v);
                    }
                    cmd.arg("data").arg(body(i));
                    let _: String = cmd.query_async(&mut con).await.unwrap();
                }
            })
            .await;
            let fsync = std::env::var("PUBSUB_REDIS_FSYNC").unwrap_or_else(|_| "always".into());
            let label: &'static str =
                Box::leak(format!("raw redis XADD (AOF fsync {fsync})").into_boxed_str());
            (label, r)
        }
        TestBroker::Rabbitmq(server) => {
            let (conn, ch) = server.channel().await;
            ch.confirm_select(Default::default()).await.unwrap();
            let ch = Arc::new(ch);
            let r = run_load(n, concurrency, move |i| {
                let ch = ch.clone();
                async move {
                    let h = headers(&format!("raw-{i}"));
                    let h: Vec<(&str, &str)> =
                        h.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
                    rabbit_publish(&ch, &h, body(i).as_bytes()).await;
                }
            })
            .await;
            let _ = conn.close(200, "done".into()).await;
            ("raw lapin publish + confirm", r)
        }
        TestBroker::Kafka(server) => {
            let p = weir_testkit::bridge::kafka::producer(server);
            // Connected before the clock starts, as the other raw clients are.
            weir_testkit::bridge::kafka::connect(&p, STREAM).await;
            let r = run_load(n, concurrency, move |i| {
                let p = p.clone();
                async move {
                    let h = headers(&format!("raw-{i}"));
                    let h: Vec<(&str, &str)> =
                        h.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
                    weir_testkit::bridge::kafka::produce(&p, STREAM, &h, body(i).as_bytes()).await;
                }
            })
            .await;
            ("raw rdkafka produce (idempotent, acks=all)", r)
        }
    };
    Row {
        broker: broker.kind().name(),
        path,
        messages: n,
        concurrency,
        elapsed,
        latencies,
    }
}

async fn bench_one(broker: &TestBroker) -> Vec<Row> {
    let n = env_usize("PUBSUB_N", 20_000);
    let concurrency = env_usize("PUBSUB_CONCURRENCY", 64);
    broker.declare().await;
    // The queue must not be the bottleneck of the publish comparison: both paths hit the same one.

    // 1. The raw client: publish with the same headers and wait for each confirmation.
    let raw = raw_publish_load(broker, n, concurrency).await;

    // 2. Through weir-proxy: HTTP POST, schema validation, CloudEvent, publish + confirmation.
    let app_a = App::ok().await;
    let mut messaging = broker.publisher();
    messaging.publishes[0].schema = Some(serde_json::json!({
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "type": "object",
        "required": ["orderId", "amount", "currency", "lines"],
        "properties": {
            "orderId": {"type": "string", "minLength": 1},
            "amount": {"type": "number", "minimum": 0},
            "currency": {"enum": ["EUR", "USD"]},
            "lines": {"type": "array", "minItems": 1, "items": {
                "type": "object", "required": ["sku", "qty"],
                "properties": {"sku": {"type": "string"}, "qty": {"type": "integer", "minimum": 1}}
            }}
        }
    }));
    let mut cfg = base_config("orders", app_a.addr, messaging);
    cfg.inbound.max_body_bytes = 1 << 20;
    let a = sidecar(env!("CARGO_BIN_EXE_weir-proxy"), cfg).await;
    // The load generator writes HTTP/1.1 on kept-alive connections by hand, so that its own cost
    // (which shares the machine's cores with the sidecar) stays close to the raw client's.
    let (elapsed, latencies) = http_load(a.config.admin.listen, n, concurrency).await;
    let side = Row {
        broker: broker.kind().name(),
        path: "weir-proxy POST /v1/publish (schema, CloudEvent, confirmation)",
        messages: n,
        concurrency,
        elapsed,
        latencies,
    };

    // 3. End to end: the sidecar pulls the 2n stored events and POSTs each to a trivial app.
    let total = 2 * n;
    assert_eq!(broker.len(STREAM).await, total as u64);
    let app_b = App::light().await;
    let mut c = consume_config("billing");
    c.max_in_flight = concurrency as u32;
    c.ack_wait_ms = 30_000;
    c.schema = None;
    let start = Instant::now();
    let _b = sidecar(
        env!("CARGO_BIN_EXE_weir-proxy"),
        base_config("billing", app_b.addr, broker.consumer(c)),
    )
    .await;
    assert!(
        eventually(Duration::from_secs(600), || app_b.total() >= total).await,
        "consumed {} of {total}",
        app_b.total()
    );
    let consume = Row {
        broker: broker.kind().name(),
        path: "end to end: queue → weir-proxy → app (ack + dedup record)",
        messages: total,
        concurrency: 64,
        elapsed: start.elapsed(),
        latencies: vec![],
    };

    vec![raw, side, consume]
}
