//! The Saga reconciler: applies the coordinator (Deployment with `weir-proxy`, Service,
//! ConfigMap) with server-side apply, and reports in status the instance counts the coordinator
//! serves on `/v1/stats` (running, completed, compensated, cancelled, failed = ended
//! `CompensationFailed`), the versions instances run (the current one and every older one still
//! running, with its count of instances in progress), the last failure and `Ready`.

use super::{Context, conditions, status, workload};
use crate::render::saga::{coordinator_name, render};
use crate::render::{self, RenderError};
use futures::StreamExt;
use futures::future::BoxFuture;
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::{ConfigMap, Service};
use kube::api::Api;
use kube::core::PartialObjectMeta;
use kube::runtime::controller::{Action, Controller};
use kube::runtime::{WatchStreamExt, predicates, reflector, watcher};
use kube::{Resource, ResourceExt};
use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;
use weir_crds::saga::{SagaStatus, SagaVersionStatus};
use weir_crds::{Broker, Queue, Saga, validate};
use weir_saga::coordinator::Stats;

/// Refresh of the counts while all is well.
pub const STATS_RESYNC: Duration = Duration::from_secs(30);
/// Recheck while the Broker or a Queue is missing (they are not watched).
pub const MISSING_RECHECK: Duration = Duration::from_secs(30);

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("Kubernetes API: {0}")]
    Kube(#[from] kube::Error),
    #[error("object has no {0}")]
    Missing(&'static str),
}

impl Error {
    pub fn metric_label(&self) -> &'static str {
        match self {
            Error::Kube(_) => "kube",
            Error::Missing(_) => "missing",
        }
    }
}

/// Reads a coordinator's `/v1/stats`, given its base URL.
pub type StatsFn = dyn Fn(String) -> BoxFuture<'static, Result<Stats, String>> + Send + Sync;

/// `GET <base>/v1/stats` over HTTP.
pub fn http_stats(base: String) -> BoxFuture<'static, Result<Stats, String>> {
    Box::pin(async move {
        use http_body_util::BodyExt;
        let client =
            hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
                .build_http::<http_body_util::Empty<bytes::Bytes>>();
        let url = format!("{base}/v1/stats");
        let uri: http::Uri = url.parse().map_err(|e| format!("{url}: {e}"))?;
        let resp = tokio::time::timeout(Duration::from_secs(5), client.get(uri))
            .await
            .map_err(|_| format!("{url}: timed out"))?
            .map_err(|e| format!("{url}: {e}"))?;
        if !resp.status().is_success() {
            return Err(format!("{url}: HTTP {}", resp.status()));
        }
        let body = resp
            .into_body()
            .collect()
            .await
            .map_err(|e| format!("{url}: {e}"))?
            .to_bytes();
        serde_json::from_slice(&body).map_err(|e| format!("{url}: {e}"))
    })
}

/// Metadata-only events of the coordinators' children of kind `K`.
fn children<K>(
    client: &kube::Client,
    namespace: Option<&str>,
) -> impl futures::Stream<Item = Result<PartialObjectMeta<K>, watcher::Error>> + Send + 'static
where
    K: Resource<Scope = kube::core::NamespaceResourceScope, DynamicType = ()>
        + Clone
        + std::fmt::Debug
        + Send
        + Sync
        + serde::de::DeserializeOwned
        + 'static,
{
    let api: Api<PartialObjectMeta<K>> = match namespace {
        Some(ns) => Api::namespaced(client.clone(), ns),
        None => Api::all(client.clone()),
    };
    let owned = watcher::Config::default().labels(crate::render::saga::LABEL_SAGA);
    watcher(api, owned).default_backoff().touched_objects()
}

pub async fn run(ctx: Arc<Context>, namespace: Option<&str>) {
    let client = ctx.client.clone();
    let sagas: Api<Saga> = match namespace {
        Some(ns) => Api::namespaced(client.clone(), ns),
        None => Api::all(client.clone()),
    };
    // Sagas cached without managedFields; only spec changes trigger (the counts are refreshed
    // by the periodic requeue, and status writes do not come back as work). Children are
    // watched by metadata only: enough to map an event to its Saga.
    let (store, writer) = reflector::store();
    let main = watcher(sagas, watcher::Config::default())
        .default_backoff()
        .modify(|s: &mut Saga| s.managed_fields_mut().clear())
        .reflect(writer)
        .applied_objects()
        .predicate_filter(predicates::generation, Default::default());
    Controller::for_stream(main, store)
        .owns_stream(children::<Deployment>(&client, namespace))
        .owns_stream(children::<Service>(&client, namespace))
        .owns_stream(children::<ConfigMap>(&client, namespace))
        .shutdown_on_signal()
        .run(reconcile, error_policy, ctx)
        .for_each(super::backoff::log_outcome)
        .await;
}

pub fn error_policy(saga: Arc<Saga>, error: &Error, ctx: Arc<Context>) -> Action {
    let delay = super::backoff::after_failure(
        &ctx.messaging_backoff,
        &ctx.metrics,
        &*saga,
        error,
        error.metric_label(),
    );
    Action::requeue(delay)
}

pub async fn reconcile(saga: Arc<Saga>, ctx: Arc<Context>) -> Result<Action, Error> {
    reconcile_with(saga, ctx, &http_stats).await
}

/// [`reconcile`] with the coordinator's stats read by `stats` (tests give a fake).
pub async fn reconcile_with(
    saga: Arc<Saga>,
    ctx: Arc<Context>,
    stats: &StatsFn,
) -> Result<Action, Error> {
    let result = ctx
        .metrics
        .reconcile("Saga", reconcile_inner(&saga, &ctx, stats))
        .await;
    if result.is_ok() {
        ctx.messaging_backoff.reset(&super::backoff::key_of(&*saga));
    }
    result
}

async fn reconcile_inner(saga: &Saga, ctx: &Context, stats: &StatsFn) -> Result<Action, Error> {
    let name = saga
        .metadata
        .name
        .clone()
        .ok_or(Error::Missing("metadata.name"))?;
    let ns = saga
        .namespace()
        .ok_or(Error::Missing("metadata.namespace"))?;
    let generation = saga.metadata.generation;
    if saga.metadata.deletion_timestamp.is_some() {
        // Children carry owner references; the log stays on the broker.
        return Ok(Action::await_change());
    }
    let current = saga.status.clone().unwrap_or_default();
    let steps = Some(saga.spec.steps.len() as i32);
    let not_ready = |reason: &str, message: String| SagaStatus {
        observed_generation: generation,
        conditions: vec![conditions::new("Ready", false, reason, message, generation)],
        steps,
        ..current.clone()
    };

    let invalid = validate::saga(&saga.spec);
    if !invalid.is_empty() {
        let message = invalid
            .iter()
            .map(ToString::to_string)
            .collect::<Vec<_>>()
            .join("; ");
        write_status(ctx, &ns, &name, &current, not_ready("InvalidSpec", message)).await?;
        return Ok(Action::await_change());
    }

    // The Broker and the Queues the coordinator uses.
    let mut brokers = BTreeMap::new();
    match Api::<Broker>::namespaced(ctx.client.clone(), &ns)
        .get_opt(&saga.spec.broker)
        .await?
    {
        Some(b) => {
            brokers.insert(saga.spec.broker.clone(), b);
        }
        None => {
            let msg = format!(
                "spec.broker: Broker {:?} not found in namespace {ns}",
                saga.spec.broker
            );
            write_status(ctx, &ns, &name, &current, not_ready("BrokerNotFound", msg)).await?;
            return Ok(Action::requeue(MISSING_RECHECK));
        }
    }
    let mut wanted: Vec<(&str, &str)> = Vec::new();
    if let Some(q) = &saga.spec.trigger.queue {
        wanted.push(("spec.trigger.queue", q));
    }
    if let Some(o) = &saga.spec.on_completed {
        wanted.push(("spec.onCompleted.queue", &o.queue));
    }
    if let Some(o) = &saga.spec.on_failed {
        wanted.push(("spec.onFailed.queue", &o.queue));
    }
    let mut queues = BTreeMap::new();
    for (at, q) in wanted {
        if queues.contains_key(q) {
            continue;
        }
        match Api::<Queue>::namespaced(ctx.client.clone(), &ns)
            .get_opt(q)
            .await?
        {
            Some(found) => {
                queues.insert(q.to_string(), found.spec);
            }
            None => {
                let msg = format!("{at}: Queue {q:?} not found in namespace {ns}");
                write_status(ctx, &ns, &name, &current, not_ready("QueueNotFound", msg)).await?;
                return Ok(Action::requeue(MISSING_RECHECK));
            }
        }
    }

    let rendered = match render(saga, &queues, &brokers, &ctx.render) {
        Ok(r) => r.rendered,
        Err(e @ RenderError::Field { .. }) => {
            write_status(
                ctx,
                &ns,
                &name,
                &current,
                not_ready("InvalidSpec", e.to_string()),
            )
            .await?;
            return Ok(Action::await_change());
        }
        Err(RenderError::Metadata(m)) => return Err(Error::Missing(m)),
    };
    let coord = coordinator_name(&name);
    // Under the mesh: the namespace's trust bundle before the pods that mount it.
    if let Some(m) = &ctx.mesh {
        m.ensure_bundle(&ctx.client, &ns).await?;
    }
    let deployment = workload::apply(&ctx.client, &ns, &coord, &rendered, &ctx.applied).await?;

    let desired = saga.spec.replicas;
    let ready = deployment
        .status
        .as_ref()
        .and_then(|s| s.ready_replicas)
        .unwrap_or(0);
    let base = format!(
        "http://{coord}.{ns}.svc.{}:{}",
        ctx.render.cluster_domain,
        render::SERVICE_PORT
    );
    let counts = if ready > 0 {
        Some(stats(base).await)
    } else {
        None
    };
    let mut status = SagaStatus {
        observed_generation: generation,
        steps,
        ..current.clone()
    };
    let ready_cond = match (&counts, desired) {
        (_, 0) => conditions::new(
            "Ready",
            true,
            "ScaledToZero",
            "no coordinator replicas",
            generation,
        ),
        (None, _) => conditions::new(
            "Ready",
            false,
            "CoordinatorNotReady",
            format!("{ready}/{desired} coordinator replicas ready"),
            generation,
        ),
        (Some(Err(e)), _) => conditions::new(
            "Ready",
            false,
            "CoordinatorUnreachable",
            format!("cannot read the coordinator's stats: {e}"),
            generation,
        ),
        (Some(Ok(_)), _) => conditions::new(
            "Ready",
            true,
            "Available",
            format!("{ready}/{desired} coordinator replicas ready"),
            generation,
        ),
    };
    let mut conds = vec![ready_cond];
    if let Some(Ok(s)) = &counts {
        status.running = s.running + s.compensating + s.cancelling;
        status.completed = s.completed;
        status.compensated = s.compensated;
        status.cancelled = s.cancelled;
        status.failed = s.failed;
        status.last_failure = s.last_failure.clone();
        status.versions = versions(s);
    }
    conds.push(if status.failed > 0 {
        conditions::new(
            "Degraded",
            true,
            "CompensationFailed",
            format!(
                "{} instance(s) ended CompensationFailed and were dead-lettered",
                status.failed
            ),
            generation,
        )
    } else {
        conditions::new("Degraded", false, "AsExpected", "", generation)
    });
    status.conditions = conds;
    write_status(ctx, &ns, &name, &current, status).await?;
    Ok(Action::requeue(STATS_RESYNC))
}

/// The versions instances run: the current one, and every other with instances in progress.
pub fn versions(s: &Stats) -> Vec<SagaVersionStatus> {
    s.versions
        .iter()
        .filter(|(v, c)| c.running > 0 || s.current_version.as_deref() == Some(v.as_str()))
        .map(|(v, c)| SagaVersionStatus {
            version: v.clone(),
            running: c.running,
            current: s.current_version.as_deref() == Some(v.as_str()),
        })
        .collect()
}

/// Writes status only when it says something new ([`status`]).
async fn write_status(
    ctx: &Context,
    ns: &str,
    name: &str,
    current: &SagaStatus,
    status: SagaStatus,
) -> Result<(), Error> {
    let status = status::merged(current, status);
    status::write::<Saga, _>(&ctx.client, ns, name, current, &status).await?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::operator::metrics::Metrics;
    use crate::render::RenderOptions;
    use http::{Method, Request, Response, StatusCode};
    use kube::Client;
    use kube::client::Body;
    use serde_json::Value;
    use serde_json::json;

    type Handle = tower_test::mock::Handle<Request<Body>, Response<Body>>;
    type Respond = Box<dyn Fn(&Value) -> (StatusCode, Value) + Send>;

    /// Answers the expected requests in order, records (path, query, body), and checks that
    /// nothing else is asked.
    async fn serve(
        mut handle: Handle,
        script: Vec<(Method, String, Respond)>,
    ) -> Vec<(String, String, Value)> {
        let mut seen = Vec::new();
        for (method, path, respond) in script {
            let (req, send) = tokio::time::timeout(Duration::from_secs(5), handle.next_request())
                .await
                .unwrap_or_else(|_| panic!("timed out waiting for {method} {path}"))
                .expect("client dropped");
            assert_eq!((req.method(), req.uri().path()), (&method, path.as_str()));
            let query = req.uri().query().unwrap_or_default().to_string();
            let bytes = http_body_util::BodyExt::collect(req.into_body())
                .await
                .unwrap()
                .to_bytes();
            let body: Value = serde_json::from_slice(&bytes).unwrap_or(Value::Null);
            let (status, answer) = respond(&body);
            send.send_response(
                Response::builder()
                    .status(status)
                    .body(Body::from(serde_json::to_vec(&answer).unwrap()))
                    .unwrap(),
            );
            seen.push((path, query, body));
        }
        if let Ok(Some((req, _))) =
            tokio::time::timeout(Duration::from_millis(200), handle.next_request()).await
        {
            panic!("unexpected extra request: {} {}", req.method(), req.uri());
        }
        seen
    }

    fn context() -> (Arc<Context>, Handle) {
        let (svc, handle) = tower_test::mock::pair::<Request<Body>, Response<Body>>();
        let client = Client::new(svc, "default");
        let render = RenderOptions {
            proxy_image: "weir-proxy:test".into(),
            coordinator_image: "weir:test".into(),
            ..Default::default()
        };
        (
            Arc::new(Context::new(client, render, Arc::new(Metrics::default()))),
            handle,
        )
    }

    fn saga() -> Saga {
        serde_json::from_value(json!({
            "apiVersion": "weir.dev/v1alpha1",
            "kind": "Saga",
            "metadata": {"name": "place-order", "namespace": "shop", "uid": "uid-po", "generation": 4},
            "spec": {
                "broker": "bus",
                "trigger": {"queue": "orders"},
                "onFailed": {"queue": "orders", "type": "OrderFailed"},
                "steps": [
                    {"name": "reserve", "action": {"http": {"microservice": "inventory", "path": "/r"}},
                     "compensation": {"http": {"microservice": "inventory", "path": "/r/undo"}}},
                    {"name": "charge", "action": {"http": {"url": "https://pay.example.com", "path": "/c"}}}
                ]
            }
        }))
        .unwrap()
    }

    fn found(v: Value) -> Respond {
        Box::new(move |_| (StatusCode::OK, v.clone()))
    }
    fn echo() -> Respond {
        Box::new(|b| (StatusCode::OK, b.clone()))
    }
    fn not_found() -> Respond {
        Box::new(|_| {
            (
                StatusCode::NOT_FOUND,
                json!({"kind": "Status", "apiVersion": "v1", "status": "Failure", "reason": "NotFound", "code": 404, "message": "not found"}),
            )
        })
    }
    fn deployment_ready(n: i32) -> Respond {
        Box::new(move |b| {
            let mut d = b.clone();
            d["status"] = json!({"readyReplicas": n, "replicas": n});
            (StatusCode::OK, d)
        })
    }
    fn status_echo() -> Respond {
        Box::new(|b| {
            let mut obj = serde_json::to_value(saga()).unwrap();
            obj["status"] = b["status"].clone();
            (StatusCode::OK, obj)
        })
    }

    const BROKER: &str = "/apis/weir.dev/v1alpha1/namespaces/shop/brokers/bus";
    const QUEUE: &str = "/apis/weir.dev/v1alpha1/namespaces/shop/queues/orders";
    const STATUS: &str = "/apis/weir.dev/v1alpha1/namespaces/shop/sagas/place-order/status";

    fn broker() -> Respond {
        found(json!({"apiVersion": "weir.dev/v1alpha1", "kind": "Broker",
            "metadata": {"name": "bus", "namespace": "shop"}, "spec": {"url": "nats://nats.infra:4222"}}))
    }
    fn queue() -> Respond {
        found(json!({"apiVersion": "weir.dev/v1alpha1", "kind": "Queue",
            "metadata": {"name": "orders", "namespace": "shop"}, "spec": {"broker": "bus"}}))
    }

    fn condition<'a>(status: &'a Value, t: &str) -> &'a Value {
        status["status"]["conditions"]
            .as_array()
            .unwrap()
            .iter()
            .find(|c| c["type"] == t)
            .unwrap()
    }

    #[tokio::test]
    async fn applies_the_coordinator_and_reports_the_counts() {
        let (ctx, handle) = context();
        let script = vec![
            (Method::GET, BROKER.to_string(), broker()),
            (Method::GET, QUEUE.to_string(), queue()),
            (
                Method::PATCH,
                "/api/v1/namespaces/shop/configmaps/place-order-saga-weir-proxy".to_string(),
                echo(),
            ),
            (
                Method::PATCH,
                "/api/v1/namespaces/shop/services/place-order-saga".to_string(),
                echo(),
            ),
            (
                Method::PATCH,
                "/apis/apps/v1/namespaces/shop/deployments/place-order-saga".to_string(),
                deployment_ready(1),
            ),
            (Method::PATCH, STATUS.to_string(), status_echo()),
        ];
        let server = tokio::spawn(serve(handle, script));
        let asked = Arc::new(std::sync::Mutex::new(Vec::new()));
        let a = asked.clone();
        let stats = move |base: String| -> BoxFuture<'static, Result<Stats, String>> {
            a.lock().unwrap().push(base);
            Box::pin(async {
                Ok(Stats {
                    running: 2,
                    compensating: 1,
                    cancelling: 1,
                    completed: 40,
                    compensated: 3,
                    cancelled: 2,
                    failed: 1,
                    last_failure: Some("x: step 2 (charge) failed: HTTP 402".into()),
                    current_version: Some("bbbbbbbbbbbb".into()),
                    versions: BTreeMap::from([
                        (
                            "aaaaaaaaaaaa".to_string(),
                            weir_saga::coordinator::VersionStats {
                                running: 3,
                                completed: 40,
                                ..Default::default()
                            },
                        ),
                        (
                            "bbbbbbbbbbbb".to_string(),
                            weir_saga::coordinator::VersionStats {
                                running: 1,
                                ..Default::default()
                            },
                        ),
                        (
                            "cccccccccccc".to_string(),
                            weir_saga::coordinator::VersionStats {
                                completed: 3,
                                ..Default::default()
                            },
                        ),
                    ]),
                })
            })
        };
        let action = reconcile_with(Arc::new(saga()), ctx, &stats).await.unwrap();
        assert_eq!(action, Action::requeue(STATS_RESYNC));
        let seen = server.await.unwrap();
        assert_eq!(
            asked.lock().unwrap().as_slice(),
            ["http://place-order-saga.shop.svc.cluster.local:80"]
        );
        for (path, query, body) in &seen[2..5] {
            assert!(
                query.contains("fieldManager=weir-operator") && query.contains("force=true"),
                "{path}"
            );
            let owner = &body["metadata"]["ownerReferences"][0];
            assert_eq!(
                (owner["kind"].as_str(), owner["name"].as_str()),
                (Some("Saga"), Some("place-order")),
                "{path}"
            );
            assert_eq!(
                body["metadata"]["labels"]["weir.dev/saga"], "place-order",
                "{path}"
            );
        }
        let cm = &seen[2].2;
        let cfg: Value = serde_json::from_str(cm["data"]["saga.json"].as_str().unwrap()).unwrap();
        assert_eq!(cfg["brokerUrl"], "nats://nats.infra:4222");
        assert_eq!(cfg["trigger"]["queue"]["consumer"], "saga-place-order");
        let d = &seen[4].2;
        assert_eq!(
            d["spec"]["template"]["spec"]["containers"][0]["image"],
            "weir:test"
        );
        let st = &seen[5].2;
        assert_eq!(st["status"]["steps"], 2);
        assert_eq!(st["status"]["running"], 4);
        assert_eq!(st["status"]["cancelled"], 2);
        // The current version, and the older one that still has instances in progress.
        assert_eq!(
            st["status"]["versions"],
            json!([
                {"version": "aaaaaaaaaaaa", "running": 3, "current": false},
                {"version": "bbbbbbbbbbbb", "running": 1, "current": true}
            ])
        );
        assert_eq!(st["status"]["completed"], 40);
        assert_eq!(st["status"]["compensated"], 3);
        assert_eq!(st["status"]["failed"], 1);
        assert_eq!(
            st["status"]["lastFailure"],
            "x: step 2 (charge) failed: HTTP 402"
        );
        assert_eq!(st["status"]["observedGeneration"], 4);
        assert_eq!(condition(st, "Ready")["status"], "True");
        assert_eq!(condition(st, "Degraded")["reason"], "CompensationFailed");
    }

    #[tokio::test]
    async fn a_missing_queue_is_named_and_nothing_is_applied() {
        let (ctx, handle) = context();
        let script = vec![
            (Method::GET, BROKER.to_string(), broker()),
            (Method::GET, QUEUE.to_string(), not_found()),
            (Method::PATCH, STATUS.to_string(), status_echo()),
        ];
        let server = tokio::spawn(serve(handle, script));
        let stats = |_: String| -> BoxFuture<'static, Result<Stats, String>> {
            panic!("no coordinator yet")
        };
        let action = reconcile_with(Arc::new(saga()), ctx, &stats).await.unwrap();
        assert_eq!(action, Action::requeue(MISSING_RECHECK));
        let seen = server.await.unwrap();
        let ready = condition(&seen[2].2, "Ready");
        assert_eq!(ready["status"], "False");
        assert_eq!(ready["reason"], "QueueNotFound");
        assert!(
            ready["message"]
                .as_str()
                .unwrap()
                .starts_with("spec.trigger.queue: Queue \"orders\"")
        );
    }

    #[tokio::test]
    async fn an_unreachable_coordinator_is_not_ready_and_keeps_the_last_counts() {
        let (ctx, handle) = context();
        let mut s = saga();
        s.status = Some(SagaStatus {
            completed: 7,
            ..Default::default()
        });
        let script = vec![
            (Method::GET, BROKER.to_string(), broker()),
            (Method::GET, QUEUE.to_string(), queue()),
            (
                Method::PATCH,
                "/api/v1/namespaces/shop/configmaps/place-order-saga-weir-proxy".to_string(),
                echo(),
            ),
            (
                Method::PATCH,
                "/api/v1/namespaces/shop/services/place-order-saga".to_string(),
                echo(),
            ),
            (
                Method::PATCH,
                "/apis/apps/v1/namespaces/shop/deployments/place-order-saga".to_string(),
                deployment_ready(1),
            ),
            (Method::PATCH, STATUS.to_string(), status_echo()),
        ];
        let server = tokio::spawn(serve(handle, script));
        let stats = |_: String| -> BoxFuture<'static, Result<Stats, String>> {
            Box::pin(async { Err("connection refused".to_string()) })
        };
        reconcile_with(Arc::new(s), ctx, &stats).await.unwrap();
        let seen = server.await.unwrap();
        let st = &seen[5].2;
        assert_eq!(condition(st, "Ready")["reason"], "CoordinatorUnreachable");
        assert_eq!(st["status"]["completed"], 7);
    }
}
