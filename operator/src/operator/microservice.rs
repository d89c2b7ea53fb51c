//! The Microservice reconciler: applies the rendered Deployment, Service and ConfigMap with
//! server-side apply, and reports what it sees in status conditions and Events.

use super::{Context, autoscaling, conditions, events, status, workload};
use crate::render::{self, RenderError};
use futures::StreamExt;
use k8s_openapi::api::core::v1::{ConfigMap, Service, ServiceAccount};
use kube::api::Api;
use kube::core::PartialObjectMeta;
use kube::runtime::controller::{Action, Controller};
use kube::runtime::events::EventType;
use kube::runtime::reflector::ObjectRef;
use kube::runtime::{WatchStreamExt, predicates, reflector, watcher};
use kube::{Resource, ResourceExt};
use std::sync::Arc;
use std::time::Duration;
use weir_crds::microservice::MicroserviceStatus;
use weir_crds::{Microservice, validate};

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("Kubernetes API: {0}")]
    Kube(#[from] kube::Error),
    #[error("render: {0}")]
    Render(#[from] RenderError),
    #[error("object has no {0}")]
    Missing(&'static str),
}

impl Error {
    pub fn metric_label(&self) -> &'static str {
        match self {
            Error::Kube(_) => "kube",
            Error::Render(_) => "render",
            Error::Missing(_) => "missing",
        }
    }
}

/// The backoff key of a Microservice.
/// Re-check interval while a dependency is missing (its creation is not watched).
const DEPENDENCY_RECHECK: Duration = Duration::from_secs(30);
/// Microservices reconciled at the same time.
pub const RECONCILE_CONCURRENCY: u16 = 32;
/// How long a Microservice's triggers are gathered into one reconcile. Applying its children
/// sends a burst of events back (each child's own, then the Deployment's status as the
/// Deployment controller takes it up); each would otherwise be a reconcile of its own.
const DEBOUNCE: Duration = Duration::from_millis(500);
/// Periodic resync even when nothing changes.
const RESYNC: Duration = Duration::from_secs(300);

/// Metadata-only events of the operator's children of kind `K`; their versions kept in
/// `versions` (what [`super::applied`] compares its last applies with).
fn children<K>(
    client: &kube::Client,
    namespace: Option<&str>,
    config: &watcher::Config,
    versions: Arc<super::applied::Versions>,
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
    futures::TryStreamExt::inspect_ok(
        watcher(
            api::<PartialObjectMeta<K>>(client, namespace),
            config.clone(),
        )
        .default_backoff(),
        move |event| versions.apply(event),
    )
    .touched_objects()
}

/// An Api over `K` in `namespace` (or all namespaces).
fn api<K>(client: &kube::Client, namespace: Option<&str>) -> Api<K>
where
    K: Resource<Scope = kube::core::NamespaceResourceScope>,
    K::DynamicType: Default,
{
    match namespace {
        Some(ns) => Api::namespaced(client.clone(), ns),
        None => Api::all(client.clone()),
    }
}

pub async fn run(ctx: Arc<Context>, namespace: Option<&str>) {
    let client = ctx.client.clone();
    let mss: Api<Microservice> = api(&client, namespace);
    let owned = watcher::Config::default().labels("app.kubernetes.io/managed-by=weir");
    let queues = match namespace {
        Some(ns) => Api::<weir_crds::Queue>::namespaced(client.clone(), ns),
        None => Api::all(client.clone()),
    };
    // The cache holds Microservices without their managedFields or `kubectl apply`'s copy
    // (applied::trim_metadata), and only spec changes (a new generation) trigger: the
    // operator's own status writes do not come back as work. A delete event drops what the
    // operator kept of the object (`forget`).
    let (store, writer) = reflector::store();
    let gone_ctx = ctx.clone();
    let main = futures::TryStreamExt::inspect_ok(
        watcher(mss.clone(), watcher::Config::default())
            .default_backoff()
            .modify(|ms: &mut Microservice| super::applied::trim_metadata(&mut ms.metadata)),
        move |event| {
            if let watcher::Event::Delete(ms) = event {
                forget(&gone_ctx, ms);
            }
        },
    )
    .reflect(writer)
    .applied_objects()
    .predicate_filter(predicates::generation, Default::default());
    // Services, ConfigMaps and ServiceAccounts are watched by metadata only: enough to map an
    // event to its owner and to tell its version.
    let dependents_store = store.clone();
    let queue_store = store.clone();
    let mesh = ctx.mesh.clone();
    if let Some(m) = &mesh {
        let _ = m.microservices.set(store.clone());
    }
    let gone_mesh = mesh.clone();
    let (deployments, deployments_cache) = reflector::store();
    let services_cache = Arc::new(super::applied::Versions::default());
    let config_maps_cache = Arc::new(super::applied::Versions::default());
    let service_accounts_cache = Arc::new(super::applied::Versions::default());
    let (services, config_maps, service_accounts) = (
        services_cache.clone(),
        config_maps_cache.clone(),
        service_accounts_cache.clone(),
    );
    ctx.applied.watch(super::applied::Stores {
        deployments,
        services,
        config_maps,
        service_accounts,
    });
    // Deployments are watched as what a reconcile reads of them (applied::DeploymentState, the
    // pod template never decoded): a reconcile reads their status from the cache, and their
    // status updates do not re-apply them.
    let deployments = watcher(
        api::<super::applied::DeploymentState>(&client, namespace),
        owned.clone(),
    )
    .default_backoff()
    .modify(|d: &mut super::applied::DeploymentState| {
        super::applied::trim_deployment_metadata(&mut d.metadata)
    })
    .reflect(deployments_cache)
    .touched_objects();
    let controller = Controller::for_stream(main, store)
        .owns_stream(deployments)
        .owns_stream(children::<Service>(
            &client,
            namespace,
            &owned,
            services_cache,
        ))
        .owns_stream(children::<ConfigMap>(
            &client,
            namespace,
            &owned,
            config_maps_cache,
        ));
    // Under the mesh each Microservice has a ServiceAccount of its own, applied like the rest.
    let controller = match &ctx.mesh {
        Some(_) => controller.owns_stream(children::<ServiceAccount>(
            &client,
            namespace,
            &owned,
            service_accounts_cache,
        )),
        None => controller,
    };
    let controller = controller
        // A Queue's change (e.g. maxDeliveries) reaches the sidecars of the services using it.
        .watches(queues, watcher::Config::default(), move |q| {
            super::queue::microservices_using(&queue_store, &q)
        })
        // A Microservice that appears (or goes) resolves (or breaks) its callers at once.
        .watches_stream(
            watcher(
                api::<PartialObjectMeta<Microservice>>(&client, namespace),
                watcher::Config::default(),
            )
            .default_backoff()
            .touched_objects(),
            move |target: PartialObjectMeta<Microservice>| {
                let ns = target.namespace();
                let name = target.name_any();
                let mut out = dependents(&dependents_store, ns.as_deref(), &name);
                // Under the mesh, one that is gone is no longer admitted by its targets.
                let gone = || {
                    let key = ObjectRef::<Microservice>::new(&name);
                    let key = match ns.as_deref() {
                        Some(ns) => key.within(ns),
                        None => key,
                    };
                    dependents_store.get(&key).is_none()
                };
                if let Some(m) = gone_mesh.as_ref().filter(|_| gone()) {
                    out.extend(
                        m.admitting(&format!("{}/{name}", ns.as_deref().unwrap_or_default())),
                    );
                }
                out
            },
        );
    // Under the mesh: a Saga's change re-renders the Microservices it calls and those that
    // admitted it; a caller's reconcile re-renders the targets it gained or lost.
    let controller = match &mesh {
        Some(m) => {
            let sagas = api::<weir_crds::Saga>(&client, namespace);
            let (saga_store, saga_writer) = reflector::store();
            let _ = m.sagas.set(saga_store);
            let stream = watcher(sagas, watcher::Config::default())
                .default_backoff()
                .reflect(saga_writer)
                .touched_objects();
            let mapped = m.clone();
            let controller =
                controller.watches_stream(stream, move |saga| mapped.saga_targets(&saga));
            match m.take_triggers() {
                Some(mut rx) => {
                    controller.reconcile_on(futures::stream::poll_fn(move |cx| rx.poll_recv(cx)))
                }
                None => controller,
            }
        }
        None => controller,
    };
    controller
        // Bounded: a burst of new objects (a namespace of a thousand services applied at once)
        // queues up instead of holding a thousand renders and requests in memory.
        .with_config(
            kube::runtime::controller::Config::default()
                .concurrency(RECONCILE_CONCURRENCY)
                .debounce(DEBOUNCE),
        )
        .shutdown_on_signal()
        .run(reconcile, error_policy, ctx)
        .for_each(super::backoff::log_outcome)
        .await;
}

/// Drops what the operator keeps of a Microservice that is going or gone: the conditions it last
/// wrote, the last applies of its children, its place in the mesh's graph. Called when a
/// reconcile finds it being deleted, and on its watch's delete event (a Microservice without
/// finalizers is gone before any reconcile sees it).
pub(crate) fn forget(ctx: &Context, ms: &Microservice) {
    let (Some(ns), Some(name)) = (
        ms.metadata.namespace.as_deref(),
        ms.metadata.name.as_deref(),
    ) else {
        return;
    };
    ctx.last_written.forget(&super::backoff::key_of(ms));
    ctx.applied.forget(
        ns,
        &[
            name.to_string(),
            render::config_map_name(name),
            weir_crds::microservice::endpoints_service_name(name),
            crate::render::mesh::service_account_name(name),
        ],
    );
    if let Some(m) = &ctx.mesh {
        m.forget(ns, name);
    }
}

/// Microservices of `namespace` (in `store`) that call Microservice `name`.
pub fn dependents(
    store: &reflector::Store<Microservice>,
    namespace: Option<&str>,
    name: &str,
) -> Vec<ObjectRef<Microservice>> {
    // Every event of every Microservice (each status write) comes here, with thousands in the
    // cache: looked at in place under the store's lock, only the callers taken out. (A
    // snapshot of the store clones and drops an `Arc` per cached object, each in a cache line
    // of its own.)
    store
        .state_filter(|m| {
            m.metadata.namespace.as_deref() == namespace && render::mesh::depends_on(&m.spec, name)
        })
        .iter()
        .map(|m| ObjectRef::from_obj(&**m))
        .collect()
}

pub fn error_policy(ms: Arc<Microservice>, error: &Error, ctx: Arc<Context>) -> Action {
    let delay = super::backoff::after_failure(
        &ctx.backoff,
        &ctx.metrics,
        &*ms,
        error,
        error.metric_label(),
    );
    // Tell the object's owner too (`kubectl describe`); repeats become one Event series.
    let note = format!("{error}; retrying in {}s", delay.as_secs());
    tokio::spawn(async move {
        events::publish(&ctx, &*ms, EventType::Warning, "ReconcileFailed", &note).await;
    });
    Action::requeue(delay)
}

pub async fn reconcile(ms: Arc<Microservice>, ctx: Arc<Context>) -> Result<Action, Error> {
    let result = ctx
        .metrics
        .reconcile("Microservice", reconcile_inner(&ms, &ctx))
        .await;
    if result.is_ok() {
        ctx.backoff.reset(&super::backoff::key_of(&*ms));
    }
    result
}

async fn reconcile_inner(ms: &Microservice, ctx: &Context) -> Result<Action, Error> {
    let name = ms
        .metadata
        .name
        .clone()
        .ok_or(Error::Missing("metadata.name"))?;
    let ns = ms.namespace().ok_or(Error::Missing("metadata.namespace"))?;
    let generation = ms.metadata.generation;
    if ms.metadata.deletion_timestamp.is_some() {
        // Children carry owner references: the garbage collector removes them.
        forget(ctx, ms);
        return Ok(Action::await_change());
    }
    let current = ms.status.clone().unwrap_or_default();

    // A spec the apiserver accepted may still break rules that only CEL states (clusters
    // without CEL ignore it): report it on the object and wait for an edit.
    let invalid = validate::microservice(&name, &ms.spec);
    if let Some(first) = invalid.first() {
        let message = invalid
            .iter()
            .map(ToString::to_string)
            .collect::<Vec<_>>()
            .join("; ");
        let conds = vec![
            conditions::new("Ready", false, "InvalidSpec", &message, generation),
            conditions::new("Progressing", false, "InvalidSpec", &message, generation),
            conditions::new("Degraded", true, "InvalidSpec", &message, generation),
        ];
        publish_on_change(
            ctx,
            ms,
            &current,
            "Degraded",
            "InvalidSpec",
            EventType::Warning,
            &format!("invalid field {first}"),
        )
        .await;
        let status = MicroserviceStatus {
            observed_generation: generation,
            conditions: conds,
            ..current.clone()
        };
        write_status(ctx, ms, &current, status).await?;
        return Ok(Action::await_change());
    }

    // Dependencies on other Microservices must exist in the namespace; those with a ready pod
    // can answer a call now (the Dependencies column counts them). A target's status change
    // reaches this reconcile through the dependents watch in `run`.
    let mss: Api<Microservice> = Api::namespaced(ctx.client.clone(), &ns);
    let mut missing = Vec::new();
    let mut deps_ready = 0;
    for d in &ms.spec.dependencies {
        match &d.microservice {
            Some(target) => match mss.get_opt(target).await? {
                None => missing.push(target.clone()),
                Some(t) if can_answer(&t) => deps_ready += 1,
                Some(_) => {}
            },
            // An external URL: the operator does not probe it; the sidecar's breaker does.
            None => deps_ready += 1,
        }
    }

    // The Queues and Broker of the sidecar's pub/sub bridge: until they all exist, nothing is
    // applied (the running pods keep their config) and the condition names what is missing.
    let bridge = match super::queue::resolve_bridge(ctx, &ns, ms).await? {
        Ok(b) => b,
        Err((reason, message)) => {
            let conds = vec![
                conditions::new("Ready", false, reason, &message, generation),
                conditions::new("Progressing", false, reason, &message, generation),
                conditions::new("Degraded", true, reason, &message, generation),
            ];
            publish_on_change(
                ctx,
                ms,
                &current,
                "Degraded",
                reason,
                EventType::Warning,
                &message,
            )
            .await;
            let status = MicroserviceStatus {
                observed_generation: generation,
                conditions: conds,
                ..current.clone()
            };
            write_status(ctx, ms, &current, status).await?;
            return Ok(Action::requeue(DEPENDENCY_RECHECK));
        }
    };

    if ms.spec.edge.is_some() {
        ensure_identity_secret(ctx, &ns).await?;
    }
    // Under the mesh: the namespace's trust bundle before the pods that mount it, and the
    // callers the graph admits now.
    let callers = match &ctx.mesh {
        Some(m) => {
            m.ensure_bundle(&ctx.client, &ns).await?;
            m.callers(&ns, &name)
        }
        None => Vec::new(),
    };
    // Autoscaling: what the cluster serves decides what is rendered (KEDA, or only the
    // HorizontalPodAutoscaler), and what was applied last what is removed.
    let autoscaled_by = ms
        .annotations()
        .contains_key(render::autoscaling::ANNOTATION_AUTOSCALED_BY);
    let served = if ms.spec.autoscaling.is_some() || current.autoscaling.is_some() || autoscaled_by
    {
        Some(ctx.autoscaling.served(&ctx.client).await?)
    } else {
        None
    };
    let rendered = match served {
        Some(s) if s.keda != ctx.render.keda => {
            let opts = crate::render::RenderOptions {
                keda: s.keda,
                ..ctx.render.clone()
            };
            render::render_in_mesh(ms, &opts, bridge.as_ref(), &callers)?
        }
        _ => render::render_in_mesh(ms, &ctx.render, bridge.as_ref(), &callers)?,
    };
    if let Some(served) = served {
        // Once status says an autoscaler scales it, the operator applied no replicas since:
        // nothing is left to hand over, and the Deployment is not read again.
        if rendered.autoscalers.scales() && current.autoscaling.is_none() {
            autoscaling::hand_over_replicas(&ctx.client, &ns, &name).await?;
        }
        autoscaling::apply(
            &ctx.client,
            &ns,
            &name,
            &rendered.autoscalers,
            current.autoscaling.as_ref(),
            served,
        )
        .await?;
    }
    let deployment = workload::apply(&ctx.client, &ns, &name, &rendered, &ctx.applied).await?;
    if let Some(m) = &ctx.mesh {
        m.rendered(&ns, ms, callers);
    }

    // Under an autoscaler, what it last asked for (the Deployment's count) is what is desired.
    let scaler = rendered.autoscalers.scaler();
    let desired = match scaler {
        Some(_) => deployment
            .spec
            .as_ref()
            .and_then(|s| s.replicas)
            .unwrap_or(ms.spec.replicas),
        None => ms.spec.replicas,
    };
    let dstatus = deployment.status.clone().unwrap_or_default();
    let ready = dstatus.ready_replicas.unwrap_or(0);
    let updated = dstatus.updated_replicas.unwrap_or(0);
    let rolled_out = deployment.metadata.generation.is_some()
        && dstatus.observed_generation >= deployment.metadata.generation
        && updated >= desired
        && dstatus.replicas.unwrap_or(0) <= desired;

    let deps_total = ms.spec.dependencies.len();
    let mut conds = Vec::new();
    let (ready_ok, ready_reason, ready_msg) = if !missing.is_empty() {
        (
            false,
            "DependencyNotFound",
            format!("DependencyNotFound: {}", missing.join(", ")),
        )
    } else if ready >= desired && rolled_out {
        if desired == 0 {
            (true, "ScaledToZero", "scaled to zero replicas".to_string())
        } else {
            (
                true,
                "Available",
                format!("{ready}/{desired} replicas ready"),
            )
        }
    } else {
        (
            false,
            "ReplicasNotReady",
            format!("{ready}/{desired} replicas ready"),
        )
    };
    conds.push(conditions::new(
        "Ready",
        ready_ok,
        ready_reason,
        ready_msg,
        generation,
    ));
    conds.push(if rolled_out {
        conditions::new(
            "Progressing",
            false,
            "RolloutComplete",
            format!("{updated} replicas up to date"),
            generation,
        )
    } else {
        conditions::new(
            "Progressing",
            true,
            "RollingOut",
            format!("{updated}/{desired} replicas updated"),
            generation,
        )
    });
    conds.push(if !missing.is_empty() {
        conditions::new(
            "Degraded",
            true,
            "DependencyNotFound",
            format!(
                "DependencyNotFound: {} (no such Microservice in namespace {ns})",
                missing.join(", ")
            ),
            generation,
        )
    } else if rolled_out && ready < desired {
        conditions::new(
            "Degraded",
            true,
            "ReplicasUnavailable",
            format!("{ready}/{desired} replicas ready"),
            generation,
        )
    } else {
        conditions::new(
            "Degraded",
            false,
            "AsExpected",
            "replicas ready and dependencies resolved",
            generation,
        )
    });

    if let Some(a) = &ms.spec.autoscaling {
        conds.push(autoscaling_condition(
            &name,
            a,
            &rendered.autoscalers,
            generation,
        ));
    } else if let Some(external) = &rendered.autoscalers.external {
        conds.push(conditions::new(
            "Autoscaling",
            true,
            "External",
            format!("{external} scales the Deployment (annotation {}); the operator applies no replicas", render::autoscaling::ANNOTATION_AUTOSCALED_BY),
            generation,
        ));
    }

    if !missing.is_empty() {
        let note = format!("dependency Microservice not found: {}", missing.join(", "));
        publish_on_change(
            ctx,
            ms,
            &current,
            "Degraded",
            "DependencyNotFound",
            EventType::Warning,
            &note,
        )
        .await;
    }

    let status = MicroserviceStatus {
        observed_generation: generation,
        conditions: conds,
        replicas: Some(desired),
        ready_replicas: Some(ready),
        replica_summary: Some(format!("{ready}/{desired}")),
        dependency_summary: Some(format!("{deps_ready}/{deps_total}")),
        config_hash: Some(rendered.config_hash),
        autoscaling: scaler.map(|s| weir_crds::microservice::AutoscalingStatus {
            scaler: Some(s.to_string()),
            object: Some(match (s, &rendered.autoscalers.external) {
                (_, Some(external)) => external.clone(),
                (render::autoscaling::SCALER_KEDA, _) => format!("ScaledObject/{name}"),
                _ => format!("HorizontalPodAutoscaler/{name}"),
            }),
            current_replicas: Some(dstatus.replicas.unwrap_or(0)),
            desired_replicas: Some(desired),
        }),
    };
    write_status(ctx, ms, &current, status).await?;

    Ok(if !missing.is_empty() {
        Action::requeue(DEPENDENCY_RECHECK)
    } else {
        // Deployment status changes arrive through the owned watch.
        Action::requeue(RESYNC)
    })
}

/// `Autoscaling`: what scales the Microservice, or why part of `spec.autoscaling` cannot apply.
fn autoscaling_condition(
    name: &str,
    spec: &weir_crds::microservice::AutoscalingSpec,
    rendered: &render::autoscaling::Autoscalers,
    generation: Option<i64>,
) -> k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition {
    let range = format!("{}-{} replicas", spec.min_replicas, spec.max_replicas);
    if rendered.lag_without_keda {
        let rest = if rendered.hpa.is_some() {
            // A HorizontalPodAutoscaler does not scale from zero.
            format!(
                "only the CPU/memory targets apply, through HorizontalPodAutoscaler/{name} ({}-{} replicas)",
                spec.min_replicas.max(1),
                spec.max_replicas
            )
        } else {
            "nothing scales it: the Deployment keeps spec.replicas".to_string()
        };
        return conditions::new(
            "Autoscaling",
            false,
            "KedaNotInstalled",
            format!(
                "spec.autoscaling.queueLag needs KEDA (keda.sh/v1alpha1 ScaledObject is not served by this cluster); {rest}"
            ),
            generation,
        );
    }
    match rendered.scaler() {
        Some(render::autoscaling::SCALER_KEDA) => conditions::new(
            "Autoscaling",
            true,
            "ScaledObject",
            format!("KEDA ScaledObject/{name} scales the Deployment ({range}, queue lag)"),
            generation,
        ),
        _ => conditions::new(
            "Autoscaling",
            true,
            "HorizontalPodAutoscaler",
            format!("HorizontalPodAutoscaler/{name} scales the Deployment ({range})"),
            generation,
        ),
    }
}

/// Whether a dependency can answer a call now: at least one of its pods is ready (a target
/// that is rolling out or partly down still answers).
fn can_answer(target: &Microservice) -> bool {
    target
        .status
        .as_ref()
        .and_then(|s| s.ready_replicas)
        .is_some_and(|r| r > 0)
}

/// The namespace's identity key (`x-user-*` headers are trusted only when signed with it, see
/// docs/api.md): created with 32 random bytes when an edge first needs it. An existing Secret,
/// made by hand or rotated, is left as it is; it is owned by no Microservice, since every
/// sidecar of the namespace uses it.
async fn ensure_identity_secret(ctx: &Context, ns: &str) -> Result<(), Error> {
    use render::proxy_config::{IDENTITY_SECRET, IDENTITY_SECRET_KEY};
    let key: [u8; 32] = rand::random();
    let data = [(IDENTITY_SECRET_KEY.to_string(), hex::encode(key))].into();
    if super::secrets::create_once(&ctx.client, ns, IDENTITY_SECRET, data, None).await? {
        tracing::info!(
            namespace = ns,
            secret = IDENTITY_SECRET,
            "identity key created"
        );
    }
    Ok(())
}

/// Publishes an Event when a condition newly takes `reason` (not on every reconcile).
async fn publish_on_change(
    ctx: &Context,
    ms: &Microservice,
    current: &MicroserviceStatus,
    condition: &str,
    reason: &str,
    type_: EventType,
    note: &str,
) {
    // The cached object may not carry the status this process last wrote yet. Every condition
    // published on is `condition=True`.
    let already = ctx.last_written.has(
        &super::backoff::key_of(ms),
        ms.metadata.uid.as_deref(),
        &current.conditions,
        (condition, "True", reason, ms.metadata.generation),
    );
    if already {
        return;
    }
    events::publish(ctx, ms, type_, reason, note).await;
}

/// Writes status only when it says something new ([`status`]), after noting its conditions for
/// the Events.
async fn write_status(
    ctx: &Context,
    ms: &Microservice,
    current: &MicroserviceStatus,
    mut status: MicroserviceStatus,
) -> Result<(), Error> {
    let name = ms.name_any();
    let ns = ms.namespace().unwrap_or_default();
    status.conditions = conditions::merge(&current.conditions, status.conditions);
    // Recorded before the write: an Event already published for these conditions must not be
    // published again when the write fails and the reconcile is retried.
    ctx.last_written.record(
        &super::backoff::key_of(ms),
        ms.metadata.uid.as_deref(),
        &status.conditions,
    );
    status::write::<Microservice, _>(&ctx.client, &ns, &name, current, &status).await?;
    Ok(())
}
