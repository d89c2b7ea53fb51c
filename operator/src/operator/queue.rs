//! The Queue reconciler: declares the Queue's stream, dead-letter stream, processed-event bucket
//! and one durable consumer per consuming Microservice on its Broker, removes consumers no
//! longer wanted, and reports the broker's figures and `Ready` in status. A spec the broker
//! refuses is a `Ready=False` condition with the broker's reason and a backoff requeue, never a
//! crash loop. With `deletionPolicy: Delete` a finalizer removes the streams when the Queue goes.
//!
//! Also resolves the Queues and Broker a Microservice publishes to or consumes, for its
//! sidecar's bridge config.

use super::broker::{Unusable, endpoint};
use super::{Context, conditions, events, status};
use crate::render::messaging::{Messaging, ResolvedQueue, build, resolve_schema};
use futures::StreamExt;
use k8s_openapi::api::core::v1::ConfigMap;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition;
use kube::ResourceExt;
use kube::api::{Api, ListParams, Patch, PatchParams};
use kube::runtime::controller::{Action, Controller};
use kube::runtime::events::EventType;
use kube::runtime::reflector::{ObjectRef, Store};
use kube::runtime::watcher;
use serde_json::json;
use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::Duration;
use weir_broker::admin::{self, Admin, BrokerAdmin};
use weir_broker::topology::Topology;
use weir_crds::queue::{DeletionPolicy, QueueStatus};
use weir_crds::{Broker, Microservice, Queue, validate};

/// Held by a Queue with `deletionPolicy: Delete` until its streams are deleted.
pub const FINALIZER: &str = "weir.dev/queue-cleanup";
/// Refresh of the figures (messages, pending, dead letters) while all is well.
pub const FIGURES_RESYNC: Duration = Duration::from_secs(30);
/// Recheck while the Broker, a ConfigMap or a Secret is missing (they are not watched).
pub const MISSING_RECHECK: Duration = Duration::from_secs(30);

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("Kubernetes API: {0}")]
    Kube(#[from] kube::Error),
    #[error("object has no {0}")]
    Missing(&'static str),
    /// Only while deleting: the streams must go before the finalizer does.
    #[error("deleting the Queue's streams: {0}")]
    Cleanup(admin::Error),
}

impl Error {
    pub fn metric_label(&self) -> &'static str {
        match self {
            Error::Kube(_) => "kube",
            Error::Missing(_) => "missing",
            Error::Cleanup(_) => "broker",
        }
    }
}

/// The Queues a Microservice consumes, as controller keys (a new consumer reconciles them).
pub fn queues_consumed_by(ms: &Microservice) -> Vec<ObjectRef<Queue>> {
    let ns = ms.namespace().unwrap_or_default();
    ms.spec
        .consumes
        .iter()
        .map(|c| ObjectRef::new(&c.queue).within(&ns))
        .collect()
}

/// The Queues (in `store`) on Broker `b`.
pub fn queues_on(store: &Store<Queue>, b: &Broker) -> Vec<ObjectRef<Queue>> {
    let (ns, name) = (b.namespace(), b.name_any());
    store
        .state()
        .into_iter()
        .filter(|q| q.namespace() == ns && q.spec.broker == name)
        .map(|q| ObjectRef::from_obj(&*q))
        .collect()
}

/// The Microservices (in `store`) that publish to or consume Queue `q`.
pub fn microservices_using(store: &Store<Microservice>, q: &Queue) -> Vec<ObjectRef<Microservice>> {
    let (ns, name) = (q.metadata.namespace.as_deref(), q.name_any());
    // Every event of a Queue (each status write) comes here: the Microservices looked at in
    // place, only those using it taken out.
    store
        .state_filter(|ms| {
            ms.metadata.namespace.as_deref() == ns
                && (ms.spec.publishes.iter().any(|p| p.queue == name)
                    || ms.spec.consumes.iter().any(|c| c.queue == name))
        })
        .iter()
        .map(|ms| ObjectRef::from_obj(&**ms))
        .collect()
}

pub async fn run(ctx: Arc<Context>, namespace: Option<&str>) {
    let client = ctx.client.clone();
    let (queues, mss, brokers) = match namespace {
        Some(ns) => (
            Api::<Queue>::namespaced(client.clone(), ns),
            Api::<Microservice>::namespaced(client.clone(), ns),
            Api::<Broker>::namespaced(client, ns),
        ),
        None => (
            Api::all(client.clone()),
            Api::all(client.clone()),
            Api::all(client),
        ),
    };
    let controller = Controller::new(queues, watcher::Config::default());
    // The figures in each Queue's status, exported at each scrape (metrics.rs).
    let _ = ctx.metrics.queues.set(controller.store());
    // A Broker's change (URL, credentials, back online) reconciles the Queues on it.
    let store = controller.store();
    controller
        .watches(mss, watcher::Config::default(), |ms| {
            queues_consumed_by(&ms)
        })
        .watches(brokers, watcher::Config::default(), move |b| {
            queues_on(&store, &b)
        })
        .shutdown_on_signal()
        .run(reconcile, error_policy, ctx)
        .for_each(super::backoff::log_outcome)
        .await;
}

pub fn error_policy(q: Arc<Queue>, error: &Error, ctx: Arc<Context>) -> Action {
    let delay = super::backoff::after_failure(
        &ctx.messaging_backoff,
        &ctx.metrics,
        &*q,
        error,
        error.metric_label(),
    );
    Action::requeue(delay)
}

pub async fn reconcile(q: Arc<Queue>, ctx: Arc<Context>) -> Result<Action, Error> {
    ctx.metrics
        .reconcile("Queue", reconcile_inner(&q, &ctx))
        .await
}

fn has_finalizer(q: &Queue) -> bool {
    q.finalizers().iter().any(|f| f == FINALIZER)
}

/// Adds or removes the finalizer with a merge patch carrying the resourceVersion read, so a
/// concurrent change of the list is a conflict (retried) rather than lost.
async fn set_finalizer(ctx: &Context, ns: &str, q: &Queue, present: bool) -> Result<(), Error> {
    let mut wanted: Vec<String> = q
        .finalizers()
        .iter()
        .filter(|f| *f != FINALIZER)
        .cloned()
        .collect();
    if present {
        wanted.push(FINALIZER.to_string());
    }
    let patch = json!({
        "metadata": {"finalizers": wanted, "resourceVersion": q.metadata.resource_version},
    });
    Api::<Queue>::namespaced(ctx.client.clone(), ns)
        .patch(
            &q.name_any(),
            &PatchParams::default(),
            &Patch::Merge(&patch),
        )
        .await?;
    Ok(())
}

/// What the broker side came to: the figures, or why there are none.
enum Outcome {
    Declared {
        figures: admin::Figures,
        consumers: usize,
        /// Settings this broker kind does not apply (see `weir_broker::admin::not_applied`).
        not_applied: Vec<String>,
    },
    NotReady(Unusable),
}

async fn reconcile_inner(q: &Queue, ctx: &Context) -> Result<Action, Error> {
    let name = q
        .metadata
        .name
        .clone()
        .ok_or(Error::Missing("metadata.name"))?;
    let ns = q.namespace().ok_or(Error::Missing("metadata.namespace"))?;
    let generation = q.metadata.generation;

    if q.metadata.deletion_timestamp.is_some() {
        if has_finalizer(q) {
            cleanup(q, ctx, &ns, &name).await?;
            set_finalizer(ctx, &ns, q, false).await?;
        }
        return Ok(Action::await_change());
    }
    let wants_finalizer = q.spec.deletion_policy == DeletionPolicy::Delete;
    if wants_finalizer != has_finalizer(q) {
        // The patch is itself a change: the next reconcile carries on from there.
        set_finalizer(ctx, &ns, q, wants_finalizer).await?;
        return Ok(Action::await_change());
    }

    let current = q.status.clone().unwrap_or_default();
    let k = super::backoff::key_of(q);
    let (outcome, action) = match declare(q, ctx, &ns, &name).await? {
        Ok(o) => {
            ctx.messaging_backoff.reset(&k);
            (o, Action::requeue(FIGURES_RESYNC))
        }
        Err((u, retry)) => {
            let action = match retry {
                Retry::Backoff => Action::requeue(ctx.messaging_backoff.next_delay(&k)),
                Retry::Recheck => Action::requeue(MISSING_RECHECK),
                Retry::OnChange => Action::await_change(),
            };
            (Outcome::NotReady(u), action)
        }
    };
    let status = match outcome {
        Outcome::Declared {
            figures,
            consumers,
            not_applied,
        } => QueueStatus {
            observed_generation: generation,
            conditions: vec![
                conditions::new(
                    "Ready",
                    true,
                    "Declared",
                    format!(
                        "stream {} on the broker with {consumers} consumer(s)",
                        weir_broker::queue::stream_name(&ns, &name)
                    ),
                    generation,
                ),
                settings_condition(ctx, q, &current, &not_applied).await,
            ],
            messages: Some(figures.messages as i64),
            pending: figures
                .pending
                .into_iter()
                .map(|(k, v)| (k, v as i64))
                .collect(),
            dead_letters: figures.dead_letters.map(|d| d as i64),
        },
        Outcome::NotReady(u) => {
            publish_on_change(ctx, q, &current, u.reason, &u.message).await;
            QueueStatus {
                observed_generation: generation,
                conditions: vec![conditions::new(
                    "Ready", false, u.reason, u.message, generation,
                )],
                // The last figures read stay until the broker answers again.
                ..current.clone()
            }
        }
    };
    write_status(ctx, &ns, &name, &current, status).await?;
    Ok(action)
}

/// How soon to try again after a failure on the broker side.
enum Retry {
    /// The broker failed or refused: exponential backoff.
    Backoff,
    /// Something unwatched is missing (Broker, ConfigMap, Secret).
    Recheck,
    /// Only an edit of the Queue can fix it.
    OnChange,
}

/// The Queue's Broker, connected.
async fn connect(
    ctx: &Context,
    ns: &str,
    broker_name: &str,
) -> Result<Result<BrokerAdmin, (Unusable, Retry)>, Error> {
    let Some(broker) = Api::<Broker>::namespaced(ctx.client.clone(), ns)
        .get_opt(broker_name)
        .await?
    else {
        return Ok(Err((
            Unusable {
                reason: "BrokerNotFound",
                message: format!("spec.broker: Broker {broker_name:?} not found in namespace {ns}"),
            },
            Retry::Recheck,
        )));
    };
    let e = match endpoint(&ctx.client, ns, &broker, &ctx.render.cluster_domain).await? {
        Ok(e) => e,
        Err(u) => return Ok(Err((u, Retry::Recheck))),
    };
    let conn_key = format!("{ns}/{broker_name}");
    match ctx.connections.get(&conn_key, &e).await {
        Ok(b) => Ok(Ok(b)),
        Err(e) => Ok(Err((
            Unusable {
                reason: e.reason(),
                message: format!("Broker {broker_name}: {e}"),
            },
            Retry::Backoff,
        ))),
    }
}

fn broker_failure(ctx: &Context, ns: &str, broker: &str, e: admin::Error) -> (Unusable, Retry) {
    if !matches!(e, admin::Error::Refused { .. }) {
        // A timeout may be a dead connection: dial afresh next time.
        ctx.connections.forget(&format!("{ns}/{broker}"));
    }
    let retry = match e {
        admin::Error::Invalid { .. } => Retry::OnChange,
        _ => Retry::Backoff,
    };
    (
        Unusable {
            reason: e.reason(),
            message: e.to_string(),
        },
        retry,
    )
}

/// Declares the topology and the wanted consumers, deletes the unwanted ones, reads figures.
async fn declare(
    q: &Queue,
    ctx: &Context,
    ns: &str,
    name: &str,
) -> Result<Result<Outcome, (Unusable, Retry)>, Error> {
    let invalid = validate::queue(&q.spec);
    if !invalid.is_empty() {
        let message = invalid
            .iter()
            .map(ToString::to_string)
            .collect::<Vec<_>>()
            .join("; ");
        return Ok(Err((
            Unusable {
                reason: "InvalidSpec",
                message,
            },
            Retry::OnChange,
        )));
    }
    if let Err(u) = queue_schema(ctx, ns, q).await? {
        return Ok(Err(u));
    }
    let topology = match Topology::new(ns, name, &q.spec) {
        Ok(t) => t,
        Err(e) => return Ok(Err(broker_failure(ctx, ns, &q.spec.broker, e))),
    };
    let broker = match connect(ctx, ns, &q.spec.broker).await? {
        Ok(b) => b,
        Err(u) => return Ok(Err(u)),
    };
    let fail = |e| Ok(Err(broker_failure(ctx, ns, &q.spec.broker, e)));
    if let Err(e) = broker.declare_queue(&topology).await {
        return fail(e);
    }
    let wanted: BTreeSet<String> = Api::<Microservice>::namespaced(ctx.client.clone(), ns)
        .list(&ListParams::default())
        .await?
        .items
        .into_iter()
        .filter(|ms| ms.spec.consumes.iter().any(|c| c.queue == name))
        .map(|ms| ms.name_any())
        .collect();
    for ms in &wanted {
        if let Err(e) = broker.declare_consumer(&topology, ms).await {
            return fail(e);
        }
    }
    let known: Vec<String> = q
        .status
        .as_ref()
        .map(|s| s.pending.keys().cloned().collect())
        .unwrap_or_default();
    match broker.managed_consumers(&topology, &known).await {
        Ok(existing) => {
            for c in existing.iter().filter(|c| !wanted.contains(*c)) {
                tracing::info!(queue = %name, namespace = %ns, consumer = %c, "deleting a consumer no Microservice wants");
                if let Err(e) = broker.delete_consumer(&topology, c).await {
                    return fail(e);
                }
            }
        }
        Err(e) => return fail(e),
    }
    let wanted: Vec<String> = wanted.into_iter().collect();
    match broker.figures(&topology, &wanted).await {
        Ok(figures) => Ok(Ok(Outcome::Declared {
            figures,
            consumers: wanted.len(),
            not_applied: [
                admin::not_applied(broker.kind(), &q.spec),
                broker.refused_settings(&topology),
            ]
            .concat(),
        })),
        Err(e) => fail(e),
    }
}

/// The Queue's schema, resolved and compiled (the sidecars validate against it).
async fn queue_schema(
    ctx: &Context,
    ns: &str,
    q: &Queue,
) -> Result<Result<Option<serde_json::Value>, (Unusable, Retry)>, Error> {
    let cm = match q
        .spec
        .schema
        .as_ref()
        .and_then(|s| s.config_map_ref.as_ref())
    {
        Some(r) => Api::<ConfigMap>::namespaced(ctx.client.clone(), ns)
            .get_opt(&r.name)
            .await?
            .map(|c| c.data.unwrap_or_default()),
        None => None,
    };
    Ok(
        resolve_schema(q.spec.schema.as_ref(), cm.as_ref()).map_err(|e| {
            // A missing ConfigMap may appear; a schema that does not compile needs an edit.
            let retry = if q
                .spec
                .schema
                .as_ref()
                .is_some_and(|s| s.config_map_ref.is_some())
            {
                Retry::Recheck
            } else {
                Retry::OnChange
            };
            (
                Unusable {
                    reason: "InvalidSchema",
                    message: e.to_string(),
                },
                retry,
            )
        }),
    )
}

/// Deletes the streams of a Queue with `deletionPolicy: Delete`. A Broker that is gone leaves
/// nothing the operator could delete: the finalizer goes, with a Warning event.
async fn cleanup(q: &Queue, ctx: &Context, ns: &str, name: &str) -> Result<(), Error> {
    let topology = match Topology::new(ns, name, &q.spec) {
        Ok(t) => t,
        Err(_) => {
            // Names do not depend on the fields that can be invalid: use the defaults.
            let mut spec = q.spec.clone();
            spec.max_age = None;
            spec.duplicate_window = "2m".into();
            spec.consumer = Default::default();
            spec.dead_letter = Default::default();
            Topology::new(ns, name, &spec).map_err(Error::Cleanup)?
        }
    };
    match connect(ctx, ns, &q.spec.broker).await? {
        Ok(broker) => {
            let known: Vec<String> = q
                .status
                .as_ref()
                .map(|s| s.pending.keys().cloned().collect())
                .unwrap_or_default();
            broker
                .delete_queue(&topology, &known)
                .await
                .map_err(Error::Cleanup)
        }
        Err((u, _)) if u.reason == "BrokerNotFound" => {
            let note = format!(
                "{}; the streams of this Queue, if any, were left on the broker",
                u.message
            );
            publish(ctx, q, "CleanupSkipped", &note).await;
            Ok(())
        }
        Err((u, _)) => Err(Error::Cleanup(admin::Error::Broker {
            what: format!("Broker {}", q.spec.broker),
            message: u.message,
        })),
    }
}

async fn publish(ctx: &Context, q: &Queue, reason: &str, note: &str) {
    events::publish(ctx, q, EventType::Warning, reason, note).await;
}

/// `SettingsApplied`: False naming each setting the Broker's kind does not apply, with a
/// Warning Event when that list changes (not on every reconcile).
async fn settings_condition(
    ctx: &Context,
    q: &Queue,
    current: &QueueStatus,
    not_applied: &[String],
) -> Condition {
    let generation = q.metadata.generation;
    if not_applied.is_empty() {
        return conditions::new(
            "SettingsApplied",
            true,
            "AllApplied",
            "the broker applies every setting of the spec",
            generation,
        );
    }
    let message = format!(
        "Broker {} does not apply: {}",
        q.spec.broker,
        not_applied.join("; ")
    );
    let already = conditions::find(&current.conditions, "SettingsApplied")
        .is_some_and(|c| c.message == message && c.observed_generation == generation);
    if !already {
        publish(ctx, q, "SettingsNotApplied", &message).await;
    }
    conditions::new(
        "SettingsApplied",
        false,
        "NotAppliedByBroker",
        message,
        generation,
    )
}

/// An Event when `Ready` newly takes `reason` (not on every reconcile).
async fn publish_on_change(
    ctx: &Context,
    q: &Queue,
    current: &QueueStatus,
    reason: &str,
    note: &str,
) {
    let already = conditions::find(&current.conditions, "Ready")
        .is_some_and(|c| c.reason == reason && c.observed_generation == q.metadata.generation);
    if !already {
        publish(ctx, q, reason, note).await;
    }
}

async fn write_status(
    ctx: &Context,
    ns: &str,
    name: &str,
    current: &QueueStatus,
    status: QueueStatus,
) -> Result<(), Error> {
    let status = status::merged(current, status);
    status::write::<Queue, _>(&ctx.client, ns, name, current, &status).await?;
    Ok(())
}

/// Why a Microservice's bridge config cannot be rendered: a condition reason and message.
pub type Unresolved = (&'static str, String);

/// The bridge config of a Microservice from the Queues and Broker it names (same namespace),
/// or why it cannot be had (`QueueNotFound: <q>`, `BrokerNotFound: <b>`, an invalid schema).
pub async fn resolve_bridge(
    ctx: &Context,
    ns: &str,
    ms: &Microservice,
) -> Result<Result<Option<Messaging>, Unresolved>, kube::Error> {
    let spec = &ms.spec;
    if spec.publishes.is_empty() && spec.consumes.is_empty() {
        return Ok(Ok(None));
    }
    let names: BTreeSet<&str> = spec
        .publishes
        .iter()
        .map(|p| p.queue.as_str())
        .chain(spec.consumes.iter().map(|c| c.queue.as_str()))
        .collect();
    let queues_api = Api::<Queue>::namespaced(ctx.client.clone(), ns);
    let mut queues = BTreeMap::new();
    let mut missing = Vec::new();
    for n in names {
        match queues_api.get_opt(n).await? {
            Some(q) => {
                queues.insert(n.to_string(), q);
            }
            None => missing.push(n.to_string()),
        }
    }
    if !missing.is_empty() {
        return Ok(Err((
            "QueueNotFound",
            format!(
                "QueueNotFound: {} (no such Queue in namespace {ns})",
                missing.join(", ")
            ),
        )));
    }
    let broker_names: BTreeSet<&str> = queues.values().map(|q| q.spec.broker.as_str()).collect();
    let brokers_api = Api::<Broker>::namespaced(ctx.client.clone(), ns);
    let mut brokers = BTreeMap::new();
    for b in broker_names {
        match brokers_api.get_opt(b).await? {
            Some(found) => {
                brokers.insert(b.to_string(), found);
            }
            None => missing.push(b.to_string()),
        }
    }
    if !missing.is_empty() {
        return Ok(Err((
            "BrokerNotFound",
            format!(
                "BrokerNotFound: {} (no such Broker in namespace {ns})",
                missing.join(", ")
            ),
        )));
    }
    let mut resolved = BTreeMap::new();
    for (n, q) in queues {
        let cm = match q
            .spec
            .schema
            .as_ref()
            .and_then(|s| s.config_map_ref.as_ref())
        {
            Some(r) => Api::<ConfigMap>::namespaced(ctx.client.clone(), ns)
                .get_opt(&r.name)
                .await?
                .map(|c| c.data.unwrap_or_default()),
            None => None,
        };
        match resolve_schema(q.spec.schema.as_ref(), cm.as_ref()) {
            Ok(schema) => {
                resolved.insert(
                    n,
                    ResolvedQueue {
                        spec: q.spec,
                        schema,
                    },
                );
            }
            Err(e) => {
                return Ok(Err((
                    "QueueSchemaInvalid",
                    format!("QueueSchemaInvalid: Queue {n}: {e}"),
                )));
            }
        }
    }
    let name = ms.name_any();
    Ok(build(
        &name,
        ns,
        spec,
        &resolved,
        &brokers,
        &ctx.render.cluster_domain,
    )
    .map_err(|e| ("InvalidMessaging", e.to_string())))
}
