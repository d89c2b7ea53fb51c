//! HTTP/2 through the real `weir-proxy` binary: both versions on every listener, HTTP/2 between
//! sidecars and to HTTP/2 apps and upstreams, trailers intact, streams in both directions
//! without buffering. The peers are real hyper servers and clients on loopback; the HTTP/2 apps
//! refuse HTTP/1.1 outright, as gRPC servers do, so an answer proves the hop spoke HTTP/2.

mod common;

use bytes::Bytes;
use common::*;
use futures::StreamExt;
use http::{HeaderMap, HeaderValue, Request, Response, Version};
use http_body_util::{BodyExt, Full, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::time::Duration;
use tokio::sync::mpsc;
use weir_crds::proxy::{ProxyConfig, WireProtocol};
use weir_testkit::serve_h2;

type Chan = StreamBody<futures::stream::BoxStream<'static, Result<Frame<Bytes>, Infallible>>>;

/// A body fed frame by frame from a channel.
fn channel_body() -> (mpsc::Sender<Frame<Bytes>>, Chan) {
    let (tx, rx) = mpsc::channel::<Frame<Bytes>>(16);
    let stream =
        futures::stream::unfold(
            rx,
            |mut rx| async move { rx.recv().await.map(|f| (Ok(f), rx)) },
        )
        .boxed();
    (tx, StreamBody::new(stream))
}

fn h2_client<B>() -> Client<HttpConnector, B>
where
    B: hyper::body::Body + Send + Unpin + 'static,
    B::Data: Send,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    Client::builder(TokioExecutor::new())
        .http2_only(true)
        .build_http()
}

/// What an answer carried: status, headers, body and trailers.
struct Full2 {
    status: u16,
    version: Version,
    headers: HeaderMap,
    body: String,
    trailers: Option<HeaderMap>,
}

async fn read_all(resp: Response<Incoming>) -> Full2 {
    let status = resp.status().as_u16();
    let version = resp.version();
    let headers = resp.headers().clone();
    let collected = resp.into_body().collect().await.expect("the whole body");
    let trailers = collected.trailers().cloned();
    Full2 {
        status,
        version,
        headers,
        body: String::from_utf8_lossy(&collected.to_bytes()).into_owned(),
        trailers,
    }
}

async fn h2_get(url: String) -> Full2 {
    let c = h2_client::<Full<Bytes>>();
    let resp = c
        .request(Request::get(url).body(Full::default()).unwrap())
        .await
        .expect("an HTTP/2 answer");
    read_all(resp).await
}

/// An HTTP/2-only app answering `version <v>, host <authority or Host>` with a data frame, then
/// `grpc-status: 0` and a custom trailer.
async fn h2_app() -> (SocketAddr, tokio::task::JoinHandle<()>) {
    serve_h2(|req: Request<Incoming>| async move {
        let host = req
            .uri()
            .authority()
            .map(|a| a.to_string())
            .or_else(|| {
                req.headers()
                    .get("host")
                    .map(|h| h.to_str().unwrap().to_string())
            })
            .unwrap_or_default();
        let te = req
            .headers()
            .get("te")
            .map(|v| v.to_str().unwrap().to_string())
            .unwrap_or_default();
        let (tx, body) = channel_body();
        tokio::spawn(async move {
            let text = format!("version {:?}, host {host}, te {te}", req.version());
            let _ = tx.send(Frame::data(Bytes::from(text))).await;
            let mut t = HeaderMap::new();
            t.insert("grpc-status", HeaderValue::from_static("0"));
            t.insert("x-checksum", HeaderValue::from_static("c0ffee"));
            let _ = tx.send(Frame::trailers(t)).await;
        });
        Response::builder()
            .header("content-type", "application/grpc")
            .body(body)
            .unwrap()
    })
    .await
}

fn metric_line(text: &str, prefix: &str) -> f64 {
    text.lines()
        .find(|l| l.starts_with(prefix))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0.0)
}

async fn metrics(cfg: &ProxyConfig) -> String {
    get(&client(), format!("http://{}/metrics", cfg.admin.listen))
        .await
        .body
}

#[tokio::test]
async fn every_listener_speaks_http1_and_http2_on_the_same_port() {
    let app = upstream(|req, _| async move {
        let host = req
            .headers()
            .get("host")
            .unwrap()
            .to_str()
            .unwrap()
            .to_string();
        respond(
            200,
            Box::leak(format!("app saw {:?} host {host}", req.version()).into_boxed_str()),
        )
    })
    .await;
    let dep = upstream(|_, _| async { respond(200, "dependency") }).await;
    let mut cfg = base_config(app.addr);
    cfg.outbound = vec![dependency("users", dep.url())];
    let _p = proxy(cfg.clone()).await;

    let inbound = format!("http://{}/x", cfg.inbound.listen);
    let one = get(&client(), inbound.clone()).await;
    assert_eq!(one.status, 200);
    assert_eq!(
        one.body,
        format!("app saw HTTP/1.1 host {}", cfg.inbound.listen)
    );
    let two = h2_get(inbound).await;
    assert_eq!((two.status, two.version), (200, Version::HTTP_2));
    // The HTTP/1.1 app reads the authority the HTTP/2 caller named, as Host.
    assert_eq!(
        two.body,
        format!("app saw HTTP/1.1 host {}", cfg.inbound.listen)
    );

    let out = h2_get(format!("http://{}/y", cfg.outbound[0].listen)).await;
    assert_eq!((out.status, out.body.as_str()), (200, "dependency"));
    let ready = h2_get(format!("http://{}/readyz", cfg.admin.listen)).await;
    assert_eq!(ready.status, 200);

    let m = metrics(&cfg).await;
    assert_eq!(
        metric_line(
            &m,
            r#"weir_connections_total{listener="inbound",version="http2"}"#
        ),
        1.0,
        "{m}"
    );
    assert_eq!(
        metric_line(
            &m,
            r#"weir_connections_total{listener="inbound",version="http1"}"#
        ),
        1.0
    );
    assert_eq!(
        metric_line(
            &m,
            r#"weir_connections_total{listener="users",version="http2"}"#
        ),
        1.0
    );
}

#[tokio::test]
async fn an_http2_upstream_is_called_in_http2_and_its_trailers_reach_the_caller() {
    let (up, _task) = h2_app().await;
    let mut cfg = base_config(free_addr());
    let mut dep = dependency("grpc-upstream", format!("http://{up}"));
    dep.protocol = WireProtocol::Http2;
    cfg.outbound = vec![dep];
    let _p = proxy(cfg.clone()).await;

    // The app's client speaks HTTP/2 and says it reads trailers, as gRPC clients do.
    let c = h2_client::<Full<Bytes>>();
    let req = Request::post(format!("http://{}/pkg.Svc/Call", cfg.outbound[0].listen))
        .header("content-type", "application/grpc")
        .header("te", "trailers")
        .body(Full::new(Bytes::from_static(b"\0\0\0\0\0")))
        .unwrap();
    let a = read_all(c.request(req).await.unwrap()).await;
    assert_eq!(a.status, 200);
    assert_eq!(a.headers["content-type"], "application/grpc");
    // The upstream saw HTTP/2 with its own authority and `te: trailers`.
    assert_eq!(a.body, format!("version HTTP/2.0, host {up}, te trailers"));
    let t = a.trailers.expect("trailers arrive");
    assert_eq!(t["grpc-status"], "0");
    assert_eq!(t["x-checksum"], "c0ffee");

    // An HTTP/1.1 caller is answered too (HTTP/1.1 carries no trailers without chunking; the
    // body arrives whole).
    let one = get(
        &client(),
        format!("http://{}/pkg.Svc/Call", cfg.outbound[0].listen),
    )
    .await;
    assert_eq!(one.status, 200);
    assert!(one.body.starts_with("version HTTP/2.0"), "{}", one.body);
}

#[tokio::test]
async fn an_http2_app_behind_two_sidecars_gets_http2_and_trailers_come_back() {
    // B: an HTTP/2 app behind its sidecar. A: the caller's sidecar, with B as a dependency
    // spoken to in HTTP/2 (as the operator renders every Microservice dependency).
    let (app_b, _task) = h2_app().await;
    let mut cfg_b = base_config(app_b);
    cfg_b.service = "users".into();
    cfg_b.inbound.app_protocol = WireProtocol::Http2;
    let _b = proxy(cfg_b.clone()).await;
    let mut cfg_a = base_config(free_addr());
    let mut dep = dependency("users", format!("http://{}", cfg_b.inbound.listen));
    dep.protocol = WireProtocol::Http2;
    cfg_a.outbound = vec![dep];
    let _a = proxy(cfg_a.clone()).await;

    let a = h2_get(format!("http://{}/pkg.Users/Get", cfg_a.outbound[0].listen)).await;
    assert_eq!(a.status, 200);
    assert!(a.body.starts_with("version HTTP/2.0"), "{}", a.body);
    let t = a.trailers.expect("trailers cross both sidecars");
    assert_eq!(
        (&t["grpc-status"], &t["x-checksum"]),
        (
            &"0".parse::<HeaderValue>().unwrap(),
            &"c0ffee".parse::<HeaderValue>().unwrap()
        )
    );

    // The hop between the sidecars was HTTP/2: B's inbound counted an HTTP/2 connection and no
    // HTTP/1.1 one.
    let m = metrics(&cfg_b).await;
    assert_eq!(
        metric_line(
            &m,
            r#"weir_connections_total{listener="inbound",version="http2"}"#
        ),
        1.0,
        "{m}"
    );
    assert_eq!(
        metric_line(
            &m,
            r#"weir_connections_total{listener="inbound",version="http1"}"#
        ),
        0.0
    );

    // B's readiness probe reaches the HTTP/2-only app in HTTP/2.
    let mut cfg_b2 = cfg_b.clone();
    cfg_b2.inbound.listen = free_addr();
    cfg_b2.admin.listen = free_addr();
    cfg_b2.inbound.readiness_path = Some("/ready".into());
    let _b2 = proxy(cfg_b2.clone()).await;
    let probe = get(
        &client(),
        format!("http://{}/app-health/readiness", cfg_b2.admin.listen),
    )
    .await;
    assert_eq!(probe.status, 200, "{}", probe.body);
}

#[tokio::test]
async fn an_http1_app_behind_an_http2_hop_is_served() {
    let app = upstream(|req, _| async move {
        let host = req
            .headers()
            .get("host")
            .unwrap()
            .to_str()
            .unwrap()
            .to_string();
        respond(
            200,
            Box::leak(format!("{:?} {host}", req.version()).into_boxed_str()),
        )
    })
    .await;
    let mut cfg_b = base_config(app.addr);
    cfg_b.service = "users".into();
    let _b = proxy(cfg_b.clone()).await;
    let mut cfg_a = base_config(free_addr());
    let mut dep = dependency("users", format!("http://{}", cfg_b.inbound.listen));
    dep.protocol = WireProtocol::Http2;
    cfg_a.outbound = vec![dep];
    let _a = proxy(cfg_a.clone()).await;

    // An HTTP/1.1 app calling an HTTP/1.1 app, the sidecars between them on HTTP/2.
    for i in 0..20 {
        let r = get(
            &client(),
            format!("http://{}/n/{i}", cfg_a.outbound[0].listen),
        )
        .await;
        assert_eq!(r.status, 200);
        // Host is the dependency's authority, as over HTTP/1.1.
        assert_eq!(r.body, format!("HTTP/1.1 {}", cfg_b.inbound.listen));
    }
    let m = metrics(&cfg_b).await;
    // Twenty calls, one multiplexed connection.
    assert_eq!(
        metric_line(
            &m,
            r#"weir_connections_total{listener="inbound",version="http2"}"#
        ),
        1.0,
        "{m}"
    );
}

#[tokio::test]
async fn streams_flow_both_ways_through_two_sidecars_without_buffering() {
    // An HTTP/2 app that echoes each request frame as soon as it arrives, then trailers.
    let (app_b, _task) = serve_h2(|req: Request<Incoming>| async move {
        let (tx, body) = channel_body();
        tokio::spawn(async move {
            let mut incoming = req.into_body();
            let mut n = 0;
            while let Some(Ok(frame)) = incoming.frame().await {
                // (The end of a stream may come as an empty DATA frame.)
                if let Ok(data) = frame.into_data()
                    && !data.is_empty()
                {
                    n += 1;
                    let echo = format!("echo {}", String::from_utf8_lossy(&data));
                    if tx.send(Frame::data(Bytes::from(echo))).await.is_err() {
                        return;
                    }
                }
            }
            let mut t = HeaderMap::new();
            t.insert("grpc-status", HeaderValue::from_static("0"));
            t.insert("x-frames", HeaderValue::from(n));
            let _ = tx.send(Frame::trailers(t)).await;
        });
        Response::new(body)
    })
    .await;
    let mut cfg_b = base_config(app_b);
    cfg_b.inbound.app_protocol = WireProtocol::Http2;
    let _b = proxy(cfg_b.clone()).await;
    let mut cfg_a = base_config(free_addr());
    let mut dep = dependency("echo", format!("http://{}", cfg_b.inbound.listen));
    dep.protocol = WireProtocol::Http2;
    cfg_a.outbound = vec![dep];
    let _a = proxy(cfg_a.clone()).await;

    let c = h2_client::<Chan>();
    let (tx, body) = channel_body();
    let req = Request::post(format!("http://{}/pkg.Echo/Chat", cfg_a.outbound[0].listen))
        .body(body)
        .unwrap();
    tx.send(Frame::data(Bytes::from_static(b"m0")))
        .await
        .unwrap();
    let resp = tokio::time::timeout(Duration::from_secs(3), c.request(req))
        .await
        .expect("response headers before the request ended")
        .unwrap();
    assert_eq!(resp.status(), 200);
    let mut incoming = resp.into_body();
    // Each message is answered before the next is sent: no hop waits for the whole body.
    for i in 0..5 {
        if i > 0 {
            tx.send(Frame::data(Bytes::from(format!("m{i}"))))
                .await
                .unwrap();
        }
        let frame = tokio::time::timeout(Duration::from_secs(3), incoming.frame())
            .await
            .unwrap_or_else(|_| panic!("echo {i} not streamed back"))
            .unwrap()
            .unwrap();
        assert_eq!(frame.into_data().unwrap(), format!("echo m{i}"));
    }
    drop(tx);
    let mut trailers = None;
    while let Some(f) = incoming.frame().await {
        if let Ok(t) = f.unwrap().into_trailers() {
            trailers = Some(t);
        }
    }
    let t = trailers.expect("trailers after the stream");
    assert_eq!(t["x-frames"], "5");
    assert_eq!(t["grpc-status"], "0");
}
