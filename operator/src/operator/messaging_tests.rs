//! Queue, Broker and Microservice-bridge reconciles: the Kubernetes API is kube's `tower-test`
//! mock (scripted requests, as in `tests.rs`), the broker is a real `nats-server -js`.

use http::{Method, StatusCode};
use kube::runtime::controller::Action;
use serde_json::{Value, json};
use std::sync::Arc;
use std::time::Duration;
use weir_broker::admin::Admin;
use weir_broker::credentials::Credentials;
use weir_broker::nats::admin as nats_admin;
use weir_broker::topology::Topology;
use weir_crds::{Broker, Microservice, Queue};
use weir_testkit::NatsServer;

use super::mock_api::{context, echo, expect, not_found, serve};

const NS: &str = "/namespaces/demo";
fn api(kind: &str) -> String {
    format!("/apis/weir.dev/v1alpha1{NS}/{kind}")
}
const EVENTS: &str = "/apis/events.k8s.io/v1/namespaces/demo/events";

fn queue(spec: Value, extra_meta: Value) -> Queue {
    let mut meta = json!({"name": "orders", "namespace": "demo", "uid": "uid-q", "generation": 1, "resourceVersion": "5"});
    for (k, v) in extra_meta.as_object().unwrap() {
        meta[k] = v.clone();
    }
    serde_json::from_value(json!({
        "apiVersion": "weir.dev/v1alpha1", "kind": "Queue", "metadata": meta, "spec": spec,
    }))
    .unwrap()
}

fn broker_obj(url: &str) -> Value {
    json!({"apiVersion": "weir.dev/v1alpha1", "kind": "Broker",
           "metadata": {"name": "nats", "namespace": "demo", "uid": "uid-b", "generation": 1},
           "spec": {"url": url}})
}

fn ms_obj(name: &str, spec: Value) -> Value {
    json!({"apiVersion": "weir.dev/v1alpha1", "kind": "Microservice",
           "metadata": {"name": name, "namespace": "demo", "uid": format!("uid-{name}"), "generation": 2},
           "spec": spec})
}

fn ms_list(items: Vec<Value>) -> Value {
    json!({"apiVersion": "weir.dev/v1alpha1", "kind": "MicroserviceList", "metadata": {"resourceVersion": "9"}, "items": items})
}

fn created(b: &Value) -> (StatusCode, Value) {
    (StatusCode::CREATED, b.clone())
}

/// The apiserver answers a Queue patch with the object.
fn queue_echo(b: &Value) -> (StatusCode, Value) {
    let mut obj = serde_json::to_value(queue(json!({"broker": "nats"}), json!({}))).unwrap();
    if let Some(s) = b.get("status") {
        obj["status"] = s.clone();
    }
    (StatusCode::OK, obj)
}

fn ready(status_patch: &Value) -> &Value {
    status_patch["status"]["conditions"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["type"] == "Ready")
        .unwrap()
}

async fn nats(server: &NatsServer) -> nats_admin::NatsAdmin {
    nats_admin::connect(&server.url(), &Credentials::default())
        .await
        .unwrap()
}

#[tokio::test]
async fn a_queue_is_declared_with_its_consumers_and_reports_the_broker_figures() {
    let server = NatsServer::start();
    let url = server.url();
    let (ctx, handle) = context();
    let script = vec![
        expect(Method::GET, &api("brokers/nats"), move |_| {
            (StatusCode::OK, broker_obj(&url))
        }),
        expect(Method::GET, &api("microservices"), |_| {
            (
                StatusCode::OK,
                ms_list(vec![
                    ms_obj(
                        "billing",
                        json!({"image": "b:1", "consumes": [{"queue": "orders", "path": "/e"}]}),
                    ),
                    ms_obj(
                        "web",
                        json!({"image": "w:1", "publishes": [{"queue": "orders"}]}),
                    ),
                ]),
            )
        }),
        expect(Method::PATCH, &api("queues/orders/status"), queue_echo),
    ];
    let api_server = tokio::spawn(serve(handle, script));
    let q = queue(
        json!({"broker": "nats", "consumer": {"maxDeliveries": 7}}),
        json!({}),
    );
    let action = super::queue::reconcile(Arc::new(q), ctx).await.unwrap();
    assert_eq!(action, Action::requeue(Duration::from_secs(30)));
    let seen = api_server.await.unwrap();
    let status = &seen[2].1;
    assert_eq!(ready(status)["status"], "True", "{status}");
    assert_eq!(status["status"]["messages"], 0);
    assert_eq!(status["status"]["deadLetters"], 0);
    assert_eq!(status["status"]["pending"], json!({"billing": 0}));

    let b = nats(&server).await;
    let info = b
        .consumer_info("weir_demo_orders", "billing")
        .await
        .unwrap();
    assert_eq!(info.config.max_deliver, 7);
    assert!(b.stream_exists("weir_demo_orders_dlq").await.unwrap());
    assert!(
        b.stream_exists("KV_weir_processed_demo_orders")
            .await
            .unwrap()
    );
}

#[tokio::test]
async fn figures_follow_published_messages_and_unwanted_consumers_are_deleted() {
    let server = NatsServer::start();
    let b = nats(&server).await;
    let t = Topology::new(
        "demo",
        "orders",
        &serde_yaml::from_str("broker: nats").unwrap(),
    )
    .unwrap();
    b.declare_queue(&t).await.unwrap();
    b.declare_consumer(&t, "gone").await.unwrap();
    for i in 0..5 {
        b.jetstream()
            .publish("weir.demo.orders", format!("{i}").into())
            .await
            .unwrap()
            .await
            .unwrap();
    }
    for _ in 0..2 {
        b.jetstream()
            .publish("weir.dlq.demo.orders", "x".into())
            .await
            .unwrap()
            .await
            .unwrap();
    }
    let url = server.url();
    let (ctx, handle) = context();
    let script = vec![
        expect(Method::GET, &api("brokers/nats"), move |_| {
            (StatusCode::OK, broker_obj(&url))
        }),
        expect(Method::GET, &api("microservices"), |_| {
            (
                StatusCode::OK,
                ms_list(vec![ms_obj(
                    "billing",
                    json!({"image": "b:1", "consumes": [{"queue": "orders", "path": "/e"}]}),
                )]),
            )
        }),
        expect(Method::PATCH, &api("queues/orders/status"), queue_echo),
    ];
    let api_server = tokio::spawn(serve(handle, script));
    super::queue::reconcile(Arc::new(queue(json!({"broker": "nats"}), json!({}))), ctx)
        .await
        .unwrap();
    let status = &api_server.await.unwrap()[2].1["status"];
    assert_eq!(status["messages"], 5);
    assert_eq!(
        status["pending"],
        json!({"billing": 5}),
        "a new consumer has everything pending"
    );
    assert_eq!(status["deadLetters"], 2);
    assert_eq!(b.managed_consumers(&t).await.unwrap(), ["billing"]);
}

#[tokio::test]
async fn a_refused_spec_is_a_ready_false_condition_with_the_brokers_reason_and_a_backoff() {
    let server = NatsServer::start();
    let b = nats(&server).await;
    let other = Topology::new(
        "demo",
        "all",
        &serde_yaml::from_str("broker: nats\nsubjects: ['orders.>']").unwrap(),
    )
    .unwrap();
    b.declare_queue(&other).await.unwrap();

    let url = server.url();
    let (ctx, handle) = context();
    let script = vec![
        expect(Method::GET, &api("brokers/nats"), move |_| {
            (StatusCode::OK, broker_obj(&url))
        }),
        expect(Method::POST, EVENTS, created),
        expect(Method::PATCH, &api("queues/orders/status"), queue_echo),
    ];
    let api_server = tokio::spawn(serve(handle, script));
    let q = queue(
        json!({"broker": "nats", "subjects": ["orders.created"]}),
        json!({}),
    );
    let action = super::queue::reconcile(Arc::new(q), ctx.clone())
        .await
        .unwrap();
    assert_eq!(
        action,
        Action::requeue(Duration::from_secs(5)),
        "backoff, not an error"
    );
    let seen = api_server.await.unwrap();
    assert_eq!(seen[1].1["reason"], "SubjectsOverlap");
    let r = ready(&seen[2].1);
    assert_eq!(r["status"], "False");
    assert_eq!(r["reason"], "SubjectsOverlap");
    let msg = r["message"].as_str().unwrap();
    assert!(msg.contains("overlap") && msg.contains("10065"), "{msg}");
}

#[tokio::test]
async fn a_missing_broker_is_named_and_rechecked() {
    let (ctx, handle) = context();
    let script = vec![
        expect(Method::GET, &api("brokers/nats"), not_found),
        expect(Method::POST, EVENTS, created),
        expect(Method::PATCH, &api("queues/orders/status"), queue_echo),
    ];
    let api_server = tokio::spawn(serve(handle, script));
    let action =
        super::queue::reconcile(Arc::new(queue(json!({"broker": "nats"}), json!({}))), ctx)
            .await
            .unwrap();
    assert_eq!(action, Action::requeue(Duration::from_secs(30)));
    let r = ready(&api_server.await.unwrap()[2].1).clone();
    assert_eq!(r["reason"], "BrokerNotFound");
    assert!(r["message"].as_str().unwrap().contains("\"nats\""));
}

/// A Queue on a Broker that breaks the CRD's rules (here both url and managed, accepted by a
/// cluster without CEL) is not declared on either: its Ready condition names the Broker's
/// field, and nothing is dialled (a dial of the unreachable URL would be `BrokerUnreachable`).
#[tokio::test]
async fn a_queue_on_a_broker_breaking_the_crd_rules_names_the_field() {
    let (ctx, handle) = context();
    let script = vec![
        expect(Method::GET, &api("brokers/nats"), |_| {
            let mut b = broker_obj("nats://127.0.0.1:1");
            b["spec"]["managed"] = json!({});
            (StatusCode::OK, b)
        }),
        expect(Method::POST, EVENTS, created),
        expect(Method::PATCH, &api("queues/orders/status"), queue_echo),
    ];
    let api_server = tokio::spawn(serve(handle, script));
    super::queue::reconcile(Arc::new(queue(json!({"broker": "nats"}), json!({}))), ctx)
        .await
        .unwrap();
    let r = ready(&api_server.await.unwrap()[2].1).clone();
    assert_eq!(r["reason"], "InvalidSpec", "{r}");
    assert_eq!(
        r["message"],
        "Broker nats: spec: set exactly one of url or managed"
    );
}

#[tokio::test]
async fn an_invalid_schema_names_spec_schema() {
    let (ctx, handle) = context();
    let script = vec![
        expect(Method::POST, EVENTS, created),
        expect(Method::PATCH, &api("queues/orders/status"), queue_echo),
    ];
    let api_server = tokio::spawn(serve(handle, script));
    let q = queue(
        json!({"broker": "nats", "schema": {"inline": {"type": 12}}}),
        json!({}),
    );
    let action = super::queue::reconcile(Arc::new(q), ctx).await.unwrap();
    assert_eq!(action, Action::await_change());
    let r = ready(&api_server.await.unwrap()[1].1).clone();
    assert_eq!(r["reason"], "InvalidSchema");
    assert!(
        r["message"]
            .as_str()
            .unwrap()
            .starts_with("spec.schema.inline:"),
        "{r}"
    );
}

#[tokio::test]
async fn delete_policy_adds_a_finalizer_then_deletes_the_streams() {
    let server = NatsServer::start();
    let b = nats(&server).await;
    let t = Topology::new(
        "demo",
        "orders",
        &serde_yaml::from_str("broker: nats").unwrap(),
    )
    .unwrap();
    b.declare_queue(&t).await.unwrap();

    // Policy Delete on a live Queue: the finalizer is added first.
    let (ctx, handle) = context();
    let api_server = tokio::spawn(serve(
        handle,
        vec![expect(Method::PATCH, &api("queues/orders"), queue_echo)],
    ));
    let q = queue(
        json!({"broker": "nats", "deletionPolicy": "Delete"}),
        json!({}),
    );
    assert_eq!(
        super::queue::reconcile(Arc::new(q), ctx).await.unwrap(),
        Action::await_change()
    );
    let patch = &api_server.await.unwrap()[0].1;
    assert_eq!(
        patch["metadata"]["finalizers"],
        json!(["weir.dev/queue-cleanup"])
    );
    assert_eq!(patch["metadata"]["resourceVersion"], "5");

    // Deleted: the streams go, then the finalizer.
    let url = server.url();
    let (ctx, handle) = context();
    let api_server = tokio::spawn(serve(
        handle,
        vec![
            expect(Method::GET, &api("brokers/nats"), move |_| {
                (StatusCode::OK, broker_obj(&url))
            }),
            expect(Method::PATCH, &api("queues/orders"), queue_echo),
        ],
    ));
    let q = queue(
        json!({"broker": "nats", "deletionPolicy": "Delete"}),
        json!({"finalizers": ["weir.dev/queue-cleanup"], "deletionTimestamp": "2026-01-01T00:00:00Z"}),
    );
    super::queue::reconcile(Arc::new(q), ctx).await.unwrap();
    let patch = &api_server.await.unwrap()[1].1;
    assert_eq!(patch["metadata"]["finalizers"], json!([]));
    for s in [
        "weir_demo_orders",
        "weir_demo_orders_dlq",
        "KV_weir_processed_demo_orders",
    ] {
        assert!(!b.stream_exists(s).await.unwrap(), "{s} deleted");
    }
}

#[tokio::test]
async fn retain_policy_leaves_the_streams() {
    let server = NatsServer::start();
    let b = nats(&server).await;
    let t = Topology::new(
        "demo",
        "orders",
        &serde_yaml::from_str("broker: nats").unwrap(),
    )
    .unwrap();
    b.declare_queue(&t).await.unwrap();
    let (ctx, handle) = context();
    // No finalizer, nothing to do: not a single request.
    let api_server = tokio::spawn(serve(handle, vec![]));
    let q = queue(
        json!({"broker": "nats"}),
        json!({"deletionTimestamp": "2026-01-01T00:00:00Z"}),
    );
    assert_eq!(
        super::queue::reconcile(Arc::new(q), ctx).await.unwrap(),
        Action::await_change()
    );
    api_server.await.unwrap();
    assert!(b.stream_exists("weir_demo_orders").await.unwrap());
    assert!(b.stream_exists("weir_demo_orders_dlq").await.unwrap());
}

fn broker_status_echo(b: &Value) -> (StatusCode, Value) {
    let mut obj = broker_obj("nats://x:1");
    obj["status"] = b["status"].clone();
    (StatusCode::OK, obj)
}

#[tokio::test]
async fn a_broker_reports_connected_with_the_server_version_or_the_error() {
    let server = NatsServer::start();
    let (ctx, handle) = context();
    let api_server = tokio::spawn(serve(
        handle,
        vec![
            expect(Method::POST, EVENTS, created),
            expect(
                Method::PATCH,
                &api("brokers/nats/status"),
                broker_status_echo,
            ),
        ],
    ));
    let b: Broker = serde_json::from_value(broker_obj(&server.url())).unwrap();
    let action = super::broker::reconcile(Arc::new(b), ctx).await.unwrap();
    assert_eq!(action, Action::requeue(Duration::from_secs(60)));
    let seen = api_server.await.unwrap();
    assert_eq!(
        (seen[0].1["type"].as_str(), seen[0].1["reason"].as_str()),
        (Some("Normal"), Some("Connected")),
        "a first connect is an Event"
    );
    let status = &seen[1].1["status"];
    assert_eq!(
        status["serverVersion"],
        nats(&server).await.server_version()
    );
    assert_eq!(status["conditions"][0]["type"], "Connected");
    assert_eq!(status["conditions"][0]["status"], "True");

    // Nothing listens there: Connected=False with the error, requeued with backoff.
    let port = server.port;
    drop(server);
    let (ctx, handle) = context();
    let api_server = tokio::spawn(serve(
        handle,
        vec![
            expect(Method::POST, EVENTS, created),
            expect(
                Method::PATCH,
                &api("brokers/nats/status"),
                broker_status_echo,
            ),
        ],
    ));
    // The Broker carries the status of the connect above: the disconnect is a change, so
    // `kubectl describe broker` shows it as a Warning Event.
    let mut obj = broker_obj(&format!("nats://127.0.0.1:{port}"));
    obj["status"] = status.clone();
    let b: Broker = serde_json::from_value(obj).unwrap();
    let action = super::broker::reconcile(Arc::new(b), ctx).await.unwrap();
    assert_eq!(action, Action::requeue(Duration::from_secs(5)));
    let seen = api_server.await.unwrap();
    assert_eq!(
        (seen[0].1["type"].as_str(), seen[0].1["reason"].as_str()),
        (Some("Warning"), Some("BrokerUnreachable"))
    );
    let c = &seen[1].1["status"]["conditions"][0];
    assert_eq!(c["status"], "False");
    assert_eq!(c["reason"], "BrokerUnreachable");
    assert!(
        c["message"].as_str().unwrap().contains(&port.to_string()),
        "{c}"
    );
}

#[tokio::test]
async fn a_broker_with_a_missing_secret_names_it() {
    let (ctx, handle) = context();
    let api_server = tokio::spawn(serve(
        handle,
        vec![
            expect(
                Method::GET,
                "/api/v1/namespaces/demo/secrets/nats-creds",
                not_found,
            ),
            expect(Method::POST, EVENTS, created),
            expect(
                Method::PATCH,
                &api("brokers/nats/status"),
                broker_status_echo,
            ),
        ],
    ));
    let mut obj = broker_obj("nats://127.0.0.1:4222");
    obj["spec"]["credentialsSecret"] = json!({"name": "nats-creds"});
    let b: Broker = serde_json::from_value(obj).unwrap();
    super::broker::reconcile(Arc::new(b), ctx).await.unwrap();
    let c = &api_server.await.unwrap()[2].1["status"]["conditions"][0];
    assert_eq!(c["reason"], "CredentialsNotFound");
    assert!(c["message"].as_str().unwrap().contains("nats-creds"));
}

fn consumer_ms() -> Microservice {
    serde_json::from_value(ms_obj(
        "billing",
        json!({"image": "b:1", "consumes": [{"queue": "orders", "path": "/events"}]}),
    ))
    .unwrap()
}

#[tokio::test]
async fn a_microservice_consuming_a_missing_queue_is_degraded_naming_it() {
    let (ctx, handle) = context();
    let api_server = tokio::spawn(serve(
        handle,
        vec![
            expect(Method::GET, &api("queues/orders"), not_found),
            expect(Method::POST, EVENTS, created),
            expect(Method::PATCH, &api("microservices/billing/status"), |b| {
                (StatusCode::OK, {
                    let mut o = ms_obj("billing", json!({"image": "b:1"}));
                    o["status"] = b["status"].clone();
                    o
                })
            }),
        ],
    ));
    let action = super::microservice::reconcile(Arc::new(consumer_ms()), ctx)
        .await
        .unwrap();
    assert_eq!(action, Action::requeue(Duration::from_secs(30)));
    let seen = api_server.await.unwrap();
    let degraded = seen[2].1["status"]["conditions"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["type"] == "Degraded")
        .unwrap()
        .clone();
    assert_eq!(degraded["reason"], "QueueNotFound");
    assert!(
        degraded["message"]
            .as_str()
            .unwrap()
            .starts_with("QueueNotFound: orders")
    );
}

#[tokio::test]
async fn a_consuming_microservice_gets_the_bridge_config_and_the_credentials_mount() {
    let (ctx, handle) = context();
    let echo = |b: &Value| (StatusCode::OK, b.clone());
    let api_server = tokio::spawn(serve(
        handle,
        vec![
            expect(Method::GET, &api("queues/orders"), |_| {
                (
                    StatusCode::OK,
                    serde_json::to_value(queue(
                        json!({"broker": "nats", "schema": {"inline": {"type": "object"}}}),
                        json!({}),
                    ))
                    .unwrap(),
                )
            }),
            expect(Method::GET, &api("brokers/nats"), |_| {
                let mut b = broker_obj("nats://nats.infra:4222");
                b["spec"]["credentialsSecret"] = json!({"name": "nats-creds"});
                (StatusCode::OK, b)
            }),
            expect(
                Method::PATCH,
                "/api/v1/namespaces/demo/configmaps/billing-weir-proxy",
                echo,
            ),
            expect(
                Method::PATCH,
                "/api/v1/namespaces/demo/services/billing",
                echo,
            ),
            expect(
                Method::PATCH,
                "/api/v1/namespaces/demo/services/billing-weir-endpoints",
                echo,
            ),
            expect(
                Method::PATCH,
                "/apis/apps/v1/namespaces/demo/deployments/billing",
                echo,
            ),
            expect(Method::PATCH, &api("microservices/billing/status"), |b| {
                let mut o = ms_obj("billing", json!({"image": "b:1"}));
                o["status"] = b["status"].clone();
                (StatusCode::OK, o)
            }),
        ],
    ));
    super::microservice::reconcile(Arc::new(consumer_ms()), ctx)
        .await
        .unwrap();
    let seen = api_server.await.unwrap();
    let cfg: Value =
        serde_json::from_str(seen[2].1["data"]["proxy.json"].as_str().unwrap()).unwrap();
    let m = &cfg["messaging"];
    assert_eq!(m["brokerUrl"], "nats://nats.infra:4222");
    assert_eq!(m["credentialsFile"], "/etc/weir/broker");
    assert_eq!(m["consumes"][0]["stream"], "weir_demo_orders");
    assert_eq!(m["consumes"][0]["consumer"], "billing");
    assert_eq!(m["consumes"][0]["schema"], json!({"type": "object"}));
    let pod = &seen[5].1["spec"]["template"]["spec"];
    assert!(
        pod["volumes"]
            .as_array()
            .unwrap()
            .iter()
            .any(|v| v["secret"]["secretName"] == "nats-creds")
    );
    let mounts = pod["initContainers"][0]["volumeMounts"].as_array().unwrap();
    assert!(mounts.iter().any(|m| m["mountPath"] == "/etc/weir/broker"));
}

#[test]
fn controllers_map_microservices_to_queues_and_back() {
    use kube::runtime::reflector::ObjectRef;
    use kube::runtime::reflector::store::Writer;
    use kube::runtime::watcher::Event as WatchEvent;
    let billing = consumer_ms();
    assert_eq!(
        super::queue::queues_consumed_by(&billing),
        [ObjectRef::<Queue>::new("orders").within("demo")]
    );
    let mut w = Writer::<Microservice>::default();
    for ms in [
        billing,
        serde_json::from_value(ms_obj(
            "web",
            json!({"image": "w:1", "publishes": [{"queue": "orders"}]}),
        ))
        .unwrap(),
        serde_json::from_value(ms_obj("other", json!({"image": "o:1"}))).unwrap(),
    ] {
        w.apply_watcher_event(&WatchEvent::Apply(ms));
    }
    let mut using: Vec<String> = super::queue::microservices_using(
        &w.as_reader(),
        &queue(json!({"broker": "nats"}), json!({})),
    )
    .into_iter()
    .map(|r| r.name)
    .collect();
    using.sort();
    assert_eq!(using, ["billing", "web"]);
}

#[tokio::test]
async fn a_changed_max_deliveries_updates_the_consumer_on_the_next_reconcile() {
    let server = NatsServer::start();
    for max in [5, 2] {
        let url = server.url();
        let (ctx, handle) = context();
        let script = vec![
            expect(Method::GET, &api("brokers/nats"), move |_| {
                (StatusCode::OK, broker_obj(&url))
            }),
            expect(Method::GET, &api("microservices"), |_| {
                (
                    StatusCode::OK,
                    ms_list(vec![serde_json::to_value(consumer_ms()).unwrap()]),
                )
            }),
            expect(Method::PATCH, &api("queues/orders/status"), queue_echo),
        ];
        let api_server = tokio::spawn(serve(handle, script));
        let q = queue(
            json!({"broker": "nats", "consumer": {"maxDeliveries": max, "backoff": ["1s"]}}),
            json!({"generation": max}),
        );
        super::queue::reconcile(Arc::new(q), ctx).await.unwrap();
        api_server.await.unwrap();
        let info = nats(&server)
            .await
            .consumer_info("weir_demo_orders", "billing")
            .await
            .unwrap();
        assert_eq!(info.config.max_deliver, max);
    }
}

#[test]
fn a_broker_maps_to_the_queues_on_it() {
    use kube::runtime::reflector::store::Writer;
    use kube::runtime::watcher::Event as WatchEvent;
    let mut w = Writer::<Queue>::default();
    w.apply_watcher_event(&WatchEvent::Apply(queue(
        json!({"broker": "nats"}),
        json!({}),
    )));
    w.apply_watcher_event(&WatchEvent::Apply(queue(
        json!({"broker": "other"}),
        json!({"name": "audit"}),
    )));
    let b: Broker = serde_json::from_value(broker_obj("nats://x:4222")).unwrap();
    let on: Vec<String> = super::queue::queues_on(&w.as_reader(), &b)
        .into_iter()
        .map(|r| r.name)
        .collect();
    assert_eq!(on, ["orders"]);
}

#[tokio::test]
async fn a_schema_from_a_config_map_key_is_read_and_a_missing_key_is_named() {
    let (ctx, handle) = context();
    let script = vec![
        expect(
            Method::GET,
            "/api/v1/namespaces/demo/configmaps/schemas",
            |_| {
                (
                    StatusCode::OK,
                    json!({"apiVersion": "v1", "kind": "ConfigMap",
                           "metadata": {"name": "schemas", "namespace": "demo"},
                           "data": {"other.json": "{}"}}),
                )
            },
        ),
        expect(Method::POST, EVENTS, created),
        expect(Method::PATCH, &api("queues/orders/status"), queue_echo),
    ];
    let api_server = tokio::spawn(serve(handle, script));
    let q = queue(
        json!({"broker": "nats", "schema": {"configMapRef": {"name": "schemas", "key": "order.json"}}}),
        json!({}),
    );
    let action = super::queue::reconcile(Arc::new(q), ctx).await.unwrap();
    assert_eq!(
        action,
        Action::requeue(Duration::from_secs(30)),
        "the ConfigMap may be fixed"
    );
    let r = ready(&api_server.await.unwrap()[2].1).clone();
    assert_eq!(r["reason"], "InvalidSchema");
    let msg = r["message"].as_str().unwrap();
    assert!(
        msg.starts_with("spec.schema.configMapRef.key:") && msg.contains("order.json"),
        "{msg}"
    );
}

fn broker_of(kind: &str, url: &str) -> Value {
    json!({"apiVersion": "weir.dev/v1alpha1", "kind": "Broker",
           "metadata": {"name": "nats", "namespace": "demo", "uid": "uid-b", "generation": 1},
           "spec": {"kind": kind, "url": url}})
}

fn billing_consumes() -> Value {
    ms_list(vec![ms_obj(
        "billing",
        json!({"image": "b:1", "consumes": [{"queue": "orders", "path": "/e"}]}),
    )])
}

#[tokio::test]
async fn a_queue_on_redis_gets_a_consumer_group_and_reports_the_figures() {
    let server = weir_testkit::RedisServer::start();
    let url = server.url();
    let (ctx, handle) = context();
    let script = vec![
        expect(Method::GET, &api("brokers/nats"), move |_| {
            (StatusCode::OK, broker_of("redis", &url))
        }),
        expect(Method::GET, &api("microservices"), |_| {
            (StatusCode::OK, billing_consumes())
        }),
        expect(Method::POST, EVENTS, created),
        expect(Method::PATCH, &api("queues/orders/status"), queue_echo),
    ];
    let api_server = tokio::spawn(serve(handle, script));
    // maxBytes is JetStream's and RabbitMQ's: on Redis it is named, not ignored in silence.
    let q = queue(json!({"broker": "nats", "maxBytes": 1048576}), json!({}));
    let action = super::queue::reconcile(Arc::new(q), ctx).await.unwrap();
    assert_eq!(action, Action::requeue(Duration::from_secs(30)));
    let seen = api_server.await.unwrap();
    assert_eq!(seen[2].1["reason"], "SettingsNotApplied", "{}", seen[2].1);
    assert!(
        seen[2].1["note"]
            .as_str()
            .unwrap()
            .contains("spec.maxBytes"),
        "{}",
        seen[2].1
    );
    let status = &seen[3].1;
    assert_eq!(ready(status)["status"], "True", "{status}");
    let settings = status["status"]["conditions"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["type"] == "SettingsApplied")
        .unwrap();
    assert_eq!(settings["status"], "False", "{status}");
    assert_eq!(settings["reason"], "NotAppliedByBroker");
    assert!(
        settings["message"]
            .as_str()
            .unwrap()
            .starts_with("Broker nats does not apply: spec.maxBytes (a Redis stream"),
        "{settings}"
    );
    assert_eq!(status["status"]["messages"], 0);
    assert_eq!(status["status"]["pending"]["billing"], 0);
    assert_eq!(status["status"]["deadLetters"], 0);
    let mut con = redis::Client::open(server.url())
        .unwrap()
        .get_multiplexed_async_connection()
        .await
        .unwrap();
    let groups: redis::Value = redis::cmd("XINFO")
        .arg("GROUPS")
        .arg("weir_demo_orders")
        .query_async(&mut con)
        .await
        .unwrap();
    assert!(format!("{groups:?}").contains("billing"), "{groups:?}");
}

#[tokio::test]
async fn a_rabbitmq_queue_whose_delivery_limit_changed_must_be_recreated() {
    let server = weir_testkit::RabbitServer::start();
    let url = server.url();
    let run = |max: u32| {
        let url = url.clone();
        async move {
            let (ctx, handle) = context();
            let failing = max != 7;
            let mut script = vec![
                expect(Method::GET, &api("brokers/nats"), move |_| {
                    (StatusCode::OK, broker_of("rabbitmq", &url))
                }),
                expect(Method::GET, &api("microservices"), |_| {
                    (StatusCode::OK, billing_consumes())
                }),
            ];
            if failing {
                script.push(expect(Method::POST, EVENTS, created));
            }
            script.push(expect(
                Method::PATCH,
                &api("queues/orders/status"),
                queue_echo,
            ));
            let api_server = tokio::spawn(serve(handle, script));
            let q = queue(
                json!({"broker": "nats", "consumer": {"maxDeliveries": max}}),
                json!({}),
            );
            super::queue::reconcile(Arc::new(q), ctx).await.unwrap();
            let seen = api_server.await.unwrap();
            seen.last().unwrap().1.clone()
        }
    };
    let first = run(7).await;
    assert_eq!(ready(&first)["status"], "True", "{first}");
    assert_eq!(first["status"]["pending"]["billing"], 0);
    let second = run(3).await;
    let r = ready(&second);
    assert_eq!(r["status"], "False");
    assert_eq!(r["reason"], "QueueMustBeRecreated");
    let msg = r["message"].as_str().unwrap();
    assert!(
        msg.contains("weir_demo_orders.billing") && msg.contains("x-delivery-limit"),
        "{msg}"
    );
}

/// The Queue's limits become the consumer queue's arguments on RabbitMQ: past `maxMessages`
/// a publish is refused (the publisher hears it; dead-lettering is at-least-once, so the queue
/// cannot drop its head instead), and a message older than `maxAge` goes to the dead-letter
/// queue.
#[tokio::test]
async fn rabbitmq_applies_max_messages_and_max_age_to_each_consumer_queue() {
    use lapin::options::{BasicPublishOptions, ConfirmSelectOptions};
    let server = weir_testkit::RabbitServer::start();
    let url = server.url();
    let (ctx, handle) = context();
    let u = url.clone();
    let script = vec![
        expect(Method::GET, &api("brokers/nats"), move |_| {
            (StatusCode::OK, broker_of("rabbitmq", &u))
        }),
        expect(Method::GET, &api("microservices"), |_| {
            (StatusCode::OK, billing_consumes())
        }),
        expect(Method::PATCH, &api("queues/orders/status"), queue_echo),
    ];
    let api_server = tokio::spawn(serve(handle, script));
    let spec = json!({"broker": "nats", "maxMessages": 2, "maxAge": "2s"});
    let q = queue(spec.clone(), json!({}));
    super::queue::reconcile(Arc::new(q), ctx).await.unwrap();
    let seen = api_server.await.unwrap();
    let status = &seen[2].1;
    assert_eq!(ready(status)["status"], "True", "{status}");

    let conn = lapin::Connection::connect(&url, lapin::ConnectionProperties::default())
        .await
        .unwrap();
    let ch = conn.create_channel().await.unwrap();
    ch.confirm_select(ConfirmSelectOptions::default())
        .await
        .unwrap();
    let mut acked = 0;
    for i in 0..6 {
        let confirm = ch
            .basic_publish(
                "weir_demo_orders".into(),
                "weir.demo.orders".into(),
                BasicPublishOptions::default(),
                format!("{{\"n\":{i}}}").as_bytes(),
                lapin::BasicProperties::default().with_delivery_mode(2),
            )
            .await
            .unwrap()
            .await
            .unwrap();
        if confirm.is_ack() {
            acked += 1;
        }
    }
    // A quorum queue refuses once it is over the limit, so it may take one past it.
    assert!(
        (2..=3).contains(&acked),
        "publishes past maxMessages are refused ({acked} of 6 confirmed)"
    );
    let broker = weir_broker::rabbitmq::admin::RabbitAdmin::connect(&url, &Credentials::default())
        .await
        .unwrap();
    let depth = |q: &'static str| {
        let broker = broker.clone();
        async move { broker.queue_depth(q).await.unwrap().unwrap_or(0) }
    };
    assert_eq!(depth("weir_demo_orders.billing").await, acked);
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while depth("weir_demo_orders_dlq").await < acked {
        assert!(
            std::time::Instant::now() < deadline,
            "expired messages reach the dead-letter queue"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert_eq!(depth("weir_demo_orders.billing").await, 0);
}

fn managed_broker(spec: Value) -> Broker {
    serde_json::from_value(json!({"apiVersion": "weir.dev/v1alpha1", "kind": "Broker",
        "metadata": {"name": "bus", "namespace": "demo", "uid": "uid-b", "generation": 1},
        "spec": spec}))
    .unwrap()
}

fn bus_status_echo(b: &Value) -> (StatusCode, Value) {
    let mut obj = serde_json::to_value(managed_broker(json!({"managed": {}}))).unwrap();
    obj["status"] = b["status"].clone();
    (StatusCode::OK, obj)
}

/// The apiserver answers an apply with the object, here with `ready` ready replicas.
fn sts_echo(ready: i32) -> impl Fn(&Value) -> (StatusCode, Value) {
    move |b: &Value| {
        let mut obj = b.clone();
        obj["status"] = json!({"replicas": 1, "readyReplicas": ready});
        (StatusCode::OK, obj)
    }
}

/// A managed NATS Broker: the operator applies its StatefulSet and Service (owned by the
/// Broker, server-side applied) and reports `BrokerStarting` until the pod is ready; a ready
/// pod it cannot reach is `BrokerUnreachable`.
#[tokio::test]
async fn a_managed_broker_is_applied_and_reported_starting_then_unreachable() {
    let run = |ready: i32| async move {
        let (ctx, handle) = context();
        let api_server = tokio::spawn(serve(
            handle,
            vec![
                expect(Method::PATCH, "/api/v1/namespaces/demo/services/bus", echo),
                expect(
                    Method::PATCH,
                    "/apis/apps/v1/namespaces/demo/statefulsets/bus",
                    sts_echo(ready),
                ),
                expect(Method::POST, EVENTS, created),
                expect(Method::PATCH, &api("brokers/bus/status"), bus_status_echo),
            ],
        ));
        let b = managed_broker(json!({"managed": {"storage": "1Gi"}}));
        let action = super::broker::reconcile(Arc::new(b), ctx).await.unwrap();
        (action, api_server.await.unwrap())
    };
    let (action, seen) = run(0).await;
    let svc = &seen[0].1;
    assert_eq!(svc["spec"]["ports"][0]["port"], 4222);
    assert_eq!(svc["metadata"]["ownerReferences"][0]["kind"], "Broker");
    let sts = &seen[1].1;
    assert_eq!(sts["metadata"]["ownerReferences"][0]["name"], "bus");
    assert_eq!(
        sts["spec"]["template"]["spec"]["containers"][0]["image"],
        "nats:2.10-alpine"
    );
    assert_eq!(
        sts["spec"]["volumeClaimTemplates"][0]["spec"]["resources"]["requests"]["storage"],
        "1Gi"
    );
    let c = &seen[3].1["status"]["conditions"][0];
    assert_eq!(
        (c["status"].as_str(), c["reason"].as_str()),
        (Some("False"), Some("BrokerStarting"))
    );
    assert!(
        c["message"]
            .as_str()
            .unwrap()
            .contains("nats://bus.demo.svc.cluster.local:4222"),
        "{c}"
    );
    assert_eq!(action, Action::requeue(Duration::from_secs(5)));

    let (_, seen) = run(1).await;
    let c = &seen[3].1["status"]["conditions"][0];
    assert_eq!(c["reason"], "BrokerUnreachable", "{c}");
}

/// A managed RabbitMQ Broker gets a generated user once (a Secret owned by the Broker), which
/// the broker container and the operator's own connection both use.
#[tokio::test]
async fn a_managed_rabbitmq_broker_gets_generated_credentials_once() {
    let (ctx, handle) = context();
    let secret = "/api/v1/namespaces/demo/secrets/bus-broker-credentials";
    let api_server = tokio::spawn(serve(
        handle,
        vec![
            expect(Method::GET, secret, not_found),
            expect(Method::POST, "/api/v1/namespaces/demo/secrets", created),
            expect(Method::PATCH, "/api/v1/namespaces/demo/services/bus", echo),
            expect(
                Method::PATCH,
                "/apis/apps/v1/namespaces/demo/statefulsets/bus",
                sts_echo(0),
            ),
            expect(Method::GET, secret, |_| {
                (
                    StatusCode::OK,
                    json!({"apiVersion": "v1", "kind": "Secret",
                           "metadata": {"name": "bus-broker-credentials", "namespace": "demo"},
                           "data": {"username": "d2Vpcg==", "password": "c2VjcmV0"}}),
                )
            }),
            expect(Method::POST, EVENTS, created),
            expect(Method::PATCH, &api("brokers/bus/status"), bus_status_echo),
        ],
    ));
    let b = managed_broker(json!({"kind": "rabbitmq", "managed": {}}));
    super::broker::reconcile(Arc::new(b), ctx).await.unwrap();
    let seen = api_server.await.unwrap();
    let made = &seen[1].1;
    assert_eq!(made["metadata"]["name"], "bus-broker-credentials");
    assert_eq!(made["metadata"]["ownerReferences"][0]["kind"], "Broker");
    assert_eq!(made["stringData"]["username"], "weir");
    assert_eq!(made["stringData"]["password"].as_str().unwrap().len(), 48);
    let env = &seen[3].1["spec"]["template"]["spec"]["containers"][0]["env"];
    assert_eq!(
        env[1]["valueFrom"]["secretKeyRef"],
        json!({"name": "bus-broker-credentials", "key": "password", "optional": false})
    );
    let c = &seen[6].1["status"]["conditions"][0];
    assert_eq!(c["reason"], "BrokerStarting", "{c}");
}

/// A storage size that is no size is named, and nothing is applied.
#[tokio::test]
async fn a_managed_broker_with_a_bad_storage_size_names_the_field() {
    let (ctx, handle) = context();
    let api_server = tokio::spawn(serve(
        handle,
        vec![
            expect(Method::POST, EVENTS, created),
            expect(Method::PATCH, &api("brokers/bus/status"), bus_status_echo),
        ],
    ));
    let b = managed_broker(json!({"managed": {"storage": "big"}}));
    let action = super::broker::reconcile(Arc::new(b), ctx).await.unwrap();
    assert_eq!(action, Action::await_change());
    let c = &api_server.await.unwrap()[1].1["status"]["conditions"][0];
    assert_eq!(c["reason"], "InvalidSpec");
    assert!(
        c["message"]
            .as_str()
            .unwrap()
            .starts_with("Broker bus: spec.managed.storage: \"big\""),
        "{c}"
    );
}

/// What the API server refuses to apply is the Broker's condition, retried with backoff.
#[tokio::test]
async fn a_refused_apply_of_a_managed_broker_is_its_condition() {
    let (ctx, handle) = context();
    let api_server = tokio::spawn(serve(
        handle,
        vec![
            expect(
                Method::PATCH,
                "/api/v1/namespaces/demo/services/bus",
                |_| {
                    (
                        StatusCode::INTERNAL_SERVER_ERROR,
                        json!({"kind": "Status", "apiVersion": "v1", "status": "Failure", "code": 500,
                           "message": "failed to create typed patch object: .spec.ports"}),
                    )
                },
            ),
            expect(Method::POST, EVENTS, created),
            expect(Method::PATCH, &api("brokers/bus/status"), bus_status_echo),
        ],
    ));
    let b = managed_broker(json!({"managed": {}}));
    let action = super::broker::reconcile(Arc::new(b), ctx).await.unwrap();
    assert_eq!(action, Action::requeue(Duration::from_secs(5)));
    let c = &api_server.await.unwrap()[2].1["status"]["conditions"][0];
    assert_eq!(c["reason"], "ApplyFailed");
    assert_eq!(
        c["message"],
        "Broker bus: applying Service bus: failed to create typed patch object: .spec.ports"
    );
}

/// A Broker breaking the CRD's CEL rules (accepted by clusters without CEL) is refused by the
/// operator: no StatefulSet, no Service, no connection; a Warning Event and an `InvalidSpec`
/// condition name the field, and the reconcile waits for an edit.
#[tokio::test]
async fn a_broker_breaking_the_crd_rules_is_refused_naming_the_field() {
    let cases = [
        (
            json!({"url": "nats://127.0.0.1:4222", "managed": {}}),
            "spec: set exactly one of url or managed",
        ),
        (json!({}), "spec: set exactly one of url or managed"),
        (
            json!({"url": "nats://127.0.0.1:4222", "vhost": "/orders"}),
            "spec.vhost: vhost applies to rabbitmq only",
        ),
        (
            json!({"kind": "kafka", "managed": {}}),
            "spec.managed: Weir does not run Kafka: run it with Strimzi (strimzi.io) and set url \
             to its bootstrap servers",
        ),
        (
            json!({"kind": "kafka", "url": "kafka://k"}),
            "spec.url: a kafka url is kafka://host:port[,host:port…] or kafka+ssl://…, with \
             ?sasl=plain|scram-sha-256|scram-sha-512 at most",
        ),
    ];
    for (spec, want) in cases {
        // Only the Event and the status write are scripted: any apply (Service,
        // StatefulSet) or Secret read would be an unexpected request and fail the test.
        let (ctx, handle) = context();
        let api_server = tokio::spawn(serve(
            handle,
            vec![
                expect(Method::POST, EVENTS, created),
                expect(Method::PATCH, &api("brokers/bus/status"), bus_status_echo),
            ],
        ));
        let b = managed_broker(spec.clone());
        let action = super::broker::reconcile(Arc::new(b), ctx).await.unwrap();
        assert_eq!(action, Action::await_change(), "{spec}");
        let seen = api_server.await.unwrap();
        let event = &seen[0].1;
        assert_eq!(event["type"], "Warning", "{spec}");
        assert_eq!(event["reason"], "InvalidSpec", "{spec}");
        assert_eq!(event["note"], want, "{spec}");
        let c = &seen[1].1["status"]["conditions"][0];
        assert_eq!(
            (
                c["type"].as_str(),
                c["status"].as_str(),
                c["reason"].as_str()
            ),
            (Some("Connected"), Some("False"), Some("InvalidSpec")),
            "{spec}"
        );
        assert_eq!(c["message"], want, "{spec}");
    }
}

/// The Event of a condition change is published once: a second reconcile seeing the same
/// condition (the status the first one wrote) publishes nothing and writes nothing.
#[tokio::test]
async fn a_broker_condition_change_is_one_event_not_one_per_reconcile() {
    let run = |status: Option<Value>, script: Vec<super::mock_api::Expect>| async move {
        let (ctx, handle) = context();
        let api_server = tokio::spawn(serve(handle, script));
        let mut obj = broker_obj("nats://127.0.0.1:4222");
        obj["spec"]["credentialsSecret"] = json!({"name": "nats-creds"});
        if let Some(s) = status {
            obj["status"] = s;
        }
        let b: Broker = serde_json::from_value(obj).unwrap();
        super::broker::reconcile(Arc::new(b), ctx).await.unwrap();
        api_server.await.unwrap()
    };
    let secret = "/api/v1/namespaces/demo/secrets/nats-creds";
    let seen = run(
        None,
        vec![
            expect(Method::GET, secret, not_found),
            expect(Method::POST, EVENTS, created),
            expect(
                Method::PATCH,
                &api("brokers/nats/status"),
                broker_status_echo,
            ),
        ],
    )
    .await;
    assert_eq!(seen[1].1["reason"], "CredentialsNotFound");
    let written = seen[2].1["status"].clone();
    // Same cause again: only the Secret is read.
    run(Some(written), vec![expect(Method::GET, secret, not_found)]).await;

    // Same cause on one operator whose cache still has the Broker without that status (the
    // status write's watch event not in yet): the status is written again, no second Event.
    let (ctx, handle) = context();
    let api_server = tokio::spawn(serve(
        handle,
        vec![
            expect(Method::GET, secret, not_found),
            expect(Method::POST, EVENTS, created),
            expect(
                Method::PATCH,
                &api("brokers/nats/status"),
                broker_status_echo,
            ),
            expect(Method::GET, secret, not_found),
            expect(
                Method::PATCH,
                &api("brokers/nats/status"),
                broker_status_echo,
            ),
        ],
    ));
    let mut obj = broker_obj("nats://127.0.0.1:4222");
    obj["spec"]["credentialsSecret"] = json!({"name": "nats-creds"});
    let stale: Arc<Broker> = Arc::new(serde_json::from_value(obj).unwrap());
    for _ in 0..2 {
        super::broker::reconcile(stale.clone(), ctx.clone())
            .await
            .unwrap();
    }
    api_server.await.unwrap();
}
