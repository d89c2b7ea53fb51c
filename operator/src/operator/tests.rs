//! Reconciler tests against kube's `tower-test` mock API server: each test scripts the
//! requests the reconciler must make, in order, and what the "apiserver" answers.

use super::backoff::Backoff;
use super::metrics::Metrics;
use super::microservice::reconcile;
use http::{Method, Request, Response, StatusCode};
use kube::Client;
use kube::client::Body;
use kube::runtime::controller::Action;
use serde_json::{Value, json};
use std::sync::Arc;
use std::time::Duration;
use weir_crds::Microservice;

use super::mock_api::{Expect, Handle, context, echo, expect, microservice, not_found, serve};

fn orders_spec() -> Value {
    json!({"image": "orders:1", "replicas": 2, "dependencies": [{"name": "users", "microservice": "users"}]})
}

/// The apiserver answers a status patch with the whole object.
fn status_echo(body: &Value) -> (StatusCode, Value) {
    let mut obj = serde_json::to_value(microservice(orders_spec(), None)).unwrap();
    obj["status"] = body["status"].clone();
    (StatusCode::OK, obj)
}

/// The Deployment as the apiserver returns it after apply, with a rollout status.
fn deployment_with(ready: i32, updated: i32) -> impl Fn(&Value) -> (StatusCode, Value) {
    move |body| {
        let mut d = body.clone();
        d["metadata"]["generation"] = json!(3);
        d["status"] = json!({"observedGeneration": 3, "replicas": 2, "readyReplicas": ready, "updatedReplicas": updated});
        (StatusCode::OK, d)
    }
}

/// The dependency `users`, with one ready pod.
fn users_found(_: &Value) -> (StatusCode, Value) {
    let mut users = serde_json::to_value(microservice(json!({"image": "users:1"}), None)).unwrap();
    users["status"] = json!({"readyReplicas": 1, "replicas": 1});
    (StatusCode::OK, users)
}

/// The dependency `users`, with no ready pod (scaled to zero, or still starting).
fn users_not_ready(_: &Value) -> (StatusCode, Value) {
    let mut users = serde_json::to_value(microservice(json!({"image": "users:1"}), None)).unwrap();
    users["status"] = json!({"readyReplicas": 0, "replicas": 0});
    (StatusCode::OK, users)
}

const MS: &str = "/apis/weir.dev/v1alpha1/namespaces/demo/microservices";

fn children(deployment: impl Fn(&Value) -> (StatusCode, Value) + Send + 'static) -> Vec<Expect> {
    vec![
        expect(
            Method::PATCH,
            "/api/v1/namespaces/demo/configmaps/orders-weir-proxy",
            echo,
        ),
        expect(
            Method::PATCH,
            "/api/v1/namespaces/demo/services/orders",
            echo,
        ),
        expect(
            Method::PATCH,
            "/api/v1/namespaces/demo/services/orders-weir-endpoints",
            echo,
        ),
        expect(
            Method::PATCH,
            "/apis/apps/v1/namespaces/demo/deployments/orders",
            deployment,
        ),
    ]
}

fn condition<'a>(status_patch: &'a Value, type_: &str) -> &'a Value {
    status_patch["status"]["conditions"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["type"] == type_)
        .unwrap_or_else(|| panic!("no {type_} condition in {status_patch}"))
}

/// One reconcile of a new orders (which calls users) against the mock API: users answered by
/// `users`, the children applied with the Deployment answering `deployment`, then the status
/// write. The reconcile's action, and what the API server saw in order (the status at `[5]`).
async fn reconcile_orders(
    users: fn(&Value) -> (StatusCode, Value),
    deployment: impl Fn(&Value) -> (StatusCode, Value) + Send + 'static,
) -> (Action, Vec<(String, Value)>) {
    let (ctx, handle) = context();
    let mut script = vec![expect(Method::GET, &format!("{MS}/users"), users)];
    script.extend(children(deployment));
    script.push(expect(
        Method::PATCH,
        &format!("{MS}/orders/status"),
        status_echo,
    ));
    let server = tokio::spawn(serve(handle, script));
    let action = reconcile(Arc::new(microservice(orders_spec(), None)), ctx)
        .await
        .unwrap();
    (action, server.await.unwrap())
}

#[tokio::test]
async fn create_applies_children_with_owner_references_and_reports_ready() {
    let (action, seen) = reconcile_orders(users_found, deployment_with(2, 2)).await;
    assert_eq!(action, Action::requeue(Duration::from_secs(300)));

    for (path, body) in &seen[1..5] {
        let owner = &body["metadata"]["ownerReferences"][0];
        assert_eq!(
            (owner["kind"].as_str(), owner["name"].as_str()),
            (Some("Microservice"), Some("orders")),
            "{path}"
        );
        assert_eq!(owner["controller"], true, "{path}");
        assert_eq!(
            body["metadata"]["labels"]["app.kubernetes.io/managed-by"], "weir",
            "{path}"
        );
    }
    // The headless Service of the pods, which callers' sidecars resolve.
    let headless = &seen[3].1;
    assert_eq!(headless["metadata"]["name"], "orders-weir-endpoints");
    assert_eq!(headless["spec"]["clusterIP"], "None");
    assert_eq!(
        headless["spec"]["selector"]["weir.dev/microservice"],
        "orders"
    );
    let deployment = &seen[4].1;
    assert_eq!(deployment["spec"]["replicas"], 2);
    assert_eq!(
        deployment["spec"]["template"]["spec"]["initContainers"][0]["name"],
        "weir-proxy"
    );
    let env = deployment["spec"]["template"]["spec"]["containers"][0]["env"]
        .as_array()
        .unwrap();
    assert!(
        env.iter()
            .any(|e| e["name"] == "USERS_URL" && e["value"] == "http://127.0.0.1:15100")
    );

    let status = &seen[5].1;
    assert_eq!(status["status"]["observedGeneration"], 2);
    assert_eq!(status["status"]["replicaSummary"], "2/2");
    assert_eq!(status["status"]["dependencySummary"], "1/1");
    assert_eq!(condition(status, "Ready")["status"], "True");
    assert_eq!(
        condition(status, "Progressing")["reason"],
        "RolloutComplete"
    );
    assert_eq!(condition(status, "Degraded")["status"], "False");
}

/// The Dependencies column counts dependencies that can answer now: `users` exists but has no
/// ready pod, so orders shows 0/1, while orders itself is Ready (its own pods are) and nothing
/// is reported missing.
#[tokio::test]
async fn a_dependency_without_a_ready_pod_is_not_counted_as_ready() {
    let (_, seen) = reconcile_orders(users_not_ready, deployment_with(2, 2)).await;
    let status = &seen[5].1;
    assert_eq!(status["status"]["dependencySummary"], "0/1");
    assert_eq!(condition(status, "Ready")["status"], "True");
    assert_eq!(condition(status, "Degraded")["status"], "False");
}

#[tokio::test]
async fn rollout_in_progress_is_reported() {
    let (_, seen) = reconcile_orders(users_found, deployment_with(1, 1)).await;
    let status = &seen[5].1;
    assert_eq!(condition(status, "Ready")["status"], "False");
    assert_eq!(condition(status, "Ready")["reason"], "ReplicasNotReady");
    assert_eq!(condition(status, "Progressing")["status"], "True");
    assert_eq!(status["status"]["replicaSummary"], "1/2");
}

#[tokio::test]
async fn missing_dependency_is_a_condition_and_an_event() {
    let (ctx, handle) = context();
    let mut script = vec![expect(Method::GET, &format!("{MS}/users"), not_found)];
    script.extend(children(deployment_with(2, 2)));
    script.push(expect(
        Method::POST,
        "/apis/events.k8s.io/v1/namespaces/demo/events",
        |b| (StatusCode::CREATED, b.clone()),
    ));
    script.push(expect(
        Method::PATCH,
        &format!("{MS}/orders/status"),
        status_echo,
    ));
    let server = tokio::spawn(serve(handle, script));

    let action = reconcile(Arc::new(microservice(orders_spec(), None)), ctx)
        .await
        .unwrap();
    assert_eq!(
        action,
        Action::requeue(Duration::from_secs(30)),
        "rechecks the dependency"
    );
    let seen = server.await.unwrap();

    let event = &seen[5].1;
    assert_eq!(event["reason"], "DependencyNotFound");
    assert_eq!(event["type"], "Warning");
    assert_eq!(event["regarding"]["name"], "orders");
    assert!(event["note"].as_str().unwrap().contains("users"));

    let status = &seen[6].1;
    let degraded = condition(status, "Degraded");
    assert_eq!(degraded["status"], "True");
    assert_eq!(degraded["reason"], "DependencyNotFound");
    assert!(
        degraded["message"]
            .as_str()
            .unwrap()
            .starts_with("DependencyNotFound: users")
    );
    assert_eq!(condition(status, "Ready")["status"], "False");
    assert_eq!(status["status"]["dependencySummary"], "0/1");
}

/// One cause, one Event. The second reconcile sees the object as the cache still has it,
/// without the status the first one wrote (the apply's own Deployment event often triggers it
/// before the status write's event arrives), and must not record `DependencyNotFound` again;
/// nor must a third that sees the written status. A real change (the dependency appears, then
/// goes) is an Event again.
#[tokio::test]
async fn a_missing_dependency_is_one_event_across_reconciles() {
    let (ctx, handle) = context();
    let events = "/apis/events.k8s.io/v1/namespaces/demo/events";
    // A repeated Event (same reason and note within minutes) is recorded by kube's Recorder as
    // the next occurrence of its series: a PATCH of the Event it created first.
    let pass = |found: bool, event: Option<Method>| {
        let mut s = vec![expect(
            Method::GET,
            &format!("{MS}/users"),
            if found { users_found } else { not_found },
        )];
        s.extend(children(deployment_with(2, 2)));
        if let Some(m) = event {
            let path = if m == Method::POST {
                events.to_string()
            } else {
                format!("{events}/*")
            };
            s.push(expect(m, &path, |b| (StatusCode::CREATED, b.clone())));
        }
        s.push(expect(
            Method::PATCH,
            &format!("{MS}/orders/status"),
            status_echo,
        ));
        s
    };
    // Missing (Event), missing again on the stale object (no Event), found (no Event: only
    // problems are), missing again (a new cause: an Event).
    let mut script = pass(false, Some(Method::POST));
    script.extend(pass(false, None));
    script.extend(pass(true, None));
    script.extend(pass(false, Some(Method::PATCH)));
    let server = tokio::spawn(serve(handle, script));
    let stale = Arc::new(microservice(orders_spec(), None));
    for _ in 0..4 {
        reconcile(stale.clone(), ctx.clone()).await.unwrap();
    }
    let seen = server.await.unwrap();
    let events_seen: Vec<_> = seen.iter().filter(|(p, _)| p.starts_with(events)).collect();
    assert_eq!(events_seen.len(), 2, "{events_seen:?}");
    assert_eq!(events_seen[0].1["reason"], "DependencyNotFound");
    let written = seen.last().unwrap().1["status"].clone();

    // A later reconcile seeing the written status: no Event, and nothing to write.
    let (ctx, handle) = context();
    let mut script = vec![expect(Method::GET, &format!("{MS}/users"), not_found)];
    script.extend(children(deployment_with(2, 2)));
    let server = tokio::spawn(serve(handle, script));
    reconcile(Arc::new(microservice(orders_spec(), Some(written))), ctx)
        .await
        .unwrap();
    server.await.unwrap();
}

#[tokio::test]
async fn unchanged_status_is_not_rewritten() {
    // First pass: learn the status the reconciler writes.
    let (ctx, handle) = context();
    let mut script = vec![expect(Method::GET, &format!("{MS}/users"), users_found)];
    script.extend(children(deployment_with(2, 2)));
    script.push(expect(
        Method::PATCH,
        &format!("{MS}/orders/status"),
        status_echo,
    ));
    let server = tokio::spawn(serve(handle, script));
    reconcile(Arc::new(microservice(orders_spec(), None)), ctx)
        .await
        .unwrap();
    let written = server.await.unwrap().pop().unwrap().1["status"].clone();

    // Second pass on the object carrying that status: children re-applied (drift repair),
    // but no status write, so the status write cannot retrigger a reconcile forever.
    let (ctx, handle) = context();
    let mut script = vec![expect(Method::GET, &format!("{MS}/users"), users_found)];
    script.extend(children(deployment_with(2, 2)));
    let server = tokio::spawn(serve(handle, script));
    reconcile(Arc::new(microservice(orders_spec(), Some(written))), ctx)
        .await
        .unwrap();
    server.await.unwrap();
}

#[tokio::test]
async fn drifted_children_are_applied_back_to_the_spec() {
    // Someone scaled the Deployment to 5 and edited the ConfigMap: the apply carries the
    // spec's values with force, taking the fields back.
    let (ctx, handle) = context();
    let mut script = vec![expect(Method::GET, &format!("{MS}/users"), users_found)];
    script.push(expect(
        Method::PATCH,
        "/api/v1/namespaces/demo/configmaps/orders-weir-proxy",
        echo,
    ));
    script.push(expect(
        Method::PATCH,
        "/api/v1/namespaces/demo/services/orders",
        echo,
    ));
    script.push(expect(
        Method::PATCH,
        "/api/v1/namespaces/demo/services/orders-weir-endpoints",
        echo,
    ));
    script.push(expect(Method::PATCH, "/apis/apps/v1/namespaces/demo/deployments/orders", |b| {
        let mut d = b.clone();
        d["metadata"]["generation"] = json!(7);
        d["status"] = json!({"observedGeneration": 6, "replicas": 5, "readyReplicas": 5, "updatedReplicas": 5});
        (StatusCode::OK, d)
    }));
    script.push(expect(
        Method::PATCH,
        &format!("{MS}/orders/status"),
        status_echo,
    ));
    let server = tokio::spawn(serve(handle, script));
    reconcile(Arc::new(microservice(orders_spec(), None)), ctx)
        .await
        .unwrap();
    let seen = server.await.unwrap();
    assert_eq!(seen[4].1["spec"]["replicas"], 2);
    let cfg: Value =
        serde_json::from_str(seen[1].1["data"]["proxy.json"].as_str().unwrap()).unwrap();
    assert_eq!(
        cfg["outbound"][0]["upstream"],
        "http://users.demo.svc.cluster.local:80"
    );
    assert_eq!(
        condition(&seen[5].1, "Progressing")["status"],
        "True",
        "scale-down still in progress"
    );
}

#[tokio::test]
async fn spec_breaking_a_cel_rule_is_reported_without_applying() {
    // Clusters without CEL accept this (port 15001 is the sidecar's): no children, a condition
    // and an Event naming the field.
    let (ctx, handle) = context();
    let script = vec![
        expect(
            Method::POST,
            "/apis/events.k8s.io/v1/namespaces/demo/events",
            |b| (StatusCode::CREATED, b.clone()),
        ),
        expect(Method::PATCH, &format!("{MS}/orders/status"), status_echo),
    ];
    let server = tokio::spawn(serve(handle, script));
    let action = reconcile(
        Arc::new(microservice(
            json!({"image": "orders:1", "port": 15001}),
            None,
        )),
        ctx,
    )
    .await
    .unwrap();
    assert_eq!(action, Action::await_change());
    let seen = server.await.unwrap();
    assert!(seen[0].1["note"].as_str().unwrap().contains("spec.port"));
    let ready = condition(&seen[1].1, "Ready");
    assert_eq!(ready["reason"], "InvalidSpec");
    assert!(ready["message"].as_str().unwrap().starts_with("spec.port:"));
}

#[tokio::test]
async fn api_errors_surface_for_requeue() {
    let (ctx, handle) = context();
    let script = vec![expect(Method::GET, &format!("{MS}/users"), |_| {
        (
            StatusCode::INTERNAL_SERVER_ERROR,
            json!({"kind": "Status", "apiVersion": "v1", "status": "Failure", "code": 500, "message": "etcd down"}),
        )
    })];
    let server = tokio::spawn(serve(handle, script));
    let err = reconcile(Arc::new(microservice(orders_spec(), None)), ctx)
        .await
        .unwrap_err();
    assert_eq!(err.metric_label(), "kube");
    server.await.unwrap();
}

#[test]
fn error_backoff_doubles_up_to_five_minutes_and_resets() {
    let b = Backoff::default();
    let key = super::backoff::key("Microservice", Some("demo"), "orders");
    assert_eq!(key, "Microservice/demo/orders");
    let delays: Vec<u64> = (0..9).map(|_| b.next_delay(&key).as_secs()).collect();
    assert_eq!(delays, [5, 10, 20, 40, 80, 160, 300, 300, 300]);
    b.reset(&key);
    assert_eq!(b.next_delay(&key).as_secs(), 5);
}

mod lease {
    use super::*;
    use crate::operator::leader::Lease;
    use k8s_openapi::jiff::{SignedDuration, Timestamp};

    const LEASES: &str = "/apis/coordination.k8s.io/v1/namespaces/weir-system/leases";

    fn lease_held_by(holder: &str, renewed_secs_ago: i64) -> Value {
        let renew = Timestamp::now() - SignedDuration::from_secs(renewed_secs_ago);
        json!({
            "apiVersion": "coordination.k8s.io/v1", "kind": "Lease",
            "metadata": {"name": "weir-operator", "namespace": "weir-system", "resourceVersion": "41"},
            "spec": {"holderIdentity": holder, "leaseDurationSeconds": 15, "renewTime": renew.strftime("%Y-%m-%dT%H:%M:%S%.6fZ").to_string(), "leaseTransitions": 3}
        })
    }

    fn lease_client() -> (Client, Handle) {
        let (svc, handle) = tower_test::mock::pair::<Request<Body>, Response<Body>>();
        (Client::new(svc, "default"), handle)
    }

    #[tokio::test]
    async fn a_held_unexpired_lease_is_not_taken() {
        let (client, handle) = lease_client();
        let server = tokio::spawn(serve(
            handle,
            vec![expect(
                Method::GET,
                &format!("{LEASES}/weir-operator"),
                |_| (StatusCode::OK, lease_held_by("other", 2)),
            )],
        ));
        let lease = Lease::new(client, "weir-system", "weir-operator", "me");
        assert!(!lease.try_acquire().await.unwrap());
        server.await.unwrap();
    }

    #[tokio::test]
    async fn an_expired_lease_is_taken_with_optimistic_concurrency() {
        let (client, handle) = lease_client();
        let script = vec![
            expect(Method::GET, &format!("{LEASES}/weir-operator"), |_| {
                (StatusCode::OK, lease_held_by("other", 60))
            }),
            expect(Method::PUT, &format!("{LEASES}/weir-operator"), |b| {
                (StatusCode::OK, b.clone())
            }),
        ];
        let server = tokio::spawn(serve(handle, script));
        let lease = Lease::new(client, "weir-system", "weir-operator", "me");
        assert!(lease.try_acquire().await.unwrap());
        let seen = server.await.unwrap();
        let put = &seen[1].1;
        assert_eq!(
            put["metadata"]["resourceVersion"], "41",
            "replace carries the version read"
        );
        assert_eq!(put["spec"]["holderIdentity"], "me");
        assert_eq!(put["spec"]["leaseTransitions"], 4);
    }

    #[tokio::test]
    async fn losing_the_race_is_not_an_error() {
        let (client, handle) = lease_client();
        let script = vec![
            expect(Method::GET, &format!("{LEASES}/weir-operator"), |_| {
                (StatusCode::OK, lease_held_by("other", 60))
            }),
            expect(Method::PUT, &format!("{LEASES}/weir-operator"), |_| {
                (
                    StatusCode::CONFLICT,
                    json!({"kind": "Status", "apiVersion": "v1", "status": "Failure", "reason": "Conflict", "code": 409, "message": "conflict"}),
                )
            }),
        ];
        let server = tokio::spawn(serve(handle, script));
        let lease = Lease::new(client, "weir-system", "weir-operator", "me");
        assert!(!lease.try_acquire().await.unwrap());
        server.await.unwrap();
    }

    #[tokio::test]
    async fn no_lease_yet_creates_one() {
        let (client, handle) = lease_client();
        let script = vec![
            expect(Method::GET, &format!("{LEASES}/weir-operator"), not_found),
            expect(Method::POST, LEASES, |b| (StatusCode::CREATED, b.clone())),
        ];
        let server = tokio::spawn(serve(handle, script));
        let lease = Lease::new(client, "weir-system", "weir-operator", "me");
        assert!(lease.try_acquire().await.unwrap());
        assert_eq!(server.await.unwrap()[1].1["spec"]["holderIdentity"], "me");
    }
}

#[tokio::test]
async fn admin_endpoint_serves_metrics_health_and_readiness() {
    use std::sync::atomic::{AtomicBool, Ordering};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let metrics = Arc::new(Metrics::default());
    let kind = super::metrics::KindLabel {
        kind: "Microservice".into(),
    };
    metrics.reconciles.get_or_create(&kind).inc();
    metrics.duration.get_or_create(&kind).observe(0.02);
    let ready = Arc::new(AtomicBool::new(false));
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    drop(listener);
    tokio::spawn(super::admin::serve(addr, metrics, ready.clone()));
    async fn get(addr: std::net::SocketAddr, path: &str) -> String {
        for _ in 0..50 {
            if let Ok(mut s) = tokio::net::TcpStream::connect(addr).await {
                s.write_all(
                    format!("GET {path} HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n")
                        .as_bytes(),
                )
                .await
                .unwrap();
                let mut out = String::new();
                s.read_to_string(&mut out).await.unwrap();
                return out;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        panic!("admin endpoint did not come up");
    }
    assert!(get(addr, "/healthz").await.starts_with("HTTP/1.1 200"));
    assert!(get(addr, "/readyz").await.starts_with("HTTP/1.1 503"));
    ready.store(true, Ordering::SeqCst);
    assert!(get(addr, "/readyz").await.starts_with("HTTP/1.1 200"));
    let m = get(addr, "/metrics").await;
    assert!(
        m.contains(r#"weir_operator_reconciles_total{kind="Microservice"} 1"#),
        "{m}"
    );
    assert!(
        m.contains(r#"weir_operator_reconcile_duration_seconds_count{kind="Microservice"} 1"#),
        "{m}"
    );
}

#[tokio::test]
async fn a_failed_reconcile_is_requeued_with_backoff_and_an_event() {
    let (ctx, handle) = context();
    let script = vec![expect(
        Method::POST,
        "/apis/events.k8s.io/v1/namespaces/demo/events",
        |b| (StatusCode::CREATED, b.clone()),
    )];
    let server = tokio::spawn(serve(handle, script));
    let ms = Arc::new(microservice(orders_spec(), None));
    let err = super::microservice::Error::Missing("metadata.namespace");
    let first = super::microservice::error_policy(ms.clone(), &err, ctx.clone());
    assert_eq!(first, Action::requeue(Duration::from_secs(5)));
    let seen = server.await.unwrap();
    assert_eq!(seen[0].1["reason"], "ReconcileFailed");
    assert!(
        seen[0].1["note"]
            .as_str()
            .unwrap()
            .contains("retrying in 5s")
    );
}

#[test]
fn a_microservice_change_wakes_its_callers_only() {
    let mk = |name: &str, ns: &str, deps: &[&str]| {
        let deps: Vec<Value> = deps
            .iter()
            .map(|d| json!({"name": d, "microservice": d}))
            .collect();
        Arc::new(
            serde_json::from_value::<Microservice>(json!({
                "apiVersion": "weir.dev/v1alpha1", "kind": "Microservice",
                "metadata": {"name": name, "namespace": ns},
                "spec": {"image": "x:1", "dependencies": deps}
            }))
            .unwrap(),
        )
    };
    let (store, mut writer) = kube::runtime::reflector::store();
    for ms in [
        mk("orders", "shop", &["users"]),
        mk("gateway", "shop", &["orders", "users"]),
        mk("orders", "other", &["users"]),
        mk("users", "shop", &[]),
    ] {
        writer.apply_watcher_event(&kube::runtime::watcher::Event::Apply((*ms).clone()));
    }
    let mut woken: Vec<String> = super::microservice::dependents(&store, Some("shop"), "users")
        .into_iter()
        .map(|r| r.name)
        .collect();
    woken.sort();
    assert_eq!(woken, ["gateway", "orders"]);
}

#[tokio::test]
async fn a_deleted_microservice_leaves_nothing_behind() {
    let (ctx, _handle) = context();
    let ms = microservice(json!({"image": "x:1"}), None);
    let key = super::backoff::key_of(&ms);
    let degraded = super::conditions::new("Degraded", true, "InvalidSpec", "bad", Some(2));
    ctx.last_written
        .record(&key, Some("uid-orders"), std::slice::from_ref(&degraded));
    let cm = k8s_openapi::api::core::v1::ConfigMap::default();
    let svc = k8s_openapi::api::core::v1::Service::default();
    ctx.applied
        .record("demo", "orders-weir-proxy", &cm, Some("1".into()));
    ctx.applied.record("demo", "orders", &svc, Some("2".into()));
    // Another Microservice's, and one of another namespace: kept.
    ctx.applied.record("demo", "users", &svc, Some("3".into()));
    ctx.applied
        .record("other", "orders", &svc, Some("4".into()));
    let seen = ("Degraded", "True", "InvalidSpec", Some(2));
    assert!(ctx.last_written.has(&key, Some("uid-orders"), &[], seen));
    assert_eq!(ctx.applied.remembered(), 4);
    super::microservice::forget(&ctx, &ms);
    assert!(!ctx.last_written.has(&key, Some("uid-orders"), &[], seen));
    assert_eq!(ctx.applied.remembered(), 2);
}

fn gateway_spec() -> Value {
    json!({
        "dependencies": [{"name": "users", "microservice": "users"}],
        "edge": {
            "jwt": {"issuer": "https://id.example.com/", "audiences": ["shop"], "jwksUri": "https://id.example.com/jwks.json"},
            "routes": [{"pathPrefix": "/users", "dependency": "users"}]
        }
    })
}

const IDENTITY_SECRET: &str = "/api/v1/namespaces/demo/secrets/weir-identity";

#[tokio::test]
async fn an_edge_creates_the_namespace_identity_key_once_and_runs_the_proxy_alone() {
    let (ctx, handle) = context();
    let mut script = vec![
        expect(Method::GET, &format!("{MS}/users"), users_found),
        expect(Method::GET, IDENTITY_SECRET, not_found),
        expect(Method::POST, "/api/v1/namespaces/demo/secrets", |b| {
            (StatusCode::CREATED, b.clone())
        }),
    ];
    script.extend(children(deployment_with(2, 2)));
    script.push(expect(
        Method::PATCH,
        &format!("{MS}/orders/status"),
        status_echo,
    ));
    let server = tokio::spawn(serve(handle, script));
    reconcile(Arc::new(microservice(gateway_spec(), None)), ctx)
        .await
        .unwrap();
    let seen = server.await.unwrap();
    let secret = &seen[2].1;
    assert_eq!(secret["metadata"]["name"], "weir-identity");
    let key = secret["stringData"]["key"].as_str().unwrap();
    assert_eq!(key.len(), 64, "32 random bytes, hex");
    assert!(
        secret["metadata"]["ownerReferences"].is_null(),
        "shared by the namespace, owned by no Microservice"
    );
    let pod = &seen[6].1["spec"]["template"]["spec"];
    assert!(pod["initContainers"].is_null());
    let containers = pod["containers"].as_array().unwrap();
    assert_eq!(containers.len(), 1, "no app container without an image");
    assert_eq!(containers[0]["name"], "weir-proxy");
}

#[tokio::test]
async fn an_existing_identity_key_is_left_alone() {
    let (ctx, handle) = context();
    let mut script = vec![
        expect(Method::GET, &format!("{MS}/users"), users_found),
        expect(Method::GET, IDENTITY_SECRET, |_| {
            (
                StatusCode::OK,
                json!({"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "weir-identity", "namespace": "demo"}, "data": {"key": "a2V5"}}),
            )
        }),
    ];
    script.extend(children(deployment_with(2, 2)));
    script.push(expect(
        Method::PATCH,
        &format!("{MS}/orders/status"),
        status_echo,
    ));
    let server = tokio::spawn(serve(handle, script));
    reconcile(Arc::new(microservice(gateway_spec(), None)), ctx)
        .await
        .unwrap();
    server.await.unwrap();
}

/// Under the mesh (`--mtls`): the namespace's trust bundle first (once per process and bundle),
/// then orders' own ServiceAccount before its Deployment, whose pods run under it; the sidecar's
/// config admits the callers the caches hold (a Microservice depending on orders and a Saga
/// calling it, not a Microservice of another namespace), and names users as the peer to expect;
/// users, which orders now calls, is reconciled again.
#[tokio::test]
async fn under_the_mesh_the_bundle_the_account_and_the_graphs_callers_are_applied() {
    use kube::runtime::{reflector, watcher};
    let (ctx, handle) = context();
    let mut ctx = Arc::into_inner(ctx).expect("one owner");
    ctx.render.mesh = Some(crate::render::MeshOptions {
        trust_domain: "cluster.local".into(),
        issuer_url: "https://weir-identity.weir-system.svc:8443".into(),
        default_mode: weir_crds::microservice::MtlsMode::Strict,
    });
    let mesh = Arc::new(super::mesh::PodMesh::new("BUNDLE PEM\n".into()));
    let mut triggers = mesh.take_triggers().unwrap();
    let (mss, mut mss_writer) = reflector::store::<Microservice>();
    let (sagas, mut sagas_writer) = reflector::store::<weir_crds::Saga>();
    let caller = |ns: &str| -> Microservice {
        serde_json::from_value(json!({
            "apiVersion": "weir.dev/v1alpha1", "kind": "Microservice",
            "metadata": {"name": "front", "namespace": ns},
            "spec": {"image": "front:1", "dependencies": [{"name": "orders", "microservice": "orders"}]}
        }))
        .unwrap()
    };
    mss_writer.apply_watcher_event(&watcher::Event::Apply(caller("demo")));
    mss_writer.apply_watcher_event(&watcher::Event::Apply(caller("elsewhere")));
    mss_writer.apply_watcher_event(&watcher::Event::Apply(microservice(orders_spec(), None)));
    sagas_writer.apply_watcher_event(&watcher::Event::Apply(
        serde_json::from_value(json!({
            "apiVersion": "weir.dev/v1alpha1", "kind": "Saga",
            "metadata": {"name": "checkout", "namespace": "demo"},
            "spec": {"broker": "bus", "trigger": {"http": true},
                     "steps": [{"name": "a", "action": {"http": {"microservice": "orders", "path": "/"}}}]}
        }))
        .unwrap(),
    ));
    let _ = mesh.microservices.set(mss);
    let _ = mesh.sagas.set(sagas);
    ctx.mesh = Some(mesh.clone());
    let ctx = Arc::new(ctx);

    let script = |with_bundle: bool| {
        let mut s = vec![expect(Method::GET, &format!("{MS}/users"), users_found)];
        if with_bundle {
            s.push(expect(
                Method::PATCH,
                "/api/v1/namespaces/demo/configmaps/weir-trust-bundle",
                echo,
            ));
        }
        s.push(expect(
            Method::PATCH,
            "/api/v1/namespaces/demo/configmaps/orders-weir-proxy",
            echo,
        ));
        s.push(expect(
            Method::PATCH,
            "/api/v1/namespaces/demo/serviceaccounts/orders-weir",
            echo,
        ));
        s.extend(children(deployment_with(2, 2)).into_iter().skip(1));
        s.push(expect(
            Method::PATCH,
            &format!("{MS}/orders/status"),
            status_echo,
        ));
        s
    };
    let server = tokio::spawn(serve(handle, script(true)));
    reconcile(Arc::new(microservice(orders_spec(), None)), ctx.clone())
        .await
        .unwrap();
    let seen = server.await.unwrap();
    let bundle = &seen[1].1;
    assert_eq!(bundle["data"]["ca.crt"], "BUNDLE PEM\n");
    let config: Value =
        serde_json::from_str(seen[2].1["data"]["proxy.json"].as_str().unwrap()).unwrap();
    assert_eq!(
        config["mtls"]["identity"],
        "spiffe://cluster.local/ns/demo/ms/orders"
    );
    assert_eq!(
        config["mtls"]["authorization"]["allow"],
        json!(["demo/front", "demo/saga/checkout"])
    );
    assert_eq!(
        config["outbound"][0]["peerIdentity"],
        "spiffe://cluster.local/ns/demo/ms/users"
    );
    let account = &seen[3].1;
    assert_eq!(
        account["metadata"]["ownerReferences"][0]["kind"],
        "Microservice"
    );
    assert_eq!(
        account["metadata"]["labels"]["weir.dev/microservice"],
        "orders"
    );
    let pod = &seen[6].1["spec"]["template"]["spec"];
    assert_eq!(pod["serviceAccountName"], "orders-weir");
    let told = triggers.try_recv().expect("users reconciled again");
    assert_eq!(
        (told.name.as_str(), told.namespace.as_deref()),
        ("users", Some("demo"))
    );
    assert!(triggers.try_recv().is_err());

    // Again: the bundle is not applied twice, and nothing changed for users.
    let (ctx2, handle) = context();
    let mut ctx2 = Arc::into_inner(ctx2).expect("one owner");
    ctx2.render = ctx.render.clone();
    ctx2.mesh = Some(mesh);
    let server = tokio::spawn(serve(handle, script(false)));
    reconcile(Arc::new(microservice(orders_spec(), None)), Arc::new(ctx2))
        .await
        .unwrap();
    server.await.unwrap();
    assert!(triggers.try_recv().is_err());
}
