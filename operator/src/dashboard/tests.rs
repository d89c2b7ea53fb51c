//! The dashboard's HTTP API on a real server and port, over a fake sidecar (its `/metrics`)
//! and a fake saga coordinator: the page, the snapshot and its figures, the event stream,
//! the coordinator's answers passed through, and the actions refused when read-only.

use super::model::{Call, Queue, Saga, Service, Step, System};
use super::{Coordinator, DashboardOptions, Sidecar, Targets};
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use serde_json::{Value, json};
use std::convert::Infallible;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

type Handler = Arc<dyn Fn(&str, &str, &str) -> (u16, String) + Send + Sync>;

/// A loopback HTTP server answering with `f(method, path, body)`; its port.
async fn fake(f: Handler) -> u16 {
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = l.local_addr().unwrap().port();
    tokio::spawn(async move {
        loop {
            let (s, _) = l.accept().await.unwrap();
            let f = f.clone();
            tokio::spawn(async move {
                let svc =
                    hyper::service::service_fn(move |req: http::Request<hyper::body::Incoming>| {
                        let f = f.clone();
                        async move {
                            let method = req.method().to_string();
                            let path = req.uri().path().to_string();
                            let body = req.into_body().collect().await.unwrap().to_bytes();
                            let (st, out) = f(&method, &path, &String::from_utf8_lossy(&body));
                            Ok::<_, Infallible>(
                                http::Response::builder()
                                    .status(st)
                                    .body(Full::new(Bytes::from(out)))
                                    .unwrap(),
                            )
                        }
                    });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(hyper_util::rt::TokioIo::new(s), svc)
                    .await;
            });
        }
    });
    port
}

/// One request on a fresh connection: status and body (the head only for an event stream,
/// with its first event).
async fn call(
    port: u16,
    method: &str,
    path: &str,
    content_type: Option<&str>,
    body: &str,
) -> (u16, String) {
    let mut s = tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .unwrap();
    let ct = content_type
        .map(|c| format!("content-type: {c}\r\n"))
        .unwrap_or_default();
    let req = format!(
        "{method} {path} HTTP/1.1\r\nhost: x\r\n{ct}content-length: {}\r\nconnection: close\r\n\r\n{body}",
        body.len()
    );
    s.write_all(req.as_bytes()).await.unwrap();
    let mut out = Vec::new();
    let mut buf = [0u8; 8192];
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let n = tokio::time::timeout(Duration::from_secs(10), s.read(&mut buf))
            .await
            .expect("an answer")
            .unwrap();
        if n == 0 {
            break;
        }
        out.extend_from_slice(&buf[..n]);
        let text = String::from_utf8_lossy(&out);
        // An event stream does not end: stop at its first event.
        if text.contains("text/event-stream")
            && text
                .split_once("data: ")
                .is_some_and(|(_, r)| r.contains("\n\n"))
        {
            break;
        }
        assert!(Instant::now() < deadline);
    }
    let text = String::from_utf8_lossy(&out).to_string();
    let status = text
        .split(' ')
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    let body = if head
        .to_ascii_lowercase()
        .contains("transfer-encoding: chunked")
    {
        let mut rest = body;
        let mut out = String::new();
        while let Some((size, r)) = rest.split_once("\r\n") {
            let n = usize::from_str_radix(size.trim(), 16).unwrap_or(0);
            if n == 0 || r.len() < n {
                break;
            }
            out.push_str(&r[..n]);
            rest = r[n..].trim_start_matches("\r\n");
        }
        out
    } else {
        body.to_string()
    };
    (status, body)
}

const METRICS_OPEN: &str = r#"# TYPE weir_requests counter
weir_requests_total{direction="inbound",dependency="",status_class="2xx"} 10
weir_requests_total{direction="outbound",dependency="b",status_class="5xx"} 4
weir_circuit_breaker_state{dependency="b"} 1
weir_rejections_total{direction="outbound",dependency="b",reason="circuit-open"} 3
weir_rejections_total{direction="outbound",dependency="b",reason="bulkhead-full"} 2
weir_rejections_total{direction="inbound",dependency="",reason="rate-limited"} 5
# EOF
"#;

fn system() -> System {
    let svc = |name: &str, layer| Service {
        name: name.into(),
        replicas: 1,
        edge: false,
        publishes: vec![],
        consumes: vec![],
        layer,
    };
    System {
        namespace: "default".into(),
        services: vec![svc("a", 0), svc("b", 1)],
        calls: vec![Call {
            from: "a".into(),
            dependency: "b".into(),
            to: "b".into(),
            external: false,
            policy: "1s, breaker 50%".into(),
            has_breaker: true,
            has_bulkhead: true,
        }],
        queues: vec![Queue {
            name: "q".into(),
            event_type: "t".into(),
            publishers: vec!["a".into()],
            consumers: vec!["b".into()],
            triggers: vec![],
            spec: None,
        }],
        sagas: vec![Saga {
            name: "s".into(),
            steps: vec![Step {
                name: "one".into(),
                target: "b".into(),
                compensated: true,
            }],
            trigger_queue: None,
            outcome_queues: vec![],
        }],
        findings: vec![super::model::Finding {
            rule: "W009".into(),
            name: "x".into(),
            severity: "warning".into(),
            objects: vec!["Microservice/b".into()],
            message: "b has a finding".into(),
            hint: "h".into(),
        }],
    }
}

/// The dashboard over one fake sidecar (of `a`; `b`'s does not answer) and one fake
/// coordinator; the bodies the coordinator was sent.
async fn dashboard(actions: bool) -> (u16, Arc<Mutex<Vec<(String, String)>>>) {
    let sidecar = fake(Arc::new(|_, path, _| match path {
        "/metrics" => (200, METRICS_OPEN.to_string()),
        _ => (404, String::new()),
    }))
    .await;
    let sent: Arc<Mutex<Vec<(String, String)>>> = Arc::default();
    let seen = sent.clone();
    let coordinator = fake(Arc::new(move |method, path, body| match (method, path) {
        ("GET", "/v1/sagas/s") => (
            200,
            json!({"instances": [
                {"id": "i1", "status": "Running", "step": 1, "startedAt": "2026-01-01T00:00:01Z"},
                {"id": "i0", "status": "Completed", "step": 1, "startedAt": "2026-01-01T00:00:00Z"},
            ]})
            .to_string(),
        ),
        ("GET", "/v1/sagas/s/i1") => (
            200,
            json!({"id": "i1", "status": "Running", "entries": [{"type": "started"}]}).to_string(),
        ),
        ("POST", "/v1/sagas/s/i1/cancel") => {
            seen.lock()
                .unwrap()
                .push((path.to_string(), body.to_string()));
            (
                202,
                json!({"id": "i1", "status": "Compensating"}).to_string(),
            )
        }
        ("POST", "/v1/sagas/s/i0/cancel") => (
            409,
            json!({"error": "instance i0 has finished (Completed)"}).to_string(),
        ),
        _ => (404, json!({"error": "no route"}).to_string()),
    }))
    .await;
    let targets = Targets {
        sidecars: vec![
            Sidecar {
                replica: "a".into(),
                microservice: "a".into(),
                admin_port: sidecar,
                pod: None,
            },
            Sidecar {
                replica: "b".into(),
                microservice: "b".into(),
                // Nothing listens there.
                admin_port: 1,
                pod: None,
            },
        ],
        coordinators: vec![Coordinator {
            saga: "s".into(),
            url: format!("http://127.0.0.1:{coordinator}"),
            pod: None,
        }],
        broker_url: None,
        ..Default::default()
    };
    let opts = DashboardOptions {
        addr: "127.0.0.1:0".parse().unwrap(),
        actions,
    };
    let addr = super::start(&opts, system(), targets).await.unwrap();
    (addr.port(), sent)
}

async fn snapshot(port: u16) -> Value {
    let start = Instant::now();
    loop {
        let (st, body) = call(port, "GET", "/api/snapshot", None, "").await;
        assert_eq!(st, 200);
        let v: Value = serde_json::from_str(&body).unwrap();
        if v["services"].is_array() {
            return v;
        }
        assert!(start.elapsed() < Duration::from_secs(10), "no snapshot");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test]
async fn the_page_the_snapshot_and_the_event_stream() {
    let (port, _) = dashboard(false).await;
    let (st, html) = call(port, "GET", "/", None, "").await;
    assert_eq!(st, 200);
    assert!(html.contains("<script src=\"/app.js\">"), "{html}");
    let (st, js) = call(port, "GET", "/app.js", None, "").await;
    assert_eq!(st, 200);
    assert!(js.contains("EventSource(\"/api/events\")"));
    assert!(
        !js.contains("http://") && !js.contains("https://"),
        "nothing from elsewhere"
    );
    let (st, _) = call(port, "GET", "/app.css", None, "").await;
    assert_eq!(st, 200);

    let s = snapshot(port).await;
    assert_eq!(s["actions"], json!(false));
    let call_ab = &s["calls"][0];
    assert_eq!(call_ab["breaker"], "open", "{call_ab}");
    assert_eq!(call_ab["circuitOpenRejections"], json!(3.0));
    assert_eq!(call_ab["bulkheadRejections"], json!(2.0));
    assert_eq!(call_ab["window"]["total"], json!(4.0), "{s}");
    let a = &s["services"][0];
    assert_eq!(
        (a["name"].as_str(), a["state"].as_str()),
        (Some("a"), Some("up"))
    );
    assert_eq!(a["rateLimited"], json!(5.0));
    let b = &s["services"][1];
    assert_eq!(b["state"], "down", "its sidecar does not answer: {b}");
    assert_eq!(b["findings"][0]["rule"], "W009");
    assert_eq!(s["queues"][0]["error"], "this run has no broker");
    let saga = &s["sagas"][0];
    assert_eq!(saga["byStatus"], json!({"Completed": 1, "Running": 1}));
    assert_eq!(saga["instances"][0]["id"], "i1", "newest first");

    let (st, ev) = call(port, "GET", "/api/events", None, "").await;
    assert_eq!(st, 200);
    let data = ev
        .lines()
        .find_map(|l| l.strip_prefix("data: "))
        .expect("an event");
    let v: Value = serde_json::from_str(data).unwrap();
    assert_eq!(v["calls"][0]["breaker"], "open");

    let (st, t) = call(port, "GET", "/api/sagas/s/i1", None, "").await;
    assert_eq!(st, 200);
    assert_eq!(
        serde_json::from_str::<Value>(&t).unwrap()["status"],
        "Running"
    );
    let (st, _) = call(port, "GET", "/api/sagas/nope/i1", None, "").await;
    assert_eq!(st, 404);
    let (st, _) = call(port, "GET", "/api/sagas/s/..", None, "").await;
    assert_eq!(st, 400);
    let (st, _) = call(port, "GET", "/api/queues/nope/dead-letters", None, "").await;
    assert_eq!(st, 404);
    let (st, _) = call(port, "GET", "/api/nothing", None, "").await;
    assert_eq!(st, 404);
}

#[tokio::test]
async fn read_only_refuses_every_action_and_says_why() {
    let (port, sent) = dashboard(false).await;
    for path in [
        "/api/queues/q/replay",
        "/api/sagas/s/i1/cancel",
        "/api/sagas/s/i1/retry",
    ] {
        let (st, body) = call(port, "POST", path, Some("application/json"), "{}").await;
        assert_eq!(st, 403, "{path}: {body}");
        assert!(body.contains("--dashboard-actions"), "{body}");
    }
    assert!(
        sent.lock().unwrap().is_empty(),
        "nothing reached the coordinator"
    );
}

#[tokio::test]
async fn actions_go_to_the_coordinator_and_take_json_only() {
    let (port, sent) = dashboard(true).await;
    let (st, body) = call(
        port,
        "POST",
        "/api/sagas/s/i1/cancel",
        Some("application/json"),
        r#"{"reason": "stuck"}"#,
    )
    .await;
    assert_eq!(st, 202, "{body}");
    assert_eq!(
        serde_json::from_str::<Value>(&body).unwrap()["status"],
        "Compensating"
    );
    let got = sent.lock().unwrap().clone();
    assert_eq!(got.len(), 1);
    let sent_body: Value = serde_json::from_str(&got[0].1).unwrap();
    assert_eq!(
        sent_body,
        json!({"by": "weir-dashboard", "reason": "stuck"})
    );
    // A finished instance: the coordinator's 409 and its words come back.
    let (st, body) = call(
        port,
        "POST",
        "/api/sagas/s/i0/cancel",
        Some("application/json"),
        "{}",
    )
    .await;
    assert_eq!(st, 409);
    assert!(body.contains("has finished"), "{body}");
    // A form post (what another site could make a browser send) is refused.
    let (st, _) = call(
        port,
        "POST",
        "/api/sagas/s/i1/cancel",
        Some("application/x-www-form-urlencoded"),
        "reason=x",
    )
    .await;
    assert_eq!(st, 415);
    assert_eq!(sent.lock().unwrap().len(), 1);
    // Replay needs a broker, and says which dead letters.
    let (st, body) = call(
        port,
        "POST",
        "/api/queues/q/replay",
        Some("application/json"),
        "{}",
    )
    .await;
    assert_eq!(st, 503, "{body}");
    let (st, _) = call(
        port,
        "POST",
        "/api/queues/nope/replay",
        Some("application/json"),
        "{}",
    )
    .await;
    assert_eq!(st, 404);
}

/// The shop's objects as the API server lists them, in namespace `shop`, by plural.
fn shop_lists(broker_url: Option<&str>) -> std::collections::HashMap<&'static str, Value> {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/shop");
    let files = crate::manifest::expand_paths(&[dir]).unwrap();
    let loaded = crate::manifest::load(&files, &crate::manifest::Schemas::new())
        .unwrap()
        .0;
    let mut lists: std::collections::HashMap<&'static str, Vec<Value>> = Default::default();
    for l in loaded {
        use crate::manifest::Object;
        let (plural, mut v) = match l.object {
            Object::Microservice(m) => ("microservices", serde_json::to_value(m).unwrap()),
            Object::Queue(mut q) => {
                if q.metadata.name.as_deref() == Some("orders") {
                    q.status = Some(weir_crds::queue::QueueStatus {
                        messages: Some(7),
                        pending: [("payments".to_string(), 2)].into(),
                        dead_letters: Some(3),
                        ..Default::default()
                    });
                }
                ("queues", serde_json::to_value(q).unwrap())
            }
            Object::Saga(s) => ("sagas", serde_json::to_value(s).unwrap()),
            Object::Broker(mut b) => {
                // A Broker at this URL instead of the managed one.
                if let Some(url) = broker_url {
                    b.spec.managed = None;
                    b.spec.url = Some(url.to_string());
                }
                ("brokers", serde_json::to_value(b).unwrap())
            }
        };
        v["metadata"]["namespace"] = json!("shop");
        lists.entry(plural).or_default().push(v);
    }
    let pod = |name: &str, labels: Value| {
        json!({"metadata": {"name": name, "namespace": "shop", "labels": labels},
               "status": {"phase": "Running", "conditions": [{"type": "Ready", "status": "True"}]}})
    };
    lists.insert(
        "pods",
        vec![
            pod(
                "orders-1",
                json!({"app.kubernetes.io/managed-by": "weir", "weir.dev/microservice": "orders"}),
            ),
            pod(
                "users-1",
                json!({"app.kubernetes.io/managed-by": "weir", "weir.dev/microservice": "users"}),
            ),
            pod(
                "place-order-saga-1",
                json!({"app.kubernetes.io/managed-by": "weir", "weir.dev/microservice": "place-order-saga", "weir.dev/saga": "place-order"}),
            ),
        ],
    );
    lists
        .into_iter()
        .map(|(k, items)| {
            (
                k,
                json!({"apiVersion": "v1", "kind": "List", "metadata": {"resourceVersion": "1"}, "items": items}),
            )
        })
        .collect()
}

const ORDERS_METRICS: &str = r#"weir_requests_total{direction="inbound",dependency="",status_class="2xx"} 42
weir_requests_total{direction="outbound",dependency="users",status_class="2xx"} 40
weir_circuit_breaker_state{dependency="users"} 0
"#;

/// A fake API server: the shop's lists, its pods' metrics and the coordinator through the pod
/// proxy. The requests it saw, by path.
async fn fake_api_server() -> (u16, Arc<Mutex<Vec<String>>>) {
    fake_api_server_with(None).await
}

/// [`fake_api_server`] whose Broker is at `broker_url`; it also answers a Queue's and a
/// Broker's GET by name.
async fn fake_api_server_with(broker_url: Option<&str>) -> (u16, Arc<Mutex<Vec<String>>>) {
    let lists = shop_lists(broker_url);
    let seen: Arc<Mutex<Vec<String>>> = Arc::default();
    let log = seen.clone();
    let port = fake(Arc::new(move |method, path, _| {
        log.lock().unwrap().push(format!("{method} {path}"));
        let plural = path.rsplit('/').next().unwrap_or_default();
        match path {
            "/api/v1/namespaces/shop/pods/orders-1:15090/proxy/metrics" => {
                (200, ORDERS_METRICS.to_string())
            }
            // users' sidecar does not answer: it counts as down.
            "/api/v1/namespaces/shop/pods/users-1:15090/proxy/metrics" => {
                (503, "error trying to reach service".to_string())
            }
            "/api/v1/namespaces/shop/pods/place-order-saga-1:8080/proxy/v1/sagas/place-order" => (
                200,
                json!({"instances": [{"id": "i1", "status": "Running", "startedAt": "2026-01-01T00:00:00Z"}]})
                    .to_string(),
            ),
            "/api/v1/namespaces/shop/pods/place-order-saga-1:8080/proxy/v1/sagas/place-order/i1/cancel"
                if method == "POST" =>
            {
                (202, json!({"id": "i1", "status": "Cancelling"}).to_string())
            }
            "/api/v1/namespaces/shop/pods/place-order-saga-1:8080/proxy/v1/sagas/place-order/i1" => {
                (200, json!({"id": "i1", "status": "Running", "entries": []}).to_string())
            }
            _ if path.starts_with("/apis/weir.dev/v1alpha1/namespaces/shop/") => {
                // One object by name: /apis/weir.dev/v1alpha1/namespaces/shop/<plural>/<name>.
                let mut parts = path.rsplit('/');
                let (name, plural) = (parts.next().unwrap(), parts.next().unwrap());
                let found = lists.get(plural).and_then(|l| {
                    l["items"]
                        .as_array()?
                        .iter()
                        .find(|o| o["metadata"]["name"] == name)
                        .cloned()
                });
                match found {
                    Some(o) => (200, o.to_string()),
                    None => (404, json!({"kind": "Status", "code": 404}).to_string()),
                }
            }
            _ if path == "/api/v1/pods" || path.starts_with("/apis/weir.dev/") => match lists.get(plural) {
                Some(l) => (200, l.to_string()),
                None => (404, json!({"kind": "Status", "code": 404}).to_string()),
            },
            _ => (404, json!({"kind": "Status", "code": 404}).to_string()),
        }
    }))
    .await;
    (port, seen)
}

async fn cluster_dashboard(api: u16, prometheus: Option<String>, actions: bool) -> u16 {
    let config = kube::Config::new(format!("http://127.0.0.1:{api}").parse().unwrap());
    let client = kube::Client::try_from(config).unwrap();
    let cluster = Arc::new(super::cluster::Cluster::new(
        client,
        super::cluster::ClusterOptions {
            namespace: None,
            prometheus,
            cluster_domain: "cluster.local".into(),
        },
    ));
    let opts = DashboardOptions {
        addr: "127.0.0.1:0".parse().unwrap(),
        actions,
    };
    super::start_cluster(&opts, cluster).await.unwrap().port()
}

/// The snapshot once it has listed the cluster and read `service`'s figures.
async fn cluster_snapshot(port: u16, service: &str) -> Value {
    let start = Instant::now();
    loop {
        let v = snapshot(port).await;
        let ok = v["services"]
            .as_array()
            .unwrap()
            .iter()
            .any(|s| s["name"] == service && s["up"] == 1);
        if ok {
            return v;
        }
        assert!(start.elapsed() < Duration::from_secs(15), "no figures: {v}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test]
async fn in_a_cluster_the_page_reads_through_the_pod_proxy_and_queue_status() {
    let (api, seen) = fake_api_server().await;
    let port = cluster_dashboard(api, None, false).await;
    let v = cluster_snapshot(port, "orders").await;
    assert_eq!(v["source"], "cluster");
    assert_eq!(v["namespace"], "shop");
    let svc = |n: &str| {
        v["services"]
            .as_array()
            .unwrap()
            .iter()
            .find(|s| s["name"] == n)
            .cloned()
            .unwrap_or_else(|| panic!("no service {n}: {v}"))
    };
    assert_eq!(svc("orders")["inbound"]["total"], 42.0);
    assert_eq!(svc("users")["state"], "down");
    let edge = v["calls"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["from"] == "orders" && c["dependency"] == "users")
        .unwrap();
    assert_eq!(edge["breaker"], "closed");
    assert_eq!(edge["window"]["total"], 40.0);
    let q = v["queues"]
        .as_array()
        .unwrap()
        .iter()
        .find(|q| q["name"] == "orders")
        .unwrap();
    assert_eq!(
        (&q["messages"], &q["lag"], &q["deadLetters"]),
        (&json!(7), &json!({"payments": 2}), &json!(3)),
        "{q}"
    );
    let saga = &v["sagas"][0];
    assert_eq!(saga["name"], "place-order");
    assert_eq!(saga["instances"][0]["id"], "i1", "{saga}");
    let (st, body) = call_path(port, "GET", "/api/sagas/place-order/i1").await;
    assert_eq!(st, 200, "{body}");
    // Read-only: actions refused, naming the chart value; dead letters need actions mode.
    let (st, body) = call(
        port,
        "POST",
        "/api/sagas/place-order/i1/cancel",
        Some("application/json"),
        "{}",
    )
    .await;
    assert_eq!(st, 403);
    assert!(body.contains("dashboard.actions=true"), "{body}");
    let (st, body) = call_path(port, "GET", "/api/queues/orders/dead-letters").await;
    assert_eq!(st, 403);
    assert!(body.contains("actions mode"), "{body}");
    let (st, _) = call_path(port, "GET", "/healthz").await;
    assert_eq!(st, 200);
    let seen = seen.lock().unwrap();
    assert!(
        !seen.iter().any(|p| p.starts_with("POST")),
        "nothing acted: {seen:?}"
    );
}

async fn call_path(port: u16, method: &str, path: &str) -> (u16, String) {
    call(port, method, path, None, "").await
}

#[tokio::test]
async fn in_a_cluster_with_prometheus_the_series_come_from_an_instant_query() {
    let (api, seen) = fake_api_server().await;
    let prom = fake(Arc::new(|_, path, _| match path {
        "/api/v1/query" => (
            200,
            json!({"status": "success", "data": {"resultType": "vector", "result": [
                {"metric": {"__name__": "weir_requests_total", "namespace": "shop", "pod": "users-1",
                            "direction": "inbound", "dependency": "", "status_class": "2xx"},
                 "value": [1700000000.0, "17"]},
                {"metric": {"__name__": "weir_requests_total", "namespace": "other", "pod": "users-1",
                            "direction": "inbound", "dependency": "", "status_class": "2xx"},
                 "value": [1700000000.0, "1000"]}
            ]}})
            .to_string(),
        ),
        _ => (404, String::new()),
    }))
    .await;
    let port = cluster_dashboard(api, Some(format!("http://127.0.0.1:{prom}")), false).await;
    let v = cluster_snapshot(port, "users").await;
    let users = v["services"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["name"] == "users")
        .unwrap();
    assert_eq!(users["inbound"]["total"], 17.0, "{users}");
    let orders = v["services"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["name"] == "orders")
        .unwrap();
    assert_eq!(
        orders["state"], "down",
        "no series from Prometheus: {orders}"
    );
    assert!(
        !seen.lock().unwrap().iter().any(|p| p.ends_with("/metrics")),
        "no pod scraped"
    );
}

#[tokio::test]
async fn in_a_cluster_with_actions_a_cancel_goes_through_the_pod_proxy() {
    let (api, seen) = fake_api_server().await;
    let port = cluster_dashboard(api, None, true).await;
    let v = cluster_snapshot(port, "orders").await;
    assert_eq!(v["actions"], true);
    let (st, body) = call(
        port,
        "POST",
        "/api/sagas/place-order/i1/cancel",
        Some("application/json"),
        r#"{"reason": "test"}"#,
    )
    .await;
    assert_eq!(st, 202, "{body}");
    assert!(body.contains("Cancelling"), "{body}");
    assert!(
        seen.lock().unwrap().iter().any(|p| p
            == "POST /api/v1/namespaces/shop/pods/place-order-saga-1:8080/proxy/v1/sagas/place-order/i1/cancel"),
        "the cancel went through the pod proxy"
    );
    // Dead letters with actions: the Queue and its Broker read from the API server, the
    // managed Broker dialled at its Service (not resolvable here: the answer says so).
    let (st, body) = call_path(port, "GET", "/api/queues/orders/dead-letters").await;
    assert_eq!(st, 503, "{body}");
    assert!(body.contains("bus.shop.svc.cluster.local"), "{body}");
}

#[tokio::test]
async fn in_a_cluster_with_actions_dead_letters_come_from_the_queues_broker() {
    let nats = weir_testkit::NatsServer::start();
    let url = nats.url();
    // The Queue's stream, as the operator declares it.
    let lists = shop_lists(Some(&url));
    let q = lists["queues"]["items"]
        .as_array()
        .unwrap()
        .iter()
        .find(|q| q["metadata"]["name"] == "orders")
        .unwrap()
        .clone();
    let spec: weir_crds::queue::QueueSpec = serde_json::from_value(q["spec"].clone()).unwrap();
    let t = weir_broker::topology::Topology::new("shop", "orders", &spec).unwrap();
    let admin = weir_broker::admin::connect(
        weir_crds::broker::BrokerKind::Nats,
        &url,
        &Default::default(),
    )
    .await
    .unwrap();
    {
        use weir_broker::admin::Admin;
        admin.declare_queue(&t).await.unwrap();
    }
    let (api, _) = fake_api_server_with(Some(&url)).await;
    let port = cluster_dashboard(api, None, true).await;
    cluster_snapshot(port, "orders").await;
    let (st, body) = call_path(port, "GET", "/api/queues/orders/dead-letters").await;
    assert_eq!(st, 200, "{body}");
    let v: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(v["deadLetters"], json!([]), "{v}");
    // Read-only, the same request is refused before any Secret or broker is touched.
    let ro = cluster_dashboard(api, None, false).await;
    cluster_snapshot(ro, "orders").await;
    let (st, body) = call_path(ro, "GET", "/api/queues/orders/dead-letters").await;
    assert_eq!(st, 403, "{body}");
}

#[test]
fn hosts_that_reach_the_dashboard_directly_are_allowed_others_refused() {
    use super::server::host_allowed;
    for ok in [
        None,
        Some("127.0.0.1:9900"),
        Some("10.1.2.3"),
        Some("[::1]:9900"),
        Some("localhost:9900"),
        Some("LOCALHOST"),
        Some("weir-dashboard"),
        Some("weir-dashboard.weir-system.svc:80"),
        Some("weir-dashboard.weir-system.svc.cluster.local."),
    ] {
        assert!(host_allowed(ok), "{ok:?} refused");
    }
    for bad in [
        Some("evil.example.com"),
        Some("evil.example.com:9900"),
        Some("127.0.0.1.nip.io:9900"),
        Some("[not-an-ip]:80"),
        Some(""),
        Some("svc.evil.example"),
    ] {
        assert!(!host_allowed(bad), "{bad:?} allowed");
    }
}

/// A page of another site, its name rebound to 127.0.0.1, reads nothing and does nothing.
#[tokio::test]
async fn a_request_for_another_sites_name_is_refused() {
    let (port, sent) = dashboard(true).await;
    for (method, path, body) in [
        ("GET", "/api/snapshot", ""),
        ("POST", "/api/sagas/s/i1/cancel", "{}"),
    ] {
        let mut s = tokio::net::TcpStream::connect(("127.0.0.1", port))
            .await
            .unwrap();
        let req = format!(
            "{method} {path} HTTP/1.1\r\nhost: rebound.example.com:{port}\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
            body.len()
        );
        s.write_all(req.as_bytes()).await.unwrap();
        let mut out = String::new();
        tokio::time::timeout(Duration::from_secs(10), s.read_to_string(&mut out))
            .await
            .expect("an answer")
            .unwrap();
        assert!(out.starts_with("HTTP/1.1 403"), "{path}: {out}");
        assert!(out.contains("DNS rebinding"), "{out}");
    }
    assert!(
        sent.lock().unwrap().is_empty(),
        "nothing reached the coordinator"
    );
    // The same requests by address are served.
    let (st, _) = call(port, "GET", "/api/snapshot", None, "").await;
    assert_eq!(st, 200);
}
