//! A real gRPC peer for the proxy's tests: `weir.test.Echo`, served by tonic on a free loopback
//! port, and its tonic client. Each [`Ask`] says how to answer (fail with a code, wait, how many
//! messages), so one server plays every upstream a policy test needs.
//!
//! - `Say` (unary): `"<text>"`, or the status `fail_code` after `delay_ms`. The `grpc-timeout`
//!   the server received is recorded ([`EchoServer::timeouts`]).
//! - `Count` (server streaming): `count` messages `"<text>#i"`, `delay_ms` apart, then OK (or
//!   `fail_code` in the trailers, after the messages).
//! - `Sum` (client streaming): the texts received, joined with `+`; or, once the stream has
//!   ended, the status `fail_code` of the first message that has one.
//! - `Chat` (bidi): `"echo <text>"` for each message, as it arrives.
//!
//! The server also serves the gRPC health protocol (tonic-health): `""` and `weir.test.Echo`
//! are `SERVING` until a test says otherwise ([`EchoServer::set_serving`]).

#![allow(missing_docs, reason = "generated stubs")]

use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tonic::{Request, Response, Status, Streaming};

include!(concat!(env!("OUT_DIR"), "/weir.test.Echo.rs"));

pub use echo_client::EchoClient;

/// What the client asks.
#[derive(Clone, PartialEq, prost::Message)]
pub struct Ask {
    #[prost(string, tag = "1")]
    pub text: String,
    /// A gRPC status code to answer with instead of OK (0: none).
    #[prost(uint32, tag = "2")]
    pub fail_code: u32,
    /// Wait this long before answering (and between streamed messages).
    #[prost(uint64, tag = "3")]
    pub delay_ms: u64,
    /// Messages `Count` streams back.
    #[prost(uint32, tag = "4")]
    pub count: u32,
}

impl Ask {
    pub fn text(t: &str) -> Ask {
        Ask {
            text: t.into(),
            ..Ask::default()
        }
    }
}

/// What the server answers.
#[derive(Clone, PartialEq, prost::Message)]
pub struct Answer {
    #[prost(string, tag = "1")]
    pub text: String,
}

type AnswerStream = Pin<Box<dyn futures::Stream<Item = Result<Answer, Status>> + Send>>;

#[derive(Clone, Default)]
struct Echo {
    calls: Arc<AtomicUsize>,
    timeouts: Arc<Mutex<Vec<Option<String>>>>,
}

fn failed(ask: &Ask) -> Option<Status> {
    (ask.fail_code != 0).then(|| {
        Status::new(
            tonic::Code::from(ask.fail_code as i32),
            format!("asked to fail: {}", ask.text),
        )
    })
}

fn stream_of(rx: mpsc::Receiver<Result<Answer, Status>>) -> AnswerStream {
    Box::pin(futures::stream::unfold(rx, |mut rx| async move {
        rx.recv().await.map(|item| (item, rx))
    }))
}

#[tonic::async_trait]
impl echo_server::Echo for Echo {
    async fn say(&self, req: Request<Ask>) -> Result<Response<Answer>, Status> {
        self.calls.fetch_add(1, Ordering::SeqCst);
        let timeout = req
            .metadata()
            .get("grpc-timeout")
            .and_then(|v| v.to_str().ok())
            .map(str::to_string);
        self.timeouts.lock().unwrap().push(timeout);
        let ask = req.into_inner();
        tokio::time::sleep(Duration::from_millis(ask.delay_ms)).await;
        if let Some(s) = failed(&ask) {
            return Err(s);
        }
        let mut resp = Response::new(Answer { text: ask.text });
        resp.metadata_mut()
            .insert("x-echo", tonic::metadata::MetadataValue::from_static("yes"));
        Ok(resp)
    }

    type CountStream = AnswerStream;

    async fn count(&self, req: Request<Ask>) -> Result<Response<AnswerStream>, Status> {
        self.calls.fetch_add(1, Ordering::SeqCst);
        let ask = req.into_inner();
        let (tx, rx) = mpsc::channel(4);
        tokio::spawn(async move {
            for i in 0..ask.count {
                if i > 0 {
                    tokio::time::sleep(Duration::from_millis(ask.delay_ms)).await;
                }
                let a = Answer {
                    text: format!("{}#{i}", ask.text),
                };
                if tx.send(Ok(a)).await.is_err() {
                    return;
                }
            }
            if let Some(s) = failed(&ask) {
                let _ = tx.send(Err(s)).await;
            }
        });
        Ok(Response::new(stream_of(rx)))
    }

    async fn sum(&self, req: Request<Streaming<Ask>>) -> Result<Response<Answer>, Status> {
        self.calls.fetch_add(1, Ordering::SeqCst);
        let mut stream = req.into_inner();
        let mut texts = Vec::new();
        let mut fail = None;
        while let Some(ask) = stream.message().await? {
            fail = fail.or(failed(&ask));
            texts.push(ask.text);
        }
        if let Some(status) = fail {
            return Err(status);
        }
        Ok(Response::new(Answer {
            text: texts.join("+"),
        }))
    }

    type ChatStream = AnswerStream;

    async fn chat(&self, req: Request<Streaming<Ask>>) -> Result<Response<AnswerStream>, Status> {
        self.calls.fetch_add(1, Ordering::SeqCst);
        let mut stream = req.into_inner();
        let (tx, rx) = mpsc::channel(4);
        tokio::spawn(async move {
            while let Ok(Some(ask)) = stream.message().await {
                let a = Answer {
                    text: format!("echo {}", ask.text),
                };
                if tx.send(Ok(a)).await.is_err() {
                    return;
                }
            }
        });
        Ok(Response::new(stream_of(rx)))
    }
}

/// A running echo server; stopped on drop.
pub struct EchoServer {
    pub addr: SocketAddr,
    echo: Echo,
    health: tonic_health::server::HealthReporter,
    task: JoinHandle<()>,
}

impl EchoServer {
    /// Starts one on a free loopback port.
    pub async fn start() -> EchoServer {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind a loopback port");
        let addr = listener.local_addr().expect("the listener's address");
        let echo = Echo::default();
        let (health, health_svc) = tonic_health::server::health_reporter();
        health.set_serving::<echo_server::EchoServer<Echo>>().await;
        let echo_svc = echo_server::EchoServer::new(echo.clone());
        // The generated services are tower services: picked by path and served here by
        // hyper's HTTP/2 server, as tonic's own transport would.
        let task = tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    continue;
                };
                let (echo_svc, health_svc) = (echo_svc.clone(), health_svc.clone());
                let svc =
                    hyper::service::service_fn(move |req: http::Request<hyper::body::Incoming>| {
                        use tonic::codegen::Service;
                        let (mut echo_svc, mut health_svc) = (echo_svc.clone(), health_svc.clone());
                        async move {
                            if req.uri().path().starts_with("/grpc.health.v1.Health/") {
                                health_svc.call(req).await
                            } else {
                                echo_svc.call(req).await
                            }
                        }
                    });
                tokio::spawn(async move {
                    let _ = hyper::server::conn::http2::Builder::new(
                        hyper_util::rt::TokioExecutor::new(),
                    )
                    .serve_connection(hyper_util::rt::TokioIo::new(stream), svc)
                    .await;
                });
            }
        });
        EchoServer {
            addr,
            echo,
            health,
            task,
        }
    }

    /// Sets what the health service says of `service` (`""`: the whole server).
    pub async fn set_serving(&self, service: &str, serving: bool) {
        use tonic_health::ServingStatus;
        let status = if serving {
            ServingStatus::Serving
        } else {
            ServingStatus::NotServing
        };
        self.health.set_service_status(service, status).await;
    }

    /// Calls received, of every method.
    pub fn calls(&self) -> usize {
        self.echo.calls.load(Ordering::SeqCst)
    }

    /// The `grpc-timeout` of each `Say` received, in order.
    pub fn timeouts(&self) -> Vec<Option<String>> {
        self.echo.timeouts.lock().unwrap().clone()
    }
}

impl Drop for EchoServer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// A tonic client of the echo service at `addr` (`host:port`), over HTTP/2 as every gRPC
/// client speaks; connects on first use.
pub fn client(addr: SocketAddr) -> EchoClient<tonic::transport::Channel> {
    let channel = tonic::transport::Endpoint::from_shared(format!("http://{addr}"))
        .expect("an endpoint URL")
        .connect_timeout(Duration::from_secs(5))
        .connect_lazy();
    EchoClient::new(channel)
}

/// `ask` as the body of a unary gRPC request (one uncompressed length-prefixed message), for
/// tests that speak gRPC with a plain HTTP/2 client (one that, unlike tonic, does not enforce
/// `grpc-timeout` itself).
pub fn framed(ask: &Ask) -> bytes::Bytes {
    use prost::Message;
    let msg = ask.encode_to_vec();
    let mut out = Vec::with_capacity(5 + msg.len());
    out.push(0);
    out.extend_from_slice(&(msg.len() as u32).to_be_bytes());
    out.extend_from_slice(&msg);
    out.into()
}
