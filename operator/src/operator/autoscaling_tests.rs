//! The Microservice reconciler with `spec.autoscaling`, against the scripted API
//! ([`super::mock_api`]): discovery, the hand-over of `replicas`, the autoscaler applied or
//! removed, and what status says.

use super::microservice::reconcile;
use super::mock_api::{Expect, context, echo, expect, microservice, not_found, serve};
use http::{Method, StatusCode};
use serde_json::{Value, json};
use std::sync::Arc;
use weir_crds::Microservice;

const MS: &str = "/apis/weir.dev/v1alpha1/namespaces/demo/microservices";
const DEPLOYMENT: &str = "/apis/apps/v1/namespaces/demo/deployments/orders";

/// Discovery of a cluster serving (or not) KEDA and `autoscaling/v2`.
fn discovery(keda: bool, hpa_v2: bool) -> Vec<Expect> {
    let group = |served: bool, resource: &'static str| {
        move |_: &Value| {
            if served {
                (
                    StatusCode::OK,
                    json!({"kind": "APIResourceList", "groupVersion": "x", "resources": [
                        {"name": resource, "singularName": "", "namespaced": true, "kind": "X", "verbs": ["get"]}
                    ]}),
                )
            } else {
                not_found(&Value::Null)
            }
        }
    };
    vec![
        expect(
            Method::GET,
            "/apis/keda.sh/v1alpha1",
            group(keda, "scaledobjects"),
        ),
        expect(
            Method::GET,
            "/apis/autoscaling/v2",
            group(hpa_v2, "horizontalpodautoscalers"),
        ),
    ]
}

/// The live Deployment: 5 pods, `replicas` owned by `manager`.
fn live_deployment(manager: &'static str) -> impl Fn(&Value) -> (StatusCode, Value) {
    move |_| {
        (
            StatusCode::OK,
            json!({
                "apiVersion": "apps/v1", "kind": "Deployment",
                "metadata": {"name": "orders", "namespace": "demo", "managedFields": [
                    {"manager": manager, "operation": if manager == "weir-operator" { "Apply" } else { "Update" },
                     "apiVersion": "apps/v1", "fieldsType": "FieldsV1",
                     "fieldsV1": {"f:spec": {"f:replicas": {}}}}
                ]},
                "spec": {"replicas": 5, "selector": {}, "template": {}},
            }),
        )
    }
}

/// The Deployment after apply: the autoscaler's count stays (6), or the applied one.
fn applied_deployment(body: &Value) -> (StatusCode, Value) {
    let mut d = body.clone();
    if d["spec"].get("replicas").is_none() {
        d["spec"]["replicas"] = json!(6);
    }
    let n = d["spec"]["replicas"].clone();
    d["metadata"]["generation"] = json!(3);
    d["status"] =
        json!({"observedGeneration": 3, "replicas": n, "readyReplicas": n, "updatedReplicas": n});
    (StatusCode::OK, d)
}

fn children() -> Vec<Expect> {
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
        expect(Method::PATCH, DEPLOYMENT, applied_deployment),
    ]
}

fn status_echo(body: &Value) -> (StatusCode, Value) {
    let mut obj = serde_json::to_value(microservice(json!({"image": "orders:1"}), None)).unwrap();
    obj["status"] = body["status"].clone();
    (StatusCode::OK, obj)
}

/// The bridge's lookups of a Microservice consuming Queue `jobs` on the NATS Broker `nats`.
fn queue_jobs_on_nats() -> Vec<Expect> {
    let found = |object: Value| move |_: &Value| (StatusCode::OK, object.clone());
    vec![
        expect(
            Method::GET,
            "/apis/weir.dev/v1alpha1/namespaces/demo/queues/jobs",
            found(json!({"apiVersion": "weir.dev/v1alpha1", "kind": "Queue",
                "metadata": {"name": "jobs", "namespace": "demo"}, "spec": {"broker": "nats"}})),
        ),
        expect(
            Method::GET,
            "/apis/weir.dev/v1alpha1/namespaces/demo/brokers/nats",
            found(json!({"apiVersion": "weir.dev/v1alpha1", "kind": "Broker",
                "metadata": {"name": "nats", "namespace": "demo"},
                "spec": {"kind": "nats", "url": "nats://nats:4222"}})),
        ),
    ]
}

fn condition<'a>(status_patch: &'a Value, type_: &str) -> Option<&'a Value> {
    status_patch["status"]["conditions"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["type"] == type_)
}

async fn run(ms: Microservice, script: Vec<Expect>) -> Vec<(String, Value)> {
    let (ctx, handle) = context();
    let server = tokio::spawn(serve(handle, script));
    reconcile(Arc::new(ms), ctx).await.unwrap();
    server.await.unwrap()
}

/// CPU autoscaling on a 1.20 cluster (no `autoscaling/v2`, no KEDA): the operator's hold on
/// `replicas` is handed over at the live count, the HorizontalPodAutoscaler is applied as
/// `autoscaling/v2beta2`, the Deployment without `replicas`, and status names the scaler and
/// the autoscaler's count.
#[tokio::test]
async fn cpu_autoscaling_hands_replicas_over_and_applies_a_horizontal_pod_autoscaler() {
    let spec = json!({"image": "orders:1", "replicas": 2,
        "autoscaling": {"minReplicas": 2, "maxReplicas": 8, "targetCPUUtilizationPercentage": 60}});
    let mut script = discovery(false, false);
    script.push(expect(
        Method::GET,
        DEPLOYMENT,
        live_deployment("weir-operator"),
    ));
    script.push(expect(Method::PATCH, DEPLOYMENT, echo));
    script.push(expect(
        Method::PATCH,
        "/apis/autoscaling/v2beta2/namespaces/demo/horizontalpodautoscalers/orders",
        echo,
    ));
    script.extend(children());
    script.push(expect(
        Method::PATCH,
        &format!("{MS}/orders/status"),
        status_echo,
    ));
    let seen = run(microservice(spec, None), script).await;
    // The hand-over carries the live count and nothing else.
    assert_eq!(seen[3].1["spec"], json!({"replicas": 5}), "{}", seen[3].1);
    let hpa = &seen[4].1;
    assert_eq!(hpa["apiVersion"], "autoscaling/v2beta2");
    assert_eq!(hpa["kind"], "HorizontalPodAutoscaler");
    assert_eq!(hpa["spec"]["scaleTargetRef"]["name"], "orders");
    assert_eq!(hpa["spec"]["minReplicas"], 2);
    assert_eq!(hpa["spec"]["maxReplicas"], 8);
    assert_eq!(hpa["metadata"]["ownerReferences"][0]["uid"], "uid-orders");
    assert!(seen[8].1["spec"].get("replicas").is_none(), "{}", seen[8].1);
    let status = &seen[9].1;
    assert_eq!(
        status["status"]["autoscaling"],
        json!({"scaler": "HorizontalPodAutoscaler", "object": "HorizontalPodAutoscaler/orders", "currentReplicas": 6, "desiredReplicas": 6})
    );
    assert_eq!(status["status"]["replicaSummary"], "6/6");
    let c = condition(status, "Autoscaling").unwrap();
    assert_eq!(
        (&c["status"], &c["reason"]),
        (&json!("True"), &json!("HorizontalPodAutoscaler"))
    );
}

/// Once the autoscaler has changed the count (its manager owns `replicas`), nothing is handed
/// over again: the Deployment is only read.
#[tokio::test]
async fn replicas_the_autoscaler_owns_are_not_handed_over_again() {
    let spec = json!({"image": "orders:1",
        "autoscaling": {"maxReplicas": 8, "targetMemoryUtilizationPercentage": 60}});
    let mut script = discovery(false, true);
    script.push(expect(
        Method::GET,
        DEPLOYMENT,
        live_deployment("kube-controller-manager"),
    ));
    script.push(expect(
        Method::PATCH,
        "/apis/autoscaling/v2/namespaces/demo/horizontalpodautoscalers/orders",
        echo,
    ));
    script.extend(children());
    script.push(expect(
        Method::PATCH,
        &format!("{MS}/orders/status"),
        status_echo,
    ));
    let seen = run(microservice(spec, None), script).await;
    assert_eq!(seen[3].1["apiVersion"], "autoscaling/v2");
}

/// Autoscaling removed: the HorizontalPodAutoscaler the status names is deleted before the
/// Deployment gets `replicas` back, and status no longer speaks of autoscaling.
#[tokio::test]
async fn removing_autoscaling_deletes_the_autoscaler_and_applies_replicas_again() {
    let spec = json!({"image": "orders:1", "replicas": 3});
    let status = json!({"autoscaling": {"scaler": "HorizontalPodAutoscaler", "object": "HorizontalPodAutoscaler/orders"}});
    let mut script = discovery(false, true);
    script.push(expect(
        Method::DELETE,
        "/apis/autoscaling/v2/namespaces/demo/horizontalpodautoscalers/orders",
        |_| {
            (
                StatusCode::OK,
                json!({"kind": "Status", "apiVersion": "v1", "status": "Success"}),
            )
        },
    ));
    script.extend(children());
    script.push(expect(
        Method::PATCH,
        &format!("{MS}/orders/status"),
        status_echo,
    ));
    let seen = run(microservice(spec, Some(status)), script).await;
    assert_eq!(seen[6].1["spec"]["replicas"], 3);
    let status = &seen[7].1;
    assert!(status["status"].get("autoscaling").is_none(), "{status}");
    assert!(condition(status, "Autoscaling").is_none());
}

/// Queue lag without KEDA: the condition says so and names what still applies (the CPU
/// target's HorizontalPodAutoscaler).
#[tokio::test]
async fn queue_lag_without_keda_is_a_condition_and_the_cpu_target_still_applies() {
    let spec = json!({"image": "orders:1",
        "consumes": [{"queue": "jobs", "path": "/jobs"}],
        "autoscaling": {"maxReplicas": 8, "targetCPUUtilizationPercentage": 60,
            "queueLag": [{"queue": "jobs", "targetLagPerReplica": 10}]}});
    let mut script = queue_jobs_on_nats();
    script.extend(discovery(false, true));
    script.push(expect(Method::GET, DEPLOYMENT, not_found));
    script.push(expect(
        Method::PATCH,
        "/apis/autoscaling/v2/namespaces/demo/horizontalpodautoscalers/orders",
        echo,
    ));
    script.extend(children());
    script.push(expect(
        Method::PATCH,
        &format!("{MS}/orders/status"),
        status_echo,
    ));
    let seen = run(microservice(spec, None), script).await;
    let status = &seen.last().unwrap().1;
    let c = condition(status, "Autoscaling").unwrap();
    assert_eq!(
        (&c["status"], &c["reason"]),
        (&json!("False"), &json!("KedaNotInstalled"))
    );
    let message = c["message"].as_str().unwrap();
    assert!(
        message.contains("spec.autoscaling.queueLag needs KEDA"),
        "{message}"
    );
    assert!(
        message.contains("HorizontalPodAutoscaler/orders (1-8 replicas)"),
        "{message}"
    );
}

/// With KEDA: the ScaledObject carries the queue's trigger and the CPU target, and no
/// HorizontalPodAutoscaler of Weir's is applied beside it.
#[tokio::test]
async fn queue_lag_with_keda_applies_a_scaled_object() {
    let spec = json!({"image": "orders:1",
        "consumes": [{"queue": "jobs", "path": "/jobs"}],
        "autoscaling": {"minReplicas": 0, "maxReplicas": 8, "targetCPUUtilizationPercentage": 60,
            "queueLag": [{"queue": "jobs", "targetLagPerReplica": 10}]}});
    let mut script = queue_jobs_on_nats();
    script.extend(discovery(true, true));
    script.push(expect(Method::GET, DEPLOYMENT, not_found));
    script.push(expect(
        Method::PATCH,
        "/apis/keda.sh/v1alpha1/namespaces/demo/scaledobjects/orders",
        echo,
    ));
    script.extend(children());
    script.push(expect(
        Method::PATCH,
        &format!("{MS}/orders/status"),
        status_echo,
    ));
    let seen = run(microservice(spec, None), script).await;
    let so = &seen[5].1;
    assert_eq!(so["kind"], "ScaledObject");
    assert_eq!(so["spec"]["minReplicaCount"], 0);
    let types: Vec<_> = so["spec"]["triggers"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t["type"].as_str().unwrap())
        .collect();
    assert_eq!(types, ["nats-jetstream", "cpu"]);
    assert_eq!(
        so["spec"]["triggers"][0]["metadata"]["stream"],
        "weir_demo_jobs"
    );
    assert_eq!(so["spec"]["triggers"][0]["metadata"]["consumer"], "orders");
    let status = &seen.last().unwrap().1;
    assert_eq!(status["status"]["autoscaling"]["scaler"], "KEDA");
    assert_eq!(
        condition(status, "Autoscaling").unwrap()["reason"],
        "ScaledObject"
    );
}

/// An autoscaler of the user's own, named by `weir.dev/autoscaled-by`: nothing is rendered for
/// it, the count is handed over and left to it, and status names it.
#[tokio::test]
async fn an_autoscaler_of_the_users_own_is_left_the_replicas() {
    let mut ms = microservice(json!({"image": "orders:1", "replicas": 2}), None);
    ms.metadata.annotations = Some(
        [(
            "weir.dev/autoscaled-by".to_string(),
            "HorizontalPodAutoscaler/orders-lag".to_string(),
        )]
        .into(),
    );
    let mut script = discovery(false, true);
    script.push(expect(
        Method::GET,
        DEPLOYMENT,
        live_deployment("weir-operator"),
    ));
    script.push(expect(Method::PATCH, DEPLOYMENT, echo));
    script.extend(children());
    script.push(expect(
        Method::PATCH,
        &format!("{MS}/orders/status"),
        status_echo,
    ));
    let seen = run(ms, script).await;
    assert_eq!(seen[3].1["spec"], json!({"replicas": 5}));
    assert!(seen[7].1["spec"].get("replicas").is_none(), "{}", seen[7].1);
    let status = &seen[8].1;
    assert_eq!(
        status["status"]["autoscaling"]["object"],
        "HorizontalPodAutoscaler/orders-lag"
    );
    assert_eq!(status["status"]["autoscaling"]["scaler"], "External");
    assert_eq!(
        condition(status, "Autoscaling").unwrap()["reason"],
        "External"
    );
}

/// Once status says an autoscaler scales it, the Deployment is not read again for a hand-over.
#[tokio::test]
async fn an_autoscaled_microservice_is_not_handed_over_twice() {
    let spec = json!({"image": "orders:1",
        "autoscaling": {"maxReplicas": 8, "targetCPUUtilizationPercentage": 60}});
    let status = json!({"autoscaling": {"scaler": "HorizontalPodAutoscaler", "object": "HorizontalPodAutoscaler/orders"}});
    let mut script = discovery(false, true);
    script.push(expect(
        Method::PATCH,
        "/apis/autoscaling/v2/namespaces/demo/horizontalpodautoscalers/orders",
        echo,
    ));
    script.extend(children());
    script.push(expect(
        Method::PATCH,
        &format!("{MS}/orders/status"),
        status_echo,
    ));
    let seen = run(microservice(spec, Some(status)), script).await;
    assert!(
        seen.iter()
            .all(|(path, body)| path != DEPLOYMENT || !body.is_null())
    );
}
